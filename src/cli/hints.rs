//! The flags behind the library's options: the library names an option by its field (an
//! [`OptionError`]); the command line adds the flag that sets it, as ripgrep's `hiargs` maps
//! its low-level flags to checked high-level arguments.

use anyhow::Result;

use crate::util::OptionError;

/// Option fields and the flags that set them, for one options struct.
pub type Flags<'a> = &'a [(&'a str, &'a str)];

// Every command's flags for the library's option fields, in one place. A table per options
// struct: the same field name (`format`, `batch_size`) may be set by different flags.

/// [`crate::model::ModelSpec`] (every command that loads a model).
pub const MODEL: Flags = &[
    ("format", "--model-format"),
    ("arch", "--arch"),
    ("mean", "--mean"),
    ("std", "--std"),
    ("input_layout", "--input-layout"),
];

/// [`crate::data::DataSpec`] (every command that reads data).
pub const DATA: Flags = &[
    ("labels", "--labels"),
    ("format", "--data-format"),
    ("offset", "--offset"),
    ("limit", "--limit"),
];

/// `train`'s and `eval-pgd`'s test set.
pub const TEST_DATA: Flags = &[("labels", "--test-labels"), ("limit", "--test-limit")];

/// [`crate::score::ScoreOptions`].
pub const SCORE: Flags = &[("batch_size", "--batch-size")];

/// [`crate::margins::MarginsOptions`] (and the attack plan made from them).
pub const MARGINS: Flags = &[
    ("norm", "--norm"),
    ("steps", "--steps"),
    ("batch_size", "--batch-size"),
    ("chunk", "--chunk"),
    ("topk", "--topk"),
    ("effort", "--effort"),
    (
        "shard",
        "--shard (or the SLURM/JOB_COMPLETION_INDEX variables)",
    ),
];

/// [`crate::certify::job::CertifyOptions`].
pub const CERTIFY: Flags = &[
    ("norm", "--norm"),
    ("rel_tol", "--rel-tol"),
    ("batch_size", "--batch-size (or --chunk)"),
];

/// [`crate::report::AnalyzeOptions`].
pub const ANALYZE: Flags = &[
    ("norm", "--norm"),
    ("eps", "--eps"),
    ("bootstrap", "--bootstrap"),
    ("subset", "--subset"),
    ("repeats", "--repeats"),
];

/// [`crate::train::TrainConfig`] and [`crate::train::PgdConfig`].
pub const TRAIN: Flags = &[
    ("norm", "--norm"),
    ("eps", "--eps"),
    ("step_size", "--step-size"),
    ("steps", "--steps"),
    ("beta", "--beta"),
    ("epochs", "--epochs"),
    ("batch_size", "--batch-size"),
    ("lr", "--lr"),
    ("eps_warmup_epochs", "--eps-warmup-epochs"),
    ("checkpoint_dir", "--checkpoint-dir"),
];

/// [`crate::detector::fit::FitOptions`].
pub const FIT: Flags = &[
    ("eps", "--eps"),
    ("target_tpr", "--target-tpr"),
    ("val_fraction", "--val-fraction"),
    ("batch_size", "--batch-size"),
    ("window", "--offset/--limit"),
];

/// The pseudo-margin's [`crate::detector::pseudo::TrainConfig`] (`fit`).
pub const PSEUDO: Flags = &[
    ("hidden", "--hidden"),
    ("depth", "--depth"),
    ("lr", "--lr"),
    ("max_epochs", "--epochs"),
    ("batch_size", "--mlp-batch-size"),
];

/// [`crate::serve::ServeConfig`].
pub const SERVE: Flags = &[
    ("input_shape", "--input-shape"),
    ("max_batch", "--max-batch"),
    ("max_wait", "--max-wait-us"),
    ("max_images", "--max-images"),
    ("max_body_bytes", "--max-body-mib"),
    ("queue", "--queue"),
    ("spin", "--spin-us"),
    ("header_timeout", "--header-timeout"),
    ("body_timeout", "--body-timeout"),
    ("max_connections", "--max-connections"),
    ("shutdown_timeout", "--shutdown-timeout"),
];

/// Adds the flag of the option `err` is about (an [`OptionError`] anywhere in its chain), so
/// that the message reads `--batch-size: the batch size must be positive`, or, when the error
/// names the value at fault, `--eps 8: ...`.
pub fn with_flag(err: anyhow::Error, flags: Flags) -> anyhow::Error {
    let option = err.chain().find_map(|e| e.downcast_ref::<OptionError>());
    let Some(option) = option else {
        return err;
    };
    let hint = match flags.iter().find(|(name, _)| *name == option.field) {
        Some((_, flag)) => match &option.value {
            Some(v) => format!("{flag} {v}"),
            None => flag.to_string(),
        },
        None => return err,
    };
    err.context(hint)
}

/// [`with_flag`] on a result.
pub trait FlagHint<T> {
    fn flag_hint(self, flags: Flags) -> Result<T>;
}

impl<T> FlagHint<T> for Result<T> {
    fn flag_hint(self, flags: Flags) -> Result<T> {
        self.map_err(|e| with_flag(e, flags))
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn names_the_flag_of_the_option_deep_in_the_chain() {
        let err = Err::<(), _>(anyhow::Error::new(OptionError::new(
            "batch_size",
            "the batch size must be positive",
        )))
        .context("scoring")
        .flag_hint(&[("lr", "--lr"), ("batch_size", "--batch-size")])
        .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "--batch-size: scoring: the batch size must be positive"
        );
        let eps = with_flag(
            OptionError::new("eps", "too large").with_value("8").into(),
            ANALYZE,
        );
        assert_eq!(format!("{eps:#}"), "--eps 8: too large");
        let other = with_flag(anyhow::anyhow!("no option"), &[("lr", "--lr")]);
        assert_eq!(format!("{other:#}"), "no option");
    }
}
