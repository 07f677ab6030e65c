//! The `concord.v1.Coordinator` service over an embedded [`Concord`]: each remote transaction
//! is a participant [`Transaction`] held in memory by xid, with the branch handles it joined.
//!
//! Every request goes through `proto`'s checks first (header, xid, required fields). The first
//! commit or rollback of a transaction is remembered for [`FINISHED_KEEP_MS`], so a second
//! commit answers the same outcome and work after commit is refused as finished; an `Outcome`
//! for an xid no longer in memory reads the journal's ledger. A transaction a client abandons
//! stays open in the coordinator, whose reaper rolls it back at `txn_timeout_ms`.
//!
//! # PostgreSQL branches, operator calls, timeouts
//!
//! An application's PostgreSQL branch runs in the application, on its own connection, and is
//! prepared there; `EnlistPrepared` checks the xid is open, the resource is a postgres one of
//! the configuration, the gid is `concord:<xid>:<resource>` and the redo is the JSON array
//! `concord.prepare_branch` returned, then has the resource adopt the prepared branch
//! (`PostgresResource::adopt_prepared`: the gid must be in `pg_prepared_xacts`) and joins it
//! (`Coordinator::join_prepared`): from there the coordinator finishes it by gid. Enlisting
//! after the transaction timed out rolls the branch back at once; enlisting after commit or
//! rollback began is refused, and a branch the transaction never had is rolled back then.
//! `Resolve` is the coordinator's `resolve` (what `concord txn resolve` does). `ListInDoubt`
//! lists what the coordinator holds in memory past `Begin` (committing, rolling back, in
//! doubt) and, as `concord txn list` does, the prepared branches of every resource that no
//! transaction here holds, with what the journal says of them. `BeginRequest.timeout_ms` is
//! the transaction's own timeout, capped at `txn_timeout_ms`.
//!
//! # Caveats
//!
//! * `FilesRead` reads the whole file through the branch (the participant has no streamed
//!   read yet) and sends it in chunks; a file the branch does not find is told apart by the
//!   resource's refusal text.
//! * `ListInDoubt` reads the whole retained journal on each call, and leaves out (with a
//!   warning in the daemon's output) the resources that cannot list their prepared branches.
//! * A late enlisting of an xid this daemon no longer holds in memory (past
//!   `FINISHED_KEEP_MS`) is answered `UNKNOWN_XID`, and its branch is left to the orphan
//!   sweeper.
//! * The open transactions per client are counted by the client's name (its token), and by
//!   peer IP address for calls without a token (`unauthenticated = true`).
//! * A call on a transaction waits for its commit or rollback in flight (`Outcome` included):
//!   it answers the outcome once there is one, within the call's deadline.
//! * `Status` probes every resource when asked (`Resource::health`, each within
//!   [`HEALTH_PROBE_MS_MAX`]); nothing caches the answers, so a status poller costs each
//!   resource one cheap probe per call. Its `open_txns` and `in_doubt_txns` are the
//!   coordinator's counts (`Coordinator::counts`), which include the daemon's transactions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adapters::Xid;
use adapters::config::DaemonLimits;
use adapters::postgres::PostgresResource;
use coordinator::ledger::Verdict;
use coordinator::{CoordError, Outcome};
use participant::{
    Concord, ConcordError, Config, FilesHandle, KvHandle, MailHandle, RollbackCause, Transaction,
};
use proto::convert::{BranchTarget, HeaderOnly, StreamPart, XidOutcome, XidState, xid_text};
use proto::v1::{self, coordinator_server::Coordinator as Service};
use tokio::sync::Notify;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Caller;
use super::config::{FINISHED_KEEP_MS, HEALTH_PROBE_MS_MAX, STREAM_CHUNKS_BUFFERED, limits};
use super::open_slots::{OpenSlots, PrunePacer, Slot};
use super::stream::{self, ChunkReader};
use super::{errors, oversize};

/// How a transaction ended, as the daemon answers for it afterwards.
#[derive(Clone, Debug)]
enum Ended {
    Committed(Option<adapters::Lsn>),
    RolledBack(RollbackCause),
    InDoubt {
        error: String,
        branch: Option<String>,
    },
}

/// One joined branch.
#[derive(Clone)]
enum Handle {
    Files(Arc<FilesHandle>),
    Mail(Arc<MailHandle>),
    Kv(Arc<KvHandle>),
}

impl Handle {
    fn kind(&self) -> &'static str {
        match self {
            Handle::Files(_) => "files",
            Handle::Mail(_) => "mail",
            Handle::Kv(_) => "kv",
        }
    }
}

struct TxnState {
    tx: Transaction,
    handles: HashMap<String, Handle>,
    /// The PostgreSQL branches the application prepared and enlisted (kept after the end, so
    /// that a retried enlisting is told apart from a late one).
    enlisted: Vec<String>,
    ended: Option<Ended>,
}

/// Whose open transactions a transaction counts among (`txns_per_client_max`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    /// A client by the name of its token.
    Named(Arc<str>),
    /// A caller without a token, by peer IP address.
    Peer(Option<IpAddr>),
}

struct Entry {
    peer: ClientKey,
    started: Instant,
    ended_at: Mutex<Option<Instant>>,
    /// Its place in its peer's count of open transactions, until it finishes.
    slot: Mutex<Option<Slot>>,
    state: tokio::sync::Mutex<TxnState>,
}

impl TxnState {
    /// How many branches the transaction has: joined here, or enlisted.
    fn branches(&self) -> usize {
        self.handles.len() + self.enlisted.len()
    }
}

impl Entry {
    fn is_ended(&self) -> bool {
        self.ended_at.lock().map(|e| e.is_some()).unwrap_or(true)
    }
}

/// The service's shared state.
pub struct Daemon {
    concord: Concord,
    config: Config,
    shipper: Arc<replicator::primary::Shipper>,
    txns: Mutex<HashMap<Xid, Arc<Entry>>>,
    open: OpenSlots<ClientKey>,
    pacer: PrunePacer,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    settled: Notify,
}

/// Counts a commit or rollback in flight while it lives.
struct InFlight<'a>(&'a Daemon);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

impl Daemon {
    /// A service over `concord`, opened from `config`.
    pub fn new(
        concord: Concord,
        config: Config,
        shipper: Arc<replicator::primary::Shipper>,
    ) -> Daemon {
        Daemon {
            concord,
            config,
            shipper,
            txns: Mutex::new(HashMap::new()),
            open: OpenSlots::default(),
            pacer: PrunePacer::new(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            settled: Notify::new(),
        }
    }

    /// Stops taking new transactions (`Begin` answers UNAVAILABLE).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Waits (at most `timeout`) until no commit or rollback is in flight; returns whether
    /// none is.
    pub async fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.settled.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// Drops every transaction held (open ones roll back in the background; what a stop cuts
    /// short, the next start presumes aborted) and returns a handle on the embedded concord,
    /// for closing.
    pub fn release(&self) -> Concord {
        self.txns().clear();
        self.concord.clone()
    }

    fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    fn txns(&self) -> std::sync::MutexGuard<'_, HashMap<Xid, Arc<Entry>>> {
        self.txns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn entry(&self, xid: Xid) -> Result<Arc<Entry>, Status> {
        self.txns()
            .get(&xid)
            .cloned()
            .ok_or_else(|| errors::unknown_xid(xid))
    }

    /// What `Begin` does at most once a second, for when no `Begin` comes: forgets what
    /// [`Daemon::prune`] forgets, and the idle clients' counts.
    pub fn housekeeping(&self) {
        if self.pacer.due() {
            self.prune();
            self.open.forget_idle();
        }
    }

    /// Forgets finished transactions past [`FINISHED_KEEP_MS`], and open ones the coordinator
    /// timed out long ago (their clients are gone).
    fn prune(&self) {
        let keep = Duration::from_millis(FINISHED_KEEP_MS);
        let stale = Duration::from_millis(self.config.txn_timeout_ms.saturating_mul(2));
        let coordinator = self.concord.coordinator();
        self.txns()
            .retain(|xid, e| match e.ended_at.lock().ok().and_then(|at| *at) {
                Some(at) => at.elapsed() < keep,
                None => e.started.elapsed() < stale || coordinator.check_open(xid).is_ok(),
            });
    }

    /// The transactions `peer` has open (not finished, not timed out).
    fn open_of(&self, peer: &ClientKey) -> usize {
        let coordinator = self.concord.coordinator();
        self.txns()
            .iter()
            .filter(|(xid, e)| {
                e.peer == *peer && !e.is_ended() && coordinator.check_open(xid).is_ok()
            })
            .count()
    }

    /// The handle of `target`'s resource, joining it when new (`kind`: the call's kind).
    async fn handle(&self, target: &BranchTarget, kind: &'static str) -> Result<Handle, Status> {
        let xid = target.xid;
        let entry = self.entry(xid)?;
        let mut st = entry.state.lock().await;
        let handle = match st.handles.get(&target.resource) {
            Some(h) => h.clone(),
            None => {
                let branches_max = self.config.daemon.limits.branches_per_txn_max;
                if st.branches() >= branches_max as usize {
                    return Err(errors::limit(
                        "branches_per_txn_max",
                        u64::from(branches_max),
                        &format!("transaction {xid} has as many branches as it may"),
                    ));
                }
                let name = target.resource.as_str();
                let joined = match kind {
                    "files" => st.tx.files(name).await.map(|h| Handle::Files(Arc::new(h))),
                    "mail" => st.tx.mail(name).await.map(|h| Handle::Mail(Arc::new(h))),
                    _ => st.tx.kv(name).await.map(|h| Handle::Kv(Arc::new(h))),
                };
                let h = joined.map_err(|e| errors::status(xid, &e))?;
                st.handles.insert(target.resource.clone(), h.clone());
                h
            }
        };
        if handle.kind() != kind {
            let e = ConcordError::WrongKind {
                name: target.resource.clone(),
                expected: kind,
            };
            return Err(errors::status(xid, &e));
        }
        Ok(handle)
    }

    fn finish(entry: &Entry, st: &mut TxnState, ended: Ended) {
        st.ended = Some(ended);
        st.handles.clear();
        if let Ok(mut at) = entry.ended_at.lock() {
            *at = Some(Instant::now());
        }
        if let Ok(mut slot) = entry.slot.lock() {
            slot.take();
        }
    }

    /// Records that the coordinator's reaper rolled back the open transaction `xid` at its
    /// timeout (its client went quiet), if it did.
    fn notice_timeout(&self, entry: &Entry, st: &mut TxnState, xid: Xid) {
        let coordinator = self.concord.coordinator();
        if let Err(CoordError::TimedOut { timeout_ms, .. }) = coordinator.check_open(&xid) {
            // Told now: the coordinator's record of the timeout is no longer needed.
            coordinator.forget(&xid);
            Daemon::finish(
                entry,
                st,
                Ended::RolledBack(RollbackCause::TimedOut { timeout_ms }),
            );
        }
    }

    /// The outcome the journal holds for `xid` (read on the blocking pool).
    async fn journal_outcome(&self, xid: Xid) -> Result<XidState, Status> {
        let concord = self.concord.clone();
        let ledger = tokio::task::spawn_blocking(move || {
            coordinator::runtime::read_ledger(concord.coordinator().journal())
        })
        .await
        .map_err(|e| Status::internal(format!("read the journal: {e}")))?
        .map_err(|e| errors::coord_status(xid, &e))?;
        let lsn = ledger
            .entry(&xid)
            .and_then(|e| e.decision.as_ref())
            .map(|d| d.lsn());
        Ok(match ledger.verdict(&xid) {
            Verdict::Committed | Verdict::Committing => XidState::Ended(Outcome::Committed { lsn }),
            Verdict::Aborted => XidState::Ended(Outcome::RolledBack {
                reason: "its one-phase commit did not happen".into(),
                failed: None,
            }),
            Verdict::OnePhaseOpen => XidState::Ended(Outcome::InDoubt {
                error: "its one-phase commit's outcome is not journaled yet".into(),
                branch: None,
            }),
            Verdict::NoDecision => XidState::Unknown,
        })
    }
}

impl Daemon {
    /// The configured postgres resource `name`, for enlisting a branch of `xid` in it.
    fn enlisted_resource(&self, xid: Xid, name: &str) -> Result<&PostgresResource, Status> {
        let coordinator = self.concord.coordinator();
        let resource = coordinator
            .resource(name)
            .map_err(|e| errors::coord_status(xid, &e))?;
        let wrong_kind = || {
            let e = ConcordError::WrongKind {
                name: name.to_string(),
                expected: "postgres",
            };
            errors::status(xid, &e)
        };
        if self.config.resources.get(name).map(|r| r.kind()) != Some("postgres") {
            return Err(wrong_kind());
        }
        resource
            .as_any()
            .downcast_ref::<PostgresResource>()
            .ok_or_else(wrong_kind)
    }

    /// The answer to an enlisting after the transaction's commit or rollback began. A branch
    /// the transaction never had is no part of it: it is rolled back now (else the orphan
    /// sweeper would find its xid decided and commit it).
    async fn late_enlisting(&self, st: &TxnState, xid: Xid, name: &str) -> Status {
        let e = ConcordError::Finished {
            xid,
            state: "committed or rolled back",
        };
        if st.enlisted.iter().all(|n| n != name)
            && let Ok(resource) = self.concord.coordinator().resource(name)
            && let Err(e) = resource.rollback(&xid).await
        {
            tracing::warn!(%xid, resource = name, error = %e, "roll back a branch enlisted after its transaction ended");
        }
        errors::status(xid, &e)
    }

    /// Every configured resource's prepared branches (`recover`), by xid; a resource that
    /// cannot answer within `call_timeout_ms` is logged and left out.
    async fn prepared_branches(&self) -> BTreeMap<Xid, Vec<String>> {
        let coordinator = self.concord.coordinator();
        let deadline = Duration::from_millis(self.config.call_timeout_ms);
        let mut out: BTreeMap<Xid, Vec<String>> = BTreeMap::new();
        for name in self.config.resources.keys() {
            let Ok(resource) = coordinator.resource(name) else {
                continue;
            };
            match tokio::time::timeout(deadline, resource.recover()).await {
                Ok(Ok(xids)) => {
                    for xid in xids {
                        out.entry(xid).or_default().push(name.clone());
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(resource = %name, error = %e, "ListInDoubt: list prepared branches")
                }
                Err(_) => {
                    tracing::warn!(resource = %name, "ListInDoubt: list prepared branches: no answer within call_timeout_ms")
                }
            }
        }
        out
    }

    /// The journal's ledger (read on the blocking pool).
    async fn ledger(&self) -> Result<coordinator::ledger::Ledger, Status> {
        let concord = self.concord.clone();
        tokio::task::spawn_blocking(move || {
            coordinator::runtime::read_ledger(concord.coordinator().journal())
        })
        .await
        .map_err(|e| Status::internal(format!("read the journal: {e}")))?
        .map_err(|e| Status::internal(format!("read the journal: {e}")))
    }
}

/// Checks that `gid` is the gid of `xid`'s branch in resource `name`.
fn check_gid(xid: Xid, name: &str, gid: &str) -> Result<(), Status> {
    let expected = format!("concord:{xid}:{name}");
    if gid == expected {
        return Ok(());
    }
    Err(proto::WireError::Invalid {
        field: "EnlistPreparedRequest.gid",
        reason: format!(
            "{gid:?} is not the gid of transaction {xid}'s branch in {name}: prepare it as {expected:?}"
        ),
    }
    .into())
}

/// The redo text of an enlisting: what `concord.prepare_branch` returned (empty: no row
/// images), checked to be a JSON array of row images.
fn redo_text(redo: &[u8]) -> Result<&str, Status> {
    let invalid = |reason: String| -> Status {
        proto::WireError::Invalid {
            field: "EnlistPreparedRequest.redo",
            reason,
        }
        .into()
    };
    if redo.is_empty() {
        return Ok("[]");
    }
    let text = std::str::from_utf8(redo).map_err(|e| {
        invalid(format!(
            "not UTF-8 ({e}): send the text concord.prepare_branch returned"
        ))
    })?;
    adapters::postgres::check_redo_text(text).map_err(invalid)?;
    Ok(text)
}

/// The wire outcome of a transaction that ended.
fn txn_outcome(xid: Xid, ended: &Ended) -> v1::TxnOutcome {
    let state = match ended {
        Ended::Committed(lsn) => XidState::Ended(Outcome::Committed { lsn: *lsn }),
        Ended::InDoubt { error, branch } => XidState::Ended(Outcome::InDoubt {
            error: error.clone(),
            branch: branch.clone(),
        }),
        Ended::RolledBack(cause) => {
            return v1::TxnOutcome {
                xid: xid_text(xid),
                state: Some(v1::txn_outcome::State::RolledBack(v1::RolledBack {
                    cause: Some(errors::cause(cause)),
                })),
            };
        }
    };
    v1::TxnOutcome::from(&XidOutcome { xid, state })
}

/// Whose the call is: the client its token names, else its peer IP address.
fn peer<T>(request: &Request<T>) -> ClientKey {
    match request.extensions().get::<Caller>() {
        Some(Caller::Client(name)) => ClientKey::Named(Arc::clone(name)),
        _ => ClientKey::Peer(request.remote_addr().map(|a| a.ip())),
    }
}

/// The first message of a client stream, which must be its start.
async fn stream_start<M, S>(
    stream: &mut Streaming<M>,
    field: &'static str,
    message_bytes_max: usize,
) -> Result<S, Status>
where
    StreamPart<S>: TryFrom<M, Error = proto::WireError>,
{
    let first = stream
        .message()
        .await
        .map_err(|status| oversize::refusal(status, message_of(field), message_bytes_max))?
        .ok_or(proto::WireError::Missing { field })?;
    match StreamPart::<S>::try_from(first)? {
        StreamPart::Start(s) => Ok(s),
        StreamPart::Chunk(_) => Err(proto::WireError::Invalid {
            field,
            reason: "a content chunk came before the start message: send the start first".into(),
        }
        .into()),
    }
}

/// The message name of a `message.field` name.
fn message_of(field: &str) -> &str {
    field.split('.').next().unwrap_or(field)
}

/// Feeds the rest of a client stream's chunks into a reader, in a task of its own; `declared`:
/// the content size the client announced.
fn feed<M>(
    mut stream: Streaming<M>,
    field: &'static str,
    declared: Option<u64>,
    limits: DaemonLimits,
) -> ChunkReader
where
    M: IntoChunk + Send + 'static,
{
    let (feeder, reader) = stream::channel(STREAM_CHUNKS_BUFFERED);
    tokio::spawn(async move {
        let mut total: u64 = 0;
        loop {
            let chunk = match stream.message().await {
                Ok(Some(m)) => m.into_chunk(field),
                Ok(None) => break,
                Err(status) => Err(oversize::refusal(
                    status,
                    message_of(field),
                    limits.message_bytes_max,
                )),
            };
            let chunk = match chunk {
                Ok(c) if c.len() > limits.chunk_bytes_max => Err(errors::limit(
                    "chunk_bytes_max",
                    limits.chunk_bytes_max as u64,
                    &format!("a chunk of {} bytes", c.len()),
                )),
                other => other,
            };
            match chunk {
                Ok(c) => {
                    total += c.len() as u64;
                    if declared.is_some_and(|d| total > d) {
                        return feeder.fail(size_mismatch(field, declared, total));
                    }
                    if !feeder.send(c).await {
                        return;
                    }
                }
                Err(status) => return feeder.fail(status),
            }
        }
        if declared.is_some_and(|d| d != total) {
            feeder.fail(size_mismatch(field, declared, total));
        }
    });
    reader
}

fn size_mismatch(field: &'static str, declared: Option<u64>, total: u64) -> Status {
    proto::WireError::Invalid {
        field,
        reason: format!(
            "the content is {total} bytes or more, not the {} declared",
            declared.unwrap_or(0)
        ),
    }
    .into()
}

/// A streamed message after the start: its content chunk.
pub trait IntoChunk {
    /// The chunk, or the error a misplaced start is.
    fn into_chunk(self, field: &'static str) -> Result<Vec<u8>, Status>;
}

fn second_start(field: &'static str) -> Status {
    proto::WireError::Invalid {
        field,
        reason: "a second start message: only the first message may be one".into(),
    }
    .into()
}

impl IntoChunk for v1::FilesPutRequest {
    fn into_chunk(self, field: &'static str) -> Result<Vec<u8>, Status> {
        match StreamPart::try_from(self)? {
            StreamPart::Chunk(c) => Ok(c),
            StreamPart::Start(_) => Err(second_start(field)),
        }
    }
}

impl IntoChunk for v1::MailEnqueueRequest {
    fn into_chunk(self, field: &'static str) -> Result<Vec<u8>, Status> {
        match StreamPart::try_from(self)? {
            StreamPart::Chunk(c) => Ok(c),
            StreamPart::Start(_) => Err(second_start(field)),
        }
    }
}

/// The stream's own error when it was cut off, else the resource's.
fn streamed<T>(
    xid: Xid,
    result: Result<T, ConcordError>,
    failure: &Mutex<Option<Status>>,
) -> Result<T, Status> {
    if let Some(cut) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(cut);
    }
    result.map_err(|e| errors::status(xid, &e))
}

/// Whether a read failed because the file is not there: the files resource says so only in
/// words (its own "not found", or the operating system's).
fn not_found(e: &ConcordError) -> bool {
    let ConcordError::Resource(r) = e else {
        return false;
    };
    let text = r.to_string();
    text.contains(" not found") || text.contains("No such file or directory")
}

#[tonic::async_trait]
impl Service for Daemon {
    async fn begin(
        &self,
        request: Request<v1::BeginRequest>,
    ) -> Result<Response<v1::BeginResponse>, Status> {
        let peer = peer(&request);
        let begin = proto::convert::Begin::try_from(request.into_inner())?;
        if self.draining.load(Ordering::SeqCst) {
            return Err(errors::draining());
        }
        self.housekeeping();
        let txns_max = self.config.daemon.limits.txns_per_client_max;
        // The count is an upper bound: checked exactly only at the limit.
        let (slot, open) = self.open.take(&peer);
        if open >= txns_max as usize && self.open_of(&peer) >= txns_max as usize {
            return Err(errors::limit(
                "txns_per_client_max",
                u64::from(txns_max),
                "this client has as many open transactions as it may: commit or roll one back",
            ));
        }
        // The client's own timeout, capped at the configured one.
        let timeout_ms = begin.timeout_ms.map_or(self.config.txn_timeout_ms, |t| {
            t.min(self.config.txn_timeout_ms)
        });
        let tx = self
            .concord
            .begin()
            .await
            .map_err(|e| Status::internal(format!("begin a transaction: {e}")))?;
        let xid = tx.xid();
        self.concord
            .coordinator()
            .set_timeout(&xid, Duration::from_millis(timeout_ms))
            .map_err(|e| errors::coord_status(xid, &e))?;
        let entry = Entry {
            peer,
            started: Instant::now(),
            ended_at: Mutex::new(None),
            slot: Mutex::new(Some(slot)),
            state: tokio::sync::Mutex::new(TxnState {
                tx,
                handles: HashMap::new(),
                enlisted: Vec::new(),
                ended: None,
            }),
        };
        self.txns().insert(xid, Arc::new(entry));
        Ok(Response::new(v1::BeginResponse {
            xid: xid_text(xid),
            epoch: self.config.epoch,
            timeout_ms,
            limits: Some(limits(&self.config.daemon.limits)),
        }))
    }

    async fn files_put(
        &self,
        request: Request<Streaming<v1::FilesPutRequest>>,
    ) -> Result<Response<v1::FilesPutResponse>, Status> {
        let mut stream = request.into_inner();
        let start: proto::convert::FilePut = stream_start(
            &mut stream,
            "FilesPutRequest.part",
            self.config.daemon.limits.message_bytes_max,
        )
        .await?;
        let xid = start.target.xid;
        let Handle::Files(files) = self.handle(&start.target, "files").await? else {
            return Err(Status::internal("a files handle of another kind"));
        };
        let reader = feed(
            stream,
            "FilesPutRequest.chunk",
            start.size_bytes,
            self.config.daemon.limits,
        );
        let failure = reader.failure();
        let put = files.put(&start.path, reader).await;
        let size_bytes = streamed(xid, put, &failure)?;
        Ok(Response::new(v1::FilesPutResponse { size_bytes }))
    }

    async fn files_delete(
        &self,
        request: Request<v1::FilesDeleteRequest>,
    ) -> Result<Response<v1::FilesDeleteResponse>, Status> {
        let call = proto::convert::FileCall::try_from(request.into_inner())?;
        let Handle::Files(files) = self.handle(&call.target, "files").await? else {
            return Err(Status::internal("a files handle of another kind"));
        };
        files
            .delete(&call.path)
            .await
            .map_err(|e| errors::status(call.target.xid, &e))?;
        Ok(Response::new(v1::FilesDeleteResponse {}))
    }

    type FilesReadStream = BoxStream<v1::FilesReadResponse>;

    async fn files_read(
        &self,
        request: Request<v1::FilesReadRequest>,
    ) -> Result<Response<Self::FilesReadStream>, Status> {
        let call = proto::convert::FileCall::try_from(request.into_inner())?;
        let Handle::Files(files) = self.handle(&call.target, "files").await? else {
            return Err(Status::internal("a files handle of another kind"));
        };
        let messages = match files.read(&call.path).await {
            Ok(content) => {
                let size_bytes = content.len() as u64;
                let mut out: Vec<_> = content
                    .chunks(self.config.daemon.limits.chunk_bytes_max)
                    .map(|c| v1::FilesReadResponse {
                        chunk: c.to_vec(),
                        ..Default::default()
                    })
                    .collect();
                if out.is_empty() {
                    out.push(v1::FilesReadResponse::default());
                }
                out[0].found = true;
                out[0].size_bytes = size_bytes;
                out
            }
            Err(e) if not_found(&e) => vec![v1::FilesReadResponse::default()],
            Err(e) => return Err(errors::status(call.target.xid, &e)),
        };
        let stream = tonic::codegen::tokio_stream::iter(messages.into_iter().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn mail_enqueue(
        &self,
        request: Request<Streaming<v1::MailEnqueueRequest>>,
    ) -> Result<Response<v1::MailEnqueueResponse>, Status> {
        let mut stream = request.into_inner();
        let target: BranchTarget = stream_start(
            &mut stream,
            "MailEnqueueRequest.part",
            self.config.daemon.limits.message_bytes_max,
        )
        .await?;
        let Handle::Mail(mail) = self.handle(&target, "mail").await? else {
            return Err(Status::internal("a mail handle of another kind"));
        };
        let reader = feed(
            stream,
            "MailEnqueueRequest.chunk",
            None,
            self.config.daemon.limits,
        );
        let failure = reader.failure();
        let enqueued = mail.enqueue(reader).await;
        let enqueued = streamed(target.xid, enqueued, &failure)?;
        Ok(Response::new(v1::MailEnqueueResponse {
            name: enqueued.name,
            size_bytes: enqueued.bytes,
        }))
    }

    async fn kv_insert(
        &self,
        request: Request<v1::KvInsertRequest>,
    ) -> Result<Response<v1::KvInsertResponse>, Status> {
        let call = proto::convert::KvCall::try_from(request.into_inner())?;
        let Handle::Kv(kv) = self.handle(&call.target, "kv").await? else {
            return Err(Status::internal("a kv handle of another kind"));
        };
        kv.insert(&call.key, call.value.as_deref().unwrap_or_default())
            .await
            .map_err(|e| errors::status(call.target.xid, &e))?;
        Ok(Response::new(v1::KvInsertResponse {}))
    }

    async fn kv_remove(
        &self,
        request: Request<v1::KvRemoveRequest>,
    ) -> Result<Response<v1::KvRemoveResponse>, Status> {
        let call = proto::convert::KvCall::try_from(request.into_inner())?;
        let Handle::Kv(kv) = self.handle(&call.target, "kv").await? else {
            return Err(Status::internal("a kv handle of another kind"));
        };
        kv.remove(&call.key)
            .await
            .map_err(|e| errors::status(call.target.xid, &e))?;
        Ok(Response::new(v1::KvRemoveResponse {}))
    }

    async fn kv_get(
        &self,
        request: Request<v1::KvGetRequest>,
    ) -> Result<Response<v1::KvGetResponse>, Status> {
        let call = proto::convert::KvCall::try_from(request.into_inner())?;
        let Handle::Kv(kv) = self.handle(&call.target, "kv").await? else {
            return Err(Status::internal("a kv handle of another kind"));
        };
        let value = kv
            .get(&call.key)
            .await
            .map_err(|e| errors::status(call.target.xid, &e))?;
        Ok(Response::new(v1::KvGetResponse { value }))
    }

    async fn enlist_prepared(
        &self,
        request: Request<v1::EnlistPreparedRequest>,
    ) -> Result<Response<v1::EnlistPreparedResponse>, Status> {
        let enlist = proto::convert::EnlistPrepared::try_from(request.into_inner())?;
        let xid = enlist.target.xid;
        let name = enlist.target.resource.as_str();
        let entry = self.entry(xid)?;
        let pg = self.enlisted_resource(xid, name)?;
        check_gid(xid, name, &enlist.gid)?;
        let redo_text = redo_text(&enlist.redo)?;
        let mut st = entry.state.lock().await;
        if st.ended.is_some() {
            return Err(self.late_enlisting(&st, xid, name).await);
        }
        if st.enlisted.iter().any(|n| n == name) {
            // A retried enlisting: the branch is the transaction's already, if the redo is the
            // same (the resource refuses another).
            pg.adopt_prepared(&xid, redo_text)
                .await
                .map_err(|e| errors::status(xid, &ConcordError::Resource(e)))?;
            return Ok(Response::new(v1::EnlistPreparedResponse {}));
        }
        let branches_max = self.config.daemon.limits.branches_per_txn_max;
        if st.branches() >= branches_max as usize {
            return Err(errors::limit(
                "branches_per_txn_max",
                u64::from(branches_max),
                &format!("transaction {xid} has as many branches as it may"),
            ));
        }
        let coordinator = self.concord.coordinator();
        if let Err(e) = coordinator.check_open(&xid) {
            if matches!(e, CoordError::TimedOut { .. }) {
                // Rolls the branch back at once: nothing can commit it any more.
                let _ = coordinator.join_prepared(&xid, name).await;
                self.notice_timeout(&entry, &mut st, xid);
            }
            return Err(errors::coord_status(xid, &e));
        }
        pg.adopt_prepared(&xid, redo_text)
            .await
            .map_err(|e| errors::status(xid, &ConcordError::Resource(e)))?;
        coordinator
            .join_prepared(&xid, name)
            .await
            .map_err(|e| errors::coord_status(xid, &e))?;
        st.enlisted.push(name.to_string());
        Ok(Response::new(v1::EnlistPreparedResponse {}))
    }

    async fn commit(
        &self,
        request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let call = proto::convert::XidCall::try_from(request.into_inner())?;
        let xid = call.xid;
        let entry = self.entry(xid)?;
        let _in_flight = self.in_flight();
        let mut st = entry.state.lock().await;
        if let Some(Ended::RolledBack(cause)) = &st.ended {
            let detail = v1::ErrorDetail {
                rollback: Some(errors::cause(cause)),
                ..errors::detail(v1::ErrorCode::AlreadyRolledBack, Some(xid))
            };
            return Err(proto::error_status(
                format!(
                    "transaction {xid} rolled back ({cause}); it cannot commit: run it again as a new transaction"
                ),
                &detail,
            ));
        }
        let ended = match st.tx.commit().await {
            Ok(c) => Ended::Committed(c.lsn),
            Err(ConcordError::InDoubt { branch, cause, .. }) => Ended::InDoubt {
                error: cause,
                branch,
            },
            Err(ConcordError::RolledBack { cause, .. }) => {
                let status = errors::status(
                    xid,
                    &ConcordError::RolledBack {
                        xid,
                        branch: None,
                        cause: cause.clone(),
                    },
                );
                Daemon::finish(&entry, &mut st, Ended::RolledBack(cause));
                return Err(status);
            }
            Err(e) => return Err(errors::status(xid, &e)),
        };
        let outcome = txn_outcome(xid, &ended);
        Daemon::finish(&entry, &mut st, ended);
        Ok(Response::new(v1::CommitResponse {
            outcome: Some(outcome),
        }))
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::RollbackResponse>, Status> {
        let call = proto::convert::XidCall::try_from(request.into_inner())?;
        let xid = call.xid;
        let entry = self.entry(xid)?;
        let _in_flight = self.in_flight();
        let mut st = entry.state.lock().await;
        match &st.ended {
            Some(Ended::Committed(_)) => {
                return Err(proto::error_status(
                    format!("transaction {xid} committed; it cannot roll back"),
                    &errors::detail(v1::ErrorCode::AlreadyCommitted, Some(xid)),
                ));
            }
            Some(ended @ Ended::RolledBack(_)) => {
                return Ok(Response::new(v1::RollbackResponse {
                    outcome: Some(txn_outcome(xid, ended)),
                }));
            }
            _ => {}
        }
        let rolled = st
            .tx
            .rollback_because(&call.reason)
            .await
            .map_err(|e| errors::status(xid, &e))?;
        let ended = Ended::RolledBack(rolled.cause);
        let outcome = txn_outcome(xid, &ended);
        Daemon::finish(&entry, &mut st, ended);
        Ok(Response::new(v1::RollbackResponse {
            outcome: Some(outcome),
        }))
    }

    async fn outcome(
        &self,
        request: Request<v1::OutcomeRequest>,
    ) -> Result<Response<v1::OutcomeResponse>, Status> {
        let call = proto::convert::XidCall::try_from(request.into_inner())?;
        let xid = call.xid;
        let held = self.txns().get(&xid).cloned();
        let outcome = match held {
            Some(entry) => {
                let mut st = entry.state.lock().await;
                if st.ended.is_none() {
                    self.notice_timeout(&entry, &mut st, xid);
                }
                match &st.ended {
                    Some(ended) => txn_outcome(xid, ended),
                    None => v1::TxnOutcome::from(&XidOutcome {
                        xid,
                        state: XidState::Open,
                    }),
                }
            }
            None => v1::TxnOutcome::from(&XidOutcome {
                xid,
                state: self.journal_outcome(xid).await?,
            }),
        };
        Ok(Response::new(v1::OutcomeResponse {
            outcome: Some(outcome),
        }))
    }

    async fn list_in_doubt(
        &self,
        request: Request<v1::ListInDoubtRequest>,
    ) -> Result<Response<v1::ListInDoubtResponse>, Status> {
        request.get_ref().check()?;
        let timeout = Duration::from_millis(self.config.txn_timeout_ms);
        let listed = self.concord.coordinator().list();
        let mut transactions: Vec<v1::InDoubtTxn> = listed
            .iter()
            // An open transaction is in the client's hands; a timed-out one was rolled back
            // (its rollback, while it runs, is listed as "rolling back"), and its entry only
            // waits for a client that may never come back.
            .filter(|t| t.state != "open" && t.state != "timed out")
            .map(|t| v1::InDoubtTxn {
                xid: xid_text(t.xid),
                standing: if t.age >= timeout {
                    v1::Standing::InDoubt
                } else {
                    v1::Standing::InFlight
                } as i32,
                age_ms: Some(u64::try_from(t.age.as_millis()).unwrap_or(u64::MAX)),
                branches: t.pending().map(|(name, _, _)| name.clone()).collect(),
                state: t.state.clone(),
            })
            .collect();
        // Prepared branches that no transaction here holds (a timed-out one holds nothing: its
        // branches were rolled back, and one prepared after that is the sweeper's or an
        // operator's).
        let held: HashSet<Xid> = listed
            .iter()
            .filter(|t| t.state != "timed out")
            .map(|t| t.xid)
            .collect();
        let mut prepared = self.prepared_branches().await;
        prepared.retain(|xid, _| !held.contains(xid));
        // The journal is read only for branches no transaction here holds: usually none, so
        // that asking stays cheap however long the journal is.
        let rows = if prepared.is_empty() {
            Vec::new()
        } else {
            let ledger = self.ledger().await?;
            crate::txn::prepared_rows(&ledger, prepared, |_| false)
        };
        transactions.extend(rows.into_iter().map(|row| v1::InDoubtTxn {
            xid: row.xid,
            state: row.state,
            standing: v1::Standing::Unknown as i32,
            age_ms: row.age_ms,
            branches: row.branches,
        }));
        Ok(Response::new(v1::ListInDoubtResponse { transactions }))
    }

    async fn resolve(
        &self,
        request: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        let request = coordinator::resolve::ResolveRequest::try_from(request.into_inner())?;
        let xid = request.xid;
        let report = self
            .concord
            .coordinator()
            .resolve(&request)
            .await
            .map_err(|e| errors::coord_status(xid, &e))?;
        // An outcome remembered from before the resolution is stale: `Outcome` reads the
        // journal from now on.
        self.txns().retain(|x, e| *x != xid || !e.is_ended());
        Ok(Response::new(v1::ResolveResponse::from(&report)))
    }

    async fn health(
        &self,
        request: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        request.get_ref().check()?;
        Ok(Response::new(v1::HealthResponse {
            serving: self.serving() as i32,
        }))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        request.get_ref().check()?;
        Ok(Response::new(self.status_response().await))
    }
}

impl Daemon {
    /// The daemon's status (`Status`, and the replication service's).
    pub async fn status_response(&self) -> v1::StatusResponse {
        let coordinator = self.concord.coordinator();
        let counts = coordinator.counts();
        let resources = self.probe_resources().await;
        v1::StatusResponse {
            role: v1::Role::Primary as i32,
            serving: self.serving() as i32,
            node: self.config.node,
            epoch: self.config.epoch,
            durable_lsn: coordinator.journal().durable_lsn().0,
            open_txns: counts.open,
            in_doubt_txns: counts.in_doubt,
            resources,
            version: env!("CARGO_PKG_VERSION").to_string(),
            schema_version: proto::SCHEMA_VERSION,
            replication: Some(self.shipper.status()),
            failover: None,
        }
    }

    /// Every configured resource's health, probed side by side, each within
    /// [`HEALTH_PROBE_MS_MAX`]: a probe that fails or does not answer in time is unhealthy,
    /// with the reason.
    async fn probe_resources(&self) -> Vec<v1::ResourceHealth> {
        let coordinator = self.concord.coordinator();
        let deadline = Duration::from_millis(HEALTH_PROBE_MS_MAX);
        let mut probes = tokio::task::JoinSet::new();
        for (index, name) in self.config.resources.keys().enumerate() {
            let resource = coordinator.resource(name).map(Arc::clone);
            probes.spawn(async move {
                let health = match resource {
                    Ok(r) => match tokio::time::timeout(deadline, r.health()).await {
                        Ok(answer) => answer.map_err(|e| e.to_string()),
                        Err(_) => Err(format!(
                            "the health probe did not answer within {HEALTH_PROBE_MS_MAX} ms"
                        )),
                    },
                    Err(e) => Err(e.to_string()),
                };
                (index, health)
            });
        }
        let mut results = vec![Err("the health probe failed".to_string()); probes.len()];
        while let Some(done) = probes.join_next().await {
            if let Ok((index, health)) = done {
                results[index] = health;
            }
        }
        self.config
            .resources
            .iter()
            .zip(results)
            .map(|((name, r), health)| v1::ResourceHealth {
                name: name.clone(),
                kind: r.kind().to_string(),
                healthy: health.is_ok(),
                detail: health.err().unwrap_or_default(),
            })
            .collect()
    }

    fn serving(&self) -> v1::Serving {
        if self.draining.load(Ordering::SeqCst) {
            v1::Serving::Draining
        } else {
            v1::Serving::Serving
        }
    }
}

/// The daemon's status, for the replication service's `Status`.
pub struct DaemonStatus(pub Arc<Daemon>);

#[tonic::async_trait]
impl replicator::service::StatusSource for DaemonStatus {
    async fn status(&self) -> Result<v1::StatusResponse, Status> {
        Ok(self.0.status_response().await)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn daemon_of(concord: Concord, config: Config) -> Daemon {
        let shipper = replicator::primary::Shipper::new(
            concord.coordinator().clone(),
            "0".repeat(32),
            config.replication.clone(),
        );
        Daemon::new(concord, config, shipper)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_daemon_begins_nothing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::embedded(dir.path());
        let concord = Concord::open(config.clone()).await.unwrap();
        let daemon = daemon_of(concord, config);
        let begin = || {
            Request::new(v1::BeginRequest {
                header: Some(v1::RequestHeader::current("test")),
                timeout_ms: None,
            })
        };
        assert!(daemon.begin(begin()).await.is_ok());
        daemon.drain();
        let refused = daemon.begin(begin()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        let detail = proto::error_detail(&refused).unwrap().unwrap();
        assert_eq!(detail.code, v1::ErrorCode::Draining as i32);
        let health = daemon
            .health(Request::new(v1::HealthRequest {
                header: Some(v1::RequestHeader::current("test")),
            }))
            .await
            .unwrap();
        assert_eq!(health.into_inner().serving, v1::Serving::Draining as i32);
        assert!(daemon.wait_settled(Duration::from_secs(1)).await);
        assert!(daemon.release().close(Duration::from_secs(10)).await);
    }

    /// The open transactions of a client are counted as they begin and end: the limit holds,
    /// and a place is free again as soon as one of them ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_gets_its_open_transactions_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::embedded(dir.path());
        let concord = Concord::open(config.clone()).await.unwrap();
        let txns_max = config.daemon.limits.txns_per_client_max;
        let daemon = daemon_of(concord, config);
        let begin = || {
            daemon.begin(Request::new(v1::BeginRequest {
                header: Some(v1::RequestHeader::current("test")),
                timeout_ms: None,
            }))
        };
        let mut xids = Vec::new();
        for _ in 0..txns_max {
            xids.push(begin().await.unwrap().into_inner().xid);
        }
        let refused = begin().await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let detail = proto::error_detail(&refused).unwrap().unwrap();
        assert_eq!(detail.limit, "txns_per_client_max");
        daemon
            .rollback(Request::new(v1::RollbackRequest {
                header: Some(v1::RequestHeader::current("test")),
                xid: xids.pop().unwrap(),
                reason: String::new(),
            }))
            .await
            .unwrap();
        assert!(
            begin().await.is_ok(),
            "the place of the rolled back one is free"
        );
        assert!(begin().await.is_err());
        assert!(daemon.release().close(Duration::from_secs(10)).await);
    }

    /// The daemon holds every finished transaction for `FINISHED_KEEP_MS`; a `Begin` that
    /// walked them all (to forget old ones, to count the client's open ones) made a run of N
    /// transactions take time quadratic in N.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn begin_does_not_walk_every_transaction_held() {
        const TXNS: usize = 20_000;
        const BOUND_MS: u64 = 10_000;
        let dir = tempfile::tempdir().unwrap();
        let config = Config::embedded(dir.path());
        let concord = Concord::open(config.clone()).await.unwrap();
        let daemon = daemon_of(concord, config);
        let header = || Some(v1::RequestHeader::current("test"));
        let started = Instant::now();
        for _ in 0..TXNS {
            let begun = daemon
                .begin(Request::new(v1::BeginRequest {
                    header: header(),
                    timeout_ms: None,
                }))
                .await
                .unwrap()
                .into_inner();
            daemon
                .rollback(Request::new(v1::RollbackRequest {
                    header: header(),
                    xid: begun.xid,
                    reason: String::new(),
                }))
                .await
                .unwrap();
        }
        let took = started.elapsed();
        assert_eq!(daemon.txns().len(), TXNS, "finished transactions are held");
        assert!(
            took < Duration::from_millis(BOUND_MS),
            "{TXNS} begins and rollbacks took {took:?}"
        );
        assert!(daemon.release().close(Duration::from_secs(10)).await);
    }
}
