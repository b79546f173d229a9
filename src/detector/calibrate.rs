//! The threshold λ of a detector that flags a decision as brittle when its score is ≤ λ.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// What a threshold achieves on a labelled set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Share of non-robust samples flagged.
    pub tpr: f64,
    /// Share of robust samples flagged (`None` when the set has no robust sample).
    pub fpr: Option<f64>,
    /// Non-robust samples (positives).
    pub positives: usize,
    /// Robust samples (negatives).
    pub negatives: usize,
}

/// TPR and FPR of the rule `score <= lambda` against `nonrobust` labels.
pub fn rates(scores: &[f64], nonrobust: &[bool], lambda: f64) -> Rates {
    let (mut tp, mut fp, mut p, mut n) = (0usize, 0usize, 0usize, 0usize);
    for (&s, &y) in scores.iter().zip(nonrobust) {
        let flagged = s <= lambda;
        if y {
            p += 1;
            tp += usize::from(flagged);
        } else {
            n += 1;
            fp += usize::from(flagged);
        }
    }
    Rates {
        tpr: if p == 0 {
            f64::NAN
        } else {
            tp as f64 / p as f64
        },
        fpr: (n > 0).then(|| fp as f64 / n as f64),
        positives: p,
        negatives: n,
    }
}

/// The smallest λ such that `score <= λ` flags at least `target_tpr` of the non-robust samples:
/// the ⌈target·P⌉-th smallest score among the P positives. Returns λ and the rates it achieves.
pub fn calibrate(scores: &[f64], nonrobust: &[bool], target_tpr: f64) -> Result<(f64, Rates)> {
    ensure!(
        scores.len() == nonrobust.len(),
        "{} scores but {} labels",
        scores.len(),
        nonrobust.len()
    );
    ensure!(
        target_tpr > 0.0 && target_tpr <= 1.0,
        "target TPR {target_tpr} must be in (0, 1]"
    );
    ensure!(
        scores.iter().all(|s| !s.is_nan()),
        "a score is NaN; cannot calibrate"
    );
    let mut pos: Vec<f64> = scores
        .iter()
        .zip(nonrobust)
        .filter(|(_, &y)| y)
        .map(|(&s, _)| s)
        .collect();
    ensure!(
        !pos.is_empty(),
        "the calibration set has no non-robust sample (input margin <= eps): nothing to calibrate on; \
         use a larger eps or more samples"
    );
    pos.sort_by(f64::total_cmp);
    let k = ((target_tpr * pos.len() as f64).ceil() as usize).clamp(1, pos.len());
    let lambda = pos[k - 1];
    Ok((lambda, rates(scores, nonrobust, lambda)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_the_target_quantile_of_positive_scores() {
        // Positives 0.1..1.0 (10 of them), negatives 0.55 and 2.0.
        let mut s: Vec<f64> = (1..=10).map(|i| i as f64 / 10.0).collect();
        let mut y = vec![true; 10];
        s.extend([0.55, 2.0]);
        y.extend([false, false]);
        let (lambda, r) = calibrate(&s, &y, 0.95).unwrap();
        assert_eq!(lambda, 1.0); // ceil(9.5) = 10th smallest
        assert_eq!(r.tpr, 1.0);
        assert_eq!(r.fpr, Some(0.5));
        let (lambda, r) = calibrate(&s, &y, 0.5).unwrap();
        assert_eq!(lambda, 0.5);
        assert_eq!(r.tpr, 0.5);
        assert_eq!(r.fpr, Some(0.0));
        assert!(calibrate(&s, &[false; 12], 0.9).is_err());
        assert!(calibrate(&s, &y, 1.5).is_err());
    }
}
