//! Every ONNX model of `shared/models` against its TorchScript twin: logits, the input gradient
//! of the logit margin, and the accuracy that `manifest.json` records on `real-pool.bin`.

use brittle::model::{load_classifier, logits_and_grad, logits_no_grad};
use tch::{Kind, Tensor};

use crate::common;

use crate::common::{rel_err, spec};

/// Top logit minus the runner-up, per sample.
fn margin(logits: &Tensor) -> Tensor {
    let top = logits.topk(2, 1, true, true).0;
    top.select(1, 0) - top.select(1, 1)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn onnx_models_match_their_torchscript_twins() {
    let shared = common::shared();
    let models = shared.join("models");
    let manifest = common::manifest(&shared);
    let data = common::real_pool(&shared);
    let shape = data.input_shape();
    let entries = manifest["models"].as_array().unwrap();
    assert!(
        entries.len() >= 4,
        "manifest lists {} models",
        entries.len()
    );
    for m in entries {
        let name = m["name"].as_str().unwrap();
        let norm = &m["normalisation"];
        let onnx = load_classifier(
            &spec(
                models.join(m["onnx"].as_str().unwrap()),
                None,
                Some(floats(&norm["mean"])),
                Some(floats(&norm["std"])),
            ),
            shape,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let ts = load_classifier(
            &spec(
                models.join(m["torchscript"].as_str().unwrap()),
                None,
                None,
                None,
            ),
            shape,
        )
        .unwrap();
        let format = &onnx.info().format;
        println!("{name}: {format}, features {}", onnx.info().has_features);
        // A graph exported with a fixed batch of 1 must still run batched, not sample by sample.
        assert!(!format.contains("per-sample"), "{name}: {format}");

        let (x, _) = data.batch(0, 64);
        let (lo, go) = logits_and_grad(onnx.as_ref(), &x, margin).unwrap();
        let (lt, gt) = logits_and_grad(ts.as_ref(), &x, margin).unwrap();
        let (el, eg) = (rel_err(&lo, &lt), rel_err(&go, &gt));
        println!(
            "{name}: logits rel err {el:.2e}, margin gradient rel err {eg:.2e} (|grad| max {:.3e})",
            gt.abs().max().double_value(&[])
        );
        assert!(el <= 1e-4, "{name}: logits differ by {el}");
        assert!(eg <= 1e-3, "{name}: gradients differ by {eg}");

        if let Some((f, l)) = onnx.features_and_logits(&x).unwrap() {
            let (w, b) = onnx
                .last_linear()
                .expect("features come with the last layer");
            let rebuilt = f.matmul(&w.tr()) + b;
            assert!(rel_err(&rebuilt, &l) <= 1e-5, "{name}: W f + b != logits");
        }

        let mut correct = 0i64;
        for start in (0..data.len()).step_by(256) {
            let end = (start + 256).min(data.len());
            let (x, y) = data.batch(start, end);
            let pred = logits_no_grad(onnx.as_ref(), &x).unwrap().argmax(1, false);
            let y = Tensor::from_slice(y);
            correct += pred.eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
        }
        let acc = correct as f64 / data.len() as f64;
        let want = m["accuracy_pool_onnx"].as_f64().unwrap();
        println!("{name}: accuracy {acc} (manifest {want})");
        assert!(
            (acc - want).abs() < 0.5 / data.len() as f64,
            "{name}: accuracy {acc} != {want}"
        );
    }
}
