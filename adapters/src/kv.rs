//! The kv resource: a sled key-value store whose writes commit with the transaction.
//!
//! A branch inserts and removes keys of one sled tree, the **data tree**. Nothing it writes is
//! visible there until the branch commits; then all of it appears at once. The idea is a write
//! batch kept aside until the decision, made durable at prepare in a private tree, and moved
//! into the data tree by one sled transaction at commit:
//!
//! * **Writes.** [`KvBranch::insert`] and [`KvBranch::remove`] record the write in the branch's
//!   pending batch, in memory, after locking the key. [`KvBranch::get`] reads the branch's own
//!   writes first (a pending insert or remove shadows the store), then the committed data tree;
//!   other branches and [`KvResource::get`] see the committed data tree only.
//! * **Prepare** encodes the pending writes as a **batch** (see "The batch" below) and stores it
//!   in the **prepared tree** under the xid, in one sled transaction with a check of the fence
//!   epoch stored in the **meta tree**, then syncs (see "Durability"). The vote carries the same
//!   bytes as the redo. A branch without writes votes [`Vote::ReadOnly`] and is forgotten; a
//!   branch prepared already votes again with its stored batch.
//! * **Commit** reads the batch from the prepared tree, applies it to the data tree and removes
//!   it from the prepared tree in **one sled transaction across both trees**, then syncs. So the
//!   effects and the end of the branch become durable together: there is no state in which the
//!   data tree holds the writes and the branch is still prepared, or the branch is gone and the
//!   writes are not there. **Rollback** removes the prepared entry (for a branch that never
//!   prepared there is nothing on disk) and syncs. Both are idempotent: an xid without an entry
//!   counts as resolved.
//! * **Recover** lists the prepared tree; at open every entry is decoded and checked, and its
//!   branch comes back prepared, with its keys locked again.
//! * **Locks.** Each key a branch writes is locked from its first write until the branch is
//!   resolved, so that the journal order is the commit order (docs/design.md "Ordering": a
//!   conflicting branch cannot prepare before the first one committed, which is after its
//!   decision record). A second writer waits at most `lock_wait_ms_max`, then fails with
//!   [`ResourceError::Conflict`] naming the key and the holder's xid. Locks live in memory; the
//!   prepared tree is what rebuilds them after a restart.
//! * **Fencing and replay.** [`Resource::fence`] raises the fence epoch in the meta tree
//!   (durably). A branch of a lower epoch is refused at begin and at every write (against the
//!   epoch in memory) and at prepare (against the stored epoch, inside the transaction that
//!   stores the batch: sled transactions are serializable, so a fence either commits before the
//!   prepare and refuses it, or after it, and then the branch was prepared at a time it was
//!   allowed to). A fence also waits for the prepares, commits and rollbacks in flight, and then
//!   the fenced instance refuses to resolve the prepared branches it began below the new epoch;
//!   an instance opened afterwards (their new owner) resolves them. [`Resource::replay`] applies a batch and stores its LSN as the **applied LSN**
//!   in one transaction on the data and meta trees; a batch at or below the applied LSN changes
//!   nothing. [`Resource::replay_batch`] does the same for several redos at once: the writes
//!   of every redo above the applied LSN, in LSN order, and the last LSN, in one transaction
//!   and one sync.
//! * **Inventory.** [`Resource::inventory`] lists every key of the data tree in lower-case hex
//!   (which keeps sled's byte order) with the blake3 hash of its value.
//! * **Re-seeding.** [`Resource::read_entry`], [`Resource::write_entry`] and
//!   [`Resource::remove_entry`] read, set and remove one key by its inventory key (hex), each
//!   change one sled write and a sync; [`Resource::set_applied_lsn`] sets the applied LSN in the
//!   meta tree (the `reseed` submodule).
//!
//! [`KvResource`] is the resource ([`KvResource::open`], [`KvConfig`]); a [`KvBranch`] is an
//! application's handle on one branch; [`KvWrite`] with [`encode_batch`] and [`decode_batch`] is
//! the batch (and redo). The sled side — trees, transactions, the sync — is the `store`
//! submodule; the batch encoding is the `batch` submodule. Begin, prepare, commit, rollback,
//! fence and replay run the branch lifecycle the resources share (`internal::lifecycle`); the
//! `steps` submodule holds the kv resource's own part of each.
//!
//! # On disk
//!
//! ```text
//! <dir>/                  a sled 0.34 directory (db, conf, blobs/, snapshots), flock-ed by sled
//!   tree "data"           the user's keys and values (DATA_TREE)
//!   tree "concord.prepared"  xid text (n<node>e<epoch>s<seq>) → the branch's batch (PREPARED_TREE)
//!   tree "concord.meta"   "fence" → epoch, "applied_lsn" → lsn (META_TREE); each value a
//!                         version byte (1) and a u64 LE; absent means 0
//! ```
//!
//! # The batch (version 1)
//!
//! ```text
//! version   u8       = 1
//! count     u32 LE   number of writes (at most BATCH_WRITES_MAX)
//! write*    op       u8: 1 = insert, 2 = remove
//!           key      u32 LE length (at most KEY_BYTES_MAX), then the key
//!           (op 1)   value: u32 LE length (at most VALUE_BYTES_LIMIT), then the value
//! ```
//!
//! Writes are sorted by key, each key once (one encoding per batch). The decoder refuses an
//! unknown version or op, over-limit counts and lengths, keys out of order or repeated, a
//! truncated write and trailing bytes, without panicking and without allocating for a length it
//! has not checked. A prepared entry that does not decode is damage: the resource refuses to
//! open ([`ResourceError::Fatal`], naming the xid and the directory), as it does for a prepared
//! key that is not an xid and a meta value of the wrong size or version.
//!
//! # Durability
//!
//! sled's own flush (0.34, Linux) ends in `sync_file_range`, which neither empties the
//! device's write cache nor makes a grown file's size durable, and it never syncs the separate
//! files in which it keeps large values. So every step acknowledged here ends in a **sync**:
//! sled's flush, then `fdatasync` of sled's `db` file, then `fsync` of each blob file not synced
//! before and of the `blobs/` directory. Concurrent steps share one sync (a group sync: a step
//! returns after a sync that started after its write; the `store` module). A failed sync is
//! fatal: the instance is poisoned (every later call fails with [`ResourceError::Fatal`]) and
//! the process must restart and recover.
//!
//! # Crashes
//!
//! * **Before prepare's transaction is durable**: the branch is not prepared; after the restart
//!   it is unknown (presumed abort): `recover` does not list it, a prepare of it is refused, a
//!   rollback succeeds.
//! * **After prepare's sync**: the entry is in the prepared tree; the branch comes back prepared
//!   with its locks, and the coordinator commits or rolls it back.
//! * **During commit, before its transaction is durable**: sled recovers transactions whole
//!   (its log seals a transaction's writes as one batch), so the restart finds the entry still
//!   prepared and the data tree without its writes, and the coordinator commits again. No other
//!   branch wrote those keys in between: the locks were held until the commit's sync, and are
//!   taken again at open.
//! * **After commit's sync**: the entry is gone and the writes are there; a repeated commit finds
//!   no entry and succeeds.
//! * **During replay**: the writes of a whole batch of redos and the batch's last LSN as the
//!   applied LSN are one transaction, synced once: either all of it is there after the restart
//!   (the same batch is then a no-op) or none of it (the replayer sends it again).
//!
//! # Limits
//!
//! * A key is at most [`KEY_BYTES_MAX`] (64 KiB). sled 0.34 has no limit of its own, but every
//!   key may be copied into index nodes as a separator, and its unbounded reverse iteration uses
//!   a 1 MiB key of `0xff` bytes as the upper bound; 64 KiB keeps keys well clear of both.
//! * A value is at most `value_bytes_max` (default 1 MiB, configurable up to
//!   [`VALUE_BYTES_LIMIT`]); a branch's encoded batch at most `batch_bytes_max` (default 4 MiB,
//!   configurable up to [`BATCH_BYTES_LIMIT`]) and [`BATCH_WRITES_MAX`] writes. The batch is
//!   kept in memory until it commits, stored as one sled value, and carried as the redo in the
//!   coordinator's `Commit` record, whose journal refuses records over its `record_bytes_max`
//!   (8 MiB by default): keep `batch_bytes_max` well below that. A write over a limit is
//!   refused ([`ResourceError::Rejected`], naming the sizes and the limit) and changes nothing.
//!
//! # Implementation caveats
//!
//! * Reads take no locks: a branch reads the committed data tree as it is at each read (no
//!   repeatable reads, no protection against write skew). Only writes are isolated.
//! * Locks are per key, not per range: two branches inserting different keys never conflict,
//!   whatever a scan would have seen. There is no scan or range read on a branch.
//! * Replay ignores locks: a standby runs no branches of its own.
//! * One-phase commit (commit of an unprepared branch) is refused.
//! * A read-only vote is remembered for the last `READ_ONLY_REMEMBERED_MAX` such branches (a
//!   repeated prepare votes the same); after a restart such a branch is unknown.
//! * sled writes a large value's blob file before the log record naming it, and its background
//!   flusher may make that record durable before our sync reaches the blob; a power failure in
//!   that window can leave sled unable to open (a sled 0.34 limitation). Process crashes are not
//!   affected: the page cache keeps the blob.
//! * sled's transactions take a process-wide write lock: prepares, commits and replays of all
//!   branches run one at a time through it (each is short: the fsyncs happen after it).
//! * The directory is sled's: other programs cannot read it while concord has it open (sled's
//!   lock), and must not write the private trees when it is closed.
//! * sled 0.34 has no close: its background writes may hold the directory's lock for a moment
//!   after the last handle is dropped. `open` therefore waits up to `open_wait_ms_max` for the
//!   lock, and a directory held by another process is reported only after that wait.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::internal::branches::Branches;
use crate::internal::instance::{Instance, InstanceState, Shared};
use crate::internal::io::blocking;
use crate::internal::lifecycle;
use crate::internal::lifecycle::Shell;
use crate::internal::locks::wait_for_lock;
use crate::internal::reseed as internal_reseed;
use crate::{BlobContent, Epoch, Lsn, Resource, ResourceError, Vote, Xid};

mod batch;
mod reseed;
mod steps;
mod store;

pub use batch::{KvWrite, decode_batch, encode_batch};
use store::Store;

/// The sled tree holding the user's keys and values.
pub const DATA_TREE: &str = "data";
/// The private sled tree holding each prepared branch's batch, keyed by xid text.
pub const PREPARED_TREE: &str = "concord.prepared";
/// The private sled tree holding the fence epoch and the applied LSN.
pub const META_TREE: &str = "concord.meta";

/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 64 << 10;
/// The highest `value_bytes_max` a configuration may set (and the longest value a batch may
/// hold).
pub const VALUE_BYTES_LIMIT: u64 = 64 << 20;
/// The highest `batch_bytes_max` a configuration may set.
pub const BATCH_BYTES_LIMIT: u64 = 256 << 20;
/// Most writes (distinct keys) one branch may make, and one batch may hold.
pub const BATCH_WRITES_MAX: usize = 1 << 20;
/// Keys are shown in messages up to this many bytes.
const KEY_SHOWN_BYTES_MAX: usize = 64;

/// What a panicked blocking task was, in its error.
const TASK: &str = "kv";

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// The xids a kv resource at `dir` holds prepared, read from its prepared tree: `None` when a
/// running instance holds the sled directory (sled lets one process at a time open it), an empty
/// list when `dir` holds no sled database. Opens the directory with sled for the read (which
/// runs sled's own recovery of its log), so it is for operator views of a stopped application.
pub fn prepared_on_disk(dir: &Path) -> Result<Option<Vec<Xid>>> {
    store::prepared_on_disk("kv", dir)
}

/// Limits and options of a kv resource.
#[derive(Clone, Debug)]
pub struct KvConfig {
    /// How long a branch waits for a key another open branch writes before it fails with
    /// [`ResourceError::Conflict`].
    pub lock_wait_ms_max: u64,
    /// Longest value an insert accepts, in bytes (at most [`VALUE_BYTES_LIMIT`]).
    pub value_bytes_max: u64,
    /// Largest encoded batch (the redo) of one branch, in bytes (at most
    /// [`BATCH_BYTES_LIMIT`]); a write that would make it larger is refused.
    pub batch_bytes_max: u64,
    /// Create the sled directory when it does not exist.
    pub create_if_missing: bool,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// How long [`KvResource::open`] waits for the sled directory's lock before it reports the
    /// directory held by another process. An instance of this process dropped a moment before
    /// may hold it for a little while: sled's background writes end after its last handle.
    pub open_wait_ms_max: u64,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            lock_wait_ms_max: 5000,
            value_bytes_max: 1 << 20,
            batch_bytes_max: 4 << 20,
            create_if_missing: false,
            cache_bytes: 64 << 20,
            open_wait_ms_max: 2000,
        }
    }
}

/// The kv resource; see the module docs.
pub struct KvResource {
    inner: Arc<Inner>,
}

/// An application's handle on one branch of a [`KvResource`]: what it writes is pending and
/// appears in the data tree when the branch commits.
pub struct KvBranch {
    inner: Arc<Inner>,
    xid: Xid,
}

struct Inner {
    name: String,
    dir: PathBuf,
    config: KvConfig,
    store: Store,
    state: Mutex<State>,
    /// Woken whenever a branch releases its locks.
    released: Notify,
    /// The fence gate, the test pauses and the replay lock.
    shell: Shell,
}

/// A pending write: the value of an insert, `None` for a remove.
type Pending = Option<Arc<[u8]>>;
/// The holder of each locked key.
type Locks = HashMap<Vec<u8>, Xid>;

/// A branch; its phase is in the table of branches (prepared: its batch is durable in the
/// prepared tree).
struct Branch {
    /// Its writes by key; each key is locked by this branch.
    writes: BTreeMap<Vec<u8>, Pending>,
    /// Bytes of `writes` as a batch.
    batch_bytes: u64,
    /// Its stored batch once prepared (the redo of its vote).
    prepared: Option<Arc<Vec<u8>>>,
}

/// Invariant: a key is in `locks` under an xid exactly when that xid's branch has a write of it.
struct State {
    /// The fence, the applied LSN and the poison, as every resource has them.
    shared: Shared,
    branches: Branches<Branch>,
    locks: Locks,
}

/// The outcome of one attempt to record a write.
enum Attempt {
    Recorded,
    /// Another branch holds the key.
    Held(Xid),
}

impl KvResource {
    /// Opens the sled directory `dir` (creating it when `create_if_missing`): opens its trees,
    /// reads the fence epoch and applied LSN, and brings back every prepared branch with its
    /// keys locked. Refused when another process has the directory open. Blocking: call it from
    /// `spawn_blocking` when a runtime must not stall.
    pub fn open(name: &str, dir: &Path, config: KvConfig) -> Result<Arc<KvResource>> {
        check_config(name, &config)?;
        let store = Store::open(name, dir, &config)?;
        let (fence, applied_lsn) = store.meta()?;
        let (branches, locks) = load_prepared(name, dir, store.prepared_entries()?)?;
        tracing::info!(resource = name, dir = %dir.display(), prepared = branches.len(), %fence, %applied_lsn, "kv resource open");
        let state = State {
            shared: Shared::opened(fence, applied_lsn),
            branches,
            locks,
        };
        let inner = Inner {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            config,
            store,
            state: Mutex::new(state),
            released: Notify::new(),
            shell: Shell::default(),
        };
        Ok(Arc::new(KvResource {
            inner: Arc::new(inner),
        }))
    }

    /// The handle of the branch of `xid`, which must have been begun ([`Resource::begin`]);
    /// otherwise its calls are refused.
    pub fn branch(&self, xid: &Xid) -> KvBranch {
        KvBranch {
            inner: self.inner.clone(),
            xid: *xid,
        }
    }

    /// The committed value of `key` in the data tree.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.check_key(key)?;
        self.inner.committed(key).await
    }

    /// The sled directory, as given to [`KvResource::open`].
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &KvConfig {
        &self.inner.config
    }

    /// For tests: the next prepare of `xid` stops once past its fence check, before anything
    /// of it is durable, until the returned pause is released (the conformance suite's
    /// `fence_covers_a_prepare_in_flight`).
    pub fn pause_prepare(&self, xid: &Xid) -> crate::testing::Pause {
        self.inner.shell.pauses.arm_prepare(xid)
    }

    /// For tests: the next replay fails before its transaction, as if the process died there
    /// (a replay is one sled transaction: nothing of it can be half applied).
    pub fn fail_next_replay(&self) {
        self.inner.shell.pauses.arm_replay_failure();
    }
}

impl KvBranch {
    /// The xid of the branch.
    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// Sets `key` to `value` when the branch commits. Waits for (at most `lock_wait_ms_max`) and
    /// locks the key. Refused when the key or value is over its limit, the batch would grow over
    /// `batch_bytes_max`, the branch is not active, or its epoch is fenced.
    pub async fn insert(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let inner = &self.inner;
        inner.check_key(key)?;
        if value.len() as u64 > inner.config.value_bytes_max {
            return Err(inner.rejected(format!(
                "the value for {} is {} bytes, over value_bytes_max = {} bytes",
                show_key(key),
                value.len(),
                inner.config.value_bytes_max
            )));
        }
        inner.write(&self.xid, key, Some(Arc::from(value))).await
    }

    /// Removes `key` when the branch commits (nothing happens then if it is absent). Waits for
    /// and locks the key like [`KvBranch::insert`].
    pub async fn remove(&self, key: &[u8]) -> Result<()> {
        self.inner.check_key(key)?;
        self.inner.write(&self.xid, key, None).await
    }

    /// The value of `key` as this branch sees it: its own pending insert or remove first, then
    /// the committed data tree.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let inner = &self.inner;
        inner.check_key(key)?;
        match inner.pending(&self.xid, key)? {
            Some(pending) => Ok(pending.map(|value| value.to_vec())),
            None => inner.committed(key).await,
        }
    }
}

#[async_trait::async_trait]
impl Resource for KvResource {
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
            crate::internal::io::dirs_writable(&inner.name, &[("store", &inner.dir)])?;
            inner.store.meta()?;
            inner.store.canary()
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

    /// Every key of the data tree in lower-case hex, with the blake3 hash of its value.
    async fn inventory(&self) -> Result<Vec<crate::InventoryEntry>> {
        self.inner.usable_state(|_| ())?;
        let inner = Arc::clone(&self.inner);
        let entries = blocking(&self.inner.name, TASK, move || inner.store.inventory()).await?;
        Ok(entries
            .into_iter()
            .map(|(key, digest)| crate::InventoryEntry {
                key: hex(&key),
                digest,
            })
            .collect())
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
}

/// `bytes` in lower-case hex: a key of the inventory (sled keys are bytes; hex keeps their order).
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl Branch {
    fn new() -> Branch {
        Branch {
            writes: BTreeMap::new(),
            batch_bytes: batch::HEADER_BYTES,
            prepared: None,
        }
    }

    /// The pending writes as a batch.
    fn encode(&self) -> Vec<u8> {
        let writes = self
            .writes
            .iter()
            .map(|(key, value)| (key.as_slice(), value.as_deref()));
        batch::encode(self.writes.len(), writes)
    }
}

impl Instance for Inner {
    type State = State;
    const KIND: &'static str = "kv";

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

// State transitions: each takes the state lock once and does no I/O.
impl Inner {
    fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.len() > KEY_BYTES_MAX {
            return Err(self.rejected(format!(
                "{} is {} bytes long, over KEY_BYTES_MAX = {KEY_BYTES_MAX} bytes",
                show_key(key),
                key.len()
            )));
        }
        Ok(())
    }

    /// One attempt to record a write of `key` by `xid`: locks the key, unless another branch
    /// holds it, and records the write, unless the batch would grow over its limits.
    fn try_write(&self, xid: &Xid, key: &[u8], value: &Pending) -> Result<Attempt> {
        let mut guard = self.state();
        self.usable(&guard)?;
        self.not_fenced(&guard, xid)?;
        let State {
            branches, locks, ..
        } = &mut *guard;
        let branch = branches.active(self, xid, "writes")?;
        if let Some(holder) = locks.get(key).filter(|holder| *holder != xid) {
            return Ok(Attempt::Held(*holder));
        }
        let before = branch.writes.get(key);
        let replaced = before.map_or(0, |v| batch::write_bytes(key, v.as_deref()));
        let bytes = branch.batch_bytes - replaced + batch::write_bytes(key, value.as_deref());
        if bytes > self.config.batch_bytes_max {
            return Err(self.rejected(format!(
                "with this write of {}, the batch of branch {xid} would be {bytes} bytes, over batch_bytes_max = {} bytes; split the transaction",
                show_key(key),
                self.config.batch_bytes_max
            )));
        }
        if before.is_none() && branch.writes.len() >= BATCH_WRITES_MAX {
            return Err(self.rejected(format!(
                "branch {xid} already writes BATCH_WRITES_MAX = {BATCH_WRITES_MAX} keys; {} refused",
                show_key(key)
            )));
        }
        locks.insert(key.to_vec(), *xid);
        branch.writes.insert(key.to_vec(), value.clone());
        branch.batch_bytes = bytes;
        Ok(Attempt::Recorded)
    }

    /// The branch's pending write of `key`: `None` when it has none (read the data tree).
    fn pending(&self, xid: &Xid, key: &[u8]) -> Result<Option<Pending>> {
        let st = self.state();
        self.usable(&st)?;
        let branch = st.branches.open(self, xid)?;
        Ok(branch.writes.get(key).cloned())
    }

    /// A commit of a branch this instance holds prepared must find its entry: one missing was
    /// removed by something other than concord.
    fn found_prepared(&self, xid: &Xid, found: bool) -> Result<()> {
        if found {
            return Ok(());
        }
        Err(self.fatal(format!(
            "the prepared tree of {} has no entry for the prepared branch {xid}: it was removed outside concord, and the branch's writes are lost",
            self.dir.display()
        )))
    }

    /// Forgets a branch and releases its locks, waking every waiter.
    fn release_locks(&self, st: &mut State, xid: &Xid) {
        if let Some(branch) = st.branches.remove(xid) {
            for key in branch.writes.keys() {
                if st.locks.get(key) == Some(xid) {
                    st.locks.remove(key);
                }
            }
        }
        self.released.notify_waiters();
    }
}

// Async steps that wait or read.
impl Inner {
    /// Records a write of `key`, waiting at most `lock_wait_ms_max` for another branch to
    /// release it.
    async fn write(&self, xid: &Xid, key: &[u8], value: Pending) -> Result<()> {
        let wait_ms_max = self.config.lock_wait_ms_max;
        let what = || show_key(key);
        wait_for_lock(&self.name, &self.released, wait_ms_max, what, || {
            Ok(match self.try_write(xid, key, &value)? {
                Attempt::Recorded => None,
                Attempt::Held(holder) => Some(holder),
            })
        })
        .await
    }

    /// The committed value of `key`, read on the blocking pool (sled may read a page from disk).
    async fn committed(self: &Arc<Self>, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.usable_state(|_| ())?;
        let (worker, key) = (self.clone(), key.to_vec());
        blocking(&self.name, TASK, move || worker.store.get(&key)).await
    }
}

/// The configuration's limits, checked against their ceilings.
fn check_config(name: &str, config: &KvConfig) -> Result<()> {
    if config.value_bytes_max > VALUE_BYTES_LIMIT {
        return Err(ResourceError::rejected(
            name,
            format!(
                "value_bytes_max = {} is over VALUE_BYTES_LIMIT = {VALUE_BYTES_LIMIT}",
                config.value_bytes_max
            ),
        ));
    }
    if config.batch_bytes_max > BATCH_BYTES_LIMIT {
        return Err(ResourceError::rejected(
            name,
            format!(
                "batch_bytes_max = {} is over BATCH_BYTES_LIMIT = {BATCH_BYTES_LIMIT}",
                config.batch_bytes_max
            ),
        ));
    }
    Ok(())
}

/// The prepared branches, from the prepared tree's entries, with their keys locked. Two entries
/// writing one key cannot both have been prepared here (the lock): that is damage.
fn load_prepared(
    name: &str,
    dir: &Path,
    entries: Vec<store::Entry>,
) -> Result<(Branches<Branch>, Locks)> {
    let mut branches = HashMap::new();
    let mut locks = Locks::new();
    for entry in entries {
        let mut branch = Branch::new();
        for write in entry.writes {
            let (key, value) = match write {
                KvWrite::Insert { key, value } => (key, Some(Arc::from(value))),
                KvWrite::Remove { key } => (key, None),
            };
            if let Some(other) = locks.insert(key.clone(), entry.xid) {
                return Err(ResourceError::Fatal {
                    resource: name.to_string(),
                    message: format!(
                        "the prepared branches {other} and {} of {} both write {}: the prepared tree was changed outside concord; repair it with sled, then restart",
                        entry.xid,
                        dir.display(),
                        show_key(&key)
                    ),
                });
            }
            branch.writes.insert(key, value);
        }
        branch.batch_bytes = entry.batch.len() as u64;
        branch.prepared = Some(Arc::new(entry.batch));
        branches.insert(entry.xid, branch);
    }
    Ok((Branches::recovered(branches), locks))
}

/// A key for a message: `key "…"`, escaped, the first `KEY_SHOWN_BYTES_MAX` bytes of a long one.
fn show_key(key: &[u8]) -> String {
    if key.len() <= KEY_SHOWN_BYTES_MAX {
        return format!("key \"{}\"", key.escape_ascii());
    }
    let head = &key[..KEY_SHOWN_BYTES_MAX];
    format!("key \"{}…\" ({} bytes)", head.escape_ascii(), key.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_shown_escaped_and_cut() {
        assert_eq!(show_key(b"a\"b\xff"), "key \"a\\\"b\\xff\"");
        let long = vec![b'k'; 100];
        let shown = show_key(&long);
        assert!(shown.ends_with("…\" (100 bytes)"), "{shown}");
    }

    #[test]
    fn limits_over_their_ceilings_are_refused() {
        let config = KvConfig {
            value_bytes_max: VALUE_BYTES_LIMIT + 1,
            ..KvConfig::default()
        };
        assert!(check_config("kv", &config).is_err());
        let config = KvConfig {
            batch_bytes_max: BATCH_BYTES_LIMIT + 1,
            ..KvConfig::default()
        };
        assert!(check_config("kv", &config).is_err());
        assert!(check_config("kv", &KvConfig::default()).is_ok());
    }
}
