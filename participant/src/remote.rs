//! Remote mode: the same API as embedded mode, over gRPC to a coordinator daemon
//! (`concord coordinator`, package `concord.v1`).
//!
//! `Remote` is one connection ([`proto::client`]: plain text or TLS, a bearer token in every
//! call) and the resource kinds the daemon serves (asked once with `Status`, so that asking a
//! handle of an unknown name or of the wrong kind answers at once, as embedded mode does).
//! `Shared` is one remote transaction: its xid, the daemon's chunk size, whether it ended,
//! and the PostgreSQL branches the application runs itself. `RemoteBranch` is a branch on a
//! daemon-owned store (files, mail, kv): each call is one gRPC call naming xid and resource;
//! the daemon joins the resource at the first call. Content is streamed (`upload`).
//!
//! # Commit and a broken connection
//!
//! The commit is one call. When it fails on the transport (the connection broke, the daemon
//! restarted, a deadline passed), whether the daemon decided is not known here; the client
//! then asks `Outcome(xid)` itself, up to [`OUTCOME_ATTEMPTS_MAX`] times with a doubling
//! backoff from [`OUTCOME_BACKOFF_MS`], each on a new connection, and reports what it learns:
//! committed, rolled back, in doubt as the daemon says. An xid still open means the commit
//! never arrived: it is sent again. Only when nothing can be learnt is the transaction
//! reported [`ConcordError::InDoubt`], with its xid, for [`crate::Concord::outcome`] later.
//!
//! # Several nodes
//!
//! A connection to several nodes (`Concord::connect_any`) follows the primary for `Begin` and
//! `Outcome` ([`follow`]). A transaction's calls stay on the node it began on (`Shared` keeps
//! it): a commit that node answers "not the primary", or that could not even open a connection
//! to it, never reached a coordinator, so the transaction rolled back
//! ([`RollbackCause::NodeLost`]); a commit sent without an answer asks `Outcome` of that node
//! and, when it cannot be reached, of the primary.
//!
//! # Caveats
//!
//! * An xid the daemon does not know (`unknown`: it restarted and journaled no decision for
//!   it, or trimmed a decision long finished) is reported in doubt, not rolled back: the client
//!   cannot tell the two apart, and a rollback reported wrongly invites a second run.
//! * A transaction dropped without commit or rollback is rolled back by a call in the
//!   background when a tokio runtime is at hand; otherwise the daemon rolls it back at its
//!   timeout.
//! * `FilesHandle::read` gathers the streamed file into memory, as embedded mode does.

pub mod follow;
mod postgres;
mod status;
mod upload;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::postgres::PostgresResource;
use adapters::{ResourceError, Xid};
use coordinator::CoordError;
use proto::client::{Client, Credentials};
use proto::convert::{parse_xid, xid_text};
use proto::v1::{self, RequestHeader, txn_outcome::State};

use crate::TxnOutcome;
use crate::error::{ConcordError, RollbackCause};
use crate::transaction::{Committed, Ended};

use follow::{Node, Nodes, Refusal, Search};
pub(crate) use status::is_transport;

/// How many times a commit whose answer was lost asks the daemon for the outcome.
pub const OUTCOME_ATTEMPTS_MAX: u32 = 5;
/// The first wait before asking for a lost commit's outcome (milliseconds); it doubles.
pub const OUTCOME_BACKOFF_MS: u64 = 200;
/// How long one call asking for an outcome (connecting included) may take (milliseconds).
pub const OUTCOME_CALL_MS: u64 = 5_000;
/// The largest chunk this client sends, whatever the daemon allows (bytes).
pub const CHUNK_BYTES_MAX: usize = 1 << 20;
/// The client's name in every request header.
const CLIENT_NAME: &str = "concord-participant";

fn header() -> Option<RequestHeader> {
    Some(RequestHeader::current(CLIENT_NAME))
}

/// A connection to a daemon, or to the primary among several ([`follow`]).
pub(crate) struct Remote {
    nodes: Nodes,
    /// Whether the calls that start work follow the primary (`Concord::connect_any`); a
    /// connection to one daemon ([`Remote::connect`]) stays on it.
    follows: bool,
    /// The node taken as primary now.
    current: Mutex<Node>,
    /// Resource name → kind, as the daemon's `Status` lists them; `None` when it would not say.
    kinds: Option<BTreeMap<String, String>>,
    /// The daemon's PostgreSQL resources opened in this process.
    postgres: Mutex<BTreeMap<String, Arc<PostgresResource>>>,
}

/// A transaction the daemon began.
pub(crate) struct Begun {
    pub xid: Xid,
    pub chunk_bytes: usize,
}

impl Remote {
    /// Connects to the daemon at `url` and asks for the resources it serves.
    pub(crate) async fn connect(
        url: &str,
        credentials: Credentials,
    ) -> Result<Remote, ConcordError> {
        let node = Node {
            url: url.to_string(),
            client: proto::client::connect(url, &credentials).await?,
        };
        let kinds = resource_kinds(node.client.clone()).await?;
        Ok(Remote::new(
            Nodes::one(url, credentials),
            false,
            node,
            kinds,
        ))
    }

    /// Connects to the first of `urls` that answers as the primary, following the primary each
    /// names, for at most `failover_wait_ms` (see [`follow`]).
    pub(crate) async fn connect_any(
        urls: &[&str],
        credentials: Credentials,
        failover_wait_ms: u64,
    ) -> Result<Remote, ConcordError> {
        let Some(first) = urls.first() else {
            return Err(proto::client::ClientError::Url {
                url: String::new(),
                reason: "no daemon URL was given".to_string(),
            }
            .into());
        };
        // Every URL is checked before any is tried: a typo is not a node that is down.
        for url in urls {
            proto::client::connect_lazy(url, &credentials)?;
        }
        let nodes = Nodes {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            credentials,
            failover_wait_ms,
        };
        let mut search = Search::new(failover_wait_ms);
        let (node, status) = nodes.find(first.to_string(), &mut search).await?;
        let kinds = status.map(|s| s.resources.into_iter().map(|r| (r.name, r.kind)).collect());
        Ok(Remote::new(nodes, true, node, kinds))
    }

    fn new(
        nodes: Nodes,
        follows: bool,
        node: Node,
        kinds: Option<BTreeMap<String, String>>,
    ) -> Remote {
        Remote {
            nodes,
            follows,
            current: Mutex::new(node),
            kinds,
            postgres: Mutex::new(BTreeMap::new()),
        }
    }

    /// The node taken as primary now.
    fn current(&self) -> Node {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_current(&self, node: Node) {
        tracing::info!(url = %node.url, "following the primary");
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = node;
    }

    /// Checks that the daemon serves `name` as a resource of kind `expected`, when it said.
    pub(crate) fn check_kind(
        &self,
        xid: Xid,
        name: &str,
        expected: &'static str,
    ) -> Result<(), ConcordError> {
        let Some(kinds) = &self.kinds else {
            return Ok(());
        };
        match kinds.get(name) {
            Some(kind) if kind == expected => Ok(()),
            Some(_) => Err(ConcordError::WrongKind {
                name: name.to_string(),
                expected,
            }),
            None => Err(CoordError::UnknownResource {
                name: name.to_string(),
                configured: kinds.keys().cloned().collect::<Vec<_>>().join(", "),
            }
            .into()),
        }
        .map_err(|e| {
            tracing::debug!(%xid, "{e}");
            e
        })
    }

    /// Runs `call` on the primary: on the node taken as primary, and when it is not the
    /// primary or does not answer, on the one the search finds ([`follow`]). A connection to
    /// one daemon makes the call once. Returns the answer and the node that gave it.
    async fn on_primary<T, F, Fut>(
        &self,
        xid: Option<Xid>,
        call: F,
    ) -> Result<(T, Node), ConcordError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut node = self.current();
        if !self.follows {
            let answer = call(node.client.clone())
                .await
                .map_err(|s| status::error(xid, None, &s))?;
            return Ok((answer.into_inner(), node));
        }
        let mut search = Search::new(self.nodes.failover_wait_ms);
        loop {
            match follow::bounded(&search, call(node.client.clone())).await {
                Ok(answer) => return Ok((answer, node)),
                Err(s) => {
                    let Some(refusal) = Refusal::of(&s) else {
                        return Err(status::error(xid, None, &s));
                    };
                    node = self.nodes.find_after(&node, &refusal, &mut search).await?;
                    self.set_current(node.clone());
                }
            }
        }
    }

    /// Begins a transaction on the primary; returns it and the node it lives on.
    pub(crate) async fn begin(&self) -> Result<(Begun, Node), ConcordError> {
        let request = v1::BeginRequest {
            header: header(),
            timeout_ms: None,
        };
        let (begun, node) = self
            .on_primary(None, |mut client| {
                let request = request.clone();
                async move { client.begin(request).await }
            })
            .await?;
        let xid = parse_xid("BeginResponse.xid", &begun.xid)
            .map_err(|e| CoordError::Refused(format!("the daemon's Begin answer: {e}")))?;
        let limit = begun
            .limits
            .map_or(CHUNK_BYTES_MAX as u64, |l| l.chunk_bytes_max.max(1));
        let begun = Begun {
            xid,
            chunk_bytes: usize::try_from(limit)
                .unwrap_or(CHUNK_BYTES_MAX)
                .min(CHUNK_BYTES_MAX),
        };
        Ok((begun, node))
    }

    /// What became of `xid`, asked once of the primary (found again when it moved).
    pub(crate) async fn outcome(&self, xid: Xid) -> Result<TxnOutcome, ConcordError> {
        Ok(self.outcome_on_primary(xid).await?.0)
    }

    /// What the primary says of `xid`, and which node it is.
    async fn outcome_on_primary(&self, xid: Xid) -> Result<(TxnOutcome, Node), ConcordError> {
        let request = v1::OutcomeRequest {
            header: header(),
            xid: xid_text(xid),
        };
        let (answer, node) = self
            .on_primary(Some(xid), |mut client| {
                let request = request.clone();
                async move {
                    match tokio::time::timeout(
                        Duration::from_millis(OUTCOME_CALL_MS),
                        client.outcome(request),
                    )
                    .await
                    {
                        Ok(answer) => answer,
                        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                            "Outcome got no answer within {OUTCOME_CALL_MS} ms"
                        ))),
                    }
                }
            })
            .await?;
        Ok((txn_outcome(xid, answer.outcome), node))
    }
}

/// The resources a daemon serves, as its `Status` lists them; `None` when it would not say.
async fn resource_kinds(
    mut client: Client,
) -> Result<Option<BTreeMap<String, String>>, ConcordError> {
    match client.status(v1::StatusRequest { header: header() }).await {
        Ok(status) => Ok(Some(
            status
                .into_inner()
                .resources
                .into_iter()
                .map(|r| (r.name, r.kind))
                .collect(),
        )),
        Err(s) if s.code() == tonic::Code::Unauthenticated => Err(status::error(None, None, &s)),
        // Not told (an operator-only status, say): the daemon answers at the first call.
        Err(_) => Ok(None),
    }
}

async fn outcome_on(mut client: Client, xid: Xid) -> Result<TxnOutcome, ConcordError> {
    let request = v1::OutcomeRequest {
        header: header(),
        xid: xid_text(xid),
    };
    let answer = tokio::time::timeout(
        Duration::from_millis(OUTCOME_CALL_MS),
        client.outcome(request),
    )
    .await
    .map_err(|_| ConcordError::Unreachable {
        message: format!("Outcome got no answer within {OUTCOME_CALL_MS} ms"),
    })?
    .map_err(|s| status::error(Some(xid), None, &s))?;
    Ok(txn_outcome(xid, answer.into_inner().outcome))
}

/// A wire outcome as the participant's; a malformed one is in doubt (nothing safe is known).
fn txn_outcome(xid: Xid, outcome: Option<v1::TxnOutcome>) -> TxnOutcome {
    match outcome.and_then(|o| o.state) {
        Some(State::Committed(c)) => TxnOutcome::Committed(Committed {
            xid,
            lsn: c.decision_lsn.filter(|l| *l > 0).map(adapters::Lsn),
        }),
        Some(State::RolledBack(r)) => TxnOutcome::RolledBack {
            cause: r.cause.map_or_else(
                || RollbackCause::Coordinator {
                    reason: "the daemon gave no cause".into(),
                },
                status::cause_from_wire,
            ),
        },
        Some(State::InDoubt(d)) => TxnOutcome::InDoubt {
            branch: d.branch,
            cause: d.error,
        },
        Some(State::Open(_)) => TxnOutcome::Open,
        Some(State::Unknown(_)) => TxnOutcome::Unknown,
        None => TxnOutcome::InDoubt {
            branch: None,
            cause: "the daemon's answer held no outcome".into(),
        },
    }
}

/// One remote transaction, shared by the transaction and its handles.
pub(crate) struct Shared {
    pub remote: Arc<Remote>,
    /// The node the transaction began on: its calls all go there.
    node: Node,
    pub xid: Xid,
    chunk_bytes: usize,
    /// How it ended, once commit or rollback began.
    ended: Mutex<Option<&'static str>>,
    /// Its PostgreSQL branches run here and not enlisted yet.
    postgres: Mutex<Vec<(String, Arc<PostgresResource>)>>,
}

impl Shared {
    pub(crate) fn new(remote: Arc<Remote>, begun: Begun, node: Node) -> Shared {
        Shared {
            remote,
            node,
            xid: begun.xid,
            chunk_bytes: begun.chunk_bytes,
            ended: Mutex::new(None),
            postgres: Mutex::new(Vec::new()),
        }
    }

    /// [`ConcordError::Finished`] once commit or rollback began.
    pub(crate) fn check_open(&self) -> Result<(), ConcordError> {
        match *self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            None => Ok(()),
            Some(state) => Err(ConcordError::Finished {
                xid: self.xid,
                state,
            }),
        }
    }

    pub(crate) fn mark_ended(&self, state: &'static str) {
        *self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(state);
    }

    fn target(&self, resource: &str) -> Option<v1::BranchTarget> {
        Some(v1::BranchTarget {
            header: header(),
            xid: xid_text(self.xid),
            resource: resource.to_string(),
        })
    }

    /// A client of the node the transaction began on.
    pub(crate) fn client(&self) -> Client {
        self.node.client.clone()
    }

    /// A new connection to the transaction's node (the old one may be the broken one),
    /// bounded.
    async fn reconnect(&self) -> Result<Client, ConcordError> {
        let url = &self.node.url;
        let connecting = proto::client::connect(url, &self.remote.nodes.credentials);
        match tokio::time::timeout(Duration::from_millis(OUTCOME_CALL_MS), connecting).await {
            Ok(connected) => Ok(connected?),
            Err(_) => Err(ConcordError::Unreachable {
                message: format!("no connection to {url} within {OUTCOME_CALL_MS} ms"),
            }),
        }
    }

    /// A branch call's failure: a node that is no longer the primary has cut the transaction
    /// off (it rolls back); anything else as the daemon said.
    fn error(&self, kind: &'static str, status: &tonic::Status) -> ConcordError {
        if proto::primary_hint(status).is_some() {
            let (branch, cause) = self.cut_off(status);
            return ConcordError::RolledBack {
                xid: self.xid,
                branch,
                cause,
            };
        }
        status::error(Some(self.xid), Some(kind), status)
    }

    /// How a transaction ends whose node stopped being the primary, or could not be reached,
    /// before its commit request reached it: no decision was made, so it rolled back.
    fn cut_off(&self, status: &tonic::Status) -> (Option<String>, RollbackCause) {
        (
            None,
            RollbackCause::NodeLost {
                node: self.node.url.clone(),
                reason: format!("{:?}: {}", status.code(), status.message()),
            },
        )
    }

    fn cut_off_ended(&self, status: &tonic::Status) -> Ended {
        let (branch, cause) = self.cut_off(status);
        tracing::info!(xid = %self.xid, "rolled back, its node cut off before the commit: {cause}");
        Ended::RolledBack { branch, cause }
    }

    /// Asks the daemon to commit; a lost answer is learnt through `Outcome` (see the module
    /// docs).
    pub(crate) async fn commit(&self) -> Result<Ended, ConcordError> {
        if let Some(rolled_back) = self.enlist_postgres().await? {
            return Ok(rolled_back);
        }
        let asked = self.client().commit(self.commit_request()).await;
        match asked {
            Ok(answer) => Ok(self.committed(answer.into_inner().outcome)),
            Err(s) if proto::primary_hint(&s).is_some() || never_sent(&s) => {
                Ok(self.cut_off_ended(&s))
            }
            Err(s) if is_transport(&s) => Ok(self.learn_outcome(&s).await),
            Err(s) => self.commit_refused(&s),
        }
    }

    fn commit_request(&self) -> v1::CommitRequest {
        v1::CommitRequest {
            header: header(),
            xid: xid_text(self.xid),
        }
    }

    fn committed(&self, outcome: Option<v1::TxnOutcome>) -> Ended {
        ended_by(txn_outcome(self.xid, outcome))
    }

    fn commit_refused(&self, s: &tonic::Status) -> Result<Ended, ConcordError> {
        if proto::primary_hint(s).is_some() {
            return Ok(self.cut_off_ended(s));
        }
        match status::error(Some(self.xid), None, s) {
            ConcordError::RolledBack { branch, cause, .. } => {
                Ok(Ended::RolledBack { branch, cause })
            }
            ConcordError::Coordinator(CoordError::TimedOut { timeout_ms, .. }) => {
                Ok(Ended::RolledBack {
                    branch: None,
                    cause: RollbackCause::TimedOut { timeout_ms },
                })
            }
            other => Err(other),
        }
    }

    /// The outcome of a commit whose answer was lost (`cut`: how).
    async fn learn_outcome(&self, cut: &tonic::Status) -> Ended {
        let mut last = format!("{:?}: {}", cut.code(), cut.message());
        let mut backoff = Duration::from_millis(OUTCOME_BACKOFF_MS);
        for attempt in 1..=OUTCOME_ATTEMPTS_MAX {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            match self.ask_again().await {
                Ok(Some(ended)) => return ended,
                Ok(None) => last = "the daemon knows nothing of it".to_string(),
                Err(e) => last = e.to_string(),
            }
            tracing::debug!(xid = %self.xid, attempt, "the outcome of a commit is not known yet: {last}");
        }
        Ended::InDoubt {
            branch: None,
            cause: format!(
                "the answer to the commit was lost ({}), and its outcome could not be learnt in {OUTCOME_ATTEMPTS_MAX} attempts (last: {last}); ask Concord::outcome({}) later",
                cut.message(),
                self.xid
            ),
        }
    }

    /// Asks `Outcome` on a new connection to the transaction's node, and when that node cannot
    /// be reached, of the primary (when following one); `None`: nothing is known of the xid.
    async fn ask_again(&self) -> Result<Option<Ended>, ConcordError> {
        match self.reconnect().await {
            Ok(client) => self.ask_node(client).await,
            Err(e) if self.remote.follows => self.ask_primary().await.map_err(|_| e),
            Err(e) => Err(e),
        }
    }

    /// What the primary, found again, knows of the xid: it holds the decision when one was
    /// made and replicated. An xid it does not know, or holds open, is not known here.
    async fn ask_primary(&self) -> Result<Option<Ended>, ConcordError> {
        let (outcome, node) = self.remote.outcome_on_primary(self.xid).await?;
        tracing::debug!(xid = %self.xid, url = %node.url, "the primary says {outcome:?}");
        Ok(match outcome {
            TxnOutcome::Open | TxnOutcome::Unknown => None,
            known => Some(ended_by(known)),
        })
    }

    /// Asks `Outcome` of the transaction's node on `client`; sends the commit again when it
    /// never arrived. `None`: the daemon knows nothing of the xid.
    async fn ask_node(&self, client: Client) -> Result<Option<Ended>, ConcordError> {
        match outcome_on(client.clone(), self.xid).await? {
            TxnOutcome::Unknown => Ok(None),
            TxnOutcome::Open => {
                let mut client = client;
                let sent = tokio::time::timeout(
                    Duration::from_millis(OUTCOME_CALL_MS.saturating_mul(6)),
                    client.commit(self.commit_request()),
                )
                .await
                .map_err(|_| ConcordError::Unreachable {
                    message: "the commit sent again got no answer in time".into(),
                })?;
                match sent {
                    Ok(answer) => Ok(Some(self.committed(answer.into_inner().outcome))),
                    Err(s) if is_transport(&s) => Err(status::error(Some(self.xid), None, &s)),
                    Err(s) => self.commit_refused(&s).map(Some),
                }
            }
            known => Ok(Some(ended_by(known))),
        }
    }

    /// Asks the daemon to roll back. An answer lost on the transport is a rollback all the
    /// same: without a commit request the daemon only ever rolls back (at its timeout at the
    /// latest).
    pub(crate) async fn rollback(&self, reason: &str) -> Result<Ended, ConcordError> {
        self.roll_back_postgres().await;
        self.rollback_in_daemon(reason).await
    }

    async fn rollback_in_daemon(&self, reason: &str) -> Result<Ended, ConcordError> {
        let asked = self
            .client()
            .rollback(v1::RollbackRequest {
                header: header(),
                xid: xid_text(self.xid),
                reason: reason.to_string(),
            })
            .await;
        match asked {
            Ok(answer) => Ok(ended_by(txn_outcome(self.xid, answer.into_inner().outcome))),
            Err(s) if is_transport(&s) || proto::primary_hint(&s).is_some() => {
                Ok(Ended::RolledBack {
                    branch: None,
                    cause: RollbackCause::Requested {
                        reason: format!(
                            "{reason} (the daemon did not answer: {}; it rolls the transaction back at its timeout)",
                            s.message()
                        ),
                    },
                })
            }
            Err(s) => match status::error(Some(self.xid), None, &s) {
                ConcordError::Finished {
                    state: "committed", ..
                } => Ok(Ended::Committed(Committed {
                    xid: self.xid,
                    lsn: None,
                })),
                ConcordError::Coordinator(CoordError::TimedOut { timeout_ms, .. }) => {
                    Ok(Ended::RolledBack {
                        branch: None,
                        cause: RollbackCause::TimedOut { timeout_ms },
                    })
                }
                other => Err(other),
            },
        }
    }

    /// Rolls the transaction back in the background (it was dropped unfinished).
    pub(crate) fn abandon(self: Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Not awaited by anyone: the daemon rolls the transaction back at its timeout anyway;
        // this only frees its locks sooner.
        drop(runtime.spawn(async move {
            let _ = self.rollback("dropped by the application").await;
        }));
    }
}

/// Whether a failed call never left this process: the connection to the node could not be
/// opened, so the node never saw the request. tonic keeps only the connector's words
/// (`tcp connect error`, `Connection refused`), so they are what is checked; a status that
/// does not match is treated as sent (the careful side: the outcome is asked for).
fn never_sent(status: &tonic::Status) -> bool {
    let message = status.message().to_ascii_lowercase();
    status.code() == tonic::Code::Unavailable
        && proto::error_detail(status).ok().flatten().is_none()
        && (message.contains("tcp connect error")
            || message.contains("error trying to connect")
            || message.contains("connection refused"))
}

/// How a known outcome ends the transaction.
fn ended_by(outcome: TxnOutcome) -> Ended {
    match outcome {
        TxnOutcome::Committed(c) => Ended::Committed(c),
        TxnOutcome::RolledBack { cause } => Ended::RolledBack {
            branch: None,
            cause,
        },
        TxnOutcome::InDoubt { branch, cause } => Ended::InDoubt { branch, cause },
        TxnOutcome::Open | TxnOutcome::Unknown => Ended::InDoubt {
            branch: None,
            cause: "the daemon's outcome is neither committed nor rolled back".into(),
        },
    }
}

/// A branch on a store the daemon owns (files, mail, kv).
pub(crate) struct RemoteBranch {
    shared: Arc<Shared>,
    resource: String,
    kind: &'static str,
}

impl RemoteBranch {
    pub(crate) fn new(shared: Arc<Shared>, resource: &str, kind: &'static str) -> RemoteBranch {
        RemoteBranch {
            shared,
            resource: resource.to_string(),
            kind,
        }
    }

    pub(crate) fn resource(&self) -> &str {
        &self.resource
    }

    fn fail(&self, s: &tonic::Status) -> ConcordError {
        self.shared.error(self.kind, s)
    }

    fn upload_failed(&self, what: &str, e: upload::Upload) -> ConcordError {
        match e {
            upload::Upload::Call(s) => self.fail(&s),
            upload::Upload::Read(e) => ResourceError::rejected(
                self.resource.clone(),
                format!("read the content of {what}: {e}"),
            )
            .into(),
        }
    }

    pub(crate) async fn put(
        &self,
        path: &str,
        content: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<u64, ConcordError> {
        self.shared.check_open()?;
        let start = v1::FilesPutRequest {
            part: Some(v1::files_put_request::Part::Start(v1::FilesPutStart {
                target: self.shared.target(&self.resource),
                path: path.to_string(),
                size_bytes: None,
            })),
        };
        let chunk = |c| v1::FilesPutRequest {
            part: Some(v1::files_put_request::Part::Chunk(c)),
        };
        let mut client = self.shared.client();
        let put = upload::stream(start, content, self.shared.chunk_bytes, chunk, |s| {
            client.files_put(s)
        })
        .await
        .map_err(|e| self.upload_failed(path, e))?;
        Ok(put.size_bytes)
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<(), ConcordError> {
        self.shared.check_open()?;
        let request = v1::FilesDeleteRequest {
            target: self.shared.target(&self.resource),
            path: path.to_string(),
        };
        self.shared
            .client()
            .files_delete(request)
            .await
            .map_err(|s| self.fail(&s))?;
        Ok(())
    }

    pub(crate) async fn read(&self, path: &str) -> Result<Vec<u8>, ConcordError> {
        self.shared.check_open()?;
        let request = v1::FilesReadRequest {
            target: self.shared.target(&self.resource),
            path: path.to_string(),
        };
        let mut stream = self
            .shared
            .client()
            .files_read(request)
            .await
            .map_err(|s| self.fail(&s))?
            .into_inner();
        let mut content = Vec::new();
        let mut first = true;
        while let Some(piece) = stream.message().await.map_err(|s| self.fail(&s))? {
            if first && !piece.found {
                return Err(ResourceError::rejected(
                    self.resource.clone(),
                    format!("{path} not found in branch {}", self.shared.xid),
                )
                .into());
            }
            first = false;
            content.extend_from_slice(&piece.chunk);
        }
        Ok(content)
    }

    pub(crate) async fn enqueue(
        &self,
        message: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<adapters::mail::Enqueued, ConcordError> {
        self.shared.check_open()?;
        let start = v1::MailEnqueueRequest {
            part: Some(v1::mail_enqueue_request::Part::Start(
                self.shared.target(&self.resource).unwrap_or_default(),
            )),
        };
        let chunk = |c| v1::MailEnqueueRequest {
            part: Some(v1::mail_enqueue_request::Part::Chunk(c)),
        };
        let mut client = self.shared.client();
        let enqueued = upload::stream(start, message, self.shared.chunk_bytes, chunk, |s| {
            client.mail_enqueue(s)
        })
        .await
        .map_err(|e| self.upload_failed("the message", e))?;
        Ok(adapters::mail::Enqueued {
            name: enqueued.name,
            bytes: enqueued.size_bytes,
        })
    }

    pub(crate) async fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), ConcordError> {
        self.shared.check_open()?;
        let request = v1::KvInsertRequest {
            target: self.shared.target(&self.resource),
            key: key.to_vec(),
            value: value.to_vec(),
        };
        self.shared
            .client()
            .kv_insert(request)
            .await
            .map_err(|s| self.fail(&s))?;
        Ok(())
    }

    pub(crate) async fn remove(&self, key: &[u8]) -> Result<(), ConcordError> {
        self.shared.check_open()?;
        let request = v1::KvRemoveRequest {
            target: self.shared.target(&self.resource),
            key: key.to_vec(),
        };
        self.shared
            .client()
            .kv_remove(request)
            .await
            .map_err(|s| self.fail(&s))?;
        Ok(())
    }

    pub(crate) async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ConcordError> {
        self.shared.check_open()?;
        let request = v1::KvGetRequest {
            target: self.shared.target(&self.resource),
            key: key.to_vec(),
        };
        let got = self
            .shared
            .client()
            .kv_get(request)
            .await
            .map_err(|s| self.fail(&s))?;
        Ok(got.into_inner().value)
    }
}
