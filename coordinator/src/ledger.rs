//! The ledger: what the journal's records mean, folded in one pure place.
//!
//! The journal holds five kinds of coordinator record (see [`crate::record`]); what they mean
//! together is not written in any single one. A `Commit` decides a transaction, its `End` says
//! phase 2 finished; a `OnePhase` record decides nothing until an `End` (committed) or an
//! `Abort` (not) follows; a `Resolve` is an operator's decision; a `Forget` ends one branch
//! whose resource is lost for good. Recovery at open, the orphan sweeper, the operator's
//! `txn list` and `txn resolve`, the demo's check and the standby all need the same answer to
//! "what became of this xid?", so the fold lives here and nowhere else.
//!
//! [`Ledger::apply`] takes records in journal order and keeps, per xid, an [`Entry`]: its
//! decision, how it ended, an operator's resolution, the branches forgotten, and the LSN range
//! of its records. [`Ledger::verdict`] answers the question above as a [`Verdict`]. The ledger
//! performs no I/O: callers read the journal (a live [`journal::Journal`] or a read-only scan of
//! a directory) and feed it.
//!
//! For the standby, [`Ledger::apply`] also returns the transactions that became committed with
//! that record ([`Committed`]) in the order a replay must apply them: a `Commit` at once; a
//! `OnePhase` record only when its `End` arrives (and never after an `Abort`). The LSN reported
//! is the decision's, so replay applies in decision order.
//!
//! **Retention.** An entry pins the journal from its first record while its transaction is
//! unfinished ([`Ledger::pinned_from`]); once finished, [`Ledger::trim_below`] drops the entries
//! whose records all lie below a removed segment boundary, so memory is bounded by what the
//! journal retains.
//!
//! # Implementation caveats
//!
//! * Presumed abort: an xid the ledger has never seen has no decision ([`Verdict::NoDecision`]).
//!   After its records are trimmed, an ended transaction is forgotten too: a prepared branch of
//!   it that a resource brings back later (a database restored from a backup older than the
//!   retained journal) is indistinguishable from an undecided one. The retained range is
//!   therefore what bounds that guarantee (`docs/failure-model.md`).
//! * `Resolve` records are kept as given; the ledger does not check them against the decision
//!   (the operator command refuses contradictions before it appends one).

use std::collections::BTreeMap;

use adapters::{Lsn, Xid};
use journal::RecordKind;

use crate::record::{CoordRecord, RecordError};

/// A record the ledger could not read.
#[derive(Debug, thiserror::Error)]
#[error("journal record at LSN {lsn}: {error}")]
pub struct LedgerError {
    /// The record's LSN.
    pub lsn: Lsn,
    /// Why: a newer or unknown kind (run the concord that wrote it), or a malformed payload
    /// (the journal's checksums passed, so this is a bug in the writer: keep the journal and
    /// report it).
    #[source]
    pub error: RecordError,
}

/// How a transaction was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A two-phase `Commit` record.
    Commit {
        /// Its LSN.
        lsn: Lsn,
        /// When it was made (milliseconds since the Unix epoch).
        at_ms: u64,
        /// The resources of its writing branches.
        writers: Vec<String>,
    },
    /// A `OnePhase` record: decided by its resource, known by the `End` or `Abort` after it.
    OnePhase {
        /// Its LSN.
        lsn: Lsn,
        /// When it was made (milliseconds since the Unix epoch).
        at_ms: u64,
        /// The branch's resource.
        resource: String,
        /// The redo, kept while the outcome is unknown (recovery asks the resource with it).
        redo: Vec<u8>,
    },
}

impl Decision {
    /// The decision record's LSN.
    pub fn lsn(&self) -> Lsn {
        match self {
            Decision::Commit { lsn, .. } | Decision::OnePhase { lsn, .. } => *lsn,
        }
    }

    /// When it was made (milliseconds since the Unix epoch).
    pub fn at_ms(&self) -> u64 {
        match self {
            Decision::Commit { at_ms, .. } | Decision::OnePhase { at_ms, .. } => *at_ms,
        }
    }

    /// The resources of its writing branches.
    pub fn resources(&self) -> Vec<String> {
        match self {
            Decision::Commit { writers, .. } => writers.clone(),
            Decision::OnePhase { resource, .. } => vec![resource.clone()],
        }
    }
}

/// How a transaction's records end it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `End`: every branch acknowledged (or, one phase, the branch committed).
    End,
    /// `Abort`: the one-phase branch did not commit.
    Abort {
        /// Why.
        reason: String,
    },
}

/// An operator's `Resolve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// Commit (true) or roll back.
    pub commit: bool,
    /// Who.
    pub operator: String,
    /// When (milliseconds since the Unix epoch).
    pub at_ms: u64,
}

/// An operator's `Forget` of one branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forgotten {
    /// The branch's resource.
    pub resource: String,
    /// Who.
    pub operator: String,
    /// Why.
    pub reason: String,
}

/// Everything the journal says about one xid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The LSN of its first retained record.
    pub first_lsn: Lsn,
    /// The LSN of its last record.
    pub last_lsn: Lsn,
    /// Its decision record, if any.
    pub decision: Option<Decision>,
    /// How it ended, if it did.
    pub ending: Option<Ending>,
    /// An operator's decision, if any (the last one).
    pub resolution: Option<Resolution>,
    /// Branches an operator ended by hand.
    pub forgotten: Vec<Forgotten>,
}

/// What became of a transaction, as far as the journal says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No decision record (presumed abort); an operator's `Resolve { rollback }` changes nothing
    /// here, a `Resolve { commit }` without a decision is never written.
    NoDecision,
    /// `Commit` and no `End`: phase 2 must be driven to the end.
    Committing,
    /// Committed and ended: `Commit` + `End`, or `OnePhase` + `End`.
    Committed,
    /// `OnePhase` with neither `End` nor `Abort`: its resource holds the outcome.
    OnePhaseOpen,
    /// `OnePhase` + `Abort`: did not commit.
    Aborted,
}

impl Verdict {
    /// Whether the transaction is decided committed: a prepared branch of it must be
    /// committed, never rolled back.
    pub fn is_commit(self) -> bool {
        matches!(self, Verdict::Committing | Verdict::Committed)
    }

    /// The verdict in a few words, for operators.
    pub fn describe(self) -> &'static str {
        match self {
            Verdict::NoDecision => "no decision (presumed abort)",
            Verdict::Committing => "committed, phase 2 unfinished",
            Verdict::Committed => "committed and ended",
            Verdict::OnePhaseOpen => "one-phase commit, outcome not yet journaled",
            Verdict::Aborted => "one-phase commit that did not happen",
        }
    }
}

/// A transaction that became committed with the record just applied, in replay order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The LSN of its decision record (`Commit` or `OnePhase`).
    pub lsn: Lsn,
    /// The transaction.
    pub xid: Xid,
    /// `(resource, redo)` of each writing branch.
    pub writers: Vec<(String, Vec<u8>)>,
}

/// What the journal's records mean; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    entries: BTreeMap<Xid, Entry>,
    /// The highest sequence number seen per node (kept across trims: xids never repeat).
    max_seq: BTreeMap<u32, u64>,
    last_lsn: Option<Lsn>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Decodes and applies one raw journal record.
    pub fn apply_raw(
        &mut self,
        lsn: Lsn,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<Option<Committed>, LedgerError> {
        let record =
            CoordRecord::decode(kind, payload).map_err(|error| LedgerError { lsn, error })?;
        Ok(self.apply(lsn, record))
    }

    /// Applies one record at `lsn`; records must come in LSN order. Returns the transaction
    /// that became committed with it, if any.
    pub fn apply(&mut self, lsn: Lsn, record: CoordRecord) -> Option<Committed> {
        debug_assert!(
            self.last_lsn.is_none_or(|last| last < lsn),
            "records out of LSN order"
        );
        self.last_lsn = Some(lsn);
        let Some(xid) = record.xid() else {
            // A `Checkpoint`: about no transaction.
            return None;
        };
        let seq = self.max_seq.entry(xid.node).or_default();
        *seq = (*seq).max(xid.seq);
        let entry = self.entries.entry(xid).or_insert_with(|| Entry {
            first_lsn: lsn,
            last_lsn: lsn,
            decision: None,
            ending: None,
            resolution: None,
            forgotten: Vec::new(),
        });
        entry.last_lsn = lsn;
        match record {
            CoordRecord::Commit {
                at_ms, branches, ..
            } => {
                entry.decision = Some(Decision::Commit {
                    lsn,
                    at_ms,
                    writers: branches.iter().map(|(name, _)| name.clone()).collect(),
                });
                Some(Committed {
                    lsn,
                    xid,
                    writers: branches,
                })
            }
            CoordRecord::OnePhase {
                at_ms,
                resource,
                redo,
                ..
            } => {
                entry.decision = Some(Decision::OnePhase {
                    lsn,
                    at_ms,
                    resource,
                    redo,
                });
                None
            }
            CoordRecord::End { .. } => Self::end(entry, xid),
            CoordRecord::Abort { reason, .. } => {
                entry.ending = Some(Ending::Abort { reason });
                None
            }
            CoordRecord::Resolve {
                commit,
                operator,
                at_ms,
                ..
            } => {
                entry.resolution = Some(Resolution {
                    commit,
                    operator,
                    at_ms,
                });
                None
            }
            CoordRecord::Forget {
                resource,
                operator,
                reason,
                ..
            } => {
                entry.forgotten.push(Forgotten {
                    resource,
                    operator,
                    reason,
                });
                None
            }
            CoordRecord::Checkpoint { .. } | CoordRecord::Role { .. } => None,
        }
    }

    /// An `End`: a one-phase decision becomes committed here (its redo moves out).
    fn end(entry: &mut Entry, xid: Xid) -> Option<Committed> {
        let already = entry.ending.is_some();
        entry.ending = Some(Ending::End);
        match &mut entry.decision {
            Some(Decision::OnePhase {
                lsn,
                resource,
                redo,
                ..
            }) if !already => Some(Committed {
                lsn: *lsn,
                xid,
                writers: vec![(resource.clone(), std::mem::take(redo))],
            }),
            _ => None,
        }
    }

    /// What the journal says became of `xid`.
    pub fn verdict(&self, xid: &Xid) -> Verdict {
        self.entries
            .get(xid)
            .map_or(Verdict::NoDecision, verdict_of)
    }

    /// Whether a prepared branch of `xid` must be committed: a decided commit, or an
    /// operator's `Resolve { commit }`.
    pub fn must_commit(&self, xid: &Xid) -> bool {
        self.verdict(xid).is_commit()
            || self
                .entries
                .get(xid)
                .and_then(|e| e.resolution.as_ref())
                .is_some_and(|r| r.commit)
    }

    /// Everything known about `xid`.
    pub fn entry(&self, xid: &Xid) -> Option<&Entry> {
        self.entries.get(xid)
    }

    /// Every xid with its entry, in xid order.
    pub fn entries(&self) -> impl Iterator<Item = (&Xid, &Entry)> {
        self.entries.iter()
    }

    /// Decided two-phase transactions whose phase 2 has not ended: `(xid, decision LSN, the
    /// resources still to be driven)` — the writers less the branches an operator forgot.
    pub fn open_commits(&self) -> impl Iterator<Item = (Xid, Lsn, Vec<String>)> + '_ {
        self.entries
            .iter()
            .filter_map(|(xid, e)| match &e.decision {
                Some(Decision::Commit { lsn, writers, .. }) if e.ending.is_none() => {
                    Some((*xid, *lsn, remaining(writers, &e.forgotten)))
                }
                _ => None,
            })
    }

    /// One-phase records with neither `End` nor `Abort`: `(xid, LSN, resource, redo)`.
    pub fn open_one_phase(&self) -> impl Iterator<Item = (Xid, Lsn, &str, &[u8])> + '_ {
        self.entries
            .iter()
            .filter_map(|(xid, e)| match &e.decision {
                Some(Decision::OnePhase {
                    lsn,
                    resource,
                    redo,
                    ..
                }) if e.ending.is_none() => Some((*xid, *lsn, resource.as_str(), redo.as_slice())),
                _ => None,
            })
    }

    /// The highest sequence number among `node`'s xids.
    pub fn max_seq(&self, node: u32) -> u64 {
        self.max_seq.get(&node).copied().unwrap_or(0)
    }

    /// The LSN of the last record applied.
    pub fn last_lsn(&self) -> Option<Lsn> {
        self.last_lsn
    }

    /// The lowest LSN the journal must keep for the ledger's sake: the first record of the
    /// oldest unfinished transaction (a `Commit` without `End`, a `OnePhase` with neither `End`
    /// nor `Abort`); `None` when every transaction is finished.
    pub fn pinned_from(&self) -> Option<Lsn> {
        self.entries
            .values()
            .filter(|e| is_unfinished(e))
            .map(|e| e.first_lsn)
            .min()
    }

    /// Forgets the finished transactions whose records all lie below `lsn` (the journal
    /// removed the segments holding them). Unfinished ones are kept whatever their LSN.
    pub fn trim_below(&mut self, lsn: Lsn) {
        self.entries
            .retain(|_, e| e.last_lsn >= lsn || is_unfinished(e));
    }

    /// How many transactions the ledger holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn verdict_of(e: &Entry) -> Verdict {
    match (&e.decision, &e.ending) {
        (None, _) => Verdict::NoDecision,
        (Some(Decision::Commit { .. }), None) => Verdict::Committing,
        (Some(_), Some(Ending::End)) => Verdict::Committed,
        (Some(Decision::OnePhase { .. }), None) => Verdict::OnePhaseOpen,
        (Some(_), Some(Ending::Abort { .. })) => Verdict::Aborted,
    }
}

fn is_unfinished(e: &Entry) -> bool {
    matches!(verdict_of(e), Verdict::Committing | Verdict::OnePhaseOpen)
}

fn remaining(writers: &[String], forgotten: &[Forgotten]) -> Vec<String> {
    writers
        .iter()
        .filter(|w| !forgotten.iter().any(|f| &f.resource == *w))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::Epoch;

    fn xid(seq: u64) -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(1),
            seq,
        }
    }

    fn commit(seq: u64, writers: &[&str]) -> CoordRecord {
        CoordRecord::Commit {
            xid: xid(seq),
            at_ms: 1,
            branches: writers.iter().map(|w| (w.to_string(), vec![7])).collect(),
        }
    }

    fn one_phase(seq: u64) -> CoordRecord {
        CoordRecord::OnePhase {
            xid: xid(seq),
            at_ms: 1,
            resource: "orders".into(),
            redo: vec![9],
        }
    }

    fn end(seq: u64) -> CoordRecord {
        CoordRecord::End { xid: xid(seq) }
    }

    #[test]
    fn commit_then_end_is_committed_and_reported_at_the_commit() {
        let mut ledger = Ledger::new();
        let applied = ledger.apply(Lsn(1), commit(5, &["a", "b"]));
        assert_eq!(applied.map(|c| c.lsn), Some(Lsn(1)));
        assert_eq!(ledger.verdict(&xid(5)), Verdict::Committing);
        assert_eq!(ledger.open_commits().count(), 1);
        assert_eq!(ledger.apply(Lsn(2), end(5)), None);
        assert_eq!(ledger.verdict(&xid(5)), Verdict::Committed);
        assert!(ledger.must_commit(&xid(5)));
        assert_eq!(ledger.open_commits().count(), 0);
    }

    #[test]
    fn one_phase_is_committed_only_by_its_end_and_reported_at_its_own_lsn() {
        let mut ledger = Ledger::new();
        assert_eq!(ledger.apply(Lsn(1), one_phase(3)), None);
        assert_eq!(ledger.verdict(&xid(3)), Verdict::OnePhaseOpen);
        assert!(!ledger.must_commit(&xid(3)));
        assert_eq!(
            ledger.apply(Lsn(2), commit(4, &["a"])).map(|c| c.lsn),
            Some(Lsn(2))
        );
        let committed = ledger.apply(Lsn(3), end(3));
        assert_eq!(
            committed,
            Some(Committed {
                lsn: Lsn(1),
                xid: xid(3),
                writers: vec![("orders".into(), vec![9])],
            })
        );
        assert_eq!(ledger.verdict(&xid(3)), Verdict::Committed);
        // A second End (recovery wrote one again) reports nothing twice.
        assert_eq!(ledger.apply(Lsn(4), end(3)), None);
    }

    #[test]
    fn one_phase_followed_by_abort_is_never_committed() {
        let mut ledger = Ledger::new();
        ledger.apply(Lsn(1), one_phase(3));
        let abort = CoordRecord::Abort {
            xid: xid(3),
            reason: "refused".into(),
        };
        assert_eq!(ledger.apply(Lsn(2), abort), None);
        assert_eq!(ledger.verdict(&xid(3)), Verdict::Aborted);
        assert_eq!(ledger.open_one_phase().count(), 0);
        assert_eq!(ledger.pinned_from(), None);
    }

    #[test]
    fn an_operators_commit_makes_a_branch_committable_and_forget_drops_a_writer() {
        let mut ledger = Ledger::new();
        ledger.apply(Lsn(1), commit(8, &["files", "orders"]));
        ledger.apply(
            Lsn(2),
            CoordRecord::Forget {
                xid: xid(8),
                resource: "orders".into(),
                operator: "ops".into(),
                reason: "lost".into(),
                at_ms: 3,
            },
        );
        let open: Vec<_> = ledger.open_commits().collect();
        assert_eq!(open, vec![(xid(8), Lsn(1), vec!["files".to_string()])]);
        ledger.apply(
            Lsn(3),
            CoordRecord::Resolve {
                xid: xid(9),
                commit: true,
                operator: "ops".into(),
                at_ms: 4,
            },
        );
        assert_eq!(ledger.verdict(&xid(9)), Verdict::NoDecision);
        assert!(ledger.must_commit(&xid(9)));
    }

    #[test]
    fn unfinished_transactions_pin_and_finished_ones_are_trimmed() {
        let mut ledger = Ledger::new();
        ledger.apply(Lsn(1), commit(1, &["a"]));
        ledger.apply(Lsn(2), commit(2, &["a"]));
        ledger.apply(Lsn(3), end(2));
        ledger.apply(Lsn(4), one_phase(3));
        assert_eq!(ledger.pinned_from(), Some(Lsn(1)));
        ledger.apply(Lsn(5), end(1));
        assert_eq!(ledger.pinned_from(), Some(Lsn(4)));
        ledger.trim_below(Lsn(4));
        assert_eq!(
            ledger.len(),
            2,
            "xid 1 ended at LSN 5, so it stays; xid 2 goes"
        );
        assert_eq!(ledger.verdict(&xid(2)), Verdict::NoDecision);
        ledger.trim_below(Lsn(6));
        assert_eq!(ledger.len(), 1, "the open one-phase record stays");
        assert_eq!(ledger.max_seq(1), 3);
    }

    #[test]
    fn an_unknown_kind_is_a_typed_error_naming_the_lsn() {
        let mut ledger = Ledger::new();
        let error = ledger
            .apply_raw(Lsn(7), RecordKind::new(42, 1), b"")
            .expect_err("unknown kind");
        assert_eq!(error.lsn, Lsn(7));
        assert!(matches!(error.error, RecordError::UnknownKind(42)));
        assert!(ledger.is_empty());
    }
}
