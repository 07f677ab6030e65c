//! Record framing: how one record is laid out in a segment, sealed, and checked.
//!
//! ```text
//! offset  size  field
//!      0     4  len           bytes after this field (crc .. chain), little-endian
//!      4     4  crc           crc32 of every byte after this field
//!      8     8  lsn
//!     16     8  epoch
//!     24     4  batch_offset  lsn minus the first lsn of its sync group (see below)
//!     28     1  kind code
//!     29     1  payload version
//!     30     p  payload
//!   30+p    32  chain         blake3 keyed by the previous chain, of
//!                             lsn ‖ epoch ‖ kind ‖ version ‖ blake3(payload)
//! ```
//!
//! The chain covers what the record *says* — LSN, epoch, kind, version and payload (through its
//! hash) — and not where or how it was written (`batch_offset`), so two journals holding the same
//! history have the same chain values whatever their batching: that is how a standby and a primary
//! find where they diverge.
//!
//! Sealing is split so that little happens in LSN order. `Unsealed::new` hashes the payload on
//! the appender's own thread, concurrently with other appenders. In LSN order (under the
//! journal's queue lock) `Unsealed::chain_after` computes the chain value (one blake3
//! compression: 50 bytes keyed by the previous chain value) when the record is accepted, and
//! `append_frame` writes the frame and its crc32 when it enters a write batch — at once, or later
//! for a record that waited for room in the queue (its batch offset is known only then).
//!
//! A reader checks, in this order, that the length is within the configured limit (before
//! allocating anything), that the crc matches, that the LSN is the one expected and that the chain
//! follows from the previous record's.
//!
//! `batch_offset` lets recovery tell a torn tail from damage to durable history. A record's *sync
//! group* is the run of records written since the last sync that preceded its write; every record
//! before the group was synced before the record was written. The pages of an unfinished group may
//! reach the disk in any order, so a valid record can follow a damaged one of the same group; a
//! valid record of a *later* group proves the damaged one had been synced: see `scan`.

use std::borrow::Cow;

use crate::types::{ChainHash, Epoch, Lsn, Record, RecordKind};

/// Bytes before the payload.
pub const HEADER_BYTES: usize = 30;
/// Bytes after the payload (the chain value).
pub const TRAILER_BYTES: usize = 32;
/// Framing overhead of one record.
pub const OVERHEAD_BYTES: usize = HEADER_BYTES + TRAILER_BYTES;

/// Size on disk of a record with a payload of `payload_len` bytes.
pub fn framed_len(payload_len: usize) -> usize {
    OVERHEAD_BYTES + payload_len
}

/// A record before it has an LSN, with its payload already hashed. The payload is borrowed from
/// the appender, or owned while the record waits for room in the queue.
pub(crate) struct Unsealed<'a> {
    epoch: Epoch,
    kind: RecordKind,
    payload: Cow<'a, [u8]>,
    payload_hash: [u8; 32],
}

impl<'a> Unsealed<'a> {
    /// Hashes `payload` (the expensive part of sealing, done before any lock is taken).
    pub fn new(epoch: Epoch, kind: RecordKind, payload: &'a [u8]) -> Unsealed<'a> {
        let payload_hash = *blake3::hash(payload).as_bytes();
        Unsealed {
            epoch,
            kind,
            payload: Cow::Borrowed(payload),
            payload_hash,
        }
    }

    /// The same record owning a copy of its payload.
    pub fn into_owned(self) -> Unsealed<'static> {
        Unsealed {
            epoch: self.epoch,
            kind: self.kind,
            payload: Cow::Owned(self.payload.into_owned()),
            payload_hash: self.payload_hash,
        }
    }

    /// Its epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Size of its frame.
    pub fn framed_len(&self) -> usize {
        framed_len(self.payload.len())
    }

    /// The chain value of this record at `lsn` after `prev`.
    pub fn chain_after(&self, prev: &ChainHash, lsn: Lsn) -> ChainHash {
        chain_after(prev, lsn, self.epoch, self.kind, &self.payload_hash)
    }
}

/// Appends `record` sealed with `lsn`, `batch_offset` and the chain after `prev` to `buf`;
/// returns its chain value.
#[cfg(test)]
pub(crate) fn append_sealed(
    buf: &mut Vec<u8>,
    record: &Unsealed<'_>,
    lsn: Lsn,
    batch_offset: u32,
    prev: &ChainHash,
) -> ChainHash {
    let chain = record.chain_after(prev, lsn);
    append_frame(buf, record, lsn, batch_offset, &chain);
    chain
}

/// Appends the frame of `record` at `lsn` with `batch_offset` and its (already computed) chain
/// value to `buf`: everything but the chain value is computed here, the crc last.
pub(crate) fn append_frame(
    buf: &mut Vec<u8>,
    record: &Unsealed<'_>,
    lsn: Lsn,
    batch_offset: u32,
    chain: &ChainHash,
) {
    let start = buf.len();
    let payload: &[u8] = &record.payload;
    let len = framed_len(payload.len()) - 4;
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, below
    buf.extend_from_slice(&lsn.0.to_le_bytes());
    buf.extend_from_slice(&record.epoch.0.to_le_bytes());
    buf.extend_from_slice(&batch_offset.to_le_bytes());
    buf.push(record.kind.code);
    buf.push(record.kind.version);
    buf.extend_from_slice(payload);
    buf.extend_from_slice(&chain.0);
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// `blake3_keyed(prev, lsn ‖ epoch ‖ kind ‖ version ‖ payload_hash)`: 50 bytes, one compression.
fn chain_after(
    prev: &ChainHash,
    lsn: Lsn,
    epoch: Epoch,
    kind: RecordKind,
    payload_hash: &[u8; 32],
) -> ChainHash {
    let mut input = [0u8; 50];
    input[0..8].copy_from_slice(&lsn.0.to_le_bytes());
    input[8..16].copy_from_slice(&epoch.0.to_le_bytes());
    input[16] = kind.code;
    input[17] = kind.version;
    input[18..50].copy_from_slice(payload_hash);
    ChainHash(*blake3::keyed_hash(&prev.0, &input).as_bytes())
}

/// Why a frame was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The length field is zero, smaller than the overhead or over the record limit.
    BadLength(u32),
    /// Fewer bytes remain than the length field announces.
    Truncated,
    /// The crc does not match.
    BadCrc,
    /// The crc matches but the LSN is not the expected one.
    BadLsn { expected: Lsn, found: Lsn },
    /// The crc matches but the chain does not follow from the previous record.
    BadChain,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadLength(len) => write!(f, "implausible record length {len}"),
            FrameError::Truncated => f.write_str("record extends past the end of the segment"),
            FrameError::BadCrc => f.write_str("crc32 mismatch"),
            FrameError::BadLsn { expected, found } => {
                write!(f, "lsn {found} where {expected} was expected")
            }
            FrameError::BadChain => f.write_str("chain hash does not follow the previous record"),
        }
    }
}

/// Checks a length field against the limit before anything is allocated for the record.
/// Returns the number of bytes that follow the length field.
pub(crate) fn check_len(len: u32, record_bytes_max: u64) -> Result<usize, FrameError> {
    let total = u64::from(len) + 4;
    if total < OVERHEAD_BYTES as u64 || total > record_bytes_max {
        return Err(FrameError::BadLength(len));
    }
    Ok(len as usize)
}

/// The fields of a frame whose crc matched.
pub(crate) struct Checked {
    pub lsn: Lsn,
}

/// Checks the crc of `rest` (a frame without its 4-byte length field) and returns its LSN.
pub(crate) fn check_crc(rest: &[u8]) -> Result<Checked, FrameError> {
    let stored = le_u32(&rest[0..4]);
    if crc32fast::hash(&rest[4..]) != stored {
        return Err(FrameError::BadCrc);
    }
    Ok(Checked {
        lsn: Lsn(le_u64(&rest[4..12])),
    })
}

/// Fully checks `rest` (a frame without its length field, crc not yet checked) as the record
/// expected at `expected` after chain value `prev`, and decodes it.
pub(crate) fn decode(rest: &[u8], expected: Lsn, prev: &ChainHash) -> Result<Record, FrameError> {
    let checked = check_crc(rest)?;
    if checked.lsn != expected {
        return Err(FrameError::BadLsn {
            expected,
            found: checked.lsn,
        });
    }
    let body_end = rest.len() - TRAILER_BYTES;
    let epoch = Epoch(le_u64(&rest[12..20]));
    let kind = RecordKind::new(rest[24], rest[25]);
    let payload = &rest[26..body_end];
    let chain = chain_after(
        prev,
        checked.lsn,
        epoch,
        kind,
        blake3::hash(payload).as_bytes(),
    );
    if chain.0[..] != rest[body_end..] {
        return Err(FrameError::BadChain);
    }
    Ok(Record {
        lsn: checked.lsn,
        epoch,
        kind,
        payload: payload.to_vec(),
        chain,
    })
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(lsn: u64, payload: &[u8], prev: &ChainHash) -> (Vec<u8>, ChainHash) {
        let mut buf = Vec::new();
        let record = Unsealed::new(Epoch(3), RecordKind::new(7, 1), payload);
        let chain = append_sealed(&mut buf, &record, Lsn(lsn), 0, prev);
        (buf, chain)
    }

    #[test]
    fn the_crc_is_the_crc_of_the_whole_frame() {
        let (buf, _) = sealed(2, &[9u8; 300], &ChainHash([4; 32]));
        assert_eq!(le_u32(&buf[4..8]), crc32fast::hash(&buf[8..]));
    }

    #[test]
    fn the_chain_ignores_where_and_how_a_record_was_written() {
        let payload = b"same history";
        let record = Unsealed::new(Epoch(1), RecordKind::new(1, 1), payload);
        let mut a = Vec::new();
        let mut b = Vec::new();
        let prev = ChainHash::GENESIS;
        let ca = append_sealed(&mut a, &record, Lsn(1), 0, &prev);
        let cb = append_sealed(&mut b, &record, Lsn(1), 17, &prev);
        assert_eq!(ca, cb);
        assert_ne!(a, b);
    }

    #[test]
    fn sealed_record_decodes_to_what_was_written() {
        let (buf, chain) = sealed(5, b"hello", &ChainHash::GENESIS);
        assert_eq!(buf.len(), framed_len(5));
        let len = check_len(le_u32(&buf), 1 << 20).unwrap();
        assert_eq!(len, buf.len() - 4);
        let rec = decode(&buf[4..], Lsn(5), &ChainHash::GENESIS).unwrap();
        assert_eq!(rec.lsn, Lsn(5));
        assert_eq!(rec.epoch, Epoch(3));
        assert_eq!(rec.kind, RecordKind::new(7, 1));
        assert_eq!(rec.payload, b"hello");
        assert_eq!(rec.chain, chain);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let (buf, _) = sealed(1, b"payload bytes", &ChainHash::GENESIS);
        for bit in 32..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode(&bad[4..], Lsn(1), &ChainHash::GENESIS).is_err(),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn wrong_lsn_and_wrong_chain_are_refused() {
        let (buf, _) = sealed(9, b"x", &ChainHash::GENESIS);
        assert_eq!(
            decode(&buf[4..], Lsn(8), &ChainHash::GENESIS),
            Err(FrameError::BadLsn {
                expected: Lsn(8),
                found: Lsn(9)
            })
        );
        assert_eq!(
            decode(&buf[4..], Lsn(9), &ChainHash([1; 32])),
            Err(FrameError::BadChain)
        );
    }

    #[test]
    fn lengths_outside_the_limits_are_refused_before_allocation() {
        assert_eq!(check_len(0, 1024), Err(FrameError::BadLength(0)));
        assert_eq!(check_len(10, 1024), Err(FrameError::BadLength(10)));
        assert_eq!(
            check_len(u32::MAX, 1024),
            Err(FrameError::BadLength(u32::MAX))
        );
        assert!(check_len(1020, 1024).is_ok());
        assert_eq!(check_len(1021, 1024), Err(FrameError::BadLength(1021)));
    }
}
