//! The body LeNet-5 (advertorch) and `small-cnn` share: two blocks of a 3x3 convolution
//! (padding 1), ReLU and a 2x2 max-pool, a hidden linear layer with ReLU, and the linear head.
//! The two families differ only in widths and in the state-dict names of the linear layers.

use anyhow::Result;
use tch::nn;
use tch::Tensor;

use super::{
    bound_conv, bound_flatten, bound_linear, bound_max_pool, bound_relu, downsampled, ArchConfig,
    Network,
};
use crate::certify::graph::{BoundGraph, NodeId};

struct ConvPoolNet {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    hidden: nn::Linear,
    head: nn::Linear,
    /// The state-dict name of `hidden`, its label in the bound graph.
    hidden_name: &'static str,
}

/// Builds the body for `arch` (for messages): `channels` of `conv1` and `conv2`, `hidden`
/// units, the linear layers named `linears` (hidden, head); the layers are created in
/// state-dict order, so a seeded initialisation is reproducible.
pub fn build(
    p: &nn::Path,
    cfg: &ArchConfig,
    arch: &str,
    channels: [i64; 2],
    hidden: i64,
    linears: [&'static str; 2],
) -> Result<Box<dyn Network>> {
    let (h, w) = downsampled(cfg.input_shape, 4, arch)?;
    let c = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Box::new(ConvPoolNet {
        conv1: nn::conv2d(p / "conv1", cfg.input_shape[0], channels[0], 3, c),
        conv2: nn::conv2d(p / "conv2", channels[0], channels[1], 3, c),
        hidden: nn::linear(
            p / linears[0],
            channels[1] * h * w,
            hidden,
            Default::default(),
        ),
        head: nn::linear(p / linears[1], hidden, cfg.num_classes, Default::default()),
        hidden_name: linears[0],
    }))
}

impl Network for ConvPoolNet {
    fn features_t(&self, x: &Tensor, _train: bool) -> Tensor {
        x.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.hidden)
            .relu()
    }

    fn head(&self) -> &nn::Linear {
        &self.head
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let x = bound_conv(g, x, &self.conv1, 1, 1, "conv1")?;
        let x = bound_relu(g, x, "relu1")?;
        let x = bound_max_pool(g, x, 2, "pool1")?;
        let x = bound_conv(g, x, &self.conv2, 1, 1, "conv2")?;
        let x = bound_relu(g, x, "relu2")?;
        let x = bound_max_pool(g, x, 2, "pool2")?;
        let x = bound_flatten(g, x)?;
        let x = bound_linear(g, x, &self.hidden, self.hidden_name)?;
        bound_relu(g, x, "relu3")
    }
}
