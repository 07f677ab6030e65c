//! Reading segments back: the record stream of one segment, and the whole-directory scan that
//! opening, `verify` and `inspect` share.
//!
//! The scan walks every segment in LSN order and checks that each one continues the previous one
//! (first LSN and chain value in its header) and that every record passes its checks. When a record
//! fails, the question is whether it is a **torn tail** — the unfinished last write of a process
//! that crashed, which is truncated — or **corruption** of history that was already durable, which
//! stops everything. The rule:
//!
//! 1. Damage in any segment but the last is corruption: the flusher syncs a segment before it
//!    writes the first record of the next one, so everything in a non-last segment was durable.
//! 2. Damage in the last segment is a torn tail unless a valid record of a *later sync group*
//!    follows it. A record's sync group is the run of records written since the last sync before
//!    its write (its `batch_offset` is its distance from the group's first record), so a valid
//!    record of a later group proves that the damaged record had been synced. Valid records of
//!    the *same* group may follow a damaged one when the group's writes were interrupted (the
//!    kernel writes pages in any order); those records were never synced, so nobody was told they
//!    were durable, and the tail from the damage on is truncated.
//!
//! The search for later valid records scans every byte offset after the damage in bounded windows,
//! computing a crc only where the length and LSN fields are plausible.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::clean::{self, CleanMark};
use crate::error::{JournalError, Result};
use crate::record::{self, FrameError, HEADER_BYTES, OVERHEAD_BYTES};
use crate::segment::{self, SEGMENT_HEADER_BYTES, SegmentFile, SegmentHeader};
use crate::types::{ChainHash, Epoch, Lsn, Record};

/// A record that failed its checks, and where.
#[derive(Debug)]
pub(crate) struct Damage {
    pub offset: u64,
    pub error: FrameError,
}

/// Streams the records of one segment, checking each.
pub(crate) struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    next_lsn: Lsn,
    chain: ChainHash,
    record_bytes_max: u64,
}

impl SegmentReader {
    /// Opens a segment and checks its header.
    pub fn open(path: &Path, record_bytes_max: u64) -> Result<(SegmentReader, SegmentHeader)> {
        let header = SegmentHeader::read(path)?;
        let mut file =
            File::open(path).map_err(|e| JournalError::io("open journal segment", path, e))?;
        std::io::Seek::seek(&mut file, io::SeekFrom::Start(SEGMENT_HEADER_BYTES as u64))
            .map_err(|e| JournalError::io("seek journal segment", path, e))?;
        let reader = SegmentReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(256 * 1024, file),
            offset: SEGMENT_HEADER_BYTES as u64,
            next_lsn: header.first_lsn,
            chain: header.prev_chain,
            record_bytes_max,
        };
        Ok((reader, header))
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The chain value after the last record read.
    pub fn chain(&self) -> ChainHash {
        self.chain
    }

    /// The LSN the next record must have.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// The next record; `Ok(None)` at a clean end of the segment, `Ok(Some(Err))` at damage.
    pub fn next_record(&mut self) -> Result<Option<Result<Record, Damage>>> {
        let at = self.offset;
        let mut len_bytes = [0u8; 4];
        let got = self.fill(&mut len_bytes)?;
        if got == 0 {
            return Ok(None);
        }
        let damage = |error| Ok(Some(Err(Damage { offset: at, error })));
        if got < 4 {
            return damage(FrameError::Truncated);
        }
        let len = match record::check_len(u32::from_le_bytes(len_bytes), self.record_bytes_max) {
            Ok(len) => len,
            Err(e) => return damage(e),
        };
        let mut rest = vec![0u8; len];
        if self.fill(&mut rest)? < len {
            return damage(FrameError::Truncated);
        }
        match record::decode(&rest, self.next_lsn, &self.chain) {
            Ok(rec) => {
                self.offset += 4 + len as u64;
                self.next_lsn = rec.lsn.next();
                self.chain = rec.chain;
                Ok(Some(Ok(rec)))
            }
            Err(e) => damage(e),
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(JournalError::io("read journal segment", &self.path, e)),
            }
        }
        Ok(filled)
    }
}

/// One segment as found by a scan.
#[derive(Clone, Debug)]
pub struct ScannedSegment {
    /// The file.
    pub path: PathBuf,
    /// LSN of its first record (from its header).
    pub first_lsn: Lsn,
    /// LSN of its last valid record (`first_lsn - 1` when it holds none).
    pub last_lsn: Lsn,
    /// Byte offset where its valid records end.
    pub end_offset: u64,
    /// Size of the file.
    pub file_bytes: u64,
}

/// The end of the last segment that is not a whole valid record and will be (or was) truncated.
#[derive(Clone, Debug)]
pub struct TornTail {
    /// The segment file.
    pub segment: PathBuf,
    /// Where the valid records end.
    pub offset: u64,
    /// How many bytes follow that offset.
    pub bytes: u64,
    /// What check the first discarded bytes failed.
    pub reason: String,
}

/// What a scan of a journal directory found.
#[derive(Clone, Debug)]
pub struct ScanReport {
    /// Every segment in LSN order.
    pub segments: Vec<ScannedSegment>,
    /// A torn tail, when there is one.
    pub torn_tail: Option<TornTail>,
    /// LSN of the last valid record (`Lsn::ZERO` in an empty journal).
    pub last_lsn: Lsn,
    /// Chain value after it.
    pub last_chain: ChainHash,
    /// The epoch floor: the highest epoch of any record or segment header.
    pub last_epoch: Epoch,
    /// Leftover temporary files of an interrupted segment creation or close.
    pub leftovers: Vec<PathBuf>,
    /// The clean-close mark the journal was held to, when it had one (see [`crate::clean`]).
    pub clean_close: Option<CleanMark>,
}

impl ScanReport {
    /// Number of valid records.
    pub fn records(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.last_lsn.0 + 1 - s.first_lsn.0)
            .sum()
    }

    /// LSN of the first retained record (or of the next record, in an empty journal).
    pub fn first_lsn(&self) -> Lsn {
        self.segments.first().map(|s| s.first_lsn).unwrap_or(Lsn(1))
    }
}

/// Scans a journal directory without changing it, handing each valid record to `visit`.
///
/// Returns the report, or [`JournalError::Corrupt`] naming the segment and offset of damage that
/// is not a torn tail.
///
/// With a clean-close mark ([`crate::clean`]) in the directory, the journal must end exactly at
/// the marked LSN and chain value, with no damage at all: a torn tail after a clean close is
/// reported as [`JournalError::Corrupt`] too. (A live journal removes its mark before it writes
/// anything; a scan that finds the mark gone by the time it decides treats the journal as
/// unmarked.)
pub fn scan_dir(
    dir: &Path,
    record_bytes_max: u64,
    visit: impl FnMut(&Record),
) -> Result<ScanReport> {
    scan_dir_with(dir, record_bytes_max, visit, 1)
}

/// [`scan_dir`] without a visitor, checking the sealed segments (every one but the last) on up
/// to `threads` threads first: each is read and checked on its own, from the chain value its
/// header carries. The scan in LSN order then takes a clean segment's summary instead of
/// reading it again (it still checks that each segment continues the one before), and reads
/// a damaged one as [`scan_dir`] would, so the verdict and every error are the same; only the
/// time differs. The records are checked exactly as much: every crc and every chain value.
pub fn scan_dir_parallel(dir: &Path, record_bytes_max: u64, threads: usize) -> Result<ScanReport> {
    scan_dir_with(dir, record_bytes_max, |_| {}, threads.max(1))
}

fn scan_dir_with(
    dir: &Path,
    record_bytes_max: u64,
    mut visit: impl FnMut(&Record),
    threads: usize,
) -> Result<ScanReport> {
    let listing = segment::list_dir(dir)?;
    let mark = clean::read(dir)?;
    let mut report = ScanReport {
        segments: Vec::new(),
        torn_tail: None,
        last_lsn: Lsn::ZERO,
        last_chain: ChainHash::GENESIS,
        last_epoch: Epoch(0),
        leftovers: listing.leftovers,
        clean_close: mark,
    };
    if mark.is_some() && listing.segments.is_empty() && clean::read(dir)?.is_some() {
        return Err(JournalError::corrupt(
            clean::mark_path(dir),
            0,
            "the journal was closed cleanly, yet it holds no segment (segments were removed)",
        ));
    }
    let mut scan = Scan {
        dir,
        record_bytes_max,
        mark_end: None,
    };
    let count = listing.segments.len();
    let sealed = count.saturating_sub(1);
    let mut summaries = match threads {
        1 => Vec::new(),
        n => check_sealed(&listing.segments[..sealed], record_bytes_max, mark, n),
    };
    summaries.resize_with(count, || None);
    for (i, seg) in listing.segments.iter().enumerate() {
        match summaries[i].take() {
            Some(summary) => scan.take_summary(seg, summary, &mut report)?,
            None => scan.segment(seg, i + 1 == count, &mut report, &mut visit)?,
        }
    }
    scan.check_clean_end(&mut report)?;
    Ok(report)
}

/// What reading one sealed segment on its own found, when every record in it was whole and
/// valid.
struct SealedSummary {
    header: SegmentHeader,
    last_lsn: Lsn,
    last_chain: ChainHash,
    max_epoch: Epoch,
    end_offset: u64,
    file_bytes: u64,
    /// Where the record at the clean-close mark's LSN ends, when this segment holds it.
    mark_end: Option<u64>,
}

/// Reads and checks `segments` on up to `threads` threads; a clean one gets its summary, a
/// damaged or unreadable one `None` (the scan in order reads it again and reports it).
fn check_sealed(
    segments: &[SegmentFile],
    record_bytes_max: u64,
    mark: Option<CleanMark>,
    threads: usize,
) -> Vec<Option<SealedSummary>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<SealedSummary>>> = segments
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    let marked_lsn = mark.map(|m| m.last_lsn);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(segments.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(seg) = segments.get(i) else { return };
                    let summary = summarize_sealed(seg, record_bytes_max, marked_lsn);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = summary;
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| slot.into_inner().ok().flatten())
        .collect()
}

fn summarize_sealed(
    seg: &SegmentFile,
    record_bytes_max: u64,
    marked_lsn: Option<Lsn>,
) -> Option<SealedSummary> {
    let (mut reader, header) = SegmentReader::open(&seg.path, record_bytes_max).ok()?;
    let file_bytes = file_len(&seg.path).ok()?;
    let mut max_epoch = header.epoch;
    let mut mark_end = None;
    while let Some(next) = reader.next_record().ok()? {
        let rec = next.ok()?;
        max_epoch = max_epoch.max(rec.epoch);
        if Some(rec.lsn) == marked_lsn {
            mark_end = Some(reader.offset());
        }
    }
    Some(SealedSummary {
        header,
        last_lsn: reader.next_lsn().prev(),
        last_chain: reader.chain(),
        max_epoch,
        end_offset: reader.offset(),
        file_bytes,
        mark_end,
    })
}

/// What a directory scan carries from one segment to the next.
struct Scan<'a> {
    dir: &'a Path,
    record_bytes_max: u64,
    /// Where the record at the marked LSN ends (segment and offset), once it has been read.
    mark_end: Option<(PathBuf, u64)>,
}

impl Scan<'_> {
    fn segment(
        &mut self,
        seg: &SegmentFile,
        is_last: bool,
        report: &mut ScanReport,
        visit: &mut impl FnMut(&Record),
    ) -> Result<()> {
        scan_segment(self, seg, is_last, report, visit)
    }

    /// Takes a sealed segment's summary from [`check_sealed`] in place of reading it: the same
    /// continuity check and the same bookkeeping as [`scan_segment`] for a clean segment.
    fn take_summary(
        &mut self,
        seg: &SegmentFile,
        summary: SealedSummary,
        report: &mut ScanReport,
    ) -> Result<()> {
        check_continuity(seg, &summary.header, report)?;
        report.last_epoch = report.last_epoch.max(summary.max_epoch);
        if let Some(offset) = summary.mark_end {
            self.mark_end = Some((seg.path.clone(), offset));
        }
        report.last_lsn = summary.last_lsn;
        report.last_chain = summary.last_chain;
        report.segments.push(ScannedSegment {
            path: seg.path.clone(),
            first_lsn: summary.header.first_lsn,
            last_lsn: summary.last_lsn,
            end_offset: summary.end_offset,
            file_bytes: summary.file_bytes,
        });
        Ok(())
    }

    /// Whether the journal is still held to its clean-close mark: it has one, and it is still on
    /// disk (a live journal clears it before writing; then the scan judges it as unmarked).
    fn still_marked(&self, report: &mut ScanReport) -> Result<bool> {
        if report.clean_close.is_none() {
            return Ok(false);
        }
        if clean::read(self.dir)?.is_none() {
            report.clean_close = None;
            return Ok(false);
        }
        Ok(true)
    }

    /// After a clean close the journal must end exactly at the marked LSN and chain value.
    fn check_clean_end(&self, report: &mut ScanReport) -> Result<()> {
        let Some(mark) = report.clean_close else {
            return Ok(());
        };
        if report.last_lsn == mark.last_lsn && report.last_chain == mark.last_chain {
            return Ok(());
        }
        if !self.still_marked(report)? {
            return Ok(());
        }
        let Some(last) = report.segments.last() else {
            return Ok(());
        };
        let (segment, offset, why) = match &self.mark_end {
            Some((path, offset)) if report.last_lsn > mark.last_lsn => (
                path.clone(),
                *offset,
                format!(
                    "records up to lsn {} follow lsn {}, where the journal was closed cleanly",
                    report.last_lsn, mark.last_lsn
                ),
            ),
            _ if report.last_lsn != mark.last_lsn => (
                last.path.clone(),
                last.end_offset,
                format!(
                    "the journal ends at lsn {}, but it was closed cleanly at lsn {}",
                    report.last_lsn, mark.last_lsn
                ),
            ),
            _ => (
                last.path.clone(),
                last.end_offset,
                format!(
                    "the chain value after lsn {} is not the one recorded at the clean close",
                    mark.last_lsn
                ),
            ),
        };
        Err(JournalError::corrupt(segment, offset, why))
    }
}

fn scan_segment(
    scan: &mut Scan<'_>,
    seg: &SegmentFile,
    is_last: bool,
    report: &mut ScanReport,
    visit: &mut impl FnMut(&Record),
) -> Result<()> {
    let record_bytes_max = scan.record_bytes_max;
    let (mut reader, header) = SegmentReader::open(&seg.path, record_bytes_max)?;
    check_continuity(seg, &header, report)?;
    report.last_epoch = report.last_epoch.max(header.epoch);
    let file_bytes = file_len(&seg.path)?;
    let marked_lsn = report.clean_close.map(|m| m.last_lsn);
    loop {
        match reader.next_record()? {
            None => break,
            Some(Ok(rec)) => {
                report.last_epoch = report.last_epoch.max(rec.epoch);
                if Some(rec.lsn) == marked_lsn {
                    scan.mark_end = Some((seg.path.clone(), reader.offset()));
                }
                visit(&rec);
            }
            Some(Err(damage)) => {
                // The file may have grown since it was measured (a live journal being scanned).
                let file_bytes = file_len(&seg.path)?.max(file_bytes);
                check_over_limit(&seg.path, &damage, file_bytes, record_bytes_max)?;
                judge_damage(seg, is_last, &reader, &damage, file_bytes, record_bytes_max)?;
                if scan.still_marked(report)? {
                    let lsn = report.clean_close.map_or(Lsn::ZERO, |m| m.last_lsn);
                    return Err(JournalError::corrupt(
                        &seg.path,
                        damage.offset,
                        format!(
                            "{} at the end of a journal closed cleanly at lsn {lsn} (a clean \
                             close leaves no torn tail)",
                            damage.error
                        ),
                    ));
                }
                report.torn_tail = Some(TornTail {
                    segment: seg.path.clone(),
                    offset: damage.offset,
                    bytes: file_bytes.saturating_sub(damage.offset),
                    reason: damage.error.to_string(),
                });
                break;
            }
        }
    }
    report.last_lsn = reader.next_lsn().prev();
    report.last_chain = reader.chain();
    report.segments.push(ScannedSegment {
        path: seg.path.clone(),
        first_lsn: header.first_lsn,
        last_lsn: reader.next_lsn().prev(),
        end_offset: reader.offset(),
        file_bytes,
    });
    Ok(())
}

/// The largest LSN a segment may start at: far beyond any real journal, and far enough below
/// `u64::MAX` that no arithmetic on LSNs read from disk can overflow.
const LSN_MAX: Lsn = Lsn(1 << 62);

fn file_len(path: &Path) -> Result<u64> {
    let meta =
        std::fs::metadata(path).map_err(|e| JournalError::io("stat journal segment", path, e))?;
    Ok(meta.len())
}

fn check_continuity(seg: &SegmentFile, header: &SegmentHeader, report: &ScanReport) -> Result<()> {
    if header.first_lsn != seg.first_lsn
        || header.first_lsn == Lsn::ZERO
        || header.first_lsn > LSN_MAX
    {
        return Err(JournalError::corrupt(
            &seg.path,
            0,
            format!(
                "header names first lsn {} but the file name says {}",
                header.first_lsn, seg.first_lsn
            ),
        ));
    }
    if report.segments.is_empty() {
        return Ok(());
    }
    if header.first_lsn != report.last_lsn.next() {
        return Err(JournalError::corrupt(
            &seg.path,
            0,
            format!(
                "segment starts at lsn {} but the previous segment ends at lsn {} (a segment is missing or damaged)",
                header.first_lsn, report.last_lsn
            ),
        ));
    }
    if header.prev_chain != report.last_chain {
        return Err(JournalError::corrupt(
            &seg.path,
            0,
            "segment does not continue the chain of the previous segment",
        ));
    }
    Ok(())
}

/// Decides whether damage is a torn tail (returns `Ok`) or corruption (returns the error).
fn judge_damage(
    seg: &SegmentFile,
    is_last: bool,
    reader: &SegmentReader,
    damage: &Damage,
    file_bytes: u64,
    record_bytes_max: u64,
) -> Result<()> {
    let corrupt = |why: String| Err(JournalError::corrupt(&seg.path, damage.offset, why));
    if !is_last {
        return corrupt(format!(
            "{} in a segment that later segments follow",
            damage.error
        ));
    }
    let file = File::open(&seg.path)
        .map_err(|e| JournalError::io("open journal segment", &seg.path, e))?;
    let expected = reader.next_lsn();
    let later = find_later_batch(&file, damage.offset, file_bytes, expected, record_bytes_max)
        .map_err(|e| JournalError::io("read journal segment", &seg.path, e))?;
    match later {
        Some((offset, lsn)) => corrupt(format!(
            "{}, yet the valid record {lsn} of a later sync group follows at byte offset {offset}",
            damage.error
        )),
        None => Ok(()),
    }
}

/// Bytes of the window the follower search reads at a time.
const SEARCH_WINDOW_BYTES: usize = 1 << 20;

/// Searches the bytes after `from` for a valid record of a sync group that began after
/// `expected` (the LSN of the damaged record). Returns its offset and LSN.
fn find_later_batch(
    file: &File,
    from: u64,
    file_bytes: u64,
    expected: Lsn,
    record_bytes_max: u64,
) -> io::Result<Option<(u64, Lsn)>> {
    let remaining = file_bytes.saturating_sub(from);
    let lsn_max = expected
        .0
        .saturating_add(remaining / OVERHEAD_BYTES as u64 + 1);
    let window_bytes = remaining.min((SEARCH_WINDOW_BYTES + HEADER_BYTES) as u64);
    let mut window = vec![0u8; window_bytes as usize];
    let mut chunk = Vec::new();
    let mut pos = from + 1;
    while pos + OVERHEAD_BYTES as u64 <= file_bytes {
        let n = (window.len() as u64).min(file_bytes - pos) as usize;
        file.read_exact_at(&mut window[..n], pos)?;
        let usable = n + 1 - HEADER_BYTES.min(n + 1);
        for i in 0..usable {
            let at = pos + i as u64;
            let h = &window[i..i + HEADER_BYTES];
            let Ok(len) = record::check_len(record::le_u32(h), record_bytes_max) else {
                continue;
            };
            let lsn = record::le_u64(&h[8..16]);
            let batch_start = lsn.saturating_sub(u64::from(record::le_u32(&h[24..28])));
            let plausible = at + 4 + len as u64 <= file_bytes
                && lsn > expected.0
                && lsn <= lsn_max
                && batch_start > expected.0;
            if plausible && frame_crc_matches(file, at, len as u64, &mut chunk)? {
                return Ok(Some((at, Lsn(lsn))));
            }
        }
        if usable == 0 {
            break;
        }
        pos += usable as u64;
    }
    Ok(None)
}

/// Bytes read at a time when a crc is computed straight from the file.
const CRC_CHUNK_BYTES: u64 = 64 * 1024;

/// Whether the frame at `at`, whose length field says `len`, has a matching crc. Streams the crc
/// through `chunk` (at most `CRC_CHUNK_BYTES`), so an implausible length costs no allocation.
fn frame_crc_matches(file: &File, at: u64, len: u64, chunk: &mut Vec<u8>) -> io::Result<bool> {
    let mut stored = [0u8; 4];
    file.read_exact_at(&mut stored, at + 4)?;
    let mut crc = crc32fast::Hasher::new();
    let mut pos = at + 8;
    let end = at + 4 + len;
    while pos < end {
        let n = (end - pos).min(CRC_CHUNK_BYTES) as usize;
        chunk.resize(n, 0);
        file.read_exact_at(chunk, pos)?;
        crc.update(chunk);
        pos += n as u64;
    }
    Ok(crc.finalize() == u32::from_le_bytes(stored))
}

/// When the damage is a length over `record_bytes_max` whose record is whole and passes its crc,
/// the journal was written with a larger limit: that is an error to report, not damage to
/// truncate (which would delete a durable record).
fn check_over_limit(
    seg: &Path,
    damage: &Damage,
    file_bytes: u64,
    record_bytes_max: u64,
) -> Result<()> {
    let FrameError::BadLength(len) = damage.error else {
        return Ok(());
    };
    let bytes = u64::from(len) + 4;
    if bytes <= record_bytes_max || damage.offset + bytes > file_bytes {
        return Ok(());
    }
    let file = File::open(seg).map_err(|e| JournalError::io("open journal segment", seg, e))?;
    let whole = frame_crc_matches(&file, damage.offset, u64::from(len), &mut Vec::new())
        .map_err(|e| JournalError::io("read journal segment", seg, e))?;
    if !whole {
        return Ok(());
    }
    Err(JournalError::RecordOverLimit {
        segment: seg.to_path_buf(),
        offset: damage.offset,
        bytes,
        max: record_bytes_max,
    })
}
