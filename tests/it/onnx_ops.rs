//! ONNX operators against onnxruntime, on the small graphs `scripts/fixtures/onnx.py` writes
//! (one per operator family, opsets 9 to 17), plus batch handling, features, input layouts,
//! the input gradient (finite differences) and load-time refusal of unsupported nodes.

use std::path::PathBuf;

use brittle::model::InputLayout;
use brittle::model::{load_classifier, logits_and_grad, logits_no_grad, Classifier, ModelSpec};
use brittle::util::OptionError;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onnx")).join(name)
}

fn spec(name: &str, layout: InputLayout) -> ModelSpec {
    ModelSpec {
        input_layout: layout,
        ..ModelSpec::new(fixture(&format!("{name}.onnx")), Device::Cpu)
    }
}

/// The stored input and onnxruntime output of a fixture.
fn reference(name: &str) -> (Tensor, Tensor) {
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tensor = |v: &serde_json::Value| {
        let shape: Vec<i64> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        let data: Vec<f32> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_f64().unwrap() as f32)
            .collect();
        Tensor::from_slice(&data).reshape(shape)
    };
    (tensor(&json["input"]), tensor(&json["output"]))
}

fn image_shape(x: &Tensor) -> [i64; 3] {
    let s = x.size();
    [s[1], s[2], s[3]]
}

/// Loads a fixture, checks its logits against onnxruntime (1e-5 of the largest output) and
/// returns the model.
fn check(name: &str, layout: InputLayout) -> Box<dyn Classifier> {
    let (x, want) = reference(name);
    // brittle hands models NCHW pixels; an NHWC fixture input is permuted back.
    let x = match layout {
        InputLayout::Nchw => x,
        InputLayout::Nhwc => x.permute([0, 3, 1, 2]).contiguous(),
    };
    let model = load_classifier(&spec(name, layout), image_shape(&x))
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let got = logits_no_grad(model.as_ref(), &x).unwrap();
    assert_eq!(got.size(), want.size(), "{name}: output shape");
    let err = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1.0);
    assert!(
        err <= 1e-5 * scale,
        "{name}: max abs error {err} (scale {scale})"
    );
    assert_eq!(model.info().num_classes, want.size()[1]);
    model
}

#[test]
fn conv_batchnorm_pool_gemm_opset9() {
    let m = check("conv_bn_pool_gemm_op9", InputLayout::Nchw);
    assert_eq!(m.info().format, "onnx (batch: native)");
    // The graph ends in Gemm(transB=1, alpha=0.5, beta=2): features and last layer exposed.
    assert!(m.info().has_features);
    let (w, b) = m.last_linear().unwrap();
    assert_eq!((w.size(), b.size()), (vec![5, 64], vec![5]));
    let (x, _) = reference("conv_bn_pool_gemm_op9");
    let (f, l) = m.features_and_logits(&x).unwrap().unwrap();
    assert_eq!(f.size(), vec![2, 64]);
    let rebuilt = f.matmul(&w.tr()) + &b;
    assert!((rebuilt - l).abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn conv_pad_pool_clip_variants_opset11() {
    check("conv_variants_op11", InputLayout::Nchw);
}

#[test]
fn shape_subgraph_and_elementwise_opset13() {
    let m = check("shape_ops_op13", InputLayout::Nchw);
    // Ends in Softmax, not a linear layer: no features.
    assert!(!m.info().has_features);
    assert!(m.last_linear().is_none());
}

#[test]
fn pad_modes_ceil_pools_opset17() {
    check("pad_pool_op17", InputLayout::Nchw);
}

#[test]
fn legacy_attributes_opset9() {
    check("legacy_attrs_op9", InputLayout::Nchw);
}

#[test]
fn dropout_shape_slices_integer_division_opset15() {
    check("misc_op15", InputLayout::Nchw);
}

#[test]
fn fixed_batch_of_one_is_rewritten_to_run_batched() {
    // Exported with input [1, 3, 4, 4] and Reshape to [1, -1]; the reference ran per sample.
    let m = check("batch1_reshape_op11", InputLayout::Nchw);
    assert_eq!(m.info().format, "onnx (batch: rewritten 1 Reshape)");
}

#[test]
fn fixed_batch_of_one_that_cannot_be_rewritten_runs_per_sample() {
    // The Reshape's leading 1 comes from a Transpose, not the batch: rewriting would be wrong.
    let m = check("batch1_transpose_op11", InputLayout::Nchw);
    assert_eq!(m.info().format, "onnx (batch: per-sample)");
    let (x, _) = reference("batch1_transpose_op11");
    let (_, grad) = logits_and_grad(m.as_ref(), &x, |l| l.select(1, 0)).unwrap();
    assert_eq!(grad.size(), x.size());
}

#[test]
fn nhwc_layout_is_permuted_before_the_graph() {
    let m = check("nhwc_matmul_op13", InputLayout::Nhwc);
    // MatMul + Add at the end is a linear layer too.
    assert!(m.info().has_features);
    assert_eq!(m.last_linear().unwrap().0.size(), vec![5, 16]);
    // The same graph with the default NCHW layout is refused, naming the input layout (the
    // command line adds the flag).
    let err = load_classifier(&spec("nhwc_matmul_op13", InputLayout::Nchw), [3, 5, 6])
        .err()
        .expect("an NHWC graph fed NCHW must be refused");
    assert!(
        format!("{err:#}").contains("the input layout must be nhwc"),
        "{err:#}"
    );
    let option = err.chain().find_map(|e| e.downcast_ref::<OptionError>());
    assert_eq!(option.map(|e| e.field), Some("input_layout"));
}

#[test]
fn mean_and_std_apply_inside_the_graph() {
    let (x, want) = reference("conv_bn_pool_gemm_op9");
    let (mean, std) = (vec![0.2, 0.4, 0.6], vec![0.5, 0.25, 2.0]);
    let mut s = spec("conv_bn_pool_gemm_op9", InputLayout::Nchw);
    s.mean = Some(mean.clone());
    s.std = Some(std.clone());
    let m = load_classifier(&s, image_shape(&x)).unwrap();
    let t = |v: &[f64]| {
        Tensor::from_slice(v)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1])
    };
    // Pixels that normalise to the fixture input.
    let pixels = &x * t(&std) + t(&mean);
    let got = logits_no_grad(m.as_ref(), &pixels).unwrap();
    assert!((got - want).abs().max().double_value(&[]) < 1e-4);
}

#[test]
fn input_gradient_matches_finite_differences() {
    let (x, _) = reference("shape_ops_op13");
    let m = load_classifier(&spec("shape_ops_op13", InputLayout::Nchw), image_shape(&x)).unwrap();
    let c = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, -1.0, 2.0]).view([1, 6]);
    let objective = |l: &Tensor| (l * &c).sum_dim_intlist(1, false, Kind::Float);
    let (_, grad) = logits_and_grad(m.as_ref(), &x, objective).unwrap();
    let f = |x: &Tensor| {
        let l = logits_no_grad(m.as_ref(), x).unwrap();
        objective(&l).sum(Kind::Double).double_value(&[])
    };
    let flat = x.flatten(0, -1);
    let g = grad.flatten(0, -1);
    let scale = g.abs().max().double_value(&[]);
    assert!(scale > 1e-3, "gradient vanishes: {scale}");
    let h = 1e-2;
    for i in (0..flat.size()[0]).step_by(7) {
        let bump = |d: f64| {
            let y = flat.copy();
            let _ = y.get(i).fill_(flat.double_value(&[i]) + d);
            y.view_as(&x)
        };
        let fd = (f(&bump(h)) - f(&bump(-h))) / (2.0 * h);
        let ad = g.double_value(&[i]);
        assert!(
            (fd - ad).abs() <= 1e-3 * scale,
            "coordinate {i}: autograd {ad}, finite difference {fd}"
        );
    }
}

#[test]
fn unsupported_nodes_are_refused_at_load_with_node_operator_and_opset() {
    let err = load_classifier(&spec("unsupported_op13", InputLayout::Nchw), [3, 4, 4])
        .err()
        .expect("Erf is not supported");
    let msg = format!("{err:#}");
    for part in [
        "unsupported_op13.onnx",
        "\"my_erf\"",
        "operator Erf (opset 13)",
        "\"odd_leaky\"",
        "operator LeakyRelu (opset 13)",
        "attribute \"beta\"",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    assert!(!msg.contains("fine_relu"), "{msg}");
}
