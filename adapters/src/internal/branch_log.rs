//! The branch log of the files and mail resources: record kinds, payloads, open and scan.
//!
//! A prepare must survive a crash on its own, and concurrent branches prepare at the same
//! moment; appending one record per branch to a log of the resource's own that is
//! group-committed (the [`journal`] crate's [`Journal`]) makes many prepares durable with one
//! `fdatasync`. Both resources keep such a log with the same records:
//!
//! * `PREPARED(xid, redo)` — the branch is prepared once it is durable;
//! * `COMMITTED(xid)` and `ROLLED_BACK(xid)` — the branch is resolved.
//!
//! Payloads (version 1): the xid as node u32 LE, epoch u64 LE and seq u64 LE (20 bytes), then
//! for `PREPARED` the redo. Records are written in epoch [`LOG_EPOCH`] (0): the log is private
//! to the resource, and fencing is the resource's own state. What a resource builds from its
//! records (and any record kind of its own, like the files resource's `CHECKPOINT`) is its
//! [`Replayed`] type; [`decode`] reads the shared kinds for it, and [`open`] and
//! [`live_on_disk`] read a whole log into it.
//!
//! A log is trimmed from time to time (files: at each checkpoint): the prepare record of every
//! branch still prepared since before the previous trim is appended again (carried forward),
//! and the segments below the oldest record still needed are removed ([`start_trim`],
//! [`Trim::carried`]).
//!
//! # Implementation caveats
//!
//! * A record of an unknown kind is malformed: the log refuses to open (an operator must look).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use journal::{Epoch, Journal, JournalConfig, JournalError, Lsn, RecordKind};

use crate::internal::branches::{Branches, Phase};
use crate::internal::instance::Instance;
use crate::internal::io::{check_log_space, log_error};
use crate::{ResourceError, Xid};

/// A branch is prepared with this redo.
pub(crate) const PREPARED: RecordKind = RecordKind::new(1, 1);
/// The branch committed.
pub(crate) const COMMITTED: RecordKind = RecordKind::new(2, 1);
/// The branch rolled back.
pub(crate) const ROLLED_BACK: RecordKind = RecordKind::new(3, 1);

/// The epoch of every record of the log.
pub(crate) const LOG_EPOCH: Epoch = Epoch(0);
/// Segment size of the log; it is trimmed about each time this much (files) or half of it
/// (mail) was appended.
pub(crate) const SEGMENT_BYTES_MAX: u64 = 16 << 20;
/// Largest record of the log (a prepare of a large branch); the same as the coordinator
/// journal's default, whose decision record carries the same redo.
pub(crate) const RECORD_BYTES_MAX: u64 = 8 << 20;

const XID_BYTES: usize = 20;

/// The log's configuration.
pub(crate) fn config() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: SEGMENT_BYTES_MAX,
        record_bytes_max: RECORD_BYTES_MAX,
        create_if_missing: true,
        metrics_label: Some("branch_log"),
        ..JournalConfig::default()
    }
}

/// The payload of a `PREPARED` record.
pub(crate) fn prepared_payload(xid: &Xid, redo: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(XID_BYTES + redo.len());
    put_xid(&mut out, xid);
    out.extend_from_slice(redo);
    out
}

/// The payload of a `COMMITTED` or `ROLLED_BACK` record.
pub(crate) fn resolved_payload(xid: &Xid) -> Vec<u8> {
    let mut out = Vec::with_capacity(XID_BYTES);
    put_xid(&mut out, xid);
    out
}

/// Appends the resolution of `xid` to `log`: `COMMITTED` when `commit`, `ROLLED_BACK` otherwise.
pub(crate) fn append_resolution(
    log: &Journal,
    xid: &Xid,
    commit: bool,
) -> Result<journal::Appending, JournalError> {
    let kind = if commit { COMMITTED } else { ROLLED_BACK };
    log.append(LOG_EPOCH, kind, &resolved_payload(xid))
}

/// Appends the `PREPARED` record of `xid` with `redo` to `log` (in the directory `dir`) and
/// waits until it is durable; its LSN. Refused first when `dir`'s file system lacks room for
/// it (`check_log_space`). Before the append, `set_floor` gets an LSN at or below the record's,
/// for the branch to pin: a trim running meanwhile then keeps the record.
pub(crate) async fn append_prepared(
    name: &str,
    fewer: &str,
    log: &Journal,
    dir: &Path,
    xid: &Xid,
    redo: &[u8],
    set_floor: impl FnOnce(Lsn),
) -> Result<Lsn, ResourceError> {
    let payload = prepared_payload(xid, redo);
    // `statvfs` reads no disk: called here, not on the blocking pool.
    check_log_space(name, dir, payload.len() as u64)?;
    set_floor(log.durable_lsn().next());
    let appended = match log.append(LOG_EPOCH, PREPARED, &payload) {
        Ok(appending) => appending.await,
        Err(e) => Err(e),
    };
    appended.map_err(|e| log_error(name, fewer, "append the prepare record", e))
}

/// Waits for a resolution record, when one was appended, to be durable (a failure poisons
/// `inner`); its LSN. `fewer` says what to do about a branch too large for a record.
pub(crate) async fn resolution_durable<I: Instance>(
    inner: &I,
    fewer: &str,
    appending: Option<journal::Appending>,
) -> Result<Option<Lsn>, ResourceError> {
    let Some(appending) = appending else {
        return Ok(None);
    };
    let durable = appending
        .await
        .map_err(|e| log_error(inner.name(), fewer, "append a resolution", e));
    inner.check(durable).map(Some)
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

/// A record of one of the shared kinds.
pub(crate) enum Record<'a> {
    /// `PREPARED(xid, redo)`.
    Prepared(Xid, &'a [u8]),
    /// `COMMITTED(xid)` (`committed`) or `ROLLED_BACK(xid)`.
    Resolved { xid: Xid, committed: bool },
}

/// Decodes the record at `lsn`; a malformed one, or one of an unknown kind, is described in
/// the error.
pub(crate) fn decode(lsn: Lsn, kind: RecordKind, payload: &[u8]) -> Result<Record<'_>, String> {
    let (xid, rest) = take_xid(payload).map_err(|e| format!("record {lsn}: {e}"))?;
    match kind {
        PREPARED => Ok(Record::Prepared(xid, rest)),
        COMMITTED | ROLLED_BACK => {
            if !rest.is_empty() {
                return Err(format!("record {lsn}: {} trailing bytes", rest.len()));
            }
            Ok(Record::Resolved {
                xid,
                committed: kind == COMMITTED,
            })
        }
        other => Err(format!("record {lsn}: unknown kind {other}")),
    }
}

/// What a resource builds from its log, record by record in LSN order.
pub(crate) trait Replayed: Default {
    /// Applies one record; a malformed one is described in the error.
    fn apply(&mut self, lsn: Lsn, kind: RecordKind, payload: &[u8]) -> Result<(), String>;

    /// The prepared branches: xid → (LSN of its latest `PREPARED`, its redo).
    fn branches(self) -> HashMap<Xid, (Lsn, Vec<u8>)>;
}

/// Opens the log in `dir` (created if missing) and reads it.
pub(crate) fn open<L: Replayed>(dir: &Path) -> Result<(Journal, L), OpenError> {
    let journal = Journal::open(dir, config()).map_err(OpenError::Journal)?;
    let mut live = L::default();
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
pub(crate) fn live_on_disk<L: Replayed>(dir: &Path) -> Result<Vec<Xid>, OpenError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut live = L::default();
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
    let mut xids: Vec<Xid> = live.branches().into_keys().collect();
    xids.sort();
    Ok(xids)
}

/// Why the log could not be opened or read.
#[derive(Debug)]
pub(crate) enum OpenError {
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

/// The branch log in `dir` of the resource `name` could not be opened or read: fatal (damage and
/// foreign content need an operator).
pub(crate) fn log_open_error(name: &str, dir: &Path, e: OpenError) -> ResourceError {
    ResourceError::Fatal {
        resource: name.to_string(),
        message: format!("branch log {}: {e}", dir.display()),
    }
}

/// A branch as trimming its log sees it.
pub(crate) trait Logged {
    /// The lowest LSN of the log it may need: its prepare record's, or, while that is being
    /// appended, one at or below it; `None` before its prepare.
    fn log_floor(&self) -> Option<Lsn>;
    /// The redo its durable prepare record holds; `None` before its prepare.
    fn prepared_redo(&self) -> Option<Cow<'_, [u8]>>;
}

/// A trim of a log (files: a checkpoint) under way: the prepare records it carries forward,
/// and what the open branches still need.
pub(crate) struct Trim {
    /// The LSN the log is durable below when the trim started.
    pub(crate) upto: Lsn,
    needed: HashMap<Xid, Lsn>,
    carried: Vec<(Xid, journal::Appending)>,
}

/// Starts a trim, under the resource's state lock (so that every resolution follows the copy
/// it resolves): the prepare record of every branch still prepared whose record is at or below
/// `since` (the previous trim's start) is appended again, and every branch's floor is noted.
pub(crate) fn start_trim<B: Logged>(
    log: &Journal,
    branches: &Branches<B>,
    since: Lsn,
) -> Result<Trim, JournalError> {
    let upto = log.durable_lsn().next();
    let mut needed = HashMap::new();
    let mut carried = Vec::new();
    for (xid, phase, branch) in branches.iter() {
        let Some(floor) = branch.log_floor() else {
            continue;
        };
        needed.insert(*xid, floor);
        if floor > since || phase != Phase::Prepared {
            continue;
        }
        if let Some(redo) = branch.prepared_redo() {
            let appending = log.append(LOG_EPOCH, PREPARED, &prepared_payload(xid, &redo))?;
            carried.push((*xid, appending));
        }
    }
    Ok(Trim {
        upto,
        needed,
        carried,
    })
}

impl Trim {
    /// Waits for the carried records, telling `moved` where each now is (to set the branch's
    /// floor, if it is still open), and returns the LSN below which no segment is needed: the
    /// lowest of `upto` and every floor.
    pub(crate) fn carried(mut self, mut moved: impl FnMut(&Xid, Lsn)) -> Result<Lsn, JournalError> {
        for (xid, appending) in self.carried {
            let lsn = appending.wait()?;
            self.needed.insert(xid, lsn);
            moved(&xid, lsn);
        }
        Ok(self.needed.into_values().fold(self.upto, Lsn::min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_records_are_refused() {
        let one = Xid {
            node: 7,
            epoch: Epoch(3),
            seq: 1,
        };
        assert!(decode(Lsn(1), PREPARED, b"short").is_err());
        let mut resolved = resolved_payload(&one);
        resolved.push(0);
        assert!(decode(Lsn(2), COMMITTED, &resolved).is_err());
        let unknown = RecordKind::new(9, 1);
        let err = decode(Lsn(3), unknown, &resolved_payload(&one)).err();
        assert!(err.is_some_and(|e| e.contains("unknown kind")));
    }
}
