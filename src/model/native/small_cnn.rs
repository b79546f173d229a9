//! `small-cnn`: a small, fast CNN for MNIST-sized inputs, trained by `brittle train`.
//!
//! `conv1 (3x3, w) → ReLU → maxpool 2 → conv2 (3x3, 2w) → ReLU → maxpool 2 → fc1 (4w) → ReLU → fc2 (K)`,
//! with PyTorch state-dict names (`conv1.weight`, …, `fc2.bias`) so the same safetensors file
//! loads in `torch.nn` code. No batch norm or dropout, so training and evaluation compute the
//! same function (adversarial training attacks exactly the model that is later evaluated).

use anyhow::{ensure, Result};
use tch::nn;
use tch::Tensor;

use super::{
    bound_conv, bound_flatten, bound_linear, bound_max_pool, bound_relu, downsampled, ArchConfig,
    Network,
};
use crate::certify::graph::{BoundGraph, NodeId};

/// The `--arch` name.
pub const ARCH: &str = "small-cnn";
/// Channels of `conv1` (`@N` suffix) when neither the name nor a weights file says otherwise.
pub const DEFAULT_WIDTH: i64 = 32;

struct SmallCnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

/// Builds `small-cnn@w` (layers created in state-dict order, so a seeded initialisation is
/// reproducible).
pub fn build(p: &nn::Path, cfg: &ArchConfig) -> Result<Box<dyn Network>> {
    let w = cfg.width.unwrap_or(DEFAULT_WIDTH);
    ensure!(
        cfg.num_classes > 1,
        "{ARCH}: needs at least 2 classes, got {}",
        cfg.num_classes
    );
    let (h4, w4) = downsampled(cfg.input_shape, 4, ARCH)?;
    let conv = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Box::new(SmallCnn {
        conv1: nn::conv2d(p / "conv1", cfg.input_shape[0], w, 3, conv),
        conv2: nn::conv2d(p / "conv2", w, 2 * w, 3, conv),
        fc1: nn::linear(p / "fc1", 2 * w * h4 * w4, 4 * w, Default::default()),
        fc2: nn::linear(p / "fc2", 4 * w, cfg.num_classes, Default::default()),
    }))
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

impl Network for SmallCnn {
    fn features(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
    }

    fn head(&self) -> &nn::Linear {
        &self.fc2
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let x = bound_conv(g, x, &self.conv1, 1, 1, "conv1")?;
        let x = bound_relu(g, x, "relu1")?;
        let x = bound_max_pool(g, x, 2, "pool1")?;
        let x = bound_conv(g, x, &self.conv2, 1, 1, "conv2")?;
        let x = bound_relu(g, x, "relu2")?;
        let x = bound_max_pool(g, x, 2, "pool2")?;
        let x = bound_flatten(g, x)?;
        let x = bound_linear(g, x, &self.fc1, "fc1")?;
        bound_relu(g, x, "relu3")
    }
}
