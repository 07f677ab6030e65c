//! Checkpoints of the branch log, and blob collection, which settles by them.
//!
//! A commit syncs nothing; the commits the log records after its last **checkpoint** are
//! applied again at open. A checkpoint — a `syncfs` of the root's file system (which writes out
//! directories as well as contents), then a `CHECKPOINT(upto)` record — makes every commit whose
//! `COMMITTED` is below `upto` durable in the tree, and trims the log: branches still prepared
//! since the previous checkpoint have their `PREPARED` carried forward, and the segments below the
//! oldest record still needed are removed (see the `log` module). It runs about once a second
//! (`CHECKPOINT_INTERVAL`) or every half segment while commits happen, once before a replay
//! that follows a commit (a commit applied again at open must not undo what a replay wrote), and
//! twice in a blob collection (`Inner::collect`): the second covers every commit appended before
//! the collection's snapshot, whose blobs are then no longer needed.
//!
//! # Implementation caveats
//!
//! * `syncfs` flushes every dirty page of the root's file system, other programs' too, and only
//!   that file system (keep the tree on one).
//! * One checkpoint at a time (`checkpointing`); a commit that finds one running skips its own.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use journal::{BlobId, Lsn};

use super::{FEWER, Inner, RedoEntry, TASK, log};
use crate::internal::collect::collect_blobs;
use crate::internal::instance::{Instance, lock};
use crate::internal::io::{blocking, log_error};
use crate::{BlobsCollected, ResourceError, RetainedBlobs};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// A checkpoint of the branch log runs at most this long after the last one, while commits
/// happen.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Where the last checkpoint of the branch log left off.
pub(super) struct Checkpoints {
    /// Bytes appended to the log (since open) when the last checkpoint started.
    pub(super) at_bytes: u64,
    /// The log's durable LSN when the last checkpoint started: a branch prepared below it and
    /// still prepared is carried forward by the next one.
    pub(super) at_lsn: Lsn,
    /// When the last checkpoint started.
    pub(super) at: std::time::Instant,
    /// The `upto` of the last checkpoint that completed: commits below it are durable.
    pub(super) covered: Lsn,
    /// The LSN of the last `COMMITTED` record known durable.
    pub(super) last_commit: Lsn,
}

impl Inner {
    /// Runs a checkpoint (see the `log` module) when the last one is a second old or about half
    /// a segment was appended since; one at a time.
    pub(super) async fn maybe_checkpoint(self: &Arc<Self>) -> Result<()> {
        let Ok(_running) = self.checkpointing.try_lock() else {
            return Ok(());
        };
        let appended = self.log.stats().bytes;
        {
            let last = lock(&self.checkpoints);
            let due = appended.saturating_sub(last.at_bytes) >= log::SEGMENT_BYTES_MAX / 2
                || last.at.elapsed() >= CHECKPOINT_INTERVAL;
            if !due {
                return Ok(());
            }
        }
        self.run_checkpoint().await
    }

    /// Runs a checkpoint now when a commit is not covered by one yet (before a replay: a commit
    /// the log would apply again at open must not undo what a replay writes after it).
    pub(super) async fn checkpoint_commits(self: &Arc<Self>) -> Result<()> {
        let _running = self.checkpointing.lock().await;
        {
            let last = lock(&self.checkpoints);
            if last.last_commit == Lsn::ZERO || last.last_commit < last.covered {
                return Ok(());
            }
        }
        self.run_checkpoint().await
    }

    /// One checkpoint on the blocking pool; the caller holds `checkpointing`.
    pub(super) async fn run_checkpoint(self: &Arc<Self>) -> Result<()> {
        let since = {
            let mut last = lock(&self.checkpoints);
            let since = last.at_lsn;
            last.at_bytes = self.log.stats().bytes;
            last.at_lsn = self.log.durable_lsn();
            last.at = std::time::Instant::now();
            since
        };
        let worker = self.clone();
        let result = blocking(&self.name, TASK, move || worker.checkpoint(since)).await;
        self.check(result)
    }

    /// One checkpoint (see the `log` module): `syncfs`, then `CHECKPOINT(upto)`, then the
    /// trim. `since` is the durable LSN at the previous checkpoint: a branch prepared below it
    /// and still prepared has its prepare record carried forward.
    pub(super) fn checkpoint(&self, since: Lsn) -> Result<()> {
        // Every `COMMITTED` below `upto` was appended after its files were in place, so the
        // `syncfs` below, which starts later, makes them durable. Commits racing it have their
        // record at or above `upto` and are redone after a crash.
        let carry_error = |e| log_error(&self.name, FEWER, "carry a prepare record forward", e);
        let trim =
            log::start_trim(&self.log, &self.state().branches, since).map_err(carry_error)?;
        let upto = trim.upto;
        rustix::fs::syncfs(&self.fs)
            .map_err(|e| self.fatal(format!("syncfs {}: {e}", self.root.display())))?;
        // Kept: every branch that was open when the checkpoint started (one that committed
        // since may be redone from its prepare record), and everything from `upto` on.
        let floor = trim
            .carried(|xid, lsn| self.set_log_floor(xid, lsn))
            .map_err(carry_error)?;
        self.log
            .append(
                log::LOG_EPOCH,
                log::CHECKPOINT,
                &log::checkpoint_payload(upto),
            )
            .and_then(journal::Appending::wait)
            .map_err(|e| log_error(&self.name, FEWER, "append a checkpoint", e))?;
        {
            let mut last = lock(&self.checkpoints);
            last.covered = last.covered.max(upto);
        }
        let removed = self
            .log
            .remove_segments_below(floor)
            .map_err(|e| log_error(&self.name, FEWER, "remove old segments", e))?;
        tracing::debug!(resource = %self.name, %upto, %floor, removed, "branch log checkpoint");
        Ok(())
    }

    /// A blob collection (`internal::collect`): settling checkpoints the branch log twice —
    /// the first checkpoint's own record makes every record appended before it durable, so the
    /// second covers every commit appended before the snapshot, which is then no longer applied
    /// again at open and needs no blob.
    pub(super) async fn collect(
        self: &Arc<Self>,
        retained: &dyn RetainedBlobs,
    ) -> Result<BlobsCollected> {
        let settle = async {
            let _running = self.checkpointing.lock().await;
            self.run_checkpoint().await?;
            self.run_checkpoint().await
        };
        collect_blobs(self, retained, settle).await
    }

    /// Remembers, for a collection running now, that blob `id` is in use by an adoption that
    /// its snapshot did not see.
    pub(super) fn note_adopted(&self, id: &BlobId) {
        self.adoptions.note(id);
    }

    /// The blobs the open branches' prepare records name.
    pub(super) fn blobs_in_use(&self) -> Result<HashSet<BlobId>> {
        self.usable_state(|st| {
            st.branches
                .iter()
                .filter_map(|(_, _, branch)| branch.prepared.as_ref())
                .flat_map(|entries| entries.iter())
                .filter_map(|entry| match entry {
                    RedoEntry::Put { id, .. } => Some(*id),
                    _ => None,
                })
                .collect()
        })
    }
}
