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
use proto::client::{ClientTls, Credentials, Token};
use proto::v1::replication_server::ReplicationServer;
use replicator::service::{ReplicationService, StatusSource};
use replicator::standby::Upstream;

use crate::daemon;
use crate::node::follow::Following;

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
    if cfg.failover.is_some() && !args.reseed {
        // A failover node: one address for everything, the [daemon] table's.
        let listen = daemon::config::serving(&cfg.daemon, args.listen, false)
            .map_err(anyhow::Error::from)?;
        let builder = daemon::server_builder(&cfg.daemon)?;
        anyhow::ensure!(
            !replicator::reseed::interrupted(&cfg.data_dir),
            "a re-seed of {} was interrupted, so its resources may be half copied: run `concord standby --reseed` again",
            cfg.data_dir.display()
        );
        return runtime.block_on(crate::node::run(
            cfg,
            crate::node::StartAs::Standby,
            listen,
            builder,
            standby.metrics_listen,
        ));
    }
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
                // A failover node follows whoever the quorum store names; the peer first.
                (None, None) if cfg.failover.is_some() => {
                    let peer = cfg.failover.as_ref().map_or("", |f| f.peer.as_str());
                    StandbyConfig::following(peer)
                }
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

pub(crate) fn credentials(standby: &StandbyConfig) -> anyhow::Result<Credentials> {
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
    let upstream = Upstream {
        url: standby.primary.clone(),
        credentials,
        name: standby.name.clone(),
    };
    let mut following =
        Following::start(&cfg, resources.clone(), Some(upstream), replaying).await?;
    let inventories =
        replicator::inventory::Inventories::of_journal(resources, Arc::clone(&following.journal));
    let service = ReplicationServer::new(ReplicationService::new(
        None,
        inventories,
        Arc::clone(&following.status) as Arc<dyn StatusSource>,
    ))
    .max_encoding_message_size(64 << 20);
    let listener = tokio::net::TcpListener::bind(standby.listen)
        .await
        .with_context(|| format!("listen on {}", standby.listen))?;
    let bound = listener.local_addr().context("the listener's address")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let mut stop = stop_rx;
                let _ = stop.wait_for(|s| *s).await;
            },
        );
    let server = tokio::spawn(server);
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

    let failure = tokio::select! {
        signal = daemon::wait_for_signal(&mut signals) => {
            tracing::info!("{signal}: stopping");
            None
        }
        why = following.ended() => Some(why),
    };
    let _ = stop_tx.send(true);
    let journal = following.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let closed = tokio::task::spawn_blocking(move || journal.close()).await;
    match (failure, closed) {
        (Some(why), _) => anyhow::bail!("{why}; a restart recovers once the cause is fixed"),
        (None, Ok(Err(e))) => Err(anyhow::anyhow!("close the journal: {e}")),
        _ => Ok(()),
    }
}
