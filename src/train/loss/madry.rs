//! Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks": mean
//! cross-entropy at the PGD points (also `standard`'s loss, at the clean inputs), and its
//! probabilistic-margin reweighting (the reference's `pm_madry_loss`).

use tch::Tensor;

use super::{ce_rows, probabilistic_margin, weighted_mean};

/// Mean cross-entropy of `logits` for `y`.
pub fn loss(logits: &Tensor, y: &Tensor) -> Tensor {
    logits.cross_entropy_for_logits(y)
}

/// Per-row cross-entropy at the adversarial points, weighted by
/// [`probabilistic_margin::weights`] of those points, averaged.
pub fn pm_loss(adv: &Tensor, y: &Tensor) -> Tensor {
    weighted_mean(&ce_rows(adv, y), &probabilistic_margin::weights(adv, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_weights_give_the_plain_mean() {
        // Every row with the same probabilistic margin: weights all 1, the loss is Madry's.
        let adv = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 0.0, 2.0, 0.0]).view([2, 3]);
        let y = Tensor::from_slice(&[0i64, 1]);
        let (a, b) = (pm_loss(&adv, &y), loss(&adv, &y));
        assert!((a - b).abs().double_value(&[]) < 1e-7);
    }
}
