//! Hostile data and weight files: each is built in a temporary folder and must give a clear
//! error quickly, with memory bounded by the input, never a panic, an abort or a hang. Cases
//! that used to kill the process (stack overflow) run the CLI binary, so that a signal fails
//! the test instead of taking the test runner down.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::alloc_meter::peak_of;
use brittle::data::DataSpec;

const MIB: u64 = 1 << 20;

/// Runs `f` on its own thread; a hang past `secs` fails the test (the thread is left behind).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("hung for more than {secs} s"),
        Err(e) => panic!("the reader panicked: {e}"),
    }
}

/// Loads `spec` on a separate thread; returns the error chain and the peak Rust allocation.
fn load_err(spec: DataSpec) -> (String, u64) {
    within(30, move || {
        let (r, peak) = peak_of(|| spec.load());
        (
            format!("{:#}", r.expect_err("a hostile file must fail")),
            peak,
        )
    })
}

fn weights_err(path: PathBuf) -> (String, u64) {
    within(30, move || {
        let (r, peak) = peak_of(|| brittle::model::weights::read_tensors(&path));
        (
            format!("{:#}", r.expect_err("a hostile file must fail")),
            peak,
        )
    })
}

fn assert_says(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error does not say {p:?}: {msg}");
    }
}

/// An NPY v1 file with the given header dictionary and raw data.
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_owned();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn npy_dict(descr: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn data_spec(path: PathBuf, labels: Option<PathBuf>) -> DataSpec {
    DataSpec {
        path,
        labels,
        ..DataSpec::default()
    }
}

/// A one-label NPY labels file.
fn one_label(dir: &Path) -> PathBuf {
    write(dir, "labels.npy", &npy(&npy_dict("<i8", "(1,)"), &[0; 8]))
}

#[test]
fn npy_shape_product_overflow_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let labels = one_label(dir.path());
    // (2^32, 2^32, 1) wraps to 0 elements in u64 arithmetic.
    let x = write(
        dir.path(),
        "wrap.npy",
        &npy(&npy_dict("|u1", "(4294967296, 4294967296, 1)"), &[7; 16]),
    );
    let (msg, _) = load_err(data_spec(x, Some(labels)));
    assert_says(&msg, &["wrap.npy", "more elements than can be addressed"]);
}

#[test]
fn npy_header_larger_than_the_file_fails_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let labels = one_label(dir.path());
    let x = write(
        dir.path(),
        "big.npy",
        &npy(&npy_dict("<f4", "(1, 3, 10000, 10000)"), &[0; 64]),
    );
    let (msg, peak) = load_err(data_spec(x, Some(labels)));
    assert_says(&msg, &["big.npy", "truncated or hostile header"]);
    assert!(
        peak < MIB,
        "peak allocation {peak} bytes for a 192-byte file"
    );
}

#[test]
fn npy_deeply_nested_header_is_rejected_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let labels = one_label(dir.path());
    let deep = format!("{}{}", "(".repeat(60), ")".repeat(60));
    let x = write(dir.path(), "deep.npy", &npy(&npy_dict("|u1", &deep), &[]));
    let (msg, _) = load_err(data_spec(x, Some(labels)));
    assert_says(&msg, &["deep.npy", "nests 61 levels deep"]);
}

/// A deflated NPZ holding `x.npy` and `y.npy`; `patch_size` rewrites the uncompressed size that
/// the local and central headers declare for `x.npy` (a lying archive).
fn npz(x: &[u8], y: &[u8], patch_size: Option<u32>) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("x.npy", opts).unwrap();
    zip.write_all(x).unwrap();
    zip.start_file("y.npy", opts).unwrap();
    zip.write_all(y).unwrap();
    let mut bytes = zip.finish().unwrap().into_inner();
    if let Some(size) = patch_size {
        let local = 0; // x.npy is the first entry
        assert_eq!(&bytes[local..local + 4], b"PK\x03\x04");
        bytes[local + 22..local + 26].copy_from_slice(&size.to_le_bytes());
        let central = bytes
            .windows(4)
            .position(|w| w == b"PK\x01\x02")
            .expect("central directory");
        bytes[central + 24..central + 28].copy_from_slice(&size.to_le_bytes());
    }
    bytes
}

#[test]
fn npz_declaring_more_than_deflate_can_make_fails_before_inflating() {
    let dir = tempfile::tempdir().unwrap();
    // 3 GiB declared by both the NPY header and the zip entry; 64 KiB of zeros really there.
    let declared = 3u64 << 30;
    let x = npy(
        &npy_dict("|u1", &format!("({declared}, 1, 1)")),
        &[0; 1 << 16],
    );
    let header_len = x.len() as u64 - (1 << 16);
    let y = npy(&npy_dict("<i8", "(1,)"), &[0; 8]);
    let bytes = npz(&x, &y, Some((declared + header_len) as u32));
    assert!(bytes.len() < 4096, "{} bytes", bytes.len());
    let p = write(dir.path(), "bomb.npz", &bytes);
    let (msg, peak) = load_err(data_spec(p, None));
    assert_says(&msg, &["bomb.npz[x]", "more than deflate can produce"]);
    assert!(peak < 4 * MIB, "peak allocation {peak} bytes");
}

#[test]
fn npz_entry_inflating_past_its_declared_size_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // The header and the zip entry say 8x8 pixels; the stream goes on for 8 MiB.
    let mut x = npy(&npy_dict("|u1", "(1, 8, 8)"), &[0; 64]);
    let declared = x.len() as u32;
    x.extend(std::iter::repeat_n(0u8, 8 << 20));
    let y = npy(&npy_dict("<i8", "(1,)"), &[0; 8]);
    let p = write(dir.path(), "long.npz", &npz(&x, &y, Some(declared)));
    let (msg, peak) = load_err(data_spec(p, None));
    assert_says(&msg, &["long.npz[x]", "trailing bytes"]);
    assert!(peak < 2 * MIB, "peak allocation {peak} bytes");
}

/// An IDX images file with the given dimensions and body, and a labels file beside it.
fn idx_pair(dir: &Path, dims: [u32; 3], body: &[u8], gzip: bool) -> PathBuf {
    let mut img = 0x0803u32.to_be_bytes().to_vec();
    for d in dims {
        img.extend_from_slice(&d.to_be_bytes());
    }
    img.extend_from_slice(body);
    let mut lab = 0x0801u32.to_be_bytes().to_vec();
    lab.extend_from_slice(&4u32.to_be_bytes());
    lab.extend_from_slice(&[0, 1, 2, 3]);
    let gz = |b: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    let (img, lab, ext) = if gzip {
        (gz(&img), gz(&lab), ".gz")
    } else {
        (img, lab, "")
    };
    write(dir, &format!("t-labels-idx1-ubyte{ext}"), &lab);
    write(dir, &format!("t-images-idx3-ubyte{ext}"), &img)
}

#[test]
fn idx_header_product_overflow_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // 4 * 2^31 * 2^31 = 2^64 wraps to 0.
    let img = idx_pair(dir.path(), [4, 1 << 31, 1 << 31], &[0; 100], false);
    let (msg, _) = load_err(data_spec(img, None));
    assert_says(
        &msg,
        &["t-images-idx3-ubyte", "more elements than can be addressed"],
    );
}

#[test]
fn idx_gzip_bomb_is_read_only_up_to_the_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    // The header declares 4 images of 28x28; the gzip stream inflates to 64 MiB.
    let img = idx_pair(dir.path(), [4, 28, 28], &vec![0; 64 << 20], true);
    assert!(std::fs::metadata(&img).unwrap().len() < 256 << 10);
    let (msg, peak) = load_err(data_spec(img, None));
    assert_says(&msg, &["t-images-idx3-ubyte.gz", "trailing bytes"]);
    assert!(peak < 4 * MIB, "peak allocation {peak} bytes");
}

#[test]
fn idx_gzip_header_beyond_what_deflate_can_make_fails_before_inflating() {
    let dir = tempfile::tempdir().unwrap();
    let img = idx_pair(dir.path(), [1 << 20, 28, 28], &[0; 1000], true);
    let (msg, peak) = load_err(data_spec(img, None));
    assert_says(&msg, &["t-images-idx3-ubyte.gz", "can inflate to at most"]);
    assert!(peak < MIB, "peak allocation {peak} bytes");
}

/// A legacy (pre-1.6) `torch.save` file whose object pickle is `object` (protocol 2, STOP
/// included); the header pickles and the storage key list are well formed.
fn legacy_checkpoint(object: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.extend_from_slice(b"\x80\x02K\x01.");
    }
    out.extend_from_slice(object);
    out.extend_from_slice(b"\x80\x02]q\x00.");
    out
}

fn pickle(body: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02".to_vec();
    p.extend_from_slice(body);
    p.push(b'.');
    p
}

#[test]
fn pickle_nested_a_million_deep_exits_with_an_error_not_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    // EMPTY_TUPLE then a million TUPLE1: a value nested 1,000,000 deep.
    let mut body = b")".to_vec();
    body.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    let model = write(dir.path(), "deep.pt", &legacy_checkpoint(&pickle(&body)));
    let (status, stderr) = score_cli(&model, dir.path(), &["--arch", "cnn-a"]);
    assert_eq!(
        status.code(),
        Some(1),
        "expected exit code 1, got {status:?}: {stderr}"
    );
    assert_says(&stderr, &["deep.pt", "levels deep"]);
}

#[test]
fn pickle_nested_marks_are_rejected_quickly() {
    let dir = tempfile::tempdir().unwrap();
    // 100k MARKs closed by 100k TUPLEs: quadratic copying in the evaluator.
    let mut body = vec![b'('; 100_000];
    body.extend(std::iter::repeat_n(b't', 100_000));
    let p = write(dir.path(), "marks.pt", &legacy_checkpoint(&pickle(&body)));
    let start = std::time::Instant::now();
    let (msg, _) = weights_err(p);
    assert_says(&msg, &["marks.pt", "levels deep"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn pickle_reference_bomb_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // memo[k] = (memo[k-1], memo[k-1]): 40 opcodes' worth of references expand to 2^41 values.
    let mut body = b"]q\x00".to_vec();
    for k in 1..=40u8 {
        body.extend_from_slice(&[b'h', k - 1, b'h', k - 1, 0x86, b'q', k]);
    }
    let p = write(dir.path(), "laughs.pt", &legacy_checkpoint(&pickle(&body)));
    let (msg, peak) = weights_err(p);
    assert_says(&msg, &["laughs.pt", "expand to more than"]);
    assert!(peak < 64 * MIB, "peak allocation {peak} bytes");
}

#[test]
fn pickle_dup_bomb_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // A list of 20k items duplicated 20k times: 400M value copies from 60 KB.
    let mut body = b"(".to_vec();
    for _ in 0..20_000 {
        body.extend_from_slice(b"K\x01");
    }
    body.push(b'l');
    body.extend(std::iter::repeat_n(b'2', 20_000));
    let p = write(dir.path(), "dup.pt", &legacy_checkpoint(&pickle(&body)));
    let (msg, peak) = weights_err(p);
    assert_says(&msg, &["dup.pt", "builds more than"]);
    assert!(peak < 64 * MIB, "peak allocation {peak} bytes");
}

#[test]
fn pickle_obj_without_a_class_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // MARK OBJ: repugnant-pickle indexes past the stack.
    let p = write(dir.path(), "obj.pt", &legacy_checkpoint(&pickle(b"(o")));
    let (msg, _) = weights_err(p);
    assert_says(&msg, &["obj.pt", "OBJ opcode without a class"]);
}

#[test]
fn torch_zip_entry_declaring_gigabytes_fails_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/native/checkpoint.pt");
    let mut bytes = std::fs::read(fixture).unwrap();
    // Every central directory entry now declares 4 GiB uncompressed.
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(4).position(|w| w == b"PK\x01\x02") {
        let c = at + i;
        bytes[c + 24..c + 28].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
        at = c + 4;
    }
    let p = write(dir.path(), "huge.pt", &bytes);
    let (msg, peak) = weights_err(p);
    assert_says(&msg, &["huge.pt", "more than deflate can produce"]);
    assert!(peak < 4 * MIB, "peak allocation {peak} bytes");
}

/// `brittle score` of `model` (any format it detects) on two CIFAR fixture images; returns the
/// exit status and stderr. A separate process, so that an abort fails the test instead of
/// killing the runner.
fn score_cli(model: &Path, dir: &Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attack/tiny.bin");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brittle"))
        .args(["score", "--model"])
        .arg(model)
        .args(extra)
        .args(["--device", "cpu", "--limit", "2", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(dir.join("scores.csv"))
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The TorchScript fixture `tiny_cnn.pt` with member `name` replaced by `f(old content)`,
/// rezipped the way `torch.jit.save` stores members (uncompressed, 64-byte aligned).
fn torchscript_with(name: &str, f: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    use std::io::Read;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attack/tiny_cnn.pt");
    let mut zin = zip::ZipArchive::new(std::fs::File::open(fixture).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut found = false;
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        if e.name() == name {
            b = f(&b);
            found = true;
        }
        out.start_file(e.name(), opts).unwrap();
        out.write_all(&b).unwrap();
    }
    assert!(found, "no member {name} in tiny_cnn.pt");
    out.finish().unwrap().into_inner()
}

#[test]
fn torchscript_code_nested_deeply_exits_with_an_error_not_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    // A method body returning 5,000 nested lists, or 20,000 unary minuses: libtorch's parser
    // overflowed the stack on either.
    let member = "tiny_cnn/code/__torch__/torch/nn/modules/conv.py";
    for (name, body, depth) in [
        (
            "brackets.pt",
            format!("{}_0{}", "[".repeat(5000), "]".repeat(5000)),
            5000,
        ),
        ("minus.pt", format!("{}_0", "-".repeat(20_000)), 20_000),
    ] {
        let bytes = torchscript_with(member, |code| {
            let code = String::from_utf8(code.to_vec()).unwrap();
            assert!(code.contains("    return _0"));
            code.replace("    return _0", &format!("    return {body}"))
                .into_bytes()
        });
        let model = write(dir.path(), name, &bytes);
        let (status, stderr) = score_cli(&model, dir.path(), &[]);
        assert_eq!(
            status.code(),
            Some(1),
            "expected exit code 1, got {status:?}: {stderr}"
        );
        assert_says(&stderr, &[name, member, &format!("{depth} levels deep")]);
    }
}

#[test]
fn torchscript_pickle_bomb_exits_with_an_error_not_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    // data.pkl: EMPTY_TUPLE then a million TUPLE1, a value nested 1,000,000 deep; libtorch's
    // unpickler overflowed the stack.
    let mut body = b")".to_vec();
    body.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    let bytes = torchscript_with("tiny_cnn/data.pkl", |_| pickle(&body));
    let model = write(dir.path(), "bomb.pt", &bytes);
    let (status, stderr) = score_cli(&model, dir.path(), &[]);
    assert_eq!(
        status.code(),
        Some(1),
        "expected exit code 1, got {status:?}: {stderr}"
    );
    assert_says(&stderr, &["bomb.pt", "tiny_cnn/data.pkl", "levels deep"]);
}
