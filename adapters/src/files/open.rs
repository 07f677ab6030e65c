//! Opening a files resource: the root, the private area, and what the branch log says.
//!
//! `open` checks (or creates) the root, creates the private area (`.concord/` with `staging/`
//! and `tmp/`, each synced into its parent), takes the root's `LOCK`, clears `tmp/`, opens the
//! blob store, reads the fence epoch and the applied LSN, reads the branch log — the prepared
//! branches come back prepared with their path locks taken again — clears the staging of
//! branches that never prepared (presumed abort), and applies again the commits the log holds
//! since its last checkpoint, whose files may not have reached the disk.
//!
//! # Implementation caveats
//!
//! * Blocking: `open` does all of this on the calling thread, before the instance is shared.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use journal::{BlobConfig, BlobStore, Lsn};
use tokio::sync::Notify;

use super::checkpoint::Checkpoints;
use super::confine::check_path;
use super::locks::Locks;
use super::staging::clear_staging;
use super::{
    Area, Branch, CHUNK_BYTES, FilesConfig, FilesResource, Inner, State, decode_redo, log,
};
use crate::dirsync::DirSync;
use crate::internal::branches::Branches;
use crate::internal::collect::Adoptions;
use crate::internal::instance::Shared;
use crate::internal::io::{OwnDir, blob_error, create_dir_durably, lock_private, open_own_dir};
use crate::internal::lifecycle::Shell;
use crate::internal::state_file::read_state_file;
use crate::{Epoch, ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl FilesResource {
    /// Opens the resource at `root`: creates the private area if needed, takes the root's lock,
    /// reads the fence epoch and applied LSN, re-takes the locks of every prepared branch and
    /// removes the staging of branches that never prepared. Blocking: call it from
    /// `spawn_blocking` when a runtime must not stall.
    pub fn open(name: &str, root: &Path, config: FilesConfig) -> Result<Arc<FilesResource>> {
        // Not shared until `open` returns: no sync here waits on another thread.
        let dirs = DirSync::new(name);
        let root = open_root(name, &dirs, root, &config)?;
        let area = Area::new(&root);
        for dir in [&area.private, &area.staging, &area.tmp] {
            create_dir_durably(name, &dirs, dir)?;
        }
        let lock = lock_private(name, &area.private, "root")?;
        let fs = File::open(&root).map_err(|e| ResourceError::io(name, "open", &root, &e))?;
        clear_dir(name, &area.tmp)?;
        let blobs = open_blobs(name, &area, &config)?;
        let fence = Epoch(read_state_file(name, &area.fence)?);
        let applied_lsn = Lsn(read_state_file(name, &area.applied_lsn)?);
        let (log, live) =
            log::open(&area.log).map_err(|e| log::log_open_error(name, &area.log, e))?;
        let log::Live {
            branches,
            committed,
        } = live;
        let (branches, locks) = load_prepared(name, branches)?;
        clear_staging(name, &dirs, &area)?;
        tracing::info!(resource = name, root = %root.display(), prepared = branches.len(), %fence, %applied_lsn, "files resource open");
        let state = State {
            shared: Shared::opened(fence, applied_lsn),
            branches,
            locks,
        };
        let inner = Inner {
            name: name.to_string(),
            root,
            area,
            blobs,
            dirs,
            log,
            checkpoints: Mutex::new(Checkpoints {
                at_bytes: 0,
                at_lsn: Lsn::ZERO,
                at: std::time::Instant::now(),
                covered: Lsn::ZERO,
                last_commit: Lsn::ZERO,
            }),
            checkpointing: tokio::sync::Mutex::new(()),
            fs,
            config,
            state: Mutex::new(state),
            released: Notify::new(),
            shell: Shell::default(),
            adoptions: Adoptions::default(),
            next_file: AtomicU64::new(0),
            _lock: lock,
        };
        let inner = Arc::new(inner);
        inner.redo_committed(committed)?;
        Ok(Arc::new(FilesResource { inner }))
    }
}

/// Checks (or creates) the root and returns its canonical path.
fn open_root(name: &str, dirs: &DirSync, root: &Path, config: &FilesConfig) -> Result<PathBuf> {
    let own = OwnDir {
        what: "root directory",
        when_missing: "create it or set create_if_missing",
    };
    open_own_dir(name, dirs, root, config.create_if_missing, own)?;
    fs::canonicalize(root).map_err(|e| ResourceError::io(name, "resolve root directory", root, &e))
}

/// Empties a directory (temp files of interrupted writes).
fn clear_dir(name: &str, dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| ResourceError::io(name, "list", dir, &e))? {
        let path = entry
            .map_err(|e| ResourceError::io(name, "list", dir, &e))?
            .path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| ResourceError::io(name, "remove", &path, &e))?;
    }
    Ok(())
}

fn open_blobs(name: &str, area: &Area, config: &FilesConfig) -> Result<BlobStore> {
    let blob_config = BlobConfig {
        blob_bytes_max: config.file_bytes_max,
        chunk_bytes: CHUNK_BYTES,
        create_if_missing: true,
    };
    BlobStore::open(area.private.join("blobs"), blob_config).map_err(|e| blob_error(name, e))
}

/// The prepared branches (from the live records of the branch log), with their locks taken.
fn load_prepared(
    name: &str,
    live: HashMap<Xid, (Lsn, Vec<u8>)>,
) -> Result<(Branches<Branch>, Locks)> {
    let (mut branches, mut locks) = (HashMap::new(), Locks::default());
    for (xid, (lsn, redo)) in live {
        let entries = decode_redo(&redo).map_err(|e| ResourceError::Fatal {
            resource: name.to_string(),
            message: format!(
                "the branch log's prepare record of {xid} (lsn {lsn}) does not decode: {e}"
            ),
        })?;
        let mut branch = Branch::new();
        branch.log_floor = Some(lsn);
        for entry in &entries {
            let path = entry.path();
            check_path(name, path)?;
            locks.take(&xid, path);
            branch.locked.insert(path.to_string());
        }
        branch.prepared = Some(Arc::new(entries));
        branches.insert(xid, branch);
    }
    Ok((Branches::recovered(branches), locks))
}
