//! `best` (its defaults) against a 1000-step PGD bisection on the first 100 pool images of two
//! shared models (L∞): resnet_2b, on which `best` was first tuned, and cifar_deep_kw, held out of
//! its tuning. `best` must be at least as tight on >= 95% of the samples. Needs ../shared, so it
//! is ignored by default:
//!     cargo test --release --test it attack_real:: -- --ignored

use brittle::attack::driver::Chunk;
use brittle::attack::plan::Plan;
use brittle::attack::{sample_seed, AttackKind};
use brittle::data::DataSpec;
use brittle::model::{load_classifier, logits_no_grad, DeviceChoice, ModelSpec};
use brittle::norm::Norm;

fn margins(model: &str, n: usize, kind: AttackKind, steps: Option<usize>) -> Vec<f64> {
    let shared = crate::common::shared();
    let data = DataSpec {
        path: shared.join("data/cifar10/real-pool.bin"),
        limit: Some(n),
        ..Default::default()
    }
    .load()
    .unwrap();
    let spec = ModelSpec::new(
        shared.join("models").join(model),
        DeviceChoice::Cpu.resolve().unwrap(),
    );
    let model = load_classifier(&spec, data.input_shape()).unwrap();
    let (x, _) = data.batch(0, data.len());
    let label = logits_no_grad(model.as_ref(), &x).unwrap().argmax(1, false);
    let seeds = data.indices.iter().map(|&i| sample_seed(0, i)).collect();
    let mut chunk = Chunk::new(x, label, seeds, &vec![false; data.len()]);
    // topk 9: `brittle margins`' default.
    let plan = Plan::new(kind, Norm::Linf, steps, 9, 10, 1).unwrap();
    for p in &plan.passes {
        chunk
            .run(model.as_ref(), Norm::Linf, p.as_ref(), 20)
            .unwrap();
    }
    chunk
        .refine(model.as_ref(), Norm::Linf, plan.refine, 20)
        .unwrap();
    chunk
        .verify(model.as_ref(), Norm::Linf, 20)
        .unwrap()
        .into_iter()
        .map(|v| v.distance)
        .collect()
}

/// `best` finds a margin for every sample, at least as tight as the PGD bisection on >= 95%.
fn best_is_tighter_than_a_1000_step_pgd_bisection(model: &str, n: usize) {
    let best = margins(model, n, AttackKind::Best, None);
    let pgd = margins(model, n, AttackKind::Pgd, Some(1000));
    let ok = best.iter().zip(&pgd).filter(|(b, p)| **b <= **p).count();
    println!("{model}: best <= pgd on {ok}/{n}: {best:?} vs {pgd:?}");
    assert!(best.iter().all(|b| b.is_finite()));
    assert!(
        ok * 100 >= 95 * n,
        "{model}: best at least as tight on only {ok}/{n}"
    );
}

#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn best_beats_pgd_on_resnet_2b() {
    best_is_tighter_than_a_1000_step_pgd_bisection("resnet_2b.pt", 100);
}

/// A second model, the one held out of the tuning of `best`'s budgets (`bench/README.md`).
#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn best_beats_pgd_on_cifar_deep_kw() {
    best_is_tighter_than_a_1000_step_pgd_bisection("cifar_deep_kw.pt", 100);
}
