//! `POST /v1/score` over loopback: answers equal the library's (and `brittle score`'s), malformed
//! and oversized requests get 4xx, concurrent clients get their own answers, shutdown is clean.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{inconsistent_model, synthetic_set, SHAPE};
use brittle::detector::fit::{fit, FitOptions, PseudoMode};
use brittle::detector::pseudo::TrainConfig;
use brittle::detector::Detector;
use brittle::norm::Norm;
use brittle::provenance::Provenance;
use brittle::score::free_scores;
use brittle::serve::{spawn, ServeConfig, ServerHandle};
use brittle::util::Check;
use serde_json::{json, Value};
use tch::Tensor;

const LOOPBACK: &str = "127.0.0.1:0";

fn post(addr: SocketAddr, content_type: &str, body: &[u8]) -> (u16, Value) {
    let r = ureq::post(&format!("http://{addr}/v1/score"))
        .timeout(Duration::from_secs(30))
        .set("Content-Type", content_type)
        .send_bytes(body);
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn images_json(x: &Tensor) -> Vec<u8> {
    let n = x.size()[0];
    let v: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
    let per = v.len() / n as usize;
    let [c, h, w] = [
        x.size()[1] as usize,
        x.size()[2] as usize,
        x.size()[3] as usize,
    ];
    let nested: Vec<Vec<Vec<Vec<f32>>>> = (0..n as usize)
        .map(|i| {
            (0..c)
                .map(|ci| {
                    (0..h)
                        .map(|hi| {
                            let s = i * per + ci * h * w + hi * w;
                            v[s..s + w].to_vec()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    serde_json::to_vec(&json!({ "images": nested })).unwrap()
}

/// A fitted detector with a pseudo-margin for the synthetic model, saved to `dir`.
fn synthetic_detector(dir: &std::path::Path) {
    let (model, w_eff) = inconsistent_model(1);
    let (data, rows) = synthetic_set(&model, &w_eff, 300, 2);
    let opts = FitOptions {
        eps: 0.05,
        norm: Norm::Linf,
        target_tpr: 0.95,
        pseudo: PseudoMode::On,
        train: TrainConfig {
            max_epochs: 5,
            ..TrainConfig::default()
        }
        .check()
        .unwrap(),
        val_fraction: 0.3,
        seed: 1,
        batch_size: 512,
        margins_name: "synthetic".into(),
    };
    fit(
        &model,
        &data,
        &rows,
        &opts.check().unwrap(),
        Provenance::current(Some(1)),
    )
    .unwrap()
    .save(dir)
    .unwrap();
}

fn synthetic_server(cfg: ServeConfig, dir: &std::path::Path) -> ServerHandle {
    let (model, _) = inconsistent_model(1);
    let det = Detector::load(dir, tch::Device::Cpu).unwrap();
    spawn(
        Box::new(model),
        Some(det),
        cfg.check().unwrap(),
        LOOPBACK.parse().unwrap(),
    )
    .unwrap()
}

#[test]
fn malformed_wrong_and_oversized_requests_get_client_errors() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_detector(dir.path());
    let cfg = ServeConfig {
        max_images: 4,
        max_body_bytes: 4096,
        ..ServeConfig::new(SHAPE)
    };
    let server = synthetic_server(cfg, dir.path());
    let addr = server.addr;
    let ok = images_json(&Tensor::full(
        [2, 1, 4, 4],
        0.5,
        (tch::Kind::Float, tch::Device::Cpu),
    ));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("application/json", b"{not json".to_vec(), 400),
        ("application/json", br#"{"pictures": []}"#.to_vec(), 400),
        (
            "application/json",
            br#"{"images": [[[0.1, 0.2], [0.3, 0.4]]]}"#.to_vec(),
            400,
        ),
        (
            "application/json",
            br#"{"images": [[[0.1, 0.2, 0.3, 0.4], [0.1], [0, 0, 0, 0], [0, 0, 0, 0]]]}"#.to_vec(),
            400,
        ),
        (
            "application/json",
            images_json(&Tensor::full(
                [1, 1, 4, 4],
                1.5,
                (tch::Kind::Float, tch::Device::Cpu),
            )),
            400,
        ),
        (
            "application/json",
            images_json(&Tensor::zeros(
                [5, 1, 4, 4],
                (tch::Kind::Float, tch::Device::Cpu),
            )),
            413,
        ),
        ("application/json", vec![b' '; 10_000], 413),
        (
            "application/x-npy",
            b"\x93NUMPY\x01\x00garbage".to_vec(),
            400,
        ),
        ("image/png", b"\x89PNG broken".to_vec(), 400),
        ("text/csv", b"1,2,3".to_vec(), 415),
    ];
    for (ct, body, want) in &cases {
        let (status, v) = post(addr, ct, body);
        assert_eq!(
            status,
            *want,
            "{ct} {:?}: {v}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        if status != 413 || v.get("error").is_some() {
            assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        }
    }
    // Still serving after all that.
    let (status, v) = post(addr, "application/json", &ok);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["detector"]["eps"], json!(0.05));
    let health = ureq::get(&format!("http://{addr}/healthz")).call().unwrap();
    assert_eq!(health.status(), 200);
    let metrics = assert_request_counts(addr, &[(400, 7), (413, 2), (200, 1)]);
    assert!(
        metrics.contains("brittle_images_scored_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("brittle_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("brittle_flagged_share"), "{metrics}");
    server.shutdown().unwrap();
}

#[test]
fn concurrent_clients_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_detector(dir.path());
    // Expected answers from the library, image by image.
    let (model, w_eff) = inconsistent_model(1);
    let det = Detector::load(dir.path(), tch::Device::Cpu).unwrap();
    let (data, _) = synthetic_set(&model, &w_eff, 64, 9);
    let (logits, pm) = det.forward(&model, &data.images).unwrap();
    let fs = free_scores(&logits).unwrap();
    let pm = pm.unwrap();

    // Plain data for the client threads (tensors are not Sync): per image the expected
    // (pred, logit margin, pseudo-margin, brittle), per request its first image and body.
    let expected: Vec<(i64, f64, f64, bool)> = (0..fs.len())
        .map(|i| {
            let b = det.decide(fs[i].logit_margin, Some(pm[i])).unwrap().brittle;
            (fs[i].pred, fs[i].logit_margin, pm[i], b)
        })
        .collect();
    let requests: Vec<Vec<(usize, usize, Vec<u8>)>> = (0..8usize)
        .map(|t| {
            (0..8usize)
                .map(|r| {
                    let (start, n) = ((t * 8 + r) % 62, 1 + (t + r) % 3);
                    (
                        start,
                        n,
                        images_json(&data.images.narrow(0, start as i64, n as i64)),
                    )
                })
                .collect()
        })
        .collect();
    // Threads that sleep at once, and threads that poll for work first (the default).
    for spin in [Duration::ZERO, ServeConfig::new(SHAPE).spin] {
        let cfg = ServeConfig {
            max_wait: Duration::from_millis(2),
            max_batch: 16,
            spin,
            ..ServeConfig::new(SHAPE)
        };
        let server = synthetic_server(cfg, dir.path());
        let addr = server.addr;
        std::thread::scope(|s| {
            for (t, reqs) in requests.iter().enumerate() {
                let expected = &expected;
                s.spawn(move || {
                    for (start, n, body) in reqs {
                        let (status, v) = post(addr, "application/json", body);
                        assert_eq!(status, 200, "{v}");
                        let res = v["results"].as_array().unwrap();
                        assert_eq!(res.len(), *n);
                        for (k, got) in res.iter().enumerate() {
                            let i = start + k;
                            let (pred, lm, pm, brittle) = expected[i];
                            assert_eq!(got["pred"].as_i64().unwrap(), pred, "client {t} image {i}");
                            let g = got["logit_margin"].as_f64().unwrap();
                            assert!(
                                (g - lm).abs() <= 1e-5 * (1.0 + lm.abs()),
                                "client {t} image {i}: {g} vs {lm}"
                            );
                            let g = got["pseudo_margin"].as_f64().unwrap();
                            assert!(
                                (g - pm).abs() <= 1e-5 * (1.0 + pm.abs()),
                                "client {t} image {i}: {g} vs {pm}"
                            );
                            assert_eq!(got["brittle"].as_bool().unwrap(), brittle);
                            let probs: Vec<f64> = got["probs"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|p| p.as_f64().unwrap())
                                .collect();
                            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
                        }
                    }
                });
            }
        });
        assert_request_counts(addr, &[(200, 64)]);
        server.shutdown().unwrap();
    }
}

/// The real model answers like the library's `brittle score` on the same images, for JSON,
/// NPY and PNG bodies.
#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn real_model_answers_match_brittle_score() {
    let shared = common::shared();
    let dir = tempfile::tempdir().unwrap();
    let model_path = shared.join("models/resnet_2b.pt");
    let data_path = shared.join("data/cifar10/real-pool.bin");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/detector/resnet_2b_margins.csv"
    );
    let det_dir = dir.path().join("det");
    run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_brittle"))
            .args(["fit", fixture, "--model"])
            .arg(&model_path)
            .arg("--data")
            .arg(&data_path)
            .args([
                "--eps", "2/255", "--pseudo", "on", "--epochs", "5", "--device", "cpu", "--out",
            ])
            .arg(&det_dir),
    );
    let scores = dir.path().join("scores.csv");
    run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_brittle"))
            .args(["score", "--model"])
            .arg(&model_path)
            .arg("--data")
            .arg(&data_path)
            .args(["--limit", "6", "--device", "cpu", "--detector"])
            .arg(&det_dir)
            .arg("--out")
            .arg(&scores),
    );
    let mut rd = csv::Reader::from_path(&scores).unwrap();
    let hdr = rd.headers().unwrap().clone();
    let col = |name: &str| hdr.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    let expect = |i: usize, got: &Value| {
        let r = &rows[i];
        assert_eq!(got["pred"].as_i64().unwrap().to_string(), r[col("pred")]);
        let lm: f64 = r[col("logit_margin")].parse().unwrap();
        let g = got["logit_margin"].as_f64().unwrap();
        assert!(
            (g - lm).abs() <= 1e-5 * (1.0 + lm.abs()),
            "image {i}: {g} vs {lm}"
        );
        let pm: f64 = r[col("pseudo_margin")].parse().unwrap();
        let g = got["pseudo_margin"].as_f64().unwrap();
        assert!(
            (g - pm).abs() <= 1e-5 * (1.0 + pm.abs()),
            "image {i}: {g} vs {pm}"
        );
        assert_eq!(
            u8::from(got["brittle"].as_bool().unwrap()).to_string(),
            r[col("brittle")]
        );
    };

    let data = brittle::data::DataSpec {
        path: data_path.clone(),
        limit: Some(6),
        ..Default::default()
    }
    .load()
    .unwrap();
    let spec = common::spec(model_path, None, None, None);
    let model = brittle::model::load_classifier(&spec, [3, 32, 32]).unwrap();
    let det = Detector::load(&det_dir, tch::Device::Cpu).unwrap();
    assert_eq!(model.info().fingerprint, det.spec.model.fingerprint);
    let server = spawn(
        model,
        Some(det),
        ServeConfig::new([3, 32, 32]).check().unwrap(),
        LOOPBACK.parse().unwrap(),
    )
    .unwrap();
    let addr = server.addr;

    // JSON batch of all six.
    let (status, v) = post(addr, "application/json", &images_json(&data.images));
    assert_eq!(status, 200, "{v}");
    for (i, got) in v["results"].as_array().unwrap().iter().enumerate() {
        expect(i, got);
    }
    // NPY float32 batch.
    let flat: Vec<f32> = Vec::try_from(data.images.flatten(0, -1)).unwrap();
    let mut npy = Vec::new();
    {
        use npyz::WriterBuilder;
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[6, 3, 32, 32])
            .writer(&mut npy)
            .begin_nd()
            .unwrap();
        w.extend(flat.iter().copied()).unwrap();
        w.finish().unwrap();
    }
    let (status, v) = post(addr, "application/x-npy", &npy);
    assert_eq!(status, 200, "{v}");
    for (i, got) in v["results"].as_array().unwrap().iter().enumerate() {
        expect(i, got);
    }
    // One PNG per image (CIFAR pixels are bytes, so PNG is lossless).
    for i in 0..6usize {
        let chw: Vec<u8> = flat[i * 3072..(i + 1) * 3072]
            .iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let hwc: Vec<u8> = (0..1024)
            .flat_map(|p| (0..3).map(move |c| (c, p)))
            .map(|(c, p)| chw[c * 1024 + p])
            .collect();
        let img = image::RgbImage::from_raw(32, 32, hwc).unwrap();
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let (status, v) = post(addr, "image/png", &png);
        assert_eq!(status, 200, "{v}");
        expect(i, &v["results"][0]);
    }
    server.shutdown().unwrap();
}

/// `brittle serve` as a process: answers on loopback and exits 0 on SIGTERM, within the
/// shutdown deadline even with a slow client connected.
#[cfg(unix)]
#[test]
#[ignore = "needs ../shared (real CIFAR-10 models)"]
fn serve_command_stops_gracefully_on_sigterm() {
    use std::io::BufRead;
    let shared = common::shared();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_brittle"))
        .args(["serve", "--model"])
        .arg(shared.join("models/resnet_2b.pt"))
        .args([
            "--input-shape",
            "3,32,32",
            "--addr",
            LOOPBACK,
            "--device",
            "cpu",
            "--header-timeout",
            "60",
            "--shutdown-timeout",
            "1",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    let (status, v) = post(
        addr,
        "application/json",
        &images_json(&Tensor::full(
            [1, 3, 32, 32],
            0.5,
            (tch::Kind::Float, tch::Device::Cpu),
        )),
    );
    assert_eq!(status, 200, "{v}");
    assert!(
        v["results"][0]["brittle"].is_null(),
        "no detector, no flag: {v}"
    );
    // A slow client in the middle of its request head: it kept the server alive more than
    // 30 s after SIGTERM; now it is dropped after the shutdown deadline.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut slow, b"POST /v1/score HTTP/1.1\r\nHost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("still running 15 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(slow);
}

/// Reads `/metrics`, checks `brittle_requests_total` for each `(status, count)`, returns the text.
fn assert_request_counts(addr: SocketAddr, counts: &[(u16, u64)]) -> String {
    let metrics = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for (status, n) in counts {
        let line = format!("brittle_requests_total{{status=\"{status}\"}} {n}");
        assert!(metrics.contains(&line), "want {line}, got {metrics}");
    }
    metrics
}

/// Runs a `brittle` command without progress bars and asserts it succeeded.
fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.env("BRITTLE_NO_PROGRESS", "1").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- Hostile clients and failures: one request must never take the server down. ----

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use brittle::model::{Classifier, ModelInfo};
use brittle::serve::metrics::ServeMetrics;
use brittle::serve::worker::{self, BatchPolicy, Job, Scorer};

/// First pixel value that makes [`Marked`] sleep in its forward pass.
const SLOW: f32 = 0.125;
/// First pixel value that makes [`Marked`] panic.
const PANIC: f32 = 0.375;

/// The synthetic model, slowed down (300 ms) or panicking when an image's first pixel is a
/// marker value: the failures and delays a real model could have, on demand.
struct Marked<M>(M);

impl<M: Classifier> Classifier for Marked<M> {
    fn logits(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        let firsts: Vec<f32> = Vec::try_from(x.select(1, 0).flatten(0, -1)).unwrap();
        let first_of_each = firsts.chunks(16).map(|c| c[0]);
        for v in first_of_each {
            if v == PANIC {
                panic!("marked to panic");
            }
            if v == SLOW {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        self.0.logits(x)
    }
    fn device(&self) -> tch::Device {
        self.0.device()
    }
    fn info(&self) -> &ModelInfo {
        self.0.info()
    }
}

fn marked_server(cfg: ServeConfig) -> ServerHandle {
    let (model, _) = inconsistent_model(1);
    spawn(
        Box::new(Marked(model)),
        None,
        cfg.check().unwrap(),
        LOOPBACK.parse().unwrap(),
    )
    .unwrap()
}

/// One `[1, 1, 4, 4]` image of constant `v` with its first pixel `first`, as a JSON body.
fn marked_body(first: f32, v: f32) -> Vec<u8> {
    let x = Tensor::full(
        [1, 1, 4, 4],
        f64::from(v),
        (tch::Kind::Float, tch::Device::Cpu),
    );
    let _ = x.get(0).get(0).get(0).get(0).fill_(f64::from(first));
    images_json(&x)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = ureq::get(&format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(10))
        .call();
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    (resp.status(), resp.into_string().unwrap())
}

/// The value of a metric line `name value` in `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, text) = get(addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Raw request bytes of a POST to /v1/score.
fn raw_post(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Reads until the peer closes the connection or `limit` passes; true when it closed.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 4096];
    while t.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// A 128-byte NPY body whose shape is nested lists (npyz's parser is exponential in their depth).
fn nested_npy() -> Vec<u8> {
    let prefix = "{'descr': '<f4', 'fortran_order': False, 'shape': ";
    let depth = (128 - 10 - prefix.len() - 2) / 2;
    let header = format!("{prefix}{}{}}}\n", "[".repeat(depth), "]".repeat(depth));
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    b
}

/// `{"images": ...}` for one `[1, 4, 4]` image whose first row holds empty arrays (~15 KB with
/// padding in an ignored field): it decoded to 12 values instead of 16 and killed the worker.
fn empty_first_row_json() -> Vec<u8> {
    let row = "[0.5, 0.5, 0.5, 0.5]";
    format!(
        r#"{{"pad": "{}", "images": [[[[], [], [], []], {row}, {row}, {row}]]}}"#,
        "x".repeat(15_000)
    )
    .into_bytes()
}

#[test]
fn hostile_bodies_get_400_and_the_server_keeps_serving() {
    let server = marked_server(ServeConfig::new(SHAPE));
    let addr = server.addr;
    let t = Instant::now();
    let (status, v) = post(addr, "application/x-npy", &nested_npy());
    assert_eq!(status, 400, "{v}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()));
    let (status, v) = post(addr, "application/json", &empty_first_row_json());
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("ragged"), "{v}");
    // Every later request is still answered, and /healthz says so.
    for _ in 0..3 {
        let (status, v) = post(addr, "application/json", &marked_body(0.5, 0.5));
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(get(addr, "/healthz").0, 200);
    server.shutdown().unwrap();
}

#[test]
fn a_model_that_panics_fails_alone_and_healthz_tells_the_truth() {
    let server = marked_server(ServeConfig::new(SHAPE));
    let addr = server.addr;
    for i in 0..worker::UNHEALTHY_AFTER {
        let (status, v) = post(addr, "application/json", &marked_body(PANIC, 0.5));
        assert_eq!(status, 500, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("marked to panic"),
            "{v}"
        );
        let want = if i + 1 < worker::UNHEALTHY_AFTER {
            200
        } else {
            503
        };
        assert_eq!(get(addr, "/healthz").0, want, "after {} failures", i + 1);
    }
    let (status, text) = get(addr, "/healthz");
    assert!(status == 503 && text.contains("marked to panic"), "{text}");
    // The worker still runs: a good request is answered and health comes back.
    let (status, v) = post(addr, "application/json", &marked_body(0.5, 0.5));
    assert_eq!(status, 200, "{v}");
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()));
    server.shutdown().unwrap();
}

/// Spawns a worker on the synthetic model (with markers) the way the router does.
fn marked_worker(
    inflight: usize,
    max_wait: Duration,
) -> (
    std::sync::mpsc::SyncSender<Job>,
    Arc<worker::Health>,
    std::thread::JoinHandle<()>,
) {
    let (model, _) = inconsistent_model(1);
    worker::spawn(
        Scorer {
            model: Box::new(Marked(model)),
            detector: None,
        },
        SHAPE,
        BatchPolicy {
            max_batch: 16,
            max_wait,
            inflight: Arc::new(AtomicUsize::new(inflight)),
            spin: Duration::ZERO,
        },
        16,
        ServeMetrics::default(),
    )
    .unwrap()
}

fn job(
    pixels: Vec<f32>,
    n: usize,
) -> (
    Job,
    tokio::sync::oneshot::Receiver<Result<Vec<worker::ImageResult>, String>>,
) {
    let (reply, rx) = tokio::sync::oneshot::channel();
    (Job { pixels, n, reply }, rx)
}

#[test]
fn worker_refuses_a_wrong_pixel_count_and_a_bad_request_fails_alone_in_its_batch() {
    // Two requests in flight: the worker batches each pair below.
    let (jobs, health, handle) = marked_worker(2, Duration::from_secs(2));
    // 12 values for one 16-value image: `view` panicked outside catch_unwind and the worker
    // died. The batch fails, and each request is retried alone: only the bad one fails.
    let (a, rx_a) = job(vec![0.5; 12], 1);
    let (b, rx_b) = job(vec![0.5; 16], 1);
    jobs.send(a).unwrap();
    jobs.send(b).unwrap();
    let err = rx_a.blocking_recv().expect("the worker died").unwrap_err();
    assert!(err.contains("12 values for 1 images"), "{err}");
    assert_eq!(rx_b.blocking_recv().unwrap().unwrap().len(), 1);
    // One request that panics the model, batched with another.
    let mut bad = vec![0.5; 16];
    bad[0] = PANIC;
    let (a, rx_a) = job(bad, 1);
    let (b, rx_b) = job(vec![0.5; 32], 2);
    jobs.send(a).unwrap();
    jobs.send(b).unwrap();
    assert!(rx_a
        .blocking_recv()
        .unwrap()
        .unwrap_err()
        .contains("marked to panic"));
    assert_eq!(rx_b.blocking_recv().unwrap().unwrap().len(), 2);
    assert!(health.check().is_ok());
    drop(jobs);
    handle.join().unwrap();
    assert!(health.check().unwrap_err().contains("stopped"));
}

#[test]
fn a_client_gone_mid_request_does_not_leave_a_request_in_flight() {
    let cfg = ServeConfig {
        max_wait: Duration::from_secs(2),
        ..ServeConfig::new(SHAPE)
    };
    let server = marked_server(cfg);
    let addr = server.addr;
    // A request the model takes 300 ms for; its client leaves after 100 ms.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&raw_post("application/json", &marked_body(SLOW, 0.5)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(metric(addr, "brittle_requests_in_flight"), 1.0);
    drop(s);
    let t = Instant::now();
    while metric(addr, "brittle_requests_in_flight") != 0.0 {
        assert!(t.elapsed() < Duration::from_secs(3), "the count leaked");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // A lone request does not wait the 2 s batch window for the departed one.
    answered_within(addr, Duration::from_secs(1));
    server.shutdown().unwrap();
}

/// A connection that has sent half a request head (a slow client).
fn half_head(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s
}

/// Posts a marked request, which must be answered 200 within `limit`.
fn answered_within(addr: SocketAddr, limit: Duration) {
    let t = Instant::now();
    let (status, v) = post(addr, "application/json", &marked_body(0.5, 0.5));
    assert_eq!(status, 200, "{v}");
    assert!(t.elapsed() < limit, "{:?}", t.elapsed());
}

#[test]
fn slow_clients_time_out_and_connections_are_capped() {
    let cfg = ServeConfig {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        max_connections: 8,
        ..ServeConfig::new(SHAPE)
    };
    let server = marked_server(cfg);
    let addr = server.addr;
    // Half a head: disconnected after the header timeout.
    let mut head = half_head(addr);
    assert!(closed_within(&mut head, Duration::from_secs(3)));
    // Half a body: 408 after the body timeout.
    let mut body = TcpStream::connect(addr).unwrap();
    let full = raw_post("application/json", &marked_body(0.5, 0.5));
    body.write_all(&full[..full.len() - 10]).unwrap();
    body.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut answer = String::new();
    let _ = body.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // An idle kept-alive connection is closed too.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(3)));
    // 32 half-sent requests against a cap of 8: the server holds at most 8 connections, and a
    // well-behaved client gets through once the header timeout frees them.
    let hogs: Vec<TcpStream> = (0..32)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /v1/score HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    answered_within(addr, Duration::from_secs(5));
    assert!(metric(addr, "brittle_connections") <= 8.0);
    drop(hogs);
    server.shutdown().unwrap();
}

#[test]
fn shutdown_drops_slow_clients_after_its_deadline() {
    let cfg = ServeConfig {
        header_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_millis(500),
        ..ServeConfig::new(SHAPE)
    };
    let server = marked_server(cfg);
    let addr = server.addr;
    let mut head = half_head(addr);
    let mut body = TcpStream::connect(addr).unwrap();
    let full = raw_post("application/json", &marked_body(0.5, 0.5));
    body.write_all(&full[..full.len() - 10]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    server.shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(closed_within(&mut head, Duration::from_secs(1)));
    assert!(closed_within(&mut body, Duration::from_secs(1)));
}

#[test]
fn serve_refuses_zero_and_overflowing_limits() {
    for (flag, value, why) in [
        ("--max-images", "0", "at least 1"),
        ("--max-batch", "0", "at least 1"),
        ("--queue", "0", "at least 1"),
        ("--max-body-mib", "0", "at least 1"),
        ("--max-body-mib", "17592186044416", "does not fit"),
        ("--max-connections", "0", "at least 1"),
        ("--header-timeout", "0", "positive"),
        ("--body-timeout", "nan", "between 0 and"),
        ("--max-wait-us", "18446744073709551615", "at most 60s"),
        ("--header-timeout", "1e8", "at most 86400s"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_brittle"))
            .args([
                "serve",
                "--model",
                "absent.pt",
                "--input-shape",
                "1,4,4",
                flag,
                value,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}");
        assert!(
            err.contains(flag) && err.contains(why),
            "{flag} {value}: {err}"
        );
    }
    // The library names fields, not flags.
    let err = ServeConfig {
        max_images: 0,
        ..ServeConfig::new(SHAPE)
    }
    .check()
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_images") && !err.contains("--"), "{err}");
}

/// What a misbehaving client of the load test does, over and over until its deadline.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// Sends a request head one byte every 100 ms (slowloris).
    Slowloris,
    /// Sends a head and half the declared body, then stalls.
    HalfBody,
    /// Sends bytes that are not HTTP.
    Garbage,
    /// Declares a 2^60-byte body.
    HugeDeclared,
    /// The nested NPY header.
    NestedNpy,
    /// The JSON body whose first row holds empty arrays.
    EmptyRows,
}

impl Hostile {
    fn run(self, addr: SocketAddr, until: Instant) {
        while Instant::now() < until {
            let Ok(mut s) = TcpStream::connect(addr) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut sink = Vec::new();
            let _ = match self {
                Hostile::Slowloris => {
                    for b in b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: app" {
                        if Instant::now() >= until || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Ok(())
                }
                Hostile::HalfBody => {
                    let full = raw_post("application/json", &marked_body(0.5, 0.5));
                    let _ = s.write_all(&full[..full.len() / 2]);
                    std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(1500)));
                    Ok(())
                }
                Hostile::Garbage => s.write_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n"),
                Hostile::HugeDeclared => s.write_all(
                    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1152921504606846976\r\n\r\n{\"images\": [",
                ),
                Hostile::NestedNpy => s.write_all(&raw_post("application/x-npy", &nested_npy())),
                Hostile::EmptyRows => s.write_all(&raw_post("application/json", &empty_first_row_json())),
            };
            let _ = s.read_to_end(&mut sink);
        }
    }
}

/// 64 clients for ~5 s: 40 well-behaved ones alone, then with 24 misbehaving ones mixed in. The
/// well-behaved keep their latency (p99 within a bound of their own baseline, measured in the
/// same test) and all get correct answers.
#[test]
fn well_behaved_clients_keep_their_latency_among_misbehaving_ones() {
    const GOOD: usize = 40;
    let kinds = [
        Hostile::Slowloris,
        Hostile::HalfBody,
        Hostile::Garbage,
        Hostile::HugeDeclared,
        Hostile::NestedNpy,
        Hostile::EmptyRows,
    ];
    let cfg = ServeConfig {
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        ..ServeConfig::new(SHAPE)
    };
    let (model, w_eff) = inconsistent_model(1);
    let (data, _) = synthetic_set(&model, &w_eff, 8, 5);
    let fs = free_scores(&tch::no_grad(|| model.logits(&data.images)).unwrap()).unwrap();
    let expected: Vec<(i64, f64)> = fs.iter().map(|s| (s.pred, s.logit_margin)).collect();
    let bodies: Vec<Vec<u8>> = (0..8)
        .map(|i| images_json(&data.images.narrow(0, i, 1)))
        .collect();
    let server = marked_server(cfg);
    let addr = server.addr;
    // Each good client: requests until `until`, checking every answer; returns latencies.
    let good = |client: usize, until: Instant| -> Vec<f64> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let mut lat = Vec::new();
        let mut i = client;
        while Instant::now() < until {
            let k = i % 8;
            i += 1;
            let t = Instant::now();
            let resp = agent
                .post(&format!("http://{addr}/v1/score"))
                .set("Content-Type", "application/json")
                .send_bytes(&bodies[k])
                .unwrap_or_else(|e| panic!("client {client}: {e}"));
            let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
            lat.push(t.elapsed().as_secs_f64());
            let got = &v["results"][0];
            assert_eq!(got["pred"].as_i64(), Some(expected[k].0), "{v}");
            let lm = got["logit_margin"].as_f64().unwrap();
            assert!((lm - expected[k].1).abs() <= 1e-5 * (1.0 + lm.abs()), "{v}");
        }
        lat
    };
    let p99 = |mut v: Vec<f64>| {
        assert!(v.len() >= 20, "only {} requests", v.len());
        v.sort_by(f64::total_cmp);
        v[(v.len() * 99 / 100).min(v.len() - 1)]
    };
    let phase = |hostile: bool, seconds: f64| -> Vec<f64> {
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        std::thread::scope(|s| {
            if hostile {
                for c in 0..64 - GOOD {
                    let kind = kinds[c % kinds.len()];
                    s.spawn(move || kind.run(addr, until));
                }
            }
            let hs: Vec<_> = (0..GOOD).map(|c| s.spawn(move || good(c, until))).collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    };
    let base = p99(phase(false, 2.0));
    let mixed = p99(phase(true, 3.0));
    println!(
        "well-behaved p99: {:.1} ms alone, {:.1} ms among misbehaving clients",
        base * 1e3,
        mixed * 1e3
    );
    assert!(
        mixed <= 5.0 * base + 0.1,
        "p99 {mixed:.4} s among misbehaving clients, {base:.4} s alone"
    );
    assert_eq!(get(addr, "/healthz").0, 200);
    server.shutdown().unwrap();
}
