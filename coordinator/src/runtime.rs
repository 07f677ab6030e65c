//! The coordinator's runtime: it executes the engine's commands with real resources, the real
//! journal and tokio, and feeds the results back as events.
//!
//! One task drives each transaction from the caller's `commit` to its `End` record: it owns the
//! transaction's [`TxnMachine`], carries out each [`Command`] concurrently (prepares and phase-2
//! calls run side by side), and turns each result into the next [`Event`]. The caller is
//! answered from inside that task as soon as the machine says so (the decision is durable); the
//! task goes on with phase 2 on its own. The calls, retry timers and the decision append are
//! futures that task polls itself, so a command costs no task of its own. Every task is tracked
//! ([`Tasks`]) and spawned on the coordinator's runtime, so shutdown waits for them or stops
//! them, and none is detached.
//!
//! The implementation caveats: recovery runs one machine per (resource, xid) for undecided
//! branches, so `list` may show one xid more than once while recovery runs; phase 2 of a
//! decided transaction retries for as long as it takes, until an operator resolves it.
//!
//! Recovery at open reads the journal: every `Commit` without `End` is driven through phase 2
//! again; every branch a resource reports prepared whose xid has no `Commit` is rolled back
//! (presumed abort). Each runs in its own task, so a branch that cannot be resolved is retried
//! and reported without holding up the others or the start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adapters::{Epoch, Lsn, Resource, ResourceError, Xid};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use journal::{Journal, JournalError};
use tokio::sync::{Notify, oneshot, watch};
use tracing::Instrument;

use crate::engine::{BranchId, Command, Event, Outcome, Phase, RetryPolicy, TxnMachine};
use crate::failpoint;
use crate::record::{CoordRecord, RecordError};

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
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            node: 1,
            epoch: Epoch(1),
            txn_timeout_ms: 30_000,
            retry: RetryPolicy::default(),
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
    /// Problems that need a person: a resource named by a decision that is not configured, a
    /// resource whose `recover` failed.
    pub problems: Vec<String>,
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

/// Tracks the tasks the coordinator spawned, so that shutdown can stop and await them.
#[derive(Default)]
pub struct Tasks {
    running: AtomicUsize,
    idle: Notify,
}

impl Tasks {
    /// Spawns `future` on `handle` (the coordinator's runtime, so that a caller on a thread of
    /// its own — a `Drop` outside any runtime — can start work too).
    fn spawn<F>(
        self: &Arc<Self>,
        handle: &tokio::runtime::Handle,
        stop: &watch::Receiver<bool>,
        future: F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.running.fetch_add(1, Ordering::AcqRel);
        let tasks = Arc::clone(self);
        let mut stop = stop.clone();
        // Owned: counted here, awaited by `Coordinator::shutdown`, stopped by its signal.
        handle.spawn(async move {
            tokio::select! {
                () = future => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            if tasks.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                tasks.idle.notify_waiters();
            }
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

/// An open transaction, before its commit starts.
struct Open {
    started: Instant,
    /// Resources joined, in join order (the branch ids of the machine).
    branches: Vec<String>,
    timed_out: bool,
}

/// A transaction whose machine runs (phase 1 or 2, or recovery).
struct Running {
    xid: Xid,
    started: Instant,
    names: Vec<String>,
    /// Set by an operator's `resolve`: the driver stops at its next step.
    cancelled: std::sync::atomic::AtomicBool,
    /// Stepped by the transaction's driver only; read by `list` and `wait_settled`.
    machine: Mutex<TxnMachine>,
}

struct Inner {
    config: CoordinatorConfig,
    journal: Journal,
    resources: BTreeMap<String, Arc<dyn Resource>>,
    seq: AtomicU64,
    open: Mutex<HashMap<Xid, Open>>,
    /// Every running machine, by a number of its own: recovery may run several machines for one
    /// xid (one per resource that holds a branch of it).
    running: Mutex<HashMap<u64, Arc<Running>>>,
    next_run: AtomicU64,
    tasks: Arc<Tasks>,
    stop: watch::Sender<bool>,
    handle: tokio::runtime::Handle,
}

/// The coordinator: begins transactions, commits them by two-phase commit, recovers at open.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
        let resources: BTreeMap<String, Arc<dyn Resource>> = resources
            .into_iter()
            .map(|r| (r.name().to_string(), r))
            .collect();
        let scan = scan_journal(&journal, config.node)?;
        let now_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            seq: AtomicU64::new(now_micros.max(scan.max_seq + 1)),
            config,
            journal,
            resources,
            open: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            next_run: AtomicU64::new(0),
            handle: tokio::runtime::Handle::current(),
            tasks: Arc::new(Tasks::default()),
            stop,
        });
        let coordinator = Coordinator { inner };
        let report = coordinator.recover(scan).await;
        coordinator.start_reaper();
        Ok((coordinator, report))
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
        lock(&self.inner.open).insert(xid, open);
        xid
    }

    /// Joins `resource` to the transaction (once; later calls return the same resource).
    pub async fn join(&self, xid: &Xid, resource: &str) -> Result<Arc<dyn Resource>, CoordError> {
        let r = Arc::clone(self.resource(resource)?);
        let first = {
            let mut open = lock(&self.inner.open);
            let txn = self.open_txn(&mut open, xid)?;
            let first = !txn.branches.iter().any(|b| b == resource);
            if first {
                txn.branches.push(resource.to_string());
            }
            first
        };
        if first && let Err(e) = r.begin(xid).await {
            let mut open = lock(&self.inner.open);
            if let Some(txn) = open.get_mut(xid) {
                txn.branches.retain(|b| b != resource);
            }
            return Err(e.into());
        }
        // The transaction may have timed out (and its branches been rolled back) while `begin`
        // ran: roll back the branch just begun too, so it holds nothing.
        if first && let Err(ended) = self.check_open(xid) {
            let open = Open {
                started: Instant::now(),
                branches: vec![resource.to_string()],
                timed_out: true,
            };
            self.start_rollback(
                xid,
                open,
                "the branch began after its transaction timed out",
                None,
            );
            return Err(ended);
        }
        Ok(r)
    }

    /// Checks that the transaction is open (not timed out); for branch handles before each use.
    pub fn check_open(&self, xid: &Xid) -> Result<(), CoordError> {
        let mut open = lock(&self.inner.open);
        self.open_txn(&mut open, xid).map(|_| ())
    }

    fn open_txn<'a>(
        &self,
        open: &'a mut HashMap<Xid, Open>,
        xid: &Xid,
    ) -> Result<&'a mut Open, CoordError> {
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
        let open = lock(&self.inner.open).remove(xid);
        let timeout = Duration::from_millis(self.inner.config.txn_timeout_ms);
        let open = match open {
            Some(o) if !o.timed_out && o.started.elapsed() > timeout => {
                // Past its deadline though the reaper has not run yet: the same as timed out.
                self.start_rollback(xid, o, "the transaction timed out", None);
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
            Some(o) => o,
            None => {
                return Err(CoordError::NotActive {
                    xid: *xid,
                    state: "not open".into(),
                });
            }
        };
        let machine = TxnMachine::new(*xid, open.branches.len(), self.inner.config.retry);
        let (reply, answer) = oneshot::channel();
        self.drive(
            machine,
            open.branches,
            open.started,
            vec![],
            Some(Event::CommitRequested),
            Some(reply),
        );
        answer.await.map_err(|_| CoordError::ShuttingDown)
    }

    /// Rolls the transaction back (an open one; a transaction already committing is not touched).
    pub async fn rollback(&self, xid: &Xid, reason: &str) -> Result<Outcome, CoordError> {
        let open = lock(&self.inner.open).remove(xid);
        let Some(open) = open else {
            return Err(CoordError::NotActive {
                xid: *xid,
                state: "not open".into(),
            });
        };
        let (reply, answer) = oneshot::channel();
        self.start_rollback(xid, open, reason, Some(reply));
        answer.await.map_err(|_| CoordError::ShuttingDown)
    }

    fn start_rollback(
        &self,
        xid: &Xid,
        open: Open,
        reason: &str,
        reply: Option<oneshot::Sender<Outcome>>,
    ) {
        let machine = TxnMachine::new(*xid, open.branches.len(), self.inner.config.retry);
        let event = Event::RollbackRequested {
            reason: reason.to_string(),
        };
        self.drive(
            machine,
            open.branches,
            open.started,
            vec![],
            Some(event),
            reply,
        );
    }

    /// Rolls back an open transaction whose handle was dropped without commit or rollback, in
    /// the background (dropping cannot wait). Does nothing to a transaction that is not open.
    pub fn abandon(&self, xid: &Xid) {
        let Some(open) = lock(&self.inner.open).remove(xid) else {
            return;
        };
        if !open.timed_out {
            self.start_rollback(xid, open, "the transaction handle was dropped", None);
        }
    }

    /// Starts the task that drives `machine`: runs `initial` and the commands `first` yields,
    /// and carries on until the machine is finished.
    fn drive(
        &self,
        machine: TxnMachine,
        names: Vec<String>,
        started: Instant,
        initial: Vec<Command>,
        first: Option<Event>,
        reply: Option<oneshot::Sender<Outcome>>,
    ) {
        let xid = machine.xid();
        let resources: Vec<Option<Arc<dyn Resource>>> = names
            .iter()
            .map(|n| self.inner.resources.get(n).cloned())
            .collect();
        let run = self.inner.next_run.fetch_add(1, Ordering::Relaxed);
        let running = Arc::new(Running {
            xid,
            cancelled: std::sync::atomic::AtomicBool::new(false),
            started,
            names,
            machine: Mutex::new(machine),
        });
        lock(&self.inner.running).insert(run, Arc::clone(&running));
        let span = if reply.is_some() {
            tracing::info_span!("txn", xid = %xid)
        } else {
            tracing::info_span!("recover", xid = %xid)
        };
        let driver = Driver {
            inner: Arc::clone(&self.inner),
            run,
            running,
            resources,
            reply,
        };
        let stop = self.inner.stop.subscribe();
        let inner = &self.inner;
        inner.tasks.spawn(
            &inner.handle,
            &stop,
            driver.run(initial, first).instrument(span),
        );
    }

    /// Waits (at most `timeout`) until no transaction is being committed, rolled back or
    /// recovered — phase 2 and recovery run in the background — and returns whether that
    /// happened. Transactions in doubt do not count: they wait for a restart or an operator.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = lock(&self.inner.running)
                .values()
                .any(|r| *lock(&r.machine).phase() != Phase::InDoubt);
            if !busy {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Every open, committing, rolling-back or in-doubt transaction.
    pub fn list(&self) -> Vec<TxnInfo> {
        let mut out = Vec::new();
        for (xid, o) in lock(&self.inner.open).iter() {
            let state = if o.timed_out { "timed out" } else { "open" };
            let branches = o
                .branches
                .iter()
                .map(|b| (b.clone(), "active".to_string(), None))
                .collect();
            out.push(TxnInfo {
                xid: *xid,
                state: state.into(),
                age: o.started.elapsed(),
                branches,
            });
        }
        for r in lock(&self.inner.running).values() {
            let xid = &r.xid;
            let machine = lock(&r.machine);
            let branches = r
                .names
                .iter()
                .zip(machine.branches())
                .map(|(n, b)| (n.clone(), b.state.name().to_string(), b.last_error.clone()))
                .collect();
            let state = phase_name(machine.phase());
            out.push(TxnInfo {
                xid: *xid,
                state: state.into(),
                age: r.started.elapsed(),
                branches,
            });
        }
        out.sort_by_key(|t| t.xid);
        out
    }

    /// Stops every task (phase 2 and recovery resume at the next open) and closes the journal.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        let _ = self.inner.stop.send(true);
        self.inner.tasks.wait_idle(timeout).await
    }

    fn start_reaper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let stop = self.inner.stop.subscribe();
        let tick = Duration::from_millis((self.inner.config.txn_timeout_ms / 4).clamp(10, 1_000));
        self.inner
            .tasks
            .spawn(&self.inner.handle, &stop, async move {
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { return };
                    Coordinator { inner }.reap_timed_out().await;
                }
            });
    }

    /// Rolls back every transaction open longer than its timeout, through a rollback machine
    /// (which retries until every branch answers). The transaction stays listed as timed out,
    /// with no branches, until its caller hears of it.
    async fn reap_timed_out(&self) {
        let limit = Duration::from_millis(self.inner.config.txn_timeout_ms);
        let expired: Vec<(Xid, Instant, Vec<String>)> = {
            let mut open = lock(&self.inner.open);
            open.iter_mut()
                .filter(|(_, o)| !o.timed_out && o.started.elapsed() > limit)
                .map(|(xid, o)| {
                    o.timed_out = true;
                    (*xid, o.started, std::mem::take(&mut o.branches))
                })
                .collect()
        };
        for (xid, started, branches) in expired {
            tracing::warn!(xid = %xid, "transaction open longer than {} ms; rolling back", limit.as_millis());
            let open = Open {
                started,
                branches,
                timed_out: true,
            };
            self.start_rollback(&xid, open, "the transaction timed out", None);
        }
    }

    /// Drops a timed-out transaction's record once its caller has been told (commit or rollback).
    pub fn forget(&self, xid: &Xid) {
        lock(&self.inner.open).remove(xid);
    }

    /// Records an operator's decision for a transaction that cannot finish by itself (a
    /// resource lost for good) and carries it out as far as the resources allow.
    ///
    /// Only what presumed abort leaves open can be decided: a transaction with a durable `Commit`
    /// can only be resolved as committed (its branches still prepared are committed, and phase 2
    /// stops retrying the rest); one without can only be resolved as rolled back. A transaction
    /// this coordinator is still running phase 1 for is refused.
    pub async fn resolve(&self, xid: &Xid, commit: bool, operator: &str) -> Result<(), CoordError> {
        if lock(&self.inner.open).contains_key(xid) || self.deciding(xid) {
            return Err(CoordError::Refused(format!(
                "transaction {xid} is still being prepared or decided by this coordinator; wait for its outcome"
            )));
        }
        let decided = scan_journal(&self.inner.journal, self.inner.config.node)?
            .decided
            .contains(xid);
        if decided && !commit {
            return Err(CoordError::Refused(format!(
                "transaction {xid} has a durable commit decision; it cannot be rolled back (some branches may already be committed)"
            )));
        }
        if !decided && commit {
            return Err(CoordError::Refused(format!(
                "transaction {xid} has no commit decision in the journal, so it never committed (presumed abort): resolve it with --rollback"
            )));
        }
        let record = CoordRecord::Resolve {
            xid: *xid,
            commit,
            operator: operator.to_string(),
            at_ms: now_ms(),
        };
        let epoch = self.inner.config.epoch;
        self.inner
            .journal
            .append(epoch, record.kind(), &record.encode())?
            .await?;
        tracing::info!(xid = %xid, commit, operator, "operator resolved transaction");
        for r in lock(&self.inner.running).values().filter(|r| r.xid == *xid) {
            r.cancelled.store(true, Ordering::Release);
        }
        for (name, r) in &self.inner.resources {
            let prepared = r.recover().await?;
            if !prepared.contains(xid) {
                continue;
            }
            if commit {
                r.commit(xid).await?
            } else {
                r.rollback(xid).await?
            }
            tracing::info!(xid = %xid, resource = %name, commit, "resolved branch");
        }
        if commit {
            let end = CoordRecord::End { xid: *xid };
            self.inner
                .journal
                .append(epoch, end.kind(), &end.encode())?
                .await?;
        }
        Ok(())
    }

    /// Whether a machine of `xid` is preparing or deciding.
    fn deciding(&self, xid: &Xid) -> bool {
        lock(&self.inner.running)
            .values()
            .filter(|r| r.xid == *xid)
            .any(|r| {
                matches!(
                    lock(&r.machine).phase(),
                    Phase::Active | Phase::Preparing | Phase::Deciding
                )
            })
    }

    async fn recover(&self, scan: JournalScan) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let mut prepared: BTreeMap<String, Vec<Xid>> = BTreeMap::new();
        for (name, r) in &self.inner.resources {
            match r.recover().await {
                Ok(xids) => {
                    prepared.insert(name.clone(), xids);
                }
                Err(e) => report
                    .problems
                    .push(format!("resource {name}: recover failed: {e}")),
            }
        }
        for (xid, (lsn, names)) in &scan.open_commits {
            if let Some(missing) = names
                .iter()
                .find(|n| !self.inner.resources.contains_key(*n))
            {
                report.problems.push(format!(
                    "transaction {xid} committed with a branch in resource {missing:?}, which is not configured; resolve it with `concord txn resolve`"
                ));
            }
            let (machine, commands) =
                TxnMachine::recovered_commit(*xid, *lsn, names.len(), self.inner.config.retry);
            self.drive_recovered(machine, names.clone(), commands);
            report.redriven.push(*xid);
        }
        for (name, xids) in prepared {
            for xid in xids {
                if scan.open_commits.contains_key(&xid) {
                    continue;
                }
                let (machine, commands) = match scan.resolved.get(&xid) {
                    Some(true) => {
                        TxnMachine::recovered_commit(xid, Lsn::ZERO, 1, self.inner.config.retry)
                    }
                    _ => TxnMachine::recovered_orphan(xid, self.inner.config.retry),
                };
                self.drive_recovered(machine, vec![name.clone()], commands);
                report.rolled_back.push((name.clone(), xid));
            }
        }
        if !report.redriven.is_empty() || !report.rolled_back.is_empty() {
            tracing::info!(
                redriven = report.redriven.len(),
                rolled_back = report.rolled_back.len(),
                "recovery started phase 2 of decided transactions and rollback of undecided branches"
            );
        }
        for problem in &report.problems {
            tracing::error!("{problem}");
        }
        report
    }

    fn drive_recovered(&self, machine: TxnMachine, names: Vec<String>, commands: Vec<Command>) {
        self.drive(machine, names, Instant::now(), commands, None, None);
    }
}

fn now_ms() -> u64 {
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
    resources: Vec<Option<Arc<dyn Resource>>>,
    reply: Option<oneshot::Sender<Outcome>>,
}

/// A command in progress: it yields the event that reports its result.
type Call = Pin<Box<dyn Future<Output = Event> + Send>>;

impl Driver {
    async fn run(mut self, initial: Vec<Command>, first: Option<Event>) {
        let mut commands = initial;
        if let Some(first) = first {
            commands.extend(self.step(first));
        }
        // Every call, retry timer and append is a future polled by this task: when the task stops
        // (shutdown), they stop with it, and no command costs a task of its own.
        let mut calls: FuturesUnordered<Call> = FuturesUnordered::new();
        loop {
            for command in commands.drain(..) {
                self.execute(command, &mut calls);
            }
            let Some(event) = calls.next().await else {
                break;
            };
            if self.running.cancelled.load(Ordering::Acquire) {
                tracing::info!(xid = %self.running.xid, "stopped driving: an operator resolved the transaction");
                break;
            }
            commands = self.step(event);
        }
        let finished = *self.machine().phase() == Phase::Finished;
        if finished || self.running.cancelled.load(Ordering::Acquire) {
            lock(&self.inner.running).remove(&self.run);
        }
    }

    fn machine(&self) -> std::sync::MutexGuard<'_, TxnMachine> {
        lock(&self.running.machine)
    }

    fn step(&self, event: Event) -> Vec<Command> {
        self.machine().on(event)
    }

    /// Starts one command in `calls` (or carries it out at once).
    fn execute(&mut self, command: Command, calls: &mut FuturesUnordered<Call>) {
        match command {
            Command::Prepare(b) => self.call(b, calls, BranchCall::Prepare),
            Command::Commit(b) => self.call(b, calls, BranchCall::Commit),
            Command::Rollback(b) => self.call(b, calls, BranchCall::Rollback),
            Command::RetryAfter { branch, delay_ms } => {
                calls.push(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    Event::RetryDue { branch }
                }));
            }
            Command::AppendDecision { writers } => self.append_decision(writers, calls),
            Command::AppendEnd => {
                failpoint::hit("before_end");
                let end = CoordRecord::End {
                    xid: self.running.xid,
                };
                let epoch = self.inner.config.epoch;
                if let Err(e) = self
                    .inner
                    .journal
                    .append_nowait(epoch, end.kind(), &end.encode())
                {
                    tracing::error!(error = %e, "append End record");
                }
            }
            Command::Reply(outcome) => {
                if let Some(reply) = self.reply.take() {
                    let _ = reply.send(outcome);
                }
            }
        }
    }

    fn call(&self, branch: BranchId, calls: &mut FuturesUnordered<Call>, call: BranchCall) {
        let xid = self.running.xid;
        let resource = self.resources.get(branch).cloned().flatten();
        let name = self.running.names.get(branch).cloned().unwrap_or_default();
        calls.push(Box::pin(async move {
            let Some(resource) = resource else {
                let e = ResourceError::Unavailable {
                    resource: name,
                    message: "not configured".into(),
                };
                return call.event(branch, Err(e));
            };
            match call {
                BranchCall::Prepare => {
                    let vote = resource.prepare(&xid).await;
                    failpoint::hit("after_prepare");
                    Event::Prepared { branch, vote }
                }
                BranchCall::Commit => {
                    let result = resource.commit(&xid).await;
                    failpoint::hit("between_commits");
                    Event::Resolved { branch, result }
                }
                BranchCall::Rollback => Event::Resolved {
                    branch,
                    result: resource.rollback(&xid).await,
                },
            }
        }));
    }

    fn append_decision(
        &self,
        writers: Vec<(BranchId, Vec<u8>)>,
        calls: &mut FuturesUnordered<Call>,
    ) {
        let branches = writers
            .into_iter()
            .map(|(b, redo)| (self.running.names.get(b).cloned().unwrap_or_default(), redo))
            .collect();
        let record = CoordRecord::Commit {
            xid: self.running.xid,
            at_ms: now_ms(),
            branches,
        };
        let appended =
            self.inner
                .journal
                .append(self.inner.config.epoch, record.kind(), &record.encode());
        calls.push(Box::pin(async move {
            match appended {
                Ok(appending) => {
                    failpoint::hit("decision_appended");
                    match appending.await {
                        Ok(lsn) => {
                            failpoint::hit("decision_durable");
                            Event::DecisionDurable { lsn }
                        }
                        Err(e) => Event::DecisionFailed {
                            error: e.to_string(),
                        },
                    }
                }
                Err(e) => Event::DecisionFailed {
                    error: e.to_string(),
                },
            }
        }));
    }
}

#[derive(Clone, Copy)]
enum BranchCall {
    Prepare,
    Commit,
    Rollback,
}

impl BranchCall {
    fn event(self, branch: BranchId, result: Result<(), ResourceError>) -> Event {
        match (self, result) {
            (BranchCall::Prepare, Err(e)) => Event::Prepared {
                branch,
                vote: Err(e),
            },
            (BranchCall::Prepare, Ok(())) => Event::Prepared {
                branch,
                vote: Ok(adapters::Vote::ReadOnly),
            },
            (_, result) => Event::Resolved { branch, result },
        }
    }
}

/// What the journal says about transactions.
#[derive(Debug, Default)]
pub struct JournalScan {
    /// Decided and not ended: xid → (decision LSN, resource names of its writers).
    pub open_commits: BTreeMap<Xid, (Lsn, Vec<String>)>,
    /// Operators' decisions.
    pub resolved: HashMap<Xid, bool>,
    /// The highest sequence number of this node's xids.
    pub max_seq: u64,
    /// Every xid that has a decision (ended or not).
    pub decided: HashSet<Xid>,
}

/// Reads the whole retained journal.
pub fn scan_journal(journal: &Journal, node: u32) -> Result<JournalScan, CoordError> {
    let mut scan = JournalScan::default();
    for record in journal.read_from(journal.oldest_lsn())? {
        let record = record?;
        let decoded = CoordRecord::decode(record.kind, &record.payload).map_err(|error| {
            CoordError::Record {
                lsn: record.lsn,
                error,
            }
        })?;
        let xid = decoded.xid();
        if xid.node == node {
            scan.max_seq = scan.max_seq.max(xid.seq);
        }
        match decoded {
            CoordRecord::Commit { branches, .. } => {
                scan.decided.insert(xid);
                scan.open_commits.insert(
                    xid,
                    (record.lsn, branches.into_iter().map(|(n, _)| n).collect()),
                );
            }
            CoordRecord::End { .. } => {
                scan.open_commits.remove(&xid);
            }
            CoordRecord::Resolve { commit, .. } => {
                scan.resolved.insert(xid, commit);
            }
        }
    }
    Ok(scan)
}
