//! `brittle fit`: a deployable detector from an attacked set.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::args::{DataArgs, ModelArgs};
use super::hints::{FlagHint, Flags};
use super::values::enum_parser;
use crate::detector::fit::{fit, FitOptions, PseudoMode};
use crate::detector::pseudo::{PseudoLoss, TrainConfig};
use crate::detector::{ScoreKind, DETECTOR_FILE};
use crate::margins::{find_sidecar, read_margins};
use crate::norm::{parse_eps, Norm};
use crate::provenance::{sidecar_path, Provenance};
use crate::util::{Check, Checked};

#[derive(Debug, Args)]
pub struct FitArgs {
    /// Margins file from `brittle margins` (input margins of the samples of --data).
    pub margins: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The data the margins were computed on (same file, --offset and --limit).
    #[command(flatten)]
    pub data: DataArgs,
    /// Perturbation budget: a sample is non-robust when its input margin is at most eps.
    #[arg(long, value_parser = parse_eps)]
    pub eps: f64,
    /// Norm the input margins are measured in. Default: the one the margins sidecar
    /// (`<margins>.meta.json`) records, else linf; a norm that contradicts the sidecar is refused.
    #[arg(long)]
    pub norm: Option<Norm>,
    /// Share of non-robust samples the detector must flag.
    #[arg(long, default_value_t = 0.95)]
    pub target_tpr: f64,
    /// Learn a pseudo-margin: auto keeps it only when it beats the logit margin on validation.
    #[arg(long, value_parser = enum_parser::<PseudoMode>(), default_value = "auto")]
    pub pseudo: PseudoMode,
    /// Pseudo-margin training objective.
    #[arg(long, value_parser = enum_parser::<PseudoLoss>(), default_value = "regression")]
    pub loss: PseudoLoss,
    /// Width of the pseudo-margin MLP's hidden layers.
    #[arg(long, default_value_t = 64)]
    pub hidden: i64,
    /// Hidden layers of the pseudo-margin MLP.
    #[arg(long, default_value_t = 2)]
    pub depth: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Maximum training epochs.
    #[arg(long, default_value_t = 200)]
    pub epochs: usize,
    /// Stop after this many epochs without a better validation Kendall tau.
    #[arg(long, default_value_t = 30)]
    pub patience: usize,
    /// Pseudo-margin minibatch size.
    #[arg(long, default_value_t = 128)]
    pub mlp_batch_size: usize,
    /// Share of the attacked set held out for validation.
    #[arg(long, default_value_t = 0.3)]
    pub val_fraction: f64,
    /// Seed of the split and of the MLP's initialisation and minibatches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Output folder (detector.json + pseudo-margin weights).
    #[arg(long, default_value = "detector")]
    pub out: PathBuf,
}

/// The norm of the margins (the sidecar's, which `--norm` must not contradict; else `--norm`,
/// else linf), refusing a margins file whose sidecar names another model than this run's.
fn check_sidecar(margins: &Path, norm: Option<Norm>, fingerprint: &str) -> Result<Norm> {
    let Some(side) = find_sidecar(margins)? else {
        return Ok(norm.unwrap_or(Norm::Linf));
    };
    let f = &side.settings.model_fingerprint;
    if f != fingerprint {
        bail!(
            "{}: the margins were computed with model fingerprint {f}, not with --model (fingerprint {fingerprint})",
            sidecar_path(margins).display()
        );
    }
    side.norm(margins, norm)
        .context("--norm contradicts the margins file")
}

/// The column name of a detector's score, as `detector.json` and `scores.csv` write it.
pub(super) fn score_name(s: ScoreKind) -> &'static str {
    match s {
        ScoreKind::LogitMargin => "logit_margin",
        ScoreKind::PseudoMargin => "pseudo_margin",
    }
}

/// The flags of [`FitOptions`]' fields.
const FIT_FLAGS: Flags = &[
    ("eps", "--eps"),
    ("target_tpr", "--target-tpr"),
    ("val_fraction", "--val-fraction"),
    ("batch_size", "--batch-size"),
    ("window", "--offset/--limit"),
];

/// The flags of the pseudo-margin's [`TrainConfig`] fields.
const PSEUDO_FLAGS: Flags = &[
    ("hidden", "--hidden"),
    ("depth", "--depth"),
    ("lr", "--lr"),
    ("max_epochs", "--epochs"),
    ("batch_size", "--mlp-batch-size"),
];

/// The checked options of `fit`, each error naming its flag.
fn options(a: &FitArgs, norm: Norm) -> Result<Checked<FitOptions>> {
    let train = TrainConfig {
        hidden: a.hidden,
        depth: a.depth,
        loss: a.loss,
        lr: a.lr,
        max_epochs: a.epochs,
        patience: a.patience,
        batch_size: a.mlp_batch_size,
        ..TrainConfig::default()
    }
    .check()
    .flag_hint(PSEUDO_FLAGS)?;
    FitOptions {
        eps: a.eps,
        norm,
        target_tpr: a.target_tpr,
        pseudo: a.pseudo,
        train,
        val_fraction: a.val_fraction,
        seed: a.seed,
        batch_size: a.batch_size,
        margins_name: a.margins.display().to_string(),
    }
    .check()
    .flag_hint(FIT_FLAGS)
}

pub fn run(a: FitArgs) -> Result<()> {
    let rows = read_margins(&a.margins)?;
    let data = a.data.load()?;
    let model = a.model.load_for(&data)?;
    let norm = check_sidecar(&a.margins, a.norm, &model.info().fingerprint)?;
    let opts = options(&a, norm)?;
    let det = fit(
        model.as_ref(),
        &data,
        &rows,
        &opts,
        Provenance::current(Some(a.seed)),
    )
    .with_context(|| format!("fitting a detector on {}", a.margins.display()))
    .flag_hint(FIT_FLAGS)?;
    det.save(&a.out)?;
    let s = &det.spec;
    let v = &s.validation;
    println!(
        "validation ({} samples): Kendall tau logit margin {:.4}{}",
        v.n_val,
        v.logit_margin.kendall_tau,
        v.pseudo_margin
            .as_ref()
            .map(|q| format!(", pseudo-margin {:.4}", q.kendall_tau))
            .unwrap_or_default()
    );
    println!(
        "score {}: flag when <= {:.6}; on the {} set: TPR {:.3} of {} non-robust, FPR {} of {} robust",
        score_name(s.score),
        s.lambda,
        s.calibrated_on,
        s.calibration.tpr,
        s.calibration.positives,
        s.calibration
            .fpr
            .map_or("n/a".to_string(), |f| format!("{f:.3}")),
        s.calibration.negatives
    );
    println!("-> {}", a.out.join(DETECTOR_FILE).display());
    Ok(())
}
