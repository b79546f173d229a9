//! Load generator for `brittle serve` on loopback: bare forward time of one image, one-image
//! request latency (JSON and NPY bodies) and throughput under concurrent clients, in one run.
//!
//! cargo run --release --example serve_bench -- --model M.pt [--detector DIR] [--clients 8]
//!     [--requests 2000] [--seconds 20] [--max-wait-us 1000] [--threads N] [--arch ARCH]
//!     [--one-image 400] [--spin-us 1000]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use brittle::detector::Detector;
use brittle::model::{load_classifier, logits_no_grad, ModelSpec};
use brittle::serve::{spawn, ServeConfig};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A keep-alive HTTP/1.1 client that sends each request in one write, as wrk and curl do. ureq 2
/// writes the headers and the body apart, so the server wakes twice per request: that cost
/// 0.05 ms of a 0.30 ms one-image request on resnet_2b, all of it the client's doing.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends one request and returns the body of its 200 answer.
    fn call(&mut self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Result<&[u8]> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req)?;
        self.buf.clear();
        let mut chunk = [0u8; 1 << 16];
        loop {
            let n = self.stream.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head) = resp.parse(&self.buf)? else {
                continue;
            };
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .context("answer without Content-Length")
                .and_then(|h| Ok(std::str::from_utf8(h.value)?.trim().parse()?))?;
            if self.buf.len() < head + len {
                continue;
            }
            let status = resp.code.unwrap_or(0);
            let body = &self.buf[head..head + len];
            anyhow::ensure!(
                status == 200,
                "{method} {path}: HTTP {status}: {}",
                String::from_utf8_lossy(body)
            );
            return Ok(body);
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn main() -> Result<()> {
    brittle::model::device::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let model_path: String = arg(&args, "--model", String::new());
    anyhow::ensure!(!model_path.is_empty(), "--model is required");
    let detector: String = arg(&args, "--detector", String::new());
    let clients: usize = arg(&args, "--clients", 8);
    let requests: usize = arg(&args, "--requests", 2000);
    let seconds: f64 = arg(&args, "--seconds", 20.0);
    let max_wait_us: u64 = arg(&args, "--max-wait-us", 1000);
    // Timed one-image requests per body type (after one eighth as many for warm-up).
    let one_image: usize = arg(&args, "--one-image", 400);
    // As `brittle serve` does by default: half the cores for the model, the rest for HTTP.
    let threads: usize = arg(&args, "--threads", 0);
    brittle::model::device::set_threads(if threads > 0 {
        threads
    } else {
        brittle::serve::default_model_threads()
    });
    let shape = [3i64, 32, 32];
    // `--arch` for native weights (safetensors / .pt checkpoints), as `brittle serve --arch`.
    let arch: String = arg(&args, "--arch", String::new());
    let spec = ModelSpec {
        arch: (!arch.is_empty()).then_some(arch),
        num_classes: Some(10),
        ..ModelSpec::new(model_path, tch::Device::Cpu)
    };
    let load_det = || -> Result<Option<Detector>> {
        (!detector.is_empty())
            .then(|| Detector::load(detector.as_ref(), tch::Device::Cpu))
            .transpose()
    };

    // A second instance of the model, for the bare forward passes (what the detector adds is
    // included when it has a net) and the in-process scorer, timed alternately with the requests
    // so that drift of the machine's speed hits both sides alike.
    let x = tch::Tensor::rand([1, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
    let scorer = brittle::serve::worker::Scorer {
        model: load_classifier(&spec, shape)?,
        detector: load_det()?,
    };
    let bare_once = || -> Result<f64> {
        let t = Instant::now();
        match &scorer.detector {
            Some(d) => drop(d.forward(scorer.model.as_ref(), &x)?),
            None => drop(logits_no_grad(scorer.model.as_ref(), &x)?),
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let model = load_classifier(&spec, shape)?;

    let spin_us: u64 = arg(&args, "--spin-us", brittle::serve::DEFAULT_SPIN_US);
    let cfg = ServeConfig {
        max_wait: Duration::from_micros(max_wait_us),
        spin: Duration::from_micros(spin_us),
        ..ServeConfig::new(shape)
    };
    let server = spawn(
        model,
        load_det()?,
        brittle::util::Check::check(cfg)?,
        "127.0.0.1:0".parse()?,
    )?;
    let pixels: Vec<f32> = Vec::try_from(x.flatten(0, -1))?;
    let json = serde_json::to_vec(&serde_json::json!({
        "images": [pixels.chunks(1024).map(|c| c.chunks(32).collect::<Vec<_>>()).collect::<Vec<_>>()]
    }))?;
    let mut npy = Vec::new();
    {
        use npyz::WriterBuilder;
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[1, 3, 32, 32])
            .writer(&mut npy)
            .begin_nd()?;
        w.extend(pixels.iter().copied())?;
        w.finish()?;
    }
    let one = |client: &mut Client, ct: &str, body: &[u8]| -> Result<f64> {
        let t = Instant::now();
        client.call("POST", "/v1/score", ct, body)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut client = Client::connect(server.addr)?;
    {
        let mut v = Vec::new();
        for i in 0..400 {
            let t = Instant::now();
            client.call("GET", "/healthz", "text/plain", &[])?;
            if i >= 50 {
                v.push(t.elapsed().as_secs_f64());
            }
        }
        println!(
            "GET /healthz round trip (the HTTP floor): p50 {:.3} ms",
            pct(&mut v, 0.5) * 1e3
        );
    }
    let warm = one_image / 8;
    let mut in_process = Vec::new();
    for i in 0..warm + one_image {
        let t = Instant::now();
        drop(scorer.score(&x)?);
        if i >= warm {
            in_process.push(t.elapsed().as_secs_f64());
        }
    }
    let hot_p50 = pct(&mut in_process, 0.5);
    println!(
        "in-process scorer (forward + scores), batch 1, back to back: p50 {:.3} ms",
        hot_p50 * 1e3
    );
    for (name, ct, body) in [
        ("json", "application/json", &json),
        ("npy", "application/x-npy", &npy),
    ] {
        let (mut lat, mut bare) = (Vec::new(), Vec::new());
        for i in 0..warm + one_image {
            let b = bare_once()?;
            let s = one(&mut client, ct, body).with_context(|| format!("{name} request"))?;
            if i >= warm {
                lat.push(s);
                bare.push(b);
            }
        }
        let (p50, p99, bare_p50) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut bare, 0.5));
        println!(
            "one image, {name}: p50 {:.3} ms, p99 {:.3} ms; bare forward p50 {:.3} ms (alternating with the requests); serve/bare p50 = {:.2} (against the back-to-back scorer: {:.2})",
            p50 * 1e3, p99 * 1e3, bare_p50 * 1e3, p50 / bare_p50, p50 / hot_p50
        );
    }

    // Concurrent clients, bounded in count and time.
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let per_client = requests.div_ceil(clients);
    let t0 = Instant::now();
    let mut lat: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|_| {
                let (one, npy) = (&one, &npy);
                s.spawn(move || {
                    let mut v = Vec::new();
                    let mut client = match Client::connect(server.addr) {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("cannot connect: {e:#}");
                            return v;
                        }
                    };
                    while v.len() < per_client && Instant::now() < deadline {
                        match one(&mut client, "application/x-npy", npy) {
                            Ok(s) => v.push(s),
                            Err(e) => eprintln!("request failed: {e:#}"),
                        }
                    }
                    v
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let n = lat.len();
    let metrics = String::from_utf8(client.call("GET", "/metrics", "text/plain", &[])?.to_vec())?;
    let batches = metrics
        .lines()
        .find(|l| l.starts_with("brittle_batch_size_count"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    println!(
        "{clients} clients, npy, max wait {max_wait_us} us: {n} requests in {wall:.2} s = {:.0} images/s; p50 {:.3} ms, p99 {:.3} ms; {:.0} forward passes in total (all phases)",
        n as f64 / wall,
        pct(&mut lat, 0.5) * 1e3,
        pct(&mut lat, 0.99) * 1e3,
        batches
    );
    println!(
        "in-process scorer, batch 1, back to back: {:.0} images/s",
        1.0 / hot_p50
    );
    server.shutdown()
}
