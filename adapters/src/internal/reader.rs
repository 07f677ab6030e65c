//! The bounds-checked reader of the resources' byte encodings (redo, batch).
//!
//! The files and mail redos and the kv batch are read from bytes that came from disk or the
//! network, so a malformed one must be a described error, never a panic, and no length may be
//! trusted before it is checked (STYLE.md 7, 14). A [`Reader`] takes bytes from the front of a
//! slice, refusing to read past its end with `truncated: N more bytes expected, M left`; each
//! encoding checks its own limits and ops on what it reads. [`put_u32`] writes the u32
//! little-endian counts and lengths the encodings share.
//!
//! # Implementation caveats
//!
//! * Only what the encodings use: fixed-size arrays, u8, u16, u32 and u64 little-endian.

/// Reads an encoding from the front of a slice.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "truncated: {n} more bytes expected, {} left",
                self.bytes.len()
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The next byte.
    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    /// The next u16 little-endian.
    pub(crate) fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// The next u32 little-endian.
    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// The next u64 little-endian.
    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// How many bytes are left.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// Refuses trailing bytes.
    pub(crate) fn finish(&self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.bytes.len()))
        }
    }
}

/// Appends `n` as u32 little-endian. Every count and length written with it was checked
/// against a limit far below `u32::MAX` (saturates otherwise).
pub(crate) fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}
