//! NPY / NPZ image arrays (uint8 0-255 or float 0-1, NHWC or NCHW) with a labels array.
//!
//! Images: `[N, H, W, C]` or `[N, C, H, W]` with C = 1 or 3 (the layout is told by where the
//! channel axis is), or `[N, H, W]` for grayscale. Labels: a 1-D integer array from `--labels`,
//! from the NPZ keys `y` / `labels` / `y_test` / `label`, or from a file beside the images
//! (`<stem>_labels.npy`, or `images` -> `labels` / leading `x` -> `y` in the file name).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tch::{Kind, Tensor};

use super::{window, Dataset};

const IMAGE_KEYS: &[&str] = &["x", "images", "x_test", "image", "data", "X"];
const LABEL_KEYS: &[&str] = &["y", "labels", "y_test", "label", "targets", "Y"];

/// Reads images and labels from NPY/NPZ.
pub fn read(
    path: &Path,
    labels: Option<&Path>,
    offset: usize,
    limit: Option<usize>,
) -> Result<Dataset> {
    let source = path.display().to_string();
    let is_npz = std::fs::read(path)
        .with_context(|| format!("reading {source}"))?
        .starts_with(b"PK\x03\x04");
    let (images, found_labels) = if is_npz {
        let arrays =
            Tensor::read_npz(path).map_err(|e| anyhow!("{source}: not a valid NPZ file: {e}"))?;
        let pick = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| arrays.iter().find(|(n, _)| n == k))
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
        };
        let names: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
        let (_, images) = pick(IMAGE_KEYS).ok_or_else(|| {
            anyhow!("{source}: no image array (keys {IMAGE_KEYS:?}) among {names:?}")
        })?;
        (
            images,
            pick(LABEL_KEYS).map(|(n, t)| (format!("{source}[{n}]"), t)),
        )
    } else {
        (read_npy(path)?, None)
    };
    let (label_source, labels) = match (labels, found_labels) {
        (Some(l), _) => (l.display().to_string(), read_npy(l)?),
        (None, Some(found)) => found,
        (None, None) => {
            let l = beside(path)
                .ok_or_else(|| anyhow!("{source}: no labels found; pass --labels <file.npy>"))?;
            (l.display().to_string(), read_npy(&l)?)
        }
    };
    let images = to_nchw(images, &source)?;
    let labels = label_vec(&labels, &label_source)?;
    let n = images.size()[0] as usize;
    if labels.len() != n {
        bail!(
            "{source} has {n} images but {label_source} has {} labels",
            labels.len()
        );
    }
    let num_classes = labels.iter().copied().max().unwrap_or(0) + 1;
    let range = window(n, offset, limit, &source)?;
    let images = images.narrow(0, range.start as i64, range.len() as i64);
    Dataset::new(
        images,
        labels[range.clone()].to_vec(),
        num_classes,
        range.collect(),
        source,
    )
}

fn read_npy(path: &Path) -> Result<Tensor> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    Tensor::read_npy(path).map_err(|e| anyhow!("{}: not a valid NPY file: {e}", path.display()))
}

/// A labels file next to the images, by naming convention.
fn beside(path: &Path) -> Option<PathBuf> {
    let stem = path.file_stem()?.to_string_lossy().into_owned();
    let mut names = vec![format!("{stem}_labels.npy")];
    if stem.contains("images") {
        names.push(format!("{}.npy", stem.replace("images", "labels")));
    }
    if let Some(rest) = stem.strip_prefix('x') {
        names.push(format!("y{rest}.npy"));
    }
    names
        .into_iter()
        .map(|n| path.with_file_name(n))
        .find(|p| p.exists())
}

/// `[N, C, H, W]` float in `[0, 1]` from NHWC/NCHW/NHW, uint8 or float.
fn to_nchw(images: Tensor, source: &str) -> Result<Tensor> {
    let s = images.size();
    let is_channels = |c: i64| c == 1 || c == 3;
    let images = match s.len() {
        3 => images.unsqueeze(1),
        4 if is_channels(s[1]) => images,
        4 if is_channels(s[3]) => images.permute([0, 3, 1, 2]).contiguous(),
        4 => bail!(
            "{source}: images of shape {s:?} have no channel axis of size 1 or 3 (second or last)"
        ),
        _ => bail!("{source}: images must be [N, H, W, C], [N, C, H, W] or [N, H, W]; got {s:?}"),
    };
    match images.kind() {
        Kind::Uint8 => Ok(images.to_kind(Kind::Float) / 255.0),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => Ok(images.to_kind(Kind::Float)),
        k => bail!("{source}: images of type {k:?}; expected uint8 (0-255) or float (0-1)"),
    }
}

/// A 1-D integer labels array.
fn label_vec(labels: &Tensor, source: &str) -> Result<Vec<i64>> {
    let s = labels.size();
    if s.len() != 1 {
        bail!("{source}: labels must be a 1-D array, got shape {s:?}");
    }
    match labels.kind() {
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64 => {}
        k => bail!("{source}: labels of type {k:?}; expected integers"),
    }
    Ok(Vec::<i64>::try_from(labels.to_kind(Kind::Int64))?)
}
