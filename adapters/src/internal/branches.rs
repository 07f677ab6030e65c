//! The table of branches the files, mail and kv resources keep, and the phases every branch
//! goes through.
//!
//! A branch is **active** while it takes work (puts, messages, writes), **being prepared** while
//! its prepare runs, **prepared** once its prepare is durable, and **being resolved** while a
//! commit or rollback runs; once resolved it is forgotten. The only transitions:
//!
//! ```text
//! Active → Preparing → Prepared          (back to Active when the prepare fails)
//! Active or Prepared → Resolving → gone  (back to where it was when the resolution fails)
//! ```
//!
//! **Fences and owners.** Commit and rollback carry no epoch, so the owner of a branch is told
//! by where it came from. A branch *begun* through this instance belongs to the coordinator
//! that began it, at the branch's epoch; once the fence is above that epoch, that owner is
//! fenced out, and this instance refuses to resolve the branch once it is prepared (a
//! [`ResourceError::Fenced`]: an old primary resumed after a pause must change nothing). A
//! branch *recovered* from disk at open belongs to whoever opened the storage — after a fence,
//! the new owner, which resolves the in-doubt branches it inherits. Rolling back a branch that
//! is still active (nothing of it durable) stays allowed: it changes nothing but memory.
//!
//! A branch with nothing to prepare votes read-only and is forgotten at once; the table
//! remembers the last [`READ_ONLY_REMEMBERED_MAX`] such votes, so that a second prepare (a
//! coordinator retrying) gets the same answer instead of "unknown branch".
//!
//! What a branch holds differs from resource to resource, and so do the work of a prepare and
//! of a resolution; the table, each branch's phase, the transitions and their refusals are the
//! same, and live here. A resource's state transitions, which each take the state lock once and
//! do no I/O, call the table's and then change what its own branch type holds.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use crate::internal::instance::Instance;
use crate::xid::XidBuildHasher;
use crate::{Epoch, ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// How many read-only votes are remembered.
pub(crate) const READ_ONLY_REMEMBERED_MAX: usize = 4096;

/// Where a branch is in its life; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// It takes work.
    Active,
    /// A prepare is running; no more work.
    Preparing,
    /// Its prepare is durable.
    Prepared,
    /// A commit or rollback is running.
    Resolving,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Active => "active",
            Phase::Preparing => "being prepared",
            Phase::Prepared => "prepared",
            Phase::Resolving => "being resolved",
        })
    }
}

/// What a prepare does, after [`Branches::start_prepare`] looked at the branch.
pub(crate) enum Starting<'a, B> {
    /// It voted read-only before: vote so again.
    ReadOnly,
    /// It is prepared already: vote again with what its prepare holds.
    Again(&'a B),
    /// It is now being prepared: prepare its work, then [`Branches::finish_prepare`].
    Prepare(&'a mut B),
    /// It has no work: forget it (releasing what it holds), then [`Branches::voted_read_only`].
    Empty,
}

/// A branch in the table: what the resource keeps of it, and where it is.
struct Slot<B> {
    phase: Phase,
    /// It was recovered from disk at open (its owner is whoever opened the storage), not begun
    /// through this instance.
    recovered: bool,
    /// Its prepare is durable (it is prepared, or being resolved after a prepare).
    prepared: bool,
    branch: B,
}

/// The open branches of a resource by xid, each with its phase, and the last read-only votes.
pub(crate) struct Branches<B> {
    open: HashMap<Xid, Slot<B>, XidBuildHasher>,
    read_only: VecDeque<Xid>,
}

impl<B> Branches<B> {
    /// A table holding the branches recovered at open, all prepared.
    pub(crate) fn recovered(branches: impl IntoIterator<Item = (Xid, B)>) -> Branches<B> {
        let prepared = |branch| Slot {
            phase: Phase::Prepared,
            recovered: true,
            prepared: true,
            branch,
        };
        Branches {
            open: branches
                .into_iter()
                .map(|(xid, branch)| (xid, prepared(branch)))
                .collect(),
            read_only: VecDeque::new(),
        }
    }

    /// How many branches are open.
    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether `xid` is open.
    pub(crate) fn contains(&self, xid: &Xid) -> bool {
        self.open.contains_key(xid)
    }

    /// The branch `xid`, whatever its phase, to change what it holds.
    pub(crate) fn get_mut(&mut self, xid: &Xid) -> Option<&mut B> {
        self.open.get_mut(xid).map(|slot| &mut slot.branch)
    }

    /// Every open branch with its phase, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Xid, Phase, &B)> {
        self.open
            .iter()
            .map(|(xid, slot)| (xid, slot.phase, &slot.branch))
    }

    /// Forgets `xid` — active with nothing to prepare, or resolved — and returns its branch, for
    /// the caller to release what it holds.
    pub(crate) fn remove(&mut self, xid: &Xid) -> Option<B> {
        let slot = self.open.remove(xid)?;
        debug_assert!(
            matches!(slot.phase, Phase::Active | Phase::Resolving),
            "branch {xid} forgotten while {}",
            slot.phase
        );
        Some(slot.branch)
    }

    /// Whether the prepare of `xid` is durable (it is open and prepared, or being resolved after
    /// a prepare).
    pub(crate) fn is_prepared(&self, xid: &Xid) -> bool {
        self.open.get(xid).is_some_and(|slot| slot.prepared)
    }

    /// The branches whose prepare is durable, in no particular order.
    pub(crate) fn prepared(&self) -> Vec<Xid> {
        self.open
            .iter()
            .filter(|(_, slot)| slot.prepared)
            .map(|(xid, _)| *xid)
            .collect()
    }

    /// `Resource::begin`: opens `xid` with `new()`; beginning an active branch again is a
    /// no-op, and a branch past active is refused.
    pub(crate) fn begin(
        &mut self,
        at: &impl Instance,
        xid: &Xid,
        new: impl FnOnce() -> B,
    ) -> Result<()> {
        match self.open.get(xid).map(|slot| slot.phase) {
            None => {
                self.read_only.retain(|x| x != xid);
                let slot = Slot {
                    phase: Phase::Active,
                    recovered: false,
                    prepared: false,
                    branch: new(),
                };
                self.open.insert(*xid, slot);
                Ok(())
            }
            Some(Phase::Active) => Ok(()),
            Some(phase) => {
                Err(at.rejected(format!("branch {xid} is {phase}; it cannot begin again")))
            }
        }
    }

    /// The branch `xid`, open or not yet resolved (what a read of the branch sees).
    pub(crate) fn open(&self, at: &impl Instance, xid: &Xid) -> Result<&B> {
        match self.open.get(xid) {
            Some(slot) => Ok(&slot.branch),
            None => Err(at.rejected(format!("branch {xid} is not open here; begin it first"))),
        }
    }

    /// The branch `xid` while it is active; `work` names what an active branch takes (in the
    /// refusal: "it takes no more {work}").
    pub(crate) fn active(&mut self, at: &impl Instance, xid: &Xid, work: &str) -> Result<&mut B> {
        match self.open.get_mut(xid) {
            Some(slot) if slot.phase == Phase::Active => Ok(&mut slot.branch),
            Some(slot) => Err(at.rejected(format!(
                "branch {xid} is {}; it takes no more {work}",
                slot.phase
            ))),
            None => Err(at.rejected(format!("branch {xid} is not open here; begin it first"))),
        }
    }

    /// Starts a prepare of `xid` under the fence epoch `fence`; `has_work` says whether an
    /// active branch has anything to prepare (without, it votes read-only).
    pub(crate) fn start_prepare(
        &mut self,
        at: &impl Instance,
        xid: &Xid,
        fence: Epoch,
        has_work: impl FnOnce(&B) -> bool,
    ) -> Result<Starting<'_, B>> {
        let Some(slot) = self.open.get_mut(xid) else {
            if self.read_only.contains(xid) {
                return Ok(Starting::ReadOnly);
            }
            return Err(at.rejected(format!(
                "branch {xid} is unknown: it was never begun here, or its work was lost in a restart before prepare; roll the transaction back"
            )));
        };
        match slot.phase {
            Phase::Prepared => return Ok(Starting::Again(&slot.branch)),
            phase @ (Phase::Preparing | Phase::Resolving) => {
                return Err(at.unavailable(format!("branch {xid} is {phase}; try again")));
            }
            Phase::Active => {}
        }
        if xid.epoch < fence {
            return Err(at.fenced(xid, fence));
        }
        if !has_work(&slot.branch) {
            return Ok(Starting::Empty);
        }
        slot.phase = Phase::Preparing;
        Ok(Starting::Prepare(&mut slot.branch))
    }

    /// Remembers that `xid` voted read-only (after [`Starting::Empty`] and forgetting it).
    pub(crate) fn voted_read_only(&mut self, xid: &Xid) {
        if self.read_only.len() >= READ_ONLY_REMEMBERED_MAX {
            self.read_only.pop_front();
        }
        self.read_only.push_back(*xid);
    }

    /// Ends a prepare of `xid`: prepared when `durable`, active again otherwise; returns the
    /// branch for the caller to record what the prepare made durable (or to clear it).
    pub(crate) fn finish_prepare(
        &mut self,
        at: &impl Instance,
        xid: &Xid,
        durable: bool,
    ) -> Result<&mut B> {
        let Some(slot) = self.open.get_mut(xid) else {
            return Err(at.fatal(format!("branch {xid} vanished while it was prepared")));
        };
        debug_assert_eq!(slot.phase, Phase::Preparing, "branch {xid}");
        slot.phase = if durable {
            Phase::Prepared
        } else {
            Phase::Active
        };
        slot.prepared = durable;
        Ok(&mut slot.branch)
    }

    /// Starts a commit (`commit`) or rollback of `xid`: returns its phase before and the branch,
    /// now being resolved; `None` when it is not open (resolved already, or never prepared
    /// here and forgotten). An active branch can be rolled back, not committed. A prepared
    /// branch begun through this instance at an epoch below `fence` is refused: its owner is
    /// fenced out (see the module docs).
    pub(crate) fn start_resolve(
        &mut self,
        at: &impl Instance,
        xid: &Xid,
        commit: bool,
        fence: Epoch,
    ) -> Result<Option<(Phase, &mut B)>> {
        let Some(slot) = self.open.get_mut(xid) else {
            return Ok(None);
        };
        if slot.prepared && !slot.recovered && xid.epoch < fence {
            return Err(at.fenced(xid, fence));
        }
        match slot.phase {
            Phase::Active if commit => Err(at.rejected(format!(
                "branch {xid} is not prepared; prepare it first (one-phase commit is not supported)"
            ))),
            phase @ (Phase::Preparing | Phase::Resolving) => {
                Err(at.unavailable(format!("branch {xid} is {phase}; try again")))
            }
            previous => {
                slot.phase = Phase::Resolving;
                Ok(Some((previous, &mut slot.branch)))
            }
        }
    }

    /// A resolution of `xid` failed: it goes back to `previous`, to be resolved again.
    pub(crate) fn resolution_failed(&mut self, xid: &Xid, previous: Phase) {
        if let Some(slot) = self.open.get_mut(xid) {
            debug_assert_eq!(slot.phase, Phase::Resolving, "branch {xid}");
            slot.phase = previous;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::ErrorClass;
    use crate::internal::instance::{InstanceState, Shared};

    struct Table {
        shared: Shared,
    }

    impl InstanceState for Table {
        fn shared(&self) -> &Shared {
            &self.shared
        }

        fn shared_mut(&mut self) -> &mut Shared {
            &mut self.shared
        }

        fn prepared(&self) -> Vec<Xid> {
            Vec::new()
        }
    }

    struct At(Mutex<Table>);

    impl Instance for At {
        type State = Table;
        const KIND: &'static str = "test";

        fn name(&self) -> &str {
            "t"
        }

        fn state_mutex(&self) -> &Mutex<Table> {
            &self.0
        }
    }

    fn xid(epoch: u64, seq: u64) -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(epoch),
            seq,
        }
    }

    fn class<T>(result: Result<T>) -> ErrorClass {
        match result {
            Ok(_) => panic!("expected a refusal"),
            Err(e) => e.class(),
        }
    }

    #[test]
    fn a_branch_goes_through_its_phases_and_nothing_else() {
        let at = At(Mutex::new(Table {
            shared: Shared::default(),
        }));
        let mut table: Branches<Vec<u8>> = Branches::recovered([(xid(1, 1), b"old".to_vec())]);
        assert_eq!(table.prepared(), vec![xid(1, 1)]);
        let one = xid(2, 2);
        table.begin(&at, &one, Vec::new).unwrap();
        table.begin(&at, &one, || unreachable!()).unwrap();
        table.active(&at, &one, "writes").unwrap().push(7);
        let has_work = |b: &Vec<u8>| !b.is_empty();

        // Below the fence: refused, still active.
        assert!(matches!(
            table.start_prepare(&at, &one, Epoch(3), has_work),
            Err(ResourceError::Fenced { .. })
        ));
        assert!(matches!(
            table.start_prepare(&at, &one, Epoch(2), has_work),
            Ok(Starting::Prepare(_))
        ));
        assert_eq!(
            class(table.active(&at, &one, "writes")),
            ErrorClass::Rejected
        );
        assert_eq!(
            class(table.begin(&at, &one, Vec::new)),
            ErrorClass::Rejected
        );
        assert_eq!(
            class(table.start_prepare(&at, &one, Epoch(2), has_work)),
            ErrorClass::Retryable
        );
        assert_eq!(
            class(table.start_resolve(&at, &one, true, Epoch(2))),
            ErrorClass::Retryable
        );
        // A failed prepare leaves it active and not prepared; a durable one, prepared.
        table.finish_prepare(&at, &one, false).unwrap();
        assert!(!table.is_prepared(&one));
        assert!(matches!(
            table.start_prepare(&at, &one, Epoch(2), has_work),
            Ok(Starting::Prepare(_))
        ));
        table.finish_prepare(&at, &one, true).unwrap();
        assert!(table.is_prepared(&one));
        assert!(matches!(
            table.start_prepare(&at, &one, Epoch(2), has_work),
            Ok(Starting::Again(b)) if b == &vec![7]
        ));

        // A prepared branch votes again even below a fence raised since.
        assert!(matches!(
            table.start_prepare(&at, &one, Epoch(9), has_work),
            Ok(Starting::Again(_))
        ));

        // A failed resolution goes back; a second one is refused while one runs, and so are a
        // prepare and a begin; being resolved, it is still listed as prepared (for `recover`).
        let (previous, _) = table
            .start_resolve(&at, &one, true, Epoch(2))
            .unwrap()
            .unwrap();
        assert_eq!(previous, Phase::Prepared);
        assert_eq!(
            class(table.start_resolve(&at, &one, false, Epoch(2))),
            ErrorClass::Retryable
        );
        assert_eq!(
            class(table.start_prepare(&at, &one, Epoch(2), has_work)),
            ErrorClass::Retryable
        );
        assert_eq!(
            class(table.begin(&at, &one, Vec::new)),
            ErrorClass::Rejected
        );
        let mut prepared = table.prepared();
        prepared.sort();
        assert_eq!(prepared, vec![xid(1, 1), one]);
        table.resolution_failed(&one, previous);
        assert!(
            table
                .start_resolve(&at, &one, true, Epoch(2))
                .unwrap()
                .is_some()
        );
        assert_eq!(table.remove(&one), Some(vec![7]));
        assert!(
            table
                .start_resolve(&at, &one, true, Epoch(2))
                .unwrap()
                .is_none()
        );
        assert_eq!(class(table.open(&at, &one)), ErrorClass::Rejected);
        assert_eq!(table.len(), 1);

        // An active branch is rolled back, never committed.
        let two = xid(2, 3);
        table.begin(&at, &two, Vec::new).unwrap();
        assert_eq!(
            class(table.start_resolve(&at, &two, true, Epoch(2))),
            ErrorClass::Rejected
        );
        assert!(
            table
                .start_resolve(&at, &two, false, Epoch(2))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_fenced_owner_cannot_resolve_its_prepared_branches_an_heir_can() {
        let at = At(Mutex::new(Table {
            shared: Shared::default(),
        }));
        let inherited = xid(1, 1);
        let mut table: Branches<Vec<u8>> = Branches::recovered([(inherited, Vec::new())]);
        let (prepared, active) = (xid(1, 2), xid(1, 3));
        for x in [prepared, active] {
            table.begin(&at, &x, || vec![1]).unwrap();
        }
        let has_work = |b: &Vec<u8>| !b.is_empty();
        assert!(matches!(
            table.start_prepare(&at, &prepared, Epoch(1), has_work),
            Ok(Starting::Prepare(_))
        ));
        table.finish_prepare(&at, &prepared, true).unwrap();
        // The fence is now 2: the owner at epoch 1 is fenced out.
        for commit in [true, false] {
            assert!(matches!(
                table.start_resolve(&at, &prepared, commit, Epoch(2)),
                Err(ResourceError::Fenced { .. })
            ));
        }
        assert!(table.is_prepared(&prepared));
        // A branch recovered at open is the opener's to resolve; an active one may go.
        assert!(
            table
                .start_resolve(&at, &inherited, true, Epoch(2))
                .unwrap()
                .is_some()
        );
        assert!(
            table
                .start_resolve(&at, &active, false, Epoch(2))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn read_only_votes_are_remembered_up_to_the_bound() {
        let at = At(Mutex::new(Table {
            shared: Shared::default(),
        }));
        let mut table: Branches<Vec<u8>> = Branches::recovered([]);
        let has_work = |b: &Vec<u8>| !b.is_empty();
        for seq in 0..=READ_ONLY_REMEMBERED_MAX as u64 {
            let x = xid(1, seq);
            table.begin(&at, &x, Vec::new).unwrap();
            assert!(matches!(
                table.start_prepare(&at, &x, Epoch(0), has_work),
                Ok(Starting::Empty)
            ));
            table.remove(&x);
            table.voted_read_only(&x);
        }
        let last = xid(1, READ_ONLY_REMEMBERED_MAX as u64);
        assert!(matches!(
            table.start_prepare(&at, &last, Epoch(0), has_work),
            Ok(Starting::ReadOnly)
        ));
        // The first vote was forgotten: that branch is unknown now.
        assert_eq!(
            class(table.start_prepare(&at, &xid(1, 0), Epoch(0), has_work)),
            ErrorClass::Rejected
        );
        // Beginning a remembered xid again makes it a branch again.
        table.begin(&at, &last, Vec::new).unwrap();
        assert!(matches!(
            table.start_prepare(&at, &last, Epoch(0), has_work),
            Ok(Starting::Empty)
        ));
    }
}
