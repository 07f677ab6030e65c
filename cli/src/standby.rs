//! `concord standby`: the standby daemon. It follows a primary coordinator daemon's journal
//! into its own journal and replays the committed transactions into its own resources (the
//! [`replicator`] crate does both), and serves its status.
//!
//! It opens the configuration's resources — its own copies: its own files roots, Maildirs,
//! sled directories and PostgreSQL database — and its journal in `data_dir/journal`, then runs
//! the receiver ([`replicator::standby::Receiver`]) and the replay
//! ([`replicator::replay::Replay`]) side by side. Which primary it follows comes from the
//! `[standby]` table (`--config`), or `--primary URL` with `--data DIR` (the embedded defaults
//! of `concord demo`).
//!
//! It serves the `concord.v1.Replication` service on `--listen` (default 127.0.0.1:7701; the
//! table's `listen`): `Status` (what `concord status` prints: role standby, the lags) and
//! `Inventory` (what `concord compare` reads); `Ship` answers that this node is a standby. Once
//! serving it prints `listening on ADDR` (after `metrics on ADDR` when metrics are served).
//! SIGTERM or SIGINT stops it: the receiver and the replay stop, the restart point is written,
//! the journal is synced and closed; exit 0. A failed journal append or sync (the journal is
//! poisoned), or a replay that cannot go on at all, exits 1 with the reason: a restart
//! recovers, after the cause is fixed.
//!
//! # Caveats
//!
//! * It serves plain text on loopback only: the status and the inventories carry no secrets but
//!   do reveal what the stores hold; a remote `concord compare` goes through an SSH tunnel.
//! * `--no-replay` (hidden; for `concord bench replication`) receives and journals without
//!   replaying.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adapters::config::{Config, StandbyConfig};
use anyhow::Context;
use journal::Journal;
use proto::client::{ClientTls, Credentials, Token};
use proto::v1;
use proto::v1::replication_server::ReplicationServer;
use replicator::replay::{Replay, SharedView};
use replicator::service::{ReplicationService, StatusSource};
use replicator::standby::{Receiver, SharedReceiveView, Upstream};

use crate::daemon;

/// How often the standby's metrics are brought up to date (milliseconds).
const METRICS_MS: u64 = 1_000;

/// Options of `concord standby`.
#[derive(clap::Args, Debug)]
pub struct StandbyArgs {
    /// The configuration file (with a `[standby]` table naming the primary).
    #[arg(long, conflicts_with = "data")]
    pub config: Option<PathBuf>,
    /// A data directory with the embedded defaults (what `concord demo --data DIR` uses);
    /// needs `--primary`.
    #[arg(long, requires = "primary")]
    pub data: Option<PathBuf>,
    /// The primary daemon's address (`http://HOST:PORT`), instead of the table's `primary`.
    #[arg(long)]
    pub primary: Option<String>,
    /// Where to serve the status (gRPC, plain text, loopback); port 0: any free port.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus metrics over HTTP on this address (loopback).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Re-seed first: copy the primary's resources key by key and restart this standby's
    /// journal at the primary's current position (the standby must be stopped; what it held
    /// is replaced), then follow it as usual.
    #[arg(long)]
    pub reseed: bool,
    /// Receive and journal, but do not replay (benchmarks).
    #[arg(long, hide = true)]
    pub no_replay: bool,
}

/// Runs the standby until SIGTERM or SIGINT.
pub fn run(args: StandbyArgs) -> anyhow::Result<()> {
    let (cfg, mut standby) = load(&args)?;
    if let Some(primary) = &args.primary {
        standby.primary = primary.clone();
    }
    if let Some(listen) = args.listen {
        standby.listen = listen;
    }
    if let Some(addr) = args.metrics_listen {
        standby.metrics_listen = Some(addr);
    }
    for (what, addr) in [
        ("--listen", Some(standby.listen)),
        ("--metrics-listen", standby.metrics_listen),
    ] {
        if let Some(addr) = addr
            && !addr.ip().is_loopback()
        {
            anyhow::bail!(
                "{what} {addr}: the standby serves its status on loopback only (127.0.0.0/8 or ::1)"
            );
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        if args.reseed {
            reseed(&cfg, &standby).await?;
        } else if replicator::reseed::interrupted(&cfg.data_dir) {
            anyhow::bail!(
                "a re-seed of {} was interrupted, so its resources may be half copied: run `concord standby --reseed` again",
                cfg.data_dir.display()
            );
        }
        serve(cfg, standby, !args.no_replay).await
    })
}

/// Re-seeds the standby from its primary ([`replicator::reseed`]) and prints what it copied.
async fn reseed(cfg: &Config, standby: &StandbyConfig) -> anyhow::Result<()> {
    let upstream = Upstream {
        url: standby.primary.clone(),
        credentials: credentials(standby)?,
        name: standby.name.clone(),
    };
    let resources = adapters::config::open_all(cfg)
        .await
        .context("open the standby's resources")?;
    let report = replicator::reseed::reseed(&upstream, &resources, &cfg.data_dir)
        .await
        .context("re-seed the standby")?;
    for r in &report.resources {
        println!(
            "re-seeded {}: {} keys, {} copied ({} bytes), {} removed",
            r.name, r.keys, r.copied, r.bytes, r.removed
        );
    }
    println!(
        "re-seeded from {} at lsn {} (cluster {})",
        standby.primary, report.lsn, report.cluster_id
    );
    drop(resources);
    Ok(())
}

fn load(args: &StandbyArgs) -> anyhow::Result<(Config, StandbyConfig)> {
    match (&args.config, &args.data, &args.primary) {
        (Some(path), _, _) => {
            let cfg = Config::load(path)?;
            let standby = match (&cfg.standby, &args.primary) {
                (Some(table), _) => table.clone(),
                (None, Some(primary)) => StandbyConfig::following(primary),
                (None, None) => anyhow::bail!(
                    "{}: no [standby] table: add one with `primary = \"http://HOST:PORT\"` (the primary daemon), or pass --primary",
                    path.display()
                ),
            };
            Ok((cfg, standby))
        }
        (None, Some(data), Some(primary)) => {
            Ok((Config::embedded(data), StandbyConfig::following(primary)))
        }
        _ => anyhow::bail!("give --config FILE, or --data DIR with --primary URL"),
    }
}

fn credentials(standby: &StandbyConfig) -> anyhow::Result<Credentials> {
    let mut credentials = Credentials::none();
    if let Some(token) = &standby.token {
        credentials = credentials.with_token(Token::new(token.expose())?);
    }
    if standby.primary.starts_with("https://") {
        let mut tls = match &standby.tls_ca_file {
            Some(ca) => ClientTls::with_ca_file(ca)?,
            None => anyhow::bail!(
                "[standby] primary is https: set tls_ca_file (the CA that signed the primary's certificate)"
            ),
        };
        if let Some((cert, key)) = &standby.tls_identity {
            tls = tls.identity_files(cert, key)?;
        }
        credentials = credentials.with_tls(tls);
    }
    Ok(credentials)
}

async fn serve(cfg: Config, standby: StandbyConfig, replaying: bool) -> anyhow::Result<()> {
    let credentials = credentials(&standby)?;
    let metrics = standby
        .metrics_listen
        .map(daemon::metrics::start)
        .transpose()?;
    let resources = adapters::config::open_all(&cfg)
        .await
        .context("open the standby's resources")?;
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
            .with_context(|| format!("open the standby's journal in {}", journal_dir.display()))?
    };
    let journal = Arc::new(journal);
    let replay = Replay::new(
        Arc::clone(&journal),
        resources.clone(),
        &cfg.data_dir.join("replication"),
    );
    let replay_view = replay.view();
    let upstream = Upstream {
        url: standby.primary.clone(),
        credentials,
        name: standby.name.clone(),
    };
    let receiver = Receiver::new(
        Arc::clone(&journal),
        resources.clone(),
        upstream,
        &cfg.data_dir,
        Arc::clone(&replay_view),
    );
    let replay = replay.keep_pending(receiver.pending_blobs());
    let receive_view = receiver.view();
    let status: Arc<Standing> = Arc::new(Standing {
        cfg: cfg.clone(),
        resources: resources.clone(),
        receive: receive_view,
        replay: Arc::clone(&replay_view),
        journal: Arc::clone(&journal),
    });
    let inventories =
        replicator::inventory::Inventories::of_journal(resources, Arc::clone(&journal));
    let service = ReplicationServer::new(ReplicationService::new(
        None,
        inventories,
        Arc::clone(&status) as Arc<dyn StatusSource>,
    ))
    .max_encoding_message_size(64 << 20);
    let listener = tokio::net::TcpListener::bind(standby.listen)
        .await
        .with_context(|| format!("listen on {}", standby.listen))?;
    let bound = listener.local_addr().context("the listener's address")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(tokio_stream_incoming(listener), wait_stop(stop_rx.clone()));
    let server = tokio::spawn(server);
    let mut receiving = {
        let stop = stop_rx.clone();
        tokio::spawn(async move { receiver.run(stop).await })
    };
    let mut replaying_task = {
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if replaying {
                replay.run(stop).await
            } else {
                wait_stop(stop).await;
                Ok(())
            }
        })
    };
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
    let mut signals = daemon::signals()?;
    if let Some(endpoint) = &metrics {
        println!("metrics on {}", endpoint.addr);
    }
    tracing::info!(addr = %bound, primary = %standby.primary, "standby of {}; listening on {bound}", standby.primary);
    println!("listening on {bound}");
    use std::io::Write;
    std::io::stdout()
        .flush()
        .context("write to standard output")?;

    let mut received = false;
    let mut replayed = false;
    let failure = tokio::select! {
        signal = daemon::wait_for_signal(&mut signals) => {
            tracing::info!("{signal}: stopping");
            None
        }
        ended = &mut receiving => {
            received = true;
            Some(format!("the receiver stopped: {}", ended_reason(ended)))
        }
        ended = &mut replaying_task => {
            replayed = true;
            Some(format!("replay stopped: {}", ended_reason(ended)))
        }
    };
    let _ = stop_tx.send(true);
    publisher.abort();
    let deadline = Duration::from_secs(30);
    let _ = tokio::time::timeout(deadline, async {
        if !received {
            let _ = (&mut receiving).await;
        }
        if !replayed {
            let _ = (&mut replaying_task).await;
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let closed = tokio::task::spawn_blocking(move || journal.close()).await;
    match (failure, closed) {
        (Some(why), _) => anyhow::bail!("{why}; a restart recovers once the cause is fixed"),
        (None, Ok(Err(e))) => Err(anyhow::anyhow!("close the journal: {e}")),
        _ => Ok(()),
    }
}

fn ended_reason(
    ended: Result<Result<(), replicator::ReplicationError>, tokio::task::JoinError>,
) -> String {
    match ended {
        Ok(Ok(())) => "it ended".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("its task failed: {e}"),
    }
}

async fn wait_stop(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> tokio_stream::wrappers::TcpListenerStream {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

/// What the standby's `Status` reports.
struct Standing {
    cfg: Config,
    resources: Vec<Arc<dyn adapters::Resource>>,
    receive: SharedReceiveView,
    replay: SharedView,
    journal: Arc<Journal>,
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
            failover: None,
        })
    }
}
