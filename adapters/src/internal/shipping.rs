//! Blobs shipped from one instance's store to another's: what the files and mail resources'
//! `Resource::open_blob` and `Resource::put_blob` share.
//!
//! Opening hands out the blob store's own checked reader. Putting streams the content through
//! one bounded buffer into a temp file of the private area (on the file system of the store),
//! hashing it on the way, syncs it, and compares the hash with the id it was shipped as: a
//! mismatch removes the temp file and is [`ResourceError::BlobMismatch`], so nothing of a bad
//! blob is ever under an id; a match hard-links the file into the store
//! ([`BlobStore::adopt`], which syncs the directories) and removes the temp name.
//!
//! A resource with such a store says where its store, its adoption lock and its temp files are
//! ([`BlobHolder`]); [`open_shipped`] and [`put_shipped`] are then its `open_blob` and
//! `put_blob`, run on the blocking pool, and `internal::collect::collect_blobs` its
//! `collect_blobs`.
//!
//! # Implementation caveats
//!
//! * [`open_blob`] and [`put_blob`] block: run them on the blocking pool.
//! * A blob already stored is not read again: putting it is a no-op (reading it checks it).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use journal::{BlobId, BlobStore};

use crate::internal::collect::Adoptions;
use crate::internal::instance::Instance;
use crate::internal::io::{blob_error, blocking, sync_file};
use crate::{BlobContent, ResourceError};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// Size of the one buffer a put streams through.
const CHUNK_BYTES: usize = 1 << 20;

/// A resource instance with a blob store of its own (files, mail).
pub(crate) trait BlobHolder: Instance + Send + Sync + 'static {
    /// What a panicked blocking task was, in its error ("file").
    const BLOB_TASK: &'static str;
    /// The blob store.
    fn blob_store(&self) -> &BlobStore;
    /// The adoption lock and the blobs adopted while a collection runs.
    fn adoptions(&self) -> &Adoptions;
    /// A new temp file name on the store's file system.
    fn temp_file(&self) -> PathBuf;
    /// The largest blob accepted, in bytes.
    fn blob_bytes_max(&self) -> u64;
    /// The blobs the open branches' prepare records name.
    fn blobs_in_use(&self) -> Result<HashSet<BlobId>>;
}

/// `Resource::open_blob`.
pub(crate) async fn open_shipped<I: BlobHolder>(
    inner: &Arc<I>,
    id: &BlobId,
) -> Result<BlobContent> {
    let (worker, id) = (Arc::clone(inner), *id);
    blocking(inner.name(), I::BLOB_TASK, move || {
        open_blob(worker.name(), worker.blob_store(), &id)
    })
    .await
}

/// `Resource::put_blob`: under the adoption lock, noted as adopted for a collection running
/// meanwhile; a failure poisons the instance only when it is fatal.
pub(crate) async fn put_shipped<I: BlobHolder>(
    inner: &Arc<I>,
    id: &BlobId,
    mut content: BlobContent,
) -> Result<()> {
    let _adopting = inner.adoptions().adopting().await;
    let (worker, id) = (Arc::clone(inner), *id);
    let put = blocking(inner.name(), I::BLOB_TASK, move || {
        let tmp = worker.temp_file();
        let bytes_max = worker.blob_bytes_max();
        put_blob(
            worker.name(),
            worker.blob_store(),
            &tmp,
            &id,
            &mut content,
            bytes_max,
        )?;
        worker.adoptions().note(&id);
        Ok(())
    })
    .await;
    inner.check(put)
}

/// The blob ids a redo names, each once, in order: what `Resource::redo_blobs` answers.
pub(crate) fn distinct(ids: impl IntoIterator<Item = BlobId>) -> Vec<BlobId> {
    let mut ids: Vec<BlobId> = ids.into_iter().collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Opens blob `id` of `blobs` for shipping; one that is not stored is refused.
pub(crate) fn open_blob(name: &str, blobs: &BlobStore, id: &BlobId) -> Result<BlobContent> {
    match blobs.open_blob(id) {
        Ok(reader) => Ok(Box::new(reader)),
        Err(journal::JournalError::BlobNotFound { .. }) => Err(ResourceError::rejected(
            name,
            format!("blob {id} is not in this resource's blob store"),
        )),
        Err(e) => Err(blob_error(name, e)),
    }
}

/// Puts `content`, shipped as blob `id`, into `blobs` through the temp file `tmp` (on the
/// store's file system); at most `bytes_max` bytes.
pub(crate) fn put_blob(
    name: &str,
    blobs: &BlobStore,
    tmp: &Path,
    id: &BlobId,
    content: &mut dyn Read,
    bytes_max: u64,
) -> Result<()> {
    if blobs.contains(id) {
        return Ok(());
    }
    let put = write_checked(name, tmp, id, content, bytes_max)
        .and_then(|()| blobs.adopt(tmp, id).map_err(|e| blob_error(name, e)));
    let removed = fs::remove_file(tmp);
    put?;
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ResourceError::io(name, "remove", tmp, &e)),
    }
}

/// Writes `content` to the new file `tmp`, synced, and checks that it hashes to `id`.
fn write_checked(
    name: &str,
    tmp: &Path,
    id: &BlobId,
    content: &mut dyn Read,
    bytes_max: u64,
) -> Result<()> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| ResourceError::io(name, "create", tmp, &e))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut bytes = 0u64;
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ResourceError::rejected(
                    name,
                    format!("reading the content of blob {id} failed: {e}; ship it again"),
                ));
            }
        };
        bytes += n as u64;
        if bytes > bytes_max {
            return Err(ResourceError::rejected(
                name,
                format!("blob {id} is over {bytes_max} bytes, the most this resource stores"),
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| ResourceError::io(name, "write", tmp, &e))?;
    }
    let actual = BlobId(*hasher.finalize().as_bytes());
    if actual != *id {
        return Err(ResourceError::BlobMismatch {
            resource: name.to_string(),
            expected: *id,
            actual,
            bytes,
        });
    }
    sync_file(name, &out, tmp)
}
