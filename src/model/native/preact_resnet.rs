//! PreActResNet-18 (RobustBench `architectures/resnet.py`): a 3x3 stem, four stages of two
//! pre-activation blocks (widths w, 2w, 4w, 8w; w = 64), optionally BN-ReLU before the pool
//! (`bn_before_fc`, with `PreActBlockV2` whose shortcut takes the activated input), a 4x4
//! average pool and `linear`.

use anyhow::Result;
use tch::nn;
use tch::Tensor;

use super::{
    bn, bound_pooled_features, bound_relu, bound_through_blocks, conv, downsampled,
    pooled_features, resnet18_blocks, through_blocks, ArchConfig, Block, Bn, Network, ResConv,
};
use crate::certify::graph::{BoundGraph, Layer, NodeId};

/// `bn-relu-conv-bn-relu-conv + shortcut`, the shortcut a 1x1 conv when the shape changes.
struct PreActBlock {
    bn1: Bn,
    conv1: ResConv,
    bn2: Bn,
    conv2: ResConv,
    shortcut: Option<ResConv>,
    /// `PreActBlockV2`: the shortcut convolves `relu(bn1(x))` instead of `x`.
    shortcut_after_act: bool,
    /// The state-dict prefix, naming the block's nodes.
    name: String,
}

impl PreActBlock {
    fn new(p: nn::Path, cin: i64, cout: i64, stride: i64, v2: bool) -> Self {
        PreActBlock {
            bn1: bn(&p / "bn1", cin),
            conv1: conv(&p / "conv1", cin, cout, 3, stride),
            bn2: bn(&p / "bn2", cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1),
            shortcut: (stride != 1 || cin != cout)
                .then(|| conv(&p / "shortcut" / 0, cin, cout, 1, stride)),
            shortcut_after_act: v2,
            name: super::path_name(&p),
        }
    }
}

impl Block for PreActBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let act = self.bn1.forward_t(x, train).relu();
        let short = match &self.shortcut {
            Some(c) if self.shortcut_after_act => c.forward(&act),
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = self.conv1.forward(&act);
        let out = self.conv2.forward(&self.bn2.forward_t(&out, train).relu());
        out + short
    }

    fn bound(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let act = self.bn1.bound(g, x)?;
        let act = bound_relu(g, act, &format!("{}.relu1", self.name))?;
        let short = match &self.shortcut {
            Some(c) if self.shortcut_after_act => c.bound(g, act)?,
            Some(c) => c.bound(g, x)?,
            None => x,
        };
        let out = self.conv1.bound(g, act)?;
        let out = self.bn2.bound(g, out)?;
        let out = bound_relu(g, out, &format!("{}.relu2", self.name))?;
        let out = self.conv2.bound(g, out)?;
        g.push(Layer::Add, &[out, short], &format!("{}.add", self.name))
    }
}

struct PreActResNet18 {
    conv1: ResConv,
    blocks: Vec<PreActBlock>,
    bn: Option<Bn>,
    linear: nn::Linear,
}

/// `bn_before_fc`: the `PreActResNet(PreActBlockV2, [2,2,2,2], bn_before_fc=True)` variant.
pub fn build(p: &nn::Path, cfg: &ArchConfig, bn_before_fc: bool) -> Result<Box<dyn Network>> {
    downsampled(cfg.input_shape, 32, "preact-resnet18")?;
    let w = cfg.width.unwrap_or(64);
    let blocks = resnet18_blocks(p, w, |path, cin, cout, stride| {
        PreActBlock::new(path, cin, cout, stride, bn_before_fc)
    });
    Ok(Box::new(PreActResNet18 {
        conv1: conv(p / "conv1", cfg.input_shape[0], w, 3, 1),
        blocks,
        bn: bn_before_fc.then(|| bn(p / "bn", 8 * w)),
        linear: nn::linear(p / "linear", 8 * w, cfg.num_classes, Default::default()),
    }))
}

impl Network for PreActResNet18 {
    fn features_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut out = through_blocks(&self.blocks, self.conv1.forward(x), train);
        if let Some(bn) = &self.bn {
            out = bn.forward_t(&out, train).relu();
        }
        pooled_features(&out, 4)
    }

    fn head(&self) -> &nn::Linear {
        &self.linear
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let out = self.conv1.bound(g, x)?;
        let mut out = bound_through_blocks(&self.blocks, g, out)?;
        if let Some(bn) = &self.bn {
            out = bn.bound(g, out)?;
            out = bound_relu(g, out, "relu")?;
        }
        bound_pooled_features(g, out, 4)
    }
}
