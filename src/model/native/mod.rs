//! Native Rust architectures (RobustBench families and small CNNs) with weights from PyTorch
//! checkpoints or safetensors.

pub mod small_cnn;

use anyhow::{bail, Result};

use super::normalize::Normalizer;
use super::{Classifier, ModelSpec};

/// Architecture names accepted by `--arch`.
pub const ARCHITECTURES: &[&str] = &[small_cnn::ARCH];

/// Builds a native architecture and loads its weights.
pub fn load(
    spec: &ModelSpec,
    normalizer: Option<Normalizer>,
    input_shape: [i64; 3],
    fingerprint: String,
) -> Result<Box<dyn Classifier>> {
    match spec.arch.as_deref() {
        Some(small_cnn::ARCH) => small_cnn::load(spec, normalizer, input_shape, fingerprint),
        other => bail!(
            "unknown native architecture {other:?}; known: {}",
            ARCHITECTURES.join(", ")
        ),
    }
}
