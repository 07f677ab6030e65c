//! What the binary's tests share: running a child to its end under a deadline, and the
//! harness of the tests that run the daemon ([`daemon`]).
//!
//! Caveat: each test binary uses a part of this module, so unused items are allowed here.

#![allow(dead_code, clippy::expect_used)]

pub mod daemon;

use std::io::Read;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// Waits for `child` at most `deadline`, reading its stdout and stderr meanwhile (so a child
/// that writes much never blocks on a full pipe), and kills it when it takes longer; returns its
/// output. `what` names the child in the failure.
pub fn output_within(mut child: Child, deadline: Duration, what: &str) -> Output {
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}
