//! The branch handles: a transaction's work in one resource, through the resource's own API.
//!
//! Each handle checks before every call that its transaction is still open, and reports a call
//! that failed because the transaction timed out (or ended) meanwhile as that, not as the
//! resource's view of it.

use std::sync::Arc;

use adapters::Xid;
use adapters::files::FilesBranch;
use adapters::kv::KvBranch;
use adapters::mail::{Enqueued, MailBranch, MessageBuilder};
use adapters::postgres::PgBranch;
use coordinator::Coordinator;

use crate::error::ConcordError;

/// A transaction's branch in a files resource: put, delete and read files inside the transaction.
#[must_use = "a branch handle does nothing unless used"]
pub struct FilesHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: FilesBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl FilesHandle {
    pub(crate) fn new(
        (coordinator, xid): (Coordinator, Xid),
        branch: FilesBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> FilesHandle {
        FilesHandle {
            coordinator,
            xid,
            branch,
            _resource: resource,
        }
    }

    /// Writes `path` from `content`, streamed (a file of any size never sits in memory). Visible
    /// to others only when the transaction commits.
    pub async fn put(
        &self,
        path: &str,
        content: impl tokio::io::AsyncRead + Unpin + Send,
    ) -> Result<u64, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let put = self.branch.put(path, content).await;
        self.explain(put)
    }

    /// Deletes `path` when the transaction commits.
    pub async fn delete(&self, path: &str) -> Result<(), ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let deleted = self.branch.delete(path).await;
        self.explain(deleted)
    }

    /// Reads `path` as this transaction sees it (its own writes included).
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let read = self.branch.read(path).await;
        self.explain(read)
    }

    /// A branch call that failed because the transaction timed out (or ended) meanwhile reports
    /// that, not the resource's view of it.
    fn explain<T>(&self, result: Result<T, adapters::ResourceError>) -> Result<T, ConcordError> {
        result.map_err(|e| match self.coordinator.check_open(&self.xid) {
            Err(ended) => ended.into(),
            Ok(()) => e.into(),
        })
    }
}

/// A transaction's branch in a PostgreSQL resource: statements run in the branch's database
/// transaction, which commits (prepared, then committed) with the transaction.
#[must_use = "a branch handle does nothing unless used"]
pub struct PostgresHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: PgBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl PostgresHandle {
    pub(crate) fn new(
        (coordinator, xid): (Coordinator, Xid),
        branch: PgBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> PostgresHandle {
        PostgresHandle {
            coordinator,
            xid,
            branch,
            _resource: resource,
        }
    }

    /// Runs a statement; returns the number of rows it changed.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let done = self.branch.execute(sql, params).await;
        self.explain(done)
    }

    /// Runs a query.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let rows = self.branch.query(sql, params).await;
        self.explain(rows)
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let row = self.branch.query_one(sql, params).await;
        self.explain(row)
    }

    /// Runs several statements (no parameters, no results).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let done = self.branch.batch_execute(sql).await;
        self.explain(done)
    }

    fn explain<T>(&self, result: Result<T, adapters::ResourceError>) -> Result<T, ConcordError> {
        result.map_err(|e| match self.coordinator.check_open(&self.xid) {
            Err(ended) => ended.into(),
            Ok(()) => e.into(),
        })
    }
}

/// A transaction's branch in a mail queue: enqueue messages, delivered when the transaction
/// commits (each exactly once, whatever crashes and retries happen on the way).
#[must_use = "a branch handle does nothing unless used"]
pub struct MailHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: MailBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl MailHandle {
    pub(crate) fn new(
        (coordinator, xid): (Coordinator, Xid),
        branch: MailBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> MailHandle {
        MailHandle {
            coordinator,
            xid,
            branch,
            _resource: resource,
        }
    }

    /// Streams an RFC 5322 message (raw bytes, a file, any reader) into the branch; refused,
    /// with nothing left behind, when it is not a valid message or is over `max_message_bytes`
    /// (see `adapters::mail`). Returns the Maildir file name it will be delivered under.
    pub async fn enqueue(
        &self,
        message: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<Enqueued, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let enqueued = self.branch.enqueue(message).await;
        self.explain(enqueued)
    }

    /// Builds the message of `builder` and enqueues it; refused like [`MailHandle::enqueue`],
    /// and when the builder's fields cannot make a message (a newline in a field, no recipient).
    pub async fn enqueue_built(&self, builder: &MessageBuilder) -> Result<Enqueued, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let enqueued = self.branch.enqueue_built(builder).await;
        self.explain(enqueued)
    }

    fn explain<T>(&self, result: Result<T, adapters::ResourceError>) -> Result<T, ConcordError> {
        result.map_err(|e| match self.coordinator.check_open(&self.xid) {
            Err(ended) => ended.into(),
            Ok(()) => e.into(),
        })
    }
}

/// A transaction's branch in a kv resource: insert, remove and read keys inside the transaction.
/// Each key written stays locked against other transactions until this one ends.
#[must_use = "a branch handle does nothing unless used"]
pub struct KvHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: KvBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl KvHandle {
    pub(crate) fn new(
        (coordinator, xid): (Coordinator, Xid),
        branch: KvBranch,
        resource: Arc<dyn adapters::Resource>,
    ) -> KvHandle {
        KvHandle {
            coordinator,
            xid,
            branch,
            _resource: resource,
        }
    }

    /// Sets `key` to `value` when the transaction commits; waits (at most the resource's
    /// `lock_wait_ms`) for a key another transaction writes. Refused when the key or value is
    /// over its limit.
    pub async fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let inserted = self.branch.insert(key, value).await;
        self.explain(inserted)
    }

    /// Removes `key` when the transaction commits.
    pub async fn remove(&self, key: &[u8]) -> Result<(), ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let removed = self.branch.remove(key).await;
        self.explain(removed)
    }

    /// The value of `key` as this transaction sees it (its own writes first).
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ConcordError> {
        self.coordinator.check_open(&self.xid)?;
        let value = self.branch.get(key).await;
        self.explain(value)
    }

    fn explain<T>(&self, result: Result<T, adapters::ResourceError>) -> Result<T, ConcordError> {
        result.map_err(|e| match self.coordinator.check_open(&self.xid) {
            Err(ended) => ended.into(),
            Ok(()) => e.into(),
        })
    }
}
