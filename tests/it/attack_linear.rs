//! On a linear classifier the input margin has a closed form: every attack's verified distance
//! must be >= it (an adversarial point cannot be closer than the boundary), and `best` and FAB
//! (plus the segment bisection) must reach it to 1e-3 relative. Points sit in the middle of the
//! box with small margins so the [0,1] constraints are inactive.

use crate::common::{seeded_linear, seeded_uniform, Linear};
use brittle::attack::driver::{Chunk, Pass};
use brittle::attack::fmn::Fmn;
use brittle::attack::plan::Plan;
use brittle::attack::{sample_seed, AttackKind, GAP_RTOL, SEARCH_GAP_RTOL};
use brittle::model::Classifier;
use brittle::norm::Norm;
use tch::{Kind, Tensor};

const K: i64 = 5;
const SHAPE: [i64; 3] = [2, 4, 4];

fn setup(n: i64) -> (Linear, Tensor) {
    let b = seeded_uniform(8, 1, &[K], -0.017, 0.017).view([K]);
    let x = seeded_uniform(9, n, &SHAPE, 0.45, 0.55);
    (seeded_linear(7, K, SHAPE, b, "linear"), x)
}

/// Per sample: min over j != top of (|(w_top - w_j).x + b_top - b_j| + τ) / ||w_top - w_j||_dual,
/// and the same distance for j = the runner-up class alone (where attacks that follow the margin
/// loss from the clean point, like FMN, converge; in Linf it need not be the closest boundary).
/// τ = `rtol · max_k |z_k|` at the clean point: the gap an adversarial point must exceed (the
/// logits' scale hardly moves over a margin this small).
fn closed_form(m: &Linear, x: &Tensor, norm: Norm, rtol: f64) -> Vec<(f64, f64, f64)> {
    let z = m.logits(x).unwrap().to_kind(Kind::Double);
    let w = m.w.to_kind(Kind::Double);
    let n = x.size()[0];
    let top = Vec::<i64>::try_from(z.argmax(1, false)).unwrap();
    (0..n)
        .map(|i| {
            let t = top[i as usize];
            let tau = rtol * z.get(i).abs().max().double_value(&[]);
            let dist = |j: i64| {
                let gap = z.double_value(&[i, t]) - z.double_value(&[i, j]) + tau;
                let dw = (w.get(t) - w.get(j)).unsqueeze(0);
                gap / norm.dual().batch_norm(&dw).double_value(&[0])
            };
            let second = (0..K)
                .filter(|&j| j != t)
                .max_by(|&a, &b| z.double_value(&[i, a]).total_cmp(&z.double_value(&[i, b])))
                .unwrap();
            let all: Vec<f64> = (0..K).filter(|&j| j != t).map(dist).collect();
            let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = all.iter().copied().fold(0.0, f64::max);
            (lo, dist(second), hi)
        })
        .collect()
}

fn attack(m: &Linear, x: &Tensor, kind: AttackKind, norm: Norm, steps: Option<usize>) -> Vec<f64> {
    let n = x.size()[0];
    let label = m.logits(x).unwrap().argmax(1, false);
    let seeds = (0..n as usize).map(|i| sample_seed(1, i)).collect();
    let mut chunk = Chunk::new(
        x.shallow_clone(),
        label.shallow_clone(),
        seeds,
        &vec![false; n as usize],
    );
    let plan = Plan::new(kind, norm, steps, 3, K, 1).unwrap();
    for p in &plan.passes {
        chunk.run(m, norm, p.as_ref(), 8).unwrap();
    }
    chunk.refine(m, norm, plan.refine, 8).unwrap();
    let v = chunk.verify(m, norm, 8).unwrap();
    // Every success flips the prediction and reports the recomputed norm.
    let pred = m.logits(&chunk.best_adv).unwrap().argmax(1, false);
    let d = norm.batch_norm(&(&chunk.best_adv - x).to_kind(Kind::Double));
    for (i, r) in v.iter().enumerate() {
        assert!(r.success, "{kind:?} {norm}: sample {i} failed");
        assert_ne!(
            pred.int64_value(&[i as i64]),
            label.int64_value(&[i as i64])
        );
        assert!((d.double_value(&[i as i64]) - r.distance).abs() <= 1e-12);
    }
    v.into_iter().map(|r| r.distance).collect()
}

/// Which boundary an attack must reach.
#[derive(Clone, Copy)]
enum Reach {
    Nearest,
    RunnerUp,
    /// PGD maximises a convex loss (max of linear pieces) over a ball: it may settle on any
    /// class's piece, so it is only bound by the farthest boundary.
    Farthest,
}

fn check(kind: AttackKind, norm: Norm, steps: Option<usize>, tol: f64, reach: Reach) {
    let (m, x) = setup(12);
    // Verified points clear the GAP_RTOL gap; the attacks aim for the SEARCH_GAP_RTOL one.
    let want = closed_form(&m, &x, norm, GAP_RTOL);
    let aim = closed_form(&m, &x, norm, SEARCH_GAP_RTOL);
    let got = attack(&m, &x, kind, norm, steps);
    for (i, (g, (&(w, _, _), &(a, a2, a3)))) in got.iter().zip(want.iter().zip(&aim)).enumerate() {
        let w = &w;
        let reach = match reach {
            Reach::Nearest => a,
            Reach::RunnerUp => a2,
            Reach::Farthest => a3,
        };
        // |d_i| <= ||d|| for every norm, so a margin below 0.4 keeps x + d inside the box.
        assert!(
            *w < 0.4,
            "sample {i}: margin {w} too large for an inactive box"
        );
        // Inputs are float32: a point can only sit within one float32 step (~6e-8 near 0.5)
        // of the boundary.
        assert!(
            *g >= w * (1.0 - 1e-5) - 1e-7,
            "{kind:?} {norm} sample {i}: {g} below the true margin {w}"
        );
        assert!(
            *g <= reach * (1.0 + tol),
            "{kind:?} {norm} sample {i}: {g} vs closed form {reach}"
        );
    }
}

#[test]
fn best_reaches_the_closed_form_margin() {
    check(AttackKind::Best, Norm::Linf, None, 1e-3, Reach::Nearest);
    check(AttackKind::Best, Norm::L2, None, 1e-3, Reach::Nearest);
}

#[test]
fn fab_reaches_the_closed_form_margin() {
    check(AttackKind::Fab, Norm::Linf, Some(30), 1e-2, Reach::Nearest);
    check(AttackKind::Fab, Norm::L2, Some(30), 1e-2, Reach::Nearest);
    check(AttackKind::FabT, Norm::L2, Some(30), 1e-2, Reach::Nearest);
}

#[test]
fn fmn_ddn_and_pgd_are_upper_bounds_close_to_the_closed_form() {
    check(
        AttackKind::Fmn,
        Norm::Linf,
        Some(300),
        2e-2,
        Reach::RunnerUp,
    );
    check(AttackKind::Fmn, Norm::L2, Some(300), 2e-2, Reach::RunnerUp);
    // DDN moves its norm by γ = 5% per step, so it only lands within a few γ of the boundary.
    check(AttackKind::Ddn, Norm::L2, Some(300), 1e-1, Reach::RunnerUp);
    check(AttackKind::Pgd, Norm::L2, Some(400), 5e-2, Reach::Farthest);
}

/// Every sample's best distance after `fmn_steps` of FMN, and after `then` has continued from
/// there on the same chunk: the pair the polishing passes are judged by.
fn fmn_then(
    m: &Linear,
    x: &Tensor,
    norm: Norm,
    fmn_steps: usize,
    then: &dyn Pass,
) -> (Vec<f64>, Vec<f64>) {
    let n = x.size()[0] as usize;
    let label = m.logits(x).unwrap().argmax(1, false);
    let seeds = (0..n).map(|i| sample_seed(1, i)).collect();
    let mut chunk = Chunk::new(x.shallow_clone(), label, seeds, &vec![false; n]);
    chunk.run(m, norm, &Fmn::new(norm, fmn_steps), 8).unwrap();
    let before = Vec::<f64>::try_from(&chunk.best).unwrap();
    chunk.run(m, norm, then, 8).unwrap();
    (before, Vec::<f64>::try_from(&chunk.best).unwrap())
}

/// `shrink` polishes another attack's point: on a linear model FMN-3 ends ~1% above the boundary
/// it heads for. 40 shrink steps must bring every sample closer, the median sample by at least
/// 0.1% (a step gains at most ρ, 0.005% down to 0.001%: 40 steps at most 0.12%, 10 steps 0.045%),
/// without ever going below the true margin. Where the margin is tiny a step of ρ is below
/// float32's resolution of the pixels, and the gain is smaller.
#[test]
fn shrink_polishes_every_point_towards_the_boundary() {
    use brittle::attack::shrink::Shrink;
    for norm in [Norm::Linf, Norm::L2] {
        let (m, x) = setup(12);
        let want = closed_form(&m, &x, norm, GAP_RTOL);
        let (before, after) = fmn_then(&m, &x, norm, 3, &Shrink::new(norm, 40));
        let n = before.len();
        let mut gains: Vec<f64> = (0..n).map(|i| 1.0 - after[i] / before[i]).collect();
        for i in 0..n {
            let (lo, second, _) = want[i];
            assert!(
                gains[i] > 0.0,
                "{norm} sample {i}: {} -> {} (runner-up boundary {second})",
                before[i],
                after[i]
            );
            assert!(
                after[i] >= lo * (1.0 - 1e-5) - 1e-7,
                "{norm} sample {i} below the margin"
            );
        }
        gains.sort_by(f64::total_cmp);
        assert!(gains[n / 2] >= 1e-3, "{norm}: gains {gains:?}");
    }
}

/// The `probe` restarts from a random point of the ball 2% below the best distance: on a linear
/// model, from FMN's first adversarial point (ε jumps to 1.05 x the linearised boundary), it
/// must bring every sample at least 2% closer (its first success lies inside that ball), and
/// never below the true margin.
#[test]
fn probe_restarts_below_the_best_point() {
    use brittle::attack::shrink::Shrink;
    for norm in [Norm::Linf, Norm::L2] {
        let (m, x) = setup(12);
        let want = closed_form(&m, &x, norm, GAP_RTOL);
        let (before, after) = fmn_then(&m, &x, norm, 2, &Shrink::probe(norm, 20));
        let n = before.len();
        for i in 0..n {
            let (lo, ..) = want[i];
            assert!(
                before[i].is_finite(),
                "{norm} sample {i}: FMN found nothing"
            );
            assert!(
                after[i] <= 0.98 * before[i],
                "{norm} sample {i}: {} -> {} (margin {lo})",
                before[i],
                after[i]
            );
            assert!(
                after[i] >= lo * (1.0 - 1e-5) - 1e-7,
                "{norm} sample {i} below the margin"
            );
        }
    }
}
