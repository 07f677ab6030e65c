//! Journal configuration: every limit named with its unit.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::error::{JournalError, Result};
use crate::record::OVERHEAD_BYTES;
use crate::segment::SEGMENT_HEADER_BYTES;
use crate::types::{ChainHash, Epoch, Lsn};

/// Bound on `start_after.lsn`: far below where LSN arithmetic could overflow (a reader refuses
/// a segment that starts beyond 2^62).
const START_LSN_LIMIT: u64 = 1 << 61;

/// The largest `queue_bytes_max` accepted: 1 GiB.
pub const QUEUE_BYTES_MAX_LIMIT: u64 = 1 << 30;

/// How a journal is opened and the limits it enforces.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Largest size of a segment file, header included. A record that does not fit in the rest of
    /// the current segment starts the next one.
    pub segment_bytes_max: u64,
    /// Largest framed record (payload plus 62 bytes of framing). Longer appends are refused, and a
    /// reader refuses a longer length field before allocating anything for it.
    pub record_bytes_max: u64,
    /// Largest number of bytes waiting for the flusher. An appender that would exceed it waits
    /// until the flusher has taken the queue (back-pressure, never an unbounded buffer).
    pub queue_bytes_max: u64,
    /// Longest time the flusher waits, after a batch of several records, for the appenders of that
    /// batch to queue their next records before it writes (microseconds). The wait is also capped at
    /// half the duration of the last sync, and skipped after a batch of one record, so a lone
    /// appender never waits. 0 disables it.
    pub group_wait_us_max: u64,
    /// Longest time an idle flusher spins waiting for the next record before it sleeps
    /// (microseconds). Spinning saves a thread wake-up per record for a lone appender; it costs CPU
    /// only while the journal is idle. 0 disables it.
    pub flusher_spin_us_max: u64,
    /// Longest time one thread blocked in `Appending::wait` spins before it sleeps
    /// (microseconds); only one waiter spins at a time. Async waiters never spin. 0 disables it.
    pub waiter_spin_us_max: u64,
    /// How long opening tries to take the directory's lock before it reports `Locked`
    /// (milliseconds).
    pub lock_wait_ms_max: u64,
    /// Create the directory when it does not exist (otherwise that is an error).
    pub create_if_missing: bool,
    /// Testing aid: the N-th data sync of this journal (counted from 1, including the sync of the
    /// last segment's records when it opens) fails with an I/O error, as a failing disk would.
    /// `None` in production.
    pub sync_fault_at: Option<u64>,
    /// Testing aid: while the flag is set, the flusher takes nothing from the queue, as if the
    /// disk had stalled (the test must clear it, or closing waits for ever). `None` in production.
    pub hold_flusher: Option<Arc<AtomicBool>>,
    /// Testing aid: [`crate::Journal::truncate_after`] stops with an injected I/O error before
    /// its N-th durable step (counted from 1: clearing the clean-close mark, each segment
    /// removal, the cut, the new mark), leaving the directory as a crash there would. `None` in
    /// production.
    pub truncate_fault_at: Option<u32>,
    /// Where a *new* journal starts: when the directory holds no segment yet, its first segment
    /// begins right after this position, so the first record appended (verbatim, by a re-seeded
    /// standby) must carry LSN `lsn + 1` and continue `chain`. Ignored when the directory already
    /// holds a journal (its segments say where it is). `None`: LSN 1 after the genesis chain.
    pub start_after: Option<StartPosition>,
    /// The `journal` label of this journal's metrics (see [`crate::metrics`]); `None`: it
    /// reports none.
    pub metrics_label: Option<&'static str>,
}

/// A position in a journal's history: the LSN of a record, the chain value after it, and the
/// epoch it was written in (the epoch floor of a journal that starts there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartPosition {
    /// The last LSN before the new journal's first record.
    pub lsn: Lsn,
    /// The chain value after that record.
    pub chain: ChainHash,
    /// Its epoch: the new journal accepts no lower one.
    pub epoch: Epoch,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 8 << 20,
            queue_bytes_max: 32 << 20,
            group_wait_us_max: 200,
            flusher_spin_us_max: 50,
            waiter_spin_us_max: 1000,
            lock_wait_ms_max: 200,
            create_if_missing: false,
            sync_fault_at: None,
            hold_flusher: None,
            truncate_fault_at: None,
            start_after: None,
            metrics_label: None,
        }
    }
}

impl JournalConfig {
    /// Checks that the limits fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(JournalError::InvalidConfig(m));
        if self.record_bytes_max <= OVERHEAD_BYTES as u64 {
            return bad(format!(
                "record_bytes_max must exceed the {OVERHEAD_BYTES}-byte framing"
            ));
        }
        if self.record_bytes_max > u64::from(u32::MAX) {
            return bad("record_bytes_max must fit in 32 bits".into());
        }
        if self.record_bytes_max + SEGMENT_HEADER_BYTES as u64 > self.segment_bytes_max {
            return bad(format!(
                "record_bytes_max ({}) plus the {SEGMENT_HEADER_BYTES}-byte segment header must fit in segment_bytes_max ({})",
                self.record_bytes_max, self.segment_bytes_max
            ));
        }
        if self.queue_bytes_max > QUEUE_BYTES_MAX_LIMIT {
            return bad(format!(
                "queue_bytes_max must be at most {QUEUE_BYTES_MAX_LIMIT} (it bounds a sync group, \
                 whose records are counted in 32 bits)"
            ));
        }
        if let Some(start) = self.start_after
            && start.lsn.0 >= START_LSN_LIMIT
        {
            return bad(format!(
                "start_after lsn {} is beyond the largest supported lsn",
                start.lsn
            ));
        }
        if self.queue_bytes_max < self.record_bytes_max {
            return bad("queue_bytes_max must be at least record_bytes_max".into());
        }
        Ok(())
    }
}
