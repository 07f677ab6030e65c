//! Machinery the files, mail and kv resources share, written once.
//!
//! The three resources were written side by side and follow one shape: an `Inner` holding a
//! name and a state behind a mutex, poisoned by the first fatal failure and checked against a
//! fence epoch on every call; blocking work run on tokio's blocking pool; small durable state
//! files with a checksum; locks that a second writer waits on for a bounded time; and (files
//! and mail) a branch log over a [`journal::Journal`] and redo encodings read with a bounds-
//! checked reader. What is the same logic in each lives here; what only looks alike stays with
//! its resource, with a line saying why.
//!
//! * [`branches`] — the table of branches and the phases every branch goes through (active,
//!   being prepared, prepared, being resolved), with their refusals and the read-only votes.
//! * [`collect`] — blob collection: the adoption lock, the blobs adopted meanwhile, the steps.
//! * [`instance`] — the poison and fence checks and the error constructors of an `Inner`
//!   (the [`instance::Instance`] trait).
//! * [`io`] — blocking-pool work, reading a stream into a buffer, file and directory helpers,
//!   the private area's `LOCK`, and the classification of blob store and branch log errors.
//! * [`state_file`] — the checksummed one-value files (`fence`, `applied_lsn`).
//! * [`locks`] — waiting for a lock another branch holds, up to a bound, then a conflict.
//! * [`lifecycle`] — the branch lifecycle (begin, prepare, resolve, fence, replay) with the
//!   per-resource hooks of its [`lifecycle::Lifecycle`] trait.
//! * [`branch_log`] — the branch log's record kinds, payloads and open/scan, and waiting for a
//!   resolution record.
//! * [`pauses`] — pauses a test arms inside an operation, to run a race deterministically.
//! * [`shipping`] — blobs shipped from one instance's store into another's.
//! * [`reseed`] — re-seeding a standby key by key: the shells of `read_entry`, `write_entry`,
//!   `remove_entry` and `set_applied_lsn`, with the per-resource hooks of [`reseed::Reseed`].
//! * [`reader`] — the bounds-checked reader of the byte encodings (redo, batch).
//!
//! # Implementation caveats
//!
//! * Everything here is crate-private; no public API or on-disk format is defined here that
//!   the resources' own docs do not already describe.

pub(crate) mod branch_log;
pub(crate) mod branches;
pub(crate) mod collect;
pub(crate) mod instance;
pub(crate) mod io;
pub(crate) mod lifecycle;
pub(crate) mod locks;
pub(crate) mod pauses;
pub(crate) mod reader;
pub(crate) mod reseed;
pub(crate) mod shipping;
pub(crate) mod state_file;
