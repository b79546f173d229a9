//! Shared by the integration tests: the real data of `../shared`, model specs and fixture paths,
//! tensor comparisons, and a linear classifier whose logits are rescaled per class (deliberately
//! margin-inconsistent) with exact input margins.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use brittle::data::{DataSpec, Dataset};
use brittle::margins::MarginRow;
use brittle::model::ModelSpec;
use brittle::model::{Classifier, ModelInfo};
use brittle::norm::Norm;
use brittle::score::{feature_margin, free_scores};
use tch::{Device, Kind, Tensor};

/// `../shared` beside the repository. The tests that call it are `#[ignore = "needs ../shared
/// ..."]` and run with `--ignored` (scripts/test does when ../shared exists), so its absence
/// fails them: a skip that passes would read as a pass.
pub fn shared() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        p.join("models/manifest.json").exists(),
        "{} is absent: this test needs the real CIFAR-10 models and pool of ../shared",
        p.display()
    );
    p
}

/// Keeps libtorch on one intra-op thread in the calling test until dropped.
///
/// libtorch's `set_num_threads` sets the calling thread's OpenMP count, and also the default that
/// threads adopt at their first parallel op; in one test binary, a bare `tch::set_num_threads(1)`
/// left every test started after it on one thread. The first guard saves the default and the last
/// one to drop restores it. Reading the count at once pins this thread to one (a count set by
/// another thread in between would otherwise be adopted at this thread's first parallel op).
pub fn one_torch_thread() -> OneTorchThread {
    let mut state = TORCH_THREADS.lock().unwrap_or_else(|e| e.into_inner());
    if state.0 == 0 {
        state.1 = std::thread::spawn(tch::get_num_threads).join().unwrap();
    }
    state.0 += 1;
    tch::set_num_threads(1);
    if tch::get_num_threads() != 1 {
        tch::set_num_threads(1);
    }
    OneTorchThread(())
}

/// Active guards and the default thread count they restore.
static TORCH_THREADS: std::sync::Mutex<(usize, i32)> = std::sync::Mutex::new((0, 0));

/// See [`one_torch_thread`].
pub struct OneTorchThread(());

impl Drop for OneTorchThread {
    fn drop(&mut self) {
        let mut state = TORCH_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            tch::set_num_threads(state.1);
        }
    }
}

/// `shared/models/manifest.json`.
pub fn manifest(shared: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(shared.join("models/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The 705 real CIFAR-10 test images of `shared/data/cifar10/real-pool.bin`.
pub fn real_pool(shared: &Path) -> Dataset {
    DataSpec {
        path: shared.join("data/cifar10/real-pool.bin"),
        ..Default::default()
    }
    .load()
    .unwrap()
}

/// A file of `tests/fixtures/native`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/native")
        .join(name)
}

/// A CPU model spec with 10 classes (ignored by TorchScript and ONNX, which read it off the model).
pub fn spec(
    path: PathBuf,
    arch: Option<&str>,
    mean: Option<Vec<f64>>,
    std: Option<Vec<f64>>,
) -> ModelSpec {
    ModelSpec {
        arch: arch.map(str::to_owned),
        num_classes: Some(10),
        mean,
        std,
        ..ModelSpec::new(path, Device::Cpu)
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

/// `logits = W x + b` on flattened inputs.
pub struct Linear {
    pub w: Tensor,
    pub b: Tensor,
    pub info: ModelInfo,
}

impl Classifier for Linear {
    fn logits(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(x.flatten(1, -1).matmul(&self.w.tr()) + &self.b)
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

/// Wraps a classifier and multiplies its logit k by `scale[k]`: the decisions' input margins
/// change smoothly but the logit margin no longer compares across classes.
pub struct Rescaled<C: Classifier> {
    pub inner: C,
    pub scale: Tensor,
}

impl<C: Classifier> Classifier for Rescaled<C> {
    fn logits(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.inner.logits(x)? * &self.scale)
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
}

/// Uniform values in `[lo, hi)` of shape `[rows, ..shape]` from per-row ChaCha streams: test
/// processes run tests on several threads, and libtorch's global RNG (`manual_seed` + `rand`)
/// would interleave their draws.
pub fn seeded_uniform(seed: u64, rows: i64, shape: &[i64], lo: f64, hi: f64) -> Tensor {
    let seeds: Vec<u64> = (0..rows as u64).map(|r| seed * 1_000_003 + r).collect();
    (brittle::attack::uniform_noise(&seeds, shape, Device::Cpu) + 1.0) * ((hi - lo) / 2.0) + lo
}

/// A linear classifier `[k, d]` with zero-mean, unit-variance (uniform) weights and bias `b`.
pub fn seeded_linear(seed: u64, k: i64, shape: [i64; 3], b: Tensor, name: &str) -> Linear {
    let d = shape.iter().product::<i64>();
    let r = 3f64.sqrt();
    Linear {
        w: seeded_uniform(seed, k, &[d], -r, r),
        b,
        info: ModelInfo {
            name: name.into(),
            format: "test".into(),
            fingerprint: name.into(),
            num_classes: k,
            input_shape: shape,
            has_features: false,
        },
    }
}

pub const SHAPE: [i64; 3] = [1, 4, 4];
pub const CLASSES: i64 = 4;

/// The rescaled linear model (seeded) and its effective last layer `diag(scale) W`.
pub fn inconsistent_model(seed: i64) -> (Rescaled<Linear>, Tensor) {
    let name = format!("rescaled-linear-{seed}");
    let mut lin = seeded_linear(
        seed as u64,
        CLASSES,
        SHAPE,
        Tensor::zeros([CLASSES], (Kind::Float, Device::Cpu)),
        &name,
    );
    lin.b = -lin.w.sum_dim_intlist([1].as_slice(), false, Kind::Float) * 0.5;
    let scale = Tensor::from_slice(&[0.1f32, 0.3, 3.0, 10.0]);
    let w_eff = &lin.w * scale.unsqueeze(1);
    (Rescaled { inner: lin, scale }, w_eff)
}

/// `n` uniform images labelled with the model's prediction, and their exact Linf distances
/// to the decision boundary (box constraints ignored) as a margins table.
pub fn synthetic_set(
    model: &Rescaled<Linear>,
    w_eff: &Tensor,
    n: i64,
    seed: i64,
) -> (Dataset, Vec<MarginRow>) {
    // A stream apart from the weights' (which use `seed` itself).
    let x = seeded_uniform((seed as u64 + 1) << 20, n, &SHAPE, 0.0, 1.0);
    let logits = tch::no_grad(|| model.logits(&x)).unwrap();
    let fs = free_scores(&logits).unwrap();
    let d = feature_margin(&logits, w_eff, Norm::Linf).unwrap();
    let labels: Vec<i64> = fs.iter().map(|s| s.pred).collect();
    // Original indices start at 100 so that positions and indices differ.
    let indices: Vec<usize> = (100..100 + n as usize).collect();
    let rows = fs
        .iter()
        .zip(&d)
        .zip(&indices)
        .map(|((s, &d), &index)| MarginRow {
            index,
            label: s.pred,
            pred: s.pred,
            correct: 1,
            logit_margin: s.logit_margin,
            input_margin: d,
            attack: "exact".into(),
            success: 1,
            forwards: 0,
            backwards: 0,
            seconds: 0.0,
            prob_margin: None,
            max_prob: None,
            entropy: None,
            energy: None,
            feature_margin: None,
            certified_radius: None,
            pseudo_margin: None,
        })
        .collect();
    let data = Dataset::new(x, labels, CLASSES, indices, "synthetic".into()).unwrap();
    (data, rows)
}
