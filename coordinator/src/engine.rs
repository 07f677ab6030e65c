//! The two-phase-commit engine of one transaction: events in, commands out.
//!
//! [`TxnMachine`] knows the protocol and nothing else: it performs no I/O, reads no clock and
//! spawns nothing. The runtime feeds it what happened ([`Event`]: the caller asked to commit, a
//! branch voted, the decision became durable, a phase-2 call failed, a retry is due) and carries
//! out what it asks ([`Command`]: prepare this branch, append the decision, commit that branch,
//! retry after so many milliseconds, answer the caller). The whole protocol is therefore testable
//! as plain function calls, and every interleaving the runtime can produce is an ordering of
//! events.
//!
//! The protocol, with presumed abort:
//!
//! 1. `CommitRequested`: prepare every branch concurrently.
//! 2. A `No` vote (an error) from any branch rolls back every branch — those still preparing as
//!    their votes arrive — and answers the caller with the failing branch named. Nothing was
//!    journaled, so a crash anywhere here also ends in rollback (recovery finds prepared branches
//!    without a decision).
//! 3. All voted: branches that voted `ReadOnly` are finished. With no writer left the caller is
//!    answered at once; otherwise the decision, one record holding every writer's redo, is
//!    appended.
//! 4. `DecisionDurable`: the transaction is committed — the caller is answered — and phase 2
//!    commits every writer, retrying failures with capped exponential backoff for as long as it
//!    takes (the decision is final). When all have acknowledged, an `End` record is appended.
//! 5. `DecisionFailed` (the journal failed while making it durable): the outcome is in doubt
//!    until the process restarts and recovery reads what the journal holds; the branches stay
//!    prepared and the caller is told the outcome is unknown. `DecisionRefused` (the journal
//!    refused the record before queueing it: closed, poisoned already, too large) decides
//!    nothing: the transaction rolls back.
//!
//! **One phase.** A transaction whose only branch is in a resource that offers it
//! ([`TxnMachine::new_one_phase`]) skips the prepare:
//!
//! 1. `CommitRequested`: the branch ends its work without becoming durable
//!    ([`Command::PrepareOnePhase`]: fence check, redo; its locks stay held). A branch with
//!    nothing to replicate may commit right there and vote `ReadOnly` (finished, nothing to
//!    journal); a rollback request is therefore too late once this started.
//! 2. An empty redo (nothing a standby needs) is committed at once ([`Command::CommitOnePhase`])
//!    and nothing is journaled: the order of the journal cannot be wrong about a transaction it
//!    does not hold. A non-empty redo goes first into a `OnePhase` record
//!    ([`Command::AppendOnePhase`]), made durable while the branch still holds its locks — so a
//!    conflicting transaction, which must wait for those locks, gets the later record, exactly as
//!    with a two-phase decision (docs/design.md "Ordering") — and only then is the branch committed.
//! 3. The resource's answer is the outcome: committed (the caller hears it, an `End` record
//!    follows), or refused at commit (the caller hears it, an `Abort` record follows, so that a
//!    standby discards the `OnePhase` record). When the answer is lost (the connection broke),
//!    the machine asks the resource what became of the branch ([`Command::AskOnePhase`]) until
//!    it knows, and journals that. Recovery does the same for a `OnePhase` record with neither
//!    `End` nor `Abort`.
//!
//! Which of the two paths a machine takes is fixed when it is made and held as a private enum
//! (`CommitPath`) carrying what only that path has: the one-phase redo and the outcome waiting
//! for its record, or whether phase 2 ends with the transaction's `End`. A two-phase machine
//! therefore has no one-phase redo to ask about, and a one-phase machine always journals its
//! own outcome.
//!
//! Invariants, checked by [`TxnMachine::validate`] after every step in debug builds: a branch is
//! never committed before the decision is durable (a one-phase branch with an empty redo needs
//! no decision); a transaction that journaled a decision never rolls a branch back; a
//! rolled-back transaction never asks for a decision.

use adapters::{ErrorClass, Lsn, OnePhaseOutcome, ResourceError, Vote, Xid};

/// Index of a branch in its transaction.
pub type BranchId = usize;

/// What happened, fed to [`TxnMachine::on`].
#[derive(Clone, Debug)]
pub enum Event {
    /// The caller asked to commit.
    CommitRequested,
    /// The caller (or a timeout, or a dropped handle) asked to roll back.
    RollbackRequested {
        /// Why, for the caller and the log.
        reason: String,
    },
    /// A branch answered prepare.
    Prepared {
        /// The branch.
        branch: BranchId,
        /// Its vote, or why it could not prepare.
        vote: Result<Vote, ResourceError>,
    },
    /// The decision record is durable at this LSN.
    DecisionDurable {
        /// Its LSN.
        lsn: Lsn,
    },
    /// The journal failed while making the decision durable.
    DecisionFailed {
        /// The journal's error.
        error: String,
    },
    /// The journal refused the decision record outright (closed, poisoned already, over its
    /// size limit): it was never queued, so nothing was decided.
    DecisionRefused {
        /// The journal's error.
        error: String,
    },
    /// A branch answered commit or rollback.
    Resolved {
        /// The branch.
        branch: BranchId,
        /// Its answer.
        result: Result<(), ResourceError>,
    },
    /// A retry asked for by [`Command::RetryAfter`] is due.
    RetryDue {
        /// The branch.
        branch: BranchId,
    },
    /// The `End` or `Abort` record of a one-phase commit is durable (`Ok`), or the journal
    /// failed to make it so (`Err`, the journal's error).
    OutcomeDurable {
        /// What the journal said.
        result: Result<(), String>,
    },
    /// A one-phase branch answered [`Command::CommitOnePhase`] or [`Command::AskOnePhase`]; an
    /// error means the outcome is still unknown.
    OnePhaseAnswered {
        /// The branch.
        branch: BranchId,
        /// What became of it.
        result: Result<OnePhaseOutcome, ResourceError>,
    },
}

/// What the runtime must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Call prepare on the branch.
    Prepare(BranchId),
    /// Append the decision record with these writers' redo and report `DecisionDurable`.
    AppendDecision {
        /// `(branch, redo)` of every branch that voted commit.
        writers: Vec<(BranchId, Vec<u8>)>,
    },
    /// Call commit on the branch.
    Commit(BranchId),
    /// Call rollback on the branch.
    Rollback(BranchId),
    /// Report `RetryDue` for the branch after this many milliseconds.
    RetryAfter {
        /// The branch.
        branch: BranchId,
        /// The delay.
        delay_ms: u64,
    },
    /// Append the `End` record (no need to wait for it to be durable).
    AppendEnd,
    /// End the lone branch's work for a one-phase commit and report its vote as `Prepared`.
    PrepareOnePhase(BranchId),
    /// Append the `OnePhase` record with the branch's redo and report `DecisionDurable` (or
    /// `DecisionFailed`).
    AppendOnePhase {
        /// The branch.
        branch: BranchId,
        /// Its redo.
        redo: Vec<u8>,
    },
    /// Commit the one-phase branch and report `OnePhaseAnswered`.
    CommitOnePhase(BranchId),
    /// Ask the resource what became of the one-phase branch whose journaled redo is `redo`, and
    /// report `OnePhaseAnswered`.
    AskOnePhase {
        /// The branch.
        branch: BranchId,
        /// Its redo, as journaled.
        redo: Vec<u8>,
    },
    /// Append the `End` record of a one-phase commit and report `OutcomeDurable`: the caller
    /// is answered only once it is durable, so that no site holding the journal must guess the
    /// outcome of an acknowledged one-phase commit.
    AppendOnePhaseEnd,
    /// Append the `Abort` record (the one-phase branch of a `OnePhase` record did not commit)
    /// and report `OutcomeDurable`.
    AppendAbort {
        /// Why, for operators.
        reason: String,
    },
    /// Answer the caller.
    Reply(Outcome),
}

/// The answer to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed; the decision is durable at `lsn` (`None`: every branch was read-only).
    Committed {
        /// The decision's LSN.
        lsn: Option<Lsn>,
    },
    /// Rolled back, and why.
    RolledBack {
        /// The reason, naming the branch when one failed.
        reason: String,
        /// The error of the branch that made the transaction roll back, when one did (a
        /// failed prepare, or a one-phase commit the resource refused): its resource names the
        /// branch, its class says whether running the transaction again can succeed.
        failed: Option<ResourceError>,
    },
    /// Whether it committed is not known: the journal failed while making the decision durable
    /// (the recovery of the next start decides), or the answer of a one-phase commit was lost
    /// (the message says whether concord goes on finding out).
    InDoubt {
        /// What happened.
        error: String,
        /// The resource whose branch's outcome is unknown: the one-phase branch whose answer
        /// was lost (named by the runtime, which knows the branches' resources; the machine
        /// leaves it `None`). `None` when the journal failed: every branch is then in doubt.
        branch: Option<String>,
    },
}

/// Backoff of phase-2 retries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Delay of the first retry (milliseconds).
    pub first_ms: u64,
    /// Largest delay (milliseconds).
    pub max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_ms: 10,
            max_ms: 5_000,
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based): doubling from `first_ms`, capped.
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let doubling = 1u64
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u64::MAX);
        self.first_ms.saturating_mul(doubling).min(self.max_ms)
    }
}

/// Where a branch is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BranchState {
    /// Doing work; not asked to prepare yet.
    Active,
    /// Prepare sent.
    Preparing,
    /// Voted commit with this redo (moved into [`Command::AppendDecision`] once every branch has
    /// voted).
    Prepared(Vec<u8>),
    /// Voted read-only: finished.
    ReadOnly,
    /// Commit sent (or to be retried).
    Committing,
    /// Acknowledged commit.
    Committed,
    /// Rollback sent (or to be retried).
    RollingBack,
    /// Acknowledged rollback (or failed prepare, already undone).
    RolledBack,
    /// One phase: ready to commit, not durable; its redo is being journaled.
    Ready,
    /// One phase: the answer to its commit was lost; the resource is being asked.
    InDoubt,
}

impl BranchState {
    /// The state in one word, for operators.
    pub fn name(&self) -> &'static str {
        match self {
            BranchState::Active => "active",
            BranchState::Preparing => "preparing",
            BranchState::Prepared(_) => "prepared",
            BranchState::ReadOnly => "read-only",
            BranchState::Committing => "committing",
            BranchState::Committed => "committed",
            BranchState::RollingBack => "rolling back",
            BranchState::RolledBack => "rolled back",
            BranchState::Ready => "ready (one phase)",
            BranchState::InDoubt => "in doubt (one phase)",
        }
    }
}

/// Where the transaction is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Open: branches are doing work.
    Active,
    /// Prepares sent, votes coming in.
    Preparing,
    /// All voted commit; the decision is being made durable.
    Deciding,
    /// The decision is durable; phase 2 runs.
    Committing,
    /// The lone branch is committing in one phase; its answer is the outcome.
    OnePhase,
    /// Rolling back.
    RollingBack,
    /// The decision's durability is unknown until restart.
    InDoubt,
    /// Everything resolved.
    Finished,
}

/// One branch as the engine sees it.
#[derive(Clone, Debug)]
pub struct Branch {
    /// Its state.
    pub state: BranchState,
    /// Phase-2 attempts so far.
    pub attempts: u32,
    /// The last error of a phase-2 call, for operators.
    pub last_error: Option<String>,
    /// The class of that error (a fatal one is logged louder by the runtime).
    pub last_class: Option<ErrorClass>,
}

impl Branch {
    /// Records a failed call's error, for operators and the runtime's retry log.
    fn failed(&mut self, e: &ResourceError) {
        self.last_error = Some(e.to_string());
        self.last_class = Some(e.class());
    }

    /// Forgets the last error: the branch answered.
    fn answered(&mut self) {
        self.last_error = None;
        self.last_class = None;
    }
}

/// The two-phase-commit state machine of one transaction; see the module docs.
#[derive(Clone, Debug)]
pub struct TxnMachine {
    xid: Xid,
    phase: Phase,
    branches: Vec<Branch>,
    decision: Option<Lsn>,
    policy: RetryPolicy,
    replied: bool,
    /// Two phases or one, with what only that path has.
    path: CommitPath,
}

/// How a transaction commits, with the state only that path has: a two-phase machine has no
/// one-phase redo or awaited outcome, and a one-phase machine always journals its own outcome.
#[derive(Clone, Debug)]
enum CommitPath {
    /// Prepare every branch, journal one decision, commit each (phase 2).
    TwoPhase {
        /// Whether finishing phase 2 appends the `End` record (not for a branch recovery
        /// commits beside the machine that owns the transaction's `End`).
        ends: bool,
    },
    /// The lone branch commits in one phase (see the module docs).
    OnePhase {
        /// The branch's redo, kept to ask the resource about it (empty: nothing journaled).
        redo: Vec<u8>,
        /// The outcome to answer once its `End` or `Abort` record is durable.
        awaiting: Option<Outcome>,
    },
}

impl TxnMachine {
    /// A new open transaction with `branches` branches.
    pub fn new(xid: Xid, branches: usize, policy: RetryPolicy) -> TxnMachine {
        let branch = Branch {
            state: BranchState::Active,
            attempts: 0,
            last_error: None,
            last_class: None,
        };
        TxnMachine {
            xid,
            phase: Phase::Active,
            branches: vec![branch; branches],
            decision: None,
            policy,
            replied: false,
            path: CommitPath::TwoPhase { ends: true },
        }
    }

    /// A new open transaction with one branch, which commits in one phase (see the module docs).
    pub fn new_one_phase(xid: Xid, policy: RetryPolicy) -> TxnMachine {
        let mut machine = TxnMachine::new(xid, 1, policy);
        machine.path = CommitPath::OnePhase {
            redo: Vec::new(),
            awaiting: None,
        };
        machine
    }

    /// A `OnePhase` record found by recovery at `lsn` with neither `End` nor `Abort`: the
    /// resource is asked what became of the branch. Returns the machine and its first commands.
    pub fn recovered_one_phase(
        xid: Xid,
        lsn: Lsn,
        redo: Vec<u8>,
        policy: RetryPolicy,
    ) -> (TxnMachine, Vec<Command>) {
        let mut machine = TxnMachine::new_one_phase(xid, policy);
        machine.phase = Phase::OnePhase;
        machine.decision = Some(lsn);
        machine.replied = true;
        machine.branches[0].state = BranchState::InDoubt;
        machine.path = CommitPath::OnePhase {
            redo: redo.clone(),
            awaiting: None,
        };
        (machine, vec![Command::AskOnePhase { branch: 0, redo }])
    }

    /// A transaction found by recovery with a durable decision at `lsn` and no `End`: phase 2
    /// is driven again for its `writers` branches. Returns the machine and its first commands.
    pub fn recovered_commit(
        xid: Xid,
        lsn: Lsn,
        writers: usize,
        policy: RetryPolicy,
    ) -> (TxnMachine, Vec<Command>) {
        let mut machine = TxnMachine::new(xid, writers, policy);
        machine.phase = Phase::Committing;
        machine.decision = Some(lsn);
        machine.replied = true;
        let commands = (0..writers).map(|b| machine.send_commit(b)).collect();
        (machine, commands)
    }

    /// A prepared branch found by recovery whose transaction the journal says committed but
    /// which no machine drives (its transaction ended, or the branch's resource is not among
    /// the writers still driven): it is committed, and the `End` is left to whoever owns it
    /// (an extra `End` after one already written says nothing new, so an ended transaction
    /// gets none). Returns the machine and its first commands.
    pub fn recovered_branch_commit(
        xid: Xid,
        lsn: Lsn,
        policy: RetryPolicy,
    ) -> (TxnMachine, Vec<Command>) {
        let (mut machine, commands) = TxnMachine::recovered_commit(xid, lsn, 1, policy);
        machine.path = CommitPath::TwoPhase { ends: false };
        (machine, commands)
    }

    /// A prepared branch found by recovery whose xid has no decision: it is rolled back
    /// (presumed abort). Returns the machine and its first commands.
    pub fn recovered_orphan(xid: Xid, policy: RetryPolicy) -> (TxnMachine, Vec<Command>) {
        let mut machine = TxnMachine::new(xid, 1, policy);
        machine.phase = Phase::RollingBack;
        machine.replied = true;
        machine.branches[0].state = BranchState::RollingBack;
        (machine, vec![Command::Rollback(0)])
    }

    /// The transaction's xid.
    pub fn xid(&self) -> Xid {
        self.xid
    }

    /// Where the transaction is.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The branches.
    pub fn branches(&self) -> &[Branch] {
        &self.branches
    }

    /// The decision's LSN, once durable.
    pub fn decision(&self) -> Option<Lsn> {
        self.decision
    }

    /// Whether nothing more will happen.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished | Phase::InDoubt)
    }

    /// Feeds one event; returns what the runtime must do.
    pub fn on(&mut self, event: Event) -> Vec<Command> {
        let mut commands = Vec::new();
        self.on_into(event, &mut commands);
        commands
    }

    /// Feeds one event and appends what the runtime must do to `commands` (so that a runtime can
    /// reuse one vector for every step).
    pub fn on_into(&mut self, event: Event, commands: &mut Vec<Command>) {
        match event {
            Event::CommitRequested => self.on_commit_requested(commands),
            Event::RollbackRequested { reason } => self.on_rollback_requested(reason, commands),
            Event::Prepared { branch, vote } => self.on_prepared(branch, vote, commands),
            Event::DecisionDurable { lsn } => self.on_decision_durable(lsn, commands),
            Event::DecisionFailed { error } => self.on_decision_failed(error, commands),
            Event::DecisionRefused { error } => self.on_decision_refused(error, commands),
            Event::Resolved { branch, result } => self.on_resolved(branch, result, commands),
            Event::RetryDue { branch } => self.on_retry_due(branch, commands),
            Event::OnePhaseAnswered { branch, result } => {
                self.on_one_phase_answered(branch, result, commands)
            }
            Event::OutcomeDurable { result } => self.on_outcome_durable(result, commands),
        }
        #[cfg(debug_assertions)]
        self.validate();
    }

    fn on_commit_requested(&mut self, out: &mut Vec<Command>) {
        if self.phase != Phase::Active {
            return;
        }
        if self.branches.is_empty() {
            return self.finish_with(Outcome::Committed { lsn: None }, out);
        }
        self.phase = Phase::Preparing;
        self.branches
            .iter_mut()
            .for_each(|b| b.state = BranchState::Preparing);
        if self.is_one_phase() {
            out.push(Command::PrepareOnePhase(0));
        } else {
            out.extend((0..self.branches.len()).map(Command::Prepare));
        }
    }

    fn on_rollback_requested(&mut self, reason: String, out: &mut Vec<Command>) {
        // A one-phase branch may commit while it is being finished (when it has nothing to
        // replicate), so once that started it is too late, as for a decision.
        match self.phase {
            Phase::Active => self.abort(reason, None, out),
            Phase::Preparing if !self.is_one_phase() => self.abort(reason, None, out),
            _ => {}
        }
    }

    fn on_prepared(
        &mut self,
        branch: BranchId,
        vote: Result<Vote, ResourceError>,
        out: &mut Vec<Command>,
    ) {
        let Some(slot) = self.branches.get_mut(branch) else {
            return;
        };
        if slot.state != BranchState::Preparing {
            return;
        }
        let one_phase = matches!(self.path, CommitPath::OnePhase { .. });
        match (self.phase.clone(), vote) {
            (Phase::Preparing, Err(e)) if one_phase && e.class() == ErrorClass::InDoubt => {
                // Its commit went out with the fence check and the answer was lost; nothing
                // was journaled, so nothing can be asked.
                slot.state = BranchState::InDoubt;
                slot.failed(&e);
                self.phase = Phase::Finished;
                self.reply(
                    Outcome::InDoubt {
                        error: format!(
                            "the answer to the one-phase commit was lost ({e}); the branch had nothing to replicate, so nothing was journaled and concord cannot find out"
                        ),
                        branch: None,
                    },
                    out,
                );
            }
            (Phase::Preparing, Ok(Vote::Commit { redo })) if one_phase => {
                if redo.is_empty() {
                    slot.state = BranchState::Committing;
                    self.phase = Phase::OnePhase;
                    out.push(Command::CommitOnePhase(branch));
                } else {
                    slot.state = BranchState::Ready;
                    self.phase = Phase::Deciding;
                    self.path = CommitPath::OnePhase {
                        redo: redo.clone(),
                        awaiting: None,
                    };
                    out.push(Command::AppendOnePhase { branch, redo });
                }
            }
            (Phase::Preparing, Ok(Vote::Commit { redo })) => {
                slot.state = BranchState::Prepared(redo);
                self.maybe_decide(out);
            }
            (Phase::Preparing, Ok(Vote::ReadOnly)) => {
                slot.state = BranchState::ReadOnly;
                self.maybe_decide(out);
            }
            (Phase::Preparing, Err(e)) => {
                slot.state = BranchState::RollingBack;
                self.abort(
                    format!("branch {branch} could not prepare: {e}"),
                    Some(e),
                    out,
                );
                out.push(Command::Rollback(branch));
            }
            // Already rolling back: undo what this late vote prepared.
            (Phase::RollingBack, Ok(Vote::ReadOnly)) => {
                slot.state = BranchState::RolledBack;
                self.maybe_finish_rollback();
            }
            (Phase::RollingBack, _) => {
                slot.state = BranchState::RollingBack;
                out.push(Command::Rollback(branch));
            }
            _ => {}
        }
    }

    fn maybe_decide(&mut self, out: &mut Vec<Command>) {
        if self
            .branches
            .iter()
            .any(|b| b.state == BranchState::Preparing)
        {
            return;
        }
        // The redo moves into the decision; the branch stays `Prepared` (its redo is needed
        // nowhere else).
        let writers: Vec<(BranchId, Vec<u8>)> = self
            .branches
            .iter_mut()
            .enumerate()
            .filter_map(|(i, b)| match &mut b.state {
                BranchState::Prepared(redo) => Some((i, std::mem::take(redo))),
                _ => None,
            })
            .collect();
        if writers.is_empty() {
            return self.finish_with(Outcome::Committed { lsn: None }, out);
        }
        self.phase = Phase::Deciding;
        out.push(Command::AppendDecision { writers });
    }

    fn on_decision_durable(&mut self, lsn: Lsn, out: &mut Vec<Command>) {
        if self.phase != Phase::Deciding {
            return;
        }
        self.decision = Some(lsn);
        if self.is_one_phase() {
            // Durable while the branch holds its locks: now it may commit.
            self.phase = Phase::OnePhase;
            self.branches[0].state = BranchState::Committing;
            out.push(Command::CommitOnePhase(0));
            return;
        }
        self.phase = Phase::Committing;
        self.reply(Outcome::Committed { lsn: Some(lsn) }, out);
        for b in 0..self.branches.len() {
            if matches!(self.branches[b].state, BranchState::Prepared(_)) {
                out.push(self.send_commit(b));
            }
        }
    }

    fn on_decision_failed(&mut self, error: String, out: &mut Vec<Command>) {
        if self.phase != Phase::Deciding {
            return;
        }
        if self.is_one_phase() {
            // The branch never committed: roll it back. Should the record have reached the
            // disk after all, recovery asks the resource, learns that, and journals an `Abort`.
            self.branches[0].state = BranchState::Ready;
            return self.abort(
                format!("the journal failed before the one-phase commit: {error}"),
                None,
                out,
            );
        }
        self.phase = Phase::InDoubt;
        self.reply(
            Outcome::InDoubt {
                error,
                branch: None,
            },
            out,
        );
    }

    /// The decision record never entered the journal: no record can surface later, so the
    /// transaction rolls back (one phase: the branch never committed either).
    fn on_decision_refused(&mut self, error: String, out: &mut Vec<Command>) {
        if self.phase != Phase::Deciding {
            return;
        }
        if self.is_one_phase() {
            self.branches[0].state = BranchState::Ready;
        }
        self.abort(
            format!("the journal refused the decision record, so nothing was decided: {error}"),
            None,
            out,
        );
    }

    fn on_resolved(
        &mut self,
        branch: BranchId,
        result: Result<(), ResourceError>,
        out: &mut Vec<Command>,
    ) {
        let Some(slot) = self.branches.get_mut(branch) else {
            return;
        };
        let done = match slot.state {
            BranchState::Committing => BranchState::Committed,
            BranchState::RollingBack => BranchState::RolledBack,
            _ => return,
        };
        match result {
            Ok(()) => {
                slot.state = done;
                slot.answered();
                self.maybe_finish(out);
            }
            Err(e) if e.class() == ErrorClass::Hazard => {
                // Retrying cannot help: the branch is over as far as concord can tell, and a
                // person must look.
                tracing::error!(xid = %self.xid, branch, error = %e, "phase 2 met a heuristic hazard; the branch is ended and reported");
                slot.state = done;
                slot.failed(&e);
                self.maybe_finish(out);
            }
            Err(e) => {
                slot.attempts += 1;
                // The runtime logs the retry ("…; retrying in N ms") with this error.
                slot.failed(&e);
                let delay_ms = self.policy.delay_ms(slot.attempts);
                out.push(Command::RetryAfter { branch, delay_ms });
            }
        }
    }

    fn on_retry_due(&mut self, branch: BranchId, out: &mut Vec<Command>) {
        match self.branches.get(branch).map(|b| &b.state) {
            Some(BranchState::Committing) if !self.is_one_phase() => {
                out.push(Command::Commit(branch))
            }
            Some(BranchState::RollingBack) => out.push(Command::Rollback(branch)),
            Some(BranchState::InDoubt) => out.push(Command::AskOnePhase {
                branch,
                redo: self.one_phase_redo(),
            }),
            _ => {}
        }
    }

    fn on_one_phase_answered(
        &mut self,
        branch: BranchId,
        result: Result<OnePhaseOutcome, ResourceError>,
        out: &mut Vec<Command>,
    ) {
        if self.phase != Phase::OnePhase {
            return;
        }
        let Some(slot) = self.branches.get_mut(branch) else {
            return;
        };
        let asked = match slot.state {
            BranchState::Committing => false,
            BranchState::InDoubt => true,
            _ => return,
        };
        let journaled = self.decision.is_some();
        match result {
            Ok(OnePhaseOutcome::Committed) => {
                slot.state = BranchState::Committed;
                slot.answered();
                let outcome = Outcome::Committed { lsn: self.decision };
                if journaled {
                    self.await_outcome(outcome);
                    out.push(Command::AppendOnePhaseEnd);
                } else {
                    self.phase = Phase::Finished;
                    self.reply(outcome, out);
                }
            }
            Ok(OnePhaseOutcome::RolledBack { error }) => {
                slot.state = BranchState::RolledBack;
                slot.answered();
                let reason = error.to_string();
                let outcome = Outcome::RolledBack {
                    reason: reason.clone(),
                    failed: Some(error),
                };
                if journaled {
                    self.await_outcome(outcome);
                    out.push(Command::AppendAbort { reason });
                } else {
                    self.phase = Phase::Finished;
                    self.reply(outcome, out);
                }
            }
            Err(e) if !journaled => {
                // Nothing journaled (nothing to replicate) and nothing to ask by: the caller
                // learns what a plain client learns when COMMIT loses its answer.
                slot.state = BranchState::InDoubt;
                slot.failed(&e);
                self.phase = Phase::Finished;
                self.reply(
                    Outcome::InDoubt {
                        error: format!(
                            "the answer to the one-phase commit was lost ({e}); the branch had nothing to replicate, so nothing was journaled and concord cannot find out"
                        ),
                        branch: None,
                    },
                    out,
                );
            }
            Err(e) => {
                slot.state = BranchState::InDoubt;
                slot.attempts += 1;
                slot.failed(&e);
                if asked {
                    let delay_ms = self.policy.delay_ms(slot.attempts);
                    self.reply(
                        Outcome::InDoubt {
                            error: format!(
                                "the answer to the one-phase commit was lost and the resource cannot tell yet ({e}); concord keeps asking and journals the outcome"
                            ),
                            branch: None,
                        },
                        out,
                    );
                    out.push(Command::RetryAfter { branch, delay_ms });
                } else {
                    out.push(Command::AskOnePhase {
                        branch,
                        redo: self.one_phase_redo(),
                    });
                }
            }
        }
    }

    /// A one-phase outcome's record is durable: now the caller hears it. When the journal
    /// failed instead, a commit is answered in doubt (the resource committed, but a site holding
    /// the journal cannot know it until recovery asks the resource again); a rollback is
    /// answered as it is, since no site applies a `OnePhase` record without its `End`.
    fn on_outcome_durable(&mut self, result: Result<(), String>, out: &mut Vec<Command>) {
        let awaiting = match &mut self.path {
            CommitPath::OnePhase { awaiting, .. } => awaiting.take(),
            CommitPath::TwoPhase { .. } => None,
        };
        let Some(outcome) = awaiting else {
            return;
        };
        // Without its `End` or `Abort` the `OnePhase` record is still needed (by recovery,
        // by a standby), so the machine is not finished: it stays in doubt until the restart.
        self.phase = match result {
            Ok(()) => Phase::Finished,
            Err(_) => Phase::InDoubt,
        };
        let outcome = match (result, outcome) {
            (Err(e), Outcome::Committed { .. }) => Outcome::InDoubt {
                error: format!(
                    "the branch committed in its resource, but the journal failed to record that ({e}); recovery at the next start asks the resource again and journals the outcome"
                ),
                branch: None,
            },
            (_, outcome) => outcome,
        };
        self.reply(outcome, out);
    }

    /// The branch that commits in one phase, when the transaction does (one branch: 0).
    pub fn one_phase_branch(&self) -> Option<BranchId> {
        self.is_one_phase().then_some(0)
    }

    fn is_one_phase(&self) -> bool {
        matches!(self.path, CommitPath::OnePhase { .. })
    }

    /// The one-phase branch's journaled redo, to ask its resource with (empty on two phases).
    fn one_phase_redo(&self) -> Vec<u8> {
        match &self.path {
            CommitPath::OnePhase { redo, .. } => redo.clone(),
            CommitPath::TwoPhase { .. } => Vec::new(),
        }
    }

    /// Keeps a one-phase outcome until its record is durable.
    fn await_outcome(&mut self, outcome: Outcome) {
        if let CommitPath::OnePhase { awaiting, .. } = &mut self.path {
            *awaiting = Some(outcome);
        }
    }

    fn send_commit(&mut self, branch: BranchId) -> Command {
        self.branches[branch].state = BranchState::Committing;
        Command::Commit(branch)
    }

    /// Rolls back every branch that may hold something; answers the caller.
    fn abort(&mut self, reason: String, failed: Option<ResourceError>, out: &mut Vec<Command>) {
        self.phase = Phase::RollingBack;
        for (i, b) in self.branches.iter_mut().enumerate() {
            match b.state {
                BranchState::Active | BranchState::Prepared(_) | BranchState::Ready => {
                    b.state = BranchState::RollingBack;
                    out.push(Command::Rollback(i));
                }
                BranchState::ReadOnly => b.state = BranchState::RolledBack,
                _ => {}
            }
        }
        self.reply(Outcome::RolledBack { reason, failed }, out);
        self.maybe_finish_rollback();
    }

    fn maybe_finish(&mut self, out: &mut Vec<Command>) {
        match self.phase {
            Phase::Committing => {
                let done = self
                    .branches
                    .iter()
                    .all(|b| matches!(b.state, BranchState::Committed | BranchState::ReadOnly));
                if done {
                    self.phase = Phase::Finished;
                    if matches!(self.path, CommitPath::TwoPhase { ends: true }) {
                        out.push(Command::AppendEnd);
                    }
                }
            }
            Phase::RollingBack => self.maybe_finish_rollback(),
            _ => {}
        }
    }

    fn maybe_finish_rollback(&mut self) {
        let busy = self
            .branches
            .iter()
            .any(|b| matches!(b.state, BranchState::RollingBack | BranchState::Preparing));
        if !busy {
            self.phase = Phase::Finished;
        }
    }

    fn finish_with(&mut self, outcome: Outcome, out: &mut Vec<Command>) {
        self.phase = Phase::Finished;
        self.branches.iter_mut().for_each(|b| {
            if b.state == BranchState::Active {
                b.state = BranchState::ReadOnly;
            }
        });
        self.reply(outcome, out);
    }

    fn reply(&mut self, outcome: Outcome, out: &mut Vec<Command>) {
        if self.replied {
            return;
        }
        self.replied = true;
        out.push(Command::Reply(outcome));
    }

    /// Checks the invariants (see the module docs); panics with the machine in the message.
    pub fn validate(&self) {
        let committed_any = self
            .branches
            .iter()
            .any(|b| matches!(b.state, BranchState::Committing | BranchState::Committed));
        let needs_decision = match &self.path {
            CommitPath::TwoPhase { .. } => true,
            CommitPath::OnePhase { redo, .. } => !redo.is_empty(),
        };
        assert!(
            !committed_any || self.decision.is_some() || !needs_decision,
            "a branch is committing before the decision is durable: {self:?}"
        );
        // A one-phase branch may end rolled back after its record: the resource said so.
        let rolling_back = self.branches.iter().any(|b| match b.state {
            BranchState::RollingBack => true,
            BranchState::RolledBack => !self.is_one_phase(),
            _ => false,
        });
        assert!(
            !(rolling_back && self.decision.is_some()),
            "a branch is rolled back after a durable decision: {self:?}"
        );
        assert!(
            !(self.phase == Phase::RollingBack && self.decision.is_some()),
            "rolling back a decided transaction: {self:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::Epoch;

    fn xid() -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(1),
            seq: 7,
        }
    }

    fn commit_vote(redo: &[u8]) -> Result<Vote, ResourceError> {
        Ok(Vote::Commit {
            redo: redo.to_vec(),
        })
    }

    fn refused() -> ResourceError {
        ResourceError::rejected("files", "disk full")
    }

    /// A one-phase machine whose branch has voted commit with `redo`.
    fn one_phase_voted(redo: &[u8]) -> TxnMachine {
        let mut m = TxnMachine::new_one_phase(xid(), RetryPolicy::default());
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: commit_vote(redo),
        });
        m
    }

    fn lost() -> ResourceError {
        ResourceError::InDoubt {
            resource: "orders".into(),
            message: "connection closed during COMMIT".into(),
        }
    }

    #[test]
    fn one_phase_journals_a_redo_before_the_commit_and_ends_after_it() {
        let mut m = TxnMachine::new_one_phase(xid(), RetryPolicy::default());
        assert_eq!(
            m.on(Event::CommitRequested),
            vec![Command::PrepareOnePhase(0)]
        );
        assert_eq!(
            m.on(Event::Prepared {
                branch: 0,
                vote: commit_vote(b"rows")
            }),
            vec![Command::AppendOnePhase {
                branch: 0,
                redo: b"rows".to_vec()
            }]
        );
        assert_eq!(
            m.on(Event::DecisionDurable { lsn: Lsn(4) }),
            vec![Command::CommitOnePhase(0)]
        );
        assert_eq!(
            m.on(Event::OnePhaseAnswered {
                branch: 0,
                result: Ok(OnePhaseOutcome::Committed)
            }),
            vec![Command::AppendOnePhaseEnd],
            "the caller is answered only once the End is durable"
        );
        assert!(!m.is_finished());
        assert_eq!(
            m.on(Event::OutcomeDurable { result: Ok(()) }),
            vec![Command::Reply(Outcome::Committed { lsn: Some(Lsn(4)) })]
        );
        assert!(m.is_finished());
    }

    #[test]
    fn one_phase_whose_end_fails_is_answered_in_doubt() {
        let mut m = one_phase_voted(b"rows");
        m.on(Event::DecisionDurable { lsn: Lsn(4) });
        m.on(Event::OnePhaseAnswered {
            branch: 0,
            result: Ok(OnePhaseOutcome::Committed),
        });
        let answer = m.on(Event::OutcomeDurable {
            result: Err("fsync failed".into()),
        });
        assert!(
            matches!(&answer[..], [Command::Reply(Outcome::InDoubt { error, .. })] if error.contains("fsync failed")),
            "{answer:?}"
        );
        assert!(m.is_finished());
    }

    #[test]
    fn one_phase_without_redo_commits_without_a_record() {
        let mut m = TxnMachine::new_one_phase(xid(), RetryPolicy::default());
        m.on(Event::CommitRequested);
        assert_eq!(
            m.on(Event::Prepared {
                branch: 0,
                vote: commit_vote(b"")
            }),
            vec![Command::CommitOnePhase(0)]
        );
        assert_eq!(
            m.on(Event::OnePhaseAnswered {
                branch: 0,
                result: Ok(OnePhaseOutcome::Committed)
            }),
            vec![Command::Reply(Outcome::Committed { lsn: None })]
        );
        // Its answer lost: nothing to ask by, the caller hears it is unknown.
        let mut m = one_phase_voted(b"");
        let lost = m.on(Event::OnePhaseAnswered {
            branch: 0,
            result: Err(lost()),
        });
        assert!(
            matches!(&lost[..], [Command::Reply(Outcome::InDoubt { error, .. })] if error.contains("nothing was journaled"))
        );
        assert!(m.is_finished());
    }

    fn serialization_failure() -> ResourceError {
        ResourceError::Unavailable {
            resource: "orders".into(),
            message: "could not serialize".into(),
        }
    }

    #[test]
    fn one_phase_refused_at_commit_journals_an_abort() {
        let mut m = one_phase_voted(b"rows");
        m.on(Event::DecisionDurable { lsn: Lsn(4) });
        let refused = m.on(Event::OnePhaseAnswered {
            branch: 0,
            result: Ok(OnePhaseOutcome::RolledBack {
                error: serialization_failure(),
            }),
        });
        let reason = serialization_failure().to_string();
        assert_eq!(
            refused,
            vec![Command::AppendAbort {
                reason: reason.clone()
            }]
        );
        assert!(!m.is_finished());
        assert_eq!(
            m.on(Event::OutcomeDurable { result: Ok(()) }),
            vec![Command::Reply(Outcome::RolledBack {
                reason,
                failed: Some(serialization_failure()),
            })]
        );
        assert!(m.is_finished());
    }

    #[test]
    fn one_phase_with_a_lost_answer_asks_until_the_resource_knows() {
        let mut m = one_phase_voted(b"rows");
        m.on(Event::DecisionDurable { lsn: Lsn(4) });
        let ask = Command::AskOnePhase {
            branch: 0,
            redo: b"rows".to_vec(),
        };
        assert_eq!(
            m.on(Event::OnePhaseAnswered {
                branch: 0,
                result: Err(lost())
            }),
            vec![ask.clone()]
        );
        // The resource cannot tell yet: the caller hears "in doubt", the asking goes on.
        let again = m.on(Event::OnePhaseAnswered {
            branch: 0,
            result: Err(lost()),
        });
        assert!(matches!(
            &again[..],
            [
                Command::Reply(Outcome::InDoubt { .. }),
                Command::RetryAfter { branch: 0, .. }
            ]
        ));
        assert_eq!(m.on(Event::RetryDue { branch: 0 }), vec![ask]);
        assert_eq!(
            m.on(Event::OnePhaseAnswered {
                branch: 0,
                result: Ok(OnePhaseOutcome::Committed)
            }),
            vec![Command::AppendOnePhaseEnd]
        );
        assert_eq!(m.on(Event::OutcomeDurable { result: Ok(()) }), vec![]);
        assert!(m.is_finished());
    }

    #[test]
    fn one_phase_rolls_back_when_its_record_fails() {
        let mut m = one_phase_voted(b"rows");
        let failed = m.on(Event::DecisionFailed {
            error: "fsync failed".into(),
        });
        assert_eq!(failed[0], Command::Rollback(0));
        assert!(
            matches!(&failed[1], Command::Reply(Outcome::RolledBack { reason, .. }) if reason.contains("fsync failed"))
        );
        m.on(Event::Resolved {
            branch: 0,
            result: Ok(()),
        });
        assert_eq!(m.phase(), &Phase::Finished);
    }

    #[test]
    fn recovery_asks_about_an_unfinished_one_phase_record() {
        let (mut m, commands) = TxnMachine::recovered_one_phase(
            xid(),
            Lsn(8),
            b"rows".to_vec(),
            RetryPolicy::default(),
        );
        assert_eq!(
            commands,
            vec![Command::AskOnePhase {
                branch: 0,
                redo: b"rows".to_vec()
            }]
        );
        assert_eq!(
            m.on(Event::OnePhaseAnswered {
                branch: 0,
                result: Ok(OnePhaseOutcome::RolledBack {
                    error: ResourceError::rejected("orders", "lost")
                })
            }),
            vec![Command::AppendAbort {
                reason: "resource orders: lost".into()
            }]
        );
        assert_eq!(m.on(Event::OutcomeDurable { result: Ok(()) }), vec![]);
        assert!(m.is_finished());
    }

    #[test]
    fn two_writers_commit_after_a_durable_decision_and_end() {
        let mut m = TxnMachine::new(xid(), 2, RetryPolicy::default());
        assert_eq!(
            m.on(Event::CommitRequested),
            vec![Command::Prepare(0), Command::Prepare(1)]
        );
        assert!(
            m.on(Event::Prepared {
                branch: 1,
                vote: commit_vote(b"b")
            })
            .is_empty()
        );
        let decide = m.on(Event::Prepared {
            branch: 0,
            vote: commit_vote(b"a"),
        });
        assert_eq!(
            decide,
            vec![Command::AppendDecision {
                writers: vec![(0, b"a".to_vec()), (1, b"b".to_vec())]
            }]
        );
        let durable = m.on(Event::DecisionDurable { lsn: Lsn(5) });
        assert_eq!(
            durable,
            vec![
                Command::Reply(Outcome::Committed { lsn: Some(Lsn(5)) }),
                Command::Commit(0),
                Command::Commit(1)
            ]
        );
        assert!(
            m.on(Event::Resolved {
                branch: 0,
                result: Ok(())
            })
            .is_empty()
        );
        assert_eq!(
            m.on(Event::Resolved {
                branch: 1,
                result: Ok(())
            }),
            vec![Command::AppendEnd]
        );
        assert!(m.is_finished());
    }

    #[test]
    fn a_failed_prepare_rolls_back_every_branch_and_names_it() {
        let mut m = TxnMachine::new(xid(), 3, RetryPolicy::default());
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: commit_vote(b"a"),
        });
        let commands = m.on(Event::Prepared {
            branch: 1,
            vote: Err(refused()),
        });
        assert!(commands.contains(&Command::Rollback(0)));
        assert!(commands.contains(&Command::Rollback(1)));
        assert!(commands.iter().any(|c| matches!(c, Command::Reply(Outcome::RolledBack { reason, failed: Some(failed) }) if reason.contains("branch 1") && reason.contains("disk full") && *failed == refused())));
        assert!(
            !commands
                .iter()
                .any(|c| matches!(c, Command::AppendDecision { .. }))
        );
        // The third branch's late yes vote is undone too.
        assert_eq!(
            m.on(Event::Prepared {
                branch: 2,
                vote: commit_vote(b"c")
            }),
            vec![Command::Rollback(2)]
        );
        for b in 0..3 {
            m.on(Event::Resolved {
                branch: b,
                result: Ok(()),
            });
        }
        assert_eq!(m.phase(), &Phase::Finished);
    }

    #[test]
    fn read_only_branches_need_no_decision() {
        let mut m = TxnMachine::new(xid(), 2, RetryPolicy::default());
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: Ok(Vote::ReadOnly),
        });
        let done = m.on(Event::Prepared {
            branch: 1,
            vote: Ok(Vote::ReadOnly),
        });
        assert_eq!(done, vec![Command::Reply(Outcome::Committed { lsn: None })]);
        assert!(m.is_finished());
    }

    #[test]
    fn a_read_only_branch_leaves_phase_two_to_the_writer() {
        let mut m = TxnMachine::new(xid(), 2, RetryPolicy::default());
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: Ok(Vote::ReadOnly),
        });
        let decide = m.on(Event::Prepared {
            branch: 1,
            vote: commit_vote(b"w"),
        });
        assert_eq!(
            decide,
            vec![Command::AppendDecision {
                writers: vec![(1, b"w".to_vec())]
            }]
        );
        let durable = m.on(Event::DecisionDurable { lsn: Lsn(1) });
        assert!(durable.contains(&Command::Commit(1)) && !durable.contains(&Command::Commit(0)));
    }

    #[test]
    fn phase_two_failures_retry_with_capped_exponential_backoff() {
        let policy = RetryPolicy {
            first_ms: 10,
            max_ms: 50,
        };
        let mut m = TxnMachine::new(xid(), 1, policy);
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: commit_vote(b"a"),
        });
        m.on(Event::DecisionDurable { lsn: Lsn(1) });
        let down = || ResourceError::Unavailable {
            resource: "files".into(),
            message: "down".into(),
        };
        let mut delays = Vec::new();
        for _ in 0..5 {
            let retry = m.on(Event::Resolved {
                branch: 0,
                result: Err(down()),
            });
            let [
                Command::RetryAfter {
                    branch: 0,
                    delay_ms,
                },
            ] = retry[..]
            else {
                panic!("{retry:?}")
            };
            delays.push(delay_ms);
            assert_eq!(
                m.on(Event::RetryDue { branch: 0 }),
                vec![Command::Commit(0)]
            );
        }
        assert_eq!(delays, vec![10, 20, 40, 50, 50]);
        assert_eq!(
            m.on(Event::Resolved {
                branch: 0,
                result: Ok(())
            }),
            vec![Command::AppendEnd]
        );
    }

    #[test]
    fn a_failed_decision_leaves_the_outcome_in_doubt() {
        let mut m = TxnMachine::new(xid(), 1, RetryPolicy::default());
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: commit_vote(b"a"),
        });
        let commands = m.on(Event::DecisionFailed {
            error: "journal poisoned".into(),
        });
        assert_eq!(
            commands,
            vec![Command::Reply(Outcome::InDoubt {
                error: "journal poisoned".into(),
                branch: None,
            })]
        );
        assert_eq!(m.phase(), &Phase::InDoubt);
    }

    #[test]
    fn a_refused_decision_rolls_every_prepared_branch_back() {
        let mut m = TxnMachine::new(xid(), 2, RetryPolicy::default());
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: commit_vote(b"a"),
        });
        m.on(Event::Prepared {
            branch: 1,
            vote: commit_vote(b"b"),
        });
        let commands = m.on(Event::DecisionRefused {
            error: "the journal is closed".into(),
        });
        assert_eq!(
            &commands[..2],
            &[Command::Rollback(0), Command::Rollback(1)]
        );
        assert!(
            matches!(&commands[2..], [Command::Reply(Outcome::RolledBack { reason, .. })] if reason.contains("the journal is closed")),
            "{commands:?}"
        );
        m.on(Event::Resolved {
            branch: 0,
            result: Ok(()),
        });
        m.on(Event::Resolved {
            branch: 1,
            result: Ok(()),
        });
        assert!(m.is_finished());
    }

    #[test]
    fn a_rollback_request_after_the_decision_changes_nothing() {
        let mut m = TxnMachine::new(xid(), 1, RetryPolicy::default());
        m.on(Event::CommitRequested);
        m.on(Event::Prepared {
            branch: 0,
            vote: commit_vote(b"a"),
        });
        assert!(
            m.on(Event::RollbackRequested {
                reason: "late".into()
            })
            .is_empty()
        );
        m.on(Event::DecisionDurable { lsn: Lsn(2) });
        assert!(
            m.on(Event::RollbackRequested {
                reason: "late".into()
            })
            .is_empty()
        );
    }

    #[test]
    fn recovery_redrives_commits_and_rolls_back_orphans() {
        let (mut m, commands) =
            TxnMachine::recovered_commit(xid(), Lsn(9), 2, RetryPolicy::default());
        assert_eq!(commands, vec![Command::Commit(0), Command::Commit(1)]);
        m.on(Event::Resolved {
            branch: 0,
            result: Ok(()),
        });
        assert_eq!(
            m.on(Event::Resolved {
                branch: 1,
                result: Ok(())
            }),
            vec![Command::AppendEnd]
        );
        let (mut o, commands) = TxnMachine::recovered_orphan(xid(), RetryPolicy::default());
        assert_eq!(commands, vec![Command::Rollback(0)]);
        o.on(Event::Resolved {
            branch: 0,
            result: Ok(()),
        });
        assert_eq!(o.phase(), &Phase::Finished);
    }

    /// Drives many machines with results delivered in random orders and random failures: every
    /// invariant holds after every step (`validate` runs in `on`), a committed outcome always
    /// ends with every writer committed, a rolled-back one never issues a commit.
    #[test]
    fn random_interleavings_keep_the_invariants() {
        for seed in 0..2_000u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let branches = (next() % 4) as usize;
            let policy = RetryPolicy {
                first_ms: 1,
                max_ms: 4,
            };
            let one_phase = branches == 1 && next() % 2 == 0;
            let mut m = if one_phase {
                TxnMachine::new_one_phase(xid(), policy)
            } else {
                TxnMachine::new(xid(), branches, policy)
            };
            let mut pending = m.on(Event::CommitRequested);
            let mut outcome = None;
            let mut commits = 0;
            let mut steps = 0;
            let mut outcome_unrecorded = false;
            while !pending.is_empty() {
                steps += 1;
                assert!(steps < 10_000, "seed {seed}: no progress");
                let command = pending.remove((next() as usize) % pending.len());
                let fail = next() % 4 == 0;
                let event = match command {
                    Command::Prepare(b) | Command::PrepareOnePhase(b) => {
                        let vote = match next() % 4 {
                            _ if fail => Err(refused()),
                            0 => Ok(Vote::ReadOnly),
                            1 => commit_vote(&[]),
                            _ => commit_vote(&[b as u8]),
                        };
                        Some(Event::Prepared { branch: b, vote })
                    }
                    Command::AppendOnePhase { .. } if fail => Some(Event::DecisionFailed {
                        error: "poisoned".into(),
                    }),
                    Command::AppendOnePhase { .. } => Some(Event::DecisionDurable { lsn: Lsn(1) }),
                    Command::CommitOnePhase(branch) | Command::AskOnePhase { branch, .. } => {
                        if matches!(command, Command::CommitOnePhase(_)) {
                            commits += 1;
                        }
                        let result = match next() % 3 {
                            _ if fail => Err(lost()),
                            0 => Ok(OnePhaseOutcome::RolledBack {
                                error: ResourceError::rejected("r", "refused"),
                            }),
                            _ => Ok(OnePhaseOutcome::Committed),
                        };
                        Some(Event::OnePhaseAnswered { branch, result })
                    }
                    Command::AppendAbort { .. } | Command::AppendOnePhaseEnd => {
                        outcome_unrecorded |= fail;
                        let result = if fail { Err("poisoned".into()) } else { Ok(()) };
                        Some(Event::OutcomeDurable { result })
                    }
                    Command::AppendDecision { .. } => Some(Event::DecisionDurable { lsn: Lsn(1) }),
                    Command::Commit(b) => {
                        commits += 1;
                        let result = if fail { Err(refused()) } else { Ok(()) };
                        Some(Event::Resolved { branch: b, result })
                    }
                    Command::Rollback(b) => {
                        let result = if fail { Err(refused()) } else { Ok(()) };
                        Some(Event::Resolved { branch: b, result })
                    }
                    Command::RetryAfter { branch, .. } => Some(Event::RetryDue { branch }),
                    Command::AppendEnd => None,
                    Command::Reply(o) => {
                        assert!(outcome.is_none(), "seed {seed}: two replies");
                        outcome = Some(o);
                        None
                    }
                };
                if let Some(event) = event {
                    pending.extend(m.on(event));
                }
            }
            // A one-phase outcome the journal failed to record leaves the machine in doubt
            // (its record is still needed); everything else finishes.
            let expected = if outcome_unrecorded {
                Phase::InDoubt
            } else {
                Phase::Finished
            };
            assert_eq!(m.phase(), &expected, "seed {seed}: {m:?}");
            match outcome {
                Some(Outcome::Committed { .. }) => assert!(
                    m.branches()
                        .iter()
                        .all(|b| matches!(b.state, BranchState::Committed | BranchState::ReadOnly))
                ),
                Some(Outcome::RolledBack { .. }) if one_phase => assert!(
                    m.branches()
                        .iter()
                        .all(|b| matches!(b.state, BranchState::RolledBack)),
                    "seed {seed}: {m:?}"
                ),
                Some(Outcome::RolledBack { .. }) => assert_eq!(commits, 0, "seed {seed}"),
                // A one-phase commit whose answer was lost.
                Some(Outcome::InDoubt { .. }) if one_phase => {}
                other => panic!("seed {seed}: outcome {other:?}"),
            }
        }
    }
}
