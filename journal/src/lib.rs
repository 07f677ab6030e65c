//! The durable journal of concord.
//!
//! Every decision concord makes — "transaction X commits, with this redo" — is a **record** in the
//! journal, and it counts only once the record is durable. The journal is therefore the single
//! source of truth: recovery re-drives what it says, replication ships it, a standby replays it. It
//! must be correct under a crash at any instant and fast when hundreds of transactions commit at
//! once.
//!
//! The idea in four parts:
//!
//! * **Records in segments.** A record is framed with its length, a crc32, its LSN, its epoch, its
//!   kind and payload version, and a blake3 **chain** value that hashes the previous chain value
//!   with this record ([`record`]). LSNs are contiguous. Records live in segment files of bounded
//!   size, each named by its first LSN and starting with a header that holds the chain value before
//!   it ([`segment`]), so whole segments below a checkpoint can be deleted.
//! * **Group commit.** Appenders queue their records; one flusher thread writes each batch and
//!   syncs once, and every appender learns its LSN only when its record is durable ([`Journal`],
//!   [`Appending`]). A failed write or sync poisons the journal for good in this process.
//! * **Recovery.** Opening scans every segment; an unfinished write at the very end (a torn tail)
//!   is truncated, while damage to history that was durable refuses to open, naming file and offset
//!   ([`scan`]).
//! * **Blobs.** Large payloads are stored beside the journal, content-addressed by blake3, streamed
//!   through bounded memory and durable before any record may name them ([`blob`]).
//!
//! The journal performs blocking I/O on its own thread and has no async runtime; an [`Appending`]
//! is a `std` future, so async callers await it without the journal knowing which runtime runs
//! them. The payloads are opaque here: the layers above own what the kinds mean.
//!
//! The on-disk format and the crash analysis are written down in `docs/journal-format.md`.
//!
//! # Implementation caveats
//!
//! * One process owns a journal directory at a time (`LOCK`, an advisory `flock`); reading with
//!   [`scan::scan_dir`] takes no lock and may see a tail that is still being written.
//! * A journal starts at LSN 1 with the genesis chain, unless a new one is seeded at a position
//!   of another journal's history ([`JournalConfig::start_after`], for a re-seeded standby).
//! * A standby copies shipped records with [`Journal::append_verbatim`] and waits with
//!   [`Journal::wait_durable`]; an old primary cuts its diverged history with
//!   [`Journal::truncate_after`] on the closed directory.

pub mod blob;
pub mod clean;
mod config;
mod error;
mod journal;
pub mod metrics;
mod reader;
pub mod record;
pub mod scan;
pub mod segment;
mod types;

pub use blob::{BlobConfig, BlobId, BlobReader, BlobStore, StoredBlob};
pub use config::{JournalConfig, StartPosition};
pub use error::{ErrorClass, JournalError, Result};
pub use journal::{Appending, Journal, JournalStats, Truncated, WaitDurable};
pub use reader::JournalReader;
pub use types::{ChainHash, Epoch, Lsn, Record, RecordKind};
