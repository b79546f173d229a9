//! Projected gradient descent (Madry et al. 2018) in an Linf or L2 ball intersected with the
//! pixel box `[0, 1]`: the attack adversarial training trains against and `brittle eval-pgd`
//! measures robust accuracy with.

use anyhow::{bail, ensure, Result};
use tch::{Kind, Reduction, Tensor};

use crate::attack::ball::project_ball;
use crate::attack::{ascent_direction, uniform_in_ball};
use crate::model::{logits_and_grad, Classifier};
use crate::norm::Norm;
use crate::util::{Check, NoProgress, OptionError, Progress};

/// One PGD attack.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PgdConfig {
    pub norm: Norm,
    pub eps: f64,
    pub steps: usize,
    pub step_size: f64,
    /// Start from a uniform random point of the ball.
    pub random_start: bool,
}

/// PGD's settings, checked like every options struct (see [`Check`]); [`pgd_with_progress`]
/// runs the check itself, once per call, so that the attack loop cannot fail on them.
impl Check for PgdConfig {
    fn validate(&self) -> Result<()> {
        if !matches!(self.norm, Norm::Linf | Norm::L2) {
            bail!(OptionError::new(
                "norm",
                format!("PGD supports the norms linf and l2, not {}", self.norm)
            ));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail!(OptionError::new(
                "eps",
                format!("ε must be a finite non-negative number, got {}", self.eps)
            ));
        }
        if !(self.step_size.is_finite() && self.step_size >= 0.0) {
            bail!(OptionError::new(
                "step_size",
                format!(
                    "the step size must be finite and non-negative, got {}",
                    self.step_size
                )
            ));
        }
        Ok(())
    }
}

impl PgdConfig {
    /// The same attack with ε and step size scaled by `factor` (ε warm-up).
    pub fn scaled(&self, factor: f64) -> PgdConfig {
        PgdConfig {
            eps: self.eps * factor,
            step_size: self.step_size * factor,
            ..*self
        }
    }
}

/// Per-sample cross-entropy `[N]`: the objective of Madry PGD.
pub fn cross_entropy(labels: &Tensor) -> impl Fn(&Tensor) -> Tensor + '_ {
    move |logits: &Tensor| {
        logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::None, -100, 0.0)
    }
}

/// Per-sample `KL(p || softmax(logits))` `[N]` for fixed log-probabilities `log_p`: the TRADES
/// objective.
pub fn kl_from(log_p: &Tensor) -> impl Fn(&Tensor) -> Tensor + '_ {
    move |logits: &Tensor| {
        logits
            .log_softmax(-1, Kind::Float)
            .kl_div(log_p, Reduction::None, true)
            .sum_dim_intlist([1].as_slice(), false, Kind::Float)
    }
}

/// A uniform random point of the ε-ball around `x` (the attacks' random start), clamped to
/// `[0, 1]`; row `i` draws from `seeds[i]`.
fn random_start(x: &Tensor, seeds: &[u64], cfg: &PgdConfig) -> Tensor {
    let delta = uniform_in_ball(cfg.norm, seeds, &x.size()[1..], x.device()) * cfg.eps;
    (x + delta).clamp(0.0, 1.0)
}

/// Maximises `objective(logits)` (per sample, `[N]`) over the ball around `x`; returns the
/// adversarial batch, detached. Linf steps follow the gradient's sign, L2 steps its direction.
/// Row `i`'s random start draws from `seeds[i]` (see [`crate::attack::sample_seed`]).
pub fn pgd(
    model: &dyn Classifier,
    x: &Tensor,
    seeds: &[u64],
    cfg: &PgdConfig,
    objective: impl Fn(&Tensor) -> Tensor,
) -> Result<Tensor> {
    pgd_with_progress(model, x, seeds, cfg, objective, &NoProgress)
}

/// [`pgd`] reporting one unit per row and step to `progress`.
pub fn pgd_with_progress(
    model: &dyn Classifier,
    x: &Tensor,
    seeds: &[u64],
    cfg: &PgdConfig,
    objective: impl Fn(&Tensor) -> Tensor,
    progress: &dyn Progress,
) -> Result<Tensor> {
    pgd_observed(model, x, seeds, cfg, objective, progress, |_| {})
}

/// [`pgd_with_progress`] showing `observe` the logits of every iterate before its step (the
/// start included, the final point not): GAIRAT counts the steps a sample stays correct.
pub fn pgd_observed(
    model: &dyn Classifier,
    x: &Tensor,
    seeds: &[u64],
    cfg: &PgdConfig,
    objective: impl Fn(&Tensor) -> Tensor,
    progress: &dyn Progress,
    mut observe: impl FnMut(&Tensor),
) -> Result<Tensor> {
    cfg.validate()?;
    let x = x.detach();
    let mut adv = if cfg.random_start && cfg.eps > 0.0 {
        ensure!(
            seeds.len() as i64 == x.size()[0],
            "PGD's random start needs one seed a row: {} seeds for {} rows",
            seeds.len(),
            x.size()[0]
        );
        random_start(&x, seeds, cfg)
    } else {
        x.shallow_clone()
    };
    // Each step is projected onto the ε-ball around `x` (the attacks' [`project_ball`]) and
    // the box `[0, 1]`.
    let eps = Tensor::full([x.size()[0]], cfg.eps, (Kind::Float, x.device()));
    for _ in 0..cfg.steps {
        let (logits, grad) = logits_and_grad(model, &adv, &objective)?;
        observe(&logits);
        let step = ascent_direction(cfg.norm, &grad) * cfg.step_size;
        adv = tch::no_grad(|| {
            (&x + project_ball(cfg.norm, &(adv + step - &x), &eps)).clamp(0.0, 1.0)
        });
        progress.inc(x.size()[0] as u64);
    }
    Ok(adv.detach())
}
