//! Bad input and failing disks: every case gives its typed error with an actionable message, in
//! the right `ErrorClass`, and leaves the durable records untouched (checked by reading them back
//! or by comparing the segment files byte for byte).
//!
//! The read-only and full-disk cases mount small file systems (`mount -t tmpfs`, `mount --bind`):
//! they need root, and fail — never skip — without it.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use journal::record::framed_len;
use journal::scan::scan_dir;
use journal::segment::SEGMENT_HEADER_BYTES;
use journal::{Epoch, ErrorClass, Journal, JournalConfig, JournalError, Lsn, Record, RecordKind};

const KIND: RecordKind = RecordKind::new(3, 1);
const HEADER: usize = SEGMENT_HEADER_BYTES;

fn config() -> JournalConfig {
    JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

fn small() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        queue_bytes_max: 8192,
        ..config()
    }
}

/// Serializes opening a journal with spawning a process (the mount tests run `mount`).
///
/// The journal's `LOCK` is an `flock` on an open file description, and a child process holds a
/// copy of every descriptor from `fork` until its `exec` closes them: a journal closed by one test
/// while another test is spawning stays locked for that moment, and reopening it gives `Locked`.
/// Taking this lock around both keeps the tests from seeing each other's children.
static SPAWN: Mutex<()> = Mutex::new(());

fn spawn_guard() -> std::sync::MutexGuard<'static, ()> {
    SPAWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn open(dir: impl AsRef<Path>, config: JournalConfig) -> Result<Journal, JournalError> {
    let _spawning = spawn_guard();
    Journal::open(dir, config)
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i.wrapping_mul(31) ^ j as u64) as u8)
        .collect()
}

/// Appends `n` records (payload `payload(i, len)`, epoch 1), each waited.
fn fill(journal: &Journal, n: u64, len: usize) {
    let first = journal.durable_lsn().0 + 1;
    for i in first..first + n {
        let lsn = journal
            .append(Epoch(1), KIND, &payload(i, len))
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(lsn, Lsn(i));
    }
}

fn read_all(journal: &Journal) -> Vec<Record> {
    journal
        .read_from(Lsn(1))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Asserts the records are exactly `1..=n` as `fill` wrote them.
fn assert_filled(records: &[Record], n: u64, len: usize) {
    assert_eq!(records.len() as u64, n, "number of records read back");
    for (i, rec) in (1..).zip(records) {
        assert_eq!(rec.lsn, Lsn(i));
        assert_eq!(rec.payload, payload(i, len), "payload of lsn {i}");
    }
}

/// A journal of `n` records closed in a fresh directory.
fn journal_with(config: JournalConfig, n: u64, len: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path(), config).unwrap();
    fill(&journal, n, len);
    journal.close().unwrap();
    dir
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    paths.sort();
    paths
}

/// Every segment file's bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    segments(dir)
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn reopen_and_check(dir: &Path, config: JournalConfig, n: u64, len: usize) {
    let journal = open(dir, config).unwrap();
    assert_filled(&read_all(&journal), n, len);
    journal.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The directory.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_missing_directory_without_create_is_dir_missing() {
    let base = tempfile::tempdir().unwrap();
    let path = base.path().join("absent");
    let config = JournalConfig {
        create_if_missing: false,
        ..config()
    };
    let err = open(&path, config).err().unwrap();
    assert!(
        matches!(&err, JournalError::DirMissing { path: p } if *p == path),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    let msg = err.to_string();
    assert!(
        msg.contains(&*path.to_string_lossy()) && msg.contains("create it"),
        "{msg}"
    );
    assert!(
        !path.exists(),
        "a refused open must not create the directory"
    );
}

#[test]
fn a_file_in_place_of_the_directory_is_not_a_directory() {
    let base = tempfile::tempdir().unwrap();
    let path = base.path().join("journal");
    fs::write(&path, b"not a journal").unwrap();
    let err = open(&path, config()).err().unwrap();
    assert!(
        matches!(&err, JournalError::NotADirectory { path: p } if *p == path),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"not a journal");
}

#[test]
fn a_foreign_file_is_refused_by_name_and_the_segments_are_untouched() {
    let dir = journal_with(small(), 12, 500);
    let before = snapshot(dir.path());
    let foreign = dir.path().join("notes.txt");
    fs::write(&foreign, b"someone else's").unwrap();

    let err = open(dir.path(), small()).err().unwrap();
    assert!(
        matches!(&err, JournalError::ForeignFile { path } if *path == foreign),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    let msg = err.to_string();
    assert!(
        msg.contains("notes.txt") && msg.contains("move it away"),
        "{msg}"
    );
    assert!(scan_dir(dir.path(), 1024, |_| {}).is_err());
    assert_eq!(
        snapshot(dir.path()),
        before,
        "segments changed by a refused open"
    );
    assert_eq!(fs::read(&foreign).unwrap(), b"someone else's");

    fs::remove_file(&foreign).unwrap();
    reopen_and_check(dir.path(), small(), 12, 500);
}

#[test]
fn a_second_open_of_the_same_directory_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), config()).unwrap();
    fill(&first, 3, 10);

    let err = open(dir.path(), config()).err().unwrap();
    assert!(
        matches!(&err, JournalError::Locked { path } if *path == dir.path().join("LOCK")),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    assert!(
        err.to_string().contains("locked by another process"),
        "{err}"
    );

    // The refused open disturbed nothing: the first handle goes on appending.
    fill(&first, 2, 10);
    first.close().unwrap();
    reopen_and_check(dir.path(), config(), 5, 10);
}

// ---------------------------------------------------------------------------------------------
// Mounts: read-only and full file systems.
// ---------------------------------------------------------------------------------------------

/// A mount point that is unmounted when dropped, even when the test fails.
struct Mount {
    target: PathBuf,
}

impl Mount {
    fn tmpfs(target: &Path, options: &str) -> Mount {
        fs::create_dir_all(target).unwrap();
        mount(&["-t", "tmpfs", "-o", options, "tmpfs"], target);
        Mount {
            target: target.to_path_buf(),
        }
    }

    /// Binds `source` at `target`, then makes the bind read-only.
    fn bind_read_only(source: &Path, target: &Path) -> Mount {
        fs::create_dir_all(target).unwrap();
        mount(&["--bind", &source.to_string_lossy()], target);
        let guard = Mount {
            target: target.to_path_buf(),
        };
        mount(&["-o", "remount,ro,bind"], target);
        guard
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _spawning = spawn_guard();
        let unmounted = Command::new("umount")
            .arg(&self.target)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds it open (a failing test's leftovers): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

fn mount(args: &[&str], target: &Path) {
    let _spawning = spawn_guard();
    let out = Command::new("mount")
        .args(args)
        .arg(target)
        .output()
        .unwrap_or_else(|e| panic!("this test needs root and mount(8) to mount tmpfs: {e}"));
    assert!(
        out.status.success(),
        "this test needs root to mount tmpfs / bind mounts (run the journal tests as root, as CI \
         does): `mount {} {}` failed: {}",
        args.join(" "),
        target.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

#[test]
fn a_read_only_directory_is_permission_denied_and_left_readable() {
    let base = tempfile::tempdir().unwrap();
    let source = base.path().join("journal");
    {
        let journal = open(&source, config()).unwrap();
        fill(&journal, 7, 40);
        journal.close().unwrap();
    }
    let before = snapshot(&source);
    let ro = base.path().join("ro");
    let _mount = Mount::bind_read_only(&source, &ro);

    let err = open(&ro, config()).err().unwrap();
    match &err {
        JournalError::PermissionDenied { path, .. } => assert!(path.starts_with(&ro), "{path:?}"),
        other => panic!("a read-only journal directory gave {other:?}, not PermissionDenied"),
    }
    assert_eq!(err.class(), ErrorClass::Rejected);
    let msg = err.to_string();
    assert!(
        msg.contains("permission denied") && msg.contains("read and write access"),
        "{msg}"
    );
    // Reading needs no write access: the read-only scan sees every record.
    let mut seen = Vec::new();
    let report = scan_dir(&ro, config().record_bytes_max, |r| seen.push(r.clone())).unwrap();
    assert_eq!(report.last_lsn, Lsn(7));
    assert_filled(&seen, 7, 40);
    assert_eq!(snapshot(&source), before);

    // A directory to be created on a read-only file system.
    let empty_ro = base.path().join("empty-ro");
    let _mount2 = Mount::tmpfs(&empty_ro, "ro,size=64k");
    let err = open(empty_ro.join("new"), config()).err().unwrap();
    assert!(
        matches!(err, JournalError::PermissionDenied { .. }),
        "creating a journal on a read-only file system gave {err:?}"
    );
}

#[test]
fn a_full_disk_poisons_the_journal_and_keeps_every_acknowledged_record() {
    // 64 KiB segments: the disk fills up while a segment is created. 1 MiB segments: while
    // records are written.
    for segment_bytes_max in [64 << 10, 1 << 20] {
        full_disk(segment_bytes_max);
    }
}

fn full_disk(segment_bytes_max: u64) {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("full");
    let _mount = Mount::tmpfs(&mnt, "size=256k");
    let dir = mnt.join("journal");
    let config = JournalConfig {
        segment_bytes_max,
        record_bytes_max: 8 << 10,
        queue_bytes_max: 64 << 10,
        ..config()
    };
    let len = 1000;
    let journal = open(&dir, config.clone()).unwrap();
    let mut acked = 0u64;
    let mut first_error = None;
    for i in 1..=1000u64 {
        match journal
            .append(Epoch(1), KIND, &payload(i, len))
            .and_then(|a| a.wait())
        {
            Ok(lsn) => {
                assert_eq!(lsn, Lsn(i));
                acked = i;
            }
            Err(e) => {
                first_error = Some(e);
                break;
            }
        }
    }
    let err = first_error.expect("256 KiB never filled up with 1000 records of 1 KiB");
    assert!(acked > 100, "only {acked} records fit in 256 KiB");
    assert!(
        matches!(
            err,
            JournalError::DiskFull { .. } | JournalError::Poisoned { .. }
        ),
        "a full disk gave {err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Fatal);
    assert!(err.to_string().contains("no space left"), "{err}");
    println!("full disk after {acked} acknowledged records: {err}");

    // Never retried: every later append fails, poisoned.
    for i in 0..5u64 {
        let later = journal.append(Epoch(1), KIND, &payload(i, 10));
        let later = later.and_then(|a| a.wait()).err().unwrap();
        assert!(matches!(later, JournalError::Poisoned { .. }), "{later:?}");
    }
    let later = journal.append_nowait(Epoch(1), KIND, b"x").err().unwrap();
    assert!(matches!(later, JournalError::Poisoned { .. }), "{later:?}");
    let closed = journal.close().err().unwrap();
    assert!(
        matches!(&closed, JournalError::Poisoned { cause } if cause.contains("no space left")),
        "{closed:?}"
    );

    // Restart on the same, still full, file system.
    match open(&dir, config.clone()) {
        Ok(journal) => {
            let records = read_all(&journal);
            assert!(records.len() as u64 >= acked, "acknowledged records lost");
            assert_filled(&records[..acked as usize], acked, len);
            // Records past the acknowledged ones were written, never acknowledged; they are still
            // exactly what was appended.
            for rec in &records[acked as usize..] {
                assert_eq!(rec.payload, payload(rec.lsn.0, len));
            }
            println!("reopened on the full disk with {} records", records.len());
            match journal.append(Epoch(1), KIND, b"y").and_then(|a| a.wait()) {
                Ok(lsn) => assert_eq!(lsn, Lsn(records.len() as u64 + 1)),
                Err(e) => {
                    println!("append after reopen on the full disk: {e}");
                    assert_eq!(e.class(), ErrorClass::Fatal, "{e:?}");
                }
            }
            let _ = journal.close();
        }
        Err(e) => {
            // A clear, typed refusal is acceptable on a full disk; a panic is not.
            eprintln!("reopen on a full disk refused: {e}");
            assert!(
                matches!(e, JournalError::DiskFull { .. } | JournalError::Io { .. }),
                "{e:?}"
            );
        }
    }
    let mut seen = 0u64;
    scan_dir(&dir, config.record_bytes_max, |_| seen += 1).unwrap();
    assert!(seen >= acked);
}

// ---------------------------------------------------------------------------------------------
// A failing sync.
// ---------------------------------------------------------------------------------------------

#[test]
fn an_injected_sync_failure_poisons_for_good_and_keeps_acknowledged_records() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = JournalConfig {
        sync_fault_at: Some(20),
        ..config()
    };
    let journal = Arc::new(open(dir.path(), faulty).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let journal = Arc::clone(&journal);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for c in 0..10_000u32 {
                    let data = [&[t][..], &c.to_le_bytes()].concat();
                    match journal.append(Epoch(1), KIND, &data).and_then(|a| a.wait()) {
                        Ok(lsn) => acked.push((lsn, data)),
                        Err(e) => {
                            let later: Vec<_> = (0..3)
                                .map(|_| journal.append(Epoch(1), KIND, b"later"))
                                .map(|r| r.and_then(|a| a.wait()))
                                .collect();
                            return (acked, Some(e), later);
                        }
                    }
                }
                (acked, None, Vec::new())
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in threads {
        let (mine, error, later) = t.join().unwrap();
        acked.extend(mine);
        let error = error.expect("the injected sync fault never reached an appender");
        match &error {
            JournalError::Poisoned { cause } => {
                assert!(cause.contains("injected sync fault"), "{cause}")
            }
            other => panic!("a failed sync gave {other:?}, not Poisoned"),
        }
        assert_eq!(error.class(), ErrorClass::Fatal);
        for result in later {
            assert!(
                matches!(result, Err(JournalError::Poisoned { .. })),
                "an append after a failed sync must fail, poisoned: {result:?}"
            );
        }
    }
    assert!(
        acked.len() >= 19,
        "syncs 1..19 succeeded, yet only {} acks",
        acked.len()
    );
    let journal = Arc::into_inner(journal).unwrap();
    let closed = journal.close().err();
    assert!(
        matches!(&closed, Some(JournalError::Poisoned { cause }) if cause.contains("injected")),
        "close after a failed sync: {closed:?}"
    );

    let journal = open(dir.path(), config()).unwrap();
    let records = read_all(&journal);
    for (lsn, data) in &acked {
        let rec = records.get(lsn.0 as usize - 1);
        assert!(
            rec.is_some_and(|r| r.lsn == *lsn && r.payload == *data),
            "acknowledged record {lsn} lost or changed after the failed sync"
        );
    }
    journal.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Refused appends.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_record_over_the_limit_is_refused_and_nothing_is_appended() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path(), small()).unwrap();
    fill(&journal, 2, 10);
    let fits = vec![7u8; 1024 - framed_len(0)];
    let over = vec![7u8; fits.len() + 1];

    let err = journal.append(Epoch(1), KIND, &over).err().unwrap();
    assert!(
        matches!(
            err,
            JournalError::RecordTooLarge {
                bytes: 1025,
                max: 1024
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    assert!(err.to_string().contains("record_bytes_max = 1024"), "{err}");
    let err = journal.append_nowait(Epoch(1), KIND, &over).err().unwrap();
    assert!(
        matches!(err, JournalError::RecordTooLarge { .. }),
        "{err:?}"
    );
    assert_eq!(journal.durable_lsn(), Lsn(2));

    let lsn = journal
        .append(Epoch(1), KIND, &fits)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(lsn, Lsn(3), "a refused record must not take an lsn");
    let records = read_all(&journal);
    assert_eq!(records.len(), 3);
    assert_eq!(records[2].payload, fits);
    journal.close().unwrap();
}

#[test]
fn a_lower_epoch_is_refused_also_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path(), config()).unwrap();
    let at = |j: &Journal, e: u64| j.append(Epoch(e), KIND, b"e").and_then(|a| a.wait());
    assert_eq!(at(&journal, 3).unwrap(), Lsn(1));
    assert_eq!(at(&journal, 5).unwrap(), Lsn(2));
    let err = at(&journal, 4).err().unwrap();
    assert!(
        matches!(
            err,
            JournalError::EpochRegressed {
                offered: Epoch(4),
                current: Epoch(5)
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    assert!(err.to_string().contains("fenced"), "{err}");
    let err = journal.append_nowait(Epoch(1), KIND, b"e").err().unwrap();
    assert!(
        matches!(err, JournalError::EpochRegressed { .. }),
        "{err:?}"
    );
    assert_eq!(
        at(&journal, 5).unwrap(),
        Lsn(3),
        "the same epoch is accepted"
    );
    journal.close().unwrap();

    let journal = open(dir.path(), config()).unwrap();
    let err = at(&journal, 4).err().unwrap();
    assert!(
        matches!(
            err,
            JournalError::EpochRegressed {
                current: Epoch(5),
                ..
            }
        ),
        "the epoch was forgotten across a reopen: {err:?}"
    );
    assert_eq!(at(&journal, 6).unwrap(), Lsn(4));
    let epochs: Vec<u64> = read_all(&journal).iter().map(|r| r.epoch.0).collect();
    assert_eq!(epochs, [3, 5, 5, 6]);
    journal.close().unwrap();
}

/// A checkpoint removes every segment below the newest one, then the process crashes while the
/// newest segment's first record is being written (it was created by a rollover, so it holds no
/// durable record). After recovery no retained record carries an epoch — but epoch 5 was
/// accepted, so a writer at epoch 1 must still be refused.
#[test]
fn the_epoch_survives_a_crash_that_leaves_only_an_empty_segment() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path(), small()).unwrap();
    let mut n = 0;
    while segments(dir.path()).len() < 3 {
        n += 1;
        assert!(n < 100, "no rollover after {n} records");
        journal
            .append(Epoch(5), KIND, &[1; 900])
            .unwrap()
            .wait()
            .unwrap();
    }
    let newest = segments(dir.path()).pop().unwrap();
    let newest_first = Lsn(n);
    assert!(newest.ends_with(journal::segment::segment_name(newest_first)));
    assert_eq!(journal.remove_segments_below(newest_first).unwrap(), 2);
    journal.close().unwrap();
    // The crash: the newest segment's only record never fully reached the disk (and a crash
    // leaves no clean-close mark).
    fs::remove_file(dir.path().join(journal::clean::CLEAN_FILE)).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&newest).unwrap();
    file.set_len(HEADER as u64 + 100).unwrap();
    drop(file);

    let journal = open(dir.path(), small()).unwrap();
    assert_eq!(journal.durable_lsn(), Lsn(n - 1));
    let result = journal.append(Epoch(1), KIND, b"stale writer");
    assert!(
        matches!(result, Err(JournalError::EpochRegressed { .. })),
        "after recovery the journal accepted epoch 1 although epoch 5 was accepted before \
         (the segment header carries no epoch): {:?}",
        result.map(|a| a.wait())
    );
}

// ---------------------------------------------------------------------------------------------
// Damaged or foreign segments.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_newer_segment_format_is_unsupported_naming_the_file_which_is_left_unchanged() {
    let dir = journal_with(small(), 10, 700);
    let paths = segments(dir.path());
    assert!(paths.len() >= 2);
    let newer = &paths[1];
    // Version 2 with an intact self-checked prefix (bytes 0..16: magic, version, crc32 of 0..12)
    // and, for good measure, a matching crc32 of bytes 0..76 at 76..80.
    let mut bytes = fs::read(newer).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let prefix_crc = crc32fast::hash(&bytes[0..12]);
    bytes[12..16].copy_from_slice(&prefix_crc.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..76]);
    bytes[76..80].copy_from_slice(&crc.to_le_bytes());
    fs::write(newer, &bytes).unwrap();
    let before = snapshot(dir.path());

    let err = open(dir.path(), small()).err().unwrap();
    assert!(
        matches!(
            &err,
            JournalError::UnsupportedFormat { path, found: 2, supported: 1 } if path == newer
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    let name = newer.file_name().unwrap().to_string_lossy();
    assert!(
        msg.contains(&*name) && msg.contains("newer concord"),
        "{msg}"
    );
    let scanned = scan_dir(dir.path(), 1024, |_| {}).err().unwrap();
    assert!(matches!(scanned, JournalError::UnsupportedFormat { .. }));
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused open changed a segment"
    );
}

/// Overwrites the length field of record `index` (0-based, in file order) of `seg`.
fn set_length_field(seg: &Path, index: usize, payload_len: usize, value: u32) -> u64 {
    let mut bytes = fs::read(seg).unwrap();
    let at = HEADER + index * framed_len(payload_len);
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    fs::write(seg, &bytes).unwrap();
    at as u64
}

#[test]
fn an_over_limit_length_in_the_middle_of_the_journal_is_corrupt() {
    for value in [u32::MAX, 1021, 1 << 20] {
        // In the last segment, with later records after it.
        let dir = journal_with(small(), 5, 100);
        let seg = segments(dir.path()).pop().unwrap();
        let at = set_length_field(&seg, 2, 100, value);
        let err = open(dir.path(), small()).err().unwrap();
        assert!(
            matches!(&err, JournalError::Corrupt { segment, offset, reason }
                if *segment == seg && *offset == at && reason.contains("implausible record length")),
            "length {value} in the last segment: {err:?}"
        );
        assert_eq!(err.class(), ErrorClass::Corrupt);
        let msg = err.to_string();
        assert!(
            msg.contains(&at.to_string()),
            "the message names the offset: {msg}"
        );

        // In a segment that later segments follow.
        let dir = journal_with(small(), 12, 700);
        let first = segments(dir.path()).remove(0);
        let at = set_length_field(&first, 1, 700, value);
        let err = open(dir.path(), small()).err().unwrap();
        assert!(
            matches!(&err, JournalError::Corrupt { segment, offset, .. }
                if *segment == first && *offset == at),
            "length {value} in the first segment: {err:?}"
        );
    }
}

#[test]
fn a_missing_middle_segment_is_corrupt_naming_the_next_segment() {
    let dir = journal_with(small(), 16, 700);
    let paths = segments(dir.path());
    assert!(paths.len() >= 4, "{paths:?}");
    fs::remove_file(&paths[1]).unwrap();
    let before = snapshot(dir.path());
    let err = open(dir.path(), small()).err().unwrap();
    assert!(
        matches!(&err, JournalError::Corrupt { segment, offset: 0, reason }
            if *segment == paths[2] && reason.contains("missing")),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Corrupt);
    assert_eq!(snapshot(dir.path()), before);
}

// ---------------------------------------------------------------------------------------------
// append_nowait and the Appending future.
// ---------------------------------------------------------------------------------------------

/// Polls `cond` until it holds; fails after a deadline.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn nowait_records_become_durable_with_the_next_durable_append() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path(), config()).unwrap();
    for i in 1..=3 {
        journal
            .append_nowait(Epoch(1), KIND, &payload(i, 30))
            .unwrap();
    }
    wait_until("the nowait records are written", || {
        journal.stats().records == 3
    });
    assert_eq!(journal.stats().syncs, 0, "nowait records were synced");
    assert_eq!(journal.durable_lsn(), Lsn::ZERO);
    assert_eq!(read_all(&journal).len(), 0, "unsynced records are not read");

    let lsn = journal
        .append(Epoch(1), KIND, &payload(4, 30))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(lsn, Lsn(4));
    assert_eq!(journal.durable_lsn(), Lsn(4));
    assert_filled(&read_all(&journal), 4, 30);
    journal.close().unwrap();
    reopen_and_check(dir.path(), config(), 4, 30);
}

#[test]
fn nowait_records_become_durable_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path(), config()).unwrap();
    fill(&journal, 2, 30);
    for i in 3..=5 {
        journal
            .append_nowait(Epoch(1), KIND, &payload(i, 30))
            .unwrap();
    }
    journal.close().unwrap();
    reopen_and_check(dir.path(), config(), 5, 30);
}

/// Wakes a blocked `block_on` and counts the wake-ups.
#[derive(Default)]
struct Signal {
    woken: Mutex<bool>,
    cond: Condvar,
    wakes: AtomicUsize,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        *self.woken.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

/// A minimal executor: polls the futures until all are ready, sleeping until woken in between.
/// Fails when no wake-up comes within a deadline.
fn block_on_all<F: Future + Unpin>(mut futures: Vec<F>) -> (Vec<F::Output>, usize) {
    let signal = Arc::new(Signal::default());
    let waker = Waker::from(Arc::clone(&signal));
    let mut cx = Context::from_waker(&waker);
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        *signal.woken.lock().unwrap() = false;
        for (f, out) in futures.iter_mut().zip(&mut outputs) {
            if out.is_none()
                && let Poll::Ready(v) = Pin::new(f).poll(&mut cx)
            {
                *out = Some(v);
            }
        }
        if outputs.iter().all(Option::is_some) {
            let wakes = signal.wakes.load(Ordering::SeqCst);
            return (outputs.into_iter().map(Option::unwrap).collect(), wakes);
        }
        let mut woken = signal.woken.lock().unwrap();
        while !*woken {
            let now = Instant::now();
            assert!(now < deadline, "a pending Appending was never woken");
            woken = signal.cond.wait_timeout(woken, deadline - now).unwrap().0;
        }
    }
}

#[test]
fn an_appending_is_a_future_that_a_std_only_executor_can_await() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path(), config()).unwrap();
    let (lsns, _) = block_on_all(vec![journal.append(Epoch(1), KIND, b"one").unwrap()]);
    assert_eq!(lsns[0].as_ref().unwrap(), &Lsn(1));

    let pending: Vec<_> = (2..=9)
        .map(|i| journal.append(Epoch(1), KIND, &payload(i, 20)).unwrap())
        .collect();
    let (lsns, wakes) = block_on_all(pending);
    let lsns: Vec<Lsn> = lsns.into_iter().map(Result::unwrap).collect();
    assert_eq!(lsns, (2..=9).map(Lsn).collect::<Vec<_>>());
    assert!(journal.durable_lsn() >= Lsn(9));
    eprintln!("8 awaited appends completed after {wakes} wake-ups");
    journal.close().unwrap();

    // A failing sync reaches an awaiting task too.
    let dir = tempfile::tempdir().unwrap();
    let faulty = JournalConfig {
        sync_fault_at: Some(1),
        ..config()
    };
    let journal = open(dir.path(), faulty).unwrap();
    let (results, _) = block_on_all(vec![journal.append(Epoch(1), KIND, b"doomed").unwrap()]);
    assert!(
        matches!(results[0], Err(JournalError::Poisoned { .. })),
        "{:?}",
        results[0]
    );
}

/// A journal whose disk filled up only after its last record was synced closes without error:
/// the clean-close mark is an optimisation of the next open, and failing to write it loses
/// nothing (every record is durable; the next open checks the tail as after a crash). Nothing is
/// poisoned, so a resource closing on a full disk that never failed a write does not report
/// itself as poisoned.
#[test]
fn a_clean_close_mark_that_does_not_fit_on_a_full_disk_is_not_a_poisoning() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("full");
    let _mount = Mount::tmpfs(&mnt, "size=256k");
    let dir = mnt.join("journal");
    let journal = open(&dir, config()).unwrap();
    for i in 1..=5u64 {
        let lsn = journal.append(Epoch(1), KIND, &payload(i, 100));
        assert_eq!(lsn.and_then(|a| a.wait()).unwrap(), Lsn(i));
    }
    // Fill what is left of the file system.
    let filler = mnt.join("filler");
    {
        let mut file = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
    }
    journal.close().unwrap();
    assert!(
        !dir.join(journal::clean::CLEAN_FILE).exists(),
        "no room for a mark, yet one is there"
    );
    fs::remove_file(&filler).unwrap();
    reopen_and_check(&dir, config(), 5, 100);
}
