//! Rank and linear correlation: Kendall τ-b, Spearman ρ, Pearson r.
//!
//! All functions return `NaN` (never panic) when the statistic is undefined: fewer than two
//! samples, slices of different lengths, a `NaN` in either input, or a constant input — the
//! same cases where scipy returns `nan`.

/// `true` when the pair of slices admits a correlation at all.
fn usable(x: &[f64], y: &[f64]) -> bool {
    x.len() == y.len() && x.len() >= 2 && !x.iter().chain(y).any(|v| v.is_nan())
}

/// Kendall τ-b in O(n log n) (Knight 1966), matching `scipy.stats.kendalltau` (variant `b`):
/// `τ_b = (C - D) / sqrt((P - T_x)(P - T_y))` with `P = n(n-1)/2` pairs, `T_x`, `T_y` the pairs
/// tied in x and in y. `±inf` values are ordinary (extreme) ranks.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> f64 {
    if !usable(x, y) {
        return f64::NAN;
    }
    let n = x.len();
    // Sort by (x, y) so that the pairs tied in x are contiguous, ordered by y.
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(y[a].total_cmp(&y[b])));
    let xs: Vec<f64> = idx.iter().map(|&i| x[i]).collect();
    let mut ys: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
    let x_ties = tied_pairs(&xs, |a, b| a == b);
    let pairs: Vec<(f64, f64)> = xs.iter().copied().zip(ys.iter().copied()).collect();
    let joint_ties = tied_pairs(&pairs, |a, b| a == b);
    // Discordant pairs = strict inversions of y in (x, y)-order; joint ties are not inversions.
    let mut buf = vec![0.0; n];
    let discordant = merge_count(&mut ys, &mut buf);
    // `ys` is now sorted: count the pairs tied in y.
    let y_ties = tied_pairs(&ys, |a, b| a == b);
    let total = (n as u64) * (n as u64 - 1) / 2;
    if x_ties == total || y_ties == total {
        return f64::NAN;
    }
    let con_minus_dis =
        total as f64 - x_ties as f64 - y_ties as f64 + joint_ties as f64 - 2.0 * discordant as f64;
    let tau = con_minus_dis / ((total - x_ties) as f64).sqrt() / ((total - y_ties) as f64).sqrt();
    tau.clamp(-1.0, 1.0)
}

/// Number of pairs inside runs of equal neighbours of a sorted slice.
fn tied_pairs<T>(sorted: &[T], eq: impl Fn(&T, &T) -> bool) -> u64 {
    let mut total = 0u64;
    let mut run = 1u64;
    for w in sorted.windows(2) {
        if eq(&w[0], &w[1]) {
            run += 1;
        } else {
            total += run * (run - 1) / 2;
            run = 1;
        }
    }
    total + run * (run - 1) / 2
}

/// Stable merge sort of `v` returning the number of pairs `i < j` with `v[i] > v[j]`.
fn merge_count(v: &mut [f64], buf: &mut [f64]) -> u64 {
    let n = v.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut count =
        merge_count(&mut v[..mid], &mut buf[..mid]) + merge_count(&mut v[mid..], &mut buf[mid..]);
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < mid && j < n {
        if v[j] < v[i] {
            // v[j] is smaller than every remaining element of the left half.
            count += (mid - i) as u64;
            buf[k] = v[j];
            j += 1;
        } else {
            buf[k] = v[i];
            i += 1;
        }
        k += 1;
    }
    buf[k..k + mid - i].copy_from_slice(&v[i..mid]);
    k += mid - i;
    buf[k..k + n - j].copy_from_slice(&v[j..n]);
    v.copy_from_slice(&buf[..n]);
    count
}

/// Pearson product-moment correlation (two-pass, as `scipy.stats.pearsonr`'s statistic).
/// Infinite values give `NaN`.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    if !usable(x, y) || x.iter().chain(y).any(|v| v.is_infinite()) {
        return f64::NAN;
    }
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// Spearman ρ: Pearson correlation of the average ranks (ties share their mean rank), as
/// `scipy.stats.spearmanr`.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    if !usable(x, y) {
        return f64::NAN;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

/// 1-based ranks, ties receiving the mean of the ranks they span (`scipy.stats.rankdata`).
pub fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && v[idx[end]] == v[idx[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end share their mean.
        let r = (start + 1 + end) as f64 / 2.0;
        for &i in &idx[start..end] {
            ranks[i] = r;
        }
        start = end;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// O(n²) definition of τ-b, to cross-check Knight's algorithm on random tied data.
    fn tau_b_naive(x: &[f64], y: &[f64]) -> f64 {
        let (mut s, mut tx, mut ty) = (0i64, 0i64, 0i64);
        let n = x.len();
        let p = (n * (n - 1) / 2) as i64;
        for i in 0..n {
            for j in i + 1..n {
                let a = (x[i] - x[j]).signum() * if x[i] == x[j] { 0.0 } else { 1.0 };
                let b = (y[i] - y[j]).signum() * if y[i] == y[j] { 0.0 } else { 1.0 };
                s += (a * b) as i64;
                tx += (x[i] == x[j]) as i64;
                ty += (y[i] == y[j]) as i64;
            }
        }
        s as f64 / (((p - tx) * (p - ty)) as f64).sqrt()
    }

    #[test]
    fn knight_matches_the_quadratic_definition_with_ties() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for n in [2usize, 3, 10, 57, 200] {
            let x: Vec<f64> = (0..n).map(|_| rng.gen_range(0..6) as f64).collect();
            let y: Vec<f64> = (0..n).map(|_| rng.gen_range(0..4) as f64).collect();
            let (a, b) = (kendall_tau_b(&x, &y), tau_b_naive(&x, &y));
            assert!(
                a.is_nan() && b.is_nan() || (a - b).abs() < 1e-12,
                "n={n}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn undefined_cases_are_nan() {
        assert!(kendall_tau_b(&[1.0], &[2.0]).is_nan());
        assert!(kendall_tau_b(&[1.0, 1.0], &[2.0, 3.0]).is_nan());
        assert!(kendall_tau_b(&[1.0, 2.0], &[2.0]).is_nan());
        assert!(pearson(&[1.0, f64::NAN], &[2.0, 3.0]).is_nan());
        assert!(spearman(&[1.0, 2.0, 3.0], &[5.0, 5.0, 5.0]).is_nan());
        assert_eq!(
            kendall_tau_b(&[1.0, 2.0, f64::INFINITY], &[0.0, 1.0, 2.0]),
            1.0
        );
    }

    #[test]
    fn average_ranks_share_ties() {
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0]),
            vec![3.5, 1.0, 3.5, 2.0]
        );
    }
}
