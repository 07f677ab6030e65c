//! `concord status`: asks a running coordinator daemon how it is, over gRPC (`Status`).
//!
//! It connects as every client does ([`proto::client::connect`]: `http://` plain text,
//! `https://` TLS with `--tls-ca`, a client certificate with `--tls-cert`/`--tls-key`, a bearer
//! token from `--token-file`) and prints the daemon's role and serving state, node, epoch,
//! durable LSN, how many transactions are open and in doubt, and each resource's health from
//! the probe the daemon ran for this call. `--json` prints one object with exactly the fields
//! of [`StatusJson`].
//!
//! Exit codes: 0 when every resource is healthy; 4 ([`Unhealthy`]) when one is not (the status
//! is printed first); 1 when the daemon cannot be reached or does not answer within
//! [`STATUS_TIMEOUT_MS`] (the message says how to start one).
//!
//! # Caveats
//!
//! * A daemon that is draining or not serving still exits 0 when its resources are healthy:
//!   `serving` says so, and a script that cares reads it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use proto::client::{ClientTls, Credentials, Token};
use proto::v1;
use serde::Serialize;

/// The daemon asked when `--url` is not given.
pub const URL_DEFAULT: &str = "http://127.0.0.1:7700";
/// How long the `Status` call may take once connected (milliseconds); the daemon bounds each
/// resource's probe well within it.
pub const STATUS_TIMEOUT_MS: u64 = 15_000;

/// Options of `concord status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The daemon: `http://HOST:PORT` (plain text) or `https://HOST:PORT` (TLS).
    #[arg(long, default_value = URL_DEFAULT)]
    pub url: String,
    /// A file holding the bearer token (first line).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the daemon's certificate; for an `https` URL.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a daemon that asks for one; with --tls-key.
    #[arg(long, requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM); with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// The failover state in `--json` (see `concord.v1.FailoverState`).
#[derive(Debug, Serialize)]
pub struct FailoverJson {
    pub node: String,
    pub address: String,
    pub role: String,
    pub epoch: u64,
    pub primary: String,
    pub may_commit: bool,
    pub why_not: String,
    pub lease_remaining_ms: u64,
    pub confirmed_remaining_ms: u64,
    pub quorum: String,
    pub quorum_reachable: bool,
    pub healthy: bool,
    pub failures: Vec<String>,
    pub peer: String,
    pub peer_state: String,
    pub paths_down: Vec<String>,
    pub automatic: bool,
    pub last_change: String,
}

impl From<v1::FailoverState> for FailoverJson {
    fn from(f: v1::FailoverState) -> FailoverJson {
        FailoverJson {
            node: f.node,
            address: f.address,
            role: f.role,
            epoch: f.epoch,
            primary: f.primary,
            may_commit: f.may_commit,
            why_not: f.why_not,
            lease_remaining_ms: f.lease_remaining_ms,
            confirmed_remaining_ms: f.confirmed_remaining_ms,
            quorum: f.quorum,
            quorum_reachable: f.quorum_reachable,
            healthy: f.healthy,
            failures: f.failures,
            peer: f.peer,
            peer_state: f.peer_state,
            paths_down: f.paths_down,
            automatic: f.automatic,
            last_change: f.last_change,
        }
    }
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    /// `primary` or `standby`.
    pub role: &'static str,
    /// `serving`, `draining` or `not_serving`.
    pub serving: &'static str,
    /// The daemon's node id.
    pub node: u32,
    /// The epoch it serves in.
    pub epoch: u64,
    /// Its journal's durable LSN.
    pub durable_lsn: u64,
    /// Transactions begun and not yet committing or rolling back.
    pub open_txns: u64,
    /// Transactions in doubt.
    pub in_doubt_txns: u64,
    /// Each configured resource's health.
    pub resources: Vec<ResourceJson>,
    /// The daemon's version.
    pub version: String,
    /// Journal shipping and replay as this node sees it (`null` when the node reports none).
    pub replication: Option<ReplicationJson>,
    /// Failover as the node sees it (a node with a `[failover]` table).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverJson>,
}

/// Replication as one node sees it (`docs/operations.md`, "Replication status").
#[derive(Debug, Serialize)]
pub struct ReplicationJson {
    /// `async` or `sync` (a primary's mode; empty on a standby).
    pub mode: String,
    /// `sync`, `async`, `fallback-async` or `waiting` (a primary; empty on a standby).
    pub sync_state: String,
    /// A standby: the primary it follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// A standby: whether its stream is up; a primary: whether any standby's is.
    pub connected: bool,
    /// This node's journal's durable LSN.
    pub durable_lsn: u64,
    /// The highest LSN sent (a primary) or received (a standby).
    pub shipped_lsn: u64,
    /// The standby's acknowledged durable LSN (a primary: the lowest over its standbys).
    pub acknowledged_lsn: u64,
    /// Every committed transaction up to it is applied to every resource of the standby.
    pub replayed_lsn: u64,
    /// How far the standby is behind.
    pub lag: LagJson,
    /// A standby: per resource.
    pub resources: Vec<ResourceLagJson>,
    /// A standby: the oldest committed transaction not yet replayed.
    pub oldest_unreplayed: Option<UnreplayedJson>,
    /// A primary: its standbys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standbys: Option<Vec<StandbyJson>>,
}

/// A lag in records, bytes, global transactions and seconds.
#[derive(Debug, Default, Serialize)]
pub struct LagJson {
    /// Records.
    pub records: u64,
    /// Bytes.
    pub bytes: u64,
    /// Global transactions.
    pub transactions: u64,
    /// Seconds.
    pub seconds: f64,
}

/// One resource's replay on a standby.
#[derive(Debug, Serialize)]
pub struct ResourceLagJson {
    /// The resource.
    pub name: String,
    /// Its applied LSN.
    pub applied_lsn: u64,
    /// Its lag.
    pub lag: LagJson,
}

/// A committed transaction not yet replayed.
#[derive(Debug, Serialize)]
pub struct UnreplayedJson {
    /// Its xid.
    pub xid: String,
    /// Its decision's LSN.
    pub lsn: u64,
    /// How long ago it was decided (milliseconds).
    pub age_ms: u64,
}

/// One standby as its primary sees it.
#[derive(Debug, Serialize)]
pub struct StandbyJson {
    /// Its name.
    pub name: String,
    /// Whether its stream is up.
    pub connected: bool,
    /// The highest LSN sent to it.
    pub shipped_lsn: u64,
    /// Its acknowledged durable LSN.
    pub acknowledged_lsn: u64,
    /// Its replayed LSN.
    pub replayed_lsn: u64,
    /// How far it is behind.
    pub lag: LagJson,
}

impl From<Option<v1::Lag>> for LagJson {
    fn from(lag: Option<v1::Lag>) -> LagJson {
        lag.map_or_else(LagJson::default, |l| LagJson {
            records: l.records,
            bytes: l.bytes,
            transactions: l.transactions,
            seconds: l.seconds,
        })
    }
}

impl ReplicationJson {
    fn new(r: v1::ReplicationStatus, role: &str) -> ReplicationJson {
        let standby = role == "standby";
        ReplicationJson {
            mode: r.mode,
            sync_state: r.sync_state,
            primary: standby.then_some(r.primary),
            connected: r.connected,
            durable_lsn: r.durable_lsn,
            shipped_lsn: r.shipped_lsn,
            acknowledged_lsn: r.acknowledged_lsn,
            replayed_lsn: r.replayed_lsn,
            lag: r.lag.into(),
            resources: r
                .resources
                .into_iter()
                .map(|x| ResourceLagJson {
                    name: x.name,
                    applied_lsn: x.applied_lsn,
                    lag: x.lag.into(),
                })
                .collect(),
            oldest_unreplayed: r.oldest_unreplayed.map(|u| UnreplayedJson {
                xid: u.xid,
                lsn: u.lsn,
                age_ms: u.age_ms,
            }),
            standbys: (!standby).then(|| {
                r.standbys
                    .into_iter()
                    .map(|s| StandbyJson {
                        name: s.name,
                        connected: s.connected,
                        shipped_lsn: s.shipped_lsn,
                        acknowledged_lsn: s.acknowledged_lsn,
                        replayed_lsn: s.replayed_lsn,
                        lag: s.lag.into(),
                    })
                    .collect()
            }),
        }
    }
}

/// One resource's health.
#[derive(Debug, Serialize)]
pub struct ResourceJson {
    /// Its name in the configuration.
    pub name: String,
    /// Its kind (`files`, `postgres`, `mail`, `kv`).
    pub kind: String,
    /// Whether its probe answered.
    pub healthy: bool,
    /// When unhealthy, what failed; empty otherwise.
    pub detail: String,
}

/// A resource of the daemon is unhealthy. Exit code 4.
#[derive(Debug, thiserror::Error)]
#[error("unhealthy: {}", .resources.join(", "))]
pub struct Unhealthy {
    /// The unhealthy resources, each with its reason.
    pub resources: Vec<String>,
}

/// Runs `concord status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let credentials = credentials(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let answer = runtime.block_on(ask(&args.url, &credentials))?;
    let status = StatusJson::from(answer);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_lines(&args.url, &status);
    }
    let unhealthy: Vec<String> = status
        .resources
        .iter()
        .filter(|r| !r.healthy)
        .map(|r| format!("resource {} ({})", r.name, r.detail))
        .collect();
    if unhealthy.is_empty() {
        Ok(())
    } else {
        Err(Unhealthy {
            resources: unhealthy,
        }
        .into())
    }
}

/// The token and TLS settings the options name.
fn credentials(args: &StatusArgs) -> anyhow::Result<Credentials> {
    let mut credentials = Credentials::none();
    if let Some(path) = &args.token_file {
        credentials = credentials.with_token(Token::from_file(path)?);
    }
    if let Some(ca) = &args.tls_ca {
        let mut tls = ClientTls::with_ca_file(ca)?;
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity_files(cert, key)?;
        }
        credentials = credentials.with_tls(tls);
    }
    Ok(credentials)
}

/// Connects and asks for the status.
async fn ask(url: &str, credentials: &Credentials) -> anyhow::Result<v1::StatusResponse> {
    let start_hint = || {
        format!(
            "no daemon answers at {url}; start one with `concord coordinator --config concord.toml` (or pass --url)"
        )
    };
    let mut client = proto::client::connect(url, credentials)
        .await
        .with_context(start_hint)?;
    let request = v1::StatusRequest {
        header: Some(v1::RequestHeader::current("concord status")),
    };
    let call = client.status(request.clone());
    let timeout = Duration::from_millis(STATUS_TIMEOUT_MS);
    let late = || {
        anyhow::anyhow!("the daemon at {url} did not answer Status within {STATUS_TIMEOUT_MS} ms")
    };
    let mut answer = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| late())?;
    if matches!(&answer, Err(status) if status.code() == tonic::Code::Unimplemented
        || proto::primary_hint(status).is_some())
    {
        // A standby serves no Coordinator service (a failover node refuses it, naming the
        // primary): its status comes from Replication.
        let mut replication = proto::client::connect_replication(url, credentials)
            .await
            .with_context(start_hint)?;
        answer = tokio::time::timeout(timeout, replication.status(request))
            .await
            .map_err(|_| late())?;
    }
    match answer {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if status.code() == tonic::Code::Unavailable => {
            Err(anyhow::anyhow!("{}", status.message())).with_context(start_hint)
        }
        Err(status) => Err(anyhow::anyhow!(
            "the daemon at {url} refused Status: {}",
            status.message()
        )),
    }
}

impl From<v1::StatusResponse> for StatusJson {
    fn from(s: v1::StatusResponse) -> StatusJson {
        let role = role_name(s.role);
        StatusJson {
            replication: s.replication.map(|r| ReplicationJson::new(r, role)),
            failover: s.failover.map(FailoverJson::from),
            role,
            serving: serving_name(s.serving),
            node: s.node,
            epoch: s.epoch,
            durable_lsn: s.durable_lsn,
            open_txns: s.open_txns,
            in_doubt_txns: s.in_doubt_txns,
            resources: s
                .resources
                .into_iter()
                .map(|r| ResourceJson {
                    name: r.name,
                    kind: r.kind,
                    healthy: r.healthy,
                    detail: r.detail,
                })
                .collect(),
            version: s.version,
        }
    }
}

fn role_name(role: i32) -> &'static str {
    match v1::Role::try_from(role) {
        Ok(v1::Role::Primary) => "primary",
        Ok(v1::Role::Standby) => "standby",
        _ => "unknown",
    }
}

fn serving_name(serving: i32) -> &'static str {
    match v1::Serving::try_from(serving) {
        Ok(v1::Serving::Serving) => "serving",
        Ok(v1::Serving::Draining) => "draining",
        Ok(v1::Serving::NotServing) => "not_serving",
        _ => "unknown",
    }
}

fn print_lines(url: &str, s: &StatusJson) {
    println!("concord {} at {url}: {}, {}", s.version, s.role, s.serving);
    println!(
        "node {}, epoch {}, durable lsn {}",
        s.node, s.epoch, s.durable_lsn
    );
    println!(
        "transactions: {} open, {} in doubt",
        s.open_txns, s.in_doubt_txns
    );
    for r in &s.resources {
        if r.healthy {
            println!("resource {} ({}): healthy", r.name, r.kind);
        } else {
            println!("resource {} ({}): UNHEALTHY: {}", r.name, r.kind, r.detail);
        }
    }
    if let Some(r) = &s.replication {
        print_replication(r);
    }
    if let Some(f) = &s.failover {
        print_failover(f);
    }
}

fn print_failover(f: &FailoverJson) {
    println!(
        "failover: node {} ({}) is {} at epoch {}; primary {}",
        f.node,
        f.address,
        f.role,
        f.epoch,
        if f.primary.is_empty() {
            "not known"
        } else {
            &f.primary
        }
    );
    if f.role == "primary" {
        if f.may_commit {
            println!(
                "  may commit: lease {} ms, standby confirmation {} ms",
                f.lease_remaining_ms, f.confirmed_remaining_ms
            );
        } else {
            println!("  MAY NOT COMMIT: {}", f.why_not);
        }
    } else if !f.why_not.is_empty() && f.role == "demoted" {
        println!("  {}", f.why_not);
    }
    println!(
        "  quorum store {}: {}",
        f.quorum,
        if f.quorum_reachable {
            "reachable"
        } else {
            "NOT REACHABLE"
        }
    );
    if f.healthy {
        println!("  health: healthy");
    } else {
        println!("  health: SICK: {}", f.failures.join("; "));
    }
    let down = if f.paths_down.is_empty() {
        String::new()
    } else {
        format!(" (paths down: {})", f.paths_down.join(", "))
    };
    println!("  peer {}: {}{down}", f.peer, f.peer_state);
    println!(
        "  automatic failover: {}",
        if f.automatic { "on" } else { "off" }
    );
    if !f.last_change.is_empty() {
        println!("  last change: {}", f.last_change);
    }
}

fn print_replication(r: &ReplicationJson) {
    let lag = |l: &LagJson| {
        format!(
            "{} records, {} bytes, {} transactions, {:.3} s",
            l.records, l.bytes, l.transactions, l.seconds
        )
    };
    match (&r.primary, &r.standbys) {
        (Some(primary), _) => {
            let link = if r.connected {
                "connected"
            } else {
                "NOT CONNECTED"
            };
            println!("standby of {primary} ({link})");
            println!(
                "received lsn {}, replayed lsn {}; lag {}",
                r.shipped_lsn,
                r.replayed_lsn,
                lag(&r.lag)
            );
            for x in &r.resources {
                println!(
                    "  {}: applied lsn {}; lag {}",
                    x.name,
                    x.applied_lsn,
                    lag(&x.lag)
                );
            }
            if let Some(o) = &r.oldest_unreplayed {
                println!(
                    "oldest unreplayed: {} at lsn {} ({} ms ago)",
                    o.xid, o.lsn, o.age_ms
                );
            }
        }
        (None, standbys) => {
            println!("replication: {} ({})", r.mode, r.sync_state);
            for s in standbys.iter().flatten() {
                let link = if s.connected {
                    "connected"
                } else {
                    "disconnected"
                };
                println!(
                    "  standby {} ({link}): shipped lsn {}, acknowledged lsn {}, replayed lsn {}; lag {}",
                    s.name,
                    s.shipped_lsn,
                    s.acknowledged_lsn,
                    s.replayed_lsn,
                    lag(&s.lag)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_has_exactly_the_documented_fields() {
        let answer = v1::StatusResponse {
            role: v1::Role::Primary as i32,
            serving: v1::Serving::Serving as i32,
            node: 1,
            epoch: 2,
            durable_lsn: 3,
            open_txns: 4,
            in_doubt_txns: 5,
            resources: vec![v1::ResourceHealth {
                name: "uploads".into(),
                kind: "files".into(),
                healthy: false,
                detail: "gone".into(),
            }],
            version: "0.1.0".into(),
            schema_version: 1,
            failover: None,
            replication: None,
        };
        let json = serde_json::to_value(StatusJson::from(answer)).unwrap();
        let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "durable_lsn",
                "epoch",
                "in_doubt_txns",
                "node",
                "open_txns",
                "replication",
                "resources",
                "role",
                "serving",
                "version"
            ]
        );
        assert_eq!(json["role"], "primary");
        assert_eq!(json["resources"][0]["healthy"], false);
    }
}
