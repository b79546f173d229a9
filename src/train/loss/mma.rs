//! MMA, Ding et al. 2020, "MMA Training: Direct Input Space Margin Maximization through
//! Adversarial Training", and the reference's simplified fixed-ε variant.
//!
//! MMA maximises each correctly classified sample's input margin: its adversarial point is the
//! shortest successful perturbation (here brittle's FMN, [`crate::attack::fmn`], in place of the
//! paper's AN-PGD), so each sample gets its own ε; the cross-entropy there is a surrogate whose
//! parameter gradient is parallel to the margin's (the paper's Proposition 2.1). Samples whose
//! margin reaches the maximum ε (the paper's hinge `d_max`) drop out of that term; misclassified
//! ones contribute their clean cross-entropy. As in the authors' code, a third of the loss is the
//! clean cross-entropy of the whole batch.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{ce_rows, per_batch, Batch, Points};
use crate::attack::driver::Chunk;
use crate::attack::fmn::Fmn;
use crate::attack::misclassified;
use crate::model::native::NativeClassifier;
use crate::model::Classifier;
use crate::train::pgd::PgdConfig;
use crate::util::Progress;

/// Bisection steps on the segment from the clean input to FMN's point: as the paper's AN-PGD
/// ends, so the point sits on the boundary. Measured on a small-cnn@8 MMA-trained for 4 epochs
/// (200 MNIST images, L∞): FMN-10 alone median distance 0.260, with these 10 steps 0.204 (FMN-20:
/// 0.204 at twice the cost; FMN-40: 0.139), for 28% more time than FMN-10.
const BISECTION_STEPS: usize = 10;

/// Weight of the clean cross-entropy (the authors' `clean_loss_coeff`, 1/3 for their MMA models).
const CLEAN_WEIGHT: f64 = 1.0 / 3.0;

/// FMN (`attack.steps` iterations, in `attack.norm`) from every clean input, then a bisection
/// towards it ([`Chunk::refine`]); the points within `attack.eps` are the adversarial points, the
/// other rows keep their clean input.
pub fn adversary(
    model: &NativeClassifier,
    b: &Batch,
    attack: &PgdConfig,
    progress: &dyn Progress,
) -> Result<Points> {
    let clean = tch::no_grad(|| model.logits(b.x))?;
    let already = Vec::<bool>::try_from(misclassified(&clean, b.y).to_device(tch::Device::Cpu))?;
    let mut chunk = Chunk::new(
        b.x.detach(),
        b.y.shallow_clone(),
        b.seeds.to_vec(),
        &already,
    );
    let fmn = Fmn::new(attack.norm, attack.steps);
    chunk.run_with(model, attack.norm, &fmn, b.seeds.len(), progress)?;
    chunk.refine(model, attack.norm, BISECTION_STEPS, b.seeds.len())?;
    let inside = chunk
        .best
        .lt(attack.eps)
        .unsqueeze(-1)
        .unsqueeze(-1)
        .unsqueeze(-1);
    Ok(Points {
        adv: chunk.best_adv.where_self(&inside, b.x),
        kappa: None,
        distance: Some(chunk.best),
    })
}

/// `(1 − c) · (Σ_{correct, d_i < ε} CE(adv_i) + Σ_{wrong} CE(clean_i)) / N + c · CE(clean)`,
/// `c` = [`CLEAN_WEIGHT`], "correct" by the clean logits, `d` the found distances.
pub fn loss(clean: &Tensor, adv: &Tensor, y: &Tensor, distance: &Tensor, eps: f64) -> Tensor {
    let correct = clean.detach().argmax(1, false).eq_tensor(y);
    let on_margin = correct.logical_and(&distance.lt(eps)).to_kind(Kind::Float);
    let wrong = correct.logical_not().to_kind(Kind::Float);
    let ce_clean = ce_rows(clean, y);
    let margin = per_batch(
        &(ce_rows(adv, y) * on_margin + &ce_clean * wrong),
        clean.size()[0],
    );
    margin * (1.0 - CLEAN_WEIGHT) + ce_clean.mean(Kind::Float) * CLEAN_WEIGHT
}

/// The reference's `mma_loss` (after Wang et al. 2020, Table 1): at a fixed ε, cross-entropy at
/// the PGD point for correctly classified samples, at the clean input for the others, summed
/// and divided by the batch size.
pub fn fixed_loss(clean: &Tensor, adv: &Tensor, y: &Tensor) -> Tensor {
    let correct = clean
        .detach()
        .argmax(1, false)
        .eq_tensor(y)
        .to_kind(Kind::Float);
    let wrong = correct.ones_like() - &correct;
    per_batch(
        &(ce_rows(clean, y) * wrong + ce_rows(adv, y) * correct),
        clean.size()[0],
    )
}
