//! TorchScript path against PyTorch (scripts/fixtures/native.py), and the real models of
//! ../shared (#[ignore]d, as every test on it): accuracy as in manifest.json, native CNN-A == TorchScript.

use std::collections::BTreeMap;

use crate::common::{accuracy, fixture, rel_err, spec};
use brittle::model::{load_classifier, logits_no_grad, Classifier};
use brittle::norm::Norm;
use brittle::score::feature_margin;
use tch::Tensor;

use crate::common;

#[test]
fn scripted_features_last_linear_and_feature_margin() {
    let g: BTreeMap<String, Tensor> = Tensor::read_safetensors(fixture("golden_ts.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let x = &g["x"];
    for name in ["ts_features", "ts_tuple"] {
        let model = load_classifier(
            &spec(fixture(&format!("{name}.pt")), None, None, None),
            [3, 4, 4],
        )
        .unwrap();
        let info = model.info();
        assert!(info.has_features, "{name}");
        assert_eq!(info.num_classes, 5, "{name}");
        let (f, l) = tch::no_grad(|| model.features_and_logits(x))
            .unwrap()
            .unwrap();
        assert!(
            rel_err(&f, &g[&format!("{name}_features")]) <= 1e-5,
            "{name} features"
        );
        assert!(
            rel_err(&l, &g[&format!("{name}_logits")]) <= 1e-5,
            "{name} logits"
        );
        let (w, _) = model.last_linear().expect("last linear layer detected");
        assert_eq!(
            rel_err(&w, &g[&format!("{name}_weight")]),
            0.0,
            "{name} weight"
        );
        for (norm, key) in [(Norm::Linf, "fm_linf"), (Norm::L2, "fm_l2")] {
            let got = Tensor::from_slice(&feature_margin(&l, &w, norm).unwrap());
            let e = rel_err(&got, &g[&format!("{name}_{key}")]);
            assert!(e <= 1e-5, "{name} {key}: rel err {e}");
        }
    }
}

fn pool_logits(model: &dyn Classifier, images: &Tensor) -> Tensor {
    logits_no_grad(model, images).unwrap()
}

#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn real_models_reproduce_manifest_accuracy() {
    let shared = common::shared();
    let manifest = common::manifest(&shared);
    let data = common::real_pool(&shared);
    let accuracy = |l: &Tensor| accuracy(l, &data.labels);
    for m in manifest["models"].as_array().unwrap() {
        let file = shared
            .join("models")
            .join(m["torchscript"].as_str().unwrap());
        let model = load_classifier(&spec(file, None, None, None), [3, 32, 32]).unwrap();
        let ts_logits = pool_logits(model.as_ref(), &data.images);
        let acc = accuracy(&ts_logits);
        let want = m["accuracy_pool_torchscript"].as_f64().unwrap();
        assert!(
            (acc - want).abs() <= 0.005,
            "{}: accuracy {acc}, manifest {want}",
            m["name"]
        );
        if let Some(st) = m["safetensors"].as_str() {
            let norm = &m["normalisation"];
            let vals = |k: &str| {
                norm[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            };
            let native = load_classifier(
                &spec(
                    shared.join("models").join(st),
                    Some("cnn-a"),
                    Some(vals("mean")),
                    Some(vals("std")),
                ),
                [3, 32, 32],
            )
            .unwrap();
            let native_logits = pool_logits(native.as_ref(), &data.images);
            let e = rel_err(&native_logits, &ts_logits);
            assert!(e <= 1e-4, "{st}: native vs TorchScript logits rel err {e}");
            assert!((accuracy(&native_logits) - want).abs() <= 0.005);
        }
    }
}

#[test]
fn mean_std_in_front_of_torchscript_reach_features_and_keep_the_last_layer() {
    let g: BTreeMap<String, Tensor> = Tensor::read_safetensors(fixture("golden_ts.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let (mean, std) = (vec![0.2, 0.4, 0.6], vec![0.5, 0.25, 2.0]);
    let t = |v: &[f64]| {
        Tensor::from_slice(v)
            .to_kind(tch::Kind::Float)
            .view([1, 3, 1, 1])
    };
    // Pixels that normalise to the golden input.
    let pixels = &g["x"] * t(&std) + t(&mean);
    for name in ["ts_features", "ts_tuple"] {
        let path = fixture(&format!("{name}.pt"));
        let model = load_classifier(
            &spec(path, None, Some(mean.clone()), Some(std.clone())),
            [3, 4, 4],
        )
        .unwrap();
        assert!(model.info().has_features, "{name}");
        let (f, l) = tch::no_grad(|| model.features_and_logits(&pixels))
            .unwrap()
            .unwrap();
        let want_f = &g[&format!("{name}_features")];
        assert!(rel_err(&f, want_f) <= 1e-5, "{name} features");
        assert!(rel_err(&l, &g[&format!("{name}_logits")]) <= 1e-5, "{name}");
        let logits = tch::no_grad(|| model.logits(&pixels)).unwrap();
        assert!(rel_err(&logits, &l) <= 1e-6, "{name} logits");
        let (w, _) = model.last_linear().expect("last linear layer detected");
        assert_eq!(rel_err(&w, &g[&format!("{name}_weight")]), 0.0, "{name}");
    }
}
