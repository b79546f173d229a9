//! Percentile bootstrap intervals for statistics of paired samples.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// 95% percentile-bootstrap intervals `[lo, hi]` (2.5th and 97.5th percentiles, linear
/// interpolation as numpy's default) of the `k` statistics `stat` returns, over `resamples`
/// resamples with replacement of `n` indices drawn from a ChaCha8 stream seeded by `seed`.
/// All statistics see the same resamples. Resamples where a statistic is `NaN` (e.g. a
/// constant resample) are skipped for that statistic; `[NaN, NaN]` when none is left.
pub fn intervals(
    n: usize,
    resamples: usize,
    seed: u64,
    stat: impl Fn(&[usize]) -> Vec<f64>,
) -> Vec<[f64; 2]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws: Vec<Vec<f64>> = Vec::new();
    let mut idx = vec![0usize; n];
    for _ in 0..resamples {
        if n == 0 {
            break;
        }
        for i in idx.iter_mut() {
            *i = rng.gen_range(0..n);
        }
        let values = stat(&idx);
        draws.resize(values.len(), Vec::new());
        for (d, v) in draws.iter_mut().zip(values) {
            if !v.is_nan() {
                d.push(v);
            }
        }
    }
    draws
        .into_iter()
        .map(|mut d| {
            d.sort_by(f64::total_cmp);
            [quantile(&d, 0.025), quantile(&d, 0.975)]
        })
        .collect()
}

/// Quantile of sorted data with linear interpolation (numpy `method="linear"`); `NaN` if empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let h = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_numpy_linear() {
        // np.quantile([1, 2, 4, 8], [0.025, 0.5, 0.975]) = [1.075, 3.0, 7.7]
        let s = [1.0, 2.0, 4.0, 8.0];
        assert!((quantile(&s, 0.025) - 1.075).abs() < 1e-12);
        assert_eq!(quantile(&s, 0.5), 3.0);
        assert!((quantile(&s, 0.975) - 7.7).abs() < 1e-12);
    }

    #[test]
    fn interval_of_the_mean_covers_it_and_is_seeded() {
        let x: Vec<f64> = (0..200).map(|i| (i % 17) as f64).collect();
        let mean = |idx: &[usize]| vec![idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len() as f64];
        let a = intervals(x.len(), 500, 1, mean);
        assert_eq!(a, intervals(x.len(), 500, 1, mean));
        assert_ne!(a, intervals(x.len(), 500, 2, mean));
        let m = x.iter().sum::<f64>() / 200.0;
        // Standard error is sd/sqrt(n) ≈ 4.9/14.1 ≈ 0.35: the interval is about ±0.7 wide.
        assert!(a[0][0] < m && m < a[0][1] && a[0][1] - a[0][0] < 2.0 && a[0][1] - a[0][0] > 0.8);
    }
}
