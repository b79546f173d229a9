//! A polish for the best point found so far: signed-gradient PGD (normalised gradient in L2)
//! inside a ball whose radius shrinks by a factor `1 - ρ` below each adversarial point it reaches.
//! [`Shrink::probe`] runs the same steps from a random point of a ball just below the best
//! distance instead: a restart that looks for another basin.
//! Every step moves towards the boundary's far side, adversarial or not, so that the point keeps
//! some depth when the ball shrinks under it (as FMN's steps do).
//!
//! Why: FMN-1000's long schedule settles 0.1% deeper than a short pipeline on the typical sample,
//! and a few dozen of these steps close that gap for less than the same budget of FMN steps
//! (figures in `bench/README.md`, "`best`'s defaults").

use anyhow::Result;
use tch::Tensor;

use super::ball::project_ball;
use super::random::{sample_seed, uniform_in_ball};
use super::toolkit::{ascent_direction, box_clip, cosine, norm64, per_sample};
use super::{margin_loss, misclassified, AttackStep, BatchView, Budget, Candidate, Ctx};
use crate::norm::Norm;
use crate::rows;

pub struct Shrink {
    pub norm: Norm,
    pub steps: usize,
    /// Relative shrink of the radius below each adversarial point, cosine-annealed.
    pub rho_init: f64,
    pub rho_final: f64,
    /// Step size relative to the radius, cosine-annealed.
    pub alpha_init: f64,
    pub alpha_final: f64,
    /// Start from a uniform point of the ball (the sample's seed) instead of the best point: a
    /// search for another basin just below the best distance.
    pub random_start: bool,
    /// Which restart of the probe this is: restart `k > 0` draws its start from the sample's
    /// seed mixed with `k`, so `best --effort` runs several probes from different points.
    pub restart: usize,
    pub name: &'static str,
}

impl std::fmt::Debug for Shrink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Shrink");
        d.field("norm", &self.norm)
            .field("steps", &self.steps)
            .field("rho_init", &self.rho_init)
            .field("rho_final", &self.rho_final)
            .field("alpha_init", &self.alpha_init)
            .field("alpha_final", &self.alpha_final)
            .field("random_start", &self.random_start);
        // Only for restarts, so that files of the single-probe default still resume.
        if self.restart > 0 {
            d.field("restart", &self.restart);
        }
        d.field("name", &self.name).finish()
    }
}

impl Shrink {
    /// ρ 5e-5 → 1e-5, α 0.05 → 0.003: the tightest of the schedules tried on resnet_2b
    /// (`bench/README.md`).
    pub fn new(norm: Norm, steps: usize) -> Self {
        Shrink {
            norm,
            steps,
            rho_init: 5e-5,
            rho_final: 1e-5,
            alpha_init: 0.05,
            alpha_final: 0.003,
            random_start: false,
            restart: 0,
            name: "shrink",
        }
    }

    /// The `probe`: from a uniform random point of the ball 2% below the best distance, large
    /// steps (α 0.5 → 0.01), ρ 2% → 1e-5. It finds basins that FMN and FAB, which walk from the
    /// clean input or along the boundary, miss: on the embedded PGD-trained MNIST model (L∞)
    /// `best` went from 13% to 89% of samples within 1% of the best known margin with 60 steps
    /// (ρ 1% or α 0.25: 76%; α 0.1: 22%; 30 steps: 55-64%); figures in `bench/README.md`.
    pub fn probe(norm: Norm, steps: usize) -> Self {
        Shrink {
            rho_init: 0.02,
            alpha_init: 0.5,
            alpha_final: 0.01,
            random_start: true,
            name: "probe",
            ..Shrink::new(norm, steps)
        }
    }
}

/// The polish's per-sample state.
pub struct ShrinkState {
    delta: Tensor,
    /// The ball's radius, float64.
    radius: Tensor,
}
rows!(ShrinkState { delta, radius });

impl AttackStep for Shrink {
    type State = ShrinkState;

    fn budget(&self) -> Budget {
        // Each success improves by ρ, below the driver's 0.1% patience threshold: no early stop.
        Budget {
            name: self.name,
            steps: self.steps,
            patience: self.steps,
            once_found: self.steps,
        }
    }

    /// From the best point pulled inside the ball of radius `(1 - ρ) best` (radius 0, a no-op,
    /// where nothing was found).
    fn init(&self, _ctx: &mut Ctx, b: &BatchView) -> Result<ShrinkState> {
        let found = b.best.isfinite();
        let radius = (b.best * (1.0 - self.rho_init)).masked_fill(&found.logical_not(), 0.0);
        let start = if self.random_start {
            let seeds: Vec<u64> = match self.restart {
                0 => b.seeds.to_vec(),
                k => b.seeds.iter().map(|&s| sample_seed(s, k)).collect(),
            };
            let unit = uniform_in_ball(self.norm, &seeds, &b.x0.size()[1..], b.x0.device());
            unit * per_sample(&radius, b.x0).to_kind(b.x0.kind())
        } else {
            b.best_adv - b.x0
        };
        let delta = box_clip(b.x0, &project_ball(self.norm, &start, &radius));
        Ok(ShrinkState { delta, radius })
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, state: &mut ShrinkState) -> Result<Candidate> {
        let (delta, radius) = (&state.delta, &state.radius);
        let x = b.x0 + delta;
        let (logits, grad) = ctx.grad(&x, |z| margin_loss(z, b.label))?;
        let is_adv = misclassified(&logits, b.label);
        // Adversarial: shrink the ball below this point. Either way step towards (or past) the
        // boundary, then pull the point into the ball.
        let rho = cosine(b.step, self.steps, self.rho_init, self.rho_final);
        let radius = (norm64(self.norm, delta) * (rho.neg() + 1.0)).where_self(&is_adv, radius);
        let alpha = cosine(b.step, self.steps, self.alpha_init, self.alpha_final);
        let size = per_sample(&(&alpha * &radius), &grad).to_kind(grad.kind());
        let moved = delta + ascent_direction(self.norm, &grad) * size;
        let delta = box_clip(b.x0, &project_ball(self.norm, &moved, &radius));
        *state = ShrinkState { delta, radius };
        Ok(Candidate::new(x, &logits, b.label))
    }
}
