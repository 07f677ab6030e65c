//! Reading the journal from any LSN, as recovery and replication do.
//!
//! [`JournalReader`] walks the retained segments from the one holding the requested LSN, checks
//! every record (length limit, crc, LSN, chain) and every segment boundary (first LSN and chain
//! value in the next header), and yields the records from the requested LSN up to the durable LSN
//! the journal had when the reader was made. Records before the requested LSN in its segment are
//! read and checked too: the chain cannot be verified otherwise.

use std::path::PathBuf;

use crate::error::{JournalError, Result};
use crate::scan::SegmentReader;
use crate::segment::SegmentFile;
use crate::types::{ChainHash, Lsn, Record};

/// An iterator over checked records; see the module docs.
pub struct JournalReader {
    segments: Vec<SegmentFile>,
    next_segment: usize,
    current: Option<SegmentReader>,
    from: Lsn,
    upto: Lsn,
    /// LSN and chain value the next segment must continue.
    expect: Option<(Lsn, ChainHash)>,
    record_bytes_max: u64,
    failed: bool,
    /// The first LSN of the segment opened last (to find the next one in a refreshed list).
    opened: Option<Lsn>,
}

impl JournalReader {
    pub(crate) fn new(
        segments: Vec<SegmentFile>,
        from: Lsn,
        upto: Lsn,
        record_bytes_max: u64,
    ) -> Result<JournalReader> {
        let oldest = segments.first().map(|s| s.first_lsn).unwrap_or(Lsn(1));
        if from < oldest && from <= upto {
            return Err(JournalError::LsnNotRetained {
                requested: from,
                oldest,
            });
        }
        let start = segments
            .partition_point(|s| s.first_lsn <= from)
            .saturating_sub(1);
        Ok(JournalReader {
            segments,
            next_segment: start,
            current: None,
            from,
            upto,
            expect: None,
            record_bytes_max,
            failed: false,
            opened: None,
        })
    }

    /// Goes on to `upto` (at least the current end) over `segments`, a newer list of the
    /// journal's segments: the records made durable since are yielded next, and nothing is
    /// read again ([`crate::Journal::follow`]).
    pub(crate) fn extend(&mut self, segments: Vec<SegmentFile>, upto: Lsn) {
        self.next_segment = match self.opened {
            Some(first) => segments.partition_point(|s| s.first_lsn <= first),
            None => segments
                .partition_point(|s| s.first_lsn <= self.from)
                .saturating_sub(1),
        };
        self.segments = segments;
        self.upto = self.upto.max(upto);
    }

    /// The last LSN this reader will yield.
    pub fn upto(&self) -> Lsn {
        self.upto
    }

    fn open_next_segment(&mut self) -> Result<bool> {
        let Some(seg) = self.segments.get(self.next_segment) else {
            return Ok(false);
        };
        self.next_segment += 1;
        self.opened = Some(seg.first_lsn);
        let (reader, header) =
            SegmentReader::open(&seg.path, self.record_bytes_max).map_err(|e| match e {
                JournalError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    JournalError::LsnNotRetained {
                        requested: self.from,
                        oldest: seg.first_lsn.next(),
                    }
                }
                other => other,
            })?;
        if let Some((lsn, chain)) = self.expect
            && (header.first_lsn != lsn || header.prev_chain != chain)
        {
            return Err(JournalError::corrupt(
                &seg.path,
                0,
                format!(
                    "segment does not continue the previous one (expected lsn {lsn} and its chain)"
                ),
            ));
        }
        self.current = Some(reader);
        Ok(true)
    }

    /// The segments ran out: fine when every record up to `upto` was read, damage otherwise.
    fn ended_early(&self) -> Result<Option<Record>> {
        match (self.expect, self.segments.last()) {
            (Some((next, _)), Some(last)) if next <= self.upto => Err(JournalError::corrupt(
                &last.path,
                0,
                format!(
                    "the journal ends before lsn {next}, but records up to lsn {} were durable",
                    self.upto
                ),
            )),
            _ => Ok(None),
        }
    }

    fn step(&mut self) -> Result<Option<Record>> {
        loop {
            let Some(reader) = self.current.as_mut() else {
                if !self.open_next_segment()? {
                    return self.ended_early();
                }
                continue;
            };
            if reader.next_lsn() > self.upto {
                return Ok(None);
            }
            match reader.next_record()? {
                Some(Ok(rec)) if rec.lsn < self.from => continue,
                Some(Ok(rec)) => return Ok(Some(rec)),
                Some(Err(damage)) => {
                    let path: PathBuf = self.segments[self.next_segment - 1].path.clone();
                    return Err(JournalError::corrupt(
                        path,
                        damage.offset,
                        damage.error.to_string(),
                    ));
                }
                None => {
                    self.expect = Some((reader.next_lsn(), reader.chain()));
                    self.current = None;
                }
            }
        }
    }
}

impl Iterator for JournalReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(rec) => rec.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
