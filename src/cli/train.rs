//! `brittle train`: standard or adversarial training (`--mode`: the paper's reference losses,
//! [`crate::train::loss`]) of a native model, with resumable checkpoints; `brittle eval-pgd`:
//! clean and PGD accuracy of any model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::args::{DataArgs, ModelArgs};
use super::hints::{self, FlagHint};
use super::progress::{with_bar, work_bar};
use super::values::enum_parser;
use crate::data::{DataSpec, Dataset};
use crate::model::native::small_cnn;
use crate::model::{Classifier, DeviceChoice};
use crate::norm::{parse_eps, Norm};
use crate::provenance::{write_sidecar, Provenance};
use crate::train::eval::{accuracy_with_progress, Accuracy};
use crate::train::pgd::PgdConfig;
use crate::train::{checkpoint, LrSchedule, Mode, TrainConfig, Trainer};
use crate::util::sha256_file;
use crate::util::Check;

/// The PGD attack options shared by `train` and `eval-pgd`.
#[derive(Debug, Clone, Args)]
pub struct AttackArgs {
    /// Perturbation norm: linf or l2.
    #[arg(long, default_value = "linf")]
    pub norm: Norm,
    /// Radius, e.g. `0.3` or `8/255`.
    #[arg(long, default_value = "0.3", value_parser = parse_eps)]
    pub eps: f64,
    /// PGD iterations.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// PGD step size (Linf: per-pixel; L2: step length), e.g. `0.01` or `2/255`.
    #[arg(long, default_value = "0.01", value_parser = parse_eps)]
    pub step_size: f64,
}

impl AttackArgs {
    fn config(&self) -> PgdConfig {
        PgdConfig {
            norm: self.norm,
            eps: self.eps,
            steps: self.steps,
            step_size: self.step_size,
            random_start: true,
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Held-out images evaluated after every epoch (clean) and at the end (clean and PGD).
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Labels of `--test-data` (default: found beside it).
    #[arg(long)]
    pub test_labels: Option<PathBuf>,
    /// Evaluate only the first N test samples.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Native architecture (any registered one; `small-cnn` trains fastest).
    #[arg(long, default_value = small_cnn::ARCH)]
    pub arch: String,
    /// Base width of the architecture (the same as an `@N` suffix of `--arch`).
    #[arg(long)]
    pub width: Option<i64>,
    #[arg(long, value_parser = enum_parser::<Mode>(), default_value = "pgd")]
    pub mode: Mode,
    #[command(flatten)]
    pub attack: AttackArgs,
    /// PGD iterations of the final test evaluation (default: `--steps`).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// ε and step size grow linearly from 0 over this many (fractional) epochs.
    #[arg(long, default_value_t = 0.0)]
    pub eps_warmup_epochs: f64,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, value_parser = enum_parser::<LrSchedule>(), default_value = "constant")]
    pub lr_schedule: LrSchedule,
    /// Weight β of the robust term of trades, pm-trades, mart, alp, clp and htrades (the
    /// reference code's params.yaml uses 4 for all of them).
    #[arg(long, visible_alias = "trades-beta", default_value_t = 6.0)]
    pub beta: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Trained weights (`.safetensors`); a `.meta.json` sidecar records provenance and accuracies.
    #[arg(long, default_value = "model.safetensors")]
    pub out: PathBuf,
    /// Start from these `small-cnn` weights instead of a random initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Save a checkpoint here after every epoch and resume from it when rerun.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Also write a traced TorchScript module (`forward(x) -> logits`, inputs in [0, 1]).
    #[arg(long)]
    pub export_torchscript: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// libtorch intra-op threads (0: the CPUs this process may use, by affinity and cgroup quota).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// A short fingerprint of a dataset: where it came from, how many samples, and the labels.
fn data_fingerprint(d: &Dataset) -> String {
    let labels: Vec<u8> = d.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    let idx: Vec<u8> = d
        .indices
        .iter()
        .flat_map(|i| (*i as u64).to_le_bytes())
        .collect();
    let h = crate::util::sha256_hex([d.source.as_bytes(), &labels, &idx]);
    format!("{} n={} sha256={}", d.source, d.len(), &h[..16])
}

pub fn run(a: TrainArgs) -> Result<()> {
    let arch = match a.width {
        Some(_) if a.arch.contains('@') => {
            bail!(
                "--width and an '@N' suffix of --arch {} both set the width",
                a.arch
            )
        }
        Some(w) => format!("{}@{w}", a.arch),
        None => a.arch.clone(),
    };
    if a.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "--out {}: weights are written as .safetensors",
            a.out.display()
        );
    }
    crate::model::device::set_threads(a.threads);
    let device = a.device.resolve()?;
    let data = a.data.load()?;
    let test = a
        .test_data
        .as_ref()
        .map(|p| {
            DataSpec {
                path: p.clone(),
                format: None,
                labels: a.test_labels.clone(),
                offset: 0,
                limit: a.test_limit,
            }
            .load()
            .flag_hint(hints::TEST_DATA)
        })
        .transpose()?;
    let config = TrainConfig {
        mode: a.mode,
        attack: a.attack.config(),
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        lr_schedule: a.lr_schedule,
        beta: a.beta,
        eps_warmup_epochs: a.eps_warmup_epochs,
        arch,
        seed: a.seed,
        data: data_fingerprint(&data),
        init: a
            .init
            .as_ref()
            .map(|p| Ok::<_, anyhow::Error>(format!("{} sha256={}", p.display(), sha256_file(p)?)))
            .transpose()?,
    };
    let config = config.check().flag_hint(hints::TRAIN)?;
    let mut trainer = Trainer::new(config, data.input_shape(), data.num_classes, device)
        .flag_hint(hints::TRAIN)?;
    if let Some(p) = &a.init {
        trainer.init_from(p)?;
    }
    if let Some(dir) = &a.checkpoint_dir {
        if checkpoint::resume(&mut trainer, dir).flag_hint(hints::TRAIN)? {
            eprintln!(
                "resumed from {} after epoch {}",
                dir.display(),
                trainer.epoch
            );
        }
    }
    let t0 = Instant::now();
    let mut test_clean = None;
    while trainer.epoch < a.epochs {
        let s = with_bar(work_bar(&format!("epoch {}", trainer.epoch + 1)), |pb| {
            trainer.train_epoch_with_progress(&data, pb)
        })?;
        if let Some(t) = &test {
            test_clean = Some(
                with_bar(eval_bar(None), |pb| {
                    accuracy_with_progress(&trainer.model, t, None, 500, a.seed, pb)
                })?
                .clean,
            );
        }
        // Standard training has no attack: its "adversarial" accuracy is the clean one.
        let adv = if a.mode == Mode::Standard {
            String::new()
        } else {
            format!(", train adv {:.2}%", 100.0 * s.adv_accuracy)
        };
        println!(
            "epoch {}/{}: loss {:.4}, train clean {:.2}%{adv}{} ({:.0} s)",
            s.epoch,
            a.epochs,
            s.loss,
            100.0 * s.clean_accuracy,
            test_clean.map_or(String::new(), |c| format!(", test clean {:.2}%", 100.0 * c)),
            t0.elapsed().as_secs_f64()
        );
        if let Some(dir) = &a.checkpoint_dir {
            checkpoint::save(&trainer, dir)?;
        }
    }
    trainer
        .model
        .var_store()
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let final_test: Option<Accuracy> = match &test {
        Some(t) if a.mode != Mode::Standard => {
            let eval = PgdConfig {
                steps: a.eval_steps.unwrap_or(a.attack.steps),
                ..a.attack.config()
            };
            Some(with_bar(eval_bar(Some(&eval)), |pb| {
                accuracy_with_progress(&trainer.model, t, Some(&eval), 500, a.seed, pb)
            })?)
        }
        Some(t) => Some(with_bar(eval_bar(None), |pb| {
            accuracy_with_progress(&trainer.model, t, None, 500, a.seed, pb)
        })?),
        None => None,
    };
    if let Some(acc) = &final_test {
        println!(
            "test ({} samples): clean {:.2}%{}",
            acc.samples,
            100.0 * acc.clean,
            acc.robust.map_or(String::new(), |r| format!(
                ", PGD-{} robust {:.2}%",
                a.eval_steps.unwrap_or(a.attack.steps),
                100.0 * r
            ))
        );
    }
    write_sidecar(
        &a.out,
        &serde_json::json!({
            "provenance": Provenance::current(Some(a.seed)),
            "arch": trainer.config.arch,
            "model": trainer.model.info(),
            "train": trainer.config,
            "history": trainer.history,
            "test_data": test.as_ref().map(|t| t.source.clone()),
            "test": final_test,
            "test_eval_steps": a.eval_steps.unwrap_or(a.attack.steps),
            "weights_sha256": sha256_file(&a.out)?,
        }),
    )?;
    println!("wrote {}", a.out.display());
    if let Some(pt) = &a.export_torchscript {
        trainer.model.export_torchscript(pt)?;
        println!("wrote {}", pt.display());
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvalPgdArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub attack: AttackArgs,
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the accuracies as JSON (with provenance).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The bar of an accuracy pass ([`accuracy_with_progress`]).
fn eval_bar(attack: Option<&PgdConfig>) -> indicatif::ProgressBar {
    work_bar(if attack.is_some() { "pgd eval" } else { "eval" })
}

pub fn run_eval(a: EvalPgdArgs) -> Result<()> {
    let data = a.data.load()?;
    let cfg = a.attack.config();
    let model = a.model.load_for(&data)?;
    let t0 = Instant::now();
    let acc = with_bar(eval_bar(Some(&cfg)), |pb| {
        accuracy_with_progress(model.as_ref(), &data, Some(&cfg), a.batch_size, a.seed, pb)
    })
    .flag_hint(hints::TRAIN)?;
    println!(
        "{} on {} ({} samples): clean {:.2}%, PGD-{} {} eps={} robust {:.2}% ({:.0} s)",
        model.info().name,
        data.source,
        acc.samples,
        100.0 * acc.clean,
        cfg.steps,
        cfg.norm,
        cfg.eps,
        100.0 * acc.robust.unwrap_or(0.0),
        t0.elapsed().as_secs_f64()
    );
    if let Some(out) = &a.out {
        let json = serde_json::json!({
            "provenance": Provenance::current(Some(a.seed)),
            "model": model.info(),
            "data": data.source,
            "attack": cfg,
            "accuracy": acc,
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
