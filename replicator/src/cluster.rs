//! The cluster id: which history a journal belongs to.
//!
//! A primary names its cluster when it first ships ([`primary_cluster_id`]: a random 128-bit
//! hex id written once to `data_dir/cluster_id`, temp file, sync, rename, directory sync); a
//! standby writes the id of the primary it first follows to its own `data_dir/cluster_id`
//! ([`adopt`]) and refuses any other primary from then on, so that a standby pointed at a node
//! of another cluster stops with a clear error instead of mixing two histories.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::ReplicationError;

/// The file name, in the data directory.
pub const CLUSTER_ID_FILE: &str = "cluster_id";

/// The cluster id stored in `data_dir`, if any.
pub fn read(data_dir: &Path) -> Result<Option<String>, ReplicationError> {
    let path = data_dir.join(CLUSTER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_string();
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ReplicationError::State {
                    what: "read the cluster id",
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a 32-digit hex cluster id",
                    ),
                });
            }
            Ok(Some(id))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReplicationError::State {
            what: "read the cluster id",
            path,
            source,
        }),
    }
}

/// The primary's cluster id: the stored one, or a new one stored now.
pub fn primary_cluster_id(data_dir: &Path) -> Result<String, ReplicationError> {
    if let Some(id) = read(data_dir)? {
        return Ok(id);
    }
    let id = new_id();
    adopt(data_dir, &id)?;
    Ok(id)
}

/// Stores `id` as this node's cluster id, durably.
pub fn adopt(data_dir: &Path, id: &str) -> Result<(), ReplicationError> {
    let path = data_dir.join(CLUSTER_ID_FILE);
    let tmp = data_dir.join(format!("{CLUSTER_ID_FILE}.tmp"));
    let state = |what: &'static str, path: &PathBuf| {
        let path = path.clone();
        move |source| ReplicationError::State { what, path, source }
    };
    std::fs::create_dir_all(data_dir).map_err(state("create the data directory", &tmp))?;
    let mut file = std::fs::File::create(&tmp).map_err(state("create", &tmp))?;
    file.write_all(format!("{id}\n").as_bytes())
        .map_err(state("write", &tmp))?;
    file.sync_all().map_err(state("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(state("rename into place", &path))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(state("sync the directory of", &path))?;
    Ok(())
}

/// A new random cluster id: 128 bits of blake3 over the clock, the process and a stack address.
fn new_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let marker = 0u8;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&now.to_le_bytes());
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&(std::ptr::addr_of!(marker) as usize).to_le_bytes());
    hex::encode(&hasher.finalize().as_bytes()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_keeps_its_id_and_a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(read(dir.path()), Ok(None)));
        let id = primary_cluster_id(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.len(), 32);
        let again = primary_cluster_id(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id, again);
        std::fs::write(dir.path().join(CLUSTER_ID_FILE), "zz").unwrap_or_else(|e| panic!("{e}"));
        let e = read(dir.path()).expect_err("bad id");
        assert!(e.to_string().contains("hex"), "{e}");
    }
}
