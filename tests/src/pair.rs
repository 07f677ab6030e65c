//! A failover pair: two `concord` nodes with `[failover]` tables, their quorum store (the
//! witness or etcd), a workload that follows the primary, and the check that every
//! acknowledged commit is on the surviving primary.
//!
//! [`Pair::start`] makes a temporary root with a shared heartbeat key, starts the store, writes
//! each node's `concord.toml` (its own data directory with a `files` resource `uploads` and a
//! `kv` resource `index`, `[replication] mode = "sync"` with `sync_fallback = "async"` after
//! 2 s — a primary left alone after a failover must go on committing — and a `[failover]`
//! table naming the peer),
//! starts node `a` with `concord coordinator` and waits until its status says it is the primary
//! and may commit, then starts `b` with `concord standby` and waits until it follows. With
//! [`PairSpec::lab`] everything runs inside a [`Lab`] (nodes `a`, `b`, the store on `w`, the
//! workload's client on `c`), so that a test can partition or isolate a node; otherwise on
//! loopback ports.
//!
//! [`FoWorkload`] runs tasks over one `Concord::connect_any(&[a, b])` (on a thread inside `c`
//! in a lab), each transaction putting `uploads/f<i>` and inserting the kv key `f<i>` within
//! [`TXN_MS_MAX`], and keeps what was acknowledged. [`assert_all_on`] reads a stopped node's files root and sled
//! directory offline and panics with every acknowledged commit that is missing.
//!
//! Every wait has a deadline; a wait that fails panics with both nodes' failover status and the
//! tail of their standard error.
//!
//! Implementation caveats:
//! * The nodes are `a` (node 1) and `b` (node 2); `a` always starts as the primary.
//! * `concord status` and `concord promote|demote|switchover` run inside the node's own
//!   namespace in a lab, so they reach the node even while it is isolated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use participant::{Concord, Credentials};

use crate::check;
use crate::etcd::{self, Etcd};
use crate::netns::{self, Lab};
use crate::process::{POLL_MS, Process, START_MS_MAX, concord_bin, tail, wait_until};
use crate::witness::Witness;

/// How long a `concord status`, `promote`, `demote` or `switchover` run may take.
pub const COMMAND_MS_MAX: u64 = 60_000;
/// How long a client waits for a primary per call.
pub const CLIENT_FAILOVER_WAIT_MS: u64 = 10_000;
/// The gRPC port of a node inside a lab.
const LAB_GRPC_PORT: u16 = 7700;
/// The heartbeat port of a node inside a lab.
const LAB_UDP_PORT: u16 = 7800;
/// How long one transaction of the workload may take: a node that stops answering (paused,
/// cut off) holds a call for ever otherwise, and an application bounds its calls too. A
/// transaction past it is not acknowledged.
pub const TXN_MS_MAX: u64 = 5_000;
/// How long the workload's tasks may take to end after a stop.
const WORKLOAD_STOP_MS_MAX: u64 = 60_000;

/// Which quorum store a pair uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// `concord witness`.
    Witness,
    /// A one-member etcd.
    Etcd,
}

impl StoreKind {
    /// As the `[failover]` table's `quorum` writes it.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Witness => "witness",
            StoreKind::Etcd => "etcd",
        }
    }
}

/// The running quorum store.
pub enum Quorum {
    /// The witness.
    Witness(Witness),
    /// etcd.
    Etcd(Etcd),
}

impl Quorum {
    /// Its endpoint (`http://ADDR`).
    pub fn endpoint(&self) -> String {
        match self {
            Quorum::Witness(w) => w.url(),
            Quorum::Etcd(e) => e.endpoint(),
        }
    }

    /// Kills it; its data stays.
    pub fn stop(&mut self) {
        match self {
            Quorum::Witness(w) => w.stop(),
            Quorum::Etcd(e) => e.stop(),
        }
    }

    /// Starts it again on the same data and address.
    pub fn start(&mut self) {
        match self {
            Quorum::Witness(w) => w.start(),
            Quorum::Etcd(e) => e.start(),
        }
    }
}

/// How a pair is set up.
#[derive(Clone, Debug)]
pub struct PairSpec {
    /// The quorum store.
    pub store: StoreKind,
    /// Inside a lab (partitions possible) rather than on loopback.
    pub lab: bool,
    /// Whether the standby promotes itself.
    pub automatic: bool,
    /// The lease's ttl (milliseconds).
    pub lease_ttl_ms: u64,
    /// When set, node `a`'s data directory is a tmpfs of this size (`mount -o size=`).
    pub a_tmpfs: Option<&'static str>,
}

impl PairSpec {
    /// Automatic failover on loopback with `store`, a 1 s lease.
    pub fn loopback(store: StoreKind) -> PairSpec {
        PairSpec {
            store,
            lab: false,
            automatic: true,
            lease_ttl_ms: 1_000,
            a_tmpfs: None,
        }
    }

    /// The same inside a lab.
    pub fn in_lab(store: StoreKind) -> PairSpec {
        PairSpec {
            lab: true,
            ..PairSpec::loopback(store)
        }
    }
}

/// One node of a pair.
pub struct FoNode {
    /// `a` or `b`.
    pub name: &'static str,
    /// Its directory (config, stderr).
    pub dir: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its `concord.toml`.
    pub config: PathBuf,
    /// Its gRPC address as clients reach it (`http://ADDR:PORT`).
    pub url: String,
    /// Its lab namespace, if any.
    pub netns: Option<String>,
    process: Option<Process>,
}

impl FoNode {
    fn stderr_path(&self) -> PathBuf {
        self.dir.join("node.stderr")
    }

    /// Starts it as `concord coordinator` (`primary`) or `concord standby`, and waits for its
    /// listening line.
    pub fn start(&mut self, primary: bool) {
        assert!(self.process.is_none(), "node {} already runs", self.name);
        let mut command = Command::new(concord_bin());
        command
            .arg(if primary { "coordinator" } else { "standby" })
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let stderr = self.stderr_path();
        let mut process = match &self.netns {
            Some(netns) => netns::launch_in(netns, self.name, command, &stderr),
            None => Process::launch_command(self.name, command, &stderr),
        };
        process.expect_listening(START_MS_MAX);
        self.process = Some(process);
    }

    /// Whether it was started and not stopped.
    pub fn running(&self) -> bool {
        self.process.is_some()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// SIGTERM, its exit awaited; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        self.process.take().is_none_or(Process::terminate)
    }

    /// SIGSTOP.
    pub fn pause(&self) {
        self.process.as_ref().expect("running").pause();
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.process.as_ref().expect("running").resume();
    }

    /// Its standard error so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// What runs `concord status` and the role commands against it (Send and Sync).
    pub fn remote(&self) -> Remote {
        Remote {
            url: self.url.clone(),
            netns: self.netns.clone(),
        }
    }

    /// [`Remote::concord`].
    pub fn concord(&self, args: &[&str], ms: u64) -> (Option<i32>, String, String) {
        self.remote().concord(args, ms)
    }

    /// [`Remote::status`].
    pub fn status(&self) -> Option<serde_json::Value> {
        self.remote().status()
    }

    /// [`Remote::failover`].
    pub fn failover(&self) -> Option<serde_json::Value> {
        self.remote().failover()
    }

    /// [`Remote::role_command`].
    pub fn role_command(&self, verb: &str, extra: &[&str]) -> (Option<i32>, String, String) {
        self.remote().role_command(verb, extra)
    }
}

/// A node's url and namespace: what `concord` commands against it need.
#[derive(Clone, Debug)]
pub struct Remote {
    /// Its gRPC url.
    pub url: String,
    /// Its lab namespace, if any.
    pub netns: Option<String>,
}

impl Remote {
    /// Runs `concord ARGS` (inside its namespace in a lab) to its end, at most `ms`.
    pub fn concord(&self, args: &[&str], ms: u64) -> (Option<i32>, String, String) {
        let mut command = Command::new(concord_bin());
        command.args(args).env_remove("RUST_LOG");
        if let Some(netns) = &self.netns {
            command = netns::command_in(netns, command);
        }
        run(command, ms)
    }

    /// `concord status --url URL --json` (exit 0, or 4 with an unhealthy resource); `None`
    /// when it does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, out, _) = self.concord(&["status", "--url", &self.url, "--json"], 10_000);
        // 4: a resource is unhealthy; the status is printed all the same.
        if !matches!(code, Some(0 | 4)) {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// The `failover` object of its status.
    pub fn failover(&self) -> Option<serde_json::Value> {
        self.status()?.get("failover").cloned()
    }

    /// `concord VERB --node URL [extra…]` (promote, demote, switchover).
    pub fn role_command(&self, verb: &str, extra: &[&str]) -> (Option<i32>, String, String) {
        let mut args = vec![verb, "--node", &self.url];
        args.extend_from_slice(extra);
        self.concord(&args, COMMAND_MS_MAX)
    }
}

/// Runs `command` to its end, at most `ms`; its exit code and outputs (no code, and the
/// reason as standard error, when it was killed at the deadline: a paused node never answers).
fn run(mut command: Command, ms: u64) -> (Option<i32>, String, String) {
    let out = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let pid = out.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(out.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_millis(ms)) {
        Ok(Ok(output)) => (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ),
        Ok(Err(e)) => panic!("wait for {command:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            (
                None,
                String::new(),
                format!("{command:?} did not end within {ms} ms"),
            )
        }
    }
}

/// A pair, its store and its lab; see the module docs.
pub struct Pair {
    /// Node `a` (started as the primary).
    pub a: FoNode,
    /// Node `b` (started as the standby).
    pub b: FoNode,
    /// The quorum store.
    pub quorum: Quorum,
    /// The lab, when the pair runs in one.
    pub lab: Option<Lab>,
    /// What the pair was made from.
    pub spec: PairSpec,
    tmpfs: Option<adapters::testing::Tmpfs>,
    root: tempfile::TempDir,
}

impl Pair {
    /// Sets up and starts the pair (see the module docs): `a` the primary, `b` following it.
    pub fn start(spec: PairSpec) -> Pair {
        let root = tempfile::Builder::new()
            .prefix("concord-failover-")
            .tempdir()
            .expect("make a temporary root");
        let lab = spec.lab.then(|| Lab::new(&["a", "b", "w", "c"]));
        let key = root.path().join("heartbeat.key");
        std::fs::write(
            &key,
            crate::workload::content_of(crate::seed("pair key"), 32),
        )
        .expect("write the heartbeat key");
        let quorum = match (spec.store, &lab) {
            (StoreKind::Witness, None) => {
                Quorum::Witness(Witness::start_loopback(root.path(), None))
            }
            (StoreKind::Witness, Some(lab)) => {
                Quorum::Witness(Witness::start_in(lab, "w", root.path(), None))
            }
            (StoreKind::Etcd, None) => Quorum::Etcd(Etcd::start_loopback(root.path())),
            (StoreKind::Etcd, Some(lab)) => Quorum::Etcd(Etcd::start_in(lab, "w", root.path())),
        };
        let addrs = |name: &str| -> (String, String) {
            match &lab {
                Some(lab) => {
                    let ip = lab.addr(name);
                    (
                        format!("{ip}:{LAB_GRPC_PORT}"),
                        format!("{ip}:{LAB_UDP_PORT}"),
                    )
                }
                None => (
                    format!("127.0.0.1:{}", etcd::free_port()),
                    format!("127.0.0.1:{}", free_udp_port()),
                ),
            }
        };
        let (a_grpc, a_udp) = addrs("a");
        let (b_grpc, b_udp) = addrs("b");
        let mut tmpfs = None;
        let mut node = |name: &'static str, id: u32, me: (&str, &str), peer: (&str, &str)| {
            let dir = root.path().join(name);
            let data_dir = dir.join("data");
            std::fs::create_dir_all(&dir).expect("make a node directory");
            if name == "a"
                && let Some(size) = spec.a_tmpfs
            {
                tmpfs = Some(adapters::testing::Tmpfs::mount(&data_dir, size));
            }
            let config = dir.join("concord.toml");
            let text = config_toml(&spec, id, name, &data_dir, me, peer, &key, &quorum);
            std::fs::write(&config, text).expect("write a node's configuration");
            FoNode {
                name,
                dir,
                data_dir,
                config,
                url: format!("http://{}", me.0),
                netns: lab.as_ref().map(|lab| lab.netns(name).to_string()),
                process: None,
            }
        };
        let a = node("a", 1, (&a_grpc, &a_udp), (&b_grpc, &b_udp));
        let b = node("b", 2, (&b_grpc, &b_udp), (&a_grpc, &a_udp));
        let mut pair = Pair {
            a,
            b,
            quorum,
            lab,
            spec,
            tmpfs,
            root,
        };
        pair.a.start(true);
        pair.wait_failover("a", 30_000, "the primary that may commit", |f| {
            f["role"] == "primary" && f["may_commit"] == true
        });
        pair.b.start(false);
        pair.wait_failover("b", 30_000, "a standby following a", |f| {
            f["role"] == "standby"
                && f["peer_state"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("alive"))
        });
        pair
    }

    /// Its temporary root.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Node `name` (`a` or `b`).
    pub fn node(&self, name: &str) -> &FoNode {
        match name {
            "a" => &self.a,
            "b" => &self.b,
            other => panic!("a pair has no node {other:?}"),
        }
    }

    /// Node `name`, mutable.
    pub fn node_mut(&mut self, name: &str) -> &mut FoNode {
        match name {
            "a" => &mut self.a,
            "b" => &mut self.b,
            other => panic!("a pair has no node {other:?}"),
        }
    }

    /// Both nodes' urls, `a` first.
    pub fn urls(&self) -> Vec<String> {
        vec![self.a.url.clone(), self.b.url.clone()]
    }

    /// The namespace a client of the test runs in (`c` in a lab).
    pub fn client_netns(&self) -> Option<String> {
        self.lab.as_ref().map(|lab| lab.netns("c").to_string())
    }

    /// Waits at most `ms` until node `name`'s failover status satisfies `check`, and returns
    /// it; panics naming `what` with both nodes' status and logs otherwise.
    pub fn wait_failover(
        &self,
        name: &str,
        ms: u64,
        what: &str,
        mut check: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = None;
        let met = wait_until(ms, || {
            last = self.node(name).failover();
            last.as_ref().is_some_and(&mut check)
        });
        if !met {
            panic!(
                "node {name} was not {what} within {ms} ms; its failover status: {}\n{}",
                last.map_or_else(|| "no answer".into(), |v| v.to_string()),
                self.describe()
            );
        }
        last.expect("checked")
    }

    /// Both nodes' failover status and the tails of their logs, for a failure message.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for node in [&self.a, &self.b] {
            let status = if node.running() {
                let (code, out, err) =
                    node.concord(&["status", "--url", &node.url, "--json"], 10_000);
                match serde_json::from_str::<serde_json::Value>(&out) {
                    Ok(v) if matches!(code, Some(0 | 4)) => v["failover"].to_string(),
                    _ => format!("status exit {code:?}: {}{}", out.trim(), err.trim()),
                }
            } else {
                "not running".into()
            };
            text.push_str(&format!(
                "--- node {}: {status}\n{}\n",
                node.name,
                tail(&node.stderr_text(), 30)
            ));
        }
        text
    }

    /// How many nodes report themselves primary and may commit.
    pub fn committing_primaries(&self) -> usize {
        [&self.a, &self.b]
            .iter()
            .filter(|n| n.running())
            .filter_map(|n| n.failover())
            .filter(|f| f["role"] == "primary" && f["may_commit"] == true)
            .count()
    }

    /// Starts a workload of `tasks` tasks over `connect_any` (inside `c` in a lab).
    pub fn workload(&self, tasks: u64) -> FoWorkload {
        FoWorkload::start(self.urls(), self.client_netns(), tasks)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.a.kill();
        self.b.kill();
        self.quorum.stop();
        // Unmount after the processes that held files on it are gone.
        self.tmpfs.take();
    }
}

#[allow(clippy::too_many_arguments)]
fn config_toml(
    spec: &PairSpec,
    id: u32,
    name: &str,
    data_dir: &Path,
    me: (&str, &str),
    peer: (&str, &str),
    key: &Path,
    quorum: &Quorum,
) -> String {
    let data = data_dir.display();
    format!(
        "node = {id}\n\
         data_dir = \"{data}\"\n\
         txn_timeout_ms = 10000\n\n\
         [resources.uploads]\nkind = \"files\"\nroot = \"{data}/uploads\"\ncreate = true\n\n\
         [resources.index]\nkind = \"kv\"\ndir = \"{data}/index\"\ncreate = true\n\n\
         [daemon]\nlisten = \"{grpc}\"\nplaintext = true\nunauthenticated = true\n\
         plaintext_any_address = true\n\n\
         [replication]\nmode = \"sync\"\nsync_wait_ms_max = 2000\nsync_fallback = \"async\"\n\n\
         [failover]\nname = \"{name}\"\naddress = \"http://{grpc}\"\npeer = \"http://{peer_grpc}\"\n\
         udp_listen = \"{udp}\"\npeer_udp = \"{peer_udp}\"\nkey_file = \"{key}\"\n\
         quorum = \"{store}\"\nquorum_endpoints = [\"{endpoint}\"]\nautomatic = {automatic}\n\
         lease_ttl_ms = {ttl}\n",
        grpc = me.0,
        udp = me.1,
        peer_grpc = peer.0,
        peer_udp = peer.1,
        key = key.display(),
        store = spec.store.name(),
        endpoint = quorum.endpoint(),
        automatic = spec.automatic,
        ttl = spec.lease_ttl_ms,
    )
}

/// A UDP port free on 127.0.0.1 just now.
fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp 127.0.0.1:0");
    socket.local_addr().expect("a bound address").port()
}

/// A commit the cluster acknowledged.
#[derive(Clone, Debug)]
pub struct FoAcked {
    /// Its xid.
    pub xid: String,
    /// The file put (`f<i>` under `uploads`).
    pub file: String,
    /// blake3 of the file's content.
    pub digest: [u8; 32],
    /// The kv key (`f<i>`).
    pub key: Vec<u8>,
    /// The kv value.
    pub value: Vec<u8>,
}

/// What a stopped [`FoWorkload`] saw.
#[derive(Debug, Default)]
pub struct FoReport {
    /// Every acknowledged commit.
    pub acked: Vec<FoAcked>,
    /// Transactions that failed.
    pub failed: u64,
    /// The first failures' messages.
    pub failures: Vec<String>,
}

/// Tasks committing through whichever node is the primary; see the module docs.
pub struct FoWorkload {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    report: Arc<Mutex<FoReport>>,
    thread: Option<JoinHandle<()>>,
}

impl FoWorkload {
    /// Starts `tasks` tasks over `connect_any(urls)`, inside `netns` when given.
    pub fn start(urls: Vec<String>, netns: Option<String>, tasks: u64) -> FoWorkload {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let report = Arc::new(Mutex::new(FoReport::default()));
        let (s, c, r) = (stop.clone(), committed.clone(), report.clone());
        let thread = std::thread::spawn(move || {
            let body = move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("build the workload's runtime");
                runtime.block_on(run_workload(urls, tasks, s, c, r));
            };
            match netns {
                Some(netns) => netns::in_netns(&netns, body),
                None => body(),
            }
        });
        FoWorkload {
            stop,
            committed,
            report,
            thread: Some(thread),
        }
    }

    /// Acknowledged commits so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more commits than now are acknowledged, at most `ms`; whether they were.
    pub fn wait_more(&self, n: u64, ms: u64) -> bool {
        let start = self.committed();
        wait_until(ms, || self.committed() >= start + n)
    }

    /// Ends the tasks and returns what they saw.
    pub fn stop(mut self) -> FoReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let ended = wait_until(WORKLOAD_STOP_MS_MAX, || thread.is_finished());
            assert!(
                ended,
                "the workload did not end within {WORKLOAD_STOP_MS_MAX} ms"
            );
            thread.join().expect("the workload thread panicked");
        }
        std::mem::take(&mut *self.report.lock().expect("report lock"))
    }
}

impl Drop for FoWorkload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && wait_until(WORKLOAD_STOP_MS_MAX, || thread.is_finished())
        {
            let _ = thread.join();
        }
    }
}

async fn run_workload(
    urls: Vec<String>,
    tasks: u64,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    report: Arc<Mutex<FoReport>>,
) {
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_millis(30_000);
    let concord = loop {
        match Concord::connect_any_within(&refs, Credentials::none(), CLIENT_FAILOVER_WAIT_MS).await
        {
            Ok(concord) => break concord,
            Err(e) if Instant::now() > deadline => {
                report
                    .lock()
                    .expect("report lock")
                    .failures
                    .push(format!("connect: {e}"));
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let (concord, stop) = (concord.clone(), stop.clone());
        let (committed, report) = (committed.clone(), report.clone());
        set.spawn(async move {
            let mut i = task;
            while !stop.load(Ordering::Relaxed) {
                let bounded = tokio::time::timeout(
                    Duration::from_millis(TXN_MS_MAX),
                    fo_transaction(&concord, i),
                );
                let done = match bounded.await {
                    Ok(done) => done.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {TXN_MS_MAX} ms")),
                };
                match done {
                    Ok(acked) => {
                        report.lock().expect("report lock").acked.push(acked);
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        {
                            let mut r = report.lock().expect("report lock");
                            r.failed += 1;
                            if r.failures.len() < 20 {
                                r.failures.push(format!("transaction {i}: {e}"));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += tasks;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// Transaction `i`: `uploads/f<i>` and the kv key `f<i>`.
pub async fn fo_transaction(
    concord: &Concord,
    i: u64,
) -> Result<FoAcked, participant::ConcordError> {
    let mut tx = concord.begin().await?;
    let content = crate::workload::content_of(i, 512 + (i % 7) as usize * 100);
    let file = format!("f{i}");
    tx.files("uploads").await?.put(&file, &content[..]).await?;
    let key = file.clone().into_bytes();
    let value = i.to_le_bytes().to_vec();
    tx.kv("index").await?.insert(&key, &value).await?;
    let committed = tx.commit().await?;
    Ok(FoAcked {
        xid: committed.xid.to_string(),
        file,
        digest: check::digest(&content),
        key,
        value,
    })
}

/// Panics with every commit of `acked` missing from the stopped node's data directory (its
/// `uploads` files root and its `index` sled directory, read offline).
pub fn assert_all_on(data_dir: &Path, acked: &[FoAcked]) {
    let files = check::files(&data_dir.join("uploads"));
    let keys: BTreeMap<String, [u8; 32]> = check::kv(&data_dir.join("index"));
    let mut missing = Vec::new();
    for a in acked {
        if files.get(&a.file) != Some(&a.digest) {
            missing.push(format!("{}: uploads/{}", a.xid, a.file));
        }
        if keys.get(&check::hex(&a.key)) != Some(&check::digest(&a.value)) {
            missing.push(format!(
                "{}: index {}",
                a.xid,
                String::from_utf8_lossy(&a.key)
            ));
        }
    }
    let shown: Vec<&String> = missing.iter().take(20).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged commits are missing on {} (first 20): {shown:#?}",
        missing.len(),
        acked.len(),
        data_dir.display()
    );
}

/// Waits `ms`, polling `check` every [`POLL_MS`], and panics with `what` the first time it
/// fails: a condition that must hold throughout.
pub fn hold_for(ms: u64, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if let Err(why) = check() {
            panic!("{what}: {why}");
        }
        std::thread::sleep(Duration::from_millis(POLL_MS * 10));
    }
}
