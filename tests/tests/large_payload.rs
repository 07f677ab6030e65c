//! A 1 GiB file through replication: committed on the primary by a remote client (streamed),
//! shipped to the standby with the link cut in the middle of its blob, resumed there, and
//! replayed — with the peak memory (VmHWM) of the primary and of the standby under 128 MiB
//! each, and the sites equal at the end (the file compared by blake3).
//!
//! It writes about 4 GiB of temporary files (the primary's staged content and blob, the
//! standby's partial blob, its blob and the replayed file) and holds the file's content in
//! this test process while it commits it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use concord_tests::check;
use concord_tests::process::wait_until;
use concord_tests::proxy::{FaultProxy, Link};
use concord_tests::site::{Mode, Site};
use concord_tests::{seed, workload};

/// The file's size.
const FILE_BYTES: usize = 1 << 30;
/// Where the proxy cuts the link: this far into what it forwards after the standby caught up
/// (in the middle of the blob).
const CUT_AFTER_BYTES: u64 = 512 << 20;
/// The bound on each process's peak memory.
const PEAK_BYTES_MAX: u64 = 128 << 20;
/// How long the commit and the cut may take.
const COMMIT_MS_MAX: u64 = 600_000;
/// How long the standby may take to see the cut.
const DISCONNECT_SEEN_MS_MAX: u64 = 30_000;

/// The peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmHWM line");
    kib * 1024
}

#[test]
fn a_1_gib_file_reaches_the_standby_through_a_cut_in_bounded_memory() {
    let root = tempfile::tempdir().unwrap();
    let (mut primary, mut standby) = sites(root.path());
    let proxy = FaultProxy::start(primary.addr());
    standby.start_standby(&proxy.url());
    check::wait_caught_up(&primary, &standby);
    proxy.cut_after(CUT_AFTER_BYTES);
    let url = primary.url();
    let seed = seed("a_1_gib_file_reaches_the_standby_through_a_cut_in_bounded_memory");
    let commit =
        std::thread::spawn(move || workload::commit_file(&url, "big/one-gib", seed, FILE_BYTES));
    let cut = wait_until(COMMIT_MS_MAX, || proxy.link() == Link::Cut);
    assert!(
        cut,
        "the blob did not reach {CUT_AFTER_BYTES} bytes through the proxy"
    );
    let seen = wait_until(DISCONNECT_SEEN_MS_MAX, || check::is_disconnected(&standby));
    assert!(
        seen,
        "the standby did not see the cut: {:?}",
        standby.status()
    );
    proxy.restore();
    let xid = commit.join().expect("the commit thread");
    assert!(xid.is_ok(), "the 1 GiB commit failed: {xid:?}");
    check::wait_caught_up(&primary, &standby);
    let offset = check::resumed_blob_offset(&standby);
    assert!(
        offset.is_some_and(|at| at > 0),
        "the standby did not resume the blob past its start ({offset:?}): {}",
        standby.process().stderr_tail()
    );
    for (site, name) in [(&primary, "primary"), (&standby, "standby")] {
        let peak = peak_bytes(site.process().pid());
        eprintln!("{name}: peak memory {} MiB", peak >> 20);
        assert!(
            peak < PEAK_BYTES_MAX,
            "the {name}'s peak memory is {} MiB, over {} MiB",
            peak >> 20,
            PEAK_BYTES_MAX >> 20
        );
    }
    check::compare_online(&primary, &standby);
    standby.stop();
    primary.stop();
    check::assert_sites_equal(&primary, &standby);
}

/// A primary (started) and a standby (not started) in `root`, without PostgreSQL.
fn sites(root: &Path) -> (Site, Site) {
    let mut primary = Site::primary(root, "primary", Mode::Async, false);
    primary.start_primary();
    let standby = Site::standby(root, "standby", false);
    (primary, standby)
}
