//! The branch log of a files resource: which branches are prepared, and with what.
//!
//! A prepare must survive a crash on its own (the coordinator may have decided to commit), and
//! concurrent branches prepare at the same moment. Giving each branch a manifest file of its own
//! costs each one a file sync and a sync of one shared directory, one after the other; appending
//! one record per branch to a log that is group-committed (the [`journal`] crate's [`Journal`])
//! makes many prepares durable with one `fdatasync`. So the log is the prepare:
//!
//! * `PREPARED(xid, redo)` — appended by prepare and waited for: the branch is prepared once it
//!   is durable. The redo is the branch's entries in the redo encoding of the files module
//!   (content inline for small files, blob ids for the others, deletes).
//! * `COMMITTED(xid)` and `ROLLED_BACK(xid)` — appended when a branch is resolved, after its
//!   files are in place, and waited for before the resolution returns (the coordinator may
//!   forget the transaction afterwards). Appended under the resource's state lock, before the
//!   branch's locks are released.
//! * `CHECKPOINT(upto)` — appended after a `syncfs` of the root's file system: every commit whose
//!   `COMMITTED` record is below `upto` has its files durable in the tree.
//!
//! The live branches are those with a `PREPARED` and no resolution after it. A commit puts its
//! files in place and syncs nothing, leaving their durability — names and contents — to the
//! log: the `PREPARED` record holds the whole redo, and the commits at or after the last checkpoint
//! are applied again when the resource opens (in commit order, so the last writer of a path
//! wins, as it did). A checkpoint runs about once a second while commits happen; it also
//! trims the log: a branch still prepared from before the previous checkpoint gets its
//! `PREPARED` appended again (carried forward), then every segment below the oldest record
//! still needed — by a prepared branch, by a commit that may still be redone, or the
//! checkpoint's own `upto` — is removed. A carried record is appended under the resource's
//! state lock, like every resolution, so a resolution always follows the copy it resolves.
//!
//! Record payloads (version 1): the xid as node u32 LE, epoch u64 LE and seq u64 LE (20 bytes),
//! then for `PREPARED` the redo; for `CHECKPOINT`, `upto` as u64 LE. Records are written in
//! epoch 0: the log is private to the resource, and fencing is the resource's own state. The
//! shared records, their payloads and how a log is opened and scanned are in
//! `internal::branch_log` (the mail resource keeps the same log, without checkpoints).

use std::collections::HashMap;
use std::path::Path;

use journal::{Journal, Lsn, RecordKind};

use crate::Xid;
use crate::internal::branch_log::{self, Record, Replayed};
pub(super) use crate::internal::branch_log::{
    LOG_EPOCH, Logged, OpenError, SEGMENT_BYTES_MAX, append_resolution, log_open_error, start_trim,
};

/// Every commit whose `COMMITTED` record is below an LSN has its files durable in the tree.
pub(super) const CHECKPOINT: RecordKind = RecordKind::new(4, 1);

/// The payload of a `CHECKPOINT` record.
pub(super) fn checkpoint_payload(upto: Lsn) -> Vec<u8> {
    upto.0.to_le_bytes().to_vec()
}

/// What a log says, built record by record in LSN order.
#[derive(Default)]
pub(super) struct Live {
    /// The prepared branches: xid → (LSN of its latest `PREPARED`, its redo).
    pub(super) branches: HashMap<Xid, (Lsn, Vec<u8>)>,
    /// The commits whose files may not be durable yet — those at or after the last checkpoint —
    /// in commit order: (LSN of the `COMMITTED` record, xid, redo).
    pub(super) committed: Vec<(Lsn, Xid, Vec<u8>)>,
}

impl Replayed for Live {
    fn apply(&mut self, lsn: Lsn, kind: RecordKind, payload: &[u8]) -> Result<(), String> {
        if kind == CHECKPOINT {
            let upto: [u8; 8] = payload.try_into().map_err(|_| {
                format!(
                    "record {lsn}: checkpoint of {} bytes, 8 expected",
                    payload.len()
                )
            })?;
            let upto = Lsn(u64::from_le_bytes(upto));
            self.committed.retain(|(at, _, _)| *at >= upto);
            return Ok(());
        }
        match branch_log::decode(lsn, kind, payload)? {
            Record::Prepared(xid, redo) => {
                self.branches.insert(xid, (lsn, redo.to_vec()));
            }
            // A resolution whose prepare record was trimmed away needs nothing: the trim came
            // after a checkpoint that covered it.
            Record::Resolved { xid, committed } => {
                if let Some((_, redo)) = self.branches.remove(&xid)
                    && committed
                {
                    self.committed.push((lsn, xid, redo));
                }
            }
        }
        Ok(())
    }

    fn branches(self) -> HashMap<Xid, (Lsn, Vec<u8>)> {
        self.branches
    }
}

/// Opens the log in `dir` (created if missing) and reads its live branches.
pub(super) fn open(dir: &Path) -> Result<(Journal, Live), OpenError> {
    branch_log::open(dir)
}

/// The xids live in the log in `dir`, read without opening it (see `internal::branch_log`).
pub(super) fn live_on_disk(dir: &Path) -> Result<Vec<Xid>, OpenError> {
    branch_log::live_on_disk::<Live>(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal::branch_log::{
        COMMITTED, PREPARED, ROLLED_BACK, prepared_payload, resolved_payload,
    };
    use journal::Epoch;

    fn xid(seq: u64) -> Xid {
        Xid {
            node: 7,
            epoch: Epoch(3),
            seq,
        }
    }

    #[test]
    fn payloads_round_trip_and_resolutions_end_a_branch() {
        let mut live = Live::default();
        live.apply(Lsn(1), PREPARED, &prepared_payload(&xid(1), b"redo-1"))
            .unwrap();
        live.apply(Lsn(2), PREPARED, &prepared_payload(&xid(2), b"redo-2"))
            .unwrap();
        live.apply(Lsn(3), COMMITTED, &resolved_payload(&xid(1)))
            .unwrap();
        live.apply(Lsn(4), PREPARED, &prepared_payload(&xid(2), b"redo-2"))
            .unwrap();
        assert_eq!(live.branches.len(), 1);
        assert_eq!(live.branches[&xid(2)], (Lsn(4), b"redo-2".to_vec()));
        live.apply(Lsn(5), ROLLED_BACK, &resolved_payload(&xid(2)))
            .unwrap();
        assert!(live.branches.is_empty());
        assert_eq!(live.committed, vec![(Lsn(3), xid(1), b"redo-1".to_vec())]);
    }

    #[test]
    fn a_checkpoint_ends_the_redo_of_the_commits_below_it() {
        let mut live = Live::default();
        for seq in 1..=3 {
            let payload = prepared_payload(&xid(seq), format!("redo-{seq}").as_bytes());
            live.apply(Lsn(seq), PREPARED, &payload).unwrap();
        }
        live.apply(Lsn(4), COMMITTED, &resolved_payload(&xid(1)))
            .unwrap();
        live.apply(Lsn(5), COMMITTED, &resolved_payload(&xid(2)))
            .unwrap();
        // Started when 4 was the last durable record: the commit at 5 may have raced it.
        live.apply(Lsn(6), CHECKPOINT, &checkpoint_payload(Lsn(5)))
            .unwrap();
        live.apply(Lsn(7), COMMITTED, &resolved_payload(&xid(3)))
            .unwrap();
        let redone: Vec<Lsn> = live.committed.iter().map(|(lsn, _, _)| *lsn).collect();
        assert_eq!(redone, vec![Lsn(5), Lsn(7)]);
        assert!(live.apply(Lsn(8), CHECKPOINT, b"short").is_err());
    }

    #[test]
    fn malformed_records_are_refused() {
        let mut live = Live::default();
        assert!(live.apply(Lsn(1), PREPARED, b"short").is_err());
        let mut resolved = resolved_payload(&xid(1));
        resolved.push(0);
        assert!(live.apply(Lsn(2), COMMITTED, &resolved).is_err());
        let unknown = RecordKind::new(9, 1);
        assert!(
            live.apply(Lsn(3), unknown, &resolved_payload(&xid(1)))
                .unwrap_err()
                .contains("unknown kind")
        );
    }
}
