//! Models behind one [`Classifier`] trait: the attacks and the analysis never see a format.
//!
//! Formats: TorchScript ([`torchscript`]), native Rust architectures with PyTorch or
//! safetensors weights ([`native`], [`weights`]), ONNX ([`onnx`]). [`load`] picks one from a
//! [`spec::ModelSpec`], puts [`normalize::Normalized`] in front and [`checked::Guarded`]
//! around; [`sanity`] checks the first batch of labelled data before a command trusts the
//! model's answers.

pub mod checked;
pub mod device;
pub mod load;
pub mod native;
pub mod normalize;
pub mod onnx;
pub mod sanity;
pub mod spec;
pub mod torchscript;
pub mod weights;

use std::path::Path;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::certify::{BoundGraph, NodeId};
pub use device::DeviceChoice;
pub use load::load_classifier;
pub use spec::{InputLayout, ModelFormat, ModelSpec};

/// What a model is, for provenance and for refusing a detector fitted on another model.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ModelInfo {
    /// Short name (file stem or architecture).
    pub name: String,
    /// `torchscript`, `native:<arch>`, `onnx`.
    pub format: String,
    /// sha256 of the weights file(s) and of the options that change the function computed.
    pub fingerprint: String,
    /// Number of classes (width of the logits).
    pub num_classes: i64,
    /// Input shape `[C, H, W]` the model was probed with.
    pub input_shape: [i64; 3],
    /// Whether [`Classifier::features_and_logits`] returns features.
    pub has_features: bool,
}

impl ModelInfo {
    /// Info for a model file before its probe fills in the classes and features.
    pub(crate) fn unprobed(
        path: &Path,
        format: &str,
        fingerprint: String,
        input_shape: [i64; 3],
    ) -> Self {
        ModelInfo {
            name: name_from_path(path, ""),
            format: format.to_owned(),
            fingerprint,
            num_classes: 0,
            input_shape,
            has_features: false,
        }
    }
}

/// An image classifier on a device: logits, penultimate features, and gradients through autograd.
///
/// Inputs are float32 `[N, C, H, W]` in `[0, 1]` on [`Classifier::device`]; any normalisation
/// happens inside, so gradients are with respect to the pixels an attacker changes.
pub trait Classifier: Send {
    /// Logits `[N, K]`, differentiable with respect to `x`.
    fn logits(&self, x: &Tensor) -> Result<Tensor>;

    /// Penultimate features `[N, D]` and logits `[N, K]` in one pass, when the format exposes them.
    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let _ = x;
        Ok(None)
    }

    /// Weight `[K, D]` and bias `[K]` of a last linear layer with `logits = W f + b`, when known.
    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        None
    }

    /// Appends the model's layers (normalisation included) to a bound graph after the pixel
    /// node `input` and returns the logits node, for [`crate::certify`]; a format whose layers
    /// brittle cannot see refuses.
    fn append_bound_graph(&self, graph: &mut BoundGraph, input: NodeId) -> Result<NodeId> {
        let _ = (graph, input);
        let info = self.info();
        anyhow::bail!(
            "model {} (format {}) exposes no layers to bound",
            info.name,
            info.format
        )
    }

    /// The device the model's weights live on; inputs must be moved there.
    fn device(&self) -> Device;

    /// Name, format, fingerprint, classes and input shape.
    fn info(&self) -> &ModelInfo;
}

/// Logits and `d objective(logits) / d x`, with `objective` reduced by summation over the batch,
/// so each sample's gradient only depends on its own input (models run in eval mode).
pub fn logits_and_grad(
    model: &dyn Classifier,
    x: &Tensor,
    objective: impl Fn(&Tensor) -> Tensor,
) -> Result<(Tensor, Tensor)> {
    let (logits, mut grads) = logits_and_grads(model, x, |z| vec![objective(z)])?;
    let grad = grads
        .pop()
        .ok_or_else(|| anyhow::anyhow!("autograd returned no gradient"))?;
    Ok((logits, grad))
}

/// Logits and the input gradient of each of several objectives (each summed over rows), from
/// one forward pass and one backward pass per objective: a Jacobian costs `F + k·B` instead of
/// the `k·(F + B)` of a batch replicated `k` times.
pub fn logits_and_grads(
    model: &dyn Classifier,
    x: &Tensor,
    objectives: impl Fn(&Tensor) -> Vec<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let x = x.detach().set_requires_grad(true);
    let logits = model.logits(&x)?;
    let objs = objectives(&logits);
    let mut grads = Vec::with_capacity(objs.len());
    for (i, obj) in objs.iter().enumerate() {
        let keep = i + 1 < objs.len();
        let mut g = Tensor::f_run_backward(&[obj.sum(tch::Kind::Float)], &[&x], keep, false)?;
        grads.push(
            g.pop()
                .ok_or_else(|| anyhow::anyhow!("autograd returned no gradient"))?,
        );
    }
    Ok((logits.detach(), grads))
}

/// Logits without building an autograd graph (scoring, verification of adversarial examples).
pub fn logits_no_grad(model: &dyn Classifier, x: &Tensor) -> Result<Tensor> {
    tch::no_grad(|| model.logits(x))
}

/// The two-sample probe batch every format runs once at load: two different deterministic
/// inputs in `[0, 1)` of shape `[2, C, H, W]`, so that batching bugs and per-sample
/// mix-ups show up as differing rows.
pub fn probe_input([c, h, w]: [i64; 3], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_arange(2 * c * h * w, (Kind::Float, device))?
        .f_mul_scalar(0.618_033_988_75)?
        .frac()
        .f_reshape([2, c, h, w])?)
}

/// Checks the logits of the [`probe_input`] batch are `[2, K]` and returns `K`.
pub(crate) fn probe_classes(logits: &Tensor) -> Result<i64> {
    let size = logits.size();
    ensure!(
        size.len() == 2 && size[0] == 2,
        "the probe batch of 2 gave output of shape {size:?}; expected logits [2, K]"
    );
    Ok(size[1])
}

/// Max |a - b| relative to max |b|, or `None` when the shapes differ.
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> Option<f64> {
    if a.size() != b.size() {
        return None;
    }
    let err = a.f_sub(b).ok()?.abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    Some(err / scale.max(1e-12))
}

/// Relative tolerance of the numeric checks on the probe batch (same maths, other kernels).
pub(crate) const PROBE_TOL: f64 = 1e-4;

/// Whether `logits = features W^T + b` on the probe batch, within [`PROBE_TOL`]: a candidate
/// last linear layer (found by name or by graph pattern) is only exposed once this holds.
pub(crate) fn is_last_linear(
    features: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    logits: &Tensor,
) -> bool {
    let (n, k) = match logits.size()[..] {
        [n, k] => (n, k),
        _ => return false,
    };
    if features.dim() != 2 || features.size()[0] != n || weight.size() != [k, features.size()[1]] {
        return false;
    }
    let rebuilt = tch::no_grad(|| -> Result<Tensor> {
        Ok(features.f_matmul(&weight.f_transpose(0, 1)?)?.f_add(bias)?)
    });
    rebuilt
        .ok()
        .and_then(|r| rel_diff(&r, logits))
        .is_some_and(|d| d <= PROBE_TOL)
}

/// Model name for provenance: the file stem, or `fallback` when the path has none.
pub(crate) fn name_from_path(path: &Path, fallback: &str) -> String {
    path.file_stem()
        .map_or_else(|| fallback.to_owned(), |s| s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_last_linear_accepts_the_layer_that_rebuilds_the_logits_only() {
        let opts = (Kind::Float, Device::Cpu);
        let f = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5, 3.0, -2.0]).view([2, 3]);
        let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 1.5, 0.25, -0.5]).view([2, 3]);
        let b = Tensor::from_slice(&[0.1f32, -0.2]);
        let logits = f.matmul(&w.tr()) + &b;
        assert!(is_last_linear(&f, &w, &b, &logits));
        // A weight off by 1% of the logits' scale, a missing bias, wrong shapes: refused.
        let off = &w + Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 0.0, 0.05]).view([2, 3]);
        assert!(!is_last_linear(&f, &off, &b, &logits));
        assert!(!is_last_linear(&f, &w, &Tensor::zeros([2], opts), &logits));
        assert!(!is_last_linear(&f, &w.tr(), &b, &logits));
        assert!(!is_last_linear(&f.view([6]), &w, &b, &logits));
    }
}
