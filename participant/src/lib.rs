//! What application servers link: a [`Concord`] handle, [`Transaction`]s and branch handles.
//!
//! ```no_run
//! # async fn example() -> Result<(), participant::ConcordError> {
//! use participant::{Concord, Config};
//! let concord = Concord::open(Config::load("concord.toml".as_ref())?).await?;
//! let mut tx = concord.begin();
//! let uploads = tx.files("uploads").await?;
//! uploads.put("invoices/42.pdf", &b"%PDF-1.7 ..."[..]).await?;
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
//! # Implementation caveats
//!
//! * Only the files resource is wired to a typed handle so far.

pub mod config;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use adapters::Xid;
use adapters::files::{FilesBranch, FilesConfig, FilesResource};
use adapters::postgres::{PgBranch, PostgresConfig, PostgresResource};
use coordinator::{
    CoordError, Coordinator, CoordinatorConfig, Outcome, RecoveryReport, RetryPolicy,
};
use journal::{Epoch, Journal, JournalConfig};

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
        let journal = tokio::task::spawn_blocking(move || {
            Journal::open(
                &journal_dir,
                JournalConfig {
                    create_if_missing: true,
                    ..JournalConfig::default()
                },
            )
        })
        .await
        .map_err(|e| CoordError::Refused(format!("open journal: {e}")))??;
        let mut resources: Vec<Arc<dyn adapters::Resource>> = Vec::new();
        for (name, resource) in &config.resources {
            match resource {
                ResourceConfig::Files {
                    root,
                    create,
                    lock_wait_ms,
                } => {
                    let files_config = FilesConfig {
                        lock_wait_ms_max: *lock_wait_ms,
                        create_if_missing: *create,
                        ..FilesConfig::default()
                    };
                    resources.push(FilesResource::open(name, root, files_config)?);
                }
                ResourceConfig::Postgres {
                    url,
                    pool_size,
                    fence_wait_ms,
                } => {
                    let mut pg_config = PostgresConfig::new(url, config.node);
                    pg_config.pool_size = *pool_size;
                    pg_config.fence_wait_ms = *fence_wait_ms;
                    resources.push(PostgresResource::open(name, pg_config).await?);
                }
            }
        }
        let coordinator_config = CoordinatorConfig {
            node: config.node,
            epoch: Epoch(config.epoch),
            txn_timeout_ms: config.txn_timeout_ms,
            retry: RetryPolicy::default(),
            orphan_sweep_ms: config.orphan_sweep_ms,
            one_phase: config.one_phase,
            ..CoordinatorConfig::default()
        };
        let (coordinator, recovery) =
            Coordinator::open(coordinator_config, journal, resources).await?;
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

    /// Stops background work (it resumes at the next open) and closes the journal.
    pub async fn close(self, timeout: Duration) -> bool {
        self.coordinator.shutdown(timeout).await
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
        self.check_not_ended()?;
        let resource = self.coordinator.join(&self.xid, name).await?;
        let files = Arc::clone(&resource);
        let Some(files_resource) = files.as_any().downcast_ref::<FilesResource>() else {
            return Err(ConcordError::WrongKind {
                name: name.to_string(),
                expected: "files",
            });
        };
        let branch = files_resource.branch(&self.xid);
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
        self.check_not_ended()?;
        let resource = self.coordinator.join(&self.xid, name).await?;
        let Some(pg) = resource.as_any().downcast_ref::<PostgresResource>() else {
            return Err(ConcordError::WrongKind {
                name: name.to_string(),
                expected: "postgres",
            });
        };
        let branch = pg.branch(&self.xid)?;
        Ok(PostgresHandle {
            coordinator: self.coordinator.clone(),
            xid: self.xid,
            branch,
            _resource: resource,
        })
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
