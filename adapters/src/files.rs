//! The files resource: a directory tree whose changes commit with the transaction.
//!
//! A branch writes files under a **root** directory: it puts content at relative paths and
//! deletes paths. Nothing it writes is visible in the tree until the branch commits; then all of
//! it appears, each file by one `rename`. The idea is the classic one of staging plus an atomic
//! rename, with a write-ahead log for durability and a lock per path for isolation:
//!
//! * **Staging.** [`FilesBranch::put`] reads the content from an async reader in bounded chunks.
//!   Small content (at most [`INLINE_FILE_BYTES_MAX`], and at most [`INLINE_BRANCH_BYTES_MAX`]
//!   per branch) is kept in memory; larger content streams into a private staging file,
//!   hashed with blake3 as it goes, so a file of any size (up to `file_bytes_max`) never sits in
//!   memory. [`FilesBranch::delete`] only records the intent. The branch reads its own writes
//!   ([`FilesBranch::read`], [`FilesBranch::open_read`]); other branches see the committed tree.
//! * **Prepare** appends one `PREPARED` record to the resource's **branch log** (a
//!   [`journal::Journal`] of its own, group-committed: concurrent prepares share one
//!   `fdatasync`) and waits until it is durable. The record holds the branch's **redo**: small
//!   content inline, larger content by blob id (the staged file is synced and hard-linked into
//!   the resource's blob store by [`BlobStore::adopt`] first: no copy), and the deletes. A branch
//!   with a durable `PREPARED` and no resolution after it is prepared: it survives a crash and
//!   is listed by `recover`; any other branch is presumed aborted when the resource opens. The
//!   vote carries the same redo, which a standby replays.
//! * **Commit** puts every file in place by `rename` (a small file's content is written to a
//!   temp file first, unless its staged file is at hand), removes every deleted path, then
//!   appends `COMMITTED` and waits for it. Neither the content of a file nor the directories it
//!   changed are synced here: the log holds the whole redo (small content inline, large content
//!   by blob, deletes), and every commit the log records after its last **checkpoint** is
//!   applied again when the resource opens, so a name or a content that a power failure lost is
//!   put back before anything reads it through concord. A checkpoint — a `syncfs` of the root's
//!   file system, which writes out directories as well as contents, then a `CHECKPOINT` record
//!   — runs about once a second while commits happen, and trims the log (see the `log` module).
//!   **Rollback** removes the staged files and appends `ROLLED_BACK`. Both are idempotent.
//! * **Locks.** A path a branch writes (put or delete) is locked until the branch is resolved,
//!   together with an *intent* on each of its ancestor directories, so that one branch writing
//!   `a` and another writing `a/b` conflict as well. This keeps the journal order the commit
//!   order (docs/design.md "Ordering"). A second writer waits at most `lock_wait_ms_max`, then fails
//!   with [`ResourceError::Conflict`]. The locks of prepared branches are taken again when the
//!   resource opens, from their prepare records, so isolation survives a restart.
//! * **Confinement.** A path is relative, `/`-separated, UTF-8, without empty, `.` or `..`
//!   components or NUL bytes, and not under `.concord`; every existing prefix of it is checked on
//!   disk, and a symlink is followed only when it resolves inside the root and outside the private
//!   area. Every refusal is a [`ResourceError::Rejected`] naming the path and the reason.
//! * **Fencing and replay.** [`Resource::fence`] stores the fence epoch durably; a branch of a
//!   lower epoch is refused at begin, at every write and at prepare. A fence waits for the
//!   prepares, commits and rollbacks in flight, and then the fenced instance refuses to resolve
//!   the prepared branches it began below the new epoch; an instance opened afterwards (their
//!   new owner) resolves them (`internal::branches`, "Fences and owners"). [`Resource::replay`]
//!   and [`Resource::replay_batch`] apply redos (inline content, or content from this
//!   resource's blob store) together with the last LSN, syncing every file they write once per
//!   batch.
//! * **Inventory.** [`Resource::inventory`] lists every file of the tree outside the private
//!   area by relative path, with the blake3 hash of its content, read through one bounded buffer
//!   (the `inventory` module).
//! * **Re-seeding.** [`Resource::read_entry`], [`Resource::write_entry`] and
//!   [`Resource::remove_entry`] read, set and remove one file by its inventory key, streamed and
//!   durably; no component of the key may be a symlink. [`Resource::set_applied_lsn`] sets the
//!   applied LSN a re-seeded standby replays after (the `reseed` module).
//!
//! [`FilesResource`] is the resource ([`FilesResource::open`], [`FilesConfig`]); a
//! [`FilesBranch`] is an application's handle on one branch; [`RedoEntry`] with [`encode_redo`]
//! and [`decode_redo`] is the redo.
//!
//! # On disk
//!
//! ```text
//! <root>/…                          the user's files
//! <root>/.concord/LOCK              held (flock) by the one instance that has the root open
//! <root>/.concord/log/              the branch log (a journal: segments and its own LOCK)
//! <root>/.concord/staging/<xid>.<n> the staged content of a large put (cleared at open)
//! <root>/.concord/blobs/            a journal::BlobStore: the content of every prepared large put
//! <root>/.concord/fence             the fence epoch
//! <root>/.concord/applied_lsn       the LSN of the last replayed redo
//! <root>/.concord/tmp/              temp files of writes in progress (cleared at open)
//! ```
//!
//! `fence` and `applied_lsn` are written the same way: a temp file under `tmp/`, synced,
//! renamed into place, and the directory synced. They hold a version byte, the value (u64
//! little-endian) and the first 8 bytes of the blake3 hash of the two; a damaged one refuses to
//! open ([`ResourceError::Fatal`]). The branch log's records are described in the `log` module.
//!
//! **Directory syncs are shared.** Concurrent branches commit into the same directories, so
//! every directory sync here — after a create, a rename into it or a removal from it — goes
//! through one coalescer per instance (`dirsync::DirSync`): a caller takes a ticket after its
//! change, and returns only once an `fsync` of that directory that *started after its ticket was
//! taken* has succeeded; callers that queue behind a running `fsync` share the next one. This is
//! as durable as one `fsync` per caller, because a directory `fsync` makes durable every change
//! made to the directory before it started, and no caller is acknowledged on an `fsync` that
//! started before its change. A failed `fsync` is returned as [`ResourceError::Fatal`] to every
//! caller it was to cover and fails every later directory sync of the instance at once (never
//! retried as if fine), and the `Fatal` poisons the instance. The coalescer blocks waiting
//! callers, so it runs only on the blocking pool (or in `open`, before the instance is shared);
//! it holds an entry only for a directory being synced right now.
//!
//! # The modules
//!
//! * `open` — opening: the root, the private area, the branch log's prepared branches and
//!   the commits it applies again.
//! * `redo` — [`RedoEntry`] and its encoding (the format is described there).
//! * `staging` — puts, deletes and reads of a branch, and what prepare makes of them.
//! * `locks` — the path locks and intents, taken at the first write, released at resolution.
//! * `confine` — the lexical and on-disk checks that keep every path inside the root.
//! * `apply` — commit, the commits applied again at open, and replay (a batch at a time).
//! * `inventory` — the files of the tree with their content's hash.
//! * `reseed` — a re-seed's reads, writes and removals by inventory key.
//! * `checkpoint` — the branch log's checkpoints and trims, and blob collection.
//! * `log` — the branch log's records.
//! * `steps` — the files resource's hooks of the branch lifecycle every resource shares
//!   (`internal::lifecycle`: begin, prepare, resolve, fence, replay).
//!
//! # Crashes
//!
//! * **During put or prepare, before the `PREPARED` record is durable**: the branch is not
//!   prepared; at open, the staging is cleared (presumed abort); blobs it adopted stay, named by
//!   nothing.
//! * **During commit, before `COMMITTED` is durable**: the branch is prepared after the restart
//!   and the coordinator commits it again, from the record: inline content is written again, a
//!   large put is linked again from its blob, deletes are repeated. Applying it twice gives the
//!   same files, and no other branch can have written its paths in between: their locks were
//!   held until `COMMITTED` was appended.
//!   When a large put's blob is gone too (removed by hand), the file at its path is accepted
//!   only if it holds exactly the content the record names (its blake3 hash is checked, not its
//!   length); otherwise the commit, or the open that applies commits again, is refused with
//!   [`ResourceError::ContentLost`], naming the path and the hash to bring back.
//! * **After `COMMITTED` is durable, before a checkpoint covers it** (a power failure may have
//!   lost the content of its small files, the names it put in place or its deletes): at open, every such commit is applied again, in the
//!   order of the log, from its prepare record — the last writer of a path writes last, as it
//!   did. The log keeps those prepare records until a checkpoint covers their commits.
//! * **A resolution lost with the log's tail**: a later branch on the same path appends its
//!   `PREPARED` after the resolution (it took the lock afterwards), and the log is durable in
//!   order, so a resolution is lost only together with every later write of its paths. Its
//!   branch comes back prepared and is resolved again the same way.
//! * **During replay**: a replay applies a **batch** of consecutive redos (a single replay is
//!   a batch of one): the entries of all its redos in LSN order, then one sync of the files
//!   written and of the directories touched, then `applied_lsn` written once, as the batch's
//!   last LSN. A crash before that write leaves `applied_lsn` below the batch (at the LSN
//!   before it), so the replayer sends the same batch again, and applying it again gives the
//!   same tree, whatever part of it the crash left: every entry sets its path to a fixed final
//!   state (this content, or absent) whatever the path held before, so a later put over an
//!   earlier one, or a delete of something already deleted, ends the same; an entry that a
//!   later entry of the batch decides (the same path, an ancestor of it, or a path below it)
//!   is left out (`apply::replayed`), so the batch never tries to put a file where a later redo
//!   made a directory — except a delete superseded only from below (the file became a
//!   directory), which is applied and finds either the file (removed) or the directory (left).
//!   No later batch was applied in between (replay is sequential, in LSN order, one batch at a
//!   time). A crash after the write makes the same batch a no-op.
//!
//! # Implementation caveats
//!
//! * After a power failure, a file committed since the last checkpoint may be missing or hold
//!   other bytes (and a file deleted since may be back) until the resource is opened again (its
//!   recovery applies those commits again). Programs that read the tree directly, without
//!   concord running, see the tree as the file system kept it.
//! * A checkpoint's `syncfs` flushes every dirty page of the root's file system, other programs'
//!   too: give the root a file system of its own when other writers are heavy. It covers that
//!   one file system only: a small file committed under another file system mounted inside the
//!   root is not made durable by it (keep the tree on one file system).
//! * A committed large file is a hard link of its blob (the staged file was adopted, then
//!   renamed into place) until the blob is removed. Writing to such a file in place, outside
//!   concord, damages the blob (which the blob store detects on read). Replacing it (as every
//!   concord put does, by rename) is harmless.
//! * Blobs are removed only by [`Resource::collect_blobs`], which the coordinator calls with the
//!   blobs its retained records name: it removes those of rolled-back branches and of commits
//!   no retained record names, and never one a branch still needs; the order of its steps and
//!   why no race loses a blob are in `docs/journal-format.md`, "Collection in a resource's blob
//!   store".
//! * Reads take no locks: a branch reads the committed tree as it is (no repeatable reads).
//! * Locks are on the path as written, not on the file a symlink inside the root leads to: two
//!   names of one file through symlinks do not conflict.
//! * Confinement is checked when a path is written or read and again at commit and replay, but a
//!   symlink swapped in by someone else between the check and the use is not detected (there is
//!   no `openat2(RESOLVE_BENEATH)` here). The tree is assumed to be written only through concord.
//! * A put of a path that is a symlink (inside the root) replaces the symlink, it does not write
//!   through it. Deleting and putting directories is not supported: only files.
//! * A read-only vote is remembered for the last `READ_ONLY_REMEMBERED_MAX` such branches (a
//!   repeated prepare votes the same); after a restart such a branch is unknown.
//! * One-phase commit (commit of an unprepared branch) is refused.
//! * A prepare is refused when the log's file system has less free space than the record and a
//!   margin (a full disk refuses the prepare instead of failing the log's write, which would
//!   poison it); a disk that fills up in between still poisons the log.
//! * A failed sync poisons the instance: every later call fails with [`ResourceError::Fatal`]
//!   until the resource is opened again.

use std::any::Any;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use journal::{BlobId, BlobStore, Journal};
use tokio::sync::Notify;

use crate::dirsync::DirSync;
use crate::internal::branches::Branches;
use crate::internal::collect::Adoptions;
use crate::internal::instance::{Instance, InstanceState, Shared};
use crate::internal::io::{self, parent_of, sync_file};
use crate::internal::lifecycle;
use crate::internal::lifecycle::Shell;
use crate::internal::reseed as internal_reseed;
use crate::internal::shipping;
use crate::internal::state_file::encode_state;
use crate::{
    BlobContent, BlobsCollected, Epoch, Lsn, Resource, ResourceError, RetainedBlobs, Vote, Xid,
};

mod apply;
mod checkpoint;
mod confine;
mod inventory;
mod locks;
mod log;
mod open;
mod redo;
mod reseed;
mod staging;
mod steps;

pub use redo::{RedoEntry, decode_redo, encode_redo};

use checkpoint::Checkpoints;
use locks::Locks;
use staging::{Change, create_written};

/// The private directory under the root; no user path may start with it.
pub const PRIVATE_DIR: &str = ".concord";

/// The xids a files resource at `root` holds prepared, from its branch log. Reads the log only —
/// no lock, no clean-up — so an operator's view can run beside the process that owns the
/// resource.
pub fn prepared_on_disk(root: &Path) -> std::result::Result<Vec<Xid>, ResourceError> {
    let dir = root.join(PRIVATE_DIR).join("log");
    log::live_on_disk(&dir).map_err(|e| log::log_open_error("files", &dir, e))
}
/// Longest path accepted, in bytes.
pub const PATH_BYTES_MAX: usize = 4096;
/// Most paths one branch may write (and entries one redo may hold).
pub const BRANCH_PATHS_MAX: usize = 100_000;
/// Largest file [`FilesBranch::read`] returns whole; use [`FilesBranch::open_read`] beyond.
pub const READ_BYTES_MAX: u64 = 16 << 20;
/// Size of the one buffer a put, a blob copy or a read streams through.
const CHUNK_BYTES: usize = 1 << 20;

/// Content of at most this many bytes is carried inline, in the prepare record and the redo.
pub const INLINE_FILE_BYTES_MAX: u64 = 64 << 10;
/// At most this much inline content per branch; further puts go through the blob store.
pub const INLINE_BRANCH_BYTES_MAX: u64 = 1 << 20;

/// What a panicked blocking task was, in its error.
const TASK: &str = "file";
/// What to do about a branch too large for one log record.
const FEWER: &str = "write fewer paths";

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// Limits and options of a files resource.
#[derive(Clone, Debug)]
pub struct FilesConfig {
    /// How long a branch waits for a path another open branch writes before it fails with
    /// [`ResourceError::Conflict`].
    pub lock_wait_ms_max: u64,
    /// Create the root directory when it does not exist.
    pub create_if_missing: bool,
    /// Largest file a put accepts; a longer stream is refused and nothing is staged.
    pub file_bytes_max: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            lock_wait_ms_max: 5000,
            create_if_missing: false,
            file_bytes_max: 1 << 40,
        }
    }
}

/// The files resource; see the module docs.
pub struct FilesResource {
    inner: Arc<Inner>,
}

/// An application's handle on one branch of a [`FilesResource`]: what it writes is staged and
/// appears in the tree when the branch commits.
pub struct FilesBranch {
    inner: Arc<Inner>,
    xid: Xid,
}

struct Inner {
    name: String,
    /// The canonical root.
    root: PathBuf,
    area: Area,
    blobs: BlobStore,
    /// Coalesces the syncs of directories that concurrent branches change.
    dirs: DirSync,
    /// The branch log: the prepare records and resolutions (see the `log` module).
    log: Journal,
    /// Where the last checkpoint of the log was.
    checkpoints: Mutex<Checkpoints>,
    /// Held while a checkpoint runs: one at a time.
    checkpointing: tokio::sync::Mutex<()>,
    /// The root, opened once at open: every checkpoint's `syncfs` goes through it, so that a
    /// write-back error of the file system since the open is reported.
    fs: File,
    config: FilesConfig,
    state: Mutex<State>,
    /// Woken whenever a branch releases its locks.
    released: Notify,
    /// The fence gate, the test pauses and the replay lock.
    shell: Shell,
    /// The adoption lock and the blobs adopted while a collection runs.
    adoptions: Adoptions,
    /// Names of staged and temp files.
    next_file: AtomicU64,
    /// Holds the root's `LOCK` for the life of the instance.
    _lock: File,
}

/// The paths of the private area.
struct Area {
    private: PathBuf,
    staging: PathBuf,
    log: PathBuf,
    tmp: PathBuf,
    fence: PathBuf,
    applied_lsn: PathBuf,
}

/// A branch; its phase is in the table of branches (prepared: its prepare record is durable).
struct Branch {
    /// What its durable prepare record holds (it is prepared, or being resolved after
    /// prepare); `None` before.
    prepared: Option<Arc<Vec<RedoEntry>>>,
    /// The lowest LSN of the branch log this branch may need: its prepare record's, or, while
    /// that is being appended, one at or below it. The log is never trimmed above it.
    log_floor: Option<Lsn>,
    /// Its staged changes (empty for a branch recovered from the log: its staging is gone).
    changes: BTreeMap<String, Change>,
    /// Bytes of its puts staged in memory.
    memory_bytes: u64,
    /// Paths locked by this branch (each with an intent on its ancestors).
    locked: BTreeSet<String>,
}

struct State {
    /// The fence, the applied LSN and the poison, as every resource has them.
    shared: Shared,
    branches: Branches<Branch>,
    locks: Locks,
}

impl FilesResource {
    /// The handle of the branch of `xid`, which must have been begun ([`Resource::begin`]);
    /// otherwise its calls are refused.
    pub fn branch(&self, xid: &Xid) -> FilesBranch {
        FilesBranch {
            inner: self.inner.clone(),
            xid: *xid,
        }
    }

    /// The root directory (canonical).
    pub fn root(&self) -> &Path {
        &self.inner.root
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
    pub fn config(&self) -> &FilesConfig {
        &self.inner.config
    }
}

#[async_trait::async_trait]
impl Resource for FilesResource {
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
        io::blocking(&self.inner.name, "health", move || {
            io::dirs_writable(
                &inner.name,
                &[("root", &inner.root), ("private area", &inner.area.private)],
            )?;
            io::canary_file(&inner.name, &inner.tmp_file())
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
                RedoEntry::Put { id, .. } => Some(*id),
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

    async fn collect_blobs(&self, retained: &dyn RetainedBlobs) -> Result<BlobsCollected> {
        self.inner.collect(retained).await
    }
}

impl Instance for Inner {
    type State = State;
    const KIND: &'static str = "files";

    fn name(&self) -> &str {
        &self.name
    }

    fn state_mutex(&self) -> &Mutex<State> {
        &self.state
    }
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
        self.tmp_file()
    }

    fn blob_bytes_max(&self) -> u64 {
        self.config.file_bytes_max
    }

    fn blobs_in_use(&self) -> Result<HashSet<BlobId>> {
        Inner::blobs_in_use(self)
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
        let entries = self.prepared.as_ref()?;
        Some(Cow::Owned(encode_redo(entries)))
    }
}

// Blocking file work: run on the blocking pool, no state lock held.
impl Inner {
    fn write_state(&self, what: &str, file: &Path, value: u64) -> Result<()> {
        self.write_durably(what, file, &encode_state(value))
    }

    /// Temp file under `tmp/`, synced, renamed to `dest`, `dest`'s directory synced; `what` names
    /// the content in errors.
    fn write_durably(&self, what: &str, dest: &Path, content: &[u8]) -> Result<()> {
        let tmp = self.tmp_file();
        let written = create_synced(&self.name, what, &tmp, content).and_then(|()| {
            fs::rename(&tmp, dest).map_err(|e| {
                ResourceError::io(
                    &self.name,
                    &format!("rename {what} into place at"),
                    dest,
                    &e,
                )
            })?;
            self.dirs.sync(&parent_of(dest))
        });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    fn tmp_file(&self) -> PathBuf {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        self.area.tmp.join(format!("{n}.tmp"))
    }
}

impl Area {
    fn new(root: &Path) -> Area {
        let private = root.join(PRIVATE_DIR);
        Area {
            staging: private.join("staging"),
            log: private.join("log"),
            tmp: private.join("tmp"),
            fence: private.join("fence"),
            applied_lsn: private.join("applied_lsn"),
            private,
        }
    }

    fn staged_file(&self, xid: &Xid, n: u64) -> PathBuf {
        self.staging.join(format!("{xid}.{n}"))
    }
}

impl Branch {
    fn new() -> Branch {
        Branch {
            prepared: None,
            log_floor: None,
            memory_bytes: 0,
            changes: BTreeMap::new(),
            locked: BTreeSet::new(),
        }
    }
}

/// Creates the new file `path` (an existing file is an error: temp names are never reused)
/// with `content`, and syncs it.
fn create_synced(name: &str, what: &str, path: &Path, content: &[u8]) -> Result<()> {
    let file = create_written(name, what, path, content)?;
    sync_file(name, &file, path)
}
