//! Crash tests through the real binary: `concord demo` — whose every transaction spans two files
//! resources, a Maildir mail queue and a sled kv store — runs with one fail point armed on the
//! commit path, is killed there with SIGKILL while other transactions are in flight, and is run
//! again on the same data directory, which recovers and runs its own check. Then this file's own
//! checker — which reads the files, the Maildir's `new/` and `cur/` and the sled trees directly
//! and knows nothing of concord's code — proves that every transaction is all-or-nothing across
//! all of them, no mail was delivered twice, every acknowledged commit is present, and nothing is
//! left staged or prepared.
//!
//! Every fail point of `coordinator::failpoint::POINTS` is covered except
//! `one_phase_committed`, which only a transaction with a single writing branch (a lone
//! PostgreSQL branch) reaches; `cli/tests/demo_postgres.rs` and the participant tests cover
//! PostgreSQL. Every child process runs under a deadline and is killed when it passes it.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
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
/// Reached only by a one-phase commit, which a transaction of several branches never takes.
const ONE_PHASE_ONLY: &str = "one_phase_committed";
const FILES: [(&str, &str); 3] = [("uploads", "a"), ("uploads", "b"), ("thumbnails", "t")];
const MAILDIR: &str = "mail";
const SLED_DIR: &str = "index";
const FAIL_EVERY: u64 = 7;
/// How long the killed demo may take to reach its fail point.
const FAILPOINT_DEADLINE: Duration = Duration::from_secs(60);
/// How long the recovery run may take.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(90);

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
    let hit_in_time = fired.recv_timeout(FAILPOINT_DEADLINE);
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(
        hit_in_time.is_ok(),
        "fail point {point} was not hit within {FAILPOINT_DEADLINE:?} (demo exited with {status})"
    );
}

/// What this checker reads from the mail queue and the kv store.
struct Stores {
    /// Deliveries per (run, transaction), from the Message-ID of every file in `new/` and `cur/`.
    mails: HashMap<(String, u64), u32>,
    /// The sled data tree.
    keys: HashMap<Vec<u8>, Vec<u8>>,
}

/// Reads every delivered message; each must be a demo message with its exact subject and body.
fn read_mails(maildir: &Path) -> HashMap<(String, u64), u32> {
    let mut mails = HashMap::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
            let (header, body) = text
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("{} has no header/body separator", path.display()));
            let field = |name: &str| {
                let prefix = format!("{name}: ");
                let values: Vec<&str> = header
                    .split("\r\n")
                    .filter_map(|line| line.strip_prefix(&prefix))
                    .collect();
                assert_eq!(values.len(), 1, "{}: {name} {values:?}", path.display());
                values[0].to_string()
            };
            let id = field("Message-ID");
            let (run_id, i) = id
                .strip_prefix('<')
                .and_then(|rest| rest.split_once('@'))
                .and_then(|(left, _)| left.split_once('.'))
                .unwrap_or_else(|| panic!("{}: foreign Message-ID {id}", path.display()));
            let i: u64 = i.parse().unwrap();
            assert_eq!(
                field("Subject"),
                format!("concord demo run {run_id} transaction {i}"),
                "{}",
                path.display()
            );
            assert_eq!(
                body,
                format!("concord demo run {run_id} transaction {i} mail\r\n"),
                "{}",
                path.display()
            );
            *mails.entry((run_id.to_string(), i)).or_insert(0) += 1;
        }
    }
    mails
}

/// Reads the sled directory with sled itself (the demo has exited, so its lock is free) and
/// asserts that its prepared tree is empty.
fn read_keys(dir: &Path) -> HashMap<Vec<u8>, Vec<u8>> {
    let db = sled::Config::new().path(dir).open().unwrap();
    let names = db.tree_names();
    let tree = |name: &str| {
        names
            .iter()
            .any(|t| t.as_ref() == name.as_bytes())
            .then(|| db.open_tree(name).unwrap())
    };
    if let Some(prepared) = tree("concord.prepared") {
        let left: Vec<String> = prepared
            .iter()
            .keys()
            .map(|k| String::from_utf8_lossy(&k.unwrap()).to_string())
            .collect();
        assert!(left.is_empty(), "sled branches left prepared: {left:?}");
    }
    let mut keys = HashMap::new();
    if let Some(data) = tree("data") {
        for item in data.iter() {
            let (k, v) = item.unwrap();
            keys.insert(k.to_vec(), v.to_vec());
        }
    }
    keys
}

/// The parts of transaction `i` of `run_id` that are present: the three files, the mail, the key.
fn parts_present(data: &Path, stores: &Stores, run_id: &str, i: u64) -> Vec<bool> {
    let mut present: Vec<bool> = FILES
        .iter()
        .map(|(resource, name)| {
            let path = data.join(resource).join(format!("tx/{run_id}/{i}/{name}"));
            let expected = format!("concord demo run {run_id} transaction {i} file {name}\n");
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
    let delivered = stores
        .mails
        .get(&(run_id.to_string(), i))
        .copied()
        .unwrap_or(0);
    assert!(
        delivered <= 1,
        "run {run_id} transaction {i}: its mail was delivered {delivered} times"
    );
    present.push(delivered == 1);
    let key = format!("tx/{run_id}/{i}");
    let value = stores.keys.get(key.as_bytes());
    if let Some(value) = value {
        let expected = format!("concord demo run {run_id} transaction {i} key\n");
        assert_eq!(value, expected.as_bytes(), "key {key} has a foreign value");
    }
    present.push(value.is_some());
    present
}

/// The independent checker; returns the number of transactions checked.
fn check(data: &Path) -> u64 {
    let stores = Stores {
        mails: read_mails(&data.join(MAILDIR)),
        keys: read_keys(&data.join(SLED_DIR)),
    };
    let mut checked = 0;
    for run in std::fs::read_dir(data.join("runs")).unwrap() {
        let run = run.unwrap();
        let run_id = run.file_name().to_string_lossy().to_string();
        let text = std::fs::read_to_string(run.path()).unwrap();
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(&fields[2..], ["mail", "kv"], "run record {text:?}");
        let (total, fail_every): (u64, u64) =
            (fields[0].parse().unwrap(), fields[1].parse().unwrap());
        for i in 0..total {
            let present = parts_present(data, &stores, &run_id, i);
            let all = present.iter().all(|p| *p);
            let none = present.iter().all(|p| !*p);
            assert!(
                all || none,
                "run {run_id} transaction {i} is partly present (files a, b, t, mail, key): {present:?}"
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
    let delivered: u32 = stores.mails.values().sum();
    assert_eq!(
        delivered as usize,
        stores.mails.len(),
        "some mail was delivered twice"
    );
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
    let tmp = data.join(MAILDIR).join("tmp");
    let staged: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(
        staged.is_empty(),
        "{} is not empty: {staged:?}",
        tmp.display()
    );
    let prepared = adapters::mail::prepared_on_disk(&data.join(MAILDIR)).unwrap();
    assert!(
        prepared.is_empty(),
        "mail: branches left prepared after recovery: {prepared:?}"
    );
    checked
}

/// The highest acknowledged transaction number of the killed run, plus one (0: it had none
/// acknowledged when it was killed).
fn acknowledged_below(data: &Path) -> u64 {
    let acks = data.join("acks");
    let runs: Vec<_> = std::fs::read_dir(&acks).unwrap().flatten().collect();
    assert_eq!(runs.len(), 1, "one killed run in {}", acks.display());
    std::fs::read_dir(runs[0].path())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

fn crash_at(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run_and_kill(&data, point, 40);
    let acked_below = acknowledged_below(&data);
    let child = concord()
        .args(["demo", "--transactions", "50", "--concurrency", "4"])
        .args(["--json", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, RECOVERY_DEADLINE, "the recovery run");
    assert!(
        out.status.success(),
        "recovery run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["atomicity_verified"], true, "{summary}");
    assert_eq!(
        summary["resources"],
        serde_json::json!(["uploads", "thumbnails", "mail", "index"]),
        "{summary}"
    );
    // The killed run ran at least every transaction up to its highest acknowledged one (it
    // may have had none acknowledged when the fail point froze it: then its work is what
    // recovery found below).
    assert!(
        summary["earlier_transactions_checked"].as_u64().unwrap() >= acked_below,
        "acknowledged below {acked_below}: {summary}"
    );
    // The transaction frozen at the fail point left work for recovery: an undecided prepared
    // branch to roll back, or a durable decision without End to drive again.
    let rolled_back = summary["recovered_rolled_back"].as_u64().unwrap();
    let redriven = summary["recovered_redriven"].as_u64().unwrap();
    let recovered = match point {
        "after_prepare" => rolled_back,
        "decision_appended" => rolled_back + redriven,
        _ => redriven,
    };
    assert!(
        recovered > 0,
        "recovery found nothing to do after a crash at {point}: {summary}"
    );
    let checked = check(&data);
    assert!(checked >= 3050, "checked {checked} transactions");
}

/// The crash tests need fail points in the `concord` binary they run: `cargo test` builds it with
/// the coordinator's feature `failpoints`, turned on by this crate's dev-dependency (a release
/// build has none and ignores `CONCORD_FAILPOINT`; see `coordinator::failpoint`).
#[test]
fn the_binary_under_test_has_fail_points() {
    assert!(
        coordinator::failpoint::enabled(),
        "concord-coordinator was built without its feature `failpoints`: the dev-dependency of concord-cli must enable it"
    );
}

#[test]
fn every_fail_point_of_a_transaction_of_several_branches_is_covered() {
    for point in coordinator::failpoint::POINTS {
        assert!(
            POINTS.contains(&point) || point == ONE_PHASE_ONLY,
            "fail point {point} has no crash test here"
        );
    }
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
