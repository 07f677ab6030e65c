//! Following a primary: the standby journal, the receiver and the replay, side by side — what
//! `concord standby` runs, and what a failover node runs while it is a standby.
//!
//! The receiver and the replay stop separately: a promotion first stops receiving (the
//! journal becomes this node's own), then lets replay finish everything received, then stops
//! it ([`Following::stop_receiving`], [`Following::wait_replayed`], [`Following::stop`]).

use std::sync::Arc;
use std::time::Duration;

use adapters::Resource;
use adapters::config::Config;
use anyhow::Context;
use journal::Journal;
use proto::v1;
use replicator::ReplicationError;
use replicator::replay::{Replay, SharedView};
use replicator::service::StatusSource;
use replicator::standby::{Receiver, SharedReceiveView, Upstream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the standby's metrics are brought up to date (milliseconds).
const METRICS_MS: u64 = 1_000;

type Ended = Result<(), ReplicationError>;

/// A running standby: journal, receiver, replay.
pub(crate) struct Following {
    /// The standby's journal.
    pub journal: Arc<Journal>,
    /// What its status reports.
    pub status: Arc<Standing>,
    receive_stop: watch::Sender<bool>,
    replay_stop: watch::Sender<bool>,
    receiving: Option<JoinHandle<Ended>>,
    replaying: Option<JoinHandle<Ended>>,
    publisher: JoinHandle<()>,
}

impl Following {
    /// Opens the journal of `cfg.data_dir` and starts replaying into `resources` and, with an
    /// upstream, receiving from it.
    pub async fn start(
        cfg: &Config,
        resources: Vec<Arc<dyn Resource>>,
        upstream: Option<Upstream>,
        replaying: bool,
    ) -> anyhow::Result<Following> {
        let journal_dir = cfg.data_dir.join("journal");
        let journal = {
            let dir = journal_dir.clone();
            let config = journal::JournalConfig {
                metrics_label: Some("standby"),
                ..coordinator::runtime::journal_config()
            };
            tokio::task::spawn_blocking(move || Journal::open(&dir, config))
                .await
                .context("open the journal")?
                .with_context(|| {
                    format!("open the standby's journal in {}", journal_dir.display())
                })?
        };
        let journal = Arc::new(journal);
        let replay = Replay::new(
            Arc::clone(&journal),
            resources.clone(),
            &cfg.data_dir.join("replication"),
        );
        let replay_view = replay.view();
        let (receive_stop, receive_rx) = watch::channel(false);
        let (replay_stop, replay_rx) = watch::channel(false);
        let primary = upstream.as_ref().map(|u| u.url.clone()).unwrap_or_default();
        let (receiver, replay) = match upstream {
            Some(upstream) => {
                let receiver = Receiver::new(
                    Arc::clone(&journal),
                    resources.clone(),
                    upstream,
                    &cfg.data_dir,
                    Arc::clone(&replay_view),
                );
                let replay = replay.keep_pending(receiver.pending_blobs());
                (Some(receiver), replay)
            }
            None => (None, replay),
        };
        let receive_view: SharedReceiveView = match &receiver {
            Some(r) => r.view(),
            None => Arc::new(std::sync::Mutex::new(replicator::standby::ReceiveView {
                primary,
                durable_lsn: journal.durable_lsn(),
                ..Default::default()
            })),
        };
        let status = Arc::new(Standing {
            cfg: cfg.clone(),
            resources,
            receive: receive_view,
            replay: Arc::clone(&replay_view),
            journal: Arc::clone(&journal),
            failover: std::sync::OnceLock::new(),
        });
        let receiving =
            receiver.map(|receiver| tokio::spawn(async move { receiver.run(receive_rx).await }));
        let replaying = tokio::spawn(async move {
            if replaying {
                replay.run(replay_rx).await
            } else {
                let mut stop = replay_rx;
                let _ = stop.wait_for(|s| *s).await;
                Ok(())
            }
        });
        let publisher = {
            let status = Arc::clone(&status);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(METRICS_MS));
                loop {
                    tick.tick().await;
                    replicator::status::standby_status(&status.receive, &status.replay);
                }
            })
        };
        Ok(Following {
            journal,
            status,
            receive_stop,
            replay_stop,
            receiving,
            replaying: Some(replaying),
            publisher,
        })
    }

    /// Waits until the receiver or the replay ends by itself (a failure), and says which and
    /// why. Pending forever while both run.
    pub async fn ended(&mut self) -> String {
        let receiving = async {
            match self.receiving.as_mut() {
                Some(task) => format!("the receiver stopped: {}", ended_reason(task.await)),
                None => std::future::pending().await,
            }
        };
        let replaying = async {
            match self.replaying.as_mut() {
                Some(task) => format!("replay stopped: {}", ended_reason(task.await)),
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            why = receiving => { why }
            why = replaying => { why }
        };
        why
    }

    /// Stops receiving (waits for the receiver, at most 30 s): from now on nothing is
    /// appended to the journal from upstream.
    pub async fn stop_receiving(&mut self) {
        self.receive_stop.send_replace(true);
        if let Some(task) = self.receiving.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }

    /// Waits until replay has applied every transaction the journal holds, up to `deadline`.
    pub async fn wait_replayed(&self, deadline: Duration) -> Result<(), String> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let durable = self.journal.durable_lsn();
            let (scanned, waiting, stopped) = match self.status.replay.lock() {
                Ok(v) => (v.scanned_lsn, v.transactions, v.stopped.clone()),
                Err(_) => return Err("the replay view is poisoned".into()),
            };
            if let Some(why) = stopped {
                return Err(format!("replay stopped: {why}"));
            }
            if scanned >= durable && waiting == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                return Err(format!(
                    "replay did not finish within {} ms: it read up to lsn {scanned} of {durable}, \
                     {waiting} transactions still to apply",
                    deadline.as_millis()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops receiving and replaying (the restart point written) and returns the journal,
    /// still open.
    pub async fn stop(mut self) -> Arc<Journal> {
        self.stop_receiving().await;
        self.replay_stop.send_replace(true);
        if let Some(task) = self.replaying.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.publisher.abort();
        // Awaited so that its handle on the status (and the journal) is gone.
        let _ = (&mut self.publisher).await;
        self.journal
    }
}

fn ended_reason(ended: Result<Ended, tokio::task::JoinError>) -> String {
    match ended {
        Ok(Ok(())) => "it ended".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("its task failed: {e}"),
    }
}

/// What the standby's `Status` reports.
pub(crate) struct Standing {
    cfg: Config,
    resources: Vec<Arc<dyn Resource>>,
    /// The receiver's view.
    pub receive: SharedReceiveView,
    /// The replay's view.
    pub replay: SharedView,
    journal: Arc<Journal>,
    /// The failover state, on a failover node.
    pub failover: std::sync::OnceLock<Arc<dyn Fn() -> v1::FailoverState + Send + Sync>>,
}

#[tonic::async_trait]
impl StatusSource for Standing {
    async fn status(&self) -> Result<v1::StatusResponse, tonic::Status> {
        let mut resources = Vec::new();
        for r in &self.resources {
            let probe = tokio::time::timeout(Duration::from_millis(2_000), r.health()).await;
            let (healthy, detail) = match probe {
                Ok(Ok(())) => (true, String::new()),
                Ok(Err(e)) => (false, e.to_string()),
                Err(_) => (
                    false,
                    "the health probe did not answer within 2000 ms".into(),
                ),
            };
            let kind = self
                .cfg
                .resources
                .get(r.name())
                .map_or("", |c| c.kind())
                .to_string();
            resources.push(v1::ResourceHealth {
                name: r.name().to_string(),
                kind,
                healthy,
                detail,
            });
        }
        let replication = replicator::status::standby_status(&self.receive, &self.replay);
        let epoch = self
            .receive
            .lock()
            .map(|v| v.primary_epoch.0)
            .unwrap_or(self.cfg.epoch);
        Ok(v1::StatusResponse {
            role: v1::Role::Standby as i32,
            serving: v1::Serving::NotServing as i32,
            node: self.cfg.node,
            epoch,
            durable_lsn: self.journal.durable_lsn().0,
            open_txns: 0,
            in_doubt_txns: 0,
            resources,
            version: env!("CARGO_PKG_VERSION").to_string(),
            schema_version: proto::SCHEMA_VERSION,
            replication: Some(replication),
            failover: self.failover.get().map(|state| state()),
        })
    }
}
