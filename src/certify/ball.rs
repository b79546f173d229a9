//! The input region: an L∞ or L2 ball of radius ε (one per sample) around the image,
//! intersected with the pixel box `[0, 1]`, and the concretisation of linear bounds over it.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::ibp::Interval;
use crate::norm::Norm;
use crate::util::OptionError;

/// `{x : ‖x - center‖ ≤ ε} ∩ [0, 1]^d` per sample.
pub struct Ball {
    center: Tensor,
    /// `[N]`
    eps: Tensor,
    norm: Norm,
    /// The smallest box around the region (for L∞ the region itself).
    bounds: Interval,
}

impl Ball {
    /// The ball of radius `eps[n]` around `center[n]` `[N, C, H, W]`; L∞ or L2.
    pub fn new(center: &Tensor, eps: &Tensor, norm: Norm) -> Result<Ball> {
        if norm == Norm::L1 {
            return Err(OptionError::new(
                "norm",
                "certification bounds the L∞ and L2 balls only (no L1 relaxation)",
            )
            .into());
        }
        let center = center.f_to_kind(Kind::Float)?;
        let eps = eps.f_to_kind(Kind::Float)?.f_to_device(center.device())?;
        let mut view = vec![-1i64];
        view.extend(std::iter::repeat_n(1, center.dim() - 1));
        let e = eps.f_view(view.as_slice())?;
        let bounds = Interval {
            lower: center.f_sub(&e)?.f_clamp(0.0, 1.0)?,
            upper: center.f_add(&e)?.f_clamp(0.0, 1.0)?,
        };
        Ok(Ball {
            center,
            eps,
            norm,
            bounds,
        })
    }

    /// Sample `i` alone.
    pub fn narrow(&self, i: i64) -> Result<Ball> {
        Ok(Ball {
            center: self.center.f_narrow(0, i, 1)?,
            eps: self.eps.f_narrow(0, i, 1)?,
            norm: self.norm,
            bounds: Interval {
                lower: self.bounds.lower.f_narrow(0, i, 1)?,
                upper: self.bounds.upper.f_narrow(0, i, 1)?,
            },
        })
    }

    /// The region seen through `view`, a map of a sample's `[1, C, H, W]` values to `[R, ...]`
    /// (one sample's ball, windows of it): `R` regions of the same radius.
    pub fn viewed(&self, view: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Ball> {
        let center = view(&self.center)?;
        let r = center.size()[0];
        Ok(Ball {
            eps: self.eps.f_expand([r], false)?,
            center,
            norm: self.norm,
            bounds: Interval {
                lower: view(&self.bounds.lower)?,
                upper: view(&self.bounds.upper)?,
            },
        })
    }

    /// Whether the region is its box (L∞).
    pub fn is_box(&self) -> bool {
        self.norm == Norm::Linf
    }

    /// The box `[max(x - ε, 0), min(x + ε, 1)]` (sound for both norms: the L2 ball lies in it).
    pub fn interval(&self) -> &Interval {
        &self.bounds
    }

    /// Lower bounds `[N, S]` of `a[n, s] · x` over the region, for `a` `[N, S, C, H, W]`:
    /// over the box and, for L2, the better of that and the ball's `a·x₀ - ε‖a‖₂`.
    pub fn lower_bound(&self, a: &Tensor) -> Result<Tensor> {
        let flat = a.f_flatten(2, -1)?;
        let on_box = self.bounds.lower_bound_of(&flat)?;
        match self.norm {
            Norm::L2 => {
                let c = self.center.f_flatten(1, -1)?.f_unsqueeze(2)?;
                let at_center = flat.f_matmul(&c)?.f_squeeze_dim(2)?;
                let spread = flat
                    .f_norm_scalaropt_dim(2.0, [2].as_slice(), false)?
                    .f_mul(&self.eps.f_unsqueeze(1)?)?;
                Ok(on_box.f_max_other(&at_center.f_sub(&spread)?)?)
            }
            _ => Ok(on_box),
        }
    }
}
