//! A daemon's answers as the participant's errors: a gRPC status and its `ErrorDetail` become
//! the [`ConcordError`] embedded mode returns in the same situation, and a [`RollbackCause`]
//! crosses the wire both ways.
//!
//! The detail decides, not the gRPC code: `UNKNOWN_RESOURCE` is the coordinator's
//! [`CoordError::UnknownResource`], `WRONG_KIND` is [`ConcordError::WrongKind`], `RESOURCE` the
//! resource's typed error, `ROLLED_BACK` and `ALREADY_ROLLED_BACK`
//! [`ConcordError::RolledBack`] with the cause the daemon sent. A status without a detail came
//! from the transport (a connection refused or broken, a deadline) or from something that is
//! not a concord daemon: [`ConcordError::Unreachable`], or the refusal in words.
//!
//! # Caveats
//!
//! * A journal failure in the daemon arrives as [`CoordError::Refused`] with the daemon's
//!   words: the journal's typed error does not cross the wire.

use adapters::{ResourceError, Xid};
use coordinator::CoordError;
use proto::v1::{self, ErrorCode, RollbackKind};
use tonic::Code;

use crate::error::{ConcordError, RollbackCause};

/// What a failed call means for the transaction it was about (`xid`), a call on a resource of
/// kind `kind` when there is one.
pub(crate) fn error(
    xid: Option<Xid>,
    kind: Option<&'static str>,
    status: &tonic::Status,
) -> ConcordError {
    let message = status.message().to_string();
    match proto::error_detail(status) {
        Ok(Some(detail)) => from_detail(xid, kind, detail, message),
        Ok(None) => without_detail(status),
        Err(e) => CoordError::Refused(format!("{message} (and its detail: {e})")).into(),
    }
}

/// Whether a status is the transport's (no answer from the daemon): a call cut off this way
/// may or may not have been carried out.
pub(crate) fn is_transport(status: &tonic::Status) -> bool {
    let no_detail = !matches!(proto::error_detail(status), Ok(Some(_)));
    no_detail
        && matches!(
            status.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::Internal
        )
}

fn without_detail(status: &tonic::Status) -> ConcordError {
    let message = status.message().to_string();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => ConcordError::Unauthorized { message },
        _ if is_transport(status) => ConcordError::Unreachable {
            message: format!("{:?}: {message}", status.code()),
        },
        code => CoordError::Refused(format!("the daemon answered {code:?}: {message}")).into(),
    }
}

fn from_detail(
    xid: Option<Xid>,
    kind: Option<&'static str>,
    detail: v1::ErrorDetail,
    message: String,
) -> ConcordError {
    let code = ErrorCode::try_from(detail.code).unwrap_or(ErrorCode::Unspecified);
    let xid = xid.or_else(|| detail.xid.parse().ok());
    match (code, xid) {
        (ErrorCode::Unauthenticated | ErrorCode::PermissionDenied, _) => {
            ConcordError::Unauthorized { message }
        }
        (ErrorCode::UnknownResource, _) => CoordError::UnknownResource {
            name: detail.resource,
            configured: "see the daemon's configuration".into(),
        }
        .into(),
        (ErrorCode::WrongKind, _) => ConcordError::WrongKind {
            name: detail.resource,
            expected: kind.unwrap_or("other"),
        },
        (ErrorCode::Resource, _) => match detail.resource_error.map(ResourceError::try_from) {
            Some(Ok(e)) => ConcordError::Resource(e),
            _ => CoordError::Refused(message).into(),
        },
        (ErrorCode::LimitExceeded, _) => ConcordError::Limit {
            limit: detail.limit,
            value: detail.limit_value,
            message,
        },
        (ErrorCode::Draining, _) => CoordError::ShuttingDown.into(),
        (ErrorCode::NotConfirmed, Some(xid)) => CoordError::NotConfirmed {
            xid,
            reason: message,
        }
        .into(),
        (ErrorCode::NotPrimary | ErrorCode::NotPrimaryUnavailable, _) => {
            ConcordError::Unreachable { message }
        }
        (ErrorCode::RolledBack | ErrorCode::AlreadyRolledBack, Some(xid)) => {
            ConcordError::RolledBack {
                xid,
                branch: Some(detail.resource).filter(|r| !r.is_empty()),
                cause: detail
                    .rollback
                    .map_or_else(|| coordinator_cause(&message), cause_from_wire),
            }
        }
        (ErrorCode::TxnFinished, Some(xid)) => match detail.rollback.map(cause_from_wire) {
            Some(RollbackCause::TimedOut { timeout_ms }) => {
                CoordError::TimedOut { xid, timeout_ms }.into()
            }
            _ => ConcordError::Finished {
                xid,
                state: "finished",
            },
        },
        (ErrorCode::AlreadyCommitted, Some(xid)) => ConcordError::Finished {
            xid,
            state: "committed",
        },
        (ErrorCode::UnknownXid, Some(xid)) => CoordError::NotActive {
            xid,
            state: "unknown to the daemon".into(),
        }
        .into(),
        _ => CoordError::Refused(message).into(),
    }
}

fn coordinator_cause(reason: &str) -> RollbackCause {
    RollbackCause::Coordinator {
        reason: reason.to_string(),
    }
}

/// A cause from the wire; a malformed one (no kind, a branch cause without its error) is the
/// coordinator's words.
pub(crate) fn cause_from_wire(wire: v1::RollbackCause) -> RollbackCause {
    let kind = RollbackKind::try_from(wire.kind).unwrap_or(RollbackKind::Unspecified);
    let reason = wire.reason;
    match kind {
        RollbackKind::Requested => RollbackCause::Requested { reason },
        RollbackKind::TimedOut => RollbackCause::TimedOut {
            timeout_ms: wire.timeout_ms,
        },
        RollbackKind::Busy => RollbackCause::Busy { reason },
        RollbackKind::Branch => match wire.branch_error.map(ResourceError::try_from) {
            Some(Ok(error)) => RollbackCause::Branch {
                reason,
                error: Box::new(error),
            },
            _ => RollbackCause::Coordinator { reason },
        },
        RollbackKind::Coordinator | RollbackKind::Unspecified => {
            RollbackCause::Coordinator { reason }
        }
    }
}

impl From<&RollbackCause> for v1::RollbackCause {
    fn from(cause: &RollbackCause) -> v1::RollbackCause {
        let mut wire = v1::RollbackCause {
            kind: RollbackKind::Coordinator as i32,
            reason: cause.to_string(),
            timeout_ms: 0,
            branch_error: None,
            retryable: cause.is_retryable(),
        };
        match cause {
            RollbackCause::Requested { .. } => wire.kind = RollbackKind::Requested as i32,
            RollbackCause::TimedOut { timeout_ms } => {
                wire.kind = RollbackKind::TimedOut as i32;
                wire.timeout_ms = *timeout_ms;
            }
            RollbackCause::Branch { error, .. } => {
                wire.kind = RollbackKind::Branch as i32;
                wire.branch_error = Some(error.as_ref().into());
            }
            RollbackCause::Busy { .. } => wire.kind = RollbackKind::Busy as i32,
            RollbackCause::Coordinator { .. } | RollbackCause::NodeLost { .. } => {}
        }
        wire
    }
}

impl From<v1::RollbackCause> for RollbackCause {
    fn from(wire: v1::RollbackCause) -> RollbackCause {
        cause_from_wire(wire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::Epoch;

    fn xid() -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(1),
            seq: 9,
        }
    }

    #[test]
    fn every_cause_crosses_the_wire_and_back() {
        let causes = [
            RollbackCause::Requested {
                reason: "rolled back by the application".into(),
            },
            RollbackCause::TimedOut { timeout_ms: 300 },
            RollbackCause::Busy {
                reason: "busy".into(),
            },
            RollbackCause::Coordinator {
                reason: "the journal refused".into(),
            },
            RollbackCause::Branch {
                reason: "branch 0 could not prepare".into(),
                error: Box::new(ResourceError::rejected("uploads", "disk full")),
            },
        ];
        for cause in causes {
            let wire = v1::RollbackCause::from(&cause);
            assert_eq!(wire.retryable, cause.is_retryable());
            assert_eq!(RollbackCause::from(wire), cause);
        }
    }

    #[test]
    fn details_become_the_embedded_errors() {
        let rolled = proto::error_status(
            "rolled back",
            &v1::ErrorDetail::rolled_back(
                xid(),
                (&RollbackCause::TimedOut { timeout_ms: 5 }).into(),
            ),
        );
        assert!(matches!(
            error(Some(xid()), None, &rolled),
            ConcordError::RolledBack {
                cause: RollbackCause::TimedOut { timeout_ms: 5 },
                ..
            }
        ));
        let conflict = ResourceError::Conflict {
            resource: "index".into(),
            what: "key k".into(),
            holder: "n1e1s1".into(),
            waited_ms: 10,
        };
        let status = proto::error_status(
            "conflict",
            &v1::ErrorDetail::resource(Some(xid()), &conflict),
        );
        let e = error(Some(xid()), Some("kv"), &status);
        assert!(
            matches!(&e, ConcordError::Resource(r) if *r == conflict),
            "{e:?}"
        );
        assert!(e.is_retryable());
        let wrong = proto::error_status(
            "wrong kind",
            &v1::ErrorDetail {
                code: ErrorCode::WrongKind as i32,
                resource: "uploads".into(),
                ..v1::ErrorDetail::default()
            },
        );
        assert!(matches!(
            error(Some(xid()), Some("kv"), &wrong),
            ConcordError::WrongKind { expected: "kv", .. }
        ));
    }

    #[test]
    fn the_transport_is_unreachable_and_retryable() {
        let cut = tonic::Status::unavailable("connection reset");
        assert!(is_transport(&cut));
        let e = error(Some(xid()), None, &cut);
        assert!(
            matches!(e, ConcordError::Unreachable { .. }) && e.is_retryable(),
            "{e:?}"
        );
        let refused = tonic::Status::unauthenticated("no token");
        let e = error(None, None, &refused);
        assert!(matches!(e, ConcordError::Unauthorized { .. }) && !e.is_retryable());
    }
}
