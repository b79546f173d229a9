//! The analysis report: `metrics.json`, `report.html` (figures inlined as SVG, numbers in
//! tables, no JavaScript) and every figure as SVG and PNG.

pub mod analysis;
pub mod brackets;
pub mod figures;
mod html;
mod nan;

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::SeriesLabelPosition;

pub use analysis::{analyze, default_eps, Analysis, AnalyzeOptions};

use crate::margins::MarginRow;
use figures::{render, BracketPlot, Curves, MarginHistogram, MarginScatter, TauBars};

/// File name of the numbers inside a report folder.
pub const METRICS_FILE: &str = "metrics.json";

/// Reads the numbers of a report folder (`null` in the file reads as NaN).
pub fn read_metrics(dir: &Path) -> Result<Analysis> {
    let path = dir.join(METRICS_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not the metrics of a brittle report", path.display()))
}

/// Figures of a report: `(file stem, title, svg)`.
pub type Figures = Vec<(&'static str, &'static str, String)>;

/// Writes `metrics.json`, the figures and `report.html` into `dir` (created if needed).
pub fn write_report(rows: &[MarginRow], a: &Analysis, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join(METRICS_FILE);
    std::fs::write(&json, serde_json::to_string_pretty(a)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let used: Vec<&MarginRow> = rows.iter().filter(|r| r.success == 1).collect();
    let d_in: Vec<f64> = used.iter().map(|r| r.input_margin).collect();
    let d_out: Vec<f64> = used.iter().map(|r| r.logit_margin).collect();
    let eps: Vec<(String, f64)> = a
        .detection
        .iter()
        .map(|d| (d.eps_label.clone(), d.eps))
        .collect();
    let norm_label = a.norm.symbol();
    let (wide, square) = ((760, 520), (530, 500));
    let mut figs: Figures = Vec::new();
    let scatter = MarginScatter {
        d_in: &d_in,
        d_out: &d_out,
        eps: &eps,
        norm_label,
        tau: a.logit_margin.kendall_tau,
    };
    figs.push((
        "margins",
        "Input margin vs logit margin",
        render(&scatter, wide, dir, "margins")?,
    ));
    let series = |f: fn(&analysis::EpsDetection) -> figures::Series| -> Vec<_> {
        a.detection
            .iter()
            .filter(|d| d.positives > 0 && d.negatives > 0)
            .map(f)
            .collect()
    };
    let roc = Curves {
        title: "ROC: detecting d_in ≤ ε by the logit margin".into(),
        x_desc: "false-positive rate",
        y_desc: "true-positive rate",
        series: series(|d| {
            let pts = d
                .roc
                .x
                .iter()
                .copied()
                .zip(d.roc.y.iter().copied())
                .collect();
            (
                format!("ε = {} (AUROC {:.3})", d.eps_label, d.logit_margin.auroc),
                pts,
            )
        }),
        diagonal: true,
        legend_at: SeriesLabelPosition::LowerRight,
    };
    figs.push(("roc", "ROC curves per ε", render(&roc, square, dir, "roc")?));
    let pr = Curves {
        title: "Precision-recall per ε".into(),
        x_desc: "recall",
        y_desc: "precision",
        series: series(|d| {
            let pts = d.pr.x.iter().copied().zip(d.pr.y.iter().copied()).collect();
            (
                format!("ε = {} (AUPR {:.3})", d.eps_label, d.logit_margin.aupr),
                pts,
            )
        }),
        diagonal: false,
        legend_at: SeriesLabelPosition::LowerLeft,
    };
    figs.push((
        "pr",
        "Precision-recall curves per ε",
        render(&pr, square, dir, "pr")?,
    ));
    let bars = TauBars {
        bars: analysis::SCORES
            .iter()
            .filter_map(|s| {
                a.scores.get(s.name).map(|c| {
                    (
                        c.oriented.clone(),
                        c.correlations.kendall_tau,
                        c.correlations.kendall_tau_ci,
                    )
                })
            })
            .collect(),
    };
    figs.push((
        "tau",
        "Kendall τ per score",
        render(&bars, wide, dir, "tau")?,
    ));
    let hist = MarginHistogram {
        d_in: &d_in,
        eps: &eps,
        norm_label,
    };
    figs.push((
        "input_margins",
        "Histogram of input margins",
        render(&hist, wide, dir, "input_margins")?,
    ));
    if a.brackets.is_some() {
        let b: Vec<(f64, f64)> = used
            .iter()
            .filter_map(|r| r.certified_radius.map(|l| (l, r.input_margin)))
            .collect();
        let plot = BracketPlot {
            brackets: &b,
            norm_label,
        };
        figs.push((
            "brackets",
            "Margin brackets: certified radius and attack margin per sample",
            render(&plot, wide, dir, "brackets")?,
        ));
    }
    let page = dir.join("report.html");
    std::fs::write(&page, html::page(a, &figs))
        .with_context(|| format!("writing {}", page.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::norm::Norm;
    use crate::provenance::Provenance;
    use crate::util::Check;

    /// `metrics.json` reads back as the analysis that wrote it, its undefined statistics
    /// (written as `null`) as NaN.
    #[test]
    fn metrics_read_back_with_null_as_nan() {
        let rows: Vec<MarginRow> = (0..8)
            .map(|i| MarginRow {
                index: i,
                label: 1,
                pred: 1,
                correct: 1,
                logit_margin: 0.3 * i as f64 + 0.1 * (i % 3) as f64,
                input_margin: 0.05 * (i + 1) as f64,
                attack: "fmn".into(),
                success: 1,
                forwards: 3,
                backwards: 3,
                seconds: 0.0,
                prob_margin: None,
                max_prob: None,
                entropy: Some(1.0 / (i + 1) as f64),
                energy: None,
                feature_margin: None,
                certified_radius: None,
                pseudo_margin: None,
            })
            .collect();
        let opts = AnalyzeOptions {
            norm: Norm::L2,
            // No sample is within 0.01: AUROC and the rest are undefined.
            eps: vec!["0.01".into(), "0.2".into()],
            input_shape: None,
            seed: 0,
            bootstrap: 0,
            subset: Some(4),
            repeats: 3,
            provenance: Provenance::current(Some(0)),
        }
        .check()
        .unwrap();
        let a = analyze(&rows, &opts);
        assert!(
            a.detection[0].logit_margin.auroc.is_nan() && a.logit_margin.kendall_tau_ci[0].is_nan()
        );
        let dir = tempfile::tempdir().unwrap();
        write_report(&rows, &a, dir.path()).unwrap();
        let back = read_metrics(dir.path()).unwrap();
        assert!(
            back.detection[0].logit_margin.auroc.is_nan()
                && back.logit_margin.kendall_tau_ci[1].is_nan()
        );
        assert_eq!(
            back.detection[1].logit_margin.auroc,
            a.detection[1].logit_margin.auroc
        );
        assert_eq!(back.norm, Norm::L2);
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&a).unwrap()
        );
    }

    #[test]
    fn analyze_options_refuse_what_gives_no_number_and_name_the_field() {
        let ok = AnalyzeOptions {
            norm: Norm::L2,
            eps: vec!["0.5".into(), "8/255".into()],
            input_shape: Some([1, 28, 28]),
            seed: 0,
            bootstrap: 0,
            subset: Some(4),
            repeats: 3,
            provenance: Provenance::current(Some(0)),
        };
        let sweep = ok.clone().check().unwrap().sweep();
        assert_eq!(
            sweep,
            [("0.5".to_string(), 0.5), ("8/255".to_string(), 8.0 / 255.0)]
        );
        let none = AnalyzeOptions {
            eps: vec![],
            ..ok.clone()
        };
        assert_eq!(
            none.check().unwrap().sweep(),
            analysis::default_eps(Norm::L2)
        );
        let bad = |o: AnalyzeOptions| {
            let e = o.check().unwrap_err();
            let opt = e.downcast_ref::<crate::util::OptionError>().unwrap();
            (opt.field, opt.value.clone(), e.to_string())
        };
        // sqrt(784) = 28 bounds L2 on 1×28×28 inputs.
        let (field, value, e) = bad(AnalyzeOptions {
            eps: vec!["0.5".into(), "30".into()],
            ..ok.clone()
        });
        assert_eq!((field, value.as_deref()), ("eps", Some("30")));
        assert!(e.contains("ε = 30 exceeds") && !e.contains("--"), "{e}");
        let (field, _, e) = bad(AnalyzeOptions {
            subset: Some(0),
            ..ok.clone()
        });
        assert!(field == "subset" && e.contains("positive"), "{e}");
        let (field, _, _) = bad(AnalyzeOptions {
            repeats: 0,
            ..ok.clone()
        });
        assert_eq!(field, "repeats");
        let (field, _, e) = bad(AnalyzeOptions {
            bootstrap: 1,
            ..ok.clone()
        });
        assert!(field == "bootstrap" && e.contains("no spread"), "{e}");
    }
}
