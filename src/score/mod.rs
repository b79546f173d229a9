//! Free scores: everything one forward pass tells about how close a decision is to flipping.
//!
//! The logit margin (top-1 minus top-2 logit) is the seed paper's score; the others are the
//! usual confidence scores, and the feature margin is the exact distance to the boundary in
//! the penultimate feature space for models that end in a linear layer.

pub mod table;

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::model::{logits_no_grad, Classifier};
use crate::norm::Norm;
use crate::util::{to_vec_f64, to_vec_i64};

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
pub fn free_scores(logits: &Tensor) -> Result<Vec<FreeScores>> {
    let logits = logits.detach().to_kind(Kind::Double);
    let k = logits.size()[1];
    anyhow::ensure!(
        k >= 2,
        "a margin needs at least 2 classes, the model has {k}"
    );
    let (top, idx) = logits.topk(2, 1, true, true);
    let probs = logits.softmax(1, Kind::Double);
    let (ptop, _) = probs.topk(2, 1, true, true);
    let logp = logits.log_softmax(1, Kind::Double);
    let entropy = -(&probs * &logp).sum_dim_intlist([1].as_slice(), false, Kind::Double);
    let energy = -logits.logsumexp([1].as_slice(), false);
    let lm = to_vec_f64(&(top.select(1, 0) - top.select(1, 1)))?;
    let pm = to_vec_f64(&(ptop.select(1, 0) - ptop.select(1, 1)))?;
    let mp = to_vec_f64(&ptop.select(1, 0))?;
    let ent = to_vec_f64(&entropy)?;
    let en = to_vec_f64(&energy)?;
    let pred = to_vec_i64(&idx.select(1, 0))?;
    Ok((0..pred.len())
        .map(|i| FreeScores {
            pred: pred[i],
            logit_margin: lm[i],
            prob_margin: pm[i],
            max_prob: mp[i],
            entropy: ent[i],
            energy: en[i],
            feature_margin: None,
        })
        .collect())
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
    if let Some((w, _)) = model.last_linear() {
        for (s, fm) in scores.iter_mut().zip(feature_margin(&logits, &w, norm)?) {
            s.feature_margin = Some(fm);
        }
    }
    Ok(scores)
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
