//! `concord demo --remote`: the demo's workload run by separate client processes through a
//! coordinator daemon over gRPC, checked by the same independent check as the embedded demo.
//!
//! 1. The demo starts `concord coordinator --data D` as a child ([`DaemonChild`]: plain text on
//!    a free loopback port, its `listening on` line awaited within a bound). The daemon owns the
//!    journal and every store of the data directory; it recovers what an earlier run left.
//! 2. It records the run (`runs/<run>`, `acks/<run>/`) exactly as the embedded demo does, then
//!    starts `--clients` processes of this binary, each `concord demo-client` ([`ClientArgs`]).
//!    Client `k` of `K` runs the transactions `i` with `i % K == k`, with its share of
//!    `--concurrency` as concurrent tasks over one connection. A transaction writes the same
//!    three files, mail and key as the embedded demo's (its content functions are shared), one in
//!    `--fail-every` asks for a path outside the files root and rolls back, and a committed one
//!    is acknowledged by its client as an empty file `acks/<run>/<i>` before it is counted. Each
//!    client prints its counts and latencies as one JSON line and exits.
//! 3. Once every client has exited (a client that died is counted in `clients_failed`; what it
//!    had in flight is rolled back by the daemon, or committed without an acknowledgement,
//!    which the check accepts), the run is marked finished: a transaction a dead client never
//!    started left nothing, and reads as absent.
//! 4. The demo waits until the daemon's `ListInDoubt` is empty (phase 2 done), sends SIGTERM and
//!    requires exit 0, then runs the check on the stores and the journal the daemon closed.
//!
//! # Implementation caveats
//!
//! * `--postgres` is refused: a remote PostgreSQL branch is prepared in the application and
//!   enlisted with `EnlistPrepared`, which the daemon does not serve yet.
//! * The clients speak the generated client directly ([`crate::remote_txn`]), not the
//!   participant library's remote mode (`Concord::connect`), which was not on main when this
//!   was written.
//! * The daemon's recovery counts are not on the wire: `recovered_redriven` and
//!   `recovered_rolled_back` are `null`.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use proto::client::{Client, Credentials};
use proto::v1::{self, RequestHeader};
use serde::{Deserialize, Serialize};

use super::check::{self, Run};
use super::{DemoArgs, FILES, INDEX, MAIL, Summary, content, demo_message, key, key_value};
use crate::daemon_child::DaemonChild;
use crate::latency::Latencies;
use crate::remote_txn::{Ended, RemoteTxn};

/// The client processes `--clients` starts by default.
pub(super) const CLIENTS_DEFAULT: usize = 4;
/// The most client processes.
const CLIENTS_MAX: usize = 64;
/// How long the demo waits for the daemon's phase 2 after the last client exited.
const IDLE_MS_MAX: u64 = 60_000;
/// How often the daemon is asked whether phase 2 is done.
const IDLE_POLL_MS: u64 = 50;
/// How long one client process may run, per transaction it has (milliseconds), on top of
/// [`CLIENT_MS_BASE`].
const CLIENT_MS_PER_TXN: u64 = 200;
const CLIENT_MS_BASE: u64 = 120_000;
/// The client name the demo's calls carry.
const CLIENT_NAME: &str = "concord-demo";

/// Options of the hidden `concord demo-client`: one client process of `concord demo --remote`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The daemon's URL.
    #[arg(long)]
    pub url: String,
    /// The demo's data directory (for the acknowledgements).
    #[arg(long)]
    pub data: PathBuf,
    /// The run's id.
    #[arg(long)]
    pub run: String,
    /// The run's transactions (all clients together).
    #[arg(long)]
    pub transactions: u64,
    /// One transaction in this many fails on purpose (0: none).
    #[arg(long)]
    pub fail_every: u64,
    /// This client's number, from 0.
    #[arg(long)]
    pub client: u64,
    /// The number of clients.
    #[arg(long)]
    pub clients: u64,
    /// Concurrent transactions in this client.
    #[arg(long)]
    pub tasks: usize,
}

/// What a client process prints: one JSON line.
#[derive(Serialize, Deserialize, Default, Debug)]
struct ClientStats {
    committed: u64,
    rolled_back: u64,
    latencies_us: Vec<u64>,
}

impl ClientStats {
    fn add(&mut self, other: ClientStats) {
        self.committed += other.committed;
        self.rolled_back += other.rolled_back;
        self.latencies_us.extend(other.latencies_us);
    }
}

/// Runs `concord demo --remote` on `data`.
pub(super) fn run(args: &DemoArgs, data: &Path) -> anyhow::Result<Summary> {
    if args.postgres.is_some() {
        bail!(
            "--remote with --postgres is not available yet: the daemon does not serve EnlistPrepared; run the PostgreSQL demo embedded (without --remote)"
        );
    }
    if args.clients == 0 || args.clients > CLIENTS_MAX {
        bail!("--clients must be between 1 and {CLIENTS_MAX}");
    }
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    let daemon = DaemonChild::start(&[OsString::from("--data"), data.as_os_str().to_owned()])?;
    let url = daemon.url();
    let run_id = record_run(args, data)?;
    let started = Instant::now();
    let (stats, failed) = run_clients(args, data, &url, &run_id)?;
    let elapsed = started.elapsed().as_secs_f64();
    std::fs::write(data.join("acks").join(&run_id).join(check::FINISHED), b"")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let clean = runtime.block_on(wait_idle(&url))?;
    // Its connection closed first: the daemon's graceful stop waits for open connections.
    drop(runtime);
    let status = daemon.terminate()?;
    let report = check::check(data, None)?;
    let mut problems = report.problems;
    if !status.success() {
        problems.push(format!(
            "the coordinator daemon exited with {status} after SIGTERM, not 0"
        ));
    }
    if !clean {
        problems.push(format!(
            "the daemon still had transactions in phase 2 {} s after the last client",
            IDLE_MS_MAX / 1000
        ));
    }
    super::print_problems(&problems);
    let latencies = Latencies::from_us(&stats.latencies_us)?;
    Ok(Summary {
        resources: ["uploads", "thumbnails", MAIL, INDEX]
            .map(String::from)
            .to_vec(),
        committed: stats.committed,
        rolled_back: stats.rolled_back,
        atomicity_verified: problems.is_empty(),
        tx_per_s: args.transactions as f64 / elapsed,
        p50_ms: latencies.percentile_ms(0.50),
        p99_ms: latencies.percentile_ms(0.99),
        earlier_transactions_checked: report
            .ran
            .iter()
            .filter(|(run, _)| **run != run_id)
            .map(|(_, ran)| ran)
            .sum(),
        recovered_redriven: None,
        recovered_rolled_back: None,
        remote: Some(true),
        clients: Some(args.clients),
        clients_failed: Some(failed),
    })
}

/// Records the run before its first transaction, so that a check after a kill covers it.
fn record_run(args: &DemoArgs, data: &Path) -> anyhow::Result<String> {
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_micros()
        .to_string();
    std::fs::create_dir_all(data.join("acks").join(&run_id))?;
    std::fs::create_dir_all(data.join("runs"))?;
    let run = Run {
        transactions: args.transactions,
        fail_every: args.fail_every,
        mail: true,
        kv: true,
        postgres: false,
    };
    std::fs::write(data.join("runs").join(&run_id), run.record())?;
    Ok(run_id)
}

/// Starts the client processes and waits for each; returns their counts added up, and how
/// many did not exit 0 with their counts.
fn run_clients(
    args: &DemoArgs,
    data: &Path,
    url: &str,
    run_id: &str,
) -> anyhow::Result<(ClientStats, usize)> {
    let clients = args.clients;
    let tasks = args.concurrency.div_ceil(clients).max(1);
    let mut children = Vec::new();
    for k in 0..clients {
        children.push(spawn_client(args, data, url, run_id, k, tasks)?);
    }
    let bound = Duration::from_millis(
        CLIENT_MS_BASE + CLIENT_MS_PER_TXN * args.transactions.div_ceil(clients as u64),
    );
    let deadline = Instant::now() + bound;
    let mut total = ClientStats::default();
    let mut failed = 0;
    for (k, child) in children.into_iter().enumerate() {
        match finish_client(child, deadline) {
            Ok(stats) => total.add(stats),
            Err(e) => {
                eprintln!("demo client {k}: {e:#}");
                failed += 1;
            }
        }
    }
    Ok((total, failed))
}

fn spawn_client(
    args: &DemoArgs,
    data: &Path,
    url: &str,
    run_id: &str,
    k: usize,
    tasks: usize,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("find the concord binary")?;
    Command::new(exe)
        .arg("demo-client")
        .args(["--url", url, "--run", run_id])
        .arg("--data")
        .arg(data)
        .args(["--transactions", &args.transactions.to_string()])
        .args(["--fail-every", &args.fail_every.to_string()])
        .args([
            "--client",
            &k.to_string(),
            "--clients",
            &args.clients.to_string(),
        ])
        .args(["--tasks", &tasks.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start demo client {k}"))
}

/// Waits for a client (killed at `deadline`) and reads its counts.
fn finish_client(mut child: Child, deadline: Instant) -> anyhow::Result<ClientStats> {
    let mut stdout = child
        .stdout
        .take()
        .context("the client's output is not piped")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish in time; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader of its output failed"))??;
    if !status.success() {
        bail!("exited with {status}");
    }
    serde_json::from_str(text.trim()).context("read its counts")
}

/// Waits, at most [`IDLE_MS_MAX`], until the daemon lists no transaction in phase 2; returns
/// whether it got there.
async fn wait_idle(url: &str) -> anyhow::Result<bool> {
    let mut client = proto::client::connect(url, &Credentials::none()).await?;
    let deadline = Instant::now() + Duration::from_millis(IDLE_MS_MAX);
    loop {
        let listed = client
            .list_in_doubt(v1::ListInDoubtRequest {
                header: Some(RequestHeader::current(CLIENT_NAME)),
            })
            .await
            .context("ask the daemon for its unfinished transactions")?
            .into_inner();
        if listed.transactions.is_empty() {
            return Ok(true);
        }
        if Instant::now() > deadline {
            for t in &listed.transactions {
                eprintln!("pending: {} {} {:?}", t.xid, t.state, t.branches);
            }
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(IDLE_POLL_MS)).await;
    }
}

/// Runs `concord demo-client`: this client's transactions, then its counts as one JSON line.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.client >= args.clients || args.tasks == 0 {
        bail!("--client must be below --clients, and --tasks above 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = runtime.block_on(client_tasks(&args))?;
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

async fn client_tasks(args: &ClientArgs) -> anyhow::Result<ClientStats> {
    let client = proto::client::connect(&args.url, &Credentials::none()).await?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.tasks {
        let (client, next) = (client.clone(), Arc::clone(&next));
        let mine = Mine {
            acks: args.data.join("acks").join(&args.run),
            run_id: args.run.clone(),
            first: args.client,
            step: args.clients,
            total: args.transactions,
            fail_every: args.fail_every,
        };
        tasks.spawn(async move { mine.run(&client, &next).await });
    }
    let mut total = ClientStats::default();
    while let Some(joined) = tasks.join_next().await {
        total.add(joined??);
    }
    Ok(total)
}

/// The transactions of one client process, shared by its tasks.
struct Mine {
    acks: PathBuf,
    run_id: String,
    first: u64,
    step: u64,
    total: u64,
    fail_every: u64,
}

impl Mine {
    async fn run(&self, client: &Client, next: &AtomicU64) -> anyhow::Result<ClientStats> {
        let mut stats = ClientStats::default();
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let i = n.saturating_mul(self.step).saturating_add(self.first);
            if i >= self.total {
                return Ok(stats);
            }
            let fail = self.fail_every > 0 && i % self.fail_every == self.fail_every - 1;
            let t0 = Instant::now();
            let ended = one_transaction(client, &self.run_id, i, fail).await?;
            if ended == Ended::Committed {
                std::fs::write(self.acks.join(i.to_string()), b"")?;
                stats.committed += 1;
            } else {
                stats.rolled_back += 1;
            }
            stats.latencies_us.push(t0.elapsed().as_micros() as u64);
        }
    }
}

/// Transaction `i` through the daemon (rolled back on purpose when `fail`).
async fn one_transaction(
    client: &Client,
    run_id: &str,
    i: u64,
    fail: bool,
) -> anyhow::Result<Ended> {
    let mut tx = RemoteTxn::begin(client, CLIENT_NAME).await?;
    let xid = tx.xid().to_string();
    for (resource, name) in FILES {
        let path = format!("tx/{run_id}/{i}/{name}");
        tx.put(resource, &path, content(run_id, i, name))
            .await
            .with_context(|| format!("{xid}: put {resource}/{path}"))?;
    }
    let message = demo_message(run_id, i).build()?;
    tx.enqueue(MAIL, message)
        .await
        .with_context(|| format!("{xid}: enqueue in {MAIL}"))?;
    tx.insert(INDEX, key(run_id, i).into_bytes(), key_value(run_id, i))
        .await
        .with_context(|| format!("{xid}: insert in {INDEX}"))?;
    if fail {
        let refused = tx
            .put("uploads", "../outside-the-root", b"refused".to_vec())
            .await;
        if refused.is_ok() {
            bail!("{xid}: the files resource accepted a path outside its root");
        }
        return tx.rollback("the demo's deliberate failure").await;
    }
    // Not committed (rolled back, or in doubt) counts as not committed, like a rollback.
    tx.commit().await
}
