//! The model worker: one thread owns the classifier and drains a queue of requests, running
//! whatever has arrived as one batch (dynamic micro-batching). Keeping every forward pass on
//! this one thread keeps the model's weights in its core's cache and the HTTP stack's in the
//! others'; polling the queue for a moment spares the thread wake-up between close requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tch::Tensor;

use super::metrics::ServeMetrics;
use crate::detector::Detector;
use crate::model::{logits_no_grad, Classifier};
use crate::score::{host_logits, row_scores, softmax};

/// The answer for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageResult {
    pub pred: i64,
    pub probs: Vec<f64>,
    pub logit_margin: f64,
    /// `None` when the detector has no pseudo-margin (or there is no detector).
    pub pseudo_margin: Option<f64>,
    /// `None` without a detector.
    pub brittle: Option<bool>,
}

/// The model and its detector, applied to batches.
pub struct Scorer {
    pub model: Box<dyn Classifier>,
    pub detector: Option<Detector>,
}

impl Scorer {
    /// Scores `[N, C, H, W]` images with one forward pass.
    pub fn score(&self, x: &Tensor) -> Result<Vec<ImageResult>> {
        let x = x.to_device(self.model.device());
        let (logits, pm) = match &self.detector {
            Some(d) => d.forward(self.model.as_ref(), &x)?,
            None => (logits_no_grad(self.model.as_ref(), &x)?, None),
        };
        let (z, k) = host_logits(&logits)?;
        z.chunks(k)
            .enumerate()
            .map(|(i, row)| {
                let s = row_scores(row);
                let pseudo = pm.as_ref().map(|v| v[i]);
                let brittle = match &self.detector {
                    Some(d) => Some(d.decide(s.logit_margin, pseudo)?.brittle),
                    None => None,
                };
                Ok(ImageResult {
                    pred: s.pred,
                    probs: softmax(row),
                    logit_margin: s.logit_margin,
                    pseudo_margin: pseudo,
                    brittle,
                })
            })
            .collect()
    }

    /// Scores `n` images given as flattened NCHW pixels of `shape`, recording the batch in
    /// `metrics`; a panic inside libtorch becomes an error, so the service goes on.
    pub fn score_pixels(
        &self,
        pixels: &[f32],
        n: usize,
        [c, h, w]: [i64; 3],
        metrics: &ServeMetrics,
    ) -> Result<Vec<ImageResult>, String> {
        let x = Tensor::from_slice(pixels).view([n as i64, c, h, w]);
        metrics.batch_size.observe(n as f64);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.score(&x)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the model panicked")));
        match outcome {
            Ok(results) => {
                metrics.images.inc_by(n as u64);
                let flagged = results.iter().filter(|r| r.brittle == Some(true)).count();
                metrics.flagged.inc_by(flagged as u64);
                Ok(results)
            }
            Err(e) => Err(format!("scoring failed: {e:#}")),
        }
    }
}

/// Images of one request, flattened NCHW, and where to send their answers.
pub struct Job {
    pub pixels: Vec<f32>,
    pub n: usize,
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<ImageResult>, String>>,
}

/// How the worker forms batches.
#[derive(Debug, Clone)]
pub struct BatchPolicy {
    /// Stop adding requests once a batch holds this many images.
    pub max_batch: usize,
    /// Wait at most this long for requests that are in flight (being decoded) to join the
    /// batch (0: take only what is queued).
    pub max_wait: Duration,
    /// Requests received and not yet answered: when no other request is in flight the worker
    /// runs at once, so a lone client never pays the wait.
    pub inflight: Arc<AtomicUsize>,
    /// How long the idle worker polls the queue before it sleeps.
    pub spin: Duration,
}

/// Starts the worker thread; it ends when every sender is dropped.
pub fn spawn(
    scorer: Scorer,
    input_shape: [i64; 3],
    policy: BatchPolicy,
    queue: usize,
    metrics: ServeMetrics,
) -> Result<(SyncSender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue.max(1));
    // OpenMP keeps its thread count per thread. Without this, the serve benchmark's model thread
    // started an OpenMP team of one thread per core (gdb: a second `brittle-model` thread in
    // gomp_thread_start), ignoring `--threads 1`.
    let threads = tch::get_num_threads();
    let handle = std::thread::Builder::new()
        .name("brittle-model".into())
        .spawn(move || {
            tch::set_num_threads(threads);
            run(scorer, input_shape, policy, rx, metrics)
        })?;
    Ok((tx, handle))
}

/// Tries `attempt` until it gives `Some` or `spin` has passed, yielding the core to any other
/// runnable thread between tries (a pure spin starved the batching under load). `None`: time's
/// up, sleep instead.
pub(super) fn poll<T>(spin: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = attempt() {
            return Some(v);
        }
        if start.elapsed() >= spin {
            return None;
        }
        std::thread::yield_now();
    }
}

/// The next job: polled for `spin`, then waited for asleep. `None` once the queue is closed.
fn next_job(rx: &Receiver<Job>, spin: Duration) -> Option<Job> {
    let polled = poll(spin, || match rx.try_recv() {
        Ok(j) => Some(Some(j)),
        Err(TryRecvError::Disconnected) => Some(None),
        Err(TryRecvError::Empty) => None,
    });
    polled.unwrap_or_else(|| rx.recv().ok())
}

/// Collects the next batch: waits for one job ([`next_job`]), then takes what is queued and,
/// while more requests are in flight than the batch holds, waits up to `max_wait` for them,
/// until `max_batch` images. A job that would overflow the batch is kept
/// in `pending` for the next one. `None` when the queue is closed and empty.
fn next_batch(
    rx: &Receiver<Job>,
    pending: &mut Option<Job>,
    policy: &BatchPolicy,
) -> Option<Vec<Job>> {
    let first = match pending.take() {
        Some(j) => j,
        None => next_job(rx, policy.spin)?,
    };
    let deadline = Instant::now() + policy.max_wait;
    let mut n = first.n;
    let mut jobs = vec![first];
    while n < policy.max_batch {
        let next = match rx.try_recv() {
            Ok(j) => j,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || policy.inflight.load(Ordering::SeqCst) <= jobs.len() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        if n + next.n > policy.max_batch {
            *pending = Some(next);
            break;
        }
        n += next.n;
        jobs.push(next);
    }
    Some(jobs)
}

fn run(
    scorer: Scorer,
    shape: [i64; 3],
    policy: BatchPolicy,
    rx: Receiver<Job>,
    metrics: ServeMetrics,
) {
    let mut pending = None;
    while let Some(jobs) = next_batch(&rx, &mut pending, &policy) {
        // Requests whose client went away need no forward pass.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        let n: usize = jobs.iter().map(|j| j.n).sum();
        if n == 0 {
            continue;
        }
        let pixels: Vec<f32> = if jobs.len() == 1 {
            Vec::new()
        } else {
            jobs.iter().flat_map(|j| j.pixels.iter().copied()).collect()
        };
        let flat = if jobs.len() == 1 {
            &jobs[0].pixels
        } else {
            &pixels
        };
        match scorer.score_pixels(flat, n, shape, &metrics) {
            Ok(results) => {
                let mut it = results.into_iter();
                for j in jobs {
                    let mine: Vec<ImageResult> = it.by_ref().take(j.n).collect();
                    let _ = j.reply.send(Ok(mine));
                }
            }
            Err(msg) => {
                for j in jobs {
                    let _ = j.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
