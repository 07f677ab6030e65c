//! A workload: concurrent tasks committing through the primary daemon, each remembering what
//! the primary acknowledged.
//!
//! [`Workload::start`] runs on a tokio runtime of its own, on a thread it owns, so that the
//! test drives processes and signals with plain blocking calls meanwhile. Each of
//! [`WorkloadSpec::tasks`] tasks connects with [`Concord::connect`] (and
//! [`Concord::attach_postgres`] for `orders`) and runs transactions `i = task, task + tasks, …`:
//! each puts the file `uploads/w<i>` (content [`file_content`]: every
//! [`LARGE_EVERY`]-th one is ≥ 1 MiB), enqueues a mail, inserts the kv key `w<i>` and, with
//! PostgreSQL, inserts or bumps the row `i % ORDER_IDS` of `orders`. A transaction whose commit
//! is acknowledged is kept ([`Acked`]); a failed one is counted (faults are what the tests
//! make) and the task goes on after [`RETRY_PAUSE_MS`]. [`Workload::stop`] ends the tasks and
//! returns the [`Report`].
//!
//! Implementation caveats: a failed transaction is not run again (its i is skipped); the tasks
//! share one connection, as the demo's clients do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use participant::{Concord, Credentials, MessageBuilder, PostgresConfig};

/// One transaction in this many writes a file of at least 1 MiB.
pub const LARGE_EVERY: u64 = 16;
/// The size of a large file (bytes), plus i.
pub const LARGE_FILE_BYTES: usize = 1024 * 1024;
/// The rows of `orders` the workload writes (so that most transactions update one).
pub const ORDER_IDS: u64 = 64;
/// The pause after a failed transaction or connection.
pub const RETRY_PAUSE_MS: u64 = 50;
/// How long the tasks may take to end after [`Workload::stop`] (each finishes its transaction).
pub const STOP_MS_MAX: u64 = 60_000;
/// How often a held task looks whether it may go on.
const HOLD_POLL_MS: u64 = 10;
/// How long the workload waits for its first connection.
const CONNECT_MS_MAX: u64 = 10_000;

/// What the workload does.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// The primary's url.
    pub url: String,
    /// The primary's PostgreSQL `orders` connection string, when the sites have PostgreSQL.
    pub pg_url: Option<String>,
    /// Concurrent tasks.
    pub tasks: u64,
    /// The pause between two transactions of a task (milliseconds).
    pub pause_ms: u64,
}

impl WorkloadSpec {
    /// `tasks` tasks against the running `primary` (and its PostgreSQL), without pauses.
    pub fn against(primary: &crate::site::Site, tasks: u64) -> WorkloadSpec {
        WorkloadSpec {
            url: primary.url(),
            pg_url: primary.pg_url(),
            tasks,
            pause_ms: 0,
        }
    }
}

/// A transaction the primary acknowledged, and what it wrote.
#[derive(Clone, Debug)]
pub struct Acked {
    /// Its xid, as text.
    pub xid: String,
    /// Its number.
    pub i: u64,
    /// `uploads/…`: the file's path.
    pub file: String,
    /// blake3 of the file's content.
    pub file_digest: [u8; 32],
    /// The mail's Maildir file name.
    pub mail: String,
    /// The kv key.
    pub key: Vec<u8>,
    /// The kv value.
    pub value: Vec<u8>,
    /// The `orders` row id, with PostgreSQL.
    pub order_id: Option<i64>,
}

/// What a stopped workload saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Every acknowledged transaction, in the order of the acknowledgements per task.
    pub acked: Vec<Acked>,
    /// Transactions that failed (refused, rolled back, in doubt, connection errors).
    pub failed: u64,
    /// The first few failures' messages.
    pub failures: Vec<String>,
}

/// A running workload; see the module docs.
pub struct Workload {
    stop: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Report>>,
}

impl Workload {
    /// Starts `spec.tasks` tasks against the primary.
    pub fn start(spec: WorkloadSpec) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let flags = Flags {
            stop: stop.clone(),
            hold: hold.clone(),
        };
        let count = committed.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("build the workload's runtime");
            runtime.block_on(run(spec, flags, count))
        });
        Workload {
            stop,
            hold,
            committed,
            thread: Some(thread),
        }
    }

    /// Acknowledged commits so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` commits are acknowledged, at most `ms`; panics otherwise.
    pub fn wait_committed(&self, n: u64, ms: u64) {
        let done = crate::process::wait_until(ms, || self.committed() >= n);
        assert!(
            done,
            "the workload reached {} of {n} commits in {ms} ms",
            self.committed()
        );
    }

    /// Holds the tasks after the transaction each is in, until [`Workload::release`].
    pub fn hold(&self) {
        self.hold.store(true, Ordering::Relaxed);
    }

    /// Lets held tasks go on.
    pub fn release(&self) {
        self.hold.store(false, Ordering::Relaxed);
    }

    /// Ends the tasks (each finishes the transaction it is in) and returns what they saw.
    /// Panics when they have not ended within [`STOP_MS_MAX`] (a call that never returns).
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.hold.store(false, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        let ended = crate::process::wait_until(STOP_MS_MAX, || thread.is_finished());
        assert!(
            ended,
            "the workload's tasks did not end within {STOP_MS_MAX} ms of the stop"
        );
        thread.join().expect("the workload thread panicked")
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.hold.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A test failing already does not also hang on a call that never returns.
            if crate::process::wait_until(STOP_MS_MAX, || thread.is_finished()) {
                let _ = thread.join();
            }
        }
    }
}

/// The content of file `i`: blake3's output stream of `i`, [`LARGE_FILE_BYTES`] + i long for
/// every [`LARGE_EVERY`]-th i, 1 KiB + i otherwise.
pub fn file_content(i: u64) -> Vec<u8> {
    let len = if i.is_multiple_of(LARGE_EVERY) {
        LARGE_FILE_BYTES + i as usize
    } else {
        1024 + i as usize
    };
    content_of(i, len)
}

/// `len` bytes of blake3's output stream of `seed`.
pub fn content_of(seed: u64, len: usize) -> Vec<u8> {
    let mut content = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().fill(&mut content);
    content
}

/// The flags a test sets and every task follows.
#[derive(Clone)]
struct Flags {
    stop: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
}

impl Flags {
    /// Waits while held; true when the task is to stop.
    async fn stopped(&self) -> bool {
        while self.hold.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(HOLD_POLL_MS)).await;
        }
        self.stop.load(Ordering::Relaxed)
    }
}

async fn run(spec: WorkloadSpec, flags: Flags, committed: Arc<AtomicU64>) -> Report {
    let concord = connect(&spec).await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..spec.tasks {
        let (concord, spec) = (concord.clone(), spec.clone());
        let (flags, committed) = (flags.clone(), committed.clone());
        tasks.spawn(async move { run_task(task, concord, spec, flags, committed).await });
    }
    let mut report = Report::default();
    while let Some(done) = tasks.join_next().await {
        let part = done.expect("a workload task panicked");
        report.acked.extend(part.acked);
        report.failed += part.failed;
        report.failures.extend(part.failures);
    }
    report.failures.truncate(10);
    report
}

async fn connect(spec: &WorkloadSpec) -> Concord {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(CONNECT_MS_MAX);
    loop {
        match try_connect(spec).await {
            Ok(concord) => return concord,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("the workload could not connect to {}: {e}", spec.url)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await,
        }
    }
}

async fn try_connect(spec: &WorkloadSpec) -> Result<Concord, participant::ConcordError> {
    let concord = Concord::connect(&spec.url, Credentials::none()).await?;
    if let Some(pg_url) = &spec.pg_url {
        concord
            .attach_postgres("orders", PostgresConfig::new(pg_url.clone(), 1))
            .await?;
    }
    Ok(concord)
}

async fn run_task(
    task: u64,
    concord: Concord,
    spec: WorkloadSpec,
    flags: Flags,
    committed: Arc<AtomicU64>,
) -> Report {
    let mut report = Report::default();
    let mut i = task;
    while !flags.stopped().await {
        match transaction(&concord, i, spec.pg_url.is_some()).await {
            Ok(acked) => {
                report.acked.push(acked);
                committed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(spec.pause_ms)).await;
            }
            Err(e) => {
                report.failed += 1;
                if report.failures.len() < 10 {
                    report.failures.push(format!("transaction {i}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
            }
        }
        i += spec.tasks;
    }
    report
}

/// Transaction `i`; see the module docs.
pub async fn transaction(
    concord: &Concord,
    i: u64,
    postgres: bool,
) -> Result<Acked, participant::ConcordError> {
    let mut tx = concord.begin().await?;
    let content = file_content(i);
    let file = format!("w{i}");
    tx.files("uploads").await?.put(&file, &content[..]).await?;
    let message = MessageBuilder::new()
        .from("Workload <workload@example.org>")
        .to("standby@example.org")
        .subject(format!("transaction {i}"))
        .body(format!("Transaction {i} committed.\n"));
    let enqueued = tx.mail("mail").await?.enqueue_built(&message).await?;
    let key = format!("w{i}").into_bytes();
    let value = i.to_le_bytes().to_vec();
    tx.kv("index").await?.insert(&key, &value).await?;
    let order_id = if postgres {
        let id = (i % ORDER_IDS) as i64;
        let item = format!("item {i}");
        tx.postgres("orders")
            .await?
            .execute(
                "INSERT INTO public.orders (id, item, qty) VALUES ($1, $2, 1) \
                 ON CONFLICT (id) DO UPDATE SET qty = orders.qty + 1, item = EXCLUDED.item",
                &[&id, &item],
            )
            .await?;
        Some(id)
    } else {
        None
    };
    let committed = tx.commit().await?;
    Ok(Acked {
        xid: committed.xid.to_string(),
        i,
        file,
        file_digest: *blake3::hash(&content).as_bytes(),
        mail: enqueued.name,
        key,
        value,
        order_id,
    })
}

/// Commits one transaction putting `uploads/<path>` of `len` bytes (content seeded by `seed`),
/// on a runtime of its own: for a large blob a test cuts the link under. Returns the xid.
pub fn commit_file(url: &str, path: &str, seed: u64, len: usize) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a runtime");
    runtime.block_on(async {
        let concord = Concord::connect(url, Credentials::none())
            .await
            .map_err(|e| e.to_string())?;
        let mut tx = concord.begin().await.map_err(|e| e.to_string())?;
        let content = content_of(seed, len);
        let files = tx.files("uploads").await.map_err(|e| e.to_string())?;
        files
            .put(path, &content[..])
            .await
            .map_err(|e| e.to_string())?;
        let committed = tx.commit().await.map_err(|e| e.to_string())?;
        Ok(committed.xid.to_string())
    })
}
