//! brittle's metrics against scipy / scikit-learn values (tests/fixtures/metrics/cases.json,
//! written by scripts/fixtures/metrics.py), plus properties of monotone margins.

use brittle::metrics::{correlation, roc};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    x: Vec<f64>,
    y: Vec<f64>,
    positives: Vec<bool>,
    kendall_tau_b: f64,
    pearson: f64,
    spearman: f64,
    auroc: f64,
    aupr: f64,
    average_precision: f64,
    fpr_at_95_tpr: f64,
    threshold_at_95_tpr: f64,
    roc_points: usize,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

fn close(what: &str, case: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-9,
        "{case}: {what} = {got}, scipy/sklearn say {want}"
    );
}

#[test]
fn agrees_with_scipy_and_sklearn() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/cases.json"
    ))
    .unwrap();
    let fx: Fixture = serde_json::from_str(&text).unwrap();
    assert!(fx.cases.len() >= 10);
    for c in &fx.cases {
        let n = &c.name;
        close(
            "kendall",
            n,
            correlation::kendall_tau_b(&c.x, &c.y),
            c.kendall_tau_b,
        );
        close("pearson", n, correlation::pearson(&c.x, &c.y), c.pearson);
        close("spearman", n, correlation::spearman(&c.x, &c.y), c.spearman);
        let s: Vec<f64> = c.y.iter().map(|v| -v).collect();
        let p = &c.positives;
        close("auroc", n, roc::auroc(&s, p), c.auroc);
        close("aupr", n, roc::aupr(&s, p), c.aupr);
        close("ap", n, roc::average_precision(&s, p), c.average_precision);
        let (fpr, thr) = roc::fpr_at_tpr(&s, p, 0.95);
        close("fpr@95", n, fpr, c.fpr_at_95_tpr);
        close("thr@95", n, thr, c.threshold_at_95_tpr);
        assert_eq!(roc::roc_curve(&s, p).fpr.len(), c.roc_points, "{n}");
    }
}

/// A strictly increasing d_out = f(d_in) is perfectly consistent: τ = 1 and every eps with
/// both classes present is detected perfectly (AUROC = AP = 1, FPR@95TPR = 0).
#[test]
fn monotone_margins_are_perfectly_consistent() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for trial in 0..20 {
        let n = rng.gen_range(3..300);
        let d_in: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..0.2)).collect();
        let a = rng.gen_range(1.0..50.0);
        let f = |d: f64| match trial % 3 {
            0 => a * d,
            1 => (a * d).exp() - 3.0,
            _ => (d + 1e-3).ln(),
        };
        let d_out: Vec<f64> = d_in.iter().map(|&d| f(d)).collect();
        assert!((correlation::kendall_tau_b(&d_in, &d_out) - 1.0).abs() < 1e-12);
        assert!((correlation::spearman(&d_in, &d_out) - 1.0).abs() < 1e-12);
        let score: Vec<f64> = d_out.iter().map(|v| -v).collect();
        for eps in [0.01, 0.03, 0.05, 0.1, 0.15] {
            let pos: Vec<bool> = d_in.iter().map(|&d| d <= eps).collect();
            if pos.iter().all(|&p| p) || pos.iter().all(|&p| !p) {
                assert!(roc::auroc(&score, &pos).is_nan());
                continue;
            }
            assert_eq!(roc::auroc(&score, &pos), 1.0, "trial {trial} eps {eps}");
            assert!((roc::average_precision(&score, &pos) - 1.0).abs() < 1e-12);
            assert_eq!(roc::fpr_at_tpr(&score, &pos, 0.95).0, 0.0);
        }
    }
}
