//! `concord bench replication`: what a standby costs the primary, how fast a standby replays a
//! backlog, and how far behind it stays under load — all on loopback, on the embedded defaults,
//! with the files+mail+kv workload of `concord bench commit --remote` ([`remote_load`]: one
//! [`FILE_BYTES`](crate::bench_load::FILE_BYTES) file, one mail, one key per transaction, `--clients` connections of this
//! process to a daemon child).
//!
//! This machine hosts both sites, so the throughput windows pause the standby's replay (in
//! production its disk and CPU are another machine's), and its replay is measured alone:
//!
//! Every throughput window first runs a quarter of its transactions unmeasured (a warm-up:
//! connections, caches, the stores' first files).
//!
//! 1. `none_tps`: a primary daemon with no standby ever connected (its own directory), the
//!    workload's maximum rate over `--transactions` transactions, phase 2 included — measured
//!    before windows 2 and 3 and again after them, and the two together give the rate, so that
//!    the machine's drift over the run favours neither side.
//! 2. `async_tps`: a second primary (async, the default) with a standby that receives and
//!    journals but does not replay (`concord standby --no-replay`), connected and caught up
//!    before the window starts.
//! 3. `sync_tps`: the same primary restarted with `[replication] mode = "sync"` (a
//!    `concord.toml` written next to its data), the same standby restarted, again without
//!    replay.
//! 4. `replay_tps`: both stopped, the standby restarted with replay on and no primary; the
//!    backlog it journaled (every transaction of windows 2 and 3, warm-ups included) over the
//!    time from its
//!    `listening on` line until its status says it replayed up to its own durable LSN.
//! 5. `lag_p50_ms`/`lag_p99_ms`: a fresh primary and a replaying async standby together, the
//!    clients paced to half of `none_tps` for `--lag-seconds`, the standby's
//!    `replication.lag.seconds` sampled every
//!    [`LAG_SAMPLE_MS`](crate::demo::standby::LAG_SAMPLE_MS).
//!
//! The ratios: `async_vs_none` and `sync_vs_none` (each rate over `none_tps`),
//! `replay_vs_primary` (`replay_tps` over `none_tps`). Every daemon's exit status after SIGTERM
//! is checked.
//!
//! # Implementation caveats
//!
//! * Each primary writes a fresh directory, so the windows do not see each other's files; the
//!   file system's state still drifts within a run.
//! * The replay window starts at the `listening on` line: the standby may have begun replaying
//!   a few milliseconds before (it starts replay, then serves), which flatters `replay_tps` by
//!   at most that much.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use participant::config::{EMBEDDED_KV, EMBEDDED_MAIL};
use proto::client::{Client, Credentials};
use serde::Serialize;

use crate::bench_load::Measured;
use crate::bench_remote::{remote_load, remote_one, wait_idle};
use crate::daemon_child::DaemonChild;
use crate::demo::standby::{LagSample, LagSampler, percentile, status};

/// How long a standby may take to connect and catch up before a window (milliseconds).
const CATCH_UP_MS_MAX: u64 = 60_000;
/// How long the replay of the backlog may take (milliseconds).
const REPLAY_MS_MAX: u64 = 600_000;
/// How often a standby is polled while waiting for it (milliseconds).
const POLL_MS: u64 = 5;

/// Options of `concord bench replication`.
#[derive(clap::Args, Debug)]
pub struct ReplicationBenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Concurrent clients, each with a connection of its own.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Transactions in each throughput window (no standby, async, sync).
    #[arg(long, default_value_t = 4000)]
    pub transactions: u64,
    /// Seconds of the lag window (at half the rate without a standby).
    #[arg(long, default_value_t = 10.0)]
    pub lag_seconds: f64,
    /// Directory for the sites (default: a new temp directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// What `--json` prints.
#[derive(Serialize, Debug)]
struct ReplicationBench {
    clients: usize,
    transactions: u64,
    none_tps: f64,
    async_tps: f64,
    sync_tps: f64,
    /// Transactions in the backlog the standby replayed, and how long it took.
    replay_transactions: u64,
    replay_seconds: f64,
    replay_tps: f64,
    async_vs_none: f64,
    sync_vs_none: f64,
    replay_vs_primary: f64,
    /// The rate the lag window aimed at (half of `none_tps`) and the rate it ran at.
    lag_target_tps: f64,
    lag_achieved_tps: f64,
    lag_samples: usize,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
    none_p99_ms: f64,
    async_p99_ms: f64,
    sync_p99_ms: f64,
}

/// Runs `concord bench replication`.
pub(crate) fn run(args: ReplicationBenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.clients > 1024 {
        bail!("--clients must be between 1 and 1024");
    }
    if args.transactions == 0 || !(args.lag_seconds > 0.0 && args.lag_seconds <= 3600.0) {
        bail!("--transactions must be above 0 and --lag-seconds between 0 and 3600");
    }
    let (dir, _temp) = match &args.dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("concord-bench-replication-")
                .tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let message: Arc<[u8]> = Arc::from(crate::bench_mixed::message()?);
    let bench = Bench {
        dir: &dir,
        args: &args,
        message,
    };
    let result = runtime.block_on(bench.all())?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_table(&result);
    }
    Ok(())
}

struct Bench<'a> {
    dir: &'a Path,
    args: &'a ReplicationBenchArgs,
    message: Arc<[u8]>,
}

impl Bench<'_> {
    async fn all(&self) -> anyhow::Result<ReplicationBench> {
        // The primary without a standby is measured before and after the windows with one, so
        // that the machine's drift over the run does not favour either side.
        let mut none = self.none("none-1").await?;
        let (async_window, sync_window) = self.with_standby().await?;
        none.add(self.none("none-2").await?);
        // The async and sync windows, each with its warm-up.
        let backlog = 2 * (self.args.transactions + (self.args.transactions / 4).max(1));
        let replay_seconds = self.replay().await?;
        let none_tps = none.tx_per_s();
        let target = none_tps / 2.0;
        let (lag_achieved_tps, lags) = self.lag(target).await?;
        let replay_tps = backlog as f64 / replay_seconds.max(f64::MIN_POSITIVE);
        let ratio = |x: f64| x / none_tps.max(f64::MIN_POSITIVE);
        Ok(ReplicationBench {
            clients: self.args.clients,
            transactions: self.args.transactions,
            none_tps,
            async_tps: async_window.tx_per_s(),
            sync_tps: sync_window.tx_per_s(),
            replay_transactions: backlog,
            replay_seconds,
            replay_tps,
            async_vs_none: ratio(async_window.tx_per_s()),
            sync_vs_none: ratio(sync_window.tx_per_s()),
            replay_vs_primary: ratio(replay_tps),
            lag_target_tps: target,
            lag_achieved_tps,
            lag_samples: lags.len(),
            lag_p50_ms: percentile(&lags, 0.50),
            lag_p99_ms: percentile(&lags, 0.99),
            lag_max_ms: percentile(&lags, 1.0),
            none_p99_ms: none.percentile_ms(0.99)?,
            async_p99_ms: async_window.percentile_ms(0.99)?,
            sync_p99_ms: sync_window.percentile_ms(0.99)?,
        })
    }

    /// Window 1 (and again after windows 2 and 3): a primary with no standby.
    async fn none(&self, prefix: &str) -> anyhow::Result<Measured> {
        let daemon = start_primary(&self.dir.join("none"), false)?;
        let measured = self.window(&daemon.url(), prefix).await?;
        stop(daemon)?;
        Ok(measured)
    }

    /// Windows 2 and 3: a primary, async then sync, with a standby that does not replay.
    async fn with_standby(&self) -> anyhow::Result<(Measured, Measured)> {
        let primary_dir = self.dir.join("primary");
        let standby_dir = self.dir.join("standby");
        let mut measured = Vec::new();
        for (sync, prefix) in [(false, "async"), (true, "sync")] {
            let daemon = start_primary(&primary_dir, sync)?;
            let standby = start_standby(&standby_dir, &daemon.url(), false)?;
            wait_caught_up(&daemon.url(), &standby.url()).await?;
            measured.push(self.window(&daemon.url(), prefix).await?);
            stop(standby)?;
            stop(daemon)?;
        }
        let sync_window = measured.pop().context("no sync window")?;
        let async_window = measured.pop().context("no async window")?;
        Ok((async_window, sync_window))
    }

    /// Window 4: the standby of windows 2 and 3 replays its backlog alone; returns the seconds
    /// it took.
    async fn replay(&self) -> anyhow::Result<f64> {
        let standby_dir = self.dir.join("standby");
        // No primary: the standby retries its connection in the background meanwhile.
        let standby = start_standby(&standby_dir, "http://127.0.0.1:9", true)?;
        let started = Instant::now();
        let mut client = proto::client::connect_replication(&standby.url(), &Credentials::none())
            .await
            .context("connect to the standby")?;
        let deadline = started + Duration::from_millis(REPLAY_MS_MAX);
        loop {
            let s = status(&mut client).await?;
            let replication = s.replication.unwrap_or_default();
            if replication.replayed_lsn >= s.durable_lsn
                && replication.lag.unwrap_or_default().transactions == 0
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the standby replayed up to lsn {} of {} within {REPLAY_MS_MAX} ms",
                    replication.replayed_lsn,
                    s.durable_lsn
                );
            }
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        drop(client);
        stop(standby)?;
        Ok(seconds)
    }

    /// Window 5: a primary and a replaying standby at `rate` transactions a second; returns the
    /// rate reached and the lag samples in milliseconds.
    async fn lag(&self, rate: f64) -> anyhow::Result<(f64, Vec<f64>)> {
        let daemon = start_primary(&self.dir.join("lag-primary"), false)?;
        let standby = start_standby(&self.dir.join("lag-standby"), &daemon.url(), true)?;
        wait_caught_up(&daemon.url(), &standby.url()).await?;
        let connections = self.connect(&daemon.url()).await?;
        let transactions = (rate * self.args.lag_seconds).ceil().max(1.0) as u64;
        let sampler = LagSampler::start(&standby.url(), false);
        let started = Instant::now();
        let paced = paced_load(&connections, &self.message, rate, transactions).await;
        let elapsed = started.elapsed().as_secs_f64();
        let samples = sampler.stop()?;
        paced?;
        wait_idle(&connections[0]).await?;
        drop(connections);
        stop(standby)?;
        stop(daemon)?;
        let lags = samples.iter().map(LagSample::ms).collect();
        Ok((transactions as f64 / elapsed, lags))
    }

    /// One throughput window against the daemon at `url`, phase 2 included, after a warm-up
    /// of a quarter as many transactions that is not measured (connections, caches, the
    /// stores' first files).
    async fn window(&self, url: &str, prefix: &str) -> anyhow::Result<Measured> {
        let connections = self.connect(url).await?;
        let warm_up = (self.args.transactions / 4).max(1);
        remote_load(
            &connections,
            &self.message,
            format!("{prefix}-warm"),
            warm_up,
        )
        .await?;
        wait_idle(&connections[0]).await?;
        let started = Instant::now();
        let mut measured = remote_load(
            &connections,
            &self.message,
            prefix.to_string(),
            self.args.transactions,
        )
        .await?;
        wait_idle(&connections[0]).await?;
        measured.elapsed = started.elapsed();
        Ok(measured)
    }

    async fn connect(&self, url: &str) -> anyhow::Result<Vec<Client>> {
        let mut connections = Vec::new();
        for _ in 0..self.args.clients {
            connections.push(proto::client::connect(url, &Credentials::none()).await?);
        }
        Ok(connections)
    }
}

/// `transactions` transactions, the `k`-th started no earlier than `k / rate` seconds after the
/// start, by one task per connection.
async fn paced_load(
    connections: &[Client],
    message: &Arc<[u8]>,
    rate: f64,
    transactions: u64,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (client, connection) in connections.iter().enumerate() {
        let (connection, message, next) =
            (connection.clone(), Arc::clone(message), Arc::clone(&next));
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= transactions {
                    return Ok::<_, anyhow::Error>(());
                }
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due).await;
                remote_one(&connection, &message, format!("lag-c{client}-{k}")).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

/// A primary daemon on `dir`: the embedded defaults, or with `sync` a `concord.toml` of the
/// same resources with `[replication] mode = "sync"`.
fn start_primary(dir: &Path, sync: bool) -> anyhow::Result<DaemonChild> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let args = match sync {
        false => [OsString::from("--data"), dir.as_os_str().to_owned()],
        true => [
            OsString::from("--config"),
            write_sync_config(dir)?.into_os_string(),
        ],
    };
    DaemonChild::start(&args)
}

/// `dir/concord.toml`: the embedded defaults' resources, served on loopback without tokens, in
/// sync mode.
fn write_sync_config(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("concord.toml");
    let text = format!(
        "# Written by `concord bench replication`.\n\
         node = 1\n\
         data_dir = \".\"\n\n\
         [daemon]\nplaintext = true\nunauthenticated = true\n\n\
         [replication]\nmode = \"sync\"\n\n\
         [resources.uploads]\nkind = \"files\"\nroot = \"uploads\"\ncreate = true\n\n\
         [resources.thumbnails]\nkind = \"files\"\nroot = \"thumbnails\"\ncreate = true\n\n\
         [resources.{EMBEDDED_MAIL}]\nkind = \"mail\"\nmaildir = \"{EMBEDDED_MAIL}\"\ncreate = true\n\n\
         [resources.{EMBEDDED_KV}]\nkind = \"kv\"\ndir = \"{EMBEDDED_KV}\"\ncreate = true\n"
    );
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// A standby on `dir` (the embedded defaults) following `primary`, replaying or not.
fn start_standby(dir: &Path, primary: &str, replay: bool) -> anyhow::Result<DaemonChild> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut args = vec![
        OsString::from("--data"),
        dir.as_os_str().to_owned(),
        OsString::from("--primary"),
        OsString::from(primary),
    ];
    if !replay {
        args.push(OsString::from("--no-replay"));
    }
    DaemonChild::start_standby(&args)
}

/// SIGTERM, and exit 0 required.
fn stop(child: DaemonChild) -> anyhow::Result<()> {
    let status = child.terminate()?;
    if !status.success() {
        bail!("a daemon of the benchmark exited with {status} after SIGTERM, not 0");
    }
    Ok(())
}

/// Waits until the standby at `standby` is connected and has journaled everything the
/// primary at `primary` has.
async fn wait_caught_up(primary: &str, standby: &str) -> anyhow::Result<()> {
    let mut p = proto::client::connect_replication(primary, &Credentials::none()).await?;
    let mut s = proto::client::connect_replication(standby, &Credentials::none()).await?;
    let deadline = Instant::now() + Duration::from_millis(CATCH_UP_MS_MAX);
    loop {
        let target = status(&mut p).await?.durable_lsn;
        let r = status(&mut s).await?.replication.unwrap_or_default();
        if r.connected && r.durable_lsn >= target {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the standby did not connect and catch up within {CATCH_UP_MS_MAX} ms (connected {}, lsn {} of {target})",
                r.connected,
                r.durable_lsn
            );
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

fn print_table(r: &ReplicationBench) {
    println!(
        "{:<34} {:>10} {:>8} {:>8}",
        "configuration", "tx/s", "ratio", "target"
    );
    let row = |name: &str, tps: f64, ratio: Option<f64>, target: &str| {
        let ratio = ratio.map_or(String::new(), |x| format!("{x:.2}x"));
        println!("{name:<34} {tps:>10.0} {ratio:>8} {target:>8}");
    };
    row("primary, no standby", r.none_tps, None, "");
    row(
        "primary, async standby (no replay)",
        r.async_tps,
        Some(r.async_vs_none),
        ">= 0.9x",
    );
    row(
        "primary, sync standby (no replay)",
        r.sync_tps,
        Some(r.sync_vs_none),
        "",
    );
    row(
        "standby replaying its backlog",
        r.replay_tps,
        Some(r.replay_vs_primary),
        ">= 2x",
    );
    println!(
        "lag at {:.0} tx/s (half the primary's maximum; ran at {:.0}): p50 {:.1} ms, p99 {:.1} ms (target <= 100), max {:.1} ms, {} samples",
        r.lag_target_tps,
        r.lag_achieved_tps,
        r.lag_p50_ms,
        r.lag_p99_ms,
        r.lag_max_ms,
        r.lag_samples
    );
    println!(
        "{} clients, {} transactions per window; replay: {} transactions in {:.2} s",
        r.clients, r.transactions, r.replay_transactions, r.replay_seconds
    );
}
