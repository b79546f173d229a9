//! The progress bars of the command line: the library reports to a [`Progress`]; only here does
//! it become an indicatif bar on stderr.

use indicatif::{ProgressBar, ProgressStyle};

use crate::util::Progress;

impl Progress for ProgressBar {
    fn set_length(&self, units: u64) {
        ProgressBar::set_length(self, units);
    }
    fn inc(&self, units: u64) {
        ProgressBar::inc(self, units);
    }
    fn set_message(&self, msg: String) {
        ProgressBar::set_message(self, msg);
    }
}

/// A progress bar over `len` samples showing rate and ETA; hidden when stderr is not a terminal
/// or `BRITTLE_NO_PROGRESS` is set.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    styled_bar(
        Some(len),
        what,
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}",
    )
}

/// A bar over units of work that are not samples (attack steps): shows the percentage and ETA,
/// and the message (samples finished) instead of the raw count.
pub fn work_bar(what: &str) -> ProgressBar {
    styled_bar(
        None,
        what,
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {percent:>3}% ETA {eta} {msg}",
    )
}

/// `len: None`: set later ([`Progress::set_length`]); until then the bar shows 0%, not 100%.
fn styled_bar(len: Option<u64>, what: &str, template: &str) -> ProgressBar {
    let pb = if std::env::var_os("BRITTLE_NO_PROGRESS").is_some() {
        ProgressBar::hidden()
    } else {
        len.map_or_else(ProgressBar::no_length, ProgressBar::new)
    };
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Runs `f` with the bar `pb`, then clears the bar, whether `f` succeeded or not.
pub fn with_bar<T>(pb: ProgressBar, f: impl FnOnce(&ProgressBar) -> T) -> T {
    let out = f(&pb);
    pb.finish_and_clear();
    out
}
