//! PostgreSQL branches in remote mode: run in the application, on its own connections, and
//! finished by the daemon.
//!
//! The application opens the daemon's PostgreSQL resource of the same name on its side
//! ([`Remote::attach_postgres`]: the same database, the same name, since the gid
//! `concord:<xid>:<resource>` carries it). A branch begins there at the xid's epoch (the fence
//! check runs at that epoch) and runs its statements as in embedded mode. At commit, before
//! the `Commit` call, each branch is prepared here ([`PostgresResource::prepare_for_enlist`]:
//! fence check, capture, marker, `PREPARE TRANSACTION`) and enlisted with the text
//! `concord.prepare_branch` returned as its redo; from then on it is the daemon's to commit or
//! roll back by gid. A read-only branch has nothing prepared and nothing to enlist. A branch
//! that cannot be prepared or enlisted rolls the whole transaction back. A rollback ends the
//! branches not enlisted here, and asks the daemon for the rest.
//!
//! A lone remote PostgreSQL branch takes two phases: it is prepared before the daemon hears
//! of it, so the daemon journals a decision and commits it by gid.

use std::sync::Arc;

use adapters::postgres::{PostgresConfig, PostgresResource};
use adapters::{Resource, ResourceError};
use coordinator::CoordError;
use proto::convert::xid_text;
use proto::v1;

use super::{Remote, Shared, header};
use crate::error::{ConcordError, RollbackCause};
use crate::transaction::Ended;

impl Remote {
    /// Opens the daemon's PostgreSQL resource `name` in this process, with `config` (the same
    /// database as the daemon's).
    pub(crate) async fn attach_postgres(
        &self,
        name: &str,
        config: PostgresConfig,
    ) -> Result<(), ConcordError> {
        if let Some(kind) = self.kinds.as_ref().and_then(|k| k.get(name))
            && kind != "postgres"
        {
            return Err(ConcordError::WrongKind {
                name: name.to_string(),
                expected: "postgres",
            });
        }
        let resource = PostgresResource::open(name, config).await?;
        self.attached().insert(name.to_string(), resource);
        Ok(())
    }

    fn attached(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Arc<PostgresResource>>> {
        self.postgres
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn attached_resource(&self, name: &str) -> Option<Arc<PostgresResource>> {
        self.attached().get(name).cloned()
    }
}

impl Shared {
    fn pg_branches(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<PostgresResource>)>> {
        self.postgres
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The resource of this transaction's branch in `name`, beginning the branch when new.
    pub(crate) async fn join_postgres(
        &self,
        name: &str,
    ) -> Result<Arc<PostgresResource>, ConcordError> {
        self.check_open()?;
        let Some(resource) = self.remote.attached_resource(name) else {
            self.remote.check_kind(self.xid, name, "postgres")?;
            return Err(CoordError::Refused(format!(
                "PostgreSQL resource {name:?} is not attached in this process: call Concord::attach_postgres({name:?}, config) with the daemon's database first"
            ))
            .into());
        };
        if self.pg_branches().iter().any(|(n, _)| n == name) {
            return Ok(resource);
        }
        resource.begin(&self.xid).await?;
        self.pg_branches()
            .push((name.to_string(), Arc::clone(&resource)));
        Ok(resource)
    }

    /// Prepares every PostgreSQL branch here and enlists it in the daemon. A failure rolls
    /// the transaction back: `Some(ended)` says how it ended then.
    pub(crate) async fn enlist_postgres(&self) -> Result<Option<Ended>, ConcordError> {
        let branches = std::mem::take(&mut *self.pg_branches());
        let mut left = branches.iter();
        for (name, resource) in left.by_ref() {
            if let Err(e) = self.enlist_one(name, resource).await {
                let rest: Vec<_> = left.cloned().collect();
                return self.enlist_failed(name, e, resource, &rest).await.map(Some);
            }
        }
        Ok(None)
    }

    async fn enlist_one(
        &self,
        name: &str,
        resource: &PostgresResource,
    ) -> Result<(), ConcordError> {
        let Some(redo) = resource.prepare_for_enlist(&self.xid).await? else {
            return Ok(());
        };
        let request = v1::EnlistPreparedRequest {
            target: Some(v1::BranchTarget {
                header: header(),
                xid: xid_text(self.xid),
                resource: name.to_string(),
            }),
            gid: resource.gid(&self.xid),
            redo: redo.into_bytes(),
        };
        self.client()
            .enlist_prepared(request)
            .await
            .map_err(|s| self.error("postgres", &s))?;
        Ok(())
    }

    /// Rolls everything back after branch `name` failed to prepare or enlist with `error`:
    /// that branch by gid here (prepared or not), the ones not reached here, the rest in the
    /// daemon.
    async fn enlist_failed(
        &self,
        name: &str,
        error: ConcordError,
        failed: &PostgresResource,
        rest: &[(String, Arc<PostgresResource>)],
    ) -> Result<Ended, ConcordError> {
        let _ = failed.rollback(&self.xid).await;
        roll_back_here(self.xid, rest).await;
        let reason = format!("branch {name:?} could not be prepared and enlisted: {error}");
        let _ = self.rollback_in_daemon(&reason).await;
        let cause = match error {
            ConcordError::Resource(e) => RollbackCause::Branch {
                reason,
                error: Box::new(e),
            },
            other => RollbackCause::Branch {
                reason,
                error: Box::new(ResourceError::Unavailable {
                    resource: name.to_string(),
                    message: other.to_string(),
                }),
            },
        };
        Ok(Ended::RolledBack {
            branch: Some(name.to_string()),
            cause,
        })
    }

    /// Rolls back the PostgreSQL branches not enlisted yet.
    pub(crate) async fn roll_back_postgres(&self) {
        let branches = std::mem::take(&mut *self.pg_branches());
        roll_back_here(self.xid, &branches).await;
    }
}

async fn roll_back_here(xid: adapters::Xid, branches: &[(String, Arc<PostgresResource>)]) {
    for (name, resource) in branches {
        if let Err(e) = resource.rollback(&xid).await {
            tracing::warn!(%xid, resource = %name, "roll back a PostgreSQL branch: {e}; the daemon's sweeper rolls it back if it was prepared");
        }
    }
}
