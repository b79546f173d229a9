//! NPY / NPZ image arrays (uint8 0-255 or float 0-1, NHWC or NCHW) with a labels array.
//!
//! Images: `[N, H, W, C]` or `[N, C, H, W]` with C = 1 or 3 (the layout is told by where the
//! channel axis is), or `[N, H, W]` for grayscale. Labels: a 1-D integer array from `--labels`,
//! from the NPZ keys `y` / `labels` / `y_test` / `label`, or from a file beside the images
//! (`<stem>_labels.npy`, or `images` -> `labels` / leading `x` -> `y` in the file name).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tch::{Kind, Tensor};

use super::{bounded, window, Dataset};
use crate::util::OptionError;

/// Longest NPY header read (numpy writes at most 10 000 bytes; a version-2 header could claim
/// 4 GiB and make the reader allocate it).
const MAX_HEADER_LEN: usize = 1 << 16;
/// Deepest bracket nesting accepted in the header (npyz's literal parser is exponential in it;
/// real headers, structured dtypes included, stay below 5).
const MAX_HEADER_NESTING: usize = 8;

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
    let bytes = std::fs::read(path).with_context(|| format!("reading {source}"))?;
    let (images, found_labels) = if bytes.starts_with(b"PK\x03\x04") {
        let arrays = read_npz(bytes, &source)?;
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
        let len = bytes.len() as u64;
        (npy_tensor(bytes.as_slice(), len, &source)?, None)
    };
    let (label_source, labels) = match (labels, found_labels) {
        (Some(l), _) => (l.display().to_string(), read_npy(l)?),
        (None, Some(found)) => found,
        (None, None) => {
            let l = beside(path).ok_or_else(|| {
                anyhow!(OptionError::new(
                    "labels",
                    format!("{source}: no labels found; name the labels file (.npy)")
                ))
            })?;
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
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let len = bytes.len() as u64;
    npy_tensor(bytes.as_slice(), len, &path.display().to_string())
}

/// Every `<name>.npy` member of an NPZ archive (stored or deflated). Each entry is read only up
/// to the uncompressed size its zip header declares, and that size must be one deflate can
/// produce from the compressed bytes, so a zip bomb is an error before anything is inflated.
fn read_npz(bytes: Vec<u8>, source: &str) -> Result<Vec<(String, Tensor)>> {
    let bad = |e: &dyn std::fmt::Display| anyhow!("{source}: not a valid NPZ file: {e}");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(&e))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| bad(&e))?;
        let name = entry.name().to_owned();
        if let Some(key) = name.strip_suffix(".npy") {
            let what = format!("{source}[{key}]");
            let (size, packed) = (entry.size(), entry.compressed_size());
            if size > bounded::inflate_cap(packed) {
                bail!("{what}: declares {size} bytes uncompressed from {packed} compressed, more than deflate can produce (corrupt or hostile archive)");
            }
            let t = npy_tensor(std::io::BufReader::new(entry), size, &what)?;
            out.push((key.to_owned(), t));
        }
    }
    Ok(out)
}

/// The NPY preamble and header dictionary, read with bounded length and nesting.
struct NpyHead {
    /// Magic, version, length field and header text: what `npyz` parses.
    bytes: Vec<u8>,
    /// Every integer tuple in the header (the shape among them), for checked products before
    /// `npyz` multiplies them unchecked.
    tuples: Vec<Vec<u64>>,
}

fn read_head<R: Read>(reader: &mut R, source: &str) -> Result<NpyHead> {
    let bad = |e: &dyn std::fmt::Display| anyhow!("{source}: not a valid NPY file: {e}");
    let mut pre = [0u8; 8];
    reader.read_exact(&mut pre).map_err(|e| bad(&e))?;
    if &pre[..6] != b"\x93NUMPY" {
        bail!("{source}: not a valid NPY file: no \\x93NUMPY magic");
    }
    let len_bytes = match pre[6] {
        1 => 2,
        2 | 3 => 4,
        v => bail!("{source}: unsupported NPY format version {v}"),
    };
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len[..len_bytes])
        .map_err(|e| bad(&e))?;
    let header_len = u32::from_le_bytes(len) as usize;
    if header_len > MAX_HEADER_LEN {
        bail!("{source}: NPY header of {header_len} bytes (at most {MAX_HEADER_LEN} accepted)");
    }
    let mut bytes = Vec::with_capacity(8 + len_bytes + header_len);
    bytes.extend_from_slice(&pre);
    bytes.extend_from_slice(&len[..len_bytes]);
    let start = bytes.len();
    bytes.resize(start + header_len, 0);
    reader
        .read_exact(&mut bytes[start..])
        .map_err(|e| bad(&e))?;
    let text = String::from_utf8_lossy(&bytes[start..]).into_owned();
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut tuples = Vec::new();
    let mut current: Option<String> = None;
    for c in text.chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
                current = (c == '(').then(String::new);
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                if let Some(t) = current.take() {
                    let ints: Vec<u64> = t
                        .split(',')
                        .filter_map(|v| v.trim().trim_end_matches(['L', 'l']).parse().ok())
                        .collect();
                    tuples.push(ints);
                }
            }
            c => {
                if let Some(t) = current.as_mut() {
                    t.push(c);
                }
            }
        }
    }
    if deepest > MAX_HEADER_NESTING {
        bail!("{source}: NPY header nests {deepest} levels deep (at most {MAX_HEADER_NESTING} accepted)");
    }
    Ok(NpyHead { bytes, tuples })
}

/// Reads an NPY header from `reader` and checks it against `len`, the size of the whole NPY
/// (file, zip entry or request body): the header is at most 64 KiB and 8 brackets deep, every
/// shape product is checked, and the shape must account for exactly the bytes that follow.
/// Returns the header and the number of data bytes, which the caller reads (and no more) with
/// [`bounded::read_exact_declared`]. Shared by the NPY and NPZ readers so that neither trusts
/// `npyz`'s unchecked header arithmetic (the server's NPY bodies have a stricter check of their
/// own, `serve::input`, bounded for a request rather than a file).
fn read_header<R: Read>(reader: &mut R, len: u64, source: &str) -> Result<(npyz::NpyHeader, u64)> {
    let head = read_head(reader, source)?;
    for t in &head.tuples {
        bounded::numel(t, source)?;
    }
    let npy = npyz::NpyFile::new(head.bytes.as_slice())
        .map_err(|e| anyhow!("{source}: not a valid NPY file: {e}"))?;
    let dims = npy.shape().to_vec();
    let item = npy
        .dtype()
        .num_bytes()
        .ok_or_else(|| anyhow!("{source}: NPY dtype too large"))?;
    let expected = bounded::byte_len(&dims, item, source)?;
    let available = len.saturating_sub(head.bytes.len() as u64);
    if expected != available {
        bail!(
            "{source}: not a valid NPY file: header declares shape {dims:?} of {item}-byte elements = {expected} bytes of data, but {available} bytes follow ({})",
            if expected > available {
                "truncated or hostile header"
            } else {
                "trailing bytes"
            }
        );
    }
    Ok((npy.header().clone(), expected))
}

/// One NPY array as a tensor of the same element type and shape. `len` is the number of bytes
/// the file (or zip entry) declares; see [`read_header`].
fn npy_tensor<R: Read>(mut reader: R, len: u64, source: &str) -> Result<Tensor> {
    let bad = |e: std::io::Error| anyhow!("{source}: not a valid NPY file: {e}");
    let (header, expected) = read_header(&mut reader, len, source)?;
    let data = bounded::read_exact_declared(&mut reader, expected, source)?;
    let dims = header.shape().to_vec();
    let npy = npyz::NpyFile::with_header(header, data.as_slice());
    let shape: Vec<i64> = dims.iter().map(|&s| s as i64).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let descr = npy.dtype().descr();
    let flat = match descr
        .trim_matches(['\'', '"'])
        .trim_start_matches(['<', '>', '|', '='])
    {
        "u1" => Tensor::from_slice(&npy.into_vec::<u8>().map_err(bad)?),
        "i1" => Tensor::from_slice(&npy.into_vec::<i8>().map_err(bad)?),
        "i2" => Tensor::from_slice(&npy.into_vec::<i16>().map_err(bad)?),
        "i4" => Tensor::from_slice(&npy.into_vec::<i32>().map_err(bad)?),
        "i8" => Tensor::from_slice(&npy.into_vec::<i64>().map_err(bad)?),
        "f4" => Tensor::from_slice(&npy.into_vec::<f32>().map_err(bad)?),
        "f8" => Tensor::from_slice(&npy.into_vec::<f64>().map_err(bad)?),
        _ => bail!("{source}: unsupported NPY dtype {descr}"),
    };
    Ok(if fortran {
        // Column-major: the data is the transpose of the C-order array of reversed shape.
        let rev: Vec<i64> = shape.iter().rev().copied().collect();
        let dims: Vec<i64> = (0..shape.len() as i64).rev().collect();
        flat.f_view(rev.as_slice())?
            .f_permute(dims.as_slice())?
            .contiguous()
    } else {
        flat.f_view(shape.as_slice())?
    })
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
