//! Remote participants follow the primary (`Concord::connect_any`), against real `concord
//! coordinator` processes on loopback: two independent daemons A and B (each its own data
//! directory, node 1 and node 2); a client given [A, B] commits on A; A is killed with
//! SIGKILL; the next `begin` lands on B within `failover_wait_ms`, and a transaction begun on
//! A before the kill gets a clear answer at commit (rolled back, or in doubt with its xid),
//! never `Ok` and never a hang. A list of dead URLs fails within the wait, naming each.
//!
//! The node that is not the primary is, for now, a tiny tonic server in this test answering
//! every call with `proto::not_primary(Some(B))`; the primary it names is a real daemon.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::path::Path;
use std::task::{Context, Poll};
use std::time::Instant;

use common::daemon::{Daemon, INDEX, OPEN_DAEMON};
use participant::{Concord, ConcordError, Credentials, RollbackCause, TxnOutcome, Xid};

/// The failover wait of the clients in these tests (milliseconds).
const FAILOVER_WAIT_MS: u64 = 3_000;
/// What the timing checks allow above a bound, for a loaded machine (milliseconds).
const SLACK_MS: u64 = 2_000;
/// How long a cut-off commit may take to answer: the outcome is asked a few times, with
/// backoff, before it is reported in doubt (milliseconds).
const CUT_OFF_ANSWER_MS_MAX: u64 = 40_000;

/// A daemon with node id `node` and a kv resource `index`, in `dir`.
fn start_node(dir: &Path, node: u32) -> Daemon {
    let path = dir.join("concord.toml");
    let text = format!("node = {node}\ndata_dir = \"data\"\n[daemon]\n{OPEN_DAEMON}{INDEX}");
    std::fs::write(&path, text).unwrap();
    Daemon::start_config(&path)
}

async fn put(concord: &Concord, key: &str) -> Result<Xid, ConcordError> {
    let mut tx = concord.begin().await?;
    tx.kv("index").await?.insert(key.as_bytes(), b"v").await?;
    Ok(tx.commit().await?.xid)
}

/// A URL on which nothing listens (a port bound, then let go).
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_follows_to_b_after_a_is_killed_and_a_cut_off_commit_is_never_ok() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path(), 1);
    let b = start_node(dir_b.path(), 2);
    let (url_a, url_b) = (a.url(), b.url());
    let concord = Concord::connect_any_within(
        &[url_a.as_str(), url_b.as_str()],
        Credentials::none(),
        FAILOVER_WAIT_MS,
    )
    .await
    .unwrap();

    let on_a = put(&concord, "before").await.unwrap();
    assert_eq!(on_a.node, 1, "the first node of the list is taken: {on_a}");

    let mut cut = concord.begin().await.unwrap();
    cut.kv("index")
        .await
        .unwrap()
        .insert(b"cut", b"v")
        .await
        .unwrap();
    assert_eq!(cut.xid().node, 1);

    a.kill();
    let started = Instant::now();
    let on_b = put(&concord, "after").await.unwrap();
    let took_ms = started.elapsed().as_millis() as u64;
    assert_eq!(on_b.node, 2, "after the kill, work goes to B: {on_b}");
    assert!(
        took_ms <= FAILOVER_WAIT_MS + SLACK_MS,
        "the begin on B took {took_ms} ms"
    );

    let started = Instant::now();
    let answer = cut.commit().await;
    let took_ms = started.elapsed().as_millis() as u64;
    assert!(took_ms <= CUT_OFF_ANSWER_MS_MAX, "{took_ms} ms");
    match answer {
        Err(ConcordError::RolledBack {
            xid,
            cause: cause @ RollbackCause::NodeLost { .. },
            ..
        }) => {
            assert_eq!(xid, cut.xid());
            assert!(cause.is_retryable(), "{cause}");
            assert!(cause.to_string().contains(&url_a), "{cause}");
        }
        Err(ConcordError::InDoubt { xid, cause, .. }) => {
            assert_eq!(xid, cut.xid());
            assert!(cause.contains("Concord::outcome"), "{cause}");
        }
        other => panic!("a commit cut off by the kill answered {other:?}"),
    }
    // B never heard of it; asking follows the primary (B) and says so.
    let outcome = concord.outcome(cut.xid()).await.unwrap();
    assert_eq!(outcome, TxnOutcome::Unknown);
    assert!(matches!(
        concord.outcome(on_b).await.unwrap(),
        TxnOutcome::Committed(_)
    ));
    assert!(b.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_dead_urls_fail_within_the_wait_naming_each() {
    let dead = [dead_url(), dead_url()];
    let urls: Vec<&str> = dead.iter().map(String::as_str).collect();
    let started = Instant::now();
    let failed = Concord::connect_any_within(&urls, Credentials::none(), 1_000).await;
    let took_ms = started.elapsed().as_millis() as u64;
    let Err(e @ ConcordError::NoPrimary { .. }) = failed else {
        panic!("connecting to dead URLs answered {:?}", failed.map(|_| ()));
    };
    assert!(took_ms <= 1_000 + SLACK_MS, "gave up after {took_ms} ms");
    assert!(e.is_retryable());
    let ConcordError::NoPrimary { tried, .. } = &e else {
        unreachable!()
    };
    assert_eq!(
        tried.iter().map(|t| t.url.as_str()).collect::<Vec<_>>(),
        urls
    );
    let message = e.to_string();
    for url in &urls {
        assert!(message.contains(url), "{message}");
    }
    assert!(message.contains("no answer"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_that_stays_dead_ends_the_search_with_no_primary() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path(), 1);
    let concord = Concord::connect_any_within(&[a.url().as_str()], Credentials::none(), 1_000)
        .await
        .unwrap();
    put(&concord, "k").await.unwrap();
    let url = a.url();
    a.kill();
    let started = Instant::now();
    let failed = concord.begin().await;
    let took_ms = started.elapsed().as_millis() as u64;
    assert!(took_ms <= 1_000 + SLACK_MS, "gave up after {took_ms} ms");
    match failed {
        Err(ConcordError::NoPrimary { tried, .. }) => assert_eq!(tried[0].url, url),
        other => panic!("{:?}", other.map(|t| t.xid())),
    }
}

/// A node that is not the primary: every call answers `not_primary(Some(primary))`.
#[derive(Clone)]
struct NotPrimaryNode {
    primary: String,
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for NotPrimaryNode {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(proto::not_primary(Some(&self.primary)).into_http()))
    }
}

impl tonic::server::NamedService for NotPrimaryNode {
    const NAME: &'static str = "concord.v1.Coordinator";
}

/// Serves a [`NotPrimaryNode`] naming `primary` on a free loopback port; returns its URL.
async fn serve_not_primary(primary: &str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let node = NotPrimaryNode {
        primary: primary.to_string(),
    };
    let serving = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(node)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (url, serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_primary_answer_sends_the_client_to_the_primary_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_node(dir.path(), 2);
    let (standby, serving) = serve_not_primary(&b.url()).await;
    // Only the node that is not the primary is listed: B is reached through its hint.
    let concord = Concord::connect_any_within(&[standby.as_str()], Credentials::none(), 3_000)
        .await
        .unwrap();
    let xid = put(&concord, "k").await.unwrap();
    assert_eq!(xid.node, 2, "{xid}");
    assert!(matches!(
        concord.outcome(xid).await.unwrap(),
        TxnOutcome::Committed(_)
    ));
    serving.abort();
    assert!(b.terminate());
}
