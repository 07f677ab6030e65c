//! `concord bench commit --remote`: the files,mail,kv workload embedded and through a
//! coordinator daemon, in one run, at each `--clients` count; each row's `remote_vs_embedded`
//! is the remote rate over the embedded rate.
//!
//! A transaction writes one [`FILE_BYTES`] file in the files resource `uploads`, enqueues one
//! message of about [`FILE_BYTES`] in the mail queue `mail` and inserts one key with a
//! [`FILE_BYTES`] value in the kv resource `index`: three branches, on both sides the embedded
//! defaults ([`Config::embedded`]) of a fresh data directory.
//!
//! * Embedded: one [`Concord`] in the benchmark process, `clients` tasks sharing it, as an
//!   application server linking the library.
//! * Remote: one `concord coordinator --data DIR` child process ([`DaemonChild`]) and
//!   `clients` tasks in the benchmark process, each with a connection of its own, speaking the
//!   generated client ([`crate::remote_txn`]): an application server with a connection per
//!   worker. Both share the machine's cores with the daemon, as an application server shares
//!   its host with a local daemon.
//!
//! Each side runs `--transactions` transactions per configuration, split in [`ROUNDS`] rounds
//! that alternate embedded and remote (the file system's state drifts as files pile up), and
//! the time of each round includes waiting for its phase 2 (`wait_idle` embedded, an empty
//! `ListInDoubt` remote): what is measured is the rate each sustains. The daemon's exit status
//! after SIGTERM is checked at the end of every configuration.
//!
//! # Implementation caveats
//!
//! * Connecting (and opening the stores, starting the daemon) is not timed.
//! * The remote clients do not use the participant library's remote mode, which was not on
//!   main when this was written: the measured cost is the daemon's and the wire's, not that
//!   library's.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use participant::config::{EMBEDDED_KV, EMBEDDED_MAIL};
use participant::{Concord, Config};
use proto::client::{Client, Credentials};
use proto::v1::{self, RequestHeader};
use serde::Serialize;

use crate::bench_load::{FILE_BYTES, Measured};
use crate::daemon_child::DaemonChild;
use crate::remote_txn::{Ended, RemoteTxn};

/// The files resource the workload writes in.
const FILES: &str = "uploads";
/// Rounds per configuration: embedded and remote take turns.
const ROUNDS: u64 = 2;
/// How long phase 2 may take after a round (milliseconds).
const IDLE_MS_MAX: u64 = 60_000;
/// How often the daemon is asked whether phase 2 is done (milliseconds).
const IDLE_POLL_MS: u64 = 5;
/// The client name of the benchmark's calls.
const CLIENT_NAME: &str = "concord-bench";

/// The clients measured when `--clients` is not given.
pub(crate) const CLIENTS_DEFAULT: [usize; 3] = [1, 8, 32];

/// Where the remote clients run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Tasks of the benchmark process, each with a connection of its own.
    Tasks,
    /// Up to [`CLIENT_PROCESSES_MAX`] client processes sharing the tasks, each task with a
    /// connection of its own.
    Processes,
}

/// The most client processes of the `processes` shape.
const CLIENT_PROCESSES_MAX: usize = 4;

/// The remote side's clients, connected and ready.
enum Remote {
    /// Connections of this process.
    Tasks(Vec<Client>),
    /// Client processes waiting for their rounds, and a connection to ask about phase 2.
    Processes {
        processes: Vec<ClientProcess>,
        probe: Box<Client>,
    },
}

impl Remote {
    async fn connect(url: &str, clients: usize, shape: Shape) -> anyhow::Result<Remote> {
        let probe = proto::client::connect(url, &Credentials::none()).await?;
        if shape == Shape::Tasks {
            let mut connections = vec![probe];
            for _ in 1..clients {
                connections.push(proto::client::connect(url, &Credentials::none()).await?);
            }
            return Ok(Remote::Tasks(connections));
        }
        let count = clients.min(CLIENT_PROCESSES_MAX);
        let mut processes = Vec::new();
        for k in 0..count {
            let tasks = clients / count + usize::from(k < clients % count);
            processes.push(ClientProcess::start(url, k, tasks)?);
        }
        let mut ready = Vec::new();
        for process in processes {
            ready.push(tokio::task::spawn_blocking(move || process.ready()).await??);
        }
        Ok(Remote::Processes {
            processes: ready,
            probe: Box::new(probe),
        })
    }

    fn probe(&self) -> &Client {
        match self {
            Remote::Tasks(connections) => &connections[0],
            Remote::Processes { probe, .. } => probe,
        }
    }

    /// Ends the client processes (their input closed) and checks they exited 0.
    fn finish(self) -> anyhow::Result<()> {
        if let Remote::Processes { processes, .. } = self {
            for process in processes {
                process.finish()?;
            }
        }
        Ok(())
    }
}

/// One row of the output.
#[derive(Serialize, Debug)]
struct Row {
    clients: usize,
    transactions: u64,
    embedded_tps: f64,
    remote_tps: f64,
    remote_vs_embedded: f64,
    embedded_p50_ms: f64,
    embedded_p99_ms: f64,
    remote_p50_ms: f64,
    remote_p99_ms: f64,
}

/// Runs `concord bench commit --remote` at each of `clients`, `transactions` per side and
/// configuration.
pub(crate) fn run(
    clients: &[usize],
    transactions: u64,
    shape: Shape,
    json: bool,
) -> anyhow::Result<()> {
    if transactions < ROUNDS {
        bail!("--transactions must be at least {ROUNDS}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let message: Arc<[u8]> = Arc::from(crate::bench_mixed::message()?);
    let mut rows = Vec::new();
    // Every configuration's files are removed only at the end: ext4's inode allocator skips
    // recently deleted inodes, which would slow whichever configuration came next.
    let mut kept = Vec::new();
    for &n in clients {
        let temp = tempfile::Builder::new()
            .prefix("concord-bench-remote-")
            .tempdir()?;
        let row = runtime.block_on(configuration(temp.path(), n, transactions, &message, shape))?;
        if json {
            println!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
        kept.push(temp);
    }
    if !json {
        print_table(&rows);
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:>8} {:>13} {:>11} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "clients",
        "embedded tx/s",
        "remote tx/s",
        "ratio",
        "emb p50",
        "emb p99",
        "rem p50",
        "rem p99"
    );
    for r in rows {
        println!(
            "{:>8} {:>13.0} {:>11.0} {:>6.2}x {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            r.clients,
            r.embedded_tps,
            r.remote_tps,
            r.remote_vs_embedded,
            r.embedded_p50_ms,
            r.embedded_p99_ms,
            r.remote_p50_ms,
            r.remote_p99_ms
        );
    }
}

/// One configuration: `clients` clients, embedded and remote rounds in turn.
async fn configuration(
    dir: &Path,
    clients: usize,
    transactions: u64,
    message: &Arc<[u8]>,
    shape: Shape,
) -> anyhow::Result<Row> {
    let concord = Concord::open(Config::embedded(&dir.join("embedded"))).await?;
    let remote_dir = dir.join("remote");
    std::fs::create_dir_all(&remote_dir)?;
    let daemon = DaemonChild::start(&[OsString::from("--data"), remote_dir.into_os_string()])?;
    let mut sides = Remote::connect(&daemon.url(), clients, shape).await?;
    let mut embedded = Measured::default();
    let mut remote = Measured::default();
    let per_round = transactions / ROUNDS;
    for round in 0..ROUNDS {
        embedded.add(embedded_round(&concord, message, round, clients, per_round).await?);
        remote.add(remote_round(&mut sides, message, round, per_round).await?);
    }
    concord.close(Duration::from_secs(30)).await;
    sides.finish()?;
    let status = daemon.terminate()?;
    if !status.success() {
        bail!("the coordinator daemon exited with {status} after SIGTERM, not 0");
    }
    Ok(Row {
        clients,
        transactions: per_round * ROUNDS,
        embedded_tps: embedded.tx_per_s(),
        remote_tps: remote.tx_per_s(),
        remote_vs_embedded: remote.tx_per_s() / embedded.tx_per_s().max(f64::MIN_POSITIVE),
        embedded_p50_ms: embedded.percentile_ms(0.50)?,
        embedded_p99_ms: embedded.percentile_ms(0.99)?,
        remote_p50_ms: remote.percentile_ms(0.50)?,
        remote_p99_ms: remote.percentile_ms(0.99)?,
    })
}

/// `transactions` transactions by `clients` tasks on the embedded `concord`, then its phase 2.
async fn embedded_round(
    concord: &Concord,
    message: &Arc<[u8]>,
    round: u64,
    clients: usize,
    transactions: u64,
) -> anyhow::Result<Measured> {
    let (c, message) = (concord.clone(), Arc::clone(message));
    let started = Instant::now();
    let mut measured = count_load(clients, transactions, move |client, n| {
        let (concord, message) = (c.clone(), Arc::clone(&message));
        async move {
            let name = format!("r{round}-c{client}-{n}");
            crate::bench_mixed::files_mail_kv(
                &concord,
                [FILES, EMBEDDED_MAIL, EMBEDDED_KV],
                &name,
                &message,
            )
            .await
        }
    })
    .await?;
    if !concord.wait_idle(Duration::from_millis(IDLE_MS_MAX)).await {
        bail!("phase 2 of the embedded transactions did not finish within {IDLE_MS_MAX} ms");
    }
    measured.elapsed = started.elapsed();
    Ok(measured)
}

/// `transactions` transactions through the daemon, one task per connection (in this process,
/// or in client processes), then its phase 2.
async fn remote_round(
    sides: &mut Remote,
    message: &Arc<[u8]>,
    round: u64,
    transactions: u64,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let mut measured = match sides {
        Remote::Tasks(connections) => {
            let prefix = format!("r{round}");
            remote_load(connections, message, prefix, transactions).await?
        }
        Remote::Processes { processes, .. } => {
            processes_round(processes, round, transactions).await?
        }
    };
    wait_idle(sides.probe()).await?;
    measured.elapsed = started.elapsed();
    Ok(measured)
}

/// `transactions` transactions by one task per connection; names start with `prefix`.
pub(crate) async fn remote_load(
    connections: &[Client],
    message: &Arc<[u8]>,
    prefix: String,
    transactions: u64,
) -> anyhow::Result<Measured> {
    let connections: Arc<[Client]> = Arc::from(connections);
    let (c, message) = (Arc::clone(&connections), Arc::clone(message));
    count_load(connections.len(), transactions, move |client, n| {
        let (connection, message) = (c[client].clone(), Arc::clone(&message));
        let prefix = prefix.clone();
        async move { remote_one(&connection, &message, format!("{prefix}-c{client}-{n}")).await }
    })
    .await
}

/// One transaction of the workload through the daemon on `connection`: the file and the key
/// `name`, and `message`.
pub(crate) async fn remote_one(
    connection: &Client,
    message: &[u8],
    name: String,
) -> anyhow::Result<()> {
    let mut tx = RemoteTxn::begin(connection, CLIENT_NAME).await?;
    tx.put(FILES, &name, vec![7u8; FILE_BYTES]).await?;
    tx.enqueue(EMBEDDED_MAIL, message.to_vec()).await?;
    tx.insert(EMBEDDED_KV, name.into_bytes(), vec![7u8; FILE_BYTES])
        .await?;
    match tx.commit().await? {
        Ended::Committed => Ok(()),
        other => bail!("a benchmark transaction did not commit: {other:?}"),
    }
}

/// Waits, at most [`IDLE_MS_MAX`], until the daemon lists no unfinished transaction.
pub(crate) async fn wait_idle(client: &Client) -> anyhow::Result<()> {
    let mut client = client.clone();
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
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("phase 2 of the remote transactions did not finish within {IDLE_MS_MAX} ms");
        }
        tokio::time::sleep(Duration::from_millis(IDLE_POLL_MS)).await;
    }
}

/// Runs `transactions` calls of `one` (given the client number and the client's counter) by
/// `clients` concurrent tasks, each taking the next transaction until none is left.
async fn count_load<F, Fut>(clients: usize, transactions: u64, one: F) -> anyhow::Result<Measured>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let one = Arc::new(one);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (one, next) = (Arc::clone(&one), Arc::clone(&next));
        set.spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while next.fetch_add(1, Ordering::Relaxed) < transactions {
                let t0 = Instant::now();
                one(client, n).await?;
                latencies.push(t0.elapsed().as_micros() as u64);
                n += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        });
    }
    let mut measured = Measured::default();
    while let Some(joined) = set.join_next().await {
        measured.extend(joined??);
    }
    measured.elapsed = started.elapsed();
    Ok(measured)
}

/// One round split among the client processes, in proportion to their tasks.
async fn processes_round(
    processes: &mut Vec<ClientProcess>,
    round: u64,
    transactions: u64,
) -> anyhow::Result<Measured> {
    let tasks: usize = processes.iter().map(|p| p.tasks).sum();
    let mut left = transactions;
    let mut shares = Vec::new();
    for (k, process) in processes.iter().enumerate() {
        let share = match k + 1 == processes.len() {
            true => left,
            false => transactions * process.tasks as u64 / tasks as u64,
        };
        left -= share;
        shares.push(share);
    }
    let taken = std::mem::take(processes);
    let mut running = Vec::new();
    for (mut process, share) in taken.into_iter().zip(shares) {
        process.order(round, share)?;
        running.push(tokio::task::spawn_blocking(move || {
            let latencies = process.answer();
            (process, latencies)
        }));
    }
    let mut measured = Measured::default();
    for joined in running {
        let (process, latencies) = joined.await?;
        processes.push(process);
        measured.extend(latencies?);
    }
    Ok(measured)
}

/// A `concord bench-client` child: it connects, says `ready`, then runs one round per line
/// `ROUND TRANSACTIONS` on its input and answers each with its latencies as a JSON array.
struct ClientProcess {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    tasks: usize,
}

impl ClientProcess {
    fn start(url: &str, k: usize, tasks: usize) -> anyhow::Result<ClientProcess> {
        let exe = std::env::current_exe().context("find the concord binary")?;
        let mut child = std::process::Command::new(exe)
            .args(["bench-client", "--url", url])
            .args(["--client", &k.to_string(), "--tasks", &tasks.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .with_context(|| format!("start bench client {k}"))?;
        let input = child
            .stdin
            .take()
            .context("the client's input is not piped")?;
        let output = child
            .stdout
            .take()
            .context("the client's output is not piped")?;
        Ok(ClientProcess {
            child,
            input,
            output: std::io::BufRead::lines(std::io::BufReader::new(output)),
            tasks,
        })
    }

    fn line(&mut self) -> anyhow::Result<String> {
        match self.output.next() {
            Some(line) => Ok(line?),
            None => bail!("a bench client ended early; its error is above"),
        }
    }

    fn ready(mut self) -> anyhow::Result<ClientProcess> {
        let line = self.line()?;
        if line != "ready" {
            bail!("a bench client said {line:?}, not ready");
        }
        Ok(self)
    }

    fn order(&mut self, round: u64, transactions: u64) -> anyhow::Result<()> {
        use std::io::Write;
        writeln!(self.input, "{round} {transactions}")?;
        Ok(self.input.flush()?)
    }

    fn answer(&mut self) -> anyhow::Result<Vec<u64>> {
        let line = self.line()?;
        serde_json::from_str(&line).context("read a bench client's latencies")
    }

    fn finish(self) -> anyhow::Result<()> {
        let ClientProcess {
            mut child, input, ..
        } = self;
        drop(input);
        let deadline = Instant::now() + Duration::from_millis(IDLE_MS_MAX);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("a bench client exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("a bench client did not exit within {IDLE_MS_MAX} ms of its input closing");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Options of the hidden `concord bench-client`: one client process of `concord bench commit
/// --remote --remote-shape processes`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The daemon's URL.
    #[arg(long)]
    pub url: String,
    /// This client's number (its names are its own).
    #[arg(long)]
    pub client: usize,
    /// Concurrent transactions, each task with a connection of its own.
    #[arg(long)]
    pub tasks: usize,
}

/// Runs `concord bench-client`: connects, prints `ready`, then runs each round its input
/// orders and prints the round's latencies (microseconds) as one JSON array.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    if args.tasks == 0 {
        bail!("--tasks must be above 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(client_rounds(&args))
}

async fn client_rounds(args: &ClientArgs) -> anyhow::Result<()> {
    let message: Arc<[u8]> = Arc::from(crate::bench_mixed::message()?);
    let mut connections = Vec::new();
    for _ in 0..args.tasks {
        connections.push(proto::client::connect(&args.url, &Credentials::none()).await?);
    }
    println!("ready");
    for line in std::io::BufRead::lines(std::io::stdin().lock()) {
        let line = line?;
        let Some((round, transactions)) = line.split_once(' ') else {
            bail!("a round order {line:?} is not `ROUND TRANSACTIONS`");
        };
        let prefix = format!("r{round}-p{}", args.client);
        let measured = remote_load(&connections, &message, prefix, transactions.parse()?).await?;
        println!("{}", serde_json::to_string(&measured.latencies_us())?);
    }
    Ok(())
}
