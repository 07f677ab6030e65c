//! The built-in witness: a small durable epoch register with leases, one per cluster name,
//! served over gRPC (`concord.v1.Witness`) by `concord witness`.
//!
//! The idea: the only thing that must survive a crash is the register `(epoch, holder)`; the
//! lease is a promise in time and can live in memory, as long as a restart never shortens a
//! promise already made. So:
//!
//! * [`WitnessCore`] holds every cluster's register in one state file
//!   (`DATA/witness-state.json`) and the live leases in memory. Every change of a register is
//!   written to a temporary file, synced, renamed over the state file, and the directory
//!   synced, *before* the call is answered. A call whose write fails changes nothing and is
//!   answered UNAVAILABLE (the caller sees [`QuorumError::Unreachable`]).
//! * Time is an input: every operation takes the instant it runs at, so the core is tested
//!   without sleeps. A lease runs from the witness's receipt of the call.
//! * **The restart rule.** At open, every recorded holder whose lease was not released counts
//!   as live for the largest ttl granted at its epoch, from the restart. The old lease was at
//!   most that long and started before the restart, so no holder is ever told less than it was
//!   promised, and no other node can claim while the holder may still believe it is primary.
//! * Calls are serialized by one mutex (the state-file write included), so among concurrent
//!   claims of the same epoch exactly one wins; the others see [`QuorumError::EpochMoved`].
//! * [`WitnessServer`] serves the core, refusing a call without the configured bearer token
//!   with UNAUTHENTICATED; [`WitnessClient`] is the [`QuorumStore`] a node uses.
//!
//! A malformed state file (not JSON, a newer version, a register without a holder) is a
//! [`WitnessError::Malformed`] naming the file: the witness refuses to start rather than
//! guess an epoch, since a lower epoch could let two nodes act as primary.
//!
//! # Implementation caveats
//!
//! * The witness is one process: while it is down nobody can claim or renew. That is the
//!   point of a tie-breaker; a primary keeps its lease until it runs out.
//! * Nothing stops two witnesses from being started on one data directory; the operator must
//!   not (each would hold its own copy of the register).
//! * The whole state file is rewritten on each change: fine for the handful of clusters a
//!   witness serves, bounded by [`CLUSTERS_MAX`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::{ClusterState, Grant, Holder, QuorumConfig, QuorumError, QuorumStore};

/// The state file's name in the witness's data directory.
pub const STATE_FILE: &str = "witness-state.json";
/// The temporary file a new state is written to before it is renamed over [`STATE_FILE`].
const STATE_TEMP_FILE: &str = "witness-state.json.tmp";
/// The version of the state file this code writes and reads.
const STATE_VERSION: u32 = 1;
/// The largest state file read, in bytes.
pub const STATE_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The most clusters one witness holds.
pub const CLUSTERS_MAX: usize = 10_000;
/// The longest lease granted, in milliseconds (one hour).
pub const LEASE_TTL_MS_MAX: u64 = 3_600_000;
/// The longest cluster or node name, and address, in bytes.
pub const NAME_BYTES_MAX: usize = 1024;

/// Why the witness could not open or keep its state.
#[derive(thiserror::Error, Debug)]
pub enum WitnessError {
    /// The state file is not one this witness wrote. Restore it from a backup, or, if the
    /// cluster can be re-created, move it away; never edit the epoch down.
    #[error("witness state file {} is malformed: {detail}; restore it or move it away (never lower an epoch)", path.display())]
    Malformed {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A read, write or sync of the data directory failed: check the disk and permissions.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`write witness state`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed (its listener, its transport).
    #[error("serve concord.v1.Witness: {0}")]
    Serve(String),
}

/// One cluster's register as the state file holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    epoch: u64,
    holder: Holder,
    /// The largest ttl granted at this epoch, in milliseconds: the restart rule's lease.
    ttl_ms: u64,
    /// The holder released its lease (nothing to honour after a restart).
    released: bool,
}

/// The state file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    clusters: BTreeMap<String, Register>,
}

/// A live lease, in memory.
#[derive(Clone, Debug)]
struct Lease {
    node: String,
    expires: Instant,
}

/// The answer of one operation on the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done; a claim or renew carries the lease granted, in milliseconds.
    Ok {
        /// The lease granted (0 for state and release).
        granted_ttl_ms: u64,
    },
    /// The stored epoch is not the one expected.
    EpochMoved,
    /// Another node's lease is live.
    LeaseHeld,
    /// The caller is not the holder at that epoch.
    NotHolder,
    /// The request is malformed.
    Invalid(String),
}

/// Every cluster's register (durable) and live lease (in memory). Time is an argument of each
/// operation. See the module documentation.
#[derive(Debug)]
pub struct WitnessCore {
    dir: PathBuf,
    state: StateFile,
    leases: HashMap<String, Lease>,
}

impl WitnessCore {
    /// Opens the witness's state in `dir` (created when missing), applying the restart rule at
    /// `now`.
    pub fn open(dir: &Path, now: Instant) -> Result<Self, WitnessError> {
        std::fs::create_dir_all(dir).map_err(|source| WitnessError::Io {
            action: "create witness data directory",
            path: dir.to_owned(),
            source,
        })?;
        remove_stale_temp(dir)?;
        let state = read_state(&dir.join(STATE_FILE))?;
        let leases = restart_leases(&state, now);
        Ok(Self {
            dir: dir.to_owned(),
            state,
            leases,
        })
    }

    /// The path of the state file.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The state of `cluster` at `now`.
    pub fn state(&self, cluster: &str, now: Instant) -> ClusterState {
        let register = self.state.clusters.get(cluster);
        ClusterState {
            epoch: register.map_or(0, |r| r.epoch),
            holder: register.map(|r| r.holder.clone()),
            lease_remaining_ms: self.live_lease(cluster, now).map(|(_, ms)| ms),
        }
    }

    /// The compare-and-swap of [`QuorumStore::claim`], at `now`.
    #[allow(clippy::too_many_arguments)]
    pub fn claim(
        &mut self,
        cluster: &str,
        me: &Holder,
        expected_epoch: u64,
        new_epoch: u64,
        ttl_ms: u64,
        override_live_lease: bool,
        now: Instant,
    ) -> Result<Answer, WitnessError> {
        if let Some(bad) = invalid_claim(cluster, me, expected_epoch, new_epoch, ttl_ms) {
            return Ok(Answer::Invalid(bad));
        }
        let current = self.state.clusters.get(cluster);
        if current.map_or(0, |r| r.epoch) != expected_epoch {
            return Ok(Answer::EpochMoved);
        }
        if current.is_none() && self.state.clusters.len() >= CLUSTERS_MAX {
            return Ok(Answer::Invalid(format!(
                "this witness already holds {CLUSTERS_MAX} clusters"
            )));
        }
        let other_live = self
            .live_lease(cluster, now)
            .is_some_and(|(node, _)| node != me.node);
        if other_live && !override_live_lease {
            return Ok(Answer::LeaseHeld);
        }
        let register = Register {
            epoch: new_epoch,
            holder: me.clone(),
            ttl_ms,
            released: false,
        };
        self.store(cluster, register)?;
        self.grant(cluster, &me.node, ttl_ms, now);
        Ok(Answer::Ok {
            granted_ttl_ms: ttl_ms,
        })
    }

    /// [`QuorumStore::renew`], at `now`.
    pub fn renew(
        &mut self,
        cluster: &str,
        me: &Holder,
        epoch: u64,
        ttl_ms: u64,
        now: Instant,
    ) -> Result<Answer, WitnessError> {
        if let Some(bad) = invalid_names(cluster, me).or_else(|| invalid_ttl(ttl_ms)) {
            return Ok(Answer::Invalid(bad));
        }
        let Some(current) = self.state.clusters.get(cluster) else {
            return Ok(if epoch == 0 {
                Answer::NotHolder
            } else {
                Answer::EpochMoved
            });
        };
        if current.epoch != epoch {
            return Ok(Answer::EpochMoved);
        }
        if current.holder.node != me.node {
            return Ok(Answer::NotHolder);
        }
        let renewed = Register {
            epoch,
            holder: me.clone(),
            ttl_ms: current.ttl_ms.max(ttl_ms),
            released: false,
        };
        if &renewed != current {
            self.store(cluster, renewed)?;
        }
        self.grant(cluster, &me.node, ttl_ms, now);
        Ok(Answer::Ok {
            granted_ttl_ms: ttl_ms,
        })
    }

    /// [`QuorumStore::release`]: ends the holder's lease (durably, so a restart does not
    /// bring it back); nothing when `me` is not the holder at `epoch`.
    pub fn release(
        &mut self,
        cluster: &str,
        me: &Holder,
        epoch: u64,
    ) -> Result<Answer, WitnessError> {
        if let Some(bad) = invalid_names(cluster, me) {
            return Ok(Answer::Invalid(bad));
        }
        let Some(current) = self.state.clusters.get(cluster) else {
            return Ok(Answer::Ok { granted_ttl_ms: 0 });
        };
        if current.epoch != epoch || current.holder.node != me.node {
            return Ok(Answer::Ok { granted_ttl_ms: 0 });
        }
        if !current.released {
            let released = Register {
                released: true,
                ..current.clone()
            };
            self.store(cluster, released)?;
        }
        self.leases.remove(cluster);
        Ok(Answer::Ok { granted_ttl_ms: 0 })
    }

    /// The live lease of `cluster` at `now`: its node and remaining milliseconds.
    fn live_lease(&self, cluster: &str, now: Instant) -> Option<(&str, u64)> {
        let lease = self.leases.get(cluster)?;
        let remaining = lease.expires.checked_duration_since(now)?;
        let ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
        (ms > 0).then_some((lease.node.as_str(), ms))
    }

    fn grant(&mut self, cluster: &str, node: &str, ttl_ms: u64, now: Instant) {
        let lease = Lease {
            node: node.to_owned(),
            expires: now + std::time::Duration::from_millis(ttl_ms),
        };
        self.leases.insert(cluster.to_owned(), lease);
    }

    /// Makes `register` durable for `cluster`, then (only then) the one in memory.
    fn store(&mut self, cluster: &str, register: Register) -> Result<(), WitnessError> {
        let mut clusters = self.state.clusters.clone();
        clusters.insert(cluster.to_owned(), register);
        let next = StateFile {
            version: STATE_VERSION,
            clusters,
        };
        write_state(&self.dir, &next)?;
        self.state = next;
        Ok(())
    }
}

fn invalid_claim(
    cluster: &str,
    me: &Holder,
    expected_epoch: u64,
    new_epoch: u64,
    ttl_ms: u64,
) -> Option<String> {
    if new_epoch <= expected_epoch {
        return Some(format!(
            "new_epoch {new_epoch} is not above expected_epoch {expected_epoch}"
        ));
    }
    invalid_names(cluster, me).or_else(|| invalid_ttl(ttl_ms))
}

fn invalid_names(cluster: &str, me: &Holder) -> Option<String> {
    let fields = [
        ("cluster", cluster),
        ("me.node", me.node.as_str()),
        ("me.address", me.address.as_str()),
    ];
    fields.iter().find_map(|(field, value)| {
        if value.is_empty() && *field != "me.address" {
            Some(format!("{field} is empty"))
        } else if value.len() > NAME_BYTES_MAX {
            Some(format!("{field} is longer than {NAME_BYTES_MAX} bytes"))
        } else {
            None
        }
    })
}

fn invalid_ttl(ttl_ms: u64) -> Option<String> {
    if ttl_ms == 0 || ttl_ms > LEASE_TTL_MS_MAX {
        return Some(format!(
            "ttl_ms {ttl_ms} is not within 1..={LEASE_TTL_MS_MAX}"
        ));
    }
    None
}

/// The restart rule: every unreleased holder's lease is live for its ttl from `now`.
fn restart_leases(state: &StateFile, now: Instant) -> HashMap<String, Lease> {
    let live = state.clusters.iter().filter(|(_, r)| !r.released);
    live.map(|(cluster, r)| {
        let lease = Lease {
            node: r.holder.node.clone(),
            expires: now + std::time::Duration::from_millis(r.ttl_ms),
        };
        (cluster.clone(), lease)
    })
    .collect()
}

/// A temporary file left by a crash between its write and its rename holds a state that was
/// never answered: it is removed.
fn remove_stale_temp(dir: &Path) -> Result<(), WitnessError> {
    let temp = dir.join(STATE_TEMP_FILE);
    match std::fs::remove_file(&temp) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(WitnessError::Io {
            action: "remove stale witness state",
            path: temp,
            source,
        }),
    }
}

/// Reads and checks the state file; a missing file is the empty state.
fn read_state(path: &Path) -> Result<StateFile, WitnessError> {
    let io = |source| WitnessError::Io {
        action: "read witness state",
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(StateFile {
                version: STATE_VERSION,
                clusters: BTreeMap::new(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let bytes = file.metadata().map_err(io)?.len();
    let malformed = |detail: String| WitnessError::Malformed {
        path: path.to_owned(),
        detail,
    };
    if bytes > STATE_FILE_BYTES_MAX {
        return Err(malformed(format!(
            "{bytes} bytes, above the limit of {STATE_FILE_BYTES_MAX}"
        )));
    }
    let text = std::fs::read(path).map_err(io)?;
    let state: StateFile = serde_json::from_slice(&text).map_err(|e| malformed(e.to_string()))?;
    check_state(&state).map_err(malformed)?;
    Ok(state)
}

fn check_state(state: &StateFile) -> Result<(), String> {
    if state.version != STATE_VERSION {
        return Err(format!(
            "version {} (this witness reads version {STATE_VERSION})",
            state.version
        ));
    }
    if state.clusters.len() > CLUSTERS_MAX {
        return Err(format!("more than {CLUSTERS_MAX} clusters"));
    }
    for (cluster, r) in &state.clusters {
        if r.epoch == 0
            || invalid_names(cluster, &r.holder).is_some()
            || invalid_ttl(r.ttl_ms).is_some()
        {
            return Err(format!(
                "cluster {cluster:?}: epoch, holder or ttl_ms out of range"
            ));
        }
    }
    Ok(())
}

/// Writes `state` durably: temporary file, sync, rename over the state file, directory sync.
fn write_state(dir: &Path, state: &StateFile) -> Result<(), WitnessError> {
    let temp = dir.join(STATE_TEMP_FILE);
    let path = dir.join(STATE_FILE);
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| WitnessError::Io {
            action,
            path,
            source,
        }
    };
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| WitnessError::Io {
        action: "encode witness state",
        path: temp.clone(),
        source: std::io::Error::other(e),
    })?;
    let mut file = std::fs::File::create(&temp).map_err(io("create witness state", &temp))?;
    file.write_all(&bytes)
        .map_err(io("write witness state", &temp))?;
    file.sync_all().map_err(io("sync witness state", &temp))?;
    drop(file);
    std::fs::rename(&temp, &path).map_err(io("rename witness state", &path))?;
    let dir_file = std::fs::File::open(dir).map_err(io("open witness data directory", dir))?;
    dir_file
        .sync_all()
        .map_err(io("sync witness data directory", dir))
}

// ---------------------------------------------------------------------------------------------
// The gRPC service.

/// The witness server: the core behind `concord.v1.Witness`, with an optional bearer token.
#[derive(Clone)]
pub struct WitnessServer {
    core: Arc<Mutex<WitnessCore>>,
    state_path: PathBuf,
    token: Option<blake3::Hash>,
}

impl std::fmt::Debug for WitnessServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessServer")
            .field("state_path", &self.state_path)
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// The generated service with the bearer-token check in front of it.
pub type WitnessService = tonic::service::interceptor::InterceptedService<
    pb::witness_server::WitnessServer<WitnessServer>,
    BearerCheck,
>;

impl WitnessServer {
    /// Opens the witness's state in `data_dir` (the restart rule applies from now). With a
    /// `token`, every call must carry `authorization: Bearer <token>`.
    pub fn open(data_dir: &Path, token: Option<String>) -> Result<Self, WitnessError> {
        let core = WitnessCore::open(data_dir, Instant::now())?;
        Ok(Self {
            state_path: core.state_path(),
            core: Arc::new(Mutex::new(core)),
            token: token.map(|t| blake3::hash(t.as_bytes())),
        })
    }

    /// The state file this witness keeps.
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// The `concord.v1.Witness` service, for a tonic server.
    pub fn service(&self) -> WitnessService {
        let check = BearerCheck {
            expected: self.token,
        };
        pb::witness_server::WitnessServer::with_interceptor(self.clone(), check)
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), WitnessError> {
        tonic::transport::Server::builder()
            .add_service(self.service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown,
            )
            .await
            .map_err(|e| WitnessError::Serve(e.to_string()))
    }

    /// Runs `op` on the core on a blocking thread (it may sync the disk), at the instant it
    /// gets the lock.
    async fn run(
        &self,
        cluster: String,
        op: impl FnOnce(&mut WitnessCore, Instant) -> Result<Answer, WitnessError> + Send + 'static,
    ) -> Result<tonic::Response<pb::WitnessAnswer>, tonic::Status> {
        let core = Arc::clone(&self.core);
        let done = tokio::task::spawn_blocking(move || {
            let mut core = core
                .lock()
                .map_err(|_| tonic::Status::internal("witness state lock poisoned"))?;
            let now = Instant::now();
            let answer = op(&mut core, now).map_err(|e| {
                tracing::error!("{e}");
                tonic::Status::unavailable(e.to_string())
            })?;
            Ok::<_, tonic::Status>(answer_message(&answer, core.state(&cluster, now)))
        })
        .await
        .map_err(|e| tonic::Status::internal(format!("witness call failed: {e}")))??;
        Ok(tonic::Response::new(done))
    }
}

/// Refuses a call without the expected bearer token (UNAUTHENTICATED).
#[derive(Clone, Debug)]
pub struct BearerCheck {
    expected: Option<blake3::Hash>,
}

impl tonic::service::Interceptor for BearerCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(expected) = self.expected else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // blake3::Hash compares in constant time.
        match presented {
            Some(token) if blake3::hash(token.as_bytes()) == expected => Ok(request),
            _ => Err(tonic::Status::unauthenticated(
                "this witness needs a bearer token: send `authorization: Bearer <token>` (the witness's --token-file)",
            )),
        }
    }
}

#[tonic::async_trait]
impl pb::witness_server::Witness for WitnessServer {
    async fn state(
        &self,
        request: tonic::Request<pb::WitnessStateRequest>,
    ) -> Result<tonic::Response<pb::WitnessAnswer>, tonic::Status> {
        let cluster = request.into_inner().cluster;
        self.run(cluster, |_, _| Ok(Answer::Ok { granted_ttl_ms: 0 }))
            .await
    }

    async fn claim(
        &self,
        request: tonic::Request<pb::WitnessClaimRequest>,
    ) -> Result<tonic::Response<pb::WitnessAnswer>, tonic::Status> {
        let r = request.into_inner();
        let me = holder_from(r.me);
        let cluster = r.cluster.clone();
        self.run(cluster, move |core, now| {
            let (expected, new, ttl, over) = (
                r.expected_epoch,
                r.new_epoch,
                r.ttl_ms,
                r.override_live_lease,
            );
            core.claim(&r.cluster, &me, expected, new, ttl, over, now)
        })
        .await
    }

    async fn renew(
        &self,
        request: tonic::Request<pb::WitnessRenewRequest>,
    ) -> Result<tonic::Response<pb::WitnessAnswer>, tonic::Status> {
        let r = request.into_inner();
        let me = holder_from(r.me);
        let cluster = r.cluster.clone();
        self.run(cluster, move |core, now| {
            core.renew(&r.cluster, &me, r.epoch, r.ttl_ms, now)
        })
        .await
    }

    async fn release(
        &self,
        request: tonic::Request<pb::WitnessReleaseRequest>,
    ) -> Result<tonic::Response<pb::WitnessAnswer>, tonic::Status> {
        let r = request.into_inner();
        let me = holder_from(r.me);
        let cluster = r.cluster.clone();
        self.run(cluster, move |core, _| {
            core.release(&r.cluster, &me, r.epoch)
        })
        .await
    }
}

/// A missing holder is an empty one, which the core refuses as invalid.
fn holder_from(holder: Option<pb::WitnessHolder>) -> Holder {
    let holder = holder.unwrap_or_default();
    Holder {
        node: holder.node,
        address: holder.address,
    }
}

fn answer_message(answer: &Answer, state: ClusterState) -> pb::WitnessAnswer {
    let (outcome, granted_ttl_ms, detail) = match answer {
        Answer::Ok { granted_ttl_ms } => (pb::WitnessOutcome::Ok, *granted_ttl_ms, String::new()),
        Answer::EpochMoved => (pb::WitnessOutcome::EpochMoved, 0, String::new()),
        Answer::LeaseHeld => (pb::WitnessOutcome::LeaseHeld, 0, String::new()),
        Answer::NotHolder => (pb::WitnessOutcome::NotHolder, 0, String::new()),
        Answer::Invalid(detail) => (pb::WitnessOutcome::Invalid, 0, detail.clone()),
    };
    pb::WitnessAnswer {
        outcome: outcome as i32,
        state: Some(pb::WitnessClusterState {
            epoch: state.epoch,
            holder: state.holder.map(|h| pb::WitnessHolder {
                node: h.node,
                address: h.address,
            }),
            lease_remaining_ms: state.lease_remaining_ms,
        }),
        granted_ttl_ms,
        detail,
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

/// The [`QuorumStore`] of a node whose quorum store is a witness. Connects lazily (create it
/// inside a tokio runtime).
#[derive(Debug, Clone)]
pub struct WitnessClient {
    describe: String,
    cluster: String,
    timeout_ms: u64,
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
    channel: tonic::transport::Channel,
}

impl WitnessClient {
    /// A client of the witness `cfg` names (its one endpoint).
    pub fn new(cfg: &QuorumConfig) -> Result<Self, QuorumError> {
        let endpoint = cfg.endpoints.first().cloned().unwrap_or_default();
        let describe = format!("witness {endpoint} cluster {}", cfg.cluster);
        let authorization = match &cfg.token {
            None => None,
            Some(token) => {
                Some(
                    format!("Bearer {token}")
                        .parse()
                        .map_err(|_| QuorumError::Protocol {
                            store: describe.clone(),
                            detail: "the token is not printable ASCII: check the token file"
                                .to_owned(),
                        })?,
                )
            }
        };
        let channel = super::lazy_channel(&describe, &cfg.endpoints, cfg.call_timeout_ms)?;
        Ok(Self {
            describe,
            cluster: cfg.cluster.clone(),
            timeout_ms: cfg.call_timeout_ms,
            authorization,
            channel,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    fn rpc(&self) -> pb::witness_client::WitnessClient<tonic::transport::Channel> {
        pb::witness_client::WitnessClient::new(self.channel.clone())
    }

    fn me(me: &Holder) -> Option<pb::WitnessHolder> {
        Some(pb::WitnessHolder {
            node: me.node.clone(),
            address: me.address.clone(),
        })
    }

    /// Runs one call with the deadline and reads its answer.
    async fn call<F>(
        &self,
        call: F,
    ) -> Result<(pb::WitnessOutcome, ClusterState, pb::WitnessAnswer), QuorumError>
    where
        F: std::future::Future<Output = Result<tonic::Response<pb::WitnessAnswer>, tonic::Status>>,
    {
        let answer = super::with_deadline(&self.describe, self.timeout_ms, async {
            call.await
                .map(tonic::Response::into_inner)
                .map_err(|s| super::status_error(&self.describe, &s))
        })
        .await?;
        let outcome = pb::WitnessOutcome::try_from(answer.outcome)
            .ok()
            .filter(|o| *o != pb::WitnessOutcome::Unspecified)
            .ok_or_else(|| self.malformed(format!("unknown outcome {}", answer.outcome)))?;
        let state = self.state_from(answer.state.clone())?;
        Ok((outcome, state, answer))
    }

    fn malformed(&self, detail: String) -> QuorumError {
        QuorumError::Protocol {
            store: self.describe.clone(),
            detail: format!("malformed answer: {detail}"),
        }
    }

    fn state_from(
        &self,
        state: Option<pb::WitnessClusterState>,
    ) -> Result<ClusterState, QuorumError> {
        let state = state.ok_or_else(|| self.malformed("no state".to_owned()))?;
        let holder = state.holder.map(|h| Holder {
            node: h.node,
            address: h.address,
        });
        if holder.as_ref().is_some_and(|h| h.node.is_empty()) {
            return Err(self.malformed("a holder without a node name".to_owned()));
        }
        Ok(ClusterState {
            epoch: state.epoch,
            holder,
            lease_remaining_ms: state.lease_remaining_ms,
        })
    }

    /// A refusal as its [`QuorumError`].
    fn refusal(
        &self,
        outcome: pb::WitnessOutcome,
        state: ClusterState,
        detail: String,
    ) -> QuorumError {
        match outcome {
            pb::WitnessOutcome::EpochMoved => QuorumError::EpochMoved {
                epoch: state.epoch,
                holder: state.holder,
            },
            pb::WitnessOutcome::NotHolder => QuorumError::NotHolder {
                epoch: state.epoch,
                holder: state.holder,
            },
            pb::WitnessOutcome::LeaseHeld => match (state.holder, state.lease_remaining_ms) {
                (Some(holder), Some(remaining_ms)) => QuorumError::LeaseHeld {
                    epoch: state.epoch,
                    holder,
                    remaining_ms,
                },
                _ => self.malformed("lease held without a holder or its remaining time".to_owned()),
            },
            pb::WitnessOutcome::Invalid => QuorumError::Protocol {
                store: self.describe.clone(),
                detail: format!("the witness refused the request: {detail}"),
            },
            pb::WitnessOutcome::Ok | pb::WitnessOutcome::Unspecified => {
                self.malformed("refusal expected".to_owned())
            }
        }
    }

    /// The grant of an OK answer, or the refusal.
    fn grant(
        &self,
        (outcome, state, answer): (pb::WitnessOutcome, ClusterState, pb::WitnessAnswer),
    ) -> Result<Grant, QuorumError> {
        if outcome != pb::WitnessOutcome::Ok {
            return Err(self.refusal(outcome, state, answer.detail));
        }
        if answer.granted_ttl_ms == 0 {
            return Err(self.malformed("a grant of 0 ms".to_owned()));
        }
        Ok(Grant {
            epoch: state.epoch,
            ttl_ms: answer.granted_ttl_ms,
        })
    }
}

#[async_trait::async_trait]
impl QuorumStore for WitnessClient {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn state(&self) -> Result<ClusterState, QuorumError> {
        let message = pb::WitnessStateRequest {
            cluster: self.cluster.clone(),
        };
        let mut rpc = self.rpc();
        let (outcome, state, answer) = self.call(rpc.state(self.request(message))).await?;
        match outcome {
            pb::WitnessOutcome::Ok => Ok(state),
            _ => Err(self.refusal(outcome, state, answer.detail)),
        }
    }

    async fn claim(
        &self,
        me: &Holder,
        expected_epoch: u64,
        new_epoch: u64,
        ttl_ms: u64,
        override_live_lease: bool,
    ) -> Result<Grant, QuorumError> {
        super::check_claim(&self.describe, expected_epoch, new_epoch, ttl_ms)?;
        let message = pb::WitnessClaimRequest {
            cluster: self.cluster.clone(),
            me: Self::me(me),
            expected_epoch,
            new_epoch,
            ttl_ms,
            override_live_lease,
        };
        let mut rpc = self.rpc();
        self.grant(self.call(rpc.claim(self.request(message))).await?)
    }

    async fn renew(&self, me: &Holder, epoch: u64, ttl_ms: u64) -> Result<Grant, QuorumError> {
        super::check_ttl(&self.describe, ttl_ms)?;
        let message = pb::WitnessRenewRequest {
            cluster: self.cluster.clone(),
            me: Self::me(me),
            epoch,
            ttl_ms,
        };
        let mut rpc = self.rpc();
        self.grant(self.call(rpc.renew(self.request(message))).await?)
    }

    async fn release(&self, me: &Holder, epoch: u64) -> Result<(), QuorumError> {
        let message = pb::WitnessReleaseRequest {
            cluster: self.cluster.clone(),
            me: Self::me(me),
            epoch,
        };
        let mut rpc = self.rpc();
        let (outcome, state, answer) = self.call(rpc.release(self.request(message))).await?;
        match outcome {
            pb::WitnessOutcome::Ok => Ok(()),
            _ => Err(self.refusal(outcome, state, answer.detail)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn holder(node: &str) -> Holder {
        Holder {
            node: node.to_owned(),
            address: format!("http://{node}"),
        }
    }

    #[test]
    fn a_lease_runs_out_on_the_witness_clock_and_a_restart_honours_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let t0 = Instant::now();
        let mut core = WitnessCore::open(dir.path(), t0).expect("open");
        let a = holder("a");
        let b = holder("b");
        let ok = core.claim("c", &a, 0, 1, 1_000, false, t0).expect("claim");
        assert_eq!(
            ok,
            Answer::Ok {
                granted_ttl_ms: 1_000
            }
        );
        let held = core.claim("c", &b, 1, 2, 1_000, false, t0 + Duration::from_millis(999));
        assert_eq!(held.expect("answer"), Answer::LeaseHeld);
        let t1 = t0 + Duration::from_millis(1_000);
        assert_eq!(core.state("c", t1).lease_remaining_ms, None);
        drop(core);
        // After a restart the holder's lease is live again for its whole ttl.
        let t2 = t1 + Duration::from_secs(60);
        let mut core = WitnessCore::open(dir.path(), t2).expect("reopen");
        let state = core.state("c", t2);
        assert_eq!((state.epoch, state.holder), (1, Some(a.clone())));
        assert_eq!(state.lease_remaining_ms, Some(1_000));
        let held = core.claim("c", &b, 1, 2, 1_000, false, t2 + Duration::from_millis(999));
        assert_eq!(held.expect("answer"), Answer::LeaseHeld);
        let won = core.claim("c", &b, 1, 2, 500, false, t2 + Duration::from_millis(1_000));
        assert_eq!(
            won.expect("answer"),
            Answer::Ok {
                granted_ttl_ms: 500
            }
        );
    }

    #[test]
    fn a_released_lease_stays_released_after_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let t0 = Instant::now();
        let mut core = WitnessCore::open(dir.path(), t0).expect("open");
        let a = holder("a");
        core.claim("c", &a, 0, 1, 60_000, false, t0).expect("claim");
        core.release("c", &a, 1).expect("release");
        drop(core);
        let core = WitnessCore::open(dir.path(), t0).expect("reopen");
        assert_eq!(core.state("c", t0).lease_remaining_ms, None);
    }

    #[test]
    fn a_stale_temporary_file_is_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(STATE_TEMP_FILE), b"garbage").expect("write");
        let core = WitnessCore::open(dir.path(), Instant::now()).expect("open");
        assert_eq!(core.state("c", Instant::now()).epoch, 0);
        assert!(!dir.path().join(STATE_TEMP_FILE).exists());
    }
}
