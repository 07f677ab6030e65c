//! Recovery under damage: property tests that cut the journal at every offset of its last records
//! and flip single bits anywhere, and check that `Journal::open` and the read-only
//! `scan::scan_dir` agree, keep every record that lies before the damage, truncate a torn tail for
//! real, and refuse damage to history that later records prove was durable.
//!
//! Every journal is written one record per write batch (each append waited), so "a later valid
//! record follows" means "a later write batch follows", which is what makes damage corruption
//! rather than a torn tail (see `journal::scan`).

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use journal::record::framed_len;
use journal::scan::{ScanReport, scan_dir};
use journal::segment::SEGMENT_HEADER_BYTES;
use journal::{Epoch, Journal, JournalConfig, JournalError, Lsn, Record, RecordKind};
use proptest::prelude::*;
use proptest::sample::Index;

const HEADER: u64 = SEGMENT_HEADER_BYTES as u64;
/// Every byte of the segment header is covered by a crc.
const CHECKED_HEADER: u64 = SEGMENT_HEADER_BYTES as u64;
/// Payload of the record appended after recovery.
const AFTER: &[u8] = b"appended after recovery";
/// Largest payload that fits `record_bytes_max = 1024` (62 bytes of framing).
const PAYLOAD_MAX: usize = 1024 - 62;

// ---------------------------------------------------------------------------------------------
// Writing a journal and describing where every record lies.
// ---------------------------------------------------------------------------------------------

/// One record as it was appended.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    lsn: Lsn,
    epoch: Epoch,
    kind: RecordKind,
    payload: Vec<u8>,
}

/// Where one record lies in its segment file.
#[derive(Clone, Copy, Debug)]
struct Extent {
    /// Index into the written records.
    index: usize,
    start: u64,
    end: u64,
}

/// A segment file's bytes and the records in it.
#[derive(Clone, Debug)]
struct SegmentImage {
    name: String,
    bytes: Vec<u8>,
    records: Vec<Extent>,
}

/// A journal as written, kept in memory so that every damaged variant starts from the same bytes.
#[derive(Debug)]
struct Pristine {
    small: bool,
    written: Vec<Written>,
    segments: Vec<SegmentImage>,
}

/// A scratch directory, on the memory file system when there is one: these tests open thousands
/// of damaged journals, and what they check is recovery logic, not the disk, so the syncs that
/// recovery and appending do need not wait for a real device.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn config(small: bool) -> JournalConfig {
    let base = JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    };
    if small {
        JournalConfig {
            segment_bytes_max: 4096,
            record_bytes_max: 1024,
            queue_bytes_max: 8192,
            ..base
        }
    } else {
        base
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The records to write: payload sizes from the strategy, content, kinds and rising epochs from
/// the seed.
fn plan(sizes: &[usize], seed: u64) -> Vec<Written> {
    let mut rng = seed;
    let mut epoch = 1 + splitmix(&mut rng) % 3;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            if splitmix(&mut rng).is_multiple_of(4) {
                epoch += 1;
            }
            let r = splitmix(&mut rng);
            let kind = RecordKind::new((r % 251) as u8, (r >> 8) as u8 % 3);
            let payload = (0..len).map(|_| splitmix(&mut rng) as u8).collect();
            Written {
                lsn: Lsn(i as u64 + 1),
                epoch: Epoch(epoch),
                kind,
                payload,
            }
        })
        .collect()
}

/// Writes the records one write batch each, closes, and reads the segment files back.
fn build(sizes: &[usize], seed: u64, small: bool) -> Pristine {
    let written = plan(sizes, seed);
    let dir = scratch_dir();
    let journal = Journal::open(dir.path(), config(small)).unwrap();
    for w in &written {
        let lsn = journal
            .append(w.epoch, w.kind, &w.payload)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(lsn, w.lsn, "lsns are handed out in order");
    }
    journal.close().unwrap();
    let segments = segment_images(dir.path(), &written);
    Pristine {
        small,
        written,
        segments,
    }
}

fn segment_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

/// Reads every segment and lays the written records out in it, checking the layout adds up.
fn segment_images(dir: &Path, written: &[Written]) -> Vec<SegmentImage> {
    let names = segment_names(dir);
    let firsts: Vec<usize> = names
        .iter()
        .map(|n| n.trim_end_matches(".seg").parse::<usize>().unwrap())
        .collect();
    let mut images = Vec::new();
    for (s, name) in names.iter().enumerate() {
        let bytes = fs::read(dir.join(name)).unwrap();
        let first = firsts[s] - 1;
        let end = firsts.get(s + 1).map_or(written.len(), |f| f - 1);
        let mut offset = HEADER;
        let mut records = Vec::new();
        for (index, w) in written.iter().enumerate().take(end).skip(first) {
            let len = framed_len(w.payload.len()) as u64;
            records.push(Extent {
                index,
                start: offset,
                end: offset + len,
            });
            offset += len;
        }
        assert_eq!(
            offset,
            bytes.len() as u64,
            "segment {name}: the records written do not add up to the file size"
        );
        images.push(SegmentImage {
            name: name.clone(),
            bytes,
            records,
        });
    }
    images
}

/// Writes the segment images into a fresh directory.
fn materialize(segments: &[SegmentImage]) -> tempfile::TempDir {
    let dir = scratch_dir();
    for seg in segments {
        fs::write(dir.path().join(&seg.name), &seg.bytes).unwrap();
    }
    dir
}

// ---------------------------------------------------------------------------------------------
// Reading back and comparing.
// ---------------------------------------------------------------------------------------------

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (name, fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Runs the read-only scan and checks it changed no file.
fn scan_read_only(dir: &Path, small: bool) -> Result<(ScanReport, Vec<Record>), JournalError> {
    let before = snapshot(dir);
    let mut visited = Vec::new();
    let report = scan_dir(dir, config(small).record_bytes_max, |r| {
        visited.push(r.clone())
    });
    assert!(
        before == snapshot(dir),
        "scan_dir modified the journal directory"
    );
    report.map(|r| (r, visited))
}

/// Opens the journal and reads every record.
fn open_and_read(dir: &Path, small: bool) -> Result<(Journal, Vec<Record>), JournalError> {
    let journal = Journal::open(dir, config(small))?;
    let records = journal
        .read_from(Lsn(1))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(
        journal.durable_lsn(),
        Lsn(records.len() as u64),
        "durable lsn after recovery is the last record read"
    );
    Ok((journal, records))
}

/// Asserts that `got` is exactly the first `len` written records.
fn assert_records(got: &[Record], written: &[Written], len: usize, what: &str) {
    assert_eq!(
        got.len(),
        len,
        "{what}: read back {} records, expected the first {len} of {} written",
        got.len(),
        written.len()
    );
    for (rec, w) in got.iter().zip(written) {
        let same = rec.lsn == w.lsn
            && rec.epoch == w.epoch
            && rec.kind == w.kind
            && rec.payload == w.payload;
        assert!(
            same,
            "{what}: record {} read back differs from what was written",
            w.lsn
        );
    }
}

/// After a successful recovery that kept `kept` records, the last ending at byte `boundary` of the
/// last segment: one more append gets the next LSN, lands right at `boundary` (the torn tail was
/// truncated on disk, not only skipped), and the journal then reads back cleanly.
fn append_after_recovery(dir: &Path, p: &Pristine, journal: Journal, kept: usize, boundary: u64) {
    let epoch = p.written.iter().map(|w| w.epoch).max().unwrap_or(Epoch(1));
    let kind = RecordKind::new(9, 1);
    let lsn = journal.append(epoch, kind, AFTER).unwrap().wait().unwrap();
    assert_eq!(
        lsn,
        Lsn(kept as u64 + 1),
        "the first append after recovery takes the next lsn"
    );
    journal.close().unwrap();
    let last = dir.join(&p.segments.last().unwrap().name);
    let framed = framed_len(AFTER.len()) as u64;
    let rolled = boundary + framed > config(p.small).segment_bytes_max;
    let expected = if rolled { boundary } else { boundary + framed };
    assert_eq!(
        fs::metadata(&last).unwrap().len(),
        expected,
        "the last segment does not end where recovery plus one append should leave it"
    );
    let (journal, records) = open_and_read(dir, p.small).unwrap();
    assert_records(&records[..kept], &p.written, kept, "reopen after append");
    assert_eq!(records.len(), kept + 1);
    assert_eq!(records[kept].lsn, lsn);
    assert_eq!(records[kept].payload, AFTER);
    journal.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// (a) + (c): truncation.
// ---------------------------------------------------------------------------------------------

/// Cuts the last segment at `cut` and checks scan, open, and an append after recovery.
fn check_cut(p: &Pristine, cut: u64) {
    let last = p.segments.last().unwrap();
    let before_last: usize = p.segments[..p.segments.len() - 1]
        .iter()
        .map(|s| s.records.len())
        .sum();
    let whole = last.records.iter().filter(|e| e.end <= cut).count();
    let kept = before_last + whole;
    let boundary = last.records[..whole].last().map_or(HEADER, |e| e.end);
    let mut segments = p.segments.clone();
    segments.last_mut().unwrap().bytes.truncate(cut as usize);
    let dir = materialize(&segments);
    let what = format!("cut of {} at byte {cut}", last.name);

    let (report, visited) = scan_read_only(dir.path(), p.small)
        .unwrap_or_else(|e| panic!("{what}: scan_dir refused a cut tail: {e}"));
    assert_records(&visited, &p.written, kept, &what);
    assert_eq!(report.last_lsn, Lsn(kept as u64), "{what}: scan last lsn");
    match &report.torn_tail {
        Some(t) => {
            assert!(cut != boundary, "{what}: a clean cut reported as torn");
            assert_eq!(t.segment, dir.path().join(&last.name), "{what}");
            assert_eq!(t.offset, boundary, "{what}: torn tail offset");
            assert_eq!(t.bytes, cut - boundary, "{what}: torn tail size");
        }
        None => assert_eq!(cut, boundary, "{what}: scan did not report the torn tail"),
    }

    let (journal, records) = open_and_read(dir.path(), p.small)
        .unwrap_or_else(|e| panic!("{what}: open refused a cut tail: {e}"));
    assert_records(&records, &p.written, kept, &what);
    assert_eq!(visited, records, "{what}: scan and open disagree");
    append_after_recovery(dir.path(), p, journal, kept, boundary);
}

/// The offsets to cut at: every byte from the start of the third-last record of the last
/// segment (or the end of its header) to the end of the file.
fn cut_range(p: &Pristine) -> std::ops::RangeInclusive<u64> {
    let last = p.segments.last().unwrap();
    let n = last.records.len();
    let from = last.records[n.saturating_sub(3)..]
        .first()
        .map_or(HEADER, |e| e.start);
    from..=last.bytes.len() as u64
}

fn sizes(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => Just(0usize),
        4 => 1usize..=24,
        3 => 25usize..=max,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Every offset of the last three records of the last segment is cut, in every case; small
    /// segments, so the journal usually spans several.
    #[test]
    fn cutting_small_segments_at_every_offset_keeps_exactly_the_whole_records(
        sizes in prop::collection::vec(sizes(100), 1..=24),
        seed in any::<u64>(),
    ) {
        let p = build(&sizes, seed, true);
        for cut in cut_range(&p) {
            check_cut(&p, cut);
        }
    }

    /// The same with the default limits: one segment.
    #[test]
    fn cutting_one_segment_at_every_offset_keeps_exactly_the_whole_records(
        sizes in prop::collection::vec(sizes(100), 1..=24),
        seed in any::<u64>(),
    ) {
        let p = build(&sizes, seed, false);
        for cut in cut_range(&p) {
            check_cut(&p, cut);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Larger records, up to the record limit, cut at random offsets of the last records.
    #[test]
    fn cutting_large_records_at_random_offsets_keeps_exactly_the_whole_records(
        sizes in prop::collection::vec(sizes(PAYLOAD_MAX), 1..=16),
        seed in any::<u64>(),
        small in any::<bool>(),
        cuts in prop::collection::vec(any::<Index>(), 1..=8),
    ) {
        let p = build(&sizes, seed, small);
        let range = cut_range(&p);
        let span = (range.end() - range.start() + 1) as usize;
        for cut in cuts {
            check_cut(&p, range.start() + cut.index(span) as u64);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) + (c): bit flips.
// ---------------------------------------------------------------------------------------------

/// What a flipped byte belongs to.
#[derive(Debug)]
enum Hit {
    /// Header bytes that are checked (magic, version, prefix crc, first lsn, chain, crc).
    Header,
    /// The reserved header bytes, which nothing reads.
    Reserved,
    /// A record: its extent, and whether it is the very last record of the journal.
    Record(Extent, bool),
}

fn classify(p: &Pristine, seg: usize, offset: u64) -> Hit {
    if offset < CHECKED_HEADER {
        return Hit::Header;
    }
    if offset < HEADER {
        return Hit::Reserved;
    }
    let records = &p.segments[seg].records;
    let pos = records
        .iter()
        .position(|e| e.start <= offset && offset < e.end);
    let e = records[pos.unwrap()];
    let very_last = seg + 1 == p.segments.len() && pos == Some(records.len() - 1);
    Hit::Record(e, very_last)
}

/// Flips one bit and checks scan and open against what the damaged byte allows.
fn check_flip(p: &Pristine, seg: usize, offset: u64, bit: u8) {
    let mut segments = p.segments.clone();
    segments[seg].bytes[offset as usize] ^= 1 << bit;
    let dir = materialize(&segments);
    let path = dir.path().join(&p.segments[seg].name);
    let what = format!(
        "bit {bit} of byte {offset} of {} flipped",
        p.segments[seg].name
    );
    let hit = classify(p, seg, offset);
    let before_seg: usize = p.segments[..seg].iter().map(|s| s.records.len()).sum();
    // The Corrupt offset expected, and how many records a successful open must yield (None:
    // open must fail).
    let (corrupt_at, ok_len) = match hit {
        Hit::Header => (0, None),
        Hit::Reserved => (0, Some(p.written.len())),
        Hit::Record(e, true) => (e.start, Some(e.index)),
        Hit::Record(e, false) => (e.start, None),
    };
    let check_corrupt = |e: &JournalError, who: &str| match e {
        JournalError::Corrupt {
            segment,
            offset: at,
            ..
        } => {
            assert_eq!(segment, &path, "{what}: {who} names the wrong segment: {e}");
            assert!(*at <= offset, "{what}: {who} offset {at} is after the flip");
            assert_eq!(*at, corrupt_at, "{what}: {who}: {e}");
        }
        other => panic!("{what} ({hit:?}): {who} failed with {other:?}, not Corrupt: {other}"),
    };

    let scanned = scan_read_only(dir.path(), p.small);
    let opened = open_and_read(dir.path(), p.small);
    match (scanned, opened, ok_len) {
        (Err(se), Err(oe), _) => {
            check_corrupt(&se, "scan_dir");
            check_corrupt(&oe, "Journal::open");
        }
        (Ok((report, visited)), Ok((journal, records)), Some(len)) => {
            assert_records(&records, &p.written, len, &what);
            assert_eq!(visited, records, "{what}: scan and open disagree");
            let lost = len < p.written.len();
            assert_eq!(
                report.torn_tail.is_some(),
                lost,
                "{what}: {:?}",
                report.torn_tail
            );
            if let Some(t) = &report.torn_tail {
                assert_eq!((&t.segment, t.offset), (&path, corrupt_at), "{what}");
            }
            assert!(
                len >= before_seg,
                "{what}: lost records of earlier segments"
            );
            let boundary = if lost {
                corrupt_at
            } else {
                p.segments.last().unwrap().bytes.len() as u64
            };
            append_after_recovery(dir.path(), p, journal, len, boundary);
        }
        (Ok(_), Ok((_, records)), None) => panic!(
            "{what} ({hit:?}): damage followed by later records must be Corrupt, \
             but open succeeded with {} of {} records",
            records.len(),
            p.written.len()
        ),
        (scanned, opened, _) => panic!(
            "{what} ({hit:?}): scan_dir and open disagree: scan {:?}, open {:?}",
            scanned.map(|(r, _)| r.last_lsn),
            opened.map(|(_, r)| r.len())
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// One flipped bit anywhere in any segment: Corrupt naming the file and record, or (only in
    /// the very last record, or the unused header bytes) a recovery that loses nothing before it.
    #[test]
    fn a_flipped_bit_is_corruption_or_a_torn_last_record(
        sizes in prop::collection::vec(sizes(PAYLOAD_MAX), 1..=20),
        seed in any::<u64>(),
        small in any::<bool>(),
        seg in any::<Index>(),
        byte in any::<Index>(),
        bit in 0u8..8,
    ) {
        let p = build(&sizes, seed, small);
        let seg = seg.index(p.segments.len());
        let offset = byte.index(p.segments[seg].bytes.len()) as u64;
        check_flip(&p, seg, offset, bit);
    }
}

/// Every bit of the header bytes of every segment, flipped one at a time, is
/// `Corrupt` at offset 0 of that segment — from open and from the read-only scan alike.
#[test]
fn every_checked_header_bit_flip_is_corruption() {
    let sizes = vec![700; 12];
    let p = build(&sizes, 7, true);
    assert!(
        p.segments.len() >= 3,
        "the journal must span several segments"
    );
    let mut wrong = Vec::new();
    for (s, seg) in p.segments.iter().enumerate() {
        for offset in 0..CHECKED_HEADER {
            for bit in 0..8u8 {
                let mut segments = p.segments.clone();
                segments[s].bytes[offset as usize] ^= 1 << bit;
                let dir = materialize(&segments);
                let path = dir.path().join(&seg.name);
                let scanned = scan_read_only(dir.path(), true).err();
                let opened = Journal::open(dir.path(), config(true)).err();
                for (who, result) in [("scan_dir", scanned), ("open", opened)] {
                    match result {
                        Some(JournalError::Corrupt {
                            segment, offset: 0, ..
                        }) if segment == path => {}
                        other => wrong.push(format!(
                            "{who}: {} byte {offset} bit {bit}: {other:?}",
                            seg.name
                        )),
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} header bit flips were not reported as Corrupt at offset 0, e.g.:\n{}",
        wrong.len(),
        p.segments.len() as u64 * CHECKED_HEADER * 8 * 2,
        wrong[..wrong.len().min(8)].join("\n")
    );
}

/// A power loss while a batch written by `append_nowait` (never synced on its own) and the batch
/// after it were both unsynced may persist the later batch's page and not the earlier one's. No
/// record of either was ever acknowledged, so this is a torn tail: open must truncate it, not
/// refuse to start.
///
/// The disk state is simulated: the journal is written normally, then one 4 KiB page lying wholly
/// inside the `append_nowait` record is zeroed, as if the kernel had not written it back.
#[test]
fn unsynced_nowait_batch_torn_by_power_loss_is_a_torn_tail() {
    let dir = scratch_dir();
    let journal = Journal::open(dir.path(), config(false)).unwrap();
    let kind = RecordKind::new(1, 1);
    for i in 0..3u8 {
        journal
            .append(Epoch(1), kind, &[i; 100])
            .unwrap()
            .wait()
            .unwrap();
    }
    // The nowait record, written by the flusher in a batch of its own, without a sync.
    let batches = journal.stats().batches;
    journal
        .append_nowait(Epoch(1), kind, &[0xAB; 10_000])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while journal.stats().batches == batches {
        assert!(
            Instant::now() < deadline,
            "the nowait batch was never written"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        journal.durable_lsn(),
        Lsn(3),
        "a nowait batch is not synced"
    );
    // The next batch: a durable append, written after the nowait batch with no sync between.
    journal
        .append(Epoch(1), kind, b"later batch")
        .unwrap()
        .wait()
        .unwrap();
    journal.close().unwrap();
    // A power loss leaves no clean-close mark.
    fs::remove_file(dir.path().join(journal::clean::CLEAN_FILE)).unwrap();

    let seg = dir.path().join(&segment_names(dir.path())[0]);
    let mut bytes = fs::read(&seg).unwrap();
    let nowait_start = HEADER + 3 * framed_len(100) as u64;
    let page = nowait_start.div_ceil(4096) * 4096;
    assert!(page + 4096 <= nowait_start + framed_len(10_000) as u64);
    bytes[page as usize..page as usize + 4096].fill(0);
    fs::write(&seg, &bytes).unwrap();

    match Journal::open(dir.path(), config(false)) {
        Ok(journal) => {
            let records: Vec<_> = journal
                .read_from(Lsn(1))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(records.len(), 3, "the three synced records survive");
        }
        Err(e) => panic!(
            "a power loss before the sync of two unsynced batches made the journal \
             unopenable: {e}"
        ),
    }
}

/// Cutting the last segment back to its bare header (a crash right after a rollover) keeps every
/// record of the earlier segments, and the next append lands in that segment.
#[test]
fn cut_to_the_bare_header_of_the_last_segment_keeps_earlier_segments() {
    let sizes = vec![900; 9];
    let p = build(&sizes, 11, true);
    assert!(
        p.segments.len() >= 3,
        "the journal must span several segments"
    );
    check_cut(&p, HEADER);
}
