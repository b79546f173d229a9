//! advertorch's `LeNet5` (`advertorch/test_utils.py`, used by its MNIST example checkpoints):
//! Conv(C,32,k3,p1)-ReLU-MaxPool2-Conv(32,64,k3,p1)-ReLU-MaxPool2-Linear(64*H/4*W/4,200)-ReLU-Linear(200,K).

use anyhow::Result;
use tch::nn::{self, Module};
use tch::Tensor;

use super::{
    bound_conv, bound_flatten, bound_linear, bound_max_pool, bound_relu, downsampled, no_width,
    ArchConfig, Network,
};
use crate::certify::graph::{BoundGraph, NodeId};

struct LeNet5 {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    linear1: nn::Linear,
    linear2: nn::Linear,
}

pub fn build(p: &nn::Path, cfg: &ArchConfig) -> Result<Box<dyn Network>> {
    no_width(cfg, "lenet5-advertorch")?;
    let (h, w) = downsampled(cfg.input_shape, 4, "lenet5-advertorch")?;
    let c = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Box::new(LeNet5 {
        conv1: nn::conv2d(p / "conv1", cfg.input_shape[0], 32, 3, c),
        conv2: nn::conv2d(p / "conv2", 32, 64, 3, c),
        linear1: nn::linear(p / "linear1", 64 * h * w, 200, Default::default()),
        linear2: nn::linear(p / "linear2", 200, cfg.num_classes, Default::default()),
    }))
}

impl Network for LeNet5 {
    fn features(&self, x: &Tensor) -> Tensor {
        let x = self
            .conv1
            .forward(x)
            .relu()
            .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let x = self
            .conv2
            .forward(&x)
            .relu()
            .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        self.linear1.forward(&x.flatten(1, -1)).relu()
    }

    fn head(&self) -> &nn::Linear {
        &self.linear2
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let x = bound_conv(g, x, &self.conv1, 1, 1, "conv1")?;
        let x = bound_relu(g, x, "relu1")?;
        let x = bound_max_pool(g, x, 2, "pool1")?;
        let x = bound_conv(g, x, &self.conv2, 1, 1, "conv2")?;
        let x = bound_relu(g, x, "relu2")?;
        let x = bound_max_pool(g, x, 2, "pool2")?;
        let x = bound_flatten(g, x)?;
        let x = bound_linear(g, x, &self.linear1, "linear1")?;
        bound_relu(g, x, "relu3")
    }
}
