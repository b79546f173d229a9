//! Models that would give silently wrong answers: NaN, integer or constant logits, and a wrong
//! input normalisation. Each must stop `score` and `margins` with an error that names the cause
//! (the normalisation check has an override flag), never exit 0 with `pred = 0`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use brittle::data::{DataSpec, Dataset};
use brittle::model::checked::{check_logits, LogitError};
use brittle::model::sanity::{check_first_batch, Configured, SanityError};
use brittle::model::{load_classifier, ModelInfo, ModelSpec};
use tch::{CModule, Device, Kind, Tensor};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets");

fn brittle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brittle"))
        .args(args)
        .args(["--device", "cpu", "--threads", "1"])
        .env("BRITTLE_NO_PROGRESS", "1")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A TorchScript module traced from `f` for CIFAR-shaped input, saved as `<dir>/<name>.pt`.
fn traced(dir: &Path, name: &str, f: impl Fn(&Tensor) -> Tensor) -> PathBuf {
    let example = Tensor::full([2, 3, 32, 32], 0.5, (Kind::Float, Device::Cpu));
    let m = CModule::create_by_tracing(name, "forward", &[example], &mut |xs: &[Tensor]| {
        vec![f(&xs[0])]
    })
    .unwrap();
    let path = dir.join(format!("{name}.pt"));
    m.save(&path).unwrap();
    path
}

/// The first ten pixels as logits: a valid 10-class model to derive broken ones from.
fn ten_pixels(x: &Tensor) -> Tensor {
    x.flatten(1, -1).narrow(1, 0, 10)
}

/// Eight CIFAR-format samples of pseudo-random bytes whose first pixel is 0 only in sample 3.
fn cifar_file(dir: &Path) -> PathBuf {
    let mut bytes = Vec::new();
    for s in 0..8u32 {
        bytes.push((s % 10) as u8);
        bytes.extend((0..3072u32).map(|i| {
            if i == 0 {
                if s == 3 {
                    0
                } else {
                    1 + (s as u8)
                }
            } else {
                (i.wrapping_mul(2_654_435_761).wrapping_add(s * 97) >> 24) as u8
            }
        }));
    }
    let path = dir.join("eight.bin");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn info() -> ModelInfo {
    ModelInfo {
        name: "hand".into(),
        format: "test".into(),
        fingerprint: String::new(),
        num_classes: 3,
        input_shape: [1, 1, 1],
        has_features: false,
    }
}

#[test]
fn check_logits_names_the_first_bad_entry_and_integer_kinds() {
    let z = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, f32::INFINITY, f32::NAN]).view([2, 3]);
    match check_logits(&info(), &z) {
        Err(LogitError::NotFinite {
            row, class, value, ..
        }) => {
            assert_eq!((row, class), (1, 1));
            assert_eq!(value, f64::INFINITY);
        }
        other => panic!("{other:?}"),
    }
    let ints = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    assert!(matches!(
        check_logits(&info(), &ints),
        Err(LogitError::NotFloat {
            kind: Kind::Int64,
            ..
        })
    ));
    assert_eq!(
        check_logits(
            &info(),
            &Tensor::from_slice(&[1.0f64, -2.0, 0.0]).view([1, 3])
        ),
        Ok(())
    );
}

#[test]
fn nan_logits_stop_score_and_margins_naming_model_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let data = cifar_file(dir.path());
    // 0/0 in the rows whose first pixel is 0: sample 3 only.
    let model = traced(dir.path(), "nanny", |x| {
        let p = x.flatten(1, -1).narrow(1, 0, 1);
        ten_pixels(x) * (&p / &p)
    });
    let out = dir.path().join("out.csv");
    for cmd in ["score", "margins"] {
        let o = brittle(&[
            cmd,
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{cmd}: {e}");
        assert!(
            e.contains("model nanny returns logit NaN") && e.contains("first bad sample: index 3"),
            "{cmd}: {e}"
        );
    }
    // The same model on the samples after the bad one scores (the check is per sample).
    let o = brittle(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--offset",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn integer_and_constant_logits_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let data = cifar_file(dir.path());
    let ints = traced(dir.path(), "ints", |x| {
        (ten_pixels(x) * 100.0).to_kind(Kind::Int64)
    });
    let flat = traced(dir.path(), "flat", |x| ten_pixels(x) * 0.0);
    let out = dir.path().join("out.csv");
    for cmd in ["score", "margins"] {
        let run = |m: &Path, extra: &[&str]| {
            let mut args = vec![
                cmd,
                "--model",
                m.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ];
            args.extend(extra);
            brittle(&args)
        };
        let o = run(&ints, &[]);
        let e = stderr(&o);
        // 101 is Rust's panic exit code.
        assert_eq!(o.status.code(), Some(1), "{cmd}: {e}");
        assert!(
            e.contains("model ints returns Int64 logits") && e.contains("floating-point"),
            "{cmd}: {e}"
        );
        let o = run(&flat, &[]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {e}");
        assert!(e.contains("every logit is equal"), "{cmd}: {e}");
    }
}

fn mnist(limit: usize) -> Dataset {
    DataSpec {
        path: Path::new(ASSETS).join("mnist-test-1000-images-idx3-ubyte.gz"),
        limit: Some(limit),
        ..Default::default()
    }
    .load()
    .unwrap()
}

fn embedded(mean: Option<Vec<f64>>, std: Option<Vec<f64>>) -> Box<dyn brittle::model::Classifier> {
    let spec = ModelSpec {
        arch: Some("small-cnn".into()),
        num_classes: Some(10),
        mean,
        std,
        ..ModelSpec::new(
            Path::new(ASSETS).join("mnist-small-cnn.safetensors"),
            Device::Cpu,
        )
    };
    load_classifier(&spec, [1, 28, 28]).unwrap()
}

#[test]
fn first_batch_passes_the_embedded_model_and_stops_near_chance() {
    let model = embedded(None, None);
    let data = mnist(300);
    let ok = check_first_batch(model.as_ref(), &data, &Configured::None).unwrap();
    assert_eq!(ok.samples, 256);
    assert!(ok.accuracy() > 0.95, "{ok:?}");
    assert!(ok.concern().is_none(), "{ok:?}");
    // The data's own normalisation makes the raw-pixel model worse, not better.
    let other = ok.other.as_ref().unwrap();
    assert!(other.correct < ok.correct, "{ok:?}");

    // Labels shifted by one class: the same model is now right almost never.
    let shifted: Vec<i64> = data.labels.iter().map(|l| (l + 1) % 10).collect();
    let wrong = Dataset::new(
        data.images.shallow_clone(),
        shifted,
        10,
        data.indices.clone(),
        "shifted".into(),
    )
    .unwrap();
    let e = check_first_batch(model.as_ref(), &wrong, &Configured::None).unwrap_err();
    match e.downcast_ref::<SanityError>() {
        Some(SanityError::NearChance {
            samples,
            accuracy,
            floor,
            ..
        }) => {
            assert_eq!(*samples, 256);
            assert!(*accuracy < 5.0 && (*floor - 32.5).abs() < 1e-9, "{e}");
        }
        other => panic!("{other:?}: {e}"),
    }
    assert!(e.to_string().contains("normalisation (mean/std)"), "{e}");

    // 11 samples, none right: not significant at 1% (0.675^11 = 1.3%), so no stop.
    let few = wrong.select(&(0..11).collect::<Vec<_>>()).unwrap();
    let r = check_first_batch(model.as_ref(), &few, &Configured::None).unwrap();
    assert_eq!((r.samples, r.correct), (11, 0));
    assert!(r.concern().is_some());
}

#[test]
fn a_normalisation_the_model_does_not_expect_stops_with_a_flag_to_override() {
    // The embedded CNN was trained on raw pixels; mapping them to [-1, 1] in front of it is
    // wrong (MNIST's usual 0.1307/0.3081 only costs this robust CNN 3.5 points: a warning).
    let (mean, std) = (vec![0.5], vec![0.5]);
    let model = embedded(Some(mean.clone()), Some(std.clone()));
    let data = mnist(256);
    let e =
        check_first_batch(model.as_ref(), &data, &Configured::MeanStd { mean, std }).unwrap_err();
    match e.downcast_ref::<SanityError>() {
        Some(SanityError::Normalisation {
            accuracy,
            other_accuracy,
            p,
            ..
        }) => assert!(
            *other_accuracy > 95.0 && *accuracy < 80.0 && *p < 1e-10,
            "{e}"
        ),
        other => panic!("{other:?}: {e}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.csv");
    let args = [
        "score",
        "--model",
        &format!("{ASSETS}/mnist-small-cnn.safetensors"),
        "--arch",
        "small-cnn",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--data",
        &format!("{ASSETS}/mnist-test-1000-images-idx3-ubyte.gz"),
        "--limit",
        "256",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = brittle(&args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("normalisation (mean/std) is probably wrong")
            && e.contains("drop --mean/--std")
            && e.contains("--allow-low-accuracy"),
        "{e}"
    );
    assert!(!out.exists());
    let mut forced = args.to_vec();
    forced.push("--allow-low-accuracy");
    let o = brittle(&forced);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("warning:") && e.contains("mean/std"), "{e}");
    assert!(out.exists());
}

/// Every shared CIFAR-10 model: its ONNX export without a mean/std and its TorchScript export
/// (normalisation baked in) with one added are stopped, except the twice-normalised
/// cifar_cnn_a_adv (60.5% against 66.8% on 256 samples is not significant: a warning); the
/// intended set-ups pass silently.
#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn shared_models_wrong_normalisation_is_caught() {
    let shared = common::shared();
    let manifest = common::manifest(&shared);
    let data = shared.join("data/cifar10/real-pool.bin");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.csv");
    for m in manifest["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let list = |k: &str| {
            m["normalisation"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (mean, std) = (list("mean"), list("std"));
        let onnx = shared.join(format!("models/{name}.onnx"));
        let pt = shared.join(format!("models/{name}.pt"));
        let run = |model: &Path, norm: bool| {
            let mut a = vec![
                "score".to_string(),
                "--model".into(),
                model.display().to_string(),
                "--data".into(),
                data.display().to_string(),
                "--out".into(),
                out.display().to_string(),
            ];
            if norm {
                a.extend(["--mean".into(), mean.clone(), "--std".into(), std.clone()]);
            }
            brittle(&a.iter().map(String::as_str).collect::<Vec<_>>())
        };
        for (model, norm, ok) in [
            (&onnx, true, true),
            (&pt, false, true),
            (&onnx, false, false),
        ] {
            let o = run(model, norm);
            let e = stderr(&o);
            assert_eq!(o.status.success(), ok, "{name} {model:?} {norm}: {e}");
            if ok {
                assert!(!e.contains("warning"), "{name}: {e}");
            } else {
                assert!(e.contains("normalisation (mean/std)"), "{name}: {e}");
            }
        }
        let o = run(&pt, true);
        let e = stderr(&o);
        if name == "cifar_cnn_a_adv" {
            assert!(o.status.success() && e.contains("warning:"), "{name}: {e}");
        } else {
            assert!(!o.status.success(), "{name}: {e}");
            assert!(
                e.contains("normalisation (mean/std) is probably wrong"),
                "{name}: {e}"
            );
        }
    }
}

/// `x` normalised as `Normalizer` does: the same tensor operations, so equal bits.
fn normalise(x: &Tensor, mean: f64, std: f64) -> Tensor {
    let t = |v: f64| {
        Tensor::from_slice(&[v])
            .to_kind(Kind::Float)
            .view([1, 1, 1, 1])
    };
    (x - t(mean)) / t(std)
}

#[test]
fn mean_std_in_front_reach_logits_features_and_leave_the_last_layer() {
    let (mean, std) = (0.1307, 0.3081);
    let plain = embedded(None, None);
    let normed = embedded(Some(vec![mean]), Some(vec![std]));
    let x = mnist(16).images;
    let xn = normalise(&x, mean, std);
    let (f1, l1) = normed.features_and_logits(&x).unwrap().unwrap();
    let (f0, l0) = plain.features_and_logits(&xn).unwrap().unwrap();
    assert!(f1.equal(&f0) && l1.equal(&l0));
    assert!(normed.logits(&x).unwrap().equal(&l0));
    // The pixels as given, unnormalised, give other logits.
    assert!(!plain.logits(&x).unwrap().equal(&l0));
    // The last layer acts on features: the same weights, and it rebuilds the logits.
    let ((w1, b1), (w0, b0)) = (normed.last_linear().unwrap(), plain.last_linear().unwrap());
    assert!(w1.equal(&w0) && b1.equal(&b0));
    let rebuilt = f1.matmul(&w1.tr()) + b1;
    assert!((rebuilt - &l1).abs().max().double_value(&[]) < 1e-4);
    // Same model info, but the fingerprint holds the normalisation.
    let (i1, i0) = (normed.info(), plain.info());
    assert_eq!(
        (&i1.name, &i1.format, i1.num_classes, i1.has_features),
        (&i0.name, &i0.format, i0.num_classes, i0.has_features)
    );
    assert_ne!(i1.fingerprint, i0.fingerprint);
    // Images with other channels than the mean/std are an error, not a broadcast or a panic.
    let e = normed.logits(&Tensor::zeros([2, 3, 28, 28], (Kind::Float, Device::Cpu)));
    let e = format!("{:#}", e.unwrap_err());
    assert!(
        e.contains("[N, 1, H, W]") && e.contains("[2, 3, 28, 28]"),
        "{e}"
    );
}

#[test]
fn model_option_errors_name_the_option_and_the_command_line_names_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = cifar_file(dir.path());
    let out = dir.path().join("s.csv");
    let odd = dir.path().join("model.weights");
    std::fs::write(&odd, b"not a model").unwrap();
    let weights = Path::new(ASSETS).join("mnist-small-cnn.safetensors");
    let cases: [(&Path, Option<&str>, &str, &str); 4] = [
        (&odd, None, "name the model format", "--model-format"),
        (&weights, None, "name the architecture", "--arch"),
        (
            &weights,
            Some("no-such-net"),
            "unknown architecture",
            "--arch",
        ),
        (&weights, Some("small-cnn@x"), "width after '@'", "--arch"),
    ];
    for (model, arch, what, flag) in cases {
        // The library names the concept, never a flag.
        let spec = ModelSpec {
            arch: arch.map(str::to_owned),
            ..ModelSpec::new(model, Device::Cpu)
        };
        let e = format!("{:#}", load_classifier(&spec, [3, 32, 32]).err().unwrap());
        assert!(e.contains(what) && !e.contains("--"), "{e}");
        // The command line adds the flag that sets it.
        let (m, d, o) = (
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        let mut args = vec!["score", "--model", m, "--data", d, "--out", o];
        if let Some(a) = arch {
            args.extend(["--arch", a]);
        }
        let run = brittle(&args);
        let e = stderr(&run);
        assert!(!run.status.success(), "{e}");
        assert!(e.contains(what) && e.contains(flag), "{e}");
    }
}
