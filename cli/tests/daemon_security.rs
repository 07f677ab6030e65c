//! The daemon's security and limits, through the real binary and `proto::client`: certificates
//! made here with rcgen (a CA, the daemon's certificate, client certificates), token files in a
//! temporary directory, and a `[daemon]` table naming them.
//!
//! TLS works with the CA and a plain-text client cannot talk to it; mutual TLS refuses a client
//! without a certificate (or with one another CA signed) and takes one with a certificate; a
//! missing or wrong token is UNAUTHENTICATED before any work (no transaction opens); a client
//! token on an operator call is PERMISSION_DENIED and the operator token passes; the configured
//! limits come back in `Begin` and are enforced; the daemon refuses to start without TLS or
//! plain text, with plain text on 0.0.0.0, and with a broken certificate file (named); no token
//! ever appears in its output, at RUST_LOG=debug.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::{
    Daemon, INDEX, Stderr, Stopped, UPLOADS, code_of, header, target, write_config,
};
use proto::client::{Client, ClientTls, Credentials, Token};
use proto::v1::{self, ErrorCode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::Code;

const CLIENT_TOKEN: &str = "client-token-5f2c9e81d04b7a36";
const OPERATOR_TOKEN: &str = "operator-token-a93e07b5c1d86f24";

/// A CA, and certificates it signs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `names` signed by this CA: (certificate PEM, key PEM).
    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A directory holding the daemon's certificate, key, CA and token files.
struct Site {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("concord test CA");
        let (cert, key) = ca.sign(&["127.0.0.1", "localhost"]);
        write(dir.path(), "tls/daemon.crt", &cert);
        write(dir.path(), "tls/daemon.key", &key);
        write(dir.path(), "tls/ca.crt", &ca.pem);
        write(dir.path(), "secrets/shop", &format!("{CLIENT_TOKEN}\n"));
        write(
            dir.path(),
            "secrets/operator",
            &format!("{OPERATOR_TOKEN}\n"),
        );
        Site { dir, ca }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `concord.toml` with the `[daemon]` table `daemon` and returns its path.
    fn config(&self, daemon: &str) -> PathBuf {
        write_config(
            self.path(),
            "",
            &format!("{daemon}\n"),
            &format!("{INDEX}{UPLOADS}"),
        )
    }

    fn tls(&self) -> ClientTls {
        ClientTls::with_ca_pem(self.ca.pem.clone())
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

const TLS: &str = "tls_cert_file = \"tls/daemon.crt\"\ntls_key_file = \"tls/daemon.key\"\n";
const TOKENS: &str = "operator_token_file = \"secrets/operator\"\n[daemon.clients.shop]\ntoken_file = \"secrets/shop\"\n";

impl Daemon {
    /// Starts `concord coordinator --config CONFIG --listen 127.0.0.1:0` at RUST_LOG=debug, its
    /// standard error kept in `daemon.stderr` beside the configuration.
    fn start_debug(config: &Path) -> Daemon {
        let mut command = Daemon::command(&["--config".as_ref(), config.as_os_str()]);
        command.env("RUST_LOG", "debug");
        Daemon::spawn(
            &mut command,
            Stderr::File(config.with_file_name("daemon.stderr")),
        )
    }

    /// A client over TLS with `credentials`.
    async fn tls_client(&self, credentials: &Credentials) -> Client {
        self.client_with(&self.https_url(), credentials).await
    }
}

fn client_token() -> Credentials {
    Credentials::none().with_token(Token::new(CLIENT_TOKEN).unwrap())
}

fn operator_token() -> Credentials {
    Credentials::none().with_token(Token::new(OPERATOR_TOKEN).unwrap())
}

async fn begin(client: &mut Client) -> Result<v1::BeginResponse, tonic::Status> {
    client
        .begin(v1::BeginRequest {
            header: header(),
            timeout_ms: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn open_txns(client: &mut Client) -> u64 {
    client
        .status(v1::StatusRequest { header: header() })
        .await
        .unwrap()
        .into_inner()
        .open_txns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tokens_and_limits_hold_and_no_token_is_printed() {
    let site = Site::new();
    let config = site.config(&format!(
        "{TLS}branches_per_txn_max = 1\ntxns_per_client_max = 2\nrequest_timeout_ms = 20000\n\
         message_bytes_max = 2097152\nchunk_bytes_max = 524288\n{TOKENS}"
    ));
    let daemon = Daemon::start_debug(&config);
    let with_tls = |c: Credentials| c.with_tls(site.tls());
    let mut shop = daemon.tls_client(&with_tls(client_token())).await;
    let mut operator = daemon.tls_client(&with_tls(operator_token())).await;

    // A plain-text client cannot talk to a TLS daemon.
    let plain = proto::client::connect(&daemon.url(), &client_token()).await;
    if let Ok(mut plain) = plain {
        let refused = begin(&mut plain).await.unwrap_err();
        assert_ne!(refused.code(), Code::Ok);
    }

    // No token, a wrong one, or one not sent as `Bearer`: refused before any work.
    let mut anonymous = daemon.tls_client(&with_tls(Credentials::none())).await;
    let wrong = Token::new("wrong-token-0123456789abcdef").unwrap();
    let mut stranger = daemon
        .tls_client(&with_tls(Credentials::none().with_token(wrong)))
        .await;
    assert_eq!(open_txns(&mut operator).await, 0);
    for client in [&mut anonymous, &mut stranger] {
        let refused = begin(client).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert_eq!(code_of(&refused), ErrorCode::Unauthenticated);
        let status = client
            .status(v1::StatusRequest { header: header() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    assert_eq!(open_txns(&mut operator).await, 0, "no transaction began");
    // Health answers probes without credentials.
    let health = anonymous
        .health(v1::HealthRequest { header: header() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.serving, v1::Serving::Serving as i32);

    // Operator calls: a client's token is denied, the operator's passes the check.
    let resolve = || v1::ResolveRequest {
        header: header(),
        xid: "n1e1s1".into(),
        decision: v1::Decision::Rollback as i32,
        operator: "test".into(),
        forget: Vec::new(),
        reason: "test".into(),
    };
    let denied = shop.resolve(resolve()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(code_of(&denied), ErrorCode::PermissionDenied);
    let denied = shop
        .list_in_doubt(v1::ListInDoubtRequest { header: header() })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let passed = operator.resolve(resolve()).await;
    if let Err(status) = &passed {
        assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ),
            "the operator token passes the check: {status:?}"
        );
    }
    operator
        .list_in_doubt(v1::ListInDoubtRequest { header: header() })
        .await
        .unwrap();
    // The operator token is not a client's.
    let denied = begin(&mut operator).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // The configured limits come back in Begin, and hold.
    let begun = begin(&mut shop).await.unwrap();
    let limits = begun.limits.unwrap();
    assert_eq!(limits.branches_per_txn_max, 1);
    assert_eq!(limits.txns_per_client_max, 2);
    assert_eq!(limits.request_timeout_ms, 20_000);
    assert_eq!(limits.message_bytes_max, 2 << 20);
    assert_eq!(limits.chunk_bytes_max, 512 << 10);
    let xid = begun.xid;
    shop.kv_insert(v1::KvInsertRequest {
        target: target(&xid, "index"),
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    })
    .await
    .unwrap();
    let second = shop
        .files_delete(v1::FilesDeleteRequest {
            target: target(&xid, "uploads"),
            path: "a.txt".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::ResourceExhausted, "{second:?}");
    let detail = proto::error_detail(&second).unwrap().unwrap();
    assert_eq!(detail.limit, "branches_per_txn_max");
    assert_eq!(open_txns(&mut operator).await, 1);
    begin(&mut shop).await.unwrap();
    let third = begin(&mut shop).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    let detail = proto::error_detail(&third).unwrap().unwrap();
    assert_eq!(detail.limit, "txns_per_client_max");
    shop.commit(v1::CommitRequest {
        header: header(),
        xid: xid.clone(),
    })
    .await
    .unwrap();

    drop((shop, operator, anonymous, stranger));
    let Stopped {
        clean,
        stdout,
        stderr,
    } = daemon.stop();
    assert!(clean, "SIGTERM stops it with exit 0: {stderr}");
    assert!(stderr.contains("DEBUG"), "debug logging was on: {stderr}");
    for token in [CLIENT_TOKEN, OPERATOR_TOKEN] {
        assert!(!stdout.contains(token), "a token in standard output");
        assert!(!stderr.contains(token), "a token in standard error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_the_ca_signed() {
    let site = Site::new();
    let config = site.config(&format!(
        "{TLS}tls_client_ca_file = \"tls/ca.crt\"\n{TOKENS}"
    ));
    let daemon = Daemon::start_debug(&config);
    let url = daemon.https_url();

    // Without a client certificate: the handshake (or the first call) fails.
    let bare = client_token().with_tls(site.tls());
    assert!(refused(&url, &bare).await, "no client certificate");

    // With one another CA signed: refused too.
    let other = Ca::new("another CA");
    let (cert, key) = other.sign(&["shop"]);
    let foreign = client_token().with_tls(site.tls().identity_pem(cert, key));
    assert!(refused(&url, &foreign).await, "a certificate of another CA");

    // With one the configured CA signed: served.
    let (cert, key) = site.ca.sign(&["shop"]);
    let signed = client_token().with_tls(site.tls().identity_pem(cert, key));
    let mut client = proto::client::connect(&url, &signed).await.unwrap();
    let begun = begin(&mut client).await.unwrap();
    client
        .rollback(v1::RollbackRequest {
            header: header(),
            xid: begun.xid,
            reason: String::new(),
        })
        .await
        .unwrap();
    drop(client);
    let Stopped { clean, stderr, .. } = daemon.stop();
    assert!(clean, "{stderr}");
}

/// Whether a client with `credentials` fails to connect or to begin.
async fn refused(url: &str, credentials: &Credentials) -> bool {
    match proto::client::connect(url, credentials).await {
        Err(_) => true,
        Ok(mut client) => begin(&mut client).await.is_err(),
    }
}

/// Runs `concord coordinator --config CONFIG` with `listen` and expects a refusal; returns its
/// standard error.
fn refused_start(config: &Path, listen: &str) -> String {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["coordinator", "--listen", listen, "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, Duration::from_secs(30), "concord coordinator");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "it never listened");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_daemon_refuses_to_start_unless_what_it_exposes_was_chosen() {
    let site = Site::new();
    let local = "127.0.0.1:0";

    // Neither TLS nor plain text.
    let stderr = refused_start(&site.config(TOKENS), local);
    assert!(
        stderr.contains("tls_cert_file") && stderr.contains("plaintext = true"),
        "{stderr}"
    );

    // Plain text on every address, not forced.
    let config = site.config(&format!("plaintext = true\n{TOKENS}"));
    let stderr = refused_start(&config, "0.0.0.0:0");
    assert!(stderr.contains("plaintext_any_address"), "{stderr}");

    // No client token, and not `unauthenticated`.
    let config = site.config("plaintext = true\n");
    let stderr = refused_start(&config, local);
    assert!(stderr.contains("[daemon.clients.NAME]"), "{stderr}");

    // A certificate file that is not one, and a missing key: each named.
    write(site.path(), "tls/broken.crt", "not a certificate\n");
    let config = site.config(&format!(
        "tls_cert_file = \"tls/broken.crt\"\ntls_key_file = \"tls/daemon.key\"\n{TOKENS}"
    ));
    let stderr = refused_start(&config, local);
    assert!(
        stderr.contains("broken.crt") && stderr.contains("tls_cert_file"),
        "{stderr}"
    );
    let config = site.config(&format!(
        "tls_cert_file = \"tls/daemon.crt\"\ntls_key_file = \"tls/missing.key\"\n{TOKENS}"
    ));
    let stderr = refused_start(&config, local);
    assert!(stderr.contains("missing.key"), "{stderr}");

    // A key that is not the certificate's.
    let (_, other_key) = site.ca.sign(&["127.0.0.1"]);
    write(site.path(), "tls/other.key", &other_key);
    let config = site.config(&format!(
        "tls_cert_file = \"tls/daemon.crt\"\ntls_key_file = \"tls/other.key\"\n{TOKENS}"
    ));
    let stderr = refused_start(&config, local);
    assert!(stderr.contains("other.key"), "{stderr}");

    // A short token is refused at load, naming the file, not the token.
    write(site.path(), "secrets/short", "abc123\n");
    let config =
        site.config("plaintext = true\n[daemon.clients.x]\ntoken_file = \"secrets/short\"\n");
    let stderr = refused_start(&config, local);
    assert!(stderr.contains("secrets/short"), "{stderr}");
    assert!(!stderr.contains("abc123"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_with_tokens_counts_open_transactions_by_client_name() {
    let site = Site::new();
    write(
        site.path(),
        "secrets/other",
        "other-token-7c1d2e3f4a5b6c7d\n",
    );
    let config = site.config(&format!(
        "plaintext = true\ntxns_per_client_max = 1\n{TOKENS}\
         [daemon.clients.other]\ntoken_file = \"secrets/other\"\n"
    ));
    let daemon = Daemon::start_debug(&config);
    let url = daemon.url();
    let mut shop = proto::client::connect(&url, &client_token()).await.unwrap();
    let other = Credentials::none().with_token(Token::new("other-token-7c1d2e3f4a5b6c7d").unwrap());
    let mut other = proto::client::connect(&url, &other).await.unwrap();
    // Both come from 127.0.0.1: counted by name, each has its own one transaction.
    begin(&mut shop).await.unwrap();
    begin(&mut other).await.unwrap();
    let refused = begin(&mut shop).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop((shop, other));
    let Stopped { clean, stderr, .. } = daemon.stop();
    assert!(clean, "{stderr}");
}

/// `concord config check --json --config CONFIG`: (exit 0, the document).
fn config_check(config: &Path) -> (bool, serde_json::Value) {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["config", "check", "--json", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(child, Duration::from_secs(30), "concord config check");
    let text = String::from_utf8_lossy(&out.stdout);
    for token in [CLIENT_TOKEN, OPERATOR_TOKEN] {
        assert!(!text.contains(token), "a token in the check's output");
    }
    (out.status.success(), serde_json::from_str(&text).unwrap())
}

#[test]
fn config_check_shows_the_daemon_table_and_what_keeps_it_from_serving() {
    let site = Site::new();
    let config = site.config(&format!(
        "{TLS}tls_client_ca_file = \"tls/ca.crt\"\nmetrics_listen = \"127.0.0.1:9700\"\n\
         branches_per_txn_max = 4\n{TOKENS}"
    ));
    let (ok, report) = config_check(&config);
    assert!(ok, "{report}");
    let daemon = &report["daemon"];
    assert_eq!(daemon["transport"], "mutual tls");
    assert_eq!(daemon["listen"], "127.0.0.1:7700");
    assert_eq!(daemon["clients"], serde_json::json!(["shop"]));
    assert_eq!(daemon["operator_token"], true);
    assert_eq!(daemon["metrics_listen"], "127.0.0.1:9700");
    assert_eq!(daemon["limits"]["branches_per_txn_max"], 4);
    assert_eq!(daemon["limits"]["request_timeout_ms"], 30_000);

    let config = site.config(&format!(
        "listen = \"0.0.0.0:7700\"\nplaintext = true\n{TOKENS}"
    ));
    let (ok, report) = config_check(&config);
    assert!(!ok);
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems[0]["kind"], "daemon", "{report}");
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains("plaintext_any_address")
    );

    write(
        site.path(),
        "tls/broken.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let config = site.config(&format!(
        "tls_cert_file = \"tls/daemon.crt\"\ntls_key_file = \"tls/broken.key\"\n{TOKENS}"
    ));
    let (ok, report) = config_check(&config);
    assert!(!ok);
    let message = report["problems"][0]["message"].as_str().unwrap();
    assert!(message.contains("broken.key"), "{message}");
}
