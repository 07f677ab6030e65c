//! Global transaction ids, their text form, and a hasher for maps keyed by them.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::str::FromStr;

use journal::Epoch;

use crate::error::ResourceError;

/// A global transaction id: which coordinator node made it, in which epoch, and a sequence number
/// unique within that node across restarts.
///
/// Printed as `n<node>e<epoch>s<seq>` (for example `n1e3s1730000000000042`): no `:`, `/` or
/// spaces, so it can be part of a PostgreSQL gid, a file name or a Maildir name; [`FromStr`]
/// parses exactly that form back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Xid {
    /// The coordinator node.
    pub node: u32,
    /// The epoch the node was serving in.
    pub epoch: Epoch,
    /// Unique per node: seeded above every sequence number in the journal and above the clock in
    /// microseconds at start, then counted up.
    pub seq: u64,
}

impl Xid {
    /// The longest text form: `n`, `e`, `s` and the digits of a `u32` and two `u64`s.
    pub const TEXT_MAX: usize = 3 + 10 + 20 + 20;

    /// The text form (`n<node>e<epoch>s<seq>`, as [`fmt::Display`] prints it), built on the
    /// stack without the formatting machinery.
    pub fn text(&self) -> XidText {
        let mut text = XidText {
            bytes: [0; Xid::TEXT_MAX],
            len: 0,
        };
        text.push(b'n');
        text.push_decimal(u64::from(self.node));
        text.push(b'e');
        text.push_decimal(self.epoch.0);
        text.push(b's');
        text.push_decimal(self.seq);
        text
    }
}

/// An xid's text form in a fixed buffer; see [`Xid::text`].
#[derive(Clone, Copy)]
pub struct XidText {
    bytes: [u8; Xid::TEXT_MAX],
    len: usize,
}

impl XidText {
    /// The text's bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters and digits are ever pushed, so this never fails.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    fn push_decimal(&mut self, mut n: u64) {
        // Two digits at a time, from the right.
        const PAIRS: [u8; 200] = {
            let mut pairs = [0u8; 200];
            let mut i = 0;
            while i < 100 {
                pairs[2 * i] = b'0' + (i / 10) as u8;
                pairs[2 * i + 1] = b'0' + (i % 10) as u8;
                i += 1;
            }
            pairs
        };
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            at -= 2;
            digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            let pair = n as usize * 2;
            at -= 2;
            digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        } else {
            at -= 1;
            digits[at] = b'0' + n as u8;
        }
        let digits = &digits[at..];
        self.bytes[self.len..self.len + digits.len()].copy_from_slice(digits);
        self.len += digits.len();
    }
}

impl fmt::Display for Xid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

/// A fast hasher for maps and sets keyed by [`Xid`]s (or other small integer keys) that this
/// process minted or read from its own journal and resources: a multiply-and-rotate fold, much
/// cheaper than the default SipHash, and not meant for keys an adversary chooses.
#[derive(Clone, Copy, Default)]
pub struct XidHasher(u64);

/// Builds [`XidHasher`]s: `HashMap<Xid, V, XidBuildHasher>`.
pub type XidBuildHasher = BuildHasherDefault<XidHasher>;

impl XidHasher {
    fn fold(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for XidHasher {
    fn finish(&self) -> u64 {
        // hashbrown takes the bucket from the low bits and a tag from the top seven: mix the high
        // bits of the products, which every input bit reaches, into all of them.
        let h = (self.0 ^ (self.0 >> 33)).wrapping_mul(0xff_51_af_d7_ed_55_8c_cd);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.fold(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.fold(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.fold(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.fold(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.fold(n as u64);
    }
}

impl FromStr for Xid {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Xid, ResourceError> {
        let bad = || {
            ResourceError::rejected(
                "xid",
                format!("{s:?} is not an xid (n<node>e<epoch>s<seq>)"),
            )
        };
        let rest = s.strip_prefix('n').ok_or_else(bad)?;
        let (node, rest) = rest.split_once('e').ok_or_else(bad)?;
        let (epoch, seq) = rest.split_once('s').ok_or_else(bad)?;
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        if !digits(node) || !digits(epoch) || !digits(seq) {
            return Err(bad());
        }
        Ok(Xid {
            node: node.parse().map_err(|_| bad())?,
            epoch: Epoch(epoch.parse().map_err(|_| bad())?),
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xids_print_and_parse_back() {
        let xid = Xid {
            node: 7,
            epoch: Epoch(3),
            seq: 1_730_000_000_000_042,
        };
        let text = xid.to_string();
        assert_eq!(text, "n7e3s1730000000000042");
        assert_eq!(text.parse::<Xid>().unwrap(), xid);
        assert_eq!(xid.text().as_str(), text);
        let widest = Xid {
            node: u32::MAX,
            epoch: Epoch(u64::MAX),
            seq: u64::MAX,
        };
        assert_eq!(widest.text().as_bytes().len(), Xid::TEXT_MAX);
        assert_eq!(widest.to_string().parse::<Xid>().unwrap(), widest);
        let zero = Xid {
            node: 0,
            epoch: Epoch(0),
            seq: 0,
        };
        assert_eq!(zero.to_string(), "n0e0s0");
        for seq in [9, 10, 99, 100, 101, 999, 1000, 12_345, 10_000_000_000] {
            let xid = Xid { seq, ..zero };
            assert_eq!(xid.to_string(), format!("n0e0s{seq}"));
        }
    }

    #[test]
    fn the_hasher_spreads_sequential_xids() {
        use std::collections::HashSet;
        use std::hash::BuildHasher;
        let build = XidBuildHasher::default();
        let hash = |seq: u64| {
            build.hash_one(Xid {
                node: 1,
                epoch: Epoch(1),
                seq,
            })
        };
        let low: HashSet<u64> = (0..1024).map(|s| hash(s) & 1023).collect();
        let tags: HashSet<u64> = (0..1024).map(|s| hash(s) >> 57).collect();
        assert!(low.len() > 600, "{}", low.len());
        assert_eq!(tags.len(), 128);
    }

    #[test]
    fn malformed_xids_are_refused() {
        for bad in [
            "",
            "n1e2",
            "n1e2s",
            "x1e2s3",
            "n1e2s3x",
            "n+1e2s3",
            "n1e2s99999999999999999999",
            "n1:e2s3",
        ] {
            assert!(bad.parse::<Xid>().is_err(), "{bad}");
        }
    }
}
