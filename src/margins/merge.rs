//! `brittle merge`: joins the complete shard files of one margins job into one file, checking
//! that their settings, attack plans and images agree and that every sample of the window
//! appears exactly once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::row::{read_margins, write_margins, MarginRow, Optional};
use super::sidecar::{read_sidecar, Settings, Sidecar};
use crate::provenance::{write_sidecar, Provenance};

/// Merges complete shard files of one job into `out`, checking that their settings agree and
/// that every sample of the window appears exactly once.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<usize> {
    anyhow::ensure!(!inputs.is_empty(), "merge: no input files");
    let mut settings: Option<(Settings, Option<String>, &Path)> = None;
    let mut first: Option<Sidecar> = None;
    let mut rows: BTreeMap<usize, (MarginRow, &Path)> = BTreeMap::new();
    for p in inputs {
        let side = read_sidecar(p)?;
        if !side.complete {
            bail!(
                "{} is not complete (its run was interrupted): resume it first",
                p.display()
            );
        }
        let mut s = side.settings.clone();
        s.options.shard = None;
        match &settings {
            None => settings = Some((s, side.plan.clone(), p)),
            Some((s0, plan0, p0)) if *s0 != s || *plan0 != side.plan => {
                bail!(
                    "{} and {} were made with different settings or attack versions:\n{:?}\n{}\n{:?}\n{}",
                    p0.display(),
                    p.display(),
                    s0,
                    plan0.as_deref().unwrap_or_default(),
                    s,
                    side.plan.as_deref().unwrap_or_default()
                )
            }
            _ => {}
        }
        if let Some(f) = first.as_ref().filter(|f| f.data_sha256 != side.data_sha256) {
            bail!(
                "{} and {} were made from different images at {} (content sha256 {} and {})",
                inputs[0].display(),
                p.display(),
                side.settings.data,
                f.fingerprint(),
                side.fingerprint()
            );
        }
        for r in read_margins(p)? {
            if let Some((_, other)) = rows.get(&r.index) {
                bail!(
                    "sample {} appears in both {} and {}",
                    r.index,
                    other.display(),
                    p.display()
                );
            }
            rows.insert(r.index, (r, p));
        }
        first.get_or_insert(side);
    }
    let (settings, plan, _) = settings.context("merge: no settings")?;
    let (start, end) = settings.window;
    let missing: Vec<usize> = (start..end).filter(|i| !rows.contains_key(i)).collect();
    if !missing.is_empty() {
        bail!(
            "merge: {} of the {} samples of {} are missing (first: {:?}); a shard is absent",
            missing.len(),
            end - start,
            settings.data,
            &missing[..missing.len().min(10)]
        );
    }
    if let Some(extra) = rows.keys().find(|&&i| i < start || i >= end) {
        bail!("merge: sample {extra} lies outside the window {start}..{end}");
    }
    let rows: Vec<MarginRow> = rows.into_values().map(|(r, _)| r).collect();
    write_margins(out, &rows, Optional::of(&rows))?;
    let side = first.context("merge: no sidecar")?;
    write_sidecar(
        out,
        &Sidecar {
            provenance: Provenance::current(Some(settings.options.seed)),
            settings,
            model: side.model,
            plan,
            complete: true,
            merged_from: Some(inputs.iter().map(|p| p.display().to_string()).collect()),
            data_sha256: side.data_sha256,
        },
    )?;
    Ok(rows.len())
}
