//! NPY/NPZ reader against numpy-written files (scripts/fixtures/native.py), and every data
//! reader's errors on bad input.

use std::path::{Path, PathBuf};

use brittle::data::{DataFormat, DataSpec, Dataset};
use tch::Tensor;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/native/npy")
        .join(name)
}

fn load(
    path: PathBuf,
    labels: Option<&str>,
    offset: usize,
    limit: Option<usize>,
) -> anyhow::Result<Dataset> {
    DataSpec {
        path,
        format: None,
        labels: labels.map(fixture),
        offset,
        limit,
    }
    .load()
}

fn err(r: anyhow::Result<Dataset>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn expected() -> Tensor {
    Tensor::read_safetensors(fixture("expected.safetensors"))
        .unwrap()
        .remove(0)
        .1
}

#[test]
fn npy_and_npz_layouts_and_types_agree_with_numpy() {
    let want = expected();
    let labels = vec![3, 0, 9, 1, 2];
    for (file, lab) in [
        ("images_u8_nhwc.npy", None),
        ("f32_nchw.npy", None),
        ("test.npz", None),
        ("compressed.npz", None),
        ("f32_nchw.npy", Some("labels_u8_nhwc.npy")),
        ("fortran.npy", Some("labels_u8_nhwc.npy")),
    ] {
        let ds = load(fixture(file), lab, 0, None).unwrap();
        assert_eq!(ds.images.size(), [5, 3, 4, 4], "{file}");
        let diff = (&ds.images - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-7, "{file}: pixels differ by {diff}");
        assert_eq!(ds.labels, labels, "{file}");
        assert_eq!(ds.num_classes, 10, "{file}");
    }
    let gray = load(fixture("gray_nhw.npy"), Some("labels_u8_nhwc.npy"), 0, None).unwrap();
    assert_eq!(gray.images.size(), [5, 1, 4, 4]);
    let diff = (&gray.images - want.narrow(1, 0, 1))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-7);
}

#[test]
fn npy_offset_and_limit() {
    let ds = load(fixture("test.npz"), None, 1, Some(3)).unwrap();
    assert_eq!(ds.indices, vec![1, 2, 3]);
    assert_eq!(ds.labels, vec![0, 9, 1]);
    let diff = (&ds.images - expected().narrow(0, 1, 3))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-7);
    let e = err(load(fixture("test.npz"), None, 5, None));
    // The library names the option, not a flag (the CLI adds `--offset`).
    assert!(
        e.contains("offset 5 is past the end (5 samples)") && !e.contains("--"),
        "{e}"
    );
}

#[test]
fn npy_bad_inputs_are_errors_naming_the_file() {
    let cases = [
        ("nan.npy", Some("short_labels.npy"), "3 labels"),
        ("nan.npy", Some("labels_u8_nhwc.npy"), "NaN"),
        ("range.npy", Some("labels_u8_nhwc.npy"), "expected [0, 1]"),
        (
            "four_channels.npy",
            Some("short_labels.npy"),
            "no channel axis of size 1 or 3",
        ),
        (
            "f32_nchw.npy",
            Some("negative_labels.npy"),
            "label -1 of sample 2",
        ),
        (
            "f32_nchw.npy",
            Some("float_labels.npy"),
            "expected integers",
        ),
        ("f32_nchw.npy", Some("missing.npy"), "does not exist"),
        ("gray_nhw.npy", None, "name the labels file"),
        ("nokeys.npz", None, "no image array"),
    ];
    for (file, labels, want) in cases {
        let e = err(load(fixture(file), labels, 0, None));
        assert!(e.contains(want), "{file}: {e}");
        assert!(
            e.contains(file),
            "{file}: error does not name the file: {e}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("f32_nchw.npy")).unwrap();
    let cut = dir.path().join("cut.npy");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(load(cut, Some("labels_u8_nhwc.npy"), 0, None));
    assert!(
        e.contains("cut.npy") && e.contains("not a valid NPY"),
        "{e}"
    );
    let garbage = dir.path().join("garbage.npz");
    std::fs::write(&garbage, b"PK\x03\x04 but not a zip").unwrap();
    let e = err(load(garbage, None, 0, None));
    assert!(
        e.contains("garbage.npz") && e.contains("not a valid NPZ"),
        "{e}"
    );
}

#[test]
fn cifar_bad_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let record = 1 + 3072;
    let mut bytes = vec![0u8; 2 * record];
    let truncated = dir.path().join("truncated.bin");
    std::fs::write(&truncated, &bytes[..record + 100]).unwrap();
    let e = err(load(truncated, None, 0, None));
    assert!(
        e.contains("truncated.bin") && e.contains("not a whole number"),
        "{e}"
    );
    bytes[record] = 10; // label 10 in CIFAR-10
    let bad_label = dir.path().join("label.bin");
    std::fs::write(&bad_label, &bytes).unwrap();
    let e = err(load(bad_label, None, 0, None));
    assert!(e.contains("label 10 of sample 1 is outside 0..10"), "{e}");
    let e = err(load(dir.path().join("absent.bin"), None, 0, None));
    assert!(
        e.contains("absent.bin") && e.contains("does not exist"),
        "{e}"
    );
    let e = err(DataSpec {
        path: dir.path().join("x.weird"),
        ..Default::default()
    }
    .load());
    assert!(
        e.contains("does not exist") || e.contains("cannot tell the data format"),
        "{e}"
    );
    let odd = dir.path().join("images.weird");
    std::fs::write(&odd, b"x").unwrap();
    let e = err(DataSpec {
        path: odd.clone(),
        ..Default::default()
    }
    .load());
    assert!(e.contains("cannot tell the data format"), "{e}");
    let e = err(DataSpec {
        path: odd,
        format: Some(DataFormat::Npy),
        ..Default::default()
    }
    .load());
    assert!(
        e.contains("images.weird") && e.contains("not a valid NPY"),
        "{e}"
    );
}
