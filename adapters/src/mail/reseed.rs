//! Re-seeding a mail resource, key by key (`Resource::read_entry`, `write_entry`,
//! `remove_entry`, `set_applied_lsn`; the shared shells are `internal::reseed`).
//!
//! A key is the inventory's: a delivered message's file name, without the directory and
//! without the info a reader appends in `cur/` (`:2,S`). It must be a valid Maildir name
//! (`name::check_name`: printable ASCII without `/` or `:`, not starting with a dot), so it
//! never leads out of `new/` or `cur/`; anything else is refused (`Rejected`).
//!
//! * **Read** opens the message in `new/`, or else its entry in `cur/` (the name, with any
//!   info after `:`), and hands out the file as the reader.
//! * **Write** delivers the content under the key the Maildir way: streamed through one buffer
//!   into a new temp file of the private area (`.concord/tmp/`, cleared at open), synced,
//!   renamed into `new/`; an entry of the key in `cur/` is removed (the message is one key
//!   once), and `new/` (and `cur/` when it changed) are synced. Replay after the re-seed's
//!   LSN finds a message it delivers already in `new/` and skips it, as always.
//! * **Remove** unlinks the message from `new/` and every entry of it in `cur/`, then syncs
//!   both.
//!
//! # Implementation caveats
//!
//! * A written message loses a reader's flags (it lands in `new/`): the inventory does not
//!   compare them either.
//! * The content is not checked as RFC 5322 here (the primary checked it when it was enqueued);
//!   it is bounded by `max_message_bytes`.

use std::fs::{self, File};
use std::io;
use std::path::PathBuf;

use super::{Inner, list_names, name};
use crate::internal::instance::Instance;
use crate::internal::io::remove_file_if_exists;
use crate::internal::reseed::{Reseed, stream_to_synced};
use crate::{BlobContent, Lsn, ResourceError};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl Reseed for Inner {
    fn read_key(&self, key: &str) -> Result<Option<BlobContent>> {
        self.check_key(key)?;
        let mut paths = vec![self.area.new.join(key)];
        paths.extend(self.cur_entries(key)?);
        for path in paths {
            match File::open(&path) {
                Ok(file) => return Ok(Some(Box::new(file))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ResourceError::io(&self.name, "open", &path, &e)),
            }
        }
        Ok(None)
    }

    fn write_key(&self, key: &str, content: BlobContent) -> Result<()> {
        self.check_key(key)?;
        let tmp = self.scratch_file();
        let bytes_max = self.config.max_message_bytes;
        drop(stream_to_synced(&self.name, key, content, &tmp, bytes_max)?);
        let target = self.area.new.join(key);
        fs::rename(&tmp, &target).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ResourceError::io(&self.name, "rename the re-seeded message to", &target, &e)
        })?;
        let in_cur = self.remove_from_cur(key)?;
        self.dirs.sync(&self.area.new)?;
        if in_cur {
            self.dirs.sync(&self.area.cur)?;
        }
        Ok(())
    }

    fn remove_key(&self, key: &str) -> Result<()> {
        self.check_key(key)?;
        remove_file_if_exists(&self.name, &self.area.new.join(key))?;
        self.remove_from_cur(key)?;
        self.dirs.sync(&self.area.new)?;
        self.dirs.sync(&self.area.cur)
    }

    fn store_applied_lsn(&self, lsn: Lsn) -> Result<()> {
        self.write_state("applied lsn", &self.area.applied_lsn, lsn.0)
    }
}

impl Inner {
    /// Refuses a key that is not a message's file name.
    fn check_key(&self, key: &str) -> Result<()> {
        name::check_name(key)
            .map_err(|reason| self.rejected(format!("entry {key:?} refused: {reason}")))
    }

    /// The entries of `cur/` that are the message `key` (its name, with any info after `:`).
    fn cur_entries(&self, key: &str) -> Result<Vec<PathBuf>> {
        let entries = list_names(&self.name, &self.area.cur)?;
        Ok(entries
            .into_iter()
            .filter(|entry| entry.split_once(':').map_or(entry.as_str(), |(k, _)| k) == key)
            .map(|entry| self.area.cur.join(entry))
            .collect())
    }

    /// Removes every entry of `key` from `cur/`; whether there was one.
    fn remove_from_cur(&self, key: &str) -> Result<bool> {
        let entries = self.cur_entries(key)?;
        for path in &entries {
            remove_file_if_exists(&self.name, path)?;
        }
        Ok(!entries.is_empty())
    }
}
