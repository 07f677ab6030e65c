//! The kv resource's steps of the shared branch lifecycle (`internal::lifecycle`).
//!
//! What is the kv resource's own: a prepare stores the branch's batch in the prepared tree in
//! one sled transaction with the fence check, and syncs (a fence stored meanwhile refuses it); a
//! commit applies the batch and removes it in one transaction, a rollback removes it (a branch
//! that never prepared has nothing on disk); nothing is recorded besides (the prepared tree is
//! the record); releasing a branch releases its key locks; the fence epoch and the applied LSN
//! live in the meta tree, the latter written in the replay's own transaction.
//!
//! # Implementation caveats
//!
//! * The replay's fail point stops it before its transaction: a replay (a whole batch) is one
//!   sled transaction with one sync, so nothing of it can be half applied.

use std::sync::Arc;

use journal::{Appending, Lsn};

use super::store::Prepared;
use super::{Branch, Inner, KvWrite, State, TASK, decode_batch};
use crate::internal::branches::{Branches, Phase};
use crate::internal::instance::{Instance, InstanceState};
use crate::internal::io::blocking;
use crate::internal::lifecycle::Lifecycle;
use crate::internal::lifecycle::Shell;
use crate::{Epoch, ResourceError, Vote, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl Lifecycle for Inner {
    type Branch = Branch;
    /// The batch to store.
    type Work = Arc<Vec<u8>>;
    /// The batch stored.
    type Prepared = Arc<Vec<u8>>;
    /// The phase the branch was in: only a prepared one has an entry to resolve.
    type Resolving = Phase;
    type Redo = Vec<KvWrite>;
    const TASK: &'static str = TASK;

    fn shell(&self) -> &Shell {
        &self.shell
    }

    fn branches(st: &mut State) -> &mut Branches<Branch> {
        &mut st.branches
    }

    fn new_branch() -> Branch {
        Branch::new()
    }

    fn has_work(branch: &Branch) -> bool {
        !branch.writes.is_empty()
    }

    fn vote_again(&self, _xid: &Xid, branch: &Branch) -> Result<Vote> {
        let batch = branch.prepared.clone().unwrap_or_default();
        Ok(Vote::Commit {
            redo: batch.to_vec(),
        })
    }

    fn work_of(branch: &Branch) -> Arc<Vec<u8>> {
        Arc::new(branch.encode())
    }

    /// A fence stored meanwhile refuses the prepare, and the fence in memory follows it.
    async fn prepare_work(
        self: &Arc<Self>,
        xid: &Xid,
        batch: Arc<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        let (worker, id, stored) = (self.clone(), *xid, batch.clone());
        let prepared =
            blocking(&self.name, TASK, move || worker.store.prepare(&id, &stored)).await?;
        match prepared {
            Prepared::Stored => Ok(batch),
            Prepared::Fenced(fence) => {
                let mut st = self.state();
                let shared = st.shared_mut();
                shared.fence = shared.fence.max(fence);
                Err(self.fenced(xid, fence))
            }
        }
    }

    fn prepared(&self, xid: &Xid, branch: &mut Branch, batch: Arc<Vec<u8>>) -> Vote {
        branch.prepared = Some(batch.clone());
        tracing::debug!(resource = %self.name, %xid, bytes = batch.len(), "prepared");
        Vote::Commit {
            redo: batch.to_vec(),
        }
    }

    fn resolving(_branch: &Branch, previous: Phase) -> Phase {
        previous
    }

    async fn resolve_work(
        self: &Arc<Self>,
        xid: &Xid,
        commit: bool,
        previous: Phase,
    ) -> Result<()> {
        if previous != Phase::Prepared {
            return Ok(());
        }
        let (worker, id) = (self.clone(), *xid);
        if commit {
            let found = blocking(&self.name, TASK, move || worker.store.commit(&id)).await?;
            self.found_prepared(xid, found)
        } else {
            blocking(&self.name, TASK, move || worker.store.rollback(&id)).await
        }
    }

    fn release(&self, st: &mut State, xid: &Xid) {
        self.release_locks(st, xid);
    }

    async fn resolved(
        self: &Arc<Self>,
        _appending: Option<Appending>,
        _commit: bool,
    ) -> Result<()> {
        Ok(())
    }

    fn store_fence(&self, epoch: Epoch) -> Result<Epoch> {
        self.store.fence(epoch)
    }

    fn decode_redo(redo: &[u8]) -> Result<Vec<KvWrite>, String> {
        decode_batch(redo)
    }

    async fn replay_work(self: &Arc<Self>, batch: Vec<(Lsn, Vec<KvWrite>)>) -> Result<()> {
        if self.shell.pauses.replay_fails_here() {
            let first = batch.first().map_or(Lsn::ZERO, |(lsn, _)| *lsn);
            return Err(self.unavailable(format!(
                "replay of the batch from lsn {first} stopped by its fail point before its transaction"
            )));
        }
        let worker = self.clone();
        blocking(&self.name, TASK, move || worker.store.replay(&batch))
            .await
            .map(drop)
    }
}
