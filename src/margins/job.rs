//! A margins job: the samples of a dataset window (or one shard of it), attacked chunk by
//! chunk, rows appended and flushed after every chunk, resumable after any interruption, and
//! mergeable with the other shards.
//!
//! Reproducibility: chunks are fixed groups of `chunk` consecutive samples of the window, and a
//! chunk is always attacked whole (see [`crate::attack::driver`]), with per-sample seeds derived
//! from the global seed and the dataset index. A resumed run redoes the chunk it was killed in,
//! so its file is byte-identical (bar `seconds`) to an uninterrupted run, and shards (whole
//! chunks) give the same rows as one run.

use std::path::Path;

use anyhow::{Context, Result};
use tch::Tensor;

use super::adv_store::AdvStore;
use super::options::MarginsOptions;
use super::resume::{resume, Resume};
use super::row::{write_margins, MarginRow, MarginWriter, Optional};
use super::shard::shard_chunks;
use super::sidecar::Sidecar;
use crate::attack::driver::Chunk;
use crate::attack::plan::Plan;
use crate::attack::sample_seed;
use crate::certify::radius::Search;
use crate::certify::{bound_graph, certified_radii, BoundGraph, Method};
use crate::data::Dataset;
use crate::model::Classifier;
use crate::norm::Norm;
use crate::provenance::write_sidecar;
use crate::score::score_batch;
use crate::util::{Checked, NoProgress, Progress};

/// What a finished job reports.
pub struct Summary {
    pub rows: Vec<MarginRow>,
    /// Rows an interrupted earlier run had written.
    pub resumed: usize,
    /// Why the file was started again (see [`super::Resume::restarted`]).
    pub restarted: Option<String>,
}

/// Where a margins job writes.
#[derive(Debug, Clone, Copy)]
pub struct Output<'a> {
    /// The margins file (its sidecar goes beside it); resumed when it holds part of this job.
    pub margins: &'a Path,
    /// The adversarial examples (`.npy`), when wanted.
    pub save_adv: Option<&'a Path>,
    /// Start a margins file made by another version of the attack (or of brittle) again
    /// instead of refusing it.
    pub restart_stale: bool,
}

/// Runs (or resumes) a margins job into `output`, reporting to nobody.
pub fn run(
    model: &dyn Classifier,
    data: &Dataset,
    options: &Checked<MarginsOptions>,
    output: Output,
) -> Result<Summary> {
    run_with_progress(model, data, options, output, &NoProgress)
}

/// [`run`] reporting to `progress` per attack step: a sample counts one unit per step of each
/// pass's budget and per bisection step (see [`Chunk::run_with`]).
pub fn run_with_progress(
    model: &dyn Classifier,
    data: &Dataset,
    options: &Checked<MarginsOptions>,
    output: Output,
    progress: &dyn Progress,
) -> Result<Summary> {
    let Output {
        margins: out,
        save_adv,
        restart_stale,
    } = output;
    let o: &MarginsOptions = options;
    let plan = Plan::new(
        o.attack,
        o.norm,
        o.steps,
        o.topk,
        model.info().num_classes,
        o.effort,
    )?;
    let chunks = shard_chunks(data.len(), o.chunk, o.shard);
    let side = Sidecar::start(model.info(), data, o.clone(), Some(plan.describe()))?;
    let Resume {
        mut done,
        has_header,
        restarted,
    } = resume(out, &side, restart_stale)?;
    let resumed = done.len();
    write_sidecar(out, &side)?;
    // Rewrite what survived (drops a partial last line), then append.
    let optional = Optional {
        feature_margin: model.last_linear().is_some(),
        certified_radius: o.certify.is_some(),
    };
    let certify = match o.certify {
        Some(method) => Some((bound_graph(model)?, method)),
        None => None,
    };
    if has_header {
        write_margins(out, &done.values().cloned().collect::<Vec<_>>(), optional)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    let mut writer = MarginWriter::new(std::io::BufWriter::new(file), optional, !has_header)?;
    // A fresh run drops adversarial examples left by an unrelated earlier run.
    let mut adv = save_adv
        .map(|p| AdvStore::open(p, data.input_shape(), resumed == 0))
        .transpose()?;

    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let units = plan.passes.iter().map(|p| p.budget().steps).sum::<usize>() + plan.refine;
    progress.set_length((total * units) as u64);
    let mut finished = 0;
    progress.set_message(format!("0/{total} samples"));
    for range in &chunks {
        finished += range.len();
        // A chunk done before without adversarial examples kept (the examples were asked for
        // only on this resume) is attacked again: the seeded attack gives the same rows (the
        // file keeps its own) and the examples that were not stored.
        let stored = |p: usize| adv.as_ref().is_none_or(|a| a.has(data.indices[p]));
        if range
            .clone()
            .all(|p| done.contains_key(&data.indices[p]) && stored(p))
        {
            progress.inc((range.len() * units) as u64);
            progress.set_message(format!("{finished}/{total} samples"));
            continue;
        }
        let mut rows = attack_chunk(model, data, o, &plan, range.clone(), adv.as_mut(), progress)?;
        if let Some((graph, method)) = &certify {
            certify_chunk(
                graph,
                *method,
                o.norm,
                data,
                range.clone(),
                &mut rows,
                model,
                o.target_true,
            )?;
        }
        let new: Vec<MarginRow> = rows
            .into_iter()
            .filter(|r| !done.contains_key(&r.index))
            .collect();
        writer
            .write(&new)
            .with_context(|| format!("appending to {}", out.display()))?;
        for r in new {
            done.insert(r.index, r);
        }
        progress.set_message(format!("{finished}/{total} samples"));
    }
    drop(writer);
    let rows: Vec<MarginRow> = done.into_values().collect();
    write_margins(out, &rows, optional)?;
    if let (Some(store), Some(path)) = (adv, save_adv) {
        let indices: Vec<usize> = chunks
            .iter()
            .flat_map(|r| r.clone().map(|p| data.indices[p]))
            .collect();
        store.finish(path, &indices)?;
    }
    side.finish(out)?;
    Ok(Summary {
        rows,
        resumed,
        restarted,
    })
}

/// Fills `certified_radius` of the rows of the samples at window positions `range`: the
/// certified radius around the prediction, its search started at the attack's margin (0 for a
/// sample whose attacked class is not its prediction: it has no margin to bound).
#[allow(clippy::too_many_arguments)]
fn certify_chunk(
    graph: &BoundGraph,
    method: Method,
    norm: Norm,
    data: &Dataset,
    range: std::ops::Range<usize>,
    rows: &mut [MarginRow],
    model: &dyn Classifier,
    target_true: bool,
) -> Result<()> {
    let (x, _) = data.batch(range.start, range.end);
    let x = x.to_device(model.device());
    let pred: Vec<i64> = rows.iter().map(|r| r.pred).collect();
    let hints: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    let radii = certified_radii(graph, &x, &pred, Some(&hints), Search::new(norm, method))
        .with_context(|| format!("certifying samples {}..{}", range.start, range.end))?;
    for (row, r) in rows.iter_mut().zip(radii) {
        let wrong = target_true && row.pred != row.label;
        row.certified_radius = Some(if wrong { 0.0 } else { r.radius });
    }
    Ok(())
}

/// Attacks the samples at window positions `range`; returns their rows in order.
fn attack_chunk(
    model: &dyn Classifier,
    data: &Dataset,
    options: &MarginsOptions,
    plan: &Plan,
    range: std::ops::Range<usize>,
    adv: Option<&mut AdvStore>,
    progress: &dyn Progress,
) -> Result<Vec<MarginRow>> {
    let t0 = std::time::Instant::now();
    let (x, labels) = data.batch(range.start, range.end);
    let x0 = x.to_device(model.device());
    let scores = score_batch(model, &x0, options.norm)?;
    let score_secs = t0.elapsed().as_secs_f64() / range.len() as f64;
    let attacked: Vec<i64> = if options.target_true {
        labels.to_vec()
    } else {
        scores.iter().map(|s| s.pred).collect()
    };
    let already: Vec<bool> = scores
        .iter()
        .zip(&attacked)
        .map(|(s, &l)| s.pred != l)
        .collect();
    let indices = &data.indices[range.clone()];
    let seeds = indices
        .iter()
        .map(|&i| sample_seed(options.seed, i))
        .collect();
    let label = Tensor::from_slice(&attacked).to_device(model.device());
    let mut chunk = Chunk::new(x0, label, seeds, &already);
    for pass in &plan.passes {
        chunk.run_with(
            model,
            options.norm,
            pass.as_ref(),
            options.batch_size,
            progress,
        )?;
    }
    // Always: with no bisection steps it still pushes weakly adversarial points past the gap.
    chunk.refine_with(
        model,
        options.norm,
        plan.refine,
        options.batch_size,
        progress,
    )?;
    let verified = chunk.verify(model, options.norm, options.batch_size)?;
    if let Some(store) = adv {
        store.append(
            indices,
            &chunk.best_adv,
            &verified.iter().map(|v| v.success).collect::<Vec<_>>(),
        )?;
    }
    Ok((0..range.len())
        .map(|k| {
            let mut row = MarginRow::from_scores(indices[k], labels[k], &scores[k]);
            row.input_margin = verified[k].distance;
            row.success = u8::from(verified[k].success);
            row.attack = match chunk.winner[k] {
                "none" if already[k] => "none".to_string(),
                "none" => options.attack.as_str().to_string(),
                w => w.to_string(),
            };
            row.forwards = chunk.forwards[k] + 1;
            row.backwards = chunk.backwards[k];
            row.seconds = chunk.seconds[k] + score_secs;
            row
        })
        .collect())
}
