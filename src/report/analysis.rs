//! The numbers of a margin-consistency report, computed from the rows of a margins file.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::brackets::{brackets, Brackets};
use super::nan::null_is_nan;
use crate::margins::MarginRow;
use crate::metrics::robust::{self, Calibration};
use crate::metrics::{bootstrap, correlation, roc};
use crate::norm::{parse_eps, Norm};
use crate::provenance::Provenance;
use crate::util::{Check, Checked, OptionError};

/// What `analyze` computes and how, before [`Check::check`]; [`analyze`] takes it checked.
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    pub norm: Norm,
    /// ε values as written (`8/255`, `0.5`), which label the output; empty: [`default_eps`].
    pub eps: Vec<String>,
    /// Input shape of the attacked images (from the margins sidecar): bounds ε in L2 and L1
    /// (`None`: only L∞'s bound of 1 is known).
    pub input_shape: Option<[i64; 3]>,
    pub seed: u64,
    /// Bootstrap resamples for the 95% intervals (0: no intervals).
    pub bootstrap: usize,
    /// Attacked-subset size for the robust-accuracy estimate (`None`: no estimate).
    pub subset: Option<usize>,
    /// Repeats of the subset estimate.
    pub repeats: usize,
    pub provenance: Provenance,
}

impl Check for AnalyzeOptions {
    /// Every ε parses and lies inside the pixel box for the norm; the subset, the repeats and
    /// the bootstrap can give a number.
    fn validate(&self) -> Result<()> {
        for text in &self.eps {
            parse_eps(text)
                .and_then(|v| self.norm.check_eps(v, self.input_shape))
                .map_err(|e| OptionError::new("eps", format!("{e:#}")).with_value(text.as_str()))?;
        }
        ensure!(
            self.subset != Some(0),
            OptionError::new("subset", "the subset size must be positive")
        );
        ensure!(
            self.repeats > 0,
            OptionError::new("repeats", "the repeats must be positive")
        );
        ensure!(
            self.bootstrap != 1,
            OptionError::new(
                "bootstrap",
                "one resample has no spread: ask for 0 (no intervals) or at least 2"
            )
        );
        Ok(())
    }
}

impl Checked<AnalyzeOptions> {
    /// The ε sweep: `(label as written, value)`, e.g. `("8/255", 0.0314)`.
    pub fn sweep(&self) -> Vec<(String, f64)> {
        if self.eps.is_empty() {
            return default_eps(self.norm);
        }
        self.eps
            .iter()
            .map(|t| (t.clone(), parse_eps(t).expect("checked")))
            .collect()
    }
}

/// The default ε sweep of a norm: L∞ 2,4,8,12,16,32 /255; L2 0.25, 0.5, 1.0; L1 as the
/// common CIFAR-10 budgets 4, 8, 12.
pub fn default_eps(norm: Norm) -> Vec<(String, f64)> {
    let list: Vec<(String, f64)> = match norm {
        Norm::Linf => [2, 4, 8, 12, 16, 32]
            .iter()
            .map(|k| (format!("{k}/255"), *k as f64 / 255.0))
            .collect(),
        Norm::L2 => [0.25, 0.5, 1.0]
            .iter()
            .map(|v| (v.to_string(), *v))
            .collect(),
        Norm::L1 => [4.0, 8.0, 12.0]
            .iter()
            .map(|v| (v.to_string(), *v))
            .collect(),
    };
    list
}

/// A free score column and the sign that makes larger = more robust.
#[derive(Debug, Clone, Copy)]
pub struct ScoreSpec {
    pub name: &'static str,
    /// `+1`: larger is already more robust; `-1`: the column is negated (entropy, energy).
    pub sign: f64,
    get: fn(&MarginRow) -> Option<f64>,
}

impl ScoreSpec {
    /// One line of [`SCORES`].
    const fn new(name: &'static str, sign: f64, get: fn(&MarginRow) -> Option<f64>) -> Self {
        ScoreSpec { name, sign, get }
    }
}

/// Every score brittle compares with the input margin, in display order. Entropy is negated
/// (low entropy = confident) and so is energy (`-logsumexp`, lower = more confident).
pub const SCORES: [ScoreSpec; 7] = [
    ScoreSpec::new("logit_margin", 1.0, |r| Some(r.logit_margin)),
    ScoreSpec::new("prob_margin", 1.0, |r| r.prob_margin),
    ScoreSpec::new("max_prob", 1.0, |r| r.max_prob),
    ScoreSpec::new("entropy", -1.0, |r| r.entropy),
    ScoreSpec::new("energy", -1.0, |r| r.energy),
    ScoreSpec::new("feature_margin", 1.0, |r| r.feature_margin),
    ScoreSpec::new("pseudo_margin", 1.0, |r| r.pseudo_margin),
];

/// Correlations of a score with the input margin, with 95% bootstrap intervals: of every score
/// ([`Consistency`]) and, at the top of [`Analysis`], of the logit margin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Correlations {
    #[serde(deserialize_with = "null_is_nan")]
    pub kendall_tau: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub kendall_tau_ci: [f64; 2],
    #[serde(deserialize_with = "null_is_nan")]
    pub pearson: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub pearson_ci: [f64; 2],
    #[serde(deserialize_with = "null_is_nan")]
    pub spearman: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub spearman_ci: [f64; 2],
}

impl Correlations {
    /// Every statistic undefined (no row has the score).
    const UNDEFINED: Correlations = Correlations {
        kendall_tau: f64::NAN,
        kendall_tau_ci: [f64::NAN; 2],
        pearson: f64::NAN,
        pearson_ci: [f64::NAN; 2],
        spearman: f64::NAN,
        spearman_ci: [f64::NAN; 2],
    };
}

/// Correlations of one oriented score with the input margin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Consistency {
    /// `"+name"` or `"-name"`: the quantity actually correlated (larger = more robust).
    pub oriented: String,
    #[serde(flatten)]
    pub correlations: Correlations,
}

/// Detection summary of one score at one ε.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectionSummary {
    #[serde(deserialize_with = "null_is_nan")]
    pub auroc: f64,
    /// Trapezoidal area under the precision-recall curve (sklearn `auc(recall, precision)`).
    #[serde(deserialize_with = "null_is_nan")]
    pub aupr: f64,
    /// Step-wise area (sklearn `average_precision_score`).
    #[serde(deserialize_with = "null_is_nan")]
    pub average_precision: f64,
    /// Smallest FPR with TPR ≥ 0.95 on the full ROC curve.
    #[serde(deserialize_with = "null_is_nan")]
    pub fpr_at_95_tpr: f64,
}

/// A curve as two coordinate lists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curve {
    #[serde(deserialize_with = "null_is_nan")]
    pub x: Vec<f64>,
    #[serde(deserialize_with = "null_is_nan")]
    pub y: Vec<f64>,
}

/// Detection of non-robust samples (`input_margin <= eps`) at one ε.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpsDetection {
    #[serde(deserialize_with = "null_is_nan")]
    pub eps: f64,
    pub eps_label: String,
    pub positives: usize,
    pub negatives: usize,
    /// Of the score `-logit_margin` (flattened: `metrics.json` lists it beside the fields
    /// above).
    #[serde(flatten)]
    pub logit_margin: DetectionSummary,
    /// λ of that point, on the logit margin: flag non-robust when `logit_margin <= λ`.
    #[serde(deserialize_with = "null_is_nan")]
    pub threshold_at_95_tpr: f64,
    /// Every score (oriented, negated for detection), including `logit_margin`.
    pub scores: BTreeMap<String, DetectionSummary>,
    /// ROC of `-logit_margin`: `x` = FPR, `y` = TPR.
    pub roc: Curve,
    /// PR curve of `-logit_margin`: `x` = recall, `y` = precision.
    pub pr: Curve,
}

/// A value at one ε.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpsValue {
    #[serde(deserialize_with = "null_is_nan")]
    pub eps: f64,
    pub eps_label: String,
    #[serde(deserialize_with = "null_is_nan")]
    pub value: f64,
}

/// Spread of an estimate over the repeats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spread {
    #[serde(deserialize_with = "null_is_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub std: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub min: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub max: f64,
}

/// Sample-efficient robust accuracy at one ε.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RobustEstimate {
    #[serde(deserialize_with = "null_is_nan")]
    pub eps: f64,
    pub eps_label: String,
    pub subset: usize,
    pub repeats: usize,
    /// Attack-based robust accuracy of the whole set, for comparison.
    #[serde(deserialize_with = "null_is_nan")]
    pub attack_based: f64,
    /// λ by quantile matching (the headline estimate; see `metrics::robust::Calibration`).
    pub estimate: Spread,
    pub lambda: Spread,
    /// λ maximising balanced accuracy on the subset, for comparison.
    pub estimate_balanced: Spread,
    /// Robust accuracy measured by attack on the subset alone (what the subset says without margins).
    pub subset_attack_based: Spread,
}

/// Everything `brittle analyze` reports (serialised as `metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Analysis {
    /// Samples analysed (successful attacks).
    pub n: usize,
    /// Samples excluded because the attack failed (`success = 0`).
    pub n_failed: usize,
    /// Rows of the margins file.
    pub n_rows: usize,
    /// Clean accuracy over all rows.
    #[serde(deserialize_with = "null_is_nan")]
    pub accuracy: f64,
    pub norm: Norm,
    /// Between input margin and logit margin (Kendall τ-b: the margin consistency), flattened.
    #[serde(flatten)]
    pub logit_margin: Correlations,
    /// Per score present in the file (all rows have it), including `logit_margin`.
    pub scores: BTreeMap<String, Consistency>,
    pub detection: Vec<EpsDetection>,
    /// Attack-based robust accuracy over all rows (failed attacks count as robust).
    pub robust_accuracy: Vec<EpsValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_estimate: Option<Vec<RobustEstimate>>,
    /// Certified lower bounds beside the attack's upper bounds, when the file has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brackets: Option<Brackets>,
    pub bootstrap: usize,
    pub seed: u64,
    pub provenance: Provenance,
}

/// Oriented values of the scores present in every row, in [`SCORES`] order.
pub fn score_columns(rows: &[&MarginRow]) -> Vec<(ScoreSpec, Vec<f64>)> {
    SCORES
        .iter()
        .filter_map(|s| {
            let v: Option<Vec<f64>> = rows
                .iter()
                .map(|r| (s.get)(r).map(|v| s.sign * v))
                .collect();
            v.filter(|v| !v.is_empty()).map(|v| (*s, v))
        })
        .collect()
}

fn consistency(
    spec: &ScoreSpec,
    d_in: &[f64],
    s: &[f64],
    opts: &AnalyzeOptions,
    k: u64,
) -> Consistency {
    let ci = if opts.bootstrap > 0 {
        bootstrap::intervals(d_in.len(), opts.bootstrap, opts.seed ^ k, |idx| {
            let a: Vec<f64> = idx.iter().map(|&i| d_in[i]).collect();
            let b: Vec<f64> = idx.iter().map(|&i| s[i]).collect();
            vec![
                correlation::kendall_tau_b(&a, &b),
                correlation::pearson(&a, &b),
                correlation::spearman(&a, &b),
            ]
        })
    } else {
        vec![[f64::NAN; 2]; 3]
    };
    Consistency {
        oriented: format!("{}{}", if spec.sign > 0.0 { "+" } else { "-" }, spec.name),
        correlations: Correlations {
            kendall_tau: correlation::kendall_tau_b(d_in, s),
            kendall_tau_ci: ci[0],
            pearson: correlation::pearson(d_in, s),
            pearson_ci: ci[1],
            spearman: correlation::spearman(d_in, s),
            spearman_ci: ci[2],
        },
    }
}

fn summary(score: &[f64], pos: &[bool]) -> DetectionSummary {
    DetectionSummary {
        auroc: roc::auroc(score, pos),
        aupr: roc::aupr(score, pos),
        average_precision: roc::average_precision(score, pos),
        fpr_at_95_tpr: roc::fpr_at_tpr(score, pos, 0.95).0,
    }
}

fn spread(v: &[f64]) -> Spread {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Spread {
        mean,
        std: var.sqrt(),
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// Computes the report's numbers. Never panics on data: undefined statistics are `NaN`
/// (`null` in JSON).
pub fn analyze(rows: &[MarginRow], opts: &Checked<AnalyzeOptions>) -> Analysis {
    let sweep = opts.sweep();
    let used: Vec<&MarginRow> = rows.iter().filter(|r| r.success == 1).collect();
    let d_in: Vec<f64> = used.iter().map(|r| r.input_margin).collect();
    let columns = score_columns(&used);
    let scores: BTreeMap<String, Consistency> = columns
        .iter()
        .enumerate()
        .map(|(k, (spec, s))| {
            (
                spec.name.to_string(),
                consistency(spec, &d_in, s, opts, k as u64),
            )
        })
        .collect();
    let lm: Vec<f64> = used.iter().map(|r| r.logit_margin).collect();
    let neg_lm: Vec<f64> = lm.iter().map(|v| -v).collect();
    let detection = sweep
        .iter()
        .map(|(label, eps)| {
            let pos: Vec<bool> = d_in.iter().map(|&d| d <= *eps).collect();
            let (_, thr) = roc::fpr_at_tpr(&neg_lm, &pos, 0.95);
            let roc = roc::roc_curve(&neg_lm, &pos);
            let pr = roc::precision_recall_curve(&neg_lm, &pos);
            let positives = pos.iter().filter(|&&p| p).count();
            EpsDetection {
                eps: *eps,
                eps_label: label.clone(),
                positives,
                negatives: pos.len() - positives,
                logit_margin: summary(&neg_lm, &pos),
                threshold_at_95_tpr: -thr,
                scores: columns
                    .iter()
                    .map(|(spec, s)| {
                        let neg: Vec<f64> = s.iter().map(|v| -v).collect();
                        (spec.name.to_string(), summary(&neg, &pos))
                    })
                    .collect(),
                roc: Curve {
                    x: roc.fpr,
                    y: roc.tpr,
                },
                pr: Curve {
                    x: pr.recall,
                    y: pr.precision,
                },
            }
        })
        .collect();
    let correct: Vec<bool> = rows.iter().map(|r| r.correct == 1).collect();
    let all_d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    let all_lm: Vec<f64> = rows.iter().map(|r| r.logit_margin).collect();
    let robust_accuracy = sweep
        .iter()
        .map(|(label, eps)| EpsValue {
            eps: *eps,
            eps_label: label.clone(),
            value: robust::robust_accuracy(&correct, &all_d, *eps),
        })
        .collect();
    let robust_accuracy_estimate = opts
        .subset
        .filter(|&n| n > 0 && !rows.is_empty())
        .map(|n| estimate_all(&correct, &all_d, &all_lm, n.min(rows.len()), &sweep, opts));
    let logit_margin = scores
        .get("logit_margin")
        .map_or(Correlations::UNDEFINED, |c| c.correlations.clone());
    Analysis {
        n: used.len(),
        n_failed: rows.len() - used.len(),
        n_rows: rows.len(),
        accuracy: correct.iter().filter(|&&c| c).count() as f64 / rows.len() as f64,
        norm: opts.norm,
        logit_margin,
        scores,
        detection,
        robust_accuracy,
        robust_accuracy_estimate,
        brackets: brackets(rows, &sweep),
        bootstrap: opts.bootstrap,
        seed: opts.seed,
        provenance: opts.provenance.clone(),
    }
}

/// Repeats: draw `n` rows without replacement, calibrate λ on them, estimate on all rows.
fn estimate_all(
    correct: &[bool],
    d_in: &[f64],
    lm: &[f64],
    n: usize,
    sweep: &[(String, f64)],
    opts: &AnalyzeOptions,
) -> Vec<RobustEstimate> {
    let repeats = opts.repeats;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed.wrapping_add(0x5eed));
    let subsets: Vec<Vec<usize>> = (0..repeats)
        .map(|_| sample(&mut rng, lm.len(), n).into_vec())
        .collect();
    sweep
        .iter()
        .map(|(label, eps)| {
            let (mut est, mut lam, mut bal, mut sub) = (vec![], vec![], vec![], vec![]);
            for idx in &subsets {
                let s_lm: Vec<f64> = idx.iter().map(|&i| lm[i]).collect();
                let s_d: Vec<f64> = idx.iter().map(|&i| d_in[i]).collect();
                let s_c: Vec<bool> = idx.iter().map(|&i| correct[i]).collect();
                let l = robust::calibrate(&s_lm, &s_d, *eps, Calibration::QuantileMatch);
                let lb = robust::calibrate(&s_lm, &s_d, *eps, Calibration::BalancedAccuracy);
                est.push(robust::estimate(correct, lm, l));
                lam.push(l);
                bal.push(robust::estimate(correct, lm, lb));
                sub.push(robust::robust_accuracy(&s_c, &s_d, *eps));
            }
            RobustEstimate {
                eps: *eps,
                eps_label: label.clone(),
                subset: n,
                repeats,
                attack_based: robust::robust_accuracy(correct, d_in, *eps),
                estimate: spread(&est),
                lambda: spread(&lam),
                estimate_balanced: spread(&bal),
                subset_attack_based: spread(&sub),
            }
        })
        .collect()
}
