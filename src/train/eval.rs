//! Clean and robust accuracy of a classifier under [`pgd`] with cross-entropy.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use super::pgd::{cross_entropy, pgd_with_progress, PgdConfig};
use crate::attack::sample_seed;
use crate::data::Dataset;
use crate::model::{logits_no_grad, Classifier};
use crate::score::batched::for_each_batch;
use crate::util::{work_bar, NoProgress};

/// Accuracies measured on a dataset.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    pub samples: usize,
    pub clean: f64,
    /// Fraction classified correctly both clean and at the PGD point (`None` without an attack).
    pub robust: Option<f64>,
}

/// Clean accuracy, and robust accuracy when `attack` is given (a sample counts as robust when
/// it is classified correctly clean and after the attack). The attack's random start of sample
/// `i` derives from `(seed, i)`.
pub fn accuracy(
    model: &dyn Classifier,
    data: &Dataset,
    attack: Option<&PgdConfig>,
    batch_size: usize,
    seed: u64,
) -> Result<Accuracy> {
    ensure!(!data.is_empty(), "{}: no samples to evaluate", data.source);
    // PGD checks its other settings itself; the ε bound needs the data's shape.
    if let Some(cfg) = attack {
        super::check_attack_eps(cfg, data.input_shape())?;
    }
    let device = model.device();
    // One unit per sample for the clean pass and one per sample and PGD step.
    let units = 1 + attack.map_or(0, |c| c.steps);
    let pb = work_bar(if attack.is_some() { "pgd eval" } else { "eval" });
    pb.set_length((data.len() * units) as u64);
    let (mut clean_ok, mut robust_ok) = (0i64, 0i64);
    // The clean pass of a batch counts before its PGD steps, which count as they run.
    for_each_batch(data.len(), batch_size, &NoProgress, |r| {
        let (x, labels) = data.batch(r.start, r.end);
        let x = x.to_device(device);
        let y = Tensor::from_slice(labels).to_device(device);
        let clean = logits_no_grad(model, &x)?.argmax(-1, false).eq_tensor(&y);
        clean_ok += clean.sum(Kind::Int64).int64_value(&[]);
        pb.inc(r.len() as u64);
        if let Some(cfg) = attack {
            let seeds: Vec<u64> = r.clone().map(|i| sample_seed(seed, i)).collect();
            let adv = pgd_with_progress(model, &x, &seeds, cfg, cross_entropy(&y), &pb)?;
            let adv_ok = logits_no_grad(model, &adv)?.argmax(-1, false).eq_tensor(&y);
            robust_ok += adv_ok.logical_and(&clean).sum(Kind::Int64).int64_value(&[]);
        }
        let seen = r.end as f64;
        pb.set_message(match attack {
            Some(_) => format!(
                "clean {:.2}% robust {:.2}%",
                100.0 * clean_ok as f64 / seen,
                100.0 * robust_ok as f64 / seen
            ),
            None => format!("clean {:.2}%", 100.0 * clean_ok as f64 / seen),
        });
        Ok(())
    })?;
    pb.finish_and_clear();
    let n = data.len() as f64;
    Ok(Accuracy {
        samples: data.len(),
        clean: clean_ok as f64 / n,
        robust: attack.map(|_| robust_ok as f64 / n),
    })
}
