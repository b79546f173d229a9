//! Applying a model and, when there is one, its detector to images: ONE forward pass per
//! sample gives the free scores and the detector's pseudo-margin and decision. `brittle score`
//! and `brittle serve` both score through here.

use anyhow::{ensure, Result};
use tch::Tensor;

use super::{Decision, Detector};
use crate::data::Dataset;
use crate::model::checked::name_sample;
use crate::model::{logits_no_grad, Classifier};
use crate::norm::Norm;
use crate::score::batched::for_each_batch;
use crate::score::table::ScoreRow;
use crate::score::{add_feature_margins, host_logits, row_scores, FreeScores, ScoreOptions};
use crate::util::{Checked, Progress};

/// One image's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The image's logits on the host, in float64 (for its probabilities).
    pub logits: Vec<f64>,
    pub scores: FreeScores,
    /// `None` without a detector.
    pub decision: Option<Decision>,
}

/// Scores `[N, C, H, W]` images with one forward pass of `model` (through the detector's
/// pseudo-margin net when it has one). The feature margin is measured for `feature_norm` when
/// given and the model's last linear layer is known.
pub fn score_images(
    model: &dyn Classifier,
    detector: Option<&Detector>,
    x: &Tensor,
    feature_norm: Option<Norm>,
) -> Result<Vec<Scored>> {
    let x = x.to_device(model.device());
    let (logits, pseudo) = match detector {
        Some(d) => d.forward(model, &x)?,
        None => (logits_no_grad(model, &x)?, None),
    };
    let (z, k) = host_logits(&logits)?;
    let mut scores: Vec<FreeScores> = z.chunks(k).map(row_scores).collect();
    if let Some(p) = &pseudo {
        ensure!(
            p.len() == scores.len(),
            "the pseudo-margin net gave {} values for {} images",
            p.len(),
            scores.len()
        );
    }
    if let Some(norm) = feature_norm {
        add_feature_margins(model, &logits, norm, &mut scores)?;
    }
    z.chunks(k)
        .zip(scores)
        .enumerate()
        .map(|(i, (row, s))| {
            let decision = detector
                .map(|d| d.decide(s.logit_margin, pseudo.as_ref().map(|v| v[i])))
                .transpose()?;
            Ok(Scored {
                logits: row.to_vec(),
                scores: s,
                decision,
            })
        })
        .collect()
}

/// Scores every sample of `data` in batches (one forward pass each): the rows in dataset order
/// and, with a detector, its decision for each row (else none).
pub fn score_dataset(
    model: &dyn Classifier,
    detector: Option<&Detector>,
    data: &Dataset,
    opts: &Checked<ScoreOptions>,
    progress: &dyn Progress,
) -> Result<(Vec<ScoreRow>, Vec<Decision>)> {
    let mut rows = Vec::with_capacity(data.len());
    let mut decisions = Vec::new();
    progress.set_length(data.len() as u64);
    for_each_batch(data.len(), opts.batch_size, progress, |r| {
        let (x, labels) = data.batch(r.start, r.end);
        let indices = &data.indices[r];
        let scored = score_images(model, detector, &x, Some(opts.norm))
            .map_err(|e| name_sample(e, indices, &data.source))?;
        for ((s, &index), &label) in scored.into_iter().zip(indices).zip(labels) {
            rows.push(ScoreRow {
                index,
                label,
                scores: s.scores,
            });
            decisions.extend(s.decision);
        }
        Ok(())
    })?;
    Ok((rows, decisions))
}
