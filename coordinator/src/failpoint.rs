//! Named fail points on the commit path, for crash tests; compiled only with the cargo feature
//! `failpoints`.
//!
//! A crash test arms one point by name in the environment (`CONCORD_FAILPOINT=name` or
//! `name:N` to fire at the N-th hit, counted across the process). When the armed point is hit,
//! the process prints `FAILPOINT name` on standard error and freezes the calling thread; the test
//! harness, reading standard error, kills the process there with SIGKILL. Unarmed, a point costs
//! one relaxed atomic load.
//!
//! The points, in commit-path order: `after_prepare` (a branch voted), `decision_appended`
//! (the decision is queued in the journal, not yet durable), `decision_durable`, `between_commits`
//! (a branch has just committed in phase 2; the others of its transaction may not have),
//! `before_end`. A one-phase commit passes `after_prepare` (its branch is ready, not durable),
//! `decision_appended` and `decision_durable` (its `OnePhase` record, before the branch's
//! commit), then `one_phase_committed` (the branch answered its commit; `End` or `Abort` not yet
//! appended).
//!
//! # Which builds have them
//!
//! Without the feature `failpoints` of `concord-coordinator`, [`hit`] is an empty inline
//! function and `CONCORD_FAILPOINT` is never read: a production build (`cargo build --release
//! -p concord-cli`) ignores the variable entirely. [`enabled`] says which kind of build this is.
//! The crash tests get the feature without anyone asking: `concord-cli` and
//! `concord-participant` name the coordinator as a dev-dependency with `failpoints` on, and
//! cargo (resolver 3) unifies a dev-dependency's features into every target it builds for
//! `cargo test`, the `concord` binary the tests run included. Both crates also have a feature
//! `failpoints` of their own that forwards to this one, for a build that needs fail points
//! outside `cargo test` (`cargo build -p concord-cli --features failpoints`).
//!
//! # Implementation caveats
//!
//! * One point is armed per process, read once at its first hit; re-arming needs a new
//!   process, which is what a crash test starts anyway.

/// Every fail point, in commit-path order.
pub const POINTS: [&str; 6] = [
    "after_prepare",
    "decision_appended",
    "decision_durable",
    "between_commits",
    "before_end",
    "one_phase_committed",
];

/// Whether this build has fail points (the feature `failpoints`): when `false`, [`hit`] does
/// nothing and `CONCORD_FAILPOINT` is ignored.
pub fn enabled() -> bool {
    cfg!(feature = "failpoints")
}

/// Hits the fail point `name`: freezes this thread if it is the armed point's firing hit.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    armed::hit(name)
}

/// Hits the fail point `name`: without the feature `failpoints`, nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Armed {
        name: String,
        at_hit: u64,
        hits: AtomicU64,
    }

    fn armed() -> Option<&'static Armed> {
        static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let spec = std::env::var("CONCORD_FAILPOINT").ok()?;
                let (name, at_hit) = match spec.split_once(':') {
                    Some((name, n)) => (name.to_string(), n.parse().ok()?),
                    None => (spec, 1),
                };
                Some(Armed {
                    name,
                    at_hit,
                    hits: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub(super) fn hit(name: &str) {
        let Some(armed) = armed() else { return };
        if armed.name != name {
            return;
        }
        let n = armed.hits.fetch_add(1, Ordering::Relaxed) + 1;
        if n != armed.at_hit {
            return;
        }
        eprintln!("FAILPOINT {name}");
        loop {
            std::thread::park();
        }
    }
}
