//! The model worker: one thread owns the classifier and drains a queue of requests, running
//! whatever has arrived as one batch (dynamic micro-batching). Keeping every forward pass on
//! this one thread keeps the model's weights in its core's cache and the HTTP stack's in the
//! others'; polling the queue for a moment spares the thread wake-up between close requests
//! (this thread is the model's own, never one of tokio's).
//!
//! A failure never stops the service: each batch runs under `catch_unwind` (a failed batch of
//! several requests is retried request by request, so one bad request fails alone), and the
//! loop itself is supervised and restarted after a panic. [`Health`] tells `/healthz` the truth.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tch::Tensor;

use super::metrics::ServeMetrics;
use crate::detector::apply::score_images;
use crate::detector::Detector;
use crate::model::Classifier;
use crate::score::softmax;

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
    /// Scores `[N, C, H, W]` images with one forward pass ([`score_images`], as `brittle score`).
    pub fn score(&self, x: &Tensor) -> Result<Vec<ImageResult>> {
        let scored = score_images(self.model.as_ref(), self.detector.as_ref(), x, None)?;
        Ok(scored
            .into_iter()
            .map(|s| ImageResult {
                pred: s.scores.pred,
                probs: softmax(&s.logits),
                logit_margin: s.scores.logit_margin,
                pseudo_margin: s.decision.and_then(|d| d.pseudo_margin),
                brittle: s.decision.map(|d| d.brittle),
            })
            .collect())
    }

    /// Scores `n` images given as flattened NCHW pixels of `shape`, recording the batch in
    /// `metrics`. A pixel count that does not match, or a panic inside libtorch, becomes an
    /// error, so the service goes on.
    pub fn score_pixels(
        &self,
        pixels: &[f32],
        n: usize,
        [c, h, w]: [i64; 3],
        metrics: &ServeMetrics,
    ) -> Result<Vec<ImageResult>, String> {
        let want =
            [n as i64, c, h, w]
                .iter()
                .try_fold(1i64, |p, &d| if d > 0 { p.checked_mul(d) } else { None });
        if want != i64::try_from(pixels.len()).ok() {
            return Err(format!(
                "scoring failed: {} values for {n} images of shape [{c}, {h}, {w}]",
                pixels.len()
            ));
        }
        metrics.batch_size.observe(n as f64);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.score(&Tensor::from_slice(pixels).view([n as i64, c, h, w]))
        }))
        .unwrap_or_else(|p| {
            Err(anyhow::anyhow!(
                "the model panicked: {}",
                panic_message(&*p)
            ))
        });
        match outcome {
            Ok(results) if results.len() == n => {
                metrics.images.inc_by(n as u64);
                let flagged = results.iter().filter(|r| r.brittle == Some(true)).count();
                metrics.flagged.inc_by(flagged as u64);
                Ok(results)
            }
            Ok(results) => Err(format!(
                "scoring failed: the model gave {} answers for {n} images",
                results.len()
            )),
            Err(e) => Err(format!("scoring failed: {e:#}")),
        }
    }
}

/// The text of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Batches that fail in a row (every request in them failing) before `/healthz` reports the
/// model as not serving.
pub const UNHEALTHY_AFTER: usize = 3;

/// What `/healthz` reports: whether the worker runs and whether its batches succeed.
#[derive(Debug, Default)]
pub struct Health {
    stopped: AtomicBool,
    failed_in_a_row: AtomicUsize,
    last_error: Mutex<String>,
}

impl Health {
    /// `Err(why)` when the worker has stopped or its last [`UNHEALTHY_AFTER`] batches failed.
    pub fn check(&self) -> Result<(), String> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err("the model worker has stopped".into());
        }
        let failed = self.failed_in_a_row.load(Ordering::SeqCst);
        if failed >= UNHEALTHY_AFTER {
            let last = self
                .last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            return Err(format!(
                "the model failed its last {failed} batches; the last error: {last}"
            ));
        }
        Ok(())
    }

    fn record(&self, outcome: Result<(), &str>) {
        match outcome {
            Ok(()) => self.failed_in_a_row.store(0, Ordering::SeqCst),
            Err(e) => {
                if let Ok(mut last) = self.last_error.lock() {
                    e.clone_into(&mut last);
                }
                self.failed_in_a_row.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Marks the worker stopped when its thread ends, however it ends.
struct StoppedOnDrop(Arc<Health>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::SeqCst);
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

/// Starts the worker thread; it ends when every sender is dropped. The returned [`Health`]
/// follows it.
pub fn spawn(
    scorer: Scorer,
    input_shape: [i64; 3],
    policy: BatchPolicy,
    queue: usize,
    metrics: ServeMetrics,
) -> Result<(SyncSender<Job>, Arc<Health>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue.max(1));
    let health = Arc::new(Health::default());
    let stopped = StoppedOnDrop(health.clone());
    // OpenMP keeps its thread count per thread. Without this, the serve benchmark's model thread
    // started an OpenMP team of one thread per core (gdb: a second `brittle-model` thread in
    // gomp_thread_start), ignoring `--threads 1`.
    let threads = tch::get_num_threads();
    let handle = std::thread::Builder::new()
        .name("brittle-model".into())
        .spawn(move || {
            tch::set_num_threads(threads);
            let health = &stopped.0;
            let mut pending = None;
            supervise(&metrics, || {
                run(
                    &scorer,
                    input_shape,
                    &policy,
                    &rx,
                    &metrics,
                    health,
                    &mut pending,
                )
            });
        })?;
    Ok((tx, health, handle))
}

/// Pause before a panicked loop restarts, so a panic that repeats does not spin a core.
const RESTART_PAUSE: Duration = Duration::from_millis(50);

/// Runs `body` until it returns, restarting it (and counting the restart) after each panic.
/// The requests of the batch that panicked get an error: their reply channels are dropped.
fn supervise(metrics: &ServeMetrics, mut body: impl FnMut()) {
    while let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut body)) {
        metrics.worker_restarts.inc();
        tracing::error!(
            "the model worker panicked ({}); restarting it",
            panic_message(p.as_ref())
        );
        std::thread::sleep(RESTART_PAUSE);
    }
}

/// Tries `attempt` until it gives `Some` or `spin` has passed, yielding the core to any other
/// runnable thread between tries (a pure spin starved the batching under load). `None`: time's
/// up, sleep instead. Only for the model's own thread: a tokio thread must never spin.
fn poll<T>(spin: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
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
    // A wait too long to add to now (the policy is public) means no wait.
    let deadline = Instant::now()
        .checked_add(policy.max_wait)
        .unwrap_or_else(Instant::now);
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

/// Serves batches until the queue closes.
fn run(
    scorer: &Scorer,
    shape: [i64; 3],
    policy: &BatchPolicy,
    rx: &Receiver<Job>,
    metrics: &ServeMetrics,
    health: &Health,
    pending: &mut Option<Job>,
) {
    while let Some(jobs) = next_batch(rx, pending, policy) {
        // Requests whose client went away need no forward pass.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if jobs.is_empty() {
            continue;
        }
        let answers: Vec<Result<Vec<ImageResult>, String>> =
            match score_batch(scorer, &jobs, shape, metrics) {
                Ok(results) => {
                    let mut it = results.into_iter();
                    jobs.iter()
                        .map(|j| Ok(it.by_ref().take(j.n).collect()))
                        .collect()
                }
                Err(e) if jobs.len() == 1 => vec![Err(e)],
                // One forward pass failed for several requests: each alone, so a request that
                // breaks the model fails alone.
                Err(_) => jobs
                    .iter()
                    .map(|j| score_batch(scorer, std::slice::from_ref(j), shape, metrics))
                    .collect(),
            };
        health.record(match answers.iter().find_map(|a| a.as_ref().err()) {
            Some(e) if answers.iter().all(Result::is_err) => Err(e),
            _ => Ok(()),
        });
        for (j, answer) in jobs.into_iter().zip(answers) {
            let _ = j.reply.send(answer);
        }
    }
}

/// Scores the jobs' images in one forward pass.
fn score_batch(
    scorer: &Scorer,
    jobs: &[Job],
    shape: [i64; 3],
    metrics: &ServeMetrics,
) -> Result<Vec<ImageResult>, String> {
    let n: usize = jobs.iter().map(|j| j.n).sum();
    if let [one] = jobs {
        return scorer.score_pixels(&one.pixels, n, shape, metrics);
    }
    let pixels: Vec<f32> = jobs.iter().flat_map(|j| j.pixels.iter().copied()).collect();
    scorer.score_pixels(&pixels, n, shape, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervise_restarts_a_panicking_loop_and_counts_it() {
        let metrics = ServeMetrics::default();
        let mut runs = 0;
        supervise(&metrics, || {
            runs += 1;
            if runs < 3 {
                panic!("loop panic {runs}");
            }
        });
        assert_eq!(runs, 3);
        assert_eq!(metrics.worker_restarts.get(), 2);
    }

    #[test]
    fn health_turns_unhealthy_after_failed_batches_and_back() {
        let h = Health::default();
        for _ in 0..UNHEALTHY_AFTER - 1 {
            h.record(Err("boom"));
        }
        assert!(h.check().is_ok());
        h.record(Err("boom"));
        assert!(h.check().unwrap_err().contains("boom"));
        h.record(Ok(()));
        assert!(h.check().is_ok());
        let h = Arc::new(Health::default());
        drop(StoppedOnDrop(h.clone()));
        assert!(h.check().unwrap_err().contains("stopped"));
    }
}
