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

use super::resume::read_complete_lines;
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

/// One sample of a margins file. Serde reads it by column name (optional columns may be
/// absent) and writes it in [`MARGIN_COLUMNS`] order, floats as Rust's shortest round-trip text
/// (`inf` for a failed attack) and `seconds` to the microsecond.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarginRow {
    pub index: usize,
    pub label: i64,
    pub pred: i64,
    /// 1 when `pred == label`.
    pub correct: u8,
    #[serde(serialize_with = "text::float")]
    pub logit_margin: f64,
    /// Smallest verified adversarial distance found (`inf` when the attack failed).
    #[serde(serialize_with = "text::float")]
    pub input_margin: f64,
    /// Attack that found `input_margin` (for `best`, the winning attack).
    pub attack: String,
    /// 1 when an adversarial example was found and verified.
    pub success: u8,
    pub forwards: u64,
    pub backwards: u64,
    #[serde(serialize_with = "text::micros")]
    pub seconds: f64,
    #[serde(default, serialize_with = "text::opt_float")]
    pub prob_margin: Option<f64>,
    #[serde(default, serialize_with = "text::opt_float")]
    pub max_prob: Option<f64>,
    #[serde(default, serialize_with = "text::opt_float")]
    pub entropy: Option<f64>,
    #[serde(default, serialize_with = "text::opt_float")]
    pub energy: Option<f64>,
    /// Written only by models with a last linear layer: a file has the column for every row or
    /// for none ([`MarginWriter::write`] checks it).
    #[serde(
        default,
        serialize_with = "text::opt_float",
        skip_serializing_if = "Option::is_none"
    )]
    pub feature_margin: Option<f64>,
    /// Written only by `brittle margins` with certification: a lower bound on `input_margin`
    /// ([`crate::certify`]); a file has the column for every row or for none.
    #[serde(
        default,
        serialize_with = "text::opt_float",
        skip_serializing_if = "Option::is_none"
    )]
    pub certified_radius: Option<f64>,
    /// Read when a hand-made file has it; `brittle margins` never writes it.
    #[serde(default, skip_serializing)]
    pub pseudo_margin: Option<f64>,
}

/// How the margins file writes numbers (the bytes every earlier brittle wrote).
mod text {
    use serde::Serializer;

    /// `f64`'s `Display`: shortest round-trip text, `inf`, `NaN`.
    pub fn float<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// An absent optional score is an empty field.
    pub fn opt_float<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Timing to the microsecond.
    pub fn micros<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:.6}"))
    }
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
            certified_radius: None,
            pseudo_margin: None,
        }
    }
}

/// The optional columns a margins file has (for every row or for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Optional {
    pub feature_margin: bool,
    pub certified_radius: bool,
}

impl Optional {
    /// The columns of `rows` (those the first row has).
    pub fn of(rows: &[MarginRow]) -> Self {
        rows.first().map_or_else(Optional::default, |r| Optional {
            feature_margin: r.feature_margin.is_some(),
            certified_radius: r.certified_radius.is_some(),
        })
    }
}

/// The header of a margins file with its optional columns.
pub fn header(optional: Optional) -> Vec<&'static str> {
    let mut h = MARGIN_COLUMNS.to_vec();
    if optional.feature_margin {
        h.push("feature_margin");
    }
    if optional.certified_radius {
        h.push("certified_radius");
    }
    h
}

/// Appends rows to a margins file, flushing after every call so a killed run loses nothing
/// that was reported written.
pub struct MarginWriter<W: Write> {
    w: csv::Writer<W>,
    optional: Optional,
}

impl<W: Write> MarginWriter<W> {
    /// A writer; `write_header` is false when appending to an existing file. The header is
    /// written here (not by serde on the first row) so that a file without rows has one too.
    pub fn new(out: W, optional: Optional, write_header: bool) -> Result<Self> {
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(out);
        if write_header {
            w.write_record(header(optional))?;
            w.flush()?;
        }
        Ok(MarginWriter { w, optional })
    }

    pub fn write(&mut self, rows: &[MarginRow]) -> Result<()> {
        for r in rows {
            for (name, set, has) in [
                (
                    "feature_margin",
                    r.feature_margin.is_some(),
                    self.optional.feature_margin,
                ),
                (
                    "certified_radius",
                    r.certified_radius.is_some(),
                    self.optional.certified_radius,
                ),
            ] {
                if set != has {
                    bail!(
                        "sample {}: {name} is {}, but the file {} that column",
                        r.index,
                        if set { "set" } else { "absent" },
                        if has { "has" } else { "lacks" },
                    );
                }
            }
            self.w.serialize(r)?;
        }
        self.w.flush()?;
        Ok(())
    }
}

/// Writes a complete margins file atomically (temporary file, then rename).
pub fn write_margins(path: &Path, rows: &[MarginRow], optional: Optional) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    MarginWriter::new(std::io::BufWriter::new(file), optional, true)?
        .write(rows)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Reads the rows of a margins file that a killed run may have left with a partial last line
/// (which is dropped); returns the rows and whether the file has a header at all.
pub fn read_partial_margins(path: &Path) -> Result<(Vec<MarginRow>, bool)> {
    read_complete_lines(path, |text, name| parse_margins(text, name))
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

    fn fm(feature_margin: bool) -> Optional {
        Optional {
            feature_margin,
            certified_radius: false,
        }
    }

    fn row(feature_margin: Option<f64>) -> MarginRow {
        MarginRow {
            index: 7,
            label: 3,
            pred: 3,
            correct: 1,
            logit_margin: 1.0,
            input_margin: 1e-7,
            attack: "fmn".into(),
            success: 1,
            forwards: 12,
            backwards: 11,
            seconds: 0.123_456_7,
            prob_margin: Some(0.25),
            max_prob: None,
            entropy: Some(f64::NAN),
            energy: Some(-12.5),
            feature_margin,
            certified_radius: None,
            pseudo_margin: Some(9.0),
        }
    }

    fn written(rows: &[MarginRow], with_fm: bool) -> String {
        let mut out = Vec::new();
        MarginWriter::new(&mut out, fm(with_fm), true)
            .unwrap()
            .write(rows)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The bytes every earlier brittle wrote: `Display` floats, `seconds` to 6 decimals, empty
    /// absent scores, `feature_margin` last and only when the model has one, no `pseudo_margin`.
    #[test]
    fn writes_the_exact_text_of_the_margins_contract() {
        let head = MARGIN_COLUMNS.join(",");
        assert_eq!(
            written(&[row(None)], false),
            format!("{head}\n7,3,3,1,1,0.0000001,fmn,1,12,11,0.123457,0.25,,NaN,-12.5\n")
        );
        let mut failed = row(Some(0.5));
        failed.input_margin = f64::INFINITY;
        failed.success = 0;
        assert_eq!(
            written(&[failed], true),
            format!(
                "{head},feature_margin\n7,3,3,1,1,inf,fmn,0,12,11,0.123457,0.25,,NaN,-12.5,0.5\n"
            )
        );
    }

    /// serde's own header (from the field names) is the one the writer writes by hand.
    #[test]
    fn field_names_are_the_header() {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.serialize(row(Some(0.5))).unwrap();
        let text = String::from_utf8(w.into_inner().unwrap()).unwrap();
        assert_eq!(text.lines().next().unwrap(), header(fm(true)).join(","));
    }

    #[test]
    fn a_row_must_match_the_files_feature_margin_column() {
        let mut w = MarginWriter::new(Vec::new(), fm(true), true).unwrap();
        let e = w.write(&[row(None)]).unwrap_err().to_string();
        assert!(e.contains("sample 7: feature_margin is absent"), "{e}");
        let mut w = MarginWriter::new(Vec::new(), fm(false), true).unwrap();
        assert!(w.write(&[row(Some(1.0))]).is_err());
    }

    #[test]
    fn written_rows_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.csv");
        let mut a = row(Some(0.5));
        a.entropy = Some(0.75);
        let mut b = a.clone();
        b.index = 8;
        b.input_margin = f64::INFINITY;
        b.success = 0;
        write_margins(&p, &[a.clone(), b.clone()], fm(true)).unwrap();
        let back = read_margins(&p).unwrap();
        // `seconds` is rounded to the microsecond and `pseudo_margin` is not written.
        for (r, mut w) in back.into_iter().zip([a, b]) {
            w.seconds = 0.123457;
            w.pseudo_margin = None;
            assert_eq!(r, w);
        }
    }

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
