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

/// A progress bar over `len` samples showing rate and ETA; hidden when stderr is not a terminal
/// or `BRITTLE_NO_PROGRESS` is set.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = if std::env::var_os("BRITTLE_NO_PROGRESS").is_some() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
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
