//! `concord bench recovery`: how long the coordinator takes to start, after a short history and
//! after a long one, and on a journal whose records are all retained.
//!
//! The checkpoint ([`coordinator::retention`]) removes every journal segment that only finished
//! transactions use, so a start should cost about the same after 10,000 transactions as after
//! 200,000: recovery reads from the oldest unfinished transaction on, not from the beginning.
//!
//! * **History**: for each of `--small` and `--large` transactions, a fresh coordinator commits
//!   that many transactions of four branches — named like the demo's (`uploads`, `thumbnails`,
//!   `mail`, `index`), in the benchmark-only null resource voting with as much redo as a demo
//!   branch journals (so the records are a demo transaction's size, while what grows is the
//!   journal, not the stores) — from `--clients` concurrent clients, and shuts down. Then both
//!   are opened `--runs` times, by turns (so that the machine's drift weighs on both alike),
//!   the way `Concord::open` does it (the journal opened and its ledger read in one pass,
//!   recovery, and a shutdown that waits for nothing): the median open time is the figure. The
//!   baseline is the short history; `open_ratio` is the larger median over the smaller (goal:
//!   at most 1.5).
//! * **Retained**: a journal holding `--retained-mib` of `Commit` + `End` records that nothing
//!   removed (as when a standby holds the retention floor): `retained_journal_open_ms` is the
//!   median time `Journal::open` takes on it (goal: at most 2,000 ms for 1 GiB on the
//!   development machine), `retained_open_ms` the coordinator's whole start on it.
//!
//! Open times are taken with the page cache warm (the files were just written): the figure is
//! concord's own cost of reading and checking, not the disk's.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::Resource;
use anyhow::bail;
use coordinator::record::CoordRecord;
use coordinator::{Coordinator, CoordinatorConfig, Outcome};
use journal::{Epoch, Journal, JournalConfig};
use serde::Serialize;

/// The demo's branch names.
const BRANCHES: [&str; 4] = ["uploads", "thumbnails", "mail", "index"];

/// Bytes of redo per branch (four branches: about what a demo transaction journals).
const REDO_BYTES: usize = 200;

/// Options of `concord bench recovery`.
#[derive(clap::Args, Debug)]
pub struct RecoveryBenchArgs {
    /// Transactions of the short history (the baseline).
    #[arg(long, default_value_t = 10_000)]
    pub small: usize,
    /// Transactions of the long history.
    #[arg(long, default_value_t = 200_000)]
    pub large: usize,
    /// Concurrent clients committing the histories.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Opens measured after each history (the median counts).
    #[arg(long, default_value_t = 21)]
    pub runs: usize,
    /// Size of the retained journal, in MiB (0: skip that part).
    #[arg(long, default_value_t = 1024)]
    pub retained_mib: u64,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    small_transactions: usize,
    small_open_ms: f64,
    small_journal_bytes: u64,
    large_transactions: usize,
    large_open_ms: f64,
    large_journal_bytes: u64,
    open_ratio: f64,
    retained_bytes: u64,
    retained_journal_open_ms: Option<f64>,
    retained_open_ms: Option<f64>,
}

/// Runs `concord bench recovery`.
pub fn run(args: RecoveryBenchArgs) -> anyhow::Result<()> {
    if args.small == 0 || args.large == 0 || args.small > 10_000_000 || args.large > 10_000_000 {
        bail!("--small and --large must be between 1 and 10,000,000");
    }
    if args.clients == 0 || args.clients > 4096 {
        bail!("--clients must be between 1 and 4096");
    }
    if args.runs == 0 || args.runs > 100 {
        bail!("--runs must be between 1 and 100");
    }
    if args.retained_mib > 64 << 10 {
        bail!("--retained-mib must be at most 65536");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let small = history(&args, args.small).await?;
        let large = history(&args, args.large).await?;
        let small_journal_bytes = dir_bytes(&small.1)?;
        let large_journal_bytes = dir_bytes(&large.1)?;
        let (small_open_ms, large_open_ms) = median_opens(&small.1, &large.1, args.runs).await?;
        let (retained_bytes, retained_journal_open_ms, retained_open_ms) = match args.retained_mib {
            0 => (0, None, None),
            mib => {
                let (bytes, journal_ms, ms) = retained(mib << 20, args.runs).await?;
                (bytes, Some(journal_ms), Some(ms))
            }
        };
        let open_ratio = small_open_ms.max(large_open_ms) / small_open_ms.min(large_open_ms);
        let report = Report {
            small_transactions: args.small,
            small_open_ms,
            small_journal_bytes,
            large_transactions: args.large,
            large_open_ms,
            large_journal_bytes,
            open_ratio,
            retained_bytes,
            retained_journal_open_ms,
            retained_open_ms,
        };
        print(&report, args.json)
    })
}

fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    println!(
        "after {:>9} transactions: open {:>8.1} ms (journal {} bytes)",
        report.small_transactions, report.small_open_ms, report.small_journal_bytes
    );
    println!(
        "after {:>9} transactions: open {:>8.1} ms (journal {} bytes)",
        report.large_transactions, report.large_open_ms, report.large_journal_bytes
    );
    println!("open_ratio: {:.2} (goal: at most 1.5)", report.open_ratio);
    if let (Some(journal_ms), Some(ms)) = (report.retained_journal_open_ms, report.retained_open_ms)
    {
        println!(
            "retained journal of {} bytes: Journal::open {journal_ms:.1} ms (goal for 1 GiB: at most 2000 ms), coordinator start {ms:.1} ms",
            report.retained_bytes
        );
    }
    Ok(())
}

fn null_resources() -> Vec<Arc<dyn Resource>> {
    BRANCHES
        .iter()
        .map(|name| {
            Arc::new(adapters::null::NullResource::with_redo_bytes(
                name, REDO_BYTES,
            )) as Arc<dyn Resource>
        })
        .collect()
}

fn journal_config() -> JournalConfig {
    coordinator::runtime::journal_config()
}

/// Commits `transactions` in a fresh directory and shuts down: the directory (removed on drop)
/// and the journal's path in it.
async fn history(
    args: &RecoveryBenchArgs,
    transactions: usize,
) -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf)> {
    let temp = tempfile::Builder::new()
        .prefix("concord-bench-recovery-")
        .tempdir()?;
    let dir = temp.path().join("journal");
    let journal = Journal::open(&dir, journal_config())?;
    let (coordinator, _) =
        Coordinator::open(CoordinatorConfig::default(), journal, null_resources()).await?;
    commit_many(&coordinator, transactions, args.clients).await?;
    if !coordinator.shutdown(Duration::from_secs(60)).await {
        bail!("the coordinator did not shut down within 60 s");
    }
    Ok((temp, dir))
}

/// Opens the coordinator on `small` and on `large` by turns, `runs` times each (so that the
/// machine's drift weighs on both alike): the median open of each, in ms.
async fn median_opens(small: &Path, large: &Path, runs: usize) -> anyhow::Result<(f64, f64)> {
    let mut times = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        times.0.push(open_once_ms(small).await?);
        times.1.push(open_once_ms(large).await?);
    }
    Ok((median(times.0), median(times.1)))
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// `transactions` commits of the four branches from `clients` tasks.
async fn commit_many(
    coordinator: &Coordinator,
    transactions: usize,
    clients: usize,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let c = coordinator.clone();
        let share = transactions / clients + usize::from(client < transactions % clients);
        tasks.spawn(async move {
            for _ in 0..share {
                let xid = c.begin();
                for name in BRANCHES {
                    c.join(&xid, name).await?;
                }
                match c.commit(&xid).await? {
                    Outcome::Committed { .. } => {}
                    other => bail!("transaction did not commit: {other:?}"),
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Opens the coordinator on `dir` the way `Concord::open` does and shuts it down: the time to
/// open, in ms.
async fn open_once_ms(dir: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (journal, ledger) = open_journal_blocking(dir).await?;
    let (coordinator, report) = Coordinator::open_recovered(
        CoordinatorConfig::default(),
        journal,
        ledger,
        null_resources(),
    )
    .await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !report.problems.is_empty() {
        bail!("recovery reported problems: {:?}", report.problems);
    }
    coordinator.shutdown(Duration::from_secs(60)).await;
    Ok(ms)
}

/// Writes `bytes` of `Commit` + `End` records straight into a journal (nothing removes them:
/// the records of a lagging standby) and measures the opens: (journal bytes, median ms).
async fn retained(bytes: u64, runs: usize) -> anyhow::Result<(u64, f64, f64)> {
    let temp = tempfile::Builder::new()
        .prefix("concord-bench-retained-")
        .tempdir()?;
    let dir = temp.path().join("journal");
    let journal = Journal::open(&dir, journal_config())?;
    let redo = vec![7u8; REDO_BYTES];
    let mut written = 0u64;
    let mut seq = 1u64;
    let mut last = None;
    while written < bytes {
        let xid = adapters::Xid {
            node: 1,
            epoch: Epoch(1),
            seq,
        };
        seq += 1;
        let commit = CoordRecord::Commit {
            xid,
            at_ms: 0,
            branches: BRANCHES
                .iter()
                .map(|name| (name.to_string(), redo.clone()))
                .collect(),
        };
        let end = CoordRecord::End { xid };
        for record in [commit, end] {
            let payload = record.encode();
            written += payload.len() as u64;
            last = Some(journal.append(Epoch(1), record.kind(), &payload)?);
        }
        if seq.is_multiple_of(4096)
            && let Some(appending) = last.take()
        {
            appending.await?;
            // Count what is on disk (records with their framing), not payloads.
            written = dir_bytes(&dir)?;
        }
    }
    if let Some(appending) = last {
        appending.await?;
    }
    journal.close()?;
    drop(journal);
    let journal_median = median_journal_open_ms(&dir, runs).await?;
    let median = median_open_ms_retained(&dir, runs).await?;
    Ok((dir_bytes(&dir)?, journal_median, median))
}

/// Opens (and closes) the journal in `dir` `runs` times: the median time of `Journal::open`.
async fn median_journal_open_ms(dir: &Path, runs: usize) -> anyhow::Result<f64> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            let journal = Journal::open(&dir, journal_config())?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            journal.close()?;
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    })
    .await?
}

/// The coordinator's journal in `dir` and its ledger, read in one pass on the blocking pool.
async fn open_journal_blocking(
    dir: &Path,
) -> anyhow::Result<(Journal, coordinator::ledger::Ledger)> {
    let dir = dir.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || {
        coordinator::runtime::open_journal(&dir, journal_config())
    })
    .await??)
}

/// Opens the coordinator on `dir` `runs` times (as [`open_once_ms`] does), each holding a
/// retention floor at the first record so that its shutdown's checkpoint keeps everything for
/// the next open: the median time to open, in ms.
async fn median_open_ms_retained(dir: &Path, runs: usize) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let (journal, ledger) = open_journal_blocking(dir).await?;
        let config = CoordinatorConfig {
            checkpoint_ms: 0,
            ..CoordinatorConfig::default()
        };
        let (coordinator, _) =
            Coordinator::open_recovered(config, journal, ledger, null_resources()).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        coordinator.retention().hold_floor(Some(journal::Lsn(1)));
        coordinator.shutdown(Duration::from_secs(60)).await;
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}
