//! The sidecar `<file>.meta.json` of a resumable job's file, a margins file or a bounds file
//! (`brittle certify`): the settings that made its numbers, the model, the attack plan and a
//! fingerprint of the images. Both jobs share it so that one resume rule ([`super::resume`])
//! serves both. [`read_sidecar`] is the one reader of a margins sidecar (`analyze`, `fit`,
//! `merge` and resume use it); `scripts/results.py` reads the same fields.

use std::fmt::Debug;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::Kind;

use super::MarginsOptions;
use crate::data::Dataset;
use crate::model::ModelInfo;
use crate::norm::Norm;
use crate::provenance::{sidecar_path, write_sidecar, Provenance};
use crate::score::batched::for_each_batch;
use crate::util::NoProgress;

/// The options of a job whose file carries a [`Sidecar`]: what sets the sidecar's few
/// differences between a margins file and a bounds file.
pub trait JobOptions: Clone + PartialEq + Debug + Serialize + DeserializeOwned {
    /// What the job's file holds, for messages (`margins`, `bounds`).
    const FILE: &'static str;
    /// Whether shard files of the job are merged: their sidecars list the files merged.
    const MERGED: bool;
    /// The seed the provenance records.
    fn seed(&self) -> Option<u64>;
}

/// Everything that changes the numbers in a job's file; a resumed run or a merged shard must
/// have the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings<O = MarginsOptions> {
    pub model_fingerprint: String,
    pub data: String,
    /// Dataset indices `start..end` of the window attacked (before sharding).
    pub window: (usize, usize),
    /// The options of the job (flattened: the sidecar lists them beside the fields above).
    #[serde(flatten)]
    pub options: O,
}

/// The sidecar of a margins file (`O` = [`MarginsOptions`]) or of a bounds file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar<O = MarginsOptions> {
    pub provenance: Provenance,
    pub settings: Settings<O>,
    pub model: ModelInfo,
    /// [`crate::attack::plan::Plan::describe`] of the attack that made a margins file (`None`
    /// in a bounds file, which no attack makes, and in a margins file made before brittle
    /// recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// True once every sample of the shard is in the file, sorted.
    pub complete: bool,
    /// The shard files a merged file joins (empty in a job's own file; `None` where the job's
    /// files are never merged, [`JobOptions::MERGED`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_from: Option<Vec<String>>,
    /// [`data_sha256`] of the window the rows came from (empty: made before brittle recorded
    /// it). A resume or merge on other images at the same path is refused.
    #[serde(default)]
    pub data_sha256: String,
}

/// Reads the sidecar of the margins file `csv`.
pub fn read_sidecar(csv: &Path) -> Result<Sidecar> {
    Sidecar::read(csv)
}

/// The sidecar of a margins file when it has one (a hand-made margins file may have none).
pub fn find_sidecar(csv: &Path) -> Result<Option<Sidecar>> {
    if sidecar_path(csv).exists() {
        read_sidecar(csv).map(Some)
    } else {
        Ok(None)
    }
}

impl<O: JobOptions> Sidecar<O> {
    /// The sidecar of a job with `options` on `model` and `data` that has not finished yet;
    /// `plan` describes its attack.
    pub fn start(
        model: &ModelInfo,
        data: &Dataset,
        options: O,
        plan: Option<String>,
    ) -> Result<Self> {
        Ok(Sidecar {
            provenance: Provenance::current(options.seed()),
            settings: Settings {
                model_fingerprint: model.fingerprint.clone(),
                data: data.source.clone(),
                window: (
                    data.indices.first().copied().unwrap_or(0),
                    data.indices.last().map_or(0, |i| i + 1),
                ),
                options,
            },
            model: model.clone(),
            plan,
            complete: false,
            merged_from: O::MERGED.then(Vec::new),
            data_sha256: data_sha256(data)?,
        })
    }

    /// Reads the sidecar of the job's file `csv`.
    pub fn read(csv: &Path) -> Result<Self> {
        let p = sidecar_path(csv);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading the sidecar {} of {}", p.display(), csv.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a {} sidecar", p.display(), O::FILE))
    }

    /// The job's last write: its file `out` is whole and sorted.
    pub fn finish(self, out: &Path) -> Result<()> {
        write_sidecar(
            out,
            &Sidecar {
                complete: true,
                ..self
            },
        )
    }

    /// [`Sidecar::data_sha256`] for messages.
    pub(super) fn fingerprint(&self) -> &str {
        if self.data_sha256.is_empty() {
            "not recorded"
        } else {
            &self.data_sha256
        }
    }
}

impl Sidecar<MarginsOptions> {
    /// The norm of the file's margins; `asked` (a caller's explicit choice) must agree, since
    /// margins measured in one norm analysed as another give wrong numbers, not an error.
    pub fn norm(&self, csv: &Path, asked: Option<Norm>) -> Result<Norm> {
        let n = self.settings.options.norm;
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
    for_each_batch(n, 256, &NoProgress, |r| {
        let (x, _) = data.batch(r.start, r.end);
        // The f32 bytes as libtorch holds them (little-endian on every platform it supports).
        let bytes = Vec::<u8>::try_from(
            x.to_kind(Kind::Float)
                .contiguous()
                .view_dtype(Kind::Uint8)
                .flatten(0, -1),
        )
        .with_context(|| format!("{}: reading the images to fingerprint them", data.source))?;
        h.update(&bytes);
        Ok(())
    })?;
    for (&l, &i) in data.labels.iter().zip(&data.indices) {
        h.update(l.to_le_bytes());
        h.update((i as u64).to_le_bytes());
    }
    Ok(hex::encode(h.finalize()))
}
