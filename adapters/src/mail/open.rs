//! Opening a mail resource: the Maildir, the private area, and what the branch log says.
//!
//! `open` checks that the path is a Maildir (`tmp/`, `new/`, `cur/`), creating what is missing
//! only when the configuration says so; creates the private area (`.concord/` and its `tmp/`),
//! takes its `LOCK` and clears its `tmp/`; opens the blob store; reads the fence epoch and the
//! applied LSN; reads the branch log, whose prepared branches come back prepared; and removes
//! from the Maildir's `tmp/` the messages this resource named for branches that are not
//! prepared (presumed abort, or copies a finished commit or replay left).
//!
//! # Implementation caveats
//!
//! * Blocking: `open` does all of this on the calling thread, before the instance is shared.
//! * Files in `tmp/` whose names this resource did not make are left alone.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use journal::{BlobConfig, BlobStore, Lsn};

use super::{
    Area, Branch, CHUNK_BYTES, Inner, MailConfig, MailResource, Prepared, State, Trims,
    decode_redo, list_names, log, message, name,
};
use crate::dirsync::DirSync;
use crate::internal::branches::Branches;
use crate::internal::collect::Adoptions;
use crate::internal::instance::Shared;
use crate::internal::io::{
    OwnDir, blob_error, create_dir_durably, lock_private, open_own_dir, remove_file_if_exists,
};
use crate::internal::lifecycle::Shell;
use crate::internal::state_file::read_state_file;
use crate::{Epoch, ResourceError};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl MailResource {
    /// Opens the resource on the Maildir at `maildir`: checks it is one (or creates what is
    /// missing, when `config.create` says so), creates the private area if needed, takes its
    /// lock, reads the fence epoch and applied LSN and the prepared branches, and removes from
    /// `tmp/` the messages of branches that never prepared. Blocking: call it from
    /// `spawn_blocking` when a runtime must not stall.
    pub fn open(name: &str, maildir: &Path, config: MailConfig) -> Result<Arc<MailResource>> {
        // Not shared until `open` returns: no sync here waits on another thread.
        let dirs = DirSync::new(name);
        let maildir = open_maildir(name, &dirs, maildir, &config)?;
        let area = Area::new(&maildir);
        for dir in [&area.private, &area.scratch] {
            create_dir_durably(name, &dirs, dir)?;
        }
        let lock = lock_private(name, &area.private, "Maildir")?;
        clear_dir(name, &area.scratch)?;
        let blobs = open_blobs(name, &area, &config)?;
        let fence = Epoch(read_state_file(name, &area.fence)?);
        let applied_lsn = Lsn(read_state_file(name, &area.applied_lsn)?);
        let (log, live) =
            log::open(&area.log).map_err(|e| log::log_open_error(name, &area.log, e))?;
        let branches = load_prepared(name, live)?;
        remove_orphans(name, &area, &branches)?;
        tracing::info!(resource = name, maildir = %maildir.display(), prepared = branches.len(), %fence, %applied_lsn, "mail resource open");
        let state = State {
            shared: Shared::opened(fence, applied_lsn),
            branches,
        };
        let inner = Inner {
            name: name.to_string(),
            maildir,
            area,
            host: message::host_name(),
            blobs,
            dirs,
            log,
            config,
            state: Mutex::new(state),
            trims: Mutex::new(Trims {
                at_bytes: 0,
                at_lsn: Lsn::ZERO,
            }),
            trimming: tokio::sync::Mutex::new(()),
            shell: Shell::default(),
            adoptions: Adoptions::default(),
            next_tmp: AtomicU64::new(0),
            _lock: lock,
        };
        Ok(Arc::new(MailResource {
            inner: Arc::new(inner),
        }))
    }
}

/// Checks that `path` is a Maildir (a directory with `tmp/`, `new/` and `cur/`), creating what
/// is missing when `config.create` says so; returns its canonical path.
pub(super) fn open_maildir(
    name: &str,
    dirs: &DirSync,
    path: &Path,
    config: &MailConfig,
) -> Result<PathBuf> {
    let own = OwnDir {
        what: "Maildir",
        when_missing: "create it (with tmp/, new/ and cur/) or set create = true",
    };
    open_own_dir(name, dirs, path, config.create, own)?;
    for sub in ["tmp", "new", "cur"] {
        let dir = path.join(sub);
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                let reason = format!(
                    "{} is not a Maildir: its {sub} ({}) is not a directory",
                    path.display(),
                    dir.display()
                );
                return Err(ResourceError::rejected(name, reason));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && config.create => {
                create_dir_durably(name, dirs, &dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let reason = format!(
                    "{} is not a Maildir: its subdirectory {sub}/ is missing (a Maildir has tmp/, new/ and cur/); create it, or set create = true to let concord create what is missing",
                    path.display()
                );
                return Err(ResourceError::rejected(name, reason));
            }
            Err(e) => return Err(ResourceError::io(name, "inspect", &dir, &e)),
        }
    }
    fs::canonicalize(path).map_err(|e| ResourceError::io(name, "resolve Maildir", path, &e))
}

/// Empties a directory of files (temp files of interrupted writes). Not shared with the files
/// resource's: that one also removes directories (staging), which the private area here never holds.
pub(super) fn clear_dir(name: &str, dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| ResourceError::io(name, "list", dir, &e))? {
        let path = entry
            .map_err(|e| ResourceError::io(name, "list", dir, &e))?
            .path();
        fs::remove_file(&path).map_err(|e| ResourceError::io(name, "remove", &path, &e))?;
    }
    Ok(())
}

pub(super) fn open_blobs(name: &str, area: &Area, config: &MailConfig) -> Result<BlobStore> {
    let blob_config = BlobConfig {
        blob_bytes_max: config.max_message_bytes,
        chunk_bytes: CHUNK_BYTES,
        create_if_missing: true,
    };
    BlobStore::open(&area.blobs, blob_config).map_err(|e| blob_error(name, e))
}

/// The prepared branches, from the live records of the branch log.
pub(super) fn load_prepared(name: &str, live: log::Live) -> Result<Branches<Branch>> {
    let mut branches = HashMap::new();
    for (xid, (lsn, redo)) in live.branches {
        let entries = decode_redo(&redo).map_err(|e| ResourceError::Fatal {
            resource: name.to_string(),
            message: format!(
                "the branch log's prepare record of {xid} (lsn {lsn}) does not decode: {e}"
            ),
        })?;
        let names = entries.iter().map(|e| e.name().to_string()).collect();
        let mut branch = Branch::new(0);
        branch.log_floor = Some(lsn);
        branch.recovered = true;
        branch.prepared = Some(Arc::new(Prepared { names, redo }));
        branches.insert(xid, branch);
    }
    Ok(Branches::recovered(branches))
}

/// Removes from `tmp/` every message this resource named for a branch that is not prepared
/// (presumed abort, or a copy left by a finished commit or a replay); other files are left.
pub(super) fn remove_orphans(name: &str, area: &Area, branches: &Branches<Branch>) -> Result<()> {
    let mut removed = 0usize;
    for file_name in list_names(name, &area.tmp)? {
        let Some((xid, _)) = name::parse_name(&file_name) else {
            continue;
        };
        if branches.contains(&xid) {
            continue;
        }
        remove_file_if_exists(name, &area.tmp.join(&file_name))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(
            resource = name,
            removed,
            "removed from tmp/ the messages of branches that are not prepared"
        );
    }
    Ok(())
}
