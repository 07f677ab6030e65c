use std::fmt::Debug;

use adapters::ResourceError as E;
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::{error_detail, error_status};

fn xid() -> Xid {
    Xid {
        node: 7,
        epoch: Epoch(3),
        seq: 1_730_000_000_000_042,
    }
}

fn header() -> Option<RequestHeader> {
    Some(RequestHeader::current("test"))
}

fn wire_target() -> Option<v1::BranchTarget> {
    Some(v1::BranchTarget {
        header: header(),
        xid: xid_text(xid()),
        resource: "docs".into(),
    })
}

fn every_resource_error() -> Vec<E> {
    vec![
        E::Unavailable {
            resource: "orders".into(),
            message: "connection refused".into(),
        },
        E::rejected("docs", "path escapes the root"),
        E::Conflict {
            resource: "index".into(),
            what: "key order/1".into(),
            holder: "n1e1s9".into(),
            waited_ms: 250,
        },
        E::Fenced {
            resource: "orders".into(),
            offered: Epoch(2),
            current: Epoch(5),
        },
        E::InDoubt {
            resource: "orders".into(),
            message: "connection lost during COMMIT PREPARED".into(),
        },
        E::Fatal {
            resource: "docs".into(),
            message: "fsync failed".into(),
        },
        E::HeuristicHazard {
            resource: "orders".into(),
            message: "neither the prepared branch nor its marker".into(),
        },
        E::ContentLost {
            resource: "docs".into(),
            path: "a/b.txt".into(),
            blob: BlobId::of(b"content"),
            bytes: 7,
            found: "missing".into(),
        },
        E::BlobMismatch {
            resource: "docs".into(),
            expected: BlobId::of(b"one"),
            actual: BlobId::of(b"two"),
            bytes: 3,
        },
    ]
}

/// Encodes `message`, decodes it back, and converts it.
fn over_the_wire<M: Message + Default>(message: &M) -> M {
    M::decode(message.encode_to_vec().as_slice()).expect("a message this test encoded decodes")
}

fn refused<T: Debug>(result: Result<T, WireError>, field: &str) -> WireError {
    let e = result.expect_err("malformed input is refused");
    assert_eq!(e.field(), field, "{e}");
    assert!(
        e.to_string().contains(field) || field.ends_with("schema_version"),
        "{e}"
    );
    e
}

#[test]
fn xids_travel_as_their_text_and_bad_ones_are_named() {
    let text = xid_text(xid());
    assert_eq!(text, "n7e3s1730000000000042");
    assert_eq!(parse_xid("CommitRequest.xid", &text), Ok(xid()));
    assert_eq!(
        parse_xid("CommitRequest.xid", ""),
        Err(WireError::Missing {
            field: "CommitRequest.xid"
        })
    );
    for bad in ["n7e3", "x", "n1e2s3 ", "n-1e2s3", "n99999999999e1s1"] {
        let e = refused(parse_xid("CommitRequest.xid", bad), "CommitRequest.xid");
        assert!(matches!(e, WireError::BadXid { .. }), "{e:?}");
    }
    let long = "z".repeat(100_000);
    match parse_xid("CommitRequest.xid", &long) {
        Err(WireError::BadXid { text, .. }) => assert_eq!(text.len(), 64),
        other => panic!("{other:?}"),
    }
}

#[test]
fn lsns_and_epochs() {
    assert_eq!(parse_lsn("f", 9), Ok(Lsn(9)));
    refused(
        parse_lsn("Committed.decision_lsn", 0),
        "Committed.decision_lsn",
    );
    assert_eq!(parse_epoch(4), Epoch(4));
}

#[test]
fn error_classes_round_trip_and_unspecified_is_refused() {
    use adapters::ErrorClass as C;
    for class in [C::Retryable, C::Rejected, C::InDoubt, C::Fatal, C::Hazard] {
        assert_eq!(C::try_from(ErrorClass::from(class)), Ok(class));
    }
    refused(
        C::try_from(ErrorClass::Unspecified),
        "ErrorDetail.error_class",
    );
}

#[test]
fn every_resource_error_round_trips_exactly() {
    for e in every_resource_error() {
        let wire = over_the_wire(&v1::ResourceError::from(&e));
        assert_eq!(E::try_from(wire), Ok(e.clone()));
    }
}

#[test]
fn malformed_resource_errors_are_refused_by_field() {
    let mut wire = v1::ResourceError::from(&every_resource_error()[0]);
    wire.kind = None;
    refused(E::try_from(wire), "ResourceError.kind");
    let mut wire = v1::ResourceError::from(&every_resource_error()[0]);
    wire.resource.clear();
    refused(E::try_from(wire), "ResourceError.resource");
    let mut wire = v1::ResourceError::from(&every_resource_error()[7]);
    if let Some(resource_error::Kind::ContentLost(lost)) = wire.kind.as_mut() {
        lost.blob.truncate(31);
    }
    refused(E::try_from(wire), "ResourceError.ContentLost.blob");
    let mut wire = v1::ResourceError::from(&every_resource_error()[8]);
    if let Some(resource_error::Kind::BlobMismatch(m)) = wire.kind.as_mut() {
        m.actual.push(0);
    }
    refused(E::try_from(wire), "ResourceError.BlobMismatch.actual");
}

#[test]
fn a_resource_error_becomes_a_detail_and_a_status_a_client_decodes() {
    for e in every_resource_error() {
        let detail = ErrorDetail::resource(Some(xid()), &e);
        assert_eq!(detail.code(), ErrorCode::Resource);
        assert_eq!(detail.xid, "n7e3s1730000000000042");
        assert_eq!(detail.resource, e.resource());
        assert_eq!(detail.error_class(), ErrorClass::from(e.class()));
        let conflict = matches!(e, E::Conflict { .. });
        assert_eq!(detail.retryable, e.is_retryable() || conflict);
        let status = error_status(e.to_string(), &detail);
        let expected = match e.class() {
            adapters::ErrorClass::Retryable => tonic::Code::Unavailable,
            adapters::ErrorClass::Rejected if conflict => tonic::Code::Aborted,
            adapters::ErrorClass::Rejected => tonic::Code::FailedPrecondition,
            _ => tonic::Code::Internal,
        };
        assert_eq!(status.code(), expected, "{e}");
        assert_eq!(status.message(), e.to_string());
        let back = error_detail(&status).expect("decodes").expect("present");
        assert_eq!(back, detail);
        let carried = back.resource_error.expect("the resource error travels");
        assert_eq!(E::try_from(carried), Ok(e));
    }
}

#[test]
fn status_codes_follow_the_documented_table() {
    use tonic::Code;
    let code = |c: ErrorCode, retryable: bool| {
        ErrorDetail {
            code: c as i32,
            retryable,
            ..ErrorDetail::default()
        }
        .grpc_code()
    };
    assert_eq!(code(ErrorCode::UnknownXid, false), Code::NotFound);
    assert_eq!(code(ErrorCode::UnknownResource, false), Code::NotFound);
    assert_eq!(
        code(ErrorCode::AlreadyRolledBack, false),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(ErrorCode::TxnFinished, false),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(ErrorCode::LimitExceeded, false),
        Code::ResourceExhausted
    );
    assert_eq!(
        code(ErrorCode::Unauthenticated, false),
        Code::Unauthenticated
    );
    assert_eq!(
        code(ErrorCode::PermissionDenied, false),
        Code::PermissionDenied
    );
    assert_eq!(code(ErrorCode::RolledBack, true), Code::Aborted);
    assert_eq!(code(ErrorCode::RolledBack, false), Code::FailedPrecondition);
    assert_eq!(code(ErrorCode::Draining, false), Code::Unavailable);
    assert_eq!(code(ErrorCode::NotPrimary, false), Code::FailedPrecondition);
    assert_eq!(code(ErrorCode::Journal, false), Code::Internal);
    assert_eq!(
        code(ErrorCode::IncompatibleSchema, false),
        Code::FailedPrecondition
    );
    let limit = ErrorDetail::limit("message_bytes_max", 4 << 20);
    assert_eq!(limit.grpc_code(), Code::ResourceExhausted);
    assert_eq!(limit.limit_value, 4 << 20);
    // A code of a newer revision is not guessed at.
    let newer = ErrorDetail {
        code: 999,
        ..ErrorDetail::default()
    };
    assert_eq!(newer.grpc_code(), Code::Unknown);
}

#[test]
fn statuses_without_or_with_garbage_details() {
    let plain = tonic::Status::unavailable("connection reset");
    assert_eq!(error_detail(&plain), Ok(None));
    let garbage = tonic::Status::with_details(
        tonic::Code::Internal,
        "proxy",
        vec![0xff, 0xff, 0xff].into(),
    );
    refused(error_detail(&garbage), "grpc-status-details-bin");
}

#[test]
fn wire_errors_become_invalid_argument_naming_the_field() {
    let e = WireError::Missing {
        field: "CommitRequest.xid",
    };
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("CommitRequest.xid"));
    let detail = error_detail(&status).expect("decodes").expect("present");
    assert_eq!(detail.code(), ErrorCode::InvalidArgument);
    assert_eq!(detail.field, "CommitRequest.xid");
}

fn every_outcome() -> Vec<XidState> {
    vec![
        XidState::Ended(Outcome::Committed { lsn: Some(Lsn(42)) }),
        XidState::Ended(Outcome::Committed { lsn: None }),
        XidState::Ended(Outcome::RolledBack {
            reason: "branch 0 could not prepare".into(),
            failed: Some(every_resource_error()[2].clone()),
        }),
        XidState::Ended(Outcome::RolledBack {
            reason: "the journal refused the decision".into(),
            failed: None,
        }),
        XidState::Ended(Outcome::InDoubt {
            error: "the answer of the one-phase commit was lost".into(),
            branch: Some("orders".into()),
        }),
        XidState::Ended(Outcome::InDoubt {
            error: "the journal failed".into(),
            branch: None,
        }),
        XidState::Open,
        XidState::Unknown,
    ]
}

#[test]
fn every_outcome_round_trips() {
    for state in every_outcome() {
        let outcome = XidOutcome { xid: xid(), state };
        let wire = over_the_wire(&TxnOutcome::from(&outcome));
        assert_eq!(XidOutcome::try_from(wire), Ok(outcome));
    }
}

#[test]
fn rollback_causes_say_whether_running_again_can_succeed() {
    let conflict = every_resource_error()[2].clone();
    let cause = RollbackCause::from_outcome("conflict", Some(&conflict));
    assert_eq!(cause.kind(), RollbackKind::Branch);
    assert!(
        cause.retryable,
        "a conflict with another transaction passes"
    );
    let fenced = every_resource_error()[3].clone();
    assert!(!RollbackCause::from_outcome("fenced", Some(&fenced)).retryable);
    let coordinator = RollbackCause::from_outcome("journal", None);
    assert_eq!(coordinator.kind(), RollbackKind::Coordinator);
    assert!(!coordinator.retryable);
    let detail = ErrorDetail::rolled_back(xid(), cause);
    assert_eq!(detail.resource, "index");
    assert_eq!(detail.grpc_code(), tonic::Code::Aborted);
}

#[test]
fn malformed_outcomes_are_refused_by_field() {
    let good = TxnOutcome::from(&XidOutcome {
        xid: xid(),
        state: every_outcome()[2].clone(),
    });
    let mut m = good.clone();
    m.state = None;
    refused(XidOutcome::try_from(m), "TxnOutcome.state");
    let mut m = good.clone();
    m.xid = "nope".into();
    refused(XidOutcome::try_from(m), "TxnOutcome.xid");
    for kind in [0, 99] {
        let mut m = good.clone();
        if let Some(txn_outcome::State::RolledBack(r)) = m.state.as_mut() {
            r.cause.as_mut().expect("set").kind = kind;
        }
        refused(XidOutcome::try_from(m), "RollbackCause.kind");
    }
    let mut m = good.clone();
    if let Some(txn_outcome::State::RolledBack(r)) = m.state.as_mut() {
        r.cause.as_mut().expect("set").branch_error = None;
    }
    refused(XidOutcome::try_from(m), "RollbackCause.branch_error");
    let mut m = good;
    m.state = Some(txn_outcome::State::RolledBack(v1::RolledBack {
        cause: None,
    }));
    refused(XidOutcome::try_from(m), "RolledBack.cause");
    let zero_lsn = TxnOutcome {
        xid: xid_text(xid()),
        state: Some(txn_outcome::State::Committed(v1::Committed {
            decision_lsn: Some(0),
        })),
    };
    refused(XidOutcome::try_from(zero_lsn), "Committed.decision_lsn");
}

fn report() -> ResolveReport {
    ResolveReport {
        xid: xid(),
        commit: true,
        branches: vec![
            ("docs".into(), BranchOutcome::Finished),
            ("mail".into(), BranchOutcome::NotPrepared),
            ("orders".into(), BranchOutcome::Hazard("no marker".into())),
            ("index".into(), BranchOutcome::Unreached("down".into())),
            ("old".into(), BranchOutcome::Forgotten),
        ],
        finished: false,
        decision_lsn: Some(Lsn(17)),
        resolution: Some(DomainResolution {
            commit: true,
            operator: "ops@site".into(),
            at_ms: 1_765_000_000_000,
        }),
        appended: true,
    }
}

fn same_report(a: &ResolveReport, b: &ResolveReport) {
    // ResolveReport is not PartialEq; its Debug form shows every field.
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
fn resolve_reports_round_trip() {
    let report = report();
    let wire = over_the_wire(&v1::ResolveResponse::from(&report));
    assert_eq!(wire.decision(), Decision::Commit);
    assert!(wire.recorded);
    same_report(
        &ResolveReport::try_from(wire).expect("converts back"),
        &report,
    );
    let nothing = ResolveReport {
        xid: xid(),
        commit: false,
        branches: Vec::new(),
        finished: true,
        decision_lsn: None,
        resolution: None,
        appended: false,
    };
    let wire = over_the_wire(&v1::ResolveResponse::from(&nothing));
    same_report(
        &ResolveReport::try_from(wire).expect("converts back"),
        &nothing,
    );
}

#[test]
fn malformed_resolve_reports_are_refused_by_field() {
    let good = v1::ResolveResponse::from(&report());
    let mut m = good.clone();
    m.branches[1].state = 42;
    refused(ResolveReport::try_from(m), "BranchReport.state");
    let mut m = good.clone();
    m.branches[0].resource.clear();
    refused(ResolveReport::try_from(m), "BranchReport.resource");
    let mut m = good.clone();
    m.decision = 0;
    refused(ResolveReport::try_from(m), "ResolveResponse.decision");
    let mut m = good;
    m.resolution.as_mut().expect("set").operator.clear();
    refused(ResolveReport::try_from(m), "Resolution.operator");
}

#[test]
fn resolve_requests_round_trip_and_are_checked() {
    let request = DomainResolveRequest {
        xid: xid(),
        commit: false,
        operator: "ops".into(),
        forget: vec!["old".into()],
        reason: "disk lost".into(),
        unopened: Vec::new(),
    };
    let wire = over_the_wire(&v1::ResolveRequest::from(&request));
    let back = DomainResolveRequest::try_from(wire.clone()).expect("converts back");
    assert_eq!(format!("{back:?}"), format!("{request:?}"));
    let mut m = wire.clone();
    m.decision = 3;
    refused(DomainResolveRequest::try_from(m), "ResolveRequest.decision");
    let mut m = wire.clone();
    m.operator.clear();
    refused(DomainResolveRequest::try_from(m), "ResolveRequest.operator");
    let mut m = wire;
    m.header = None;
    refused(DomainResolveRequest::try_from(m), "ResolveRequest.header");
}

#[test]
fn headers_are_required_and_a_newer_schema_is_refused() {
    let ok = v1::StatusRequest { header: header() };
    assert_eq!(ok.check(), Ok(SCHEMA_VERSION));
    refused(
        v1::HealthRequest { header: None }.check(),
        "HealthRequest.header",
    );
    let zero = v1::ListInDoubtRequest {
        header: Some(RequestHeader {
            schema_version: 0,
            client_name: String::new(),
        }),
    };
    refused(zero.check(), "RequestHeader.schema_version");
    let newer = v1::CommitRequest {
        header: Some(RequestHeader {
            schema_version: SCHEMA_VERSION + 1,
            client_name: "future".into(),
        }),
        xid: xid_text(xid()),
    };
    let e = refused(XidCall::try_from(newer), "RequestHeader.schema_version");
    assert_eq!(
        e,
        WireError::IncompatibleSchema {
            sent: SCHEMA_VERSION + 1,
            served: SCHEMA_VERSION
        }
    );
    let status = e.status();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let detail = error_detail(&status).expect("decodes").expect("present");
    assert_eq!(detail.code(), ErrorCode::IncompatibleSchema);
}

#[test]
fn long_client_names_are_refused() {
    let named = |len: usize| v1::HealthRequest {
        header: Some(RequestHeader::current("c".repeat(len))),
    };
    assert_eq!(named(CLIENT_NAME_BYTES_MAX).check(), Ok(SCHEMA_VERSION));
    refused(
        named(CLIENT_NAME_BYTES_MAX + 1).check(),
        "RequestHeader.client_name",
    );
}

#[test]
fn huge_declared_lengths_are_refused_before_allocating() {
    // Field 2 (a chunk, or an xid), length-delimited, declaring 2^62 bytes that never come.
    let mut bytes = vec![0x12];
    let mut len: u64 = 1 << 62;
    while len >= 0x80 {
        bytes.push((len as u8) | 0x80);
        len >>= 7;
    }
    bytes.push(len as u8);
    bytes.extend_from_slice(b"short");
    assert!(v1::FilesPutRequest::decode(bytes.as_slice()).is_err());
    assert!(v1::CommitRequest::decode(bytes.as_slice()).is_err());
    decode_everything(&bytes);
}

#[test]
fn requests_become_the_calls_the_daemon_acts_on() {
    let target = BranchTarget {
        xid: xid(),
        resource: "docs".into(),
    };
    assert_eq!(
        BranchTarget::try_from(over_the_wire(&v1::BranchTarget::from(&target))),
        Ok(target.clone())
    );
    let begin = v1::BeginRequest {
        header: header(),
        timeout_ms: Some(5_000),
    };
    assert_eq!(
        Begin::try_from(over_the_wire(&begin)),
        Ok(Begin {
            schema_version: SCHEMA_VERSION,
            timeout_ms: Some(5_000)
        })
    );
    let start = v1::FilesPutRequest {
        part: Some(v1::files_put_request::Part::Start(v1::FilesPutStart {
            target: wire_target(),
            path: "a/b.txt".into(),
            size_bytes: Some(3),
        })),
    };
    assert_eq!(
        StreamPart::<FilePut>::try_from(over_the_wire(&start)),
        Ok(StreamPart::Start(FilePut {
            target: target.clone(),
            path: "a/b.txt".into(),
            size_bytes: Some(3)
        }))
    );
    let chunk = v1::FilesPutRequest {
        part: Some(v1::files_put_request::Part::Chunk(b"abc".to_vec())),
    };
    assert_eq!(
        StreamPart::<FilePut>::try_from(over_the_wire(&chunk)),
        Ok(StreamPart::Chunk(b"abc".to_vec()))
    );
    let mail = v1::MailEnqueueRequest {
        part: wire_target().map(v1::mail_enqueue_request::Part::Start),
    };
    assert_eq!(
        StreamPart::<BranchTarget>::try_from(over_the_wire(&mail)),
        Ok(StreamPart::Start(target.clone()))
    );
    let delete = v1::FilesDeleteRequest {
        target: wire_target(),
        path: "a".into(),
    };
    assert_eq!(
        FileCall::try_from(over_the_wire(&delete)),
        Ok(FileCall {
            target: target.clone(),
            path: "a".into()
        })
    );
    let insert = v1::KvInsertRequest {
        target: wire_target(),
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    assert_eq!(
        KvCall::try_from(over_the_wire(&insert)),
        Ok(KvCall {
            target: target.clone(),
            key: b"k".to_vec(),
            value: Some(b"v".to_vec())
        })
    );
    let enlist = v1::EnlistPreparedRequest {
        target: wire_target(),
        gid: "concord:n7e3s1".into(),
        redo: vec![1, 2, 3],
    };
    assert_eq!(
        EnlistPrepared::try_from(over_the_wire(&enlist)),
        Ok(EnlistPrepared {
            target,
            gid: "concord:n7e3s1".into(),
            redo: vec![1, 2, 3]
        })
    );
    let rollback = v1::RollbackRequest {
        header: header(),
        xid: xid_text(xid()),
        reason: "user cancelled".into(),
    };
    assert_eq!(
        XidCall::try_from(over_the_wire(&rollback)),
        Ok(XidCall {
            xid: xid(),
            reason: "user cancelled".into()
        })
    );
}

#[test]
fn malformed_requests_are_refused_by_field() {
    refused(
        StreamPart::<FilePut>::try_from(v1::FilesPutRequest { part: None }),
        "FilesPutRequest.part",
    );
    let no_path = v1::FilesPutRequest {
        part: Some(v1::files_put_request::Part::Start(v1::FilesPutStart {
            target: wire_target(),
            path: String::new(),
            size_bytes: None,
        })),
    };
    refused(
        StreamPart::<FilePut>::try_from(no_path),
        "FilesPutStart.path",
    );
    let no_target = v1::FilesReadRequest {
        target: None,
        path: "a".into(),
    };
    refused(FileCall::try_from(no_target), "FilesReadRequest.target");
    let mut bad_xid = wire_target();
    bad_xid.as_mut().expect("set").xid = "n1e1".into();
    refused(
        KvCall::try_from(v1::KvGetRequest {
            target: bad_xid,
            key: b"k".to_vec(),
        }),
        "BranchTarget.xid",
    );
    refused(
        KvCall::try_from(v1::KvRemoveRequest {
            target: wire_target(),
            key: Vec::new(),
        }),
        "KvRemoveRequest.key",
    );
    let mut no_resource = wire_target();
    no_resource.as_mut().expect("set").resource.clear();
    refused(
        EnlistPrepared::try_from(v1::EnlistPreparedRequest {
            target: no_resource,
            gid: "g".into(),
            redo: Vec::new(),
        }),
        "BranchTarget.resource",
    );
    refused(
        EnlistPrepared::try_from(v1::EnlistPreparedRequest {
            target: wire_target(),
            gid: String::new(),
            redo: Vec::new(),
        }),
        "EnlistPreparedRequest.gid",
    );
    refused(
        Begin::try_from(v1::BeginRequest {
            header: header(),
            timeout_ms: Some(0),
        }),
        "BeginRequest.timeout_ms",
    );
    refused(
        XidCall::try_from(v1::OutcomeRequest {
            header: header(),
            xid: String::new(),
        }),
        "OutcomeRequest.xid",
    );
}

/// Decodes `bytes` as `M` and converts it with `convert`: an error either way is fine, a panic
/// is not.
fn decode_and_convert<M: Message + Default, T>(bytes: &[u8], convert: impl Fn(M) -> T) {
    if let Ok(message) = M::decode(bytes) {
        let _ = convert(message);
    }
}

/// Every request and every answer a client decodes, from `bytes`.
fn decode_everything(bytes: &[u8]) {
    decode_and_convert(bytes, |m: v1::BeginRequest| Begin::try_from(m));
    decode_and_convert(bytes, |m: v1::FilesPutRequest| {
        StreamPart::<FilePut>::try_from(m)
    });
    decode_and_convert(bytes, |m: v1::MailEnqueueRequest| {
        StreamPart::<BranchTarget>::try_from(m)
    });
    decode_and_convert(bytes, |m: v1::FilesDeleteRequest| FileCall::try_from(m));
    decode_and_convert(bytes, |m: v1::FilesReadRequest| FileCall::try_from(m));
    decode_and_convert(bytes, |m: v1::KvInsertRequest| KvCall::try_from(m));
    decode_and_convert(bytes, |m: v1::KvRemoveRequest| KvCall::try_from(m));
    decode_and_convert(bytes, |m: v1::KvGetRequest| KvCall::try_from(m));
    decode_and_convert(bytes, |m: v1::EnlistPreparedRequest| {
        EnlistPrepared::try_from(m)
    });
    decode_and_convert(bytes, |m: v1::CommitRequest| XidCall::try_from(m));
    decode_and_convert(bytes, |m: v1::RollbackRequest| XidCall::try_from(m));
    decode_and_convert(bytes, |m: v1::OutcomeRequest| XidCall::try_from(m));
    decode_and_convert(bytes, |m: v1::ResolveRequest| {
        DomainResolveRequest::try_from(m)
    });
    decode_and_convert(bytes, |m: v1::ListInDoubtRequest| m.check());
    decode_and_convert(bytes, |m: v1::HealthRequest| m.check());
    decode_and_convert(bytes, |m: v1::StatusRequest| m.check());
    decode_and_convert(bytes, |m: TxnOutcome| XidOutcome::try_from(m));
    decode_and_convert(bytes, |m: v1::ResolveResponse| ResolveReport::try_from(m));
    decode_and_convert(bytes, |m: ErrorDetail| {
        let _ = m.grpc_code();
        m.resource_error.map(E::try_from)
    });
    let status = tonic::Status::with_details(tonic::Code::Internal, "x", bytes.to_vec().into());
    let _ = error_detail(&status);
}

/// Any resource error, with any text and numbers.
fn any_resource_error() -> impl Strategy<Value = E> {
    let name = "[a-z][a-z0-9_]{0,15}";
    let text = any::<String>();
    let blob = any::<[u8; 32]>().prop_map(BlobId);
    prop_oneof![
        (name, text).prop_map(|(resource, message)| E::Unavailable { resource, message }),
        (name, text).prop_map(|(resource, reason)| E::Rejected { resource, reason }),
        (name, text, text, any::<u64>()).prop_map(|(resource, what, holder, waited_ms)| {
            E::Conflict {
                resource,
                what,
                holder,
                waited_ms,
            }
        }),
        (name, any::<u64>(), any::<u64>()).prop_map(|(resource, offered, current)| E::Fenced {
            resource,
            offered: Epoch(offered),
            current: Epoch(current)
        }),
        (name, text).prop_map(|(resource, message)| E::InDoubt { resource, message }),
        (name, text).prop_map(|(resource, message)| E::Fatal { resource, message }),
        (name, text).prop_map(|(resource, message)| E::HeuristicHazard { resource, message }),
        (name, text, blob.clone(), any::<u64>(), text).prop_map(
            |(resource, path, blob, bytes, found)| E::ContentLost {
                resource,
                path,
                blob,
                bytes,
                found
            }
        ),
        (name, blob.clone(), blob, any::<u64>()).prop_map(|(resource, expected, actual, bytes)| {
            E::BlobMismatch {
                resource,
                expected,
                actual,
                bytes,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn any_resource_error_round_trips(e in any_resource_error()) {
        let wire = over_the_wire(&v1::ResourceError::from(&e));
        prop_assert_eq!(E::try_from(wire), Ok(e.clone()));
        let detail = over_the_wire(&ErrorDetail::resource(None, &e));
        let back = detail.resource_error.map(E::try_from);
        prop_assert_eq!(back, Some(Ok(e)));
    }

    #[test]
    fn any_outcome_round_trips(
        xid in (any::<u32>(), any::<u64>(), any::<u64>()),
        lsn in proptest::option::of(1..u64::MAX),
        reason in any::<String>(),
        failed in proptest::option::of(any_resource_error()),
        branch in proptest::option::of("[a-z]{1,8}"),
        pick in 0..5u8,
    ) {
        let xid = Xid { node: xid.0, epoch: Epoch(xid.1), seq: xid.2 };
        let state = match pick {
            0 => XidState::Ended(Outcome::Committed { lsn: lsn.map(Lsn) }),
            1 => XidState::Ended(Outcome::RolledBack { reason, failed }),
            2 => XidState::Ended(Outcome::InDoubt { error: reason, branch }),
            3 => XidState::Open,
            _ => XidState::Unknown,
        };
        let outcome = XidOutcome { xid, state };
        let wire = over_the_wire(&TxnOutcome::from(&outcome));
        prop_assert_eq!(XidOutcome::try_from(wire), Ok(outcome));
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        // Random bytes rarely decode; flipping bytes of valid messages reaches the conversions.
        let samples = [
            TxnOutcome::from(&XidOutcome { xid: xid(), state: every_outcome()[2].clone() })
                .encode_to_vec(),
            v1::ResolveResponse::from(&report()).encode_to_vec(),
            ErrorDetail::resource(Some(xid()), &every_resource_error()[7]).encode_to_vec(),
            v1::FilesPutRequest {
                part: Some(v1::files_put_request::Part::Start(v1::FilesPutStart {
                    target: wire_target(),
                    path: "a/b".into(),
                    size_bytes: Some(1),
                })),
            }
            .encode_to_vec(),
        ];
        for mut bytes in samples {
            for &(at, value) in &flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            decode_everything(&bytes);
        }
    }

    #[test]
    fn any_xid_round_trips(node in any::<u32>(), epoch in any::<u64>(), seq in any::<u64>()) {
        let xid = Xid { node, epoch: Epoch(epoch), seq };
        prop_assert_eq!(parse_xid("f", &xid_text(xid)), Ok(xid));
    }
}

#[test]
fn a_rollback_reason_is_kept_and_bounded() {
    let request = |reason: String| v1::RollbackRequest {
        header: header(),
        xid: "n1e1s1".into(),
        reason,
    };
    let call = XidCall::try_from(request("changed my mind".into())).unwrap();
    assert_eq!(call.reason, "changed my mind");
    let long = "x".repeat(REASON_BYTES_MAX + 1);
    match XidCall::try_from(request(long)) {
        Err(WireError::Invalid { field, .. }) => assert_eq!(field, "RollbackRequest.reason"),
        other => panic!("a long reason was not refused: {other:?}"),
    }
}
