//! The bound graph of an ONNX graph ([`crate::certify`]): each node that depends on the pixels
//! becomes a layer through its operator's [`Operator::relax`](super::ops::Operator::relax);
//! nodes that only compute shapes are evaluated on a one-sample probe and stay constants.

use anyhow::{anyhow, ensure, Context, Result};
use tch::Tensor;

use super::graph::Graph;
use super::ops::Relaxed;
use crate::certify::{BoundGraph, NodeId};

/// Appends `graph` to `g` after node `x` (the graph's input); `probe` is a one-sample input in
/// the graph's layout. Returns the node of the graph's output.
pub(super) fn append(
    graph: &Graph,
    g: &mut BoundGraph,
    x: NodeId,
    probe: &Tensor,
) -> Result<NodeId> {
    let mut vals = graph.values_with_input(probe);
    let mut bound: Vec<Option<NodeId>> = vec![None; vals.len()];
    bound[graph.input] = Some(x);
    for node in &graph.nodes {
        let what = || format!("node {} (operator {})", node.label, node.op_type);
        let ins = node.input_values(&vals, "is not computed")?;
        let y = tch::no_grad(|| node.op.run(&ins)).with_context(what)?;
        let computed: Vec<bool> = node
            .inputs
            .iter()
            .map(|s| s.is_some_and(|s| bound[s].is_some()))
            .collect();
        if computed.iter().any(|c| *c) {
            let from: Vec<NodeId> = node
                .inputs
                .iter()
                .flatten()
                .filter_map(|s| bound[*s])
                .collect();
            let label = format!("{} ({})", node.label, node.op_type);
            let relaxed = node.op.relax(&ins, &computed).with_context(|| {
                format!(
                    "{}: no bound can be computed through it (certification relaxes Conv, \
                     Gemm, MatMul, BatchNormalization, Relu, Add, Sub, Mul, Div by constants, \
                     AveragePool, GlobalAveragePool, MaxPool over disjoint windows, Flatten, \
                     Reshape, Squeeze, Unsqueeze, Identity, Dropout)",
                    what()
                )
            })?;
            bound[node.output] = match relaxed {
                Relaxed::Layer(layer) => Some(g.push(layer, &from, &label)?),
                Relaxed::Affine(scale, shift) => {
                    let rank = g.node(from[0]).shape.len();
                    Some(g.affine(
                        from[0],
                        &per_sample(scale, rank)?,
                        &per_sample(shift, rank)?,
                        &label,
                    )?)
                }
                Relaxed::Same => Some(from[0]),
                Relaxed::Reshape => {
                    let s = y.size();
                    ensure!(
                        s.first() == Some(&1),
                        "{}: reshapes the batch axis (output {s:?} for one sample)",
                        what()
                    );
                    Some(g.reshape(from[0], &s[1..], &label)?)
                }
                Relaxed::Static => None,
            };
        }
        vals[node.output] = Some(y);
    }
    bound[graph.output].ok_or_else(|| anyhow!("the graph's output does not depend on its input"))
}

/// A constant of a batched operation without its leading batch axes of size 1, so that it
/// broadcasts against one sample of rank `rank`.
fn per_sample(c: Tensor, rank: usize) -> Result<Tensor> {
    let mut c = c;
    while c.dim() > rank {
        ensure!(
            c.size()[0] == 1,
            "a constant of shape {:?} varies along the batch axis",
            c.size()
        );
        c = c.f_squeeze_dim(0)?;
    }
    Ok(c)
}
