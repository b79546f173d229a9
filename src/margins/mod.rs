//! The margins file and the job that writes it: `margins.csv` (one [`MarginRow`] per sample)
//! with its sidecar `margins.csv.meta.json` ([`Sidecar`]: the settings, model, attack plan and
//! image fingerprint), the optional adversarial examples (`.npy`), and the run that fills them
//! chunk by chunk, resumably, in shards that [`merge`] joins.
//!
//! Every reader of a margins file (`analyze`, `fit`, `merge`, resume) goes through
//! [`read_margins`] and [`read_sidecar`]/[`find_sidecar`]. The sidecar and the resume rule are
//! generic over the job's options ([`JobOptions`]): `brittle certify`'s bounds files use them
//! too.

mod adv_store;
mod job;
mod merge;
mod options;
mod resume;
pub mod row;
mod shard;
mod sidecar;

pub use adv_store::AdvStore;
pub use job::{run, run_with_progress, Output, Summary};
pub use merge::merge;
pub use options::MarginsOptions;
pub use resume::{read_complete_lines, resume, JobRow, Resume};
pub use row::{
    check_unique_indices, read_margins, read_partial_margins, write_margins, MarginRow,
    MarginWriter,
};
pub use shard::{shard_chunks, Shard};
pub use sidecar::{data_sha256, find_sidecar, read_sidecar, JobOptions, Settings, Sidecar};
