//! The Resource contract: what every store concord coordinates must do, and the resources.
//!
//! A unit of work touches several resources; in each, the work is a **branch** of one global
//! transaction, named by its [`Xid`]. The coordinator drives every branch through two-phase
//! commit without knowing what kind of store it is: it holds `Arc<dyn Resource>` by name. What a
//! branch *does* (put a file, insert a row) is resource-specific and reached by the application
//! through the resource's own handle type (for files: [`files::FilesResource::branch`]); the
//! contract here is only the protocol:
//!
//! * [`Resource::begin`] registers a branch (and refuses an epoch below the fence);
//! * [`Resource::prepare`] makes the branch durable and undoable, holding its locks, and votes:
//!   [`Vote::Commit`] with the branch's **redo** — the bytes a standby replays to reproduce its
//!   effects — or [`Vote::ReadOnly`] when there is nothing to commit;
//! * [`Resource::commit`] / [`Resource::rollback`] resolve it. Both are idempotent: a second call
//!   for a resolved or unknown branch succeeds, so the coordinator may repeat them after any crash;
//! * [`Resource::recover`] lists the branches prepared and not yet resolved, after a restart;
//! * [`Resource::fence`] raises the resource's epoch: any later branch of a lower epoch is refused,
//!   and once it returns no operation of a lower epoch changes the resource (see below);
//! * [`Resource::replay`] applies a redo on a standby together with its LSN, atomically, and
//!   [`Resource::applied_lsn`] reports the last one, so replaying the same LSN twice is a no-op;
//!   [`Resource::replay_batch`] applies consecutive redos as one resource transaction, exactly
//!   once across a crash;
//! * [`Resource::inventory`] lists what the resource holds, key by key with a content hash
//!   ([`InventoryEntry`]), so that two sites can be compared;
//! * [`Resource::read_entry`], [`Resource::write_entry`] and [`Resource::remove_entry`] read,
//!   set and remove the content under one inventory key, streamed, and
//!   [`Resource::set_applied_lsn`] sets the applied LSN: together they **re-seed** a standby
//!   (see below).
//!
//! A resource may also offer **one-phase commit** for a transaction whose only branch it holds
//! ([`Resource::supports_one_phase`]): [`Resource::prepare_one_phase`] ends the branch's work —
//! the fence check, the redo — *without* making it durable, still holding its locks;
//! [`Resource::commit_one_phase`] commits it; and when that answer is lost,
//! [`Resource::one_phase_outcome`] finds out, from the redo the coordinator journaled, what
//! became of it once it can no longer change. Why this keeps the journal's order exact is in the
//! coordinator's engine docs and `docs/postgres.md`.
//!
//! **What a standby needs.** A redo may name content by hash instead of carrying it (the files
//! and mail resources put large content in a blob store). [`Resource::redo_blobs`] lists the
//! blobs a redo needs, so that replication ships them before the record;
//! [`Resource::open_blob`] reads one from this instance's store, and
//! [`Resource::put_blob`] puts one into another instance's store, streamed and checked against
//! its id. A resource whose redo carries everything (PostgreSQL's row images, kv batches) keeps
//! the defaults: no blobs, and a blob store that refuses.
//!
//! **Re-seeding.** A standby that fell behind the primary's retention bound is re-seeded: each
//! of its resources gets a copy of the primary's content, key by key through the inventory
//! keys (`read_entry` on the primary, `write_entry` here for every key whose digest differs,
//! `remove_entry` for every key the primary lacks, in any order), and its applied LSN is set to a
//! position P of the primary's journal; replay from P + 1 then makes the copy exact. The copy
//! may be fuzzy: every transaction decided before P had finished phase 2 before the copy
//! started, and every redo after P sets final values by key again, in order. The three changes
//! (`write_entry`, `remove_entry`, `set_applied_lsn`) are refused while the resource holds
//! prepared branches (a standby has none); `read_entry` is not, as it runs on the primary, which
//! has prepared branches whenever transactions are in flight, and reads committed content. The files,
//! mail, kv and PostgreSQL resources implement them; the defaults refuse ("this resource
//! cannot be re-seeded").
//!
//! **Fences and owners.** Commit and rollback carry no epoch, so the contract says who owns a
//! branch by how the caller reaches it. After [`Resource::fence`]`(E)` returns: a prepare that
//! had passed its fence check has either finished (it waited for it) or is refused; the
//! instance that was fenced refuses ([`ResourceError::Fenced`]) to commit or roll back a prepared
//! branch that was begun through it at an epoch below E — it stands for the coordinator at the
//! old epoch, e.g. an old primary resumed after a pause; and the branch's new owner resolves it,
//! through an instance opened after the fence (files, mail, kv: it recovers the branch from
//! disk) or — where the fence cannot hand a branch over (PostgreSQL) — the fence itself is
//! refused, retryable, until the older prepared branches are resolved. A coordinator that
//! restarts at an old epoch must learn the current epoch (the quorum store) before it recovers:
//! a resource cannot tell it apart from the new owner. The conformance suite checks both
//! halves (`testing::fence_stops_the_old_owner`, `testing::fence_covers_a_prepare_in_flight`).
//!
//! Errors are [`ResourceError`]s sorted by what the coordinator must do ([`ErrorClass`]).
//! [`testing`] holds the conformance suite every resource runs; [`pgtest`] starts the throwaway
//! PostgreSQL cluster that tests, the demo and the benchmark use.
//!
//! # Implementation caveats
//!
//! * The trait is async (through `async-trait`, so that it stays usable as `dyn Resource`);
//!   resources whose work is blocking file I/O run it on tokio's blocking pool.

pub mod config;
mod dirsync;
pub mod error;
pub mod files;
mod internal;
pub mod kv;
pub mod mail;
pub mod null;
pub mod pgtest;
pub mod postgres;
pub mod testing;
pub mod xid;

pub use error::{ErrorClass, ResourceError};
pub use journal::{BlobId, Epoch, Lsn};
pub use xid::Xid;

use std::any::Any;
use std::io::Read;

/// Most entries [`Resource::inventory`] returns; a resource holding more refuses.
pub const INVENTORY_ENTRIES_MAX: usize = 10_000_000;

/// One key of a resource's [`Resource::inventory`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InventoryEntry {
    /// The key: a file's relative path, a message's file name, a kv key in lower-case hex, or
    /// `<schema>.<table>/<primary key as canonical JSON>`.
    pub key: String,
    /// The blake3 hash of the content under the key.
    pub digest: [u8; 32],
}

/// Refuses a batch whose LSNs are not strictly increasing ([`Resource::replay_batch`]).
pub fn check_batch_lsns(resource: &str, batch: &[(Lsn, Vec<u8>)]) -> Result<(), ResourceError> {
    match batch.windows(2).find(|pair| pair[0].0 >= pair[1].0) {
        None => Ok(()),
        Some(pair) => Err(ResourceError::rejected(
            resource,
            format!(
                "a replay batch must have strictly increasing LSNs: lsn {} is followed by lsn {}; nothing was applied",
                pair[0].0, pair[1].0
            ),
        )),
    }
}

/// Refuses an inventory of more than [`INVENTORY_ENTRIES_MAX`] entries, once it reached `count`.
pub(crate) fn check_inventory_size(resource: &str, count: usize) -> Result<(), ResourceError> {
    if count > INVENTORY_ENTRIES_MAX {
        return Err(ResourceError::rejected(
            resource,
            format!(
                "the inventory is over INVENTORY_ENTRIES_MAX = {INVENTORY_ENTRIES_MAX} entries; compare this resource by other means (e.g. split it)"
            ),
        ));
    }
    Ok(())
}

/// The refusal of a re-seeding call by a resource that does not implement it.
fn cannot_reseed(resource: &str, key: &str) -> ResourceError {
    ResourceError::rejected(
        resource,
        format!("entry {key:?}: this resource cannot be re-seeded"),
    )
}

/// What a blob collection did ([`Resource::collect_blobs`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlobsCollected {
    /// Blobs removed.
    pub removed: u64,
    /// Blobs kept: named by a retained record, or still needed by a branch.
    pub kept: u64,
}

/// The coordinator's side of a blob collection: the blobs its retained journal records name.
/// [`Resource::collect_blobs`] calls it once, *after* it has taken its own snapshot (see
/// there for why that order matters).
#[async_trait::async_trait]
pub trait RetainedBlobs: Send + Sync {
    /// The ids of every blob that a retained coordinator journal record names, computed when
    /// called (a record the retention floor still holds counts as retained, so that a standby
    /// can still fetch its blobs).
    async fn retained_blobs(&self) -> Result<std::collections::HashSet<BlobId>, ResourceError>;
}

/// A blocking reader of a blob's content ([`Resource::open_blob`], [`Resource::put_blob`]):
/// read it on the blocking pool.
pub type BlobContent = Box<dyn Read + Send + 'static>;

/// A branch's vote at prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Prepared: the branch will commit when told to, and here is its redo.
    Commit {
        /// What a standby replays to reproduce the branch's effects (resource-specific bytes).
        redo: Vec<u8>,
    },
    /// The branch changed nothing; it is already finished and takes no part in phase 2.
    ReadOnly,
}

/// What became of a branch committed in one phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnePhaseOutcome {
    /// It committed.
    Committed,
    /// It did not commit (the resource refused at commit, or it was lost), and why.
    RolledBack {
        /// Why, naming the resource; its class says whether running the transaction again can
        /// succeed (a serialization failure is retryable, a constraint violation is not).
        error: ResourceError,
    },
}

/// The contract every resource implements; see the crate docs.
#[async_trait::async_trait]
pub trait Resource: Send + Sync + 'static {
    /// The resource's name in the configuration.
    fn name(&self) -> &str;

    /// The concrete resource, for the application's typed branch handles.
    fn as_any(&self) -> &dyn Any;

    /// Registers a branch of `xid`. Refused ([`ResourceError::Fenced`]) when `xid.epoch` is below
    /// the resource's fence epoch.
    async fn begin(&self, xid: &Xid) -> Result<(), ResourceError>;

    /// Makes the branch durable and undoable and votes. After `Ok(Vote::Commit)` the branch
    /// survives a crash of this process and is listed by [`Resource::recover`] until resolved.
    /// Preparing an already prepared branch returns the same vote.
    async fn prepare(&self, xid: &Xid) -> Result<Vote, ResourceError>;

    /// Commits a prepared branch. Idempotent: succeeds for a branch already committed.
    async fn commit(&self, xid: &Xid) -> Result<(), ResourceError>;

    /// Rolls a branch back, prepared or not. Idempotent: succeeds for an unknown branch.
    async fn rollback(&self, xid: &Xid) -> Result<(), ResourceError>;

    /// The xids of branches prepared and not yet resolved.
    async fn recover(&self) -> Result<Vec<Xid>, ResourceError>;

    /// Raises the fence epoch: from now on a branch of a lower epoch is refused. A lower `epoch`
    /// than the current fence leaves it unchanged. Once it returns, no operation of a lower
    /// epoch changes the resource (see "Fences and owners" in the crate docs).
    async fn fence(&self, epoch: Epoch) -> Result<(), ResourceError>;

    /// The fence epoch.
    async fn fence_epoch(&self) -> Result<Epoch, ResourceError>;

    /// Applies `redo` (as returned by prepare on the primary) together with `lsn`, atomically.
    /// A redo whose `lsn` is at or below [`Resource::applied_lsn`] changes nothing.
    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<(), ResourceError>;

    /// The LSN of the last redo applied by [`Resource::replay`] (`Lsn::ZERO` when none).
    async fn applied_lsn(&self) -> Result<Lsn, ResourceError>;

    /// Applies, in order, every redo of `batch` whose LSN is above [`Resource::applied_lsn`],
    /// and stores the batch's last LSN as the applied LSN, atomically with the data: after a
    /// crash at any moment either the applied LSN is below the batch (and replaying it again
    /// gives the same state as replaying it once) or it is the last LSN and every effect is
    /// there. LSNs must be strictly increasing (otherwise the batch is refused and nothing is
    /// applied); redos at or below the applied LSN change nothing. The default calls
    /// [`Resource::replay`] for each redo, which keeps each one atomic but not the batch:
    /// the applied LSN may stop inside it, which replaying the batch again also handles.
    async fn replay_batch(&self, batch: &[(Lsn, Vec<u8>)]) -> Result<(), ResourceError> {
        check_batch_lsns(self.name(), batch)?;
        for (lsn, redo) in batch {
            self.replay(redo, *lsn).await?;
        }
        Ok(())
    }

    /// What the resource holds, key by key, to compare two sites: entries sorted by key, each
    /// key once, each with the blake3 hash of its content (the keys of each resource are in
    /// its module docs). At most [`INVENTORY_ENTRIES_MAX`] entries; a resource holding more
    /// refuses. Content is read as it is now: to compare two sites as of one LSN, take it while
    /// neither changes (a standby between two replays). The default refuses: this resource keeps
    /// no inventory.
    async fn inventory(&self) -> Result<Vec<InventoryEntry>, ResourceError> {
        Err(ResourceError::rejected(
            self.name(),
            "this resource keeps no inventory",
        ))
    }

    /// The content under the inventory key `key` ([`Resource::inventory`]), streamed (read it
    /// on the blocking pool: the reader blocks), or `None` when the key is absent. Its blake3
    /// hash is the inventory's digest for the key (as the content is when read). A malformed
    /// key, or one leading out of the resource, is refused. Not refused while branches are
    /// prepared: a re-seed reads the primary, whose prepared branches have changed nothing it
    /// reads yet. The default refuses: this resource cannot be re-seeded.
    async fn read_entry(&self, key: &str) -> Result<Option<BlobContent>, ResourceError> {
        Err(cannot_reseed(self.name(), key))
    }

    /// Sets the inventory key `key` to `content` (streamed, through a bounded buffer; read on
    /// the blocking pool), durably when it returns, for a re-seed (see the crate docs): the
    /// resource's inventory then shows `key` with the blake3 hash of `content`. The change is
    /// not captured for replication (PostgreSQL: applied with `concord.replaying` on). A
    /// malformed key, or one leading out of the resource (files: `..`, absolute, through a
    /// symlink), is refused; so is the call while the resource holds prepared branches. The
    /// default refuses: this resource cannot be re-seeded.
    async fn write_entry(&self, key: &str, content: BlobContent) -> Result<(), ResourceError> {
        drop(content);
        Err(cannot_reseed(self.name(), key))
    }

    /// Removes the inventory key `key`, durably when it returns; an absent key is fine. Refused
    /// as [`Resource::write_entry`] is. The default refuses: this resource cannot be re-seeded.
    async fn remove_entry(&self, key: &str) -> Result<(), ResourceError> {
        Err(cannot_reseed(self.name(), key))
    }

    /// Stores `lsn` as the applied LSN ([`Resource::applied_lsn`]), durably — also when it is
    /// lower than the current one: a re-seed restarts replay after `lsn`. Refused while the
    /// resource holds prepared branches. The default refuses: this resource cannot be
    /// re-seeded.
    async fn set_applied_lsn(&self, lsn: Lsn) -> Result<(), ResourceError> {
        Err(ResourceError::rejected(
            self.name(),
            format!("applied lsn {lsn}: this resource cannot be re-seeded"),
        ))
    }

    /// The blobs `redo` (as returned by prepare) names by content hash, each once: a standby
    /// must hold them before it replays the redo, so replication ships them first
    /// ([`Resource::open_blob`] here, [`Resource::put_blob`] there). A malformed redo is
    /// refused. The default names none: the redo carries everything.
    fn redo_blobs(&self, redo: &[u8]) -> Result<Vec<BlobId>, ResourceError> {
        let _ = redo;
        Ok(Vec::new())
    }

    /// Opens blob `id` of this instance's store, to ship it. The reader blocks (read it on the
    /// blocking pool) and fails at its end when the content does not hash to `id`. A blob that
    /// is not stored is refused. The default refuses: no blob store.
    async fn open_blob(&self, id: &BlobId) -> Result<BlobContent, ResourceError> {
        Err(ResourceError::rejected(
            self.name(),
            format!("blob {id}: this resource keeps no blobs"),
        ))
    }

    /// Puts a shipped blob into this instance's store: streams `content` (on the blocking pool,
    /// through one bounded buffer) and checks it against `id`; content that hashes otherwise is
    /// refused ([`ResourceError::BlobMismatch`]) and nothing of it is kept. Durable when it
    /// returns; putting a blob already stored is harmless. The default refuses: no blob store.
    async fn put_blob(&self, id: &BlobId, content: BlobContent) -> Result<(), ResourceError> {
        drop(content);
        Err(ResourceError::rejected(
            self.name(),
            format!("blob {id}: this resource keeps no blobs"),
        ))
    }

    /// Removes every blob of this resource's store that no retained coordinator record names
    /// (`retained`) and that no branch of this resource still needs (active, prepared, or named
    /// by a record of its own branch log that recovery would read); a rolled-back branch's
    /// blobs go too. The resource first snapshots the blobs it holds and those its branches
    /// need, *then* asks `retained`, and deletes holding its adoption lock, leaving out every
    /// blob a prepare or a `put_blob` adopted since the snapshot; so neither a prepare adopting
    /// an existing blob nor a branch committed while the coordinator computes its set can lose
    /// a blob it needs (the analysis: `docs/journal-format.md`, "Collection"). The default has
    /// nothing to collect.
    async fn collect_blobs(
        &self,
        retained: &dyn RetainedBlobs,
    ) -> Result<BlobsCollected, ResourceError> {
        let _ = retained;
        Ok(BlobsCollected::default())
    }

    /// A cheap canary of whether the resource can do its work now, exercising the work path a
    /// commit takes: `Ok` when it answers, the reason otherwise. It changes no data and takes
    /// no branch lock; the caller bounds it with a deadline (a probe that does not answer in
    /// time counts as unhealthy). The files and mail resources check that their directories
    /// are still there and writable, then create a file in their private area's temp
    /// directory (`.concord/tmp/`, cleared at open), write 4 KiB, sync and remove it — new
    /// blocks, so a full file system fails it; kv reads its meta tree, writes a private key
    /// there, syncs the store (sled's flush and `fdatasync`) and removes the key; PostgreSQL
    /// reads the fence epoch on a pooled connection within `call_timeout_ms` (and so learns a
    /// raised fence). Each fails once the instance is poisoned. The default answers `Ok`.
    async fn health(&self) -> Result<(), ResourceError> {
        Ok(())
    }

    /// Whether a transaction whose only branch is here may commit it in one phase
    /// ([`Resource::prepare_one_phase`], then [`Resource::commit_one_phase`]).
    fn supports_one_phase(&self) -> bool {
        false
    }

    /// Ends the branch's work without making it durable: checks the fence, collects the redo,
    /// and keeps every lock the branch holds; `Vote::Commit` with its redo (empty when there is
    /// nothing a standby needs), and a crash from here until [`Resource::commit_one_phase`]
    /// answers loses the branch (it rolls back). `Vote::ReadOnly` means the branch is finished
    /// and nothing is to be journaled: it wrote nothing, or it had nothing a standby needs and
    /// the resource committed it already. An error of class [`ErrorClass::InDoubt`] means such
    /// a commit lost its answer.
    async fn prepare_one_phase(&self, xid: &Xid) -> Result<Vote, ResourceError> {
        Err(ResourceError::rejected(
            self.name(),
            format!("{xid}: this resource does not commit in one phase"),
        ))
    }

    /// Commits a branch readied by [`Resource::prepare_one_phase`]. `Ok(RolledBack)` when the
    /// resource refused the commit (nothing of the branch remains); an error when the outcome is
    /// unknown (ask [`Resource::one_phase_outcome`]).
    async fn commit_one_phase(&self, xid: &Xid) -> Result<OnePhaseOutcome, ResourceError> {
        Err(ResourceError::rejected(
            self.name(),
            format!("{xid}: this resource does not commit in one phase"),
        ))
    }

    /// What became of a one-phase commit whose answer was lost (the connection broke, or this
    /// process crashed), given the non-empty `redo` that [`Resource::prepare_one_phase`] returned
    /// and the coordinator journaled. Makes sure first that the branch can no longer commit
    /// (waiting a bounded time, ending it if need be); an error means "ask again later".
    async fn one_phase_outcome(
        &self,
        xid: &Xid,
        redo: &[u8],
    ) -> Result<OnePhaseOutcome, ResourceError> {
        let _ = redo;
        Err(ResourceError::rejected(
            self.name(),
            format!("{xid}: this resource does not commit in one phase"),
        ))
    }
}
