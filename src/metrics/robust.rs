//! Robust accuracy from attacks, and its sample-efficient estimate from logit margins.
//!
//! Robust accuracy at ε is the fraction of samples that are correctly classified and whose
//! input margin exceeds ε. The estimate attacks only a small subset, calibrates a logit-margin
//! threshold λ on it, and then calls every sample with `correct && logit_margin > λ` robust.

use serde::Serialize;

/// Fraction of samples with `correct && input_margin > eps` (`NaN` when empty). A failed attack
/// (`input_margin = inf`) counts as robust, the usual convention for attack-based robust accuracy.
pub fn robust_accuracy(correct: &[bool], input_margin: &[f64], eps: f64) -> f64 {
    fraction(
        correct
            .iter()
            .zip(input_margin)
            .map(|(&c, &d)| c && d > eps),
    )
}

fn fraction(it: impl Iterator<Item = bool>) -> f64 {
    let (mut k, mut n) = (0usize, 0usize);
    for b in it {
        k += b as usize;
        n += 1;
    }
    if n == 0 {
        f64::NAN
    } else {
        k as f64 / n as f64
    }
}

/// How λ is chosen on the attacked subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    /// λ flags exactly as many subset samples (`logit_margin <= λ`) as the attack found
    /// non-robust (`input_margin <= ε`): the flagged fraction is then the subset's non-robust
    /// fraction, so the whole-set estimate inherits that unbiased rate while the logit margin
    /// decides *which* samples (it matters through the `correct` term). The default, because
    /// the goal is a fraction, not per-sample decisions.
    QuantileMatch,
    /// λ maximises balanced accuracy `(TPR + TNR) / 2` of `logit_margin <= λ` against
    /// `input_margin <= ε` on the subset (falls back to quantile matching when the subset has one
    /// class). Good per-sample separation, but its flagged count is biased when classes are
    /// imbalanced, so the robust-accuracy estimate is biased too; reported for comparison.
    BalancedAccuracy,
}

/// The logit-margin threshold λ calibrated on a subset (flag non-robust when `logit_margin <= λ`).
/// Midpoints between consecutive sorted margins; `-inf` flags nothing, `+inf` flags everything.
pub fn calibrate(logit_margin: &[f64], input_margin: &[f64], eps: f64, how: Calibration) -> f64 {
    let mut idx: Vec<usize> = (0..logit_margin.len()).collect();
    idx.sort_by(|&a, &b| logit_margin[a].total_cmp(&logit_margin[b]));
    let lm: Vec<f64> = idx.iter().map(|&i| logit_margin[i]).collect();
    let pos: Vec<bool> = idx.iter().map(|&i| input_margin[i] <= eps).collect();
    let n = lm.len();
    let n_pos = pos.iter().filter(|&&p| p).count();
    // Threshold that flags the k smallest margins.
    let cut = |k: usize| -> f64 {
        match k {
            0 => f64::NEG_INFINITY,
            k if k >= n => f64::INFINITY,
            k => (lm[k - 1] + lm[k]) / 2.0,
        }
    };
    if how == Calibration::QuantileMatch || n_pos == 0 || n_pos == n {
        return cut(n_pos);
    }
    let n_neg = (n - n_pos) as f64;
    let (mut best, mut best_k) = (f64::NEG_INFINITY, 0);
    let (mut tp, mut fp) = (0usize, 0usize);
    for k in 0..=n {
        // Only cut between distinct margins, so ties are flagged together.
        if k == 0 || k == n || lm[k - 1] != lm[k] {
            let ba = (tp as f64 / n_pos as f64 + (n_neg - fp as f64) / n_neg) / 2.0;
            if ba > best {
                best = ba;
                best_k = k;
            }
        }
        if k < n {
            if pos[k] {
                tp += 1;
            } else {
                fp += 1;
            }
        }
    }
    cut(best_k)
}

/// Estimated robust accuracy: fraction with `correct && logit_margin > lambda`.
pub fn estimate(correct: &[bool], logit_margin: &[f64], lambda: f64) -> f64 {
    fraction(
        correct
            .iter()
            .zip(logit_margin)
            .map(|(&c, &m)| c && m > lambda),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_separates_a_clean_split() {
        let lm = [0.1, 0.5, 0.2, 3.0, 2.0, 4.0];
        let d = [0.01, 0.02, 0.01, 0.5, 0.4, 0.6];
        for how in [Calibration::QuantileMatch, Calibration::BalancedAccuracy] {
            let l = calibrate(&lm, &d, 0.1, how);
            assert_eq!(l, 1.25, "{how:?}");
            assert_eq!(
                estimate(&[true; 6], &lm, l),
                robust_accuracy(&[true; 6], &d, 0.1)
            );
        }
        assert_eq!(
            calibrate(&lm, &d, 1.0, Calibration::BalancedAccuracy),
            f64::INFINITY
        );
        assert_eq!(
            calibrate(&lm, &d, 0.001, Calibration::QuantileMatch),
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn balanced_accuracy_differs_from_quantile_on_imbalanced_overlap() {
        // One positive hidden among large margins: quantile flags 1 (the wrong one),
        // balanced accuracy flags up to the positive.
        let lm = [1.0, 2.0, 3.0, 4.0, 5.0];
        let d = [0.5, 0.01, 0.5, 0.5, 0.5];
        assert_eq!(calibrate(&lm, &d, 0.1, Calibration::QuantileMatch), 1.5);
        assert_eq!(calibrate(&lm, &d, 0.1, Calibration::BalancedAccuracy), 2.5);
        let correct = [true, true, false, true, true];
        assert_eq!(
            robust_accuracy(&correct, &[0.5, 0.01, f64::INFINITY, 0.5, 0.5], 0.1),
            0.6
        );
    }
}
