//! The journal handle: opening with recovery, group-commit appends, reading, and checkpoints.
//!
//! # Group commit
//!
//! Appenders never touch the file. [`Journal::append`] frames and *seals* the record (LSN, chain
//! value, crc) at the end of a shared queue under a mutex — the mutex gives the LSN order, and the
//! hashing happens on the appender's thread while the flusher is busy syncing the previous batch —
//! and gets back an [`Appending`]: a handle on the write batch the record joined plus its index in
//! it. One flusher thread takes the whole queue at once, writes it with one positional write per
//! segment touched and syncs once; then it completes the batch, and every appender learns its LSN
//! (first LSN of the batch plus its index) — only then, because only then is the record durable.
//! While the flusher syncs, new records gather in the queue and become the next batch, so the
//! number of syncs per second stays what the disk allows while the records per sync grow with the
//! number of appenders. After a batch of several records the flusher waits a little (bounded by
//! `group_wait_us_max` and by half the last sync's duration) for that many records to gather
//! again, so that batches do not alternate between large and tiny; after a batch of one it never
//! waits. An idle flusher spins briefly (`flusher_spin_us_max`) before it sleeps, so a lone
//! appender pays about one write and one sync per record, like a program without group commit.
//!
//! [`Appending`] is waited on by a thread ([`Appending::wait`]) or awaited by an async task (it is
//! a `std::future::Future`; the journal itself has no async runtime). Appending never blocks the
//! caller: when the queue is full (`queue_bytes_max`) the record still gets its LSN and chain
//! value at once, in call order, and waits for room outside the queue with a copy of its payload;
//! the flusher moves such records into the queue, in LSN order, each time it takes a batch, and
//! their `Appending`s resolve through the durable-LSN watch ([`Journal::wait_durable`]). [`Journal::append_nowait`]
//! queues a record without waiting: it is written with the next batch and durable with the next
//! sync (a later durable append or closing the journal) — explicit at the call site, for records
//! whose loss in a crash is harmless (the coordinator's `End`).
//!
//! # Durable-write discipline
//!
//! The numbered append path, carried out by the flusher for each batch:
//!
//! 1. (Appenders, under the queue lock.) Seal each record in LSN order: each chain value needs
//!    the previous one, and its `batch_offset` is its distance from the first record of its sync
//!    group (the records appended since the last batch taken with a sync).
//! 2. If a record does not fit in the current segment: write what fits, sync the segment, create the
//!    next segment durably (temp file, header, sync, rename, directory sync) and go on there. A
//!    segment is thus fully durable before any record of the next one is written.
//! 3. Write the rest with one positional write.
//! 4. Sync the segment data (`fdatasync`) — once for the whole batch (skipped when every record in
//!    it was appended with `append_nowait`).
//! 5. Publish the durable LSN and complete the batch: appenders learn their LSNs.
//!
//! A failed write or sync at any step poisons the journal: the batch and everything queued fail with
//! [`JournalError::Poisoned`], every later call fails, and the flusher stops. A sync is never
//! retried — after a failed `fsync` the kernel may have dropped the dirty pages, so a retry that
//! "succeeds" proves nothing. The owner restarts and recovers from what is on disk.
//!
//! # Recovery
//!
//! [`Journal::open`] takes the directory's `LOCK` (one process at a time; [`Journal::close`]
//! lets it go once the queue is written and synced), removes leftover
//! temporary segment files, scans every segment (see `scan` for the torn-tail rule), truncates a
//! torn tail (logged at WARN with segment, offset and size) and syncs the file, then resumes
//! appending after the last valid record. Corruption refuses to open.
//!
//! # Implementation caveats
//!
//! * Opening reads every retained segment. The journal is kept short by checkpoints
//!   ([`Journal::remove_segments_below`]), so this is bounded by what is retained.
//! * Segments are not preallocated: each sync also makes the file's new size durable.
//! * A record read back is read from the file, not from a cache of recent records.

use std::collections::VecDeque;
use std::fs::TryLockError;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clean::{self, CleanMark};
use crate::config::{JournalConfig, StartPosition};
use crate::error::{JournalError, Result};
use crate::metrics::JournalMetrics;
use crate::reader::JournalReader;
use crate::record::{self, Unsealed};
use crate::scan::{self, ScanReport};
use crate::segment::{self, LOCK_FILE, SegmentFile, SegmentHeader};
use crate::types::{ChainHash, Epoch, Lsn, Record, RecordKind};

/// An open journal: append, read, checkpoint. Shared between threads by reference or `Arc`.
///
/// Closing it ([`Journal::close`], or dropping it) writes and syncs the queued records first.
pub struct Journal {
    shared: Arc<Shared>,
    gate: Arc<SpinGate>,
    /// The flusher thread, until the journal closes.
    flusher: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    dir: PathBuf,
    config: JournalConfig,
    queue: Mutex<Queue>,
    /// The flusher waits here for records.
    work: Condvar,
    segments: RwLock<Vec<SegmentFile>>,
    /// The last durable LSN. Stored and read `SeqCst` where it pairs with `watch.waiting`.
    durable: AtomicU64,
    /// Waiters for the durable LSN to pass a value.
    watch: DurableWatch,
    /// A requested rollover ([`Journal::request_roll`]): the next write starts a new segment
    /// once the current one holds at least this many bytes (0: none requested).
    roll_at_bytes: AtomicU64,
    gate: Arc<SpinGate>,
    /// Set by the appender that puts the first record in an empty queue; lets an idle flusher
    /// notice work while spinning, without a wake-up.
    has_work: AtomicBool,
    stats: Counters,
    /// The directory's `LOCK`, held from open until the journal closes (`None` after).
    lock: Mutex<Option<File>>,
}

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
    sync_micros: AtomicU64,
    write_micros: AtomicU64,
    bytes: AtomicU64,
}

/// Why the journal no longer accepts appends.
#[derive(Clone)]
enum Stop {
    Closed,
    Poisoned(Arc<str>),
}

impl Stop {
    fn error(&self) -> JournalError {
        match self {
            Stop::Closed => JournalError::Closed,
            Stop::Poisoned(cause) => JournalError::Poisoned {
                cause: cause.to_string(),
            },
        }
    }
}

struct Queue {
    /// Sealed frames of the next write batch, in LSN order.
    buf: Vec<u8>,
    count: u32,
    /// LSN of the first record of the current *sync group*: the records appended since the last
    /// batch the flusher took with a sync (`None` when there are none). A record's batch offset is
    /// its distance from this LSN; recovery relies on every record below it having been synced
    /// before the record was written.
    group_first: Option<Lsn>,
    /// LSN the next accepted record gets (records waiting for room included).
    next_lsn: Lsn,
    /// Chain value after the last accepted record.
    chain: ChainHash,
    /// Whether any record in `buf` was appended by a caller waiting for durability.
    wants_sync: bool,
    batch: Arc<Batch>,
    /// The highest epoch accepted.
    epoch: Epoch,
    stop: Option<Stop>,
    flusher_waiting: bool,
    /// While the flusher gathers a batch: the count at which to wake it (0 otherwise).
    gather_target: u32,
    /// Records accepted (LSN and chain value given) while the queue was full, in LSN order: the
    /// flusher moves them into the queue as it takes each batch. Non-empty only while the queue
    /// is, so the flusher always has work while a record waits here.
    waiting: VecDeque<WaitingRecord>,
}

/// A record accepted while the queue was full, holding a copy of its payload.
struct WaitingRecord {
    record: Unsealed<'static>,
    lsn: Lsn,
    chain: ChainHash,
    durable: bool,
}

/// The fate of one write batch, shared by its appenders.
struct Batch {
    state: Mutex<BatchState>,
    done: Condvar,
    /// Set once `state.outcome` is; read without the lock by a spinning waiter.
    finished: AtomicBool,
}

#[derive(Default)]
struct BatchState {
    /// The first LSN of the batch once it is durable, or why it failed.
    outcome: Option<std::result::Result<Lsn, Stop>>,
    wakers: Vec<Waker>,
}

impl Batch {
    fn new() -> Arc<Batch> {
        Arc::new(Batch {
            state: Mutex::new(BatchState::default()),
            done: Condvar::new(),
            finished: AtomicBool::new(false),
        })
    }

    fn complete(&self, outcome: std::result::Result<Lsn, Stop>) {
        let wakers = {
            let mut state = lock(&self.state);
            state.outcome = Some(outcome);
            self.finished.store(true, Ordering::Release);
            std::mem::take(&mut state.wakers)
        };
        self.done.notify_all();
        wakers.into_iter().for_each(Waker::wake);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A record on its way to disk. Wait for it ([`Appending::wait`]) or `.await` it to learn its LSN,
/// which is returned only once the record is durable.
///
/// Dropping it does not withdraw the record: it is already accepted (its LSN is fixed) and will be
/// written; the caller only gives up learning when.
#[must_use = "a record is durable only once `wait` or `.await` has returned its LSN"]
pub struct Appending {
    state: AppendState,
}

enum AppendState {
    /// In the queue: learns its fate from its write batch.
    Queued(QueuedAppend),
    /// Accepted while the queue was full: durable once the durable LSN reaches it.
    Waiting { lsn: Lsn, durable: WaitDurable },
}

/// What `accept` did with a record.
enum Accepted {
    Queued { batch: Arc<Batch>, index: u32 },
    Waiting(Lsn),
}

struct QueuedAppend {
    batch: Arc<Batch>,
    index: u32,
    waker_slot: Option<usize>,
    gate: Arc<SpinGate>,
}

impl Appending {
    /// Blocks the calling thread until the record is durable; returns its LSN.
    ///
    /// One waiting thread at a time first spins for up to `waiter_spin_us_max` (the usual time of a
    /// write and a sync), so a lone appender is not charged a thread wake-up on top of its sync;
    /// the others sleep at once, so many waiters never burn the CPU the flusher and appenders need.
    pub fn wait(self) -> Result<Lsn> {
        match self.state {
            AppendState::Queued(queued) => queued.wait(),
            AppendState::Waiting { lsn, durable } => durable.wait().map(|_| lsn),
        }
    }
}

impl QueuedAppend {
    fn wait(self) -> Result<Lsn> {
        self.spin();
        let mut state = lock(&self.batch.state);
        loop {
            if let Some(outcome) = &state.outcome {
                return resolve(outcome, self.index);
            }
            state = self
                .batch
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn spin(&self) {
        let gate = &*self.gate;
        let expected = Duration::from_micros(2 * gate.last_sync_micros.load(Ordering::Relaxed));
        let spin = gate.spin.min(expected.max(MIN_WAITER_SPIN));
        if spin.is_zero() || gate.spinning.swap(true, Ordering::Acquire) {
            return;
        }
        spin_until(&self.batch.finished, spin);
        gate.spinning.store(false, Ordering::Release);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Lsn>> {
        let mut state = lock(&self.batch.state);
        if let Some(outcome) = &state.outcome {
            return Poll::Ready(resolve(outcome, self.index));
        }
        match self.waker_slot {
            Some(slot) => state.wakers[slot].clone_from(cx.waker()),
            None => {
                self.waker_slot = Some(state.wakers.len());
                state.wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

/// Spins until `flag` is set or `spin` has passed, reading the clock only every few iterations.
fn spin_until(flag: &AtomicBool, spin: Duration) {
    let deadline = Instant::now() + spin;
    loop {
        for _ in 0..64 {
            if flag.load(Ordering::Acquire) {
                return;
            }
            std::hint::spin_loop();
        }
        if Instant::now() >= deadline {
            return;
        }
    }
}

/// Lets one blocking waiter at a time spin; see [`Appending::wait`].
struct SpinGate {
    /// `waiter_spin_us_max`.
    spin: Duration,
    spinning: AtomicBool,
    /// Duration of the last sync, in microseconds: a waiter spins for at most twice that, so a
    /// slow disk does not turn spinning into burnt CPU.
    last_sync_micros: AtomicU64,
}

/// The shortest spin of a waiter, before any sync has been timed.
const MIN_WAITER_SPIN: Duration = Duration::from_micros(50);

fn resolve(outcome: &std::result::Result<Lsn, Stop>, index: u32) -> Result<Lsn> {
    match outcome {
        Ok(first) => Ok(Lsn(first.0 + u64::from(index))),
        Err(stop) => Err(stop.error()),
    }
}

impl Future for Appending {
    type Output = Result<Lsn>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            AppendState::Queued(queued) => queued.poll(cx),
            AppendState::Waiting { lsn, durable } => {
                let lsn = *lsn;
                Pin::new(durable).poll(cx).map(|r| r.map(|_| lsn))
            }
        }
    }
}

/// Who waits for the durable LSN to pass a value: async waiters by waker, threads on a condition
/// variable. The flusher publishes each new durable LSN; it takes the lock only when someone
/// waits (`waiting`, paired `SeqCst` with the durable LSN so that no wake-up is lost).
#[derive(Default)]
struct DurableWatch {
    state: Mutex<WatchState>,
    woken: Condvar,
    /// Registered wakers plus sleeping threads.
    waiting: AtomicU64,
}

#[derive(Default)]
struct WatchState {
    /// Slot id, LSN waited for, waker.
    wakers: Vec<(u64, Lsn, Waker)>,
    sleepers: u64,
    next_slot: u64,
    /// Why the flusher stopped, once it has: no durable LSN will be published any more.
    ended: Option<Stop>,
}

impl DurableWatch {
    fn count(&self, state: &WatchState) {
        self.waiting
            .store(state.wakers.len() as u64 + state.sleepers, Ordering::SeqCst);
    }

    /// Wakes whoever waits for an LSN up to `durable` (already stored in `Shared::durable`).
    fn publish(&self, durable: Lsn) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut wake = Vec::new();
        let mut state = lock(&self.state);
        state.wakers.retain(|(_, lsn, waker)| {
            let done = *lsn <= durable;
            if done {
                wake.push(waker.clone());
            }
            !done
        });
        self.count(&state);
        let sleepers = state.sleepers > 0;
        drop(state);
        if sleepers {
            self.woken.notify_all();
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// The flusher has stopped for `stop`: wakes everyone, for good.
    fn end(&self, stop: Stop) {
        let mut state = lock(&self.state);
        state.ended = Some(stop);
        let wake: Vec<_> = state.wakers.drain(..).map(|(_, _, w)| w).collect();
        self.count(&state);
        drop(state);
        self.woken.notify_all();
        wake.into_iter().for_each(Waker::wake);
    }
}

/// A wait for the durable LSN to reach a value; see [`Journal::wait_durable`]. Await it, or
/// block a thread on it with [`WaitDurable::wait`].
#[must_use = "a WaitDurable does nothing unless awaited or waited for"]
pub struct WaitDurable {
    shared: Arc<Shared>,
    lsn: Lsn,
    /// Its waker's slot in the watch, once registered.
    slot: Option<u64>,
}

impl WaitDurable {
    /// The LSN waited for.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Blocks the calling thread until the durable LSN is at least the one waited for; returns
    /// the durable LSN, or why the journal stopped short of it.
    pub fn wait(self) -> Result<Lsn> {
        let watch = &self.shared.watch;
        let mut state = lock(&watch.state);
        state.sleepers += 1;
        watch.count(&state);
        let outcome = loop {
            if let Some(outcome) = self.outcome(&state) {
                break outcome;
            }
            state = watch
                .woken
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        };
        state.sleepers -= 1;
        watch.count(&state);
        outcome
    }

    /// The outcome, once there is one.
    fn outcome(&self, state: &WatchState) -> Option<Result<Lsn>> {
        let durable = Lsn(self.shared.durable.load(Ordering::SeqCst));
        if durable >= self.lsn {
            return Some(Ok(durable));
        }
        state.ended.as_ref().map(|stop| Err(stop.error()))
    }

    fn unregister(&mut self, state: &mut WatchState) {
        if let Some(slot) = self.slot.take() {
            state.wakers.retain(|(s, _, _)| *s != slot);
            self.shared.watch.count(state);
        }
    }
}

impl Future for WaitDurable {
    type Output = Result<Lsn>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let durable = Lsn(this.shared.durable.load(Ordering::SeqCst));
        if durable >= this.lsn {
            return Poll::Ready(Ok(durable));
        }
        let shared = Arc::clone(&this.shared);
        let mut state = lock(&shared.watch.state);
        match this.slot {
            Some(slot) => {
                if let Some(entry) = state.wakers.iter_mut().find(|(s, _, _)| *s == slot) {
                    entry.2.clone_from(cx.waker());
                }
            }
            None => {
                let slot = state.next_slot;
                state.next_slot += 1;
                state.wakers.push((slot, this.lsn, cx.waker().clone()));
                this.slot = Some(slot);
            }
        }
        shared.watch.count(&state);
        // Checked after registering: a durable LSN published before `count` is seen here.
        match this.outcome(&state) {
            Some(outcome) => {
                this.unregister(&mut state);
                Poll::Ready(outcome)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for WaitDurable {
    fn drop(&mut self) {
        if self.slot.is_some() {
            let shared = Arc::clone(&self.shared);
            let mut state = lock(&shared.watch.state);
            self.unregister(&mut state);
        }
    }
}

/// The flusher thread's last guard: when the thread ends (closed, poisoned or panicked), every
/// waiter for the durable LSN learns that it will move no further.
struct EndWatch(Arc<Shared>);

impl Drop for EndWatch {
    fn drop(&mut self) {
        let stop = lock(&self.0.queue).stop.clone().unwrap_or(Stop::Closed);
        self.0.watch.end(stop);
    }
}

/// Counters since the journal was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records written.
    pub records: u64,
    /// Write batches written.
    pub batches: u64,
    /// Data syncs (`fdatasync`) of segment files.
    pub syncs: u64,
    /// Time spent in those syncs, in microseconds.
    pub sync_micros: u64,
    /// Time spent writing records to segment files (into the page cache), in microseconds.
    pub write_micros: u64,
    /// Bytes of records written.
    pub bytes: u64,
    /// The last durable LSN.
    pub durable_lsn: Lsn,
}

impl Journal {
    /// Opens (and recovers) the journal in `dir`. See the module docs for what recovery does.
    pub fn open(dir: impl AsRef<Path>, config: JournalConfig) -> Result<Journal> {
        // Nothing to show records to: the sealed segments are checked side by side.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        Journal::open_scanning(dir, config, |dir, record_bytes_max| {
            scan::scan_dir_parallel(dir, record_bytes_max, threads)
        })
    }

    /// [`Journal::open`], showing `visit` every retained record in LSN order as the opening scan
    /// checks it — so that a caller that needs to read the whole journal at start (the
    /// coordinator's ledger) reads and checks it once. `visit` sees exactly the records the
    /// opened journal holds (a torn tail is not shown); if opening fails, what it saw counts
    /// for nothing.
    pub fn open_visiting(
        dir: impl AsRef<Path>,
        config: JournalConfig,
        visit: impl FnMut(&Record),
    ) -> Result<Journal> {
        Journal::open_scanning(dir, config, |dir, record_bytes_max| {
            scan::scan_dir(dir, record_bytes_max, visit)
        })
    }

    fn open_scanning(
        dir: impl AsRef<Path>,
        config: JournalConfig,
        scan: impl FnOnce(&Path, u64) -> Result<scan::ScanReport>,
    ) -> Result<Journal> {
        config.validate()?;
        let waiter_spin = Duration::from_micros(config.waiter_spin_us_max);
        let dir = dir.as_ref().to_path_buf();
        prepare_dir(&dir, config.create_if_missing)?;
        // Refuse a foreign directory before leaving a LOCK file in it.
        segment::list_dir(&dir)?;
        let lock_file = take_lock(&dir, Duration::from_millis(config.lock_wait_ms_max))?;
        let mut report = scan(&dir, config.record_bytes_max)?;
        if let Some(start) = config.start_after.filter(|_| report.segments.is_empty()) {
            // A new journal seeded at a position of another one's history.
            report.last_lsn = start.lsn;
            report.last_chain = start.chain;
            report.last_epoch = start.epoch;
        }
        remove_leftovers(&dir, &report)?;
        truncate_torn_tail(&report)?;
        let writer = SegmentWriter::resume(&dir, &config, &report)?;
        let segments = report
            .segments
            .iter()
            .map(|s| SegmentFile {
                first_lsn: s.first_lsn,
                path: s.path.clone(),
            })
            .chain(writer.created_first.clone())
            .collect();
        let shared = Arc::new(Shared {
            dir,
            queue: Mutex::new(Queue {
                buf: Vec::new(),
                count: 0,
                group_first: None,
                next_lsn: report.last_lsn.next(),
                chain: report.last_chain,
                wants_sync: false,
                batch: Batch::new(),
                epoch: report.last_epoch,
                stop: None,
                flusher_waiting: false,
                gather_target: 0,
                waiting: VecDeque::new(),
            }),
            config,
            work: Condvar::new(),
            watch: DurableWatch::default(),
            roll_at_bytes: AtomicU64::new(0),
            segments: RwLock::new(segments),
            durable: AtomicU64::new(report.last_lsn.0),
            has_work: AtomicBool::new(false),
            gate: Arc::new(SpinGate {
                spin: waiter_spin,
                spinning: AtomicBool::new(false),
                last_sync_micros: AtomicU64::new(0),
            }),
            stats: Counters::default(),
            lock: Mutex::new(Some(lock_file)),
        });
        let flusher_shared = Arc::clone(&shared);
        let flusher = std::thread::Builder::new()
            .name("journal-flusher".into())
            .spawn(move || {
                // Dropped last: waiters learn the journal's end after a panic has poisoned it.
                let _end_watch = EndWatch(Arc::clone(&flusher_shared));
                let _poison_on_panic = PoisonOnPanic(Arc::clone(&flusher_shared));
                Flusher::new(flusher_shared, writer).run();
            })
            .map_err(|e| JournalError::io("start journal flusher thread", &shared.dir, e))?;
        let gate = Arc::clone(&shared.gate);
        Ok(Journal {
            shared,
            gate,
            flusher: Mutex::new(Some(flusher)),
        })
    }

    /// Queues a record and returns the handle that yields its LSN once it is durable.
    ///
    /// Fails at once when the record is over `record_bytes_max`, when `epoch` is lower than an
    /// epoch already accepted, or when the journal is poisoned or closed. Never waits: when the
    /// queue is full (`queue_bytes_max`) the record is accepted all the same — it gets its LSN
    /// and chain value now, in call order — and waits for room outside the queue, holding a copy
    /// of its payload; the wait for room is part of waiting for the returned [`Appending`].
    pub fn append(&self, epoch: Epoch, kind: RecordKind, payload: &[u8]) -> Result<Appending> {
        let accepted = self.accept(Unsealed::new(epoch, kind, payload), None, true)?;
        Ok(self.appending(accepted))
    }

    /// Queues a record without waiting for it to become durable: it is written with the next batch
    /// and synced with the next durable append, or when the journal closes. A crash before then
    /// loses it, so use this only for records whose loss is harmless.
    ///
    /// Never waits. When the queue is full the record is accepted as [`Journal::append`] accepts
    /// it — its LSN is fixed now, after every record accepted before it — and waits for room
    /// outside the queue with a copy of its payload; the flusher moves it into a batch when it
    /// takes the queue. Memory beyond `queue_bytes_max` is therefore bounded by what callers
    /// append without waiting for anything.
    pub fn append_nowait(&self, epoch: Epoch, kind: RecordKind, payload: &[u8]) -> Result<()> {
        self.accept(Unsealed::new(epoch, kind, payload), None, false)
            .map(|_| ())
    }

    /// Appends a record received from another journal (a primary, for this standby) as it is:
    /// same LSN, epoch, kind, payload and chain value. Returns, like [`Journal::append`], the
    /// handle that yields its LSN once it is durable.
    ///
    /// Refused, with nothing queued, when its LSN is not exactly this journal's next one
    /// ([`JournalError::LsnGap`]), when its epoch is below one already accepted
    /// ([`JournalError::EpochRegressed`]), when its chain value is not the one this journal
    /// computes from its own last chain value and the record ([`JournalError::ChainMismatch`]:
    /// the journals diverged), or for the reasons [`Journal::append`] refuses a record. An empty
    /// journal takes LSN 1 after the genesis chain value; a standby re-seeded at a later position
    /// opens its empty directory with [`JournalConfig::start_after`].
    pub fn append_verbatim(&self, record: &Record) -> Result<Appending> {
        let unsealed = Unsealed::new(record.epoch, record.kind, &record.payload);
        let accepted = self.accept(unsealed, Some((record.lsn, record.chain)), true)?;
        Ok(self.appending(accepted))
    }

    /// A future that resolves, with the durable LSN, once the durable LSN is at least `lsn` — or
    /// with [`JournalError::Poisoned`] or [`JournalError::Closed`] once the journal has stopped
    /// short of it. It needs no particular async runtime; [`WaitDurable::wait`] blocks a thread
    /// instead.
    pub fn wait_durable(&self, lsn: Lsn) -> WaitDurable {
        WaitDurable {
            shared: Arc::clone(&self.shared),
            lsn,
            slot: None,
        }
    }

    fn appending(&self, accepted: Accepted) -> Appending {
        let state = match accepted {
            Accepted::Queued { batch, index } => AppendState::Queued(QueuedAppend {
                batch,
                index,
                waker_slot: None,
                gate: Arc::clone(&self.gate),
            }),
            Accepted::Waiting(lsn) => AppendState::Waiting {
                lsn,
                durable: self.wait_durable(lsn),
            },
        };
        Appending { state }
    }

    /// Gives the record its LSN and chain value (checking those of a verbatim record) and puts
    /// it at the end of the queue, or of the records waiting for room. Never waits for room.
    fn accept(
        &self,
        record: Unsealed<'_>,
        verbatim: Option<(Lsn, ChainHash)>,
        durable: bool,
    ) -> Result<Accepted> {
        let shared = &*self.shared;
        let bytes = record.framed_len() as u64;
        if bytes > shared.config.record_bytes_max {
            return Err(JournalError::RecordTooLarge {
                bytes,
                max: shared.config.record_bytes_max,
            });
        }
        let mut q = lock(&shared.queue);
        if let Some(stop) = &q.stop {
            return Err(stop.error());
        }
        let lsn = q.next_lsn;
        if let Some((got, _)) = verbatim
            && got != lsn
        {
            return Err(JournalError::LsnGap { expected: lsn, got });
        }
        if record.epoch() < q.epoch {
            return Err(JournalError::EpochRegressed {
                offered: record.epoch(),
                current: q.epoch,
            });
        }
        let chain = record.chain_after(&q.chain, lsn);
        if let Some((_, got)) = verbatim
            && got != chain
        {
            return Err(JournalError::ChainMismatch {
                lsn,
                expected: chain,
                got,
            });
        }
        q.epoch = record.epoch();
        q.next_lsn = lsn.next();
        q.chain = chain;
        let fits = q.buf.is_empty() || q.buf.len() as u64 + bytes <= shared.config.queue_bytes_max;
        if !q.waiting.is_empty() || !fits {
            q.waiting.push_back(WaitingRecord {
                record: record.into_owned(),
                lsn,
                chain,
                durable,
            });
            return Ok(Accepted::Waiting(lsn));
        }
        let index = q.count;
        if index == 0 {
            shared.has_work.store(true, Ordering::Release);
        }
        seal_into_queue(&mut q, &record, lsn, &chain);
        q.count += 1;
        q.wants_sync |= durable;
        let batch = Arc::clone(&q.batch);
        let wake = q.flusher_waiting && (q.gather_target == 0 || q.count >= q.gather_target);
        if wake {
            q.flusher_waiting = false;
        }
        drop(q);
        if wake {
            shared.work.notify_one();
        }
        Ok(Accepted::Queued { batch, index })
    }

    /// Reads the durable records from `from` on, checking crc and chain. The reader ends at the
    /// durable LSN as of this call.
    pub fn read_from(&self, from: Lsn) -> Result<JournalReader> {
        // The durable LSN first: a segment joins the list before any record in it is synced, so
        // a list taken afterwards holds every record up to that LSN.
        let upto = self.durable_lsn();
        JournalReader::new(
            self.segment_list(),
            from,
            upto,
            self.shared.config.record_bytes_max,
        )
    }

    /// The retained segments now.
    fn segment_list(&self) -> Vec<SegmentFile> {
        self.shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Extends `reader` (made by [`Journal::read_from`] on this journal) to the durable LSN
    /// now: the records made durable since it was made, or since the last call, are yielded
    /// next, without reading again what it read — what a follower of the journal (a primary's
    /// shipping, a standby's replay) uses instead of a new reader each time, which would read
    /// its segment again from the start to check the chain. The records it has not read yet
    /// must stay retained (a shipper's and a replay's retention floors hold them); a reader
    /// that finds them removed fails as it would at a hole in the journal.
    pub fn follow(&self, reader: &mut JournalReader) {
        // The durable LSN first, as in `read_from`.
        let upto = self.durable_lsn();
        reader.extend(self.segment_list(), upto);
    }

    /// Asks for the next record to start a new segment if the one being written then holds at
    /// least `min_bytes` (headers included; at least one record). A checkpoint that can only
    /// remove whole segments uses it, so that the records it no longer needs do not stay in
    /// the segment being written. Ignored when a later request replaces it.
    pub fn request_roll(&self, min_bytes: u64) {
        self.shared
            .roll_at_bytes
            .store(min_bytes.max(1), Ordering::Release);
    }

    /// The last durable LSN (`Lsn::ZERO` when nothing was ever appended).
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.shared.durable.load(Ordering::Acquire))
    }

    /// The first LSN still retained (the next LSN to be written when the journal is empty).
    pub fn oldest_lsn(&self) -> Lsn {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        segments.first().map(|s| s.first_lsn).unwrap_or(Lsn(1))
    }

    /// The position just before `lsn` — the LSN before it, the chain value after that record
    /// and its epoch — from which a new journal can continue this one's history at `lsn`
    /// ([`JournalConfig::start_after`], a re-seeded standby). Read from the record before `lsn`
    /// when it is retained, or from the header of the segment that starts at `lsn`; otherwise
    /// [`JournalError::LsnNotRetained`].
    pub fn position_before(&self, lsn: Lsn) -> Result<StartPosition> {
        let prev = lsn.prev();
        let oldest = self.oldest_lsn();
        let retained = prev >= oldest && prev > Lsn(0);
        if retained && let Some(record) = self.read_from(prev)?.next() {
            let record = record?;
            return Ok(StartPosition {
                lsn: record.lsn,
                chain: record.chain,
                epoch: record.epoch,
            });
        }
        let starting = self
            .shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|s| s.first_lsn == lsn)
            .map(|s| s.path.clone());
        match starting {
            Some(path) => {
                let header = segment::SegmentHeader::read(&path)?;
                Ok(StartPosition {
                    lsn: prev,
                    chain: header.prev_chain,
                    epoch: header.epoch,
                })
            }
            None => Err(JournalError::LsnNotRetained {
                requested: prev,
                oldest,
            }),
        }
    }

    /// The bytes of the segment files that hold records from `lsn` on (the segment holding
    /// `lsn` counts whole): what keeping every record from `lsn` costs on disk. A segment
    /// whose size cannot be read counts as empty.
    pub fn retained_bytes_from(&self, lsn: Lsn) -> u64 {
        let segments = self.segment_list();
        let first = segments
            .windows(2)
            .take_while(|pair| pair[1].first_lsn <= lsn)
            .count();
        segments[first.min(segments.len())..]
            .iter()
            .map(|s| std::fs::metadata(&s.path).map_or(0, |m| m.len()))
            .sum()
    }

    /// Deletes every whole segment whose records all have LSNs below `lsn` (a checkpoint). The
    /// segment being written is never deleted. Returns how many segments were deleted.
    pub fn remove_segments_below(&self, lsn: Lsn) -> Result<usize> {
        // Held while removing: the directory stays this journal's until the last removal.
        let held = lock(&self.shared.lock);
        if held.is_none() {
            return Err(JournalError::Closed);
        }
        let removed: Vec<SegmentFile> = {
            let mut segments = self
                .shared
                .segments
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let keep_from = segments
                .windows(2)
                .take_while(|pair| pair[1].first_lsn <= lsn)
                .count();
            segments.drain(..keep_from).collect()
        };
        // Oldest first, each removal made durable before the next: a crash in between leaves a
        // journal that starts later, never one with a hole in the middle.
        for seg in &removed {
            std::fs::remove_file(&seg.path)
                .map_err(|e| JournalError::io("remove journal segment", &seg.path, e))?;
            segment::sync_dir(&self.shared.dir)?;
            tracing::info!(segment = %seg.path.display(), "removed journal segment below checkpoint lsn {lsn}");
        }
        drop(held);
        Ok(removed.len())
    }

    /// Removes every record after `lsn` from the journal in `dir`, which no process may hold
    /// open (it takes the directory's `LOCK` for the duration): what an old primary does to
    /// rejoin as a standby after its history diverged. Open the journal afterwards; it resumes
    /// after `lsn`, with the chain value after `lsn` and a durable LSN of `lsn`.
    ///
    /// A function on a closed directory rather than a method on an open journal, because
    /// nothing may observe the journal going backwards: no append in flight, no reader holding a
    /// segment list, no `Appending` or `WaitDurable` expecting an LSN that disappears, and
    /// `durable_lsn` of an open journal never decreases.
    ///
    /// The steps, each durable before the next: remove the clean-close mark (directory synced);
    /// remove leftover temp files; remove the segments that start after `lsn`, the highest first,
    /// syncing the directory after each; cut the segment holding `lsn` just after its record
    /// (`set_len`, synced); write a clean-close mark for the new end. A crash between any two
    /// steps leaves a journal that opens to a prefix of the original ending at or after `lsn`
    /// (segments are only ever removed from the top, so no hole appears; without the mark a
    /// half-done cut is at worst a torn tail); running the truncation again finishes it.
    /// Truncating after the last LSN only cuts a torn tail and marks the journal clean.
    ///
    /// Refused, with nothing changed: `lsn` past the end ([`JournalError::TruncateBeyondEnd`]),
    /// `lsn` below the retained records ([`JournalError::LsnNotRetained`]; the journal must be
    /// re-seeded), a journal that is corrupt or locked by another process.
    pub fn truncate_after(
        dir: impl AsRef<Path>,
        config: &JournalConfig,
        lsn: Lsn,
    ) -> Result<Truncated> {
        config.validate()?;
        let dir = dir.as_ref();
        prepare_dir(dir, false)?;
        segment::list_dir(dir)?;
        let _lock = take_lock(dir, Duration::from_millis(config.lock_wait_ms_max))?;
        let report = scan::scan_dir(dir, config.record_bytes_max, |_| {})?;
        let oldest = report.first_lsn();
        if lsn < oldest.prev() {
            return Err(JournalError::LsnNotRetained {
                requested: lsn,
                oldest,
            });
        }
        if lsn > report.last_lsn {
            return Err(JournalError::TruncateBeyondEnd {
                requested: lsn,
                last: report.last_lsn,
            });
        }
        let keep = report
            .segments
            .iter()
            .rposition(|s| s.first_lsn <= lsn)
            .unwrap_or(0);
        let cut = &report.segments[keep];
        let (offset, chain) = end_of_record(&cut.path, lsn, config.record_bytes_max)?;
        let mut steps = FaultSteps::new(config.truncate_fault_at, dir);
        steps.next()?;
        clean::clear(dir)?;
        remove_leftovers(dir, &report)?;
        let later = &report.segments[keep + 1..];
        for seg in later.iter().rev() {
            steps.next()?;
            std::fs::remove_file(&seg.path)
                .map_err(|e| JournalError::io("remove journal segment", &seg.path, e))?;
            segment::sync_dir(dir)?;
        }
        steps.next()?;
        cut_segment(&cut.path, offset)?;
        steps.next()?;
        let mark = CleanMark {
            last_lsn: lsn,
            last_chain: chain,
        };
        clean::write(dir, &mark)?;
        let removed = report.last_lsn.0 - lsn.0;
        tracing::warn!(
            dir = %dir.display(),
            segments_removed = later.len(),
            records_removed = removed,
            "truncated the journal after lsn {lsn}"
        );
        Ok(Truncated {
            last_lsn: lsn,
            last_chain: chain,
            records_removed: removed,
            segments_removed: later.len(),
        })
    }

    /// Counters since opening.
    pub fn stats(&self) -> JournalStats {
        let c = &self.shared.stats;
        JournalStats {
            records: c.records.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            sync_micros: c.sync_micros.load(Ordering::Relaxed),
            write_micros: c.write_micros.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            durable_lsn: self.durable_lsn(),
        }
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Closes the journal: queued records are written and synced, then the flusher stops and the
    /// directory's `LOCK` is let go; every later append or segment removal fails with
    /// [`JournalError::Closed`]. Reads still work, up to the last LSN this journal made durable,
    /// though another process may own the directory by then. Returns the poisoning error if the
    /// journal was poisoned. A close while another runs waits for it; a later one does nothing.
    pub fn close(&self) -> Result<()> {
        {
            let mut q = lock(&self.shared.queue);
            if q.stop.is_none() {
                q.stop = Some(Stop::Closed);
            }
        }
        self.shared.work.notify_one();
        // Held until the directory is let go: a second close waits for the first one's flusher.
        let mut flusher = lock(&self.flusher);
        if let Some(running) = flusher.take() {
            // A panic of the flusher poisoned the journal as it unwound (`InFlight`).
            let _ = running.join();
        }
        // Nothing writes the directory any more: another process may take it.
        drop(lock(&self.shared.lock).take());
        drop(flusher);
        match &lock(&self.shared.queue).stop {
            Some(Stop::Poisoned(cause)) => Err(JournalError::Poisoned {
                cause: cause.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// What [`Journal::truncate_after`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncated {
    /// The journal's last LSN now.
    pub last_lsn: Lsn,
    /// The chain value after it.
    pub last_chain: ChainHash,
    /// Valid records removed (a torn tail is not counted).
    pub records_removed: u64,
    /// Whole segment files removed.
    pub segments_removed: usize,
}

/// Where the record at `lsn` ends in the segment at `path`, and the chain value after it (the
/// segment's header when `lsn` comes before its first record).
fn end_of_record(path: &Path, lsn: Lsn, record_bytes_max: u64) -> Result<(u64, ChainHash)> {
    let (mut reader, _) = scan::SegmentReader::open(path, record_bytes_max)?;
    while reader.next_lsn() <= lsn {
        match reader.next_record()? {
            Some(Ok(_)) => {}
            Some(Err(damage)) => {
                return Err(JournalError::corrupt(
                    path,
                    damage.offset,
                    damage.error.to_string(),
                ));
            }
            None => {
                return Err(JournalError::corrupt(
                    path,
                    reader.offset(),
                    format!("the segment ends before lsn {lsn}"),
                ));
            }
        }
    }
    Ok((reader.offset(), reader.chain()))
}

/// Cuts a segment file at `offset` and syncs it.
fn cut_segment(path: &Path, offset: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| JournalError::io("open journal segment", path, e))?;
    file.set_len(offset)
        .map_err(|e| JournalError::io("truncate journal segment", path, e))?;
    file.sync_all()
        .map_err(|e| JournalError::io("sync truncated journal segment", path, e))
}

/// Counts the durable steps of a truncation, for the `truncate_fault_at` testing aid.
struct FaultSteps<'a> {
    fault_at: Option<u32>,
    done: u32,
    dir: &'a Path,
}

impl<'a> FaultSteps<'a> {
    fn new(fault_at: Option<u32>, dir: &'a Path) -> FaultSteps<'a> {
        FaultSteps {
            fault_at,
            done: 0,
            dir,
        }
    }

    /// Before the next step: fails when the testing aid says so.
    fn next(&mut self) -> Result<()> {
        self.done += 1;
        if self.fault_at == Some(self.done) {
            let injected = std::io::Error::other("injected fault (truncate_fault_at)");
            return Err(JournalError::io("truncate journal", self.dir, injected));
        }
        Ok(())
    }
}

/// Frames and seals one record at the end of the queue, in LSN order (the queue lock gives the
/// order). Only the chain value (over 82 bytes) and the crc combination happen here; the payload
/// was hashed before the lock was taken.
fn seal_into_queue(q: &mut Queue, record: &Unsealed<'_>, lsn: Lsn, chain: &ChainHash) {
    let group_first = *q.group_first.get_or_insert(lsn);
    let batch_offset = (lsn.0 - group_first.0) as u32;
    record::append_frame(&mut q.buf, record, lsn, batch_offset, chain);
}

/// Moves the records waiting for room into the (just emptied) queue, in LSN order, while they
/// fit; the first always does.
fn admit_waiting(shared: &Shared, q: &mut Queue) {
    while let Some(next) = q.waiting.front() {
        let bytes = next.record.framed_len() as u64;
        if !q.buf.is_empty() && q.buf.len() as u64 + bytes > shared.config.queue_bytes_max {
            break;
        }
        let Some(w) = q.waiting.pop_front() else {
            break;
        };
        seal_into_queue(q, &w.record, w.lsn, &w.chain);
        q.count += 1;
        q.wants_sync |= w.durable;
        shared.has_work.store(true, Ordering::Release);
    }
}

fn prepare_dir(dir: &Path, create: bool) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(JournalError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            std::fs::create_dir_all(dir)
                .map_err(|e| JournalError::io("create journal directory", dir, e))?;
            match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => segment::sync_dir(parent),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(JournalError::DirMissing {
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(JournalError::io("inspect journal directory", dir, e)),
    }
}

/// Takes the directory's lock, trying again for up to `wait`: a lock released by a journal closed
/// in this process can stay held for a moment by a child process forked meanwhile (between its
/// `fork` and its `exec`), and that must not look like another owner.
fn take_lock(dir: &Path, wait: Duration) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io("open journal lock file", &path, e))?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TryLockError::WouldBlock) => return Err(JournalError::Locked { path }),
            Err(TryLockError::Error(e)) => return Err(JournalError::io("lock journal", &path, e)),
        }
    }
}

fn remove_leftovers(dir: &Path, report: &ScanReport) -> Result<()> {
    for path in &report.leftovers {
        std::fs::remove_file(path)
            .map_err(|e| JournalError::io("remove leftover temp segment", path, e))?;
        tracing::warn!(file = %path.display(), "removed the temp file of an interrupted segment creation or close");
    }
    if !report.leftovers.is_empty() {
        segment::sync_dir(dir)?;
    }
    Ok(())
}

fn truncate_torn_tail(report: &ScanReport) -> Result<()> {
    let Some(tail) = &report.torn_tail else {
        return Ok(());
    };
    let file = OpenOptions::new()
        .write(true)
        .open(&tail.segment)
        .map_err(|e| JournalError::io("open journal segment", &tail.segment, e))?;
    file.set_len(tail.offset)
        .map_err(|e| JournalError::io("truncate torn journal tail", &tail.segment, e))?;
    file.sync_all()
        .map_err(|e| JournalError::io("sync truncated journal segment", &tail.segment, e))?;
    tracing::warn!(
        segment = %tail.segment.display(),
        offset = tail.offset,
        bytes = tail.bytes,
        reason = %tail.reason,
        "truncated the torn tail of the journal after lsn {}",
        report.last_lsn
    );
    Ok(())
}

/// The flusher's side of the active segment.
struct SegmentWriter {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    next_lsn: Lsn,
    chain: ChainHash,
    /// Records written but not yet synced.
    unsynced: bool,
    segment_bytes_max: u64,
    syncs: u64,
    sync_fault_at: Option<u64>,
    /// The segment created by `resume` in an empty directory, for the shared list.
    created_first: Option<SegmentFile>,
    /// A clean-close mark is on disk: it is removed (durably) before anything is written.
    marked_clean: bool,
    metrics: JournalMetrics,
}

impl SegmentWriter {
    fn resume(dir: &Path, config: &JournalConfig, report: &ScanReport) -> Result<SegmentWriter> {
        let (file, path, offset, created_first) = match report.segments.last() {
            Some(last) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&last.path)
                    .map_err(|e| JournalError::io("open journal segment", &last.path, e))?;
                (file, last.path.clone(), last.end_offset, None)
            }
            None => {
                // A new journal: at LSN 1 after the genesis chain, or where `start_after` says.
                let header = SegmentHeader {
                    first_lsn: report.last_lsn.next(),
                    epoch: report.last_epoch,
                    prev_chain: report.last_chain,
                };
                let (file, path) = segment::create_segment(dir, header)?;
                let created = SegmentFile {
                    first_lsn: header.first_lsn,
                    path: path.clone(),
                };
                (
                    file,
                    path,
                    segment::SEGMENT_HEADER_BYTES as u64,
                    Some(created),
                )
            }
        };
        let mut writer = SegmentWriter {
            dir: dir.to_path_buf(),
            file,
            path,
            offset,
            next_lsn: report.last_lsn.next(),
            chain: report.last_chain,
            unsynced: false,
            segment_bytes_max: config.segment_bytes_max,
            syncs: 0,
            sync_fault_at: config.sync_fault_at,
            created_first,
            marked_clean: report.clean_close.is_some(),
            metrics: JournalMetrics::new(config.metrics_label),
        };
        // The records found may have been written and never synced by a process that died:
        // sync them before they are published as durable, and before the first new record starts
        // a sync group that claims everything before it was synced.
        if report
            .segments
            .last()
            .is_some_and(|s| s.last_lsn >= s.first_lsn)
        {
            writer.sync_data()?;
        }
        Ok(writer)
    }

    /// Writes one batch of `count` sealed frames; syncs when `sync`. Returns the first LSN of the
    /// batch.
    fn write_batch(&mut self, shared: &Shared, buf: &[u8], count: u32, sync: bool) -> Result<Lsn> {
        self.clear_clean_mark()?;
        self.roll_if_requested(shared, frame_epoch(buf))?;
        let first = self.next_lsn;
        debug_assert_eq!(
            frame_lsn(buf),
            first,
            "batch does not start at the next lsn"
        );
        if self.offset + buf.len() as u64 <= self.segment_bytes_max {
            self.write(shared, buf)?;
            self.next_lsn = Lsn(first.0 + u64::from(count));
            self.chain = frame_chain(buf);
        } else {
            self.write_across_segments(shared, buf)?;
        }
        debug_assert_eq!(
            self.next_lsn,
            Lsn(first.0 + u64::from(count)),
            "batch frame count"
        );
        if sync {
            self.sync(shared)?;
        }
        let stats = &shared.stats;
        stats.records.fetch_add(u64::from(count), Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(first)
    }

    /// Starts a new segment before this write when one was requested and the current segment
    /// holds at least the bytes asked for: the current one is synced first (whole segments
    /// before new ones), exactly as at a rollover for size.
    fn roll_if_requested(&mut self, shared: &Shared, epoch: Epoch) -> Result<()> {
        let at = shared.roll_at_bytes.load(Ordering::Acquire);
        let holds_records = self.offset > segment::SEGMENT_HEADER_BYTES as u64;
        if at == 0 || !holds_records || self.offset < at {
            return Ok(());
        }
        shared.roll_at_bytes.store(0, Ordering::Release);
        self.sync(shared)?;
        self.roll(shared, epoch)
    }

    /// Removes the clean-close mark, durably, before the first write of this process: from now on
    /// the journal may end in a torn tail again.
    fn clear_clean_mark(&mut self) -> Result<()> {
        if self.marked_clean {
            clean::clear(&self.dir)?;
            self.marked_clean = false;
        }
        Ok(())
    }

    /// Marks a clean close (see [`crate::clean`]): every record is written and synced. Nothing to
    /// do when the mark of the last close is still there (nothing was written since).
    fn mark_clean(&mut self) -> Result<()> {
        debug_assert!(!self.unsynced, "marking an unsynced journal clean");
        if self.marked_clean {
            return Ok(());
        }
        let mark = CleanMark {
            last_lsn: self.next_lsn.prev(),
            last_chain: self.chain,
        };
        clean::write(&self.dir, &mark)?;
        self.marked_clean = true;
        Ok(())
    }

    /// The slow path of `write_batch`: walks the frames and starts a new segment wherever the next
    /// frame does not fit (append path steps 2 and 3).
    fn write_across_segments(&mut self, shared: &Shared, buf: &[u8]) -> Result<()> {
        let mut piece = 0;
        let mut pos = 0;
        while pos < buf.len() {
            let len = record::le_u32(&buf[pos..]) as usize + 4;
            if self.offset + (pos + len - piece) as u64 > self.segment_bytes_max {
                self.write(shared, &buf[piece..pos])?;
                self.sync(shared)?;
                self.roll(shared, frame_epoch(&buf[pos..]))?;
                piece = pos;
            }
            self.chain = frame_chain(&buf[pos..pos + len]);
            self.next_lsn = self.next_lsn.next();
            pos += len;
        }
        self.write(shared, &buf[piece..pos])
    }

    fn write(&mut self, shared: &Shared, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        self.file
            .write_all_at(bytes, self.offset)
            .map_err(|e| JournalError::io("write journal segment", &self.path, e))?;
        let micros = started.elapsed().as_micros() as u64;
        shared
            .stats
            .write_micros
            .fetch_add(micros, Ordering::Relaxed);
        self.offset += bytes.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Syncs the segment's data and publishes the durable LSN. Never retried by anyone.
    fn sync(&mut self, shared: &Shared) -> Result<()> {
        if !self.unsynced {
            return Ok(());
        }
        let started = Instant::now();
        self.sync_data()?;
        self.unsynced = false;
        shared.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let micros = started.elapsed().as_micros() as u64;
        shared
            .stats
            .sync_micros
            .fetch_add(micros, Ordering::Relaxed);
        shared
            .gate
            .last_sync_micros
            .store(micros, Ordering::Relaxed);
        let durable = self.next_lsn.prev();
        let before = shared.durable.swap(durable.0, Ordering::SeqCst);
        self.metrics.synced(durable.0.saturating_sub(before));
        shared.watch.publish(durable);
        Ok(())
    }

    /// `fdatasync` of the segment, counted for `sync_fault_at`.
    fn sync_data(&mut self) -> Result<()> {
        self.syncs += 1;
        if self.sync_fault_at == Some(self.syncs) {
            let injected = std::io::Error::other("injected sync fault (sync_fault_at)");
            return Err(JournalError::io(
                "sync journal segment",
                &self.path,
                injected,
            ));
        }
        self.file
            .sync_data()
            .map_err(|e| JournalError::io("sync journal segment", &self.path, e))
    }

    /// Starts the next segment at `next_lsn`. The current one must already be synced.
    fn roll(&mut self, shared: &Shared, epoch: Epoch) -> Result<()> {
        debug_assert!(!self.unsynced, "rolling over an unsynced segment");
        let header = SegmentHeader {
            first_lsn: self.next_lsn,
            epoch,
            prev_chain: self.chain,
        };
        let (file, path) = segment::create_segment(&self.dir, header)?;
        shared
            .segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(SegmentFile {
                first_lsn: self.next_lsn,
                path: path.clone(),
            });
        tracing::debug!(segment = %path.display(), "started journal segment");
        self.file = file;
        self.path = path;
        self.offset = segment::SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }
}

/// The LSN of the sealed frame at the start of `frames`.
fn frame_lsn(frames: &[u8]) -> Lsn {
    Lsn(record::le_u64(&frames[8..16]))
}

/// The epoch of the sealed frame at the start of `frames`.
fn frame_epoch(frames: &[u8]) -> Epoch {
    Epoch(record::le_u64(&frames[16..24]))
}

/// The chain value in the trailer of the sealed frame at the end of `frames`.
fn frame_chain(frames: &[u8]) -> ChainHash {
    let mut chain = [0u8; 32];
    chain.copy_from_slice(&frames[frames.len() - 32..]);
    ChainHash(chain)
}

/// A batch taken from the queue.
struct Taken {
    buf: Vec<u8>,
    count: u32,
    wants_sync: bool,
    batch: Arc<Batch>,
}

struct Flusher {
    shared: Arc<Shared>,
    writer: SegmentWriter,
    spare: Vec<u8>,
    last_count: u32,
    last_sync: Duration,
    /// Bytes written since the last sync.
    unsynced_bytes: u64,
}

impl Flusher {
    fn new(shared: Arc<Shared>, writer: SegmentWriter) -> Flusher {
        Flusher {
            shared,
            writer,
            spare: Vec::new(),
            last_count: 0,
            last_sync: Duration::ZERO,
            unsynced_bytes: 0,
        }
    }

    fn run(mut self) {
        while let Some(mut taken) = self.take() {
            let started = Instant::now();
            let shared = Arc::clone(&self.shared);
            let _in_flight = InFlight(&taken.batch);
            let written =
                self.writer
                    .write_batch(&shared, &taken.buf, taken.count, taken.wants_sync);
            match written {
                Ok(first) => {
                    if taken.wants_sync {
                        self.last_sync = started.elapsed();
                        self.last_count = taken.count;
                    }
                    taken.batch.complete(Ok(first));
                    taken.buf.clear();
                    self.spare = taken.buf;
                }
                Err(e) => return self.poison(e, &taken.batch),
            }
        }
        let shared = Arc::clone(&self.shared);
        if let Err(e) = self.writer.sync(&shared) {
            return self.poison(e, &Batch::new());
        }
        let closed = matches!(lock(&shared.queue).stop, Some(Stop::Closed));
        if closed && let Err(e) = self.writer.mark_clean() {
            // Every record is synced: without a mark, the next open checks the tail as after a
            // crash, and a half-written `CLEAN.tmp` is removed there. Nothing is lost, so the
            // close is not a poisoning (see `crate::clean`).
            tracing::warn!(error = %e, dir = %self.writer.dir.display(), "a clean close could not be marked; every record is synced, and the next open checks the tail as after a crash");
        }
    }

    /// Waits for records and takes the whole queue; `None` once the journal is closed and drained.
    fn take(&mut self) -> Option<Taken> {
        let shared = Arc::clone(&self.shared);
        self.spin_for_work();
        if let Some(hold) = &shared.config.hold_flusher {
            while hold.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut q = lock(&shared.queue);
        while q.count == 0 {
            if q.stop.is_some() {
                return None;
            }
            q.flusher_waiting = true;
            q = shared.work.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
        shared.has_work.store(false, Ordering::Relaxed);
        q = self.gather(q);
        q.flusher_waiting = false;
        let sync = self.decide_sync(&mut q);
        let taken = Taken {
            buf: std::mem::replace(&mut q.buf, std::mem::take(&mut self.spare)),
            count: std::mem::take(&mut q.count),
            wants_sync: sync,
            batch: std::mem::replace(&mut q.batch, Batch::new()),
        };
        admit_waiting(&shared, &mut q);
        drop(q);
        Some(taken)
    }

    /// Whether the batch being taken is synced: when any of its appenders waits for durability, or
    /// when the bytes written without a sync would pass `queue_bytes_max`. A synced batch closes
    /// the sync group, so the next record starts a new one.
    fn decide_sync(&mut self, q: &mut Queue) -> bool {
        let bytes = q.buf.len() as u64;
        let sync = std::mem::take(&mut q.wants_sync)
            || self.unsynced_bytes + bytes > self.shared.config.queue_bytes_max;
        if sync {
            q.group_first = None;
            self.unsynced_bytes = 0;
        } else {
            self.unsynced_bytes += bytes;
        }
        sync
    }

    /// Before sleeping on the condition variable, spins for up to `flusher_spin_us_max` waiting for
    /// a record: a lone appender that re-appends right after its last record became durable then
    /// finds the flusher awake, and pays no thread wake-up on top of its write and sync.
    /// It spins only after a batch of one record: after a larger batch the appenders need the CPU
    /// to queue their next records, and the flusher gathers them instead (see `gather`).
    fn spin_for_work(&self) {
        let spin = Duration::from_micros(self.shared.config.flusher_spin_us_max);
        if spin.is_zero() || self.last_count > 1 {
            return;
        }
        spin_until(&self.shared.has_work, spin);
    }

    /// After a batch of several records, waits (bounded) for as many to gather again.
    fn gather<'a>(&self, mut q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        let cap =
            Duration::from_micros(self.shared.config.group_wait_us_max).min(self.last_sync / 2);
        if self.last_count <= 1 || q.count >= self.last_count || cap.is_zero() || q.stop.is_some() {
            return q;
        }
        let deadline = Instant::now() + cap;
        q.gather_target = self.last_count;
        while q.count < self.last_count && q.stop.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q.flusher_waiting = true;
            q = self
                .shared
                .work
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        q.gather_target = 0;
        q
    }

    /// Fails the batch in flight and everything queued, and refuses all later work.
    fn poison(&self, error: JournalError, in_flight: &Batch) {
        tracing::error!(error = %error, "journal poisoned; restart the process to recover from the journal");
        let stop = Stop::Poisoned(error.to_string().into());
        in_flight.complete(Err(stop.clone()));
        fail_queued(&self.shared, stop);
    }
}

/// Stops the journal with `stop` (a poisoning) and fails everything queued.
fn fail_queued(shared: &Shared, stop: Stop) {
    let queued = {
        let mut q = lock(&shared.queue);
        q.stop = Some(stop.clone());
        q.buf.clear();
        q.count = 0;
        q.waiting.clear();
        std::mem::replace(&mut q.batch, Batch::new())
    };
    queued.complete(Err(stop));
}

/// Why the journal stopped when its flusher thread panicked (a bug).
const FLUSHER_PANICKED: &str = "the journal's flusher thread panicked";

/// The flusher thread's guard: should the flusher panic, unwinding poisons the journal and fails
/// everything queued, so that no appender waits forever and `close` reports the poisoning.
struct PoisonOnPanic(Arc<Shared>);

impl Drop for PoisonOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("journal poisoned: {FLUSHER_PANICKED}");
            fail_queued(&self.0, Stop::Poisoned(Arc::from(FLUSHER_PANICKED)));
        }
    }
}

/// The batch the flusher is writing: unwinding from a panic fails it (see [`PoisonOnPanic`]).
struct InFlight<'a>(&'a Batch);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.0.finished.load(Ordering::Acquire) {
            self.0
                .complete(Err(Stop::Poisoned(Arc::from(FLUSHER_PANICKED))));
        }
    }
}
