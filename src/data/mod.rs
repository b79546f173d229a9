//! Labelled image sets behind one [`Dataset`] type: float NCHW in `[0, 1]` plus labels.
//!
//! Readers: CIFAR-10/100 binary ([`cifar`]), MNIST/Fashion-MNIST IDX ([`idx`]), NPY/NPZ
//! ([`npy`]). Every reader validates what it reads and names the file in its errors.

pub mod bounded;
pub mod cifar;
pub mod idx;
pub mod npy;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::util::OptionError;

/// The on-disk formats brittle reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum DataFormat {
    Cifar10,
    Cifar100,
    Idx,
    Npy,
    Npz,
}

/// Which samples of a file to read.
#[derive(Debug, Clone, Default)]
pub struct DataSpec {
    pub path: PathBuf,
    pub format: Option<DataFormat>,
    /// Labels file (IDX images, NPY images); found beside the images when absent.
    pub labels: Option<PathBuf>,
    pub offset: usize,
    pub limit: Option<usize>,
}

/// A labelled image set in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `[N, C, H, W]` float32 in `[0, 1]`, on the CPU.
    pub images: Tensor,
    pub labels: Vec<i64>,
    pub num_classes: i64,
    /// Index of each sample in its source file.
    pub indices: Vec<usize>,
    /// Where it came from, for error messages and provenance.
    pub source: String,
}

impl Dataset {
    /// Checks shapes, ranges and labels; every reader ends with this.
    pub fn new(
        images: Tensor,
        labels: Vec<i64>,
        num_classes: i64,
        indices: Vec<usize>,
        source: String,
    ) -> Result<Self> {
        let size = images.size();
        if size.len() != 4 {
            bail!("{source}: images must be [N, C, H, W], got {size:?}");
        }
        if size[0] as usize != labels.len() || labels.len() != indices.len() {
            bail!("{source}: {} images but {} labels", size[0], labels.len());
        }
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l < 0 || **l >= num_classes)
        {
            bail!(
                "{source}: label {l} of sample {} is outside 0..{num_classes}",
                indices[i]
            );
        }
        let images = images.to_kind(Kind::Float);
        if images.numel() > 0 {
            if images.isnan().any().int64_value(&[]) != 0 {
                bail!("{source}: images contain NaN");
            }
            let (lo, hi) = (
                images.min().double_value(&[]),
                images.max().double_value(&[]),
            );
            if lo < 0.0 || hi > 1.0 || !lo.is_finite() || !hi.is_finite() {
                bail!("{source}: pixel values span [{lo}, {hi}]; expected [0, 1] (or uint8 0-255)");
            }
        }
        Ok(Dataset {
            images,
            labels,
            num_classes,
            indices,
            source,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[C, H, W]`.
    pub fn input_shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    /// Samples `start..end` as a batch (a view, no copy).
    pub fn batch(&self, start: usize, end: usize) -> (Tensor, &[i64]) {
        (
            self.images.narrow(0, start as i64, (end - start) as i64),
            &self.labels[start..end],
        )
    }

    /// The samples at the given positions (not original indices).
    pub fn select(&self, positions: &[usize]) -> Result<Dataset> {
        let idx = Tensor::from_slice(&positions.iter().map(|&p| p as i64).collect::<Vec<_>>());
        Ok(Dataset {
            images: self.images.index_select(0, &idx),
            labels: positions.iter().map(|&p| self.labels[p]).collect(),
            num_classes: self.num_classes,
            indices: positions.iter().map(|&p| self.indices[p]).collect(),
            source: self.source.clone(),
        })
    }
}

/// Keeps `offset..offset+limit` of `n` samples; an offset past the end is an error.
pub fn window(
    n: usize,
    offset: usize,
    limit: Option<usize>,
    source: &str,
) -> Result<std::ops::Range<usize>> {
    if offset > n || (offset == n && n > 0) {
        bail!(OptionError::new(
            "offset",
            format!("{source}: offset {offset} is past the end ({n} samples)")
        ));
    }
    let end = limit.map_or(n, |l| (offset + l).min(n));
    Ok(offset..end)
}

impl DataSpec {
    /// The format, from `--data-format`, else the file name.
    pub fn resolved_format(&self) -> Result<DataFormat> {
        if let Some(f) = self.format {
            return Ok(f);
        }
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".npz") {
            Ok(DataFormat::Npz)
        } else if name.ends_with(".npy") {
            Ok(DataFormat::Npy)
        } else if name.contains("idx3") || name.ends_with(".idx") {
            Ok(DataFormat::Idx)
        } else if name.ends_with(".bin") {
            Ok(DataFormat::Cifar10)
        } else {
            bail!(OptionError::new(
                "format",
                format!(
                    "{}: cannot tell the data format from the file name; name the format",
                    self.path.display()
                )
            ))
        }
    }

    /// Reads the samples.
    pub fn load(&self) -> Result<Dataset> {
        let path: &Path = &self.path;
        if !path.exists() {
            bail!("data file {} does not exist", path.display());
        }
        let ds: Result<Dataset> = match self.resolved_format()? {
            DataFormat::Cifar10 => {
                cifar::read(path, cifar::Variant::Cifar10, self.offset, self.limit)
            }
            DataFormat::Cifar100 => {
                cifar::read(path, cifar::Variant::Cifar100, self.offset, self.limit)
            }
            DataFormat::Idx => idx::read(path, self.labels.as_deref(), self.offset, self.limit),
            DataFormat::Npy | DataFormat::Npz => {
                npy::read(path, self.labels.as_deref(), self.offset, self.limit)
            }
        };
        ds.with_context(|| format!("reading data {}", path.display()))
    }
}
