//! `concord demo --postgres URL` against a real PostgreSQL server (the throwaway cluster of
//! `adapters::pgtest`): every transaction has an order row next to its files, the demo's check
//! covers both, and a demo killed with SIGKILL between a prepared PostgreSQL branch and the
//! decision is recovered: the prepared transaction is rolled back, none is left holding locks,
//! and this file's own checker — reading the files and the table directly — finds every
//! transaction all-or-nothing and every acknowledged one present.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use adapters::pgtest::PgCluster;

const FILES: [(&str, &str); 3] = [("uploads", "a"), ("uploads", "b"), ("thumbnails", "t")];

fn concord() -> Command {
    Command::new(env!("CARGO_BIN_EXE_concord"))
}

fn demo_json(data: &Path, url: &str, transactions: u64) -> serde_json::Value {
    let out = concord()
        .args([
            "demo",
            "--json",
            "--transactions",
            &transactions.to_string(),
        ])
        .args([
            "--concurrency",
            "8",
            "--fail-every",
            "5",
            "--postgres",
            url,
            "--data",
        ])
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_demo_with_a_postgres_branch_verifies_atomicity() {
    let cluster = PgCluster::shared();
    let url = cluster.database("demo_plain").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let summary = demo_json(&dir.path().join("data"), &url, 200);
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["committed"], 160, "{summary}");
    assert_eq!(summary["rolled_back"], 40, "{summary}");
    assert_eq!(
        cluster
            .psql("demo_plain", "SELECT count(*) FROM concord_demo_orders")
            .unwrap(),
        "160"
    );
    check(&dir.path().join("data"), cluster, "demo_plain");
}

#[test]
fn a_demo_killed_after_a_prepare_leaves_no_prepared_transaction_after_recovery() {
    let cluster = PgCluster::shared();
    let db = "demo_crash";
    let url = cluster.database(db).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // Killed after some branches prepared, before their decision.
    let mut child = concord()
        .args(["demo", "--transactions", "2000", "--concurrency", "16"])
        .args(["--fail-every", "5", "--postgres", &url, "--data"])
        .arg(&data)
        .env("CONCORD_FAILPOINT", "after_prepare:40")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (seen, fired) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("FAILPOINT after_prepare") {
                let _ = seen.send(());
            }
        }
    });
    let hit = fired.recv_timeout(Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    assert!(hit.is_ok(), "the fail point was never hit");
    let prepared = cluster
        .psql(
            db,
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'concord:%' AND database = current_database()",
        )
        .unwrap();
    assert_ne!(
        prepared, "0",
        "the kill left no prepared branch: nothing to recover"
    );

    // A PREPARE the killed process had sent may still be running in its session; recovery
    // lists what is prepared once, so it starts after those sessions ended (a prepare that
    // finished later would be left to the orphan sweeper).
    let gone = adapters::pgtest::wait_until(Duration::from_secs(20), || {
        cluster
            .psql(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .unwrap()
            == "0"
    });
    assert!(gone, "the killed demo's sessions did not end");

    // The next run recovers, then checks the killed run too.
    let summary = demo_json(&data, &url, 100);
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert!(
        summary["recovered_rolled_back"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert_eq!(
        cluster
            .psql(
                db,
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'concord:%' AND database = current_database()"
            )
            .unwrap(),
        "0"
    );
    check(&data, cluster, db);
}

/// The independent checker: for every transaction of every run, its three files and its order
/// row are all present or all absent, and every acknowledged one is present.
fn check(data: &Path, cluster: &PgCluster, db: &str) {
    let rows: HashSet<(String, u64)> = cluster
        .psql(db, "SELECT run || ' ' || i FROM concord_demo_orders")
        .unwrap()
        .lines()
        .map(|line| {
            let (run, i) = line.split_once(' ').unwrap();
            (run.to_string(), i.parse().unwrap())
        })
        .collect();
    let mut checked = 0;
    for run in std::fs::read_dir(data.join("runs")).unwrap() {
        let run = run.unwrap();
        let run_id = run.file_name().to_string_lossy().to_string();
        let text = std::fs::read_to_string(run.path()).unwrap();
        let total: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
        for i in 0..total {
            let mut present: Vec<bool> = FILES
                .iter()
                .map(|(resource, name)| {
                    data.join(resource)
                        .join(format!("tx/{run_id}/{i}/{name}"))
                        .exists()
                })
                .collect();
            present.push(rows.contains(&(run_id.clone(), i)));
            let all = present.iter().all(|p| *p);
            let none = present.iter().all(|p| !*p);
            assert!(all || none, "run {run_id} transaction {i}: {present:?}");
            if data.join("acks").join(&run_id).join(i.to_string()).exists() {
                assert!(
                    all,
                    "run {run_id} transaction {i} acknowledged, not present"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
}
