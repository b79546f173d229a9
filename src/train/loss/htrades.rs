//! HTRADES, the reference code's entropy variant of TRADES (`htrades_loss`; no paper): PGD
//! maximises the squared gap between the predictive entropies at the adversarial point and at
//! the clean input; the loss is clean cross-entropy plus β times the squared distance between
//! the adversarial log-probabilities and the clean probabilities, as the reference writes it.

use tch::{Kind, Tensor};

use super::per_batch;

/// Predictive entropy `−Σ_j p_j log p_j` per row.
fn entropy(logits: &Tensor) -> Tensor {
    let log_p = logits.log_softmax(-1, Kind::Float);
    -(log_p.exp() * log_p).sum_dim_intlist([1].as_slice(), false, Kind::Float)
}

/// PGD's objective `[N]`: `(H(adv) − H(clean))²` for fixed clean logits.
pub fn entropy_gap(clean: &Tensor) -> impl Fn(&Tensor) -> Tensor + '_ {
    let h_clean = entropy(clean).detach();
    move |adv: &Tensor| (entropy(adv) - &h_clean).square()
}

/// `CE(clean, y) + β · Σ_ij (log(p'_ij + 1e-12) − p_ij)² / N`, `p'` adversarial and `p` clean
/// probabilities (the reference's 1e-12 kept: it bounds the log of a vanishing probability, and
/// with it the loss).
pub fn loss(clean: &Tensor, adv: &Tensor, y: &Tensor, beta: f64) -> Tensor {
    let log_adv = (adv.softmax(-1, Kind::Float) + 1e-12).log();
    let d = log_adv - clean.softmax(-1, Kind::Float);
    clean.cross_entropy_for_logits(y) + per_batch(&d.square(), clean.size()[0]) * beta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_gap_is_zero_at_the_clean_prediction_only() {
        let clean = Tensor::from_slice(&[2.0f32, 0.0, -1.0, 0.5, 0.5, 0.5]).view([2, 3]);
        let gap = entropy_gap(&clean);
        assert_eq!(Vec::<f32>::try_from(gap(&clean)).unwrap(), [0.0, 0.0]);
        // Row 0 made uniform (maximal entropy ln 3), row 1 made confident.
        let other = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 9.0, 0.0, 0.0]).view([2, 3]);
        let g = Vec::<f32>::try_from(gap(&other)).unwrap();
        assert!(g.iter().all(|&v| v > 0.1), "{g:?}");
    }
}
