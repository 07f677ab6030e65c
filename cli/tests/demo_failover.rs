//! `concord demo --failover`, the real binary: a primary node, a standby node and the witness;
//! the primary killed (SIGKILL) or paused (SIGSTOP, then resumed) midway; the standby takes
//! over; the JSON says the new primary's site was checked atomic, no acknowledged commit was
//! lost, no split brain, with the failover's duration. A second run on the same directory is
//! refused (the pair's roles live in the witness). `concord bench failover --json` prints its
//! fields with one trial.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// How long a demo of the tests may take.
const RUN_MS_MAX: u64 = 180_000;

fn concord() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_concord"));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn run(args: &[&str], data: Option<&Path>) -> std::process::Output {
    let mut command = concord();
    command.args(args);
    if let Some(data) = data {
        command.arg("--data").arg(data);
    }
    let child = command.spawn().unwrap();
    common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the command")
}

fn summary(output: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn assert_failover(summary: &Value) {
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["acked_lost"], 0, "{summary}");
    assert_eq!(summary["split_brain"], false, "{summary}");
    assert_eq!(summary["failover"], true, "{summary}");
    assert_eq!(summary["clients_failed"], 0, "{summary}");
    let ms = summary["failover_ms"].as_f64().expect("failover_ms");
    assert!(ms > 0.0 && ms < 60_000.0, "{summary}");
    let committed = summary["committed"].as_u64().unwrap();
    assert!(committed > 0, "{summary}");
}

#[test]
fn the_standby_takes_over_from_a_killed_primary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = run(
        &["demo", "--failover", "--json", "--transactions", "400"],
        Some(&data),
    );
    assert_failover(&summary(&out));
    // A second run finds the first pair's roles and says the directory must be new.
    let again = run(&["demo", "--failover", "--json"], Some(&data));
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("new (or empty) --data directory"),
        "{stderr}"
    );
}

#[test]
fn a_paused_primary_steps_down_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &[
            "demo",
            "--failover",
            "--pause",
            "--json",
            "--transactions",
            "400",
        ],
        Some(&dir.path().join("demo")),
    );
    assert_failover(&summary(&out));
}

#[test]
fn bench_failover_prints_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = concord();
    command
        .args(["bench", "failover", "--json", "--trials", "1"])
        .args(["--switchovers", "2", "--stress-seconds", "2", "--dir"])
        .arg(dir.path());
    let child = command.spawn().unwrap();
    let out = common::output_within(child, Duration::from_millis(RUN_MS_MAX), "the bench");
    let bench = summary(&out);
    for field in [
        "failover_ms_p50",
        "failover_ms_p99",
        "restart_ms_p50",
        "failover_vs_restart",
        "switchover_ms_p50",
        "switchover_ms_p99",
    ] {
        let value = bench[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field}: {bench}"));
        assert!(value > 0.0, "{field}: {bench}");
    }
    assert_eq!(bench["false_failovers"], 0, "{bench}");
    assert_eq!(
        bench["switchover_ms"].as_array().map(Vec::len),
        Some(2),
        "{bench}"
    );
}
