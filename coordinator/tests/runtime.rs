//! The coordinator's runtime against an in-memory resource whose failures the test controls:
//! what is journaled, what each branch is told, retries, timeouts, recovery, and callers that
//! stop waiting or a shutdown while a branch is slow.

#![allow(clippy::unwrap_used)]

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::{Epoch, Lsn, OnePhaseOutcome, Resource, ResourceError, Vote, Xid};
use coordinator::record::CoordRecord;
use coordinator::resolve::{BranchOutcome, ResolveRequest};
use coordinator::{CoordError, Coordinator, CoordinatorConfig, Outcome, RetryPolicy};
use journal::{Journal, JournalConfig};

/// A resource that remembers what it was told and fails when asked to.
#[derive(Default)]
struct Mem {
    name: String,
    prepared: Mutex<HashSet<Xid>>,
    committed: Mutex<Vec<Xid>>,
    rolled_back: Mutex<Vec<Xid>>,
    fail_prepare: AtomicBool,
    read_only: AtomicBool,
    commit_failures: AtomicU32,
    rollback_failures: AtomicU32,
    rollback_delay_ms: AtomicU32,
    /// While set, prepare waits.
    hold_prepares: AtomicBool,
    /// While set, commit waits.
    hold_commits: AtomicBool,
    /// Offers one-phase commit.
    one_phase: AtomicBool,
    /// One phase: the branches readied, and the ones whose commit took effect.
    ready: Mutex<HashSet<Xid>>,
    /// One phase: the next commits lose their answer (they take effect, the caller gets an
    /// error), this many times.
    lose_answers: AtomicU32,
    /// One phase: the next answers to "what became of it" fail, this many times.
    outcome_failures: AtomicU32,
    /// While set, `recover` fails.
    fail_recover: AtomicBool,
}

/// Takes one from `count` unless it is 0; whether it took one.
fn take_one(count: &AtomicU32) -> bool {
    count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// An operator's resolution of `xid` by "ops", forgetting nothing.
fn by_ops(xid: Xid, commit: bool) -> ResolveRequest {
    ResolveRequest {
        xid,
        commit,
        operator: "ops".into(),
        forget: Vec::new(),
        reason: String::new(),
        unopened: Vec::new(),
    }
}

/// Waits while `hold` is set.
async fn held(hold: &AtomicBool) {
    while hold.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl Mem {
    fn new(name: &str) -> Arc<Mem> {
        Arc::new(Mem {
            name: name.into(),
            ..Mem::default()
        })
    }
    fn committed(&self) -> Vec<Xid> {
        self.committed.lock().unwrap().clone()
    }
    fn rolled_back(&self) -> Vec<Xid> {
        self.rolled_back.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Resource for Mem {
    fn name(&self) -> &str {
        &self.name
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    async fn begin(&self, _xid: &Xid) -> Result<(), ResourceError> {
        Ok(())
    }
    async fn prepare(&self, xid: &Xid) -> Result<Vote, ResourceError> {
        held(&self.hold_prepares).await;
        if self.fail_prepare.load(Ordering::Relaxed) {
            return Err(ResourceError::rejected(&self.name, "disk full"));
        }
        if self.read_only.load(Ordering::Relaxed) {
            return Ok(Vote::ReadOnly);
        }
        self.prepared.lock().unwrap().insert(*xid);
        Ok(Vote::Commit {
            redo: format!("redo of {}", self.name).into_bytes(),
        })
    }
    async fn commit(&self, xid: &Xid) -> Result<(), ResourceError> {
        held(&self.hold_commits).await;
        // One atomic step: a test that sets the count while commits race must win.
        if take_one(&self.commit_failures) {
            return Err(ResourceError::Unavailable {
                resource: self.name.clone(),
                message: "down".into(),
            });
        }
        self.prepared.lock().unwrap().remove(xid);
        self.committed.lock().unwrap().push(*xid);
        Ok(())
    }
    async fn rollback(&self, xid: &Xid) -> Result<(), ResourceError> {
        let delay = self.rollback_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
        }
        if take_one(&self.rollback_failures) {
            return Err(ResourceError::Unavailable {
                resource: self.name.clone(),
                message: "down".into(),
            });
        }
        self.prepared.lock().unwrap().remove(xid);
        self.rolled_back.lock().unwrap().push(*xid);
        Ok(())
    }
    async fn recover(&self) -> Result<Vec<Xid>, ResourceError> {
        if self.fail_recover.load(Ordering::SeqCst) {
            return Err(ResourceError::Unavailable {
                resource: self.name.clone(),
                message: "recover refused by the test".into(),
            });
        }
        Ok(self.prepared.lock().unwrap().iter().copied().collect())
    }
    async fn fence(&self, _epoch: Epoch) -> Result<(), ResourceError> {
        Ok(())
    }
    async fn fence_epoch(&self) -> Result<Epoch, ResourceError> {
        Ok(Epoch(0))
    }
    async fn replay(&self, _redo: &[u8], _lsn: Lsn) -> Result<(), ResourceError> {
        Ok(())
    }
    async fn applied_lsn(&self) -> Result<Lsn, ResourceError> {
        Ok(Lsn::ZERO)
    }
    fn supports_one_phase(&self) -> bool {
        self.one_phase.load(Ordering::Relaxed)
    }
    async fn prepare_one_phase(&self, xid: &Xid) -> Result<Vote, ResourceError> {
        self.ready.lock().unwrap().insert(*xid);
        Ok(Vote::Commit {
            redo: format!("redo of {}", self.name).into_bytes(),
        })
    }
    async fn commit_one_phase(&self, xid: &Xid) -> Result<OnePhaseOutcome, ResourceError> {
        self.ready.lock().unwrap().remove(xid);
        self.committed.lock().unwrap().push(*xid);
        if take_one(&self.lose_answers) {
            return Err(ResourceError::InDoubt {
                resource: self.name.clone(),
                message: "connection closed during COMMIT".into(),
            });
        }
        Ok(OnePhaseOutcome::Committed)
    }
    async fn one_phase_outcome(
        &self,
        xid: &Xid,
        _redo: &[u8],
    ) -> Result<OnePhaseOutcome, ResourceError> {
        if take_one(&self.outcome_failures) {
            return Err(ResourceError::Unavailable {
                resource: self.name.clone(),
                message: "down".into(),
            });
        }
        self.ready.lock().unwrap().remove(xid);
        if self.committed().contains(xid) {
            Ok(OnePhaseOutcome::Committed)
        } else {
            Ok(OnePhaseOutcome::RolledBack {
                error: ResourceError::rejected(&self.name, "it never committed"),
            })
        }
    }
}

/// A transaction timeout for the tests that let one run out: short, yet far above the moment
/// between `begin` and `join`, which a loaded machine may stretch by tens of milliseconds.
const SHORT_TIMEOUT_MS: u64 = 500;

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        retry: RetryPolicy {
            first_ms: 1,
            max_ms: 8,
        },
        ..CoordinatorConfig::default()
    }
}

fn journal(dir: &std::path::Path) -> Journal {
    Journal::open(
        dir,
        JournalConfig {
            create_if_missing: true,
            ..JournalConfig::default()
        },
    )
    .unwrap()
}

/// The journal's records about transactions (a shutdown's `Checkpoint` marker left out).
fn records(journal: &Journal) -> Vec<CoordRecord> {
    journal
        .read_from(journal.oldest_lsn())
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            CoordRecord::decode(r.kind, &r.payload).unwrap()
        })
        .filter(|r| r.xid().is_some())
        .collect()
}

async fn open(
    dir: &std::path::Path,
    resources: &[Arc<Mem>],
    config: CoordinatorConfig,
) -> Coordinator {
    let resources = resources
        .iter()
        .map(|r| Arc::clone(r) as Arc<dyn Resource>)
        .collect();
    Coordinator::open(config, journal(dir), resources)
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_branches_commit_after_one_durable_decision_and_an_end() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    let c = open(dir.path(), &[a.clone(), b.clone()], config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    c.join(&xid, "b").await.unwrap();
    let outcome = c.commit(&xid).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Committed { lsn: Some(_) }),
        "{outcome:?}"
    );
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.committed(), vec![xid]);
    assert_eq!(b.committed(), vec![xid]);
    c.shutdown(Duration::from_secs(5)).await;
    // The End record is appended without waiting; reopening the journal syncs and shows it.
    let recs = records(&journal(dir.path()));
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(
        matches!(&recs[0], CoordRecord::Commit { xid: x, branches, .. } if *x == xid && branches.len() == 2)
    );
    assert!(matches!(&recs[1], CoordRecord::End { xid: x } if *x == xid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_that_cannot_prepare_rolls_everything_back_and_nothing_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    b.fail_prepare.store(true, Ordering::Relaxed);
    let c = open(dir.path(), &[a.clone(), b.clone()], config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    c.join(&xid, "b").await.unwrap();
    let outcome = c.commit(&xid).await.unwrap();
    let Outcome::RolledBack { reason, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.contains("resource b") && reason.contains("disk full"),
        "{reason}"
    );
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.rolled_back(), vec![xid]);
    assert!(a.committed().is_empty() && b.committed().is_empty());
    assert!(records(c.journal()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_branches_commit_without_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    a.read_only.store(true, Ordering::Relaxed);
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    assert_eq!(
        c.commit(&xid).await.unwrap(),
        Outcome::Committed { lsn: None }
    );
    assert!(records(c.journal()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_two_keeps_retrying_until_the_branch_answers() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    a.commit_failures.store(5, Ordering::Relaxed);
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    assert!(matches!(
        c.commit(&xid).await.unwrap(),
        Outcome::Committed { .. }
    ));
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.committed(), vec![xid]);
    assert_eq!(a.commit_failures.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_too_long_is_rolled_back_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let c = open(
        dir.path(),
        std::slice::from_ref(&a),
        CoordinatorConfig {
            txn_timeout_ms: SHORT_TIMEOUT_MS,
            ..config()
        },
    )
    .await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.rolled_back().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the timed-out branch was not rolled back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = c.commit(&xid).await.unwrap_err();
    assert!(
        matches!(
            err,
            CoordError::TimedOut {
                timeout_ms: SHORT_TIMEOUT_MS,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("rolled back"));
    assert!(a.committed().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_resources_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path(), &[Mem::new("a")], config()).await;
    let xid = c.begin();
    let err = c.join(&xid, "nope").await.err().unwrap();
    assert!(
        err.to_string().contains("\"nope\"") && err.to_string().contains("a"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_commits_decided_branches_and_rolls_back_undecided_ones() {
    let dir = tempfile::tempdir().unwrap();
    let decided = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: 10,
    };
    let undecided = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: 11,
    };
    {
        let j = journal(dir.path());
        let record = CoordRecord::Commit {
            xid: decided,
            at_ms: 0,
            branches: vec![("a".into(), b"r".to_vec())],
        };
        j.append(Epoch(1), record.kind(), &record.encode())
            .unwrap()
            .wait()
            .unwrap();
    }
    let a = Mem::new("a");
    a.prepared.lock().unwrap().extend([decided, undecided]);
    let (c, report) = Coordinator::open(
        config(),
        journal(dir.path()),
        vec![a.clone() as Arc<dyn Resource>],
    )
    .await
    .unwrap();
    assert_eq!(report.redriven, vec![decided]);
    assert_eq!(report.rolled_back, vec![("a".to_string(), undecided)]);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.committed(), vec![decided]);
    assert_eq!(a.rolled_back(), vec![undecided]);
    let next = c.begin();
    assert!(next.seq > decided.seq, "xids keep growing across restarts");
    c.shutdown(Duration::from_secs(5)).await;
    let recs = records(&journal(dir.path()));
    assert!(
        matches!(recs.last(), Some(CoordRecord::End { xid }) if *xid == decided),
        "{recs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_transaction_whose_rollback_fails_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    a.rollback_failures.store(3, Ordering::Relaxed);
    let c = open(
        dir.path(),
        std::slice::from_ref(&a),
        CoordinatorConfig {
            txn_timeout_ms: SHORT_TIMEOUT_MS,
            ..config()
        },
    )
    .await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.rolled_back().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the timed-out branch was never rolled back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        a.rollback_failures.load(Ordering::Relaxed),
        0,
        "every failure was retried"
    );
    assert!(matches!(
        c.commit(&xid).await,
        Err(CoordError::TimedOut { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_of_one_xid_in_two_resources_is_settled_only_when_both_are() {
    let dir = tempfile::tempdir().unwrap();
    let undecided = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: 5,
    };
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    a.prepared.lock().unwrap().insert(undecided);
    b.prepared.lock().unwrap().insert(undecided);
    b.rollback_delay_ms.store(300, Ordering::Relaxed);
    let c = open(dir.path(), &[a.clone(), b.clone()], config()).await;
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.rolled_back(), vec![undecided]);
    assert_eq!(
        b.rolled_back(),
        vec![undecided],
        "settled before the slow rollback finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cannot_commit_what_never_had_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let undecided = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: 5,
    };
    a.prepared.lock().unwrap().insert(undecided);
    a.rollback_delay_ms.store(200, Ordering::Relaxed);
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    let err = c.resolve(&by_ops(undecided, true)).await.unwrap_err();
    assert!(err.to_string().contains("presumed abort"), "{err}");
    assert!(a.committed().is_empty());
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.rolled_back(), vec![undecided]);
}

#[test]
fn dropping_a_transaction_outside_the_runtime_rolls_it_back() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let c = runtime.block_on(open(dir.path(), std::slice::from_ref(&a), config()));
    let xid = c.begin();
    runtime.block_on(c.join(&xid, "a")).unwrap();
    // A thread with no runtime abandons the transaction, as a Drop there would.
    let abandoner = c.clone();
    std::thread::spawn(move || abandoner.abandon(&xid))
        .join()
        .unwrap();
    assert!(runtime.block_on(c.wait_settled(Duration::from_secs(5))));
    assert_eq!(a.rolled_back(), vec![xid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_phase_two_goes_on_after_the_caller_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    b.hold_commits.store(true, Ordering::SeqCst);
    let c = open(dir.path(), &[a.clone(), b.clone()], config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    c.join(&xid, "b").await.unwrap();
    let outcome = c.commit(&xid).await.unwrap();
    assert!(matches!(outcome, Outcome::Committed { lsn: Some(_) }));
    // The branch that answers at once is committed before the answer; the held one is not.
    assert_eq!(a.committed(), vec![xid]);
    assert!(b.committed().is_empty());
    let listed = c.list();
    assert!(
        listed
            .iter()
            .any(|t| t.xid == xid && t.state == "committing"),
        "{listed:?}"
    );
    b.hold_commits.store(false, Ordering::SeqCst);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(b.committed(), vec![xid]);
    assert!(c.list().is_empty());
    c.shutdown(Duration::from_secs(5)).await;
    let recs = records(&journal(dir.path()));
    assert!(
        matches!(recs.last(), Some(CoordRecord::End { xid: x }) if *x == xid),
        "{recs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_caller_stops_waiting_is_finished_anyway() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    a.hold_prepares.store(true, Ordering::SeqCst);
    let c = open(dir.path(), &[a.clone(), b.clone()], config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    c.join(&xid, "b").await.unwrap();
    // The caller gives up while branch a is still preparing: its commit future is dropped.
    let gave_up = tokio::time::timeout(Duration::from_millis(20), c.commit(&xid)).await;
    assert!(gave_up.is_err());
    assert!(a.committed().is_empty() && b.committed().is_empty());
    a.hold_prepares.store(false, Ordering::SeqCst);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.committed(), vec![xid]);
    assert_eq!(b.committed(), vec![xid]);
    c.shutdown(Duration::from_secs(5)).await;
    let recs = records(&journal(dir.path()));
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(matches!(&recs[0], CoordRecord::Commit { xid: x, .. } if *x == xid));
    assert!(matches!(&recs[1], CoordRecord::End { xid: x } if *x == xid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_caller_whose_branch_never_prepares() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    a.hold_prepares.store(true, Ordering::SeqCst);
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    let caller = {
        let c = c.clone();
        tokio::spawn(async move { c.commit(&xid).await })
    };
    // Shut down once the caller drives its commit (branch a is being prepared).
    assert!(
        eventually(Duration::from_secs(5), || c
            .list()
            .iter()
            .any(|t| t.xid == xid && t.state == "preparing"))
        .await,
        "{:?}",
        c.list()
    );
    assert!(c.clone().shutdown(Duration::from_secs(5)).await);
    let answer = tokio::time::timeout(Duration::from_secs(5), caller)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(answer, Err(CoordError::ShuttingDown)),
        "{answer:?}"
    );
    assert!(a.committed().is_empty());
    assert!(records(c.journal()).is_empty());
}

/// Waits up to `deadline` for `check` to hold, polling every 5 ms.
async fn eventually(deadline: Duration, check: impl Fn() -> bool) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    while !check() {
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// The orphan sweeper rolls back a prepared branch of this node that no transaction owns and
/// the journal has no decision for; it never rolls back a branch whose transaction is in phase
/// 2, a branch of another node, or a decided branch that no machine drives any more (an
/// operator's `resolve --commit` whose branch commit failed: the journal check, not the running
/// map, is what protects that one — it is committed instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweeper_rolls_back_only_undecided_unowned_branches_of_this_node() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let sweeping = CoordinatorConfig {
        orphan_sweep_ms: 20,
        ..config()
    };
    let c = open(dir.path(), std::slice::from_ref(&a), sweeping).await;
    // A decided transaction whose branch commit keeps failing: phase 2 retries it.
    a.commit_failures.store(u32::MAX, Ordering::Relaxed);
    let decided = c.begin();
    c.join(&decided, "a").await.unwrap();
    let outcome = c.commit(&decided).await.unwrap();
    assert!(matches!(outcome, Outcome::Committed { lsn: Some(_) }));
    // Branches prepared behind the coordinator's back, after recovery at open.
    let orphan = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: u64::MAX / 2,
    };
    let foreign = Xid {
        node: 2,
        epoch: Epoch(1),
        seq: 7,
    };
    a.prepared.lock().unwrap().extend([orphan, foreign]);

    assert!(
        eventually(Duration::from_secs(5), || a.rolled_back().contains(&orphan)).await,
        "the orphan was not rolled back"
    );
    assert_eq!(c.orphans_rolled_back(), 1);
    // The operator takes the decided transaction over; its branch commit fails again.
    let resolved = c.resolve(&by_ops(decided, true)).await.unwrap();
    assert!(!resolved.finished, "{resolved:?}");
    assert!(
        matches!(&resolved.branches[..], [(name, BranchOutcome::Unreached(_))] if name == "a"),
        "{resolved:?}"
    );
    // The branch it could not reach is driven again, as recovery would.
    assert!(
        eventually(Duration::from_secs(5), || c
            .list()
            .iter()
            .any(|t| t.xid == decided && t.state == "committing"))
        .await,
        "{:?}",
        c.list()
    );
    // Ten sweeps later, neither the decided branch nor the other node's was rolled back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.rolled_back(), vec![orphan]);
    assert!(a.prepared.lock().unwrap().contains(&decided));
    assert!(a.prepared.lock().unwrap().contains(&foreign));
    assert_eq!(c.orphans_rolled_back(), 1);
    // Once the resource takes commits again, the transaction finishes.
    a.commit_failures.store(0, Ordering::Relaxed);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert!(!a.prepared.lock().unwrap().contains(&decided));
    assert!(c.shutdown(Duration::from_secs(5)).await);
}

/// With `orphan_sweep_ms = 0` there is no sweeper: an unowned prepared branch stays prepared
/// (until the next open's recovery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_sweep_interval_of_zero_turns_the_sweeper_off() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let off = CoordinatorConfig {
        orphan_sweep_ms: 0,
        ..config()
    };
    let c = open(dir.path(), std::slice::from_ref(&a), off).await;
    let orphan = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: u64::MAX / 2,
    };
    a.prepared.lock().unwrap().insert(orphan);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.rolled_back().is_empty());
    assert_eq!(c.orphans_rolled_back(), 0);
    assert!(c.shutdown(Duration::from_secs(5)).await);
}

/// Backpressure: with `max_unfinished = 1`, a second commit waits while the first one's phase 2
/// is held, and goes on as soon as it finishes; past `txn_timeout_ms` of waiting it is refused
/// with a message that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_while_max_unfinished_transactions_are_in_phase_two() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    b.hold_commits.store(true, Ordering::SeqCst);
    let c = open(
        dir.path(),
        &[a.clone(), b.clone()],
        CoordinatorConfig {
            max_unfinished: 1,
            txn_timeout_ms: 2_000,
            ..config()
        },
    )
    .await;
    let first = c.begin();
    c.join(&first, "a").await.unwrap();
    c.join(&first, "b").await.unwrap();
    assert!(matches!(
        c.commit(&first).await.unwrap(),
        Outcome::Committed { .. }
    ));

    let second = c.begin();
    c.join(&second, "a").await.unwrap();
    c.join(&second, "b").await.unwrap();
    let waiting = {
        let c = c.clone();
        tokio::spawn(async move { c.commit(&second).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the second commit did not wait");
    b.hold_commits.store(false, Ordering::SeqCst);
    let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Committed { .. }));
    assert!(c.wait_settled(Duration::from_secs(5)).await);

    // Held again: a commit that cannot get a place within txn_timeout_ms is refused.
    b.hold_commits.store(true, Ordering::SeqCst);
    let third = c.begin();
    c.join(&third, "a").await.unwrap();
    c.join(&third, "b").await.unwrap();
    c.commit(&third).await.unwrap();
    let fourth = c.begin();
    c.join(&fourth, "a").await.unwrap();
    let refused = c.commit(&fourth).await.unwrap_err();
    assert!(
        matches!(&refused, CoordError::Busy { xid, max_unfinished: 1, .. } if *xid == fourth),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("max_unfinished"), "{refused}");
    // The refused transaction is rolled back at once, not left open to whoever forgets it.
    assert!(
        eventually(Duration::from_secs(5), || a.rolled_back().contains(&fourth)).await,
        "the refused transaction's branch was not rolled back"
    );
    let again = c.commit(&fourth).await;
    assert!(
        matches!(again, Err(CoordError::NotActive { .. })),
        "a refused transaction is over: {again:?}"
    );
    b.hold_commits.store(false, Ordering::SeqCst);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    c.shutdown(Duration::from_secs(5)).await;
}

fn one_phase(name: &str) -> Arc<Mem> {
    let r = Mem::new(name);
    r.one_phase.store(true, Ordering::Relaxed);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_branch_commits_in_one_phase_after_its_record_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let a = one_phase("a");
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    let outcome = c.commit(&xid).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Committed { lsn: Some(_) }),
        "{outcome:?}"
    );
    assert_eq!(a.committed(), vec![xid]);
    assert!(
        a.prepared.lock().unwrap().is_empty(),
        "nothing was prepared"
    );
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    // With one-phase commit off, the same resource takes two phases.
    let dir_two = tempfile::tempdir().unwrap();
    let two = open(
        dir_two.path(),
        std::slice::from_ref(&a),
        CoordinatorConfig {
            one_phase: false,
            ..config()
        },
    )
    .await;
    let other = two.begin();
    two.join(&other, "a").await.unwrap();
    two.commit(&other).await.unwrap();
    assert!(two.wait_settled(Duration::from_secs(5)).await);
    two.shutdown(Duration::from_secs(5)).await;
    c.shutdown(Duration::from_secs(5)).await;
    let recs = records(&journal(dir.path()));
    assert!(
        matches!(&recs[..], [CoordRecord::OnePhase { xid: x, resource, .. }, CoordRecord::End { xid: y }] if *x == xid && *y == xid && resource == "a"),
        "{recs:?}"
    );
    let recs = records(&journal(dir_two.path()));
    assert!(
        matches!(
            &recs[..],
            [CoordRecord::Commit { .. }, CoordRecord::End { .. }]
        ),
        "{recs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_one_phase_answer_is_asked_for_until_the_resource_tells() {
    let dir = tempfile::tempdir().unwrap();
    let a = one_phase("a");
    a.lose_answers.store(1, Ordering::Relaxed);
    a.outcome_failures.store(2, Ordering::Relaxed);
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    // The first question fails too: the caller hears "in doubt"; the asking goes on.
    let outcome = c.commit(&xid).await.unwrap();
    assert!(
        matches!(&outcome, Outcome::InDoubt { error, branch: Some(b) } if error.contains("keeps asking") && b == "a"),
        "the outcome does not name the branch in doubt: {outcome:?}"
    );
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    c.shutdown(Duration::from_secs(5)).await;
    let recs = records(&journal(dir.path()));
    assert!(
        matches!(&recs[..], [CoordRecord::OnePhase { .. }, CoordRecord::End { xid: y }] if *y == xid),
        "{recs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_asks_about_one_phase_records_and_operators_cannot_decide_them() {
    let dir = tempfile::tempdir().unwrap();
    let xid = |seq| Xid {
        node: 1,
        epoch: Epoch(1),
        seq,
    };
    {
        let j = journal(dir.path());
        for (seq, resource) in [(20, "a"), (21, "a"), (22, "gone")] {
            let record = CoordRecord::OnePhase {
                xid: xid(seq),
                at_ms: 0,
                resource: resource.into(),
                redo: b"r".to_vec(),
            };
            j.append(Epoch(1), record.kind(), &record.encode())
                .unwrap()
                .wait()
                .unwrap();
        }
    }
    let a = one_phase("a");
    a.committed.lock().unwrap().push(xid(20));
    let (c, report) = Coordinator::open(
        config(),
        journal(dir.path()),
        vec![a.clone() as Arc<dyn Resource>],
    )
    .await
    .unwrap();
    assert_eq!(report.asked, vec![xid(20), xid(21)]);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("gone") && p.contains(&xid(22).to_string())),
        "{:?}",
        report.problems
    );
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    let refused = c.resolve(&by_ops(xid(22), false)).await.unwrap_err();
    assert!(refused.to_string().contains("one phase"), "{refused}");
    c.shutdown(Duration::from_secs(5)).await;
    let recs = records(&journal(dir.path()));
    assert!(
        recs.iter()
            .any(|r| matches!(r, CoordRecord::End { xid: x } if *x == xid(20))),
        "{recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| matches!(r, CoordRecord::Abort { xid: x, .. } if *x == xid(21))),
        "{recs:?}"
    );
}

/// Appends `record` to the journal in `dir` and waits for it.
fn append(dir: &std::path::Path, record: &CoordRecord) {
    let j = journal(dir);
    j.append(Epoch(1), record.kind(), &record.encode())
        .unwrap()
        .wait()
        .unwrap();
}

fn seq(seq: u64) -> Xid {
    Xid {
        node: 1,
        epoch: Epoch(1),
        seq,
    }
}

/// A prepared branch of a transaction whose `Commit` and `End` are both journaled (its commit
/// was lost by a resource restored from a backup) is committed again and reported as a
/// heuristic hazard — never rolled back while the other branches stay committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_commits_again_a_branch_of_an_ended_commit_and_reports_a_hazard() {
    let dir = tempfile::tempdir().unwrap();
    let ended = seq(40);
    append(
        dir.path(),
        &CoordRecord::Commit {
            xid: ended,
            at_ms: 0,
            branches: vec![("a".into(), b"r".to_vec()), ("b".into(), b"r".to_vec())],
        },
    );
    append(dir.path(), &CoordRecord::End { xid: ended });
    let a = Mem::new("a");
    a.prepared.lock().unwrap().insert(ended);
    let (c, report) = Coordinator::open(
        config(),
        journal(dir.path()),
        vec![Arc::clone(&a) as Arc<dyn Resource>],
    )
    .await
    .unwrap();
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.committed(), vec![ended]);
    assert!(a.rolled_back().is_empty(), "{:?}", a.rolled_back());
    assert_eq!(report.recommitted, vec![("a".to_string(), ended)]);
    assert!(
        report
            .hazards
            .iter()
            .any(|h| h.contains(&ended.to_string())),
        "{report:?}"
    );
    assert!(report.rolled_back.is_empty(), "{report:?}");
    c.shutdown(Duration::from_secs(5)).await;
}

/// A one-phase commit is answered only once its `End` is durable: the journal holds it the
/// moment the caller hears "committed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_is_answered_only_once_its_end_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let a = one_phase("a");
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    for _ in 0..20 {
        let xid = c.begin();
        c.join(&xid, "a").await.unwrap();
        let outcome = c.commit(&xid).await.unwrap();
        assert!(matches!(outcome, Outcome::Committed { lsn: Some(_) }));
        let recs = records(c.journal());
        assert!(
            recs.iter()
                .any(|r| matches!(r, CoordRecord::End { xid: x } if *x == xid)),
            "{xid} answered before its End was durable: {recs:?}"
        );
    }
    c.shutdown(Duration::from_secs(5)).await;
}

/// `resolve --commit` of a transaction whose branch lives in a resource that is gone reports
/// that branch unreached and leaves the transaction open (no `End`, driven again at the next
/// start); forgetting the branch, with a reason, ends it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_reports_unreached_branches_and_forget_ends_the_transaction_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = seq(50);
    append(
        dir.path(),
        &CoordRecord::Commit {
            xid: stuck,
            at_ms: 0,
            branches: vec![("a".into(), b"r".to_vec()), ("gone".into(), b"r".to_vec())],
        },
    );
    let a = Mem::new("a");
    a.prepared.lock().unwrap().insert(stuck);
    a.hold_commits.store(true, Ordering::SeqCst);
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    a.hold_commits.store(false, Ordering::SeqCst);
    let report = c.resolve(&by_ops(stuck, true)).await.unwrap();
    assert!(!report.finished, "{report:?}");
    let outcomes: Vec<_> = report
        .branches
        .iter()
        .map(|(n, o)| (n.as_str(), o))
        .collect();
    assert!(
        matches!(
            &outcomes[..],
            [
                // Recovery's own phase 2 may have committed it first.
                ("a", BranchOutcome::Finished | BranchOutcome::NotPrepared),
                ("gone", BranchOutcome::Unreached(_))
            ]
        ),
        "{report:?}"
    );
    let refused = c
        .resolve(&ResolveRequest {
            forget: vec!["gone".into()],
            ..by_ops(stuck, true)
        })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("reason"), "{refused}");
    let report = c
        .resolve(&ResolveRequest {
            forget: vec!["gone".into()],
            reason: "the disk array is lost".into(),
            ..by_ops(stuck, true)
        })
        .await
        .unwrap();
    assert!(report.finished, "{report:?}");
    assert!(
        report
            .branches
            .iter()
            .any(|(n, o)| n == "gone" && *o == BranchOutcome::Forgotten)
    );
    c.shutdown(Duration::from_secs(5)).await;
    let recs = records(&journal(dir.path()));
    assert!(
        recs.iter().any(|r| matches!(r, CoordRecord::Forget { xid, resource, operator, .. } if *xid == stuck && resource == "gone" && operator == "ops")),
        "{recs:?}"
    );
    assert!(
        matches!(recs.last(), Some(CoordRecord::End { xid }) if *xid == stuck),
        "{recs:?}"
    );
    // The next start drives nothing: the transaction stays ended.
    let (c, report) = Coordinator::open(
        config(),
        journal(dir.path()),
        vec![Arc::clone(&a) as Arc<dyn Resource>],
    )
    .await
    .unwrap();
    assert!(report.redriven.is_empty(), "{report:?}");
    assert!(report.problems.is_empty(), "{report:?}");
    c.shutdown(Duration::from_secs(5)).await;
}

/// An xid that neither the journal nor any resource knows is refused by name, and nothing is
/// journaled for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_an_unknown_xid_is_refused_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let c = open(dir.path(), std::slice::from_ref(&a), config()).await;
    let unknown = seq(77);
    let refused = c.resolve(&by_ops(unknown, false)).await.unwrap_err();
    assert!(refused.to_string().contains("unknown"), "{refused}");
    assert!(
        refused.to_string().contains(&unknown.to_string()),
        "{refused}"
    );
    c.shutdown(Duration::from_secs(5)).await;
    assert!(records(&journal(dir.path())).is_empty());
}

/// Every resource call has a deadline: a prepare that does not answer within `call_timeout_ms`
/// votes no (the transaction rolls back, naming the deadline); a phase-2 commit past it is
/// retried until the resource answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_calls_past_their_deadline_vote_no_or_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let quick = CoordinatorConfig {
        call_timeout_ms: 200,
        ..config()
    };
    let c = open(dir.path(), std::slice::from_ref(&a), quick).await;
    a.hold_prepares.store(true, Ordering::SeqCst);
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), c.commit(&xid))
        .await
        .expect("a hung prepare must not hang the commit")
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::RolledBack { reason, .. } if reason.contains("200 ms")),
        "{outcome:?}"
    );
    a.hold_prepares.store(false, Ordering::SeqCst);
    assert!(c.wait_settled(Duration::from_secs(5)).await);

    a.hold_commits.store(true, Ordering::SeqCst);
    let decided = c.begin();
    c.join(&decided, "a").await.unwrap();
    let outcome = c.commit(&decided).await.unwrap();
    assert!(matches!(outcome, Outcome::Committed { lsn: Some(_) }));
    let listed = c.list();
    let retrying = eventually(Duration::from_secs(5), || {
        c.list().iter().any(|t| {
            t.xid == decided
                && t.branches
                    .iter()
                    .any(|(_, _, e)| e.as_deref().is_some_and(|e| e.contains("200 ms")))
        })
    })
    .await;
    assert!(retrying, "{listed:?}");
    a.hold_commits.store(false, Ordering::SeqCst);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert!(a.committed().contains(&decided));
    c.shutdown(Duration::from_secs(5)).await;
}

fn small_segments(dir: &std::path::Path) -> Journal {
    Journal::open(
        dir,
        JournalConfig {
            create_if_missing: true,
            segment_bytes_max: 64 << 10,
            record_bytes_max: 16 << 10,
            ..JournalConfig::default()
        },
    )
    .unwrap()
}

fn segment_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".seg")
        })
        .count()
}

/// The checkpoint removes every segment that only finished transactions use, but keeps the
/// segment of a transaction still in phase 2 (and everything after it), and what a retention
/// floor holds; recovery then reads from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_removes_segments_only_finished_transactions_use() {
    let dir = tempfile::tempdir().unwrap();
    let a = Mem::new("a");
    let b = Mem::new("b");
    let quick = CoordinatorConfig {
        checkpoint_ms: 20,
        ..config()
    };
    let resources = vec![
        Arc::clone(&a) as Arc<dyn Resource>,
        Arc::clone(&b) as Arc<dyn Resource>,
    ];
    let (c, _) = Coordinator::open(quick.clone(), small_segments(dir.path()), resources)
        .await
        .unwrap();
    let commit_many = |n: usize| {
        let c = &c;
        async move {
            for _ in 0..n {
                let xid = c.begin();
                c.join(&xid, "a").await.unwrap();
                c.join(&xid, "b").await.unwrap();
                assert!(matches!(
                    c.commit(&xid).await.unwrap(),
                    Outcome::Committed { .. }
                ));
            }
        }
    };
    commit_many(2_000).await;
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    let oldest = |c: &Coordinator| c.journal().oldest_lsn();
    assert!(
        eventually(Duration::from_secs(5), || oldest(&c) > Lsn(1)).await,
        "the first segment was never removed"
    );
    assert!(
        eventually(Duration::from_secs(5), || segment_count(dir.path()) <= 2).await,
        "{} segments remain",
        segment_count(dir.path())
    );
    // A transaction stuck in phase 2 pins its decision's segment and everything after it.
    b.commit_failures.store(u32::MAX, Ordering::Relaxed);
    let stuck = c.begin();
    c.join(&stuck, "a").await.unwrap();
    c.join(&stuck, "b").await.unwrap();
    let Outcome::Committed { lsn: Some(decided) } = c.commit(&stuck).await.unwrap() else {
        panic!("not committed");
    };
    commit_many_until_segments_on(&c, dir.path(), 4, "a").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        oldest(&c) <= decided,
        "the stuck transaction's decision was removed"
    );
    // A retention floor holds records too, whatever else finished.
    c.retention().hold_floor(Some(decided));
    b.commit_failures.store(0, Ordering::Relaxed);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(oldest(&c) <= decided, "the floor was not held");
    c.retention().hold_floor(None);
    assert!(
        eventually(Duration::from_secs(5), || oldest(&c) > decided).await,
        "nothing was removed once the floor went"
    );
    assert!(c.shutdown(Duration::from_secs(5)).await);
    let (c, report) = Coordinator::open(quick, small_segments(dir.path()), vec![a as _, b as _])
        .await
        .unwrap();
    assert!(report.redriven.is_empty(), "{report:?}");
    c.shutdown(Duration::from_secs(5)).await;
}

/// Appends `records` to the small-segment journal in `dir`.
fn append_small(dir: &std::path::Path, records: &[CoordRecord]) {
    let j = small_segments(dir);
    for record in records {
        j.append(Epoch(1), record.kind(), &record.encode())
            .unwrap()
            .wait()
            .unwrap();
    }
}

fn checkpointing() -> CoordinatorConfig {
    CoordinatorConfig {
        checkpoint_ms: 20,
        orphan_sweep_ms: 50,
        ..config()
    }
}

/// While a resource could not list its prepared branches, the checkpoint removes nothing
/// recovery read; and the decision of a transaction that ended committed stays while a
/// resource holds a branch of it that cannot be committed yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_keeps_the_decision_of_a_branch_committed_again() {
    let dir = tempfile::tempdir().unwrap();
    let ended = seq(60);
    append_small(
        dir.path(),
        &[
            CoordRecord::Commit {
                xid: ended,
                at_ms: 0,
                branches: vec![("a".into(), b"r".to_vec())],
            },
            CoordRecord::End { xid: ended },
        ],
    );
    let a = Mem::new("a");
    let b = Mem::new("b");
    a.prepared.lock().unwrap().insert(ended);
    a.commit_failures.store(u32::MAX, Ordering::Relaxed);
    b.fail_recover.store(true, Ordering::SeqCst);
    let resources = vec![
        Arc::clone(&a) as Arc<dyn Resource>,
        Arc::clone(&b) as Arc<dyn Resource>,
    ];
    let (c, report) = Coordinator::open(checkpointing(), small_segments(dir.path()), resources)
        .await
        .unwrap();
    assert_eq!(report.recommitted, vec![("a".to_string(), ended)]);
    commit_many_until_segments_on(&c, dir.path(), 4, "b").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        c.journal().oldest_lsn(),
        Lsn(1),
        "removed while b never answered"
    );
    // b answers: the startup pin goes, but the ended transaction's decision stays.
    b.fail_recover.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.journal().oldest_lsn(),
        Lsn(1),
        "a needed decision was removed"
    );
    // The branch commits at last: nothing pins the first segment any more.
    a.commit_failures.store(0, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(5), || c.journal().oldest_lsn() > Lsn(1)).await,
        "nothing was removed once the branch committed"
    );
    assert!(a.committed().contains(&ended));
    c.shutdown(Duration::from_secs(5)).await;
}

/// A `OnePhase` record whose resource is not configured stays: a start that has the resource
/// must still learn its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_keeps_a_one_phase_record_nothing_can_ask_about() {
    let dir = tempfile::tempdir().unwrap();
    let lone = seq(61);
    append_small(
        dir.path(),
        &[CoordRecord::OnePhase {
            xid: lone,
            at_ms: 0,
            resource: "gone".into(),
            redo: b"r".to_vec(),
        }],
    );
    let b = Mem::new("b");
    let resources = vec![Arc::clone(&b) as Arc<dyn Resource>];
    let (c, _) = Coordinator::open(checkpointing(), small_segments(dir.path()), resources)
        .await
        .unwrap();
    commit_many_until_segments_on(&c, dir.path(), 4, "b").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.journal().oldest_lsn(),
        Lsn(1),
        "the one-phase record was removed"
    );
    c.shutdown(Duration::from_secs(5)).await;
}

/// Commits through resource `name` alone until the journal in `dir` has at least `segments`
/// segments.
async fn commit_many_until_segments_on(
    c: &Coordinator,
    dir: &std::path::Path,
    segments: usize,
    name: &str,
) {
    for _ in 0..20_000 {
        if segment_count(dir) >= segments {
            return;
        }
        let xid = c.begin();
        c.join(&xid, name).await.unwrap();
        c.commit(&xid).await.unwrap();
    }
    panic!("the journal never reached {segments} segments");
}

/// A waiter that gives up hears, per transaction, what it waits for and why: the decision, the
/// branch not finished and the last error of its retried commit — not the branches done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_hears_which_branch_phase_two_waits_for_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Mem::new("a"), Mem::new("b"));
    b.commit_failures.store(u32::MAX, Ordering::SeqCst);
    let c = open(dir.path(), &[Arc::clone(&a), Arc::clone(&b)], config()).await;
    let xid = c.begin();
    c.join(&xid, "a").await.unwrap();
    c.join(&xid, "b").await.unwrap();
    assert!(matches!(
        c.commit(&xid).await.unwrap(),
        Outcome::Committed { .. }
    ));
    assert!(eventually(Duration::from_secs(5), || a.committed() == vec![xid]).await);
    assert!(!c.wait_settled(Duration::from_millis(100)).await);
    let lines = c.pending_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    for wanted in [
        &xid.to_string()[..],
        "decision: commit",
        "waiting for resource b (committing): resource b: down; retrying",
    ] {
        assert!(line.contains(wanted), "{wanted:?} not in {line:?}");
    }
    assert!(!line.contains("resource a"), "{line}");
    assert!(!line.contains("TxnInfo"), "{line}");
    b.commit_failures.store(0, Ordering::SeqCst);
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert!(c.pending_lines().is_empty());
    c.shutdown(Duration::from_secs(5)).await;
}

/// A journal whose decided transaction has a branch in a resource the configuration lacks is
/// reported at open, naming the resource and the xid and saying to configure it; the configured
/// branches finish, and a waiter is not held up by the branch nothing can finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_naming_an_unconfigured_resource_is_reported_at_open_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = seq(60);
    append(
        dir.path(),
        &CoordRecord::Commit {
            xid: stuck,
            at_ms: 0,
            branches: vec![("a".into(), b"r".to_vec()), ("pg".into(), b"r".to_vec())],
        },
    );
    let a = Mem::new("a");
    a.prepared.lock().unwrap().insert(stuck);
    let (c, report) = Coordinator::open(
        config(),
        journal(dir.path()),
        vec![Arc::clone(&a) as Arc<dyn Resource>],
    )
    .await
    .unwrap();
    assert_eq!(
        report.unconfigured.get("pg").map(Vec::as_slice),
        Some(&[stuck][..]),
        "{report:?}"
    );
    assert_eq!(report.unconfigured.len(), 1, "{report:?}");
    let message = report.unconfigured_message().unwrap();
    for wanted in [&stuck.to_string()[..], "pg", "add those resources"] {
        assert!(message.contains(wanted), "{wanted:?} not in {message:?}");
    }
    assert!(c.wait_settled(Duration::from_secs(5)).await);
    assert_eq!(a.committed(), vec![stuck]);
    let lines = c.pending_lines();
    assert!(
        matches!(&lines[..], [line] if line.contains("resource pg") && line.contains("not in the configuration")),
        "{lines:?}"
    );
    c.shutdown(Duration::from_secs(5)).await;
}
