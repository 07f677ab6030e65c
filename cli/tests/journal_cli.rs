//! `concord journal inspect|verify` through the real binary, on journals written by the journal
//! crate and then damaged on purpose: a torn tail (the last segment cut mid-record), corruption
//! (a byte flipped in durable history), and directories the tools must refuse with one clear line.
//! Every test also checks that the tools left the directory byte-for-byte unchanged.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use journal::record::OVERHEAD_BYTES;
use journal::scan::scan_dir;
use journal::segment::SEGMENT_HEADER_BYTES;
use journal::{Epoch, Journal, JournalConfig, Record, RecordKind};
use serde_json::Value;

const KIND: RecordKind = RecordKind::new(3, 2);
const EPOCH: Epoch = Epoch(5);
/// Payload of every record in the fixed-size journals, so record offsets are easy to compute.
const PAYLOAD_BYTES: usize = 100;
const FRAMED_BYTES: u64 = (OVERHEAD_BYTES + PAYLOAD_BYTES) as u64;
/// 24 records of 162 bytes fit in a 4096-byte segment after its header.
const RECORDS_PER_SEGMENT: u64 = 24;

fn small_segments() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        queue_bytes_max: 8192,
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

/// Writes `payloads` as records, each durable (one write batch each), and closes the journal.
fn write_journal(dir: &Path, payloads: &[Vec<u8>]) {
    let journal = Journal::open(dir, small_segments()).unwrap();
    for payload in payloads {
        journal
            .append(EPOCH, KIND, payload)
            .unwrap()
            .wait()
            .unwrap();
    }
    journal.close().unwrap();
}

/// `count` records of exactly [`PAYLOAD_BYTES`] bytes each.
fn fixed_payloads(count: u64) -> Vec<Vec<u8>> {
    (1..=count)
        .map(|i| format!("{i:0>width$}", width = PAYLOAD_BYTES).into_bytes())
        .collect()
}

/// A journal of `count` fixed-size records in a new temp directory.
fn fixed_journal(count: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_journal(dir.path(), &fixed_payloads(count));
    dir
}

/// The records as the journal crate reads them.
fn records_of(dir: &Path) -> Vec<Record> {
    let mut records = Vec::new();
    scan_dir(dir, JournalConfig::default().record_bytes_max, |r| {
        records.push(r.clone())
    })
    .unwrap();
    records
}

fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{first_lsn:020}.seg"))
}

/// Byte offset of record `lsn` in its segment of a fixed-size journal.
fn offset_of(lsn: u64) -> u64 {
    SEGMENT_HEADER_BYTES as u64 + ((lsn - 1) % RECORDS_PER_SEGMENT) * FRAMED_BYTES
}

/// Every file in the directory with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn concord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn path_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts a failure with exactly one `error:` line on stderr that contains every `needle`.
fn assert_one_line_error(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    for needle in needles {
        assert!(
            err.contains(needle),
            "{needle:?} missing from stderr: {err}"
        );
    }
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn inspect_prints_every_record_in_human_form() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (1..=30)
        .map(|i| format!("record {i}\n").into_bytes())
        .collect();
    write_journal(dir.path(), &payloads);
    let records = records_of(dir.path());

    let out = concord(&["journal", "inspect", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("LSN") && lines[0].contains("RECORD"));
    // Kind 3 version 2 is no record this concord can decode: each is shown as such, with the
    // decoder's error and without its payload.
    let undecodable = "undecodable: record kind 3 has payload version 2";
    for (i, rec) in records.iter().enumerate() {
        let fields: Vec<&str> = lines[i + 1].split_whitespace().collect();
        let lsn = rec.lsn.0.to_string();
        let bytes = rec.payload.len().to_string();
        let chain = &rec.chain.to_hex()[..12];
        assert_eq!(fields[..5], [lsn.as_str(), "5", "3/v2", &bytes, chain]);
        let rest = fields[5..].join(" ");
        assert!(rest.starts_with(undecodable), "line {}", lines[i + 1]);
    }
    assert!(
        !text.contains("record 1"),
        "no payload without --payload: {text}"
    );
    assert!(text.contains("records:     30 (lsn 1..30)"), "{text}");

    let out = concord(&["journal", "inspect", "--payload", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    for i in 0..records.len() {
        let payload = lines[2 + 2 * i].trim();
        assert_eq!(payload, format!("payload: \"record {}\\n\"", i + 1));
    }
    assert!(text.contains(&format!("last chain:  {}", records[29].chain)));
    assert!(!text.contains("torn tail"), "{text}");
}

#[test]
fn inspect_json_has_every_field_of_every_record() {
    let dir = fixed_journal(60);
    let records = records_of(dir.path());
    assert_eq!(records.len(), 60);

    for payload in [false, true] {
        let mut args = vec!["journal", "inspect", "--json", path_arg(dir.path())];
        if payload {
            args.push("--payload");
        }
        let out = concord(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let lines = json_lines(&out);
        assert_eq!(lines.len(), records.len());
        for (line, rec) in lines.iter().zip(&records) {
            assert_eq!(line["type"], "record");
            assert_eq!(line["lsn"], rec.lsn.0);
            assert_eq!(line["epoch"], rec.epoch.0);
            assert_eq!(line["kind"], rec.kind.code);
            assert_eq!(line["version"], rec.kind.version);
            assert_eq!(line["payload_bytes"], rec.payload.len());
            assert_eq!(line["chain"], rec.chain.to_hex());
            assert!(line["record"].is_null());
            assert!(line["decode_error"].as_str().unwrap().contains("version 2"));
            match payload {
                true => assert_eq!(line["payload_hex"], hex::encode(&rec.payload)),
                false => assert!(line.get("payload_hex").is_none(), "{line}"),
            }
        }
    }
}

#[test]
fn inspect_from_starts_at_the_given_lsn() {
    let dir = fixed_journal(40);
    let out = concord(&["journal", "inspect", "--json", "--from", "30"]);
    assert_eq!(out.status.code(), Some(2), "a missing DIR is a usage error");
    let out = concord(&[
        "journal",
        "inspect",
        "--json",
        "--from",
        "30",
        path_arg(dir.path()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lsns: Vec<u64> = json_lines(&out)
        .iter()
        .map(|l| l["lsn"].as_u64().unwrap())
        .collect();
    assert_eq!(lsns, (30..=40).collect::<Vec<_>>());
}

#[test]
fn verify_says_ok_on_a_sound_journal() {
    let dir = fixed_journal(60);
    let records = records_of(dir.path());
    let before = snapshot(dir.path());

    let out = concord(&["journal", "verify", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("status:      ok"), "{text}");
    assert!(text.contains("segments:    3 ("), "{text}");
    assert!(text.contains("records:     60 (lsn 1..60)"), "{text}");
    assert!(text.contains(&records[59].chain.to_hex()), "{text}");
    assert_eq!(stderr(&out), "");

    let out = concord(&["journal", "verify", "--json", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = &json_lines(&out)[0];
    assert_eq!(v["status"], "ok");
    assert_eq!(v["segments"], 3);
    assert_eq!(v["records"], 60);
    assert_eq!(v["first_lsn"], 1);
    assert_eq!(v["last_lsn"], 60);
    assert_eq!(v["last_chain"], records[59].chain.to_hex());
    assert!(v["torn_tail"].is_null() && v["error"].is_null());
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn verify_reports_a_torn_tail_and_changes_nothing() {
    let dir = fixed_journal(60);
    // A crash leaves no clean-close mark (after a clean close a torn tail is corruption).
    fs::remove_file(dir.path().join(journal::clean::CLEAN_FILE)).unwrap();
    let last = segment_path(dir.path(), 2 * RECORDS_PER_SEGMENT + 1);
    let len = fs::metadata(&last).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let before = snapshot(dir.path());
    let offset = offset_of(60);
    let bytes = FRAMED_BYTES - 10;
    let name = "00000000000000000049.seg";

    let out = concord(&["journal", "verify", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("status:      torn tail"), "{text}");
    assert!(text.contains("records:     59 (lsn 1..59)"), "{text}");
    let tail = text.lines().find(|l| l.starts_with("torn tail:")).unwrap();
    assert!(tail.contains(name), "{tail}");
    assert!(
        tail.contains(&format!("byte offset {offset}, {bytes} bytes")),
        "{tail}"
    );

    let out = concord(&["journal", "verify", "--json", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = &json_lines(&out)[0];
    assert_eq!(v["status"], "torn_tail");
    assert_eq!(v["last_lsn"], 59);
    assert!(v["torn_tail"]["segment"].as_str().unwrap().ends_with(name));
    assert_eq!(v["torn_tail"]["offset"], offset);
    assert_eq!(v["torn_tail"]["bytes"], bytes);

    let out = concord(&["journal", "inspect", "--json", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 60);
    assert_eq!(lines[58]["lsn"], 59);
    assert_eq!(lines[59]["type"], "torn_tail");
    assert_eq!(lines[59]["offset"], offset);

    let out = concord(&["journal", "inspect", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("torn tail:   {}", last.display())));

    assert_eq!(
        snapshot(dir.path()),
        before,
        "inspect and verify are read-only"
    );
    drop(Journal::open(dir.path(), small_segments()).unwrap());
    assert_eq!(
        fs::metadata(&last).unwrap().len(),
        offset,
        "open truncates where verify said"
    );
}

#[test]
fn verify_refuses_a_flipped_byte_naming_segment_and_offset() {
    // In a segment that later segments follow, and in the middle of the only segment.
    for (count, lsn) in [(60, 10), (20, 10)] {
        let dir = fixed_journal(count);
        let seg = segment_path(dir.path(), 1);
        let offset = offset_of(lsn);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[offset as usize + 40] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        let before = snapshot(dir.path());
        let at = format!("at byte offset {offset}");
        let name = "00000000000000000001.seg";

        let out = concord(&["journal", "verify", path_arg(dir.path())]);
        assert_one_line_error(&out, 3, &["journal corrupt in segment", name, &at]);
        let text = stdout(&out);
        assert!(text.contains("status:      corrupt"), "{text}");
        assert!(
            text.contains("records:     9 valid before the damage (lsn 1..9)"),
            "{text}"
        );

        let out = concord(&["journal", "verify", "--json", path_arg(dir.path())]);
        assert_one_line_error(&out, 3, &[name, &at]);
        let v = &json_lines(&out)[0];
        assert_eq!(v["status"], "corrupt");
        assert_eq!(v["records"], 9);
        assert_eq!(v["last_lsn"], 9);
        assert_eq!(v["corrupt_at"]["offset"], offset);
        assert!(v["corrupt_at"]["segment"].as_str().unwrap().ends_with(name));
        assert!(v["error"].as_str().unwrap().contains(&at));

        let out = concord(&["journal", "inspect", "--json", path_arg(dir.path())]);
        assert_one_line_error(&out, 3, &[name, &at]);
        assert_eq!(json_lines(&out).len(), 9, "the records before the damage");

        assert_eq!(
            snapshot(dir.path()),
            before,
            "inspect and verify are read-only"
        );
    }
}

#[test]
fn a_missing_directory_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    for cmd in ["inspect", "verify"] {
        for json in [false, true] {
            let mut args = vec!["journal", cmd, path_arg(&missing)];
            if json {
                args.push("--json");
            }
            let out = concord(&args);
            assert_one_line_error(&out, 1, &[path_arg(&missing), "does not exist"]);
            assert_eq!(stdout(&out), "");
        }
    }
    assert!(!missing.exists(), "the tools never create the directory");
}

#[test]
fn a_file_instead_of_a_directory_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("journal");
    fs::write(&file, b"not a journal").unwrap();
    let out = concord(&["journal", "verify", path_arg(&file)]);
    assert_one_line_error(&out, 1, &["not a directory"]);
}

#[test]
fn a_foreign_file_is_one_clear_line() {
    let dir = fixed_journal(5);
    fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    let before = snapshot(dir.path());
    for cmd in ["inspect", "verify"] {
        let out = concord(&["journal", cmd, path_arg(dir.path())]);
        assert_one_line_error(&out, 1, &["foreign file", "notes.txt"]);
    }
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn a_newer_format_is_one_clear_line() {
    let dir = fixed_journal(5);
    let seg = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&seg).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    // The header's prefix (magic, version) carries its own crc32 at bytes 12..16.
    let prefix_crc = crc32fast::hash(&bytes[0..12]);
    bytes[12..16].copy_from_slice(&prefix_crc.to_le_bytes());
    fs::write(&seg, &bytes).unwrap();
    let out = concord(&["journal", "verify", path_arg(dir.path())]);
    assert_one_line_error(&out, 1, &["format version 2", "run a newer concord"]);
}

#[test]
fn an_empty_directory_is_an_empty_sound_journal() {
    let dir = tempfile::tempdir().unwrap();
    let out = concord(&["journal", "verify", "--json", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = &json_lines(&out)[0];
    assert_eq!(v["status"], "ok");
    assert_eq!(v["records"], 0);
    assert!(v["first_lsn"].is_null() && v["last_lsn"].is_null());
    assert_eq!(snapshot(dir.path()).len(), 0);
}

#[test]
fn help_says_what_concord_is_and_lists_every_command() {
    let out = concord(&["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("two-phase-commit coordinator"), "{text}");
    assert!(text.contains("journal") && text.contains("bench"), "{text}");
    for args in [
        &["journal", "--help"][..],
        &["journal", "inspect", "--help"],
        &["journal", "verify", "--help"],
        &["bench", "--help"],
        &["bench", "journal", "--help"],
    ] {
        let out = concord(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_data_directory_is_named_as_such_with_its_journal() {
    let data = tempfile::tempdir().unwrap();
    let journal_dir = data.path().join("journal");
    write_journal(&journal_dir, &fixed_payloads(3));
    fs::create_dir(data.path().join("uploads")).unwrap();
    let before = snapshot(&journal_dir);
    for cmd in ["inspect", "verify"] {
        for json in [false, true] {
            let mut args = vec!["journal", cmd, path_arg(data.path())];
            if json {
                args.push("--json");
            }
            let out = concord(&args);
            assert_one_line_error(&out, 1, &["data directory", path_arg(&journal_dir)]);
            let err = stderr(&out);
            assert!(
                !err.contains("move"),
                "never advise moving a journal: {err}"
            );
            assert!(!err.contains("corrupt"), "{err}");
            assert_eq!(stdout(&out), "");
        }
    }
    assert_eq!(snapshot(&journal_dir), before);
}

/// Runs a short demo in `data` (every file, mail and kv value of it carries the marker
/// `concord demo run`).
fn demo_data(data: &Path) {
    let out = concord(&[
        "demo",
        "--transactions",
        "4",
        "--concurrency",
        "1",
        "--fail-every",
        "0",
        "--json",
        "--data",
        path_arg(data),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn inspect_decodes_coordinator_records_and_shows_content_only_with_payload() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    demo_data(&data);
    let journal_dir = data.join("journal");
    let marker = "concord demo run";
    let marker_hex = hex::encode(marker);
    let decided: Vec<coordinator::record::CoordRecord> = records_of(&journal_dir)
        .iter()
        .map(|r| coordinator::record::CoordRecord::decode(r.kind, &r.payload).unwrap())
        .collect();
    let commits = decided
        .iter()
        .filter(|r| matches!(r, coordinator::record::CoordRecord::Commit { .. }))
        .count();
    assert_eq!(commits, 4, "{decided:?}");

    let out = concord(&["journal", "inspect", path_arg(&journal_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        !text.contains(marker),
        "content printed without --payload: {text}"
    );
    let commit_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" commit xid="))
        .collect();
    assert_eq!(commit_lines.len(), 4, "{text}");
    for line in &commit_lines {
        assert!(line.contains("decision=commit"), "{line}");
        for resource in ["uploads", "thumbnails", "mail", "index"] {
            assert!(line.contains(&format!("{resource}:")), "{line}");
        }
    }
    assert!(text.contains(" end xid="), "{text}");

    let out = concord(&["journal", "inspect", "--json", path_arg(&journal_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains(&marker_hex),
        "content printed without --payload"
    );
    let lines = json_lines(&out);
    let commit = lines
        .iter()
        .find(|l| l["record"]["name"] == "commit")
        .unwrap();
    assert!(commit["decode_error"].is_null());
    assert_eq!(commit["record"]["decision"], "commit");
    assert!(
        commit["record"]["xid"]
            .as_str()
            .unwrap()
            .starts_with("n1e1s")
    );
    let branches = commit["record"]["branches"].as_array().unwrap();
    let names: Vec<&str> = branches
        .iter()
        .map(|b| b["resource"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["uploads", "thumbnails", "mail", "index"]);
    assert!(
        branches
            .iter()
            .all(|b| b["redo_bytes"].as_u64().unwrap() > 0)
    );
    assert!(branches.iter().all(|b| b.get("redo_hex").is_none()));

    let out = concord(&["journal", "inspect", "--payload", path_arg(&journal_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(marker), "--payload shows the content");
    let out = concord(&[
        "journal",
        "inspect",
        "--json",
        "--payload",
        path_arg(&journal_dir),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    let commit = lines
        .iter()
        .find(|l| l["record"]["name"] == "commit")
        .unwrap();
    let uploads = &commit["record"]["branches"][0]["redo_hex"];
    assert!(uploads.as_str().unwrap().contains(&marker_hex), "{commit}");
    assert!(
        commit["payload_hex"]
            .as_str()
            .unwrap()
            .contains(&marker_hex)
    );
}

#[test]
fn a_coordinator_record_that_does_not_decode_is_shown_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), small_segments()).unwrap();
    let commit = coordinator::record::COMMIT;
    for payload in [&b""[..], b"\xff\xff\xff\xff garbage"] {
        journal
            .append(EPOCH, commit, payload)
            .unwrap()
            .wait()
            .unwrap();
    }
    journal.close().unwrap();

    let out = concord(&["journal", "inspect", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let undecodable = text
        .lines()
        .filter(|l| l.contains("undecodable: malformed"))
        .count();
    assert_eq!(undecodable, 2, "{text}");

    let out = concord(&["journal", "inspect", "--json", path_arg(dir.path())]);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in json_lines(&out) {
        assert!(line["record"].is_null());
        assert!(
            line["decode_error"].as_str().unwrap().contains("malformed"),
            "{line}"
        );
    }
}

/// Standard output closed by its reader (`| head`) ends `inspect` quietly with the documented
/// exit code 141, not with 0 as though the whole listing had been read.
#[test]
fn inspect_into_a_closed_pipe_exits_141_quietly() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let config = JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    };
    let journal = Journal::open(dir.path(), config).unwrap();
    // Far more listing than a pipe buffers, so the writer meets the closed pipe.
    let mut last = None;
    for payload in fixed_payloads(3000) {
        last = Some(journal.append(EPOCH, KIND, &payload).unwrap());
    }
    last.unwrap().wait().unwrap();
    journal.close().unwrap();
    for json in [false, true] {
        let mut args = vec!["journal", "inspect", path_arg(dir.path())];
        if json {
            args.push("--json");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_concord"))
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 16];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// A directory that holds no segment file but other things (a resource's directory, a
/// configuration directory) is said not to be a journal directory; the tools never advise
/// moving its files away.
#[test]
fn a_directory_without_segments_is_not_a_journal_and_nothing_is_to_be_moved() {
    let root = tempfile::tempdir().unwrap();
    // What a files resource's root holds: its private `.concord/` and the application's files.
    fs::create_dir_all(root.path().join(".concord/log")).unwrap();
    fs::write(root.path().join("invoice.pdf"), b"%PDF").unwrap();
    let names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = (names(root.path()), names(&root.path().join(".concord")));
    for cmd in ["inspect", "verify"] {
        for json in [false, true] {
            let mut args = vec!["journal", cmd, path_arg(root.path())];
            if json {
                args.push("--json");
            }
            let out = concord(&args);
            assert_one_line_error(&out, 1, &["not a journal directory", "journal/"]);
            let err = stderr(&out);
            assert!(!err.contains("move"), "never advise moving it: {err}");
            assert_eq!(stdout(&out), "");
        }
    }
    let after = (names(root.path()), names(&root.path().join(".concord")));
    assert_eq!(after, before, "nothing was created or removed");
}
