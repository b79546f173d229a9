//! GAIRAT, Zhang et al. 2021, "Geometry-aware Instance-reweighted Adversarial Training": Madry's
//! cross-entropy at the PGD point, each sample weighted by how few PGD iterates it withstood
//! (κ, its "geometry value"): samples close to the boundary weigh more. As in the reference,
//! the weights are the `Tanh` assignment with λ = 1, switched on after the first 30% of the
//! epochs (30 of its 100); before that the loss is Madry's.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{ce_rows, madry, weighted_mean, Batch, Points};
use crate::model::native::NativeClassifier;
use crate::train::pgd::{cross_entropy, pgd_observed, PgdConfig};
use crate::util::Progress;

/// λ of the weight assignment (the reference's `adjust_Lambda`, schedule `fixed`).
const LAMBDA: f64 = 1.0;

/// Fraction of the epochs trained with Madry's loss before the reweighting starts.
const BEGIN_FRACTION: f64 = 0.3;

/// PGD on cross-entropy, counting for each row the iterates (start included, final point not)
/// that the model still classifies correctly.
pub fn adversary(
    model: &NativeClassifier,
    b: &Batch,
    attack: &PgdConfig,
    progress: &dyn Progress,
) -> Result<Points> {
    let mut kappa = Tensor::zeros([b.seeds.len() as i64], (Kind::Float, b.x.device()));
    let adv = pgd_observed(
        model,
        b.x,
        b.seeds,
        attack,
        cross_entropy(b.y),
        progress,
        |logits| kappa += logits.argmax(1, false).eq_tensor(b.y).to_kind(Kind::Float),
    )?;
    Ok(Points {
        adv,
        kappa: Some(kappa),
        distance: None,
    })
}

/// Whether 0-based `epoch` of `epochs` reweights.
fn reweighting(epoch: usize, epochs: usize) -> bool {
    epoch as f64 >= BEGIN_FRACTION * epochs as f64
}

/// Per-row weights `[N]` from `kappa` (out of `steps` ≥ 2 iterates): `(tanh(λ + 5 (h − κ) / h)
/// + 1) / 2` with `h = ⌊steps / 2⌋`, normalised to mean 1.
pub fn weights(kappa: &Tensor, steps: usize) -> Tensor {
    let h = (steps / 2) as f64;
    let w = (((kappa.neg() + h) * (5.0 / h) + LAMBDA).tanh() + 1.0) / 2.0;
    let n = w.size()[0] as f64;
    &w * n / w.sum(Kind::Float)
}

/// Cross-entropy at the adversarial points, GAIRAT-weighted once `epoch` reaches the start.
pub fn loss(
    adv: &Tensor,
    y: &Tensor,
    kappa: &Tensor,
    steps: usize,
    epoch: usize,
    epochs: usize,
) -> Tensor {
    if reweighting(epoch, epochs) {
        weighted_mean(&ce_rows(adv, y), &weights(kappa, steps))
    } else {
        madry::loss(adv, y)
    }
}
