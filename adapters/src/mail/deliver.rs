//! Deliveries: commit, rollback and replay move messages between `tmp/` and `new/`.
//!
//! The Maildir delivery protocol itself: a message is written and synced under its unique name
//! in `tmp/` (at prepare), then renamed into `new/`, and `new/` is synced. A commit
//! (`Inner::deliver`) renames each message of the branch; one not in `tmp/` any more was
//! delivered by an earlier attempt. A branch recovered at open first looks for each message in
//! `new/` and `cur/` (a reader may already have it, under its name with a reader's suffix) and
//! delivers only the others, so a commit repeated after a crash never delivers twice. A
//! rollback unlinks the branch's messages from `tmp/`. A replay writes each message not yet in
//! `new/` or `cur/` to `tmp/` (inline content, or a copy of its blob), syncs it, renames it into
//! `new/`, syncs `new/`, and only then stores the applied LSN.
//!
//! # Implementation caveats
//!
//! * A message that is neither in `tmp/` nor delivered (removed by a reader or by hand) is not
//!   delivered again; the commit logs a warning and goes on.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;

use journal::{BlobId, Lsn};

use super::enqueue::overwrite_synced;
use super::{CHUNK_BYTES, Inner, RedoEntry, list_names, name};
use crate::internal::instance::Instance;
use crate::internal::io::{copy_blob_synced, remove_file_if_exists};
use crate::{ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl Inner {
    /// Commit: renames each message from `tmp/` into `new/`, then syncs `new/`. A message not in
    /// `tmp/` was delivered by an earlier attempt. For a branch recovered at open, a message
    /// already in `new/` or `cur/` is not renamed again (a copy of it in `tmp/` is unlinked):
    /// see "Crashes" in the module docs.
    pub(super) fn deliver(&self, xid: &Xid, names: &[String], recovered: bool) -> Result<()> {
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
    pub(super) fn delivered(&self, name: &str, cur: &mut Option<Vec<String>>) -> Result<bool> {
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
    pub(super) fn unlink_staged(&self, names: &[String]) -> Result<()> {
        for name in names {
            remove_file_if_exists(&self.name, &self.area.tmp.join(name))?;
        }
        Ok(())
    }

    /// Replay of a batch: delivers every message of its redos, in order, that is not in `new/`
    /// or `cur/` yet (written to `tmp/` and synced, then renamed into `new/`), syncs `new/`
    /// once, then stores the batch's last LSN as applied, once (see "Crashes").
    pub(super) fn replay_messages(&self, batch: &[(Lsn, Vec<RedoEntry>)]) -> Result<()> {
        let Some(&(last, _)) = batch.last() else {
            return Ok(());
        };
        let mut cur = None;
        let entries = batch
            .iter()
            .flat_map(|(lsn, entries)| entries.iter().map(move |entry| (*lsn, entry)));
        for (n, (lsn, entry)) in entries.enumerate() {
            if n == 1 && self.shell.pauses.replay_fails_here() {
                return Err(self.unavailable(format!(
                    "replay of lsn {lsn} stopped by its fail point after the batch's first message"
                )));
            }
            self.replay_message(entry, &mut cur)?;
        }
        self.dirs.sync(&self.area.new)?;
        self.write_state("applied lsn", &self.area.applied_lsn, last.0)
    }

    /// Delivers one replayed message unless it is delivered already; `new/` is not synced.
    fn replay_message(&self, entry: &RedoEntry, cur: &mut Option<Vec<String>>) -> Result<()> {
        let name = entry.name();
        if self.delivered(name, cur)? {
            return Ok(());
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
        delivered
    }

    /// Every message in `new/` and `cur/` with the blake3 hash of its content, keyed by its
    /// file name without the directory and without the info a reader appends in `cur/`
    /// (`:2,S`), so a message a reader has seen on one site matches the same message unseen on
    /// the other; each file read through one bounded buffer.
    pub(super) fn inventory(&self) -> Result<Vec<crate::InventoryEntry>> {
        let mut out = Vec::new();
        for dir in [&self.area.new, &self.area.cur] {
            for name in list_names(&self.name, dir)? {
                let path = dir.join(&name);
                let Some(digest) = crate::internal::io::hash_file(&self.name, &path)? else {
                    continue;
                };
                let key = name.split_once(':').map_or(name.as_str(), |(key, _)| key);
                out.push(crate::InventoryEntry {
                    key: key.to_string(),
                    digest,
                });
                crate::check_inventory_size(&self.name, out.len())?;
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }

    /// Copies blob `id` (of `bytes` bytes, the message `name`) to the new file `dest`, synced;
    /// the blob store checks the content against its hash as it is read.
    pub(super) fn copy_blob(&self, name: &str, id: &BlobId, bytes: u64, dest: &Path) -> Result<()> {
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dest)
            .map_err(|e| ResourceError::io(&self.name, "create", dest, &e))?;
        let copied = copy_blob_synced(&self.name, &self.blobs, id, &mut out, dest, CHUNK_BYTES)?;
        if copied != bytes {
            return Err(self.fatal(format!(
                "blob {id} of message {name} is {copied} bytes, the redo says {bytes}"
            )));
        }
        Ok(())
    }
}
