//! The encoding of a heartbeat's body ([`v1::Beat`]), for the replicator's heartbeats, which
//! sign and check the bytes themselves (the same body travels in a UDP datagram and in a
//! [`v1::SignedBeat`]), so they need the bytes rather than a message.

use prost::Message;

use crate::v1;

/// The encoding of `beat`.
pub fn encode(beat: &v1::Beat) -> Vec<u8> {
    beat.encode_to_vec()
}

/// The length of [`encode`]'s result, without encoding (bytes).
pub fn encoded_len(beat: &v1::Beat) -> usize {
    beat.encoded_len()
}

/// The beat encoded in `body`, or `None` when it is not a valid encoding.
pub fn decode(body: &[u8]) -> Option<v1::Beat> {
    v1::Beat::decode(body).ok()
}
