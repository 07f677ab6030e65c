//! Promotion: a standby becomes the primary, step by step, each step journaled.
//!
//! 1. **guards** — this node is healthy, its lag is within `lag_guard_records`, its own
//!    promise not to promote has run out (skipped with `--force`, except the promise);
//! 2. **stop_work** — stop receiving: from here the journal is this node's own;
//! 3. **epoch** — claim epoch + 1 in the quorum store (compare-and-swap: one winner; a loser
//!    is told who won and follows it); journaled as the first record of the new epoch;
//! 4. **fence** — the old primary cannot decide any more: it handed over, or a fence agent
//!    switched it off, or its lease ran out in the store (it stops `lease_margin_ms` before
//!    that on its own); then every resource is fenced at the new epoch;
//! 5. **in_doubt** — a `OnePhase` record without its outcome is rolled back here (`Abort`:
//!    its outcome at the old primary is unknown and it never reached this site); after
//!    replay, every `Commit` replay applied gets its `End`;
//! 6. **replay** — replay applies everything received;
//! 7. **serve** — the coordinator opens at the new epoch and the services turn on.
//!
//! A re-run reads the `Role` records and the quorum store and goes on after the last step
//! done; on a primary it answers "already done".

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::ledger::Ledger;
use coordinator::record::{ABORT, CoordRecord, END};
use journal::{Epoch, Journal};
use proto::v1;
use replicator::failover::{Authority, RoleHistory, append_role};
use replicator::quorum::{Holder, QuorumError};

use super::follow::Following;
use super::{Node, REPLAY_MS_MAX, Role};

/// Why a promotion was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Why {
    /// `concord promote` (or a switchover's second half).
    Operator,
    /// The standby found the primary dead or sick.
    Automatic,
    /// The node holds the epoch at start: finish or resume.
    Resume,
    /// The first primary of a new cluster.
    First,
}

/// A promotion request.
#[derive(Clone, Debug)]
pub(crate) struct Ask {
    pub why: Why,
    pub force: bool,
    pub dry_run: bool,
    pub operator: String,
    /// A planned handover from the primary at this epoch (0: none).
    pub handover_epoch: u64,
}

impl Ask {
    /// The node holds the epoch at start.
    pub fn resume() -> Ask {
        Ask {
            why: Why::Resume,
            force: false,
            dry_run: false,
            operator: "startup".into(),
            handover_epoch: 0,
        }
    }

    /// The first primary.
    pub fn first() -> Ask {
        Ask {
            why: Why::First,
            operator: "startup".into(),
            ..Ask::resume()
        }
    }

    /// The standby promotes itself.
    pub fn automatic(reason: &str) -> Ask {
        Ask {
            why: Why::Automatic,
            operator: format!("automatic: {reason}"),
            ..Ask::resume()
        }
    }
}

/// The steps as they are done, for the reply.
pub(crate) struct Report {
    steps: Vec<v1::StepReport>,
    started: Instant,
    last: Instant,
}

impl Report {
    pub fn new() -> Report {
        let now = Instant::now();
        Report {
            steps: Vec::new(),
            started: now,
            last: now,
        }
    }

    /// Records a step.
    pub fn step(&mut self, step: &str, outcome: &str, detail: impl Into<String>) {
        let now = Instant::now();
        let detail = detail.into();
        tracing::info!(step, outcome, "{step}: {outcome}: {detail}");
        self.steps.push(v1::StepReport {
            step: step.into(),
            outcome: outcome.into(),
            detail,
            ms: now.duration_since(self.last).as_millis() as u64,
        });
        self.last = now;
    }

    /// Since the first step.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A reply with these steps.
    pub fn reply(&self, outcome: v1::ChangeOutcome) -> v1::RoleChangeReply {
        v1::RoleChangeReply {
            outcome: outcome as i32,
            steps: self.steps.clone(),
            ..v1::RoleChangeReply::default()
        }
    }

    /// A refusal: `reason` and what to do.
    pub fn refuse(
        &mut self,
        step: &str,
        reason: impl Into<String>,
        what_to_do: impl Into<String>,
    ) -> v1::RoleChangeReply {
        self.stop_at(
            step,
            v1::ChangeOutcome::Refused,
            reason.into(),
            what_to_do.into(),
        )
    }

    /// A failure: `reason` and what to do.
    pub fn fail(
        &mut self,
        step: &str,
        reason: impl Into<String>,
        what_to_do: impl Into<String>,
    ) -> v1::RoleChangeReply {
        self.stop_at(
            step,
            v1::ChangeOutcome::Failed,
            reason.into(),
            what_to_do.into(),
        )
    }

    /// The change stops at `step` (refused or failed), with why and what to do.
    fn stop_at(
        &mut self,
        step: &str,
        outcome: v1::ChangeOutcome,
        reason: String,
        what_to_do: String,
    ) -> v1::RoleChangeReply {
        let word = if outcome == v1::ChangeOutcome::Refused {
            "refused"
        } else {
            "failed"
        };
        self.step(step, word, reason.clone());
        v1::RoleChangeReply {
            reason,
            what_to_do,
            ..self.reply(outcome)
        }
    }

    /// The refusal of a change asked while another one runs (`running` names it).
    pub fn busy(&mut self, running: String) -> v1::RoleChangeReply {
        self.refuse(
            "start",
            running,
            "wait for it to finish (concord status shows the role), then run the command again",
        )
    }
}

/// How the old primary was fenced.
enum Fenced {
    /// It handed over (switchover).
    Handover,
    /// A fence agent switched it off.
    Agent(String),
    /// The store said its lease had run out when this node claimed the epoch.
    LeaseExpired,
    /// Its lease was overridden: wait this long before serving.
    WaitLease(Duration),
    /// First epoch: there was no old primary.
    Nobody,
}

/// Promotes `node`; see the module docs.
pub(crate) async fn promote(node: &Arc<Node>, ask: Ask) -> v1::RoleChangeReply {
    let mut report = Report::new();
    let _change = match node.begin_change("a promotion") {
        Ok(guard) => guard,
        Err(running) => return report.busy(running),
    };
    let mut role = node.role.lock().await;
    promote_in(node, ask, &mut role, report).await
}

/// [`promote`] for a caller that holds the role-change lock and the role.
pub(crate) async fn promote_locked(
    node: &Arc<Node>,
    ask: Ask,
    role: &mut Role,
) -> v1::RoleChangeReply {
    promote_in(node, ask, role, Report::new()).await
}

async fn promote_in(
    node: &Arc<Node>,
    ask: Ask,
    role: &mut Role,
    mut report: Report,
) -> v1::RoleChangeReply {
    if let Role::Primary(serving) = &*role {
        let epoch = serving.authority.epoch();
        report.step(
            "serve",
            "already done",
            format!("this node is the primary at epoch {epoch}"),
        );
        return v1::RoleChangeReply {
            epoch,
            primary: node.fo.address.clone(),
            ..report.reply(v1::ChangeOutcome::AlreadyDone)
        };
    }
    let loss = match &*role {
        Role::Standby(following) => Some(replicator::failover::loss::estimate(
            &node.anchors,
            &following.journal,
        )),
        _ => None,
    };
    if ask.dry_run {
        report.step(
            "dry_run",
            "done",
            describe_loss(loss.as_ref()).unwrap_or_else(|| "this node is not a standby".into()),
        );
        return v1::RoleChangeReply {
            loss,
            epoch: node.view().epoch,
            primary: node.view().primary.unwrap_or_default(),
            ..report.reply(v1::ChangeOutcome::DryRun)
        };
    }
    if let Err(reply) = guards(node, &ask, loss.as_ref(), &mut report).await {
        return reply;
    }
    let op = format!("promote by {}", ask.operator);
    let mut result = run_steps(node, &ask, &op, role, &mut report).await;
    result.loss = loss;
    if ask.force && result.outcome == v1::ChangeOutcome::Done as i32 {
        result.risk = "--force: the guards (health, lag) were not checked; what the old \
                       primary committed after the standby's last received record is lost"
            .into();
    }
    let summary = format!(
        "promote at epoch {} {} in {} ms",
        result.epoch,
        outcome_word(result.outcome),
        report.elapsed_ms()
    );
    node.set_view(|v| v.last_change = summary);
    result
}

fn outcome_word(outcome: i32) -> &'static str {
    match v1::ChangeOutcome::try_from(outcome) {
        Ok(v1::ChangeOutcome::Done) => "done",
        Ok(v1::ChangeOutcome::AlreadyDone) => "already done",
        Ok(v1::ChangeOutcome::Refused) => "refused",
        Ok(v1::ChangeOutcome::DryRun) => "dry run",
        _ => "failed",
    }
}

/// A loss estimate in words.
pub(crate) fn describe_loss(loss: Option<&v1::LossEstimate>) -> Option<String> {
    let loss = loss?;
    Some(if loss.primary_reported {
        format!(
            "promoting now loses {} global transactions ({} records, {} bytes): the primary \
             reported {} committed up to lsn {} ({} ms ago); this standby holds {} up to lsn {}",
            loss.txns,
            loss.records,
            loss.bytes,
            loss.primary_committed_txns,
            loss.primary_durable_lsn,
            loss.report_age_ms,
            loss.standby_committed_txns,
            loss.standby_received_lsn
        )
    } else {
        format!(
            "the primary's position is unknown (no report from it since this standby started); \
             this standby holds records up to lsn {}",
            loss.standby_received_lsn
        )
    })
}

/// The checks before anything changes.
async fn guards(
    node: &Arc<Node>,
    ask: &Ask,
    loss: Option<&v1::LossEstimate>,
    report: &mut Report,
) -> Result<(), v1::RoleChangeReply> {
    if matches!(ask.why, Why::Resume | Why::First) {
        return Ok(());
    }
    let verdict = node.senses.verdict();
    if !verdict.healthy && !ask.force {
        return Err(report.refuse(
            "guards",
            format!(
                "this node is not healthy ({}): a standby whose own disk, resources or network \
                 fail must not take over",
                verdict.failures.join("; ")
            ),
            "fix what its health probes report (concord status), or promote with --force",
        ));
    }
    if let Some(loss) = loss
        && loss.primary_reported
        && loss.records > node.fo.lag_guard_records
        && ask.handover_epoch == 0
        && !ask.force
    {
        return Err(report.refuse(
            "guards",
            format!(
                "this standby is {} records behind the primary's last report (lag_guard_records \
                 = {}): {}",
                loss.records,
                node.fo.lag_guard_records,
                describe_loss(Some(loss)).unwrap_or_default()
            ),
            "let it catch up, or promote with --force and lose what it lacks",
        ));
    }
    // Its own promise binds even with --force: the primary may rely on it. No new promise
    // from here (a promoting node confirms nothing), then the last one runs out.
    node.set_view(|v| v.role = "promoting");
    // A promise made before this process started is forgotten: it is taken as running until
    // `confirm_ms` after the start.
    let since_start = node.started + Duration::from_millis(node.fo.confirm_ms);
    let promised = node
        .promised_until
        .lock()
        .ok()
        .and_then(|p| *p)
        .map_or(since_start, |p| p.max(since_start));
    if promised > Instant::now() && ask.handover_epoch == 0 {
        let wait = promised - Instant::now();
        tokio::time::sleep(wait).await;
        report.step(
            "guards",
            "done",
            format!(
                "waited {} ms for this standby's confirmation of the primary to run out",
                wait.as_millis()
            ),
        );
    } else {
        report.step("guards", "done", "healthy, lag within the guard");
    }
    Ok(())
}

/// The epoch of the journal's last record (0: empty).
fn last_epoch(journal: &Journal) -> u64 {
    let durable = journal.durable_lsn();
    if durable.0 == 0 || durable < journal.oldest_lsn() {
        return 0;
    }
    journal
        .read_from(durable)
        .ok()
        .and_then(|mut r| r.next())
        .and_then(Result::ok)
        .map_or(0, |r| r.epoch.0)
}

/// The ledger of a journal's retained records.
fn ledger_of(journal: &Journal) -> Result<Ledger, String> {
    let mut ledger = Ledger::new();
    let from = journal.oldest_lsn();
    if journal.durable_lsn() < from {
        return Ok(ledger);
    }
    let reader = journal.read_from(from).map_err(|e| e.to_string())?;
    for record in reader {
        let record = record.map_err(|e| e.to_string())?;
        ledger
            .apply_raw(record.lsn, record.kind, &record.payload)
            .map_err(|e| e.to_string())?;
    }
    Ok(ledger)
}

async fn run_steps(
    node: &Arc<Node>,
    ask: &Ask,
    op: &str,
    role: &mut Role,
    report: &mut Report,
) -> v1::RoleChangeReply {
    node.set_view(|v| v.role = "promoting");
    if matches!(role, Role::Vacant) {
        match serve_directly(node, ask, op, role, report).await {
            Ok(Some(reply)) => return reply,
            Ok(None) => {}
            Err(reply) => return reply,
        }
    }
    // stop_work: the journal becomes this node's own.
    let following = match std::mem::replace(role, Role::Vacant) {
        Role::Standby(mut following) => {
            following.stop_receiving().await;
            report.step(
                "stop_work",
                "done",
                "stopped receiving from the old primary",
            );
            following
        }
        Role::Vacant => match Following::start(&node.cfg, node.resources.clone(), None, true).await
        {
            Ok(following) => {
                report.step(
                    "stop_work",
                    "already done",
                    "not receiving (the node is starting)",
                );
                following
            }
            Err(e) => {
                return report.fail(
                    "stop_work",
                    format!("open the journal: {e:#}"),
                    "fix the cause and start the node again",
                );
            }
        },
        Role::Primary(_) => unreachable_primary(),
    };
    let journal = Arc::clone(&following.journal);
    let history = match RoleHistory::read(&journal) {
        Ok(h) => h,
        Err(e) => {
            return report.fail(
                "epoch",
                format!("read the journal: {e}"),
                "fix the journal (concord journal verify) and start again",
            );
        }
    };
    let journal_epoch = last_epoch(&journal);

    // epoch
    let (epoch, authority, fenced) =
        match win_epoch(node, ask, journal_epoch, &history, report).await {
            Ok(won) => won,
            Err(reply) => {
                restore_standby(node, following, role, &reply).await;
                return reply;
            }
        };
    // The lease is renewed from now on: the steps below may take longer than it lasts.
    let _renewing = Renewing::start(node, &authority);
    if !history.done("promote", epoch, "epoch")
        && let Err(e) =
            append_role(&journal, epoch, op, "epoch", &format!("won epoch {epoch}")).await
    {
        return report.fail(
            "epoch",
            format!("journal the step: {e}"),
            "the journal failed: restart the node (it resumes the promotion)",
        );
    }

    // fence
    if history.done("promote", epoch, "fence") {
        report.step("fence", "already done", "journaled by an earlier run");
    } else {
        let means = match fenced {
            Fenced::Handover => {
                "the old primary handed over: it stopped and gave up its lease".to_string()
            }
            Fenced::Agent(detail) => detail,
            Fenced::LeaseExpired => format!(
                "the old primary's lease had run out in the quorum store (it stops committing {} ms before that)",
                node.fo.lease_margin_ms
            ),
            Fenced::WaitLease(wait) => {
                tokio::time::sleep(wait).await;
                format!(
                    "waited out the old primary's lease ({} ms)",
                    wait.as_millis()
                )
            }
            Fenced::Nobody => "no earlier primary".to_string(),
        };
        let mut fenced_resources = Vec::new();
        for resource in &node.resources {
            let deadline = Duration::from_millis(node.cfg.call_timeout_ms.max(1_000));
            match tokio::time::timeout(deadline, resource.fence(Epoch(epoch))).await {
                Ok(Ok(())) => fenced_resources.push(resource.name().to_string()),
                Ok(Err(e)) => {
                    return report.fail(
                        "fence",
                        format!(
                            "resource {} refused the fence at epoch {epoch}: {e}",
                            resource.name()
                        ),
                        "fix the resource and run `concord promote` again (it resumes)",
                    );
                }
                Err(_) => {
                    return report.fail(
                        "fence",
                        format!(
                            "resource {} did not answer the fence within {} ms",
                            resource.name(),
                            deadline.as_millis()
                        ),
                        "fix the resource and run `concord promote` again (it resumes)",
                    );
                }
            }
        }
        let detail = format!(
            "{means}; resources fenced at epoch {epoch}: {}",
            fenced_resources.join(", ")
        );
        if let Err(e) = append_role(&journal, epoch, op, "fence", &detail).await {
            return report.fail(
                "fence",
                format!("journal the step: {e}"),
                "restart the node (it resumes the promotion)",
            );
        }
        report.step("fence", "done", detail);
    }

    // in_doubt, first half: one-phase records without an outcome are rolled back.
    let ledger = match ledger_of(&journal) {
        Ok(l) => l,
        Err(e) => {
            return report.fail(
                "in_doubt",
                format!("read the journal: {e}"),
                "restart the node (it resumes the promotion)",
            );
        }
    };
    let mut aborted = Vec::new();
    for (xid, _lsn, resource, _redo) in ledger.open_one_phase() {
        let record = CoordRecord::Abort {
            xid,
            reason: format!(
                "promoted at epoch {epoch}: this one-phase commit's outcome at the old primary is unknown and it never reached this site"
            ),
        };
        let appended = match journal.append(Epoch(epoch), ABORT, &record.encode()) {
            Ok(appending) => appending.await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = appended {
            return report.fail(
                "in_doubt",
                format!("journal an abort: {e}"),
                "restart the node (it resumes the promotion)",
            );
        }
        aborted.push(format!("{xid} ({resource})"));
    }

    // replay
    if let Err(why) = following
        .wait_replayed(Duration::from_millis(REPLAY_MS_MAX))
        .await
    {
        return report.fail(
            "replay",
            why,
            "fix what stops replay (concord status), then run `concord promote` again",
        );
    }
    let replayed = journal.durable_lsn();
    report.step(
        "replay",
        "done",
        format!("applied everything received, up to lsn {replayed}"),
    );
    node.replication_slot.set(None);
    drop(journal);
    let journal = following.stop().await;
    // Closing lets the directory go (a reader still holding the handle reads nothing more).
    let closed = tokio::task::spawn_blocking(move || journal.close())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = closed {
        return report.fail(
            "replay",
            format!("close the standby's journal: {e}"),
            "restart the node (it resumes the promotion)",
        );
    }

    // in_doubt, second half: reopen as the coordinator's journal; what replay applied ends.
    let dir = node.cfg.data_dir.join("journal");
    let opened = tokio::task::spawn_blocking(move || {
        coordinator::runtime::open_journal(&dir, coordinator::runtime::journal_config())
    })
    .await;
    let (journal, mut ledger) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            return report.fail(
                "in_doubt",
                format!("open the journal: {e}"),
                "restart the node (it resumes the promotion)",
            );
        }
        Err(e) => {
            return report.fail(
                "in_doubt",
                format!("open the journal: {e}"),
                "restart the node (it resumes the promotion)",
            );
        }
    };
    let open_commits: Vec<_> = ledger.open_commits().map(|(xid, _, _)| xid).collect();
    for xid in &open_commits {
        let record = CoordRecord::End { xid: *xid };
        let appended = match journal.append(Epoch(epoch), END, &record.encode()) {
            Ok(appending) => appending.await,
            Err(e) => Err(e),
        };
        match appended {
            Ok(lsn) => {
                ledger.apply(lsn, record);
            }
            Err(e) => {
                return report.fail(
                    "in_doubt",
                    format!("journal an end: {e}"),
                    "restart the node (it resumes the promotion)",
                );
            }
        }
    }
    let detail = format!(
        "{} transactions the old primary committed were applied by replay and are finished; {} one-phase commits without an outcome were rolled back{}",
        open_commits.len(),
        aborted.len(),
        if aborted.is_empty() {
            String::new()
        } else {
            format!(": {}", aborted.join(", "))
        }
    );
    if let Err(e) = append_role(&journal, epoch, op, "in_doubt", &detail).await {
        return report.fail(
            "in_doubt",
            format!("journal the step: {e}"),
            "restart the node (it resumes the promotion)",
        );
    }
    report.step("in_doubt", "done", detail);

    // serve
    let serving = match node.start_serving(epoch, journal, ledger, authority).await {
        Ok(serving) => serving,
        Err(e) => {
            return report.fail(
                "serve",
                format!("{e:#}"),
                "fix the cause and run `concord promote` again (it resumes)",
            );
        }
    };
    serve(node, role, serving, epoch, op, true, report).await;
    if let Ok(mut last) = node.last_auto.lock() {
        *last = Some(Instant::now());
    }
    v1::RoleChangeReply {
        epoch,
        primary: node.fo.address.clone(),
        ..report.reply(v1::ChangeOutcome::Done)
    }
}

#[allow(clippy::panic)]
fn unreachable_primary() -> ! {
    // `promote` answers "already done" on a primary before it gets here.
    panic!("run_steps on a primary")
}

/// After a refusal at the epoch step: follow whoever holds the epoch (or the old primary).
async fn restore_standby(
    node: &Arc<Node>,
    following: Following,
    role: &mut Role,
    reply: &v1::RoleChangeReply,
) {
    let journal = following.stop().await;
    node.replication_slot.set(None);
    let closed = matches!(
        tokio::task::spawn_blocking(move || journal.close()).await,
        Ok(Ok(()))
    );
    if !closed {
        tracing::warn!("the standby's journal did not close cleanly");
    }
    let (url, epoch) = match node.store.state().await {
        Ok(state) => match state.holder {
            Some(h) if h.node != node.me.node => (h.address, state.epoch),
            _ => (node.fo.peer.clone(), state.epoch),
        },
        Err(_) => (node.fo.peer.clone(), node.view().epoch),
    };
    match node.start_following(&url, epoch).await {
        Ok(following) => *role = Role::Standby(following),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), reason = %reply.reason, "could not follow {url} again after a refused promotion");
            node.set_view(|v| v.stuck = Some(format!("could not follow {url}: {e:#}")));
        }
    }
}

/// Claims the next epoch (or finds it already won), and says how the old primary is fenced.
async fn win_epoch(
    node: &Arc<Node>,
    ask: &Ask,
    journal_epoch: u64,
    history: &RoleHistory,
    report: &mut Report,
) -> Result<(u64, Arc<Authority>, Fenced), v1::RoleChangeReply> {
    let fo = &node.fo;
    let timeout = Duration::from_millis(fo.quorum_call_timeout_ms);
    let unreachable = |e: &dyn std::fmt::Display| {
        (
            format!(
                "cannot reach the quorum store {}: {e}; a node that cannot reach it never promotes (it could not know whether another node did)",
                node.store.describe()
            ),
            "check the quorum store and this node's path to it, then run `concord promote` again"
                .to_string(),
        )
    };
    let state = match tokio::time::timeout(timeout, node.store.state()).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => {
            let (why, todo) = unreachable(&e);
            return Err(report.refuse("epoch", why, todo));
        }
        Err(_) => {
            let (why, todo) = unreachable(&format!(
                "no answer within {} ms",
                fo.quorum_call_timeout_ms
            ));
            return Err(report.refuse("epoch", why, todo));
        }
    };
    let mine = state
        .holder
        .as_ref()
        .is_some_and(|h| h.node == node.me.node);
    // A promotion of this node to the stored epoch began and did not finish: resume it. (A
    // node that served that epoch and handed over claims a new one like any other.)
    let interrupted = history.done("promote", state.epoch, "epoch")
        && !history.done("promote", state.epoch, "serve");
    if mine && (state.epoch > journal_epoch || interrupted || ask.why == Why::Resume) {
        // Won by an earlier run (or this node served this epoch before a restart).
        let sent = Instant::now();
        let grant = match tokio::time::timeout(
            timeout,
            node.store.renew(&node.me, state.epoch, fo.lease_ttl_ms),
        )
        .await
        {
            Ok(Ok(grant)) => grant,
            Ok(Err(e)) => {
                let (why, todo) = unreachable(&e);
                return Err(report.refuse("epoch", why, todo));
            }
            Err(_) => {
                let (why, todo) = unreachable(&"no answer");
                return Err(report.refuse("epoch", why, todo));
            }
        };
        let authority = Arc::new(Authority::new(state.epoch, fo.lease_margin_ms));
        authority.lease_granted(sent, grant.ttl_ms);
        report.step(
            "epoch",
            "already done",
            format!("this node holds epoch {} in the quorum store", state.epoch),
        );
        // Whether the old primary was fenced is in the journal; if not, wait a whole lease.
        let fenced =
            if state.epoch == journal_epoch && history.last().is_none_or(|s| s.step == "serve") {
                Fenced::Nobody
            } else {
                Fenced::WaitLease(Duration::from_millis(fo.lease_ttl_ms + fo.lease_margin_ms))
            };
        return Ok((state.epoch, authority, fenced));
    }
    if ask.why == Why::Resume {
        return Err(report.refuse(
            "epoch",
            format!(
                "the quorum store gives epoch {} to {}",
                state.epoch,
                holder_name(state.holder.as_ref())
            ),
            "this node follows it",
        ));
    }
    if ask.handover_epoch != 0 && state.epoch != ask.handover_epoch {
        return Err(report.refuse(
            "epoch",
            format!(
                "the handover was for epoch {}, but the quorum store is at epoch {} ({})",
                ask.handover_epoch,
                state.epoch,
                holder_name(state.holder.as_ref())
            ),
            "run `concord status` on both nodes, then switch over again",
        ));
    }
    let expected = state.epoch;
    let new_epoch = if ask.why == Why::First {
        expected
            .max(journal_epoch)
            .max(node.cfg.epoch)
            .max(1)
            .max(expected + 1)
    } else {
        expected.max(journal_epoch) + 1
    };
    let deadline =
        Instant::now() + Duration::from_millis(2 * fo.lease_ttl_ms + fo.lease_margin_ms + 1_000);
    let mut override_lease = false;
    let mut fenced_by_agent: Option<String> = None;
    let mut last_remaining: Option<u64> = None;
    loop {
        let sent = Instant::now();
        let claimed = tokio::time::timeout(
            timeout,
            node.store.claim(
                &node.me,
                expected,
                new_epoch,
                fo.lease_ttl_ms,
                override_lease,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(QuorumError::Unreachable {
                store: node.store.describe(),
                detail: format!("no answer within {} ms", fo.quorum_call_timeout_ms),
            })
        });
        match claimed {
            Ok(grant) => {
                let authority = Arc::new(Authority::new(new_epoch, fo.lease_margin_ms));
                authority.lease_granted(sent, grant.ttl_ms);
                report.step(
                    "epoch",
                    "done",
                    format!(
                        "won epoch {new_epoch} (was {expected}) in {}",
                        node.store.describe()
                    ),
                );
                let fenced = if ask.why == Why::First {
                    Fenced::Nobody
                } else if ask.handover_epoch != 0 {
                    Fenced::Handover
                } else if let Some(detail) = fenced_by_agent {
                    Fenced::Agent(detail)
                } else if override_lease {
                    Fenced::WaitLease(Duration::from_millis(
                        last_remaining.unwrap_or(fo.lease_ttl_ms) + fo.lease_margin_ms,
                    ))
                } else {
                    Fenced::LeaseExpired
                };
                return Ok((new_epoch, authority, fenced));
            }
            Err(QuorumError::LeaseHeld {
                holder,
                remaining_ms,
                ..
            }) => {
                let renewed = last_remaining.is_some_and(|last| remaining_ms > last);
                last_remaining = Some(remaining_ms);
                if let (Some(agent), Some(plug)) = (&fo.fence_agent, &fo.fence_plug)
                    && fenced_by_agent.is_none()
                    && ask.handover_epoch == 0
                {
                    match fence_with_agent(node, agent, plug).await {
                        Ok(detail) => {
                            fenced_by_agent = Some(detail);
                            override_lease = true;
                            continue;
                        }
                        Err(e) if ask.force => {
                            report.step(
                                "fence",
                                "failed",
                                format!("{e}; --force: waiting out the lease instead"),
                            );
                            override_lease = true;
                            continue;
                        }
                        Err(e) => {
                            return Err(report.refuse(
                                "fence",
                                format!("could not fence {} ({e}) and its lease runs {remaining_ms} ms more", holder.node),
                                "check the fence agent; or wait until the lease runs out and run `concord promote` again; or --force (waits out the lease)",
                            ));
                        }
                    }
                }
                if renewed
                    || (ask.why == Why::Operator
                        && !ask.force
                        && ask.handover_epoch == 0
                        && remaining_ms > fo.lease_ttl_ms / 2)
                {
                    if ask.force {
                        override_lease = true;
                        continue;
                    }
                    return Err(report.refuse(
                        "epoch",
                        format!("{} ({}) holds a live lease at epoch {expected} and renews it ({remaining_ms} ms left): it is alive", holder.node, holder.address),
                        "for a planned handover run `concord switchover` against it (or `concord demote` on it first); --force takes the epoch anyway and waits its lease out",
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(report.refuse(
                        "epoch",
                        format!("{} still holds the lease at epoch {expected}", holder.node),
                        "run `concord promote` again",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(remaining_ms.min(fo.lease_ttl_ms) + 5))
                    .await;
            }
            Err(QuorumError::EpochMoved { epoch, holder }) => {
                return Err(report.refuse(
                    "epoch",
                    format!(
                        "another promotion won: the quorum store gives epoch {epoch} to {}",
                        holder_name(holder.as_ref())
                    ),
                    "nothing to do: this node follows the winner",
                ));
            }
            Err(
                e @ (QuorumError::Unreachable { .. }
                | QuorumError::Protocol { .. }
                | QuorumError::NotHolder { .. }),
            ) => {
                let (why, todo) = unreachable(&e);
                return Err(report.refuse("epoch", why, todo));
            }
        }
    }
}

/// At start: the first epoch of a cluster, or a restart of the primary that served the
/// epoch it holds — the journal opens as the coordinator's and the node serves, without a
/// standby's replay. `Ok(None)`: a promotion was interrupted; it resumes as a standby's.
async fn serve_directly(
    node: &Arc<Node>,
    ask: &Ask,
    op: &str,
    role: &mut Role,
    report: &mut Report,
) -> Result<Option<v1::RoleChangeReply>, v1::RoleChangeReply> {
    let dir = node.cfg.data_dir.join("journal");
    let opened = tokio::task::spawn_blocking(move || {
        coordinator::runtime::open_journal(&dir, coordinator::runtime::journal_config())
    })
    .await;
    let (journal, ledger) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            return Err(report.fail(
                "serve",
                format!("open the journal: {e}"),
                "fix the journal (concord journal verify) and start again",
            ));
        }
        Err(e) => {
            return Err(report.fail("serve", format!("open the journal: {e}"), "start again"));
        }
    };
    let history = RoleHistory::read(&journal).unwrap_or_default();
    let journal_epoch = last_epoch(&journal);
    if ask.why != Why::First {
        let state = node.store.state().await.ok();
        // Served this epoch before, unless a promotion to it began and never served.
        let served_here = state.as_ref().is_some_and(|s| {
            s.epoch == journal_epoch
                && (!history.done("promote", s.epoch, "epoch")
                    || history.done("promote", s.epoch, "serve"))
        });
        if !served_here {
            let _ = tokio::task::spawn_blocking(move || journal.close()).await;
            return Ok(None);
        }
    }
    let (epoch, authority, _) = win_epoch(node, ask, journal_epoch, &history, report).await?;
    if ask.why == Why::First
        && let Err(e) = append_role(
            &journal,
            epoch,
            op,
            "epoch",
            &format!("the first epoch of the cluster: {epoch}"),
        )
        .await
    {
        return Err(report.fail(
            "epoch",
            format!("journal the step: {e}"),
            "restart the node",
        ));
    }
    let serving = match node.start_serving(epoch, journal, ledger, authority).await {
        Ok(serving) => serving,
        Err(e) => {
            return Err(report.fail(
                "serve",
                format!("{e:#}"),
                "fix the cause and start the node again",
            ));
        }
    };
    serve(
        node,
        role,
        serving,
        epoch,
        op,
        ask.why == Why::First,
        report,
    )
    .await;
    Ok(Some(v1::RoleChangeReply {
        epoch,
        primary: node.fo.address.clone(),
        ..report.reply(v1::ChangeOutcome::Done)
    }))
}

/// The last step: the node serves as the primary (the step journaled when `journal`).
async fn serve(
    node: &Node,
    role: &mut Role,
    serving: super::primary::Serving,
    epoch: u64,
    op: &str,
    journal: bool,
    report: &mut Report,
) {
    if journal
        && let Err(e) = append_role(
            serving.journal(),
            epoch,
            op,
            "serve",
            "serving as the primary",
        )
        .await
    {
        tracing::warn!(error = %e, "could not journal the serve step");
    }
    *role = Role::Primary(serving);
    report.step(
        "serve",
        "done",
        format!(
            "serving as the primary at epoch {epoch} on {}",
            node.fo.address
        ),
    );
}

/// Renews the lease of a promotion until the coordinator's own keeper takes over (dropped).
struct Renewing(tokio::sync::watch::Sender<bool>);

impl Renewing {
    fn start(node: &Node, authority: &Arc<Authority>) -> Renewing {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let keeper = replicator::failover::LeaseKeeper {
            store: Arc::clone(&node.store),
            me: node.me.clone(),
            authority: Arc::clone(authority),
            ttl_ms: node.fo.lease_ttl_ms,
            call_timeout_ms: node.fo.quorum_call_timeout_ms,
        };
        tokio::spawn(keeper.run(stopped));
        Renewing(stop)
    }
}

impl Drop for Renewing {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

fn holder_name(holder: Option<&Holder>) -> String {
    holder.map_or_else(
        || "no node".into(),
        |h| format!("{} ({})", h.node, h.address),
    )
}

/// Switches the old primary off with the fence agent.
async fn fence_with_agent(
    node: &Node,
    program: &std::path::Path,
    plug: &str,
) -> Result<String, String> {
    let agent = replicator::fence::FenceAgent {
        program: program.to_path_buf(),
        args: node.fo.fence_args.clone(),
        timeout_ms: node.fo.fence_timeout_ms,
    };
    agent
        .off(plug)
        .await
        .map(|()| format!("the fence agent {} switched {plug} off", program.display()))
        .map_err(|e| e.to_string())
}
