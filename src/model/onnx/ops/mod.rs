//! The ONNX operators brittle implements, as tch operations (so autograd reaches the input),
//! by family: [`conv_pool`] (Conv, pools, BatchNormalization, Pad), [`linear`] (Gemm,
//! MatMul), [`elementwise`] (arithmetic, activations, casts) and [`shape`] (reshaping,
//! indexing, constants).
//!
//! Each operator is a type whose `parse` reads a node's attributes for its opset and rejects
//! anything it does not implement (the whole-graph validation done at load), next to its
//! [`Operator::run`], which then only meets shape errors, reported as errors (every call is a
//! fallible `f_` one). [`REGISTRY`] maps operator names to parsers: it is both the dispatch
//! and the list of supported operators.

mod conv_pool;
mod elementwise;
mod linear;
mod shape;

use std::fmt::Debug;

use anyhow::{anyhow, bail, ensure, Result};
use tch::{Device, Tensor};

use self::elementwise::BinaryOp;
use super::proto::Attrs;
use crate::certify::Layer;

pub(super) use self::linear::LinearRole;

/// What a parser knows of its node besides the attributes.
pub(super) struct NodeInfo<'a> {
    pub op_type: &'a str,
    pub opset: i64,
    /// Inputs, empty names included (they mark absent optional inputs).
    pub n_in: usize,
}

/// One parsed, validated node operation.
pub(super) trait Operator: Debug + Send {
    /// Runs the operation on its inputs (`None` for an absent optional input).
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor>;

    /// Whether this node's output is a fixed value (folded at load).
    fn is_constant(&self) -> bool {
        false
    }

    /// The part this node can play in a last linear layer ([`super::graph::Graph::head`]).
    fn linear_role(&self) -> Option<LinearRole> {
        None
    }

    /// This node in a bound graph ([`crate::certify`]): `ins` are its inputs on a one-sample
    /// probe, `computed[i]` says whether input `i` depends on the pixels (weights do not).
    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        let _ = (ins, computed);
        bail!("has no linear relaxation")
    }

    /// For a Reshape: turns the batch rewrite on or off (see the module docs of
    /// [`super`]) and returns `true`; other operators return `false`.
    fn set_batch_rewrite(&mut self, on: bool) -> bool {
        let _ = on;
        false
    }
}

pub(super) type Op = Box<dyn Operator>;

/// What a node becomes in a bound graph (see [`Operator::relax`]).
pub(super) enum Relaxed {
    /// A layer reading the node's computed inputs, in order.
    Layer(Layer),
    /// `x · scale + shift` with constants that broadcast against the computed input.
    Affine(Tensor, Tensor),
    /// The computed input, unchanged (Identity, Dropout at inference).
    Same,
    /// The computed input in the output's shape.
    Reshape,
    /// A value that does not depend on the pixels (the Shape of a computed tensor).
    Static,
}

/// Fails unless the first input is the only one computed from the pixels.
fn first_computed_only(computed: &[bool]) -> Result<()> {
    ensure!(
        computed.first() == Some(&true) && computed.iter().skip(1).all(|c| !c),
        "only its first input may depend on the pixels (its weights must be constants)"
    );
    Ok(())
}

/// Parses one node of an operator type.
type Parse = fn(&mut Attrs, &NodeInfo) -> Result<Op>;

/// A boxed operator, for the registry's parsers.
fn op(o: impl Operator + 'static) -> Result<Op> {
    Ok(Box::new(o))
}

/// Every operator brittle runs, by name.
const REGISTRY: &[(&str, Parse)] = &[
    // conv_pool
    ("Conv", |a, n| op(conv_pool::Conv::parse(a, n)?)),
    ("MaxPool", |a, n| op(conv_pool::MaxPool::parse(a, n)?)),
    ("AveragePool", |a, n| {
        op(conv_pool::AveragePool::parse(a, n)?)
    }),
    ("GlobalAveragePool", |_, n| {
        op(conv_pool::GlobalPool::parse(n, false)?)
    }),
    ("GlobalMaxPool", |_, n| {
        op(conv_pool::GlobalPool::parse(n, true)?)
    }),
    ("BatchNormalization", |a, n| {
        op(conv_pool::BatchNorm::parse(a, n)?)
    }),
    ("Pad", |a, n| op(conv_pool::Pad::parse(a, n)?)),
    // linear
    ("Gemm", |a, n| op(linear::Gemm::parse(a, n)?)),
    ("MatMul", |_, n| op(linear::MatMul::parse(n)?)),
    // elementwise
    ("Add", |_, n| op(BinaryOp::Add.parse(n)?)),
    ("Sub", |_, n| op(BinaryOp::Sub.parse(n)?)),
    ("Mul", |_, n| op(BinaryOp::Mul.parse(n)?)),
    ("Div", |_, n| op(BinaryOp::Div.parse(n)?)),
    ("Relu", |_, n| op(elementwise::Unary::Relu.parse(n)?)),
    ("Sigmoid", |_, n| op(elementwise::Unary::Sigmoid.parse(n)?)),
    ("Tanh", |_, n| op(elementwise::Unary::Tanh.parse(n)?)),
    (
        "Identity",
        |_, n| op(elementwise::Unary::Identity.parse(n)?),
    ),
    ("LeakyRelu", |a, n| op(elementwise::LeakyRelu::parse(a, n)?)),
    ("Softmax", |a, n| op(elementwise::Softmax::parse(a, n)?)),
    ("Clip", |a, n| op(elementwise::Clip::parse(a, n)?)),
    ("Cast", |a, n| op(elementwise::Cast::parse(a, n)?)),
    ("Dropout", |a, n| op(elementwise::Dropout::parse(a, n)?)),
    // shape
    ("Flatten", |a, n| op(shape::Flatten::parse(a, n)?)),
    ("Reshape", |a, n| op(shape::Reshape::parse(a, n)?)),
    ("Transpose", |a, n| op(shape::Transpose::parse(a, n)?)),
    ("Concat", |a, n| op(shape::Concat::parse(a, n)?)),
    ("Gather", |a, n| op(shape::Gather::parse(a, n)?)),
    ("Shape", |a, n| op(shape::Shape::parse(a, n)?)),
    ("Unsqueeze", |a, n| op(shape::Unsqueeze::parse(a, n)?)),
    ("Squeeze", |a, n| op(shape::Squeeze::parse(a, n)?)),
    ("Constant", |a, n| op(shape::Constant::parse(a, n)?)),
];

/// Parses a node of the default domain at `opset`; `n_in` counts its inputs (empty names
/// included, they mark absent optional inputs).
pub(super) fn parse(op_type: &str, a: &mut Attrs, opset: i64, n_in: usize) -> Result<Op> {
    let node = NodeInfo {
        op_type,
        opset,
        n_in,
    };
    match REGISTRY.iter().find(|(name, _)| *name == op_type) {
        Some((_, parse)) => parse(a, &node),
        None => bail!(
            "operator {op_type:?} is not supported (supported: {})",
            supported().join(", ")
        ),
    }
}

/// The supported operator names, sorted.
pub(super) fn supported() -> Vec<&'static str> {
    let mut names: Vec<&str> = REGISTRY.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    names
}

/// Fails unless the node has between `min` and `max` inputs.
fn arity(n: usize, min: usize, max: usize) -> Result<()> {
    ensure!(
        (min..=max).contains(&n),
        "has {n} inputs, expected {}",
        if min == max {
            format!("{min}")
        } else {
            format!("{min} to {max}")
        }
    );
    Ok(())
}

fn input<'a>(inp: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    inp.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| anyhow!("input {i} is required"))
}

fn opt_input<'a>(inp: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inp.get(i).copied().flatten()
}

/// Both operands on one device (integer constants live on the CPU, activations maybe not).
fn same_device(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let device = if a.device() == Device::Cpu {
        b.device()
    } else {
        a.device()
    };
    Ok((a.f_to_device(device)?, b.f_to_device(device)?))
}

/// An ONNX axis in `[-rank, rank)` as an index.
fn norm_axis(axis: i64, rank: usize, what: &str) -> Result<usize> {
    let r = rank as i64;
    ensure!(
        (-r..r).contains(&axis),
        "{what} {axis} is out of range for rank {rank}"
    );
    Ok(if axis < 0 { axis + r } else { axis } as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_listed_sorted() {
        let names = supported();
        assert_eq!(names.len(), REGISTRY.len());
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert_eq!(names.len(), 31);
    }
}
