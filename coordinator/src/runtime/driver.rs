//! The per-transaction driver: it runs one transaction's [`TxnMachine`] and carries out what
//! the machine asks.
//!
//! A [`Driver`] runs the machine from the caller's `commit` to its `End` record: it carries out
//! each [`Command`] concurrently (prepares and phase-2 calls run side by side) and turns each
//! result into the next [`Event`]. The calls, retry timers and the decision append are futures
//! the driver polls itself, so a command costs no task of its own; a call is polled once as soon
//! as it starts, and only one that is not finished then joins the set of calls being waited on.
//!
//! `commit` and `rollback` drive the machine in the caller's own task until the outcome is known
//! (for a commit: the decision is durable), so the journal's flusher wakes the caller directly.
//! Then phase-2 calls that finish at their first poll are carried out before the answer is
//! returned, and whatever still waits (a slower branch, a retry) goes on in a task of its own;
//! if the caller stops waiting before the outcome, a task takes over the same way ([`Inline`]),
//! so a dropped `commit` future never leaves a transaction half driven. Rollbacks nobody waits
//! for (a timeout, a dropped handle) and recovery run in tasks from the start.
//!
//! Every resource call is bounded by `call_timeout_ms` ([`within_deadline`]). A call that
//! failed and is made again is logged here, with its error and delay ("…; retrying in N ms"):
//! the error itself does not promise a retry, since not every caller retries.
//!
//! # Implementation caveats
//!
//! * Retries are logged at the first failures and then at power-of-two attempts only, so a
//!   resource down for long leaves a few lines, not one per retry.
//! * A branch whose resource is not configured (only recovery meets one) fails every call with
//!   an unavailable error that says to configure it.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use adapters::{ErrorClass, ResourceError, Xid};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use journal::{Appending, JournalError};
use tracing::Instrument;

use super::{BranchRef, CoordError, Coordinator, Counted, Inner, Running, SHARDS, lock, now_ms};
use crate::engine::{BranchId, BranchState, Command, Event, Outcome, Phase, TxnMachine};
use crate::failpoint;
use crate::record;
use crate::retention::PinId;

impl Coordinator {
    /// A new machine for `xid` with `branches`, listed as running; see [`Coordinator::register_machine`].
    /// A lone branch of a resource that offers it commits in one phase, unless it was prepared
    /// elsewhere ([`Coordinator::join_prepared`]).
    pub(super) fn register(&self, xid: Xid, branches: Vec<BranchRef>, started: Instant) -> Driver {
        let policy = self.inner.config.retry;
        let machine = match branches.as_slice() {
            [only]
                if self.inner.config.one_phase
                    && !only.prepared_elsewhere
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
    pub(super) fn register_machine(
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
    pub(super) async fn run_inline(
        &self,
        mut driver: Driver,
        first: Event,
    ) -> Result<Outcome, CoordError> {
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
}

/// The error of a call to a branch whose resource the configuration lacks (only recovery meets
/// one).
pub(super) const NOT_CONFIGURED: &str = "not in the configuration; add it (concord.toml) and start again so that this branch can finish";

/// Runs one transaction's machine; see the module docs.
pub(super) struct Driver {
    pub(super) inner: Arc<Inner>,
    /// This machine's key in the running map.
    pub(super) run: u64,
    pub(super) running: Arc<Running>,
    /// Commands the machine asked for, not yet carried out.
    pub(super) commands: Vec<Command>,
    /// Calls started and not yet polled.
    pub(super) fresh: VecDeque<Call>,
    /// Calls polled and not finished (created when the first one is needed).
    pub(super) calls: Option<FuturesUnordered<Call>>,
    /// The decision record, once queued in the journal, until it is durable.
    pub(super) decision: Option<Appending>,
    /// The commit's place among the unfinished transactions, given back when the driver is
    /// dropped (the machine finished, or shutdown stopped it).
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Events known without waiting: calls finished at their first poll, a branch of a resource
    /// not configured, a decision the journal refused to queue.
    pub(super) ready: VecDeque<Event>,
    /// The answer for the caller, once the machine gave it.
    pub(super) outcome: Option<Outcome>,
    /// This driver's pin of its transaction's decision record (see [`crate::retention`]):
    /// from the decision's append (or recovery) until the machine is finished.
    pub(super) pin: Option<PinId>,
}

/// A command in progress: it yields the event that reports its result.
pub(super) type Call = Pin<Box<dyn Future<Output = Event> + Send>>;

/// How far [`Driver::drive`] got.
pub(super) enum Progress {
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
    pub(super) fn step(&mut self, event: Event) {
        lock(&self.running.machine).on_into(event, &mut self.commands);
    }

    /// Carries out the machine's commands and feeds it every event that is ready, until none
    /// is; with `stop_at_answer`, stops as soon as the machine has answered the caller.
    pub(super) fn drive(&mut self, cx: &mut Context<'_>, stop_at_answer: bool) -> Progress {
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
    pub(super) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
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
    pub(super) fn finish(&self) {
        let finished = *lock(&self.running.machine).phase() == Phase::Finished;
        if finished && let Some(pin) = self.pin {
            self.inner.retention.pins.unpin(pin);
        }
        if finished || self.running.cancelled.load(Ordering::Acquire) {
            self.inner.running_shard(self.run).remove(&self.run);
        }
    }

    /// Drives the machine in a task of its own until it is done.
    pub(super) fn spawn(mut self, span: tracing::Span) {
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
    pub(super) fn execute(&mut self, command: Command) {
        match command {
            Command::Prepare(b) => self.call(b, BranchCall::Prepare),
            Command::Commit(b) => self.call(b, BranchCall::Commit),
            Command::Rollback(b) => self.call(b, BranchCall::Rollback),
            Command::RetryAfter { branch, delay_ms } => {
                self.log_retry(branch, delay_ms);
                if let Some(b) = self.running.branches.get(branch) {
                    crate::metrics::phase2_retry(&b.name);
                }
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
            Command::Reply(outcome) => {
                crate::metrics::answered(&outcome);
                self.outcome = Some(self.named(outcome));
            }
        }
    }

    /// Names the resource of a one-phase branch whose outcome is in doubt (the machine knows
    /// branches by position only).
    fn named(&self, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::InDoubt {
                error,
                branch: None,
            } => {
                let one_phase = lock(&self.running.machine).one_phase_branch();
                let branch = one_phase
                    .and_then(|b| self.running.branches.get(b))
                    .map(|r| r.name.to_string());
                Outcome::InDoubt { error, branch }
            }
            other => other,
        }
    }

    /// Says that a branch's call failed and will be made again, with the error and the delay:
    /// at the first failures and then at every power-of-two attempt, so that a resource down
    /// for an hour costs a few dozen lines, not thousands. A fatal error is logged at error
    /// level (a person must restart the resource's process), the others at warn.
    pub(super) fn log_retry(&self, branch: BranchId, delay_ms: u64) {
        let machine = lock(&self.running.machine);
        let Some(b) = machine.branches().get(branch) else {
            return;
        };
        if self.inner.stopping.load(Ordering::SeqCst) {
            // Nothing retries in this process any more: the next start does.
            tracing::debug!(xid = %self.running.xid, branch, "call failed while stopping; the next start retries it");
            return;
        }
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

    pub(super) fn call(&mut self, branch: BranchId, call: BranchCall) {
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
    pub(super) fn pin_before_append(&mut self) {
        let bound = self.inner.journal.durable_lsn().next();
        match self.pin {
            Some(pin) => self.inner.retention.pins.narrow(pin, bound),
            None => self.pin = Some(self.inner.retention.pins.pin(self.running.xid, bound)),
        }
    }

    /// Queues a one-phase commit's `End` or `Abort` record; its durability is reported as
    /// `OutcomeDurable` (the record shares its sync with its neighbours: group commit).
    pub(super) fn append_outcome(&mut self, kind: journal::RecordKind, payload: &[u8]) {
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
    pub(super) fn append_one_phase(&mut self, branch: BranchId, redo: &[u8]) {
        if let Some(gate) = self.inner.gate.get()
            && let Err(reason) = gate.may_decide()
        {
            self.ready.push_back(Event::DecisionRefused {
                error: format!("this node may not decide: {reason}"),
            });
            return;
        }
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

    pub(super) fn append_decision(&mut self, writers: &[(BranchId, Vec<u8>)]) {
        if let Some(gate) = self.inner.gate.get()
            && let Err(reason) = gate.may_decide()
        {
            self.ready.push_back(Event::DecisionRefused {
                error: format!("this node may not decide: {reason}"),
            });
            return;
        }
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
    let started = crate::metrics::start_timer();
    let answered = tokio::time::timeout(deadline, call).await;
    if let Some(started) = started {
        crate::metrics::resource_call(&resource, action, started.elapsed());
    }
    match answered {
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
pub(super) fn log_unwritten(e: &JournalError, kind: &str) {
    if matches!(e, JournalError::Closed) {
        tracing::debug!("{kind} record not written: the journal is closed");
    } else {
        tracing::error!(error = %e, "append {kind} record");
    }
}

/// A machine driven by its caller's task (`commit`, `rollback`); see the module docs. When it is
/// dropped with the machine not done, a task takes the driver over.
pub(super) struct Inline {
    driver: Option<Driver>,
    _counted: Counted,
}

impl Inline {
    /// Drives until the machine answers the caller.
    pub(super) fn poll_outcome(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Outcome, CoordError>> {
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
    pub(super) fn settle(&mut self) {
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

pub(super) enum BranchCall {
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
    pub(super) fn event(self, branch: BranchId, result: Result<(), ResourceError>) -> Event {
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
