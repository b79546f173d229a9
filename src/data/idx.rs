//! MNIST / Fashion-MNIST IDX files (raw or gzip): an `idx3-ubyte` images file (magic 2051,
//! `[N, H, W]` unsigned bytes) and an `idx1-ubyte` labels file (magic 2049, `[N]`), both
//! big-endian. The labels file is given with `--labels` or found beside the images.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::{bounded, window, Dataset};
use crate::util::OptionError;

/// Magic number of an unsigned-byte, 3-dimensional IDX file (images).
pub const IMAGES_MAGIC: u32 = 0x0803;
/// Magic number of an unsigned-byte, 1-dimensional IDX file (labels).
pub const LABELS_MAGIC: u32 = 0x0801;
/// MNIST and Fashion-MNIST both have ten classes.
const NUM_CLASSES: i64 = 10;

/// Reads images `offset..offset+limit` and their labels as `[N, 1, H, W]` in `[0, 1]`.
pub fn read(
    path: &Path,
    labels: Option<&Path>,
    offset: usize,
    limit: Option<usize>,
) -> Result<Dataset> {
    let labels_path = match labels {
        Some(p) => p.to_path_buf(),
        None => find_labels(path)?,
    };
    let images = read_idx(path, IMAGES_MAGIC)?;
    let labels = read_idx(&labels_path, LABELS_MAGIC)?;
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if labels.dims[0] != n {
        bail!(
            "{} has {n} images but {} has {} labels",
            path.display(),
            labels_path.display(),
            labels.dims[0]
        );
    }
    if let Some((i, l)) = labels
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as i64 >= NUM_CLASSES)
    {
        bail!(
            "{}: label {l} of sample {i} is outside 0..{NUM_CLASSES}",
            labels_path.display()
        );
    }
    let source = path.display().to_string();
    let range = window(n, offset, limit, &source)?;
    let pixels = h * w;
    let count = range.len();
    let images = Tensor::from_slice(&images.data[range.start * pixels..range.end * pixels])
        .view([count as i64, 1, h as i64, w as i64])
        .to_kind(Kind::Float)
        / 255.0;
    let labels = labels.data[range.clone()]
        .iter()
        .map(|&l| l as i64)
        .collect();
    Dataset::new(images, labels, NUM_CLASSES, range.collect(), source)
}

/// The labels file beside an images file: `X-images-idx3-ubyte[.gz]` → `X-labels-idx1-ubyte[.gz]`
/// (also `X-images.idx3-ubyte`), trying with and without `.gz`.
pub fn find_labels(images: &Path) -> Result<PathBuf> {
    let name = images
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    let renamed = stem.replace("idx3", "idx1").replace("images", "labels");
    if renamed == stem {
        bail!(OptionError::new(
            "labels",
            format!(
                "{}: cannot derive a labels file name (expected `images`/`idx3` in the name); \
                 name the labels file",
                images.display()
            )
        ));
    }
    let candidates = [renamed.clone(), format!("{renamed}.gz")];
    candidates
        .iter()
        .map(|c| images.with_file_name(c))
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow::Error::new(OptionError::new(
                "labels",
                format!(
                    "{}: no labels file beside it (looked for {renamed} and {renamed}.gz); \
                     name the labels file",
                    images.display()
                ),
            ))
        })
}

/// A parsed IDX file of unsigned bytes.
struct Idx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

/// Reads and checks one IDX file (gzip recognised by its magic bytes, not its name). The header
/// is read first; the data is then read up to the size it declares and no further, and that
/// size must fit the file (raw) or what deflate can make of it (gzip), so neither a wrapping
/// product nor a gzip bomb gets past the header.
fn read_idx(path: &Path, magic: u32) -> Result<Idx> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let what = path.display().to_string();
    let gzip = raw.starts_with(&[0x1f, 0x8b]);
    let (mut reader, cap): (Box<dyn Read + '_>, u64) = if gzip {
        (
            Box::new(flate2::read::GzDecoder::new(raw.as_slice())),
            bounded::inflate_cap(raw.len() as u64),
        )
    } else {
        (Box::new(raw.as_slice()), raw.len() as u64)
    };
    let corrupt = |e: std::io::Error| anyhow::anyhow!("{what}: corrupt gzip stream: {e}");
    let ndim = match magic {
        IMAGES_MAGIC => 3,
        _ => 1,
    };
    let header = 4 + 4 * ndim;
    let mut head = vec![0u8; header];
    let got = read_up_to(&mut reader, &mut head).map_err(corrupt)?;
    if got < 4 {
        bail!("{what}: {got} bytes is too short for an IDX file");
    }
    let word = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let found = word(0);
    if found != magic {
        bail!(
            "{what}: IDX magic number {found} (0x{found:08x}), expected {magic} ({}); is this the {} file?",
            if magic == IMAGES_MAGIC {
                "unsigned-byte images [N, H, W]"
            } else {
                "unsigned-byte labels [N]"
            },
            if magic == IMAGES_MAGIC {
                "images"
            } else {
                "labels"
            }
        );
    }
    if got < header {
        bail!("{what}: {got} bytes is shorter than the {header}-byte IDX header (truncated)");
    }
    let dims: Vec<u64> = (0..ndim).map(|d| word(4 + 4 * d) as u64).collect();
    if dims.iter().skip(1).any(|&d| d == 0) {
        bail!("{what}: IDX dimensions {dims:?} contain a zero");
    }
    let expected = bounded::numel(&dims, &what)?;
    let room = cap.saturating_sub(header as u64);
    if expected > room {
        bail!(
            "{what}: header says {dims:?} = {expected} bytes of data but the file {} (truncated or hostile header)",
            if gzip {
                format!("can inflate to at most {room}")
            } else {
                format!("has {room}")
            }
        );
    }
    let data = bounded::read_exact_declared(&mut reader, expected, &what).map_err(|e| {
        if gzip {
            e.context(format!("{what}: corrupt gzip stream or wrong size"))
        } else {
            e
        }
    })?;
    let dims = dims.iter().map(|&d| d as usize).collect();
    Ok(Idx { dims, data })
}

/// Fills `buf` as far as the stream allows; the count read.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
