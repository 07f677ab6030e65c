//! The quorum store: the third party that holds the cluster's epoch and the primary's lease,
//! and so breaks the tie between two nodes that cannot see each other.
//!
//! The idea is one durable register per cluster, `(epoch, holder)`, changed only by
//! compare-and-swap, plus a lease: the right of the holder to act as primary until the lease
//! runs out. A node becomes primary by [`QuorumStore::claim`]: "if the epoch is still `e` and
//! nobody else holds a live lease, the epoch is now `e + 1` and the lease is mine". Among
//! concurrent claims exactly one wins; the loser learns who won ([`QuorumError::EpochMoved`],
//! [`QuorumError::LeaseHeld`]). Epochs only grow, and every record and xid carries one, so a
//! resource can refuse the work of an older epoch.
//!
//! Two implementations sit behind the one trait:
//!
//! * [`witness`]: the built-in `concord witness`, a single process holding the register in a
//!   state file (synced before it answers) and the leases in memory; the default for a
//!   single host or two sites. [`witness::WitnessServer`] is the server,
//!   [`witness::WitnessClient`] the store a node uses.
//! * [`etcd`]: a real etcd over its v3 gRPC API (compiled with `protox` in the proto crate, no
//!   `protoc`), keys under `/concord/<cluster>/`, the lease an etcd lease; for deployments
//!   that already run etcd.
//!
//! # Time
//!
//! The caller counts a lease from the instant *before* it sent the claim or renew: it is
//! valid until `sent + ttl_ms - safety_margin` on the caller's monotonic clock. The store
//! counts from its receipt, which is later, so the caller's view never outlasts the store's.
//! Every call has a deadline (`call_timeout_ms`, default [`CALL_TIMEOUT_MS_DEFAULT`]); a call
//! that misses it is [`QuorumError::Unreachable`], which never means "lost": the caller keeps
//! counting down the lease it had.
//!
//! # Implementation caveats
//!
//! * There is no watch: callers poll [`QuorumStore::state`]. A watch would only shorten the
//!   time a standby takes to notice a released lease.
//! * etcd leases are whole seconds, and etcd grants no less than its own minimum (about 2 s
//!   with its default election timeout): the [`Grant`] says what was granted.

pub mod etcd;
pub mod witness;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The default deadline of one call to the quorum store, in milliseconds.
pub const CALL_TIMEOUT_MS_DEFAULT: u64 = 500;

/// A node that may hold the lease: its name (unique in the cluster) and the address it serves
/// on (its gRPC URL), so that others can say who the primary is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The node's name.
    pub node: String,
    /// Where the node serves, e.g. `http://127.0.0.1:7001`.
    pub address: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.node, self.address)
    }
}

/// A cluster's state in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterState {
    /// The cluster's epoch; 0 = never claimed.
    pub epoch: u64,
    /// The node that claimed `epoch` (kept after its lease ended); `None` before any claim.
    pub holder: Option<Holder>,
    /// `Some` while the holder's lease is live: what the store says is left of it.
    pub lease_remaining_ms: Option<u64>,
}

/// A lease granted by a claim or a renew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The epoch the lease is held at.
    pub epoch: u64,
    /// The lease the store granted, in milliseconds (etcd: whole seconds, at least its minimum).
    pub ttl_ms: u64,
}

/// Why a call to the quorum store did not do what was asked, sorted by what the caller does.
#[derive(thiserror::Error, Debug, Clone)]
pub enum QuorumError {
    /// The store did not answer within the deadline, or the connection failed. Transient, and
    /// never a sign that the lease was lost: keep counting down the lease you hold, and retry.
    #[error(
        "quorum store {store} unreachable: {detail} (transient: retry; a held lease stays valid until it runs out)"
    )]
    Unreachable {
        /// The store, as [`QuorumStore::describe`] says it.
        store: String,
        /// What failed.
        detail: String,
    },
    /// The stored epoch is not the one the call expected: another node claimed since. Re-read
    /// the state; a primary that sees this has lost its epoch and must stop committing.
    #[error("the cluster's epoch moved to {epoch} (holder: {}): re-read the state before acting", fmt_holder(.holder))]
    EpochMoved {
        /// The stored epoch.
        epoch: u64,
        /// Its holder.
        holder: Option<Holder>,
    },
    /// Another node's lease is live: wait for it to run out, or claim with the override when
    /// that node is known to be fenced.
    #[error(
        "the lease of epoch {epoch} is held by {holder} for {remaining_ms} ms more: wait for it to expire or fence that node first"
    )]
    LeaseHeld {
        /// The stored epoch.
        epoch: u64,
        /// The node holding the lease.
        holder: Holder,
        /// What is left of its lease, as the store counts.
        remaining_ms: u64,
    },
    /// The caller is not the holder at that epoch: it must not act as primary.
    #[error("not the holder of epoch {epoch} (holder: {}): stop acting as primary", fmt_holder(.holder))]
    NotHolder {
        /// The stored epoch.
        epoch: u64,
        /// The actual holder.
        holder: Option<Holder>,
    },
    /// The store answered something malformed, refused the credentials, or the configuration
    /// (or the call's arguments) is wrong: fix the configuration; retrying does not help.
    #[error("quorum store {store}: {detail}")]
    Protocol {
        /// The store, as [`QuorumStore::describe`] says it.
        store: String,
        /// What was wrong.
        detail: String,
    },
}

fn fmt_holder(holder: &Option<Holder>) -> String {
    holder
        .as_ref()
        .map_or_else(|| "none".to_owned(), Holder::to_string)
}

/// The store of a cluster's epoch and lease. See the module documentation.
#[async_trait::async_trait]
pub trait QuorumStore: Send + Sync + 'static {
    /// The store in one line, e.g. `witness http://127.0.0.1:7900 cluster c1`.
    fn describe(&self) -> String;
    /// The cluster's epoch, holder and live lease.
    async fn state(&self) -> Result<ClusterState, QuorumError>;
    /// Compare-and-swap. Succeeds only when the stored epoch == expected_epoch and (no live lease,
    /// or the live lease is `me`'s, or override_live_lease). Then epoch = new_epoch (must be
    /// > expected_epoch), holder = me, a fresh lease of ttl_ms. One winner among concurrent claims.
    async fn claim(
        &self,
        me: &Holder,
        expected_epoch: u64,
        new_epoch: u64,
        ttl_ms: u64,
        override_live_lease: bool,
    ) -> Result<Grant, QuorumError>;
    /// Renews (or re-takes after expiry) the lease: succeeds only when the stored epoch == epoch
    /// and the holder's node == me.node.
    async fn renew(&self, me: &Holder, epoch: u64, ttl_ms: u64) -> Result<Grant, QuorumError>;
    /// Ends the lease now (holder stays recorded, lease not live). No-op Ok when not the holder.
    async fn release(&self, me: &Holder, epoch: u64) -> Result<(), QuorumError>;
}

/// Which implementation a [`QuorumConfig`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuorumKind {
    /// The built-in `concord witness` (one endpoint).
    Witness,
    /// An etcd cluster (one or more client URLs).
    Etcd,
}

/// Where the quorum store is and how to talk to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumConfig {
    /// The implementation.
    pub kind: QuorumKind,
    /// Its URLs (`http://127.0.0.1:7900`): exactly one witness, or etcd's client URLs.
    pub endpoints: Vec<String>,
    /// The cluster's name: one store may hold several clusters.
    pub cluster: String,
    /// A bearer token sent with every call (the witness's `--token-file`; etcd's auth token).
    #[serde(default)]
    pub token: Option<String>,
    /// The deadline of one call, in milliseconds.
    #[serde(default = "call_timeout_ms_default")]
    pub call_timeout_ms: u64,
}

fn call_timeout_ms_default() -> u64 {
    CALL_TIMEOUT_MS_DEFAULT
}

impl QuorumConfig {
    /// The quorum store the `[failover]` table names (`quorum`, `quorum_endpoints`,
    /// `quorum_cluster`, `quorum_token`, `quorum_call_timeout_ms`).
    pub fn from_failover(table: &adapters::config::FailoverConfig) -> QuorumConfig {
        QuorumConfig {
            kind: match table.quorum {
                adapters::config::QuorumKind::Witness => QuorumKind::Witness,
                adapters::config::QuorumKind::Etcd => QuorumKind::Etcd,
            },
            endpoints: table.quorum_endpoints.clone(),
            cluster: table.quorum_cluster.clone(),
            token: table.quorum_token.as_ref().map(|t| t.expose().to_owned()),
            call_timeout_ms: table.quorum_call_timeout_ms,
        }
    }
}

impl Holder {
    /// This node as the `[failover]` table names it (`name`, `address`).
    pub fn from_failover(table: &adapters::config::FailoverConfig) -> Holder {
        Holder {
            node: table.name.clone(),
            address: table.address.clone(),
        }
    }
}

/// Opens the store `cfg` names. Connects lazily: an unreachable store is no error here, only
/// at the first call; a malformed configuration is [`QuorumError::Protocol`].
pub fn open(cfg: &QuorumConfig) -> Result<Arc<dyn QuorumStore>, QuorumError> {
    check_config(cfg)?;
    Ok(match cfg.kind {
        QuorumKind::Witness => Arc::new(witness::WitnessClient::new(cfg)?),
        QuorumKind::Etcd => Arc::new(etcd::EtcdStore::new(cfg)?),
    })
}

fn check_config(cfg: &QuorumConfig) -> Result<(), QuorumError> {
    let refuse = |detail: &str| QuorumError::Protocol {
        store: format!("{:?} {:?}", cfg.kind, cfg.endpoints),
        detail: detail.to_owned(),
    };
    if cfg.endpoints.is_empty() {
        return Err(refuse("no endpoint configured: set `endpoints`"));
    }
    if cfg.cluster.is_empty() || cfg.cluster.contains('/') {
        return Err(refuse(
            "`cluster` must be a non-empty name without `/`: set it to the cluster's name",
        ));
    }
    if cfg.call_timeout_ms == 0 {
        return Err(refuse("`call_timeout_ms` must be above 0"));
    }
    if cfg.kind == QuorumKind::Witness && cfg.endpoints.len() != 1 {
        return Err(refuse("a witness has exactly one endpoint"));
    }
    Ok(())
}

/// Checks a claim's arguments the same way in every implementation: the new epoch must grow
/// and the ttl be positive.
fn check_claim(
    store: &str,
    expected_epoch: u64,
    new_epoch: u64,
    ttl_ms: u64,
) -> Result<(), QuorumError> {
    if new_epoch <= expected_epoch {
        return Err(QuorumError::Protocol {
            store: store.to_owned(),
            detail: format!(
                "a claim must raise the epoch: new epoch {new_epoch} is not above {expected_epoch}"
            ),
        });
    }
    check_ttl(store, ttl_ms)
}

fn check_ttl(store: &str, ttl_ms: u64) -> Result<(), QuorumError> {
    if ttl_ms == 0 {
        return Err(QuorumError::Protocol {
            store: store.to_owned(),
            detail: "a lease of 0 ms was asked for: configure a positive ttl".to_owned(),
        });
    }
    Ok(())
}

/// Runs `call` with the deadline `timeout_ms`; a missed deadline is
/// [`QuorumError::Unreachable`].
async fn with_deadline<T>(
    store: &str,
    timeout_ms: u64,
    call: impl std::future::Future<Output = Result<T, QuorumError>>,
) -> Result<T, QuorumError> {
    match tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), call).await {
        Ok(result) => result,
        Err(_) => Err(QuorumError::Unreachable {
            store: store.to_owned(),
            detail: format!("no answer within {timeout_ms} ms"),
        }),
    }
}

/// A gRPC status from a store as a [`QuorumError`]: the transport's and the server's
/// transient failures are `Unreachable`, a refused token or a refused request `Protocol`.
fn status_error(store: &str, status: &tonic::Status) -> QuorumError {
    use tonic::Code;
    let detail = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Internal => QuorumError::Unreachable {
            store: store.to_owned(),
            detail,
        },
        Code::Unauthenticated | Code::PermissionDenied => QuorumError::Protocol {
            store: store.to_owned(),
            detail: format!("{detail} (check the configured token)"),
        },
        _ => QuorumError::Protocol {
            store: store.to_owned(),
            detail,
        },
    }
}

/// A tonic channel to `endpoints` that connects lazily, with a connect timeout of
/// `timeout_ms`.
fn lazy_channel(
    store: &str,
    endpoints: &[String],
    timeout_ms: u64,
) -> Result<tonic::transport::Channel, QuorumError> {
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let mut list = Vec::with_capacity(endpoints.len());
    for url in endpoints {
        let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| QuorumError::Protocol {
                store: store.to_owned(),
                detail: format!(
                    "endpoint {url:?} is not a URL ({e}): write it as http://HOST:PORT"
                ),
            })?
            .connect_timeout(timeout)
            .timeout(timeout);
        list.push(endpoint);
    }
    match list.len() {
        1 => Ok(list.remove(0).connect_lazy()),
        _ => Ok(tonic::transport::Channel::balance_list(list.into_iter())),
    }
}
