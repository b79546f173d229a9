//! Mutation fuzzing of every file and body reader, on stable Rust (cargo-fuzz needs nightly).
//!
//! Each reader gets real small inputs from `tests/fixtures` and `assets/` as seeds; every case
//! mutates one (bit flips, interesting integers over header words, big numbers over digit
//! runs, deep bracket runs, cut, spliced or repeated ranges) and runs the reader on it. A case
//! passes when the reader returns (`Ok` or a clean `Err`) without a panic, within the time
//! limit, and with the peak of Rust-side allocations within `16 × input + 32 MiB` (for
//! compressed inputs `4 × 1032 × input + 32 MiB`, deflate's largest expansion). libtorch's C++
//! allocations (tensor storage, TorchScript) are outside the meter. An abort (stack overflow,
//! a crash in libtorch) kills the test process: the input of the running case is written to
//! `target/fuzz-current/<reader>` first, so it is left behind for reproduction; findings are
//! saved under `target/fuzz-findings/`.
//!
//! Smoke pass (CI, the default): `BRITTLE_FUZZ_CASES=24` cases per reader, under a minute on
//! two cores. Longer run, e.g. 2,000 cases per reader from another seed:
//! `BRITTLE_FUZZ_CASES=2000 BRITTLE_FUZZ_SEED=7 cargo test --release --test it fuzz_readers:: -- --nocapture`
//! (`BRITTLE_FUZZ_READERS=npy,idx-raw` runs a subset; `BRITTLE_FUZZ_CASE_SECS` sets the
//! per-case limit, 20 s by default).

use crate::common;

use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::alloc_meter::peak_of;
use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use brittle::data::{DataFormat, DataSpec};
use brittle::model::{load_classifier, ModelFormat, ModelSpec};

const MIB: u64 = 1 << 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How a case's input is turned into files and read.
type Run = Box<dyn Fn(&Path, &[u8]) -> Result<()> + Send + Sync>;
/// A transformation of the mutated bytes (e.g. gzip the mutated content).
type Wrap = fn(&[u8]) -> Vec<u8>;

struct Reader {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    /// Applied after mutation (e.g. gzip the mutated content); `None` keeps the bytes.
    wrap: Option<Wrap>,
    /// Whether the input the reader sees is compressed (memory bound relative to inflation).
    compressed: bool,
    run: Run,
}

// ---------------------------------------------------------------- mutation

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

const BIG_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "4294967296",
    "2147483648",
    "9223372036854775807",
    "18446744073709551616",
    "99999999999999999999999",
    "1e308",
    "nan",
    "-0",
];

fn mutate(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    let rounds = rng.gen_range(1..=4);
    for _ in 0..rounds {
        let len = b.len();
        let pos = if len == 0 { 0 } else { rng.gen_range(0..len) };
        match rng.gen_range(0..11) {
            0 if len > 0 => b[pos] ^= 1 << rng.gen_range(0..8),
            1 if len > 0 => b[pos] = [0u8, 1, 0x7f, 0x80, 0xff][rng.gen_range(0..5)],
            2 | 3 => {
                // An interesting integer over a header-ish word, little or big endian.
                let v = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                let width = [1usize, 2, 4, 8][rng.gen_range(0..4)];
                let pos = if rng.gen_bool(0.7) {
                    rng.gen_range(0..len.clamp(1, 64))
                } else {
                    pos
                };
                let bytes = if rng.gen_bool(0.5) {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let src = if bytes[0] == 0 && width < 8 {
                    &bytes[8 - width..]
                } else {
                    &bytes[..width]
                };
                for (i, &x) in src.iter().enumerate() {
                    if pos + i < b.len() {
                        b[pos + i] = x;
                    }
                }
            }
            4 => {
                // A big number over a run of ASCII digits (shapes, dims, JSON, CSV).
                let digits: Vec<usize> = (0..len).filter(|&i| b[i].is_ascii_digit()).collect();
                if let Some(&start) = digits.get(rng.gen_range(0..digits.len().max(1))) {
                    let end = (start..len)
                        .find(|&i| !b[i].is_ascii_digit())
                        .unwrap_or(len);
                    let n = BIG_NUMBERS[rng.gen_range(0..BIG_NUMBERS.len())].as_bytes();
                    b.splice(start..end, n.iter().copied());
                }
            }
            5 => {
                // A deep run of brackets (nesting attacks on every parser).
                let open = [b'(', b'[', b'{', b'"'][rng.gen_range(0..4)];
                let k = [8usize, 64, 500, 5000][rng.gen_range(0..4)];
                b.splice(pos..pos, std::iter::repeat_n(open, k));
            }
            6 if len > 0 => {
                let cut = rng.gen_range(0..len);
                b.truncate(cut);
            }
            7 if len > 0 => {
                let n = rng.gen_range(1..=len.min(64));
                let end = (pos + n).min(len);
                b.drain(pos..end);
            }
            8 if len > 0 => {
                // Repeat a range (grows repeated structures: pickle opcodes, JSON rows).
                let n = rng.gen_range(1..=len.min(256));
                let end = (pos + n).min(len);
                let chunk = b[pos..end].to_vec();
                let times = rng.gen_range(1..=16);
                for _ in 0..times {
                    b.splice(end..end, chunk.iter().copied());
                }
            }
            9 => {
                let n = rng.gen_range(1..=32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                b.splice(pos..pos, bytes);
            }
            _ if len > 1 => {
                // Splice a range from elsewhere in the input.
                let from = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - from).min(128));
                let chunk = b[from..from + n].to_vec();
                let to = rng.gen_range(0..b.len());
                let end = (to + n).min(b.len());
                b.splice(to..end, chunk);
            }
            _ => b.push(rng.gen()),
        }
    }
    b
}

// ---------------------------------------------------------------- seeds and readers

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = root().join(p);
    std::fs::read(&p).unwrap_or_else(|e| panic!("seed {}: {e}", p.display()))
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// The first `n` records of an IDX file (header count rewritten).
fn idx_head(full: &[u8], n: u32, record: usize, header: usize) -> Vec<u8> {
    let mut out = full[..header].to_vec();
    out[4..8].copy_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&full[header..header + n as usize * record]);
    out
}

/// The entries of a zip archive, in order.
fn unzip(b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(b)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut e = z.by_index(i).unwrap();
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            (e.name().to_owned(), v)
        })
        .collect()
}

/// A stored (uncompressed) zip of `entries`, valid CRCs, 64-byte aligned as torch.save writes.
fn rezip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    for (name, data) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap().into_inner()
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn data_spec(path: PathBuf, format: Option<DataFormat>, labels: Option<PathBuf>) -> DataSpec {
    DataSpec {
        path,
        format,
        labels,
        ..DataSpec::default()
    }
}

fn model(path: PathBuf, format: ModelFormat, shape: [i64; 3]) -> Result<()> {
    let mut spec = ModelSpec::new(path, tch::Device::Cpu);
    spec.format = Some(format);
    load_classifier(&spec, shape).map(drop)
}

/// The members of a zip with the one at `which` replaced by the case's bytes.
fn with_member(
    entries: &[(String, Vec<u8>)],
    which: usize,
    bytes: &[u8],
) -> Vec<(String, Vec<u8>)> {
    let mut e = entries.to_vec();
    e[which].1 = bytes.to_vec();
    e
}

/// A saved detector (folder) to seed the detector reader: fitted on the synthetic linear model
/// with the pseudo-margin net, so that both the JSON and the weights are exercised.
fn detector_seed() -> (Vec<u8>, Vec<u8>) {
    use brittle::detector::fit::{fit, FitOptions, PseudoMode};
    use brittle::detector::pseudo::TrainConfig;
    let (m, w) = common::inconsistent_model(1);
    let (data, rows) = common::synthetic_set(&m, &w, 300, 2);
    let mut d: Vec<f64> = rows.iter().map(|r| r.input_margin).collect();
    d.sort_by(f64::total_cmp);
    let opts = FitOptions {
        eps: d[d.len() / 2],
        norm: brittle::norm::Norm::Linf,
        target_tpr: 0.95,
        pseudo: PseudoMode::On,
        train: brittle::util::Check::check(TrainConfig {
            max_epochs: 2,
            ..TrainConfig::default()
        })
        .unwrap(),
        val_fraction: 0.3,
        seed: 7,
        batch_size: 512,
        margins_name: "synthetic".into(),
    };
    let det = fit(
        &m,
        &data,
        &rows,
        &brittle::util::Check::check(opts).unwrap(),
        brittle::provenance::Provenance::current(Some(7)),
    )
    .expect("fitting the seed detector");
    let dir = tempfile::tempdir().unwrap();
    det.save(dir.path()).unwrap();
    let json = std::fs::read(dir.path().join(brittle::detector::DETECTOR_FILE)).unwrap();
    let weights = std::fs::read(dir.path().join(brittle::detector::WEIGHTS_FILE)).unwrap();
    (json, weights)
}

fn readers() -> Vec<Reader> {
    let mut out = Vec::new();
    let mut add = |name, seeds, wrap, compressed, run: Run| {
        out.push(Reader {
            name,
            seeds,
            wrap,
            compressed,
            run,
        })
    };

    // CIFAR-10 binary: 4 records of the attack fixture.
    let cifar = read("tests/fixtures/attack/tiny.bin")[..4 * 3073].to_vec();
    add(
        "cifar",
        vec![cifar],
        None,
        false,
        Box::new(|d, b| {
            data_spec(put(d, "x.bin", b), Some(DataFormat::Cifar10), None)
                .load()
                .map(drop)
        }),
    );

    // IDX: 8 MNIST images and labels.
    let images = gunzip(&read("assets/mnist-test-1000-images-idx3-ubyte.gz"));
    let labels = gunzip(&read("assets/mnist-test-1000-labels-idx1-ubyte.gz"));
    let (images, labels) = (idx_head(&images, 8, 784, 16), idx_head(&labels, 8, 1, 8));
    let idx_run = |gz: bool, mutate_labels: bool, images: Vec<u8>, labels: Vec<u8>| -> Run {
        Box::new(move |d, b| {
            let ext = if gz { ".gz" } else { "" };
            let fixed = |v: &[u8]| if gz { gzip(v) } else { v.to_vec() };
            let (img, lab) = if mutate_labels {
                (fixed(&images), b.to_vec())
            } else {
                (b.to_vec(), fixed(&labels))
            };
            put(d, &format!("f-labels-idx1-ubyte{ext}"), &lab);
            let img = put(d, &format!("f-images-idx3-ubyte{ext}"), &img);
            data_spec(img, None, None).load().map(drop)
        })
    };
    add(
        "idx-raw",
        vec![images.clone()],
        None,
        false,
        idx_run(false, false, images.clone(), labels.clone()),
    );
    add(
        "idx-labels",
        vec![labels.clone()],
        None,
        false,
        idx_run(false, true, images.clone(), labels.clone()),
    );
    add(
        "idx-gz-stream",
        vec![gzip(&images)],
        None,
        true,
        idx_run(true, false, images.clone(), labels.clone()),
    );
    add(
        "idx-gz-content",
        vec![images.clone()],
        Some(gzip),
        true,
        idx_run(true, false, images, labels),
    );

    // NPY / NPZ.
    let npy_dir = "tests/fixtures/native/npy";
    let npy_seeds: Vec<Vec<u8>> = std::fs::read_dir(root().join(npy_dir))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "npy"))
        .map(std::fs::read)
        .collect::<std::io::Result<_>>()
        .unwrap();
    let npy_labels = read(format!("{npy_dir}/f32_nchw_labels.npy"));
    add(
        "npy",
        npy_seeds,
        None,
        false,
        Box::new(move |d, b| {
            let labels = put(d, "labels.npy", &npy_labels);
            data_spec(put(d, "x.npy", b), None, Some(labels))
                .load()
                .map(drop)
        }),
    );
    let npz = read(format!("{npy_dir}/compressed.npz"));
    let members = unzip(&npz);
    add(
        "npz-archive",
        vec![npz],
        None,
        true,
        Box::new(|d, b| data_spec(put(d, "x.npz", b), None, None).load().map(drop)),
    );
    let images_member = members.iter().position(|(n, _)| n == "images.npy").unwrap();
    add(
        "npz-member",
        vec![members[images_member].1.clone()],
        None,
        false,
        Box::new(move |d, b| {
            let z = rezip(&with_member(&members, images_member, b));
            data_spec(put(d, "x.npz", &z), None, None).load().map(drop)
        }),
    );

    // Weights: safetensors, torch.save zip (whole and its data.pkl), legacy pickles.
    let weights = |name: &'static str| -> Run {
        Box::new(move |d, b| brittle::model::weights::read_tensors(&put(d, name, b)).map(drop))
    };
    let native = "tests/fixtures/native";
    add(
        "safetensors",
        vec![
            read(format!("{native}/checkpoint_ref.safetensors")),
            read(format!("{native}/golden_ts.safetensors")),
        ],
        None,
        false,
        weights("w.safetensors"),
    );
    let ckpt = read(format!("{native}/checkpoint.pt"));
    add(
        "torch-zip",
        vec![ckpt.clone()],
        None,
        false,
        weights("w.pt"),
    );
    let entries = unzip(&ckpt);
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    add(
        "torch-zip-pickle",
        vec![entries[pkl].1.clone()],
        None,
        false,
        Box::new(move |d, b| {
            let z = rezip(&with_member(&entries, pkl, b));
            brittle::model::weights::read_tensors(&put(d, "w.pt", &z)).map(drop)
        }),
    );
    add(
        "torch-legacy",
        vec![read(format!("{native}/checkpoint-legacy.pt"))],
        None,
        false,
        weights("w.pt"),
    );

    // TorchScript through libtorch: the archive, and its members rezipped with valid CRCs.
    let ts = read("tests/fixtures/attack/tiny_cnn.pt");
    add(
        "torchscript",
        vec![ts.clone()],
        None,
        false,
        Box::new(|d, b| model(put(d, "m.pt", b), ModelFormat::Torchscript, [3, 32, 32])),
    );
    let ts_entries = unzip(&ts);
    let ts_members: Vec<usize> = (0..ts_entries.len())
        .filter(|&i| {
            let n = &ts_entries[i].0;
            n.ends_with(".pkl") || n.contains("/code/") || n.ends_with("version")
        })
        .collect();
    // Each seed is one member, prefixed by a byte that says which (mutations may change it).
    let member_seeds = ts_members
        .iter()
        .map(|&i| {
            let mut v = vec![i as u8];
            v.extend_from_slice(&ts_entries[i].1);
            v
        })
        .collect();
    add(
        "torchscript-member",
        member_seeds,
        None,
        false,
        Box::new(move |d, b| {
            let Some((&which, member)) = b.split_first() else {
                return Ok(());
            };
            let which = ts_members
                .iter()
                .copied()
                .find(|&i| i == which as usize)
                .unwrap_or(ts_members[which as usize % ts_members.len()]);
            let z = rezip(&with_member(&ts_entries, which, member));
            model(put(d, "m.pt", &z), ModelFormat::Torchscript, [3, 32, 32])
        }),
    );

    // ONNX graphs, each with the input shape its reference JSON records.
    let mut onnx: Vec<(Vec<u8>, [i64; 3])> = Vec::new();
    for e in std::fs::read_dir(root().join("tests/fixtures/onnx")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "onnx") {
            let json = p.with_extension("json");
            let shape = std::fs::read_to_string(&json)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| {
                    let s = v["input"]["shape"].as_array()?.clone();
                    Some([s[1].as_i64()?, s[2].as_i64()?, s[3].as_i64()?])
                })
                .unwrap_or([3, 8, 8]);
            onnx.push((std::fs::read(&p).unwrap(), shape));
        }
    }
    onnx.sort_by_key(|(b, _)| b.len());
    let onnx_shapes: Vec<(usize, [i64; 3])> = onnx.iter().map(|(b, s)| (b.len(), *s)).collect();
    add(
        "onnx",
        onnx.into_iter().map(|(b, _)| b).collect(),
        None,
        false,
        Box::new(move |d, b| {
            let shape = onnx_shapes
                .iter()
                .min_by_key(|(n, _)| n.abs_diff(b.len()))
                .map(|(_, s)| *s)
                .unwrap();
            model(put(d, "m.onnx", b), ModelFormat::Onnx, shape)
        }),
    );

    // Margins CSV and its sidecar (the library readers `analyze`, `fit` and `merge` use).
    let det_csv = "tests/fixtures/detector/resnet_2b_margins.csv";
    let csv: Vec<u8> = {
        let text = String::from_utf8(read(det_csv)).unwrap();
        text.lines()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
    };
    let sidecar = read(format!("{det_csv}.meta.json"));
    let side_fixed = sidecar.clone();
    add(
        "margins-csv",
        vec![csv.clone()],
        None,
        false,
        Box::new(move |d, b| {
            let p = put(d, "m.csv", b);
            put(d, "m.csv.meta.json", &side_fixed);
            let rows = brittle::margins::read_margins(&p);
            let partial = brittle::margins::read_partial_margins(&p);
            rows.and(partial).map(drop)
        }),
    );
    add(
        "margins-sidecar",
        vec![sidecar],
        None,
        false,
        Box::new(move |d, b| {
            let p = put(d, "m.csv", &csv);
            put(d, "m.csv.meta.json", b);
            brittle::margins::read_sidecar(&p).map(drop)
        }),
    );

    // Detector folder: the JSON, and the pseudo-margin weights it names.
    let (det_json, det_weights) = detector_seed();
    let (json_fixed, weights_fixed) = (det_json.clone(), det_weights.clone());
    add(
        "detector-json",
        vec![det_json],
        None,
        false,
        Box::new(move |d, b| {
            put(d, brittle::detector::DETECTOR_FILE, b);
            put(d, brittle::detector::WEIGHTS_FILE, &weights_fixed);
            brittle::detector::Detector::load(d, tch::Device::Cpu).map(drop)
        }),
    );
    add(
        "detector-weights",
        vec![det_weights],
        None,
        false,
        Box::new(move |d, b| {
            put(d, brittle::detector::DETECTOR_FILE, &json_fixed);
            put(d, brittle::detector::WEIGHTS_FILE, b);
            brittle::detector::Detector::load(d, tch::Device::Cpu).map(drop)
        }),
    );

    // HTTP bodies: JSON, NPY and PNG images of the expected [3, 8, 8] shape.
    let body_run = |ct: &'static str| -> Run {
        Box::new(move |_, b| {
            let spec = brittle::serve::input::InputSpec {
                shape: [3, 8, 8],
                max_images: 4,
            };
            spec.decode(Some(ct), b)
                .map(drop)
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        })
    };
    let pixels: Vec<f32> = (0..2 * 3 * 64).map(|i| (i % 7) as f32 / 7.0).collect();
    let json_body = {
        let img = |k: usize| -> serde_json::Value {
            (0..3)
                .map(|c| {
                    (0..8)
                        .map(|y| {
                            (0..8)
                                .map(|x| pixels[k * 192 + c * 64 + y * 8 + x])
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .into()
        };
        serde_json::json!({ "images": [img(0), img(1)] })
            .to_string()
            .into_bytes()
    };
    add(
        "body-json",
        vec![json_body],
        None,
        false,
        body_run("application/json"),
    );
    let npy_body = {
        let mut v = Vec::new();
        {
            use npyz::WriterBuilder;
            let mut w = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .shape(&[2, 3, 8, 8])
                .writer(&mut v)
                .begin_nd()
                .unwrap();
            w.extend(pixels.iter().copied()).unwrap();
            w.finish().unwrap();
        }
        v
    };
    add(
        "body-npy",
        vec![npy_body],
        None,
        false,
        body_run("application/x-npy"),
    );
    let png_body = {
        let img =
            image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 99]));
        let mut v = std::io::Cursor::new(Vec::new());
        img.write_to(&mut v, image::ImageFormat::Png).unwrap();
        v.into_inner()
    };
    add(
        "body-png",
        vec![png_body],
        None,
        true,
        body_run("image/png"),
    );
    out
}

// ---------------------------------------------------------------- the loop

#[derive(Default)]
struct Tally {
    ok: usize,
    err: usize,
    findings: Vec<String>,
    max_peak_ratio: f64,
    slowest: Duration,
}

enum Outcome {
    Ok,
    Err,
    Panic(String),
}

#[test]
fn fuzz_every_reader() {
    let cases: usize = env_or("BRITTLE_FUZZ_CASES", 24);
    let seed: u64 = env_or("BRITTLE_FUZZ_SEED", 0);
    let limit = Duration::from_secs(env_or("BRITTLE_FUZZ_CASE_SECS", 20));
    let only: Option<Vec<String>> = std::env::var("BRITTLE_FUZZ_READERS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let target = root().join("target");
    let (current, saved) = (target.join("fuzz-current"), target.join("fuzz-findings"));
    std::fs::create_dir_all(&current).unwrap();
    // Panics are findings, reported together at the end, not printed one by one.
    std::panic::set_hook(Box::new(|_| {}));
    let start = Instant::now();
    let mut report = Vec::new();
    let mut all_findings = Vec::new();
    for reader in readers() {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == reader.name))
        {
            continue;
        }
        let mut tally = Tally::default();
        let reader = std::sync::Arc::new(reader);
        for case in 0..cases {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (case as u64) << 8 ^ hash(reader.name));
            let s = &reader.seeds[rng.gen_range(0..reader.seeds.len())];
            // The first cases run the seeds unmutated.
            let mut input = if case < reader.seeds.len() {
                reader.seeds[case].clone()
            } else {
                mutate(s, &mut rng)
            };
            if let Some(wrap) = reader.wrap {
                input = wrap(&input);
            }
            std::fs::write(current.join(reader.name), &input).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let (r, path, bytes) = (reader.clone(), dir.path().to_owned(), input.clone());
            let t0 = Instant::now();
            // The CLI reads on its main thread: the same 8 MiB stack.
            let worker = std::thread::Builder::new().stack_size(8 << 20);
            let spawned = worker.spawn(move || {
                let (outcome, peak) = peak_of(|| {
                    match std::panic::catch_unwind(AssertUnwindSafe(|| (r.run)(&path, &bytes))) {
                        Ok(Ok(())) => Outcome::Ok,
                        Ok(Err(_)) => Outcome::Err,
                        Err(p) => Outcome::Panic(
                            p.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default(),
                        ),
                    }
                });
                let _ = tx.send((outcome, peak));
            });
            spawned.expect("spawning a fuzz case");
            let len = input.len() as u64;
            let bound = if reader.compressed {
                4 * 1032 * len + 32 * MIB
            } else {
                16 * len + 32 * MIB
            };
            let mut finding = |what: String| {
                let name = format!("{}-{seed}-{case}", reader.name);
                let _ = std::fs::create_dir_all(&saved);
                let _ = std::fs::write(saved.join(&name), &input);
                eprintln!("finding {name}: {what}");
                tally.findings.push(format!("{name}: {what}"));
            };
            match rx.recv_timeout(limit) {
                Err(_) => finding(format!("no answer within {limit:?} (hang)")),
                Ok((outcome, peak)) => {
                    let took = t0.elapsed();
                    tally.slowest = tally.slowest.max(took);
                    tally.max_peak_ratio =
                        tally.max_peak_ratio.max(peak as f64 / len.max(1) as f64);
                    match outcome {
                        Outcome::Ok => tally.ok += 1,
                        Outcome::Err => tally.err += 1,
                        Outcome::Panic(msg) => finding(format!("panic: {msg}")),
                    }
                    if peak > bound {
                        finding(format!(
                            "peak allocation {peak} bytes for a {len}-byte input (bound {bound})"
                        ));
                    }
                }
            }
            drop(dir);
        }
        report.push(format!(
            "{:<20} cases {:>6}  ok {:>6}  clean error {:>6}  findings {:>3}  slowest {:>7.3} s  peak/input {:>8.1}",
            reader.name,
            cases,
            tally.ok,
            tally.err,
            tally.findings.len(),
            tally.slowest.as_secs_f64(),
            tally.max_peak_ratio
        ));
        all_findings.extend(tally.findings);
    }
    let _ = std::panic::take_hook();
    println!(
        "fuzz: seed {seed}, {cases} cases per reader, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for line in &report {
        println!("{line}");
    }
    assert!(
        all_findings.is_empty(),
        "{} findings (inputs in {}):\n{}",
        all_findings.len(),
        saved.display(),
        all_findings.join("\n")
    );
}

/// A stable per-reader stream offset.
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
