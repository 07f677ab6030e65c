//! The coordinator's metrics, through the `metrics` facade: what became of transactions, how
//! long a commit takes, how often phase 2 retries, how long each resource call takes, and how
//! many transactions are open or in doubt.
//!
//! Each is recorded by one line where its event happens (the driver's reply, `commit`, the
//! retry timer, `within_deadline`), except the two gauges, which the reaper samples from the
//! coordinator's maps at every tick ([`crate::Coordinator::counts`]): a count read from the
//! state that defines it cannot drift the way increments and decrements on every path could.
//!
//! Nothing is recorded until [`enable`] is called — by a process that has installed a
//! recorder (the daemon does, before it opens the coordinator) — so embedded mode and tests
//! pay one relaxed atomic load per event, not the building of a key for the facade's no-op
//! recorder.
//!
//! * `concord_transactions_total{outcome=committed|rolled_back|in_doubt}` — counter: the answer
//!   each transaction got (a commit, a rollback asked for, a timeout's or a dropped handle's
//!   rollback).
//! * `concord_commit_seconds` — histogram: from a commit request to its answer (the decision
//!   durable, or the rollback that replaced it).
//! * `concord_phase2_retries_total{resource}` — counter: phase-2 calls (commit, rollback, the
//!   question about a lost one-phase commit) made again after a failure.
//! * `concord_resource_call_seconds{resource,call}` — histogram: each call to a resource,
//!   bounded by `call_timeout_ms`; `call` is `prepare`, `commit`, `rollback`,
//!   `prepare_one_phase`, `commit_one_phase`, `one_phase_outcome` or `recover`.
//! * `concord_open_transactions` — gauge: transactions begun, not yet committing or rolling
//!   back.
//! * `concord_in_doubt` — gauge: transactions whose outcome waits for a restart or an operator,
//!   or still committing or rolling back more than the transaction timeout after they began
//!   (the rows `concord txn list` marks in doubt).
//!
//! # Caveats
//!
//! * The gauges lag by up to one reaper tick (a quarter of `txn_timeout_ms`, at most 1 s).
//! * A branch joined after its transaction timed out is rolled back by a machine of its own,
//!   which counts one more `rolled_back`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::engine::Outcome;

/// Counter: the answer each transaction got, by `outcome`.
pub const TRANSACTIONS_TOTAL: &str = "concord_transactions_total";
/// Histogram: seconds from a commit request to its answer.
pub const COMMIT_SECONDS: &str = "concord_commit_seconds";
/// Counter: phase-2 calls made again, by `resource`.
pub const PHASE2_RETRIES_TOTAL: &str = "concord_phase2_retries_total";
/// Histogram: seconds of each resource call, by `resource` and `call`.
pub const RESOURCE_CALL_SECONDS: &str = "concord_resource_call_seconds";
/// Gauge: transactions open (begun, not committing or rolling back).
pub const OPEN_TRANSACTIONS: &str = "concord_open_transactions";
/// Gauge: transactions in doubt.
pub const IN_DOUBT: &str = "concord_in_doubt";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Starts recording the coordinator's metrics into the `metrics` facade's recorder, for the
/// rest of the process. Call it once a recorder is installed.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The start of a measured interval, when metrics are enabled (no clock read otherwise).
pub(crate) fn start_timer() -> Option<std::time::Instant> {
    enabled().then(std::time::Instant::now)
}

/// A transaction got its answer.
pub(crate) fn answered(outcome: &Outcome) {
    if !enabled() {
        return;
    }
    let label = match outcome {
        Outcome::Committed { .. } => "committed",
        Outcome::RolledBack { .. } => "rolled_back",
        Outcome::InDoubt { .. } => "in_doubt",
    };
    metrics::counter!(TRANSACTIONS_TOTAL, "outcome" => label).increment(1);
}

/// A commit request got its answer after `took`.
pub(crate) fn committed_in(took: Duration) {
    if !enabled() {
        return;
    }
    metrics::histogram!(COMMIT_SECONDS).record(took.as_secs_f64());
}

/// A phase-2 call to `resource` is made again.
pub(crate) fn phase2_retry(resource: &Arc<str>) {
    if !enabled() {
        return;
    }
    metrics::counter!(PHASE2_RETRIES_TOTAL, "resource" => Arc::clone(resource)).increment(1);
}

/// A call to `resource` (`action`, as the driver names it) took `took`.
pub(crate) fn resource_call(resource: &str, action: &'static str, took: Duration) {
    if !enabled() {
        return;
    }
    metrics::histogram!(
        RESOURCE_CALL_SECONDS,
        "resource" => resource.to_string(),
        "call" => call_label(action)
    )
    .record(took.as_secs_f64());
}

/// The `call` label of a resource call the driver names `action`.
pub(crate) fn call_label(action: &'static str) -> &'static str {
    match action {
        "prepare (one phase)" => "prepare_one_phase",
        "commit (one phase)" => "commit_one_phase",
        "find the one-phase outcome" => "one_phase_outcome",
        other => other,
    }
}

/// The gauges, from a count of the coordinator's transactions.
pub(crate) fn sample(open: u64, in_doubt: u64) {
    if !enabled() {
        return;
    }
    metrics::gauge!(OPEN_TRANSACTIONS).set(open as f64);
    metrics::gauge!(IN_DOUBT).set(in_doubt as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_label_is_one_word() {
        for action in [
            "prepare",
            "commit",
            "rollback",
            "prepare (one phase)",
            "commit (one phase)",
            "find the one-phase outcome",
            "recover",
        ] {
            let label = call_label(action);
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{action} → {label}"
            );
        }
    }
}
