//! `concord demo`'s own check can fail: on the data directory of a clean demo it passes; after
//! the stores are tampered with behind concord's back — a mail delivered a second time, a key
//! removed, a foreign message in the queue — a second demo on that directory reports each and
//! exits non-zero. Every child runs under a deadline.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// How long one demo run may take.
const DEMO_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `concord demo ARGS --data DATA` to its end, killing it past [`DEMO_DEADLINE`].
fn demo(data: &Path, args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .arg("demo")
        .args(args)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::output_within(child, DEMO_DEADLINE, "the demo")
}

#[test]
fn the_demo_check_passes_on_a_clean_run_and_reports_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--transactions",
        "30",
        "--concurrency",
        "4",
        "--fail-every",
        "5",
    ];
    let out = demo(&data, &[&args[..], &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(summary["committed"], 24, "{summary}");
    assert_eq!(
        summary["resources"],
        serde_json::json!(["uploads", "thumbnails", "mail", "index"])
    );
    let run = std::fs::read_dir(data.join("runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .to_string();
    assert_eq!(
        std::fs::read_to_string(data.join("runs").join(&run)).unwrap(),
        "30 5 mail kv\n"
    );
    let new = data.join("mail/new");
    let delivered: Vec<_> = std::fs::read_dir(&new)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(delivered.len(), 24, "one message per committed transaction");

    // A second delivery of one message (a reader's cur/ copy), a foreign message, a lost key.
    let copy = data.join("mail/cur").join("1.copy.host:2,S");
    std::fs::copy(&delivered[0], &copy).unwrap();
    std::fs::write(
        new.join("2.foreign.host"),
        b"From: x@example.org\r\n\r\nhi\r\n",
    )
    .unwrap();
    {
        let db = sled::open(data.join("index")).unwrap();
        let tree = db.open_tree("data").unwrap();
        let removed = tree.remove(format!("tx/{run}/0").as_bytes()).unwrap();
        assert!(removed.is_some(), "transaction 0 committed its key");
        db.flush().unwrap();
    }

    let out = demo(&data, &["--transactions", "1", "--fail-every", "0"]);
    assert!(
        !out.status.success(),
        "the check passed over tampered stores"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "was delivered 2 times",
        "2.foreign.host: not one of the demo's messages",
        &format!("run {run} transaction 0: partly present"),
        &format!("run {run} transaction 0: acknowledged but not present"),
        &format!("key \"tx/{run}/0\" of index is missing"),
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in: {stderr}");
    }
}
