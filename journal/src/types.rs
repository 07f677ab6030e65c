//! The small value types every journal record carries: [`Lsn`], [`Epoch`], [`RecordKind`] and
//! [`ChainHash`].

use std::fmt;

/// Log sequence number: the position of a record in the journal.
///
/// LSNs start at 1 and are contiguous: the record after LSN `n` has LSN `n + 1`, across segment
/// boundaries and across restarts. `Lsn::ZERO` means "no record" (the LSN before the first one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The LSN before the first record of a journal.
    pub const ZERO: Lsn = Lsn(0);

    /// The LSN that follows this one.
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }

    /// The LSN before this one (`ZERO` stays `ZERO`).
    pub fn prev(self) -> Lsn {
        Lsn(self.0.saturating_sub(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Fencing epoch: raised by every promotion; every record carries the epoch it was written in.
///
/// Within one journal epochs never decrease in LSN order; an append with an epoch lower than one
/// already accepted is refused ([`crate::JournalError::EpochRegressed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a record means, as a code and the version of its payload encoding.
///
/// The journal stores both bytes and never interprets them; the layers above (the coordinator's
/// `Commit`, `End`, …) own the codes and refuse a version newer than they understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordKind {
    /// The kind code, owned by the layer that writes the record.
    pub code: u8,
    /// The version of the payload encoding of this kind.
    pub version: u8,
}

impl RecordKind {
    /// A kind with the given code and payload version.
    pub const fn new(code: u8, version: u8) -> RecordKind {
        RecordKind { code, version }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/v{}", self.code, self.version)
    }
}

/// The blake3 chain value after a record: `blake3(previous chain ‖ record body)`.
///
/// Two journals hold the same history up to the last LSN whose chain values are equal; a standby
/// or a rejoining primary finds where it diverged by comparing them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The chain value before the first record of a new journal.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    /// Lower-case hex form.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", self.to_hex())
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Lower-case hex of a byte string (the crate's one name for [`hex::encode`]).
pub(crate) fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// A record as read back from the journal, verified (crc and chain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its position.
    pub lsn: Lsn,
    /// The epoch it was written in.
    pub epoch: Epoch,
    /// Its kind and payload version.
    pub kind: RecordKind,
    /// The opaque payload.
    pub payload: Vec<u8>,
    /// The chain value after this record.
    pub chain: ChainHash,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(ChainHash([0xcd; 32]).to_hex(), "cd".repeat(32));
    }
}
