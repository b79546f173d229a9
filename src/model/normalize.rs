//! Per-channel `(x - mean) / std`, applied inside the differentiable graph so that attacks
//! and gradients stay in pixel space `[0, 1]`.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Mean and std per channel, kept on the model's device.
#[derive(Debug)]
pub struct Normalizer {
    mean: Tensor,
    std: Tensor,
    /// The values, for fingerprints and error messages.
    pub values: (Vec<f64>, Vec<f64>),
}

impl Normalizer {
    /// `None` when neither is given; both must have one value per channel (or one for all).
    pub fn new(
        mean: Option<&[f64]>,
        std: Option<&[f64]>,
        channels: i64,
        device: Device,
    ) -> Result<Option<Self>> {
        let (mean, std) = match (mean, std) {
            (None, None) => return Ok(None),
            (m, s) => (
                m.map(<[f64]>::to_vec).unwrap_or_else(|| vec![0.0]),
                s.map(<[f64]>::to_vec).unwrap_or_else(|| vec![1.0]),
            ),
        };
        let widen = |v: Vec<f64>, what: &str| -> Result<Vec<f64>> {
            match v.len() as i64 {
                1 => Ok(vec![v[0]; channels as usize]),
                n if n == channels => Ok(v),
                n => bail!("--{what} has {n} values but the model input has {channels} channels"),
            }
        };
        let mean = widen(mean, "mean")?;
        let std = widen(std, "std")?;
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("--std values must be positive, got {s}");
        }
        let t = |v: &[f64]| {
            Tensor::from_slice(v)
                .to_kind(Kind::Float)
                .view([1, channels, 1, 1])
                .to_device(device)
        };
        Ok(Some(Normalizer {
            mean: t(&mean),
            std: t(&std),
            values: (mean, std),
        }))
    }

    pub fn apply(&self, x: &Tensor) -> Tensor {
        (x - &self.mean) / &self.std
    }
}

/// Parses `0.4914,0.4822,0.4465`.
pub fn parse_channel_values(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| anyhow::anyhow!("bad number {v:?} in {s:?}"))
        })
        .collect()
}
