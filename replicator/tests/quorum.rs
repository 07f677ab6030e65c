//! The quorum store's contract, run against both implementations with one shared body: the
//! built-in witness (served in this process on 127.0.0.1) and a real etcd (Debian's
//! `etcd-server`, started by the test on free loopback ports, killed at the end).
//!
//! Each scenario uses a cluster name of its own, so one store serves them all in sequence.
//! The witness-only scenarios (restart, a damaged state file, the token) and the etcd-only
//! ones (stopped, paused) follow the shared ones.

#![allow(clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator::quorum::witness::{STATE_FILE, WitnessError, WitnessServer};
use replicator::quorum::{
    self, ClusterState, Holder, QuorumConfig, QuorumError, QuorumKind, QuorumStore,
};

/// The deadline of a call in the scenarios (generous: the machine is shared).
const CALL_TIMEOUT_MS: u64 = 5_000;
/// The contract's default deadline, used where a test measures it.
const SHORT_CALL_TIMEOUT_MS: u64 = 500;
/// How long a started store may take to answer its first call.
const START_DEADLINE: Duration = Duration::from_secs(30);

fn holder(node: &str) -> Holder {
    Holder {
        node: node.to_owned(),
        address: format!("http://127.0.0.1:1/{node}"),
    }
}

fn config(kind: QuorumKind, endpoint: &str, cluster: &str, timeout_ms: u64) -> QuorumConfig {
    QuorumConfig {
        kind,
        endpoints: vec![endpoint.to_owned()],
        cluster: cluster.to_owned(),
        token: None,
        call_timeout_ms: timeout_ms,
    }
}

/// Makes a store for a cluster name.
type MakeStore<'a> = &'a dyn Fn(&str) -> Arc<dyn QuorumStore>;

// ---------------------------------------------------------------------------------------------
// The shared body.

async fn run_shared_scenarios(make: MakeStore<'_>) {
    first_claim_from_epoch_zero(make("first").as_ref()).await;
    renew_keeps_the_epoch(make("renew").as_ref()).await;
    claim_refused_while_the_lease_is_live(make("held").as_ref()).await;
    claim_after_expiry(make("expiry").as_ref()).await;
    override_takes_a_live_lease(make("override").as_ref()).await;
    epoch_moved(make("moved").as_ref()).await;
    renew_by_the_loser_is_not_holder(make("loser").as_ref()).await;
    release_then_claim_without_waiting(make("release").as_ref()).await;
    eight_concurrent_claims_one_winner(make("race")).await;
}

async fn first_claim_from_epoch_zero(store: &dyn QuorumStore) {
    println!("first claim from epoch 0: {}", store.describe());
    let before = store.state().await.expect("state");
    assert_eq!(
        before,
        ClusterState {
            epoch: 0,
            holder: None,
            lease_remaining_ms: None
        }
    );
    let grant = store.claim(&holder("a"), 0, 1, 3_000, false).await;
    let grant = grant.expect("first claim");
    assert_eq!(grant.epoch, 1);
    assert!(grant.ttl_ms >= 3_000, "{grant:?}");
    let after = store.state().await.expect("state");
    assert_eq!((after.epoch, after.holder.clone()), (1, Some(holder("a"))));
    let remaining = after.lease_remaining_ms.expect("a live lease");
    assert!(remaining > 0 && remaining <= grant.ttl_ms, "{after:?}");
}

async fn renew_keeps_the_epoch(store: &dyn QuorumStore) {
    println!("renew: {}", store.describe());
    store
        .claim(&holder("a"), 0, 1, 3_000, false)
        .await
        .expect("claim");
    let grant = store.renew(&holder("a"), 1, 4_000).await.expect("renew");
    assert_eq!(grant.epoch, 1);
    assert!(grant.ttl_ms >= 4_000, "{grant:?}");
    let state = store.state().await.expect("state");
    assert_eq!((state.epoch, state.holder), (1, Some(holder("a"))));
    assert!(state.lease_remaining_ms.is_some());
}

async fn claim_refused_while_the_lease_is_live(store: &dyn QuorumStore) {
    println!(
        "claim refused while the lease is live: {}",
        store.describe()
    );
    let grant = store.claim(&holder("a"), 0, 1, 10_000, false).await;
    let grant = grant.expect("claim");
    match store.claim(&holder("b"), 1, 2, 3_000, false).await {
        Err(QuorumError::LeaseHeld {
            epoch,
            holder: h,
            remaining_ms,
        }) => {
            assert_eq!((epoch, h), (1, holder("a")));
            assert!(
                remaining_ms > 0 && remaining_ms <= grant.ttl_ms,
                "{remaining_ms}"
            );
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    assert_eq!(store.state().await.expect("state").epoch, 1);
}

/// Waits (with a deadline) until the store reports no live lease.
async fn wait_for_expiry(store: &dyn QuorumStore, ttl_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(ttl_ms) + Duration::from_secs(10);
    loop {
        let state = store.state().await.expect("state");
        if state.lease_remaining_ms.is_none() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the lease never ran out: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn claim_after_expiry(store: &dyn QuorumStore) {
    println!("claim after expiry: {}", store.describe());
    let grant = store.claim(&holder("a"), 0, 1, 1_000, false).await;
    let grant = grant.expect("claim");
    wait_for_expiry(store, grant.ttl_ms).await;
    let state = store.state().await.expect("state");
    assert_eq!(
        (state.epoch, state.holder),
        (1, Some(holder("a"))),
        "the holder stays recorded after its lease ran out"
    );
    let won = store.claim(&holder("b"), 1, 2, 3_000, false).await;
    assert_eq!(won.expect("claim after expiry").epoch, 2);
    let state = store.state().await.expect("state");
    assert_eq!((state.epoch, state.holder), (2, Some(holder("b"))));
}

async fn override_takes_a_live_lease(store: &dyn QuorumStore) {
    println!("override: {}", store.describe());
    store
        .claim(&holder("a"), 0, 1, 30_000, false)
        .await
        .expect("claim");
    let won = store.claim(&holder("b"), 1, 2, 3_000, true).await;
    assert_eq!(won.expect("claim with the override").epoch, 2);
    let state = store.state().await.expect("state");
    assert_eq!((state.epoch, state.holder), (2, Some(holder("b"))));
    assert!(state.lease_remaining_ms.expect("b's lease") <= 3_000);
    match store.renew(&holder("a"), 1, 3_000).await {
        Err(QuorumError::EpochMoved { epoch, holder: h }) => {
            assert_eq!((epoch, h), (2, Some(holder("b"))));
        }
        other => panic!("expected EpochMoved for the overridden holder, got {other:?}"),
    }
}

async fn epoch_moved(store: &dyn QuorumStore) {
    println!("epoch moved: {}", store.describe());
    store
        .claim(&holder("a"), 0, 1, 3_000, false)
        .await
        .expect("claim");
    match store.claim(&holder("b"), 0, 1, 3_000, true).await {
        Err(QuorumError::EpochMoved { epoch, holder: h }) => {
            assert_eq!((epoch, h), (1, Some(holder("a"))));
        }
        other => panic!("expected EpochMoved, got {other:?}"),
    }
    match store.claim(&holder("b"), 5, 6, 3_000, true).await {
        Err(QuorumError::EpochMoved { epoch: 1, .. }) => {}
        other => panic!("expected EpochMoved for a future epoch, got {other:?}"),
    }
    match store.claim(&holder("b"), 1, 1, 3_000, true).await {
        Err(QuorumError::Protocol { .. }) => {}
        other => panic!("a claim that does not raise the epoch is refused, got {other:?}"),
    }
}

async fn renew_by_the_loser_is_not_holder(store: &dyn QuorumStore) {
    println!("renew by the loser: {}", store.describe());
    store
        .claim(&holder("a"), 0, 1, 3_000, false)
        .await
        .expect("claim");
    match store.renew(&holder("b"), 1, 3_000).await {
        Err(QuorumError::NotHolder { epoch, holder: h }) => {
            assert_eq!((epoch, h), (1, Some(holder("a"))));
        }
        other => panic!("expected NotHolder, got {other:?}"),
    }
}

async fn release_then_claim_without_waiting(store: &dyn QuorumStore) {
    println!("release then claim: {}", store.describe());
    store
        .claim(&holder("a"), 0, 1, 30_000, false)
        .await
        .expect("claim");
    // A release by someone else is a no-op: the lease stays.
    store.release(&holder("b"), 1).await.expect("no-op release");
    store.release(&holder("a"), 7).await.expect("no-op release");
    assert!(
        store
            .state()
            .await
            .expect("state")
            .lease_remaining_ms
            .is_some()
    );
    store.release(&holder("a"), 1).await.expect("release");
    let state = store.state().await.expect("state");
    assert_eq!(state.lease_remaining_ms, None, "{state:?}");
    assert_eq!((state.epoch, state.holder), (1, Some(holder("a"))));
    let won = store.claim(&holder("b"), 1, 2, 3_000, false).await;
    assert_eq!(won.expect("claim right after the release").epoch, 2);
    store
        .release(&holder("a"), 1)
        .await
        .expect("a release after losing is a no-op");
    assert!(
        store
            .state()
            .await
            .expect("state")
            .lease_remaining_ms
            .is_some()
    );
}

async fn eight_concurrent_claims_one_winner(store: Arc<dyn QuorumStore>) {
    println!("8 concurrent claims: {}", store.describe());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let me = holder(&format!("n{i}"));
            (me.clone(), store.claim(&me, 0, 1, 10_000, false).await)
        });
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.expect("claim task") {
            (me, Ok(grant)) => winners.push((me, grant)),
            (_, Err(e)) => losers.push(e),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one winner: {winners:?} {losers:?}"
    );
    let (winner, grant) = &winners[0];
    assert_eq!(grant.epoch, 1);
    for loser in &losers {
        match loser {
            QuorumError::EpochMoved { epoch: 1, holder } => {
                assert_eq!(holder.as_ref(), Some(winner));
            }
            other => panic!("a loser sees the winner's epoch, got {other:?}"),
        }
    }
    let state = store.state().await.expect("state");
    assert_eq!((state.epoch, state.holder.as_ref()), (1, Some(winner)));
}

// ---------------------------------------------------------------------------------------------
// The witness, in this process.

/// A witness served on a loopback port of this process until dropped or stopped.
struct Witness {
    dir: PathBuf,
    addr: SocketAddr,
    token: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), WitnessError>>>,
}

impl Witness {
    async fn start(dir: &Path, token: Option<&str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut witness = Self {
            dir: dir.to_owned(),
            addr,
            token: token.map(str::to_owned),
            stop: None,
            task: None,
        };
        witness.serve(listener);
        witness
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let server = WitnessServer::open(&self.dir, self.token.clone()).expect("open witness");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            let _ = stopped.await;
        };
        self.task = Some(tokio::spawn(server.serve(listener, shutdown)));
        self.stop = Some(stop);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn store(&self, cluster: &str, timeout_ms: u64) -> Arc<dyn QuorumStore> {
        let mut cfg = config(QuorumKind::Witness, &self.url(), cluster, timeout_ms);
        cfg.token = self.token.clone();
        quorum::open(&cfg).expect("open the witness store")
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let served = tokio::time::timeout(Duration::from_secs(10), task).await;
            served
                .expect("the witness stops")
                .expect("join")
                .expect("serve");
        }
    }

    /// Stops the witness and serves the same data directory on the same port again.
    async fn restart(&mut self) {
        self.stop().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    println!("rebind {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("temp dir");
    let witness = Witness::start(dir.path(), None).await;
    let make = |cluster: &str| witness.store(cluster, CALL_TIMEOUT_MS);
    run_shared_scenarios(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_restart_keeps_epoch_and_holder_and_the_lease_is_never_shortened() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut witness = Witness::start(dir.path(), None).await;
    let store = witness.store("restart", CALL_TIMEOUT_MS);
    let grant = store.claim(&holder("a"), 0, 1, 3_000, false).await;
    assert_eq!(grant.expect("claim").epoch, 1);
    // Most of the lease runs out before the restart...
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let left = store.state().await.expect("state").lease_remaining_ms;
    let left = left.expect("still live");
    assert!(left <= 1_000, "{left}");
    witness.restart().await;
    let restarted = Instant::now();
    // ...and after it the holder's lease counts whole again, from the restart.
    let state = store.state().await.expect("state after the restart");
    assert_eq!((state.epoch, state.holder), (1, Some(holder("a"))));
    let remaining = state.lease_remaining_ms.expect("live after a restart");
    assert!(
        remaining > left && remaining <= 3_000,
        "{remaining} after {left}"
    );
    match store.claim(&holder("b"), 1, 2, 3_000, false).await {
        Err(QuorumError::LeaseHeld { holder: h, .. }) => assert_eq!(h, holder("a")),
        other => panic!("expected LeaseHeld after the restart, got {other:?}"),
    }
    wait_for_expiry(store.as_ref(), 3_000).await;
    assert!(restarted.elapsed() >= Duration::from_millis(3_000) - Duration::from_millis(100));
    let won = store.claim(&holder("b"), 1, 2, 3_000, false).await;
    assert_eq!(won.expect("claim after the restart's lease").epoch, 2);
    // The new register survives a second restart.
    witness.restart().await;
    let state = store.state().await.expect("state");
    assert_eq!((state.epoch, state.holder), (2, Some(holder("b"))));
    witness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_unreachable_within_the_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut witness = Witness::start(dir.path(), None).await;
    let store = witness.store("gone", SHORT_CALL_TIMEOUT_MS);
    store.state().await.expect("state");
    witness.stop().await;
    assert_unreachable_quickly(store.as_ref()).await;
    // A listener that accepts and never answers: the deadline, not a hang.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("address"));
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let cfg = config(QuorumKind::Witness, &url, "silent", SHORT_CALL_TIMEOUT_MS);
    let store = quorum::open(&cfg).expect("open");
    assert_unreachable_quickly(store.as_ref()).await;
    held.abort();
}

async fn assert_unreachable_quickly(store: &dyn QuorumStore) {
    let started = Instant::now();
    let answer = store.claim(&holder("a"), 0, 1, 3_000, false).await;
    let took = started.elapsed();
    assert!(
        matches!(answer, Err(QuorumError::Unreachable { .. })),
        "{answer:?}"
    );
    assert!(took < Duration::from_millis(1_500), "took {took:?}");
    let answer = store.state().await;
    assert!(
        matches!(answer, Err(QuorumError::Unreachable { .. })),
        "{answer:?}"
    );
}

#[test]
fn witness_state_file_with_garbage_is_a_typed_error_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(STATE_FILE);
    for garbage in [
        &b"\x00\xffnot json"[..],
        b"{\"version\":1,\"clusters\":{\"c\":{\"epoch\":\"x\"}}}",
        b"{\"version\":99,\"clusters\":{}}",
        b"{\"version\":1,\"clusters\":{\"c\":{\"epoch\":0,\"holder\":{\"node\":\"a\",\"address\":\"\"},\"ttl_ms\":5,\"released\":false}}}",
    ] {
        std::fs::write(&path, garbage).expect("write garbage");
        match WitnessServer::open(dir.path(), None) {
            Err(e @ WitnessError::Malformed { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&path.display().to_string()), "{text}");
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_with_a_token_refuses_a_call_without_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let witness = Witness::start(dir.path(), Some("s3cret")).await;
    let with = witness.store("token", CALL_TIMEOUT_MS);
    with.claim(&holder("a"), 0, 1, 3_000, false)
        .await
        .expect("claim with the token");
    for token in [None, Some("wrong".to_owned())] {
        let mut cfg = config(
            QuorumKind::Witness,
            &witness.url(),
            "token",
            CALL_TIMEOUT_MS,
        );
        cfg.token = token;
        let without = quorum::open(&cfg).expect("open");
        match without.state().await {
            Err(QuorumError::Protocol { detail, .. }) => {
                assert!(detail.contains("Unauthenticated"), "{detail}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_malformed_configuration_is_refused() {
    let mut cfg = config(
        QuorumKind::Witness,
        "http://127.0.0.1:1",
        "",
        CALL_TIMEOUT_MS,
    );
    assert!(matches!(
        quorum::open(&cfg),
        Err(QuorumError::Protocol { .. })
    ));
    cfg.cluster = "c".to_owned();
    cfg.endpoints = vec!["not a url".to_owned()];
    assert!(matches!(
        quorum::open(&cfg),
        Err(QuorumError::Protocol { .. })
    ));
    cfg.endpoints = Vec::new();
    assert!(matches!(
        quorum::open(&cfg),
        Err(QuorumError::Protocol { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// A real etcd.

/// An etcd child process on free loopback ports, with its data in a temporary directory;
/// killed when dropped.
struct Etcd {
    child: Child,
    client_url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

impl Etcd {
    async fn start() -> Self {
        match Command::new("etcd").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            _ => panic!("etcd is not installed: install it: apt-get install etcd-server"),
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log file");
        let child = Command::new("etcd")
            .args(["--name", "concord-test"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("concord-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let etcd = Self {
            child,
            client_url,
            _dir: dir,
        };
        etcd.wait_ready().await;
        etcd
    }

    async fn wait_ready(&self) {
        let store = self.store("ready", 1_000);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match store.state().await {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    println!("waiting for etcd: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("etcd did not answer within {START_DEADLINE:?}: {e}"),
            }
        }
    }

    fn store(&self, cluster: &str, timeout_ms: u64) -> Arc<dyn QuorumStore> {
        let cfg = config(QuorumKind::Etcd, &self.client_url, cluster, timeout_ms);
        quorum::open(&cfg).expect("open the etcd store")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_keeps_the_contract() {
    let etcd = Etcd::start().await;
    let make = |cluster: &str| etcd.store(cluster, CALL_TIMEOUT_MS);
    run_shared_scenarios(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_paused_or_stopped_is_unreachable_within_the_deadline() {
    let mut etcd = Etcd::start().await;
    let store = etcd.store("stopped", SHORT_CALL_TIMEOUT_MS);
    store.state().await.expect("state");
    etcd.signal("-STOP");
    assert_unreachable_quickly(store.as_ref()).await;
    etcd.signal("-CONT");
    etcd.child.kill().expect("kill etcd");
    etcd.child.wait().expect("wait for etcd");
    assert_unreachable_quickly(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leases_are_whole_seconds() {
    let etcd = Etcd::start().await;
    let store = etcd.store("seconds", CALL_TIMEOUT_MS);
    let grant = store.claim(&holder("a"), 0, 1, 2_001, false).await;
    let grant = grant.expect("claim");
    assert_eq!(grant.ttl_ms % 1_000, 0, "{grant:?}");
    assert!(grant.ttl_ms >= 3_000, "2001 ms rounds up to 3 s: {grant:?}");
}
