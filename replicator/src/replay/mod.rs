//! Replay: applying the committed transactions of the standby's journal to its resources.
//!
//! The pure [`machine::ReplayMachine`] decides what to apply; [`Replay::run`] carries it out.
//! It reads the standby's journal from its restart point on (records as they become durable:
//! the receiver appends them), feeds the machine, and runs each batch the machine hands out
//! through [`adapters::Resource::replay_batch`], one task per resource at a time, so resources
//! apply in parallel. A resource that answers "unavailable" (or "in doubt") gets its batch
//! again after a backoff; one that refuses (a malformed redo, a table that does not match its
//! row image) stops replay of that resource only, with the reason in the logs (ERROR) and in
//! the status, until a restart after the cause is fixed; one that is unusable until a restart
//! (a failed sync) stops replay altogether, and the standby process exits so that its restart
//! recovers.
//!
//! **Exactly once.** Each resource stores its applied LSN atomically with the data of each
//! batch, and the machine skips what a resource already applied; so replay killed at any
//! moment resumes with no row twice, no mail twice, no half file. The restart point — the
//! replayed LSN: every committed transaction up to it is applied everywhere — is written to
//! `data_dir/replication/replay_floor` about once a second (temp file, sync, rename), so that a
//! restart does not read the whole journal again; a stale value only costs reading more.
//!
//! **Retention.** Once a second, the standby's journal segments below the restart point (and
//! below the first record of any transaction the primary has not finished: a promoted standby
//! needs them) are removed; every [`BLOB_COLLECT_MS`] each resource removes the blobs no
//! retained record names.
//!
//! # Implementation caveats
//!
//! * Reading ahead stops while [`READ_AHEAD_BYTES_MAX`] of redo waits in the queues.
//! * A record kind this program does not know stops replay (run the same version on both
//!   sites); the receiver goes on journaling.

pub mod machine;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use adapters::{ErrorClass, Resource, ResourceError};
use coordinator::ledger::Ledger;
use coordinator::record::CoordRecord;
use coordinator::retention::JournalBlobs;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use journal::{Journal, JournalReader, Lsn};
use tokio::sync::watch;

use crate::error::ReplicationError;
use crate::standby::PendingBlobs;
use machine::{Batch, BatchLimits, ReplayMachine, ResourceBacklog};

/// Most redo bytes waiting in the queues before replay stops reading ahead.
pub const READ_AHEAD_BYTES_MAX: usize = 64 << 20;
/// Most records read from the journal in one pass.
pub const READ_RECORDS_MAX: usize = 4096;
/// How often the restart point is written and the journal trimmed (milliseconds).
pub const CHECKPOINT_MS: u64 = 1_000;
/// How often each resource collects the blobs no retained record names (milliseconds).
pub const BLOB_COLLECT_MS: u64 = 10_000;
/// Deadline of one batch (milliseconds): past it, the resource counts as stuck and the standby
/// stops (its restart replays from the resource's applied LSN). The batch is never handed out
/// again while its first attempt may still be running.
pub const BATCH_TIMEOUT_MS: u64 = 600_000;
/// First and last backoff after a resource was unavailable (milliseconds).
pub const RETRY_BACKOFF_MS: (u64, u64) = (50, 5_000);
/// The restart point's file, under `data_dir/replication/`.
pub const FLOOR_FILE: &str = "replay_floor";

/// What replay reports for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct ReplayView {
    /// Every committed transaction up to it is applied everywhere.
    pub replayed_lsn: Lsn,
    /// The last record read.
    pub scanned_lsn: Lsn,
    /// Transactions not applied everywhere.
    pub transactions: u64,
    /// Redo bytes waiting.
    pub bytes: u64,
    /// The oldest transaction not applied everywhere.
    pub oldest: Option<machine::Oldest>,
    /// Per resource.
    pub resources: BTreeMap<String, ResourceBacklog>,
    /// Why replay stopped altogether, if it did.
    pub stopped: Option<String>,
}

/// Shared with status readers.
pub type SharedView = Arc<Mutex<ReplayView>>;

/// The replay driver of a standby.
pub struct Replay {
    journal: Arc<Journal>,
    resources: BTreeMap<String, Arc<dyn Resource>>,
    state_dir: PathBuf,
    view: SharedView,
    limits: BatchLimits,
    pending: PendingBlobs,
}

/// What finished: a batch (resource, result) or a retry delay.
enum Done {
    Batch(String, Result<(), ResourceError>),
    RetryDue(String),
}

impl Replay {
    /// A driver replaying `journal` into `resources`, keeping its restart point in
    /// `state_dir`.
    pub fn new(
        journal: Arc<Journal>,
        resources: Vec<Arc<dyn Resource>>,
        state_dir: &Path,
    ) -> Replay {
        Replay {
            journal,
            resources: resources
                .into_iter()
                .map(|r| (r.name().to_string(), r))
                .collect(),
            state_dir: state_dir.to_path_buf(),
            view: SharedView::default(),
            limits: BatchLimits::default(),
            pending: PendingBlobs::default(),
        }
    }

    /// Blob collection keeps the blobs in `pending` too: those the receiver put for records
    /// not yet durable ([`crate::standby::Receiver::pending_blobs`]).
    pub fn keep_pending(mut self, pending: PendingBlobs) -> Replay {
        self.pending = pending;
        self
    }

    /// The status readers' view.
    pub fn view(&self) -> SharedView {
        Arc::clone(&self.view)
    }

    /// Replays until `stop` turns true. Returns an error only when replay cannot go on at all
    /// (the journal cannot be read, a record cannot be understood).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), ReplicationError> {
        let mut applied = BTreeMap::new();
        for (name, resource) in &self.resources {
            applied.insert(name.clone(), resource.applied_lsn().await?);
        }
        let floor = read_floor(&self.state_dir)?
            .min(self.journal.durable_lsn())
            .max(self.journal.oldest_lsn().prev());
        tracing::info!(from = floor.next().0, "replay starts after lsn {floor}");
        let mut machine = ReplayMachine::new(applied, floor, self.limits);
        let mut ledger = Ledger::new();
        let mut running = FuturesUnordered::new();
        let mut backoff: BTreeMap<String, u64> = BTreeMap::new();
        let mut last_checkpoint = Instant::now();
        let mut last_collect = Instant::now();
        let mut written_floor = floor;
        let mut follower = None;
        let mut collector: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            let read_more = machine.queued_bytes() < READ_AHEAD_BYTES_MAX
                && self.journal.durable_lsn() > machine.scanned();
            if read_more && let Err(e) = self.read(&mut machine, &mut ledger, &mut follower).await {
                self.stop_all(&e);
                return Err(e);
            }
            for batch in machine.next_batches() {
                running.push(self.apply(batch));
            }
            self.publish(&machine);
            if last_checkpoint.elapsed() >= Duration::from_millis(CHECKPOINT_MS) {
                last_checkpoint = Instant::now();
                written_floor = self
                    .checkpoint(&machine, &mut ledger, written_floor)
                    .await?;
            }
            let collecting = collector.as_ref().is_some_and(|c| !c.is_finished());
            if !collecting && last_collect.elapsed() >= Duration::from_millis(BLOB_COLLECT_MS) {
                // In a task of its own: it reads the retained journal, which must not hold up
                // replay.
                last_collect = Instant::now();
                collector = Some(tokio::spawn(collect_blobs(
                    Arc::clone(&self.journal),
                    self.resources.values().cloned().collect(),
                    Arc::clone(&self.pending),
                )));
            }
            let caught_up = !read_more || machine.queued_bytes() >= READ_AHEAD_BYTES_MAX;
            let more = self.journal.wait_durable(machine.scanned().next());
            tokio::select! {
                done = running.next(), if !running.is_empty() => {
                    if let Some(done) = done
                        && let Some(fatal) = self.finished(done, &mut machine, &mut backoff, &mut running)
                    {
                        self.stop_all(&fatal);
                        return Err(fatal);
                    }
                }
                _ = more, if caught_up && machine.queued_bytes() < READ_AHEAD_BYTES_MAX => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if caught_up => {}
                // More records are durable: read them at once.
                _ = tokio::task::yield_now(), if !caught_up => {}
                _ = stop.changed() => {}
            }
        }
        if let Some(collector) = collector {
            collector.abort();
            let _ = collector.await;
        }
        // Let what is in flight finish: it is exact either way, but finishing is tidier.
        while let Some(done) = running.next().await {
            if let Done::Batch(name, Ok(())) = done {
                machine.applied(&name);
            }
        }
        self.publish(&machine);
        write_floor(&self.state_dir, machine.replayed_lsn())?;
        Ok(())
    }

    /// Reads the next records (up to [`READ_RECORDS_MAX`]) into the machine and the ledger.
    async fn read(
        &self,
        machine: &mut ReplayMachine,
        ledger: &mut Ledger,
        follower: &mut Option<JournalReader>,
    ) -> Result<(), ReplicationError> {
        // One reader follows the journal (a new one would read its segment again from the
        // start to check the chain).
        let mut reader = match follower.take() {
            Some(mut reader) => {
                self.journal.follow(&mut reader);
                reader
            }
            None => self.journal.read_from(machine.scanned().next())?,
        };
        let (records, reader) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for record in reader.by_ref().take(READ_RECORDS_MAX) {
                out.push(record?);
            }
            Ok::<_, journal::JournalError>((out, reader))
        })
        .await
        .map_err(|e| ReplicationError::Protocol(format!("the journal reader failed: {e}")))??;
        *follower = Some(reader);
        for record in records {
            let lsn = record.lsn;
            let decoded = CoordRecord::decode(record.kind, &record.payload).map_err(|e| {
                ReplicationError::Malformed {
                    lsn,
                    what: format!(
                        "{e}: replay stopped; run the same concord version as the primary"
                    ),
                }
            })?;
            ledger.apply(lsn, decoded.clone());
            machine
                .record(lsn, decoded)
                .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
        }
        Ok(())
    }

    fn apply(&self, batch: Batch) -> futures_util::future::BoxFuture<'static, Done> {
        let resource = self.resources.get(&batch.resource).map(Arc::clone);
        Box::pin(async move {
            let Some(resource) = resource else {
                let e = ResourceError::rejected(&batch.resource, "not configured on this standby");
                return Done::Batch(batch.resource, Err(e));
            };
            let deadline = Duration::from_millis(BATCH_TIMEOUT_MS);
            let result = match tokio::time::timeout(deadline, resource.replay_batch(&batch.entries))
                .await
            {
                Ok(result) => result,
                // The batch's work may go on in the resource (on the blocking pool): it must
                // not be handed out again beside it, so the standby stops, and its restart
                // replays from the resource's applied LSN.
                Err(_) => Err(ResourceError::Fatal {
                    resource: batch.resource.clone(),
                    message: format!(
                        "replay of a batch took longer than {BATCH_TIMEOUT_MS} ms: the resource is stuck"
                    ),
                }),
            };
            Done::Batch(batch.resource, result)
        })
    }

    /// Feeds a finished batch (or retry delay) to the machine; returns the error that stops
    /// the process (a resource that is unusable until a restart).
    fn finished(
        &self,
        done: Done,
        machine: &mut ReplayMachine,
        backoff: &mut BTreeMap<String, u64>,
        running: &mut FuturesUnordered<futures_util::future::BoxFuture<'static, Done>>,
    ) -> Option<ReplicationError> {
        match done {
            Done::Batch(name, Ok(())) => {
                backoff.remove(&name);
                machine.applied(&name);
            }
            Done::Batch(_, Err(e)) if e.class() == ErrorClass::Fatal => {
                return Some(ReplicationError::Resource(e));
            }
            Done::Batch(name, Err(e))
                if matches!(e.class(), ErrorClass::Retryable | ErrorClass::InDoubt) =>
            {
                let delay = backoff
                    .get(&name)
                    .map_or(RETRY_BACKOFF_MS.0, |d| (d * 2).min(RETRY_BACKOFF_MS.1));
                backoff.insert(name.clone(), delay);
                tracing::warn!(resource = %name, error = %e, "replay of a batch failed; retrying in {delay} ms");
                running.push(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    Done::RetryDue(name)
                }));
            }
            Done::Batch(name, Err(e)) => {
                tracing::error!(resource = %name, error = %e, "replay of resource {name} stopped: fix the cause and restart the standby");
                machine.failed(&name, Some(e.to_string()));
            }
            Done::RetryDue(name) => machine.failed(&name, None),
        }
        None
    }

    /// Writes the restart point and trims the journal below it. The restart point is the
    /// replayed LSN, or the record before the first record of a transaction the primary has
    /// not finished when that is lower, so that a restart rebuilds the ledger with those
    /// transactions and keeps their records (a promoted standby needs them).
    async fn checkpoint(
        &self,
        machine: &ReplayMachine,
        ledger: &mut Ledger,
        written: Lsn,
    ) -> Result<Lsn, ReplicationError> {
        let replayed = machine.replayed_lsn();
        let start = ledger
            .pinned_from()
            .map_or(replayed, |p| p.prev().min(replayed));
        if start == written {
            return Ok(written);
        }
        let dir = self.state_dir.clone();
        let journal = Arc::clone(&self.journal);
        tokio::task::spawn_blocking(move || {
            write_floor(&dir, start)?;
            journal.remove_segments_below(start.next())?;
            // As the coordinator's checkpoint does: finished records do not wait in a filling
            // segment.
            journal.request_roll(coordinator::retention::ROLL_BYTES_MIN);
            Ok::<_, ReplicationError>(())
        })
        .await
        .map_err(|e| ReplicationError::Protocol(format!("the checkpoint task failed: {e}")))??;
        ledger.trim_below(self.journal.oldest_lsn());
        Ok(start)
    }

    fn publish(&self, machine: &ReplayMachine) {
        let mut view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        view.replayed_lsn = machine.replayed_lsn();
        view.scanned_lsn = machine.scanned();
        view.transactions = machine.pending_transactions();
        view.bytes = machine.queued_bytes() as u64;
        view.oldest = machine.oldest();
        view.resources = machine.resource_lag();
    }

    fn stop_all(&self, e: &ReplicationError) {
        tracing::error!(error = %e, "replay stopped");
        let mut view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        view.stopped = Some(e.to_string());
    }
}

/// The restart point in `dir` (`Lsn::ZERO` when none was written).
pub fn read_floor(dir: &Path) -> Result<Lsn, ReplicationError> {
    let path = dir.join(FLOOR_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map(Lsn)
            .map_err(|e| ReplicationError::State {
                what: "read the replay restart point",
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Lsn(0)),
        Err(source) => Err(ReplicationError::State {
            what: "read the replay restart point",
            path,
            source,
        }),
    }
}

/// Writes the restart point to `dir` (temp file, sync, rename; the directory is not synced:
/// an older value after a crash only costs reading more).
pub fn write_floor(dir: &Path, lsn: Lsn) -> Result<(), ReplicationError> {
    use std::io::Write;
    let path = dir.join(FLOOR_FILE);
    let tmp = dir.join(format!("{FLOOR_FILE}.tmp"));
    let state = |what: &'static str| {
        let path = path.clone();
        move |source| ReplicationError::State { what, path, source }
    };
    std::fs::create_dir_all(dir).map_err(state("create the directory of"))?;
    let mut file = std::fs::File::create(&tmp).map_err(state("create a temp file for"))?;
    file.write_all(format!("{}\n", lsn.0).as_bytes())
        .map_err(state("write"))?;
    file.sync_all().map_err(state("sync"))?;
    std::fs::rename(&tmp, &path).map_err(state("rename into place"))?;
    Ok(())
}

/// Asks every resource to remove the blobs that no retained record of `journal` names and
/// that the receiver has not put for a record still on its way (`pending`).
async fn collect_blobs(
    journal: Arc<Journal>,
    resources: Vec<Arc<dyn Resource>>,
    pending: PendingBlobs,
) {
    for resource in resources {
        let retained = StandbyBlobs {
            journal: JournalBlobs::of(Arc::clone(&journal), Arc::clone(&resource)),
            resource: resource.name().to_string(),
            pending: Arc::clone(&pending),
        };
        if let Err(e) = resource.collect_blobs(&retained).await {
            tracing::warn!(resource = %resource.name(), error = %e, "blob collection failed");
        }
    }
}

/// The blobs a standby's resource must keep: those its retained journal names, and those the
/// receiver put for records not yet durable. Those are read before the journal: a blob whose
/// record becomes durable in between is still in the first set, and one whose record was
/// durable before is named by the journal.
struct StandbyBlobs {
    journal: JournalBlobs,
    resource: String,
    pending: PendingBlobs,
}

#[async_trait::async_trait]
impl adapters::RetainedBlobs for StandbyBlobs {
    async fn retained_blobs(
        &self,
    ) -> Result<std::collections::HashSet<adapters::BlobId>, ResourceError> {
        let pending: Vec<adapters::BlobId> = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(resource, _)| *resource == self.resource)
            .map(|(_, id)| *id)
            .collect();
        let mut retained = self.journal.retained_blobs().await?;
        retained.extend(pending);
        Ok(retained)
    }
}
