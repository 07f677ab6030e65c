//! The one-value state files of the files and mail resources (`fence`, `applied_lsn`).
//!
//! A state file holds a version byte, the value (u64 little-endian) and the first 8 bytes of
//! the blake3 hash of the two: 17 bytes. A missing file means 0; a damaged one refuses the open
//! with [`ResourceError::Fatal`]. How the file is written durably (temp file, sync, rename,
//! directory sync) is each resource's: the files resource writes its temp file under `tmp/`
//! with `create_new`, the mail resource its scratch file by truncating.
//!
//! # Implementation caveats
//!
//! * Only version 1 is read or written.

use std::fs;
use std::io;
use std::path::Path;

use crate::ResourceError;

const STATE_VERSION: u8 = 1;

/// The bytes of a state file holding `value`.
pub(crate) fn encode_state(value: u64) -> Vec<u8> {
    let mut out = vec![STATE_VERSION];
    out.extend_from_slice(&value.to_le_bytes());
    let hash = blake3::hash(&out);
    out.extend_from_slice(&hash.as_bytes()[..8]);
    out
}

/// The value of a state file's bytes; damage is described in the error.
pub(crate) fn decode_state(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() != 17 {
        return Err(format!("{} bytes, 17 expected", bytes.len()));
    }
    if bytes[0] != STATE_VERSION {
        return Err(format!(
            "version {}: this program reads version {STATE_VERSION}",
            bytes[0]
        ));
    }
    if blake3::hash(&bytes[..9]).as_bytes()[..8] != bytes[9..] {
        return Err("checksum mismatch".to_string());
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&bytes[1..9]);
    Ok(u64::from_le_bytes(value))
}

/// Reads the state file `path` of the resource `name`: 0 when missing, fatal when damaged.
pub(crate) fn read_state_file(name: &str, path: &Path) -> Result<u64, ResourceError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ResourceError::io(name, "read", path, &e)),
    };
    decode_state(&bytes).map_err(|e| ResourceError::Fatal {
        resource: name.to_string(),
        message: format!("{} is damaged: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_round_trip_and_detect_damage() {
        let bytes = encode_state(42);
        assert_eq!(decode_state(&bytes).unwrap(), 42);
        let mut damaged = bytes.clone();
        damaged[3] ^= 1;
        assert!(decode_state(&damaged).is_err());
        assert!(decode_state(&bytes[..16]).is_err());
    }
}
