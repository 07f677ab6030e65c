//! The replay scheduler: a pure machine of records in, batches out.
//!
//! The standby's journal holds the primary's records in LSN order. The machine reads them (the
//! driver feeds [`ReplayMachine::record`]) and keeps, per resource, a queue of the redo that
//! resource must apply, in decision order:
//!
//! * a `Commit` puts each writing branch's redo in its resource's queue, ready;
//! * a `OnePhase` record puts a *waiting* entry in its resource's queue: its outcome is not
//!   known yet. Its `End` makes it ready (the transaction committed), its `Abort` removes it.
//!   Entries behind a waiting one wait too — a resource applies in decision order, and its
//!   applied LSN only grows, so applying a later LSN first would make the waiting one look
//!   applied;
//! * other records (`Resolve`, `Forget`, `Checkpoint`) change no resource.
//!
//! [`ReplayMachine::next_batches`] hands out, for each resource with nothing in flight, the
//! ready entries at the head of its queue as one batch (bounded in records and bytes): the
//! resource applies it atomically with its last LSN ([`adapters::Resource::replay_batch`]), so
//! a crash at any moment leaves the resource either before the batch or after it, and replaying
//! from the resource's applied LSN is exact. Different resources apply in parallel: each
//! resource's applied LSN says what it holds, so a transaction with branches in two resources is
//! applied in each independently. Entries at or below a resource's applied LSN (already applied
//! before a restart) are skipped when fed.
//!
//! [`ReplayMachine::replayed_lsn`] is the LSN up to which every committed transaction is applied
//! to every resource: the record before the oldest transaction still pending, or the last
//! record read when none is. The driver keeps it as its restart point.
//!
//! # Implementation caveats
//!
//! * Within one resource, batches are applied one at a time, in order: transactions with
//!   disjoint write sets in one resource are not applied in parallel; the batch is the unit of
//!   speed there (one database transaction, one sync for many records).
//! * A `Resolve` that commits a transaction with no `Commit` record carries no redo: its
//!   effects cannot be replayed. The machine counts it ([`ReplayMachine::unreplayable`]); the
//!   driver logs it, and `concord compare` shows the difference.

use std::collections::{BTreeMap, HashMap, VecDeque};

use adapters::Xid;
use coordinator::record::CoordRecord;
use journal::Lsn;

/// The most records and bytes of one batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Most redo entries in one batch.
    pub records_max: usize,
    /// Most redo bytes in one batch (a single larger redo still goes alone).
    pub bytes_max: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            records_max: 256,
            bytes_max: 4 << 20,
        }
    }
}

/// A batch for one resource: `(lsn, redo)` in LSN order.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    /// The resource.
    pub resource: String,
    /// The entries.
    pub entries: Vec<(Lsn, Vec<u8>)>,
}

#[derive(Debug)]
enum Entry {
    Ready {
        lsn: Lsn,
        redo: Vec<u8>,
    },
    /// A one-phase commit whose `End` or `Abort` has not been read yet.
    Waiting {
        lsn: Lsn,
        xid: Xid,
        redo: Vec<u8>,
    },
}

impl Entry {
    fn lsn(&self) -> Lsn {
        match self {
            Entry::Ready { lsn, .. } | Entry::Waiting { lsn, .. } => *lsn,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Entry::Ready { redo, .. } | Entry::Waiting { redo, .. } => redo.len(),
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    applied: Lsn,
    entries: VecDeque<Entry>,
    /// The LSNs of the batch being applied.
    in_flight: Option<Vec<Lsn>>,
    bytes: usize,
    /// Set when the resource refused a batch for good: replay of it stopped.
    stopped: Option<String>,
}

/// A transaction not yet applied everywhere.
#[derive(Debug)]
struct Pending {
    xid: Xid,
    at_ms: u64,
    /// Resources still to apply it.
    remaining: usize,
}

/// One resource's backlog ([`ReplayMachine::resource_lag`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceBacklog {
    /// Its applied LSN.
    pub applied_lsn: Lsn,
    /// Redo entries waiting or in flight.
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The decision time of the oldest (milliseconds since the Unix epoch).
    pub oldest_at_ms: Option<u64>,
    /// Why replay of this resource stopped, if it did.
    pub stopped: Option<String>,
}

/// The oldest transaction not applied everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Oldest {
    /// The transaction.
    pub xid: Xid,
    /// Its decision's LSN.
    pub lsn: Lsn,
    /// Its decision time (milliseconds since the Unix epoch, the primary's clock).
    pub at_ms: u64,
}

/// What replay must do; see the module docs.
#[derive(Debug)]
pub struct ReplayMachine {
    queues: BTreeMap<String, Queue>,
    /// Open one-phase commits: xid → resource.
    one_phase: HashMap<Xid, String>,
    /// Transactions not applied everywhere, by decision LSN.
    pending: BTreeMap<Lsn, Pending>,
    /// The last record read.
    scanned: Lsn,
    limits: BatchLimits,
    unreplayable: u64,
}

/// A record names a resource the standby does not have.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the record at lsn {lsn} has a branch in resource {resource:?}, which is not configured on this standby: configure a resource of that name (each site needs its own copy of every resource)"
)]
pub struct UnknownResource {
    /// The record's LSN.
    pub lsn: Lsn,
    /// The resource.
    pub resource: String,
}

impl ReplayMachine {
    /// A machine for resources at their applied LSNs, reading records after `scanned`.
    pub fn new(applied: BTreeMap<String, Lsn>, scanned: Lsn, limits: BatchLimits) -> Self {
        let queues = applied
            .into_iter()
            .map(|(name, applied)| {
                let queue = Queue {
                    applied,
                    ..Queue::default()
                };
                (name, queue)
            })
            .collect();
        ReplayMachine {
            queues,
            one_phase: HashMap::new(),
            pending: BTreeMap::new(),
            scanned,
            limits,
            unreplayable: 0,
        }
    }

    /// Feeds the record at `lsn` (records come in LSN order, each once).
    pub fn record(&mut self, lsn: Lsn, record: CoordRecord) -> Result<(), UnknownResource> {
        debug_assert!(lsn > self.scanned, "records out of LSN order");
        self.scanned = lsn;
        match record {
            CoordRecord::Commit {
                xid,
                at_ms,
                branches,
            } => self.commit(lsn, xid, at_ms, branches)?,
            CoordRecord::OnePhase {
                xid,
                at_ms,
                resource,
                redo,
            } => self.one_phase(lsn, xid, at_ms, resource, redo)?,
            CoordRecord::End { xid } => self.end(&xid),
            CoordRecord::Abort { xid, .. } => self.abort(&xid),
            CoordRecord::Resolve { commit: true, .. } => self.unreplayable += 1,
            _ => {}
        }
        self.validate();
        Ok(())
    }

    fn queue(&mut self, lsn: Lsn, resource: &str) -> Result<&mut Queue, UnknownResource> {
        self.queues
            .get_mut(resource)
            .ok_or_else(|| UnknownResource {
                lsn,
                resource: resource.to_string(),
            })
    }

    fn commit(
        &mut self,
        lsn: Lsn,
        xid: Xid,
        at_ms: u64,
        branches: Vec<(String, Vec<u8>)>,
    ) -> Result<(), UnknownResource> {
        for (resource, _) in &branches {
            self.queue(lsn, resource)?;
        }
        let mut remaining = 0;
        for (resource, redo) in branches {
            let queue = self.queue(lsn, &resource)?;
            if lsn <= queue.applied {
                continue;
            }
            queue.bytes += redo.len();
            queue.entries.push_back(Entry::Ready { lsn, redo });
            remaining += 1;
        }
        if remaining > 0 {
            let pending = Pending {
                xid,
                at_ms,
                remaining,
            };
            self.pending.insert(lsn, pending);
        }
        Ok(())
    }

    fn one_phase(
        &mut self,
        lsn: Lsn,
        xid: Xid,
        at_ms: u64,
        resource: String,
        redo: Vec<u8>,
    ) -> Result<(), UnknownResource> {
        let queue = self.queue(lsn, &resource)?;
        if lsn <= queue.applied || redo.is_empty() {
            return Ok(());
        }
        queue.bytes += redo.len();
        queue.entries.push_back(Entry::Waiting { lsn, xid, redo });
        let pending = Pending {
            xid,
            at_ms,
            remaining: 1,
        };
        self.pending.insert(lsn, pending);
        self.one_phase.insert(xid, resource);
        Ok(())
    }

    fn end(&mut self, xid: &Xid) {
        let Some(resource) = self.one_phase.remove(xid) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(&resource) else {
            return;
        };
        for entry in queue.entries.iter_mut() {
            if let Entry::Waiting { lsn, xid: x, redo } = entry
                && x == xid
            {
                let redo = std::mem::take(redo);
                *entry = Entry::Ready { lsn: *lsn, redo };
                return;
            }
        }
    }

    fn abort(&mut self, xid: &Xid) {
        let Some(resource) = self.one_phase.remove(xid) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(&resource) else {
            return;
        };
        let at = queue
            .entries
            .iter()
            .position(|e| matches!(e, Entry::Waiting { xid: x, .. } if x == xid));
        if let Some(entry) = at.and_then(|i| queue.entries.remove(i)) {
            queue.bytes -= entry.bytes();
            self.pending.remove(&entry.lsn());
        }
    }

    /// The batches to apply now: for each resource with nothing in flight and not stopped, the
    /// ready entries at the head of its queue, within the limits.
    pub fn next_batches(&mut self) -> Vec<Batch> {
        let limits = self.limits;
        let mut batches = Vec::new();
        for (name, queue) in &mut self.queues {
            if queue.in_flight.is_some() || queue.stopped.is_some() {
                continue;
            }
            let mut entries = Vec::new();
            let mut bytes = 0;
            for entry in &queue.entries {
                let Entry::Ready { lsn, redo } = entry else {
                    break;
                };
                let full = entries.len() >= limits.records_max
                    || (!entries.is_empty() && bytes + redo.len() > limits.bytes_max);
                if full {
                    break;
                }
                bytes += redo.len();
                entries.push((*lsn, redo.clone()));
            }
            if entries.is_empty() {
                continue;
            }
            queue.in_flight = Some(entries.iter().map(|(lsn, _)| *lsn).collect());
            batches.push(Batch {
                resource: name.clone(),
                entries,
            });
        }
        batches
    }

    /// The resource applied its batch in flight.
    pub fn applied(&mut self, resource: &str) {
        let Some(queue) = self.queues.get_mut(resource) else {
            return;
        };
        let Some(lsns) = queue.in_flight.take() else {
            return;
        };
        for lsn in &lsns {
            if let Some(entry) = queue.entries.pop_front() {
                debug_assert_eq!(entry.lsn(), *lsn, "applied out of order");
                queue.bytes -= entry.bytes();
            }
            if let Some(pending) = self.pending.get_mut(lsn) {
                pending.remaining -= 1;
                if pending.remaining == 0 {
                    self.pending.remove(lsn);
                }
            }
        }
        if let Some(last) = lsns.last() {
            queue.applied = queue.applied.max(*last);
        }
        self.validate();
    }

    /// The resource failed its batch in flight; `stop` (a refusal that retrying cannot end)
    /// stops replay of that resource, otherwise the batch is handed out again.
    pub fn failed(&mut self, resource: &str, stop: Option<String>) {
        if let Some(queue) = self.queues.get_mut(resource) {
            queue.in_flight = None;
            if stop.is_some() {
                queue.stopped = stop;
            }
        }
    }

    /// Every committed transaction up to this LSN is applied to every resource.
    pub fn replayed_lsn(&self) -> Lsn {
        match self.pending.keys().next() {
            Some(oldest) => oldest.prev(),
            None => self.scanned,
        }
    }

    /// The last record read.
    pub fn scanned(&self) -> Lsn {
        self.scanned
    }

    /// Redo bytes held in the queues: the driver stops reading ahead above a bound.
    pub fn queued_bytes(&self) -> usize {
        self.queues.values().map(|q| q.bytes).sum()
    }

    /// Transactions not yet applied everywhere.
    pub fn pending_transactions(&self) -> u64 {
        self.pending.len() as u64
    }

    /// The oldest of them.
    pub fn oldest(&self) -> Option<Oldest> {
        self.pending.iter().next().map(|(lsn, p)| Oldest {
            xid: p.xid,
            lsn: *lsn,
            at_ms: p.at_ms,
        })
    }

    /// Each resource's backlog.
    pub fn resource_lag(&self) -> BTreeMap<String, ResourceBacklog> {
        self.queues
            .iter()
            .map(|(name, q)| {
                let oldest_at_ms = q
                    .entries
                    .front()
                    .and_then(|e| self.pending.get(&e.lsn()))
                    .map(|p| p.at_ms);
                let backlog = ResourceBacklog {
                    applied_lsn: q.applied,
                    records: q.entries.len() as u64,
                    bytes: q.bytes as u64,
                    oldest_at_ms,
                    stopped: q.stopped.clone(),
                };
                (name.clone(), backlog)
            })
            .collect()
    }

    /// `Resolve` records that committed a transaction without a redo to replay.
    pub fn unreplayable(&self) -> u64 {
        self.unreplayable
    }

    /// Checks the invariants (debug builds): queues in LSN order and above the applied LSN;
    /// byte counts right; a pending transaction has a queue entry.
    fn validate(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        for (name, q) in &self.queues {
            let mut last = q.applied;
            let mut bytes = 0;
            for entry in &q.entries {
                assert!(
                    entry.lsn() > last,
                    "{name}: queue out of order at {}",
                    entry.lsn()
                );
                last = entry.lsn();
                bytes += entry.bytes();
            }
            assert_eq!(bytes, q.bytes, "{name}: byte count");
        }
    }
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

    fn machine(resources: &[&str]) -> ReplayMachine {
        let applied = resources.iter().map(|r| (r.to_string(), Lsn(0))).collect();
        ReplayMachine::new(applied, Lsn(0), BatchLimits::default())
    }

    fn commit(seq: u64, branches: &[(&str, &str)]) -> CoordRecord {
        CoordRecord::Commit {
            xid: xid(seq),
            at_ms: seq,
            branches: branches
                .iter()
                .map(|(r, redo)| (r.to_string(), redo.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn feed(m: &mut ReplayMachine, lsn: u64, record: CoordRecord) {
        m.record(Lsn(lsn), record).unwrap_or_else(|e| panic!("{e}"));
    }

    fn lsns(batch: &Batch) -> Vec<u64> {
        batch.entries.iter().map(|(l, _)| l.0).collect()
    }

    #[test]
    fn consecutive_commits_go_in_one_batch_per_resource() {
        let mut m = machine(&["files", "kv"]);
        feed(&mut m, 1, commit(1, &[("files", "a"), ("kv", "b")]));
        feed(&mut m, 2, commit(2, &[("kv", "c")]));
        let batches = m.next_batches();
        assert_eq!(batches.len(), 2);
        assert_eq!(lsns(&batches[0]), vec![1]);
        assert_eq!(lsns(&batches[1]), vec![1, 2]);
        assert!(
            m.next_batches().is_empty(),
            "one batch in flight per resource"
        );
        assert_eq!(m.replayed_lsn(), Lsn(0));
        m.applied("kv");
        assert_eq!(m.replayed_lsn(), Lsn(0), "txn 1 still waits for files");
        m.applied("files");
        assert_eq!(m.replayed_lsn(), Lsn(2));
        assert_eq!(m.pending_transactions(), 0);
    }

    #[test]
    fn a_one_phase_commit_waits_for_its_end_and_holds_back_its_resource() {
        let mut m = machine(&["orders", "kv"]);
        feed(
            &mut m,
            1,
            CoordRecord::OnePhase {
                xid: xid(1),
                at_ms: 1,
                resource: "orders".into(),
                redo: b"rows".to_vec(),
            },
        );
        feed(&mut m, 2, commit(2, &[("orders", "later"), ("kv", "k")]));
        let batches = m.next_batches();
        assert_eq!(
            batches.len(),
            1,
            "only kv: orders waits behind the one-phase"
        );
        assert_eq!(batches[0].resource, "kv");
        feed(&mut m, 3, CoordRecord::End { xid: xid(1) });
        let batches = m.next_batches();
        assert_eq!(lsns(&batches[0]), vec![1, 2]);
        m.applied("orders");
        m.applied("kv");
        assert_eq!(m.replayed_lsn(), Lsn(3));
    }

    #[test]
    fn an_aborted_one_phase_commit_is_skipped() {
        let mut m = machine(&["orders"]);
        feed(
            &mut m,
            1,
            CoordRecord::OnePhase {
                xid: xid(1),
                at_ms: 1,
                resource: "orders".into(),
                redo: b"rows".to_vec(),
            },
        );
        feed(&mut m, 2, commit(2, &[("orders", "next")]));
        assert_eq!(m.replayed_lsn(), Lsn(0));
        feed(
            &mut m,
            3,
            CoordRecord::Abort {
                xid: xid(1),
                reason: "refused".into(),
            },
        );
        let batches = m.next_batches();
        assert_eq!(lsns(&batches[0]), vec![2]);
        m.applied("orders");
        assert_eq!(m.replayed_lsn(), Lsn(3));
        assert_eq!(m.queued_bytes(), 0);
    }

    #[test]
    fn what_a_resource_applied_before_a_restart_is_skipped() {
        let applied = [("files".to_string(), Lsn(5)), ("kv".to_string(), Lsn(2))];
        let mut m = ReplayMachine::new(applied.into(), Lsn(1), BatchLimits::default());
        feed(&mut m, 3, commit(3, &[("files", "old"), ("kv", "new")]));
        let batches = m.next_batches();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].resource, "kv");
    }

    #[test]
    fn a_failed_batch_is_handed_out_again_unless_stopped() {
        let mut m = machine(&["kv"]);
        feed(&mut m, 1, commit(1, &[("kv", "a")]));
        let first = m.next_batches();
        m.failed("kv", None);
        assert_eq!(m.next_batches(), first);
        m.failed("kv", Some("schema differs".into()));
        assert!(m.next_batches().is_empty());
        assert_eq!(
            m.resource_lag()["kv"].stopped.as_deref(),
            Some("schema differs")
        );
    }

    #[test]
    fn batches_respect_their_limits() {
        let applied = [("kv".to_string(), Lsn(0))];
        let limits = BatchLimits {
            records_max: 2,
            bytes_max: 1 << 20,
        };
        let mut m = ReplayMachine::new(applied.into(), Lsn(0), limits);
        for lsn in 1..=5 {
            feed(&mut m, lsn, commit(lsn, &[("kv", "x")]));
        }
        let batches = m.next_batches();
        assert_eq!(lsns(&batches[0]), vec![1, 2]);
    }

    #[test]
    fn an_unknown_resource_is_an_error() {
        let mut m = machine(&["kv"]);
        let e = m
            .record(Lsn(1), commit(1, &[("gone", "x")]))
            .expect_err("unknown");
        assert_eq!(e.resource, "gone");
    }
}
