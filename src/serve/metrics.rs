//! Prometheus metrics of the scoring service (`GET /metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// Every metric, cheap to clone (shared handles).
#[derive(Clone)]
pub struct ServeMetrics {
    registry: std::sync::Arc<Registry>,
    pub requests: Family<StatusLabel, Counter>,
    pub latency: Histogram,
    pub batch_size: Histogram,
    pub images: Counter,
    pub flagged: Counter,
    flagged_share: Gauge<f64, AtomicU64>,
    /// Requests between body received and answer sent (or client gone).
    pub in_flight: Gauge,
    /// Open HTTP connections.
    pub connections: Gauge,
    /// Times the model worker's loop panicked and was restarted.
    pub worker_restarts: Counter,
}

impl Default for ServeMetrics {
    fn default() -> Self {
        let requests = Family::<StatusLabel, Counter>::default();
        // 50 µs .. ~1.6 s.
        let latency = Histogram::new(exponential_buckets(5e-5, 2.0, 16));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        let images = Counter::default();
        let flagged = Counter::default();
        let flagged_share = Gauge::<f64, AtomicU64>::default();
        let in_flight = Gauge::default();
        let connections = Gauge::default();
        let worker_restarts = Counter::default();
        let mut r = Registry::with_prefix("brittle");
        r.register(
            "requests",
            "Scoring requests by HTTP status",
            requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Latency of POST /v1/score, from the body received to the answer",
            latency.clone(),
        );
        r.register(
            "batch_size",
            "Images per model forward pass (dynamic micro-batching)",
            batch_size.clone(),
        );
        r.register("images_scored", "Images scored", images.clone());
        r.register(
            "images_flagged",
            "Images whose decision the detector flagged as brittle",
            flagged.clone(),
        );
        r.register(
            "flagged_share",
            "Share of scored images flagged brittle since start",
            flagged_share.clone(),
        );
        r.register(
            "requests_in_flight",
            "Scoring requests received and not yet answered",
            in_flight.clone(),
        );
        r.register("connections", "Open HTTP connections", connections.clone());
        r.register(
            "worker_restarts",
            "Restarts of the model worker after a panic",
            worker_restarts.clone(),
        );
        ServeMetrics {
            registry: std::sync::Arc::new(r),
            requests,
            latency,
            batch_size,
            images,
            flagged,
            flagged_share,
            in_flight,
            connections,
            worker_restarts,
        }
    }
}

impl ServeMetrics {
    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let n = self.images.get();
        if n > 0 {
            self.flagged_share.set(self.flagged.get() as f64 / n as f64);
        }
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry);
        s
    }

    /// Counts a request by status; `seconds` from its body received to its answer, `None` for
    /// one whose body never fully arrived.
    pub fn record_request(&self, status: u16, seconds: Option<f64>) {
        self.requests.get_or_create(&StatusLabel { status }).inc();
        if let Some(s) = seconds {
            self.latency.observe(s);
        }
    }
}

/// The `Content-Type` of [`ServeMetrics::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
