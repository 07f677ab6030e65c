//! Branches prepared in another process and joined with `Coordinator::join_prepared` (a remote
//! application's PostgreSQL branch), per-transaction timeouts, and what the orphan sweeper does
//! to a branch prepared before its enlisting — against an in-memory resource that offers
//! one-phase commit and lists what it holds prepared.

#![allow(clippy::unwrap_used)]

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::{Epoch, Lsn, OnePhaseOutcome, Resource, ResourceError, Vote, Xid};
use coordinator::{CoordError, Coordinator, CoordinatorConfig, Outcome, RetryPolicy};
use journal::{Journal, JournalConfig};

/// A resource that counts its calls; a branch is "prepared elsewhere" by putting its xid in
/// `prepared`.
#[derive(Default)]
struct Remote {
    begins: AtomicU32,
    prepares: AtomicU32,
    one_phase_prepares: AtomicU32,
    prepared: Mutex<HashSet<Xid>>,
    committed: Mutex<Vec<Xid>>,
    rolled_back: Mutex<Vec<Xid>>,
}

impl Remote {
    fn rolled_back(&self) -> Vec<Xid> {
        self.rolled_back.lock().unwrap().clone()
    }
    fn committed(&self) -> Vec<Xid> {
        self.committed.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Resource for Remote {
    fn name(&self) -> &str {
        "pg"
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    async fn begin(&self, _xid: &Xid) -> Result<(), ResourceError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn prepare(&self, xid: &Xid) -> Result<Vote, ResourceError> {
        self.prepares.fetch_add(1, Ordering::SeqCst);
        self.prepared.lock().unwrap().insert(*xid);
        Ok(Vote::Commit {
            redo: b"redo".to_vec(),
        })
    }
    async fn commit(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.prepared.lock().unwrap().remove(xid);
        self.committed.lock().unwrap().push(*xid);
        Ok(())
    }
    async fn rollback(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.prepared.lock().unwrap().remove(xid);
        self.rolled_back.lock().unwrap().push(*xid);
        Ok(())
    }
    async fn recover(&self) -> Result<Vec<Xid>, ResourceError> {
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
        true
    }
    async fn prepare_one_phase(&self, _xid: &Xid) -> Result<Vote, ResourceError> {
        self.one_phase_prepares.fetch_add(1, Ordering::SeqCst);
        Ok(Vote::Commit {
            redo: b"redo".to_vec(),
        })
    }
    async fn commit_one_phase(&self, xid: &Xid) -> Result<OnePhaseOutcome, ResourceError> {
        self.committed.lock().unwrap().push(*xid);
        Ok(OnePhaseOutcome::Committed)
    }
    async fn one_phase_outcome(
        &self,
        _xid: &Xid,
        _redo: &[u8],
    ) -> Result<OnePhaseOutcome, ResourceError> {
        Ok(OnePhaseOutcome::Committed)
    }
}

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        retry: RetryPolicy {
            first_ms: 1,
            max_ms: 8,
        },
        ..CoordinatorConfig::default()
    }
}

async fn open(dir: &std::path::Path, r: &Arc<Remote>, config: CoordinatorConfig) -> Coordinator {
    let journal = Journal::open(
        dir,
        JournalConfig {
            create_if_missing: true,
            ..JournalConfig::default()
        },
    )
    .unwrap();
    let resources = vec![Arc::clone(r) as Arc<dyn Resource>];
    Coordinator::open(config, journal, resources)
        .await
        .unwrap()
        .0
}

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

/// A lone branch prepared elsewhere is not begun here and takes two phases (a decision record),
/// where the same resource joined the ordinary way takes one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_branch_prepared_elsewhere_takes_two_phases() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(Remote::default());
    let c = open(dir.path(), &r, config()).await;

    let remote = c.begin();
    r.prepared.lock().unwrap().insert(remote);
    c.join_prepared(&remote, "pg").await.unwrap();
    // Joining it again (a retried enlisting) is a no-op.
    c.join_prepared(&remote, "pg").await.unwrap();
    assert_eq!(r.begins.load(Ordering::SeqCst), 0);
    let outcome = c.commit(&remote).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Committed { lsn: Some(_) }),
        "{outcome:?}"
    );
    assert_eq!(r.prepares.load(Ordering::SeqCst), 1);
    assert_eq!(r.one_phase_prepares.load(Ordering::SeqCst), 0);
    assert!(eventually(Duration::from_secs(5), || r.committed().contains(&remote)).await);

    let local = c.begin();
    c.join(&local, "pg").await.unwrap();
    assert_eq!(r.begins.load(Ordering::SeqCst), 1);
    // A branch begun here cannot also be joined as prepared elsewhere.
    let Err(refused) = c.join_prepared(&local, "pg").await else {
        panic!("joined twice");
    };
    assert!(matches!(refused, CoordError::Refused(_)), "{refused}");
    c.commit(&local).await.unwrap();
    assert_eq!(r.one_phase_prepares.load(Ordering::SeqCst), 1);
    assert_eq!(r.prepares.load(Ordering::SeqCst), 1);
}

/// A transaction's own timeout, shorter than `txn_timeout_ms`, rolls it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_times_out_at_its_own_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(Remote::default());
    let c = open(dir.path(), &r, config()).await;
    let short = c.begin_with_timeout(Duration::from_millis(50));
    let long = c.begin();
    let set = c.begin();
    c.set_timeout(&set, Duration::from_millis(50)).unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    for xid in [short, set] {
        let e = c.commit(&xid).await.unwrap_err();
        assert!(
            matches!(e, CoordError::TimedOut { timeout_ms: 50, .. }),
            "{e}"
        );
    }
    c.join(&long, "pg").await.unwrap();
    assert!(matches!(
        c.commit(&long).await.unwrap(),
        Outcome::Committed { .. }
    ));
}

/// A branch enlisted after its transaction timed out is rolled back at once, even before the
/// reaper's next round (here a second away) has marked the transaction timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_enlisted_after_the_timeout_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(Remote::default());
    let c = open(dir.path(), &r, config()).await;
    let xid = c.begin_with_timeout(Duration::from_millis(20));
    r.prepared.lock().unwrap().insert(xid);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let Err(e) = c.join_prepared(&xid, "pg").await else {
        panic!("joined after the timeout");
    };
    assert!(matches!(e, CoordError::TimedOut { .. }), "{e}");
    assert!(eventually(Duration::from_secs(5), || r.rolled_back().contains(&xid)).await);
}

/// The orphan sweeper never rolls back a branch prepared by an application that has not
/// enlisted it yet while its transaction is open here; once the transaction timed out (the
/// application died before enlisting), it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_spares_a_branch_awaiting_enlisting_until_its_transaction_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(Remote::default());
    let sweeping = CoordinatorConfig {
        orphan_sweep_ms: 20,
        ..config()
    };
    let c = open(dir.path(), &r, sweeping).await;

    // Prepared by the application; the enlisting comes after many sweeps.
    let slow = c.begin();
    r.prepared.lock().unwrap().insert(slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(r.rolled_back().is_empty(), "{:?}", r.rolled_back());
    c.join_prepared(&slow, "pg").await.unwrap();
    c.commit(&slow).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || r.committed().contains(&slow)).await);

    // Prepared by an application that died before enlisting: nobody commits, rolls back,
    // or drops the transaction; its timeout passes.
    let died = c.begin_with_timeout(Duration::from_millis(100));
    r.prepared.lock().unwrap().insert(died);
    assert!(
        eventually(Duration::from_secs(5), || r.rolled_back().contains(&died)).await,
        "the branch of a timed-out transaction was never rolled back"
    );
    assert_eq!(c.orphans_rolled_back(), 1);
    assert!(!r.rolled_back().contains(&slow));
}
