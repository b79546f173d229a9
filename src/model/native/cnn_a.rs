//! CNN-A (alpha-beta-CROWN `model_defs.cifar_model_wide`): an `nn.Sequential` of
//! Conv(C,16,k4,s2,p1)-ReLU-Conv(16,32,k4,s2,p1)-ReLU-Flatten-Linear(32*H/4*W/4,100)-ReLU-Linear(100,K),
//! so its parameters are named `0.*`, `2.*`, `5.*`, `7.*`.

use anyhow::Result;
use tch::nn::{self, Module};
use tch::Tensor;

use super::{
    bound_conv, bound_flatten, bound_linear, bound_relu, downsampled, no_width, ArchConfig, Network,
};
use crate::certify::graph::{BoundGraph, NodeId};

struct CnnA {
    conv0: nn::Conv2D,
    conv2: nn::Conv2D,
    fc5: nn::Linear,
    fc7: nn::Linear,
}

pub fn build(p: &nn::Path, cfg: &ArchConfig) -> Result<Box<dyn Network>> {
    no_width(cfg, "cnn-a")?;
    let (h, w) = downsampled(cfg.input_shape, 4, "cnn-a")?;
    let c = nn::ConvConfig {
        stride: 2,
        padding: 1,
        ..Default::default()
    };
    Ok(Box::new(CnnA {
        conv0: nn::conv2d(p / "0", cfg.input_shape[0], 16, 4, c),
        conv2: nn::conv2d(p / "2", 16, 32, 4, c),
        fc5: nn::linear(p / "5", 32 * h * w, 100, Default::default()),
        fc7: nn::linear(p / "7", 100, cfg.num_classes, Default::default()),
    }))
}

impl Network for CnnA {
    fn features_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let x = self.conv0.forward(x).relu();
        let x = self.conv2.forward(&x).relu();
        self.fc5.forward(&x.flatten(1, -1)).relu()
    }

    fn head(&self) -> &nn::Linear {
        &self.fc7
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let x = bound_conv(g, x, &self.conv0, 2, 1, "0")?;
        let x = bound_relu(g, x, "1")?;
        let x = bound_conv(g, x, &self.conv2, 2, 1, "2")?;
        let x = bound_relu(g, x, "3")?;
        let x = bound_flatten(g, x)?;
        let x = bound_linear(g, x, &self.fc5, "5")?;
        bound_relu(g, x, "6")
    }
}
