//! Truncating a journal after an LSN (an old primary rejoining after its history diverged):
//! the records after it are gone, the journal goes on from it, the clean-close mark follows, bad
//! requests change nothing, and a truncation stopped at any step (as by a crash) leaves a journal
//! that opens to a prefix ending at or after the LSN, and finishes when run again.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use journal::clean::CLEAN_FILE;
use journal::scan::scan_dir;
use journal::{Epoch, Journal, JournalConfig, JournalError, Lsn, Record, RecordKind};

const KIND: RecordKind = RecordKind::new(8, 1);
const RECORDS: u64 = 30;

/// Segments of 4 KiB: records of 700 bytes, five to a segment.
fn config() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        queue_bytes_max: 8192,
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    vec![i as u8; 700]
}

/// A closed journal of `RECORDS` records, and its records.
fn journal_of_records() -> (tempfile::TempDir, Vec<Record>) {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    for i in 1..=RECORDS {
        journal
            .append(Epoch(1), KIND, &payload(i))
            .unwrap()
            .wait()
            .unwrap();
    }
    let records = read_all(&journal);
    journal.close().unwrap();
    (dir, records)
}

fn read_all(journal: &Journal) -> Vec<Record> {
    journal
        .read_from(journal.oldest_lsn())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
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

fn restore(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for e in fs::read_dir(dir).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (name, bytes) in files {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Opens the journal, checks it holds exactly `records`, that the next append follows them, and
/// closes it.
fn assert_holds(dir: &Path, records: &[Record]) {
    let journal = Journal::open(dir, config()).unwrap();
    assert_eq!(read_all(&journal), records);
    let last = records.last().map_or(Lsn::ZERO, |r| r.lsn);
    assert_eq!(journal.durable_lsn(), last);
    let next = journal
        .append(Epoch(1), KIND, b"after the truncation")
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(next, last.next());
    journal.close().unwrap();
}

#[test]
fn records_after_the_lsn_are_removed_and_the_journal_goes_on_from_it() {
    let (pristine, records) = journal_of_records();
    let files = snapshot(pristine.path());
    let segments = files.keys().filter(|n| n.ends_with(".seg")).count();
    assert!(segments >= 5, "{segments} segments");
    // Mid-segment, the end of a segment, the beginning of the first, the last record.
    for lsn in [12, 10, 0, RECORDS] {
        let dir = tempfile::tempdir().unwrap();
        restore(dir.path(), &files);
        let done = Journal::truncate_after(dir.path(), &config(), Lsn(lsn)).unwrap();
        assert_eq!(done.last_lsn, Lsn(lsn));
        assert_eq!(done.records_removed, RECORDS - lsn);
        let chain = records
            .get(lsn as usize - usize::from(lsn > 0))
            .filter(|_| lsn > 0)
            .map_or(journal::ChainHash::GENESIS, |r| r.chain);
        assert_eq!(done.last_chain, chain, "truncate after {lsn}");
        // The new end is marked clean.
        let report = scan_dir(dir.path(), config().record_bytes_max, |_| {}).unwrap();
        let mark = report
            .clean_close
            .expect("a clean-close mark for the new end");
        assert_eq!((mark.last_lsn, mark.last_chain), (Lsn(lsn), chain));
        // Running it again changes nothing.
        let before = snapshot(dir.path());
        let again = Journal::truncate_after(dir.path(), &config(), Lsn(lsn)).unwrap();
        assert_eq!((again.records_removed, again.segments_removed), (0, 0));
        assert_eq!(snapshot(dir.path()), before);
        assert_holds(dir.path(), &records[..lsn as usize]);
    }
}

#[test]
fn a_bad_truncation_is_refused_and_changes_nothing() {
    let (dir, records) = journal_of_records();
    let before = snapshot(dir.path());
    assert!(matches!(
        Journal::truncate_after(dir.path(), &config(), Lsn(RECORDS + 1)),
        Err(JournalError::TruncateBeyondEnd {
            requested: Lsn(31),
            last: Lsn(30)
        })
    ));
    // While the journal is open elsewhere.
    let open = Journal::open(dir.path(), config()).unwrap();
    let locked = JournalConfig {
        lock_wait_ms_max: 10,
        ..config()
    };
    assert!(matches!(
        Journal::truncate_after(dir.path(), &locked, Lsn(5)),
        Err(JournalError::Locked { .. })
    ));
    drop(open);
    assert_eq!(snapshot(dir.path()), before);
    // Below the retained records: the chain value there is unknown.
    let journal = Journal::open(dir.path(), config()).unwrap();
    assert!(journal.remove_segments_below(Lsn(12)).unwrap() >= 2);
    let oldest = journal.oldest_lsn();
    journal.close().unwrap();
    let before = snapshot(dir.path());
    assert!(matches!(
        Journal::truncate_after(dir.path(), &config(), Lsn(oldest.0 - 2)),
        Err(JournalError::LsnNotRetained { .. })
    ));
    assert_eq!(snapshot(dir.path()), before);
    // Right below the oldest retained record is fine: its chain value is in the header.
    Journal::truncate_after(dir.path(), &config(), oldest.prev()).unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    assert_eq!(journal.durable_lsn(), oldest.prev());
    assert!(read_all(&journal).is_empty());
    drop(journal);
    let _ = records;
}

#[test]
fn damage_at_the_new_end_after_a_truncation_is_corruption() {
    let (dir, _) = journal_of_records();
    Journal::truncate_after(dir.path(), &config(), Lsn(12)).unwrap();
    let seg = dir.path().join("00000000000000000011.seg");
    let mut bytes = fs::read(&seg).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 1;
    fs::write(&seg, bytes).unwrap();
    assert!(matches!(
        Journal::open(dir.path(), config()),
        Err(JournalError::Corrupt { .. })
    ));
}

#[test]
fn a_truncation_stopped_at_any_step_opens_to_a_prefix_and_finishes_when_run_again() {
    let (pristine, records) = journal_of_records();
    let files = snapshot(pristine.path());
    let lsn = 12u64;
    let mut step = 1;
    loop {
        let dir = tempfile::tempdir().unwrap();
        restore(dir.path(), &files);
        let faulty = JournalConfig {
            truncate_fault_at: Some(step),
            ..config()
        };
        match Journal::truncate_after(dir.path(), &faulty, Lsn(lsn)) {
            Ok(_) => break,
            Err(JournalError::Io { .. }) => {}
            Err(e) => panic!("step {step}: {e}"),
        }
        // What a crash at this step leaves: a prefix of the original, ending at or after lsn.
        let crashed = snapshot(dir.path());
        let journal = Journal::open(dir.path(), config()).unwrap();
        let got = read_all(&journal);
        assert!(
            got.len() as u64 >= lsn,
            "step {step}: only {} records",
            got.len()
        );
        assert_eq!(got, records[..got.len()], "step {step}: not a prefix");
        drop(journal);
        // Run again, straight on the crashed directory and after an open and close.
        for reopened in [false, true] {
            restore(dir.path(), &crashed);
            if reopened {
                Journal::open(dir.path(), config())
                    .unwrap()
                    .close()
                    .unwrap();
            }
            Journal::truncate_after(dir.path(), &config(), Lsn(lsn)).unwrap();
            assert!(dir.path().join(CLEAN_FILE).is_file());
            assert_holds(dir.path(), &records[..lsn as usize]);
        }
        step += 1;
        assert!(step < 20, "the truncation never completed");
    }
    assert!(
        step >= 5,
        "only {step} steps: mark, segments, cut, mark expected"
    );
}
