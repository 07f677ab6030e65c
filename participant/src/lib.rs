//! What application servers link: a [`Concord`] handle, [`Transaction`]s and branch handles.
//!
//! ```no_run
//! # async fn example() -> Result<(), participant::ConcordError> {
//! use participant::{Concord, Config};
//! let concord = Concord::open(Config::load("concord.toml".as_ref())?).await?;
//! let mut tx = concord.begin();
//! let uploads = tx.files("uploads").await?;
//! uploads.put("invoices/42.pdf", &b"%PDF-1.7 ..."[..]).await?;
//! let outbox = tx.mail("outbox").await?;
//! let confirmation = participant::MessageBuilder::new()
//!     .from("Shop <shop@example.org>")
//!     .to("alice@example.org")
//!     .subject("Your order 42")
//!     .body("Thank you.\n");
//! outbox.enqueue_built(&confirmation).await?;
//! let index = tx.kv("index").await?;
//! index.insert(b"order/42", b"invoices/42.pdf").await?;
//! tx.commit().await?; // every branch, or none
//! # Ok(()) }
//! ```
//!
//! This is the embedded mode: the coordinator runs in the application's process, on the
//! application's tokio runtime, with its journal in the configured data directory. (Remote mode,
//! over gRPC, comes later with the same API.) A transaction joins a resource the first time the
//! application asks for its handle; committing runs two-phase commit over every joined resource;
//! dropping a transaction that was neither committed nor rolled back rolls it back.
//!
//! Each kind of resource in `concord.toml` ([`config`]) has its typed branch handle:
//! [`Transaction::files`] ([`FilesHandle`]), [`Transaction::postgres`] ([`PostgresHandle`]),
//! [`Transaction::mail`] ([`MailHandle`]) and [`Transaction::kv`] ([`KvHandle`]). Asking for a
//! name the configuration does not have is a coordinator error naming it; asking for a name of
//! another kind is [`ConcordError::WrongKind`].
//!
//! # Implementation caveats
//!
//! * Resources open one after the other, in name order; a kv resource whose sled directory an
//!   instance dropped a moment before in this process waits for it (`open_wait_ms_max`).

pub use adapters::config;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use adapters::Xid;
use adapters::files::{FilesBranch, FilesResource};
use adapters::kv::{KvBranch, KvResource};
use adapters::mail::{MailBranch, MailResource};
use adapters::postgres::{PgBranch, PostgresResource};
use coordinator::{
    CoordError, Coordinator, CoordinatorConfig, Outcome, RecoveryReport, RetryPolicy,
};
use journal::Epoch;

pub use adapters::mail::{Enqueued, MessageBuilder};
pub use config::{Config, ConfigError, ResourceConfig};

/// Errors of the participant API.
#[derive(Debug, thiserror::Error)]
pub enum ConcordError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] CoordError),
    /// A resource refused or failed.
    #[error(transparent)]
    Resource(#[from] adapters::ResourceError),
    /// The journal could not be opened.
    #[error("open journal: {0}")]
    Journal(#[from] journal::JournalError),
    /// The resource exists but is of another kind than the handle asked for.
    #[error("resource {name:?} is not a {expected} resource")]
    WrongKind {
        /// The resource.
        name: String,
        /// The kind the handle needs.
        expected: &'static str,
    },
    /// The transaction was already committed or rolled back.
    #[error("transaction {xid} is already {state}; it accepts no more work")]
    Finished {
        /// The transaction.
        xid: Xid,
        /// How it ended.
        state: &'static str,
    },
}

/// An embedded concord: the coordinator, its journal and the configured resources.
#[derive(Clone)]
pub struct Concord {
    coordinator: Coordinator,
    recovery: Arc<RecoveryReport>,
}

impl Concord {
    /// Opens the journal and the resources of `config` and recovers (see
    /// [`coordinator::runtime`]). Must be called inside a tokio runtime.
    pub async fn open(config: Config) -> Result<Concord, ConcordError> {
        let journal_dir = config.data_dir.join("journal");
        let (journal, ledger) = tokio::task::spawn_blocking(move || {
            coordinator::runtime::open_journal(&journal_dir, coordinator::runtime::journal_config())
        })
        .await
        .map_err(|e| CoordError::Refused(format!("open journal: {e}")))??;
        let resources = config::open_all(&config).await.map_err(opening_failed)?;
        let coordinator_config = CoordinatorConfig {
            node: config.node,
            epoch: Epoch(config.epoch),
            txn_timeout_ms: config.txn_timeout_ms,
            retry: RetryPolicy::default(),
            orphan_sweep_ms: config.orphan_sweep_ms,
            one_phase: config.one_phase,
            call_timeout_ms: config.call_timeout_ms,
            ..CoordinatorConfig::default()
        };
        let (coordinator, recovery) =
            Coordinator::open_recovered(coordinator_config, journal, ledger, resources).await?;
        Ok(Concord {
            coordinator,
            recovery: Arc::new(recovery),
        })
    }

    /// Reads `path` and opens it.
    pub async fn open_file(path: &Path) -> Result<Concord, ConcordError> {
        Concord::open(Config::load(path)?).await
    }

    /// What recovery found when this concord opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The coordinator (for operator views).
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Begins a transaction.
    pub fn begin(&self) -> Transaction {
        Transaction {
            coordinator: self.coordinator.clone(),
            xid: self.coordinator.begin(),
            ended: None,
        }
    }

    /// Waits (at most `timeout`) for phase 2 and recovery work in the background to finish;
    /// returns whether it did.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        self.coordinator.wait_settled(timeout).await
    }

    /// Stops background work (it resumes at the next open) and closes the journal: every record
    /// appended so far is durable, and the journal's directory free for another process, when it
    /// returns `true`, even while [`Transaction`]s of this handle live (their commits fail from
    /// then on). The resources (their files and locks) are let go when the last handle — this
    /// one's clones and every transaction's — is dropped. Returns whether it all happened within
    /// `timeout`.
    pub async fn close(self, timeout: Duration) -> bool {
        self.coordinator.shutdown(timeout).await
    }
}

/// An [`OpenError`](config::OpenError) as the participant has always reported it: a resource's
/// own refusal as [`ConcordError::Resource`], anything else as the coordinator refusing to start.
fn opening_failed(error: config::OpenError) -> ConcordError {
    match error {
        config::OpenError::Resource { source, .. } => ConcordError::Resource(source),
        other => CoordError::Refused(other.to_string()).into(),
    }
}

/// One transaction; see the crate docs.
pub struct Transaction {
    coordinator: Coordinator,
    xid: Xid,
    /// The outcome once committed or rolled back.
    ended: Option<Result<Outcome, String>>,
}

impl Transaction {
    /// Its xid.
    pub fn xid(&self) -> Xid {
        self.xid
    }

    /// The branch handle of the files resource `name`, joining it to the transaction.
    pub async fn files(&self, name: &str) -> Result<FilesHandle, ConcordError> {
        let (branch, resource) = self
            .join_as(name, "files", |files: &FilesResource| {
                Ok(files.branch(&self.xid))
            })
            .await?;
        Ok(FilesHandle {
            coordinator: self.coordinator.clone(),
            xid: self.xid,
            branch,
            _resource: resource,
        })
    }

    /// The branch handle of the PostgreSQL resource `name`, joining it to the transaction: its
    /// statements run in the branch's own database transaction.
    pub async fn postgres(&self, name: &str) -> Result<PostgresHandle, ConcordError> {
        let (branch, resource) = self
            .join_as(name, "postgres", |pg: &PostgresResource| {
                Ok(pg.branch(&self.xid)?)
            })
            .await?;
        Ok(PostgresHandle {
            coordinator: self.coordinator.clone(),
            xid: self.xid,
            branch,
            _resource: resource,
        })
    }

    /// The branch handle of the mail queue `name`, joining it to the transaction: the messages
    /// it enqueues are delivered (into the Maildir's `new/`) when the transaction commits.
    pub async fn mail(&self, name: &str) -> Result<MailHandle, ConcordError> {
        let (branch, resource) = self
            .join_as(name, "mail", |mail: &MailResource| {
                Ok(mail.branch(&self.xid))
            })
            .await?;
        Ok(MailHandle {
            coordinator: self.coordinator.clone(),
            xid: self.xid,
            branch,
            _resource: resource,
        })
    }

    /// The branch handle of the kv resource `name`, joining it to the transaction: its inserts
    /// and removes appear in the store when the transaction commits.
    pub async fn kv(&self, name: &str) -> Result<KvHandle, ConcordError> {
        let (branch, resource) = self
            .join_as(name, "kv", |kv: &KvResource| Ok(kv.branch(&self.xid)))
            .await?;
        Ok(KvHandle {
            coordinator: self.coordinator.clone(),
            xid: self.xid,
            branch,
            _resource: resource,
        })
    }

    /// Joins resource `name` to the transaction and makes a branch handle of it with `make`,
    /// when it is an `R`; otherwise [`ConcordError::WrongKind`] naming `expected`.
    async fn join_as<R: 'static, B>(
        &self,
        name: &str,
        expected: &'static str,
        make: impl FnOnce(&R) -> Result<B, ConcordError>,
    ) -> Result<(B, Arc<dyn adapters::Resource>), ConcordError> {
        self.check_not_ended()?;
        let resource = self.coordinator.join(&self.xid, name).await?;
        let Some(typed) = resource.as_any().downcast_ref::<R>() else {
            return Err(ConcordError::WrongKind {
                name: name.to_string(),
                expected,
            });
        };
        let branch = make(typed)?;
        Ok((branch, resource))
    }

    /// Commits: returns the outcome once it is known. Committing again returns the first
    /// outcome.
    pub async fn commit(&mut self) -> Result<Outcome, ConcordError> {
        if let Some(ended) = &self.ended {
            return ended.clone().map_err(|e| CoordError::Refused(e).into());
        }
        let result = self.coordinator.commit(&self.xid).await;
        self.record(result)
    }

    /// Rolls back. Rolling back a finished transaction returns its outcome.
    pub async fn rollback(&mut self) -> Result<Outcome, ConcordError> {
        if let Some(ended) = &self.ended {
            return ended.clone().map_err(|e| CoordError::Refused(e).into());
        }
        let result = self
            .coordinator
            .rollback(&self.xid, "rolled back by the application")
            .await;
        self.record(result)
    }

    fn record(&mut self, result: Result<Outcome, CoordError>) -> Result<Outcome, ConcordError> {
        match result {
            Ok(outcome) => {
                self.ended = Some(Ok(outcome.clone()));
                Ok(outcome)
            }
            Err(e) => {
                self.ended = Some(Err(e.to_string()));
                self.coordinator.forget(&self.xid);
                Err(e.into())
            }
        }
    }

    fn check_not_ended(&self) -> Result<(), ConcordError> {
        match &self.ended {
            None => Ok(()),
            Some(Ok(Outcome::Committed { .. })) => Err(ConcordError::Finished {
                xid: self.xid,
                state: "committed",
            }),
            Some(_) => Err(ConcordError::Finished {
                xid: self.xid,
                state: "finished",
            }),
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.ended.is_none() {
            self.coordinator.abandon(&self.xid);
        }
    }
}

/// A transaction's branch in a files resource: put, delete and read files inside the transaction.
pub struct FilesHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: FilesBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl FilesHandle {
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
pub struct PostgresHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: PgBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl PostgresHandle {
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
pub struct MailHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: MailBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl MailHandle {
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
pub struct KvHandle {
    coordinator: Coordinator,
    xid: Xid,
    branch: KvBranch,
    _resource: Arc<dyn adapters::Resource>,
}

impl KvHandle {
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
