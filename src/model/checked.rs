//! A [`Classifier`] whose every logits tensor is checked before anyone reads it.
//!
//! A model that returns NaN logits would otherwise score `pred = 0` (every comparison with NaN
//! is false, so the first class wins), and one that returns integer logits makes libtorch
//! operations downstream fail deep inside the attacks. [`load_classifier`](super::load_classifier)
//! wraps every format in [`Guarded`], so the check lives in one place for all of them.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::{Classifier, ModelInfo};
use crate::certify::{BoundGraph, NodeId};

/// Why a model's logits cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LogitError {
    #[error(
        "model {model} returns {kind:?} logits; a classifier must return floating-point logits"
    )]
    NotFloat { model: String, kind: Kind },
    #[error("model {model} returns logit {value} for class {class} of row {row} of the batch")]
    NotFinite {
        model: String,
        /// Row of the batch the model was given (the caller knows which sample that is).
        row: usize,
        class: usize,
        value: f64,
    },
}

/// Checks that `logits` are floating point and finite; names the first bad entry.
pub fn check_logits(info: &ModelInfo, logits: &Tensor) -> Result<(), LogitError> {
    let kind = logits.kind();
    if !matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(LogitError::NotFloat {
            model: info.name.clone(),
            kind,
        });
    }
    // One reduction and one host sync on the common (finite) path.
    let finite = logits.isfinite();
    if bool::try_from(finite.all()).unwrap_or(false) {
        return Ok(());
    }
    let flat = finite.logical_not().flatten(0, -1).nonzero();
    if flat.size().first().copied().unwrap_or(0) == 0 {
        return Ok(());
    }
    let first = flat.int64_value(&[0, 0]);
    let width = logits.size().last().copied().unwrap_or(1).max(1);
    let (row, class) = (first / width, first % width);
    let value = logits
        .detach()
        .to_kind(Kind::Double)
        .flatten(0, -1)
        .double_value(&[first]);
    Err(LogitError::NotFinite {
        model: info.name.clone(),
        row: row as usize,
        class: class as usize,
        value,
    })
}

/// A classifier whose logits (from [`Classifier::logits`] and
/// [`Classifier::features_and_logits`]) pass [`check_logits`]. (Checked options are
/// [`crate::util::Checked`], another concept.)
pub struct Guarded(pub Box<dyn Classifier>);

impl Classifier for Guarded {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.0.logits(x)?;
        check_logits(self.0.info(), &z)?;
        Ok(z)
    }

    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let out = self.0.features_and_logits(x)?;
        if let Some((_, z)) = &out {
            check_logits(self.0.info(), z)?;
        }
        Ok(out)
    }

    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        self.0.last_linear()
    }

    fn append_bound_graph(&self, graph: &mut BoundGraph, input: NodeId) -> Result<NodeId> {
        self.0.append_bound_graph(graph, input)
    }

    fn device(&self) -> Device {
        self.0.device()
    }

    fn info(&self) -> &ModelInfo {
        self.0.info()
    }
}

/// Adds the dataset index of the bad row to a [`LogitError::NotFinite`] from a batch whose rows
/// are the samples `indices` of `source`; other errors pass unchanged.
pub fn name_sample(err: anyhow::Error, indices: &[usize], source: &str) -> anyhow::Error {
    let row = match err.downcast_ref::<LogitError>() {
        Some(LogitError::NotFinite { row, .. }) => *row,
        _ => return err,
    };
    match indices.get(row) {
        Some(i) => err.context(format!("first bad sample: index {i} of {source}")),
        None => err,
    }
}
