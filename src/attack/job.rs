//! A margins job: the samples of a dataset window (or one shard of it), attacked chunk by
//! chunk, rows appended and flushed after every chunk, resumable after any interruption, and
//! mergeable with the other shards.
//!
//! Reproducibility: chunks are fixed groups of `chunk` consecutive samples of the window, and a
//! chunk is always attacked whole (see [`super::driver`]), with per-sample seeds derived from the
//! global seed and the dataset index. A resumed run redoes the chunk it was killed in, so its
//! file is byte-identical (bar `seconds`) to an uninterrupted run, and shards (whole chunks)
//! give the same rows as one run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::driver::Chunk;
use super::plan::Plan;
use super::table::{read_partial_margins, write_margins, MarginRow, MarginWriter};
use super::{sample_seed, AttackKind};
use crate::data::Dataset;
use crate::model::Classifier;
use crate::norm::Norm;
use crate::provenance::{sidecar_path, write_sidecar, Provenance};
use crate::score::score_batch;
use crate::util::{work_bar, Progress};

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard {s:?}: expected i/n, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("--shard {s:?}: bad index"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard {s:?}: bad count"))?;
        Shard::new(index, count)
    }
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            bail!("shard {index}/{count}: the index must be in 0..{count}");
        }
        Ok(Shard { index, count })
    }
}

/// Everything that changes the numbers in a margins file; a resumed run or a merged shard must
/// have the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub model_fingerprint: String,
    pub data: String,
    /// Dataset indices `start..end` of the window attacked (before sharding).
    pub window: (usize, usize),
    pub norm: Norm,
    pub attack: AttackKind,
    pub steps: Option<usize>,
    pub topk: i64,
    pub seed: u64,
    pub target_true: bool,
    pub batch_size: usize,
    /// Samples per chunk (the unit of refill, resumption and sharding).
    pub chunk: usize,
    pub shard: Option<Shard>,
}

/// The sidecar of a margins file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar {
    pub provenance: Provenance,
    pub settings: Settings,
    pub model: crate::model::ModelInfo,
    /// [`Plan::describe`] of the attack that made the file (empty: made before brittle recorded
    /// it).
    #[serde(default)]
    pub plan: String,
    /// True once every sample of the shard is in the file, sorted.
    pub complete: bool,
    #[serde(default)]
    pub merged_from: Vec<String>,
    /// [`data_sha256`] of the window the rows came from (empty: made before brittle recorded
    /// it). A resume or merge on other images at the same path is refused.
    #[serde(default)]
    pub data_sha256: String,
}

pub fn read_sidecar(csv: &Path) -> Result<Sidecar> {
    let p = sidecar_path(csv);
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("reading the sidecar {} of {}", p.display(), csv.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a margins sidecar", p.display()))
}

/// The sidecar of a margins file when it has one (a hand-made margins file may have none).
pub fn find_sidecar(csv: &Path) -> Result<Option<Sidecar>> {
    if sidecar_path(csv).exists() {
        read_sidecar(csv).map(Some)
    } else {
        Ok(None)
    }
}

impl Sidecar {
    /// [`Sidecar::data_sha256`] for messages.
    fn fingerprint(&self) -> &str {
        if self.data_sha256.is_empty() {
            "not recorded"
        } else {
            &self.data_sha256
        }
    }

    /// The norm of the file's margins; `asked` (a caller's explicit choice) must agree, since
    /// margins measured in one norm analysed as another give wrong numbers, not an error.
    pub fn norm(&self, csv: &Path, asked: Option<Norm>) -> Result<Norm> {
        let n = self.settings.norm;
        match asked {
            Some(a) if a != n => bail!(
                "{}: the margins were measured in the {} norm ({}), not in {} ({})",
                sidecar_path(csv).display(),
                n.symbol(),
                n,
                a.symbol(),
                a
            ),
            _ => Ok(n),
        }
    }
}

/// sha256 of the content of the attacked window: decoded pixels (f32 bytes), labels
/// and dataset indices. The rows of a margins file are only valid for these images, so a
/// resume or a merge compares it rather than the path; hashing the decoded window (not the
/// file bytes) also accepts the same images recompressed or moved, and needs no file access.
pub fn data_sha256(data: &Dataset) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let n = data.len();
    h.update((n as u64).to_le_bytes());
    for i in data.input_shape() {
        h.update(i.to_le_bytes());
    }
    // Batches bound the copy out of the tensor; the hash streams.
    let step = 256;
    for start in (0..n).step_by(step) {
        let (x, _) = data.batch(start, (start + step).min(n));
        // The f32 bytes as libtorch holds them (little-endian on every platform it supports).
        let bytes = Vec::<u8>::try_from(
            x.to_kind(Kind::Float)
                .contiguous()
                .view_dtype(Kind::Uint8)
                .flatten(0, -1),
        )
        .with_context(|| format!("{}: reading the images to fingerprint them", data.source))?;
        h.update(&bytes);
    }
    for (&l, &i) in data.labels.iter().zip(&data.indices) {
        h.update(l.to_le_bytes());
        h.update((i as u64).to_le_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Positions (in the window) of the chunks a shard owns: whole chunks, contiguous.
pub fn shard_chunks(n: usize, chunk: usize, shard: Option<Shard>) -> Vec<std::ops::Range<usize>> {
    let chunk = chunk.max(1);
    let all: Vec<_> = (0..n.div_ceil(chunk))
        .map(|c| c * chunk..((c + 1) * chunk).min(n))
        .collect();
    match shard {
        None => all,
        Some(s) => {
            let c = all.len();
            all[s.index * c / s.count..(s.index + 1) * c / s.count].to_vec()
        }
    }
}

/// What a finished job reports.
pub struct Summary {
    pub rows: Vec<MarginRow>,
    pub resumed: usize,
}

/// Runs (or resumes) a margins job writing `out` (and `save_adv`, `.npy`). An `out` made by
/// another version of the attack is refused, or started again with `restart_stale`. Shows a
/// progress bar on stderr.
pub fn run(
    model: &dyn Classifier,
    data: &Dataset,
    settings: &Settings,
    out: &Path,
    save_adv: Option<&Path>,
    restart_stale: bool,
) -> Result<Summary> {
    let pb = work_bar(settings.attack.as_str());
    let summary = run_with_progress(model, data, settings, out, save_adv, restart_stale, &pb);
    pb.finish_and_clear();
    summary
}

/// [`run`] reporting to `progress` per attack step: a sample counts one unit per step of each
/// pass's budget and per bisection step (see [`Chunk::run_with`]).
pub fn run_with_progress(
    model: &dyn Classifier,
    data: &Dataset,
    settings: &Settings,
    out: &Path,
    save_adv: Option<&Path>,
    restart_stale: bool,
    progress: &dyn Progress,
) -> Result<Summary> {
    let plan = Plan::new(
        settings.attack,
        settings.norm,
        settings.steps,
        settings.topk,
        model.info().num_classes,
    )?;
    let plan_text = plan.describe();
    anyhow::ensure!(settings.batch_size > 0, "--batch-size must be positive");
    let chunks = shard_chunks(data.len(), settings.chunk, settings.shard);
    let data_sha = data_sha256(data)?;
    let mut done: BTreeMap<usize, MarginRow> = BTreeMap::new();
    let mut header = true;
    if out.exists() {
        let side = read_sidecar(out)
            .with_context(|| format!("{} exists: cannot resume it", out.display()))?;
        if side.settings != settings.clone() {
            bail!(
                "{} was made with other settings ({}); use another --out or delete it\nthere: {:?}\nnow:   {:?}",
                out.display(),
                sidecar_path(out).display(),
                side.settings,
                settings
            );
        }
        if !side.data_sha256.is_empty() && side.data_sha256 != data_sha {
            bail!(
                "{} was made from other images than {} holds now (content sha256 {} there, {} now): \
                 the data changed since, and resuming would mix rows of both; write elsewhere or delete it",
                out.display(),
                data.source,
                side.data_sha256,
                data_sha
            );
        }
        let stale = if side.plan != plan_text {
            Some(format!(
                "{} was made by another version of the attack ({}); use another --out or delete it\nthere: {}\nnow:   {}",
                out.display(),
                sidecar_path(out).display(),
                if side.plan.is_empty() { "(not recorded)" } else { &side.plan },
                plan_text
            ))
        } else if side.data_sha256.is_empty() {
            Some(format!(
                "{} was made by an older brittle that did not record a fingerprint of its images \
                 ({}), so resuming it could mix rows of other images; start it again or delete it",
                out.display(),
                sidecar_path(out).display()
            ))
        } else {
            None
        };
        match stale {
            None => {
                let (rows, has_header) = read_partial_margins(out)?;
                header = !has_header;
                for r in rows {
                    done.insert(r.index, r);
                }
            }
            Some(_) if restart_stale => {
                eprintln!(
                    "warning: {} was made by another version of the attack or of brittle: starting it again",
                    out.display()
                );
                std::fs::remove_file(out).with_context(|| format!("removing {}", out.display()))?;
            }
            Some(why) => bail!(why),
        }
    }
    let resumed = done.len();
    let side = Sidecar {
        provenance: Provenance::current(Some(settings.seed)),
        settings: settings.clone(),
        model: model.info().clone(),
        plan: plan_text,
        complete: false,
        merged_from: Vec::new(),
        data_sha256: data_sha,
    };
    write_sidecar(out, &side)?;
    // Rewrite what survived (drops a partial last line), then append.
    let with_fm = model.last_linear().is_some();
    if !header {
        write_margins(out, &done.values().cloned().collect::<Vec<_>>(), with_fm)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    let mut writer = MarginWriter::new(std::io::BufWriter::new(file), with_fm, header)?;
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
        let rows = attack_chunk(
            model,
            data,
            settings,
            &plan,
            range.clone(),
            adv.as_mut(),
            progress,
        )?;
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
    write_margins(out, &rows, with_fm)?;
    if let (Some(store), Some(path)) = (adv, save_adv) {
        let indices: Vec<usize> = chunks
            .iter()
            .flat_map(|r| r.clone().map(|p| data.indices[p]))
            .collect();
        store.finish(path, &indices)?;
    }
    write_sidecar(
        out,
        &Sidecar {
            complete: true,
            ..side
        },
    )?;
    Ok(Summary { rows, resumed })
}

/// Attacks the samples at window positions `range`; returns their rows in order.
fn attack_chunk(
    model: &dyn Classifier,
    data: &Dataset,
    settings: &Settings,
    plan: &Plan,
    range: std::ops::Range<usize>,
    adv: Option<&mut AdvStore>,
    progress: &dyn Progress,
) -> Result<Vec<MarginRow>> {
    let t0 = std::time::Instant::now();
    let (x, labels) = data.batch(range.start, range.end);
    let x0 = x.to_device(model.device());
    let scores = score_batch(model, &x0, settings.norm)?;
    let score_secs = t0.elapsed().as_secs_f64() / range.len() as f64;
    let attacked: Vec<i64> = if settings.target_true {
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
        .map(|&i| sample_seed(settings.seed, i))
        .collect();
    let label = Tensor::from_slice(&attacked).to_device(model.device());
    let mut chunk = Chunk::new(x0, label, seeds, &already);
    for pass in &plan.passes {
        chunk.run_with(
            model,
            settings.norm,
            pass.as_ref(),
            settings.batch_size,
            progress,
        )?;
    }
    // Always: with no bisection steps it still pushes weakly adversarial points past the gap.
    chunk.refine_with(
        model,
        settings.norm,
        plan.refine,
        settings.batch_size,
        progress,
    )?;
    let verified = chunk.verify(model, settings.norm, settings.batch_size)?;
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
                "none" => settings.attack.as_str().to_string(),
                w => w.to_string(),
            };
            row.forwards = chunk.forwards[k] + 1;
            row.backwards = chunk.backwards[k];
            row.seconds = chunk.seconds[k] + score_secs;
            row
        })
        .collect())
}

/// Adversarial examples kept across interruptions: `<adv>.part` holds `(index u64, pixels f32)`
/// records appended per chunk; [`AdvStore::finish`] writes the `.npy` in dataset order (NaN
/// images for samples without an adversarial example), through a temporary file so that the
/// `.npy` is either complete or absent.
struct AdvStore {
    part: PathBuf,
    file: std::fs::File,
    have: BTreeMap<usize, u64>,
    pixels: usize,
    shape: [i64; 3],
}

impl AdvStore {
    /// Opens (`fresh`: starts) the store of `path`.
    fn open(path: &Path, shape: [i64; 3], fresh: bool) -> Result<Self> {
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let pixels = shape.iter().product::<i64>() as usize;
        let record = 8 + 4 * pixels;
        let mut have = BTreeMap::new();
        if fresh && part.exists() {
            std::fs::remove_file(&part).with_context(|| format!("removing {}", part.display()))?;
        }
        if part.exists() {
            let mut bytes = Vec::new();
            std::fs::File::open(&part)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .with_context(|| format!("reading {}", part.display()))?;
            let whole = bytes.len() / record;
            for r in 0..whole {
                let mut idx = [0u8; 8];
                idx.copy_from_slice(&bytes[r * record..r * record + 8]);
                have.entry(u64::from_le_bytes(idx) as usize)
                    .or_insert((r * record) as u64);
            }
            // Drop a record cut by a kill.
            let f = std::fs::OpenOptions::new().write(true).open(&part)?;
            f.set_len((whole * record) as u64)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        Ok(AdvStore {
            part,
            file,
            have,
            pixels,
            shape,
        })
    }

    fn has(&self, index: usize) -> bool {
        self.have.contains_key(&index)
    }

    fn append(&mut self, indices: &[usize], adv: &Tensor, success: &[bool]) -> Result<()> {
        let flat = Vec::<f32>::try_from(
            adv.to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1),
        )?;
        let mut buf = Vec::new();
        let mut offset = self.file.metadata()?.len();
        for (k, &i) in indices.iter().enumerate() {
            if self.have.contains_key(&i) {
                continue;
            }
            buf.extend_from_slice(&(i as u64).to_le_bytes());
            for &v in &flat[k * self.pixels..(k + 1) * self.pixels] {
                buf.extend_from_slice(&(if success[k] { v } else { f32::NAN }).to_le_bytes());
            }
            self.have.insert(i, offset);
            offset += (8 + 4 * self.pixels) as u64;
        }
        self.file.write_all(&buf)?;
        self.file.flush()?;
        Ok(())
    }

    fn finish(self, path: &Path, indices: &[usize]) -> Result<()> {
        let bytes = std::fs::read(&self.part)
            .with_context(|| format!("reading {}", self.part.display()))?;
        let mut offsets = Vec::with_capacity(indices.len());
        for i in indices {
            let at = *self.have.get(i).with_context(|| {
                format!(
                    "{}: no adversarial example stored for sample {i}",
                    self.part.display()
                )
            })? as usize;
            offsets.push(at + 8);
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            let shape = [
                indices.len() as i64,
                self.shape[0],
                self.shape[1],
                self.shape[2],
            ];
            out.write_all(&npy_header(&shape))?;
            for at in offsets {
                out.write_all(&bytes[at..at + 4 * self.pixels])?;
            }
            out.flush()?;
            Ok(())
        };
        write().with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        std::fs::remove_file(&self.part)
            .with_context(|| format!("removing {}", self.part.display()))
    }
}

/// A `.npy` (version 1.0) header for little-endian float32 C-order data. Written by hand
/// because npyz writes the shape as `(2, 3, )`, which `tch::Tensor::read_npy` cannot parse.
fn npy_header(shape: &[i64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut dict = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    // magic (6) + version (2) + length (2) + dict + '\n', padded to a multiple of 64.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

/// Merges complete shard files of one job into `out`, checking that their settings agree and
/// that every sample of the window appears exactly once.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<usize> {
    anyhow::ensure!(!inputs.is_empty(), "merge: no input files");
    let mut settings: Option<(Settings, String, &Path)> = None;
    let mut first: Option<Sidecar> = None;
    let mut rows: BTreeMap<usize, (MarginRow, &Path)> = BTreeMap::new();
    for p in inputs {
        let side = read_sidecar(p)?;
        if !side.complete {
            bail!(
                "{} is not complete (its run was interrupted): resume it first",
                p.display()
            );
        }
        let mut s = side.settings.clone();
        s.shard = None;
        match &settings {
            None => settings = Some((s, side.plan.clone(), p)),
            Some((s0, plan0, p0)) if *s0 != s || *plan0 != side.plan => {
                bail!(
                    "{} and {} were made with different settings or attack versions:\n{:?}\n{plan0}\n{:?}\n{}",
                    p0.display(),
                    p.display(),
                    s0,
                    s,
                    side.plan
                )
            }
            _ => {}
        }
        if let Some(f) = first.as_ref().filter(|f| f.data_sha256 != side.data_sha256) {
            bail!(
                "{} and {} were made from different images at {} (content sha256 {} and {})",
                inputs[0].display(),
                p.display(),
                side.settings.data,
                f.fingerprint(),
                side.fingerprint()
            );
        }
        for r in super::table::read_margins(p)? {
            if let Some((_, other)) = rows.get(&r.index) {
                bail!(
                    "sample {} appears in both {} and {}",
                    r.index,
                    other.display(),
                    p.display()
                );
            }
            rows.insert(r.index, (r, p));
        }
        first.get_or_insert(side);
    }
    let (settings, plan, _) = settings.context("merge: no settings")?;
    let (start, end) = settings.window;
    let missing: Vec<usize> = (start..end).filter(|i| !rows.contains_key(i)).collect();
    if !missing.is_empty() {
        bail!(
            "merge: {} of the {} samples of {} are missing (first: {:?}); a shard is absent",
            missing.len(),
            end - start,
            settings.data,
            &missing[..missing.len().min(10)]
        );
    }
    if let Some(extra) = rows.keys().find(|&&i| i < start || i >= end) {
        bail!("merge: sample {extra} lies outside the window {start}..{end}");
    }
    let rows: Vec<MarginRow> = rows.into_values().map(|(r, _)| r).collect();
    write_margins(out, &rows, rows.iter().any(|r| r.feature_margin.is_some()))?;
    let side = first.context("merge: no sidecar")?;
    write_sidecar(
        out,
        &Sidecar {
            provenance: Provenance::current(Some(settings.seed)),
            settings,
            model: side.model,
            plan,
            complete: true,
            merged_from: inputs.iter().map(|p| p.display().to_string()).collect(),
            data_sha256: side.data_sha256,
        },
    )?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let h = npy_header(&[2, 3, 4, 5]);
        assert_eq!(h.len() % 64, 0);
        assert!(String::from_utf8_lossy(&h).contains("'shape': (2, 3, 4, 5,)"));
    }

    #[test]
    fn shards_take_whole_contiguous_chunks_and_cover_everything_once() {
        let n = 23;
        let mut seen = vec![0; n];
        for i in 0..3 {
            for r in shard_chunks(n, 4, Some(Shard::new(i, 3).unwrap())) {
                assert!(r.start.is_multiple_of(4));
                r.for_each(|p| seen[p] += 1);
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert!("3/3".parse::<Shard>().is_err());
        assert_eq!(
            "1/3".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 3 }
        );
    }
}
