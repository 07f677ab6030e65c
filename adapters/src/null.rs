//! The null resource: branches that do no work. **For benchmarks only.**
//!
//! `concord bench commit --resource null` uses it to measure the coordinator's own cost: every
//! branch votes to commit with an empty redo (so every transaction journals a decision), and
//! commit and rollback do nothing. It keeps no durable state — a prepared branch is forgotten by a
//! crash — so it does not honour the Resource contract's durability promises and must never hold
//! real data. It is not offered in `concord.toml`.

use std::any::Any;
use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use crate::xid::XidBuildHasher;
use crate::{Epoch, Lsn, Resource, ResourceError, Vote, Xid};

/// A resource whose branches do nothing; see the module docs.
pub struct NullResource {
    name: String,
    /// Bytes of redo each branch votes with (zeros; nothing replays it).
    redo_bytes: usize,
    state: Mutex<NullState>,
}

#[derive(Default)]
struct NullState {
    prepared: HashSet<Xid, XidBuildHasher>,
    fence: Epoch,
    applied: Lsn,
}

impl NullResource {
    /// A null resource named `name`.
    pub fn new(name: &str) -> NullResource {
        NullResource::with_redo_bytes(name, 0)
    }

    /// A null resource whose branches vote with `redo_bytes` of redo, so that the journal's
    /// records are the size a real resource's would be.
    pub fn with_redo_bytes(name: &str, redo_bytes: usize) -> NullResource {
        NullResource {
            name: name.to_string(),
            redo_bytes,
            state: Mutex::new(NullState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, NullState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Resource for NullResource {
    fn name(&self) -> &str {
        &self.name
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        let current = self.state().fence;
        if xid.epoch < current {
            return Err(ResourceError::Fenced {
                resource: self.name.clone(),
                offered: xid.epoch,
                current,
            });
        }
        Ok(())
    }

    async fn prepare(&self, xid: &Xid) -> Result<Vote, ResourceError> {
        self.state().prepared.insert(*xid);
        Ok(Vote::Commit {
            redo: vec![0; self.redo_bytes],
        })
    }

    async fn commit(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.state().prepared.remove(xid);
        Ok(())
    }

    async fn rollback(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.state().prepared.remove(xid);
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<Xid>, ResourceError> {
        Ok(self.state().prepared.iter().copied().collect())
    }

    async fn fence(&self, epoch: Epoch) -> Result<(), ResourceError> {
        let mut state = self.state();
        state.fence = state.fence.max(epoch);
        Ok(())
    }

    async fn fence_epoch(&self) -> Result<Epoch, ResourceError> {
        Ok(self.state().fence)
    }

    async fn replay(&self, _redo: &[u8], lsn: Lsn) -> Result<(), ResourceError> {
        let mut state = self.state();
        state.applied = state.applied.max(lsn);
        Ok(())
    }

    async fn applied_lsn(&self) -> Result<Lsn, ResourceError> {
        Ok(self.state().applied)
    }
}
