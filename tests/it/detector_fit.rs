//! `brittle fit`: pseudo-margin on a deliberately inconsistent model, row matching, saving.

use crate::common::{inconsistent_model, synthetic_set};
use brittle::detector::fit::{fit, FitOptions, PseudoMode};
use brittle::detector::pseudo::TrainConfig;
use brittle::detector::{Detector, ScoreKind};
use brittle::metrics::rank::kendall_tau_b;
use brittle::norm::Norm;
use brittle::provenance::Provenance;
use brittle::score::free_scores;

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
        },
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
    opts.train.max_epochs = 15;
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
        let mut opts = options(median(&d), PseudoMode::On);
        break_it(&mut opts.train);
        assert!(opts.train.check().is_err(), "{field}");
        let err = format!(
            "{:#}",
            fit(&model, &data, &rows, &opts, Provenance::current(None)).unwrap_err()
        );
        assert!(err.contains(field), "{field}: {err}");
    }
}
