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
//!   a delivery (DESIGN.md "Ordering").
//! * **Fencing and replay.** [`Resource::fence`] stores the fence epoch durably in the private
//!   area; a branch of a lower epoch is refused at begin, at every enqueue and at prepare. A
//!   fence waits for the prepares, commits and rollbacks in flight, and then the fenced
//!   instance refuses to resolve the prepared branches it began below the new epoch; an instance
//!   opened afterwards (their new owner) resolves them (`internal::branches`, "Fences and
//!   owners").
//!   [`Resource::replay`] delivers a redo's messages (inline content, or copied from this
//!   resource's blob store, checked against the blob's hash) under their names, skipping any
//!   already in `new/` or `cur/`, then stores its LSN.
//!
//! [`MailResource`] is the resource ([`MailResource::open`], [`MailConfig`]); a [`MailBranch`]
//! is an application's handle on one branch; [`RedoEntry`] with [`encode_redo`] and
//! [`decode_redo`] is the redo (format in the `redo` module). Begin, prepare, commit, rollback,
//! fence and replay run the branch lifecycle the resources share (`internal::lifecycle`); the
//! `steps` module holds the mail resource's own part of each.
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
//! * **During replay**: `applied_lsn` is written only after every message of the redo is in
//!   `new/` and `new/` is synced. A crash before that leaves `applied_lsn` at the previous LSN,
//!   so the replayer sends the same redo again; the names are the same, each message already in
//!   `new/` or `cur/` is skipped, and only the missing ones are delivered: exactly once. A crash
//!   after it makes the same LSN a no-op.
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
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use journal::{BlobConfig, BlobId, BlobStore, Journal};
use tokio::io::AsyncRead;

use crate::dirsync::DirSync;
use crate::internal::branch_log;
use crate::internal::branches::Branches;
use crate::internal::collect::{Adoptions, collect_blobs};
use crate::internal::instance::{Gate, Instance, InstanceState, Shared, lock};
use crate::internal::io::{
    blob_error, blocking, create_dir_durably, fill, lock_private, log_error, remove_file_if_exists,
    sync_file,
};
use crate::internal::lifecycle;
use crate::internal::pauses::Pauses;
use crate::internal::shipping;
use crate::internal::state_file::{encode_state, read_state_file};
use crate::{
    BlobContent, BlobsCollected, Epoch, Lsn, Resource, ResourceError, RetainedBlobs, Vote, Xid,
};

mod log;
mod message;
mod name;
mod redo;
mod steps;

pub use message::{
    Checker, HEADER_LINE_BYTES_MAX, MessageBuilder, MessageError, check_message, rfc5322_date,
};
pub use name::NAME_BYTES_MAX;
pub use redo::{RedoEntry, decode_redo, encode_redo};

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
    /// Serializes replays, so that the LSN check and the delivery are one step.
    replaying: tokio::sync::Mutex<()>,
    /// The fence gate: prepares, commits and rollbacks hold it shared, a fence exclusively
    /// (see `Gate`).
    gate: Gate,
    /// Pauses tests arm inside operations.
    pauses: Pauses,
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
    /// Opens the resource on the Maildir at `maildir`: checks it is one (or creates what is
    /// missing, when `config.create` says so), creates the private area if needed, takes its
    /// lock, reads the fence epoch and applied LSN and the prepared branches, and removes from
    /// `tmp/` the messages of branches that never prepared. Blocking: call it from
    /// `spawn_blocking` when a runtime must not stall.
    pub fn open(name: &str, maildir: &Path, config: MailConfig) -> Result<Arc<MailResource>> {
        // Not shared until `open` returns: no sync here waits on another thread.
        let dirs = DirSync::new(name);
        let maildir = open_maildir(name, &dirs, maildir, &config)?;
        let area = Area::new(&maildir);
        for dir in [&area.private, &area.scratch] {
            create_dir_durably(name, &dirs, dir)?;
        }
        let lock = lock_private(name, &area.private, "Maildir")?;
        clear_dir(name, &area.scratch)?;
        let blobs = open_blobs(name, &area, &config)?;
        let fence = Epoch(read_state_file(name, &area.fence)?);
        let applied_lsn = Lsn(read_state_file(name, &area.applied_lsn)?);
        let (log, live) =
            log::open(&area.log).map_err(|e| log::log_open_error(name, &area.log, e))?;
        let branches = load_prepared(name, live)?;
        remove_orphans(name, &area, &branches)?;
        tracing::info!(resource = name, maildir = %maildir.display(), prepared = branches.len(), %fence, %applied_lsn, "mail resource open");
        let state = State {
            shared: Shared {
                fence,
                applied_lsn,
                poisoned: None,
            },
            branches,
        };
        let inner = Inner {
            name: name.to_string(),
            maildir,
            area,
            host: message::host_name(),
            blobs,
            dirs,
            log,
            config,
            state: Mutex::new(state),
            trims: Mutex::new(Trims {
                at_bytes: 0,
                at_lsn: Lsn::ZERO,
            }),
            trimming: tokio::sync::Mutex::new(()),
            replaying: tokio::sync::Mutex::new(()),
            gate: Gate::default(),
            pauses: Pauses::default(),
            adoptions: Adoptions::default(),
            next_tmp: AtomicU64::new(0),
            _lock: lock,
        };
        Ok(Arc::new(MailResource {
            inner: Arc::new(inner),
        }))
    }

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
        self.inner.pauses.arm_prepare(xid)
    }

    /// For tests: the next replay applies part of its redo (its first entry) and then fails,
    /// as if the process died there (the conformance suite's
    /// `replay_on_an_empty_instance_gives_the_same_state`).
    pub fn fail_next_replay(&self) {
        self.inner.pauses.arm_replay_failure();
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

impl MailBranch {
    /// The xid of the branch.
    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// Streams an RFC 5322 message into the branch; it is delivered when the branch commits.
    /// Refused ([`ResourceError::Rejected`], naming the resource, the branch, the message's
    /// position and the [`MessageError`]) when it is not a valid message, is over
    /// `max_message_bytes`, or the branch is not active; nothing of a refused message stays.
    pub async fn enqueue(&self, mut message: impl AsyncRead + Unpin) -> Result<Enqueued> {
        let inner = &self.inner;
        let (at, name, keep) = inner.reserve(&self.xid)?;
        let staged = inner.stage(at, name, keep, &mut message).await?;
        inner.record(at, staged).await
    }

    /// Builds the message of `builder` and enqueues it; refused like [`MailBranch::enqueue`],
    /// and when the builder's fields cannot make a message (a CR or LF in a field, no
    /// recipient, …).
    pub async fn enqueue_built(&self, builder: &MessageBuilder) -> Result<Enqueued> {
        let message = builder.build().map_err(|e| {
            self.inner
                .rejected(format!("message for branch {} refused: {e}", self.xid))
        })?;
        self.enqueue(&message[..]).await
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

    async fn fence(&self, epoch: Epoch) -> Result<()> {
        lifecycle::fence(&self.inner, epoch).await
    }

    async fn fence_epoch(&self) -> Result<Epoch> {
        Instance::fence_epoch(&*self.inner)
    }

    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<()> {
        lifecycle::replay(&self.inner, redo, lsn).await
    }

    async fn applied_lsn(&self) -> Result<Lsn> {
        Instance::applied_lsn(&*self.inner)
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
impl Inner {
    /// Gives the next message of `xid` its position and name, and says how many bytes of it may
    /// stay in memory.
    fn reserve(&self, xid: &Xid) -> Result<(At, String, u64)> {
        let mut st = self.state();
        self.usable(&st)?;
        self.not_fenced(&st, xid)?;
        let branch = st.branches.active(self, xid, "messages")?;
        if branch.next_pos as usize >= BRANCH_MESSAGES_MAX {
            return Err(self.rejected(format!(
                "branch {xid} already has BRANCH_MESSAGES_MAX = {BRANCH_MESSAGES_MAX} messages; send the rest in another transaction"
            )));
        }
        let pos = branch.next_pos;
        branch.next_pos += 1;
        let name = name::message_name(branch.time, xid, pos, &self.host);
        let room = INLINE_BRANCH_BYTES_MAX.saturating_sub(branch.memory_bytes);
        Ok((
            At { xid: *xid, pos },
            name,
            room.min(INLINE_MESSAGE_BYTES_MAX),
        ))
    }
}

// Async steps that wait or stream.
impl Inner {
    /// Reads, checks and stages one message: in memory while it fits in `keep` bytes, else in
    /// its file `tmp/<name>`, streamed. Nothing stays behind on failure.
    async fn stage(
        &self,
        at: At,
        name: String,
        keep: u64,
        message: &mut (impl AsyncRead + Unpin),
    ) -> Result<Staged> {
        let mut checker = Checker::new(self.config.max_message_bytes);
        let mut input = vec![0u8; HEAD_CHUNK_BYTES];
        let mut head = Vec::new();
        loop {
            let n = fill(message, &mut input)
                .await
                .map_err(|e| self.refused(at, &MessageError::Read(e.to_string())))?;
            if n == 0 {
                checker.finish().map_err(|e| self.refused(at, &e))?;
                let content = Content::Memory(Arc::from(head));
                return Ok(Staged { name, content });
            }
            checker
                .push(&input[..n], &mut head)
                .map_err(|e| self.refused(at, &e))?;
            if head.len() as u64 > keep {
                break;
            }
        }
        drop(input);
        let file = self.area.tmp.join(&name);
        let streamed = self.stream_to(at, &file, checker, head, message).await;
        match streamed {
            Ok((id, bytes)) => Ok(Staged {
                name,
                content: Content::File { id, bytes },
            }),
            Err(e) => Err(self.discard(&file, e).await),
        }
    }

    /// Streams the rest of a message into the new file `file`, starting with `head` (already
    /// checked): one chunk at a time, each checked, hashed and written on the blocking pool.
    /// Returns the content's blob id and size.
    async fn stream_to(
        &self,
        at: At,
        file: &Path,
        mut checker: Checker,
        head: Vec<u8>,
        message: &mut (impl AsyncRead + Unpin),
    ) -> Result<(BlobId, u64)> {
        let (name, target) = (self.name.clone(), file.to_path_buf());
        let (mut out, mut hasher) = blocking(&self.name, TASK, move || {
            let mut out = create_new(&name, "message file", &target)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(&head);
            out.write_all(&head)
                .map_err(|e| ResourceError::io(&name, "write message to", &target, &e))?;
            Ok((out, hasher))
        })
        .await?;
        let mut input = vec![0u8; CHUNK_BYTES];
        let mut normalised = Vec::new();
        loop {
            let n = fill(message, &mut input)
                .await
                .map_err(|e| self.refused(at, &MessageError::Read(e.to_string())))?;
            if n == 0 {
                break;
            }
            let (name, target) = (self.name.clone(), file.to_path_buf());
            (checker, hasher, out, input, normalised) = blocking(&self.name, TASK, move || {
                normalised.clear();
                checker
                    .push(&input[..n], &mut normalised)
                    .map_err(|e| refused(&name, at, &e))?;
                hasher.update(&normalised);
                out.write_all(&normalised)
                    .map_err(|e| ResourceError::io(&name, "write message to", &target, &e))?;
                Ok((checker, hasher, out, input, normalised))
            })
            .await?;
        }
        let bytes = checker.finish().map_err(|e| self.refused(at, &e))?;
        Ok((BlobId(*hasher.finalize().as_bytes()), bytes))
    }

    /// Adds a staged message to its branch; a message that lost a race with prepare or rollback
    /// is discarded.
    async fn record(&self, at: At, staged: Staged) -> Result<Enqueued> {
        let bytes = match &staged.content {
            Content::Memory(content) => content.len() as u64,
            Content::File { bytes, .. } => *bytes,
        };
        let enqueued = Enqueued {
            name: staged.name.clone(),
            bytes,
        };
        let refused = {
            let mut st = self.state();
            match st.branches.active(self, &at.xid, "messages") {
                Ok(branch) => {
                    if let Content::Memory(_) = staged.content {
                        branch.memory_bytes += bytes;
                    }
                    branch.messages.insert(at.pos, staged);
                    None
                }
                Err(e) => Some((e, staged)),
            }
        };
        match refused {
            None => Ok(enqueued),
            Some((e, staged)) => {
                if let Content::File { .. } = staged.content {
                    let file = self.area.tmp.join(&staged.name);
                    return Err(self.discard(&file, e).await);
                }
                Err(e)
            }
        }
    }

    /// Removes the file of a message whose enqueue failed, and returns the failure.
    async fn discard(&self, file: &Path, e: ResourceError) -> ResourceError {
        let (name, file) = (self.name.clone(), file.to_path_buf());
        let _ = blocking(&self.name, TASK, move || {
            remove_file_if_exists(&name, &file)
        })
        .await;
        e
    }

    fn refused(&self, at: At, e: &MessageError) -> ResourceError {
        refused(&self.name, at, e)
    }

    /// Prepares a branch: its messages written and synced in `tmp/` on the blocking pool, then
    /// its record appended to the log and waited for.
    async fn prepare_branch(
        self: &Arc<Self>,
        xid: &Xid,
        messages: Vec<Staged>,
    ) -> Result<(Arc<Prepared>, Lsn)> {
        let (worker, id) = (self.clone(), *xid);
        let entries = blocking(&self.name, TASK, move || {
            worker.write_prepared(&id, &messages)
        })
        .await?;
        let redo = encode_redo(&entries);
        let names = entries.iter().map(|e| e.name().to_string()).collect();
        let set_floor = |floor| self.set_log_floor(xid, floor);
        let (name, log, dir) = (&self.name, &self.log, &self.area.log);
        let lsn = branch_log::append_prepared(name, FEWER, log, dir, xid, &redo, set_floor).await?;
        Ok((Arc::new(Prepared { names, redo }), lsn))
    }

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
    /// The entries of a branch's prepare record, once it takes no more messages: each message is
    /// in its file in `tmp/` and synced (a message in memory is written there first), `tmp/` is
    /// synced; a message over the inline limits is adopted into the blob store.
    fn write_prepared(&self, xid: &Xid, messages: &[Staged]) -> Result<Vec<RedoEntry>> {
        let mut inline_left = INLINE_BRANCH_BYTES_MAX;
        let mut entries = Vec::with_capacity(messages.len());
        for staged in messages {
            let name = staged.name.clone();
            let file = self.area.tmp.join(&name);
            let entry = match &staged.content {
                Content::Memory(content) => {
                    // A prepare that failed earlier may have written the file: written again.
                    overwrite_synced(&self.name, "message", &file, content)?;
                    let bytes = content.len() as u64;
                    if bytes <= inline_left && bytes <= INLINE_MESSAGE_BYTES_MAX {
                        inline_left -= bytes;
                        let content = content.to_vec();
                        RedoEntry::Inline { name, content }
                    } else {
                        // Over the branch's inline budget after all (concurrent enqueues).
                        let id = BlobId::of(content);
                        self.adopt(&file, &id)?;
                        RedoEntry::Blob { name, id, bytes }
                    }
                }
                Content::File { id, bytes } => {
                    self.sync_staged(xid, &file, *bytes)?;
                    self.adopt(&file, id)?;
                    let (id, bytes) = (*id, *bytes);
                    RedoEntry::Blob { name, id, bytes }
                }
            };
            entries.push(entry);
        }
        self.dirs.sync(&self.area.tmp)?;
        Ok(entries)
    }

    fn adopt(&self, file: &Path, id: &BlobId) -> Result<()> {
        self.blobs
            .adopt(file, id)
            .map_err(|e| blob_error(&self.name, e))?;
        self.adoptions.note(id);
        Ok(())
    }

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

    /// Syncs a message streamed into `tmp/` at enqueue, after checking it is still the size it
    /// was written with.
    fn sync_staged(&self, xid: &Xid, file: &Path, bytes: u64) -> Result<()> {
        let opened = File::open(file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => self.rejected(format!(
                "the staged message {} of branch {xid} is missing: tmp/ was changed by hand; roll the transaction back",
                file.display()
            )),
            _ => ResourceError::io(&self.name, "open staged message", file, &e),
        })?;
        let len = opened
            .metadata()
            .map_err(|e| ResourceError::io(&self.name, "inspect staged message", file, &e))?
            .len();
        if len != bytes {
            return Err(self.rejected(format!(
                "the staged message {} of branch {xid} is {len} bytes, {bytes} were written: it was changed by hand; roll the transaction back",
                file.display()
            )));
        }
        sync_file(&self.name, &opened, file)
    }

    /// Commit: renames each message from `tmp/` into `new/`, then syncs `new/`. A message not in
    /// `tmp/` was delivered by an earlier attempt. For a branch recovered at open, a message
    /// already in `new/` or `cur/` is not renamed again (a copy of it in `tmp/` is unlinked):
    /// see "Crashes" in the module docs.
    fn deliver(&self, xid: &Xid, names: &[String], recovered: bool) -> Result<()> {
        let mut cur = None;
        for name in names {
            let staged = self.area.tmp.join(name);
            if recovered && self.delivered(name, &mut cur)? {
                remove_file_if_exists(&self.name, &staged)?;
                continue;
            }
            match fs::rename(&staged, self.area.new.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !self.delivered(name, &mut cur)? {
                        tracing::warn!(resource = %self.name, %xid, message = %name, "message is neither in tmp/ nor delivered (removed by a reader, or by hand); not delivered again");
                    }
                }
                Err(e) => {
                    let action = format!("deliver message {name} of {xid} (rename into new/) from");
                    return Err(ResourceError::io(&self.name, &action, &staged, &e));
                }
            }
        }
        self.dirs.sync(&self.area.new)
    }

    /// Whether message `name` is in `new/` or `cur/` (under its name with a reader's suffix).
    /// `cur` caches the listing of `cur/`, read at the first call that needs it.
    fn delivered(&self, name: &str, cur: &mut Option<Vec<String>>) -> Result<bool> {
        if fs::symlink_metadata(self.area.new.join(name)).is_ok() {
            return Ok(true);
        }
        if cur.is_none() {
            *cur = Some(list_names(&self.name, &self.area.cur)?);
        }
        Ok(cur
            .as_ref()
            .is_some_and(|entries| entries.iter().any(|e| name::is_entry_of(e, name))))
    }

    /// Rollback: unlinks the branch's messages from `tmp/`, without syncing (a file that comes
    /// back after a crash belongs to a branch that is not prepared, and `open` removes it).
    fn unlink_staged(&self, names: &[String]) -> Result<()> {
        for name in names {
            remove_file_if_exists(&self.name, &self.area.tmp.join(name))?;
        }
        Ok(())
    }

    /// Replay: delivers every message not in `new/` or `cur/` yet (written to `tmp/` and synced,
    /// then renamed into `new/`), syncs `new/`, then stores `lsn` as applied (see "Crashes").
    fn replay_messages(&self, entries: &[RedoEntry], lsn: Lsn) -> Result<()> {
        let mut cur = None;
        for (n, entry) in entries.iter().enumerate() {
            if n == 1 && self.pauses.replay_fails_here() {
                return Err(self.unavailable(format!(
                    "replay of lsn {lsn} stopped by its fail point after its first message"
                )));
            }
            let name = entry.name();
            if self.delivered(name, &mut cur)? {
                continue;
            }
            let staged = self.area.tmp.join(name);
            let written = match entry {
                RedoEntry::Inline { content, .. } => {
                    overwrite_synced(&self.name, "replayed message", &staged, content)
                }
                RedoEntry::Blob { id, bytes, .. } => self.copy_blob(name, id, *bytes, &staged),
            };
            let delivered = written.and_then(|()| {
                fs::rename(&staged, self.area.new.join(name)).map_err(|e| {
                    ResourceError::io(&self.name, "rename replayed message from", &staged, &e)
                })
            });
            if delivered.is_err() {
                let _ = fs::remove_file(&staged);
            }
            delivered?;
        }
        self.dirs.sync(&self.area.new)?;
        self.write_state("applied lsn", &self.area.applied_lsn, lsn.0)
    }

    /// Copies blob `id` (of `bytes` bytes, the message `name`) to the new file `dest`, synced;
    /// the blob store checks the content against its hash as it is read.
    fn copy_blob(&self, name: &str, id: &BlobId, bytes: u64, dest: &Path) -> Result<()> {
        let mut reader = self
            .blobs
            .open_blob(id)
            .map_err(|e| blob_error(&self.name, e))?;
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dest)
            .map_err(|e| ResourceError::io(&self.name, "create", dest, &e))?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut copied = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(blob_error(&self.name, reader.into_error(e))),
            };
            out.write_all(&buf[..n])
                .map_err(|e| ResourceError::io(&self.name, "write", dest, &e))?;
            copied += n as u64;
        }
        if copied != bytes {
            return Err(self.fatal(format!(
                "blob {id} of message {name} is {copied} bytes, the redo says {bytes}"
            )));
        }
        sync_file(&self.name, &out, dest)
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

/// A refused message: names the resource, the branch and the message's position.
fn refused(resource: &str, at: At, e: &MessageError) -> ResourceError {
    let At { xid, pos } = at;
    ResourceError::rejected(
        resource,
        format!("message {pos} of branch {xid} refused: {e}"),
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks that `path` is a Maildir (a directory with `tmp/`, `new/` and `cur/`), creating what
/// is missing when `config.create` says so; returns its canonical path.
fn open_maildir(name: &str, dirs: &DirSync, path: &Path, config: &MailConfig) -> Result<PathBuf> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(ResourceError::rejected(
                name,
                format!("{} is not a directory, so not a Maildir", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && config.create => {
            fs::create_dir_all(path)
                .map_err(|e| ResourceError::io(name, "create Maildir", path, &e))?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                dirs.sync(parent)?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let reason = format!(
                "Maildir {} does not exist; create it (with tmp/, new/ and cur/) or set create = true",
                path.display()
            );
            return Err(ResourceError::rejected(name, reason));
        }
        Err(e) => return Err(ResourceError::io(name, "inspect Maildir", path, &e)),
    }
    for sub in ["tmp", "new", "cur"] {
        let dir = path.join(sub);
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                let reason = format!(
                    "{} is not a Maildir: its {sub} ({}) is not a directory",
                    path.display(),
                    dir.display()
                );
                return Err(ResourceError::rejected(name, reason));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && config.create => {
                create_dir_durably(name, dirs, &dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let reason = format!(
                    "{} is not a Maildir: its subdirectory {sub}/ is missing (a Maildir has tmp/, new/ and cur/); create it, or set create = true to let concord create what is missing",
                    path.display()
                );
                return Err(ResourceError::rejected(name, reason));
            }
            Err(e) => return Err(ResourceError::io(name, "inspect", &dir, &e)),
        }
    }
    fs::canonicalize(path).map_err(|e| ResourceError::io(name, "resolve Maildir", path, &e))
}

/// Empties a directory of files (temp files of interrupted writes). Not shared with the files
/// resource's: that one also removes directories (staging), which the private area here never holds.
fn clear_dir(name: &str, dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| ResourceError::io(name, "list", dir, &e))? {
        let path = entry
            .map_err(|e| ResourceError::io(name, "list", dir, &e))?
            .path();
        fs::remove_file(&path).map_err(|e| ResourceError::io(name, "remove", &path, &e))?;
    }
    Ok(())
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

fn open_blobs(name: &str, area: &Area, config: &MailConfig) -> Result<BlobStore> {
    let blob_config = BlobConfig {
        blob_bytes_max: config.max_message_bytes,
        chunk_bytes: CHUNK_BYTES,
        create_if_missing: true,
    };
    BlobStore::open(&area.blobs, blob_config).map_err(|e| blob_error(name, e))
}

/// The prepared branches, from the live records of the branch log.
fn load_prepared(name: &str, live: log::Live) -> Result<Branches<Branch>> {
    let mut branches = HashMap::new();
    for (xid, (lsn, redo)) in live.branches {
        let entries = decode_redo(&redo).map_err(|e| ResourceError::Fatal {
            resource: name.to_string(),
            message: format!(
                "the branch log's prepare record of {xid} (lsn {lsn}) does not decode: {e}"
            ),
        })?;
        let names = entries.iter().map(|e| e.name().to_string()).collect();
        let mut branch = Branch::new(0);
        branch.log_floor = Some(lsn);
        branch.recovered = true;
        branch.prepared = Some(Arc::new(Prepared { names, redo }));
        branches.insert(xid, branch);
    }
    Ok(Branches::recovered(branches))
}

/// Removes from `tmp/` every message this resource named for a branch that is not prepared
/// (presumed abort, or a copy left by a finished commit or a replay); other files are left.
fn remove_orphans(name: &str, area: &Area, branches: &Branches<Branch>) -> Result<()> {
    let mut removed = 0usize;
    for file_name in list_names(name, &area.tmp)? {
        let Some((xid, _)) = name::parse_name(&file_name) else {
            continue;
        };
        if branches.contains(&xid) {
            continue;
        }
        remove_file_if_exists(name, &area.tmp.join(&file_name))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(
            resource = name,
            removed,
            "removed from tmp/ the messages of branches that are not prepared"
        );
    }
    Ok(())
}

fn create_new(name: &str, what: &str, path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ResourceError::io(name, &format!("create {what}"), path, &e))
}

/// Writes `content` to `path`, created or truncated (a file an earlier attempt left there is
/// written again), and syncs it. The files resource's `create_synced` differs: it refuses an
/// existing file.
fn overwrite_synced(name: &str, what: &str, path: &Path, content: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| ResourceError::io(name, &format!("create {what} file"), path, &e))?;
    file.write_all(content)
        .map_err(|e| ResourceError::io(name, &format!("write {what} to"), path, &e))?;
    sync_file(name, &file, path)
}
