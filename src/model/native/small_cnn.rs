//! `small-cnn`: a small, fast CNN for MNIST-sized inputs, trained by `brittle train`.
//!
//! `conv1 (3x3, w) → ReLU → maxpool 2 → conv2 (3x3, 2w) → ReLU → maxpool 2 → fc1 (4w) → ReLU → fc2 (K)`,
//! with PyTorch state-dict names (`conv1.weight`, …, `fc2.bias`) so the same safetensors file
//! loads in `torch.nn` code. No batch norm or dropout, so training and evaluation compute the
//! same function (adversarial training attacks exactly the model that is later evaluated).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::model::normalize::Normalizer;
use crate::model::{Classifier, ModelInfo, ModelSpec};

/// The `--arch` name.
pub const ARCH: &str = "small-cnn";
/// Channels of the first convolution unless a weights file says otherwise.
pub const DEFAULT_WIDTH: i64 = 32;

/// The shape of a small CNN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SmallCnnConfig {
    /// `[C, H, W]` of the inputs.
    pub input_shape: [i64; 3],
    pub num_classes: i64,
    /// Channels of `conv1`; `conv2` has `2 * width`, `fc1` has `4 * width` units.
    pub width: i64,
}

impl SmallCnnConfig {
    fn flat_dim(&self) -> i64 {
        2 * self.width * (self.input_shape[1] / 4) * (self.input_shape[2] / 4)
    }

    /// Parameter names and shapes, in state-dict order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (c, w, k) = (self.input_shape[0], self.width, self.num_classes);
        vec![
            ("conv1.weight".into(), vec![w, c, 3, 3]),
            ("conv1.bias".into(), vec![w]),
            ("conv2.weight".into(), vec![2 * w, w, 3, 3]),
            ("conv2.bias".into(), vec![2 * w]),
            ("fc1.weight".into(), vec![4 * w, self.flat_dim()]),
            ("fc1.bias".into(), vec![4 * w]),
            ("fc2.weight".into(), vec![k, 4 * w]),
            ("fc2.bias".into(), vec![k]),
        ]
    }
}

/// The network, its weights and the optional input normalisation.
pub struct SmallCnn {
    /// The weights, public so that training can update them and save them.
    pub vs: nn::VarStore,
    pub config: SmallCnnConfig,
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
    normalizer: Option<Normalizer>,
    info: ModelInfo,
}

impl SmallCnn {
    /// A freshly initialised network (PyTorch's default Kaiming-uniform init, from libtorch's
    /// global RNG: call `tch::manual_seed` first for a reproducible start).
    pub fn new(
        config: SmallCnnConfig,
        normalizer: Option<Normalizer>,
        device: Device,
    ) -> Result<Self> {
        let [_, h, w] = config.input_shape;
        if config.width <= 0 || config.num_classes <= 1 || h < 4 || w < 4 {
            bail!("{ARCH}: unsupported shape {config:?} (need width > 0, >= 2 classes, H, W >= 4)");
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let conv = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let conv1 = nn::conv2d(
            &root / "conv1",
            config.input_shape[0],
            config.width,
            3,
            conv,
        );
        let conv2 = nn::conv2d(&root / "conv2", config.width, 2 * config.width, 3, conv);
        let fc1 = nn::linear(
            &root / "fc1",
            config.flat_dim(),
            4 * config.width,
            Default::default(),
        );
        let fc2 = nn::linear(
            &root / "fc2",
            4 * config.width,
            config.num_classes,
            Default::default(),
        );
        let info = ModelInfo {
            name: ARCH.into(),
            format: format!("native:{ARCH}"),
            fingerprint: String::new(),
            num_classes: config.num_classes,
            input_shape: config.input_shape,
            has_features: true,
        };
        Ok(SmallCnn {
            vs,
            config,
            conv1,
            conv2,
            fc1,
            fc2,
            normalizer,
            info,
        })
    }

    /// Sets the name and fingerprint reported by [`Classifier::info`].
    pub fn set_identity(&mut self, name: String, fingerprint: String) {
        self.info.name = name;
        self.info.fingerprint = fingerprint;
    }

    /// Penultimate features `[N, 4w]` and logits `[N, K]`.
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let x = match &self.normalizer {
            Some(n) => n.apply(x),
            None => x.shallow_clone(),
        };
        let f = x
            .apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu();
        let logits = self.fc2.forward(&f);
        (f, logits)
    }

    /// Saves a traced TorchScript module whose `forward(x)` returns the logits, normalisation
    /// included (tch's tracer exports single-output methods only). Freezes the weights:
    /// tracing records them as constants.
    pub fn export_torchscript(&mut self, path: &Path) -> Result<()> {
        self.vs.freeze();
        let [c, h, w] = self.config.input_shape;
        let example = Tensor::full([1, c, h, w], 0.5, (Kind::Float, self.vs.device()));
        let module = tch::no_grad(|| {
            tch::CModule::create_by_tracing(
                "SmallCnn",
                "forward",
                &[example],
                &mut |xs: &[Tensor]| vec![self.forward(&xs[0]).1],
            )
        })
        .with_context(|| format!("tracing {ARCH}"))?;
        module
            .save(path)
            .with_context(|| format!("writing TorchScript {}", path.display()))
    }

    /// Copies named tensors into the weights, checking every name and shape.
    pub fn load_tensors(&mut self, tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
        let mut vars = self.vs.variables();
        for (name, shape) in self.config.parameter_shapes() {
            let src = tensors
                .get(&name)
                .with_context(|| format!("{source}: missing tensor {name:?}"))?;
            if src.size() != shape {
                bail!(
                    "{source}: tensor {name:?} has shape {:?}, {ARCH} {:?} expects {shape:?}",
                    src.size(),
                    self.config
                );
            }
            let dst = vars
                .get_mut(&name)
                .with_context(|| format!("{ARCH}: no parameter {name:?}"))?;
            tch::no_grad(|| dst.f_copy_(&src.to_kind(Kind::Float)))?;
        }
        Ok(())
    }

    /// Builds the network described by a safetensors file (width and classes read from it)
    /// and loads its weights.
    pub fn from_safetensors(
        path: &Path,
        input_shape: [i64; 3],
        normalizer: Option<Normalizer>,
        device: Device,
    ) -> Result<Self> {
        let tensors = read_safetensors(path)?;
        let dim0 = |name: &str| -> Result<i64> {
            tensors
                .get(name)
                .and_then(|t| t.size().first().copied())
                .with_context(|| {
                    format!(
                        "{}: missing tensor {name:?}; not {ARCH} weights",
                        path.display()
                    )
                })
        };
        let config = SmallCnnConfig {
            input_shape,
            num_classes: dim0("fc2.weight")?,
            width: dim0("conv1.weight")?,
        };
        let mut me = SmallCnn::new(config, normalizer, device)?;
        me.load_tensors(&tensors, &path.display().to_string())?;
        Ok(me)
    }
}

/// All named tensors of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading safetensors {}", path.display()))?
        .into_iter()
        .collect())
}

/// `--arch small-cnn --model w.safetensors`: the class count comes from the weights and must
/// agree with `--num-classes` when given.
pub fn load(
    spec: &ModelSpec,
    normalizer: Option<Normalizer>,
    input_shape: [i64; 3],
    fingerprint: String,
) -> Result<Box<dyn Classifier>> {
    let ext = spec
        .path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if ext.as_deref() != Some("safetensors") {
        bail!(
            "{}: {ARCH} weights are read from .safetensors files",
            spec.path.display()
        );
    }
    let mut model = SmallCnn::from_safetensors(&spec.path, input_shape, normalizer, spec.device)?;
    if let Some(k) = spec.num_classes {
        if k > model.config.num_classes {
            bail!(
                "{}: the weights have {} classes but {k} were asked for",
                spec.path.display(),
                model.config.num_classes
            );
        }
    }
    let name = spec
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| ARCH.into());
    model.set_identity(name, fingerprint);
    Ok(Box::new(model))
}

impl Classifier for SmallCnn {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x).1)
    }

    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        Ok(Some(self.forward(x)))
    }

    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        let b = self.fc2.bs.as_ref()?;
        Some((self.fc2.ws.detach(), b.detach()))
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}
