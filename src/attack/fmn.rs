//! Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021).
//!
//! Each iteration takes a normalised gradient step on the margin loss inside an ε-ball whose
//! radius shrinks by `1 - γ` while the point is adversarial and grows by `1 + γ` otherwise;
//! before the first success ε jumps to the linearised distance to the boundary. Step size α and
//! γ are cosine-annealed. With a starting point (e.g. FAB's), ε starts at its distance.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::project::project_ball;
use super::{
    cosine, margin_loss, misclassified, norm64, per_sample, AttackStep, BatchView, Budget,
    Candidate, Ctx,
};
use crate::norm::Norm;

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

impl AttackStep for Fmn {
    fn budget(&self) -> Budget {
        Budget {
            name: self.name,
            steps: self.steps,
            patience: self.patience,
        }
    }

    /// State: `[delta, epsilon, adv_found]`.
    fn init(&self, _ctx: &mut Ctx, b: &BatchView) -> Result<Vec<Tensor>> {
        let n = b.x0.size()[0];
        let dev = b.x0.device();
        if self.warm_start {
            let found = b.best.isfinite();
            let delta = b.best_adv - b.x0;
            let eps = b.best.masked_fill(&found.logical_not(), f64::INFINITY);
            return Ok(vec![delta, eps, found.to_kind(Kind::Double)]);
        }
        Ok(vec![
            b.x0.zeros_like(),
            Tensor::full([n], f64::INFINITY, (Kind::Double, dev)),
            Tensor::zeros([n], (Kind::Double, dev)),
        ])
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, state: &mut [Tensor]) -> Result<Candidate> {
        let (delta, eps, found) = (&state[0], &state[1], state[2].gt(0.5));
        let x = b.x0 + delta;
        let (logits, grad) = ctx.grad(&x, |z| margin_loss(z, b.label))?;
        let loss = margin_loss(&logits, b.label).to_kind(Kind::Double);
        let is_adv = misclassified(&logits, b.label);
        let norm = norm64(self.norm, delta);
        let best = norm.where_self(&is_adv.logical_and(&norm.lt_tensor(b.best)), b.best);
        let found = found.logical_or(&is_adv);
        let gamma = cosine(b.step, self.steps, self.gamma_init, self.gamma_final);
        let alpha = cosine(b.step, self.steps, self.alpha_init, self.alpha_final);
        let gnorm = norm64(self.norm.dual(), &grad).clamp_min(1e-12);
        // Overshoot the linearised boundary by γ: on a (locally) linear model an ε exactly at
        // the boundary lands on it, a tie that never counts as adversarial.
        let to_boundary = (&norm + loss.abs() / gnorm) * (&gamma + 1.0);
        let worst = norm64(self.norm, &b.x0.maximum(&(1.0 - b.x0)));
        let new_eps = (eps * (gamma.neg() + 1.0))
            .minimum(&best)
            .where_self(
                &is_adv,
                &(eps * (&gamma + 1.0)).where_self(&found, &to_boundary),
            )
            .minimum(&worst);
        let g2 = norm64(Norm::L2, &grad).clamp_min(1e-12);
        let stepped = delta + per_sample(&(alpha / g2), &grad).to_kind(grad.kind()) * &grad;
        let projected = project_ball(self.norm, &stepped, &new_eps);
        let new_delta = (b.x0 + projected).clamp(0.0, 1.0) - b.x0;
        state[0] = new_delta;
        state[1] = new_eps;
        state[2] = found.to_kind(Kind::Double);
        Ok(Candidate { x, is_adv })
    }
}
