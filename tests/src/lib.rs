//! The harness of concord's cross-process replication tests: a primary daemon, a standby, their
//! stores, a fault proxy between them, a workload and a checker — real processes, real signals,
//! real PostgreSQL (one throwaway cluster per site).
//!
//! A test makes a temporary root and in it two [`site::Site`]s: the primary (`concord
//! coordinator` with a `[replication]` table) and the standby (`concord standby` with a
//! `[standby]` table naming the primary, or the [`proxy::FaultProxy`] in front of it). It runs a
//! [`workload::Workload`] through the primary, which records every acknowledged transaction,
//! and injects faults: SIGKILL, SIGSTOP/SIGCONT, a cut or blackholed link. At the end
//! [`check::wait_caught_up`] waits until the standby has replayed what the primary made
//! durable, both processes stop, and [`check::assert_sites_equal`] compares the stores
//! resource by resource and key by key.
//!
//! Modules:
//! * [`process`] — finding the `concord` binary, starting a daemon and waiting for its
//!   `listening on ADDR` line, signals;
//! * [`site`] — a site's configuration, PostgreSQL setup and process;
//! * [`proxy`] — the fault proxy (tokio, loopback only);
//! * [`workload`] — the concurrent committing tasks and what they saw acknowledged;
//! * [`check`] — the offline per-key comparison and the catch-up wait;
//! * [`netns`] — the failover lab: network namespaces joined by a router, partitions with
//!   nftables, processes and threads inside a namespace;
//! * [`etcd`] and [`witness`] — the two quorum stores as processes, stopped and started again;
//! * [`stress`] — CPU and disk saturation with stress-ng;
//! * [`pair`] — a failover pair (two nodes with `[failover]`, the witness or etcd, a workload
//!   that follows the primary, the check that every acknowledged commit survived).
//!
//! Running them: `cargo build -p concord-cli && cargo test -p concord-tests --test replication`.
//! The tests run the binary that is there (`$CONCORD_BIN`, else `target/debug/concord`):
//! `cargo test -p concord-tests` alone does not rebuild it, the workspace's `cargo test` does
//! (the cli crate's integration tests need it).
//!
//! Implementation caveats: the harness panics with a message rather than returning errors —
//! it is test code, and a panic is a failed test with its reason; random choices take a seed
//! the test prints ([`seed`]).

#![allow(clippy::expect_used)]

pub mod check;
pub mod etcd;
pub mod netns;
pub mod pair;
pub mod process;
pub mod proxy;
pub mod site;
pub mod stress;
pub mod witness;
pub mod workload;

/// A seed for a test's random choices: `$CONCORD_TEST_SEED`, else from the clock; printed, so
/// that a failure can be run again with the same choices.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CONCORD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (CONCORD_TEST_SEED={seed} repeats it)");
    seed
}

/// A small deterministic generator (xorshift64*) for a test's random delays.
pub struct Rng(u64);

impl Rng {
    /// Seeded with `seed` (0 is replaced by a constant).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..high` (`high > low`).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low)
    }
}
