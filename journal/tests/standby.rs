//! What a standby needs from its journal: verbatim append of records shipped from another
//! journal (and its refusals, each a typed error with nothing durable changed), a journal seeded
//! at a position of another one's history, and waiting for the durable LSN.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use journal::{
    ChainHash, Epoch, Journal, JournalConfig, JournalError, Lsn, Record, RecordKind, StartPosition,
};

const KIND: RecordKind = RecordKind::new(6, 1);

fn config() -> JournalConfig {
    JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

/// A primary journal of `count` records (epoch 1 for the first half, 2 after) and its records.
fn primary(count: u64) -> (tempfile::TempDir, Vec<Record>) {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), config()).unwrap();
    for i in 1..=count {
        let epoch = Epoch(if i <= count / 2 { 1 } else { 2 });
        journal
            .append(epoch, KIND, format!("record {i}").as_bytes())
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

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn verbatim_records_make_an_identical_journal() {
    let (_p, records) = primary(12);
    let dir = tempfile::tempdir().unwrap();
    let standby = Journal::open(dir.path(), config()).unwrap();
    for rec in &records {
        assert_eq!(
            standby.append_verbatim(rec).unwrap().wait().unwrap(),
            rec.lsn
        );
    }
    standby.close().unwrap();
    let standby = Journal::open(dir.path(), config()).unwrap();
    assert_eq!(
        read_all(&standby),
        records,
        "same lsn, epoch, kind, payload, chain"
    );
    // And it goes on as a journal of its own (a promoted standby).
    let next = standby
        .append(Epoch(3), KIND, b"after promotion")
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(next, Lsn(13));
}

#[test]
fn verbatim_out_of_order_wrong_chain_or_lower_epoch_is_refused_and_changes_nothing() {
    let (_p, records) = primary(6);
    let dir = tempfile::tempdir().unwrap();
    let standby = Journal::open(dir.path(), config()).unwrap();
    for rec in &records[..4] {
        standby.append_verbatim(rec).unwrap().wait().unwrap();
    }
    let before = snapshot(dir.path());

    // A gap, a repeat, and the very record after a gap.
    for (rec, got) in [(&records[5], 6), (&records[3], 4), (&records[0], 1)] {
        match standby.append_verbatim(rec) {
            Err(JournalError::LsnGap { expected, got: g }) => {
                assert_eq!((expected, g), (Lsn(5), Lsn(got)));
            }
            other => panic!("lsn {got} appended after lsn 4: {:?}", other.map(|_| ())),
        }
    }
    // The right LSN with a chain of another history.
    let mut forged = records[4].clone();
    forged.chain = ChainHash([7; 32]);
    match standby.append_verbatim(&forged) {
        Err(JournalError::ChainMismatch { lsn, expected, got }) => {
            assert_eq!(lsn, Lsn(5));
            assert_eq!(expected, records[4].chain);
            assert_eq!(got, ChainHash([7; 32]));
        }
        other => panic!("a forged chain was accepted: {:?}", other.map(|_| ())),
    }
    // A different payload under the primary's chain value is a chain mismatch too.
    let mut altered = records[4].clone();
    altered.payload = b"not what the primary wrote".to_vec();
    assert!(matches!(
        standby.append_verbatim(&altered),
        Err(JournalError::ChainMismatch { lsn: Lsn(5), .. })
    ));
    // An epoch below one accepted (record 4 carries epoch 2).
    let mut stale = records[4].clone();
    stale.epoch = Epoch(1);
    assert!(matches!(
        standby.append_verbatim(&stale),
        Err(JournalError::EpochRegressed {
            offered: Epoch(1),
            current: Epoch(2)
        })
    ));
    assert_eq!(standby.durable_lsn(), Lsn(4));
    standby.close().unwrap();
    let mut after = snapshot(dir.path());
    after.remove(journal::clean::CLEAN_FILE);
    let mut before = before;
    before.remove(journal::clean::CLEAN_FILE);
    assert_eq!(
        after, before,
        "a refused verbatim append changed the journal"
    );

    // The right record still goes in afterwards.
    let standby = Journal::open(dir.path(), config()).unwrap();
    assert_eq!(
        standby
            .append_verbatim(&records[4])
            .unwrap()
            .wait()
            .unwrap(),
        Lsn(5)
    );
}

#[test]
fn a_standby_seeded_at_a_position_takes_the_records_after_it() {
    let (_p, records) = primary(10);
    // Unseeded, an empty journal takes only lsn 1.
    let plain = tempfile::tempdir().unwrap();
    let journal = Journal::open(plain.path(), config()).unwrap();
    assert!(matches!(
        journal.append_verbatim(&records[5]),
        Err(JournalError::LsnGap {
            expected: Lsn(1),
            got: Lsn(6)
        })
    ));
    drop(journal);

    let seeded = tempfile::tempdir().unwrap();
    let start = StartPosition {
        lsn: records[4].lsn,
        chain: records[4].chain,
        epoch: records[4].epoch,
    };
    let with_start = JournalConfig {
        start_after: Some(start),
        ..config()
    };
    let journal = Journal::open(seeded.path(), with_start.clone()).unwrap();
    assert_eq!(journal.durable_lsn(), Lsn(5));
    assert_eq!(journal.oldest_lsn(), Lsn(6));
    let mut forged = records[5].clone();
    forged.chain = ChainHash::GENESIS;
    assert!(matches!(
        journal.append_verbatim(&forged),
        Err(JournalError::ChainMismatch { lsn: Lsn(6), .. })
    ));
    for rec in &records[5..] {
        journal.append_verbatim(rec).unwrap().wait().unwrap();
    }
    journal.close().unwrap();
    // Reopened, with or without the setting (ignored once the journal exists), it is the same.
    for cfg in [config(), with_start] {
        let journal = Journal::open(seeded.path(), cfg).unwrap();
        assert_eq!(read_all(&journal), records[5..].to_vec());
        assert!(matches!(
            journal.read_from(Lsn(3)),
            Err(JournalError::LsnNotRetained { .. })
        ));
        journal.close().unwrap();
    }
}

#[test]
fn wait_durable_resolves_when_the_durable_lsn_passes_and_fails_when_the_journal_stops() {
    let dir = tempfile::tempdir().unwrap();
    let journal = std::sync::Arc::new(Journal::open(dir.path(), config()).unwrap());
    assert_eq!(journal.wait_durable(Lsn::ZERO).wait().unwrap(), Lsn::ZERO);
    let waiter = journal.wait_durable(Lsn(3));
    let appender = {
        let journal = std::sync::Arc::clone(&journal);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            for i in 0..3u8 {
                journal
                    .append(Epoch(1), KIND, &[i])
                    .unwrap()
                    .wait()
                    .unwrap();
            }
        })
    };
    let durable = block_on(async {
        tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("wait_durable never resolved")
    })
    .unwrap();
    assert!(durable >= Lsn(3));
    appender.join().unwrap();
    // A thread waiting beyond the end learns when the journal closes.
    let beyond = journal.wait_durable(Lsn(10));
    let closer = {
        let journal = std::sync::Arc::clone(&journal);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            journal.close().unwrap();
        })
    };
    assert!(matches!(beyond.wait(), Err(JournalError::Closed)));
    closer.join().unwrap();
    // After close: what was durable still is; anything later never will be.
    assert_eq!(block_on(journal.wait_durable(Lsn(2))).unwrap(), Lsn(3));
    assert!(matches!(
        block_on(journal.wait_durable(Lsn(4))),
        Err(JournalError::Closed)
    ));
}

#[test]
fn wait_durable_reports_the_poisoning() {
    let dir = tempfile::tempdir().unwrap();
    let failing = JournalConfig {
        sync_fault_at: Some(1),
        ..config()
    };
    let journal = Journal::open(dir.path(), failing).unwrap();
    let waiter = journal.wait_durable(Lsn(1));
    let appended = journal.append(Epoch(1), KIND, b"never durable").unwrap();
    assert!(matches!(
        appended.wait(),
        Err(JournalError::Poisoned { .. })
    ));
    assert!(matches!(
        block_on(waiter),
        Err(JournalError::Poisoned { .. })
    ));
}

/// `position_before` gives the position a re-seeded standby continues from: from the record
/// before when it is retained, from a segment's header at a segment's start, and a refusal
/// below the retained records. A journal started there takes the next record verbatim.
#[test]
fn position_before_continues_the_history_from_a_record_or_a_segment_header() {
    let dir = tempfile::tempdir().unwrap();
    let small = JournalConfig {
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        queue_bytes_max: 4096,
        ..config()
    };
    let journal = Journal::open(dir.path(), small.clone()).unwrap();
    for i in 1..=60u64 {
        let epoch = Epoch(if i <= 30 { 1 } else { 2 });
        let payload = vec![i as u8; 200];
        journal
            .append(epoch, KIND, &payload)
            .unwrap()
            .wait()
            .unwrap();
    }
    let records = read_all(&journal);
    let at = journal.position_before(Lsn(41)).unwrap();
    assert_eq!(at.lsn, Lsn(40));
    assert_eq!(at.chain, records[39].chain);
    assert_eq!(at.epoch, Epoch(2));
    journal.remove_segments_below(Lsn(45)).unwrap();
    let oldest = journal.oldest_lsn();
    assert!(oldest > Lsn(1) && oldest <= Lsn(45), "oldest {oldest}");
    let at = journal.position_before(oldest).unwrap();
    assert_eq!(at.lsn, oldest.prev());
    assert_eq!(at.chain, records[(oldest.0 - 2) as usize].chain);
    assert!(matches!(
        journal.position_before(Lsn(1)),
        Err(JournalError::LsnNotRetained { .. })
    ));
    let seeded = tempfile::tempdir().unwrap();
    let standby = Journal::open(
        seeded.path(),
        JournalConfig {
            start_after: Some(at),
            ..small
        },
    )
    .unwrap();
    let next = &records[(oldest.0 - 1) as usize];
    standby.append_verbatim(next).unwrap().wait().unwrap();
    assert_eq!(standby.durable_lsn(), oldest);
}

/// A reader that follows the journal yields the records made durable since, across a new
/// segment and past segments removed below it, each once and in order.
#[test]
fn a_reader_follows_the_journal_across_segments_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let small = JournalConfig {
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        queue_bytes_max: 4096,
        ..config()
    };
    let journal = Journal::open(dir.path(), small).unwrap();
    let append = |i: u64| {
        journal
            .append(
                Epoch(1),
                KIND,
                format!("record {i:04} {}", "x".repeat(150)).as_bytes(),
            )
            .unwrap()
            .wait()
            .unwrap()
    };
    for i in 1..=5 {
        append(i);
    }
    let mut reader = journal.read_from(Lsn(3)).unwrap();
    let mut seen: Vec<u64> = reader.by_ref().map(|r| r.unwrap().lsn.0).collect();
    assert_eq!(seen, [3, 4, 5]);
    for i in 6..=45 {
        append(i);
    }
    journal.follow(&mut reader);
    seen.extend(reader.by_ref().map(|r| r.unwrap().lsn.0));
    // Segments wholly below what the reader has read go; it goes on in the one it is in.
    journal.remove_segments_below(Lsn(40)).unwrap();
    assert!(journal.oldest_lsn() > Lsn(3));
    for i in 46..=80 {
        append(i);
    }
    journal.follow(&mut reader);
    seen.extend(reader.by_ref().map(|r| r.unwrap().lsn.0));
    journal.follow(&mut reader);
    assert!(reader.next().is_none(), "nothing new: nothing yielded");
    append(81);
    journal.follow(&mut reader);
    seen.extend(reader.by_ref().map(|r| r.unwrap().lsn.0));
    assert_eq!(seen, (3..=81).collect::<Vec<_>>());
}
