//! The daemon's settings: where it listens, what it serves (TLS or plain text) and the limits
//! it holds every client to.
//!
//! They come from the configuration's `[daemon]` table ([`adapters::config::DaemonConfig`]);
//! `--listen` overrides its `listen`, and `--listen-any` stands for its
//! `plaintext_any_address`. Before anything opens, [`serving`] checks that the table can serve
//! on that address — TLS or `plaintext = true`, plain text only on loopback unless forced,
//! client tokens or `unauthenticated = true` — and says what to add when it cannot. The limits
//! ([`adapters::config::DaemonLimits`]) are returned by `Begin` in its `Limits`
//! ([`limits`]); what is not configurable stays a constant here.

use std::net::SocketAddr;

use adapters::config::{DaemonConfig, DaemonLimits, ServeRefusal};

/// How long a finished transaction's outcome stays in memory for a second commit or `Outcome`
/// (milliseconds); later `Outcome` reads the journal.
pub const FINISHED_KEEP_MS: u64 = 600_000;
/// How often the daemon forgets finished transactions and clients gone idle when no `Begin`
/// does it (milliseconds).
pub const HOUSEKEEPING_MS: u64 = 1_000;
/// How long closing the coordinator (journal synced and closed) may take (milliseconds).
pub const CLOSE_MS_MAX: u64 = 10_000;
/// How long `Status` waits for a resource's health probe before it calls the resource
/// unhealthy (milliseconds).
pub const HEALTH_PROBE_MS_MAX: u64 = 3_000;
/// Streamed chunks buffered between the network and a resource (messages).
pub const STREAM_CHUNKS_BUFFERED: usize = 4;
/// How long a TLS handshake may take before the connection is dropped (milliseconds).
pub const TLS_HANDSHAKE_MS_MAX: u64 = 10_000;
/// The most client connections open at once; one more is accepted and closed at once.
pub const CONNECTIONS_MAX: usize = 512;
/// How long a new connection has to send its first [`HANDSHAKE_BYTES`] bytes (milliseconds).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// The bytes a new connection must send within [`HANDSHAKE_TIMEOUT_MS`]: the HTTP/2 preface
/// (or, over TLS, the start of its ClientHello).
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

/// The address the daemon listens on (`--listen`, else the table's `listen`), once the table
/// can serve there (`any_address`: `--listen-any`).
pub fn serving(
    daemon: &DaemonConfig,
    listen: Option<SocketAddr>,
    any_address: bool,
) -> Result<SocketAddr, ServeRefusal> {
    let addr = listen.unwrap_or(daemon.listen);
    daemon.check_serving(addr, any_address)?;
    Ok(addr)
}

/// The limits as `Begin` returns them.
pub fn limits(limits: &DaemonLimits) -> proto::v1::Limits {
    proto::v1::Limits {
        message_bytes_max: limits.message_bytes_max as u64,
        chunk_bytes_max: limits.chunk_bytes_max as u64,
        branches_per_txn_max: limits.branches_per_txn_max,
        txns_per_client_max: limits.txns_per_client_max,
        request_timeout_ms: limits.request_timeout_ms,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn plain_text_only_on_loopback_unless_forced() {
        let embedded = DaemonConfig::embedded();
        let any: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        assert_eq!(serving(&embedded, None, false).unwrap(), embedded.listen);
        assert!(matches!(
            serving(&embedded, Some(any), false),
            Err(ServeRefusal::PlaintextNotLoopback { .. })
        ));
        assert_eq!(serving(&embedded, Some(any), true).unwrap(), any);
        assert_eq!(
            serving(&DaemonConfig::default(), None, true),
            Err(ServeRefusal::NoTransport)
        );
    }
}
