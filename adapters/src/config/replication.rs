//! The `[replication]` table (a primary: how it ships its journal to standbys) and the
//! `[standby]` table (a standby: which primary it follows and how it serves its status).
//!
//! ```toml
//! [replication]                    # on the primary; every field optional
//! mode = "async"                   # or "sync": a commit is answered once a standby journaled it
//! sync_wait_ms_max = 5000          # sync: how long a commit waits for the standby
//! sync_fallback = "fail"           # or "async": what a commit does when that wait runs out
//! retention_bytes_max = 1073741824 # most journal the retention floor holds for a standby
//!
//! [standby]                        # on the standby
//! primary = "https://primary.example:7700"
//! token_file = "secrets/operator"  # the primary's operator token, when it checks tokens
//! tls_ca_file = "tls/ca.crt"       # with https: the CA that signed the primary's certificate
//! tls_cert_file = "tls/standby.crt"  # optional client certificate (mutual TLS) …
//! tls_key_file = "tls/standby.key"   # … and its key
//! name = "site-b"                  # how the primary names this standby (default "standby")
//! listen = "127.0.0.1:7701"        # where the standby serves its status (gRPC, plain text)
//! metrics_listen = "127.0.0.1:9701"
//! ```
//!
//! The idea: replication is on as soon as a standby connects; the table only says what the
//! primary promises its callers. `async` answers a commit as soon as the primary's journal has
//! its decision (the standby's lag is the data a failover can lose, and status shows it). `sync`
//! answers only once a standby's journal has it too; when no standby confirms within
//! `sync_wait_ms_max`, the commit fails (`sync_fallback = "fail"`: the transaction *is*
//! committed on the primary, and the caller is told it is not confirmed by a standby) or the
//! primary stops waiting (`"async"`) until a standby catches up again — either way logged, and
//! visible in `concord status` and the metrics.
//!
//! Bounds: `sync_wait_ms_max` 1 ms to an hour; `retention_bytes_max` 16 MiB to 1 TiB.
//!
//! # Implementation caveats
//!
//! * The standby serves its status in plain text on loopback only; the status carries no
//!   secrets and no data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::daemon::BearerToken;

/// The standby's default status address.
pub const STANDBY_LISTEN_DEFAULT: &str = "127.0.0.1:7701";

/// Whether a commit waits for a standby.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplicationMode {
    /// A commit is answered once the primary's journal has its decision.
    #[default]
    Async,
    /// A commit is answered once a standby's journal has its decision too.
    Sync,
}

impl ReplicationMode {
    /// As written in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
        }
    }
}

/// What a sync commit does when no standby confirms it within `sync_wait_ms_max`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncFallback {
    /// The commit is answered with an error saying it is committed here and not confirmed.
    #[default]
    Fail,
    /// Commits stop waiting until a standby has caught up again.
    Async,
}

/// The `[replication]` table, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// `mode`.
    pub mode: ReplicationMode,
    /// `sync_wait_ms_max` (milliseconds).
    pub sync_wait_ms_max: u64,
    /// `sync_fallback`.
    pub sync_fallback: SyncFallback,
    /// `retention_bytes_max`.
    pub retention_bytes_max: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            mode: ReplicationMode::Async,
            sync_wait_ms_max: 5_000,
            sync_fallback: SyncFallback::Fail,
            retention_bytes_max: 1 << 30,
        }
    }
}

/// The `[standby]` table, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyConfig {
    /// The primary's address (`http://` plain text, `https://` TLS).
    pub primary: String,
    /// The primary's operator token, when it checks tokens.
    pub token: Option<BearerToken>,
    /// With `https`: the CA certificate(s) that signed the primary's certificate (PEM).
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for a primary that asks for one.
    pub tls_identity: Option<(PathBuf, PathBuf)>,
    /// How the primary names this standby.
    pub name: String,
    /// Where the standby serves its status.
    pub listen: SocketAddr,
    /// Where it serves Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl StandbyConfig {
    /// A standby of `primary` with the defaults: no token, no TLS files, named `standby`,
    /// status on [`STANDBY_LISTEN_DEFAULT`].
    pub fn following(primary: &str) -> StandbyConfig {
        StandbyConfig {
            primary: primary.to_string(),
            token: None,
            tls_ca_file: None,
            tls_identity: None,
            name: "standby".into(),
            listen: default_standby_listen(),
            metrics_listen: None,
        }
    }
}

fn default_standby_listen() -> SocketAddr {
    STANDBY_LISTEN_DEFAULT
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7701)))
}

/// The `[replication]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplicationToml {
    mode: Option<String>,
    sync_wait_ms_max: Option<u64>,
    sync_fallback: Option<String>,
    retention_bytes_max: Option<u64>,
}

impl ReplicationToml {
    pub(super) fn into_config(self) -> Result<ReplicationConfig, String> {
        let defaults = ReplicationConfig::default();
        let mode = match self.mode.as_deref() {
            None | Some("async") => ReplicationMode::Async,
            Some("sync") => ReplicationMode::Sync,
            Some(other) => {
                return Err(format!(
                    "[replication]: field `mode` is {other:?}; write \"async\" or \"sync\""
                ));
            }
        };
        let sync_fallback = match self.sync_fallback.as_deref() {
            None | Some("fail") => SyncFallback::Fail,
            Some("async") => SyncFallback::Async,
            Some(other) => {
                return Err(format!(
                    "[replication]: field `sync_fallback` is {other:?}; write \"fail\" or \"async\""
                ));
            }
        };
        let sync_wait_ms_max = self.sync_wait_ms_max.unwrap_or(defaults.sync_wait_ms_max);
        if !(1..=3_600_000).contains(&sync_wait_ms_max) {
            return Err(format!(
                "[replication]: field `sync_wait_ms_max` is {sync_wait_ms_max}; it must be 1 to \
                 3600000 (an hour)"
            ));
        }
        let retention_bytes_max = self
            .retention_bytes_max
            .unwrap_or(defaults.retention_bytes_max);
        if !((16 << 20)..=(1 << 40)).contains(&retention_bytes_max) {
            return Err(format!(
                "[replication]: field `retention_bytes_max` is {retention_bytes_max}; it must be \
                 16 MiB to 1 TiB"
            ));
        }
        Ok(ReplicationConfig {
            mode,
            sync_wait_ms_max,
            sync_fallback,
            retention_bytes_max,
        })
    }
}

/// The `[standby]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StandbyToml {
    primary: String,
    token_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    name: Option<String>,
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
}

impl StandbyToml {
    /// The checked table; relative paths are relative to `base`, and the token file is read.
    pub(super) fn into_config(self, base: &Path) -> Result<StandbyConfig, String> {
        let primary = self.primary.trim().to_string();
        if !(primary.starts_with("http://") || primary.starts_with("https://")) {
            return Err(format!(
                "[standby]: field `primary` is {primary:?}; write the primary daemon's address as \
                 http://HOST:PORT (plain text) or https://HOST:PORT (TLS)"
            ));
        }
        let token = self
            .token_file
            .map(|file| BearerToken::from_file(&base.join(file)))
            .transpose()
            .map_err(|e| format!("[standby]: field `token_file`: {e}"))?;
        let tls_identity = match (self.tls_cert_file, self.tls_key_file) {
            (Some(cert), Some(key)) => Some((base.join(cert), base.join(key))),
            (None, None) => None,
            _ => {
                return Err(
                    "[standby]: `tls_cert_file` and `tls_key_file` go together; set both or neither"
                        .into(),
                );
            }
        };
        let name = self.name.unwrap_or_else(|| "standby".into());
        if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "[standby]: field `name` is {name:?}; use 1 to 128 printable ASCII characters"
            ));
        }
        Ok(StandbyConfig {
            primary,
            token,
            tls_ca_file: self.tls_ca_file.map(|f| base.join(f)),
            tls_identity,
            name,
            listen: self.listen.unwrap_or_else(default_standby_listen),
            metrics_listen: self.metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replication(text: &str) -> Result<ReplicationConfig, String> {
        toml::from_str::<ReplicationToml>(text)
            .map_err(|e| e.to_string())?
            .into_config()
    }

    #[test]
    fn replication_defaults_to_async() {
        assert_eq!(replication(""), Ok(ReplicationConfig::default()));
    }

    #[test]
    fn replication_reads_sync_and_its_fallback() {
        let cfg = replication("mode = \"sync\"\nsync_fallback = \"async\"\nsync_wait_ms_max = 50")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.mode, ReplicationMode::Sync);
        assert_eq!(cfg.sync_fallback, SyncFallback::Async);
        assert_eq!(cfg.sync_wait_ms_max, 50);
    }

    #[test]
    fn replication_refuses_what_it_cannot_use() {
        for (text, field) in [
            ("mode = \"semi\"", "mode"),
            ("sync_fallback = \"retry\"", "sync_fallback"),
            ("sync_wait_ms_max = 0", "sync_wait_ms_max"),
            ("retention_bytes_max = 1024", "retention_bytes_max"),
        ] {
            let e = replication(text).expect_err(text);
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn standby_needs_an_http_address_and_both_identity_files() {
        let base = Path::new("/etc/concord");
        let read = |text: &str| {
            toml::from_str::<StandbyToml>(text)
                .map_err(|e| e.to_string())
                .and_then(|t| t.into_config(base))
        };
        let ok = read("primary = \"http://127.0.0.1:7700\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.name, "standby");
        assert_eq!(ok.listen, default_standby_listen());
        let e = read("primary = \"127.0.0.1:7700\"").expect_err("no scheme");
        assert!(e.contains("http://"), "{e}");
        let e = read("primary = \"https://p:7700\"\ntls_cert_file = \"c\"").expect_err("no key");
        assert!(e.contains("tls_key_file"), "{e}");
        let ca = read("primary = \"https://p:7700\"\ntls_ca_file = \"ca.crt\"")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ca.tls_ca_file, Some(base.join("ca.crt")));
    }
}
