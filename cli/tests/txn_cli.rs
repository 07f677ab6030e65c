//! `concord txn list` and `concord txn resolve` on a data directory with a transaction stuck in
//! phase 2 because its resource is gone for good, and `txn list` finding branches prepared in the
//! mail queue and the kv store of the embedded defaults.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use adapters::Xid;
use coordinator::record::CoordRecord;
use journal::{Epoch, Journal, JournalConfig};

fn concord(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap()
}

/// An xid of node 1 at epoch 1.
fn xid(seq: u64) -> Xid {
    Xid {
        node: 1,
        epoch: Epoch(1),
        seq,
    }
}

/// An empty journal in `data` (created with its directories).
fn empty_journal(data: &Path) {
    let config = JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    };
    drop(Journal::open(data.join("journal"), config).unwrap());
}

/// Appends a `Commit` of `xid` with one branch in `resource` to the journal in `data`
/// (created when missing), and waits for it.
fn append_commit(data: &Path, xid: Xid, resource: &str) {
    append_commit_at(data, xid, resource, 1);
}

/// [`append_commit`] of a decision made at `at_ms` (milliseconds since the Unix epoch).
fn append_commit_at(data: &Path, xid: Xid, resource: &str, at_ms: u64) {
    let config = JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    };
    let journal = Journal::open(data.join("journal"), config).unwrap();
    let record = CoordRecord::Commit {
        xid,
        at_ms,
        branches: vec![(resource.into(), vec![])],
    };
    journal
        .append(Epoch(1), record.kind(), &record.encode())
        .unwrap()
        .wait()
        .unwrap();
}

/// A `concord.toml` in `dir`: a files resource `uploads` under `data`, and a PostgreSQL
/// resource `orders` on a loopback port nothing listens on.
fn unreachable_postgres_config(dir: &Path, data: &Path) -> std::path::PathBuf {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = dir.join("concord.toml");
    std::fs::write(
        &config,
        format!(
            "node = 1\ndata_dir = {data:?}\n\n[resources.uploads]\nkind = \"files\"\nroot = {root:?}\ncreate = true\n\n[resources.orders]\nkind = \"postgres\"\nurl = \"host=127.0.0.1 port={port} user=nobody dbname=nowhere connect_timeout=1\"\n",
            data = data.display().to_string(),
            root = data.join("uploads").display().to_string(),
        ),
    )
    .unwrap();
    config
}

/// The rows of `txn list --json`: a complete list (exit 0), or a partial one (exit 4) whose
/// only unread resource is `tape`, which the journal of these tests names and no configuration
/// has.
fn listed(data: &Path) -> Vec<serde_json::Value> {
    let out = concord(&["txn", "list", "--json"], data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let only_tape_unread = out.status.code() == Some(4)
        && stderr.contains("resource tape could not be read")
        && stderr.contains("the configuration has no resource of that name");
    assert!(out.status.success() || only_tape_unread, "{stderr}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array().unwrap().clone()
}

#[test]
fn a_stuck_transaction_is_listed_and_resolved_by_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = concord(
        &[
            "demo",
            "--transactions",
            "20",
            "--concurrency",
            "2",
            "--json",
        ],
        &data,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        listed(&data).is_empty(),
        "a clean demo leaves nothing unfinished"
    );

    // A decision naming a resource that no longer exists: phase 2 can never finish by itself.
    let stuck = xid(42);
    append_commit(&data, stuck, "tape");
    let rows = listed(&data);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["xid"], stuck.to_string());
    assert_eq!(rows[0]["state"], "committed, phase 2 unfinished");
    assert_eq!(rows[0]["branches"], serde_json::json!(["tape"]));
    let human = concord(&["txn", "list"], &data);
    assert!(String::from_utf8_lossy(&human.stdout).contains(&stuck.to_string()));
    // Its prepared branches cannot be read: the list says so and is partial.
    assert_eq!(
        human.status.code(),
        Some(4),
        "a list missing a resource is partial"
    );
    let note = String::from_utf8_lossy(&human.stderr);
    assert!(
        note.contains("resource tape could not be read") && note.contains("configuration"),
        "{note}"
    );

    let refused = concord(&["txn", "resolve", &stuck.to_string(), "--rollback"], &data);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("cannot be rolled back"), "{message}");

    // The branch's resource is not configured: nothing can be carried out there, the command
    // says so, exits non-zero, and the transaction stays listed.
    let resolve = |extra: &[&str]| {
        let xid = stuck.to_string();
        let mut args = vec![
            "txn",
            "resolve",
            &xid,
            "--commit",
            "--operator",
            "ops",
            "--json",
        ];
        args.extend_from_slice(extra);
        concord(&args, &data)
    };
    let out = resolve(&[]);
    assert!(!out.status.success());
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["decision"], "commit");
    assert_eq!(answer["finished"], false);
    assert_eq!(answer["branches"][0]["resource"], "tape");
    assert_eq!(answer["branches"][0]["state"], "unreached");
    assert_eq!(listed(&data).len(), 1, "the transaction stays open");

    // Forgetting needs a reason; with one, the transaction ends for good.
    let out = resolve(&["--forget", "tape"]);
    assert!(!out.status.success());
    let out = resolve(&[
        "--forget",
        "tape",
        "--reason",
        "the tape library was retired",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["operator"], "ops");
    assert_eq!(answer["finished"], true);
    assert_eq!(answer["branches"][0]["state"], "forgotten");
    assert!(
        listed(&data).is_empty(),
        "resolved transactions are no longer listed"
    );

    let journal = Journal::open(data.join("journal"), JournalConfig::default()).unwrap();
    let resolved = journal.read_from(journal.oldest_lsn()).unwrap().any(|r| {
        let r = r.unwrap();
        matches!(CoordRecord::decode(r.kind, &r.payload), Ok(CoordRecord::Resolve { xid, commit: true, ref operator, .. }) if xid == stuck && operator == "ops")
    });
    assert!(
        resolved,
        "the operator's decision is in the journal with who made it"
    );
}

#[test]
fn a_malformed_xid_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = concord(&["txn", "resolve", "not-an-xid", "--commit"], dir.path());
    // A bad argument is a usage error (exit 2), and no resource is called "xid".
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not an xid"), "{stderr}");
    assert!(!stderr.contains("resource xid"), "{stderr}");
}

/// A branch left prepared in the Maildir and one in the sled store (no decision names them) are
/// both listed as in doubt under their xid.
#[test]
fn branches_prepared_in_the_mail_queue_and_the_kv_store_are_listed() {
    use adapters::Resource;
    use adapters::kv::{KvConfig, KvResource};
    use adapters::mail::{MailConfig, MailResource, MessageBuilder};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    empty_journal(&data);
    let xid = xid(7);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mail_config = MailConfig {
            create: true,
            ..MailConfig::default()
        };
        let mail = MailResource::open("mail", &data.join("mail"), mail_config).unwrap();
        mail.begin(&xid).await.unwrap();
        let message = MessageBuilder::new()
            .from("a@example.org")
            .to("b@example.org")
            .body("in doubt\n");
        mail.branch(&xid).enqueue_built(&message).await.unwrap();
        mail.prepare(&xid).await.unwrap();
        let kv_config = KvConfig {
            create_if_missing: true,
            ..KvConfig::default()
        };
        let kv = KvResource::open("index", &data.join("index"), kv_config).unwrap();
        kv.begin(&xid).await.unwrap();
        kv.branch(&xid).insert(b"k", b"v").await.unwrap();
        kv.prepare(&xid).await.unwrap();
    });
    drop(runtime);
    // The kv instance just dropped may hold sled's lock for a moment; `list` then says so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let rows = loop {
        let out = concord(&["txn", "list", "--json"], &data);
        let note = String::from_utf8_lossy(&out.stderr).contains("is open in a running process");
        // While sled is held, the list is partial: exit code 4.
        let expected = if note { 4 } else { 0 };
        assert_eq!(
            out.status.code(),
            Some(expected),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !note {
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            break rows.as_array().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline, "sled stayed locked");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["xid"], xid.to_string());
    assert_eq!(rows[0]["state"], "prepared, no decision (in doubt)");
    assert_eq!(rows[0]["branches"], serde_json::json!(["index", "mail"]));

    // An operator's rollback that could not reach the resources (they were unreachable then):
    // the row says whose decision waits, not "no decision".
    let resolve = CoordRecord::Resolve {
        xid,
        commit: false,
        operator: "carol".into(),
        at_ms: 1,
    };
    let journal = Journal::open(data.join("journal"), JournalConfig::default()).unwrap();
    journal
        .append(Epoch(1), resolve.kind(), &resolve.encode())
        .unwrap()
        .wait()
        .unwrap();
    journal.close().unwrap();
    let rows = listed(&data);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        rows[0]["state"],
        "prepared; carol resolved it rollback, not yet carried out here"
    );
}

/// `resolve` opens only the resources the xid involves: a configuration whose PostgreSQL is
/// unreachable still resolves a transaction of its files resource, and a directory with no
/// journal is refused with nothing created.
#[test]
fn resolve_opens_only_the_resources_the_xid_involves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Nothing of concord here: refused, nothing created.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = concord(&["txn", "resolve", "n1e1s5", "--rollback"], &empty);
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("no concord journal"), "{message}");
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "nothing created"
    );

    let config = unreachable_postgres_config(dir.path(), &data);
    let stuck = xid(43);
    append_commit(&data, stuck, "uploads");
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["txn", "resolve", &stuck.to_string(), "--commit", "--json"])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["finished"], true);
    assert_eq!(answer["branches"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(answer["branches"][0]["resource"], "uploads");
}

/// `txn list` on a directory without concord data is an error; with nothing unfinished `--json`
/// prints `[]` and the text a line saying so; rows come under a header; a resource that cannot
/// be read is named, the rest is listed, and the exit code is 4.
#[test]
fn txn_list_says_what_it_could_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let missing = concord(&["txn", "list"], &dir.path().join("nonexistent"));
    assert_eq!(missing.status.code(), Some(1));
    let message = String::from_utf8_lossy(&missing.stderr);
    assert!(message.contains("no concord journal"), "{message}");

    let data = dir.path().join("data");
    let stuck = xid(44);
    empty_journal(&data);
    let empty = concord(&["txn", "list", "--json"], &data);
    assert!(empty.status.success());
    assert_eq!(String::from_utf8_lossy(&empty.stdout).trim(), "[]");
    append_commit(&data, stuck, "uploads");
    let text = concord(&["txn", "list"], &data);
    let text = String::from_utf8_lossy(&text.stdout);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("XID"), "{text}");
    assert!(
        lines.next().unwrap().starts_with(&stuck.to_string()),
        "{text}"
    );

    let config = unreachable_postgres_config(dir.path(), &data);
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["txn", "list", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(
        notes.contains("resource orders could not be read"),
        "{notes}"
    );
    // Each line says each thing once.
    for line in notes.lines() {
        assert!(
            line.matches("resource orders").count() <= 1,
            "the resource is named twice: {line}"
        );
        assert!(!line.contains("resources orders"), "{line}");
    }
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["xid"], stuck.to_string(), "{rows}");
}

/// Standard output closed by its reader (`| head`) ends a command quietly; standard output on a
/// full disk is one `error:` line; neither shows a panic or a backtrace.
#[test]
fn a_closed_or_full_stdout_is_no_panic() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    empty_journal(&data);
    let mut child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["txn", "list", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "1")
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert!(
        matches!(out.status.code(), Some(0 | 141)),
        "{:?} {stderr}",
        out.status
    );

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["txn", "list", "--data"])
        .arg(&data)
        .stdout(full)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: write standard output"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Logs carry no colour codes when standard error is not a terminal.
#[test]
fn logs_are_plain_when_redirected() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args([
            "demo",
            "--transactions",
            "5",
            "--concurrency",
            "1",
            "--log-level",
            "info",
            "--data",
        ])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stderr.is_empty(), "no logs at info");
    assert!(
        !out.stderr.contains(&0x1b),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Without `--operator`, the operator recorded is the user the command runs as, whatever
/// `$USER` says.
#[test]
fn the_operator_is_the_os_user_not_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stuck = xid(45);
    append_commit(&data, stuck, "tape");
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["txn", "resolve", &stuck.to_string(), "--commit", "--json"])
        .args(["--forget", "tape", "--reason", "retired", "--data"])
        .arg(&data)
        .env("USER", "mallory")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let operator = answer["operator"].as_str().unwrap();
    assert_ne!(operator, "mallory");
    assert!(!operator.is_empty());
}

/// Runs `concord txn list --config CONFIG` and returns its standard error, after checking that
/// it failed with exit 1 and no panic.
fn txn_list_config_error(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["txn", "list", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: configuration "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A configuration with a table header missing its `]` on line 3.
fn bad_syntax_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("concord.toml");
    std::fs::write(
        &config,
        "node = 1\ndata_dir = \"data\"\n[resources.uploads\nkind = \"files\"\n",
    )
    .unwrap();
    config
}

#[test]
fn a_configuration_syntax_error_names_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let config = bad_syntax_config(dir.path());
    let err = txn_list_config_error(&config);
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(err.contains("line 3, column 19"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "a refused file creates nothing"
    );
}

#[test]
fn a_configuration_syntax_error_keeps_the_parsers_snippet_lines() {
    let dir = tempfile::tempdir().unwrap();
    let err = txn_list_config_error(&bad_syntax_config(dir.path()));
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() >= 4, "{err}");
    assert!(lines[0].ends_with("concord.toml:"), "{err}");
    assert!(lines[1].ends_with("at line 3, column 19"), "{err}");
    assert!(lines.contains(&"3 | [resources.uploads"), "{err}");
    assert!(lines.iter().any(|l| l.trim_end().ends_with('^')), "{err}");
}

#[test]
fn every_other_error_stays_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("concord.toml");
    std::fs::write(
        &config,
        "node = 1\ndata_dir = \"data\"\n[resources.backup]\nkind = \"tape\"\n",
    )
    .unwrap();
    let err = txn_list_config_error(&config);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("tape"), "{err}");
}

fn now_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.unwrap().as_millis() as u64
}

#[test]
fn min_age_keeps_the_older_transactions_and_each_row_says_in_flight_or_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The embedded defaults' transaction timeout is 30 s: one decision 10 minutes old (in
    // doubt), one just made (in flight).
    let (old, young) = (xid(7), xid(8));
    append_commit_at(&data, old, "tape", now_ms() - 10 * 60 * 1000);
    append_commit_at(&data, young, "tape", now_ms());

    let rows = listed(&data);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let row = |x: Xid| rows.iter().find(|r| r["xid"] == x.to_string()).unwrap();
    assert_eq!(row(old)["standing"], "in_doubt");
    assert!(row(old)["age_ms"].as_u64().unwrap() >= 10 * 60 * 1000);
    assert_eq!(row(young)["standing"], "in_flight");
    assert!(row(young)["age_ms"].as_u64().unwrap() < 30_000);

    let out = concord(&["txn", "list", "--json", "--min-age", "5m"], &data);
    assert_eq!(
        out.status.code(),
        Some(4),
        "partial: no configuration has tape"
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let xids: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["xid"].as_str().unwrap())
        .collect();
    assert_eq!(xids, [old.to_string()]);

    let out = concord(&["txn", "list", "--min-age", "5m"], &data);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("XID") && lines[0].contains("STANDING"),
        "{text}"
    );
    assert!(lines[1].starts_with(&old.to_string()), "{text}");
    assert!(lines[1].contains("in doubt"), "{text}");

    let out = concord(&["txn", "list", "--json", "--min-age", "1h"], &data);
    assert_eq!(
        out.status.code(),
        Some(4),
        "partial: no configuration has tape"
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "[]");
    let out = concord(&["txn", "list", "--min-age", "1h"], &data);
    assert_eq!(
        out.status.code(),
        Some(4),
        "partial: no configuration has tape"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("older than --min-age (2 younger not shown)"),
        "the rows cut by the age are counted, not hidden: {text}"
    );

    let out = concord(&["txn", "list", "--min-age", "5"], &data);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a duration without a unit is a usage error"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("a number and a unit"), "{err}");
}

/// Resolving a transaction that the journal knows but that holds nothing open any more (it
/// ended) records nothing, and the command says so rather than "recorded by".
#[test]
fn a_resolve_with_nothing_to_do_does_not_claim_it_recorded_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ended = xid(7);
    append_commit(&data, ended, "tape");
    let end = CoordRecord::End { xid: ended };
    let journal = Journal::open(data.join("journal"), JournalConfig::default()).unwrap();
    journal
        .append(Epoch(1), end.kind(), &end.encode())
        .unwrap()
        .wait()
        .unwrap();
    journal.close().unwrap();
    let records_before = journal_records(&data);

    let out = concord(&["txn", "resolve", &ended.to_string(), "--commit"], &data);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("recorded by"), "{stdout}");
    assert!(stdout.contains("nothing recorded"), "{stdout}");
    assert_eq!(
        journal_records(&data),
        records_before,
        "nothing was appended"
    );

    let out = concord(
        &["txn", "resolve", &ended.to_string(), "--commit", "--json"],
        &data,
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["recorded"], false, "{answer}");
    assert_eq!(answer["finished"], true, "{answer}");
    assert_eq!(
        journal_records(&data),
        records_before,
        "nothing was appended"
    );
}

/// The number of records in the journal of `data`.
fn journal_records(data: &Path) -> usize {
    let journal = Journal::open(data.join("journal"), JournalConfig::default()).unwrap();
    let count = journal.read_from(journal.oldest_lsn()).unwrap().count();
    journal.close().unwrap();
    count
}

/// The command a refused start suggests for a resource lost for good is one the binary
/// accepts: run as written (its placeholders filled in), it ends the transaction.
#[test]
fn the_suggested_forget_command_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stuck = xid(9);
    append_commit(&data, stuck, "tape");
    let out = concord(&["demo", "--transactions", "1"], &data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let suggested = stderr
        .split('`')
        .find(|part| part.starts_with("concord txn resolve XID"))
        .unwrap_or_else(|| panic!("no suggested command in {stderr}"));
    let args: Vec<String> = suggested
        .split_whitespace()
        .skip(1)
        .map(|word| match word {
            "XID" => stuck.to_string(),
            "NAME" => "tape".into(),
            "WHY" => "the tape library was retired".into(),
            other => other.into(),
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = concord(&args, &data);
    assert!(
        out.status.success(),
        "`{suggested}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listed(&data).is_empty(), "the transaction ended");
}

/// A data directory whose `journal/` is empty holds no concord data: `resolve` refuses, and
/// creates no segment, lock or mark in it.
#[test]
fn resolve_on_an_empty_journal_directory_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("journal")).unwrap();
    for decision in ["--rollback", "--commit"] {
        let out = concord(&["txn", "resolve", "n1e1s5", decision], &data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("no concord journal"), "{stderr}");
        let created: Vec<_> = std::fs::read_dir(data.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(created.is_empty(), "{created:?}");
        let entries: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("journal")]);
    }
}

/// An xid that neither the journal nor any resource that answered knows is refused even while
/// another resource cannot be asked: nothing is recorded for a transaction that may never have
/// existed, and the message names the resource that could not be asked.
#[test]
fn an_unknown_xid_is_refused_while_a_resource_cannot_be_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = unreachable_postgres_config(dir.path(), &data);
    append_commit(&data, xid(1), "uploads");
    let records_before = journal_records(&data);
    let unknown = xid(777);
    let out = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["txn", "resolve", &unknown.to_string(), "--rollback"])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&unknown.to_string()), "{stderr}");
    assert!(stderr.contains("unknown"), "{stderr}");
    assert!(stderr.contains("orders"), "{stderr}");
    assert_eq!(journal_records(&data), records_before, "nothing recorded");
}

/// Help and version text on a full standard output is one `error:` line and exit 1, like every
/// other output, not a silent success.
#[test]
fn help_on_a_full_stdout_is_an_error() {
    for args in [&["--help"][..], &["--version"], &["txn", "list", "--help"]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_concord"))
            .args(args)
            .stdout(full)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: write standard output"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
}

/// `--commit` of an xid nobody knows is refused as unknown, as `--rollback` is — not with
/// advice to run `--rollback`, which would then refuse it as unknown.
#[test]
fn commit_of_an_unknown_xid_is_refused_as_unknown_not_sent_to_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    append_commit(&data, xid(1), "tape");
    let unknown = xid(777).to_string();
    for decision in ["--commit", "--rollback"] {
        let out = concord(&["txn", "resolve", &unknown, decision], &data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{decision}: {stderr}");
        assert!(stderr.contains("is unknown"), "{decision}: {stderr}");
        assert!(!stderr.contains("resolve it with"), "{decision}: {stderr}");
    }
}

/// Resolving again the same way (its branch was unreachable the first time) appends nothing
/// and says whose resolution holds, not that the second operator recorded it.
#[test]
fn resolving_again_the_same_way_names_the_first_operator_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stuck = xid(11);
    append_commit(&data, stuck, "tape");
    let xid_text = stuck.to_string();

    let first = concord(
        &[
            "txn",
            "resolve",
            &xid_text,
            "--commit",
            "--operator",
            "alice",
        ],
        &data,
    );
    assert_eq!(first.status.code(), Some(1), "tape is not reachable");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("commit recorded by alice"), "{stdout}");
    let records_after_first = journal_records(&data);

    let again = concord(
        &["txn", "resolve", &xid_text, "--commit", "--operator", "bob"],
        &data,
    );
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains("commit already recorded by alice") && !stdout.contains("bob"),
        "{stdout}"
    );
    let json = concord(
        &[
            "txn",
            "resolve",
            &xid_text,
            "--commit",
            "--operator",
            "bob",
            "--json",
        ],
        &data,
    );
    let answer: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(answer["recorded"], false, "{answer}");
    assert_eq!(answer["operator"], "alice", "{answer}");
    assert_eq!(
        journal_records(&data),
        records_after_first,
        "the same resolution is not recorded twice"
    );
}
