//! The `scores.csv` contract: `index,label,pred,correct,logit_margin,prob_margin,max_prob,entropy,energy[,feature_margin]`.

use std::io::Write;

use anyhow::Result;

use super::FreeScores;

/// Column names written by `brittle score`, in order (without the optional `feature_margin`).
pub const SCORE_COLUMNS: [&str; 9] = [
    "index",
    "label",
    "pred",
    "correct",
    "logit_margin",
    "prob_margin",
    "max_prob",
    "entropy",
    "energy",
];

/// One sample's identity and scores.
#[derive(Debug, Clone)]
pub struct ScoreRow {
    pub index: usize,
    pub label: i64,
    pub scores: FreeScores,
}

impl ScoreRow {
    pub fn correct(&self) -> bool {
        self.label == self.scores.pred
    }

    /// The fields in [`SCORE_COLUMNS`] order, then the feature margin when present.
    pub fn fields(&self) -> Vec<String> {
        let s = &self.scores;
        let mut v = vec![
            self.index.to_string(),
            self.label.to_string(),
            s.pred.to_string(),
            u8::from(self.correct()).to_string(),
            s.logit_margin.to_string(),
            s.prob_margin.to_string(),
            s.max_prob.to_string(),
            s.entropy.to_string(),
            s.energy.to_string(),
        ];
        if let Some(fm) = s.feature_margin {
            v.push(fm.to_string());
        }
        v
    }
}

/// The header for rows with or without the feature margin.
pub fn header(with_feature_margin: bool) -> Vec<&'static str> {
    let mut h = SCORE_COLUMNS.to_vec();
    if with_feature_margin {
        h.push("feature_margin");
    }
    h
}

/// Writes a header and rows, plus optional extra columns per row (e.g. detector outputs).
pub fn write_csv<W: Write>(
    out: W,
    rows: &[ScoreRow],
    extra_header: &[&str],
    extra: impl Fn(usize) -> Vec<String>,
) -> Result<()> {
    let with_fm = rows
        .first()
        .is_some_and(|r| r.scores.feature_margin.is_some());
    let mut w = csv::Writer::from_writer(out);
    let mut h = header(with_fm);
    h.extend_from_slice(extra_header);
    w.write_record(&h)?;
    for (i, r) in rows.iter().enumerate() {
        let mut f = r.fields();
        f.extend(extra(i));
        w.write_record(&f)?;
    }
    w.flush()?;
    Ok(())
}
