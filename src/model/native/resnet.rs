//! ResNet-18 for CIFAR (RobustBench `architectures/resnet.py`, after kuangliu): a 3x3 stem
//! without pooling, four stages of two `BasicBlock`s (widths w, 2w, 4w, 8w; w = 64), a 4x4
//! average pool and `linear`.

use anyhow::Result;
use tch::nn;
use tch::Tensor;

use super::{
    bn, bound_pooled_features, bound_relu, bound_through_blocks, conv, downsampled,
    pooled_features, resnet18_blocks, through_blocks, ArchConfig, Block, Bn, Network, ResConv,
};
use crate::certify::graph::{BoundGraph, Layer, NodeId};

/// `conv-bn-relu-conv-bn + shortcut`, then ReLU; the shortcut is `conv1x1-bn` when the shape changes.
struct BasicBlock {
    conv1: ResConv,
    bn1: Bn,
    conv2: ResConv,
    bn2: Bn,
    shortcut: Option<(ResConv, Bn)>,
    /// The state-dict prefix, naming the block's nodes.
    name: String,
}

impl BasicBlock {
    fn new(p: nn::Path, cin: i64, cout: i64, stride: i64) -> Self {
        let shortcut = (stride != 1 || cin != cout).then(|| {
            let s = &p / "shortcut";
            (conv(&s / 0, cin, cout, 1, stride), bn(&s / 1, cout))
        });
        BasicBlock {
            conv1: conv(&p / "conv1", cin, cout, 3, stride),
            bn1: bn(&p / "bn1", cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1),
            bn2: bn(&p / "bn2", cout),
            shortcut,
            name: super::path_name(&p),
        }
    }
}

impl Block for BasicBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let out = self.bn1.forward_t(&self.conv1.forward(x), train).relu();
        let out = self.bn2.forward_t(&self.conv2.forward(&out), train);
        let short = match &self.shortcut {
            Some((c, b)) => b.forward_t(&c.forward(x), train),
            None => x.shallow_clone(),
        };
        (out + short).relu()
    }

    fn bound(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let out = self.conv1.bound(g, x)?;
        let out = self.bn1.bound(g, out)?;
        let out = bound_relu(g, out, &format!("{}.relu1", self.name))?;
        let out = self.conv2.bound(g, out)?;
        let out = self.bn2.bound(g, out)?;
        let short = match &self.shortcut {
            Some((c, b)) => {
                let s = c.bound(g, x)?;
                b.bound(g, s)?
            }
            None => x,
        };
        let sum = g.push(Layer::Add, &[out, short], &format!("{}.add", self.name))?;
        bound_relu(g, sum, &format!("{}.relu2", self.name))
    }
}

struct ResNet18 {
    conv1: ResConv,
    bn1: Bn,
    blocks: Vec<BasicBlock>,
    linear: nn::Linear,
}

pub fn build(p: &nn::Path, cfg: &ArchConfig) -> Result<Box<dyn Network>> {
    downsampled(cfg.input_shape, 32, "resnet18")?;
    let w = cfg.width.unwrap_or(64);
    let blocks = resnet18_blocks(p, w, BasicBlock::new);
    Ok(Box::new(ResNet18 {
        conv1: conv(p / "conv1", cfg.input_shape[0], w, 3, 1),
        bn1: bn(p / "bn1", w),
        blocks,
        linear: nn::linear(p / "linear", 8 * w, cfg.num_classes, Default::default()),
    }))
}

impl Network for ResNet18 {
    fn features_t(&self, x: &Tensor, train: bool) -> Tensor {
        let stem = self.bn1.forward_t(&self.conv1.forward(x), train).relu();
        let out = through_blocks(&self.blocks, stem, train);
        pooled_features(&out, 4)
    }

    fn head(&self) -> &nn::Linear {
        &self.linear
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let out = self.conv1.bound(g, x)?;
        let out = self.bn1.bound(g, out)?;
        let out = bound_relu(g, out, "relu")?;
        let out = bound_through_blocks(&self.blocks, g, out)?;
        bound_pooled_features(g, out, 4)
    }
}
