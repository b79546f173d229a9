//! MART, Wang et al. 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified
//! Examples": a boosted cross-entropy at the PGD point (which also pushes down the strongest
//! wrong class) plus β times the KL from the clean to the adversarial prediction, weighted by
//! how unsure the clean prediction is of the label. Constants (1.0001, 1e-12, 1.0000001) as in
//! the authors' code and the reference.

use tch::{Kind, Tensor};

use super::{ce_rows, per_batch};

/// `BCE(adv) + β · Σ_i KL(p_i ‖ p'_i) (1 − p_{i,y}) / N`, with `BCE = CE(adv, y) −
/// mean log(1.0001 − p'_{ŷ})` where `ŷ` is the most probable wrong class at the adversarial point.
pub fn loss(clean: &Tensor, adv: &Tensor, y: &Tensor, beta: f64) -> Tensor {
    let n = clean.size()[0];
    let y1 = y.unsqueeze(1);
    let p_adv = adv.softmax(-1, Kind::Float);
    let wrong = p_adv.detach().scatter_value(1, &y1, -1.0).argmax(1, true);
    let log_rest = (p_adv.neg() + 1.0001 + 1e-12).log();
    let bce =
        ce_rows(adv, y).mean(Kind::Float) - log_rest.gather(1, &wrong, false).mean(Kind::Float);
    let p_clean = clean.softmax(-1, Kind::Float);
    let kl = (&p_adv + 1e-12)
        .log()
        .kl_div(&p_clean, tch::Reduction::None, false)
        .sum_dim_intlist([1].as_slice(), false, Kind::Float);
    let unsure = p_clean.gather(1, &y1, false).squeeze_dim(1).neg() + 1.000_000_1;
    bce + per_batch(&(kl * unsure), n) * beta
}
