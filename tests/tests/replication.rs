//! Journal shipping and standby replay through real processes: a primary daemon and a standby,
//! each with its own stores and its own PostgreSQL cluster, under a workload, while the test
//! kills, pauses and cuts them. At the end the standby must have replayed what the primary made
//! durable, and both sites must be equal key by key (`concord_tests::check`).
//!
//! The tests run one at a time ([`SERIAL`]): each starts two PostgreSQL clusters and two
//! daemons, and the machine is small. Random delays come from a printed seed
//! (`CONCORD_TEST_SEED` repeats a run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use concord_tests::check::{self, Snapshot, is_disconnected, resumed_blob_offset};
use concord_tests::process::wait_until;
use concord_tests::proxy::{FaultProxy, Link};
use concord_tests::site::{Mode, Site};
use concord_tests::workload::{self, Acked, Report, Workload, WorkloadSpec};
use concord_tests::{Rng, seed};

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Workload tasks.
const TASKS: u64 = 4;
/// How long a standby may take to notice a cut link and say `connected: false`.
const DISCONNECT_SEEN_MS_MAX: u64 = 30_000;
/// How long a refusing standby has to exit or say why.
const REFUSAL_MS_MAX: u64 = 20_000;
/// How long the link to the sync standby is partitioned before the primary is killed: well
/// under the primary's `sync_wait_ms_max` (5000 by default), so no commit falls back to async.
const SYNC_PARTITION_MS: u64 = 300;
/// Commits the workload must reach in each phase, and the time it has for them.
const PHASE_COMMITS: u64 = 30;
const PHASE_MS_MAX: u64 = 60_000;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A primary (started) and a standby (not started) in `root`, both with PostgreSQL.
fn sites(root: &Path, mode: Mode) -> (Site, Site) {
    let mut primary = Site::primary(root, "primary", mode, true);
    primary.start_primary();
    let standby = Site::standby(root, "standby", true);
    (primary, standby)
}

/// Waits for the standby to catch up, runs `concord compare` online, stops both, runs it
/// offline, and compares their stores; also checks every acknowledged transaction is on the standby.
fn finish(primary: &mut Site, standby: &mut Site, report: &Report) -> (Snapshot, Snapshot) {
    assert!(
        !report.acked.is_empty(),
        "nothing was acknowledged: {:?}",
        report.failures
    );
    check::wait_caught_up(primary, standby);
    check::compare_online(primary, standby);
    standby.stop();
    primary.stop();
    check::compare_offline(primary, standby);
    let (p, s) = check::assert_sites_equal(primary, standby);
    assert_all_there(&s, &report.acked);
    eprintln!(
        "{} acknowledged, {} failed; {} mails, {} files on each site",
        report.acked.len(),
        report.failed,
        s.count("mail"),
        s.count("uploads")
    );
    (p, s)
}

fn assert_all_there(standby: &Snapshot, acked: &[Acked]) {
    let missing: Vec<String> = acked.iter().flat_map(|a| standby.missing(a)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes are not on the standby: {:#?}",
        missing.len(),
        &missing[..missing.len().min(40)]
    );
}

/// Waits until the workload has `more` commits beyond now.
fn commits_more(workload: &Workload, more: u64) {
    workload.wait_committed(workload.committed() + more, PHASE_MS_MAX);
}

#[test]
fn standby_killed_and_restarted_repeatedly() {
    let _serial = serial();
    let mut rng = Rng::new(seed("standby_killed_and_restarted_repeatedly"));
    let root = tempfile::tempdir().unwrap();
    let (mut primary, mut standby) = sites(root.path(), Mode::Async);
    standby.start_standby(&primary.url());
    let workload = Workload::start(WorkloadSpec::against(&primary, TASKS));
    commits_more(&workload, PHASE_COMMITS);
    for round in 0..5 {
        let delay = rng.range(50, 1_500);
        eprintln!("round {round}: SIGKILL the standby after {delay} ms");
        sleep_ms(delay);
        standby.kill();
        sleep_ms(rng.range(0, 300));
        standby.start_standby(&primary.url());
    }
    commits_more(&workload, PHASE_COMMITS);
    let report = workload.stop();
    finish(&mut primary, &mut standby, &report);
}

#[test]
fn link_cut_and_restored() {
    let _serial = serial();
    let mut rng = Rng::new(seed("link_cut_and_restored"));
    let root = tempfile::tempdir().unwrap();
    let (mut primary, mut standby) = sites(root.path(), Mode::Async);
    let proxy = FaultProxy::start(primary.addr());
    standby.start_standby(&proxy.url());
    let workload = Workload::start(WorkloadSpec::against(&primary, TASKS));
    commits_more(&workload, PHASE_COMMITS);
    for round in 0..3 {
        sleep_ms(rng.range(50, 1_000));
        eprintln!("round {round}: cut the link");
        cut_and_see_disconnected(&proxy, &standby);
        sleep_ms(rng.range(0, 500));
        proxy.restore();
    }
    cut_while_blob_in_flight(&primary, &standby, &proxy, &workload, rng.next_u64());
    eprintln!("blackhole the link until the standby sees it gone");
    proxy.blackhole();
    let seen = wait_until(DISCONNECT_SEEN_MS_MAX, || is_disconnected(&standby));
    proxy.restore();
    assert!(
        seen,
        "the standby still says connected {DISCONNECT_SEEN_MS_MAX} ms into a partition: {:?}",
        standby.status()
    );
    commits_more(&workload, PHASE_COMMITS);
    let report = workload.stop();
    finish(&mut primary, &mut standby, &report);
}

fn cut_and_see_disconnected(proxy: &FaultProxy, standby: &Site) {
    proxy.cut();
    let seen = wait_until(DISCONNECT_SEEN_MS_MAX, || is_disconnected(standby));
    assert!(
        seen,
        "the standby still says connected {DISCONNECT_SEEN_MS_MAX} ms after the cut: {:?}",
        standby.status()
    );
}

/// Holds the workload until the standby has everything, then commits an 8 MiB file with a cut
/// armed 2 MiB into what the proxy forwards next: into the file's blob. Once restored and
/// caught up, the standby must have resumed the blob past its first byte (its log line
/// "resuming an interrupted blob at byte N"), not started it over.
fn cut_while_blob_in_flight(
    primary: &Site,
    standby: &Site,
    proxy: &FaultProxy,
    workload: &Workload,
    seed: u64,
) {
    const BIG_BYTES: usize = 8 * 1024 * 1024 + 17;
    const CUT_AFTER_BYTES: u64 = 2 * 1024 * 1024;
    workload.hold();
    check::wait_caught_up(primary, standby);
    proxy.cut_after(CUT_AFTER_BYTES);
    let url = primary.url();
    let commit =
        std::thread::spawn(move || workload::commit_file(&url, "big/eight", seed, BIG_BYTES));
    let cut = wait_until(PHASE_MS_MAX, || proxy.link() == Link::Cut);
    assert!(
        cut,
        "the 8 MiB blob did not reach {CUT_AFTER_BYTES} bytes through the proxy"
    );
    eprintln!("the link is cut with the 8 MiB blob in flight");
    let seen = wait_until(DISCONNECT_SEEN_MS_MAX, || is_disconnected(standby));
    assert!(
        seen,
        "the standby still says connected after the cut: {:?}",
        standby.status()
    );
    proxy.restore();
    let xid = commit.join().expect("the commit thread");
    assert!(xid.is_ok(), "the 8 MiB commit failed: {xid:?}");
    check::wait_caught_up(primary, standby);
    let offset = resumed_blob_offset(standby);
    assert!(
        offset.is_some_and(|at| at > 0),
        "the standby did not resume the interrupted blob past its start ({offset:?}): {}",
        standby.process().stderr_tail()
    );
    eprintln!("the standby resumed the 8 MiB blob at byte {offset:?}");
    workload.release();
}

/// The offset of the standby's last "resuming an interrupted blob at byte N" line.
#[test]
fn replay_killed_at_random_points() {
    let _serial = serial();
    let mut rng = Rng::new(seed("replay_killed_at_random_points"));
    let root = tempfile::tempdir().unwrap();
    let (mut primary, mut standby) = sites(root.path(), Mode::Async);
    standby.start_standby(&primary.url());
    let workload = Workload::start(WorkloadSpec::against(&primary, TASKS));
    commits_more(&workload, PHASE_COMMITS);
    for round in 0..4 {
        standby.pause();
        commits_more(&workload, 2 * PHASE_COMMITS);
        standby.resume();
        let delay = rng.range(0, 400);
        eprintln!("round {round}: a backlog; SIGKILL the standby {delay} ms into its replay");
        sleep_ms(delay);
        standby.kill();
        standby.start_standby(&primary.url());
    }
    let report = workload.stop();
    let (p, s) = finish(&mut primary, &mut standby, &report);
    assert_eq!(p.count("mail"), s.count("mail"), "every mail exactly once");
    assert!(s.count("mail") >= report.acked.len());
}

#[test]
fn sync_mode_loses_no_acknowledged_commit() {
    let _serial = serial();
    let mut rng = Rng::new(seed("sync_mode_loses_no_acknowledged_commit"));
    let root = tempfile::tempdir().unwrap();
    let (mut primary, mut standby) = sites(root.path(), Mode::Sync);
    let proxy = FaultProxy::start(primary.addr());
    standby.start_standby(&proxy.url());
    let workload = Workload::start(WorkloadSpec::against(&primary, TASKS));
    commits_more(&workload, PHASE_COMMITS);
    let status = primary.status().expect("the primary's status");
    assert_eq!(status["role"], "primary", "{status}");
    assert_eq!(status["replication"]["mode"], "sync", "{status}");
    // "waiting" is sync with a commit waiting for the standby at that moment; either way the
    // primary has not fallen back to async.
    let state = status["replication"]["sync_state"].as_str();
    assert!(matches!(state, Some("sync" | "waiting")), "{status}");
    sleep_ms(rng.range(0, 1_000));
    // The link partitioned first, then cut: what the primary sends meanwhile never reaches
    // the standby, so an async primary would have acknowledged commits only it has.
    proxy.blackhole();
    sleep_ms(SYNC_PARTITION_MS);
    eprintln!("SIGKILL the primary at {} commits", workload.committed());
    primary.kill();
    proxy.cut();
    let report = workload.stop();
    assert!(!report.acked.is_empty(), "{:?}", report.failures);
    wait_replayed_own_journal(&standby);
    let status = standby.status().expect("the standby's status");
    assert_eq!(status["role"], "standby", "{status}");
    standby.stop();
    let snapshot = Snapshot::take(&standby);
    assert_all_there(&snapshot, &report.acked);
    eprintln!(
        "all {} acknowledged transactions are on the standby",
        report.acked.len()
    );
}

/// Waits until a standby without its primary has replayed what its own journal holds.
fn wait_replayed_own_journal(standby: &Site) {
    let mut last = None;
    let done = wait_until(check::CATCH_UP_MS_MAX, || {
        let status = standby.status();
        let durable = status
            .as_ref()
            .and_then(|s| check::replication_lsn(s, "durable_lsn"));
        let replayed = status
            .as_ref()
            .and_then(|s| check::replication_lsn(s, "replayed_lsn"));
        last = status;
        matches!((durable, replayed), (Some(d), Some(r)) if r >= d)
    });
    assert!(done, "the standby did not replay its own journal: {last:?}");
}

#[test]
fn standby_refuses_another_cluster() {
    let _serial = serial();
    let root = tempfile::tempdir().unwrap();
    let mut a = Site::primary(root.path(), "a", Mode::Async, false);
    let mut b = Site::primary(root.path(), "b", Mode::Async, false);
    a.start_primary();
    b.start_primary();
    let mut standby = Site::standby(root.path(), "standby", false);
    standby.start_standby(&a.url());
    commit_some(&a, 0);
    commit_some(&b, 1_000);
    check::wait_caught_up(&a, &standby);
    standby.stop();
    let journal_before = Snapshot::take_dir(&standby.data_dir().join("journal"));
    let cluster_file = standby.data_dir().join("cluster_id");
    let cluster_before = std::fs::read(&cluster_file).unwrap();
    let stores_before = Snapshot::take(&standby);

    let ids = cluster_ids(&a, &b);
    assert_ne!(ids[0], ids[1], "two primaries, two clusters");
    standby.launch_standby(&b.url());
    let said = refusal(&mut standby, &ids);
    eprintln!("the standby refused: {}", said.trim());
    let journal_after = Snapshot::take_dir(&standby.data_dir().join("journal"));
    let changed = journal_before.differences(&journal_after);
    assert!(changed.is_empty(), "the journal changed: {changed:?}");
    assert_eq!(
        std::fs::read(&cluster_file).unwrap(),
        cluster_before,
        "the cluster id changed"
    );
    let stores_changed = stores_before.differences(&Snapshot::take(&standby));
    assert!(
        stores_changed.is_empty(),
        "the stores changed: {stores_changed:?}"
    );

    standby.start_standby(&a.url());
    commit_some(&a, 2_000);
    check::wait_caught_up(&a, &standby);
    standby.stop();
    a.stop();
    b.stop();
    check::assert_sites_equal(&a, &standby);
}

/// Commits a few transactions on `site` (numbers from `first`), without PostgreSQL.
fn commit_some(site: &Site, first: u64) {
    for i in first..first + 5 {
        let path = format!("c{i}");
        let committed = workload::commit_file(&site.url(), &path, i, 4096);
        assert!(
            committed.is_ok(),
            "commit {path} on {}: {committed:?}",
            site.name
        );
    }
}

/// What the standby pointed at another cluster says: it exits non-zero, or stays up refusing
/// and says why on its standard error (which must name `ids`). Kills it if it is still running.
fn refusal(standby: &mut Site, ids: &[String]) -> String {
    let said_all = |standby: &mut Site| {
        let stderr = standby.process().stderr_text();
        ids.iter().all(|id| stderr.contains(id.as_str()))
    };
    let _ = wait_until(REFUSAL_MS_MAX, || {
        standby.process_mut().exited().is_some() || said_all(standby)
    });
    let said = format!(
        "{}\n{}",
        standby.process().stdout_text(),
        standby.process().stderr_text()
    );
    match standby.process_mut().exited() {
        Some(status) => {
            assert!(
                !status.success(),
                "the standby exited 0 on another cluster: {said}"
            );
            standby.take_process();
        }
        None => standby.kill(),
    }
    for id in ids {
        assert!(
            said.contains(id.as_str()),
            "the refusal does not name cluster {id}: {said}"
        );
    }
    said
}

/// The cluster ids of `a` and `b`: each primary's `data_dir/cluster_id` file.
fn cluster_ids(a: &Site, b: &Site) -> Vec<String> {
    [a, b]
        .iter()
        .map(|site| {
            let path = site.data_dir().join("cluster_id");
            let id = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            id.trim().to_string()
        })
        .collect()
}
