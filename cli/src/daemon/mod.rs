//! `concord coordinator`: the coordinator daemon. It opens the configuration's journal and
//! resources exactly as embedded mode does (`participant::Concord::open`, recovery included),
//! then serves the `concord.v1.Coordinator` gRPC service ([`service`]) so that application
//! processes, in any language, run their transactions through it.
//!
//! How it serves comes from the configuration's `[daemon]` table
//! ([`adapters::config::DaemonConfig`]; `--data DIR` takes the embedded defaults: plain text on
//! loopback, no tokens). It serves TLS ([`tls`], mutual when `tls_client_ca_file` is set) or,
//! when asked with `plaintext = true`, plain text — on loopback only, unless
//! `plaintext_any_address` (or `--listen-any`) forces it; a table that chose neither, or that
//! names no client token without `unauthenticated = true`, is refused before anything opens,
//! saying what to add. Every call's credentials are checked before any work ([`auth`]): a
//! client's bearer token, the operator's for the operator calls. The limits of the table
//! ([`config`]) bound messages, chunks, branches, each client's open transactions and each
//! call's time.
//!
//! Once the listener is bound it logs and prints `listening on ADDR` (one line on standard
//! output), which scripts and tests wait for; when metrics are served (`--metrics-listen`, or
//! the table's `metrics_listen`), a line `metrics on ADDR` comes before it ([`metrics`]:
//! Prometheus text over HTTP). SIGTERM or SIGINT drains it: `Begin` answers
//! UNAVAILABLE, commits and rollbacks in flight get `drain_timeout_ms` to finish, the
//! server stops, the transactions still open are dropped (they roll back: nothing of them was
//! decided) and the coordinator closes (journal synced and closed). It exits 0 when all of it
//! happened in time.
//!
//! # Caveats
//!
//! * The TLS files and tokens are read once, at start: a renewed certificate or a new token
//!   takes a restart.
//!
//! # Hostile clients
//!
//! Anyone who reaches the port may send anything, so every resource a connection can hold is
//! bounded: connections ([`config::CONNECTIONS_MAX`], each with
//! [`config::HANDSHAKE_TIMEOUT_MS`] to send its first bytes: [`incoming`]); streams per
//! connection ([`config::STREAMS_PER_CONNECTION_MAX`]); a call's header list
//! ([`config::HEADER_LIST_BYTES_MAX`]; a frame is at most HTTP/2's default 16 KiB, and a
//! header block that never ends is refused by the HTTP/2 layer); a message
//! (`message_bytes_max`, refused from its length prefix, before anything is allocated for
//! it); a silent connection (a PING every [`config::KEEPALIVE_INTERVAL_MS`], closed when one
//! is not answered within [`config::KEEPALIVE_TIMEOUT_MS`]); a call (`request_timeout_ms`).
//! `cli/tests/daemon_hostile.rs` holds the daemon to it. Not bounded yet: the bytes of the
//! messages being received across all streams together (each stream may hold up to a
//! message's limit while it arrives).

pub(crate) mod auth;
pub(crate) mod config;
mod errors;
pub(crate) mod incoming;
pub(crate) mod metrics;
mod open_slots;
pub(crate) mod oversize;
pub(crate) mod service;
mod stream;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use participant::{Concord, Config};
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::replication_server::ReplicationServer;
use replicator::primary::Shipper;
use replicator::service::ReplicationService;

/// The largest message of the replication service (a batch of records, a blob chunk; a single
/// record is at most the journal's `record_bytes_max`, 8 MiB).
const REPLICATION_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Options of `concord coordinator`.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// The configuration file (its `[daemon]` table says how the daemon serves).
    #[arg(long, conflicts_with = "data")]
    pub config: Option<PathBuf>,
    /// A data directory with the embedded defaults (what `concord demo --data DIR` uses): plain
    /// text on loopback, no tokens.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The address to serve gRPC on, instead of the configuration's `listen` (default
    /// 127.0.0.1:7700; port 0: any free port, printed once listening).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Allow plain text on a non-loopback address (the configuration's
    /// `plaintext_any_address`: only on a trusted network).
    #[arg(long)]
    pub listen_any: bool,
    /// Serve Prometheus metrics over HTTP on this address, instead of the configuration's
    /// `metrics_listen` (port 0: any free port, printed as `metrics on ADDR`); none when
    /// neither is given.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow a non-loopback metrics address (no credentials, no TLS: only on a trusted
    /// network).
    #[arg(long)]
    pub metrics_listen_any: bool,
}

impl DaemonArgs {
    fn load(&self) -> anyhow::Result<Config> {
        match (&self.config, &self.data) {
            (Some(path), _) => Ok(Config::load(path)?),
            (None, Some(data)) => Ok(Config::embedded(data)),
            (None, None) => Ok(Config::load(std::path::Path::new("concord.toml"))?),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let cfg = args.load()?;
    let listen = config::serving(&cfg.daemon, args.listen, args.listen_any)?;
    let metrics_listen = args
        .metrics_listen
        .or(cfg.daemon.metrics_listen)
        .map(|addr| metrics::check_metrics_listen(addr, args.metrics_listen_any))
        .transpose()?;
    let builder = server_builder(&cfg.daemon)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    if cfg.failover.is_some() {
        return runtime.block_on(crate::node::run(
            cfg,
            crate::node::StartAs::Primary,
            listen,
            builder,
            metrics_listen,
        ));
    }
    runtime.block_on(serve(cfg, listen, builder, metrics_listen))
}

/// The server builder with the `[daemon]` table's limits and TLS.
pub(crate) fn server_builder(
    daemon: &adapters::config::DaemonConfig,
) -> anyhow::Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder()
        .timeout(Duration::from_millis(daemon.limits.request_timeout_ms))
        .max_concurrent_streams(config::STREAMS_PER_CONNECTION_MAX)
        .http2_max_header_list_size(config::HEADER_LIST_BYTES_MAX)
        .http2_keepalive_interval(Some(Duration::from_millis(config::KEEPALIVE_INTERVAL_MS)))
        .http2_keepalive_timeout(Some(Duration::from_millis(config::KEEPALIVE_TIMEOUT_MS)));
    if let Some(files) = &daemon.tls {
        builder = tls::configure(builder, files)?;
    }
    Ok(builder)
}

async fn serve(
    cfg: Config,
    listen: SocketAddr,
    mut builder: tonic::transport::Server,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let limits = cfg.daemon.limits;
    let keys = Arc::new(auth::Keys::new(&cfg.daemon));
    log_serving(&cfg.daemon);
    // Before the journal opens: it registers its metrics there.
    let metrics = metrics_listen.map(metrics::start).transpose()?;
    let concord = Concord::open(cfg.clone())
        .await
        .context("open the configuration's journal and resources")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let bound = listener.local_addr().context("the listener's address")?;
    let coordinator = concord.coordinator().clone();
    let cluster_id = replicator::cluster::primary_cluster_id(&cfg.data_dir)
        .context("read or create the cluster id")?;
    let shipper = Shipper::new(coordinator.clone(), cluster_id, cfg.replication.clone());
    if let Some(gate) = shipper.gate() {
        let _ = coordinator.set_commit_gate(gate);
    }
    log_replication(&cfg.replication);
    let resources: Vec<_> = cfg
        .resources
        .keys()
        .filter_map(|name| coordinator.resource(name).ok().map(Arc::clone))
        .collect();
    let durable = {
        let coordinator = coordinator.clone();
        Arc::new(move || coordinator.journal().durable_lsn())
    };
    let inventories = replicator::inventory::Inventories::new(resources, durable);
    let daemon = Arc::new(service::Daemon::new(concord, cfg, Arc::clone(&shipper)));
    let replication = ReplicationServer::new(ReplicationService::new(
        Some(Arc::clone(&shipper)),
        inventories,
        Arc::new(service::DaemonStatus(Arc::clone(&daemon))),
    ))
    .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX)
    .max_encoding_message_size(REPLICATION_MESSAGE_BYTES_MAX);
    let keeper = {
        let daemon = Arc::clone(&daemon);
        let shipper = Arc::clone(&shipper);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(config::HOUSEKEEPING_MS));
            loop {
                tick.tick().await;
                daemon.housekeeping();
                shipper.hold_floor();
                shipper.publish_metrics();
            }
        })
    };
    let svc = CoordinatorServer::from_arc(Arc::clone(&daemon))
        .max_decoding_message_size(limits.message_bytes_max)
        .max_encoding_message_size(limits.message_bytes_max);
    let svc = oversize::Oversize::new(svc, limits.message_bytes_max);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_service(auth::Authenticate::new(svc, Arc::clone(&keys)))
        .add_service(auth::Authenticate::new(replication, keys))
        .serve_with_incoming_shutdown(incoming::Incoming::new(listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);
    let mut signals = signals()?;
    if let Some(endpoint) = &metrics {
        let addr = endpoint.addr;
        tracing::info!(%addr, "metrics on {addr}");
        println!("metrics on {addr}");
    }
    tracing::info!(addr = %bound, "listening on {bound}");
    println!("listening on {bound}");
    use std::io::Write;
    std::io::stdout()
        .flush()
        .context("write to standard output")?;

    let signal = wait_for_signal(&mut signals).await;
    tracing::info!("{signal}: draining");
    daemon.drain();
    shipper.stop();
    keeper.abort();
    let drain_ms = limits.drain_timeout_ms;
    if !daemon.wait_settled(Duration::from_millis(drain_ms)).await {
        tracing::warn!(
            "commits still in flight after {drain_ms} ms (drain_timeout_ms); stopping anyway \
             (recovery finishes them)"
        );
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_millis(drain_ms), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the server task failed"),
        Err(_) => tracing::warn!("the server did not stop in time"),
    }
    let closed = daemon
        .release()
        .close(Duration::from_millis(config::CLOSE_MS_MAX))
        .await;
    anyhow::ensure!(
        closed,
        "the coordinator did not close within {} ms: the next start recovers",
        config::CLOSE_MS_MAX
    );
    drop(metrics);
    tracing::info!("stopped");
    Ok(())
}

/// Says at start how the daemon serves (never a token).
fn log_serving(daemon: &adapters::config::DaemonConfig) {
    let transport = match &daemon.tls {
        Some(tls) if tls.client_ca_file.is_some() => "TLS with client certificates",
        Some(_) => "TLS",
        None => "plain text",
    };
    let clients: Vec<&str> = daemon.clients.keys().map(String::as_str).collect();
    tracing::info!(
        transport,
        clients = ?clients,
        operator_token = daemon.operator_token.is_some(),
        unauthenticated = daemon.unauthenticated,
        "serving {transport}"
    );
    if daemon.unauthenticated {
        tracing::warn!(
            "unauthenticated = true: any caller that reaches the port may call{}",
            if daemon.operator_token.is_none() {
                ", operator calls included"
            } else {
                ""
            }
        );
    }
}

/// Waits for SIGTERM or SIGINT; returns its name.
pub(crate) async fn wait_for_signal(signals: &mut Signals) -> &'static str {
    tokio::select! {
        _ = signals.term.recv() => "SIGTERM",
        _ = signals.int.recv() => "SIGINT",
    }
}

/// The handlers of SIGTERM and SIGINT, installed before the daemon says it listens: a signal
/// sent as soon as the line is read drains it instead of killing it.
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

pub(crate) fn signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(Signals {
        term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
        int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
    })
}

/// Logs how commits relate to standbys.
fn log_replication(cfg: &adapters::config::ReplicationConfig) {
    use adapters::config::{ReplicationMode, SyncFallback};
    match (cfg.mode, cfg.sync_fallback) {
        (ReplicationMode::Async, _) => {
            tracing::info!("replication: async (commits never wait for a standby)")
        }
        (ReplicationMode::Sync, SyncFallback::Fail) => tracing::info!(
            "replication: sync (a commit waits up to {} ms for a standby, then fails as not confirmed)",
            cfg.sync_wait_ms_max
        ),
        (ReplicationMode::Sync, SyncFallback::Async) => tracing::info!(
            "replication: sync (a commit waits up to {} ms for a standby, then commits stop waiting until one catches up)",
            cfg.sync_wait_ms_max
        ),
    }
}
