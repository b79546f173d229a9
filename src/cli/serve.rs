//! `brittle serve`: the model and its detector behind an HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::args::{load_model, ModelArgs};
use super::hints::{FlagHint, Flags};
use crate::detector::Detector;
use crate::serve::{
    bind, default_model_threads, router, serve_listener, shutdown_signal, ServeConfig,
};
use crate::util::{Check, Checked};

/// Defaults of the connection limits, from the library's.
fn defaults() -> ServeConfig {
    ServeConfig::new([1, 1, 1])
}

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
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_batch: usize,
    /// Microseconds the model worker waits for more requests to batch after the first.
    #[arg(long, default_value_t = 1000)]
    pub max_wait_us: u64,
    /// Most images per request (413 beyond).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_images: usize,
    /// Largest request body in MiB (413 beyond).
    #[arg(long = "max-body-mib", default_value = "16", value_parser = mib_to_bytes, value_name = "MIB")]
    pub max_body_bytes: usize,
    /// Requests queued for the model before new ones get 503.
    #[arg(long, default_value_t = 1024, value_parser = at_least_one)]
    pub queue: usize,
    /// Microseconds the idle model thread polls for the next request before sleeping: lower
    /// latency for a little CPU; 0 never polls.
    #[arg(long, default_value_t = crate::serve::DEFAULT_SPIN_US)]
    pub spin_us: u64,
    /// Seconds a client may take to send a request's head, and a kept-alive connection may sit
    /// idle, before it is disconnected.
    #[arg(long, default_value_t = defaults().header_timeout.as_secs_f64(), value_parser = positive_seconds)]
    pub header_timeout: f64,
    /// Seconds a request's body may take to arrive (408 beyond).
    #[arg(long, default_value_t = defaults().body_timeout.as_secs_f64(), value_parser = positive_seconds)]
    pub body_timeout: f64,
    /// Most open connections; more wait until one closes.
    #[arg(long, default_value_t = defaults().max_connections, value_parser = at_least_one)]
    pub max_connections: usize,
    /// Seconds open connections may finish after SIGTERM/Ctrl-C before they are dropped.
    #[arg(long, default_value_t = defaults().shutdown_timeout.as_secs_f64(), value_parser = seconds)]
    pub shutdown_timeout: f64,
}

/// A count that must admit something: 0 would turn every request into an error.
fn at_least_one(s: &str) -> Result<usize> {
    let v: usize = s
        .trim()
        .parse()
        .with_context(|| format!("{s:?} is not a whole number"))?;
    if v == 0 {
        bail!("must be at least 1: with 0 every request would be refused");
    }
    Ok(v)
}

/// MiB to bytes, checked: `2^44` MiB overflowed to 0 bytes, refusing every request.
fn mib_to_bytes(s: &str) -> Result<usize> {
    let mib = at_least_one(s)?;
    mib.checked_mul(1 << 20).with_context(|| {
        format!(
            "{mib} MiB does not fit in memory (at most {} MiB)",
            usize::MAX >> 20
        )
    })
}

/// Non-negative seconds (fractions allowed).
fn seconds(s: &str) -> Result<f64> {
    let v: f64 = s
        .trim()
        .parse()
        .with_context(|| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && (0.0..=1e9).contains(&v)) {
        bail!("{v} seconds is not between 0 and 1e9");
    }
    Ok(v)
}

/// Positive seconds: a zero timeout would refuse every request.
fn positive_seconds(s: &str) -> Result<f64> {
    let v = seconds(s)?;
    if v == 0.0 {
        bail!("must be positive: with 0 no request could arrive");
    }
    Ok(v)
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

/// The flags of [`ServeConfig`]'s fields.
const SERVE_FLAGS: Flags = &[
    ("input_shape", "--input-shape"),
    ("max_batch", "--max-batch"),
    ("max_wait", "--max-wait-us"),
    ("max_images", "--max-images"),
    ("max_body_bytes", "--max-body-mib"),
    ("queue", "--queue"),
    ("spin", "--spin-us"),
    ("header_timeout", "--header-timeout"),
    ("body_timeout", "--body-timeout"),
    ("max_connections", "--max-connections"),
    ("shutdown_timeout", "--shutdown-timeout"),
];

/// The service's configuration from the flags; checked before the model loads.
fn config(a: &ServeArgs, shape: [i64; 3]) -> Result<Checked<ServeConfig>> {
    ServeConfig {
        max_batch: a.max_batch,
        max_wait: Duration::from_micros(a.max_wait_us),
        max_images: a.max_images,
        max_body_bytes: a.max_body_bytes,
        queue: a.queue,
        spin: Duration::from_micros(a.spin_us),
        header_timeout: Duration::from_secs_f64(a.header_timeout),
        body_timeout: Duration::from_secs_f64(a.body_timeout),
        max_connections: a.max_connections,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        ..ServeConfig::new(shape)
    }
    .check()
    .flag_hint(SERVE_FLAGS)
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
    let cfg = config(&a, shape)?;
    let model = load_model(&spec, shape)?;
    let name = model.info().name.clone();
    let service = router(model, detector, cfg)?;
    let listener = bind(a.addr)?;
    eprintln!(
        "serving {name} on http://{} (POST /v1/score, GET /healthz, GET /metrics); Ctrl-C to stop",
        listener.local_addr()?
    );
    serve_listener(listener, service, &cfg, shutdown_signal())
}
