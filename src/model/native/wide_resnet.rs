//! WideResNet-depth-widen (RobustBench `architectures/wide_resnet.py`, after TRADES): a 3x3
//! stem of w = 16 channels, three `NetworkBlock`s of (depth-4)/6 pre-activation `BasicBlock`s
//! (wk, 2wk, 4wk channels), BN-ReLU, an 8x8 average pool and `fc`.

use anyhow::{ensure, Result};
use tch::nn;
use tch::Tensor;

use super::{
    bn, bound_pooled_features, bound_relu, bound_through_blocks, conv, downsampled,
    pooled_features, through_blocks, ArchConfig, Block, Bn, Network, ResConv,
};
use crate::certify::graph::{BoundGraph, Layer, NodeId};

/// `wrn-<depth>-<widen>` as numbers.
pub fn parse_name(name: &str) -> Option<(i64, i64)> {
    let rest = name.strip_prefix("wrn-")?;
    let (d, w) = rest.split_once('-')?;
    Some((d.parse().ok()?, w.parse().ok()?))
}

/// RobustBench's `BasicBlock`: when in != out channels the activated input feeds both the
/// first conv and the 1x1 `convShortcut`; otherwise the raw input is the shortcut.
struct BasicBlock {
    bn1: Bn,
    conv1: ResConv,
    bn2: Bn,
    conv2: ResConv,
    conv_shortcut: Option<ResConv>,
    /// The state-dict prefix, naming the block's nodes.
    name: String,
}

impl BasicBlock {
    fn new(p: nn::Path, cin: i64, cout: i64, stride: i64) -> Self {
        BasicBlock {
            bn1: bn(&p / "bn1", cin),
            conv1: conv(&p / "conv1", cin, cout, 3, stride),
            bn2: bn(&p / "bn2", cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1),
            conv_shortcut: (cin != cout).then(|| conv(&p / "convShortcut", cin, cout, 1, stride)),
            name: super::path_name(&p),
        }
    }
}

impl Block for BasicBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let act = self.bn1.forward_t(x, train).relu();
        let out = self.bn2.forward_t(&self.conv1.forward(&act), train).relu();
        let out = self.conv2.forward(&out);
        match &self.conv_shortcut {
            Some(c) => c.forward(&act) + out,
            None => x + out,
        }
    }

    fn bound(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let act = self.bn1.bound(g, x)?;
        let act = bound_relu(g, act, &format!("{}.relu1", self.name))?;
        let out = self.conv1.bound(g, act)?;
        let out = self.bn2.bound(g, out)?;
        let out = bound_relu(g, out, &format!("{}.relu2", self.name))?;
        let out = self.conv2.bound(g, out)?;
        let short = match &self.conv_shortcut {
            Some(c) => c.bound(g, act)?,
            None => x,
        };
        g.push(Layer::Add, &[short, out], &format!("{}.add", self.name))
    }
}

struct WideResNet {
    conv1: ResConv,
    blocks: Vec<BasicBlock>,
    bn1: Bn,
    fc: nn::Linear,
}

pub fn build(p: &nn::Path, cfg: &ArchConfig, depth: i64, widen: i64) -> Result<Box<dyn Network>> {
    let arch = format!("wrn-{depth}-{widen}");
    ensure!(
        depth >= 10 && (depth - 4) % 6 == 0 && widen > 0,
        "{arch}: depth must be 6n+4 (n >= 1) and widen positive"
    );
    downsampled(cfg.input_shape, 32, &arch)?;
    let n = (depth - 4) / 6;
    let w = cfg.width.unwrap_or(16);
    let ch = [w, w * widen, 2 * w * widen, 4 * w * widen];
    let mut blocks = Vec::new();
    for (b, stride) in [1, 2, 2].into_iter().enumerate() {
        let layer = p / format!("block{}", b + 1) / "layer";
        for i in 0..n {
            let cin = if i == 0 { ch[b] } else { ch[b + 1] };
            blocks.push(BasicBlock::new(
                &layer / i,
                cin,
                ch[b + 1],
                if i == 0 { stride } else { 1 },
            ));
        }
    }
    Ok(Box::new(WideResNet {
        conv1: conv(p / "conv1", cfg.input_shape[0], ch[0], 3, 1),
        blocks,
        bn1: bn(p / "bn1", ch[3]),
        fc: nn::linear(p / "fc", ch[3], cfg.num_classes, Default::default()),
    }))
}

impl Network for WideResNet {
    fn features_t(&self, x: &Tensor, train: bool) -> Tensor {
        let out = through_blocks(&self.blocks, self.conv1.forward(x), train);
        let out = self.bn1.forward_t(&out, train).relu();
        pooled_features(&out, 8)
    }

    fn head(&self) -> &nn::Linear {
        &self.fc
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let out = self.conv1.bound(g, x)?;
        let out = bound_through_blocks(&self.blocks, g, out)?;
        let out = self.bn1.bound(g, out)?;
        let out = bound_relu(g, out, "relu")?;
        bound_pooled_features(g, out, 8)
    }
}
