//! The batch: what one branch writes, as bytes. The same bytes are the branch's entry in the
//! prepared tree and its redo.
//!
//! ```text
//! version   u8       = 1
//! count     u32 LE   number of writes (at most BATCH_WRITES_MAX)
//! write*    op       u8: 1 = insert, 2 = remove
//!           key      u32 LE length (at most KEY_BYTES_MAX), then that many bytes
//!           (op 1)   value: u32 LE length (at most VALUE_BYTES_LIMIT), then that many bytes
//! ```
//!
//! Writes are sorted by key, each key once, so one branch's set of writes has exactly one
//! encoding and their order does not matter when they are applied. The decoder refuses an
//! unknown version, an unknown op, an over-limit count or length, keys out of order or repeated,
//! a truncated write and trailing bytes, each with a message saying which; it allocates for a
//! length only once that many bytes are known to be there.

use super::{BATCH_WRITES_MAX, KEY_BYTES_MAX, VALUE_BYTES_LIMIT};
use crate::internal::reader::{Reader, put_u32};

const VERSION: u8 = 1;
const OP_INSERT: u8 = 1;
const OP_REMOVE: u8 = 2;

/// Bytes of the batch header (version and count).
pub(super) const HEADER_BYTES: u64 = 1 + 4;

/// One write of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvWrite {
    /// `key` gets `value`.
    Insert {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// `key` is removed (nothing happens if it is absent).
    Remove {
        /// The key.
        key: Vec<u8>,
    },
}

impl KvWrite {
    /// The key the write changes.
    pub fn key(&self) -> &[u8] {
        match self {
            KvWrite::Insert { key, .. } | KvWrite::Remove { key } => key,
        }
    }
}

/// Bytes one write takes in a batch: op, key length and key, and for an insert value length and
/// value.
pub(super) fn write_bytes(key: &[u8], value: Option<&[u8]>) -> u64 {
    let value = value.map_or(0, |v| 4 + v.len() as u64);
    1 + 4 + key.len() as u64 + value
}

/// Encodes writes, sorted by key and each key once, as a batch. `writes` yields
/// `(key, Some(value))` for an insert and `(key, None)` for a remove.
pub(super) fn encode<'a>(
    count: usize,
    writes: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> Vec<u8> {
    let mut out = vec![VERSION];
    put_u32(&mut out, count);
    for (key, value) in writes {
        out.push(if value.is_some() {
            OP_INSERT
        } else {
            OP_REMOVE
        });
        put_u32(&mut out, key.len());
        out.extend_from_slice(key);
        if let Some(value) = value {
            put_u32(&mut out, value.len());
            out.extend_from_slice(value);
        }
    }
    out
}

/// Encodes writes as a batch (see the module docs). Refused (with the reason) when two writes
/// name the same key or a key or value is over its limit; the order of `writes` does not matter.
pub fn encode_batch(writes: &[KvWrite]) -> Result<Vec<u8>, String> {
    let mut sorted: Vec<&KvWrite> = writes.iter().collect();
    sorted.sort_by(|a, b| a.key().cmp(b.key()));
    if sorted.windows(2).any(|w| w[0].key() == w[1].key()) {
        return Err("two writes name the same key".to_string());
    }
    if writes.len() > BATCH_WRITES_MAX {
        return Err(format!(
            "{} writes, over BATCH_WRITES_MAX = {BATCH_WRITES_MAX}",
            writes.len()
        ));
    }
    for write in &sorted {
        check_key_len(write.key().len())?;
        if let KvWrite::Insert { value, .. } = write {
            check_value_len(value.len() as u64)?;
        }
    }
    let writes = sorted.into_iter().map(|w| match w {
        KvWrite::Insert { key, value } => (key.as_slice(), Some(value.as_slice())),
        KvWrite::Remove { key } => (key.as_slice(), None),
    });
    Ok(encode(writes.len(), writes))
}

/// Decodes a batch; a malformed one is described in the error.
pub fn decode_batch(batch: &[u8]) -> Result<Vec<KvWrite>, String> {
    let mut reader = Reader::new(batch);
    let version = reader.u8()?;
    if version != VERSION {
        return Err(format!(
            "batch version {version}: this program reads version {VERSION}"
        ));
    }
    let count = reader.u32()? as usize;
    if count > BATCH_WRITES_MAX {
        return Err(format!(
            "{count} writes, over BATCH_WRITES_MAX = {BATCH_WRITES_MAX}"
        ));
    }
    // Every write takes at least 5 bytes: never reserve more than the input can hold.
    let mut writes: Vec<KvWrite> = Vec::with_capacity(count.min(batch.len() / 5));
    for i in 0..count {
        let write = read_write(&mut reader).map_err(|e| format!("write {i}: {e}"))?;
        if writes.last().is_some_and(|last| last.key() >= write.key()) {
            return Err(format!(
                "write {i}: keys are not in ascending order (or repeated)"
            ));
        }
        writes.push(write);
    }
    // Not `Reader::finish`: this message also names the count of writes.
    if reader.remaining() != 0 {
        return Err(format!(
            "{} trailing bytes after {count} writes",
            reader.remaining()
        ));
    }
    Ok(writes)
}

fn check_key_len(len: usize) -> Result<(), String> {
    if len > KEY_BYTES_MAX {
        return Err(format!(
            "key of {len} bytes, over KEY_BYTES_MAX = {KEY_BYTES_MAX}"
        ));
    }
    Ok(())
}

fn check_value_len(len: u64) -> Result<(), String> {
    if len > VALUE_BYTES_LIMIT {
        return Err(format!(
            "value of {len} bytes, over VALUE_BYTES_LIMIT = {VALUE_BYTES_LIMIT}"
        ));
    }
    Ok(())
}

/// Reads one write of a batch.
fn read_write(reader: &mut Reader<'_>) -> Result<KvWrite, String> {
    let op = reader.u8()?;
    if op != OP_INSERT && op != OP_REMOVE {
        return Err(format!("unknown op {op}"));
    }
    let len = reader.u32()? as usize;
    check_key_len(len)?;
    let key = reader.take(len)?.to_vec();
    if op == OP_REMOVE {
        return Ok(KvWrite::Remove { key });
    }
    let len = reader.u32()? as usize;
    check_value_len(len as u64)?;
    let value = reader.take(len)?.to_vec();
    Ok(KvWrite::Insert { key, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<KvWrite> {
        vec![
            KvWrite::Insert {
                key: b"a".to_vec(),
                value: b"one".to_vec(),
            },
            KvWrite::Remove { key: b"b".to_vec() },
            KvWrite::Insert {
                key: b"c\xff".to_vec(),
                value: vec![],
            },
        ]
    }

    #[test]
    fn batches_round_trip_sorted() {
        let mut shuffled = sample();
        shuffled.reverse();
        let batch = encode_batch(&shuffled).unwrap();
        assert_eq!(batch[0], VERSION);
        assert_eq!(decode_batch(&batch).unwrap(), sample());
        assert_eq!(batch, encode_batch(&sample()).unwrap(), "one encoding");
        let size: u64 = HEADER_BYTES
            + write_bytes(b"a", Some(b"one"))
            + write_bytes(b"b", None)
            + write_bytes(b"c\xff", Some(b""));
        assert_eq!(batch.len() as u64, size);
        assert_eq!(decode_batch(&encode_batch(&[]).unwrap()).unwrap(), vec![]);
    }

    #[test]
    fn encoding_refuses_repeated_keys_and_over_limit_keys() {
        let twice = vec![
            KvWrite::Remove { key: b"k".to_vec() },
            KvWrite::Remove { key: b"k".to_vec() },
        ];
        assert!(encode_batch(&twice).unwrap_err().contains("same key"));
        let long = vec![KvWrite::Remove {
            key: vec![0; KEY_BYTES_MAX + 1],
        }];
        assert!(encode_batch(&long).unwrap_err().contains("KEY_BYTES_MAX"));
    }

    #[test]
    fn malformed_batches_are_refused() {
        let batch = encode_batch(&sample()).unwrap();
        for cut in 0..batch.len() {
            assert!(decode_batch(&batch[..cut]).is_err(), "truncated at {cut}");
        }
        let mut trailing = batch.clone();
        trailing.push(0);
        assert!(decode_batch(&trailing).unwrap_err().contains("trailing"));
        let mut newer = batch.clone();
        newer[0] = 2;
        assert!(decode_batch(&newer).unwrap_err().contains("version 2"));
        let mut bad_op = batch.clone();
        bad_op[5] = 7;
        assert!(decode_batch(&bad_op).unwrap_err().contains("unknown op 7"));
        let mut huge = vec![VERSION];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode_batch(&huge)
                .unwrap_err()
                .contains("BATCH_WRITES_MAX")
        );
        let mut long_key = vec![VERSION, 1, 0, 0, 0, OP_REMOVE];
        long_key.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode_batch(&long_key)
                .unwrap_err()
                .contains("KEY_BYTES_MAX")
        );
        let mut long_value = vec![VERSION, 1, 0, 0, 0, OP_INSERT, 1, 0, 0, 0, b'k'];
        long_value.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode_batch(&long_value)
                .unwrap_err()
                .contains("VALUE_BYTES_LIMIT")
        );
    }

    #[test]
    fn keys_out_of_order_are_refused() {
        let writes = |first: &[u8], second: &[u8]| {
            let removes = [first, second];
            encode(2, removes.iter().map(|k| (*k, None)))
        };
        assert!(decode_batch(&writes(b"a", b"b")).is_ok());
        for (first, second) in [(&b"b"[..], &b"a"[..]), (b"a", b"a")] {
            let message = decode_batch(&writes(first, second)).unwrap_err();
            assert!(message.contains("ascending"), "{message}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap fuzz: every single-byte change of a valid batch, and a sweep of short inputs.
        let batch = encode_batch(&sample()).unwrap();
        for at in 0..batch.len() {
            for byte in [0u8, 1, 2, 0x7f, 0x80, 0xff] {
                let mut changed = batch.clone();
                changed[at] = byte;
                let _ = decode_batch(&changed);
            }
        }
        for n in 0u32..4096 {
            let bytes: Vec<u8> = n.to_le_bytes().iter().chain(&[1, 0, 0]).copied().collect();
            let _ = decode_batch(&bytes);
        }
    }
}
