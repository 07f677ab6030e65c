//! Re-seeding a PostgreSQL resource row by row against a real PostgreSQL server (the throwaway
//! cluster of `adapters::pgtest`): rows of many types and a composite key copied from one
//! database to another give equal inventories and advance the standby's sequences; the writes
//! are not captured; malformed keys, a row whose key columns disagree with its key, and a row
//! that would not read back as the content written are refused with nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Cursor, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use adapters::pgtest::PgCluster;
use adapters::postgres::{self, PostgresConfig, PostgresResource};
use adapters::{BlobContent, ErrorClass, Lsn, Resource, ResourceError};

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

const TABLES: &str = "CREATE TABLE items (
        id serial PRIMARY KEY,
        at timestamptz NOT NULL,
        price numeric NOT NULL,
        data bytea,
        doc jsonb,
        span interval,
        ratio double precision,
        twice integer GENERATED ALWAYS AS (id * 2) STORED);
    CREATE TABLE pairs (a integer, b text, note text, PRIMARY KEY (a, b));";

const ROWS: &str = "INSERT INTO items (at, price, data, doc, span, ratio) VALUES
        ('2026-01-02 03:04:05+02', 12.50, '\\x00ff', '{\"k\": [1, 2]}', '1 day 2 hours', 0.1),
        (now(), 1e20, NULL, NULL, NULL, 1.0 / 3),
        ('1999-12-31 23:59:59.999999+00', -0.001, '', '\"s\"', '-3 years', 'NaN');
    INSERT INTO pairs VALUES (1, 'x', 'one'), (1, 'y/z', 'slash'), (2, 'x', NULL);";

/// A new database with the concord schema and both tables under capture: its url and name.
async fn database(prefix: &str, rows: &str) -> (String, String) {
    let cluster = PgCluster::shared();
    let name = format!("{prefix}_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let url = cluster.database(&name).unwrap();
    postgres::install("pg", &url).await.unwrap();
    cluster.psql(&name, TABLES).unwrap();
    let tables = vec!["items".to_string(), "pairs".to_string()];
    postgres::replicate("pg", &url, &tables).await.unwrap();
    if !rows.is_empty() {
        cluster.psql(&name, rows).unwrap();
    }
    (url, name)
}

async fn open(url: &str) -> Arc<PostgresResource> {
    PostgresResource::open("pg", PostgresConfig::new(url, 1))
        .await
        .unwrap()
}

fn content(text: &str) -> BlobContent {
    Box::new(Cursor::new(text.as_bytes().to_vec()))
}

async fn read(r: &PostgresResource, key: &str) -> Option<String> {
    let mut out = String::new();
    let mut content = r.read_entry(key).await.unwrap()?;
    content.read_to_string(&mut out).unwrap();
    Some(out)
}

#[track_caller]
fn refused(result: Result<(), ResourceError>) -> String {
    match result {
        Err(e) if e.class() == ErrorClass::Rejected => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_copied_by_key_give_equal_inventories_and_advance_sequences() {
    let (a_url, _) = database("reseed_a", ROWS).await;
    let (b_url, b_db) = database("reseed_b", "INSERT INTO pairs VALUES (9, 'only-b', 'b')").await;
    let (a, b) = (open(&a_url).await, open(&b_url).await);
    let on_a = a.inventory().await.unwrap();
    assert_eq!(on_a.len(), 6);
    for entry in b.inventory().await.unwrap() {
        if on_a.binary_search_by(|e| e.key.cmp(&entry.key)).is_err() {
            b.remove_entry(&entry.key).await.unwrap();
        }
    }
    for entry in &on_a {
        let text = read(&a, &entry.key).await.unwrap();
        assert_eq!(
            *blake3::hash(text.as_bytes()).as_bytes(),
            entry.digest,
            "{}",
            entry.key
        );
        b.write_entry(&entry.key, content(&text)).await.unwrap();
    }
    assert_eq!(b.inventory().await.unwrap(), on_a);
    let cluster = PgCluster::shared();
    let next = cluster
        .psql(
            &b_db,
            "INSERT INTO items (at, price) VALUES (now(), 1) RETURNING id",
        )
        .unwrap();
    assert_eq!(
        next, "4",
        "the sequence of items.id was not advanced past the copied keys"
    );
    let captured = cluster
        .psql(&b_db, "SELECT count(*) FROM concord.capture")
        .unwrap();
    assert_eq!(captured, "0");
    b.set_applied_lsn(Lsn(7)).await.unwrap();
    assert_eq!(b.applied_lsn().await.unwrap(), Lsn(7));
    b.set_applied_lsn(Lsn(3)).await.unwrap();
    assert_eq!(b.applied_lsn().await.unwrap(), Lsn(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_keys_and_mismatched_rows_are_refused() {
    let (url, db) = database("reseed_bad", ROWS).await;
    let r = open(&url).await;
    let before = r.inventory().await.unwrap();
    let key = "public.pairs/{\"a\": 1, \"b\": \"x\"}";
    let row = read(&r, key).await.expect("the row of key {key}");
    for bad in [
        "pairs",
        "nosuch/{\"a\": 1}",
        "public.pairs/not json",
        "public.pairs/[1, \"x\"]",
        "public.pairs/{\"a\": 1}",
        "public.pairs/{\"a\": 1, \"b\": \"x\", \"c\": 2}",
        "../public.pairs/{\"a\": 1, \"b\": \"x\"}",
    ] {
        let why = refused(r.write_entry(bad, content(&row)).await);
        assert!(why.contains("refused"), "{bad}: {why}");
        refused(r.remove_entry(bad).await);
        refused(r.read_entry(bad).await.map(drop));
    }
    let other_key = "public.pairs/{\"a\": 2, \"b\": \"x\"}";
    let why = refused(r.write_entry(other_key, content(&row)).await);
    assert!(why.contains("does not hold the key's value"), "{why}");
    let not_canonical = row.replace("\"note\": \"one\"", "\"note\":\"two\"");
    assert_ne!(not_canonical, row);
    let why = refused(r.write_entry(key, content(&not_canonical)).await);
    assert!(why.contains("not the content written"), "{why}");
    let why = refused(
        r.write_entry(key, content("{\"a\": 1, \"b\": \"x\"}"))
            .await,
    );
    assert!(why.contains("has no column note"), "{why}");
    refused(r.write_entry(key, content("not json")).await);
    assert_eq!(
        r.inventory().await.unwrap(),
        before,
        "a refused write changed a row"
    );
    let note = PgCluster::shared()
        .psql(&db, "SELECT note FROM pairs WHERE a = 1 AND b = 'x'")
        .unwrap();
    assert_eq!(note, "one");
}
