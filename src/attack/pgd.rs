//! PGD inside a per-sample bisection over ε: a slow, simple reference for the input margin.
//!
//! For the current ε the sample gets `inner` PGD steps on the margin loss (random start in the
//! ε-ball, step `2.5 ε / inner`, signed gradient for Linf, normalised for L2), stopping as soon
//! as the point is adversarial. ε doubles from an initial guess until a success, then halves
//! the bracket. The margin reported is the norm of the closest adversarial point found.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::project::project_ball;
use super::{
    ascent_direction, margin_loss, misclassified, norm64, per_sample, uniform_noise, AttackStep,
    BatchView, Budget, Candidate, Ctx,
};
use crate::norm::Norm;

#[derive(Debug)]
pub struct Pgd {
    pub norm: Norm,
    /// Total iterations per sample.
    pub steps: usize,
    /// PGD iterations per ε.
    pub inner: usize,
    /// First ε tried.
    pub eps_init: f64,
}

impl Pgd {
    /// `steps` split into 10 bisection rounds (at least 10 PGD steps each).
    pub fn new(norm: Norm, steps: usize) -> Self {
        let eps_init = match norm {
            Norm::Linf => 8.0 / 255.0,
            Norm::L2 => 0.5,
            Norm::L1 => 8.0,
        };
        Pgd {
            norm,
            steps,
            inner: (steps / 10).max(10),
            eps_init,
        }
    }

    fn start(&self, x0: &Tensor, eps: &Tensor, seeds: &Tensor) -> Tensor {
        // Per-sample noise from (seed, round) so batching never changes it.
        let seeds: Vec<u64> = Vec::<i64>::try_from(seeds.to_device(tch::Device::Cpu))
            .unwrap_or_default()
            .into_iter()
            .map(|s| s as u64)
            .collect();
        let noise = uniform_noise(&seeds, &x0.size()[1..], x0.device());
        let noise = project_ball(
            self.norm,
            &noise,
            &Tensor::ones([x0.size()[0]], (Kind::Double, x0.device())),
        );
        (x0 + noise * per_sample(eps, x0).to_kind(x0.kind())).clamp(0.0, 1.0) - x0
    }
}

impl AttackStep for Pgd {
    fn budget(&self) -> Budget {
        Budget {
            name: "pgd",
            steps: self.steps,
            patience: self.steps,
        }
    }

    /// State: `[delta, eps, lo, hi, inner step, round seed]`.
    fn init(&self, _ctx: &mut Ctx, b: &BatchView) -> Result<Vec<Tensor>> {
        let n = b.x0.size()[0];
        let dev = b.x0.device();
        let eps = Tensor::full([n], self.eps_init, (Kind::Double, dev));
        let seeds =
            Tensor::from_slice(&b.seeds.iter().map(|&s| (s >> 1) as i64).collect::<Vec<_>>())
                .to_device(dev);
        Ok(vec![
            self.start(b.x0, &eps, &seeds),
            eps,
            Tensor::zeros([n], (Kind::Double, dev)),
            Tensor::full([n], f64::INFINITY, (Kind::Double, dev)),
            Tensor::zeros([n], (Kind::Double, dev)),
            seeds,
        ])
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, state: &mut [Tensor]) -> Result<Candidate> {
        let (delta, eps, lo, hi, k, seeds) = (
            &state[0], &state[1], &state[2], &state[3], &state[4], &state[5],
        );
        let x = b.x0 + delta;
        let (logits, grad) = ctx.grad(&x, |z| margin_loss(z, b.label))?;
        let is_adv = misclassified(&logits, b.label);
        let alpha = per_sample(&(eps * (2.5 / self.inner as f64)), &grad).to_kind(grad.kind());
        let stepped = project_ball(
            self.norm,
            &(delta + alpha * ascent_direction(self.norm, &grad)),
            eps,
        );
        let stepped = (b.x0 + stepped).clamp(0.0, 1.0) - b.x0;
        // End of a round: success (bracket from above) or budget spent (from below).
        let k1 = k + 1.0;
        let out_of_steps = k1.ge(self.inner as f64);
        let round_over = is_adv.logical_or(&out_of_steps);
        let found = norm64(self.norm, delta);
        let new_hi = found.minimum(hi).where_self(&is_adv, hi);
        let new_lo = lo.where_self(&is_adv, &eps.where_self(&out_of_steps, lo));
        let max_eps = norm64(self.norm, &b.x0.maximum(&(1.0 - b.x0)));
        let next_eps = ((&new_lo + &new_hi) * 0.5)
            .where_self(&new_hi.isfinite(), &(eps * 2.0).minimum(&max_eps));
        let new_eps = next_eps.where_self(&round_over, eps);
        let new_seeds = (seeds + 1).where_self(&round_over, seeds);
        let delta = if round_over.any().int64_value(&[]) != 0 {
            let restart = self.start(b.x0, &new_eps, &new_seeds);
            restart.where_self(&per_sample(&round_over, b.x0), &stepped)
        } else {
            stepped
        };
        let lo = new_lo.where_self(&round_over, lo);
        let k = Tensor::zeros_like(&k1).where_self(&round_over, &k1);
        for (slot, v) in state
            .iter_mut()
            .zip([delta, new_eps, lo, new_hi, k, new_seeds])
        {
            *slot = v;
        }
        Ok(Candidate { x, is_adv })
    }
}
