//! Builds the [`Classifier`] a [`ModelSpec`] names: picks the format's loader, puts the
//! normalisation in front ([`Normalized`]) and the logit check around ([`Checked`]).

use anyhow::{bail, Context, Result};

use super::checked::Checked;
use super::normalize::{Normalized, Normalizer};
use super::spec::{ModelFormat, ModelSpec};
use super::{native, onnx, torchscript::TorchScriptClassifier, Classifier};

/// Builds the classifier for inputs of shape `[C, H, W]` (models are probed once at load, on
/// the normalised probe batch), wrapped in [`Checked`] so that no format's NaN or integer
/// logits reach a caller.
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
    let probe = super::probe_input(input_shape, spec.device)?;
    let probe = match &normalizer {
        Some(n) => n.apply(&probe)?,
        None => probe,
    };
    let path = &spec.path;
    let model: Result<Box<dyn Classifier>> = match spec.resolved_format()? {
        ModelFormat::Torchscript => {
            TorchScriptClassifier::load(path, spec.device, &probe, input_shape, fingerprint)
                .map(|m| normalized(m, normalizer))
        }
        ModelFormat::Native => native::load_native(spec, input_shape, &probe, fingerprint)
            .map(|m| normalized(m, normalizer)),
        ModelFormat::Onnx => {
            onnx::load(spec, &probe, input_shape, fingerprint).map(|m| normalized(m, normalizer))
        }
    };
    let model = model.with_context(|| format!("loading model {}", path.display()))?;
    Ok(Box::new(Checked(model)))
}

/// `model` behind its normalisation, when there is one.
fn normalized<C: Classifier + 'static>(
    model: C,
    normalizer: Option<Normalizer>,
) -> Box<dyn Classifier> {
    match normalizer {
        Some(n) => Box::new(Normalized::new(model, n)),
        None => Box::new(model),
    }
}
