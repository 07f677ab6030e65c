//! `concord bench commit`: transactions per second and latency through the coordinator, against a
//! baseline measured in the same run.
//!
//! * `--resource files`: every transaction writes one 1 KiB file in each of two files resources
//!   (two branches, so a two-phase decision). Baseline: the same number of clients writing the
//!   same two files with `fsync` each, straight into place, with no coordination — what an
//!   application gets that does not need atomicity.
//! * `--resource null`: two branches of the null resource (a benchmark-only resource whose
//!   branches do no work and keep no durable state), so what is measured is the coordinator's own
//!   cost per two-phase decision. Baseline: the same number of clients appending one
//!   decision-sized record each to the journal and waiting for it (group commit), which is the
//!   floor under any decision.
//! * `--resource files,mail,kv`: every transaction writes one 1 KiB file in a files resource,
//!   enqueues one 1 KiB mail in a mail queue (a Maildir) and inserts one key with a 1 KiB value
//!   in a kv resource (sled): three branches. Baseline: the same clients making the same three
//!   writes, one after the other, to the same kinds of stores without coordination, each as
//!   durable as that store makes it by itself — the file written and `fsync`ed in place; the
//!   mail delivered as a plain MTA delivers to a Maildir (written to `tmp/`, `fsync`ed, renamed
//!   into `new/`, as qmail and Postfix do: no `fsync` of `new/`); the key inserted into a sled
//!   database and sled's own `flush` called.
//!
//! `files` and `files,mail,kv` alternate baseline and concord windows over several rounds
//! ([`ROUNDS`]), and concord's time includes waiting for its phase 2 after each window.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use coordinator::{Coordinator, CoordinatorConfig, Outcome};
use journal::Epoch;
use participant::{Concord, Config, ResourceConfig};
use serde::Serialize;

use crate::bench_load::{FILE_BYTES, Measured, ROUNDS, load};

/// A kind of resource the transactions use.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BenchResource {
    /// Files resources.
    Files,
    /// Null resources (benchmark-only: no work, no durability).
    Null,
    /// A mail queue (Maildir).
    Mail,
    /// A kv resource (sled).
    Kv,
}

/// What every transaction of the benchmark does, from `--resource`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Two files branches.
    Files,
    /// Two null branches.
    Null,
    /// A files, a mail and a kv branch.
    FilesMailKv,
}

impl Workload {
    fn from_resources(resources: &[BenchResource]) -> anyhow::Result<Workload> {
        let mut kinds = resources.to_vec();
        kinds.sort();
        kinds.dedup();
        match kinds[..] {
            [BenchResource::Files] => Ok(Workload::Files),
            [BenchResource::Null] => Ok(Workload::Null),
            [BenchResource::Files, BenchResource::Mail, BenchResource::Kv] => {
                Ok(Workload::FilesMailKv)
            }
            _ => bail!("--resource takes files, null or files,mail,kv"),
        }
    }

    fn default_clients(self) -> Vec<usize> {
        match self {
            Workload::Files | Workload::FilesMailKv => vec![1, 8, 32, 128],
            Workload::Null => vec![1, 32, 256],
        }
    }
}

/// Options of `concord bench commit`.
#[derive(clap::Args, Debug)]
pub struct CommitBenchArgs {
    /// What every transaction writes: `files` (a file in each of two files resources), `null`
    /// (two branches that do nothing) or `files,mail,kv` (a file, a mail and a key: three
    /// branches).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        required_unless_present = "remote"
    )]
    pub resource: Vec<BenchResource>,
    /// Concurrent clients to measure, comma-separated (default: 1,8,32,128 for files and
    /// files,mail,kv; 1,32,256 for null).
    #[arg(long, value_delimiter = ',')]
    pub clients: Vec<usize>,
    /// Seconds each configuration (and each baseline) runs.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// One JSON object per configuration.
    #[arg(long)]
    pub json: bool,
    /// Measure the files,mail,kv workload embedded and through a coordinator daemon (a child
    /// process) in one run (default clients: 1,8,32).
    #[arg(long)]
    pub remote: bool,
    /// With --remote: transactions per side and configuration.
    #[arg(long, default_value_t = 4000, requires = "remote")]
    pub transactions: u64,
    /// With --remote: where the remote clients run: tasks of this process, or a few client
    /// processes; each client has a connection of its own either way.
    #[arg(long, value_enum, default_value_t = crate::bench_remote::Shape::Tasks, requires = "remote")]
    pub remote_shape: crate::bench_remote::Shape,
}

#[derive(Serialize, Debug)]
struct Row {
    clients: usize,
    tx_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    baseline_tx_per_s: f64,
    ratio: f64,
}

/// Runs `concord bench commit`.
pub fn run(args: CommitBenchArgs) -> anyhow::Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--seconds must be above 0 and at most 600");
    }
    if args.remote {
        return remote(&args);
    }
    let workload = Workload::from_resources(&args.resource)?;
    let clients = match args.clients.is_empty() {
        false => args.clients.clone(),
        true => workload.default_clients(),
    };
    if clients.iter().any(|&c| c == 0 || c > 4096) {
        bail!("--clients must be between 1 and 4096");
    }
    let window = Duration::from_secs_f64(args.seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    // Every configuration's files are removed only at the end: on ext4 without a journal, the
    // inode allocator skips recently deleted inodes, so creating files right after a mass
    // removal is much slower, and it would slow whichever run came next.
    let mut kept = Vec::new();
    for &n in &clients {
        let temp = tempfile::Builder::new()
            .prefix("concord-bench-commit-")
            .tempdir()?;
        let (baseline, measured) = runtime.block_on(async {
            match workload {
                Workload::Files => files_rounds(temp.path(), n, window).await,
                Workload::FilesMailKv => crate::bench_mixed::rounds(temp.path(), n, window).await,
                Workload::Null => {
                    let baseline =
                        journal_baseline(&temp.path().join("baseline"), n, window).await?;
                    let measured = null_concord(&temp.path().join("concord"), n, window).await?;
                    Ok::<_, anyhow::Error>((baseline, measured))
                }
            }
        })?;
        let row = Row {
            clients: n,
            tx_per_s: measured.tx_per_s(),
            p50_ms: measured.percentile_ms(0.50)?,
            p99_ms: measured.percentile_ms(0.99)?,
            baseline_tx_per_s: baseline.tx_per_s(),
            ratio: measured.tx_per_s() / baseline.tx_per_s().max(f64::MIN_POSITIVE),
        };
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
        kept.push(temp);
    }
    if !args.json {
        println!(
            "{:>8} {:>10} {:>9} {:>9} {:>14} {:>8}",
            "clients", "tx/s", "p50 ms", "p99 ms", "baseline tx/s", "ratio"
        );
        for r in &rows {
            println!(
                "{:>8} {:>10.0} {:>9.2} {:>9.2} {:>14.0} {:>7.2}x",
                r.clients, r.tx_per_s, r.p50_ms, r.p99_ms, r.baseline_tx_per_s, r.ratio
            );
        }
    }
    Ok(())
}

/// `--remote`: the files,mail,kv workload embedded and through a daemon ([`crate::bench_remote`]).
fn remote(args: &CommitBenchArgs) -> anyhow::Result<()> {
    if !args.resource.is_empty()
        && Workload::from_resources(&args.resource)? != Workload::FilesMailKv
    {
        bail!("--remote measures the files,mail,kv workload only");
    }
    let clients = match args.clients.is_empty() {
        false => args.clients.clone(),
        true => crate::bench_remote::CLIENTS_DEFAULT.to_vec(),
    };
    if clients.iter().any(|&c| c == 0 || c > 4096) {
        bail!("--clients must be between 1 and 4096");
    }
    crate::bench_remote::run(&clients, args.transactions, args.remote_shape, args.json)
}

/// The files benchmark at `clients`: [`ROUNDS`] rounds of a baseline window then a
/// concord window. Each concord window is followed by a wait until its phase 2 is done, and
/// that wait counts as concord's time: what is measured is the rate concord sustains, not only
/// how fast it decides.
async fn files_rounds(
    dir: &Path,
    clients: usize,
    window: Duration,
) -> anyhow::Result<(Measured, Measured)> {
    let window = window / ROUNDS;
    let baseline_dir = dir.join("baseline");
    for side in ["a", "b"] {
        std::fs::create_dir_all(baseline_dir.join(side))?;
    }
    let concord = open_files_concord(&dir.join("concord")).await?;
    let mut baseline = Measured::default();
    let mut measured = Measured::default();
    for round in 0..ROUNDS {
        baseline.add(files_baseline(&baseline_dir, round, clients, window).await?);
        let started = Instant::now();
        let mut run = files_concord(&concord, round, clients, window).await?;
        if !concord.wait_idle(Duration::from_secs(60)).await {
            bail!("phase 2 of the benchmark's transactions did not finish within 60 s");
        }
        run.elapsed = started.elapsed();
        measured.add(run);
    }
    concord.close(Duration::from_secs(30)).await;
    Ok((baseline, measured))
}

async fn files_baseline(
    dir: &Path,
    round: u32,
    clients: usize,
    window: Duration,
) -> anyhow::Result<Measured> {
    let dir = dir.to_path_buf();
    load(clients, window, move |client, n| {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                for side in ["a", "b"] {
                    let path = dir.join(side).join(format!("r{round}-c{client}-{n}"));
                    let mut file = std::fs::File::create(&path)?;
                    std::io::Write::write_all(&mut file, &[7u8; FILE_BYTES])?;
                    file.sync_all()?;
                }
                Ok(())
            })
            .await?
        }
    })
    .await
}

async fn open_files_concord(dir: &Path) -> anyhow::Result<Concord> {
    let mut config = Config::embedded(dir);
    config.resources.clear();
    for side in ["a", "b"] {
        let root = dir.join(side);
        config.resources.insert(
            side.into(),
            ResourceConfig::Files {
                root,
                create: true,
                lock_wait_ms: 5_000,
            },
        );
    }
    Ok(Concord::open(config).await?)
}

async fn files_concord(
    concord: &Concord,
    round: u32,
    clients: usize,
    window: Duration,
) -> anyhow::Result<Measured> {
    let c = concord.clone();
    load(clients, window, move |client, n| {
        let concord = c.clone();
        async move {
            let mut tx = concord.begin().await?;
            for side in ["a", "b"] {
                let files = tx.files(side).await?;
                files
                    .put(&format!("r{round}-c{client}-{n}"), &[7u8; FILE_BYTES][..])
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        }
    })
    .await
}

async fn journal_baseline(
    dir: &Path,
    clients: usize,
    window: Duration,
) -> anyhow::Result<Measured> {
    let journal = Arc::new(crate::bench::open_journal(dir)?);
    let j = Arc::clone(&journal);
    let measured = load(clients, window, move |_, _| {
        let journal = Arc::clone(&j);
        async move {
            journal
                .append(Epoch(1), journal::RecordKind::new(1, 1), &[0u8; 64])?
                .await?;
            Ok(())
        }
    })
    .await?;
    drop(journal);
    Ok(measured)
}

async fn null_concord(dir: &Path, clients: usize, window: Duration) -> anyhow::Result<Measured> {
    let journal = crate::bench::open_journal(dir)?;
    let resources: Vec<Arc<dyn adapters::Resource>> = vec![
        Arc::new(adapters::null::NullResource::new("a")),
        Arc::new(adapters::null::NullResource::new("b")),
    ];
    let (coordinator, _) =
        Coordinator::open(CoordinatorConfig::default(), journal, resources).await?;
    let c = coordinator.clone();
    let measured = load(clients, window, move |_, _| {
        let coordinator = c.clone();
        async move {
            let xid = coordinator.begin();
            coordinator.join(&xid, "a").await?;
            coordinator.join(&xid, "b").await?;
            match coordinator.commit(&xid).await? {
                Outcome::Committed { .. } => Ok(()),
                other => bail!("transaction did not commit: {other:?}"),
            }
        }
    })
    .await?;
    coordinator.shutdown(Duration::from_secs(30)).await;
    Ok(measured)
}
