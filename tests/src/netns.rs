//! The failover test lab: network namespaces the test creates itself, joined by a router whose
//! forward chain the test fills with nftables rules to partition the nodes.
//!
//! A [`Lab`] is a star. A router namespace (`r`) sits in the middle with IP forwarding on;
//! each node (`a`, `b` for the two concord nodes, `w` for the witness or etcd, more when a
//! test wants them) has a namespace of its own joined to the router by a veth pair: node `i`
//! (counted from 1 in the order given) is `10.200.i.2/24` on its `eth0`, the router is
//! `10.200.i.1` on its `to-<node>` and is the node's default route. `lo` is up everywhere.
//! Nothing is added to the host's own network: the veth pairs are created inside the router
//! namespace with their peers moved straight into the nodes'.
//!
//! Faults are rules in the router's `inet concord_lab` table, `forward` chain (policy accept):
//! [`Lab::partition`] drops every packet both ways between two groups, [`Lab::isolate`] cuts a
//! node from every other, [`Lab::drop_udp`] drops UDP only between two nodes (the heartbeat's
//! second path down, its gRPC path up), [`Lab::heal`] flushes the chain. The chain has no
//! conntrack rule, so a drop holds at once for established TCP connections too: their
//! packets are dropped like any other, and they resume (by retransmission) after a heal.
//!
//! Processes: [`Lab::spawn`] runs a [`Command`] inside a node's namespace as
//! `ip netns exec NAME PROGRAM ARGS…`. `ip` enters the namespace and then execs the program,
//! so the child's pid is the program's own once the exec happened; `spawn` waits for it (the
//! child's `/proc/PID/exe` no longer `ip`), so that a signal sent to [`Process::pid`] reaches
//! the program and never `ip`. Threads: [`Lab::run_in`] runs a closure on a thread moved into
//! a node's namespace (`setns`): every socket it creates lives there (a test's probes, a
//! health check of a store inside the lab). [`Gateway`] forwards a loopback port of the test
//! process to an address inside the lab, dialling from a node's namespace, so that a client in
//! the test process reaches a node (and is partitioned with the node it dials from).
//!
//! Names: the namespaces are `cc<pid>x<n><node>` and `cc<pid>x<n>r` (the test process's pid,
//! `n` counts the labs of that process), so parallel tests and parallel test binaries never
//! meet. [`Lab::new`] first removes every lab whose pid is no longer running (left by a test
//! run that was killed): its processes are killed and its namespaces deleted. Dropping a lab
//! (a panicking test included) kills every process inside its namespaces and deletes them.
//!
//! Implementation caveats:
//! * Root is required, and `ip` (iproute2) and `nft` (nftables): without them [`Lab::new`]
//!   panics with how to install them — the tests that need a lab fail, never skip.
//! * IPv4 only; the subnets `10.200.0.0/16` exist only inside the lab's namespaces.
//! * A process spawned in a lab sees the host's file system and its own mount namespace (`ip
//!   netns exec` remounts `/sys`); only its network is the lab's.
//! * A lab of a live pid is never touched, even when that test seems stuck.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::process::{POLL_MS, Process};

/// The router's short name.
pub const ROUTER: &str = "r";
/// The nodes of [`Lab::standard`]: the two concord nodes and the quorum store's.
pub const STANDARD_NODES: [&str; 3] = ["a", "b", "w"];
/// How long `ip netns exec` may take to exec the program it runs.
pub const EXEC_MS_MAX: u64 = 5_000;
/// How long one `ip`/`nft` command of the lab's setup, faults or teardown may take.
pub const TOOL_MS_MAX: u64 = 10_000;
/// The most nodes a lab holds (one `10.200.i.0/24` each).
pub const NODES_MAX: usize = 200;
/// How long a [`Gateway`] may take to dial its target from inside the lab.
pub const DIAL_MS_MAX: u64 = 1_000;

/// The nftables table the faults live in (in the router namespace).
const TABLE: &str = "inet concord_lab";
/// Labs made by this process so far (part of the namespace names).
static LABS_MADE: AtomicU32 = AtomicU32::new(0);

/// A node of a lab: its namespace and its address.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its short name (`a`).
    pub name: String,
    /// The network namespace (`cc4242x0a`).
    pub netns: String,
    /// Its address on `eth0` (`10.200.1.2`).
    pub addr: Ipv4Addr,
}

/// Network namespaces joined by a router, torn down when dropped.
pub struct Lab {
    /// `cc<pid>x<n>`: the prefix of every namespace of the lab.
    prefix: String,
    nodes: Vec<Node>,
    /// Namespaces created so far (deleted on drop, even when the setup failed midway).
    created: Vec<String>,
}

impl Lab {
    /// A lab with the nodes `a`, `b` and `w`.
    pub fn standard() -> Lab {
        Lab::new(&STANDARD_NODES)
    }

    /// A lab with these nodes (short lowercase names, not `r`), after removing stale labs;
    /// panics with what to do when not root or `ip`/`nft` is missing.
    pub fn new(nodes: &[&str]) -> Lab {
        check_tools();
        check_node_names(nodes);
        remove_stale_labs();
        let n = LABS_MADE.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("cc{}x{n}", std::process::id());
        let mut lab = Lab {
            prefix: prefix.clone(),
            nodes: Vec::new(),
            created: Vec::new(),
        };
        lab.add_router();
        for (i, name) in nodes.iter().enumerate() {
            lab.add_node(i + 1, name);
        }
        lab
    }

    fn add_router(&mut self) {
        let router = format!("{}{ROUTER}", self.prefix);
        self.add_netns(&router);
        run_in_netns_cmd(
            &router,
            &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
        );
        let script = format!(
            "add table {TABLE}\n\
             add chain {TABLE} forward {{ type filter hook forward priority 0; policy accept; }}\n"
        );
        nft(&router, &script);
    }

    fn add_node(&mut self, index: usize, name: &str) {
        let router = self.router_netns();
        let netns = format!("{}{name}", self.prefix);
        self.add_netns(&netns);
        let veth = format!("to-{name}");
        let router_cidr = format!("10.200.{index}.1/24");
        let node_cidr = format!("10.200.{index}.2/24");
        let gateway = format!("10.200.{index}.1");
        let peer = ["peer", "name", "eth0", "netns", netns.as_str()];
        let mut add = vec!["-n", &router, "link", "add", "name", &veth, "type", "veth"];
        add.extend(peer);
        ip(&add);
        ip(&["-n", &router, "addr", "add", &router_cidr, "dev", &veth]);
        ip(&["-n", &router, "link", "set", "dev", &veth, "up"]);
        ip(&["-n", &netns, "addr", "add", &node_cidr, "dev", "eth0"]);
        ip(&["-n", &netns, "link", "set", "dev", "eth0", "up"]);
        ip(&["-n", &netns, "route", "add", "default", "via", &gateway]);
        self.nodes.push(Node {
            name: name.to_string(),
            netns,
            addr: Ipv4Addr::new(10, 200, index as u8, 2),
        });
    }

    fn add_netns(&mut self, netns: &str) {
        ip(&["netns", "add", netns]);
        self.created.push(netns.to_string());
        ip(&["-n", netns, "link", "set", "dev", "lo", "up"]);
    }

    /// The router's namespace.
    pub fn router_netns(&self) -> String {
        format!("{}{ROUTER}", self.prefix)
    }

    /// The node called `name`; panics when the lab has none.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("the lab has no node {name:?}"))
    }

    /// Every node, in the order given to [`Lab::new`].
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The address of node `name`.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.node(name).addr
    }

    /// The network namespace of node `name` (for `ip netns exec`).
    pub fn netns(&self, name: &str) -> &str {
        &self.node(name).netns
    }

    /// `command` made to run inside node `name`'s namespace (`ip netns exec NAME …`), with its
    /// environment and directory kept; for a command run to its end (`.output()`).
    pub fn command(&self, name: &str, command: Command) -> Command {
        command_in(self.netns(name), command)
    }

    /// Starts `command` inside node `name`'s namespace with standard error appended to
    /// `stderr_path`, and waits until `ip` has exec'ed it: the [`Process`]'s pid is then the
    /// program's own, so every signal reaches it. Waits for no output line: see
    /// [`Process::expect_listening`] and [`Process::wait_line`].
    pub fn spawn(&self, name: &str, command: Command, stderr_path: &Path) -> Process {
        launch_in(self.netns(name), name, command, stderr_path)
    }

    /// Drops every packet, both ways, between each node of `left` and each node of `right`.
    pub fn partition(&self, left: &[&str], right: &[&str]) {
        let mut script = String::new();
        for l in left {
            for r in right {
                let (l, r) = (self.addr(l), self.addr(r));
                script.push_str(&rule(&format!("ip saddr {l} ip daddr {r}")));
                script.push_str(&rule(&format!("ip saddr {r} ip daddr {l}")));
            }
        }
        nft(&self.router_netns(), &script);
    }

    /// Drops every packet to and from node `name` (its own loopback still works).
    pub fn isolate(&self, name: &str) {
        let addr = self.addr(name);
        let script = rule(&format!("ip saddr {addr}")) + &rule(&format!("ip daddr {addr}"));
        nft(&self.router_netns(), &script);
    }

    /// Drops UDP only, both ways, between nodes `x` and `y`: TCP between them and every other
    /// path stay up.
    pub fn drop_udp(&self, x: &str, y: &str) {
        let (x, y) = (self.addr(x), self.addr(y));
        let script = rule(&format!("ip saddr {x} ip daddr {y} meta l4proto udp"))
            + &rule(&format!("ip saddr {y} ip daddr {x} meta l4proto udp"));
        nft(&self.router_netns(), &script);
    }

    /// Removes every fault: all traffic flows again.
    pub fn heal(&self) {
        nft(
            &self.router_netns(),
            &format!("flush chain {TABLE} forward\n"),
        );
    }

    /// The fault rules now in force, as `nft list chain` prints them (for a failure message).
    pub fn rules(&self) -> String {
        let out = tool_output(
            Command::new("ip").args(["netns", "exec", &self.router_netns(), "nft", "list"]),
            &["chain", "inet", "concord_lab", "forward"],
        );
        out.unwrap_or_else(|e| e)
    }

    /// Runs `f` on a thread inside node `name`'s namespace and returns what it returns: every
    /// socket it creates lives in that namespace. Panics (with `f`'s message) when `f` does.
    pub fn run_in<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> T {
        in_netns(self.netns(name), f)
    }

    /// A loopback port of the test process forwarding each connection to `to`, dialled from
    /// inside node `from`'s namespace.
    pub fn gateway(&self, from: &str, to: SocketAddr) -> Gateway {
        Gateway::start(self.netns(from), to)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for netns in self.created.iter().rev() {
            delete_netns(netns);
        }
    }
}

/// One drop rule for the forward chain.
fn rule(matches: &str) -> String {
    format!("add rule {TABLE} forward {matches} drop\n")
}

/// Panics with what to install when not root or `ip`/`nft` is missing.
fn check_tools() {
    let uid = tool_output(&mut Command::new("id"), &["-u"]).unwrap_or_default();
    assert!(
        uid.trim() == "0",
        "the failover lab creates network namespaces and needs root (uid 0, not {:?}): run the \
         tests as root (scripts/test in a container or VM)",
        uid.trim()
    );
    for (tool, probe) in [("ip", "-V"), ("nft", "--version")] {
        let found = Command::new(tool)
            .arg(probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`{tool}` is missing: the failover lab needs it: apt-get install iproute2 nftables"
        );
    }
}

fn check_node_names(nodes: &[&str]) {
    assert!(
        nodes.len() <= NODES_MAX,
        "a lab holds at most {NODES_MAX} nodes"
    );
    let unique: BTreeSet<&&str> = nodes.iter().collect();
    assert!(unique.len() == nodes.len(), "node names repeat: {nodes:?}");
    for name in nodes {
        let short = !name.is_empty() && name.len() <= 8;
        let plain = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        assert!(
            short && plain && *name != ROUTER,
            "node name {name:?}: 1 to 8 lowercase letters or digits, and not {ROUTER:?}"
        );
    }
}

/// The pid in a lab namespace's name (`cc<pid>x…`), if it is one.
fn lab_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix("cc")?;
    let (pid, _) = rest.split_once('x')?;
    if pid.is_empty() || !pid.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Every network namespace `ip netns list` names.
pub fn list_netns() -> Vec<String> {
    let text = tool_output(&mut Command::new("ip"), &["netns", "list"]).unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Removes the namespaces of labs whose test process is gone.
fn remove_stale_labs() {
    for netns in list_netns() {
        let Some(pid) = lab_pid(&netns) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing the stale lab namespace {netns} (pid {pid} is gone)");
            delete_netns(&netns);
        }
    }
}

/// Kills every process inside `netns` (SIGCONT first: a paused one too), then deletes it.
fn delete_netns(netns: &str) {
    let pids = tool_output(&mut Command::new("ip"), &["netns", "pids", netns]).unwrap_or_default();
    for pid in pids.split_whitespace() {
        for signal in ["-CONT", "-KILL"] {
            let _ = Command::new("kill")
                .args([signal, pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    if let Err(why) = tool_output(&mut Command::new("ip"), &["netns", "delete", netns]) {
        eprintln!("delete network namespace {netns}: {why}");
    }
}

/// Runs `ip ARGS`; panics with its standard error when it fails.
fn ip(args: &[&str]) {
    if let Err(why) = tool_output(&mut Command::new("ip"), args) {
        panic!("ip {}: {why}", args.join(" "));
    }
}

/// Runs `ARGS` inside `netns` to its end; panics when it fails.
fn run_in_netns_cmd(netns: &str, args: &[&str]) {
    let mut full = vec!["netns", "exec", netns];
    full.extend_from_slice(args);
    ip(&full);
}

/// Feeds `script` to `nft -f -` inside `netns`; panics when nft refuses it.
fn nft(netns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start nft in {netns}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(script.as_bytes())
        .unwrap_or_else(|e| panic!("write to nft in {netns}: {e}"));
    drop(stdin);
    let output = finish(child, TOOL_MS_MAX).unwrap_or_else(|e| panic!("nft in {netns}: {e}"));
    assert!(
        output.status.success(),
        "nft in {netns} refused:\n{script}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `command ARGS` within [`TOOL_MS_MAX`]: its standard output, or why it failed.
fn tool_output(command: &mut Command, args: &[&str]) -> Result<String, String> {
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {command:?}: {e}"))?;
    let output = finish(child, TOOL_MS_MAX)?;
    if !output.status.success() {
        return Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Waits at most `ms` for `child` to end (killed after that), collecting its outputs.
fn finish(mut child: std::process::Child, ms: u64) -> Result<std::process::Output, String> {
    let deadline = Instant::now() + Duration::from_millis(ms);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|e| e.to_string()),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not end within {ms} ms"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(POLL_MS)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `command` rewritten as `ip netns exec NETNS PROGRAM ARGS…`, keeping its environment
/// changes and its directory.
pub fn command_in(netns: &str, command: Command) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped
        .args(["netns", "exec", netns])
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// Starts `command` inside `netns` (see [`Lab::spawn`]) and waits until `ip` exec'ed it.
pub fn launch_in(netns: &str, name: &str, command: Command, stderr_path: &Path) -> Process {
    let process = Process::launch_command(name, command_in(netns, command), stderr_path);
    let pid = process.pid();
    let exec_done = crate::process::wait_until(EXEC_MS_MAX, || !runs_ip(pid));
    assert!(
        exec_done,
        "{name}: `ip netns exec {netns}` did not exec its program within {EXEC_MS_MAX} ms"
    );
    process
}

/// Whether process `pid` is still the `ip` program (false once it exec'ed, or ended).
fn runs_ip(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|exe| exe.file_name().is_some_and(|f| f == "ip"))
}

/// Runs `f` on a thread moved into network namespace `netns` and returns its result.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            enter_netns(&path);
            f()
        });
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// A loopback listener of the test process whose connections are forwarded to an address
/// inside a lab, dialled from a node's namespace: a client in the test process reaches that
/// address as that node would (and is cut when that node is). Stops when dropped (its
/// connections are shut down).
pub struct Gateway {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start(netns: &str, to: SocketAddr) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a gateway on loopback");
        listener
            .set_nonblocking(true)
            .expect("make the gateway's listener non-blocking");
        let addr = listener.local_addr().expect("the gateway's address");
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let path = format!("/run/netns/{netns}");
        let (stop2, streams2) = (stop.clone(), streams.clone());
        let accept = std::thread::spawn(move || accept_loop(listener, path, to, stop2, streams2));
        Gateway {
            addr,
            stop,
            streams,
            accept: Some(accept),
        }
    }

    /// Its loopback address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for stream in self.streams.lock().expect("gateway streams").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    path: String,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let (path, streams) = (path.clone(), streams.clone());
                std::thread::spawn(move || bridge(client, &path, to, &streams));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(POLL_MS)),
        }
    }
}

/// Dials `to` from the namespace at `path` and copies both ways between it and `client`.
fn bridge(client: TcpStream, path: &str, to: SocketAddr, streams: &Mutex<Vec<TcpStream>>) {
    enter_netns(path);
    let _ = client.set_nonblocking(false);
    let Ok(target) = TcpStream::connect_timeout(&to, Duration::from_millis(DIAL_MS_MAX)) else {
        return;
    };
    let _ = target.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (Ok(c2), Ok(t2)) = (client.try_clone(), target.try_clone()) else {
        return;
    };
    if let (Ok(c3), Ok(t3)) = (client.try_clone(), target.try_clone()) {
        streams.lock().expect("gateway streams").extend([c3, t3]);
    }
    let back = std::thread::spawn(move || copy(t2, c2));
    copy(client, target);
    let _ = back.join();
}

/// Copies `from` to `to` until either ends, then shuts both down.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
