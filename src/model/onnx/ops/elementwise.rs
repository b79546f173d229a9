//! Arithmetic, activations, Softmax, Clip, Cast and the inference no-ops (Identity, Dropout).

use anyhow::{anyhow, bail, ensure, Result};
use tch::{Kind, Tensor};

use super::{
    arity, first_computed_only, input, norm_axis, opt_input, same_device, LinearRole, NodeInfo,
    Operator, Relaxed,
};
use crate::certify::Layer;
use crate::model::onnx::proto::Attrs;

/// `Add`, `Sub`, `Mul`, `Div` with numpy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub(super) fn parse(self, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 2, 2)?;
        Ok(self)
    }
}

impl Operator for BinaryOp {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let (a, b) = same_device(input(inp, 0)?, input(inp, 1)?)?;
        Ok(match self {
            BinaryOp::Add => a.f_add(&b)?,
            BinaryOp::Sub => a.f_sub(&b)?,
            BinaryOp::Mul => a.f_mul(&b)?,
            // ONNX integer division truncates; tch would return floats
            BinaryOp::Div if !a.is_floating_point() && !b.is_floating_point() => {
                a.f_divide_tensor_mode(&b, "trunc")?
            }
            BinaryOp::Div => a.f_div(&b)?,
        })
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        let one = |c: &Tensor| c.f_ones_like();
        let zero = |c: &Tensor| c.f_zeros_like();
        Ok(match (computed, self) {
            ([true, true], BinaryOp::Add) => Relaxed::Layer(Layer::Add),
            ([true, true], _) => bail!("{self:?} of two computed values has no relaxation"),
            ([true, false], op) => {
                let c = input(ins, 1)?.f_to_kind(Kind::Float)?;
                match op {
                    BinaryOp::Add => Relaxed::Affine(one(&c)?, c),
                    BinaryOp::Sub => Relaxed::Affine(one(&c)?, c.f_neg()?),
                    BinaryOp::Mul => Relaxed::Affine(c.shallow_clone(), zero(&c)?),
                    BinaryOp::Div => Relaxed::Affine(c.f_reciprocal()?, zero(&c)?),
                }
            }
            ([false, true], op) => {
                let c = input(ins, 0)?.f_to_kind(Kind::Float)?;
                match op {
                    BinaryOp::Add => Relaxed::Affine(one(&c)?, c),
                    BinaryOp::Sub => Relaxed::Affine(one(&c)?.f_neg()?, c),
                    BinaryOp::Mul => Relaxed::Affine(c.shallow_clone(), zero(&c)?),
                    BinaryOp::Div => bail!("division by a computed value has no relaxation"),
                }
            }
            _ => bail!("has no computed input"),
        })
    }

    fn linear_role(&self) -> Option<LinearRole> {
        (*self == BinaryOp::Add).then_some(LinearRole::Add)
    }
}

/// One-input operators without attributes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unary {
    Relu,
    Sigmoid,
    Tanh,
    Identity,
}

impl Unary {
    pub(super) fn parse(self, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        Ok(self)
    }
}

impl Operator for Unary {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        Ok(match self {
            Unary::Relu => x.f_relu()?,
            Unary::Sigmoid => x.f_sigmoid()?,
            Unary::Tanh => x.f_tanh()?,
            Unary::Identity => x.shallow_clone(),
        })
    }

    fn relax(&self, _: &[Option<&Tensor>], _: &[bool]) -> Result<Relaxed> {
        match self {
            Unary::Relu => Ok(Relaxed::Layer(Layer::Relu)),
            Unary::Identity => Ok(Relaxed::Same),
            _ => bail!("{self:?} has no linear relaxation"),
        }
    }
}

/// `LeakyRelu(alpha)`.
#[derive(Debug)]
pub(super) struct LeakyRelu(f64);

impl LeakyRelu {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        Ok(LeakyRelu(a.float("alpha", 0.01)?))
    }
}

impl Operator for LeakyRelu {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        Ok(x.f_where_self(&x.f_gt(0.0)?, &x.f_mul_scalar(self.0)?)?)
    }
}

/// `Softmax`; opsets before 13 flatten to 2-D around `axis` (default 1) before the softmax.
#[derive(Debug)]
pub(super) struct Softmax {
    axis: i64,
    coerce_2d: bool,
}

impl Softmax {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        let legacy = n.opset < 13;
        Ok(Softmax {
            axis: a.int("axis", if legacy { 1 } else { -1 })?,
            coerce_2d: legacy,
        })
    }
}

impl Operator for Softmax {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        let axis = norm_axis(self.axis, x.dim(), "axis")?;
        Ok(if self.coerce_2d {
            let size = x.size();
            let outer: i64 = size[..axis].iter().product();
            x.f_reshape([outer, -1])?
                .f_softmax(1, x.kind())?
                .f_reshape(&size)?
        } else {
            x.f_softmax(axis as i64, x.kind())?
        })
    }
}

/// `Clip`.
#[derive(Debug)]
pub(super) struct Clip {
    /// Min and max from attributes (opset < 11), else optional inputs.
    legacy: Option<(f64, f64)>,
}

impl Clip {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        Ok(if n.opset < 11 {
            arity(n.n_in, 1, 1)?;
            Clip {
                legacy: Some((
                    a.float("min", f64::NEG_INFINITY)?,
                    a.float("max", f64::INFINITY)?,
                )),
            }
        } else {
            arity(n.n_in, 1, 3)?;
            Clip { legacy: None }
        })
    }
}

impl Operator for Clip {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let x = input(inp, 0)?;
        Ok(match self.legacy {
            Some((min, max)) => x.f_clamp(min, max)?,
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
        })
    }
}

/// `Cast` to a float, integer or boolean type.
#[derive(Debug)]
pub(super) struct Cast(Kind);

impl Cast {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 1)?;
        a.ignore("saturate"); // float8 only
        let to = a.opt_int("to")?.ok_or_else(|| anyhow!("to is required"))?;
        Ok(Cast(match to {
            1 => Kind::Float,
            10 => Kind::Half,
            11 => Kind::Double,
            // integers are all int64 here, like integer initializers (see proto.rs)
            2 | 3 | 5 | 6 | 7 => Kind::Int64,
            9 => Kind::Bool,
            other => bail!("Cast to ONNX data type {other} is not supported"),
        }))
    }
}

impl Operator for Cast {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        Ok(input(inp, 0)?.f_to_kind(self.0)?)
    }
}

/// `Dropout` at inference: the identity (training mode is refused).
#[derive(Debug)]
pub(super) struct Dropout;

impl Dropout {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 1, 3)?;
        a.ignore("ratio"); // inference: identity
        a.ignore("seed");
        Ok(Dropout)
    }
}

impl Operator for Dropout {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        if let Some(training) = opt_input(inp, 2) {
            ensure!(
                !training.f_is_nonzero()?,
                "training_mode=true is not supported (inference only)"
            );
        }
        Ok(input(inp, 0)?.shallow_clone())
    }

    fn relax(&self, _: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        Ok(Relaxed::Same)
    }
}
