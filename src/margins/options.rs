//! The options of a margins job, checked once (in the manner of linfa's `ParamGuard`):
//! [`MarginsOptions`] is what a caller asks for, [`CheckedMarginsOptions`] what the job runs.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::sidecar::Settings;
use super::Shard;
use crate::attack::AttackKind;
use crate::data::Dataset;
use crate::model::ModelInfo;
use crate::norm::Norm;

/// A margins job as asked for, before [`MarginsOptions::check`]; a margins file records the
/// options that made it (in [`Settings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarginsOptions {
    pub norm: Norm,
    pub attack: AttackKind,
    /// Iterations per sample (`None`: the attack's published budget).
    pub steps: Option<usize>,
    /// Classes considered by `fab-t` and by `best`'s FAB pass.
    pub topk: i64,
    pub seed: u64,
    /// Attack the true label instead of the prediction.
    pub target_true: bool,
    /// Samples attacked together.
    pub batch_size: usize,
    /// Samples per chunk, the unit of refill, resumption and sharding (`brittle margins`'
    /// default: 4 batches).
    pub chunk: usize,
    pub shard: Option<Shard>,
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
            seed: 0,
            target_true: false,
            batch_size: 128,
            chunk: 512,
            shard: None,
        }
    }

    /// Refuses options no job can run with.
    pub fn check(self) -> Result<CheckedMarginsOptions> {
        ensure!(self.batch_size > 0, "batch_size must be positive");
        ensure!(self.chunk > 0, "chunk must be positive (samples per chunk)");
        ensure!(
            self.topk >= 1,
            "topk = {} must be at least 1 (classes the targeted attacks consider)",
            self.topk
        );
        if let Some(s) = self.shard {
            Shard::new(s.index, s.count)?;
        }
        Ok(CheckedMarginsOptions(self))
    }
}

/// Options that passed [`MarginsOptions::check`]; the only form [`super::run`] takes.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedMarginsOptions(MarginsOptions);

impl CheckedMarginsOptions {
    pub fn options(&self) -> &MarginsOptions {
        &self.0
    }

    /// The settings a job with these options records for `model` on `data`.
    pub fn settings(&self, model: &ModelInfo, data: &Dataset) -> Settings {
        Settings {
            model_fingerprint: model.fingerprint.clone(),
            data: data.source.clone(),
            window: (
                data.indices.first().copied().unwrap_or(0),
                data.indices.last().map_or(0, |i| i + 1),
            ),
            options: self.0.clone(),
        }
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
        assert_eq!(o.clone().check().unwrap().options(), &o);
        for (bad, field) in [
            (
                MarginsOptions {
                    batch_size: 0,
                    ..o.clone()
                },
                "batch_size",
            ),
            (
                MarginsOptions {
                    chunk: 0,
                    ..o.clone()
                },
                "chunk",
            ),
            (
                MarginsOptions {
                    topk: 0,
                    ..o.clone()
                },
                "topk",
            ),
            (
                MarginsOptions {
                    shard: Some(Shard { index: 2, count: 2 }),
                    ..o.clone()
                },
                "shard 2/2",
            ),
        ] {
            let e = bad.check().unwrap_err().to_string();
            assert!(e.contains(field) && !e.contains("--"), "{e}");
        }
    }
}
