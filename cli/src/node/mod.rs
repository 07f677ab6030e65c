//! A failover node: one process that is the primary or the standby of a pair, and changes
//! role in place.
//!
//! `concord coordinator` and `concord standby` run one when the configuration has a
//! `[failover]` table. It serves, on one gRPC address, `concord.v1.Coordinator` (only while
//! primary: otherwise every call is refused with `ERROR_CODE_NOT_PRIMARY` naming the primary),
//! `concord.v1.Replication` (the primary's shipper, or the standby's status), the heartbeats,
//! and `concord.v1.Failover` ([`service`]: promote, demote, switchover, state).
//!
//! Which role it starts in comes from the quorum store, not from the command: the node the
//! store names as the holder of the epoch is the primary (it resumes an interrupted promotion
//! first); any other node follows the holder. Only a store that never saw an epoch lets
//! `concord coordinator` claim the first one.
//!
//! The role changes ([`promote`], [`demote`]) run one at a time; a second one asked while one
//! runs fails at once, naming it. Each step is journaled (`Role` records), so a re-run resumes
//! or answers that it is already done. The loops of [`watch`] connect the rest: the health
//! verdict and the standbys' confirmations feed the primary's [`Authority`]; a lost epoch
//! turns the primary into a standby of the winner; an automatic standby promotes itself when
//! the primary is dead or sick and every guard holds.
//!
//! # Caveats
//!
//! * One peer: the pair is a primary and one standby.
//! * A demoted primary whose journal went further than the new primary's (a decision the
//!   standby never received) cannot follow it: it refuses work and says to re-seed it
//!   (`concord standby --reseed`).

mod demote;
pub(crate) mod follow;
mod primary;
mod promote;
mod service;
mod switch;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adapters::Resource;
use adapters::config::{Config, FailoverConfig};
use anyhow::Context;
use proto::client::{Credentials, Token};
use proto::v1;
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::replication_server::ReplicationServer;
use replicator::failover::Authority;
use replicator::failover::loss::{Anchors, DecisionCounter};
use replicator::quorum::{Holder, QuorumStore};
use replicator::service::ReplicationService;
use replicator::standby::Upstream;

use crate::daemon::auth::{self, Authenticate};
use crate::daemon::oversize::Oversize;
use crate::daemon::service::Daemon;
use follow::Following;
use primary::Serving;
use switch::{Slot, Switch};

/// The coordinator service as served.
type CoordinatorSvc = Authenticate<Oversize<CoordinatorServer<Daemon>>>;
/// The replication service as served.
type ReplicationSvc = Authenticate<ReplicationServer<ReplicationService>>;

/// The largest message of the replication service.
const REPLICATION_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// How long a role change waits for commits in flight to finish.
const DRAIN_MS_MAX: u64 = 5_000;
/// How long a promotion waits for replay to apply what was received.
const REPLAY_MS_MAX: u64 = 120_000;

/// The role a node was started for (the quorum store has the last word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StartAs {
    /// `concord coordinator`.
    Primary,
    /// `concord standby`.
    Standby,
}

/// What a node is now.
pub(crate) enum Role {
    /// Following a primary.
    Standby(Following),
    /// Serving as the primary.
    Primary(Serving),
    /// Between roles (a change is running, or it failed half way).
    Vacant,
}

/// What status, heartbeats and refusals read without taking the role's lock.
#[derive(Clone, Default)]
pub(crate) struct View {
    /// "primary", "standby", "demoted", "promoting", "demoting", "starting".
    pub role: &'static str,
    /// The epoch served or followed.
    pub epoch: u64,
    /// The primary's address, when known.
    pub primary: Option<String>,
    /// The primary's authority (on the primary).
    pub authority: Option<Arc<Authority>>,
    /// Why a demoted node refuses to follow, if it does.
    pub stuck: Option<String>,
    /// The last role change, in words.
    pub last_change: String,
}

/// The node.
pub(crate) struct Node {
    pub cfg: Config,
    pub fo: FailoverConfig,
    pub me: Holder,
    pub store: Arc<dyn QuorumStore>,
    pub resources: Vec<Arc<dyn Resource>>,
    pub keys: Arc<auth::Keys>,
    /// Credentials for the peer (the operator token, when the peer checks tokens).
    pub peer_credentials: Credentials,
    pub coordinator_slot: Slot<CoordinatorSvc>,
    pub replication_slot: Slot<ReplicationSvc>,
    pub role: tokio::sync::Mutex<Role>,
    /// Held for the whole of a role change.
    pub change: tokio::sync::Mutex<()>,
    /// The change running, for the refusal of a second one.
    pub changing: Mutex<Option<String>>,
    pub view: std::sync::RwLock<View>,
    /// The primary's reports, on a standby.
    pub anchors: Anchors,
    /// The committed-transaction count, on a primary.
    pub counter: Mutex<Option<DecisionCounter>>,
    pub started: Instant,
    /// Until when this node promised (in its heartbeats) not to promote.
    pub promised_until: Mutex<Option<Instant>>,
    /// When this node last changed role by itself.
    pub last_auto: Mutex<Option<Instant>>,
    pub senses: watch::Senses,
}

impl Node {
    /// The view.
    pub fn view(&self) -> View {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes the view.
    pub fn set_view(&self, change: impl FnOnce(&mut View)) {
        let mut view = self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        change(&mut view);
    }

    /// Takes the role-change lock, or says which change holds it.
    pub fn begin_change(&self, what: &str) -> Result<ChangeGuard<'_>, String> {
        match self.change.try_lock() {
            Ok(guard) => {
                if let Ok(mut c) = self.changing.lock() {
                    *c = Some(what.to_string());
                }
                Ok(ChangeGuard {
                    _guard: guard,
                    node: self,
                })
            }
            Err(_) => {
                let running = self
                    .changing
                    .lock()
                    .ok()
                    .and_then(|c| c.clone())
                    .unwrap_or_else(|| "a role change".into());
                Err(format!("{running} is already running on this node"))
            }
        }
    }

    /// How the node reaches a primary at `url`.
    pub fn upstream(&self, url: &str) -> Upstream {
        Upstream {
            url: url.to_string(),
            credentials: self.peer_credentials.clone(),
            name: self.fo.name.clone(),
        }
    }

    /// Starts following `url` (the role must be vacant).
    pub async fn start_following(
        self: &Arc<Self>,
        url: &str,
        epoch: u64,
    ) -> anyhow::Result<Following> {
        let following = Following::start(
            &self.cfg,
            self.resources.clone(),
            Some(self.upstream(url)),
            true,
        )
        .await?;
        {
            let node = Arc::downgrade(self);
            let _ = following.status.failover.set(Arc::new(move || {
                node.upgrade()
                    .map(|n| n.failover_state())
                    .unwrap_or_default()
            }));
        }
        self.replication_slot
            .set(Some(self.standby_replication(&following)));
        self.coordinator_slot.set(None);
        self.set_view(|v| {
            v.role = "standby";
            v.epoch = epoch;
            v.primary = Some(url.to_string());
            v.authority = None;
            v.stuck = None;
        });
        tracing::info!(
            primary = url,
            epoch,
            "following the primary {url} at epoch {epoch}"
        );
        Ok(following)
    }

    /// The replication service of a standby.
    fn standby_replication(&self, following: &Following) -> ReplicationSvc {
        let inventories = replicator::inventory::Inventories::of_journal(
            self.resources.clone(),
            Arc::clone(&following.journal),
        );
        let svc = ReplicationServer::new(ReplicationService::new(
            None,
            inventories,
            Arc::clone(&following.status) as Arc<dyn replicator::service::StatusSource>,
        ))
        .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(REPLICATION_MESSAGE_BYTES_MAX);
        Authenticate::new(svc, Arc::clone(&self.keys))
    }

    /// The failover state as `concord status` and `Failover.State` show it.
    pub fn failover_state(&self) -> v1::FailoverState {
        let view = self.view();
        let verdict = self.senses.verdict();
        let peer = self.senses.peer();
        let (may_commit, why_not, lease, confirmed) = match &view.authority {
            Some(a) => {
                let check = a.check();
                (
                    check.is_ok(),
                    check.err().map(|e| e.to_string()).unwrap_or_default(),
                    a.lease_remaining().as_millis() as u64,
                    a.confirmed_remaining().as_millis() as u64,
                )
            }
            None => (false, "this node is not the primary".into(), 0, 0),
        };
        let quorum_reachable = view.authority.as_ref().is_none_or(|a| a.quorum_reachable());
        v1::FailoverState {
            node: self.fo.name.clone(),
            address: self.fo.address.clone(),
            role: match &view.stuck {
                Some(_) => "demoted".into(),
                None => view.role.to_string(),
            },
            epoch: view.epoch,
            primary: view.primary.clone().unwrap_or_default(),
            may_commit,
            why_not: match &view.stuck {
                Some(stuck) => stuck.clone(),
                None => why_not,
            },
            lease_remaining_ms: lease,
            confirmed_remaining_ms: confirmed,
            quorum: self.store.describe(),
            quorum_reachable,
            healthy: verdict.healthy,
            failures: verdict.failures.clone(),
            peer: self.fo.peer.clone(),
            peer_state: peer.state.to_string(),
            paths_down: peer.paths_down.clone(),
            automatic: self.fo.automatic,
            last_change: view.last_change,
        }
    }

    /// The refusal of the coordinator service while this node is not the primary.
    fn not_primary(&self) -> tonic::Status {
        let view = self.view();
        let primary = view
            .primary
            .filter(|p| *p != self.fo.address || view.role == "primary");
        proto::not_primary(primary.as_deref())
    }
}

/// Held for a role change; clears the "running" note when dropped.
pub(crate) struct ChangeGuard<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    node: &'a Node,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.node.changing.lock() {
            *c = None;
        }
    }
}

/// The operator token for calls to the peer: the `[standby]` table's, else this node's own
/// operator token (both nodes of a pair share it).
fn peer_credentials(cfg: &Config) -> anyhow::Result<Credentials> {
    let token = cfg
        .standby
        .as_ref()
        .and_then(|s| s.token.clone())
        .or_else(|| cfg.daemon.operator_token.clone());
    let mut credentials = match cfg.standby.as_ref() {
        Some(standby) => crate::standby::credentials(standby)?,
        None => Credentials::none(),
    };
    if let Some(token) = token {
        credentials = credentials.with_token(Token::new(token.expose())?);
    }
    Ok(credentials)
}

/// Runs a failover node until SIGTERM or SIGINT.
pub(crate) async fn run(
    cfg: Config,
    start_as: StartAs,
    listen: SocketAddr,
    mut builder: tonic::transport::Server,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let fo = cfg
        .failover
        .clone()
        .context("a failover node needs a [failover] table")?;
    let metrics = metrics_listen
        .map(crate::daemon::metrics::start)
        .transpose()?;
    let store = replicator::quorum::open(&replicator::quorum::QuorumConfig::from_failover(&fo))
        .with_context(|| format!("open the quorum store ({})", fo.quorum.as_str()))?;
    let resources = adapters::config::open_all(&cfg)
        .await
        .context("open the configuration's resources")?;
    let keys = Arc::new(auth::Keys::new(&cfg.daemon));
    let me = Holder::from_failover(&fo);
    let node = Arc::new(Node {
        peer_credentials: peer_credentials(&cfg)?,
        senses: watch::Senses::start(&cfg, &fo, &resources)?,
        cfg,
        fo,
        me,
        store,
        resources,
        keys: Arc::clone(&keys),
        coordinator_slot: Slot::empty(),
        replication_slot: Slot::empty(),
        role: tokio::sync::Mutex::new(Role::Vacant),
        change: tokio::sync::Mutex::new(()),
        changing: Mutex::new(None),
        view: std::sync::RwLock::new(View {
            role: "starting",
            ..View::default()
        }),
        anchors: Anchors::default(),
        counter: Mutex::new(None),
        started: Instant::now(),
        promised_until: Mutex::new(None),
        last_auto: Mutex::new(None),
    });
    node.senses.attach(&node);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let bound = listener.local_addr().context("the listener's address")?;
    let refuse_coordinator: switch::Refusal = {
        let node = Arc::downgrade(&node);
        Arc::new(move |_path: &str| match node.upgrade() {
            Some(node) => node.not_primary(),
            None => tonic::Status::unavailable("the node is stopping"),
        })
    };
    let refuse_replication: switch::Refusal = Arc::new(|_path: &str| {
        tonic::Status::unavailable("this node is changing role; call again in a moment")
    });
    let failover = Authenticate::new(
        v1::failover_server::FailoverServer::new(service::FailoverService(Arc::clone(&node))),
        Arc::clone(&keys),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_service(Switch::new(
            node.coordinator_slot.clone(),
            refuse_coordinator,
        ))
        .add_service(Switch::new(
            node.replication_slot.clone(),
            refuse_replication,
        ))
        .add_service(failover)
        .add_optional_service(node.senses.heartbeat_service())
        .serve_with_incoming_shutdown(crate::daemon::incoming::Incoming::new(listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);
    let mut signals = crate::daemon::signals()?;

    // The role comes from the quorum store.
    let started = tokio::select! {
        started = startup(&node, start_as) => started,
        signal = crate::daemon::wait_for_signal(&mut signals) => {
            anyhow::bail!("{signal} before the node found its role")
        }
    };
    started?;
    let loops = watch::spawn_loops(&node);
    if let Some(endpoint) = &metrics {
        println!("metrics on {}", endpoint.addr);
    }
    let view = node.view();
    tracing::info!(addr = %bound, role = view.role, epoch = view.epoch, "listening on {bound}");
    println!("listening on {bound}");
    use std::io::Write;
    std::io::stdout()
        .flush()
        .context("write to standard output")?;

    let signal = crate::daemon::wait_for_signal(&mut signals).await;
    tracing::info!("{signal}: stopping");
    for task in loops {
        task.abort();
    }
    let closed = node.shut_down().await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_millis(DRAIN_MS_MAX), server).await;
    node.senses.stop();
    drop(metrics);
    closed
}

/// Finds the node's role in the quorum store and takes it.
async fn startup(node: &Arc<Node>, start_as: StartAs) -> anyhow::Result<()> {
    let state = loop {
        match node.store.state().await {
            Ok(state) => break state,
            Err(e) => {
                tracing::warn!(error = %e, "the quorum store does not answer; the node waits for it to find its role");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let holder_is_me = state
        .holder
        .as_ref()
        .is_some_and(|h| h.node == node.me.node);
    if holder_is_me {
        // This node holds the epoch: it is the primary, possibly half way through a promotion.
        let reply = promote::promote(node, promote::Ask::resume()).await;
        anyhow::ensure!(
            matches!(
                v1::ChangeOutcome::try_from(reply.outcome),
                Ok(v1::ChangeOutcome::Done | v1::ChangeOutcome::AlreadyDone)
            ),
            "this node holds epoch {} in the quorum store but could not serve: {} {}",
            state.epoch,
            reply.reason,
            reply.what_to_do
        );
        return Ok(());
    }
    match (&state.holder, start_as) {
        (Some(holder), _) => {
            let following = node.start_following(&holder.address, state.epoch).await?;
            *node.role.lock().await = Role::Standby(following);
            Ok(())
        }
        (None, StartAs::Primary) => {
            let reply = promote::promote(node, promote::Ask::first()).await;
            if reply.outcome == v1::ChangeOutcome::Done as i32 {
                return Ok(());
            }
            // Another node took the first epoch at the same moment: follow it.
            let state = node.store.state().await.ok();
            match state
                .as_ref()
                .and_then(|s| s.holder.as_ref().map(|h| (h, s.epoch)))
            {
                Some((holder, epoch)) if holder.node != node.me.node => {
                    let following = node.start_following(&holder.address, epoch).await?;
                    *node.role.lock().await = Role::Standby(following);
                    Ok(())
                }
                _ => anyhow::bail!(
                    "could not take the first epoch: {} {}",
                    reply.reason,
                    reply.what_to_do
                ),
            }
        }
        (None, StartAs::Standby) => {
            let peer = node.fo.peer.clone();
            let following = node.start_following(&peer, state.epoch).await?;
            *node.role.lock().await = Role::Standby(following);
            Ok(())
        }
    }
}

impl Node {
    /// Stops whatever role runs (SIGTERM): a primary drains and closes its coordinator (its
    /// lease runs out; the standby takes over if automatic); a standby stops and closes its
    /// journal.
    async fn shut_down(&self) -> anyhow::Result<()> {
        let role = std::mem::replace(&mut *self.role.lock().await, Role::Vacant);
        match role {
            Role::Primary(serving) => {
                self.coordinator_slot.set(None);
                serving.stop("the node is stopping").await?;
                Ok(())
            }
            Role::Standby(following) => {
                let journal = following.stop().await;
                tokio::task::spawn_blocking(move || journal.close())
                    .await
                    .context("close the journal")?
                    .context("close the journal")?;
                Ok(())
            }
            Role::Vacant => Ok(()),
        }
    }
}
