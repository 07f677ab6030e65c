//! Two sites in one test process: a primary (an embedded coordinator with the participant API,
//! its `Shipper` behind a real tonic server on 127.0.0.1:0) and a standby (its own journal and
//! resources, a `Receiver` and a `Replay` each in a task with a stop channel), wired as
//! `concord coordinator` and `concord standby` wire them; plus waiting with deadlines and
//! comparing the two sites' inventories.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::Resource;
use adapters::config::{Config, ReplicationConfig};
use journal::{Journal, Lsn};
use participant::{Concord, MessageBuilder, Transaction};
use proto::client::Credentials;
use proto::v1;
use proto::v1::replication_server::{Replication, ReplicationServer};
use replicator::ReplicationError;
use replicator::inventory::Inventories;
use replicator::primary::Shipper;
use replicator::replay::{Replay, ReplayView, SharedView};
use replicator::service::{ReplicationService, StatusSource};
use replicator::standby::{ReceiveView, Receiver, SharedReceiveView, Upstream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Bound on every step that waits (open, a commit, a close, a site catching up).
pub const STEP_DEADLINE: Duration = Duration::from_secs(20);
/// How often a condition is polled.
const POLL_MS: u64 = 20;
/// The resources of `Config::embedded`.
pub const RESOURCES: [&str; 4] = ["index", "mail", "thumbnails", "uploads"];
/// Messages as large as the daemon allows on its Replication service.
const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Awaits `future`, failing the test when it takes longer than [`STEP_DEADLINE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(STEP_DEADLINE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not finish within {STEP_DEADLINE:?}"),
    }
}

/// Polls `condition` until it holds; fails the test with `what` and `state()` after `deadline`.
pub async fn wait_until(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> bool,
    state: impl Fn() -> String,
) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}; {}",
            state()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// A status source that answers an empty status (the tests read the shipper directly).
struct NoStatus;

#[tonic::async_trait]
impl StatusSource for NoStatus {
    async fn status(&self) -> Result<v1::StatusResponse, tonic::Status> {
        Ok(v1::StatusResponse::default())
    }
}

/// A tonic server for `service` on 127.0.0.1:0, stopped by [`Server::stop`].
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `service` (a `Replication` implementation) on a free loopback port.
    pub async fn start<S: Replication>(service: S) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let svc = ReplicationServer::new(service)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            );
        let task = tokio::spawn(async move {
            if let Err(e) = serving.await {
                panic!("the test server failed: {e}");
            }
        });
        Server {
            url,
            stop: Some(stop),
            task,
        }
    }

    /// Stops serving (open streams are cut).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The primary site: an embedded coordinator on `Config::embedded(dir)` and its shipper.
pub struct Primary {
    /// The data directory.
    pub dir: PathBuf,
    /// The participant API on it.
    pub concord: Concord,
    /// Its shipper.
    pub shipper: Arc<Shipper>,
    /// Its Replication service.
    pub server: Server,
}

impl Primary {
    /// Opens the primary in `dir` with `replication`, installs the sync gate when the mode is
    /// sync, and serves its Replication service.
    pub async fn start(dir: &Path, replication: ReplicationConfig) -> Primary {
        let mut config = Config::embedded(dir);
        config.replication = replication.clone();
        let concord = within("open the primary", Concord::open(config))
            .await
            .unwrap();
        let coordinator = concord.coordinator().clone();
        let cluster_id = replicator::cluster::primary_cluster_id(dir).unwrap();
        let shipper = Shipper::new(coordinator.clone(), cluster_id, replication);
        if let Some(gate) = shipper.gate() {
            assert!(coordinator.set_commit_gate(gate).is_ok(), "a gate was set");
        }
        let resources = RESOURCES
            .iter()
            .map(|name| Arc::clone(coordinator.resource(name).unwrap()))
            .collect();
        let durable = {
            let coordinator = coordinator.clone();
            Arc::new(move || coordinator.journal().durable_lsn())
        };
        let service = ReplicationService::new(
            Some(Arc::clone(&shipper)),
            Inventories::new(resources, durable),
            Arc::new(NoStatus),
        );
        let server = Server::start(service).await;
        Primary {
            dir: dir.to_path_buf(),
            concord,
            shipper,
            server,
        }
    }

    /// The URL standbys connect to.
    pub fn url(&self) -> String {
        self.server.url.clone()
    }

    /// The primary journal's durable LSN.
    pub fn durable(&self) -> Lsn {
        self.concord.coordinator().journal().durable_lsn()
    }

    /// The primary's resource `name`.
    pub fn resource(&self, name: &str) -> Arc<dyn Resource> {
        Arc::clone(self.concord.coordinator().resource(name).unwrap())
    }

    /// Waits until phase 2 of every transaction is finished (the journal stops moving).
    pub async fn settle(&self) {
        assert!(
            self.concord.wait_idle(STEP_DEADLINE).await,
            "phase 2 did not settle on the primary"
        );
    }

    /// Stops the shipper and the server, waits for phase 2 and closes.
    pub async fn stop(self) {
        let Primary {
            concord,
            shipper,
            server,
            ..
        } = self;
        shipper.stop();
        server.stop().await;
        assert!(
            concord.wait_idle(STEP_DEADLINE).await,
            "phase 2 did not settle on the primary"
        );
        assert!(
            concord.close(STEP_DEADLINE).await,
            "the primary did not close"
        );
    }
}

/// The standby site: its own journal and resources, a receiver and (optionally) a replay.
pub struct Standby {
    /// The data directory.
    pub dir: PathBuf,
    /// Its journal.
    pub journal: Arc<Journal>,
    /// Its resources, by name.
    pub resources: BTreeMap<String, Arc<dyn Resource>>,
    /// The receiver's view.
    pub receive: SharedReceiveView,
    /// The replay's view.
    pub replay: SharedView,
    stop: watch::Sender<bool>,
    receiving: Option<JoinHandle<Result<(), ReplicationError>>>,
    replaying: Option<JoinHandle<Result<(), ReplicationError>>>,
}

/// How a standby's tasks ended.
pub struct Ended {
    /// The receiver's result (`None` when [`Standby::receiver_ended`] took it).
    pub receiver: Option<Result<(), ReplicationError>>,
    /// The replay's result (`None` when it did not run).
    pub replay: Option<Result<(), ReplicationError>>,
}

impl Standby {
    /// Opens the standby in `dir` (`Config::embedded(dir)`; journal in `dir/journal`) and runs
    /// its receiver following `url`, and its replay when `replaying`.
    pub async fn start(dir: &Path, url: &str, replaying: bool) -> Standby {
        let config = Config::embedded(dir);
        let resources = within(
            "open the standby's resources",
            adapters::config::open_all(&config),
        )
        .await
        .unwrap();
        let journal = Arc::new(open_journal(&dir.join("journal")).await.unwrap());
        let replay = Replay::new(
            Arc::clone(&journal),
            resources.clone(),
            &dir.join("replication"),
        );
        let replay_view = replay.view();
        let upstream = Upstream {
            url: url.to_string(),
            credentials: Credentials::none(),
            name: "standby-1".into(),
        };
        let receiver = Receiver::new(
            Arc::clone(&journal),
            resources.clone(),
            upstream,
            dir,
            Arc::clone(&replay_view),
        );
        let receive = receiver.view();
        let (stop, stopped) = watch::channel(false);
        let receiving = {
            let stopped = stopped.clone();
            tokio::spawn(async move { receiver.run(stopped).await })
        };
        let replaying = replaying.then(|| tokio::spawn(async move { replay.run(stopped).await }));
        Standby {
            dir: dir.to_path_buf(),
            journal,
            resources: resources
                .into_iter()
                .map(|r| (r.name().to_string(), r))
                .collect(),
            receive,
            replay: replay_view,
            stop,
            receiving: Some(receiving),
            replaying,
        }
    }

    /// The receiver's view now.
    pub fn received(&self) -> ReceiveView {
        self.receive.lock().unwrap().clone()
    }

    /// The replay's view now.
    pub fn replayed(&self) -> ReplayView {
        self.replay.lock().unwrap().clone()
    }

    /// The receiver's and replay's views, for a failure message.
    pub fn describe(&self) -> String {
        let r = self.received();
        let p = self.replayed();
        format!(
            "standby: durable {} connected {} last_error {:?} refused {:?}; replayed {} scanned {} stopped {:?}",
            r.durable_lsn,
            r.connected,
            r.last_error,
            r.refused,
            p.replayed_lsn,
            p.scanned_lsn,
            p.stopped
        )
    }

    /// Waits until the receiver's task ends by itself (a fatal error).
    pub async fn receiver_ended(&mut self) -> Result<(), ReplicationError> {
        let task = self.receiving.take().unwrap();
        within("the receiver's end", task).await.unwrap()
    }

    /// Stops the receiver and the replay, closes the journal and drops the resources (so that
    /// the directory can be opened again).
    pub async fn stop(self) -> Ended {
        self.stop.send_replace(true);
        let receiver = match self.receiving {
            Some(task) => Some(within("stop the receiver", task).await.unwrap()),
            None => None,
        };
        let replay = match self.replaying {
            Some(task) => Some(within("stop the replay", task).await.unwrap()),
            None => None,
        };
        let journal = self.journal;
        let _ = tokio::task::spawn_blocking(move || journal.close())
            .await
            .unwrap();
        drop(self.resources);
        Ended { receiver, replay }
    }
}

/// Opens (creating) a journal in `dir` with the coordinator's configuration, as the standby
/// does.
pub async fn open_journal(dir: &Path) -> Result<Journal, journal::JournalError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || Journal::open(&dir, coordinator::runtime::journal_config()))
        .await
        .unwrap()
}

/// A test message.
pub fn message(subject: &str) -> MessageBuilder {
    MessageBuilder::new()
        .from("shop@example.org")
        .to("alice@example.org")
        .subject(subject)
        .body("Thank you.\n")
}

/// Deterministic bytes of `len` (different for each `seed`).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Puts a file, enqueues a mail and inserts a key in one transaction `n` (its file is
/// `large` bytes when given, a few bytes otherwise); returns the transaction, not committed.
pub async fn work(concord: &Concord, n: u64, large: Option<usize>) -> Transaction {
    let tx = within("begin", concord.begin()).await.unwrap();
    let uploads = within("join uploads", tx.files("uploads")).await.unwrap();
    let content = bytes(n, large.unwrap_or(16 + n as usize % 100));
    within("put", uploads.put(&format!("docs/{n}.bin"), &content[..]))
        .await
        .unwrap();
    let mail = within("join mail", tx.mail("mail")).await.unwrap();
    within(
        "enqueue",
        mail.enqueue_built(&message(&format!("order {n}"))),
    )
    .await
    .unwrap();
    let index = within("join index", tx.kv("index")).await.unwrap();
    within(
        "insert",
        index.insert(
            format!("order/{n}").as_bytes(),
            &content[..content.len().min(32)],
        ),
    )
    .await
    .unwrap();
    tx
}

/// Commits `count` transactions of [`work`] numbered from `first`; returns the decision LSNs.
pub async fn commit_work(concord: &Concord, first: u64, count: u64) -> Vec<Lsn> {
    let mut lsns = Vec::new();
    for n in first..first + count {
        let mut tx = work(concord, n, None).await;
        let committed = within("commit", tx.commit()).await.unwrap();
        lsns.extend(committed.lsn);
    }
    lsns
}

/// Each resource's inventory: name → (key → digest).
pub async fn inventories(
    resources: impl IntoIterator<Item = Arc<dyn Resource>>,
) -> BTreeMap<String, Vec<adapters::InventoryEntry>> {
    let mut all = BTreeMap::new();
    for resource in resources {
        let entries = within("inventory", resource.inventory()).await.unwrap();
        all.insert(resource.name().to_string(), entries);
    }
    all
}

/// The keys on which two inventories differ, by resource (empty: equal).
pub fn differences(
    primary: &BTreeMap<String, Vec<adapters::InventoryEntry>>,
    standby: &BTreeMap<String, Vec<adapters::InventoryEntry>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for name in RESOURCES {
        let as_map = |inv: &BTreeMap<String, Vec<adapters::InventoryEntry>>| {
            inv.get(name)
                .map(|entries| {
                    entries
                        .iter()
                        .map(|e| (e.key.clone(), e.digest))
                        .collect::<BTreeMap<_, _>>()
                })
                .unwrap_or_default()
        };
        let (p, s) = (as_map(primary), as_map(standby));
        for (key, digest) in &p {
            match s.get(key) {
                None => out.push(format!("{name}/{key}: only on the primary")),
                Some(d) if d != digest => out.push(format!("{name}/{key}: content differs")),
                Some(_) => {}
            }
        }
        for key in s.keys().filter(|k| !p.contains_key(*k)) {
            out.push(format!("{name}/{key}: only on the standby"));
        }
    }
    out
}

/// Waits until the standby holds the primary's whole journal and its resources equal the
/// primary's (the primary must be settled); fails with the differences otherwise.
pub async fn wait_equal(primary: &Primary, standby: &Standby) {
    primary.settle().await;
    let durable = primary.durable();
    wait_until(
        "the standby journals the primary's records",
        STEP_DEADLINE,
        || standby.received().durable_lsn >= durable,
        || format!("primary durable {durable}; {}", standby.describe()),
    )
    .await;
    let start = Instant::now();
    loop {
        let p = inventories(primary_resources(primary)).await;
        let s = inventories(standby.resources.values().cloned()).await;
        let diff = differences(&p, &s);
        if diff.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < STEP_DEADLINE,
            "the sites differ after {STEP_DEADLINE:?}: {} differences, first {:?}; {}",
            diff.len(),
            &diff[..diff.len().min(5)],
            standby.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The primary's resources.
pub fn primary_resources(primary: &Primary) -> Vec<Arc<dyn Resource>> {
    RESOURCES
        .iter()
        .map(|name| primary.resource(name))
        .collect()
}

/// The names of the files in `dir` (empty when it does not exist).
pub fn names_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// The messages delivered to the Maildir under `data_dir` (`new/` and `cur/`).
pub fn mails(data_dir: &Path) -> Vec<String> {
    let mut all = names_in(&data_dir.join("mail/new"));
    all.extend(names_in(&data_dir.join("mail/cur")));
    all.sort();
    all
}
