//! WideResNet-depth-widen (RobustBench `architectures/wide_resnet.py`, after TRADES): a 3x3
//! stem of 16 channels, three `NetworkBlock`s of (depth-4)/6 pre-activation `BasicBlock`s
//! (16k, 32k, 64k channels), BN-ReLU, an 8x8 average pool and `fc`.

use anyhow::{ensure, Result};
use tch::nn::{self, Module};
use tch::Tensor;

use super::{
    avg_pool, bn, bn_t, conv, downsampled, no_width, through_blocks, ArchConfig, Block, Network,
};

/// `wrn-<depth>-<widen>` as numbers.
pub fn parse_name(name: &str) -> Option<(i64, i64)> {
    let rest = name.strip_prefix("wrn-")?;
    let (d, w) = rest.split_once('-')?;
    Some((d.parse().ok()?, w.parse().ok()?))
}

/// RobustBench's `BasicBlock`: when in != out channels the activated input feeds both the
/// first conv and the 1x1 `convShortcut`; otherwise the raw input is the shortcut.
struct BasicBlock {
    bn1: nn::BatchNorm,
    conv1: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl BasicBlock {
    fn new(p: nn::Path, cin: i64, cout: i64, stride: i64) -> Self {
        BasicBlock {
            bn1: bn(&p / "bn1", cin),
            conv1: conv(&p / "conv1", cin, cout, 3, stride),
            bn2: bn(&p / "bn2", cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1),
            conv_shortcut: (cin != cout).then(|| conv(&p / "convShortcut", cin, cout, 1, stride)),
        }
    }
}

impl Block for BasicBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let act = bn_t(&self.bn1, x, train).relu();
        let out = bn_t(&self.bn2, &self.conv1.forward(&act), train).relu();
        let out = self.conv2.forward(&out);
        match &self.conv_shortcut {
            Some(c) => c.forward(&act) + out,
            None => x + out,
        }
    }
}

struct WideResNet {
    conv1: nn::Conv2D,
    blocks: Vec<BasicBlock>,
    bn1: nn::BatchNorm,
    fc: nn::Linear,
}

pub fn build(p: &nn::Path, cfg: &ArchConfig, depth: i64, widen: i64) -> Result<Box<dyn Network>> {
    let arch = format!("wrn-{depth}-{widen}");
    no_width(cfg, &arch)?;
    ensure!(
        depth >= 10 && (depth - 4) % 6 == 0 && widen > 0,
        "{arch}: depth must be 6n+4 (n >= 1) and widen positive"
    );
    downsampled(cfg.input_shape, 32, &arch)?;
    let n = (depth - 4) / 6;
    let ch = [16, 16 * widen, 32 * widen, 64 * widen];
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
        let out = bn_t(&self.bn1, &out, train).relu();
        avg_pool(&out, 8).flatten(1, -1)
    }

    fn head(&self) -> &nn::Linear {
        &self.fc
    }
}
