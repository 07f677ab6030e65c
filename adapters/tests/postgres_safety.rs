//! The PostgreSQL resource's safety rules against a real PostgreSQL 15 server (the throwaway
//! cluster of `adapters::pgtest`): a one-phase branch commits with `synchronous_commit = on`
//! whatever the database says, a session that cannot read the fence epoch is refused, a commit
//! that finds neither the prepared transaction nor its marker is a heuristic hazard, and a
//! server that stops answering fails a call within its deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adapters::pgtest::PgCluster;
use adapters::postgres::{self, PostgresConfig, PostgresResource};
use adapters::{Epoch, ErrorClass, OnePhaseOutcome, Resource, ResourceError, Vote, Xid};

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A new database with the concord schema and an `effects` table under capture; returns its
/// connection string and name.
async fn database(prefix: &str) -> (String, String) {
    let cluster = PgCluster::shared();
    let name = format!("{prefix}_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let url = cluster.database(&name).unwrap();
    postgres::install("pg", &url).await.unwrap();
    cluster
        .psql(
            &name,
            "CREATE TABLE effects (tag integer PRIMARY KEY, note text NOT NULL)",
        )
        .unwrap();
    postgres::replicate("pg", &url, &["effects".to_string()])
        .await
        .unwrap();
    (url, name)
}

async fn open(url: &str) -> Arc<PostgresResource> {
    PostgresResource::open("pg", PostgresConfig::new(url, 1))
        .await
        .unwrap()
}

/// A fresh xid of node 1 at `epoch` (gids are unique in the whole cluster).
fn xid(epoch: u64) -> Xid {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    Xid {
        node: 1,
        epoch: Epoch(epoch),
        seq: NEXT.fetch_add(1, Ordering::Relaxed),
    }
}

/// Begins the branch of `xid` and runs `sql` in it.
async fn begin_and_run(resource: &PostgresResource, xid: &Xid, sql: &str) {
    resource.begin(xid).await.unwrap();
    resource
        .branch(xid)
        .unwrap()
        .execute(sql, &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_branch_with_redo_commits_with_synchronous_commit_on() {
    let (url, db) = database("sync_commit").await;
    let cluster = PgCluster::shared();
    // The database asks for asynchronous commit; a deferred trigger records, at COMMIT, the
    // setting the committing transaction runs with.
    cluster
        .psql(
            &db,
            &format!(
                "ALTER DATABASE {db} SET synchronous_commit = off;
                 CREATE TABLE seen (setting text NOT NULL);
                 CREATE FUNCTION note_setting() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     INSERT INTO seen VALUES (current_setting('synchronous_commit'));
                     RETURN NULL;
                 END $$;
                 CREATE CONSTRAINT TRIGGER note_setting AFTER INSERT ON effects
                     DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION note_setting();"
            ),
        )
        .unwrap();
    let primary = open(&url).await;
    let x = xid(0);
    begin_and_run(&primary, &x, "INSERT INTO effects VALUES (1, 'one')").await;
    let running: String = primary
        .branch(&x)
        .unwrap()
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, "off", "the database setting is in force");
    let Vote::Commit { .. } = primary.prepare_one_phase(&x).await.unwrap() else {
        panic!("voted read-only")
    };
    assert_eq!(
        primary.commit_one_phase(&x).await.unwrap(),
        OnePhaseOutcome::Committed
    );
    assert_eq!(cluster.psql(&db, "SELECT setting FROM seen").unwrap(), "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_cannot_read_the_fence_is_refused() {
    let (url, db) = database("fence_unreadable").await;
    let cluster = PgCluster::shared();
    let primary = open(&url).await;
    // The pooled session of `open` read the fence; it serves the first branch. The second
    // branch needs a new session, which cannot read the fence any more.
    let first = xid(0);
    primary.begin(&first).await.unwrap();
    cluster
        .psql(&db, "ALTER TABLE concord.fence RENAME TO fence_gone")
        .unwrap();
    let second = xid(0);
    let refused = primary.begin(&second).await;
    cluster
        .psql(&db, "ALTER TABLE concord.fence_gone RENAME TO fence")
        .unwrap();
    let refused = refused.expect_err("a session that cannot read the fence must be refused");
    assert!(
        refused.to_string().contains("fence epoch"),
        "the error names the fence: {refused}"
    );
    primary.rollback(&first).await.unwrap();
    // Readable again: branches go on.
    let third = xid(0);
    begin_and_run(&primary, &third, "INSERT INTO effects VALUES (3, 'three')").await;
    primary.rollback(&third).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_finds_neither_prepared_transaction_nor_marker_is_a_hazard() {
    let (url, db) = database("hazard").await;
    let cluster = PgCluster::shared();
    let primary = open(&url).await;
    // Never prepared here.
    let unknown = xid(0);
    let hazard = primary.commit(&unknown).await.unwrap_err();
    assert_eq!(hazard.class(), ErrorClass::Hazard, "{hazard}");
    assert!(
        matches!(&hazard, ResourceError::HeuristicHazard { resource, message }
            if resource == "pg" && message.contains(&primary.gid(&unknown))),
        "{hazard:?}"
    );
    // Prepared, then rolled back behind the coordinator's back.
    let x = xid(0);
    begin_and_run(&primary, &x, "INSERT INTO effects VALUES (1, 'one')").await;
    let Vote::Commit { .. } = primary.prepare(&x).await.unwrap() else {
        panic!("voted read-only")
    };
    cluster
        .psql(&db, &format!("ROLLBACK PREPARED '{}'", primary.gid(&x)))
        .unwrap();
    let hazard = primary.commit(&x).await.unwrap_err();
    assert_eq!(hazard.class(), ErrorClass::Hazard, "{hazard}");
    // Committed: a repeated commit finds the marker and succeeds.
    let y = xid(0);
    begin_and_run(&primary, &y, "INSERT INTO effects VALUES (2, 'two')").await;
    primary.prepare(&y).await.unwrap();
    primary.commit(&y).await.unwrap();
    primary.commit(&y).await.unwrap();
}

/// A loopback TCP proxy in front of the server that forwards until it is frozen, and then
/// passes no more bytes either way while keeping both connections open: a half-open server.
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(server_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&frozen);
        let task = tokio::spawn(async move {
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", server_port))
                    .await
                    .unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                pipes.spawn(pipe(cr, sw, Arc::clone(&flag)));
                pipes.spawn(pipe(sr, cw, Arc::clone(&flag)));
            }
        });
        Proxy { port, frozen, task }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// New traffic flows again; what a frozen pipe swallowed stays swallowed, and that pipe
    /// stays silent.
    fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`; data read while the proxy is frozen is swallowed, and from then on
/// the pipe holds both ends open, silent.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything from now on, answer nothing.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_on_a_server_that_stopped_answering_fails_within_the_deadline() {
    let (_, db) = database("half_open").await;
    let cluster = PgCluster::shared();
    let proxy = Proxy::start(cluster.port()).await;
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname={db}",
        proxy.port
    );
    let mut config = PostgresConfig::new(&url, 1);
    config.call_timeout_ms = 1_000;
    config.pool_wait_ms = 1_000;
    let primary = PostgresResource::open("pg", config).await.unwrap();
    let x = xid(0);
    begin_and_run(&primary, &x, "INSERT INTO effects VALUES (1, 'one')").await;
    proxy.freeze();
    let started = Instant::now();
    let prepared = tokio::time::timeout(Duration::from_secs(20), primary.prepare(&x))
        .await
        .expect("the prepare must not hang on a server that stopped answering");
    let waited = started.elapsed();
    let error = prepared.expect_err("a prepare past its deadline votes no");
    assert!(
        waited < Duration::from_secs(5),
        "the prepare gave up after {waited:?}"
    );
    assert!(error.to_string().contains("1000 ms"), "{error}");
    // New connections get through again; the one that hung stays stuck. The rollback must
    // not be sent on it: the pool drops it and connects anew.
    proxy.thaw();
    let started = Instant::now();
    let rolled_back = tokio::time::timeout(Duration::from_secs(20), primary.rollback(&x))
        .await
        .expect("the rollback must not hang");
    assert!(started.elapsed() < Duration::from_secs(5));
    rolled_back.expect("the rollback goes out on a fresh connection");
    let gid = primary.gid(&x);
    assert_eq!(
        cluster
            .psql(
                &db,
                &format!("SELECT count(*) FROM pg_prepared_xacts WHERE gid = '{gid}'")
            )
            .unwrap(),
        "0"
    );
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM effects").unwrap(),
        "0"
    );
}
