//! A 1 GiB blob goes through the blob store in bounded memory: streamed in from a generating
//! reader, read back and compared, with the peak resident set (`VmHWM`) of this process — alone in
//! this test binary, so nothing else inflates it — kept under 64 MiB.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Read};

use journal::{BlobConfig, BlobId, BlobStore};

/// Size of the blob.
const BLOB_BYTES: u64 = 1 << 30;
/// Peak resident memory allowed for the whole test process.
const RESIDENT_BYTES_MAX: u64 = 64 << 20;
/// Size of the generator's table and of its blocks.
const BLOCK_BYTES: usize = 64 << 10;
/// Buffer size of the comparing and hashing loops here.
const BUF_BYTES: usize = 1 << 20;

/// A deterministic stream of pseudo-random bytes that never holds more than one 64 KiB table.
///
/// Block `k` of the stream is the table rotated by a multiple of `k`, with `k` stamped over its
/// first eight bytes, so no two blocks are equal and any window can be produced on demand.
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

    /// Fills `out` with the stream from `self.pos` within one block.
    fn fill_in_block(&self, out: &mut [u8]) {
        let block = self.pos / BLOCK_BYTES as u64;
        let offset = (self.pos % BLOCK_BYTES as u64) as usize;
        let rotation = (block.wrapping_mul(40_503) % BLOCK_BYTES as u64) as usize;
        let start = (offset + rotation) % BLOCK_BYTES;
        let first = out.len().min(BLOCK_BYTES - start);
        out[..first].copy_from_slice(&self.table[start..start + first]);
        let rest = out.len() - first;
        out[first..].copy_from_slice(&self.table[..rest]);
        let stamp = block.to_le_bytes();
        for (i, byte) in out
            .iter_mut()
            .enumerate()
            .take(8usize.saturating_sub(offset))
        {
            *byte ^= stamp[offset + i];
        }
    }
}

impl Read for Generator {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len - self.pos;
        let in_block = BLOCK_BYTES - (self.pos % BLOCK_BYTES as u64) as usize;
        let n = (buf.len() as u64).min(left).min(in_block as u64) as usize;
        self.fill_in_block(&mut buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads `r` to the end in `BUF_BYTES` pieces, handing each to `f`; returns the byte count.
fn stream(mut r: impl Read, mut f: impl FnMut(&[u8])) -> io::Result<u64> {
    let mut buf = vec![0u8; BUF_BYTES];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        f(&buf[..n]);
        total += n as u64;
    }
}

/// Reads exactly `buf.len()` bytes (or fewer at the end) from `r`.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).unwrap() {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

/// Peak resident set size of this process, from `/proc/self/status`.
fn peak_resident_bytes() -> u64 {
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

#[test]
fn a_one_gib_blob_streams_through_the_store_in_bounded_memory() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(
        dir.path(),
        BlobConfig {
            create_if_missing: true,
            ..BlobConfig::default()
        },
    )
    .unwrap();
    let peak_before = peak_resident_bytes();

    let stored = store.put(Generator::new(42, BLOB_BYTES)).unwrap();
    assert_eq!(stored.bytes, BLOB_BYTES);

    // The id is the blake3 hash of the content, computed here without the store.
    let mut hasher = blake3::Hasher::new();
    let hashed = stream(Generator::new(42, BLOB_BYTES), |b| {
        hasher.update(b);
    })
    .unwrap();
    assert_eq!(hashed, BLOB_BYTES);
    assert_eq!(stored.id, BlobId(*hasher.finalize().as_bytes()));

    // Read back: every byte equals the generator's, and the reader's own hash check passes.
    let mut reader = store.open_blob(&stored.id).unwrap();
    let mut expected = Generator::new(42, BLOB_BYTES);
    let mut want = vec![0u8; BUF_BYTES];
    let mut got = vec![0u8; BUF_BYTES];
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut reader, &mut got);
        if n == 0 {
            let m = read_full(&mut expected, &mut want[..1]);
            assert_eq!(m, 0, "the stored blob is shorter than what was written");
            break;
        }
        let m = read_full(&mut expected, &mut want[..n]);
        assert_eq!(m, n, "the stored blob is longer than what was written");
        assert!(
            got[..n] == want[..n],
            "content differs within 1 MiB of byte {offset}"
        );
        offset += n as u64;
    }
    assert_eq!(offset, BLOB_BYTES);

    let peak = peak_resident_bytes();
    assert!(store.remove(&stored.id).unwrap());
    assert!(!store.contains(&stored.id));
    println!(
        "1 GiB blob: peak resident {:.1} MiB (before the blob: {:.1} MiB), {:.1} s",
        peak as f64 / (1 << 20) as f64,
        peak_before as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak < RESIDENT_BYTES_MAX,
        "peak resident memory {peak} bytes is over {RESIDENT_BYTES_MAX}: a 1 GiB blob was not \
         streamed in bounded memory"
    );
}
