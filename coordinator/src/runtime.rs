//! The coordinator's runtime: it executes the engine's commands with real resources, the real
//! journal and tokio, and feeds the results back as events.
//!
//! A `Driver` runs one transaction's [`TxnMachine`] from the caller's `commit` to its `End`
//! record: it carries out each [`Command`] concurrently (prepares and phase-2 calls run side by
//! side) and turns each result into the next [`Event`]. The calls, retry timers and the decision
//! append are futures the driver polls itself, so a command costs no task of its own; a call is
//! polled once as soon as it starts, and only one that is not finished then joins the set of
//! calls being waited on.
//!
//! `commit` and `rollback` drive the machine in the caller's own task until the outcome is known
//! (for a commit: the decision is durable), so the journal's flusher wakes the caller directly.
//! Then phase-2 calls that finish at their first poll are carried out before the answer is
//! returned, and whatever still waits (a slower branch, a retry) goes on in a task of its own;
//! if the caller stops waiting before the outcome, a task takes over the same way, so a dropped
//! `commit` future never leaves a transaction half driven. Rollbacks nobody waits for (a timeout,
//! a dropped handle) and recovery run in tasks from the start. Every task, and every caller
//! driving a machine, is tracked ([`Tasks`]); tasks are spawned on the coordinator's runtime, so
//! shutdown stops them (and the callers, who hear [`CoordError::ShuttingDown`]) and waits for
//! them, and none is detached.
//!
//! Open transactions and running machines are kept in maps split into shards (by sequence
//! number and run number), hashed with [`XidBuildHasher`], so concurrent callers rarely meet on
//! a lock.
//!
//! The implementation caveats: recovery runs one machine per (resource, xid) for undecided
//! branches, so `list` may show one xid more than once while recovery runs; phase 2 of a
//! decided transaction retries for as long as it takes, until an operator resolves it. The
//! orphan sweeper reads the whole retained journal, on the runtime's thread, in a sweep that
//! found something to roll back (rare, but not free on a long journal); it assumes that no
//! other process prepares branches with this node's id (two coordinators sharing a node id are
//! not supported anyway: their xids could collide); a branch it finds decided but not driven
//! (after an operator's `resolve --commit` whose branch commit failed) is reported at every
//! sweep, never committed by the sweeper.
//!
//! Recovery at open reads the journal: every `Commit` without `End` is driven through phase 2
//! again; every branch a resource reports prepared whose xid has no `Commit` is rolled back
//! (presumed abort). Each runs in its own task, so a branch that cannot be resolved is retried
//! and reported without holding up the others or the start.
//!
//! The **orphan sweeper** finds what recovery at open cannot: a branch prepared while this
//! coordinator runs that no transaction of it owns — a prepare that reached the server after
//! its transaction had already rolled back (a client-side timeout, a broken connection), or a
//! branch prepared behind the coordinator's back. Every `orphan_sweep_ms` it asks every resource
//! for its prepared branches (`recover`); a branch of this node that is neither open nor running
//! here in two sweeps in a row, and whose xid has no commit decision in the journal, is rolled
//! back by a machine of its own (so it is retried, listed, and stopped by shutdown like any
//! other), reported with a warning and counted ([`Coordinator::orphans_rolled_back`]). The
//! argument that this never touches a transaction that may commit is on `sweep_orphans`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adapters::xid::{XidBuildHasher, XidText};
use adapters::{Epoch, ErrorClass, Lsn, Resource, ResourceError, Xid};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use journal::{Appending, Journal, JournalError};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::engine::{
    BranchId, BranchState, Command, Event, Outcome, Phase, RetryPolicy, TxnMachine,
};
use crate::failpoint;
use crate::ledger::{Ledger, Verdict};
use crate::record::{self, CoordRecord, RecordError};
use crate::resolve::{ResolveReport, ResolveRequest};
use crate::retention::{JournalBlobs, JournalSource, PinId, Retention};

/// How a coordinator runs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// This node's id, part of every xid.
    pub node: u32,
    /// The epoch this node serves in, part of every xid and every record.
    pub epoch: Epoch,
    /// A transaction still open (not committing) after this long is rolled back (milliseconds).
    pub txn_timeout_ms: u64,
    /// Backoff of phase-2 retries.
    pub retry: RetryPolicy,
    /// How often the orphan sweeper asks every resource for its prepared branches
    /// (milliseconds); 0 turns the sweeper off. A prepared branch of this node that no
    /// transaction of this coordinator owns in two sweeps in a row — so for at least this long —
    /// and that has no commit decision is rolled back (see [`Coordinator::orphans_rolled_back`]).
    pub orphan_sweep_ms: u64,
    /// Most transactions between their commit request and the end of their phase 2. A commit
    /// beyond waits — at most `txn_timeout_ms` — for one of them to finish, so that a resource
    /// slower at phase 2 than the callers are at deciding holds the callers back instead of
    /// piling up unfinished transactions.
    pub max_unfinished: usize,
    /// Whether a transaction whose only branch is in a resource that offers it commits in one
    /// phase (see the engine docs); off, every transaction takes two.
    pub one_phase: bool,
    /// Deadline of every call to a resource (milliseconds). A call past it counts as an
    /// unavailable resource: a prepare votes no (the transaction rolls back), a phase-2 call is
    /// retried with backoff, a one-phase commit's resource is asked what became of it, and a
    /// `recover` at open or in a sweep is reported and skipped. The call itself is dropped;
    /// a resource whose operation went on regardless is idempotent about the retry.
    pub call_timeout_ms: u64,
    /// How often journal segments nothing needs any more are removed (milliseconds; 0: only at
    /// shutdown); see [`crate::retention`].
    pub checkpoint_ms: u64,
    /// How often every resource is asked to remove the blobs that neither a retained journal
    /// record nor a branch of its own still names (milliseconds; 0: never); see
    /// [`crate::retention`].
    pub blob_collect_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            node: 1,
            epoch: Epoch(1),
            txn_timeout_ms: 30_000,
            retry: RetryPolicy::default(),
            orphan_sweep_ms: 60_000,
            max_unfinished: 4096,
            one_phase: true,
            call_timeout_ms: 30_000,
            checkpoint_ms: 1_000,
            blob_collect_ms: 60_000,
        }
    }
}

/// Errors of the coordinator, sorted by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// No resource of that name is configured.
    #[error("unknown resource {name:?}; configured: {configured}")]
    UnknownResource {
        /// The name asked for.
        name: String,
        /// The names configured, comma-separated.
        configured: String,
    },
    /// The transaction is not open (it is committing, finished, or was rolled back).
    #[error("transaction {xid} is {state}; it accepts no more work")]
    NotActive {
        /// The transaction.
        xid: Xid,
        /// Where it is.
        state: String,
    },
    /// The transaction was open longer than its timeout and was rolled back.
    #[error("transaction {xid} was open longer than {timeout_ms} ms and was rolled back")]
    TimedOut {
        /// The transaction.
        xid: Xid,
        /// The timeout.
        timeout_ms: u64,
    },
    /// A resource refused.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// The journal failed; the coordinator must restart.
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    /// A journal record could not be understood.
    #[error("journal record at lsn {lsn}: {error}")]
    Record {
        /// Where.
        lsn: Lsn,
        /// What.
        error: RecordError,
    },
    /// The operator's request cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// The coordinator shut down before the outcome was known: recovery at the next start decides
    /// it (committed if its decision became durable, rolled back otherwise).
    #[error(
        "coordinator shut down before the outcome was known; recovery at the next start decides it"
    )]
    ShuttingDown,
}

/// What recovery found at open.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Transactions with a durable decision and no `End`, driven through phase 2 again.
    pub redriven: Vec<Xid>,
    /// Prepared branches without a decision, rolled back: `(resource, xid)`.
    pub rolled_back: Vec<(String, Xid)>,
    /// One-phase commits journaled with neither `End` nor `Abort`: their resource is asked what
    /// became of them, and the answer journaled.
    pub asked: Vec<Xid>,
    /// Prepared branches of transactions the journal says committed, committed (again):
    /// `(resource, xid)`. Those whose transaction had already ended are also in `hazards`.
    pub recommitted: Vec<(String, Xid)>,
    /// Heuristic hazards (logged at error): a branch found prepared although its transaction
    /// had ended committed, so its commit was lost once (a resource restored from a backup).
    pub hazards: Vec<String>,
    /// Problems that need a person: a resource named by a decision that is not configured, a
    /// resource whose `recover` failed.
    pub problems: Vec<String>,
    /// Resources the journal names that the configuration lacks, each with the transactions
    /// whose branches there wait for it (a `Commit` without `End`, a `OnePhase` without its
    /// outcome). Nothing can finish those branches until the resource is configured; see
    /// [`RecoveryReport::unconfigured_message`].
    pub unconfigured: BTreeMap<String, Vec<Xid>>,
}

impl RecoveryReport {
    /// One line for an operator when the journal names resources the configuration lacks
    /// (`None` when it names none): which resources, which transactions, and what to do.
    pub fn unconfigured_message(&self) -> Option<String> {
        if self.unconfigured.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .unconfigured
            .iter()
            .map(|(name, xids)| {
                let xids: Vec<String> = xids.iter().map(Xid::to_string).collect();
                format!("{name} (transaction {})", xids.join(", "))
            })
            .collect();
        Some(format!(
            "the journal holds committed transactions with branches in resources that are not configured: {}; add those resources to the configuration and start again (or, for a resource lost for good, end its branches with `concord txn resolve XID --commit --forget NAME`)",
            each.join("; ")
        ))
    }

    fn unconfigured(&mut self, name: &str, xid: Xid) {
        self.unconfigured
            .entry(name.to_string())
            .or_default()
            .push(xid);
    }
}

/// What `txn list` shows of one transaction.
#[derive(Clone, Debug)]
pub struct TxnInfo {
    /// The transaction.
    pub xid: Xid,
    /// Its phase, in words.
    pub state: String,
    /// How long since it began (or since recovery found it).
    pub age: Duration,
    /// Its branches: resource name, state in words, last error.
    pub branches: Vec<(String, String, Option<String>)>,
}

/// Branch states in which a branch has nothing left to do.
const BRANCH_DONE: [&str; 3] = ["committed", "rolled back", "read-only"];

impl TxnInfo {
    /// What was decided, in words: `commit`, `rollback`, `none yet`, or `unknown` (in doubt).
    pub fn decision(&self) -> &'static str {
        match self.state.as_str() {
            "committing" | "committing (one phase)" => "commit",
            "rolling back" | "timed out" => "rollback",
            "in doubt" => "unknown",
            "finished" => "done",
            _ => "none yet",
        }
    }

    /// The branches not finished yet: `(resource, state, last error)`.
    pub fn pending(&self) -> impl Iterator<Item = &(String, String, Option<String>)> {
        self.branches
            .iter()
            .filter(|(_, state, _)| !BRANCH_DONE.contains(&state.as_str()))
    }
}

/// One line for an operator: the xid, its phase and decision, and each branch it waits for with
/// that branch's last error (retried by the coordinator), e.g. `n1e1s42 committing (decision:
/// commit) for 61 s; waiting for resource uploads (committing): resource uploads: write …: No
/// space left on device (os error 28); retrying`.
impl std::fmt::Display for TxnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (decision: {}) for {} s",
            self.xid,
            self.state,
            self.decision(),
            self.age.as_secs()
        )?;
        let mut pending = self.pending().peekable();
        if pending.peek().is_none() {
            return Ok(());
        }
        f.write_str("; waiting for ")?;
        for (i, (name, state, error)) in pending.enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "resource {name} ({state})")?;
            if let Some(error) = error {
                write!(f, ": {error}; retrying")?;
            }
        }
        Ok(())
    }
}

/// Tracks the tasks the coordinator spawned and the callers driving a machine, so that shutdown
/// can stop and await them.
#[derive(Default)]
pub struct Tasks {
    running: AtomicUsize,
    idle: Notify,
}

/// One tracked task or caller, counted from creation until drop.
struct Counted(Arc<Tasks>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tasks {
    fn count(self: &Arc<Self>) -> Counted {
        self.running.fetch_add(1, Ordering::AcqRel);
        Counted(Arc::clone(self))
    }

    /// Spawns `future` on `handle` (the coordinator's runtime, so that a caller on a thread of
    /// its own — a `Drop` outside any runtime — can start work too).
    fn spawn<F>(
        self: &Arc<Self>,
        handle: &tokio::runtime::Handle,
        mut stop: watch::Receiver<bool>,
        future: F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let counted = self.count();
        // Owned: counted here, awaited by `Coordinator::shutdown`, stopped by its signal.
        handle.spawn(async move {
            tokio::select! {
                () = future => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            drop(counted);
        });
    }

    /// Waits until no task runs, or `timeout` passes; returns whether none runs.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            if self.running.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.running.load(Ordering::Acquire) == 0;
            }
        }
    }
}

/// A configured resource.
struct Configured {
    /// Its name, shared by every branch in it.
    name: Arc<str>,
    resource: Arc<dyn Resource>,
}

impl Configured {
    fn branch(&self) -> BranchRef {
        BranchRef {
            name: Arc::clone(&self.name),
            resource: Some(Arc::clone(&self.resource)),
        }
    }
}

/// A branch of a transaction: its resource's name and the resource (`None`: not configured,
/// which only recovery meets).
#[derive(Clone)]
struct BranchRef {
    name: Arc<str>,
    resource: Option<Arc<dyn Resource>>,
}

/// An open transaction, before its commit starts.
struct Open {
    started: Instant,
    /// Resources joined, in join order (the branch ids of the machine).
    branches: Vec<BranchRef>,
    timed_out: bool,
}

/// A transaction whose machine runs (phase 1 or 2, or recovery).
struct Running {
    xid: Xid,
    /// The xid's text, for both of its records.
    text: XidText,
    started: Instant,
    branches: Vec<BranchRef>,
    /// Set by an operator's `resolve`: the driver stops at its next step.
    cancelled: AtomicBool,
    /// Stepped by the transaction's driver only; read by `list` and `wait_settled`.
    machine: Mutex<TxnMachine>,
}

impl Running {
    /// Whether its machine still works towards an end: not in doubt (that waits for a restart
    /// or an operator), and not waiting only for branches whose resource the configuration
    /// lacks (they wait for a start that has it; recovery reported them).
    fn is_busy(&self) -> bool {
        let machine = lock(&self.machine);
        if *machine.phase() == Phase::InDoubt {
            return false;
        }
        let mut pending = self
            .branches
            .iter()
            .zip(machine.branches())
            .filter(|(_, b)| {
                !matches!(
                    b.state,
                    BranchState::Committed | BranchState::RolledBack | BranchState::ReadOnly
                )
            })
            .peekable();
        pending.peek().is_none() || pending.any(|(r, _)| r.resource.is_some())
    }
}

/// How many ways the maps of open and running transactions are split.
const SHARDS: usize = 16;

type OpenMap = HashMap<Xid, Open, XidBuildHasher>;
type RunningMap = HashMap<u64, Arc<Running>, XidBuildHasher>;
/// Prepared branches the orphan sweeper found unowned: (resource name, xid).
type Suspects = HashSet<(Arc<str>, Xid)>;

struct Inner {
    config: CoordinatorConfig,
    journal: Journal,
    resources: BTreeMap<String, Configured>,
    seq: AtomicU64,
    /// Open transactions, sharded by sequence number.
    open: Box<[Mutex<OpenMap>]>,
    /// Every running machine, by a number of its own (sharded by it): recovery may run several
    /// machines for one xid (one per resource that holds a branch of it).
    running: Box<[Mutex<RunningMap>]>,
    next_run: AtomicU64,
    tasks: Arc<Tasks>,
    /// Set by shutdown: every task stops.
    stop: watch::Sender<bool>,
    /// Set by shutdown, then every waiter of `stop_waiters` is woken: the callers driving a
    /// machine stop (a lighter signal than `stop`, which costs each of them more to wait on).
    stopping: AtomicBool,
    stop_waiters: Box<[Notify]>,
    handle: tokio::runtime::Handle,
    /// Prepared branches the orphan sweeper has handed to a rollback since open.
    orphans_rolled_back: AtomicU64,
    /// One permit per transaction between its commit request and the end of its phase 2
    /// (`max_unfinished`).
    unfinished: Arc<tokio::sync::Semaphore>,
    /// What bounds the removal of journal segments.
    retention: Retention,
    /// Held from open until every resource has answered `recover` (see
    /// [`Coordinator::sweep_orphans`]): recovery could not see the prepared branches of a
    /// resource it could not ask, so nothing it read may be removed yet.
    startup_pin: Mutex<Option<PinId>>,
    /// The resources that have not answered `recover` since open.
    unanswered: Mutex<HashSet<String>>,
    /// The durable LSN at open: a shutdown writes its `Checkpoint` only after new records.
    opened_at: Lsn,
}

impl Inner {
    /// A shutdown's checkpoint: when anything was written since open, the journal is asked for
    /// a new segment and a `Checkpoint` record is made durable (so the finished records before
    /// it leave the segment being written), then the segments nothing needs are removed. The
    /// next start then reads about what was unfinished, whatever the history. Blocking.
    fn last_checkpoint(&self) -> Result<usize, JournalError> {
        if self.journal.durable_lsn() > self.opened_at {
            self.journal.request_roll(crate::retention::ROLL_BYTES_MIN);
            let marker = CoordRecord::Checkpoint { at_ms: now_ms() };
            self.journal
                .append(self.config.epoch, marker.kind(), &marker.encode())?
                .wait()?;
        }
        self.retention.checkpoint(&self.journal)
    }
}

impl JournalSource for Inner {
    fn journal(&self) -> &Journal {
        &self.journal
    }
}

impl Inner {
    fn open_shard(&self, xid: &Xid) -> MutexGuard<'_, OpenMap> {
        lock(&self.open[(xid.seq % SHARDS as u64) as usize])
    }

    fn running_shard(&self, run: u64) -> MutexGuard<'_, RunningMap> {
        lock(&self.running[(run % SHARDS as u64) as usize])
    }

    fn running(&self) -> Vec<Arc<Running>> {
        self.running
            .iter()
            .flat_map(|shard| lock(shard).values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// The branch of `name`, configured or not.
    fn branch(&self, name: &str) -> BranchRef {
        match self.resources.get(name) {
            Some(configured) => configured.branch(),
            None => BranchRef {
                name: Arc::from(name),
                resource: None,
            },
        }
    }
}

fn shards<M: Default>() -> Box<[Mutex<M>]> {
    (0..SHARDS).map(|_| Mutex::new(M::default())).collect()
}

/// The coordinator: begins transactions, commits them by two-phase commit, recovers at open.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Coordinator {
    /// Opens the coordinator on `journal` with `resources`, runs recovery (see the module docs)
    /// and starts the timeout reaper. Must be called inside a tokio runtime.
    pub async fn open(
        config: CoordinatorConfig,
        journal: Journal,
        resources: Vec<Arc<dyn Resource>>,
    ) -> Result<(Coordinator, RecoveryReport), CoordError> {
        let ledger = read_ledger(&journal)?;
        Coordinator::open_recovered(config, journal, ledger, resources).await
    }

    /// [`Coordinator::open`] with the ledger already read — by [`open_journal`], in the same
    /// pass that opened the journal. `ledger` must hold every record of `journal`.
    pub async fn open_recovered(
        config: CoordinatorConfig,
        journal: Journal,
        ledger: Ledger,
        resources: Vec<Arc<dyn Resource>>,
    ) -> Result<(Coordinator, RecoveryReport), CoordError> {
        let resources: BTreeMap<String, Configured> = resources
            .into_iter()
            .map(|resource| {
                let name = resource.name().to_string();
                let configured = Configured {
                    name: Arc::from(name.as_str()),
                    resource,
                };
                (name, configured)
            })
            .collect();
        let now_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let (stop, _) = watch::channel(false);
        let journal_durable = journal.durable_lsn();
        let unfinished_max = config.max_unfinished.max(1);
        let inner = Arc::new(Inner {
            seq: AtomicU64::new(now_micros.max(ledger.max_seq(config.node) + 1)),
            config,
            journal,
            resources,
            open: shards(),
            running: shards(),
            next_run: AtomicU64::new(0),
            handle: tokio::runtime::Handle::current(),
            tasks: Arc::new(Tasks::default()),
            stop,
            stopping: AtomicBool::new(false),
            stop_waiters: (0..SHARDS).map(|_| Notify::new()).collect(),
            orphans_rolled_back: AtomicU64::new(0),
            unfinished: Arc::new(tokio::sync::Semaphore::new(unfinished_max)),
            retention: Retention::default(),
            startup_pin: Mutex::new(None),
            unanswered: Mutex::new(HashSet::new()),
            opened_at: journal_durable,
        });
        let coordinator = Coordinator { inner };
        let report = coordinator.recover(&ledger).await;
        coordinator.start_reaper();
        coordinator.start_sweeper();
        coordinator.start_checkpointer();
        Ok((coordinator, report))
    }

    /// What bounds the removal of journal segments: a standby holds its retention floor here.
    pub fn retention(&self) -> &Retention {
        &self.inner.retention
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// The tasks the coordinator runs (phase 2, recovery).
    pub fn tasks(&self) -> &Tasks {
        &self.inner.tasks
    }

    /// The configured resource of that name.
    pub fn resource(&self, name: &str) -> Result<&Arc<dyn Resource>, CoordError> {
        self.configured(name).map(|c| &c.resource)
    }

    fn configured(&self, name: &str) -> Result<&Configured, CoordError> {
        self.inner
            .resources
            .get(name)
            .ok_or_else(|| CoordError::UnknownResource {
                name: name.to_string(),
                configured: self
                    .inner
                    .resources
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Begins a transaction.
    pub fn begin(&self) -> Xid {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let xid = Xid {
            node: self.inner.config.node,
            epoch: self.inner.config.epoch,
            seq,
        };
        let open = Open {
            started: Instant::now(),
            branches: Vec::new(),
            timed_out: false,
        };
        self.inner.open_shard(&xid).insert(xid, open);
        xid
    }

    /// Joins `resource` to the transaction (once; later calls return the same resource).
    pub async fn join(&self, xid: &Xid, resource: &str) -> Result<Arc<dyn Resource>, CoordError> {
        let configured = self.configured(resource)?;
        let first = {
            let mut open = self.inner.open_shard(xid);
            let txn = self.open_txn(&mut open, xid)?;
            let first = !txn.branches.iter().any(|b| *b.name == *resource);
            if first {
                txn.branches.push(configured.branch());
            }
            first
        };
        if first && let Err(e) = configured.resource.begin(xid).await {
            if let Some(txn) = self.inner.open_shard(xid).get_mut(xid) {
                txn.branches.retain(|b| *b.name != *resource);
            }
            return Err(e.into());
        }
        // The transaction may have timed out (and its branches been rolled back) while `begin`
        // ran: roll back the branch just begun too, so it holds nothing.
        if first && let Err(ended) = self.check_open(xid) {
            let open = Open {
                started: Instant::now(),
                branches: vec![configured.branch()],
                timed_out: true,
            };
            self.start_rollback(
                xid,
                open,
                "the branch began after its transaction timed out",
            );
            return Err(ended);
        }
        Ok(Arc::clone(&configured.resource))
    }

    /// Checks that the transaction is open (not timed out); for branch handles before each use.
    pub fn check_open(&self, xid: &Xid) -> Result<(), CoordError> {
        let mut open = self.inner.open_shard(xid);
        self.open_txn(&mut open, xid).map(|_| ())
    }

    fn open_txn<'a>(&self, open: &'a mut OpenMap, xid: &Xid) -> Result<&'a mut Open, CoordError> {
        match open.get_mut(xid) {
            Some(txn) if txn.timed_out => Err(CoordError::TimedOut {
                xid: *xid,
                timeout_ms: self.inner.config.txn_timeout_ms,
            }),
            Some(txn) => Ok(txn),
            None => Err(CoordError::NotActive {
                xid: *xid,
                state: "not open".into(),
            }),
        }
    }

    /// Commits the transaction: returns once the outcome is known (the decision is durable, or
    /// the transaction rolled back). Phase 2 goes on in the background.
    pub async fn commit(&self, xid: &Xid) -> Result<Outcome, CoordError> {
        let timeout = Duration::from_millis(self.inner.config.txn_timeout_ms);
        let permit = match Arc::clone(&self.inner.unfinished).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let waited = tokio::time::timeout(
                    timeout,
                    Arc::clone(&self.inner.unfinished).acquire_owned(),
                )
                .await;
                match waited {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(CoordError::ShuttingDown),
                    Err(_) => {
                        return Err(CoordError::Refused(format!(
                            "{} transactions are still in phase 2 (max_unfinished) and none finished within {} ms: a resource is slow or down (see `concord txn list`)",
                            self.inner.config.max_unfinished.max(1),
                            self.inner.config.txn_timeout_ms
                        )));
                    }
                }
            }
        };
        let mut driver = {
            let mut open = self.inner.open_shard(xid);
            match open.remove(xid) {
                Some(o) if !o.timed_out && o.started.elapsed() > timeout => {
                    drop(open);
                    // Past its deadline though the reaper has not run yet: the same as timed out.
                    self.start_rollback(xid, o, "the transaction timed out");
                    return Err(CoordError::TimedOut {
                        xid: *xid,
                        timeout_ms: self.inner.config.txn_timeout_ms,
                    });
                }
                Some(o) if o.timed_out => {
                    return Err(CoordError::TimedOut {
                        xid: *xid,
                        timeout_ms: self.inner.config.txn_timeout_ms,
                    });
                }
                // Registered as running before the open entry's lock is released, so that
                // `resolve` finds the transaction in one map or the other at every moment.
                Some(o) => self.register(*xid, o.branches, o.started),
                None => {
                    return Err(CoordError::NotActive {
                        xid: *xid,
                        state: "not open".into(),
                    });
                }
            }
        };
        driver.permit = Some(permit);
        let span = tracing::info_span!("txn", xid = %xid);
        self.run_inline(driver, Event::CommitRequested)
            .instrument(span)
            .await
    }

    /// Rolls the transaction back (an open one; a transaction already committing is not touched).
    pub async fn rollback(&self, xid: &Xid, reason: &str) -> Result<Outcome, CoordError> {
        let driver = {
            let mut open = self.inner.open_shard(xid);
            let Some(o) = open.remove(xid) else {
                return Err(CoordError::NotActive {
                    xid: *xid,
                    state: "not open".into(),
                });
            };
            self.register(*xid, o.branches, o.started)
        };
        let event = Event::RollbackRequested {
            reason: reason.to_string(),
        };
        let span = tracing::info_span!("txn", xid = %xid);
        self.run_inline(driver, event).instrument(span).await
    }

    /// Rolls back `open` in a task of its own (nobody waits for the outcome).
    fn start_rollback(&self, xid: &Xid, open: Open, reason: &str) {
        let mut driver = self.register(*xid, open.branches, open.started);
        driver.step(Event::RollbackRequested {
            reason: reason.to_string(),
        });
        driver.spawn(tracing::info_span!("txn", xid = %xid));
    }

    /// Rolls back an open transaction whose handle was dropped without commit or rollback, in
    /// the background (dropping cannot wait). Does nothing to a transaction that is not open.
    pub fn abandon(&self, xid: &Xid) {
        let Some(open) = self.inner.open_shard(xid).remove(xid) else {
            return;
        };
        if !open.timed_out {
            self.start_rollback(xid, open, "the transaction handle was dropped");
        }
    }

    /// A new machine for `xid` with `branches`, listed as running; see [`Coordinator::register_machine`].
    /// A lone branch of a resource that offers it commits in one phase.
    fn register(&self, xid: Xid, branches: Vec<BranchRef>, started: Instant) -> Driver {
        let policy = self.inner.config.retry;
        let machine = match branches.as_slice() {
            [only]
                if self.inner.config.one_phase
                    && only
                        .resource
                        .as_ref()
                        .is_some_and(|r| r.supports_one_phase()) =>
            {
                TxnMachine::new_one_phase(xid, policy)
            }
            _ => TxnMachine::new(xid, branches.len(), policy),
        };
        self.register_machine(machine, branches, started)
    }

    /// Lists `machine` as running and returns its driver, which nothing polls yet.
    fn register_machine(
        &self,
        machine: TxnMachine,
        branches: Vec<BranchRef>,
        started: Instant,
    ) -> Driver {
        let run = self.inner.next_run.fetch_add(1, Ordering::Relaxed);
        let xid = machine.xid();
        let running = Arc::new(Running {
            xid,
            text: xid.text(),
            cancelled: AtomicBool::new(false),
            started,
            branches,
            machine: Mutex::new(machine),
        });
        self.inner
            .running_shard(run)
            .insert(run, Arc::clone(&running));
        Driver {
            inner: Arc::clone(&self.inner),
            run,
            running,
            fresh: VecDeque::new(),
            calls: None,
            decision: None,
            pin: None,
            permit: None,
            ready: VecDeque::new(),
            commands: Vec::new(),
            outcome: None,
        }
    }

    /// Feeds `first` to the driver's machine and drives it in the caller's task until the outcome
    /// is known; then phase-2 calls that finish at once are done, and the rest goes on in a task
    /// (see the module docs).
    async fn run_inline(&self, mut driver: Driver, first: Event) -> Result<Outcome, CoordError> {
        // Made before the flag is read: a shutdown after that wakes it.
        let stopped = self.inner.stop_waiters[(driver.run % SHARDS as u64) as usize].notified();
        driver.step(first);
        let mut inline = Inline {
            driver: Some(driver),
            _counted: self.inner.tasks.count(),
        };
        let result = if self.inner.stopping.load(Ordering::SeqCst) {
            Err(CoordError::ShuttingDown)
        } else {
            tokio::select! {
                biased;
                result = poll_fn(|cx| inline.poll_outcome(cx)) => result,
                () = stopped => Err(CoordError::ShuttingDown),
            }
        };
        if result.is_ok() {
            inline.settle();
        }
        result
    }

    /// Waits (at most `timeout`) until no transaction is being committed, rolled back or
    /// recovered — phase 2 and recovery run in the background — and returns whether that
    /// happened. Transactions in doubt do not count: they wait for a restart or an operator.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = self
                .inner
                .running
                .iter()
                .any(|shard| lock(shard).values().any(|r| r.is_busy()));
            if !busy {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The transactions that have not finished, one readable line each ([`TxnInfo`]'s
    /// `Display`), for a caller that gives up waiting: what each waits for, and why.
    pub fn pending_lines(&self) -> Vec<String> {
        self.list().iter().map(TxnInfo::to_string).collect()
    }

    /// Every open, committing, rolling-back or in-doubt transaction.
    pub fn list(&self) -> Vec<TxnInfo> {
        let mut out = Vec::new();
        for shard in self.inner.open.iter() {
            for (xid, o) in lock(shard).iter() {
                let state = if o.timed_out { "timed out" } else { "open" };
                let branches = o
                    .branches
                    .iter()
                    .map(|b| (b.name.to_string(), "active".to_string(), None))
                    .collect();
                out.push(TxnInfo {
                    xid: *xid,
                    state: state.into(),
                    age: o.started.elapsed(),
                    branches,
                });
            }
        }
        for r in self.inner.running() {
            let machine = lock(&r.machine);
            let branches = r
                .branches
                .iter()
                .zip(machine.branches())
                .map(|(n, b)| {
                    (
                        n.name.to_string(),
                        b.state.name().to_string(),
                        b.last_error.clone(),
                    )
                })
                .collect();
            let state = phase_name(machine.phase());
            out.push(TxnInfo {
                xid: r.xid,
                state: state.into(),
                age: r.started.elapsed(),
                branches,
            });
        }
        out.sort_by_key(|t| t.xid);
        out
    }

    /// Stops every task (phase 2 and recovery resume at the next open) and closes the journal,
    /// whatever other handles on this coordinator (a caller's transaction) still live: every
    /// record appended so far is durable when it returns `true`, the journal's directory is free
    /// for another process, and a later commit fails. The resources stay open until the last
    /// handle is dropped. Returns whether all of it happened within `timeout`; if not, the
    /// journal goes on closing in the background.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let _ = self.inner.stop.send(true);
        self.inner.stopping.store(true, Ordering::SeqCst);
        for waiters in self.inner.stop_waiters.iter() {
            waiters.notify_waiters();
        }
        let idle = self.inner.tasks.wait_idle(timeout).await;
        // Closing joins the journal's flusher, which writes and syncs: not on a runtime thread.
        let inner = Arc::clone(&self.inner);
        let closing = tokio::task::spawn_blocking(move || {
            if let Err(e) = inner.last_checkpoint() {
                tracing::warn!(error = %e, "checkpoint the journal at shutdown");
            }
            inner.journal.close()
        });
        match tokio::time::timeout_at(deadline, closing).await {
            Ok(Ok(Ok(()))) => idle,
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "the journal did not close cleanly");
                false
            }
            // The runtime is shutting down: the journal closes when it is dropped.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "closing the journal was cancelled");
                false
            }
            Err(_) => {
                tracing::warn!(
                    "the journal did not close within {} ms; it goes on closing",
                    timeout.as_millis()
                );
                false
            }
        }
    }

    /// Starts the checkpointer (unless `checkpoint_ms` is 0): a tracked task that removes the
    /// journal segments nothing needs any more (see [`crate::retention`]) every `checkpoint_ms`,
    /// on the blocking pool. Shutdown stops it (and checkpoints once more).
    fn start_checkpointer(&self) {
        let interval_ms = self.inner.config.checkpoint_ms;
        if interval_ms == 0 {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let tick = Duration::from_millis(interval_ms);
        let collect_every = match self.inner.config.blob_collect_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        self.inner.tasks.spawn(
            &self.inner.handle,
            self.inner.stop.subscribe(),
            async move {
                let mut collected = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let journal_side = Arc::clone(&inner);
                    let checkpoint = tokio::task::spawn_blocking(move || {
                        journal_side.retention.checkpoint(&journal_side.journal)
                    });
                    match checkpoint.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(JournalError::Closed)) | Err(_) => return,
                        Ok(Err(e)) => tracing::error!(error = %e, "checkpoint the journal"),
                    }
                    if collect_every.is_some_and(|every| collected.elapsed() >= every) {
                        collected = tokio::time::Instant::now();
                        Coordinator { inner }.collect_blobs().await;
                    }
                }
            },
        );
    }

    /// Asks every resource to remove the blobs nothing needs any more (see
    /// [`crate::retention`]); returns how many each removed. A resource that fails is logged
    /// and skipped (its blobs stay until the next round).
    pub async fn collect_blobs(&self) -> BTreeMap<String, u64> {
        let mut removed = BTreeMap::new();
        for (name, c) in &self.inner.resources {
            let source: Arc<dyn JournalSource> = Arc::clone(&self.inner) as _;
            let retained = JournalBlobs::new(source, Arc::clone(&c.resource));
            match c.resource.collect_blobs(&retained).await {
                Ok(done) => {
                    if done.removed > 0 {
                        tracing::debug!(resource = %name, removed = done.removed, kept = done.kept, "collected blobs");
                    }
                    removed.insert(name.clone(), done.removed);
                }
                Err(e) => tracing::warn!(resource = %name, error = %e, "collect blobs"),
            }
        }
        removed
    }

    fn start_reaper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let tick = Duration::from_millis((self.inner.config.txn_timeout_ms / 4).clamp(10, 1_000));
        self.inner.tasks.spawn(
            &self.inner.handle,
            self.inner.stop.subscribe(),
            async move {
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { return };
                    Coordinator { inner }.reap_timed_out().await;
                }
            },
        );
    }

    /// Rolls back every transaction open longer than its timeout, through a rollback machine
    /// (which retries until every branch answers). The transaction stays listed as timed out,
    /// with no branches, until its caller hears of it.
    async fn reap_timed_out(&self) {
        let limit = Duration::from_millis(self.inner.config.txn_timeout_ms);
        let mut expired: Vec<(Xid, Instant, Vec<BranchRef>)> = Vec::new();
        for shard in self.inner.open.iter() {
            let mut open = lock(shard);
            expired.extend(
                open.iter_mut()
                    .filter(|(_, o)| !o.timed_out && o.started.elapsed() > limit)
                    .map(|(xid, o)| {
                        o.timed_out = true;
                        (*xid, o.started, std::mem::take(&mut o.branches))
                    }),
            );
        }
        for (xid, started, branches) in expired {
            tracing::warn!(xid = %xid, "transaction open longer than {} ms; rolling back", limit.as_millis());
            let open = Open {
                started,
                branches,
                timed_out: true,
            };
            self.start_rollback(&xid, open, "the transaction timed out");
        }
    }

    /// How many prepared branches the orphan sweeper has found and handed to a rollback since
    /// open (each is also reported with a warning naming its resource and xid).
    pub fn orphans_rolled_back(&self) -> u64 {
        self.inner.orphans_rolled_back.load(Ordering::Relaxed)
    }

    /// Starts the orphan sweeper (unless `orphan_sweep_ms` is 0): a tracked task that runs
    /// [`Coordinator::sweep_orphans`] every `orphan_sweep_ms`, carrying the branches found
    /// unowned from one sweep to the next. Shutdown stops it.
    fn start_sweeper(&self) {
        let interval_ms = self.inner.config.orphan_sweep_ms;
        if interval_ms == 0 {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let tick = Duration::from_millis(interval_ms);
        self.inner.tasks.spawn(
            &self.inner.handle,
            self.inner.stop.subscribe(),
            async move {
                let mut suspects = Suspects::new();
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { return };
                    suspects = Coordinator { inner }.sweep_orphans(&suspects).await;
                }
            },
        );
    }

    /// One sweep: lists every resource's prepared branches, commits those of this node whose
    /// transaction the journal says committed (no machine drives them), rolls back those that
    /// were unowned in the previous sweep (`suspects`), still are and have no decision, and
    /// returns the branches unowned now without a decision (the next sweep's suspects).
    ///
    /// Why a branch rolled back here never belongs to a transaction that may commit:
    ///
    /// 1. A branch is prepared only by a machine in the running map: `commit` moves the
    ///    transaction from the open map to the running map under the open shard's lock, and
    ///    prepares after that. A machine leaves the running map when it is finished (every
    ///    branch acknowledged commit or rollback, so none of its branches is still prepared) or
    ///    when an operator's `resolve` cancels it.
    /// 2. A decided transaction (durable `Commit`) keeps its machine in the running map until
    ///    it is finished, through every phase-2 retry and while in doubt; recovery at open puts
    ///    one there for every `Commit` without `End`. So a branch listed as prepared whose
    ///    machine is not running belongs to no transaction with a decision — except when a
    ///    resource brought one back (restored from a backup) or an operator's `resolve` could
    ///    not reach it. Step 4 covers those.
    /// 3. Ownership is checked after `recover` answered: a transaction that finished between
    ///    the two looks unowned in this sweep, but its branch is resolved, so the next sweep's
    ///    `recover` does not list it again (xids never repeat), and only a branch unowned in two
    ///    sweeps in a row is rolled back.
    /// 4. Whenever a branch is unowned, the journal is read: a branch whose xid has a decided
    ///    commit, or an operator's commit, is committed by a machine of its own that pins the
    ///    decision until it is done (a heuristic hazard when the transaction had ended), never
    ///    rolled back. No new decision can appear for an unowned xid, since only a running
    ///    machine appends one.
    ///
    /// When every resource has answered `recover` since open (at open or in a sweep), the
    /// startup pin goes: what recovery could not ask a resource at open, a sweep has handled.
    async fn sweep_orphans(&self, suspects: &Suspects) -> Suspects {
        let (unowned, all_answered) = self.unowned_prepared().await;
        if unowned.is_empty() {
            self.release_startup_pin(all_answered);
            return unowned;
        }
        let ledger = match read_ledger(&self.inner.journal) {
            Ok(ledger) => ledger,
            Err(e) => {
                tracing::error!(error = %e, "orphan sweep: read the journal; nothing rolled back");
                return unowned;
            }
        };
        let mut next = Suspects::new();
        for (name, xid) in unowned {
            if ledger.verdict(&xid) == Verdict::OnePhaseOpen {
                continue;
            }
            if ledger.must_commit(&xid) {
                self.commit_undriven(&ledger, &name, xid);
                continue;
            }
            if suspects.contains(&(Arc::clone(&name), xid)) {
                self.roll_back_orphan(&name, xid);
            } else {
                next.insert((name, xid));
            }
        }
        self.release_startup_pin(all_answered);
        next
    }

    /// A prepared branch of a decided transaction that nothing drives: committed by a machine
    /// that pins the decision.
    fn commit_undriven(&self, ledger: &Ledger, name: &str, xid: Xid) {
        let verdict = ledger.verdict(&xid);
        if verdict == Verdict::Committed {
            tracing::error!(resource = %name, xid = %xid, "heuristic hazard: a prepared branch of a transaction that ended committed; committing it again (was the resource restored from a backup?)");
        } else {
            tracing::warn!(resource = %name, xid = %xid, "a prepared branch of a committed transaction that no machine drives; committing it");
        }
        let pin = ledger.entry(&xid).map(|e| e.first_lsn);
        let lsn = pin.unwrap_or(Lsn::ZERO);
        let (machine, commands) =
            TxnMachine::recovered_branch_commit(xid, lsn, self.inner.config.retry);
        self.drive_recovered(machine, &[name.to_string()], commands, pin);
    }

    /// Rolls back an orphan (see [`Coordinator::sweep_orphans`]) by a machine of its own.
    fn roll_back_orphan(&self, name: &Arc<str>, xid: Xid) {
        tracing::warn!(resource = %name, xid = %xid, "rolling back an orphan: a prepared branch of this node that no transaction owns and the journal has no decision for");
        self.inner
            .orphans_rolled_back
            .fetch_add(1, Ordering::Relaxed);
        let (machine, commands) = TxnMachine::recovered_orphan(xid, self.inner.config.retry);
        let mut driver =
            self.register_machine(machine, vec![self.inner.branch(name)], Instant::now());
        driver.commands = commands;
        driver.spawn(tracing::info_span!("orphan", xid = %xid, resource = %name));
    }

    /// Lets the startup pin go once every resource has answered `recover` since open.
    fn release_startup_pin(&self, all_answered: bool) {
        if !all_answered {
            return;
        }
        if let Some(pin) = lock(&self.inner.startup_pin).take() {
            self.inner.retention.pins.unpin(pin);
            tracing::info!(
                "every resource has listed its prepared branches since open; the journal may be checkpointed past what recovery read"
            );
        }
    }

    /// The prepared branches of this node that no open or running transaction owns, read from
    /// every resource's `recover`, and whether every resource has answered since open. A
    /// resource whose `recover` fails is skipped (its branches must then be found unowned twice
    /// again).
    async fn unowned_prepared(&self) -> (Suspects, bool) {
        let node = self.inner.config.node;
        let mut found = Suspects::new();
        for (name, configured) in &self.inner.resources {
            match self
                .recover_within_deadline(name, &configured.resource)
                .await
            {
                Ok(xids) => {
                    lock(&self.inner.unanswered).remove(name);
                    found.extend(
                        xids.into_iter()
                            .filter(|xid| xid.node == node)
                            .map(|xid| (Arc::clone(&configured.name), xid)),
                    )
                }
                Err(e) => {
                    tracing::warn!(resource = %name, error = %e, "orphan sweep: list prepared branches");
                }
            }
        }
        let all_answered = lock(&self.inner.unanswered).is_empty();
        if found.is_empty() {
            return (found, all_answered);
        }
        let running: HashSet<Xid> = self.inner.running().iter().map(|r| r.xid).collect();
        found.retain(|(_, xid)| {
            !self.inner.open_shard(xid).contains_key(xid) && !running.contains(xid)
        });
        (found, all_answered)
    }

    /// Drops a timed-out transaction's record once its caller has been told (commit or rollback).
    pub fn forget(&self, xid: &Xid) {
        self.inner.open_shard(xid).remove(xid);
    }

    /// Records an operator's decision for a transaction that cannot finish by itself (a
    /// resource lost for good) and carries it out as far as the resources allow; see
    /// [`crate::resolve`] for the rules and what the report says. A transaction this
    /// coordinator is still running phase 1 for is refused; a machine driving its phase 2 is
    /// stopped first (the resolution takes over; a branch it cannot reach is driven again at
    /// the next start).
    pub async fn resolve(&self, request: &ResolveRequest) -> Result<ResolveReport, CoordError> {
        let xid = &request.xid;
        if self.inner.open_shard(xid).contains_key(xid) || self.deciding(xid) {
            return Err(CoordError::Refused(format!(
                "transaction {xid} is still being prepared or decided by this coordinator; wait for its outcome"
            )));
        }
        crate::resolve::check(&self.inner.journal, request)?;
        let cancel = || {
            for r in self.inner.running().iter().filter(|r| r.xid == *xid) {
                r.cancelled.store(true, Ordering::Release);
            }
        };
        let resources: BTreeMap<String, Arc<dyn Resource>> = self
            .inner
            .resources
            .iter()
            .map(|(name, c)| (name.clone(), Arc::clone(&c.resource)))
            .collect();
        let epoch = self.inner.config.epoch;
        let deadline = Duration::from_millis(self.inner.config.call_timeout_ms);
        let report = crate::resolve::resolve(
            &self.inner.journal,
            epoch,
            &resources,
            request,
            deadline,
            &cancel,
        )
        .await?;
        if report.finished {
            self.inner.retention.pins.unpin_xid(xid);
        } else if request.commit {
            self.drive_unreached(&report);
        }
        Ok(report)
    }

    /// After a resolution that could not reach every branch of a committed transaction: the
    /// configured ones are driven again, as recovery would (an unconfigured one waits for a
    /// start that has it, or for `--forget`). One machine with the `End` when every unreached
    /// branch is configured; otherwise one per branch, without it.
    fn drive_unreached(&self, report: &ResolveReport) {
        let Some(lsn) = report.decision_lsn else {
            return;
        };
        let unreached: Vec<&String> = report
            .branches
            .iter()
            .filter(|(_, o)| !o.is_done())
            .map(|(n, _)| n)
            .collect();
        let configured: Vec<String> = unreached
            .iter()
            .filter(|n| self.inner.resources.contains_key(n.as_str()))
            .map(|n| n.to_string())
            .collect();
        let retry = self.inner.config.retry;
        if configured.len() == unreached.len() {
            let (machine, commands) =
                TxnMachine::recovered_commit(report.xid, lsn, configured.len(), retry);
            self.drive_recovered(machine, &configured, commands, Some(lsn));
            return;
        }
        for name in configured {
            let (machine, commands) = TxnMachine::recovered_branch_commit(report.xid, lsn, retry);
            self.drive_recovered(machine, &[name], commands, Some(lsn));
        }
    }

    /// Whether a machine of `xid` is preparing or deciding.
    fn deciding(&self, xid: &Xid) -> bool {
        self.inner
            .running()
            .iter()
            .filter(|r| r.xid == *xid)
            .any(|r| {
                matches!(
                    lock(&r.machine).phase(),
                    Phase::Active | Phase::Preparing | Phase::Deciding | Phase::OnePhase
                )
            })
    }

    async fn recover(&self, ledger: &Ledger) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let prepared = self.prepared_everywhere(&mut report).await;
        let mut driven: HashSet<(String, Xid)> = HashSet::new();
        for (xid, lsn, names) in ledger.open_commits() {
            self.recover_commit(xid, lsn, &names, &mut report);
            driven.extend(names.into_iter().map(|n| (n, xid)));
        }
        for (xid, lsn, name, redo) in ledger.open_one_phase() {
            self.recover_one_phase(xid, lsn, name, redo, &mut report);
        }
        for (name, xids) in prepared {
            for xid in xids {
                if !driven.contains(&(name.clone(), xid)) {
                    self.recover_prepared(ledger, &name, xid, &mut report);
                }
            }
        }
        if !report.redriven.is_empty() || !report.rolled_back.is_empty() || !report.asked.is_empty()
        {
            tracing::info!(
                redriven = report.redriven.len(),
                rolled_back = report.rolled_back.len(),
                asked = report.asked.len(),
                "recovery started phase 2 of decided transactions, rollback of undecided branches and the questions about one-phase commits"
            );
        }
        for problem in &report.problems {
            tracing::error!("{problem}");
        }
        report
    }

    /// Every configured resource's prepared branches; a resource whose `recover` fails is a
    /// problem of the report (its branches are found by the sweeper or the next start).
    async fn prepared_everywhere(&self, report: &mut RecoveryReport) -> BTreeMap<String, Vec<Xid>> {
        let mut prepared = BTreeMap::new();
        for (name, c) in &self.inner.resources {
            match self.recover_within_deadline(name, &c.resource).await {
                Ok(xids) => {
                    prepared.insert(name.clone(), xids);
                }
                Err(e) => {
                    lock(&self.inner.unanswered).insert(name.clone());
                    report.problems.push(format!(
                        "resource {name}: recover failed: {e}; the journal is kept from LSN {} on until it answers (the orphan sweeper asks again)",
                        self.inner.journal.oldest_lsn()
                    ));
                }
            }
        }
        if !lock(&self.inner.unanswered).is_empty() {
            let oldest = self.inner.journal.oldest_lsn();
            let nobody = Xid {
                node: 0,
                epoch: Epoch(0),
                seq: 0,
            };
            let pin = self.inner.retention.pins.pin(nobody, oldest);
            *lock(&self.inner.startup_pin) = Some(pin);
        }
        prepared
    }

    /// A resource's prepared branches, asked within `call_timeout_ms`.
    async fn recover_within_deadline(
        &self,
        name: &str,
        resource: &Arc<dyn Resource>,
    ) -> Result<Vec<Xid>, ResourceError> {
        let deadline = Duration::from_millis(self.inner.config.call_timeout_ms);
        within_deadline((deadline, name.to_string(), "recover"), resource.recover()).await
    }

    /// A `Commit` without `End`: phase 2 again for the writers no operator forgot; with none
    /// left, the `End` the operator's last `Forget` allowed.
    fn recover_commit(&self, xid: Xid, lsn: Lsn, names: &[String], report: &mut RecoveryReport) {
        if names.is_empty() {
            self.append_end_nowait(&xid);
            return;
        }
        for missing in names
            .iter()
            .filter(|n| !self.inner.resources.contains_key(*n))
        {
            report.problems.push(format!(
                "transaction {xid} committed with a branch in resource {missing:?}, which is not configured; configure it, or end the branch with `concord txn resolve {xid} --commit --forget {missing}` if it is lost for good"
            ));
            report.unconfigured(missing, xid);
        }
        let (machine, commands) =
            TxnMachine::recovered_commit(xid, lsn, names.len(), self.inner.config.retry);
        self.drive_recovered(machine, names, commands, Some(lsn));
        report.redriven.push(xid);
    }

    /// A `OnePhase` record with neither `End` nor `Abort`: its resource is asked.
    fn recover_one_phase(
        &self,
        xid: Xid,
        lsn: Lsn,
        name: &str,
        redo: &[u8],
        report: &mut RecoveryReport,
    ) {
        if !self.inner.resources.contains_key(name) {
            report.problems.push(format!(
                "transaction {xid} committed in one phase in resource {name:?}, which is not configured; configure it so that concord can learn the outcome"
            ));
            report.unconfigured(name, xid);
            // Nothing drives it in this process: its record stays until a start that can.
            self.inner.retention.pins.pin(xid, lsn);
            return;
        }
        let (machine, commands) =
            TxnMachine::recovered_one_phase(xid, lsn, redo.to_vec(), self.inner.config.retry);
        self.drive_recovered(machine, &[name.to_string()], commands, Some(lsn));
        report.asked.push(xid);
    }

    /// A prepared branch no open decision drives. It is rolled back only when its xid has no
    /// durable commit and no operator's commit (presumed abort). A branch of a transaction the
    /// journal says committed — ended, or decided without this resource among its writers — is
    /// committed again and reported as a heuristic hazard: something (a database restored from
    /// a backup, failed over to an asynchronous replica) brought back a branch whose commit was
    /// already carried out once.
    fn recover_prepared(&self, ledger: &Ledger, name: &str, xid: Xid, report: &mut RecoveryReport) {
        let verdict = ledger.verdict(&xid);
        if verdict == Verdict::OnePhaseOpen {
            return;
        }
        let names = [name.to_string()];
        if ledger.must_commit(&xid) {
            if verdict.is_commit() {
                let hazard = format!(
                    "heuristic hazard: resource {name} holds a prepared branch of transaction {xid}, which the journal says is {}; committing it again (was the resource restored from a backup or failed over?)",
                    verdict.describe()
                );
                tracing::error!(resource = %name, xid = %xid, "{hazard}");
                report.hazards.push(hazard);
            }
            let entry = ledger.entry(&xid);
            let lsn = entry
                .and_then(|e| e.decision.as_ref())
                .map_or(Lsn::ZERO, |d| d.lsn());
            let pin = entry.map(|e| e.first_lsn);
            let (machine, commands) =
                TxnMachine::recovered_branch_commit(xid, lsn, self.inner.config.retry);
            self.drive_recovered(machine, &names, commands, pin);
            report.recommitted.push((name.to_string(), xid));
            return;
        }
        let (machine, commands) = TxnMachine::recovered_orphan(xid, self.inner.config.retry);
        self.drive_recovered(machine, &names, commands, None);
        report.rolled_back.push((name.to_string(), xid));
    }

    /// Appends an `End` without waiting for it.
    fn append_end_nowait(&self, xid: &Xid) {
        let end = record::encode_end(&xid.text());
        let epoch = self.inner.config.epoch;
        if let Err(e) = self.inner.journal.append_nowait(epoch, record::END, &end) {
            log_unwritten(&e, "End");
        }
    }

    /// Drives a machine recovery made; `pin`: the decision record it pins until finished.
    fn drive_recovered(
        &self,
        machine: TxnMachine,
        names: &[String],
        commands: Vec<Command>,
        pin: Option<Lsn>,
    ) {
        let xid = machine.xid();
        let branches = names.iter().map(|n| self.inner.branch(n)).collect();
        let mut driver = self.register_machine(machine, branches, Instant::now());
        driver.commands = commands;
        driver.pin = pin.map(|lsn| self.inner.retention.pins.pin(xid, lsn));
        driver.spawn(tracing::info_span!("recover", xid = %xid));
    }
}

/// The error of a call to a branch whose resource the configuration lacks (only recovery meets
/// one).
const NOT_CONFIGURED: &str = "not in the configuration; add it (concord.toml) and start again so that this branch can finish";

/// Milliseconds since the Unix epoch (0 before it), for the records' `at_ms`.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Active => "open",
        Phase::Preparing => "preparing",
        Phase::Deciding => "deciding",
        Phase::Committing => "committing",
        Phase::OnePhase => "committing (one phase)",
        Phase::RollingBack => "rolling back",
        Phase::InDoubt => "in doubt",
        Phase::Finished => "finished",
    }
}

/// Runs one transaction's machine; see the module docs.
struct Driver {
    inner: Arc<Inner>,
    /// This machine's key in the running map.
    run: u64,
    running: Arc<Running>,
    /// Commands the machine asked for, not yet carried out.
    commands: Vec<Command>,
    /// Calls started and not yet polled.
    fresh: VecDeque<Call>,
    /// Calls polled and not finished (created when the first one is needed).
    calls: Option<FuturesUnordered<Call>>,
    /// The decision record, once queued in the journal, until it is durable.
    decision: Option<Appending>,
    /// The commit's place among the unfinished transactions, given back when the driver is
    /// dropped (the machine finished, or shutdown stopped it).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Events known without waiting: calls finished at their first poll, a branch of a resource
    /// not configured, a decision the journal refused to queue.
    ready: VecDeque<Event>,
    /// The answer for the caller, once the machine gave it.
    outcome: Option<Outcome>,
    /// This driver's pin of its transaction's decision record (see [`crate::retention`]):
    /// from the decision's append (or recovery) until the machine is finished.
    pin: Option<PinId>,
}

/// A command in progress: it yields the event that reports its result.
type Call = Pin<Box<dyn Future<Output = Event> + Send>>;

/// How far [`Driver::drive`] got.
enum Progress {
    /// The machine answered the caller ([`Driver::outcome`]); the driver stopped there.
    Answered,
    /// Every command is carried out and no event is ready: it waits for a call, a timer or the
    /// decision (the context's waker is registered with each).
    Waiting,
    /// Nothing is left to wait for (the machine is finished or in doubt, or an operator
    /// cancelled it); the driver must not be polled again.
    Done,
}

impl Driver {
    fn step(&mut self, event: Event) {
        lock(&self.running.machine).on_into(event, &mut self.commands);
    }

    /// Carries out the machine's commands and feeds it every event that is ready, until none
    /// is; with `stop_at_answer`, stops as soon as the machine has answered the caller.
    fn drive(&mut self, cx: &mut Context<'_>, stop_at_answer: bool) -> Progress {
        loop {
            let mut commands = std::mem::take(&mut self.commands);
            for command in commands.drain(..) {
                self.execute(command);
            }
            self.commands = commands;
            if stop_at_answer && self.outcome.is_some() {
                return Progress::Answered;
            }
            let event = match self.poll_event(cx) {
                Poll::Ready(Some(event)) => event,
                Poll::Ready(None) => return Progress::Done,
                Poll::Pending => return Progress::Waiting,
            };
            if self.running.cancelled.load(Ordering::Acquire) {
                tracing::info!(xid = %self.running.xid, "stopped driving: an operator resolved the transaction");
                return Progress::Done;
            }
            self.step(event);
        }
    }

    /// The next event: of a call that finished at its first poll, of the decision, of a call
    /// that was waited for. `None` when nothing is left to wait for.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if let Some(event) = self.ready.pop_front() {
            return Poll::Ready(Some(event));
        }
        while let Some(mut call) = self.fresh.pop_front() {
            match call.as_mut().poll(cx) {
                Poll::Ready(event) => return Poll::Ready(Some(event)),
                Poll::Pending => self
                    .calls
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(call),
            }
        }
        if let Some(appending) = &mut self.decision
            && let Poll::Ready(result) = Pin::new(appending).poll(cx)
        {
            self.decision = None;
            return Poll::Ready(Some(match result {
                Ok(lsn) => {
                    failpoint::hit("decision_durable");
                    if let Some(pin) = self.pin {
                        self.inner.retention.pins.narrow(pin, lsn);
                    }
                    Event::DecisionDurable { lsn }
                }
                Err(e) => Event::DecisionFailed {
                    error: e.to_string(),
                },
            }));
        }
        let waited = match &mut self.calls {
            Some(calls) => calls.poll_next_unpin(cx),
            None => Poll::Ready(None),
        };
        match waited {
            Poll::Ready(Some(event)) => Poll::Ready(Some(event)),
            Poll::Ready(None) if self.decision.is_none() => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }

    /// Once the driver is done: a finished or cancelled machine leaves the running map.
    fn finish(&self) {
        let finished = *lock(&self.running.machine).phase() == Phase::Finished;
        if finished && let Some(pin) = self.pin {
            self.inner.retention.pins.unpin(pin);
        }
        if finished || self.running.cancelled.load(Ordering::Acquire) {
            self.inner.running_shard(self.run).remove(&self.run);
        }
    }

    /// Drives the machine in a task of its own until it is done.
    fn spawn(mut self, span: tracing::Span) {
        let inner = Arc::clone(&self.inner);
        let run = async move {
            poll_fn(|cx| match self.drive(cx, false) {
                Progress::Waiting => Poll::Pending,
                Progress::Answered | Progress::Done => Poll::Ready(()),
            })
            .await;
            self.finish();
        };
        inner
            .tasks
            .spawn(&inner.handle, inner.stop.subscribe(), run.instrument(span));
    }

    /// Starts one command (or carries it out at once).
    fn execute(&mut self, command: Command) {
        match command {
            Command::Prepare(b) => self.call(b, BranchCall::Prepare),
            Command::Commit(b) => self.call(b, BranchCall::Commit),
            Command::Rollback(b) => self.call(b, BranchCall::Rollback),
            Command::RetryAfter { branch, delay_ms } => {
                self.log_retry(branch, delay_ms);
                self.fresh.push_back(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    Event::RetryDue { branch }
                }));
            }
            Command::AppendDecision { writers } => self.append_decision(&writers),
            Command::PrepareOnePhase(b) => self.call(b, BranchCall::PrepareOnePhase),
            Command::AppendOnePhase { branch, redo } => self.append_one_phase(branch, &redo),
            Command::CommitOnePhase(b) => self.call(b, BranchCall::CommitOnePhase),
            Command::AskOnePhase { branch, redo } => self.call(branch, BranchCall::Ask(redo)),
            Command::AppendAbort { reason } => {
                let abort = record::encode_abort(&self.running.text, &reason);
                self.append_outcome(record::ABORT, &abort);
            }
            Command::AppendOnePhaseEnd => {
                failpoint::hit("before_end");
                let end = record::encode_end(&self.running.text);
                self.append_outcome(record::END, &end);
            }
            Command::AppendEnd => {
                failpoint::hit("before_end");
                let end = record::encode_end(&self.running.text);
                let epoch = self.inner.config.epoch;
                if let Err(e) = self.inner.journal.append_nowait(epoch, record::END, &end) {
                    log_unwritten(&e, "End");
                }
            }
            Command::Reply(outcome) => self.outcome = Some(outcome),
        }
    }

    /// Says that a branch's call failed and will be made again, with the error and the delay:
    /// at the first failures and then at every power-of-two attempt, so that a resource down
    /// for an hour costs a few dozen lines, not thousands. A fatal error is logged at error
    /// level (a person must restart the resource's process), the others at warn.
    fn log_retry(&self, branch: BranchId, delay_ms: u64) {
        let machine = lock(&self.running.machine);
        let Some(b) = machine.branches().get(branch) else {
            return;
        };
        if !b.attempts.is_power_of_two() {
            return;
        }
        let action = match b.state {
            BranchState::Committing => "commit",
            BranchState::RollingBack => "rollback",
            BranchState::InDoubt => "asking about the one-phase commit",
            _ => "call",
        };
        let resource = self.running.branches.get(branch).map_or("", |r| &*r.name);
        let error = b.last_error.as_deref().unwrap_or("no answer");
        let xid = self.running.xid;
        let attempt = b.attempts;
        if b.last_class == Some(ErrorClass::Fatal) {
            tracing::error!(xid = %xid, resource, attempt, "{action} failed: {error}; retrying in {delay_ms} ms");
        } else {
            tracing::warn!(xid = %xid, resource, attempt, "{action} failed: {error}; retrying in {delay_ms} ms");
        }
    }

    fn call(&mut self, branch: BranchId, call: BranchCall) {
        let xid = self.running.xid;
        let target = self.running.branches.get(branch);
        let Some(resource) = target.and_then(|b| b.resource.clone()) else {
            let e = ResourceError::Unavailable {
                resource: target.map(|b| b.name.to_string()).unwrap_or_default(),
                message: NOT_CONFIGURED.into(),
            };
            self.ready.push_back(call.event(branch, Err(e)));
            return;
        };
        let deadline = Duration::from_millis(self.inner.config.call_timeout_ms);
        let name = target.map(|b| b.name.to_string()).unwrap_or_default();
        let within = move |action: &'static str| (deadline, name.clone(), action);
        self.fresh.push_back(match call {
            BranchCall::Prepare => Box::pin(async move {
                let vote = within_deadline(within("prepare"), resource.prepare(&xid)).await;
                failpoint::hit("after_prepare");
                Event::Prepared { branch, vote }
            }),
            BranchCall::Commit => Box::pin(async move {
                let result = within_deadline(within("commit"), resource.commit(&xid)).await;
                failpoint::hit("between_commits");
                Event::Resolved { branch, result }
            }),
            BranchCall::Rollback => Box::pin(async move {
                let result = within_deadline(within("rollback"), resource.rollback(&xid)).await;
                Event::Resolved { branch, result }
            }),
            BranchCall::PrepareOnePhase => Box::pin(async move {
                let vote = within_deadline(
                    within("prepare (one phase)"),
                    resource.prepare_one_phase(&xid),
                )
                .await;
                failpoint::hit("after_prepare");
                Event::Prepared { branch, vote }
            }),
            BranchCall::CommitOnePhase => Box::pin(async move {
                let result = within_deadline(
                    within("commit (one phase)"),
                    resource.commit_one_phase(&xid),
                )
                .await;
                failpoint::hit("one_phase_committed");
                Event::OnePhaseAnswered { branch, result }
            }),
            BranchCall::Ask(redo) => Box::pin(async move {
                let result = within_deadline(
                    within("find the one-phase outcome"),
                    resource.one_phase_outcome(&xid, &redo),
                )
                .await;
                Event::OnePhaseAnswered { branch, result }
            }),
        });
    }

    /// Pins the transaction from the lowest LSN its decision record can get, before it is
    /// queued (narrowed to the record's LSN once durable).
    fn pin_before_append(&mut self) {
        let bound = self.inner.journal.durable_lsn().next();
        match self.pin {
            Some(pin) => self.inner.retention.pins.narrow(pin, bound),
            None => self.pin = Some(self.inner.retention.pins.pin(self.running.xid, bound)),
        }
    }

    /// Queues a one-phase commit's `End` or `Abort` record; its durability is reported as
    /// `OutcomeDurable` (the record shares its sync with its neighbours: group commit).
    fn append_outcome(&mut self, kind: journal::RecordKind, payload: &[u8]) {
        let epoch = self.inner.config.epoch;
        match self.inner.journal.append(epoch, kind, payload) {
            Ok(appending) => self.fresh.push_back(Box::pin(async move {
                let result = appending.await.map(|_| ()).map_err(|e| e.to_string());
                Event::OutcomeDurable { result }
            })),
            Err(e) => {
                log_unwritten(&e, "one-phase outcome");
                self.ready.push_back(Event::OutcomeDurable {
                    result: Err(e.to_string()),
                });
            }
        }
    }

    /// Queues the `OnePhase` record; its durability is reported like a decision's.
    fn append_one_phase(&mut self, branch: BranchId, redo: &[u8]) {
        let name = self.running.branches.get(branch).map_or("", |r| &*r.name);
        let payload = record::encode_one_phase(&self.running.text, now_ms(), name, redo);
        let epoch = self.inner.config.epoch;
        self.pin_before_append();
        match self
            .inner
            .journal
            .append(epoch, record::ONE_PHASE, &payload)
        {
            Ok(appending) => {
                failpoint::hit("decision_appended");
                self.decision = Some(appending);
            }
            Err(e) => self.ready.push_back(Event::DecisionRefused {
                error: e.to_string(),
            }),
        }
    }

    fn append_decision(&mut self, writers: &[(BranchId, Vec<u8>)]) {
        let branches = &self.running.branches;
        let payload = record::encode_commit(
            &self.running.text,
            now_ms(),
            writers.iter().map(|(b, redo)| {
                let name = branches.get(*b).map_or("", |r| &*r.name);
                (name, redo.as_slice())
            }),
        );
        let epoch = self.inner.config.epoch;
        self.pin_before_append();
        match self.inner.journal.append(epoch, record::COMMIT, &payload) {
            Ok(appending) => {
                failpoint::hit("decision_appended");
                self.decision = Some(appending);
            }
            Err(e) => self.ready.push_back(Event::DecisionRefused {
                error: e.to_string(),
            }),
        }
    }
}

/// Awaits a resource call for at most its deadline; past it, the resource counts as
/// unavailable (retryable), named with the action and the deadline.
pub(crate) async fn within_deadline<T>(
    (deadline, resource, action): (Duration, String, &'static str),
    call: impl Future<Output = Result<T, ResourceError>>,
) -> Result<T, ResourceError> {
    match tokio::time::timeout(deadline, call).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(resource = %resource, action, deadline_ms = deadline.as_millis() as u64, "resource call past its deadline");
            Err(ResourceError::Unavailable {
                message: format!(
                    "{action} did not answer within {} ms (call_timeout_ms)",
                    deadline.as_millis()
                ),
                resource,
            })
        }
    }
}

/// An `End` or `Abort` record the journal refused: after `shutdown` closed it, expected (the
/// next open finds the transaction again and finishes it); otherwise an error worth a look.
fn log_unwritten(e: &JournalError, kind: &str) {
    if matches!(e, JournalError::Closed) {
        tracing::debug!("{kind} record not written: the journal is closed");
    } else {
        tracing::error!(error = %e, "append {kind} record");
    }
}

/// A machine driven by its caller's task (`commit`, `rollback`); see the module docs. When it is
/// dropped with the machine not done, a task takes the driver over.
struct Inline {
    driver: Option<Driver>,
    _counted: Counted,
}

impl Inline {
    /// Drives until the machine answers the caller.
    fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outcome, CoordError>> {
        let Some(driver) = &mut self.driver else {
            return Poll::Ready(Err(CoordError::ShuttingDown));
        };
        match driver.drive(cx, true) {
            Progress::Waiting => Poll::Pending,
            Progress::Answered => match driver.outcome.take() {
                Some(outcome) => Poll::Ready(Ok(outcome)),
                None => Poll::Ready(Err(CoordError::ShuttingDown)),
            },
            Progress::Done => {
                driver.finish();
                let outcome = driver.outcome.take();
                self.driver = None;
                // Done without an answer: an operator took the transaction over.
                Poll::Ready(outcome.ok_or(CoordError::ShuttingDown))
            }
        }
    }

    /// After the answer: carries out what is ready without waiting (phase-2 calls that finish at
    /// their first poll, the `End` record); what still waits is left to the task of `drop`.
    fn settle(&mut self) {
        let Some(driver) = &mut self.driver else {
            return;
        };
        let mut cx = Context::from_waker(Waker::noop());
        if let Progress::Done = driver.drive(&mut cx, false) {
            driver.finish();
            self.driver = None;
        }
    }
}

impl Drop for Inline {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            let span = tracing::info_span!("txn", xid = %driver.running.xid);
            driver.spawn(span);
        }
    }
}

enum BranchCall {
    Prepare,
    Commit,
    Rollback,
    PrepareOnePhase,
    CommitOnePhase,
    /// Ask what became of a one-phase branch with this journaled redo.
    Ask(Vec<u8>),
}

impl BranchCall {
    /// The event of a call that could not be made (`result` is then an error).
    fn event(self, branch: BranchId, result: Result<(), ResourceError>) -> Event {
        match (self, result) {
            (BranchCall::Prepare | BranchCall::PrepareOnePhase, Err(e)) => Event::Prepared {
                branch,
                vote: Err(e),
            },
            (BranchCall::Prepare | BranchCall::PrepareOnePhase, Ok(())) => Event::Prepared {
                branch,
                vote: Ok(adapters::Vote::ReadOnly),
            },
            (BranchCall::CommitOnePhase | BranchCall::Ask(_), result) => Event::OnePhaseAnswered {
                branch,
                result: result.map(|()| adapters::OnePhaseOutcome::Committed),
            },
            (_, result) => Event::Resolved { branch, result },
        }
    }
}

/// The coordinator journal's segment size: a checkpoint removes whole segments, so what a start
/// reads after a long history is at most about one segment more than what unfinished
/// transactions pin; 16 MiB keeps that small while holding the largest record
/// (`record_bytes_max`, 8 MiB).
pub const SEGMENT_BYTES_MAX: u64 = 16 << 20;

/// The configuration of a coordinator's journal in `dir` (created when missing).
pub fn journal_config() -> journal::JournalConfig {
    journal::JournalConfig {
        create_if_missing: true,
        segment_bytes_max: SEGMENT_BYTES_MAX,
        ..journal::JournalConfig::default()
    }
}

/// Opens the coordinator's journal in `dir` and reads its ledger in the same pass (each record
/// read and checked once). Blocking: run it on the blocking pool.
pub fn open_journal(
    dir: &std::path::Path,
    config: journal::JournalConfig,
) -> Result<(Journal, Ledger), CoordError> {
    let mut ledger = Ledger::new();
    let mut unreadable = None;
    let journal = Journal::open_visiting(dir, config, |record| {
        if unreadable.is_some() {
            return;
        }
        if let Err(e) = ledger.apply_raw(record.lsn, record.kind, &record.payload) {
            unreadable = Some(e);
        }
    })?;
    match unreadable {
        Some(e) => Err(CoordError::Record {
            lsn: e.lsn,
            error: e.error,
        }),
        None => Ok((journal, ledger)),
    }
}

/// Reads the whole retained journal into a [`Ledger`].
///
/// A checkpoint may remove the oldest segment while it is read; the read then starts again
/// from the new oldest record (a few times at most).
pub fn read_ledger(journal: &Journal) -> Result<Ledger, CoordError> {
    const ATTEMPTS_MAX: usize = 4;
    let mut attempt = 1;
    loop {
        match read_ledger_once(journal) {
            Err(CoordError::Journal(JournalError::LsnNotRetained { .. }))
                if attempt < ATTEMPTS_MAX =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn read_ledger_once(journal: &Journal) -> Result<Ledger, CoordError> {
    let mut ledger = Ledger::new();
    for record in journal.read_from(journal.oldest_lsn())? {
        let record = record?;
        ledger
            .apply_raw(record.lsn, record.kind, &record.payload)
            .map_err(|e| CoordError::Record {
                lsn: e.lsn,
                error: e.error,
            })?;
    }
    Ok(ledger)
}
