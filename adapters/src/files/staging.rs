//! Staging: where a branch's writes wait until it is resolved, and how prepare makes them durable.
//!
//! [`FilesBranch::put`] reads its content in bounded chunks. Small content (at most
//! `INLINE_FILE_BYTES_MAX`, and at most `INLINE_BRANCH_BYTES_MAX` per branch) stays in memory;
//! larger content streams into `staging/<xid>.<n>`, hashed with blake3 as it goes, so a file of
//! any size never sits in memory. [`FilesBranch::delete`] records the intent only. A branch
//! reads its own writes first ([`FilesBranch::read`], [`FilesBranch::open_read`]), then the
//! committed tree.
//!
//! Prepare turns the staged changes into redo entries (`Inner::prepare_entries`): small content
//! goes inline (a small staged file is read back and checked against its hash); a larger staged
//! file is synced and adopted into the blob store by hard link, which makes it durable under its
//! content's name without a copy. The entries are then appended to the branch log as one
//! `PREPARED` record (`Inner::prepare_branch`). A staged file changed or removed by hand refuses
//! the prepare, naming it.
//!
//! # Implementation caveats
//!
//! * Staging is not synced: after a restart nothing uses it (a prepared branch has its content
//!   in the log or the blob store; any other is presumed aborted), and `open` clears it.
//! * A put that loses a race with prepare or rollback removes its staged file and fails.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use journal::{BlobId, Lsn};
use tokio::io::AsyncRead;

use super::confine::{Use, check_path};
use super::{
    Area, CHUNK_BYTES, FEWER, FilesBranch, INLINE_BRANCH_BYTES_MAX, INLINE_FILE_BYTES_MAX, Inner,
    READ_BYTES_MAX, RedoEntry, TASK, encode_redo,
};
use crate::dirsync::DirSync;
use crate::internal::branch_log;
use crate::internal::instance::Instance;
use crate::internal::io::{blob_error, blocking, fill, remove_file_if_exists, sync_file};
use crate::{ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// What a branch did to one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// Content staged (`staged`), hashing to `id`.
    Put {
        staged: Staged,
        id: BlobId,
        bytes: u64,
    },
    Delete,
}

/// Where a put's content waits for the commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Staged {
    /// In memory: small content (at most [`INLINE_FILE_BYTES_MAX`], within the branch's
    /// [`INLINE_BRANCH_BYTES_MAX`]), which prepare puts in the log.
    Memory(Arc<[u8]>),
    /// In the file `staging/<xid>.<n>`.
    File(u64),
}

/// What a branch sees at a path.
pub(super) enum View {
    Memory(Arc<[u8]>),
    Staged(PathBuf),
    Deleted,
    Committed,
}

impl FilesBranch {
    /// The xid of the branch.
    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// Streams `content` into the file at `path`, staged until the branch commits; returns its
    /// size. Waits for (at most `lock_wait_ms_max`) and locks the path. Refused when the path is
    /// not confined to the root, the content is over `file_bytes_max`, or the branch is not
    /// active.
    pub async fn put(&self, path: &str, mut content: impl AsyncRead + Unpin) -> Result<u64> {
        let inner = &self.inner;
        check_path(&inner.name, path)?;
        inner.lock_path(&self.xid, path).await?;
        // A few `lstat`s of directories just looked up: cheaper here than a trip to the
        // blocking pool.
        inner.confine(path, Use::Write)?;
        // Small content stays in memory (prepare puts it in the log); the rest goes to a
        // staged file, starting with what was read so far.
        let keep = inner.memory_room(&self.xid)?;
        let mut head = vec![0u8; usize::try_from(keep).unwrap_or(0).saturating_add(1)];
        let n = fill(&mut content, &mut head)
            .await
            .map_err(|e| inner.rejected(format!("read the content for {path}: {e}")))?;
        head.truncate(n);
        if n as u64 <= keep {
            let (id, bytes) = (BlobId::of(&head), n as u64);
            let staged = Staged::Memory(Arc::from(head));
            let change = Change::Put { staged, id, bytes };
            inner.record(&self.xid, path, change, None).await?;
            return Ok(bytes);
        }
        let staged = inner.next_file.fetch_add(1, Ordering::Relaxed);
        let file = inner.area.staged_file(&self.xid, staged);
        let written = inner.stream_to(path, &file, head, &mut content).await;
        let (id, bytes) = match written {
            Ok(ok) => ok,
            Err(e) => return Err(inner.discard(&file, e).await),
        };
        let staged = Staged::File(staged);
        let change = Change::Put { staged, id, bytes };
        inner.record(&self.xid, path, change, Some(&file)).await?;
        Ok(bytes)
    }

    /// Deletes the file at `path` when the branch commits. Waits for and locks the path like
    /// [`FilesBranch::put`]. Refused when the branch sees no file there.
    pub async fn delete(&self, path: &str) -> Result<()> {
        let inner = &self.inner;
        check_path(&inner.name, path)?;
        inner.lock_path(&self.xid, path).await?;
        let target = inner.confine_blocking(path, Use::Write).await?;
        match inner.view(&self.xid, path)? {
            View::Memory(_) | View::Staged(_) => {}
            View::Deleted => {
                return Err(not_found(
                    &inner.name,
                    path,
                    "this transaction already deleted it",
                ));
            }
            View::Committed => {
                let exists = blocking(&inner.name, TASK, move || {
                    Ok(fs::symlink_metadata(&target).is_ok())
                })
                .await?;
                if !exists {
                    return Err(not_found(&inner.name, path, "there is no such file"));
                }
            }
        }
        inner.record(&self.xid, path, Change::Delete, None).await
    }

    /// The whole content of the file at `path` as this branch sees it (its own writes first, then
    /// the committed tree); refused above [`READ_BYTES_MAX`].
    pub async fn read(&self, path: &str) -> Result<Vec<u8>> {
        check_path(&self.inner.name, path)?;
        if let View::Memory(content) = self.inner.view(&self.xid, path)? {
            return Ok(content.to_vec());
        }
        let mut file = self.open_read(path).await?;
        let (name, path) = (self.inner.name.clone(), path.to_string());
        blocking(&self.inner.name, TASK, move || {
            let len = file
                .metadata()
                .map_err(|e| ResourceError::io(&name, "inspect", Path::new(&path), &e))?
                .len();
            if len > READ_BYTES_MAX {
                let reason = format!(
                    "{path} is {len} bytes, over READ_BYTES_MAX = {READ_BYTES_MAX}; use open_read"
                );
                return Err(ResourceError::rejected(&name, reason));
            }
            let mut content = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            file.read_to_end(&mut content)
                .map_err(|e| ResourceError::io(&name, "read", Path::new(&path), &e))?;
            Ok(content)
        })
        .await
    }

    /// Opens the file at `path` for reading as this branch sees it: the staged content if this
    /// branch put it, a not-found refusal if it deleted it, else the committed file.
    pub async fn open_read(&self, path: &str) -> Result<File> {
        let inner = &self.inner;
        check_path(&inner.name, path)?;
        let name = inner.name.clone();
        match inner.view(&self.xid, path)? {
            View::Memory(content) => {
                let worker = inner.clone();
                blocking(&inner.name, TASK, move || worker.anonymous_file(&content)).await
            }
            View::Staged(file) => {
                let shown = path.to_string();
                blocking(&inner.name, TASK, move || {
                    File::open(&file).map_err(|e| {
                        ResourceError::io(&name, "open staged content of", Path::new(&shown), &e)
                    })
                })
                .await
            }
            View::Deleted => Err(not_found(&name, path, "this transaction deleted it")),
            View::Committed => {
                let target = inner.confine_blocking(path, Use::Read).await?;
                blocking(&inner.name, TASK, move || {
                    File::open(&target).map_err(|e| ResourceError::io(&name, "open", &target, &e))
                })
                .await
            }
        }
    }
}

impl Inner {
    /// Records a staged change once its content is in place; a change that lost a race with
    /// prepare or rollback is discarded.
    pub(super) async fn record(
        &self,
        xid: &Xid,
        path: &str,
        change: Change,
        file: Option<&Path>,
    ) -> Result<()> {
        let replaced = {
            let mut st = self.state();
            match st.branches.active(self, xid, "writes") {
                Ok(branch) => {
                    if let Change::Put {
                        staged: Staged::Memory(_),
                        bytes,
                        ..
                    } = &change
                    {
                        branch.memory_bytes += bytes;
                    }
                    let replaced = branch.changes.insert(path.to_string(), change);
                    if let Some(Change::Put {
                        staged: Staged::Memory(_),
                        bytes,
                        ..
                    }) = &replaced
                    {
                        branch.memory_bytes -= bytes;
                    }
                    Ok(replaced)
                }
                Err(e) => Err(e),
            }
        };
        match replaced {
            Ok(Some(Change::Put {
                staged: Staged::File(staged),
                ..
            })) => {
                let old = self.area.staged_file(xid, staged);
                let name = self.name.clone();
                blocking(&self.name, TASK, move || remove_file_if_exists(&name, &old)).await
            }
            Ok(_) => Ok(()),
            Err(e) => match file {
                Some(file) => Err(self.discard(file, e).await),
                None => Err(e),
            },
        }
    }

    /// Removes a staged file whose put failed, and returns the failure.
    pub(super) async fn discard(&self, file: &Path, e: ResourceError) -> ResourceError {
        let (name, file) = (self.name.clone(), file.to_path_buf());
        let _ = blocking(&self.name, TASK, move || {
            remove_file_if_exists(&name, &file)
        })
        .await;
        e
    }

    pub(super) fn view(&self, xid: &Xid, path: &str) -> Result<View> {
        let st = self.state();
        self.usable(&st)?;
        let branch = st.branches.open(self, xid)?;
        Ok(match branch.changes.get(path) {
            Some(Change::Put {
                staged: Staged::Memory(content),
                ..
            }) => View::Memory(content.clone()),
            Some(Change::Put {
                staged: Staged::File(n),
                ..
            }) => View::Staged(self.area.staged_file(xid, *n)),
            Some(Change::Delete) => View::Deleted,
            None => View::Committed,
        })
    }

    /// How many bytes a put of `xid` may keep in memory.
    pub(super) fn memory_room(&self, xid: &Xid) -> Result<u64> {
        let mut st = self.state();
        self.usable(&st)?;
        let branch = st.branches.active(self, xid, "writes")?;
        let left = INLINE_BRANCH_BYTES_MAX.saturating_sub(branch.memory_bytes);
        Ok(left.min(INLINE_FILE_BYTES_MAX))
    }

    /// Streams `content` into the new file `file` through one buffer, hashing it; the writing and
    /// hashing run on the blocking pool, one chunk at a time.
    pub(super) async fn stream_to(
        &self,
        path: &str,
        file: &Path,
        head: Vec<u8>,
        content: &mut (impl AsyncRead + Unpin),
    ) -> Result<(BlobId, u64)> {
        let (name, target) = (self.name.clone(), file.to_path_buf());
        let (mut out, hasher, mut buf) = blocking(&self.name, TASK, move || {
            let mut out = create_staged(&name, &target)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(&head);
            out.write_all(&head)
                .map_err(|e| ResourceError::io(&name, "write staged content to", &target, &e))?;
            Ok((out, hasher, head))
        })
        .await?;
        let mut hasher = hasher;
        let mut bytes = buf.len() as u64;
        buf.resize(CHUNK_BYTES, 0);
        loop {
            let n = fill(content, &mut buf)
                .await
                .map_err(|e| self.rejected(format!("read the content for {path}: {e}")))?;
            if n == 0 {
                return Ok((BlobId(*hasher.finalize().as_bytes()), bytes));
            }
            bytes += n as u64;
            if bytes > self.config.file_bytes_max {
                let max = self.config.file_bytes_max;
                return Err(self.rejected(format!(
                    "content for {path} is over file_bytes_max = {max} bytes"
                )));
            }
            let (name, target) = (self.name.clone(), file.to_path_buf());
            (out, hasher, buf) = blocking(&self.name, TASK, move || {
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| {
                    ResourceError::io(&name, "write staged content to", &target, &e)
                })?;
                Ok((out, hasher, buf))
            })
            .await?;
        }
    }

    /// Prepares a branch: its entries (content inline, or synced and adopted into the blob
    /// store) on the blocking pool, then its record appended to the log and waited for.
    pub(super) async fn prepare_branch(
        self: &Arc<Self>,
        xid: &Xid,
        changes: BTreeMap<String, Change>,
    ) -> Result<(Arc<Vec<RedoEntry>>, Vec<u8>, Lsn)> {
        // A branch whose content is all in memory (and within its inline budget) needs no file
        // work here: no trip to the blocking pool.
        let mut memory = 0u64;
        let in_memory = changes.values().all(|change| match change {
            Change::Put {
                staged: Staged::Memory(_),
                bytes,
                ..
            } => {
                memory += bytes;
                true
            }
            Change::Put { .. } => false,
            Change::Delete => true,
        }) && memory <= INLINE_BRANCH_BYTES_MAX;
        let entries = if in_memory {
            self.prepare_entries(xid, &changes)?
        } else {
            let (worker, id) = (self.clone(), *xid);
            blocking(&self.name, TASK, move || {
                worker.prepare_entries(&id, &changes)
            })
            .await?
        };
        let redo = encode_redo(&entries);
        let set_floor = |floor| self.set_log_floor(xid, floor);
        let (name, log, dir) = (&self.name, &self.log, &self.area.log);
        let lsn = branch_log::append_prepared(name, FEWER, log, dir, xid, &redo, set_floor).await?;
        Ok((Arc::new(entries), redo, lsn))
    }

    /// The entries of a branch's prepare record, after it stopped taking writes: a small put's
    /// content is read back from its staged file (and checked against its hash) to go inline;
    /// a larger one's staged file is synced and adopted into the blob store, which makes it
    /// durable under its content's name.
    pub(super) fn prepare_entries(
        &self,
        xid: &Xid,
        changes: &BTreeMap<String, Change>,
    ) -> Result<Vec<RedoEntry>> {
        let mut inline_bytes = 0u64;
        let mut entries = Vec::with_capacity(changes.len());
        for (path, change) in changes {
            let (staged, id, bytes) = match change {
                Change::Delete => {
                    entries.push(RedoEntry::Delete { path: path.clone() });
                    continue;
                }
                Change::Put { staged, id, bytes } => (staged, *id, *bytes),
            };
            let inline =
                bytes <= INLINE_FILE_BYTES_MAX && inline_bytes + bytes <= INLINE_BRANCH_BYTES_MAX;
            if inline {
                inline_bytes += bytes;
            }
            let file = match (staged, inline) {
                (Staged::Memory(content), true) => {
                    entries.push(RedoEntry::PutInline {
                        path: path.clone(),
                        content: content.to_vec(),
                    });
                    continue;
                }
                (Staged::File(n), true) => {
                    let file = self.area.staged_file(xid, *n);
                    let content = self.read_staged(path, &file, &id, bytes)?;
                    entries.push(RedoEntry::PutInline {
                        path: path.clone(),
                        content,
                    });
                    continue;
                }
                (Staged::File(n), false) => (self.area.staged_file(xid, *n), false),
                // Over the branch's inline budget after all (concurrent puts): through a staged
                // file of its own, removed once adopted (the commit links the blob).
                (Staged::Memory(content), false) => {
                    let n = self.next_file.fetch_add(1, Ordering::Relaxed);
                    let file = self.area.staged_file(xid, n);
                    create_written(&self.name, "staged content", &file, content)?;
                    (file, true)
                }
            };
            let (file, temporary) = file;
            let adopted = self.sync_staged(path, &file, bytes).and_then(|()| {
                self.blobs
                    .adopt(&file, &id)
                    .map_err(|e| blob_error(&self.name, e))
            });
            if adopted.is_ok() {
                self.note_adopted(&id);
            }
            if temporary {
                let removed = remove_file_if_exists(&self.name, &file);
                adopted?;
                removed?;
            } else {
                adopted?;
            }
            entries.push(RedoEntry::Put {
                path: path.clone(),
                id,
                bytes,
            });
        }
        Ok(entries)
    }

    /// A file holding `content` that has no name (created under `tmp/` and unlinked at once),
    /// for reading content staged in memory through a `File`.
    pub(super) fn anonymous_file(&self, content: &[u8]) -> Result<File> {
        let tmp = self.tmp_file();
        create_written(&self.name, "staged content", &tmp, content)?;
        let file = File::open(&tmp);
        let _ = fs::remove_file(&tmp);
        file.map_err(|e| ResourceError::io(&self.name, "open", &tmp, &e))
    }

    /// The content of a small staged file, checked against the size and hash it was written
    /// with.
    pub(super) fn read_staged(
        &self,
        path: &str,
        file: &Path,
        id: &BlobId,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        let mut content = Vec::new();
        self.open_staged(path, file)?
            .read_to_end(&mut content)
            .map_err(|e| ResourceError::io(&self.name, "read staged content", file, &e))?;
        if content.len() as u64 != bytes || BlobId::of(&content) != *id {
            let reason = format!(
                "the staged content of {path} ({}) is not what was written: it was changed by hand; roll the transaction back",
                file.display()
            );
            return Err(self.rejected(reason));
        }
        Ok(content)
    }

    /// Opens the staged file of `path`; a missing one was removed by hand.
    pub(super) fn open_staged(&self, path: &str, file: &Path) -> Result<File> {
        File::open(file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => self.rejected(staged_missing(path, file)),
            _ => ResourceError::io(&self.name, "open staged content", file, &e),
        })
    }

    pub(super) fn sync_staged(&self, path: &str, file: &Path, bytes: u64) -> Result<()> {
        let opened = self.open_staged(path, file)?;
        let len = opened
            .metadata()
            .map_err(|e| ResourceError::io(&self.name, "inspect staged content", file, &e))?
            .len();
        if len != bytes {
            let reason = format!(
                "the staged content of {path} ({}) is {len} bytes, {bytes} were written: it was changed by hand; roll the transaction back",
                file.display()
            );
            return Err(self.rejected(reason));
        }
        sync_file(&self.name, &opened, file)
    }

    /// Removes a branch's staged files that are still there (a commit moved the others into
    /// place), without syncing: staging that comes back after a crash is removed at open (no
    /// branch uses its staging after a restart).
    pub(super) fn remove_staging(
        &self,
        xid: &Xid,
        changes: &BTreeMap<String, Change>,
    ) -> Result<()> {
        for change in changes.values() {
            if let Change::Put {
                staged: Staged::File(n),
                ..
            } = change
            {
                remove_file_if_exists(&self.name, &self.area.staged_file(xid, *n))?;
            }
        }
        Ok(())
    }
}

pub(super) fn not_found(name: &str, path: &str, why: &str) -> ResourceError {
    ResourceError::rejected(name, format!("{path} not found: {why}"))
}

pub(super) fn create_staged(name: &str, file: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| ResourceError::io(name, "create staged file", file, &e))
}

/// Creates the new file `path` with `content`, not synced.
pub(super) fn create_written(name: &str, what: &str, path: &Path, content: &[u8]) -> Result<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ResourceError::io(name, &format!("create {what} temp file"), path, &e))?;
    file.write_all(content)
        .map_err(|e| ResourceError::io(name, &format!("write {what} to"), path, &e))?;
    Ok(file)
}

/// Why a prepare cannot find a staged file.
pub(super) fn staged_missing(path: &str, file: &Path) -> String {
    format!(
        "the staged content of {path} ({}) is missing: the staging area was changed by hand; roll the transaction back",
        file.display()
    )
}

/// Removes everything staged: no branch uses its staging after a restart (a prepared branch
/// has its content in the log or the blob store; any other is presumed aborted).
pub(super) fn clear_staging(name: &str, dirs: &DirSync, area: &Area) -> Result<()> {
    let mut removed = 0usize;
    for entry in fs::read_dir(&area.staging)
        .map_err(|e| ResourceError::io(name, "list", &area.staging, &e))?
    {
        let path = entry
            .map_err(|e| ResourceError::io(name, "list", &area.staging, &e))?
            .path();
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        gone.map_err(|e| ResourceError::io(name, "remove", &path, &e))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(
            resource = name,
            removed,
            "removed the staging left by the previous run"
        );
        dirs.sync(&area.staging)?;
    }
    Ok(())
}
