//! Real-time scoring service: `POST /v1/score` answers, per image, the predicted class, the
//! probabilities, the logit margin, the pseudo-margin and whether the detector flags the
//! decision as brittle; `GET /healthz`; `GET /metrics` (Prometheus).
//!
//! Concurrent requests are batched by one model worker thread ([`worker`]); the HTTP side
//! (axum on hyper and tokio) only decodes bodies ([`input`]) and waits for answers.
//!
//! No one request can take the service down: bodies are decoded with limits checked before any
//! work ([`input`]), the worker is supervised ([`worker::Health`] drives `/healthz`), every
//! connection has a header (and keep-alive idle) timeout and every body a read deadline, open
//! connections are capped, and shutdown drops what is still open after a deadline.

pub mod input;
pub mod metrics;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;

use crate::detector::Detector;
use crate::model::Classifier;
use crate::util::{Check, Checked, OptionError};
use input::InputSpec;
use metrics::ServeMetrics;
use worker::{BatchPolicy, Health, Job, Scorer};

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

/// Limits, timeouts and batching of the service.
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
    /// How long the idle model worker polls for the next request before sleeping (0: sleep at
    /// once). Each sleep costs a thread wake-up: tens of microseconds, a tenth of a small
    /// model's forward pass. The worker is the model's own thread, never one of tokio's.
    pub spin: Duration,
    /// Longest wait for a request's head (request line and headers): from the connection's
    /// opening, or on a kept-alive connection from the previous answer, so it is also the idle
    /// keep-alive timeout. A client slower than this is disconnected.
    pub header_timeout: Duration,
    /// Longest time a request's body may take to arrive once its head has (408 beyond).
    pub body_timeout: Duration,
    /// Most open connections; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// After a shutdown signal, how long open connections may finish before they are dropped.
    pub shutdown_timeout: Duration,
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
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            max_connections: 512,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// The server takes its configuration checked ([`Check::check`]).
impl Check for ServeConfig {
    /// Checks that every limit admits something: a zero (or an input shape whose values per
    /// image overflow) would turn every request into an error.
    fn validate(&self) -> Result<()> {
        let [c, h, w] = self.input_shape;
        if c <= 0 || h <= 0 || w <= 0 {
            bail!(OptionError::new(
                "input_shape",
                format!(
                    "the input shape {:?} must be three positive numbers",
                    self.input_shape
                )
            ));
        }
        let per_image = [c, h, w]
            .iter()
            .try_fold(1usize, |p, &d| p.checked_mul(d as usize))
            .filter(|&p| p <= isize::MAX as usize / 4);
        if per_image.is_none() {
            bail!(OptionError::new(
                "input_shape",
                format!(
                    "the input shape {:?} has too many values per image",
                    self.input_shape
                )
            ));
        }
        for (name, v) in [
            ("max_batch", self.max_batch),
            ("max_images", self.max_images),
            ("max_body_bytes", self.max_body_bytes),
            ("queue", self.queue),
            ("max_connections", self.max_connections),
        ] {
            if v == 0 {
                bail!(OptionError::new(
                    name,
                    format!("{name} must be at least 1 (got 0): with 0 no request could be served")
                ));
            }
        }
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            bail!(OptionError::new(
                "max_connections",
                format!(
                    "max_connections {} exceeds {}",
                    self.max_connections,
                    tokio::sync::Semaphore::MAX_PERMITS
                )
            ));
        }
        for (name, v) in [
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if v.is_zero() {
                bail!(OptionError::new(
                    name,
                    format!("{name} must be positive: with 0 no request could arrive")
                ));
            }
        }
        // Deadlines are instants: a duration near u64::MAX would overflow when added to now.
        for (name, v, most) in [
            ("max_wait", self.max_wait, Duration::from_secs(60)),
            ("spin", self.spin, Duration::from_secs(1)),
            ("header_timeout", self.header_timeout, MAX_TIMEOUT),
            ("body_timeout", self.body_timeout, MAX_TIMEOUT),
            ("shutdown_timeout", self.shutdown_timeout, MAX_TIMEOUT),
        ] {
            if v > most {
                bail!(OptionError::new(
                    name,
                    format!("{name} is {v:?}; at most {most:?} is accepted")
                ));
            }
        }
        Ok(())
    }
}

/// Longest timeout accepted (a day): longer ones are a mistake, and far-future deadlines overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Default [`ServeConfig::spin`] in microseconds: polling spares a lone request a thread wake-up
/// (figures in `bench/README.md`, serve). The poll yields the core to any other runnable thread;
/// an idle server polls for 1 ms after a request.
pub const DEFAULT_SPIN_US: u64 = 1000;

/// Intra-op threads for the model when none are asked for: half the cores, leaving the rest to
/// HTTP, which answered faster and served more than all cores (figures in `bench/README.md`,
/// serve).
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
    health: Arc<Health>,
    /// Detector fields echoed in every answer.
    detector: serde_json::Value,
    /// [`ServeConfig::body_timeout`].
    body_timeout: Duration,
}

/// Counts a request in flight for as long as it lives: dropped on every path, including a
/// handler future dropped because its client went away (a leaked count made every later lone
/// request wait the full batch window for a request that would never come).
struct InFlight<'a>(&'a AppState);

impl<'a> InFlight<'a> {
    fn enter(st: &'a AppState) -> Self {
        st.inflight.fetch_add(1, Ordering::SeqCst);
        st.metrics.in_flight.inc();
        InFlight(st)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.in_flight.dec();
    }
}

/// The routes, their metrics and the model worker, ready for [`serve_listener`].
pub struct Service {
    pub app: Router,
    pub metrics: ServeMetrics,
    /// Ends once `app` (and every clone of its state) is dropped; join it after that.
    pub worker: std::thread::JoinHandle<()>,
}

/// Checks the configuration, builds the router and starts the model worker.
pub fn router(
    model: Box<dyn Classifier>,
    detector: Option<Detector>,
    cfg: Checked<ServeConfig>,
) -> Result<Service> {
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
    let (jobs, health, handle) = worker::spawn(
        Scorer { model, detector },
        cfg.input_shape,
        BatchPolicy {
            max_batch: cfg.max_batch,
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
        input: InputSpec {
            shape: cfg.input_shape,
            max_images: cfg.max_images,
        },
        metrics: metrics.clone(),
        health,
        detector: detector_info,
        body_timeout: cfg.body_timeout,
    });
    let app = Router::new()
        .route("/v1/score", post(score))
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(state);
    Ok(Service {
        app,
        metrics,
        worker: handle,
    })
}

/// 200 while the model worker runs and its batches succeed, 503 with the reason otherwise.
async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    match st.health.check() {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn render_metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        st.metrics.render(),
    )
}

async fn score(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match tokio::time::timeout(st.body_timeout, Bytes::from_request(req, &())).await {
        Ok(Ok(body)) => body,
        Ok(Err(rejection)) => {
            let e = ApiError::new(rejection.status(), rejection.body_text());
            st.metrics.record_request(e.status.as_u16(), None);
            return e.into_response();
        }
        Err(_) => {
            let e = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {:?}",
                    st.body_timeout
                ),
            );
            st.metrics.record_request(e.status.as_u16(), None);
            // The rest of the body may still come: this connection cannot carry another request.
            let mut resp = e.into_response();
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return resp;
        }
    };
    let t0 = Instant::now();
    let _inflight = InFlight::enter(&st);
    let resp = match score_body(&st, content_type, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    };
    st.metrics
        .record_request(resp.status().as_u16(), Some(t0.elapsed().as_secs_f64()));
    resp
}

/// The answer to `POST /v1/score`, serialised straight from the results.
#[derive(serde::Serialize)]
struct Answer<'a> {
    detector: &'a serde_json::Value,
    results: Vec<worker::ImageResult>,
}

/// Bodies above this size are decoded on tokio's blocking pool, so that a large body does not
/// hold an HTTP thread (a 16 MiB JSON body takes ~100 ms); smaller ones decode in place.
const DECODE_INLINE_MAX: usize = 256 << 10;

async fn score_body(
    st: &AppState,
    content_type: Option<String>,
    body: Bytes,
) -> Result<Answer<'_>, ApiError> {
    let images = if body.len() <= DECODE_INLINE_MAX {
        st.input.decode(content_type.as_deref(), &body)?
    } else {
        let spec = st.input;
        tokio::task::spawn_blocking(move || spec.decode(content_type.as_deref(), &body))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("decoding the body failed: {e}"),
                )
            })??
    };
    let results = score_queued(st, images)
        .await?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Answer {
        detector: &st.detector,
        results,
    })
}

/// Hands the images to the model worker, which batches them with other requests, and waits
/// for the answer without blocking or polling the HTTP thread; the outer error is the queue's
/// (full, or the worker gone), the inner one the scoring's.
async fn score_queued(
    st: &AppState,
    images: input::Images,
) -> Result<Result<Vec<worker::ImageResult>, String>, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
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
    // The worker drops a reply unanswered only when its loop panicked (and restarted).
    rx.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model worker failed while scoring this request",
        )
    })
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
    cfg: Checked<ServeConfig>,
    addr: SocketAddr,
) -> Result<ServerHandle> {
    let service = router(model, detector, cfg)?;
    let listener = bind(addr)?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("brittle-http".into())
        .spawn(move || {
            serve_listener(listener, service, &cfg, async {
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

/// Runs the HTTP server on a new tokio runtime until `shutdown` resolves, then lets open
/// connections finish for up to [`ServeConfig::shutdown_timeout`], drops the rest, and waits
/// for the model worker to finish.
pub fn serve_listener(
    listener: std::net::TcpListener,
    service: Service,
    cfg: &Checked<ServeConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let Service {
        app,
        metrics,
        worker,
    } = service;
    let served = rt.block_on(accept_loop(listener, app, metrics, **cfg, shutdown));
    // Connections still open past the deadline are dropped with the runtime; a decode on the
    // blocking pool gets a moment to end.
    rt.shutdown_timeout(Duration::from_secs(1));
    served?;
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the model worker panicked"))
}

/// Accepts connections, at most [`ServeConfig::max_connections`] at a time, and serves each
/// with HTTP/1.1 under the header timeout until `shutdown`; then waits for open connections
/// for the shutdown deadline.
async fn accept_loop(
    listener: std::net::TcpListener,
    app: Router,
    metrics: ServeMetrics,
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .keep_alive(true);
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.context("connection permits closed")?,
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // the server goes on, and waits a moment when the error is not the client's.
                    tracing::warn!("accepting a connection: {e}");
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small JSON answers must not wait for delayed ACKs (Nagle).
        let _ = tcp.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            metrics.connections.inc();
            // A connection's errors (timeouts, resets, malformed requests) end only it.
            let _ = conn.await;
            metrics.connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing open connections");
    if tokio::time::timeout(cfg.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {:?} after the shutdown signal are dropped",
            cfg.shutdown_timeout
        );
    }
    Ok(())
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
    tracing::info!("shutdown signal received");
}
