//! `concord demo --standby`, the real binary: a primary daemon and a standby following it, the
//! remote demo's workload through the primary; the JSON says the run was checked atomic, the
//! sites equal, and carries the lag's percentiles. Afterwards `concord compare --data D` finds
//! the stopped sites equal (exit 0), and a second run on the same directory (both sites resume)
//! still does. With `--postgres` each site has a throwaway PostgreSQL cluster of its own and the
//! orders table is compared too. `concord bench replication --json` prints its ratios with tiny
//! numbers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// How long a demo (or a comparison) of the tests may take.
const RUN_MS_MAX: u64 = 180_000;

fn concord() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_concord"));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `concord demo --standby --json --data D EXTRA` and returns its summary.
fn demo_standby(data: &Path, extra: &[&str]) -> Value {
    let child = concord()
        .args(["demo", "--standby", "--json", "--data"])
        .arg(data)
        .args(extra)
        .spawn()
        .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn assert_standby_summary(summary: &Value, committed: u64) {
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["sites_equal"], true, "{summary}");
    assert_eq!(summary["committed"], committed, "{summary}");
    assert_eq!(summary["clients_failed"], 0, "{summary}");
    let p50 = summary["lag_p50_ms"].as_f64().expect("lag_p50_ms");
    let p99 = summary["lag_p99_ms"].as_f64().expect("lag_p99_ms");
    assert!(0.0 <= p50 && p50 <= p99, "{summary}");
}

/// `concord compare --data D` on the stopped sites: exit 0, every resource equal.
fn assert_compare_equal(data: &Path) {
    let child = concord()
        .args(["compare", "--json", "--data"])
        .arg(data)
        .spawn()
        .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "compare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "compare --data exit {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["equal"], true, "{report}");
    let resources = report["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 4, "{report}");
    for r in resources {
        assert!(r["primary_keys"].as_u64().unwrap() > 0, "{report}");
    }
}

#[test]
fn the_standby_demo_ends_with_equal_sites_and_compare_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let summary = demo_standby(&data, &["--transactions", "200"]);
    assert_standby_summary(&summary, 180);
    assert_compare_equal(&data);

    // Both sites resume on the same directory: the earlier run is checked again.
    let again = demo_standby(&data, &["--transactions", "50"]);
    assert_standby_summary(&again, 45);
    assert_eq!(again["earlier_transactions_checked"], 200, "{again}");
    assert_compare_equal(&data);
}

#[test]
fn the_standby_demo_with_postgres_gives_each_site_its_own_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let summary = demo_standby(&data, &["--transactions", "200", "--postgres"]);
    assert_standby_summary(&summary, 180);
    let resources = summary["resources"].as_array().unwrap();
    assert!(resources.iter().any(|r| r == "orders"), "{summary}");
    // Each site's configuration names its own database.
    let url = |site: &str| {
        let text = std::fs::read_to_string(data.join(site).join("concord.toml")).unwrap();
        let line = text.lines().find(|l| l.starts_with("url = ")).unwrap();
        line.to_string()
    };
    assert_ne!(url("primary"), url("standby"));
}

#[test]
fn a_url_with_standby_postgres_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let child = concord()
        .args([
            "demo",
            "--standby",
            "--postgres",
            "postgres://x/y",
            "--data",
        ])
        .arg(dir.path())
        .spawn()
        .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the demo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("takes no URL"), "{stderr}");
}

#[test]
fn the_replication_bench_prints_its_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let child = concord()
        .args(["bench", "replication", "--json", "--transactions", "40"])
        .args(["--clients", "4", "--lag-seconds", "1", "--dir"])
        .arg(dir.path())
        .spawn()
        .unwrap();
    let output = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    for field in [
        "none_tps",
        "async_tps",
        "sync_tps",
        "replay_tps",
        "async_vs_none",
        "sync_vs_none",
        "replay_vs_primary",
    ] {
        assert!(r[field].as_f64().unwrap() > 0.0, "{field}: {r}");
    }
    // Each of the async and sync windows: 40 transactions and a warm-up of 10.
    assert_eq!(r["replay_transactions"], 100, "{r}");
    assert!(r["lag_samples"].as_u64().unwrap() > 0, "{r}");
    assert!(r["lag_p99_ms"].as_f64().unwrap() >= r["lag_p50_ms"].as_f64().unwrap());
}
