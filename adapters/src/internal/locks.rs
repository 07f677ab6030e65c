//! Waiting for a lock another branch holds.
//!
//! A branch locks what it writes (a path and an intent on its ancestors in the files resource,
//! a key in the kv resource) until it is resolved, so that the journal order is the commit
//! order (docs/design.md "Ordering"). What a lock covers is each resource's; how a second writer
//! waits is the same: it tries, and while another branch holds the lock it waits for a
//! release (the resource's `released` [`Notify`], woken whenever a branch releases its locks)
//! and tries again, for at most `lock_wait_ms_max`, then fails with
//! [`ResourceError::Conflict`] naming the item and the holder.
//!
//! # Implementation caveats
//!
//! * Every release wakes every waiter (`notify_waiters`); each tries again. There is no queue,
//!   so a waiter may be overtaken by a later one (no fairness).

use std::time::Duration;

use tokio::sync::Notify;

use crate::{ResourceError, Xid};

/// Calls `attempt` until it takes the lock (`Ok(None)`) or fails, waiting for `released` while
/// another branch holds it (`Ok(Some(holder))`), for at most `wait_ms_max` in all; then a
/// [`ResourceError::Conflict`] of the resource `name` on `what()`.
pub(crate) async fn wait_for_lock(
    name: &str,
    released: &Notify,
    wait_ms_max: u64,
    what: impl FnOnce() -> String,
    mut attempt: impl FnMut() -> Result<Option<Xid>, ResourceError>,
) -> Result<(), ResourceError> {
    let wait = Duration::from_millis(wait_ms_max);
    let start = tokio::time::Instant::now();
    loop {
        // Registered before the attempt, so a release between the attempt and the wait wakes it.
        let mut notified = std::pin::pin!(released.notified());
        notified.as_mut().enable();
        let Some(holder) = attempt()? else {
            return Ok(());
        };
        let waited = start.elapsed();
        if waited >= wait {
            return Err(ResourceError::Conflict {
                resource: name.to_string(),
                what: what(),
                holder: holder.to_string(),
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            });
        }
        let _ = tokio::time::timeout(wait - waited, notified).await;
    }
}
