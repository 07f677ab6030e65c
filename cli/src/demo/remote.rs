//! `concord demo --remote`: the demo's workload run by separate client processes through a
//! coordinator daemon over gRPC, checked by the same independent check as the embedded demo.
//!
//! 1. The demo starts `concord coordinator` as a child ([`DaemonChild`]: plain text on a free
//!    loopback port, its `listening on` line awaited within a bound), on `--data D` (the
//!    embedded defaults) or, with `--postgres URL`, on the configuration `D/concord.toml` it
//!    writes: the same resources, the PostgreSQL resource `orders` at `URL` (its schema and
//!    table installed first, as the embedded demo does), a `[daemon]` table serving plain text
//!    on loopback without tokens, a transaction timeout of [`TXN_TIMEOUT_MS`] and an orphan
//!    sweep every [`ORPHAN_SWEEP_MS`]. The daemon owns the journal and every store of the data
//!    directory; it recovers what an earlier run left.
//! 2. It records the run (`runs/<run>`, `acks/<run>/`) exactly as the embedded demo does, then
//!    starts `--clients` processes of this binary, each `concord demo-client` ([`ClientArgs`]).
//!    A client connects with [`Concord::connect`] (and attaches the same database with
//!    [`Concord::attach_postgres`] when the run has a PostgreSQL branch: the branch runs and is
//!    prepared in the client, on its own connections, and is enlisted in the daemon). Client `k`
//!    of `K` runs the transactions `i` with `i % K == k`, with its share of `--concurrency` as
//!    concurrent tasks over one connection — the embedded demo's own workload ([`Workload`]),
//!    so the transactions are the same. Each client prints its counts and latencies as one JSON
//!    line and exits.
//! 3. Once every client has exited (a client that died is counted in `clients_failed`; what it
//!    had in flight is rolled back by the daemon, or committed without an acknowledgement,
//!    which the check accepts), the run is marked finished: a transaction a dead client never
//!    started left nothing, and reads as absent.
//! 4. The demo waits until the daemon's `ListInDoubt` lists nothing but timed-out transactions
//!    holding no branch (phase 2 done; a dead client's transaction stays listed so) and, with
//!    PostgreSQL, no branch of the demo's resource is prepared in the database any more (a dead
//!    client's enlisted branch is rolled back at the transaction timeout, one it prepared but
//!    never enlisted by the orphan sweeper); it sends SIGTERM and requires exit 0, then runs the
//!    check on the stores, the journal the daemon closed and the orders table, which counts a
//!    branch still prepared as a problem.
//!
//! # Implementation caveats
//!
//! * The client processes get the PostgreSQL URL in an environment variable
//!   ([`POSTGRES_ENV`]), not on their command line (which other users can read); the daemon
//!   reads it from `D/concord.toml`, written readable by its owner only.
//! * The daemon's recovery counts are not on the wire: `recovered_redriven` and
//!   `recovered_rolled_back` are `null`.
//! * A later run on the same directory without `--postgres` serves from the embedded defaults
//!   again (`D/concord.toml` is only read with `--postgres`, and rewritten by each such run).

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use participant::{Concord, Credentials, PostgresConfig};
use proto::v1::{self, RequestHeader};

use super::check;
use super::{ClientStats, DemoArgs, INDEX, MAIL, PG_RESOURCE, Summary, Workload};
use crate::daemon_child::DaemonChild;
use crate::latency::Latencies;

/// How long a client of a failover pair looks for the primary before it gives up.
const FAILOVER_WAIT_MS: u64 = 10_000;
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
/// The client name the demo's own calls carry.
const CLIENT_NAME: &str = "concord-demo";
/// The configuration file the demo writes into the data directory with `--postgres`.
const CONFIG_FILE: &str = "concord.toml";
/// The node of the daemon's configuration (that of the embedded defaults): the node of every
/// PostgreSQL branch.
const NODE: u32 = 1;
/// The daemon's transaction timeout with `--postgres` (milliseconds): how long a branch a dead
/// client prepared and enlisted stays prepared before the daemon rolls it back.
const TXN_TIMEOUT_MS: u64 = 10_000;
/// How often the daemon looks for branches prepared but never enlisted (milliseconds), with
/// `--postgres`: one found in two sweeps in a row is rolled back.
const ORPHAN_SWEEP_MS: u64 = 1_000;
/// The state `ListInDoubt` gives a transaction its timeout rolled back.
const TIMED_OUT: &str = "timed out";
/// The environment variable that passes the PostgreSQL URL to a client process.
const POSTGRES_ENV: &str = "CONCORD_DEMO_POSTGRES";
/// The PostgreSQL connections of a client process beyond one per task.
const PG_POOL_SPARE: usize = 2;

/// Options of the hidden `concord demo-client`: one client process of `concord demo --remote`.
/// When the run has a PostgreSQL branch, the database's URL comes in [`POSTGRES_ENV`].
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The daemon's URL; more than one: the nodes of a failover pair, the client follows the
    /// primary among them.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Count a transaction that ends in an error (cut off by a failover) and go on.
    #[arg(long)]
    pub tolerate_failover: bool,
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

/// Runs `concord demo --remote` on `data`.
pub(super) fn run(args: &DemoArgs, data: &Path) -> anyhow::Result<Summary> {
    check_clients(args)?;
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    let daemon = start_daemon(args, data)?;
    let driven = drive(args, data, &daemon.url())?;
    let status = daemon.terminate()?;
    conclude(args, data, driven, status, Vec::new())
}

/// Refuses a `--clients` out of range.
pub(super) fn check_clients(args: &DemoArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.clients > CLIENTS_MAX {
        bail!("--clients must be between 1 and {CLIENTS_MAX}");
    }
    Ok(())
}

/// What a run through the daemon did, for [`conclude`].
pub(super) struct Driven {
    run_id: String,
    stats: ClientStats,
    /// Client processes that did not finish their share.
    failed: usize,
    /// Seconds from the first client's start to the last one's exit.
    elapsed_s: f64,
    /// Whether the daemon's phase 2 (and PostgreSQL's prepared branches) finished in time.
    clean: bool,
}

/// Records a run in `data` and runs its transactions from the client processes through the
/// daemon at `url`, then waits for the daemon's phase 2 (steps 2 to 4 of the module docs, up
/// to the stop).
pub(super) fn drive(args: &DemoArgs, data: &Path, url: &str) -> anyhow::Result<Driven> {
    let run_id = super::record_run(args, data)?;
    let started = Instant::now();
    let (stats, failed) = run_clients(args, data, &[url], &run_id, false)?;
    let elapsed_s = started.elapsed().as_secs_f64();
    std::fs::write(data.join("acks").join(&run_id).join(check::FINISHED), b"")?;
    // Its own runtime, dropped with its connection: the daemon's graceful stop waits for open
    // connections.
    let clean = runtime()?.block_on(wait_idle(url, args.postgres.as_deref()))?;
    Ok(Driven {
        run_id,
        stats,
        failed,
        elapsed_s,
        clean,
    })
}

/// Checks the stores of `data` after the daemon stopped with `status`, and sums up the run;
/// `problems` are more the caller found (each makes the check fail).
pub(super) fn conclude(
    args: &DemoArgs,
    data: &Path,
    driven: Driven,
    status: std::process::ExitStatus,
    more: Vec<String>,
) -> anyhow::Result<Summary> {
    let orders = match &args.postgres {
        Some(url) => Some(runtime()?.block_on(super::read_orders(url))?),
        None => None,
    };
    let report = check::check(data, orders.as_ref())?;
    let mut problems = report.problems;
    problems.extend(daemon_problems(status, driven.clean));
    problems.extend(more);
    super::print_problems(&problems);
    let latencies = Latencies::from_us(&driven.stats.latencies_us)?;
    let run_id = driven.run_id;
    Ok(Summary {
        resources: super::resources(args),
        committed: driven.stats.committed,
        rolled_back: driven.stats.rolled_back,
        atomicity_verified: problems.is_empty(),
        tx_per_s: args.transactions as f64 / driven.elapsed_s,
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
        clients_failed: Some(driven.failed),
        ..Summary::default()
    })
}

/// Starts the daemon on the data directory: on the embedded defaults, or with `--postgres` on
/// the configuration [`write_config`] writes, once the demo's schema and table are installed.
pub(super) fn start_daemon(args: &DemoArgs, data: &Path) -> anyhow::Result<DaemonChild> {
    let daemon_args = match &args.postgres {
        Some(url) => {
            runtime()?.block_on(super::setup_postgres(url))?;
            let config = write_config(data, url, args.concurrency)?;
            [OsString::from("--config"), config.into_os_string()]
        }
        None => [OsString::from("--data"), data.as_os_str().to_owned()],
    };
    DaemonChild::start(&daemon_args)
}

/// What the daemon did wrong: its exit `status` after SIGTERM not 0, or work left when the
/// wait for phase 2 gave up (`clean` false).
fn daemon_problems(status: std::process::ExitStatus, clean: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!(
            "the coordinator daemon exited with {status} after SIGTERM, not 0"
        ));
    }
    if !clean {
        problems.push(format!(
            "the daemon still had transactions in phase 2 (or branches prepared) {} s after the last client",
            IDLE_MS_MAX / 1000
        ));
    }
    problems
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Writes `data/concord.toml` for the daemon: the embedded defaults (the same resources in the
/// same directories), the PostgreSQL resource at `url` with connections for phase 2 of
/// `concurrency` transactions, plain text on loopback without tokens. Readable by its owner
/// only: `url` may hold a password.
pub(super) fn write_config(data: &Path, url: &str, concurrency: usize) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data.join(CONFIG_FILE);
    let text = format!(
        "# Written by `concord demo --postgres` (--remote or --standby) for a site; rewritten by\n\
         # each such run.\n\
         node = {NODE}\n\
         data_dir = \".\"\n\
         txn_timeout_ms = {TXN_TIMEOUT_MS}\n\
         orphan_sweep_ms = {ORPHAN_SWEEP_MS}\n\n\
         [daemon]\n\
         plaintext = true\n\
         unauthenticated = true\n\n\
         [resources.uploads]\nkind = \"files\"\nroot = \"uploads\"\ncreate = true\n\n\
         [resources.thumbnails]\nkind = \"files\"\nroot = \"thumbnails\"\ncreate = true\n\n\
         [resources.{MAIL}]\nkind = \"mail\"\nmaildir = \"{MAIL}\"\ncreate = true\n\n\
         [resources.{INDEX}]\nkind = \"kv\"\ndir = \"{INDEX}\"\ncreate = true\n\n\
         [resources.{PG_RESOURCE}]\nkind = \"postgres\"\nurl = {}\npool_size = {}\n",
        toml_string(url),
        concurrency + 8,
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// `s` as a TOML basic string, quoted and escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Starts the client processes and waits for each; returns their counts added up, and how
/// many did not exit 0 with their counts.
pub(super) fn run_clients(
    args: &DemoArgs,
    data: &Path,
    urls: &[&str],
    run_id: &str,
    tolerate_failover: bool,
) -> anyhow::Result<(ClientStats, usize)> {
    let clients = args.clients;
    let tasks = args.concurrency.div_ceil(clients).max(1);
    let mut children = Vec::new();
    for k in 0..clients {
        children.push(spawn_client(
            args,
            data,
            urls,
            run_id,
            k,
            tasks,
            tolerate_failover,
        )?);
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
    urls: &[&str],
    run_id: &str,
    k: usize,
    tasks: usize,
    tolerate_failover: bool,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("find the concord binary")?;
    let mut command = Command::new(exe);
    command.arg("demo-client");
    for url in urls {
        command.args(["--url", url]);
    }
    if tolerate_failover {
        command.arg("--tolerate-failover");
    }
    command
        .args(["--run", run_id])
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
        .args(["--tasks", &tasks.to_string()]);
    match &args.postgres {
        Some(pg) => command.env(POSTGRES_ENV, pg),
        None => command.env_remove(POSTGRES_ENV),
    };
    command
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

/// Waits, at most [`IDLE_MS_MAX`], until the daemon lists no transaction in phase 2 and, with
/// the database at `postgres`, no branch of the demo's resource is prepared there; returns
/// whether it got there.
pub(super) async fn wait_idle(url: &str, postgres: Option<&str>) -> anyhow::Result<bool> {
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
        // A dead client's transaction rolled back at its timeout stays listed, holding
        // nothing, until its caller hears of it (never): not work to wait for.
        let unfinished: Vec<v1::InDoubtTxn> = listed
            .transactions
            .into_iter()
            .filter(|t| !(t.state == TIMED_OUT && t.branches.is_empty()))
            .collect();
        let prepared = match postgres {
            Some(pg) => adapters::postgres::prepared_in(PG_RESOURCE, pg, NODE).await?,
            None => Vec::new(),
        };
        if unfinished.is_empty() && prepared.is_empty() {
            return Ok(true);
        }
        if Instant::now() > deadline {
            for t in &unfinished {
                eprintln!("pending: {} {} {:?}", t.xid, t.state, t.branches);
            }
            for branch in &prepared {
                eprintln!("pending: {branch:?} still prepared in {PG_RESOURCE}");
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

/// Connects to the daemon (and attaches the demo's database when the run has a PostgreSQL
/// branch) and runs this client's share of the run's transactions.
async fn client_tasks(args: &ClientArgs) -> anyhow::Result<ClientStats> {
    let concord = match args.urls.as_slice() {
        [url] => Concord::connect(url, Credentials::none()).await,
        urls => {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            Concord::connect_any_within(&urls, Credentials::none(), FAILOVER_WAIT_MS).await
        }
    }
    .context("connect to the coordinator daemon")?;
    let postgres = std::env::var(POSTGRES_ENV).ok();
    if let Some(url) = &postgres {
        let config = PostgresConfig {
            pool_size: args.tasks + PG_POOL_SPARE,
            ..PostgresConfig::new(url.as_str(), NODE)
        };
        concord
            .attach_postgres(PG_RESOURCE, config)
            .await
            .context("attach the demo's PostgreSQL database")?;
    }
    let workload = Arc::new(Workload {
        run_id: args.run.clone(),
        acks: args.data.join("acks").join(&args.run),
        total: args.transactions,
        fail_every: args.fail_every,
        postgres: postgres.is_some(),
        first: args.client,
        step: args.clients,
        tolerate_cut_off: args.tolerate_failover,
    });
    let hidden = indicatif::ProgressBar::hidden();
    workload.run(&concord, args.tasks, &hidden).await
}
