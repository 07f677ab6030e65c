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
//! Record payloads (version 1): the xid as node u32 LE, epoch u64 LE and seq u64 LE (20 bytes),
//! then for `PREPARED` the redo. Records are written in epoch 0: the log is private to the
//! resource, and fencing is the resource's own state.

use std::collections::HashMap;
use std::path::Path;

use journal::{Epoch, Journal, JournalConfig, JournalError, Lsn, RecordKind};

use crate::Xid;

/// A branch is prepared with these messages (a redo).
pub(super) const PREPARED: RecordKind = RecordKind::new(1, 1);
/// The branch committed.
pub(super) const COMMITTED: RecordKind = RecordKind::new(2, 1);
/// The branch rolled back.
pub(super) const ROLLED_BACK: RecordKind = RecordKind::new(3, 1);

/// The epoch of every record of the log.
pub(super) const LOG_EPOCH: Epoch = Epoch(0);
/// Segment size of the log; it is trimmed each time about half this much was appended.
pub(super) const SEGMENT_BYTES_MAX: u64 = 16 << 20;
/// Largest record of the log; the same as the coordinator journal's default, whose decision
/// record carries the same redo.
pub(super) const RECORD_BYTES_MAX: u64 = 8 << 20;

const XID_BYTES: usize = 20;

/// The log's configuration.
pub(super) fn config() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: SEGMENT_BYTES_MAX,
        record_bytes_max: RECORD_BYTES_MAX,
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

/// The payload of a `PREPARED` record.
pub(super) fn prepared_payload(xid: &Xid, redo: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(XID_BYTES + redo.len());
    put_xid(&mut out, xid);
    out.extend_from_slice(redo);
    out
}

/// The payload of a `COMMITTED` or `ROLLED_BACK` record.
pub(super) fn resolved_payload(xid: &Xid) -> Vec<u8> {
    let mut out = Vec::with_capacity(XID_BYTES);
    put_xid(&mut out, xid);
    out
}

fn put_xid(out: &mut Vec<u8>, xid: &Xid) {
    out.extend_from_slice(&xid.node.to_le_bytes());
    out.extend_from_slice(&xid.epoch.0.to_le_bytes());
    out.extend_from_slice(&xid.seq.to_le_bytes());
}

/// Splits a payload into its xid and the rest.
fn take_xid(payload: &[u8]) -> Result<(Xid, &[u8]), String> {
    if payload.len() < XID_BYTES {
        return Err(format!(
            "payload of {} bytes is shorter than an xid",
            payload.len()
        ));
    }
    let (head, rest) = payload.split_at(XID_BYTES);
    let mut node = [0u8; 4];
    let mut epoch = [0u8; 8];
    let mut seq = [0u8; 8];
    node.copy_from_slice(&head[..4]);
    epoch.copy_from_slice(&head[4..12]);
    seq.copy_from_slice(&head[12..]);
    let xid = Xid {
        node: u32::from_le_bytes(node),
        epoch: Epoch(u64::from_le_bytes(epoch)),
        seq: u64::from_le_bytes(seq),
    };
    Ok((xid, rest))
}

/// The prepared branches a log holds, built record by record in LSN order: xid → (LSN of its
/// latest `PREPARED`, its redo).
#[derive(Default)]
pub(super) struct Live {
    pub(super) branches: HashMap<Xid, (Lsn, Vec<u8>)>,
}

impl Live {
    /// Applies one record; a malformed one is described in the error.
    pub(super) fn apply(
        &mut self,
        lsn: Lsn,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<(), String> {
        let (xid, rest) = take_xid(payload).map_err(|e| format!("record {lsn}: {e}"))?;
        match kind {
            PREPARED => {
                self.branches.insert(xid, (lsn, rest.to_vec()));
            }
            COMMITTED | ROLLED_BACK => {
                if !rest.is_empty() {
                    return Err(format!("record {lsn}: {} trailing bytes", rest.len()));
                }
                // A resolution whose prepare record was trimmed away ends nothing.
                self.branches.remove(&xid);
            }
            other => return Err(format!("record {lsn}: unknown kind {other}")),
        }
        Ok(())
    }
}

/// Opens the log in `dir` (created if missing) and reads its live branches.
pub(super) fn open(dir: &Path) -> Result<(Journal, Live), OpenError> {
    let journal = Journal::open(dir, config()).map_err(OpenError::Journal)?;
    let mut live = Live::default();
    let reader = journal
        .read_from(journal.oldest_lsn())
        .map_err(OpenError::Journal)?;
    for record in reader {
        let record = record.map_err(OpenError::Journal)?;
        live.apply(record.lsn, record.kind, &record.payload)
            .map_err(OpenError::Malformed)?;
    }
    Ok((journal, live))
}

/// The xids live in the log in `dir`, read without opening it (no lock, nothing changed), so
/// that an operator's view can run beside the process that owns the resource. A missing log
/// has none.
pub(super) fn live_on_disk(dir: &Path) -> Result<Vec<Xid>, OpenError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut live = Live::default();
    let mut malformed = None;
    journal::scan::scan_dir(dir, RECORD_BYTES_MAX, |record| {
        if malformed.is_none()
            && let Err(e) = live.apply(record.lsn, record.kind, &record.payload)
        {
            malformed = Some(e);
        }
    })
    .map_err(OpenError::Journal)?;
    if let Some(e) = malformed {
        return Err(OpenError::Malformed(e));
    }
    let mut xids: Vec<Xid> = live.branches.into_keys().collect();
    xids.sort();
    Ok(xids)
}

/// Why the log could not be opened or read.
#[derive(Debug)]
pub(super) enum OpenError {
    /// The journal refused (damage, a lock, an I/O error).
    Journal(JournalError),
    /// A record's payload does not decode.
    Malformed(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Journal(e) => write!(f, "{e}"),
            OpenError::Malformed(e) => f.write_str(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
