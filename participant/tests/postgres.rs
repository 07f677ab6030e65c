//! Transactions with a PostgreSQL branch, end to end against a real PostgreSQL 15 server (the
//! throwaway clusters of `adapters::pgtest`): a mixed commit and its failures, phase 2 across a
//! server crash, recovery of a branch prepared before a coordinator crash, the journal order of
//! two conflicting writers replayed at a standby, a serialization failure, a server restart in
//! the middle of a transaction, and the orphan sweeper.
//!
//! Tests that stop the server run a private cluster ([`PgCluster::start`]); the others share the
//! binary's cluster, each in a database of its own and with a node id of its own (gids are
//! cluster-wide, and two coordinators opened in the same microsecond would make the same xids).
//! Every wait is bounded by a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    STEP_DEADLINE, close, commit, commit_rolled_back, commits, committed_lsn, decided_lsn, open,
    record_kinds, rolled_back_reason, within,
};

use std::any::Any;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::pgtest::{PgCluster, wait_until};
use adapters::postgres::{self, PostgresConfig, PostgresResource};
use adapters::{Epoch, ErrorClass, Lsn, Resource, ResourceError, Vote, Xid};

use coordinator::{CoordError, Coordinator, CoordinatorConfig, RetryPolicy};
use journal::{Journal, JournalConfig};
use participant::{ConcordError, Config, ResourceConfig, Transaction};

/// Bound on phase 2 across a server outage.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
/// Phase-2 retries of the tests that build their coordinator: quick, capped low.
const QUICK_RETRY: RetryPolicy = RetryPolicy {
    first_ms: 20,
    max_ms: 250,
};

/// Creates database `db` in `cluster` with the concord schema and an `orders` table under
/// capture; returns its connection string.
async fn orders_db(cluster: &PgCluster, db: &str) -> String {
    let url = cluster.database(db).unwrap();
    postgres::install("orders", &url).await.unwrap();
    cluster
        .psql(db, "CREATE TABLE orders (id bigint PRIMARY KEY, item text)")
        .unwrap();
    postgres::replicate("orders", &url, &["orders".into()])
        .await
        .unwrap();
    url
}

/// The embedded configuration under `dir` (files resources `uploads` and `thumbnails`) with the
/// PostgreSQL resource `orders` at `url`, as node `node`.
fn pg_config(dir: &Path, node: u32, url: &str) -> Config {
    let mut config = Config::embedded(dir);
    config.node = node;
    config.resources.insert(
        "orders".into(),
        ResourceConfig::Postgres {
            url: url.into(),
            pool_size: 16,
            fence_wait_ms: 2000,
            call_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
        },
    );
    config
}

/// Runs `sql` in the `orders` branch of `tx`.
async fn execute(tx: &Transaction, sql: &str) -> Result<u64, ConcordError> {
    let orders = within("join orders", tx.postgres("orders")).await?;
    within(sql, orders.execute(sql, &[])).await
}

fn resource_error(e: &ConcordError) -> Option<&ResourceError> {
    match e {
        ConcordError::Resource(r) | ConcordError::Coordinator(CoordError::Resource(r)) => Some(r),
        _ => None,
    }
}

/// The item of order `id` in database `db` (`None`: no such row).
fn item(cluster: &PgCluster, db: &str, id: i64) -> Option<String> {
    let out = cluster
        .psql(
            db,
            &format!("SELECT coalesce(item, '<null>') FROM orders WHERE id = {id}"),
        )
        .unwrap();
    (!out.is_empty()).then_some(out)
}

/// The gids of every prepared transaction of database `db`.
fn prepared_gids(cluster: &PgCluster, db: &str) -> Vec<String> {
    cluster
        .psql(
            db,
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid",
        )
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The real PostgreSQL resource behind a test hook on `commit`: it counts the calls and, before
/// passing the first one on, can stop the server (and start it again from a thread of its own
/// after [`OUTAGE`]); while `hold_commits` is set, commits wait, and while `hold_recovers` is
/// set, so do the listings of prepared branches (the orphan sweeper's). Everything else is
/// delegated, and `as_any` is the inner resource's, so branch handles still find the PostgreSQL
/// resource.
struct Hooked {
    inner: Arc<dyn Resource>,
    /// Stop this cluster at the first commit.
    crash: Option<Arc<PgCluster>>,
    crashed: AtomicBool,
    /// The thread that starts the cluster again.
    restarter: Mutex<Option<std::thread::JoinHandle<()>>>,
    hold_commits: AtomicBool,
    hold_recovers: AtomicBool,
    commit_calls: AtomicU32,
}

/// How long the server stays down in the phase-2 outage test.
const OUTAGE: Duration = Duration::from_secs(2);

impl Hooked {
    fn new(inner: Arc<dyn Resource>, crash: Option<Arc<PgCluster>>) -> Arc<Hooked> {
        Arc::new(Hooked {
            inner,
            crash,
            crashed: AtomicBool::new(false),
            restarter: Mutex::new(None),
            hold_commits: AtomicBool::new(false),
            hold_recovers: AtomicBool::new(false),
            commit_calls: AtomicU32::new(0),
        })
    }

    /// Stops the cluster (once) and starts the thread that restarts it after [`OUTAGE`].
    async fn crash_once(&self) {
        let Some(cluster) = &self.crash else { return };
        if self.crashed.swap(true, Ordering::SeqCst) {
            return;
        }
        let stopping = Arc::clone(cluster);
        tokio::task::spawn_blocking(move || stopping.stop_immediate())
            .await
            .unwrap()
            .expect("pg_ctl stop -m immediate");
        let restarting = Arc::clone(cluster);
        let restarter = std::thread::spawn(move || {
            std::thread::sleep(OUTAGE);
            restarting.restart().expect("restart the cluster");
        });
        *self.restarter.lock().unwrap() = Some(restarter);
    }

    /// Waits for the restarting thread (if any) to finish.
    fn join_restarter(&self) {
        if let Some(restarter) = self.restarter.lock().unwrap().take() {
            restarter.join().expect("the restarting thread panicked");
        }
    }
}

#[async_trait::async_trait]
impl Resource for Hooked {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn as_any(&self) -> &dyn Any {
        self.inner.as_any()
    }
    async fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.inner.begin(xid).await
    }
    async fn prepare(&self, xid: &Xid) -> Result<Vote, ResourceError> {
        self.inner.prepare(xid).await
    }
    async fn commit(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.commit_calls.fetch_add(1, Ordering::SeqCst);
        self.crash_once().await;
        while self.hold_commits.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.commit(xid).await
    }
    async fn rollback(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.inner.rollback(xid).await
    }
    async fn recover(&self) -> Result<Vec<Xid>, ResourceError> {
        while self.hold_recovers.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.recover().await
    }
    async fn fence(&self, epoch: Epoch) -> Result<(), ResourceError> {
        self.inner.fence(epoch).await
    }
    async fn fence_epoch(&self) -> Result<Epoch, ResourceError> {
        self.inner.fence_epoch().await
    }
    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<(), ResourceError> {
        self.inner.replay(redo, lsn).await
    }
    async fn applied_lsn(&self) -> Result<Lsn, ResourceError> {
        self.inner.applied_lsn().await
    }
}

/// Opens the PostgreSQL resource `orders` at `url` as `node`.
async fn open_orders(url: &str, node: u32) -> Arc<PostgresResource> {
    let mut config = PostgresConfig::new(url, node);
    config.pool_size = 8;
    config.pool_wait_ms = 2_000;
    within(
        "open the postgres resource",
        PostgresResource::open("orders", config),
    )
    .await
    .unwrap()
}

/// A coordinator built by hand (journal under `dir`) over `resource`.
async fn open_coordinator(
    dir: &Path,
    node: u32,
    resource: Arc<dyn Resource>,
    orphan_sweep_ms: u64,
) -> Coordinator {
    let journal = Journal::open(
        dir.join("journal"),
        JournalConfig {
            create_if_missing: true,
            ..JournalConfig::default()
        },
    )
    .unwrap();
    let config = CoordinatorConfig {
        node,
        retry: QUICK_RETRY,
        orphan_sweep_ms,
        ..CoordinatorConfig::default()
    };
    within(
        "open the coordinator",
        Coordinator::open(config, journal, vec![resource]),
    )
    .await
    .unwrap()
    .0
}

/// A transaction writing a file and an order row commits both; one whose statement fails is
/// refused at that statement with PostgreSQL's message, and its commit rolls back the file
/// too; one whose failure shows only at `PREPARE TRANSACTION` (a deferred constraint) rolls
/// back both, and the outcome's reason names the resource `orders` and carries PostgreSQL's
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_transaction_commits_both_branches_or_neither() {
    let cluster = PgCluster::shared();
    let url = orders_db(cluster, "mixed").await;
    cluster
        .psql(
            "mixed",
            "ALTER TABLE orders ADD CONSTRAINT orders_item_unique UNIQUE (item) DEFERRABLE INITIALLY DEFERRED",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let concord = open(pg_config(dir.path(), 11, &url)).await;
    let uploads = dir.path().join("uploads");

    let mut tx = concord.begin().await.unwrap();
    let files = within("join uploads", tx.files("uploads")).await.unwrap();
    within("put", files.put("orders/1.txt", &b"one book"[..]))
        .await
        .unwrap();
    execute(&tx, "INSERT INTO orders VALUES (1, 'book')")
        .await
        .unwrap();
    committed_lsn(&commit(&mut tx).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        std::fs::read(uploads.join("orders/1.txt")).unwrap(),
        b"one book"
    );
    assert_eq!(item(cluster, "mixed", 1).as_deref(), Some("book"));

    // A statement that fails at once.
    let mut tx = concord.begin().await.unwrap();
    let files = within("join uploads", tx.files("uploads")).await.unwrap();
    within("put", files.put("orders/2.txt", &b"duplicate"[..]))
        .await
        .unwrap();
    let err = execute(&tx, "INSERT INTO orders VALUES (1, 'again')")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("orders") && text.contains("duplicate key value violates unique constraint"),
        "{text}"
    );
    assert_eq!(
        resource_error(&err).map(ResourceError::class),
        Some(ErrorClass::Rejected)
    );
    let reason = commit_rolled_back(&mut tx).await;
    assert!(reason.contains("resource orders"), "{reason}");

    // A statement whose failure shows at prepare (the deferred unique constraint).
    let mut tx = concord.begin().await.unwrap();
    let files = within("join uploads", tx.files("uploads")).await.unwrap();
    within("put", files.put("orders/3.txt", &b"second book"[..]))
        .await
        .unwrap();
    execute(&tx, "INSERT INTO orders VALUES (3, 'book')")
        .await
        .unwrap();
    let reason = commit_rolled_back(&mut tx).await;
    assert!(
        reason.contains("resource orders")
            && reason
                .contains("duplicate key value violates unique constraint \"orders_item_unique\""),
        "{reason}"
    );

    close(concord).await;
    assert!(!uploads.join("orders/2.txt").exists());
    assert!(!uploads.join("orders/3.txt").exists());
    assert_eq!(item(cluster, "mixed", 3), None);
    assert_eq!(
        cluster
            .psql("mixed", "SELECT count(*) FROM orders")
            .unwrap(),
        "1"
    );
    assert!(prepared_gids(cluster, "mixed").is_empty());
}

/// Phase 2 survives the server going away: the server is stopped (`pg_ctl stop -m immediate`)
/// after the decision is durable and before `COMMIT PREPARED`, and started again two seconds
/// later; the caller hears "committed" at once, the coordinator keeps retrying the commit until
/// the server is back, and then the row is there and no prepared transaction is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_two_survives_the_server_going_away() {
    let cluster = Arc::new(PgCluster::start().unwrap());
    let url = orders_db(&cluster, "outage").await;
    let pg = open_orders(&url, 1).await;
    let hooked = Hooked::new(pg.clone(), Some(Arc::clone(&cluster)));
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open_coordinator(dir.path(), 1, hooked.clone(), 0).await;

    let xid = coordinator.begin();
    within("join", coordinator.join(&xid, "orders"))
        .await
        .unwrap();
    let branch = pg.branch(&xid).unwrap();
    within(
        "insert",
        branch.execute("INSERT INTO orders VALUES (2, 'survivor')", &[]),
    )
    .await
    .unwrap();
    let outcome = within("commit", coordinator.commit(&xid)).await.unwrap();
    decided_lsn(&outcome);

    assert!(
        coordinator.wait_settled(SETTLE_DEADLINE).await,
        "phase 2 did not finish within {SETTLE_DEADLINE:?}: {:?}",
        coordinator.list()
    );
    hooked.join_restarter();
    assert!(hooked.crashed.load(Ordering::SeqCst));
    let calls = hooked.commit_calls.load(Ordering::SeqCst);
    assert!(
        calls >= 2,
        "the commit was tried {calls} time(s); the first one met a stopped server"
    );
    assert_eq!(item(&cluster, "outage", 2).as_deref(), Some("survivor"));
    assert!(prepared_gids(&cluster, "outage").is_empty());
    assert!(coordinator.shutdown(STEP_DEADLINE).await);
}

/// A coordinator crash between PREPARE and the decision: a branch prepared through the resource,
/// with no decision ever journaled, is rolled back by the recovery of the next open (presumed
/// abort): no prepared transaction is left, the row is absent, and a new transaction writes the
/// same row without waiting on the old branch's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_prepared_before_a_coordinator_crash_is_rolled_back_at_open() {
    let cluster = PgCluster::shared();
    let url = orders_db(cluster, "crash").await;
    let dir = tempfile::tempdir().unwrap();
    let concord = open(pg_config(dir.path(), 13, &url)).await;
    let coordinator = concord.coordinator().clone();
    let xid = coordinator.begin();
    let resource = Arc::clone(coordinator.resource("orders").unwrap());
    within("begin", resource.begin(&xid)).await.unwrap();
    let pg = resource
        .as_any()
        .downcast_ref::<PostgresResource>()
        .unwrap();
    let branch = pg.branch(&xid).unwrap();
    within(
        "insert",
        branch.execute("INSERT INTO orders VALUES (3, 'undecided')", &[]),
    )
    .await
    .unwrap();
    let vote = within("prepare", resource.prepare(&xid)).await.unwrap();
    assert!(matches!(vote, Vote::Commit { .. }), "{vote:?}");
    let gid = pg.gid(&xid);
    // The "crash": everything goes away without a decision.
    drop((branch, resource, coordinator));
    assert!(concord.close(STEP_DEADLINE).await);
    assert_eq!(prepared_gids(cluster, "crash"), vec![gid]);

    let concord = open(pg_config(dir.path(), 13, &url)).await;
    assert_eq!(
        concord.recovery().rolled_back,
        vec![("orders".to_string(), xid)]
    );
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert!(prepared_gids(cluster, "crash").is_empty());
    assert_eq!(item(cluster, "crash", 3), None);
    let mut tx = concord.begin().await.unwrap();
    // A lock left behind would fail this statement after 2 s instead of hanging.
    execute(&tx, "SET LOCAL lock_timeout = '2s'").await.unwrap();
    execute(&tx, "INSERT INTO orders VALUES (3, 'after recovery')")
        .await
        .unwrap();
    committed_lsn(&commit(&mut tx).await);
    close(concord).await;
    assert_eq!(item(cluster, "crash", 3).as_deref(), Some("after recovery"));
}

/// Two conflicting writers, each the only branch of its transaction, committed in one phase:
/// see [`conflicting_writers`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_journal_order_of_two_conflicting_writers_is_their_commit_order() {
    conflicting_writers("ordering1", 16, true).await;
}

/// The same with one-phase commit turned off: both take two phases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_order_of_two_conflicting_writers_is_their_commit_order() {
    conflicting_writers("ordering2", 14, false).await;
}

/// Two conflicting writers: the second transaction's update of a row waits on PostgreSQL's row
/// lock until the first has committed; both commit, the first's record comes first in the
/// journal, and replaying every committed record's redo in LSN order into a standby database
/// reproduces the primary's final row (docs/design.md "Ordering").
async fn conflicting_writers(db: &str, node: u32, one_phase: bool) {
    let cluster = PgCluster::shared();
    let url = orders_db(cluster, db).await;
    let standby_db = format!("{db}_standby");
    let standby_url = orders_db(cluster, &standby_db).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = pg_config(dir.path(), node, &url);
    config.one_phase = one_phase;
    let concord = open(config).await;

    let mut setup = concord.begin().await.unwrap();
    execute(&setup, "INSERT INTO orders VALUES (4, 'initial')")
        .await
        .unwrap();
    committed_lsn(&commit(&mut setup).await);
    // In two phases the row is committed by phase 2, after the answer; until then the writers'
    // updates would not see it (and take no lock).
    assert!(concord.wait_idle(STEP_DEADLINE).await);

    let mut first = concord.begin().await.unwrap();
    execute(&first, "UPDATE orders SET item = 'first' WHERE id = 4")
        .await
        .unwrap();
    let second = concord.begin().await.unwrap();
    let second_xid = second.xid();
    let writer = tokio::spawn(async move {
        let mut second = second;
        execute(
            &second,
            "UPDATE orders SET item = item || ' then second' WHERE id = 4",
        )
        .await
        .unwrap();
        let outcome = commit(&mut second).await;
        committed_lsn(&outcome)
    });
    let waiting = wait_until(STEP_DEADLINE, || {
        cluster
            .psql(
                db,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND wait_event_type = 'Lock'"),
            )
            .unwrap()
            == "1"
    });
    assert!(waiting, "the second writer never waited on the row lock");
    let first_lsn = committed_lsn(&commit(&mut first).await);
    let second_lsn = within("the second writer", writer).await.unwrap();
    assert!(first_lsn < second_lsn, "{first_lsn} !< {second_lsn}");
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    let final_item = item(cluster, db, 4);
    assert_eq!(final_item.as_deref(), Some("first then second"));
    // A one-phase commit's `End` record is appended without waiting for it: `close` writes it,
    // with the transactions' handles still alive.
    close(concord).await;

    let expected = if one_phase { "OnePhase" } else { "Commit" };
    let kinds = record_kinds(dir.path());
    assert!(
        kinds
            .iter()
            .any(|(k, x)| *k == expected && *x == second_xid),
        "{kinds:?}"
    );
    let records = commits(dir.path());
    assert_eq!(
        records.get(&second_lsn).map(|(xid, _)| *xid),
        Some(second_xid)
    );
    let standby = open_orders(&standby_url, node).await;
    for (lsn, (_, branches)) in &records {
        for (name, redo) in branches {
            assert_eq!(name, "orders");
            within("replay", standby.replay(redo, *lsn)).await.unwrap();
        }
    }
    assert_eq!(
        within("applied lsn", standby.applied_lsn()).await.unwrap(),
        second_lsn
    );
    assert_eq!(item(cluster, &standby_db, 4), final_item);
}

/// A serialization failure: two SERIALIZABLE transactions read the same row, the first updates
/// it and commits, the second's update then fails with an error of class `Retryable` whose
/// message says to run the transaction again; its commit rolls back, and running it again
/// succeeds.
///
/// Each branch chooses its isolation with `SET TRANSACTION ISOLATION LEVEL SERIALIZABLE` as its
/// first statement (the resource's `begin` runs no query inside the branch's transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serialization_failure_is_retryable_and_says_to_run_again() {
    let cluster = PgCluster::shared();
    let url = orders_db(cluster, "serial").await;
    cluster
        .psql("serial", "INSERT INTO orders VALUES (5, 'stock 1')")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let concord = open(pg_config(dir.path(), 15, &url)).await;

    let read = "SELECT item FROM orders WHERE id = 5";
    let mut one = concord.begin().await.unwrap();
    let mut two = concord.begin().await.unwrap();
    for tx in [&one, &two] {
        let orders = within("join", tx.postgres("orders")).await.unwrap();
        within(
            "isolation",
            orders.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        )
        .await
        .unwrap();
        let level = within(
            "isolation",
            orders.query_one("SHOW transaction_isolation", &[]),
        )
        .await
        .unwrap();
        assert_eq!(level.get::<_, String>(0), "serializable");
        within("read", orders.query(read, &[])).await.unwrap();
    }
    execute(&one, "UPDATE orders SET item = 'stock 0' WHERE id = 5")
        .await
        .unwrap();
    committed_lsn(&commit(&mut one).await);
    let err = execute(
        &two,
        "UPDATE orders SET item = 'stock 0 (again)' WHERE id = 5",
    )
    .await
    .unwrap_err();
    let resource = resource_error(&err).expect("a resource error");
    assert_eq!(resource.class(), ErrorClass::Retryable, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("could not serialize access") && text.contains("run the transaction again"),
        "{text}"
    );
    assert!(err.is_retryable(), "{err}");
    commit_rolled_back(&mut two).await;

    let mut again = concord.begin().await.unwrap();
    execute(
        &again,
        "UPDATE orders SET item = 'stock 0 (again)' WHERE id = 5",
    )
    .await
    .unwrap();
    committed_lsn(&commit(&mut again).await);
    close(concord).await;
    assert_eq!(
        item(cluster, "serial", 5).as_deref(),
        Some("stock 0 (again)")
    );
}

/// The server restarted in the middle of a transaction, before its commit: the branch's
/// connection is gone with its work, so the commit rolls back with a reason that names the
/// resource and the broken connection; the row is absent, nothing is left prepared, and a new
/// transaction afterwards works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_in_the_middle_of_a_transaction_rolls_it_back() {
    let cluster = PgCluster::start().unwrap();
    let url = orders_db(&cluster, "restart").await;
    let dir = tempfile::tempdir().unwrap();
    let concord = open(pg_config(dir.path(), 1, &url)).await;

    let mut tx = concord.begin().await.unwrap();
    execute(&tx, "INSERT INTO orders VALUES (6, 'lost')")
        .await
        .unwrap();
    cluster.stop_immediate().unwrap();
    cluster.restart().unwrap();
    let answer = within("commit", tx.commit()).await;
    assert!(
        matches!(&answer, Err(participant::ConcordError::RolledBack { branch: Some(b), .. }) if b == "orders"),
        "the error does not name the branch: {answer:?}"
    );
    assert!(
        answer.as_ref().is_err_and(|e| e.is_retryable()),
        "a transaction lost to a server restart can be run again: {answer:?}"
    );
    let reason = rolled_back_reason(&answer);
    assert!(
        reason.contains("resource orders") && reason.contains(&tx.xid().to_string()),
        "{reason}"
    );
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(item(&cluster, "restart", 6), None);
    assert!(prepared_gids(&cluster, "restart").is_empty());

    let mut after = concord.begin().await.unwrap();
    execute(&after, "INSERT INTO orders VALUES (6, 'after the restart')")
        .await
        .unwrap();
    committed_lsn(&commit(&mut after).await);
    close(concord).await;
    assert_eq!(
        item(&cluster, "restart", 6).as_deref(),
        Some("after the restart")
    );
}

/// The orphan sweeper: a prepared `concord:` transaction of this node that the coordinator never
/// saw (prepared through the resource behind its back, with a sequence number far ahead) is
/// rolled back within a deadline when `orphan_sweep_ms` is small, and counted; a transaction
/// still open and one prepared and decided whose `COMMIT PREPARED` is held back are left alone
/// for many sweeps, and both commit afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweeper_rolls_back_a_prepared_branch_nobody_owns() {
    const NODE: u32 = 17;
    const SWEEP_MS: u64 = 200;
    let cluster = PgCluster::shared();
    let url = orders_db(cluster, "orphans").await;
    let pg = open_orders(&url, NODE).await;
    let hooked = Hooked::new(pg.clone(), None);
    let dir = tempfile::tempdir().unwrap();
    let coordinator = open_coordinator(dir.path(), NODE, hooked.clone(), SWEEP_MS).await;

    // Decided, its branch prepared, its commit held back: in phase 2.
    hooked.hold_commits.store(true, Ordering::SeqCst);
    let held = coordinator.begin();
    within("join", coordinator.join(&held, "orders"))
        .await
        .unwrap();
    within(
        "insert",
        pg.branch(&held)
            .unwrap()
            .execute("INSERT INTO orders VALUES (1, 'held')", &[]),
    )
    .await
    .unwrap();
    decided_lsn(&within("commit", coordinator.commit(&held)).await.unwrap());
    // Open, with a row written.
    let open_xid = coordinator.begin();
    within("join", coordinator.join(&open_xid, "orders"))
        .await
        .unwrap();
    let open_branch = pg.branch(&open_xid).unwrap();
    within(
        "insert",
        open_branch.execute("INSERT INTO orders VALUES (2, 'open')", &[]),
    )
    .await
    .unwrap();
    // The orphan. A branch is rolled back at the second sweep that finds it unowned, which
    // may come within `SWEEP_MS` of its prepare: the sweeps wait until both branches are seen
    // prepared.
    hooked.hold_recovers.store(true, Ordering::SeqCst);
    let orphan = Xid {
        node: NODE,
        epoch: Epoch(1),
        seq: u64::MAX / 2,
    };
    within("begin", pg.begin(&orphan)).await.unwrap();
    within(
        "insert",
        pg.branch(&orphan)
            .unwrap()
            .execute("INSERT INTO orders VALUES (3, 'orphan')", &[]),
    )
    .await
    .unwrap();
    within("prepare", pg.prepare(&orphan)).await.unwrap();
    let orphan_gid = pg.gid(&orphan);
    let held_gid = pg.gid(&held);
    assert_eq!(
        prepared_gids(cluster, "orphans"),
        vec![held_gid.clone(), orphan_gid.clone()]
    );
    hooked.hold_recovers.store(false, Ordering::SeqCst);

    let swept = wait_until(Duration::from_secs(10), || {
        !prepared_gids(cluster, "orphans").contains(&orphan_gid)
    });
    assert!(swept, "the orphan was not rolled back within 10 s");
    assert_eq!(coordinator.orphans_rolled_back(), 1);
    // Several sweeps later, the held branch is still prepared and the open one still usable.
    tokio::time::sleep(Duration::from_millis(5 * SWEEP_MS)).await;
    assert_eq!(prepared_gids(cluster, "orphans"), vec![held_gid]);
    assert_eq!(coordinator.orphans_rolled_back(), 1);
    within(
        "update",
        open_branch.execute(
            "UPDATE orders SET item = 'open, then committed' WHERE id = 2",
            &[],
        ),
    )
    .await
    .unwrap();
    decided_lsn(
        &within("commit", coordinator.commit(&open_xid))
            .await
            .unwrap(),
    );
    hooked.hold_commits.store(false, Ordering::SeqCst);
    assert!(coordinator.wait_settled(STEP_DEADLINE).await);

    assert_eq!(item(cluster, "orphans", 1).as_deref(), Some("held"));
    assert_eq!(
        item(cluster, "orphans", 2).as_deref(),
        Some("open, then committed")
    );
    assert_eq!(item(cluster, "orphans", 3), None);
    assert!(prepared_gids(cluster, "orphans").is_empty());
    assert!(coordinator.shutdown(STEP_DEADLINE).await);
}

/// The child process of the one-phase crash tests: commits one order in one phase with the
/// fail point of `CONCORD_FAILPOINT` armed, and is killed there by its parent. Run as a test of
/// its own it does nothing (the parent passes its database in the environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_commits_one_order_in_one_phase() {
    let (Ok(url), Ok(dir), Ok(node)) = (
        std::env::var("CONCORD_CHILD_URL"),
        std::env::var("CONCORD_CHILD_DIR"),
        std::env::var("CONCORD_CHILD_NODE"),
    ) else {
        return;
    };
    let concord = open(pg_config(Path::new(&dir), node.parse().unwrap(), &url)).await;
    let mut tx = concord.begin().await.unwrap();
    execute(&tx, "INSERT INTO orders VALUES (9, 'one phase')")
        .await
        .unwrap();
    let outcome = commit(&mut tx).await;
    panic!("the fail point did not stop the commit: {outcome:?}");
}

/// Runs [`crash_child_commits_one_order_in_one_phase`] in a process of its own with the fail
/// point `point` armed, kills it with SIGKILL when it gets there, and returns the xid of the
/// `OnePhase` record it left in the journal under `dir`.
fn one_phase_child_killed_at(point: &str, url: &str, dir: &Path, node: u32) -> Xid {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_commits_one_order_in_one_phase",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CONCORD_FAILPOINT", point)
        .env("CONCORD_CHILD_URL", url)
        .env("CONCORD_CHILD_DIR", dir)
        .env("CONCORD_CHILD_NODE", node.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wanted = format!("FAILPOINT {point}");
    let deadline = std::time::Instant::now() + STEP_DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(&wanted) => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("the child never reached {point}: {seen:#?}");
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kinds = record_kinds(dir);
    match kinds.as_slice() {
        [("OnePhase", xid)] => *xid,
        other => panic!("expected one OnePhase record, found {other:?}"),
    }
}

/// Killed after the `OnePhase` record is durable and before the branch's COMMIT: the branch
/// never committed. Recovery asks PostgreSQL, learns that from the missing marker once the
/// branch's session is gone, journals `Abort`; the row is absent and its lock free; a standby
/// applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_one_phase_commit_is_journaled_as_aborted() {
    let cluster = PgCluster::shared();
    let url = orders_db(cluster, "one_phase_crash1").await;
    let dir = tempfile::tempdir().unwrap();
    let xid = one_phase_child_killed_at("decision_durable", &url, dir.path(), 17);
    let concord = open(pg_config(dir.path(), 17, &url)).await;
    assert_eq!(concord.recovery().asked, vec![xid]);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(item(cluster, "one_phase_crash1", 9), None);
    let mut tx = concord.begin().await.unwrap();
    execute(&tx, "SET LOCAL lock_timeout = '2s'").await.unwrap();
    execute(&tx, "INSERT INTO orders VALUES (9, 'after recovery')")
        .await
        .unwrap();
    let after = committed_lsn(&commit(&mut tx).await);
    // The `Abort` record, and the `End` record of the commit after it, are appended without
    // waiting for them: `close` writes them, with the transaction's handle still alive.
    close(concord).await;
    let kinds = record_kinds(dir.path());
    assert_eq!(&kinds[..2], &[("OnePhase", xid), ("Abort", xid)]);
    let committed: Vec<_> = commits(dir.path()).into_keys().collect();
    assert_eq!(committed, vec![after]);
    assert_eq!(
        item(cluster, "one_phase_crash1", 9).as_deref(),
        Some("after recovery")
    );
}

/// Killed after the branch's COMMIT answered and before `End`: recovery asks PostgreSQL, finds
/// the marker, journals `End`; the row is there and a standby applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_one_phase_commit_is_journaled_as_committed() {
    let cluster = PgCluster::shared();
    let url = orders_db(cluster, "one_phase_crash2").await;
    let standby_url = orders_db(cluster, "one_phase_crash2_standby").await;
    let dir = tempfile::tempdir().unwrap();
    let xid = one_phase_child_killed_at("one_phase_committed", &url, dir.path(), 18);
    let concord = open(pg_config(dir.path(), 18, &url)).await;
    assert_eq!(concord.recovery().asked, vec![xid]);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    close(concord).await;
    assert_eq!(
        record_kinds(dir.path()),
        vec![("OnePhase", xid), ("End", xid)]
    );
    assert_eq!(
        item(cluster, "one_phase_crash2", 9).as_deref(),
        Some("one phase")
    );
    let standby = open_orders(&standby_url, 18).await;
    for (lsn, (_, branches)) in commits(dir.path()) {
        for (_, redo) in branches {
            within("replay", standby.replay(&redo, lsn)).await.unwrap();
        }
    }
    assert_eq!(
        item(cluster, "one_phase_crash2_standby", 9).as_deref(),
        Some("one phase")
    );
}
