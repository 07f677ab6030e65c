//! Helpers the resources' test binaries share: fresh xids, the reason of a refusal, the hash of
//! a stream, and the peak resident set of the process.
//!
//! Each test binary includes this module (`mod common;`) and uses only some of it.

// Each binary uses a part of this module; a test fails by panicking, helpers included.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

use adapters::{Epoch, ErrorClass, ResourceError, Xid};
use journal::BlobId;

static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// A fresh xid of node 1 at `epoch` (unique in this process).
pub fn xid_at(epoch: u64) -> Xid {
    Xid {
        node: 1,
        epoch: Epoch(epoch),
        seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
    }
}

/// The message of a `Rejected` error; panics on any other result.
#[track_caller]
pub fn rejected<T: std::fmt::Debug>(result: Result<T, ResourceError>) -> String {
    match result {
        Err(e @ ResourceError::Rejected { .. }) => {
            assert_eq!(e.class(), ErrorClass::Rejected);
            e.to_string()
        }
        other => panic!("expected a Rejected error, got {other:?}"),
    }
}

/// The blake3 hash and size of everything `r` yields, through one buffer of 1 MiB.
pub fn hash_all(mut r: impl Read) -> (BlobId, u64) {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf).unwrap() {
            0 => return (BlobId(*hasher.finalize().as_bytes()), total),
            n => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
}

/// Peak resident set size of this process, from `/proc/self/status`.
pub fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("/proc/self/status has no VmHWM line");
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}
