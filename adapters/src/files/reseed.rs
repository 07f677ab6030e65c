//! Re-seeding a files resource, key by key (`Resource::read_entry`, `write_entry`,
//! `remove_entry`, `set_applied_lsn`; the shared shells are `internal::reseed`).
//!
//! A key is the inventory's: a file's path relative to the root. It is checked lexically as a
//! branch's path is (`confine::check_path`: relative, no `.` or `..`, not in `.concord`) and
//! then on disk more strictly than a branch's: **no component may be a symlink**, not even one
//! that stays inside the root, because the inventory does not follow symlinks and a copy
//! through one would land under another key. Every refusal is a `Rejected` naming the path.
//!
//! * **Read** opens the file and hands it out as the reader (one file descriptor, read as it is
//!   consumed: a file of any size costs nothing more).
//! * **Read** and **remove** find a key absent when a prefix of it is a file or its path is a
//!   directory (neither is a key).
//! * **Write** first removes what stands in the way: a file where the key needs a directory,
//!   or a directory (and everything under it) where the key is a file. Neither can be a key of
//!   the source, which holds this key, so the re-seed removes them anyway; doing it here lets
//!   the caller write and remove keys in any order. Then it streams the content through one buffer into a new temp file of the private area,
//!   syncs it, creates the missing parent directories, renames it into place and syncs every
//!   directory it changed (through the instance's directory-sync coalescer): durable when it
//!   returns. A crash before the rename leaves a temp file, which `open` clears.
//! * **Remove** unlinks the file, then removes each parent directory left empty (up to the
//!   root), so that a later write may put a file where such a directory was, and syncs the
//!   directories it changed.
//! * Before a write or a remove, a checkpoint covers every commit of this instance's branch
//!   log, as before a replay: a commit applied again at open must not undo the copy.
//!
//! # Implementation caveats
//!
//! * A directory removed from a write's way is not synced inside (it is gone); a crash can
//!   bring part of it back, which a re-seed run again removes.
//! * The content written is checked against `file_bytes_max`, not against a hash: the caller
//!   compares the inventory afterwards.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Inner;
use super::confine::{Use, check_path, refused};
use crate::internal::io::parent_of;
use crate::internal::reseed::{Reseed, stream_to_synced};
use crate::{BlobContent, Lsn, ResourceError};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl Reseed for Inner {
    fn read_key(&self, key: &str) -> Result<Option<BlobContent>> {
        let Spot::Clear(target) = self.locate(key)? else {
            return Ok(None);
        };
        match File::open(&target) {
            Ok(file) => Ok(Some(Box::new(file))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ResourceError::io(&self.name, "open", &target, &e)),
        }
    }

    fn write_key(&self, key: &str, content: BlobContent) -> Result<()> {
        let mut touched = BTreeSet::new();
        self.clear_the_way(key, &mut touched)?;
        let target = self.confine(key, Use::Write)?;
        self.make_parents(key, &mut touched)?;
        let tmp = self.tmp_file();
        let bytes_max = self.config.file_bytes_max;
        drop(stream_to_synced(&self.name, key, content, &tmp, bytes_max)?);
        fs::rename(&tmp, &target).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ResourceError::io(&self.name, "rename the re-seeded content to", &target, &e)
        })?;
        touched.insert(parent_of(&target));
        self.sync_dirs(&touched)
    }

    fn remove_key(&self, key: &str) -> Result<()> {
        let Spot::Clear(target) = self.locate(key)? else {
            return Ok(());
        };
        let mut touched = BTreeSet::new();
        self.remove_target(&target, &mut touched)?;
        self.prune_empty_parents(key, &mut touched)?;
        self.sync_dirs(&touched)
    }

    fn store_applied_lsn(&self, lsn: Lsn) -> Result<()> {
        self.write_state("applied lsn", &self.area.applied_lsn, lsn.0)
    }

    async fn before_change(self: &Arc<Self>) -> Result<()> {
        self.checkpoint_commits().await
    }
}

/// Where a key stands on disk.
enum Spot {
    /// Every existing prefix is a directory, and the key is a file or absent: its path.
    Clear(PathBuf),
    /// A prefix of the key is a file (at this path): the key is absent.
    FileAbove(PathBuf),
    /// The key's path is a directory (this one): the key is absent.
    DirectoryAt(PathBuf),
}

impl Inner {
    /// Where key `key` stands: checked lexically, and refused when a component is a symlink.
    fn locate(&self, key: &str) -> Result<Spot> {
        check_path(&self.name, key)?;
        let mut current = self.root.clone();
        let components: Vec<&str> = key.split('/').collect();
        for (i, component) in components.iter().enumerate() {
            current.push(component);
            let last = i + 1 == components.len();
            match fs::symlink_metadata(&current) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let reason = format!(
                        "{} is a symlink; re-seeding does not go through symlinks",
                        components[..=i].join("/")
                    );
                    return Err(refused(&self.name, key, &reason));
                }
                Ok(meta) if !last && !meta.is_dir() => return Ok(Spot::FileAbove(current)),
                Ok(meta) if last && meta.is_dir() => return Ok(Spot::DirectoryAt(current)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(ResourceError::io(&self.name, "inspect", &current, &e)),
            }
        }
        Ok(Spot::Clear(self.root.join(key)))
    }

    /// Removes what stands in the way of a write of `key`: a file where the key needs a
    /// directory, or a directory (with everything under it) where the key is a file. Neither
    /// can be a key of the source, which holds `key` (a path is not a file and a directory at
    /// once), so a re-seed removes them in any case; doing it here lets the caller write and
    /// remove keys in any order.
    fn clear_the_way(&self, key: &str, touched: &mut BTreeSet<PathBuf>) -> Result<()> {
        match self.locate(key)? {
            Spot::Clear(_) => return Ok(()),
            Spot::FileAbove(file) => fs::remove_file(&file)
                .map_err(|e| ResourceError::io(&self.name, "remove", &file, &e))?,
            Spot::DirectoryAt(dir) => fs::remove_dir_all(&dir)
                .map_err(|e| ResourceError::io(&self.name, "remove directory", &dir, &e))?,
        }
        match self.locate(key)? {
            Spot::Clear(target) => {
                touched.insert(parent_of(&target));
                Ok(())
            }
            _ => Err(refused(&self.name, key, "what stood in the way came back")),
        }
    }

    /// Removes the parent directories of `key` that are empty or gone, deepest first, up to the
    /// first that holds something (or the root); `touched` then holds the directories to sync
    /// (none that was removed).
    fn prune_empty_parents(&self, key: &str, touched: &mut BTreeSet<PathBuf>) -> Result<()> {
        let mut dir = parent_of(&self.root.join(key));
        while dir != self.root && dir.starts_with(&self.root) {
            match fs::remove_dir(&dir) {
                // Gone already: as if removed now (an earlier removal that crashed before its
                // directory sync, or the key was absent).
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => break,
                Err(e) => {
                    return Err(ResourceError::io(&self.name, "remove directory", &dir, &e));
                }
            }
            touched.remove(&dir);
            dir = parent_of(&dir);
            touched.insert(dir.clone());
        }
        Ok(())
    }

    fn sync_dirs(&self, dirs: &BTreeSet<PathBuf>) -> Result<()> {
        dirs.iter()
            .try_for_each(|dir: &PathBuf| self.dirs.sync(Path::new(dir)))
    }
}
