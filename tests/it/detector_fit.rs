//! `brittle fit`: pseudo-margin on a deliberately inconsistent model, row matching, saving.

use crate::common::{inconsistent_model, synthetic_set};
use brittle::detector::fit::{self, FitOptions, PseudoMode};
use brittle::detector::pseudo::TrainConfig;
use brittle::detector::{Detector, ScoreKind};
use brittle::metrics::correlation::kendall_tau_b;
use brittle::norm::Norm;
use brittle::provenance::Provenance;
use brittle::score::free_scores;
use brittle::util::Check;

/// [`fit::fit`] on the options checked first, as the CLI runs it.
fn fit(
    model: &dyn brittle::model::Classifier,
    data: &brittle::data::Dataset,
    rows: &[brittle::margins::MarginRow],
    opts: &FitOptions,
    provenance: Provenance,
) -> anyhow::Result<Detector> {
    fit::fit(model, data, rows, &opts.clone().check()?, provenance)
}

/// `train` with another epoch budget, checked again.
fn epochs(train: &TrainConfig, max_epochs: usize) -> brittle::util::Checked<TrainConfig> {
    TrainConfig {
        max_epochs,
        ..train.clone()
    }
    .check()
    .unwrap()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn options(eps: f64, pseudo: PseudoMode) -> FitOptions {
    FitOptions {
        eps,
        norm: Norm::Linf,
        target_tpr: 0.95,
        pseudo,
        // Small and fast: a few seconds on a loaded CI core.
        train: TrainConfig {
            lr: 1e-2,
            batch_size: 128,
            max_epochs: 60,
            patience: 15,
            ..TrainConfig::default()
        }
        .check()
        .unwrap(),
        val_fraction: 0.3,
        seed: 7,
        batch_size: 512,
        margins_name: "synthetic".into(),
    }
}

#[test]
fn pseudo_margin_raises_kendall_tau_on_an_inconsistent_model() {
    let (model, w_eff) = inconsistent_model(1);
    let (data, rows) = synthetic_set(&model, &w_eff, 1000, 2);
    let d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    let det = fit(
        &model,
        &data,
        &rows,
        &options(median(&d), PseudoMode::Auto),
        Provenance::current(Some(7)),
    )
    .unwrap();
    let v = &det.spec.validation;
    let pm_tau = v.pseudo_margin.as_ref().unwrap().kendall_tau;
    println!(
        "validation tau: logit margin {:.4}, pseudo-margin {pm_tau:.4}",
        v.logit_margin.kendall_tau
    );
    assert!(pm_tau > v.logit_margin.kendall_tau + 0.05, "{v:?}");
    assert_eq!(
        det.spec.score,
        ScoreKind::PseudoMargin,
        "auto must keep the better score"
    );

    // On fresh samples of the same model, independently of fit's bookkeeping.
    let (fresh, fresh_rows) = synthetic_set(&model, &w_eff, 600, 3);
    let (logits, pm) = det.forward(&model, &fresh.images).unwrap();
    let pm = pm.unwrap();
    let lm: Vec<f64> = free_scores(&logits)
        .unwrap()
        .iter()
        .map(|s| s.logit_margin)
        .collect();
    let d: Vec<f64> = fresh_rows.iter().map(|r| r.input_margin).collect();
    let (t_pm, t_lm) = (kendall_tau_b(&pm, &d), kendall_tau_b(&lm, &d));
    println!("fresh tau: logit margin {t_lm:.4}, pseudo-margin {t_pm:.4}");
    assert!(t_pm > t_lm + 0.05, "fresh: pseudo {t_pm} vs logit {t_lm}");

    // The detector survives a save/load round trip bit for bit.
    let dir = tempfile::tempdir().unwrap();
    det.save(dir.path()).unwrap();
    let again = Detector::load(dir.path(), tch::Device::Cpu).unwrap();
    assert_eq!(again.spec, det.spec);
    assert_eq!(again.forward(&model, &fresh.images).unwrap().1.unwrap(), pm);
    // ... and refuses another model.
    let (other, _) = inconsistent_model(2);
    let err = again
        .check_model(brittle::model::Classifier::info(&other))
        .unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
}

#[test]
fn fitting_is_deterministic_with_a_seed() {
    let (model, w_eff) = inconsistent_model(4);
    let (data, rows) = synthetic_set(&model, &w_eff, 300, 5);
    let d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    let mut opts = options(median(&d), PseudoMode::On);
    opts.train = epochs(&opts.train, 15);
    let a = fit(&model, &data, &rows, &opts, Provenance::current(Some(7))).unwrap();
    let b = fit(&model, &data, &rows, &opts, Provenance::current(Some(7))).unwrap();
    assert_eq!(a.spec.lambda, b.spec.lambda);
    assert_eq!(a.spec.validation, b.spec.validation);
    opts.seed = 8;
    let c = fit(&model, &data, &rows, &opts, Provenance::current(Some(8))).unwrap();
    assert_ne!(
        a.spec.validation, c.spec.validation,
        "another seed, another split"
    );
}

#[test]
fn rows_must_match_the_data() {
    let (model, w_eff) = inconsistent_model(1);
    let (data, mut rows) = synthetic_set(&model, &w_eff, 40, 2);
    let opts = options(0.01, PseudoMode::Off);
    let prov = || Provenance::current(None);
    let mut shifted = rows.clone();
    shifted[3].index = 5; // dataset indices are 100..140
    let err = format!(
        "{:#}",
        fit(&model, &data, &shifted, &opts, prov()).unwrap_err()
    );
    assert!(
        err.contains("index 5") && err.contains("another data file"),
        "{err}"
    );
    let mut twice = rows.clone();
    twice[7].index = twice[3].index;
    let err = format!(
        "{:#}",
        fit(&model, &data, &twice, &opts, prov()).unwrap_err()
    );
    assert!(err.contains("sample index 103 appears twice"), "{err}");
    let mut relabelled = rows.clone();
    relabelled[0].label = (relabelled[0].label + 1) % 4;
    let err = format!(
        "{:#}",
        fit(&model, &data, &relabelled, &opts, prov()).unwrap_err()
    );
    assert!(err.contains("label"), "{err}");
    for r in rows.iter_mut() {
        r.logit_margin += 1.0;
    }
    let err = format!(
        "{:#}",
        fit(&model, &data, &rows, &opts, prov()).unwrap_err()
    );
    assert!(err.contains("another model"), "{err}");
}

#[test]
fn an_eps_beyond_the_box_or_a_class_of_too_few_samples_is_refused() {
    let (model, w_eff) = inconsistent_model(1);
    let (data, rows) = synthetic_set(&model, &w_eff, 60, 2);
    let prov = || Provenance::current(None);
    let err = format!(
        "{:#}",
        fit(&model, &data, &rows, &options(8.0, PseudoMode::Off), prov()).unwrap_err()
    );
    assert!(err.contains("did you mean 8/255?"), "{err}");
    let mut d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    d.sort_by(f64::total_cmp);
    // ε at the 9th smallest margin: 9 non-robust samples, one short of the minimum.
    let thin = options(d[8], PseudoMode::Off);
    let err = format!(
        "{:#}",
        fit(&model, &data, &rows, &thin, prov()).unwrap_err()
    );
    assert!(
        err.contains("9 non-robust samples") && err.contains("and 51 robust ones"),
        "{err}"
    );
    // At the 10th it fits, and the calibration counts both classes.
    let det = fit(
        &model,
        &data,
        &rows,
        &options(d[9], PseudoMode::Off),
        prov(),
    )
    .unwrap();
    assert_eq!(det.spec.calibration.positives, 10);
    assert_eq!(det.spec.calibration.negatives, 50);
}

#[test]
fn pseudo_margin_options_are_checked_naming_the_field() {
    let (model, w_eff) = inconsistent_model(1);
    let (data, rows) = synthetic_set(&model, &w_eff, 60, 2);
    let d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    type Break = fn(&mut TrainConfig);
    let cases: [(&str, Break); 6] = [
        ("hidden = 0", |c| c.hidden = 0),
        ("hidden = -3", |c| c.hidden = -3),
        ("max_epochs = 0", |c| c.max_epochs = 0),
        ("lr = 0", |c| c.lr = 0.0),
        ("lr = NaN", |c| c.lr = f64::NAN),
        ("batch_size = 1", |c| c.batch_size = 1),
    ];
    for (field, break_it) in cases {
        let mut train = (*options(median(&d), PseudoMode::On).train).clone();
        break_it(&mut train);
        // A broken configuration never reaches `fit`: only a checked one has the type it takes.
        let err = format!("{:#}", train.check().unwrap_err());
        assert!(err.contains(field), "{field}: {err}");
    }
    let _ = (data, rows);
}

/// Counts the samples that go through the model's forward passes. With `features`, it exposes
/// its flattened input as penultimate features, so a pseudo-margin net reads features.
struct Counting<C: brittle::model::Classifier> {
    inner: C,
    info: brittle::model::ModelInfo,
    features: bool,
    rows: std::sync::atomic::AtomicI64,
}

impl<C: brittle::model::Classifier> Counting<C> {
    fn new(inner: C, features: bool) -> Self {
        let mut info = inner.info().clone();
        info.has_features = features;
        Counting {
            inner,
            info,
            features,
            rows: 0.into(),
        }
    }
    fn take(&self) -> i64 {
        self.rows.swap(0, std::sync::atomic::Ordering::SeqCst)
    }
}

impl<C: brittle::model::Classifier> brittle::model::Classifier for Counting<C> {
    fn logits(&self, x: &tch::Tensor) -> anyhow::Result<tch::Tensor> {
        self.rows
            .fetch_add(x.size()[0], std::sync::atomic::Ordering::SeqCst);
        self.inner.logits(x)
    }
    fn features_and_logits(
        &self,
        x: &tch::Tensor,
    ) -> anyhow::Result<Option<(tch::Tensor, tch::Tensor)>> {
        if !self.features {
            return Ok(None);
        }
        self.rows
            .fetch_add(x.size()[0], std::sync::atomic::Ordering::SeqCst);
        Ok(Some((x.flatten(1, -1), self.inner.logits(x)?)))
    }
    fn device(&self) -> tch::Device {
        self.inner.device()
    }
    fn info(&self) -> &brittle::model::ModelInfo {
        &self.info
    }
}

#[test]
fn scoring_with_a_detector_runs_one_forward_pass_per_sample() {
    use brittle::detector::apply::score_dataset;
    use brittle::score::ScoreOptions;
    use brittle::util::NoProgress;
    let opts64 = ScoreOptions {
        batch_size: 64,
        norm: Norm::Linf,
    }
    .check()
    .unwrap();
    for (features, pseudo) in [
        (false, PseudoMode::Off),
        (false, PseudoMode::On),
        (true, PseudoMode::On),
    ] {
        let (inner, w_eff) = inconsistent_model(1);
        let model = Counting::new(inner, features);
        let (data, rows) = synthetic_set(&model.inner, &w_eff, 300, 2);
        let d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
        let mut opts = options(median(&d), pseudo);
        opts.train = epochs(&opts.train, 5);
        let det = fit(&model, &data, &rows, &opts, Provenance::current(Some(7))).unwrap();
        assert_eq!(det.pseudo.is_some(), pseudo == PseudoMode::On);
        model.take();

        // 300 samples in batches of 64: the last batch is short.
        let (scored, decisions) =
            score_dataset(&model, Some(&det), &data, &opts64, &NoProgress).unwrap();
        let label = format!("features {features}, pseudo {pseudo:?}");
        assert_eq!(model.take(), 300, "rows through the model, {label}");
        assert_eq!((scored.len(), decisions.len()), (300, 300), "{label}");

        // The same numbers as the detector's own forward pass on the same batches.
        for start in (0..300).step_by(64) {
            let end = (start + 64).min(300);
            let (logits, pm) = det.forward(&model, &data.batch(start, end).0).unwrap();
            let lm = free_scores(&logits).unwrap();
            for i in start..end {
                let (lm_i, pm_i) = (
                    lm[i - start].logit_margin,
                    pm.as_ref().map(|v| v[i - start]),
                );
                assert_eq!(scored[i].scores.logit_margin, lm_i, "{label}");
                assert_eq!(decisions[i], det.decide(lm_i, pm_i).unwrap(), "{label}");
            }
        }
        let flagged = decisions.iter().filter(|d| d.brittle).count();
        assert!(flagged > 0 && flagged < 300, "{label}: {flagged} flagged");
        model.take();
        let (plain, none) = score_dataset(&model, None, &data, &opts64, &NoProgress).unwrap();
        assert_eq!(model.take(), 300, "rows without a detector");
        assert!(none.is_empty());
        assert_eq!(plain[17].scores, scored[17].scores);
    }
}

/// Records what the library reports, as the CLI's bar would show it.
#[derive(Default)]
struct Recorded {
    length: std::cell::Cell<Option<u64>>,
    incs: std::cell::RefCell<Vec<u64>>,
}

impl brittle::util::Progress for Recorded {
    fn set_length(&self, units: u64) {
        self.length.set(Some(units));
    }
    fn inc(&self, units: u64) {
        self.incs.borrow_mut().push(units);
    }
}

/// The forward pass of a fit reports to the caller's progress (the CLI draws the bar), a batch
/// at a time, a unit a sample.
#[test]
fn fit_reports_its_forward_pass_to_the_callers_progress() {
    let (model, w_eff) = inconsistent_model(1);
    let (data, rows) = synthetic_set(&model, &w_eff, 200, 2);
    let d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    let opts = FitOptions {
        batch_size: 64,
        ..options(median(&d), PseudoMode::Off)
    }
    .check()
    .unwrap();
    let seen = Recorded::default();
    let prov = Provenance::current(Some(7));
    let det = fit::fit_with_progress(&model, &data, &rows, &opts, prov.clone(), &seen).unwrap();
    assert_eq!(seen.length.get(), Some(200));
    assert_eq!(*seen.incs.borrow(), [64, 64, 64, 8]);
    // Reporting changes nothing in the detector.
    let quiet = fit(&model, &data, &rows, &opts, prov).unwrap();
    assert_eq!(det.spec.lambda, quiet.spec.lambda);
}
