//! `brittle score`: free scores of every sample, one forward pass each.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{DataArgs, ModelArgs};
use crate::detector::{Decision, Detector};
use crate::model::checked::name_sample;
use crate::norm::Norm;
use crate::provenance::{write_sidecar, Provenance};
use crate::score::score_batch;
use crate::score::table::{write_csv, ScoreRow};
use crate::util::progress_bar;

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

/// Scores every sample of a dataset; returns the rows in dataset order.
pub fn score_dataset(
    model: &dyn crate::model::Classifier,
    data: &crate::data::Dataset,
    batch_size: usize,
    norm: Norm,
) -> Result<Vec<ScoreRow>> {
    anyhow::ensure!(batch_size > 0, "--batch-size must be positive");
    let pb = progress_bar(data.len() as u64, "score");
    let mut rows = Vec::with_capacity(data.len());
    for start in (0..data.len()).step_by(batch_size) {
        let end = (start + batch_size).min(data.len());
        let (x, labels) = data.batch(start, end);
        let scores = score_batch(model, &x, norm)
            .map_err(|e| name_sample(e, &data.indices[start..end], &data.source))?;
        for (i, s) in scores.into_iter().enumerate() {
            rows.push(ScoreRow {
                index: data.indices[start + i],
                label: labels[i],
                scores: s,
            });
        }
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    Ok(rows)
}

/// The detector's decision for every row (same order as `rows`, which follow `data`).
pub fn detect_dataset(
    detector: &Detector,
    model: &dyn crate::model::Classifier,
    data: &crate::data::Dataset,
    rows: &[ScoreRow],
    batch_size: usize,
) -> Result<Vec<Decision>> {
    anyhow::ensure!(batch_size > 0, "--batch-size must be positive");
    let pb = progress_bar(data.len() as u64, "detect");
    let mut out = Vec::with_capacity(data.len());
    for start in (0..data.len()).step_by(batch_size) {
        let end = (start + batch_size).min(data.len());
        let (x, _) = data.batch(start, end);
        let (_, pm) = detector.forward(model, &x)?;
        for (i, row) in rows[start..end].iter().enumerate() {
            out.push(detector.decide(row.scores.logit_margin, pm.as_ref().map(|v| v[i]))?);
        }
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

pub fn run(a: ScoreArgs) -> Result<()> {
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
    let rows = score_dataset(model.as_ref(), &data, a.batch_size, a.norm)?;
    let decisions = match &detector {
        Some(d) => detect_dataset(d, model.as_ref(), &data, &rows, a.batch_size)?,
        None => Vec::new(),
    };
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
