//! Heartbeats between the two nodes of a failover pair, both ways, over two paths: UDP
//! datagrams between two dedicated addresses, and the `concord.v1.Heartbeat` gRPC stream on the
//! node's serving address. With one path a NIC or a firewall rule turns into a failover; with
//! two, one path down is a warning and only silence on both says the peer is dead.
//!
//! Every interval a node builds one [`Beat`] — what its source says (address, role, epoch,
//! durable LSN, committed transactions, health verdict, lease, a standby's promise) plus a seq
//! and the last seq it received from the peer — encodes it once and sends the same signed body
//! on both paths ([`seal`]: a keyed blake3 MAC with a key derived from a shared key file). What
//! arrives is checked (size, framing, MAC in constant time, cluster, not from itself, seq not
//! going back on its path) and fed to the pure [`detector::Detector`]: Dead after `deadtime` of
//! silence on every path, Sick after `sicktime` of beats reporting failed probes, else Alive
//! with the silent paths listed. A refused packet is dropped and counted
//! (`concord_heartbeat_dropped_total{path,reason}`), logged at most once per 10 s.
//!
//! Each node, as a gRPC client, opens a stream to its peer's URL and sends its beats; as a
//! server it records the beats a peer's stream brings and answers with its own. So each path
//! runs both ways even when only one of the two streams is up.
//!
//! A standby may promise not to promote for `confirm_ms` ([`Beat::confirm_ms`]), counted from
//! no earlier than when it received the primary's beat it echoes; the primary counts the same
//! span from when it built that beat ([`promise`]), so [`Heartbeats::confirmed_until`] never
//! ends later than the standby's own count (clock rates aside: both are monotonic clocks).
//!
//! # Implementation caveats
//!
//! * A recorded beat replayed by someone on the network is refused while its path is alive
//!   (its seq is not above the last), but after `deadtime` of silence on a path one old beat
//!   is accepted again (a restarted peer whose clock went back must be heard). The MAC stops
//!   forgery, not every replay; keep the heartbeat addresses on a private network.
//! * A peer never heard from is [`PeerState::Unknown`], never Dead.
//! * The UDP source address is not checked (the MAC is); the gRPC stream uses the node's
//!   client credentials ([`Heartbeats::set_credentials`]) for TLS and the bearer token.

pub mod beat;
mod core;
pub mod detector;
pub mod grpc;
pub mod promise;
pub mod seal;
mod udp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use proto::client::Credentials;
use proto::v1::heartbeat_server::HeartbeatServer;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub use beat::{Beat, Role};
pub use detector::{Path, PeerState};
pub use grpc::HeartbeatService;
pub use seal::{DropReason, HeartbeatKey};

use self::core::Core;

/// The metric names of heartbeats.
pub mod metrics {
    /// Received datagrams and messages dropped (labels `path`: `udp`|`grpc`, `reason`: see
    /// [`super::DropReason::label`]).
    pub const DROPPED: &str = "concord_heartbeat_dropped_total";
    /// 1 while beats arrive on the path (label `path`), 0 after `deadtime` of silence on it.
    pub const PATH_UP: &str = "concord_heartbeat_path_up";
}

/// The default interval between two beats (milliseconds).
pub const INTERVAL_MS_DEFAULT: u64 = 100;
/// The default silence on every path after which the peer is dead (milliseconds).
pub const DEADTIME_MS_DEFAULT: u64 = 800;
/// The default span of unhealthy beats after which the peer is sick (milliseconds).
pub const SICKTIME_MS_DEFAULT: u64 = 2000;
/// The shortest interval accepted (milliseconds).
pub const INTERVAL_MS_MIN: u64 = 10;
/// The longest cluster id or node name accepted (bytes).
pub const NAME_BYTES_MAX: usize = 128;

/// What the node's beats say, asked once per interval (cheap: it reads state, it probes
/// nothing).
pub type BeatSource = Arc<dyn Fn() -> Beat + Send + Sync>;

/// Where the heartbeats go and how they are judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// The cluster id (the peer's beats must carry the same).
    pub cluster_id: String,
    /// This node's name (the peer's must differ).
    pub node: String,
    /// The UDP address this node receives on (and sends from).
    pub udp_listen: SocketAddr,
    /// The peer's UDP address, when known.
    pub peer_udp: Option<SocketAddr>,
    /// The peer's gRPC URL (`http://HOST:PORT`), when known.
    pub peer_url: Option<String>,
    /// The interval between two beats (milliseconds).
    pub interval_ms: u64,
    /// Silence on every path for this long: the peer is dead (milliseconds).
    pub deadtime_ms: u64,
    /// Beats reporting failed probes for this long: the peer is sick (milliseconds).
    pub sicktime_ms: u64,
}

impl HeartbeatConfig {
    /// A configuration with the default timings and no peer yet.
    pub fn new(
        cluster_id: impl Into<String>,
        node: impl Into<String>,
        udp_listen: SocketAddr,
    ) -> HeartbeatConfig {
        HeartbeatConfig {
            cluster_id: cluster_id.into(),
            node: node.into(),
            udp_listen,
            peer_udp: None,
            peer_url: None,
            interval_ms: INTERVAL_MS_DEFAULT,
            deadtime_ms: DEADTIME_MS_DEFAULT,
            sicktime_ms: SICKTIME_MS_DEFAULT,
        }
    }

    /// Why this configuration cannot run, if it cannot.
    pub fn check(&self) -> Result<(), HeartbeatError> {
        let bad = |detail: String| Err(HeartbeatError::Config { detail });
        for (what, name) in [("cluster_id", &self.cluster_id), ("node", &self.node)] {
            if name.is_empty() || name.len() > NAME_BYTES_MAX {
                return bad(format!(
                    "{what} must be 1 to {NAME_BYTES_MAX} bytes, not {}",
                    name.len()
                ));
            }
        }
        if self.interval_ms < INTERVAL_MS_MIN {
            return bad(format!(
                "interval_ms is {}, below {INTERVAL_MS_MIN}",
                self.interval_ms
            ));
        }
        if self.deadtime_ms < 2 * self.interval_ms {
            return bad(format!(
                "deadtime_ms ({}) must be at least twice interval_ms ({}): one lost beat must not make the peer dead",
                self.deadtime_ms, self.interval_ms
            ));
        }
        if self.sicktime_ms == 0 {
            return bad("sicktime_ms must be above 0".into());
        }
        Ok(())
    }
}

/// Why heartbeats cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The key file is unreadable or too short: make one and copy it to both nodes.
    #[error(
        "heartbeat key file {path}: {detail}; make one with `head -c 32 /dev/urandom > {path}` and copy it to both nodes (mode 0600)"
    )]
    Key {
        /// The key file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The configuration is inconsistent: fix the `[failover]` table.
    #[error("heartbeat configuration: {detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
    /// The UDP address cannot be bound: another process holds it, or it is not this host's.
    #[error("bind the heartbeat UDP address {addr}: {source}; choose a free address of this host")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// What this node knows of its peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    /// The peer's last accepted beat.
    pub last: Option<Beat>,
    /// How long ago a beat arrived by UDP (milliseconds).
    pub udp_ms_ago: Option<u64>,
    /// How long ago a beat arrived by gRPC (milliseconds).
    pub grpc_ms_ago: Option<u64>,
    /// The detector's verdict now.
    pub state: PeerState,
    /// The last of this node's seqs the peer echoed (None: none yet).
    pub last_seq_echoed_by_peer: Option<u64>,
    /// Datagrams and messages dropped so far, on both paths, for every reason.
    pub dropped_total: u64,
}

/// The peer's addresses as the tasks follow them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerAddresses {
    udp: Option<SocketAddr>,
    url: Option<String>,
}

/// A node's heartbeats: the tasks that send, receive and judge them, and the gRPC service to
/// serve. Stopped by [`Heartbeats::stop`] (or, without waiting, when dropped).
pub struct Heartbeats {
    core: Arc<Core>,
    udp_local: SocketAddr,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Heartbeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeats")
            .field("node", &self.core.cfg.node)
            .field("udp_local", &self.udp_local)
            .finish_non_exhaustive()
    }
}

impl Heartbeats {
    /// Binds `cfg.udp_listen` and starts sending, receiving and judging beats. Must be called
    /// within a tokio runtime. The returned handle's [`service`](Heartbeats::service) is to be
    /// added to the node's gRPC router.
    pub fn start(
        cfg: HeartbeatConfig,
        key: HeartbeatKey,
        source: BeatSource,
    ) -> Result<Arc<Heartbeats>, HeartbeatError> {
        cfg.check()?;
        let bind = |source| HeartbeatError::Bind {
            addr: cfg.udp_listen,
            source,
        };
        let std_socket = std::net::UdpSocket::bind(cfg.udp_listen).map_err(bind)?;
        std_socket.set_nonblocking(true).map_err(bind)?;
        let udp_local = std_socket.local_addr().map_err(bind)?;
        let socket = Arc::new(UdpSocket::from_std(std_socket).map_err(bind)?);
        let core = Core::new(cfg, key, source);
        for path in Path::ALL {
            ::metrics::gauge!(metrics::PATH_UP, "path" => path.label()).set(0.0);
        }
        let tasks = vec![
            tokio::spawn(udp::tick_loop(
                Arc::clone(&core),
                Arc::clone(&socket),
                core.stop.subscribe(),
            )),
            tokio::spawn(udp::receive_loop(
                Arc::clone(&core),
                socket,
                core.stop.subscribe(),
            )),
            tokio::spawn(grpc::client_loop(Arc::clone(&core), core.stop.subscribe())),
        ];
        Ok(Arc::new(Heartbeats {
            core,
            udp_local,
            tasks: Mutex::new(tasks),
        }))
    }

    /// The `concord.v1.Heartbeat` service, to add to the node's gRPC router.
    pub fn service(&self) -> HeartbeatServer<HeartbeatService> {
        HeartbeatService::server(Arc::clone(&self.core))
    }

    /// The UDP address actually bound (its port when `udp_listen` asked for port 0).
    pub fn udp_local_addr(&self) -> SocketAddr {
        self.udp_local
    }

    /// Points the heartbeats at a peer learnt late (or a new one); the gRPC stream reconnects.
    pub fn set_peer(&self, peer_udp: Option<SocketAddr>, peer_url: Option<String>) {
        self.core.peer.send_replace(PeerAddresses {
            udp: peer_udp,
            url: peer_url,
        });
    }

    /// The TLS settings and token of the gRPC stream to the peer (default: plain text, no
    /// token); used from the next connection on.
    pub fn set_credentials(&self, credentials: Credentials) {
        *self
            .core
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = credentials;
    }

    /// What this node knows of its peer now.
    pub fn peer(&self) -> PeerView {
        let now = Instant::now();
        let shared = self.core.lock();
        PeerView {
            last: shared.last.clone(),
            udp_ms_ago: shared.detector.ms_ago(Path::Udp, now),
            grpc_ms_ago: shared.detector.ms_ago(Path::Grpc, now),
            state: shared.detector.state(now),
            last_seq_echoed_by_peer: shared.last.as_ref().map(|b| b.echo_seq).filter(|s| *s > 0),
            dropped_total: shared.drops.values().sum(),
        }
    }

    /// How many datagrams or messages on `path` were dropped for `reason`.
    pub fn dropped(&self, path: Path, reason: DropReason) -> u64 {
        self.core
            .lock()
            .drops
            .get(&(path, reason))
            .copied()
            .unwrap_or(0)
    }

    /// Until when the peer (a standby) promised not to promote, counted from when this node
    /// sent the beat the promise answered; `None` before any promise. Promises only extend it.
    pub fn confirmed_until(&self) -> Option<Instant> {
        self.core.lock().promises.until()
    }

    /// Stops every task and waits for them; served streams end at their next step.
    pub async fn stop(&self) {
        self.core.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            if let Err(e) = task.await
                && e.is_panic()
            {
                tracing::error!(error = %e, "a heartbeat task panicked");
            }
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.core.stop.send_replace(true);
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}
