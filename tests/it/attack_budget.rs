//! The driver's per-sample budget: a sample that has an adversarial point leaves after
//! `once_found` steps, and only samples still without one spend the rest of `steps` (what lets
//! `best`'s FAB pass stop after 5 or 10 steps where it found a point and go on to 40 where it did
//! not).

use anyhow::Result;
use brittle::attack::driver::Chunk;
use brittle::attack::{AttackStep, BatchView, Budget, Candidate, Ctx};
use brittle::model::Classifier;
use brittle::norm::Norm;
use tch::Tensor;

use crate::common::{seeded_linear, seeded_uniform};

const K: i64 = 3;

/// A stub attack: on every step it reports the clean point, as a hit on the samples whose first
/// pixel is bright (it scores them against another label) and as a miss on the others.
#[derive(Debug)]
struct HitsBrightSamples {
    steps: usize,
    once_found: usize,
}

impl AttackStep for HitsBrightSamples {
    type State = Tensor;

    fn budget(&self) -> Budget {
        Budget {
            name: "stub",
            steps: self.steps,
            patience: self.steps,
            once_found: self.once_found,
        }
    }

    fn init(&self, _ctx: &mut Ctx, b: &BatchView) -> Result<Tensor> {
        Ok(b.best.zeros_like())
    }

    fn step(&self, ctx: &mut Ctx, b: &BatchView, _state: &mut Tensor) -> Result<Candidate> {
        let logits = ctx.forward(b.x0)?;
        let bright = b.x0.flatten(1, -1).select(1, 0).gt(0.5);
        let other = (b.label + 1).remainder(K);
        let scored = other.where_self(&bright, b.label);
        Ok(Candidate::new(b.x0.shallow_clone(), &logits, &scored))
    }
}

#[test]
fn only_samples_without_a_point_spend_the_whole_budget() {
    let shape = [1, 2, 2];
    let model = seeded_linear(
        3,
        K,
        shape,
        Tensor::zeros([K], tch::kind::FLOAT_CPU),
        "stub",
    );
    let x = seeded_uniform(4, 7, &shape, 0.0, 1.0);
    let bright: Vec<bool> = (0..7).map(|i| i % 2 == 0).collect();
    let first = Tensor::from_slice(&bright).to_kind(tch::Kind::Float) * 0.6 + 0.2;
    x.flatten(1, -1).select(1, 0).copy_(&first);
    let label = model.logits(&x).unwrap().argmax(1, false);
    let mut chunk = Chunk::new(x, label, vec![0; 7], &[false; 7]);
    let stub = HitsBrightSamples {
        steps: 8,
        once_found: 3,
    };
    // Batches of 3 out of 7: samples leave and are refilled at different steps.
    chunk.run(&model, Norm::Linf, &stub, 3).unwrap();
    for (i, &b) in bright.iter().enumerate() {
        let want = if b { 3 } else { 8 };
        assert_eq!(chunk.forwards[i], want, "sample {i} (bright: {b})");
    }
    let best = Vec::<f64>::try_from(&chunk.best).unwrap();
    assert!(bright.iter().zip(&best).all(|(&b, &d)| b == d.is_finite()));
}
