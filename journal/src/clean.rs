//! The clean-close mark: a small file that says "this journal was closed cleanly, and it ends at
//! this LSN with this chain value".
//!
//! The torn-tail rule (see [`crate::scan`]) truncates damage at the very end of the journal,
//! because after a crash the last sync group may be half written. After a clean close there is
//! no half-written group: every record was written and synced before the journal let go of its
//! directory. So [`crate::Journal::close`] records that fact durably in `CLEAN`, and the next
//! open (and every read-only scan) holds the journal to it: damage in the last record, or a tail
//! that does not end exactly at the marked LSN and chain value, is corruption, not a torn tail.
//!
//! The mark's life:
//!
//! 1. **Written at close**, after the flusher's last sync: `CLEAN.tmp` is written and synced,
//!    renamed to `CLEAN`, and the directory is synced. Should that fail (a disk that filled up
//!    after the last record), the close still succeeds, with a warning: every record is
//!    durable, and the state left behind is one of the crash rows below. It is not a poisoning,
//!    and it is not retried.
//! 2. **Kept while nothing is written**: opening reads it and changes nothing; a journal opened
//!    and closed again without an append still ends where the mark says.
//! 3. **Cleared before the first write after open**: the flusher removes `CLEAN` and syncs the
//!    directory before it writes the first record (or creates a segment) — so no record of the
//!    new session can reach the disk while a mark still claims the journal ends earlier.
//!    Truncating the journal ([`crate::Journal::truncate_after`]) clears it first too, and writes
//!    a new one for the new end when it has finished.
//!
//! Crash analysis:
//!
//! | crash during | on disk afterwards | at the next open |
//! |---|---|---|
//! | 1, before the rename | `CLEAN.tmp`, no `CLEAN` | no mark: the torn-tail rule applies (nothing is torn: every record was synced); `CLEAN.tmp` is removed |
//! | 1, after the rename | `CLEAN`, maybe not yet durable | either way correct: the records it names are synced |
//! | 3, before the directory sync | `CLEAN` maybe still there | no record was written yet, so the mark still tells the truth |
//! | 3, after it | no mark | the torn-tail rule applies, as after any crash |
//!
//! The file is 56 bytes: magic `CNCDCLEN` (8), format version (4, little-endian, currently 1),
//! last LSN (8), chain value after it (32), crc32 of bytes 0..52 (4). A damaged mark is
//! corruption: the journal refuses to open and names the file. An operator who has judged the
//! segments sound may delete it; the journal then opens as after a crash.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::{JournalError, Result};
use crate::record::{le_u32, le_u64};
use crate::segment::sync_dir;
use crate::types::{ChainHash, Lsn};

/// Name of the clean-close mark in a journal directory.
pub const CLEAN_FILE: &str = "CLEAN";
/// Name of the mark while it is being written.
pub const CLEAN_TMP_FILE: &str = "CLEAN.tmp";
/// Bytes of the mark file.
pub const CLEAN_BYTES: usize = 56;
const MAGIC: &[u8; 8] = b"CNCDCLEN";
const VERSION: u32 = 1;

/// What a clean-close mark says: where the journal ended when it was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanMark {
    /// The last LSN in the journal at close (`Lsn::ZERO` for an empty new journal).
    pub last_lsn: Lsn,
    /// The chain value after that record.
    pub last_chain: ChainHash,
}

impl CleanMark {
    /// The file's bytes.
    pub fn encode(&self) -> [u8; CLEAN_BYTES] {
        let mut b = [0u8; CLEAN_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.last_lsn.0.to_le_bytes());
        b[20..52].copy_from_slice(&self.last_chain.0);
        let crc = crc32fast::hash(&b[0..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks the bytes of the mark at `path`.
    pub fn decode(path: &Path, b: &[u8]) -> Result<CleanMark> {
        let corrupt = |why: &str| {
            Err(JournalError::corrupt(
                path,
                0,
                format!(
                    "clean-close mark {why}; if the segments are sound, delete it to open the \
                     journal as after a crash"
                ),
            ))
        };
        if b.len() != CLEAN_BYTES {
            return corrupt("has the wrong size");
        }
        if &b[0..8] != MAGIC {
            return corrupt("has a bad magic");
        }
        if crc32fast::hash(&b[0..52]) != le_u32(&b[52..56]) {
            return corrupt("fails its crc32");
        }
        let version = le_u32(&b[8..12]);
        if version > VERSION {
            return Err(JournalError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: version,
                supported: VERSION,
            });
        }
        let mut chain = [0u8; 32];
        chain.copy_from_slice(&b[20..52]);
        Ok(CleanMark {
            last_lsn: Lsn(le_u64(&b[12..20])),
            last_chain: ChainHash(chain),
        })
    }
}

/// The path of the mark in `dir`.
pub fn mark_path(dir: &Path) -> PathBuf {
    dir.join(CLEAN_FILE)
}

/// Reads the mark of the journal in `dir`; `None` when there is none.
pub fn read(dir: &Path) -> Result<Option<CleanMark>> {
    let path = mark_path(dir);
    match fs::read(&path) {
        Ok(bytes) => CleanMark::decode(&path, &bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::io("read clean-close mark", path, e)),
    }
}

/// Writes the mark durably: temp file, sync, rename, directory sync.
pub(crate) fn write(dir: &Path, mark: &CleanMark) -> Result<()> {
    let tmp = dir.join(CLEAN_TMP_FILE);
    let path = mark_path(dir);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| JournalError::io("create clean-close mark", &tmp, e))?;
    file.write_all(&mark.encode())
        .map_err(|e| JournalError::io("write clean-close mark", &tmp, e))?;
    file.sync_all()
        .map_err(|e| JournalError::io("sync clean-close mark", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| JournalError::io("rename clean-close mark", &path, e))?;
    sync_dir(dir)
}

/// Removes the mark durably (directory synced); `Ok(false)` when there was none.
pub(crate) fn clear(dir: &Path) -> Result<bool> {
    let path = mark_path(dir);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(JournalError::io("remove clean-close mark", path, e)),
    }
    sync_dir(dir)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_round_trips_and_every_flipped_byte_is_refused() {
        let mark = CleanMark {
            last_lsn: Lsn(77),
            last_chain: ChainHash([5; 32]),
        };
        let b = mark.encode();
        let p = Path::new("CLEAN");
        assert_eq!(CleanMark::decode(p, &b).unwrap(), mark);
        for i in 0..CLEAN_BYTES {
            let mut bad = b;
            bad[i] ^= 0x04;
            assert!(CleanMark::decode(p, &bad).is_err(), "byte {i}");
        }
        assert!(CleanMark::decode(p, &b[..40]).is_err());
    }
}
