//! Pauses that tests arm inside a resource's operations, to run a race deterministically.
//!
//! A test arms a pause for one xid ([`Pauses::arm_prepare`]); the resource's prepare of that
//! xid, once past its fence check and before anything of it is durable, calls
//! [`Pauses::at_prepare`], which waits there until the test releases the pause (or
//! [`crate::testing::PAUSE_MS_MAX`] passes). The conformance suite races a fence against a
//! prepare this way ([`crate::testing::fence_covers_a_prepare_in_flight`]).
//!
//! A test may also arm a **fail point** in the next replay ([`Pauses::arm_replay_failure`]):
//! the replay applies part of its redo and then stops with an error, as a process killed there
//! would, leaving what it applied in place and the applied LSN where it was.
//!
//! # Implementation caveats
//!
//! * Unarmed, a pause point costs one uncontended mutex lock per prepare.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Xid;
use crate::internal::instance::lock;
use crate::testing::Pause;

/// The armed pauses of one instance.
#[derive(Default)]
pub(crate) struct Pauses {
    prepare: Mutex<Vec<(Xid, Pause)>>,
    replay_fails: AtomicBool,
}

impl Pauses {
    /// Arms a pause in the next prepare of `xid`.
    pub(crate) fn arm_prepare(&self, xid: &Xid) -> Pause {
        let pause = Pause::new();
        lock(&self.prepare).push((*xid, pause.clone()));
        pause
    }

    /// Waits at the pause armed for the prepare of `xid`, if there is one (once).
    pub(crate) async fn at_prepare(&self, xid: &Xid) {
        let armed = {
            let mut armed = lock(&self.prepare);
            let at = armed.iter().position(|(x, _)| x == xid);
            at.map(|at| armed.swap_remove(at).1)
        };
        if let Some(pause) = armed {
            pause.wait_here().await;
        }
    }

    /// Arms the fail point of the next replay.
    pub(crate) fn arm_replay_failure(&self) {
        self.replay_fails.store(true, Ordering::Release);
    }

    /// Whether the replay calling this (midway) must stop here: once per arming.
    pub(crate) fn replay_fails_here(&self) -> bool {
        self.replay_fails.swap(false, Ordering::AcqRel)
    }
}
