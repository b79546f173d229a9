//! Logit pairing, Kannan et al. 2018, "Adversarial Logit Pairing", in the form of Wang et al.
//! 2020 (MART), Table 1, which the reference follows: the squared distance between the clean and
//! adversarial *probabilities*, added to the cross-entropy at the PGD point (ALP) or at the
//! clean input (CLP).

use tch::{Kind, Tensor};

use super::per_batch;

/// `β · Σ_i ‖softmax(adv_i) − softmax(clean_i)‖² / N`.
fn pairing(clean: &Tensor, adv: &Tensor, beta: f64) -> Tensor {
    let d = adv.softmax(-1, Kind::Float) - clean.softmax(-1, Kind::Float);
    per_batch(&d.square(), clean.size()[0]) * beta
}

/// Adversarial logit pairing: `CE(adv, y) + β · pairing`.
pub fn alp(clean: &Tensor, adv: &Tensor, y: &Tensor, beta: f64) -> Tensor {
    adv.cross_entropy_for_logits(y) + pairing(clean, adv, beta)
}

/// Clean logit pairing: `CE(clean, y) + β · pairing`.
pub fn clp(clean: &Tensor, adv: &Tensor, y: &Tensor, beta: f64) -> Tensor {
    clean.cross_entropy_for_logits(y) + pairing(clean, adv, beta)
}
