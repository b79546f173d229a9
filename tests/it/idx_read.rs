//! IDX reader: layout, gzip, label discovery, windows, and one clear error per kind of bad file.

use std::io::Write;
use std::path::{Path, PathBuf};

use brittle::data::{DataSpec, Dataset};

fn images_bytes(n: u32, h: u32, w: u32) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2051u32, n, h, w] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend((0..n * h * w).map(|i| (i % 251) as u8));
    b
}

fn labels_bytes(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2049u32, labels.len() as u32] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    if gz {
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap();
    } else {
        f.write_all(bytes).unwrap();
    }
    p
}

fn load(
    path: &Path,
    labels: Option<&Path>,
    offset: usize,
    limit: Option<usize>,
) -> anyhow::Result<Dataset> {
    DataSpec {
        path: path.to_path_buf(),
        format: Some(brittle::data::DataFormat::Idx),
        labels: labels.map(Path::to_path_buf),
        offset,
        limit,
    }
    .load()
}

#[test]
fn reads_raw_and_gzip_with_labels_found_beside() {
    let dir = tempfile::tempdir().unwrap();
    let labels = [3u8, 1, 4, 1, 5];
    for (gz, img, lab) in [
        (false, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        (
            true,
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ),
        (false, "x-images.idx3-ubyte", "x-labels.idx1-ubyte"),
    ] {
        let p = write(dir.path(), img, &images_bytes(5, 4, 3), gz);
        write(dir.path(), lab, &labels_bytes(&labels), gz);
        let d = load(&p, None, 1, Some(3)).unwrap();
        assert_eq!(d.images.size(), [3, 1, 4, 3]);
        assert_eq!(d.labels, [1, 4, 1]);
        assert_eq!(d.indices, [1, 2, 3]);
        assert_eq!(d.num_classes, 10);
        // Sample 1 starts at pixel 12; the last pixel of sample 3 is pixel 47.
        let first = d.images.double_value(&[0, 0, 0, 0]);
        let last = d.images.double_value(&[2, 0, 3, 2]);
        assert!((first - 12.0 / 255.0).abs() < 1e-7, "{first}");
        assert!((last - 47.0 / 255.0).abs() < 1e-7, "{last}");
    }
}

#[test]
fn explicit_labels_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "a.idx3", &images_bytes(2, 2, 2), false);
    let l = write(dir.path(), "my-labels", &labels_bytes(&[9, 0]), true);
    let d = load(&p, Some(&l), 0, None).unwrap();
    assert_eq!(d.labels, [9, 0]);
}

/// Asserts the error chain mentions `file` and `what`.
fn assert_err(r: anyhow::Result<Dataset>, file: &Path, what: &str) {
    let msg = format!("{:#}", r.expect_err("bad input must fail"));
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(msg.contains(&name), "error does not name {name}: {msg}");
    assert!(msg.contains(what), "error does not say {what:?}: {msg}");
}

#[test]
fn bad_files_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good_labels = labels_bytes(&[0, 1, 2]);

    // Wrong magic: a labels file given as images.
    let img = write(d, "m1-images-idx3-ubyte", &labels_bytes(&[0, 1, 2]), false);
    write(d, "m1-labels-idx1-ubyte", &good_labels, false);
    assert_err(load(&img, None, 0, None), &img, "magic");

    // Truncated images.
    let mut short = images_bytes(3, 28, 28);
    short.truncate(short.len() - 10);
    let img = write(d, "t-images-idx3-ubyte.gz", &short, true);
    write(d, "t-labels-idx1-ubyte.gz", &good_labels, true);
    assert_err(load(&img, None, 0, None), &img, "truncated");

    // Label out of range.
    let img = write(d, "r-images-idx3-ubyte", &images_bytes(3, 2, 2), false);
    let lab = write(d, "r-labels-idx1-ubyte", &labels_bytes(&[0, 10, 2]), false);
    assert_err(load(&img, None, 0, None), &lab, "label 10");

    // Count mismatch.
    let img = write(d, "c-images-idx3-ubyte", &images_bytes(3, 2, 2), false);
    let lab = write(d, "c-labels-idx1-ubyte", &labels_bytes(&[0, 1]), false);
    assert_err(load(&img, None, 0, None), &lab, "2 labels");

    // No labels beside the images.
    let img = write(d, "alone-images-idx3-ubyte", &images_bytes(3, 2, 2), false);
    // The library names the missing file; the CLI adds its flag (`--labels`).
    assert_err(load(&img, None, 0, None), &img, "name the labels file");

    // Offset past the end.
    let img = write(d, "o-images-idx3-ubyte", &images_bytes(3, 2, 2), false);
    write(d, "o-labels-idx1-ubyte", &good_labels, false);
    assert_err(load(&img, None, 3, None), &img, "past the end");

    // Corrupt gzip stream.
    let img = d.join("z-images-idx3-ubyte.gz");
    std::fs::write(&img, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    write(d, "z-labels-idx1-ubyte.gz", &good_labels, true);
    assert_err(load(&img, None, 0, None), &img, "gzip");
}

/// The committed MNIST subset against statistics numpy computed (scripts/fixtures/train.py).
#[test]
fn committed_mnist_subset_matches_numpy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = load(
        &root.join("assets/mnist-test-1000-images-idx3-ubyte.gz"),
        None,
        0,
        None,
    )
    .unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/train/mnist_subset_stats.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(d.images.size(), [1000, 1, 28, 28]);
    let counts: Vec<i64> = (0..10)
        .map(|c| d.labels.iter().filter(|&&l| l == c).count() as i64)
        .collect();
    let want_counts: Vec<i64> = serde_json::from_value(want["label_counts"].clone()).unwrap();
    assert_eq!(counts, want_counts);
    let first: Vec<i64> = serde_json::from_value(want["first_labels"].clone()).unwrap();
    assert_eq!(&d.labels[..first.len()], first.as_slice());
    let sum = d.images.sum(tch::Kind::Double).double_value(&[]);
    let want_sum = want["pixel_sum"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() < 1e-6 * want_sum,
        "{sum} vs {want_sum}"
    );
    let px = d.images.double_value(&[7, 0, 14, 14]);
    assert!((px - want["pixel_7_14_14"].as_f64().unwrap()).abs() < 1e-7);
}
