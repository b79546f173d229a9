//! `brittle merge`: joins the shard files of one margins job, checking completeness.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Shard margins files (each with its `.meta.json` sidecar).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long, default_value = "margins.csv")]
    pub out: PathBuf,
}

pub fn run(a: MergeArgs) -> Result<()> {
    let n = crate::margins::merge(&a.inputs, &a.out)?;
    println!(
        "merged {} files: {n} samples -> {}",
        a.inputs.len(),
        a.out.display()
    );
    Ok(())
}
