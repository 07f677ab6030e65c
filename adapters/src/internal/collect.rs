//! Blob collection, the part the files and mail resources share: the adoption lock, the blobs
//! adopted since a collection started, and the order of its steps.
//!
//! A collection (`Resource::collect_blobs`) removes every blob of a resource's store that no
//! retained coordinator record names and no branch still needs. Its steps, in this order (the
//! reasoning is in `docs/journal-format.md`, "Collection in a resource's blob store"):
//!
//! 1. **snapshot** — with the adoption lock held exclusively, so that no prepare is between its
//!    adoption and the moment its entries are in the resource's state: the stored blobs and the
//!    blobs the open branches need. From before this step, every adoption notes its id
//!    ([`Adoptions::note`]);
//! 2. **the coordinator's set** ([`RetainedBlobs::retained_blobs`]), asked only now;
//! 3. **settle** — what the resource must make durable first (the files resource checkpoints
//!    its branch log, so that no commit before the snapshot is applied again at open);
//! 4. **remove** — with the adoption lock held exclusively: every stored blob of the snapshot
//!    not in use then, not retained and not adopted since.
//!
//! # Implementation caveats
//!
//! * One collection at a time per instance; a second waits.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use journal::BlobId;
use tokio::sync::RwLockReadGuard;

use crate::internal::instance::lock;
use crate::internal::io::{blob_error, blocking};
use crate::internal::shipping::BlobHolder;
use crate::{BlobsCollected, ResourceError, RetainedBlobs};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// The adoption lock and the blobs adopted while a collection runs.
#[derive(Default)]
pub(crate) struct Adoptions {
    /// Held shared by every adoption until the adopting branch's entries are in the state (and
    /// by a `put_blob`), exclusively by a collection's snapshot and removal.
    lock: tokio::sync::RwLock<()>,
    /// While a collection runs: every blob adopted (or found already stored) since it started.
    since: Mutex<Option<HashSet<BlobId>>>,
    /// One collection at a time.
    collecting: tokio::sync::Mutex<()>,
}

impl Adoptions {
    /// The adoption lock, shared: hold it from before an adoption until its branch's entries
    /// are in the state.
    pub(crate) async fn adopting(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().await
    }

    /// Notes that blob `id` was adopted (or found stored) for a branch or a shipment, for a
    /// collection running now.
    pub(crate) fn note(&self, id: &BlobId) {
        if let Some(since) = lock(&self.since).as_mut() {
            since.insert(*id);
        }
    }

    /// Runs a collection: `snapshot` returns the stored blobs and those in use; `settle` runs
    /// after the coordinator's set was asked for; `remove` removes the blobs it is given and
    /// returns how many were there.
    pub(crate) async fn collect<S, T, R, RF>(
        &self,
        retained: &dyn RetainedBlobs,
        snapshot: S,
        settle: T,
        remove: R,
    ) -> Result<BlobsCollected>
    where
        S: Future<Output = Result<(Vec<BlobId>, HashSet<BlobId>)>>,
        T: Future<Output = Result<()>>,
        R: FnOnce(Vec<BlobId>) -> RF,
        RF: Future<Output = Result<u64>>,
    {
        let _one = self.collecting.lock().await;
        *lock(&self.since) = Some(HashSet::new());
        let collected = self.steps(retained, snapshot, settle, remove).await;
        *lock(&self.since) = None;
        collected
    }

    async fn steps<S, T, R, RF>(
        &self,
        retained: &dyn RetainedBlobs,
        snapshot: S,
        settle: T,
        remove: R,
    ) -> Result<BlobsCollected>
    where
        S: Future<Output = Result<(Vec<BlobId>, HashSet<BlobId>)>>,
        T: Future<Output = Result<()>>,
        R: FnOnce(Vec<BlobId>) -> RF,
        RF: Future<Output = Result<u64>>,
    {
        let (stored, in_use) = {
            let _quiet = self.lock.write().await;
            snapshot.await?
        };
        let retained = retained.retained_blobs().await?;
        settle.await?;
        let _quiet = self.lock.write().await;
        let since = lock(&self.since).take().unwrap_or_default();
        let doomed: Vec<BlobId> = stored
            .iter()
            .filter(|id| !in_use.contains(id) && !retained.contains(id) && !since.contains(id))
            .copied()
            .collect();
        let removed = remove(doomed).await?;
        Ok(BlobsCollected {
            removed,
            kept: stored.len() as u64 - removed,
        })
    }
}

/// `Resource::collect_blobs` of a resource with a blob store: the snapshot is the stored blobs
/// and those the open branches' prepare records name; `settle` is the resource's step 3.
pub(crate) async fn collect_blobs<I: BlobHolder>(
    inner: &Arc<I>,
    retained: &dyn RetainedBlobs,
    settle: impl Future<Output = Result<()>>,
) -> Result<BlobsCollected> {
    let snapshot = async {
        let in_use = inner.blobs_in_use()?;
        let worker = Arc::clone(inner);
        let stored = blocking(inner.name(), I::BLOB_TASK, move || {
            worker
                .blob_store()
                .list()
                .map_err(|e| blob_error(worker.name(), e))
        })
        .await?;
        Ok((stored, in_use))
    };
    let remove = |doomed: Vec<BlobId>| async move {
        let worker = Arc::clone(inner);
        let removed = blocking(inner.name(), I::BLOB_TASK, move || {
            remove_blobs(worker.name(), worker.blob_store(), &doomed)
        })
        .await;
        inner.check(removed)
    };
    let collected = inner
        .adoptions()
        .collect(retained, snapshot, settle, remove)
        .await?;
    tracing::info!(resource = %inner.name(), removed = collected.removed, kept = collected.kept, "blobs collected");
    Ok(collected)
}

/// Removes `doomed` from `blobs` (blocking); how many were there.
pub(crate) fn remove_blobs(
    name: &str,
    blobs: &journal::BlobStore,
    doomed: &[BlobId],
) -> Result<u64> {
    let mut removed = 0u64;
    for id in doomed {
        if blobs
            .remove(id)
            .map_err(|e| crate::internal::io::blob_error(name, e))?
        {
            removed += 1;
        }
    }
    Ok(removed)
}
