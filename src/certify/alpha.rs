//! α-CROWN (Xu et al. 2021): the lower slopes of the unstable ReLUs in the final bound become
//! variables in `[0, 1]`, one per sample, margin row and neuron, optimised by gradient ascent
//! on the bound (Adam through libtorch's autograd). Starting from CROWN's slopes and keeping
//! each row's best bound, the result is never looser than CROWN. The intermediate bounds stay
//! CROWN's (auto_LiRPA also optimises them; that costs a backward pass per layer and step).

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::ball::Ball;
use super::crown;
use super::graph::{BoundGraph, Layer};
use super::ibp::Interval;
use super::relu;

/// Optimisation steps and Adam's step size (auto_LiRPA's defaults for the final layer).
pub const STEPS: usize = 20;
const LR: f64 = 0.5;
const DECAY: f64 = 0.98;

/// Lower bounds `[N, S]` of `c · logits` over `ball` with optimised slopes; `intervals` are
/// CROWN's ([`crown::intervals`]).
pub fn spec_lower_bound(
    graph: &BoundGraph,
    intervals: &[Interval],
    c: &Tensor,
    ball: &Ball,
    steps: usize,
) -> Result<Tensor> {
    let s = c.size();
    let (n, rows) = (s[0], s[1]);
    let mut alphas: Vec<Option<Tensor>> = Vec::with_capacity(graph.nodes().len());
    for node in graph.nodes() {
        alphas.push(match node.layer {
            Layer::Relu => {
                let b = &intervals[node.inputs[0]];
                let mut full = vec![n, rows];
                full.extend(&node.shape);
                Some(
                    relu::adaptive_slopes(b)?
                        .f_unsqueeze(1)?
                        .f_expand(full.as_slice(), false)?
                        .f_contiguous()?,
                )
            }
            _ => None,
        });
    }
    let bound = |alphas: &[Option<Tensor>]| {
        crown::backward(
            graph,
            intervals,
            Some(alphas),
            graph.output(),
            c.shallow_clone(),
            ball,
        )
    };
    let mut best = tch::no_grad(|| bound(&alphas))?;
    let mut adam: Vec<(Tensor, Tensor)> = alphas
        .iter()
        .flatten()
        .map(|a| (a.zeros_like(), a.zeros_like()))
        .collect();
    let (b1, b2) = (0.9f64, 0.999f64);
    let mut lr = LR;
    for t in 1..=steps {
        let vars: Vec<Tensor> = alphas
            .iter()
            .flatten()
            .map(|a| a.detach().set_requires_grad(true))
            .collect();
        let mut it = vars.iter();
        let with_vars: Vec<Option<Tensor>> = alphas
            .iter()
            .map(|a| {
                a.as_ref()
                    .and_then(|_| it.next().map(Tensor::shallow_clone))
            })
            .collect();
        let lb = bound(&with_vars).context("α-CROWN step")?;
        best = best.f_max_other(&lb.detach())?;
        if vars.is_empty() {
            break;
        }
        let loss = lb.f_sum(Kind::Float)?.f_neg()?;
        let grads = Tensor::f_run_backward(&[loss], &vars, false, false)?;
        let mut updated = Vec::with_capacity(vars.len());
        tch::no_grad(|| -> Result<()> {
            for ((v, g), (m, s2)) in vars.iter().zip(&grads).zip(adam.iter_mut()) {
                *m = m.f_mul_scalar(b1)?.f_add(&g.f_mul_scalar(1.0 - b1)?)?;
                *s2 = s2
                    .f_mul_scalar(b2)?
                    .f_add(&g.f_square()?.f_mul_scalar(1.0 - b2)?)?;
                let mh = m.f_div_scalar(1.0 - b1.powi(t as i32))?;
                let vh = s2.f_div_scalar(1.0 - b2.powi(t as i32))?;
                let step = mh
                    .f_div(&vh.f_sqrt()?.f_add_scalar(1e-8)?)?
                    .f_mul_scalar(lr)?;
                updated.push(v.detach().f_sub(&step)?.f_clamp(0.0, 1.0)?);
            }
            Ok(())
        })?;
        let mut it = updated.into_iter();
        for a in alphas.iter_mut().filter(|a| a.is_some()) {
            *a = it.next();
        }
        lr *= DECAY;
    }
    // The last update's bound.
    let last = tch::no_grad(|| bound(&alphas))?;
    Ok(best.f_max_other(&last)?)
}
