//! `brittle demo`: the whole life cycle on the embedded default (a PGD-trained MNIST CNN and
//! the first 1000 MNIST test images shipped in `assets/`), or on any model and data given.
//!
//! Each stage runs as the corresponding subcommand would, so the demo exercises exactly what a
//! user types; the headline numbers are read back from the files the stages wrote.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser};
use tch::Device;

use super::{run, Cli};
use crate::detector::Detector;
use crate::report::read_metrics;

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

    print_headline(&report, &detector, &a.eps)?;
    println!("report: {}", s(&report.join("report.html")));
    Ok(())
}

/// Prints the numbers a reader wants first, read from the files the stages wrote.
fn print_headline(report: &Path, detector: &Path, eps: &str) -> Result<()> {
    let m = read_metrics(report)?;
    let d = Detector::load(detector, Device::Cpu)?.spec;
    let eps_v = crate::norm::parse_eps(eps)?;
    let num = |x: f64| {
        if x.is_nan() {
            "n/a".to_string()
        } else {
            format!("{x:.3}")
        }
    };
    let opt = |x: Option<f64>| x.map_or("n/a".to_string(), num);
    println!(
        "\n== headline (embedded PGD-trained MNIST CNN, {})",
        m.norm.symbol()
    );
    println!(
        "samples {}   failed attacks {}   accuracy {}",
        m.n,
        m.n_failed,
        num(m.accuracy)
    );
    println!(
        "Kendall tau(input margin, logit margin) = {}",
        num(m.logit_margin.kendall_tau)
    );
    for row in &m.detection {
        let mark = if (row.eps - eps_v).abs() < 1e-9 {
            " <- detector eps"
        } else {
            ""
        };
        let d = &row.logit_margin;
        println!(
            "eps {:.3}: non-robust {}  AUROC {}  AUPR {}  FPR@95TPR {}{mark}",
            row.eps,
            row.positives,
            num(d.auroc),
            num(d.aupr),
            num(d.fpr_at_95_tpr)
        );
    }
    match &m.robust_accuracy_estimate {
        Some(estimates) => {
            for est in estimates {
                println!(
                    "robust accuracy at eps {}: estimate from {} attacked samples {} ± {} (attack on all: {})",
                    est.eps_label,
                    est.subset,
                    num(est.estimate.mean),
                    num(est.estimate.std),
                    num(est.attack_based)
                );
            }
        }
        None => {
            for ra in &m.robust_accuracy {
                println!("robust accuracy at eps {}: {}", ra.eps_label, num(ra.value));
            }
        }
    }
    let v = &d.validation;
    println!(
        "detector: flag when {} <= {} at eps {} (calibration TPR {}, FPR {}; validation Kendall tau: logit margin {}, pseudo-margin {})",
        super::fit::score_name(d.score),
        num(d.lambda),
        num(d.eps),
        num(d.calibration.tpr),
        opt(d.calibration.fpr),
        num(v.logit_margin.kendall_tau),
        opt(v.pseudo_margin.as_ref().map(|q| q.kendall_tau))
    );
    Ok(())
}
