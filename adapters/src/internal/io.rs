//! Blocking work, streams, files and directories, and the errors of the journal crate's
//! stores, as the resources use them.
//!
//! The files and mail resources do blocking file I/O, the kv resource blocking sled calls:
//! each runs it on tokio's blocking pool through [`blocking`], a panic there being fatal. The
//! durable-write helpers keep the discipline of `docs/design.md` ("Rules taken from production
//! systems"): a failed sync is fatal (what the file holds on disk is unknown), a directory is
//! synced after a create in it. The branch log
//! and the blob store are the journal crate's, and their errors are sorted here into the
//! classes of [`ResourceError`] the same way for every resource.
//!
//! # Implementation caveats
//!
//! * Where the resources differ on purpose, they keep their own helper: the files resource's
//!   `clear_dir` also removes directories (staging), the mail resource's does not; the files
//!   resource writes a new synced file with `create_synced` (an existing one is an error), the
//!   mail resource with `overwrite_synced` (an existing one is truncated and written again).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use journal::{BlobId, BlobStore, JournalError};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::ResourceError;
use crate::dirsync::DirSync;

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// Free space a prepare wants on the branch log's file system besides its record.
const LOG_SPACE_MARGIN_BYTES: u64 = 64 << 10;

/// Runs blocking work of the resource `name` on tokio's blocking pool. A task that panicked is
/// fatal, reported as a failed `task` task ("file", "kv"): what it left on disk is unknown. A
/// task the runtime cancelled never ran (tokio cancels only blocking tasks that have not
/// started, when the runtime shuts down — after another part of the process failed, say), so
/// nothing changed: [`ResourceError::Unavailable`], which poisons nothing.
pub(crate) async fn blocking<T, F>(name: &str, task: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_cancelled() => Err(ResourceError::Unavailable {
            resource: name.to_string(),
            message: format!("{task} task not run: the runtime is shutting down"),
        }),
        Err(e) => Err(ResourceError::Fatal {
            resource: name.to_string(),
            message: format!("{task} task failed: {e}"),
        }),
    }
}

/// Checks, without writing, that each of `dirs` (`what`, path) is still a directory this
/// process may write into: `stat`, then `access(W_OK|X_OK)` (a read-only mount fails it).
/// Blocking: for [`Resource::health`](crate::Resource::health), on the blocking pool.
pub(crate) fn dirs_writable(name: &str, dirs: &[(&str, &Path)]) -> Result<()> {
    use rustix::fs::{Access, access};
    for (what, dir) in dirs {
        let unhealthy = |reason: String| ResourceError::Unavailable {
            resource: name.to_string(),
            message: format!("{what} {}: {reason}", dir.display()),
        };
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(unhealthy("not a directory any more".into())),
            Err(e) => {
                return Err(unhealthy(format!(
                    "{e}; restore it and restart the process"
                )));
            }
        }
        access(*dir, Access::WRITE_OK | Access::EXEC_OK)
            .map_err(|e| unhealthy(format!("not writable: {e}")))?;
    }
    Ok(())
}

/// The bytes a canary file holds: one page, so the file system must find a new block.
pub(crate) const CANARY_BYTES: usize = 4096;

/// The work-path canary of a resource's health probe: creates `path` (a fresh name in the
/// private area's temp directory, which open clears), writes [`CANARY_BYTES`], syncs and
/// removes it. A failure is `Unavailable`, not fatal: the resource's own files are untouched.
pub(crate) fn canary_file(name: &str, path: &Path) -> Result<()> {
    let unhealthy = |what: &str, e: io::Error| ResourceError::Unavailable {
        resource: name.to_string(),
        message: format!("health canary: {what} {}: {e}", path.display()),
    };
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| unhealthy("create", e))?;
        file.write_all(&[0x5A; CANARY_BYTES])
            .map_err(|e| unhealthy("write", e))?;
        file.sync_data().map_err(|e| unhealthy("sync", e))
    })();
    let removed = fs::remove_file(path).or_else(|e| match e.kind() {
        io::ErrorKind::NotFound => Ok(()),
        _ => Err(unhealthy("remove", e)),
    });
    written.and(removed)
}

/// Reads until `buf` is full or the content ends; returns the bytes read.
pub(crate) async fn fill(
    content: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match content.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The directory `path` is in (`.` for a bare name).
/// The blake3 hash of the regular file at `path`, read through one bounded buffer (never whole
/// into memory); `None` when there is no regular file there (gone meanwhile, or a directory,
/// symlink or other special file).
pub(crate) fn hash_file(name: &str, path: &Path) -> Result<Option<[u8; 32]>> {
    let file = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => fs::File::open(path),
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ResourceError::io(name, "inspect", path, &e)),
    };
    let mut file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ResourceError::io(name, "open", path, &e)),
    };
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK_BYTES];
    loop {
        match std::io::Read::read(&mut file, &mut buf) {
            Ok(0) => return Ok(Some(*hasher.finalize().as_bytes())),
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ResourceError::io(name, "read", path, &e)),
        }
    }
}

/// Size of the one buffer [`hash_file`] reads through.
const HASH_CHUNK_BYTES: usize = 256 << 10;

pub(crate) fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A failed sync is fatal: what the file holds on disk is unknown (docs/design.md, docs/failure-model.md).
pub(crate) fn sync_file(name: &str, file: &File, path: &Path) -> Result<()> {
    file.sync_all().map_err(|e| ResourceError::Fatal {
        resource: name.to_string(),
        message: format!("sync {}: {e}", path.display()),
    })
}

/// Most threads [`sync_files`] syncs on at once.
pub(crate) const SYNC_THREADS_MAX: usize = 16;

/// Syncs every file of `files`, several at a time (at most [`SYNC_THREADS_MAX`] threads):
/// concurrent syncs of one file system share its journal commits, as the primary's concurrent
/// committers do, where syncing one file after another pays a full commit each. The first
/// failure is returned (fatal, like [`sync_file`]), after every thread has finished.
pub(crate) fn sync_files(name: &str, files: &[(File, PathBuf)]) -> Result<()> {
    if files.len() <= 1 {
        return files
            .iter()
            .try_for_each(|(file, path)| sync_file(name, file, path));
    }
    let threads = files.len().min(SYNC_THREADS_MAX);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                scope.spawn(move || {
                    files
                        .iter()
                        .skip(k)
                        .step_by(threads)
                        .try_for_each(|(file, path)| sync_file(name, file, path))
                })
            })
            .collect();
        let mut first = Ok(());
        for worker in workers {
            let result = worker.join().unwrap_or_else(|_| {
                Err(ResourceError::Fatal {
                    resource: name.to_string(),
                    message: "a sync thread panicked".into(),
                })
            });
            if first.is_ok() {
                first = result;
            }
        }
        first
    })
}

/// Removes `file`; a missing one is fine.
pub(crate) fn remove_file_if_exists(name: &str, file: &Path) -> Result<()> {
    match fs::remove_file(file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ResourceError::io(name, "remove", file, &e)),
    }
}

/// Creates the directory `dir` and syncs its parent; an existing directory is fine.
pub(crate) fn create_dir_durably(name: &str, dirs: &DirSync, dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => dirs.sync(&parent_of(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(ResourceError::io(name, "create directory", dir, &e)),
    }
}

/// What a resource's own directory is called in its errors ("root", "Maildir"), and what to do
/// when it is missing and may not be created.
pub(crate) struct OwnDir<'a> {
    /// The name of the directory in messages.
    pub(crate) what: &'a str,
    /// What to do about a missing one, named with the resource's configuration field.
    pub(crate) when_missing: &'a str,
}

/// Checks that `path`, a resource's own directory, is a directory, creating it (all of its
/// missing ancestors, the parent synced) when `create` says so.
pub(crate) fn open_own_dir(
    name: &str,
    dirs: &DirSync,
    path: &Path,
    create: bool,
    own: OwnDir<'_>,
) -> Result<()> {
    let what = own.what;
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ResourceError::rejected(
            name,
            format!("{what} {} is not a directory", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            fs::create_dir_all(path)
                .map_err(|e| ResourceError::io(name, &format!("create {what}"), path, &e))?;
            match path.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => dirs.sync(parent),
                None => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ResourceError::rejected(
            name,
            format!(
                "{what} {} does not exist; {}",
                path.display(),
                own.when_missing
            ),
        )),
        Err(e) => Err(ResourceError::io(
            name,
            &format!("inspect {what}"),
            path,
            &e,
        )),
    }
}

/// How long a taken `LOCK` is tried again before it counts as another instance's
/// (milliseconds).
const LOCK_WAIT_MS_MAX: u64 = 500;
/// The pause between tries of a taken `LOCK` (milliseconds).
const LOCK_RETRY_MS: u64 = 10;

/// Takes the private area's `LOCK` (an advisory flock), so that one instance at a time owns
/// the `owned` directory ("root", "Maildir"); a lock held by another instance is refused after
/// [`LOCK_WAIT_MS_MAX`].
pub(crate) fn lock_private(name: &str, private: &Path, owned: &str) -> Result<File> {
    let path = private.join("LOCK");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ResourceError::io(name, "open", &path, &e))?;
    // A process that forks a child holds the lock in the child too until the child's exec
    // closes it (the descriptor is close-on-exec): a moment, during which a reopen in the parent
    // would find it taken. So a taken lock is tried again for a short while before it counts as
    // another instance's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(LOCK_WAIT_MS_MAX);
    let mut taken = file.try_lock();
    while matches!(taken, Err(fs::TryLockError::WouldBlock)) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(LOCK_RETRY_MS));
        taken = file.try_lock();
    }
    match taken {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(ResourceError::rejected(
            name,
            format!(
                "{} is locked: another instance has this {owned} open; stop it first",
                path.display()
            ),
        )),
        Err(fs::TryLockError::Error(e)) => Err(ResourceError::io(name, "lock", &path, &e)),
    }
}

/// Refuses a prepare when the branch log's file system (at `log`) has less free space than the
/// record and a margin: a write the log fails half-way poisons it, a refused prepare only rolls
/// back.
pub(crate) fn check_log_space(name: &str, log: &Path, record_bytes: u64) -> Result<()> {
    let stat = rustix::fs::statvfs(log)
        .map_err(|e| ResourceError::io(name, "inspect the file system of", log, &e.into()))?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < record_bytes.saturating_add(LOG_SPACE_MARGIN_BYTES) {
        return Err(ResourceError::io(
            name,
            &format!(
                "append a prepare record of {record_bytes} bytes ({free} bytes free) to the branch log at"
            ),
            log,
            &rustix::io::Errno::NOSPC.into(),
        ));
    }
    Ok(())
}

/// A branch log error while doing `action` ("append a resolution"): a record over the log's
/// limit is refused (the branch is too large; `fewer` says what to do, "write fewer paths");
/// anything else means the log is poisoned or failed, which is fatal.
pub(crate) fn log_error(name: &str, fewer: &str, action: &str, e: JournalError) -> ResourceError {
    match e {
        JournalError::RecordTooLarge { bytes, max } => ResourceError::rejected(
            name,
            format!(
                "{action}: the branch needs a record of {bytes} bytes, over the log's limit of {max}; {fewer} per transaction"
            ),
        ),
        other => ResourceError::Fatal {
            resource: name.to_string(),
            message: format!("{action} to the branch log: {other}"),
        },
    }
}

/// A blob store error as a resource error: a full disk or a refused permission is `Rejected`
/// (through [`ResourceError::io`]), a failed sync or damage is `Fatal`, a missing blob is
/// `Unavailable` (replication has not shipped it yet).
pub(crate) fn blob_error(name: &str, e: JournalError) -> ResourceError {
    match e {
        JournalError::DiskFull { path } => ResourceError::io(
            name,
            "store blob",
            &path,
            &io::Error::from(io::ErrorKind::StorageFull),
        ),
        JournalError::PermissionDenied { path, source } => {
            ResourceError::io(name, "store blob", &path, &source)
        }
        JournalError::Io {
            action,
            path,
            source,
        } if action.starts_with("sync") => ResourceError::Fatal {
            resource: name.to_string(),
            message: format!("{action} {}: {source}", path.display()),
        },
        JournalError::Io {
            action,
            path,
            source,
        } => ResourceError::io(name, action, &path, &source),
        JournalError::BlobNotFound { id } => ResourceError::Unavailable {
            resource: name.to_string(),
            message: format!(
                "blob {id} is not in this resource's blob store (yet): replication ships it before replay"
            ),
        },
        other => ResourceError::Fatal {
            resource: name.to_string(),
            message: other.to_string(),
        },
    }
}

/// Copies blob `id` into `out` (the file at `path`, opened by the caller) in chunks of
/// `chunk_bytes`, then syncs it; returns the bytes copied. The blob store checks the content
/// against its id as it is read, so a damaged blob is an error, never a silently wrong file.
pub(crate) fn copy_blob_synced(
    name: &str,
    blobs: &BlobStore,
    id: &BlobId,
    out: &mut File,
    path: &Path,
    chunk_bytes: usize,
) -> Result<u64> {
    let mut reader = blobs.open_blob(id).map_err(|e| blob_error(name, e))?;
    let mut buf = vec![0u8; chunk_bytes];
    let mut copied = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(blob_error(name, reader.into_error(e))),
        };
        out.write_all(&buf[..n])
            .map_err(|e| ResourceError::io(name, "write", path, &e))?;
        copied += n as u64;
    }
    sync_file(name, out, path)?;
    Ok(copied)
}
