//! `concord bench postgres`: transactions with a PostgreSQL branch, against what an application
//! does without concord, all in one run on one server.
//!
//! Each client inserts one row per transaction. For every client count, one after the other:
//!
//! * `plain` — `BEGIN; INSERT; COMMIT` on a table without capture, one connection per client,
//!   the insert prepared once per connection (as concord's branch handle caches it);
//! * `manual_2pc` — the same with a hand-written `PREPARE TRANSACTION` and `COMMIT PREPARED`;
//! * `concord_one_phase_no_capture` — concord with one PostgreSQL branch, on the table without
//!   capture;
//! * `concord_one_phase` — the same on a table with row capture on, as in production;
//! * `concord_pg_files` — a PostgreSQL branch (capture on) and a files branch (1 KiB).
//!
//! The two `concord_one_phase` variants are transactions with a single branch, which concord
//! commits in one phase: without capture nothing is journaled (there is nothing to replicate);
//! with capture the redo is made durable in a `OnePhase` record before the branch's `COMMIT`
//! (see `docs/postgres.md`).
//!
//! Without `--url`, a throwaway PostgreSQL 15 cluster is started for the run (`adapters::pgtest`,
//! default server settings). With `--url`, the database there gets the `concord` schema and
//! three tables `concord_bench_*` (created if missing, emptied at the start).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use adapters::files::{FilesConfig, FilesResource};
use adapters::pgtest::PgCluster;
use adapters::postgres::{PostgresConfig, PostgresResource};
use anyhow::{Context, bail};
use coordinator::{Coordinator, CoordinatorConfig, Outcome};
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::bench_load::{Measured, load};

/// Options of `concord bench postgres`.
#[derive(clap::Args, Debug)]
pub struct PgBenchArgs {
    /// The database to use (libpq style or URL); without it a throwaway cluster is started.
    #[arg(long)]
    pub url: Option<String>,
    /// Concurrent clients to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 64])]
    pub clients: Vec<usize>,
    /// Seconds each variant runs at each client count.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// One JSON object per client count.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug, Clone, Copy)]
struct Variant {
    tx_per_s: f64,
    p99_ms: f64,
}

#[derive(Serialize, Debug)]
struct Row {
    clients: usize,
    plain: Variant,
    manual_2pc: Variant,
    concord_one_phase_no_capture: Variant,
    concord_one_phase: Variant,
    concord_pg_files: Variant,
    one_phase_no_capture_vs_plain: f64,
    one_phase_vs_plain: f64,
    pg_files_vs_manual_2pc: f64,
}

const PLAIN_TABLE: &str = "concord_bench_plain";
const CONCORD_PLAIN_TABLE: &str = "concord_bench_nocapture";
const CAPTURE_TABLE: &str = "concord_bench_capture";
/// The resource name of the benchmark's PostgreSQL branch.
const RESOURCE: &str = "bench_pg";

/// Runs `concord bench postgres`.
pub fn run(args: PgBenchArgs) -> anyhow::Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--seconds must be above 0 and at most 600");
    }
    if args.clients.iter().any(|&c| c == 0 || c > 250) {
        bail!("--clients must be between 1 and 250 (each client holds a connection)");
    }
    let window = Duration::from_secs_f64(args.seconds);
    let cluster;
    let url = match &args.url {
        Some(url) => url.clone(),
        None => {
            cluster = PgCluster::start().context("start a throwaway PostgreSQL cluster")?;
            cluster.database("concord_bench")?
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let temp = tempfile::Builder::new()
        .prefix("concord-bench-pg-")
        .tempdir()?;
    let mut rows = Vec::new();
    runtime.block_on(async {
        setup(&url).await?;
        for &n in &args.clients {
            let plain_run = plain(&url, n, window, false).await?;
            let manual = plain(&url, n, window, true).await?;
            let dir = temp.path().join(format!("c{n}"));
            let no_capture =
                concord(&url, &dir.join("a"), n, window, CONCORD_PLAIN_TABLE, false).await?;
            let capture = concord(&url, &dir.join("b"), n, window, CAPTURE_TABLE, false).await?;
            let with_files = concord(&url, &dir.join("c"), n, window, CAPTURE_TABLE, true).await?;
            let v = |m: &Measured| -> anyhow::Result<Variant> {
                Ok(Variant {
                    tx_per_s: m.tx_per_s(),
                    p99_ms: m.percentile_ms(0.99)?,
                })
            };
            let ratio =
                |a: &Measured, b: &Measured| a.tx_per_s() / b.tx_per_s().max(f64::MIN_POSITIVE);
            let row = Row {
                clients: n,
                plain: v(&plain_run)?,
                manual_2pc: v(&manual)?,
                concord_one_phase_no_capture: v(&no_capture)?,
                concord_one_phase: v(&capture)?,
                concord_pg_files: v(&with_files)?,
                one_phase_no_capture_vs_plain: ratio(&no_capture, &plain_run),
                one_phase_vs_plain: ratio(&capture, &plain_run),
                pg_files_vs_manual_2pc: ratio(&with_files, &manual),
            };
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            }
            rows.push(row);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    if !args.json {
        print_table(&rows);
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:>7} {:>14} {:>14} {:>14} {:>14} {:>14}  {:>8} {:>8} {:>8}",
        "clients",
        "plain",
        "manual 2pc",
        "1-branch nocap",
        "1-branch",
        "pg+files",
        "nocap/pl",
        "1br/pl",
        "pgf/2pc"
    );
    let cell = |v: &Variant| format!("{:>6.0} {:>6.1}ms", v.tx_per_s, v.p99_ms);
    for r in rows {
        println!(
            "{:>7} {:>14} {:>14} {:>14} {:>14} {:>14}  {:>7.2}x {:>7.2}x {:>7.2}x",
            r.clients,
            cell(&r.plain),
            cell(&r.manual_2pc),
            cell(&r.concord_one_phase_no_capture),
            cell(&r.concord_one_phase),
            cell(&r.concord_pg_files),
            r.one_phase_no_capture_vs_plain,
            r.one_phase_vs_plain,
            r.pg_files_vs_manual_2pc
        );
    }
    println!("(each cell: transactions/s and p99 latency)");
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connect to the benchmark database")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The schema, the three tables (capture on the last one), all empty.
async fn setup(url: &str) -> anyhow::Result<()> {
    adapters::postgres::install(RESOURCE, url).await?;
    let client = connect(url).await?;
    for table in [PLAIN_TABLE, CONCORD_PLAIN_TABLE, CAPTURE_TABLE] {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, client integer NOT NULL, item text NOT NULL);
                 TRUNCATE {table}"
            ))
            .await?;
    }
    adapters::postgres::replicate(RESOURCE, url, &[CAPTURE_TABLE.to_string()]).await?;
    Ok(())
}

/// Variant `plain` (or `manual_2pc` when `two_phase`): one connection per client.
async fn plain(
    url: &str,
    clients: usize,
    window: Duration,
    two_phase: bool,
) -> anyhow::Result<Measured> {
    // Each connection prepares the insert once, as concord's branch handle does (it caches
    // prepared statements per pooled connection): the same statement handling on both sides.
    let mut connections = Vec::new();
    for _ in 0..clients {
        let conn = connect(url).await?;
        let insert = conn
            .prepare(&format!(
                "INSERT INTO {PLAIN_TABLE} VALUES ($1, $2, 'item')"
            ))
            .await?;
        connections.push(Arc::new(tokio::sync::Mutex::new((conn, insert))));
    }
    let connections = Arc::new(connections);
    let base =
        if two_phase { 1_000_000_000_000i64 } else { 0 } + i64::try_from(clients)? * 10_000_000_000;
    load(clients, window, move |client, n| {
        let connections = Arc::clone(&connections);
        async move {
            let mut guard = connections[client].lock().await;
            let (conn, insert) = &mut *guard;
            let id = base + i64::try_from(client)? * 10_000_000 + i64::try_from(n)?;
            let tx = conn.transaction().await?;
            tx.execute(&*insert, &[&id, &i32::try_from(client)?])
                .await?;
            if two_phase {
                let gid = format!("concord-bench:{id}");
                tx.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                    .await?;
                // The transaction object is done with: PREPARE ended it on the server.
                drop(tx);
                conn.batch_execute(&format!("COMMIT PREPARED '{gid}'"))
                    .await?;
            } else {
                tx.commit().await?;
            }
            Ok(())
        }
    })
    .await
}

/// A concord variant: a coordinator on a journal under `dir` with the PostgreSQL resource (and a
/// files resource when `files`).
async fn concord(
    url: &str,
    dir: &Path,
    clients: usize,
    window: Duration,
    table: &'static str,
    files: bool,
) -> anyhow::Result<Measured> {
    let journal = crate::bench::open_journal(&dir.join("journal"))?;
    let mut pg_config = PostgresConfig::new(url, 1);
    pg_config.pool_size = clients + 4;
    let pg = PostgresResource::open(RESOURCE, pg_config).await?;
    let mut resources: Vec<Arc<dyn adapters::Resource>> = vec![pg.clone()];
    if files {
        let files_config = FilesConfig {
            create_if_missing: true,
            ..FilesConfig::default()
        };
        resources.push(FilesResource::open(
            "bench_files",
            &dir.join("files"),
            files_config,
        )?);
    }
    let (coordinator, _) =
        Coordinator::open(CoordinatorConfig::default(), journal, resources).await?;
    let c = coordinator.clone();
    let id_base = match (table, files) {
        (CONCORD_PLAIN_TABLE, _) => 2_000_000_000_000i64,
        (_, false) => 3_000_000_000_000,
        (_, true) => 4_000_000_000_000,
    } + i64::try_from(clients)? * 10_000_000_000;
    let measured = load(clients, window, move |client, n| {
        let (coordinator, pg) = (c.clone(), pg.clone());
        async move {
            let id = id_base + i64::try_from(client)? * 10_000_000 + i64::try_from(n)?;
            let xid = coordinator.begin();
            coordinator.join(&xid, RESOURCE).await?;
            pg.branch(&xid)?
                .execute(
                    &format!("INSERT INTO {table} VALUES ($1, $2, 'item')"),
                    &[&id, &i32::try_from(client)?],
                )
                .await?;
            if files {
                let resource = coordinator.join(&xid, "bench_files").await?;
                let Some(files) = resource.as_any().downcast_ref::<FilesResource>() else {
                    bail!("bench_files is not a files resource");
                };
                files
                    .branch(&xid)
                    .put(&format!("c{client}-{n}"), &[7u8; 1024][..])
                    .await?;
            }
            match coordinator.commit(&xid).await? {
                Outcome::Committed { .. } => Ok(()),
                other => bail!("transaction did not commit: {other:?}"),
            }
        }
    })
    .await?;
    // Phase 2 of the last transactions, before the next variant starts.
    coordinator.wait_settled(Duration::from_secs(60)).await;
    coordinator.shutdown(Duration::from_secs(30)).await;
    Ok(measured)
}
