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
//! * Concurrency (two branches racing) is not exercised here, for the same reason; the one
//!   race the suite does run — a fence against a prepare in flight — is made deterministic by
//!   pausing the prepare where the subject says ([`Subject::pause_prepare`]), never by timing.
//! * Checks panic (they are test code run by tests) rather than return errors.

use std::fmt::Display;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{BlobId, Epoch, ErrorClass, InventoryEntry, Lsn, Resource, ResourceError, Vote, Xid};

/// What the suite needs to know about a resource under test.
#[async_trait::async_trait]
pub trait Subject: Send + Sync {
    /// Opens the resource, or reopens it after a simulated crash (the previous instance dropped
    /// without resolving anything). Always the same storage.
    async fn open(&self) -> Arc<dyn Resource>;

    /// Opens a second, independent instance playing a standby (for replay), with storage of
    /// its own (its own root, Maildir, sled directory, database): nothing is shared with the
    /// primary, and the suite ships the blobs a redo needs itself ([`Resource::redo_blobs`],
    /// [`Resource::open_blob`], [`Resource::put_blob`]). Called again, it reopens the same
    /// standby storage.
    async fn open_standby(&self) -> Arc<dyn Resource>;

    /// Opens replica `n` (1, 2, …; the suite uses 1 to 9): one more instance of the same kind with storage of its own,
    /// distinct from the primary's, the standby's and every other replica's, and empty the first
    /// time; called again (after the previous instance of it was dropped), it reopens the same
    /// storage.
    async fn open_replica(&self, n: u32) -> Arc<dyn Resource>;

    /// Arranges that the next replay on `resource` stops with an error half-way — after
    /// applying part of its redo where the resource applies a redo in parts — as if the
    /// process died there. The files, mail and kv resources have a hook for it
    /// (`fail_next_replay()`); a subject may equally make the resource's own store fail the
    /// replay (PostgreSQL's, with a trigger).
    async fn fail_next_replay(&self, resource: &Arc<dyn Resource>);

    /// Makes the branch of `xid` (already begun) write the effect named `tag`, so that it votes
    /// Commit.
    async fn write(&self, resource: &Arc<dyn Resource>, xid: &Xid, tag: u32);

    /// Whether the committed effect of `tag` is visible in `resource`.
    async fn visible(&self, resource: &Arc<dyn Resource>, tag: u32) -> bool;

    /// Arranges that the next prepare of `xid` (begun, and written by [`Subject::write`]) stops
    /// *after* its fence check and *before* anything of it is durable, until the returned pause
    /// is released. The files, mail and kv resources have a hook for it
    /// (`pause_prepare(xid)`, returning a [`Pause`]); a subject may equally stall the prepare
    /// from outside (PostgreSQL's waits on a lock the test holds).
    async fn pause_prepare(&self, resource: &Arc<dyn Resource>, xid: &Xid) -> Box<dyn Paused>;
}

/// An operation stopped at a pause ([`Subject::pause_prepare`]).
#[async_trait::async_trait]
pub trait Paused: Send + Sync {
    /// Waits until the operation stands at the pause; `false` when it did not within `within`.
    async fn reached(&self, within: Duration) -> bool;

    /// Lets the operation go on.
    async fn release(&self);
}

/// How long an operation waits at a [`Pause`] nobody releases before it goes on by itself, so
/// that a test that fails half-way never leaves a resource stuck.
pub const PAUSE_MS_MAX: u64 = 60_000;

/// A point where a resource's operation waits until a test lets it go: the resource calls
/// [`Pause::wait_here`]; the test waits for [`Paused::reached`], does what it races against
/// the operation, then [`Paused::release`]s it. Cloned, it is the same pause.
#[derive(Clone, Debug)]
pub struct Pause {
    /// 0: armed; 1: reached; 2: released.
    state: Arc<tokio::sync::watch::Sender<u8>>,
}

impl Default for Pause {
    fn default() -> Self {
        Pause::new()
    }
}

impl Pause {
    /// An armed pause.
    pub fn new() -> Pause {
        Pause {
            state: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Called by the operation: says it is here, then waits until released (at most
    /// [`PAUSE_MS_MAX`]).
    pub async fn wait_here(&self) {
        self.state.send_modify(|s| *s = (*s).max(1));
        let mut rx = self.state.subscribe();
        let released = rx.wait_for(|s| *s >= 2);
        let _ = tokio::time::timeout(Duration::from_millis(PAUSE_MS_MAX), released).await;
    }
}

#[async_trait::async_trait]
impl Paused for Pause {
    async fn reached(&self, within: Duration) -> bool {
        let mut rx = self.state.subscribe();
        let reached = rx.wait_for(|s| *s >= 1);
        matches!(tokio::time::timeout(within, reached).await, Ok(Ok(_)))
    }

    async fn release(&self) {
        self.state.send_modify(|s| *s = 2);
    }
}

/// Runs every check, in order; panics naming the first check that fails.
pub async fn run_all(subject: &dyn Subject) {
    prepared_branch_survives_restart(subject).await;
    rollback_after_restart(subject).await;
    unprepared_branch_is_gone_after_restart(subject).await;
    commit_is_idempotent(subject).await;
    rollback_is_idempotent(subject).await;
    rollback_of_unknown_xid_succeeds(subject).await;
    commit_of_unknown_xid_is_quiet_or_a_hazard(subject).await;
    prepare_twice_returns_same_vote(subject).await;
    branch_without_writes_votes_read_only(subject).await;
    fence_refuses_lower_epochs(subject).await;
    fence_stops_the_old_owner(subject).await;
    fence_covers_a_prepare_in_flight(subject).await;
    replay_applies_once(subject).await;
    applied_lsn_survives_restart(subject).await;
    put_blob_keeps_only_matching_content(subject).await;
    replay_on_an_empty_instance_gives_the_same_state(subject).await;
    replay_batch_applies_once(subject).await;
    replay_batch_interrupted_resumes_exactly_once(subject).await;
    inventory_equal_after_replay(subject).await;
    reseed_copies_an_instance_key_by_key(subject).await;
    reseed_refuses_bad_keys_and_prepared_branches(subject).await;
    healthy_while_open_and_working(subject).await;
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

/// A freshly opened resource answers its health probe, and still does with a branch prepared
/// (the probe takes no branch lock).
pub async fn healthy_while_open_and_working(subject: &dyn Subject) {
    let c = Check("healthy_while_open_and_working");
    let r = subject.open().await;
    c.ok("health of a fresh instance", r.health().await);
    let (xid, tag) = (c.xid(&r).await, next_tag());
    c.prepare_writing(subject, &r, &xid, tag).await;
    c.ok("health with a branch prepared", r.health().await);
    c.ok("rollback", r.rollback(&xid).await);
}

/// Committing an xid the resource never saw is quiet — or, for a resource that can tell a
/// commit it lost from one it never had (PostgreSQL's marker), a heuristic hazard
/// ([`crate::ErrorClass::Hazard`]); never a retryable or in-doubt error, which would make the
/// coordinator retry phase 2 forever.
pub async fn commit_of_unknown_xid_is_quiet_or_a_hazard(subject: &dyn Subject) {
    let c = Check("commit_of_unknown_xid_is_quiet_or_a_hazard");
    let r = subject.open().await;
    let xid = c.xid(&r).await;
    match r.commit(&xid).await {
        Ok(()) => {}
        Err(e) if e.class() == crate::ErrorClass::Hazard => {}
        Err(e) => c.fail(format_args!("commit of an unknown xid: {e}")),
    }
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

/// What the fence checks below allow a fence to do when a branch of an older epoch is
/// prepared: hand the branch to the new owner (the instance that was fenced refuses to resolve
/// it; an instance opened afterwards resolves it), or refuse the fence, retryable, without
/// raising the epoch, until the branch is resolved (PostgreSQL waits for such branches).
enum Fenced {
    /// The fence was raised.
    Raised,
    /// The fence was refused (retryable) and the epoch is unchanged.
    Refused,
}

/// A branch of epoch e is prepared, then the resource is fenced at e + 1 through the same
/// instance (the old owner, e.g. a paused primary that resumes). Either the fence is refused
/// (retryable, epoch unchanged) until the branch is resolved, or it is raised and then the old
/// owner can neither commit nor roll the branch back (refused, [`ErrorClass::Rejected`]); an
/// instance opened afterwards (the new owner) lists it and commits it.
pub async fn fence_stops_the_old_owner(subject: &dyn Subject) {
    let c = Check("fence_stops_the_old_owner");
    let r = subject.open().await;
    let (xid, tag) = (c.xid(&r).await, next_tag());
    c.prepare_writing(subject, &r, &xid, tag).await;
    let epoch = Epoch(xid.epoch.0 + 1);
    match c.fence_over_prepared(&r, epoch, r.fence(epoch).await).await {
        Fenced::Refused => {
            c.ok(
                "rollback by the owner the fence refused to stop",
                r.rollback(&xid).await,
            );
            c.ok("fence once the branch is resolved", r.fence(epoch).await);
            return;
        }
        Fenced::Raised => {}
    }
    c.ensure_refused("commit by the fenced owner", &xid, r.commit(&xid).await);
    c.ensure_refused("rollback by the fenced owner", &xid, r.rollback(&xid).await);
    c.ensure(
        !subject.visible(&r, tag).await,
        format!("effect {tag} of a branch the fenced owner could not commit is visible"),
    );
    drop(r);
    c.new_owner_commits(subject, &xid, tag).await;
}

/// A prepare passes its fence check and is paused there ([`Subject::pause_prepare`]) while a
/// fence runs through the same instance. After the fence returns, no operation of the older
/// epoch may change the resource: if the fence returned while the prepare was still paused,
/// the prepare must be refused; if the prepare succeeded, it must have finished before the
/// fence returned, and (the fence raised) the old owner cannot commit it while a new owner
/// can. The fence gets a bounded time to return while the prepare stands still; what that
/// decides is only which of the two allowed orders the check sees, never its verdict.
pub async fn fence_covers_a_prepare_in_flight(subject: &dyn Subject) {
    let c = Check("fence_covers_a_prepare_in_flight");
    let r = subject.open().await;
    let (xid, tag) = (c.xid(&r).await, next_tag());
    c.ok("begin", r.begin(&xid).await);
    subject.write(&r, &xid, tag).await;
    let pause = subject.pause_prepare(&r, &xid).await;
    let mut preparing = tokio::spawn({
        let r = r.clone();
        async move { r.prepare(&xid).await }
    });
    if !pause.reached(Duration::from_millis(STEP_MS_MAX)).await {
        preparing.abort();
        c.fail(format!("the prepare of {xid} never reached its pause"));
    }
    let epoch = Epoch(xid.epoch.0 + 1);
    let mut fencing = tokio::spawn({
        let r = r.clone();
        async move { r.fence(epoch).await }
    });
    let alone = Duration::from_millis(FENCE_ALONE_MS);
    let fenced_while_paused = tokio::time::timeout(alone, &mut fencing).await.ok();
    let fence_returned_while_paused = fenced_while_paused.is_some();
    pause.release().await;
    let prepared = c.joined("prepare", &mut preparing).await;
    let fenced = match fenced_while_paused {
        Some(joined) => c.join_result("fence", joined),
        None => c.joined("fence", &mut fencing).await,
    };
    let Ok(vote) = prepared else {
        // Refused: nothing of the branch may remain, and the fence must have gone through.
        c.ok("fence beside a refused prepare", fenced);
        drop(r);
        let r = subject.open().await;
        c.ensure(
            !c.recover(&r).await.contains(&xid),
            format!("the refused prepare of {xid} is listed as prepared"),
        );
        c.ok("rollback of the refused branch", r.rollback(&xid).await);
        c.ensure(
            !subject.visible(&r, tag).await,
            format!("effect {tag} of a refused prepare is visible"),
        );
        return;
    };
    if vote == Vote::ReadOnly {
        c.fail(format!(
            "branch {xid} wrote effect {tag} but voted ReadOnly"
        ));
    }
    if fence_returned_while_paused && fenced.is_ok() {
        c.fail(format!(
            "fence to {epoch} returned while the prepare of {xid} was paused past its fence check, and the prepare then succeeded: the fence did not cover the prepare in flight"
        ));
    }
    match c.fence_over_prepared(&r, epoch, fenced).await {
        Fenced::Refused => {
            c.ok("rollback after the refused fence", r.rollback(&xid).await);
            c.ok("fence once the branch is resolved", r.fence(epoch).await);
        }
        Fenced::Raised => {
            c.ensure_refused("commit by the fenced owner", &xid, r.commit(&xid).await);
            drop(r);
            c.new_owner_commits(subject, &xid, tag).await;
        }
    }
}

/// How long a fence running beside a paused prepare gets to return by itself.
const FENCE_ALONE_MS: u64 = 1_000;
/// How long the suite waits for any one step (a prepare, a fence) before it calls it stuck.
const STEP_MS_MAX: u64 = 30_000;

/// Replay on the standby makes the effect visible and sets `applied_lsn`; the same LSN again,
/// or a lower one, changes nothing (not even with a different redo).
pub async fn replay_applies_once(subject: &dyn Subject) {
    let c = Check("replay_applies_once");
    let r = subject.open().await;
    let (first_tag, second_tag) = (next_tag(), next_tag());
    let first = c.committed_redo(subject, &r, first_tag).await;
    let second = c.committed_redo(subject, &r, second_tag).await;
    let standby = subject.open_standby().await;
    c.ship(&r, &standby, &first).await;
    c.ship(&r, &standby, &second).await;
    drop(r);
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
    let standby = subject.open_standby().await;
    c.ship(&r, &standby, &redo).await;
    drop(r);
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

/// A blob shipped with content that does not hash to its id is refused (class Rejected) and
/// nothing of it is kept, under either hash. A resource that keeps blobs stores a matching
/// one, and gives the same bytes back from `open_blob`; one that keeps none refuses both.
pub async fn put_blob_keeps_only_matching_content(subject: &dyn Subject) {
    let c = Check("put_blob_keeps_only_matching_content");
    let r = subject.open().await;
    let seq = next_seq();
    let good = format!("the content of a shipped blob {seq}").into_bytes();
    let bad = format!("other content, shipped under the wrong id {seq}").into_bytes();
    let (id, bad_id) = (BlobId::of(&good), BlobId::of(&bad));
    match r.put_blob(&id, Box::new(std::io::Cursor::new(bad))).await {
        Err(e) if e.class() == ErrorClass::Rejected => {}
        Err(e) => c.fail(format!(
            "put_blob of mismatching content failed with {e:?}, not a refusal"
        )),
        Ok(()) => c.fail(format!(
            "put_blob of content hashing to {bad_id} as {id} succeeded"
        )),
    }
    for shown in [id, bad_id] {
        c.ensure(
            r.open_blob(&shown).await.is_err(),
            format!("blob {shown} is stored after a refused put_blob"),
        );
    }
    match r
        .put_blob(&id, Box::new(std::io::Cursor::new(good.clone())))
        .await
    {
        Ok(()) => {
            let back = c.ok("open_blob", r.open_blob(&id).await);
            let back = c.ok("read the blob", c.read_all(back).await);
            c.ensure(
                back == good,
                format!("blob {id} read back differs from what was put"),
            );
        }
        Err(e) if e.class() == ErrorClass::Rejected => {
            c.ensure(
                r.open_blob(&id).await.is_err(),
                format!("a resource that refused put_blob of {id} serves it"),
            );
        }
        Err(e) => c.fail(format!("put_blob of matching content: {e}")),
    }
}

/// Committed redo replayed in order on replicas — empty instances of the same kind, with
/// storage of their own, the blobs each redo needs shipped from the primary — gives the
/// primary's effects: replica 1 replays once; replica 2 replays the same redo twice (again at
/// later LSNs: a redo re-applied sets the same state); replica 3 is stopped half-way through a
/// replay by its fail point ([`Subject::fail_next_replay`]), dropped, reopened, and replays from
/// its applied LSN on. Every replica then shows exactly the effects of the replayed
/// transactions, and not those of a transaction that was not replayed.
pub async fn replay_on_an_empty_instance_gives_the_same_state(subject: &dyn Subject) {
    let c = Check("replay_on_an_empty_instance_gives_the_same_state");
    let r = subject.open().await;
    let tags = [next_tag(), next_tag(), next_tag()];
    let mut redos = Vec::new();
    for tag in tags {
        redos.push(c.committed_redo(subject, &r, tag).await);
    }
    let not_replayed = next_tag();
    c.committed_redo(subject, &r, not_replayed).await;
    for tag in tags {
        c.ensure(
            subject.visible(&r, tag).await,
            format!("effect {tag} is not visible on the primary"),
        );
    }

    let once = subject.open_replica(1).await;
    let base = c.ok("applied_lsn", once.applied_lsn().await);
    c.replay_all(&r, &once, &redos, base).await;
    c.ensure_effects(
        subject,
        &once,
        "replica 1 (replayed once)",
        &tags,
        not_replayed,
    )
    .await;

    let twice = subject.open_replica(2).await;
    let base = c.ok("applied_lsn", twice.applied_lsn().await);
    c.replay_all(&r, &twice, &redos, base).await;
    let again = Lsn(base.0 + redos.len() as u64);
    c.replay_all(&r, &twice, &redos, again).await;
    c.ensure_effects(
        subject,
        &twice,
        "replica 2 (replayed twice)",
        &tags,
        not_replayed,
    )
    .await;

    let killed = subject.open_replica(3).await;
    let base = c.ok("applied_lsn", killed.applied_lsn().await);
    c.replay_all(&r, &killed, &redos[..1], base).await;
    for redo in &redos[1..] {
        c.ship(&r, &killed, redo).await;
    }
    subject.fail_next_replay(&killed).await;
    let stopped = Lsn(base.0 + 2);
    if killed.replay(&redos[1], stopped).await.is_ok() {
        c.fail(format!(
            "the replay of lsn {stopped} went through its fail point"
        ));
    }
    c.ensure_applied(&killed, base.next()).await;
    drop(killed);
    let killed = subject.open_replica(3).await;
    c.ensure_applied(&killed, base.next()).await;
    c.replay_all(&r, &killed, &redos[1..], base.next()).await;
    c.ensure_effects(
        subject,
        &killed,
        "replica 3 (stopped half-way, reopened, replayed again)",
        &tags,
        not_replayed,
    )
    .await;
}

/// A batch, then the same batch again, then an overlapping batch: each redo takes effect
/// once, a redo at or below the applied LSN (another redo offered again at an applied LSN)
/// takes none, the applied LSN is each batch's last, and a batch whose LSNs do not increase is
/// refused whole. Where the resource keeps an inventory, the repeated batch leaves it as it was.
pub async fn replay_batch_applies_once(subject: &dyn Subject) {
    let c = Check("replay_batch_applies_once");
    let r = subject.open().await;
    let tags = [next_tag(), next_tag(), next_tag(), next_tag()];
    let mut redos = Vec::new();
    for tag in tags {
        redos.push(c.committed_redo(subject, &r, tag).await);
    }
    let standby = subject.open_replica(4).await;
    for redo in &redos {
        c.ship(&r, &standby, redo).await;
    }
    let base = c.ok("applied_lsn", standby.applied_lsn().await);
    let at = |n: u64| Lsn(base.0 + n);
    let first = vec![(at(1), redos[0].clone()), (at(2), redos[1].clone())];
    c.ok("replay_batch", standby.replay_batch(&first).await);
    c.ensure_applied(&standby, at(2)).await;
    let before = inventory_of(&standby).await;
    c.ok("replay_batch again", standby.replay_batch(&first).await);
    c.ensure_applied(&standby, at(2)).await;
    c.ensure(
        inventory_of(&standby).await == before,
        "the same batch replayed again changed the inventory",
    );
    let backwards = vec![(at(4), redos[2].clone()), (at(3), redos[2].clone())];
    c.ensure_rejected(
        "a batch whose LSNs go down",
        standby.replay_batch(&backwards).await,
    );
    c.ensure_applied(&standby, at(2)).await;
    let overlapping = vec![(at(2), redos[3].clone()), (at(3), redos[2].clone())];
    c.ok(
        "replay_batch overlapping",
        standby.replay_batch(&overlapping).await,
    );
    c.ensure_applied(&standby, at(3)).await;
    c.ensure_effects(
        subject,
        &standby,
        "after the overlapping batch",
        &tags[..3],
        tags[3],
    )
    .await;
}

/// A batch stopped by the fail point ([`Subject::fail_next_replay`]) leaves the applied LSN
/// where it was, also after a restart; the same batch replayed again then gives every effect,
/// once.
pub async fn replay_batch_interrupted_resumes_exactly_once(subject: &dyn Subject) {
    let c = Check("replay_batch_interrupted_resumes_exactly_once");
    let r = subject.open().await;
    let tags = [next_tag(), next_tag(), next_tag()];
    let mut redos = Vec::new();
    for tag in tags {
        redos.push(c.committed_redo(subject, &r, tag).await);
    }
    let not_replayed = next_tag();
    c.committed_redo(subject, &r, not_replayed).await;
    let standby = subject.open_replica(5).await;
    for redo in &redos {
        c.ship(&r, &standby, redo).await;
    }
    let base = c.ok("applied_lsn", standby.applied_lsn().await);
    let batch: Vec<(Lsn, Vec<u8>)> = redos
        .iter()
        .enumerate()
        .map(|(i, redo)| (Lsn(base.0 + 1 + i as u64), redo.clone()))
        .collect();
    subject.fail_next_replay(&standby).await;
    if standby.replay_batch(&batch).await.is_ok() {
        c.fail("a replay batch went through its fail point");
    }
    c.ensure_applied(&standby, base).await;
    drop(standby);
    let standby = subject.open_replica(5).await;
    c.ensure_applied(&standby, base).await;
    c.ok("replay_batch again", standby.replay_batch(&batch).await);
    c.ensure_applied(&standby, Lsn(base.0 + 3)).await;
    let after = inventory_of(&standby).await;
    c.ok("replay_batch once more", standby.replay_batch(&batch).await);
    c.ensure(
        inventory_of(&standby).await == after,
        "the batch replayed once more changed the inventory",
    );
    c.ensure_effects(
        subject,
        &standby,
        "stopped half-way, reopened, replayed again",
        &tags,
        not_replayed,
    )
    .await;
}

/// Writes committed on one instance (an empty replica playing the primary) and replayed in
/// batches on another empty one give equal inventories; one more write on the primary only
/// makes them differ in exactly the keys that write changed. A resource without an inventory
/// (it refuses, `Rejected`) passes.
pub async fn inventory_equal_after_replay(subject: &dyn Subject) {
    let c = Check("inventory_equal_after_replay");
    let primary = subject.open_replica(6).await;
    match primary.inventory().await {
        Err(e) if e.class() == ErrorClass::Rejected => return,
        other => drop(c.ok("inventory", other)),
    }
    let mut redos = Vec::new();
    for _ in 0..5 {
        redos.push(c.committed_redo(subject, &primary, next_tag()).await);
    }
    let standby = subject.open_replica(7).await;
    let base = c.ok("applied_lsn", standby.applied_lsn().await);
    let mut lsn = base;
    for chunk in redos.chunks(2) {
        let mut batch = Vec::new();
        for redo in chunk {
            c.ship(&primary, &standby, redo).await;
            lsn = lsn.next();
            batch.push((lsn, redo.clone()));
        }
        c.ok("replay_batch", standby.replay_batch(&batch).await);
    }
    c.ensure_applied(&standby, lsn).await;
    let on_primary = c.ok("inventory of the primary", primary.inventory().await);
    let on_standby = c.ok("inventory of the standby", standby.inventory().await);
    c.ensure(!on_primary.is_empty(), "the primary's inventory is empty");
    c.ensure_sorted(&on_primary);
    c.ensure(
        on_primary == on_standby,
        format!(
            "inventories differ after replay in {:?}",
            differing(&on_primary, &on_standby)
        ),
    );
    c.committed_redo(subject, &primary, next_tag()).await;
    let later = c.ok("inventory of the primary", primary.inventory().await);
    let written = differing(&on_primary, &later);
    c.ensure(!written.is_empty(), "one more write changed no key");
    c.ensure(
        differing(&later, &on_standby) == written,
        format!(
            "after one more write on the primary only, the sites differ in {:?}, not in the keys it wrote {written:?}",
            differing(&later, &on_standby)
        ),
    );
}

/// A re-seed, as a standby that fell behind gets it: writes committed on instance A (an empty
/// replica playing the primary); instance B (another, with a key of its own that A lacks) gets
/// A's content key by key — `remove_entry` of every key A lacks first, then `write_entry` of
/// every key of A with A's `read_entry` content, whose blake3 is A's inventory digest — and
/// then B's inventory equals A's. `set_applied_lsn(P)` sets the applied LSN, also below the
/// current one, durably (after a reopen too); replaying A's later redo on B after P gives A's
/// state again. A resource without an inventory passes if it refuses the four calls.
pub async fn reseed_copies_an_instance_key_by_key(subject: &dyn Subject) {
    let c = Check("reseed_copies_an_instance_key_by_key");
    let a = subject.open_replica(8).await;
    if !c.keeps_inventory(&a).await {
        return;
    }
    for _ in 0..3 {
        c.committed_redo(subject, &a, next_tag()).await;
    }
    let b = subject.open_replica(9).await;
    let only_on_b = next_tag();
    c.committed_redo(subject, &b, only_on_b).await;
    let on_a = c.ok("inventory of A", a.inventory().await);
    let on_b = c.ok("inventory of B", b.inventory().await);
    let removed = c.remove_missing(&b, &on_a, &on_b).await;
    c.ensure(!removed.is_empty(), "B had no key that A lacks");
    for entry in &on_a {
        c.copy_entry(&a, &b, entry).await;
    }
    let copied = c.ok("inventory of B", b.inventory().await);
    c.ensure(
        copied == on_a,
        format!(
            "after the re-seed the inventories differ in {:?}",
            differing(&on_a, &copied)
        ),
    );
    c.ensure(
        !subject.visible(&b, only_on_b).await,
        format!("effect {only_on_b}, removed by the re-seed, is still visible"),
    );
    for key in &removed {
        let read = c.ok("read_entry of a removed key", b.read_entry(key).await);
        c.ensure(
            read.is_none(),
            format!("key {key:?} is still there after remove_entry"),
        );
        c.ok("remove_entry of an absent key", b.remove_entry(key).await);
    }

    let p = Lsn(40);
    c.ok("set_applied_lsn", b.set_applied_lsn(Lsn(p.0 + 10)).await);
    c.ok("set_applied_lsn lower", b.set_applied_lsn(p).await);
    c.ensure_applied(&b, p).await;
    drop(b);
    let b = subject.open_replica(9).await;
    c.ensure_applied(&b, p).await;

    let later = next_tag();
    let redo = c.committed_redo(subject, &a, later).await;
    c.ship(&a, &b, &redo).await;
    c.ok(
        "replay_batch after P",
        b.replay_batch(&[(p.next(), redo)]).await,
    );
    c.ensure_applied(&b, p.next()).await;
    c.ensure(
        subject.visible(&b, later).await,
        format!("effect {later}, replayed after the re-seed, is not visible"),
    );
    let on_a = c.ok("inventory of A", a.inventory().await);
    let on_b = c.ok("inventory of B", b.inventory().await);
    c.ensure(
        on_a == on_b,
        format!(
            "after replay from P + 1 the inventories differ in {:?}",
            differing(&on_a, &on_b)
        ),
    );
}

/// The re-seeding calls refuse (class Rejected, nothing changed) a key that is malformed or
/// leads out of the resource (`../escape`, `/absolute`: malformed for every resource), and the
/// three changes refuse while a branch is prepared, once it is resolved they work again; a read
/// works while a branch is prepared (a re-seed reads the primary, which has such branches).
pub async fn reseed_refuses_bad_keys_and_prepared_branches(subject: &dyn Subject) {
    let c = Check("reseed_refuses_bad_keys_and_prepared_branches");
    let r = subject.open_replica(9).await;
    if !c.keeps_inventory(&r).await {
        return;
    }
    for key in ["../escape", "/absolute"] {
        c.ensure_rejected(
            &format!("write_entry {key:?}"),
            r.write_entry(key, content(b"x")).await,
        );
        c.ensure_rejected(
            &format!("read_entry {key:?}"),
            r.read_entry(key).await.map(drop),
        );
        c.ensure_rejected(&format!("remove_entry {key:?}"), r.remove_entry(key).await);
    }
    c.committed_redo(subject, &r, next_tag()).await;
    let entries = c.ok("inventory", r.inventory().await);
    let Some(entry) = entries.first() else {
        c.fail("the inventory is empty after a commit")
    };
    let applied = c.ok("applied_lsn", r.applied_lsn().await);
    let key = entry.key.as_str();
    let bytes = c.read_all(c.entry_content(&r, key).await).await;
    let bytes = c.ok("read the entry", bytes);
    let xid = c.xid(&r).await;
    c.prepare_writing(subject, &r, &xid, next_tag()).await;
    c.ensure_rejected(
        "write_entry while prepared",
        r.write_entry(key, content(&bytes)).await,
    );
    let read = c.read_all(c.entry_content(&r, key).await).await;
    c.ensure(
        c.ok("read_entry while prepared", read) == bytes,
        "read_entry while a branch is prepared (as on a primary) gave other content",
    );
    c.ensure_rejected("remove_entry while prepared", r.remove_entry(key).await);
    c.ensure_rejected(
        "set_applied_lsn while prepared",
        r.set_applied_lsn(applied.next()).await,
    );
    c.ensure_applied(&r, applied).await;
    c.ok("rollback", r.rollback(&xid).await);
    c.ok(
        "write_entry once resolved",
        r.write_entry(key, content(&bytes)).await,
    );
    c.ensure(
        c.ok("inventory", r.inventory().await) == entries,
        "writing an entry with its own content changed the inventory",
    );
}

/// `bytes` as the content of a write.
fn content(bytes: &[u8]) -> crate::BlobContent {
    Box::new(std::io::Cursor::new(bytes.to_vec()))
}

/// The inventory of `r`, or `None` when it keeps none.
async fn inventory_of(r: &Arc<dyn Resource>) -> Option<Vec<InventoryEntry>> {
    r.inventory().await.ok()
}

/// The keys whose entries differ between `a` and `b` (present in one only, or another digest).
fn differing(a: &[InventoryEntry], b: &[InventoryEntry]) -> Vec<String> {
    let index = |entries: &[InventoryEntry]| -> std::collections::BTreeMap<String, [u8; 32]> {
        entries.iter().map(|e| (e.key.clone(), e.digest)).collect()
    };
    let (a, b) = (index(a), index(b));
    let mut keys: Vec<String> = a.keys().chain(b.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.retain(|k| a.get(k) != b.get(k));
    keys
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

    /// Ships the blobs `redo` needs from `from` to `to`.
    async fn ship(&self, from: &Arc<dyn Resource>, to: &Arc<dyn Resource>, redo: &[u8]) {
        for id in self.ok("redo_blobs", from.redo_blobs(redo)) {
            let content = self.ok("open_blob", from.open_blob(&id).await);
            self.ok("put_blob", to.put_blob(&id, content).await);
        }
    }

    /// Ships and replays `redos` on `to` at the LSNs after `base`, in order.
    async fn replay_all(
        &self,
        from: &Arc<dyn Resource>,
        to: &Arc<dyn Resource>,
        redos: &[Vec<u8>],
        base: Lsn,
    ) {
        let mut lsn = base;
        for redo in redos {
            lsn = lsn.next();
            self.ship(from, to, redo).await;
            self.ok("replay", to.replay(redo, lsn).await);
        }
        self.ensure_applied(to, lsn).await;
    }

    /// Every effect of `tags` is visible on `r`, and that of `absent` is not.
    async fn ensure_effects(
        &self,
        subject: &dyn Subject,
        r: &Arc<dyn Resource>,
        what: &str,
        tags: &[u32],
        absent: u32,
    ) {
        for tag in tags {
            self.ensure(
                subject.visible(r, *tag).await,
                format!("{what}: effect {tag} is not visible"),
            );
        }
        self.ensure(
            !subject.visible(r, absent).await,
            format!("{what}: effect {absent}, never replayed, is visible"),
        );
    }

    /// Everything `content` yields, read on the blocking pool.
    async fn read_all(&self, mut content: crate::BlobContent) -> Result<Vec<u8>, ResourceError> {
        let read = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut content, &mut out).map(|_| out)
        })
        .await;
        match read {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => self.fail(format!("reading a blob: {e}")),
            Err(e) => self.fail(format!("reading a blob panicked: {e}")),
        }
    }

    /// The verdict of a fence to `epoch` while an older branch is prepared; see [`Fenced`].
    async fn fence_over_prepared(
        &self,
        r: &Arc<dyn Resource>,
        epoch: Epoch,
        fenced: Result<(), ResourceError>,
    ) -> Fenced {
        match fenced {
            Ok(()) => {
                let now = self.ok("fence_epoch", r.fence_epoch().await);
                self.ensure(
                    now >= epoch,
                    format!("fence to {epoch} returned, the epoch is {now}"),
                );
                Fenced::Raised
            }
            Err(e) if e.class() == ErrorClass::Retryable => {
                let now = self.ok("fence_epoch", r.fence_epoch().await);
                self.ensure(
                    now < epoch,
                    format!("a fence to {epoch} that failed ({e}) raised the epoch to {now}"),
                );
                Fenced::Refused
            }
            Err(e) => self.fail(format!("fence to {epoch}: {e}")),
        }
    }

    /// A resolution by a fenced owner must be refused (class Rejected, nothing changed).
    #[track_caller]
    fn ensure_refused(&self, step: &str, xid: &Xid, result: Result<(), ResourceError>) {
        match result {
            Err(e) if e.class() == ErrorClass::Rejected => {}
            Err(e) => self.fail(format!("{step} of {xid} failed with {e:?}, not a refusal")),
            Ok(()) => self.fail(format!(
                "{step} of {xid} succeeded: an owner fenced out of epoch {} changed the resource",
                xid.epoch
            )),
        }
    }

    /// A new instance (the new owner) lists the prepared `xid` and commits it.
    async fn new_owner_commits(&self, subject: &dyn Subject, xid: &Xid, tag: u32) {
        let r = subject.open().await;
        self.ensure(
            self.recover(&r).await.contains(xid),
            format!("a new instance does not list the prepared branch {xid} of the fenced owner"),
        );
        self.ok("commit by the new owner", r.commit(xid).await);
        self.ensure(
            subject.visible(&r, tag).await,
            format!("effect {tag} is not visible after the new owner committed it"),
        );
    }

    /// The result of a spawned step, waited for at most [`STEP_MS_MAX`].
    async fn joined<T>(
        &self,
        step: &str,
        handle: &mut tokio::task::JoinHandle<Result<T, ResourceError>>,
    ) -> Result<T, ResourceError> {
        match tokio::time::timeout(Duration::from_millis(STEP_MS_MAX), &mut *handle).await {
            Ok(joined) => self.join_result(step, joined),
            Err(_) => {
                handle.abort();
                self.fail(format!("{step} did not return within {STEP_MS_MAX} ms"))
            }
        }
    }

    fn join_result<T>(
        &self,
        step: &str,
        joined: Result<Result<T, ResourceError>, tokio::task::JoinError>,
    ) -> Result<T, ResourceError> {
        match joined {
            Ok(result) => result,
            Err(e) => self.fail(format!("{step} panicked: {e}")),
        }
    }

    /// `result` must be a refusal (class Rejected).
    #[track_caller]
    fn ensure_rejected(&self, step: &str, result: Result<(), ResourceError>) {
        match result {
            Err(e) if e.class() == ErrorClass::Rejected => {}
            Err(e) => self.fail(format!("{step} failed with {e:?}, not a refusal")),
            Ok(()) => self.fail(format!("{step} was not refused")),
        }
    }

    /// Whether `r` keeps an inventory; one that does not must refuse the re-seeding calls.
    async fn keeps_inventory(&self, r: &Arc<dyn Resource>) -> bool {
        match r.inventory().await {
            Ok(_) => true,
            Err(e) if e.class() == ErrorClass::Rejected => {
                self.ensure_rejected("read_entry", r.read_entry("k").await.map(drop));
                self.ensure_rejected("write_entry", r.write_entry("k", content(b"x")).await);
                self.ensure_rejected("remove_entry", r.remove_entry("k").await);
                self.ensure_rejected("set_applied_lsn", r.set_applied_lsn(Lsn(1)).await);
                false
            }
            Err(e) => self.fail(format!("inventory: {e}")),
        }
    }

    /// Removes from `b` every key of `on_b` that `on_a` lacks; the keys removed.
    async fn remove_missing(
        &self,
        b: &Arc<dyn Resource>,
        on_a: &[InventoryEntry],
        on_b: &[InventoryEntry],
    ) -> Vec<String> {
        let mut removed = Vec::new();
        for entry in on_b {
            if on_a.binary_search_by(|e| e.key.cmp(&entry.key)).is_err() {
                self.ok("remove_entry", b.remove_entry(&entry.key).await);
                removed.push(entry.key.clone());
            }
        }
        removed
    }

    /// The content of `key` on `r`, which must be there.
    async fn entry_content(&self, r: &Arc<dyn Resource>, key: &str) -> crate::BlobContent {
        match self.ok("read_entry", r.read_entry(key).await) {
            Some(content) => content,
            None => self.fail(format!(
                "read_entry of {key:?}, listed by the inventory, found nothing"
            )),
        }
    }

    /// Copies `entry` from `a` to `b`, checking that what `a` reads hashes to its digest.
    async fn copy_entry(
        &self,
        a: &Arc<dyn Resource>,
        b: &Arc<dyn Resource>,
        entry: &InventoryEntry,
    ) {
        let bytes = self.read_all(self.entry_content(a, &entry.key).await).await;
        let bytes = self.ok("read the entry", bytes);
        self.ensure(
            *blake3::hash(&bytes).as_bytes() == entry.digest,
            format!(
                "the content read_entry gives for {:?} does not hash to its inventory digest",
                entry.key
            ),
        );
        let streamed = self.entry_content(a, &entry.key).await;
        self.ok("write_entry", b.write_entry(&entry.key, streamed).await);
    }

    /// Inventory entries are sorted by key, each key once.
    #[track_caller]
    fn ensure_sorted(&self, entries: &[InventoryEntry]) {
        if let Some(pair) = entries.windows(2).find(|p| p[0].key >= p[1].key) {
            self.fail(format!(
                "inventory not sorted by key, each once: {:?} before {:?}",
                pair[0].key, pair[1].key
            ));
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

/// A small tmpfs mounted at a directory for the life of the guard: how the full-disk tests get
/// a file system that fills up (mounting needs root; without it the test panics saying so).
pub struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `1m`, `8m`) at `dir`, created
    /// when missing.
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("create the mount point {}: {e}", dir.display()));
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Tmpfs {
                dir: dir.to_path_buf(),
            },
            other => panic!(
                "this test needs root to mount a small tmpfs (mount -t tmpfs -o size={size} tmpfs {}); \
                 run it as root: {other:?}",
                dir.display()
            ),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a failing test's leftovers): detach it lazily.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Writes `path` until its file system is full.
pub fn fill_up(path: &std::path::Path) {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let block = [0xAAu8; 4096];
    loop {
        match file.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return,
            Err(e) => panic!("fill {}: {e}", path.display()),
        }
    }
}
