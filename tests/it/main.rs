//! brittle's integration tests, in one binary: each file of `tests/it/` is a module (run one with
//! `cargo test --test it attack_cli::`). One binary links libtorch once, where one per file
//! linked it 23 times (and filled a CI disk).

mod common;
mod support {
    pub mod alloc_meter;
}

/// Counts each thread's Rust-side allocations, for `support::alloc_meter::peak_of`.
#[global_allocator]
static METER: support::alloc_meter::Meter = support::alloc_meter::Meter;

mod analyze_cli;
mod attack_budget;
mod attack_cli;
mod attack_effort;
mod attack_linear;
mod attack_real;
mod attack_strict;
mod certify_cli;
mod certify_reference;
mod certify_soundness;
mod data_readers;
mod detector_fit;
mod detector_heldout;
mod file_trust;
mod fuzz_readers;
mod hostile_files;
mod idx_read;
mod metrics_reference;
mod model_checks;
mod model_torchscript;
mod native_models;
mod onnx_ops;
mod onnx_shared;
mod score_reference;
mod serve_api;
mod train_embedded;
mod train_losses;
mod train_small;
mod usability;
