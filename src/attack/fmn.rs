//! Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021).
//!
//! Each iteration takes a normalised gradient step on the margin loss inside an ε-ball whose
//! radius shrinks by `1 - γ` while the point is adversarial and grows by `1 + γ` otherwise;
//! before the first success ε jumps to the linearised distance to the boundary. Step size α and
//! γ are cosine-annealed. With a starting point (e.g. FAB's), ε starts at its distance.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::ball::project_ball;
use super::toolkit::{box_clip, cosine, l2_step, norm64, worst_case_radius};
use super::{margin_loss, misclassified, AttackStep, BatchView, Budget, Candidate, Ctx};
use crate::norm::Norm;
use crate::rows;

#[derive(Debug)]
pub struct Fmn {
    pub norm: Norm,
    pub steps: usize,
    pub alpha_init: f64,
    pub alpha_final: f64,
    pub gamma_init: f64,
    pub gamma_final: f64,
    /// Start from the best point already found (when any) instead of the clean input.
    pub warm_start: bool,
    pub patience: usize,
    pub name: &'static str,
}

impl Fmn {
    /// The published defaults (α 1 → 0.01, γ 0.05 → 0.001), from the clean input.
    pub fn new(norm: Norm, steps: usize) -> Self {
        Fmn {
            norm,
            steps,
            alpha_init: 1.0,
            alpha_final: 0.01,
            gamma_init: 0.05,
            gamma_final: 0.001,
            warm_start: false,
            patience: steps,
            name: "fmn",
        }
    }
}

/// FMN's per-sample state.
pub struct FmnState {
    delta: Tensor,
    /// The ball's radius ε, float64.
    eps: Tensor,
    /// Whether an adversarial point was seen yet (before that, ε jumps to the boundary).
    found: Tensor,
}
rows!(FmnState { delta, eps, found });

impl AttackStep for Fmn {
    type State = FmnState;

    fn budget(&self) -> Budget {
        Budget {
            name: self.name,
            steps: self.steps,
            patience: self.patience,
            once_found: self.steps,
        }
    }

    fn init(&self, _ctx: &mut Ctx, b: &BatchView) -> Result<FmnState> {
        let n = b.x0.size()[0];
        let dev = b.x0.device();
        if self.warm_start {
            let found = b.best.isfinite();
            return Ok(FmnState {
                delta: b.best_adv - b.x0,
                eps: b.best.masked_fill(&found.logical_not(), f64::INFINITY),
                found,
            });
        }
        Ok(FmnState {
            delta: b.x0.zeros_like(),
            eps: Tensor::full([n], f64::INFINITY, (Kind::Double, dev)),
            found: Tensor::zeros([n], (Kind::Bool, dev)),
        })
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, state: &mut FmnState) -> Result<Candidate> {
        let (delta, eps) = (&state.delta, &state.eps);
        let x = b.x0 + delta;
        let (logits, grad) = ctx.grad(&x, |z| margin_loss(z, b.label))?;
        let loss = margin_loss(&logits, b.label).to_kind(Kind::Double);
        let is_adv = misclassified(&logits, b.label);
        let norm = norm64(self.norm, delta);
        let best = norm.where_self(&is_adv.logical_and(&norm.lt_tensor(b.best)), b.best);
        let found = state.found.logical_or(&is_adv);
        let gamma = cosine(b.step, self.steps, self.gamma_init, self.gamma_final);
        let alpha = cosine(b.step, self.steps, self.alpha_init, self.alpha_final);
        let gnorm = norm64(self.norm.dual(), &grad).clamp_min(1e-12);
        // Overshoot the linearised boundary by γ: on a (locally) linear model an ε exactly at
        // the boundary lands on it, a tie that never counts as adversarial.
        let to_boundary = (&norm + loss.abs() / gnorm) * (&gamma + 1.0);
        let worst = worst_case_radius(self.norm, b.x0);
        let new_eps = (eps * (gamma.neg() + 1.0))
            .minimum(&best)
            .where_self(
                &is_adv,
                &(eps * (&gamma + 1.0)).where_self(&found, &to_boundary),
            )
            .minimum(&worst);
        let stepped = l2_step(delta, &grad, &alpha);
        let projected = project_ball(self.norm, &stepped, &new_eps);
        *state = FmnState {
            delta: box_clip(b.x0, &projected),
            eps: new_eps,
            found,
        };
        Ok(Candidate::new(x, &logits, b.label))
    }
}
