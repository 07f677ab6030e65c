//! What a promotion would lose: the primary's last report against what the standby holds.
//!
//! Both nodes count the same thing the same way: the *committed global transactions* of the
//! journal — `Commit` records, plus `OnePhase` records, less the `Abort`s that follow a
//! `OnePhase` (an `Abort` is written for nothing else) — and the journal bytes of the records
//! (payload and frame). The primary counts what became durable with a follower
//! ([`DecisionCounter`]) and reports `(durable LSN, count, bytes)` in its heartbeats, counted
//! from where its journal began when the process started. The standby keeps the last reports
//! ([`Anchors`]) and counts its own journal from the latest report at or below what it
//! received, so the difference is exact for the records both journals share: what the
//! standby lacks is `report − (anchor + counted)`.
//!
//! Without any report from the primary (it never spoke, or it restarted since), the estimate
//! says so (`primary_reported = false`) and gives the standby's own figures only.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use coordinator::record::{ABORT, COMMIT, ONE_PHASE};
use journal::{Journal, Lsn, Record};
use proto::v1;

/// How many of the primary's reports the standby keeps.
pub const ANCHORS_MAX: usize = 256;

/// A count at an LSN: committed transactions and journal bytes of the records up to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Up to this LSN.
    pub lsn: Lsn,
    /// Committed global transactions.
    pub committed: u64,
    /// Journal bytes.
    pub bytes: u64,
}

/// The bytes a record takes in the journal (its frame: 62 bytes of header, crc and chain, plus the
/// payload; see `docs/journal-format.md`).
pub fn record_bytes(record: &Record) -> u64 {
    62 + record.payload.len() as u64
}

/// What one record adds to the committed count (`Abort` takes one back).
pub fn committed_delta(record: &Record) -> i64 {
    if record.kind == COMMIT || record.kind == ONE_PHASE {
        1
    } else if record.kind == ABORT {
        -1
    } else {
        0
    }
}

/// Adds `record` to `progress`.
pub fn add(progress: &mut Progress, record: &Record) {
    progress.lsn = record.lsn;
    progress.committed = progress
        .committed
        .saturating_add_signed(committed_delta(record));
    progress.bytes += record_bytes(record);
}

/// The primary's follower: counts the journal's durable records as they come.
#[derive(Clone, Default)]
pub struct DecisionCounter {
    progress: Arc<Mutex<Progress>>,
}

impl DecisionCounter {
    /// The count so far.
    pub fn progress(&self) -> Progress {
        self.progress.lock().map(|p| *p).unwrap_or_default()
    }

    /// Follows `journal` from its oldest record until `stop`; a blocking loop for
    /// `spawn_blocking` (the journal is synchronous). Returns when the journal closes or fails.
    pub fn follow(&self, journal: Arc<Journal>, stop: Arc<std::sync::atomic::AtomicBool>) {
        let from = journal.oldest_lsn();
        let Ok(mut reader) = journal.read_from(from) else {
            return;
        };
        let mut progress = Progress {
            lsn: from.prev(),
            ..Progress::default()
        };
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let mut read_any = false;
            for record in reader.by_ref() {
                let Ok(record) = record else { return };
                add(&mut progress, &record);
                read_any = true;
            }
            if read_any && let Ok(mut p) = self.progress.lock() {
                *p = progress;
            }
            // Picks up what became durable since; sleeps a little when nothing did.
            journal.follow(&mut reader);
            if !read_any {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// The primary's recent reports, as a standby keeps them.
#[derive(Default)]
pub struct Anchors {
    reports: Mutex<VecDeque<(Progress, Instant)>>,
}

impl Anchors {
    /// Keeps a report (the newest `ANCHORS_MAX`). A report with a lower LSN than the last
    /// one means the primary restarted: the older reports are dropped.
    pub fn report(&self, progress: Progress) {
        if let Ok(mut reports) = self.reports.lock() {
            if reports.back().is_some_and(|(last, _)| {
                last.lsn > progress.lsn || last.committed > progress.committed
            }) {
                reports.clear();
            }
            if reports.back().is_some_and(|(last, _)| *last == progress) {
                return;
            }
            reports.push_back((progress, Instant::now()));
            while reports.len() > ANCHORS_MAX {
                reports.pop_front();
            }
        }
    }

    /// The newest report, and how long ago it came.
    pub fn latest(&self) -> Option<(Progress, Instant)> {
        self.reports.lock().ok().and_then(|r| r.back().copied())
    }

    /// The newest report at or below `lsn`.
    pub fn at_or_below(&self, lsn: Lsn) -> Option<Progress> {
        self.reports
            .lock()
            .ok()
            .and_then(|r| r.iter().rev().find(|(p, _)| p.lsn <= lsn).map(|(p, _)| *p))
    }
}

/// Counts `journal`'s records after `anchor` up to `upto` onto it.
pub fn count_from(
    journal: &Journal,
    anchor: Progress,
    upto: Lsn,
) -> Result<Progress, journal::JournalError> {
    let mut progress = anchor;
    if upto <= anchor.lsn {
        return Ok(progress);
    }
    for record in journal.read_from(anchor.lsn.next())? {
        let record = record?;
        if record.lsn > upto {
            break;
        }
        add(&mut progress, &record);
    }
    Ok(progress)
}

/// What promoting this standby now would lose.
pub fn estimate(anchors: &Anchors, journal: &Journal) -> v1::LossEstimate {
    let received = journal.durable_lsn();
    let latest = anchors.latest();
    let anchored = anchors
        .at_or_below(received)
        .and_then(|anchor| count_from(journal, anchor, received).ok());
    match (latest, anchored) {
        (Some((primary, at)), Some(standby)) => v1::LossEstimate {
            primary_reported: true,
            report_age_ms: at.elapsed().as_millis() as u64,
            primary_durable_lsn: primary.lsn.0,
            primary_committed_txns: primary.committed,
            standby_received_lsn: received.0,
            standby_committed_txns: standby.committed,
            txns: primary.committed.saturating_sub(standby.committed),
            records: primary.lsn.0.saturating_sub(received.0),
            bytes: primary.bytes.saturating_sub(standby.bytes),
        },
        (latest, _) => v1::LossEstimate {
            primary_reported: false,
            report_age_ms: latest.map_or(0, |(_, at)| at.elapsed().as_millis() as u64),
            primary_durable_lsn: latest.map_or(0, |(p, _)| p.lsn.0),
            standby_received_lsn: received.0,
            records: latest.map_or(0, |(p, _)| p.lsn.0.saturating_sub(received.0)),
            ..v1::LossEstimate::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_drop_reports_of_an_earlier_primary() {
        let anchors = Anchors::default();
        for (lsn, committed) in [(10, 5), (20, 9), (30, 12)] {
            anchors.report(Progress {
                lsn: Lsn(lsn),
                committed,
                bytes: lsn * 100,
            });
        }
        assert_eq!(anchors.at_or_below(Lsn(25)).map(|p| p.lsn), Some(Lsn(20)));
        anchors.report(Progress {
            lsn: Lsn(5),
            committed: 1,
            bytes: 10,
        });
        assert_eq!(anchors.at_or_below(Lsn(25)).map(|p| p.lsn), Some(Lsn(5)));
        assert_eq!(anchors.at_or_below(Lsn(4)), None);
    }
}
