//! Content streamed to the daemon: an application's [`AsyncRead`] cut into chunks of at most
//! the daemon's `chunk_bytes_max`, sent as a client stream while it is read.
//!
//! At most [`CHUNKS_IN_FLIGHT`] chunks wait between the reader and the connection (HTTP/2 flow
//! control holds back the rest), so a put of any size takes a few chunks of memory. A reader
//! that fails cancels the call: the daemon sees a broken stream and keeps nothing of it, never
//! a truncated file.

use tokio::io::{AsyncRead, AsyncReadExt};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

/// Chunks read ahead of the connection.
pub const CHUNKS_IN_FLIGHT: usize = 2;

/// Why a streamed call failed.
pub(crate) enum Upload {
    /// The application's reader failed.
    Read(std::io::Error),
    /// The daemon (or the transport) answered an error.
    Call(tonic::Status),
}

/// Sends `first`, then `reader`'s content in chunks of at most `chunk_bytes` wrapped by
/// `chunk`, through `call` (which starts the streamed call on the stream it is given).
pub(crate) async fn stream<M, R, F, Fut>(
    first: M,
    mut reader: impl AsyncRead + Unpin,
    chunk_bytes: usize,
    chunk: fn(Vec<u8>) -> M,
    call: F,
) -> Result<R, Upload>
where
    M: Send + 'static,
    F: FnOnce(ReceiverStream<M>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let answer = call(ReceiverStream::new(receiver));
    let feed = async move {
        if sender.send(first).await.is_err() {
            return Ok(());
        }
        loop {
            let piece = read_chunk(&mut reader, chunk_bytes).await?;
            if piece.is_empty() || sender.send(chunk(piece)).await.is_err() {
                return Ok(());
            }
        }
    };
    tokio::pin!(answer);
    tokio::pin!(feed);
    tokio::select! {
        answered = &mut answer => answered.map(tonic::Response::into_inner).map_err(Upload::Call),
        fed = &mut feed => match fed {
            // Dropping the call cancels it: the daemon keeps nothing of a broken stream.
            Err(e) => Err(Upload::Read(e)),
            Ok(()) => answer.await.map(tonic::Response::into_inner).map_err(Upload::Call),
        },
    }
}

/// The next chunk of at most `chunk_bytes` (shorter only at the end; empty at the end).
async fn read_chunk(
    reader: &mut (impl AsyncRead + Unpin),
    chunk_bytes: usize,
) -> std::io::Result<Vec<u8>> {
    let mut piece = Vec::with_capacity(chunk_bytes);
    while piece.len() < chunk_bytes {
        let mut limited = (&mut *reader).take((chunk_bytes - piece.len()) as u64);
        if limited.read_buf(&mut piece).await? == 0 {
            break;
        }
    }
    Ok(piece)
}
