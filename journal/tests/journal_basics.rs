//! Appending, reading back, reopening, segment rollover and checkpoints through the public API.

use std::sync::Arc;

use journal::{Epoch, Journal, JournalConfig, JournalError, Lsn, RecordKind};

const KIND: RecordKind = RecordKind::new(1, 1);

fn config() -> JournalConfig {
    JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

fn small_segments() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        queue_bytes_max: 8192,
        ..config()
    }
}

#[test]
fn appended_records_read_back_in_order_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    for i in 0..100u32 {
        let lsn = journal
            .append(Epoch(1), KIND, &i.to_le_bytes())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(lsn, Lsn(u64::from(i) + 1));
    }
    journal.close().unwrap();

    let journal = Journal::open(dir.path(), config()).unwrap();
    let records: Vec<_> = journal
        .read_from(Lsn(1))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(records.len(), 100);
    for (i, rec) in records.iter().enumerate() {
        assert_eq!(rec.lsn, Lsn(i as u64 + 1));
        assert_eq!(rec.payload, (i as u32).to_le_bytes());
    }
    let lsn = journal
        .append(Epoch(1), KIND, b"after")
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(lsn, Lsn(101));
}

#[test]
fn concurrent_appenders_get_distinct_contiguous_lsns() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(Journal::open(dir.path(), small_segments()).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let journal = Arc::clone(&journal);
            std::thread::spawn(move || {
                (0..200u32)
                    .map(|i| {
                        let payload = [&[t][..], &i.to_le_bytes()].concat();
                        journal
                            .append(Epoch(1), KIND, &payload)
                            .unwrap()
                            .wait()
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut lsns: Vec<Lsn> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    lsns.sort();
    assert_eq!(lsns, (1..=1600).map(Lsn).collect::<Vec<_>>());
    let stats = journal.stats();
    assert_eq!(stats.records, 1600);
    assert!(stats.syncs <= 1600);
    let read: Vec<_> = journal
        .read_from(Lsn(700))
        .unwrap()
        .map(|r| r.unwrap().lsn)
        .collect();
    assert_eq!(read, (700..=1600).map(Lsn).collect::<Vec<_>>());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().count() > 10,
        "small segments must roll over"
    );
}

#[test]
fn checkpoint_removes_whole_segments_below_and_reads_refuse_them() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), small_segments()).unwrap();
    for i in 0..300u32 {
        journal
            .append(Epoch(1), KIND, &[0u8; 100])
            .unwrap()
            .wait()
            .unwrap();
        let _ = i;
    }
    let removed = journal.remove_segments_below(Lsn(150)).unwrap();
    assert!(removed > 0);
    let oldest = journal.oldest_lsn();
    assert!(oldest <= Lsn(150) && oldest > Lsn(1));
    assert!(matches!(
        journal.read_from(Lsn(1)),
        Err(JournalError::LsnNotRetained { .. })
    ));
    let read: Vec<_> = journal
        .read_from(oldest)
        .unwrap()
        .map(|r| r.unwrap().lsn)
        .collect();
    assert_eq!(read.first(), Some(&oldest));
    assert_eq!(read.last(), Some(&Lsn(300)));
    journal.close().unwrap();
    let journal = Journal::open(dir.path(), small_segments()).unwrap();
    assert_eq!(journal.durable_lsn(), Lsn(300));
    assert_eq!(journal.oldest_lsn(), oldest);
}

/// A requested rollover starts a new segment with the next record once the current one holds
/// the bytes asked for (and not before); the records read back the same across it and after a
/// reopen.
#[test]
fn a_requested_roll_starts_a_new_segment_with_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    };
    let segments = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    let j = Journal::open(dir.path(), config.clone()).unwrap();
    let append = |j: &Journal, n: u8| {
        j.append(Epoch(1), RecordKind::new(1, 1), &[n; 100])
            .unwrap()
            .wait()
            .unwrap()
    };
    append(&j, 1);
    j.request_roll(1 << 20);
    append(&j, 2);
    assert_eq!(
        segments(dir.path()),
        1,
        "rolled before the segment held 1 MiB"
    );
    j.request_roll(1);
    let third = append(&j, 3);
    assert_eq!(segments(dir.path()), 2);
    append(&j, 4);
    assert_eq!(segments(dir.path()), 2, "one request, one roll");
    assert_eq!(j.remove_segments_below(third).unwrap(), 1);
    j.close().unwrap();
    drop(j);
    let j = Journal::open(dir.path(), config).unwrap();
    let payloads: Vec<u8> = j
        .read_from(third)
        .unwrap()
        .map(|r| r.unwrap().payload[0])
        .collect();
    assert_eq!(payloads, vec![3, 4]);
}
