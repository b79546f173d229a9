//! `brittle certify`: a lower bound on every sample's input margin (the certified radius),
//! by bound propagation and bisection over ε.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{DataArgs, ModelArgs};
use super::hints::{self, FlagHint};
use super::progress::{with_bar, work_bar};
use crate::certify::job::{self, CertifyOptions};
use crate::certify::Method;
use crate::margins::Shard;
use crate::norm::Norm;

#[derive(Debug, Args)]
pub struct CertifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Perturbation norm (linf or l2).
    #[arg(long, default_value = "linf")]
    pub norm: Norm,
    /// Bound: ibp (loosest, fastest), crown, alpha-crown (tightest).
    #[arg(long, value_parser = super::values::enum_parser::<Method>(), default_value = "crown")]
    pub method: Method,
    /// Relative width at which the bisection over ε stops.
    #[arg(long, default_value_t = 0.01)]
    pub rel_tol: f64,
    /// Samples bounded together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Samples per chunk, the unit of resumption and sharding (default: 4 batches).
    #[arg(long)]
    pub chunk: Option<usize>,
    /// Output CSV (resumed when it exists with the same settings).
    #[arg(long, default_value = "bounds.csv")]
    pub out: PathBuf,
    /// Run shard i of n (whole chunks), e.g. `0/4`.
    #[arg(long)]
    pub shard: Option<Shard>,
}

pub fn run(a: CertifyArgs) -> Result<()> {
    let data = a.data.load()?;
    let model = a.model.load_for(&data)?;
    let options = CertifyOptions {
        norm: a.norm,
        method: a.method,
        rel_tol: a.rel_tol,
        batch_size: a.batch_size,
        chunk: a.chunk.unwrap_or(4 * a.batch_size),
        shard: a.shard,
    };
    options.check().flag_hint(hints::CERTIFY)?;
    let t0 = std::time::Instant::now();
    let rows = with_bar(work_bar(a.method.as_ref()), |pb| {
        job::run(model.as_ref(), &data, &options, &a.out, pb)
    })
    .with_context(|| format!("certify into --out {}", a.out.display()))
    .flag_hint(hints::CERTIFY)?;
    let mut r: Vec<f64> = rows.iter().map(|r| r.certified_radius).collect();
    r.sort_by(f64::total_cmp);
    println!(
        "{} samples, {} certified above 0, median {} radius {:.5} ({}), {:.2} s/sample -> {}",
        rows.len(),
        r.iter().filter(|v| **v > 0.0).count(),
        a.norm,
        r.get(r.len() / 2).copied().unwrap_or(f64::NAN),
        a.method.as_ref(),
        t0.elapsed().as_secs_f64() / rows.len().max(1) as f64,
        a.out.display()
    );
    Ok(())
}
