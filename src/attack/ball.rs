//! Projections onto norm balls: FMN's and PGD's ε-ball, the `shrink` polish's shrinking ball and
//! training's PGD.

use tch::{Kind, Tensor};

use super::toolkit::per_sample;
use crate::norm::Norm;

/// Projects each row of `delta` onto the `norm` ball of radius `eps` (`[B]`).
pub fn project_ball(norm: Norm, delta: &Tensor, eps: &Tensor) -> Tensor {
    let eps = eps.to_kind(delta.kind());
    match norm {
        Norm::Linf => {
            let e = per_sample(&eps, delta);
            delta.maximum(&(-&e)).minimum(&e)
        }
        Norm::L2 => {
            let n = norm.batch_norm(delta).clamp_min(1e-12);
            let scale = (eps / n).clamp_max(1.0);
            delta * per_sample(&scale, delta)
        }
        Norm::L1 => project_l1(delta, &eps),
    }
}

/// Euclidean projection onto the L1 ball (Duchi et al. 2008): soft-threshold at the level θ
/// that makes the L1 norm equal ε, for rows outside the ball.
fn project_l1(delta: &Tensor, eps: &Tensor) -> Tensor {
    let flat = delta.flatten(1, -1);
    let d = flat.size()[1];
    let abs = flat.abs();
    let (sorted, _) = abs.sort(1, true);
    let cums = sorted.cumsum(1, sorted.kind());
    let ks = Tensor::arange_start(1, d + 1, (sorted.kind(), delta.device())).unsqueeze(0);
    let e = eps.unsqueeze(1);
    // Largest k with sorted_k > (cumsum_k - eps) / k.
    let cond = sorted.gt_tensor(&((&cums - &e) / &ks));
    let k = cond
        .to_kind(Kind::Int64)
        .sum_dim_intlist([1].as_slice(), true, Kind::Int64)
        .clamp_min(1);
    let theta = ((cums.gather(1, &(&k - 1), false) - &e) / k.to_kind(sorted.kind())).clamp_min(0.0);
    let inside = abs
        .sum_dim_intlist([1].as_slice(), true, sorted.kind())
        .le_tensor(&e);
    let theta = theta.where_self(&inside.logical_not(), &theta.zeros_like());
    let shrunk = flat.sign() * (abs - theta).clamp_min(0.0);
    shrunk.view_as(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn balls_project_onto_their_norm() {
        let d = t(&[3.0, -4.0, 0.0, 0.1, 0.1, 0.1], &[2, 3]);
        let e = t(&[1.0, 1.0], &[2]);
        let l2 = project_ball(Norm::L2, &d, &e);
        let n = Vec::<f64>::try_from(Norm::L2.batch_norm(&l2)).unwrap();
        assert!((n[0] - 1.0).abs() < 1e-12 && (n[1] - 0.3f64.sqrt() * 0.1f64.sqrt()).abs() < 1e-12);
        let l1 = Vec::<f64>::try_from(project_ball(Norm::L1, &d, &e).flatten(0, -1)).unwrap();
        // soft threshold at θ = 3: (0, -1, 0); the second row is inside.
        assert_eq!(l1, vec![0.0, -1.0, 0.0, 0.1, 0.1, 0.1]);
        let li = Vec::<f64>::try_from(
            project_ball(Norm::Linf, &d, &t(&[0.5, 0.05], &[2])).flatten(0, -1),
        )
        .unwrap();
        assert_eq!(li, vec![0.5, -0.5, 0.0, 0.05, 0.05, 0.05]);
    }
}
