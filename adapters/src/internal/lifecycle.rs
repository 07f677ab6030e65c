//! The branch lifecycle the files, mail and kv resources share: begin, prepare, resolve (commit
//! or rollback), fence and the replay shell, written once with a hook for each step that differs.
//!
//! Every one of the three resources runs a branch the same way, and only the work inside the
//! steps is its own:
//!
//! * **begin** checks the instance (poisoned?, fenced?) and opens the branch in the table
//!   ([`Branches::begin`]) with the resource's new branch ([`Lifecycle::new_branch`]).
//! * **prepare** holds the fence gate shared; looks at the branch under the state lock (a
//!   repeated prepare votes again from what its prepare made durable,
//!   [`Lifecycle::vote_again`]; a branch without work votes read-only and is forgotten, its
//!   locks released; otherwise it copies what the prepare works on, [`Lifecycle::work_of`]);
//!   stops at a test's pause; runs the resource's work ([`Lifecycle::prepare_work`]: sync staged
//!   content and append a `PREPARED` record, or store a sled batch); and records the outcome
//!   under the state lock (prepared with what was made durable, [`Lifecycle::prepared`], or
//!   active again, [`Lifecycle::prepare_failed`]). A fatal failure poisons the instance.
//! * **resolve** (commit or rollback) holds the fence gate shared; starts the resolution under
//!   the state lock ([`Branches::start_resolve`] with its refusals, then
//!   [`Lifecycle::resolving`]); runs the resource's work ([`Lifecycle::resolve_work`]); then,
//!   under the state lock, either puts the branch back where it was (failure) or records the
//!   resolution ([`Lifecycle::record_resolution`]: a branch log's `COMMITTED`/`ROLLED_BACK`,
//!   appended under the lock so that it follows any copy of the prepare record a trim carries
//!   forward) and forgets the branch, releasing its locks ([`Lifecycle::release`]); last, the
//!   resource waits for what it recorded and does its housekeeping ([`Lifecycle::resolved`]:
//!   a checkpoint, a trim).
//! * **fence** holds the fence gate exclusively, stores the epoch durably
//!   ([`Lifecycle::store_fence`]) and raises it in memory (see [`Gate`]).
//! * **replay** runs one batch at a time (the shell's `replaying` lock); a single replay is a
//!   batch of one. Redos at or below the applied LSN are left out; a malformed one refuses the
//!   batch before anything is applied; the resource applies the rest
//!   ([`Lifecycle::replay_work`], which stores the batch's last LSN durably with them) and the
//!   applied LSN follows in memory.
//!
//! `recover`, `fence_epoch` and `applied_lsn` are [`Instance`]'s own answers.
//!
//! # Implementation caveats
//!
//! * The hooks that do I/O return futures that must be `Send` (the `Resource` trait's futures
//!   are boxed as `Send`); the shells here never hold the state lock across an `.await`.
//! * A resolution's debug line is logged here ("committed", "rolled back"); the resources log
//!   only what is their own.

use std::future::Future;
use std::sync::Arc;

use journal::Appending;

use crate::internal::branches::{Branches, Phase, Starting};
use crate::internal::instance::{Gate, Instance, InstanceState};
use crate::internal::io::blocking;
use crate::internal::pauses::Pauses;
use crate::{Epoch, Lsn, ResourceError, Vote, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// What the shared lifecycle keeps in every resource that runs on it.
#[derive(Default)]
pub(crate) struct Shell {
    /// The fence gate: prepares, commits and rollbacks hold it shared, a fence exclusively
    /// (see `Gate`).
    pub(crate) gate: Gate,
    /// Pauses tests arm inside operations.
    pub(crate) pauses: Pauses,
    /// Serializes replays, so that the LSN check and the apply are one step.
    pub(crate) replaying: tokio::sync::Mutex<()>,
}

/// The steps of a resource's branch lifecycle that are its own; see the module docs.
pub(crate) trait Lifecycle: Instance + Send + Sync + Sized + 'static {
    /// What the resource keeps of a branch.
    type Branch;
    /// What a prepare works on, copied from the branch under the state lock.
    type Work: Send + 'static;
    /// What a successful prepare made durable.
    type Prepared: Send + 'static;
    /// What a resolution works on, copied from the branch under the state lock.
    type Resolving: Send + 'static;
    /// A decoded redo, for replay.
    type Redo: Send + 'static;
    /// What a panicked blocking task was, in its error ("file", "kv").
    const TASK: &'static str;

    /// The fence gate, the test pauses and the replay lock.
    fn shell(&self) -> &Shell;
    /// The table of branches in the state.
    fn branches(st: &mut Self::State) -> &mut Branches<Self::Branch>;

    /// A branch just begun.
    fn new_branch() -> Self::Branch;
    /// Whether an active branch has anything to prepare (without, it votes read-only).
    fn has_work(branch: &Self::Branch) -> bool;
    /// The vote of a branch prepared already, from what its prepare made durable.
    fn vote_again(&self, xid: &Xid, branch: &Self::Branch) -> Result<Vote>;
    /// What the prepare of an active branch works on.
    fn work_of(branch: &Self::Branch) -> Self::Work;
    /// Makes the branch durable; no state lock held.
    fn prepare_work(
        self: &Arc<Self>,
        xid: &Xid,
        work: Self::Work,
    ) -> impl Future<Output = Result<Self::Prepared>> + Send;
    /// Records a durable prepare in the branch (now prepared), under the state lock; the vote.
    fn prepared(&self, xid: &Xid, branch: &mut Self::Branch, prepared: Self::Prepared) -> Vote;
    /// Clears what a failed prepare left in the branch (now active again), under the state lock.
    fn prepare_failed(_branch: &mut Self::Branch) {}

    /// What the resolution of a branch (which was `previous` before) works on.
    fn resolving(branch: &Self::Branch, previous: Phase) -> Self::Resolving;
    /// Commits (`commit`) or rolls back the branch; no state lock held.
    fn resolve_work(
        self: &Arc<Self>,
        xid: &Xid,
        commit: bool,
        resolving: Self::Resolving,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Records the resolution of a prepared branch, under the state lock; what to wait for.
    fn record_resolution(&self, _xid: &Xid, _commit: bool) -> Result<Option<Appending>> {
        Ok(None)
    }
    /// Forgets the branch (resolved, or voted read-only) and releases what it holds, under the
    /// state lock.
    fn release(&self, st: &mut Self::State, xid: &Xid);
    /// After a resolution: waits for what [`Lifecycle::record_resolution`] appended, and the
    /// resource's housekeeping.
    fn resolved(
        self: &Arc<Self>,
        appending: Option<Appending>,
        commit: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Stores the fence epoch durably (blocking, on the blocking pool); the epoch stored.
    fn store_fence(&self, epoch: Epoch) -> Result<Epoch>;

    /// Decodes a redo for replay; a malformed one is described in the error.
    fn decode_redo(redo: &[u8]) -> Result<Self::Redo, String>;
    /// Applies the redos of a batch (LSNs strictly increasing, every one above the applied
    /// LSN, at least one) in order, and stores the last LSN as applied, durably and all or
    /// nothing as seen after a crash (see each resource's "Crashes"); no state lock held.
    fn replay_work(
        self: &Arc<Self>,
        batch: Vec<(Lsn, Self::Redo)>,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// `Resource::begin`.
pub(crate) fn begin<I: Lifecycle>(inner: &I, xid: &Xid) -> Result<()> {
    let mut st = inner.state();
    inner.usable(&st)?;
    inner.not_fenced(&st, xid)?;
    I::branches(&mut st).begin(inner, xid, I::new_branch)
}

/// `Resource::prepare`.
pub(crate) async fn prepare<I: Lifecycle>(inner: &Arc<I>, xid: &Xid) -> Result<Vote> {
    let _gate = inner.shell().gate.read().await;
    let work = match start_prepare(&**inner, xid)? {
        Ok(vote) => return Ok(vote),
        Err(work) => work,
    };
    inner.shell().pauses.at_prepare(xid).await;
    let result = inner.prepare_work(xid, work).await;
    finish_prepare(&**inner, xid, result)
}

/// Looks at the branch: the vote when there is nothing to prepare (`Ok`), else the work.
fn start_prepare<I: Lifecycle>(inner: &I, xid: &Xid) -> Result<Result<Vote, I::Work>> {
    let mut st = inner.state();
    inner.usable(&st)?;
    let fence = st.shared().fence;
    match I::branches(&mut st).start_prepare(inner, xid, fence, I::has_work)? {
        Starting::ReadOnly => Ok(Ok(Vote::ReadOnly)),
        Starting::Again(branch) => inner.vote_again(xid, branch).map(Ok),
        Starting::Prepare(branch) => Ok(Err(I::work_of(branch))),
        Starting::Empty => {
            inner.release(&mut st, xid);
            I::branches(&mut st).voted_read_only(xid);
            Ok(Ok(Vote::ReadOnly))
        }
    }
}

/// Ends a prepare: prepared on success, active again on failure.
fn finish_prepare<I: Lifecycle>(inner: &I, xid: &Xid, result: Result<I::Prepared>) -> Result<Vote> {
    let result = inner.check(result);
    let mut st = inner.state();
    let branch = I::branches(&mut st).finish_prepare(inner, xid, result.is_ok())?;
    match result {
        Ok(prepared) => Ok(inner.prepared(xid, branch, prepared)),
        Err(e) => {
            I::prepare_failed(branch);
            Err(e)
        }
    }
}

/// `Resource::commit` (`commit`) and `Resource::rollback`.
pub(crate) async fn resolve<I: Lifecycle>(inner: &Arc<I>, xid: &Xid, commit: bool) -> Result<()> {
    let _gate = inner.shell().gate.read().await;
    let Some((previous, resolving)) = start_resolve(&**inner, xid, commit)? else {
        return Ok(());
    };
    let result = inner.resolve_work(xid, commit, resolving).await;
    let appending = finish_resolve(&**inner, xid, previous, commit, result)?;
    inner.resolved(appending, commit).await
}

/// Marks the branch as being resolved; `None` when there is nothing to resolve.
fn start_resolve<I: Lifecycle>(
    inner: &I,
    xid: &Xid,
    commit: bool,
) -> Result<Option<(Phase, I::Resolving)>> {
    let mut st = inner.state();
    inner.usable(&st)?;
    let fence = st.shared().fence;
    let started = I::branches(&mut st).start_resolve(inner, xid, commit, fence)?;
    Ok(started.map(|(previous, branch)| (previous, I::resolving(branch, previous))))
}

/// Ends a resolution: on failure the branch goes back to `previous`; on success a prepared
/// branch's resolution is recorded and the branch forgotten, all under the state lock.
fn finish_resolve<I: Lifecycle>(
    inner: &I,
    xid: &Xid,
    previous: Phase,
    commit: bool,
    result: Result<()>,
) -> Result<Option<Appending>> {
    let result = inner.check(result);
    let mut st = inner.state();
    if let Err(e) = result {
        I::branches(&mut st).resolution_failed(xid, previous);
        return Err(e);
    }
    let mut appending = None;
    if I::branches(&mut st).is_prepared(xid) {
        match inner.record_resolution(xid, commit) {
            Ok(recorded) => appending = recorded,
            Err(e) => {
                I::branches(&mut st).resolution_failed(xid, previous);
                drop(st);
                return inner.check(Err(e));
            }
        }
    }
    inner.release(&mut st, xid);
    let outcome = if commit { "committed" } else { "rolled back" };
    tracing::debug!(resource = %inner.name(), %xid, "{outcome}");
    Ok(appending)
}

/// `Resource::fence`: one fence at a time, never lowered, the epoch stored durably (a failure
/// poisons the instance) before the state takes it. It holds the fence gate exclusively (see
/// [`Gate`]), so it waits for every prepare, commit and rollback in flight.
pub(crate) async fn fence<I: Lifecycle>(inner: &Arc<I>, epoch: Epoch) -> Result<()> {
    let _fencing = inner.shell().gate.write().await;
    let current = inner.fence_epoch()?;
    if epoch <= current {
        return Ok(());
    }
    let worker = Arc::clone(inner);
    let stored = blocking(inner.name(), I::TASK, move || worker.store_fence(epoch)).await;
    let stored = inner.check(stored)?;
    let mut st = inner.state();
    let shared = st.shared_mut();
    shared.fence = shared.fence.max(stored);
    tracing::info!(resource = %inner.name(), from = %current, to = %shared.fence, "fence raised");
    Ok(())
}

/// `Resource::replay`: a batch of one.
pub(crate) async fn replay<I: Lifecycle>(inner: &Arc<I>, redo: &[u8], lsn: Lsn) -> Result<()> {
    replay_batch(inner, &[(lsn, redo.to_vec())]).await
}

/// `Resource::replay_batch`: the redos above the applied LSN, decoded (a malformed one refuses
/// the whole batch before anything is applied), applied together with the last LSN.
pub(crate) async fn replay_batch<I: Lifecycle>(
    inner: &Arc<I>,
    batch: &[(Lsn, Vec<u8>)],
) -> Result<()> {
    crate::check_batch_lsns(inner.name(), batch)?;
    let _replaying = inner.shell().replaying.lock().await;
    let applied = inner.applied_lsn()?;
    let mut pending = Vec::new();
    for (lsn, redo) in batch.iter().filter(|(lsn, _)| *lsn > applied) {
        let redo = I::decode_redo(redo)
            .map_err(|e| inner.rejected(format!("replay of lsn {lsn}: malformed redo: {e}")))?;
        pending.push((*lsn, redo));
    }
    let Some(&(last, _)) = pending.last() else {
        return Ok(());
    };
    let applied = inner.replay_work(pending).await;
    inner.check(applied)?;
    let mut st = inner.state();
    let shared = st.shared_mut();
    shared.applied_lsn = shared.applied_lsn.max(last);
    Ok(())
}
