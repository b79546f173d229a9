//! Detection of non-robust samples: ROC and precision-recall curves and their summaries,
//! following scikit-learn's definitions so numbers can be compared with published ones.
//!
//! Convention: a higher score means "more likely positive" (for brittle: more likely
//! non-robust, e.g. `-logit_margin`). Every summary is `NaN` (never a panic) when it is
//! undefined: one class absent, empty input, lengths that differ, or a `NaN` score.

use serde::Serialize;

/// ROC curve at every distinct score, as `sklearn.metrics.roc_curve(..., drop_intermediate=False)`:
/// the first point is `(0, 0)` at threshold `+inf`, then one point per distinct score in
/// decreasing order (a sample is flagged when `score >= threshold`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RocCurve {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f64>,
}

/// Precision-recall curve as `sklearn.metrics.precision_recall_curve` (default
/// `drop_intermediate=False`): recall decreasing, ending with the point `(recall 0, precision 1)`
/// that has no threshold, so `thresholds.len() == precision.len() - 1` (increasing).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrCurve {
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub thresholds: Vec<f64>,
}

/// Cumulative false and true positives at each distinct threshold (sklearn `_binary_clf_curve`).
struct Counts {
    fps: Vec<f64>,
    tps: Vec<f64>,
    thresholds: Vec<f64>,
}

fn valid(scores: &[f64], positives: &[bool]) -> bool {
    !scores.is_empty() && scores.len() == positives.len() && !scores.iter().any(|s| s.is_nan())
}

fn counts(scores: &[f64], positives: &[bool]) -> Counts {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut fps, mut tps, mut thresholds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in idx.iter().enumerate() {
        if positives[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        // Emit a point at the last sample of each run of equal scores.
        if idx.get(k + 1).is_none_or(|&j| scores[j] != scores[i]) {
            fps.push(fp);
            tps.push(tp);
            thresholds.push(scores[i]);
        }
    }
    Counts {
        fps,
        tps,
        thresholds,
    }
}

/// The full ROC curve; `fpr` (`tpr`) is all `NaN` when there is no negative (positive).
pub fn roc_curve(scores: &[f64], positives: &[bool]) -> RocCurve {
    if !valid(scores, positives) {
        return RocCurve {
            fpr: vec![],
            tpr: vec![],
            thresholds: vec![],
        };
    }
    let c = counts(scores, positives);
    let (nf, nt) = (c.fps[c.fps.len() - 1], c.tps[c.tps.len() - 1]);
    let div = |v: &[f64], d: f64| -> Vec<f64> {
        std::iter::once(0.0)
            .chain(v.iter().copied())
            .map(|a| if d > 0.0 { a / d } else { f64::NAN })
            .collect()
    };
    RocCurve {
        fpr: div(&c.fps, nf),
        tpr: div(&c.tps, nt),
        thresholds: std::iter::once(f64::INFINITY).chain(c.thresholds).collect(),
    }
}

/// Trapezoidal area under `y(x)` for `x` monotone (either direction), as `sklearn.metrics.auc`.
fn trapezoid(x: &[f64], y: &[f64]) -> f64 {
    if x.len() < 2 || x.iter().chain(y).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let area: f64 = x
        .windows(2)
        .zip(y.windows(2))
        .map(|(xw, yw)| (xw[1] - xw[0]) * (yw[0] + yw[1]) / 2.0)
        .sum();
    area.abs()
}

/// Area under the ROC curve (`sklearn.metrics.roc_auc_score`): the probability that a random
/// positive scores above a random negative, ties counting 1/2.
pub fn auroc(scores: &[f64], positives: &[bool]) -> f64 {
    let roc = roc_curve(scores, positives);
    trapezoid(&roc.fpr, &roc.tpr)
}

/// The precision-recall curve; empty when the input is invalid. With no positive, recall is
/// 1 everywhere (as sklearn).
pub fn precision_recall_curve(scores: &[f64], positives: &[bool]) -> PrCurve {
    if !valid(scores, positives) {
        return PrCurve {
            precision: vec![],
            recall: vec![],
            thresholds: vec![],
        };
    }
    let c = counts(scores, positives);
    let nt = c.tps[c.tps.len() - 1];
    let mut precision: Vec<f64> = c
        .tps
        .iter()
        .zip(&c.fps)
        .rev()
        .map(|(&t, &f)| if t + f > 0.0 { t / (t + f) } else { 0.0 })
        .collect();
    let mut recall: Vec<f64> = c
        .tps
        .iter()
        .rev()
        .map(|&t| if nt > 0.0 { t / nt } else { 1.0 })
        .collect();
    precision.push(1.0);
    recall.push(0.0);
    PrCurve {
        precision,
        recall,
        thresholds: c.thresholds.into_iter().rev().collect(),
    }
}

/// Area under the precision-recall curve by the trapezoidal rule, as
/// `sklearn.metrics.auc(recall, precision)` on [`precision_recall_curve`]. `NaN` without
/// positives or negatives.
pub fn aupr(scores: &[f64], positives: &[bool]) -> f64 {
    if !both_classes(positives) {
        return f64::NAN;
    }
    let pr = precision_recall_curve(scores, positives);
    trapezoid(&pr.recall, &pr.precision)
}

/// Average precision, `Σ (R_n - R_{n-1}) P_n` (step-wise, no interpolation), as
/// `sklearn.metrics.average_precision_score`. `NaN` without positives or negatives.
pub fn average_precision(scores: &[f64], positives: &[bool]) -> f64 {
    if !both_classes(positives) {
        return f64::NAN;
    }
    let pr = precision_recall_curve(scores, positives);
    if pr.recall.is_empty() {
        return f64::NAN;
    }
    pr.recall
        .windows(2)
        .zip(&pr.precision)
        .map(|(r, p)| (r[0] - r[1]) * p)
        .sum()
}

fn both_classes(positives: &[bool]) -> bool {
    positives.iter().any(|&p| p) && positives.iter().any(|&p| !p)
}

/// False-positive rate at the first point of the full ROC curve ([`roc_curve`]) whose
/// true-positive rate reaches `target_tpr` — i.e. the smallest FPR among all thresholds with
/// `tpr >= target_tpr` — and that threshold (flag when `score >= threshold`). This is the usual
/// "FPR@95TPR" computed from `roc_curve(drop_intermediate=False)`. `(NaN, NaN)` when undefined.
pub fn fpr_at_tpr(scores: &[f64], positives: &[bool], target_tpr: f64) -> (f64, f64) {
    if !both_classes(positives) {
        return (f64::NAN, f64::NAN);
    }
    let roc = roc_curve(scores, positives);
    match roc.tpr.iter().position(|&t| t >= target_tpr) {
        Some(i) => (roc.fpr[i], roc.thresholds[i]),
        None => (f64::NAN, f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_sized_example() {
        // sklearn docs example: roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.75.
        let s = [0.1, 0.4, 0.35, 0.8];
        let p = [false, false, true, true];
        assert!((auroc(&s, &p) - 0.75).abs() < 1e-15);
        let roc = roc_curve(&s, &p);
        assert_eq!(roc.tpr, vec![0.0, 0.5, 0.5, 1.0, 1.0]);
        assert_eq!(roc.thresholds[0], f64::INFINITY);
        // average_precision_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.8333...
        assert!((average_precision(&s, &p) - 5.0 / 6.0).abs() < 1e-15);
        assert_eq!(fpr_at_tpr(&s, &p, 0.95), (0.5, 0.35));
    }

    #[test]
    fn absent_class_or_bad_input_is_nan() {
        assert!(auroc(&[0.1, 0.2], &[true, true]).is_nan());
        assert!(aupr(&[0.1, 0.2], &[false, false]).is_nan());
        assert!(average_precision(&[0.1, 0.2], &[true, true]).is_nan());
        assert!(fpr_at_tpr(&[0.1, 0.2], &[true, true], 0.95).0.is_nan());
        assert!(auroc(&[0.1, f64::NAN], &[true, false]).is_nan());
        assert!(auroc(&[0.1], &[true, false]).is_nan());
        assert!(auroc(&[], &[]).is_nan());
    }
}
