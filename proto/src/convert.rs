//! Conversions between the wire messages of [`crate::v1`] and concord's domain types, in one
//! place.
//!
//! The daemon turns each request into the domain values it acts on with [`TryFrom`] (a
//! [`BranchTarget`], [`FilePut`], [`KvCall`], …, or the coordinator's own
//! [`ResolveRequest`](coordinator::resolve::ResolveRequest)); the answers go the other way with
//! [`From`]. A client decodes the answers back with [`TryFrom`] too. Every refusal is a
//! [`WireError`] naming the field (`message.field`): an xid that does not parse, an enum value
//! this revision does not know, a required field left out. Decoding never panics, whatever the
//! bytes.
//!
//! The scalars (xid, LSN, epoch, enum values, the request header) are parsed here; the rest is
//! grouped by seam: `errors` (error classes, resource errors, [`ErrorDetail`] and its gRPC
//! code), `outcome` ([`XidOutcome`]), `operator` (resolve requests and reports) and `requests`
//! (each request as the call the daemon acts on).
//!
//! # Caveats
//!
//! * A [`ResourceError`](adapters::ResourceError) crosses the wire whole (every variant and
//!   field), so it converts back exactly; a coordinator [`Outcome::RolledBack`] without a
//!   branch's error travels as a [`RollbackKind::Coordinator`] cause, and any cause without a
//!   branch error comes back as one.
//! * Paths, keys and gids are checked only for presence here; the resources check the rest.

use adapters::{BlobId, Epoch, Lsn, Xid};
use coordinator::Outcome;
use coordinator::ledger::Resolution as DomainResolution;
use coordinator::resolve::{BranchOutcome, ResolveReport, ResolveRequest as DomainResolveRequest};

use crate::SCHEMA_VERSION;
use crate::v1::{
    self, BranchReport, BranchState, Decision, ErrorClass, ErrorCode, ErrorDetail, RequestHeader,
    RollbackCause, RollbackKind, TxnOutcome, resource_error, txn_outcome,
};

/// A wire message that cannot become a domain value. Each names the field (`message.field`);
/// the daemon answers it with INVALID_ARGUMENT (FAILED_PRECONDITION for a schema revision
/// newer than its own), see [`WireError::status`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A required field was left out (or left empty).
    #[error("{field} is missing: it is required; set it and send the request again")]
    Missing {
        /// The field, as `message.field`.
        field: &'static str,
    },
    /// A text that must be an xid is not one.
    #[error(
        "{field} is {text:?}, which is not an xid (n<node>e<epoch>s<seq>): send the xid Begin returned"
    )]
    BadXid {
        /// The field.
        field: &'static str,
        /// What was sent (cut to 64 characters).
        text: String,
    },
    /// An enum value this revision of the schema does not know, or its UNSPECIFIED zero.
    #[error(
        "{field} is {value}, which is not a value of this schema revision: send one of the values the .proto defines"
    )]
    BadEnum {
        /// The field.
        field: &'static str,
        /// The value sent.
        value: i32,
    },
    /// A value out of its allowed range or shape.
    #[error("{field} is not valid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong, and what is allowed.
        reason: String,
    },
    /// The client's schema revision is newer than this end's.
    #[error(
        "the client speaks concord.v1 revision {sent}, newer than revision {served} served here: use a client generated from revision {served} or upgrade the daemon"
    )]
    IncompatibleSchema {
        /// The client's revision.
        sent: u32,
        /// The newest revision served here.
        served: u32,
    },
}

impl WireError {
    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            WireError::Missing { field }
            | WireError::BadXid { field, .. }
            | WireError::BadEnum { field, .. }
            | WireError::Invalid { field, .. } => field,
            WireError::IncompatibleSchema { .. } => "RequestHeader.schema_version",
        }
    }

    /// The typed detail of this error.
    pub fn detail(&self) -> ErrorDetail {
        let code = match self {
            WireError::IncompatibleSchema { .. } => ErrorCode::IncompatibleSchema,
            _ => ErrorCode::InvalidArgument,
        };
        ErrorDetail {
            code: code as i32,
            field: self.field().to_string(),
            ..ErrorDetail::default()
        }
    }

    /// The gRPC status the daemon answers with: INVALID_ARGUMENT, or FAILED_PRECONDITION for
    /// [`WireError::IncompatibleSchema`], with [`WireError::detail`] in its details.
    pub fn status(&self) -> tonic::Status {
        crate::error_status(self.to_string(), &self.detail())
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> tonic::Status {
        e.status()
    }
}

/// Parses the xid in `field`.
pub fn parse_xid(field: &'static str, text: &str) -> Result<Xid, WireError> {
    if text.is_empty() {
        return Err(WireError::Missing { field });
    }
    text.parse().map_err(|_| WireError::BadXid {
        field,
        text: text.chars().take(64).collect(),
    })
}

/// An xid's wire form: its text form `n<node>e<epoch>s<seq>`.
pub fn xid_text(xid: Xid) -> String {
    xid.text().as_str().to_string()
}

/// The LSN in `field`; LSNs start at 1, so 0 is refused.
pub fn parse_lsn(field: &'static str, lsn: u64) -> Result<Lsn, WireError> {
    if lsn == 0 {
        return Err(WireError::Invalid {
            field,
            reason: "0 is no LSN: LSNs start at 1".into(),
        });
    }
    Ok(Lsn(lsn))
}

/// The epoch in `field` (any value).
pub fn parse_epoch(epoch: u64) -> Epoch {
    Epoch(epoch)
}

/// The value of the enum in `field`; its UNSPECIFIED zero and values this revision does not
/// know are refused.
pub fn parse_enum<E: TryFrom<i32>>(field: &'static str, value: i32) -> Result<E, WireError> {
    if value == 0 {
        return Err(WireError::BadEnum { field, value });
    }
    E::try_from(value).map_err(|_| WireError::BadEnum { field, value })
}

/// The longest `RequestHeader.client_name` (bytes).
pub const CLIENT_NAME_BYTES_MAX: usize = 128;

/// The longest rollback reason a client may give (bytes); it is recorded with the rollback.
pub const REASON_BYTES_MAX: usize = 1024;

/// Checks a request's header: present, with a schema revision this end serves and a client name
/// of at most [`CLIENT_NAME_BYTES_MAX`]. Returns the client's revision.
pub fn check_header(field: &'static str, header: Option<&RequestHeader>) -> Result<u32, WireError> {
    let header = header.ok_or(WireError::Missing { field })?;
    if header.client_name.len() > CLIENT_NAME_BYTES_MAX {
        return Err(WireError::Invalid {
            field: "RequestHeader.client_name",
            reason: format!(
                "{} bytes; at most {CLIENT_NAME_BYTES_MAX}",
                header.client_name.len()
            ),
        });
    }
    match header.schema_version {
        0 => Err(WireError::Missing {
            field: "RequestHeader.schema_version",
        }),
        sent if sent > SCHEMA_VERSION => Err(WireError::IncompatibleSchema {
            sent,
            served: SCHEMA_VERSION,
        }),
        sent => Ok(sent),
    }
}

impl RequestHeader {
    /// The header of a client generated from this revision.
    pub fn current(client_name: impl Into<String>) -> RequestHeader {
        RequestHeader {
            schema_version: SCHEMA_VERSION,
            client_name: client_name.into(),
        }
    }
}

fn required(field: &'static str, text: String) -> Result<String, WireError> {
    if text.is_empty() {
        Err(WireError::Missing { field })
    } else {
        Ok(text)
    }
}

fn blob_id(field: &'static str, bytes: &[u8]) -> Result<BlobId, WireError> {
    let id: [u8; 32] = bytes.try_into().map_err(|_| WireError::Invalid {
        field,
        reason: format!("{} bytes; a blob id is 32 (a blake3 hash)", bytes.len()),
    })?;
    Ok(BlobId(id))
}

/// Whether running the whole transaction again can succeed after a branch failed with `e`: it
/// could not answer, or another transaction held what it wanted to write.
fn branch_error_retryable(e: &adapters::ResourceError) -> bool {
    e.is_retryable() || matches!(e, adapters::ResourceError::Conflict { .. })
}

mod errors;
mod operator;
mod outcome;
mod requests;

pub use outcome::{XidOutcome, XidState};
pub use requests::{
    Begin, BranchTarget, EnlistPrepared, FileCall, FilePut, HeaderOnly, KvCall, StreamPart, XidCall,
};

#[cfg(test)]
mod tests;
