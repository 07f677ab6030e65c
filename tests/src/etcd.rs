//! A real etcd for the failover tests: one member, its own data directory, started on free
//! loopback ports or inside a lab namespace at a given address, stopped and started again on
//! the same data directory ("the quorum store down for 30 s").
//!
//! [`Etcd::start_loopback`] picks two free ports on 127.0.0.1 (client and peer);
//! [`Etcd::start_in`] runs etcd inside a [`Lab`] node's namespace on its address (client port
//! [`CLIENT_PORT`], peer port [`PEER_PORT`]). Both wait until `GET /health` on the client URL
//! answers `"health":"true"` (the member has elected itself) within [`START_MS_MAX`]; inside a
//! lab the check runs on a thread in that namespace. [`Etcd::stop`] kills it (SIGKILL: what a
//! crash looks like to clients), [`Etcd::start`] starts it again on the same data directory and
//! ports; [`Etcd::pause`]/[`Etcd::resume`] freeze it with SIGSTOP/SIGCONT instead (connections
//! stay open, nothing answers).
//!
//! Implementation caveats:
//! * etcd is Debian's `etcd-server` (`/usr/bin/etcd`, 3.4); when it is missing the start
//!   panics with `apt-get install etcd-server`.
//! * Loopback ports are found by binding port 0 and closing it: another process may take one
//!   in between (the start then fails with etcd's own message).
//! * One member only: the tests need a store that is up or down, not etcd's own failover.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::netns::{self, Lab};
use crate::process::{Process, wait_until};

/// How long etcd may take to answer healthy after a start (a restart replays its own data).
pub const START_MS_MAX: u64 = 20_000;
/// The client port inside a lab namespace.
pub const CLIENT_PORT: u16 = 2379;
/// The peer port inside a lab namespace.
pub const PEER_PORT: u16 = 2380;
/// How long one health request may take.
const HEALTH_MS_MAX: u64 = 500;

/// A running (or stopped) one-member etcd.
pub struct Etcd {
    data: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    /// The lab namespace it runs in, if any.
    netns: Option<String>,
    process: Option<Process>,
}

impl Etcd {
    /// etcd on two free loopback ports, its data in `dir/etcd` (stderr in `dir/etcd.stderr`).
    pub fn start_loopback(dir: &Path) -> Etcd {
        let client = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Etcd::start_at(dir, client, peer, None)
    }

    /// etcd inside `lab`'s node `node` on its address ([`CLIENT_PORT`], [`PEER_PORT`]).
    pub fn start_in(lab: &Lab, node: &str, dir: &Path) -> Etcd {
        let addr = lab.addr(node);
        let client = SocketAddr::from((addr, CLIENT_PORT));
        let peer = SocketAddr::from((addr, PEER_PORT));
        Etcd::start_at(dir, client, peer, Some(lab.netns(node).to_string()))
    }

    fn start_at(dir: &Path, client: SocketAddr, peer: SocketAddr, netns: Option<String>) -> Etcd {
        let mut etcd = Etcd {
            data: dir.join("etcd"),
            client,
            peer,
            netns,
            process: None,
        };
        etcd.start();
        etcd
    }

    /// The client URL (`http://ADDR:PORT`), what the quorum store's `endpoints` take.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// Starts it (again, on the same data directory and ports) and waits until it is healthy;
    /// panics with its standard error when it is not within [`START_MS_MAX`].
    pub fn start(&mut self) {
        assert!(
            self.process.is_none(),
            "etcd at {} already runs",
            self.client
        );
        check_installed();
        let stderr = self.data.with_extension("stderr");
        let command = self.command();
        let process = match &self.netns {
            Some(netns) => netns::launch_in(netns, "etcd", command, &stderr),
            None => Process::launch_command("etcd", command, &stderr),
        };
        self.process = Some(process);
        if !wait_until(START_MS_MAX, || self.healthy()) {
            let tail = self.process.as_ref().map(Process::stderr_tail);
            self.stop();
            panic!(
                "etcd at {} not healthy within {START_MS_MAX} ms; stderr: {}",
                self.client,
                tail.unwrap_or_default()
            );
        }
    }

    fn command(&self) -> Command {
        let client = self.endpoint();
        let peer = format!("http://{}", self.peer);
        let mut command = Command::new("etcd");
        command
            .args(["--name", "concord-test"])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("concord-test={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        command
    }

    /// Kills it (SIGKILL) and waits for its end; its data directory stays for [`Etcd::start`].
    pub fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// Whether it runs (started and not stopped; a paused one runs).
    pub fn running(&self) -> bool {
        self.process.is_some()
    }

    /// SIGSTOP: frozen, its sockets open, nothing answered.
    pub fn pause(&self) {
        self.process.as_ref().expect("etcd runs").pause();
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        self.process.as_ref().expect("etcd runs").resume();
    }

    /// Whether `GET /health` answers `"health":"true"` within a short deadline.
    pub fn healthy(&self) -> bool {
        let client = self.client;
        match &self.netns {
            Some(netns) => netns::in_netns(netns, || health(client)),
            None => health(client),
        }
    }
}

/// One `GET /health` over HTTP/1.0.
fn health(client: SocketAddr) -> bool {
    let deadline = Duration::from_millis(HEALTH_MS_MAX);
    let Ok(mut stream) = TcpStream::connect_timeout(&client, deadline) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(deadline));
    let _ = stream.set_write_timeout(Some(deadline));
    let request = format!("GET /health HTTP/1.0\r\nHost: {client}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// Panics with how to install etcd when it is missing.
fn check_installed() {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "etcd is missing: the quorum store tests need it: apt-get install etcd-server"
    );
}

/// A port free on 127.0.0.1 just now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("a bound address").port()
}
