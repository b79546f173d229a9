//! Per-epoch checkpoints: weights and Adam moments in `checkpoint.safetensors`, the position
//! (epochs done, optimizer step, history) and the run's [`TrainConfig`] in `checkpoint.json`.
//! The random state at an epoch boundary is a function of `(seed, epoch)`, so this is enough
//! to resume exactly. Both files are written to a temporary name and renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Tensor;

use super::{EpochStats, TrainConfig, Trainer};
use crate::model::{weights, Classifier};
use crate::util::OptionError;

const WEIGHTS: &str = "checkpoint.safetensors";
const STATE: &str = "checkpoint.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    config: TrainConfig,
    epoch: usize,
    step: i64,
    history: Vec<EpochStats>,
}

/// Writes the trainer's state into `dir` (created if needed).
pub fn save(trainer: &Trainer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors: Vec<(String, Tensor)> = trainer
        .model
        .var_store()
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t.detach()))
        .collect();
    tensors.extend(trainer.opt.state());
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = dir.join(WEIGHTS);
    let tmp = dir.join(format!("{WEIGHTS}.tmp"));
    Tensor::write_safetensors(&tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let state = State {
        config: (*trainer.config).clone(),
        epoch: trainer.epoch,
        step: trainer.opt.step,
        history: trainer.history.clone(),
    };
    let state_tmp = dir.join(format!("{STATE}.tmp"));
    std::fs::write(&state_tmp, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("writing {}", state_tmp.display()))?;
    rename(&tmp, &weights)?;
    rename(&state_tmp, &dir.join(STATE))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// Loads a checkpoint from `dir` into `trainer` if there is one; it must come from the same
/// configuration. Returns whether it resumed.
pub fn resume(trainer: &mut Trainer, dir: &Path) -> Result<bool> {
    let state_path: PathBuf = dir.join(STATE);
    if !state_path.exists() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let state: State =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", state_path.display()))?;
    if state.config != *trainer.config {
        bail!(OptionError::new(
            "checkpoint_dir",
            format!(
                "{}: checkpoint of a different run ({:?}); use another checkpoint folder or delete it",
                state_path.display(),
                state.config
            )
        ));
    }
    let weights = dir.join(WEIGHTS);
    let source = weights.display().to_string();
    let device = trainer.model.device();
    let all: HashMap<String, Tensor> = weights::read_tensors(&weights)?
        .into_iter()
        .map(|(n, t)| (n, t.to_device(device)))
        .collect();
    let model: Vec<(String, Tensor)> = all
        .iter()
        .filter_map(|(n, t)| {
            n.strip_prefix("model.")
                .map(|m| (m.to_string(), t.shallow_clone()))
        })
        .collect();
    trainer.model.load_weights(model, &source)?;
    trainer.opt.restore(&all, state.step, &source)?;
    trainer.epoch = state.epoch;
    trainer.history = state.history;
    Ok(true)
}
