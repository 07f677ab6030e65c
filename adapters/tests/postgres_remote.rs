//! A PostgreSQL branch prepared by one resource instance (the application's) and finished by
//! another of the same database (the coordinator daemon's), against a real PostgreSQL 15 server
//! (the throwaway cluster of `adapters::pgtest`, a database per test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use adapters::pgtest::PgCluster;
use adapters::postgres::{self, PostgresConfig, PostgresResource};
use adapters::{Epoch, Resource, ResourceError, Vote, Xid};

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A new database with the concord schema and an `effects` table under capture; its url and
/// name.
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

/// A fresh xid of node 1 (gids are unique in the whole cluster).
fn xid(epoch: u64) -> Xid {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    Xid {
        node: 1,
        epoch: Epoch(epoch),
        seq: 7_000_000 + NEXT.fetch_add(1, Ordering::Relaxed),
    }
}

/// The application's side: a branch that inserts `tag`, prepared for enlisting.
async fn prepared_by_application(app: &PostgresResource, x: &Xid, tag: i32) -> String {
    app.begin(x).await.unwrap();
    app.branch(x)
        .unwrap()
        .execute("INSERT INTO effects VALUES ($1, 'remote')", &[&tag])
        .await
        .unwrap();
    app.prepare_for_enlist(x)
        .await
        .unwrap()
        .expect("a branch that wrote has redo")
}

fn count(db: &str, sql: &str) -> String {
    PgCluster::shared().psql(db, sql).unwrap()
}

fn prepared_count(db: &str) -> String {
    count(
        db,
        "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_prepared_by_the_application_commits_by_gid_from_the_daemon() {
    let (url, db) = database("remote_commit").await;
    let app = open(&url).await;
    let daemon = open(&url).await;
    let x = xid(1);
    let redo_text = prepared_by_application(&app, &x, 1).await;
    assert!(redo_text.starts_with('['), "{redo_text}");
    assert_eq!(prepared_count(&db), "1");
    // The application forgot the branch: it has nothing to resolve.
    assert!(app.branch(&x).is_err());

    daemon.adopt_prepared(&x, &redo_text).await.unwrap();
    let Vote::Commit { redo } = daemon.prepare(&x).await.unwrap() else {
        panic!("an adopted branch votes commit");
    };
    // The redo is what embedded mode journals: its row images decode and name the row.
    let rows = postgres::decode_redo(&redo).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].3["tag"], 1);
    assert_eq!(daemon.gid(&x), format!("concord:{x}:pg"));
    daemon.commit(&x).await.unwrap();
    assert_eq!(
        count(&db, "SELECT count(*) FROM effects WHERE tag = 1"),
        "1"
    );
    assert_eq!(prepared_count(&db), "0");
    // A second commit (phase 2 retried) finds the marker: done.
    daemon.commit(&x).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_branch_rolls_back_by_gid() {
    let (url, db) = database("remote_rollback").await;
    let app = open(&url).await;
    let daemon = open(&url).await;
    let x = xid(1);
    let redo_text = prepared_by_application(&app, &x, 2).await;
    daemon.adopt_prepared(&x, &redo_text).await.unwrap();
    daemon.rollback(&x).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM effects"), "0");
    assert_eq!(prepared_count(&db), "0");
    // Recovery lists nothing of it any more.
    assert!(!daemon.recover().await.unwrap().contains(&x));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gid_that_is_not_prepared_is_refused_by_name() {
    let (url, _db) = database("remote_unknown").await;
    let daemon = open(&url).await;
    let x = xid(1);
    let refused = daemon.adopt_prepared(&x, "[]").await.unwrap_err();
    assert!(
        matches!(refused, ResourceError::Rejected { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains(&daemon.gid(&x)), "{refused}");
    // Nothing was remembered: a prepare of it is refused too.
    assert!(daemon.prepare(&x).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redo_that_is_not_a_json_array_is_refused() {
    let (url, db) = database("remote_bad_redo").await;
    let app = open(&url).await;
    let daemon = open(&url).await;
    let x = xid(1);
    prepared_by_application(&app, &x, 3).await;
    for bad in ["{}", "not json", "[1, 2]", ""] {
        let refused = daemon.adopt_prepared(&x, bad).await.unwrap_err();
        assert!(
            matches!(refused, ResourceError::Rejected { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("redo"), "{refused}");
    }
    // The branch stays prepared, for a correct enlisting or the orphan sweeper.
    assert_eq!(prepared_count(&db), "1");
    daemon.rollback(&x).await.unwrap();
    assert_eq!(prepared_count(&db), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_that_wrote_nothing_has_nothing_to_enlist() {
    let (url, db) = database("remote_read_only").await;
    let app = open(&url).await;
    let x = xid(1);
    app.begin(&x).await.unwrap();
    app.branch(&x)
        .unwrap()
        .query("SELECT count(*) FROM effects", &[])
        .await
        .unwrap();
    assert_eq!(app.prepare_for_enlist(&x).await.unwrap(), None);
    let untouched = xid(1);
    app.begin(&untouched).await.unwrap();
    assert_eq!(app.prepare_for_enlist(&untouched).await.unwrap(), None);
    assert_eq!(prepared_count(&db), "0");
}

/// A branch open at an epoch that a fence then ends: its prepare (`enlisting`: the one for
/// enlisting, else the embedded one) answers `Fenced` with the fence epoch, and nothing of it
/// stays.
async fn fenced_while_open(prefix: &str, enlisting: bool) {
    let (url, db) = database(prefix).await;
    let app = open(&url).await;
    let x = xid(1);
    app.begin(&x).await.unwrap();
    app.branch(&x)
        .unwrap()
        .execute("INSERT INTO effects VALUES (4, 'old')", &[])
        .await
        .unwrap();
    // The daemon of a promoted site fences while the application's branch is open.
    open(&url).await.fence(Epoch(5)).await.unwrap();
    let refused = if enlisting {
        app.prepare_for_enlist(&x).await.unwrap_err()
    } else {
        app.prepare(&x).await.unwrap_err()
    };
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
    assert_eq!(prepared_count(&db), "0");
    assert_eq!(count(&db, "SELECT count(*) FROM effects"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_epoch_is_refused_at_prepare() {
    fenced_while_open("remote_fenced", true).await;
}

/// The embedded prepare says fenced too, as the enlisting prepare does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_prepare_after_a_fence_says_fenced() {
    fenced_while_open("embedded_fenced", false).await;
}

/// Enlisting again with the same redo is a retry and answers the same; with another redo it
/// is refused, and the first redo stays the vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enlisting_again_needs_the_same_redo() {
    let (url, db) = database("remote_twice").await;
    let app = open(&url).await;
    let daemon = open(&url).await;
    let x = xid(1);
    let redo_text = prepared_by_application(&app, &x, 7).await;
    daemon.adopt_prepared(&x, &redo_text).await.unwrap();
    daemon.adopt_prepared(&x, &redo_text).await.unwrap();
    let refused = daemon.adopt_prepared(&x, "[]").await.unwrap_err();
    assert!(
        matches!(refused, ResourceError::Rejected { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("other redo"), "{refused}");
    let Vote::Commit { redo } = daemon.prepare(&x).await.unwrap() else {
        panic!("an adopted branch votes commit");
    };
    assert_eq!(postgres::decode_redo(&redo).unwrap().len(), 1);
    daemon.commit(&x).await.unwrap();
    assert_eq!(prepared_count(&db), "0");
}
