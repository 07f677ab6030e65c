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
//!   order (DESIGN.md "Ordering"). A second writer waits at most `lock_wait_ms_max`, then fails
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
//!   applies a redo (inline content, or content from this resource's blob store) together with
//!   its LSN, syncing every file it writes.
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
//! # The redo encoding (version 2)
//!
//! ```text
//! version   u8       = 2 (version 1, without op 3, is read too)
//! count     u32 LE   number of entries (at most BRANCH_PATHS_MAX)
//! entry*    op       u8: 1 = put from a blob, 2 = delete, 3 = put inline
//!           path     u16 LE length, then that many bytes of UTF-8 (a confined relative path)
//!           (op 1)   blob id: 32 bytes (blake3 of the content), size: u64 LE
//!           (op 3)   size: u32 LE (at most INLINE_FILE_BYTES_MAX), then the content
//! ```
//!
//! Entries are sorted by path and name distinct paths, none a prefix directory of another, so
//! their order does not matter when they are applied. Decoders refuse an unknown version, an
//! over-limit count or length, and trailing bytes.
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
//! * **During replay**: `applied_lsn` is written only after every file of the redo is in place
//!   and synced with its directory. A crash before that leaves `applied_lsn` at the previous LSN,
//!   so the replayer sends the same redo again, and applying it again is harmless: every entry
//!   sets its path to a fixed final state (this content, or absent) whatever the path held
//!   before, the entries of one redo touch distinct paths, and no later redo was applied in
//!   between (replay is sequential and in LSN order). A crash after it makes the same LSN a no-op.
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
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use journal::{BlobConfig, BlobId, BlobStore, Journal};
use tokio::io::AsyncRead;
use tokio::sync::Notify;

use crate::dirsync::DirSync;
use crate::internal::branches::{Branches, Phase, Starting};
use crate::internal::collect::{Adoptions, remove_blobs};
use crate::internal::instance::{Gate, Instance, InstanceState, Shared, lock, raise_fence};
use crate::internal::io::{
    blob_error, blocking, check_log_space, create_dir_durably, fill, lock_private, log_error,
    parent_of, remove_file_if_exists, sync_file,
};
use crate::internal::locks::wait_for_lock;
use crate::internal::pauses::Pauses;
use crate::internal::reader::{Reader, put_u32};
use crate::internal::shipping;
use crate::internal::state_file::{encode_state, read_state_file};
use crate::{
    BlobContent, BlobsCollected, Epoch, Lsn, Resource, ResourceError, RetainedBlobs, Vote, Xid,
};

mod log;

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
/// A checkpoint of the branch log runs at most this long after the last one, while commits
/// happen.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Content of at most this many bytes is carried inline, in the prepare record and the redo.
pub const INLINE_FILE_BYTES_MAX: u64 = 64 << 10;
/// At most this much inline content per branch; further puts go through the blob store.
pub const INLINE_BRANCH_BYTES_MAX: u64 = 1 << 20;
const REDO_VERSION: u8 = 2;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_PUT_INLINE: u8 = 3;

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

/// One effect in a files redo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedoEntry {
    /// The file at `path` gets the content of blob `id`, of `bytes` bytes.
    Put {
        /// The path, relative to the root.
        path: String,
        /// The blob holding the content.
        id: BlobId,
        /// The size of the content.
        bytes: u64,
    },
    /// The file at `path` gets `content` (at most [`INLINE_FILE_BYTES_MAX`] bytes), carried in
    /// the redo itself.
    PutInline {
        /// The path, relative to the root.
        path: String,
        /// The whole content.
        content: Vec<u8>,
    },
    /// The file at `path` is removed (nothing happens if it does not exist).
    Delete {
        /// The path, relative to the root.
        path: String,
    },
}

impl RedoEntry {
    /// The path the entry changes.
    pub fn path(&self) -> &str {
        match self {
            RedoEntry::Put { path, .. }
            | RedoEntry::PutInline { path, .. }
            | RedoEntry::Delete { path } => path,
        }
    }
}

/// Encodes entries as a redo (see the module docs for the format).
pub fn encode_redo(entries: &[RedoEntry]) -> Vec<u8> {
    let mut out = vec![REDO_VERSION];
    put_u32(&mut out, entries.len());
    for entry in entries {
        match entry {
            RedoEntry::Put { path, id, bytes } => encode_put(&mut out, path, id, *bytes),
            RedoEntry::PutInline { path, content } => {
                out.push(OP_PUT_INLINE);
                encode_path(&mut out, path);
                put_u32(&mut out, content.len());
                out.extend_from_slice(content);
            }
            RedoEntry::Delete { path } => encode_delete(&mut out, path),
        }
    }
    out
}

/// Decodes a redo; a malformed one is described in the error.
pub fn decode_redo(redo: &[u8]) -> Result<Vec<RedoEntry>, String> {
    let mut reader = Reader::new(redo);
    let version = reader.u8()?;
    if version == 0 || version > REDO_VERSION {
        return Err(format!(
            "redo version {version}: this program reads versions 1 to {REDO_VERSION}"
        ));
    }
    let count = read_count(&mut reader)?;
    let mut entries = Vec::with_capacity(count.min(redo.len() / 4));
    for _ in 0..count {
        entries.push(read_entry(&mut reader, version)?);
    }
    reader.finish()?;
    Ok(entries)
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
    /// Serializes replays, so that the LSN check and the apply are one step.
    replaying: tokio::sync::Mutex<()>,
    /// The fence gate: prepares, commits and rollbacks hold it shared, a fence exclusively
    /// (see `Gate`).
    gate: Gate,
    /// Pauses tests arm inside operations.
    pauses: Pauses,
    /// The adoption lock and the blobs adopted while a collection runs.
    adoptions: Adoptions,
    /// Names of staged and temp files.
    next_file: AtomicU64,
    /// Holds the root's `LOCK` for the life of the instance.
    _lock: File,
}

/// Where the last checkpoint of the branch log left off.
struct Checkpoints {
    /// Bytes appended to the log (since open) when the last checkpoint started.
    at_bytes: u64,
    /// The log's durable LSN when the last checkpoint started: a branch prepared below it and
    /// still prepared is carried forward by the next one.
    at_lsn: Lsn,
    /// When the last checkpoint started.
    at: std::time::Instant,
    /// The `upto` of the last checkpoint that completed: commits below it are durable.
    covered: Lsn,
    /// The LSN of the last `COMMITTED` record known durable.
    last_commit: Lsn,
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

/// What a branch did to one path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    /// Content staged (`staged`), hashing to `id`.
    Put {
        staged: Staged,
        id: BlobId,
        bytes: u64,
    },
    Delete,
}

/// Where a put's content waits for the commit.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Staged {
    /// In memory: small content (at most [`INLINE_FILE_BYTES_MAX`], within the branch's
    /// [`INLINE_BRANCH_BYTES_MAX`]), which prepare puts in the log.
    Memory(Arc<[u8]>),
    /// In the file `staging/<xid>.<n>`.
    File(u64),
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

/// Path locks: an exclusive lock on each written path and an intent on each of its ancestors.
#[derive(Default)]
struct Locks {
    exclusive: HashMap<String, Xid>,
    intents: HashMap<String, HashMap<Xid, u32>>,
}

enum Refusal {
    /// Another branch holds a conflicting lock.
    Held(Xid),
    /// The branch's own writes make the path impossible.
    Own(String),
}

/// What a branch sees at a path.
enum View {
    Memory(Arc<[u8]>),
    Staged(PathBuf),
    Deleted,
    Committed,
}

/// What a path is confined for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Written: the path may be missing, it must not be a directory.
    Write,
    /// Read: the path must be a file.
    Read,
}

impl FilesResource {
    /// Opens the resource at `root`: creates the private area if needed, takes the root's lock,
    /// reads the fence epoch and applied LSN, re-takes the locks of every prepared branch and
    /// removes the staging of branches that never prepared. Blocking: call it from
    /// `spawn_blocking` when a runtime must not stall.
    pub fn open(name: &str, root: &Path, config: FilesConfig) -> Result<Arc<FilesResource>> {
        // Not shared until `open` returns: no sync here waits on another thread.
        let dirs = DirSync::new(name);
        let root = open_root(name, &dirs, root, &config)?;
        let area = Area::new(&root);
        for dir in [&area.private, &area.staging, &area.tmp] {
            create_dir_durably(name, &dirs, dir)?;
        }
        let lock = lock_private(name, &area.private, "root")?;
        let fs = File::open(&root).map_err(|e| ResourceError::io(name, "open", &root, &e))?;
        clear_dir(name, &area.tmp)?;
        let blobs = open_blobs(name, &area, &config)?;
        let fence = Epoch(read_state_file(name, &area.fence)?);
        let applied_lsn = Lsn(read_state_file(name, &area.applied_lsn)?);
        let (log, live) =
            log::open(&area.log).map_err(|e| log::log_open_error(name, &area.log, e))?;
        let log::Live {
            branches,
            committed,
        } = live;
        let (branches, locks) = load_prepared(name, branches)?;
        clear_staging(name, &dirs, &area)?;
        tracing::info!(resource = name, root = %root.display(), prepared = branches.len(), %fence, %applied_lsn, "files resource open");
        let state = State {
            shared: Shared {
                fence,
                applied_lsn,
                poisoned: None,
            },
            branches,
            locks,
        };
        let inner = Inner {
            name: name.to_string(),
            root,
            area,
            blobs,
            dirs,
            log,
            checkpoints: Mutex::new(Checkpoints {
                at_bytes: 0,
                at_lsn: Lsn::ZERO,
                at: std::time::Instant::now(),
                covered: Lsn::ZERO,
                last_commit: Lsn::ZERO,
            }),
            checkpointing: tokio::sync::Mutex::new(()),
            fs,
            config,
            state: Mutex::new(state),
            released: Notify::new(),
            replaying: tokio::sync::Mutex::new(()),
            gate: Gate::default(),
            pauses: Pauses::default(),
            adoptions: Adoptions::default(),
            next_file: AtomicU64::new(0),
            _lock: lock,
        };
        let inner = Arc::new(inner);
        inner.redo_committed(committed)?;
        Ok(Arc::new(FilesResource { inner }))
    }

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
    pub fn config(&self) -> &FilesConfig {
        &self.inner.config
    }
}

impl FilesBranch {
    /// The xid of the branch.
    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// Streams `content` into the file at `path`, staged until the branch commits; returns its
    /// size. Waits for (at most `lock_wait_ms_max`) and locks the path. Refused when the path is
    /// not confined to the root, the content is over `file_bytes_max`, or the branch is not
    /// active.
    pub async fn put(&self, path: &str, mut content: impl AsyncRead + Unpin) -> Result<u64> {
        let inner = &self.inner;
        check_path(&inner.name, path)?;
        inner.lock_path(&self.xid, path).await?;
        // A few `lstat`s of directories just looked up: cheaper here than a trip to the
        // blocking pool.
        inner.confine(path, Use::Write)?;
        // Small content stays in memory (prepare puts it in the log); the rest goes to a
        // staged file, starting with what was read so far.
        let keep = inner.memory_room(&self.xid)?;
        let mut head = vec![0u8; usize::try_from(keep).unwrap_or(0).saturating_add(1)];
        let n = fill(&mut content, &mut head)
            .await
            .map_err(|e| inner.rejected(format!("read the content for {path}: {e}")))?;
        head.truncate(n);
        if n as u64 <= keep {
            let (id, bytes) = (BlobId::of(&head), n as u64);
            let staged = Staged::Memory(Arc::from(head));
            let change = Change::Put { staged, id, bytes };
            inner.record(&self.xid, path, change, None).await?;
            return Ok(bytes);
        }
        let staged = inner.next_file.fetch_add(1, Ordering::Relaxed);
        let file = inner.area.staged_file(&self.xid, staged);
        let written = inner.stream_to(path, &file, head, &mut content).await;
        let (id, bytes) = match written {
            Ok(ok) => ok,
            Err(e) => return Err(inner.discard(&file, e).await),
        };
        let staged = Staged::File(staged);
        let change = Change::Put { staged, id, bytes };
        inner.record(&self.xid, path, change, Some(&file)).await?;
        Ok(bytes)
    }

    /// Deletes the file at `path` when the branch commits. Waits for and locks the path like
    /// [`FilesBranch::put`]. Refused when the branch sees no file there.
    pub async fn delete(&self, path: &str) -> Result<()> {
        let inner = &self.inner;
        check_path(&inner.name, path)?;
        inner.lock_path(&self.xid, path).await?;
        let target = inner.confine_blocking(path, Use::Write).await?;
        match inner.view(&self.xid, path)? {
            View::Memory(_) | View::Staged(_) => {}
            View::Deleted => {
                return Err(not_found(
                    &inner.name,
                    path,
                    "this transaction already deleted it",
                ));
            }
            View::Committed => {
                let exists = blocking(&inner.name, TASK, move || {
                    Ok(fs::symlink_metadata(&target).is_ok())
                })
                .await?;
                if !exists {
                    return Err(not_found(&inner.name, path, "there is no such file"));
                }
            }
        }
        inner.record(&self.xid, path, Change::Delete, None).await
    }

    /// The whole content of the file at `path` as this branch sees it (its own writes first, then
    /// the committed tree); refused above [`READ_BYTES_MAX`].
    pub async fn read(&self, path: &str) -> Result<Vec<u8>> {
        check_path(&self.inner.name, path)?;
        if let View::Memory(content) = self.inner.view(&self.xid, path)? {
            return Ok(content.to_vec());
        }
        let mut file = self.open_read(path).await?;
        let (name, path) = (self.inner.name.clone(), path.to_string());
        blocking(&self.inner.name, TASK, move || {
            let len = file
                .metadata()
                .map_err(|e| ResourceError::io(&name, "inspect", Path::new(&path), &e))?
                .len();
            if len > READ_BYTES_MAX {
                let reason = format!(
                    "{path} is {len} bytes, over READ_BYTES_MAX = {READ_BYTES_MAX}; use open_read"
                );
                return Err(ResourceError::rejected(&name, reason));
            }
            let mut content = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            file.read_to_end(&mut content)
                .map_err(|e| ResourceError::io(&name, "read", Path::new(&path), &e))?;
            Ok(content)
        })
        .await
    }

    /// Opens the file at `path` for reading as this branch sees it: the staged content if this
    /// branch put it, a not-found refusal if it deleted it, else the committed file.
    pub async fn open_read(&self, path: &str) -> Result<File> {
        let inner = &self.inner;
        check_path(&inner.name, path)?;
        let name = inner.name.clone();
        match inner.view(&self.xid, path)? {
            View::Memory(content) => {
                let worker = inner.clone();
                blocking(&inner.name, TASK, move || worker.anonymous_file(&content)).await
            }
            View::Staged(file) => {
                let shown = path.to_string();
                blocking(&inner.name, TASK, move || {
                    File::open(&file).map_err(|e| {
                        ResourceError::io(&name, "open staged content of", Path::new(&shown), &e)
                    })
                })
                .await
            }
            View::Deleted => Err(not_found(&name, path, "this transaction deleted it")),
            View::Committed => {
                let target = inner.confine_blocking(path, Use::Read).await?;
                blocking(&inner.name, TASK, move || {
                    File::open(&target).map_err(|e| ResourceError::io(&name, "open", &target, &e))
                })
                .await
            }
        }
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
        let inner = &self.inner;
        let mut st = inner.state();
        inner.usable(&st)?;
        inner.not_fenced(&st, xid)?;
        st.branches.begin(&**inner, xid, Branch::new)
    }

    async fn prepare(&self, xid: &Xid) -> Result<Vote> {
        let inner = &self.inner;
        let _gate = inner.gate.read().await;
        match inner.start_prepare(xid)? {
            // Nothing is staged: a branch without changes never staged a file, or removed it.
            Start::ReadOnly => Ok(Vote::ReadOnly),
            Start::Prepared(entries) => Ok(Vote::Commit {
                redo: encode_redo(&entries),
            }),
            Start::Stage(changes) => {
                inner.pauses.at_prepare(xid).await;
                let _adopting = inner.adoptions.adopting().await;
                let result = inner.prepare_branch(xid, changes).await;
                inner.finish_prepare(xid, result)
            }
        }
    }

    async fn commit(&self, xid: &Xid) -> Result<()> {
        let inner = &self.inner;
        let _gate = inner.gate.read().await;
        let Some(resolving) = inner.start_resolve(xid, true)? else {
            return Ok(());
        };
        let (worker, id, entries) = (inner.clone(), *xid, resolving.entries.clone());
        let result = blocking(&inner.name, TASK, move || {
            worker.commit_files(&id, entries.as_deref(), &resolving.changes)
        })
        .await;
        let appending = inner.finish_resolve(xid, resolving.previous, true, result)?;
        inner.resolution_durable(appending, true).await?;
        inner.maybe_checkpoint().await
    }

    async fn rollback(&self, xid: &Xid) -> Result<()> {
        let inner = &self.inner;
        let _gate = inner.gate.read().await;
        let Some(resolving) = inner.start_resolve(xid, false)? else {
            return Ok(());
        };
        let (worker, id) = (inner.clone(), *xid);
        let result = blocking(&inner.name, TASK, move || {
            worker.remove_staging(&id, &resolving.changes)
        })
        .await;
        let appending = inner.finish_resolve(xid, resolving.previous, false, result)?;
        inner.resolution_durable(appending, false).await?;
        inner.maybe_checkpoint().await
    }

    async fn recover(&self) -> Result<Vec<Xid>> {
        self.inner.prepared_xids()
    }

    async fn fence(&self, epoch: Epoch) -> Result<()> {
        let inner = &self.inner;
        raise_fence(inner, &inner.gate, TASK, epoch, |inner, epoch| {
            inner.write_state("fence epoch", &inner.area.fence, epoch.0)
        })
        .await
    }

    async fn fence_epoch(&self) -> Result<Epoch> {
        Instance::fence_epoch(&*self.inner)
    }

    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<()> {
        let inner = &self.inner;
        let _replaying = inner.replaying.lock().await;
        if lsn <= Instance::applied_lsn(&**inner)? {
            return Ok(());
        }
        let entries = decode_redo(redo)
            .map_err(|e| inner.rejected(format!("replay of lsn {lsn}: malformed redo: {e}")))?;
        inner.checkpoint_commits().await?;
        let worker = inner.clone();
        let applied = blocking(&inner.name, TASK, move || {
            worker.replay_files(&entries, lsn)
        })
        .await;
        inner.check(applied)?;
        inner.state().shared.applied_lsn = lsn;
        Ok(())
    }

    async fn applied_lsn(&self) -> Result<Lsn> {
        Instance::applied_lsn(&*self.inner)
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
        let (worker, id) = (self.inner.clone(), *id);
        blocking(&self.inner.name, TASK, move || {
            shipping::open_blob(&worker.name, &worker.blobs, &id)
        })
        .await
    }

    async fn put_blob(&self, id: &BlobId, mut content: BlobContent) -> Result<()> {
        let _adopting = self.inner.adoptions.adopting().await;
        let (worker, id) = (self.inner.clone(), *id);
        let put = blocking(&self.inner.name, TASK, move || {
            let tmp = worker.tmp_file();
            let bytes_max = worker.config.file_bytes_max;
            shipping::put_blob(
                &worker.name,
                &worker.blobs,
                &tmp,
                &id,
                &mut content,
                bytes_max,
            )?;
            worker.note_adopted(&id);
            Ok(())
        })
        .await;
        self.inner.check(put)
    }

    async fn collect_blobs(&self, retained: &dyn RetainedBlobs) -> Result<BlobsCollected> {
        self.inner.collect(retained).await
    }
}

/// What prepare does after looking at the branch.
enum Start {
    ReadOnly,
    /// Already prepared: vote again with what the record holds.
    Prepared(Arc<Vec<RedoEntry>>),
    /// Prepare these staged changes.
    Stage(BTreeMap<String, Change>),
}

/// A branch being resolved: where it was, and what it holds.
struct Resolving {
    previous: Phase,
    /// Its prepare record's entries (`None`: never prepared).
    entries: Option<Arc<Vec<RedoEntry>>>,
    /// Its staged changes (their staged files, while this process has them).
    changes: BTreeMap<String, Change>,
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

// State transitions: each takes the state lock once and does no I/O.
impl Inner {
    /// One attempt to lock `path` for `xid`: `Ok(None)` when locked, `Ok(Some(holder))` when
    /// another branch holds it.
    fn try_lock(&self, xid: &Xid, path: &str) -> Result<Option<Xid>> {
        let mut guard = self.state();
        self.usable(&guard)?;
        self.not_fenced(&guard, xid)?;
        let State {
            branches, locks, ..
        } = &mut *guard;
        let branch = branches.active(self, xid, "writes")?;
        if branch.locked.len() >= BRANCH_PATHS_MAX && !branch.locked.contains(path) {
            return Err(self.rejected(format!("branch {xid} already writes BRANCH_PATHS_MAX = {BRANCH_PATHS_MAX} paths; {path} refused")));
        }
        match locks.try_take(xid, path) {
            Ok(()) => {
                branch.locked.insert(path.to_string());
                Ok(None)
            }
            Err(Refusal::Held(holder)) => Ok(Some(holder)),
            Err(Refusal::Own(reason)) => {
                Err(self.rejected(format!("path {path:?} refused: {reason}")))
            }
        }
    }

    /// Records a staged change once its content is in place; a change that lost a race with
    /// prepare or rollback is discarded.
    async fn record(
        &self,
        xid: &Xid,
        path: &str,
        change: Change,
        file: Option<&Path>,
    ) -> Result<()> {
        let replaced = {
            let mut st = self.state();
            match st.branches.active(self, xid, "writes") {
                Ok(branch) => {
                    if let Change::Put {
                        staged: Staged::Memory(_),
                        bytes,
                        ..
                    } = &change
                    {
                        branch.memory_bytes += bytes;
                    }
                    let replaced = branch.changes.insert(path.to_string(), change);
                    if let Some(Change::Put {
                        staged: Staged::Memory(_),
                        bytes,
                        ..
                    }) = &replaced
                    {
                        branch.memory_bytes -= bytes;
                    }
                    Ok(replaced)
                }
                Err(e) => Err(e),
            }
        };
        match replaced {
            Ok(Some(Change::Put {
                staged: Staged::File(staged),
                ..
            })) => {
                let old = self.area.staged_file(xid, staged);
                let name = self.name.clone();
                blocking(&self.name, TASK, move || remove_file_if_exists(&name, &old)).await
            }
            Ok(_) => Ok(()),
            Err(e) => match file {
                Some(file) => Err(self.discard(file, e).await),
                None => Err(e),
            },
        }
    }

    /// Removes a staged file whose put failed, and returns the failure.
    async fn discard(&self, file: &Path, e: ResourceError) -> ResourceError {
        let (name, file) = (self.name.clone(), file.to_path_buf());
        let _ = blocking(&self.name, TASK, move || {
            remove_file_if_exists(&name, &file)
        })
        .await;
        e
    }

    fn view(&self, xid: &Xid, path: &str) -> Result<View> {
        let st = self.state();
        self.usable(&st)?;
        let branch = st.branches.open(self, xid)?;
        Ok(match branch.changes.get(path) {
            Some(Change::Put {
                staged: Staged::Memory(content),
                ..
            }) => View::Memory(content.clone()),
            Some(Change::Put {
                staged: Staged::File(n),
                ..
            }) => View::Staged(self.area.staged_file(xid, *n)),
            Some(Change::Delete) => View::Deleted,
            None => View::Committed,
        })
    }

    /// How many bytes a put of `xid` may keep in memory.
    fn memory_room(&self, xid: &Xid) -> Result<u64> {
        let mut st = self.state();
        self.usable(&st)?;
        let branch = st.branches.active(self, xid, "writes")?;
        let left = INLINE_BRANCH_BYTES_MAX.saturating_sub(branch.memory_bytes);
        Ok(left.min(INLINE_FILE_BYTES_MAX))
    }

    fn start_prepare(&self, xid: &Xid) -> Result<Start> {
        let mut st = self.state();
        self.usable(&st)?;
        let fence = st.shared.fence;
        match st
            .branches
            .start_prepare(self, xid, fence, |b| !b.changes.is_empty())?
        {
            Starting::ReadOnly => Ok(Start::ReadOnly),
            Starting::Again(branch) => {
                Ok(Start::Prepared(branch.prepared.clone().unwrap_or_default()))
            }
            Starting::Prepare(branch) => Ok(Start::Stage(branch.changes.clone())),
            Starting::Empty => {
                self.release(&mut st, xid);
                st.branches.voted_read_only(xid);
                Ok(Start::ReadOnly)
            }
        }
    }

    /// Ends a prepare: on success the branch is prepared with `entries`, whose record is durable
    /// at `lsn`; on failure it is active again (and pins no log).
    fn finish_prepare(
        &self,
        xid: &Xid,
        result: Result<(Arc<Vec<RedoEntry>>, Vec<u8>, Lsn)>,
    ) -> Result<Vote> {
        let result = self.check(result);
        let mut st = self.state();
        let branch = st.branches.finish_prepare(self, xid, result.is_ok())?;
        match result {
            Ok((entries, redo, lsn)) => {
                branch.log_floor = Some(lsn);
                branch.prepared = Some(entries);
                tracing::debug!(resource = %self.name, %xid, %lsn, "prepared");
                Ok(Vote::Commit { redo })
            }
            Err(e) => {
                branch.log_floor = None;
                Err(e)
            }
        }
    }

    /// Marks a branch as being resolved; `None` when there is nothing to resolve.
    fn start_resolve(&self, xid: &Xid, commit: bool) -> Result<Option<Resolving>> {
        let mut st = self.state();
        self.usable(&st)?;
        let fence = st.shared.fence;
        let Some((previous, branch)) = st.branches.start_resolve(self, xid, commit, fence)? else {
            return Ok(None);
        };
        Ok(Some(Resolving {
            previous,
            entries: branch.prepared.clone(),
            changes: branch.changes.clone(),
        }))
    }

    /// Ends a resolution. On success a prepared branch's resolution is appended to the log —
    /// under the state lock, so that it follows any copy of the branch's prepare record that a
    /// trim carries forward — and the branch is forgotten, its locks released; the returned
    /// append is waited for after that (the locks need not wait for it: see "Crashes").
    fn finish_resolve(
        &self,
        xid: &Xid,
        previous: Phase,
        commit: bool,
        result: Result<()>,
    ) -> Result<Option<journal::Appending>> {
        let result = self.check(result);
        let mut st = self.state();
        if let Err(e) = result {
            st.branches.resolution_failed(xid, previous);
            return Err(e);
        }
        let mut appending = None;
        if st.branches.is_prepared(xid) {
            match log::append_resolution(&self.log, xid, commit) {
                Ok(a) => appending = Some(a),
                Err(e) => {
                    st.branches.resolution_failed(xid, previous);
                    drop(st);
                    return self.check(Err(log_error(&self.name, FEWER, "append a resolution", e)));
                }
            }
        }
        self.release(&mut st, xid);
        Ok(appending)
    }

    /// Waits for a resolution record to be durable.
    async fn resolution_durable(
        &self,
        appending: Option<journal::Appending>,
        commit: bool,
    ) -> Result<()> {
        if let Some(appending) = appending {
            let durable = appending
                .await
                .map_err(|e| log_error(&self.name, FEWER, "append a resolution", e));
            let lsn = self.check(durable)?;
            if commit {
                let mut last = lock(&self.checkpoints);
                last.last_commit = last.last_commit.max(lsn);
            }
        }
        Ok(())
    }

    /// Forgets a branch and releases its locks, waking every waiter.
    fn release(&self, st: &mut State, xid: &Xid) {
        if let Some(branch) = st.branches.remove(xid) {
            for path in &branch.locked {
                st.locks.release(xid, path);
            }
        }
        self.released.notify_waiters();
    }
}

// Async steps that wait or stream.
impl Inner {
    /// Locks `path` for `xid`, waiting at most `lock_wait_ms_max` for another branch to release it.
    async fn lock_path(&self, xid: &Xid, path: &str) -> Result<()> {
        let wait_ms_max = self.config.lock_wait_ms_max;
        let what = || path.to_string();
        wait_for_lock(&self.name, &self.released, wait_ms_max, what, || {
            self.try_lock(xid, path)
        })
        .await
    }

    /// Prepares a branch: its entries (content inline, or synced and adopted into the blob
    /// store) on the blocking pool, then its record appended to the log and waited for.
    async fn prepare_branch(
        self: &Arc<Self>,
        xid: &Xid,
        changes: BTreeMap<String, Change>,
    ) -> Result<(Arc<Vec<RedoEntry>>, Vec<u8>, Lsn)> {
        // A branch whose content is all in memory (and within its inline budget) needs no file
        // work here: no trip to the blocking pool.
        let mut memory = 0u64;
        let in_memory = changes.values().all(|change| match change {
            Change::Put {
                staged: Staged::Memory(_),
                bytes,
                ..
            } => {
                memory += bytes;
                true
            }
            Change::Put { .. } => false,
            Change::Delete => true,
        }) && memory <= INLINE_BRANCH_BYTES_MAX;
        let entries = if in_memory {
            self.prepare_entries(xid, &changes)?
        } else {
            let (worker, id) = (self.clone(), *xid);
            blocking(&self.name, TASK, move || {
                worker.prepare_entries(&id, &changes)
            })
            .await?
        };
        let redo = encode_redo(&entries);
        let payload = log::prepared_payload(xid, &redo);
        // `statvfs` reads no disk: called here, not on the blocking pool.
        check_log_space(&self.name, &self.area.log, payload.len() as u64)?;
        let appending = {
            let mut st = self.state();
            // Set before the append, so that a trim running meanwhile keeps the record.
            let floor = self.log.durable_lsn().next();
            if let Some(branch) = st.branches.get_mut(xid) {
                branch.log_floor = Some(floor);
            }
            drop(st);
            self.log.append(log::LOG_EPOCH, log::PREPARED, &payload)
        };
        let lsn = match appending {
            Ok(appending) => appending.await,
            Err(e) => Err(e),
        }
        .map_err(|e| log_error(&self.name, FEWER, "append the prepare record", e))?;
        Ok((Arc::new(entries), redo, lsn))
    }

    /// Runs a checkpoint (see the `log` module) when the last one is a second old or about half
    /// a segment was appended since; one at a time.
    async fn maybe_checkpoint(self: &Arc<Self>) -> Result<()> {
        let Ok(_running) = self.checkpointing.try_lock() else {
            return Ok(());
        };
        let appended = self.log.stats().bytes;
        {
            let last = lock(&self.checkpoints);
            let due = appended.saturating_sub(last.at_bytes) >= log::SEGMENT_BYTES_MAX / 2
                || last.at.elapsed() >= CHECKPOINT_INTERVAL;
            if !due {
                return Ok(());
            }
        }
        self.run_checkpoint().await
    }

    /// Runs a checkpoint now when a commit is not covered by one yet (before a replay: a commit
    /// the log would apply again at open must not undo what a replay writes after it).
    async fn checkpoint_commits(self: &Arc<Self>) -> Result<()> {
        let _running = self.checkpointing.lock().await;
        {
            let last = lock(&self.checkpoints);
            if last.last_commit == Lsn::ZERO || last.last_commit < last.covered {
                return Ok(());
            }
        }
        self.run_checkpoint().await
    }

    /// A blob collection (`internal::collect`): the snapshot is the stored blobs and those the
    /// open branches' prepare records name; settling checkpoints the branch log twice — the
    /// first checkpoint's own record makes every record appended before it durable, so the
    /// second covers every commit appended before the snapshot, which is then no longer applied
    /// again at open and needs no blob.
    async fn collect(self: &Arc<Self>, retained: &dyn RetainedBlobs) -> Result<BlobsCollected> {
        let snapshot = async {
            let in_use = self.blobs_in_use()?;
            let worker = self.clone();
            let stored = blocking(&self.name, TASK, move || {
                worker.blobs.list().map_err(|e| blob_error(&worker.name, e))
            })
            .await?;
            Ok((stored, in_use))
        };
        let settle = async {
            let _running = self.checkpointing.lock().await;
            self.run_checkpoint().await?;
            self.run_checkpoint().await
        };
        let remove = |doomed: Vec<BlobId>| async move {
            let worker = self.clone();
            let removed = blocking(&self.name, TASK, move || {
                remove_blobs(&worker.name, &worker.blobs, &doomed)
            })
            .await;
            self.check(removed)
        };
        let collected = self
            .adoptions
            .collect(retained, snapshot, settle, remove)
            .await?;
        tracing::info!(resource = %self.name, removed = collected.removed, kept = collected.kept, "blobs collected");
        Ok(collected)
    }

    /// One checkpoint on the blocking pool; the caller holds `checkpointing`.
    async fn run_checkpoint(self: &Arc<Self>) -> Result<()> {
        let since = {
            let mut last = lock(&self.checkpoints);
            let since = last.at_lsn;
            last.at_bytes = self.log.stats().bytes;
            last.at_lsn = self.log.durable_lsn();
            last.at = std::time::Instant::now();
            since
        };
        let worker = self.clone();
        let result = blocking(&self.name, TASK, move || worker.checkpoint(since)).await;
        self.check(result)
    }

    async fn confine_blocking(self: &Arc<Self>, path: &str, use_: Use) -> Result<PathBuf> {
        let (worker, path) = (self.clone(), path.to_string());
        blocking(&self.name, TASK, move || worker.confine(&path, use_)).await
    }

    /// Streams `content` into the new file `file` through one buffer, hashing it; the writing and
    /// hashing run on the blocking pool, one chunk at a time.
    async fn stream_to(
        &self,
        path: &str,
        file: &Path,
        head: Vec<u8>,
        content: &mut (impl AsyncRead + Unpin),
    ) -> Result<(BlobId, u64)> {
        let (name, target) = (self.name.clone(), file.to_path_buf());
        let (mut out, hasher, mut buf) = blocking(&self.name, TASK, move || {
            let mut out = create_staged(&name, &target)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(&head);
            out.write_all(&head)
                .map_err(|e| ResourceError::io(&name, "write staged content to", &target, &e))?;
            Ok((out, hasher, head))
        })
        .await?;
        let mut hasher = hasher;
        let mut bytes = buf.len() as u64;
        buf.resize(CHUNK_BYTES, 0);
        loop {
            let n = fill(content, &mut buf)
                .await
                .map_err(|e| self.rejected(format!("read the content for {path}: {e}")))?;
            if n == 0 {
                return Ok((BlobId(*hasher.finalize().as_bytes()), bytes));
            }
            bytes += n as u64;
            if bytes > self.config.file_bytes_max {
                let max = self.config.file_bytes_max;
                return Err(self.rejected(format!(
                    "content for {path} is over file_bytes_max = {max} bytes"
                )));
            }
            let (name, target) = (self.name.clone(), file.to_path_buf());
            (out, hasher, buf) = blocking(&self.name, TASK, move || {
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| {
                    ResourceError::io(&name, "write staged content to", &target, &e)
                })?;
                Ok((out, hasher, buf))
            })
            .await?;
        }
    }
}

// Blocking file work: run on the blocking pool, no state lock held.
impl Inner {
    /// Checks that `path` (lexically valid) stays inside the root on disk: every existing prefix
    /// is a directory or a symlink resolving inside the root, outside the private area.
    fn confine(&self, path: &str, use_: Use) -> Result<PathBuf> {
        let components: Vec<&str> = path.split('/').collect();
        let mut current = self.root.clone();
        for (i, component) in components.iter().enumerate() {
            current.push(component);
            let prefix = components[..=i].join("/");
            let meta = match fs::symlink_metadata(&current) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound && use_ == Use::Write => break,
                Err(e) => return Err(ResourceError::io(&self.name, "inspect", &current, &e)),
            };
            let meta = if meta.file_type().is_symlink() {
                self.follow(path, &prefix, &current)?
            } else {
                meta
            };
            let last = i + 1 == components.len();
            if !last && !meta.is_dir() {
                return Err(refused(
                    &self.name,
                    path,
                    &format!("{prefix} is not a directory"),
                ));
            }
            if last && meta.is_dir() {
                return Err(refused(
                    &self.name,
                    path,
                    "it is a directory; only files are written and read here",
                ));
            }
        }
        Ok(self.root.join(path))
    }

    /// Resolves the symlink at `link` (the prefix `prefix` of `path`); refuses it when it leads
    /// outside the root or into the private area.
    fn follow(&self, path: &str, prefix: &str, link: &Path) -> Result<Metadata> {
        let resolved = match fs::canonicalize(link) {
            Ok(resolved) => resolved,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(refused(
                    &self.name,
                    path,
                    &format!("{prefix} is a symlink to nothing; it is not followed"),
                ));
            }
            Err(e) => {
                return Err(refused(
                    &self.name,
                    path,
                    &format!("{prefix} is a symlink that does not resolve ({e})"),
                ));
            }
        };
        if !resolved.starts_with(&self.root) {
            let reason = format!(
                "{prefix} is a symlink leading outside the root, to {}",
                resolved.display()
            );
            return Err(refused(&self.name, path, &reason));
        }
        if resolved.starts_with(&self.area.private) {
            return Err(refused(
                &self.name,
                path,
                &format!("{prefix} is a symlink leading into the private area {PRIVATE_DIR}"),
            ));
        }
        fs::metadata(&resolved).map_err(|e| ResourceError::io(&self.name, "inspect", &resolved, &e))
    }

    /// The entries of a branch's prepare record, after it stopped taking writes: a small put's
    /// content is read back from its staged file (and checked against its hash) to go inline;
    /// a larger one's staged file is synced and adopted into the blob store, which makes it
    /// durable under its content's name.
    fn prepare_entries(
        &self,
        xid: &Xid,
        changes: &BTreeMap<String, Change>,
    ) -> Result<Vec<RedoEntry>> {
        let mut inline_bytes = 0u64;
        let mut entries = Vec::with_capacity(changes.len());
        for (path, change) in changes {
            let (staged, id, bytes) = match change {
                Change::Delete => {
                    entries.push(RedoEntry::Delete { path: path.clone() });
                    continue;
                }
                Change::Put { staged, id, bytes } => (staged, *id, *bytes),
            };
            let inline =
                bytes <= INLINE_FILE_BYTES_MAX && inline_bytes + bytes <= INLINE_BRANCH_BYTES_MAX;
            if inline {
                inline_bytes += bytes;
            }
            let file = match (staged, inline) {
                (Staged::Memory(content), true) => {
                    entries.push(RedoEntry::PutInline {
                        path: path.clone(),
                        content: content.to_vec(),
                    });
                    continue;
                }
                (Staged::File(n), true) => {
                    let file = self.area.staged_file(xid, *n);
                    let content = self.read_staged(path, &file, &id, bytes)?;
                    entries.push(RedoEntry::PutInline {
                        path: path.clone(),
                        content,
                    });
                    continue;
                }
                (Staged::File(n), false) => (self.area.staged_file(xid, *n), false),
                // Over the branch's inline budget after all (concurrent puts): through a staged
                // file of its own, removed once adopted (the commit links the blob).
                (Staged::Memory(content), false) => {
                    let n = self.next_file.fetch_add(1, Ordering::Relaxed);
                    let file = self.area.staged_file(xid, n);
                    create_written(&self.name, "staged content", &file, content)?;
                    (file, true)
                }
            };
            let (file, temporary) = file;
            let adopted = self.sync_staged(path, &file, bytes).and_then(|()| {
                self.blobs
                    .adopt(&file, &id)
                    .map_err(|e| blob_error(&self.name, e))
            });
            if adopted.is_ok() {
                self.note_adopted(&id);
            }
            if temporary {
                let removed = remove_file_if_exists(&self.name, &file);
                adopted?;
                removed?;
            } else {
                adopted?;
            }
            entries.push(RedoEntry::Put {
                path: path.clone(),
                id,
                bytes,
            });
        }
        Ok(entries)
    }

    /// Remembers, for a collection running now, that blob `id` is in use by an adoption that
    /// its snapshot did not see.
    fn note_adopted(&self, id: &BlobId) {
        self.adoptions.note(id);
    }

    /// The blobs the open branches' prepare records name.
    fn blobs_in_use(&self) -> Result<HashSet<BlobId>> {
        self.usable_state(|st| {
            st.branches
                .iter()
                .filter_map(|(_, _, branch)| branch.prepared.as_ref())
                .flat_map(|entries| entries.iter())
                .filter_map(|entry| match entry {
                    RedoEntry::Put { id, .. } => Some(*id),
                    _ => None,
                })
                .collect()
        })
    }

    /// A file holding `content` that has no name (created under `tmp/` and unlinked at once),
    /// for reading content staged in memory through a `File`.
    fn anonymous_file(&self, content: &[u8]) -> Result<File> {
        let tmp = self.tmp_file();
        create_written(&self.name, "staged content", &tmp, content)?;
        let file = File::open(&tmp);
        let _ = fs::remove_file(&tmp);
        file.map_err(|e| ResourceError::io(&self.name, "open", &tmp, &e))
    }

    /// The content of a small staged file, checked against the size and hash it was written
    /// with.
    fn read_staged(&self, path: &str, file: &Path, id: &BlobId, bytes: u64) -> Result<Vec<u8>> {
        let mut content = Vec::new();
        self.open_staged(path, file)?
            .read_to_end(&mut content)
            .map_err(|e| ResourceError::io(&self.name, "read staged content", file, &e))?;
        if content.len() as u64 != bytes || BlobId::of(&content) != *id {
            let reason = format!(
                "the staged content of {path} ({}) is not what was written: it was changed by hand; roll the transaction back",
                file.display()
            );
            return Err(self.rejected(reason));
        }
        Ok(content)
    }

    /// One checkpoint (see the `log` module): `syncfs`, then `CHECKPOINT(upto)`, then the
    /// trim. `since` is the durable LSN at the previous checkpoint: a branch prepared below it
    /// and still prepared has its prepare record carried forward.
    fn checkpoint(&self, since: Lsn) -> Result<()> {
        // Every `COMMITTED` below `upto` was appended after its files were in place, so the
        // `syncfs` below, which starts later, makes them durable. Commits racing it have their
        // record at or above `upto` and are redone after a crash.
        let carry_error = |e| log_error(&self.name, FEWER, "carry a prepare record forward", e);
        let trim =
            log::start_trim(&self.log, &self.state().branches, since).map_err(carry_error)?;
        let upto = trim.upto;
        rustix::fs::syncfs(&self.fs)
            .map_err(|e| self.fatal(format!("syncfs {}: {e}", self.root.display())))?;
        // Kept: every branch that was open when the checkpoint started (one that committed
        // since may be redone from its prepare record), and everything from `upto` on.
        let floor = trim
            .carried(|xid, lsn| {
                if let Some(branch) = self.state().branches.get_mut(xid) {
                    branch.log_floor = Some(lsn);
                }
            })
            .map_err(carry_error)?;
        self.log
            .append(
                log::LOG_EPOCH,
                log::CHECKPOINT,
                &log::checkpoint_payload(upto),
            )
            .and_then(journal::Appending::wait)
            .map_err(|e| log_error(&self.name, FEWER, "append a checkpoint", e))?;
        {
            let mut last = lock(&self.checkpoints);
            last.covered = last.covered.max(upto);
        }
        let removed = self
            .log
            .remove_segments_below(floor)
            .map_err(|e| log_error(&self.name, FEWER, "remove old segments", e))?;
        tracing::debug!(resource = %self.name, %upto, %floor, removed, "branch log checkpoint");
        Ok(())
    }

    /// At open: applies again every commit the log holds at or after its last checkpoint (their
    /// files' content may not have reached the disk), in commit order, then checkpoints.
    fn redo_committed(&self, committed: Vec<(Lsn, Xid, Vec<u8>)>) -> Result<()> {
        if committed.is_empty() {
            return Ok(());
        }
        let mut all = Vec::new();
        for (lsn, xid, redo) in &committed {
            let entries = decode_redo(redo).map_err(|e| {
                self.fatal(format!(
                    "the branch log's prepare record of {xid} (committed at lsn {lsn}) does not decode: {e}"
                ))
            })?;
            all.extend(entries.into_iter().map(|entry| (*xid, entry)));
        }
        let mut touched = BTreeSet::new();
        let live = not_superseded(&all);
        for (xid, entry) in all
            .iter()
            .zip(live)
            .filter_map(|(e, live)| live.then_some(e))
        {
            self.apply_entry(xid, entry, None, &mut touched)?;
        }
        tracing::info!(resource = %self.name, commits = committed.len(), "applied again the commits since the last checkpoint");
        self.checkpoint(Lsn::ZERO)
    }

    /// Opens the staged file of `path`; a missing one was removed by hand.
    fn open_staged(&self, path: &str, file: &Path) -> Result<File> {
        File::open(file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => self.rejected(staged_missing(path, file)),
            _ => ResourceError::io(&self.name, "open staged content", file, &e),
        })
    }

    fn sync_staged(&self, path: &str, file: &Path, bytes: u64) -> Result<()> {
        let opened = self.open_staged(path, file)?;
        let len = opened
            .metadata()
            .map_err(|e| ResourceError::io(&self.name, "inspect staged content", file, &e))?
            .len();
        if len != bytes {
            let reason = format!(
                "the staged content of {path} ({}) is {len} bytes, {bytes} were written: it was changed by hand; roll the transaction back",
                file.display()
            );
            return Err(self.rejected(reason));
        }
        sync_file(&self.name, &opened, file)
    }

    /// Commit: puts every entry of the prepare record in place, then removes the staging.
    /// `entries` is `None` for a branch that never prepared (refused before this). Nothing is
    /// synced here, neither content nor directories: the log holds the redo, and a commit is
    /// applied again at open until a checkpoint's `syncfs` (which starts after the commit's
    /// `COMMITTED` is appended, see [`Inner::checkpoint`]) has made its files and names durable.
    /// Applying the same entries again gives the same tree, so a commit interrupted by a crash
    /// is simply done again.
    fn commit_files(
        &self,
        xid: &Xid,
        entries: Option<&Vec<RedoEntry>>,
        changes: &BTreeMap<String, Change>,
    ) -> Result<()> {
        let mut touched = BTreeSet::new();
        for entry in entries.map(Vec::as_slice).unwrap_or_default() {
            let staged = match changes.get(entry.path()) {
                Some(Change::Put {
                    staged: Staged::File(n),
                    ..
                }) => Some(*n),
                _ => None,
            };
            self.apply_entry(xid, entry, staged, &mut touched)?;
        }
        self.remove_staging(xid, changes)?;
        tracing::debug!(resource = %self.name, %xid, "committed");
        Ok(())
    }

    /// Puts one entry of a prepared branch in place (not synced); `staged` is the number of
    /// its staged file while this process has it. The parent directories of what changed go
    /// into `touched`.
    fn apply_entry(
        &self,
        xid: &Xid,
        entry: &RedoEntry,
        staged: Option<u64>,
        touched: &mut BTreeSet<PathBuf>,
    ) -> Result<()> {
        let staged = staged.map(|n| self.area.staged_file(xid, n));
        match entry {
            // The staged file holds the same content (prepare read it and checked its hash), so
            // while this process has it, it is moved into place; otherwise the content is
            // written from the record.
            RedoEntry::PutInline { path, content } => {
                self.put_in_place(path, staged, touched, |target| {
                    self.put_content(path, target, content).map(drop)
                })
            }
            RedoEntry::Put { path, id, bytes } => {
                self.put_in_place(path, staged, touched, |target| {
                    self.restore_from_blob(path, target, id, *bytes)
                })
            }
            RedoEntry::Delete { path } => {
                let target = self.confine(path, Use::Write)?;
                self.remove_target(&target, touched)
            }
        }
    }

    /// Writes `content` to a new temp file and renames it to `target`; returns the open file
    /// (for a caller that syncs it).
    fn put_content(&self, path: &str, target: &Path, content: &[u8]) -> Result<(File, PathBuf)> {
        let tmp = self.tmp_file();
        let created = create_written(&self.name, "content", &tmp, content).and_then(|file| {
            fs::rename(&tmp, target).map_err(|e| {
                let action = format!("rename the content of {path} to");
                ResourceError::io(&self.name, &action, target, &e)
            })?;
            Ok(file)
        });
        match created {
            Ok(file) => Ok((file, target.to_path_buf())),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Puts a file's content in place: its staged file (`staged`, while this process has it)
    /// by rename; or, when there is none or it is gone (an earlier attempt moved it, or a
    /// restart cleared the staging), by `fallback`, given the target.
    fn put_in_place(
        &self,
        path: &str,
        staged: Option<PathBuf>,
        touched: &mut BTreeSet<PathBuf>,
        fallback: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let target = self.confine(path, Use::Write)?;
        self.make_parents(path, touched)?;
        let renamed = match staged {
            Some(file) => fs::rename(file, &target),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        match renamed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => fallback(&target)?,
            Err(e) => {
                let action = format!("rename the staged content of {path} to");
                return Err(ResourceError::io(&self.name, &action, &target, &e));
            }
        }
        touched.insert(parent_of(&target));
        Ok(())
    }

    /// The staged file of a large put is gone: put the same content in place from the blob store
    /// (a link, like the rename).
    /// With the blob gone too, the file at `target` is accepted only when it holds exactly that
    /// content (an earlier attempt put it there): its blake3 hash is checked, not only its
    /// length; anything else is [`ResourceError::ContentLost`].
    fn restore_from_blob(&self, path: &str, target: &Path, id: &BlobId, bytes: u64) -> Result<()> {
        if !self.blobs.contains(id) {
            return match self.content_at(target)? {
                Some((found, len)) if found == *id && len == bytes => Ok(()),
                found => Err(ResourceError::ContentLost {
                    resource: self.name.clone(),
                    path: path.to_string(),
                    blob: *id,
                    bytes,
                    found: match found {
                        None => "is missing".to_string(),
                        Some((other, len)) => {
                            format!("holds other content (blake3 {other}, {len} bytes)")
                        }
                    },
                }),
            };
        }
        tracing::debug!(resource = %self.name, path, blob = %id, "putting the content in place from the blob store");
        let tmp = self.tmp_file();
        let blob = self.blobs.path_of(id);
        fs::hard_link(&blob, &tmp)
            .map_err(|e| ResourceError::io(&self.name, "link blob to", &tmp, &e))?;
        fs::rename(&tmp, target).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ResourceError::io(&self.name, "rename blob to", target, &e)
        })
    }

    /// The blake3 hash and size of the file at `target` (read through one `CHUNK_BYTES`
    /// buffer); `None` when there is no file there.
    fn content_at(&self, target: &Path) -> Result<Option<(BlobId, u64)>> {
        let mut file = match File::open(target) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ResourceError::io(&self.name, "open", target, &e)),
        };
        if !file
            .metadata()
            .map_err(|e| ResourceError::io(&self.name, "inspect", target, &e))?
            .is_file()
        {
            return Ok(None);
        }
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut len = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    len += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ResourceError::io(&self.name, "read", target, &e)),
            }
        }
        Ok(Some((BlobId(*hasher.finalize().as_bytes()), len)))
    }

    /// Creates the missing parent directories of `path`; each new directory's parent goes into
    /// `touched`, to be synced.
    fn make_parents(&self, path: &str, touched: &mut BTreeSet<PathBuf>) -> Result<()> {
        let Some((parents, _)) = path.rsplit_once('/') else {
            return Ok(());
        };
        let mut current = self.root.clone();
        for component in parents.split('/') {
            current.push(component);
            // The parent is synced whether this call created the directory or found it: a
            // concurrent branch (or an attempt that crashed) may have created it without syncing
            // its entry yet, and this branch's commit must not be acknowledged before it is.
            touched.insert(parent_of(&current));
            match fs::create_dir(&current) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && current.is_dir() => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(refused(
                        &self.name,
                        path,
                        &format!("{} is not a directory", current.display()),
                    ));
                }
                Err(e) => {
                    return Err(ResourceError::io(
                        &self.name,
                        "create directory",
                        &current,
                        &e,
                    ));
                }
            }
        }
        Ok(())
    }

    fn remove_target(&self, target: &Path, touched: &mut BTreeSet<PathBuf>) -> Result<()> {
        // Synced even when the file is already gone: an earlier attempt may have removed it and
        // crashed before syncing the directory.
        touched.insert(parent_of(target));
        match fs::remove_file(target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ResourceError::io(&self.name, "remove", target, &e)),
        }
    }

    /// Removes a branch's staged files that are still there (a commit moved the others into
    /// place), without syncing: staging that comes back after a crash is removed at open (no
    /// branch uses its staging after a restart).
    fn remove_staging(&self, xid: &Xid, changes: &BTreeMap<String, Change>) -> Result<()> {
        for change in changes.values() {
            if let Change::Put {
                staged: Staged::File(n),
                ..
            } = change
            {
                remove_file_if_exists(&self.name, &self.area.staged_file(xid, *n))?;
            }
        }
        Ok(())
    }

    /// Replay: put every entry in place (inline content from the redo, the rest from the blob
    /// store), sync the files written and the directories touched, then store `lsn` as applied
    /// (see "Crashes" in the module docs).
    fn replay_files(&self, entries: &[RedoEntry], lsn: Lsn) -> Result<()> {
        let mut touched = BTreeSet::new();
        let mut written = Vec::new();
        for (n, entry) in entries.iter().enumerate() {
            if n == 1 && self.pauses.replay_fails_here() {
                return Err(self.unavailable(format!(
                    "replay of lsn {lsn} stopped by its fail point after its first entry"
                )));
            }
            check_path(&self.name, entry.path())?;
            match entry {
                RedoEntry::Put { path, id, bytes } => {
                    self.replay_put(path, id, *bytes, &mut touched)?
                }
                RedoEntry::PutInline { path, content } => {
                    self.put_in_place(path, None, &mut touched, |target| {
                        written.push(self.put_content(path, target, content)?);
                        Ok(())
                    })?
                }
                RedoEntry::Delete { path } => {
                    let target = self.confine(path, Use::Write)?;
                    self.remove_target(&target, &mut touched)?;
                }
            }
        }
        for (file, path) in &written {
            sync_file(&self.name, file, path)?;
        }
        for dir in &touched {
            self.dirs.sync(dir)?;
        }
        self.write_state("applied lsn", &self.area.applied_lsn, lsn.0)
    }

    fn replay_put(
        &self,
        path: &str,
        id: &BlobId,
        bytes: u64,
        touched: &mut BTreeSet<PathBuf>,
    ) -> Result<()> {
        let target = self.confine(path, Use::Write)?;
        self.make_parents(path, touched)?;
        let tmp = self.copy_blob(path, id, bytes)?;
        fs::rename(&tmp, &target).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ResourceError::io(&self.name, "rename replayed content to", &target, &e)
        })?;
        touched.insert(parent_of(&target));
        Ok(())
    }

    /// Copies blob `id` to a new synced temp file, checking its hash and size.
    fn copy_blob(&self, path: &str, id: &BlobId, bytes: u64) -> Result<PathBuf> {
        let tmp = self.tmp_file();
        let copied = self.copy_blob_to(id, &tmp);
        match copied {
            Ok(n) if n == bytes => Ok(tmp),
            Ok(n) => {
                let _ = fs::remove_file(&tmp);
                Err(self.fatal(format!(
                    "blob {id} for {path} is {n} bytes, the redo says {bytes}"
                )))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn copy_blob_to(&self, id: &BlobId, tmp: &Path) -> Result<u64> {
        let mut reader = self
            .blobs
            .open_blob(id)
            .map_err(|e| blob_error(&self.name, e))?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| ResourceError::io(&self.name, "create", tmp, &e))?;
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
                .map_err(|e| ResourceError::io(&self.name, "write", tmp, &e))?;
            copied += n as u64;
        }
        sync_file(&self.name, &out, tmp)?;
        Ok(copied)
    }

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

impl Locks {
    /// Locks `path` for `xid` with an intent on each ancestor, unless another branch holds a
    /// conflicting lock or `xid`'s own locks make the path impossible (a file and a path below it).
    fn try_take(&mut self, xid: &Xid, path: &str) -> Result<(), Refusal> {
        if let Some(holder) = self.exclusive.get(path) {
            return if holder == xid {
                Ok(())
            } else {
                Err(Refusal::Held(*holder))
            };
        }
        for ancestor in ancestors(path) {
            match self.exclusive.get(ancestor) {
                Some(holder) if holder == xid => {
                    return Err(Refusal::Own(format!(
                        "this transaction writes the file {ancestor}, so it cannot write below it"
                    )));
                }
                Some(holder) => return Err(Refusal::Held(*holder)),
                None => {}
            }
        }
        if let Some(holders) = self.intents.get(path) {
            if let Some(other) = holders.keys().find(|h| *h != xid) {
                return Err(Refusal::Held(*other));
            }
            if holders.contains_key(xid) {
                return Err(Refusal::Own(
                    "this transaction writes below it, so it cannot write it as a file".to_string(),
                ));
            }
        }
        self.take(xid, path);
        Ok(())
    }

    /// Locks `path` for `xid` without checking (for prepared branches at open).
    fn take(&mut self, xid: &Xid, path: &str) {
        self.exclusive.insert(path.to_string(), *xid);
        for ancestor in ancestors(path) {
            *self
                .intents
                .entry(ancestor.to_string())
                .or_default()
                .entry(*xid)
                .or_default() += 1;
        }
    }

    fn release(&mut self, xid: &Xid, path: &str) {
        if self.exclusive.get(path) == Some(xid) {
            self.exclusive.remove(path);
        }
        for ancestor in ancestors(path) {
            let Some(holders) = self.intents.get_mut(ancestor) else {
                continue;
            };
            if let Some(count) = holders.get_mut(xid) {
                *count -= 1;
                if *count == 0 {
                    holders.remove(xid);
                }
            }
            if holders.is_empty() {
                self.intents.remove(ancestor);
            }
        }
    }
}

/// The proper ancestors of a relative path: `a/b/c` → `a`, `a/b`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

fn encode_put(out: &mut Vec<u8>, path: &str, id: &BlobId, bytes: u64) {
    out.push(OP_PUT);
    encode_path(out, path);
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&bytes.to_le_bytes());
}

fn encode_delete(out: &mut Vec<u8>, path: &str) {
    out.push(OP_DELETE);
    encode_path(out, path);
}

/// Paths are at most `PATH_BYTES_MAX` (checked on every write), so the length fits a u16.
fn encode_path(out: &mut Vec<u8>, path: &str) {
    debug_assert!(
        path.len() <= PATH_BYTES_MAX,
        "path over PATH_BYTES_MAX reached the encoder"
    );
    out.extend_from_slice(&u16::try_from(path.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(path.as_bytes());
}

/// Reads the count of a redo.
fn read_count(reader: &mut Reader<'_>) -> Result<usize, String> {
    let count = reader.u32()? as usize;
    if count > BRANCH_PATHS_MAX {
        return Err(format!(
            "{count} entries, over BRANCH_PATHS_MAX = {BRANCH_PATHS_MAX}"
        ));
    }
    Ok(count)
}

/// Reads one entry of a redo of `version`.
fn read_entry(reader: &mut Reader<'_>, version: u8) -> Result<RedoEntry, String> {
    let op = reader.u8()?;
    let len = usize::from(reader.u16()?);
    if len > PATH_BYTES_MAX {
        return Err(format!(
            "path of {len} bytes, over PATH_BYTES_MAX = {PATH_BYTES_MAX}"
        ));
    }
    let path = String::from_utf8(reader.take(len)?.to_vec())
        .map_err(|_| "path is not UTF-8".to_string())?;
    let entry = match op {
        OP_PUT => RedoEntry::Put {
            path,
            id: BlobId(reader.array()?),
            bytes: reader.u64()?,
        },
        OP_PUT_INLINE if version >= 2 => {
            let len = u64::from(reader.u32()?);
            if len > INLINE_FILE_BYTES_MAX {
                return Err(format!(
                    "inline content of {len} bytes, over INLINE_FILE_BYTES_MAX = {INLINE_FILE_BYTES_MAX}"
                ));
            }
            let content = reader.take(len as usize)?.to_vec();
            RedoEntry::PutInline { path, content }
        }
        OP_DELETE => RedoEntry::Delete { path },
        other => return Err(format!("unknown op {other}")),
    };
    Ok(entry)
}

/// Checks a path lexically: relative, `/`-separated, no empty, `.` or `..` component, no NUL,
/// not in the private area, at most `PATH_BYTES_MAX` bytes.
fn check_path(name: &str, path: &str) -> Result<()> {
    let reason = if path.is_empty() {
        Some("it is empty")
    } else if path.len() > PATH_BYTES_MAX {
        Some("it is longer than PATH_BYTES_MAX bytes")
    } else if path.contains('\0') {
        Some("it contains a NUL byte")
    } else if path.starts_with('/') {
        Some("it is absolute; paths are relative to the root")
    } else if path.split('/').any(|c| c.is_empty()) {
        Some("it has an empty component")
    } else if path.split('/').any(|c| c == "..") {
        Some("it has a `..` component")
    } else if path.split('/').any(|c| c == ".") {
        Some("it has a `.` component")
    } else if path.split('/').next() == Some(PRIVATE_DIR) {
        Some("it is in the private area .concord")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(refused(name, path, reason)),
        None => Ok(()),
    }
}

fn refused(name: &str, path: &str, reason: &str) -> ResourceError {
    ResourceError::rejected(name, format!("path {path:?} refused: {reason}"))
}

fn not_found(name: &str, path: &str, why: &str) -> ResourceError {
    ResourceError::rejected(name, format!("{path} not found: {why}"))
}

fn create_staged(name: &str, file: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| ResourceError::io(name, "create staged file", file, &e))
}

/// Creates the new file `path` (an existing file is an error: temp names are never reused)
/// with `content`, and syncs it.
fn create_synced(name: &str, what: &str, path: &Path, content: &[u8]) -> Result<()> {
    let file = create_written(name, what, path, content)?;
    sync_file(name, &file, path)
}

/// Creates the new file `path` with `content`, not synced.
fn create_written(name: &str, what: &str, path: &Path, content: &[u8]) -> Result<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ResourceError::io(name, &format!("create {what} temp file"), path, &e))?;
    file.write_all(content)
        .map_err(|e| ResourceError::io(name, &format!("write {what} to"), path, &e))?;
    Ok(file)
}

/// Which of `entries` (in commit order) still decide their path's final state: an entry is
/// superseded by a later one on the same path, on an ancestor of it (the ancestor became a file
/// or went away) or on a path below it (it became a directory). Applying only the others, in
/// order, gives the same tree as applying all of them did — and never tries to put a file where
/// a later commit made a directory, which would fail.
fn not_superseded(entries: &[(Xid, RedoEntry)]) -> Vec<bool> {
    // The last position of an entry on each path, and of any entry on a path below each path.
    let mut last_at: HashMap<&str, usize> = HashMap::new();
    let mut last_below: HashMap<&str, usize> = HashMap::new();
    for (i, (_, entry)) in entries.iter().enumerate() {
        let path = entry.path();
        last_at.insert(path, i);
        for ancestor in ancestors(path) {
            last_below.insert(ancestor, i);
        }
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, (_, entry))| {
            let path = entry.path();
            let later = |at: Option<&usize>| at.is_some_and(|&j| j > i);
            !(later(last_at.get(path))
                || later(last_below.get(path))
                || ancestors(path).any(|a| later(last_at.get(a))))
        })
        .collect()
}

/// Why a prepare cannot find a staged file.
fn staged_missing(path: &str, file: &Path) -> String {
    format!(
        "the staged content of {path} ({}) is missing: the staging area was changed by hand; roll the transaction back",
        file.display()
    )
}

/// Checks (or creates) the root and returns its canonical path.
fn open_root(name: &str, dirs: &DirSync, root: &Path, config: &FilesConfig) -> Result<PathBuf> {
    match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(ResourceError::rejected(
                name,
                format!("root {} is not a directory", root.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && config.create_if_missing => {
            fs::create_dir_all(root)
                .map_err(|e| ResourceError::io(name, "create root directory", root, &e))?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                dirs.sync(parent)?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let reason = format!(
                "root directory {} does not exist; create it or set create_if_missing",
                root.display()
            );
            return Err(ResourceError::rejected(name, reason));
        }
        Err(e) => return Err(ResourceError::io(name, "inspect root directory", root, &e)),
    }
    fs::canonicalize(root).map_err(|e| ResourceError::io(name, "resolve root directory", root, &e))
}

/// Empties a directory (temp files of interrupted writes).
fn clear_dir(name: &str, dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| ResourceError::io(name, "list", dir, &e))? {
        let path = entry
            .map_err(|e| ResourceError::io(name, "list", dir, &e))?
            .path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| ResourceError::io(name, "remove", &path, &e))?;
    }
    Ok(())
}

fn open_blobs(name: &str, area: &Area, config: &FilesConfig) -> Result<BlobStore> {
    let blob_config = BlobConfig {
        blob_bytes_max: config.file_bytes_max,
        chunk_bytes: CHUNK_BYTES,
        create_if_missing: true,
    };
    BlobStore::open(area.private.join("blobs"), blob_config).map_err(|e| blob_error(name, e))
}

/// The prepared branches (from the live records of the branch log), with their locks taken.
fn load_prepared(
    name: &str,
    live: HashMap<Xid, (Lsn, Vec<u8>)>,
) -> Result<(Branches<Branch>, Locks)> {
    let (mut branches, mut locks) = (HashMap::new(), Locks::default());
    for (xid, (lsn, redo)) in live {
        let entries = decode_redo(&redo).map_err(|e| ResourceError::Fatal {
            resource: name.to_string(),
            message: format!(
                "the branch log's prepare record of {xid} (lsn {lsn}) does not decode: {e}"
            ),
        })?;
        let mut branch = Branch::new();
        branch.log_floor = Some(lsn);
        for entry in &entries {
            let path = entry.path();
            check_path(name, path)?;
            locks.take(&xid, path);
            branch.locked.insert(path.to_string());
        }
        branch.prepared = Some(Arc::new(entries));
        branches.insert(xid, branch);
    }
    Ok((Branches::recovered(branches), locks))
}

/// Removes everything staged: no branch uses its staging after a restart (a prepared branch
/// has its content in the log or the blob store; any other is presumed aborted).
fn clear_staging(name: &str, dirs: &DirSync, area: &Area) -> Result<()> {
    let mut removed = 0usize;
    for entry in fs::read_dir(&area.staging)
        .map_err(|e| ResourceError::io(name, "list", &area.staging, &e))?
    {
        let path = entry
            .map_err(|e| ResourceError::io(name, "list", &area.staging, &e))?
            .path();
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        gone.map_err(|e| ResourceError::io(name, "remove", &path, &e))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(
            resource = name,
            removed,
            "removed the staging left by the previous run"
        );
        dirs.sync(&area.staging)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<RedoEntry> {
        vec![
            RedoEntry::Put {
                path: "a/b.txt".into(),
                id: BlobId::of(b"hello"),
                bytes: 5,
            },
            RedoEntry::PutInline {
                path: "d".into(),
                content: b"inline".to_vec(),
            },
            RedoEntry::Delete { path: "c".into() },
        ]
    }

    #[test]
    fn redo_round_trips() {
        let redo = encode_redo(&sample());
        assert_eq!(redo[0], REDO_VERSION);
        assert_eq!(decode_redo(&redo).unwrap(), sample());
        assert_eq!(decode_redo(&encode_redo(&[])).unwrap(), vec![]);
    }

    #[test]
    fn malformed_redo_is_refused() {
        let redo = encode_redo(&sample());
        for cut in 0..redo.len() {
            assert!(decode_redo(&redo[..cut]).is_err(), "truncated at {cut}");
        }
        let mut trailing = redo.clone();
        trailing.push(0);
        assert!(decode_redo(&trailing).unwrap_err().contains("trailing"));
        let mut newer = redo.clone();
        newer[0] = 3;
        assert!(decode_redo(&newer).unwrap_err().contains("version 3"));
        let mut v1 = redo.clone();
        v1[0] = 1;
        assert!(
            decode_redo(&v1).unwrap_err().contains("unknown op 3"),
            "inline content is refused in a version 1 redo"
        );
        let v1_only = encode_redo(&sample()[..1]);
        let mut v1_only = v1_only.clone();
        v1_only[0] = 1;
        assert_eq!(decode_redo(&v1_only).unwrap(), sample()[..1].to_vec());
        let mut huge = vec![REDO_VERSION];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_redo(&huge).unwrap_err().contains("BRANCH_PATHS_MAX"));
        let mut bad_op = redo.clone();
        bad_op[5] = 9;
        assert!(decode_redo(&bad_op).unwrap_err().contains("unknown op"));
    }

    #[test]
    fn superseded_entries_are_those_a_later_entry_decides() {
        let x = Xid {
            node: 1,
            epoch: Epoch(1),
            seq: 1,
        };
        let put = |path: &str| {
            (
                x,
                RedoEntry::PutInline {
                    path: path.into(),
                    content: vec![],
                },
            )
        };
        let delete = |path: &str| (x, RedoEntry::Delete { path: path.into() });
        let entries = vec![
            put("a"),      // superseded: a/b below it comes later
            delete("a"),   // superseded: a/b below it comes later
            put("a/b"),    // decides a/b
            put("c/d"),    // superseded: c becomes a file later
            put("c"),      // superseded: c is put again later
            put("c"),      // decides c
            put("e"),      // decides e: nothing later touches it
            delete("f/g"), // decides f/g
            put("f/h"),    // decides f/h: a sibling does not supersede
        ];
        assert_eq!(
            not_superseded(&entries),
            vec![false, false, true, false, false, true, true, true, true]
        );
    }

    #[test]
    fn locks_conflict_on_paths_and_their_ancestors() {
        let (a, b) = (
            Xid {
                node: 1,
                epoch: Epoch(1),
                seq: 1,
            },
            Xid {
                node: 1,
                epoch: Epoch(1),
                seq: 2,
            },
        );
        let mut locks = Locks::default();
        assert!(locks.try_take(&a, "d/f").is_ok());
        assert!(locks.try_take(&a, "d/f").is_ok(), "re-locking is a no-op");
        assert!(matches!(locks.try_take(&b, "d/f"), Err(Refusal::Held(h)) if h == a));
        assert!(matches!(locks.try_take(&b, "d"), Err(Refusal::Held(h)) if h == a));
        assert!(matches!(locks.try_take(&b, "d/f/g"), Err(Refusal::Held(h)) if h == a));
        assert!(matches!(locks.try_take(&a, "d"), Err(Refusal::Own(_))));
        assert!(matches!(locks.try_take(&a, "d/f/g"), Err(Refusal::Own(_))));
        assert!(
            locks.try_take(&b, "d/other").is_ok(),
            "siblings do not conflict"
        );
        locks.release(&a, "d/f");
        assert!(locks.try_take(&b, "d/f").is_ok());
        locks.release(&b, "d/f");
        locks.release(&b, "d/other");
        assert!(locks.exclusive.is_empty() && locks.intents.is_empty());
    }

    #[test]
    fn paths_are_checked_lexically() {
        for good in ["a", "a/b", "a.b/c..d", "x/.concord", ".concordx"] {
            assert!(check_path("f", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a//b",
            "a/",
            "../a",
            "a/../b",
            "./a",
            "a\0b",
            ".concord",
            ".concord/x",
        ] {
            assert!(check_path("f", bad).is_err(), "{bad:?}");
        }
        assert!(check_path("f", &"a".repeat(PATH_BYTES_MAX + 1)).is_err());
    }
}
