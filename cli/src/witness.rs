//! `concord witness`: the built-in quorum store, a small durable epoch register with leases
//! (one per cluster name) that breaks the tie between a primary and its standby.
//!
//! It opens its state in `--data DIR` ([`replicator::quorum::witness::WitnessServer`]: the
//! epoch and holder of each cluster, synced before every answer; the leases in memory, and
//! after a restart every recorded holder's lease counts as live for its ttl from the restart)
//! and serves `concord.v1.Witness` on `--listen` (port 0: any free port). Once serving it
//! prints `listening on ADDR`. With `--token-file F`, a call without `authorization: Bearer
//! <token>` (the file's first line) is refused UNAUTHENTICATED. SIGTERM or SIGINT stops it:
//! calls in flight finish, then exit 0. A malformed state file stops it at start with exit 1,
//! naming the file.
//!
//! # Caveats
//!
//! * It serves plain text, on loopback only unless `--listen-any`: a witness for two sites
//!   listens on a routed address behind a firewall or a tunnel, with a token.
//! * One witness per data directory: nothing stops a second one; do not start it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use replicator::quorum::witness::WitnessServer;

use crate::daemon;

/// Options of `concord witness`.
#[derive(clap::Args, Debug)]
pub struct WitnessArgs {
    /// The directory of the witness's state file (created when missing).
    #[arg(long)]
    pub data: PathBuf,
    /// Where to serve `concord.v1.Witness` (gRPC, plain text); port 0: any free port.
    #[arg(long, default_value = "127.0.0.1:7900")]
    pub listen: SocketAddr,
    /// Accept a `--listen` address outside loopback (127.0.0.0/8, ::1).
    #[arg(long)]
    pub listen_any: bool,
    /// A file whose first line is the bearer token every call must carry.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Runs the witness until SIGTERM or SIGINT.
pub fn run(args: WitnessArgs) -> anyhow::Result<()> {
    if !args.listen_any && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {}: the witness serves on loopback only (127.0.0.0/8 or ::1) unless --listen-any is given",
            args.listen
        );
    }
    let token = match &args.token_file {
        Some(path) => Some(proto::client::Token::from_file(path)?.expose().to_owned()),
        None => None,
    };
    let server = WitnessServer::open(&args.data, token)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(server, args.listen))
}

async fn serve(server: WitnessServer, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let bound = listener.local_addr().context("read the bound address")?;
    let mut signals = daemon::signals()?;
    let state = server.state_path().display().to_string();
    tracing::info!(state = %state, "witness listening on {bound}");
    println!("listening on {bound}");
    use std::io::Write;
    std::io::stdout()
        .flush()
        .context("write to standard output")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stop_rx.await;
    };
    let mut serving = tokio::spawn(server.serve(listener, shutdown));
    tokio::select! {
        signal = daemon::wait_for_signal(&mut signals) => {
            tracing::info!("{signal}: stopping");
            let _ = stop_tx.send(());
            (&mut serving).await.context("join the witness server")??;
        }
        ended = &mut serving => {
            ended.context("join the witness server")??;
            anyhow::bail!("the witness server stopped by itself");
        }
    }
    Ok(())
}
