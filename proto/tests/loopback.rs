//! The generated server and client over a real HTTP/2 connection on loopback: a client-streamed
//! put, a server-streamed read, an outcome, and an error whose `ErrorDetail` survives the trip
//! in the status trailer. The service here is a stand-in that keeps nothing; the daemon is the
//! real one.

use std::time::Duration;

use adapters::{Epoch, Lsn, Xid};
use coordinator::Outcome;
use proto::convert::{self, FilePut, StreamPart, XidCall, XidOutcome, XidState};
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use proto::v1::{self, ErrorCode, ErrorDetail};
use tonic::codegen::tokio_stream;
use tonic::{Request, Response, Status, Streaming};

/// The one xid the stand-in knows: committed at LSN 5.
const KNOWN: Xid = Xid {
    node: 1,
    epoch: Epoch(2),
    seq: 3,
};

struct StandIn;

fn committed() -> XidOutcome {
    XidOutcome {
        xid: KNOWN,
        state: XidState::Ended(Outcome::Committed { lsn: Some(Lsn(5)) }),
    }
}

type Answer<T> = Result<Response<T>, Status>;

fn unimplemented<T>() -> Answer<T> {
    Err(Status::unimplemented("not in this stand-in"))
}

#[tonic::async_trait]
impl Coordinator for StandIn {
    type FilesReadStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<v1::FilesReadResponse, Status>>>;

    async fn begin(&self, _: Request<v1::BeginRequest>) -> Answer<v1::BeginResponse> {
        unimplemented()
    }

    async fn files_put(
        &self,
        request: Request<Streaming<v1::FilesPutRequest>>,
    ) -> Answer<v1::FilesPutResponse> {
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or(convert::WireError::Missing {
            field: "FilesPutRequest.start",
        })?;
        let StreamPart::Start(FilePut { target, .. }) = StreamPart::<FilePut>::try_from(first)?
        else {
            return Err(Status::invalid_argument(
                "the first message must be the start",
            ));
        };
        assert_eq!(target.xid, KNOWN);
        let mut size_bytes = 0;
        while let Some(part) = stream.message().await? {
            match StreamPart::<FilePut>::try_from(part)? {
                StreamPart::Chunk(chunk) => size_bytes += chunk.len() as u64,
                StreamPart::Start(_) => {
                    return Err(Status::invalid_argument("a second start message"));
                }
            }
        }
        Ok(Response::new(v1::FilesPutResponse { size_bytes }))
    }

    async fn files_delete(
        &self,
        _: Request<v1::FilesDeleteRequest>,
    ) -> Answer<v1::FilesDeleteResponse> {
        unimplemented()
    }

    async fn files_read(&self, _: Request<v1::FilesReadRequest>) -> Answer<Self::FilesReadStream> {
        let chunks = vec![
            Ok(v1::FilesReadResponse {
                found: true,
                size_bytes: 6,
                chunk: b"abc".to_vec(),
            }),
            Ok(v1::FilesReadResponse {
                chunk: b"def".to_vec(),
                ..Default::default()
            }),
        ];
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn mail_enqueue(
        &self,
        _: Request<Streaming<v1::MailEnqueueRequest>>,
    ) -> Answer<v1::MailEnqueueResponse> {
        unimplemented()
    }

    async fn kv_insert(&self, _: Request<v1::KvInsertRequest>) -> Answer<v1::KvInsertResponse> {
        unimplemented()
    }

    async fn kv_remove(&self, _: Request<v1::KvRemoveRequest>) -> Answer<v1::KvRemoveResponse> {
        unimplemented()
    }

    async fn kv_get(&self, _: Request<v1::KvGetRequest>) -> Answer<v1::KvGetResponse> {
        unimplemented()
    }

    async fn enlist_prepared(
        &self,
        _: Request<v1::EnlistPreparedRequest>,
    ) -> Answer<v1::EnlistPreparedResponse> {
        unimplemented()
    }

    async fn commit(&self, request: Request<v1::CommitRequest>) -> Answer<v1::CommitResponse> {
        let call = XidCall::try_from(request.into_inner())?;
        if call.xid != KNOWN {
            let detail = ErrorDetail {
                code: ErrorCode::UnknownXid as i32,
                xid: convert::xid_text(call.xid),
                ..Default::default()
            };
            return Err(proto::error_status(
                format!("transaction {} is not known here", call.xid),
                &detail,
            ));
        }
        Ok(Response::new(v1::CommitResponse {
            outcome: Some((&committed()).into()),
        }))
    }

    async fn rollback(&self, _: Request<v1::RollbackRequest>) -> Answer<v1::RollbackResponse> {
        unimplemented()
    }

    async fn outcome(&self, request: Request<v1::OutcomeRequest>) -> Answer<v1::OutcomeResponse> {
        let call = XidCall::try_from(request.into_inner())?;
        let outcome = if call.xid == KNOWN {
            committed()
        } else {
            XidOutcome {
                xid: call.xid,
                state: XidState::Unknown,
            }
        };
        Ok(Response::new(v1::OutcomeResponse {
            outcome: Some((&outcome).into()),
        }))
    }

    async fn list_in_doubt(
        &self,
        _: Request<v1::ListInDoubtRequest>,
    ) -> Answer<v1::ListInDoubtResponse> {
        unimplemented()
    }

    async fn resolve(&self, _: Request<v1::ResolveRequest>) -> Answer<v1::ResolveResponse> {
        unimplemented()
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Answer<v1::HealthResponse> {
        unimplemented()
    }

    async fn status(&self, _: Request<v1::StatusRequest>) -> Answer<v1::StatusResponse> {
        unimplemented()
    }
}

fn header() -> Option<v1::RequestHeader> {
    Some(v1::RequestHeader::current("loopback-test"))
}

fn outcome_request(xid: &str) -> v1::OutcomeRequest {
    v1::OutcomeRequest {
        header: header(),
        xid: xid.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_client_and_server_talk_over_loopback() {
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().expect("an address"))
            .expect("binds a free loopback port");
    let addr = incoming.local_addr().expect("a bound address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(StandIn))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    let checks = async {
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .expect("connects");

        // An outcome, converted back to the coordinator's.
        let answer = client
            .outcome(outcome_request(&convert::xid_text(KNOWN)))
            .await
            .expect("answers")
            .into_inner();
        let outcome = XidOutcome::try_from(answer.outcome.expect("set")).expect("converts");
        assert_eq!(
            outcome.state,
            XidState::Ended(Outcome::Committed { lsn: Some(Lsn(5)) })
        );

        // The outcome of an unknown xid is an answer; its commit is NOT_FOUND, with its typed
        // detail from the trailer.
        let answer = client
            .outcome(outcome_request("n9e9s9"))
            .await
            .expect("answers")
            .into_inner();
        let outcome = XidOutcome::try_from(answer.outcome.expect("set")).expect("converts");
        assert_eq!(outcome.state, XidState::Unknown);
        let status = client
            .commit(v1::CommitRequest {
                header: header(),
                xid: "n9e9s9".into(),
            })
            .await
            .expect_err("unknown");
        assert_eq!(status.code(), tonic::Code::NotFound);
        let detail = proto::error_detail(&status)
            .expect("decodes")
            .expect("present");
        assert_eq!(detail.code(), ErrorCode::UnknownXid);
        assert_eq!(detail.xid, "n9e9s9");

        // A malformed xid: INVALID_ARGUMENT naming the field.
        let status = client
            .outcome(outcome_request("n9e9"))
            .await
            .expect_err("malformed");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let detail = proto::error_detail(&status)
            .expect("decodes")
            .expect("present");
        assert_eq!(detail.field, "OutcomeRequest.xid");

        // A client-streamed put: a start message, then chunks.
        let mut parts = vec![v1::FilesPutRequest {
            part: Some(v1::files_put_request::Part::Start(v1::FilesPutStart {
                target: Some(v1::BranchTarget {
                    header: header(),
                    xid: convert::xid_text(KNOWN),
                    resource: "docs".into(),
                }),
                path: "a.txt".into(),
                size_bytes: Some(3 * 1000),
            })),
        }];
        for _ in 0..3 {
            parts.push(v1::FilesPutRequest {
                part: Some(v1::files_put_request::Part::Chunk(vec![7; 1000])),
            });
        }
        let put = client
            .files_put(tokio_stream::iter(parts))
            .await
            .expect("put")
            .into_inner();
        assert_eq!(put.size_bytes, 3000);

        // A server-streamed read.
        let mut read = client
            .files_read(v1::FilesReadRequest {
                target: None,
                path: "a.txt".into(),
            })
            .await
            .expect("read")
            .into_inner();
        let mut content = Vec::new();
        while let Some(piece) = read.message().await.expect("a piece") {
            content.extend(piece.chunk);
        }
        assert_eq!(content, b"abcdef");

        // A call the stand-in does not implement.
        let status = client
            .health(v1::HealthRequest { header: header() })
            .await
            .expect_err("unimplemented");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(proto::error_detail(&status), Ok(None));
    };
    tokio::time::timeout(Duration::from_secs(30), checks)
        .await
        .expect("the checks finish within 30 s");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops within 10 s")
        .expect("the server task ends")
        .expect("the server ran cleanly");
}
