//! Re-seeding a kv resource, key by key (`Resource::read_entry`, `write_entry`,
//! `remove_entry`, `set_applied_lsn`; the shared shells are `internal::reseed`).
//!
//! A key is the inventory's: the sled key in lower-case hex (an even number of `0-9a-f`
//! digits, at most `KEY_BYTES_MAX` bytes once decoded); anything else is refused
//! (`Rejected`). A value is at most `value_bytes_max` bytes, so it is read whole: **read**
//! hands out the value from memory, **write** reads the content (refusing a longer one) and
//! inserts it into the data tree, **remove** removes the key; each change is one sled write
//! followed by the resource's sync (`store::Store::sync`: sled's flush, then `fdatasync`), so
//! it is durable when it returns. The applied LSN is the meta tree's, written the same way.
//!
//! # Implementation caveats
//!
//! * A write does not take the key's branch lock: a standby runs no branches, and prepared
//!   ones refuse the call.

use std::io::{Cursor, Read};

use super::{Inner, KEY_BYTES_MAX};
use crate::internal::instance::Instance;
use crate::internal::reseed::{Reseed, content_unreadable};
use crate::{BlobContent, Lsn, ResourceError};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

impl Reseed for Inner {
    fn read_key(&self, key: &str) -> Result<Option<BlobContent>> {
        let bytes = self.decode_key(key)?;
        let value = self.store.get(&bytes)?;
        Ok(value.map(|value| Box::new(Cursor::new(value)) as BlobContent))
    }

    fn write_key(&self, key: &str, content: BlobContent) -> Result<()> {
        let bytes = self.decode_key(key)?;
        let value = self.read_value(key, content)?;
        self.store.set_entry(&bytes, Some(&value))
    }

    fn remove_key(&self, key: &str) -> Result<()> {
        let bytes = self.decode_key(key)?;
        self.store.set_entry(&bytes, None)
    }

    fn store_applied_lsn(&self, lsn: Lsn) -> Result<()> {
        self.store.set_applied(lsn)
    }
}

impl Inner {
    /// The sled key of an inventory key (lower-case hex); a malformed one is refused.
    fn decode_key(&self, key: &str) -> Result<Vec<u8>> {
        let bytes = decode_hex(key)
            .ok_or_else(|| self.rejected(format!("entry {key:?} refused: a kv key is the sled key in lower-case hex (pairs of 0-9a-f)")))?;
        if bytes.len() > KEY_BYTES_MAX {
            return Err(self.rejected(format!(
                "entry {key:?} refused: {} bytes, over KEY_BYTES_MAX = {KEY_BYTES_MAX} bytes",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// All of `content`, refused beyond `value_bytes_max`.
    fn read_value(&self, key: &str, content: BlobContent) -> Result<Vec<u8>> {
        let limit = self.config.value_bytes_max;
        let mut value = Vec::new();
        content
            .take(limit.saturating_add(1))
            .read_to_end(&mut value)
            .map_err(|e| content_unreadable(&self.name, key, &e))?;
        if value.len() as u64 > limit {
            return Err(self.rejected(format!(
                "entry {key:?}: the value is over value_bytes_max = {limit} bytes"
            )));
        }
        Ok(value)
    }
}

/// The bytes of lower-case hex `text`; `None` when it is not.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lower_case_hex() {
        assert_eq!(decode_hex("00ff7a"), Some(vec![0, 255, 0x7a]));
        assert_eq!(decode_hex(""), Some(vec![]));
        for bad in ["0", "0g", "FF", "../x", "a b"] {
            assert_eq!(decode_hex(bad), None, "{bad:?}");
        }
    }
}
