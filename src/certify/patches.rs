//! CROWN's backward pass on local windows (auto_LiRPA's "patches" mode), for the unit rows that
//! tighten one convolutional node: a row `e_k` depends only on its neuron's receptive field, so
//! each row is carried as a window `[C, h, w]` of its node at an offset instead of the whole map.
//! Through a convolution the window grows by the kernel; through ReLUs and elementwise affine
//! maps it keeps its size, the bounds it needs gathered at its offset. At the input the rows
//! are bounded on the ball's windows; at any other layer, or once a window would cover its
//! map, they become dense coefficient matrices and [`super::crown`]'s backward goes on there.
//!
//! Entries of a window outside its map (the convolutions' padding) are kept at zero.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::ball::Ball;
use super::graph::{BoundGraph, Conv, Layer, NodeId};
use super::ibp::Interval;
use super::relu;

/// Rows as windows of one node's values: coefficients `a` `[R, C, h, w]` on rows `oy..oy+h`,
/// columns `ox..ox+w` (`[R]` each, possibly outside the map), and constants `[R]`.
struct Windows {
    a: Tensor,
    oy: Tensor,
    ox: Tensor,
    constant: Tensor,
}

impl Windows {
    /// `[R, h]` and `[R, w]` map coordinates of the windows' rows and columns.
    fn coords(&self) -> Result<(Tensor, Tensor)> {
        let s = self.a.size();
        let span = |o: &Tensor, n: i64| -> Result<Tensor> {
            Ok(o.f_unsqueeze(1)?
                .f_add(&Tensor::f_arange(n, (Kind::Int64, o.device()))?.f_unsqueeze(0)?)?)
        };
        Ok((span(&self.oy, s[2])?, span(&self.ox, s[3])?))
    }

    /// Flat indices `[R, h, w]` into a map `[H, W]` (entries outside it clamped onto it) and
    /// whether each entry lies inside.
    fn flat(&self, h: i64, w: i64) -> Result<(Tensor, Tensor)> {
        let (iy, ix) = self.coords()?;
        let inside =
            |i: &Tensor, n: i64| -> Result<Tensor> { Ok(i.f_ge(0)?.f_logical_and(&i.f_lt(n)?)?) };
        let mask = inside(&iy, h)?
            .f_unsqueeze(2)?
            .f_logical_and(&inside(&ix, w)?.f_unsqueeze(1)?)?;
        let flat = iy
            .f_clamp(0, h - 1)?
            .f_mul_scalar(w)?
            .f_unsqueeze(2)?
            .f_add(&ix.f_clamp(0, w - 1)?.f_unsqueeze(1)?)?;
        Ok((flat, mask))
    }

    /// The windows' gather from maps `[1, C, H, W]` of size `map` `[H, W]` (one sample's bounds
    /// or constants; the indices found once for them all): `[R, C, h, w]`, arbitrary finite
    /// values outside the map.
    fn gatherer(&self, map: &[i64]) -> Result<impl Fn(&Tensor) -> Result<Tensor>> {
        let s = self.a.size();
        let (r, h, w) = (s[0], s[2], s[3]);
        let flat = self.flat(map[0], map[1])?.0.f_flatten(0, -1)?;
        Ok(move |t: &Tensor| -> Result<Tensor> {
            let c = t.size()[1];
            Ok(t.f_reshape([c, -1])?
                .f_index_select(1, &flat)?
                .f_view([c, r, h, w])?
                .f_permute([1, 0, 2, 3])?)
        })
    }

    /// Zeroes the entries outside a map `[H, W]`.
    fn crop(mut self, h: i64, w: i64) -> Result<Windows> {
        let (_, mask) = self.flat(h, w)?;
        self.a = self.a.f_mul(&mask.f_unsqueeze(1)?)?;
        Ok(self)
    }

    /// The rows as dense coefficients `[1, R, C, H, W]` on a map of `shape` `[C, H, W]`.
    fn dense(&self, shape: &[i64]) -> Result<Tensor> {
        let (c, h, w) = (shape[0], shape[1], shape[2]);
        let r = self.a.size()[0];
        let (flat, _) = self.flat(h, w)?;
        let opts = (Kind::Int64, self.a.device());
        // [R, C, h, w] flat indices into [R, C, H, W]; entries outside the map are zero and
        // are added onto an entry inside it.
        let index = flat
            .f_unsqueeze(1)?
            .f_add(
                &Tensor::f_arange(c, opts)?
                    .f_mul_scalar(h * w)?
                    .f_view([1, c, 1, 1])?,
            )?
            .f_add(
                &Tensor::f_arange(r, opts)?
                    .f_mul_scalar(c * h * w)?
                    .f_view([r, 1, 1, 1])?,
            )?;
        Ok(
            Tensor::f_zeros([r * c * h * w], (Kind::Float, self.a.device()))?
                .f_index_put(
                    &[Some(index.f_flatten(0, -1)?)],
                    &self.a.f_flatten(0, -1)?,
                    true,
                )?
                .f_view([1, r, c, h, w])?,
        )
    }

    /// Through a convolution whose input map is `input` `[C_in, H, W]`.
    fn conv(self, c: &Conv, input: &[i64]) -> Result<Windows> {
        let (s, w) = (self.a.size(), c.weight.size());
        let a = if s[2] * s[3] == 1 && c.groups == 1 && c.dilation == [1, 1] {
            // One position (a unit row): its input window is the kernels, weighted.
            self.a
                .f_view([s[0], s[1]])?
                .f_matmul(&c.weight.f_view([w[0], w[1] * w[2] * w[3]])?)?
                .f_view([s[0], w[1], w[2], w[3]])?
        } else {
            self.a.f_conv_transpose2d::<Tensor>(
                &c.weight,
                None,
                c.stride,
                [0, 0],
                [0, 0],
                c.groups,
                c.dilation,
            )?
        };
        let constant = match &c.bias {
            Some(b) => self.constant.f_add(
                &self
                    .a
                    .f_sum_dim_intlist([2, 3].as_slice(), false, Kind::Float)?
                    .f_matmul(b)?,
            )?,
            None => self.constant,
        };
        Windows {
            a,
            oy: self
                .oy
                .f_mul_scalar(c.stride[0])?
                .f_sub_scalar(c.padding[0])?,
            ox: self
                .ox
                .f_mul_scalar(c.stride[1])?
                .f_sub_scalar(c.padding[1])?,
            constant,
        }
        .crop(input[1], input[2])
    }

    /// Through an elementwise `x · scale + shift` (`[1, C, H, W]` each).
    fn affine(self, scale: &Tensor, shift: &Tensor) -> Result<Windows> {
        let gather = self.gatherer(&shift.size()[2..])?;
        let k = self.a.f_mul(&gather(shift)?)?.f_sum_dim_intlist(
            [1, 2, 3].as_slice(),
            false,
            Kind::Float,
        )?;
        Ok(Windows {
            a: self.a.f_mul(&gather(scale)?)?,
            constant: self.constant.f_add(&k)?,
            ..self
        })
    }

    /// Through a ReLU whose input has bounds `bounds` (`[1, C, H, W]`).
    fn relu(self, bounds: &Interval) -> Result<Windows> {
        let gather = self.gatherer(&bounds.lower.size()[2..])?;
        let local = Interval {
            lower: gather(&bounds.lower)?,
            upper: gather(&bounds.upper)?,
        };
        let (a, k) = relu::relu_backward(&self.a.f_unsqueeze(1)?, &local, None)?;
        Ok(Windows {
            a: a.f_squeeze_dim(1)?,
            constant: self.constant.f_add(&k.f_squeeze_dim(1)?)?,
            ..self
        })
    }
}

/// The rows `sign[r] · e_{rows[r]}` of node `id` (one sample; `[C, H, W]` values) carried back
/// on windows as far as they go. `intervals` and `ball` are the sample's (batch of one).
pub fn backward(
    graph: &BoundGraph,
    intervals: &[Interval],
    id: NodeId,
    rows: &Tensor,
    sign: &Tensor,
    ball: &Ball,
) -> Result<Reached> {
    let shape = &graph.node(id).shape;
    let (c, plane) = (shape[0], shape[1] * shape[2]);
    let r = rows.size()[0];
    let pos = rows.f_remainder(plane)?;
    let channel = rows.f_div_scalar_mode(plane, "floor")?;
    let mut win = Windows {
        a: Tensor::f_zeros([r, c], (Kind::Float, graph.device()))?
            .f_scatter(1, &channel.f_view([r, 1])?, &sign.f_view([r, 1])?)?
            .f_view([r, c, 1, 1])?,
        oy: pos.f_div_scalar_mode(shape[2], "floor")?,
        ox: pos.f_remainder(shape[2])?,
        constant: Tensor::f_zeros([r], (Kind::Float, graph.device()))?,
    };
    let mut at = id;
    loop {
        let node = graph.node(at);
        let input = node.inputs.first().copied().unwrap_or(0);
        let in_shape = &graph.node(input).shape;
        let s = win.a.size();
        win = match &node.layer {
            Layer::Conv(conv) if in_shape.len() == 3 => {
                let grown = |d: usize| {
                    (s[d + 2] - 1) * conv.stride[d]
                        + conv.dilation[d] * (conv.weight.size()[d + 2] - 1)
                        + 1
                };
                if grown(0) * grown(1) >= in_shape[1] * in_shape[2] {
                    break;
                }
                win.conv(conv, in_shape)?
            }
            Layer::Relu => win.relu(&intervals[input])?,
            Layer::Affine { scale, shift } => {
                win.affine(&scale.f_unsqueeze(0)?, &shift.f_unsqueeze(0)?)?
            }
            _ => break,
        };
        at = input;
    }
    if at == BoundGraph::INPUT {
        // Concretised on the windows of the ball.
        let lb = ball
            .viewed(win.gatherer(&graph.node(at).shape[1..])?)?
            .lower_bound(&win.a.f_unsqueeze(1)?)?;
        return Ok(Reached::Bounds(win.constant.f_add(&lb.f_squeeze_dim(1)?)?));
    }
    let a = win.dense(&graph.node(at).shape)?;
    Ok(Reached::Node(at, a, win.constant.f_unsqueeze(0)?))
}

/// Where [`backward`] stopped.
pub enum Reached {
    /// The input: the rows' lower bounds `[R]` over the ball.
    Bounds(Tensor),
    /// Node `.0`: the rows' dense coefficients `[1, R, *shape]` on its values and their
    /// constants `[1, R]`, for [`super::crown`]'s backward to go on with.
    Node(NodeId, Tensor, Tensor),
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::certify::{crown, Ball};
    use crate::norm::Norm;

    fn conv(
        g: &mut BoundGraph,
        x: NodeId,
        w: [i64; 4],
        s: i64,
        p: i64,
        d: i64,
        groups: i64,
    ) -> NodeId {
        let layer = Layer::Conv(Conv {
            weight: Tensor::randn(w, (Kind::Float, Device::Cpu)),
            bias: Some(Tensor::randn([w[0]], (Kind::Float, Device::Cpu))),
            stride: [s, 1],
            padding: [p, 1],
            dilation: [d, 1],
            groups,
        });
        let c = g.push(layer, &[x], "conv").unwrap();
        g.push(Layer::Relu, &[c], "relu").unwrap()
    }

    /// The lower bounds of every neuron of node `last` and of its negation, on windows and on
    /// dense matrices, over both balls: the same, and whether the windows reached the input.
    fn same_bounds(g: &BoundGraph, last: NodeId, x: &Tensor) -> bool {
        let opts = (Kind::Float, Device::Cpu);
        let mut reached_input = false;
        for norm in [Norm::Linf, Norm::L2] {
            let ball = Ball::new(x, &Tensor::from_slice(&[0.1f32]), norm).unwrap();
            let iv = crown::intervals(g, &ball, false).unwrap();
            let m = g.node(last).numel();
            let all = Tensor::arange(m, (Kind::Int64, Device::Cpu));
            let rows = Tensor::cat(&[&all, &all], 0);
            let sign = Tensor::cat(&[Tensor::ones([m], opts), -Tensor::ones([m], opts)], 0);
            let windowed = match backward(g, &iv, last, &rows, &sign, &ball).unwrap() {
                Reached::Bounds(lb) => {
                    reached_input = true;
                    lb
                }
                Reached::Node(at, a, k) => crown::backward_with(g, &iv, None, at, a, k, &ball)
                    .unwrap()
                    .get(0),
            };
            let mut shape = vec![1, 2 * m];
            shape.extend(&g.node(last).shape);
            let e = Tensor::eye(m, opts);
            let dense = Tensor::cat(&[&e, &-&e], 0).view(shape.as_slice());
            let expected = crown::backward(g, &iv, None, last, dense, &ball)
                .unwrap()
                .get(0);
            let gap = (windowed - &expected).abs().max().double_value(&[]);
            let scale = expected.abs().max().double_value(&[]);
            assert!(
                gap <= 1e-5 * scale.max(1.0),
                "{norm:?}: windows {gap} away from dense (scale {scale})"
            );
        }
        reached_input
    }

    /// A chain of convolutions with strides, padding, dilation and groups: windows all the
    /// way to the input.
    #[test]
    fn windows_give_the_dense_bounds_down_to_the_input() {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let mut g = BoundGraph::new([4, 13, 12], Device::Cpu);
        let n = g
            .affine(
                0,
                &Tensor::rand([4, 1, 1], opts),
                &Tensor::randn([4, 1, 1], opts),
                "norm",
            )
            .unwrap();
        let r1 = conv(&mut g, n, [6, 2, 3, 3], 1, 1, 2, 2);
        let r2 = conv(&mut g, r1, [5, 6, 4, 3], 2, 1, 1, 1);
        let last = g.node(r2).inputs[0];
        assert!(same_bounds(&g, last, &Tensor::rand([1, 4, 13, 12], opts)));
    }

    /// Windows that stop at a max pooling and at a window as large as its map, and dense
    /// matrices from there.
    #[test]
    fn windows_hand_over_to_dense_matrices() {
        tch::manual_seed(8);
        let mut g = BoundGraph::new([3, 12, 12], Device::Cpu);
        let r1 = conv(&mut g, 0, [4, 3, 3, 3], 1, 1, 1, 1);
        let pool = g
            .push(Layer::MaxPool { kernel: [2, 2] }, &[r1], "pool")
            .unwrap();
        let r2 = conv(&mut g, pool, [5, 4, 3, 3], 1, 1, 1, 1);
        // Windows 1×1 → 5×5 → 7×7 on a 6×6 map: dense from the second convolution.
        let r3 = conv(&mut g, r2, [6, 5, 5, 5], 1, 2, 1, 1);
        let x = Tensor::rand([1, 3, 12, 12], (Kind::Float, Device::Cpu));
        assert!(!same_bounds(&g, g.node(r3).inputs[0], &x));
        // 1×1 → 3×3, then the pooling.
        assert!(!same_bounds(&g, g.node(r2).inputs[0], &x));
    }
}
