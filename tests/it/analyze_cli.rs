//! `brittle analyze` end to end on a margins file the test writes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use brittle::margins::read_margins;
use brittle::metrics::{correlation, roc};

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

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name)
}

/// L2 margins of the first 40 embedded MNIST test images, written by a real
/// `brittle margins --norm l2` run (so the sidecar is the one users get, not a hand-made one);
/// made once per test binary under cargo's per-target scratch folder.
fn l2_margins() -> &'static Path {
    static CSV: OnceLock<PathBuf> = OnceLock::new();
    CSV.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("analyze_cli");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("l2.csv");
        let o = Command::new(env!("CARGO_BIN_EXE_brittle"))
            .arg("margins")
            .arg("--model")
            .arg(asset("mnist-small-cnn.safetensors"))
            .args(["--arch", "small-cnn", "--data"])
            .arg(asset("mnist-test-1000-images-idx3-ubyte.gz"))
            .args(["--limit", "40", "--device", "cpu", "--threads", "1"])
            .args([
                "--norm", "l2", "--attack", "fmn", "--steps", "30", "--seed", "1",
            ])
            .arg("--out")
            .arg(&csv)
            .env("BRITTLE_NO_PROGRESS", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        csv
    })
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
    // No sidecar: a hand-made file is read as L∞.
    let (d_in, d_out) = write_margins_csv(&csv);
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
    let tau = correlation::kendall_tau_b(&d_in, &d_out);
    assert!((m["kendall_tau"].as_f64().unwrap() - tau).abs() < 1e-12);
    let ci = m["kendall_tau_ci"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() < tau && tau < ci[1].as_f64().unwrap());
    assert!((m["spearman"].as_f64().unwrap() - correlation::spearman(&d_in, &d_out)).abs() < 1e-12);
    assert!(m["scores"]["entropy"]["kendall_tau"].is_number());
    assert!(m["scores"]["max_prob"].is_null(), "absent column reported");
    let det = m["detection"].as_array().unwrap();
    assert_eq!(det.len(), 2);
    let eps = 4.0 / 255.0;
    assert!((det[0]["eps"].as_f64().unwrap() - eps).abs() < 1e-15);
    let pos: Vec<bool> = d_in.iter().map(|&d| d <= eps).collect();
    let score: Vec<f64> = d_out.iter().map(|v| -v).collect();
    assert_eq!(det[0]["positives"], pos.iter().filter(|&&p| p).count());
    let auroc = roc::auroc(&score, &pos);
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

/// The norm comes from the sidecar `brittle margins` wrote (`settings.norm`): without `--norm`
/// an L2 file is analysed in L2 with the L2 ε sweep; `--norm linf` contradicts it and fails
/// naming both norms.
#[test]
fn an_l2_margins_file_is_analysed_in_l2_and_a_contradicting_norm_is_refused() {
    let csv = l2_margins();
    let rows = read_margins(csv).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let o = analyze(csv, &[], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = brittle::report::read_metrics(&out).unwrap();
    assert_eq!(m.norm, brittle::norm::Norm::L2);
    assert_eq!(m.n, rows.iter().filter(|r| r.success == 1).count());
    let sweep: Vec<(&str, f64)> = m
        .detection
        .iter()
        .map(|d| (d.eps_label.as_str(), d.eps))
        .collect();
    assert_eq!(sweep, [("0.25", 0.25), ("0.5", 0.5), ("1", 1.0)]);
    // Positives at ε are the rows whose L2 margin is at most ε, as the file says.
    for d in &m.detection {
        let pos = rows
            .iter()
            .filter(|r| r.success == 1 && r.input_margin <= d.eps)
            .count();
        assert_eq!(d.positives, pos, "eps {}", d.eps_label);
    }
    let o = analyze(csv, &["--norm", "linf"], &out);
    assert!(
        matches!(o.status.code(), Some(c) if c != 0),
        "{:?}",
        o.status
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--norm") && e.contains("L2 norm (l2), not in L∞ (linf)"),
        "{e}"
    );
    // The sidecar's own norm is fine.
    assert!(analyze(csv, &["--norm", "l2"], &out).status.success());
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
    // L2 on the 1×28×28 MNIST inputs the sidecar records: sqrt(784) = 28.
    let l2 = l2_margins();
    let e = String::from_utf8_lossy(&analyze(l2, &["--eps", "30"], &out).stderr).into_owned();
    assert!(
        e.contains("largest L2 distance") && e.contains("1×28×28"),
        "{e}"
    );
    assert!(analyze(l2, &["--eps", "27"], &out).status.success());
    // The library checks the options; the command line names the flag.
    for (args, want) in [
        (
            ["--subset", "0"],
            "--subset: the subset size must be positive",
        ),
        (
            ["--repeats", "0"],
            "--repeats: the repeats must be positive",
        ),
    ] {
        let e = String::from_utf8_lossy(&analyze(l2, &args, &out).stderr).into_owned();
        assert!(e.contains(want), "{args:?}: {e}");
    }

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

/// Every key `scripts/results.py` reads from a sidecar (`side["settings"][…]`), a report
/// (`metrics[…]`) or a detection row (`det[…]`) is one brittle writes.
#[test]
fn results_py_reads_only_fields_of_the_typed_schema() {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/results.py"))
            .unwrap();
    let keys = |prefix: &str| -> Vec<String> {
        let keys: Vec<String> = script
            .match_indices(prefix)
            .map(|(i, _)| {
                let rest = &script[i + prefix.len()..];
                rest[..rest.find('"').unwrap()].to_string()
            })
            .collect();
        assert!(!keys.is_empty(), "results.py reads no {prefix}…\"]");
        keys
    };
    let csv = l2_margins();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    assert!(analyze(csv, &[], &out).status.success());
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let metrics = json(out.join("metrics.json"));
    let side = json(PathBuf::from(format!("{}.meta.json", csv.display())));
    for k in keys("metrics[\"") {
        assert!(metrics.get(&k).is_some(), "metrics.json has no {k:?}");
    }
    for k in keys("det[\"") {
        assert!(
            metrics["detection"][0].get(&k).is_some(),
            "a detection row has no {k:?}"
        );
    }
    for k in keys("side[\"settings\"][\"") {
        assert!(
            side["settings"].get(&k).is_some(),
            "the sidecar's settings have no {k:?}"
        );
    }
}
