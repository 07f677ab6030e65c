//! `concord bench …`: benchmarks that print a ratio against a baseline measured in the same run.

use std::path::PathBuf;

/// Options of `concord bench journal`.
#[derive(clap::Args, Debug)]
pub struct JournalBenchArgs {
    /// Directory on the disk to measure (default: a new temp directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the benchmark journal in the directory for `concord journal inspect|verify`.
    #[arg(long)]
    pub keep: bool,
    /// One JSON object per configuration on standard output instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `concord bench journal`.
pub fn journal(args: JournalBenchArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not yet")
}
