//! The options of a margins job, checked once (in the manner of linfa's `ParamGuard`):
//! [`MarginsOptions`] is what a caller asks for, `Checked<MarginsOptions>` what the job runs.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::sidecar::JobOptions;
use super::Shard;
use crate::attack::AttackKind;
use crate::certify::Method;
use crate::norm::Norm;
use crate::util::{Check, OptionError};

/// A margins job as asked for, before [`MarginsOptions::check`]; a margins file records the
/// options that made it (in [`super::Settings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarginsOptions {
    pub norm: Norm,
    pub attack: AttackKind,
    /// Iterations per sample (`None`: the attack's published budget).
    pub steps: Option<usize>,
    /// Classes considered by `fab-t` and by `best`'s FAB pass.
    pub topk: i64,
    /// Multiplier of `best`'s budgets (1: its defaults); absent from the sidecars of files made
    /// at 1, so that they still resume.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub effort: usize,
    pub seed: u64,
    /// Attack the true label instead of the prediction.
    pub target_true: bool,
    /// Samples attacked together.
    pub batch_size: usize,
    /// Samples per chunk, the unit of refill, resumption and sharding (`brittle margins`'
    /// default: 4 batches).
    pub chunk: usize,
    pub shard: Option<Shard>,
    /// Also certify a lower bound on each margin with this method (a `certified_radius`
    /// column); absent from the sidecars of files made without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certify: Option<Method>,
}

impl MarginsOptions {
    /// `brittle margins`' defaults (topk 9, seed 0, batches of 128, chunks of 4 batches) for a norm
    /// and an attack.
    pub fn new(norm: Norm, attack: AttackKind) -> Self {
        MarginsOptions {
            norm,
            attack,
            steps: None,
            topk: 9,
            effort: 1,
            seed: 0,
            target_true: false,
            batch_size: 128,
            chunk: 512,
            shard: None,
            certify: None,
        }
    }
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Check for MarginsOptions {
    /// Refuses options no job can run with.
    fn validate(&self) -> Result<()> {
        ensure!(
            self.batch_size > 0,
            OptionError::new("batch_size", "the batch size must be positive")
        );
        ensure!(
            self.chunk > 0,
            OptionError::new("chunk", "the chunk must be positive (samples per chunk)")
        );
        ensure!(
            self.topk >= 1,
            OptionError::new(
                "topk",
                format!(
                    "topk = {} must be at least 1 (classes the targeted attacks consider)",
                    self.topk
                )
            )
        );
        if let Some(s) = self.shard {
            Shard::new(s.index, s.count).map_err(|e| OptionError::about("shard", e))?;
        }
        Ok(())
    }
}

impl JobOptions for MarginsOptions {
    const FILE: &'static str = "margins";
    const MERGED: bool = true;
    fn seed(&self) -> Option<u64> {
        Some(self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_what_no_job_runs() {
        let o = MarginsOptions {
            batch_size: 16,
            chunk: 64,
            ..MarginsOptions::new(Norm::L2, AttackKind::Fmn)
        };
        assert_eq!(*o.clone().check().unwrap(), o);
        for (bad, field, text) in [
            (
                MarginsOptions {
                    batch_size: 0,
                    ..o.clone()
                },
                "batch_size",
                "batch size must be positive",
            ),
            (
                MarginsOptions {
                    chunk: 0,
                    ..o.clone()
                },
                "chunk",
                "chunk must be positive",
            ),
            (
                MarginsOptions {
                    topk: 0,
                    ..o.clone()
                },
                "topk",
                "topk = 0 must be at least 1",
            ),
            (
                MarginsOptions {
                    shard: Some(Shard { index: 2, count: 2 }),
                    ..o.clone()
                },
                "shard",
                "shard 2/2",
            ),
        ] {
            let e = bad.check().unwrap_err();
            let option = e.downcast_ref::<OptionError>().map(|o| o.field);
            let e = e.to_string();
            assert!(e.contains(text) && !e.contains("--"), "{e}");
            assert_eq!(option, Some(field), "{e}");
        }
    }
}
