//! A deployable detector of brittle decisions: flag a decision when its score (the logit
//! margin, or a learned pseudo-margin) is at most a threshold λ calibrated so that a target
//! share of the non-robust samples (input margin ≤ ε) of an attacked set is flagged.
//!
//! On disk, a detector is a folder with `detector.json` ([`DetectorSpec`]) and, when a
//! pseudo-margin is used, its weights `pseudo_margin.safetensors`.

pub mod apply;
pub mod calibrate;
pub mod fit;
pub mod pseudo;

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::model::{logits_no_grad, Classifier, ModelInfo};
use crate::norm::Norm;
use crate::provenance::Provenance;
use calibrate::Rates;
use pseudo::{NetShape, PseudoInput, PseudoLoss, PseudoNet};

/// File name of the detector description inside a detector folder.
pub const DETECTOR_FILE: &str = "detector.json";
/// File name of the pseudo-margin weights inside a detector folder.
pub const WEIGHTS_FILE: &str = "pseudo_margin.safetensors";
/// Bumped when `detector.json` changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// The score the threshold applies to (low = brittle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    LogitMargin,
    PseudoMargin,
}

/// How well a score ranks and detects on the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreQuality {
    /// Kendall τ-b between the score and the input margin (failed attacks rank highest).
    pub kendall_tau: f64,
    /// AUROC of detecting non-robust samples (`None` without both classes).
    pub auroc: Option<f64>,
    /// FPR at 95% TPR (`None` without both classes).
    pub fpr_at_95tpr: Option<f64>,
}

/// The validation split and the quality of both scores on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub n_train: usize,
    pub n_val: usize,
    pub logit_margin: ScoreQuality,
    /// `None` when no pseudo-margin was trained (`--pseudo off`).
    pub pseudo_margin: Option<ScoreQuality>,
}

/// The pseudo-margin net kept in the detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PseudoSpec {
    pub shape: NetShape,
    pub loss: PseudoLoss,
    /// Weights file, relative to the detector folder.
    pub weights: String,
    pub best_epoch: usize,
    pub epochs_run: usize,
}

/// Everything `detector.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorSpec {
    pub format_version: u32,
    /// The model the detector was fitted on (its fingerprint is checked before use).
    pub model: ModelInfo,
    pub norm: Norm,
    pub eps: f64,
    /// The score λ applies to.
    pub score: ScoreKind,
    /// Flag a decision as brittle when `score <= lambda`.
    pub lambda: f64,
    pub target_tpr: f64,
    /// Which samples λ was calibrated on: `all` (logit margin) or `validation` (pseudo-margin,
    /// whose training samples would flatter it).
    pub calibrated_on: String,
    /// TPR/FPR that λ achieves on those samples.
    pub calibration: Rates,
    pub validation: Validation,
    pub pseudo: Option<PseudoSpec>,
    /// The margins file and the data it was fitted on.
    pub margins: String,
    pub data: String,
    pub provenance: Provenance,
}

/// A loaded detector: its description and, when it has one, the pseudo-margin net.
#[derive(Debug)]
pub struct Detector {
    pub spec: DetectorSpec,
    pub pseudo: Option<PseudoNet>,
}

/// One sample's detector outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub pseudo_margin: Option<f64>,
    pub brittle: bool,
}

impl Detector {
    /// Reads `dir/detector.json` and the weights it names.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let path = dir.join(DETECTOR_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading detector {}", path.display()))?;
        let spec: DetectorSpec = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a brittle detector description", path.display()))?;
        ensure!(
            spec.format_version == FORMAT_VERSION,
            "{}: format_version {} is not supported (expected {FORMAT_VERSION})",
            path.display(),
            spec.format_version
        );
        ensure!(
            spec.pseudo.is_some() || spec.score == ScoreKind::LogitMargin,
            "{}: score is pseudo_margin but no pseudo-margin net is described",
            path.display()
        );
        let pseudo = match &spec.pseudo {
            Some(p) => Some(PseudoNet::load(
                p.shape.clone(),
                &dir.join(&p.weights),
                device,
            )?),
            None => None,
        };
        Ok(Detector { spec, pseudo })
    }

    /// Writes `dir/detector.json` and the weights (creating `dir`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if let (Some(net), Some(p)) = (&self.pseudo, &self.spec.pseudo) {
            net.save(&dir.join(&p.weights))?;
        }
        let path = dir.join(DETECTOR_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&self.spec)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Refuses a model other than the one the detector was fitted on.
    pub fn check_model(&self, info: &ModelInfo) -> Result<()> {
        if info.fingerprint != self.spec.model.fingerprint {
            bail!(
                "the detector was fitted on model {} (fingerprint {}), not on {} (fingerprint {}); \
                 fit a detector for this model with `brittle fit`",
                self.spec.model.name,
                self.spec.model.fingerprint,
                info.name,
                info.fingerprint
            );
        }
        Ok(())
    }

    /// Logits `[N, K]` and, when the detector has a net, pseudo-margins, from one forward pass.
    pub fn forward(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
    ) -> Result<(Tensor, Option<Vec<f64>>)> {
        match &self.pseudo {
            None => Ok((logits_no_grad(model, x)?, None)),
            Some(net) => {
                let (logits, input) = net_inputs(model, x, net.shape.input)?;
                let pm = net.predict(&input)?;
                Ok((logits, Some(pm)))
            }
        }
    }

    /// The decision for a sample with this logit margin and pseudo-margin.
    pub fn decide(&self, logit_margin: f64, pseudo_margin: Option<f64>) -> Result<Decision> {
        let score = match self.spec.score {
            ScoreKind::LogitMargin => logit_margin,
            ScoreKind::PseudoMargin => pseudo_margin
                .ok_or_else(|| anyhow::anyhow!("the detector needs a pseudo-margin"))?,
        };
        Ok(Decision {
            pseudo_margin,
            brittle: score <= self.spec.lambda,
        })
    }
}

/// Logits and the pseudo-margin net's inputs (features or logits) of a batch, without autograd.
pub fn net_inputs(
    model: &dyn Classifier,
    x: &Tensor,
    input: PseudoInput,
) -> Result<(Tensor, Tensor)> {
    let x = x.to_device(model.device());
    tch::no_grad(|| match input {
        PseudoInput::Logits => {
            let l = model.logits(&x)?;
            Ok((l.shallow_clone(), l))
        }
        PseudoInput::Features => match model.features_and_logits(&x)? {
            Some((f, l)) => Ok((l, f.flatten(1, -1))),
            None => bail!(
                "the pseudo-margin reads penultimate features but model {} exposes none",
                model.info().name
            ),
        },
    })
}
