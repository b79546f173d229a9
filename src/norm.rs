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
    fn batch_norms_match_hand_values() {
        let d = Tensor::from_slice(&[3f32, -4., 0., 1., 1., -1.]).view([2, 3]);
        let v = |n: Norm| Vec::<f32>::try_from(n.batch_norm(&d)).unwrap();
        assert_eq!(v(Norm::Linf), vec![4., 1.]);
        assert_eq!(v(Norm::L1), vec![7., 3.]);
        assert!((v(Norm::L2)[0] - 5.0).abs() < 1e-6);
        assert!((v(Norm::L2)[1] - 3f32.sqrt()).abs() < 1e-6);
    }
}
