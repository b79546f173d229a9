//! `brittle._brittle`: the Rust side of the Python package. Thin on purpose: a [`Model`] built
//! from an `nn.Module` or a model file, and a few functions that run the library's jobs and
//! write the same files as the CLI; `brittle/__init__.py` turns them into DataFrames and dicts.

mod api;
mod module;

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Device, Kind, Tensor};

use api::*;
use module::{Interruptible, PyModuleClassifier};

create_exception!(
    _brittle,
    BrittleError,
    PyRuntimeError,
    "An error of the brittle library (bad model, data, file or settings)."
);

/// A Python exception raised inside the job (KeyboardInterrupt, the module's own error) comes
/// back as itself, through any context the library added; any other error becomes a
/// [`BrittleError`] with its whole chain of causes.
fn to_py(e: anyhow::Error) -> PyErr {
    match e.downcast::<PyErr>() {
        Ok(p) => p,
        Err(e) => BrittleError::new_err(format!("{e:#}")),
    }
}

/// Runs `f` with the GIL released, as libtorch's autograd engine requires (it refuses to run
/// under the GIL); the module callback and the signal check take the GIL back when they need it.
fn without_gil<T>(py: Python<'_>, f: impl FnOnce() -> T) -> T {
    /// `f` runs on this very thread, synchronously, and touches Python objects only through
    /// `Python::with_gil`; `allow_threads` asks for `Send` only to rule out unguarded access.
    struct SameThread<F>(F);
    unsafe impl<F> Send for SameThread<F> {}
    let f = SameThread(f);
    let out = py.allow_threads(move || {
        let f = f;
        SameThread((f.0)())
    });
    out.0
}

fn parse_device(s: &str) -> anyhow::Result<Device> {
    s.parse::<DeviceChoice>()?.resolve()
}

/// A classifier for brittle: an `nn.Module` called back, or a model file loaded by the library.
#[pyclass(unsendable)]
struct Model {
    classifier: Box<dyn Classifier>,
    /// `mean`/`std` applied in front of a model file (the first-batch check tries without).
    mean_std: Option<(Vec<f64>, Vec<f64>)>,
}

impl Model {
    fn new(classifier: Box<dyn Classifier>, mean_std: Option<(Vec<f64>, Vec<f64>)>) -> Self {
        Model {
            classifier: Box::new(Interruptible(classifier)),
            mean_std,
        }
    }

    fn configured(&self) -> Configured {
        match &self.mean_std {
            None => Configured::None,
            Some((mean, std)) => Configured::MeanStd {
                mean: mean.clone(),
                std: std.clone(),
            },
        }
    }
}

#[pymethods]
impl Model {
    /// `module(x)` must return logits `[N, K]`; `probe` is a few samples of the data (the
    /// class count is read from them).
    #[staticmethod]
    fn from_module(
        module: Py<PyAny>,
        device: &str,
        name: String,
        fingerprint: String,
        probe: PyTensor,
    ) -> PyResult<Model> {
        let build = || -> anyhow::Result<Model> {
            let m =
                PyModuleClassifier::new(module, parse_device(device)?, name, fingerprint, &probe)?;
            Ok(Model::new(Box::new(Guarded(Box::new(m))), None))
        };
        build().map_err(to_py)
    }

    /// A TorchScript `.pt`, an `.onnx`, or weights with `arch` (native architectures), as
    /// `brittle margins --model` loads it.
    #[staticmethod]
    #[pyo3(signature = (path, device, input_shape, arch=None, num_classes=None, mean=None, std=None))]
    fn from_file(
        path: PathBuf,
        device: &str,
        input_shape: [i64; 3],
        arch: Option<String>,
        num_classes: Option<i64>,
        mean: Option<Vec<f64>>,
        std: Option<Vec<f64>>,
    ) -> PyResult<Model> {
        let build = || -> anyhow::Result<Model> {
            let mut spec = ModelSpec::new(path, parse_device(device)?);
            spec.arch = arch;
            spec.num_classes = num_classes;
            let mean_std = match (&mean, &std) {
                (None, None) => None,
                (m, s) => Some((
                    m.clone().unwrap_or_else(|| vec![0.0]),
                    s.clone().unwrap_or_else(|| vec![1.0]),
                )),
            };
            spec.mean = mean;
            spec.std = std;
            Ok(Model::new(load_classifier(&spec, input_shape)?, mean_std))
        };
        build().map_err(to_py)
    }

    /// [`ModelInfo`] as JSON.
    fn info(&self) -> PyResult<String> {
        serde_json::to_string(self.classifier.info())
            .map_err(|e| BrittleError::new_err(e.to_string()))
    }

    /// `cpu` or `cuda:N`.
    fn device(&self) -> String {
        match self.classifier.device() {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        }
    }
}

/// A dataset of CPU float images `[N, C, H, W]` in `[0, 1]`; without labels, the model's
/// predictions (margins are measured to the predicted label).
fn dataset(
    model: &dyn Classifier,
    x: &Tensor,
    y: Option<Vec<i64>>,
    source: &str,
) -> anyhow::Result<Dataset> {
    let x = x.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let n = x.size().first().copied().unwrap_or(0);
    let labels = match y {
        Some(y) => y,
        None => {
            let mut y = Vec::with_capacity(n as usize);
            for start in (0..n).step_by(256) {
                let len = (n - start).min(256);
                let xb = x.narrow(0, start, len).to_device(model.device());
                let pred = logits_no_grad(model, &xb)?
                    .argmax(1, false)
                    .to_device(Device::Cpu);
                y.extend(Vec::<i64>::try_from(&pred)?);
            }
            y
        }
    };
    let classes = model.info().num_classes;
    Dataset::new(
        x,
        labels,
        classes,
        (0..n as usize).collect(),
        source.to_string(),
    )
}

/// The first-batch check of the CLI (accuracy near chance or better with other normalisation
/// stops the run) on labelled data.
fn first_batch_check(
    model: &Model,
    data: &Dataset,
    allow_low_accuracy: bool,
) -> anyhow::Result<()> {
    match check_first_batch(model.classifier.as_ref(), data, &model.configured()) {
        Err(e) if e.downcast_ref::<SanityError>().is_some() && !allow_low_accuracy => Err(e.context(
            "the model looks wrongly normalised for these inputs (give mean/std, or allow_low_accuracy=True)",
        )),
        Err(e) if e.downcast_ref::<SanityError>().is_none() => Err(e),
        _ => Ok(()),
    }
}

/// Runs (or resumes) the margins job of `brittle margins` on `x`, writing `out` and its sidecar.
#[pyfunction]
#[pyo3(signature = (model, x, y, out, norm, attack, steps, topk, effort, batch_size, chunk, seed, target_true, progress, source, allow_low_accuracy))]
#[allow(clippy::too_many_arguments)]
fn margins(
    py: Python<'_>,
    model: &Model,
    x: PyTensor,
    y: Option<Vec<i64>>,
    out: PathBuf,
    norm: &str,
    attack: &str,
    steps: Option<usize>,
    topk: i64,
    effort: usize,
    batch_size: usize,
    chunk: Option<usize>,
    seed: u64,
    target_true: bool,
    progress: bool,
    source: &str,
    allow_low_accuracy: bool,
) -> PyResult<()> {
    let run = || -> anyhow::Result<()> {
        let m = model.classifier.as_ref();
        let labelled = y.is_some();
        let data = dataset(m, &x, y, source)?;
        if labelled {
            first_batch_check(model, &data, allow_low_accuracy)?;
        }
        let norm: Norm = norm.parse()?;
        let attack: AttackKind = from_name("attack", attack)?;
        let options = MarginsOptions {
            steps,
            topk,
            effort,
            seed,
            target_true,
            batch_size,
            chunk: chunk.unwrap_or(4 * batch_size),
            ..MarginsOptions::new(norm, attack)
        }
        .check()?;
        let output = || MarginsOutput {
            margins: &out,
            save_adv: None,
            restart_stale: false,
        };
        if progress {
            let bar = work_bar(attack.as_str());
            let r = run_margins_job(m, &data, &options, output(), &bar);
            bar.finish_and_clear();
            r.map(|_| ())
        } else {
            run_margins_job(m, &data, &options, output(), &NoProgress).map(|_| ())
        }
    };
    without_gil(py, run).map_err(to_py)
}

/// The free scores of `brittle score`, written as its CSV to `out`.
#[pyfunction]
#[pyo3(signature = (model, x, y, out, norm, batch_size, source))]
#[allow(clippy::too_many_arguments)]
fn scores(
    py: Python<'_>,
    model: &Model,
    x: PyTensor,
    y: Option<Vec<i64>>,
    out: PathBuf,
    norm: &str,
    batch_size: usize,
    source: &str,
) -> PyResult<()> {
    let run = || -> anyhow::Result<()> {
        let m = model.classifier.as_ref();
        let data = dataset(m, &x, y, source)?;
        let opts = ScoreOptions {
            batch_size,
            norm: norm.parse()?,
        }
        .check()?;
        let (rows, _) = score_dataset(m, None, &data, &opts, &NoProgress)?;
        let file = std::fs::File::create(&out)?;
        write_scores_csv(std::io::BufWriter::new(file), &rows, &[], |_| Vec::new())
    };
    without_gil(py, run).map_err(to_py)
}

/// A library enum from the name the CLI's flags take (`"best"`, `"auto"`), through the same
/// `FromStr` the CLI's parser uses; an unknown name lists the valid ones.
fn from_name<T: std::str::FromStr + strum::VariantNames>(
    what: &str,
    name: &str,
) -> anyhow::Result<T> {
    name.parse().map_err(|_| {
        anyhow::anyhow!(
            "unknown {what} {name:?} (one of {})",
            T::VARIANTS.join(", ")
        )
    })
}

/// `brittle fit` on in-memory data: a detector fitted on `margins` (rows of `x`), saved to `out`.
#[pyfunction]
#[pyo3(signature = (model, x, y, margins, out, eps, norm, pseudo, target_tpr, seed, batch_size, source))]
#[allow(clippy::too_many_arguments)]
fn fit(
    py: Python<'_>,
    model: &Model,
    x: PyTensor,
    y: Vec<i64>,
    margins: PathBuf,
    out: PathBuf,
    eps: &str,
    norm: &str,
    pseudo: &str,
    target_tpr: f64,
    seed: u64,
    batch_size: usize,
    source: &str,
) -> PyResult<()> {
    let run = || -> anyhow::Result<()> {
        let m = model.classifier.as_ref();
        let data = dataset(m, &x, Some(y), source)?;
        let rows = read_margins(&margins)?;
        let norm: Norm = norm.parse()?;
        let eps = parse_eps(eps)?;
        let opts = FitOptions {
            eps,
            norm,
            target_tpr,
            pseudo: from_name("pseudo mode", pseudo)?,
            train: TrainConfig::default().check()?,
            val_fraction: 0.3,
            seed,
            batch_size,
            margins_name: margins.display().to_string(),
        }
        .check()?;
        fit_detector(m, &data, &rows, &opts, Provenance::current(Some(seed)))?.save(&out)
    };
    without_gil(py, run).map_err(to_py)
}

/// `brittle score --detector`: the free scores CSV written to `out`; returns each sample's
/// decision and pseudo-margin.
#[pyfunction]
#[pyo3(signature = (model, x, detector, out, batch_size, source))]
fn flag(
    py: Python<'_>,
    model: &Model,
    x: PyTensor,
    detector: PathBuf,
    out: PathBuf,
    batch_size: usize,
    source: &str,
) -> PyResult<(Vec<bool>, Vec<Option<f64>>)> {
    let run = || -> anyhow::Result<(Vec<bool>, Vec<Option<f64>>)> {
        let m = model.classifier.as_ref();
        let det = Detector::load(&detector, m.device())?;
        det.check_model(m.info())?;
        let data = dataset(m, &x, None, source)?;
        let opts = ScoreOptions {
            batch_size,
            norm: det.spec.norm,
        }
        .check()?;
        let (rows, decisions) = score_dataset(m, Some(&det), &data, &opts, &NoProgress)?;
        let file = std::fs::File::create(&out)?;
        write_scores_csv(std::io::BufWriter::new(file), &rows, &[], |_| Vec::new())?;
        Ok(decisions
            .iter()
            .map(|d| (d.brittle, d.pseudo_margin))
            .unzip())
    };
    without_gil(py, run).map_err(to_py)
}

/// Runs a `brittle` command line (`argv` without the program name), e.g. `analyze`: the door
/// for the stages that need no model callback, so that they behave exactly as the CLI's.
#[pyfunction]
fn cli(argv: Vec<String>) -> PyResult<()> {
    use clap::Parser;
    let cli = Cli::try_parse_from(std::iter::once("brittle".to_string()).chain(argv))
        .map_err(|e| BrittleError::new_err(e.to_string()))?;
    run_cli(cli).map_err(to_py)
}

#[pymodule]
fn _brittle(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(margins, m)?)?;
    m.add_function(wrap_pyfunction!(scores, m)?)?;
    m.add_function(wrap_pyfunction!(fit, m)?)?;
    m.add_function(wrap_pyfunction!(flag, m)?)?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    m.add("BrittleError", m.py().get_type::<BrittleError>())?;
    m.add("TORCH_VERSION", "2.13.0")?;
    Ok(())
}
