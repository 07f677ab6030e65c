//! A coordinator daemon run as a child process, for `concord demo --remote` and `concord bench
//! commit --remote`: this same binary started as `concord coordinator --listen 127.0.0.1:0 …`,
//! its address read from the `listening on ADDR` line it prints once bound, and stopped with
//! SIGTERM, its exit status checked. A standby (`concord standby --listen 127.0.0.1:0 …`, for
//! `concord demo --standby` and `concord bench replication`) is run the same way
//! ([`DaemonChild::start_standby`]).
//!
//! The child's standard output is read by a thread of its own to the end (so the child never
//! blocks on a full pipe); its standard error is the parent's, so its warnings reach the
//! operator. Dropping a [`DaemonChild`] that was not stopped kills it (SIGKILL) and reaps it.
//!
//! # Implementation caveats
//!
//! * SIGTERM is sent with the `kill` utility: the workspace forbids `unsafe`, which a direct
//!   `kill(2)` through `libc` would need.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long the daemon may take to start (recovery included) and print its address.
pub(crate) const START_MS_MAX: u64 = 60_000;
/// How long the daemon may take to exit after SIGTERM (its own drain and close bounds are
/// 10 s each).
pub(crate) const STOP_MS_MAX: u64 = 40_000;
/// How often the exit is polled while waiting for it.
const POLL_MS: u64 = 20;

/// A running `concord coordinator` child.
pub(crate) struct DaemonChild {
    child: Option<Child>,
    addr: String,
    /// What it is, in messages: "coordinator daemon" or "standby".
    what: &'static str,
}

impl DaemonChild {
    /// Starts `concord coordinator --listen 127.0.0.1:0 ARGS` (with warnings only in its log)
    /// and waits, at most [`START_MS_MAX`], for its `listening on` line.
    pub(crate) fn start(args: &[OsString]) -> anyhow::Result<DaemonChild> {
        DaemonChild::start_as("coordinator", "coordinator daemon", args)
    }

    /// Starts `concord standby --listen 127.0.0.1:0 ARGS` (with warnings only in its log) and
    /// waits, at most [`START_MS_MAX`], for its `listening on` line.
    pub(crate) fn start_standby(args: &[OsString]) -> anyhow::Result<DaemonChild> {
        DaemonChild::start_as("standby", "standby", args)
    }

    fn start_as(
        command: &str,
        what: &'static str,
        args: &[OsString],
    ) -> anyhow::Result<DaemonChild> {
        let mut full = vec![OsString::from("--listen"), OsString::from("127.0.0.1:0")];
        full.extend_from_slice(args);
        DaemonChild::start_exact(command, what, &full)
    }

    /// Starts `concord COMMAND ARGS` as is (a failover node, whose address its configuration
    /// names; the witness) and waits for its `listening on` line.
    pub(crate) fn start_exact(
        command: &str,
        what: &'static str,
        args: &[OsString],
    ) -> anyhow::Result<DaemonChild> {
        let exe = std::env::current_exe().context("find the concord binary")?;
        let mut child = Command::new(exe)
            .args(["--log-level", "warn", command])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start the {what}"))?;
        let lines = read_lines(&mut child)?;
        let mut daemon = DaemonChild {
            child: Some(child),
            addr: String::new(),
            what,
        };
        daemon.addr = daemon.wait_listening(&lines)?;
        Ok(daemon)
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, …) to the process.
    pub(crate) fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let Some(child) = &self.child else {
            bail!("the {} was already reaped", self.what);
        };
        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .with_context(|| format!("run `kill -{signal}` on the {}", self.what))?;
        if !sent.success() {
            bail!(
                "`kill -{signal}` failed ({sent}): the {} is gone",
                self.what
            );
        }
        Ok(())
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub(crate) fn kill(mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().context("reap the killed process")?;
        }
        Ok(())
    }

    /// The daemon's URL (`http://127.0.0.1:PORT`).
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn wait_listening(&mut self, lines: &mpsc::Receiver<String>) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_millis(START_MS_MAX);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        return Ok(addr.trim().to_string());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "the {} printed no `listening on` line within {START_MS_MAX} ms",
                    self.what
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(Duration::from_millis(STOP_MS_MAX))?;
                    bail!(
                        "the {} exited before listening ({status}); its error is above",
                        self.what
                    )
                }
            }
        }
    }

    /// Sends SIGTERM and waits, at most [`STOP_MS_MAX`], for the exit; returns its status.
    pub(crate) fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        let what = self.what;
        let pid = match &self.child {
            Some(child) => child.id(),
            None => bail!("the {what} was already reaped"),
        };
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .with_context(|| format!("run `kill -TERM` on the {what}"))?;
        if !sent.success() {
            bail!("`kill -TERM {pid}` failed ({sent}): the {what} is gone");
        }
        self.wait_exit(Duration::from_millis(STOP_MS_MAX))
    }

    fn wait_exit(&mut self, bound: Duration) -> anyhow::Result<ExitStatus> {
        let what = self.what;
        let Some(mut child) = self.child.take() else {
            bail!("the {what} was already reaped");
        };
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("wait for the {what}"))?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the {what} did not exit within {} ms; killed",
                    bound.as_millis()
                );
            }
            std::thread::sleep(Duration::from_millis(POLL_MS));
        }
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The child's standard output, line by line, read to its end by a thread of its own.
fn read_lines(child: &mut Child) -> anyhow::Result<mpsc::Receiver<String>> {
    let stdout = child
        .stdout
        .take()
        .context("the daemon's standard output is not piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            // Nobody listens after the address: the rest is only drained.
            let _ = tx.send(line);
        }
    });
    Ok(rx)
}
