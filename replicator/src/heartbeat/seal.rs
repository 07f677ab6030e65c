//! The shared key, and a beat sealed for the wire: a datagram is `CHB1` ‖ body length (u16, big
//! endian) ‖ body (an encoded [`v1::Beat`]) ‖ a 32-byte keyed blake3 hash over everything before
//! it; the gRPC path carries the same body and hash in a [`v1::SignedBeat`]. Opening checks, in
//! this order and without a panic on any input: the size, the magic and length, the hash (in
//! constant time), the encoding — each refusal a [`DropReason`].

use std::fmt;
use std::path::Path;

use proto::v1;

use super::HeartbeatError;
use super::beat::Beat;

/// The first four bytes of every datagram.
pub const MAGIC: &[u8; 4] = b"CHB1";
/// The largest datagram sent or accepted (bytes): below a 1500-byte Ethernet MTU with IPv6 and
/// UDP headers, so a beat is never fragmented.
pub const DATAGRAM_BYTES_MAX: usize = 1400;
/// The length of the MAC (bytes).
pub const MAC_BYTES: usize = 32;
const HEADER_BYTES: usize = MAGIC.len() + 2;
/// The largest encoded beat (bytes).
pub const BODY_BYTES_MAX: usize = DATAGRAM_BYTES_MAX - HEADER_BYTES - MAC_BYTES;
/// The shortest key file accepted (bytes).
pub const KEY_FILE_BYTES_MIN: usize = 16;
/// The context string of the key derivation (changing it changes every key).
const KEY_CONTEXT: &str = "concord heartbeat v1";
/// At most this many failure lines travel in one beat.
pub const FAILURES_MAX: usize = 8;
/// A failure line is cut to this length (bytes).
pub const FAILURE_BYTES_MAX: usize = 160;

/// Why a received datagram or message was dropped (the `reason` label of
/// `concord_heartbeat_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Longer than [`DATAGRAM_BYTES_MAX`] (or its body longer than [`BODY_BYTES_MAX`]).
    Oversize,
    /// Not a beat: wrong magic, truncated, a length that does not match, an undecodable body.
    Malformed,
    /// The MAC does not check: another key, or damaged or forged bytes.
    BadMac,
    /// A beat of another cluster (same key, other `cluster_id`).
    WrongCluster,
    /// A beat from this node itself (the peer address points back here).
    OwnNode,
    /// A seq below one already received on the same path (a replay, or reordering).
    Stale,
}

impl DropReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Oversize => "oversize",
            DropReason::Malformed => "malformed",
            DropReason::BadMac => "bad_mac",
            DropReason::WrongCluster => "wrong_cluster",
            DropReason::OwnNode => "own_node",
            DropReason::Stale => "stale",
        }
    }
}

/// The 32-byte key both nodes derive from the same key file. Its `Debug` hides it.
#[derive(Clone)]
pub struct HeartbeatKey([u8; 32]);

impl fmt::Debug for HeartbeatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeartbeatKey(<hidden>)")
    }
}

impl HeartbeatKey {
    /// Derives the key from the content of `path` (any bytes, at least
    /// [`KEY_FILE_BYTES_MIN`]).
    pub fn from_file(path: &Path) -> Result<HeartbeatKey, HeartbeatError> {
        let bytes = std::fs::read(path).map_err(|e| HeartbeatError::Key {
            path: path.display().to_string(),
            detail: format!("cannot read it: {e}"),
        })?;
        HeartbeatKey::from_bytes(&bytes).map_err(|detail| HeartbeatError::Key {
            path: path.display().to_string(),
            detail,
        })
    }

    /// Derives the key from `bytes` (at least [`KEY_FILE_BYTES_MIN`]); the error says why not.
    pub fn from_bytes(bytes: &[u8]) -> Result<HeartbeatKey, String> {
        if bytes.len() < KEY_FILE_BYTES_MIN {
            return Err(format!(
                "it holds {} bytes, fewer than {KEY_FILE_BYTES_MIN}",
                bytes.len()
            ));
        }
        Ok(HeartbeatKey(blake3::derive_key(KEY_CONTEXT, bytes)))
    }

    fn mac(&self, body: &[u8]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(MAGIC);
        hasher.update(&body_len(body).to_be_bytes());
        hasher.update(body);
        hasher.finalize()
    }

    /// The datagram of `body` (at most [`BODY_BYTES_MAX`] bytes, as [`encode_body`] makes it).
    pub fn seal_datagram(&self, body: &[u8]) -> Vec<u8> {
        let mut datagram = Vec::with_capacity(HEADER_BYTES + body.len() + MAC_BYTES);
        datagram.extend_from_slice(MAGIC);
        datagram.extend_from_slice(&body_len(body).to_be_bytes());
        datagram.extend_from_slice(body);
        datagram.extend_from_slice(self.mac(body).as_bytes());
        datagram
    }

    /// The gRPC message of `body`.
    pub fn sign(&self, body: Vec<u8>) -> v1::SignedBeat {
        let mac = self.mac(&body).as_bytes().to_vec();
        v1::SignedBeat { body, mac }
    }

    /// The body of a datagram whose size, framing and MAC check.
    pub fn open_datagram<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], DropReason> {
        if datagram.len() > DATAGRAM_BYTES_MAX {
            return Err(DropReason::Oversize);
        }
        let rest = datagram
            .strip_prefix(MAGIC.as_slice())
            .ok_or(DropReason::Malformed)?;
        let (len, rest) = rest.split_first_chunk::<2>().ok_or(DropReason::Malformed)?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() != len + MAC_BYTES {
            return Err(DropReason::Malformed);
        }
        let (body, mac) = rest.split_at(len);
        self.check(body, mac)?;
        Ok(body)
    }

    /// The body of a gRPC message whose size and MAC check.
    pub fn open_signed<'a>(&self, signed: &'a v1::SignedBeat) -> Result<&'a [u8], DropReason> {
        if signed.body.len() > BODY_BYTES_MAX {
            return Err(DropReason::Oversize);
        }
        self.check(&signed.body, &signed.mac)?;
        Ok(&signed.body)
    }

    fn check(&self, body: &[u8], mac: &[u8]) -> Result<(), DropReason> {
        let mac: [u8; MAC_BYTES] = mac.try_into().map_err(|_| DropReason::Malformed)?;
        // `blake3::Hash`'s equality is constant-time.
        if self.mac(body) == blake3::Hash::from_bytes(mac) {
            Ok(())
        } else {
            Err(DropReason::BadMac)
        }
    }
}

/// The length of a body as the header carries it (bodies are at most [`BODY_BYTES_MAX`], so it
/// fits; a longer one would fail to open on the other side, never here).
fn body_len(body: &[u8]) -> u16 {
    u16::try_from(body.len()).unwrap_or(u16::MAX)
}

/// The encoding of `beat`, made to fit [`BODY_BYTES_MAX`]: at most [`FAILURES_MAX`] failure
/// lines of at most [`FAILURE_BYTES_MAX`] bytes, then failure lines left out from the last
/// until it fits. `None` when even without failures it does not (names or URL far too long).
pub fn encode_body(beat: Beat) -> Option<Vec<u8>> {
    let mut wire = v1::Beat::from(beat);
    let total = wire.failures.len();
    wire.failures.truncate(FAILURES_MAX);
    for line in &mut wire.failures {
        cut(line, FAILURE_BYTES_MAX);
    }
    while proto::heartbeat::encoded_len(&wire) > BODY_BYTES_MAX {
        wire.failures.pop()?;
    }
    if wire.failures.is_empty() && total > 0 {
        // Keep the verdict readable: say that there were failures, even if none fit.
        let note = format!("{total} probe failures (too long to send)");
        let mut with_note = wire.clone();
        with_note.failures.push(note);
        if proto::heartbeat::encoded_len(&with_note) <= BODY_BYTES_MAX {
            wire = with_note;
        }
    }
    Some(proto::heartbeat::encode(&wire))
}

/// Cuts `line` to at most `bytes_max` bytes, at a character boundary.
fn cut(line: &mut String, bytes_max: usize) {
    if line.len() <= bytes_max {
        return;
    }
    let mut end = bytes_max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
}

/// The beat in `body` (an opened body), or [`DropReason::Malformed`].
pub fn decode_body(body: &[u8]) -> Result<Beat, DropReason> {
    let wire = proto::heartbeat::decode(body).ok_or(DropReason::Malformed)?;
    Beat::try_from(wire).map_err(|_| DropReason::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> HeartbeatKey {
        HeartbeatKey::from_bytes(&[byte; 32]).unwrap()
    }

    fn body() -> Vec<u8> {
        encode_body(Beat {
            cluster_id: "c1".into(),
            node: "a".into(),
            seq: 5,
            ..Beat::default()
        })
        .unwrap()
    }

    #[test]
    fn a_sealed_datagram_opens_with_the_same_key_only() {
        let body = body();
        let datagram = key(1).seal_datagram(&body);
        assert!(datagram.len() <= DATAGRAM_BYTES_MAX);
        assert_eq!(key(1).open_datagram(&datagram).unwrap(), body.as_slice());
        assert_eq!(key(2).open_datagram(&datagram), Err(DropReason::BadMac));
        let signed = key(1).sign(body.clone());
        assert_eq!(key(1).open_signed(&signed).unwrap(), body.as_slice());
        assert_eq!(key(2).open_signed(&signed), Err(DropReason::BadMac));
    }

    #[test]
    fn every_damage_is_a_drop_reason() {
        let datagram = key(1).seal_datagram(&body());
        for cut in 0..datagram.len() {
            assert!(
                key(1).open_datagram(&datagram[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        for i in 0..datagram.len() {
            let mut bad = datagram.clone();
            bad[i] ^= 0x40;
            assert!(key(1).open_datagram(&bad).is_err(), "flip at {i}");
        }
        assert_eq!(
            key(1).open_datagram(&[0u8; DATAGRAM_BYTES_MAX + 1]),
            Err(DropReason::Oversize)
        );
        assert_eq!(
            key(1).open_datagram(b"garbage garbage"),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(HeartbeatKey::from_bytes(&[7; KEY_FILE_BYTES_MIN - 1]).is_err());
        assert!(!format!("{:?}", key(1)).contains('1'));
    }

    #[test]
    fn long_failure_lists_are_cut_to_fit() {
        let beat = Beat {
            failures: vec!["x".repeat(5000); 40],
            ..Beat::default()
        };
        let body = encode_body(beat).unwrap();
        assert!(body.len() <= BODY_BYTES_MAX);
        let back = decode_body(&body);
        // The default role is a valid one, so the beat decodes.
        let back = back.unwrap();
        assert!(!back.failures.is_empty());
        assert!(back.failures.iter().all(|f| f.len() <= FAILURE_BYTES_MAX));
        let huge = Beat {
            address: "h".repeat(4000),
            ..Beat::default()
        };
        assert!(encode_body(huge).is_none());
    }
}
