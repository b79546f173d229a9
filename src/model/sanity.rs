//! The first-batch check: before a command trusts a model's answers on labelled data, it looks
//! at the first [`CHECK_SAMPLES`] samples for the signs of a model fed the wrong input.
//!
//! A wrong normalisation runs without any error and gives plausible-looking numbers: on the
//! 705 real CIFAR-10 pool images, the shared ONNX models (which expect normalised input) score
//! 9.7-24.7% without a mean/std, and the TorchScript models (normalisation baked in) score
//! 38.9-65.4% when one is added on top, against 65.1-89.1% when used as intended. Accuracy
//! alone cannot tell 65.4% (cifar_cnn_a_adv normalised twice) from 65.1% (cifar_deep_kw used
//! correctly), so the check has two tests:
//!
//! 1. **The other normalisation** ([`NORMALISATION_ALPHA`], [`NORMALISATION_GAIN`]): the same
//!    samples are run once more with the normalisation undone (when a mean/std was given: the
//!    model then sees the pixels the mean/std was applied to) or applied with the batch's own
//!    per-channel mean and std (when none was given). When that run is right on significantly
//!    more samples (exact one-sided McNemar test on the paired answers) and by a clear margin,
//!    the configured normalisation is wrong. A model used as intended loses accuracy either
//!    way, so this never fires on it.
//! 2. **Near chance** ([`FLOOR_FRACTION`], [`CHANCE_ALPHA`]): the accuracy is significantly
//!    below a floor a quarter of the way from chance to perfect (32.5% with 10 classes), by an
//!    exact one-sided binomial test. Real robust classifiers sit far above (65-89% for the
//!    shared CIFAR-10 models, 97% for the embedded MNIST CNN); the wrong normalisations
//!    above (≤ 24.7%) sit below. The test needs no minimum batch size: with fewer than 12
//!    samples even 0 correct is not significant at [`CHANCE_ALPHA`], and nothing fires.
//!
//! Every logit equal in every row also stops (the predictions are ties); NaN and integer logits
//! are refused earlier, for every forward pass, by [`super::checked`].

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{logits_no_grad, Classifier};
use crate::data::Dataset;
use crate::util::to_vec_f64;

/// Samples of the check: a forward pass that costs little next to any command that uses labels.
pub const CHECK_SAMPLES: usize = 256;
/// Share of the way from chance to perfect accuracy below which a model is "near chance".
pub const FLOOR_FRACTION: f64 = 0.25;
/// Significance of the near-chance test (one check per command: a false alarm at most 1%
/// of the time for a model exactly at the floor, never in practice for a real one).
pub const CHANCE_ALPHA: f64 = 0.01;
/// Significance of the other-normalisation test (stricter: its alternative is a guess).
pub const NORMALISATION_ALPHA: f64 = 1e-3;
/// Accuracy gain of the other normalisation, as a share of the samples, that counts as clear.
pub const NORMALISATION_GAIN: f64 = 0.05;

/// The normalisation a model was loaded with, as far as the caller knows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Configured {
    /// No mean/std was applied in front of the model.
    None,
    /// `(x - mean) / std` per channel is applied in front of the model.
    MeanStd { mean: Vec<f64>, std: Vec<f64> },
}

/// What the first batch showed.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstBatch {
    pub samples: usize,
    pub correct: usize,
    /// `1 / K`.
    pub chance: f64,
    /// Accuracy with the other normalisation (see the module docs), when it could be run.
    pub other: Option<Other>,
}

/// The run with the other normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Other {
    pub correct: usize,
    /// Samples right only with the other normalisation, and only with the configured one.
    pub only_other: usize,
    pub only_configured: usize,
    /// What the other run did, in words.
    pub what: String,
}

impl FirstBatch {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }

    /// The near-chance floor `chance + FLOOR_FRACTION · (1 - chance)`.
    pub fn floor(&self) -> f64 {
        self.chance + FLOOR_FRACTION * (1.0 - self.chance)
    }

    /// A concern too weak to stop on, for a loud warning: accuracy below the floor, or the
    /// other normalisation better, without significance.
    pub fn concern(&self) -> Option<String> {
        if self.accuracy() < self.floor() {
            return Some(format!(
                "accuracy {:.1}% on the first {} samples is below {:.1}% (chance {:.1}%): check the input normalisation (mean/std)",
                100.0 * self.accuracy(),
                self.samples,
                100.0 * self.floor(),
                100.0 * self.chance
            ));
        }
        match &self.other {
            Some(o) if o.correct > self.correct => Some(format!(
                "accuracy on the first {} samples is {:.1}%, and {:.1}% {} (right only that way on {} samples, only as configured on {}): check the input normalisation (mean/std)",
                self.samples,
                100.0 * self.accuracy(),
                100.0 * o.correct as f64 / self.samples as f64,
                o.what,
                o.only_other,
                o.only_configured
            )),
            _ => None,
        }
    }
}

/// Why the first batch says the model is not being used as intended.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SanityError {
    #[error("model {model}: every logit is equal on each of the first {samples} samples (all predictions are ties)")]
    ConstantLogits { model: String, samples: usize },
    #[error("model {model}: accuracy on the first {samples} samples is {accuracy:.1}% with the configured input normalisation but {other_accuracy:.1}% {what} (McNemar p = {p:.1e}): the normalisation (mean/std) is probably wrong")]
    Normalisation {
        model: String,
        samples: usize,
        accuracy: f64,
        other_accuracy: f64,
        what: String,
        p: f64,
    },
    #[error("model {model}: accuracy on the first {samples} samples is {accuracy:.1}%, near chance ({chance:.1}% for {classes} classes; significantly below {floor:.1}%, p = {p:.1e}): the input normalisation (mean/std) is the likely cause")]
    NearChance {
        model: String,
        samples: usize,
        accuracy: f64,
        chance: f64,
        classes: i64,
        floor: f64,
        p: f64,
    },
}

/// `P(X ≤ k)` for `X ~ Binomial(n, p)`, summed exactly in log space (n is at most a few
/// hundred here).
pub fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // log C(n, i) by the recurrence C(n, i+1) = C(n, i) (n - i) / (i + 1).
    let mut log_c = 0.0;
    let mut sum = 0.0;
    for i in 0..=k {
        sum += (log_c + i as f64 * lp + (n - i) as f64 * lq).exp();
        log_c += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    sum.min(1.0)
}

/// Runs the first-batch check; `Err` holds a [`SanityError`] (or the model's own error, such as
/// a [`super::checked::LogitError`] naming the first bad sample).
pub fn check_first_batch(
    model: &dyn Classifier,
    data: &Dataset,
    configured: &Configured,
) -> Result<FirstBatch> {
    let n = data.len().min(CHECK_SAMPLES);
    let name = model.info().name.clone();
    let classes = model.info().num_classes.max(data.num_classes).max(2);
    let mut report = FirstBatch {
        samples: n,
        correct: 0,
        chance: 1.0 / classes as f64,
        other: None,
    };
    if n == 0 {
        return Ok(report);
    }
    let (x, labels) = data.batch(0, n);
    let x = x.to_device(model.device());
    let answers = |x: &Tensor| -> Result<(Tensor, Vec<bool>)> {
        let z = logits_no_grad(model, x)
            .map_err(|e| super::checked::name_sample(e, &data.indices[..n], &data.source))?;
        let pred = to_vec_f64(&z.argmax(1, false))?;
        let right = pred
            .iter()
            .zip(labels)
            .map(|(&p, &l)| p as i64 == l)
            .collect();
        Ok((z, right))
    };
    let (z, right) = answers(&x)?;
    let correct = right.iter().filter(|&&r| r).count();
    report.correct = correct;
    let spread = (z.amax([1].as_slice(), false) - z.amin([1].as_slice(), false))
        .amax([0].as_slice(), false)
        .to_kind(Kind::Double)
        .double_value(&[]);
    if spread == 0.0 {
        return Err(SanityError::ConstantLogits {
            model: name,
            samples: n,
        }
        .into());
    }
    if let Some((x_other, what)) = other_normalisation(&x, configured) {
        let (_, right_other) = answers(&x_other)?;
        let only_other = right_other
            .iter()
            .zip(&right)
            .filter(|(&o, &c)| o && !c)
            .count();
        let only_configured = right_other
            .iter()
            .zip(&right)
            .filter(|(&o, &c)| !o && c)
            .count();
        let other = Other {
            correct: right_other.iter().filter(|&&r| r).count(),
            only_other,
            only_configured,
            what,
        };
        // Exact one-sided McNemar: under "equally accurate" each discordant sample is a fair
        // coin, and P(X ≥ only_other) = P(X ≤ only_configured) by symmetry (no cancellation).
        let p = binomial_cdf(only_configured, only_other + only_configured, 0.5);
        let gain = (only_other as f64 - only_configured as f64) / n as f64;
        if p < NORMALISATION_ALPHA && gain >= NORMALISATION_GAIN {
            return Err(SanityError::Normalisation {
                model: name,
                samples: n,
                accuracy: 100.0 * report.accuracy(),
                other_accuracy: 100.0 * other.correct as f64 / n as f64,
                what: other.what,
                p,
            }
            .into());
        }
        report.other = Some(other);
    }
    let p = binomial_cdf(correct, n, report.floor());
    if p < CHANCE_ALPHA {
        return Err(SanityError::NearChance {
            model: name,
            samples: n,
            accuracy: 100.0 * report.accuracy(),
            chance: 100.0 * report.chance,
            classes,
            floor: 100.0 * report.floor(),
            p,
        }
        .into());
    }
    Ok(report)
}

/// The input that shows the model the other normalisation, and what it is in words; `None`
/// when the batch has a channel without spread (its own statistics cannot normalise it).
fn other_normalisation(x: &Tensor, configured: &Configured) -> Option<(Tensor, String)> {
    let c = x.size()[1];
    let per_channel = |v: &[f64]| -> Tensor {
        let v = if v.len() == 1 {
            vec![v[0]; c as usize]
        } else {
            v.to_vec()
        };
        Tensor::from_slice(&v)
            .to_kind(Kind::Float)
            .view([1, c, 1, 1])
            .to_device(x.device())
    };
    match configured {
        // The model computes f((x' - m) / s); x' = x s + m makes that f(x).
        Configured::MeanStd { mean, std } => Some((
            x * per_channel(std) + per_channel(mean),
            "without the given mean/std (the model may normalise its input itself)".to_string(),
        )),
        Configured::None => {
            let dims = [0i64, 2, 3];
            let mean = x.mean_dim(dims.as_slice(), true, Kind::Float);
            let std = x.std_dim(dims.as_slice(), false, true);
            let (m, s) = (to_vec_f64(&mean).ok()?, to_vec_f64(&std).ok()?);
            if s.iter().any(|v| v.is_nan() || *v <= 1e-6) {
                return None;
            }
            let show = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            Some((
                (x - &mean) / &std,
                format!(
                    "with the data's own per-channel mean {} and std {} (the model may expect normalised input)",
                    show(&m),
                    show(&s)
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_cdf_matches_hand_values() {
        // P(X ≤ 3), X ~ B(20, 0.2) = 0.41144886... (scipy.stats.binom.cdf(3, 20, 0.2)).
        assert!((binomial_cdf(3, 20, 0.2) - 0.411_448_86).abs() < 1e-7);
        // P(X ≤ 0), X ~ B(10, 0.4) = 0.6^10.
        assert!((binomial_cdf(0, 10, 0.4) - 0.6f64.powi(10)).abs() < 1e-12);
        assert_eq!(binomial_cdf(10, 10, 0.4), 1.0);
        // Symmetry of the fair coin: P(X ≤ 4) for B(9, 1/2) is exactly 1/2.
        assert!((binomial_cdf(4, 9, 0.5) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn floor_is_a_quarter_of_the_way_from_chance() {
        let r = FirstBatch {
            samples: 100,
            correct: 30,
            chance: 0.1,
            other: None,
        };
        assert!((r.floor() - 0.325).abs() < 1e-12);
        assert!(r.concern().is_some());
    }
}
