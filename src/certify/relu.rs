//! The linear relaxations of the activations, as backward steps of CROWN: a lower-bound
//! coefficient matrix `a` `[N, S, *out]` on the activation's output becomes one on its input,
//! plus a constant `[N, S]`.
//!
//! ReLU with input bounds `l < 0 < u` (unstable): upper line `u/(u-l)·(x - l)`, lower line
//! `α·x` with `α ∈ [0, 1]`: CROWN's adaptive choice `α = [u > -l]` (Zhang et al. 2018) or
//! α-CROWN's optimised slopes. Stable neurons are exact (identity or zero).
//!
//! MaxPool over a window with bounds `l_k, u_k`: lower `x_k*` for the window's largest lower
//! bound `k*`; upper `x_k*` too when `l_k* ≥ max_{k≠k*} u_k` (the maximum is decided),
//! otherwise the constant `max_k u_k`.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::ibp::Interval;

/// CROWN's lower slopes of a ReLU: 1 on active neurons, 0 on inactive ones, `[u > -l]` on
/// unstable ones (α-CROWN's starting point).
pub fn adaptive_slopes(bounds: &Interval) -> Result<Tensor> {
    let (l, u) = (&bounds.lower, &bounds.upper);
    Ok(u.f_gt_tensor(&l.f_neg()?)?.f_to_kind(Kind::Float)?)
}

/// Whether each neuron is unstable (`l < 0 < u`), as float 0/1.
pub fn unstable(bounds: &Interval) -> Result<Tensor> {
    Ok(bounds
        .lower
        .f_lt(0.0)?
        .f_logical_and(&bounds.upper.f_gt(0.0)?)?
        .f_to_kind(Kind::Float)?)
}

/// Backward step through a ReLU with input bounds `bounds` `[N, *shape]`; `alpha`
/// `[N, S, *shape]` replaces the adaptive lower slopes of the unstable neurons.
pub fn relu_backward(
    a: &Tensor,
    bounds: &Interval,
    alpha: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (l, u) = (&bounds.lower, &bounds.upper);
    let active = l.f_ge(0.0)?.f_to_kind(Kind::Float)?;
    let open = unstable(bounds)?;
    // Upper line: slope u/(u-l), intercept -l·slope on unstable neurons; identity on active ones.
    let width = u.f_sub(l)?.f_clamp_min(1e-12)?;
    let up_slope = u.f_div(&width)?.f_mul(&open)?.f_add(&active)?;
    let up_icpt = l.f_neg()?.f_mul(&up_slope)?.f_mul(&open)?;
    let pos = a.f_clamp_min(0.0)?;
    let neg = a.f_clamp_max(0.0)?;
    let low_slope = match alpha {
        Some(al) => al
            .f_mul(&open.f_unsqueeze(1)?)?
            .f_add(&active.f_unsqueeze(1)?)?,
        None => adaptive_slopes(bounds)?
            .f_mul(&open)?
            .f_add(&active)?
            .f_unsqueeze(1)?,
    };
    let a_in = pos
        .f_mul(&low_slope)?
        .f_add(&neg.f_mul(&up_slope.f_unsqueeze(1)?)?)?;
    let constant = neg
        .f_mul(&up_icpt.f_unsqueeze(1)?)?
        .f_flatten(2, -1)?
        .f_sum_dim_intlist([2].as_slice(), false, Kind::Float)?;
    Ok((a_in, constant))
}

/// `[N, C, H, W]` (cropped to whole windows) as `[N, C, Ho, Wo, kh·kw]`.
fn windows(x: &Tensor, [kh, kw]: [i64; 2]) -> Result<Tensor> {
    let s = x.size();
    let (ho, wo) = (s[s.len() - 2] / kh, s[s.len() - 1] / kw);
    let lead = &s[..s.len() - 2];
    let mut shape = lead.to_vec();
    shape.extend([ho, kh, wo, kw]);
    let r = lead.len() as i64;
    let mut perm: Vec<i64> = (0..r).collect();
    perm.extend([r, r + 2, r + 1, r + 3]);
    let mut out = lead.to_vec();
    out.extend([ho, wo, kh * kw]);
    Ok(x.f_narrow(-2, 0, ho * kh)?
        .f_narrow(-1, 0, wo * kw)?
        .f_reshape(shape.as_slice())?
        .f_permute(perm.as_slice())?
        .f_reshape(out.as_slice())?)
}

/// Backward step through non-overlapping max pooling of kernel `kernel` whose input has
/// bounds `bounds` `[N, C, H, W]`.
pub fn max_pool_backward(
    a: &Tensor,
    bounds: &Interval,
    kernel: [i64; 2],
) -> Result<(Tensor, Tensor)> {
    let lw = windows(&bounds.lower, kernel)?;
    let uw = windows(&bounds.upper, kernel)?;
    let best = lw.f_argmax(-1, true)?;
    let onehot = lw.f_zeros_like()?.f_scatter_value(-1, &best, 1.0)?;
    let l_best = lw.f_gather(-1, &best, false)?.f_squeeze_dim(-1)?;
    // The upper bounds of the other entries (the best one pushed far down).
    let others = uw.f_sub(&onehot.f_mul_scalar(1e30)?)?;
    let decided = l_best
        .f_ge_tensor(&others.f_amax([-1].as_slice(), false)?)?
        .f_to_kind(Kind::Float)?;
    let u_max = uw.f_amax([-1].as_slice(), false)?;
    let pos = a.f_clamp_min(0.0)?;
    let neg = a.f_clamp_max(0.0)?;
    let coef = pos.f_add(&neg.f_mul(&decided.f_unsqueeze(1)?)?)?;
    let undecided = decided.f_neg()?.f_add_scalar(1.0)?;
    let constant = neg
        .f_mul(&undecided.f_mul(&u_max)?.f_unsqueeze(1)?)?
        .f_flatten(2, -1)?
        .f_sum_dim_intlist([2].as_slice(), false, Kind::Float)?;
    // [N, S, C, Ho, Wo, k] back to [N, S, C, H, W].
    let per_window = coef.f_unsqueeze(-1)?.f_mul(&onehot.f_unsqueeze(1)?)?;
    let s = per_window.size();
    let (n, sp, c, ho, wo) = (s[0], s[1], s[2], s[3], s[4]);
    let (kh, kw) = (kernel[0], kernel[1]);
    let a_in = per_window
        .f_reshape([n, sp, c, ho, wo, kh, kw])?
        .f_permute([0, 1, 2, 3, 5, 4, 6])?
        .f_reshape([n, sp, c, ho * kh, wo * kw])?;
    let (h, w) = {
        let b = bounds.lower.size();
        (b[2], b[3])
    };
    let a_in = a_in.f_constant_pad_nd([0, w - wo * kw, 0, h - ho * kh])?;
    Ok((a_in, constant))
}
