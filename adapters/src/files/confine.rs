//! Confinement: every path a branch names stays inside the root and outside the private area.
//!
//! A path is checked twice. **Lexically** ([`check_path`]) on every call: relative,
//! `/`-separated, UTF-8, without empty, `.` or `..` components or NUL bytes, at most
//! `PATH_BYTES_MAX` bytes, and not under `.concord`. **On disk** ([`Inner::confine`]) where it
//! is written, read, committed and replayed: every existing prefix must be a directory, or a
//! symlink that resolves inside the root and outside the private area; the last component must
//! not be a directory. Every refusal is a [`ResourceError::Rejected`] naming the path and the
//! reason.
//!
//! # Implementation caveats
//!
//! * A symlink swapped in by someone else between the check and the use is not detected (there
//!   is no `openat2(RESOLVE_BENEATH)` here). The tree is assumed to be written only through
//!   concord.
//! * A put of a path that is a symlink (inside the root) replaces the symlink, it does not write
//!   through it.

use std::fs::{self, Metadata};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Inner, PATH_BYTES_MAX, PRIVATE_DIR, TASK};
use crate::ResourceError;
use crate::internal::io::blocking;

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// What a path is confined for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// Written: the path may be missing, it must not be a directory.
    Write,
    /// Read: the path must be a file.
    Read,
}

/// Checks a path lexically: relative, `/`-separated, no empty, `.` or `..` component, no NUL,
/// not in the private area, at most `PATH_BYTES_MAX` bytes.
pub(super) fn check_path(name: &str, path: &str) -> Result<()> {
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

pub(super) fn refused(name: &str, path: &str, reason: &str) -> ResourceError {
    ResourceError::rejected(name, format!("path {path:?} refused: {reason}"))
}

impl Inner {
    /// Checks that `path` (lexically valid) stays inside the root on disk: every existing prefix
    /// is a directory or a symlink resolving inside the root, outside the private area.
    pub(super) fn confine(&self, path: &str, use_: Use) -> Result<PathBuf> {
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
    pub(super) fn follow(&self, path: &str, prefix: &str, link: &Path) -> Result<Metadata> {
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

    pub(super) async fn confine_blocking(
        self: &Arc<Self>,
        path: &str,
        use_: Use,
    ) -> Result<PathBuf> {
        let (worker, path) = (self.clone(), path.to_string());
        blocking(&self.name, TASK, move || worker.confine(&path, use_)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
