//! The flags behind the library's options: the library names an option by its field (an
//! [`OptionError`]); the command line adds the flag that sets it, as ripgrep's `hiargs` maps
//! its low-level flags to checked high-level arguments.

use anyhow::Result;

use crate::util::OptionError;

/// Option fields and the flags that set them, for one command.
pub type Flags<'a> = &'a [(&'a str, &'a str)];

/// Adds the flag of the option `err` is about (an [`OptionError`] anywhere in its chain), so
/// that the message reads `--batch-size: the batch size must be positive`.
pub fn with_flag(err: anyhow::Error, flags: Flags) -> anyhow::Error {
    let field = err
        .chain()
        .find_map(|e| e.downcast_ref::<OptionError>())
        .map(|o| o.field);
    match field.and_then(|f| flags.iter().find(|(name, _)| *name == f)) {
        Some((_, flag)) => err.context(flag.to_string()),
        None => err,
    }
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
        let other = with_flag(anyhow::anyhow!("no option"), &[("lr", "--lr")]);
        assert_eq!(format!("{other:#}"), "no option");
    }
}
