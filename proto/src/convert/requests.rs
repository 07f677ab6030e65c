//! Each request as the checked call the daemon acts on: header checked, xid parsed, required
//! fields present.

use super::*;

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
        let xid = parse_xid("RollbackRequest.xid", &r.xid)?;
        if r.reason.len() > super::REASON_BYTES_MAX {
            return Err(WireError::Invalid {
                field: "RollbackRequest.reason",
                reason: format!(
                    "{} bytes; at most {}",
                    r.reason.len(),
                    super::REASON_BYTES_MAX
                ),
            });
        }
        Ok(XidCall {
            xid,
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
