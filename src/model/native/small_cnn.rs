//! `small-cnn`: a small, fast CNN for MNIST-sized inputs, trained by `brittle train`.
//!
//! `conv1 (3x3, w) → ReLU → maxpool 2 → conv2 (3x3, 2w) → ReLU → maxpool 2 → fc1 (4w) → ReLU → fc2 (K)`,
//! with PyTorch state-dict names (`conv1.weight`, …, `fc2.bias`) so the same safetensors file
//! loads in `torch.nn` code. No batch norm or dropout, so training and evaluation compute the
//! same function (adversarial training attacks exactly the model that is later evaluated).

use anyhow::{ensure, Result};
use tch::nn;
use tch::Tensor;

use super::{conv_pool, ArchConfig, Network};

/// The `--arch` name.
pub const ARCH: &str = "small-cnn";
/// Channels of `conv1` (`@N` suffix) when neither the name nor a weights file says otherwise.
pub const DEFAULT_WIDTH: i64 = 32;

/// Builds `small-cnn@w` (layers created in state-dict order, so a seeded initialisation is
/// reproducible).
pub fn build(p: &nn::Path, cfg: &ArchConfig) -> Result<Box<dyn Network>> {
    let w = cfg.width.unwrap_or(DEFAULT_WIDTH);
    ensure!(
        cfg.num_classes > 1,
        "{ARCH}: needs at least 2 classes, got {}",
        cfg.num_classes
    );
    conv_pool::build(p, cfg, ARCH, [w, 2 * w], 4 * w, ["fc1", "fc2"])
}

/// `small-cnn` without `@N` loads weights of any width: the width is read from `conv1.weight`.
pub fn arch_for_weights(arch: &str, tensors: &[(String, Tensor)]) -> Option<String> {
    if arch != ARCH {
        return None;
    }
    let (_, conv1) = tensors
        .iter()
        .find(|(n, _)| n.strip_prefix("model.").unwrap_or(n) == "conv1.weight")?;
    conv1.size().first().map(|w| format!("{ARCH}@{w}"))
}
