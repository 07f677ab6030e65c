//! `concord coordinator` under hostile input, the real binary on a free loopback port, its file
//! descriptors limited to 1024 as systemd's default soft limit does.
//!
//! Transactions over files, mail and kv commit first. Then, while a well-behaved client keeps
//! committing, a batch of hostile connections and calls: random bytes on the port, a valid
//! HTTP/2 preface followed by garbage or truncated frames, frames declaring lengths near 2^24,
//! a header block that never ends (CONTINUATION after CONTINUATION), many streams opened and
//! abandoned, gRPC length prefixes of 4 GiB, slow-loris connections that send a byte a second,
//! random bytes as the message of every method, valid messages with bad field values (bad
//! xids, unknown enum values, empty and huge strings, a chunk before the start, two starts), a
//! newer schema revision, and unknown methods; then more idle connections than the daemon has
//! file descriptors. Every refused gRPC call must carry the status of `coordinator.proto`'s
//! table with an `ErrorDetail`; the daemon must stay alive with its file descriptors and memory
//! (VmHWM) bounded, close the slow and idle connections by itself, commit promptly afterwards,
//! and still hold every transaction committed before. Random input comes from fixed seeds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Stderr, header, target};
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{self, ErrorCode, RequestHeader, txn_outcome::State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;

/// The daemon's file descriptor limit in this test (systemd's default soft limit).
const DAEMON_FDS_MAX: u32 = 1024;
/// The daemon's peak resident memory must stay below this (bytes): far below what buffering
/// any one of the declared lengths (16 MiB frames, 4 GiB messages) for every connection needs.
const DAEMON_HWM_BYTES_MAX: u64 = 256 << 20;
/// How long one well-behaved transaction may take during and after the batch.
const COMMIT_MS_MAX: u64 = 10_000;
/// How long the daemon may take to close a connection that misbehaves at the frame level.
const CLOSE_MS_MAX: u64 = 5_000;
/// How long the daemon may take to close a connection that sends too slowly or not at all
/// (its handshake timeout and keepalive, with room).
const SLOW_CLOSE_MS_MAX: u64 = 30_000;
/// Idle connections opened at once: more than the daemon has file descriptors.
const IDLE_CONNECTIONS: usize = 1_200;
/// The daemon's open file descriptors must stay below this during the idle flood.
const DAEMON_OPEN_FDS_MAX: usize = 900;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SERVICE: &str = "concord.v1.Coordinator";
const METHODS: [&str; 16] = [
    "Begin",
    "FilesPut",
    "FilesDelete",
    "FilesRead",
    "MailEnqueue",
    "KvInsert",
    "KvRemove",
    "KvGet",
    "EnlistPrepared",
    "Commit",
    "Rollback",
    "Outcome",
    "ListInDoubt",
    "Resolve",
    "Health",
    "Status",
];

/// A deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        println!("seed {seed}");
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

impl Daemon {
    /// Starts it on the embedded defaults in `data`, under `prlimit` with [`DAEMON_FDS_MAX`]
    /// file descriptors.
    fn start_limited(data: &Path) -> Daemon {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={DAEMON_FDS_MAX}:{DAEMON_FDS_MAX}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_concord"))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .stdin(Stdio::null());
        Daemon::spawn(&mut command, Stderr::Inherit)
    }

    fn assert_alive(&mut self, when: &str) {
        assert!(self.is_running(), "the daemon died {when}");
    }

    /// A `/proc/PID/status` field in bytes (`VmRSS`, `VmHWM`).
    fn memory_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"));
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib << 10
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }
}

fn mail_message(n: usize) -> Vec<u8> {
    format!(
        "Date: Sun, 06 Dec 2026 04:00:00 +0000\r\nMessage-ID: <{n}@example.org>\r\nFrom: shop@example.org\r\nTo: alice@example.org\r\nSubject: {n}\r\n\r\nThanks.\r\n"
    )
    .into_bytes()
}

/// One transaction over files, mail and kv, committed; returns its xid.
async fn commit_one(client: &mut CoordinatorClient<Channel>, n: usize) -> String {
    use v1::files_put_request::Part as FilePart;
    use v1::mail_enqueue_request::Part as MailPart;
    let xid = client
        .begin(v1::BeginRequest {
            header: header(),
            timeout_ms: None,
        })
        .await
        .unwrap()
        .into_inner()
        .xid;
    let content = format!("file {n}").into_bytes();
    let put = vec![
        v1::FilesPutRequest {
            part: Some(FilePart::Start(v1::FilesPutStart {
                target: target(&xid, "uploads"),
                path: format!("t/{n}.txt"),
                size_bytes: Some(content.len() as u64),
            })),
        },
        v1::FilesPutRequest {
            part: Some(FilePart::Chunk(content)),
        },
    ];
    client
        .files_put(tonic::codegen::tokio_stream::iter(put))
        .await
        .unwrap();
    let mail = vec![
        v1::MailEnqueueRequest {
            part: Some(MailPart::Start(target(&xid, "mail").unwrap())),
        },
        v1::MailEnqueueRequest {
            part: Some(MailPart::Chunk(mail_message(n))),
        },
    ];
    client
        .mail_enqueue(tonic::codegen::tokio_stream::iter(mail))
        .await
        .unwrap();
    client
        .kv_insert(v1::KvInsertRequest {
            target: target(&xid, "index"),
            key: format!("t/{n}").into_bytes(),
            value: format!("value {n}").into_bytes(),
        })
        .await
        .unwrap();
    let committed = client
        .commit(v1::CommitRequest {
            header: header(),
            xid: xid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(committed.outcome.unwrap().state, Some(State::Committed(_))),
        "transaction {n} committed"
    );
    xid
}

/// Commits transaction `n` on a fresh connection within [`COMMIT_MS_MAX`].
async fn commit_promptly(addr: &str, n: usize) -> String {
    let work = async {
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        commit_one(&mut client, n).await
    };
    tokio::time::timeout(Duration::from_millis(COMMIT_MS_MAX), work)
        .await
        .unwrap_or_else(|_| panic!("transaction {n} did not commit within {COMMIT_MS_MAX} ms"))
}

/// Checks what transaction `n` wrote, through the daemon and on disk.
async fn check_intact(client: &mut CoordinatorClient<Channel>, data: &Path, xid: &str, n: usize) {
    let outcome = client
        .outcome(v1::OutcomeRequest {
            header: header(),
            xid: xid.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        outcome.outcome.unwrap().state,
        Some(State::Committed(_))
    ));
    let reader = client
        .begin(v1::BeginRequest {
            header: header(),
            timeout_ms: None,
        })
        .await
        .unwrap()
        .into_inner()
        .xid;
    let value = client
        .kv_get(v1::KvGetRequest {
            target: target(&reader, "index"),
            key: format!("t/{n}").into_bytes(),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(value, Some(format!("value {n}").into_bytes()));
    client
        .rollback(v1::RollbackRequest {
            header: header(),
            xid: reader,
            reason: String::new(),
        })
        .await
        .unwrap();
    let file = std::fs::read(data.join(format!("uploads/t/{n}.txt"))).unwrap();
    assert_eq!(file, format!("file {n}").into_bytes());
    let subject = format!("Subject: {n}\r\n");
    let delivered = std::fs::read_dir(data.join("mail/new"))
        .unwrap()
        .filter(|e| {
            let body = std::fs::read(e.as_ref().unwrap().path()).unwrap();
            String::from_utf8_lossy(&body).contains(&subject)
        })
        .count();
    assert_eq!(delivered, 1, "transaction {n}'s mail delivered once");
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2

/// A frame header (9 bytes) declaring `len`.
fn frame_header(len: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_header(payload.len() as u32, kind, flags, stream);
    out.extend(payload);
    out
}

/// An HPACK integer with an `prefix`-bit prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// Literal header fields without indexing, no Huffman coding.
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend(value.as_bytes());
    }
    out
}

fn request_headers(method: &str) -> Vec<u8> {
    let path = format!("/{SERVICE}/{method}");
    hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", &path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// A connection that has sent the preface and an empty SETTINGS frame.
async fn h2_raw(addr: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tcp.write_all(&hello).await.unwrap();
    tcp
}

/// Writes `bytes`, ignoring a peer that already closed.
async fn send(tcp: &mut TcpStream, bytes: &[u8]) -> bool {
    tcp.write_all(bytes).await.is_ok()
}

/// Whether the daemon closes `tcp` within `ms` (reading and dropping what it sends).
async fn closed_within(tcp: &mut TcpStream, ms: u64) -> bool {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut buf = vec![0; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn random_bytes_on_the_port(addr: String, seed: u64) {
    let mut rng = Rng::new(seed);
    for i in 0..64 {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let len = 1 + rng.below(8 << 10) as usize;
        let mut junk = rng.bytes(len);
        if i % 2 == 1 {
            // A valid preface, then junk.
            junk.splice(0..0, PREFACE.iter().copied());
        }
        send(&mut tcp, &junk).await;
        assert!(
            closed_within(&mut tcp, CLOSE_MS_MAX).await,
            "random bytes (connection {i}) closed"
        );
    }
}

async fn truncated_and_garbage_frames(addr: String, seed: u64) {
    let mut rng = Rng::new(seed);
    for i in 0..32 {
        let mut tcp = h2_raw(&addr).await;
        let mut frames = Vec::new();
        match i % 4 {
            // A frame of an unknown type on stream 0 with a random payload, then junk.
            0 => {
                frames.extend(frame(0xfe, 0xff, 0, &rng.bytes(64)));
                frames.extend(rng.bytes(256));
            }
            // HEADERS whose header block is random bytes.
            1 => frames.extend(frame(HEADERS, END_HEADERS, 1, &rng.bytes(200))),
            // DATA on a stream never opened.
            2 => frames.extend(frame(DATA, END_STREAM, 7, &rng.bytes(100))),
            // SETTINGS with a length that is not a multiple of 6.
            _ => frames.extend(frame(SETTINGS, 0, 0, &rng.bytes(7))),
        }
        // Then a frame cut off half-way.
        let cut = frame(HEADERS, END_HEADERS, 3, &request_headers("Begin"));
        frames.extend(&cut[..cut.len() / 2]);
        send(&mut tcp, &frames).await;
        assert!(
            closed_within(&mut tcp, CLOSE_MS_MAX).await,
            "garbage frames (connection {i}) closed"
        );
    }
    // Truncated frames alone leave a connection waiting: it must be closed by the keepalive.
    let mut tcp = h2_raw(&addr).await;
    let cut = frame(HEADERS, END_HEADERS, 1, &request_headers("Begin"));
    send(&mut tcp, &cut[..cut.len() - 3]).await;
    assert!(
        closed_within(&mut tcp, SLOW_CLOSE_MS_MAX).await,
        "a truncated frame is not held open for ever"
    );
}

async fn huge_declared_lengths(addr: String) {
    let len = (1 << 24) - 1;
    // HEADERS declaring 16 MiB.
    let mut tcp = h2_raw(&addr).await;
    let mut bytes = frame_header(len, HEADERS, END_HEADERS, 1);
    bytes.extend(vec![0; 64 << 10]);
    send(&mut tcp, &bytes).await;
    assert!(
        closed_within(&mut tcp, CLOSE_MS_MAX).await,
        "HEADERS of 2^24-1"
    );
    // DATA declaring 16 MiB on an open stream.
    let mut tcp = h2_raw(&addr).await;
    let mut bytes = frame(HEADERS, END_HEADERS, 1, &request_headers("KvInsert"));
    bytes.extend(frame_header(len, DATA, 0, 1));
    bytes.extend(vec![0; 64 << 10]);
    send(&mut tcp, &bytes).await;
    assert!(
        closed_within(&mut tcp, CLOSE_MS_MAX).await,
        "DATA of 2^24-1"
    );
}

async fn never_ending_headers(addr: String) {
    let mut tcp = h2_raw(&addr).await;
    let mut first = request_headers("Begin");
    first.extend(hpack(&[("x-first", "1")]));
    send(&mut tcp, &frame(HEADERS, 0, 1, &first)).await;
    let filler = hpack(&[("x-filler", &"a".repeat(100))]);
    let block: Vec<u8> = filler.iter().copied().cycle().take(16_000).collect();
    let continuation = frame(CONTINUATION, 0, 1, &block);
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_millis(CLOSE_MS_MAX);
    // At most 64 MiB: a daemon that buffers all of it fails the memory bound below.
    while sent < 64 << 20 && Instant::now() < deadline {
        match tokio::time::timeout(
            Duration::from_millis(CLOSE_MS_MAX),
            tcp.write_all(&continuation),
        )
        .await
        {
            Ok(Ok(())) => sent += continuation.len(),
            _ => break,
        }
    }
    assert!(
        closed_within(&mut tcp, CLOSE_MS_MAX).await,
        "a header block without end (after {sent} bytes) closed"
    );
}

async fn streams_opened_and_abandoned(addr: String) {
    for _ in 0..8 {
        let mut tcp = h2_raw(&addr).await;
        let mut bytes = Vec::new();
        for i in 0..1_000u32 {
            let mut headers = frame(
                HEADERS,
                END_HEADERS,
                2 * i + 1,
                &request_headers("KvInsert"),
            );
            // A message prefix declaring 4 MiB, and a few bytes of it.
            headers.extend(frame(DATA, 0, 2 * i + 1, &[0, 0, 0x40, 0, 0, 1, 2, 3]));
            bytes.extend(headers);
        }
        send(&mut tcp, &bytes).await;
        // Abandoned: the connection is dropped without another word.
    }
}

async fn slow_loris(addr: String, after_preface: bool) {
    let mut tcp = if after_preface {
        h2_raw(&addr).await
    } else {
        TcpStream::connect(&addr).await.unwrap()
    };
    let bytes = if after_preface {
        frame(HEADERS, END_HEADERS, 1, &request_headers("Begin"))
    } else {
        PREFACE.to_vec()
    };
    let deadline = Instant::now() + Duration::from_millis(SLOW_CLOSE_MS_MAX);
    let mut buf = [0u8; 4096];
    for b in bytes.iter().cycle() {
        assert!(
            Instant::now() < deadline,
            "a slow-loris connection (after the preface: {after_preface}) was not closed within {SLOW_CLOSE_MS_MAX} ms"
        );
        if tcp.write_all(&[*b]).await.is_err() {
            return;
        }
        let read = tokio::time::timeout(Duration::from_millis(1_000), tcp.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC

/// A codec that sends and receives messages as raw bytes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// Calls `method` with `messages` as its raw request messages; the status it ended with.
async fn call_raw(channel: &Channel, method: &str, messages: Vec<Vec<u8>>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = format!("/{SERVICE}/{method}").parse().unwrap();
    let request = tonic::Request::new(tonic::codegen::tokio_stream::iter(messages));
    let answered = async {
        let mut stream = grpc.streaming(request, path, Raw).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    };
    match tokio::time::timeout(Duration::from_millis(COMMIT_MS_MAX), answered).await {
        Ok(Ok(())) => tonic::Status::ok(""),
        Ok(Err(status)) => status,
        Err(_) => panic!("{method} did not answer within {COMMIT_MS_MAX} ms"),
    }
}

/// Methods this daemon does not serve yet answer UNIMPLEMENTED with a message.
fn not_served_yet(method: &str, status: &tonic::Status) -> bool {
    ["Resolve", "EnlistPrepared"].contains(&method)
        && status.code() == Code::Unimplemented
        && status.message().contains("not served")
}

/// A refusal as the table says: an error status whose detail's code fits it.
fn assert_refused_well(method: &str, status: &tonic::Status) {
    if status.code() == Code::Ok || not_served_yet(method, status) {
        return;
    }
    let detail = proto::error_detail(status)
        .unwrap_or_else(|e| panic!("{method}: a bad ErrorDetail in {status:?}: {e}"))
        .unwrap_or_else(|| panic!("{method}: no ErrorDetail in {status:?}"));
    let code = ErrorCode::try_from(detail.code).unwrap();
    let expected = match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::UnknownXid | ErrorCode::UnknownResource => Code::NotFound,
        ErrorCode::LimitExceeded => Code::ResourceExhausted,
        ErrorCode::IncompatibleSchema => {
            if status.code() == Code::Unimplemented {
                Code::Unimplemented
            } else {
                Code::FailedPrecondition
            }
        }
        ErrorCode::WrongKind
        | ErrorCode::TxnFinished
        | ErrorCode::AlreadyRolledBack
        | ErrorCode::AlreadyCommitted
        | ErrorCode::Refused => Code::FailedPrecondition,
        ErrorCode::Resource => match v1::ErrorClass::try_from(detail.error_class).unwrap() {
            v1::ErrorClass::Rejected if status.code() == Code::Aborted => Code::Aborted,
            v1::ErrorClass::Rejected => Code::FailedPrecondition,
            v1::ErrorClass::Retryable => Code::Unavailable,
            _ => Code::Internal,
        },
        other => panic!("{method}: an unexpected refusal {other:?} in {status:?}"),
    };
    assert_eq!(status.code(), expected, "{method}: {status:?}");
    assert!(
        !status.message().is_empty(),
        "{method}: a message to act on"
    );
}

async fn random_messages(channel: Channel, seed: u64) {
    let mut rng = Rng::new(seed);
    for method in METHODS {
        for _ in 0..12 {
            let len = rng.below(300) as usize;
            let message = rng.bytes(len);
            let status = call_raw(&channel, method, vec![message]).await;
            assert_refused_well(method, &status);
        }
    }
}

/// `message` encoded.
fn enc(message: &impl prost::Message) -> Vec<u8> {
    message.encode_to_vec()
}

async fn bad_field_values(channel: Channel, xid: String, seed: u64) {
    use v1::files_put_request::Part;
    let mut rng = Rng::new(seed);
    let expect = async |method: &str, messages: Vec<Vec<u8>>, code: Code, what: &str| {
        let status = call_raw(&channel, method, messages).await;
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert_refused_well(method, &status);
    };
    let bad_xids = [
        "",
        "n",
        "n1e1s",
        "x1e1s1",
        "n99999999999999999999e1s1",
        "n1e1s1\0",
    ];
    for bad in bad_xids {
        let commit = enc(&v1::CommitRequest {
            header: header(),
            xid: bad.into(),
        });
        expect("Commit", vec![commit], Code::InvalidArgument, "a bad xid").await;
    }
    let huge_xid = enc(&v1::OutcomeRequest {
        header: header(),
        xid: "n1e1s".to_string() + &"9".repeat(1 << 20),
    });
    expect(
        "Outcome",
        vec![huge_xid],
        Code::InvalidArgument,
        "a huge xid",
    )
    .await;
    let huge_name = enc(&v1::BeginRequest {
        header: Some(RequestHeader::current("x".repeat(1 << 20))),
        timeout_ms: None,
    });
    expect(
        "Begin",
        vec![huge_name],
        Code::InvalidArgument,
        "a huge client_name",
    )
    .await;
    let no_header = enc(&v1::HealthRequest { header: None });
    expect(
        "Health",
        vec![no_header],
        Code::InvalidArgument,
        "no header",
    )
    .await;
    let newer = enc(&v1::StatusRequest {
        header: Some(RequestHeader {
            schema_version: proto::SCHEMA_VERSION + 1 + rng.below(1000) as u32,
            client_name: "future".into(),
        }),
    });
    expect(
        "Status",
        vec![newer],
        Code::FailedPrecondition,
        "a newer schema",
    )
    .await;
    let unset = enc(&v1::StatusRequest {
        header: Some(RequestHeader {
            schema_version: 0,
            client_name: String::new(),
        }),
    });
    expect("Status", vec![unset], Code::InvalidArgument, "schema 0").await;
    let decision = enc(&v1::ResolveRequest {
        header: header(),
        xid: xid.clone(),
        decision: 77,
        operator: "x".into(),
        forget: Vec::new(),
        reason: String::new(),
    });
    expect(
        "Resolve",
        vec![decision],
        Code::InvalidArgument,
        "an unknown enum value",
    )
    .await;
    let empty_resource = enc(&v1::KvInsertRequest {
        target: target(&xid, ""),
        key: b"k".to_vec(),
        value: Vec::new(),
    });
    expect(
        "KvInsert",
        vec![empty_resource],
        Code::InvalidArgument,
        "an empty resource",
    )
    .await;
    let empty_key = enc(&v1::KvGetRequest {
        target: target(&xid, "index"),
        key: Vec::new(),
    });
    expect(
        "KvGet",
        vec![empty_key],
        Code::InvalidArgument,
        "an empty key",
    )
    .await;
    let bad_path = enc(&v1::FilesDeleteRequest {
        target: target(&xid, "uploads"),
        path: "../../etc/passwd".into(),
    });
    let status = call_raw(&channel, "FilesDelete", vec![bad_path]).await;
    assert_ne!(status.code(), Code::Ok, "a path outside the root");
    assert_refused_well("FilesDelete", &status);
    let bad_gid = enc(&v1::EnlistPreparedRequest {
        target: target(&xid, "index"),
        gid: "concord:n1e1s1:index".into(),
        redo: rng.bytes(64),
    });
    let status = call_raw(&channel, "EnlistPrepared", vec![bad_gid]).await;
    assert_ne!(status.code(), Code::Ok, "enlisting a kv resource");
    assert_refused_well("EnlistPrepared", &status);

    let start = |path: &str| {
        enc(&v1::FilesPutRequest {
            part: Some(Part::Start(v1::FilesPutStart {
                target: target(&xid, "uploads"),
                path: path.into(),
                size_bytes: None,
            })),
        })
    };
    let chunk = enc(&v1::FilesPutRequest {
        part: Some(Part::Chunk(b"x".to_vec())),
    });
    expect(
        "FilesPut",
        vec![chunk.clone(), start("a")],
        Code::InvalidArgument,
        "a chunk before the start",
    )
    .await;
    expect(
        "FilesPut",
        vec![start("b"), start("c")],
        Code::InvalidArgument,
        "two starts",
    )
    .await;
    expect(
        "FilesPut",
        vec![start("d"), chunk, rng.bytes(40)],
        Code::InvalidArgument,
        "a malformed chunk",
    )
    .await;
    expect(
        "FilesPut",
        vec![rng.bytes(33)],
        Code::InvalidArgument,
        "a malformed start",
    )
    .await;
    let unset = enc(&v1::FilesPutRequest { part: None });
    expect(
        "FilesPut",
        vec![unset],
        Code::InvalidArgument,
        "an unset part",
    )
    .await;
    let mail_chunk = enc(&v1::MailEnqueueRequest {
        part: Some(v1::mail_enqueue_request::Part::Chunk(b"x".to_vec())),
    });
    expect(
        "MailEnqueue",
        vec![mail_chunk],
        Code::InvalidArgument,
        "a mail chunk before the start",
    )
    .await;
    for method in ["Nope", "Begin2"] {
        let status = call_raw(&channel, method, vec![Vec::new()]).await;
        assert_eq!(status.code(), Code::Unimplemented, "{method}: {status:?}");
        assert_refused_well(method, &status);
    }
    let status = {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/concord.v9.Nothing/Begin");
        grpc.unary(tonic::Request::new(Vec::new()), path, Raw)
            .await
            .unwrap_err()
    };
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

/// A gRPC message prefix of 4 GiB (and of 4 MiB + 1) on a real HTTP/2 stream: refused with
/// RESOURCE_EXHAUSTED and its detail before anything is allocated for it.
async fn huge_grpc_prefixes(addr: String) {
    for declared in [u32::MAX, (4 << 20) + 1] {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(connection);
        let mut send = send.ready().await.unwrap();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/{SERVICE}/KvInsert"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut body) = send.send_request(request, false).unwrap();
        let mut prefix = vec![0u8];
        prefix.extend(declared.to_be_bytes());
        body.send_data(prefix.into(), false).unwrap();
        let response = tokio::time::timeout(Duration::from_millis(CLOSE_MS_MAX), response)
            .await
            .expect("an answer to a 4 GiB prefix")
            .unwrap();
        let (parts, mut rest) = response.into_parts();
        let status = match tonic::Status::from_header_map(&parts.headers) {
            Some(status) => status,
            None => {
                while rest.data().await.is_some() {}
                let trailers = rest.trailers().await.unwrap().unwrap();
                tonic::Status::from_header_map(&trailers).unwrap()
            }
        };
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let detail = proto::error_detail(&status).unwrap().unwrap();
        assert_eq!(detail.limit, "message_bytes_max");
        driver.abort();
    }
}

async fn idle_flood(daemon: &mut Daemon) {
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    let mut peak = 0;
    for _ in 0..IDLE_CONNECTIONS {
        match tokio::time::timeout(
            Duration::from_millis(1_000),
            TcpStream::connect(&daemon.addr),
        )
        .await
        {
            Ok(Ok(tcp)) => idle.push(tcp),
            _ => break,
        }
        if idle.len() % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            peak = peak.max(daemon.open_fds());
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    peak = peak.max(daemon.open_fds());
    daemon.assert_alive("under a flood of idle connections");
    println!(
        "{} idle connections; the daemon's open file descriptors peaked at {peak}",
        idle.len()
    );
    assert!(
        peak < DAEMON_OPEN_FDS_MAX,
        "the daemon held {peak} file descriptors for idle connections (bound {DAEMON_OPEN_FDS_MAX})"
    );
    // The daemon closes them by itself.
    let deadline = Instant::now() + Duration::from_millis(SLOW_CLOSE_MS_MAX);
    for mut tcp in idle {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        assert!(
            closed_within(&mut tcp, left).await,
            "an idle connection closed by the daemon within {SLOW_CLOSE_MS_MAX} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_leaves_the_daemon_serving_bounded_and_intact() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut daemon = Daemon::start_limited(data);
    let addr = daemon.addr.clone();
    let mut client = daemon.client().await;

    // Committed before the batch.
    let mut committed = Vec::new();
    for n in 0..3 {
        committed.push((commit_one(&mut client, n).await, n));
    }
    let open_xid = client
        .begin(v1::BeginRequest {
            header: header(),
            timeout_ms: None,
        })
        .await
        .unwrap()
        .into_inner()
        .xid;

    // A well-behaved client commits all along.
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicUsize::new(0));
    let steady = {
        let (stop, during, addr) = (Arc::clone(&stop), Arc::clone(&during), addr.clone());
        tokio::spawn(async move {
            let mut xids = Vec::new();
            let mut n = 100;
            while !stop.load(Ordering::Relaxed) {
                xids.push((commit_promptly(&addr, n).await, n));
                during.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            xids
        })
    };

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let batch = vec![
        tokio::spawn(random_bytes_on_the_port(addr.clone(), 0x5eed_0001)),
        tokio::spawn(truncated_and_garbage_frames(addr.clone(), 0x5eed_0002)),
        tokio::spawn(huge_declared_lengths(addr.clone())),
        tokio::spawn(never_ending_headers(addr.clone())),
        tokio::spawn(streams_opened_and_abandoned(addr.clone())),
        tokio::spawn(slow_loris(addr.clone(), false)),
        tokio::spawn(slow_loris(addr.clone(), true)),
        tokio::spawn(random_messages(channel.clone(), 0x5eed_0003)),
        tokio::spawn(bad_field_values(channel.clone(), open_xid, 0x5eed_0004)),
        tokio::spawn(huge_grpc_prefixes(addr.clone())),
    ];
    for task in batch {
        task.await.unwrap();
        daemon.assert_alive("during the hostile batch");
    }
    stop.store(true, Ordering::Relaxed);
    let steady = steady.await.unwrap();
    assert!(
        during.load(Ordering::Relaxed) >= 3,
        "the well-behaved client committed during the batch"
    );
    committed.extend(steady);

    idle_flood(&mut daemon).await;

    // Afterwards: alive, committing promptly, nothing lost, memory bounded.
    daemon.assert_alive("after the batch");
    committed.push((commit_promptly(&addr, 1_000).await, 1_000));
    let mut client = daemon.client().await;
    for (xid, n) in &committed {
        check_intact(&mut client, data, xid, *n).await;
    }
    let rss = daemon.memory_bytes("VmRSS");
    let hwm = daemon.memory_bytes("VmHWM");
    println!(
        "the daemon's memory: VmRSS {} MiB, VmHWM {} MiB; {} transactions checked; {:?} in all",
        rss >> 20,
        hwm >> 20,
        committed.len(),
        started.elapsed()
    );
    assert!(
        hwm < DAEMON_HWM_BYTES_MAX,
        "the daemon's peak memory {hwm} bytes, over {DAEMON_HWM_BYTES_MAX}"
    );
    daemon.assert_alive("at the end");
}
