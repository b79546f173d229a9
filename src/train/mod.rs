//! Training small classifiers, standard and adversarial (the paper's reference losses: Madry
//! PGD-AT, TRADES, MMA, MART, ALP, CLP, HTRADES, GAIRAT and margin-reweighted variants, in
//! [`loss`]), with checkpoints that resume bit-for-bit and a robust-accuracy evaluation sharing
//! the same PGD.

pub mod adam;
pub mod checkpoint;
pub mod eval;
pub mod loss;
pub mod pgd;

use std::f64::consts::PI;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::attack::sample_seed;
use crate::data::Dataset;
use crate::model::native::NativeClassifier;
use crate::model::weights;
use crate::model::Classifier;
use crate::util::{with_torch_seed, Check, Checked, NoProgress, OptionError, Progress};
use adam::Adam;
use loss::{Batch, Setting, Step};
use pgd::PgdConfig;

/// The training loss (see [`loss`]; papers cited there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum Mode {
    /// Cross-entropy on clean inputs.
    Standard,
    /// Madry et al. 2018: cross-entropy on PGD adversarial examples.
    Pgd,
    /// Zhang et al. 2019: clean cross-entropy + beta * KL(clean || adversarial), PGD on the KL.
    Trades,
    /// Ding et al. 2020 (MMA): cross-entropy at each sample's shortest adversarial point (FMN), up to eps.
    Mma,
    /// The reference code's MMA at a fixed eps: PGD cross-entropy if clean-correct, else clean.
    MmaFixed,
    /// Wang et al. 2020 (MART): boosted PGD cross-entropy + beta * KL weighted by clean doubt.
    Mart,
    /// Kannan et al. 2018 (ALP): PGD cross-entropy + beta * squared clean-adversarial probability gap.
    Alp,
    /// Kannan et al. 2018 (CLP): clean cross-entropy + beta * squared clean-adversarial probability gap.
    Clp,
    /// The reference code's TRADES variant: PGD on the entropy gap, squared log-probability gap.
    Htrades,
    /// Zhang et al. 2021 (GAIRAT): PGD cross-entropy weighted by the PGD steps a sample withstood.
    Gairat,
    /// Madry reweighted by the probabilistic margin at the PGD point (the reference's pm_madry).
    PmMadry,
    /// TRADES with its KL reweighted by the probabilistic margin (the reference's pm_trades).
    PmTrades,
}

/// How the learning rate changes over the run (per optimizer step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum LrSchedule {
    Constant,
    /// Half-cosine from `lr` to 0.
    Cosine,
    /// `lr`, then x0.1 after 50% and again after 75% of the epochs.
    Step,
}

/// Everything that determines the trained weights (a checkpoint resumes only under the same).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub mode: Mode,
    pub attack: PgdConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    /// Weight β of the robust term (TRADES' KL and the losses that add a term to a
    /// cross-entropy: MART, ALP, CLP, HTRADES, PM-TRADES). Named `trades_beta` before those.
    #[serde(alias = "trades_beta")]
    pub beta: f64,
    /// ε (and step size) grow linearly from 0 over this many epochs.
    pub eps_warmup_epochs: f64,
    /// Registered native architecture (`--arch`, with its `@N` width).
    pub arch: String,
    pub seed: u64,
    /// Fingerprint of the training data (source, size, sha256 of labels and indices).
    pub data: String,
    /// Weights the run starts from (`path sha256=…`) instead of a random initialisation.
    pub init: Option<String>,
}

impl Check for TrainConfig {
    fn validate(&self) -> Result<()> {
        self.attack.validate()?;
        if self.epochs == 0 {
            bail!(OptionError::new(
                "epochs",
                "the epoch count must be positive"
            ));
        }
        if self.batch_size == 0 {
            bail!(OptionError::new(
                "batch_size",
                "the batch size must be positive"
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!(OptionError::new(
                "lr",
                format!("the learning rate must be positive, got {}", self.lr)
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!(OptionError::new(
                "beta",
                format!("β must be a finite non-negative number, got {}", self.beta)
            ));
        }
        // GAIRAT weighs a sample by the PGD steps it withstood, against half the steps.
        if self.mode == Mode::Gairat && self.attack.steps < 2 {
            bail!(OptionError::new(
                "steps",
                "GAIRAT needs at least 2 PGD steps (it weighs samples by the steps they withstand)"
            ));
        }
        if !(self.eps_warmup_epochs.is_finite() && self.eps_warmup_epochs >= 0.0) {
            bail!(OptionError::new(
                "eps_warmup_epochs",
                "the ε warm-up (epochs) must be non-negative"
            ));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Learning rate at optimizer step `t` of `total`.
    pub fn lr_at(&self, t: usize, total: usize) -> f64 {
        let frac = t as f64 / total.max(1) as f64;
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => self.lr * 0.5 * (1.0 + (PI * frac).cos()),
            LrSchedule::Step => {
                self.lr
                    * if frac >= 0.75 {
                        0.01
                    } else if frac >= 0.5 {
                        0.1
                    } else {
                        1.0
                    }
            }
        }
    }

    /// Attack at step `t`, with ε warmed up over the first epochs.
    fn attack_at(&self, t: usize, steps_per_epoch: usize) -> PgdConfig {
        let warm = self.eps_warmup_epochs * steps_per_epoch as f64;
        if warm <= 0.0 {
            self.attack
        } else {
            self.attack.scaled((t as f64 / warm).min(1.0))
        }
    }
}

/// Refuses an attack ε outside the pixel box of inputs of `input_shape` (e.g. 8 meant as 8/255).
pub fn check_attack_eps(attack: &PgdConfig, input_shape: [i64; 3]) -> Result<()> {
    attack
        .norm
        .check_eps(attack.eps, Some(input_shape))
        .map_err(|e| OptionError::about("eps", e))
}

/// Running averages over one epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub loss: f64,
    pub clean_accuracy: f64,
    /// Accuracy on the training attack's examples (equals clean accuracy in standard mode).
    pub adv_accuracy: f64,
}

/// A training run: model, optimizer, position.
pub struct Trainer {
    pub model: NativeClassifier,
    pub opt: Adam,
    pub config: Checked<TrainConfig>,
    /// Epochs finished.
    pub epoch: usize,
    pub history: Vec<EpochStats>,
}

impl Trainer {
    /// A fresh model seeded from `config.seed`, for inputs of `input_shape`: an ε beyond their
    /// pixel box (e.g. 8 meant as 8/255) is refused.
    pub fn new(
        config: Checked<TrainConfig>,
        input_shape: [i64; 3],
        num_classes: i64,
        device: Device,
    ) -> Result<Self> {
        check_attack_eps(&config.attack, input_shape)?;
        let model = with_torch_seed(config.seed, || {
            NativeClassifier::new(&config.arch, input_shape, num_classes, device)
        })?;
        let mut params = model.var_store().variables();
        // BatchNorm running statistics are buffers, not parameters.
        params.retain(|_, t| t.requires_grad());
        let opt = Adam::new(params);
        Ok(Trainer {
            model,
            opt,
            config,
            epoch: 0,
            history: Vec::new(),
        })
    }

    /// Starts from the weights of a file of the same architecture (fine-tuning).
    pub fn init_from(&mut self, path: &std::path::Path) -> Result<()> {
        let tensors = weights::read_tensors(path)?;
        self.model
            .load_weights(tensors, &path.display().to_string())
    }

    /// Trains one epoch over `data`; every random choice derives from `(seed, epoch)`, so a
    /// run resumed at an epoch boundary matches an uninterrupted one.
    pub fn train_epoch(&mut self, data: &Dataset) -> Result<EpochStats> {
        self.train_epoch_with_progress(data, &NoProgress)
    }

    /// [`Self::train_epoch`] reporting to `progress`: one unit per sample for the training step
    /// and one per sample and PGD step (the CLI shows it as a bar per epoch).
    pub fn train_epoch_with_progress(
        &mut self,
        data: &Dataset,
        progress: &dyn Progress,
    ) -> Result<EpochStats> {
        let c = self.config.clone();
        let epoch_seed = c
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.epoch as u64 + 1);
        let mut order: Vec<i64> = (0..data.len() as i64).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(epoch_seed));
        let n = data.len();
        let steps_per_epoch = n.div_ceil(c.batch_size);
        let total = steps_per_epoch * c.epochs;
        let device = self.model.device();
        let units = 1 + if c.mode == Mode::Standard {
            0
        } else {
            c.attack.steps
        };
        progress.set_length((n * units) as u64);
        let (mut loss_sum, mut clean_ok, mut adv_ok) = (0.0, 0i64, 0i64);
        for (b, chunk) in order.chunks(c.batch_size).enumerate() {
            let t = self.epoch * steps_per_epoch + b;
            let idx = Tensor::from_slice(chunk);
            let x = data.images.index_select(0, &idx).to_device(device);
            let labels: Vec<i64> = chunk.iter().map(|&i| data.labels[i as usize]).collect();
            let y = Tensor::from_slice(&labels).to_device(device);
            let attack = c.attack_at(t, steps_per_epoch);
            let seeds: Vec<u64> = chunk
                .iter()
                .map(|&i| sample_seed(epoch_seed, i as usize))
                .collect();
            let setting = Setting {
                config: &c,
                attack,
                epoch: self.epoch,
            };
            let batch = Batch {
                x: &x,
                y: &y,
                seeds: &seeds,
            };
            let Step {
                loss,
                clean_logits,
                adv_logits,
            } = loss::loss(&setting, &self.model, &batch, progress)?;
            let loss_v = loss.double_value(&[]);
            if !loss_v.is_finite() {
                bail!(
                    "training diverged: loss {loss_v} at epoch {} step {b}",
                    self.epoch + 1
                );
            }
            self.opt.backward_step(&loss, c.lr_at(t, total))?;
            loss_sum += loss_v * chunk.len() as f64;
            clean_ok += correct(&clean_logits, &y);
            adv_ok += correct(&adv_logits, &y);
            let seen = (b * c.batch_size + chunk.len()) as f64;
            progress.set_message(format!(
                "loss {:.3} clean {:.1}% adv {:.1}%",
                loss_sum / seen,
                100.0 * clean_ok as f64 / seen,
                100.0 * adv_ok as f64 / seen
            ));
            progress.inc(chunk.len() as u64);
        }
        self.epoch += 1;
        let stats = EpochStats {
            epoch: self.epoch,
            loss: loss_sum / n as f64,
            clean_accuracy: clean_ok as f64 / n as f64,
            adv_accuracy: adv_ok as f64 / n as f64,
        };
        self.history.push(stats);
        Ok(stats)
    }
}

/// Number of rows whose argmax equals the label.
fn correct(logits: &Tensor, y: &Tensor) -> i64 {
    logits
        .detach()
        .argmax(-1, false)
        .eq_tensor(y)
        .sum(Kind::Int64)
        .int64_value(&[])
}
