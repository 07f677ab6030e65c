//! Fencing a node through a fence agent: STONITH that needs no cooperation from the node.
//!
//! A fence agent is a program that switches a machine off through something outside it (a
//! power switch, a management board, a hypervisor). concord speaks the fence-agents stdin
//! protocol that Pacemaker uses, so any agent of Debian's `fence-agents` package works: the
//! agent is started with no arguments and reads `key=value` lines on its standard input —
//! `action=off` (or `status`), `plug=<plug>` (left out when the plug is empty, for agents
//! that fence one machine), then each configured argument — and its exit status is the
//! answer: 0 done (for `status`: on), 2 for `status`: off, anything else a failure.
//!
//! [`FenceAgent`] runs one agent call under `timeout_ms`; past it the agent's whole process
//! group is killed and the call is a [`FenceError::TimedOut`]. Every failure carries the tail
//! of the agent's standard error, where agents say why.
//!
//! # Implementation caveats
//!
//! * An argument, key or plug holding a line break is refused: it would smuggle in another
//!   `key=value` line.
//! * Only `off` and `status` are run: concord never switches a node back on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// The most of an agent's standard error kept for an error message, in bytes (the tail).
pub const STDERR_TAIL_BYTES_MAX: usize = 2048;
/// How long the rest of an agent's standard error is waited for after it exited.
const STDERR_DRAIN_MS: u64 = 200;
/// The exit status of `status` for a machine that is off (fence-agents' convention).
const STATUS_OFF_EXIT_CODE: i32 = 2;

/// A fence agent and how to call it (`fence_agent`, `fence_args`, `fence_timeout_ms` of the
/// `[failover]` table).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FenceAgent {
    /// The agent program (`/usr/sbin/fence_ipmilan`).
    pub program: PathBuf,
    /// The `key=value` lines after `action` and `plug` (`ip`, `username`, `password`, …).
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// How long one call may take before the agent is killed.
    pub timeout_ms: u64,
}

/// What `status` answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerStatus {
    /// The machine is on (exit status 0).
    On,
    /// The machine is off (exit status 2).
    Off,
}

/// Why a fence agent call did not succeed. None of them proves the node is off: the caller
/// must not act as if it were fenced.
#[derive(thiserror::Error, Debug)]
pub enum FenceError {
    /// A plug, key or value cannot be sent (a line break, an `=` in a key, an empty key). Fix
    /// the configuration.
    #[error(
        "fence agent {program}: argument {what} cannot be sent: {reason}; fix fence_plug or fence_args in the [failover] table"
    )]
    BadArgument {
        /// The agent program.
        program: PathBuf,
        /// Which argument (`plug`, or the key).
        what: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The agent could not be started. Check the path and that it is executable; Debian's
    /// agents come with `apt-get install fence-agents`.
    #[error(
        "start fence agent {program}: {source}; check the path and that it is executable (Debian's agents: apt-get install fence-agents)"
    )]
    Spawn {
        /// The agent program.
        program: PathBuf,
        /// The error of `exec`.
        #[source]
        source: std::io::Error,
    },
    /// The agent ran and reported failure: the node may still be on. Read its message, check
    /// the fence device, and fence by hand before forcing anything.
    #[error("fence agent {program} action={action} plug={plug:?} failed ({status}): {stderr_tail}")]
    Failed {
        /// The agent program.
        program: PathBuf,
        /// `off` or `status`.
        action: &'static str,
        /// The plug asked for.
        plug: String,
        /// Its exit status in words.
        status: String,
        /// The end of its standard error.
        stderr_tail: String,
    },
    /// The agent did not finish within `timeout_ms` and was killed: the node may still be on.
    #[error(
        "fence agent {program} action={action} plug={plug:?} did not finish within {timeout_ms} ms and was killed: {stderr_tail}"
    )]
    TimedOut {
        /// The agent program.
        program: PathBuf,
        /// `off` or `status`.
        action: &'static str,
        /// The plug asked for.
        plug: String,
        /// The configured timeout.
        timeout_ms: u64,
        /// The end of its standard error.
        stderr_tail: String,
    },
    /// Talking to the agent's process failed (its exit could not be waited for).
    #[error("run fence agent {program}: {source}")]
    Io {
        /// The agent program.
        program: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl FenceAgent {
    /// Switches `plug` off; `Ok` only when the agent reported success.
    pub async fn off(&self, plug: &str) -> Result<(), FenceError> {
        let (status, stderr_tail) = self.call("off", plug).await?;
        match status.code() {
            Some(0) => Ok(()),
            _ => Err(self.failed("off", plug, status, stderr_tail)),
        }
    }

    /// Asks whether `plug` is on or off.
    pub async fn status(&self, plug: &str) -> Result<PowerStatus, FenceError> {
        let (status, stderr_tail) = self.call("status", plug).await?;
        match status.code() {
            Some(0) => Ok(PowerStatus::On),
            Some(STATUS_OFF_EXIT_CODE) => Ok(PowerStatus::Off),
            _ => Err(self.failed("status", plug, status, stderr_tail)),
        }
    }

    /// Runs the agent once with `action` and `plug`: its exit status and stderr tail.
    async fn call(
        &self,
        action: &'static str,
        plug: &str,
    ) -> Result<(ExitStatus, String), FenceError> {
        let input = self.input(action, plug)?;
        let mut child = self.spawn()?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        let reader = Reader(
            child
                .stderr
                .take()
                .map(|e| tokio::spawn(read_tail(e, Arc::clone(&tail)))),
        );
        let timeout = Duration::from_millis(self.timeout_ms);
        match tokio::time::timeout(timeout, talk(&mut child, input)).await {
            Ok(Ok(status)) => Ok((status, reader.drained(&tail).await)),
            Ok(Err(source)) => Err(FenceError::Io {
                program: self.program.clone(),
                source,
            }),
            Err(_) => {
                kill(&mut child).await;
                Err(FenceError::TimedOut {
                    program: self.program.clone(),
                    action,
                    plug: plug.to_string(),
                    timeout_ms: self.timeout_ms,
                    stderr_tail: reader.drained(&tail).await,
                })
            }
        }
    }

    /// The agent's standard input: `action`, `plug` (when given), then each argument.
    fn input(&self, action: &str, plug: &str) -> Result<String, FenceError> {
        let mut input = format!("action={action}\n");
        if !plug.is_empty() {
            self.check("plug", plug, false)?;
            input.push_str(&format!("plug={plug}\n"));
        }
        for (key, value) in &self.args {
            self.check(key, key, true)?;
            self.check(key, value, false)?;
            input.push_str(&format!("{key}={value}\n"));
        }
        Ok(input)
    }

    fn check(&self, what: &str, text: &str, is_key: bool) -> Result<(), FenceError> {
        let reason = if text.contains(['\n', '\r', '\0']) {
            Some("it holds a line break or NUL")
        } else if is_key && (text.is_empty() || text.contains('=')) {
            Some("a key must be non-empty and hold no '='")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(FenceError::BadArgument {
                program: self.program.clone(),
                what: what.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Starts the agent in a process group of its own (so a timeout kills its children too).
    fn spawn(&self) -> Result<Child, FenceError> {
        Command::new(&self.program)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| FenceError::Spawn {
                program: self.program.clone(),
                source,
            })
    }

    fn failed(
        &self,
        action: &'static str,
        plug: &str,
        status: ExitStatus,
        tail: String,
    ) -> FenceError {
        FenceError::Failed {
            program: self.program.clone(),
            action,
            plug: plug.to_string(),
            status: status.to_string(),
            stderr_tail: tail,
        }
    }
}

/// Writes the input, closes standard input, waits for the exit. An agent that exits without
/// reading its input is answered by its exit status, not by the broken pipe.
async fn talk(child: &mut Child, input: String) -> std::io::Result<ExitStatus> {
    if let Some(mut stdin) = child.stdin.take() {
        match stdin.write_all(input.as_bytes()).await {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
            _ => {}
        }
        drop(stdin);
    }
    child.wait().await
}

/// Kills the agent's process group, then reaps the agent.
async fn kill(child: &mut Child) {
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(group) = group {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_millis(STDERR_DRAIN_MS), child.wait()).await;
}

/// The task reading an agent's standard error, aborted when dropped.
struct Reader(Option<tokio::task::JoinHandle<()>>);

impl Reader {
    /// Waits a little for the rest of the standard error, then returns its tail as text.
    async fn drained(self, tail: &Mutex<Vec<u8>>) -> String {
        if let Some(handle) = self.0.as_ref() {
            let wait = Duration::from_millis(STDERR_DRAIN_MS);
            let _ = tokio::time::timeout(wait, async {
                while !handle.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
        }
        let bytes = tail.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).trim().to_string()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// Reads `from` to its end, keeping the last [`STDERR_TAIL_BYTES_MAX`] bytes.
async fn read_tail(mut from: impl AsyncRead + Unpin, tail: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend_from_slice(&buf[..n]);
        let excess = tail.len().saturating_sub(STDERR_TAIL_BYTES_MAX);
        tail.drain(..excess);
    }
}
