//! Retention: which journal segments the coordinator still needs, and removing the others.
//!
//! The journal grows with every decision; without removal, the start after a long run re-reads
//! all of history. A segment can go once nothing needs its records:
//!
//! * **Unfinished transactions** pin their decision record: a `Commit` until phase 2 has ended
//!   (every branch acknowledged), a `OnePhase` record until its `End` or `Abort` is durable.
//!   Recovery at the next start needs exactly those records and nothing older. At open,
//!   recovery pins every transaction the ledger calls unfinished — also one it cannot drive (a
//!   resource not configured) — and every decided transaction of which a resource still holds
//!   a prepared branch (committed again, as a heuristic hazard, while the pin holds its
//!   decision); the orphan sweeper pins a decided branch it finds undriven. A transaction
//!   pins from the moment its decision is queued: before the journal assigns the record its
//!   LSN, the pin is the lowest LSN it can get (the durable LSN plus one, read before the
//!   append), and it is narrowed to the record's own LSN once that is durable (`Pins`).
//! * **The retention floor** holds everything from an LSN on for other parts of concord: a
//!   standby holds it at the LSN it has acknowledged, so that records (and the blobs they name)
//!   stay until it has them ([`Retention::hold_floor`]).
//! * Records not yet durable are never below the bound (it is at most the durable LSN plus one).
//!
//! Every `checkpoint_ms` the coordinator removes the whole segments below the lowest of these
//! ([`journal::Journal::remove_segments_below`], oldest first, each removal synced; the segment
//! being written is never removed), and once more at shutdown. Each checkpoint also asks the
//! journal to start a new segment with the next record once the current one holds
//! [`ROLL_BYTES_MIN`], so that finished records do not wait in a filling segment: a start reads
//! about what was written since the last checkpoint, whatever the history before it. The `End` record of a two-phase
//! transaction needs no durability before its pin goes: it is appended after every branch
//! acknowledged, so if a crash loses it together with an already removed `Commit`, the
//! transaction is over in every resource and nothing is left for recovery to do.
//!
//! **Blobs.** A resource's redo may name blobs (large file content, large messages) kept in the
//! resource's blob store so that a standby can fetch them with the record. A blob can go once no
//! retained record names it and no branch of the resource still needs it. The resource decides
//! the second part and removes (`Resource::collect_blobs`, whose docs give the race analysis);
//! the coordinator answers the first ([`JournalBlobs`]: every blob the retained journal's
//! `Commit` and `OnePhase` records name for that resource, read when the resource asks, after
//! its own snapshot). Every record still in the journal counts, so what the retention floor
//! holds for a standby keeps its blobs too. The checkpointer asks every resource to collect
//! every `blob_collect_ms`.
//!
//! # Implementation caveats
//!
//! * A transaction that stays unfinished (a resource down for days) pins every segment from its
//!   decision on; `concord txn list` shows it, and `txn resolve` (with `--forget` for a resource
//!   lost for good) ends it.
//! * Presumed abort has a horizon: once a committed transaction's records are removed, a
//!   prepared branch of it brought back later by a resource restored from an old backup looks
//!   undecided and is rolled back (`docs/failure-model.md`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use adapters::{BlobId, Lsn, Resource, ResourceError, RetainedBlobs, Xid};
use journal::{Journal, JournalError};

use crate::record::CoordRecord;

/// The least a segment holds before a checkpoint has the journal start the next one: what a
/// start reads of finished transactions is about what was written since the last checkpoint,
/// or this, whichever is more — not a whole 16 MiB segment.
pub const ROLL_BYTES_MIN: u64 = 1 << 20;

/// The decision records unfinished transactions pin. Each pin has an owner — a machine driving
/// the transaction, recovery for a transaction nothing can drive yet, the orphan sweeper for a
/// decided branch it reports — and one transaction may have several (recovery may drive one
/// xid with more than one machine), so a pin is taken and let go by its [`PinId`].
#[derive(Debug, Default)]
pub(crate) struct Pins {
    inner: Mutex<PinTable>,
}

#[derive(Debug, Default)]
struct PinTable {
    next: u64,
    by_id: HashMap<u64, (Xid, Lsn)>,
}

/// One pin, to narrow or let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PinId(u64);

impl Pins {
    /// Pins `xid`'s records from `lsn` on.
    pub(crate) fn pin(&self, xid: Xid, lsn: Lsn) -> PinId {
        let mut table = self.lock();
        table.next += 1;
        let id = table.next;
        table.by_id.insert(id, (xid, lsn));
        PinId(id)
    }

    /// Moves a pin to `lsn` (a lower bound narrowed to its record's LSN).
    pub(crate) fn narrow(&self, pin: PinId, lsn: Lsn) {
        if let Some(entry) = self.lock().by_id.get_mut(&pin.0) {
            entry.1 = lsn;
        }
    }

    /// Lets one pin go.
    pub(crate) fn unpin(&self, pin: PinId) {
        self.lock().by_id.remove(&pin.0);
    }

    /// Lets every pin of `xid` go (an operator ended the transaction).
    pub(crate) fn unpin_xid(&self, xid: &Xid) {
        self.lock().by_id.retain(|_, (x, _)| x != xid);
    }

    /// The lowest LSN pinned.
    pub(crate) fn oldest(&self) -> Option<Lsn> {
        self.lock().by_id.values().map(|(_, lsn)| *lsn).min()
    }

    /// How many pins there are.
    pub(crate) fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PinTable> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What bounds the removal of journal segments; see the module docs.
#[derive(Debug)]
pub struct Retention {
    pub(crate) pins: Pins,
    /// The retention floor (`u64::MAX`: none held).
    floor: AtomicU64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            pins: Pins::default(),
            floor: AtomicU64::new(u64::MAX),
        }
    }
}

impl Retention {
    /// Holds every record from `lsn` on (a standby's acknowledged LSN plus one); `None` lets
    /// the floor go.
    pub fn hold_floor(&self, lsn: Option<Lsn>) {
        self.floor
            .store(lsn.map_or(u64::MAX, |l| l.0), Ordering::Release);
    }

    /// The retention floor held, if any.
    pub fn floor(&self) -> Option<Lsn> {
        match self.floor.load(Ordering::Acquire) {
            u64::MAX => None,
            lsn => Some(Lsn(lsn)),
        }
    }

    /// The lowest LSN the journal must keep, given its durable LSN.
    pub fn keep_from(&self, durable: Lsn) -> Lsn {
        let mut keep = durable.next();
        if let Some(pinned) = self.pins.oldest() {
            keep = keep.min(pinned);
        }
        if let Some(floor) = self.floor() {
            keep = keep.min(floor);
        }
        keep
    }

    /// Removes the journal's whole segments below [`Retention::keep_from`]; returns how many.
    /// Blocking (file removals and directory syncs): not on a runtime thread.
    pub fn checkpoint(&self, journal: &Journal) -> Result<usize, JournalError> {
        let keep_from = self.keep_from(journal.durable_lsn());
        let removed = journal.remove_segments_below(keep_from)?;
        // Whole segments only: so that what finished since does not wait in the segment being
        // written until it fills, the next record starts a new one once this one holds
        // `ROLL_BYTES_MIN`.
        journal.request_roll(ROLL_BYTES_MIN);
        if removed > 0 {
            tracing::debug!(
                removed,
                keep_from = keep_from.0,
                pinned = self.pins.len(),
                "checkpoint removed journal segments"
            );
        }
        Ok(removed)
    }
}

/// The blobs a resource's records in the retained journal name: what [`Resource::collect_blobs`]
/// must keep for the coordinator's sake. Read when asked, on the blocking pool.
pub struct JournalBlobs {
    journal: Arc<dyn JournalSource>,
    resource: Arc<dyn Resource>,
}

/// Where [`JournalBlobs`] reads the journal (the coordinator's, shared with its runtime).
pub(crate) trait JournalSource: Send + Sync {
    fn journal(&self) -> &Journal;
}

impl JournalBlobs {
    pub(crate) fn new(journal: Arc<dyn JournalSource>, resource: Arc<dyn Resource>) -> Self {
        JournalBlobs { journal, resource }
    }

    /// The blobs `journal`'s retained records name for `resource` (a standby's journal: its
    /// unreplayed records keep their blobs).
    pub fn of(journal: Arc<Journal>, resource: Arc<dyn Resource>) -> Self {
        JournalBlobs { journal, resource }
    }
}

impl JournalSource for Journal {
    fn journal(&self) -> &Journal {
        self
    }
}

#[async_trait::async_trait]
impl RetainedBlobs for JournalBlobs {
    async fn retained_blobs(&self) -> Result<HashSet<BlobId>, ResourceError> {
        let journal = Arc::clone(&self.journal);
        let resource = Arc::clone(&self.resource);
        let name = resource.name().to_string();
        tokio::task::spawn_blocking(move || named_blobs(journal.journal(), &*resource))
            .await
            .map_err(|e| ResourceError::Unavailable {
                resource: name,
                message: format!("read the journal for the blobs it names: {e}"),
            })?
    }
}

/// Every blob that `resource`'s redo in the retained journal names.
fn named_blobs(
    journal: &Journal,
    resource: &dyn Resource,
) -> Result<HashSet<BlobId>, ResourceError> {
    let name = resource.name();
    let unreadable = |e: &dyn std::fmt::Display| ResourceError::Unavailable {
        resource: name.to_string(),
        message: format!("read the journal for the blobs it names: {e}"),
    };
    let mut named = HashSet::new();
    for record in journal
        .read_from(journal.oldest_lsn())
        .map_err(|e| unreadable(&e))?
    {
        let record = record.map_err(|e| unreadable(&e))?;
        let redo =
            match CoordRecord::decode(record.kind, &record.payload).map_err(|e| unreadable(&e))? {
                CoordRecord::Commit { branches, .. } => branches
                    .into_iter()
                    .filter(|(resource, _)| resource == name)
                    .map(|(_, redo)| redo)
                    .collect(),
                CoordRecord::OnePhase {
                    resource: r, redo, ..
                } if r == name => vec![redo],
                _ => Vec::new(),
            };
        for redo in redo {
            named.extend(resource.redo_blobs(&redo)?);
        }
    }
    Ok(named)
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::Epoch;

    fn xid(seq: u64) -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(1),
            seq,
        }
    }

    #[test]
    fn the_bound_is_the_lowest_of_pins_floor_and_what_is_durable() {
        let r = Retention::default();
        assert_eq!(r.keep_from(Lsn(10)), Lsn(11));
        let one = r.pins.pin(xid(1), Lsn(4));
        let two = r.pins.pin(xid(2), Lsn(7));
        assert_eq!(r.keep_from(Lsn(10)), Lsn(4));
        r.pins.narrow(one, Lsn(5));
        assert_eq!(r.keep_from(Lsn(10)), Lsn(5), "a pin narrowed to its record");
        // A second owner of the same xid keeps it pinned when the first lets go.
        let again = r.pins.pin(xid(1), Lsn(5));
        r.pins.unpin(one);
        assert_eq!(r.keep_from(Lsn(10)), Lsn(5));
        r.hold_floor(Some(Lsn(2)));
        assert_eq!(r.keep_from(Lsn(10)), Lsn(2));
        r.hold_floor(None);
        r.pins.unpin_xid(&xid(1));
        r.pins.unpin(two);
        assert_eq!(r.keep_from(Lsn(10)), Lsn(11));
        let _ = again;
    }
}
