//! The participant's errors as gRPC statuses, with the codes of the table in
//! `coordinator.proto` and an `ErrorDetail` in each.

use adapters::Xid;
use coordinator::CoordError;
use participant::{ConcordError, RollbackCause};
use proto::convert::xid_text;
use proto::error_status;
use proto::v1::{self, ErrorCode, ErrorDetail, RollbackKind};

/// A detail of `code` about `xid`.
pub fn detail(code: ErrorCode, xid: Option<Xid>) -> ErrorDetail {
    ErrorDetail {
        code: code as i32,
        xid: xid.map(xid_text).unwrap_or_default(),
        ..ErrorDetail::default()
    }
}

/// An xid the daemon does not know (NOT_FOUND).
pub fn unknown_xid(xid: Xid) -> tonic::Status {
    error_status(
        format!(
            "transaction {xid} is not known to this daemon (never begun here, or finished long ago): ask Outcome, or begin a new one"
        ),
        &detail(ErrorCode::UnknownXid, Some(xid)),
    )
}

/// The daemon is stopping (UNAVAILABLE).
pub fn draining() -> tonic::Status {
    error_status(
        "the daemon is stopping and takes no new transactions: retry later",
        &detail(ErrorCode::Draining, None),
    )
}

/// A configured limit (RESOURCE_EXHAUSTED).
pub fn limit(name: &str, value: u64, what: &str) -> tonic::Status {
    error_status(
        format!("{what}: the limit {name} is {value}"),
        &ErrorDetail::limit(name, value),
    )
}

/// The wire form of a participant's rollback cause.
pub fn cause(cause: &RollbackCause) -> v1::RollbackCause {
    let retryable = cause.is_retryable();
    let mut wire = v1::RollbackCause {
        kind: RollbackKind::Coordinator as i32,
        reason: cause.to_string(),
        timeout_ms: 0,
        branch_error: None,
        retryable,
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
        _ => {}
    }
    wire
}

/// A participant's error about `xid` as a status.
pub fn status(xid: Xid, e: &ConcordError) -> tonic::Status {
    let message = e.to_string();
    let detail = match e {
        ConcordError::Resource(r) => ErrorDetail::resource(Some(xid), r),
        ConcordError::Coordinator(c) => return coord_status(xid, c),
        ConcordError::WrongKind { name, .. } => ErrorDetail {
            resource: name.clone(),
            ..detail(ErrorCode::WrongKind, Some(xid))
        },
        ConcordError::Finished { .. } => detail(ErrorCode::TxnFinished, Some(xid)),
        ConcordError::RolledBack { cause: c, .. } => ErrorDetail::rolled_back(xid, cause(c)),
        ConcordError::Journal(_) => detail(ErrorCode::Journal, Some(xid)),
        _ => detail(ErrorCode::Refused, Some(xid)),
    };
    error_status(message, &detail)
}

/// A coordinator's error about `xid` as a status.
pub fn coord_status(xid: Xid, e: &CoordError) -> tonic::Status {
    let message = e.to_string();
    let detail = match e {
        CoordError::UnknownResource { name, .. } => ErrorDetail {
            resource: name.clone(),
            ..detail(ErrorCode::UnknownResource, Some(xid))
        },
        CoordError::NotActive { .. } => detail(ErrorCode::TxnFinished, Some(xid)),
        CoordError::TimedOut { timeout_ms, .. } => ErrorDetail {
            rollback: Some(cause(&RollbackCause::TimedOut {
                timeout_ms: *timeout_ms,
            })),
            ..detail(ErrorCode::TxnFinished, Some(xid))
        },
        CoordError::Resource(r) => ErrorDetail::resource(Some(xid), r),
        CoordError::ShuttingDown => detail(ErrorCode::Draining, Some(xid)),
        CoordError::NotConfirmed { .. } => detail(ErrorCode::NotConfirmed, Some(xid)),
        CoordError::Journal(_) | CoordError::Record { .. } => detail(ErrorCode::Journal, Some(xid)),
        _ => detail(ErrorCode::Refused, Some(xid)),
    };
    error_status(message, &detail)
}
