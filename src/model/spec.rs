//! What to load: the model file, its format and the options that change the function it
//! computes. No format depends on another through these types; [`super::load`] dispatches.

use std::path::PathBuf;

use anyhow::Result;
use tch::Device;

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

impl InputLayout {
    /// The lowercase name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            InputLayout::Nchw => "nchw",
            InputLayout::Nhwc => "nhwc",
        }
    }
}

/// The model options a caller sets; errors name the one at fault so that a front end can name
/// its own setting for it (a command-line flag, a keyword argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelOption {
    Format,
    Arch,
    Mean,
    Std,
    InputLayout,
}

impl ModelOption {
    /// The concept, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ModelOption::Format => "model format",
            ModelOption::Arch => "architecture",
            ModelOption::Mean => "mean",
            ModelOption::Std => "std",
            ModelOption::InputLayout => "input layout",
        }
    }
}

/// A model option that does not fit the model file or the data.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OptionError {
    pub option: ModelOption,
    pub message: String,
}

impl OptionError {
    pub fn new(option: ModelOption, message: String) -> Self {
        OptionError { option, message }
    }
}

/// Everything needed to build a classifier.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub path: PathBuf,
    pub format: Option<ModelFormat>,
    /// Native architecture name (see [`super::native::ARCHITECTURES`]).
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

    /// The format as given, else native when an architecture is named, else from the file
    /// extension.
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
            "safetensors" => Err(OptionError::new(
                ModelOption::Arch,
                format!(
                    "{}: safetensors holds weights only; name the architecture",
                    self.path.display()
                ),
            )
            .into()),
            _ => Err(OptionError::new(
                ModelOption::Format,
                format!(
                    "{}: cannot tell the model format from the extension; name the model format",
                    self.path.display()
                ),
            )
            .into()),
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
