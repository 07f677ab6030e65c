//! `concord demo` run again on the data directory of a demo killed midway (SIGKILL): the
//! second run recovers, checks both runs, and counts as `earlier_transactions_checked` the
//! transactions of the killed run that ran — up to its highest committed one found in the stores —
//! never the number that run had planned. Every child runs under a
//! deadline.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Transactions the killed run plans: far more than it runs before it is killed.
const PLANNED: u64 = 100_000;
/// Acknowledged commits to wait for before the kill.
const ACKS_BEFORE_KILL: usize = 20;
/// How long the first run may take to acknowledge [`ACKS_BEFORE_KILL`] commits.
const ACKS_DEADLINE: Duration = Duration::from_secs(60);
/// How long the second run may take.
const RERUN_DEADLINE: Duration = Duration::from_secs(90);

fn demo(data: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_concord"));
    command
        .arg("demo")
        .args(args)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn");
    command
}

/// The one directory under `acks/` (the killed run's), once it holds `count` entries.
fn wait_for_acks(data: &Path, count: usize) -> Option<String> {
    let started = Instant::now();
    while started.elapsed() < ACKS_DEADLINE {
        let runs = std::fs::read_dir(data.join("acks")).into_iter().flatten();
        for run in runs.flatten() {
            let acks = std::fs::read_dir(run.path()).map_or(0, |d| d.count());
            if acks >= count {
                return Some(run.file_name().to_string_lossy().into_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Transactions of a killed `run` that ran, as the data directory holds them: every one up to
/// its highest committed one, whose files are in `uploads` (clients take numbers in order).
fn ran_in_data(data: &Path, run: &str) -> u64 {
    std::fs::read_dir(data.join("uploads/tx").join(run))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name();
            name.to_str().unwrap().parse::<u64>().unwrap() + 1
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_rerun_counts_the_transactions_a_killed_run_ran_not_those_it_planned() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let planned = PLANNED.to_string();
    let mut child = demo(&data, &["--transactions", &planned, "--concurrency", "8"])
        .args(["--fail-every", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let killed_run = wait_for_acks(&data, ACKS_BEFORE_KILL);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_run = killed_run.expect("the first demo acknowledged commits in time");

    let child = demo(
        &data,
        &["--transactions", "10", "--fail-every", "0", "--json"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let out = common::output_within(child, RERUN_DEADLINE, "the second demo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    let ran = ran_in_data(&data, &killed_run);
    assert!(ran >= ACKS_BEFORE_KILL as u64 && ran < PLANNED, "{ran}");
    assert_eq!(summary["earlier_transactions_checked"], ran, "{summary}");
}
