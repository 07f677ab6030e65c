//! Fence agents (placeholder).
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A fence agent.
pub struct FenceAgent {
    /// Program.
    pub program: PathBuf,
    /// Args.
    pub args: BTreeMap<String, String>,
    /// Deadline.
    pub timeout_ms: u64,
}

impl FenceAgent {
    /// Off.
    pub async fn off(&self, _plug: &str) -> Result<(), String> {
        Err("not built yet".into())
    }
}
