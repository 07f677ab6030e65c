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
use crate::handles::{FilesHandle, Gate, KvHandle, MailHandle, PostgresHandle};
use crate::remote::{RemoteBranch, Shared};

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

/// What became of an xid: [`Concord::outcome`](crate::Concord::outcome)'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxnOutcome {
    /// It committed.
    Committed(Committed),
    /// It rolled back; nothing of it happened.
    RolledBack {
        /// Why.
        cause: RollbackCause,
    },
    /// Whether it committed is not known yet: concord finishes it (see
    /// [`ConcordError::InDoubt`]).
    InDoubt {
        /// The resource whose branch's outcome is unknown, when only one is.
        branch: Option<String>,
        /// What happened.
        cause: String,
    },
    /// Still open: neither commit nor rollback was asked yet.
    Open,
    /// Nothing is known of it: never begun there, or finished long ago and trimmed from the
    /// journal (presumed rolled back if it ever began).
    Unknown,
}

/// How a transaction ended, kept to answer a second commit or rollback the same way.
#[derive(Clone, Debug)]
pub(crate) enum Ended {
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
    mode: Mode,
    xid: Xid,
    /// The outcome once committed or rolled back.
    ended: Option<Ended>,
}

/// Where the transaction runs.
enum Mode {
    /// In this process's coordinator.
    Embedded(Coordinator),
    /// In a daemon's (see [`crate::remote`]).
    Remote(Arc<Shared>),
}

impl Transaction {
    /// A new transaction of `coordinator`.
    pub(crate) fn begin(coordinator: Coordinator) -> Transaction {
        let xid = coordinator.begin();
        Transaction {
            mode: Mode::Embedded(coordinator),
            xid,
            ended: None,
        }
    }

    /// A transaction a daemon began.
    pub(crate) fn remote(shared: Shared) -> Transaction {
        Transaction {
            xid: shared.xid,
            mode: Mode::Remote(Arc::new(shared)),
            ended: None,
        }
    }

    /// Its xid.
    pub fn xid(&self) -> Xid {
        self.xid
    }

    /// The branch handle of the files resource `name`, joining it to the transaction.
    pub async fn files(&self, name: &str) -> Result<FilesHandle, ConcordError> {
        if let Some(remote) = self.remote_branch(name, "files")? {
            return Ok(FilesHandle::remote(remote));
        }
        let (branch, resource) = self
            .join_as(name, "files", |files: &FilesResource| {
                Ok(files.branch(&self.xid))
            })
            .await?;
        Ok(FilesHandle::new(self.handle_parts(), branch, resource))
    }

    /// The branch handle of the PostgreSQL resource `name`, joining it to the transaction: its
    /// statements run in the branch's own database transaction.
    ///
    /// In remote mode the branch runs in this process, on the connections of the resource
    /// [`Concord::attach_postgres`](crate::Concord::attach_postgres) opened; it is prepared
    /// here and enlisted in the daemon at commit.
    pub async fn postgres(&self, name: &str) -> Result<PostgresHandle, ConcordError> {
        if let Mode::Remote(shared) = &self.mode {
            self.check_not_ended()?;
            let resource = shared.join_postgres(name).await?;
            let branch = resource.branch(&self.xid)?;
            return Ok(PostgresHandle::new(self.handle_parts(), branch, resource));
        }
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
        if let Some(remote) = self.remote_branch(name, "mail")? {
            return Ok(MailHandle::remote(remote));
        }
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
        if let Some(remote) = self.remote_branch(name, "kv")? {
            return Ok(KvHandle::remote(remote));
        }
        let (branch, resource) = self
            .join_as(name, "kv", |kv: &KvResource| Ok(kv.branch(&self.xid)))
            .await?;
        Ok(KvHandle::new(self.handle_parts(), branch, resource))
    }

    /// The gate of an embedded transaction's handles.
    fn handle_parts(&self) -> Gate {
        match &self.mode {
            Mode::Embedded(coordinator) => Gate::Embedded(coordinator.clone(), self.xid),
            Mode::Remote(shared) => Gate::Remote(Arc::clone(shared)),
        }
    }

    /// In remote mode, a branch on the daemon's resource `name` of kind `kind` (the daemon
    /// joins it at the first call); `None` in embedded mode.
    fn remote_branch(
        &self,
        name: &str,
        kind: &'static str,
    ) -> Result<Option<RemoteBranch>, ConcordError> {
        let Mode::Remote(shared) = &self.mode else {
            return Ok(None);
        };
        self.check_not_ended()?;
        shared.remote.check_kind(self.xid, name, kind)?;
        Ok(Some(RemoteBranch::new(Arc::clone(shared), name, kind)))
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
        let Mode::Embedded(coordinator) = &self.mode else {
            return Err(CoordError::Refused(format!(
                "resource {name:?} is not joined through the daemon in remote mode"
            ))
            .into());
        };
        let resource = coordinator.join(&self.xid, name).await?;
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
        match self.end(None).await? {
            Ended::Committed(committed) => Ok(committed),
            other => Err(self.failure(other)),
        }
    }

    /// Rolls back. `Ok` also when the transaction had rolled back already, whatever the cause;
    /// a committed transaction answers [`ConcordError::Finished`], one in doubt
    /// [`ConcordError::InDoubt`], as its commit did.
    pub async fn rollback(&mut self) -> Result<RolledBack, ConcordError> {
        self.rollback_because(ROLLBACK_REASON).await
    }

    /// Rolls back as [`Transaction::rollback`] does, recording `reason` (an empty one records
    /// the default, "rolled back by the application").
    pub async fn rollback_because(&mut self, reason: &str) -> Result<RolledBack, ConcordError> {
        let reason = if reason.trim().is_empty() {
            ROLLBACK_REASON
        } else {
            reason
        };
        match self.end(Some(reason)).await? {
            Ended::RolledBack { cause, .. } => Ok(RolledBack {
                xid: self.xid,
                cause,
            }),
            other => Err(self.failure(other)),
        }
    }

    /// Ends the transaction (commits it, or rolls it back for the reason given), once: later
    /// calls return how it ended. A coordinator's error that leaves no outcome is returned as it
    /// is the first time, in words (as [`CoordError::Refused`]) later.
    async fn end(&mut self, rollback: Option<&str>) -> Result<Ended, ConcordError> {
        let requested = rollback.is_some();
        if let Some(ended) = &self.ended {
            return Ok(ended.clone());
        }
        let ended = match &self.mode {
            Mode::Embedded(coordinator) => self.end_embedded(coordinator, rollback).await,
            Mode::Remote(shared) => {
                shared.mark_ended(if requested {
                    "rolled back"
                } else {
                    "committed"
                });
                match rollback {
                    Some(reason) => shared.rollback(reason).await,
                    None => shared.commit().await,
                }
            }
        };
        match ended {
            Ok(ended) => {
                self.ended = Some(ended.clone());
                Ok(ended)
            }
            Err(e) => {
                self.ended = Some(Ended::Failed(e.to_string()));
                Err(e)
            }
        }
    }

    /// Ends an embedded transaction in its coordinator.
    async fn end_embedded(
        &self,
        coordinator: &Coordinator,
        rollback: Option<&str>,
    ) -> Result<Ended, ConcordError> {
        let requested = rollback.is_some();
        let result = match rollback {
            Some(reason) => coordinator.rollback(&self.xid, reason).await,
            None => coordinator.commit(&self.xid).await,
        };
        match result {
            Ok(outcome) => Ok(self.ended_by(outcome, requested)),
            Err(e) => Ok(self.ended_by_error(coordinator, e)?),
        }
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
    fn ended_by_error(
        &self,
        coordinator: &Coordinator,
        error: CoordError,
    ) -> Result<Ended, CoordError> {
        // A timed-out transaction's entry waits for its caller to hear of it.
        coordinator.forget(&self.xid);
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
            match &self.mode {
                Mode::Embedded(coordinator) => coordinator.abandon(&self.xid),
                Mode::Remote(shared) => Arc::clone(shared).abandon(),
            }
        }
    }
}
