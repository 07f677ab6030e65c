//! The mail resource's steps of the shared branch lifecycle (`internal::lifecycle`).
//!
//! What is the mail resource's own: a branch begins with the time its messages' names carry; a
//! prepare writes and syncs every message in `tmp/` (and `tmp/`), adopts the large ones into the
//! blob store and appends a `PREPARED` record; a commit renames each message into `new/` and
//! syncs `new/` (a branch recovered at open first skips the messages a reader already sees), a
//! rollback unlinks them from `tmp/`; a resolution of a prepared branch appends `COMMITTED` or
//! `ROLLED_BACK` and waits for it, then trims the log when it is due; the fence epoch is a state
//! file; a replay delivers the messages not delivered yet, then writes the applied LSN.
//!
//! # Implementation caveats
//!
//! * There are no locks to release: every message has a name of its own.

use std::sync::Arc;

use journal::{Appending, Lsn};

use super::{
    Branch, FEWER, Inner, Prepared, RedoEntry, Staged, State, TASK, decode_redo, log, now_secs,
};
use crate::internal::branch_log;
use crate::internal::branches::{Branches, Phase};
use crate::internal::instance::Instance;
use crate::internal::io::{blocking, log_error};
use crate::internal::lifecycle::Lifecycle;
use crate::internal::lifecycle::Shell;
use crate::{Epoch, ResourceError, Vote, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// A branch being resolved: the names of its messages.
pub(super) struct Resolving {
    names: Vec<String>,
    /// Recovered from the log at open: an earlier process may have begun its commit.
    recovered: bool,
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
    type Work = Vec<Staged>;
    /// The prepare record, and its LSN.
    type Prepared = (Arc<Prepared>, Lsn);
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
        Branch::new(now_secs())
    }

    fn has_work(branch: &Branch) -> bool {
        !branch.messages.is_empty()
    }

    fn vote_again(&self, xid: &Xid, branch: &Branch) -> Result<Vote> {
        match &branch.prepared {
            Some(prepared) => Ok(Vote::Commit {
                redo: prepared.redo.clone(),
            }),
            None => Err(self.fatal(format!("branch {xid} is prepared without a record"))),
        }
    }

    fn work_of(branch: &Branch) -> Vec<Staged> {
        branch.messages.values().cloned().collect()
    }

    async fn prepare_work(
        self: &Arc<Self>,
        xid: &Xid,
        messages: Vec<Staged>,
    ) -> Result<Self::Prepared> {
        let _adopting = self.adoptions.adopting().await;
        self.prepare_branch(xid, messages).await
    }

    fn prepared(&self, xid: &Xid, branch: &mut Branch, prepared: Self::Prepared) -> Vote {
        let (prepared, lsn) = prepared;
        branch.log_floor = Some(lsn);
        let redo = prepared.redo.clone();
        branch.prepared = Some(prepared);
        tracing::debug!(resource = %self.name, %xid, %lsn, "prepared");
        Vote::Commit { redo }
    }

    /// Active again, it pins no log.
    fn prepare_failed(branch: &mut Branch) {
        branch.log_floor = None;
    }

    fn resolving(branch: &Branch, _previous: Phase) -> Resolving {
        let names = match &branch.prepared {
            Some(prepared) => prepared.names.clone(),
            None => branch.messages.values().map(|m| m.name.clone()).collect(),
        };
        Resolving {
            names,
            recovered: branch.recovered,
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
            let Resolving { names, recovered } = resolving;
            if commit {
                worker.deliver(&id, &names, recovered)
            } else {
                worker.unlink_staged(&names)
            }
        })
        .await
    }

    fn record_resolution(&self, xid: &Xid, commit: bool) -> Result<Option<Appending>> {
        log::append_resolution(&self.log, xid, commit)
            .map(Some)
            .map_err(|e| log_error(&self.name, FEWER, "append a resolution", e))
    }

    fn release(&self, st: &mut State, xid: &Xid) {
        st.branches.remove(xid);
    }

    async fn resolved(self: &Arc<Self>, appending: Option<Appending>, _commit: bool) -> Result<()> {
        branch_log::resolution_durable(&**self, FEWER, appending).await?;
        self.maybe_trim().await
    }

    fn store_fence(&self, epoch: Epoch) -> Result<Epoch> {
        self.write_state("fence epoch", &self.area.fence, epoch.0)?;
        Ok(epoch)
    }

    fn decode_redo(redo: &[u8]) -> Result<Vec<RedoEntry>, String> {
        decode_redo(redo)
    }

    async fn replay_work(self: &Arc<Self>, batch: Vec<(Lsn, Vec<RedoEntry>)>) -> Result<()> {
        let worker = self.clone();
        blocking(&self.name, TASK, move || worker.replay_messages(&batch)).await
    }
}
