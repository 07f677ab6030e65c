//! The branch handles: a transaction's work in one resource, through the resource's own API.
//!
//! Each handle checks before every call that its transaction is still open, and reports a call
//! that failed because the transaction timed out (or ended) meanwhile as that, not as the
//! resource's view of it. A handle runs its branch here ([`Local`]: embedded mode, and a
//! PostgreSQL branch in remote mode) or in the daemon ([`RemoteBranch`]: files, mail and kv
//! in remote mode); one `match` per call picks the side, the work itself is written once on
//! each side.

use std::sync::Arc;

use adapters::Xid;
use adapters::files::FilesBranch;
use adapters::kv::KvBranch;
use adapters::mail::{Enqueued, MailBranch, MessageBuilder};
use adapters::postgres::PgBranch;
use coordinator::Coordinator;

use crate::error::ConcordError;
use crate::remote::{RemoteBranch, Shared};

/// What tells a handle whether its transaction is still open.
pub(crate) enum Gate {
    /// The coordinator of this process.
    Embedded(Coordinator, Xid),
    /// The remote transaction's own record of having ended.
    Remote(Arc<Shared>),
}

impl Gate {
    fn check_open(&self) -> Result<(), ConcordError> {
        match self {
            Gate::Embedded(coordinator, xid) => Ok(coordinator.check_open(xid)?),
            Gate::Remote(shared) => shared.check_open(),
        }
    }
}

/// A branch run in this process.
pub(crate) struct Local<B> {
    gate: Gate,
    branch: B,
    _resource: Arc<dyn adapters::Resource>,
}

impl<B> Local<B> {
    pub(crate) fn new(gate: Gate, branch: B, resource: Arc<dyn adapters::Resource>) -> Local<B> {
        Local {
            gate,
            branch,
            _resource: resource,
        }
    }

    /// The branch, once its transaction is checked open.
    fn open(&self) -> Result<&B, ConcordError> {
        self.gate.check_open()?;
        Ok(&self.branch)
    }

    /// A branch call that failed because the transaction timed out (or ended) meanwhile
    /// reports that, not the resource's view of it.
    fn explain<T>(&self, result: Result<T, adapters::ResourceError>) -> Result<T, ConcordError> {
        result.map_err(|e| match self.gate.check_open() {
            Err(ended) => ended,
            Ok(()) => e.into(),
        })
    }
}

/// Where a handle's branch runs.
enum Side<B> {
    Local(Local<B>),
    Remote(RemoteBranch),
}

/// A transaction's branch in a files resource: put, delete and read files inside the transaction.
#[must_use = "a branch handle does nothing unless used"]
pub struct FilesHandle {
    side: Side<FilesBranch>,
}

impl FilesHandle {
    pub(crate) fn new(
        gate: Gate,
        branch: FilesBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> FilesHandle {
        FilesHandle {
            side: Side::Local(Local::new(gate, branch, resource)),
        }
    }

    pub(crate) fn remote(branch: RemoteBranch) -> FilesHandle {
        FilesHandle {
            side: Side::Remote(branch),
        }
    }

    /// Writes `path` from `content`, streamed (a file of any size never sits in memory). Visible
    /// to others only when the transaction commits.
    pub async fn put(
        &self,
        path: &str,
        content: impl tokio::io::AsyncRead + Unpin + Send,
    ) -> Result<u64, ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let put = local.open()?.put(path, content).await;
                local.explain(put)
            }
            Side::Remote(remote) => remote.put(path, content).await,
        }
    }

    /// Deletes `path` when the transaction commits.
    pub async fn delete(&self, path: &str) -> Result<(), ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let deleted = local.open()?.delete(path).await;
                local.explain(deleted)
            }
            Side::Remote(remote) => remote.delete(path).await,
        }
    }

    /// Reads `path` as this transaction sees it (its own writes included).
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let read = local.open()?.read(path).await;
                local.explain(read)
            }
            Side::Remote(remote) => remote.read(path).await,
        }
    }
}

/// A transaction's branch in a PostgreSQL resource: statements run in the branch's database
/// transaction, which commits (prepared, then committed) with the transaction.
#[must_use = "a branch handle does nothing unless used"]
pub struct PostgresHandle {
    local: Local<PgBranch>,
}

impl PostgresHandle {
    pub(crate) fn new(
        gate: Gate,
        branch: PgBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> PostgresHandle {
        PostgresHandle {
            local: Local::new(gate, branch, resource),
        }
    }

    /// Runs a statement; returns the number of rows it changed.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, ConcordError> {
        let local = &self.local;
        let done = local.open()?.execute(sql, params).await;
        local.explain(done)
    }

    /// Runs a query.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ConcordError> {
        let local = &self.local;
        let rows = local.open()?.query(sql, params).await;
        local.explain(rows)
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, ConcordError> {
        let local = &self.local;
        let row = local.open()?.query_one(sql, params).await;
        local.explain(row)
    }

    /// Runs several statements (no parameters, no results).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), ConcordError> {
        let local = &self.local;
        let done = local.open()?.batch_execute(sql).await;
        local.explain(done)
    }
}

/// A transaction's branch in a mail queue: enqueue messages, delivered when the transaction
/// commits (each exactly once, whatever crashes and retries happen on the way).
#[must_use = "a branch handle does nothing unless used"]
pub struct MailHandle {
    side: Side<MailBranch>,
}

impl MailHandle {
    pub(crate) fn new(
        gate: Gate,
        branch: MailBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> MailHandle {
        MailHandle {
            side: Side::Local(Local::new(gate, branch, resource)),
        }
    }

    pub(crate) fn remote(branch: RemoteBranch) -> MailHandle {
        MailHandle {
            side: Side::Remote(branch),
        }
    }

    /// Streams an RFC 5322 message (raw bytes, a file, any reader) into the branch; refused,
    /// with nothing left behind, when it is not a valid message or is over `max_message_bytes`
    /// (see `adapters::mail`). Returns the Maildir file name it will be delivered under.
    pub async fn enqueue(
        &self,
        message: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<Enqueued, ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let enqueued = local.open()?.enqueue(message).await;
                local.explain(enqueued)
            }
            Side::Remote(remote) => remote.enqueue(message).await,
        }
    }

    /// Builds the message of `builder` and enqueues it; refused like [`MailHandle::enqueue`],
    /// and when the builder's fields cannot make a message (a newline in a field, no recipient).
    pub async fn enqueue_built(&self, builder: &MessageBuilder) -> Result<Enqueued, ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let enqueued = local.open()?.enqueue_built(builder).await;
                local.explain(enqueued)
            }
            Side::Remote(remote) => {
                let message = builder.build().map_err(|e| {
                    adapters::ResourceError::rejected(
                        remote.resource(),
                        format!("message refused: {e}"),
                    )
                })?;
                remote.enqueue(&message[..]).await
            }
        }
    }
}

/// A transaction's branch in a kv resource: insert, remove and read keys inside the transaction.
/// Each key written stays locked against other transactions until this one ends.
#[must_use = "a branch handle does nothing unless used"]
pub struct KvHandle {
    side: Side<KvBranch>,
}

impl KvHandle {
    pub(crate) fn new(
        gate: Gate,
        branch: KvBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> KvHandle {
        KvHandle {
            side: Side::Local(Local::new(gate, branch, resource)),
        }
    }

    pub(crate) fn remote(branch: RemoteBranch) -> KvHandle {
        KvHandle {
            side: Side::Remote(branch),
        }
    }

    /// Sets `key` to `value` when the transaction commits; waits (at most the resource's
    /// `lock_wait_ms`) for a key another transaction writes. Refused when the key or value is
    /// over its limit.
    pub async fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let inserted = local.open()?.insert(key, value).await;
                local.explain(inserted)
            }
            Side::Remote(remote) => remote.insert(key, value).await,
        }
    }

    /// Removes `key` when the transaction commits.
    pub async fn remove(&self, key: &[u8]) -> Result<(), ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let removed = local.open()?.remove(key).await;
                local.explain(removed)
            }
            Side::Remote(remote) => remote.remove(key).await,
        }
    }

    /// The value of `key` as this transaction sees it (its own writes first).
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ConcordError> {
        match &self.side {
            Side::Local(local) => {
                let value = local.open()?.get(key).await;
                local.explain(value)
            }
            Side::Remote(remote) => remote.get(key).await,
        }
    }
}
