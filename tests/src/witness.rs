//! The built-in quorum store for the failover tests: `concord witness --data DIR --listen ADDR
//! [--token-file F]`, a process of its own, started, killed, paused and started again on the
//! same data directory.
//!
//! [`Witness::start_loopback`] listens on `127.0.0.1:0` and keeps the address of its
//! `listening on ADDR` line: a restart listens there again. [`Witness::start_in`] runs it
//! inside a [`Lab`] node's namespace at that node's address and [`PORT`]. The witness keeps
//! the epoch and the holder durable in its data directory, its leases in memory (after a
//! restart every recorded holder's lease counts as live for its ttl again), so [`Witness::stop`]
//! then [`Witness::start`] is "the quorum store down" without losing the epoch.
//!
//! Implementation caveats:
//! * The binary is the one the harness finds ([`crate::process::concord_bin`]).
//! * A loopback restart reuses the first port: another process may have taken it meanwhile
//!   (the start then fails with the witness's own message).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netns::{self, Lab};
use crate::process::{Process, START_MS_MAX, concord_bin};

/// The witness's port inside a lab namespace.
pub const PORT: u16 = 7900;

/// A running (or stopped) `concord witness`.
pub struct Witness {
    data: PathBuf,
    /// What it listens on (`127.0.0.1:0` before the first start on loopback).
    listen: String,
    token_file: Option<PathBuf>,
    netns: Option<String>,
    process: Option<Process>,
}

impl Witness {
    /// A witness on a free loopback port, its data in `dir/witness`, its standard error in
    /// `dir/witness.stderr`; `token_file` is passed as `--token-file` when given.
    pub fn start_loopback(dir: &Path, token_file: Option<&Path>) -> Witness {
        Witness::start_at(dir, "127.0.0.1:0".to_string(), token_file, None)
    }

    /// A witness inside `lab`'s node `node`, listening on its address and [`PORT`].
    pub fn start_in(lab: &Lab, node: &str, dir: &Path, token_file: Option<&Path>) -> Witness {
        let listen = format!("{}:{PORT}", lab.addr(node));
        let netns = Some(lab.netns(node).to_string());
        Witness::start_at(dir, listen, token_file, netns)
    }

    fn start_at(
        dir: &Path,
        listen: String,
        token_file: Option<&Path>,
        netns: Option<String>,
    ) -> Witness {
        let mut witness = Witness {
            data: dir.join("witness"),
            listen,
            token_file: token_file.map(Path::to_path_buf),
            netns,
            process: None,
        };
        witness.start();
        witness
    }

    /// Starts it (again, on the same data directory and address) and waits for its listening
    /// line within [`START_MS_MAX`]; panics with its standard error otherwise.
    pub fn start(&mut self) {
        assert!(
            self.process.is_none(),
            "the witness at {} already runs",
            self.listen
        );
        let stderr = self.data.with_extension("stderr");
        let command = self.command();
        let mut process = match &self.netns {
            Some(netns) => netns::launch_in(netns, "witness", command, &stderr),
            None => Process::launch_command("witness", command, &stderr),
        };
        process.expect_listening(START_MS_MAX);
        self.listen = process.addr.clone();
        self.process = Some(process);
    }

    fn command(&self) -> Command {
        let mut command = Command::new(concord_bin());
        command
            .arg("witness")
            .arg("--data")
            .arg(&self.data)
            .args(["--listen", &self.listen])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_default());
        if self.netns.is_some() {
            // A lab address is not loopback: the witness refuses it without this.
            command.arg("--listen-any");
        }
        if let Some(token_file) = &self.token_file {
            command.arg("--token-file").arg(token_file);
        }
        command
    }

    /// `http://ADDR`: the quorum store's endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Kills it (SIGKILL) and waits for its end; its data directory stays.
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
        self.process.as_ref().expect("the witness runs").pause();
    }

    /// SIGCONT after [`Witness::pause`].
    pub fn resume(&self) {
        self.process.as_ref().expect("the witness runs").resume();
    }
}
