//! Failover end to end: two real `concord` nodes with `[failover]` tables, a real quorum store
//! (the witness, and etcd for the kill, partition and concurrent-promote scenarios), real
//! signals, real partitions inside network namespaces, a full file system on a tmpfs.
//!
//! Each scenario starts a [`Pair`] (`a` the primary, `b` its standby), often a workload that
//! follows the primary over `connect_any`, does one fault, and checks: who is primary and at
//! which epoch, that at most one node may commit, and — the node stopped with SIGTERM first —
//! that every acknowledged commit is in the surviving primary's files root and sled directory.
//!
//! Build the binary first: `cargo build -p concord-cli && cargo test -p concord-tests --test
//! failover`. The lab scenarios need root, `ip` and `nft`; the etcd ones `etcd-server`.

#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use concord_tests::pair::{FoReport, Pair, PairSpec, StoreKind, assert_all_on, hold_for};
use participant::{Concord, Credentials};

/// How long an automatic failover may take after the fault.
const FAILOVER_MS_MAX: u64 = 30_000;
/// How long the workload may take to make progress.
const PROGRESS_MS_MAX: u64 = 30_000;

fn epoch(f: &serde_json::Value) -> u64 {
    f["epoch"]
        .as_u64()
        .expect("an epoch in the failover status")
}

fn is_committing_primary(f: &serde_json::Value) -> bool {
    f["role"] == "primary" && f["may_commit"] == true
}

/// Stops the workload, asserts it committed, stops `survivor` with SIGTERM and checks every
/// acknowledged commit is on it.
fn check_survivor(pair: &mut Pair, survivor: &str, report: &FoReport) {
    assert!(
        !report.acked.is_empty(),
        "nothing was acknowledged; failures: {:?}",
        report.failures
    );
    eprintln!(
        "{} acknowledged, {} failed; first failures: {:?}",
        report.acked.len(),
        report.failed,
        report.failures.iter().take(5).collect::<Vec<_>>()
    );
    let node = pair.node_mut(survivor);
    assert!(
        node.terminate(),
        "node {survivor} did not exit 0 on SIGTERM"
    );
    assert_all_on(&pair.node(survivor).data_dir.clone(), &report.acked);
}

/// One commit sent straight to `url` (no following), on a runtime of its own, within 10 s.
fn direct_commit(url: &str) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a runtime");
    runtime.block_on(async {
        let attempt = async {
            let concord = Concord::connect(url, Credentials::none())
                .await
                .map_err(|e| e.to_string())?;
            one_commit(&concord).await
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(result) => result,
            Err(_) => Err("no answer within 10 s".into()),
        }
    })
}

async fn one_commit(concord: &Concord) -> Result<String, String> {
    concord_tests::pair::fo_transaction(concord, 1_000_000_007)
        .await
        .map(|a| a.xid)
        .map_err(|e| e.to_string())
}

/// `concord promote` on `node`, and how long it took.
fn timed_promote(node: &concord_tests::pair::Remote) -> ((Option<i32>, String, String), Duration) {
    let started = Instant::now();
    let answer = node.role_command("promote", &[]);
    (answer, started.elapsed())
}

/// Runs `body` against each store as its own test.
macro_rules! both_stores {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn witness() {
                super::$body(concord_tests::pair::StoreKind::Witness);
            }
            #[test]
            fn etcd() {
                super::$body(concord_tests::pair::StoreKind::Etcd);
            }
        }
    };
}

// 1. SIGKILL the primary under load.
fn kill_primary(store: StoreKind) {
    let mut pair = Pair::start(PairSpec::loopback(store));
    let before = epoch(&pair.a.failover().expect("a answers"));
    let workload = pair.workload(4);
    assert!(
        workload.wait_more(20, PROGRESS_MS_MAX),
        "no progress before the kill\n{}",
        pair.describe()
    );
    pair.a.kill();
    let f = pair.wait_failover(
        "b",
        FAILOVER_MS_MAX,
        "the promoted primary",
        is_committing_primary,
    );
    assert_eq!(
        epoch(&f),
        before + 1,
        "the promotion raises the epoch by one"
    );
    assert!(
        workload.wait_more(20, PROGRESS_MS_MAX),
        "the clients did not continue on b\n{}",
        pair.describe()
    );
    let report = workload.stop();
    check_survivor(&mut pair, "b", &report);
}
both_stores!(
    sigkill_of_the_primary_under_load_promotes_the_standby_and_loses_nothing,
    kill_primary
);

// 2. SIGSTOP the primary longer than its lease, then SIGCONT.
#[test]
fn a_paused_primary_resumes_as_a_node_that_commits_nothing() {
    let mut pair = Pair::start(PairSpec::loopback(StoreKind::Witness));
    let workload = pair.workload(2);
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "no progress\n{}",
        pair.describe()
    );
    pair.a.pause();
    pair.wait_failover(
        "b",
        FAILOVER_MS_MAX,
        "the promoted primary",
        is_committing_primary,
    );
    // While a is still frozen, the clients find b.
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "the clients did not continue on b while a was paused\n{}",
        pair.describe()
    );
    pair.a.resume();
    // At once, and until it follows: the old primary never says it may commit.
    let f = pair.wait_failover("a", 10_000, "answering after SIGCONT", |_| true);
    assert_ne!(
        f["may_commit"], true,
        "the resumed old primary may commit: {f}"
    );
    let sent = direct_commit(&pair.a.url.clone());
    assert!(
        sent.is_err(),
        "a commit sent to the resumed old primary was acknowledged: {sent:?}"
    );
    pair.wait_failover("a", 20_000, "following b", |f| {
        f["role"] == "standby" || f["role"] == "demoted"
    });
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "the clients did not continue on b\n{}",
        pair.describe()
    );
    hold_for(3_000, "one primary", || match pair.committing_primaries() {
        1 => Ok(()),
        n => Err(format!("{n} nodes may commit\n{}", pair.describe())),
    });
    let report = workload.stop();
    check_survivor(&mut pair, "b", &report);
}

// 3. Partition primary and standby, the store reachable by both.
fn partition(store: StoreKind) {
    let pair = Pair::start(PairSpec::in_lab(store));
    let lab = pair.lab.as_ref().expect("a lab");
    lab.partition(&["a"], &["b"]);
    hold_for(5_000, "no promotion during the partition", || {
        match pair.b.failover() {
            Some(f) if f["role"] == "primary" => {
                Err(format!("b promoted: {f}\n{}", pair.describe()))
            }
            _ => Ok(()),
        }
    });
    let log = pair.b.stderr_text();
    assert!(
        log.contains("renews its lease"),
        "b does not say that the primary renews its lease:\n{}",
        pair.describe()
    );
    lab.heal();
    let healed = Instant::now();
    let connected = concord_tests::process::wait_until(5_000, || {
        pair.b.status().is_some_and(|s| {
            concord_tests::check::connected(&s) == Some(true)
                && s["failover"]["peer_state"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("alive"))
        })
    });
    assert!(
        connected,
        "b was not replicating again within 5 s of the heal ({} ms)\n{}",
        healed.elapsed().as_millis(),
        pair.describe()
    );
    let f = pair.a.failover().expect("a answers");
    assert!(is_committing_primary(&f), "a is no longer the primary: {f}");
}
both_stores!(
    a_partition_between_the_nodes_with_the_store_reachable_is_no_failover,
    partition
);

// 4. The primary isolated from the store and the standby.
fn isolated(store: StoreKind) {
    let pair = Pair::start(PairSpec::in_lab(store));
    let lab = pair.lab.as_ref().expect("a lab");
    let workload = pair.workload(2);
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "no progress\n{}",
        pair.describe()
    );
    let isolated = Instant::now();
    lab.isolate("a");
    let f = pair.wait_failover("a", 5_000, "refusing commits", |f| f["may_commit"] == false);
    let a_stopped = isolated.elapsed();
    eprintln!(
        "a stopped committing {} ms after the isolation: {}",
        a_stopped.as_millis(),
        f["why_not"]
    );
    assert!(
        !f["why_not"].as_str().unwrap_or_default().is_empty(),
        "no why_not: {f}"
    );
    pair.wait_failover(
        "b",
        FAILOVER_MS_MAX,
        "the promoted primary",
        is_committing_primary,
    );
    let b_primary = isolated.elapsed();
    assert!(
        a_stopped < b_primary,
        "b promoted ({} ms) before a stopped committing ({} ms)",
        b_primary.as_millis(),
        a_stopped.as_millis()
    );
    let sent = lab.run_in("a", || direct_commit(&pair.a.url));
    assert!(
        sent.is_err(),
        "the isolated primary acknowledged a commit: {sent:?}"
    );
    drop(workload.stop());
}
both_stores!(
    an_isolated_primary_stops_committing_before_the_standby_promotes,
    isolated
);

// 5. The primary's journal on a full file system.
#[test]
fn a_primary_on_a_full_file_system_is_replaced_by_the_standby() {
    let mut spec = PairSpec::loopback(StoreKind::Witness);
    spec.a_tmpfs = Some("64m");
    let mut pair = Pair::start(spec);
    let workload = pair.workload(2);
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "no progress\n{}",
        pair.describe()
    );
    adapters::testing::fill_up(&pair.a.data_dir.join("filler"));
    pair.wait_failover(
        "b",
        FAILOVER_MS_MAX,
        "the promoted primary",
        is_committing_primary,
    );
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "the clients did not continue on b\n{}",
        pair.describe()
    );
    let report = workload.stop();
    pair.a.kill();
    check_survivor(&mut pair, "b", &report);
}

// 6. Two promotes at once.
fn concurrent_promotes(store: StoreKind) {
    let mut spec = PairSpec::loopback(store);
    spec.automatic = false;
    let pair = Pair::start(spec);
    let (code, out, err) = pair.a.role_command("demote", &[]);
    assert_eq!(code, Some(0), "demote a: {out}{err}");
    let (a, b) = (pair.a.remote(), pair.b.remote());
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| timed_promote(&a));
        let tb = s.spawn(|| timed_promote(&b));
        (ta.join().expect("promote a"), tb.join().expect("promote b"))
    });
    let ((ra, a_took), (rb, b_took)) = (ra, rb);
    let codes = [ra.0, rb.0];
    let winners = codes.iter().filter(|c| **c == Some(0)).count();
    assert_eq!(
        winners,
        1,
        "exactly one promote succeeds: a {ra:?}, b {rb:?}\n{}",
        pair.describe()
    );
    let loser = if ra.0 == Some(0) { &rb } else { &ra };
    let winner = if ra.0 == Some(0) { "a" } else { "b" };
    assert_eq!(
        loser.0,
        Some(7),
        "the losing promote is refused (exit 7): {loser:?}"
    );
    let loser_took = if ra.0 == Some(0) { b_took } else { a_took };
    assert!(
        loser_took < Duration::from_secs(5),
        "the losing promote took {} ms",
        loser_took.as_millis()
    );
    let text = format!("{}{}", loser.1, loser.2);
    eprintln!("the winner is {winner}; the loser printed: {text}");
    let url = &pair.node(winner).url;
    let names_winner = text.contains(url.as_str()) || text.contains(&format!("to {winner} ("));
    assert!(
        names_winner || text.contains("running"),
        "the refusal names neither the winner nor the running change: {text}"
    );
    pair.wait_failover(winner, 10_000, "the primary", is_committing_primary);
    assert_eq!(pair.committing_primaries(), 1, "{}", pair.describe());
}
both_stores!(two_promotes_at_once_have_one_winner, concurrent_promotes);

// 6b. The same node asked to promote twice at once: one does it, the other is refused at once,
// naming the change that runs.
fn concurrent_promotes_on_one_node(store: StoreKind) {
    let mut spec = PairSpec::loopback(store);
    spec.automatic = false;
    let pair = Pair::start(spec);
    let (code, out, err) = pair.a.role_command("demote", &[]);
    assert_eq!(code, Some(0), "demote a: {out}{err}");
    let b = pair.b.remote();
    let (first, second) = std::thread::scope(|s| {
        let one = s.spawn(|| timed_promote(&b));
        let two = s.spawn(|| timed_promote(&b));
        (one.join().expect("promote"), two.join().expect("promote"))
    });
    let answers = [&first, &second];
    let done = answers.iter().filter(|(r, _)| r.0 == Some(0)).count();
    let refused: Vec<_> = answers.iter().filter(|(r, _)| r.0 == Some(7)).collect();
    eprintln!("first: {first:?}\nsecond: {second:?}");
    // Both may also succeed when the second came after the first had finished ("already done").
    if done == 2 {
        let already = answers.iter().any(|(r, _)| r.1.contains("already done"));
        assert!(
            already,
            "two promotes both did the work: {first:?} {second:?}"
        );
    } else {
        assert_eq!((done, refused.len()), (1, 1), "{first:?} {second:?}");
        let ((code, out, err), took) = refused[0];
        assert!(
            *took < Duration::from_secs(5),
            "the refused promote took {} ms",
            took.as_millis()
        );
        let text = format!("{out}{err}");
        assert!(
            text.contains("already running"),
            "the refusal (exit {code:?}) does not name the running promotion: {text}"
        );
    }
    pair.wait_failover("b", 10_000, "the primary", is_committing_primary);
    assert_eq!(pair.committing_primaries(), 1, "{}", pair.describe());
}
both_stores!(
    two_promotes_of_one_node_at_once_run_once,
    concurrent_promotes_on_one_node
);

// 7. Re-runs are "already done"; a dry run says what it would lose.
#[test]
fn promote_and_demote_twice_are_already_done_and_a_dry_run_prints_the_loss() {
    let mut spec = PairSpec::loopback(StoreKind::Witness);
    spec.automatic = false;
    let pair = Pair::start(spec);
    let (code, out, err) = pair.a.role_command("promote", &[]);
    assert_eq!(code, Some(0), "promote on the primary: {out}{err}");
    assert!(
        out.contains("already done"),
        "promote on the primary: {out}"
    );
    let (code, out, err) = pair.b.role_command("promote", &["--dry-run"]);
    assert_eq!(code, Some(0), "promote --dry-run: {out}{err}");
    assert!(
        out.contains("would lose:"),
        "promote --dry-run prints no figures: {out}"
    );
    let f = pair.b.failover().expect("b answers");
    assert_eq!(f["role"], "standby", "a dry run changed b: {f}");
    for round in 0..2 {
        let (code, out, err) = pair.a.role_command("demote", &[]);
        assert_eq!(code, Some(0), "demote #{round}: {out}{err}");
        if round == 1 {
            assert!(out.contains("already done"), "the second demote: {out}");
        }
    }
    for round in 0..2 {
        let (code, out, err) = pair.b.role_command("promote", &[]);
        assert_eq!(
            code,
            Some(0),
            "promote #{round}: {out}{err}\n{}",
            pair.describe()
        );
        if round == 1 {
            assert!(out.contains("already done"), "the second promote: {out}");
        }
    }
    pair.wait_failover("b", 10_000, "the primary", is_committing_primary);
}

// 8. The quorum store down for 30 s under load.
#[test]
fn the_store_down_for_30_s_is_no_failover_and_commits_go_on() {
    let mut pair = Pair::start(PairSpec::loopback(StoreKind::Witness));
    let workload = pair.workload(2);
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "no progress\n{}",
        pair.describe()
    );
    pair.quorum.stop();
    let down = Instant::now();
    let mut last_count = workload.committed();
    let mut stalled_since = Instant::now();
    let mut confirmed_seen = false;
    hold_for(30_000, "the store down", || {
        if pair.b.failover().is_some_and(|f| f["role"] == "primary") {
            return Err(format!("b promoted\n{}", pair.describe()));
        }
        // Past the lease, the primary commits on the standby's confirmations alone.
        if down.elapsed() > Duration::from_secs(3)
            && let Some(f) = pair.a.failover()
        {
            let confirmed = f["confirmed_remaining_ms"].as_u64().unwrap_or(0) > 0;
            confirmed_seen |= is_committing_primary(&f)
                && f["quorum_reachable"] == false
                && f["lease_remaining_ms"] == 0
                && confirmed;
        }
        if pair.committing_primaries() > 1 {
            return Err(format!("two primaries\n{}", pair.describe()));
        }
        let now = workload.committed();
        if now > last_count {
            last_count = now;
            stalled_since = Instant::now();
        } else if stalled_since.elapsed() > Duration::from_secs(5) {
            return Err(format!(
                "no commit for 5 s, {} s into the outage\n{}",
                down.elapsed().as_secs(),
                pair.describe()
            ));
        }
        Ok(())
    });
    assert!(
        confirmed_seen,
        "the primary was never seen committing on the standby's confirmation alone\n{}",
        pair.describe()
    );
    pair.quorum.start();
    pair.wait_failover("a", 15_000, "renewing its lease again", |f| {
        f["quorum_reachable"] == true && f["lease_remaining_ms"].as_u64().unwrap_or(0) > 0
    });
    let report = workload.stop();
    check_survivor(&mut pair, "a", &report);
}

// 9. Switchover.
#[test]
fn a_switchover_loses_nothing_and_reports_a_short_window() {
    let mut pair = Pair::start(PairSpec::loopback(StoreKind::Witness));
    let workload = pair.workload(2);
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "no progress\n{}",
        pair.describe()
    );
    let (code, out, err) = pair.a.role_command("switchover", &["--json"]);
    assert_eq!(code, Some(0), "switchover: {out}{err}\n{}", pair.describe());
    let reply: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("switchover --json: {e}: {out}"));
    let window = reply["window_ms"].as_u64().expect("window_ms");
    assert!(window > 0 && window < 5_000, "window_ms {window}: {reply}");
    pair.wait_failover("b", 10_000, "the primary", is_committing_primary);
    assert!(
        workload.wait_more(10, PROGRESS_MS_MAX),
        "the clients did not continue on b\n{}",
        pair.describe()
    );
    let report = workload.stop();
    pair.a.terminate();
    check_survivor(&mut pair, "b", &report);
}
