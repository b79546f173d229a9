//! Every `brittle train --mode` loss and its parameter gradient against an independent PyTorch
//! implementation (`scripts/fixtures/losses.py`, float64) on a fixed batch, fixed weights and
//! fixed adversarial points, GAIRAT's κ and MMA's distances: the outer objective alone, so that
//! the inner attack's randomness and CPU kernels stay out of the comparison.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

use brittle::model::native::NativeClassifier;
use brittle::model::Classifier;
use brittle::norm::Norm;
use brittle::train::loss::{adversary, objective, Batch, Points, Setting};
use brittle::train::pgd::PgdConfig;
use brittle::train::{LrSchedule, Mode, TrainConfig};
use brittle::util::NoProgress;
use strum::VariantNames;
use tch::{Device, Tensor};

use crate::common::rel_err;

/// Loss: relative error; gradients: max |Δ| over max |reference| of each parameter tensor.
/// Measured worst over the 12 modes (float32 against float64): loss 1.5e-7 / 2.0e-7 / 1.5e-7,
/// gradient 8.8e-7 / 9.7e-7 / 8.7e-7 under the default (AVX-512), oneDNN SSE4.1 and ATen's
/// scalar kernels.
const LOSS_RTOL: f64 = 1e-5;
const GRAD_RTOL: f64 = 1e-5;

fn fixture() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/losses.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect()
}

fn config(mode: Mode) -> TrainConfig {
    TrainConfig {
        mode,
        attack: PgdConfig {
            norm: Norm::Linf,
            eps: 0.3,
            steps: 10,
            step_size: 0.075,
            random_start: true,
        },
        epochs: 10,
        batch_size: 8,
        lr: 1e-3,
        lr_schedule: LrSchedule::Constant,
        beta: 4.0,
        eps_warmup_epochs: 0.0,
        arch: "small-cnn@4".into(),
        seed: 0,
        data: "fixture".into(),
        init: None,
    }
}

/// The fixture's network, loaded into brittle's `small-cnn@4`.
fn model(f: &HashMap<String, Tensor>) -> NativeClassifier {
    let m = NativeClassifier::new("small-cnn@4", [1, 12, 12], 10, Device::Cpu).unwrap();
    let weights: Vec<(String, Tensor)> = f
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("weights.")?.to_string(), v.shallow_clone())))
        .collect();
    m.load_weights(weights, "losses.safetensors").unwrap();
    m
}

/// The loss (and its parameter gradients, by name) of `mode` at epoch `epoch` (0-based).
fn loss_and_grads(
    f: &HashMap<String, Tensor>,
    m: &NativeClassifier,
    mode: Mode,
    epoch: usize,
) -> (f64, HashMap<String, Tensor>) {
    let cfg = config(mode);
    let s = Setting {
        config: &cfg,
        attack: cfg.attack,
        epoch,
    };
    let b = Batch {
        x: &f["x"],
        y: &f["y"],
        seeds: &[],
    };
    let points = Points {
        adv: if mode == Mode::Standard {
            f["x"].shallow_clone()
        } else {
            f["adv"].shallow_clone()
        },
        kappa: Some(f["kappa"].shallow_clone()),
        distance: Some(f["distance"].shallow_clone()),
    };
    let step = objective(&s, m, &b, &points).unwrap();
    let (names, params): (Vec<String>, Vec<Tensor>) = m.var_store().variables().into_iter().unzip();
    let grads = Tensor::run_backward(&[&step.loss], &params, false, false);
    (
        step.loss.double_value(&[]),
        names.into_iter().zip(grads).collect(),
    )
}

#[test]
fn every_loss_and_its_gradient_match_pytorch() {
    let _threads = crate::common::one_torch_thread();
    let f = fixture();
    let m = model(&f);
    let (mut worst_loss, mut worst_grad) = (0.0f64, 0.0f64);
    for name in Mode::VARIANTS {
        let mode = Mode::from_str(name).unwrap();
        let reference = f
            .get(&format!("{name}.loss"))
            .unwrap_or_else(|| {
                panic!("no fixture for mode {name}: rerun scripts/fixtures/losses.py")
            })
            .double_value(&[0]);
        let (loss, grads) = loss_and_grads(&f, &m, mode, 3);
        let loss_err = (loss - reference).abs() / reference.abs();
        assert!(
            loss_err < LOSS_RTOL,
            "{name}: loss {loss} against PyTorch's {reference}"
        );
        worst_loss = worst_loss.max(loss_err);
        for (param, g) in &grads {
            let want = &f[&format!("{name}.grad.{param}")];
            let err = rel_err(g, want);
            assert!(
                err < GRAD_RTOL,
                "{name}: gradient of {param} off by {err:.2e} of its scale"
            );
            worst_grad = worst_grad.max(err);
        }
    }
    eprintln!("worst relative error: loss {worst_loss:.2e}, gradient {worst_grad:.2e}");
}

/// The losses differ from each other on this batch by far more than the tolerances: a mode that
/// silently computed another's loss would fail above.
#[test]
fn the_fixture_tells_the_losses_apart() {
    let f = fixture();
    let losses: Vec<(String, f64)> = Mode::VARIANTS
        .iter()
        .map(|n| (n.to_string(), f[&format!("{n}.loss")].double_value(&[0])))
        .collect();
    for (i, (a, la)) in losses.iter().enumerate() {
        for (b, lb) in &losses[i + 1..] {
            assert!(
                (la - lb).abs() > 1e-3 * la.abs(),
                "{a} and {b}: {la} vs {lb}"
            );
        }
    }
}

/// GAIRAT trains with Madry's loss for its first 30% of epochs.
#[test]
fn gairat_reweights_only_after_its_start() {
    let _threads = crate::common::one_torch_thread();
    let f = fixture();
    let m = model(&f);
    let (early, _) = loss_and_grads(&f, &m, Mode::Gairat, 2);
    let (madry, _) = loss_and_grads(&f, &m, Mode::Pgd, 2);
    assert_eq!(early, madry);
    let (late, _) = loss_and_grads(&f, &m, Mode::Gairat, 3);
    assert!((late - madry).abs() > 0.1, "{late} vs {madry}");
}

/// The inner halves on the fixture's network: MMA's FMN points lie within ε and are
/// misclassified (rows without one keep their clean input; misclassified rows are at distance
/// 0); GAIRAT's κ counts the PGD iterates still classified correctly.
#[test]
fn adversaries_find_what_their_losses_expect() {
    let _threads = crate::common::one_torch_thread();
    let f = fixture();
    let m = model(&f);
    let (x, y) = (&f["x"], &f["y"]);
    let seeds: Vec<u64> = (0..8).collect();
    let b = Batch {
        x,
        y,
        seeds: &seeds,
    };
    let mut cfg = config(Mode::Mma);
    cfg.attack.steps = 20;
    let s = Setting {
        config: &cfg,
        attack: cfg.attack,
        epoch: 0,
    };
    let points = adversary(&s, &m, &b, &NoProgress).unwrap();
    let dist = Vec::<f64>::try_from(points.distance.as_ref().unwrap()).unwrap();
    let pred = Vec::<i64>::try_from(m.logits(&points.adv).unwrap().argmax(1, false)).unwrap();
    let labels = Vec::<i64>::try_from(y).unwrap();
    let moved = Vec::<f64>::try_from(
        (&points.adv - x)
            .abs()
            .flatten(1, -1)
            .amax([1].as_slice(), false),
    )
    .unwrap();
    // Rows 5-7 are misclassified clean.
    assert_eq!(&dist[5..], &[0.0, 0.0, 0.0]);
    let inside = (0..5).filter(|&i| dist[i] < 0.3).count();
    assert!(inside >= 1, "FMN found no point within ε: {dist:?}");
    for i in 0..5 {
        if dist[i] < 0.3 {
            assert_ne!(
                pred[i], labels[i],
                "row {i} at distance {} is not adversarial",
                dist[i]
            );
            assert!(
                (moved[i] - dist[i]).abs() < 1e-6,
                "row {i}: {} vs {}",
                moved[i],
                dist[i]
            );
        } else {
            assert_eq!(moved[i], 0.0, "row {i} beyond ε must keep its clean input");
        }
    }

    // PGD that cannot move: every iterate is the clean input, κ = steps on correct rows.
    let mut still = config(Mode::Gairat);
    still.attack = PgdConfig {
        steps: 4,
        step_size: 0.0,
        random_start: false,
        ..still.attack
    };
    let s = Setting {
        config: &still,
        attack: still.attack,
        epoch: 0,
    };
    let kappa = adversary(&s, &m, &b, &NoProgress).unwrap().kappa.unwrap();
    assert_eq!(
        Vec::<f32>::try_from(&kappa).unwrap(),
        [4.0, 4.0, 4.0, 4.0, 4.0, 0.0, 0.0, 0.0]
    );
    // The real attack (random start, 10 steps at ε 0.3): κ within [0, 10], and below 10 on
    // some clean-correct row, which PGD flips.
    let mut gairat = cfg.clone();
    gairat.mode = Mode::Gairat;
    gairat.attack.steps = 10;
    let s = Setting {
        config: &gairat,
        attack: gairat.attack,
        epoch: 0,
    };
    let kappa = adversary(&s, &m, &b, &NoProgress).unwrap().kappa.unwrap();
    let kappa = Vec::<f32>::try_from(&kappa).unwrap();
    assert!(kappa.iter().all(|k| (0.0..=10.0).contains(k)), "{kappa:?}");
    assert!(
        kappa[..5].iter().any(|&k| k < 10.0),
        "PGD at ε 0.3 flips some correct row: {kappa:?}"
    );
}
