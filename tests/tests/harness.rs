//! The harness checked on its own, without a standby: the fault proxy's cut, blackhole and
//! restore on a loopback echo server; a primary daemon with PostgreSQL under the workload,
//! killed and restarted, whose stores hold every acknowledged transaction by the checker's
//! snapshot, which agrees with the resources' own inventories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use concord_tests::check::{self, Snapshot};
use concord_tests::proxy::{FaultProxy, Link};
use concord_tests::site::{Mode, Site};
use concord_tests::workload::{Workload, WorkloadSpec};

/// How long a read on the echo connection may wait.
const READ_MS_MAX: u64 = 2_000;

/// An echo server on loopback, one thread per connection (test only).
fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(READ_MS_MAX)))
        .unwrap();
    stream
}

/// Sends `what` and reads the echo; `None` when nothing (or an end) comes back in time.
fn round_trip(stream: &mut TcpStream, what: &[u8]) -> Option<Vec<u8>> {
    stream.write_all(what).ok()?;
    let mut buf = vec![0u8; what.len()];
    stream.read_exact(&mut buf).ok()?;
    Some(buf)
}

#[test]
fn proxy_forwards_cuts_blackholes_and_restores() {
    let proxy = FaultProxy::start(echo_server());
    let mut stream = connect(&proxy);
    assert_eq!(
        round_trip(&mut stream, b"one").as_deref(),
        Some(&b"one"[..])
    );

    proxy.blackhole();
    assert_eq!(
        round_trip(&mut stream, b"two"),
        None,
        "a blackhole forwards nothing"
    );
    proxy.restore();
    let mut fresh = connect(&proxy);
    assert_eq!(
        round_trip(&mut fresh, b"three").as_deref(),
        Some(&b"three"[..])
    );

    proxy.cut();
    let mut buf = [0u8; 8];
    let read = fresh.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a cut closes the connection: {read:?}"
    );
    let mut refused = connect(&proxy);
    assert_eq!(
        round_trip(&mut refused, b"four"),
        None,
        "a cut refuses new ones"
    );

    proxy.restore();
    let mut again = connect(&proxy);
    assert_eq!(
        round_trip(&mut again, b"five").as_deref(),
        Some(&b"five"[..])
    );
    assert!(proxy.forwarded_bytes() >= 12);

    proxy.cut_after(10);
    assert_eq!(
        round_trip(&mut again, &[7u8; 32]),
        None,
        "an armed cut is taken"
    );
    assert_eq!(proxy.link(), Link::Cut);
}

#[test]
fn workload_through_a_primary_killed_and_restarted() {
    let root = tempfile::tempdir().unwrap();
    let mut primary = Site::primary(root.path(), "primary", Mode::Default, true);
    primary.start_primary();
    let workload = Workload::start(WorkloadSpec::against(&primary, 4));
    workload.wait_committed(40, 60_000);
    primary.kill();
    let first = workload.stop();
    primary.start_primary();
    let workload = Workload::start(WorkloadSpec::against(&primary, 4));
    workload.wait_committed(20, 60_000);
    let second = workload.stop();
    primary.stop();

    let snapshot = Snapshot::take(&primary);
    let acked: Vec<_> = first.acked.iter().chain(&second.acked).collect();
    let missing: Vec<String> = acked.iter().flat_map(|a| snapshot.missing(a)).collect();
    assert!(missing.is_empty(), "acknowledged but missing: {missing:#?}");
    assert!(snapshot.count("mail") >= acked.len());
    assert!(snapshot.count("orders") > 0);
    assert!(snapshot.differences(&Snapshot::take(&primary)).is_empty());
    let inventories = check::inventories(&primary);
    for resource in ["uploads", "mail", "index"] {
        assert_eq!(
            inventories.get(resource),
            snapshot.resources.get(resource),
            "{resource}: the inventory and the direct reading differ"
        );
    }
    assert_eq!(inventories["orders"].len(), snapshot.count("orders"));

    let tampered = primary.data_dir().join("uploads").join(&acked[0].file);
    std::fs::write(&tampered, b"half").unwrap();
    let found = snapshot.differences(&Snapshot::take(&primary));
    let expected = format!("uploads {}: contents differ", acked[0].file);
    assert_eq!(found, vec![expected], "the checker sees a changed file");
    eprintln!(
        "{} acknowledged, {} failed around the kill",
        acked.len(),
        first.failed + second.failed
    );
}
