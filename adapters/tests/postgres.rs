//! The PostgreSQL resource against a real PostgreSQL 15 server (the throwaway cluster of
//! `adapters::pgtest`, one per test binary, a database per test): the conformance suite, the
//! schema's install and upgrade, row capture and replay, fencing against prepared branches, and
//! the errors a person sees.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use adapters::pgtest::PgCluster;
use adapters::postgres::{self, PostgresConfig, PostgresResource};
use adapters::testing::{self, Paused, Subject};
use adapters::{Epoch, ErrorClass, Lsn, Resource, ResourceError, Vote, Xid};

/// The node of the conformance suite's xids.
const SUITE_NODE: u32 = 9;

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A new database with the concord schema and an `effects` table under capture.
async fn database(prefix: &str) -> String {
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
    url
}

async fn open(url: &str, node: u32) -> Arc<PostgresResource> {
    PostgresResource::open("pg", PostgresConfig::new(url, node))
        .await
        .unwrap()
}

fn pg(resource: &Arc<dyn Resource>) -> &PostgresResource {
    resource
        .as_any()
        .downcast_ref::<PostgresResource>()
        .expect("a postgres resource")
}

/// A fresh xid of node 1 (gids are unique in the whole cluster, across databases and tests);
/// `n` only tells a test's xids apart when read.
fn xid(n: u64, epoch: u64) -> Xid {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Xid {
        node: 1,
        epoch: Epoch(epoch),
        seq: NEXT.fetch_add(1, Ordering::Relaxed) * 1000 + n,
    }
}

struct PgSubject {
    primary: String,
    standby: String,
    /// The database of each replica, made at its first open.
    replicas: std::sync::Mutex<std::collections::HashMap<u32, String>>,
}

/// Makes the next replay into a database with this trigger fail at its first row, once armed
/// (`setval('replay_fail', 1, false)`; a sequence, so arming survives the failed transaction).
const REPLAY_FAIL_POINT: &str = "CREATE SEQUENCE replay_fail START 2;
    CREATE FUNCTION replay_fail() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF current_setting('concord.replaying', true) = 'on' AND nextval('replay_fail') = 1 THEN
        RAISE EXCEPTION 'fail point: replay stopped half-way';
      END IF;
      RETURN NULL;
    END $$;
    CREATE TRIGGER replay_fail AFTER INSERT OR UPDATE ON effects
      FOR EACH ROW EXECUTE FUNCTION replay_fail();";

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[async_trait::async_trait]
impl Subject for PgSubject {
    async fn open(&self) -> Arc<dyn Resource> {
        open(&self.primary, SUITE_NODE).await
    }

    async fn open_standby(&self) -> Arc<dyn Resource> {
        open(&self.standby, SUITE_NODE).await
    }

    async fn open_replica(&self, n: u32) -> Arc<dyn Resource> {
        let known = self.replicas.lock().unwrap().get(&n).cloned();
        let url = match known {
            Some(url) => url,
            None => {
                let url = database(&format!("suite_replica{n}")).await;
                connect(&url)
                    .await
                    .batch_execute(REPLAY_FAIL_POINT)
                    .await
                    .unwrap();
                self.replicas.lock().unwrap().insert(n, url.clone());
                url
            }
        };
        open(&url, SUITE_NODE).await
    }

    /// Arms the replica's trigger (a replica's database has one), through a branch rolled back
    /// afterwards: `setval` is not transactional.
    async fn fail_next_replay(&self, resource: &Arc<dyn Resource>) {
        let arming = Xid {
            node: SUITE_NODE,
            epoch: resource.fence_epoch().await.unwrap(),
            seq: 2_000_000_000,
        };
        resource.begin(&arming).await.unwrap();
        pg(resource)
            .branch(&arming)
            .unwrap()
            .batch_execute("SELECT setval('replay_fail', 1, false)")
            .await
            .unwrap();
        resource.rollback(&arming).await.unwrap();
    }

    async fn write(&self, resource: &Arc<dyn Resource>, xid: &Xid, tag: u32) {
        let branch = pg(resource).branch(xid).unwrap();
        let tag = i32::try_from(tag).unwrap();
        branch
            .execute(
                "INSERT INTO effects VALUES ($1, $2)",
                &[&tag, &format!("effect {tag}")],
            )
            .await
            .unwrap();
    }

    async fn visible(&self, resource: &Arc<dyn Resource>, tag: u32) -> bool {
        visible_in(resource, tag).await
    }

    /// The branch inserts a row whose deferred constraint trigger, run by `PREPARE
    /// TRANSACTION` (after the fence check of `concord.prepare_branch`), waits for an advisory
    /// lock that a connection of the test holds until released.
    async fn pause_prepare(&self, resource: &Arc<dyn Resource>, xid: &Xid) -> Box<dyn Paused> {
        let client = connect(&self.primary).await;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS pause_marks (k integer NOT NULL);
                 CREATE OR REPLACE FUNCTION pause_at_prepare() RETURNS trigger LANGUAGE plpgsql
                   AS $$ BEGIN PERFORM pg_advisory_xact_lock(7041, NEW.k); RETURN NULL; END $$;
                 DROP TRIGGER IF EXISTS pause_at_prepare ON pause_marks;
                 CREATE CONSTRAINT TRIGGER pause_at_prepare AFTER INSERT ON pause_marks
                   DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pause_at_prepare();",
            )
            .await
            .unwrap();
        let key = i32::try_from(xid.seq % 1_000_000_007).unwrap();
        client
            .execute("SELECT pg_advisory_lock(7041, $1)", &[&key])
            .await
            .unwrap();
        pg(resource)
            .branch(xid)
            .unwrap()
            .execute("INSERT INTO pause_marks VALUES ($1)", &[&key])
            .await
            .unwrap();
        Box::new(PgPause { client, key })
    }
}

/// A prepare waiting in a deferred trigger for the advisory lock `(7041, key)` that `client`
/// holds.
struct PgPause {
    client: tokio_postgres::Client,
    key: i32,
}

#[async_trait::async_trait]
impl Paused for PgPause {
    async fn reached(&self, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let waiting: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                       AND classid::bigint = 7041 AND objid::bigint = $1 AND objsubid = 2
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[&i64::from(self.key)],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    async fn release(&self) {
        self.client
            .execute("SELECT pg_advisory_unlock(7041, $1)", &[&self.key])
            .await
            .unwrap();
    }
}

/// Whether the committed row of `tag` exists, read through a fresh branch of `resource`.
async fn visible_in(resource: &Arc<dyn Resource>, tag: u32) -> bool {
    let reader = Xid {
        node: SUITE_NODE,
        epoch: resource.fence_epoch().await.unwrap(),
        seq: 1_000_000_000 + u64::from(tag),
    };
    resource.begin(&reader).await.unwrap();
    let branch = pg(resource).branch(&reader).unwrap();
    let tag = i32::try_from(tag).unwrap();
    let n: i64 = branch
        .query_one("SELECT count(*) FROM effects WHERE tag = $1", &[&tag])
        .await
        .unwrap()
        .get(0);
    resource.rollback(&reader).await.unwrap();
    n == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_resource_passes_the_conformance_suite() {
    let subject = PgSubject {
        primary: database("suite_primary").await,
        standby: database("suite_standby").await,
        replicas: std::sync::Mutex::default(),
    };
    testing::run_all(&subject).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_an_older_schema_is_refused_until_upgraded() {
    let cluster = PgCluster::shared();
    let name = format!("install_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let url = cluster.database(&name).unwrap();
    let missing = PostgresResource::open("pg", PostgresConfig::new(&url, 1))
        .await
        .err()
        .unwrap();
    assert!(
        missing
            .to_string()
            .contains("concord pg install --resource pg"),
        "{missing}"
    );
    let first = postgres::install("pg", &url).await.unwrap();
    assert_eq!(
        (first.from, first.to),
        (0, postgres::schema::SCHEMA_VERSION)
    );
    let again = postgres::install("pg", &url).await.unwrap();
    assert_eq!(again.from, postgres::schema::SCHEMA_VERSION);
    // A version-1 schema (no one-phase function) is refused with the fix, and upgraded by it.
    cluster
        .psql(
            &name,
            "DROP FUNCTION concord.finish_branch; UPDATE concord.meta SET value = '1' WHERE key = 'schema_version'",
        )
        .unwrap();
    let older = PostgresResource::open("pg", PostgresConfig::new(&url, 1))
        .await
        .err()
        .unwrap();
    assert!(
        older.to_string().contains("version 1") && older.to_string().contains("pg install"),
        "{older}"
    );
    let upgraded = postgres::install("pg", &url).await.unwrap();
    assert_eq!(
        (upgraded.from, upgraded.to),
        (1, postgres::schema::SCHEMA_VERSION)
    );
    PostgresResource::open("pg", PostgresConfig::new(&url, 1))
        .await
        .unwrap();
    cluster
        .psql(
            &name,
            "UPDATE concord.meta SET value = '99' WHERE key = 'schema_version'",
        )
        .unwrap();
    let newer = PostgresResource::open("pg", PostgresConfig::new(&url, 1))
        .await
        .err()
        .unwrap();
    assert!(newer.to_string().contains("newer"), "{newer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_primary_key_is_refused_by_replicate() {
    let cluster = PgCluster::shared();
    let url = database("nopk").await;
    let db = url.rsplit('=').next().unwrap().to_string();
    cluster
        .psql(&db, "CREATE TABLE logbook (line text)")
        .unwrap();
    let error = postgres::replicate("pg", &url, &["logbook".to_string()])
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Rejected);
    assert!(error.to_string().contains("no primary key"), "{error}");
    let missing = postgres::replicate("pg", &url, &["nowhere".to_string()])
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("does not exist"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_rows_travel_in_the_redo_and_replay_reproduces_them() {
    let primary_url = database("capture_primary").await;
    let standby_url = database("capture_standby").await;
    let primary = open(&primary_url, 1).await;
    let standby = open(&standby_url, 1).await;

    let x = xid(1, 0);
    primary.begin(&x).await.unwrap();
    let branch = primary.branch(&x).unwrap();
    branch
        .batch_execute(
            "INSERT INTO effects VALUES (1, 'one'), (2, 'two'), (3, 'three');
             UPDATE effects SET note = 'TWO' WHERE tag = 2;
             UPDATE effects SET tag = 30 WHERE tag = 3;
             DELETE FROM effects WHERE tag = 1;",
        )
        .await
        .unwrap();
    let Vote::Commit { redo } = primary.prepare(&x).await.unwrap() else {
        panic!("voted read-only")
    };
    primary.commit(&x).await.unwrap();
    standby.replay(&redo, Lsn(5)).await.unwrap();
    let read = |url: String| async move {
        let r = open(&url, 1).await;
        let reader = xid(99, 0);
        r.begin(&reader).await.unwrap();
        let rows: Vec<(i32, String)> = r
            .branch(&reader)
            .unwrap()
            .query("SELECT tag, note FROM effects ORDER BY tag", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        r.rollback(&reader).await.unwrap();
        rows
    };
    let expected = vec![(2, "TWO".to_string()), (30, "three".to_string())];
    assert_eq!(read(primary_url.clone()).await, expected);
    assert_eq!(read(standby_url.clone()).await, expected);
    assert_eq!(standby.applied_lsn().await.unwrap(), Lsn(5));
    // Replay captured nothing on the standby, and the primary's capture table is empty.
    let cluster = PgCluster::shared();
    for url in [&primary_url, &standby_url] {
        let db = url.rsplit('=').next().unwrap();
        assert_eq!(
            cluster
                .psql(db, "SELECT count(*) FROM concord.capture")
                .unwrap(),
            "0"
        );
    }
    // Replaying the same LSN again changes nothing.
    standby
        .replay(b"{\"v\":1,\"rows\":[]}", Lsn(5))
        .await
        .unwrap();
    assert_eq!(read(standby_url).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_waits_for_prepared_branches_of_older_epochs_then_fails_naming_them() {
    // Far longer than a fence that waits for nothing takes on a loaded machine (a connection
    // and a query or two), so that "it did not wait" is told apart from "it was slow".
    const FENCE_WAIT_MS: u64 = 2_000;
    let url = database("fence").await;
    let mut config = PostgresConfig::new(&url, 1);
    config.fence_wait_ms = FENCE_WAIT_MS;
    let r = PostgresResource::open("pg", config).await.unwrap();
    let old = xid(1, 0);
    r.begin(&old).await.unwrap();
    r.branch(&old)
        .unwrap()
        .execute("INSERT INTO effects VALUES (7, 'old epoch')", &[])
        .await
        .unwrap();
    r.prepare(&old).await.unwrap();

    let started = std::time::Instant::now();
    let error = r.fence(Epoch(1)).await.unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(error.class(), ErrorClass::Retryable, "{error}");
    assert!(error.to_string().contains(&r.gid(&old)), "{error}");
    assert_eq!(r.fence_epoch().await.unwrap(), Epoch(0));

    // Once the old branch is resolved, the fence goes through, and old epochs are refused.
    r.rollback(&old).await.unwrap();
    r.fence(Epoch(1)).await.unwrap();
    // A branch of the new epoch prepared: fencing again to the same epoch does not wait for it.
    let current = xid(3, 1);
    r.begin(&current).await.unwrap();
    r.branch(&current)
        .unwrap()
        .execute("INSERT INTO effects VALUES (8, 'new epoch')", &[])
        .await
        .unwrap();
    r.prepare(&current).await.unwrap();
    let started = std::time::Instant::now();
    r.fence(Epoch(1)).await.unwrap();
    r.fence(Epoch(0)).await.unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < std::time::Duration::from_millis(FENCE_WAIT_MS),
        "{elapsed:?}"
    );
    r.commit(&current).await.unwrap();
    let refused = r.begin(&xid(2, 0)).await.unwrap_err();
    assert!(matches!(refused, ResourceError::Fenced { .. }), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_statement_names_the_branch_and_carries_postgres_message() {
    let url = database("badsql").await;
    let r = open(&url, 1).await;
    let x = xid(1, 0);
    r.begin(&x).await.unwrap();
    let error = r
        .branch(&x)
        .unwrap()
        .execute("INSERT INTO nowhere VALUES (1)", &[])
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("resource pg"), "{text}");
    assert!(text.contains(&x.to_string()), "{text}");
    assert!(
        text.contains("relation \"nowhere\" does not exist"),
        "{text}"
    );
    // The transaction is aborted in PostgreSQL: prepare fails, rollback ends it.
    assert!(r.prepare(&x).await.is_err());
    r.rollback(&x).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_address_or_password_is_named_without_the_password() {
    let cluster = PgCluster::shared();
    let port = cluster.port();
    let closed = PostgresConfig::new(
        "host=127.0.0.1 port=1 user=postgres dbname=x password=s3cret",
        1,
    );
    let error = PostgresResource::open("pg", closed).await.err().unwrap();
    let text = error.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    let nodb = PostgresConfig::new(
        format!("host=127.0.0.1 port={port} user=postgres dbname=no_such_db password=s3cret"),
        1,
    );
    let error = PostgresResource::open("pg", nodb).await.err().unwrap();
    let text = error.to_string();
    assert!(text.contains("no_such_db"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

/// Replay updates a row in place: a row other tables reference keeps its children (no delete
/// and insert), an identity column takes the primary's value, and a generated column is
/// computed again on the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_upserts_rows_that_others_reference() {
    let cluster = PgCluster::shared();
    let mut urls = Vec::new();
    for side in ["upsert_primary", "upsert_standby"] {
        let url = database(side).await;
        let db = url.rsplit('=').next().unwrap().to_string();
        cluster
            .psql(
                &db,
                "CREATE TABLE customers (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                         name text NOT NULL,
                                         shout text GENERATED ALWAYS AS (upper(name)) STORED);
                 CREATE TABLE invoices (id int PRIMARY KEY,
                                        customer bigint NOT NULL REFERENCES customers ON DELETE CASCADE)",
            )
            .unwrap();
        postgres::replicate("pg", &url, &["customers".to_string()])
            .await
            .unwrap();
        urls.push((url, db));
    }
    let (primary, standby) = (open(&urls[0].0, 1).await, open(&urls[1].0, 1).await);
    let mut lsn = 0;
    for sql in [
        "INSERT INTO customers (name) VALUES ('ada')",
        "UPDATE customers SET name = 'ada lovelace'",
    ] {
        let x = xid(1, 0);
        primary.begin(&x).await.unwrap();
        primary
            .branch(&x)
            .unwrap()
            .batch_execute(sql)
            .await
            .unwrap();
        let Vote::Commit { redo } = primary.prepare(&x).await.unwrap() else {
            panic!("voted read-only")
        };
        primary.commit(&x).await.unwrap();
        lsn += 1;
        standby.replay(&redo, Lsn(lsn)).await.unwrap();
        if lsn == 1 {
            // A child row on the standby, which the update must not cascade away.
            cluster
                .psql(
                    &urls[1].1,
                    "INSERT INTO invoices SELECT 1, id FROM customers",
                )
                .unwrap();
        }
    }
    let read = "SELECT id || ' ' || name || ' ' || shout FROM customers";
    assert_eq!(
        cluster.psql(&urls[1].1, read).unwrap(),
        cluster.psql(&urls[0].1, read).unwrap()
    );
    assert_eq!(
        cluster
            .psql(&urls[1].1, "SELECT count(*) FROM invoices")
            .unwrap(),
        "1"
    );
}

/// A table dropped after `replicate`: its trigger went with it, branches writing other tables
/// still prepare and commit, and replaying a redo that names the dropped table fails with a
/// clear error naming it, changing nothing (the applied LSN stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_after_replicate_is_named_by_replay() {
    let cluster = PgCluster::shared();
    let primary_url = database("dropped_primary").await;
    let standby_url = database("dropped_standby").await;
    let primary = open(&primary_url, 1).await;
    let x = xid(1, 0);
    begin_and_run(
        &primary,
        &x,
        "INSERT INTO effects VALUES (1, 'before the drop')",
    )
    .await;
    let Vote::Commit { redo } = primary.prepare(&x).await.unwrap() else {
        panic!("voted read-only")
    };
    primary.commit(&x).await.unwrap();

    let standby_db = standby_url.rsplit('=').next().unwrap();
    cluster.psql(standby_db, "DROP TABLE effects").unwrap();
    let standby = open(&standby_url, 1).await;
    let error = standby.replay(&redo, Lsn(1)).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Rejected, "{error}");
    assert!(error.to_string().contains("effects"), "{error}");
    assert_eq!(standby.applied_lsn().await.unwrap(), Lsn(0));

    let primary_db = primary_url.rsplit('=').next().unwrap();
    cluster.psql(primary_db, "DROP TABLE effects").unwrap();
    cluster
        .psql(primary_db, "CREATE TABLE other (id int PRIMARY KEY)")
        .unwrap();
    let y = xid(2, 0);
    begin_and_run(&primary, &y, "INSERT INTO other VALUES (1)").await;
    let Vote::Commit { redo } = primary.prepare(&y).await.unwrap() else {
        panic!("voted read-only")
    };
    assert_eq!(postgres::decode_redo(&redo).unwrap(), vec![]);
    primary.commit(&y).await.unwrap();
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

fn db_of(url: &str) -> String {
    url.rsplit('=').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_carries_the_redo_and_marks_only_branches_with_redo() {
    let url = database("one_phase").await;
    let standby_url = database("one_phase_standby").await;
    let cluster = PgCluster::shared();
    let db = db_of(&url);
    cluster
        .psql(&db, "CREATE TABLE scratch (id integer PRIMARY KEY)")
        .unwrap();
    let primary = open(&url, 1).await;
    assert!(primary.supports_one_phase());

    // Captured rows: the redo names the transaction and its session, the marker is written.
    let x = xid(1, 0);
    begin_and_run(&primary, &x, "INSERT INTO effects VALUES (1, 'one')").await;
    let Vote::Commit { redo } = primary.prepare_one_phase(&x).await.unwrap() else {
        panic!("voted read-only")
    };
    let value: serde_json::Value = serde_json::from_slice(&redo).unwrap();
    assert!(
        value["txid"].as_str().unwrap().parse::<u64>().is_ok(),
        "{value}"
    );
    assert!(value["pid"].as_i64().unwrap() > 0, "{value}");
    assert_eq!(postgres::decode_redo(&redo).unwrap().len(), 1);
    // Not visible, nothing prepared: the branch is an open transaction holding its locks.
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM effects").unwrap(),
        "0"
    );
    assert!(primary.recover().await.unwrap().is_empty());
    assert_eq!(
        primary.commit_one_phase(&x).await.unwrap(),
        adapters::OnePhaseOutcome::Committed
    );
    assert_eq!(
        cluster.psql(&db, "SELECT note FROM effects").unwrap(),
        "one"
    );
    let gid = primary.gid(&x);
    assert_eq!(
        cluster
            .psql(
                &db,
                &format!("SELECT count(*) FROM concord.markers WHERE gid = '{gid}'")
            )
            .unwrap(),
        "1"
    );
    assert_eq!(
        primary.one_phase_outcome(&x, &redo).await.unwrap(),
        adapters::OnePhaseOutcome::Committed
    );
    let standby = open(&standby_url, 1).await;
    standby.replay(&redo, Lsn(3)).await.unwrap();
    assert_eq!(
        cluster
            .psql(&db_of(&standby_url), "SELECT note FROM effects")
            .unwrap(),
        "one"
    );

    let marked = |xid: &Xid| {
        let gid = primary.gid(xid);
        cluster
            .psql(
                &db,
                &format!("SELECT count(*) FROM concord.markers WHERE gid = '{gid}'"),
            )
            .unwrap()
            == "1"
    };
    let scratch = || cluster.psql(&db, "SELECT count(*) FROM scratch").unwrap();

    // Nothing captured: the session heard no capture notice, so the branch's own COMMIT ends
    // it (read-only to the coordinator: nothing to journal), and it has no marker.
    let y = xid(2, 0);
    begin_and_run(&primary, &y, "INSERT INTO scratch VALUES (1)").await;
    assert_eq!(primary.prepare_one_phase(&y).await.unwrap(), Vote::ReadOnly);
    assert_eq!(scratch(), "1");
    assert!(!marked(&y));

    // Captured rows beside others: the redo holds the captured ones, and the branch commits
    // once it is journaled.
    let v = xid(4, 0);
    primary.begin(&v).await.unwrap();
    let branch = primary.branch(&v).unwrap();
    branch
        .execute("INSERT INTO effects VALUES (2, 'two')", &[])
        .await
        .unwrap();
    branch
        .execute("INSERT INTO scratch VALUES (3)", &[])
        .await
        .unwrap();
    let Vote::Commit { redo } = primary.prepare_one_phase(&v).await.unwrap() else {
        panic!("voted read-only")
    };
    let rows = postgres::decode_redo(&redo).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].3["note"], "two");
    assert_eq!(scratch(), "1");
    primary.commit_one_phase(&v).await.unwrap();
    assert_eq!(scratch(), "2");
    assert!(marked(&v));

    // An application that silences notices does not silence the capture's: the trigger lowers
    // client_min_messages for the transaction before it raises its notice.
    let quiet = xid(6, 0);
    primary.begin(&quiet).await.unwrap();
    let branch = primary.branch(&quiet).unwrap();
    branch
        .batch_execute("SET LOCAL client_min_messages = error")
        .await
        .unwrap();
    branch
        .execute("INSERT INTO effects VALUES (3, 'three')", &[])
        .await
        .unwrap();
    let Vote::Commit { redo } = primary.prepare_one_phase(&quiet).await.unwrap() else {
        panic!("a captured row went unheard: voted read-only")
    };
    assert_eq!(postgres::decode_redo(&redo).unwrap().len(), 1);
    primary.commit_one_phase(&quiet).await.unwrap();

    // Rows captured and taken back by a rolled-back savepoint: the notice came, so the server
    // is asked; it has no redo, and the branch commits what remains, without a record.
    let back = xid(7, 0);
    primary.begin(&back).await.unwrap();
    let branch = primary.branch(&back).unwrap();
    branch
        .batch_execute(
            "SAVEPOINT s; INSERT INTO effects VALUES (4, 'four'); ROLLBACK TO SAVEPOINT s;
             INSERT INTO scratch VALUES (4)",
        )
        .await
        .unwrap();
    assert_eq!(
        primary.prepare_one_phase(&back).await.unwrap(),
        Vote::Commit { redo: Vec::new() }
    );
    primary.commit_one_phase(&back).await.unwrap();
    assert_eq!(scratch(), "3");
    assert!(!marked(&back));
    assert_eq!(
        cluster
            .psql(&db, "SELECT count(*) FROM effects WHERE tag = 4")
            .unwrap(),
        "0"
    );

    // The next branch of that session, which captures nothing, commits by itself again.
    let after = xid(8, 0);
    begin_and_run(&primary, &after, "INSERT INTO scratch VALUES (5)").await;
    assert_eq!(
        primary.prepare_one_phase(&after).await.unwrap(),
        Vote::ReadOnly
    );
    assert_eq!(scratch(), "4");

    // Branches side by side, each on a session of its own (created now, not at open): each
    // session is known, and a capture on one is not heard on another.
    let (one, two, three) = (xid(11, 0), xid(12, 0), xid(13, 0));
    for x in [&one, &two, &three] {
        primary.begin(x).await.unwrap();
    }
    let (b1, b2, b3) = (
        primary.branch(&one).unwrap(),
        primary.branch(&two).unwrap(),
        primary.branch(&three).unwrap(),
    );
    let (a, b, c) = tokio::join!(
        b1.execute("INSERT INTO scratch VALUES (11)", &[]),
        b2.execute("INSERT INTO effects VALUES (12, 'twelve')", &[]),
        b3.execute("INSERT INTO scratch VALUES (13)", &[]),
    );
    for result in [a, b, c] {
        result.unwrap();
    }
    assert_eq!(
        primary.prepare_one_phase(&one).await.unwrap(),
        Vote::ReadOnly
    );
    assert_eq!(
        primary.prepare_one_phase(&three).await.unwrap(),
        Vote::ReadOnly
    );
    let Vote::Commit { redo } = primary.prepare_one_phase(&two).await.unwrap() else {
        panic!("a captured row went unheard: voted read-only")
    };
    assert_eq!(postgres::decode_redo(&redo).unwrap().len(), 1);
    primary.commit_one_phase(&two).await.unwrap();
    assert_eq!(scratch(), "6");

    // A failed statement leaves the transaction aborted, which a bare COMMIT would answer with
    // a silent rollback: such a branch is finished by asking the server, which refuses it.
    let broken = xid(9, 0);
    begin_and_run(&primary, &broken, "INSERT INTO scratch VALUES (6)").await;
    let duplicate = primary
        .branch(&broken)
        .unwrap()
        .execute("INSERT INTO scratch VALUES (6)", &[])
        .await
        .unwrap_err();
    assert!(
        duplicate.to_string().contains("duplicate key"),
        "{duplicate}"
    );
    let refused = primary.prepare_one_phase(&broken).await.unwrap_err();
    assert!(refused.to_string().contains("aborted"), "{refused}");
    assert_eq!(scratch(), "6");

    // A statement whose caller gave up on it after it went out still runs on the server: the
    // branch's end must not trust a bare COMMIT then, whether it was the first statement (its
    // BEGIN went out with it) or a later one.
    for first in [true, false] {
        let gave_up = xid(14, 0);
        primary.begin(&gave_up).await.unwrap();
        let branch = primary.branch(&gave_up).unwrap();
        if !first {
            branch
                .execute("INSERT INTO scratch VALUES (20)", &[])
                .await
                .unwrap();
        }
        let tag = if first { 21 } else { 22 };
        let slow = format!("SELECT pg_sleep(0.3); INSERT INTO effects VALUES ({tag}, 'late')");
        let dropped = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            branch.batch_execute(&slow),
        )
        .await;
        assert!(dropped.is_err(), "the statement answered within 50 ms");
        let Vote::Commit { redo } = primary.prepare_one_phase(&gave_up).await.unwrap() else {
            panic!("a statement given up on was trusted: voted read-only")
        };
        let rows = postgres::decode_redo(&redo).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].3["tag"], tag);
        primary.commit_one_phase(&gave_up).await.unwrap();
    }
    assert_eq!(scratch(), "7");

    // A BEGIN sent through the branch finds the transaction open: the branch is refused. A
    // ROLLBACK sent through it ends the transaction: concord cannot know what became of it.
    for (n, sent, class, says) in [
        (15, "BEGIN", ErrorClass::Rejected, "already open"),
        (10, "ROLLBACK", ErrorClass::InDoubt, "already been ended"),
    ] {
        let x = xid(n, 0);
        begin_and_run(&primary, &x, "INSERT INTO scratch VALUES (30)").await;
        primary
            .branch(&x)
            .unwrap()
            .batch_execute(sent)
            .await
            .unwrap();
        let refused = primary.prepare_one_phase(&x).await.unwrap_err();
        assert_eq!(refused.class(), class, "{refused}");
        assert!(refused.to_string().contains(says), "{refused}");
        assert_eq!(scratch(), "7");
    }

    // No statement at all: read-only without a word to the server.
    let z = xid(5, 0);
    primary.begin(&z).await.unwrap();
    assert_eq!(primary.prepare_one_phase(&z).await.unwrap(), Vote::ReadOnly);
    assert!(primary.commit_one_phase(&z).await.is_err());
}

/// Row images beyond the 64 KiB the transaction-local setting holds go to the capture table,
/// and the redo has them all, in order, for both commit paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_capture_spills_to_the_table_and_keeps_its_order() {
    let url = database("spill").await;
    let cluster = PgCluster::shared();
    let db = db_of(&url);
    let primary = open(&url, 1).await;
    for (n, one_phase) in [(1u64, false), (2, true)] {
        let x = xid(n, 0);
        primary.begin(&x).await.unwrap();
        let branch = primary.branch(&x).unwrap();
        let base = i32::try_from(n).unwrap() * 10_000;
        branch
            .execute(
                "INSERT INTO effects SELECT $1 + g, repeat('x', 200) || g FROM generate_series(1, 1000) g",
                &[&base],
            )
            .await
            .unwrap();
        branch
            .execute(
                "UPDATE effects SET note = 'last' WHERE tag = $1 + 1",
                &[&base],
            )
            .await
            .unwrap();
        let vote = if one_phase {
            primary.prepare_one_phase(&x).await.unwrap()
        } else {
            primary.prepare(&x).await.unwrap()
        };
        let Vote::Commit { redo } = vote else {
            panic!("voted read-only")
        };
        let rows = postgres::decode_redo(&redo).unwrap();
        assert_eq!(rows.len(), 1001);
        assert_eq!(rows[0].3["tag"], base + 1);
        assert_eq!(rows[999].3["tag"], base + 1000);
        assert_eq!(rows[1000].3["note"], "last");
        if one_phase {
            primary.commit_one_phase(&x).await.unwrap();
        } else {
            primary.commit(&x).await.unwrap();
        }
    }
    assert_eq!(
        cluster
            .psql(&db, "SELECT count(*) FROM concord.capture")
            .unwrap(),
        "0"
    );
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM effects").unwrap(),
        "2000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_one_phase_branch_is_ended_and_reported_rolled_back() {
    let url = database("one_phase_lost").await;
    let cluster = PgCluster::shared();
    let db = db_of(&url);
    let primary = open(&url, 1).await;
    let x = xid(1, 0);
    begin_and_run(&primary, &x, "INSERT INTO effects VALUES (7, 'lost')").await;
    let Vote::Commit { redo } = primary.prepare_one_phase(&x).await.unwrap() else {
        panic!("voted read-only")
    };
    // The answer to COMMIT is lost before it was sent: a second instance (as after a crash)
    // asks. The branch's session still runs the transaction and holds the row's lock; the
    // question ends it, and then the missing marker tells.
    let other = open(&url, 1).await;
    let outcome = other.one_phase_outcome(&x, &redo).await.unwrap();
    assert!(
        matches!(&outcome, adapters::OnePhaseOutcome::RolledBack { error } if error.to_string().contains("did not happen")),
        "{outcome:?}"
    );
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM effects").unwrap(),
        "0"
    );
    // The first instance's COMMIT now finds its connection gone: the outcome is unknown to it,
    // and asking again gives the same answer.
    let lost = primary.commit_one_phase(&x).await;
    assert!(
        matches!(&lost, Err(e) if e.class() == ErrorClass::InDoubt)
            || matches!(&lost, Ok(adapters::OnePhaseOutcome::RolledBack { .. })),
        "{lost:?}"
    );
    assert_eq!(other.one_phase_outcome(&x, &redo).await.unwrap(), outcome);
    // The row's lock is free again.
    cluster
        .psql(&db, "INSERT INTO effects VALUES (7, 'free')")
        .unwrap();
    // A redo that names no transaction is refused with the reason.
    let bad = other
        .one_phase_outcome(&x, b"{\"v\":1,\"rows\":[]}")
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("no txid"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_the_server_refuses_is_rolled_back_with_its_message() {
    let url = database("one_phase_refused").await;
    let cluster = PgCluster::shared();
    let db = db_of(&url);
    cluster
        .psql(
            &db,
            "CREATE TABLE uniq (id integer PRIMARY KEY, v integer,
                                CONSTRAINT v_once UNIQUE (v) DEFERRABLE INITIALLY DEFERRED);
             INSERT INTO uniq VALUES (1, 10)",
        )
        .unwrap();
    postgres::replicate("pg", &url, &["uniq".to_string()])
        .await
        .unwrap();
    let primary = open(&url, 1).await;
    let x = xid(1, 0);
    begin_and_run(&primary, &x, "INSERT INTO uniq VALUES (2, 10)").await;
    let Vote::Commit { redo } = primary.prepare_one_phase(&x).await.unwrap() else {
        panic!("voted read-only")
    };
    let outcome = primary.commit_one_phase(&x).await.unwrap();
    assert!(
        matches!(&outcome, adapters::OnePhaseOutcome::RolledBack { error } if error.to_string().contains("v_once")),
        "{outcome:?}"
    );
    assert_eq!(cluster.psql(&db, "SELECT count(*) FROM uniq").unwrap(), "1");
    assert!(matches!(
        primary.one_phase_outcome(&x, &redo).await.unwrap(),
        adapters::OnePhaseOutcome::RolledBack { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_one_phase_branch_is_refused_and_rolled_back() {
    let url = database("one_phase_fenced").await;
    let cluster = PgCluster::shared();
    let db = db_of(&url);
    let primary = open(&url, 1).await;
    let x = xid(1, 1);
    begin_and_run(&primary, &x, "INSERT INTO effects VALUES (1, 'old')").await;
    // Another instance (a promoted standby) fences while the branch is open.
    open(&url, 2).await.fence(Epoch(5)).await.unwrap();
    let refused = primary.prepare_one_phase(&x).await.unwrap_err();
    assert!(
        matches!(
            refused,
            ResourceError::Fenced {
                current: Epoch(5),
                ..
            }
        ),
        "{refused}"
    );
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM effects").unwrap(),
        "0"
    );
    // The fence ended the old instance's pooled sessions: its next branch of the old epoch is
    // refused at begin, by the session that replaced them.
    let later = primary.begin(&xid(2, 1)).await.unwrap_err();
    assert!(
        matches!(
            later,
            ResourceError::Fenced {
                current: Epoch(5),
                ..
            }
        ),
        "{later}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_once_the_database_is_gone() {
    let cluster = PgCluster::shared();
    let name = format!("health_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let url = cluster.database(&name).unwrap();
    postgres::install("pg", &url).await.unwrap();
    let config = PostgresConfig {
        call_timeout_ms: 5_000,
        ..PostgresConfig::new(&url, 1)
    };
    let r = PostgresResource::open("pg", config).await.unwrap();
    r.health().await.unwrap();
    cluster
        .psql("postgres", &format!("DROP DATABASE {name} WITH (FORCE)"))
        .unwrap();
    let e = r.health().await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
}
