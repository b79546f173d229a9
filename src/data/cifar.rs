//! CIFAR-10 / CIFAR-100 binary format: per record a label byte (CIFAR-100: coarse then fine
//! label) and 3072 pixel bytes, R then G then B planes, row-major 32x32.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::{window, Dataset};

/// Which of the two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Cifar10,
    Cifar100,
}

const PIXELS: usize = 3 * 32 * 32;

/// Reads records `offset..offset+limit`.
pub fn read(path: &Path, variant: Variant, offset: usize, limit: Option<usize>) -> Result<Dataset> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (label_bytes, classes) = match variant {
        Variant::Cifar10 => (1, 10),
        Variant::Cifar100 => (2, 100),
    };
    let record = label_bytes + PIXELS;
    if bytes.is_empty() || bytes.len() % record != 0 {
        bail!(
            "{}: {} bytes is not a whole number of {record}-byte {variant:?} records (truncated or wrong format?)",
            path.display(),
            bytes.len()
        );
    }
    let n = bytes.len() / record;
    let source = path.display().to_string();
    let range = window(n, offset, limit, &source)?;
    let count = range.len();
    let mut labels = Vec::with_capacity(count);
    let mut pixels = Vec::with_capacity(count * PIXELS);
    for i in range.clone() {
        let rec = &bytes[i * record..(i + 1) * record];
        labels.push(rec[label_bytes - 1] as i64);
        pixels.extend_from_slice(&rec[label_bytes..]);
    }
    let images = Tensor::from_slice(&pixels)
        .view([count as i64, 3, 32, 32])
        .to_kind(Kind::Float)
        / 255.0;
    Dataset::new(images, labels, classes, range.collect(), source)
}
