//! PGD inside a per-sample bisection over ε: a slow, simple reference for the input margin.
//!
//! For the current ε the sample gets `inner` PGD steps on the margin loss (uniform random start in
//! the ε-ball, step `2.5 ε / inner`, signed gradient for Linf, normalised for L2), stopping as soon
//! as the point is adversarial. ε doubles from an initial guess until a success, then halves
//! the bracket. The margin reported is the norm of the closest adversarial point found.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::ball::project_ball;
use super::random::uniform_in_ball;
use super::toolkit::{ascent_direction, box_clip, norm64, per_sample, worst_case_radius};
use super::{margin_loss, misclassified, AttackStep, BatchView, Budget, Candidate, Ctx};
use crate::norm::Norm;
use crate::rows;

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

    /// A uniform random point of each sample's ε-ball, clipped to the box; the noise comes from
    /// (seed, round) so batching never changes it.
    fn start(&self, x0: &Tensor, eps: &Tensor, seeds: &Tensor) -> Result<Tensor> {
        let seeds: Vec<u64> = Vec::<i64>::try_from(seeds.to_device(tch::Device::Cpu))?
            .into_iter()
            .map(|s| s as u64)
            .collect();
        let unit = uniform_in_ball(self.norm, &seeds, &x0.size()[1..], x0.device());
        Ok(box_clip(
            x0,
            &(unit * per_sample(eps, x0).to_kind(x0.kind())),
        ))
    }
}

/// PGD's per-sample state: the perturbation, the bisection over ε and the round's seed.
pub struct PgdState {
    delta: Tensor,
    /// ε of the current round, float64.
    eps: Tensor,
    /// Largest ε known to fail, float64.
    lo: Tensor,
    /// Smallest adversarial distance found (`inf`: none yet), float64.
    hi: Tensor,
    /// PGD steps taken in the current round, float64.
    k: Tensor,
    /// Seed of the current round's random start, int64.
    seeds: Tensor,
}
rows!(PgdState {
    delta,
    eps,
    lo,
    hi,
    k,
    seeds
});

impl AttackStep for Pgd {
    type State = PgdState;

    fn budget(&self) -> Budget {
        Budget {
            name: "pgd",
            steps: self.steps,
            patience: self.steps,
            once_found: self.steps,
        }
    }

    fn init(&self, _ctx: &mut Ctx, b: &BatchView) -> Result<PgdState> {
        let n = b.x0.size()[0];
        let dev = b.x0.device();
        let eps = Tensor::full([n], self.eps_init, (Kind::Double, dev));
        let seeds =
            Tensor::from_slice(&b.seeds.iter().map(|&s| (s >> 1) as i64).collect::<Vec<_>>())
                .to_device(dev);
        Ok(PgdState {
            delta: self.start(b.x0, &eps, &seeds)?,
            eps,
            lo: Tensor::zeros([n], (Kind::Double, dev)),
            hi: Tensor::full([n], f64::INFINITY, (Kind::Double, dev)),
            k: Tensor::zeros([n], (Kind::Double, dev)),
            seeds,
        })
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, state: &mut PgdState) -> Result<Candidate> {
        let PgdState {
            delta,
            eps,
            lo,
            hi,
            k,
            seeds,
        } = &*state;
        let x = b.x0 + delta;
        let (logits, grad) = ctx.grad(&x, |z| margin_loss(z, b.label))?;
        let is_adv = misclassified(&logits, b.label);
        let alpha = per_sample(&(eps * (2.5 / self.inner as f64)), &grad).to_kind(grad.kind());
        let stepped = project_ball(
            self.norm,
            &(delta + alpha * ascent_direction(self.norm, &grad)),
            eps,
        );
        let stepped = box_clip(b.x0, &stepped);
        // End of a round: success (bracket from above) or budget spent (from below).
        let k1 = k + 1.0;
        let out_of_steps = k1.ge(self.inner as f64);
        let round_over = is_adv.logical_or(&out_of_steps);
        let found = norm64(self.norm, delta);
        let new_hi = found.minimum(hi).where_self(&is_adv, hi);
        let new_lo = lo.where_self(&is_adv, &eps.where_self(&out_of_steps, lo));
        let max_eps = worst_case_radius(self.norm, b.x0);
        let next_eps = ((&new_lo + &new_hi) * 0.5)
            .where_self(&new_hi.isfinite(), &(eps * 2.0).minimum(&max_eps));
        let new_eps = next_eps.where_self(&round_over, eps);
        let new_seeds = (seeds + 1).where_self(&round_over, seeds);
        let delta = if round_over.any().int64_value(&[]) != 0 {
            let restart = self.start(b.x0, &new_eps, &new_seeds)?;
            restart.where_self(&per_sample(&round_over, b.x0), &stepped)
        } else {
            stepped
        };
        *state = PgdState {
            delta,
            eps: new_eps,
            lo: new_lo.where_self(&round_over, lo),
            hi: new_hi,
            k: Tensor::zeros_like(&k1).where_self(&round_over, &k1),
            seeds: new_seeds,
        };
        Ok(Candidate::new(x, &logits, b.label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start is a point of the box `[0, 1]` within ε of the clean input, also next to the
    /// box's faces; a round's seed alone decides it.
    #[test]
    fn starts_lie_in_the_box_and_the_ball() {
        let n = 64;
        let x0 = Tensor::from_slice(&[0.0f32, 1.0, 0.5, 0.02, 0.97, 0.3])
            .repeat([n * 8])
            .view([n, 3, 4, 4]);
        let seeds = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)) * 7;
        for (norm, e) in [(Norm::Linf, 8.0 / 255.0), (Norm::L2, 0.5), (Norm::L1, 4.0)] {
            let eps = Tensor::full([n], e, (Kind::Double, tch::Device::Cpu));
            let pgd = Pgd::new(norm, 100);
            let delta = pgd.start(&x0, &eps, &seeds).unwrap();
            let x = &x0 + &delta;
            assert!(
                bool::try_from(x.ge(0.0).all()).unwrap()
                    && bool::try_from(x.le(1.0).all()).unwrap()
            );
            let r = Vec::<f64>::try_from(norm64(norm, &delta)).unwrap();
            assert!(r.iter().all(|&r| r <= e * (1.0 + 1e-6)), "{norm}: {r:?}");
            assert!(
                r.iter().all(|&r| r > 0.0),
                "{norm}: a start at the clean input"
            );
            let again = pgd.start(
                &x0.narrow(0, 5, 2),
                &eps.narrow(0, 5, 2),
                &seeds.narrow(0, 5, 2),
            );
            assert!(again.unwrap().equal(&delta.narrow(0, 5, 2)));
        }
    }
}
