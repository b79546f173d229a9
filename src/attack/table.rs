//! The `margins.csv` contract, read by `analyze`, `fit` and `merge`:
//! `index,label,pred,correct,logit_margin,input_margin,attack,success,forwards,backwards,seconds`
//! followed by the free-score columns of `scores.csv` (`prob_margin,max_prob,entropy,energy`,
//! `feature_margin` when known) and optionally a `pseudo_margin` column.
//!
//! A failed attack has `success = 0` and `input_margin = inf` (never 0).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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

/// Reads every row of a margins file, with errors naming the file and the line.
pub fn read_margins(path: &Path) -> Result<Vec<MarginRow>> {
    let mut rd = csv::Reader::from_path(path)
        .with_context(|| format!("opening margins file {}", path.display()))?;
    let headers = rd
        .headers()
        .with_context(|| format!("{}: reading the header", path.display()))?
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
                "{}: column {required:?} is missing (header: {})",
                path.display(),
                headers.iter().collect::<Vec<_>>().join(",")
            );
        }
    }
    let mut rows = Vec::new();
    for (i, rec) in rd.deserialize::<MarginRow>().enumerate() {
        let row = rec.with_context(|| format!("{}: data row {}", path.display(), i + 1))?;
        if row.success == 1 && !(row.input_margin.is_finite() && row.input_margin >= 0.0) {
            bail!(
                "{}: data row {}: success=1 but input_margin={}",
                path.display(),
                i + 1,
                row.input_margin
            );
        }
        if !row.logit_margin.is_finite() {
            bail!(
                "{}: data row {}: logit_margin={} is not finite",
                path.display(),
                i + 1,
                row.logit_margin
            );
        }
        rows.push(row);
    }
    Ok(rows)
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
