//! Every item of the brittle library the bindings use, in one place, so that a move inside the
//! library changes these lines only.

pub use brittle::attack::AttackKind;
pub use brittle::cli::progress::work_bar;
pub use brittle::cli::{run as run_cli, Cli};
pub use brittle::data::Dataset;
pub use brittle::detector::apply::score_dataset;
pub use brittle::detector::fit::{fit as fit_detector, FitOptions};
pub use brittle::detector::pseudo::TrainConfig;
pub use brittle::detector::Detector;
pub use brittle::margins::{
    read_margins, run_with_progress as run_margins_job, MarginsOptions, Output as MarginsOutput,
};
pub use brittle::model::checked::Guarded;
pub use brittle::model::sanity::{check_first_batch, Configured, SanityError};
pub use brittle::model::{
    load_classifier, logits_no_grad, Classifier, DeviceChoice, ModelInfo, ModelSpec,
};
pub use brittle::norm::{parse_eps, Norm};
pub use brittle::provenance::Provenance;
pub use brittle::score::table::write_csv as write_scores_csv;
pub use brittle::score::ScoreOptions;
pub use brittle::util::{Check, NoProgress};
