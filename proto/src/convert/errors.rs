//! Errors on the wire: [`ErrorClass`] both ways, a resource's error as a typed
//! [`v1::ResourceError`] (every variant, exactly, both ways), and the [`ErrorDetail`] every
//! error status carries, with the gRPC code each travels with.

use super::*;

impl From<adapters::ErrorClass> for ErrorClass {
    fn from(class: adapters::ErrorClass) -> ErrorClass {
        match class {
            adapters::ErrorClass::Retryable => ErrorClass::Retryable,
            adapters::ErrorClass::Rejected => ErrorClass::Rejected,
            adapters::ErrorClass::InDoubt => ErrorClass::InDoubt,
            adapters::ErrorClass::Fatal => ErrorClass::Fatal,
            adapters::ErrorClass::Hazard => ErrorClass::Hazard,
        }
    }
}

impl TryFrom<ErrorClass> for adapters::ErrorClass {
    type Error = WireError;

    fn try_from(class: ErrorClass) -> Result<adapters::ErrorClass, WireError> {
        Ok(match class {
            ErrorClass::Unspecified => {
                return Err(WireError::BadEnum {
                    field: "ErrorDetail.error_class",
                    value: 0,
                });
            }
            ErrorClass::Retryable => adapters::ErrorClass::Retryable,
            ErrorClass::Rejected => adapters::ErrorClass::Rejected,
            ErrorClass::InDoubt => adapters::ErrorClass::InDoubt,
            ErrorClass::Fatal => adapters::ErrorClass::Fatal,
            ErrorClass::Hazard => adapters::ErrorClass::Hazard,
        })
    }
}

impl From<&adapters::ResourceError> for v1::ResourceError {
    fn from(e: &adapters::ResourceError) -> v1::ResourceError {
        use adapters::ResourceError as E;
        use resource_error::Kind;
        let kind = match e {
            E::Unavailable { message, .. } => Kind::Unavailable(resource_error::Unavailable {
                message: message.clone(),
            }),
            E::Rejected { reason, .. } => Kind::Rejected(resource_error::Rejected {
                reason: reason.clone(),
            }),
            E::Conflict {
                what,
                holder,
                waited_ms,
                ..
            } => Kind::Conflict(resource_error::Conflict {
                what: what.clone(),
                holder: holder.clone(),
                waited_ms: *waited_ms,
            }),
            E::Fenced {
                offered, current, ..
            } => Kind::Fenced(resource_error::Fenced {
                offered: offered.0,
                current: current.0,
            }),
            E::InDoubt { message, .. } => Kind::InDoubt(resource_error::ResourceInDoubt {
                message: message.clone(),
            }),
            E::Fatal { message, .. } => Kind::Fatal(resource_error::Fatal {
                message: message.clone(),
            }),
            E::HeuristicHazard { message, .. } => {
                Kind::HeuristicHazard(resource_error::HeuristicHazard {
                    message: message.clone(),
                })
            }
            E::ContentLost {
                path,
                blob,
                bytes,
                found,
                ..
            } => Kind::ContentLost(resource_error::ContentLost {
                path: path.clone(),
                blob: blob.0.to_vec(),
                size_bytes: *bytes,
                found: found.clone(),
            }),
            E::BlobMismatch {
                expected,
                actual,
                bytes,
                ..
            } => Kind::BlobMismatch(resource_error::BlobMismatch {
                expected: expected.0.to_vec(),
                actual: actual.0.to_vec(),
                size_bytes: *bytes,
            }),
        };
        v1::ResourceError {
            resource: e.resource().to_string(),
            kind: Some(kind),
        }
    }
}

impl TryFrom<v1::ResourceError> for adapters::ResourceError {
    type Error = WireError;

    fn try_from(e: v1::ResourceError) -> Result<adapters::ResourceError, WireError> {
        use adapters::ResourceError as E;
        use resource_error::Kind;
        let resource = required("ResourceError.resource", e.resource)?;
        let kind = e.kind.ok_or(WireError::Missing {
            field: "ResourceError.kind",
        })?;
        Ok(match kind {
            Kind::Unavailable(k) => E::Unavailable {
                resource,
                message: k.message,
            },
            Kind::Rejected(k) => E::Rejected {
                resource,
                reason: k.reason,
            },
            Kind::Conflict(k) => E::Conflict {
                resource,
                what: k.what,
                holder: k.holder,
                waited_ms: k.waited_ms,
            },
            Kind::Fenced(k) => E::Fenced {
                resource,
                offered: Epoch(k.offered),
                current: Epoch(k.current),
            },
            Kind::InDoubt(k) => E::InDoubt {
                resource,
                message: k.message,
            },
            Kind::Fatal(k) => E::Fatal {
                resource,
                message: k.message,
            },
            Kind::HeuristicHazard(k) => E::HeuristicHazard {
                resource,
                message: k.message,
            },
            Kind::ContentLost(k) => E::ContentLost {
                resource,
                path: k.path,
                blob: blob_id("ResourceError.ContentLost.blob", &k.blob)?,
                bytes: k.size_bytes,
                found: k.found,
            },
            Kind::BlobMismatch(k) => E::BlobMismatch {
                resource,
                expected: blob_id("ResourceError.BlobMismatch.expected", &k.expected)?,
                actual: blob_id("ResourceError.BlobMismatch.actual", &k.actual)?,
                bytes: k.size_bytes,
            },
        })
    }
}

impl ErrorDetail {
    /// The detail of a resource's error (`ErrorCode::Resource`), for the transaction `xid`
    /// when there is one; `retryable` when the resource could not answer or met another
    /// transaction's write.
    pub fn resource(xid: Option<Xid>, e: &adapters::ResourceError) -> ErrorDetail {
        ErrorDetail {
            code: ErrorCode::Resource as i32,
            xid: xid.map(xid_text).unwrap_or_default(),
            resource: e.resource().to_string(),
            error_class: ErrorClass::from(e.class()) as i32,
            retryable: branch_error_retryable(e),
            resource_error: Some(e.into()),
            ..ErrorDetail::default()
        }
    }

    /// The detail of a transaction that rolled back (`ErrorCode::RolledBack`).
    pub fn rolled_back(xid: Xid, cause: RollbackCause) -> ErrorDetail {
        let branch = cause.branch_error.as_ref();
        ErrorDetail {
            code: ErrorCode::RolledBack as i32,
            xid: xid_text(xid),
            resource: branch.map(|e| e.resource.clone()).unwrap_or_default(),
            retryable: cause.retryable,
            rollback: Some(cause),
            ..ErrorDetail::default()
        }
    }

    /// The detail of a configured limit (`ErrorCode::LimitExceeded`): its configuration name
    /// and value.
    pub fn limit(limit: &str, limit_value: u64) -> ErrorDetail {
        ErrorDetail {
            code: ErrorCode::LimitExceeded as i32,
            limit: limit.to_string(),
            limit_value,
            ..ErrorDetail::default()
        }
    }

    /// Whether a resource's error behind this detail is a conflict with another transaction.
    fn is_conflict(&self) -> bool {
        self.resource_error
            .as_ref()
            .is_some_and(|e| matches!(e.kind, Some(resource_error::Kind::Conflict(_))))
    }

    /// The gRPC code this detail travels with (the table in the .proto's header).
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        let class = ErrorClass::try_from(self.error_class).unwrap_or(ErrorClass::Unspecified);
        match ErrorCode::try_from(self.code).unwrap_or(ErrorCode::Unspecified) {
            ErrorCode::Unspecified => Code::Unknown,
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::UnknownXid | ErrorCode::UnknownResource => Code::NotFound,
            ErrorCode::IncompatibleSchema
            | ErrorCode::WrongKind
            | ErrorCode::TxnFinished
            | ErrorCode::AlreadyRolledBack
            | ErrorCode::AlreadyCommitted
            | ErrorCode::Refused => Code::FailedPrecondition,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::LimitExceeded => Code::ResourceExhausted,
            ErrorCode::RolledBack if self.retryable => Code::Aborted,
            ErrorCode::RolledBack => Code::FailedPrecondition,
            ErrorCode::Resource => match class {
                ErrorClass::Retryable => Code::Unavailable,
                ErrorClass::Rejected if self.is_conflict() => Code::Aborted,
                ErrorClass::Rejected => Code::FailedPrecondition,
                _ => Code::Internal,
            },
            ErrorCode::Draining | ErrorCode::NotPrimaryUnavailable => Code::Unavailable,
            ErrorCode::NotPrimary => Code::FailedPrecondition,
            ErrorCode::Journal => Code::Internal,
            ErrorCode::NotConfirmed => Code::FailedPrecondition,
        }
    }
}
