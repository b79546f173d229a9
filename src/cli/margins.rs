//! `brittle margins`: an upper bound on every sample's input margin, by minimum-norm attacks.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{DataArgs, ModelArgs};
use super::hints::{self, FlagHint};
use super::progress::{with_bar, work_bar};
use crate::attack::AttackKind;
use crate::certify::Method;
use crate::margins::{self, MarginsOptions, Shard};
use crate::norm::Norm;
use crate::util::Check;

#[derive(Debug, Args)]
pub struct MarginsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Perturbation norm.
    #[arg(long, default_value = "linf")]
    pub norm: Norm,
    /// Attack; `best` keeps per sample the smallest verified distance of a cheap pipeline.
    #[arg(long, value_parser = super::values::enum_parser::<AttackKind>(), default_value = "best")]
    pub attack: AttackKind,
    /// Iterations per sample (default: the attack's published budget; for `best`, its cold FMN
    /// pass's, 150 in L∞ and 120 in L2, with a third of it for the warm FMN pass).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classes considered by `fab-t` and by `best`'s FAB pass.
    #[arg(long, default_value_t = 9)]
    pub topk: i64,
    /// Multiplies every budget of `best`, 1 to 1000 (tighter margins at about EFFORT times the
    /// cost).
    #[arg(long, default_value_t = 1)]
    pub effort: usize,
    /// Samples attacked together.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Samples per chunk, the unit of refill, resumption and sharding (default: 4 batches).
    #[arg(long)]
    pub chunk: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Attack the true label instead of the prediction (misclassified samples get margin 0).
    #[arg(long)]
    pub target_true: bool,
    /// Output CSV (resumed when it exists with the same settings).
    #[arg(long, default_value = "margins.csv")]
    pub out: PathBuf,
    /// When OUT was made with the same settings by another version of the attack (an older
    /// brittle), start it again instead of refusing it.
    #[arg(long)]
    pub restart_stale: bool,
    /// Also write the adversarial examples `[N, C, H, W]` float32 (NaN where none was found).
    #[arg(long)]
    pub save_adv: Option<PathBuf>,
    /// Run shard i of n (whole chunks), e.g. `0/4`; defaults to SLURM array variables.
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Shard count when the index comes from JOB_COMPLETION_INDEX (Kubernetes indexed jobs).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Also certify a lower bound on every margin (a `certified_radius` column): crown when
    /// given without a value, or ibp, alpha-crown.
    #[arg(long, num_args = 0..=1, default_missing_value = "crown", value_parser = super::values::enum_parser::<Method>())]
    pub certify: Option<Method>,
}

/// `--shard`, else SLURM_ARRAY_TASK_ID/COUNT (offset by SLURM_ARRAY_TASK_MIN), else
/// JOB_COMPLETION_INDEX with `--shards`.
fn resolve_shard(a: &MarginsArgs) -> Result<Option<Shard>> {
    if let Some(s) = a.shard {
        return Ok(Some(s));
    }
    let var = |k: &str| -> Result<Option<usize>> {
        match std::env::var(k) {
            Ok(v) => Ok(Some(v.trim().parse().with_context(|| {
                format!("environment variable {k}={v:?} is not a number")
            })?)),
            Err(_) => Ok(None),
        }
    };
    if let (Some(id), Some(count)) = (var("SLURM_ARRAY_TASK_ID")?, var("SLURM_ARRAY_TASK_COUNT")?) {
        let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        return Ok(Some(Shard::new(
            id.checked_sub(min)
                .context("SLURM_ARRAY_TASK_ID < SLURM_ARRAY_TASK_MIN")?,
            count,
        )?));
    }
    if let Some(n) = a.shards {
        let id = var("JOB_COMPLETION_INDEX")?
            .context("--shards needs JOB_COMPLETION_INDEX (or pass --shard i/n)")?;
        return Ok(Some(Shard::new(id, n)?));
    }
    Ok(None)
}

pub fn run(a: MarginsArgs) -> Result<()> {
    let shard = resolve_shard(&a)?;
    let data = a.data.load()?;
    let model = a.model.load_for(&data)?;
    let options = MarginsOptions {
        norm: a.norm,
        attack: a.attack,
        steps: a.steps,
        topk: a.topk,
        effort: a.effort,
        seed: a.seed,
        target_true: a.target_true,
        batch_size: a.batch_size,
        chunk: a.chunk.unwrap_or(4 * a.batch_size),
        shard,
        certify: a.certify,
    }
    .check()
    .flag_hint(hints::MARGINS)?;
    let t0 = std::time::Instant::now();
    let s = with_bar(work_bar(options.attack.as_str()), |pb| {
        margins::run_with_progress(
            model.as_ref(),
            &data,
            &options,
            margins::Output {
                margins: &a.out,
                save_adv: a.save_adv.as_deref(),
                restart_stale: a.restart_stale,
            },
            pb,
        )
    })
    .with_context(|| format!("margins into --out {}", a.out.display()))
    .flag_hint(hints::MARGINS)?;
    if let Some(why) = &s.restarted {
        eprintln!("warning: started {} again: {why}", a.out.display());
    }
    let ok: Vec<f64> = s
        .rows
        .iter()
        .filter(|r| r.success == 1)
        .map(|r| r.input_margin)
        .collect();
    let mut sorted = ok.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{} samples ({} resumed), {} attacked successfully, median {} margin {:.5}, {:.1} ms/sample -> {}",
        s.rows.len(),
        s.resumed,
        ok.len(),
        a.norm,
        sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        1e3 * t0.elapsed().as_secs_f64() / (s.rows.len() - s.resumed).max(1) as f64,
        a.out.display()
    );
    Ok(())
}
