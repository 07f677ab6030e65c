//! `concord bench …`: benchmarks that print a ratio against a baseline measured in the same run.
//!
//! `concord bench journal` measures group commit. The baseline is what an application without
//! group commit gets: one writer that appends one record-sized write to a file and `fdatasync`s
//! it, record after record, on the same disk, in the same run. Against it, the journal is measured
//! with 1, 8, 64 and 256 concurrent appenders, each appending and waiting for durability in a loop,
//! for 128-byte and 4 KiB payloads. Every number is a rate over a fixed wall-clock window. The
//! baseline is measured again right before each configuration, so each ratio compares two windows
//! seconds apart on a machine whose disk and CPU speed drift over a minute.
//!
//! An appender is an OS thread blocking in `Appending::wait` or an async task awaiting
//! `Appending` on a two-thread tokio runtime (`--appender`). By default (`auto`) a lone appender is
//! a thread — the same shape as the baseline, a program committing synchronously — and many
//! appenders are tasks, the shape of a server with many clients: hundreds of OS threads on two
//! cores would measure the scheduler, not the journal.
//!
//! Each configuration writes a fresh journal in its own directory; `--keep` leaves them for
//! `concord journal inspect|verify`.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use journal::{Epoch, Journal, JournalConfig, RecordKind};
use serde::Serialize;

/// Options of `concord bench journal`.
#[derive(clap::Args, Debug)]
pub struct JournalBenchArgs {
    /// Directory on the disk to measure (default: a new temp directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the benchmark journals in the directory for `concord journal inspect|verify`.
    #[arg(long)]
    pub keep: bool,
    /// One JSON object per configuration on standard output instead of a table.
    #[arg(long)]
    pub json: bool,
    /// What an appender is: an OS thread blocking in `wait`, an async task awaiting on a
    /// two-thread tokio runtime, or `auto` (a thread when alone, tasks when many).
    #[arg(long, value_enum, default_value_t = AppenderKind::Auto)]
    pub appender: AppenderKind,
    /// Concurrent appenders to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = APPENDERS)]
    pub appenders: Vec<usize>,
    /// Payload sizes to measure in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = PAYLOAD_BYTES)]
    pub payload_bytes: Vec<usize>,
    /// Seconds each configuration (and each baseline) runs.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
}

/// How the benchmark's appenders run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppenderKind {
    /// A thread for a lone appender, tasks for several.
    Auto,
    /// One OS thread per appender, blocking in `Appending::wait`.
    Threads,
    /// One async task per appender on a two-thread tokio runtime, awaiting `Appending`.
    Tasks,
}

impl AppenderKind {
    fn resolve(self, appenders: usize) -> AppenderKind {
        match self {
            AppenderKind::Auto if appenders == 1 => AppenderKind::Threads,
            AppenderKind::Auto => AppenderKind::Tasks,
            other => other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            AppenderKind::Auto => "auto",
            AppenderKind::Threads => "thread",
            AppenderKind::Tasks => "task",
        }
    }
}

/// What one configuration measured.
struct Measured {
    records_per_s: f64,
    records_per_fsync: f64,
    sync_busy_pct: f64,
    write_busy_pct: f64,
}

/// Concurrent appenders measured.
const APPENDERS: [usize; 4] = [1, 8, 64, 256];
/// Payload sizes measured, in bytes.
const PAYLOAD_BYTES: [usize; 2] = [128, 4096];
/// Record kind the benchmark writes.
const BENCH_KIND: RecordKind = RecordKind::new(250, 1);

/// One measured configuration.
#[derive(Serialize, Debug, Clone)]
struct Row {
    appenders: usize,
    payload_bytes: usize,
    records_per_s: f64,
    records_per_fsync: f64,
    baseline_records_per_s: f64,
    speedup: f64,
    /// Share of the wall-clock window the flusher spent in `fdatasync`, in percent: near 100 the
    /// disk is the limit, well below it the CPU is.
    sync_busy_pct: f64,
    /// Share of the window the flusher spent writing into the page cache, in percent.
    write_busy_pct: f64,
    appender: &'static str,
}

/// Runs `concord bench journal`.
pub fn journal(args: JournalBenchArgs) -> anyhow::Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--seconds must be above 0 and at most 600");
    }
    let window = Duration::from_secs_f64(args.seconds);
    check_sizes(&args)?;
    let (root, _temp) = bench_root(&args)?;
    let progress = progress_bar(&args);
    let mut rows = Vec::new();
    for &payload in &args.payload_bytes {
        for &appenders in &args.appenders {
            progress.set_message(format!("baseline, {payload}-byte records"));
            let name = format!("p{payload}-a{appenders}");
            let baseline = baseline_records_per_s(&root, &name, payload, window, args.keep)?;
            progress.inc(1);
            progress.set_message(format!("{appenders} appenders, {payload}-byte records"));
            let dir = root.join(format!("journal-{name}"));
            let kind = args.appender.resolve(appenders);
            let measured = measure_journal(&dir, kind, appenders, payload, window)?;
            if !args.keep {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("remove {}", dir.display()))?;
            }
            let row = Row {
                appenders,
                payload_bytes: payload,
                records_per_s: measured.records_per_s,
                records_per_fsync: measured.records_per_fsync,
                baseline_records_per_s: baseline,
                speedup: measured.records_per_s / baseline,
                sync_busy_pct: measured.sync_busy_pct,
                write_busy_pct: measured.write_busy_pct,
                appender: kind.name(),
            };
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            }
            rows.push(row);
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    if !args.json {
        print_table(&rows);
    }
    if args.keep {
        // On standard error with --json, so that standard output stays NDJSON.
        match args.json {
            true => eprintln!("journals kept under {}", root.display()),
            false => println!("journals kept under {}", root.display()),
        }
    }
    Ok(())
}

/// Refuses appender counts and payload sizes the benchmark cannot run.
fn check_sizes(args: &JournalBenchArgs) -> anyhow::Result<()> {
    let record_max = JournalConfig::default().record_bytes_max as usize;
    let payload_max = record_max - journal::record::OVERHEAD_BYTES;
    if let Some(&bad) = args.payload_bytes.iter().find(|&&p| p > payload_max) {
        bail!("--payload-bytes {bad} is over the journal's largest payload, {payload_max} bytes");
    }
    if let Some(&bad) = args
        .appenders
        .iter()
        .find(|&&a| a == 0 || a > APPENDERS_MAX)
    {
        bail!("--appenders {bad} is outside 1..={APPENDERS_MAX}");
    }
    Ok(())
}

/// Most concurrent appenders the benchmark starts.
const APPENDERS_MAX: usize = 4096;

/// The directory the benchmark writes in, and the temp dir guard when it made one.
fn bench_root(args: &JournalBenchArgs) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            let root = dir.join(format!("concord-bench-journal-{}", std::process::id()));
            std::fs::create_dir(&root).with_context(|| format!("create {}", root.display()))?;
            Ok((root, None))
        }
        None if args.keep => {
            let temp = tempfile::Builder::new()
                .prefix("concord-bench-journal-")
                .tempdir()?;
            Ok((temp.keep(), None))
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("concord-bench-journal-")
                .tempdir()?;
            Ok((temp.path().to_path_buf(), Some(temp)))
        }
    }
}

fn progress_bar(args: &JournalBenchArgs) -> indicatif::ProgressBar {
    let steps = (args.payload_bytes.len() * args.appenders.len() * 2) as u64;
    if args.json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// One writer, one record-sized positional write and one `fdatasync` per record, appending to a
/// new file: what an application without group commit gets.
fn baseline_records_per_s(
    root: &Path,
    name: &str,
    payload: usize,
    window: Duration,
    keep: bool,
) -> anyhow::Result<f64> {
    let path = root.join(format!("baseline-{name}.dat"));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let record = vec![0xa5u8; journal::record::framed_len(payload)];
    let started = Instant::now();
    let mut offset = 0u64;
    let mut records = 0u64;
    while started.elapsed() < window {
        file.write_all_at(&record, offset)
            .with_context(|| format!("write {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("sync {}", path.display()))?;
        offset += record.len() as u64;
        records += 1;
    }
    let rate = records as f64 / started.elapsed().as_secs_f64();
    drop(file);
    if !keep {
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(rate)
}

/// Runs `appenders` appenders of `payload`-byte records for `window`.
fn measure_journal(
    dir: &Path,
    kind: AppenderKind,
    appenders: usize,
    payload: usize,
    window: Duration,
) -> anyhow::Result<Measured> {
    let journal = Arc::new(open_journal(dir)?);
    let stop = Arc::new(AtomicBool::new(false));
    let before = journal.stats();
    let started = Instant::now();
    let load = Load {
        journal: &journal,
        stop: &stop,
        appenders,
        payload,
        window,
    };
    match kind {
        AppenderKind::Tasks => run_tasks(load)?,
        _ => run_threads(load)?,
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = journal.stats();
    Arc::try_unwrap(journal)
        .map_err(|_| anyhow::anyhow!("journal still shared"))?
        .close()?;
    let records = (after.records - before.records) as f64;
    let syncs = (after.syncs - before.syncs).max(1) as f64;
    let sync_seconds = (after.sync_micros - before.sync_micros) as f64 / 1e6;
    Ok(Measured {
        records_per_s: records / elapsed,
        records_per_fsync: records / syncs,
        sync_busy_pct: 100.0 * sync_seconds / elapsed,
        write_busy_pct: 100.0 * (after.write_micros - before.write_micros) as f64 / 1e6 / elapsed,
    })
}

/// A new journal in `dir` with the default limits, as the benchmarks use it.
pub(crate) fn open_journal(dir: &Path) -> anyhow::Result<Journal> {
    let config = JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    };
    Ok(Journal::open(dir, config)?)
}

/// What the appenders of one configuration share.
struct Load<'a> {
    journal: &'a Arc<Journal>,
    stop: &'a Arc<AtomicBool>,
    appenders: usize,
    payload: usize,
    window: Duration,
}

fn run_threads(load: Load<'_>) -> anyhow::Result<()> {
    let threads: Vec<_> = (0..load.appenders)
        .map(|_| {
            let (journal, stop, payload) = (
                Arc::clone(load.journal),
                Arc::clone(load.stop),
                load.payload,
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                let bytes = vec![0x5au8; payload];
                while !stop.load(Ordering::Relaxed) {
                    journal.append(Epoch(1), BENCH_KIND, &bytes)?.wait()?;
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(load.window);
    load.stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("appender thread panicked"))??;
    }
    Ok(())
}

fn run_tasks(load: Load<'_>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tasks: Vec<_> = (0..load.appenders)
            .map(|_| {
                tokio::spawn(append_loop(
                    Arc::clone(load.journal),
                    Arc::clone(load.stop),
                    load.payload,
                ))
            })
            .collect();
        tokio::time::sleep(load.window).await;
        load.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await??;
        }
        Ok(())
    })
}

async fn append_loop(
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    payload: usize,
) -> anyhow::Result<()> {
    let bytes = vec![0x5au8; payload];
    while !stop.load(Ordering::Relaxed) {
        journal.append(Epoch(1), BENCH_KIND, &bytes)?.await?;
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:>9} {:>8} {:>9} {:>12} {:>13} {:>15} {:>9} {:>10} {:>11}",
        "appenders",
        "payload",
        "appender",
        "records/s",
        "records/sync",
        "baseline rec/s",
        "speedup",
        "sync busy",
        "write busy"
    );
    for r in rows {
        println!(
            "{:>9} {:>8} {:>9} {:>12.0} {:>13.1} {:>15.0} {:>8.2}x {:>9.0}% {:>10.0}%",
            r.appenders,
            r.payload_bytes,
            r.appender,
            r.records_per_s,
            r.records_per_fsync,
            r.baseline_records_per_s,
            r.speedup,
            r.sync_busy_pct,
            r.write_busy_pct
        );
    }
}
