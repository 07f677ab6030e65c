//! The throwaway PostgreSQL cluster itself: it starts, serves loopback connections with
//! prepared transactions enabled, gives each test its own database, and survives an immediate
//! stop and a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use adapters::pgtest::{MAX_PREPARED_TRANSACTIONS, PgCluster};

#[test]
fn the_cluster_serves_loopback_with_prepared_transactions() {
    let cluster = PgCluster::shared();
    let db = "harness_basics";
    cluster.database(db).unwrap();
    assert_eq!(
        cluster.psql(db, "SHOW max_prepared_transactions").unwrap(),
        MAX_PREPARED_TRANSACTIONS.to_string()
    );
    assert_eq!(
        cluster.psql(db, "SHOW listen_addresses").unwrap(),
        "127.0.0.1"
    );
    cluster
        .psql(db, "CREATE TABLE t (id int primary key)")
        .unwrap();
    cluster
        .psql(
            db,
            "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'harness:1'",
        )
        .unwrap();
    assert_eq!(
        cluster
            .psql(
                db,
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'harness:1'"
            )
            .unwrap(),
        "1"
    );
    cluster.psql(db, "COMMIT PREPARED 'harness:1'").unwrap();
    assert_eq!(cluster.psql(db, "SELECT id FROM t").unwrap(), "1");
}

#[test]
fn a_cluster_of_its_own_stops_and_starts_again_and_is_removed_when_dropped() {
    let cluster = PgCluster::start().unwrap();
    cluster.psql("postgres", "SELECT 1").unwrap();
    cluster.stop_immediate().unwrap();
    assert!(cluster.psql("postgres", "SELECT 1").is_err());
    cluster.restart().unwrap();
    assert_eq!(cluster.psql("postgres", "SELECT 1").unwrap(), "1");
    let port = cluster.port();
    drop(cluster);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
