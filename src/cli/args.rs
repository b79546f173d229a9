//! Options shared by several subcommands: the model, the data, the device.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::hints::{FlagHint, Flags};
use super::values::enum_parser;
use crate::data::{DataFormat, DataSpec, Dataset};
use crate::model::normalize::parse_channel_values;
use crate::model::sanity::{self, Configured, SanityError};
use crate::model::{
    device, load_classifier, Classifier, DeviceChoice, InputLayout, ModelFormat, ModelOption,
    ModelSpec, OptionError,
};

/// One value per channel; an alias so that clap parses `0.1,0.2,0.3` as one value, not as a
/// list of values (which it does for a field typed `Option<Vec<_>>`).
pub type ChannelValues = Vec<f64>;

/// Which model to load and where to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model file: TorchScript `.pt`, ONNX `.onnx`, or weights (`.pt`/`.pth`/`.safetensors`) with `--arch`.
    #[arg(long)]
    pub model: PathBuf,
    /// Model format (default: from `--arch` and the file extension).
    #[arg(long, value_parser = enum_parser::<ModelFormat>())]
    pub model_format: Option<ModelFormat>,
    /// Native architecture for a weights file.
    #[arg(long)]
    pub arch: Option<String>,
    /// Classes of a native architecture (default: the dataset's).
    #[arg(long)]
    pub num_classes: Option<i64>,
    /// Per-channel mean subtracted inside the model, e.g. `0.4914,0.4822,0.4465`.
    #[arg(long, value_parser = parse_channel_values)]
    pub mean: Option<ChannelValues>,
    /// Per-channel std divided inside the model, e.g. `0.2471,0.2435,0.2616`.
    #[arg(long, value_parser = parse_channel_values)]
    pub std: Option<ChannelValues>,
    /// Input layout the (ONNX) model expects.
    #[arg(long, value_parser = enum_parser::<InputLayout>(), default_value = "nchw")]
    pub input_layout: InputLayout,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// libtorch intra-op threads (0: the CPUs this process may use, by affinity and cgroup quota).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Run even when the first batch of labelled data looks like a wrong input normalisation
    /// (accuracy near chance, or clearly better with the other normalisation); a warning
    /// remains. For the commands with labels (score, margins, fit, eval-pgd); serve has none.
    #[arg(long)]
    pub allow_low_accuracy: bool,
}

/// [`load_classifier`], naming the flag of the model option an error is about.
pub fn load_model(spec: &ModelSpec, input_shape: [i64; 3]) -> Result<Box<dyn Classifier>> {
    load_classifier(spec, input_shape).map_err(|err| {
        let option = err
            .chain()
            .find_map(|e| e.downcast_ref::<OptionError>())
            .map(|e| e.option);
        let flag = match option {
            None => return err,
            Some(ModelOption::Format) => "--model-format",
            Some(ModelOption::Arch) => "--arch",
            Some(ModelOption::Mean) => "--mean",
            Some(ModelOption::Std) => "--std",
            Some(ModelOption::InputLayout) => "--input-layout",
        };
        err.context(format!("check {flag}"))
    })
}

impl ModelArgs {
    /// Sets the thread count and resolves the device.
    pub fn spec(&self, dataset_classes: Option<i64>) -> Result<ModelSpec> {
        device::set_threads(self.threads);
        Ok(ModelSpec {
            path: self.model.clone(),
            format: self.model_format,
            arch: self.arch.clone(),
            num_classes: self.num_classes.or(dataset_classes),
            mean: self.mean.clone(),
            std: self.std.clone(),
            input_layout: self.input_layout,
            device: self.device.resolve().context("check --device")?,
        })
    }

    /// Loads the model for the dataset's input shape, checks the class count agrees and runs
    /// the first-batch check ([`sanity`]) on `data`'s labels.
    pub fn load_for(&self, data: &Dataset) -> Result<Box<dyn Classifier>> {
        let model = load_model(&self.spec(Some(data.num_classes))?, data.input_shape())?;
        let k = model.info().num_classes;
        if k < data.num_classes {
            anyhow::bail!(
                "{}: the model has {k} classes but {} has labels up to {}",
                self.model.display(),
                data.source,
                data.num_classes - 1
            );
        }
        self.first_batch_check(model.as_ref(), data)?;
        Ok(model)
    }

    /// [`sanity::check_first_batch`] with the flag hints: a [`SanityError`] stops the command
    /// unless `--allow-low-accuracy`, and a weaker concern is printed as a warning.
    fn first_batch_check(&self, model: &dyn Classifier, data: &Dataset) -> Result<()> {
        let configured = match (&self.mean, &self.std) {
            (None, None) => Configured::None,
            (m, s) => Configured::MeanStd {
                mean: m.clone().unwrap_or_else(|| vec![0.0]),
                std: s.clone().unwrap_or_else(|| vec![1.0]),
            },
        };
        let hint = match configured {
            Configured::None => "pass the --mean/--std the model was trained with",
            Configured::MeanStd { .. } => {
                "drop --mean/--std if the model normalises its input itself, or check their values"
            }
        };
        match sanity::check_first_batch(model, data, &configured) {
            Ok(report) => {
                if let Some(concern) = report.concern() {
                    eprintln!("warning: {}: {concern} ({hint})", self.model.display());
                }
                Ok(())
            }
            Err(e) if e.downcast_ref::<SanityError>().is_some() => {
                if self.allow_low_accuracy {
                    eprintln!("warning: {e} (continuing: --allow-low-accuracy)");
                    Ok(())
                } else {
                    bail!(
                        "{e}\n{hint}; --allow-low-accuracy runs anyway (on {})",
                        data.source
                    )
                }
            }
            Err(e) => Err(e.context(format!(
                "checking {} on the first samples of {}",
                self.model.display(),
                data.source
            ))),
        }
    }
}

/// Which samples to read.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Image file: CIFAR binary `.bin`, MNIST IDX (`*-images-idx3-ubyte[.gz]`), `.npy` or `.npz`.
    #[arg(long)]
    pub data: PathBuf,
    /// Data format (default: from the file name).
    #[arg(long, value_parser = enum_parser::<DataFormat>())]
    pub data_format: Option<DataFormat>,
    /// Labels file for IDX or NPY images (default: found beside the images).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Skip this many samples.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Read at most this many samples.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// The flags of [`DataSpec`]'s fields.
const DATA_FLAGS: Flags = &[
    ("labels", "--labels"),
    ("format", "--data-format"),
    ("offset", "--offset"),
    ("limit", "--limit"),
];

impl DataArgs {
    pub fn load(&self) -> Result<Dataset> {
        DataSpec {
            path: self.data.clone(),
            format: self.data_format,
            labels: self.labels.clone(),
            offset: self.offset,
            limit: self.limit,
        }
        .load()
        .flag_hint(DATA_FLAGS)
    }
}

/// Checks an ε-like value (`8/255` or `0.5`) at parse time and keeps its text, for flags whose
/// text labels the output (`analyze --eps`, `demo --eps`).
pub fn eps_text(s: &str) -> Result<String> {
    crate::norm::parse_eps(s)?;
    Ok(s.trim().to_string())
}
