//! The journal's metrics, through the `metrics` facade: how often the flusher syncs and how
//! many records each sync makes durable (the group-commit factor).
//!
//! A journal reports only when its configuration names it ([`crate::JournalConfig::metrics_label`]),
//! under the label `journal="<name>"`: the coordinator's journal is `coordinator`, the branch
//! logs of the files and mail resources are `branch_log`. The handles are registered once, when
//! the journal opens, with the recorder installed then; with none (embedded mode, tests) they
//! cost a branch each.
//!
//! * `concord_journal_syncs_total` — counter: data syncs (`fdatasync`) of segment files that
//!   made records durable.
//! * `concord_journal_records_per_sync` — histogram: records made durable by one sync.

use metrics::{Counter, Histogram};

/// Counter: data syncs of segment files that made records durable.
pub const SYNCS_TOTAL: &str = "concord_journal_syncs_total";
/// Histogram: records made durable by one sync.
pub const RECORDS_PER_SYNC: &str = "concord_journal_records_per_sync";

/// The handles one journal records into.
pub(crate) struct JournalMetrics {
    syncs: Counter,
    records_per_sync: Histogram,
}

impl JournalMetrics {
    /// Handles labelled `journal=label`, or ones that record nothing when `label` is `None`.
    pub(crate) fn new(label: Option<&'static str>) -> JournalMetrics {
        match label {
            Some(label) => JournalMetrics {
                syncs: metrics::counter!(SYNCS_TOTAL, "journal" => label),
                records_per_sync: metrics::histogram!(RECORDS_PER_SYNC, "journal" => label),
            },
            None => JournalMetrics {
                syncs: Counter::noop(),
                records_per_sync: Histogram::noop(),
            },
        }
    }

    /// One sync made `records` records durable.
    pub(crate) fn synced(&self, records: u64) {
        self.syncs.increment(1);
        self.records_per_sync.record(records as f64);
    }
}
