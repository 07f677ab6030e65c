//! Streamed content as an [`AsyncRead`]: the chunks of a client-streamed call go through a
//! small bounded channel into the resource's reader, so a put of any size holds at most
//! [`STREAM_CHUNKS_BUFFERED`](super::config::STREAM_CHUNKS_BUFFERED) chunks in memory.
//!
//! A malformed message or a content size over what the client declared ends the reader with an
//! I/O error, so the resource's write fails instead of keeping truncated content; the caller
//! answers with the recorded [`StreamError`].

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// Why a stream of chunks was cut off.
pub type StreamError = tonic::Status;

/// The reading end: content chunks in order, then EOF; an error ends it.
pub struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    failed: Arc<Mutex<Option<StreamError>>>,
}

/// The feeding end.
pub struct ChunkFeeder {
    tx: mpsc::Sender<Vec<u8>>,
    failed: Arc<Mutex<Option<StreamError>>>,
}

/// A connected feeder and reader.
pub fn channel(buffered: usize) -> (ChunkFeeder, ChunkReader) {
    let (tx, rx) = mpsc::channel(buffered);
    let failed = Arc::new(Mutex::new(None));
    (
        ChunkFeeder {
            tx,
            failed: Arc::clone(&failed),
        },
        ChunkReader {
            rx,
            current: Vec::new(),
            pos: 0,
            failed,
        },
    )
}

impl ChunkFeeder {
    /// Sends one chunk; false when the reader is gone.
    pub async fn send(&self, chunk: Vec<u8>) -> bool {
        self.tx.send(chunk).await.is_ok()
    }

    /// Ends the stream with `error`: the reader fails at its next read.
    pub fn fail(self, error: StreamError) {
        if let Ok(mut failed) = self.failed.lock() {
            *failed = Some(error);
        }
    }
}

impl ChunkReader {
    /// The error the feeder ended the stream with, if any (a handle to read after the reader
    /// has been consumed).
    pub fn failure(&self) -> Arc<Mutex<Option<StreamError>>> {
        Arc::clone(&self.failed)
    }
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.current.len() {
                let n = buf.remaining().min(self.current.len() - self.pos);
                let start = self.pos;
                buf.put_slice(&self.current[start..start + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Poll::Ready(None) => {
                    let failed = self.failed.lock().map(|f| f.is_some()).unwrap_or(true);
                    return Poll::Ready(if failed {
                        Err(io::Error::other("the client's stream was cut off"))
                    } else {
                        Ok(())
                    });
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
