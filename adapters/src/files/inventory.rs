//! The inventory of a files resource: every file of the tree with the blake3 hash of its
//! content, to compare two sites (`Resource::inventory`).
//!
//! The walk starts at the root and descends into directories without following symlinks; the
//! private area (`.concord`, where staging, temp files, the branch log and the blob store live)
//! is left out, and so is anything that is not a regular file (a symlink, a socket). A key is
//! the path relative to the root, `/`-separated, as a branch names it. Each file is hashed
//! through one bounded buffer, so a file of any size costs one buffer of memory; the entries
//! (a key and a hash each) are collected, at most `INVENTORY_ENTRIES_MAX`, and sorted.
//!
//! # Implementation caveats
//!
//! * A file name that is not UTF-8 (never written through concord) is listed with its invalid
//!   bytes replaced (`U+FFFD`).
//! * The tree is read as it is: a commit running meanwhile may be seen in part. Take the
//!   inventory while nothing commits (a standby between replays) to compare as of one LSN.

use std::fs;
use std::path::PathBuf;

use super::{Inner, PRIVATE_DIR};
use crate::internal::io::hash_file;
use crate::{InventoryEntry, ResourceError, check_inventory_size};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl Inner {
    /// Every regular file under the root outside the private area, with its content's hash,
    /// sorted by path. Blocks.
    pub(super) fn inventory(&self) -> Result<Vec<InventoryEntry>> {
        let mut out = Vec::new();
        let mut dirs = vec![(self.root.clone(), String::new())];
        while let Some((dir, prefix)) = dirs.pop() {
            for (name, is_dir) in self.list(&dir)? {
                if prefix.is_empty() && name == PRIVATE_DIR {
                    continue;
                }
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                let path = dir.join(&name);
                if is_dir {
                    dirs.push((path, key));
                } else if let Some(digest) = hash_file(&self.name, &path)? {
                    out.push(InventoryEntry { key, digest });
                    check_inventory_size(&self.name, out.len())?;
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The entries of `dir`: each name, and whether it is a directory (not through a symlink).
    fn list(&self, dir: &PathBuf) -> Result<Vec<(String, bool)>> {
        let list = |e| ResourceError::io(&self.name, "list", dir, &e);
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            let is_dir = entry.file_type().map_err(list)?.is_dir();
            out.push((entry.file_name().to_string_lossy().into_owned(), is_dir));
        }
        Ok(out)
    }
}
