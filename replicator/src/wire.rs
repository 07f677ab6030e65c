//! Records on the wire: a journal [`Record`] as a [`v1::ShippedRecord`] and back.
//!
//! A shipped record carries exactly what the primary's journal holds — LSN, epoch, kind, payload
//! and the chain value after it — plus a crc32 over all of them, so that a frame damaged on the
//! way (or by a bug in between) is refused before the standby's journal sees it. The chain value
//! is checked again by the standby's journal ([`journal::Journal::append_verbatim`]): it must
//! be the one the standby computes from its own last chain value and the record, which is what
//! proves that both journals hold the same history.
//!
//! The crc covers, little-endian: lsn (8 bytes), epoch (8), kind code (1), kind version (1),
//! payload length (4), payload, chain (32).

use journal::{ChainHash, Epoch, Lsn, Record, RecordKind};
use proto::v1;

use crate::error::ReplicationError;

/// The shipped form of `record`.
pub fn to_shipped(record: &Record) -> v1::ShippedRecord {
    v1::ShippedRecord {
        lsn: record.lsn.0,
        epoch: record.epoch.0,
        kind_code: u32::from(record.kind.code),
        kind_version: u32::from(record.kind.version),
        payload: record.payload.clone(),
        chain: record.chain.0.to_vec(),
        crc: crc_of(record),
    }
}

/// The record a shipped one carries, checked: field ranges, the chain value's length and the
/// crc. `record_bytes_max` bounds the payload.
pub fn from_shipped(
    shipped: v1::ShippedRecord,
    record_bytes_max: u64,
) -> Result<Record, ReplicationError> {
    let bad = |what: String| ReplicationError::Malformed {
        lsn: Lsn(shipped.lsn),
        what,
    };
    let code = u8::try_from(shipped.kind_code)
        .map_err(|_| bad(format!("kind code {} is out of range", shipped.kind_code)))?;
    let version = u8::try_from(shipped.kind_version).map_err(|_| {
        bad(format!(
            "kind version {} is out of range",
            shipped.kind_version
        ))
    })?;
    let chain: [u8; 32] = shipped.chain.as_slice().try_into().map_err(|_| {
        bad(format!(
            "its chain value has {} bytes, not 32",
            shipped.chain.len()
        ))
    })?;
    if shipped.payload.len() as u64 > record_bytes_max {
        return Err(bad(format!(
            "its payload has {} bytes, more than record_bytes_max ({record_bytes_max})",
            shipped.payload.len()
        )));
    }
    if shipped.lsn == 0 {
        return Err(bad("lsn 0 is not a record's".into()));
    }
    let record = Record {
        lsn: Lsn(shipped.lsn),
        epoch: Epoch(shipped.epoch),
        kind: RecordKind::new(code, version),
        payload: shipped.payload,
        chain: ChainHash(chain),
    };
    let crc = crc_of(&record);
    if crc != shipped.crc {
        return Err(ReplicationError::Malformed {
            lsn: record.lsn,
            what: format!(
                "its crc32 is {:08x}, the frame says {:08x}: damaged on the way",
                crc, shipped.crc
            ),
        });
    }
    Ok(record)
}

/// The frame's crc32 (see the module docs).
fn crc_of(record: &Record) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record.lsn.0.to_le_bytes());
    hasher.update(&record.epoch.0.to_le_bytes());
    hasher.update(&[record.kind.code, record.kind.version]);
    hasher.update(&(record.payload.len() as u32).to_le_bytes());
    hasher.update(&record.payload);
    hasher.update(&record.chain.0);
    hasher.finalize()
}

/// A chain value from its wire form (32 bytes).
pub fn chain_from(bytes: &[u8]) -> Option<ChainHash> {
    bytes.try_into().ok().map(ChainHash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            lsn: Lsn(7),
            epoch: Epoch(2),
            kind: RecordKind::new(1, 1),
            payload: b"decision".to_vec(),
            chain: ChainHash([9; 32]),
        }
    }

    #[test]
    fn a_record_survives_the_trip() {
        let back = from_shipped(to_shipped(&record()), 1 << 20);
        assert_eq!(back.ok(), Some(record()));
    }

    #[test]
    fn a_damaged_frame_is_refused() {
        let mut shipped = to_shipped(&record());
        shipped.payload[0] ^= 1;
        let e = from_shipped(shipped, 1 << 20).expect_err("damaged");
        assert!(e.to_string().contains("crc32"), "{e}");
        let mut shipped = to_shipped(&record());
        shipped.chain.truncate(31);
        let e = from_shipped(shipped, 1 << 20).expect_err("short chain");
        assert!(e.to_string().contains("32"), "{e}");
        let e = from_shipped(to_shipped(&record()), 4).expect_err("too large");
        assert!(e.to_string().contains("record_bytes_max"), "{e}");
    }
}
