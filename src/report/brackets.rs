//! Margin brackets: with a `certified_radius` column (`brittle margins --certify`) each sample's
//! true input margin lies in `[certified_radius, input_margin]`. The report gives the bracket
//! ratio (upper / lower), the share of samples certified robust at each ε beside the share the
//! attack leaves robust, Kendall τ with the logit margin and the detection AUROC on each bound,
//! and counts any sample whose lower bound exceeds its upper bound (a soundness failure).

use serde::{Deserialize, Serialize};

use super::analysis::EpsValue;
use super::nan::null_is_nan;
use crate::margins::MarginRow;
use crate::metrics::bootstrap::quantile;
use crate::metrics::{correlation, roc};

/// Quantiles of a distribution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quantiles {
    #[serde(deserialize_with = "null_is_nan")]
    pub q10: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub q25: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub median: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub q75: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub q90: f64,
}

/// One bound's view of detection at one ε: AUROC of `-logit_margin` for "bound ≤ ε".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoundDetection {
    #[serde(deserialize_with = "null_is_nan")]
    pub eps: f64,
    pub eps_label: String,
    #[serde(deserialize_with = "null_is_nan")]
    pub auroc_lower: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub auroc_upper: f64,
}

/// The bracket section of `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Brackets {
    /// Samples with both bounds (successful attack, certified radius present).
    pub n: usize,
    /// Of those, samples certified at no ε (radius 0): their ratio is infinite.
    pub n_uncertified: usize,
    /// Samples whose certified radius exceeds the attack's margin (must be 0).
    pub violations: usize,
    /// `input_margin / certified_radius` over the samples with a positive radius.
    pub ratio: Quantiles,
    /// Share of all rows correctly classified and certified robust (`certified_radius > ε`).
    pub certified_accuracy: Vec<EpsValue>,
    /// Kendall τ-b of the logit margin with the lower bound and with the upper bound.
    #[serde(deserialize_with = "null_is_nan")]
    pub kendall_tau_lower: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub kendall_tau_upper: f64,
    pub detection: Vec<BoundDetection>,
}

/// The bracket numbers, when every row has a certified radius.
pub fn brackets(rows: &[MarginRow], sweep: &[(String, f64)]) -> Option<Brackets> {
    let lower: Vec<f64> = rows
        .iter()
        .map(|r| r.certified_radius)
        .collect::<Option<Vec<f64>>>()
        .filter(|v| !v.is_empty())?;
    let both: Vec<(&MarginRow, f64)> = rows
        .iter()
        .zip(&lower)
        .filter(|(r, _)| r.success == 1)
        .map(|(r, l)| (r, *l))
        .collect();
    let mut ratios: Vec<f64> = both
        .iter()
        .filter(|(_, l)| *l > 0.0)
        .map(|(r, l)| r.input_margin / l)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let q = |p| quantile(&ratios, p);
    let lm: Vec<f64> = both.iter().map(|(r, _)| r.logit_margin).collect();
    let neg_lm: Vec<f64> = lm.iter().map(|v| -v).collect();
    let lo: Vec<f64> = both.iter().map(|(_, l)| *l).collect();
    let up: Vec<f64> = both.iter().map(|(r, _)| r.input_margin).collect();
    let auroc = |bound: &[f64], eps: f64| {
        let pos: Vec<bool> = bound.iter().map(|&d| d <= eps).collect();
        roc::auroc(&neg_lm, &pos)
    };
    Some(Brackets {
        n: both.len(),
        n_uncertified: both.iter().filter(|(_, l)| *l <= 0.0).count(),
        violations: both.iter().filter(|(r, l)| *l > r.input_margin).count(),
        ratio: Quantiles {
            q10: q(0.1),
            q25: q(0.25),
            median: q(0.5),
            q75: q(0.75),
            q90: q(0.9),
        },
        certified_accuracy: sweep
            .iter()
            .map(|(label, eps)| EpsValue {
                eps: *eps,
                eps_label: label.clone(),
                value: rows
                    .iter()
                    .zip(&lower)
                    .filter(|(r, l)| r.correct == 1 && **l > *eps)
                    .count() as f64
                    / rows.len() as f64,
            })
            .collect(),
        kendall_tau_lower: correlation::kendall_tau_b(&lo, &lm),
        kendall_tau_upper: correlation::kendall_tau_b(&up, &lm),
        detection: sweep
            .iter()
            .map(|(label, eps)| BoundDetection {
                eps: *eps,
                eps_label: label.clone(),
                auroc_lower: auroc(&lo, *eps),
                auroc_upper: auroc(&up, *eps),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(index: usize, lower: f64, upper: f64, logit: f64) -> MarginRow {
        MarginRow {
            index,
            label: 0,
            pred: 0,
            correct: 1,
            logit_margin: logit,
            input_margin: upper,
            attack: "fmn".into(),
            success: 1,
            forwards: 1,
            backwards: 1,
            seconds: 0.0,
            prob_margin: None,
            max_prob: None,
            entropy: None,
            energy: None,
            feature_margin: None,
            certified_radius: Some(lower),
            pseudo_margin: None,
        }
    }

    #[test]
    fn ratios_shares_and_violations_by_hand() {
        let rows = vec![
            row(0, 0.01, 0.02, 1.0),
            row(1, 0.02, 0.03, 2.0),
            row(2, 0.0, 0.01, 0.5),
            row(3, 0.05, 0.04, 3.0),
        ];
        let b = brackets(&rows, &[("e".into(), 0.015)]).unwrap();
        assert_eq!((b.n, b.n_uncertified, b.violations), (4, 1, 1));
        // Ratios 2, 1.5, 0.8 → sorted 0.8, 1.5, 2: median 1.5.
        assert!((b.ratio.median - 1.5).abs() < 1e-12);
        // Certified above 0.015: rows 1 and 3.
        assert!((b.certified_accuracy[0].value - 0.5).abs() < 1e-12);
        // The lower bounds order the samples as the logit margins do, bar the zero.
        assert!(b.kendall_tau_lower > 0.9 && b.kendall_tau_upper > 0.3);
        let mut none = rows.clone();
        none[1].certified_radius = None;
        assert!(brackets(&none, &[]).is_none());
    }
}
