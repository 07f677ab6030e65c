//! `concord demo`: the main job on embedded defaults — transactions across two files resources,
//! some made to fail, then an independent check that each is all-or-nothing.
//!
//! Every transaction `i` of a run writes three files: `tx/<run>/<i>/a` and `tx/<run>/<i>/b` in
//! the `uploads` resource and `tx/<run>/<i>/t` in `thumbnails` — two branches, so two-phase
//! commit decides. Their content is a function of run, `i` and the file name, so the check needs
//! no record of what was written. One transaction in `--fail-every` writes its files and then
//! asks for a path outside the resource's root, which the resource refuses; the demo rolls it
//! back. A transaction the coordinator acknowledged as committed is recorded, before it is
//! counted, as an empty file `acks/<run>/<i>`.
//!
//! The check reads the resources directly (not through concord): for every transaction of every
//! run found in the data directory, the three files are either all present with their exact
//! content or all absent; every acknowledged one is present; every one the journal holds a
//! commit decision for is present (acknowledged to its client or not); no deliberately failed
//! one is;
//! nothing is left in the resources' staging areas, and no branch is left prepared. Run with
//! `--data DIR` on the directory of a demo that was killed (SIGKILL at any moment), the demo
//! first recovers, and the check covers the killed run too.
//!
//! With `--postgres URL`, every transaction also inserts an order row `(run, i)` into the table
//! `concord_demo_orders` of that database (a third branch, with row capture on; the demo installs
//! the `concord` schema and the table when missing), and the check counts the row as one more
//! part of the transaction: all of it present or none, for every run recorded with `postgres`.
//! No `concord:` transaction of the demo may be left prepared there either.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use coordinator::Outcome;
use coordinator::record::CoordRecord;
use participant::{Concord, Config};
use serde::Serialize;

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
    /// Add a PostgreSQL branch (an order row) to every transaction, in the database at this URL.
    #[arg(long)]
    pub postgres: Option<String>,
}

/// The demo's PostgreSQL resource and table.
const PG_RESOURCE: &str = "orders";
const PG_TABLE: &str = "concord_demo_orders";

/// The summary `--json` prints.
#[derive(Serialize, Debug)]
struct Summary {
    committed: u64,
    rolled_back: u64,
    atomicity_verified: bool,
    tx_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Transactions of earlier (possibly killed) runs found in the data directory and checked.
    earlier_transactions_checked: u64,
    recovered_redriven: usize,
    recovered_rolled_back: usize,
}

const FILES: [(&str, &str); 3] = [("uploads", "a"), ("uploads", "b"), ("thumbnails", "t")];

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
    let summary = runtime.block_on(demo(&args, &data))?;
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
            },
        );
    }
    let concord = Concord::open(config).await?;
    let recovery = concord.recovery().clone();
    if !concord.wait_idle(Duration::from_secs(60)).await {
        bail!(
            "recovery did not finish within 60 s: {:?}",
            concord.coordinator().list()
        );
    }
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_micros()
        .to_string();
    // The run is recorded before its first transaction, so a check after a kill covers it.
    std::fs::create_dir_all(data.join("acks").join(&run_id))?;
    std::fs::create_dir_all(data.join("runs"))?;
    let pg_flag = if args.postgres.is_some() {
        " postgres"
    } else {
        ""
    };
    let run = format!("{} {}{pg_flag}\n", args.transactions, args.fail_every);
    std::fs::write(data.join("runs").join(&run_id), run)?;

    let started = Instant::now();
    let stats = run_clients(args, &concord, data, &run_id).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if !concord.wait_idle(Duration::from_secs(60)).await {
        bail!("phase 2 did not finish within 60 s");
    }
    let clean = concord.coordinator().list().is_empty();
    concord.close(Duration::from_secs(10)).await;
    let orders = match &args.postgres {
        Some(url) => Some(read_orders(url).await?),
        None => None,
    };
    let mut check = check(data, orders.as_ref())?;
    check
        .problems
        .extend(check_decisions(data, orders.as_ref())?);
    for problem in check.problems.iter().take(20) {
        eprintln!("atomicity: {problem}");
    }
    let mut latencies = stats.latencies_us;
    latencies.sort_unstable();
    Ok(Summary {
        committed: stats.committed,
        rolled_back: stats.rolled_back,
        atomicity_verified: check.problems.is_empty() && clean,
        tx_per_s: args.transactions as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        earlier_transactions_checked: check.transactions.saturating_sub(args.transactions),
        recovered_redriven: recovery.redriven.len(),
        recovered_rolled_back: recovery.rolled_back.len(),
    })
}

struct ClientStats {
    committed: u64,
    rolled_back: u64,
    latencies_us: Vec<u64>,
}

async fn run_clients(
    args: &DemoArgs,
    concord: &Concord,
    data: &Path,
    run_id: &str,
) -> anyhow::Result<ClientStats> {
    let next = Arc::new(AtomicU64::new(0));
    let progress = progress_bar(args);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (concord, next, progress) = (concord.clone(), Arc::clone(&next), progress.clone());
        let acks = data.join("acks").join(run_id);
        let (run_id, total, fail_every) = (run_id.to_string(), args.transactions, args.fail_every);
        let postgres = args.postgres.is_some();
        clients.spawn(async move {
            let mut stats = ClientStats {
                committed: 0,
                rolled_back: 0,
                latencies_us: Vec::new(),
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(stats);
                }
                let fail = fail_every > 0 && i % fail_every == fail_every - 1;
                let t0 = Instant::now();
                let outcome = one_transaction(&concord, &run_id, i, fail, postgres).await?;
                match outcome {
                    Outcome::Committed { .. } => {
                        std::fs::write(acks.join(i.to_string()), b"")?;
                        stats.committed += 1;
                    }
                    _ => stats.rolled_back += 1,
                }
                stats.latencies_us.push(t0.elapsed().as_micros() as u64);
                progress.inc(1);
            }
        });
    }
    let mut total = ClientStats {
        committed: 0,
        rolled_back: 0,
        latencies_us: Vec::new(),
    };
    while let Some(joined) = clients.join_next().await {
        let stats = joined??;
        total.committed += stats.committed;
        total.rolled_back += stats.rolled_back;
        total.latencies_us.extend(stats.latencies_us);
    }
    progress.finish_and_clear();
    Ok(total)
}

async fn one_transaction(
    concord: &Concord,
    run_id: &str,
    i: u64,
    fail: bool,
    postgres: bool,
) -> anyhow::Result<Outcome> {
    let mut tx = concord.begin();
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
    if fail {
        let uploads = tx.files("uploads").await?;
        if uploads
            .put("../outside-the-root", &b"refused"[..])
            .await
            .is_ok()
        {
            bail!("the files resource accepted a path outside its root");
        }
        return Ok(tx.rollback().await?);
    }
    Ok(tx.commit().await?)
}

fn content(run_id: &str, i: u64, name: &str) -> Vec<u8> {
    format!("concord demo run {run_id} transaction {i} file {name}\n").into_bytes()
}

struct Check {
    transactions: u64,
    problems: Vec<String>,
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

/// What the check knows of the PostgreSQL branch: the order rows present, and the demo's
/// branches still prepared there.
struct Orders {
    rows: std::collections::HashSet<(String, u64)>,
    prepared: usize,
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

/// The check: reads the resources' directories (and the orders table) directly. Each run is
/// recorded in `runs/<run>` as `<transactions> <fail-every> [postgres]`.
fn check(data: &Path, orders: Option<&Orders>) -> anyhow::Result<Check> {
    let mut problems = Vec::new();
    let mut transactions = 0;
    let runs = data.join("runs");
    let mut run_ids: BTreeMap<String, (u64, u64, bool)> = BTreeMap::new();
    for entry in std::fs::read_dir(&runs).with_context(|| format!("list {}", runs.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let text = std::fs::read_to_string(entry.path())?;
        let mut fields = text.split_whitespace();
        let mut number = || fields.next().map(str::parse::<u64>);
        match (number(), number()) {
            (Some(Ok(n)), Some(Ok(fail_every))) => {
                let postgres = text.split_whitespace().nth(2) == Some("postgres");
                run_ids.insert(name, (n, fail_every, postgres));
            }
            _ => problems.push(format!("{}: not a run record", entry.path().display())),
        }
    }
    for (run_id, &(total, fail_every, postgres)) in &run_ids {
        if postgres && orders.is_none() {
            problems.push(format!(
                "run {run_id} had a PostgreSQL branch: check it with --postgres URL"
            ));
        }
        let acks = data.join("acks").join(run_id);
        for i in 0..total {
            transactions += 1;
            let mut present: Vec<bool> = FILES
                .iter()
                .map(|(resource, name)| {
                    let path = data.join(resource).join(format!("tx/{run_id}/{i}/{name}"));
                    std::fs::read(&path)
                        .map(|c| c == content(run_id, i, name))
                        .unwrap_or(false)
                })
                .collect();
            if let (true, Some(orders)) = (postgres, orders) {
                present.push(orders.rows.contains(&(run_id.clone(), i)));
            }
            let all = present.iter().all(|p| *p);
            let none = present.iter().all(|p| !*p);
            let acked = acks.join(i.to_string()).exists();
            let failed = fail_every > 0 && i % fail_every == fail_every - 1;
            if !all && !none {
                problems.push(format!(
                    "run {run_id} transaction {i}: partly present {present:?}"
                ));
            }
            if acked && !all {
                problems.push(format!(
                    "run {run_id} transaction {i}: acknowledged but not present"
                ));
            }
            if failed && !none {
                problems.push(format!(
                    "run {run_id} transaction {i}: failed on purpose but present"
                ));
            }
        }
    }
    for (resource, _) in FILES {
        let staging = data.join(resource).join(".concord").join("staging");
        if let Ok(entries) = std::fs::read_dir(&staging)
            && entries.count() > 0
        {
            problems.push(format!("{}: staging is not empty", staging.display()));
        }
        let root = data.join(resource);
        let prepared = adapters::files::prepared_on_disk(&root)?;
        if !prepared.is_empty() {
            problems.push(format!(
                "{}: {} branches left prepared",
                root.display(),
                prepared.len()
            ));
        }
    }
    if let Some(orders) = orders
        && orders.prepared > 0
    {
        problems.push(format!(
            "{} branches of the {PG_RESOURCE} resource left prepared in PostgreSQL",
            orders.prepared
        ));
    }
    Ok(Check {
        transactions,
        problems,
    })
}

/// Every file a durable `Commit` record names — decided transactions, acknowledged to their
/// client or not — must be present: recovery may never roll back a decision.
fn check_decisions(data: &Path, orders: Option<&Orders>) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let journal_dir = data.join("journal");
    let record_bytes_max = journal::JournalConfig::default().record_bytes_max;
    journal::scan::scan_dir(&journal_dir, record_bytes_max, |rec| {
        let Ok(CoordRecord::Commit { xid, branches, .. }) =
            CoordRecord::decode(rec.kind, &rec.payload)
        else {
            return;
        };
        for (resource, redo) in branches {
            if resource == PG_RESOURCE {
                check_order_redo(&xid, &redo, orders, &mut problems);
                continue;
            }
            if !FILES.iter().any(|(r, _)| *r == resource) {
                continue;
            }
            let Ok(entries) = adapters::files::decode_redo(&redo) else {
                problems.push(format!("{xid}: the redo of {resource} does not decode"));
                continue;
            };
            for entry in entries {
                if let adapters::files::RedoEntry::Put { path, .. }
                | adapters::files::RedoEntry::PutInline { path, .. } = entry
                    && !data.join(&resource).join(&path).is_file()
                {
                    problems.push(format!("{xid}: decided, but {resource}/{path} is missing"));
                }
            }
        }
    })?;
    Ok(problems)
}

/// Every order row a decided transaction's PostgreSQL redo names must be present.
fn check_order_redo(
    xid: &adapters::Xid,
    redo: &[u8],
    orders: Option<&Orders>,
    problems: &mut Vec<String>,
) {
    let Some(orders) = orders else {
        problems.push(format!(
            "{xid}: decided with a PostgreSQL branch: check it with --postgres URL"
        ));
        return;
    };
    let rows = match adapters::postgres::decode_redo(redo) {
        Ok(rows) => rows,
        Err(e) => {
            problems.push(format!(
                "{xid}: the redo of {PG_RESOURCE} does not decode: {e}"
            ));
            return;
        }
    };
    for (_, op, pk, row) in rows {
        // The key, or the row image that holds it.
        let key = if pk.is_object() { pk } else { row };
        let run = key.get("run").and_then(|v| v.as_str()).unwrap_or_default();
        let i = key.get("i").and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
        if op == "U" && !orders.rows.contains(&(run.to_string(), i)) {
            problems.push(format!("{xid}: decided, but order ({run}, {i}) is missing"));
        }
    }
}

fn percentile(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let index = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    sorted_us[index.min(sorted_us.len() - 1)] as f64 / 1000.0
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
    println!("committed:           {}", s.committed);
    println!("rolled_back:         {}", s.rolled_back);
    println!("atomicity_verified:  {}", s.atomicity_verified);
    println!("tx_per_s:            {:.0}", s.tx_per_s);
    println!("p50_ms:              {:.2}", s.p50_ms);
    println!("p99_ms:              {:.2}", s.p99_ms);
    if s.earlier_transactions_checked > 0 || s.recovered_redriven + s.recovered_rolled_back > 0 {
        println!("earlier_checked:     {}", s.earlier_transactions_checked);
        println!(
            "recovered:           {} re-driven, {} rolled back",
            s.recovered_redriven, s.recovered_rolled_back
        );
    }
    if kept {
        println!("data:                {}", data.display());
    }
}
