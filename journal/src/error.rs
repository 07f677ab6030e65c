//! The journal's one error type, sorted by what the caller must do.
//!
//! * **Rejected** — the request or the directory is not acceptable; nothing durable was changed.
//!   Fix the input (or the directory) and try again.
//! * **Corrupt** — the bytes on disk are damaged in a way the journal will not repair by itself;
//!   a person must look. The error names the file and the byte offset.
//! * **Fatal** — a write or sync failed. The journal is poisoned: every later call fails, and the
//!   owner must restart the process, which recovers from what is durable. Never retried.

use std::io;
use std::path::PathBuf;

use crate::types::{ChainHash, Epoch, Lsn};

/// What the caller must do about a [`JournalError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad input or an unusable directory; nothing durable changed. Correct it and retry.
    Rejected,
    /// Damage on disk that needs a person.
    Corrupt,
    /// The journal can no longer be trusted in this process: restart and recover.
    Fatal,
}

/// Everything that can go wrong in the journal and the blob store.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A record payload is larger than `record_bytes_max` allows. Nothing was appended.
    #[error("record of {bytes} bytes is over the limit record_bytes_max = {max}")]
    RecordTooLarge {
        /// Size of the framed record that was offered.
        bytes: u64,
        /// The configured limit.
        max: u64,
    },
    /// An append carried an epoch lower than one the journal already accepted: the caller was
    /// fenced by a newer epoch and must stop writing.
    #[error(
        "epoch {offered} is lower than epoch {current} already in the journal; the writer is fenced"
    )]
    EpochRegressed {
        /// The epoch of the refused append.
        offered: Epoch,
        /// The highest epoch accepted so far.
        current: Epoch,
    },
    /// A verbatim record does not carry the next LSN of this journal: records were skipped or
    /// repeated. Nothing was appended; ship from the expected LSN.
    #[error(
        "verbatim record has lsn {got}, but this journal's next lsn is {expected}; ship records \
         from lsn {expected}"
    )]
    LsnGap {
        /// The LSN this journal appends next.
        expected: Lsn,
        /// The LSN the record carries.
        got: Lsn,
    },
    /// A verbatim record's chain value is not the one this journal computes from its own last
    /// chain value and the record: the two journals hold different histories. Nothing was
    /// appended; find where they diverged (the last LSN whose chain values agree) and truncate
    /// this journal there.
    #[error(
        "verbatim record {lsn} does not continue this journal's chain (this journal computes \
         {expected}, the record carries {got}): the journals diverged at or before lsn {lsn}; \
         find the divergence point and truncate after it"
    )]
    ChainMismatch {
        /// The LSN of the refused record.
        lsn: Lsn,
        /// The chain value this journal computes for it.
        expected: ChainHash,
        /// The chain value it carries.
        got: ChainHash,
    },
    /// A truncation asked to keep records this journal does not hold.
    #[error(
        "cannot truncate after lsn {requested}: the journal ends at lsn {last} (nothing was \
         changed)"
    )]
    TruncateBeyondEnd {
        /// The LSN asked for.
        requested: Lsn,
        /// The last LSN in the journal.
        last: Lsn,
    },
    /// Content received for a blob does not hash to the id it was sent under. Nothing was stored;
    /// fetch it again from its source.
    #[error(
        "blob content sent as {expected} hashes to {actual}; nothing was stored, fetch it again"
    )]
    BlobMismatch {
        /// The id it was sent under.
        expected: String,
        /// What the content hashes to.
        actual: String,
    },
    /// The configuration is inconsistent (for example a record limit larger than a segment).
    #[error("invalid journal configuration: {0}")]
    InvalidConfig(String),
    /// The journal directory does not exist and creating it was not asked for.
    #[error(
        "journal directory {path} does not exist; create it or pass the option that creates it"
    )]
    DirMissing {
        /// The directory.
        path: PathBuf,
    },
    /// The journal path exists but is not a directory.
    #[error("journal path {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The process may not read or write the directory or a file in it.
    #[error("permission denied on {path}: the journal needs read and write access ({source})")]
    PermissionDenied {
        /// The path that was refused.
        path: PathBuf,
        /// The operating system's answer.
        source: io::Error,
    },
    /// The directory holds a file the journal did not write; it refuses to guess what it is.
    #[error(
        "journal directory holds a foreign file {path}; move it away (the journal keeps only \
         NNNNNNNNNNNNNNNNNNNN.seg files and LOCK)"
    )]
    ForeignFile {
        /// The unexpected entry.
        path: PathBuf,
    },
    /// Another process holds the journal open.
    #[error("{path} is locked by another process, which has the journal open; stop it first")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A segment was written by a newer format version than this program reads.
    #[error(
        "segment {path} has format version {found}, this program reads up to {supported}; \
         run a newer concord"
    )]
    UnsupportedFormat {
        /// The segment file.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The newest version this program understands.
        supported: u32,
    },
    /// A read asked for an LSN whose segment was already deleted by a checkpoint.
    #[error("lsn {requested} is no longer retained; the oldest retained lsn is {oldest}")]
    LsnNotRetained {
        /// The LSN asked for.
        requested: Lsn,
        /// The first LSN still on disk.
        oldest: Lsn,
    },
    /// A blob is larger than `blob_bytes_max`. Nothing was stored.
    #[error("blob is over the limit blob_bytes_max = {max} bytes")]
    BlobTooLarge {
        /// The configured limit.
        max: u64,
    },
    /// No blob with this id is stored.
    #[error("blob {id} not found")]
    BlobNotFound {
        /// The blob id (hex).
        id: String,
    },
    /// An id string is not 64 hex digits.
    #[error("{0:?} is not a blob id (64 hex digits)")]
    BadBlobId(String),
    /// A whole, intact record on disk is larger than the `record_bytes_max` the journal was opened
    /// with: it was written with a larger limit. Nothing was changed; open it with a limit at least
    /// as large.
    #[error(
        "record in segment {segment} at byte offset {offset} is {bytes} bytes, over \
         record_bytes_max = {max}; it was written with a larger limit: open the journal with \
         record_bytes_max of at least {bytes}"
    )]
    RecordOverLimit {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// Its framed size.
        bytes: u64,
        /// The limit the journal was opened with.
        max: u64,
    },
    /// A record or segment on disk failed its checks in the middle of the journal (not a torn
    /// tail). The journal refuses to open; the file and offset say where to look.
    #[error("journal corrupt in segment {segment} at byte offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the damaged record or header in that file.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// A stored blob does not hash to its id.
    #[error("blob {id} at {path} is corrupt: its content hashes to {actual}")]
    BlobCorrupt {
        /// The id it is stored under.
        id: String,
        /// Where it is stored.
        path: PathBuf,
        /// What its content hashes to.
        actual: String,
    },
    /// The file system is full. When this happens on the append path the journal is poisoned.
    #[error("no space left on the device holding {path}; free space, then restart")]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// A write or sync failed earlier; the journal accepts nothing more in this process.
    #[error("journal poisoned by an earlier failure ({cause}); restart the process to recover")]
    Poisoned {
        /// What failed first.
        cause: String,
    },
    /// The journal was closed.
    #[error("journal closed")]
    Closed,
    /// Any other I/O failure, with what was being done.
    #[error("{action} {path}: {source}")]
    Io {
        /// Verb and object, e.g. "sync journal segment".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's answer.
        source: io::Error,
    },
}

impl JournalError {
    /// What the caller must do about this error.
    pub fn class(&self) -> ErrorClass {
        use JournalError::*;
        match self {
            Corrupt { .. } | BlobCorrupt { .. } => ErrorClass::Corrupt,
            Poisoned { .. } | DiskFull { .. } | Io { .. } | Closed => ErrorClass::Fatal,
            _ => ErrorClass::Rejected,
        }
    }

    /// An I/O error with context; full disks and permission problems get their own variants.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.kind() {
            io::ErrorKind::StorageFull => JournalError::DiskFull { path },
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                JournalError::PermissionDenied { path, source }
            }
            _ => JournalError::Io {
                action,
                path,
                source,
            },
        }
    }

    pub(crate) fn corrupt(
        segment: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        JournalError::Corrupt {
            segment: segment.into(),
            offset,
            reason: reason.into(),
        }
    }
}

/// Result with a [`JournalError`].
pub type Result<T, E = JournalError> = std::result::Result<T, E>;
