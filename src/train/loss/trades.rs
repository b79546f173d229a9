//! Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy"
//! (TRADES): clean cross-entropy plus β times `KL(p(x) ‖ p(x'))` at the PGD point that
//! maximises that KL; and its probabilistic-margin reweighting (the reference's
//! `pm_trades_loss`).

use tch::{Kind, Reduction, Tensor};

use super::{per_batch, probabilistic_margin};

/// `KL(softmax(clean) ‖ softmax(adv))` under `reduction` (per row after summing over classes
/// when `None`).
fn kl(clean: &Tensor, adv: &Tensor, reduction: Reduction) -> Tensor {
    adv.log_softmax(-1, Kind::Float)
        .kl_div(&clean.log_softmax(-1, Kind::Float), reduction, true)
}

/// `CE(clean, y) + β · Σ_i KL_i / N`.
pub fn loss(clean: &Tensor, adv: &Tensor, y: &Tensor, beta: f64) -> Tensor {
    let n = clean.size()[0] as f64;
    clean.cross_entropy_for_logits(y) + kl(clean, adv, Reduction::Sum) / n * beta
}

/// `CE(clean, y) + β · Σ_i w_i KL_i / N` with the [`probabilistic_margin::weights`] of the
/// adversarial points.
pub fn pm_loss(clean: &Tensor, adv: &Tensor, y: &Tensor, beta: f64) -> Tensor {
    let rows = kl(clean, adv, Reduction::None).sum_dim_intlist([1].as_slice(), false, Kind::Float);
    let w = probabilistic_margin::weights(adv, y);
    clean.cross_entropy_for_logits(y) + per_batch(&(rows * w), clean.size()[0]) * beta
}
