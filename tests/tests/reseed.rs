//! Re-seeding a standby through real processes: a new standby of a primary whose journal no
//! longer starts at LSN 1 is told to re-seed and changes nothing; `concord standby --reseed`
//! then copies the primary's stores key by key *while the workload keeps committing* (the copy
//! is fuzzy; replay from the position the primary gave makes it exact), and the sites end equal,
//! PostgreSQL rows included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use concord_tests::check;
use concord_tests::process::wait_until;
use concord_tests::site::{Mode, Site};
use concord_tests::workload::{Workload, WorkloadSpec};

/// Workload tasks.
const TASKS: u64 = 4;
/// How long the primary may take to remove its first segments, and the standby to refuse.
const WAIT_MS_MAX: u64 = 120_000;
/// How long the re-seed may take (one round trip and one synced write per key).
const RESEED_MS_MAX: u64 = 300_000;

#[test]
fn a_standby_told_to_reseed_is_reseeded_under_load_and_ends_equal() {
    let root = tempfile::tempdir().unwrap();
    let mut primary = Site::primary(root.path(), "primary", Mode::Async, true);
    primary.start_primary();
    let workload = Workload::start(WorkloadSpec::against(&primary, TASKS));
    // No standby holds the floor: the checkpoint removes the first segments once finished
    // records fill them (the coordinator rolls to a new segment at 1 MiB).
    let trimmed = wait_until(WAIT_MS_MAX, || {
        primary
            .process()
            .stderr_text()
            .contains("removed journal segment")
    });
    assert!(
        trimmed,
        "the primary removed no segment: {}",
        primary.process().stderr_tail()
    );

    let mut standby = Site::standby(root.path(), "standby", true);
    standby.launch_standby(&primary.url());
    let refused = wait_until(WAIT_MS_MAX, || {
        standby.process().stderr_text().contains("reseed_required")
            || standby
                .process()
                .stderr_text()
                .contains("must be re-seeded")
    });
    assert!(
        refused,
        "the standby did not say it must be re-seeded: {}",
        standby.process().stderr_tail()
    );
    standby.stop();

    standby.start_standby_with(&primary.url(), &["--reseed"], RESEED_MS_MAX);
    let said = standby.process().stdout_text();
    assert!(
        said.contains("re-seeded from"),
        "no re-seed summary: {said}"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let report = workload.stop();
    assert!(
        !report.acked.is_empty(),
        "nothing committed: {:?}",
        report.failures
    );
    check::wait_caught_up(&primary, &standby);
    check::compare_online(&primary, &standby);
    standby.stop();
    primary.stop();
    check::assert_sites_equal(&primary, &standby);
}
