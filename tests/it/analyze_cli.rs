//! `brittle analyze` end to end on a margins file the test writes.

use std::path::Path;
use std::process::{Command, Output};

use brittle::attack::job::{Settings, Sidecar};
use brittle::attack::AttackKind;
use brittle::metrics::{detection, rank};
use brittle::model::ModelInfo;
use brittle::norm::Norm;
use brittle::provenance::{write_sidecar, Provenance};

/// Writes 120 samples to `csv`: logit margin a noisy increasing function of the input margin;
/// 3 failed attacks. Returns the input and logit margins of the successful ones.
fn write_margins_csv(csv: &Path) -> (Vec<f64>, Vec<f64>) {
    let mut text = String::from(
        "index,label,pred,correct,logit_margin,input_margin,attack,success,forwards,backwards,seconds,entropy\n",
    );
    let (mut d_in, mut d_out) = (vec![], vec![]);
    for i in 0..120usize {
        let d = 0.002 + 0.1 * ((i * 37) % 120) as f64 / 120.0;
        let noise = (((i * 53) % 17) as f64 - 8.0) * 0.05;
        let lm = (30.0 * d + noise).max(0.0);
        let correct = (i % 9 != 0) as u8;
        let (success, dist) = if i % 40 == 7 {
            (0, "inf".to_string())
        } else {
            (1, d.to_string())
        };
        if success == 1 {
            d_in.push(d);
            d_out.push(lm);
        }
        text += &format!(
            "{i},1,{},{correct},{lm},{dist},fmn,{success},10,10,0.1,{}\n",
            1 - correct as i64 + 1,
            2.0 - lm / 4.0
        );
    }
    std::fs::write(csv, text).unwrap();
    (d_in, d_out)
}

/// The sidecar `brittle margins` writes for `csv`, as measured in `norm` on CIFAR-sized inputs.
fn write_margins_sidecar(csv: &Path, norm: Norm) {
    let model = ModelInfo {
        name: "synthetic".into(),
        format: "torchscript".into(),
        fingerprint: "0123".into(),
        num_classes: 10,
        input_shape: [3, 32, 32],
        has_features: false,
    };
    let side = Sidecar {
        provenance: Provenance::current(Some(0)),
        settings: Settings {
            model_fingerprint: model.fingerprint.clone(),
            data: "synthetic.bin".into(),
            window: (0, 120),
            norm,
            attack: AttackKind::Fmn,
            steps: None,
            topk: 9,
            seed: 0,
            target_true: false,
            batch_size: 128,
            chunk: 512,
            shard: None,
        },
        model,
        plan: String::new(),
        complete: true,
        merged_from: Vec::new(),
        data_sha256: String::new(),
    };
    write_sidecar(csv, &side).unwrap();
}

fn analyze(csv: &Path, extra: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brittle"))
        .arg("analyze")
        .arg(csv)
        .args(extra)
        .args(["--bootstrap", "0", "--out"])
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn analyze_writes_metrics_figures_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("margins.csv");
    let (d_in, d_out) = write_margins_csv(&csv);
    write_margins_sidecar(&csv, Norm::Linf);
    let out = dir.path().join("report");
    let status = Command::new(env!("CARGO_BIN_EXE_brittle"))
        .args([
            "analyze",
            csv.to_str().unwrap(),
            "--eps",
            "4/255",
            "--eps",
            "0.05",
        ])
        .args([
            "--bootstrap",
            "200",
            "--subset",
            "40",
            "--repeats",
            "5",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["n"], 117);
    assert_eq!(m["n_failed"], 3);
    assert_eq!(m["norm"], "linf");
    let acc = (0..120).filter(|i| i % 9 != 0).count() as f64 / 120.0;
    assert!((m["accuracy"].as_f64().unwrap() - acc).abs() < 1e-12);
    let tau = rank::kendall_tau_b(&d_in, &d_out);
    assert!((m["kendall_tau"].as_f64().unwrap() - tau).abs() < 1e-12);
    let ci = m["kendall_tau_ci"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() < tau && tau < ci[1].as_f64().unwrap());
    assert!((m["spearman"].as_f64().unwrap() - rank::spearman(&d_in, &d_out)).abs() < 1e-12);
    assert!(m["scores"]["entropy"]["kendall_tau"].is_number());
    assert!(m["scores"]["max_prob"].is_null(), "absent column reported");
    let det = m["detection"].as_array().unwrap();
    assert_eq!(det.len(), 2);
    let eps = 4.0 / 255.0;
    assert!((det[0]["eps"].as_f64().unwrap() - eps).abs() < 1e-15);
    let pos: Vec<bool> = d_in.iter().map(|&d| d <= eps).collect();
    let score: Vec<f64> = d_out.iter().map(|v| -v).collect();
    assert_eq!(det[0]["positives"], pos.iter().filter(|&&p| p).count());
    let auroc = detection::auroc(&score, &pos);
    assert!((det[0]["auroc"].as_f64().unwrap() - auroc).abs() < 1e-12);
    for key in [
        "aupr",
        "average_precision",
        "fpr_at_95_tpr",
        "threshold_at_95_tpr",
    ] {
        assert!(det[0][key].is_number(), "{key}");
    }
    // λ is on the logit margin: flagging logit_margin <= λ reaches 95% TPR.
    let lambda = det[0]["threshold_at_95_tpr"].as_f64().unwrap();
    let tp = d_out
        .iter()
        .zip(&pos)
        .filter(|(&o, &p)| p && o <= lambda)
        .count();
    assert!(tp as f64 >= 0.95 * pos.iter().filter(|&&p| p).count() as f64);
    assert_eq!(m["robust_accuracy"].as_array().unwrap().len(), 2);
    let est = &m["robust_accuracy_estimate"][1];
    assert_eq!(est["repeats"], 5);
    let mean = est["estimate"]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean));
    assert_eq!(m["provenance"]["seed"], 3);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 5, "figures inlined");
    assert!(html.contains(&format!("{:.4}", tau)));
    assert!(html.contains(&format!("{:.4}", auroc)));
    assert!(html.contains("analyze"), "provenance command");
    for f in ["margins", "roc", "pr", "tau", "input_margins"] {
        for ext in ["svg", "png"] {
            let p = out.join(format!("{f}.{ext}"));
            assert!(
                std::fs::metadata(&p).unwrap().len() > 1000,
                "{}",
                p.display()
            );
        }
    }
    let png = std::fs::read(out.join("margins.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn the_sidecar_decides_the_norm_and_a_contradicting_flag_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("margins.csv");
    write_margins_csv(&csv);
    write_margins_sidecar(&csv, Norm::L2);
    let out = dir.path().join("report");
    let o = analyze(&csv, &[], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["norm"], "l2");
    let labels: Vec<&str> = m["detection"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["eps_label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["0.25", "0.5", "1"]);
    let o = analyze(&csv, &["--norm", "linf"], &out);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--norm") && e.contains("L2 norm (l2), not in L∞ (linf)"),
        "{e}"
    );
    // The same norm as the sidecar's is fine.
    assert!(analyze(&csv, &["--norm", "l2"], &out).status.success());
}

#[test]
fn duplicated_rows_and_an_eps_beyond_the_box_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("margins.csv");
    write_margins_csv(&csv);
    let out = dir.path().join("report");
    // No sidecar: L∞, whose largest distance (1) needs no input shape.
    let o = analyze(&csv, &["--eps", "8"], &out);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--eps 8")
            && e.contains(
                "ε = 8 exceeds the largest L∞ distance in the [0,1] box (1); did you mean 8/255?"
            ),
        "{e}"
    );
    // L2 on 3×32×32 inputs: sqrt(3072) ≈ 55.4.
    write_margins_sidecar(&csv, Norm::L2);
    let e = String::from_utf8_lossy(&analyze(&csv, &["--eps", "60"], &out).stderr).into_owned();
    assert!(
        e.contains("largest L2 distance") && e.contains("3×32×32"),
        "{e}"
    );
    assert!(analyze(&csv, &["--eps", "50"], &out).status.success());

    let mut text = std::fs::read_to_string(&csv).unwrap();
    let row5 = text.lines().nth(6).unwrap().to_string();
    assert!(row5.starts_with("5,"));
    text += &format!("{row5}\n");
    std::fs::write(&csv, text).unwrap();
    let o = analyze(&csv, &[], &out);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("sample index 5 appears twice (data rows 6 and 121)"),
        "{e}"
    );
}
