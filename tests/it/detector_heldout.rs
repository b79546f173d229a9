//! A detector fitted on half of an attacked set of a real model keeps its promises on the other
//! half: it flags ≥ 95% of the non-robust samples (within sampling error) and pays the FPR it
//! reported (within 5 points). Margins: `tests/fixtures/detector/resnet_2b_margins.csv`
//! (made by `brittle margins`, see tests/fixtures/detector/README.md).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use brittle::detector::calibrate::rates;
use brittle::detector::fit::{fit, FitOptions, PseudoMode};
use brittle::detector::pseudo::TrainConfig;
use brittle::detector::ScoreKind;
use brittle::margins::read_margins;
use brittle::model::load_classifier;
use brittle::norm::Norm;
use brittle::provenance::Provenance;
use brittle::util::Check;
use rand::seq::SliceRandom;
use rand::SeedableRng;

const EPS: f64 = 2.0 / 255.0;

fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/detector/resnet_2b_margins.csv"
    ))
}

#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn threshold_generalises_to_held_out_half() {
    let shared = common::shared();
    let data = common::real_pool(&shared);
    let model_path = shared.join("models/resnet_2b.pt");
    let model = load_classifier(&common::spec(model_path, None, None, None), [3, 32, 32]).unwrap();
    let rows = read_margins(&fixture()).unwrap();
    let opts = FitOptions {
        eps: EPS,
        norm: Norm::Linf,
        target_tpr: 0.95,
        pseudo: PseudoMode::Off,
        train: TrainConfig::default().check().unwrap(),
        val_fraction: 0.3,
        seed: 0,
        batch_size: 512,
        margins_name: "fixture".into(),
    }
    .check()
    .unwrap();
    let (mut tpr_sum, mut fpr_gap_sum, splits) = (0.0, 0.0, 8);
    for seed in 0..splits {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let (a, b) = order.split_at(rows.len() / 2);
        let half = |p: &[usize]| p.iter().map(|&i| rows[i].clone()).collect::<Vec<_>>();
        let det = fit(
            model.as_ref(),
            &data,
            &half(a),
            &opts,
            Provenance::current(Some(seed)),
        )
        .unwrap();
        assert_eq!(det.spec.score, ScoreKind::LogitMargin);
        let held = half(b);
        // Logit margins of the held-out half, recomputed by the model through the detector.
        let x = data.images.index_select(
            0,
            &tch::Tensor::from_slice(&b.iter().map(|&i| i as i64).collect::<Vec<_>>()),
        );
        let (logits, _) = det.forward(model.as_ref(), &x).unwrap();
        let lm: Vec<f64> = brittle::score::free_scores(&logits)
            .unwrap()
            .iter()
            .map(|s| s.logit_margin)
            .collect();
        let y: Vec<bool> = held
            .iter()
            .map(|r| r.success == 1 && r.input_margin <= EPS)
            .collect();
        let test = rates(&lm, &y, det.spec.lambda);
        let cal = det.spec.calibration;
        let se = (0.95 * 0.05 / test.positives as f64).sqrt();
        println!(
            "split {seed}: calibration TPR {:.3} FPR {:.3} ({} pos) | held-out TPR {:.3} FPR {:.3} ({} pos)",
            cal.tpr, cal.fpr.unwrap(), cal.positives, test.tpr, test.fpr.unwrap(), test.positives
        );
        assert!(cal.tpr >= 0.95);
        assert!(
            test.tpr >= 0.95 - 3.0 * se,
            "split {seed}: held-out TPR {} < 0.95 - 3 SE",
            test.tpr
        );
        tpr_sum += test.tpr;
        fpr_gap_sum += test.fpr.unwrap() - cal.fpr.unwrap();
    }
    let (tpr, gap) = (tpr_sum / splits as f64, fpr_gap_sum / splits as f64);
    println!("mean held-out TPR {tpr:.4}, mean FPR gap {gap:+.4}");
    assert!(tpr >= 0.93, "mean held-out TPR {tpr}");
    assert!(
        gap.abs() <= 0.05,
        "held-out FPR differs from the reported one by {gap} on average"
    );
}

/// The command line: fit, score with the detector, refuse a detector of another model, and
/// refuse margins whose indices are not in the data.
#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn fit_and_score_commands() {
    let shared = common::shared();
    let dir = tempfile::tempdir().unwrap();
    let det = dir.path().join("det");
    let data = shared.join("data/cifar10/real-pool.bin");
    let run = |args: &[std::ffi::OsString]| {
        let out = Command::new(env!("CARGO_BIN_EXE_brittle"))
            .args(args)
            .env("BRITTLE_NO_PROGRESS", "1")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let model = shared.join("models/resnet_2b.pt");
    let fit_args = |extra: &[&str]| {
        let mut v = vec![
            os("fit"),
            fixture().into(),
            os("--model"),
            model.clone().into(),
            os("--data"),
            data.clone().into(),
            os("--eps"),
            os("2/255"),
            os("--device"),
            os("cpu"),
            os("--epochs"),
            os("20"),
            os("--out"),
            det.clone().into(),
        ];
        v.extend(extra.iter().map(|s| os(s)));
        v
    };
    let (ok, log) = run(&fit_args(&["--pseudo", "auto", "--seed", "3"]));
    assert!(ok, "{log}");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(det.join("detector.json")).unwrap()).unwrap();
    assert_eq!(spec["provenance"]["seed"], 3);
    assert!(spec["provenance"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "fit"));
    assert!((spec["eps"].as_f64().unwrap() - 2.0 / 255.0).abs() < 1e-15);
    assert!(
        spec["validation"]["logit_margin"]["kendall_tau"]
            .as_f64()
            .unwrap()
            > 0.3
    );
    assert!(spec["validation"]["pseudo_margin"]["kendall_tau"].is_f64());
    let lambda = spec["lambda"].as_f64().unwrap();
    let uses_pseudo = spec["score"] == "pseudo_margin";
    assert_eq!(det.join("pseudo_margin.safetensors").exists(), uses_pseudo);

    let scores = dir.path().join("scores.csv");
    let score_args = |m: &Path| {
        vec![
            os("score"),
            os("--model"),
            m.into(),
            os("--data"),
            data.clone().into(),
            os("--limit"),
            os("40"),
            os("--device"),
            os("cpu"),
            os("--detector"),
            det.clone().into(),
            os("--out"),
            scores.clone().into(),
        ]
    };
    let (ok, log) = run(&score_args(&model));
    assert!(ok, "{log}");
    let mut rd = csv::Reader::from_path(&scores).unwrap();
    let hdr = rd.headers().unwrap().clone();
    let col = |n: &str| {
        hdr.iter()
            .position(|h| h == n)
            .unwrap_or_else(|| panic!("no column {n}"))
    };
    let (b, lmc, pmc) = (col("brittle"), col("logit_margin"), col("pseudo_margin"));
    let mut n = 0;
    for r in rd.records() {
        let r = r.unwrap();
        let score: f64 = if uses_pseudo {
            r[pmc].parse().unwrap()
        } else {
            r[lmc].parse().unwrap()
        };
        assert_eq!(&r[b], if score <= lambda { "1" } else { "0" });
        assert_eq!(r[pmc].is_empty(), !uses_pseudo);
        n += 1;
    }
    assert_eq!(n, 40);

    // Another model: refused, naming the fingerprint.
    let (ok, log) = run(&score_args(&shared.join("models/cifar_deep_kw.pt")));
    assert!(!ok && log.contains("fingerprint"), "{log}");
    // Margins of other samples than --data holds.
    let (ok, log) = run(&fit_args(&["--offset", "400", "--pseudo", "off"]));
    assert!(!ok && log.contains("--offset"), "{log}");
}
