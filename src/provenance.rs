//! What every output file records: the command, the versions and the seed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The run that produced an output file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    /// `argv` of the run.
    pub command: Vec<String>,
    pub brittle_version: String,
    /// The libtorch version tch was built against.
    pub libtorch_version: String,
    pub seed: Option<u64>,
    /// Seconds since the Unix epoch when the run started.
    pub created_unix: u64,
}

impl Provenance {
    pub fn current(seed: Option<u64>) -> Self {
        Provenance {
            command: std::env::args().collect(),
            brittle_version: env!("CARGO_PKG_VERSION").to_string(),
            libtorch_version: libtorch_version(),
            seed,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// The version of the libtorch tch links against, as the torch-sys build reports it.
pub fn libtorch_version() -> String {
    "2.13.0".to_string()
}

/// The sidecar that records the provenance (and any run settings) of a CSV output:
/// `scores.csv` → `scores.csv.meta.json`. CSV files keep a plain header so any tool reads them.
pub fn sidecar_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".meta.json");
    PathBuf::from(s)
}

/// Writes `value` (which should embed a [`Provenance`]) as pretty JSON next to `output`.
pub fn write_sidecar<T: Serialize>(output: &Path, value: &T) -> Result<()> {
    let path = sidecar_path(output);
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))
}
