//! The training objectives of `brittle train --mode`, after the paper's reference code
//! (`train/pkg/losses.py` of ngnawejonas/margin-consistency) and the papers it cites.
//!
//! Each loss is two halves: an [`adversary`] (the inner maximisation: brittle's PGD with the
//! loss's own objective, or FMN for MMA) and an [`objective`] on the points it found (the outer
//! minimisation). [`loss`] runs both; the fixture tests (`tests/it/train_losses.rs`) call
//! [`objective`] on fixed points, so that a comparison with PyTorch isolates the loss from the
//! attack's randomness and CPU kernels.

pub mod gairat;
pub mod htrades;
pub mod madry;
pub mod mart;
pub mod mma;
pub mod pairing;
pub mod probabilistic_margin;
pub mod trades;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::pgd::{cross_entropy, kl_from, pgd_with_progress, PgdConfig};
use super::{Mode, TrainConfig};
use crate::model::native::NativeClassifier;
use crate::model::Classifier;
use crate::util::Progress;

/// One training batch: inputs `[N, C, H, W]`, labels `[N]` and the per-row seeds of the
/// attack's random start.
pub struct Batch<'a> {
    pub x: &'a Tensor,
    pub y: &'a Tensor,
    pub seeds: &'a [u64],
}

/// What a loss needs to know of the run at the current optimizer step.
pub struct Setting<'a> {
    pub config: &'a TrainConfig,
    /// This step's attack (ε and step size already warmed up).
    pub attack: PgdConfig,
    /// Epochs finished before this one (GAIRAT starts reweighting after a while).
    pub epoch: usize,
}

/// What an [`adversary`] found for a batch.
pub struct Points {
    /// The adversarial inputs `[N, C, H, W]` (the clean inputs in standard mode).
    pub adv: Tensor,
    /// GAIRAT: how many PGD iterates of each row were still classified correctly, `[N]` float.
    pub kappa: Option<Tensor>,
    /// MMA: each row's shortest adversarial perturbation found, `[N]` float64 (`inf`: none).
    pub distance: Option<Tensor>,
}

impl Points {
    fn at(adv: Tensor) -> Self {
        Points {
            adv,
            kappa: None,
            distance: None,
        }
    }
}

/// A batch's loss (with its autograd graph) and the logits the epoch's accuracies count.
pub struct Step {
    pub loss: Tensor,
    pub clean_logits: Tensor,
    pub adv_logits: Tensor,
}

/// The loss of `s.config.mode` on a batch: the adversary, then the objective on its points.
pub fn loss(
    s: &Setting,
    model: &NativeClassifier,
    b: &Batch,
    progress: &dyn Progress,
) -> Result<Step> {
    let points = adversary(s, model, b, progress)?;
    objective(s, model, b, &points)
}

/// The inner maximisation: PGD on cross-entropy (Madry and the losses built on its points), on
/// KL from the clean prediction (TRADES), on the entropy gap (HTRADES); FMN's shortest
/// perturbation for MMA.
pub fn adversary(
    s: &Setting,
    model: &NativeClassifier,
    b: &Batch,
    progress: &dyn Progress,
) -> Result<Points> {
    Ok(match s.config.mode {
        Mode::Standard => Points::at(b.x.shallow_clone()),
        Mode::Pgd | Mode::PmMadry | Mode::Mart | Mode::Alp | Mode::Clp | Mode::MmaFixed => {
            Points::at(pgd(s, model, b, cross_entropy(b.y), progress)?)
        }
        Mode::Trades | Mode::PmTrades => {
            let log_p = tch::no_grad(|| model.logits(b.x))?.log_softmax(-1, Kind::Float);
            Points::at(pgd(s, model, b, kl_from(&log_p), progress)?)
        }
        Mode::Htrades => {
            let clean = tch::no_grad(|| model.logits(b.x))?;
            Points::at(pgd(s, model, b, htrades::entropy_gap(&clean), progress)?)
        }
        Mode::Gairat => gairat::adversary(model, b, &s.attack, progress)?,
        Mode::Mma => mma::adversary(model, b, &s.attack, progress)?,
    })
}

/// PGD of this step's attack on `objective`, from each row's seeded random start.
fn pgd(
    s: &Setting,
    model: &NativeClassifier,
    b: &Batch,
    objective: impl Fn(&Tensor) -> Tensor,
    progress: &dyn Progress,
) -> Result<Tensor> {
    pgd_with_progress(model, b.x, b.seeds, &s.attack, objective, progress)
}

/// The outer minimisation on `points`: a scalar with its graph to the model's parameters
/// (training-mode forward passes).
pub fn objective(
    s: &Setting,
    model: &NativeClassifier,
    b: &Batch,
    points: &Points,
) -> Result<Step> {
    let (mode, y, beta) = (s.config.mode, b.y, s.config.beta);
    let adv = model.logits_t(&points.adv, true)?;
    let clean = match mode {
        // The points are the clean inputs: one forward pass.
        Mode::Standard => adv.shallow_clone(),
        // Only the adversarial logits enter the loss; the clean ones are for the statistics.
        Mode::Pgd | Mode::PmMadry | Mode::Gairat => tch::no_grad(|| model.logits(b.x))?,
        _ => model.logits_t(b.x, true)?,
    };
    let loss = match mode {
        Mode::Standard | Mode::Pgd => madry::loss(&adv, y),
        Mode::PmMadry => madry::pm_loss(&adv, y),
        Mode::Trades => trades::loss(&clean, &adv, y, beta),
        Mode::PmTrades => trades::pm_loss(&clean, &adv, y, beta),
        Mode::Htrades => htrades::loss(&clean, &adv, y, beta),
        Mode::Alp => pairing::alp(&clean, &adv, y, beta),
        Mode::Clp => pairing::clp(&clean, &adv, y, beta),
        Mode::Mart => mart::loss(&clean, &adv, y, beta),
        Mode::MmaFixed => mma::fixed_loss(&clean, &adv, y),
        Mode::Mma => mma::loss(
            &clean,
            &adv,
            y,
            required(&points.distance, "distance")?,
            s.attack.eps,
        ),
        Mode::Gairat => {
            let kappa = required(&points.kappa, "kappa")?;
            gairat::loss(&adv, y, kappa, s.attack.steps, s.epoch, s.config.epochs)
        }
    };
    Ok(Step {
        loss,
        clean_logits: clean,
        adv_logits: adv,
    })
}

/// A field of [`Points`] the objective needs (absent only when points of another mode are
/// passed: a caller's mistake, reported rather than a panic).
fn required<'a>(t: &'a Option<Tensor>, what: &str) -> Result<&'a Tensor> {
    t.as_ref()
        .with_context(|| format!("the adversary's points lack the {what} this loss needs"))
}

/// Per-row cross-entropy `[N]`.
fn ce_rows(logits: &Tensor, y: &Tensor) -> Tensor {
    cross_entropy(y)(logits)
}

/// Mean of per-row losses weighted by `w` (weights normalised to mean 1 by the caller).
fn weighted_mean(rows: &Tensor, w: &Tensor) -> Tensor {
    (rows * w).mean(Kind::Float)
}

/// `v` summed and divided by the batch size (the reference's `(1 / batch_size) * sum`).
fn per_batch(v: &Tensor, n: i64) -> Tensor {
    v.sum(Kind::Float) / n as f64
}
