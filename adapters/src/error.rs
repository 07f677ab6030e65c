//! The resources' one error type, sorted by what the coordinator must do.

use journal::Epoch;

/// What the caller must do about a [`ResourceError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The resource cannot answer now (it is down, busy, or a lock wait timed out for a reason
    /// that may pass): try again later. Phase 2 retries these with backoff until they succeed.
    Retryable,
    /// The request was refused and nothing changed: bad input, a conflict with another branch, a
    /// fenced epoch. In phase 1 the transaction rolls back.
    Rejected,
    /// The outcome of the operation is unknown (for example the connection broke during a
    /// commit). Ask again with `recover` or retry the idempotent operation.
    InDoubt,
    /// The resource is unusable in this process (a failed fsync, corrupt private state): stop
    /// using it; a restart recovers.
    Fatal,
    /// The branch's outcome contradicts the decision or cannot be established (for example a
    /// commit finds neither the prepared branch nor its commit marker); retrying will not help
    /// and a person must look. The coordinator ends the branch and reports it.
    Hazard,
}

/// An error of a resource, naming the resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// The resource cannot answer now; retry later. See [`ErrorClass::Retryable`]. Its message
    /// does not promise a retry: the caller that retries says so itself (phase 2, recovery and
    /// the orphan sweeper log "…; retrying in N ms"), one that does not (an operator command)
    /// says what to do.
    #[error("resource {resource}: {message}")]
    Unavailable {
        /// The resource name.
        resource: String,
        /// What failed.
        message: String,
    },
    /// The request was refused and nothing changed.
    #[error("resource {resource}: {reason}")]
    Rejected {
        /// The resource name.
        resource: String,
        /// Why, in words a person can act on.
        reason: String,
    },
    /// Another open branch holds what this branch wants to write; it waited `waited_ms` and gave up.
    #[error(
        "resource {resource}: {what} is being written by another transaction ({holder}); gave up after {waited_ms} ms"
    )]
    Conflict {
        /// The resource name.
        resource: String,
        /// The contended item (a path, a key).
        what: String,
        /// The transaction holding it.
        holder: String,
        /// How long this branch waited.
        waited_ms: u64,
    },
    /// The resource has been fenced at a higher epoch than this branch's.
    #[error(
        "resource {resource}: epoch {offered} is fenced (the resource is at epoch {current}); this node must stop"
    )]
    Fenced {
        /// The resource name.
        resource: String,
        /// The branch's epoch.
        offered: Epoch,
        /// The resource's fence epoch.
        current: Epoch,
    },
    /// The outcome is unknown.
    #[error("resource {resource}: outcome unknown: {message}")]
    InDoubt {
        /// The resource name.
        resource: String,
        /// What happened.
        message: String,
    },
    /// The resource is unusable in this process.
    #[error("resource {resource}: {message}; restart to recover")]
    Fatal {
        /// The resource name.
        resource: String,
        /// What failed.
        message: String,
    },
    /// A heuristic hazard: the branch's outcome contradicts the decision or cannot be
    /// established (a commit that finds neither the prepared transaction nor the mark of its
    /// commit). Retrying will not help; a person must look at the data. See
    /// [`ErrorClass::Hazard`].
    #[error("resource {resource}: heuristic hazard: {message}; a person must check the data")]
    HeuristicHazard {
        /// The resource name.
        resource: String,
        /// What was found, and what it contradicts.
        message: String,
    },
    /// Committed content that a commit (or the recovery at open) must put in place is nowhere:
    /// its staged file and its blob are gone, and the file at its path does not hold it. A
    /// restart does not help; an operator must bring the content back.
    #[error(
        "resource {resource}: the content of {path} (blake3 {blob}, {bytes} bytes) is lost: its staged file and its blob are gone and the file at the path {found}; put a file with exactly that content at the path (or the blob into the resource's blob store), from a backup or the standby, then retry"
    )]
    ContentLost {
        /// The resource name.
        resource: String,
        /// The path (relative to the resource's root) whose content is lost.
        path: String,
        /// The blake3 hash the content must have.
        blob: journal::BlobId,
        /// Its size in bytes.
        bytes: u64,
        /// What is at the path instead (missing, or another content).
        found: String,
    },
    /// A shipped blob's content does not hash to the id it was shipped as
    /// (`Resource::put_blob`); nothing of it was kept.
    #[error(
        "resource {resource}: the blob shipped as {expected} hashes to {actual} ({bytes} bytes): it was damaged on the way or read from the wrong place; nothing was stored, ship it again from the primary"
    )]
    BlobMismatch {
        /// The resource name.
        resource: String,
        /// The id it was shipped as.
        expected: journal::BlobId,
        /// What its content hashes to.
        actual: journal::BlobId,
        /// Its size in bytes.
        bytes: u64,
    },
}

impl ResourceError {
    /// What the caller must do.
    pub fn class(&self) -> ErrorClass {
        match self {
            ResourceError::Unavailable { .. } => ErrorClass::Retryable,
            ResourceError::Rejected { .. }
            | ResourceError::Conflict { .. }
            | ResourceError::Fenced { .. }
            | ResourceError::BlobMismatch { .. } => ErrorClass::Rejected,
            ResourceError::InDoubt { .. } => ErrorClass::InDoubt,
            ResourceError::Fatal { .. } | ResourceError::ContentLost { .. } => ErrorClass::Fatal,
            ResourceError::HeuristicHazard { .. } => ErrorClass::Hazard,
        }
    }

    /// The name of the resource that answered with this error.
    pub fn resource(&self) -> &str {
        match self {
            ResourceError::Unavailable { resource, .. }
            | ResourceError::Rejected { resource, .. }
            | ResourceError::Conflict { resource, .. }
            | ResourceError::Fenced { resource, .. }
            | ResourceError::InDoubt { resource, .. }
            | ResourceError::Fatal { resource, .. }
            | ResourceError::HeuristicHazard { resource, .. }
            | ResourceError::ContentLost { resource, .. }
            | ResourceError::BlobMismatch { resource, .. } => resource,
        }
    }

    /// Whether trying the same call again later can succeed ([`ErrorClass::Retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    /// A [`ResourceError::Rejected`].
    pub fn rejected(resource: impl Into<String>, reason: impl Into<String>) -> ResourceError {
        ResourceError::Rejected {
            resource: resource.into(),
            reason: reason.into(),
        }
    }

    /// An I/O failure, classified: a full disk or a permission problem is `Rejected` (nothing was
    /// changed by the failed step, the transaction rolls back); anything else is `Unavailable`.
    pub fn io(
        resource: &str,
        action: &str,
        path: &std::path::Path,
        e: &std::io::Error,
    ) -> ResourceError {
        let message = format!("{action} {}: {e}", path.display());
        match e.kind() {
            std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::PermissionDenied
            | std::io::ErrorKind::ReadOnlyFilesystem
            | std::io::ErrorKind::NotFound
            | std::io::ErrorKind::InvalidInput => ResourceError::rejected(resource, message),
            _ => ResourceError::Unavailable {
                resource: resource.to_string(),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a caller that retries may say so ("…; retrying in N ms"): the error itself names
    /// what failed and keeps its class.
    #[test]
    fn an_unavailable_resource_is_retryable_without_saying_so() {
        let e = ResourceError::Unavailable {
            resource: "orders".into(),
            message: "cannot connect to 127.0.0.1:5432".into(),
        };
        assert_eq!(e.class(), ErrorClass::Retryable);
        assert!(e.is_retryable());
        assert_eq!(
            e.to_string(),
            "resource orders: cannot connect to 127.0.0.1:5432"
        );
    }
}
