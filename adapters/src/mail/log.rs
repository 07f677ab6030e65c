//! The branch log of a mail resource: which branches are prepared, and with which messages.
//!
//! The same idea as the files resource's branch log (a [`journal::Journal`] of the resource's
//! own, group-committed, so that concurrent prepares share one `fdatasync`), with less in it:
//! a mail commit leaves nothing to redo at open (every message file is synced before its branch
//! is prepared, and every rename into `new/` before its branch is resolved), so there are no
//! checkpoints.
//!
//! * `PREPARED(xid, redo)` — appended by prepare once the branch's messages are synced in `tmp/`,
//!   and waited for: the branch is prepared once it is durable. The redo names every message
//!   (see the redo encoding in the `mail` module).
//! * `COMMITTED(xid)` and `ROLLED_BACK(xid)` — appended when a branch is resolved, after its
//!   messages are delivered (or unlinked), under the resource's state lock, and waited for.
//!
//! The live branches are those with a `PREPARED` and no resolution after it. The log is trimmed
//! once about half a segment was appended since the last trim: a branch still prepared from
//! before the previous trim gets its `PREPARED` appended again (carried forward, under the state
//! lock, so a resolution always follows the copy it resolves), then every segment below the
//! oldest record a branch still needs is removed.
//!
//! The records, their payloads and how a log is opened and scanned are shared with the files
//! resource (`internal::branch_log`); what is the mail resource's own is `Live`.

use std::collections::HashMap;
use std::path::Path;

use journal::{Journal, Lsn, RecordKind};

use crate::Xid;
use crate::internal::branch_log::{self, Record, Replayed};
pub(super) use crate::internal::branch_log::{
    Logged, OpenError, SEGMENT_BYTES_MAX, append_resolution, log_open_error, start_trim,
};

/// The prepared branches a log holds, built record by record in LSN order: xid → (LSN of its
/// latest `PREPARED`, its redo).
#[derive(Default)]
pub(super) struct Live {
    pub(super) branches: HashMap<Xid, (Lsn, Vec<u8>)>,
}

impl Replayed for Live {
    fn apply(&mut self, lsn: Lsn, kind: RecordKind, payload: &[u8]) -> Result<(), String> {
        match branch_log::decode(lsn, kind, payload)? {
            Record::Prepared(xid, redo) => {
                self.branches.insert(xid, (lsn, redo.to_vec()));
            }
            // A resolution whose prepare record was trimmed away ends nothing.
            Record::Resolved { xid, .. } => {
                self.branches.remove(&xid);
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
        // A copy carried forward replaces the first.
        live.apply(Lsn(4), PREPARED, &prepared_payload(&xid(2), b"redo-2"))
            .unwrap();
        assert_eq!(live.branches.len(), 1);
        assert_eq!(live.branches[&xid(2)], (Lsn(4), b"redo-2".to_vec()));
        live.apply(Lsn(5), ROLLED_BACK, &resolved_payload(&xid(2)))
            .unwrap();
        assert!(live.branches.is_empty());
        // A resolution whose prepare was trimmed away is harmless.
        live.apply(Lsn(6), COMMITTED, &resolved_payload(&xid(9)))
            .unwrap();
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
