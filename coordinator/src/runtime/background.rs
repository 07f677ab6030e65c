//! The tasks beside the transactions: the timeout reaper, the orphan sweeper, the checkpointer
//! and blob collection.
//!
//! Each is a tracked task on the coordinator's runtime, woken by a timer, holding only a weak
//! handle on the coordinator between rounds; shutdown stops it.
//!
//! * The **reaper** rolls back every transaction open longer than its timeout (`txn_timeout_ms`,
//!   or its own); a transaction past it is also rolled back as soon as work joins or checks it
//!   (`reap_if_due`), so a short timeout of its own is not noticed a reaper round late.
//! * The **orphan sweeper** finds what recovery at open cannot: a branch prepared while this
//!   coordinator runs that no transaction of it owns — a prepare that reached the server after
//!   its transaction had already rolled back (a client-side timeout, a broken connection), or a
//!   branch prepared behind the coordinator's back. Every `orphan_sweep_ms` it asks every
//!   resource for its prepared branches (`recover`); a branch of this node that is neither open
//!   nor running here in two sweeps in a row, and whose xid has no commit decision in the
//!   journal, is rolled back by a machine of its own (so it is retried, listed, and stopped by
//!   shutdown like any other), reported with a warning and counted
//!   ([`Coordinator::orphans_rolled_back`]). The argument that this never touches a transaction
//!   that may commit is on `sweep_orphans`.
//! * The **checkpointer** removes the journal segments nothing needs any more
//!   ([`crate::retention`]) and, every `blob_collect_ms`, asks every resource to collect its
//!   blobs.
//!
//! # Implementation caveats
//!
//! * The sweeper reads the whole retained journal, on the runtime's thread, in a sweep that
//!   found something to roll back (rare, but not free on a long journal).
//! * It assumes that no other process prepares branches with this node's id (two coordinators
//!   sharing a node id are not supported anyway: their xids could collide).
//! * A branch it finds decided but not driven (after an operator's `resolve --commit` whose
//!   branch commit failed) is committed by a machine of its own, never rolled back.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use adapters::{Lsn, Xid};
use journal::JournalError;

use super::{BranchRef, Coordinator, Open, lock, read_ledger};
use crate::engine::TxnMachine;
use crate::ledger::{Ledger, Verdict};
use crate::retention::{JournalBlobs, JournalSource};

/// Prepared branches the orphan sweeper found unowned: (resource name, xid).
pub(super) type Suspects = HashSet<(Arc<str>, Xid)>;

impl Coordinator {
    /// Starts the checkpointer (unless `checkpoint_ms` is 0): a tracked task that removes the
    /// journal segments nothing needs any more (see [`crate::retention`]) every `checkpoint_ms`,
    /// on the blocking pool. Shutdown stops it (and checkpoints once more).
    pub(super) fn start_checkpointer(&self) {
        let interval_ms = self.inner.config.checkpoint_ms;
        if interval_ms == 0 {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let tick = Duration::from_millis(interval_ms);
        let collect_every = match self.inner.config.blob_collect_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        self.inner.tasks.spawn(
            &self.inner.handle,
            self.inner.stop.subscribe(),
            async move {
                let mut collected = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let journal_side = Arc::clone(&inner);
                    let checkpoint = tokio::task::spawn_blocking(move || {
                        journal_side.retention.checkpoint(&journal_side.journal)
                    });
                    match checkpoint.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(JournalError::Closed)) | Err(_) => return,
                        Ok(Err(e)) => tracing::error!(error = %e, "checkpoint the journal"),
                    }
                    if collect_every.is_some_and(|every| collected.elapsed() >= every) {
                        collected = tokio::time::Instant::now();
                        Coordinator { inner }.collect_blobs().await;
                    }
                }
            },
        );
    }

    /// Asks every resource to remove the blobs nothing needs any more (see
    /// [`crate::retention`]); returns how many each removed. A resource that fails is logged
    /// and skipped (its blobs stay until the next round).
    pub async fn collect_blobs(&self) -> BTreeMap<String, u64> {
        let mut removed = BTreeMap::new();
        for (name, c) in &self.inner.resources {
            let source: Arc<dyn JournalSource> = Arc::clone(&self.inner) as _;
            let retained = JournalBlobs::new(source, Arc::clone(&c.resource));
            match c.resource.collect_blobs(&retained).await {
                Ok(done) => {
                    if done.removed > 0 {
                        tracing::debug!(resource = %name, removed = done.removed, kept = done.kept, "collected blobs");
                    }
                    removed.insert(name.clone(), done.removed);
                }
                Err(e) => tracing::warn!(resource = %name, error = %e, "collect blobs"),
            }
        }
        removed
    }

    pub(super) fn start_reaper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let tick = Duration::from_millis((self.inner.config.txn_timeout_ms / 4).clamp(10, 1_000));
        self.inner.tasks.spawn(
            &self.inner.handle,
            self.inner.stop.subscribe(),
            async move {
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let coordinator = Coordinator { inner };
                    coordinator.reap_timed_out().await;
                    let counts = coordinator.counts();
                    crate::metrics::sample(counts.open, counts.in_doubt);
                }
            },
        );
    }

    /// Rolls back every transaction open longer than its timeout, through a rollback machine
    /// (which retries until every branch answers). The transaction stays listed as timed out,
    /// with no branches, until its caller hears of it.
    pub(super) async fn reap_timed_out(&self) {
        let mut expired: Vec<(Xid, Instant, Duration, Vec<BranchRef>)> = Vec::new();
        for shard in self.inner.open.iter() {
            let mut open = lock(shard);
            expired.extend(
                open.iter_mut()
                    .filter(|(_, o)| !o.timed_out && o.started.elapsed() > o.timeout)
                    .map(|(xid, o)| {
                        o.timed_out = true;
                        (*xid, o.started, o.timeout, std::mem::take(&mut o.branches))
                    }),
            );
        }
        for (xid, started, timeout, branches) in expired {
            tracing::warn!(xid = %xid, "transaction open longer than {} ms; rolling back", timeout.as_millis());
            let open = Open {
                started,
                timeout,
                branches,
                timed_out: true,
            };
            self.start_rollback(&xid, open, "the transaction timed out");
        }
    }

    /// Rolls `xid` back now when it is open past its timeout and the reaper has not got to it
    /// yet (its round comes every `txn_timeout_ms / 4`, at most a second, so a transaction's
    /// own shorter timeout would otherwise be noticed late): what the reaper would do, for one
    /// transaction. Called before work joins or checks the transaction.
    pub(super) fn reap_if_due(&self, xid: &Xid) {
        let expired = {
            let mut open = self.inner.open_shard(xid);
            match open.get_mut(xid) {
                Some(o) if !o.timed_out && o.started.elapsed() > o.timeout => {
                    o.timed_out = true;
                    Some(Open {
                        started: o.started,
                        timeout: o.timeout,
                        branches: std::mem::take(&mut o.branches),
                        timed_out: true,
                    })
                }
                _ => None,
            }
        };
        if let Some(open) = expired {
            tracing::warn!(xid = %xid, "transaction open longer than {} ms; rolling back", open.timeout.as_millis());
            self.start_rollback(xid, open, "the transaction timed out");
        }
    }

    /// How many prepared branches the orphan sweeper has found and handed to a rollback since
    /// open (each is also reported with a warning naming its resource and xid).
    pub fn orphans_rolled_back(&self) -> u64 {
        self.inner.orphans_rolled_back.load(Ordering::Relaxed)
    }

    /// Starts the orphan sweeper (unless `orphan_sweep_ms` is 0): a tracked task that runs
    /// [`Coordinator::sweep_orphans`] every `orphan_sweep_ms`, carrying the branches found
    /// unowned from one sweep to the next. Shutdown stops it.
    pub(super) fn start_sweeper(&self) {
        let interval_ms = self.inner.config.orphan_sweep_ms;
        if interval_ms == 0 {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let tick = Duration::from_millis(interval_ms);
        self.inner.tasks.spawn(
            &self.inner.handle,
            self.inner.stop.subscribe(),
            async move {
                let mut suspects = Suspects::new();
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(inner) = weak.upgrade() else { return };
                    suspects = Coordinator { inner }.sweep_orphans(&suspects).await;
                }
            },
        );
    }

    /// One sweep: lists every resource's prepared branches, commits those of this node whose
    /// transaction the journal says committed (no machine drives them), rolls back those that
    /// were unowned in the previous sweep (`suspects`), still are and have no decision, and
    /// returns the branches unowned now without a decision (the next sweep's suspects).
    ///
    /// Why a branch rolled back here never belongs to a transaction that may commit:
    ///
    /// 1. A branch is prepared only by a machine in the running map: `commit` moves the
    ///    transaction from the open map to the running map under the open shard's lock, and
    ///    prepares after that. A branch prepared in another process (a remote application's
    ///    PostgreSQL branch) belongs to a transaction that is open here from its `begin` to its
    ///    `commit`, and the application prepares it before it enlists it
    ///    ([`Coordinator::join_prepared`]): while the transaction is open (not timed out), its
    ///    branch is owned, enlisted or not. A timed-out transaction can never commit (`commit`
    ///    refuses it, `join_prepared` rolls back what joins it late), so it owns nothing: a
    ///    branch prepared by an application that died before enlisting is rolled back once
    ///    its transaction has timed out. A machine leaves the running map when it is finished (every
    ///    branch acknowledged commit or rollback, so none of its branches is still prepared) or
    ///    when an operator's `resolve` cancels it.
    /// 2. A decided transaction (durable `Commit`) keeps its machine in the running map until
    ///    it is finished, through every phase-2 retry and while in doubt; recovery at open puts
    ///    one there for every `Commit` without `End`. So a branch listed as prepared whose
    ///    machine is not running belongs to no transaction with a decision — except when a
    ///    resource brought one back (restored from a backup) or an operator's `resolve` could
    ///    not reach it. Step 4 covers those.
    /// 3. Ownership is checked after `recover` answered: a transaction that finished between
    ///    the two looks unowned in this sweep, but its branch is resolved, so the next sweep's
    ///    `recover` does not list it again (xids never repeat), and only a branch unowned in two
    ///    sweeps in a row is rolled back.
    /// 4. Whenever a branch is unowned, the journal is read: a branch whose xid has a decided
    ///    commit, or an operator's commit, is committed by a machine of its own that pins the
    ///    decision until it is done (a heuristic hazard when the transaction had ended), never
    ///    rolled back. No new decision can appear for an unowned xid, since only a running
    ///    machine appends one.
    ///
    /// When every resource has answered `recover` since open (at open or in a sweep), the
    /// startup pin goes: what recovery could not ask a resource at open, a sweep has handled.
    pub(super) async fn sweep_orphans(&self, suspects: &Suspects) -> Suspects {
        let (unowned, all_answered) = self.unowned_prepared().await;
        if unowned.is_empty() {
            self.release_startup_pin(all_answered);
            return unowned;
        }
        let ledger = match read_ledger(&self.inner.journal) {
            Ok(ledger) => ledger,
            Err(e) => {
                tracing::error!(error = %e, "orphan sweep: read the journal; nothing rolled back");
                return unowned;
            }
        };
        let mut next = Suspects::new();
        for (name, xid) in unowned {
            if ledger.verdict(&xid) == Verdict::OnePhaseOpen {
                continue;
            }
            if ledger.must_commit(&xid) {
                self.commit_undriven(&ledger, &name, xid);
                continue;
            }
            if suspects.contains(&(Arc::clone(&name), xid)) {
                self.roll_back_orphan(&name, xid);
            } else {
                next.insert((name, xid));
            }
        }
        self.release_startup_pin(all_answered);
        next
    }

    /// A prepared branch of a decided transaction that nothing drives: committed by a machine
    /// that pins the decision.
    pub(super) fn commit_undriven(&self, ledger: &Ledger, name: &str, xid: Xid) {
        let verdict = ledger.verdict(&xid);
        if verdict == Verdict::Committed {
            tracing::error!(resource = %name, xid = %xid, "heuristic hazard: a prepared branch of a transaction that ended committed; committing it again (was the resource restored from a backup?)");
        } else {
            tracing::warn!(resource = %name, xid = %xid, "a prepared branch of a committed transaction that no machine drives; committing it");
        }
        let pin = ledger.entry(&xid).map(|e| e.first_lsn);
        let lsn = pin.unwrap_or(Lsn::ZERO);
        let (machine, commands) =
            TxnMachine::recovered_branch_commit(xid, lsn, self.inner.config.retry);
        self.drive_recovered(machine, &[name.to_string()], commands, pin);
    }

    /// Rolls back an orphan (see [`Coordinator::sweep_orphans`]) by a machine of its own.
    pub(super) fn roll_back_orphan(&self, name: &Arc<str>, xid: Xid) {
        tracing::warn!(resource = %name, xid = %xid, "rolling back an orphan: a prepared branch of this node that no transaction owns and the journal has no decision for");
        self.inner
            .orphans_rolled_back
            .fetch_add(1, Ordering::Relaxed);
        let (machine, commands) = TxnMachine::recovered_orphan(xid, self.inner.config.retry);
        let mut driver =
            self.register_machine(machine, vec![self.inner.branch(name)], Instant::now());
        driver.commands = commands;
        driver.spawn(tracing::info_span!("orphan", xid = %xid, resource = %name));
    }

    /// Lets the startup pin go once every resource has answered `recover` since open.
    pub(super) fn release_startup_pin(&self, all_answered: bool) {
        if !all_answered {
            return;
        }
        if let Some(pin) = lock(&self.inner.startup_pin).take() {
            self.inner.retention.pins.unpin(pin);
            tracing::info!(
                "every resource has listed its prepared branches since open; the journal may be checkpointed past what recovery read"
            );
        }
    }

    /// The prepared branches of this node that no open or running transaction owns, read from
    /// every resource's `recover`, and whether every resource has answered since open. A
    /// resource whose `recover` fails is skipped (its branches must then be found unowned twice
    /// again).
    pub(super) async fn unowned_prepared(&self) -> (Suspects, bool) {
        let node = self.inner.config.node;
        let mut found = Suspects::new();
        for (name, configured) in &self.inner.resources {
            match self
                .recover_within_deadline(name, &configured.resource)
                .await
            {
                Ok(xids) => {
                    lock(&self.inner.unanswered).remove(name);
                    found.extend(
                        xids.into_iter()
                            .filter(|xid| xid.node == node)
                            .map(|xid| (Arc::clone(&configured.name), xid)),
                    )
                }
                Err(e) => {
                    let next_ms = self.inner.config.orphan_sweep_ms;
                    tracing::warn!(resource = %name, "orphan sweep: list prepared branches: {e}; retrying in {next_ms} ms");
                }
            }
        }
        let all_answered = lock(&self.inner.unanswered).is_empty();
        if found.is_empty() {
            return (found, all_answered);
        }
        let running: HashSet<Xid> = self.inner.running().iter().map(|r| r.xid).collect();
        // A timed-out transaction owns nothing: the reaper took its branches, and nothing can
        // commit it (its entry only waits for its caller to hear of the timeout).
        found.retain(|(_, xid)| {
            let open = self
                .inner
                .open_shard(xid)
                .get(xid)
                .is_some_and(|o| !o.timed_out);
            !open && !running.contains(xid)
        });
        (found, all_answered)
    }
}
