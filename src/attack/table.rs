//! The `margins.csv` contract, read by `analyze`, `fit` and `merge`:
//! `index,label,pred,correct,logit_margin,input_margin,attack,success,forwards,backwards,seconds`
//! followed by the free-score columns of `scores.csv` (`prob_margin,max_prob,entropy,energy`,
//! `feature_margin` when known) and optionally a `pseudo_margin` column.
//!
//! A failed attack has `success = 0` and `input_margin = inf` (never 0).

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::score::FreeScores;

/// The columns `brittle margins` writes, in order (without the optional `feature_margin`).
pub const MARGIN_COLUMNS: [&str; 15] = [
    "index",
    "label",
    "pred",
    "correct",
    "logit_margin",
    "input_margin",
    "attack",
    "success",
    "forwards",
    "backwards",
    "seconds",
    "prob_margin",
    "max_prob",
    "entropy",
    "energy",
];

/// One sample of a margins file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarginRow {
    pub index: usize,
    pub label: i64,
    pub pred: i64,
    /// 1 when `pred == label`.
    pub correct: u8,
    pub logit_margin: f64,
    /// Smallest verified adversarial distance found (`inf` when the attack failed).
    pub input_margin: f64,
    /// Attack that found `input_margin` (for `best`, the winning attack).
    pub attack: String,
    /// 1 when an adversarial example was found and verified.
    pub success: u8,
    pub forwards: u64,
    pub backwards: u64,
    pub seconds: f64,
    #[serde(default)]
    pub prob_margin: Option<f64>,
    #[serde(default)]
    pub max_prob: Option<f64>,
    #[serde(default)]
    pub entropy: Option<f64>,
    #[serde(default)]
    pub energy: Option<f64>,
    #[serde(default)]
    pub feature_margin: Option<f64>,
    #[serde(default)]
    pub pseudo_margin: Option<f64>,
}

impl MarginRow {
    /// A row from the free scores of the clean input and the verified attack result.
    pub fn from_scores(index: usize, label: i64, s: &FreeScores) -> Self {
        MarginRow {
            index,
            label,
            pred: s.pred,
            correct: u8::from(s.pred == label),
            logit_margin: s.logit_margin,
            input_margin: f64::INFINITY,
            attack: String::new(),
            success: 0,
            forwards: 0,
            backwards: 0,
            seconds: 0.0,
            prob_margin: Some(s.prob_margin),
            max_prob: Some(s.max_prob),
            entropy: Some(s.entropy),
            energy: Some(s.energy),
            feature_margin: s.feature_margin,
            pseudo_margin: None,
        }
    }

    /// The fields in [`header`] order.
    pub fn fields(&self, with_feature_margin: bool) -> Vec<String> {
        let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let mut v = vec![
            self.index.to_string(),
            self.label.to_string(),
            self.pred.to_string(),
            self.correct.to_string(),
            self.logit_margin.to_string(),
            self.input_margin.to_string(),
            self.attack.clone(),
            self.success.to_string(),
            self.forwards.to_string(),
            self.backwards.to_string(),
            format!("{:.6}", self.seconds),
            opt(self.prob_margin),
            opt(self.max_prob),
            opt(self.entropy),
            opt(self.energy),
        ];
        if with_feature_margin {
            v.push(opt(self.feature_margin));
        }
        v
    }
}

/// The header of a margins file with or without the feature margin.
pub fn header(with_feature_margin: bool) -> Vec<&'static str> {
    let mut h = MARGIN_COLUMNS.to_vec();
    if with_feature_margin {
        h.push("feature_margin");
    }
    h
}

/// Appends rows to a margins file, flushing after every call so a killed run loses nothing
/// that was reported written.
pub struct MarginWriter<W: Write> {
    w: csv::Writer<W>,
    with_feature_margin: bool,
}

impl<W: Write> MarginWriter<W> {
    /// A writer; `write_header` is false when appending to an existing file.
    pub fn new(out: W, with_feature_margin: bool, write_header: bool) -> Result<Self> {
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(out);
        if write_header {
            w.write_record(header(with_feature_margin))?;
            w.flush()?;
        }
        Ok(MarginWriter {
            w,
            with_feature_margin,
        })
    }

    pub fn write(&mut self, rows: &[MarginRow]) -> Result<()> {
        for r in rows {
            self.w.write_record(r.fields(self.with_feature_margin))?;
        }
        self.w.flush()?;
        Ok(())
    }
}

/// Writes a complete margins file atomically (temporary file, then rename).
pub fn write_margins(path: &Path, rows: &[MarginRow], with_fm: bool) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    MarginWriter::new(std::io::BufWriter::new(file), with_fm, true)?
        .write(rows)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Reads the rows of a margins file that a killed run may have left with a partial last line
/// (which is dropped); returns the rows and whether the file has a header at all.
pub fn read_partial_margins(path: &Path) -> Result<(Vec<MarginRow>, bool)> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .with_context(|| format!("reading {}", path.display()))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => return Ok((Vec::new(), false)),
    };
    let rows = parse_margins(complete.as_bytes(), &path.display().to_string())?;
    Ok((rows, true))
}

/// Reads every row of a margins file, with errors naming the file and the line.
pub fn read_margins(path: &Path) -> Result<Vec<MarginRow>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening margins file {}", path.display()))?;
    parse_margins(file, &path.display().to_string())
}

fn parse_margins<R: Read>(input: R, name: &str) -> Result<Vec<MarginRow>> {
    let mut rd = csv::Reader::from_reader(input);
    let headers = rd
        .headers()
        .with_context(|| format!("{name}: reading the header"))?
        .clone();
    for required in [
        "index",
        "label",
        "pred",
        "logit_margin",
        "input_margin",
        "success",
    ] {
        if !headers.iter().any(|h| h == required) {
            bail!(
                "{name}: column {required:?} is missing (header: {})",
                headers.iter().collect::<Vec<_>>().join(",")
            );
        }
    }
    let mut rows = Vec::new();
    for (i, rec) in rd.deserialize::<MarginRow>().enumerate() {
        let row = rec.with_context(|| format!("{name}: data row {}", i + 1))?;
        if row.success == 1 && !(row.input_margin.is_finite() && row.input_margin >= 0.0) {
            bail!(
                "{name}: data row {}: success=1 but input_margin={}",
                i + 1,
                row.input_margin
            );
        }
        if !row.logit_margin.is_finite() {
            bail!(
                "{name}: data row {}: logit_margin={} is not finite",
                i + 1,
                row.logit_margin
            );
        }
        rows.push(row);
    }
    check_unique_indices(&rows).with_context(|| name.to_string())?;
    Ok(rows)
}

/// Refuses rows that hold a sample index twice: every reader of margins (`analyze`, `fit`,
/// `merge`) counts each sample once, so a duplicated row would silently weigh double.
pub fn check_unique_indices(rows: &[MarginRow]) -> Result<()> {
    let mut first = std::collections::HashMap::new();
    for (k, r) in rows.iter().enumerate() {
        if let Some(j) = first.insert(r.index, k) {
            bail!(
                "sample index {} appears twice (data rows {} and {}); each sample must appear once",
                r.index,
                j + 1,
                k + 1
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_with_optional_columns_and_rejects_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.csv");
        std::fs::write(
            &p,
            "index,label,pred,correct,logit_margin,input_margin,attack,success,forwards,backwards,seconds,prob_margin\n\
             3,1,1,1,0.5,0.01,fmn,1,10,10,0.1,0.2\n4,2,0,0,1.5,inf,fmn,0,10,10,0.1,0.3\n",
        )
        .unwrap();
        let rows = read_margins(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].input_margin, f64::INFINITY);
        assert_eq!(rows[0].prob_margin, Some(0.2));
        assert_eq!(rows[0].feature_margin, None);
        std::fs::write(&p, "index,label,pred,correct,logit_margin,input_margin,attack,success,forwards,backwards,seconds\n3,1,1,1,0.5,inf,fmn,1,1,1,0.1\n").unwrap();
        assert!(read_margins(&p).unwrap_err().to_string().contains("row 1"));
        std::fs::write(&p, "index,label\n1,2\n").unwrap();
        assert!(format!("{:#}", read_margins(&p).unwrap_err()).contains("pred"));
    }
}
