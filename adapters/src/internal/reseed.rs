//! Re-seeding a standby, key by key: what the files, mail and kv resources' `read_entry`,
//! `write_entry`, `remove_entry` and `set_applied_lsn` share.
//!
//! A standby that fell behind the primary's retention bound gets a copy of the primary's
//! content, keyed as the inventory keys it (`Resource::inventory`), and its applied LSN is set
//! to the position P replay restarts after. Each resource says how a key is read, written and
//! removed ([`Reseed`]); the shells here make every call the same around that:
//!
//! * the instance must be usable (not poisoned), and for a change (write, remove, applied LSN)
//!   hold **no prepared branch**: a standby has none, and a branch prepared here would be
//!   resolved against content the copy replaced (the refusal says to resolve it first). A read
//!   is not refused: it runs on the primary, which has prepared branches whenever
//!   transactions are in flight, and a prepared branch has changed nothing a read sees;
//! * a change (write, remove, applied LSN) holds the replay lock (the shell's `replaying`), so
//!   it never interleaves with a replay batch, and runs the resource's work on the blocking
//!   pool; a fatal failure poisons the instance, as for every other call;
//! * [`set_applied_lsn`] stores the LSN durably, then sets it in memory — also lower than the
//!   current one (replay restarts from P + 1).
//!
//! [`stream_to_synced`] is the one bounded copy that the files and mail resources' writes use:
//! the content streams through one buffer into a new temp file, which is synced, so an entry
//! of any size costs one buffer of memory.
//!
//! # Implementation caveats
//!
//! * Reading takes no lock: the reader returned sees the content as it is while it is read.
//! * Active (not prepared) branches are not refused; their locks are not taken here. A standby
//!   runs none.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::internal::instance::{Instance, InstanceState};
use crate::internal::io::{blocking, sync_file};
use crate::internal::lifecycle::Lifecycle;
use crate::{BlobContent, Lsn, ResourceError};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// Size of the one buffer [`stream_to_synced`] copies through.
const CHUNK_BYTES: usize = 1 << 20;

/// The re-seeding steps that are a resource's own (blocking; run on the blocking pool).
pub(crate) trait Reseed: Lifecycle {
    /// The content under `key`, `None` when absent; a malformed key is refused.
    fn read_key(&self, key: &str) -> Result<Option<BlobContent>>;
    /// Sets `key` to `content`, durably.
    fn write_key(&self, key: &str, content: BlobContent) -> Result<()>;
    /// Removes `key` (absent: fine), durably.
    fn remove_key(&self, key: &str) -> Result<()>;
    /// Stores `lsn` as the applied LSN, durably (also a lower one).
    fn store_applied_lsn(&self, lsn: Lsn) -> Result<()>;
    /// Runs before a change, holding the replay lock (files: a checkpoint, so that no commit
    /// applied again at open undoes what the change writes).
    fn before_change(self: &Arc<Self>) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// Refuses while the instance is poisoned or holds prepared branches.
pub(crate) fn check_no_prepared<I: Instance>(inner: &I) -> Result<()> {
    let prepared = inner.usable_state(|st| st.prepared())?;
    match prepared.first() {
        None => Ok(()),
        Some(xid) => Err(inner.rejected(format!(
            "cannot be re-seeded while it holds prepared branches ({} of them, e.g. {xid}): a standby has none; resolve them first (concord resolve)",
            prepared.len()
        ))),
    }
}

/// `Resource::read_entry`.
pub(crate) async fn read_entry<I: Reseed>(
    inner: &Arc<I>,
    key: &str,
) -> Result<Option<BlobContent>> {
    inner.usable_state(|_| ())?;
    let (worker, key) = (Arc::clone(inner), key.to_string());
    let read = blocking(inner.name(), I::TASK, move || worker.read_key(&key)).await;
    inner.check(read)
}

/// `Resource::write_entry`.
pub(crate) async fn write_entry<I: Reseed>(
    inner: &Arc<I>,
    key: &str,
    content: BlobContent,
) -> Result<()> {
    let (worker, key) = (Arc::clone(inner), key.to_string());
    change(inner, move || worker.write_key(&key, content)).await
}

/// `Resource::remove_entry`.
pub(crate) async fn remove_entry<I: Reseed>(inner: &Arc<I>, key: &str) -> Result<()> {
    let (worker, key) = (Arc::clone(inner), key.to_string());
    change(inner, move || worker.remove_key(&key)).await
}

/// `Resource::set_applied_lsn`: stored durably, then set in memory (not raised: set).
pub(crate) async fn set_applied_lsn<I: Reseed>(inner: &Arc<I>, lsn: Lsn) -> Result<()> {
    let worker = Arc::clone(inner);
    let _replaying = inner.shell().replaying.lock().await;
    check_no_prepared(&**inner)?;
    let stored = blocking(inner.name(), I::TASK, move || worker.store_applied_lsn(lsn)).await;
    inner.check(stored)?;
    let mut st = inner.state();
    st.shared_mut().applied_lsn = lsn;
    drop(st);
    tracing::info!(resource = %inner.name(), %lsn, "applied lsn set for a re-seed");
    Ok(())
}

/// One change of a re-seed: under the replay lock, refused while branches are prepared.
async fn change<I: Reseed>(
    inner: &Arc<I>,
    work: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<()> {
    let _replaying = inner.shell().replaying.lock().await;
    check_no_prepared(&**inner)?;
    inner.before_change().await?;
    let done = blocking(inner.name(), I::TASK, work).await;
    inner.check(done)
}

/// Streams `content` into the new file `tmp` through one buffer, refusing more than
/// `bytes_max` bytes, and syncs it; `key` names the entry in errors. On failure `tmp` is
/// removed. The synced file and the bytes written.
pub(crate) fn stream_to_synced(
    name: &str,
    key: &str,
    mut content: BlobContent,
    tmp: &Path,
    bytes_max: u64,
) -> Result<(File, u64)> {
    let copied = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| ResourceError::io(name, "create", tmp, &e))
        .and_then(|mut file| {
            let bytes = copy_bounded(name, key, &mut content, &mut file, tmp, bytes_max)?;
            sync_file(name, &file, tmp)?;
            Ok((file, bytes))
        });
    if copied.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    copied
}

/// Copies `content` into `file` (at `path`) through one `CHUNK_BYTES` buffer; more than
/// `bytes_max` bytes are refused.
fn copy_bounded(
    name: &str,
    key: &str,
    content: &mut BlobContent,
    file: &mut File,
    path: &Path,
    bytes_max: u64,
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(content_unreadable(name, key, &e)),
        };
        total += n as u64;
        if total > bytes_max {
            return Err(ResourceError::rejected(
                name,
                format!("entry {key:?}: the content is over the limit of {bytes_max} bytes"),
            ));
        }
        file.write_all(&buf[..n])
            .map_err(|e| ResourceError::io(name, "write", path, &e))?;
    }
}

/// The content to write could not be read (the source failed): try again.
pub(crate) fn content_unreadable(name: &str, key: &str, e: &io::Error) -> ResourceError {
    ResourceError::Unavailable {
        resource: name.to_string(),
        message: format!(
            "entry {key:?}: reading the content to write failed ({e}); nothing was changed, write it again"
        ),
    }
}
