//! The participant's errors, and which of them a retry of the whole transaction can cure.
//!
//! Every call of the library returns [`ConcordError`]. Two variants end a transaction that
//! asked to commit: [`ConcordError::RolledBack`] (nothing of it happened) and
//! [`ConcordError::InDoubt`] (it may have happened; concord finishes it). The others are a
//! refusal of one call (a resource's, the coordinator's, the configuration's).
//!
//! [`ConcordError::is_retryable`] says whether running the *whole* transaction again — a new
//! [`Transaction`](crate::Transaction), every step from the start — can succeed: a conflict with
//! another transaction, a resource that cannot answer now, a transaction that ran past its
//! timeout. It is false for everything a retry repeats (bad input, configuration, a wrong
//! handle, a finished transaction, a fatal resource) and, above all, for a transaction in doubt:
//! it may have committed, and running it again could do it twice.
//!
//! # Caveats
//!
//! * A rollback caused by a branch (a failed prepare, a one-phase commit the resource refused)
//!   is [`RollbackCause::Branch`] with the resource's typed error; it is retryable when that
//!   error is (a PostgreSQL serialization failure or deadlock met at `PREPARE` or `COMMIT`, a
//!   resource that could not answer). A serialization failure or conflict met by a statement or
//!   a write — where they are usually met — reaches the application typed, as
//!   [`ConcordError::Resource`], and is retryable too.
//! * A fenced resource ([`adapters::ResourceError::Fenced`]) is not retryable: this node's
//!   epoch is over and it never commits again; the application must go to the promoted site.

use adapters::{ErrorClass, ResourceError, Xid};
use coordinator::CoordError;

use crate::config::ConfigError;

/// Errors of the participant API. More variants may come; match with a catch-all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConcordError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] CoordError),
    /// A resource refused or failed.
    #[error(transparent)]
    Resource(#[from] ResourceError),
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
    /// The transaction rolled back instead of committing: none of its work happened, in any
    /// resource. [`ConcordError::is_retryable`] says whether running it again can succeed.
    #[error("transaction {xid} rolled back{}: {cause}", on_branch(.branch.as_deref()))]
    RolledBack {
        /// The transaction.
        xid: Xid,
        /// The resource whose branch made it roll back (a failed prepare, a refused one-phase
        /// commit); `None` when no branch did (a timeout, the application's rollback, the
        /// journal refusing the decision).
        branch: Option<String>,
        /// Why.
        cause: RollbackCause,
    },
    /// Whether the transaction committed is not known. Do not run it again: it may have
    /// committed. The coordinator finishes it (phase 2 or recovery at the next start; an
    /// operator with `concord txn resolve` when a resource is lost for good); `concord txn
    /// list` shows it until then.
    #[error(
        "transaction {xid} is in doubt{}: {cause}; do not run it again (it may have committed): concord finishes it, and `concord txn list` shows it until then",
        on_branch(.branch.as_deref())
    )]
    InDoubt {
        /// The transaction.
        xid: Xid,
        /// The resource whose branch's outcome is unknown (a one-phase commit whose answer was
        /// lost); `None` when every branch is (the journal failed while making the decision
        /// durable, the coordinator shut down in the middle).
        branch: Option<String>,
        /// What happened, and what concord does about it.
        cause: String,
    },
    /// Remote mode: the daemon's URL, TLS settings or credentials files cannot be used, or the
    /// daemon could not be reached when connecting. Retryable when it could not be reached.
    #[error(transparent)]
    Connect(#[from] proto::client::ClientError),
    /// Remote mode: a call got no answer from the daemon (the connection broke, was refused,
    /// or passed its deadline; or the daemon is not the primary). A transaction whose branch
    /// work failed this way is best run again from its first step (retryable); a commit never
    /// reports it (it asks the daemon for the outcome instead, and reports
    /// [`ConcordError::InDoubt`] when it cannot learn it).
    #[error(
        "the coordinator daemon did not answer: {message}; run the transaction again once it is reachable"
    )]
    Unreachable {
        /// What the transport said.
        message: String,
    },
    /// Remote mode with several nodes ([`crate::Concord::connect_any`]): no node answered as
    /// the primary within `failover_wait_ms` (each was down, unreachable, or not the primary
    /// and named none that was). Retryable, later: a failover may still be under way.
    #[error(
        "no coordinator daemon answered as the primary within {waited_ms} ms ({}); is a failover under way, or are they all down?",
        tried_list(.tried)
    )]
    NoPrimary {
        /// How long the search went on (milliseconds).
        waited_ms: u64,
        /// Every URL tried, with its last answer.
        tried: Vec<NodeTried>,
    },
    /// Remote mode: the daemon refused the credentials (no token, a wrong one, or one that
    /// may not make this call). Not retryable: fix the token or certificate.
    #[error("the coordinator daemon refused the credentials: {message}")]
    Unauthorized {
        /// The daemon's words.
        message: String,
    },
    /// Remote mode: a limit of the daemon (message size, open transactions per client,
    /// branches per transaction). Retryable only for `txns_per_client_max` (once other
    /// transactions of this client end).
    #[error("{message}")]
    Limit {
        /// The limit's configuration name.
        limit: String,
        /// Its value, in the unit its name says.
        value: u64,
        /// The daemon's words.
        message: String,
    },
}

/// One node tried in the search for the primary, and what it answered last
/// (see [`ConcordError::NoPrimary`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTried {
    /// Its URL.
    pub url: String,
    /// Its last answer: not the primary (and whom it named), or no answer (and why).
    pub answer: String,
    /// How many times it was tried.
    pub attempts: u32,
}

/// `URL: ANSWER (N tries); …`.
fn tried_list(tried: &[NodeTried]) -> String {
    if tried.is_empty() {
        return "no node could be tried".to_string();
    }
    tried
        .iter()
        .map(|t| format!("{}: {} ({} tries)", t.url, t.answer, t.attempts))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a transaction rolled back (see [`ConcordError::RolledBack`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RollbackCause {
    /// The application rolled it back ([`Transaction::rollback`](crate::Transaction::rollback)).
    #[error("{reason}")]
    Requested {
        /// The reason given to the coordinator.
        reason: String,
    },
    /// It was open longer than the configured `txn_timeout_ms` and the coordinator rolled it
    /// back.
    #[error("it was open longer than {timeout_ms} ms")]
    TimedOut {
        /// The timeout (milliseconds).
        timeout_ms: u64,
    },
    /// A branch could not prepare, or its resource refused a one-phase commit.
    #[error("{reason}")]
    Branch {
        /// The coordinator's words (which branch, what it was doing).
        reason: String,
        /// The resource's error; its class says whether running the transaction again can
        /// succeed.
        error: Box<ResourceError>,
    },
    /// Too many transactions were still in phase 2 (`max_unfinished`) for this one to get a
    /// place within `txn_timeout_ms`: a resource is slow or down. Retryable, later.
    #[error("{reason}")]
    Busy {
        /// The coordinator's words.
        reason: String,
    },
    /// Remote mode: the node the transaction began on stopped being the primary, or could
    /// not be reached, before the commit request reached it. Nothing was decided, and a
    /// coordinator without a decision only ever rolls back (that node at its timeout or its
    /// restart, a promoted standby when it takes over), so nothing of it happened. Retryable:
    /// run it again, on the primary [`crate::Concord::begin`] finds.
    #[error(
        "its node {node} was lost before the commit request reached it ({reason}); nothing was decided, so nothing of it happened: run it again"
    )]
    NodeLost {
        /// The URL of the node the transaction began on.
        node: String,
        /// What that node answered, or why it did not.
        reason: String,
    },
    /// The coordinator rolled it back for the reason given, without a branch's error: the
    /// journal refusing the decision, say.
    #[error("{reason}")]
    Coordinator {
        /// The coordinator's words.
        reason: String,
    },
}

impl RollbackCause {
    /// Whether running the transaction again can succeed; see [`ConcordError::is_retryable`].
    pub fn is_retryable(&self) -> bool {
        match self {
            RollbackCause::TimedOut { .. }
            | RollbackCause::Busy { .. }
            | RollbackCause::NodeLost { .. } => true,
            RollbackCause::Branch { error, .. } => resource_retryable(error),
            RollbackCause::Requested { .. } | RollbackCause::Coordinator { .. } => false,
        }
    }
}

impl ConcordError {
    /// Whether running the whole transaction again (a new one, from its first step) can
    /// succeed: true for a rollback caused by a timeout, a conflict with another transaction's
    /// write, a resource that cannot answer now (down, busy, a PostgreSQL serialization failure
    /// or deadlock). False for a transaction in doubt (it may have committed: running it again
    /// could do it twice), a rollback the application asked for, configuration and usage
    /// errors, a finished transaction, a fenced, fatal or refusing resource. See the module
    /// docs for what is not classified yet.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConcordError::RolledBack { cause, .. } => cause.is_retryable(),
            ConcordError::Resource(e) => resource_retryable(e),
            ConcordError::Coordinator(e) => coordinator_retryable(e),
            ConcordError::Connect(e) => matches!(e, proto::client::ClientError::Connect { .. }),
            ConcordError::Unreachable { .. } | ConcordError::NoPrimary { .. } => true,
            ConcordError::Limit { limit, .. } => limit == "txns_per_client_max",
            ConcordError::InDoubt { .. }
            | ConcordError::Unauthorized { .. }
            | ConcordError::Config(_)
            | ConcordError::Journal(_)
            | ConcordError::WrongKind { .. }
            | ConcordError::Finished { .. } => false,
        }
    }
}

/// A resource's error: retryable when it cannot answer now, or when another transaction held
/// what this one wanted to write.
fn resource_retryable(e: &ResourceError) -> bool {
    e.class() == ErrorClass::Retryable || matches!(e, ResourceError::Conflict { .. })
}

/// A coordinator's error: retryable when the transaction timed out (and rolled back), or when a
/// resource's error underneath is.
fn coordinator_retryable(e: &CoordError) -> bool {
    match e {
        CoordError::TimedOut { .. } | CoordError::Busy { .. } => true,
        CoordError::Resource(e) => resource_retryable(e),
        _ => false,
    }
}

/// `" (branch NAME)"`, or nothing.
fn on_branch(branch: Option<&str>) -> String {
    branch.map_or_else(String::new, |b| format!(" (branch {b:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::Epoch;

    fn xid() -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(1),
            seq: 7,
        }
    }

    fn unavailable() -> ResourceError {
        ResourceError::Unavailable {
            resource: "orders".into(),
            message: "connection refused".into(),
        }
    }

    fn conflict() -> ResourceError {
        ResourceError::Conflict {
            resource: "index".into(),
            what: "key order/1".into(),
            holder: "another".into(),
            waited_ms: 100,
        }
    }

    fn rolled_back(cause: RollbackCause) -> ConcordError {
        ConcordError::RolledBack {
            xid: xid(),
            branch: None,
            cause,
        }
    }

    #[test]
    fn retryable_are_timeouts_conflicts_and_unavailable_resources() {
        let retryable = [
            rolled_back(RollbackCause::TimedOut { timeout_ms: 300 }),
            ConcordError::Resource(unavailable()),
            ConcordError::Resource(conflict()),
            ConcordError::Coordinator(CoordError::TimedOut {
                xid: xid(),
                timeout_ms: 300,
            }),
            ConcordError::Coordinator(CoordError::Resource(conflict())),
            ConcordError::Coordinator(CoordError::Resource(unavailable())),
            rolled_back(RollbackCause::Branch {
                reason: "branch 0 could not prepare: resource index: busy".into(),
                error: Box::new(unavailable()),
            }),
            rolled_back(RollbackCause::Busy {
                reason: "4096 transactions are still in phase 2 (max_unfinished)".into(),
            }),
            ConcordError::Coordinator(CoordError::Busy {
                xid: xid(),
                max_unfinished: 4096,
                waited_ms: 30_000,
            }),
        ];
        for e in retryable {
            assert!(e.is_retryable(), "{e:?}");
        }
    }

    #[test]
    fn in_doubt_is_never_retryable() {
        let e = ConcordError::InDoubt {
            xid: xid(),
            branch: None,
            cause: "the journal's sync failed".into(),
        };
        assert!(!e.is_retryable());
        let message = e.to_string();
        assert!(
            message.contains("do not run it again") && message.contains("concord txn list"),
            "{message}"
        );
    }

    #[test]
    fn usage_configuration_and_lasting_resource_errors_are_not_retryable() {
        let resource = |e: ResourceError| ConcordError::Resource(e);
        let not_retryable = [
            rolled_back(RollbackCause::Requested {
                reason: "rolled back by the application".into(),
            }),
            rolled_back(RollbackCause::Coordinator {
                reason: "the journal refused the decision record".into(),
            }),
            rolled_back(RollbackCause::Branch {
                reason: "branch 0 could not prepare: resource uploads: disk full".into(),
                error: Box::new(ResourceError::rejected("uploads", "disk full")),
            }),
            ConcordError::WrongKind {
                name: "uploads".into(),
                expected: "kv",
            },
            ConcordError::Finished {
                xid: xid(),
                state: "committed",
            },
            ConcordError::Config(
                crate::Config::load("/nonexistent/concord.toml".as_ref()).unwrap_err(),
            ),
            ConcordError::Coordinator(CoordError::UnknownResource {
                name: "nope".into(),
                configured: "uploads".into(),
            }),
            ConcordError::Coordinator(CoordError::NotActive {
                xid: xid(),
                state: "not open".into(),
            }),
            ConcordError::Coordinator(CoordError::ShuttingDown),
            resource(ResourceError::rejected("uploads", "path escapes the root")),
            resource(ResourceError::Fenced {
                resource: "orders".into(),
                offered: Epoch(1),
                current: Epoch(2),
            }),
            resource(ResourceError::InDoubt {
                resource: "orders".into(),
                message: "connection lost during COMMIT".into(),
            }),
            resource(ResourceError::Fatal {
                resource: "uploads".into(),
                message: "fsync failed".into(),
            }),
            resource(ResourceError::HeuristicHazard {
                resource: "orders".into(),
                message: "no marker".into(),
            }),
        ];
        for e in not_retryable {
            assert!(!e.is_retryable(), "{e:?}");
        }
    }

    #[test]
    fn a_rollback_names_its_branch_when_known() {
        let named = ConcordError::RolledBack {
            xid: xid(),
            branch: Some("orders".into()),
            cause: RollbackCause::TimedOut { timeout_ms: 300 },
        };
        let message = named.to_string();
        assert!(
            message.contains(&xid().to_string())
                && message.contains("(branch \"orders\")")
                && message.contains("open longer than 300 ms"),
            "{message}"
        );
        let unnamed = rolled_back(RollbackCause::Coordinator {
            reason: "branch 1 could not prepare".into(),
        });
        assert!(!unnamed.to_string().contains("(branch"), "{unnamed}");
    }
}
