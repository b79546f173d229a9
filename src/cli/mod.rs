//! The `brittle` command line: one subcommand per stage of the life cycle.

pub mod args;
pub mod score;
pub mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Tells, for every decision of a robust image classifier, whether a perturbation of size ε could flip it.
#[derive(Debug, Parser)]
#[command(name = "brittle", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Free scores (logit margin, probabilities, entropy, energy, feature margin) of every sample.
    Score(score::ScoreArgs),
    /// Train a native small CNN: standard, PGD adversarial training or TRADES.
    Train(train::TrainArgs),
    /// Clean and PGD accuracy of a model.
    EvalPgd(train::EvalPgdArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(a) => score::run(a),
        Command::Train(a) => train::run(a),
        Command::EvalPgd(a) => train::run_eval(a),
    }
}
