//! Helpers the participant's integration tests share: a deadline on every step that waits,
//! opening and closing a `Concord`, the outcomes of a commit, and the `Commit` records of a
//! journal as an independent reader sees them.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use adapters::{Lsn, Xid};
use coordinator::Outcome;
use coordinator::ledger::Ledger;
use coordinator::record::CoordRecord;
use journal::JournalConfig;
use participant::{Committed, Concord, ConcordError, Config, Transaction};

/// Bound on every step that waits (open, a put or statement, a commit, phase 2, close).
pub const STEP_DEADLINE: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test when it takes longer than [`STEP_DEADLINE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(STEP_DEADLINE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not finish within {STEP_DEADLINE:?}"),
    }
}

pub async fn open(config: Config) -> Concord {
    within("open", Concord::open(config)).await.unwrap()
}

/// Waits for phase 2 to finish, then closes.
pub async fn close(concord: Concord) {
    assert!(
        concord.wait_idle(STEP_DEADLINE).await,
        "phase 2 did not settle"
    );
    assert!(
        concord.close(STEP_DEADLINE).await,
        "close did not stop every task"
    );
}

/// Commits, failing the test unless the transaction committed.
pub async fn commit(tx: &mut Transaction) -> Committed {
    within("commit", tx.commit()).await.unwrap()
}

pub fn committed_lsn(committed: &Committed) -> Lsn {
    match committed.lsn {
        Some(lsn) => lsn,
        None => panic!("expected a committed outcome with a decision, got {committed:?}"),
    }
}

/// The LSN of the decision of a commit through the coordinator itself.
pub fn decided_lsn(outcome: &Outcome) -> Lsn {
    match outcome {
        Outcome::Committed { lsn: Some(lsn) } => *lsn,
        other => panic!("expected a committed outcome with a decision, got {other:?}"),
    }
}

/// The cause of a commit that answered [`ConcordError::RolledBack`], in words.
pub fn rolled_back_reason(answer: &Result<Committed, ConcordError>) -> String {
    match answer {
        Err(ConcordError::RolledBack { cause, .. }) => cause.to_string(),
        other => panic!("expected a rolled-back transaction, got {other:?}"),
    }
}

/// Commits, failing the test unless the transaction rolled back; returns the cause in words.
pub async fn commit_rolled_back(tx: &mut Transaction) -> String {
    rolled_back_reason(&within("commit", tx.commit()).await)
}

/// `(resource, redo)` of each writing branch of a `Commit` record.
pub type Writers = Vec<(String, Vec<u8>)>;

/// The committed transactions of the journal in `data_dir`, as a standby applies them: LSN →
/// (xid, `(resource, redo)` of each writer), from every `Commit` record and every `OnePhase`
/// record followed by its `End` (one followed by `Abort`, or by nothing yet, is left out). Also
/// checks that the journal scans cleanly and that every record decodes.
pub fn commits(data_dir: &Path) -> BTreeMap<Lsn, (Xid, Writers)> {
    let mut found = BTreeMap::new();
    let mut ledger = Ledger::new();
    let mut undecodable = Vec::new();
    let record_bytes_max = JournalConfig::default().record_bytes_max;
    journal::scan::scan_dir(
        &data_dir.join("journal"),
        record_bytes_max,
        |record| match ledger.apply_raw(record.lsn, record.kind, &record.payload) {
            Ok(Some(committed)) => {
                found.insert(committed.lsn, (committed.xid, committed.writers));
            }
            Ok(None) => {}
            Err(e) => undecodable.push(e.to_string()),
        },
    )
    .unwrap();
    assert!(undecodable.is_empty(), "{undecodable:?}");
    found
}

/// The kinds of the records in the journal of `data_dir`, in LSN order (`"Commit"`,
/// `"OnePhase"`, `"End"`, `"Abort"`, `"Resolve"`, `"Forget"`), with their xids; a shutdown's
/// `Checkpoint` marker, about no transaction, is left out.
pub fn record_kinds(data_dir: &Path) -> Vec<(&'static str, Xid)> {
    let mut kinds = Vec::new();
    let record_bytes_max = JournalConfig::default().record_bytes_max;
    journal::scan::scan_dir(&data_dir.join("journal"), record_bytes_max, |record| {
        let decoded = CoordRecord::decode(record.kind, &record.payload).unwrap();
        let kind = match decoded {
            CoordRecord::Commit { .. } => "Commit",
            CoordRecord::OnePhase { .. } => "OnePhase",
            CoordRecord::End { .. } => "End",
            CoordRecord::Abort { .. } => "Abort",
            CoordRecord::Resolve { .. } => "Resolve",
            CoordRecord::Forget { .. } => "Forget",
            CoordRecord::Checkpoint { .. } | CoordRecord::Role { .. } => return,
        };
        if let Some(xid) = decoded.xid() {
            kinds.push((kind, xid));
        }
    })
    .unwrap();
    kinds
}
