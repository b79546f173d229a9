//! ResNet-18 for CIFAR (RobustBench `architectures/resnet.py`, after kuangliu): a 3x3 stem
//! without pooling, four stages of two `BasicBlock`s (widths w, 2w, 4w, 8w; w = 64), a 4x4
//! average pool and `linear`.

use anyhow::Result;
use tch::nn::{self, Module};
use tch::Tensor;

use super::{
    avg_pool, bn, bn_t, conv, downsampled, resnet18_blocks, through_blocks, ArchConfig, Block,
    Network,
};

/// `conv-bn-relu-conv-bn + shortcut`, then ReLU; the shortcut is `conv1x1-bn` when the shape changes.
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    shortcut: Option<(nn::Conv2D, nn::BatchNorm)>,
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
        }
    }
}

impl Block for BasicBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let out = bn_t(&self.bn1, &self.conv1.forward(x), train).relu();
        let out = bn_t(&self.bn2, &self.conv2.forward(&out), train);
        let short = match &self.shortcut {
            Some((c, b)) => bn_t(b, &c.forward(x), train),
            None => x.shallow_clone(),
        };
        (out + short).relu()
    }
}

struct ResNet18 {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
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
        let stem = bn_t(&self.bn1, &self.conv1.forward(x), train).relu();
        let out = through_blocks(&self.blocks, stem, train);
        avg_pool(&out, 4).flatten(1, -1)
    }

    fn head(&self) -> &nn::Linear {
        &self.linear
    }
}
