//! The daemon's settings: where it listens and the limits it holds every client to.
//!
//! The limits are constants for now (the configuration's `[daemon]` table belongs to the
//! configuration crate and does not carry them yet); `Begin` returns them in its `Limits`.
//! The listen address comes from the command line, and a non-loopback one is refused unless
//! the operator forces it: the daemon speaks plain text, without credentials.

use std::net::SocketAddr;

/// The largest message the daemon decodes (bytes).
pub const MESSAGE_BYTES_MAX: usize = 4 << 20;
/// The largest content chunk of a streamed call (bytes).
pub const CHUNK_BYTES_MAX: usize = 1 << 20;
/// The most branches one transaction may have.
pub const BRANCHES_PER_TXN_MAX: u32 = 16;
/// The most transactions one client (one peer IP address) may have open at once.
pub const TXNS_PER_CLIENT_MAX: u32 = 256;
/// The longest one call may take (milliseconds).
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// How long a finished transaction's outcome stays in memory for a second commit or `Outcome`
/// (milliseconds); later `Outcome` reads the journal.
pub const FINISHED_KEEP_MS: u64 = 600_000;
/// How long SIGTERM waits for commits in flight (milliseconds).
pub const DRAIN_MS_MAX: u64 = 10_000;
/// How long closing the coordinator (journal synced and closed) may take (milliseconds).
pub const CLOSE_MS_MAX: u64 = 10_000;
/// Streamed chunks buffered between the network and a resource (messages).
pub const STREAM_CHUNKS_BUFFERED: usize = 4;

/// The most client connections open at once; one more is accepted and closed at once.
pub const CONNECTIONS_MAX: usize = 512;
/// How long a new connection has to send its first [`HANDSHAKE_BYTES`] bytes (milliseconds).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// The bytes a new connection must send within [`HANDSHAKE_TIMEOUT_MS`]: the HTTP/2 preface.
pub const HANDSHAKE_BYTES: usize = 24;
/// How long the accept loop waits after an error that is not about one connection (out of file
/// descriptors, say) before it accepts again (milliseconds).
pub const ACCEPT_BACKOFF_MS: u64 = 100;
/// Concurrent HTTP/2 streams (calls) per connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 128;
/// The largest header list of one call (bytes, as HTTP/2 counts them).
pub const HEADER_LIST_BYTES_MAX: u32 = 16 << 10;
/// How long a connection may stay silent before the daemon sends it an HTTP/2 PING
/// (milliseconds) …
pub const KEEPALIVE_INTERVAL_MS: u64 = 10_000;
/// … and how long the PING may stay unanswered before the connection is closed (milliseconds).
pub const KEEPALIVE_TIMEOUT_MS: u64 = 5_000;

/// The default listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7700";

/// A listen address the daemon refuses.
#[derive(Debug, thiserror::Error)]
#[error(
    "--listen {addr} is not a loopback address: the daemon speaks plain text without credentials, so it listens on 127.0.0.0/8 or ::1 only; pass --listen-any to listen there anyway"
)]
pub struct NotLoopback {
    /// The address refused.
    pub addr: SocketAddr,
}

/// Checks `addr`: loopback, or any address when `any` is given.
pub fn check_listen(addr: SocketAddr, any: bool) -> Result<SocketAddr, NotLoopback> {
    if any || addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(NotLoopback { addr })
    }
}

/// The limits as `Begin` returns them.
pub fn limits() -> proto::v1::Limits {
    proto::v1::Limits {
        message_bytes_max: MESSAGE_BYTES_MAX as u64,
        chunk_bytes_max: CHUNK_BYTES_MAX as u64,
        branches_per_txn_max: BRANCHES_PER_TXN_MAX,
        txns_per_client_max: TXNS_PER_CLIENT_MAX,
        request_timeout_ms: REQUEST_TIMEOUT_MS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_forced() {
        let local: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        assert!(check_listen(local, false).is_ok());
        assert!(check_listen(any, false).is_err());
        assert!(check_listen(any, true).is_ok());
    }
}
