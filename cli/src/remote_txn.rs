//! One transaction through a coordinator daemon, over the generated gRPC client that
//! [`proto::client`] connects: what `concord bench commit --remote` runs in its tasks (the
//! remote demo's clients use the participant library, `Concord::connect`).
//!
//! A [`RemoteTxn`] is begun with `Begin`, writes with `FilesPut` and `MailEnqueue` (each content
//! sent as the start message and one chunk: the benchmark's contents are far below the
//! daemon's chunk limit) and `KvInsert`, and ends with `Commit`. A commit's result is sorted as
//! the embedded demo sorts it ([`Ended`]): committed, rolled back
//! (an error status whose detail is `ROLLED_BACK`) or in doubt (an OK answer that says so);
//! anything else is an error.
//!
//! Every call carries a deadline of [`CALL_MS_MAX`].
//!
//! # Implementation caveats
//!
//! * A connection lost after the commit request is an error here (the participant library's
//!   remote mode asks `Outcome` itself before reporting in doubt); only the benchmark uses this
//!   module now.
//! * A content larger than the daemon's `chunk_bytes_max` is refused by the daemon, not split.

use std::time::Duration;

use anyhow::{Context, bail};
use proto::client::Client;
use proto::v1::{self, RequestHeader, txn_outcome::State};
use tonic::codegen::tokio_stream;

/// The deadline of every call (milliseconds): above the daemon's own request timeout.
pub(crate) const CALL_MS_MAX: u64 = 60_000;

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Committed.
    Committed,
    /// Rolled back (on request, or by the commit).
    RolledBack,
    /// Whether it committed is not known.
    InDoubt,
}

/// An open transaction of a daemon.
pub(crate) struct RemoteTxn {
    client: Client,
    xid: String,
    name: &'static str,
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_millis(CALL_MS_MAX));
    request
}

impl RemoteTxn {
    /// Begins a transaction; `name` is the client's name in the daemon's logs.
    pub(crate) async fn begin(client: &Client, name: &'static str) -> anyhow::Result<RemoteTxn> {
        let mut client = client.clone();
        let begun = client
            .begin(request(v1::BeginRequest {
                header: Some(RequestHeader::current(name)),
                timeout_ms: None,
            }))
            .await
            .context("begin a transaction")?
            .into_inner();
        Ok(RemoteTxn {
            client,
            xid: begun.xid,
            name,
        })
    }

    fn target(&self, resource: &str) -> Option<v1::BranchTarget> {
        Some(v1::BranchTarget {
            header: Some(RequestHeader::current(self.name)),
            xid: self.xid.clone(),
            resource: resource.to_string(),
        })
    }

    /// Writes `content` at `path` in the files resource `resource`.
    pub(crate) async fn put(
        &mut self,
        resource: &str,
        path: &str,
        content: Vec<u8>,
    ) -> Result<(), tonic::Status> {
        use v1::files_put_request::Part;
        let start = v1::FilesPutStart {
            target: self.target(resource),
            path: path.to_string(),
            size_bytes: Some(content.len() as u64),
        };
        let messages = [Part::Start(start), Part::Chunk(content)]
            .map(|part| v1::FilesPutRequest { part: Some(part) });
        self.client
            .files_put(request(tokio_stream::iter(messages)))
            .await?;
        Ok(())
    }

    /// Enqueues the RFC 5322 `message` in the mail resource `resource`.
    pub(crate) async fn enqueue(
        &mut self,
        resource: &str,
        message: Vec<u8>,
    ) -> Result<(), tonic::Status> {
        use v1::mail_enqueue_request::Part;
        let start = self.target(resource).unwrap_or_default();
        let messages = [Part::Start(start), Part::Chunk(message)]
            .map(|part| v1::MailEnqueueRequest { part: Some(part) });
        self.client
            .mail_enqueue(request(tokio_stream::iter(messages)))
            .await?;
        Ok(())
    }

    /// Inserts `key` with `value` in the kv resource `resource`.
    pub(crate) async fn insert(
        &mut self,
        resource: &str,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), tonic::Status> {
        let call = v1::KvInsertRequest {
            target: self.target(resource),
            key,
            value,
        };
        self.client.kv_insert(request(call)).await?;
        Ok(())
    }

    /// Commits: committed, in doubt, or rolled back by the commit.
    pub(crate) async fn commit(mut self) -> anyhow::Result<Ended> {
        let call = v1::CommitRequest {
            header: Some(RequestHeader::current(self.name)),
            xid: self.xid.clone(),
        };
        match self.client.commit(request(call)).await {
            Ok(answer) => ended(answer.into_inner().outcome, &self.xid),
            Err(status) if rolled_back(&status) => Ok(Ended::RolledBack),
            Err(status) => Err(status).with_context(|| format!("commit transaction {}", self.xid)),
        }
    }
}

/// Whether `status` says the commit rolled the transaction back.
fn rolled_back(status: &tonic::Status) -> bool {
    matches!(
        proto::error_detail(status),
        Ok(Some(detail)) if detail.code == v1::ErrorCode::RolledBack as i32
            || detail.code == v1::ErrorCode::AlreadyRolledBack as i32
    )
}

fn ended(outcome: Option<v1::TxnOutcome>, xid: &str) -> anyhow::Result<Ended> {
    match outcome.and_then(|o| o.state) {
        Some(State::Committed(_)) => Ok(Ended::Committed),
        Some(State::RolledBack(_)) => Ok(Ended::RolledBack),
        Some(State::InDoubt(_)) => Ok(Ended::InDoubt),
        other => bail!("transaction {xid}: the daemon answered the outcome {other:?}"),
    }
}
