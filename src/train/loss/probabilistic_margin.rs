//! The reference's per-sample weights of its `pm_` losses: the probabilistic margin of MAIL
//! (Wang et al. 2021, "Probabilistic Margins for Instance Reweighting in Adversarial
//! Training"), `PM = max_{j≠y} p_j − p_y` at the adversarial point, through a sigmoid, so that
//! samples near or past the decision boundary weigh more. It is a margin of probabilities, not
//! of logits.

use tch::{Kind, Tensor};

/// The sigmoid's shift and slope: `w = σ((PM + BIAS) · SLOPE)` (the reference's defaults).
const BIAS: f64 = -1.5;
const SLOPE: f64 = 1.0;

/// Per-row weights `[N]` from the adversarial logits, constant (no gradient), normalised to mean
/// 1 over the batch.
pub fn weights(adv_logits: &Tensor, y: &Tensor) -> Tensor {
    let p = adv_logits.detach().softmax(-1, Kind::Float);
    let y1 = y.unsqueeze(1);
    let p_true = p.gather(1, &y1, false).squeeze_dim(1);
    // Probabilities are ≥ 0: a -1 at the label never wins the max over the others.
    let p_other = p.scatter_value(1, &y1, -1.0).amax([1].as_slice(), false);
    let w = ((p_other - p_true + BIAS) * SLOPE).sigmoid();
    let n = w.size()[0] as f64;
    &w * n / w.sum(Kind::Float)
}
