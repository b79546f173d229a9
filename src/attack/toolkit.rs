//! The per-sample tensor arithmetic every attack shares, one home each: broadcasting a `[B]`
//! vector, norms in float64, unit and ascent directions, the normalised L2 step, the box clip,
//! the worst-case radius and the cosine schedule. Rows are samples throughout.

use tch::{Kind, Tensor};

use crate::norm::Norm;

/// `[B]` reshaped to broadcast against `[B, C, H, W]`.
pub fn per_sample(v: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, like.dim() - 1));
    v.view(shape.as_slice())
}

/// Per-sample norm as float64 `[B]`.
pub fn norm64(norm: Norm, delta: &Tensor) -> Tensor {
    match norm {
        // A maximum is exact in any precision: skip the float64 copy of the whole batch.
        Norm::Linf => norm.batch_norm(delta).to_kind(Kind::Double),
        _ => norm.batch_norm(&delta.to_kind(Kind::Double)),
    }
}

/// Each row of `t` scaled to unit `norm` (rows of zero norm stay zero), in `t`'s precision.
pub fn unit(norm: Norm, t: &Tensor) -> Tensor {
    t / per_sample(&norm.batch_norm(t).clamp_min(1e-12), t)
}

/// The unit ascent step of `norm` along `grad` (per sample): the gradient's sign in L∞, the
/// gradient scaled to unit norm otherwise. PGD, the `shrink` polish and training's PGD step
/// along it.
pub fn ascent_direction(norm: Norm, grad: &Tensor) -> Tensor {
    match norm {
        Norm::Linf => grad.sign(),
        _ => unit(norm, grad),
    }
}

/// `delta + α · grad / ‖grad‖₂` per sample, `α` `[B]`: FMN's and DDN's step (in every norm).
/// Unlike [`unit`] the scale `α / ‖grad‖₂` is computed in float64, as those attacks were tuned.
pub fn l2_step(delta: &Tensor, grad: &Tensor, alpha: &Tensor) -> Tensor {
    let g2 = norm64(Norm::L2, grad).clamp_min(1e-12);
    delta + per_sample(&(alpha / g2), grad).to_kind(grad.kind()) * grad
}

/// The perturbation `delta` cut so that `x0 + delta` stays in the pixel box `[0, 1]`.
pub fn box_clip(x0: &Tensor, delta: &Tensor) -> Tensor {
    (x0 + delta).clamp(0.0, 1.0) - x0
}

/// The largest `norm` distance from `x0` to any point of the box `[0, 1]` (float64 `[B]`): no
/// adversarial perturbation can be longer, so ε never needs to grow past it.
pub fn worst_case_radius(norm: Norm, x0: &Tensor) -> Tensor {
    norm64(norm, &x0.maximum(&(1.0 - x0)))
}

/// Cosine annealing from `start` (step 0) to `end` (step `steps`), per sample.
pub fn cosine(step: &Tensor, steps: usize, start: f64, end: f64) -> Tensor {
    let c = ((step * (std::f64::consts::PI / steps.max(1) as f64)).cos() + 1.0) * 0.5;
    c * (start - end) + end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn box_clip_keeps_the_point_in_the_box() {
        let x0 = t(&[0.1, 0.9, 0.5], &[1, 3]);
        let d = box_clip(&x0, &t(&[-0.3, 0.3, 0.2], &[1, 3]));
        let got = Vec::<f64>::try_from(d.flatten(0, -1)).unwrap();
        let want = [-0.1, 0.1, 0.2];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn worst_case_radius_reaches_the_farthest_corner() {
        let x0 = t(&[0.25, 0.5, 1.0, 0.0], &[1, 4]);
        let r = |n| worst_case_radius(n, &x0).double_value(&[0]);
        assert_eq!(r(Norm::Linf), 1.0);
        assert_eq!(r(Norm::L1), 0.75 + 0.5 + 1.0 + 1.0);
        assert!((r(Norm::L2) - (0.5625f64 + 0.25 + 1.0 + 1.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn l2_step_moves_alpha_along_the_gradient() {
        let delta = t(&[1.0, 1.0, 0.0, 0.0], &[2, 2]);
        let grad = t(&[3.0, 4.0, 0.0, 0.0], &[2, 2]);
        let s = l2_step(&delta, &grad, &t(&[0.5, 2.0], &[2]));
        // Row 0 moves 0.5 along (0.6, 0.8); a zero gradient does not move row 1.
        let got = Vec::<f64>::try_from(s.flatten(0, -1)).unwrap();
        for (a, b) in got.iter().zip([1.3, 1.4, 0.0, 0.0]) {
            assert!((a - b).abs() < 1e-12, "{got:?}");
        }
    }
}
