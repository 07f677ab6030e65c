//! The gRPC path: the `concord.v1.Heartbeat` service (a peer's stream: record its beats, answer
//! with this node's) and the client that opens this node's stream to the peer, reconnecting with
//! backoff. Both carry [`v1::SignedBeat`]s, checked like datagrams.

use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use proto::v1;
use proto::v1::heartbeat_client::HeartbeatClient;
use proto::v1::heartbeat_server::{Heartbeat, HeartbeatServer};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::core::Core;
use super::detector::Path;
use super::seal::DropReason;

/// The largest gRPC message accepted (bytes): a signed beat is far smaller.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 4096;
/// The reconnect backoff of the client stream: first and largest wait (milliseconds).
pub const RECONNECT_BACKOFF_MS: (u64, u64) = (100, 1000);

/// The `concord.v1.Heartbeat` service of one node.
#[derive(Clone)]
pub struct HeartbeatService {
    core: Arc<Core>,
}

impl HeartbeatService {
    pub(super) fn server(core: Arc<Core>) -> HeartbeatServer<HeartbeatService> {
        HeartbeatServer::new(HeartbeatService { core })
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
    }
}

/// This node's signed beats as a stream: the current one first, then each new one (a slow
/// reader skips to the latest).
fn own_beats(core: &Core) -> impl Stream<Item = v1::SignedBeat> + Send + 'static {
    let mut rx = core.outbound.subscribe();
    rx.mark_changed();
    futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            let current = rx.borrow_and_update().clone();
            if let Some(beat) = current {
                return Some((beat, rx));
            }
        }
    })
}

/// A stream error that is a bad message (counted) rather than a broken connection.
fn drop_reason(status: &Status) -> Option<DropReason> {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Some(DropReason::Oversize),
        tonic::Code::Internal => Some(DropReason::Malformed),
        _ => None,
    }
}

struct Answering {
    core: Arc<Core>,
    inbound: Streaming<v1::SignedBeat>,
    outbound: Pin<Box<dyn Stream<Item = v1::SignedBeat> + Send>>,
    stop: watch::Receiver<bool>,
}

/// One step of a served stream: record the peer's messages until one of this node's beats is
/// due; `None` ends the stream (the peer closed it, it broke, or the node stops).
async fn answer(mut s: Answering) -> Option<(Result<v1::SignedBeat, Status>, Answering)> {
    loop {
        if *s.stop.borrow() {
            return None;
        }
        tokio::select! {
            message = s.inbound.message() => match message {
                Ok(Some(signed)) => {
                    s.core.receive(Path::Grpc, s.core.key.open_signed(&signed), Instant::now());
                }
                Ok(None) => return None,
                Err(status) => {
                    if let Some(reason) = drop_reason(&status) {
                        s.core.dropped(Path::Grpc, reason, Instant::now());
                    }
                    return None;
                }
            },
            beat = s.outbound.next() => return Some((Ok(beat?), s)),
            _ = s.stop.changed() => return None,
        }
    }
}

#[tonic::async_trait]
impl Heartbeat for HeartbeatService {
    type BeatsStream = Pin<Box<dyn Stream<Item = Result<v1::SignedBeat, Status>> + Send>>;

    async fn beats(
        &self,
        request: Request<Streaming<v1::SignedBeat>>,
    ) -> Result<Response<Self::BeatsStream>, Status> {
        let state = Answering {
            core: Arc::clone(&self.core),
            inbound: request.into_inner(),
            outbound: Box::pin(own_beats(&self.core)),
            stop: self.core.stop.subscribe(),
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            state, answer,
        ))))
    }
}

/// Keeps a stream open to the peer's URL (following [`super::Heartbeats::set_peer`]) until
/// `stop` turns true.
pub(super) async fn client_loop(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let mut peer = core.peer.subscribe();
    let mut delay = RECONNECT_BACKOFF_MS.0;
    loop {
        let url = peer.borrow_and_update().url.clone();
        let mut heard = false;
        let session = async {
            match &url {
                Some(url) => stream_to(&core, url, &mut heard).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            r = session => r,
            _ = peer.changed() => { delay = RECONNECT_BACKOFF_MS.0; continue; }
            _ = stop.changed() => return,
        };
        if let Err(e) = ended {
            tracing::debug!(url = ?url, error = %e, "heartbeat stream to the peer");
        }
        if heard {
            delay = RECONNECT_BACKOFF_MS.0;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            _ = peer.changed() => { delay = RECONNECT_BACKOFF_MS.0; continue; }
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(RECONNECT_BACKOFF_MS.1);
    }
}

/// One stream to `url`: sends this node's beats, records the answers. Ends when the stream
/// breaks or stays silent for deadtime (then a new connection is tried); `heard` turns true
/// when an answer arrives.
async fn stream_to(core: &Core, url: &str, heard: &mut bool) -> Result<(), String> {
    let credentials = core
        .credentials
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let (endpoint, auth) = proto::client::endpoint(url, &credentials).map_err(|e| e.to_string())?;
    let endpoint = endpoint
        .connect_timeout(core.deadtime())
        .http2_keep_alive_interval(core.interval().max(Duration::from_millis(100)))
        .keep_alive_timeout(core.deadtime());
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client = HeartbeatClient::with_interceptor(channel, auth)
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let mut inbound = client
        .beats(own_beats(core))
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    loop {
        let message = tokio::time::timeout(core.deadtime(), inbound.message())
            .await
            .map_err(|_| "the peer's stream was silent for deadtime".to_string())?;
        match message {
            Ok(Some(signed)) => {
                *heard = true;
                core.receive(Path::Grpc, core.key.open_signed(&signed), Instant::now());
            }
            Ok(None) => return Ok(()),
            Err(status) => {
                if let Some(reason) = drop_reason(&status) {
                    core.dropped(Path::Grpc, reason, Instant::now());
                }
                return Err(status.to_string());
            }
        }
    }
}
