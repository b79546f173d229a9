//! `brittle serve`: the model and its detector behind an HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::args::ModelArgs;
use crate::detector::Detector;
use crate::model::load_classifier;
use crate::serve::{
    bind, default_model_threads, router, serve_listener, shutdown_signal, ServeConfig,
};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Detector folder from `brittle fit` (without it, answers carry no `brittle` flag).
    #[arg(long)]
    pub detector: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Model input `C,H,W` (default: the detector's).
    #[arg(long, value_parser = parse_shape)]
    pub input_shape: Option<[i64; 3]>,
    /// Most images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Microseconds the model worker waits for more requests to batch after the first.
    #[arg(long, default_value_t = 1000)]
    pub max_wait_us: u64,
    /// Most images per request (413 beyond).
    #[arg(long, default_value_t = 64)]
    pub max_images: usize,
    /// Largest request body in MiB (413 beyond).
    #[arg(long, default_value_t = 16)]
    pub max_body_mib: usize,
    /// Requests queued for the model before new ones get 503.
    #[arg(long, default_value_t = 1024)]
    pub queue: usize,
    /// Microseconds the idle model thread polls for the next request (and a lone request for
    /// its answer) before sleeping: lower latency for a little CPU; 0 never polls.
    #[arg(long, default_value_t = crate::serve::DEFAULT_SPIN_US)]
    pub spin_us: u64,
}

/// Parses `3,32,32`.
pub fn parse_shape(s: &str) -> Result<[i64; 3]> {
    let v: Vec<i64> = s
        .split(',')
        .map(|p| p.trim().parse::<i64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad input shape {s:?}: write C,H,W such as 3,32,32"))?;
    match v.as_slice() {
        &[c, h, w] if c > 0 && h > 0 && w > 0 => Ok([c, h, w]),
        _ => bail!("bad input shape {s:?}: write three positive numbers C,H,W such as 3,32,32"),
    }
}

pub fn run(mut a: ServeArgs) -> Result<()> {
    if a.model.threads == 0 {
        a.model.threads = default_model_threads();
    }
    let spec = a.model.spec(None)?;
    let detector = match &a.detector {
        Some(dir) => Some(
            Detector::load(dir, spec.device)
                .with_context(|| format!("detector {}", dir.display()))?,
        ),
        None => None,
    };
    let shape = match (a.input_shape, &detector) {
        (Some(s), Some(d)) if s != d.spec.model.input_shape => bail!(
            "--input-shape {s:?} differs from the detector's model input shape {:?}",
            d.spec.model.input_shape
        ),
        (Some(s), _) => s,
        (None, Some(d)) => d.spec.model.input_shape,
        (None, None) => bail!("pass --input-shape C,H,W (or --detector, which records it)"),
    };
    let spec = crate::model::ModelSpec {
        num_classes: spec
            .num_classes
            .or(detector.as_ref().map(|d| d.spec.model.num_classes)),
        ..spec
    };
    let model = load_classifier(&spec, shape)?;
    let cfg = ServeConfig {
        max_batch: a.max_batch,
        max_wait: Duration::from_micros(a.max_wait_us),
        max_images: a.max_images,
        max_body_bytes: a.max_body_mib << 20,
        queue: a.queue,
        spin: Duration::from_micros(a.spin_us),
        ..ServeConfig::new(shape)
    };
    let name = model.info().name.clone();
    let (app, worker) = router(model, detector, cfg)?;
    let listener = bind(a.addr)?;
    eprintln!(
        "serving {name} on http://{} (POST /v1/score, GET /healthz, GET /metrics); Ctrl-C to stop",
        listener.local_addr()?
    );
    serve_listener(listener, app, worker, shutdown_signal())
}
