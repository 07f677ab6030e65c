//! What operators see and do with a running coordinator: the list of unfinished transactions,
//! waiting until they settle, and an operator's resolution.
//!
//! [`TxnInfo`] is one transaction as `list` shows it: its phase, its age, and each branch with
//! its state and the last error of its retried calls. Its `Display` is the one line a waiter
//! that gives up prints (xid, decision, the branches not finished and why), so nobody has to
//! read a debug dump; [`Coordinator::pending_lines`] gives one per unfinished transaction.
//! `wait_settled` waits until nothing works towards an end any more: a transaction in doubt
//! waits for a restart or an operator, and a branch whose resource is not configured for a start
//! that has it, so neither holds a waiter up. `resolve` records and carries out an operator's
//! decision ([`crate::resolve`]).
//!
//! # Implementation caveats
//!
//! * `list` reads each running machine under its own lock, one after another: it is a picture
//!   of each transaction, not of all of them at one instant.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use adapters::{Resource, Xid};

use super::{CoordError, Coordinator, Running, lock};
use crate::engine::{BranchState, Phase, TxnMachine};
use crate::resolve::{ResolveReport, ResolveRequest};

/// What `txn list` shows of one transaction.
#[derive(Clone, Debug)]
pub struct TxnInfo {
    /// The transaction.
    pub xid: Xid,
    /// Its phase, in words.
    pub state: String,
    /// How long since it began (or since recovery found it).
    pub age: Duration,
    /// Its branches: resource name, state in words, last error.
    pub branches: Vec<(String, String, Option<String>)>,
}

/// Branch states in which a branch has nothing left to do.
pub(super) const BRANCH_DONE: [&str; 3] = ["committed", "rolled back", "read-only"];

impl TxnInfo {
    /// What was decided, in words: `commit`, `rollback`, `none yet`, or `unknown` (in doubt).
    pub fn decision(&self) -> &'static str {
        match self.state.as_str() {
            "committing" | "committing (one phase)" => "commit",
            "rolling back" | "timed out" => "rollback",
            "in doubt" => "unknown",
            "finished" => "done",
            _ => "none yet",
        }
    }

    /// The branches not finished yet: `(resource, state, last error)`.
    pub fn pending(&self) -> impl Iterator<Item = &(String, String, Option<String>)> {
        self.branches
            .iter()
            .filter(|(_, state, _)| !BRANCH_DONE.contains(&state.as_str()))
    }
}

/// One line for an operator: the xid, its phase and decision, and each branch it waits for with
/// that branch's last error (retried by the coordinator), e.g. `n1e1s42 committing (decision:
/// commit) for 61 s; waiting for resource uploads (committing): resource uploads: write …: No
/// space left on device (os error 28); retrying`.
impl std::fmt::Display for TxnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (decision: {}) for {} s",
            self.xid,
            self.state,
            self.decision(),
            self.age.as_secs()
        )?;
        let mut pending = self.pending().peekable();
        if pending.peek().is_none() {
            return Ok(());
        }
        f.write_str("; waiting for ")?;
        for (i, (name, state, error)) in pending.enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "resource {name} ({state})")?;
            if let Some(error) = error {
                write!(f, ": {error}; retrying")?;
            }
        }
        Ok(())
    }
}

/// How many transactions a coordinator holds, by standing ([`Coordinator::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxnCounts {
    /// Begun and not yet committing or rolling back (a timed-out one waiting for its caller
    /// to hear it does not count).
    pub open: u64,
    /// In doubt: waiting for a restart or an operator, or still committing or rolling back
    /// more than the transaction timeout after it began (what `concord txn list` marks in
    /// doubt).
    pub in_doubt: u64,
}

impl Running {
    /// Whether it is in doubt (see [`TxnCounts::in_doubt`]).
    pub(super) fn is_in_doubt(&self, timeout: Duration) -> bool {
        match lock(&self.machine).phase() {
            Phase::InDoubt => true,
            Phase::Finished => false,
            _ => self.started.elapsed() >= timeout,
        }
    }

    /// Whether its machine still works towards an end: not in doubt (that waits for a restart
    /// or an operator), and not waiting only for branches whose resource the configuration
    /// lacks (they wait for a start that has it; recovery reported them).
    pub(super) fn is_busy(&self) -> bool {
        let machine = lock(&self.machine);
        if *machine.phase() == Phase::InDoubt {
            return false;
        }
        let mut pending = self
            .branches
            .iter()
            .zip(machine.branches())
            .filter(|(_, b)| {
                !matches!(
                    b.state,
                    BranchState::Committed | BranchState::RolledBack | BranchState::ReadOnly
                )
            })
            .peekable();
        pending.peek().is_none() || pending.any(|(r, _)| r.resource.is_some())
    }
}

impl Coordinator {
    /// Waits (at most `timeout`) until no transaction is being committed, rolled back or
    /// recovered — phase 2 and recovery run in the background — and returns whether that
    /// happened. Transactions in doubt do not count: they wait for a restart or an operator.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = self
                .inner
                .running
                .iter()
                .any(|shard| lock(shard).values().any(|r| r.is_busy()));
            if !busy {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The transactions that have not finished, one readable line each ([`TxnInfo`]'s
    /// `Display`), for a caller that gives up waiting: what each waits for, and why.
    pub fn pending_lines(&self) -> Vec<String> {
        self.list().iter().map(TxnInfo::to_string).collect()
    }

    /// How many transactions are open and how many in doubt (see [`TxnCounts`]), without
    /// listing them.
    pub fn counts(&self) -> TxnCounts {
        let open = self
            .inner
            .open
            .iter()
            .map(|shard| lock(shard).values().filter(|o| !o.timed_out).count() as u64)
            .sum();
        let timeout = Duration::from_millis(self.inner.config.txn_timeout_ms);
        let in_doubt = self
            .inner
            .running
            .iter()
            .map(|shard| {
                lock(shard)
                    .values()
                    .filter(|r| r.is_in_doubt(timeout))
                    .count() as u64
            })
            .sum();
        TxnCounts { open, in_doubt }
    }

    /// Every open, committing, rolling-back or in-doubt transaction.
    pub fn list(&self) -> Vec<TxnInfo> {
        let mut out = Vec::new();
        for shard in self.inner.open.iter() {
            for (xid, o) in lock(shard).iter() {
                let state = if o.timed_out { "timed out" } else { "open" };
                let branches = o
                    .branches
                    .iter()
                    .map(|b| (b.name.to_string(), "active".to_string(), None))
                    .collect();
                out.push(TxnInfo {
                    xid: *xid,
                    state: state.into(),
                    age: o.started.elapsed(),
                    branches,
                });
            }
        }
        for r in self.inner.running() {
            let machine = lock(&r.machine);
            let branches = r
                .branches
                .iter()
                .zip(machine.branches())
                .map(|(n, b)| {
                    (
                        n.name.to_string(),
                        b.state.name().to_string(),
                        b.last_error.clone(),
                    )
                })
                .collect();
            let state = phase_name(machine.phase());
            out.push(TxnInfo {
                xid: r.xid,
                state: state.into(),
                age: r.started.elapsed(),
                branches,
            });
        }
        out.sort_by_key(|t| t.xid);
        out
    }

    /// Records an operator's decision for a transaction that cannot finish by itself (a
    /// resource lost for good) and carries it out as far as the resources allow; see
    /// [`crate::resolve`] for the rules and what the report says. A transaction this
    /// coordinator is still running phase 1 for is refused; a machine driving its phase 2 is
    /// stopped first (the resolution takes over; a branch it cannot reach is driven again at
    /// the next start).
    pub async fn resolve(&self, request: &ResolveRequest) -> Result<ResolveReport, CoordError> {
        let xid = &request.xid;
        // A timed-out transaction is no longer open: it can never commit.
        let open = self
            .inner
            .open_shard(xid)
            .get(xid)
            .is_some_and(|o| !o.timed_out);
        if open || self.deciding(xid) {
            return Err(CoordError::Refused(format!(
                "transaction {xid} is still being prepared or decided by this coordinator; wait for its outcome"
            )));
        }
        crate::resolve::check(&self.inner.journal, request)?;
        let cancel = || {
            for r in self.inner.running().iter().filter(|r| r.xid == *xid) {
                r.cancelled.store(true, Ordering::Release);
            }
        };
        let resources: BTreeMap<String, Arc<dyn Resource>> = self
            .inner
            .resources
            .iter()
            .map(|(name, c)| (name.clone(), Arc::clone(&c.resource)))
            .collect();
        let epoch = self.inner.config.epoch;
        let deadline = Duration::from_millis(self.inner.config.call_timeout_ms);
        let report = crate::resolve::resolve(
            &self.inner.journal,
            epoch,
            &resources,
            request,
            deadline,
            &cancel,
        )
        .await?;
        if report.finished {
            self.inner.retention.pins.unpin_xid(xid);
        } else if request.commit {
            self.drive_unreached(&report);
        }
        Ok(report)
    }

    /// After a resolution that could not reach every branch of a committed transaction: the
    /// configured ones are driven again, as recovery would (an unconfigured one waits for a
    /// start that has it, or for `--forget`). One machine with the `End` when every unreached
    /// branch is configured; otherwise one per branch, without it.
    pub(super) fn drive_unreached(&self, report: &ResolveReport) {
        let Some(lsn) = report.decision_lsn else {
            return;
        };
        let unreached: Vec<&String> = report
            .branches
            .iter()
            .filter(|(_, o)| !o.is_done())
            .map(|(n, _)| n)
            .collect();
        let configured: Vec<String> = unreached
            .iter()
            .filter(|n| self.inner.resources.contains_key(n.as_str()))
            .map(|n| n.to_string())
            .collect();
        let retry = self.inner.config.retry;
        if configured.len() == unreached.len() {
            let (machine, commands) =
                TxnMachine::recovered_commit(report.xid, lsn, configured.len(), retry);
            self.drive_recovered(machine, &configured, commands, Some(lsn));
            return;
        }
        for name in configured {
            let (machine, commands) = TxnMachine::recovered_branch_commit(report.xid, lsn, retry);
            self.drive_recovered(machine, &[name], commands, Some(lsn));
        }
    }

    /// Whether a machine of `xid` is preparing or deciding.
    pub(super) fn deciding(&self, xid: &Xid) -> bool {
        self.inner
            .running()
            .iter()
            .filter(|r| r.xid == *xid)
            .any(|r| {
                matches!(
                    lock(&r.machine).phase(),
                    Phase::Active | Phase::Preparing | Phase::Deciding | Phase::OnePhase
                )
            })
    }
}

pub(super) fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Active => "open",
        Phase::Preparing => "preparing",
        Phase::Deciding => "deciding",
        Phase::Committing => "committing",
        Phase::OnePhase => "committing (one phase)",
        Phase::RollingBack => "rolling back",
        Phase::InDoubt => "in doubt",
        Phase::Finished => "finished",
    }
}
