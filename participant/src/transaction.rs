//! One transaction: joining resources through typed branch handles, then commit or rollback.
//!
//! [`Transaction::commit`] answers `Ok` only when the transaction committed (its decision is
//! durable); a rollback and an unknown outcome are errors ([`ConcordError::RolledBack`],
//! [`ConcordError::InDoubt`]), so `tx.commit().await?` never mistakes one for a commit. The
//! first answer is kept: committing or rolling back again answers the same.

use std::sync::Arc;

use adapters::files::FilesResource;
use adapters::kv::KvResource;
use adapters::mail::MailResource;
use adapters::postgres::PostgresResource;
use adapters::{Lsn, Xid};
use coordinator::{CoordError, Coordinator, Outcome};

use crate::error::{ConcordError, RollbackCause};
use crate::handles::{FilesHandle, KvHandle, MailHandle, PostgresHandle};

/// The reason the coordinator records for [`Transaction::rollback`].
const ROLLBACK_REASON: &str = "rolled back by the application";

/// A committed transaction: [`Transaction::commit`]'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The transaction.
    pub xid: Xid,
    /// The LSN of its decision record; `None` when nothing needed one: every branch was
    /// read-only, or a lone branch with nothing to replicate committed in one phase.
    pub lsn: Option<Lsn>,
}

/// A transaction rolled back as the application asked: [`Transaction::rollback`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolledBack {
    /// The transaction.
    pub xid: Xid,
    /// Why it rolled back (the application's request, or what had rolled it back before).
    pub cause: RollbackCause,
}

/// How a transaction ended, kept to answer a second commit or rollback the same way.
#[derive(Clone, Debug)]
enum Ended {
    Committed(Committed),
    RolledBack {
        branch: Option<String>,
        cause: RollbackCause,
    },
    InDoubt {
        branch: Option<String>,
        cause: String,
    },
    /// The commit or rollback call failed otherwise (the coordinator's words).
    Failed(String),
}

/// One transaction; see the crate docs. Dropping it before it committed or rolled back rolls
/// it back (in the background).
#[must_use = "a transaction does nothing unless committed; dropped, it rolls back"]
pub struct Transaction {
    coordinator: Coordinator,
    xid: Xid,
    /// The outcome once committed or rolled back.
    ended: Option<Ended>,
}

impl Transaction {
    /// A new transaction of `coordinator`.
    pub(crate) fn begin(coordinator: Coordinator) -> Transaction {
        let xid = coordinator.begin();
        Transaction {
            coordinator,
            xid,
            ended: None,
        }
    }

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
        Ok(FilesHandle::new(self.handle_parts(), branch, resource))
    }

    /// The branch handle of the PostgreSQL resource `name`, joining it to the transaction: its
    /// statements run in the branch's own database transaction.
    pub async fn postgres(&self, name: &str) -> Result<PostgresHandle, ConcordError> {
        let (branch, resource) = self
            .join_as(name, "postgres", |pg: &PostgresResource| {
                Ok(pg.branch(&self.xid)?)
            })
            .await?;
        Ok(PostgresHandle::new(self.handle_parts(), branch, resource))
    }

    /// The branch handle of the mail queue `name`, joining it to the transaction: the messages
    /// it enqueues are delivered (into the Maildir's `new/`) when the transaction commits.
    pub async fn mail(&self, name: &str) -> Result<MailHandle, ConcordError> {
        let (branch, resource) = self
            .join_as(name, "mail", |mail: &MailResource| {
                Ok(mail.branch(&self.xid))
            })
            .await?;
        Ok(MailHandle::new(self.handle_parts(), branch, resource))
    }

    /// The branch handle of the kv resource `name`, joining it to the transaction: its inserts
    /// and removes appear in the store when the transaction commits.
    pub async fn kv(&self, name: &str) -> Result<KvHandle, ConcordError> {
        let (branch, resource) = self
            .join_as(name, "kv", |kv: &KvResource| Ok(kv.branch(&self.xid)))
            .await?;
        Ok(KvHandle::new(self.handle_parts(), branch, resource))
    }

    fn handle_parts(&self) -> (Coordinator, Xid) {
        (self.coordinator.clone(), self.xid)
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

    /// Commits every branch, or none. `Ok` once the decision is durable (phase 2 goes on in
    /// the background); [`ConcordError::RolledBack`] when the transaction rolled back instead
    /// (nothing of it happened; [`ConcordError::is_retryable`] says whether running it again can
    /// succeed); [`ConcordError::InDoubt`] when whether it committed is not known (do not run it
    /// again: concord finishes it). Committing again answers the same.
    pub async fn commit(&mut self) -> Result<Committed, ConcordError> {
        match self.end(false).await? {
            Ended::Committed(committed) => Ok(committed),
            other => Err(self.failure(other)),
        }
    }

    /// Rolls back. `Ok` also when the transaction had rolled back already, whatever the cause;
    /// a committed transaction answers [`ConcordError::Finished`], one in doubt
    /// [`ConcordError::InDoubt`], as its commit did.
    pub async fn rollback(&mut self) -> Result<RolledBack, ConcordError> {
        match self.end(true).await? {
            Ended::RolledBack { cause, .. } => Ok(RolledBack {
                xid: self.xid,
                cause,
            }),
            other => Err(self.failure(other)),
        }
    }

    /// Ends the transaction (commits it, or rolls it back when `requested`), once: later calls
    /// return how it ended. A coordinator's error that leaves no outcome is returned as it is
    /// the first time, in words (as [`CoordError::Refused`]) later.
    async fn end(&mut self, requested: bool) -> Result<Ended, ConcordError> {
        if let Some(ended) = &self.ended {
            return Ok(ended.clone());
        }
        let result = if requested {
            self.coordinator.rollback(&self.xid, ROLLBACK_REASON).await
        } else {
            self.coordinator.commit(&self.xid).await
        };
        let ended = match result {
            Ok(outcome) => self.ended_by(outcome, requested),
            Err(e) => match self.ended_by_error(e) {
                Ok(ended) => ended,
                Err(e) => {
                    self.ended = Some(Ended::Failed(e.to_string()));
                    return Err(e.into());
                }
            },
        };
        self.ended = Some(ended.clone());
        Ok(ended)
    }

    /// What the coordinator's outcome means for this transaction (`requested`: the outcome of
    /// the application's rollback).
    fn ended_by(&self, outcome: Outcome, requested: bool) -> Ended {
        match outcome {
            Outcome::Committed { lsn } => Ended::Committed(Committed { xid: self.xid, lsn }),
            Outcome::RolledBack { reason, .. } if requested => Ended::RolledBack {
                branch: None,
                cause: RollbackCause::Requested { reason },
            },
            Outcome::RolledBack {
                reason,
                failed: Some(error),
            } => Ended::RolledBack {
                branch: Some(error.resource().to_string()),
                cause: RollbackCause::Branch {
                    reason,
                    error: Box::new(error),
                },
            },
            Outcome::RolledBack {
                reason,
                failed: None,
            } => Ended::RolledBack {
                branch: None,
                cause: RollbackCause::Coordinator { reason },
            },
            Outcome::InDoubt { error, branch } => Ended::InDoubt {
                branch,
                cause: error,
            },
        }
    }

    /// What a failed commit or rollback call means for this transaction: a timeout rolled it
    /// back; a shutdown left its outcome to the next start's recovery; anything else is the
    /// coordinator's refusal, returned as it is.
    fn ended_by_error(&self, error: CoordError) -> Result<Ended, CoordError> {
        // A timed-out transaction's entry waits for its caller to hear of it.
        self.coordinator.forget(&self.xid);
        match error {
            CoordError::TimedOut { timeout_ms, .. } => Ok(Ended::RolledBack {
                branch: None,
                cause: RollbackCause::TimedOut { timeout_ms },
            }),
            busy @ CoordError::Busy { .. } => Ok(Ended::RolledBack {
                branch: None,
                cause: RollbackCause::Busy {
                    reason: busy.to_string(),
                },
            }),
            CoordError::ShuttingDown => Ok(Ended::InDoubt {
                branch: None,
                cause: CoordError::ShuttingDown.to_string(),
            }),
            other => Err(other),
        }
    }

    /// The error a commit or rollback answers for `ended` when it is not what was asked.
    fn failure(&self, ended: Ended) -> ConcordError {
        match ended {
            Ended::Committed(_) => ConcordError::Finished {
                xid: self.xid,
                state: "committed",
            },
            Ended::RolledBack { branch, cause } => ConcordError::RolledBack {
                xid: self.xid,
                branch,
                cause,
            },
            Ended::InDoubt { branch, cause } => ConcordError::InDoubt {
                xid: self.xid,
                branch,
                cause,
            },
            Ended::Failed(message) => CoordError::Refused(message).into(),
        }
    }

    fn check_not_ended(&self) -> Result<(), ConcordError> {
        let state = match &self.ended {
            None => return Ok(()),
            Some(Ended::Committed(_)) => "committed",
            Some(Ended::RolledBack { .. }) => "rolled back",
            Some(Ended::InDoubt { .. }) => "in doubt",
            Some(Ended::Failed(_)) => "finished",
        };
        Err(ConcordError::Finished {
            xid: self.xid,
            state,
        })
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.ended.is_none() {
            self.coordinator.abandon(&self.xid);
        }
    }
}
