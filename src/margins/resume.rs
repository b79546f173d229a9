//! Resuming a margins file: an existing `out` is continued only when it was made by the same
//! job (settings, attack plan and images), so a resumed file is byte-identical (bar `seconds`)
//! to an uninterrupted run; a file of an older brittle is refused or, when asked, started
//! again.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::row::{read_partial_margins, MarginRow};
use super::sidecar::{read_sidecar, Settings};
use crate::provenance::sidecar_path;

/// What an earlier run of the same job left in the margins file.
#[derive(Debug, Default)]
pub struct Resume {
    /// The complete rows already written, by dataset index.
    pub done: BTreeMap<usize, MarginRow>,
    /// Whether the file has its header (a killed run may have left it empty).
    pub has_header: bool,
    /// Why the file was started again instead (it was made by another version of the attack
    /// or of brittle, and `restart_stale` allowed starting it again).
    pub restarted: Option<String>,
}

/// The job a margins file must have been made by to be resumed.
pub struct Job<'a> {
    pub settings: &'a Settings,
    /// [`crate::attack::plan::Plan::describe`] of the attack.
    pub plan: &'a str,
    /// The data file, for messages.
    pub source: &'a str,
    /// [`super::data_sha256`] of the window.
    pub data_sha256: &'a str,
}

/// Reads what `out` holds of `job`; a missing `out` holds nothing. A file of other settings or
/// images is refused; one of another attack version (or without an image fingerprint) is
/// refused too, unless `restart_stale`, which deletes it.
pub fn resume(out: &Path, job: &Job, restart_stale: bool) -> Result<Resume> {
    if !out.exists() {
        return Ok(Resume::default());
    }
    let side =
        read_sidecar(out).with_context(|| format!("{} exists: cannot resume it", out.display()))?;
    if side.settings != *job.settings {
        bail!(
            "{} was made with other settings ({}); write elsewhere or delete it\nthere: {:?}\nnow:   {:?}",
            out.display(),
            sidecar_path(out).display(),
            side.settings,
            job.settings
        );
    }
    if !side.data_sha256.is_empty() && side.data_sha256 != job.data_sha256 {
        bail!(
            "{} was made from other images than {} holds now (content sha256 {} there, {} now): \
             the data changed since, and resuming would mix rows of both; write elsewhere or delete it",
            out.display(),
            job.source,
            side.data_sha256,
            job.data_sha256
        );
    }
    let stale = if side.plan != job.plan {
        Some(format!(
            "{} was made by another version of the attack ({}); write elsewhere or delete it\nthere: {}\nnow:   {}",
            out.display(),
            sidecar_path(out).display(),
            if side.plan.is_empty() { "(not recorded)" } else { &side.plan },
            job.plan
        ))
    } else if side.data_sha256.is_empty() {
        Some(format!(
            "{} was made by an older brittle that did not record a fingerprint of its images \
             ({}), so resuming it could mix rows of other images; start it again or delete it",
            out.display(),
            sidecar_path(out).display()
        ))
    } else {
        None
    };
    match stale {
        None => {
            let (rows, has_header) = read_partial_margins(out)?;
            Ok(Resume {
                done: rows.into_iter().map(|r| (r.index, r)).collect(),
                has_header,
                restarted: None,
            })
        }
        Some(why) if restart_stale => {
            std::fs::remove_file(out).with_context(|| format!("removing {}", out.display()))?;
            Ok(Resume {
                restarted: Some(why),
                ..Resume::default()
            })
        }
        Some(why) => bail!(why),
    }
}
