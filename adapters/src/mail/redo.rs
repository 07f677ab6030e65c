//! The redo of a mail branch: every message it delivers, by name, with its content inline or by
//! blob id.
//!
//! ```text
//! version   u8       = 1
//! count     u32 LE   number of entries (at most BRANCH_MESSAGES_MAX)
//! entry*    op       u8: 1 = inline, 2 = blob
//!           name     u8 length, then that many bytes (a Maildir name, see the `name` module)
//!           (op 1)   size: u32 LE (at most INLINE_MESSAGE_BYTES_MAX), then the content
//!           (op 2)   blob id: 32 bytes (blake3 of the content), size: u64 LE
//! ```
//!
//! Entries are in the order of the messages' positions and name distinct messages. Decoders
//! refuse an unknown version, an over-limit count or length, a name that is not a valid Maildir
//! name (it could otherwise lead a replay out of the Maildir), and trailing bytes.

use journal::BlobId;

use super::name::check_name;
use super::{BRANCH_MESSAGES_MAX, INLINE_MESSAGE_BYTES_MAX};
use crate::internal::reader::{Reader, put_u32};

const REDO_VERSION: u8 = 1;
const OP_INLINE: u8 = 1;
const OP_BLOB: u8 = 2;

/// One message of a mail redo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedoEntry {
    /// The message `name` with `content` (at most [`INLINE_MESSAGE_BYTES_MAX`] bytes), carried
    /// in the redo itself.
    Inline {
        /// Its Maildir file name.
        name: String,
        /// The whole message, with CRLF line endings.
        content: Vec<u8>,
    },
    /// The message `name`, whose content is blob `id` of `bytes` bytes: replication ships the
    /// blob to the standby's blob store before the redo is replayed.
    Blob {
        /// Its Maildir file name.
        name: String,
        /// The blob holding the message.
        id: BlobId,
        /// The size of the message.
        bytes: u64,
    },
}

impl RedoEntry {
    /// The message's Maildir file name.
    pub fn name(&self) -> &str {
        match self {
            RedoEntry::Inline { name, .. } | RedoEntry::Blob { name, .. } => name,
        }
    }
}

/// Encodes entries as a redo (see the module docs for the format).
pub fn encode_redo(entries: &[RedoEntry]) -> Vec<u8> {
    let mut out = vec![REDO_VERSION];
    // At most BRANCH_MESSAGES_MAX entries (checked at every enqueue).
    put_u32(&mut out, entries.len());
    for entry in entries {
        match entry {
            RedoEntry::Inline { name, content } => {
                out.push(OP_INLINE);
                encode_name(&mut out, name);
                put_u32(&mut out, content.len());
                out.extend_from_slice(content);
            }
            RedoEntry::Blob { name, id, bytes } => {
                out.push(OP_BLOB);
                encode_name(&mut out, name);
                out.extend_from_slice(&id.0);
                out.extend_from_slice(&bytes.to_le_bytes());
            }
        }
    }
    out
}

/// Names are at most `NAME_BYTES_MAX` = 255 bytes (they are made here, and checked when
/// decoded), so the length fits a u8.
fn encode_name(out: &mut Vec<u8>, name: &str) {
    debug_assert!(check_name(name).is_ok(), "bad message name {name:?}");
    out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(name.as_bytes());
}

/// Decodes a redo; a malformed one is described in the error.
pub fn decode_redo(redo: &[u8]) -> Result<Vec<RedoEntry>, String> {
    let mut reader = Reader::new(redo);
    let version = reader.u8()?;
    if version != REDO_VERSION {
        return Err(format!(
            "redo version {version}: this program reads version {REDO_VERSION}"
        ));
    }
    let count = reader.u32()? as usize;
    if count > BRANCH_MESSAGES_MAX {
        return Err(format!(
            "{count} entries, over BRANCH_MESSAGES_MAX = {BRANCH_MESSAGES_MAX}"
        ));
    }
    let mut entries = Vec::with_capacity(count.min(redo.len() / 8));
    for _ in 0..count {
        entries.push(read_entry(&mut reader)?);
    }
    reader.finish()?;
    Ok(entries)
}

/// Reads one entry of a redo.
fn read_entry(reader: &mut Reader<'_>) -> Result<RedoEntry, String> {
    let op = reader.u8()?;
    let len = usize::from(reader.u8()?);
    let name = String::from_utf8(reader.take(len)?.to_vec())
        .map_err(|_| "message name is not UTF-8".to_string())?;
    check_name(&name)?;
    match op {
        OP_INLINE => {
            let len = u64::from(reader.u32()?);
            if len > INLINE_MESSAGE_BYTES_MAX {
                return Err(format!(
                    "inline message of {len} bytes, over INLINE_MESSAGE_BYTES_MAX = {INLINE_MESSAGE_BYTES_MAX}"
                ));
            }
            let content = reader.take(len as usize)?.to_vec();
            Ok(RedoEntry::Inline { name, content })
        }
        OP_BLOB => Ok(RedoEntry::Blob {
            name,
            id: BlobId(reader.array()?),
            bytes: reader.u64()?,
        }),
        other => Err(format!("unknown op {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<RedoEntry> {
        vec![
            RedoEntry::Inline {
                name: "1.Cn1e1s1P0.h".into(),
                content: b"Date: x\r\nFrom: a@b\r\n\r\n".to_vec(),
            },
            RedoEntry::Blob {
                name: "1.Cn1e1s1P1.h".into(),
                id: BlobId::of(b"big"),
                bytes: 3,
            },
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
        newer[0] = 2;
        assert!(decode_redo(&newer).unwrap_err().contains("version 2"));
        let mut huge = vec![REDO_VERSION];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode_redo(&huge)
                .unwrap_err()
                .contains("BRANCH_MESSAGES_MAX")
        );
        let mut bad_op = redo.clone();
        bad_op[5] = 9;
        assert!(decode_redo(&bad_op).unwrap_err().contains("unknown op"));
    }

    #[test]
    fn a_name_leading_out_of_the_maildir_is_refused() {
        let mut redo = vec![REDO_VERSION, 1, 0, 0, 0, OP_INLINE, 9];
        redo.extend_from_slice(b"../escape");
        redo.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode_redo(&redo).unwrap_err().contains("/"));
    }
}
