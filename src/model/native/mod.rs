//! Native Rust architectures (RobustBench families and small CNNs) with weights from PyTorch
//! checkpoints or safetensors.
//!
//! Each family is built with `tch::nn` under variable names equal to the PyTorch `state_dict`
//! names, so weights load by name ([`super::weights::load_into`]). Models run in eval mode
//! (BatchNorm uses its running statistics) except in `brittle train`, where BatchNorm uses batch
//! statistics and updates its running averages, and expose their penultimate features and last
//! linear layer.

pub mod cnn_a;
mod conv_pool;
pub mod lenet5;
pub mod preact_resnet;
pub mod resnet;
pub mod small_cnn;
pub mod wide_resnet;

use std::path::Path;

use anyhow::{ensure, Context, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::spec::ModelSpec;
use super::{weights, Classifier, ModelInfo};
use crate::certify::graph::{BoundGraph, Conv, Layer, NodeId};
use crate::util::OptionError;

/// What a builder needs to size its layers.
#[derive(Debug, Clone, Copy)]
pub struct ArchConfig {
    /// `[C, H, W]` of the inputs (from the data).
    pub input_shape: [i64; 3],
    pub num_classes: i64,
    /// Base width from an `@N` suffix of the architecture name (family-specific meaning).
    pub width: Option<i64>,
}

/// A network body and its last linear layer: `logits = head(features(x))`.
pub trait Network: Send {
    /// Penultimate features `[N, D]` of a normalised input in training (`train`) or evaluation
    /// mode; families whose layers behave the same in both (no BatchNorm or dropout) ignore
    /// `train`.
    fn features_t(&self, x: &Tensor, train: bool) -> Tensor;
    /// [`Network::features_t`] in evaluation mode.
    fn features(&self, x: &Tensor) -> Tensor {
        self.features_t(x, false)
    }
    /// The last linear layer.
    fn head(&self) -> &nn::Linear;
    /// Appends the layers of [`Network::features`] (eval mode) to a bound graph after `x`;
    /// returns the features node.
    fn append_bound_graph(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId>;
}

/// Builds a network under the root path of a `VarStore`.
pub type Builder = fn(&nn::Path, &ArchConfig) -> Result<Box<dyn Network>>;

/// Architecture names a [`ModelSpec`] may name. Besides these, any `wrn-<depth>-<widen>` is a
/// RobustBench WideResNet, and a suffix `@N` sets the base width of the ResNet families
/// (first-stage channels, 64 by default; the WideResNet stem's, 16 by default) and of
/// `small-cnn`, for reduced test models.
pub const ARCHITECTURES: &[(&str, Builder)] = &[
    ("cnn-a", cnn_a::build),
    ("lenet5-advertorch", lenet5::build),
    ("preact-resnet18", |p, c| preact_resnet::build(p, c, false)),
    ("preact-resnet18-bn", |p, c| {
        preact_resnet::build(p, c, true)
    }),
    ("resnet18", resnet::build),
    (small_cnn::ARCH, small_cnn::build),
    ("wrn-28-10", |p, c| wide_resnet::build(p, c, 28, 10)),
    ("wrn-34-10", |p, c| wide_resnet::build(p, c, 34, 10)),
    ("wrn-70-16", |p, c| wide_resnet::build(p, c, 70, 16)),
];

/// Builds the network called `arch` (see [`ARCHITECTURES`]).
pub fn build_network(
    arch: &str,
    p: &nn::Path,
    input_shape: [i64; 3],
    num_classes: i64,
) -> Result<Box<dyn Network>> {
    let (name, width) = match arch.split_once('@') {
        Some((n, w)) => (
            n,
            Some(w.parse::<i64>().ok().filter(|w| *w > 0).ok_or_else(|| {
                OptionError::new(
                    "arch",
                    format!("architecture {arch}: width after '@' must be a positive integer"),
                )
            })?),
        ),
        None => (arch, None),
    };
    let cfg = ArchConfig {
        input_shape,
        num_classes,
        width,
    };
    if let Some((_, build)) = ARCHITECTURES.iter().find(|(n, _)| *n == name) {
        return build(p, &cfg);
    }
    if let Some((depth, widen)) = wide_resnet::parse_name(name) {
        return wide_resnet::build(p, &cfg, depth, widen);
    }
    Err(OptionError::new(
        "arch",
        format!("unknown architecture {name:?}; known: {}", known_names()),
    )
    .into())
}

/// The registered names, for error messages.
fn known_names() -> String {
    let names: Vec<&str> = ARCHITECTURES.iter().map(|(n, _)| *n).collect();
    format!("{} (and any wrn-<depth>-<widen>)", names.join(", "))
}

/// Refuses a base width for families that have none.
pub fn no_width(cfg: &ArchConfig, arch: &str) -> Result<()> {
    ensure!(
        cfg.width.is_none(),
        "architecture {arch} has no width parameter ('@N')"
    );
    Ok(())
}

/// The spatial size after `n` halvings by stride-2 stages, refusing inputs too small for them.
pub fn downsampled(input_shape: [i64; 3], factor: i64, arch: &str) -> Result<(i64, i64)> {
    let (h, w) = (input_shape[1] / factor, input_shape[2] / factor);
    ensure!(
        h > 0 && w > 0,
        "{arch}: input {}x{} is too small (the network downsamples by {factor})",
        input_shape[1],
        input_shape[2]
    );
    Ok((h, w))
}

/// The blocks of an 18-layer ResNet: `layer1..layer4` of two blocks each, widths w, 2w, 4w,
/// 8w, the first block of stages 2-4 with stride 2. `block(path, cin, cout, stride)`.
pub fn resnet18_blocks<B>(
    p: &nn::Path,
    w: i64,
    mut block: impl FnMut(nn::Path, i64, i64, i64) -> B,
) -> Vec<B> {
    let mut blocks = Vec::new();
    let mut cin = w;
    for (stage, (planes, stride)) in [(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)]
        .into_iter()
        .enumerate()
    {
        let layer = p / format!("layer{}", stage + 1);
        for i in 0..2 {
            blocks.push(block(
                &layer / i,
                cin,
                planes,
                if i == 0 { stride } else { 1 },
            ));
            cin = planes;
        }
    }
    blocks
}

/// A residual block of the ResNet families, in training (`train`) or evaluation mode.
pub trait Block {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor;
    /// Appends the block's evaluation-mode layers to a bound graph after `x`.
    fn bound(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId>;
}

/// `x` through `blocks` in order: the residual stages every ResNet family runs after its stem.
pub fn through_blocks<B: Block>(blocks: &[B], x: Tensor, train: bool) -> Tensor {
    blocks.iter().fold(x, |out, b| b.forward(&out, train))
}

/// [`through_blocks`] in a bound graph.
pub fn bound_through_blocks<B: Block>(
    blocks: &[B],
    g: &mut BoundGraph,
    x: NodeId,
) -> Result<NodeId> {
    blocks.iter().try_fold(x, |out, b| b.bound(g, out))
}

/// A 3x3 or 1x1 convolution of the ResNet families (no bias, padding k/2), with the stride
/// and state-dict name its bound-graph layer needs.
pub struct ResConv {
    conv: nn::Conv2D,
    stride: i64,
    name: String,
}

/// Builds a [`ResConv`] under `p`.
pub fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> ResConv {
    let cfg = nn::ConvConfig {
        stride,
        padding: k / 2,
        bias: false,
        ..Default::default()
    };
    ResConv {
        name: path_name(&p),
        conv: nn::conv2d(p, cin, cout, k, cfg),
        stride,
    }
}

impl ResConv {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(x)
    }

    /// Appends the convolution to a bound graph after `x`.
    pub fn bound(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let padding = self.conv.ws.size()[2] / 2;
        bound_conv(g, x, &self.conv, self.stride, padding, &self.name)
    }
}

/// BatchNorm's ε (PyTorch's default), in the layer and in its bound-graph relaxation.
const BN_EPS: f64 = 1e-5;

/// A BatchNorm layer (PyTorch's defaults: momentum 0.1, ε 1e-5) with its state-dict name.
pub struct Bn {
    bn: nn::BatchNorm,
    name: String,
}

/// Builds a [`Bn`] of `c` channels under `p`.
pub fn bn(p: nn::Path, c: i64) -> Bn {
    let cfg = nn::BatchNormConfig {
        eps: BN_EPS,
        ..Default::default()
    };
    Bn {
        name: path_name(&p),
        bn: nn::batch_norm2d(p, c, cfg),
    }
}

impl Bn {
    /// Training mode (batch statistics; the running averages are updated) or evaluation mode
    /// (running statistics).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        nn::ModuleT::forward_t(&self.bn, x, train)
    }

    /// Appends the evaluation-mode layer, a per-channel affine map, after `x`.
    pub fn bound(&self, g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
        let b = &self.bn;
        g.batch_norm(
            x,
            b.ws.as_ref().map(Tensor::detach).as_ref(),
            b.bs.as_ref().map(Tensor::detach).as_ref(),
            &b.running_mean.detach(),
            &b.running_var.detach(),
            BN_EPS,
            &self.name,
        )
    }
}

/// The state-dict prefix of a path (`layer1.0.conv1`), naming bound-graph nodes.
fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// The features of the ResNet families: PyTorch's `F.avg_pool2d(x, k).flatten(1)` (tch's
/// `avg_pool2d_default` sums, hence the explicit call).
pub fn pooled_features(x: &Tensor, k: i64) -> Tensor {
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
        .flatten(1, -1)
}

/// Appends [`pooled_features`] (windows of `k`, stride `k`, no padding; floor mode, so the
/// depthwise convolution of the bound graph drops the same rows) after `x`.
pub fn bound_pooled_features(g: &mut BoundGraph, x: NodeId, k: i64) -> Result<NodeId> {
    let x = g.avg_pool(x, [k, k], [k, k], [0, 0], "avg_pool")?;
    bound_flatten(g, x)
}

/// Appends a convolution layer of stride `stride` and padding `padding` (as it was built).
pub fn bound_conv(
    g: &mut BoundGraph,
    x: NodeId,
    conv: &nn::Conv2D,
    stride: i64,
    padding: i64,
    label: &str,
) -> Result<NodeId> {
    let layer = Layer::Conv(Conv {
        weight: conv.ws.detach(),
        bias: conv.bs.as_ref().map(Tensor::detach),
        stride: [stride; 2],
        padding: [padding; 2],
        dilation: [1, 1],
        groups: 1,
    });
    g.push(layer, &[x], label)
}

/// Appends a linear layer.
pub fn bound_linear(
    g: &mut BoundGraph,
    x: NodeId,
    lin: &nn::Linear,
    label: &str,
) -> Result<NodeId> {
    let bias = lin.bs.as_ref().map_or_else(
        || Tensor::zeros([lin.ws.size()[0]], (Kind::Float, lin.ws.device())),
        Tensor::detach,
    );
    let layer = Layer::Linear {
        weight: lin.ws.detach(),
        bias,
    };
    g.push(layer, &[x], label)
}

/// Appends a ReLU.
pub fn bound_relu(g: &mut BoundGraph, x: NodeId, label: &str) -> Result<NodeId> {
    g.push(Layer::Relu, &[x], label)
}

/// Appends non-overlapping max pooling of kernel `k`.
pub fn bound_max_pool(g: &mut BoundGraph, x: NodeId, k: i64, label: &str) -> Result<NodeId> {
    g.push(Layer::MaxPool { kernel: [k, k] }, &[x], label)
}

/// Appends `flatten(1, -1)`.
pub fn bound_flatten(g: &mut BoundGraph, x: NodeId) -> Result<NodeId> {
    let n = g.node(x).numel();
    g.reshape(x, &[n], "flatten")
}

/// A native architecture with its weights, behind [`Classifier`].
pub struct NativeClassifier {
    /// Owns the weights the network's layers point to.
    vs: nn::VarStore,
    net: Box<dyn Network>,
    info: ModelInfo,
}

impl NativeClassifier {
    /// Builds `arch` (see [`build_network`]) with freshly initialised, trainable weights from
    /// libtorch's global RNG (wrap in [`crate::util::with_torch_seed`] for a reproducible start).
    pub fn new(
        arch: &str,
        input_shape: [i64; 3],
        num_classes: i64,
        device: Device,
    ) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let net = build_network(arch, &vs.root(), input_shape, num_classes)?;
        Ok(NativeClassifier {
            vs,
            net,
            info: ModelInfo {
                name: arch.to_owned(),
                format: format!("native:{arch}"),
                fingerprint: String::new(),
                num_classes,
                input_shape,
                has_features: true,
            },
        })
    }

    /// The weights, named as in the PyTorch `state_dict` (training updates and saves them).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Copies named tensors into the weights (see [`weights::load_into`]).
    pub fn load_weights(&self, tensors: Vec<(String, Tensor)>, source: &str) -> Result<()> {
        weights::load_into(&self.vs, tensors, source)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let s = x.size();
        ensure!(
            s.len() == 4 && s[1..] == self.info.input_shape[..],
            "{}: input of shape {s:?}, but the model was built for [N, {}, {}, {}]",
            self.info.name,
            self.info.input_shape[0],
            self.info.input_shape[1],
            self.info.input_shape[2]
        );
        Ok(())
    }

    fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x)?;
        Ok(self.net.features_t(x, train))
    }

    /// Logits in training (`train`) or evaluation mode.
    pub fn logits_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.net.head().forward(&self.features(x, train)?))
    }

    /// Saves a traced TorchScript module whose `forward(x)` returns the logits of the network
    /// as it is (a normalisation in front is not part of it; tch's tracer exports single-output methods only). Freezes the weights:
    /// tracing records them as constants.
    pub fn export_torchscript(&mut self, path: &Path) -> Result<()> {
        self.vs.freeze();
        let [c, h, w] = self.info.input_shape;
        let example = Tensor::full([1, c, h, w], 0.5, (Kind::Float, self.vs.device()));
        let mut err = None;
        let module = tch::no_grad(|| {
            tch::CModule::create_by_tracing(
                "Native",
                "forward",
                &[example],
                &mut |xs: &[Tensor]| {
                    vec![self.logits(&xs[0]).unwrap_or_else(|e| {
                        err = Some(e);
                        Tensor::new()
                    })]
                },
            )
        });
        if let Some(e) = err {
            return Err(e.context(format!("tracing {}", self.info.name)));
        }
        module
            .with_context(|| format!("tracing {}", self.info.name))?
            .save(path)
            .with_context(|| format!("writing TorchScript {}", path.display()))
    }
}

impl Classifier for NativeClassifier {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.logits_t(x, false)
    }

    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let f = self.features(x, false)?;
        let l = self.net.head().forward(&f);
        Ok(Some((f, l)))
    }

    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        let head = self.net.head();
        let b = head.bs.as_ref().map_or_else(
            || Tensor::zeros([head.ws.size()[0]], (Kind::Float, self.vs.device())),
            Tensor::shallow_clone,
        );
        Some((head.ws.detach(), b.detach()))
    }

    fn append_bound_graph(&self, g: &mut BoundGraph, input: NodeId) -> Result<NodeId> {
        let f = self
            .net
            .append_bound_graph(g, input)
            .with_context(|| format!("{} ({})", self.info.name, self.info.format))?;
        bound_linear(g, f, self.net.head(), "head")
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

/// Builds a native architecture and loads its weights (concrete type, for TorchScript export),
/// checked on `probe` (the probe batch as the network sees it). The spec's mean and std are
/// not applied here: [`super::load_classifier`] puts them in front.
pub fn load_native(
    spec: &ModelSpec,
    input_shape: [i64; 3],
    probe: &Tensor,
    fingerprint: String,
) -> Result<NativeClassifier> {
    let arch = spec.arch.as_deref().ok_or_else(|| {
        OptionError::new(
            "arch",
            format!(
                "a native model needs an architecture (one of {})",
                known_names()
            ),
        )
    })?;
    let num_classes = spec.num_classes.unwrap_or(10);
    let tensors = weights::read_tensors(&spec.path)?;
    let built = small_cnn::arch_for_weights(arch, &tensors).unwrap_or_else(|| arch.to_owned());
    // The initial weights, overwritten below, are drawn under the RNG's lock: unlocked draws
    // would land inside another thread's seeded section (a fit beside a server, parallel tests).
    let mut model = crate::util::with_torch_seed(0, || {
        NativeClassifier::new(&built, input_shape, num_classes, spec.device)
    })?;
    model
        .load_weights(tensors, &spec.path.display().to_string())
        .with_context(|| {
            format!(
                "{built} was built for inputs [{}, {}, {}] (from the data) and {num_classes} classes",
                input_shape[0], input_shape[1], input_shape[2]
            )
        })?;
    model.vs.freeze();
    model.info.name = super::name_from_path(&spec.path, arch);
    model.info.format = format!("native:{arch}");
    model.info.fingerprint = fingerprint;
    let logits = tch::no_grad(|| model.logits(probe))?;
    let k = super::probe_classes(&logits).with_context(|| format!("{arch}: probe"))?;
    ensure!(
        k == num_classes,
        "{arch}: probe gave {k} logits per sample, expected {num_classes}"
    );
    Ok(model)
}
