//! The UDP path: one socket bound to `udp_listen`, sending each beat to the peer's address and
//! receiving the peer's. The datagrams are authenticated (see [`super::seal`]); where they come
//! from is not checked, their MAC is.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::core::Core;
use super::detector::Path;
use super::seal::{DATAGRAM_BYTES_MAX, DropReason};

/// Sends one sealed body to the peer's UDP address, if known. A failed send is logged at
/// debug level: the detector on the other side notices the silence.
pub(super) async fn send(core: &Core, socket: &UdpSocket, body: &[u8]) {
    let Some(peer) = core.peer.borrow().udp else {
        return;
    };
    let datagram = core.key.seal_datagram(body);
    if let Err(e) = socket.send_to(&datagram, peer).await {
        tracing::debug!(%peer, error = %e, "send a heartbeat datagram");
    }
}

/// Receives datagrams until `stop` turns true.
pub(super) async fn receive_loop(
    core: Arc<Core>,
    socket: Arc<UdpSocket>,
    mut stop: watch::Receiver<bool>,
) {
    // One byte more than the largest datagram, so an oversize one is seen as such.
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 1];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = stop.changed() => return,
        };
        match received {
            Ok((len, _from)) if len > DATAGRAM_BYTES_MAX => {
                core.receive(Path::Udp, Err(DropReason::Oversize), Instant::now());
            }
            Ok((len, _from)) => {
                let datagram = buf.get(..len).unwrap_or_default();
                core.receive(Path::Udp, core.key.open_datagram(datagram), Instant::now());
            }
            Err(e) => {
                // An ICMP error reported on the socket, say: wait a beat, never spin.
                tracing::debug!(error = %e, "receive a heartbeat datagram");
                tokio::select! {
                    _ = tokio::time::sleep(core.interval()) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Builds and sends a beat every interval (to the gRPC streams through `outbound`, and by UDP),
/// and reports path changes, until `stop` turns true.
pub(super) async fn tick_loop(
    core: Arc<Core>,
    socket: Arc<UdpSocket>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(core.interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = Instant::now();
        if let Some(body) = core.next_body(now) {
            core.outbound
                .send_replace(Some(core.key.sign(body.clone())));
            send(&core, &socket, &body).await;
        }
        core.report_paths(Instant::now());
    }
}
