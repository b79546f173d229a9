//! Native Rust architectures (RobustBench families and small CNNs) with weights from PyTorch
//! checkpoints or safetensors.

use anyhow::{bail, Result};

use super::normalize::Normalizer;
use super::{Classifier, ModelSpec};

/// Architecture names accepted by `--arch`.
pub const ARCHITECTURES: &[&str] = &[];

/// Builds a native architecture and loads its weights.
pub fn load(
    spec: &ModelSpec,
    normalizer: Option<Normalizer>,
    input_shape: [i64; 3],
    fingerprint: String,
) -> Result<Box<dyn Classifier>> {
    let _ = (normalizer, input_shape, fingerprint);
    bail!("native architecture {:?} is not available yet", spec.arch)
}
