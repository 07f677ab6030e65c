//! Edge cases found in review: records a dead process may have left unsynced, a record written
//! under a larger `record_bytes_max`, a blob read to exactly its size, a segment name at the end
//! of the LSN range, an oversized queue limit, a journal closed through a shared reference.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use journal::{
    BlobConfig, BlobStore, Epoch, Journal, JournalConfig, JournalError, Lsn, RecordKind,
    segment::{SEGMENT_HEADER_BYTES, SegmentHeader},
};

const KIND: RecordKind = RecordKind::new(3, 1);

fn config() -> JournalConfig {
    JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    segments(dir)
        .into_iter()
        .map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

#[test]
fn a_record_over_a_lowered_limit_is_reported_and_never_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    journal
        .append(Epoch(1), KIND, b"small")
        .unwrap()
        .wait()
        .unwrap();
    let big = vec![7u8; 2 << 20];
    journal
        .append(Epoch(1), KIND, &big)
        .unwrap()
        .wait()
        .unwrap();
    journal.close().unwrap();
    let before = snapshot(dir.path());

    let lowered = JournalConfig {
        record_bytes_max: 1 << 20,
        ..config()
    };
    for _ in 0..2 {
        let err = Journal::open(dir.path(), lowered.clone()).err().unwrap();
        match &err {
            JournalError::RecordOverLimit {
                offset, bytes, max, ..
            } => {
                assert_eq!(*max, 1 << 20);
                assert_eq!(*bytes, (2 << 20) + 62);
                assert!(*offset > SEGMENT_HEADER_BYTES as u64);
            }
            other => panic!("expected RecordOverLimit, got {other:?}"),
        }
        assert!(
            err.to_string().contains("record_bytes_max of at least"),
            "{err}"
        );
        let scanned = journal::scan::scan_dir(dir.path(), 1 << 20, |_| {});
        assert!(matches!(scanned, Err(JournalError::RecordOverLimit { .. })));
        assert_eq!(snapshot(dir.path()), before, "nothing may be truncated");
    }

    let journal = Journal::open(dir.path(), config()).unwrap();
    assert_eq!(journal.durable_lsn(), Lsn(2));
    let records: Vec<_> = journal
        .read_from(Lsn(1))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(records[1].payload, big);
}

#[test]
fn reading_a_damaged_blob_to_exactly_its_size_still_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = BlobConfig {
        create_if_missing: true,
        ..BlobConfig::default()
    };
    let store = BlobStore::open(dir.path().join("blobs"), config).unwrap();
    let content = vec![0x42u8; 10_000];
    let stored = store.put(&content[..]).unwrap();
    let path = store.path_of(&stored.id);
    let mut damaged = fs::read(&path).unwrap();
    damaged[5_000] ^= 1;
    fs::write(&path, &damaged).unwrap();

    let mut reader = store.open_blob(&stored.id).unwrap();
    let mut buf = vec![0u8; stored.bytes as usize];
    let err = reader.read_exact(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");

    let intact = store.put(&content[..]).unwrap();
    assert_eq!(intact.id, stored.id);
    let mut reader = store.open_blob(&stored.id).unwrap();
    reader.read_exact(&mut buf).unwrap();
    assert_eq!(buf, content, "a second put replaces the damaged copy");
}

#[test]
fn a_segment_at_the_end_of_the_lsn_range_is_corruption_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let first = Lsn(u64::MAX);
    let name = format!("{:020}.seg", first.0);
    let header = SegmentHeader {
        first_lsn: first,
        epoch: Epoch(0),
        prev_chain: journal::ChainHash::GENESIS,
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(&[0xff; 100]);
    fs::write(dir.path().join(&name), &bytes).unwrap();
    let err = Journal::open(dir.path(), config()).err().unwrap();
    assert!(
        matches!(err, JournalError::Corrupt { offset: 0, .. }),
        "{err:?}"
    );
    let scanned = journal::scan::scan_dir(dir.path(), 1 << 20, |_| {});
    assert!(matches!(scanned, Err(JournalError::Corrupt { .. })));
}

#[test]
fn a_queue_limit_beyond_what_a_sync_group_can_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let huge = JournalConfig {
        queue_bytes_max: 1 << 40,
        ..config()
    };
    let err = Journal::open(dir.path(), huge).err().unwrap();
    assert!(matches!(err, JournalError::InvalidConfig(_)), "{err:?}");
}

#[test]
fn opening_syncs_the_records_it_finds_before_it_calls_them_durable() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    journal
        .append(Epoch(1), KIND, b"one")
        .unwrap()
        .wait()
        .unwrap();
    journal.close().unwrap();

    // The first sync of the next open is the sync of what it found: make it fail, as a disk
    // would, and the open must fail rather than publish the records as durable.
    let failing = JournalConfig {
        sync_fault_at: Some(1),
        ..config()
    };
    let err = Journal::open(dir.path(), failing).err().unwrap();
    assert!(err.to_string().contains("injected sync fault"), "{err}");

    // An empty journal has nothing to sync at open: its first sync is the first batch's.
    let empty = tempfile::tempdir().unwrap();
    let failing = JournalConfig {
        sync_fault_at: Some(1),
        ..config()
    };
    let journal = Journal::open(empty.path(), failing).unwrap();
    let err = journal
        .append(Epoch(1), KIND, b"x")
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(matches!(err, JournalError::Poisoned { .. }), "{err:?}");
}

/// `close` through a shared reference (other holders of the journal still live): what was queued
/// is durable, the directory is free for another open, and every later append or segment removal
/// is refused; closing again does nothing.
#[test]
fn a_journal_closed_while_shared_writes_its_queue_and_lets_the_directory_go() {
    let dir = tempfile::tempdir().unwrap();
    let journal = std::sync::Arc::new(Journal::open(dir.path(), config()).unwrap());
    let other_holder = std::sync::Arc::clone(&journal);
    journal
        .append(Epoch(1), KIND, b"synced")
        .unwrap()
        .wait()
        .unwrap();
    journal.append_nowait(Epoch(1), KIND, b"queued").unwrap();
    journal.close().unwrap();
    journal.close().unwrap();

    assert!(matches!(
        other_holder.append(Epoch(1), KIND, b"late"),
        Err(JournalError::Closed)
    ));
    assert!(matches!(
        other_holder.remove_segments_below(Lsn(2)),
        Err(JournalError::Closed)
    ));
    let reopened = Journal::open(dir.path(), config()).unwrap();
    let payloads: Vec<Vec<u8>> = reopened
        .read_from(Lsn(1))
        .unwrap()
        .map(|r| r.unwrap().payload)
        .collect();
    assert_eq!(payloads, vec![b"synced".to_vec(), b"queued".to_vec()]);
    drop(other_holder);
    drop(journal);
    reopened.close().unwrap();
}

/// Two closes at once: neither returns before everything queued is durable (the second waits
/// for the first one's flusher instead of letting the directory go under it).
#[test]
fn a_second_close_waits_for_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let journal = std::sync::Arc::new(Journal::open(dir.path(), config()).unwrap());
    let record = vec![5u8; 64 << 10];
    for _ in 0..512 {
        journal.append_nowait(Epoch(1), KIND, &record).unwrap();
    }
    let last = Lsn(512);
    let other = std::sync::Arc::clone(&journal);
    let closing = std::thread::spawn(move || {
        other.close().unwrap();
        other.durable_lsn()
    });
    journal.close().unwrap();
    let here = journal.durable_lsn();
    let there = closing.join().unwrap();
    assert_eq!((here, there), (last, last));
}
