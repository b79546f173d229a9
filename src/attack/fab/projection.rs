//! FAB's projection: the minimal-norm step onto a linearised decision boundary (a hyperplane)
//! that keeps the point inside the pixel box `[0, 1]`.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::norm::Norm;

/// Minimal-`norm` step `d` with `<w, d> = c` and `0 <= p + d <= 1`, per row.
///
/// The solution has the form `d_i = clamp(λ v_i, lo_i, hi_i)` with `v = s w` (L2) or
/// `v = s sign(w)` (Linf), `s = sign(c)`, for the smallest `λ >= 0` reaching `|c|`; `<w, d(λ)>`
/// is piecewise linear and increasing in λ, so λ is found exactly by sorting the breakpoints.
/// When the box makes `|c|` unreachable the step saturates every useful coordinate (as FAB does).
/// `p`, `w`: `[B, ...]`; `c`: `[B]`. Computed in the precision of `p` (float32 in the attacks,
/// like AutoAttack's FAB: float64 doubled the cost of this sort-bound step).
pub fn hyperplane_in_box(norm: Norm, p: &Tensor, w: &Tensor, c: &Tensor) -> Result<Tensor> {
    let shape = p.size();
    let kind = p.kind();
    let p = p.flatten(1, -1);
    let w = w.flatten(1, -1).to_kind(kind);
    let c = c.to_kind(kind).unsqueeze(1);
    let s = c.sign();
    let s = s.where_self(&s.ne(0.0), &s.ones_like());
    let u = &w * &s; // move so that <u, d> grows
    let v = match norm {
        Norm::L2 => u.shallow_clone(),
        Norm::Linf => u.sign(),
        Norm::L1 => bail!("FAB's projection supports linf and l2"),
    };
    let target = c.abs();
    // Bound reached by coordinate i when moving along +v_i.
    let bound = (-&p).where_self(&v.lt(0.0), &(1.0 - &p));
    let zero = v.eq(0.0);
    let big = 1e30;
    let bp = (&bound / v.where_self(&zero.logical_not(), &v.ones_like()))
        .clamp_min(0.0)
        .masked_fill(&zero, big);
    let slope = (&u * &v).masked_fill(&zero, 0.0); // d<u,d>/dλ of an unsaturated coordinate
    let sat = (&u * &bound).masked_fill(&zero, 0.0); // its contribution once saturated
    let (bps, order) = bp.sort(1, false);
    let slope_s = slope.gather(1, &order, false);
    let sat_s = sat.gather(1, &order, false);
    // At λ = bps_k: coordinates before k are saturated, k.. are not.
    let sat_before = sat_s.cumsum(1, kind) - &sat_s;
    let slope_from = slope_s.flip([1]).cumsum(1, kind).flip([1]);
    let h = &bps * &slope_from + &sat_before;
    let k = h.lt_tensor(&target).to_kind(Kind::Int64).sum_dim_intlist(
        [1].as_slice(),
        true,
        Kind::Int64,
    );
    let d = bps.size()[1];
    let total_sat = sat_s.sum_dim_intlist([1].as_slice(), true, kind);
    let kk = k.clamp_max(d - 1);
    // Inside segment k: saturated = first k coordinates.
    let sat_k = sat_before.gather(1, &kk, false);
    let slope_k = slope_from.gather(1, &kk, false);
    let lambda = ((&target - sat_k) / slope_k.clamp_min(1e-30)).clamp_min(0.0);
    let unreachable = total_sat.le_tensor(&target).logical_or(&k.ge(d));
    let lambda = lambda.masked_fill(&unreachable, big);
    let step = (&lambda * &v).maximum(&(-&p)).minimum(&(1.0 - &p));
    Ok(step.view(shape.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn l2_hyperplane_without_active_box_is_the_orthogonal_projection() {
        let p = t(&[0.5, 0.5, 0.5], &[1, 3]);
        let w = t(&[1.0, 2.0, -2.0], &[1, 3]);
        let c = t(&[0.09], &[1]);
        let d = hyperplane_in_box(Norm::L2, &p, &w, &c).unwrap();
        let want = [0.01, 0.02, -0.02];
        for (a, b) in Vec::<f64>::try_from(d.flatten(0, -1))
            .unwrap()
            .iter()
            .zip(want)
        {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn linf_hyperplane_moves_every_coordinate_by_the_same_amount_then_saturates() {
        // <w, d> = 1 with |d_i| <= t: t = 1 / ||w||_1 = 0.25 unconstrained; the first coordinate
        // can only move 0.1, so the others must cover the rest: 0.1 + 3 t = 1 -> t = 0.3.
        let p = t(&[0.9, 0.5, 0.5], &[1, 3]);
        let w = t(&[1.0, 1.0, 2.0], &[1, 3]);
        let d = hyperplane_in_box(Norm::Linf, &p, &w, &t(&[1.0], &[1])).unwrap();
        let got = Vec::<f64>::try_from(d.flatten(0, -1)).unwrap();
        assert!(
            (got[0] - 0.1).abs() < 1e-9
                && (got[1] - 0.3).abs() < 1e-9
                && (got[2] - 0.3).abs() < 1e-9,
            "{got:?}"
        );
        // Negative c moves the other way; an unreachable c saturates.
        let d = hyperplane_in_box(Norm::Linf, &p, &w, &t(&[-10.0], &[1])).unwrap();
        let got = Vec::<f64>::try_from(d.flatten(0, -1)).unwrap();
        assert!(
            (got[0] + 0.9).abs() < 1e-9 && (got[2] + 0.5).abs() < 1e-9,
            "{got:?}"
        );
    }
}
