//! The blob store: large payloads, content-addressed by blake3, written in bounded chunks.
//!
//! A journal record must stay small (`record_bytes_max`), but a transaction may carry a file of
//! gigabytes. Such a payload goes to the blob store first; the record names it by its id, the
//! blake3 hash of its content. The store is a directory:
//!
//! ```text
//! blobs/tmp/                 blobs being written (removed when the store opens)
//! blobs/ab/abcdef…(64 hex)   a stored blob, fanned out by its first two hex digits
//! ```
//!
//! Writing ([`BlobStore::put`]) streams from any reader through one buffer of `chunk_bytes`,
//! hashing as it goes, so memory stays bounded whatever the size. The durable-write discipline:
//!
//! 1. Write the content to a new file under `tmp/`, hashing it.
//! 2. Sync the file (content and size).
//! 3. Create the fan-out directory if needed.
//! 4. Rename the file to its id (over a stored copy of the same content, if any).
//! 5. Sync the fan-out directory, then the store directory (whose entry for the fan-out directory
//!    a concurrent put may have just created) — the latter only until this process has once
//!    synced it after the fan-out directory existed (fan-out directories are never removed).
//!    Only now is the id returned, and only now may a record name it.
//!
//! A crash before step 5 leaves at most a temp file (removed at the next open) or a stored blob
//! no record names yet (harmless; garbage collection is the owner's concern). Reading
//! ([`BlobStore::open_blob`]) hashes the content as it streams and fails at the end when the hash
//! is not the id, so damage is never handed on silently.
//!
//! # Implementation caveats
//!
//! * Deleting blobs no retained record names is left to the layer that knows the records
//!   ([`BlobStore::remove`], [`BlobStore::list`]).
//! * A standby stores a blob shipped from its primary with [`BlobStore::put_verified`], which
//!   refuses content that does not hash to the id it was sent under. An interrupted transfer is
//!   not resumed: it restarts from the beginning (its temp file is removed).
//! * Hashing is single-threaded (about 1 GB/s here), which is below disk write speed on most disks
//!   but not on all.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{JournalError, Result};
use crate::segment::sync_dir;
use crate::types::hex;

/// The id of a blob: the blake3 hash of its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The id of `content`.
    pub fn of(content: &[u8]) -> BlobId {
        BlobId(*blake3::hash(content).as_bytes())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl FromStr for BlobId {
    type Err = JournalError;

    fn from_str(s: &str) -> Result<BlobId> {
        let bad = || JournalError::BadBlobId(s.to_string());
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut id = [0u8; 32];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(BlobId(id))
    }
}

/// Limits of a blob store.
#[derive(Clone, Debug)]
pub struct BlobConfig {
    /// Largest blob accepted; a longer stream is refused and nothing is stored.
    pub blob_bytes_max: u64,
    /// Size of the one buffer a write or verification streams through.
    pub chunk_bytes: usize,
    /// Create the directory when it does not exist.
    pub create_if_missing: bool,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            blob_bytes_max: 1 << 40,
            chunk_bytes: 1 << 20,
            create_if_missing: false,
        }
    }
}

/// A content-addressed blob store; see the module docs.
pub struct BlobStore {
    dir: PathBuf,
    config: BlobConfig,
    next_tmp: AtomicU64,
    /// Fan-out directories whose entry in the store directory this process has synced: their
    /// entry is durable, so adding a blob to them needs only a sync of the fan-out directory.
    durable_fans: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

/// A stored blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    /// Its id.
    pub id: BlobId,
    /// Its size in bytes.
    pub bytes: u64,
}

const TMP_DIR: &str = "tmp";

impl BlobStore {
    /// Opens the store in `dir`, removing temp files of interrupted writes.
    pub fn open(dir: impl AsRef<Path>, config: BlobConfig) -> Result<BlobStore> {
        let dir = dir.as_ref().to_path_buf();
        if config.chunk_bytes == 0 {
            return Err(JournalError::InvalidConfig(
                "chunk_bytes must be positive".into(),
            ));
        }
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(JournalError::NotADirectory { path: dir }),
            Err(e) if e.kind() == io::ErrorKind::NotFound && config.create_if_missing => {
                fs::create_dir_all(&dir)
                    .map_err(|e| JournalError::io("create blob directory", &dir, e))?;
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(JournalError::DirMissing { path: dir });
            }
            Err(e) => return Err(JournalError::io("inspect blob directory", &dir, e)),
        }
        let tmp = dir.join(TMP_DIR);
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .map_err(|e| JournalError::io("clear blob temp directory", &tmp, e))?;
        }
        fs::create_dir(&tmp)
            .map_err(|e| JournalError::io("create blob temp directory", &tmp, e))?;
        sync_dir(&dir)?;
        Ok(BlobStore {
            dir,
            config,
            next_tmp: AtomicU64::new(0),
            durable_fans: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// The path a blob is stored at.
    pub fn path_of(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_string();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Streams `content` into the store; returns its id once it is durable (see the module docs).
    pub fn put(&self, mut content: impl Read) -> Result<StoredBlob> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(TMP_DIR)
            .join(format!("{}-{n}.tmp", std::process::id()));
        let written = self.write_tmp(&mut content, &tmp);
        let (id, bytes) = match written {
            Ok(ok) => ok,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.install(&tmp, &id)?;
        Ok(StoredBlob { id, bytes })
    }

    /// Streams content received from elsewhere (a primary's store, for this standby) that must be
    /// the blob `expected`, and stores it once it is durable — only if it hashes to `expected`.
    /// Otherwise [`JournalError::BlobMismatch`] and nothing is left behind (the temp file is
    /// removed; a blob already stored under `expected` is untouched).
    ///
    /// Memory stays at one `chunk_bytes` buffer. A transfer interrupted halfway (an error from
    /// `content`, or the process dying) is not resumable: its temp file is removed at once or at
    /// the next open, and the transfer starts again from the beginning.
    pub fn put_verified(&self, expected: &BlobId, mut content: impl Read) -> Result<StoredBlob> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(TMP_DIR)
            .join(format!("{}-{n}.tmp", std::process::id()));
        let written =
            self.write_tmp(&mut content, &tmp)
                .and_then(|(id, bytes)| match id == *expected {
                    true => Ok((id, bytes)),
                    false => Err(JournalError::BlobMismatch {
                        expected: expected.to_string(),
                        actual: id.to_string(),
                    }),
                });
        let (id, bytes) = match written {
            Ok(ok) => ok,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.install(&tmp, &id)?;
        Ok(StoredBlob { id, bytes })
    }

    fn write_tmp(&self, content: &mut impl Read, tmp: &Path) -> Result<(BlobId, u64)> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| JournalError::io("create blob temp file", tmp, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; self.config.chunk_bytes];
        let mut bytes = 0u64;
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(JournalError::io("read blob content from", tmp, e)),
            };
            bytes += n as u64;
            if bytes > self.config.blob_bytes_max {
                return Err(JournalError::BlobTooLarge {
                    max: self.config.blob_bytes_max,
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(|e| JournalError::io("write blob", tmp, e))?;
        }
        file.sync_all()
            .map_err(|e| JournalError::io("sync blob", tmp, e))?;
        Ok((BlobId(*hasher.finalize().as_bytes()), bytes))
    }

    fn install(&self, tmp: &Path, id: &BlobId) -> Result<()> {
        let path = self.path_of(id);
        let fan = path.parent().unwrap_or(&self.dir).to_path_buf();
        match fs::create_dir(&fan) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(JournalError::io("create blob directory", &fan, e)),
        }
        // Renaming over a stored copy is safe (same id, same content) and replaces a copy that
        // may have been damaged since.
        fs::rename(tmp, &path).map_err(|e| JournalError::io("rename blob into place", &path, e))?;
        sync_dir(&fan)?;
        self.sync_fan_entry(&fan)
    }

    /// Makes the fan-out directory's own entry durable, unless this process already did. It may
    /// have just been created, by this call or a concurrent one that has not synced it yet; once
    /// a sync of the store directory that started after it existed has succeeded, its entry is
    /// durable for good (fan-out directories are never removed).
    fn sync_fan_entry(&self, fan: &Path) -> Result<()> {
        let known = self
            .durable_fans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(fan);
        if known {
            return Ok(());
        }
        sync_dir(&self.dir)?;
        self.durable_fans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(fan.to_path_buf());
        Ok(())
    }

    /// Stores the file at `path`, whose content hashes to `id` (the caller hashed it while writing
    /// it and has synced it), by hard-linking it into the store: no copy. The file must be on the
    /// same file system as the store and must not change afterwards. Durable (directory syncs)
    /// when this returns. A blob already stored under `id` is kept.
    pub fn adopt(&self, path: &Path, id: &BlobId) -> Result<()> {
        let target = self.path_of(id);
        let fan = target.parent().unwrap_or(&self.dir).to_path_buf();
        match fs::create_dir(&fan) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(JournalError::io("create blob directory", &fan, e)),
        }
        match fs::hard_link(path, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(JournalError::io("link file into blob store", &target, e)),
        }
        sync_dir(&fan)?;
        self.sync_fan_entry(&fan)
    }

    /// Opens a stored blob for reading; the reader fails at the end if the content does not hash
    /// to `id`.
    pub fn open_blob(&self, id: &BlobId) -> Result<BlobReader> {
        let path = self.path_of(id);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => JournalError::BlobNotFound { id: id.to_string() },
            _ => JournalError::io("open blob", &path, e),
        })?;
        let remaining = file
            .metadata()
            .map_err(|e| JournalError::io("stat blob", &path, e))?
            .len();
        Ok(BlobReader {
            file,
            hasher: blake3::Hasher::new(),
            id: *id,
            path,
            remaining,
            checked: false,
        })
    }

    /// Reads a whole blob, checking its hash; returns its size.
    pub fn verify(&self, id: &BlobId) -> Result<u64> {
        let mut reader = self.open_blob(id)?;
        let mut buf = vec![0u8; self.config.chunk_bytes];
        let mut bytes = 0u64;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(bytes),
                Ok(n) => bytes += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(reader.into_error(e)),
            }
        }
    }

    /// Whether a blob with this id is stored.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.path_of(id).is_file()
    }

    /// Removes a blob; `Ok(false)` when it was not stored.
    pub fn remove(&self, id: &BlobId) -> Result<bool> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(JournalError::io("remove blob", &path, e)),
        }
        sync_dir(path.parent().unwrap_or(&self.dir))?;
        Ok(true)
    }

    /// Every stored blob id.
    pub fn list(&self) -> Result<Vec<BlobId>> {
        let mut ids = Vec::new();
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| JournalError::io("list blob directory", &self.dir, e))?;
        for fan in entries {
            let fan = fan
                .map_err(|e| JournalError::io("list blob directory", &self.dir, e))?
                .path();
            if fan.file_name().is_some_and(|n| n == TMP_DIR) || !fan.is_dir() {
                continue;
            }
            let inner =
                fs::read_dir(&fan).map_err(|e| JournalError::io("list blob directory", &fan, e))?;
            for entry in inner {
                let entry = entry.map_err(|e| JournalError::io("list blob directory", &fan, e))?;
                if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// Streams a stored blob, hashing as it goes; the read that reaches the blob's size (as it was
/// when opened) fails with `InvalidData` when the content does not hash to the blob's id, so a
/// caller that reads exactly that many bytes is checked too.
pub struct BlobReader {
    file: File,
    hasher: blake3::Hasher,
    id: BlobId,
    path: PathBuf,
    /// Bytes left to read of the size the file had when it was opened.
    remaining: u64,
    checked: bool,
}

impl BlobReader {
    /// Turns an error from `read` into the journal error it stands for.
    pub fn into_error(self, e: io::Error) -> JournalError {
        if e.kind() == io::ErrorKind::InvalidData {
            let actual = hex(self.hasher.finalize().as_bytes());
            return JournalError::BlobCorrupt {
                id: self.id.to_string(),
                path: self.path,
                actual,
            };
        }
        JournalError::io("read blob", self.path, e)
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.checked {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = if want == 0 {
            0
        } else {
            self.file.read(&mut buf[..want])?
        };
        self.hasher.update(&buf[..n]);
        self.remaining -= n as u64;
        if n == 0 || self.remaining == 0 {
            self.check()?;
        }
        Ok(n)
    }
}

impl BlobReader {
    /// Compares the hash of everything read with the id; called when the size known at open is
    /// reached (so a caller that reads exactly that many bytes is checked too) or at an early end.
    fn check(&mut self) -> io::Result<()> {
        if self.hasher.finalize().as_bytes() != &self.id.0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} at {} does not match its hash",
                    self.id,
                    self.path.display()
                ),
            ));
        }
        self.checked = true;
        Ok(())
    }
}
