//! The conformance suite every resource runs.
//!
//! The coordinator treats every resource alike, so every resource must keep the same promises:
//! a prepared branch survives a crash, phase 2 can be repeated, an unknown branch resolves
//! quietly, a fenced epoch is refused, a replayed redo applies exactly once. This module states
//! those promises as executable checks. A resource's tests implement [`Subject`] — how to open
//! the resource (again, after a simulated crash), how to make a branch write something, and how
//! to see whether that something is visible — and call [`run_all`]. Each check is also a public
//! function of its own, so a resource under construction can run them one at a time, and a
//! failure names the property that broke: every panic starts with
//! ``conformance check `<name>` failed``.
//!
//! A "crash" here is the instance being dropped without resolving anything and the subject
//! opening the same storage again ([`Subject::open`]). That is weaker than a killed process (no
//! torn writes, no lost page cache) — those belong to the crash tests — but it proves that what
//! a resource promises after prepare lives in durable state and not in memory.
//!
//! The checks share the subject's storage and run one after another; each uses fresh xids (a
//! process-wide counter seeded from the clock) and fresh effect tags, and picks its epoch from
//! the resource's current fence, so they do not depend on each other or on their order.
//!
//! # Implementation caveats
//!
//! * The suite only sees the resource through the [`Resource`] trait and the subject; it cannot
//!   check that an effect is invisible to *other* readers before commit (isolation is
//!   resource-specific and tested by each resource).
//! * Concurrency (two branches racing) is not exercised here, for the same reason.
//! * Checks panic (they are test code run by tests) rather than return errors.

use std::fmt::Display;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Epoch, Lsn, Resource, ResourceError, Vote, Xid};

/// What the suite needs to know about a resource under test.
#[async_trait::async_trait]
pub trait Subject: Send + Sync {
    /// Opens the resource, or reopens it after a simulated crash (the previous instance dropped
    /// without resolving anything). Always the same storage.
    async fn open(&self) -> Arc<dyn Resource>;

    /// Opens a second, independent instance playing a standby (for replay); it may share what
    /// the subject needs (e.g. a blob store). The suite calls it only after the branches whose
    /// redo it will replay have been prepared on the primary, so a subject may copy what replay
    /// needs (blobs) at this point. Called again, it reopens the same standby storage.
    async fn open_standby(&self) -> Arc<dyn Resource>;

    /// Makes the branch of `xid` (already begun) write the effect named `tag`, so that it votes
    /// Commit.
    async fn write(&self, resource: &Arc<dyn Resource>, xid: &Xid, tag: u32);

    /// Whether the committed effect of `tag` is visible in `resource`.
    async fn visible(&self, resource: &Arc<dyn Resource>, tag: u32) -> bool;
}

/// Runs every check, in order; panics naming the first check that fails.
pub async fn run_all(subject: &dyn Subject) {
    prepared_branch_survives_restart(subject).await;
    rollback_after_restart(subject).await;
    unprepared_branch_is_gone_after_restart(subject).await;
    commit_is_idempotent(subject).await;
    rollback_is_idempotent(subject).await;
    rollback_of_unknown_xid_succeeds(subject).await;
    commit_of_unknown_xid_succeeds(subject).await;
    prepare_twice_returns_same_vote(subject).await;
    branch_without_writes_votes_read_only(subject).await;
    fence_refuses_lower_epochs(subject).await;
    replay_applies_once(subject).await;
    applied_lsn_survives_restart(subject).await;
}

/// Prepare, crash, reopen: `recover` lists the branch, and commit after the restart makes the
/// effect visible (and `recover` no longer lists it).
pub async fn prepared_branch_survives_restart(subject: &dyn Subject) {
    let c = Check("prepared_branch_survives_restart");
    let r = subject.open().await;
    let (xid, tag) = (c.xid(&r).await, next_tag());
    c.prepare_writing(subject, &r, &xid, tag).await;
    drop(r);
    let r = subject.open().await;
    c.ensure(
        c.recover(&r).await.contains(&xid),
        format!("recover after the restart does not list the prepared branch {xid}"),
    );
    c.ok("commit after the restart", r.commit(&xid).await);
    c.ensure(
        subject.visible(&r, tag).await,
        format!("effect {tag} is not visible after commit"),
    );
    c.ensure(
        !c.recover(&r).await.contains(&xid),
        format!("recover still lists {xid} after commit"),
    );
}

/// Prepare, crash, reopen: rollback removes the effect and `recover` no longer lists the branch,
/// also after another restart.
pub async fn rollback_after_restart(subject: &dyn Subject) {
    let c = Check("rollback_after_restart");
    let r = subject.open().await;
    let (xid, tag) = (c.xid(&r).await, next_tag());
    c.prepare_writing(subject, &r, &xid, tag).await;
    drop(r);
    let r = subject.open().await;
    c.ensure(
        c.recover(&r).await.contains(&xid),
        format!("recover after the restart does not list the prepared branch {xid}"),
    );
    c.ok("rollback after the restart", r.rollback(&xid).await);
    c.ensure(
        !subject.visible(&r, tag).await,
        format!("effect {tag} is visible after rollback"),
    );
    c.ensure(
        !c.recover(&r).await.contains(&xid),
        format!("recover still lists {xid} after rollback"),
    );
    drop(r);
    let r = subject.open().await;
    c.ensure(
        !c.recover(&r).await.contains(&xid),
        format!("recover lists {xid} again after a rollback and a restart"),
    );
}

/// A branch that wrote but was not prepared is gone after a crash (presumed abort): not listed,
/// not visible, rollback succeeds, and prepare must not vote (its work is lost; a `ReadOnly` vote
/// would commit the transaction without it).
pub async fn unprepared_branch_is_gone_after_restart(subject: &dyn Subject) {
    let c = Check("unprepared_branch_is_gone_after_restart");
    let r = subject.open().await;
    let (xid, tag) = (c.xid(&r).await, next_tag());
    c.ok("begin", r.begin(&xid).await);
    subject.write(&r, &xid, tag).await;
    drop(r);
    let r = subject.open().await;
    c.ensure(
        !c.recover(&r).await.contains(&xid),
        format!("recover lists the never prepared branch {xid}"),
    );
    c.ensure(
        !subject.visible(&r, tag).await,
        format!("effect {tag} of an unprepared branch is visible"),
    );
    if let Ok(vote) = r.prepare(&xid).await {
        c.fail(format!(
            "prepare of {xid}, whose work was lost in the restart, voted {vote:?}; it must fail"
        ));
    }
    c.ok("rollback of the lost branch", r.rollback(&xid).await);
}

/// Commit twice, then again after a restart: every call succeeds, the effect stays, and the
/// restarted resource no longer lists the branch as prepared.
pub async fn commit_is_idempotent(subject: &dyn Subject) {
    let c = Check("commit_is_idempotent");
    let r = subject.open().await;
    let (xid, tag) = (c.xid(&r).await, next_tag());
    c.prepare_writing(subject, &r, &xid, tag).await;
    c.ok("first commit", r.commit(&xid).await);
    c.ok("second commit", r.commit(&xid).await);
    c.ensure(
        subject.visible(&r, tag).await,
        format!("effect {tag} is not visible after two commits"),
    );
    drop(r);
    let r = subject.open().await;
    c.ensure(
        !c.recover(&r).await.contains(&xid),
        format!("recover lists {xid} again after it committed and the resource restarted"),
    );
    c.ok("commit after the restart", r.commit(&xid).await);
    c.ensure(
        subject.visible(&r, tag).await,
        format!("effect {tag} is not visible after the restart"),
    );
    c.ensure(
        !c.recover(&r).await.contains(&xid),
        format!("recover lists the committed branch {xid}"),
    );
}

/// Rollback twice (of a prepared and of an unprepared branch), then again after a restart:
/// every call succeeds and no effect appears.
pub async fn rollback_is_idempotent(subject: &dyn Subject) {
    let c = Check("rollback_is_idempotent");
    let r = subject.open().await;
    let (prepared, tag) = (c.xid(&r).await, next_tag());
    c.prepare_writing(subject, &r, &prepared, tag).await;
    c.ok(
        "first rollback of a prepared branch",
        r.rollback(&prepared).await,
    );
    c.ok(
        "second rollback of a prepared branch",
        r.rollback(&prepared).await,
    );
    let (active, active_tag) = (c.xid(&r).await, next_tag());
    c.ok("begin", r.begin(&active).await);
    subject.write(&r, &active, active_tag).await;
    c.ok(
        "first rollback of an unprepared branch",
        r.rollback(&active).await,
    );
    c.ok(
        "second rollback of an unprepared branch",
        r.rollback(&active).await,
    );
    drop(r);
    let r = subject.open().await;
    c.ok("rollback after the restart", r.rollback(&prepared).await);
    c.ensure(
        !subject.visible(&r, tag).await,
        format!("effect {tag} is visible after rollback"),
    );
    c.ensure(
        !subject.visible(&r, active_tag).await,
        format!("effect {active_tag} is visible after rollback"),
    );
    c.ensure(
        !c.recover(&r).await.contains(&prepared),
        format!("recover lists the rolled back branch {prepared}"),
    );
}

/// Rollback of an xid the resource never saw succeeds.
pub async fn rollback_of_unknown_xid_succeeds(subject: &dyn Subject) {
    let c = Check("rollback_of_unknown_xid_succeeds");
    let r = subject.open().await;
    let xid = c.xid(&r).await;
    c.ok("rollback of an unknown xid", r.rollback(&xid).await);
}

/// Commit of an xid the resource never saw succeeds: it counts as already resolved.
pub async fn commit_of_unknown_xid_succeeds(subject: &dyn Subject) {
    let c = Check("commit_of_unknown_xid_succeeds");
    let r = subject.open().await;
    let xid = c.xid(&r).await;
    c.ok("commit of an unknown xid", r.commit(&xid).await);
}

/// Preparing a prepared branch again returns the same vote, with the same redo.
pub async fn prepare_twice_returns_same_vote(subject: &dyn Subject) {
    let c = Check("prepare_twice_returns_same_vote");
    let r = subject.open().await;
    let (xid, tag) = (c.xid(&r).await, next_tag());
    let first = c.prepare_writing(subject, &r, &xid, tag).await;
    let second = c.ok("second prepare", r.prepare(&xid).await);
    c.ensure(
        second
            == Vote::Commit {
                redo: first.clone(),
            },
        format!("second prepare voted {second:?}, the first voted Commit with redo {first:?}"),
    );
    c.ok("rollback", r.rollback(&xid).await);
}

/// A branch that wrote nothing votes `ReadOnly` (twice), is not listed by `recover`, and a
/// commit or rollback of it afterwards still succeeds.
pub async fn branch_without_writes_votes_read_only(subject: &dyn Subject) {
    let c = Check("branch_without_writes_votes_read_only");
    let r = subject.open().await;
    let xid = c.xid(&r).await;
    c.ok("begin", r.begin(&xid).await);
    for attempt in ["first", "second"] {
        let vote = c.ok(&format!("{attempt} prepare"), r.prepare(&xid).await);
        c.ensure(
            vote == Vote::ReadOnly,
            format!("{attempt} prepare of a branch that wrote nothing voted {vote:?}"),
        );
    }
    c.ensure(
        !c.recover(&r).await.contains(&xid),
        format!("recover lists the read-only branch {xid}"),
    );
    c.ok("commit of a read-only branch", r.commit(&xid).await);
    c.ok("rollback of a read-only branch", r.rollback(&xid).await);
}

/// After `fence(e)` a branch of a lower epoch is refused at begin with
/// [`ResourceError::Fenced`]; a lower fence leaves the epoch unchanged; the fence survives a
/// restart.
pub async fn fence_refuses_lower_epochs(subject: &dyn Subject) {
    let c = Check("fence_refuses_lower_epochs");
    let r = subject.open().await;
    let epoch = Epoch(c.ok("fence_epoch", r.fence_epoch().await).0 + 2);
    c.ok("fence", r.fence(epoch).await);
    c.ensure_fenced(&r, epoch).await;
    c.ok("fence at a lower epoch", r.fence(Epoch(epoch.0 - 1)).await);
    let now = c.ok("fence_epoch", r.fence_epoch().await);
    c.ensure(
        now == epoch,
        format!("a lower fence moved the epoch from {epoch} to {now}"),
    );
    let current = Xid {
        node: XID_NODE,
        epoch,
        seq: next_seq(),
    };
    c.ok("begin at the fence epoch", r.begin(&current).await);
    c.ok("rollback", r.rollback(&current).await);
    drop(r);
    let r = subject.open().await;
    let now = c.ok("fence_epoch after the restart", r.fence_epoch().await);
    c.ensure(
        now == epoch,
        format!("after a restart the fence epoch is {now}, it was raised to {epoch}"),
    );
    c.ensure_fenced(&r, epoch).await;
}

/// Replay on the standby makes the effect visible and sets `applied_lsn`; the same LSN again,
/// or a lower one, changes nothing (not even with a different redo).
pub async fn replay_applies_once(subject: &dyn Subject) {
    let c = Check("replay_applies_once");
    let r = subject.open().await;
    let (first_tag, second_tag) = (next_tag(), next_tag());
    let first = c.committed_redo(subject, &r, first_tag).await;
    let second = c.committed_redo(subject, &r, second_tag).await;
    drop(r);
    let standby = subject.open_standby().await;
    let lsn = Lsn(c.ok("applied_lsn", standby.applied_lsn().await).0 + 10);
    c.ok("replay", standby.replay(&first, lsn).await);
    c.ensure(
        subject.visible(&standby, first_tag).await,
        format!("effect {first_tag} is not visible after replay"),
    );
    c.ensure_applied(&standby, lsn).await;
    c.ok(
        "replay of the same lsn again",
        standby.replay(&first, lsn).await,
    );
    c.ok(
        "replay of another redo at the same lsn",
        standby.replay(&second, lsn).await,
    );
    c.ok(
        "replay of another redo at a lower lsn",
        standby.replay(&second, lsn.prev()).await,
    );
    c.ensure(
        !subject.visible(&standby, second_tag).await,
        format!("a redo replayed at or below applied_lsn {lsn} took effect"),
    );
    c.ensure_applied(&standby, lsn).await;
    c.ok(
        "replay of the next lsn",
        standby.replay(&second, lsn.next()).await,
    );
    c.ensure(
        subject.visible(&standby, second_tag).await,
        format!("effect {second_tag} is not visible after replay"),
    );
    c.ensure_applied(&standby, lsn.next()).await;
}

/// `applied_lsn` (and what was replayed) survives a restart of the standby.
pub async fn applied_lsn_survives_restart(subject: &dyn Subject) {
    let c = Check("applied_lsn_survives_restart");
    let r = subject.open().await;
    let tag = next_tag();
    let redo = c.committed_redo(subject, &r, tag).await;
    drop(r);
    let standby = subject.open_standby().await;
    let lsn = Lsn(c.ok("applied_lsn", standby.applied_lsn().await).0 + 10);
    c.ok("replay", standby.replay(&redo, lsn).await);
    drop(standby);
    let standby = subject.open_standby().await;
    c.ensure_applied(&standby, lsn).await;
    c.ensure(
        subject.visible(&standby, tag).await,
        format!("effect {tag} replayed before the restart is not visible after it"),
    );
}

/// The node of every xid the suite makes.
const XID_NODE: u32 = 9;

/// Unique per process and (being seeded from the clock in microseconds) across runs.
static NEXT_SEQ: LazyLock<AtomicU64> = LazyLock::new(|| {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros());
    AtomicU64::new(u64::try_from(micros).unwrap_or(u64::MAX / 2))
});

static NEXT_TAG: AtomicU32 = AtomicU32::new(1);

fn next_seq() -> u64 {
    NEXT_SEQ.fetch_add(1, Ordering::Relaxed)
}

fn next_tag() -> u32 {
    NEXT_TAG.fetch_add(1, Ordering::Relaxed)
}

/// The name of the running check, and the steps every check shares.
struct Check(&'static str);

impl Check {
    #[track_caller]
    fn fail(&self, what: impl Display) -> ! {
        panic!("conformance check `{}` failed: {what}", self.0)
    }

    #[track_caller]
    fn ensure(&self, condition: bool, what: impl Display) {
        if !condition {
            self.fail(what)
        }
    }

    #[track_caller]
    fn ok<T>(&self, step: &str, result: Result<T, ResourceError>) -> T {
        match result {
            Ok(value) => value,
            Err(e) => self.fail(format_args!("{step}: {e}")),
        }
    }

    /// A fresh xid at the resource's current fence epoch.
    async fn xid(&self, r: &Arc<dyn Resource>) -> Xid {
        let epoch = self.ok("fence_epoch", r.fence_epoch().await);
        Xid {
            node: XID_NODE,
            epoch,
            seq: next_seq(),
        }
    }

    async fn recover(&self, r: &Arc<dyn Resource>) -> Vec<Xid> {
        self.ok("recover", r.recover().await)
    }

    /// Begins `xid`, writes `tag`, prepares, and returns the redo of its Commit vote.
    async fn prepare_writing(
        &self,
        subject: &dyn Subject,
        r: &Arc<dyn Resource>,
        xid: &Xid,
        tag: u32,
    ) -> Vec<u8> {
        self.ok("begin", r.begin(xid).await);
        subject.write(r, xid, tag).await;
        match self.ok("prepare", r.prepare(xid).await) {
            Vote::Commit { redo } => redo,
            Vote::ReadOnly => self.fail(format!(
                "branch {xid} wrote effect {tag} but voted ReadOnly"
            )),
        }
    }

    /// Runs a branch writing `tag` to the end (commit) and returns its redo.
    async fn committed_redo(
        &self,
        subject: &dyn Subject,
        r: &Arc<dyn Resource>,
        tag: u32,
    ) -> Vec<u8> {
        let xid = self.xid(r).await;
        let redo = self.prepare_writing(subject, r, &xid, tag).await;
        self.ok("commit", r.commit(&xid).await);
        redo
    }

    /// Begin at the epoch below `fence` must fail with `Fenced` naming both epochs.
    async fn ensure_fenced(&self, r: &Arc<dyn Resource>, fence: Epoch) {
        let old = Xid {
            node: XID_NODE,
            epoch: Epoch(fence.0 - 1),
            seq: next_seq(),
        };
        match r.begin(&old).await {
            Err(ResourceError::Fenced { offered, current, .. }) if offered == old.epoch && current == fence => {}
            Err(other) => self.fail(format!("begin of {old} below fence {fence} failed with {other:?}, not Fenced {{ offered: {}, current: {fence} }}", old.epoch)),
            Ok(()) => self.fail(format!("begin of {old} at epoch {} succeeded below fence {fence}", old.epoch)),
        }
    }

    async fn ensure_applied(&self, r: &Arc<dyn Resource>, lsn: Lsn) {
        let applied = self.ok("applied_lsn", r.applied_lsn().await);
        self.ensure(
            applied == lsn,
            format!("applied_lsn is {applied}, expected {lsn}"),
        );
    }
}
