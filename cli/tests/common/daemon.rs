//! The one harness of the tests that run `concord coordinator`, the real binary: start it on a
//! free loopback port and wait for its `listening on ADDR` line within [`START_MS_MAX`], connect
//! a client, stop it with a signal and check its exit within [`STOP_MS_MAX`], and kill it when
//! the test drops it. Beside it: the request `header()` and `target()`, a configuration writer
//! for the `[daemon]` table, the error code of a refused call, and `eventually`, a wait on a
//! condition with a deadline.
//!
//! A test with a special start (a fail point armed, a file descriptor limit, its standard error
//! kept in a file) builds its command from [`Daemon::command`] and hands it to
//! [`Daemon::spawn`]; what only one test needs stays in that test, often as an `impl Daemon`
//! block of its own.
//!
//! Caveat: each test binary uses a part of this module, so unused items are allowed here.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use proto::client::Credentials;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{self, ErrorCode, RequestHeader};
use tonic::transport::Channel;

/// How long the daemon may take to start (recovery included) or to print an awaited line.
pub const START_MS_MAX: u64 = 30_000;
/// How long the daemon may take to exit after a signal.
pub const STOP_MS_MAX: u64 = 30_000;
/// How often a wait polls.
const POLL_MS: u64 = 20;

/// The `[daemon]` table of a daemon served in plain text without tokens.
pub const OPEN_DAEMON: &str = "plaintext = true\nunauthenticated = true\n";
/// A files resource `uploads` in `data/uploads`.
pub const UPLOADS: &str =
    "[resources.uploads]\nkind = \"files\"\nroot = \"data/uploads\"\ncreate = true\n";
/// A kv resource `index` in `data/index`.
pub const INDEX: &str = "[resources.index]\nkind = \"kv\"\ndir = \"data/index\"\ncreate = true\n";

/// Where the daemon's standard error goes.
pub enum Stderr {
    /// The test's own standard error.
    Inherit,
    /// Read line by line with standard output, for [`Daemon::wait_line`].
    Lines,
    /// This file, read back by [`Daemon::stop`] and shown when the start fails.
    File(PathBuf),
}

/// A running daemon: killed when dropped, unless stopped.
pub struct Daemon {
    child: Option<Child>,
    /// The address it listens on (`127.0.0.1:PORT`).
    pub addr: String,
    /// What it printed before its listening line.
    pub before: Vec<String>,
    /// Its lines (standard output; standard error too with [`Stderr::Lines`]) after the
    /// listening line.
    lines: mpsc::Receiver<String>,
    /// Every line of its standard output so far.
    stdout: Arc<Mutex<Vec<String>>>,
    stderr_file: Option<PathBuf>,
}

/// What a stopped daemon left: whether it exited 0, and its output.
pub struct Stopped {
    pub clean: bool,
    /// Its standard output, lines joined with `\n`.
    pub stdout: String,
    /// Its standard error when it went to a [`Stderr::File`]; empty otherwise.
    pub stderr: String,
}

impl Daemon {
    /// Starts it on the embedded defaults in `data`.
    pub fn start(data: &Path) -> Daemon {
        Daemon::start_with(&["--data".as_ref(), data.as_os_str()])
    }

    /// Starts it on the configuration file `config`.
    pub fn start_config(config: &Path) -> Daemon {
        Daemon::start_with(&["--config".as_ref(), config.as_os_str()])
    }

    /// Starts it with `args` after `coordinator --listen 127.0.0.1:0`, its standard error the
    /// test's.
    pub fn start_with(args: &[&OsStr]) -> Daemon {
        Daemon::spawn(&mut Daemon::command(args), Stderr::Inherit)
    }

    /// `concord coordinator --listen 127.0.0.1:0 ARGS`, standard input closed: for a test to
    /// add to (environment, directory) before [`Daemon::spawn`].
    pub fn command(args: &[&OsStr]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_concord"));
        command
            .args(["coordinator", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// Runs `command` (a daemon, or a wrapper that execs one) with its standard output piped
    /// and standard error as `stderr` says, and waits for its listening line.
    pub fn spawn(command: &mut Command, stderr: Stderr) -> Daemon {
        command.stdout(Stdio::piped());
        let stderr_file = match stderr {
            Stderr::Inherit => {
                command.stderr(Stdio::inherit());
                None
            }
            Stderr::Lines => {
                command.stderr(Stdio::piped());
                None
            }
            Stderr::File(path) => {
                command.stderr(std::fs::File::create(&path).unwrap());
                Some(path)
            }
        };
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        forward(
            child.stdout.take().unwrap(),
            tx.clone(),
            Some(stdout.clone()),
        );
        if let Some(err) = child.stderr.take() {
            forward(err, tx, None);
        }
        let mut daemon = Daemon {
            child: Some(child),
            addr: String::new(),
            before: Vec::new(),
            lines,
            stdout,
            stderr_file,
        };
        daemon.addr = daemon.wait_listening();
        daemon
    }

    /// The address of the `listening on ADDR` line; kills the daemon and fails the test when
    /// none comes within [`START_MS_MAX`].
    fn wait_listening(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_millis(START_MS_MAX);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match line.strip_prefix("listening on ") {
                    Some(addr) => return addr.to_string(),
                    None => self.before.push(line),
                },
                Err(e) => {
                    if let Some(child) = self.child.as_mut() {
                        let _ = child.kill();
                    }
                    let stderr = self.stderr_text();
                    panic!(
                        "the daemon printed no listening line within {START_MS_MAX} ms ({e}): {stderr}"
                    );
                }
            }
        }
    }

    /// Waits for a line that starts with `prefix`, at most [`START_MS_MAX`]; returns it.
    pub fn wait_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_millis(START_MS_MAX);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => {
                    panic!("the daemon printed no line {prefix:?} within {START_MS_MAX} ms: {e}")
                }
            }
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://ADDR`.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The generated tonic client over plain text, with tonic's own limits.
    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::connect(self.url()).await.unwrap()
    }

    /// A `proto::client` client at `url` (its [`Daemon::url`] or [`Daemon::https_url`]) with
    /// `credentials`.
    pub async fn client_with(&self, url: &str, credentials: &Credentials) -> proto::client::Client {
        proto::client::connect(url, credentials).await.unwrap()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL, and the wait for it.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited 0.
    pub fn terminate(self) -> bool {
        self.signal("-TERM")
    }

    /// Sends `signal` (`-TERM`, `-INT`) and waits for the exit, at most [`STOP_MS_MAX`];
    /// returns whether it exited 0.
    pub fn signal(mut self, signal: &str) -> bool {
        self.signal_and_wait(signal).success()
    }

    /// SIGTERM, the exit awaited; returns whether it exited 0 and what it printed.
    pub fn stop(mut self) -> Stopped {
        let status = self.signal_and_wait("-TERM");
        Stopped {
            clean: status.success(),
            stdout: self.stdout.lock().unwrap().join("\n"),
            stderr: self.stderr_text(),
        }
    }

    fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let what = format!("the daemon (after kill {signal})");
        wait_exit(&mut child, STOP_MS_MAX, &what)
    }

    /// Its standard error when it goes to a file; empty otherwise.
    fn stderr_text(&self) -> String {
        self.stderr_file
            .as_ref()
            .map(|f| std::fs::read_to_string(f).unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends every line of `from` to `to` (and keeps it in `kept`), on a thread of its own.
fn forward(
    from: impl Read + Send + 'static,
    to: mpsc::Sender<String>,
    kept: Option<Arc<Mutex<Vec<String>>>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            if let Some(kept) = &kept {
                kept.lock().unwrap().push(line.clone());
            }
            // The receiver may be gone; the kept lines still grow.
            if to.send(line).is_err() && kept.is_none() {
                return;
            }
        }
    });
}

/// The lines a child prints, read on a thread of their own.
pub fn lines_of(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    forward(out, tx, None);
    rx
}

/// The rest of the first line holding `needle` after it, within `within_ms` (a child test's
/// line follows libtest's `test NAME ... `).
pub fn rest_of_line(
    lines: &mpsc::Receiver<String>,
    needle: &str,
    within_ms: u64,
) -> Option<String> {
    let deadline = Instant::now() + Duration::from_millis(within_ms);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).ok()?;
        if let Some(at) = line.find(needle) {
            return Some(line[at + needle.len()..].to_string());
        }
    }
}

/// Waits for `child` to exit, at most `within_ms`; kills it and fails the test, naming it
/// `what`, when it does not.
pub fn wait_exit(child: &mut Child, within_ms: u64, what: &str) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_millis(within_ms);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {within_ms} ms");
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
}

/// The request header, naming this test binary as the client.
pub fn header() -> Option<RequestHeader> {
    Some(RequestHeader::current(env!("CARGO_CRATE_NAME")))
}

/// Branch `resource` of transaction `xid`.
pub fn target(xid: &str, resource: &str) -> Option<v1::BranchTarget> {
    Some(v1::BranchTarget {
        header: header(),
        xid: xid.to_string(),
        resource: resource.to_string(),
    })
}

/// The `ErrorDetail` of a refused call.
pub fn detail(status: &tonic::Status) -> v1::ErrorDetail {
    proto::error_detail(status)
        .unwrap()
        .unwrap_or_else(|| panic!("no ErrorDetail in {status:?}"))
}

/// The error code in a refused call's detail.
pub fn code_of(status: &tonic::Status) -> ErrorCode {
    ErrorCode::try_from(detail(status).code).unwrap()
}

/// Writes `dir/concord.toml` and returns its path: node 1, data in `data` (beside the file),
/// `top` (more top-level keys, each line ending in `\n`), the `[daemon]` table `daemon`, then
/// `resources` (tables).
pub fn write_config(dir: &Path, top: &str, daemon: &str, resources: &str) -> PathBuf {
    let path = dir.join("concord.toml");
    let text = format!("node = 1\ndata_dir = \"data\"\n{top}[daemon]\n{daemon}{resources}");
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits until `check` holds, at most `ms`.
pub fn eventually(ms: u64, what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {ms} ms");
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
}

/// [`eventually`] for async tests: waits without blocking the runtime's thread.
pub async fn eventually_async(ms: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {ms} ms");
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}
