//! CPU and disk saturation for the "no false failover" checks: `stress-ng` (Debian's) with a
//! CPU worker per core and one disk writer, in a directory the test chooses (the primary's
//! file system), for a bounded time.
//!
//! [`cpu_disk_stress`] starts `stress-ng --cpu N --hdd 1 --hdd-bytes 256M --timeout S
//! --temp-path DIR` and returns its [`Process`]; it ends by itself after the duration and is
//! SIGKILLed if dropped first. A node's heartbeat and health must ride this out without a
//! failover: the load is real, but nothing is broken.
//!
//! Implementation caveats:
//! * The disk writer's files stay under [`HDD_BYTES`] and are removed by stress-ng when it
//!   ends normally; a killed run may leave its `tmp-stress-ng-*` directory in `DIR` (which
//!   the test's temporary root removes).
//! * The duration is rounded up to whole seconds (stress-ng's `--timeout`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::Process;

/// The disk writer's file size.
pub const HDD_BYTES: &str = "256M";

/// Runs `stress-ng` saturating every core and writing to disk in `dir` for `duration`; panics
/// with how to install it when it is missing.
pub fn cpu_disk_stress(dir: &Path, duration: Duration) -> Process {
    check_installed();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let seconds = duration.as_millis().div_ceil(1000).max(1);
    let mut command = Command::new("stress-ng");
    command
        .args(["--cpu", &cores.to_string()])
        .args(["--hdd", "1", "--hdd-bytes", HDD_BYTES])
        .args(["--timeout", &format!("{seconds}s")])
        .arg("--temp-path")
        .arg(dir)
        .current_dir(dir);
    Process::launch_command("stress-ng", command, &dir.join("stress-ng.stderr"))
}

/// Panics with how to install stress-ng when it is missing.
fn check_installed() {
    let found = Command::new("stress-ng")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "stress-ng is missing: the no-false-failover checks need it: apt-get install stress-ng"
    );
}
