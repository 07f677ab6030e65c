//! The coordinator: two-phase commit across resources, with a durable decision in the journal.
//!
//! An application begins a transaction ([`Coordinator::begin`] → an [`adapters::Xid`]), joins
//! resources to it and does work in each through the resource's own branch handle, then commits
//! ([`Coordinator::commit`]). The coordinator prepares every branch concurrently; if all vote yes
//! it appends one `Commit` record holding every writer's redo and, once that record is durable
//! (group commit), tells the caller "committed" and commits every branch; an `End` record closes
//! the transaction. Presumed abort: without a `Commit` record a transaction never happened, so a
//! crash before the decision ends in rollback, and a crash after it in commit.
//!
//! The parts:
//!
//! * [`engine`] — the protocol as a pure state machine per transaction: events in, commands out,
//!   no I/O, no clock.
//! * [`runtime`] — the [`Coordinator`] façade and, one module per seam, what it runs with
//!   tokio, the journal and the resources: the per-transaction driver; recovery at open; the
//!   background tasks (the timeout reaper, the orphan sweeper, which rolls back prepared branches
//!   of this node that no transaction owns and the journal has no decision for after
//!   `orphan_sweep_ms`, the checkpointer); operator views (`list`, `resolve`).
//! * [`record`] — the journal records (`Commit`, `End`, `Resolve`, `OnePhase`, `Abort`,
//!   `Forget`) and their versioned encoding.
//! * [`ledger`] — what those records mean together, folded in one pure place (decided, open,
//!   in doubt), used by recovery, the sweeper, the operator commands and the standby.
//! * [`resolve`] — an operator's resolution of a stuck transaction, shared by the running
//!   coordinator and `concord txn resolve`.
//! * [`retention`] — which journal segments are still needed (unfinished transactions, the
//!   retention floor a standby holds) and the checkpoint that removes the others.
//! * [`failpoint`] — named points on the commit path where crash tests kill the process;
//!   compiled only with the feature `failpoints` (a release build ignores `CONCORD_FAILPOINT`).
//!
//! # Implementation caveats
//!
//! * Recovery reads the whole retained journal: since the checkpoint removes every segment
//!   nothing needs ([`retention`]), that is the records from the oldest unfinished transaction on.
//! * The caller's own task drives each transaction until its outcome is known, and a task of its
//!   own takes over only what still waits after that (see [`runtime`]); there is no cap on
//!   concurrent transactions yet beyond the journal's queue bound.

pub mod engine;
pub mod failpoint;
pub mod ledger;
pub mod metrics;
pub mod record;
pub mod resolve;
pub mod retention;
pub mod runtime;

pub use engine::{Outcome, RetryPolicy};
pub use runtime::{
    CommitGate, CoordError, Coordinator, CoordinatorConfig, RecoveryReport, TxnCounts, TxnInfo,
};
