//! Certified bounds against the NumPy float64 reference of `scripts/fixtures/bounds.py`
//! (auto_LiRPA does not install in the dev venv): IBP and CROWN margin lower bounds on two
//! random small ONNX networks and on the shared CNN-A, within 1e-5; α-CROWN at least as tight
//! as CROWN.

use std::path::{Path, PathBuf};

use brittle::certify::{bound_graph, margin_lower_bounds, Method};
use brittle::model::load_classifier;
use brittle::norm::Norm;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::common::{self, rel_err, spec};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/certify")
        .join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| match x {
            Value::Array(_) => floats(x),
            _ => vec![x.as_f64().unwrap()],
        })
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn method(name: &str) -> Method {
    name.parse().unwrap()
}

/// Compares every case of a fixture: max |got - want| / max |want| (the suite's `rel_err`)
/// within 1e-5. brittle bounds in float32: on CNN-A the sums over 3072 inputs leave absolute
/// errors up to 2e-5 on bounds up to 9 (2.2e-6 relative).
fn check_cases(
    name: &str,
    model: &dyn brittle::model::Classifier,
    x: &Tensor,
    pred: &Tensor,
    cases: &Value,
) -> f64 {
    let graph = bound_graph(model).unwrap();
    let direct = model.logits(x).unwrap();
    let through = graph.forward(x).unwrap();
    assert!(rel_err(&through, &direct) < 1e-5, "{name}: graph forward");
    let n = x.size()[0];
    let mut worst = 0f64;
    for case in cases.as_array().unwrap() {
        let norm: Norm = case["norm"].as_str().unwrap().parse().unwrap();
        let eps = case["eps"].as_f64().unwrap();
        let m = method(case["method"].as_str().unwrap());
        // The first `n` samples of the fixture's (a test may take fewer, to save time).
        let all = floats(&case["lower"]);
        let k = all.len() / pred_rows(cases);
        let want = all[..n as usize * k].to_vec();
        let got = margin_lower_bounds(
            &graph,
            x,
            pred,
            &Tensor::full([n], eps, (Kind::Float, tch::Device::Cpu)),
            norm,
            m,
        )
        .unwrap();
        let got = Vec::<f64>::try_from(got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max).max(1e-12);
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0.0, f64::max);
        println!("{name} {norm} ε={eps:.5} {m:?}: max error {err:.2e}");
        assert!(
            err <= 1e-5,
            "{name} {norm} ε={eps} {m:?}: error {err}\n got {got:?}\nwant {want:?}"
        );
        worst = worst.max(err);
    }
    worst
}

/// Samples in a fixture's cases (rows of `lower`).
fn pred_rows(cases: &Value) -> usize {
    cases[0]["lower"].as_array().unwrap().len()
}

/// α-CROWN's bounds are never below CROWN's, and above them somewhere.
fn check_alpha(
    name: &str,
    model: &dyn brittle::model::Classifier,
    x: &Tensor,
    pred: &Tensor,
    eps: f64,
) {
    let graph = bound_graph(model).unwrap();
    let n = x.size()[0];
    let e = Tensor::full([n], eps, (Kind::Float, tch::Device::Cpu));
    let crown = margin_lower_bounds(&graph, x, pred, &e, Norm::Linf, Method::Crown).unwrap();
    let alpha = margin_lower_bounds(&graph, x, pred, &e, Norm::Linf, Method::AlphaCrown).unwrap();
    let gain = (&alpha - &crown).min().double_value(&[]);
    let best = (&alpha - &crown).max().double_value(&[]);
    println!("{name}: α-CROWN - CROWN in [{gain:.2e}, {best:.3}]");
    assert!(gain >= -1e-6, "{name}: α-CROWN below CROWN by {gain}");
    assert!(best > 1e-3, "{name}: α-CROWN never tighter ({best})");
}

#[test]
fn small_onnx_networks_match_the_numpy_reference() {
    let _t = common::one_torch_thread();
    for name in ["mlp", "cnn"] {
        let f = json(&format!("{name}.json"));
        let shape: Vec<i64> = ints(&f["input_shape"]);
        let shape3 = [shape[0], shape[1], shape[2]];
        let model = load_classifier(
            &spec(fixture(&format!("{name}.onnx")), None, None, None),
            shape3,
        )
        .unwrap();
        let xs = floats(&f["x"]);
        let n = (xs.len() as i64) / shape.iter().product::<i64>();
        let x = Tensor::from_slice(&xs)
            .to_kind(Kind::Float)
            .view([n, shape[0], shape[1], shape[2]]);
        let pred = Tensor::from_slice(&ints(&f["pred"]));
        let logits = model.logits(&x).unwrap();
        assert_eq!(logits.argmax(1, false), pred, "{name}: predictions");
        check_cases(name, model.as_ref(), &x, &pred, &f["cases"]);
        check_alpha(name, model.as_ref(), &x, &pred, 0.05);
    }
}

#[test]
#[ignore = "needs ../shared (cifar_cnn_a_adv.onnx and the real pool)"]
fn shared_cnn_a_matches_the_numpy_reference() {
    let shared = common::shared();
    let f = json("cnn_a.json");
    let data = common::real_pool(&shared);
    // Two of the fixture's four images keep the test near 20 s on a loaded 2-core machine.
    let rows = ints(&f["rows"])[..2].to_vec();
    let x = Tensor::cat(
        &rows
            .iter()
            .map(|&r| data.batch(r as usize, r as usize + 1).0)
            .collect::<Vec<_>>(),
        0,
    );
    let model = load_classifier(
        &spec(
            shared.join("models/cifar_cnn_a_adv.onnx"),
            None,
            Some(floats(&f["mean"])),
            Some(floats(&f["std"])),
        ),
        data.input_shape(),
    )
    .unwrap();
    let pred = Tensor::from_slice(&ints(&f["pred"])[..2]);
    check_cases("cnn-a", model.as_ref(), &x, &pred, &f["cases"]);
    check_alpha("cnn-a", model.as_ref(), &x, &pred, 2.0 / 255.0);
}
