//! Decoupled Direction and Norm attack (Rony et al., CVPR 2019), L2.
//!
//! A gradient step on the cross-entropy (normalised, cosine-annealed size) sets the direction;
//! the norm is set separately: it shrinks by `1 - γ` while the point is adversarial and grows
//! by `1 + γ` otherwise.

use anyhow::Result;
use tch::{Kind, Reduction, Tensor};

use super::toolkit::{box_clip, cosine, l2_step, norm64, per_sample, worst_case_radius};
use super::{misclassified, AttackStep, BatchView, Budget, Candidate, Ctx};
use crate::norm::Norm;
use crate::rows;

#[derive(Debug)]
pub struct Ddn {
    pub steps: usize,
    pub gamma: f64,
    pub init_norm: f64,
    pub alpha_init: f64,
    pub alpha_final: f64,
}

impl Ddn {
    /// The published defaults: γ 0.05, initial norm 1, step 1 → 0.01.
    pub fn new(steps: usize) -> Self {
        Ddn {
            steps,
            gamma: 0.05,
            init_norm: 1.0,
            alpha_init: 1.0,
            alpha_final: 0.01,
        }
    }
}

/// DDN's per-sample state.
pub struct DdnState {
    delta: Tensor,
    /// The norm the direction is scaled to, float64.
    eps: Tensor,
}
rows!(DdnState { delta, eps });

impl AttackStep for Ddn {
    type State = DdnState;

    fn budget(&self) -> Budget {
        Budget {
            name: "ddn",
            steps: self.steps,
            patience: self.steps,
            once_found: self.steps,
        }
    }

    fn init(&self, _ctx: &mut Ctx, b: &BatchView) -> Result<DdnState> {
        let n = b.x0.size()[0];
        Ok(DdnState {
            delta: b.x0.zeros_like(),
            eps: Tensor::full([n], self.init_norm, (Kind::Double, b.x0.device())),
        })
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, state: &mut DdnState) -> Result<Candidate> {
        let (delta, eps) = (&state.delta, &state.eps);
        let x = b.x0 + delta;
        let (logits, grad) = ctx.grad(&x, |z| {
            z.cross_entropy_loss::<Tensor>(b.label, None, Reduction::None, -100, 0.0)
        })?;
        let is_adv = misclassified(&logits, b.label);
        let dnorm = norm64(Norm::L2, delta);
        let best = dnorm.where_self(&is_adv.logical_and(&dnorm.lt_tensor(b.best)), b.best);
        let alpha = cosine(b.step, self.steps, self.alpha_init, self.alpha_final);
        let stepped = l2_step(delta, &grad, &alpha);
        let new_eps = (eps * (1.0 - self.gamma))
            .minimum(&best)
            .where_self(&is_adv, &(eps * (1.0 + self.gamma)));
        let new_eps = new_eps.minimum(&worst_case_radius(Norm::L2, b.x0));
        let scale = &new_eps / norm64(Norm::L2, &stepped).clamp_min(1e-12);
        let scaled = &stepped * per_sample(&scale, &stepped).to_kind(stepped.kind());
        *state = DdnState {
            delta: box_clip(b.x0, &scaled),
            eps: new_eps,
        };
        Ok(Candidate::new(x, &logits, b.label))
    }
}
