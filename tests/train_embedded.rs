//! The embedded default model (`assets/mnist-small-cnn.safetensors`): loads through the library,
//! is accurate on the committed MNIST subset, computes what the same `torch.nn` network computes
//! (reference from scripts/fixtures/train.py), and survives a TorchScript export.

use std::collections::HashMap;
use std::path::PathBuf;

use brittle::data::{DataSpec, Dataset};
use brittle::model::native::load_native;
use brittle::model::{load_classifier, logits_no_grad, Classifier, ModelSpec};
use brittle::norm::Norm;
use brittle::train::eval::accuracy;
use brittle::train::pgd::{cross_entropy, pgd, PgdConfig};
use tch::{Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn subset() -> Dataset {
    DataSpec {
        path: root().join("assets/mnist-test-1000-images-idx3-ubyte.gz"),
        ..Default::default()
    }
    .load()
    .unwrap()
}

fn spec(path: PathBuf, arch: Option<&str>) -> ModelSpec {
    ModelSpec {
        arch: arch.map(str::to_string),
        num_classes: Some(10),
        ..ModelSpec::new(path, Device::Cpu)
    }
}

fn embedded() -> Box<dyn Classifier> {
    load_classifier(
        &spec(
            root().join("assets/mnist-small-cnn.safetensors"),
            Some("small-cnn"),
        ),
        [1, 28, 28],
    )
    .unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(root().join("tests/fixtures/train/small_cnn_reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn embedded_model_is_accurate_on_the_committed_subset() {
    tch::set_num_threads(1);
    let model = embedded();
    let data = subset();
    let acc = accuracy(model.as_ref(), &data, None, 500, 0).unwrap();
    assert!(acc.clean >= 0.97, "clean accuracy {}", acc.clean);
    assert_eq!(model.info().num_classes, 10);
    assert!(model.info().has_features);
}

#[test]
fn embedded_model_matches_pytorch() {
    tch::set_num_threads(1);
    let model = embedded();
    let r = reference();
    let data = subset();
    let (x, labels) = data.batch(0, 16);
    let (f, l) = tch::no_grad(|| model.features_and_logits(&x))
        .unwrap()
        .unwrap();
    assert!(max_diff(&l, &r["logits"]) < 1e-4);
    assert!(max_diff(&f, &r["features"]) < 1e-4);
    // The exposed last layer rebuilds the logits from the features.
    let (w, b) = model.last_linear().unwrap();
    assert!(max_diff(&(f.matmul(&w.tr()) + b), &l) < 1e-4);

    // L2 PGD, no random start: the same iterates as the PyTorch loop.
    let cfg = PgdConfig {
        norm: Norm::L2,
        eps: 1.5,
        steps: 5,
        step_size: 0.5,
        random_start: false,
    };
    let y = Tensor::from_slice(labels);
    let adv = pgd(model.as_ref(), &x, &[], &cfg, cross_entropy(&y)).unwrap();
    assert!(max_diff(&adv, &r["pgd_l2_adv"]) < 1e-4);
    let adv_logits = logits_no_grad(model.as_ref(), &adv).unwrap();
    assert!(max_diff(&adv_logits, &r["pgd_l2_logits"]) < 1e-3);
}

#[test]
fn linf_pgd_stays_in_the_ball_and_lowers_accuracy() {
    tch::set_num_threads(1);
    let model = embedded();
    let data = subset();
    let (x, labels) = data.batch(0, 100);
    let y = Tensor::from_slice(labels);
    let cfg = PgdConfig {
        norm: Norm::Linf,
        eps: 0.3,
        steps: 10,
        step_size: 0.05,
        random_start: true,
    };
    let seeds: Vec<u64> = (0..100).collect();
    let adv = pgd(model.as_ref(), &x, &seeds, &cfg, cross_entropy(&y)).unwrap();
    assert!(Norm::Linf.batch_norm(&(&adv - &x)).max().double_value(&[]) <= 0.3 + 1e-6);
    assert!(adv.min().double_value(&[]) >= 0.0 && adv.max().double_value(&[]) <= 1.0);
    let sub = data.select(&(0..100).collect::<Vec<_>>()).unwrap();
    let acc = accuracy(model.as_ref(), &sub, Some(&cfg), 100, 0).unwrap();
    let robust = acc.robust.unwrap();
    assert!(robust < acc.clean, "{acc:?}");
    // At eps = 0.5 (far past what it was trained for) PGD breaks most decisions.
    let big = PgdConfig { eps: 0.5, ..cfg };
    let broken = accuracy(model.as_ref(), &sub, Some(&big), 100, 0).unwrap();
    assert!(broken.robust.unwrap() < robust, "{broken:?} vs {acc:?}");
}

#[test]
fn random_starts_depend_on_the_seed_alone() {
    let model = embedded();
    let data = subset();
    let (x, labels) = data.batch(0, 8);
    let y = Tensor::from_slice(labels);
    for (norm, eps) in [(Norm::Linf, 0.3), (Norm::L2, 2.0)] {
        let start = PgdConfig {
            norm,
            eps,
            steps: 0,
            step_size: 0.0,
            random_start: true,
        };
        let seeds: Vec<u64> = (10..18).collect();
        let all = pgd(model.as_ref(), &x, &seeds, &start, cross_entropy(&y)).unwrap();
        // The same seed gives a row the same start in a smaller batch, another seed another.
        let head = pgd(
            model.as_ref(),
            &x.narrow(0, 0, 3),
            &seeds[..3],
            &start,
            cross_entropy(&y.narrow(0, 0, 3)),
        )
        .unwrap();
        assert_eq!(head, all.narrow(0, 0, 3), "{norm:?}");
        let other = pgd(model.as_ref(), &x, &[99; 8], &start, cross_entropy(&y)).unwrap();
        let moved = norm.batch_norm(&(&other - &all)).max().double_value(&[]);
        assert!(moved > eps / 10.0, "{norm:?}: {moved}");
        // Inside the ball (the L2 radius is uniform, so not all on its surface) and in [0, 1].
        let r = norm.batch_norm(&(&all - &x));
        assert!(r.max().double_value(&[]) <= eps + 1e-5, "{norm:?}");
        assert!(r.min().double_value(&[]) > 0.0, "{norm:?}");
        assert!(all.min().double_value(&[]) >= 0.0 && all.max().double_value(&[]) <= 1.0);
    }
    // A start needs one seed a row: a clear error, not a shape panic.
    let cfg = PgdConfig {
        norm: Norm::Linf,
        eps: 0.3,
        steps: 1,
        step_size: 0.1,
        random_start: true,
    };
    let err = pgd(model.as_ref(), &x, &[1, 2], &cfg, cross_entropy(&y)).unwrap_err();
    assert!(err.to_string().contains("seed"), "{err}");
}

#[test]
fn torchscript_export_gives_the_same_logits() {
    tch::set_num_threads(1);
    let weights = root().join("assets/mnist-small-cnn.safetensors");
    let mut native = load_native(
        &spec(weights, Some("small-cnn")),
        None,
        [1, 28, 28],
        String::new(),
    )
    .unwrap();
    let (x, _) = subset().batch(0, 64);
    let want = logits_no_grad(&native, &x).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join("m.pt");
    native.export_torchscript(&pt).unwrap();
    let ts = load_classifier(&spec(pt, None), [1, 28, 28]).unwrap();
    assert_eq!(ts.info().format, "torchscript");
    let got = logits_no_grad(ts.as_ref(), &x).unwrap();
    assert!(max_diff(&got, &want) < 1e-5);
}
