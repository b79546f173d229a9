//! A certify job (`brittle certify`): the certified radius of every sample of a dataset window
//! or of one shard of it, in `bounds.csv` (`index,certified_radius,method,passes,seconds`) with
//! its sidecar ([`Sidecar`] of [`CertifyOptions`]). It runs on the margins machinery: the same
//! chunks and shards ([`shard_chunks`], whole chunks per shard, so shards give the same rows as
//! one run), the same sidecar, image fingerprint and resume rule ([`resume`]: a file is
//! continued only when its sidecar holds the same settings and images; a killed run's partial
//! last line is dropped).
//! Radii do not depend on the batch a sample is bounded in, so a resumed or sharded file
//! equals an uninterrupted one bar `seconds`.

use std::io::Read;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::radius::{certified_radii, Search};
use super::{bound_graph, Method};
use crate::data::Dataset;
use crate::margins::{
    read_complete_lines, resume, shard_chunks, JobOptions, JobRow, Shard, Sidecar,
};
use crate::model::{logits_no_grad, Classifier};
use crate::norm::Norm;
use crate::provenance::write_sidecar;
use crate::util::{OptionError, Progress};

/// What a certify job computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertifyOptions {
    pub norm: Norm,
    pub method: Method,
    /// The bisection stops when the bracket is this narrow relative to its upper end.
    pub rel_tol: f64,
    /// Samples bounded together.
    pub batch_size: usize,
    /// Samples per chunk, the unit of resumption and sharding.
    pub chunk: usize,
    pub shard: Option<Shard>,
}

impl CertifyOptions {
    /// Refuses options no job can run with.
    pub fn check(&self) -> Result<()> {
        let fail = |field, msg: &str| Err(OptionError::new(field, msg.to_string()).into());
        if self.norm == Norm::L1 {
            return fail("norm", "certification bounds the L∞ and L2 balls only");
        }
        if !(self.rel_tol > 0.0 && self.rel_tol < 1.0) {
            return fail("rel_tol", "the relative tolerance must be in (0, 1)");
        }
        if self.batch_size == 0 || self.chunk == 0 {
            return fail(
                "batch_size",
                "the batch size and the chunk must be positive",
            );
        }
        Ok(())
    }
}

/// One sample of a bounds file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoundRow {
    pub index: usize,
    /// The largest ε at which every margin is certified (0: none).
    pub certified_radius: f64,
    pub method: Method,
    /// Bound computations of the bisection.
    pub passes: usize,
    pub seconds: f64,
}

/// Runs (or resumes) a certify job of `model` on `data` into `out`.
pub fn run(
    model: &dyn Classifier,
    data: &Dataset,
    options: &CertifyOptions,
    out: &Path,
    progress: &dyn Progress,
) -> Result<Vec<BoundRow>> {
    options.check()?;
    let graph = bound_graph(model)?;
    let side = Sidecar::start(model.info(), data, options.clone(), None)?;
    let mut done = resume::<_, BoundRow>(out, &side, false)?.done;
    write_sidecar(out, &side)?;
    write_rows(out, &done.values().cloned().collect::<Vec<_>>())?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(std::io::BufWriter::new(file));
    let chunks = shard_chunks(data.len(), options.chunk, options.shard);
    progress.set_length(chunks.iter().map(|c| c.len() as u64).sum());
    let search = Search {
        rel_tol: options.rel_tol,
        ..Search::new(options.norm, options.method)
    };
    for range in chunks {
        if range.clone().all(|p| done.contains_key(&data.indices[p])) {
            progress.inc(range.len() as u64);
            continue;
        }
        for start in range.clone().step_by(options.batch_size) {
            let end = (start + options.batch_size).min(range.end);
            let (x, _) = data.batch(start, end);
            let x = x.to_device(model.device());
            let pred: Vec<i64> = Vec::try_from(logits_no_grad(model, &x)?.argmax(1, false))?;
            let radii = certified_radii(&graph, &x, &pred, None, search)
                .with_context(|| format!("samples {start}..{end} of {}", data.source))?;
            for (p, r) in (start..end).zip(radii) {
                let row = BoundRow {
                    index: data.indices[p],
                    certified_radius: r.radius,
                    method: options.method,
                    passes: r.passes,
                    seconds: r.seconds,
                };
                writer.serialize(&row)?;
                done.insert(row.index, row);
            }
            writer
                .flush()
                .with_context(|| format!("appending to {}", out.display()))?;
            progress.inc((end - start) as u64);
        }
    }
    drop(writer);
    let rows: Vec<BoundRow> = done.into_values().collect();
    write_rows(out, &rows)?;
    side.finish(out)?;
    Ok(rows)
}

impl JobOptions for CertifyOptions {
    const FILE: &'static str = "bounds";
    const MERGED: bool = false;
    fn seed(&self) -> Option<u64> {
        None
    }
}

impl JobRow for BoundRow {
    fn index(&self) -> usize {
        self.index
    }
    fn read_partial(path: &Path) -> Result<(Vec<Self>, bool)> {
        read_complete_lines(path, |text, name| parse(text, name))
    }
}

fn parse<R: Read>(input: R, name: &str) -> Result<Vec<BoundRow>> {
    let mut rd = csv::Reader::from_reader(input);
    let mut rows = Vec::new();
    for (i, rec) in rd.deserialize::<BoundRow>().enumerate() {
        let row = rec.with_context(|| format!("{name}: data row {}", i + 1))?;
        ensure!(
            row.certified_radius >= 0.0,
            "{name}: data row {}: certified_radius {} is negative",
            i + 1,
            row.certified_radius
        );
        rows.push(row);
    }
    Ok(rows)
}

/// Reads a bounds file.
pub fn read_bounds(path: &Path) -> Result<Vec<BoundRow>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    parse(f, &path.display().to_string())
}

/// Writes a complete bounds file (header and rows) atomically.
fn write_rows(path: &Path, rows: &[BoundRow]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(std::io::BufWriter::new(file));
    w.write_record(["index", "certified_radius", "method", "passes", "seconds"])?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
