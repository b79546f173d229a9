//! `best`: the cheap pipeline that should beat the published attacks at a fraction of their cost.
//!
//! FAB over the top classes (strong on nearly piecewise-linear ReLU networks: a few linearised
//! projections land close to the boundary, and looking at every class finds the boundaries FMN's
//! max-other-class loss misses), then FMN started from FAB's point (it walks along the boundary
//! towards the clean input), then a cold FMN pass from the clean input (FMN warm-started from FAB
//! stays in FAB's basin), in L2 a DDN pass from the clean input, then [`Shrink::probe`] (the same
//! steps from a random point of the ball 2% below the best distance: other basins), then
//! [`Shrink`] (signed-gradient PGD in a ball shrinking below the best point: the last 0.1%), then
//! a bisection on the segment from the clean input to the best point (forwards only). Every pass
//! only keeps a strictly adversarial point ([`super::Candidate`]) closer than the best so far.
//!
//! Why these passes and budgets: each was measured against adv-lib's FMN-1000 and FAB-100 on the
//! shared CIFAR-10 models; the figures, and what was tried and dropped, are in `bench/README.md`
//! ("`best`'s defaults").

use super::ddn::Ddn;
use super::driver::Pass;
use super::fab::Fab;
use super::fmn::Fmn;
use super::plan::Plan;
use super::shrink::Shrink;
use crate::norm::Norm;

/// Bisection steps on the final segment.
pub const REFINE_STEPS: usize = 16;
/// Steps of the cold FMN pass (a step setting overrides it); the warm FMN pass gets a third.
/// Its longer schedule finds the closer basin more often than FAB's later steps do.
pub fn cold_fmn_steps(norm: Norm) -> usize {
    match norm {
        Norm::L2 => 120,
        _ => 150,
    }
}
/// L2 only: DDN from the clean input after the cold FMN finds boundaries FMN misses.
pub const DDN_STEPS: usize = 50;
/// Steps of the final polish ([`Shrink`]): fewer cost tightness in L∞; in L2 25 do as well as 40.
pub fn shrink_steps(norm: Norm) -> usize {
    match norm {
        Norm::L2 => 25,
        _ => 40,
    }
}
/// Steps of the random-start [`Shrink::probe`] before the polish: 60 put 89% of the MNIST
/// model's samples within 1% of the best known margin (L∞), 30 only 55-64%.
pub const PROBE_STEPS: usize = 60;
/// FAB's iterations: its first steps find the basin the warm FMN pass then walks down; later
/// ones, at 9 backwards each, buy less than FMN steps do (in L∞ 5 are as tight as 10, in L2 they
/// lose a few samples). A sample that has no adversarial point after them goes on to
/// `FAB_RESCUE_STEPS`: FAB alone finds one for some samples whose gradients FMN cannot use
/// (advertorch's LeNet5, MNIST test image 95).
fn fab_steps(norm: Norm) -> usize {
    match norm {
        Norm::L2 => 10,
        _ => 5,
    }
}
const FAB_RESCUE_STEPS: usize = 40;
const FAB_PATIENCE: usize = 8;

/// The `best` plan with `cold_steps` for its cold FMN pass, every budget times `effort`: FAB's
/// steps, both FMN passes, DDN and the polish run `effort` times longer, and `effort` probes run
/// from different random points. Effort 1 is the default; more buys tightness at a cost that
/// grows about linearly (figures in `bench/README.md`, "What more effort buys").
pub fn plan(norm: Norm, cold_steps: usize, topk: i64, effort: usize) -> Plan {
    let mut passes: Vec<Box<dyn Pass>> = Vec::new();
    if norm != Norm::L1 {
        let mut fab = Fab::new(norm, FAB_RESCUE_STEPS * effort, topk, false);
        fab.once_found = fab_steps(norm) * effort;
        fab.patience = FAB_PATIENCE;
        passes.push(Box::new(fab));
    }
    let cold_steps = cold_steps * effort;
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
        passes.push(Box::new(Ddn::new(DDN_STEPS * effort)));
    }
    if norm != Norm::L1 {
        for restart in 0..effort {
            let mut probe = Shrink::probe(norm, PROBE_STEPS);
            probe.restart = restart;
            passes.push(Box::new(probe));
        }
        passes.push(Box::new(Shrink::new(norm, shrink_steps(norm) * effort)));
    }
    Plan {
        passes,
        refine: REFINE_STEPS,
    }
}
