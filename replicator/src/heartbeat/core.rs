//! What the runtime's tasks share: the detector, the promises, the peer's last beat, the
//! per-path seq check, the drop counters, and the beat to send next.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::client::Credentials;
use proto::v1;
use tokio::sync::watch;

use super::beat::Beat;
use super::detector::{Detector, Path};
use super::promise::Promises;
use super::seal::{self, DropReason, HeartbeatKey};
use super::{BeatSource, HeartbeatConfig, PeerAddresses, metrics};

/// Drops are logged at most once per this many milliseconds.
pub(super) const DROP_LOG_INTERVAL_MS: u64 = 10_000;

/// The state behind the lock.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) detector: Detector,
    pub(super) promises: Promises,
    pub(super) last: Option<Beat>,
    /// Per path: the highest seq accepted and when.
    highest: [Option<(u64, Instant)>; 2],
    /// The last seq this node built (the next is one more).
    seq: u64,
    /// The seq of the peer's last accepted beat (what this node echoes).
    echo_seq: u64,
    pub(super) drops: BTreeMap<(Path, DropReason), u64>,
    drops_logged_at: Option<Instant>,
}

/// The runtime's shared part.
pub(super) struct Core {
    pub(super) cfg: HeartbeatConfig,
    pub(super) key: HeartbeatKey,
    source: BeatSource,
    pub(super) shared: Mutex<Shared>,
    /// The signed beat every gRPC stream sends next (`None` before the first tick).
    pub(super) outbound: watch::Sender<Option<v1::SignedBeat>>,
    pub(super) peer: watch::Sender<PeerAddresses>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) credentials: Mutex<Credentials>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn path_slot(path: Path) -> usize {
    match path {
        Path::Udp => 0,
        Path::Grpc => 1,
    }
}

impl Core {
    pub(super) fn new(cfg: HeartbeatConfig, key: HeartbeatKey, source: BeatSource) -> Arc<Core> {
        let peer = PeerAddresses {
            udp: cfg.peer_udp,
            url: cfg.peer_url.clone(),
        };
        let shared = Shared {
            detector: Detector::new(cfg.deadtime_ms, cfg.sicktime_ms),
            promises: Promises::default(),
            last: None,
            highest: [None; 2],
            // Above the clock in milliseconds times 1000, so a restarted node's seqs are above
            // the ones it sent before (unless its clock went back; see `admit`).
            seq: unix_ms().saturating_mul(1000),
            echo_seq: 0,
            drops: BTreeMap::new(),
            drops_logged_at: None,
        };
        Arc::new(Core {
            cfg,
            key,
            source,
            shared: Mutex::new(shared),
            outbound: watch::channel(None).0,
            peer: watch::channel(peer).0,
            stop: watch::channel(false).0,
            credentials: Mutex::new(Credentials::none()),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn deadtime(&self) -> Duration {
        Duration::from_millis(self.cfg.deadtime_ms)
    }

    pub(super) fn interval(&self) -> Duration {
        Duration::from_millis(self.cfg.interval_ms)
    }

    /// The next beat, numbered and noted as sent at `now`, encoded; `None` when it cannot be
    /// encoded within the size limit (logged).
    pub(super) fn next_body(&self, now: Instant) -> Option<Vec<u8>> {
        let mut beat = (self.source)();
        beat.cluster_id.clone_from(&self.cfg.cluster_id);
        beat.node.clone_from(&self.cfg.node);
        beat.sent_unix_ms = unix_ms();
        {
            let mut shared = self.lock();
            shared.seq += 1;
            beat.seq = shared.seq;
            beat.echo_seq = shared.echo_seq;
            shared.promises.sent(beat.seq, now);
        }
        let body = seal::encode_body(beat);
        if body.is_none() {
            tracing::error!(
                "the heartbeat does not fit {} bytes even without its failure lines: shorten the node's address",
                seal::BODY_BYTES_MAX
            );
        }
        body
    }

    /// A datagram or message arrived on `path` at `now`; `opened` is its body or why it was
    /// refused before decoding.
    pub(super) fn receive(&self, path: Path, opened: Result<&[u8], DropReason>, now: Instant) {
        let result = opened
            .and_then(seal::decode_body)
            .and_then(|beat| self.admit(path, beat, now));
        if let Err(reason) = result {
            self.dropped(path, reason, now);
        }
    }

    fn admit(&self, path: Path, beat: Beat, now: Instant) -> Result<(), DropReason> {
        if beat.cluster_id != self.cfg.cluster_id {
            return Err(DropReason::WrongCluster);
        }
        if beat.node == self.cfg.node {
            return Err(DropReason::OwnNode);
        }
        let mut shared = self.lock();
        let slot = path_slot(path);
        // A seq at or below the highest one on this path is a copy (the same beat on the other
        // gRPC stream: ignored) or a replay (counted). After deadtime of silence on the path
        // anything goes: the peer may have restarted with its clock set back.
        if let Some((highest, at)) = shared.highest[slot]
            && now.saturating_duration_since(at) < self.deadtime()
        {
            if beat.seq == highest {
                return Ok(());
            }
            if beat.seq < highest {
                return Err(DropReason::Stale);
            }
        }
        shared.highest[slot] = Some((beat.seq, now));
        shared.detector.on_beat(path, now, beat.healthy);
        shared.promises.received(beat.echo_seq, beat.confirm_ms);
        shared.echo_seq = beat.seq;
        shared.last = Some(beat);
        Ok(())
    }

    /// Counts a drop; logs at most once per [`DROP_LOG_INTERVAL_MS`].
    pub(super) fn dropped(&self, path: Path, reason: DropReason, now: Instant) {
        ::metrics::counter!(metrics::DROPPED, "path" => path.label(), "reason" => reason.label())
            .increment(1);
        let mut shared = self.lock();
        *shared.drops.entry((path, reason)).or_insert(0) += 1;
        let due = shared.drops_logged_at.is_none_or(|at| {
            now.saturating_duration_since(at) >= Duration::from_millis(DROP_LOG_INTERVAL_MS)
        });
        if due {
            shared.drops_logged_at = Some(now);
            let total: u64 = shared.drops.values().sum();
            drop(shared);
            tracing::warn!(
                path = path.label(),
                reason = reason.label(),
                dropped_total = total,
                "dropped a heartbeat that is not an authentic beat of this cluster's peer (check that both nodes use the same key file and cluster; logged at most every {DROP_LOG_INTERVAL_MS} ms)"
            );
        }
    }

    /// Logs and publishes each path whose state changed.
    pub(super) fn report_paths(&self, now: Instant) {
        let changes = self.lock().detector.path_changes(now);
        for (path, up) in changes {
            ::metrics::gauge!(metrics::PATH_UP, "path" => path.label()).set(if up {
                1.0
            } else {
                0.0
            });
            if up {
                tracing::info!(path = path.label(), "heartbeat path up");
            } else {
                tracing::warn!(
                    path = path.label(),
                    deadtime_ms = self.cfg.deadtime_ms,
                    "heartbeat path down: no beat from the peer on it for deadtime (a warning, not a failover, while the other path is alive)"
                );
            }
        }
    }
}
