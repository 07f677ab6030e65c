//! The coordinator's runtime: it executes the engine's commands with real resources, the real
//! journal and tokio, and feeds the results back as events.
//!
//! [`Coordinator`] is the façade every caller holds: `begin` (with the configured timeout, or a
//! transaction's own: [`Coordinator::begin_with_timeout`]), `join`, `join_prepared` (a branch
//! whose work and prepare happened in another process, such as a remote application's
//! PostgreSQL branch: never begun here, never committed in one phase), `commit`, `rollback`,
//! `shutdown` live here, with the state they share ([`CoordinatorConfig`], the maps of open and
//! running transactions, the tracked [`Tasks`]). The work behind it is cut along its seams:
//!
//! * `driver` — one transaction's [`TxnMachine`] driven from the caller's `commit` to its `End`
//!   record: resource calls, retry timers, the decision append, each result fed back as an event.
//! * `recovery` — what the coordinator does at open from the journal's ledger
//!   ([`RecoveryReport`]), and opening or reading the journal ([`open_journal`],
//!   [`read_ledger`]).
//! * `background` — the tasks that run beside the transactions: the timeout reaper, the orphan
//!   sweeper, the checkpointer and blob collection.
//! * `views` — what operators see and do: `list` ([`TxnInfo`]), `wait_settled`, `resolve`.
//!
//! Open transactions and running machines are kept in maps split into shards (by sequence
//! number and run number), hashed with [`XidBuildHasher`], so concurrent callers rarely meet on
//! a lock. Every task, and every caller driving a machine, is tracked ([`Tasks`]); tasks are
//! spawned on the coordinator's runtime, so shutdown stops them (and the callers, who hear
//! [`CoordError::ShuttingDown`]) and waits for them, and none is detached.
//!
//! # Implementation caveats
//!
//! * Phase 2 of a decided transaction retries for as long as it takes, until an operator
//!   resolves it; each retry is logged by the driver with its delay.
//! * Recovery runs one machine per (resource, xid) for undecided branches, so `list` may show
//!   one xid more than once while recovery runs.

mod background;
mod driver;
mod recovery;
mod views;

pub(crate) use driver::within_deadline;
pub use recovery::{RecoveryReport, SEGMENT_BYTES_MAX, journal_config, open_journal, read_ledger};
pub use views::{TxnCounts, TxnInfo};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adapters::xid::{XidBuildHasher, XidText};
use adapters::{Epoch, Lsn, Resource, ResourceError, Xid};
use journal::{Journal, JournalError};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::engine::{Event, Outcome, RetryPolicy, TxnMachine};
use crate::ledger::Ledger;
use crate::record::{CoordRecord, RecordError};
use crate::retention::{JournalSource, PinId, Retention};

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
    /// The commit found `max_unfinished` transactions still in phase 2 and none finished
    /// within `txn_timeout_ms`: nothing was decided, and the transaction was rolled back.
    /// Running it again later can succeed, once the slow or unreachable resource answers.
    #[error(
        "{max_unfinished} transactions are still in phase 2 (max_unfinished) and none finished within {waited_ms} ms: a resource is slow or down (see `concord txn list`); transaction {xid} was rolled back"
    )]
    Busy {
        /// The transaction, rolled back.
        xid: Xid,
        /// The configured bound on transactions in phase 2.
        max_unfinished: usize,
        /// How long the commit waited for a place (milliseconds).
        waited_ms: u64,
    },
    /// The coordinator shut down before the outcome was known: recovery at the next start decides
    /// it (committed if its decision became durable, rolled back otherwise).
    #[error(
        "coordinator shut down before the outcome was known; recovery at the next start decides it"
    )]
    ShuttingDown,
    /// Sync replication: the transaction is committed here (its decision is durable in this
    /// journal, and phase 2 goes on), but no standby confirmed that it journaled it within the
    /// configured wait. A failover now may lose it; `concord status` shows the standby's state.
    #[error(
        "transaction {xid} is committed on this primary, but no standby confirmed it: {reason}"
    )]
    NotConfirmed {
        /// The transaction, committed here.
        xid: Xid,
        /// Why no standby confirmed it.
        reason: String,
    },
}

/// What a commit waits for once its decision is durable and before it is answered: sync
/// replication's standby acknowledgement ([`Coordinator::set_commit_gate`]).
#[async_trait::async_trait]
pub trait CommitGate: Send + Sync + 'static {
    /// Returns once the journal up to `lsn` is confirmed (by a standby), or why it is not.
    async fn confirm(&self, lsn: Lsn) -> Result<(), String>;

    /// Whether this node may record a decision now: checked just before a `Commit` or
    /// `OnePhase` record is appended. An error (why not) rolls the transaction back instead —
    /// a primary whose lease ran out, or that is sick, decides nothing. Default: always.
    fn may_decide(&self) -> Result<(), String> {
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
            prepared_elsewhere: false,
        }
    }
}

/// A branch of a transaction: its resource's name and the resource (`None`: not configured,
/// which only recovery meets).
#[derive(Clone)]
struct BranchRef {
    name: Arc<str>,
    resource: Option<Arc<dyn Resource>>,
    /// Joined by [`Coordinator::join_prepared`]: its work happened, and its prepare, in another
    /// process; it never commits in one phase.
    prepared_elsewhere: bool,
}

/// An open transaction, before its commit starts.
struct Open {
    started: Instant,
    /// Rolled back when open longer than this (`txn_timeout_ms`, or its own).
    timeout: Duration,
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

/// How many ways the maps of open and running transactions are split.
const SHARDS: usize = 16;

type OpenMap = HashMap<Xid, Open, XidBuildHasher>;
type RunningMap = HashMap<u64, Arc<Running>, XidBuildHasher>;
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
    /// `Coordinator::sweep_orphans`): recovery could not see the prepared branches of a
    /// resource it could not ask, so nothing it read may be removed yet.
    startup_pin: Mutex<Option<PinId>>,
    /// The resources that have not answered `recover` since open.
    unanswered: Mutex<HashSet<String>>,
    /// The durable LSN at open: a shutdown writes its `Checkpoint` only after new records.
    opened_at: Lsn,
    /// What a commit waits for before it is answered (sync replication).
    gate: std::sync::OnceLock<Arc<dyn CommitGate>>,
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
                prepared_elsewhere: false,
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
    /// Opens the coordinator on `journal` with `resources`, runs recovery (see [`RecoveryReport`])
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
            gate: std::sync::OnceLock::new(),
        });
        let coordinator = Coordinator { inner };
        let report = coordinator.recover(&ledger).await;
        coordinator.start_reaper();
        coordinator.start_sweeper();
        coordinator.start_checkpointer();
        Ok((coordinator, report))
    }

    /// Makes every commit wait for `gate` before it is answered (sync replication); set once,
    /// before the coordinator serves. A second gate is refused (returned).
    pub fn set_commit_gate(&self, gate: Arc<dyn CommitGate>) -> Result<(), Arc<dyn CommitGate>> {
        self.inner.gate.set(gate)
    }

    /// The epoch this coordinator serves in.
    pub fn epoch(&self) -> journal::Epoch {
        self.inner.config.epoch
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

    /// Begins a transaction, rolled back when open longer than `txn_timeout_ms`.
    pub fn begin(&self) -> Xid {
        self.begin_with_timeout(self.default_timeout())
    }

    /// Begins a transaction rolled back when open longer than `timeout` (a remote client's
    /// own timeout; the caller caps it).
    pub fn begin_with_timeout(&self, timeout: Duration) -> Xid {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let xid = Xid {
            node: self.inner.config.node,
            epoch: self.inner.config.epoch,
            seq,
        };
        let open = Open {
            started: Instant::now(),
            timeout,
            branches: Vec::new(),
            timed_out: false,
        };
        self.inner.open_shard(&xid).insert(xid, open);
        xid
    }

    /// Sets the timeout of the open transaction `xid` (counted from its begin), for a caller
    /// that began it through a layer that does not take one.
    pub fn set_timeout(&self, xid: &Xid, timeout: Duration) -> Result<(), CoordError> {
        let mut open = self.inner.open_shard(xid);
        self.open_txn(&mut open, xid)?.timeout = timeout;
        Ok(())
    }

    /// The configured `txn_timeout_ms`.
    fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.txn_timeout_ms)
    }

    /// Joins `resource` to the transaction (once; later calls return the same resource).
    pub async fn join(&self, xid: &Xid, resource: &str) -> Result<Arc<dyn Resource>, CoordError> {
        let configured = self.configured(resource)?;
        self.reap_if_due(xid);
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
            self.roll_back_late_branch(
                xid,
                configured.branch(),
                "the branch began after its transaction timed out",
            );
            return Err(ended);
        }
        Ok(Arc::clone(&configured.resource))
    }

    /// Joins to the transaction a branch of `resource` whose work and prepare happened in
    /// another process (a remote application's PostgreSQL branch, which the resource has
    /// adopted): the resource's `begin` is not called, and the branch never takes the one-phase
    /// path, even alone (it is prepared already). Joining it again is a no-op; a branch of
    /// `resource` begun here already is refused. When the transaction timed out, the branch is
    /// rolled back at once (nothing can commit it) and the timeout is returned.
    pub async fn join_prepared(
        &self,
        xid: &Xid,
        resource: &str,
    ) -> Result<Arc<dyn Resource>, CoordError> {
        let configured = self.configured(resource)?;
        self.reap_if_due(xid);
        let joined = {
            let mut open = self.inner.open_shard(xid);
            self.open_txn(&mut open, xid).and_then(|txn| {
                match txn.branches.iter().find(|b| *b.name == *resource) {
                    Some(b) if b.prepared_elsewhere => Ok(()),
                    Some(_) => Err(CoordError::Refused(format!(
                        "transaction {xid} has a branch in {resource} begun by the coordinator's process; a branch prepared elsewhere cannot join it too"
                    ))),
                    None => {
                        txn.branches.push(prepared_elsewhere(configured));
                        Ok(())
                    }
                }
            })
        };
        if let Err(e @ CoordError::TimedOut { .. }) = joined {
            let reason = "the branch was enlisted after its transaction timed out";
            self.roll_back_late_branch(xid, prepared_elsewhere(configured), reason);
            return Err(e);
        }
        joined.map(|()| Arc::clone(&configured.resource))
    }

    /// Rolls back, in a task of its own, a branch that joined a transaction that had timed out.
    fn roll_back_late_branch(&self, xid: &Xid, branch: BranchRef, reason: &str) {
        let open = Open {
            started: Instant::now(),
            timeout: self.default_timeout(),
            branches: vec![branch],
            timed_out: true,
        };
        self.start_rollback(xid, open, reason);
    }

    /// Checks that the transaction is open (not timed out); for branch handles before each use.
    pub fn check_open(&self, xid: &Xid) -> Result<(), CoordError> {
        self.reap_if_due(xid);
        let mut open = self.inner.open_shard(xid);
        self.open_txn(&mut open, xid).map(|_| ())
    }

    fn open_txn<'a>(&self, open: &'a mut OpenMap, xid: &Xid) -> Result<&'a mut Open, CoordError> {
        match open.get_mut(xid) {
            Some(txn) if txn.timed_out => Err(timed_out(xid, txn)),
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
        let requested = crate::metrics::start_timer();
        let mut answer = self.commit_timed(xid).await;
        if let (Some(gate), Ok(Outcome::Committed { lsn: Some(_) })) =
            (self.inner.gate.get(), &answer)
        {
            // The durable LSN, not the decision's: a one-phase commit is answered after its
            // `End`, which a standby needs before it can replay the transaction.
            let upto = self.inner.journal.durable_lsn();
            if let Err(reason) = gate.confirm(upto).await {
                answer = Err(CoordError::NotConfirmed { xid: *xid, reason });
            }
        }
        if let (Some(requested), Ok(_)) = (requested, &answer) {
            crate::metrics::committed_in(requested.elapsed());
        }
        answer
    }

    async fn commit_timed(&self, xid: &Xid) -> Result<Outcome, CoordError> {
        // A transaction that is not open is answered at once, not after waiting for a place.
        let Some(timeout) = self.inner.open_shard(xid).get(xid).map(|o| o.timeout) else {
            return Err(CoordError::NotActive {
                xid: *xid,
                state: "not open".into(),
            });
        };
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
                        let busy = CoordError::Busy {
                            xid: *xid,
                            max_unfinished: self.inner.config.max_unfinished.max(1),
                            waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                        };
                        // Nothing was decided: the transaction rolls back now, rather than
                        // waiting open for the reaper (or for a caller who forgets it).
                        let open = self.inner.open_shard(xid).remove(xid);
                        if let Some(open) = open.filter(|o| !o.timed_out) {
                            self.start_rollback(xid, open, &busy.to_string());
                        }
                        return Err(busy);
                    }
                }
            }
        };
        let mut driver = {
            let mut open = self.inner.open_shard(xid);
            match open.remove(xid) {
                Some(o) if !o.timed_out && o.started.elapsed() > o.timeout => {
                    drop(open);
                    // Past its deadline though the reaper has not run yet: the same as timed out.
                    let e = timed_out(xid, &o);
                    self.start_rollback(xid, o, "the transaction timed out");
                    return Err(e);
                }
                Some(o) if o.timed_out => return Err(timed_out(xid, &o)),
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

    /// Drops a timed-out transaction's record once its caller has been told (commit or rollback).
    pub fn forget(&self, xid: &Xid) {
        self.inner.open_shard(xid).remove(xid);
    }
}

/// The error of `xid`, open as `open`, past its timeout.
fn timed_out(xid: &Xid, open: &Open) -> CoordError {
    CoordError::TimedOut {
        xid: *xid,
        timeout_ms: u64::try_from(open.timeout.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The branch of `configured` joined by [`Coordinator::join_prepared`].
fn prepared_elsewhere(configured: &Configured) -> BranchRef {
    BranchRef {
        prepared_elsewhere: true,
        ..configured.branch()
    }
}

/// Milliseconds since the Unix epoch (0 before it), for the records' `at_ms`.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
