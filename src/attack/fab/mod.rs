//! FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), Linf and L2.
//!
//! Each iteration linearises the decision boundaries between the attacked class and the
//! classes of interest at the current point, picks the closest linearised boundary, projects
//! both the current point and the clean input onto it (inside the `[0, 1]` box), and moves to a
//! convex combination of the two (biased towards the clean input by at most `alpha_max`),
//! overshooting by `eta`. When the current point is adversarial it is first pulled back towards
//! the clean input by `beta`. The gradient pass that linearises at a point also tells whether
//! that point is adversarial, so an iteration costs one forward and one backward per class of
//! interest (the Jacobian rows share the forward).
//!
//! Classes of interest are fixed per sample from the clean logits: all other classes
//! (AutoAttack's untargeted FAB), the top-k other classes (cheaper), or, for the targeted
//! variant, one independent run per top-k class.

pub mod projection;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::rows::{Pick, Rows};
use super::toolkit::{norm64, per_sample};
use super::{misclassified, AttackStep, BatchView, Budget, Candidate, Ctx};
use crate::norm::Norm;
use projection::hyperplane_in_box;

pub struct Fab {
    pub norm: Norm,
    pub steps: usize,
    /// Other classes considered (`K - 1`: all).
    pub topk: i64,
    /// One independent run per class of interest instead of one run over all of them.
    pub targeted: bool,
    pub alpha_max: f64,
    pub eta: f64,
    pub beta: f64,
    pub patience: usize,
    /// Steps for a sample once it has an adversarial point ([`Budget::once_found`]).
    pub once_found: usize,
    pub name: &'static str,
}

impl Fab {
    /// AutoAttack's settings (α_max 0.1, η 1.05, β 0.9), from the clean input.
    pub fn new(norm: Norm, steps: usize, topk: i64, targeted: bool) -> Self {
        Fab {
            norm,
            steps,
            topk,
            targeted,
            alpha_max: 0.1,
            eta: 1.05,
            beta: 0.9,
            patience: steps,
            once_found: steps,
            name: if targeted { "fab-t" } else { "fab" },
        }
    }

    /// `(runs per sample, classes per run)`.
    fn layout(&self, k: i64) -> (i64, i64) {
        let t = self.topk.clamp(1, k - 1);
        if self.targeted {
            (t, 1)
        } else {
            (1, t)
        }
    }
}

/// The parameters, as margins files record them ([`super::plan::Plan::describe`]). FAB always
/// starts from the clean input; `random_start: 0.0` stays in the text so that files written
/// when that was a (never used) option still resume and merge.
impl std::fmt::Debug for Fab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Fab");
        d.field("norm", &self.norm)
            .field("steps", &self.steps)
            .field("topk", &self.topk)
            .field("targeted", &self.targeted)
            .field("alpha_max", &self.alpha_max)
            .field("eta", &self.eta)
            .field("beta", &self.beta)
            .field("random_start", &0.0)
            .field("patience", &self.patience);
        // Only where it limits anything, so that files of a plain FAB run still resume.
        if self.once_found < self.steps {
            d.field("once_found", &self.once_found);
        }
        d.field("name", &self.name).finish()
    }
}

/// FAB's per-sample state: `runs` rows per sample (one per targeted class, adjacent).
pub struct FabState {
    /// The current point of every run, `[B·R, C, H, W]`.
    x: Tensor,
    /// The classes of interest of every run, `[B·R, classes per run]` int64.
    classes: Tensor,
    runs: i64,
}

impl FabState {
    /// The rows of the runs of the samples in `pick`.
    fn run_rows(&self, pick: &Pick) -> Pick {
        let r = self.runs as usize;
        Pick::new(
            pick.rows.iter().flat_map(|&i| i * r..(i + 1) * r).collect(),
            self.x.device(),
        )
    }
}

impl Rows for FabState {
    fn select_rows(&self, pick: &Pick) -> Self {
        let rows = self.run_rows(pick);
        FabState {
            x: self.x.select_rows(&rows),
            classes: self.classes.select_rows(&rows),
            runs: self.runs,
        }
    }

    fn append_rows(self, other: Self) -> Self {
        FabState {
            x: self.x.append_rows(other.x),
            classes: self.classes.append_rows(other.classes),
            runs: self.runs,
        }
    }
}

/// Repeats every row `r` times, keeping a sample's copies adjacent.
fn repeat_rows(t: &Tensor, r: i64) -> Tensor {
    if r == 1 {
        t.shallow_clone()
    } else {
        t.repeat_interleave_self_int(r, Some(0), None)
    }
}

impl AttackStep for Fab {
    type State = FabState;

    fn budget(&self) -> Budget {
        Budget {
            name: self.name,
            steps: self.steps,
            patience: self.patience,
            once_found: self.once_found,
        }
    }

    fn init(&self, ctx: &mut Ctx, b: &BatchView) -> Result<FabState> {
        let logits = ctx.forward(b.x0)?;
        let k = logits.size()[1];
        let (runs, per_run) = self.layout(k);
        let others = logits.scatter_value(1, &b.label.unsqueeze(1), f64::NEG_INFINITY);
        let (_, top) = others.topk(runs * per_run, 1, true, true);
        let classes = top.view([-1, per_run]);
        Ok(FabState {
            x: repeat_rows(b.x0, runs),
            classes,
            runs,
        })
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, state: &mut FabState) -> Result<Candidate> {
        let (x, classes, runs) = (&state.x, &state.classes, state.runs);
        let n = b.x0.size()[0];
        let rows = x.size()[0];
        let per_run = classes.size()[1];
        let label = repeat_rows(b.label, runs);
        let x0 = repeat_rows(b.x0, runs);
        // Gradient of z_c - z_y for every (run, class) pair: one forward, one backward per class.
        let lab = label.unsqueeze(1);
        let (logits, grads) = ctx.grads(x, |z| {
            let zy = z.gather(1, &lab, false);
            (0..per_run)
                .map(|j| z.gather(1, &classes.narrow(1, j, 1), false) - &zy)
                .collect()
        })?;
        let f = logits.gather(1, classes, false) - logits.gather(1, &lab, false);
        let grad = Tensor::stack(&grads, 1).flatten(0, 1);
        let is_adv = misclassified(&logits, &label);
        // Closest linearised boundary per run.
        let gnorm = norm64(self.norm.dual(), &grad)
            .view([rows, per_run])
            .clamp_min(1e-12);
        let dist = f.to_kind(Kind::Double).abs() / gnorm;
        let pick = dist.argmin(1, true);
        let fsel = f.gather(1, &pick, false).squeeze_dim(1);
        let gsel = grad
            .view([rows, per_run, -1])
            .gather(
                1,
                &pick
                    .unsqueeze(2)
                    .expand([rows, 1, grad.size()[1..].iter().product()], false),
                false,
            )
            .squeeze_dim(1)
            .view_as(x);
        // Pull adversarial points back towards the clean input.
        let pulled = (&x0 + (x - &x0) * self.beta).where_self(&per_sample(&is_adv, x), x);
        // Hyperplane f + <g, z - x> = 0, projected from the pulled point and from x0.
        let dot = |p: &Tensor| {
            (&gsel * (p - x))
                .flatten(1, -1)
                .sum_dim_intlist([1].as_slice(), false, Kind::Float)
        };
        let c_cur = -(&fsel + dot(&pulled));
        let c_orig = -(&fsel + dot(&x0));
        let d = hyperplane_in_box(
            self.norm,
            &Tensor::cat(&[&pulled, &x0], 0),
            &Tensor::cat(&[&gsel, &gsel], 0),
            &Tensor::cat(&[c_cur, c_orig], 0),
        )?;
        let (d1, d2) = (d.narrow(0, 0, rows), d.narrow(0, rows, rows));
        let a1 = norm64(self.norm, &d1);
        let a2 = norm64(self.norm, &d2);
        let alpha = (&a1 / (&a1 + &a2).clamp_min(1e-12)).clamp(0.0, self.alpha_max);
        let alpha = per_sample(&alpha, x).to_kind(x.kind());
        let next = ((&pulled + d1 * self.eta) * (alpha.neg() + 1.0)
            + (&x0 + d2 * self.eta) * &alpha)
            .clamp(0.0, 1.0);
        // Report, per sample, the closest adversarial run.
        let cand_dist = norm64(self.norm, &(x - &x0))
            .masked_fill(&is_adv.logical_not(), f64::INFINITY)
            .view([n, runs]);
        let (_, which) = cand_dist.min_dim(1, false);
        let chosen = Tensor::arange(n, (Kind::Int64, ctx.device())) * runs + which;
        let cand = Candidate::new(
            x.index_select(0, &chosen),
            &logits.index_select(0, &chosen),
            b.label,
        );
        state.x = next;
        Ok(cand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Targeted FAB keeps one run per class, adjacent per sample: keeping samples keeps all their
    /// runs (the driver once kept state rows by sample index, which mixed up samples' runs).
    #[test]
    fn state_rows_follow_their_samples() {
        let x = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([6, 1]);
        let classes = Tensor::arange(6, (Kind::Int64, tch::Device::Cpu)).view([6, 1]) + 10;
        let state = FabState {
            x,
            classes,
            runs: 3,
        };
        let kept = state.select_rows(&Pick::new(vec![1], tch::Device::Cpu));
        assert_eq!(
            Vec::<f32>::try_from(kept.x.flatten(0, -1)).unwrap(),
            vec![3.0, 4.0, 5.0]
        );
        assert_eq!(
            Vec::<i64>::try_from(kept.classes.flatten(0, -1)).unwrap(),
            vec![13, 14, 15]
        );
    }
}
