//! A `concord` process of a test: found, started, awaited, signalled.
//!
//! [`concord_bin`] finds the binary: `$CONCORD_BIN`, else `<workspace>/target/debug/concord`,
//! which the workspace's `cargo test` builds (the cli crate has integration tests). A
//! [`Process`] is a daemon (`concord coordinator` or `concord standby`) started with its
//! standard output read line by line on a thread of its own: [`Process::spawn`] waits for its
//! `listening on ADDR` line within [`START_MS_MAX`]. Signals are real ones, sent with the
//! `kill` command: SIGKILL, SIGTERM, SIGSTOP, SIGCONT (no `nix`/`rustix`).
//!
//! Implementation caveats:
//! * Standard error goes to a file beside the site (`<name>.stderr`, appended over restarts),
//!   shown when a start fails: the daemons' logs stay out of the test's output otherwise.
//! * A process is SIGKILLed when dropped, so a failing test leaves nothing running.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a daemon may take to start (recovery included) and print its listening line.
pub const START_MS_MAX: u64 = 30_000;
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_MS_MAX: u64 = 30_000;
/// How often a wait polls.
pub const POLL_MS: u64 = 20;

/// The `concord` binary: `$CONCORD_BIN`, else `<workspace>/target/debug/concord`; panics with
/// what to do when it is missing.
pub fn concord_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CONCORD_BIN") {
        return PathBuf::from(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("debug").join("concord");
    assert!(
        bin.is_file(),
        "{} is missing: build it: cargo build -p concord-cli (or set CONCORD_BIN)",
        bin.display()
    );
    bin
}

/// A running daemon: SIGKILLed when dropped.
pub struct Process {
    child: Option<Child>,
    /// What it is, for messages (`primary`, `standby`).
    pub name: String,
    /// The address of its `listening on ADDR` line.
    pub addr: String,
    /// Every line of its standard output so far.
    stdout: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
}

impl Process {
    /// Runs `concord ARGS` with standard error appended to `stderr_path` and waits for its
    /// listening line; panics (with its standard error) when none comes in time.
    pub fn spawn(name: &str, args: &[&str], stderr_path: &Path) -> Process {
        Process::spawn_within(name, args, stderr_path, START_MS_MAX)
    }

    /// [`Process::spawn`] with `start_ms` for its listening line (a standby that re-seeds
    /// first).
    pub fn spawn_within(name: &str, args: &[&str], stderr_path: &Path, start_ms: u64) -> Process {
        let mut process = Process::launch(name, args, stderr_path);
        process.expect_listening(start_ms);
        process
    }

    /// Runs `concord ARGS` without waiting for anything (a process expected to refuse).
    pub fn launch(name: &str, args: &[&str], stderr_path: &Path) -> Process {
        let mut command = Command::new(concord_bin());
        command
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_default());
        Process::launch_command(name, command, stderr_path)
    }

    /// Runs `command` (any program: a witness, etcd, stress-ng, or `ip netns exec …`) with
    /// standard input closed, standard output read line by line and standard error appended to
    /// `stderr_path`, without waiting for anything.
    pub fn launch_command(name: &str, mut command: Command, stderr_path: &Path) -> Process {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", stderr_path.display()));
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({command:?}): {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout is piped");
        let lines = forward(out, stdout.clone());
        Process {
            child: Some(child),
            name: name.to_string(),
            addr: String::new(),
            stdout,
            lines,
            stderr_path: stderr_path.to_path_buf(),
        }
    }

    /// [`Process::launch_command`], then waits `start_ms` for its `listening on ADDR` line
    /// (kept in [`Process::addr`]); panics with its standard error when none comes in time.
    pub fn spawn_command(
        name: &str,
        command: Command,
        stderr_path: &Path,
        start_ms: u64,
    ) -> Process {
        let mut process = Process::launch_command(name, command, stderr_path);
        process.expect_listening(start_ms);
        process
    }

    /// Waits `start_ms` for the `listening on ADDR` line and keeps ADDR in [`Process::addr`];
    /// kills the process and panics with its standard error when none comes in time.
    pub fn expect_listening(&mut self, start_ms: u64) {
        match self.wait_listening(start_ms) {
            Ok(addr) => self.addr = addr,
            Err(why) => {
                self.kill_now();
                panic!("{}: {why}; stderr: {}", self.name, self.stderr_tail());
            }
        }
    }

    /// Waits at most `ms` for a line of standard output (printed from now on) that `wanted`
    /// accepts, and returns it; `None` when none came in time or the output ended.
    pub fn wait_line(&mut self, ms: u64, mut wanted: impl FnMut(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn wait_listening(&mut self, start_ms: u64) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_millis(start_ms);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        return Ok(addr.trim().to_string());
                    }
                }
                Err(e) => return Err(format!("no listening line within {start_ms} ms ({e})")),
            }
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("wait for a child")
    }

    /// Waits for it to exit by itself, at most `ms`; `None` if it is still running.
    pub fn wait_exit(&mut self, ms: u64) -> Option<ExitStatus> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(POLL_MS));
        }
    }

    /// SIGKILL, and the wait for it.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process stays, frozen (its sockets open, nothing answered).
    pub fn pause(&self) {
        self.send("-STOP");
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&self) {
        self.send("-CONT");
    }

    /// SIGTERM, the exit awaited within [`STOP_MS_MAX`]; returns whether it exited 0.
    pub fn terminate(mut self) -> bool {
        self.send("-CONT");
        self.send("-TERM");
        let exited = self.wait_exit(STOP_MS_MAX);
        let Some(status) = exited else {
            self.kill_now();
            panic!(
                "{} did not exit within {STOP_MS_MAX} ms of SIGTERM; stderr: {}",
                self.name,
                self.stderr_tail()
            );
        };
        self.child = None;
        status.success()
    }

    fn send(&self, signal: &str) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill {signal}: {e}"));
        assert!(status.success(), "kill {signal} {} failed", self.name);
    }

    /// Its standard output so far, lines joined with `\n`.
    pub fn stdout_text(&self) -> String {
        self.stdout.lock().expect("stdout lock").join("\n")
    }

    /// Its standard error file (every run of this site so far).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The last 40 lines of [`Process::stderr_text`].
    pub fn stderr_tail(&self) -> String {
        tail(&self.stderr_text(), 40)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A paused process must not stay frozen behind the test.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        self.kill_now();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends every line of `from` to the returned receiver and keeps it in `kept`, on a thread.
fn forward(
    from: impl Read + Send + 'static,
    kept: Arc<Mutex<Vec<String>>>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            kept.lock().expect("stdout lock").push(line.clone());
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits until `check` holds, at most `ms`; returns whether it did.
pub fn wait_until(ms: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_millis(ms);
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
}

/// Runs `concord ARGS` to its end, at most `ms`; returns its exit code and outputs.
pub fn run_concord(args: &[&str], ms: u64) -> (Option<i32>, String, String) {
    let mut child = Command::new(concord_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start concord {args:?}: {e}"));
    let out = read_all(child.stdout.take().expect("piped"));
    let err = read_all(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + Duration::from_millis(ms);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for concord") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("concord {args:?} did not end within {ms} ms");
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    (status.code(), stdout, stderr)
}

fn read_all(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = from.read_to_string(&mut text);
        text
    })
}
