//! Free scores: everything one forward pass tells about how close a decision is to flipping.
//!
//! The logit margin (top-1 minus top-2 logit) is the seed paper's score; the others are the
//! usual confidence scores, and the feature margin is the exact distance to the boundary in
//! the penultimate feature space for models that end in a linear layer.

pub mod batched;
pub mod table;

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::model::{logits_no_grad, Classifier};
use crate::norm::Norm;
use crate::util::{to_vec_f64, Check, OptionError};

/// Settings of scoring a dataset (`brittle score`); the scoring takes them checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreOptions {
    /// Samples per forward pass.
    pub batch_size: usize,
    /// The attack norm the feature margin is measured for.
    pub norm: Norm,
}

impl Check for ScoreOptions {
    fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.batch_size > 0,
            OptionError::new("batch_size", "the batch size must be positive")
        );
        Ok(())
    }
}

/// The scores of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct FreeScores {
    pub pred: i64,
    /// Top-1 logit minus top-2 logit (≥ 0).
    pub logit_margin: f64,
    /// Top-1 probability minus top-2 probability.
    pub prob_margin: f64,
    /// Top-1 softmax probability.
    pub max_prob: f64,
    /// Shannon entropy of the softmax, in nats.
    pub entropy: f64,
    /// Energy `-logsumexp(logits)` (lower = more confident).
    pub energy: f64,
    /// `min_j (z_top - z_j) / ‖w_top - w_j‖_*` (dual of the attack norm), when the last layer is known.
    pub feature_margin: Option<f64>,
}

/// Scores of a batch of logits `[N, K]` (K ≥ 2).
///
/// The logits come to the host once and every score is computed there in float64: a dozen
/// libtorch calls on a `[1, K]` tensor cost more than the forward pass of a small model, which
/// is what a one-image request to `brittle serve` pays.
pub fn free_scores(logits: &Tensor) -> Result<Vec<FreeScores>> {
    let (z, k) = host_logits(logits)?;
    Ok(z.chunks(k).map(row_scores).collect())
}

/// Logits `[N, K]` as row-major float64 on the host, and `K` (checked ≥ 2).
pub fn host_logits(logits: &Tensor) -> Result<(Vec<f64>, usize)> {
    let size = logits.size();
    anyhow::ensure!(
        size.len() == 2,
        "expected logits [N, K], got shape {size:?}"
    );
    let k = size[1];
    anyhow::ensure!(
        k >= 2,
        "a margin needs at least 2 classes, the model has {k}"
    );
    Ok((to_vec_f64(logits)?, k as usize))
}

/// `log Σ exp z`, shifted by the maximum so that it never overflows.
fn logsumexp(z: &[f64]) -> f64 {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// Softmax probabilities of one row of logits.
pub fn softmax(z: &[f64]) -> Vec<f64> {
    let lse = logsumexp(z);
    z.iter().map(|v| (v - lse).exp()).collect()
}

/// The scores of one row of logits (at least 2 of them).
pub fn row_scores(z: &[f64]) -> FreeScores {
    // Top two, the first index winning ties (as numpy's argmax).
    let (mut i1, mut i2) = (0, 1);
    if z[1] > z[0] {
        (i1, i2) = (1, 0);
    }
    for (j, &v) in z.iter().enumerate().skip(2) {
        if v > z[i1] {
            (i1, i2) = (j, i1);
        } else if v > z[i2] {
            i2 = j;
        }
    }
    let lse = logsumexp(z);
    let entropy = -z
        .iter()
        .map(|&v| {
            let logp = v - lse;
            logp.exp() * logp
        })
        .sum::<f64>();
    let (p1, p2) = ((z[i1] - lse).exp(), (z[i2] - lse).exp());
    FreeScores {
        pred: i1 as i64,
        logit_margin: z[i1] - z[i2],
        prob_margin: p1 - p2,
        max_prob: p1,
        entropy,
        energy: -lse,
        feature_margin: None,
    }
}

/// Exact distance, in the norm dual to `norm` on weight differences, from the features to the
/// nearest decision boundary of the last linear layer: `min_j (z_top - z_j) / ‖w_top - w_j‖_*`.
pub fn feature_margin(logits: &Tensor, weight: &Tensor, norm: Norm) -> Result<Vec<f64>> {
    let logits = logits.detach().to_kind(Kind::Double);
    let w = weight.to_kind(Kind::Double).to_device(logits.device());
    let pred = logits.argmax(1, false);
    let ztop = logits.gather(1, &pred.unsqueeze(1), false);
    let wtop = w.index_select(0, &pred).unsqueeze(1); // [N, 1, D]
    let diff = (wtop - w.unsqueeze(0)).flatten(0, 1); // [N*K, D]
    let n = logits.size()[0];
    let denom = norm.dual().batch_norm(&diff).view([n, -1]);
    let ratio = (ztop - &logits) / denom;
    // The top class itself gives 0/0; exclude it.
    let ratio = ratio.scatter_value(1, &pred.unsqueeze(1), f64::INFINITY);
    to_vec_f64(&ratio.amin([1].as_slice(), false))
}

/// Scores a whole batch of images with one forward pass.
pub fn score_batch(model: &dyn Classifier, x: &Tensor, norm: Norm) -> Result<Vec<FreeScores>> {
    let x = x.to_device(model.device());
    let logits = logits_no_grad(model, &x)?;
    let mut scores = free_scores(&logits)?;
    add_feature_margins(model, &logits, norm, &mut scores)?;
    Ok(scores)
}

/// Fills in the feature margins of `scores` (computed from `logits`) when the model's last
/// linear layer is known.
pub fn add_feature_margins(
    model: &dyn Classifier,
    logits: &Tensor,
    norm: Norm,
    scores: &mut [FreeScores],
) -> Result<()> {
    if let Some((w, _)) = model.last_linear() {
        for (s, fm) in scores.iter_mut().zip(feature_margin(logits, &w, norm)?) {
            s.feature_margin = Some(fm);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_scores_of_hand_logits() {
        let logits = Tensor::from_slice(&[2.0f64, 1.0, 0.0, -1.0, 3.0, 3.0]).view([2, 3]);
        let s = free_scores(&logits).unwrap();
        assert_eq!(s[0].pred, 0);
        assert!((s[0].logit_margin - 1.0).abs() < 1e-12);
        assert_eq!(s[1].logit_margin, 0.0);
        let z: f64 = [2.0f64, 1.0, 0.0].iter().map(|v| v.exp()).sum();
        assert!((s[0].max_prob - 2f64.exp() / z).abs() < 1e-12);
        assert!((s[0].energy + z.ln()).abs() < 1e-12);
    }

    #[test]
    fn feature_margin_matches_distance_to_hyperplane() {
        // logits = W f with f = (1, 0): z = (1, 0, -1); the nearest boundary is class 1.
        let w = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0]).view([3, 2]);
        let logits = Tensor::from_slice(&[1.0f64, 0.0, -1.0]).view([1, 3]);
        let l2 = feature_margin(&logits, &w, Norm::L2).unwrap()[0];
        assert!((l2 - 1.0 / 2f64.sqrt()).abs() < 1e-9, "{l2}");
        let linf = feature_margin(&logits, &w, Norm::Linf).unwrap()[0];
        assert!((linf - 0.5).abs() < 1e-9, "{linf}");
    }
}
