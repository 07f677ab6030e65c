//! `concord coordinator --metrics-listen` and `concord status`, through the real binary: the
//! daemon on free loopback ports, transactions over gRPC, the Prometheus text scraped with a
//! plain HTTP GET and its counters checked against what was done; `status --json` read back;
//! a files root removed under the running daemon shows unhealthy with exit 4; a daemon that is
//! not running gives exit 1 and says how to start one; a non-loopback metrics address is
//! refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, INDEX, OPEN_DAEMON, START_MS_MAX, header, target, write_config};
use proto::v1;
use proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// How long a metric may take to show an event: phase 2 runs after the answer, and the gauges
/// are sampled once a second.
const SETTLE_MS_MAX: u64 = 10_000;
/// How long one `concord status` may take.
const STATUS_MS_MAX: u64 = 30_000;
/// How long one scrape may take.
const SCRAPE_MS_MAX: u64 = 5_000;

impl Daemon {
    /// Starts it on the embedded defaults in `data`, gRPC and metrics on free loopback ports.
    fn start_metrics(data: &Path) -> Daemon {
        let data = data.as_os_str();
        Daemon::start_with(&[
            "--metrics-listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--data".as_ref(),
            data,
        ])
    }

    /// The metrics address, from the `metrics on ADDR` line printed before the listening line.
    fn metrics(&self) -> &str {
        self.before
            .iter()
            .find_map(|line| line.strip_prefix("metrics on "))
            .expect("a `metrics on ADDR` line before the listening line")
    }

    /// The Prometheus text, by a plain HTTP/1.1 GET.
    fn scrape(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics()).unwrap();
        let limit = Some(Duration::from_millis(SCRAPE_MS_MAX));
        stream.set_read_timeout(limit).unwrap();
        stream.set_write_timeout(limit).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.metrics()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// Scrapes until `check` holds of the text, at most [`SETTLE_MS_MAX`]; returns that text.
    fn scrape_until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_millis(SETTLE_MS_MAX);
        loop {
            let text = self.scrape();
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {SETTLE_MS_MAX} ms; the metrics:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The sum of the samples of metric `name` whose labels include each of `labels` (`k="v"`);
/// 0 when there is none (a metric appears once its first event is recorded).
fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, sample) = line.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest),
                None => (series, ""),
            };
            (metric == name && labels.iter().all(|l| rest.contains(l)))
                .then(|| sample.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

async fn begin(client: &mut CoordinatorClient<Channel>) -> String {
    let request = v1::BeginRequest {
        header: header(),
        timeout_ms: None,
    };
    client.begin(request).await.unwrap().into_inner().xid
}

/// A transaction with two branches (kv and files), so that it takes both phases.
async fn two_branches(client: &mut CoordinatorClient<Channel>, n: usize) -> String {
    use v1::files_put_request::Part;
    let xid = begin(client).await;
    let insert = v1::KvInsertRequest {
        target: target(&xid, "index"),
        key: format!("key-{n}").into_bytes(),
        value: b"value".to_vec(),
    };
    client.kv_insert(insert).await.unwrap();
    let messages = vec![
        v1::FilesPutRequest {
            part: Some(Part::Start(v1::FilesPutStart {
                target: target(&xid, "uploads"),
                path: format!("file-{n}"),
                size_bytes: Some(5),
            })),
        },
        v1::FilesPutRequest {
            part: Some(Part::Chunk(b"hello".to_vec())),
        },
    ];
    let stream = tonic::codegen::tokio_stream::iter(messages);
    client.files_put(stream).await.unwrap();
    xid
}

async fn commit(client: &mut CoordinatorClient<Channel>, xid: &str) {
    let request = v1::CommitRequest {
        header: header(),
        xid: xid.to_string(),
    };
    let outcome = client.commit(request).await.unwrap().into_inner().outcome;
    assert!(
        matches!(
            outcome.and_then(|o| o.state),
            Some(v1::txn_outcome::State::Committed(_))
        ),
        "{xid} committed"
    );
}

async fn rollback(client: &mut CoordinatorClient<Channel>, xid: &str) {
    let request = v1::RollbackRequest {
        header: header(),
        xid: xid.to_string(),
        ..Default::default()
    };
    client.rollback(request).await.unwrap();
}

/// Runs `concord status --url URL [more]` to its end.
fn status(url: &str, more: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["status", "--url", url])
        .args(more)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::output_within(
        child,
        Duration::from_millis(STATUS_MS_MAX),
        "concord status",
    )
}

fn status_json(url: &str) -> (Option<i32>, serde_json::Value) {
    let out = status(url, &["--json"]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counters_move_by_what_was_done_and_status_tells_the_truth() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_metrics(data.path());
    let mut client = daemon.client().await;
    let before = daemon.scrape();
    let committed = "outcome=\"committed\"";
    let rolled_back = "outcome=\"rolled_back\"";
    let coordinator = "journal=\"coordinator\"";
    let syncs_before = value(&before, "concord_journal_syncs_total", &[coordinator]);

    for n in 0..3 {
        let xid = two_branches(&mut client, n).await;
        commit(&mut client, &xid).await;
    }
    for n in 3..5 {
        let xid = two_branches(&mut client, n).await;
        rollback(&mut client, &xid).await;
    }
    let open = begin(&mut client).await;

    let prepares = ["resource=\"index\"", "call=\"prepare\""];
    let commits = ["resource=\"uploads\"", "call=\"commit\""];
    let text = daemon.scrape_until("phase 2 of every commit and the open gauge", |t| {
        value(t, "concord_resource_call_seconds_count", &commits) >= 3.0
            && value(t, "concord_open_transactions", &[]) == 1.0
    });
    let moved =
        |name: &str, labels: &[&str]| value(&text, name, labels) - value(&before, name, labels);
    assert_eq!(
        moved("concord_transactions_total", &[committed]),
        3.0,
        "{text}"
    );
    assert_eq!(
        moved("concord_transactions_total", &[rolled_back]),
        2.0,
        "{text}"
    );
    assert_eq!(
        moved("concord_transactions_total", &["outcome=\"in_doubt\""]),
        0.0
    );
    assert_eq!(moved("concord_commit_seconds_count", &[]), 3.0, "{text}");
    assert_eq!(
        moved("concord_resource_call_seconds_count", &prepares),
        3.0,
        "one prepare per commit, none for a rollback: {text}"
    );
    assert_eq!(
        moved(
            "concord_resource_call_seconds_count",
            &["resource=\"index\"", "call=\"rollback\""]
        ),
        2.0,
        "{text}"
    );
    // Three decisions and their End records: at least one sync, never more syncs than records.
    let syncs = value(&text, "concord_journal_syncs_total", &[coordinator]) - syncs_before;
    assert!(syncs >= 1.0, "{text}");
    let per_sync_count = value(
        &text,
        "concord_journal_records_per_sync_count",
        &[coordinator],
    );
    let per_sync_sum = value(
        &text,
        "concord_journal_records_per_sync_sum",
        &[coordinator],
    );
    assert!(
        per_sync_sum >= per_sync_count && per_sync_sum >= 3.0,
        "{text}"
    );
    assert_eq!(moved("concord_phase2_retries_total", &[]), 0.0);
    assert_eq!(value(&text, "concord_in_doubt", &[]), 0.0, "{text}");
    assert!(
        text.contains("# TYPE concord_commit_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("# HELP concord_transactions_total"), "{text}");

    let (code, json) = status_json(&daemon.url());
    assert_eq!(code, Some(0), "{json}");
    let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    let expected = [
        "durable_lsn",
        "epoch",
        "in_doubt_txns",
        "node",
        "open_txns",
        "replication",
        "resources",
        "role",
        "serving",
        "version",
    ];
    assert_eq!(keys, expected);
    assert_eq!(json["replication"]["mode"], "async", "{json}");
    assert_eq!(
        json["replication"]["standbys"],
        serde_json::json!([]),
        "{json}"
    );
    assert_eq!(json["role"], "primary");
    assert_eq!(json["serving"], "serving");
    assert_eq!(json["open_txns"], 1, "{json}");
    assert_eq!(json["in_doubt_txns"], 0, "{json}");
    assert!(json["durable_lsn"].as_u64().unwrap() >= 3, "{json}");
    let resources = json["resources"].as_array().unwrap();
    let names: Vec<_> = resources
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["index", "mail", "thumbnails", "uploads"], "{json}");
    assert!(resources.iter().all(|r| r["healthy"] == true), "{json}");

    let out = status(&daemon.url(), &[]);
    let lines = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{lines}");
    assert!(lines.contains("primary, serving"), "{lines}");
    assert!(lines.contains("1 open, 0 in doubt"), "{lines}");
    assert!(
        lines.contains("resource uploads (files): healthy"),
        "{lines}"
    );

    rollback(&mut client, &open).await;
    drop(client);
    assert!(daemon.terminate(), "the daemon exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_root_is_unhealthy_and_a_stopped_daemon_is_unreachable() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_metrics(data.path());
    std::fs::remove_dir_all(data.path().join("uploads")).unwrap();

    let (code, json) = status_json(&daemon.url());
    assert_eq!(code, Some(4), "exit 4 when a resource is unhealthy: {json}");
    let resources = json["resources"].as_array().unwrap();
    let uploads = resources.iter().find(|r| r["name"] == "uploads").unwrap();
    assert_eq!(uploads["healthy"], false, "{json}");
    let detail = uploads["detail"].as_str().unwrap();
    assert!(
        detail.contains("root") && detail.contains("uploads"),
        "{detail}"
    );
    let others = resources.iter().filter(|r| r["name"] != "uploads");
    assert!(others.clone().count() == 3 && others.into_iter().all(|r| r["healthy"] == true));

    let out = status(&daemon.url(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("resource uploads"), "{stderr}");

    let url = daemon.url();
    assert!(daemon.terminate());
    let out = status(&url, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing on standard output");
    assert!(
        stderr.contains("concord coordinator") && stderr.contains(&url),
        "says where it looked and how to start a daemon: {stderr}"
    );
}

#[test]
fn a_non_loopback_metrics_address_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["coordinator", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "0.0.0.0:0", "--data"])
        .arg(data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(
        child,
        Duration::from_millis(START_MS_MAX),
        "concord coordinator",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--metrics-listen-any"), "{stderr}");
}

/// A configuration file whose `[daemon]` table serves plain text without tokens, with `more`.
fn config_with(dir: &Path, more: &str) -> std::path::PathBuf {
    write_config(dir, "", &format!("{OPEN_DAEMON}{more}\n"), INDEX)
}

#[test]
fn the_daemon_table_names_the_metrics_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "metrics_listen = \"127.0.0.1:0\"");
    let daemon = Daemon::start_config(&config);
    let text = daemon.scrape();
    assert!(
        text.contains("# TYPE concord_journal_syncs_total counter"),
        "{text}"
    );
    assert!(daemon.terminate());

    let config = config_with(dir.path(), "metrics_listen = \"0.0.0.0:0\"");
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(
        child,
        Duration::from_millis(START_MS_MAX),
        "concord coordinator",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--metrics-listen-any"), "{stderr}");
}

/// A SIGTERM sent as soon as the daemon says it listens drains it (exit 0): its signal
/// handlers are in place before it prints the line scripts wait for.
#[test]
fn a_sigterm_right_after_the_listening_line_drains() {
    for _ in 0..5 {
        let data = tempfile::tempdir().unwrap();
        let daemon = Daemon::start_metrics(data.path());
        assert!(daemon.terminate(), "exit 0 on an early SIGTERM");
    }
}
