//! Which passes an `--attack` runs, and `best`: the cheap pipeline that should beat the
//! published attacks at a fraction of their cost.
//!
//! `best` = FAB over the top classes (strong on nearly piecewise-linear ReLU networks: a few
//! linearised projections land close to the boundary, and looking at every class finds the
//! boundaries FMN's max-other-class loss misses), then FMN started from FAB's point (it walks
//! along the boundary towards the clean input), then a cold FMN pass from the clean input (FMN
//! warm-started from FAB stays in FAB's basin), in L2 a DDN pass from the clean input, then
//! [`Shrink`] (signed-gradient PGD in a ball shrinking below the best point: the last 0.1%),
//! then a bisection on the segment from the clean input to the best point (forwards only).
//! Every pass only keeps a point closer than the best so far.
//!
//! Measured on resnet_2b (L∞ and L2, 100 pool images, 2 threads, idle machine,
//! `bench/attacks.py`): within 1% of the best margin any attack of the run found on more samples
//! than adv-lib's FMN-1000 + FAB-100 pair, in about a fifth of the pair's time. Tried and dropped
//! (figures in `bench/README.md`): a longer warm FMN, FMN before FAB, early stopping of the cold
//! FMN (it improves slowly but steadily), a warm-started FAB polish and other γ schedules.

use anyhow::{bail, Result};

use super::ddn::Ddn;
use super::fab::Fab;
use super::fmn::Fmn;
use super::pgd::Pgd;
use super::shrink::Shrink;
use super::{AttackKind, AttackStep, GAP_RTOL, SEARCH_GAP_RTOL};
use crate::norm::Norm;

/// Bisection steps on the final segment.
pub const REFINE_STEPS: usize = 16;
/// Steps of the cold FMN pass (`--steps` overrides it); the warm FMN pass gets a third of them.
pub fn cold_fmn_steps(norm: Norm) -> usize {
    match norm {
        Norm::L2 => 60,
        _ => 90,
    }
}
/// L2 only: DDN from the clean input after the cold FMN. It finds boundaries FMN misses: on
/// resnet_2b (100 pool images) cold FMN 60 + DDN 60 put 95% of samples within 1% of the best
/// known, against 92% for cold FMN 90 alone, for 4 ms/sample more; DDN 50 does as well.
pub const DDN_STEPS: usize = 50;
/// Steps of the final polish ([`Shrink`]). L∞ needs 40 (32 or 35 left brittle at least as tight
/// as FMN-1000 on 49-51% of 200 resnet_2b samples instead of 54%); in L2, 25 do as well as 40
/// (same margins within 0.01% at the median), which keeps `best` under half of DDN-1000's time.
pub fn shrink_steps(norm: Norm) -> usize {
    match norm {
        Norm::L2 => 25,
        _ => 40,
    }
}
/// FAB's iterations and patience: on resnet_2b most samples stop improving within 25 steps.
/// 25 instead of 30 cost nothing measurable (L∞, within 1% of the best known: 97%, 96% and 92%
/// of 100 samples of resnet_2b, cnn-a and sri_resnet_a, against 97%, 96% and 91%) for 10% less
/// time; 20 let sri_resnet_a fall to 90%, the FMN+FAB pair's level.
const FAB_STEPS: usize = 25;
const FAB_PATIENCE: usize = 8;

/// The passes of an attack, run in order on each chunk, then an optional segment bisection.
pub struct Plan {
    pub passes: Vec<Box<dyn AttackStep>>,
    pub refine: usize,
}

impl Plan {
    /// Every pass with all its parameters, the bisection and the adversarial criterion: what a
    /// margins file records, so that a run resumed or merged by a brittle whose attacks differ
    /// is refused, not mixed in.
    pub fn describe(&self) -> String {
        let passes: Vec<String> = self.passes.iter().map(|p| format!("{p:?}")).collect();
        format!(
            "{}; bisection {} (argmax search; bisection past gap {SEARCH_GAP_RTOL:e}, verified past {GAP_RTOL:e} of max |logit|, overshoots)",
            passes.join(" -> "),
            self.refine
        )
    }

    /// `steps` overrides the attack's default budget (for `best`: the cold FMN pass's).
    pub fn new(
        kind: AttackKind,
        norm: Norm,
        steps: Option<usize>,
        topk: i64,
        num_classes: i64,
    ) -> Result<Plan> {
        let steps = steps.unwrap_or(kind.default_steps());
        if steps == 0 && kind != AttackKind::Best {
            bail!("--steps must be positive");
        }
        let fab_norm = |name: &str| -> Result<()> {
            if norm == Norm::L1 {
                bail!("--attack {name} supports --norm linf and l2 (use fmn for l1)");
            }
            Ok(())
        };
        let passes: Vec<Box<dyn AttackStep>> = match kind {
            AttackKind::Fmn => vec![Box::new(Fmn::new(norm, steps))],
            AttackKind::Fab => {
                fab_norm("fab")?;
                vec![Box::new(Fab::new(norm, steps, num_classes - 1, false))]
            }
            AttackKind::FabT => {
                fab_norm("fab-t")?;
                vec![Box::new(Fab::new(norm, steps, topk, true))]
            }
            AttackKind::Ddn => {
                if norm != Norm::L2 {
                    bail!("--attack ddn is an L2 attack: use --norm l2");
                }
                vec![Box::new(Ddn::new(steps))]
            }
            AttackKind::Pgd => vec![Box::new(Pgd::new(norm, steps))],
            AttackKind::Best => {
                let cold = if steps == 0 {
                    cold_fmn_steps(norm)
                } else {
                    steps
                };
                return Ok(best(norm, cold, topk));
            }
        };
        Ok(Plan { passes, refine: 0 })
    }
}

fn best(norm: Norm, cold_steps: usize, topk: i64) -> Plan {
    let mut passes: Vec<Box<dyn AttackStep>> = Vec::new();
    if norm != Norm::L1 {
        let mut fab = Fab::new(norm, FAB_STEPS, topk, false);
        fab.patience = FAB_PATIENCE;
        passes.push(Box::new(fab));
    }
    let warm_steps = (cold_steps / 3).max(1);
    let mut warm = Fmn::new(norm, warm_steps);
    warm.warm_start = true;
    warm.patience = (warm_steps / 4).max(1);
    passes.push(Box::new(warm));
    let mut cold = Fmn::new(norm, cold_steps);
    // Its own ε stays above the best so far for a while: early stop on the best would end it at once.
    cold.patience = cold_steps;
    passes.push(Box::new(cold));
    if norm == Norm::L2 {
        passes.push(Box::new(Ddn::new(DDN_STEPS)));
    }
    if norm != Norm::L1 {
        passes.push(Box::new(Shrink::new(norm, shrink_steps(norm))));
    }
    Plan {
        passes,
        refine: REFINE_STEPS,
    }
}
