//! The demo's waits, through the real binary: when it cannot finish what the journal holds, it
//! says why at once, plainly — never a debug dump, never a silent timeout.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use adapters::{Epoch, Xid};
use coordinator::record::CoordRecord;

/// Far below the demo's own 60 s wait: the refusal must come at start, not after a timeout.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(30);

/// Journals a decided transaction with a branch in `resource`, and no `End`, under `data`.
fn decided_in(data: &Path, resource: &str) -> Xid {
    let xid = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: 77,
    };
    let journal =
        journal::Journal::open(data.join("journal"), coordinator::runtime::journal_config())
            .unwrap();
    let record = CoordRecord::Commit {
        xid,
        at_ms: 0,
        branches: vec![(resource.into(), b"redo".to_vec())],
    };
    journal
        .append(Epoch(1), record.kind(), &record.encode())
        .unwrap()
        .wait()
        .unwrap();
    journal.close().unwrap();
    xid
}

/// A data directory whose journal holds a transaction with a PostgreSQL branch, run without
/// `--postgres`: the demo stops at start naming the resource and the xid and saying what to
/// add, instead of waiting 60 s and printing the coordinator's internals.
#[test]
fn a_journal_naming_a_resource_the_demo_lacks_is_refused_at_start() {
    let data = tempfile::tempdir().unwrap();
    let xid = decided_in(data.path(), "orders");
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["demo", "--transactions", "1", "--data"])
        .arg(data.path())
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, REFUSAL_DEADLINE, "concord demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for wanted in [
        &xid.to_string()[..],
        "orders",
        "not configured",
        "add those resources to the configuration",
        "--postgres",
    ] {
        assert!(stderr.contains(wanted), "{wanted:?} not in {stderr}");
    }
    assert!(!stderr.contains("TxnInfo"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
