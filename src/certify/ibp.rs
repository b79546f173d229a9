//! Interval bound propagation (Gowal et al. 2018): elementwise bounds pushed forward layer by
//! layer, affine layers in centre-radius form (`W·mid + b ± |W|·rad`).

use anyhow::Result;
use tch::{Kind, Tensor};

use super::graph::{apply, BoundGraph, Layer, NodeId};

/// Elementwise bounds of a node, `[N, *shape]` each.
#[derive(Debug)]
pub struct Interval {
    pub lower: Tensor,
    pub upper: Tensor,
}

impl Interval {
    /// Lower bounds `[N, S]` of `a[n, s] · v` over the box, for flat `a` `[N, S, D]`.
    pub fn lower_bound_of(&self, a: &Tensor) -> Result<Tensor> {
        let l = self.lower.f_flatten(1, -1)?.f_unsqueeze(2)?;
        let u = self.upper.f_flatten(1, -1)?.f_unsqueeze(2)?;
        let pos = a.f_clamp_min(0.0)?;
        let neg = a.f_clamp_max(0.0)?;
        Ok(pos
            .f_matmul(&l)?
            .f_add(&neg.f_matmul(&u)?)?
            .f_squeeze_dim(2)?)
    }

    fn mid_rad(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.upper.f_add(&self.lower)?.f_mul_scalar(0.5)?,
            self.upper.f_sub(&self.lower)?.f_mul_scalar(0.5)?,
        ))
    }

    fn from_mid_rad(mid: Tensor, rad: Tensor) -> Result<Interval> {
        Ok(Interval {
            lower: mid.f_sub(&rad)?,
            upper: mid.f_add(&rad)?,
        })
    }
}

/// The interval of node `id` from the intervals of its inputs.
pub fn propagate(graph: &BoundGraph, id: NodeId, ins: &[&Interval]) -> Result<Interval> {
    let node = graph.node(id);
    let n = ins[0].lower.size()[0];
    let mut batch_shape = vec![n];
    batch_shape.extend(&node.shape);
    match &node.layer {
        Layer::Linear { weight, bias } => {
            let (mid, rad) = ins[0].mid_rad()?;
            Interval::from_mid_rad(
                mid.f_linear(weight, Some(bias))?,
                rad.f_linear::<Tensor>(&weight.f_abs()?, None)?,
            )
        }
        Layer::Conv(c) => {
            let (mid, rad) = ins[0].mid_rad()?;
            Interval::from_mid_rad(
                c.apply_with(&mid, &c.weight, true)?,
                c.apply_with(&rad, &c.weight.f_abs()?, false)?,
            )
        }
        Layer::Affine { scale, shift } => {
            let (mid, rad) = ins[0].mid_rad()?;
            Interval::from_mid_rad(mid.f_mul(scale)?.f_add(shift)?, rad.f_mul(&scale.f_abs()?)?)
        }
        Layer::Add => Ok(Interval {
            lower: ins[0].lower.f_add(&ins[1].lower)?,
            upper: ins[0].upper.f_add(&ins[1].upper)?,
        }),
        // Monotone layers: bounds map to bounds.
        layer @ (Layer::Reshape | Layer::Relu | Layer::MaxPool { .. }) => Ok(Interval {
            lower: apply(layer, &batch_shape, &[&ins[0].lower])?,
            upper: apply(layer, &batch_shape, &[&ins[0].upper])?,
        }),
        Layer::Input => anyhow::bail!("the input's interval is the ball's"),
    }
}

/// Lower bounds `[N, S]` of `c · logits` from the intervals: `c` `[N, S, K]` is folded into
/// the last layer when it is linear (as CROWN folds the margin matrix), so that the bound
/// on `logit[pred] - logit[j]` does not treat the two logits as independent.
pub fn spec_lower_bound(graph: &BoundGraph, intervals: &[Interval], c: &Tensor) -> Result<Tensor> {
    let out = graph.output();
    let node = graph.node(out);
    match &node.layer {
        Layer::Linear { weight, bias } => {
            let a = c.f_matmul(weight)?;
            let b = c.f_matmul(&bias.f_to_kind(Kind::Float)?)?;
            intervals[node.inputs[0]]
                .lower_bound_of(&a)?
                .f_add(&b)
                .map_err(Into::into)
        }
        _ => intervals[out].lower_bound_of(c),
    }
}
