//! A 1 GiB file goes through a files branch in bounded memory: streamed from a generating
//! `AsyncRead` into staging, prepared (adopted into the blob store), committed, and read back
//! and hashed, with the peak resident set (`VmHWM`) of this process — alone in this test binary,
//! so nothing else inflates it — kept under 64 MiB.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use adapters::files::{FilesConfig, FilesResource, RedoEntry, decode_redo};
use adapters::{Epoch, Resource, Vote, Xid};
use common::{hash_all, peak_resident_bytes};
use journal::BlobId;
use tokio::io::{AsyncRead, ReadBuf};

/// Size of the file.
const FILE_BYTES: u64 = 1 << 30;
/// Peak resident memory allowed for the whole test process.
const RESIDENT_BYTES_MAX: u64 = 64 << 20;
/// Size of the generator's table and of its blocks.
const BLOCK_BYTES: usize = 64 << 10;
/// Buffer size of the hashing loops here.
const BUF_BYTES: usize = 1 << 20;

/// A deterministic stream of pseudo-random bytes that never holds more than one 64 KiB table:
/// block `k` is the table rotated by a multiple of `k`, with `k` stamped over its first bytes.
struct Generator {
    table: Vec<u8>,
    pos: u64,
    len: u64,
}

impl Generator {
    fn new(seed: u64, len: u64) -> Generator {
        let mut x = seed | 1;
        let table = (0..BLOCK_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Generator { table, pos: 0, len }
    }

    /// Fills `out` (at most to the end of the current block) from `self.pos` and advances.
    fn produce(&mut self, out: &mut [u8]) -> usize {
        let in_block = BLOCK_BYTES - (self.pos % BLOCK_BYTES as u64) as usize;
        let n = (out.len() as u64)
            .min(self.len - self.pos)
            .min(in_block as u64) as usize;
        let out = &mut out[..n];
        let block = self.pos / BLOCK_BYTES as u64;
        let offset = (self.pos % BLOCK_BYTES as u64) as usize;
        let rotation = (block.wrapping_mul(40_503) % BLOCK_BYTES as u64) as usize;
        let start = (offset + rotation) % BLOCK_BYTES;
        let first = n.min(BLOCK_BYTES - start);
        out[..first].copy_from_slice(&self.table[start..start + first]);
        out[first..].copy_from_slice(&self.table[..n - first]);
        let stamp = block.to_le_bytes();
        for (i, byte) in out
            .iter_mut()
            .enumerate()
            .take(8usize.saturating_sub(offset))
        {
            *byte ^= stamp[offset + i];
        }
        self.pos += n as u64;
        n
    }
}

impl AsyncRead for Generator {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.produce(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// The hash of the generator's stream, computed without the resource.
fn expected_hash() -> BlobId {
    let mut generator = Generator::new(42, FILE_BYTES);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF_BYTES];
    loop {
        match generator.produce(&mut buf) {
            0 => return BlobId(*hasher.finalize().as_bytes()),
            n => {
                hasher.update(&buf[..n]);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_file_streams_through_a_branch_in_bounded_memory() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = FilesConfig {
        create_if_missing: true,
        file_bytes_max: 2 << 30,
        ..FilesConfig::default()
    };
    let r = FilesResource::open("files", dir.path(), config).unwrap();
    let xid = Xid {
        node: 1,
        epoch: Epoch(0),
        seq: 1,
    };
    r.begin(&xid).await.unwrap();

    let put = r
        .branch(&xid)
        .put("big/one-gib.bin", Generator::new(42, FILE_BYTES))
        .await
        .unwrap();
    assert_eq!(put, FILE_BYTES);
    let Vote::Commit { redo } = r.prepare(&xid).await.unwrap() else {
        panic!("a branch that wrote 1 GiB voted read-only")
    };
    r.commit(&xid).await.unwrap();

    let expected = expected_hash();
    assert_eq!(
        decode_redo(&redo).unwrap(),
        vec![RedoEntry::Put {
            path: "big/one-gib.bin".into(),
            id: expected,
            bytes: FILE_BYTES
        }]
    );
    let file = std::fs::File::open(r.root().join("big/one-gib.bin")).unwrap();
    assert_eq!(hash_all(file), (expected, FILE_BYTES));

    let peak = peak_resident_bytes();
    println!(
        "1 GiB file: peak resident {:.1} MiB, {:.1} s",
        peak as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak < RESIDENT_BYTES_MAX,
        "peak resident memory {peak} bytes is over {RESIDENT_BYTES_MAX}: a 1 GiB file was not \
         streamed in bounded memory"
    );
}
