//! The primary's side: shipping its journal to standbys, holding the retention floor for
//! them, and sync replication's commit gate.
//!
//! A [`Shipper`] belongs to a coordinator daemon. Each standby that connects gets its own
//! stream ([`ship`]): the primary checks its `Hello` (cluster, epoch, journal format, that the
//! standby's last record is the primary's record at that LSN, that the records it needs are
//! still here), then reads its journal from the standby's next LSN and sends each decision
//! record's blobs before the record, in batches; a standby that caught up gets `Progress`
//! every [`PROGRESS_MS`] so that both sides know the link is alive.
//!
//! **Retention floor.** The shipper remembers each standby it has seen, by name, with the LSN
//! it last acknowledged, and holds the coordinator's retention floor at the lowest of them plus
//! one ([`coordinator::retention::Retention::hold_floor`]): segments (and the blobs their
//! records name) stay until every standby has them. When keeping them for a standby would
//! hold more than `retention_bytes_max` of journal, that standby is let go — logged at
//! ERROR — and when it comes back for records the journal no longer holds, it is told to be
//! re-seeded.
//!
//! **Sync mode** ([`SyncGate`], the coordinator's [`coordinator::CommitGate`]): a commit is
//! answered once a standby has acknowledged a durable LSN at or above the primary's durable
//! LSN when the decision was made durable. When none does within `sync_wait_ms_max`, the commit
//! either fails ([`adapters::config::SyncFallback::Fail`]: it is committed here, and the caller
//! is told it is not confirmed) or the primary falls back to async
//! ([`adapters::config::SyncFallback::Async`]) until a standby has caught up with its durable
//! LSN again. Every change of that state is logged (WARN when falling back, INFO when back) and
//! shown in status (`sync_state`) and the metric `concord_replication_sync`.
//!
//! # Implementation caveats
//!
//! * The standbys seen and their acknowledged LSNs are kept in memory: after a restart of the
//!   primary, the floor is held again once a standby reconnects; a checkpoint in between may
//!   remove what a disconnected standby still needed (it is then told to re-seed).
//! * Any standby's acknowledgement confirms a sync commit (one standby is enough).

pub mod ship;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use adapters::config::{ReplicationConfig, ReplicationMode, SyncFallback};
use coordinator::Coordinator;
use journal::Lsn;
use proto::v1;
use tokio::sync::watch;

use crate::error::ReplicationError;
use crate::standby::now_ms;

/// How often a standby that caught up hears from the primary (milliseconds).
pub const PROGRESS_MS: u64 = 1_000;

/// What the primary knows of one standby.
#[derive(Clone, Debug, Default)]
pub struct StandbyState {
    /// Whether its stream is up.
    pub connected: bool,
    /// The highest LSN sent to it.
    pub shipped: Lsn,
    /// Its durable LSN as acknowledged.
    pub acknowledged: Lsn,
    /// Its replayed LSN as acknowledged.
    pub replayed: Lsn,
    /// Whether the retention floor is held for it (false once it fell past the bound).
    pub held: bool,
    /// Bytes shipped to it and not yet acknowledged (estimated from the records' payloads).
    pub unacknowledged_bytes: u64,
    /// When it last acknowledged (milliseconds since the Unix epoch).
    pub acknowledged_at_ms: u64,
    /// The stream serving it now (a reconnection supersedes the stream before it).
    pub stream: u64,
}

/// The primary's replication state; see the module docs.
pub struct Shipper {
    coordinator: Coordinator,
    cluster_id: String,
    config: ReplicationConfig,
    standbys: Mutex<BTreeMap<String, StandbyState>>,
    /// The highest LSN any standby acknowledged (what sync commits wait for).
    acknowledged: watch::Sender<Lsn>,
    fallen_back: AtomicBool,
    /// The durable LSN when commits stopped waiting: a standby that acknowledges it brings
    /// sync back (the durable LSN of the moment would always be ahead under steady load).
    fallback_target: AtomicU64,
    waiting: AtomicUsize,
    stop: watch::Sender<bool>,
}

impl Shipper {
    /// A shipper for `coordinator`'s journal, in cluster `cluster_id`.
    pub fn new(
        coordinator: Coordinator,
        cluster_id: String,
        config: ReplicationConfig,
    ) -> Arc<Self> {
        let shipper = Arc::new(Shipper {
            coordinator,
            cluster_id,
            config,
            standbys: Mutex::new(BTreeMap::new()),
            acknowledged: watch::Sender::new(Lsn(0)),
            fallen_back: AtomicBool::new(false),
            fallback_target: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            stop: watch::Sender::new(false),
        });
        shipper.publish_sync_state();
        shipper
    }

    /// The sync gate to install in the coordinator ([`Coordinator::set_commit_gate`]) when the
    /// mode is sync.
    pub fn gate(self: &Arc<Self>) -> Option<Arc<SyncGate>> {
        (self.config.mode == ReplicationMode::Sync).then(|| {
            Arc::new(SyncGate {
                shipper: Arc::clone(self),
            })
        })
    }

    /// With `sync_fallback = "async"`: commits stop waiting for a standby now, until one
    /// acknowledges the durable LSN of this moment — for a primary that knows it has no
    /// standby (it just took over from a dead one). Returns whether it fell back.
    pub fn fall_back_now(&self, why: &str) -> bool {
        if self.config.mode != ReplicationMode::Sync
            || self.config.sync_fallback != SyncFallback::Async
        {
            return false;
        }
        let here = self.coordinator.journal().durable_lsn();
        self.fallback_target.store(here.0, Ordering::Release);
        if !self.fallen_back.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "{why}: commits do not wait for a standby (sync_fallback = \"async\") until one acknowledges lsn {here}"
            );
            self.publish_sync_state();
        }
        true
    }

    /// Ends every stream (the daemon is stopping).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicationConfig {
        &self.config
    }

    pub(crate) fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    fn standbys(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StandbyState>> {
        self.standbys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A standby connected, wanting records from `from`: it counts for the retention floor
    /// from now on. Returns the stream's number: a later stream of the same name supersedes it.
    pub(crate) fn connected(&self, name: &str, from: Lsn) -> u64 {
        let mut standbys = self.standbys();
        let s = standbys.entry(name.to_string()).or_default();
        s.connected = true;
        s.held = true;
        s.acknowledged = s.acknowledged.max(from.prev());
        s.shipped = from.prev();
        s.acknowledged_at_ms = now_ms();
        s.stream += 1;
        let stream = s.stream;
        self.hold_floor_locked(&mut standbys);
        stream
    }

    /// Stream `stream` of a standby ended (a later stream of the same name is left alone).
    pub(crate) fn disconnected(&self, name: &str, stream: u64) {
        if let Some(s) = self.standbys().get_mut(name)
            && s.stream == stream
        {
            s.connected = false;
            s.unacknowledged_bytes = 0;
        }
        self.publish_sync_state();
    }

    /// Records were sent to a standby.
    pub(crate) fn shipped(&self, name: &str, upto: Lsn, bytes: u64) {
        if let Some(s) = self.standbys().get_mut(name) {
            s.shipped = s.shipped.max(upto);
            s.unacknowledged_bytes += bytes;
        }
    }

    /// A standby acknowledged. An acknowledgement beyond what was shipped to it (a standby
    /// with a bug, or a hostile one) counts only up to what was shipped.
    pub(crate) fn acknowledged(&self, name: &str, durable: Lsn, replayed: Lsn) {
        let durable = {
            let mut standbys = self.standbys();
            let Some(s) = standbys.get_mut(name) else {
                return;
            };
            let durable = durable.min(s.shipped);
            if durable >= s.shipped {
                s.unacknowledged_bytes = 0;
            }
            s.acknowledged = s.acknowledged.max(durable);
            s.replayed = s.replayed.max(replayed.min(durable));
            s.acknowledged_at_ms = now_ms();
            durable
        };
        self.acknowledged.send_if_modified(|a| {
            let moved = durable > *a;
            *a = (*a).max(durable);
            moved
        });
        let target = Lsn(self.fallback_target.load(Ordering::Acquire));
        if self.fallen_back.load(Ordering::Acquire)
            && durable >= target
            && self.fallen_back.swap(false, Ordering::AcqRel)
        {
            tracing::info!(
                standby = name,
                "a standby caught up with lsn {target}: commits wait for it again (sync)"
            );
            self.publish_sync_state();
        }
    }

    /// Holds the retention floor at the lowest acknowledged LSN of the standbys held, and lets
    /// a standby go when holding it would exceed `retention_bytes_max`.
    pub fn hold_floor(&self) {
        let mut standbys = self.standbys();
        self.hold_floor_locked(&mut standbys);
    }

    /// [`Shipper::hold_floor`] under the standbys' lock, which is held until the floor is
    /// stored: two callers cannot store their floors in the other order.
    fn hold_floor_locked(&self, standbys: &mut BTreeMap<String, StandbyState>) {
        let journal = self.coordinator.journal();
        for (name, s) in standbys.iter_mut().filter(|(_, s)| s.held) {
            let bytes = journal.retained_bytes_from(s.acknowledged.next());
            if bytes > self.config.retention_bytes_max {
                s.held = false;
                tracing::error!(
                    standby = %name,
                    acknowledged = s.acknowledged.0,
                    bytes,
                    "standby {name} is more than retention_bytes_max ({}) behind: the journal no longer waits for it; once its records are removed it must be re-seeded (concord standby --reseed)",
                    self.config.retention_bytes_max
                );
            }
        }
        let floor = standbys
            .values()
            .filter(|s| s.held)
            .map(|s| s.acknowledged.next())
            .min();
        self.coordinator.retention().hold_floor(floor);
    }

    /// Where a re-seeded standby named `name` starts: the position before the lowest LSN the
    /// coordinator still needs (so every transaction decided before it has finished phase 2,
    /// and its effects are in the resources the standby copies next). Holds the retention floor
    /// there for that standby from now on.
    pub fn reseed_position(&self, name: &str) -> Result<journal::StartPosition, ReplicationError> {
        let journal = self.coordinator.journal();
        let keep_from = self
            .coordinator
            .retention()
            .keep_from(journal.durable_lsn())
            .max(journal.oldest_lsn());
        let position = journal.position_before(keep_from)?;
        {
            let mut standbys = self.standbys();
            let s = standbys.entry(name.to_string()).or_default();
            s.held = true;
            s.acknowledged = position.lsn;
            s.shipped = position.lsn;
            s.acknowledged_at_ms = now_ms();
            self.hold_floor_locked(&mut standbys);
        }
        tracing::info!(
            standby = name,
            lsn = position.lsn.0,
            "re-seeding standby {name} from lsn {}",
            position.lsn
        );
        Ok(position)
    }

    /// Every standby, by name.
    pub fn standby_states(&self) -> BTreeMap<String, StandbyState> {
        self.standbys().clone()
    }

    /// The sync state as status shows it.
    pub fn sync_state(&self) -> &'static str {
        match self.config.mode {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync if self.fallen_back.load(Ordering::Acquire) => "fallback-async",
            ReplicationMode::Sync if self.waiting.load(Ordering::Acquire) > 0 => "waiting",
            ReplicationMode::Sync => "sync",
        }
    }

    fn publish_sync_state(&self) {
        let sync =
            self.config.mode == ReplicationMode::Sync && !self.fallen_back.load(Ordering::Acquire);
        metrics::gauge!(crate::metrics::SYNC).set(if sync { 1.0 } else { 0.0 });
    }

    /// The primary's replication status.
    pub fn status(&self) -> v1::ReplicationStatus {
        let durable = self.coordinator.journal().durable_lsn();
        let now = now_ms();
        let standbys: Vec<v1::StandbyStatus> = self
            .standby_states()
            .into_iter()
            .map(|(name, s)| {
                let lag = v1::Lag {
                    records: durable.0.saturating_sub(s.acknowledged.0),
                    bytes: s.unacknowledged_bytes,
                    transactions: 0,
                    seconds: if s.acknowledged >= durable {
                        0.0
                    } else {
                        now.saturating_sub(s.acknowledged_at_ms) as f64 / 1000.0
                    },
                };
                v1::StandbyStatus {
                    name,
                    connected: s.connected,
                    shipped_lsn: s.shipped.0,
                    acknowledged_lsn: s.acknowledged.0,
                    replayed_lsn: s.replayed.0,
                    lag: Some(lag),
                }
            })
            .collect();
        let lowest = |f: fn(&v1::StandbyStatus) -> u64| standbys.iter().map(f).min().unwrap_or(0);
        v1::ReplicationStatus {
            mode: self.config.mode.as_str().into(),
            sync_state: self.sync_state().into(),
            primary: String::new(),
            connected: standbys.iter().any(|s| s.connected),
            durable_lsn: durable.0,
            shipped_lsn: standbys.iter().map(|s| s.shipped_lsn).max().unwrap_or(0),
            acknowledged_lsn: lowest(|s| s.acknowledged_lsn),
            replayed_lsn: lowest(|s| s.replayed_lsn),
            lag: standbys
                .iter()
                .filter_map(|s| s.lag)
                .max_by_key(|l| l.records),
            resources: Vec::new(),
            oldest_unreplayed: None,
            standbys,
        }
    }

    /// Updates the per-standby metrics.
    pub fn publish_metrics(&self) {
        let durable = self.coordinator.journal().durable_lsn();
        for (name, s) in self.standby_states() {
            let labels = [("standby", name)];
            metrics::gauge!(crate::metrics::ACKNOWLEDGED_LSN, &labels).set(s.acknowledged.0 as f64);
            metrics::gauge!(crate::metrics::SHIPPED_LSN, &labels).set(s.shipped.0 as f64);
            metrics::gauge!(crate::metrics::REPLAYED_LSN, &labels).set(s.replayed.0 as f64);
            metrics::gauge!(crate::metrics::LAG_RECORDS, &labels)
                .set(durable.0.saturating_sub(s.acknowledged.0) as f64);
            metrics::gauge!(crate::metrics::CONNECTED, &labels).set(if s.connected {
                1.0
            } else {
                0.0
            });
        }
        self.publish_sync_state();
    }
}

/// Sync replication's commit gate; see the module docs.
pub struct SyncGate {
    shipper: Arc<Shipper>,
}

#[async_trait::async_trait]
impl coordinator::CommitGate for SyncGate {
    async fn confirm(&self, lsn: Lsn) -> Result<(), String> {
        let shipper = &self.shipper;
        if shipper.fallen_back.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut acknowledged = shipper.acknowledged.subscribe();
        if *acknowledged.borrow() >= lsn {
            return Ok(());
        }
        let waiting = Waiting::new(&shipper.waiting);
        let wait = Duration::from_millis(shipper.config.sync_wait_ms_max);
        let confirmed = tokio::time::timeout(wait, acknowledged.wait_for(|a| *a >= lsn)).await;
        drop(waiting);
        if matches!(confirmed, Ok(Ok(_))) {
            return Ok(());
        }
        let connected: Vec<String> = shipper
            .standby_states()
            .into_iter()
            .filter(|(_, s)| s.connected)
            .map(|(name, s)| format!("{name} at lsn {}", s.acknowledged))
            .collect();
        let why = format!(
            "no standby acknowledged lsn {lsn} within {} ms (sync_wait_ms_max); connected standbys: {}",
            shipper.config.sync_wait_ms_max,
            if connected.is_empty() {
                "none".to_string()
            } else {
                connected.join(", ")
            }
        );
        match shipper.config.sync_fallback {
            SyncFallback::Fail => Err(why),
            SyncFallback::Async => {
                let here = shipper.coordinator.journal().durable_lsn();
                shipper.fallback_target.store(here.0, Ordering::Release);
                if !shipper.fallen_back.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        "{why}: commits no longer wait for a standby (sync_fallback = \"async\") until one catches up"
                    );
                    shipper.publish_sync_state();
                }
                Ok(())
            }
        }
    }
}

/// Counts a commit waiting for a standby while it lives (a cancelled commit stops counting).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
