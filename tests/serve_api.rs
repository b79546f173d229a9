//! `POST /v1/score` over loopback: answers equal the library's (and `brittle score`'s), malformed
//! and oversized requests get 4xx, concurrent clients get their own answers, shutdown is clean.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use brittle::detector::fit::{fit, FitOptions, PseudoMode};
use brittle::detector::pseudo::TrainConfig;
use brittle::detector::Detector;
use brittle::norm::Norm;
use brittle::provenance::Provenance;
use brittle::score::free_scores;
use brittle::serve::{spawn, ServeConfig, ServerHandle};
use common::{inconsistent_model, synthetic_set, SHAPE};
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
        },
        val_fraction: 0.3,
        seed: 1,
        batch_size: 512,
        margins_name: "synthetic".into(),
    };
    fit(&model, &data, &rows, &opts, Provenance::current(Some(1)))
        .unwrap()
        .save(dir)
        .unwrap();
}

fn synthetic_server(cfg: ServeConfig, dir: &std::path::Path) -> ServerHandle {
    let (model, _) = inconsistent_model(1);
    let det = Detector::load(dir, tch::Device::Cpu).unwrap();
    spawn(Box::new(model), Some(det), cfg, LOOPBACK.parse().unwrap()).unwrap()
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
fn real_model_answers_match_brittle_score() {
    let Some(shared) = common::shared() else {
        return;
    };
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
        ServeConfig::new([3, 32, 32]),
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

/// `brittle serve` as a process: answers on loopback and exits 0 on SIGTERM.
#[cfg(unix)]
#[test]
fn serve_command_stops_gracefully_on_sigterm() {
    use std::io::BufRead;
    let Some(shared) = common::shared() else {
        return;
    };
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
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
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
