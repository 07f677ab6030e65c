//! The files resource's steps of the shared branch lifecycle (`internal::lifecycle`).
//!
//! What is the files resource's own: a prepare turns the staged changes into redo entries and
//! appends them as a `PREPARED` record to the branch log (`staging`); a commit puts the entries
//! in place and a rollback removes the staging (`apply`, `staging`); a resolution of a prepared
//! branch appends `COMMITTED` or `ROLLED_BACK` and waits for it, and a commit moves the last
//! commit the next checkpoint must cover (`checkpoint`); releasing a branch releases its path
//! locks; the fence epoch is a state file; a replay runs a checkpoint first when a commit is not
//! covered yet, then writes every entry and the applied LSN.
//!
//! # Implementation caveats
//!
//! * A branch's prepare record is kept decoded (`Branch::prepared`); a repeated prepare encodes
//!   it again for its vote.

use std::collections::BTreeMap;
use std::sync::Arc;

use journal::{Appending, Lsn};

use super::staging::Change;
use super::{Branch, FEWER, Inner, RedoEntry, State, TASK, decode_redo, encode_redo, log};
use crate::internal::branch_log;
use crate::internal::branches::{Branches, Phase};
use crate::internal::instance::{Instance, lock};
use crate::internal::io::{blocking, log_error};
use crate::internal::lifecycle::Lifecycle;
use crate::internal::lifecycle::Shell;
use crate::{Epoch, ResourceError, Vote, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// A branch being resolved: what it holds.
pub(super) struct Resolving {
    /// Its prepare record's entries (`None`: never prepared).
    entries: Option<Arc<Vec<RedoEntry>>>,
    /// Its staged changes (their staged files, while this process has them).
    changes: BTreeMap<String, Change>,
}

impl Inner {
    /// Pins the branch log at `floor` for the branch `xid`, if it is still open (a prepare
    /// record being appended, or carried forward by a trim).
    pub(super) fn set_log_floor(&self, xid: &Xid, floor: Lsn) {
        if let Some(branch) = self.state().branches.get_mut(xid) {
            branch.log_floor = Some(floor);
        }
    }
}

impl Lifecycle for Inner {
    type Branch = Branch;
    type Work = BTreeMap<String, Change>;
    /// The entries, their redo, and the LSN of the prepare record.
    type Prepared = (Arc<Vec<RedoEntry>>, Vec<u8>, Lsn);
    type Resolving = Resolving;
    type Redo = Vec<RedoEntry>;
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

    /// Nothing is staged: a branch without changes never staged a file, or removed it.
    fn has_work(branch: &Branch) -> bool {
        !branch.changes.is_empty()
    }

    fn vote_again(&self, _xid: &Xid, branch: &Branch) -> Result<Vote> {
        let entries = branch.prepared.clone().unwrap_or_default();
        Ok(Vote::Commit {
            redo: encode_redo(&entries),
        })
    }

    fn work_of(branch: &Branch) -> Self::Work {
        branch.changes.clone()
    }

    async fn prepare_work(
        self: &Arc<Self>,
        xid: &Xid,
        changes: Self::Work,
    ) -> Result<Self::Prepared> {
        let _adopting = self.adoptions.adopting().await;
        self.prepare_branch(xid, changes).await
    }

    fn prepared(&self, xid: &Xid, branch: &mut Branch, prepared: Self::Prepared) -> Vote {
        let (entries, redo, lsn) = prepared;
        branch.log_floor = Some(lsn);
        branch.prepared = Some(entries);
        tracing::debug!(resource = %self.name, %xid, %lsn, "prepared");
        Vote::Commit { redo }
    }

    /// Active again, it pins no log.
    fn prepare_failed(branch: &mut Branch) {
        branch.log_floor = None;
    }

    fn resolving(branch: &Branch, _previous: Phase) -> Resolving {
        Resolving {
            entries: branch.prepared.clone(),
            changes: branch.changes.clone(),
        }
    }

    async fn resolve_work(
        self: &Arc<Self>,
        xid: &Xid,
        commit: bool,
        resolving: Resolving,
    ) -> Result<()> {
        let (worker, id) = (self.clone(), *xid);
        blocking(&self.name, TASK, move || {
            let Resolving { entries, changes } = resolving;
            if commit {
                worker.commit_files(&id, entries.as_deref(), &changes)
            } else {
                worker.remove_staging(&id, &changes)
            }
        })
        .await
    }

    /// The locks need not wait for the record: see "Crashes" in the module docs of `files`.
    fn record_resolution(&self, xid: &Xid, commit: bool) -> Result<Option<Appending>> {
        log::append_resolution(&self.log, xid, commit)
            .map(Some)
            .map_err(|e| log_error(&self.name, FEWER, "append a resolution", e))
    }

    fn release(&self, st: &mut State, xid: &Xid) {
        self.release_locks(st, xid);
    }

    async fn resolved(self: &Arc<Self>, appending: Option<Appending>, commit: bool) -> Result<()> {
        let durable = branch_log::resolution_durable(&**self, FEWER, appending).await?;
        if let (true, Some(lsn)) = (commit, durable) {
            let mut last = lock(&self.checkpoints);
            last.last_commit = last.last_commit.max(lsn);
        }
        self.maybe_checkpoint().await
    }

    fn store_fence(&self, epoch: Epoch) -> Result<Epoch> {
        self.write_state("fence epoch", &self.area.fence, epoch.0)?;
        Ok(epoch)
    }

    fn decode_redo(redo: &[u8]) -> Result<Vec<RedoEntry>, String> {
        decode_redo(redo)
    }

    /// A commit the log would apply again at open must not undo what the replay writes after
    /// it: a checkpoint covers it first.
    async fn replay_work(self: &Arc<Self>, batch: Vec<(Lsn, Vec<RedoEntry>)>) -> Result<()> {
        self.checkpoint_commits().await?;
        let worker = self.clone();
        blocking(&self.name, TASK, move || worker.replay_files(&batch)).await
    }
}
