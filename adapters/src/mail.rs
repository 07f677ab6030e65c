//! The mail queue resource: a Maildir whose deliveries commit with the transaction.
//!
//! A branch enqueues RFC 5322 messages; none of them is visible to a mail reader until the
//! branch commits, and then each appears in `new/` by one `rename`. This is the Maildir delivery
//! protocol itself — write the message under a unique name in `tmp/`, sync it, rename it into
//! `new/` — with the rename held back until the decision, a branch log to remember prepared
//! branches across a crash, and file names that make every delivery idempotent:
//!
//! * **Enqueue.** [`MailBranch::enqueue`] reads the message from an async reader in bounded
//!   chunks through a [`Checker`], which refuses what is not RFC 5322 and writes every line
//!   ending as CRLF (rules in the `message` module: an all-LF message is normalised, a bare CR or
//!   a mix of endings is refused), and refuses more than `max_message_bytes`. Small messages (at
//!   most [`INLINE_MESSAGE_BYTES_MAX`], within [`INLINE_BRANCH_BYTES_MAX`] per branch) stay in
//!   memory; a larger one streams into its file in `tmp/` as it is read, hashed with blake3 on
//!   the way, so a message of any size holds one chunk of memory.
//!   [`MailBranch::enqueue_built`] takes a [`MessageBuilder`] instead.
//! * **Names.** Message `pos` (0, 1, … in enqueue order) of branch `xid` is named
//!   `<time>.C<xid>P<pos>.<host>` (the `name` module): unique because the xid is, and fixed when
//!   the message is enqueued. The prepare record and the redo carry the names, so a commit
//!   repeated after a crash and a replay on a standby use the same names and find a message
//!   already delivered instead of delivering it twice.
//! * **Prepare** writes each message still in memory to its file in `tmp/`, syncs every file of
//!   the branch and then `tmp/`, and appends one `PREPARED` record to the resource's **branch
//!   log** (a [`journal::Journal`] of its own, group-committed; the `log` module) and waits until
//!   it is durable. The record holds the branch's **redo**: small messages inline, larger ones by
//!   blob id — their file in `tmp/` is hard-linked into the resource's blob store
//!   ([`BlobStore::adopt`]: no copy). A branch with a durable `PREPARED` and no resolution after
//!   it survives a crash and is listed by `recover`; any other is presumed aborted, and `open`
//!   removes its files from `tmp/`. The vote carries the same redo.
//! * **Commit** renames each message from `tmp/` into `new/`, syncs `new/`, then appends
//!   `COMMITTED` and waits for it. A message no longer in `tmp/` was delivered by an earlier
//!   attempt: nothing is done for it. **Rollback** unlinks the branch's files in `tmp/` and
//!   appends `ROLLED_BACK`. Both are idempotent.
//! * **Isolation** needs no locks: every message has a name of its own, and nothing in `tmp/` is
//!   a delivery (docs/design.md "Ordering").
//! * **Fencing and replay.** [`Resource::fence`] stores the fence epoch durably in the private
//!   area; a branch of a lower epoch is refused at begin, at every enqueue and at prepare. A
//!   fence waits for the prepares, commits and rollbacks in flight, and then the fenced
//!   instance refuses to resolve the prepared branches it began below the new epoch; an instance
//!   opened afterwards (their new owner) resolves them (`internal::branches`, "Fences and
//!   owners").
//!   [`Resource::replay`] and [`Resource::replay_batch`] deliver the messages of one redo or a
//!   batch of them (inline content, or copied from this resource's blob store, checked against
//!   the blob's hash) under their names, skipping any already in `new/` or `cur/`, then sync
//!   `new/` and store the last LSN, once per batch.
//! * **Inventory.** [`Resource::inventory`] lists every message in `new/` and `cur/` by its
//!   name (without the directory and without a reader's `:2,…` info) with the blake3 hash of
//!   its content.
//! * **Re-seeding.** [`Resource::read_entry`], [`Resource::write_entry`] and
//!   [`Resource::remove_entry`] read, deliver and remove one message by its inventory key,
//!   streamed and durably; [`Resource::set_applied_lsn`] sets the applied LSN a re-seeded
//!   standby replays after (the `reseed` module).
//!
//! [`MailResource`] is the resource ([`MailResource::open`], [`MailConfig`]); a [`MailBranch`]
//! is an application's handle on one branch; [`RedoEntry`] with [`encode_redo`] and
//! [`decode_redo`] is the redo (format in the `redo` module). Begin, prepare, commit, rollback,
//! fence and replay run the branch lifecycle the resources share (`internal::lifecycle`); the
//! `steps` module holds the mail resource's own part of each. The rest is cut along its seams:
//! `open` (the Maildir, the private area, the prepared branches), `enqueue` (messages into a
//! branch, and prepare), `deliver` (commit, rollback and replay), `reseed` (a re-seed's entries), `message` (the check and the
//! builder), `name`, `redo` and `log`.
//!
//! # On disk
//!
//! ```text
//! <maildir>/tmp/<name>                 a message of an open or prepared branch
//! <maildir>/new/<name>                 a delivered message
//! <maildir>/cur/<name>:2,<flags>       a delivered message a mail reader has seen
//! <maildir>/.concord/LOCK              held (flock) by the one instance that has the Maildir open
//! <maildir>/.concord/log/              the branch log (a journal: segments and its own LOCK)
//! <maildir>/.concord/blobs/            a journal::BlobStore: every prepared message over the inline limit
//! <maildir>/.concord/fence             the fence epoch
//! <maildir>/.concord/applied_lsn       the LSN of the last replayed redo
//! <maildir>/.concord/tmp/              temp files of state writes (cleared at open)
//! ```
//!
//! Mail readers look only in `new/` and `cur/` (and never at `tmp/`); the private area is a
//! dot-directory, which Maildir readers skip. `fence` and `applied_lsn` are written as a temp
//! file under `.concord/tmp/`, synced, renamed into place, and the directory synced. They hold a
//! version byte, the value (u64 little-endian) and the first 8 bytes of the blake3 hash of the
//! two; a damaged one refuses to open ([`ResourceError::Fatal`]).
//!
//! # Crashes
//!
//! * **During enqueue or prepare, before `PREPARED` is durable**: the branch is not prepared.
//!   Its large messages (and, after a failed prepare, small ones) are in `tmp/` under names that
//!   carry its xid; `open` removes every such file whose xid is not prepared (presumed abort).
//!   Files in `tmp/` with other names (another program's deliveries) are left alone.
//! * **After `PREPARED` is durable**: every message is in `tmp/`, synced, and so is the
//!   directory, before the record was appended; the branch comes back prepared with its names
//!   from the record.
//! * **During commit, before `COMMITTED` is durable**: each message is in `tmp/` (not delivered)
//!   or in `new/` (delivered, perhaps moved to `cur/` since by a reader). The branch comes back
//!   prepared and the coordinator commits it again: a message still in `tmp/` is renamed; one
//!   already in `new/` or `cur/` is left there — and if a copy came back in `tmp/` as well (a
//!   file system that does not keep a rename atomic over a crash) the copy is unlinked instead
//!   of delivered a second time. A message in neither place was delivered and then removed by a
//!   reader; it is not delivered again. So each message is delivered exactly once, whatever the
//!   number of attempts.
//! * **After `COMMITTED` is durable**: the branch is gone; a copy left in `tmp/` (as above) is
//!   removed at the next open.
//! * **During rollback**: unlinking is repeated; a file that comes back in `tmp/` is removed at
//!   open, as its branch is no longer prepared.
//! * **During replay**: a replay applies a **batch** of consecutive redos (a single replay is
//!   a batch of one): every message of its redos in LSN order, each written to `tmp/` and
//!   synced before its rename into `new/`, then one sync of `new/`, then `applied_lsn` written
//!   once, as the batch's last LSN. A crash before that write leaves `applied_lsn` below the
//!   batch, so the replayer sends the same batch again; the names are the same (made from the
//!   xid and the position, never from the time of delivery), each message already in `new/`
//!   or `cur/` is skipped, and only the missing ones are delivered: exactly once. (A message's
//!   content is synced before its rename, so a message found in `new/` after a power failure is
//!   whole.) A crash after the write makes the same batch a no-op.
//!
//! # Implementation caveats
//!
//! * A delivered message of more than [`INLINE_MESSAGE_BYTES_MAX`] is a hard link of its blob
//!   (adopted at prepare) until the blob is removed. A program that writes such a message in
//!   place damages the blob (which the blob store detects on read); Maildir readers only rename
//!   and unlink, which is harmless.
//! * Blobs adopted by branches that roll back, and blobs no retained journal record names, are
//!   not removed here: that is the garbage collection of the layer that knows the records.
//! * Some Maildir readers delete files in `tmp/` untouched for 36 hours (the convention for
//!   abandoned deliveries; Dovecot does). A branch left prepared longer than that in a Maildir
//!   such a reader opens may lose its messages: its commit cannot tell a message gone from `tmp/`
//!   from one delivered and since removed, so it logs a warning and does not deliver it (never
//!   twice, at worst not at all). Resolve in-doubt branches well within that time.
//! * A commit after a restart, and every replay, list `cur/` once to find messages a reader has
//!   moved there; a `cur/` of very many messages makes those slower.
//! * A message that a reader removed from a standby's `new/` before the standby stored the
//!   replay's LSN is delivered again if that replay is repeated after a crash (the standby's
//!   queue is not expected to be read before promotion).
//! * Maildir++ readers (Courier, Dovecot's default layout, Python's `Maildir.list_folders`) take
//!   every dot-directory for a sub-folder, so they list `.concord` as an empty folder named
//!   `concord`; it holds no `cur/` or `new/`, so no message ever shows in it.
//! * A read-only vote is remembered for the last `READ_ONLY_REMEMBERED_MAX` such branches (a
//!   repeated prepare votes the same); after a restart such a branch is unknown.
//! * One-phase commit (commit of an unprepared branch) is refused.
//! * A prepare is refused when the log's file system has less free space than the record and a
//!   margin (a full disk refuses the prepare instead of poisoning the log).
//! * A failed sync poisons the instance: every later call fails with [`ResourceError::Fatal`]
//!   until the resource is opened again.

use std::any::Any;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use journal::{BlobId, BlobStore, Journal};

use crate::dirsync::DirSync;
use crate::internal::branches::Branches;
use crate::internal::collect::{Adoptions, collect_blobs};
use crate::internal::instance::{Instance, InstanceState, Shared, lock};
use crate::internal::io::{blocking, log_error};
use crate::internal::lifecycle;
use crate::internal::lifecycle::Shell;
use crate::internal::reseed as internal_reseed;
use crate::internal::shipping;
use crate::internal::state_file::encode_state;
use crate::{
    BlobContent, BlobsCollected, Epoch, Lsn, Resource, ResourceError, RetainedBlobs, Vote, Xid,
};

mod deliver;
mod enqueue;
mod log;
mod message;
mod name;
mod open;
mod redo;
mod reseed;
mod steps;

pub use message::{
    Checker, HEADER_LINE_BYTES_MAX, MessageBuilder, MessageError, check_message, rfc5322_date,
};
pub use name::NAME_BYTES_MAX;
pub use redo::{RedoEntry, decode_redo, encode_redo};

use enqueue::overwrite_synced;

/// The private directory in the Maildir.
pub const PRIVATE_DIR: &str = ".concord";
/// A message of at most this many bytes is kept in memory until prepare and carried inline in
/// the prepare record and the redo.
pub const INLINE_MESSAGE_BYTES_MAX: u64 = 64 << 10;
/// At most this much inline content per branch; further messages go through the blob store.
pub const INLINE_BRANCH_BYTES_MAX: u64 = 1 << 20;
/// Most messages one branch may enqueue (and entries one redo may hold).
pub const BRANCH_MESSAGES_MAX: usize = 10_000;
/// Size of the one input buffer a large message streams through (its CRLF form takes at most
/// twice this).
const CHUNK_BYTES: usize = 1 << 20;
/// Size of the input buffer while a message may still fit in memory.
const HEAD_CHUNK_BYTES: usize = 64 << 10;
/// What a panicked blocking task was, in its error.
const TASK: &str = "file";
/// What to do about a branch too large for one log record.
const FEWER: &str = "send fewer messages";

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// The xids a mail resource at `maildir` holds prepared, from its branch log. Reads the log only
/// — no lock, no clean-up — so an operator's view can run beside the process that owns the
/// resource.
pub fn prepared_on_disk(maildir: &Path) -> Result<Vec<Xid>> {
    let dir = maildir.join(PRIVATE_DIR).join("log");
    log::live_on_disk(&dir).map_err(|e| log::log_open_error("mail", &dir, e))
}

/// Options and limits of a mail resource.
#[derive(Clone, Debug)]
pub struct MailConfig {
    /// Create the Maildir, and any of its `tmp/`, `new/` and `cur/` that is missing, at open.
    /// Otherwise a missing one refuses the open, naming it.
    pub create: bool,
    /// Largest message accepted, in bytes, counted with CRLF line endings; a larger one is
    /// refused and nothing of it stays behind.
    pub max_message_bytes: u64,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            create: false,
            max_message_bytes: 256 << 20,
        }
    }
}

/// The mail queue resource; see the module docs.
pub struct MailResource {
    inner: Arc<Inner>,
}

/// An application's handle on one branch of a [`MailResource`]: what it enqueues is delivered
/// when the branch commits.
pub struct MailBranch {
    inner: Arc<Inner>,
    xid: Xid,
}

/// A message taken into a branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// Its Maildir file name: the file `new/<name>` once the branch commits.
    pub name: String,
    /// Its size as it will be delivered (CRLF line endings).
    pub bytes: u64,
}

struct Inner {
    name: String,
    /// The canonical Maildir.
    maildir: PathBuf,
    area: Area,
    /// The host part of the names of messages enqueued here.
    host: String,
    blobs: BlobStore,
    /// Coalesces the syncs of `tmp/` and `new/`, which concurrent branches share.
    dirs: DirSync,
    /// The branch log: prepare records and resolutions (see the `log` module).
    log: Journal,
    config: MailConfig,
    state: Mutex<State>,
    /// Where the last trim of the log started.
    trims: Mutex<Trims>,
    /// Held while a trim runs: one at a time.
    trimming: tokio::sync::Mutex<()>,
    /// The fence gate, the test pauses and the replay lock.
    shell: Shell,
    /// The adoption lock and the blobs adopted while a collection runs.
    adoptions: Adoptions,
    /// Names of temp files in the private area.
    next_tmp: AtomicU64,
    /// Holds `.concord/LOCK` for the life of the instance.
    _lock: File,
}

/// The paths of the Maildir and of the private area.
struct Area {
    tmp: PathBuf,
    new: PathBuf,
    cur: PathBuf,
    private: PathBuf,
    log: PathBuf,
    blobs: PathBuf,
    scratch: PathBuf,
    fence: PathBuf,
    applied_lsn: PathBuf,
}

struct Trims {
    /// Bytes appended to the log (since open) when the last trim started.
    at_bytes: u64,
    /// The log's durable LSN when the last trim started: a branch prepared below it and still
    /// prepared is carried forward by the next one.
    at_lsn: Lsn,
}

/// A branch; its phase is in the table of branches (prepared: its prepare record is durable).
struct Branch {
    /// When it began (seconds since the epoch): the time part of its messages' names.
    time: u64,
    /// The position of its next message.
    next_pos: u32,
    /// Its enqueued messages by position (empty for a branch recovered from the log).
    messages: BTreeMap<u32, Staged>,
    /// Bytes of its messages kept in memory.
    memory_bytes: u64,
    /// What its durable prepare record holds (it is prepared, or being resolved after prepare).
    prepared: Option<Arc<Prepared>>,
    /// The lowest LSN of the branch log this branch may need: its prepare record's, or, while
    /// that is being appended, one at or below it. The log is never trimmed above it.
    log_floor: Option<Lsn>,
    /// Recovered from the log at open: an earlier process may have begun its commit.
    recovered: bool,
}

/// A branch's prepare record: its messages' names, and its redo.
struct Prepared {
    names: Vec<String>,
    redo: Vec<u8>,
}

/// An enqueued message.
#[derive(Clone)]
struct Staged {
    name: String,
    content: Content,
}

/// Where an enqueued message waits for prepare.
#[derive(Clone)]
enum Content {
    /// In memory (at most [`INLINE_MESSAGE_BYTES_MAX`]).
    Memory(Arc<[u8]>),
    /// In its file `tmp/<name>`, not synced yet, hashing to `id`.
    File { id: BlobId, bytes: u64 },
}

struct State {
    /// The fence, the applied LSN and the poison, as every resource has them.
    shared: Shared,
    branches: Branches<Branch>,
}

impl MailResource {
    /// The handle of the branch of `xid`, which must have been begun ([`Resource::begin`]);
    /// otherwise its calls are refused.
    pub fn branch(&self, xid: &Xid) -> MailBranch {
        MailBranch {
            inner: self.inner.clone(),
            xid: *xid,
        }
    }

    /// The Maildir (canonical).
    pub fn maildir(&self) -> &Path {
        &self.inner.maildir
    }

    /// For tests: the next prepare of `xid` stops once past its fence check, before anything
    /// of it is durable, until the returned pause is released (the conformance suite's
    /// `fence_covers_a_prepare_in_flight`).
    pub fn pause_prepare(&self, xid: &Xid) -> crate::testing::Pause {
        self.inner.shell.pauses.arm_prepare(xid)
    }

    /// For tests: the next replay applies part of its redo (its first entry) and then fails,
    /// as if the process died there (the conformance suite's
    /// `replay_on_an_empty_instance_gives_the_same_state`).
    pub fn fail_next_replay(&self) {
        self.inner.shell.pauses.arm_replay_failure();
    }

    /// The resource's blob store, which a standby's replay reads: replication ships the blobs a
    /// redo names into it before the redo is replayed.
    pub fn blob_store(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &MailConfig {
        &self.inner.config
    }
}

#[async_trait::async_trait]
impl Resource for MailResource {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn begin(&self, xid: &Xid) -> Result<()> {
        lifecycle::begin(&*self.inner, xid)
    }

    async fn prepare(&self, xid: &Xid) -> Result<Vote> {
        lifecycle::prepare(&self.inner, xid).await
    }

    async fn commit(&self, xid: &Xid) -> Result<()> {
        lifecycle::resolve(&self.inner, xid, true).await
    }

    async fn rollback(&self, xid: &Xid) -> Result<()> {
        lifecycle::resolve(&self.inner, xid, false).await
    }

    async fn recover(&self) -> Result<Vec<Xid>> {
        self.inner.prepared_xids()
    }

    async fn health(&self) -> Result<()> {
        self.inner.usable_state(|_| ())?;
        let inner = Arc::clone(&self.inner);
        blocking(&self.inner.name, "health", move || {
            let area = &inner.area;
            crate::internal::io::dirs_writable(
                &inner.name,
                &[
                    ("Maildir", &inner.maildir),
                    ("Maildir tmp/", &area.tmp),
                    ("Maildir new/", &area.new),
                    ("private area", &area.private),
                ],
            )?;
            crate::internal::io::canary_file(&inner.name, &inner.scratch_file())
        })
        .await
    }

    async fn fence(&self, epoch: Epoch) -> Result<()> {
        lifecycle::fence(&self.inner, epoch).await
    }

    async fn fence_epoch(&self) -> Result<Epoch> {
        Instance::fence_epoch(&*self.inner)
    }

    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<()> {
        lifecycle::replay(&self.inner, redo, lsn).await
    }

    async fn replay_batch(&self, batch: &[(Lsn, Vec<u8>)]) -> Result<()> {
        lifecycle::replay_batch(&self.inner, batch).await
    }

    async fn inventory(&self) -> Result<Vec<crate::InventoryEntry>> {
        self.inner.usable_state(|_| ())?;
        let inner = Arc::clone(&self.inner);
        crate::internal::io::blocking(&self.inner.name, TASK, move || inner.inventory()).await
    }

    async fn applied_lsn(&self) -> Result<Lsn> {
        Instance::applied_lsn(&*self.inner)
    }

    async fn read_entry(&self, key: &str) -> Result<Option<BlobContent>> {
        internal_reseed::read_entry(&self.inner, key).await
    }

    async fn write_entry(&self, key: &str, content: BlobContent) -> Result<()> {
        internal_reseed::write_entry(&self.inner, key, content).await
    }

    async fn remove_entry(&self, key: &str) -> Result<()> {
        internal_reseed::remove_entry(&self.inner, key).await
    }

    async fn set_applied_lsn(&self, lsn: Lsn) -> Result<()> {
        internal_reseed::set_applied_lsn(&self.inner, lsn).await
    }

    fn redo_blobs(&self, redo: &[u8]) -> Result<Vec<BlobId>> {
        let entries =
            decode_redo(redo).map_err(|e| self.inner.rejected(format!("malformed redo: {e}")))?;
        Ok(shipping::distinct(entries.iter().filter_map(
            |entry| match entry {
                RedoEntry::Blob { id, .. } => Some(*id),
                _ => None,
            },
        )))
    }

    async fn open_blob(&self, id: &BlobId) -> Result<BlobContent> {
        shipping::open_shipped(&self.inner, id).await
    }

    async fn put_blob(&self, id: &BlobId, content: BlobContent) -> Result<()> {
        shipping::put_shipped(&self.inner, id, content).await
    }

    /// Collection (`internal::collect`): a delivered message is durable in `new/` before its
    /// `COMMITTED` (the commit syncs `new/`), so only the open branches need their blobs here,
    /// and there is nothing to settle.
    async fn collect_blobs(&self, retained: &dyn RetainedBlobs) -> Result<BlobsCollected> {
        collect_blobs(&self.inner, retained, async { Ok(()) }).await
    }
}

/// A message of a branch: its xid and position (what a refusal names).
#[derive(Clone, Copy)]
struct At {
    xid: Xid,
    pos: u32,
}

impl shipping::BlobHolder for Inner {
    const BLOB_TASK: &'static str = TASK;

    fn blob_store(&self) -> &BlobStore {
        &self.blobs
    }

    fn adoptions(&self) -> &Adoptions {
        &self.adoptions
    }

    fn temp_file(&self) -> PathBuf {
        self.scratch_file()
    }

    fn blob_bytes_max(&self) -> u64 {
        self.config.max_message_bytes
    }

    fn blobs_in_use(&self) -> Result<HashSet<BlobId>> {
        Inner::blobs_in_use(self)
    }
}

impl Instance for Inner {
    type State = State;
    const KIND: &'static str = "mail";

    fn name(&self) -> &str {
        &self.name
    }

    fn state_mutex(&self) -> &Mutex<State> {
        &self.state
    }
}

impl InstanceState for State {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn shared_mut(&mut self) -> &mut Shared {
        &mut self.shared
    }

    fn prepared(&self) -> Vec<Xid> {
        self.branches.prepared()
    }
}

impl log::Logged for Branch {
    fn log_floor(&self) -> Option<Lsn> {
        self.log_floor
    }

    fn prepared_redo(&self) -> Option<Cow<'_, [u8]>> {
        let prepared = self.prepared.as_ref()?;
        Some(Cow::Borrowed(&prepared.redo))
    }
}

// State transitions: each takes the state lock once and does no I/O.
impl Inner {}

// Async steps that wait or stream.
impl Inner {
    /// Trims the log (see the `log` module) when about half a segment was appended since the
    /// last trim; one at a time.
    async fn maybe_trim(self: &Arc<Self>) -> Result<()> {
        let Ok(_trimming) = self.trimming.try_lock() else {
            return Ok(());
        };
        let since = {
            let mut last = lock(&self.trims);
            let appended = self.log.stats().bytes;
            if appended.saturating_sub(last.at_bytes) < log::SEGMENT_BYTES_MAX / 2 {
                return Ok(());
            }
            let since = last.at_lsn;
            last.at_bytes = appended;
            last.at_lsn = self.log.durable_lsn();
            since
        };
        let worker = self.clone();
        let result = blocking(&self.name, TASK, move || worker.trim(since)).await;
        self.check(result)
    }
}

// Blocking file work: run on the blocking pool, no state lock held.
impl Inner {
    /// The blobs the open branches' prepare records name.
    fn blobs_in_use(&self) -> Result<HashSet<BlobId>> {
        let redos: Vec<Arc<Prepared>> = self.usable_state(|st| {
            st.branches
                .iter()
                .filter_map(|(_, _, branch)| branch.prepared.clone())
                .collect()
        })?;
        let mut in_use = HashSet::new();
        for prepared in redos {
            let entries = decode_redo(&prepared.redo).map_err(|e| {
                self.fatal(format!("a prepared branch's redo does not decode: {e}"))
            })?;
            in_use.extend(entries.iter().filter_map(|entry| match entry {
                RedoEntry::Blob { id, .. } => Some(*id),
                RedoEntry::Inline { .. } => None,
            }));
        }
        Ok(in_use)
    }

    /// One trim (see the `log` module): branches prepared below `since` (the durable LSN when
    /// the previous trim started) and still prepared get their record appended again, then the
    /// segments below the oldest record still needed are removed.
    fn trim(&self, since: Lsn) -> Result<()> {
        let carry_error = |e| log_error(&self.name, FEWER, "carry a prepare record forward", e);
        let trim =
            log::start_trim(&self.log, &self.state().branches, since).map_err(carry_error)?;
        let floor = trim
            .carried(|xid, lsn| self.set_log_floor(xid, lsn))
            .map_err(carry_error)?;
        let removed = self
            .log
            .remove_segments_below(floor)
            .map_err(|e| log_error(&self.name, FEWER, "remove old segments", e))?;
        tracing::debug!(resource = %self.name, %floor, removed, "branch log trimmed");
        Ok(())
    }

    fn write_state(&self, what: &str, file: &Path, value: u64) -> Result<()> {
        let tmp = self.scratch_file();
        let written =
            overwrite_synced(&self.name, what, &tmp, &encode_state(value)).and_then(|()| {
                fs::rename(&tmp, file).map_err(|e| {
                    ResourceError::io(
                        &self.name,
                        &format!("rename {what} into place at"),
                        file,
                        &e,
                    )
                })?;
                self.dirs.sync(&self.area.private)
            });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    fn scratch_file(&self) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.area.scratch.join(format!("{n}.tmp"))
    }
}

impl Area {
    fn new(maildir: &Path) -> Area {
        let private = maildir.join(PRIVATE_DIR);
        Area {
            tmp: maildir.join("tmp"),
            new: maildir.join("new"),
            cur: maildir.join("cur"),
            log: private.join("log"),
            blobs: private.join("blobs"),
            scratch: private.join("tmp"),
            fence: private.join("fence"),
            applied_lsn: private.join("applied_lsn"),
            private,
        }
    }
}

impl Branch {
    fn new(time: u64) -> Branch {
        Branch {
            time,
            next_pos: 0,
            messages: BTreeMap::new(),
            memory_bytes: 0,
            prepared: None,
            log_floor: None,
            recovered: false,
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The names in a directory (those that are UTF-8: every name this resource makes is).
fn list_names(name: &str, dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| ResourceError::io(name, "list", dir, &e))? {
        let entry = entry.map_err(|e| ResourceError::io(name, "list", dir, &e))?;
        if let Ok(file_name) = entry.file_name().into_string() {
            names.push(file_name);
        }
    }
    Ok(names)
}
