//! Crash tests through the real binary: `concord demo` runs with one fail point armed on the
//! commit path, is killed there with SIGKILL while other transactions are in flight, and is run
//! again on the same data directory, which recovers. Then this file's own checker — which reads
//! the resources' directories and knows nothing of concord's code — proves that every transaction
//! is all-or-nothing, every acknowledged commit is present, and nothing is left staged or
//! prepared.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const POINTS: [&str; 5] = [
    "after_prepare",
    "decision_appended",
    "decision_durable",
    "between_commits",
    "before_end",
];
const FILES: [(&str, &str); 3] = [("uploads", "a"), ("uploads", "b"), ("thumbnails", "t")];
const FAIL_EVERY: u64 = 7;

fn concord() -> Command {
    Command::new(env!("CARGO_BIN_EXE_concord"))
}

/// Runs a demo with `point` armed to fire at its `hit`-th hit, and kills it there.
fn run_and_kill(data: &Path, point: &str, hit: u32) {
    let mut child = concord()
        .args(["demo", "--transactions", "3000", "--concurrency", "16"])
        .args(["--fail-every", &FAIL_EVERY.to_string(), "--data"])
        .arg(data)
        .env("CONCORD_FAILPOINT", format!("{point}:{hit}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (seen, fired) = mpsc::channel();
    let expected = format!("FAILPOINT {point}");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(&expected) {
                let _ = seen.send(());
            }
        }
    });
    let hit_in_time = fired.recv_timeout(Duration::from_secs(60));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(
        hit_in_time.is_ok(),
        "fail point {point} was never hit (demo exited with {status})"
    );
}

/// The independent checker.
fn check(data: &Path) -> u64 {
    let mut checked = 0;
    for run in std::fs::read_dir(data.join("runs")).unwrap() {
        let run = run.unwrap();
        let run_id = run.file_name().to_string_lossy().to_string();
        let text = std::fs::read_to_string(run.path()).unwrap();
        let fields: Vec<u64> = text
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        let (total, fail_every) = (fields[0], fields[1]);
        for i in 0..total {
            let present: Vec<bool> = FILES
                .iter()
                .map(|(resource, name)| {
                    let path = data.join(resource).join(format!("tx/{run_id}/{i}/{name}"));
                    let expected =
                        format!("concord demo run {run_id} transaction {i} file {name}\n");
                    match std::fs::read(&path) {
                        Ok(content) => {
                            assert_eq!(
                                content,
                                expected.as_bytes(),
                                "{} has foreign content",
                                path.display()
                            );
                            true
                        }
                        Err(_) => false,
                    }
                })
                .collect();
            let all = present.iter().all(|p| *p);
            let none = present.iter().all(|p| !*p);
            assert!(
                all || none,
                "run {run_id} transaction {i} is partly present: {present:?}"
            );
            if data.join("acks").join(&run_id).join(i.to_string()).exists() {
                assert!(
                    all,
                    "run {run_id} transaction {i} was acknowledged but is not present"
                );
            }
            if fail_every > 0 && i % fail_every == fail_every - 1 {
                assert!(
                    none,
                    "run {run_id} transaction {i} failed on purpose but is present"
                );
            }
            checked += 1;
        }
    }
    for (resource, _) in FILES {
        let staging = data.join(resource).join(".concord").join("staging");
        let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{} is not empty after recovery", staging.display());
        let prepared = adapters::files::prepared_on_disk(&data.join(resource)).unwrap();
        assert!(
            prepared.is_empty(),
            "{resource}: branches left prepared after recovery: {prepared:?}"
        );
    }
    checked
}

fn crash_at(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run_and_kill(&data, point, 40);
    let out = concord()
        .args([
            "demo",
            "--transactions",
            "50",
            "--concurrency",
            "4",
            "--json",
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "recovery run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert!(
        summary["earlier_transactions_checked"].as_u64().unwrap() > 0,
        "{summary}"
    );
    // The transaction frozen at the fail point left work for recovery: an undecided prepared
    // branch to roll back, or a durable decision without End to drive again.
    let key = match point {
        "after_prepare" => "recovered_rolled_back",
        "decision_appended" => "recovered_total",
        _ => "recovered_redriven",
    };
    let recovered = match key {
        "recovered_total" => {
            summary["recovered_rolled_back"].as_u64().unwrap()
                + summary["recovered_redriven"].as_u64().unwrap()
        }
        _ => summary[key].as_u64().unwrap(),
    };
    assert!(
        recovered > 0,
        "recovery found nothing to do after a crash at {point}: {summary}"
    );
    let checked = check(&data);
    assert!(checked >= 3050, "checked {checked} transactions");
}

#[test]
fn crash_after_a_branch_prepared() {
    crash_at(POINTS[0]);
}

#[test]
fn crash_after_the_decision_is_appended_before_it_is_durable() {
    crash_at(POINTS[1]);
}

#[test]
fn crash_after_the_decision_is_durable() {
    crash_at(POINTS[2]);
}

#[test]
fn crash_between_branches_in_phase_two() {
    crash_at(POINTS[3]);
}

#[test]
fn crash_before_the_end_record() {
    crash_at(POINTS[4]);
}
