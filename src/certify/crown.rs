//! CROWN (Zhang et al. 2018, auto_LiRPA's backward mode): a lower bound on `a · node(x)` over
//! the ball, by carrying the coefficient matrix `a` backwards through the graph (transposed
//! affine layers, [`super::relu`]'s relaxations of the activations) down to the input, where
//! [`Ball::lower_bound`] concretises it.
//!
//! The relaxations need bounds on every activation's input. [`intervals`] sweeps the graph
//! forward: each node gets its IBP interval from its inputs' (already tightened) intervals,
//! and the input of an activation is tightened with CROWN on the neurons that interval leaves
//! unstable (`l < 0 < u`, per sample): a stable neuron's relaxation is exact whatever its
//! bounds, so the other neurons need no backward pass. The result is the intersection of the
//! IBP and CROWN bounds. Nodes where IBP is already exact (the first linear layer of an L∞
//! box) are not tightened. The unit rows of a convolutional node start on windows
//! ([`super::patches`]): each depends only on its receptive field.

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::ball::Ball;
use super::graph::{BoundGraph, Layer, NodeId};
use super::ibp::{self, Interval};
use super::{patches, relu};

/// Floats the coefficient matrices of one backward pass may take (16 MiB): the rows of an
/// intermediate layer's bounds go in chunks below it.
const ROW_BUDGET: i64 = 1 << 22;

/// Lower bounds `[N, S]` of `a[n, s] · node_start(x)` over `ball`, for `a` `[N, S, *shape]`;
/// `intervals` bound the inputs of the activations before `start`, `alphas` (indexed by node)
/// replace the lower ReLU slopes (α-CROWN).
pub fn backward(
    graph: &BoundGraph,
    intervals: &[Interval],
    alphas: Option<&[Option<Tensor>]>,
    start: NodeId,
    a: Tensor,
    ball: &Ball,
) -> Result<Tensor> {
    let s = a.size();
    let constant = Tensor::f_zeros([s[0], s[1]], (Kind::Float, graph.device()))?;
    backward_with(graph, intervals, alphas, start, a, constant, ball)
}

/// [`backward`] of `constant + a · node_start(x)`, `constant` `[N, S]`.
pub(super) fn backward_with(
    graph: &BoundGraph,
    intervals: &[Interval],
    alphas: Option<&[Option<Tensor>]>,
    start: NodeId,
    a: Tensor,
    mut constant: Tensor,
    ball: &Ball,
) -> Result<Tensor> {
    let s = a.size();
    let (n, rows) = (s[0], s[1]);
    let mut acc: Vec<Option<Tensor>> = (0..=start).map(|_| None).collect();
    acc[start] = Some(a);
    for id in (0..=start).rev() {
        let Some(a) = acc[id].take() else { continue };
        let node = graph.node(id);
        let input = node.inputs.first().copied().unwrap_or(0);
        let in_shape = &graph.node(input).shape;
        let mut batch_in = vec![n, rows];
        batch_in.extend(in_shape);
        let step = || -> Result<Option<(Tensor, Tensor)>> {
            Ok(Some(match &node.layer {
                Layer::Input => return Ok(None),
                Layer::Linear { weight, bias } => (a.f_matmul(weight)?, a.f_matmul(bias)?),
                Layer::Conv(c) => {
                    let o = &node.shape;
                    let a4 = a.f_reshape([n * rows, o[0], o[1], o[2]])?;
                    // The transposed convolution's output padding restores the input rows and
                    // columns that the output size's rounding dropped (always < stride).
                    let k = c.weight.size();
                    let extra = |d: usize| {
                        in_shape[d + 1]
                            - ((o[d + 1] - 1) * c.stride[d] - 2 * c.padding[d]
                                + c.dilation[d] * (k[d + 2] - 1)
                                + 1)
                    };
                    let back = a4
                        .f_conv_transpose2d::<Tensor>(
                            &c.weight,
                            None,
                            c.stride,
                            c.padding,
                            [extra(0), extra(1)],
                            c.groups,
                            c.dilation,
                        )?
                        .f_reshape(batch_in.as_slice())?;
                    let k = match &c.bias {
                        Some(bias) => a
                            .f_sum_dim_intlist([3, 4].as_slice(), false, Kind::Float)?
                            .f_matmul(bias)?,
                        None => Tensor::f_zeros([n, rows], (Kind::Float, graph.device()))?,
                    };
                    (back, k)
                }
                Layer::Affine { scale, shift } => (
                    a.f_mul(scale)?,
                    a.f_mul(shift)?.f_flatten(2, -1)?.f_sum_dim_intlist(
                        [2].as_slice(),
                        false,
                        Kind::Float,
                    )?,
                ),
                Layer::Reshape => (
                    a.f_reshape(batch_in.as_slice())?,
                    Tensor::f_zeros([n, rows], (Kind::Float, graph.device()))?,
                ),
                Layer::Relu => relu::relu_backward(
                    &a,
                    &intervals[input],
                    alphas.and_then(|al| al[id].as_ref()),
                )?,
                Layer::MaxPool { kernel } => {
                    relu::max_pool_backward(&a, &intervals[input], *kernel)?
                }
                Layer::Add => (
                    a.shallow_clone(),
                    Tensor::f_zeros([n, rows], (Kind::Float, graph.device()))?,
                ),
            }))
        };
        match step().with_context(|| format!("node {} ({})", node.label, node.layer.name()))? {
            None => return Ok(constant.f_add(&ball.lower_bound(&a)?)?),
            Some((a_in, k)) => {
                constant = constant.f_add(&k)?;
                if let Layer::Add = node.layer {
                    accumulate(&mut acc, node.inputs[1], a_in.shallow_clone())?;
                }
                accumulate(&mut acc, input, a_in)?;
            }
        }
    }
    // The node does not depend on the input.
    Ok(constant)
}

/// Adds `t` to the coefficients gathered for node `id` (a node read by several others).
fn accumulate(acc: &mut [Option<Tensor>], id: NodeId, t: Tensor) -> Result<()> {
    acc[id] = Some(match acc[id].take() {
        Some(prev) => prev.f_add(&t)?,
        None => t,
    });
    Ok(())
}

/// The interval of every node (see the module docs), tightened by CROWN at the inputs of the
/// activations when `crown`.
pub fn intervals(graph: &BoundGraph, ball: &Ball, crown: bool) -> Result<Vec<Interval>> {
    let nodes = graph.nodes();
    let mut feeds_activation = vec![false; nodes.len()];
    for n in nodes.iter().filter(|n| n.layer.is_activation()) {
        feeds_activation[n.inputs[0]] = true;
    }
    // IBP is exact where the values range over a box (the L∞ region, through elementwise
    // affine maps and reshapes) and on the one linear layer after such a box: CROWN cannot
    // tighten those nodes (often the widest layer).
    let mut is_box = vec![ball.is_box(); nodes.len()];
    let mut exact = is_box.clone();
    let input = ball.interval();
    let mut out = vec![Interval {
        lower: input.lower.shallow_clone(),
        upper: input.upper.shallow_clone(),
    }];
    for id in 1..nodes.len() {
        let from = nodes[id].inputs.first().copied().unwrap_or(0);
        (is_box[id], exact[id]) = match nodes[id].layer {
            Layer::Affine { .. } | Layer::Reshape => (is_box[from], exact[from]),
            Layer::Linear { .. } | Layer::Conv(_) => (false, is_box[from]),
            _ => (false, false),
        };
        let ins: Vec<&Interval> = nodes[id].inputs.iter().map(|i| &out[*i]).collect();
        let mut iv = ibp::propagate(graph, id, &ins)
            .with_context(|| format!("node {} ({})", nodes[id].label, nodes[id].layer.name()))?;
        if crown && feeds_activation[id] && !exact[id] {
            iv = tighten(graph, &out, id, iv, ball)?;
        }
        out.push(iv);
    }
    Ok(out)
}

/// Intersects `iv` with CROWN's bounds on the neurons of node `id` that it leaves unstable,
/// sample by sample (each sample's own unstable neurons: no bound depends on the batch).
fn tighten(
    graph: &BoundGraph,
    intervals: &[Interval],
    id: NodeId,
    iv: Interval,
    ball: &Ball,
) -> Result<Interval> {
    let node = graph.node(id);
    let n = iv.lower.size()[0];
    let m = node.numel();
    let open = relu::unstable(&iv)?.f_flatten(1, -1)?;
    let widest = graph.nodes()[..=id]
        .iter()
        .map(|n| n.numel())
        .max()
        .unwrap_or(1);
    let chunk = (ROW_BUDGET / (2 * widest)).max(1);
    let opts = (Kind::Float, graph.device());
    let (mut lowers, mut uppers) = (Vec::new(), Vec::new());
    for i in 0..n {
        let mut lower = iv.lower.f_get(i)?.f_flatten(0, -1)?;
        let mut upper = iv.upper.f_get(i)?.f_flatten(0, -1)?;
        let idx = open.f_get(i)?.f_nonzero()?.f_flatten(0, -1)?;
        let count = idx.size()[0];
        let mine: Vec<Interval> = intervals
            .iter()
            .map(|v| -> Result<Interval> {
                Ok(Interval {
                    lower: v.lower.f_narrow(0, i, 1)?,
                    upper: v.upper.f_narrow(0, i, 1)?,
                })
            })
            .collect::<Result<_>>()?;
        let ball_i = ball.narrow(i)?;
        let mut start = 0;
        while start < count {
            let len = chunk.min(count - start);
            let rows = idx.f_narrow(0, start, len)?;
            // Rows e_k and -e_k: lower bounds of x_k and of -x_k.
            let both = Tensor::f_cat(&[&rows, &rows], 0)?;
            let one = Tensor::f_ones([len], opts)?;
            let sign = Tensor::f_cat(&[&one, &one.f_neg()?], 0)?;
            let lb = tch::no_grad(|| -> Result<Tensor> {
                let (from, a, k) = if node.shape.len() == 3 {
                    match patches::backward(graph, &mine, id, &both, &sign, &ball_i)? {
                        patches::Reached::Bounds(lb) => return Ok(lb),
                        patches::Reached::Node(from, a, k) => (from, a, k),
                    }
                } else {
                    let e = Tensor::f_zeros([2 * len, m], opts)?.f_scatter(
                        1,
                        &both.f_view([2 * len, 1])?,
                        &sign.f_view([2 * len, 1])?,
                    )?;
                    let mut shape = vec![1, 2 * len];
                    shape.extend(&node.shape);
                    let k = Tensor::f_zeros([1, 2 * len], opts)?;
                    (id, e.f_view(shape.as_slice())?, k)
                };
                Ok(backward_with(graph, &mine, None, from, a, k, &ball_i)?.f_get(0)?)
            })?;
            let lo = lb.f_narrow(0, 0, len)?;
            let hi = lb.f_narrow(0, len, len)?.f_neg()?;
            lower =
                lower.f_index_copy(0, &rows, &lower.f_index_select(0, &rows)?.f_max_other(&lo)?)?;
            upper =
                upper.f_index_copy(0, &rows, &upper.f_index_select(0, &rows)?.f_min_other(&hi)?)?;
            start += len;
        }
        lowers.push(lower);
        uppers.push(upper);
    }
    let shape = iv.lower.size();
    Ok(Interval {
        lower: Tensor::f_stack(&lowers, 0)?.f_view(shape.as_slice())?,
        upper: Tensor::f_stack(&uppers, 0)?.f_view(shape.as_slice())?,
    })
}
