//! One clap value parser for every library enum a flag takes (`--attack`, `--model-format`, …).
//!
//! The library derives only `strum` on its enums (it knows no command line); this parser turns
//! their spellings (`VariantNames`) and doc comments (`EnumMessage::get_documentation`) into
//! clap's possible values, so `--help` lists every value with its description and a wrong value
//! is refused with the list.

use std::str::FromStr;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use strum::{EnumMessage, VariantNames};

/// The help line of a variant: its doc comment on one line, without a closing period (as clap
/// shows the doc comments of its own `ValueEnum`s).
fn help_line(doc: &str) -> String {
    let text = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.strip_suffix('.') {
        Some(t) if !t.ends_with('.') => t.to_string(),
        _ => text,
    }
}

/// The possible values of `T`, each with its doc comment as help.
pub fn possible_values<T>() -> Vec<PossibleValue>
where
    T: FromStr + VariantNames + EnumMessage,
{
    T::VARIANTS
        .iter()
        .map(|&name| {
            let doc = T::from_str(name).ok().and_then(|v| v.get_documentation());
            match doc {
                Some(d) => PossibleValue::new(name).help(help_line(d)),
                None => PossibleValue::new(name),
            }
        })
        .collect()
}

/// A value parser for a library enum: `#[arg(long, value_parser = enum_parser::<AttackKind>())]`.
pub fn enum_parser<T>() -> impl TypedValueParser<Value = T>
where
    T: FromStr + VariantNames + EnumMessage + Clone + Send + Sync + 'static,
    <T as FromStr>::Err: std::error::Error + Send + Sync + 'static,
{
    PossibleValuesParser::new(possible_values::<T>()).try_map(|s| T::from_str(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::AttackKind;
    use crate::data::DataFormat;

    #[test]
    fn spellings_and_help_come_from_the_enum() {
        let values = possible_values::<AttackKind>();
        let names: Vec<&str> = values.iter().map(|v| v.get_name()).collect();
        assert_eq!(names, ["fmn", "fab", "fab-t", "ddn", "pgd", "best"]);
        assert_eq!(
            values[2].get_help().map(|h| h.to_string()).as_deref(),
            Some("Targeted FAB, one run per top-k class (Linf and L2)")
        );
        let formats: Vec<String> = possible_values::<DataFormat>()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        assert_eq!(formats, ["cifar10", "cifar100", "idx", "npy", "npz"]);
    }

    #[test]
    fn parses_a_listed_value_and_refuses_another() {
        let cmd = clap::Command::new("t").arg(
            clap::Arg::new("attack")
                .long("attack")
                .value_parser(enum_parser::<AttackKind>()),
        );
        let m = cmd
            .clone()
            .try_get_matches_from(["t", "--attack", "fab-t"])
            .unwrap();
        assert_eq!(m.get_one::<AttackKind>("attack"), Some(&AttackKind::FabT));
        let err = cmd
            .try_get_matches_from(["t", "--attack", "fabt"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("possible values: fmn, fab, fab-t, ddn, pgd, best"),
            "{err}"
        );
    }
}
