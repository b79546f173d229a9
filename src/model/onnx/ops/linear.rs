//! `Gemm` and `MatMul`, the operators a last linear layer is read off.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use super::{
    arity, first_computed_only, input, opt_input, same_device, NodeInfo, Operator, Relaxed,
};
use crate::certify::Layer;
use crate::model::onnx::proto::Attrs;

/// The part a node can play in `logits = features W^T + b` (see `Graph::head`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(in crate::model::onnx) enum LinearRole {
    Gemm {
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    /// An `Add` (of a MatMul and a bias).
    Add,
}

/// `Gemm`: `alpha A' B' + beta C`, `'` as `transA`/`transB` ask.
#[derive(Debug)]
pub(super) struct Gemm {
    alpha: f64,
    beta: f64,
    trans_a: bool,
    trans_b: bool,
}

impl Gemm {
    pub(super) fn parse(a: &mut Attrs, n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 2, 3)?;
        Ok(Gemm {
            alpha: a.float("alpha", 1.0)?,
            beta: a.float("beta", 1.0)?,
            trans_a: a.int("transA", 0)? != 0,
            trans_b: a.int("transB", 0)? != 0,
        })
    }
}

impl Operator for Gemm {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let (a, b) = (input(inp, 0)?, input(inp, 1)?);
        ensure!(
            a.dim() == 2 && b.dim() == 2,
            "Gemm needs 2-D inputs, got {:?} and {:?}",
            a.size(),
            b.size()
        );
        let a = if self.trans_a {
            a.f_transpose(0, 1)?
        } else {
            a.shallow_clone()
        };
        let b = if self.trans_b {
            b.f_transpose(0, 1)?
        } else {
            b.shallow_clone()
        };
        let mut y = a.f_matmul(&b)?;
        if self.alpha != 1.0 {
            y = y.f_mul_scalar(self.alpha)?;
        }
        Ok(match opt_input(inp, 2) {
            Some(c) if self.beta == 1.0 => y.f_add(c)?,
            Some(c) => y.f_add(&c.f_mul_scalar(self.beta)?)?,
            None => y,
        })
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        ensure!(!self.trans_a, "transA=1 has no relaxation");
        let b = input(ins, 1)?.f_to_kind(Kind::Float)?;
        ensure!(b.dim() == 2, "weight of shape {:?} is not 2-D", b.size());
        let w = if self.trans_b {
            b
        } else {
            b.f_transpose(0, 1)?
        };
        let out = w.size()[0];
        let bias = match opt_input(ins, 2) {
            Some(c) => c
                .f_to_kind(Kind::Float)?
                .f_mul_scalar(self.beta)?
                .f_broadcast_to([out])?
                .f_contiguous()?,
            None => Tensor::f_zeros([out], (Kind::Float, w.device()))?,
        };
        Ok(Relaxed::Layer(Layer::Linear {
            weight: w.f_mul_scalar(self.alpha)?.f_contiguous()?,
            bias,
        }))
    }

    fn linear_role(&self) -> Option<LinearRole> {
        Some(LinearRole::Gemm {
            alpha: self.alpha,
            beta: self.beta,
            trans_a: self.trans_a,
            trans_b: self.trans_b,
        })
    }
}

/// `MatMul`, with numpy broadcasting.
#[derive(Debug)]
pub(super) struct MatMul;

impl MatMul {
    pub(super) fn parse(n: &NodeInfo) -> Result<Self> {
        arity(n.n_in, 2, 2)?;
        Ok(MatMul)
    }
}

impl Operator for MatMul {
    fn run(&self, inp: &[Option<&Tensor>]) -> Result<Tensor> {
        let (a, b) = same_device(input(inp, 0)?, input(inp, 1)?)?;
        Ok(a.f_matmul(&b)?)
    }

    fn relax(&self, ins: &[Option<&Tensor>], computed: &[bool]) -> Result<Relaxed> {
        first_computed_only(computed)?;
        let w = input(ins, 1)?.f_to_kind(Kind::Float)?;
        ensure!(w.dim() == 2, "weight of shape {:?} is not 2-D", w.size());
        let out = w.size()[1];
        Ok(Relaxed::Layer(Layer::Linear {
            weight: w.f_transpose(0, 1)?.f_contiguous()?,
            bias: Tensor::f_zeros([out], (Kind::Float, w.device()))?,
        }))
    }

    fn linear_role(&self) -> Option<LinearRole> {
        Some(LinearRole::MatMul)
    }
}
