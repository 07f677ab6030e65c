//! Path locks of the files resource: what keeps the journal order the commit order.
//!
//! A path a branch writes (put or delete) is locked exclusively until the branch is resolved,
//! together with an *intent* on each of its ancestor directories, so that one branch writing
//! `a` and another writing `a/b` conflict as well (docs/design.md "Ordering"). A branch's own locks
//! can make a path impossible for it (a file and a path below it): that is a refusal, not a
//! wait. A second writer waits for a release (`internal::locks::wait_for_lock`) at most
//! `lock_wait_ms_max`, then fails with [`ResourceError::Conflict`]. The locks of prepared
//! branches are taken again at open from their prepare records ([`Locks::take`]), so isolation
//! survives a restart.
//!
//! # Implementation caveats
//!
//! * Locks are on the path as written, not on the file a symlink inside the root leads to: two
//!   names of one file through symlinks do not conflict.
//! * Intents are counted per branch and ancestor; a release walks the path's ancestors again.

use std::collections::HashMap;

use super::{BRANCH_PATHS_MAX, Inner, State};
use crate::internal::instance::Instance;
use crate::internal::locks::wait_for_lock;
use crate::{ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// Path locks: an exclusive lock on each written path and an intent on each of its ancestors.
#[derive(Default)]
pub(super) struct Locks {
    exclusive: HashMap<String, Xid>,
    intents: HashMap<String, HashMap<Xid, u32>>,
}

pub(super) enum Refusal {
    /// Another branch holds a conflicting lock.
    Held(Xid),
    /// The branch's own writes make the path impossible.
    Own(String),
}

impl Locks {
    /// Locks `path` for `xid` with an intent on each ancestor, unless another branch holds a
    /// conflicting lock or `xid`'s own locks make the path impossible (a file and a path below it).
    pub(super) fn try_take(&mut self, xid: &Xid, path: &str) -> Result<(), Refusal> {
        if let Some(holder) = self.exclusive.get(path) {
            return if holder == xid {
                Ok(())
            } else {
                Err(Refusal::Held(*holder))
            };
        }
        for ancestor in ancestors(path) {
            match self.exclusive.get(ancestor) {
                Some(holder) if holder == xid => {
                    return Err(Refusal::Own(format!(
                        "this transaction writes the file {ancestor}, so it cannot write below it"
                    )));
                }
                Some(holder) => return Err(Refusal::Held(*holder)),
                None => {}
            }
        }
        if let Some(holders) = self.intents.get(path) {
            if let Some(other) = holders.keys().find(|h| *h != xid) {
                return Err(Refusal::Held(*other));
            }
            if holders.contains_key(xid) {
                return Err(Refusal::Own(
                    "this transaction writes below it, so it cannot write it as a file".to_string(),
                ));
            }
        }
        self.take(xid, path);
        Ok(())
    }

    /// Locks `path` for `xid` without checking (for prepared branches at open).
    pub(super) fn take(&mut self, xid: &Xid, path: &str) {
        self.exclusive.insert(path.to_string(), *xid);
        for ancestor in ancestors(path) {
            *self
                .intents
                .entry(ancestor.to_string())
                .or_default()
                .entry(*xid)
                .or_default() += 1;
        }
    }

    pub(super) fn release(&mut self, xid: &Xid, path: &str) {
        if self.exclusive.get(path) == Some(xid) {
            self.exclusive.remove(path);
        }
        for ancestor in ancestors(path) {
            let Some(holders) = self.intents.get_mut(ancestor) else {
                continue;
            };
            if let Some(count) = holders.get_mut(xid) {
                *count -= 1;
                if *count == 0 {
                    holders.remove(xid);
                }
            }
            if holders.is_empty() {
                self.intents.remove(ancestor);
            }
        }
    }
}

/// The proper ancestors of a relative path: `a/b/c` → `a`, `a/b`.
pub(super) fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

impl Inner {
    /// One attempt to lock `path` for `xid`: `Ok(None)` when locked, `Ok(Some(holder))` when
    /// another branch holds it.
    pub(super) fn try_lock(&self, xid: &Xid, path: &str) -> Result<Option<Xid>> {
        let mut guard = self.state();
        self.usable(&guard)?;
        self.not_fenced(&guard, xid)?;
        let State {
            branches, locks, ..
        } = &mut *guard;
        let branch = branches.active(self, xid, "writes")?;
        if branch.locked.len() >= BRANCH_PATHS_MAX && !branch.locked.contains(path) {
            return Err(self.rejected(format!("branch {xid} already writes BRANCH_PATHS_MAX = {BRANCH_PATHS_MAX} paths; {path} refused")));
        }
        match locks.try_take(xid, path) {
            Ok(()) => {
                branch.locked.insert(path.to_string());
                Ok(None)
            }
            Err(Refusal::Held(holder)) => Ok(Some(holder)),
            Err(Refusal::Own(reason)) => {
                Err(self.rejected(format!("path {path:?} refused: {reason}")))
            }
        }
    }

    /// Locks `path` for `xid`, waiting at most `lock_wait_ms_max` for another branch to release it.
    pub(super) async fn lock_path(&self, xid: &Xid, path: &str) -> Result<()> {
        let wait_ms_max = self.config.lock_wait_ms_max;
        let what = || path.to_string();
        wait_for_lock(&self.name, &self.released, wait_ms_max, what, || {
            self.try_lock(xid, path)
        })
        .await
    }

    /// Forgets a branch and releases its locks, waking every waiter.
    pub(super) fn release_locks(&self, st: &mut State, xid: &Xid) {
        if let Some(branch) = st.branches.remove(xid) {
            for path in &branch.locked {
                st.locks.release(xid, path);
            }
        }
        self.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Epoch;

    #[test]
    fn locks_conflict_on_paths_and_their_ancestors() {
        let (a, b) = (
            Xid {
                node: 1,
                epoch: Epoch(1),
                seq: 1,
            },
            Xid {
                node: 1,
                epoch: Epoch(1),
                seq: 2,
            },
        );
        let mut locks = Locks::default();
        assert!(locks.try_take(&a, "d/f").is_ok());
        assert!(locks.try_take(&a, "d/f").is_ok(), "re-locking is a no-op");
        assert!(matches!(locks.try_take(&b, "d/f"), Err(Refusal::Held(h)) if h == a));
        assert!(matches!(locks.try_take(&b, "d"), Err(Refusal::Held(h)) if h == a));
        assert!(matches!(locks.try_take(&b, "d/f/g"), Err(Refusal::Held(h)) if h == a));
        assert!(matches!(locks.try_take(&a, "d"), Err(Refusal::Own(_))));
        assert!(matches!(locks.try_take(&a, "d/f/g"), Err(Refusal::Own(_))));
        assert!(
            locks.try_take(&b, "d/other").is_ok(),
            "siblings do not conflict"
        );
        locks.release(&a, "d/f");
        assert!(locks.try_take(&b, "d/f").is_ok());
        locks.release(&b, "d/f");
        locks.release(&b, "d/other");
        assert!(locks.exclusive.is_empty() && locks.intents.is_empty());
    }
}
