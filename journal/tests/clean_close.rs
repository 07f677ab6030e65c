//! The clean-close mark: damage at the end of a journal that was closed cleanly is corruption
//! (open and the read-only scan both refuse, naming segment and offset), while after a crash —
//! a child process killed with SIGKILL — a torn tail is still truncated, including after a
//! clean close, a reopen and an append.
//!
//! The child is this test binary itself, re-executed to run only [`clean_close_child`] with
//! `CONCORD_CLEAN_CHILD_DIR` set; without that variable the child test returns at once.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use journal::clean::CLEAN_FILE;
use journal::record::framed_len;
use journal::scan::scan_dir;
use journal::segment::SEGMENT_HEADER_BYTES;
use journal::{Epoch, Journal, JournalConfig, JournalError, Lsn, RecordKind};

const KIND: RecordKind = RecordKind::new(3, 1);
const PAYLOAD_BYTES: usize = 100;
const CHILD_DIR_ENV: &str = "CONCORD_CLEAN_CHILD_DIR";
const CHILD_RECORDS_ENV: &str = "CONCORD_CLEAN_CHILD_RECORDS";
const CHILD_TEST: &str = "clean_close_child";
/// How long the parent waits for the child to say it is ready.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// The child exits by itself after this long, should the parent never kill it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn config() -> JournalConfig {
    JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    let mut p = vec![(i % 251) as u8; PAYLOAD_BYTES];
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

/// Appends records `from..=to`, each waited for.
fn append_range(journal: &Journal, from: u64, to: u64) {
    for i in from..=to {
        let lsn = journal
            .append(Epoch(1), KIND, &payload(i))
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(lsn, Lsn(i));
    }
}

fn only_segment(dir: &Path) -> PathBuf {
    dir.join("00000000000000000001.seg")
}

/// Byte offset of record `lsn` in the only segment.
fn offset_of(lsn: u64) -> u64 {
    SEGMENT_HEADER_BYTES as u64 + (lsn - 1) * framed_len(PAYLOAD_BYTES) as u64
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x20;
    fs::write(path, bytes).unwrap();
}

fn cut_bytes(path: &Path, bytes: u64) {
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

/// Open and the read-only scan both refuse with `Corrupt` naming `segment` and `offset`, and
/// change nothing.
fn assert_refused(dir: &Path, segment: &Path, offset: u64, what: &str) {
    let before = snapshot(dir);
    for (who, result) in [
        (
            "scan",
            scan_dir(dir, config().record_bytes_max, |_| {}).map(|_| ()),
        ),
        ("open", Journal::open(dir, config()).map(|_| ())),
    ] {
        match result {
            Err(JournalError::Corrupt {
                segment: s,
                offset: o,
                reason,
            }) => {
                assert_eq!(s, segment, "{what}: {who} names the wrong file ({reason})");
                assert_eq!(o, offset, "{what}: {who} names the wrong offset ({reason})");
            }
            other => panic!("{what}: {who} after a clean close gave {other:?}, not Corrupt"),
        }
    }
    assert_eq!(
        snapshot(dir),
        before,
        "{what}: refusing changed the directory"
    );
}

#[test]
fn a_flipped_byte_in_the_last_record_after_a_clean_close_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    append_range(&journal, 1, 5);
    journal.close().unwrap();
    assert!(dir.path().join(CLEAN_FILE).is_file(), "close leaves a mark");
    let seg = only_segment(dir.path());
    flip_byte(&seg, offset_of(5) + 40);
    assert_refused(
        dir.path(),
        &seg,
        offset_of(5),
        "flipped byte in the last record",
    );
}

#[test]
fn a_cut_or_extended_tail_after_a_clean_close_is_corruption() {
    for damage in ["cut", "extend", "drop record"] {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), config()).unwrap();
        append_range(&journal, 1, 4);
        journal.close().unwrap();
        let seg = only_segment(dir.path());
        let offset = match damage {
            "cut" => {
                cut_bytes(&seg, 10);
                offset_of(4)
            }
            "extend" => {
                let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
                f.write_all(&[0u8; 30]).unwrap();
                offset_of(5)
            }
            _ => {
                // A whole record gone: the segment ends cleanly, but before the marked lsn.
                cut_bytes(&seg, framed_len(PAYLOAD_BYTES) as u64);
                offset_of(4)
            }
        };
        assert_refused(dir.path(), &seg, offset, damage);
    }
}

#[test]
fn reopening_without_an_append_keeps_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    append_range(&journal, 1, 3);
    journal.close().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    assert_eq!(journal.durable_lsn(), Lsn(3));
    journal.close().unwrap();
    let seg = only_segment(dir.path());
    flip_byte(&seg, offset_of(3) + 20);
    assert_refused(dir.path(), &seg, offset_of(3), "after an idle reopen");
}

#[test]
fn a_damaged_mark_is_corruption_naming_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    append_range(&journal, 1, 2);
    journal.close().unwrap();
    let mark = dir.path().join(CLEAN_FILE);
    flip_byte(&mark, 14);
    assert_refused(dir.path(), &mark, 0, "damaged mark");
    // Deleting it (the operator's way out) opens the journal as after a crash.
    fs::remove_file(&mark).unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    assert_eq!(journal.durable_lsn(), Lsn(2));
}

#[test]
fn a_clean_close_then_reopen_and_append_goes_on_and_marks_again() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    append_range(&journal, 1, 3);
    journal.close().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    append_range(&journal, 4, 6);
    assert!(
        !dir.path().join(CLEAN_FILE).exists(),
        "the first append after open clears the mark"
    );
    journal.close().unwrap();
    let report = scan_dir(dir.path(), config().record_bytes_max, |_| {}).unwrap();
    let mark = report.clean_close.expect("a new mark at close");
    assert_eq!(mark.last_lsn, Lsn(6));
    assert_eq!(mark.last_chain, report.last_chain);
}

// ---------------------------------------------------------------------------------------------
// Crashes: a child process killed with SIGKILL.
// ---------------------------------------------------------------------------------------------

/// Not a test of its own: the body of the child process. Appends the records named by the
/// environment, says `ready`, and waits to be killed. Returns at once in a normal run.
#[test]
fn clean_close_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let range: Vec<u64> = std::env::var(CHILD_RECORDS_ENV)
        .unwrap()
        .split('-')
        .map(|n| n.parse().unwrap())
        .collect();
    let journal = Journal::open(PathBuf::from(dir), config()).unwrap();
    append_range(&journal, range[0], range[1]);
    println!("\nchild-ready");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(CHILD_LIFETIME);
    // Never reached in a passing run: the parent kills the child first.
    std::mem::forget(journal);
}

/// Kills and reaps the child when dropped, so a failing parent leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a child that appends `from..=to` to the journal in `dir`, and kills it with SIGKILL once
/// it has said every record is durable.
fn append_in_child_and_kill(dir: &Path, from: u64, to: u64) {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_RECORDS_ENV, format!("{from}-{to}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim_end().ends_with("child-ready") {
                let _ = tx.send(());
            }
        }
    });
    let started = Instant::now();
    rx.recv_timeout(READY_DEADLINE).unwrap_or_else(|e| {
        panic!(
            "the child never became ready ({e:?}, {:?})",
            started.elapsed()
        )
    });
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the child must die by SIGKILL");
    reader.join().unwrap();
}

/// Opens after a crash whose last record was then torn, and checks the torn record was truncated.
fn assert_torn_tail_truncated(dir: &Path, last: u64) {
    assert!(
        !dir.join(CLEAN_FILE).exists(),
        "a crashed journal has no clean-close mark"
    );
    let seg = only_segment(dir);
    cut_bytes(&seg, 7);
    let journal = Journal::open(dir, config()).unwrap();
    assert_eq!(
        journal.durable_lsn(),
        Lsn(last - 1),
        "the torn record is gone"
    );
    assert_eq!(fs::metadata(&seg).unwrap().len(), offset_of(last));
    let lsn = journal
        .append(Epoch(1), KIND, &payload(last))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(lsn, Lsn(last), "appending goes on at the truncated lsn");
    journal.close().unwrap();
}

#[test]
fn after_a_crash_a_torn_tail_is_still_truncated() {
    let dir = tempfile::tempdir().unwrap();
    append_in_child_and_kill(dir.path(), 1, 5);
    assert_torn_tail_truncated(dir.path(), 5);
}

#[test]
fn clean_close_then_reopen_append_and_crash_truncates_a_torn_tail_again() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    append_range(&journal, 1, 3);
    journal.close().unwrap();
    assert!(dir.path().join(CLEAN_FILE).is_file());
    append_in_child_and_kill(dir.path(), 4, 6);
    assert_torn_tail_truncated(dir.path(), 6);
}
