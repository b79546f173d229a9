//! Files that would silently give wrong numbers are refused: a margins file read in the wrong
//! norm, an ε on the pixel scale (8 meant as 8/255), a detector fitted on a class of almost no
//! samples, pseudo-margin options libtorch would panic on. One real L2 margins run of the
//! embedded MNIST model (`brittle margins`, so the sidecar is the one users get) feeds them all.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name)
}

fn brittle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brittle"))
        .args(args)
        .env("BRITTLE_NO_PROGRESS", "1")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `--model … --arch … --data … --limit 60 --device cpu --threads 1`.
fn model_and_data() -> Vec<String> {
    [
        "--model",
        asset("mnist-small-cnn.safetensors").to_str().unwrap(),
        "--arch",
        "small-cnn",
        "--data",
        asset("mnist-test-1000-images-idx3-ubyte.gz")
            .to_str()
            .unwrap(),
        "--limit",
        "60",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// The L2 margins of the first 60 MNIST test images (made once per test binary, under
/// cargo's per-target scratch folder) and the median of their successful input margins.
fn l2_margins() -> &'static (PathBuf, f64) {
    static M: OnceLock<(PathBuf, f64)> = OnceLock::new();
    M.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("file_trust");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("m.csv");
        let mut args = vec!["margins".to_string()];
        args.extend(model_and_data());
        args.extend(
            [
                "--norm", "l2", "--attack", "fmn", "--steps", "30", "--seed", "1", "--out",
            ]
            .map(String::from),
        );
        args.push(csv.display().to_string());
        let o = brittle(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", stderr(&o));
        let rows = brittle::margins::read_margins(&csv).unwrap();
        let mut d: Vec<f64> = rows
            .iter()
            .filter(|r| r.success == 1)
            .map(|r| r.input_margin)
            .collect();
        assert!(d.len() >= 50, "{} successes", d.len());
        d.sort_by(f64::total_cmp);
        let median = d[d.len() / 2];
        (csv, median)
    })
}

#[test]
fn fit_refuses_a_norm_against_the_sidecar_an_eps_beyond_the_box_and_a_thin_class() {
    let (csv, median) = l2_margins();
    let dir = tempfile::tempdir().unwrap();
    let fit = |extra: &[&str]| {
        let mut args = vec!["fit".to_string(), csv.display().to_string()];
        args.extend(model_and_data());
        args.extend(["--pseudo", "off", "--out"].map(String::from));
        args.push(dir.path().join("det").display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        brittle(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let ok = fit(&["--eps", &median.to_string()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let det: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("det/detector.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(det["norm"], "l2", "the sidecar's norm, without --norm");

    let e = stderr(&fit(&["--eps", &median.to_string(), "--norm", "linf"]));
    assert!(e.contains("(l2)") && e.contains("(linf)"), "{e}");
    // sqrt(28·28) = 28 is the largest L2 distance between two MNIST images.
    let e = stderr(&fit(&["--eps", "30", "--norm", "l2"]));
    assert!(
        e.contains("--eps")
            && e.contains("ε = 30 exceeds the largest L2 distance")
            && e.contains("did you mean 30/255?"),
        "{e}"
    );
    // Below the smallest margin no sample is non-robust: no detector, both counts named.
    let rows = brittle::margins::read_margins(csv).unwrap();
    let smallest = rows
        .iter()
        .filter(|r| r.success == 1)
        .map(|r| r.input_margin)
        .fold(f64::INFINITY, f64::min);
    let e = stderr(&fit(&[
        "--eps",
        &(smallest / 2.0).to_string(),
        "--norm",
        "l2",
    ]));
    assert!(
        e.contains("0 non-robust samples") && e.contains(&format!("{} robust", rows.len())),
        "{e}"
    );
}

#[test]
fn fit_pseudo_options_are_checked_before_libtorch_sees_them() {
    let (csv, median) = l2_margins();
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, field) in [
        ("--hidden", "0", "hidden = 0"),
        ("--epochs", "0", "max_epochs = 0"),
        ("--lr", "0", "lr = 0"),
        ("--mlp-batch-size", "1", "batch_size = 1"),
    ] {
        let mut args = vec!["fit".to_string(), csv.display().to_string()];
        args.extend(model_and_data());
        args.extend(
            [
                "--pseudo",
                "on",
                "--norm",
                "l2",
                "--eps",
                &median.to_string(),
                flag,
                value,
                "--out",
            ]
            .map(String::from),
        );
        args.push(dir.path().join("det").display().to_string());
        let o = brittle(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{flag} {value}: {e}");
        assert!(e.contains(field) && e.contains(flag), "{flag} {value}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
}

#[test]
fn eval_pgd_refuses_an_eps_on_the_pixel_scale() {
    let mut args = vec!["eval-pgd".to_string()];
    args.extend(model_and_data());
    args.extend(["--eps", "8", "--steps", "2"].map(String::from));
    let o = brittle(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(
            "ε = 8 exceeds the largest L∞ distance in the [0,1] box (1); did you mean 8/255?"
        ),
        "{e}"
    );
}

#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn fingerprinting_the_real_pool_costs_little_next_to_one_attack() {
    let pool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cifar10/real-pool.bin");
    let data = brittle::data::DataSpec {
        path: pool,
        ..Default::default()
    }
    .load()
    .unwrap();
    let t0 = std::time::Instant::now();
    let h = brittle::margins::data_sha256(&data).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "data_sha256 of {} images ({} MB decoded): {:.1} ms",
        data.len(),
        data.len() * 3 * 32 * 32 * 4 / 1_000_000,
        1e3 * secs
    );
    assert_eq!(h.len(), 64);
    assert_eq!(h, brittle::margins::data_sha256(&data).unwrap());
    // A margins run on these images takes minutes; the fingerprint must not be noticeable.
    assert!(secs < 2.0, "{secs} s");
}
