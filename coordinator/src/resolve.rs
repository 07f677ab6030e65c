//! An operator's resolution of a transaction that cannot finish by itself.
//!
//! A transaction gets stuck when a resource holding one of its branches is unreachable for
//! long, or lost for good. The operator then decides, and concord records the decision and
//! carries it out as far as the resources allow — and says exactly how far that was:
//!
//! 1. The decision must agree with the journal ([`crate::ledger`]): a transaction with a
//!    durable commit can only be committed, one without can only be rolled back (presumed
//!    abort), a one-phase commit is its resource's to decide, and an xid that neither the
//!    journal nor any consulted resource knows is refused by name (also while a resource
//!    cannot be asked: nothing is recorded for an xid that may never have existed).
//! 2. A `Resolve` record makes the decision durable (once: repeating the same resolution
//!    appends nothing).
//! 3. Each branch involved — the decision's writers, or the resources that list the xid
//!    prepared — is committed or rolled back. A branch whose resource cannot be reached (not
//!    configured, not opened, failing) is reported by name and stays open: the transaction is
//!    not ended for it, so the next start drives it again.
//! 4. A branch the operator forgets (`forget`: its resource is lost for good) is ended without
//!    its resource's answer: a `Forget` record names it with operator and reason, and it is
//!    reported as a heuristic hazard.
//! 5. When every writer of a committed transaction is finished or forgotten, an `End` record
//!    closes it, durably: after that no start drives it again.
//!
//! [`resolve`] does all of this on a journal and the resources it is given; it is shared by
//! [`crate::Coordinator::resolve`] (a running coordinator) and `concord txn resolve` (a stopped
//! one, which opens only the resources the xid involves).
//!
//! # Implementation caveats
//!
//! * Resources are consulted one after another; an unreachable one costs its own timeout.
//! * A rollback needs no `End` (nothing pins a transaction without a decision); its
//!   `Resolve` record is kept for the record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use adapters::{Epoch, ErrorClass, Resource, Xid};
use journal::Journal;

use crate::ledger::{Ledger, Resolution, Verdict};
use crate::record::CoordRecord;
use crate::runtime::{CoordError, now_ms, read_ledger, within_deadline};

/// What an operator asks.
#[derive(Clone, Debug)]
pub struct ResolveRequest {
    /// The transaction.
    pub xid: Xid,
    /// Commit (true) or roll back.
    pub commit: bool,
    /// Who decides (recorded).
    pub operator: String,
    /// Resources whose branch is ended without their answer (lost for good).
    pub forget: Vec<String>,
    /// Why those branches are forgotten (recorded; required with `forget`).
    pub reason: String,
    /// Resources that may hold a branch of the transaction but that the caller could not open
    /// or ask, with why: each is reported unreached (unless forgotten).
    pub unopened: Vec<(String, String)>,
}

/// What became of one branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BranchOutcome {
    /// Committed or rolled back as decided.
    Finished,
    /// Nothing of it was prepared in the resource, and the resource accepted the commit or
    /// rollback as a no-op: the branch was already resolved there — or the resource configured
    /// under that name is not the store that held it. Counts as done.
    NotPrepared,
    /// Finished, but its resource reported a heuristic hazard (for instance neither the
    /// prepared branch nor its commit marker exists): a person should look.
    Hazard(String),
    /// Not reached: the branch stays open, and the transaction with it.
    Unreached(String),
    /// Forgotten by the operator: ended without its resource's answer (a hazard).
    Forgotten,
}

impl BranchOutcome {
    /// Whether the branch no longer holds the transaction open.
    pub fn is_done(&self) -> bool {
        // `NotPrepared` counts: nothing is left there to resolve.
        !matches!(self, BranchOutcome::Unreached(_))
    }
}

/// What [`resolve`] did.
#[derive(Clone, Debug)]
pub struct ResolveReport {
    /// The transaction.
    pub xid: Xid,
    /// The decision carried out.
    pub commit: bool,
    /// Each branch involved, by resource, and what became of it.
    pub branches: Vec<(String, BranchOutcome)>,
    /// Whether the transaction is finished (no branch left to reach).
    pub finished: bool,
    /// The LSN of its decision record, if it has one.
    pub decision_lsn: Option<adapters::Lsn>,
    /// The operator's decision that holds: the one recorded by this call, or the same one
    /// recorded earlier (`None`: nothing was left to resolve, so nothing was recorded).
    pub resolution: Option<Resolution>,
    /// Whether this call appended the `Resolve` record (false when the same resolution was
    /// already in the journal, or nothing was left to resolve).
    pub appended: bool,
}

/// Carries out `request` on `journal` and `resources`; see the module docs.
pub async fn resolve(
    journal: &Journal,
    epoch: Epoch,
    resources: &BTreeMap<String, Arc<dyn Resource>>,
    request: &ResolveRequest,
    call_timeout: Duration,
    before_acting: &(dyn Fn() + Sync),
) -> Result<ResolveReport, CoordError> {
    let xid = request.xid;
    let ledger = read_ledger(journal)?;
    check_forget(request)?;
    // An xid the journal does not know is refused as unknown before anything else, whatever
    // was asked: advice to decide the other way would only be refused in turn.
    let asked = match ledger.entry(&xid) {
        None => {
            let asked = involved(&ledger, resources, request, call_timeout).await;
            check_known(&ledger, &asked, request)?;
            Some(asked)
        }
        Some(_) => None,
    };
    check_decision(&ledger, journal, request)?;
    let involved = match asked {
        Some(asked) => asked,
        None => involved(&ledger, resources, request, call_timeout).await,
    };
    check_known(&ledger, &involved, request)?;
    let decision_lsn = ledger
        .entry(&xid)
        .and_then(|e| e.decision.as_ref())
        .map(|d| d.lsn());
    if involved.is_empty() {
        // Nothing holds a branch of it any more (an ended transaction, all resources asked):
        // nothing to record and nothing to do.
        return Ok(ResolveReport {
            xid,
            commit: request.commit,
            branches: Vec::new(),
            finished: true,
            decision_lsn,
            resolution: None,
            appended: false,
        });
    }
    before_acting();
    let (resolution, appended) = append_resolution(journal, epoch, &ledger, request).await?;
    let mut branches = Vec::new();
    for (name, reach) in involved {
        let outcome = if request.forget.contains(&name) {
            append_forget(journal, epoch, request, &name).await?;
            tracing::error!(xid = %xid, resource = %name, operator = %request.operator, reason = %request.reason, "heuristic hazard: branch forgotten by an operator; its outcome in the resource is unknown");
            BranchOutcome::Forgotten
        } else {
            finish_branch(resources, &name, reach, request, call_timeout).await
        };
        branches.push((name, outcome));
    }
    let finished = branches.iter().all(|(_, o)| o.is_done());
    if finished && request.commit && ledger.verdict(&xid) == Verdict::Committing {
        let end = CoordRecord::End { xid };
        journal.append(epoch, end.kind(), &end.encode())?.await?;
    }
    Ok(ResolveReport {
        xid,
        commit: request.commit,
        branches,
        finished,
        decision_lsn,
        resolution: Some(resolution),
        appended,
    })
}

/// The decision must agree with what the journal holds.
fn check_decision(
    ledger: &Ledger,
    journal: &Journal,
    request: &ResolveRequest,
) -> Result<(), CoordError> {
    let xid = request.xid;
    let trimmed = journal.oldest_lsn() > adapters::Lsn(1) && ledger.entry(&xid).is_none();
    match ledger.verdict(&xid) {
        Verdict::OnePhaseOpen => Err(CoordError::Refused(format!(
            "transaction {xid} commits in one phase: its outcome is its resource's, and concord asks the resource until it answers (see `concord txn list`); there is nothing to decide by hand"
        ))),
        Verdict::Committing | Verdict::Committed if !request.commit => {
            Err(CoordError::Refused(format!(
                "transaction {xid} has a durable commit decision; it cannot be rolled back (some branches may already be committed): resolve it with --commit"
            )))
        }
        Verdict::NoDecision if request.commit && trimmed => Err(CoordError::Refused(format!(
            "transaction {xid} has no record in the retained journal (it starts at LSN {}; older records were checkpointed away): if it is older than that, concord cannot tell whether it committed. Check the other branches' stores; presumed abort says --rollback",
            journal.oldest_lsn()
        ))),
        Verdict::NoDecision | Verdict::Aborted if request.commit => {
            Err(CoordError::Refused(format!(
                "transaction {xid} has no commit decision in the journal, so it never committed (presumed abort): resolve it with --rollback"
            )))
        }
        _ => Ok(()),
    }
}

/// How a branch can be reached.
#[derive(Clone, Debug)]
enum Reach {
    /// Its resource is open here and (for a rollback) lists the branch prepared.
    Open,
    /// Its resource is not open here, or could not tell: why.
    Unreachable(String),
}

/// The branches involved, by resource: for a commit, the decision's writers not forgotten yet;
/// for a rollback, the resources that list the xid prepared (and those that could not tell).
async fn involved(
    ledger: &Ledger,
    resources: &BTreeMap<String, Arc<dyn Resource>>,
    request: &ResolveRequest,
    call_timeout: Duration,
) -> BTreeMap<String, Reach> {
    let xid = request.xid;
    let mut involved = BTreeMap::new();
    if request.commit {
        for (open_xid, _, writers) in ledger.open_commits() {
            if open_xid != xid {
                continue;
            }
            for name in writers {
                let reach = match resources.get(&name) {
                    Some(_) => Reach::Open,
                    None => Reach::Unreachable("the resource is not configured here".into()),
                };
                involved.insert(name, reach);
            }
        }
    }
    for (name, resource) in resources {
        if involved.contains_key(name) {
            continue;
        }
        let within = (call_timeout, name.clone(), "recover");
        match within_deadline(within, resource.recover()).await {
            Ok(prepared) if prepared.contains(&xid) => {
                involved.insert(name.clone(), Reach::Open);
            }
            Ok(_) => {}
            Err(e) => {
                involved.insert(
                    name.clone(),
                    Reach::Unreachable(format!("could not list its prepared branches: {e}")),
                );
            }
        }
    }
    for (name, why) in &request.unopened {
        involved
            .entry(name.clone())
            .or_insert_with(|| Reach::Unreachable(why.clone()));
    }
    for name in &request.forget {
        involved
            .entry(name.clone())
            .or_insert_with(|| Reach::Unreachable("not consulted".into()));
    }
    involved
}

/// An xid that neither the journal nor any consulted resource knows is refused by name — also
/// while some resource could not be asked: recording a decision for an xid that may never have
/// existed helps nothing (a prepared branch that no decision names is rolled back by recovery
/// anyway), and the xid may be a mistyped one.
fn check_known(
    ledger: &Ledger,
    involved: &BTreeMap<String, Reach>,
    request: &ResolveRequest,
) -> Result<(), CoordError> {
    let known =
        ledger.entry(&request.xid).is_some() || involved.values().any(|r| matches!(r, Reach::Open));
    if known {
        return Ok(());
    }
    let unasked: Vec<String> = involved
        .iter()
        .filter(|(n, _)| !request.forget.contains(*n))
        .filter_map(|(n, r)| match r {
            Reach::Unreachable(why) => Some(format!("{n} ({why})")),
            Reach::Open => None,
        })
        .collect();
    if unasked.is_empty() {
        return Err(CoordError::Refused(format!(
            "transaction {} is unknown: the journal has no record of it and no resource consulted holds a branch of it prepared; check the xid (`concord txn list`)",
            request.xid
        )));
    }
    Err(CoordError::Refused(format!(
        "transaction {} is unknown: the journal has no record of it and no resource that answered holds a branch of it prepared; nothing was recorded. Not asked: {}; check the xid (`concord txn list`), and run the command again once those resources are reachable",
        request.xid,
        unasked.join(", ")
    )))
}

/// `forget` needs a reason: it is recorded with the operator.
fn check_forget(request: &ResolveRequest) -> Result<(), CoordError> {
    if !request.forget.is_empty() && request.reason.trim().is_empty() {
        return Err(CoordError::Refused(
            "forgetting a branch needs a reason (--reason): it is recorded with the operator"
                .into(),
        ));
    }
    Ok(())
}

/// Whether `request` agrees with what `journal` holds (the first check [`resolve`] makes), for
/// a caller that must know before it stops anything.
pub fn check(journal: &Journal, request: &ResolveRequest) -> Result<(), CoordError> {
    check_forget(request)?;
    check_decision(&read_ledger(journal)?, journal, request)
}

/// Appends the `Resolve` record, durably, unless the same resolution is there already;
/// returns the resolution that holds and whether it was appended now.
async fn append_resolution(
    journal: &Journal,
    epoch: Epoch,
    ledger: &Ledger,
    request: &ResolveRequest,
) -> Result<(Resolution, bool), CoordError> {
    let same = ledger
        .entry(&request.xid)
        .and_then(|e| e.resolution.as_ref())
        .filter(|r| r.commit == request.commit);
    if let Some(same) = same {
        return Ok((same.clone(), false));
    }
    let at_ms = now_ms();
    let record = CoordRecord::Resolve {
        xid: request.xid,
        commit: request.commit,
        operator: request.operator.clone(),
        at_ms,
    };
    journal
        .append(epoch, record.kind(), &record.encode())?
        .await?;
    tracing::info!(xid = %request.xid, commit = request.commit, operator = %request.operator, "operator resolved transaction");
    let resolution = Resolution {
        commit: request.commit,
        operator: request.operator.clone(),
        at_ms,
    };
    Ok((resolution, true))
}

async fn append_forget(
    journal: &Journal,
    epoch: Epoch,
    request: &ResolveRequest,
    resource: &str,
) -> Result<(), CoordError> {
    let record = CoordRecord::Forget {
        xid: request.xid,
        resource: resource.to_string(),
        operator: request.operator.clone(),
        reason: request.reason.clone(),
        at_ms: now_ms(),
    };
    journal
        .append(epoch, record.kind(), &record.encode())?
        .await?;
    Ok(())
}

/// Commits or rolls back one branch (both idempotent).
async fn finish_branch(
    resources: &BTreeMap<String, Arc<dyn Resource>>,
    name: &str,
    reach: Reach,
    request: &ResolveRequest,
    call_timeout: Duration,
) -> BranchOutcome {
    let xid = request.xid;
    let resource = match (reach, resources.get(name)) {
        (Reach::Open, Some(resource)) => resource,
        (Reach::Unreachable(why), _) => return BranchOutcome::Unreached(why),
        (Reach::Open, None) => return BranchOutcome::Unreached("not configured here".into()),
    };
    let listed = within_deadline(
        (call_timeout, name.to_string(), "recover"),
        resource.recover(),
    )
    .await
    .map(|prepared| prepared.contains(&xid));
    let prepared = match listed {
        Ok(prepared) => prepared,
        Err(e) => return BranchOutcome::Unreached(e.to_string()),
    };
    let result = if request.commit {
        let within = (call_timeout, name.to_string(), "commit");
        within_deadline(within, resource.commit(&xid)).await
    } else {
        let within = (call_timeout, name.to_string(), "rollback");
        within_deadline(within, resource.rollback(&xid)).await
    };
    match result {
        Ok(()) if !prepared => BranchOutcome::NotPrepared,
        Ok(()) => {
            tracing::info!(xid = %xid, resource = %name, commit = request.commit, "resolved branch");
            BranchOutcome::Finished
        }
        Err(e) if e.class() == ErrorClass::Hazard => {
            tracing::error!(xid = %xid, resource = %name, error = %e, "heuristic hazard while resolving");
            BranchOutcome::Hazard(e.to_string())
        }
        Err(e) => BranchOutcome::Unreached(e.to_string()),
    }
}
