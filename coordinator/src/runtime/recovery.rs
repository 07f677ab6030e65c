//! Recovery at open: what the journal says is unfinished, carried through to its end.
//!
//! Recovery reads the journal's [`Ledger`]: every `Commit` without `End` is driven through
//! phase 2 again; every `OnePhase` record with neither `End` nor `Abort` has its resource asked
//! what became of it; every branch a resource reports prepared whose xid has no `Commit` is
//! rolled back (presumed abort), and one whose transaction the journal says committed is
//! committed again (a heuristic hazard when it had ended). Each runs in a machine and a task of
//! its own, so a branch that cannot be resolved is retried and reported without holding up the
//! others or the start. What it found is the [`RecoveryReport`].
//!
//! A journal that names a resource the configuration lacks is reported at once, by name and
//! with its xids ([`RecoveryReport::unconfigured`],
//! [`RecoveryReport::unconfigured_message`]): nothing can finish those branches in this
//! process, so a waiter does not wait for them (`wait_settled`), and the configured branches of
//! the same transactions are finished.
//!
//! Opening the journal and reading its ledger in one pass ([`open_journal`]), or reading it
//! later ([`read_ledger`]), also live here.
//!
//! # Implementation caveats
//!
//! * Recovery reads the whole retained journal; a resource whose `recover` fails at open keeps
//!   the journal pinned from its oldest record until the orphan sweeper has asked it again.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::{Epoch, Lsn, Resource, ResourceError, Xid};
use journal::{Journal, JournalError};

use super::driver::log_unwritten;
use super::{CoordError, Coordinator, lock, within_deadline};
use crate::engine::{Command, TxnMachine};
use crate::ledger::{Ledger, Verdict};
use crate::record;

/// What recovery found at open.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Transactions with a durable decision and no `End`, driven through phase 2 again.
    pub redriven: Vec<Xid>,
    /// Prepared branches without a decision, rolled back: `(resource, xid)`.
    pub rolled_back: Vec<(String, Xid)>,
    /// One-phase commits journaled with neither `End` nor `Abort`: their resource is asked what
    /// became of them, and the answer journaled.
    pub asked: Vec<Xid>,
    /// Prepared branches of transactions the journal says committed, committed (again):
    /// `(resource, xid)`. Those whose transaction had already ended are also in `hazards`.
    pub recommitted: Vec<(String, Xid)>,
    /// Heuristic hazards (logged at error): a branch found prepared although its transaction
    /// had ended committed, so its commit was lost once (a resource restored from a backup).
    pub hazards: Vec<String>,
    /// Problems that need a person: a resource named by a decision that is not configured, a
    /// resource whose `recover` failed.
    pub problems: Vec<String>,
    /// Resources the journal names that the configuration lacks, each with the transactions
    /// whose branches there wait for it (a `Commit` without `End`, a `OnePhase` without its
    /// outcome). Nothing can finish those branches until the resource is configured; see
    /// [`RecoveryReport::unconfigured_message`].
    pub unconfigured: BTreeMap<String, Vec<Xid>>,
}

impl RecoveryReport {
    /// One line for an operator when the journal names resources the configuration lacks
    /// (`None` when it names none): which resources, which transactions, and what to do.
    pub fn unconfigured_message(&self) -> Option<String> {
        if self.unconfigured.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .unconfigured
            .iter()
            .map(|(name, xids)| {
                let xids: Vec<String> = xids.iter().map(Xid::to_string).collect();
                format!("{name} (transaction {})", xids.join(", "))
            })
            .collect();
        Some(format!(
            "the journal holds committed transactions with branches in resources that are not configured: {}; add those resources to the configuration and start again (or, for a resource lost for good, end its branches with `concord txn resolve XID --commit --forget NAME --reason WHY`)",
            each.join("; ")
        ))
    }

    pub(super) fn unconfigured(&mut self, name: &str, xid: Xid) {
        self.unconfigured
            .entry(name.to_string())
            .or_default()
            .push(xid);
    }
}

impl Coordinator {
    pub(super) async fn recover(&self, ledger: &Ledger) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let prepared = self.prepared_everywhere(&mut report).await;
        let mut driven: HashSet<(String, Xid)> = HashSet::new();
        for (xid, lsn, names) in ledger.open_commits() {
            self.recover_commit(xid, lsn, &names, &mut report);
            driven.extend(names.into_iter().map(|n| (n, xid)));
        }
        for (xid, lsn, name, redo) in ledger.open_one_phase() {
            self.recover_one_phase(xid, lsn, name, redo, &mut report);
        }
        for (name, xids) in prepared {
            for xid in xids {
                if !driven.contains(&(name.clone(), xid)) {
                    self.recover_prepared(ledger, &name, xid, &mut report);
                }
            }
        }
        if !report.redriven.is_empty() || !report.rolled_back.is_empty() || !report.asked.is_empty()
        {
            tracing::info!(
                redriven = report.redriven.len(),
                rolled_back = report.rolled_back.len(),
                asked = report.asked.len(),
                "recovery started phase 2 of decided transactions, rollback of undecided branches and the questions about one-phase commits"
            );
        }
        for problem in &report.problems {
            tracing::error!("{problem}");
        }
        report
    }

    /// Every configured resource's prepared branches; a resource whose `recover` fails is a
    /// problem of the report (its branches are found by the sweeper or the next start).
    pub(super) async fn prepared_everywhere(
        &self,
        report: &mut RecoveryReport,
    ) -> BTreeMap<String, Vec<Xid>> {
        let mut prepared = BTreeMap::new();
        for (name, c) in &self.inner.resources {
            match self.recover_within_deadline(name, &c.resource).await {
                Ok(xids) => {
                    prepared.insert(name.clone(), xids);
                }
                Err(e) => {
                    lock(&self.inner.unanswered).insert(name.clone());
                    report.problems.push(format!(
                        "resource {name}: recover failed: {e}; the journal is kept from LSN {} on until it answers (the orphan sweeper asks again)",
                        self.inner.journal.oldest_lsn()
                    ));
                }
            }
        }
        if !lock(&self.inner.unanswered).is_empty() {
            let oldest = self.inner.journal.oldest_lsn();
            let nobody = Xid {
                node: 0,
                epoch: Epoch(0),
                seq: 0,
            };
            let pin = self.inner.retention.pins.pin(nobody, oldest);
            *lock(&self.inner.startup_pin) = Some(pin);
        }
        prepared
    }

    /// A resource's prepared branches, asked within `call_timeout_ms`.
    pub(super) async fn recover_within_deadline(
        &self,
        name: &str,
        resource: &Arc<dyn Resource>,
    ) -> Result<Vec<Xid>, ResourceError> {
        let deadline = Duration::from_millis(self.inner.config.call_timeout_ms);
        within_deadline((deadline, name.to_string(), "recover"), resource.recover()).await
    }

    /// A `Commit` without `End`: phase 2 again for the writers no operator forgot; with none
    /// left, the `End` the operator's last `Forget` allowed.
    pub(super) fn recover_commit(
        &self,
        xid: Xid,
        lsn: Lsn,
        names: &[String],
        report: &mut RecoveryReport,
    ) {
        if names.is_empty() {
            self.append_end_nowait(&xid);
            return;
        }
        for missing in names
            .iter()
            .filter(|n| !self.inner.resources.contains_key(*n))
        {
            report.problems.push(format!(
                "transaction {xid} committed with a branch in resource {missing:?}, which is not configured; configure it, or end the branch with `concord txn resolve {xid} --commit --forget {missing} --reason WHY` if it is lost for good"
            ));
            report.unconfigured(missing, xid);
        }
        let (machine, commands) =
            TxnMachine::recovered_commit(xid, lsn, names.len(), self.inner.config.retry);
        self.drive_recovered(machine, names, commands, Some(lsn));
        report.redriven.push(xid);
    }

    /// A `OnePhase` record with neither `End` nor `Abort`: its resource is asked.
    pub(super) fn recover_one_phase(
        &self,
        xid: Xid,
        lsn: Lsn,
        name: &str,
        redo: &[u8],
        report: &mut RecoveryReport,
    ) {
        if !self.inner.resources.contains_key(name) {
            report.problems.push(format!(
                "transaction {xid} committed in one phase in resource {name:?}, which is not configured; configure it so that concord can learn the outcome"
            ));
            report.unconfigured(name, xid);
            // Nothing drives it in this process: its record stays until a start that can.
            self.inner.retention.pins.pin(xid, lsn);
            return;
        }
        let (machine, commands) =
            TxnMachine::recovered_one_phase(xid, lsn, redo.to_vec(), self.inner.config.retry);
        self.drive_recovered(machine, &[name.to_string()], commands, Some(lsn));
        report.asked.push(xid);
    }

    /// A prepared branch no open decision drives. It is rolled back only when its xid has no
    /// durable commit and no operator's commit (presumed abort). A branch of a transaction the
    /// journal says committed — ended, or decided without this resource among its writers — is
    /// committed again and reported as a heuristic hazard: something (a database restored from
    /// a backup, failed over to an asynchronous replica) brought back a branch whose commit was
    /// already carried out once.
    pub(super) fn recover_prepared(
        &self,
        ledger: &Ledger,
        name: &str,
        xid: Xid,
        report: &mut RecoveryReport,
    ) {
        let verdict = ledger.verdict(&xid);
        if verdict == Verdict::OnePhaseOpen {
            return;
        }
        let names = [name.to_string()];
        if ledger.must_commit(&xid) {
            if verdict.is_commit() {
                let hazard = format!(
                    "heuristic hazard: resource {name} holds a prepared branch of transaction {xid}, which the journal says is {}; committing it again (was the resource restored from a backup or failed over?)",
                    verdict.describe()
                );
                tracing::error!(resource = %name, xid = %xid, "{hazard}");
                report.hazards.push(hazard);
            }
            let entry = ledger.entry(&xid);
            let lsn = entry
                .and_then(|e| e.decision.as_ref())
                .map_or(Lsn::ZERO, |d| d.lsn());
            let pin = entry.map(|e| e.first_lsn);
            let (machine, commands) =
                TxnMachine::recovered_branch_commit(xid, lsn, self.inner.config.retry);
            self.drive_recovered(machine, &names, commands, pin);
            report.recommitted.push((name.to_string(), xid));
            return;
        }
        let (machine, commands) = TxnMachine::recovered_orphan(xid, self.inner.config.retry);
        self.drive_recovered(machine, &names, commands, None);
        report.rolled_back.push((name.to_string(), xid));
    }

    /// Appends an `End` without waiting for it.
    pub(super) fn append_end_nowait(&self, xid: &Xid) {
        let end = record::encode_end(&xid.text());
        let epoch = self.inner.config.epoch;
        if let Err(e) = self.inner.journal.append_nowait(epoch, record::END, &end) {
            log_unwritten(&e, "End");
        }
    }

    /// Drives a machine recovery made; `pin`: the decision record it pins until finished.
    pub(super) fn drive_recovered(
        &self,
        machine: TxnMachine,
        names: &[String],
        commands: Vec<Command>,
        pin: Option<Lsn>,
    ) {
        let xid = machine.xid();
        let branches = names.iter().map(|n| self.inner.branch(n)).collect();
        let mut driver = self.register_machine(machine, branches, Instant::now());
        driver.commands = commands;
        driver.pin = pin.map(|lsn| self.inner.retention.pins.pin(xid, lsn));
        driver.spawn(tracing::info_span!("recover", xid = %xid));
    }
}

/// The coordinator journal's segment size: a checkpoint removes whole segments, so what a start
/// reads after a long history is at most about one segment more than what unfinished
/// transactions pin; 16 MiB keeps that small while holding the largest record
/// (`record_bytes_max`, 8 MiB).
pub const SEGMENT_BYTES_MAX: u64 = 16 << 20;

/// The configuration of a coordinator's journal in `dir` (created when missing).
pub fn journal_config() -> journal::JournalConfig {
    journal::JournalConfig {
        create_if_missing: true,
        segment_bytes_max: SEGMENT_BYTES_MAX,
        metrics_label: Some("coordinator"),
        ..journal::JournalConfig::default()
    }
}

/// Opens the coordinator's journal in `dir` and reads its ledger in the same pass (each record
/// read and checked once). Blocking: run it on the blocking pool.
pub fn open_journal(
    dir: &std::path::Path,
    config: journal::JournalConfig,
) -> Result<(Journal, Ledger), CoordError> {
    let mut ledger = Ledger::new();
    let mut unreadable = None;
    let journal = Journal::open_visiting(dir, config, |record| {
        if unreadable.is_some() {
            return;
        }
        if let Err(e) = ledger.apply_raw(record.lsn, record.kind, &record.payload) {
            unreadable = Some(e);
        }
    })?;
    match unreadable {
        Some(e) => Err(CoordError::Record {
            lsn: e.lsn,
            error: e.error,
        }),
        None => Ok((journal, ledger)),
    }
}

/// Reads the whole retained journal into a [`Ledger`].
///
/// A checkpoint may remove the oldest segment while it is read; the read then starts again
/// from the new oldest record (a few times at most).
pub fn read_ledger(journal: &Journal) -> Result<Ledger, CoordError> {
    const ATTEMPTS_MAX: usize = 4;
    let mut attempt = 1;
    loop {
        match read_ledger_once(journal) {
            Err(CoordError::Journal(JournalError::LsnNotRetained { .. }))
                if attempt < ATTEMPTS_MAX =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

pub(super) fn read_ledger_once(journal: &Journal) -> Result<Ledger, CoordError> {
    let mut ledger = Ledger::new();
    for record in journal.read_from(journal.oldest_lsn())? {
        let record = record?;
        ledger
            .apply_raw(record.lsn, record.kind, &record.payload)
            .map_err(|e| CoordError::Record {
                lsn: e.lsn,
                error: e.error,
            })?;
    }
    Ok(ledger)
}
