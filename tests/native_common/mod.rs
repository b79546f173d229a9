//! Helpers shared by the model tests.

use std::path::{Path, PathBuf};

use brittle::model::load::{InputLayout, ModelSpec};
use tch::{Device, Kind, Tensor};

/// A file of `tests/fixtures/native`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/native")
        .join(name)
}

/// A CPU model spec with 10 classes.
pub fn spec(
    path: PathBuf,
    arch: Option<&str>,
    mean: Option<Vec<f64>>,
    std: Option<Vec<f64>>,
) -> ModelSpec {
    ModelSpec {
        path,
        format: None,
        arch: arch.map(str::to_owned),
        num_classes: Some(10),
        mean,
        std,
        input_layout: InputLayout::Nchw,
        device: Device::Cpu,
    }
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Fraction of rows whose argmax is the label.
pub fn accuracy(logits: &Tensor, labels: &[i64]) -> f64 {
    logits
        .argmax(1, false)
        .eq_tensor(&Tensor::from_slice(labels))
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}
