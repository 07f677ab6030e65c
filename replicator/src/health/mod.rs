//! Health produced on the work path: a node's own verdict on whether it can commit now.
//!
//! A node can be sick without being dead: its kernel answers while its disk is full or gone,
//! while it cannot fork, while its CPU is saturated. So the verdict is not an echo: every
//! `probe_interval_ms` the [`HealthMonitor`] exercises what a commit needs, all probes side by
//! side, each under `probe_deadline_ms`:
//!
//! * **journal** — a new unnamed file in the journal's directory (`O_TMPFILE`): 4 KiB written,
//!   `fdatasync`, closed (which frees it). New blocks, so a full file system fails it; a hung
//!   disk fails it by the deadline.
//! * **resource:`<name>`** — each resource's [`adapters::Resource::health`] canary (files and
//!   mail write and sync a file in their private area, kv writes and flushes a private key,
//!   PostgreSQL runs a query).
//! * **memory** — `MemAvailable` of `/proc/meminfo` at least `memory_min_bytes`.
//! * **fork** — `/bin/true` spawned and waited for.
//! * **scheduling** — how late a short timer of the runtime fires, at most
//!   `scheduling_lag_max_ms`.
//!
//! The round's failures make the [`Verdict`]; [`HealthMonitor::sick_for`] says how long the node
//! has been sick without a healthy round in between (what `sicktime` is compared with). The
//! verdict is logged once per change (WARN with the reasons when the node turns sick or the set
//! of failing probes changes, INFO when it is healthy again) and exported as the metrics
//! `concord_health_healthy` and `concord_health_probe_failures_total{probe}`. An optional
//! [`Watchdog`] is petted after each healthy round and never while sick, so a node that stays
//! sick (or whose monitor stops running) is reset by the device.
//!
//! A probe that does not answer in time is a failure named for it, and the monitor does not
//! wait for it: each probe runs as its own task, and while the previous round's task of a probe
//! is still running, the next round reports that probe failed again instead of starting a
//! second one. So a hung disk costs one stuck thread, never a pile of them, and never a hung
//! monitor.
//!
//! # Implementation caveats
//!
//! * Until the first round has finished the verdict is not healthy (probe `monitor`), and
//!   [`HealthMonitor::sick_for`] is `None`: nothing is known yet.
//! * On a file system without `O_TMPFILE` the journal probe writes a named file,
//!   `.health-probe-<pid>`, and unlinks it; a crash between the two leaves it behind, and the
//!   journal refuses to open a directory holding a foreign file until it is removed.
//! * The memory probe reads Linux's `/proc/meminfo`; elsewhere it fails.
//! * [`HealthMonitor::start`] must be called inside a tokio runtime with IO and time enabled
//!   (the fork probe reaps its child through the runtime).

mod monitor;
mod probes;
mod watchdog;

pub use monitor::HealthMonitor;
pub use watchdog::Watchdog;

use serde::{Deserialize, Serialize};

/// How often and how strictly the node checks itself (from the `[failover]` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// The time between the starts of two rounds of probes.
    pub probe_interval_ms: u64,
    /// How long one probe may take before it counts as failed.
    pub probe_deadline_ms: u64,
    /// The least `MemAvailable` that counts as healthy, in bytes.
    pub memory_min_bytes: u64,
    /// How late a timer of the runtime may fire before the node counts as sick.
    pub scheduling_lag_max_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_interval_ms: 200,
            probe_deadline_ms: 1000,
            memory_min_bytes: 64 << 20,
            scheduling_lag_max_ms: 500,
        }
    }
}

/// The node's verdict on itself, from its latest round of probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// No probe failed in the latest round.
    pub healthy: bool,
    /// The probes that failed in the latest round, and why.
    pub failures: Vec<ProbeFailure>,
    /// How long ago the latest round finished (a stale verdict shows here).
    pub checked_ms_ago: u64,
}

/// One probe that failed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeFailure {
    /// `journal`, `resource:<name>`, `memory`, `fork`, `scheduling` (or `monitor` before the
    /// first round).
    pub probe: String,
    /// What went wrong, in words (an error, or "no answer within N ms").
    pub detail: String,
}

/// The errors of the watchdog device.
#[derive(thiserror::Error, Debug)]
pub enum HealthError {
    /// The watchdog device could not be opened. Check the path (`/dev/watchdog`), that a driver
    /// is loaded (`modprobe softdog` for the software one) and that no other process holds it.
    #[error(
        "open the watchdog device {path}: {source}; check the path, load a driver (modprobe softdog) and make sure no other process holds it"
    )]
    WatchdogOpen {
        /// The device path.
        path: std::path::PathBuf,
        /// The error of `open`.
        #[source]
        source: std::io::Error,
    },
    /// A write to the watchdog device failed: the device will reset the node when its timeout
    /// runs out.
    #[error(
        "write to the watchdog device {path}: {source}; the device resets the node when its timeout runs out"
    )]
    WatchdogWrite {
        /// The device path.
        path: std::path::PathBuf,
        /// The error of `write`.
        #[source]
        source: std::io::Error,
    },
}
