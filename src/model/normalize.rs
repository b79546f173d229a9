//! Per-channel `(x - mean) / std` in front of any format ([`Normalized`]), applied inside the
//! differentiable graph so that attacks and gradients stay in pixel space `[0, 1]`.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use super::{Classifier, ModelInfo};
use crate::certify::{BoundGraph, NodeId};
use crate::util::OptionError;

/// Mean and std per channel, kept on the model's device.
#[derive(Debug)]
pub struct Normalizer {
    mean: Tensor,
    std: Tensor,
    channels: i64,
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
        let widen = |v: Vec<f64>, option: &'static str| -> Result<Vec<f64>, OptionError> {
            match v.len() as i64 {
                1 => Ok(vec![v[0]; channels as usize]),
                n if n == channels => Ok(v),
                n => Err(OptionError::new(
                    option,
                    format!(
                        "the {option} has {n} values but the model input has {channels} channels"
                    ),
                )),
            }
        };
        let mean = widen(mean, "mean")?;
        let std = widen(std, "std")?;
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(OptionError::new(
                "std",
                format!("the std values must be positive, got {s}"),
            )
            .into());
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
            channels,
        }))
    }

    /// `(x - mean) / std` of images `[N, C, H, W]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        ensure!(
            size.len() == 4 && size[1] == self.channels,
            "expected images [N, {}, H, W] to normalise, got shape {size:?}",
            self.channels
        );
        Ok(x.f_sub(&self.mean)?.f_div(&self.std)?)
    }
}

/// A classifier whose every input (logits, features, the load-time probe) is normalised first.
/// The info and fingerprint are the inner model's (the spec's fingerprint already holds the
/// mean and std); the last linear layer is unchanged, as it acts on features.
pub struct Normalized<C: Classifier> {
    inner: C,
    normalizer: Normalizer,
}

impl<C: Classifier> Normalized<C> {
    pub fn new(inner: C, normalizer: Normalizer) -> Self {
        Normalized { inner, normalizer }
    }
}

impl<C: Classifier> Classifier for Normalized<C> {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.logits(&self.normalizer.apply(x)?)
    }

    fn features_and_logits(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        self.inner.features_and_logits(&self.normalizer.apply(x)?)
    }

    fn last_linear(&self) -> Option<(Tensor, Tensor)> {
        self.inner.last_linear()
    }

    fn append_bound_graph(&self, graph: &mut BoundGraph, input: NodeId) -> Result<NodeId> {
        let n = &self.normalizer;
        let c = n.channels;
        let scale = n.std.f_reciprocal()?.f_view([c, 1, 1])?;
        let shift = n.mean.f_neg()?.f_div(&n.std)?.f_view([c, 1, 1])?;
        let x = graph.affine(input, &scale, &shift, "normalisation")?;
        self.inner.append_bound_graph(graph, x)
    }

    fn device(&self) -> Device {
        self.inner.device()
    }

    fn info(&self) -> &ModelInfo {
        self.inner.info()
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
