//! Fitting a detector on an attacked set (`margins.csv` + the data and model it came from).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::calibrate::calibrate;
use super::pseudo::{self, PseudoInput, TrainConfig};
use super::{
    net_inputs, Detector, DetectorSpec, PseudoSpec, ScoreKind, ScoreQuality, Validation,
    FORMAT_VERSION, WEIGHTS_FILE,
};
use crate::data::Dataset;
use crate::margins::{check_unique_indices, MarginRow};
use crate::metrics::correlation::kendall_tau_b;
use crate::metrics::roc::{auroc, fpr_at_tpr};
use crate::model::Classifier;
use crate::norm::Norm;
use crate::provenance::Provenance;
use crate::score::batched::for_each_batch;
use crate::score::free_scores;
use crate::util::{Check, Checked, NoProgress, OptionError, Progress};

/// Whether to train a pseudo-margin and use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum PseudoMode {
    /// Train it; keep it only when its validation Kendall τ beats the logit margin's.
    Auto,
    /// Train it and use it.
    On,
    /// Use the logit margin.
    Off,
}

/// Fewest samples of each class at ε (non-robust: input margin ≤ ε; robust) that `fit` accepts.
/// Below ten, the calibrated TPR and FPR move in steps of more than ten percentage points, the
/// default 30% validation split holds about three of the class, and with none the FPR is
/// undefined: the detector would be calibrated on noise. (A typical cause is an ε on the wrong
/// scale, e.g. 8 for 8/255, which makes every sample non-robust.)
pub const MIN_PER_CLASS: usize = 10;

/// Settings of `brittle fit`; [`fit`] takes them checked ([`Check::check`]).
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub eps: f64,
    pub norm: Norm,
    pub target_tpr: f64,
    pub pseudo: PseudoMode,
    /// The pseudo-margin's training settings, checked on their own (their fields have names of
    /// their own, e.g. their `batch_size`).
    pub train: Checked<TrainConfig>,
    /// Share of the attacked set held out to validate (and early-stop) the pseudo-margin.
    pub val_fraction: f64,
    pub seed: u64,
    /// Samples per forward pass.
    pub batch_size: usize,
    /// Names of the margins file and data, recorded in `detector.json`.
    pub margins_name: String,
}

impl Check for FitOptions {
    /// ε (its bound by the pixel box waits for the data, in [`fit`]), target TPR, validation
    /// share and batch size.
    fn validate(&self) -> Result<()> {
        self.norm
            .check_eps(self.eps, None)
            .map_err(|e| OptionError::about("eps", e))?;
        ensure!(
            self.target_tpr > 0.0 && self.target_tpr <= 1.0,
            OptionError::new(
                "target_tpr",
                format!("the target TPR {} must be in (0, 1]", self.target_tpr)
            )
        );
        ensure!(
            self.val_fraction > 0.0 && self.val_fraction < 1.0,
            OptionError::new(
                "val_fraction",
                format!(
                    "validation fraction {} must be in (0, 1)",
                    self.val_fraction
                )
            )
        );
        ensure!(
            self.batch_size > 0,
            OptionError::new("batch_size", "the batch size must be positive")
        );
        Ok(())
    }
}

/// The positions in `data` of each row's `index`, checking that the labels agree.
pub fn match_rows(data: &Dataset, rows: &[MarginRow]) -> Result<Vec<usize>> {
    let pos: HashMap<usize, usize> = data
        .indices
        .iter()
        .enumerate()
        .map(|(p, &i)| (i, p))
        .collect();
    check_unique_indices(rows).context("the margins file")?;
    rows.iter()
        .map(|r| {
            let Some(&p) = pos.get(&r.index) else {
                bail!(OptionError::new(
                    "window",
                    format!(
                        "sample index {} of the margins file is not in {} (which holds indices \
                         {}..={}); was it computed on another data file or on another window \
                         of it (offset, limit)?",
                        r.index,
                        data.source,
                        data.indices.iter().min().copied().unwrap_or(0),
                        data.indices.iter().max().copied().unwrap_or(0)
                    )
                ));
            };
            if data.labels[p] != r.label {
                bail!(
                    "sample index {}: label {} in the margins file but {} in {}; \
                     was it computed on another data file?",
                    r.index,
                    r.label,
                    data.labels[p],
                    data.source
                );
            }
            Ok(p)
        })
        .collect()
}

/// Logits and pseudo-margin net inputs of the given dataset positions, on the CPU.
fn forward_positions(
    model: &dyn Classifier,
    data: &Dataset,
    positions: &[usize],
    input: PseudoInput,
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<(Tensor, Tensor)> {
    progress.set_length(positions.len() as u64);
    let (mut logits, mut inputs) = (Vec::new(), Vec::new());
    for_each_batch(positions.len(), batch_size, progress, |r| {
        let chunk = &positions[r];
        let idx = Tensor::from_slice(&chunk.iter().map(|&p| p as i64).collect::<Vec<_>>());
        let x = data.images.index_select(0, &idx);
        let (l, f) = net_inputs(model, &x, input)?;
        logits.push(l.to_device(tch::Device::Cpu));
        inputs.push(f.to_device(tch::Device::Cpu));
        Ok(())
    })?;
    Ok((Tensor::cat(&logits, 0), Tensor::cat(&inputs, 0)))
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Kendall τ with the input margin, AUROC and FPR@95TPR of a score where low means brittle.
pub fn score_quality(score: &[f64], d_in: &[f64], nonrobust: &[bool]) -> ScoreQuality {
    let neg: Vec<f64> = score.iter().map(|s| -s).collect();
    ScoreQuality {
        kendall_tau: kendall_tau_b(score, d_in),
        auroc: finite(auroc(&neg, nonrobust)),
        fpr_at_95tpr: finite(fpr_at_tpr(&neg, nonrobust, 0.95).0),
    }
}

fn pick<T: Copy>(v: &[T], positions: &[usize]) -> Vec<T> {
    positions.iter().map(|&p| v[p]).collect()
}

/// Fits a detector: matches `rows` to `data`, recomputes the logit margins with `model`
/// (refusing rows computed with another model), trains the pseudo-margin when asked, and
/// calibrates λ.
pub fn fit(
    model: &dyn Classifier,
    data: &Dataset,
    rows: &[MarginRow],
    opts: &Checked<FitOptions>,
    provenance: Provenance,
) -> Result<Detector> {
    fit_with_progress(model, data, rows, opts, provenance, &NoProgress)
}

/// [`fit`] reporting its forward pass over the matched samples to `progress`, a unit a sample.
pub fn fit_with_progress(
    model: &dyn Classifier,
    data: &Dataset,
    rows: &[MarginRow],
    opts: &Checked<FitOptions>,
    provenance: Provenance,
    progress: &dyn Progress,
) -> Result<Detector> {
    ensure!(
        rows.len() >= 4,
        "the margins file has {} rows; fitting needs at least 4",
        rows.len()
    );
    opts.norm
        .check_eps(opts.eps, Some(data.input_shape()))
        .map_err(|e| OptionError::about("eps", e))?;
    let positions = match_rows(data, rows)?;
    let info = model.info().clone();
    let input = if info.has_features {
        PseudoInput::Features
    } else {
        PseudoInput::Logits
    };
    let (logits, inputs) =
        forward_positions(model, data, &positions, input, opts.batch_size, progress)?;
    let lm: Vec<f64> = free_scores(&logits)?
        .iter()
        .map(|s| s.logit_margin)
        .collect();
    let disagree = rows
        .iter()
        .zip(&lm)
        .filter(|(r, &m)| (r.logit_margin - m).abs() > 1e-3 * (1.0 + m.abs()))
        .count();
    if disagree * 100 > rows.len() {
        bail!(
            "{disagree} of {} logit margins in the margins file differ from model {}'s: \
             was it computed with another model?",
            rows.len(),
            info.name
        );
    }
    let d_in: Vec<f64> = rows
        .iter()
        .map(|r| {
            if r.success == 1 {
                r.input_margin
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let nonrobust: Vec<bool> = d_in.iter().map(|&d| d <= opts.eps).collect();
    let positives = nonrobust.iter().filter(|&&b| b).count();
    let negatives = rows.len() - positives;
    ensure!(
        positives >= MIN_PER_CLASS && negatives >= MIN_PER_CLASS,
        "at ε = {} ({}) the margins file has {positives} non-robust samples (input margin ≤ ε) \
         and {negatives} robust ones; a detector needs at least {MIN_PER_CLASS} of each to \
         calibrate its threshold and measure its false-positive rate",
        opts.eps,
        opts.norm.symbol()
    );

    // Seeded train/validation split.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed));
    let n_val = ((opts.val_fraction * rows.len() as f64).round() as usize).clamp(1, rows.len() - 2);
    let (val, tr) = order.split_at(n_val);
    let val_d = pick(&d_in, val);
    let val_y = pick(&nonrobust, val);
    let logit_q = score_quality(&pick(&lm, val), &val_d, &val_y);

    let mut pseudo_q = None;
    let mut kept = None;
    if opts.pseudo != PseudoMode::Off {
        let t = |p: &[usize]| {
            inputs.index_select(
                0,
                &Tensor::from_slice(&p.iter().map(|&i| i as i64).collect::<Vec<_>>()),
            )
        };
        let trained = pseudo::train(
            &t(tr),
            &pick(&d_in, tr),
            &t(val),
            &val_d,
            input,
            &opts.train,
            opts.seed,
        )?;
        let val_pm = trained.net.predict(&t(val))?;
        let q = score_quality(&val_pm, &val_d, &val_y);
        let better = q.kendall_tau > logit_q.kendall_tau;
        tracing::info!(
            "pseudo-margin: validation tau {:.4} vs logit margin {:.4} (best epoch {} of {})",
            q.kendall_tau,
            logit_q.kendall_tau,
            trained.best_epoch,
            trained.epochs_run
        );
        if opts.pseudo == PseudoMode::On || better {
            kept = Some((trained, val_pm));
        }
        pseudo_q = Some(q);
    }

    let (score, calibrated_on, lambda, calibration, pseudo_spec, net) = match kept {
        Some((trained, val_pm)) => {
            let (lambda, rates) = calibrate(&val_pm, &val_y, opts.target_tpr)?;
            let spec = PseudoSpec {
                shape: trained.net.shape.clone(),
                loss: opts.train.loss,
                weights: WEIGHTS_FILE.to_string(),
                best_epoch: trained.best_epoch,
                epochs_run: trained.epochs_run,
            };
            (
                ScoreKind::PseudoMargin,
                "validation",
                lambda,
                rates,
                Some(spec),
                Some(trained.net),
            )
        }
        None => {
            let (lambda, rates) = calibrate(&lm, &nonrobust, opts.target_tpr)?;
            (ScoreKind::LogitMargin, "all", lambda, rates, None, None)
        }
    };
    // The validation split can miss a class that the whole set has enough of.
    ensure!(
        calibration.negatives > 0,
        "the {calibrated_on} set ({} samples) has no robust sample at ε = {}: the detector's \
         false-positive rate would be undefined; use a larger validation fraction or more samples",
        calibration.positives,
        opts.eps
    );
    Ok(Detector {
        spec: DetectorSpec {
            format_version: FORMAT_VERSION,
            model: info,
            norm: opts.norm,
            eps: opts.eps,
            score,
            lambda,
            target_tpr: opts.target_tpr,
            calibrated_on: calibrated_on.to_string(),
            calibration,
            validation: Validation {
                n_train: tr.len(),
                n_val: val.len(),
                logit_margin: logit_q,
                pseudo_margin: pseudo_q,
            },
            pseudo: pseudo_spec,
            margins: opts.margins_name.clone(),
            data: data.source.clone(),
            provenance,
        },
        pseudo: net,
    })
}
