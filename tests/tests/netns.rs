//! The failover lab checked on its own: two namespaces talk over TCP and UDP through the
//! router; a partition stops both (an established connection too) and a heal restores both;
//! `drop_udp` leaves TCP up; `isolate` cuts a node from everyone; a process spawned in a
//! namespace is the program itself (SIGSTOP, SIGCONT, SIGKILL reach it); teardown leaves no
//! namespace and no process behind, after a panic too, and a stale lab of a dead pid is
//! removed; etcd on loopback keeps its data over a stop and a start, and etcd inside the lab is
//! reached through the router and cut by a partition; stress-ng runs for its duration.
//!
//! These need root, `ip` and `nft` (`apt-get install iproute2 nftables`), etcd
//! (`etcd-server`) and `stress-ng`: without them they fail saying so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use concord_tests::etcd::Etcd;
use concord_tests::netns::{self, Lab};
use concord_tests::process::wait_until;
use concord_tests::stress;

/// How long one probe (connect, or a reply) may take.
const PROBE_MS: u64 = 400;
/// How long traffic may take to flow again after a heal.
const HEAL_MS_MAX: u64 = 5_000;
/// The port of the echo servers inside the lab.
const ECHO_PORT: u16 = 7000;

/// A TCP and a UDP echo server bound inside a lab node, served from threads of the test.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(lab: &Lab, node: &str) -> Echo {
        let addr = SocketAddr::from((lab.addr(node), ECHO_PORT));
        let (tcp, udp) = lab.run_in(node, || {
            (
                TcpListener::bind(addr).unwrap(),
                UdpSocket::bind(addr).unwrap(),
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_stop = stop.clone();
        std::thread::spawn(move || serve_tcp(tcp, &tcp_stop));
        let udp_stop = stop.clone();
        std::thread::spawn(move || serve_udp(udp, &udp_stop));
        Echo { stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve_tcp(listener: TcpListener, stop: &Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::SeqCst) {
        let Ok((mut stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let stop = stop.clone();
        std::thread::spawn(move || {
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 1024];
            while !stop.load(Ordering::SeqCst) {
                match stream.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

fn serve_udp(socket: UdpSocket, stop: &AtomicBool) {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

/// Whether a new TCP connection from `from` to `to`'s echo server echoes within the deadline.
fn tcp_works(lab: &Lab, from: &str, to: &str) -> bool {
    let target = SocketAddr::from((lab.addr(to), ECHO_PORT));
    let stream = lab.run_in(from, || {
        TcpStream::connect_timeout(&target, Duration::from_millis(PROBE_MS))
    });
    stream.is_ok_and(|mut stream| echoes(&mut stream))
}

/// Whether one message on `stream` comes back within the deadline.
fn echoes(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(PROBE_MS)))
        .unwrap();
    if stream.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// Whether a UDP datagram from `from` to `to`'s echo server comes back within the deadline.
fn udp_works(lab: &Lab, from: &str, to: &str) -> bool {
    let target = SocketAddr::from((lab.addr(to), ECHO_PORT));
    let socket = lab.run_in(from, || UdpSocket::bind((lab.addr(from), 0)).unwrap());
    socket
        .set_read_timeout(Some(Duration::from_millis(PROBE_MS)))
        .unwrap();
    socket.send_to(b"ping", target).unwrap();
    let mut buf = [0u8; 4];
    matches!(socket.recv_from(&mut buf), Ok((4, _))) && &buf == b"ping"
}

#[test]
fn two_namespaces_talk_over_tcp_and_udp_through_the_router() {
    let lab = Lab::standard();
    let _echo = Echo::start(&lab, "b");
    assert!(tcp_works(&lab, "a", "b"), "TCP a → b");
    assert!(udp_works(&lab, "a", "b"), "UDP a → b");
    assert!(tcp_works(&lab, "w", "b"), "TCP w → b");
}

#[test]
fn partition_stops_tcp_and_udp_and_heal_restores_both() {
    let lab = Lab::standard();
    let _echo = Echo::start(&lab, "b");
    let target = SocketAddr::from((lab.addr("b"), ECHO_PORT));
    let mut established = lab.run_in("a", || TcpStream::connect(target).unwrap());
    assert!(
        echoes(&mut established),
        "the established connection works first"
    );

    lab.partition(&["a"], &["b"]);
    assert!(
        !tcp_works(&lab, "a", "b"),
        "a new TCP connection crossed the partition"
    );
    assert!(!udp_works(&lab, "a", "b"), "UDP crossed the partition");
    assert!(
        !echoes(&mut established),
        "the established connection crossed the partition"
    );
    assert!(tcp_works(&lab, "w", "b"), "w → b is outside the partition");

    lab.heal();
    assert!(
        wait_until(HEAL_MS_MAX, || tcp_works(&lab, "a", "b")),
        "TCP after the heal"
    );
    assert!(
        wait_until(HEAL_MS_MAX, || udp_works(&lab, "a", "b")),
        "UDP after the heal"
    );
    // The lost echo (and the probe's) arrive late: drain them, then the stream works again.
    assert!(
        wait_until(2 * HEAL_MS_MAX, || echoes(&mut established)),
        "the established connection after the heal"
    );
}

#[test]
fn drop_udp_leaves_tcp_up() {
    let lab = Lab::standard();
    let _echo = Echo::start(&lab, "b");
    lab.drop_udp("a", "b");
    assert!(!udp_works(&lab, "a", "b"), "UDP a → b crossed drop_udp");
    assert!(tcp_works(&lab, "a", "b"), "TCP a → b stopped with drop_udp");
    assert!(udp_works(&lab, "w", "b"), "UDP w → b is another path");
    lab.heal();
    assert!(
        wait_until(HEAL_MS_MAX, || udp_works(&lab, "a", "b")),
        "UDP after the heal; rules:\n{}",
        lab.rules()
    );
}

#[test]
fn isolate_cuts_a_node_from_everyone() {
    let lab = Lab::standard();
    let _echo_b = Echo::start(&lab, "b");
    let _echo_w = Echo::start(&lab, "w");
    lab.isolate("a");
    assert!(!tcp_works(&lab, "a", "b"), "a → b");
    assert!(!tcp_works(&lab, "a", "w"), "a → w");
    assert!(tcp_works(&lab, "b", "w"), "b → w stays up");
    lab.heal();
    assert!(wait_until(HEAL_MS_MAX, || tcp_works(&lab, "a", "w")));
}

/// The one-letter state of process `pid` (`S`, `T`, …) from `/proc/PID/stat`.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.trim_start().chars().next()
}

/// The inode of a network namespace link (`/proc/PID/ns/net` or `/run/netns/NAME`).
fn netns_inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn signals_reach_a_process_spawned_in_a_namespace() {
    let lab = Lab::standard();
    let dir = tempfile::tempdir().unwrap();
    let mut sleep = Command::new("sleep");
    sleep.arg("60");
    let process = lab.spawn("a", sleep, &dir.path().join("sleep.stderr"));
    let pid = process.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("sleep"), "pid {pid} is {exe:?}, not sleep");
    assert_eq!(
        netns_inode(&format!("/proc/{pid}/ns/net")),
        netns_inode(&format!("/run/netns/{}", lab.netns("a"))),
        "the process runs in a's namespace"
    );

    process.pause();
    assert!(
        wait_until(2_000, || state(pid) == Some('T')),
        "SIGSTOP: {:?}",
        state(pid)
    );
    process.resume();
    assert!(
        wait_until(2_000, || state(pid) == Some('S')),
        "SIGCONT: {:?}",
        state(pid)
    );
    process.kill();
    assert!(state(pid).is_none(), "SIGKILL: pid {pid} is still there");
}

/// The lab namespaces (of any lab) whose name starts with `prefix`.
fn namespaces_with(prefix: &str) -> Vec<String> {
    netns::list_netns()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// The namespace prefix of `lab` (`cc<pid>x<n>`).
fn prefix_of(lab: &Lab) -> String {
    let router = lab.router_netns();
    router[..router.len() - netns::ROUTER.len()].to_string()
}

#[test]
fn teardown_leaves_no_namespace_and_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::standard();
    let prefix = prefix_of(&lab);
    assert_eq!(namespaces_with(&prefix).len(), 4, "r, a, b, w");
    let mut sleep = Command::new("sleep");
    sleep.arg("60");
    let process = lab.spawn("b", sleep, &dir.path().join("sleep.stderr"));
    let pid = process.pid();
    process.pause();
    std::mem::forget(process); // only the lab's teardown may end it
    drop(lab);
    assert!(
        namespaces_with(&prefix).is_empty(),
        "{prefix}: namespaces left"
    );
    assert!(
        wait_until(2_000, || !matches!(state(pid), Some(s) if s != 'Z')),
        "the paused process in b survived the teardown: {:?}",
        state(pid)
    );

    // A panicking test tears its lab down too.
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let lab = Lab::new(&["x"]);
        tx.send(prefix_of(&lab)).unwrap();
        panic!("a test fails with its lab up");
    })
    .join();
    assert!(panicked.is_err());
    let prefix = rx.recv().unwrap();
    assert!(
        namespaces_with(&prefix).is_empty(),
        "{prefix}: left by a panic"
    );
}

#[test]
fn a_stale_lab_of_a_dead_pid_is_removed_by_the_next_lab() {
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let stale = format!("cc{dead_pid}x0r");
    let status = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(status.success());
    let dir = tempfile::tempdir().unwrap();
    let mut sleep = Command::new("sleep");
    sleep.arg("60");
    let orphan = netns::launch_in(&stale, "orphan", sleep, &dir.path().join("o.stderr"));
    let orphan_pid = orphan.pid();
    std::mem::forget(orphan);

    let _lab = Lab::new(&["a"]);
    assert!(
        namespaces_with(&stale).is_empty(),
        "the stale namespace {stale} stayed"
    );
    assert!(
        wait_until(2_000, || !matches!(state(orphan_pid), Some(s) if s != 'Z')),
        "the process in the stale lab survived"
    );
}

/// One HTTP/1.0 POST of a JSON body to etcd's v3 gateway; the answer's body.
fn etcd_post(client: SocketAddr, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect_timeout(&client, Duration::from_secs(2)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {client}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn etcd_on_loopback_keeps_its_data_over_a_stop_and_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start_loopback(dir.path());
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    // key "concord" = "epoch-7", base64 as the v3 gateway takes them.
    let put = r#"{"key":"Y29uY29yZA==","value":"ZXBvY2gtNw=="}"#;
    let answer = etcd_post(etcd.client_addr(), "/v3/kv/put", put);
    assert!(answer.contains("revision"), "put: {answer}");

    etcd.pause();
    assert!(!etcd.healthy(), "a paused etcd answered");
    etcd.resume();
    assert!(wait_until(5_000, || etcd.healthy()), "resumed etcd");

    etcd.stop();
    assert!(!etcd.running() && !etcd.healthy());
    etcd.start();
    let range = r#"{"key":"Y29uY29yZA=="}"#;
    let answer = etcd_post(etcd.client_addr(), "/v3/kv/range", range);
    assert!(
        answer.contains("ZXBvY2gtNw=="),
        "the key after the restart: {answer}"
    );
    etcd.stop();
    assert_no_etcd_data_outside(dir.path());
}

/// etcd's data stays in the test's directory.
fn assert_no_etcd_data_outside(dir: &Path) {
    assert!(dir.join("etcd").join("member").is_dir());
}

#[test]
fn etcd_inside_the_lab_is_reached_through_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::standard();
    let etcd = Etcd::start_in(&lab, "w", dir.path());
    assert_eq!(etcd.client_addr().ip(), lab.addr("w"));
    let client = etcd.client_addr();
    let reaches = |node: &str| {
        lab.run_in(node, || {
            TcpStream::connect_timeout(&client, Duration::from_millis(PROBE_MS)).is_ok()
        })
    };
    assert!(reaches("a"), "a → etcd in w");
    lab.partition(&["a"], &["w"]);
    assert!(!reaches("a"), "a reached etcd across the partition");
    assert!(reaches("b"), "b → etcd in w");
    lab.heal();
    assert!(wait_until(HEAL_MS_MAX, || reaches("a")));

    // From the test process, through a gateway dialling from b.
    let gateway = lab.gateway("b", client);
    let answer = etcd_post(gateway.addr(), "/v3/kv/range", r#"{"key":"eA=="}"#);
    assert!(answer.contains("header"), "through the gateway: {answer}");
}

#[test]
fn stress_runs_for_its_duration_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut stress = stress::cpu_disk_stress(dir.path(), Duration::from_secs(1));
    assert!(stress.wait_exit(500).is_none(), "stress-ng ended early");
    let status = stress
        .wait_exit(20_000)
        .expect("stress-ng ends after its timeout");
    assert!(status.success(), "stress-ng: {}", stress.stderr_tail());
}
