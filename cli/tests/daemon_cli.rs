//! `concord coordinator`, the real binary: started on a free loopback port, driven with the
//! generated tonic client. A transaction over files (a streamed 3 MiB put), mail and kv commits
//! and one rolls back; the outcomes, a second commit, work after commit, an unknown and a
//! malformed xid answer as `coordinator.proto`'s table says; SIGTERM stops it with exit 0, and
//! a restart on the same data directory still knows the committed xid from the journal. A
//! non-loopback listen address is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{
    Daemon, INDEX, OPEN_DAEMON, code_of, eventually, header, target, write_config,
};
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{self, ErrorCode, RequestHeader, txn_outcome::State};
use tonic::Code;
use tonic::transport::Channel;

/// How long phase 2 may take to show a commit in the stores.
const VISIBLE_MS_MAX: u64 = 10_000;
/// The size of the streamed put, and of its chunks.
const PUT_BYTES: usize = 3 << 20;
const CHUNK_BYTES: usize = 256 << 10;

async fn begin(client: &mut CoordinatorClient<Channel>) -> v1::BeginResponse {
    client
        .begin(v1::BeginRequest {
            header: header(),
            timeout_ms: None,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn put(
    client: &mut CoordinatorClient<Channel>,
    xid: &str,
    path: &str,
    content: &[u8],
) -> Result<u64, tonic::Status> {
    use v1::files_put_request::Part;
    let mut messages = vec![v1::FilesPutRequest {
        part: Some(Part::Start(v1::FilesPutStart {
            target: target(xid, "uploads"),
            path: path.to_string(),
            size_bytes: Some(content.len() as u64),
        })),
    }];
    messages.extend(content.chunks(CHUNK_BYTES).map(|c| v1::FilesPutRequest {
        part: Some(Part::Chunk(c.to_vec())),
    }));
    let stream = tonic::codegen::tokio_stream::iter(messages);
    Ok(client.files_put(stream).await?.into_inner().size_bytes)
}

async fn kv_insert(
    client: &mut CoordinatorClient<Channel>,
    xid: &str,
    key: &[u8],
    value: &[u8],
) -> Result<(), tonic::Status> {
    client
        .kv_insert(v1::KvInsertRequest {
            target: target(xid, "index"),
            key: key.to_vec(),
            value: value.to_vec(),
        })
        .await
        .map(drop)
}

async fn kv_get(client: &mut CoordinatorClient<Channel>, xid: &str, key: &[u8]) -> Option<Vec<u8>> {
    client
        .kv_get(v1::KvGetRequest {
            target: target(xid, "index"),
            key: key.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .value
}

async fn commit(
    client: &mut CoordinatorClient<Channel>,
    xid: &str,
) -> Result<v1::TxnOutcome, tonic::Status> {
    let response = client
        .commit(v1::CommitRequest {
            header: header(),
            xid: xid.to_string(),
        })
        .await?;
    Ok(response.into_inner().outcome.unwrap())
}

async fn outcome(client: &mut CoordinatorClient<Channel>, xid: &str) -> State {
    client
        .outcome(v1::OutcomeRequest {
            header: header(),
            xid: xid.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
        .state
        .unwrap()
}

fn content() -> Vec<u8> {
    (0..PUT_BYTES).map(|i| (i * 7 % 251) as u8).collect()
}

fn delivered(data: &Path) -> usize {
    std::fs::read_dir(data.join("mail/new")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_over_the_wire_commit_roll_back_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let daemon = Daemon::start(data);
    let mut client = daemon.client().await;

    // One transaction over files (streamed), mail and kv: committed.
    let begun = begin(&mut client).await;
    let limits = begun.limits.unwrap();
    assert!(limits.chunk_bytes_max >= CHUNK_BYTES as u64);
    let xid = begun.xid;
    let content = content();
    assert_eq!(
        put(&mut client, &xid, "big.bin", &content).await.unwrap(),
        PUT_BYTES as u64
    );
    {
        use v1::mail_enqueue_request::Part;
        let message = b"Date: Sun, 06 Dec 2026 04:00:00 +0000\r\nMessage-ID: <42@example.org>\r\nFrom: shop@example.org\r\nTo: alice@example.org\r\nSubject: 42\r\n\r\nThanks.\r\n";
        let messages = vec![
            v1::MailEnqueueRequest {
                part: Some(Part::Start(target(&xid, "mail").unwrap())),
            },
            v1::MailEnqueueRequest {
                part: Some(Part::Chunk(message.to_vec())),
            },
        ];
        let enqueued = client
            .mail_enqueue(tonic::codegen::tokio_stream::iter(messages))
            .await
            .unwrap()
            .into_inner();
        assert!(!enqueued.name.is_empty());
    }
    kv_insert(&mut client, &xid, b"order/42", b"big.bin")
        .await
        .unwrap();
    assert_eq!(
        kv_get(&mut client, &xid, b"order/42").await.unwrap(),
        b"big.bin"
    );
    let read: Vec<v1::FilesReadResponse> = {
        let mut stream = client
            .files_read(v1::FilesReadRequest {
                target: target(&xid, "uploads"),
                path: "big.bin".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            out.push(m);
        }
        out
    };
    assert!(read[0].found);
    assert_eq!(read[0].size_bytes, PUT_BYTES as u64);
    let read_back: Vec<u8> = read.iter().flat_map(|m| m.chunk.clone()).collect();
    assert!(read_back == content, "the branch reads its own put back");
    assert!(matches!(outcome(&mut client, &xid).await, State::Open(_)));

    let committed = commit(&mut client, &xid).await.unwrap();
    assert!(
        matches!(committed.state, Some(State::Committed(_))),
        "{committed:?}"
    );
    // A second commit answers the same; work after commit and a rollback are refused.
    assert_eq!(commit(&mut client, &xid).await.unwrap(), committed);
    let late = kv_insert(&mut client, &xid, b"late", b"x")
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert_eq!(code_of(&late), ErrorCode::TxnFinished);
    let undo = client
        .rollback(v1::RollbackRequest {
            header: header(),
            xid: xid.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(undo.code(), Code::FailedPrecondition);
    assert_eq!(code_of(&undo), ErrorCode::AlreadyCommitted);

    // One that rolls back: nothing of it shows, and it cannot commit afterwards.
    let other = begin(&mut client).await.xid;
    put(&mut client, &other, "never.bin", b"never")
        .await
        .unwrap();
    kv_insert(&mut client, &other, b"never", b"x")
        .await
        .unwrap();
    let rolled = client
        .rollback(v1::RollbackRequest {
            header: header(),
            xid: other.clone(),
            reason: "the test says so".into(),
        })
        .await
        .unwrap()
        .into_inner();
    match rolled.outcome.unwrap().state {
        Some(State::RolledBack(rolled)) => {
            let cause = rolled.cause.unwrap();
            assert_eq!(cause.kind, v1::RollbackKind::Requested as i32);
            assert_eq!(
                cause.reason, "the test says so",
                "the client's reason is recorded"
            );
        }
        other => panic!("not rolled back: {other:?}"),
    }
    let refused = commit(&mut client, &other).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(code_of(&refused), ErrorCode::AlreadyRolledBack);
    assert!(matches!(
        outcome(&mut client, &xid).await,
        State::Committed(_)
    ));
    assert!(matches!(
        outcome(&mut client, &other).await,
        State::RolledBack(_)
    ));

    // An unknown xid is NOT_FOUND (Outcome: unknown); a malformed one names its field.
    let unknown = "n1e1s999999";
    let missing = commit(&mut client, unknown).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(code_of(&missing), ErrorCode::UnknownXid);
    assert!(matches!(
        outcome(&mut client, unknown).await,
        State::Unknown(_)
    ));
    let malformed = commit(&mut client, "not-an-xid").await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    let detail = proto::error_detail(&malformed).unwrap().unwrap();
    assert_eq!(detail.field, "CommitRequest.xid");

    // Committed work reaches the stores; the rolled-back work does not.
    eventually(
        VISIBLE_MS_MAX,
        "the committed file and message show",
        || {
            std::fs::read(data.join("uploads/big.bin")).is_ok_and(|c| c == content)
                && delivered(data) == 1
        },
    );
    assert!(!data.join("uploads/never.bin").exists());

    drop(client);
    assert!(daemon.terminate(), "SIGTERM ends the daemon with exit 0");

    // A restart on the same data directory recovers: the journal still says committed.
    let daemon = Daemon::start(data);
    let mut client = daemon.client().await;
    assert!(matches!(
        outcome(&mut client, &xid).await,
        State::Committed(_)
    ));
    assert!(!matches!(
        outcome(&mut client, &other).await,
        State::Committed(_)
    ));
    let reader = begin(&mut client).await.xid;
    assert_eq!(
        kv_get(&mut client, &reader, b"order/42").await.unwrap(),
        b"big.bin"
    );
    assert_eq!(kv_get(&mut client, &reader, b"never").await, None);
    drop(client);
    assert!(
        daemon.terminate(),
        "SIGTERM with a transaction open still exits 0"
    );
}

#[test]
fn a_non_loopback_listen_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["coordinator", "--listen", "0.0.0.0:0", "--data"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, Duration::from_secs(30), "concord coordinator");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--listen-any"), "{stderr}");
    assert!(out.stdout.is_empty(), "it never listened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_refused_calls_name_what_is_wrong_and_the_daemon_keeps_serving() {
    use v1::files_put_request::Part;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut client = daemon.client().await;

    let health = client
        .health(v1::HealthRequest { header: header() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.serving, v1::Serving::Serving as i32);
    let status = client
        .status(v1::StatusRequest { header: header() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.role, v1::Role::Primary as i32);
    assert_eq!(status.node, 1);
    assert_eq!(status.schema_version, proto::SCHEMA_VERSION);
    let mut kinds: Vec<_> = status.resources.iter().map(|r| r.kind.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["files", "files", "kv", "mail"]);

    // A client of a newer schema revision.
    let newer = client
        .begin(v1::BeginRequest {
            header: Some(RequestHeader {
                schema_version: proto::SCHEMA_VERSION + 1,
                client_name: "future".into(),
            }),
            timeout_ms: None,
        })
        .await
        .unwrap_err();
    assert_eq!(newer.code(), Code::FailedPrecondition);
    assert_eq!(code_of(&newer), ErrorCode::IncompatibleSchema);

    let xid = begin(&mut client).await.xid;
    // A chunk before the start message.
    let chunk_first = vec![v1::FilesPutRequest {
        part: Some(Part::Chunk(b"x".to_vec())),
    }];
    let refused = client
        .files_put(tonic::codegen::tokio_stream::iter(chunk_first))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        proto::error_detail(&refused).unwrap().unwrap().field,
        "FilesPutRequest.part"
    );
    // Content longer than declared: refused, and nothing of it is in the branch.
    let longer = vec![
        v1::FilesPutRequest {
            part: Some(Part::Start(v1::FilesPutStart {
                target: target(&xid, "uploads"),
                path: "short.bin".into(),
                size_bytes: Some(3),
            })),
        },
        v1::FilesPutRequest {
            part: Some(Part::Chunk(b"four".to_vec())),
        },
    ];
    let refused = client
        .files_put(tonic::codegen::tokio_stream::iter(longer))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(
        proto::error_detail(&refused).unwrap().unwrap().field,
        "FilesPutRequest.chunk"
    );
    let mut read = client
        .files_read(v1::FilesReadRequest {
            target: target(&xid, "uploads"),
            path: "short.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!read.message().await.unwrap().unwrap().found);

    // A kv call on a files resource, and a resource the configuration lacks.
    let wrong = client
        .kv_insert(v1::KvInsertRequest {
            target: target(&xid, "uploads"),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition, "{wrong:?}");
    assert_eq!(code_of(&wrong), ErrorCode::WrongKind);
    let nowhere = client
        .kv_insert(v1::KvInsertRequest {
            target: target(&xid, "nowhere"),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(nowhere.code(), Code::NotFound, "{nowhere:?}");
    assert_eq!(code_of(&nowhere), ErrorCode::UnknownResource);

    // The open transactions of one client are bounded.
    let limit = begin(&mut client).await.limits.unwrap().txns_per_client_max;
    let mut opened = 2;
    let exhausted = loop {
        match client
            .begin(v1::BeginRequest {
                header: header(),
                timeout_ms: None,
            })
            .await
        {
            Ok(_) => opened += 1,
            Err(status) => break status,
        }
        assert!(opened <= limit, "more than {limit} open transactions");
    };
    assert_eq!(opened, limit);
    assert_eq!(exhausted.code(), Code::ResourceExhausted);
    let detail = proto::error_detail(&exhausted).unwrap().unwrap();
    assert_eq!(detail.limit, "txns_per_client_max");
    assert_eq!(detail.limit_value, u64::from(limit));

    // Nothing is in doubt; an open transaction is not the operator's to resolve.
    let listed = client
        .list_in_doubt(v1::ListInDoubtRequest { header: header() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.transactions.is_empty(), "{listed:?}");
    let resolve = client
        .resolve(v1::ResolveRequest {
            header: header(),
            xid: xid.clone(),
            decision: v1::Decision::Rollback as i32,
            operator: "test".into(),
            forget: Vec::new(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(resolve.code(), Code::FailedPrecondition, "{resolve:?}");
    assert_eq!(code_of(&resolve), ErrorCode::Refused);

    // A message over the size limit, alone or in a stream: RESOURCE_EXHAUSTED naming the limit.
    // The daemon serves on.
    let huge = client
        .kv_insert(v1::KvInsertRequest {
            target: target(&xid, "index"),
            key: b"huge".to_vec(),
            value: vec![0; 5 << 20],
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    let detail = proto::error_detail(&huge).unwrap().unwrap();
    assert_eq!(
        (detail.limit.as_str(), detail.limit_value),
        ("message_bytes_max", 4 << 20)
    );
    let huge_chunk = vec![
        v1::FilesPutRequest {
            part: Some(Part::Start(v1::FilesPutStart {
                target: target(&xid, "uploads"),
                path: "huge.bin".into(),
                size_bytes: None,
            })),
        },
        v1::FilesPutRequest {
            part: Some(Part::Chunk(vec![0; 5 << 20])),
        },
    ];
    let huge = client
        .files_put(tonic::codegen::tokio_stream::iter(huge_chunk))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    assert_eq!(code_of(&huge), ErrorCode::LimitExceeded);

    // After all of that, the first transaction still commits.
    kv_insert(&mut client, &xid, b"still", b"here")
        .await
        .unwrap();
    let committed = commit(&mut client, &xid).await.unwrap();
    assert!(matches!(committed.state, Some(State::Committed(_))));
    drop(client);
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_its_client_abandons_rolls_back_at_the_timeout() {
    const TIMEOUT_MS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("txn_timeout_ms = {TIMEOUT_MS}\n"),
        OPEN_DAEMON,
        INDEX,
    );
    let daemon = Daemon::start_config(&path);
    let mut client = daemon.client().await;
    let begun = begin(&mut client).await;
    assert_eq!(begun.timeout_ms, TIMEOUT_MS);
    let abandoned = begun.xid;
    kv_insert(&mut client, &abandoned, b"held", b"x")
        .await
        .unwrap();
    // One that nobody asks about again, as a client that died would leave it.
    let silent = begin(&mut client).await.xid;
    kv_insert(&mut client, &silent, b"silent", b"x")
        .await
        .unwrap();

    // The client says nothing more: the reaper rolls the transaction back.
    let deadline = Instant::now() + Duration::from_millis(TIMEOUT_MS + VISIBLE_MS_MAX);
    let cause = loop {
        match outcome(&mut client, &abandoned).await {
            State::RolledBack(r) => break r.cause.unwrap(),
            State::Open(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "rolled back by the timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(cause.kind, v1::RollbackKind::TimedOut as i32);
    assert!(cause.retryable);
    // Rolled back by the timeout, it is finished: not listed as unfinished work.
    let deadline = Instant::now() + Duration::from_millis(VISIBLE_MS_MAX);
    loop {
        let listed = client
            .list_in_doubt(v1::ListInDoubtRequest { header: header() })
            .await
            .unwrap()
            .into_inner()
            .transactions;
        if !listed.iter().any(|t| t.xid == silent) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a transaction its timeout rolled back is still listed: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = kv_insert(&mut client, &abandoned, b"late", b"x")
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    let refused = commit(&mut client, &abandoned).await.unwrap_err();
    assert_eq!(code_of(&refused), ErrorCode::AlreadyRolledBack);

    // What it held is free again, and nothing of it was written.
    let next = begin(&mut client).await.xid;
    assert_eq!(kv_get(&mut client, &next, b"held").await, None);
    kv_insert(&mut client, &next, b"held", b"y").await.unwrap();
    commit(&mut client, &next).await.unwrap();
    drop(client);
    assert!(daemon.signal("-INT"), "SIGINT stops it as SIGTERM does");
}
