//! The ONNX operators brittle implements, as tch operations (so autograd reaches the input).
//!
//! [`Op::parse`] reads a node's attributes for its opset and rejects anything it does not
//! implement; this is the whole-graph validation done at load. [`Op::run`] then only meets
//! shape errors, which tch reports as errors (every call is a fallible `f_` one).

use anyhow::{anyhow, bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use super::proto::{tensor_from_proto, Attrs};
use crate::util::to_vec_i64;

/// Operator names [`Op::parse`] accepts, for the error message on any other.
pub(super) const SUPPORTED: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "Div",
    "Dropout",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Identity",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "Pad",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Softmax",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

#[derive(Debug, Clone, Copy)]
pub(super) enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AutoPad {
    NotSet,
    Valid,
    SameUpper,
    SameLower,
}

/// `pads`/`auto_pad` of Conv and the pools, resolved against the input size at run time.
#[derive(Debug)]
pub(super) struct Padding {
    auto: AutoPad,
    /// ONNX order: all begins, then all ends.
    pads: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum PadMode {
    Constant,
    Reflect,
    Edge,
}

/// Window attributes shared by MaxPool and AveragePool.
#[derive(Debug)]
pub(super) struct Pool {
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    pads: Padding,
    dilations: Option<Vec<i64>>,
    ceil_mode: bool,
}

/// One parsed, validated node operation.
#[derive(Debug)]
pub(super) enum Op {
    Conv {
        strides: Option<Vec<i64>>,
        pads: Padding,
        dilations: Option<Vec<i64>>,
        group: i64,
    },
    Gemm {
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    Binary(BinaryOp),
    Relu,
    LeakyRelu(f64),
    Sigmoid,
    Tanh,
    /// Opsets before 13 flatten to 2-D around `axis` (default 1) before the softmax.
    Softmax {
        axis: i64,
        coerce_2d: bool,
    },
    BatchNorm {
        eps: f64,
    },
    MaxPool(Pool),
    AveragePool {
        pool: Pool,
        count_include_pad: bool,
    },
    GlobalAveragePool,
    GlobalMaxPool,
    Flatten {
        axis: i64,
    },
    /// `batch_rewrite`: the constant target shape starts with the exported batch of 1, which is
    /// replaced by the data's leading size when the graph runs batched (see the module docs).
    Reshape {
        allowzero: bool,
        batch_rewrite: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Concat {
        axis: i64,
    },
    /// `legacy`: pads and value from attributes (opset < 11), else from inputs.
    Pad {
        mode: PadMode,
        legacy: Option<(Vec<i64>, f64)>,
    },
    Constant(Tensor),
    Identity,
    Dropout,
    /// `legacy`: min and max from attributes (opset < 11), else optional inputs.
    Clip {
        legacy: Option<(f64, f64)>,
    },
    Gather {
        axis: i64,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    /// `axes`: from the attribute (opset < 13), else from the second input.
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Cast(Kind),
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

fn parse_padding(a: &mut Attrs) -> Result<Padding> {
    let auto = match a.string("auto_pad")?.as_deref() {
        None | Some("NOTSET") => AutoPad::NotSet,
        Some("VALID") => AutoPad::Valid,
        Some("SAME_UPPER") => AutoPad::SameUpper,
        Some("SAME_LOWER") => AutoPad::SameLower,
        Some(other) => bail!("auto_pad {other:?} is not supported"),
    };
    let pads = a.ints("pads")?;
    if let Some(p) = &pads {
        ensure!(p.len() % 2 == 0, "pads {p:?} must have an even length");
        ensure!(p.iter().all(|v| *v >= 0), "negative pads {p:?}");
    }
    Ok(Padding { auto, pads })
}

fn parse_pool(a: &mut Attrs, opset: i64, dilations_from: i64) -> Result<Pool> {
    let kernel = a
        .ints("kernel_shape")?
        .ok_or_else(|| anyhow!("kernel_shape is required"))?;
    ensure!(
        (1..=3).contains(&kernel.len()),
        "{}-D pooling is not supported",
        kernel.len()
    );
    let pads = parse_padding(a)?;
    if let Some(p) = &pads.pads {
        ensure!(
            p.len() == 2 * kernel.len(),
            "pads {p:?} do not match kernel_shape {kernel:?}"
        );
    }
    let strides = a.ints("strides")?;
    let dilations = if opset >= dilations_from {
        a.ints("dilations")?
    } else {
        None
    };
    let ceil_mode = if opset >= 10 {
        a.int("ceil_mode", 0)? != 0
    } else {
        false
    };
    pads.check_dilations(dilations.as_deref())?;
    for (what, v) in [("strides", &strides), ("dilations", &dilations)] {
        if let Some(v) = v {
            ensure!(
                v.len() == kernel.len(),
                "{what} {v:?} do not match kernel_shape {kernel:?}"
            );
        }
    }
    Ok(Pool {
        kernel,
        strides,
        pads,
        dilations,
        ceil_mode,
    })
}

impl Op {
    /// Parses a node of the default domain at `opset`; `n_in` counts its inputs (empty names
    /// included, they mark absent optional inputs).
    pub(super) fn parse(op_type: &str, a: &mut Attrs, opset: i64, n_in: usize) -> Result<Op> {
        let op = match op_type {
            "Conv" => {
                arity(n_in, 2, 3)?;
                a.ignore("kernel_shape"); // taken from the weight's shape
                let pads = parse_padding(a)?;
                let dilations = a.ints("dilations")?;
                pads.check_dilations(dilations.as_deref())?;
                Op::Conv {
                    pads,
                    strides: a.ints("strides")?,
                    dilations,
                    group: a.int("group", 1)?,
                }
            }
            "Gemm" => {
                arity(n_in, 2, 3)?;
                Op::Gemm {
                    alpha: a.float("alpha", 1.0)?,
                    beta: a.float("beta", 1.0)?,
                    trans_a: a.int("transA", 0)? != 0,
                    trans_b: a.int("transB", 0)? != 0,
                }
            }
            "MatMul" => {
                arity(n_in, 2, 2)?;
                Op::MatMul
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                arity(n_in, 2, 2)?;
                Op::Binary(match op_type {
                    "Add" => BinaryOp::Add,
                    "Sub" => BinaryOp::Sub,
                    "Mul" => BinaryOp::Mul,
                    _ => BinaryOp::Div,
                })
            }
            "Relu" | "Sigmoid" | "Tanh" | "GlobalAveragePool" | "GlobalMaxPool" | "Identity" => {
                arity(n_in, 1, 1)?;
                match op_type {
                    "Relu" => Op::Relu,
                    "Sigmoid" => Op::Sigmoid,
                    "Tanh" => Op::Tanh,
                    "GlobalAveragePool" => Op::GlobalAveragePool,
                    "GlobalMaxPool" => Op::GlobalMaxPool,
                    _ => Op::Identity,
                }
            }
            "LeakyRelu" => {
                arity(n_in, 1, 1)?;
                Op::LeakyRelu(a.float("alpha", 0.01)?)
            }
            "Softmax" => {
                arity(n_in, 1, 1)?;
                let legacy = opset < 13;
                Op::Softmax {
                    axis: a.int("axis", if legacy { 1 } else { -1 })?,
                    coerce_2d: legacy,
                }
            }
            "BatchNormalization" => {
                arity(n_in, 5, 5)?;
                a.ignore("momentum"); // running statistics are not updated at inference
                if opset >= 14 {
                    ensure!(
                        a.int("training_mode", 0)? == 0,
                        "training_mode=1 is not supported (inference only)"
                    );
                }
                Op::BatchNorm {
                    eps: a.float("epsilon", 1e-5)?,
                }
            }
            "MaxPool" => {
                arity(n_in, 1, 1)?;
                a.ignore("storage_order"); // only changes the Indices output, which is refused
                Op::MaxPool(parse_pool(a, opset, 10)?)
            }
            "AveragePool" => {
                arity(n_in, 1, 1)?;
                let pool = parse_pool(a, opset, 19)?;
                if let Some(d) = &pool.dilations {
                    ensure!(
                        d.iter().all(|d| *d == 1),
                        "AveragePool dilations {d:?} are not supported"
                    );
                }
                Op::AveragePool {
                    pool,
                    count_include_pad: a.int("count_include_pad", 0)? != 0,
                }
            }
            "Flatten" => {
                arity(n_in, 1, 1)?;
                Op::Flatten {
                    axis: a.int("axis", 1)?,
                }
            }
            "Reshape" => {
                arity(n_in, 2, 2)?;
                let allowzero = opset >= 14 && a.int("allowzero", 0)? != 0;
                Op::Reshape {
                    allowzero,
                    batch_rewrite: false,
                }
            }
            "Transpose" => {
                arity(n_in, 1, 1)?;
                Op::Transpose {
                    perm: a.ints("perm")?,
                }
            }
            "Concat" => {
                ensure!(n_in >= 1, "has no inputs");
                Op::Concat {
                    axis: a
                        .opt_int("axis")?
                        .ok_or_else(|| anyhow!("axis is required"))?,
                }
            }
            "Pad" => {
                let mode = match a.string("mode")?.as_deref() {
                    None | Some("constant") => PadMode::Constant,
                    Some("reflect") => PadMode::Reflect,
                    Some("edge") => PadMode::Edge,
                    Some(other) => bail!("mode {other:?} is not supported"),
                };
                let legacy = if opset < 11 {
                    arity(n_in, 1, 1)?;
                    let pads = a.ints("pads")?.ok_or_else(|| anyhow!("pads is required"))?;
                    Some((pads, a.float("value", 0.0)?))
                } else {
                    arity(n_in, 2, if opset >= 18 { 4 } else { 3 })?;
                    None
                };
                Op::Pad { mode, legacy }
            }
            "Constant" => {
                arity(n_in, 0, 0)?;
                let t = if let Some(t) = a.tensor("value")? {
                    tensor_from_proto(t)?
                } else if let Some(v) = a.opt_float("value_float")? {
                    Tensor::from(v as f32)
                } else if let Some(v) = a.floats("value_floats")? {
                    Tensor::from_slice(&v)
                } else if let Some(v) = a.opt_int("value_int")? {
                    Tensor::from(v)
                } else if let Some(v) = a.ints("value_ints")? {
                    Tensor::from_slice(&v)
                } else {
                    bail!("needs one of value, value_float(s), value_int(s)")
                };
                Op::Constant(t)
            }
            "Dropout" => {
                arity(n_in, 1, 3)?;
                a.ignore("ratio"); // inference: identity
                a.ignore("seed");
                Op::Dropout
            }
            "Clip" => {
                if opset < 11 {
                    arity(n_in, 1, 1)?;
                    Op::Clip {
                        legacy: Some((
                            a.float("min", f64::NEG_INFINITY)?,
                            a.float("max", f64::INFINITY)?,
                        )),
                    }
                } else {
                    arity(n_in, 1, 3)?;
                    Op::Clip { legacy: None }
                }
            }
            "Gather" => {
                arity(n_in, 2, 2)?;
                Op::Gather {
                    axis: a.int("axis", 0)?,
                }
            }
            "Shape" => {
                arity(n_in, 1, 1)?;
                let (start, end) = if opset >= 15 {
                    (a.int("start", 0)?, a.opt_int("end")?)
                } else {
                    (0, None)
                };
                Op::Shape { start, end }
            }
            "Unsqueeze" | "Squeeze" => {
                let axes = if opset < 13 {
                    arity(n_in, 1, 1)?;
                    let axes = a.ints("axes")?;
                    ensure!(axes.is_some() || op_type == "Squeeze", "axes is required");
                    axes
                } else {
                    arity(n_in, if op_type == "Unsqueeze" { 2 } else { 1 }, 2)?;
                    None
                };
                if op_type == "Unsqueeze" {
                    Op::Unsqueeze { axes }
                } else {
                    Op::Squeeze { axes }
                }
            }
            "Cast" => {
                arity(n_in, 1, 1)?;
                a.ignore("saturate"); // float8 only
                let to = a.opt_int("to")?.ok_or_else(|| anyhow!("to is required"))?;
                Op::Cast(match to {
                    1 => Kind::Float,
                    10 => Kind::Half,
                    11 => Kind::Double,
                    // integers are all int64 here, like integer initializers (see proto.rs)
                    2 | 3 | 5 | 6 | 7 => Kind::Int64,
                    9 => Kind::Bool,
                    other => bail!("Cast to ONNX data type {other} is not supported"),
                })
            }
            other => bail!(
                "operator {other:?} is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        };
        Ok(op)
    }

    /// Whether this node's output is a fixed value (folded at load).
    pub(super) fn is_constant(&self) -> bool {
        matches!(self, Op::Constant(_))
    }

    /// Runs the operation on its inputs (`None` for an absent optional input).
    pub(super) fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = || input(inp, 0);
        Ok(match self {
            Op::Conv {
                strides,
                pads,
                dilations,
                group,
            } => {
                let (x, w) = (x()?, input(inp, 1)?);
                ensure!(
                    x.dim() == w.dim() && w.dim() >= 3,
                    "input {:?} and weight {:?} do not make a convolution",
                    x.size(),
                    w.size()
                );
                let k = w.dim() - 2;
                let kernel = &w.size()[2..];
                let strides = strides.clone().unwrap_or_else(|| vec![1; k]);
                let dil = dilations.clone().unwrap_or_else(|| vec![1; k]);
                let (x, padding) =
                    pads.apply(x, kernel, &strides, &dil, |x, p| x.f_constant_pad_nd(p))?;
                x.f_convolution(
                    w,
                    opt_input(inp, 2),
                    &strides,
                    &padding,
                    &dil,
                    false,
                    vec![0; k],
                    *group,
                )?
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                let (a, b) = (x()?, input(inp, 1)?);
                ensure!(
                    a.dim() == 2 && b.dim() == 2,
                    "Gemm needs 2-D inputs, got {:?} and {:?}",
                    a.size(),
                    b.size()
                );
                let a = if *trans_a {
                    a.f_transpose(0, 1)?
                } else {
                    a.shallow_clone()
                };
                let b = if *trans_b {
                    b.f_transpose(0, 1)?
                } else {
                    b.shallow_clone()
                };
                let mut y = a.f_matmul(&b)?;
                if *alpha != 1.0 {
                    y = y.f_mul_scalar(*alpha)?;
                }
                match opt_input(inp, 2) {
                    Some(c) if *beta == 1.0 => y.f_add(c)?,
                    Some(c) => y.f_add(&c.f_mul_scalar(*beta)?)?,
                    None => y,
                }
            }
            Op::MatMul => {
                let (a, b) = same_device(x()?, input(inp, 1)?)?;
                a.f_matmul(&b)?
            }
            Op::Binary(op) => {
                let (a, b) = same_device(x()?, input(inp, 1)?)?;
                match op {
                    BinaryOp::Add => a.f_add(&b)?,
                    BinaryOp::Sub => a.f_sub(&b)?,
                    BinaryOp::Mul => a.f_mul(&b)?,
                    // ONNX integer division truncates; tch would return floats
                    BinaryOp::Div if !a.is_floating_point() && !b.is_floating_point() => {
                        a.f_divide_tensor_mode(&b, "trunc")?
                    }
                    BinaryOp::Div => a.f_div(&b)?,
                }
            }
            Op::Relu => x()?.f_relu()?,
            Op::LeakyRelu(alpha) => {
                let x = x()?;
                x.f_where_self(&x.f_gt(0.0)?, &x.f_mul_scalar(*alpha)?)?
            }
            Op::Sigmoid => x()?.f_sigmoid()?,
            Op::Tanh => x()?.f_tanh()?,
            Op::Softmax { axis, coerce_2d } => {
                let x = x()?;
                let axis = norm_axis(*axis, x.dim(), "axis")?;
                if *coerce_2d {
                    let size = x.size();
                    let outer: i64 = size[..axis].iter().product();
                    x.f_reshape([outer, -1])?
                        .f_softmax(1, x.kind())?
                        .f_reshape(&size)?
                } else {
                    x.f_softmax(axis as i64, x.kind())?
                }
            }
            Op::BatchNorm { eps } => x()?.f_batch_norm(
                Some(input(inp, 1)?),
                Some(input(inp, 2)?),
                Some(input(inp, 3)?),
                Some(input(inp, 4)?),
                false,
                0.0,
                *eps,
                true,
            )?,
            Op::MaxPool(p) => {
                let x = x()?;
                let (strides, dil) = p.strides_dilations(x)?;
                let (x, padding) = p.pads.apply(x, &p.kernel, &strides, &dil, |x, pad| {
                    x.f_pad(pad, "constant", f64::NEG_INFINITY)
                })?;
                match p.kernel.len() {
                    1 => x.f_max_pool1d(&p.kernel, &strides, &padding, &dil, p.ceil_mode)?,
                    2 => x.f_max_pool2d(&p.kernel, &strides, &padding, &dil, p.ceil_mode)?,
                    _ => x.f_max_pool3d(&p.kernel, &strides, &padding, &dil, p.ceil_mode)?,
                }
            }
            Op::AveragePool {
                pool: p,
                count_include_pad,
            } => {
                let x = x()?;
                let (strides, dil) = p.strides_dilations(x)?;
                let (begin, end) = p.pads.resolve(x, &p.kernel, &strides, &dil)?;
                let avg = |t: &Tensor, pad: &[i64], include: bool| -> Result<Tensor> {
                    let (k, s, c) = (&p.kernel, &strides, p.ceil_mode);
                    // explicit divisor_override None: the divisor is the window (or its valid part)
                    Ok(match k.len() {
                        1 => t.f_avg_pool1d(k, s, pad, c, include)?,
                        2 => t.f_avg_pool2d(k, s, pad, c, include, None)?,
                        _ => t.f_avg_pool3d(k, s, pad, c, include, None)?,
                    })
                };
                if begin == end && fits_torch_padding(&begin, &p.kernel) {
                    avg(x, &begin, *count_include_pad)?
                } else {
                    // libtorch takes symmetric pads of at most half the window: pad explicitly.
                    let tp = torch_pads(&begin, &end);
                    let zeros = vec![0; p.kernel.len()];
                    let sum = avg(&x.f_constant_pad_nd(&tp)?, &zeros, true)?;
                    if *count_include_pad {
                        sum
                    } else {
                        // Same divisor on a padded mask of ones: the ratio counts real pixels only.
                        let mut ones = vec![1i64; 2];
                        ones.extend_from_slice(&x.size()[2..]);
                        let mask = Tensor::f_ones(&ones, (x.kind(), x.device()))?;
                        sum.f_div(&avg(&mask.f_constant_pad_nd(&tp)?, &zeros, true)?)?
                    }
                }
            }
            Op::GlobalAveragePool | Op::GlobalMaxPool => {
                let x = x()?;
                ensure!(
                    x.dim() >= 3,
                    "input {:?} has no spatial dimensions",
                    x.size()
                );
                let dims: Vec<i64> = (2..x.dim() as i64).collect();
                if matches!(self, Op::GlobalAveragePool) {
                    x.f_mean_dim(dims.as_slice(), true, x.kind())?
                } else {
                    x.f_amax(dims.as_slice(), true)?
                }
            }
            Op::Flatten { axis } => {
                let x = x()?;
                let size = x.size();
                let r = size.len() as i64;
                ensure!(
                    (-r..=r).contains(axis),
                    "axis {axis} is out of range for rank {r}"
                );
                let axis = if *axis < 0 { axis + r } else { *axis } as usize;
                let outer: i64 = size[..axis].iter().product();
                let inner: i64 = size[axis..].iter().product();
                x.f_reshape([outer, inner])?
            }
            Op::Reshape {
                allowzero,
                batch_rewrite,
            } => {
                let x = x()?;
                let mut shape = to_vec_i64(input(inp, 1)?)?;
                if *batch_rewrite && shape.first() == Some(&1) && x.dim() > 0 {
                    shape[0] = x.size()[0];
                }
                if !allowzero {
                    for (i, s) in shape.iter_mut().enumerate() {
                        if *s == 0 {
                            *s = *x.size().get(i).ok_or_else(|| {
                                anyhow!(
                                    "shape entry {i} is 0 (copy) but the input has rank {}",
                                    x.dim()
                                )
                            })?;
                        }
                    }
                }
                x.f_reshape(&shape)?
            }
            Op::Transpose { perm } => {
                let x = x()?;
                let perm = perm
                    .clone()
                    .unwrap_or_else(|| (0..x.dim() as i64).rev().collect());
                x.f_permute(&perm)?
            }
            Op::Concat { axis } => {
                let ts: Vec<&Tensor> = inp.iter().flatten().copied().collect();
                let device = ts
                    .iter()
                    .map(|t| t.device())
                    .find(|d| *d != Device::Cpu)
                    .unwrap_or(Device::Cpu);
                let ts = ts
                    .iter()
                    .map(|t| t.f_to_device(device))
                    .collect::<Result<Vec<_>, _>>()?;
                let rank = ts.first().map_or(0, |t| t.dim());
                Tensor::f_cat(&ts, norm_axis(*axis, rank, "axis")? as i64)?
            }
            Op::Pad { mode, legacy } => pad(x()?, inp, *mode, legacy.as_ref())?,
            Op::Constant(t) => t.shallow_clone(),
            Op::Identity => x()?.shallow_clone(),
            Op::Dropout => {
                if let Some(training) = opt_input(inp, 2) {
                    ensure!(
                        !training.f_is_nonzero()?,
                        "training_mode=true is not supported (inference only)"
                    );
                }
                x()?.shallow_clone()
            }
            Op::Clip { legacy } => {
                let x = x()?;
                match legacy {
                    Some((min, max)) => x.f_clamp(*min, *max)?,
                    None => {
                        let on = |i| -> Result<Option<Tensor>> {
                            Ok(match opt_input(inp, i) {
                                Some(t) => Some(t.f_to_device(x.device())?),
                                None => None,
                            })
                        };
                        let (min, max) = (on(1)?, on(2)?);
                        if min.is_none() && max.is_none() {
                            x.shallow_clone()
                        } else {
                            x.f_clamp_tensor(min, max)?
                        }
                    }
                }
            }
            Op::Gather { axis } => {
                let (data, idx) = (x()?, input(inp, 1)?);
                let axis = norm_axis(*axis, data.dim(), "axis")?;
                let n = data.size()[axis];
                let idx = idx.f_to_kind(Kind::Int64)?.f_to_device(data.device())?;
                let idx = idx.f_where_self(&idx.f_ge(0)?, &idx.f_add_scalar(n)?)?;
                let mut shape = data.size()[..axis].to_vec();
                shape.extend(idx.size());
                shape.extend_from_slice(&data.size()[axis + 1..]);
                data.f_index_select(axis as i64, &idx.f_reshape([-1])?)?
                    .f_reshape(&shape)?
            }
            Op::Shape { start, end } => {
                let size = x()?.size();
                let r = size.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let (s, e) = (clampi(*start), clampi(end.unwrap_or(r)));
                Tensor::from_slice(&size[s..e.max(s)])
            }
            Op::Unsqueeze { axes } => {
                let mut x = x()?.shallow_clone();
                let axes = match axes {
                    Some(a) => a.clone(),
                    None => to_vec_i64(input(inp, 1)?)?,
                };
                let out_rank = x.dim() + axes.len();
                let mut axes = axes
                    .iter()
                    .map(|a| norm_axis(*a, out_rank, "axes"))
                    .collect::<Result<Vec<_>>>()?;
                axes.sort_unstable();
                for a in axes {
                    x = x.f_unsqueeze(a as i64)?;
                }
                x
            }
            Op::Squeeze { axes } => {
                let x = x()?;
                let axes = match (axes, opt_input(inp, 1)) {
                    (Some(a), _) => a.clone(),
                    (None, Some(t)) => to_vec_i64(t)?,
                    (None, None) => return Ok(x.f_squeeze()?),
                };
                let mut axes = axes
                    .iter()
                    .map(|a| norm_axis(*a, x.dim(), "axes"))
                    .collect::<Result<Vec<_>>>()?;
                axes.sort_unstable_by(|a, b| b.cmp(a));
                let mut y = x.shallow_clone();
                for a in axes {
                    ensure!(
                        x.size()[a] == 1,
                        "cannot squeeze axis {a} of shape {:?}",
                        x.size()
                    );
                    y = y.f_squeeze_dim(a as i64)?;
                }
                y
            }
            Op::Cast(kind) => x()?.f_to_kind(*kind)?,
        })
    }
}

impl Pool {
    /// Strides and dilations with their defaults, after checking the input's rank.
    fn strides_dilations(&self, x: &Tensor) -> Result<(Vec<i64>, Vec<i64>)> {
        let k = self.kernel.len();
        ensure!(
            x.dim() == k + 2,
            "input {:?} does not match kernel_shape {:?}",
            x.size(),
            self.kernel
        );
        Ok((
            self.strides.clone().unwrap_or_else(|| vec![1; k]),
            self.dilations.clone().unwrap_or_else(|| vec![1; k]),
        ))
    }
}

impl Padding {
    /// ONNX leaves SAME padding with dilations ambiguous (onnxruntime refuses it): so do we.
    fn check_dilations(&self, dilations: Option<&[i64]>) -> Result<()> {
        let dilated = dilations.is_some_and(|d| d.iter().any(|d| *d != 1));
        ensure!(
            !(dilated && matches!(self.auto, AutoPad::SameUpper | AutoPad::SameLower)),
            "auto_pad SAME_UPPER/SAME_LOWER with dilations is not supported"
        );
        Ok(())
    }

    /// Begin and end pads of every spatial dimension of `x`.
    fn resolve(
        &self,
        x: &Tensor,
        kernel: &[i64],
        strides: &[i64],
        dil: &[i64],
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        let k = kernel.len();
        ensure!(
            strides.len() == k && dil.len() == k,
            "strides {strides:?} / dilations {dil:?} do not match kernel {kernel:?}"
        );
        let size = x.size();
        let spatial = &size[size.len().saturating_sub(k)..];
        Ok(match self.auto {
            AutoPad::NotSet => match &self.pads {
                Some(p) => {
                    ensure!(
                        p.len() == 2 * k,
                        "pads {p:?} do not match kernel {kernel:?}"
                    );
                    (p[..k].to_vec(), p[k..].to_vec())
                }
                None => (vec![0; k], vec![0; k]),
            },
            AutoPad::Valid => (vec![0; k], vec![0; k]),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let mut b = Vec::with_capacity(k);
                let mut e = Vec::with_capacity(k);
                for i in 0..k {
                    let out = (spatial[i] + strides[i] - 1) / strides[i];
                    let need = (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i];
                    let total = need.max(0);
                    let (small, big) = (total / 2, total - total / 2);
                    if self.auto == AutoPad::SameUpper {
                        b.push(small);
                        e.push(big);
                    } else {
                        b.push(big);
                        e.push(small);
                    }
                }
                (b, e)
            }
        })
    }

    /// The input and the symmetric padding to hand to libtorch: pads that libtorch cannot
    /// express (asymmetric, or more than half the window) are applied first with `pad_fn`.
    fn apply(
        &self,
        x: &Tensor,
        kernel: &[i64],
        strides: &[i64],
        dil: &[i64],
        pad_fn: impl Fn(&Tensor, &[i64]) -> Result<Tensor, tch::TchError>,
    ) -> Result<(Tensor, Vec<i64>)> {
        let (begin, end) = self.resolve(x, kernel, strides, dil)?;
        if begin == end && fits_torch_padding(&begin, kernel) {
            Ok((x.shallow_clone(), begin))
        } else {
            Ok((pad_fn(x, &torch_pads(&begin, &end))?, vec![0; kernel.len()]))
        }
    }
}

/// libtorch pools accept a padding of at most half the kernel.
fn fits_torch_padding(pads: &[i64], kernel: &[i64]) -> bool {
    pads.iter().zip(kernel).all(|(p, k)| 2 * p <= *k)
}

/// ONNX pads (begins, then ends; first dimension first) in libtorch's order (last dimension
/// first, begin and end pairs).
fn torch_pads(begin: &[i64], end: &[i64]) -> Vec<i64> {
    begin
        .iter()
        .zip(end)
        .rev()
        .flat_map(|(b, e)| [*b, *e])
        .collect()
}

fn pad(
    x: &Tensor,
    inp: &[Option<&Tensor>],
    mode: PadMode,
    legacy: Option<&(Vec<i64>, f64)>,
) -> Result<Tensor> {
    let r = x.dim();
    let (mut pads, value) = match legacy {
        Some((p, v)) => (p.clone(), *v),
        None => (
            to_vec_i64(input(inp, 1)?)?,
            match opt_input(inp, 2) {
                Some(v) => v.f_double_value(&[])?,
                None => 0.0,
            },
        ),
    };
    if let Some(axes) = opt_input(inp, 3) {
        let axes = to_vec_i64(axes)?;
        ensure!(
            pads.len() == 2 * axes.len(),
            "pads {pads:?} do not match axes {axes:?}"
        );
        let mut full = vec![0; 2 * r];
        for (j, a) in axes.iter().enumerate() {
            let a = norm_axis(*a, r, "axes")?;
            full[a] = pads[j];
            full[a + r] = pads[j + axes.len()];
        }
        pads = full;
    }
    ensure!(
        pads.len() == 2 * r,
        "pads {pads:?} do not match an input of rank {r}"
    );
    let mut tp = torch_pads(&pads[..r], &pads[r..]);
    // libtorch's reflect/replicate only pad trailing dimensions: drop the leading zero pairs.
    while tp.len() >= 2 && tp[tp.len() - 2..] == [0, 0] {
        tp.truncate(tp.len() - 2);
    }
    if tp.is_empty() {
        return Ok(x.shallow_clone());
    }
    Ok(match mode {
        PadMode::Constant => x.f_pad(&tp, "constant", value)?,
        PadMode::Reflect => x.f_pad(&tp, "reflect", None)?,
        PadMode::Edge => x.f_pad(&tp, "replicate", None)?,
    })
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
