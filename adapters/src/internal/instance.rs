//! The state checks every resource makes on every call: poisoned?, fenced?
//!
//! A resource keeps its in-memory state behind one `std::sync::Mutex` and stops after its
//! first fatal failure (a failed sync, damage): the failure **poisons** the instance, and every
//! later call fails with [`ResourceError::Fatal`] naming the first cause, until the process
//! restarts and the resource recovers from disk (STYLE.md 11). It also refuses a branch whose
//! epoch is below its fence epoch. Both checks, and the error constructors that name the
//! resource, are the same for every resource, so they are the default methods of
//! [`Instance`], which a resource's `Inner` implements by saying where its name and state
//! are; its state says where its poison and fence are through [`InstanceState`].
//!
//! # Implementation caveats
//!
//! * A poisoned `std::sync::Mutex` (a panic while it was held) is taken over as it is: the
//!   state transitions under it are short and do no I/O, and a panic is a bug either way.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::internal::io::blocking;
use crate::{Epoch, ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// The part of a resource's state the shared checks read.
pub(crate) trait InstanceState {
    /// The cause of the first fatal failure, once there was one.
    fn poisoned(&mut self) -> &mut Option<String>;
    /// The cause of the first fatal failure, read-only.
    fn poison(&self) -> Option<&str>;
    /// The fence epoch: a branch of a lower epoch is refused.
    fn fence(&self) -> Epoch;
    /// Records a raised fence epoch (after it is durable).
    fn set_fence(&mut self, epoch: Epoch);
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
        match st.poison() {
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

    /// Poisons the instance when `result` is a fatal error.
    fn check<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(ResourceError::Fatal { message, .. }) = &result {
            let mut st = self.state();
            let poisoned = st.poisoned();
            if poisoned.is_none() {
                tracing::error!(resource = %self.name(), %message, "{} resource poisoned; restart to recover", Self::KIND);
                *poisoned = Some(message.clone());
            }
        }
        result
    }

    /// Refuses `xid` when its epoch is below the fence.
    fn not_fenced(&self, st: &Self::State, xid: &Xid) -> Result<()> {
        if xid.epoch < st.fence() {
            return Err(self.fenced(xid, st.fence()));
        }
        Ok(())
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

/// Locks `mutex`, taking over a poisoned one (see the caveats).
/// `Resource::fence` of a resource that keeps its fence epoch in a file: one fence at a time
/// (`fencing`), never lowered, the file written by `write` on the blocking pool (a failure
/// poisons the instance) before the state takes the new epoch.
pub(crate) async fn raise_fence<I>(
    inner: &Arc<I>,
    fencing: &tokio::sync::Mutex<()>,
    task: &'static str,
    epoch: Epoch,
    write: fn(&I, Epoch) -> Result<()>,
) -> Result<()>
where
    I: Instance + Send + Sync + 'static,
{
    let _fencing = fencing.lock().await;
    let current = inner.usable_state(|st| st.fence())?;
    if epoch <= current {
        return Ok(());
    }
    let worker = Arc::clone(inner);
    let written = blocking(inner.name(), task, move || write(&worker, epoch)).await;
    inner.check(written)?;
    inner.state().set_fence(epoch);
    tracing::info!(resource = %inner.name(), from = %current, to = %epoch, "fence raised");
    Ok(())
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
