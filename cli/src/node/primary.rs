//! The primary role: a coordinator at the node's epoch over the resources the node holds, the
//! daemon's services, the shipper, the lease keeper and the committed-transaction counter.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use coordinator::CommitGate;
use journal::{Epoch, Journal};
use participant::Concord;
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::replication_server::ReplicationServer;
use replicator::failover::loss::DecisionCounter;
use replicator::failover::{Authority, AuthorityGate, LeaseEnd, LeaseKeeper};
use replicator::primary::Shipper;
use replicator::service::ReplicationService;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Node, REPLICATION_MESSAGE_BYTES_MAX};
use crate::daemon::auth::Authenticate;
use crate::daemon::config::{CLOSE_MS_MAX, HOUSEKEEPING_MS};
use crate::daemon::oversize::Oversize;
use crate::daemon::service::{Daemon, DaemonStatus};

/// A running primary.
pub(crate) struct Serving {
    pub daemon: Arc<Daemon>,
    pub shipper: Arc<Shipper>,
    pub authority: Arc<Authority>,
    keeper_stop: watch::Sender<bool>,
    /// The lease keeper (it stops when asked, or when the epoch is lost).
    _keeper: JoinHandle<LeaseEnd>,
    housekeeping: JoinHandle<()>,
    counter_stop: Arc<AtomicBool>,
}

impl Serving {
    /// The coordinator's journal.
    pub fn journal(&self) -> &Journal {
        self.daemon.concord().coordinator().journal()
    }

    /// Stops deciding, drains what is in flight (at most `DRAIN_MS_MAX`) and closes the
    /// coordinator. `handed_over`: without the shutdown's `Checkpoint` record, so the journal
    /// stays a prefix of the standby's.
    pub async fn stop_with(self, why: &str, handed_over: bool) -> anyhow::Result<()> {
        self.authority.stop(why.to_string());
        self.daemon.drain();
        self.shipper.stop();
        self.keeper_stop.send_replace(true);
        self.housekeeping.abort();
        self.counter_stop
            .store(true, std::sync::atomic::Ordering::Release);
        if !self
            .daemon
            .wait_settled(Duration::from_millis(super::DRAIN_MS_MAX))
            .await
        {
            tracing::warn!(
                "commits still in flight after {} ms; closing anyway (recovery finishes them)",
                super::DRAIN_MS_MAX
            );
        }
        let concord = self.daemon.release();
        let timeout = Duration::from_millis(CLOSE_MS_MAX);
        let closed = if handed_over {
            concord.close_handed_over(timeout).await
        } else {
            concord.close(timeout).await
        };
        anyhow::ensure!(
            closed,
            "the coordinator did not close within {CLOSE_MS_MAX} ms: the next start recovers"
        );
        Ok(())
    }

    /// [`Serving::stop_with`], with the shutdown's checkpoint.
    pub async fn stop(self, why: &str) -> anyhow::Result<()> {
        self.stop_with(why, false).await
    }
}

impl Node {
    /// Opens the coordinator at `epoch` on the node's journal and resources and serves as the
    /// primary with `authority` (its lease already granted).
    pub async fn start_serving(
        self: &Arc<Self>,
        epoch: u64,
        journal: Journal,
        ledger: coordinator::ledger::Ledger,
        authority: Arc<Authority>,
    ) -> anyhow::Result<Serving> {
        let concord = Concord::open_with(
            &self.cfg,
            Epoch(epoch),
            journal,
            ledger,
            self.resources.clone(),
        )
        .await
        .context("open the coordinator")?;
        let coordinator = concord.coordinator().clone();
        let cluster_id = replicator::cluster::primary_cluster_id(&self.cfg.data_dir)
            .context("read or create the cluster id")?;
        let shipper = Shipper::new(
            coordinator.clone(),
            cluster_id,
            self.cfg.replication.clone(),
        );
        let peer = self.senses.peer();
        if peer.state != super::watch::PeerKind::Alive {
            shipper.fall_back_now(&format!(
                "this node serves and its peer {} is {}",
                self.fo.peer, peer.state
            ));
        }
        let sync = shipper.gate().map(|g| g as Arc<dyn CommitGate>);
        let gate = Arc::new(AuthorityGate::new(Arc::clone(&authority), sync));
        let _ = coordinator.set_commit_gate(gate);
        let mut cfg = self.cfg.clone();
        cfg.epoch = epoch;
        let daemon = Arc::new(Daemon::new(concord, cfg, Arc::clone(&shipper)));
        {
            let node = Arc::downgrade(self);
            daemon.report_failover(Arc::new(move || {
                node.upgrade()
                    .map(|n| n.failover_state())
                    .unwrap_or_default()
            }));
        }
        let durable = {
            let coordinator = coordinator.clone();
            Arc::new(move || coordinator.journal().durable_lsn())
        };
        let inventories = replicator::inventory::Inventories::new(self.resources.clone(), durable);
        let replication = ReplicationServer::new(ReplicationService::new(
            Some(Arc::clone(&shipper)),
            inventories,
            Arc::new(DaemonStatus(Arc::clone(&daemon))),
        ))
        .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(REPLICATION_MESSAGE_BYTES_MAX);
        let limits = self.cfg.daemon.limits;
        let svc = CoordinatorServer::from_arc(Arc::clone(&daemon))
            .max_decoding_message_size(limits.message_bytes_max)
            .max_encoding_message_size(limits.message_bytes_max);
        let svc = Oversize::new(svc, limits.message_bytes_max);
        let housekeeping = {
            let daemon = Arc::clone(&daemon);
            let shipper = Arc::clone(&shipper);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(HOUSEKEEPING_MS));
                loop {
                    tick.tick().await;
                    daemon.housekeeping();
                    shipper.hold_floor();
                    shipper.publish_metrics();
                }
            })
        };
        let (keeper_stop, keeper_rx) = watch::channel(false);
        let keeper = LeaseKeeper {
            store: Arc::clone(&self.store),
            me: self.me.clone(),
            authority: Arc::clone(&authority),
            ttl_ms: self.fo.lease_ttl_ms,
            call_timeout_ms: self.fo.quorum_call_timeout_ms,
        };
        let keeper = tokio::spawn(keeper.run(keeper_rx));
        let counter = DecisionCounter::default();
        let counter_stop = Arc::new(AtomicBool::new(false));
        {
            let counter = counter.clone();
            let coordinator = coordinator.clone();
            let stop = Arc::clone(&counter_stop);
            tokio::task::spawn_blocking(move || counter.follow(coordinator, stop));
        }
        if let Ok(mut c) = self.counter.lock() {
            *c = Some(counter);
        }
        self.replication_slot
            .set(Some(Authenticate::new(replication, Arc::clone(&self.keys))));
        self.coordinator_slot
            .set(Some(Authenticate::new(svc, Arc::clone(&self.keys))));
        self.set_view(|v| {
            v.role = "primary";
            v.epoch = epoch;
            v.primary = Some(self.fo.address.clone());
            v.authority = Some(Arc::clone(&authority));
            v.stuck = None;
        });
        Ok(Serving {
            daemon,
            shipper,
            authority,
            keeper_stop,
            _keeper: keeper,
            housekeeping,
            counter_stop,
        })
    }
}
