//! The `brittle` command line: one subcommand per stage of the life cycle.

pub mod analyze;
pub mod args;
pub mod certify;
pub mod demo;
pub mod fit;
pub mod hints;
pub mod margins;
pub mod merge;
pub mod progress;
pub mod score;
pub mod serve;
pub mod train;
pub mod values;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Tells, for every decision of a robust image classifier, whether a perturbation of size ε could flip it.
#[derive(Debug, Parser)]
#[command(name = "brittle", version, about, long_about = None)]
pub struct Cli {
    /// Print errors in full, with libtorch's C++ backtrace (also with RUST_BACKTRACE=1).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Free scores (logit margin, probabilities, entropy, energy, feature margin) of every sample.
    Score(score::ScoreArgs),
    /// The whole life cycle on the embedded default: margins, report, detector, live scores.
    Demo(demo::DemoArgs),
    /// Fit a detector of brittle decisions (threshold, optional pseudo-margin) on an attacked set.
    Fit(fit::FitArgs),
    /// Serve a model and its detector over HTTP (`POST /v1/score`).
    Serve(serve::ServeArgs),
    /// Input margins (distance to the decision boundary) of every sample, by minimum-norm attacks.
    Margins(margins::MarginsArgs),
    /// Certified lower bounds on the input margins (IBP, CROWN, α-CROWN), by bisection over ε.
    Certify(certify::CertifyArgs),
    /// Joins the shard files of one `margins` job, checking every sample appears exactly once.
    Merge(merge::MergeArgs),
    /// Margin consistency, detection of non-robust samples and robust accuracy from a margins file.
    Analyze(analyze::AnalyzeArgs),
    /// Train a native small CNN: standard, PGD adversarial training or TRADES.
    Train(train::TrainArgs),
    /// Clean and PGD accuracy of a model.
    EvalPgd(train::EvalPgdArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(a) => score::run(a),
        Command::Demo(a) => demo::run_demo(a),
        Command::Fit(a) => fit::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Margins(a) => margins::run(a),
        Command::Certify(a) => certify::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Train(a) => train::run(a),
        Command::EvalPgd(a) => train::run_eval(a),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap's own consistency checks, among them that every default value (`--attack best`,
    /// `--input-layout nchw`, …) is one its enum parser accepts.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
