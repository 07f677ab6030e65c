//! The redo of a files branch: what its prepare record holds, what its vote carries, and what a
//! standby replays.
//!
//! A redo is the list of a branch's effects, one entry per path: a put whose content comes from
//! the blob store (by blake3 id and size), a put whose content travels inline (small files),
//! or a delete. It is encoded once, at prepare, and decoded by commit's recovery, by the open that
//! applies commits again and by replay, so the decoder is the one place that meets bytes from
//! disk or from another node: it refuses anything malformed with a description, never a panic.
//!
//! # The encoding (version 2)
//!
//! ```text
//! version   u8       = 2 (version 1, without op 3, is read too)
//! count     u32 LE   number of entries (at most BRANCH_PATHS_MAX)
//! entry*    op       u8: 1 = put from a blob, 2 = delete, 3 = put inline
//!           path     u16 LE length, then that many bytes of UTF-8 (a confined relative path)
//!           (op 1)   blob id: 32 bytes (blake3 of the content), size: u64 LE
//!           (op 3)   size: u32 LE (at most INLINE_FILE_BYTES_MAX), then the content
//! ```
//!
//! Entries are sorted by path and name distinct paths, none a prefix directory of another, so
//! their order does not matter when they are applied. Decoders refuse an unknown version, an
//! over-limit count or length, and trailing bytes, and check every length before allocating.
//!
//! # Implementation caveats
//!
//! * The decoder checks a path's length and UTF-8 only; confinement is checked where a path is
//!   used (`confine`).

use journal::BlobId;

use super::{BRANCH_PATHS_MAX, INLINE_FILE_BYTES_MAX, PATH_BYTES_MAX};
use crate::internal::reader::{Reader, put_u32};

pub(super) const REDO_VERSION: u8 = 2;

pub(super) const OP_PUT: u8 = 1;

pub(super) const OP_DELETE: u8 = 2;

pub(super) const OP_PUT_INLINE: u8 = 3;

/// One effect in a files redo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedoEntry {
    /// The file at `path` gets the content of blob `id`, of `bytes` bytes.
    Put {
        /// The path, relative to the root.
        path: String,
        /// The blob holding the content.
        id: BlobId,
        /// The size of the content.
        bytes: u64,
    },
    /// The file at `path` gets `content` (at most [`INLINE_FILE_BYTES_MAX`] bytes), carried in
    /// the redo itself.
    PutInline {
        /// The path, relative to the root.
        path: String,
        /// The whole content.
        content: Vec<u8>,
    },
    /// The file at `path` is removed (nothing happens if it does not exist).
    Delete {
        /// The path, relative to the root.
        path: String,
    },
}

impl RedoEntry {
    /// The path the entry changes.
    pub fn path(&self) -> &str {
        match self {
            RedoEntry::Put { path, .. }
            | RedoEntry::PutInline { path, .. }
            | RedoEntry::Delete { path } => path,
        }
    }
}

/// Encodes entries as a redo (see the module docs for the format).
pub fn encode_redo(entries: &[RedoEntry]) -> Vec<u8> {
    let mut out = vec![REDO_VERSION];
    put_u32(&mut out, entries.len());
    for entry in entries {
        match entry {
            RedoEntry::Put { path, id, bytes } => encode_put(&mut out, path, id, *bytes),
            RedoEntry::PutInline { path, content } => {
                out.push(OP_PUT_INLINE);
                encode_path(&mut out, path);
                put_u32(&mut out, content.len());
                out.extend_from_slice(content);
            }
            RedoEntry::Delete { path } => encode_delete(&mut out, path),
        }
    }
    out
}

/// Decodes a redo; a malformed one is described in the error.
pub fn decode_redo(redo: &[u8]) -> Result<Vec<RedoEntry>, String> {
    let mut reader = Reader::new(redo);
    let version = reader.u8()?;
    if version == 0 || version > REDO_VERSION {
        return Err(format!(
            "redo version {version}: this program reads versions 1 to {REDO_VERSION}"
        ));
    }
    let count = read_count(&mut reader)?;
    let mut entries = Vec::with_capacity(count.min(redo.len() / 4));
    for _ in 0..count {
        entries.push(read_entry(&mut reader, version)?);
    }
    reader.finish()?;
    Ok(entries)
}

pub(super) fn encode_put(out: &mut Vec<u8>, path: &str, id: &BlobId, bytes: u64) {
    out.push(OP_PUT);
    encode_path(out, path);
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&bytes.to_le_bytes());
}

pub(super) fn encode_delete(out: &mut Vec<u8>, path: &str) {
    out.push(OP_DELETE);
    encode_path(out, path);
}

/// Paths are at most `PATH_BYTES_MAX` (checked on every write), so the length fits a u16.
pub(super) fn encode_path(out: &mut Vec<u8>, path: &str) {
    debug_assert!(
        path.len() <= PATH_BYTES_MAX,
        "path over PATH_BYTES_MAX reached the encoder"
    );
    out.extend_from_slice(&u16::try_from(path.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(path.as_bytes());
}

/// Reads the count of a redo.
pub(super) fn read_count(reader: &mut Reader<'_>) -> Result<usize, String> {
    let count = reader.u32()? as usize;
    if count > BRANCH_PATHS_MAX {
        return Err(format!(
            "{count} entries, over BRANCH_PATHS_MAX = {BRANCH_PATHS_MAX}"
        ));
    }
    Ok(count)
}

/// Reads one entry of a redo of `version`.
pub(super) fn read_entry(reader: &mut Reader<'_>, version: u8) -> Result<RedoEntry, String> {
    let op = reader.u8()?;
    let len = usize::from(reader.u16()?);
    if len > PATH_BYTES_MAX {
        return Err(format!(
            "path of {len} bytes, over PATH_BYTES_MAX = {PATH_BYTES_MAX}"
        ));
    }
    let path = String::from_utf8(reader.take(len)?.to_vec())
        .map_err(|_| "path is not UTF-8".to_string())?;
    let entry = match op {
        OP_PUT => RedoEntry::Put {
            path,
            id: BlobId(reader.array()?),
            bytes: reader.u64()?,
        },
        OP_PUT_INLINE if version >= 2 => {
            let len = u64::from(reader.u32()?);
            if len > INLINE_FILE_BYTES_MAX {
                return Err(format!(
                    "inline content of {len} bytes, over INLINE_FILE_BYTES_MAX = {INLINE_FILE_BYTES_MAX}"
                ));
            }
            let content = reader.take(len as usize)?.to_vec();
            RedoEntry::PutInline { path, content }
        }
        OP_DELETE => RedoEntry::Delete { path },
        other => return Err(format!("unknown op {other}")),
    };
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<RedoEntry> {
        vec![
            RedoEntry::Put {
                path: "a/b.txt".into(),
                id: BlobId::of(b"hello"),
                bytes: 5,
            },
            RedoEntry::PutInline {
                path: "d".into(),
                content: b"inline".to_vec(),
            },
            RedoEntry::Delete { path: "c".into() },
        ]
    }

    #[test]
    fn redo_round_trips() {
        let redo = encode_redo(&sample());
        assert_eq!(redo[0], REDO_VERSION);
        assert_eq!(decode_redo(&redo).unwrap(), sample());
        assert_eq!(decode_redo(&encode_redo(&[])).unwrap(), vec![]);
    }

    #[test]
    fn malformed_redo_is_refused() {
        let redo = encode_redo(&sample());
        for cut in 0..redo.len() {
            assert!(decode_redo(&redo[..cut]).is_err(), "truncated at {cut}");
        }
        let mut trailing = redo.clone();
        trailing.push(0);
        assert!(decode_redo(&trailing).unwrap_err().contains("trailing"));
        let mut newer = redo.clone();
        newer[0] = 3;
        assert!(decode_redo(&newer).unwrap_err().contains("version 3"));
        let mut v1 = redo.clone();
        v1[0] = 1;
        assert!(
            decode_redo(&v1).unwrap_err().contains("unknown op 3"),
            "inline content is refused in a version 1 redo"
        );
        let v1_only = encode_redo(&sample()[..1]);
        let mut v1_only = v1_only.clone();
        v1_only[0] = 1;
        assert_eq!(decode_redo(&v1_only).unwrap(), sample()[..1].to_vec());
        let mut huge = vec![REDO_VERSION];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_redo(&huge).unwrap_err().contains("BRANCH_PATHS_MAX"));
        let mut bad_op = redo.clone();
        bad_op[5] = 9;
        assert!(decode_redo(&bad_op).unwrap_err().contains("unknown op"));
    }
}
