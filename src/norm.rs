//! The perturbation norms brittle measures distances in.

use std::fmt;
use std::str::FromStr;

use tch::{Kind, Tensor};

/// A vector norm on the input space (attacks, margins) and its dual on the feature space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    Linf,
    L2,
    L1,
}

impl Norm {
    /// Per-sample norm of a batch `[N, ...]`, as `[N]` tensor of the input's float kind.
    pub fn batch_norm(self, delta: &Tensor) -> Tensor {
        let flat = delta.flatten(1, -1);
        let kind = if flat.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        match self {
            Norm::Linf => flat.abs().amax([1].as_slice(), false),
            Norm::L2 => flat
                .square()
                .sum_dim_intlist([1].as_slice(), false, kind)
                .sqrt(),
            Norm::L1 => flat.abs().sum_dim_intlist([1].as_slice(), false, kind),
        }
    }

    /// The dual norm (Hölder conjugate): the norm that turns a weight difference into a distance.
    pub fn dual(self) -> Norm {
        match self {
            Norm::Linf => Norm::L1,
            Norm::L2 => Norm::L2,
            Norm::L1 => Norm::Linf,
        }
    }

    /// The name in messages: `L∞`, `L2`, `L1`.
    pub fn symbol(self) -> &'static str {
        match self {
            Norm::Linf => "L∞",
            Norm::L2 => "L2",
            Norm::L1 => "L1",
        }
    }

    /// The largest distance between two images of shape `[C, H, W]` in the pixel box `[0, 1]`
    /// (opposite corners): 1 in L∞, `sqrt(C·H·W)` in L2, `C·H·W` in L1.
    pub fn max_distance(self, input_shape: [i64; 3]) -> f64 {
        let d = input_shape
            .iter()
            .map(|&s| s.max(0) as f64)
            .product::<f64>();
        match self {
            Norm::Linf => 1.0,
            Norm::L2 => d.sqrt(),
            Norm::L1 => d,
        }
    }

    /// Refuses an ε outside `(0, largest distance in the [0, 1] box)`: at or beyond the
    /// largest distance every sample is non-robust and every metric degenerates (NaN rates, a
    /// detector calibrated on no robust sample). Most often a pixel-scale value meant as `/255`.
    /// Without `input_shape` only the L∞ bound (1) is known.
    pub fn check_eps(self, eps: f64, input_shape: Option<[i64; 3]>) -> anyhow::Result<()> {
        if !(eps.is_finite() && eps > 0.0) {
            anyhow::bail!("ε = {eps} must be a positive finite number");
        }
        let max = match (self, input_shape) {
            (Norm::Linf, _) => 1.0,
            (_, Some(shape)) => self.max_distance(shape),
            (_, None) => return Ok(()),
        };
        if eps >= max {
            let hint = if eps / 255.0 < max {
                format!("; did you mean {eps}/255?")
            } else {
                String::new()
            };
            anyhow::bail!(
                "ε = {eps} {} the largest {} distance in the [0,1] box ({max}{}){hint}",
                if eps > max { "exceeds" } else { "is" },
                self.symbol(),
                match input_shape {
                    Some([c, h, w]) if self != Norm::Linf => format!(" for {c}×{h}×{w} inputs"),
                    _ => String::new(),
                }
            );
        }
        Ok(())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
            Norm::L1 => "l1",
        }
    }
}

impl fmt::Display for Norm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Norm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "linf" | "l_inf" | "inf" => Ok(Norm::Linf),
            "l2" => Ok(Norm::L2),
            "l1" => Ok(Norm::L1),
            other => anyhow::bail!("unknown norm {other:?}: expected linf, l2 or l1"),
        }
    }
}

/// Parses an ε written as a fraction (`8/255`) or a decimal (`0.5`).
pub fn parse_eps(s: &str) -> anyhow::Result<f64> {
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let a: f64 = a
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("bad eps numerator in {s:?}"))?;
            let b: f64 = b
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("bad eps denominator in {s:?}"))?;
            if b == 0.0 {
                anyhow::bail!("eps {s:?} divides by zero");
            }
            a / b
        }
        None => s
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("bad eps {s:?}: write 8/255 or 0.5"))?,
    };
    if !(v.is_finite() && v > 0.0) {
        anyhow::bail!("eps {s:?} must be a positive finite number");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eps_parses_fractions_and_decimals() {
        assert!((parse_eps("8/255").unwrap() - 8.0 / 255.0).abs() < 1e-15);
        assert_eq!(parse_eps("0.5").unwrap(), 0.5);
        assert!(parse_eps("1/0").is_err());
        assert!(parse_eps("-1").is_err());
        assert!(parse_eps("abc").is_err());
    }

    #[test]
    fn eps_beyond_the_pixel_box_is_refused_with_a_hint() {
        let err = Norm::Linf.check_eps(8.0, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "ε = 8 exceeds the largest L∞ distance in the [0,1] box (1); did you mean 8/255?"
        );
        assert!(Norm::Linf.check_eps(8.0 / 255.0, None).is_ok());
        assert!(Norm::Linf.check_eps(1.0, None).is_err());
        assert!(Norm::Linf.check_eps(0.0, None).is_err());
        // L2 on MNIST: sqrt(784) = 28.
        let mnist = Some([1, 28, 28]);
        assert_eq!(Norm::L2.max_distance([1, 28, 28]), 28.0);
        assert!(Norm::L2.check_eps(27.9, mnist).is_ok());
        let err = Norm::L2.check_eps(30.0, mnist).unwrap_err().to_string();
        assert!(
            err.contains("(28 for 1×28×28 inputs)") && err.contains("30/255"),
            "{err}"
        );
        assert!(Norm::L1.check_eps(700.0, mnist).is_ok());
        assert!(Norm::L1.check_eps(784.0, mnist).is_err());
        // Without a shape only L∞ has a bound.
        assert!(Norm::L2.check_eps(30.0, None).is_ok());
    }

    #[test]
    fn batch_norms_match_hand_values() {
        let d = Tensor::from_slice(&[3f32, -4., 0., 1., 1., -1.]).view([2, 3]);
        let v = |n: Norm| Vec::<f32>::try_from(n.batch_norm(&d)).unwrap();
        assert_eq!(v(Norm::Linf), vec![4., 1.]);
        assert_eq!(v(Norm::L1), vec![7., 3.]);
        assert!((v(Norm::L2)[0] - 5.0).abs() < 1e-6);
        assert!((v(Norm::L2)[1] - 3f32.sqrt()).abs() < 1e-6);
    }
}
