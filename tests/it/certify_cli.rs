//! `brittle certify` end to end on the embedded MNIST model: the bounds file's columns and
//! sidecar, resume after a killed run (a partial last line), shards whose rows are those of one
//! run, and `margins --certify` with `analyze`'s bracket section. IBP keeps it fast: the job
//! machinery does not depend on the method.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name)
}

/// `brittle <cmd>` on the first 6 embedded MNIST images, small-cnn, L∞, chunks of 2.
fn brittle(cmd: &str, out: &Path, extra: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_brittle"))
        .arg(cmd)
        .arg("--model")
        .arg(asset("mnist-small-cnn.safetensors"))
        .args(["--arch", "small-cnn", "--data"])
        .arg(asset("mnist-test-1000-images-idx3-ubyte.gz"))
        .args([
            "--limit",
            "6",
            "--norm",
            "linf",
            "--chunk",
            "2",
            "--batch-size",
            "2",
        ])
        .args(["--device", "cpu", "--threads", "1", "--out"])
        .arg(out)
        .args(extra)
        .env("BRITTLE_NO_PROGRESS", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "brittle {cmd} {extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn certify(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--method", "ibp"];
    args.extend_from_slice(extra);
    brittle("certify", out, &args)
}

/// The rows without their `seconds` column (the only one that may differ between runs).
fn without_seconds(p: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(p).unwrap();
    text.lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(',').collect();
            f.truncate(4);
            f.join(",")
        })
        .collect()
}

fn sidecar(csv: &Path) -> serde_json::Value {
    let p = format!("{}.meta.json", csv.display());
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn bounds_file_resumes_and_shards_into_the_rows_of_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.csv");
    certify(&full, &[]);
    let rows = without_seconds(&full);
    assert_eq!(rows[0], "index,certified_radius,method,passes");
    assert_eq!(
        std::fs::read_to_string(&full).unwrap().lines().next(),
        Some("index,certified_radius,method,passes,seconds")
    );
    assert_eq!(rows.len(), 7, "{rows:?}");
    for (i, r) in rows[1..].iter().enumerate() {
        let f: Vec<&str> = r.split(',').collect();
        assert_eq!(f[0], i.to_string());
        let radius: f64 = f[1].parse().unwrap();
        assert!((0.0..1.0).contains(&radius), "{r}");
        assert_eq!(f[2], "ibp");
        assert!(f[3].parse::<u32>().unwrap() > 0, "{r}");
    }
    assert_eq!(sidecar(&full)["complete"], true);

    // A killed run: two chunks written, a partial line, an incomplete sidecar.
    let partial = dir.path().join("partial.csv");
    let text = std::fs::read_to_string(&full).unwrap();
    let kept: Vec<&str> = text.lines().take(5).collect();
    std::fs::write(&partial, format!("{}\n4,0.00", kept.join("\n"))).unwrap();
    let mut side = sidecar(&full);
    side["complete"] = serde_json::Value::Bool(false);
    std::fs::write(
        format!("{}.meta.json", partial.display()),
        serde_json::to_string(&side).unwrap(),
    )
    .unwrap();
    certify(&partial, &[]);
    assert_eq!(without_seconds(&partial), rows);
    assert_eq!(sidecar(&partial)["complete"], true);

    // Shards: whole chunks each, together the rows of one run.
    let mut joined = vec![rows[0].clone()];
    for i in 0..3 {
        let shard = dir.path().join(format!("shard{i}.csv"));
        certify(&shard, &["--shard", &format!("{i}/3")]);
        joined.extend(without_seconds(&shard).into_iter().skip(1));
    }
    assert_eq!(joined, rows);

    // Other settings at the same path are refused, not mixed in.
    let o = Command::new(env!("CARGO_BIN_EXE_brittle"))
        .arg("certify")
        .arg("--model")
        .arg(asset("mnist-small-cnn.safetensors"))
        .args(["--arch", "small-cnn", "--data"])
        .arg(asset("mnist-test-1000-images-idx3-ubyte.gz"))
        .args([
            "--limit", "6", "--norm", "l2", "--chunk", "2", "--method", "ibp",
        ])
        .args(["--device", "cpu", "--threads", "1", "--out"])
        .arg(&full)
        .env("BRITTLE_NO_PROGRESS", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("full.csv"), "{err}");
}

/// `margins --certify` puts a lower bound beside every attack margin, and `analyze` reports the
/// brackets: no certified radius above its attack margin, and a finite ratio.
#[test]
fn margins_with_certify_bracket_every_margin_and_analyze_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("m.csv");
    brittle(
        "margins",
        &csv,
        &[
            "--attack",
            "fmn",
            "--steps",
            "60",
            "--seed",
            "1",
            "--certify",
            "ibp",
        ],
    );
    let mut reader = csv::Reader::from_path(&csv).unwrap();
    let header = reader.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (lower, upper, ok) = (col("certified_radius"), col("input_margin"), col("success"));
    let mut bracketed = 0;
    for r in reader.records() {
        let r = r.unwrap();
        let lo: f64 = r[lower].parse().unwrap();
        let up: f64 = r[upper].parse().unwrap();
        assert!(lo >= 0.0, "{r:?}");
        if &r[ok] == "1" {
            assert!(lo <= up, "certified {lo} above the attack's {up}");
            bracketed += 1;
        }
    }
    assert!(bracketed >= 5, "{bracketed} successful attacks of 6");

    let out = dir.path().join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_brittle"))
        .arg("analyze")
        .arg(&csv)
        .args(["--bootstrap", "0", "--eps", "0.05", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let b = &metrics["brackets"];
    assert_eq!(b["n"], bracketed, "{b}");
    assert_eq!(b["violations"], 0, "{b}");
    let median = b["ratio"]["median"].as_f64();
    assert!(median.is_some_and(|m| m >= 1.0), "{b}");
}
