//! The state checks every resource makes on every call: poisoned?, fenced?
//!
//! A resource keeps its in-memory state behind one `std::sync::Mutex` and stops after its
//! first fatal failure (a failed sync, damage): the failure **poisons** the instance, and every
//! later call fails with [`ResourceError::Fatal`] naming the first cause, until the process
//! restarts and the resource recovers from disk (STYLE.md 11). It also refuses a branch whose
//! epoch is below its fence epoch. Both checks, and the error constructors that name the
//! resource, are the same for every resource, so they are the default methods of
//! [`Instance`], which a resource's `Inner` implements by saying where its name and state
//! are. Every state holds the same [`Shared`] part — fence epoch, applied LSN, poison — and
//! says which branches are prepared ([`InstanceState`]), so `recover`, `fence_epoch` and
//! `applied_lsn` are answered here too.
//!
//! Poisoning is for an instance's **own** failure: [`Instance::check`] poisons only on a
//! [`ResourceError::Fatal`] that names this instance. A blocking task that tokio cancelled
//! because the runtime is shutting down (another resource failed and the process stops) never
//! ran, and is reported as [`ResourceError::Unavailable`] (`internal::io::blocking`): a healthy
//! resource does not call itself poisoned when the process goes down around it.
//!
//! # Implementation caveats
//!
//! * A poisoned `std::sync::Mutex` (a panic while it was held) is taken over as it is: the
//!   state transitions under it are short and do no I/O, and a panic is a bug either way.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{Epoch, Lsn, ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// What every resource's state holds, and the shared checks and answers read.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The fence epoch: a branch of a lower epoch is refused.
    pub(crate) fence: Epoch,
    /// The LSN of the last redo replayed.
    pub(crate) applied_lsn: Lsn,
    /// The cause of the first fatal failure, once there was one: every later call fails.
    pub(crate) poisoned: Option<String>,
}

impl Shared {
    /// The shared part of a resource just opened: its fence epoch and applied LSN as read from
    /// disk, not poisoned.
    pub(crate) fn opened(fence: Epoch, applied_lsn: Lsn) -> Shared {
        Shared {
            fence,
            applied_lsn,
            poisoned: None,
        }
    }
}

/// A resource's state, as the shared checks see it.
pub(crate) trait InstanceState {
    /// Its [`Shared`] part.
    fn shared(&self) -> &Shared;
    /// Its [`Shared`] part, to change.
    fn shared_mut(&mut self) -> &mut Shared;
    /// The branches with a durable prepare and no resolution yet, in any order.
    fn prepared(&self) -> Vec<Xid>;
}

/// A resource instance: its name and its state; the checks are the default methods.
pub(crate) trait Instance {
    /// The resource's state, behind [`Instance::state_mutex`].
    type State: InstanceState;
    /// The kind of resource, as a poisoning is logged (`"files"`, `"mail"`, `"kv"`).
    const KIND: &'static str;

    /// The resource's name, which every error carries.
    fn name(&self) -> &str;

    /// The mutex of the state.
    fn state_mutex(&self) -> &Mutex<Self::State>;

    /// Locks the state.
    fn state(&self) -> MutexGuard<'_, Self::State> {
        lock(self.state_mutex())
    }

    /// Fails once the instance is poisoned.
    fn usable(&self, st: &Self::State) -> Result<()> {
        match st.shared().poisoned.as_deref() {
            None => Ok(()),
            Some(cause) => Err(self.fatal(format!("unusable after an earlier failure ({cause})"))),
        }
    }

    /// `f` of the state, unless the instance is poisoned.
    fn usable_state<T>(&self, f: impl FnOnce(&Self::State) -> T) -> Result<T> {
        let st = self.state();
        self.usable(&st)?;
        Ok(f(&st))
    }

    /// Poisons the instance when `result` is a fatal error of its own (one naming another
    /// resource passes through: an instance poisons itself only for its own failure).
    fn check<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(ResourceError::Fatal { resource, message }) = &result
            && resource == self.name()
        {
            let mut st = self.state();
            let poisoned = &mut st.shared_mut().poisoned;
            if poisoned.is_none() {
                tracing::error!(resource = %self.name(), %message, "{} resource poisoned; restart to recover", Self::KIND);
                *poisoned = Some(message.clone());
            }
        }
        result
    }

    /// Refuses `xid` when its epoch is below the fence.
    fn not_fenced(&self, st: &Self::State, xid: &Xid) -> Result<()> {
        let fence = st.shared().fence;
        if xid.epoch < fence {
            return Err(self.fenced(xid, fence));
        }
        Ok(())
    }

    /// `Resource::recover`: the prepared branches, sorted, unless the instance is poisoned.
    fn prepared_xids(&self) -> Result<Vec<Xid>> {
        let mut xids = self.usable_state(InstanceState::prepared)?;
        xids.sort();
        Ok(xids)
    }

    /// `Resource::fence_epoch`.
    fn fence_epoch(&self) -> Result<Epoch> {
        self.usable_state(|st| st.shared().fence)
    }

    /// `Resource::applied_lsn`.
    fn applied_lsn(&self) -> Result<Lsn> {
        self.usable_state(|st| st.shared().applied_lsn)
    }

    /// A [`ResourceError::Fenced`] of `xid` by `fence`.
    fn fenced(&self, xid: &Xid, fence: Epoch) -> ResourceError {
        ResourceError::Fenced {
            resource: self.name().to_string(),
            offered: xid.epoch,
            current: fence,
        }
    }

    /// A [`ResourceError::Rejected`] of this resource.
    fn rejected(&self, reason: String) -> ResourceError {
        ResourceError::rejected(self.name(), reason)
    }

    /// A [`ResourceError::Fatal`] of this resource.
    fn fatal(&self, message: String) -> ResourceError {
        ResourceError::Fatal {
            resource: self.name().to_string(),
            message,
        }
    }

    /// A [`ResourceError::Unavailable`] of this resource.
    fn unavailable(&self, message: String) -> ResourceError {
        ResourceError::Unavailable {
            resource: self.name().to_string(),
            message,
        }
    }
}

/// The **fence gate** of an instance. Every operation that changes the resource on behalf of a
/// branch — prepare, commit, rollback — holds it shared from *before* its fence check until it
/// is done; a fence holds it exclusively while it raises the epoch. So an operation that passed
/// its fence check either finishes before a fence returns, or starts after it and is checked
/// against the new epoch: after `fence(E)` returns, nothing of an epoch below E changes the
/// resource. tokio's lock is fair: operations that arrive while a fence waits queue behind it.
/// A fence waits for the longest operation in flight (a prepare syncing a large staged file).
pub(crate) type Gate = tokio::sync::RwLock<()>;

/// Locks `mutex`, taking over a poisoned one (see the caveats).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
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
            "mine"
        }

        fn state_mutex(&self) -> &Mutex<Table> {
            &self.0
        }
    }

    fn fatal(resource: &str) -> Result<()> {
        Err(ResourceError::Fatal {
            resource: resource.to_string(),
            message: "sync failed".to_string(),
        })
    }

    #[test]
    fn an_instance_is_poisoned_by_its_own_fatal_errors_only() {
        let at = At(Mutex::default());
        assert!(at.check(fatal("other")).is_err());
        let unavailable = Err::<(), _>(at.unavailable("later".to_string()));
        assert!(at.check(unavailable).is_err());
        assert!(
            at.fence_epoch().is_ok(),
            "not poisoned by another's failure"
        );
        assert!(at.check(fatal("mine")).is_err());
        assert!(matches!(at.fence_epoch(), Err(ResourceError::Fatal { .. })));
    }
}
