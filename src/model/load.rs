//! Picks the model format from the command line and builds the [`Classifier`].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tch::Device;

use super::checked::Checked;
use super::normalize::Normalizer;
use super::{native, onnx, torchscript::TorchScriptClassifier, Classifier};
use crate::util::sha256_file;

/// The model formats brittle reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum ModelFormat {
    /// `torch.jit` module (`.pt`, `.pth`, `.ts` without `--arch`).
    Torchscript,
    /// A native Rust architecture (`--arch`) with PyTorch (`.pt`, `.pth`, `.bin`) or safetensors weights.
    Native,
    /// An ONNX graph run with libtorch operations.
    Onnx,
}

/// Input layout an ONNX graph expects (pixels are always given to brittle as NCHW in [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum InputLayout {
    #[default]
    Nchw,
    Nhwc,
}

/// Everything needed to build a classifier.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub path: PathBuf,
    pub format: Option<ModelFormat>,
    /// Native architecture name (see [`native::ARCHITECTURES`]).
    pub arch: Option<String>,
    /// Number of classes of a native architecture (default: the dataset's).
    pub num_classes: Option<i64>,
    pub mean: Option<Vec<f64>>,
    pub std: Option<Vec<f64>>,
    pub input_layout: InputLayout,
    pub device: Device,
}

impl ModelSpec {
    /// A model file on `device` with every option at its default (format from the extension,
    /// no architecture, class count from the model, no normalisation, NCHW).
    pub fn new(path: impl Into<PathBuf>, device: Device) -> Self {
        ModelSpec {
            path: path.into(),
            format: None,
            arch: None,
            num_classes: None,
            mean: None,
            std: None,
            input_layout: InputLayout::Nchw,
            device,
        }
    }

    /// The format, from `--format`, else `--arch`, else the file extension.
    pub fn resolved_format(&self) -> Result<ModelFormat> {
        if let Some(f) = self.format {
            return Ok(f);
        }
        if self.arch.is_some() {
            return Ok(ModelFormat::Native);
        }
        let ext = self
            .path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "onnx" => Ok(ModelFormat::Onnx),
            "pt" | "pth" | "ts" | "jit" => Ok(ModelFormat::Torchscript),
            "safetensors" => bail!(
                "{}: safetensors holds weights only; name the architecture with --arch",
                self.path.display()
            ),
            _ => bail!(
                "{}: cannot tell the model format from the extension; pass --format",
                self.path.display()
            ),
        }
    }

    /// sha256 of the file and of every option that changes the function the model computes.
    pub fn fingerprint(&self) -> Result<String> {
        let file = sha256_file(&self.path)?;
        let opts = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}",
            self.resolved_format()?,
            self.arch,
            self.mean,
            self.std,
            self.input_layout
        );
        Ok(crate::util::sha256_hex([file.as_bytes(), opts.as_bytes()]))
    }
}

/// Builds the classifier for inputs of shape `[C, H, W]` (models are probed once at load),
/// wrapped in [`Checked`] so that no format's NaN or integer logits reach a caller.
pub fn load_classifier(spec: &ModelSpec, input_shape: [i64; 3]) -> Result<Box<dyn Classifier>> {
    if !spec.path.exists() {
        bail!("model file {} does not exist", spec.path.display());
    }
    let fingerprint = spec.fingerprint()?;
    let normalizer = Normalizer::new(
        spec.mean.as_deref(),
        spec.std.as_deref(),
        input_shape[0],
        spec.device,
    )?;
    let model: Result<Box<dyn Classifier>> = match spec.resolved_format()? {
        ModelFormat::Torchscript => TorchScriptClassifier::load(
            &spec.path,
            normalizer,
            spec.device,
            input_shape,
            fingerprint,
        )
        .map(|m| Box::new(m) as Box<dyn Classifier>),
        ModelFormat::Native => native::load_native(spec, normalizer, input_shape, fingerprint)
            .map(|m| Box::new(m) as Box<dyn Classifier>),
        ModelFormat::Onnx => onnx::load(spec, normalizer, input_shape, fingerprint),
    };
    let model = model.with_context(|| format!("loading model {}", spec.path.display()))?;
    Ok(Box::new(Checked(model)))
}
