//! Every `--json` output of the binary, run for real and read back with serde_json: each is one
//! JSON document, or NDJSON (one object per line) where `docs/operations.md` says so, and each
//! object has exactly the field names documented there. (`pg install|replicate --json` are
//! covered by `pg_cli.rs` against the throwaway PostgreSQL cluster, and `bench postgres`
//! needs a cluster too.) Every child runs under a deadline.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use adapters::Xid;
use coordinator::record::CoordRecord;
use journal::{Epoch, Journal, JournalConfig};
use serde_json::Value;

/// How long any one command may take.
const DEADLINE: Duration = Duration::from_secs(120);

/// Runs `concord ARGS` to its end; it must succeed.
fn concord(args: &[&str]) -> Output {
    concord_exiting(args, 0)
}

/// Runs `concord ARGS` to its end; it must exit with `code`.
fn concord_exiting(args: &[&str], code: i32) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, DEADLINE, &args.join(" "));
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Standard output as exactly one JSON document.
fn one_document(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Standard output as NDJSON: one object per line, at least one.
fn ndjson(out: &Output) -> Vec<Value> {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "no lines");
    assert!(lines.iter().all(Value::is_object), "{text}");
    lines
}

/// Asserts that `value` is an object with exactly the fields `names`.
fn assert_fields(value: &Value, names: &[&str]) {
    let got: BTreeSet<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    let want: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(got, want, "{value}");
}

fn path_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A data directory after a short demo, whose `--json` summary is checked here.
fn demo_data(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let out = concord(&[
        "demo",
        "--transactions",
        "6",
        "--concurrency",
        "2",
        "--json",
        "--data",
        path_arg(&data),
    ]);
    let summary = one_document(&out);
    assert_fields(
        &summary,
        &[
            "resources",
            "committed",
            "rolled_back",
            "atomicity_verified",
            "tx_per_s",
            "p50_ms",
            "p99_ms",
            "earlier_transactions_checked",
            "recovered_redriven",
            "recovered_rolled_back",
        ],
    );
    data
}

#[test]
fn demo_journal_and_txn_commands_print_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = demo_data(dir.path());
    let journal_dir = data.join("journal");

    let verdict = one_document(&concord(&[
        "journal",
        "verify",
        "--json",
        path_arg(&journal_dir),
    ]));
    assert_fields(
        &verdict,
        &[
            "status",
            "dir",
            "segments",
            "records",
            "first_lsn",
            "last_lsn",
            "last_epoch",
            "last_chain",
            "torn_tail",
            "leftovers",
            "error",
            "corrupt_at",
        ],
    );

    let record_fields = [
        "type",
        "lsn",
        "epoch",
        "kind",
        "version",
        "payload_bytes",
        "chain",
        "record",
        "decode_error",
    ];
    for line in ndjson(&concord(&[
        "journal",
        "inspect",
        "--json",
        path_arg(&journal_dir),
    ])) {
        assert_fields(&line, &record_fields);
    }
    let with_payload = [&record_fields[..], &["payload_hex"]].concat();
    let args = [
        "journal",
        "inspect",
        "--json",
        "--payload",
        path_arg(&journal_dir),
    ];
    for line in ndjson(&concord(&args)) {
        assert_fields(&line, &with_payload);
    }

    let empty = concord(&["txn", "list", "--json", "--data", path_arg(&data)]);
    assert_eq!(String::from_utf8(empty.stdout.clone()).unwrap(), "[]\n");

    // A decision naming a resource that is gone for good: listed, then forgotten by hand.
    let stuck = Xid {
        node: 1,
        epoch: Epoch(1),
        seq: 99,
    };
    append_commit(&journal_dir, stuck, "tape");
    // Partial (exit 4): no configuration has `tape`, so its prepared branches cannot be read;
    // the array is printed all the same.
    let rows = one_document(&concord_exiting(
        &["txn", "list", "--json", "--data", path_arg(&data)],
        4,
    ));
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_fields(
        &rows[0],
        &["xid", "state", "standing", "age_ms", "branches"],
    );

    let xid = stuck.to_string();
    let args = [
        "txn",
        "resolve",
        &xid,
        "--commit",
        "--forget",
        "tape",
        "--reason",
        "tape lost",
        "--json",
        "--data",
    ];
    let mut args = args.to_vec();
    args.push(path_arg(&data));
    let resolved = one_document(&concord(&args));
    assert_fields(
        &resolved,
        &[
            "xid", "decision", "recorded", "operator", "finished", "branches",
        ],
    );
    for branch in resolved["branches"].as_array().unwrap() {
        assert_fields(branch, &["resource", "state", "detail"]);
    }
}

/// Appends a `Commit` of `xid` with one branch in `resource` to the journal in `dir`.
fn append_commit(dir: &Path, xid: Xid, resource: &str) {
    let journal = Journal::open(dir, JournalConfig::default()).unwrap();
    let record = CoordRecord::Commit {
        xid,
        at_ms: 1,
        branches: vec![(resource.into(), vec![])],
    };
    journal
        .append(Epoch(1), record.kind(), &record.encode())
        .unwrap()
        .wait()
        .unwrap();
    journal.close().unwrap();
}

#[test]
fn benchmarks_print_the_documented_json() {
    let rows = ndjson(&concord(&[
        "bench",
        "journal",
        "--json",
        "--appenders",
        "1,2",
        "--payload-bytes",
        "128",
        "--seconds",
        "0.2",
    ]));
    assert_eq!(rows.len(), 2, "one object per configuration");
    for row in &rows {
        assert_fields(
            row,
            &[
                "appenders",
                "payload_bytes",
                "records_per_s",
                "records_per_fsync",
                "baseline_records_per_s",
                "speedup",
                "sync_busy_pct",
                "write_busy_pct",
                "appender",
            ],
        );
    }

    let rows = ndjson(&concord(&[
        "bench",
        "commit",
        "--json",
        "--resource",
        "null",
        "--clients",
        "1,2",
        "--seconds",
        "0.2",
    ]));
    assert_eq!(rows.len(), 2, "one object per configuration");
    for row in &rows {
        assert_fields(
            row,
            &[
                "clients",
                "tx_per_s",
                "p50_ms",
                "p99_ms",
                "baseline_tx_per_s",
                "ratio",
            ],
        );
    }

    let report = one_document(&concord(&[
        "bench",
        "recovery",
        "--json",
        "--small",
        "20",
        "--large",
        "40",
        "--clients",
        "2",
        "--runs",
        "1",
        "--retained-mib",
        "0",
    ]));
    assert_fields(
        &report,
        &[
            "small_transactions",
            "small_open_ms",
            "small_journal_bytes",
            "large_transactions",
            "large_open_ms",
            "large_journal_bytes",
            "open_ratio",
            "retained_bytes",
            "retained_journal_open_ms",
            "retained_open_ms",
        ],
    );
}
