//! The daemon's accepted connections, bounded: at most [`CONNECTIONS_MAX`] at once, each given
//! [`HANDSHAKE_TIMEOUT_MS`] to send its first [`HANDSHAKE_BYTES`] bytes (the HTTP/2 preface),
//! and an accept loop that backs off instead of spinning when the process is out of file
//! descriptors.
//!
//! Without these, a client that opens connections and sends nothing (or a byte a second) holds
//! a file descriptor and a task each for as long as it likes: enough of them and the daemon
//! cannot accept anyone else, nor open a journal segment or a staged file. The HTTP/2 layer
//! bounds what happens after the preface (streams per connection, header list size, frame
//! size, keepalive pings that a dead peer does not answer: see `mod.rs`); this module bounds
//! what happens before.
//!
//! [`Incoming`] is the stream of connections tonic serves; each is a [`Guarded`] stream that
//! holds a place (a semaphore permit) until it is dropped. A connection over the cap is
//! accepted and closed at once, so the kernel's backlog does not fill and its client learns
//! straight away.
//!
//! # Implementation caveats
//!
//! * The cap is global, not per peer address: one client that holds every place keeps the
//!   others out until its connections pass the handshake deadline or stop answering pings.
//! * Only the first bytes have a deadline; a peer that completed the preface and then goes
//!   quiet is closed by the HTTP/2 keepalive (a PING it does not answer), not here.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::codegen::tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::config::{ACCEPT_BACKOFF_MS, CONNECTIONS_MAX, HANDSHAKE_BYTES, HANDSHAKE_TIMEOUT_MS};

/// The listener's connections, at most [`CONNECTIONS_MAX`] open at once.
pub struct Incoming {
    listener: TcpListener,
    places: Arc<Semaphore>,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Serves `listener`'s connections.
    pub fn new(listener: TcpListener) -> Incoming {
        Incoming {
            listener,
            places: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
            backoff: None,
        }
    }

    /// One accepted connection: guarded when a place is free, otherwise closed.
    fn admit(&self, tcp: TcpStream) -> Option<Guarded> {
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            tracing::debug!(
                "closed a connection: {CONNECTIONS_MAX} connections are open (connections_max)"
            );
            return None;
        };
        let _ = tcp.set_nodelay(true);
        Some(Guarded::new(tcp, place))
    }

    /// After an accept error that is not about one connection (out of file descriptors, say):
    /// wait [`ACCEPT_BACKOFF_MS`] before accepting again.
    fn back_off(&mut self, error: &io::Error) {
        tracing::warn!(
            %error,
            "accept a connection; retrying in {ACCEPT_BACKOFF_MS} ms"
        );
        self.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(
            ACCEPT_BACKOFF_MS,
        ))));
    }
}

/// Whether an accept error concerns only the connection being accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl Stream for Incoming {
    type Item = Result<Guarded, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(backoff) = self.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((tcp, _)) => {
                    if let Some(guarded) = self.admit(tcp) {
                        return Poll::Ready(Some(Ok(guarded)));
                    }
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => self.back_off(&e),
            }
        }
    }
}

/// An accepted connection holding its place until dropped, and closed with a `TimedOut` error
/// if its first [`HANDSHAKE_BYTES`] bytes do not arrive within [`HANDSHAKE_TIMEOUT_MS`].
pub struct Guarded {
    tcp: TcpStream,
    handshake: Option<Handshake>,
    _place: OwnedSemaphorePermit,
}

/// The first bytes still expected, and by when.
struct Handshake {
    bytes_left: usize,
    deadline: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(tcp: TcpStream, place: OwnedSemaphorePermit) -> Guarded {
        let deadline = Box::pin(tokio::time::sleep(Duration::from_millis(
            HANDSHAKE_TIMEOUT_MS,
        )));
        Guarded {
            tcp,
            handshake: Some(Handshake {
                bytes_left: HANDSHAKE_BYTES,
                deadline,
            }),
            _place: place,
        }
    }

    /// Counts `n` bytes read against the handshake.
    fn received(&mut self, n: usize) {
        if let Some(h) = self.handshake.as_mut() {
            h.bytes_left = h.bytes_left.saturating_sub(n);
            if h.bytes_left == 0 {
                self.handshake = None;
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(h) = self.handshake.as_mut()
            && h.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client sent less than {HANDSHAKE_BYTES} bytes within {HANDSHAKE_TIMEOUT_MS} ms of connecting"
                ),
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.tcp).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        self.received(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}
