//! `concord demo --remote` and `concord bench commit --remote`, the real binary: the demo starts
//! a daemon child and client processes, and its JSON says the run was checked atomic; a client
//! process killed with SIGKILL mid-run leaves every transaction whole or absent, the daemon
//! still stops with exit 0, and the demo counts the dead client. With `--postgres` (against
//! the throwaway cluster of `adapters::pgtest`) every transaction also has an order row,
//! prepared in a client process and finished by the daemon: the same checks hold, with a
//! client killed mid-run too, and no branch of the demo is left in `pg_prepared_xacts`. The
//! benchmark's JSON rows have their shape with tiny numbers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adapters::pgtest::PgCluster;
use serde_json::Value;

/// How long a demo or a benchmark of the tests may take.
const RUN_MS_MAX: u64 = 180_000;
/// How long the killed-client test waits for the first acknowledgements.
const PROGRESS_MS_MAX: u64 = 60_000;

fn concord() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_concord"));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn demo(data: &Path, extra: &[&str]) -> Command {
    let mut command = concord();
    command
        .args(["demo", "--remote", "--json", "--data"])
        .arg(data)
        .args(extra);
    command
}

fn json_of(output: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn a_small_remote_demo_is_atomic_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let child = demo(
        &data,
        &[
            "--transactions",
            "60",
            "--concurrency",
            "4",
            "--clients",
            "2",
        ],
    )
    .spawn()
    .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the demo");
    let summary = json_of(&output);
    assert_eq!(summary["remote"], true, "{summary}");
    assert_eq!(summary["clients"], 2, "{summary}");
    assert_eq!(summary["clients_failed"], 0, "{summary}");
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["committed"], 54, "{summary}");
    assert_eq!(summary["rolled_back"], 6, "{summary}");
    assert!(summary["tx_per_s"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(summary["p99_ms"].as_f64().unwrap() >= summary["p50_ms"].as_f64().unwrap());
    let acks = std::fs::read_dir(data.join("acks")).unwrap().count();
    assert_eq!(acks, 1, "one run recorded");

    // A second run on the same directory checks the first one too.
    let child = demo(
        &data,
        &[
            "--transactions",
            "10",
            "--concurrency",
            "2",
            "--clients",
            "1",
        ],
    )
    .spawn()
    .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the demo");
    let summary = json_of(&output);
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["earlier_transactions_checked"], 60, "{summary}");
}

/// The pids of `parent`'s children whose command line holds `word`.
fn children_with(parent: u32, word: &str) -> Vec<u32> {
    let list = format!("/proc/{parent}/task/{parent}/children");
    let Ok(text) = std::fs::read_to_string(list) else {
        return Vec::new();
    };
    text.split_whitespace()
        .filter_map(|pid| pid.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(word))
                .unwrap_or(false)
        })
        .collect()
}

fn count_acks(data: &Path) -> usize {
    let Ok(runs) = std::fs::read_dir(data.join("acks")) else {
        return 0;
    };
    runs.flatten()
        .filter_map(|run| std::fs::read_dir(run.path()).ok())
        .map(|acks| acks.count())
        .sum()
}

/// Runs a remote demo of 600 transactions from 3 clients on `data` (`extra`: more options),
/// kills client 1 with SIGKILL once 30 transactions were acknowledged, and returns the demo's
/// summary, which must say the run was checked atomic with one client failed.
fn demo_with_a_client_killed(data: &Path, extra: &[&str]) -> Value {
    let mut options = vec![
        "--transactions",
        "600",
        "--concurrency",
        "6",
        "--clients",
        "3",
    ];
    options.extend_from_slice(extra);
    let child = demo(data, &options).spawn().unwrap();
    let demo_pid = child.id();
    let deadline = Instant::now() + Duration::from_millis(PROGRESS_MS_MAX);
    let victim = loop {
        let clients = children_with(demo_pid, "demo-client");
        if clients.len() == 3 && count_acks(data) >= 30 {
            break clients[1];
        }
        assert!(
            Instant::now() < deadline,
            "no progress within {PROGRESS_MS_MAX} ms"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let killed = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the demo");
    let summary = json_of(&output);
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["clients_failed"], 1, "{summary}");
    let ran = summary["committed"].as_u64().unwrap() + summary["rolled_back"].as_u64().unwrap();
    assert!(
        ran < 600,
        "the killed client's share did not run: {summary}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("demo client 1"), "{stderr}");
    summary
}

#[test]
fn a_client_killed_mid_run_leaves_atomicity_verified() {
    let dir = tempfile::tempdir().unwrap();
    demo_with_a_client_killed(&dir.path().join("d"), &[]);
}

/// The branches of the demo's resource still prepared in `db`.
fn prepared_in(cluster: &PgCluster, db: &str) -> String {
    cluster
        .psql(
            db,
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'concord:%' AND database = current_database()",
        )
        .unwrap()
}

#[test]
fn a_remote_demo_with_postgres_is_atomic_and_leaves_nothing_prepared() {
    let cluster = PgCluster::shared();
    let db = "demo_remote_pg";
    let url = cluster.database(db).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let child = demo(
        &data,
        &[
            "--transactions",
            "40",
            "--concurrency",
            "4",
            "--clients",
            "2",
            "--fail-every",
            "5",
            "--postgres",
            &url,
        ],
    )
    .spawn()
    .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the demo");
    let summary = json_of(&output);
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["remote"], true, "{summary}");
    assert_eq!(summary["clients"], 2, "{summary}");
    assert_eq!(summary["clients_failed"], 0, "{summary}");
    assert_eq!(summary["committed"], 32, "{summary}");
    assert_eq!(summary["rolled_back"], 8, "{summary}");
    let resources = summary["resources"].as_array().unwrap();
    assert!(resources.contains(&Value::from("orders")), "{summary}");
    assert_eq!(
        cluster
            .psql(db, "SELECT count(*) FROM concord_demo_orders")
            .unwrap(),
        "32"
    );
    assert_eq!(prepared_in(cluster, db), "0");
    // The daemon's configuration, kept in the data directory, holds the URL: its owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("concord.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "concord.toml mode {mode:o}");
}

#[test]
fn a_client_killed_mid_run_with_postgres_leaves_atomicity_verified() {
    let cluster = PgCluster::shared();
    let db = "demo_remote_pg_kill";
    let url = cluster.database(db).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let summary = demo_with_a_client_killed(&dir.path().join("d"), &["--postgres", &url]);
    let committed = summary["committed"].as_u64().unwrap();
    let rows: u64 = cluster
        .psql(db, "SELECT count(*) FROM concord_demo_orders")
        .unwrap()
        .parse()
        .unwrap();
    // Acknowledged ones all have their row; the dead client may have committed a few more.
    assert!(rows >= committed, "{rows} rows, {summary}");
    assert_eq!(prepared_in(cluster, db), "0");
}

#[test]
fn the_remote_commit_bench_prints_its_rows() {
    let child = concord()
        .args(["bench", "commit", "--remote", "--json"])
        .args(["--transactions", "20", "--clients", "1,2"])
        .spawn()
        .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (row, clients) in rows.iter().zip([1, 2]) {
        assert_eq!(row["clients"], clients, "{row}");
        for field in [
            "embedded_tps",
            "remote_tps",
            "remote_vs_embedded",
            "embedded_p50_ms",
            "embedded_p99_ms",
            "remote_p50_ms",
            "remote_p99_ms",
        ] {
            let value = row[field].as_f64();
            assert!(value.is_some_and(|v| v > 0.0), "{field} in {row}");
        }
        let ratio = row["remote_tps"].as_f64().unwrap() / row["embedded_tps"].as_f64().unwrap();
        assert!((row["remote_vs_embedded"].as_f64().unwrap() - ratio).abs() < 1e-6);
    }
}
