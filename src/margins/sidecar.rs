//! The sidecar `<margins>.meta.json` of a margins file: the settings that made its numbers, the
//! model, the attack plan and a fingerprint of the images. [`read_sidecar`] is the one reader
//! of it (`analyze`, `fit`, `merge` and resume use it); `scripts/results.py` reads the same
//! fields.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Kind;

use super::MarginsOptions;
use crate::data::Dataset;
use crate::norm::Norm;
use crate::provenance::{sidecar_path, Provenance};
use crate::score::batched::for_each_batch;
use crate::util::NoProgress;

/// Everything that changes the numbers in a margins file; a resumed run or a merged shard must
/// have the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub model_fingerprint: String,
    pub data: String,
    /// Dataset indices `start..end` of the window attacked (before sharding).
    pub window: (usize, usize),
    /// The options of the job (flattened: the sidecar lists them beside the fields above).
    #[serde(flatten)]
    pub options: MarginsOptions,
}

/// The sidecar of a margins file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar {
    pub provenance: Provenance,
    pub settings: Settings,
    pub model: crate::model::ModelInfo,
    /// [`crate::attack::plan::Plan::describe`] of the attack that made the file (empty: made before brittle recorded
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
    pub(super) fn fingerprint(&self) -> &str {
        if self.data_sha256.is_empty() {
            "not recorded"
        } else {
            &self.data_sha256
        }
    }

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
