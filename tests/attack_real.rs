//! `best` against a 1000-step PGD bisection on 20 pool images of resnet_2b (Linf): `best` must
//! be at least as tight (within 0.5%) on >= 95% of the samples. Needs ../shared (skipped when
//! absent) and takes minutes, so it is ignored by default:
//!     cargo test --release --test attack_real -- --ignored

use std::path::Path;

use brittle::attack::best::Plan;
use brittle::attack::driver::Chunk;
use brittle::attack::{sample_seed, AttackKind};
use brittle::data::DataSpec;
use brittle::model::{load_classifier, logits_no_grad, DeviceChoice, ModelSpec};
use brittle::norm::Norm;

fn margins(kind: AttackKind, steps: Option<usize>) -> Option<Vec<f64>> {
    let shared = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared"));
    if !shared.exists() {
        println!("skipping: {} is absent", shared.display());
        return None;
    }
    let data = DataSpec {
        path: shared.join("data/cifar10/real-pool.bin"),
        limit: Some(20),
        ..Default::default()
    }
    .load()
    .unwrap();
    let spec = ModelSpec::new(
        shared.join("models/resnet_2b.pt"),
        DeviceChoice::Cpu.resolve().unwrap(),
    );
    let model = load_classifier(&spec, data.input_shape()).unwrap();
    let (x, _) = data.batch(0, data.len());
    let label = logits_no_grad(model.as_ref(), &x).unwrap().argmax(1, false);
    let seeds = data.indices.iter().map(|&i| sample_seed(0, i)).collect();
    let mut chunk = Chunk::new(x, label, seeds, &vec![false; data.len()]);
    let plan = Plan::new(kind, Norm::Linf, steps, 3, 10).unwrap();
    for p in &plan.passes {
        chunk
            .run(model.as_ref(), Norm::Linf, p.as_ref(), 20)
            .unwrap();
    }
    if plan.refine > 0 {
        chunk
            .refine(model.as_ref(), Norm::Linf, plan.refine, 20)
            .unwrap();
    }
    Some(
        chunk
            .verify(model.as_ref(), Norm::Linf, 20)
            .unwrap()
            .into_iter()
            .map(|v| v.distance)
            .collect(),
    )
}

#[test]
#[ignore]
fn best_is_tighter_than_a_1000_step_pgd_bisection() {
    let Some(best) = margins(AttackKind::Best, None) else {
        return;
    };
    let pgd = margins(AttackKind::Pgd, Some(1000)).unwrap();
    let ok = best
        .iter()
        .zip(&pgd)
        .filter(|(b, p)| **b <= **p * 1.005)
        .count();
    println!("best <= pgd on {ok}/20: {best:?} vs {pgd:?}");
    assert!(best.iter().all(|b| b.is_finite()));
    assert!(ok >= 19, "best tighter on only {ok}/20");
}
