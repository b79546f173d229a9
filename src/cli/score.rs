//! `brittle score`: free scores of every sample, one forward pass each.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{DataArgs, ModelArgs};
use super::hints::FlagHint;
use crate::detector::apply::score_dataset;
use crate::detector::Detector;
use crate::norm::Norm;
use crate::provenance::{write_sidecar, Provenance};
use crate::score::table::write_csv;
use crate::score::ScoreOptions;
use crate::util::progress_bar;
use crate::util::Check;

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output CSV.
    #[arg(long, default_value = "scores.csv")]
    pub out: PathBuf,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Attack norm the feature margin is measured for (its dual is applied to weight differences).
    #[arg(long, default_value = "linf")]
    pub norm: Norm,
    /// Detector folder from `brittle fit`: adds the `brittle` (0/1) and `pseudo_margin` columns.
    #[arg(long)]
    pub detector: Option<PathBuf>,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let opts = ScoreOptions {
        batch_size: a.batch_size,
        norm: a.norm,
    }
    .check()
    .flag_hint(&[("batch_size", "--batch-size")])?;
    let data = a.data.load()?;
    let model = a.model.load_for(&data)?;
    let detector = match &a.detector {
        Some(dir) => {
            let d = Detector::load(dir, model.device())?;
            d.check_model(model.info())
                .with_context(|| format!("detector {}", dir.display()))?;
            Some(d)
        }
        None => None,
    };
    let t0 = Instant::now();
    let pb = progress_bar(data.len() as u64, "score");
    let (rows, decisions) = score_dataset(model.as_ref(), detector.as_ref(), &data, &opts, &pb)?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let file =
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let extra_header: &[&str] = if detector.is_some() {
        &["brittle", "pseudo_margin"]
    } else {
        &[]
    };
    write_csv(std::io::BufWriter::new(file), &rows, extra_header, |i| {
        decisions.get(i).map_or_else(Vec::new, |d| {
            vec![
                u8::from(d.brittle).to_string(),
                d.pseudo_margin.map_or_else(String::new, |p| p.to_string()),
            ]
        })
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    write_sidecar(
        &a.out,
        &serde_json::json!({
            "provenance": Provenance::current(None),
            "model": model.info(),
            "data": data.source,
            "norm": a.norm,
            "detector": detector.as_ref().map(|d| serde_json::json!({
                "path": a.detector.as_ref().map(|p| p.display().to_string()),
                "score": d.spec.score, "lambda": d.spec.lambda, "eps": d.spec.eps,
                "provenance": d.spec.provenance,
            })),
        }),
    )?;
    if !decisions.is_empty() {
        let flagged = decisions.iter().filter(|d| d.brittle).count();
        println!(
            "detector: {flagged} of {} decisions flagged brittle at eps {}",
            decisions.len(),
            detector.as_ref().map_or(0.0, |d| d.spec.eps)
        );
    }
    let acc = rows.iter().filter(|r| r.correct()).count() as f64 / rows.len().max(1) as f64;
    println!(
        "scored {} samples of {} with {}: accuracy {:.2}%, {:.1} samples/s -> {}",
        rows.len(),
        data.source,
        model.info().name,
        100.0 * acc,
        rows.len() as f64 / secs.max(1e-9),
        a.out.display()
    );
    Ok(())
}
