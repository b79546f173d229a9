//! brittle's free scores against numpy / scipy values (tests/fixtures/scores/cases.json, written
//! by scripts/fixtures/scores.py): logit and probability margins, max probability, entropy,
//! energy, the prediction (first of tied maxima), and the exact feature margin of a linear last
//! layer for both dual norms. Cases include ties and logits that overflow a naive softmax.

use brittle::norm::Norm;
use brittle::score::{feature_margin, free_scores};
use serde_json::Value;
use tch::Tensor;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = v.as_array().unwrap().iter().map(floats).collect();
    let (n, k) = (rows.len() as i64, rows[0].len() as i64);
    Tensor::from_slice(&rows.concat()).view([n, k])
}

fn close(what: &str, case: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{case} {what}: brittle {got} vs reference {want}"
    );
}

#[test]
fn free_scores_agree_with_numpy_and_scipy() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/scores/cases.json"
    ))
    .unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let mut feature_cases = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let logits = matrix(&case["logits"]);
        let got = free_scores(&logits).unwrap();
        let preds: Vec<i64> = case["pred"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap())
            .collect();
        assert_eq!(got.len(), preds.len(), "{name}");
        for (i, s) in got.iter().enumerate() {
            let case_i = format!("{name}[{i}]");
            assert_eq!(s.pred, preds[i], "{case_i} pred");
            let want = |key: &str| floats(&case[key])[i];
            close(
                "logit_margin",
                &case_i,
                s.logit_margin,
                want("logit_margin"),
                1e-12,
            );
            close(
                "prob_margin",
                &case_i,
                s.prob_margin,
                want("prob_margin"),
                1e-12,
            );
            close("max_prob", &case_i, s.max_prob, want("max_prob"), 1e-12);
            close("entropy", &case_i, s.entropy, want("entropy"), 1e-12);
            close("energy", &case_i, s.energy, want("energy"), 1e-12);
            assert!(s.entropy.is_finite() && s.energy.is_finite(), "{case_i}");
        }
        if !case["weight"].is_null() {
            feature_cases += 1;
            let w = matrix(&case["weight"]).to_kind(tch::Kind::Float);
            for (norm, key) in [
                (Norm::Linf, "feature_margin_linf"),
                (Norm::L2, "feature_margin_l2"),
            ] {
                let got = feature_margin(&logits, &w, norm).unwrap();
                for (i, (g, r)) in got.iter().zip(floats(&case[key])).enumerate() {
                    close(key, &format!("{name}[{i}]"), *g, r, 1e-9);
                }
            }
        }
    }
    assert!(
        feature_cases >= 2,
        "the fixture must exercise the feature margin"
    );
}
