//! The pseudo-margin: a small MLP on the model's penultimate features (or logits) trained to
//! predict the input margin, for models whose logit margin is a poor proxy for it
//! (low margin consistency).
//!
//! The net carries its own input standardisation and output scale as non-trainable variables,
//! so one safetensors file holds everything needed to apply it.

use anyhow::{ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::metrics::correlation::kendall_tau_b;
use crate::util::{to_vec_f64, with_torch_seed, Check, Checked, OptionError};

/// What the net reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PseudoInput {
    /// Penultimate features ([`crate::model::Classifier::features_and_logits`]).
    Features,
    /// Logits, for models that do not expose features (e.g. traced TorchScript).
    Logits,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum PseudoLoss {
    /// Mean squared error on `sqrt(d_in)` (standardised); the output estimates `d_in`.
    Regression,
    /// Pairwise logistic ranking loss on all pairs of a minibatch; the output only orders samples.
    Ranking,
}

/// Architecture of the net, stored in `detector.json` to rebuild it before loading the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetShape {
    pub input: PseudoInput,
    pub in_dim: i64,
    pub hidden: i64,
    /// Hidden layers (0: a linear model).
    pub depth: usize,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Width of the hidden layers.
    pub hidden: i64,
    /// Hidden layers (0: a linear model).
    pub depth: usize,
    pub loss: PseudoLoss,
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    /// Epochs without a better validation Kendall τ before stopping.
    pub patience: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            hidden: 64,
            depth: 2,
            loss: PseudoLoss::Regression,
            lr: 3e-3,
            weight_decay: 1e-4,
            batch_size: 128,
            max_epochs: 200,
            patience: 30,
        }
    }
}

/// Widest hidden layer and deepest net accepted: far beyond what a pseudo-margin needs
/// (64 × 2 by default), and small enough that a typo cannot allocate gigabytes.
pub const MAX_HIDDEN: i64 = 1 << 14;
pub const MAX_DEPTH: usize = 32;

impl NetShape {
    /// Refuses shapes libtorch would panic on (a zero-width layer) or that are absurdly large,
    /// whether they come from options or from a `detector.json`.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.in_dim >= 1,
            "pseudo-margin in_dim = {}: must be at least 1",
            self.in_dim
        );
        check_width(self.hidden, self.depth)
    }
}

fn check_width(hidden: i64, depth: usize) -> Result<()> {
    ensure!(
        (1..=MAX_HIDDEN).contains(&hidden),
        OptionError::new(
            "hidden",
            format!(
                "pseudo-margin hidden = {hidden}: the hidden width must be in 1..={MAX_HIDDEN}"
            )
        )
    );
    ensure!(
        depth <= MAX_DEPTH,
        OptionError::new(
            "depth",
            format!("pseudo-margin depth = {depth}: at most {MAX_DEPTH} hidden layers")
        )
    );
    Ok(())
}

/// [`train`] takes only a checked [`TrainConfig`] (the parameter-guard pattern of linfa): a bad
/// option is an error naming its field before any work, never a panic inside libtorch.
impl Check for TrainConfig {
    /// Validates every field; errors name the field and the accepted range.
    fn validate(&self) -> Result<()> {
        check_width(self.hidden, self.depth)?;
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            OptionError::new(
                "lr",
                format!(
                    "pseudo-margin lr = {}: the learning rate must be a positive finite number",
                    self.lr
                )
            )
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            OptionError::new(
                "weight_decay",
                format!(
                    "pseudo-margin weight_decay = {}: must be a non-negative finite number",
                    self.weight_decay
                )
            )
        );
        ensure!(
            self.batch_size >= 2,
            OptionError::new(
                "batch_size",
                format!(
                    "pseudo-margin batch_size = {}: must be at least 2 (the ranking loss needs pairs)",
                    self.batch_size
                )
            )
        );
        ensure!(
            self.max_epochs >= 1,
            OptionError::new(
                "max_epochs",
                format!(
                    "pseudo-margin max_epochs = {}: must be at least 1",
                    self.max_epochs
                )
            )
        );
        Ok(())
    }
}

/// The MLP with its standardisation.
pub struct PseudoNet {
    vs: nn::VarStore,
    seq: nn::Sequential,
    pub shape: NetShape,
    in_mean: Tensor,
    in_std: Tensor,
    out_mean: Tensor,
    out_std: Tensor,
}

impl std::fmt::Debug for PseudoNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PseudoNet")
            .field("shape", &self.shape)
            .finish()
    }
}

impl PseudoNet {
    /// A freshly initialised net, drawn from libtorch's global RNG (wrap in
    /// [`with_torch_seed`] for a reproducible start).
    pub fn new(shape: NetShape, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let d = shape.in_dim;
        let in_mean = root.zeros_no_train("in_mean", &[d]);
        let in_std = root.ones_no_train("in_std", &[d]);
        let out_mean = root.zeros_no_train("out_mean", &[1]);
        let out_std = root.ones_no_train("out_std", &[1]);
        let mut seq = nn::seq();
        let mut dim = d;
        for i in 0..shape.depth {
            seq = seq
                .add(nn::linear(
                    &root / format!("hidden{i}"),
                    dim,
                    shape.hidden,
                    Default::default(),
                ))
                .add_fn(|x| x.relu());
            dim = shape.hidden;
        }
        seq = seq.add(nn::linear(&root / "out", dim, 1, Default::default()));
        PseudoNet {
            vs,
            seq,
            shape,
            in_mean,
            in_std,
            out_mean,
            out_std,
        }
    }

    /// Rebuilds the net and reads its weights (safetensors).
    pub fn load(shape: NetShape, path: &std::path::Path, device: Device) -> Result<Self> {
        shape.check()?;
        // Random weights, overwritten at once, drawn under the RNG's lock (see `with_torch_seed`).
        let mut net = with_torch_seed(0, || PseudoNet::new(shape, device));
        net.vs
            .load(path)
            .with_context(|| format!("loading pseudo-margin weights {}", path.display()))?;
        Ok(net)
    }

    /// Writes the weights (safetensors when the path ends in `.safetensors`).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.vs
            .save(path)
            .with_context(|| format!("writing pseudo-margin weights {}", path.display()))
    }

    /// Standardised output `[N]` (what the loss sees).
    fn raw(&self, x: &Tensor) -> Tensor {
        let x = (x.to_device(self.vs.device()).to_kind(Kind::Float) - &self.in_mean) / &self.in_std;
        self.seq.forward(&x).squeeze_dim(1)
    }

    /// The pseudo-margin of each row of `x` `[N, in_dim]`: `v·|v|` with `v` the predicted
    /// `sqrt(d_in)` (regression) or the ranking score; monotone in the net's output.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<f64>> {
        ensure!(
            x.dim() == 2 && x.size()[1] == self.shape.in_dim,
            "pseudo-margin net expects inputs [N, {}], got {:?}",
            self.shape.in_dim,
            x.size()
        );
        let v = tch::no_grad(|| self.raw(x) * &self.out_std + &self.out_mean);
        to_vec_f64(&(&v * v.abs()))
    }

    fn set_stats(&mut self, in_mean: &Tensor, in_std: &Tensor, out_mean: f64, out_std: f64) {
        tch::no_grad(|| {
            self.in_mean.copy_(in_mean);
            self.in_std.copy_(in_std);
            let _ = self.out_mean.fill_(out_mean);
            let _ = self.out_std.fill_(out_std);
        });
    }
}

/// A trained net and how training went.
#[derive(Debug)]
pub struct Trained {
    pub net: PseudoNet,
    /// Epoch (1-based) whose weights were kept.
    pub best_epoch: usize,
    pub epochs_run: usize,
    /// Validation Kendall τ of the kept weights.
    pub val_tau: f64,
}

/// Trains the net on `(x_train, d_train)` and keeps the epoch with the best Kendall τ between
/// the pseudo-margin and `d_val` on `x_val` (early stopping after `patience` epochs without
/// improvement). Input margins may be `inf` (failed attacks); for regression they are capped at
/// the largest finite training margin.
pub fn train(
    x_train: &Tensor,
    d_train: &[f64],
    x_val: &Tensor,
    d_val: &[f64],
    input: PseudoInput,
    cfg: &Checked<TrainConfig>,
    seed: u64,
) -> Result<Trained> {
    let n = d_train.len();
    ensure!(
        x_train.dim() == 2 && x_train.size()[0] == n as i64,
        "training inputs {:?} do not match {n} margins",
        x_train.size()
    );
    ensure!(
        n >= 2 && !d_val.is_empty(),
        "pseudo-margin training needs at least 2 training and 1 validation samples"
    );
    let cap = d_train
        .iter()
        .copied()
        .filter(|d| d.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    ensure!(
        cap.is_finite(),
        "every attack of the training split failed: no finite input margin to learn from"
    );
    let t: Vec<f64> = d_train.iter().map(|&d| d.clamp(0.0, cap).sqrt()).collect();
    let (t_mean, t_std) = match cfg.loss {
        PseudoLoss::Regression => {
            let m = t.iter().sum::<f64>() / n as f64;
            let v = t.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
            (m, v.sqrt().max(1e-12))
        }
        PseudoLoss::Ranking => (0.0, 1.0),
    };
    let target = ((Tensor::from_slice(&t) - t_mean) / t_std).to_kind(Kind::Float);
    let x_train = x_train.to_kind(Kind::Float);
    let in_mean = x_train.mean_dim([0].as_slice(), false, Kind::Float);
    let in_std = x_train
        .std_dim([0].as_slice(), false, false)
        .clamp_min(1e-6);

    let device = Device::Cpu;
    let shape = NetShape {
        input,
        in_dim: x_train.size()[1],
        hidden: cfg.hidden,
        depth: cfg.depth,
    };
    let mut net = with_torch_seed(seed, || PseudoNet::new(shape.clone(), device));
    net.set_stats(&in_mean, &in_std, t_mean, t_std);
    let mut best = with_torch_seed(0, || PseudoNet::new(shape, device));
    best.vs.copy(&net.vs)?;
    let mut opt = nn::Adam::default()
        .wd(cfg.weight_decay)
        .build(&net.vs, cfg.lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<i64> = (0..n as i64).collect();
    let (mut best_tau, mut best_epoch, mut since_best, mut epochs_run) =
        (f64::NEG_INFINITY, 0, 0, 0);
    for epoch in 1..=cfg.max_epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch_size) {
            let idx = Tensor::from_slice(chunk);
            let xb = x_train.index_select(0, &idx);
            let tb = target.index_select(0, &idx);
            let out = net.raw(&xb);
            let loss = match cfg.loss {
                PseudoLoss::Regression => out.mse_loss(&tb, tch::Reduction::Mean),
                PseudoLoss::Ranking => pairwise_ranking_loss(&out, &tb),
            };
            opt.backward_step(&loss);
        }
        epochs_run = epoch;
        let tau = kendall_tau_b(&net.predict(x_val)?, d_val);
        if tau > best_tau + 1e-9 {
            best_tau = tau;
            best_epoch = epoch;
            since_best = 0;
            best.vs.copy(&net.vs)?;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    Ok(Trained {
        net: best,
        best_epoch,
        epochs_run,
        val_tau: best_tau,
    })
}

/// Mean of `softplus(-(s_i - s_j)·sign(t_i - t_j))` over the ordered pairs with `t_i != t_j`.
fn pairwise_ranking_loss(scores: &Tensor, target: &Tensor) -> Tensor {
    let ds = scores.unsqueeze(1) - scores.unsqueeze(0);
    let sign = (target.unsqueeze(1) - target.unsqueeze(0)).sign();
    let mask = sign.abs();
    let per_pair = (-(&ds * &sign)).softplus() * &mask;
    per_pair.sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_loss_prefers_the_right_order() {
        let t = Tensor::from_slice(&[0.0f32, 1.0, 2.0]);
        let good = pairwise_ranking_loss(&Tensor::from_slice(&[-5.0f32, 0.0, 5.0]), &t);
        let bad = pairwise_ranking_loss(&Tensor::from_slice(&[5.0f32, 0.0, -5.0]), &t);
        let (g, b) = (good.double_value(&[]), bad.double_value(&[]));
        assert!(g < 0.01 && b > 4.9, "good {g}, bad {b}");
        // Ties carry no pair: loss of a constant target is 0.
        let tie = pairwise_ranking_loss(
            &Tensor::from_slice(&[1.0f32, 2.0]),
            &Tensor::from_slice(&[1.0f32, 1.0]),
        );
        assert_eq!(tie.double_value(&[]), 0.0);
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let shape = NetShape {
            input: PseudoInput::Logits,
            in_dim: 4,
            hidden: 8,
            depth: 2,
        };
        let mut net = with_torch_seed(3, || PseudoNet::new(shape.clone(), Device::Cpu));
        net.set_stats(
            &Tensor::from_slice(&[1.0f32, 2., 3., 4.]),
            &Tensor::from_slice(&[2.0f32; 4]),
            0.5,
            3.0,
        );
        let x = with_torch_seed(4, || Tensor::randn([5, 4], (Kind::Float, Device::Cpu)));
        let before = net.predict(&x).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        net.save(&p).unwrap();
        let again = PseudoNet::load(shape, &p, Device::Cpu).unwrap();
        assert_eq!(again.predict(&x).unwrap(), before);
        let wrong = NetShape {
            input: PseudoInput::Logits,
            in_dim: 4,
            hidden: 9,
            depth: 2,
        };
        assert!(PseudoNet::load(wrong, &p, Device::Cpu).is_err());
        // A detector.json with a zero-width layer is an error, not a panic inside libtorch.
        let zero = NetShape {
            input: PseudoInput::Logits,
            in_dim: 4,
            hidden: 0,
            depth: 2,
        };
        let err = PseudoNet::load(zero, &p, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("hidden = 0"), "{err}");
    }
}
