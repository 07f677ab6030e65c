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

/// Checks a request's header: present, with a schema revision this end serves. Returns the
/// client's revision.
pub fn check_header(field: &'static str, header: Option<&RequestHeader>) -> Result<u32, WireError> {
    let header = header.ok_or(WireError::Missing { field })?;
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

// ---------------------------------------------------------------------------------------------
// Errors

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

/// Whether running the whole transaction again can succeed after a branch failed with `e`: it
/// could not answer, or another transaction held what it wanted to write.
fn branch_error_retryable(e: &adapters::ResourceError) -> bool {
    e.is_retryable() || matches!(e, adapters::ResourceError::Conflict { .. })
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
            ErrorCode::Draining | ErrorCode::NotPrimary => Code::Unavailable,
            ErrorCode::Journal => Code::Internal,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outcomes

/// What became of an xid: the domain side of [`TxnOutcome`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidOutcome {
    /// The transaction.
    pub xid: Xid,
    /// Its state.
    pub state: XidState,
}

/// The state of an xid, as `Outcome` answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XidState {
    /// Committed, rolled back or in doubt, as the coordinator answered its commit.
    Ended(Outcome),
    /// Still open.
    Open,
    /// Nothing is known of it.
    Unknown,
}

impl RollbackCause {
    /// The cause of a coordinator's [`Outcome::RolledBack`]: the branch's error when one made
    /// it roll back ([`RollbackKind::Branch`]), else the coordinator's words
    /// ([`RollbackKind::Coordinator`]).
    pub fn from_outcome(reason: &str, failed: Option<&adapters::ResourceError>) -> RollbackCause {
        let kind = if failed.is_some() {
            RollbackKind::Branch
        } else {
            RollbackKind::Coordinator
        };
        RollbackCause {
            kind: kind as i32,
            reason: reason.to_string(),
            timeout_ms: 0,
            branch_error: failed.map(Into::into),
            retryable: failed.is_some_and(branch_error_retryable),
        }
    }
}

impl From<&XidOutcome> for TxnOutcome {
    fn from(outcome: &XidOutcome) -> TxnOutcome {
        use txn_outcome::State;
        let state = match &outcome.state {
            XidState::Ended(Outcome::Committed { lsn }) => State::Committed(v1::Committed {
                decision_lsn: lsn.map(|l| l.0),
            }),
            XidState::Ended(Outcome::RolledBack { reason, failed }) => {
                State::RolledBack(v1::RolledBack {
                    cause: Some(RollbackCause::from_outcome(reason, failed.as_ref())),
                })
            }
            XidState::Ended(Outcome::InDoubt { error, branch }) => State::InDoubt(v1::InDoubt {
                error: error.clone(),
                branch: branch.clone(),
            }),
            XidState::Open => State::Open(v1::Open {}),
            XidState::Unknown => State::Unknown(v1::Unknown {}),
        };
        TxnOutcome {
            xid: xid_text(outcome.xid),
            state: Some(state),
        }
    }
}

impl TryFrom<TxnOutcome> for XidOutcome {
    type Error = WireError;

    fn try_from(outcome: TxnOutcome) -> Result<XidOutcome, WireError> {
        use txn_outcome::State;
        let xid = parse_xid("TxnOutcome.xid", &outcome.xid)?;
        let state = match outcome.state.ok_or(WireError::Missing {
            field: "TxnOutcome.state",
        })? {
            State::Committed(c) => XidState::Ended(Outcome::Committed {
                lsn: c
                    .decision_lsn
                    .map(|l| parse_lsn("Committed.decision_lsn", l))
                    .transpose()?,
            }),
            State::RolledBack(r) => {
                let cause = r.cause.ok_or(WireError::Missing {
                    field: "RolledBack.cause",
                })?;
                let kind: RollbackKind = parse_enum("RollbackCause.kind", cause.kind)?;
                let failed = match (kind, cause.branch_error) {
                    (RollbackKind::Branch, None) => {
                        return Err(WireError::Missing {
                            field: "RollbackCause.branch_error",
                        });
                    }
                    (_, error) => error.map(adapters::ResourceError::try_from).transpose()?,
                };
                XidState::Ended(Outcome::RolledBack {
                    reason: cause.reason,
                    failed,
                })
            }
            State::InDoubt(d) => XidState::Ended(Outcome::InDoubt {
                error: d.error,
                branch: d.branch,
            }),
            State::Unknown(_) => XidState::Unknown,
            State::Open(_) => XidState::Open,
        };
        Ok(XidOutcome { xid, state })
    }
}

// ---------------------------------------------------------------------------------------------
// Operator calls

impl From<bool> for Decision {
    fn from(commit: bool) -> Decision {
        if commit {
            Decision::Commit
        } else {
            Decision::Rollback
        }
    }
}

/// Whether `decision` (in `field`) commits.
fn commits(field: &'static str, decision: i32) -> Result<bool, WireError> {
    Ok(parse_enum::<Decision>(field, decision)? == Decision::Commit)
}

impl From<&DomainResolution> for v1::Resolution {
    fn from(r: &DomainResolution) -> v1::Resolution {
        v1::Resolution {
            decision: Decision::from(r.commit) as i32,
            operator: r.operator.clone(),
            at_ms: r.at_ms,
        }
    }
}

impl TryFrom<v1::Resolution> for DomainResolution {
    type Error = WireError;

    fn try_from(r: v1::Resolution) -> Result<DomainResolution, WireError> {
        Ok(DomainResolution {
            commit: commits("Resolution.decision", r.decision)?,
            operator: required("Resolution.operator", r.operator)?,
            at_ms: r.at_ms,
        })
    }
}

impl From<(&str, &BranchOutcome)> for BranchReport {
    fn from((resource, outcome): (&str, &BranchOutcome)) -> BranchReport {
        let (state, detail) = match outcome {
            BranchOutcome::Finished => (BranchState::Finished, String::new()),
            BranchOutcome::NotPrepared => (BranchState::NotPrepared, String::new()),
            BranchOutcome::Hazard(why) => (BranchState::Hazard, why.clone()),
            BranchOutcome::Unreached(why) => (BranchState::Unreached, why.clone()),
            BranchOutcome::Forgotten => (BranchState::Forgotten, String::new()),
        };
        BranchReport {
            resource: resource.to_string(),
            state: state as i32,
            detail,
        }
    }
}

impl TryFrom<BranchReport> for (String, BranchOutcome) {
    type Error = WireError;

    fn try_from(b: BranchReport) -> Result<(String, BranchOutcome), WireError> {
        let resource = required("BranchReport.resource", b.resource)?;
        let outcome = match parse_enum("BranchReport.state", b.state)? {
            BranchState::Unspecified => unreachable_unspecified("BranchReport.state")?,
            BranchState::Finished => BranchOutcome::Finished,
            BranchState::NotPrepared => BranchOutcome::NotPrepared,
            BranchState::Hazard => BranchOutcome::Hazard(b.detail),
            BranchState::Unreached => BranchOutcome::Unreached(b.detail),
            BranchState::Forgotten => BranchOutcome::Forgotten,
        };
        Ok((resource, outcome))
    }
}

/// `parse_enum` refuses the zero already; this keeps the match total without a panic.
fn unreachable_unspecified<T>(field: &'static str) -> Result<T, WireError> {
    Err(WireError::BadEnum { field, value: 0 })
}

impl From<&ResolveReport> for v1::ResolveResponse {
    fn from(r: &ResolveReport) -> v1::ResolveResponse {
        v1::ResolveResponse {
            xid: xid_text(r.xid),
            decision: Decision::from(r.commit) as i32,
            recorded: r.appended,
            resolution: r.resolution.as_ref().map(Into::into),
            finished: r.finished,
            branches: r
                .branches
                .iter()
                .map(|(resource, outcome)| BranchReport::from((resource.as_str(), outcome)))
                .collect(),
            decision_lsn: r.decision_lsn.map(|l| l.0),
        }
    }
}

impl TryFrom<v1::ResolveResponse> for ResolveReport {
    type Error = WireError;

    fn try_from(r: v1::ResolveResponse) -> Result<ResolveReport, WireError> {
        Ok(ResolveReport {
            xid: parse_xid("ResolveResponse.xid", &r.xid)?,
            commit: commits("ResolveResponse.decision", r.decision)?,
            branches: r
                .branches
                .into_iter()
                .map(<(String, BranchOutcome)>::try_from)
                .collect::<Result<_, _>>()?,
            finished: r.finished,
            decision_lsn: r
                .decision_lsn
                .map(|l| parse_lsn("ResolveResponse.decision_lsn", l))
                .transpose()?,
            resolution: r.resolution.map(DomainResolution::try_from).transpose()?,
            appended: r.recorded,
        })
    }
}

impl From<&DomainResolveRequest> for v1::ResolveRequest {
    fn from(r: &DomainResolveRequest) -> v1::ResolveRequest {
        v1::ResolveRequest {
            header: Some(RequestHeader::current("")),
            xid: xid_text(r.xid),
            decision: Decision::from(r.commit) as i32,
            operator: r.operator.clone(),
            forget: r.forget.clone(),
            reason: r.reason.clone(),
        }
    }
}

impl TryFrom<v1::ResolveRequest> for DomainResolveRequest {
    type Error = WireError;

    /// The coordinator's request; `unopened` is left empty (the daemon fills it in).
    fn try_from(r: v1::ResolveRequest) -> Result<DomainResolveRequest, WireError> {
        check_header("ResolveRequest.header", r.header.as_ref())?;
        Ok(DomainResolveRequest {
            xid: parse_xid("ResolveRequest.xid", &r.xid)?,
            commit: commits("ResolveRequest.decision", r.decision)?,
            operator: required("ResolveRequest.operator", r.operator)?,
            forget: r.forget,
            reason: r.reason,
            unopened: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Requests, as the daemon acts on them

/// Which transaction and resource a branch call is for: a checked [`v1::BranchTarget`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchTarget {
    /// The transaction.
    pub xid: Xid,
    /// The resource's configured name.
    pub resource: String,
}

impl TryFrom<v1::BranchTarget> for BranchTarget {
    type Error = WireError;

    fn try_from(t: v1::BranchTarget) -> Result<BranchTarget, WireError> {
        check_header("BranchTarget.header", t.header.as_ref())?;
        Ok(BranchTarget {
            xid: parse_xid("BranchTarget.xid", &t.xid)?,
            resource: required("BranchTarget.resource", t.resource)?,
        })
    }
}

impl From<&BranchTarget> for v1::BranchTarget {
    fn from(t: &BranchTarget) -> v1::BranchTarget {
        v1::BranchTarget {
            header: Some(RequestHeader::current("")),
            xid: xid_text(t.xid),
            resource: t.resource.clone(),
        }
    }
}

fn target(field: &'static str, t: Option<v1::BranchTarget>) -> Result<BranchTarget, WireError> {
    t.ok_or(WireError::Missing { field })?.try_into()
}

/// A checked [`v1::BeginRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begin {
    /// The client's schema revision.
    pub schema_version: u32,
    /// The timeout the client asks for (milliseconds).
    pub timeout_ms: Option<u64>,
}

impl TryFrom<v1::BeginRequest> for Begin {
    type Error = WireError;

    fn try_from(r: v1::BeginRequest) -> Result<Begin, WireError> {
        let schema_version = check_header("BeginRequest.header", r.header.as_ref())?;
        if r.timeout_ms == Some(0) {
            return Err(WireError::Invalid {
                field: "BeginRequest.timeout_ms",
                reason: "0 ms; leave it out for the daemon's timeout".into(),
            });
        }
        Ok(Begin {
            schema_version,
            timeout_ms: r.timeout_ms,
        })
    }
}

/// One checked message of a streamed write (`FilesPut`, `MailEnqueue`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamPart<S> {
    /// The first message: where the content goes.
    Start(S),
    /// A piece of content.
    Chunk(Vec<u8>),
}

/// Where a streamed file write goes: a checked [`v1::FilesPutStart`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePut {
    /// Transaction and resource.
    pub target: BranchTarget,
    /// The path, relative to the resource's root.
    pub path: String,
    /// The content's full size, when the client knows it (bytes).
    pub size_bytes: Option<u64>,
}

impl TryFrom<v1::FilesPutRequest> for StreamPart<FilePut> {
    type Error = WireError;

    fn try_from(r: v1::FilesPutRequest) -> Result<StreamPart<FilePut>, WireError> {
        use v1::files_put_request::Part;
        match r.part.ok_or(WireError::Missing {
            field: "FilesPutRequest.part",
        })? {
            Part::Start(s) => Ok(StreamPart::Start(FilePut {
                target: target("FilesPutStart.target", s.target)?,
                path: required("FilesPutStart.path", s.path)?,
                size_bytes: s.size_bytes,
            })),
            Part::Chunk(c) => Ok(StreamPart::Chunk(c)),
        }
    }
}

impl TryFrom<v1::MailEnqueueRequest> for StreamPart<BranchTarget> {
    type Error = WireError;

    fn try_from(r: v1::MailEnqueueRequest) -> Result<StreamPart<BranchTarget>, WireError> {
        use v1::mail_enqueue_request::Part;
        match r.part.ok_or(WireError::Missing {
            field: "MailEnqueueRequest.part",
        })? {
            Part::Start(t) => Ok(StreamPart::Start(t.try_into()?)),
            Part::Chunk(c) => Ok(StreamPart::Chunk(c)),
        }
    }
}

/// A call on one file: a checked [`v1::FilesDeleteRequest`] or [`v1::FilesReadRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCall {
    /// Transaction and resource.
    pub target: BranchTarget,
    /// The path, relative to the resource's root.
    pub path: String,
}

impl TryFrom<v1::FilesDeleteRequest> for FileCall {
    type Error = WireError;

    fn try_from(r: v1::FilesDeleteRequest) -> Result<FileCall, WireError> {
        Ok(FileCall {
            target: target("FilesDeleteRequest.target", r.target)?,
            path: required("FilesDeleteRequest.path", r.path)?,
        })
    }
}

impl TryFrom<v1::FilesReadRequest> for FileCall {
    type Error = WireError;

    fn try_from(r: v1::FilesReadRequest) -> Result<FileCall, WireError> {
        Ok(FileCall {
            target: target("FilesReadRequest.target", r.target)?,
            path: required("FilesReadRequest.path", r.path)?,
        })
    }
}

/// A call on one key: a checked [`v1::KvInsertRequest`] (with its value),
/// [`v1::KvRemoveRequest`] or [`v1::KvGetRequest`] (without).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCall {
    /// Transaction and resource.
    pub target: BranchTarget,
    /// The key (not empty).
    pub key: Vec<u8>,
    /// The value of an insert.
    pub value: Option<Vec<u8>>,
}

fn key(field: &'static str, key: Vec<u8>) -> Result<Vec<u8>, WireError> {
    if key.is_empty() {
        Err(WireError::Missing { field })
    } else {
        Ok(key)
    }
}

impl TryFrom<v1::KvInsertRequest> for KvCall {
    type Error = WireError;

    fn try_from(r: v1::KvInsertRequest) -> Result<KvCall, WireError> {
        Ok(KvCall {
            target: target("KvInsertRequest.target", r.target)?,
            key: key("KvInsertRequest.key", r.key)?,
            value: Some(r.value),
        })
    }
}

impl TryFrom<v1::KvRemoveRequest> for KvCall {
    type Error = WireError;

    fn try_from(r: v1::KvRemoveRequest) -> Result<KvCall, WireError> {
        Ok(KvCall {
            target: target("KvRemoveRequest.target", r.target)?,
            key: key("KvRemoveRequest.key", r.key)?,
            value: None,
        })
    }
}

impl TryFrom<v1::KvGetRequest> for KvCall {
    type Error = WireError;

    fn try_from(r: v1::KvGetRequest) -> Result<KvCall, WireError> {
        Ok(KvCall {
            target: target("KvGetRequest.target", r.target)?,
            key: key("KvGetRequest.key", r.key)?,
            value: None,
        })
    }
}

/// A checked [`v1::EnlistPreparedRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnlistPrepared {
    /// Transaction and resource.
    pub target: BranchTarget,
    /// The gid the branch was prepared under.
    pub gid: String,
    /// The branch's captured redo (opaque here).
    pub redo: Vec<u8>,
}

impl TryFrom<v1::EnlistPreparedRequest> for EnlistPrepared {
    type Error = WireError;

    fn try_from(r: v1::EnlistPreparedRequest) -> Result<EnlistPrepared, WireError> {
        Ok(EnlistPrepared {
            target: target("EnlistPreparedRequest.target", r.target)?,
            gid: required("EnlistPreparedRequest.gid", r.gid)?,
            redo: r.redo,
        })
    }
}

/// A call on one xid: a checked [`v1::CommitRequest`], [`v1::OutcomeRequest`] or
/// [`v1::RollbackRequest`] (with its reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidCall {
    /// The transaction.
    pub xid: Xid,
    /// A rollback's reason (may be empty).
    pub reason: String,
}

impl TryFrom<v1::CommitRequest> for XidCall {
    type Error = WireError;

    fn try_from(r: v1::CommitRequest) -> Result<XidCall, WireError> {
        check_header("CommitRequest.header", r.header.as_ref())?;
        Ok(XidCall {
            xid: parse_xid("CommitRequest.xid", &r.xid)?,
            reason: String::new(),
        })
    }
}

impl TryFrom<v1::OutcomeRequest> for XidCall {
    type Error = WireError;

    fn try_from(r: v1::OutcomeRequest) -> Result<XidCall, WireError> {
        check_header("OutcomeRequest.header", r.header.as_ref())?;
        Ok(XidCall {
            xid: parse_xid("OutcomeRequest.xid", &r.xid)?,
            reason: String::new(),
        })
    }
}

impl TryFrom<v1::RollbackRequest> for XidCall {
    type Error = WireError;

    fn try_from(r: v1::RollbackRequest) -> Result<XidCall, WireError> {
        check_header("RollbackRequest.header", r.header.as_ref())?;
        Ok(XidCall {
            xid: parse_xid("RollbackRequest.xid", &r.xid)?,
            reason: r.reason,
        })
    }
}

/// Checks a request that carries only its header (`ListInDoubt`, `Health`, `Status`); returns
/// the client's schema revision.
pub trait HeaderOnly {
    /// The request's header, checked.
    fn check(&self) -> Result<u32, WireError>;
}

impl HeaderOnly for v1::ListInDoubtRequest {
    fn check(&self) -> Result<u32, WireError> {
        check_header("ListInDoubtRequest.header", self.header.as_ref())
    }
}

impl HeaderOnly for v1::HealthRequest {
    fn check(&self) -> Result<u32, WireError> {
        check_header("HealthRequest.header", self.header.as_ref())
    }
}

impl HeaderOnly for v1::StatusRequest {
    fn check(&self) -> Result<u32, WireError> {
        check_header("StatusRequest.header", self.header.as_ref())
    }
}

#[cfg(test)]
mod tests;
