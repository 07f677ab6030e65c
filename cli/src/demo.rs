//! `concord demo`: the main job on embedded defaults — transactions across every kind of
//! resource concord has, some made to fail, then an independent check that each is
//! all-or-nothing.
//!
//! Every transaction `i` of a run spans four branches of [`Config::embedded`], so two-phase
//! commit decides:
//!
//! * three files — `tx/<run>/<i>/a` and `tx/<run>/<i>/b` in the `uploads` resource and
//!   `tx/<run>/<i>/t` in `thumbnails`;
//! * one mail in the mail queue `mail` (a Maildir under the data directory), built with
//!   [`MessageBuilder`]: Message-ID `<run.i@demo.concord.invalid>`, a subject and a body naming
//!   run and `i`;
//! * one key `tx/<run>/<i>` in the kv resource `index` (a sled directory), its value naming run
//!   and `i`.
//!
//! What a transaction writes is a function of run and `i`, so the check needs no record of what
//! was written. One transaction in `--fail-every` writes everything and then asks for a path
//! outside the files resource's root, which the resource refuses; the demo rolls it back. A
//! transaction the coordinator acknowledged as committed is recorded, before it is counted, as
//! an empty file `acks/<run>/<i>`; a run whose every transaction returned is marked by
//! `acks/<run>/finished`.
//!
//! The check (the `check` module) reads the stores directly, not through concord — the files,
//! the Maildir's `new/` and `cur/`, the sled trees (with sled, after the demo's concord is
//! closed) — and finds, for every transaction of every run in the data directory, all of its
//! parts present with their exact content or none; every acknowledged one present; every one
//! the journal holds a commit decision for present (acknowledged to its client or not); no
//! deliberately failed one present; no mail delivered twice; nothing left staged or prepared in
//! any resource. Run with `--data DIR` on the directory of a demo that was killed (SIGKILL at any
//! moment), the demo first recovers, and the check covers the killed run too.
//!
//! With `--postgres URL`, every transaction also inserts an order row `(run, i)` into the table
//! `concord_demo_orders` of that database (a fifth branch, with row capture on; the demo
//! installs the `concord` schema and the table when missing), and the check counts the row as
//! one more part of the transaction. No `concord:` transaction of the demo may be left prepared
//! there either.

mod check;
pub(crate) mod failover;
pub mod remote;
pub(crate) mod standby;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use participant::config::{EMBEDDED_KV, EMBEDDED_MAIL};
use participant::{Concord, ConcordError, Config, MessageBuilder};
use serde::{Deserialize, Serialize};

use check::{Orders, Run};

use crate::latency::Latencies;

/// Options of `concord demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Data directory (default: a new temp directory, removed afterwards). A directory left by an
    /// earlier demo, even one that was killed, is recovered and checked too.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Transactions to run.
    #[arg(long, default_value_t = 10_000)]
    pub transactions: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// One transaction in this many deliberately fails in a branch and must roll back (0: none).
    #[arg(long, default_value_t = 10)]
    pub fail_every: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Add a PostgreSQL branch (an order row) to every transaction, in the database at this URL
    /// (with --standby: no URL; each site gets a throwaway PostgreSQL cluster of its own).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "URL")]
    pub postgres: Option<String>,
    /// Run a coordinator daemon as a child and the transactions from separate client processes
    /// over gRPC (`--concurrency` is shared among them).
    #[arg(long)]
    pub remote: bool,
    /// With --remote or --standby: the client processes.
    #[arg(long, default_value_t = remote::CLIENTS_DEFAULT)]
    pub clients: usize,
    /// Run a primary daemon in DATA/primary and a standby following it in DATA/standby, the
    /// transactions through the primary as with --remote; print the standby's lag, wait for its
    /// replay, and compare both sites.
    #[arg(long, conflicts_with = "remote")]
    pub standby: bool,
    /// Run a failover pair (a primary node, a standby node, the built-in witness) on
    /// DATA/{a,b,witness}, the transactions through it as with --remote; kill the primary
    /// midway (SIGKILL) and let the standby take over; check the new primary's site.
    #[arg(long, conflicts_with_all = ["remote", "standby"])]
    pub failover: bool,
    /// With --failover: pause the primary (SIGSTOP: sick, not dead) instead of killing it, and
    /// resume it once the standby took over; it must step down.
    #[arg(long, requires = "failover")]
    pub pause: bool,
}

/// The demo's PostgreSQL resource and table.
const PG_RESOURCE: &str = "orders";
const PG_TABLE: &str = "concord_demo_orders";

/// The summary `--json` prints.
#[derive(Serialize, Debug, Default)]
struct Summary {
    /// The resources every transaction of this run spans.
    resources: Vec<String>,
    committed: u64,
    rolled_back: u64,
    atomicity_verified: bool,
    tx_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Transactions of earlier runs in the data directory that ran (committed or rolled back)
    /// and were checked: all of a run that finished; of a run killed midway, those up to its
    /// highest committed one — never the number a killed run had planned.
    earlier_transactions_checked: u64,
    /// What the demo's recovery did (`null` with `--remote`: the daemon recovered).
    recovered_redriven: Option<usize>,
    recovered_rolled_back: Option<usize>,
    /// With `--remote` only: true.
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<bool>,
    /// With `--remote` only: the client processes started.
    #[serde(skip_serializing_if = "Option::is_none")]
    clients: Option<usize>,
    /// With `--remote` only: the client processes that did not finish their share.
    #[serde(skip_serializing_if = "Option::is_none")]
    clients_failed: Option<usize>,
    /// With `--standby` only: whether the standby's resources equal the primary's, compared
    /// while both ran (once the standby replayed up to the primary's durable LSN) and again
    /// once both stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    sites_equal: Option<bool>,
    /// With `--standby` only: the median of the standby's lag (the age of its oldest
    /// transaction not yet replayed) sampled during the run, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    lag_p50_ms: Option<f64>,
    /// With `--standby` only: the 99th percentile of the same samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    lag_p99_ms: Option<f64>,
    /// With `--standby` only: the most records the standby's replay was behind in a sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    lag_records_max: Option<u64>,
    /// With `--failover` only: true.
    #[serde(skip_serializing_if = "Option::is_none")]
    failover: Option<bool>,
    /// With `--failover` only: from the kill of the primary to the first transaction
    /// acknowledged by the new primary, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    failover_ms: Option<f64>,
    /// With `--failover` only: acknowledged transactions missing on the new primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    acked_lost: Option<u64>,
    /// With `--failover` only: whether the old primary decided anything after the standby won
    /// its epoch (or, with `--pause`, still served once resumed).
    #[serde(skip_serializing_if = "Option::is_none")]
    split_brain: Option<bool>,
    /// With `--failover` only: transactions the failover cut off (an error, not an outcome:
    /// rolled back, or committed without an acknowledgement; the check accepts both).
    #[serde(skip_serializing_if = "Option::is_none")]
    cut_off: Option<u64>,
}

/// The files of a transaction: (resource, file name).
const FILES: [(&str, &str); 3] = [("uploads", "a"), ("uploads", "b"), ("thumbnails", "t")];
/// The demo's mail queue.
const MAIL: &str = EMBEDDED_MAIL;
/// The demo's kv resource.
const INDEX: &str = EMBEDDED_KV;

/// Runs `concord demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<bool> {
    if args.concurrency == 0 || args.concurrency > 4096 {
        bail!("--concurrency must be between 1 and 4096");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (data, _temp) = match &args.data {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new().prefix("concord-demo-").tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    if args.postgres.as_deref() == Some("") && !args.standby {
        bail!(
            "--postgres needs the database's URL (only with --standby does the demo start its own)"
        );
    }
    if args.clients != remote::CLIENTS_DEFAULT && !(args.remote || args.standby || args.failover) {
        bail!("--clients goes with --remote, --standby or --failover");
    }
    let summary = match (args.remote, args.standby) {
        _ if args.failover => failover::run(&args, &data)?,
        (_, true) => standby::run(&args, &data)?,
        (true, false) => remote::run(&args, &data)?,
        (false, false) => runtime.block_on(demo(&args, &data))?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary, &data, args.data.is_some());
    }
    Ok(summary.atomicity_verified)
}

async fn demo(args: &DemoArgs, data: &Path) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    let mut config = Config::embedded(data);
    if let Some(url) = &args.postgres {
        setup_postgres(url).await?;
        config.resources.insert(
            PG_RESOURCE.to_string(),
            participant::ResourceConfig::Postgres {
                url: url.clone(),
                pool_size: args.concurrency + 8,
                fence_wait_ms: 2_000,
                call_timeout_ms: 30_000,
                connect_timeout_ms: 10_000,
            },
        );
    }
    let concord = Concord::open(config).await?;
    let recovery = concord.recovery().clone();
    if let Some(message) = recovery.unconfigured_message() {
        concord.close(Duration::from_secs(10)).await;
        let hint = if recovery.unconfigured.contains_key(PG_RESOURCE) {
            " (the demo's PostgreSQL resource: run with --postgres URL)"
        } else {
            ""
        };
        bail!("{message}{hint}");
    }
    if !concord.wait_idle(WAIT).await {
        let message = gave_up("recovery", &concord);
        concord.close(Duration::from_secs(10)).await;
        bail!(message);
    }
    let run_id = record_run(args, data)?;

    let started = Instant::now();
    let stats = match run_clients(args, &concord, data, &run_id).await {
        Ok(stats) => stats,
        Err(e) => {
            // Stopped before the process ends, so that nothing it was retrying says it retries.
            concord.close(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    if !concord.wait_idle(WAIT).await {
        let message = gave_up("phase 2", &concord);
        concord.close(Duration::from_secs(10)).await;
        bail!(message);
    }
    let clean = concord.coordinator().list().is_empty();
    concord.close(Duration::from_secs(10)).await;
    let orders = match &args.postgres {
        Some(url) => Some(read_orders(url).await?),
        None => None,
    };
    let check = check::check(data, orders.as_ref())?;
    print_problems(&check.problems);
    let latencies = Latencies::from_us(&stats.latencies_us)?;
    Ok(Summary {
        resources: resources(args),
        committed: stats.committed,
        rolled_back: stats.rolled_back,
        atomicity_verified: check.problems.is_empty() && clean,
        tx_per_s: args.transactions as f64 / elapsed,
        p50_ms: latencies.percentile_ms(0.50),
        p99_ms: latencies.percentile_ms(0.99),
        earlier_transactions_checked: check
            .ran
            .iter()
            .filter(|(run, _)| **run != run_id)
            .map(|(_, ran)| ran)
            .sum(),
        recovered_redriven: Some(recovery.redriven.len()),
        recovered_rolled_back: Some(recovery.rolled_back.len()),
        remote: None,
        clients: None,
        clients_failed: None,
        ..Summary::default()
    })
}

/// Records a new run in `data` before its first transaction (`runs/<run>` says what it runs,
/// `acks/<run>/` will hold its acknowledgements), so that a check after a kill covers it;
/// returns its id.
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
        postgres: args.postgres.is_some(),
    };
    std::fs::write(data.join("runs").join(&run_id), run.record())?;
    Ok(run_id)
}

/// The resources every transaction of a run with `args` spans.
fn resources(args: &DemoArgs) -> Vec<String> {
    let mut resources: Vec<String> = ["uploads", "thumbnails", MAIL, INDEX]
        .map(String::from)
        .to_vec();
    if args.postgres.is_some() {
        resources.push(PG_RESOURCE.to_string());
    }
    resources
}

/// The first problems the check found, on standard error.
fn print_problems(problems: &[String]) {
    for problem in problems.iter().take(20) {
        eprintln!("atomicity: {problem}");
    }
    if problems.len() > 20 {
        eprintln!("atomicity: … and {} more", problems.len() - 20);
    }
}

/// How long the demo waits for recovery, and for phase 2 after its last transaction.
const WAIT: Duration = Duration::from_secs(60);

/// A wait given up: prints one line per transaction still pending on standard error (its
/// decision, the resources it waits for and their last errors) and returns the error's message.
fn gave_up(what: &str, concord: &Concord) -> String {
    let pending = concord.coordinator().pending_lines();
    for line in &pending {
        eprintln!("pending: {line}");
    }
    format!(
        "{what} did not finish within {} s; {} transaction(s) still pending (listed above)",
        WAIT.as_secs(),
        pending.len()
    )
}

/// The counts of demo clients (a task, a client process, a whole run); a client process of
/// the remote demo prints its own as one JSON line.
#[derive(Serialize, Deserialize, Default, Debug)]
struct ClientStats {
    committed: u64,
    rolled_back: u64,
    latencies_us: Vec<u64>,
    /// Transactions a failover cut off (an error instead of an outcome; `--failover` only).
    #[serde(default)]
    cut_off: u64,
}

impl ClientStats {
    fn add(&mut self, other: ClientStats) {
        self.committed += other.committed;
        self.rolled_back += other.rolled_back;
        self.latencies_us.extend(other.latencies_us);
        self.cut_off += other.cut_off;
    }
}

/// A share of a run's transactions, and what each writes: the transactions `i = first +
/// n·step` below `total` (the embedded demo runs all of them, `first` 0 and `step` 1; client
/// `k` of `K` processes of the remote demo runs `first` k and `step` K). Run over any
/// [`Concord`], embedded or connected to a daemon.
struct Workload {
    run_id: String,
    /// Where an acknowledged transaction is recorded (`acks/<run>`).
    acks: PathBuf,
    total: u64,
    fail_every: u64,
    /// Whether every transaction also inserts an order row in [`PG_RESOURCE`].
    postgres: bool,
    first: u64,
    step: u64,
    /// Whether a transaction that fails with an error (cut off by a failover: its node died
    /// or stepped down) is counted and the next one run, rather than ending the share.
    tolerate_cut_off: bool,
}

impl Workload {
    /// Runs the share in `tasks` concurrent tasks over `concord`, each taking the share's next
    /// transaction until none is left; returns their counts added up. The first error of a task
    /// is the result (the other tasks are stopped with it).
    async fn run(
        self: Arc<Self>,
        concord: &Concord,
        tasks: usize,
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<ClientStats> {
        let next = Arc::new(AtomicU64::new(0));
        let mut running = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let (workload, concord) = (Arc::clone(&self), concord.clone());
            let (next, progress) = (Arc::clone(&next), progress.clone());
            running.spawn(async move { workload.task(&concord, &next, &progress).await });
        }
        let mut total = ClientStats::default();
        while let Some(joined) = running.join_next().await {
            total.add(joined??);
        }
        Ok(total)
    }

    async fn task(
        &self,
        concord: &Concord,
        next: &AtomicU64,
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<ClientStats> {
        let mut stats = ClientStats::default();
        while let Some(i) = self.transaction(next.fetch_add(1, Ordering::Relaxed)) {
            let fail = self.fail_every > 0 && i % self.fail_every == self.fail_every - 1;
            let t0 = Instant::now();
            match one_transaction(concord, &self.run_id, i, fail, self.postgres).await {
                Ok(true) => {
                    std::fs::write(self.acks.join(i.to_string()), b"")?;
                    stats.committed += 1;
                }
                Ok(false) => stats.rolled_back += 1,
                Err(e) if self.tolerate_cut_off => {
                    if stats.cut_off == 0 {
                        eprintln!("transaction {i} cut off: {e:#}");
                    }
                    stats.cut_off += 1;
                }
                Err(e) => return Err(e),
            }
            stats.latencies_us.push(t0.elapsed().as_micros() as u64);
            progress.inc(1);
        }
        Ok(stats)
    }

    /// The share's `n`-th transaction, if it has one.
    fn transaction(&self, n: u64) -> Option<u64> {
        let i = n.checked_mul(self.step)?.checked_add(self.first)?;
        (i < self.total).then_some(i)
    }
}

async fn run_clients(
    args: &DemoArgs,
    concord: &Concord,
    data: &Path,
    run_id: &str,
) -> anyhow::Result<ClientStats> {
    let workload = Arc::new(Workload {
        run_id: run_id.to_string(),
        acks: data.join("acks").join(run_id),
        total: args.transactions,
        fail_every: args.fail_every,
        postgres: args.postgres.is_some(),
        first: 0,
        step: 1,
        tolerate_cut_off: false,
    });
    let progress = progress_bar(args);
    let total = workload.run(concord, args.concurrency, &progress).await?;
    progress.finish_and_clear();
    // Every transaction of the run returned: a later check counts all of them as run.
    std::fs::write(data.join("acks").join(run_id).join(check::FINISHED), b"")?;
    Ok(total)
}

/// Runs transaction `i` (rolled back on purpose when `fail`); returns whether it committed.
async fn one_transaction(
    concord: &Concord,
    run_id: &str,
    i: u64,
    fail: bool,
    postgres: bool,
) -> anyhow::Result<bool> {
    let mut tx = concord.begin().await?;
    if postgres {
        let orders = tx.postgres(PG_RESOURCE).await?;
        let n = i64::try_from(i)?;
        orders
            .execute(
                &format!("INSERT INTO {PG_TABLE} VALUES ($1, $2, $3)"),
                &[&run_id, &n, &format!("order {i}")],
            )
            .await?;
    }
    for (resource, name) in FILES {
        let files = tx.files(resource).await?;
        let path = format!("tx/{run_id}/{i}/{name}");
        files
            .put(&path, content(run_id, i, name).as_slice())
            .await?;
    }
    let mail = tx.mail(MAIL).await?;
    mail.enqueue_built(&demo_message(run_id, i)).await?;
    let index = tx.kv(INDEX).await?;
    index
        .insert(key(run_id, i).as_bytes(), &key_value(run_id, i))
        .await?;
    if fail {
        let uploads = tx.files("uploads").await?;
        if uploads
            .put("../outside-the-root", &b"refused"[..])
            .await
            .is_ok()
        {
            bail!("the files resource accepted a path outside its root");
        }
        tx.rollback().await?;
        return Ok(false);
    }
    // Not committed (rolled back, or in doubt) counts as not committed, like a rollback.
    match tx.commit().await {
        Ok(_) => Ok(true),
        Err(ConcordError::RolledBack { .. } | ConcordError::InDoubt { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn content(run_id: &str, i: u64, name: &str) -> Vec<u8> {
    format!("concord demo run {run_id} transaction {i} file {name}\n").into_bytes()
}

/// The mail of transaction `i`.
fn demo_message(run_id: &str, i: u64) -> MessageBuilder {
    MessageBuilder::new()
        .from("concord demo <demo@concord.invalid>")
        .to("orders@concord.invalid")
        .subject(mail_subject(run_id, i))
        .message_id(message_id(run_id, i))
        .body(mail_body(run_id, i))
}

fn message_id(run_id: &str, i: u64) -> String {
    format!("<{run_id}.{i}@demo.concord.invalid>")
}

fn mail_subject(run_id: &str, i: u64) -> String {
    format!("concord demo run {run_id} transaction {i}")
}

fn mail_body(run_id: &str, i: u64) -> String {
    format!("concord demo run {run_id} transaction {i} mail\n")
}

/// The kv key of transaction `i`.
fn key(run_id: &str, i: u64) -> String {
    format!("{}{i}", key_prefix(run_id))
}

/// What every kv key of a run starts with.
fn key_prefix(run_id: &str) -> String {
    format!("tx/{run_id}/")
}

fn key_value(run_id: &str, i: u64) -> Vec<u8> {
    format!("concord demo run {run_id} transaction {i} key\n").into_bytes()
}

/// The demo's schema and table in the database at `url` (idempotent).
async fn setup_postgres(url: &str) -> anyhow::Result<()> {
    adapters::postgres::install(PG_RESOURCE, url).await?;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to the --postgres database")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {PG_TABLE} (run text, i bigint, item text NOT NULL, PRIMARY KEY (run, i))"
        ))
        .await?;
    adapters::postgres::replicate(PG_RESOURCE, url, &[PG_TABLE.to_string()]).await?;
    Ok(())
}

/// Reads the orders table and the prepared branches, directly (not through concord).
async fn read_orders(url: &str) -> anyhow::Result<Orders> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to the --postgres database")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let rows = client
        .query(&format!("SELECT run, i FROM {PG_TABLE}"), &[])
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                u64::try_from(r.get::<_, i64>(1)).unwrap_or(u64::MAX),
            )
        })
        .collect();
    let prepared = adapters::postgres::prepared_in(PG_RESOURCE, url, 1)
        .await?
        .len();
    Ok(Orders { rows, prepared })
}

fn progress_bar(args: &DemoArgs) -> indicatif::ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(args.transactions);
    let style =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} transactions {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn print_summary(s: &Summary, data: &Path, kept: bool) {
    println!("resources:           {}", s.resources.join(", "));
    println!("committed:           {}", s.committed);
    println!("rolled_back:         {}", s.rolled_back);
    println!("atomicity_verified:  {}", s.atomicity_verified);
    println!("tx_per_s:            {:.0}", s.tx_per_s);
    println!("p50_ms:              {:.2}", s.p50_ms);
    println!("p99_ms:              {:.2}", s.p99_ms);
    if let (Some(clients), Some(failed)) = (s.clients, s.clients_failed) {
        println!("clients:             {clients} processes, {failed} failed");
    }
    if let (Some(ms), Some(lost), Some(split)) = (s.failover_ms, s.acked_lost, s.split_brain) {
        println!("failover_ms:         {ms:.0}");
        println!("acked_lost:          {lost}");
        println!("split_brain:         {split}");
        println!("cut_off:             {}", s.cut_off.unwrap_or(0));
    }
    if let (Some(equal), Some(p50), Some(p99)) = (s.sites_equal, s.lag_p50_ms, s.lag_p99_ms) {
        println!("sites_equal:         {equal}");
        println!("lag_p50_ms:          {p50:.1}");
        println!("lag_p99_ms:          {p99:.1}");
    }
    let recovered = s.recovered_redriven.unwrap_or(0) + s.recovered_rolled_back.unwrap_or(0);
    if s.earlier_transactions_checked > 0 || recovered > 0 {
        println!("earlier_checked:     {}", s.earlier_transactions_checked);
    }
    if let (Some(redriven), Some(rolled_back)) = (s.recovered_redriven, s.recovered_rolled_back)
        && recovered > 0
    {
        println!("recovered:           {redriven} re-driven, {rolled_back} rolled back");
    }
    if kept {
        println!("data:                {}", data.display());
    }
}
