//! Real-time scoring service: `POST /v1/score` answers, per image, the predicted class, the
//! probabilities, the logit margin, the pseudo-margin and whether the detector flags the
//! decision as brittle; `GET /healthz`; `GET /metrics` (Prometheus).
//!
//! Concurrent requests are batched by one model worker thread ([`worker`]); the HTTP side
//! (axum on tokio) only decodes bodies ([`input`]) and waits for answers.

pub mod input;
pub mod metrics;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::oneshot::error::TryRecvError;

use crate::detector::Detector;
use crate::model::Classifier;
use input::InputSpec;
use metrics::ServeMetrics;
use worker::{BatchPolicy, Job, Scorer};

/// An HTTP error with a JSON body `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Limits and batching of the service.
#[derive(Debug, Clone, Copy)]
pub struct ServeConfig {
    /// Model input `[C, H, W]`.
    pub input_shape: [i64; 3],
    /// Most images per forward pass.
    pub max_batch: usize,
    /// How long the worker waits for requests already being received to join a batch.
    pub max_wait: Duration,
    /// Most images per request (413 beyond).
    pub max_images: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Requests waiting for the worker before new ones get 503.
    pub queue: usize,
    /// How long the idle model worker polls for the next request, and a lone request's HTTP
    /// thread for its answer, before sleeping (0: sleep at once). Each sleep costs a thread
    /// wake-up: tens of microseconds, a tenth of a small model's forward pass.
    pub spin: Duration,
}

impl ServeConfig {
    /// Defaults for a model input shape.
    pub fn new(input_shape: [i64; 3]) -> Self {
        ServeConfig {
            input_shape,
            max_batch: 64,
            max_wait: Duration::from_micros(1000),
            max_images: 64,
            max_body_bytes: 16 << 20,
            queue: 1024,
            spin: Duration::from_micros(DEFAULT_SPIN_US),
        }
    }
}

/// Default [`ServeConfig::spin`] in microseconds. On the 2-core development machine (resnet_2b,
/// one client) the model thread's poll took the one-image p50 from 0.36 ms to 0.27 ms, and the
/// lone request's poll to 0.25 ms (0.33 ms when the model ran on the HTTP thread). The polls
/// yield the core to any other runnable thread; an idle server polls for 1 ms after a request.
pub const DEFAULT_SPIN_US: u64 = 1000;

/// Intra-op threads for the model when none are asked for: half the cores, leaving the rest to
/// HTTP. On the 2-core development machine (resnet_2b) one model thread answered a one-image
/// request in 0.25 ms (p50) against 0.47 ms with two, and served 6000-6200 images/s to 8 clients
/// against 4100-4250.
pub fn default_model_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// What the handlers share.
struct AppState {
    jobs: SyncSender<Job>,
    /// Requests between body received and answer sent (the worker waits for them to batch).
    inflight: Arc<AtomicUsize>,
    input: InputSpec,
    metrics: ServeMetrics,
    /// Detector fields echoed in every answer.
    detector: serde_json::Value,
    /// [`ServeConfig::spin`].
    spin: Duration,
}

/// Builds the router and starts the model worker. The worker stops once the router (and every
/// clone of its state) is dropped; join the returned handle after that.
pub fn router(
    model: Box<dyn Classifier>,
    detector: Option<Detector>,
    cfg: ServeConfig,
) -> Result<(Router, std::thread::JoinHandle<()>)> {
    if let Some(d) = &detector {
        d.check_model(model.info())?;
    }
    let detector_info = match &detector {
        Some(d) => json!({
            "eps": d.spec.eps,
            "norm": d.spec.norm,
            "score": d.spec.score,
            "lambda": d.spec.lambda,
        }),
        None => serde_json::Value::Null,
    };
    let metrics = ServeMetrics::default();
    let inflight = Arc::new(AtomicUsize::new(0));
    let (jobs, handle) = worker::spawn(
        Scorer { model, detector },
        cfg.input_shape,
        BatchPolicy {
            max_batch: cfg.max_batch.max(1),
            max_wait: cfg.max_wait,
            inflight: inflight.clone(),
            spin: cfg.spin,
        },
        cfg.queue,
        metrics.clone(),
    )?;
    let state = Arc::new(AppState {
        jobs,
        inflight,
        spin: cfg.spin,
        input: InputSpec {
            shape: cfg.input_shape,
            max_images: cfg.max_images,
        },
        metrics,
        detector: detector_info,
    });
    let app = Router::new()
        .route("/v1/score", post(score))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(state);
    Ok((app, handle))
}

async fn render_metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        st.metrics.render(),
    )
}

async fn score(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    st.inflight.fetch_add(1, Ordering::SeqCst);
    let resp = match score_body(&st, &headers, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    };
    st.inflight.fetch_sub(1, Ordering::SeqCst);
    st.metrics
        .record_request(resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

/// The answer to `POST /v1/score`, serialised straight from the results.
#[derive(serde::Serialize)]
struct Answer<'a> {
    detector: &'a serde_json::Value,
    results: Vec<worker::ImageResult>,
}

async fn score_body<'a>(
    st: &'a AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Answer<'a>, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let images = st.input.decode(ct, &body)?;
    let results = score_queued(st, images)
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Answer {
        detector: &st.detector,
        results,
    })
}

/// Hands the images to the model worker, which batches them with other requests; the outer
/// error is the queue's (full, or the worker gone), the inner one the scoring's. A request alone
/// in flight polls for its answer for up to [`ServeConfig::spin`] on this thread: nothing else
/// needs the thread, and the answer comes without a wake-up.
async fn score_queued(
    st: &AppState,
    images: input::Images,
) -> Result<Result<Vec<worker::ImageResult>, String>, ApiError> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let job = Job {
        pixels: images.pixels,
        n: images.n,
        reply: tx,
    };
    st.jobs.try_send(job).map_err(|e| {
        let why = match e {
            TrySendError::Full(_) => "the server is busy (queue full); retry later",
            TrySendError::Disconnected(_) => "the model worker has stopped",
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why)
    })?;
    let stopped = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model worker has stopped",
        )
    };
    if st.inflight.load(Ordering::SeqCst) == 1 {
        let polled = worker::poll(st.spin, || match rx.try_recv() {
            Ok(scored) => Some(Ok(scored)),
            Err(TryRecvError::Closed) => Some(Err(stopped())),
            Err(TryRecvError::Empty) => None,
        });
        if let Some(answer) = polled {
            return answer;
        }
    }
    rx.await.map_err(|_| stopped())
}

/// A server running on its own runtime thread (tests, benchmarks).
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerHandle {
    /// Stops accepting, finishes in-flight requests, stops the worker.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Binds `addr` (port 0: any free port) and serves on a background thread until
/// [`ServerHandle::shutdown`].
pub fn spawn(
    model: Box<dyn Classifier>,
    detector: Option<Detector>,
    cfg: ServeConfig,
    addr: SocketAddr,
) -> Result<ServerHandle> {
    let listener = bind(addr)?;
    let addr = listener.local_addr()?;
    let (app, worker) = router(model, detector, cfg)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("brittle-http".into())
        .spawn(move || {
            serve_listener(listener, app, worker, async {
                let _ = stopped.await;
            })
        })?;
    Ok(ServerHandle {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// A non-blocking listener on `addr`, ready for [`serve_listener`].
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Runs the HTTP server on a new tokio runtime until `shutdown` resolves, then waits for
/// in-flight requests and for the model worker to finish.
pub fn serve_listener(
    listener: std::net::TcpListener,
    app: Router,
    worker: std::thread::JoinHandle<()>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        // Small JSON answers must not wait for delayed ACKs (Nagle).
        let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server")
    })?;
    // Connection tasks may still hold the state for a moment; the runtime's drop ends them.
    drop(rt);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the model worker panicked"))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
