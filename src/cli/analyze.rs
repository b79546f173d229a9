//! `brittle analyze`: margin consistency, detection and robust accuracy from a margins file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::hints::{self, FlagHint};
use crate::margins::{find_sidecar, read_margins};
use crate::norm::Norm;
use crate::provenance::Provenance;
use crate::report::{analyze, write_report, AnalyzeOptions};
use crate::util::Check;

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The margins CSV (`brittle margins`).
    pub margins: PathBuf,
    /// ε values (repeatable or comma-separated), e.g. `--eps 8/255 --eps 0.5` or
    /// `--eps 2/255,4/255`. Default: L∞ 2,4,8,12,16,32 /255; L2 0.25, 0.5, 1.0.
    #[arg(long, value_delimiter = ',', value_parser = super::args::eps_text)]
    pub eps: Vec<String>,
    /// Norm of the input margins. Default: the norm the margins sidecar (`<margins>.meta.json`)
    /// records, else linf; a norm that contradicts the sidecar is refused.
    #[arg(long)]
    pub norm: Option<Norm>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bootstrap resamples for 95% intervals (0: none).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Estimate robust accuracy from the logit margins and an attacked random subset of this size.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Repeats of the subset estimate.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Output folder (metrics.json, report.html, figures).
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

pub fn run(a: AnalyzeArgs) -> Result<()> {
    let rows = read_margins(&a.margins)?;
    // The sidecar `brittle margins` writes decides the norm and gives the input shape that
    // bounds ε; a hand-made file without one is read as --norm says (else linf).
    let side = find_sidecar(&a.margins)?;
    let norm = match &side {
        Some(s) => s
            .norm(&a.margins, a.norm)
            .context("--norm contradicts the margins file")?,
        None => a.norm.unwrap_or(Norm::Linf),
    };
    let opts = AnalyzeOptions {
        norm,
        eps: a.eps.clone(),
        input_shape: side.as_ref().map(|s| s.model.input_shape),
        seed: a.seed,
        bootstrap: a.bootstrap,
        subset: a.subset,
        repeats: a.repeats,
        provenance: Provenance::current(Some(a.seed)),
    }
    .check()
    .flag_hint(hints::ANALYZE)?;
    let analysis = analyze(&rows, &opts);
    write_report(&rows, &analysis, &a.out)?;
    println!(
        "n={} (failed {}), accuracy {:.4}, Kendall tau {:.4} [{:.4}, {:.4}] -> {}",
        analysis.n,
        analysis.n_failed,
        analysis.accuracy,
        analysis.logit_margin.kendall_tau,
        analysis.logit_margin.kendall_tau_ci[0],
        analysis.logit_margin.kendall_tau_ci[1],
        a.out.display()
    );
    for d in &analysis.detection {
        println!(
            "  eps {:>7}: non-robust {:>5}, AUROC {:.4}, AUPR {:.4}, FPR@95TPR {:.4} (logit margin <= {:.4})",
            d.eps_label, d.positives, d.logit_margin.auroc, d.logit_margin.aupr, d.logit_margin.fpr_at_95_tpr, d.threshold_at_95_tpr
        );
    }
    if let Some(b) = &analysis.brackets {
        let r = &b.ratio;
        println!(
            "brackets: {} samples ({} certified at no eps, {} violations), ratio median {:.3} [q25 {:.3}, q75 {:.3}], Kendall tau lower {:.4} / upper {:.4}",
            b.n, b.n_uncertified, b.violations, r.median, r.q25, r.q75, b.kendall_tau_lower, b.kendall_tau_upper
        );
        for (c, d) in b.certified_accuracy.iter().zip(&b.detection) {
            println!(
                "  eps {:>7}: certified accuracy {:.4}, AUROC lower {:.4} / upper {:.4}",
                c.eps_label, c.value, d.auroc_lower, d.auroc_upper
            );
        }
    }
    Ok(())
}
