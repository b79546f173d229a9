//! Resuming a job's file (margins or bounds): an existing `out` is continued only when it was
//! made by the same job (settings, attack plan and images), so a resumed file is
//! byte-identical (bar `seconds`) to an uninterrupted run; a file of an older brittle is
//! refused or, when asked, started again.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::row::{read_partial_margins, MarginRow};
use super::sidecar::{JobOptions, Sidecar};
use crate::provenance::sidecar_path;

/// A row of a job's file, as a resumed run reads it back.
pub trait JobRow: Sized {
    /// The dataset index of the row's sample: a resumed run skips the samples it has.
    fn index(&self) -> usize;
    /// The complete rows of a file a killed run may have left, and whether it has its header.
    fn read_partial(path: &Path) -> Result<(Vec<Self>, bool)>;
}

impl JobRow for MarginRow {
    fn index(&self) -> usize {
        self.index
    }
    fn read_partial(path: &Path) -> Result<(Vec<Self>, bool)> {
        read_partial_margins(path)
    }
}

/// The rows `parse` (given the text and the file's name) reads from the complete lines of
/// `path`, without the partial last line a killed run may have left, and whether the file has
/// its header (a run killed at once leaves none).
pub fn read_complete_lines<R>(
    path: &Path,
    parse: impl FnOnce(&[u8], &str) -> Result<Vec<R>>,
) -> Result<(Vec<R>, bool)> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .with_context(|| format!("reading {}", path.display()))?;
    match text.rfind('\n') {
        Some(i) => Ok((
            parse(&text.as_bytes()[..=i], &path.display().to_string())?,
            true,
        )),
        None => Ok((Vec::new(), false)),
    }
}

/// What an earlier run of the same job left in its file.
#[derive(Debug)]
pub struct Resume<R = MarginRow> {
    /// The complete rows already written, by dataset index.
    pub done: BTreeMap<usize, R>,
    /// Whether the file has its header (a killed run may have left it empty).
    pub has_header: bool,
    /// Why the file was started again instead (it was made by another version of the attack
    /// or of brittle, and `restart_stale` allowed starting it again).
    pub restarted: Option<String>,
}

impl<R> Resume<R> {
    fn nothing(restarted: Option<String>) -> Self {
        Resume {
            done: BTreeMap::new(),
            has_header: false,
            restarted,
        }
    }
}

/// Reads what `out` holds of the job `job` (the sidecar the job is about to write); a missing
/// `out` holds nothing. A file of other settings or images is refused; one of another attack
/// version (or without an image fingerprint) is refused too, unless `restart_stale`, which
/// deletes it.
pub fn resume<O: JobOptions, R: JobRow>(
    out: &Path,
    job: &Sidecar<O>,
    restart_stale: bool,
) -> Result<Resume<R>> {
    if !out.exists() {
        return Ok(Resume::nothing(None));
    }
    let side = Sidecar::<O>::read(out)
        .with_context(|| format!("{} exists: cannot resume it", out.display()))?;
    if side.settings != job.settings {
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
            job.settings.data,
            side.data_sha256,
            job.data_sha256
        );
    }
    let stale = if side.plan != job.plan {
        Some(format!(
            "{} was made by another version of the attack ({}); write elsewhere or delete it\nthere: {}\nnow:   {}",
            out.display(),
            sidecar_path(out).display(),
            side.plan.as_deref().filter(|p| !p.is_empty()).unwrap_or("(not recorded)"),
            job.plan.as_deref().unwrap_or_default()
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
            let (rows, has_header) = R::read_partial(out)?;
            Ok(Resume {
                done: rows.into_iter().map(|r| (r.index(), r)).collect(),
                has_header,
                restarted: None,
            })
        }
        Some(why) if restart_stale => {
            std::fs::remove_file(out).with_context(|| format!("removing {}", out.display()))?;
            Ok(Resume::nothing(Some(why)))
        }
        Some(why) => bail!(why),
    }
}
