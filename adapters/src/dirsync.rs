//! Coalesced directory syncs, for the files resource.
//!
//! Concurrent branches change the same few directories (the target directories of their files,
//! the private area's `staging/`) and each must sync the directory before it acknowledges. One `fsync` of a directory makes durable every change made to it before the
//! `fsync` started, so callers that change the same directory at about the same time can share
//! one: [`DirSync::sync`] is a classic sync coalescer, one slot per directory path.
//!
//! * A caller that has just changed `dir` takes a ticket `t = ++requested`. If nobody is syncing
//!   `dir`, it becomes the syncer: it notes `target = requested`, runs the real `fsync` without
//!   the lock, then sets `completed = max(completed, target)` and wakes the waiters. If a sync is
//!   running, it waits until `completed >= t`, or until the running sync is over without covering
//!   it (its ticket was taken after that sync started), and then becomes the next syncer, whose
//!   one `fsync` covers every caller that queued behind the previous one.
//! * **The guarantee**: a caller returns `Ok` only after an `fsync` of `dir` that *started after
//!   its ticket was taken* — so after its change — completed successfully. `target` is read
//!   under the lock before the `fsync` starts, so every ticket up to `target` predates it.
//! * **A failed `fsync` is sticky**: it is returned as [`ResourceError::Fatal`] to every caller
//!   it was meant to cover, and from then on every call, for any directory, fails at once
//!   without syncing — never retried as if it were fine (after a failed `fsync`, a later one may
//!   succeed although the change is lost). The files resource poisons itself on that `Fatal`.
//!   Failing to *open* the directory is not a sync: only the caller that tried gets the error
//!   and a waiter tries again itself.
//! * **Bounded**: a slot exists only while some caller is inside [`DirSync::sync`] for its
//!   directory (the last one out removes it), so the map holds at most as many entries as there
//!   are threads syncing at once (the blocking pool's size).
//! * Waiting blocks the thread on a `Condvar`: call it only on a blocking thread (tokio's
//!   blocking pool, or before the resource is shared), never on an async worker.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::ResourceError;

/// Coalesces the directory syncs of one resource instance.
pub(crate) struct DirSync {
    /// The resource's name, for errors.
    name: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// One slot per directory with a caller inside [`DirSync::sync`].
    dirs: HashMap<PathBuf, Slot>,
    /// The first failed `fsync`: every later call fails with it.
    failed: Option<String>,
}

struct Slot {
    /// The last ticket handed out.
    requested: u64,
    /// Every ticket up to this one is covered by a completed `fsync`.
    completed: u64,
    /// Whether a caller is running the `fsync` now.
    syncing: bool,
    /// Callers inside [`DirSync::sync`] for this directory, the syncer included.
    users: usize,
    /// Notified when a sync of this directory ends (with the state lock).
    done: Arc<Condvar>,
}

/// Why the real sync of a directory did not succeed.
pub(crate) enum SyncFailure {
    /// The directory could not be opened: nothing was synced, nothing is known to be lost.
    Open(io::Error),
    /// The `fsync` itself failed: what the directory holds on disk is unknown.
    Sync(io::Error),
}

impl Slot {
    fn new() -> Slot {
        Slot {
            requested: 0,
            completed: 0,
            syncing: false,
            users: 0,
            done: Arc::new(Condvar::new()),
        }
    }
}

impl DirSync {
    pub(crate) fn new(name: &str) -> DirSync {
        DirSync {
            name: name.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    /// Makes durable every change made to `dir` before this call; see the module docs.
    pub(crate) fn sync(&self, dir: &Path) -> Result<(), ResourceError> {
        self.sync_with(dir, fsync_dir)
    }

    /// Syncs every directory of `dirs`, several at a time (at most
    /// [`crate::internal::io::SYNC_THREADS_MAX`] threads), like
    /// [`crate::internal::io::sync_files`]: concurrent syncs share the file system's journal
    /// commits. The first failure is returned once every thread has finished.
    pub(crate) fn sync_all<'a>(
        &self,
        dirs: impl IntoIterator<Item = &'a PathBuf>,
    ) -> Result<(), ResourceError> {
        let dirs: Vec<&PathBuf> = dirs.into_iter().collect();
        if dirs.len() <= 1 {
            return dirs.into_iter().try_for_each(|dir| self.sync(dir));
        }
        let threads = dirs.len().min(crate::internal::io::SYNC_THREADS_MAX);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|k| {
                    let dirs = &dirs;
                    scope.spawn(move || {
                        dirs.iter()
                            .skip(k)
                            .step_by(threads)
                            .try_for_each(|dir| self.sync(dir))
                    })
                })
                .collect();
            let mut first = Ok(());
            for worker in workers {
                let result = worker
                    .join()
                    .unwrap_or_else(|_| Err(self.fatal("a directory sync thread panicked".into())));
                if first.is_ok() {
                    first = result;
                }
            }
            first
        })
    }

    /// [`DirSync::sync`] with `fsync` as the real sync (tests count and fail it).
    pub(crate) fn sync_with(
        &self,
        dir: &Path,
        fsync: impl Fn(&Path) -> Result<(), SyncFailure>,
    ) -> Result<(), ResourceError> {
        let mut st = self.lock();
        if let Some(cause) = &st.failed {
            return Err(self.fatal(format!(
                "sync {} refused: an earlier sync failed ({cause})",
                dir.display()
            )));
        }
        let slot = slot_of(&mut st, dir);
        slot.users += 1;
        slot.requested += 1;
        let ticket = slot.requested;
        let result = loop {
            if slot_of(&mut st, dir).completed >= ticket {
                break Ok(());
            }
            if let Some(cause) = &st.failed {
                break Err(self.fatal(format!("sync {} failed: {cause}", dir.display())));
            }
            let slot = slot_of(&mut st, dir);
            if slot.syncing {
                let done = slot.done.clone();
                st = done.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            slot.syncing = true;
            let target = slot.requested;
            drop(st);
            let outcome = fsync(dir);
            st = self.lock();
            let slot = slot_of(&mut st, dir);
            slot.syncing = false;
            slot.done.notify_all();
            match outcome {
                Ok(()) => slot.completed = slot.completed.max(target),
                Err(SyncFailure::Sync(e)) => {
                    let cause = format!("sync {}: {e}", dir.display());
                    st.failed.get_or_insert(cause);
                }
                // Not a sync: the waiters try again themselves.
                Err(SyncFailure::Open(e)) => {
                    break Err(ResourceError::io(&self.name, "open directory", dir, &e));
                }
            }
        };
        let slot = slot_of(&mut st, dir);
        slot.users -= 1;
        if slot.users == 0 {
            st.dirs.remove(dir);
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fatal(&self, message: String) -> ResourceError {
        ResourceError::Fatal {
            resource: self.name.clone(),
            message,
        }
    }
}

/// The slot of `dir` (present while a caller is inside [`DirSync::sync`] for it).
fn slot_of<'s>(st: &'s mut State, dir: &Path) -> &'s mut Slot {
    st.dirs.entry(dir.to_path_buf()).or_insert_with(Slot::new)
}

/// The real sync: opens `dir` and `fsync`s it.
fn fsync_dir(dir: &Path) -> Result<(), SyncFailure> {
    File::open(dir)
        .map_err(SyncFailure::Open)?
        .sync_all()
        .map_err(SyncFailure::Sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    /// Every caller returns only after a sync that started after its change, and concurrent
    /// callers share syncs.
    #[test]
    fn a_caller_returns_after_a_sync_that_started_after_its_change() {
        let syncs = Arc::new(DirSync::new("t"));
        let changes = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let fsyncs = Arc::new(AtomicUsize::new(0));
        let callers = 16;
        let rounds = 20;
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let (syncs, changes, durable, fsyncs) = (
                    syncs.clone(),
                    changes.clone(),
                    durable.clone(),
                    fsyncs.clone(),
                );
                std::thread::spawn(move || {
                    for _ in 0..rounds {
                        let mine = changes.fetch_add(1, Ordering::SeqCst) + 1;
                        syncs
                            .sync_with(Path::new("/d"), |_| {
                                let seen = changes.load(Ordering::SeqCst);
                                fsyncs.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(2));
                                durable.fetch_max(seen, Ordering::SeqCst);
                                Ok(())
                            })
                            .unwrap();
                        assert!(durable.load(Ordering::SeqCst) >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let fsyncs = fsyncs.load(Ordering::SeqCst);
        assert!(fsyncs < callers * rounds, "{fsyncs} syncs: none shared");
        assert!(syncs.lock().dirs.is_empty(), "idle slots are removed");
    }

    #[test]
    fn a_failed_sync_fails_its_waiters_and_every_later_call() {
        let syncs = Arc::new(DirSync::new("t"));
        let fsyncs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (syncs, fsyncs) = (syncs.clone(), fsyncs.clone());
                std::thread::spawn(move || {
                    syncs.sync_with(Path::new("/d"), |_| {
                        fsyncs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                        Err(SyncFailure::Sync(io::Error::other("EIO")))
                    })
                })
            })
            .collect();
        for t in threads {
            let result = t.join().unwrap();
            assert!(
                matches!(result, Err(ResourceError::Fatal { .. })),
                "{result:?}"
            );
        }
        assert_eq!(
            fsyncs.load(Ordering::SeqCst),
            1,
            "a failed sync is not retried"
        );
        let later = syncs.sync_with(Path::new("/other"), |_| {
            fsyncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        assert!(
            matches!(later, Err(ResourceError::Fatal { .. })),
            "{later:?}"
        );
        assert_eq!(fsyncs.load(Ordering::SeqCst), 1);
        assert!(syncs.lock().dirs.is_empty());
    }

    #[test]
    fn a_directory_that_cannot_be_opened_fails_only_that_call() {
        let syncs = DirSync::new("t");
        let missing = syncs.sync(Path::new("/nonexistent/concord-dirsync"));
        assert!(
            !matches!(missing, Err(ResourceError::Fatal { .. }) | Ok(())),
            "{missing:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        syncs.sync(dir.path()).unwrap();
    }
}
