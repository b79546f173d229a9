//! advertorch's `LeNet5` (`advertorch/test_utils.py`, used by its MNIST example checkpoints):
//! Conv(C,32,k3,p1)-ReLU-MaxPool2-Conv(32,64,k3,p1)-ReLU-MaxPool2-Linear(64*H/4*W/4,200)-ReLU-Linear(200,K).

use anyhow::Result;
use tch::nn;

use super::{conv_pool, no_width, ArchConfig, Network};

pub fn build(p: &nn::Path, cfg: &ArchConfig) -> Result<Box<dyn Network>> {
    no_width(cfg, "lenet5-advertorch")?;
    conv_pool::build(
        p,
        cfg,
        "lenet5-advertorch",
        [32, 64],
        200,
        ["linear1", "linear2"],
    )
}
