//! Apply: putting a prepared branch's entries in place, at commit, at open and in replay.
//!
//! Every entry sets its path to a fixed final state — this content, or absent — whatever the
//! path held before, so applying a redo twice gives the same tree; that is what makes commit,
//! the open that applies commits again and replay idempotent.
//!
//! * **Commit** (`Inner::commit_files`) renames each staged file into place (a small file's
//!   content is written to a temp file first, unless its staged file is at hand; a large one
//!   whose staged file is gone is linked from its blob) and removes deleted paths. It syncs
//!   nothing: the branch log holds the redo, and the commits since the last checkpoint are
//!   applied again at open (`Inner::redo_committed`), skipping entries a later commit decides
//!   ([`not_superseded`]). A large put whose blob is gone too is accepted only when the file at
//!   its path hashes to the recorded content; otherwise [`ResourceError::ContentLost`].
//! * **Replay** (`Inner::replay_files`) writes each entry from the redo (inline content, or a
//!   copy of the blob), syncs the files and the directories touched, and only then stores the
//!   applied LSN.
//!
//! # Implementation caveats
//!
//! * Directories a put needs are created; directories are never removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use journal::{BlobId, Lsn};

use super::confine::{Use, check_path, refused};
use super::locks::ancestors;
use super::staging::{Change, Staged, create_written};
use super::{CHUNK_BYTES, Inner, RedoEntry, decode_redo};
use crate::internal::instance::Instance;
use crate::internal::io::{copy_blob_synced, parent_of, sync_files};
use crate::{ResourceError, Xid};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// Which of `entries` (in commit order) still decide their path's final state: an entry is
/// superseded by a later one on the same path, on an ancestor of it (the ancestor became a file
/// or went away) or on a path below it (it became a directory). Applying only the others, in
/// order, gives the same tree as applying all of them did — and never tries to put a file where
/// a later commit made a directory, which would fail.
pub(super) fn not_superseded(entries: &[(Xid, RedoEntry)]) -> Vec<bool> {
    let paths: Vec<&str> = entries.iter().map(|(_, entry)| entry.path()).collect();
    later_entries(&paths)
        .into_iter()
        .map(|later| !later.at_or_above && !later.below)
        .collect()
}

/// Which of `entries` (a replay batch, in LSN order) replay applies: those [`not_superseded`]
/// keeps, and also a delete superseded only by a later entry *below* its path (the path became
/// a directory): applied before that entry, it removes the file that stood in the way, and run
/// again after the directory was made it finds a directory and leaves it (see
/// [`Inner::replay_files`]). So the batch applies from any state a crash inside an earlier
/// attempt of it left.
pub(super) fn replayed(entries: &[&RedoEntry]) -> Vec<bool> {
    let paths: Vec<&str> = entries.iter().map(|entry| entry.path()).collect();
    later_entries(&paths)
        .into_iter()
        .zip(entries)
        .map(|(later, entry)| {
            !later.at_or_above && (!later.below || matches!(entry, RedoEntry::Delete { .. }))
        })
        .collect()
}

/// Whether a later entry touches an entry's path or an ancestor of it, and whether one touches
/// a path below it.
struct Later {
    at_or_above: bool,
    below: bool,
}

fn later_entries(paths: &[&str]) -> Vec<Later> {
    // The last position of an entry on each path, and of any entry on a path below each path.
    let mut last_at: HashMap<&str, usize> = HashMap::new();
    let mut last_below: HashMap<&str, usize> = HashMap::new();
    for (i, path) in paths.iter().enumerate() {
        last_at.insert(path, i);
        for ancestor in ancestors(path) {
            last_below.insert(ancestor, i);
        }
    }
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let later = |at: Option<&usize>| at.is_some_and(|&j| j > i);
            Later {
                at_or_above: later(last_at.get(path))
                    || ancestors(path).any(|a| later(last_at.get(a))),
                below: later(last_below.get(path)),
            }
        })
        .collect()
}

impl Inner {
    /// At open: applies again every commit the log holds at or after its last checkpoint (their
    /// files' content may not have reached the disk), in commit order, then checkpoints.
    pub(super) fn redo_committed(&self, committed: Vec<(Lsn, Xid, Vec<u8>)>) -> Result<()> {
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

    /// Commit: puts every entry of the prepare record in place, then removes the staging.
    /// `entries` is `None` for a branch that never prepared (refused before this). Nothing is
    /// synced here, neither content nor directories: the log holds the redo, and a commit is
    /// applied again at open until a checkpoint's `syncfs` (which starts after the commit's
    /// `COMMITTED` is appended, see [`Inner::checkpoint`]) has made its files and names durable.
    /// Applying the same entries again gives the same tree, so a commit interrupted by a crash
    /// is simply done again.
    pub(super) fn commit_files(
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
    pub(super) fn apply_entry(
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
    pub(super) fn put_content(
        &self,
        path: &str,
        target: &Path,
        content: &[u8],
    ) -> Result<(File, PathBuf)> {
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
    pub(super) fn put_in_place(
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
    pub(super) fn restore_from_blob(
        &self,
        path: &str,
        target: &Path,
        id: &BlobId,
        bytes: u64,
    ) -> Result<()> {
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
    pub(super) fn content_at(&self, target: &Path) -> Result<Option<(BlobId, u64)>> {
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
    pub(super) fn make_parents(&self, path: &str, touched: &mut BTreeSet<PathBuf>) -> Result<()> {
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

    pub(super) fn remove_target(
        &self,
        target: &Path,
        touched: &mut BTreeSet<PathBuf>,
    ) -> Result<()> {
        // Synced even when the file is already gone: an earlier attempt may have removed it and
        // crashed before syncing the directory.
        touched.insert(parent_of(target));
        match fs::remove_file(target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ResourceError::io(&self.name, "remove", target, &e)),
        }
    }

    /// Replay of a batch: puts the entries of its redos in place in order (inline content from
    /// the redo, the rest from the blob store), leaving out those a later entry of the batch
    /// decides ([`replayed`]); then syncs the files written and the directories touched, once
    /// for the batch, and only then stores the batch's last LSN as applied (see "Crashes" in
    /// the module docs).
    pub(super) fn replay_files(&self, batch: &[(Lsn, Vec<RedoEntry>)]) -> Result<()> {
        let Some(&(last, _)) = batch.last() else {
            return Ok(());
        };
        let entries: Vec<(Lsn, &RedoEntry)> = batch
            .iter()
            .flat_map(|(lsn, entries)| entries.iter().map(move |entry| (*lsn, entry)))
            .collect();
        let live = replayed(&entries.iter().map(|(_, e)| *e).collect::<Vec<_>>());
        let mut touched = BTreeSet::new();
        let mut written = Vec::new();
        for (n, ((lsn, entry), live)) in entries.iter().zip(live).enumerate() {
            if n == 1 && self.shell.pauses.replay_fails_here() {
                return Err(self.unavailable(format!(
                    "replay of lsn {lsn} stopped by its fail point after the batch's first entry"
                )));
            }
            if live {
                self.replay_entry(entry, &mut touched, &mut written)?;
            }
        }
        sync_files(&self.name, &written)?;
        self.dirs.sync_all(&touched)?;
        self.write_state("applied lsn", &self.area.applied_lsn, last.0)
    }

    /// Puts one replayed entry in place (not synced: the files written go into `written`, the
    /// directories changed into `touched`). A delete that finds a directory leaves it: a later
    /// entry of the batch made it, in an earlier attempt of the same batch.
    fn replay_entry(
        &self,
        entry: &RedoEntry,
        touched: &mut BTreeSet<PathBuf>,
        written: &mut Vec<(File, PathBuf)>,
    ) -> Result<()> {
        check_path(&self.name, entry.path())?;
        match entry {
            RedoEntry::Put { path, id, bytes } => self.replay_put(path, id, *bytes, touched),
            RedoEntry::PutInline { path, content } => {
                self.put_in_place(path, None, touched, |target| {
                    written.push(self.put_content(path, target, content)?);
                    Ok(())
                })
            }
            RedoEntry::Delete { path } => {
                // Looked at before confinement, which refuses a directory; reading its
                // metadata changes nothing, wherever it leads.
                if fs::symlink_metadata(self.root.join(path)).is_ok_and(|meta| meta.is_dir()) {
                    return Ok(());
                }
                let target = self.confine(path, Use::Write)?;
                self.remove_target(&target, touched)
            }
        }
    }

    pub(super) fn replay_put(
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
    pub(super) fn copy_blob(&self, path: &str, id: &BlobId, bytes: u64) -> Result<PathBuf> {
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

    pub(super) fn copy_blob_to(&self, id: &BlobId, tmp: &Path) -> Result<u64> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| ResourceError::io(&self.name, "create", tmp, &e))?;
        copy_blob_synced(&self.name, &self.blobs, id, &mut out, tmp, CHUNK_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Epoch;

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
}
