//! Certified lower bounds on input margins: below the certified radius no adversarial example
//! exists, so with an attack's margin above it each sample gets a bracket on its true margin.
//!
//! A model becomes a [`BoundGraph`] ([`graph`], through
//! [`crate::model::Classifier::append_bound_graph`]; TorchScript is a black box and refused).
//! Over an L∞ or L2 ball ∩ `[0, 1]` ([`ball`]), the margins `logit[pred] - logit[j]`, j ≠ pred,
//! are bounded from below by [`ibp`], [`crown`] (with [`relu`]'s relaxations) or α-CROWN
//! ([`alpha`]); the margin matrix is folded into the last linear layer. [`radius`] bisects over
//! ε per sample.

pub mod alpha;
pub mod ball;
pub mod crown;
pub mod graph;
pub mod ibp;
pub mod job;
mod patches;
pub mod radius;
pub mod relu;

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

pub use ball::Ball;
pub use graph::{BoundGraph, Layer, NodeId};
pub use radius::{certified_radii, Radius};

use crate::model::Classifier;
use crate::norm::Norm;

/// How the margins are bounded (tightest and slowest last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[derive(strum::EnumString, strum::VariantNames, strum::AsRefStr, strum::EnumMessage)]
#[strum(serialize_all = "kebab-case")]
pub enum Method {
    /// Interval bound propagation.
    Ibp,
    /// Backward linear relaxation (CROWN).
    Crown,
    /// CROWN with optimised lower ReLU slopes.
    AlphaCrown,
}

/// The bound graph of a model: its layers after an input node of the model's input shape.
pub fn bound_graph(model: &dyn Classifier) -> Result<BoundGraph> {
    let info = model.info();
    let mut g = BoundGraph::new(info.input_shape, model.device());
    let out = model.append_bound_graph(&mut g, BoundGraph::INPUT)?;
    ensure!(
        out == g.output(),
        "{}: the bound graph does not end in the logits",
        info.name
    );
    let k = &g.node(out).shape;
    ensure!(
        k.as_slice() == [info.num_classes],
        "{}: the bound graph ends in values of shape {k:?}, not the {} logits",
        info.name,
        info.num_classes
    );
    Ok(g)
}

/// The margin matrix `[N, K-1, K]`: rows `e_pred - e_j` for every `j ≠ pred`.
pub fn margin_matrix(pred: &Tensor, num_classes: i64) -> Result<Tensor> {
    let n = pred.size()[0];
    let device = pred.device();
    let k = num_classes;
    let eye = Tensor::f_eye(k, (Kind::Float, device))?;
    let onehot = eye.f_index_select(0, pred)?;
    let all = onehot.f_unsqueeze(1)?.f_sub(&eye.f_unsqueeze(0)?)?;
    let keep = Tensor::f_arange(k, (Kind::Int64, device))?
        .f_unsqueeze(0)?
        .f_ne_tensor(&pred.f_unsqueeze(1)?)?;
    Ok(all.f_index(&[Some(keep)])?.f_view([n, k - 1, k])?)
}

/// Lower bounds `[N, K-1]` of `logit[pred] - logit[j]` (j ≠ pred, in class order) over the
/// balls of radius `eps` `[N]` around `x` `[N, C, H, W]`.
pub fn margin_lower_bounds(
    graph: &BoundGraph,
    x: &Tensor,
    pred: &Tensor,
    eps: &Tensor,
    norm: Norm,
    method: Method,
) -> Result<Tensor> {
    let ball = Ball::new(x, eps, norm)?;
    let k = graph.node(graph.output()).shape[0];
    let c = margin_matrix(pred, k)?;
    match method {
        Method::Ibp => {
            let iv = tch::no_grad(|| crown::intervals(graph, &ball, false))?;
            tch::no_grad(|| ibp::spec_lower_bound(graph, &iv, &c))
        }
        Method::Crown => tch::no_grad(|| {
            let iv = crown::intervals(graph, &ball, true)?;
            crown::backward(graph, &iv, None, graph.output(), c, &ball)
        }),
        Method::AlphaCrown => {
            let iv = tch::no_grad(|| crown::intervals(graph, &ball, true))?;
            alpha::spec_lower_bound(graph, &iv, &c, &ball, alpha::STEPS)
        }
    }
}
