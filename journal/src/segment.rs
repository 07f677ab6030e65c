//! Segment files: naming, the header, creation, and listing a journal directory.
//!
//! A journal directory holds `LOCK` and segment files named by the LSN of their first record,
//! zero-padded so that names sort in LSN order: `00000000000000000001.seg`. Each segment starts with
//! an 80-byte header:
//!
//! ```text
//! offset size field
//!      0    8 magic "CNCDJRNL"
//!      8    4 format version (1)
//!     12    4 crc32 of bytes 0..12        } the prefix: the same in every format version
//!     16    8 first lsn
//!     24    8 epoch floor: the epoch of the first record written to it (0 in a new journal)
//!     32   32 chain value before the first record
//!     64   12 reserved, zero
//!     76    4 crc32 of bytes 0..76
//! ```
//!
//! The 16-byte prefix checks itself, so a damaged version field is reported as corruption, while
//! an intact prefix with a newer version is reported as a newer format — whatever layout that
//! version gives the rest of the header.
//!
//! The chain value in the header makes every segment verifiable on its own, so deleting the
//! segments below a checkpoint does not break verification of the rest; the epoch keeps the
//! journal's epoch floor when the records that carried it are deleted (or torn off).
//!
//! A segment is created as `NAME.seg.tmp`, its header written and synced, then renamed into place
//! and the directory synced: a segment file that exists always has a whole header. Leftover
//! `.tmp` files are the journal's own and are removed when it opens for writing.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{JournalError, Result};
use crate::record::{le_u32, le_u64};
use crate::types::{ChainHash, Epoch, Lsn};

/// Bytes of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 80;
/// The newest segment format this program reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"CNCDJRNL";
const SUFFIX: &str = ".seg";
const TMP_SUFFIX: &str = ".seg.tmp";
/// Name of the lock file in a journal directory.
pub const LOCK_FILE: &str = "LOCK";

/// What a segment header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// LSN of the first record in the segment.
    pub first_lsn: Lsn,
    /// The epoch floor: the epoch of the first record written to the segment. No record in it or
    /// after it has a lower one, even when that record is later torn off or deleted.
    pub epoch: Epoch,
    /// Chain value before that record.
    pub prev_chain: ChainHash,
}

impl SegmentHeader {
    /// The header bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut b = [0u8; SEGMENT_HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let prefix_crc = crc32fast::hash(&b[0..12]);
        b[12..16].copy_from_slice(&prefix_crc.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[32..64].copy_from_slice(&self.prev_chain.0);
        let crc = crc32fast::hash(&b[0..76]);
        b[76..80].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks header bytes read from `path`.
    pub fn decode(path: &Path, b: &[u8]) -> Result<SegmentHeader> {
        if b.len() < SEGMENT_HEADER_BYTES {
            return Err(JournalError::corrupt(
                path,
                0,
                "segment shorter than its header",
            ));
        }
        if &b[0..8] != MAGIC {
            return Err(JournalError::corrupt(
                path,
                0,
                "not a concord journal segment (bad magic)",
            ));
        }
        if crc32fast::hash(&b[0..12]) != le_u32(&b[12..16]) {
            return Err(JournalError::corrupt(
                path,
                0,
                "segment header prefix crc32 mismatch",
            ));
        }
        let version = le_u32(&b[8..12]);
        if version > FORMAT_VERSION {
            return Err(JournalError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if crc32fast::hash(&b[0..76]) != le_u32(&b[76..80]) || version == 0 {
            return Err(JournalError::corrupt(
                path,
                0,
                "segment header crc32 mismatch",
            ));
        }
        let mut chain = [0u8; 32];
        chain.copy_from_slice(&b[32..64]);
        Ok(SegmentHeader {
            first_lsn: Lsn(le_u64(&b[16..24])),
            epoch: Epoch(le_u64(&b[24..32])),
            prev_chain: ChainHash(chain),
        })
    }

    /// Reads and checks the header of the segment at `path`.
    pub fn read(path: &Path) -> Result<SegmentHeader> {
        let mut file =
            File::open(path).map_err(|e| JournalError::io("open journal segment", path, e))?;
        let mut b = [0u8; SEGMENT_HEADER_BYTES];
        let mut filled = 0;
        while filled < b.len() {
            match file.read(&mut b[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(JournalError::io("read journal segment header", path, e)),
            }
        }
        SegmentHeader::decode(path, &b[..filled])
    }
}

/// The file name of the segment whose first record is `first_lsn`.
pub fn segment_name(first_lsn: Lsn) -> String {
    format!("{:020}{SUFFIX}", first_lsn.0)
}

/// A segment file found in a journal directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    /// The LSN its name claims for its first record.
    pub first_lsn: Lsn,
    /// Its path.
    pub path: PathBuf,
}

/// The contents of a journal directory.
#[derive(Debug, Default)]
pub struct DirListing {
    /// Segment files in LSN order.
    pub segments: Vec<SegmentFile>,
    /// Leftover temp files: `.seg.tmp` of an interrupted segment creation, `CLEAN.tmp` of an
    /// interrupted close.
    pub leftovers: Vec<PathBuf>,
}

/// Lists a journal directory, refusing anything the journal did not write.
pub fn list_dir(dir: &Path) -> Result<DirListing> {
    let entries =
        fs::read_dir(dir).map_err(|e| JournalError::io("list journal directory", dir, e))?;
    let mut listing = DirListing::default();
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("list journal directory", dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(JournalError::ForeignFile { path });
        };
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if (name == LOCK_FILE || name == crate::clean::CLEAN_FILE) && is_file {
            continue;
        }
        let tmp_segment = parse_name(name, TMP_SUFFIX).is_some();
        if is_file && (tmp_segment || name == crate::clean::CLEAN_TMP_FILE) {
            listing.leftovers.push(path);
        } else if let Some(lsn) = parse_name(name, SUFFIX).filter(|_| is_file) {
            listing.segments.push(SegmentFile {
                first_lsn: lsn,
                path,
            });
        } else {
            return Err(JournalError::ForeignFile { path });
        }
    }
    listing.segments.sort_by_key(|s| s.first_lsn);
    Ok(listing)
}

fn parse_name(name: &str, suffix: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Lsn)
}

/// Creates a new segment durably (temp file, header, sync, rename, directory sync) and returns it
/// open for appending, positioned after the header.
pub fn create_segment(dir: &Path, header: SegmentHeader) -> Result<(File, PathBuf)> {
    let name = segment_name(header.first_lsn);
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| JournalError::io("create journal segment", &tmp, e))?;
    file.write_all(&header.encode())
        .map_err(|e| JournalError::io("write journal segment header", &tmp, e))?;
    file.sync_all()
        .map_err(|e| JournalError::io("sync journal segment header", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| JournalError::io("rename journal segment", &path, e))?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// Syncs a directory, making the creation, rename or removal of its entries durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| JournalError::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| JournalError::io("sync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = SegmentHeader {
            first_lsn: Lsn(42),
            epoch: Epoch(9),
            prev_chain: ChainHash([7; 32]),
        };
        let b = h.encode();
        let p = Path::new("x.seg");
        assert_eq!(SegmentHeader::decode(p, &b).unwrap(), h);
        for i in 0..80 {
            let mut bad = b;
            bad[i] ^= 0x10;
            let err = SegmentHeader::decode(p, &bad).unwrap_err();
            assert!(
                matches!(err, JournalError::Corrupt { offset: 0, .. }),
                "byte {i}: {err:?}"
            );
        }
    }

    #[test]
    fn newer_format_is_a_clear_error() {
        let mut b = SegmentHeader {
            first_lsn: Lsn(1),
            epoch: Epoch(0),
            prev_chain: ChainHash::GENESIS,
        }
        .encode();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let prefix_crc = crc32fast::hash(&b[0..12]);
        b[12..16].copy_from_slice(&prefix_crc.to_le_bytes());
        let err = SegmentHeader::decode(Path::new("x.seg"), &b).unwrap_err();
        assert!(matches!(
            err,
            JournalError::UnsupportedFormat {
                found: 2,
                supported: 1,
                ..
            }
        ));
    }

    #[test]
    fn names_sort_in_lsn_order_and_parse_back() {
        assert_eq!(segment_name(Lsn(12)), "00000000000000000012.seg");
        assert_eq!(
            parse_name("00000000000000000012.seg", SUFFIX),
            Some(Lsn(12))
        );
        assert_eq!(parse_name("12.seg", SUFFIX), None);
        assert_eq!(parse_name("0000000000000000001x.seg", SUFFIX), None);
    }

    #[test]
    fn foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), b"hi").unwrap();
        assert!(matches!(
            list_dir(dir.path()),
            Err(JournalError::ForeignFile { .. })
        ));
    }
}
