//! What a node senses (its own health, its peer over the heartbeats) and the loops that act
//! on it.
//!
//! * **authority** — on the primary, every 50 ms: a verdict sick for `sicktime` stops it
//!   committing (and renewing); the standby's confirmation extends its authority; a lost epoch
//!   turns it into a standby of the winner.
//! * **standby** — the primary's reports are kept (what a promotion would lose); a journal
//!   that went past the primary's is reported as stuck; with `automatic = true` the standby
//!   promotes itself when the primary is dead (silent on every path for `deadtime`), sick
//!   (failed probes for `sicktime`) or handed over, and the quorum store shows its lease has
//!   run out — never while the store shows the lease renewed (a partition between the two
//!   nodes), never when this node cannot reach the store or is sick itself, and at most once
//!   per `holdoff_ms`.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use adapters::Resource;
use adapters::config::{Config, FailoverConfig};
use anyhow::Context;
use replicator::failover::loss::Progress;
use replicator::health::{HealthConfig, HealthMonitor, Watchdog};
use replicator::heartbeat::{
    Beat, BeatSource, HeartbeatConfig, HeartbeatKey, Heartbeats, PeerState, Role as HbRole,
};
use tokio::task::JoinHandle;

use super::promote::{self, Ask};
use super::{Node, Role};

/// How often the primary's authority is brought up to date.
const AUTHORITY_MS: u64 = 50;

/// This node's own verdict.
#[derive(Clone, Debug, Default)]
pub(crate) struct Verdict {
    pub healthy: bool,
    pub failures: Vec<String>,
    /// How long it has been sick without a break.
    pub sick_for: Option<Duration>,
}

/// The peer as the heartbeats show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PeerKind {
    /// Not heard since this node started.
    Unknown,
    /// Heard on at least one path.
    Alive,
    /// Reports failed probes, for this long.
    Sick(u64),
    /// Silent on every path, for this long.
    Dead(u64),
}

impl std::fmt::Display for PeerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKind::Unknown => f.write_str("unknown"),
            PeerKind::Alive => f.write_str("alive"),
            PeerKind::Sick(ms) => write!(f, "sick for {ms} ms"),
            PeerKind::Dead(ms) => write!(f, "dead (silent for {ms} ms)"),
        }
    }
}

/// The peer.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub state: PeerKind,
    pub paths_down: Vec<String>,
    /// The role it last reported.
    pub role: String,
    /// Its last report of its journal.
    pub progress: Option<Progress>,
    /// Its last beat is recent (two heartbeats) and reports it healthy.
    pub fresh_and_healthy: bool,
}

/// The health monitor and the heartbeats of a node.
pub(crate) struct Senses {
    inner: SensesImpl,
}

impl Senses {
    /// Starts the health monitor and the heartbeats.
    pub fn start(
        cfg: &Config,
        fo: &FailoverConfig,
        resources: &[Arc<dyn Resource>],
    ) -> anyhow::Result<Senses> {
        Ok(Senses {
            inner: SensesImpl::start(cfg, fo, resources)?,
        })
    }

    /// Makes the heartbeats report `node`.
    pub fn attach(&self, node: &Arc<Node>) {
        self.inner.attach(Arc::downgrade(node));
    }

    /// This node's verdict.
    pub fn verdict(&self) -> Verdict {
        self.inner.verdict()
    }

    /// The peer.
    pub fn peer(&self) -> Peer {
        self.inner.peer()
    }

    /// Until when the standby promised not to promote (counted from this node's sending).
    pub fn confirmed_until(&self) -> Option<Instant> {
        self.inner.confirmed_until()
    }

    /// The heartbeats' gRPC service, to serve next to the others.
    pub fn heartbeat_service(&self) -> Option<HeartbeatService> {
        self.inner.heartbeat_service()
    }

    /// Stops both.
    pub fn stop(&self) {
        self.inner.stop();
    }
}

/// Starts the node's loops.
pub(crate) fn spawn_loops(node: &Arc<Node>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(authority_loop(Arc::downgrade(node))),
        tokio::spawn(standby_loop(Arc::downgrade(node))),
    ]
}

/// On the primary: sickness, confirmations, a lost epoch.
async fn authority_loop(node: Weak<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(AUTHORITY_MS));
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let view = node.view();
        publish_metrics(&view);
        let Some(authority) = view.authority else {
            continue;
        };
        let verdict = node.senses.verdict();
        let sick = verdict
            .sick_for
            .filter(|d| d.as_millis() as u64 >= node.fo.sicktime_ms)
            .map(|d| format!("{} for {} ms", verdict.failures.join("; "), d.as_millis()));
        if sick.is_some() != authority.sick().is_some() {
            match &sick {
                Some(why) => tracing::warn!(
                    "sick: {why}; this primary stops committing and stops renewing its lease"
                ),
                None => tracing::info!("healthy again; this primary renews its lease"),
            }
        }
        authority.set_sick(sick);
        if let Some(until) = node.senses.confirmed_until() {
            authority.confirmed_until(until);
        }
        if let Some(why) = authority.lost() {
            lost_epoch(&node, &why).await;
        }
    }
}

/// The failover gauges: `concord_failover_primary` (1 on the primary), `concord_failover_epoch`,
/// `concord_failover_may_commit` (the primary's authority), `concord_failover_lease_remaining_ms`.
fn publish_metrics(view: &super::View) {
    let may_commit = view.authority.as_ref().is_some_and(|a| a.check().is_ok());
    let lease = view
        .authority
        .as_ref()
        .map_or(0, |a| a.lease_remaining().as_millis() as u64);
    metrics::gauge!("concord_failover_primary").set(f64::from(u8::from(view.role == "primary")));
    metrics::gauge!("concord_failover_epoch").set(view.epoch as f64);
    metrics::gauge!("concord_failover_may_commit").set(f64::from(u8::from(may_commit)));
    metrics::gauge!("concord_failover_lease_remaining_ms").set(lease as f64);
}

/// The primary lost its epoch: it follows the winner.
async fn lost_epoch(node: &Arc<Node>, why: &str) {
    let Ok(_change) = node.begin_change("a demotion after a lost epoch") else {
        return;
    };
    let mut role = node.role.lock().await;
    if !matches!(&*role, Role::Primary(_)) {
        return;
    }
    let Role::Primary(serving) = std::mem::replace(&mut *role, Role::Vacant) else {
        return;
    };
    node.coordinator_slot.set(None);
    node.replication_slot.set(None);
    node.set_view(|v| {
        v.role = "demoting";
        v.authority = None;
        v.last_change = format!("demoted: {why}");
    });
    let durable = serving.journal().durable_lsn();
    if let Err(e) = serving.stop_with(why, true).await {
        tracing::error!(error = %format!("{e:#}"), "closing the coordinator after a lost epoch");
    }
    if let Err(e) = replicator::replay::write_floor(&node.cfg.data_dir.join("replication"), durable)
    {
        tracing::warn!(error = %e, "could not write the replay restart point");
    }
    let (url, epoch) = loop {
        match node.store.state().await {
            Ok(state) => match state.holder {
                Some(holder) if holder.node != node.me.node => break (holder.address, state.epoch),
                _ => break (node.fo.peer.clone(), state.epoch),
            },
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    match node.start_following(&url, epoch).await {
        Ok(following) => *role = Role::Standby(following),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "could not follow {url}");
            node.set_view(|v| v.stuck = Some(format!("could not follow {url}: {e:#}")));
        }
    }
}

/// On a standby: the primary's reports, a stuck journal, automatic failover.
async fn standby_loop(node: Weak<Node>) {
    let period = match node.upgrade() {
        Some(node) => Duration::from_millis(node.fo.heartbeat_ms),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    let mut lease_seen: Option<(Instant, u64)> = None;
    let mut said: Option<String> = None;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let view = node.view();
        if view.role != "standby" {
            lease_seen = None;
            continue;
        }
        let peer = node.senses.peer();
        if let Some(progress) = peer.progress
            && peer.role == "primary"
        {
            node.anchors.report(progress);
        }
        if note_stuck(&node).await && node.fo.rejoin_reseed {
            rejoin(&node).await;
        }
        if !node.fo.automatic || node.view().stuck.is_some() {
            continue;
        }
        let Some(reason) = failover_reason(&node, &peer) else {
            lease_seen = None;
            said = None;
            continue;
        };
        let blocked = blocked(&node, &mut lease_seen).await;
        if let Some(why) = blocked {
            if said.as_deref() != Some(why.as_str()) {
                tracing::warn!("{reason}, but no failover: {why}");
                said = Some(why);
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(node.fo.standby_delay_ms)).await;
        if failover_reason(&node, &node.senses.peer()).is_none() {
            continue;
        }
        tracing::warn!("{reason}: this standby promotes itself");
        // A promotion that is done notes the time itself (the holdoff); a refused one does
        // not, so the next attempt is not held off.
        let reply = promote::promote(&node, Ask::automatic(&reason)).await;
        tracing::warn!(
            outcome = reply.outcome,
            epoch = reply.epoch,
            "automatic promotion: {} {}",
            reply.reason,
            reply.what_to_do
        );
    }
}

/// Why the primary should be replaced, if it should.
fn failover_reason(node: &Node, peer: &Peer) -> Option<String> {
    let deadtime = node.fo.deadtime_ms;
    match &peer.state {
        PeerKind::Dead(ms) if *ms >= deadtime => Some(format!(
            "the primary has been silent on every path for {ms} ms (deadtime {deadtime} ms)"
        )),
        PeerKind::Sick(ms) if *ms >= node.fo.sicktime_ms => Some(format!(
            "the primary has reported failed probes for {ms} ms (sicktime {} ms)",
            node.fo.sicktime_ms
        )),
        PeerKind::Unknown
            if node.started.elapsed().as_millis() as u64 >= deadtime + node.fo.confirm_ms =>
        {
            Some(format!(
                "the primary has not been heard since this node started ({} ms ago)",
                node.started.elapsed().as_millis()
            ))
        }
        PeerKind::Alive if peer.role == "standby" || peer.role == "demoted" => Some(format!(
            "the peer reports itself {}: there is no primary",
            peer.role
        )),
        _ => None,
    }
}

/// What stops an automatic promotion now, if anything.
async fn blocked(node: &Node, lease_seen: &mut Option<(Instant, u64)>) -> Option<String> {
    if let Some(last) = node.last_auto.lock().ok().and_then(|l| *l)
        && (last.elapsed().as_millis() as u64) < node.fo.holdoff_ms
    {
        return Some(format!(
            "this node changed role {} ms ago (holdoff_ms {})",
            last.elapsed().as_millis(),
            node.fo.holdoff_ms
        ));
    }
    let verdict = node.senses.verdict();
    if !verdict.healthy {
        return Some(format!(
            "this standby is not healthy itself ({})",
            verdict.failures.join("; ")
        ));
    }
    let timeout = Duration::from_millis(node.fo.quorum_call_timeout_ms);
    let state = match tokio::time::timeout(timeout, node.store.state()).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => return Some(format!("this node cannot reach the quorum store ({e})")),
        Err(_) => return Some("this node cannot reach the quorum store (no answer)".into()),
    };
    if let (Some(remaining), Some(holder)) = (state.lease_remaining_ms, &state.holder)
        && holder.node != node.me.node
    {
        let now = Instant::now();
        let ends = now + Duration::from_millis(remaining);
        let renewed = lease_seen.is_some_and(|(seen_at, seen)| {
            ends > seen_at + Duration::from_millis(seen) + Duration::from_millis(20)
        });
        *lease_seen = Some((now, remaining));
        return Some(if renewed {
            format!(
                "{} renews its lease in the quorum store: it is alive, the path between the nodes is down",
                holder.node
            )
        } else {
            format!("{}'s lease runs {remaining} ms more", holder.node)
        });
    }
    None
}

/// Notes when the receiver was refused for good (another history); returns whether it was.
async fn note_stuck(node: &Node) -> bool {
    let role = node.role.lock().await;
    let Role::Standby(following) = &*role else {
        return false;
    };
    let refused = following
        .status
        .receive
        .lock()
        .ok()
        .and_then(|v| v.refused.map(|code| (code, v.last_error.clone())));
    let stuck = match refused {
        Some((code @ ("diverged" | "reseed_required" | "cluster_mismatch"), why)) => Some(format!(
            "the primary refuses this node ({code}: {}): it must be re-seeded — stop it and run `concord standby --reseed`",
            why.unwrap_or_default()
        )),
        _ => None,
    };
    let is_stuck = stuck.is_some();
    node.set_view(|v| v.stuck = stuck);
    is_stuck
}

/// A node whose journal went past the primary's (an old primary that decided what its
/// standby never received) rejoins: it reports the transactions after the last common record
/// as lost — in its log and in `data_dir/failover/lost-<unix ms>.txt`, each with the
/// resources it touched — then re-seeds its resources and journal from the primary
/// ([`replicator::reseed`]) and follows it.
async fn rejoin(node: &Arc<Node>) {
    let Ok(_change) = node.begin_change("a re-seed to rejoin the primary") else {
        return;
    };
    let mut role = node.role.lock().await;
    let Role::Standby(following) = std::mem::replace(&mut *role, Role::Vacant) else {
        return;
    };
    let view = node.view();
    let primary = view.primary.clone().unwrap_or_else(|| node.fo.peer.clone());
    let diverged_at = following
        .status
        .receive
        .lock()
        .ok()
        .and_then(|v| v.last_error.clone())
        .and_then(|why| lsn_after(&why, "at lsn "));
    node.replication_slot.set(None);
    node.set_view(|v| v.role = "rejoining");
    let journal = following.stop().await;
    if let Some(lsn) = diverged_at {
        report_lost(node, &journal, lsn);
    }
    let closed = tokio::task::spawn_blocking(move || journal.close()).await;
    if !matches!(closed, Ok(Ok(()))) {
        tracing::warn!("the journal did not close cleanly before the re-seed");
    }
    tracing::warn!("this node's journal went past the primary's: re-seeding it from {primary}");
    let reseeded = replicator::reseed::reseed(
        &node.upstream(&primary),
        &node.resources,
        &node.cfg.data_dir,
    )
    .await;
    match reseeded {
        Ok(report) => tracing::warn!(
            lsn = report.lsn.0,
            "re-seeded from {primary} at lsn {}; following it",
            report.lsn
        ),
        Err(e) => {
            tracing::error!(error = %e, "re-seeding from {primary} failed; trying again later")
        }
    }
    let epoch = view.epoch;
    match node.start_following(&primary, epoch).await {
        Ok(following) => *role = Role::Standby(following),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "could not follow {primary}");
            node.set_view(|v| v.stuck = Some(format!("could not follow {primary}: {e:#}")));
        }
    }
    node.set_view(|v| v.last_change = format!("rejoined {primary} by re-seeding"));
}

/// The number after `marker` in `text`.
fn lsn_after(text: &str, marker: &str) -> Option<u64> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Logs and writes down the decisions of `journal` after `lsn`: what a re-seed discards.
fn report_lost(node: &Node, journal: &journal::Journal, lsn: u64) {
    use coordinator::record::CoordRecord;
    let mut lines = Vec::new();
    if let Ok(reader) = journal.read_from(journal::Lsn(lsn + 1)) {
        for record in reader.flatten() {
            match CoordRecord::decode(record.kind, &record.payload) {
                Ok(CoordRecord::Commit { xid, branches, .. }) => {
                    let touched: Vec<&str> = branches.iter().map(|(r, _)| r.as_str()).collect();
                    lines.push(format!(
                        "lsn {} {xid}: committed here, in {}",
                        record.lsn,
                        touched.join(", ")
                    ));
                }
                Ok(CoordRecord::OnePhase { xid, resource, .. }) => {
                    lines.push(format!(
                        "lsn {} {xid}: one-phase commit here, in {resource}",
                        record.lsn
                    ));
                }
                _ => {}
            }
        }
    }
    for line in &lines {
        tracing::warn!("lost by the re-seed (not on the primary): {line}");
    }
    let dir = node.cfg.data_dir.join("failover");
    let file = dir.join(format!(
        "lost-{}.txt",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ));
    let text = format!(
        "# transactions this node decided after lsn {lsn}, the last record it shares with the primary;\n# a re-seed from the primary discards them\n{}\n",
        lines.join("\n")
    );
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, text)) {
        tracing::warn!(error = %e, "could not write {}", file.display());
    }
}

/// The heartbeats' gRPC service as served.
pub(crate) type HeartbeatService =
    proto::v1::heartbeat_server::HeartbeatServer<replicator::heartbeat::HeartbeatService>;

/// The heartbeats and the health monitor.
struct SensesImpl {
    heartbeats: Arc<Heartbeats>,
    health: Arc<HealthMonitor>,
    node: Arc<Mutex<Option<Weak<Node>>>>,
    heartbeat_ms: u64,
}

impl SensesImpl {
    fn start(
        cfg: &Config,
        fo: &FailoverConfig,
        resources: &[Arc<dyn Resource>],
    ) -> anyhow::Result<SensesImpl> {
        let key = HeartbeatKey::from_file(&fo.key_file)
            .with_context(|| format!("[failover] key_file {}", fo.key_file.display()))?;
        let watchdog = fo
            .watchdog
            .as_ref()
            .map(|path| Watchdog::open(path))
            .transpose()
            .context("[failover] watchdog")?;
        let journal_dir = cfg.data_dir.join("journal");
        std::fs::create_dir_all(&journal_dir)
            .with_context(|| format!("create {}", journal_dir.display()))?;
        let health = HealthMonitor::start(
            HealthConfig {
                probe_interval_ms: fo.probe_interval_ms,
                probe_deadline_ms: fo.probe_deadline_ms,
                memory_min_bytes: fo.memory_min_bytes,
                ..HealthConfig::default()
            },
            resources.to_vec(),
            journal_dir,
            watchdog,
        );
        let node: Arc<Mutex<Option<Weak<Node>>>> = Arc::new(Mutex::new(None));
        let source: BeatSource = {
            let node = Arc::clone(&node);
            Arc::new(move || {
                let node = node
                    .lock()
                    .ok()
                    .and_then(|n| n.as_ref().and_then(Weak::upgrade));
                match node {
                    Some(node) => beat_of(&node),
                    None => Beat::default(),
                }
            })
        };
        let heartbeats = Heartbeats::start(
            HeartbeatConfig {
                cluster_id: fo.quorum_cluster.clone(),
                node: fo.name.clone(),
                udp_listen: fo.udp_listen,
                peer_udp: Some(fo.peer_udp),
                peer_url: Some(fo.peer.clone()),
                interval_ms: fo.heartbeat_ms,
                deadtime_ms: fo.deadtime_ms,
                sicktime_ms: fo.sicktime_ms,
            },
            key,
            source,
        )
        .context("start the heartbeats")?;
        Ok(SensesImpl {
            heartbeats,
            health,
            node,
            heartbeat_ms: fo.heartbeat_ms,
        })
    }

    fn attach(&self, node: Weak<Node>) {
        if let Some(n) = node.upgrade() {
            self.heartbeats.set_credentials(n.peer_credentials.clone());
        }
        if let Ok(mut n) = self.node.lock() {
            *n = Some(node);
        }
    }

    fn verdict(&self) -> Verdict {
        let verdict = self.health.verdict();
        Verdict {
            healthy: verdict.healthy,
            failures: verdict
                .failures
                .iter()
                .map(|f| format!("{}: {}", f.probe, f.detail))
                .collect(),
            sick_for: self.health.sick_for(),
        }
    }

    fn peer(&self) -> Peer {
        let view = self.heartbeats.peer();
        let (state, paths_down) = match &view.state {
            PeerState::Unknown => (PeerKind::Unknown, Vec::new()),
            PeerState::Alive { paths_down } => (
                PeerKind::Alive,
                paths_down
                    .iter()
                    .map(|p| format!("{p:?}").to_lowercase())
                    .collect(),
            ),
            PeerState::Sick { for_ms } => (PeerKind::Sick(*for_ms), Vec::new()),
            PeerState::Dead { silent_ms } => (
                PeerKind::Dead(*silent_ms),
                vec!["udp".to_string(), "grpc".to_string()],
            ),
        };
        let fresh = [view.udp_ms_ago, view.grpc_ms_ago]
            .into_iter()
            .flatten()
            .min()
            .is_some_and(|ms| ms <= 2 * self.heartbeat_ms);
        let (role, progress, healthy) = match &view.last {
            Some(beat) => (
                match beat.role {
                    HbRole::Primary => "primary",
                    HbRole::Standby => "standby",
                    HbRole::Demoted => "demoted",
                }
                .to_string(),
                Some(Progress {
                    lsn: journal::Lsn(beat.durable_lsn),
                    committed: beat.committed_txns,
                    bytes: beat.durable_bytes,
                }),
                beat.healthy,
            ),
            None => (String::new(), None, false),
        };
        Peer {
            state,
            paths_down,
            role,
            progress,
            fresh_and_healthy: fresh && healthy,
        }
    }

    fn confirmed_until(&self) -> Option<Instant> {
        self.heartbeats.confirmed_until()
    }

    fn heartbeat_service(&self) -> Option<HeartbeatService> {
        Some(self.heartbeats.service())
    }

    fn stop(&self) {
        self.health.stop();
        let heartbeats = Arc::clone(&self.heartbeats);
        tokio::spawn(async move { heartbeats.stop().await });
    }
}

/// This node's beat.
fn beat_of(node: &Node) -> Beat {
    let view = node.view();
    let verdict = node.senses.verdict();
    let role = match (view.role, &view.stuck) {
        (_, Some(_)) => HbRole::Demoted,
        // A promoting node holds the epoch: its peer must not take it for a missing primary.
        ("primary" | "promoting", _) => HbRole::Primary,
        ("standby" | "starting", _) => HbRole::Standby,
        _ => HbRole::Demoted,
    };
    let progress = match role {
        HbRole::Primary => node
            .counter
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.progress()))
            .unwrap_or_default(),
        _ => Progress::default(),
    };
    // A standby confirms a healthy primary it hears: it promises not to promote for
    // `confirm_ms` from now (later than the primary's sending of the beat it answers).
    let confirm_ms = if view.role == "standby" && view.stuck.is_none() {
        let peer = node.senses.peer();
        if peer.state == PeerKind::Alive && peer.role == "primary" && peer.fresh_and_healthy {
            if let Ok(mut promised) = node.promised_until.lock() {
                let until = Instant::now() + Duration::from_millis(node.fo.confirm_ms);
                if promised.is_none_or(|p| p < until) {
                    *promised = Some(until);
                }
            }
            node.fo.confirm_ms
        } else {
            0
        }
    } else {
        0
    };
    Beat {
        address: node.fo.address.clone(),
        role,
        epoch: view.epoch,
        durable_lsn: progress.lsn.0,
        committed_txns: progress.committed,
        durable_bytes: progress.bytes,
        healthy: verdict.healthy,
        failures: verdict.failures,
        lease_remaining_ms: view
            .authority
            .as_ref()
            .map(|a| a.lease_remaining().as_millis() as u64),
        confirm_ms,
        ..Beat::default()
    }
}
