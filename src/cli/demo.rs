//! `brittle demo`: the whole life cycle on the embedded default (a PGD-trained MNIST CNN and
//! the first 1000 MNIST test images shipped in `assets/`), or on any model and data given.
//!
//! Each stage runs as the corresponding subcommand would, so the demo exercises exactly what a
//! user types; the headline numbers are read back from the files the stages wrote.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser};

use super::{run, Cli};

/// Where the embedded default lives, relative to the crate root.
const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output folder for margins, report, detector and scores.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Samples of the embedded MNIST subset to attack (at most 1000).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Perturbation budget (L∞) of the detector.
    #[arg(long, default_value = "0.3", value_parser = super::args::eps_text)]
    pub eps: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

fn stage(title: &str, argv: &[String]) -> Result<()> {
    eprintln!("\n== {title}\n$ brittle {}", argv.join(" "));
    let cli =
        Cli::try_parse_from(std::iter::once("brittle".to_string()).chain(argv.iter().cloned()))
            .with_context(|| format!("demo stage {title:?}: bad arguments"))?;
    run(cli).with_context(|| format!("demo stage {title:?}"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn run_demo(a: DemoArgs) -> Result<()> {
    let assets = Path::new(ASSETS);
    let model = assets.join("mnist-small-cnn.safetensors");
    let data = assets.join("mnist-test-1000-images-idx3-ubyte.gz");
    for f in [&model, &data] {
        anyhow::ensure!(
            f.exists(),
            "the embedded default {} is missing (a broken checkout?)",
            f.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let margins = a.out.join("margins.csv");
    let report = a.out.join("report");
    let detector = a.out.join("detector");
    let scores = a.out.join("live-scores.csv");
    let model_args = |v: &mut Vec<String>| {
        v.extend([
            "--model".into(),
            s(&model),
            "--arch".into(),
            "small-cnn".into(),
        ]);
        v.extend([
            "--device".into(),
            a.device.clone(),
            "--threads".into(),
            a.threads.to_string(),
        ]);
        v.extend(["--data".into(), s(&data)]);
    };
    let mut m = vec!["margins".to_string()];
    model_args(&mut m);
    m.extend([
        "--limit".into(),
        a.limit.to_string(),
        "--norm".into(),
        "linf".into(),
        "--attack".into(),
        "best".into(),
        // A run of an older brittle is started again, not refused.
        "--restart-stale".into(),
    ]);
    m.extend([
        "--seed".into(),
        a.seed.to_string(),
        "--out".into(),
        s(&margins),
    ]);
    stage("1/4 input margins (minimum-norm attacks, resumable)", &m)?;

    let mut an = vec![
        "analyze".to_string(),
        s(&margins),
        "--norm".into(),
        "linf".into(),
    ];
    for e in ["0.1", "0.2", a.eps.as_str()] {
        an.extend(["--eps".into(), e.to_string()]);
    }
    an.extend([
        "--subset".into(),
        "100".into(),
        "--repeats".into(),
        "20".into(),
        "--seed".into(),
        a.seed.to_string(),
    ]);
    an.extend(["--out".into(), s(&report)]);
    stage("2/4 margin consistency and detection report", &an)?;

    let mut f = vec!["fit".to_string(), s(&margins)];
    model_args(&mut f);
    f.extend([
        "--limit".into(),
        a.limit.to_string(),
        "--eps".into(),
        a.eps.clone(),
        "--seed".into(),
        a.seed.to_string(),
    ]);
    f.extend(["--out".into(), s(&detector)]);
    stage("3/4 detector fit (threshold and pseudo-margin)", &f)?;

    let mut sc = vec!["score".to_string()];
    model_args(&mut sc);
    sc.extend([
        "--limit".into(),
        "16".into(),
        "--detector".into(),
        s(&detector),
        "--out".into(),
        s(&scores),
    ]);
    stage("4/4 live scoring with the detector", &sc)?;

    print_headline(
        &report.join("metrics.json"),
        &detector.join("detector.json"),
        &a.eps,
    )?;
    println!("report: {}", s(&report.join("report.html")));
    Ok(())
}

/// Prints the numbers a reader wants first, read from the files the stages wrote.
fn print_headline(metrics: &Path, detector: &Path, eps: &str) -> Result<()> {
    let read = |p: &Path| -> Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let m = read(metrics)?;
    let d = read(detector)?;
    let eps_v = crate::norm::parse_eps(eps)?;
    let num = |v: &serde_json::Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.3}"));
    println!("\n== headline (embedded PGD-trained MNIST CNN, L∞)");
    println!(
        "samples {}   failed attacks {}   accuracy {}",
        m["n"],
        m["n_failed"],
        num(&m["accuracy"])
    );
    println!(
        "Kendall tau(input margin, logit margin) = {}",
        num(&m["kendall_tau"])
    );
    if let Some(det) = m["detection"].as_array() {
        for row in det {
            let at = row["eps"].as_f64().unwrap_or(f64::NAN);
            let mark = if (at - eps_v).abs() < 1e-9 {
                " <- detector eps"
            } else {
                ""
            };
            println!(
                "eps {:.3}: non-robust {}  AUROC {}  AUPR {}  FPR@95TPR {}{mark}",
                at,
                row["positives"],
                num(&row["auroc"]),
                num(&row["aupr"]),
                num(&row["fpr_at_95_tpr"])
            );
        }
    }
    let attack_ra = m["robust_accuracy"].as_array().cloned().unwrap_or_default();
    for est in m["robust_accuracy_estimate"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "robust accuracy at eps {}: estimate from {} attacked samples {} ± {} (attack on all: {})",
            est["eps_label"].as_str().unwrap_or("?"),
            est["subset"],
            num(&est["estimate"]["mean"]),
            num(&est["estimate"]["std"]),
            num(&est["attack_based"])
        );
    }
    if m["robust_accuracy_estimate"].is_null() {
        for ra in &attack_ra {
            println!(
                "robust accuracy at eps {}: {}",
                ra["eps_label"].as_str().unwrap_or("?"),
                num(&ra["value"])
            );
        }
    }
    println!(
        "detector: flag when {} <= {} at eps {} (calibration TPR {}, FPR {}; validation Kendall tau: logit margin {}, pseudo-margin {})",
        d["score"].as_str().unwrap_or("?"),
        num(&d["lambda"]),
        num(&d["eps"]),
        num(&d["calibration"]["tpr"]),
        num(&d["calibration"]["fpr"]),
        num(&d["validation"]["logit_margin"]["kendall_tau"]),
        num(&d["validation"]["pseudo_margin"]["kendall_tau"])
    );
    Ok(())
}
