//! Readers running while appenders roll segments over: a reader made by `read_from` must yield
//! every record up to its `upto()` — "the durable LSN as of this call" — however the flusher's
//! rollovers interleave with the call.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use journal::segment::segment_name;
use journal::{Epoch, Journal, JournalConfig, Lsn, RecordKind};

/// How long the readers race the appenders (the test stops early at the first short read).
const RACE: Duration = Duration::from_secs(3);

/// A scratch directory on the memory file system when there is one: fast syncs mean many
/// rollovers per second, which is what this test needs.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

#[test]
fn a_reader_yields_every_record_up_to_its_upto_while_segments_roll_over() {
    let dir = scratch_dir();
    let config = JournalConfig {
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        queue_bytes_max: 8192,
        create_if_missing: true,
        ..JournalConfig::default()
    };
    let journal = Arc::new(Journal::open(dir.path(), config).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    // Records of 962 bytes: a rollover every four records.
    let appenders: Vec<_> = (0..2)
        .map(|_| {
            let journal = Arc::clone(&journal);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let appending = journal.append(Epoch(1), RecordKind::new(1, 1), &[7; 900]);
                    appending.unwrap().wait().unwrap();
                }
            })
        })
        .collect();

    let deadline = Instant::now() + RACE;
    let mut reads = 0u64;
    let mut short = None;
    while Instant::now() < deadline && short.is_none() {
        let from = Lsn(journal.durable_lsn().0.max(1));
        let reader = journal.read_from(from).unwrap();
        let upto = reader.upto();
        let last = reader.map(|r| r.unwrap().lsn).last();
        reads += 1;
        if upto >= from && last != Some(upto) {
            let next = last.map_or(from, Lsn::next);
            let next_exists = dir.path().join(segment_name(next)).exists();
            short = Some((from, upto, last, next, next_exists));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for a in appenders {
        a.join().unwrap();
    }
    if let Some((from, upto, last, next, next_exists)) = short {
        panic!(
            "read_from({from}) promised records up to {upto} but ended after {last:?} (read \
             {reads}); segment {} exists on disk: {next_exists}",
            segment_name(next)
        );
    }
    eprintln!("{reads} reads, none short");
}
