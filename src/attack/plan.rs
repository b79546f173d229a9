//! Which passes an attack setting runs: a [`Plan`] is the list of attacks run in order on each
//! chunk, then an optional bisection on the segment to the best point.

use anyhow::{bail, Result};

use super::ddn::Ddn;
use super::driver::Pass;
use super::fab::Fab;
use super::fmn::Fmn;
use super::pgd::Pgd;
use super::{best, AttackKind, GAP_RTOL, SEARCH_GAP_RTOL};
use crate::norm::Norm;
use crate::util::OptionError;

/// The largest `effort` of `best`: far beyond what buys tightness (`bench/README.md`), and it
/// keeps every budget times the effort far from overflowing.
pub const MAX_EFFORT: usize = 1000;

/// The passes of an attack, run in order on each chunk, then an optional segment bisection.
pub struct Plan {
    pub passes: Vec<Box<dyn Pass>>,
    pub refine: usize,
}

impl Plan {
    /// Every pass with all its parameters, the bisection and the adversarial criterion: what a
    /// margins file records, so that a run resumed or merged by a brittle whose attacks differ
    /// is refused, not mixed in.
    pub fn describe(&self) -> String {
        let passes: Vec<String> = self.passes.iter().map(|p| format!("{p:?}")).collect();
        format!(
            "{}; bisection {} (passes follow argmax flips, keep points past gap {SEARCH_GAP_RTOL:e}; bisection from the closer of both, pushed out by up to {}x; verified past {GAP_RTOL:e} of max |logit|)",
            passes.join(" -> "),
            self.refine,
            super::driver::OVERSHOOTS.last().unwrap_or(&1.0)
        )
    }

    /// `steps` overrides the attack's default budget (for `best`: the cold FMN pass's);
    /// `effort` multiplies every budget of `best` (1: its defaults). Errors about a setting are
    /// [`OptionError`]s naming its field (`steps`, `norm`, `effort`).
    pub fn new(
        kind: AttackKind,
        norm: Norm,
        steps: Option<usize>,
        topk: i64,
        num_classes: i64,
        effort: usize,
    ) -> Result<Plan> {
        if !(1..=MAX_EFFORT).contains(&effort) {
            bail!(OptionError::new(
                "effort",
                format!("effort {effort} is outside 1..={MAX_EFFORT} (each unit costs about one default run)")
            ));
        }
        if effort > 1 && kind != AttackKind::Best {
            bail!(OptionError::new(
                "effort",
                format!(
                    "effort scales best's passes; {} has one pass: give it more steps instead",
                    kind.as_str()
                )
            ));
        }
        let steps = steps.unwrap_or(kind.default_steps());
        if steps == 0 && kind != AttackKind::Best {
            bail!(OptionError::new(
                "steps",
                format!("{} needs a positive number of steps", kind.as_str())
            ));
        }
        let fab_norm = || -> Result<()> {
            if norm == Norm::L1 {
                bail!(OptionError::new(
                    "norm",
                    format!(
                        "{} supports the linf and l2 norms, not l1 (fmn supports l1)",
                        kind.as_str()
                    )
                ));
            }
            Ok(())
        };
        let passes: Vec<Box<dyn Pass>> = match kind {
            AttackKind::Fmn => vec![Box::new(Fmn::new(norm, steps))],
            AttackKind::Fab => {
                fab_norm()?;
                vec![Box::new(Fab::new(norm, steps, num_classes - 1, false))]
            }
            AttackKind::FabT => {
                fab_norm()?;
                vec![Box::new(Fab::new(norm, steps, topk, true))]
            }
            AttackKind::Ddn => {
                if norm != Norm::L2 {
                    bail!(OptionError::new(
                        "norm",
                        format!("ddn is an l2 attack, not {norm}")
                    ));
                }
                vec![Box::new(Ddn::new(steps))]
            }
            AttackKind::Pgd => vec![Box::new(Pgd::new(norm, steps))],
            AttackKind::Best => {
                let cold = if steps == 0 {
                    best::cold_fmn_steps(norm)
                } else {
                    steps
                };
                if cold.checked_mul(effort).is_none() {
                    bail!(OptionError::new(
                        "steps",
                        format!("{cold} steps times effort {effort} overflow")
                    ));
                }
                return Ok(best::plan(norm, cold, topk, effort));
            }
        };
        Ok(Plan { passes, refine: 0 })
    }
}
