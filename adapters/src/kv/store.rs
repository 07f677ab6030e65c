//! The sled side of the kv resource: opening the directory, the three trees, one sled
//! transaction per protocol step, and the durable sync after it. Everything here blocks (sled
//! reads pages from disk and `sync` waits for the disk): it runs on tokio's blocking pool, or in
//! `open`, and never holds the resource's state lock.
//!
//! # What `sync` adds to sled's flush
//!
//! `sled::Db::flush` (0.34) writes the log with `pwrite` and then, on Linux, waits for it with
//! `sync_file_range`, which neither flushes the device's volatile write cache nor makes a grown
//! file's new size durable; and a message larger than a quarter of a segment (a big value, a
//! big batch) goes to a file of its own under `blobs/` that sled never syncs. So after the
//! flush, [`Store::sync`] calls `fdatasync` on the `db` file, `fsync` on every blob file it has
//! not synced before, and then on the `blobs/` directory when it found a new one. Only then is a
//! prepare, commit, rollback, fence or replay acknowledged.
//!
//! # Group sync
//!
//! One flush and `fdatasync` make durable everything sled had written before they started, so
//! concurrent branches share them ([`Store::sync`] is a sync coalescer, as the files resource's
//! `DirSync` is for directories): a caller that has just written takes a ticket; if no sync is
//! running it becomes the syncer, notes the last ticket handed out, syncs without the lock and
//! marks every ticket up to the noted one covered; otherwise it waits for the running sync and,
//! if that one started before its ticket, becomes the next syncer, whose one sync covers every
//! caller that queued meanwhile. A caller returns `Ok` only after a sync that started after its
//! ticket (so after its write) succeeded. A failed sync fails every caller it was meant to
//! cover and every later one: it is never retried as if it were fine. Waiting blocks the thread,
//! which is always one of tokio's blocking pool (or `open`'s).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::batch::{self, KvWrite};
use super::{DATA_TREE, KvConfig, META_TREE, PREPARED_TREE};
use crate::{Epoch, Lsn, ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// The meta tree's key of the fence epoch.
const FENCE_KEY: &[u8] = b"fence";
/// The meta tree's key of the applied LSN.
const APPLIED_KEY: &[u8] = b"applied_lsn";
/// The meta tree key the health canary writes and removes again.
const HEALTH_KEY: &[u8] = b"health_canary";
/// Version byte of a meta value (a version byte, then a u64 LE).
const META_VERSION: u8 = 1;
/// How often `open` tries the sled directory's lock again while it waits for it.
const OPEN_RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// An open sled directory and its trees.
pub(super) struct Store {
    name: String,
    dir: PathBuf,
    db: sled::Db,
    data: sled::Tree,
    prepared: sled::Tree,
    meta: sled::Tree,
    /// Our own handle on sled's `db` file, for `fdatasync`.
    db_file: File,
    /// Blob files already synced (sled never rewrites one: each is named by its LSN).
    synced_blobs: Mutex<HashSet<OsString>>,
    /// The group sync's tickets (see the module docs).
    syncs: Mutex<Syncs>,
    /// Notified when a sync ends.
    sync_done: Condvar,
}

/// The state of the group sync.
#[derive(Default)]
struct Syncs {
    /// The last ticket handed out.
    requested: u64,
    /// Every ticket up to this one is covered by a sync that succeeded.
    completed: u64,
    /// Whether a caller is running a sync now.
    running: bool,
    /// Real syncs run so far (for tests).
    done: u64,
    /// The first failed sync: every later call fails with it.
    failed: Option<String>,
}

/// Why a transaction gave up; it changed nothing.
enum Abort {
    /// The branch's epoch is below the stored fence.
    Fenced(Epoch),
    /// A stored value does not decode.
    Damaged(String),
}

/// How a prepare went.
pub(super) enum Prepared {
    Stored,
    /// Refused: the resource is fenced at this epoch.
    Fenced(Epoch),
}

/// A prepared tree entry, as read at open.
pub(super) struct Entry {
    pub(super) xid: Xid,
    pub(super) batch: Vec<u8>,
    pub(super) writes: Vec<KvWrite>,
}

impl Store {
    /// Opens (creating if allowed) the sled directory `dir` and its trees, and syncs what
    /// opening created.
    pub(super) fn open(name: &str, dir: &Path, config: &KvConfig) -> Result<Store> {
        let created = check_dir(name, dir, config)?;
        let db = open_db(name, dir, config)?;
        let tree = |tree: &str| {
            db.open_tree(tree)
                .map_err(|e| sled_error(name, &format!("open tree {tree} in"), dir, e))
        };
        let (data, prepared, meta) = (tree(DATA_TREE)?, tree(PREPARED_TREE)?, tree(META_TREE)?);
        let db_path = dir.join("db");
        let db_file =
            File::open(&db_path).map_err(|e| ResourceError::io(name, "open", &db_path, &e))?;
        let store = Store {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            db,
            data,
            prepared,
            meta,
            db_file,
            synced_blobs: Mutex::new(HashSet::new()),
            syncs: Mutex::new(Syncs::default()),
            sync_done: Condvar::new(),
        };
        // The directory's entries (conf, db, blobs/, snapshots) and, when it was just made, the
        // directory itself in its parent.
        store.sync()?;
        sync_dir(name, dir)?;
        if created && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(name, parent)?;
        }
        Ok(store)
    }

    /// The fence epoch and the applied LSN.
    pub(super) fn meta(&self) -> Result<(Epoch, Lsn)> {
        let read = |key: &[u8]| {
            let value = self.meta.get(key).map_err(|e| self.error("read", e))?;
            decode_meta(key, value.as_deref()).map_err(|e| self.fatal(e))
        };
        Ok((Epoch(read(FENCE_KEY)?), Lsn(read(APPLIED_KEY)?)))
    }

    /// Every entry of the prepared tree, checked: the key an xid, the value a batch.
    pub(super) fn prepared_entries(&self) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for item in self.prepared.iter() {
            let (key, value) = item.map_err(|e| self.error("read the prepared tree of", e))?;
            let shown = key.escape_ascii().to_string();
            let xid = std::str::from_utf8(&key)
                .ok()
                .and_then(|text| text.parse::<Xid>().ok())
                .ok_or_else(|| {
                    self.damaged(format!(
                        "the prepared tree has a key {shown:?} that is not an xid"
                    ))
                })?;
            let writes = batch::decode_batch(&value).map_err(|e| {
                self.damaged(format!(
                    "the prepared tree's entry of {xid} does not decode: {e}"
                ))
            })?;
            entries.push(Entry {
                xid,
                batch: value.to_vec(),
                writes,
            });
        }
        Ok(entries)
    }

    /// The committed value of `key`.
    pub(super) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let value = self.data.get(key).map_err(|e| self.error("read", e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Stores `batch` as the prepared entry of `xid` — unless the stored fence is above its
    /// epoch, checked in the same transaction so that a fence cannot slip in between — and syncs.
    pub(super) fn prepare(&self, xid: &Xid, batch: &[u8]) -> Result<Prepared> {
        let key = xid.text();
        let stored = (&self.prepared, &self.meta).transaction(|(prepared, meta)| {
            let fence = meta.get(FENCE_KEY)?;
            let fence = decode_meta(FENCE_KEY, fence.as_deref()).map_err(abort_damaged)?;
            if xid.epoch.0 < fence {
                return Err(ConflictableTransactionError::Abort(Abort::Fenced(Epoch(
                    fence,
                ))));
            }
            prepared.insert(key.as_bytes(), batch)?;
            Ok(())
        });
        match stored {
            Ok(()) => {}
            Err(TransactionError::Abort(Abort::Fenced(fence))) => {
                return Ok(Prepared::Fenced(fence));
            }
            Err(e) => return Err(self.transaction_error("store the prepared batch in", e)),
        }
        self.sync()?;
        Ok(Prepared::Stored)
    }

    /// Applies the prepared batch of `xid` to the data tree and removes it from the prepared
    /// tree, in one transaction, and syncs. `false` when there is no entry (nothing changed).
    pub(super) fn commit(&self, xid: &Xid) -> Result<bool> {
        let key = xid.text();
        let committed = (&self.data, &self.prepared).transaction(|(data, prepared)| {
            let Some(entry) = prepared.get(key.as_bytes())? else {
                return Ok(false);
            };
            let writes = batch::decode_batch(&entry).map_err(|e| {
                abort_damaged(format!(
                    "the prepared tree's entry of {xid} does not decode: {e}"
                ))
            })?;
            for write in writes {
                match write {
                    KvWrite::Insert { key, value } => data.insert(key, value)?,
                    KvWrite::Remove { key } => data.remove(key)?,
                };
            }
            prepared.remove(key.as_bytes())?;
            Ok(true)
        });
        let committed =
            committed.map_err(|e| self.transaction_error("apply the prepared batch in", e))?;
        self.sync()?;
        Ok(committed)
    }

    /// Removes the prepared entry of `xid` (if any) and syncs.
    pub(super) fn rollback(&self, xid: &Xid) -> Result<()> {
        self.prepared
            .remove(xid.text().as_bytes())
            .map_err(|e| self.error("remove the prepared batch from", e))?;
        self.sync()
    }

    /// Raises the stored fence to `epoch` (a lower one leaves it) and syncs; returns the fence.
    pub(super) fn fence(&self, epoch: Epoch) -> Result<Epoch> {
        let fence = self.meta.transaction(|meta| {
            let current = meta.get(FENCE_KEY)?;
            let current = decode_meta(FENCE_KEY, current.as_deref()).map_err(abort_damaged)?;
            if epoch.0 <= current {
                return Ok(Epoch(current));
            }
            meta.insert(FENCE_KEY, &encode_meta(epoch.0)[..])?;
            Ok(epoch)
        });
        let fence = fence.map_err(|e| self.transaction_error("store the fence epoch in", e))?;
        self.sync()?;
        Ok(fence)
    }

    /// Applies the writes of every redo of `batch` above the stored applied LSN, in order, and
    /// stores the batch's last LSN as the applied LSN, in one transaction; syncs once. `false`
    /// when it changed nothing (the whole batch was at or below the applied LSN).
    pub(super) fn replay(&self, batch: &[(Lsn, Vec<KvWrite>)]) -> Result<bool> {
        let Some(&(last, _)) = batch.last() else {
            return Ok(false);
        };
        let applied = (&self.data, &self.meta).transaction(|(data, meta)| {
            let applied = meta.get(APPLIED_KEY)?;
            let applied = decode_meta(APPLIED_KEY, applied.as_deref()).map_err(abort_damaged)?;
            if last.0 <= applied {
                return Ok(false);
            }
            for (_, writes) in batch.iter().filter(|(lsn, _)| lsn.0 > applied) {
                for write in writes {
                    match write {
                        KvWrite::Insert { key, value } => {
                            data.insert(key.as_slice(), value.as_slice())?
                        }
                        KvWrite::Remove { key } => data.remove(key.as_slice())?,
                    };
                }
            }
            meta.insert(APPLIED_KEY, &encode_meta(last.0)[..])?;
            Ok(true)
        });
        let applied = applied.map_err(|e| self.transaction_error("replay a batch into", e))?;
        self.sync()?;
        Ok(applied)
    }

    /// Sets `key` of the data tree to `value` (`None`: removes it) for a re-seed, and syncs.
    pub(super) fn set_entry(&self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        match value {
            Some(value) => self.data.insert(key, value).map(drop),
            None => self.data.remove(key).map(drop),
        }
        .map_err(|e| self.error("re-seed an entry of", e))?;
        self.sync()
    }

    /// Stores `lsn` as the applied LSN (also below the current one: a re-seed), and syncs.
    pub(super) fn set_applied(&self, lsn: Lsn) -> Result<()> {
        self.meta
            .insert(APPLIED_KEY, &encode_meta(lsn.0)[..])
            .map_err(|e| self.error("store the applied lsn in", e))?;
        self.sync()
    }

    /// The health canary: writes [`HEALTH_KEY`] of the meta tree (never read by anything
    /// else, and not in the inventory, which lists the data tree), syncs, and removes it (the
    /// removal becomes durable with the next sync). A failed sync is fatal, as every sync.
    pub(super) fn canary(&self) -> Result<()> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.meta
            .insert(HEALTH_KEY, &stamp.to_le_bytes()[..])
            .map_err(|e| self.error("write the health canary in", e))?;
        self.sync()?;
        self.meta
            .remove(HEALTH_KEY)
            .map_err(|e| self.error("remove the health canary from", e))?;
        Ok(())
    }

    /// Every key of the data tree with the blake3 hash of its value, in key order (sled's
    /// iterator reads one page at a time); refused beyond `INVENTORY_ENTRIES_MAX`.
    pub(super) fn inventory(&self) -> Result<Vec<(Vec<u8>, [u8; 32])>> {
        let mut out = Vec::new();
        for item in self.data.iter() {
            let (key, value) = item.map_err(|e| self.error("read the data tree of", e))?;
            out.push((key.to_vec(), *blake3::hash(&value).as_bytes()));
            crate::check_inventory_size(&self.name, out.len())?;
        }
        Ok(out)
    }

    /// Makes everything written so far durable, sharing the sync with concurrent callers (see
    /// "Group sync" in the module docs); a failure is fatal. Blocks.
    pub(super) fn sync(&self) -> Result<()> {
        let mut syncs = self.syncs();
        syncs.requested += 1;
        let ticket = syncs.requested;
        loop {
            if let Some(cause) = &syncs.failed {
                return Err(self.fatal(format!("sync refused: an earlier sync failed ({cause})")));
            }
            if syncs.completed >= ticket {
                return Ok(());
            }
            if syncs.running {
                syncs = self
                    .sync_done
                    .wait(syncs)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            syncs.running = true;
            let target = syncs.requested;
            drop(syncs);
            let outcome = self.sync_now();
            syncs = self.syncs();
            syncs.running = false;
            syncs.done += 1;
            self.sync_done.notify_all();
            match outcome {
                Ok(()) => syncs.completed = syncs.completed.max(target),
                Err(e) => {
                    syncs.failed.get_or_insert_with(|| e.to_string());
                    return Err(e);
                }
            }
        }
    }

    fn syncs(&self) -> std::sync::MutexGuard<'_, Syncs> {
        self.syncs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One real sync: sled's flush, `fdatasync` of `db`, the new blob files.
    fn sync_now(&self) -> Result<()> {
        self.db
            .flush()
            .map_err(|e| self.fatal(format!("flush {}: {e}", self.dir.display())))?;
        self.db_file
            .sync_data()
            .map_err(|e| self.fatal(format!("fdatasync {}: {e}", self.dir.join("db").display())))?;
        self.sync_blobs()
    }

    /// Syncs the blob files sled wrote since the last sync, then their directory.
    fn sync_blobs(&self) -> Result<()> {
        let blobs = self.dir.join("blobs");
        let listed = fs::read_dir(&blobs)
            .map_err(|e| self.fatal(format!("list {}: {e}", blobs.display())))?;
        let mut present = HashSet::new();
        let mut fresh = Vec::new();
        {
            let synced = self.synced();
            for entry in listed {
                let entry =
                    entry.map_err(|e| self.fatal(format!("list {}: {e}", blobs.display())))?;
                let file = entry.file_name();
                if !synced.contains(&file) {
                    fresh.push(file.clone());
                }
                present.insert(file);
            }
        }
        for file in &fresh {
            let path = blobs.join(file);
            match File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Collected by sled in between: no longer needed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.fatal(format!("fsync {}: {e}", path.display()))),
            }
        }
        if !fresh.is_empty() {
            sync_dir(&self.name, &blobs)?;
        }
        let mut synced = self.synced();
        synced.retain(|f| present.contains(f));
        synced.extend(fresh);
        Ok(())
    }

    fn synced(&self) -> std::sync::MutexGuard<'_, HashSet<OsString>> {
        self.synced_blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn fatal(&self, message: String) -> ResourceError {
        ResourceError::Fatal {
            resource: self.name.clone(),
            message,
        }
    }

    fn damaged(&self, what: String) -> ResourceError {
        self.fatal(format!(
            "{what}: the sled directory {} was changed outside concord; repair or remove the entry with sled, then restart",
            self.dir.display()
        ))
    }

    fn error(&self, action: &str, e: sled::Error) -> ResourceError {
        sled_error(&self.name, action, &self.dir, e)
    }

    fn transaction_error(&self, action: &str, e: TransactionError<Abort>) -> ResourceError {
        match e {
            TransactionError::Abort(Abort::Damaged(what)) => self.damaged(what),
            TransactionError::Abort(Abort::Fenced(fence)) => self.fatal(format!(
                "{action} {}: unexpectedly fenced at {fence}",
                self.dir.display()
            )),
            // A write that failed half-way through sled's log is not retried as if fine.
            TransactionError::Storage(e) => {
                self.fatal(format!("{action} {}: {e}", self.dir.display()))
            }
        }
    }
}

fn abort_damaged(what: String) -> ConflictableTransactionError<Abort> {
    ConflictableTransactionError::Abort(Abort::Damaged(what))
}

/// A meta value: a version byte and a u64 LE.
fn encode_meta(value: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = META_VERSION;
    out[1..].copy_from_slice(&value.to_le_bytes());
    out
}

/// A meta value (0 when absent); a damaged one is described in the error.
fn decode_meta(key: &[u8], value: Option<&[u8]>) -> Result<u64, String> {
    let Some(value) = value else {
        return Ok(0);
    };
    let shown = key.escape_ascii();
    match value {
        [META_VERSION, rest @ ..] if rest.len() == 8 => {
            let mut le = [0u8; 8];
            le.copy_from_slice(rest);
            Ok(u64::from_le_bytes(le))
        }
        [version, ..] if *version != META_VERSION => Err(format!(
            "the meta tree's {shown} has version {version}; this program reads version {META_VERSION}"
        )),
        _ => Err(format!(
            "the meta tree's {shown} is {} bytes, not 9",
            value.len()
        )),
    }
}

/// Checks that `dir` is a directory or may be created; `true` when it does not exist yet.
fn check_dir(name: &str, dir: &Path, config: &KvConfig) -> Result<bool> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(false),
        Ok(_) => Err(ResourceError::rejected(
            name,
            format!("{} is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound && config.create_if_missing => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ResourceError::rejected(
            name,
            format!(
                "sled directory {} does not exist; create it, or set create_if_missing (create = true in concord.toml)",
                dir.display()
            ),
        )),
        Err(e) => Err(ResourceError::io(name, "inspect", dir, &e)),
    }
}

fn sync_dir(name: &str, dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ResourceError::Fatal {
            resource: name.to_string(),
            message: format!("fsync directory {}: {e}", dir.display()),
        })
}

/// Opens the sled database, waiting up to `open_wait_ms_max` for its lock: an instance this
/// process dropped a moment ago may still hold it (sled's background tasks finish writing after
/// the last handle is gone). A lock held longer is another process's.
fn open_db(name: &str, dir: &Path, config: &KvConfig) -> Result<sled::Db> {
    let wait = Duration::from_millis(config.open_wait_ms_max);
    let start = Instant::now();
    loop {
        remove_half_written_snapshots(name, dir)?;
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(config.cache_bytes)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if start.elapsed() >= wait {
                    return Err(ResourceError::rejected(
                        name,
                        format!(
                            "sled directory {} is locked: another process has it open ({io}; waited {} ms); stop that process first",
                            dir.display(),
                            start.elapsed().as_millis()
                        ),
                    ));
                }
                std::thread::sleep(OPEN_RETRY_INTERVAL);
            }
            Err(e) => return Err(sled_error(name, "open sled directory", dir, e)),
        }
    }
}

/// The suffix of a snapshot sled 0.34 is still writing.
const SNAPSHOT_GENERATING_SUFFIX: &str = ".generating";

/// Removes the snapshots a start of sled left half-written, which sled would otherwise read as
/// corruption at every later open ("Read corrupted data"), so that a store whose disk filled
/// up during a start opens again once there is room.
///
/// What sled 0.34.7 does (its `pagecache/snapshot.rs` and `config.rs`):
///
/// * It writes a snapshot only at start: `PageCache::start` → `read_snapshot_or_default` →
///   `advance_snapshot`, which reads the last snapshot, scans the log from that snapshot's
///   stable LSN, and, when the log went further, calls `write_snapshot` (its only caller). That
///   writes `snap.<lsn>.generating`, syncs it, renames it to `snap.<lsn>`, and only then removes
///   the older `snap.*` files. A failure (a full disk) returns the error from the start, and the
///   database never serves.
/// * `read_snapshot` takes the last name, sorted, of every `snap.*` file except `*.in___motion`
///   (`RunningConfig::get_snapshot_files`) — a `.generating` one included, which sorts after the
///   complete snapshot of its own and every lower LSN — and calls one of 12 bytes or fewer, or
///   with a wrong crc, corruption.
///
/// A `.generating` file is therefore never needed: the start that wrote it ended before its
/// rename, so the previous complete snapshot is still there (or there never was one, and sled
/// scans its whole log), and everything the half-written one summed up is still in the log,
/// which nothing wrote to since (the database never served after that start). Removing it
/// gives sled back the state it opened from before. The removal happens only while this
/// holds the exclusive `flock` sled itself takes on `db` (`Config::open_file`, fs2's
/// `try_lock_exclusive`), so never under a sled starting in another process; when sled's lock
/// is held, nothing is removed (and sled's own open reports the directory locked).
fn remove_half_written_snapshots(name: &str, dir: &Path) -> Result<()> {
    let db_path = dir.join("db");
    let db = match File::open(&db_path) {
        Ok(db) => db,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ResourceError::io(name, "open", &db_path, &e)),
    };
    match db.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Ok(()),
        Err(fs::TryLockError::Error(e)) => {
            return Err(ResourceError::io(name, "lock", &db_path, &e));
        }
    }
    let entries = fs::read_dir(dir).map_err(|e| ResourceError::io(name, "list", dir, &e))?;
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ResourceError::io(name, "list", dir, &e))?;
        let file_name = entry.file_name();
        let text = file_name.to_string_lossy();
        if text.starts_with("snap.") && text.ends_with(SNAPSHOT_GENERATING_SUFFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| ResourceError::io(name, "remove", &path, &e))?;
            removed.push(text.into_owned());
        }
    }
    if !removed.is_empty() {
        sync_dir(name, dir)?;
        tracing::warn!(resource = name, dir = %dir.display(), ?removed, "removed snapshots an earlier start of sled left half-written (a full disk or a crash during that start)");
    }
    Ok(())
}

/// The xids in the prepared tree of the sled directory `dir`, which is opened for this read
/// only: `None` when another instance holds sled's lock (a running application), an empty list
/// when there is no sled database in `dir`.
pub(super) fn prepared_on_disk(name: &str, dir: &Path) -> Result<Option<Vec<Xid>>> {
    if !dir.join("db").is_file() {
        return Ok(Some(Vec::new()));
    }
    remove_half_written_snapshots(name, dir)?;
    let db = match sled::Config::new().path(dir).open() {
        Ok(db) => db,
        Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
            return Ok(None);
        }
        Err(e) => return Err(sled_error(name, "open sled directory", dir, e)),
    };
    let has_tree = db
        .tree_names()
        .iter()
        .any(|tree| tree.as_ref() == PREPARED_TREE.as_bytes());
    if !has_tree {
        return Ok(Some(Vec::new()));
    }
    let tree = db
        .open_tree(PREPARED_TREE)
        .map_err(|e| sled_error(name, "open the prepared tree of", dir, e))?;
    let mut xids = Vec::new();
    for key in tree.iter().keys() {
        let key = key.map_err(|e| sled_error(name, "read the prepared tree of", dir, e))?;
        let xid = std::str::from_utf8(&key)
            .ok()
            .and_then(|text| text.parse::<Xid>().ok())
            .ok_or_else(|| ResourceError::Fatal {
                resource: name.to_string(),
                message: format!(
                    "the prepared tree of {} has a key {:?} that is not an xid",
                    dir.display(),
                    key.escape_ascii().to_string()
                ),
            })?;
        xids.push(xid);
    }
    xids.sort();
    Ok(Some(xids))
}

/// A sled error as a resource error: I/O as [`ResourceError::io`] classifies it, an unsupported
/// configuration is refused, damage and sled's own bugs are fatal.
fn sled_error(name: &str, action: &str, dir: &Path, e: sled::Error) -> ResourceError {
    match e {
        sled::Error::Io(io) => ResourceError::io(name, action, dir, &io),
        sled::Error::Unsupported(what) => ResourceError::rejected(
            name,
            format!("{action} {}: sled refuses: {what}", dir.display()),
        ),
        other => ResourceError::Fatal {
            resource: name.to_string(),
            message: format!("{action} {}: {other}", dir.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_values_round_trip_and_refuse_damage() {
        assert_eq!(decode_meta(b"k", None).unwrap(), 0);
        assert_eq!(decode_meta(b"k", Some(&encode_meta(42))).unwrap(), 42);
        assert!(
            decode_meta(b"k", Some(&[]))
                .unwrap_err()
                .contains("0 bytes")
        );
        assert!(
            decode_meta(b"k", Some(&[1, 2]))
                .unwrap_err()
                .contains("2 bytes")
        );
        let mut newer = encode_meta(1);
        newer[0] = 2;
        assert!(
            decode_meta(b"k", Some(&newer))
                .unwrap_err()
                .contains("version 2")
        );
    }

    /// Callers that queue behind a running sync share the next one: eight callers waiting while
    /// a sync runs are all covered by one more.
    #[test]
    fn callers_behind_a_running_sync_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = KvConfig {
            create_if_missing: true,
            ..KvConfig::default()
        };
        let store =
            std::sync::Arc::new(Store::open("kv", &dir.path().join("sled"), &config).unwrap());
        let (before, queued) = {
            let mut syncs = store.syncs();
            syncs.running = true; // as if a sync were running
            // Opening synced once already: tickets start after its own.
            (syncs.done, syncs.requested + 8)
        };
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || store.sync())
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.syncs().requested < queued {
            assert!(Instant::now() < deadline, "the callers did not queue");
            std::thread::sleep(Duration::from_millis(5));
        }
        {
            let mut syncs = store.syncs();
            syncs.running = false;
            store.sync_done.notify_all();
        }
        for caller in callers {
            caller.join().unwrap().unwrap();
        }
        assert_eq!(store.syncs().done - before, 1, "one sync covers all eight");
        store.sync().unwrap();
        assert_eq!(store.syncs().done - before, 2, "a later caller syncs again");
    }

    /// The health canary goes through sled and a real sync, and leaves no key behind.
    #[test]
    fn the_health_canary_writes_syncs_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = KvConfig {
            create_if_missing: true,
            ..KvConfig::default()
        };
        let store = Store::open("kv", &dir.path().join("sled"), &config).unwrap();
        let before = store.syncs().done;
        store.canary().unwrap();
        assert_eq!(store.syncs().done - before, 1, "one sync");
        assert_eq!(store.meta.get(HEALTH_KEY).unwrap(), None);
        assert!(store.inventory().unwrap().is_empty());
    }
}
