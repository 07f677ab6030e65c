//! Following the primary: a client that knows several nodes ([`crate::Concord::connect_any`])
//! finds the one that is primary, and finds it again after a failover.
//!
//! The idea: the calls that start work (`Begin`) or only ask (`Outcome`) may go to any node, so
//! they go to the node taken as primary and, when it answers "not the primary" or does not
//! answer, to the next candidate: the node it names as primary ([`proto::primary_hint`]), else
//! the next URL of the list. A candidate is taken once it answers `Status` as a primary (a
//! standby's `Status` names its primary, followed as a hint). Between rounds the search waits a
//! backoff ([`FOLLOW_BACKOFF_FIRST_MS`], doubling to [`FOLLOW_BACKOFF_MAX_MS`]), and gives up
//! after `failover_wait_ms` with [`ConcordError::NoPrimary`], which names every URL tried and
//! its last answer.
//!
//! The calls of a transaction that began do not follow: its xid lives on the node that began
//! it, so they stay there (`Node`, pinned in the transaction), and what a failover does to it
//! is reported by the commit (see [`super`]).
//!
//! # Caveats
//!
//! * A hint is followed wherever it points, with the same credentials (token and TLS
//!   settings): the nodes of one cluster are trusted alike.
//! * A node that answers `Status` with an error other than not-primary (a daemon that keeps
//!   `Status` for operators) is taken: its first `Begin` tells.
//! * Each call of the search is bounded by what is left of `failover_wait_ms`; a `Begin`
//!   cut off by that bound may have begun a transaction there, which the node rolls back at its
//!   timeout.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use proto::client::{Client, Credentials};
use proto::v1::{self, Role};

use super::{header, is_transport, status};
use crate::error::{ConcordError, NodeTried};

/// How long the calls that start work keep looking for a primary by default (milliseconds).
pub const FAILOVER_WAIT_MS_DEFAULT: u64 = 5_000;
/// The first wait between two rounds of the search (milliseconds); it doubles.
pub const FOLLOW_BACKOFF_FIRST_MS: u64 = 50;
/// The longest wait between two rounds of the search (milliseconds).
pub const FOLLOW_BACKOFF_MAX_MS: u64 = 500;
/// The longest one node's `Status` may take during a search: a node that does not answer by
/// then (paused, its kernel still accepting connections) is passed over for the next.
pub const PROBE_MS_MAX: u64 = 1_000;

/// One node: its URL and a client of it (connecting at its first call).
#[derive(Clone)]
pub(crate) struct Node {
    pub url: String,
    pub client: Client,
}

/// Why a node was passed over.
pub(crate) enum Refusal {
    /// It is not the primary; it named the primary when it knew it.
    NotPrimary(Option<String>),
    /// It did not answer (refused, broken, or past the deadline).
    Unreachable(String),
}

impl Refusal {
    fn hint(&self) -> Option<&str> {
        match self {
            Refusal::NotPrimary(hint) => hint.as_deref(),
            Refusal::Unreachable(_) => None,
        }
    }

    fn answer(&self) -> String {
        match self {
            Refusal::NotPrimary(Some(url)) => format!("not the primary (it named {url})"),
            Refusal::NotPrimary(None) => "not the primary (it named none)".to_string(),
            Refusal::Unreachable(why) => format!("no answer ({why})"),
        }
    }

    /// How a failed call counts in the search: `None` when it is an answer to give the caller.
    pub(crate) fn of(status: &tonic::Status) -> Option<Refusal> {
        if let Some(hint) = proto::primary_hint(status) {
            return Some(Refusal::NotPrimary(hint.primary));
        }
        is_transport(status)
            .then(|| Refusal::Unreachable(format!("{:?}: {}", status.code(), status.message())))
    }
}

/// The nodes a client knows, and how long it looks for the primary among them.
pub(crate) struct Nodes {
    pub urls: Vec<String>,
    pub credentials: Credentials,
    pub failover_wait_ms: u64,
}

/// One search: its deadline, what each URL answered, and the backoff.
pub(crate) struct Search {
    started: Instant,
    deadline: Instant,
    tried: Vec<NodeTried>,
    since_wait: BTreeSet<String>,
    backoff: Duration,
}

impl Search {
    pub(crate) fn new(failover_wait_ms: u64) -> Search {
        let started = Instant::now();
        Search {
            started,
            deadline: started + Duration::from_millis(failover_wait_ms),
            tried: Vec::new(),
            since_wait: BTreeSet::new(),
            backoff: Duration::from_millis(FOLLOW_BACKOFF_FIRST_MS),
        }
    }

    /// What is left of the wait.
    pub(crate) fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Notes that `url` answered `refusal`.
    pub(crate) fn note(&mut self, url: &str, refusal: &Refusal) {
        tracing::debug!(
            url,
            "passed over in the search for the primary: {}",
            refusal.answer()
        );
        self.since_wait.insert(url.to_string());
        match self.tried.iter_mut().find(|t| t.url == url) {
            Some(tried) => {
                tried.answer = refusal.answer();
                tried.attempts += 1;
            }
            None => self.tried.push(NodeTried {
                url: url.to_string(),
                answer: refusal.answer(),
                attempts: 1,
            }),
        }
    }

    /// The error once the wait is over.
    fn gave_up(&mut self) -> ConcordError {
        ConcordError::NoPrimary {
            waited_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            tried: std::mem::take(&mut self.tried),
        }
    }

    /// Waits the backoff before trying `url` again in this round, unless the wait is over.
    async fn pace(&mut self, url: &str) -> Result<(), ConcordError> {
        if self.left().is_zero() && !self.tried.is_empty() {
            return Err(self.gave_up());
        }
        if self.since_wait.contains(url) {
            tokio::time::sleep(self.backoff.min(self.left())).await;
            self.backoff = (self.backoff * 2).min(Duration::from_millis(FOLLOW_BACKOFF_MAX_MS));
            self.since_wait.clear();
        }
        Ok(())
    }
}

impl Nodes {
    /// One daemon, not followed anywhere.
    pub(crate) fn one(url: &str, credentials: Credentials) -> Nodes {
        Nodes {
            urls: vec![url.to_string()],
            credentials,
            failover_wait_ms: 0,
        }
    }

    /// The candidate after `url` passed over with `refusal`: the node it named, else the next
    /// URL of the list.
    fn next_after(&self, url: &str, refusal: &Refusal) -> String {
        if let Some(hint) = refusal.hint().filter(|h| *h != url) {
            return hint.to_string();
        }
        let at = self.urls.iter().position(|u| u == url);
        let next = at.map_or(0, |i| (i + 1) % self.urls.len());
        self.urls[next].clone()
    }

    /// The node that answers as the primary, trying `url` first and, after it, the candidate
    /// each refusal points to.
    pub(crate) async fn find(
        &self,
        mut url: String,
        search: &mut Search,
    ) -> Result<(Node, Option<v1::StatusResponse>), ConcordError> {
        loop {
            search.pace(&url).await?;
            match self.probe(&url, search.left()).await? {
                Ok(found) => return Ok(found),
                Err(refusal) => {
                    search.note(&url, &refusal);
                    url = self.next_after(&url, &refusal);
                }
            }
        }
    }

    /// The search again after `node` refused a call with `refusal`.
    pub(crate) async fn find_after(
        &self,
        node: &Node,
        refusal: &Refusal,
        search: &mut Search,
    ) -> Result<Node, ConcordError> {
        search.note(&node.url, refusal);
        let next = self.next_after(&node.url, refusal);
        Ok(self.find(next, search).await?.0)
    }

    /// Asks `url` for its `Status` within `left`: the node and its status when it is the
    /// primary (or would not say), a refusal otherwise; an error for what no other node cures
    /// (a malformed URL, refused credentials).
    async fn probe(
        &self,
        url: &str,
        left: Duration,
    ) -> Result<Result<(Node, Option<v1::StatusResponse>), Refusal>, ConcordError> {
        let node = Node {
            url: url.to_string(),
            client: proto::client::connect_lazy(url, &self.credentials)?,
        };
        let mut client = node.client.clone();
        let asked = client.status(v1::StatusRequest { header: header() });
        let left = left.min(Duration::from_millis(PROBE_MS_MAX));
        let answer = match tokio::time::timeout(left, asked).await {
            Ok(answer) => answer,
            Err(_) => {
                return Ok(Err(Refusal::Unreachable(format!(
                    "Status got no answer within {} ms",
                    left.as_millis()
                ))));
            }
        };
        match answer {
            Ok(status) => Ok(primary_or_refusal(node, status.into_inner())),
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                Err(status::error(None, None, &s))
            }
            Err(s) => match Refusal::of(&s) {
                Some(refusal) => Ok(Err(refusal)),
                None => Ok(Ok((node, None))),
            },
        }
    }
}

/// A node whose `Status` says standby is refused, naming the primary it follows.
fn primary_or_refusal(
    node: Node,
    status: v1::StatusResponse,
) -> Result<(Node, Option<v1::StatusResponse>), Refusal> {
    if status.role != Role::Standby as i32 {
        return Ok((node, Some(status)));
    }
    let primary = status
        .replication
        .as_ref()
        .map(|r| r.primary.trim().to_string())
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.contains("://") {
                p
            } else {
                format!("http://{p}")
            }
        });
    Err(Refusal::NotPrimary(primary))
}

/// Runs `call` on `node`, bounded by what is left of the search.
pub(crate) async fn bounded<T, Fut>(search: &Search, call: Fut) -> Result<T, tonic::Status>
where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let left = search.left();
    match tokio::time::timeout(left, call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {} ms",
            left.as_millis()
        ))),
    }
}
