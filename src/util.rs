//! Small helpers shared by several stages: hashing, progress bars, tensor conversion.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of several byte strings, each length-prefixed so that boundaries matter.
pub fn sha256_hex<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// Where long-running library work reports how far it has got. The work is counted in units
/// of roughly equal cost (an attack step of one sample, a sample of a forward pass) so that the
/// rate, and with it the ETA, holds from the first unit on. The CLI's implementation is
/// indicatif's bar; tests record the calls.
pub trait Progress {
    /// The total number of units (set once the work is planned).
    fn set_length(&self, units: u64);
    /// `units` more are done.
    fn inc(&self, units: u64);
    /// A short status shown beside the bar (e.g. samples finished).
    fn set_message(&self, _msg: String) {}
}

/// Reports to nobody.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_length(&self, _: u64) {}
    fn inc(&self, _: u64) {}
}

impl Progress for ProgressBar {
    fn set_length(&self, units: u64) {
        ProgressBar::set_length(self, units);
    }
    fn inc(&self, units: u64) {
        ProgressBar::inc(self, units);
    }
    fn set_message(&self, msg: String) {
        ProgressBar::set_message(self, msg);
    }
}

/// A progress bar over `len` samples showing rate and ETA; hidden when stderr is not a terminal
/// or `BRITTLE_NO_PROGRESS` is set.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    styled_bar(
        Some(len),
        what,
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}",
    )
}

/// A bar over units of work that are not samples (attack steps): shows the percentage and ETA,
/// and the message (samples finished) instead of the raw count.
pub fn work_bar(what: &str) -> ProgressBar {
    styled_bar(
        None,
        what,
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {percent:>3}% ETA {eta} {msg}",
    )
}

/// `len: None`: set later ([`Progress::set_length`]); until then the bar shows 0%, not 100%.
fn styled_bar(len: Option<u64>, what: &str, template: &str) -> ProgressBar {
    let pb = if std::env::var_os("BRITTLE_NO_PROGRESS").is_some() {
        ProgressBar::hidden()
    } else {
        len.map_or_else(ProgressBar::no_length, ProgressBar::new)
    };
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// A float tensor's values, flattened, as `Vec<f64>`. A contiguous float32 CPU tensor (logits,
/// as a rule) is copied out in one call; the general path's conversions cost ~10 µs, a twentieth
/// of a small model's one-image forward pass when serving.
pub fn to_vec_f64(t: &tch::Tensor) -> Result<Vec<f64>> {
    if t.device() == tch::Device::Cpu && t.kind() == tch::Kind::Float && t.is_contiguous() {
        let n = t.numel();
        let mut v = vec![0f32; n];
        t.f_copy_data(&mut v, n)?;
        return Ok(v.into_iter().map(f64::from).collect());
    }
    Ok(Vec::<f64>::try_from(
        t.to_kind(tch::Kind::Double)
            .to_device(tch::Device::Cpu)
            .flatten(0, -1),
    )?)
}

/// A 1-D integer tensor as `Vec<i64>`.
pub fn to_vec_i64(t: &tch::Tensor) -> Result<Vec<i64>> {
    Ok(Vec::<i64>::try_from(
        t.to_kind(tch::Kind::Int64)
            .to_device(tch::Device::Cpu)
            .flatten(0, -1),
    )?)
}

/// Runs `f` with libtorch's global RNG seeded with `seed`, holding a process-wide lock.
///
/// libtorch has one RNG per process, and tch exposes no generator objects: two threads that
/// seed it and then draw (two fits in one test binary, a fit beside a server) interleave their
/// draws. Every draw from it in this crate goes through here, so a seeded result depends on the
/// seed alone; per-sample noise uses ChaCha streams instead ([`crate::attack::uniform_noise`]).
pub fn with_torch_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    f()
}

/// The readable part of an error whose text carries libtorch's diagnostics: the C++ backtrace
/// (`Exception raised from ...` and its `frame #N` lines) is dropped, and a TorchScript
/// interpreter traceback is reduced to its final `...Error: ...` line. Returns the text and
/// whether anything was dropped (so that the caller can say how to see it all).
pub fn condense_torch_error(text: &str) -> (String, bool) {
    let mut out: Vec<&str> = Vec::new();
    let mut dropped = false;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("Exception raised from ") || line.starts_with("frame #") {
            // The C++ backtrace: skip to the next line that is not a frame.
            dropped = true;
            while lines.peek().is_some_and(|l| l.starts_with("frame #")) {
                lines.next();
            }
        } else if line.starts_with("Traceback of TorchScript") {
            // Up to the exception line that ends the traceback (`RuntimeError: ...`); the
            // message itself may continue on the lines after it.
            let rest: Vec<&str> = lines.by_ref().collect();
            let last_error = rest.iter().rposition(|l| is_exception_line(l));
            let tail = last_error.map_or(&[][..], |i| &rest[i..]);
            let again = condense_torch_error(&tail.join("\n")).0;
            return (join_condensed(&out, &again), true);
        } else {
            out.push(line);
        }
    }
    (out.join("\n").trim_end().to_string(), dropped)
}

/// `RuntimeError: ...`, `c10::Error: ...`: the line a Python or C++ traceback ends with.
fn is_exception_line(line: &str) -> bool {
    line.split_once(": ").is_some_and(|(head, _)| {
        !head.is_empty()
            && !head.starts_with(char::is_whitespace)
            && (head.ends_with("Error") || head.ends_with("Exception"))
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.')
    })
}

fn join_condensed(head: &[&str], tail: &str) -> String {
    let head = head.join("\n");
    let head = head.trim_end();
    match (head.is_empty(), tail.is_empty()) {
        (_, true) => head.to_string(),
        (true, false) => tail.to_string(),
        (false, false) => format!("{head} {tail}"),
    }
}

/// An error about one option of a library call, naming the option by its field in the options
/// struct (`batch_size`), so that a front end names it its own way: the CLI adds its flag
/// (`--batch-size`, see `cli::hints`), a Python binding would add its keyword.
#[derive(Debug)]
pub struct OptionError {
    /// The field of the options struct (or the argument) the error is about.
    pub field: &'static str,
    pub message: String,
}

impl OptionError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        OptionError {
            field,
            message: message.into(),
        }
    }

    /// An error of a check on the value of `field`, as an [`OptionError`] about it.
    pub fn about(field: &'static str, err: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(OptionError::new(field, format!("{err:#}")))
    }
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OptionError {}

/// Options checked once before any work, in the manner of linfa's `ParamGuard`: the library's
/// work takes a [`Checked`] value, which only [`Check::check`] makes, so it never meets an
/// option out of range halfway through (nor checks it a second time).
pub trait Check: Sized {
    /// Every field in range; an error is an [`OptionError`] naming the field.
    fn validate(&self) -> Result<()>;

    /// The options, checked.
    fn check(self) -> Result<Checked<Self>> {
        self.validate()?;
        Ok(Checked(self))
    }
}

/// Options that passed [`Check::check`]. Read-only: changing a field would need a new check.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Checked<T>(T);

impl<T> Checked<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condensed_torch_errors_keep_the_message_and_drop_the_backtrace() {
        let cpp = "loading x.pt: Internal torch error: PytorchStreamReader failed reading zip archive: failed finding central directory.\n\
                   Exception raised from valid at inline_container.cc:242 (most recent call first):\n\
                   frame #0: c10::Error::Error() + 0x9d (0x7f in libc10.so)\n\
                   frame #1: <unknown function> + 0x3c0151 (0x55 in brittle)\n";
        let (short, dropped) = condense_torch_error(cpp);
        assert!(dropped);
        assert_eq!(
            short,
            "loading x.pt: Internal torch error: PytorchStreamReader failed reading zip archive: failed finding central directory."
        );
        let script = "probing: Internal torch error: The following operation failed in the TorchScript interpreter.\n\
                      Traceback of TorchScript, serialized code (most recent call last):\n  \
                      File \"code/__torch__.py\", line 14, in forward\n    \
                      input = torch.relu((c1).forward(x, ))\n\
                      Traceback of TorchScript, original code (most recent call last):\n\
                      /torch/nn/modules/conv.py(560): _conv_forward\n\
                      RuntimeError: expected input[2, 1, 28, 28] to have 3 channels, but got 1 channels instead\n";
        let (short, dropped) = condense_torch_error(script);
        assert!(dropped);
        assert_eq!(
            short,
            "probing: Internal torch error: The following operation failed in the TorchScript interpreter. \
             RuntimeError: expected input[2, 1, 28, 28] to have 3 channels, but got 1 channels instead"
        );
        let plain = "x.csv was made with other settings\nthere: a\nnow:   b";
        assert_eq!(condense_torch_error(plain), (plain.to_string(), false));
    }
}
