//! The `[failover]` table: how a coordinator daemon and its standby take over from each other.
//!
//! ```toml
//! [failover]
//! name = "a"                          # this node's name (default "node-<node>")
//! address = "http://127.0.0.1:7700"   # where clients and the peer reach this node (gRPC)
//! peer = "http://127.0.0.1:7701"      # the other node's gRPC address
//! udp_listen = "127.0.0.1:7800"       # heartbeats over UDP: this node's socket …
//! peer_udp = "127.0.0.1:7801"         # … and the peer's
//! key_file = "heartbeat.key"          # the shared heartbeat key (16 bytes or more)
//! quorum = "witness"                  # or "etcd"
//! quorum_endpoints = ["http://127.0.0.1:7900"]
//! quorum_cluster = "concord"          # the cluster's name in the quorum store
//! automatic = false                   # true: the standby promotes itself
//! deadtime_ms = 600                   # silence on every path this long: the peer is dead
//! sicktime_ms = 2000                  # failed probes this long: the node is sick
//! lease_ttl_ms = 1000                 # the primary's lease in the quorum store
//! lease_margin_ms = 200               # stop committing this long before the lease ends
//! fence_agent = "/usr/sbin/fence_ipmilan"   # optional STONITH agent (stdin protocol)
//! fence_plug = "node-a"               # what the agent switches off (the peer)
//! lag_guard_records = 10000           # a standby further behind does not promote (without --force)
//! rejoin = "reseed"                   # an old primary that went further re-seeds ("manual": waits)
//! ```
//!
//! The idea: the table is what both nodes must agree on. Each node names itself and its peer;
//! the quorum store holds the epoch and the primary's lease; the timings say when silence
//! means death and how long before its lease ends a primary stops on its own. Without the
//! table a node never takes part in failover (replication alone, as before).
//!
//! Bounds are checked here so that a timing that cannot be safe is refused at start: the
//! margin must be below the lease, the renewal (a third of the lease) must fit several times
//! in it, and deadtime must cover several heartbeats.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::daemon::BearerToken;

/// Which quorum store holds the epoch and the lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuorumKind {
    /// The built-in `concord witness`.
    #[default]
    Witness,
    /// etcd (v3 API).
    Etcd,
}

impl QuorumKind {
    /// As written in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            QuorumKind::Witness => "witness",
            QuorumKind::Etcd => "etcd",
        }
    }
}

/// The `[failover]` table, checked. Durations in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverConfig {
    /// This node's name.
    pub name: String,
    /// This node's gRPC address as clients and the peer reach it.
    pub address: String,
    /// The peer's gRPC address.
    pub peer: String,
    /// This node's heartbeat socket.
    pub udp_listen: SocketAddr,
    /// The peer's heartbeat socket.
    pub peer_udp: SocketAddr,
    /// The shared heartbeat key file.
    pub key_file: PathBuf,
    /// Which quorum store.
    pub quorum: QuorumKind,
    /// Its addresses.
    pub quorum_endpoints: Vec<String>,
    /// The cluster's name there.
    pub quorum_cluster: String,
    /// The quorum store's bearer token, when it checks one.
    pub quorum_token: Option<BearerToken>,
    /// Deadline of one call to the quorum store.
    pub quorum_call_timeout_ms: u64,
    /// Whether the standby promotes itself.
    pub automatic: bool,
    /// How often heartbeats are sent.
    pub heartbeat_ms: u64,
    /// Silence on every path this long: the peer is dead.
    pub deadtime_ms: u64,
    /// Failed probes (own or reported) this long: sick.
    pub sicktime_ms: u64,
    /// The primary's lease.
    pub lease_ttl_ms: u64,
    /// How long before its lease (or confirmation) ends a primary stops committing.
    pub lease_margin_ms: u64,
    /// How long a standby's confirmation binds it not to promote.
    pub confirm_ms: u64,
    /// Least time between two automatic failovers (a flapping link causes at most one).
    pub holdoff_ms: u64,
    /// How long a standby waits after finding the primary dead before it claims the epoch
    /// (favours the current primary in a race).
    pub standby_delay_ms: u64,
    /// A standby that has not received this many of the primary's records does not promote
    /// without `--force`.
    pub lag_guard_records: u64,
    /// The fence agent (fence-agents stdin protocol), if any.
    pub fence_agent: Option<PathBuf>,
    /// What the agent switches off: the peer.
    pub fence_plug: Option<String>,
    /// More `key=value` lines for the agent.
    pub fence_args: BTreeMap<String, String>,
    /// Deadline of the fence agent.
    pub fence_timeout_ms: u64,
    /// Whether a node whose journal went past the primary's (an old primary) re-seeds itself
    /// from the primary to rejoin (`rejoin = "reseed"`, the default; it reports what it
    /// discards), or waits for an operator (`"manual"`).
    pub rejoin_reseed: bool,
    /// A watchdog device petted while healthy.
    pub watchdog: Option<PathBuf>,
    /// How often the health probes run.
    pub probe_interval_ms: u64,
    /// Deadline of one probe.
    pub probe_deadline_ms: u64,
    /// Least available memory for a healthy verdict.
    pub memory_min_bytes: u64,
}

impl FailoverConfig {
    /// A table for two nodes on this machine (tests and `concord demo --failover`): the given
    /// addresses, the witness at `witness`, automatic failover, defaults elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn local(
        name: &str,
        address: &str,
        peer: &str,
        udp_listen: SocketAddr,
        peer_udp: SocketAddr,
        key_file: &Path,
        witness: &str,
    ) -> FailoverConfig {
        FailoverConfig {
            name: name.into(),
            address: address.into(),
            peer: peer.into(),
            udp_listen,
            peer_udp,
            key_file: key_file.into(),
            quorum: QuorumKind::Witness,
            quorum_endpoints: vec![witness.into()],
            quorum_cluster: "concord".into(),
            quorum_token: None,
            quorum_call_timeout_ms: 300,
            automatic: true,
            heartbeat_ms: 100,
            deadtime_ms: 600,
            sicktime_ms: 2_000,
            lease_ttl_ms: 1_000,
            lease_margin_ms: 200,
            confirm_ms: 600,
            holdoff_ms: 60_000,
            standby_delay_ms: 100,
            lag_guard_records: 10_000,
            fence_agent: None,
            fence_plug: None,
            fence_args: BTreeMap::new(),
            fence_timeout_ms: 5_000,
            rejoin_reseed: true,
            watchdog: None,
            probe_interval_ms: 200,
            probe_deadline_ms: 1_000,
            memory_min_bytes: 64 << 20,
        }
    }
}

/// The `[failover]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FailoverToml {
    name: Option<String>,
    address: String,
    peer: String,
    udp_listen: SocketAddr,
    peer_udp: SocketAddr,
    key_file: PathBuf,
    quorum: Option<String>,
    quorum_endpoints: Vec<String>,
    quorum_cluster: Option<String>,
    quorum_token_file: Option<PathBuf>,
    quorum_call_timeout_ms: Option<u64>,
    automatic: Option<bool>,
    heartbeat_ms: Option<u64>,
    deadtime_ms: Option<u64>,
    sicktime_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
    lease_margin_ms: Option<u64>,
    confirm_ms: Option<u64>,
    holdoff_ms: Option<u64>,
    standby_delay_ms: Option<u64>,
    lag_guard_records: Option<u64>,
    fence_agent: Option<PathBuf>,
    fence_plug: Option<String>,
    #[serde(default)]
    fence_args: BTreeMap<String, String>,
    fence_timeout_ms: Option<u64>,
    rejoin: Option<String>,
    watchdog: Option<PathBuf>,
    probe_interval_ms: Option<u64>,
    probe_deadline_ms: Option<u64>,
    memory_min_bytes: Option<u64>,
}

fn url(field: &str, value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.to_string())
    } else {
        Err(format!(
            "[failover]: field `{field}` is {value:?}; write an address as http://HOST:PORT or https://HOST:PORT"
        ))
    }
}

fn within(field: &str, value: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "[failover]: field `{field}` is {value}; it must be {} to {}",
            range.start(),
            range.end()
        ))
    }
}

impl FailoverToml {
    /// The checked table; relative paths are relative to `base`; `node` names the node by
    /// default.
    pub(super) fn into_config(self, base: &Path, node: u32) -> Result<FailoverConfig, String> {
        let name = self.name.unwrap_or_else(|| format!("node-{node}"));
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "[failover]: field `name` is {name:?}; use 1 to 64 printable ASCII characters"
            ));
        }
        let quorum = match self.quorum.as_deref() {
            None | Some("witness") => QuorumKind::Witness,
            Some("etcd") => QuorumKind::Etcd,
            Some(other) => {
                return Err(format!(
                    "[failover]: field `quorum` is {other:?}; write \"witness\" or \"etcd\""
                ));
            }
        };
        if self.quorum_endpoints.is_empty() {
            return Err(
                "[failover]: `quorum_endpoints` is empty; name the witness or the etcd members"
                    .into(),
            );
        }
        let quorum_endpoints = self
            .quorum_endpoints
            .iter()
            .map(|e| url("quorum_endpoints", e))
            .collect::<Result<Vec<_>, _>>()?;
        let d = FailoverConfig::local(
            &name,
            &self.address,
            &self.peer,
            self.udp_listen,
            self.peer_udp,
            &self.key_file,
            "",
        );
        let heartbeat_ms = within(
            "heartbeat_ms",
            self.heartbeat_ms.unwrap_or(d.heartbeat_ms),
            10..=10_000,
        )?;
        let deadtime_ms = within(
            "deadtime_ms",
            self.deadtime_ms.unwrap_or(d.deadtime_ms),
            3 * heartbeat_ms..=600_000,
        )?;
        let lease_ttl_ms = within(
            "lease_ttl_ms",
            self.lease_ttl_ms.unwrap_or(d.lease_ttl_ms),
            300..=600_000,
        )?;
        let lease_margin_ms = within(
            "lease_margin_ms",
            self.lease_margin_ms.unwrap_or(d.lease_margin_ms),
            1..=lease_ttl_ms / 2,
        )?;
        let quorum_call_timeout_ms = within(
            "quorum_call_timeout_ms",
            self.quorum_call_timeout_ms
                .unwrap_or(d.quorum_call_timeout_ms),
            10..=lease_ttl_ms / 3,
        )?;
        let fence_plug = self.fence_plug;
        if self.fence_agent.is_some() && fence_plug.is_none() {
            return Err(
                "[failover]: `fence_agent` needs `fence_plug` (what the agent switches off: the peer)"
                    .into(),
            );
        }
        let quorum_token = self
            .quorum_token_file
            .map(|file| BearerToken::from_file(&base.join(file)))
            .transpose()
            .map_err(|e| format!("[failover]: field `quorum_token_file`: {e}"))?;
        Ok(FailoverConfig {
            name,
            address: url("address", &self.address)?,
            peer: url("peer", &self.peer)?,
            udp_listen: self.udp_listen,
            peer_udp: self.peer_udp,
            key_file: base.join(self.key_file),
            quorum,
            quorum_endpoints,
            quorum_cluster: self.quorum_cluster.unwrap_or(d.quorum_cluster),
            quorum_token,
            quorum_call_timeout_ms,
            automatic: self.automatic.unwrap_or(false),
            heartbeat_ms,
            deadtime_ms,
            sicktime_ms: within(
                "sicktime_ms",
                self.sicktime_ms.unwrap_or(d.sicktime_ms),
                100..=3_600_000,
            )?,
            lease_ttl_ms,
            lease_margin_ms,
            confirm_ms: within(
                "confirm_ms",
                self.confirm_ms.unwrap_or(d.confirm_ms),
                2 * heartbeat_ms..=600_000,
            )?,
            holdoff_ms: within(
                "holdoff_ms",
                self.holdoff_ms.unwrap_or(d.holdoff_ms),
                0..=86_400_000,
            )?,
            standby_delay_ms: within(
                "standby_delay_ms",
                self.standby_delay_ms.unwrap_or(d.standby_delay_ms),
                0..=60_000,
            )?,
            lag_guard_records: self.lag_guard_records.unwrap_or(d.lag_guard_records),
            fence_agent: self.fence_agent.map(|f| base.join(f)),
            fence_plug,
            fence_args: self.fence_args,
            fence_timeout_ms: within(
                "fence_timeout_ms",
                self.fence_timeout_ms.unwrap_or(d.fence_timeout_ms),
                100..=600_000,
            )?,
            rejoin_reseed: match self.rejoin.as_deref() {
                None | Some("reseed") => true,
                Some("manual") => false,
                Some(other) => {
                    return Err(format!(
                        "[failover]: field `rejoin` is {other:?}; write \"reseed\" or \"manual\""
                    ));
                }
            },
            watchdog: self.watchdog,
            probe_interval_ms: within(
                "probe_interval_ms",
                self.probe_interval_ms.unwrap_or(d.probe_interval_ms),
                10..=60_000,
            )?,
            probe_deadline_ms: within(
                "probe_deadline_ms",
                self.probe_deadline_ms.unwrap_or(d.probe_deadline_ms),
                10..=60_000,
            )?,
            memory_min_bytes: self.memory_min_bytes.unwrap_or(d.memory_min_bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> Result<FailoverConfig, String> {
        let text = format!(
            "address = \"http://127.0.0.1:7700\"\npeer = \"http://127.0.0.1:7701\"\n\
             udp_listen = \"127.0.0.1:7800\"\npeer_udp = \"127.0.0.1:7801\"\n\
             key_file = \"hb.key\"\nquorum_endpoints = [\"http://127.0.0.1:7900\"]\n{extra}"
        );
        let raw: FailoverToml = toml::from_str(&text).map_err(|e| e.to_string())?;
        raw.into_config(Path::new("/etc/concord"), 3)
    }

    #[test]
    fn defaults_and_paths() {
        let cfg = table("").unwrap();
        assert_eq!(cfg.name, "node-3");
        assert_eq!(cfg.key_file, Path::new("/etc/concord/hb.key"));
        assert_eq!(cfg.quorum, QuorumKind::Witness);
        assert!(!cfg.automatic);
        assert_eq!(cfg.lease_ttl_ms, 1_000);
    }

    #[test]
    fn unsafe_timings_and_bad_values_are_refused() {
        for (extra, says) in [
            (
                "lease_ttl_ms = 1000\nlease_margin_ms = 600",
                "lease_margin_ms",
            ),
            ("heartbeat_ms = 500\ndeadtime_ms = 600", "deadtime_ms"),
            ("quorum = \"zookeeper\"", "quorum"),
            ("fence_agent = \"/usr/sbin/fence_dummy\"", "fence_plug"),
            ("name = \"a b\"", "name"),
        ] {
            let err = table(extra).unwrap_err();
            assert!(err.contains(says), "{extra}: {err}");
        }
        let err = table("").map(|_| ()).and_then(|_| {
            let raw: FailoverToml = toml::from_str(
                "address = \"127.0.0.1:7700\"\npeer = \"http://x:1\"\nudp_listen = \"127.0.0.1:1\"\n\
                 peer_udp = \"127.0.0.1:2\"\nkey_file = \"k\"\nquorum_endpoints = [\"http://w:1\"]",
            )
            .map_err(|e| e.to_string())?;
            raw.into_config(Path::new(""), 1).map(|_| ())
        });
        assert!(err.unwrap_err().contains("address"));
    }
}
