//! Heartbeats between two nodes in one test process, on real UDP sockets and real tonic servers
//! on 127.0.0.1: both paths both ways, one path blocked, both stopped, a sick peer, packets that
//! must be dropped, and the standby's promise as the primary counts it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use proto::v1;
use replicator::heartbeat::seal::{self, DATAGRAM_BYTES_MAX};
use replicator::heartbeat::{
    Beat, DropReason, HeartbeatConfig, HeartbeatKey, Heartbeats, Path, PeerState, Role,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const INTERVAL_MS: u64 = 50;
const DEADTIME_MS: u64 = 800;
const SICKTIME_MS: u64 = 1000;
/// How long any expected state may take to show (milliseconds).
const WAIT_MS: u64 = 5000;
const CLUSTER: &str = "c-heartbeat";

fn key() -> HeartbeatKey {
    HeartbeatKey::from_bytes(b"a shared key of at least sixteen bytes").unwrap()
}

/// One node: its heartbeats behind a real tonic server, and the knobs of its source.
struct Node {
    hb: Arc<Heartbeats>,
    url: String,
    udp: SocketAddr,
    healthy: Arc<AtomicBool>,
    confirm_ms: Arc<AtomicU64>,
    stop_server: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Node {
    async fn start(name: &str, role: Role) -> Node {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let healthy = Arc::new(AtomicBool::new(true));
        let confirm_ms = Arc::new(AtomicU64::new(0));
        let source = {
            let (healthy, confirm_ms, url) = (healthy.clone(), confirm_ms.clone(), url.clone());
            Arc::new(move || {
                let healthy = healthy.load(Ordering::SeqCst);
                Beat {
                    address: url.clone(),
                    role,
                    epoch: 4,
                    durable_lsn: 17,
                    committed_txns: 9,
                    healthy,
                    failures: if healthy {
                        vec![]
                    } else {
                        vec!["journal: sync took 2000 ms".into()]
                    },
                    lease_remaining_ms: (role == Role::Primary).then_some(1500),
                    confirm_ms: confirm_ms.load(Ordering::SeqCst),
                    ..Beat::default()
                }
            })
        };
        let mut cfg = HeartbeatConfig::new(CLUSTER, name, "127.0.0.1:0".parse().unwrap());
        cfg.interval_ms = INTERVAL_MS;
        cfg.deadtime_ms = DEADTIME_MS;
        cfg.sicktime_ms = SICKTIME_MS;
        let hb = Heartbeats::start(cfg, key(), source).unwrap();
        let (stop_server, stopped) = oneshot::channel::<()>();
        let serving = tonic::transport::Server::builder()
            .add_service(hb.service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            );
        let server = tokio::spawn(async move {
            serving.await.unwrap();
        });
        Node {
            udp: hb.udp_local_addr(),
            hb,
            url,
            healthy,
            confirm_ms,
            stop_server: Some(stop_server),
            server,
        }
    }

    async fn stop(mut self) {
        self.hb.stop().await;
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        self.server.abort();
        let _ = self.server.await;
    }
}

/// A (primary) and B (standby), each pointed at the other.
async fn pair() -> (Node, Node) {
    let a = Node::start("a", Role::Primary).await;
    let b = Node::start("b", Role::Standby).await;
    a.hb.set_peer(Some(b.udp), Some(b.url.clone()));
    b.hb.set_peer(Some(a.udp), Some(a.url.clone()));
    (a, b)
}

/// Polls `cond` until it holds or `WAIT_MS` passed; panics with `what` and the last view.
async fn wait_for(what: &str, node: &Node, cond: impl Fn(&PeerState) -> bool) {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let view = node.hb.peer();
        if cond(&view.state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT_MS} ms; last view {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive_on_both(state: &PeerState) -> bool {
    matches!(state, PeerState::Alive { paths_down } if paths_down.is_empty())
}

/// A closed UDP port on loopback (bound, then released).
fn closed_udp_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_see_each_other_alive_on_both_paths() {
    let (a, b) = pair().await;
    wait_for("a sees b", &a, alive_on_both).await;
    wait_for("b sees a", &b, alive_on_both).await;
    let view = a.hb.peer();
    assert!(view.udp_ms_ago.unwrap() < DEADTIME_MS);
    assert!(view.grpc_ms_ago.unwrap() < DEADTIME_MS);
    let last = view.last.unwrap();
    assert_eq!(
        (last.cluster_id.as_str(), last.node.as_str(), last.role),
        (CLUSTER, "b", Role::Standby)
    );
    assert_eq!(last.address, b.url);
    assert_eq!(
        (last.epoch, last.durable_lsn, last.committed_txns),
        (4, 17, 9)
    );
    assert!(last.healthy && last.seq > 0);
    let from_a = b.hb.peer().last.unwrap();
    assert_eq!(from_a.lease_remaining_ms, Some(1500));
    assert_eq!(view.dropped_total, 0);
    // B's later beats echo A's seqs (its first ones may come before it heard A).
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    while a.hb.peer().last_seq_echoed_by_peer.is_none() {
        assert!(Instant::now() < deadline, "b never echoed a's seqs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_udp_path_is_a_warning_never_dead() {
    let (a, b) = pair().await;
    wait_for("b sees a", &b, alive_on_both).await;
    // A's datagrams now go to a closed port: B hears A over gRPC only.
    a.hb.set_peer(Some(closed_udp_port()), Some(b.url.clone()));
    wait_for("b sees a's udp path down", &b, |s| {
        *s == PeerState::Alive {
            paths_down: vec![Path::Udp],
        }
    })
    .await;
    // And it stays Alive, never Dead, for several deadtimes.
    let until = Instant::now() + Duration::from_millis(3 * DEADTIME_MS);
    while Instant::now() < until {
        let state = b.hb.peer().state;
        assert_eq!(
            state,
            PeerState::Alive {
                paths_down: vec![Path::Udp]
            }
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A still hears B on both paths.
    assert!(alive_on_both(&a.hb.peer().state));
    // The path comes back.
    a.hb.set_peer(Some(b.udp), Some(b.url.clone()));
    wait_for("b sees a on both paths again", &b, alive_on_both).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_silent_on_both_paths_is_dead_after_deadtime() {
    let (a, b) = pair().await;
    wait_for("a sees b", &a, alive_on_both).await;
    let stopped = Instant::now();
    b.stop().await;
    wait_for("a sees b dead", &a, |s| matches!(s, PeerState::Dead { .. })).await;
    let elapsed = stopped.elapsed();
    assert!(
        elapsed >= Duration::from_millis(DEADTIME_MS - INTERVAL_MS),
        "dead too early: {elapsed:?}"
    );
    let PeerState::Dead { silent_ms } = a.hb.peer().state else {
        panic!("not dead");
    };
    assert!(silent_ms >= DEADTIME_MS);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reporting_failed_probes_is_sick_after_sicktime() {
    let (a, b) = pair().await;
    wait_for("a sees b", &a, alive_on_both).await;
    b.healthy.store(false, Ordering::SeqCst);
    let unhealthy = Instant::now();
    wait_for("a sees b sick", &a, |s| matches!(s, PeerState::Sick { .. })).await;
    assert!(unhealthy.elapsed() >= Duration::from_millis(SICKTIME_MS - INTERVAL_MS));
    let view = a.hb.peer();
    assert!(!view.last.as_ref().unwrap().healthy);
    assert_eq!(
        view.last.unwrap().failures,
        vec!["journal: sync took 2000 ms".to_string()]
    );
    b.healthy.store(true, Ordering::SeqCst);
    wait_for("a sees b recovered", &a, alive_on_both).await;
    a.stop().await;
    b.stop().await;
}

/// A datagram as a peer would send it, with `key` and `cluster`.
fn datagram(key: &HeartbeatKey, cluster: &str, node: &str, seq: u64) -> Vec<u8> {
    let body = seal::encode_body(Beat {
        cluster_id: cluster.into(),
        node: node.into(),
        seq,
        healthy: true,
        ..Beat::default()
    })
    .unwrap();
    key.seal_datagram(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packets_are_dropped_and_counted_and_change_nothing() {
    let (a, b) = pair().await;
    wait_for("a sees b", &a, alive_on_both).await;
    let other_key = HeartbeatKey::from_bytes(b"another key of sixteen bytes or more").unwrap();
    let good = datagram(&key(), CLUSTER, "b", u64::MAX / 2);
    let mut flipped = good.clone();
    flipped[10] ^= 1;
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (
            datagram(&other_key, CLUSTER, "b", u64::MAX / 2),
            DropReason::BadMac,
        ),
        (flipped, DropReason::BadMac),
        (b"not a heartbeat at all".to_vec(), DropReason::Malformed),
        (good[..good.len() - 1].to_vec(), DropReason::Malformed),
        (vec![0xAB; DATAGRAM_BYTES_MAX + 100], DropReason::Oversize),
        (
            datagram(&key(), "another-cluster", "b", u64::MAX / 2),
            DropReason::WrongCluster,
        ),
        (
            datagram(&key(), CLUSTER, "a", u64::MAX / 2),
            DropReason::OwnNode,
        ),
        (datagram(&key(), CLUSTER, "b", 1), DropReason::Stale),
    ];
    let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (packet, reason) in &cases {
        for _ in 0..3 {
            sender.send_to(packet, a.udp).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        while a.hb.dropped(Path::Udp, *reason) < 3 {
            assert!(Instant::now() < deadline, "{reason:?} not counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The same over gRPC: a stream of messages signed with another key, and an oversize one.
    let mut client = v1::heartbeat_client::HeartbeatClient::connect(a.url.clone())
        .await
        .unwrap();
    let body = seal::encode_body(Beat {
        cluster_id: CLUSTER.into(),
        node: "b".into(),
        seq: u64::MAX / 2,
        healthy: false,
        ..Beat::default()
    })
    .unwrap();
    let forged = vec![other_key.sign(body.clone()), other_key.sign(body)];
    let mut answers = client
        .beats(tokio_stream::iter(forged))
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    while a.hb.dropped(Path::Grpc, DropReason::BadMac) < 2 {
        assert!(Instant::now() < deadline, "forged gRPC beats not counted");
        let _ = tokio::time::timeout(Duration::from_millis(50), answers.next()).await;
    }
    drop(answers);
    // Nothing of this reached the detector: b is alive on both paths, healthy, with its own seqs.
    let view = a.hb.peer();
    assert!(alive_on_both(&view.state), "{view:?}");
    let last = view.last.unwrap();
    assert!(last.healthy && last.seq < u64::MAX / 2);
    assert_eq!(a.hb.dropped(Path::Udp, DropReason::Stale), 3);
    assert!(view.dropped_total >= 3 * cases.len() as u64 + 2);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_promise_counts_from_the_primarys_send() {
    const CONFIRM_MS: u64 = 5000;
    let (a, b) = pair().await;
    wait_for("a sees b", &a, alive_on_both).await;
    assert_eq!(a.hb.confirmed_until(), None, "no promise made yet");
    let before = Instant::now();
    b.confirm_ms.store(CONFIRM_MS, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    let first = loop {
        if let Some(until) = a.hb.confirmed_until() {
            break until;
        }
        assert!(Instant::now() < deadline, "no promise seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Counted from a send of A's that B had received before it promised: not later than now,
    // and (allowing one interval for the beat B echoed) not before the promise was turned on.
    let now = Instant::now();
    assert!(
        first <= now + Duration::from_millis(CONFIRM_MS),
        "longer than the standby's own count"
    );
    assert!(
        first + Duration::from_millis(4 * INTERVAL_MS)
            >= before + Duration::from_millis(CONFIRM_MS),
        "counted from a beat far older than the promise"
    );
    // It moves forward as later beats are echoed, and never back.
    tokio::time::sleep(Duration::from_millis(4 * INTERVAL_MS)).await;
    let later = a.hb.confirmed_until().unwrap();
    assert!(later > first);
    b.confirm_ms.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(4 * INTERVAL_MS)).await;
    assert!(
        a.hb.confirmed_until().unwrap() >= later,
        "a promise made stands"
    );
    // B's own view: A promised nothing.
    assert_eq!(b.hb.confirmed_until(), None);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_learnt_late_is_heard_and_a_short_key_file_says_how_to_make_one() {
    let a = Node::start("a", Role::Primary).await;
    let b = Node::start("b", Role::Standby).await;
    tokio::time::sleep(Duration::from_millis(2 * INTERVAL_MS)).await;
    assert_eq!(
        a.hb.peer().state,
        PeerState::Unknown,
        "never heard is not dead"
    );
    // Only B knows A: A hears B on both paths (B's datagrams and B's stream), B hears A on
    // gRPC (the answers on its stream), and UDP stays down on B's side.
    b.hb.set_peer(Some(a.udp), Some(a.url.clone()));
    wait_for("a sees b", &a, alive_on_both).await;
    wait_for("b sees a on grpc", &b, |s| {
        *s == PeerState::Alive {
            paths_down: vec![Path::Udp],
        }
    })
    .await;
    a.stop().await;
    b.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hb.key");
    std::fs::write(&file, b"short").unwrap();
    let err = HeartbeatKey::from_file(&file).unwrap_err().to_string();
    assert!(err.contains("head -c 32 /dev/urandom"), "{err}");
    let err = HeartbeatKey::from_file(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
}
