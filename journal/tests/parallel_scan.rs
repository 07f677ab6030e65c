//! The parallel scan of sealed segments (`scan_dir_parallel`, which `Journal::open` uses) gives
//! exactly the verdict of the scan in order: the same report on a sound journal, the same error
//! on one damaged anywhere, and the same torn tail.

#![allow(clippy::unwrap_used)]

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use journal::scan::{scan_dir, scan_dir_parallel};
use journal::{Epoch, Journal, JournalConfig, RecordKind};

const RECORD_BYTES_MAX: u64 = 4 << 10;

fn config() -> JournalConfig {
    JournalConfig {
        create_if_missing: true,
        segment_bytes_max: 16 << 10,
        record_bytes_max: RECORD_BYTES_MAX,
        ..JournalConfig::default()
    }
}

/// A journal of many small segments, closed cleanly (`clean`) or dropped.
fn journal(dir: &Path, clean: bool) -> Vec<PathBuf> {
    let j = Journal::open(dir, config()).unwrap();
    for i in 0..600u32 {
        let payload = vec![(i % 251) as u8; 100 + (i as usize % 300)];
        let epoch = Epoch(1 + u64::from(i / 200));
        j.append(epoch, RecordKind::new(1, 1), &payload)
            .unwrap()
            .wait()
            .unwrap();
    }
    if clean {
        j.close().unwrap();
    }
    drop(j);
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 8, "{} segments", segments.len());
    segments
}

fn flip(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    std::io::Read::read_exact(&mut f, &mut byte).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[byte[0] ^ 0x40]).unwrap();
}

/// Both scans of `dir`, as comparable text.
fn both(dir: &Path) -> (String, String) {
    let show = |r: journal::Result<journal::scan::ScanReport>| match r {
        Ok(report) => format!(
            "ok last {} chain {:?} epoch {:?} torn {:?} segments {:?}",
            report.last_lsn,
            report.last_chain,
            report.last_epoch,
            report.torn_tail.map(|t| (t.segment, t.offset, t.bytes)),
            report
                .segments
                .iter()
                .map(|s| (s.first_lsn, s.last_lsn, s.end_offset, s.file_bytes))
                .collect::<Vec<_>>()
        ),
        Err(e) => format!("error {e}"),
    };
    (
        show(scan_dir(dir, RECORD_BYTES_MAX, |_| {})),
        show(scan_dir_parallel(dir, RECORD_BYTES_MAX, 3)),
    )
}

#[test]
fn a_sound_journal_scans_the_same_in_parallel() {
    for clean in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        journal(dir.path(), clean);
        let (in_order, parallel) = both(dir.path());
        assert!(in_order.starts_with("ok"), "{in_order}");
        assert_eq!(in_order, parallel);
    }
}

#[test]
fn damage_anywhere_gets_the_same_verdict_in_parallel() {
    let template = tempfile::tempdir().unwrap();
    let segments = journal(template.path(), false);
    let names: Vec<_> = segments
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    // A byte in the header, in the middle and near the end of a sealed segment, and in the last.
    let cases = [
        (0usize, 40u64),
        (1, 2_000),
        (3, 9_000),
        (names.len() - 2, 100),
        (names.len() - 1, 500),
    ];
    for (segment, offset) in cases {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(template.path()).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        let target = dir.path().join(&names[segment]);
        let len = std::fs::metadata(&target).unwrap().len();
        flip(&target, offset.min(len - 1));
        let (in_order, parallel) = both(dir.path());
        assert_eq!(in_order, parallel, "segment {segment} offset {offset}");
        if segment + 1 < names.len() {
            assert!(
                in_order.starts_with("error"),
                "segment {segment}: {in_order}"
            );
        }
    }
}
