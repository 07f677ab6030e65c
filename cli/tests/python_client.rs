//! A Python application drives the real daemon: `clients/python/test_client.py`, over the
//! Python client (`clients/python/concord_client.py`) with `grpcio` stubs generated here from
//! `coordinator.proto`, commits a transaction over files (a streamed 3 MiB put), mail, kv and a
//! PostgreSQL branch prepared on its own psycopg connection, rolls one back, commits a second
//! time, commits one whose only branch is PostgreSQL (two phases) and asks about an unknown
//! xid. Then this test checks from Rust that the files, the Maildir, the PostgreSQL rows and —
//! after SIGTERM — the sled data are exactly what committed.
//! The README's `clients/python/example.py` runs against the same daemon too. A second test
//! (`clients/python/test_tls.py`) connects over mutual TLS with a token.
//!
//! The Python packages live in a venv under the target directory (`target/python-venv`),
//! which `scripts/test` prepares; when it is missing or incomplete this test creates it and
//! installs `clients/python/requirements.txt` with pip, and fails saying how to install them
//! when pip cannot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use adapters::pgtest::PgCluster;
use common::daemon::{Daemon, eventually};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// How long creating the venv and installing its packages may take.
const PIP_MS_MAX: u64 = 600_000;
/// How long the Python test script may run.
const SCRIPT_MS_MAX: u64 = 300_000;
/// How long phase 2 may take to show a commit in the stores.
const VISIBLE_MS_MAX: u64 = 10_000;
/// The bearer token of the Python client (`[daemon.clients.python]`).
const TOKEN: &str = "python-client-token-0123456789";
/// The size of the streamed put (the script writes the same pattern).
const PUT_BYTES: usize = 3 << 20;
/// The message the script enqueues, as delivered.
const MESSAGE: &str = "Date: Sun, 06 Dec 2026 04:00:00 +0000\r\nMessage-ID: <python-1@example.org>\r\nFrom: shop@example.org\r\nTo: alice@example.org\r\nSubject: order 1 from Python\r\n\r\nThanks for your order.\r\n";

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn clients_python() -> PathBuf {
    repo().join("clients/python")
}

/// `target/python-venv`: beside the target directory's `tmp`.
fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("python-venv")
}

/// Runs `command` to its end within `ms`; returns its output.
fn run(command: &mut Command, ms: u64, what: &str) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    common::output_within(child, Duration::from_millis(ms), what)
}

/// The venv's python, with `grpcio`, `grpcio-tools` and `psycopg` importable: made and
/// filled with pip when missing (once, for every test of this file).
fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(venv_python).clone()
}

fn venv_python() -> PathBuf {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        python.is_file()
            && run(
                Command::new(python).args(["-c", "import grpc, grpc_tools, psycopg"]),
                60_000,
                "python -c import",
            )
            .status
            .success()
    };
    if ready(&python) {
        return python;
    }
    let how = format!(
        "install them with `python3 -m venv {venv} && {venv}/bin/pip install -r clients/python/requirements.txt` (scripts/test does)",
        venv = venv.display()
    );
    if !python.is_file() {
        let made = run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            PIP_MS_MAX,
            "python3 -m venv",
        );
        assert!(
            made.status.success(),
            "python3 -m venv failed: {}; {how}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let installed = run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(clients_python().join("requirements.txt")),
        PIP_MS_MAX,
        "pip install",
    );
    assert!(
        installed.status.success() && ready(&python),
        "the Python packages grpcio, grpcio-tools and psycopg could not be installed: {}; {how}",
        String::from_utf8_lossy(&installed.stderr)
    );
    python
}

/// Generates the stubs from `proto/` into `out`.
fn generate_stubs(python: &Path, out: &Path) {
    let generated = run(
        Command::new(python)
            .arg(clients_python().join("concord_client.py"))
            .arg("generate")
            .arg(out),
        60_000,
        "generate the stubs",
    );
    assert!(
        generated.status.success(),
        "generating the stubs failed: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    assert!(out.join("concord/v1/coordinator_pb2_grpc.py").is_file());
}

/// Runs `concord ARGS --config CONFIG` and asserts it succeeds.
fn concord(args: &[&str], config: &Path) {
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_concord"))
            .args(args)
            .arg("--config")
            .arg(config),
        60_000,
        "concord",
    );
    assert!(
        out.status.success(),
        "concord {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database with the `concord` schema and a replicated `orders` table, and a configuration
/// with it and a files, a mail and a kv resource under `dir`, served in plain text to one
/// client with [`TOKEN`]; returns the configuration's path and the database's connection
/// string.
fn setup(dir: &Path, cluster: &PgCluster) -> (PathBuf, String) {
    let url = cluster.database("python_client").unwrap();
    cluster
        .psql(
            "python_client",
            "CREATE TABLE orders (id integer PRIMARY KEY, note text NOT NULL)",
        )
        .unwrap();
    let data = dir.join("data");
    let token_file = dir.join("python.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config = dir.join("concord.toml");
    std::fs::write(
        &config,
        format!(
            "node = 1\ndata_dir = {data:?}\n\n\
             [daemon]\nplaintext = true\n\n\
             [daemon.clients.python]\ntoken_file = {token:?}\n\n\
             [resources.uploads]\nkind = \"files\"\nroot = {uploads:?}\ncreate = true\n\n\
             [resources.mail]\nkind = \"mail\"\nmaildir = {mail:?}\ncreate = true\n\n\
             [resources.index]\nkind = \"kv\"\ndir = {index:?}\ncreate = true\n\n\
             [resources.orders]\nkind = \"postgres\"\nurl = \"{url}\"\n",
            token = token_file,
            uploads = dir.join("uploads"),
            mail = dir.join("mail"),
            index = dir.join("index"),
        ),
    )
    .unwrap();
    concord(&["pg", "install", "--resource", "orders"], &config);
    concord(
        &["pg", "replicate", "--resource", "orders", "orders"],
        &config,
    );
    (config, url)
}

/// What the script reports it committed.
fn result(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?} is not the result: {e}"))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The sled store's data tree, read with sled itself (the daemon has exited); its prepared
/// tree must be empty.
fn sled_data(dir: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let db = sled::Config::new().path(dir).open().unwrap();
    let prepared = db.open_tree("concord.prepared").unwrap();
    assert_eq!(prepared.len(), 0, "sled branches left prepared");
    let data = db.open_tree("data").unwrap();
    data.iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

#[test]
fn a_python_application_commits_and_rolls_back_over_every_store() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    generate_stubs(&python, &stubs);
    let cluster = PgCluster::shared();
    let (config, url) = setup(dir.path(), cluster);
    let daemon = Daemon::start_config(&config);

    let result_path = dir.path().join("result.json");
    let out = run(
        Command::new(&python)
            .arg(clients_python().join("test_client.py"))
            .env("PYTHONPATH", clients_python())
            .env("CONCORD_PY_STUBS", &stubs)
            .env("CONCORD_URL", daemon.url())
            .env("CONCORD_TOKEN", TOKEN)
            .env("CONCORD_PG_DSN", &url)
            .env("CONCORD_RESULT", &result_path),
        SCRIPT_MS_MAX,
        "test_client.py",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "test_client.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("8 passed, 0 failed"), "{stdout}");
    let result = result(&result_path);

    // The files resource: the committed put, byte for byte; nothing of the rollback.
    let content: Vec<u8> = (0..PUT_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    let uploads = dir.path().join("uploads");
    eventually(VISIBLE_MS_MAX, "the committed file shows", || {
        std::fs::read(uploads.join("py/big.bin")).is_ok_and(|c| c == content)
    });
    assert_eq!(names_in(&uploads.join("py")), ["big.bin"]);

    // The Maildir: exactly the one message, under the name the enqueue answered.
    let mail = dir.path().join("mail");
    eventually(VISIBLE_MS_MAX, "the message is delivered", || {
        !names_in(&mail.join("new")).is_empty()
    });
    assert_eq!(names_in(&mail.join("new")), [result["mail_name"].clone()]);
    assert!(names_in(&mail.join("tmp")).is_empty());
    let delivered = std::fs::read_to_string(mail.join("new").join(&result["mail_name"])).unwrap();
    assert_eq!(delivered, MESSAGE);

    // PostgreSQL: the committed row only, and nothing left prepared.
    let rows = cluster
        .psql("python_client", "SELECT id, note FROM orders ORDER BY id")
        .unwrap();
    assert_eq!(rows.trim(), "1|committed from Python\n3|alone");
    let prepared = cluster
        .psql(
            "python_client",
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
        )
        .unwrap();
    assert_eq!(prepared.trim(), "0");
    let marker = cluster
        .psql(
            "python_client",
            &format!(
                "SELECT xid FROM concord.markers WHERE gid = '{}'",
                result["committed_gid"]
            ),
        )
        .unwrap();
    assert_eq!(
        marker.trim(),
        result["committed_xid"],
        "the branch's marker"
    );

    // The README's example runs against the same daemon and commits its order.
    let example = run(
        Command::new(&python)
            .arg(clients_python().join("example.py"))
            .arg(daemon.url())
            .arg(&url)
            .env("PYTHONPATH", clients_python())
            .env("CONCORD_PY_STUBS", &stubs)
            .env("CONCORD_TOKEN", TOKEN),
        SCRIPT_MS_MAX,
        "example.py",
    );
    let printed = String::from_utf8_lossy(&example.stdout);
    assert!(
        example.status.success(),
        "example.py failed:\n{printed}\n{}",
        String::from_utf8_lossy(&example.stderr)
    );
    assert!(
        printed.contains(": committed (decision at lsn"),
        "{printed}"
    );
    let ordered = cluster
        .psql("python_client", "SELECT id, item FROM example_orders")
        .unwrap();
    assert_eq!(ordered.trim(), "1|teapot");
    eventually(VISIBLE_MS_MAX, "the example's invoice shows", || {
        uploads.join("example/invoice-1.txt").is_file()
    });

    // sled, read once the daemon has stopped: the committed keys only.
    assert!(daemon.terminate(), "SIGTERM ends the daemon with exit 0");
    let keys = sled_data(&dir.path().join("index"));
    let expected: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"py/order/1".to_vec(), b"py/big.bin".to_vec()),
        (b"py/read-only".to_vec(), b"y".to_vec()),
        (
            b"example/order/1".to_vec(),
            b"example/invoice-1.txt".to_vec(),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected);
}

/// A self-signed CA (its PEM) and two certificates it signed, for the daemon and for the
/// client: (CA, daemon certificate, daemon key, client certificate, client key), all PEM.
fn certificates() -> [String; 5] {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "python test CA");
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(params, ca_key);
    let sign = |names: &[&str]| {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (daemon_cert, daemon_key) = sign(&["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = sign(&["python-client"]);
    [ca_pem, daemon_cert, daemon_key, client_cert, client_key]
}

#[test]
fn a_python_application_connects_over_mutual_tls_with_a_token() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    generate_stubs(&python, &stubs);
    let names = [
        "ca.crt",
        "daemon.crt",
        "daemon.key",
        "client.crt",
        "client.key",
    ];
    for (name, pem) in names.iter().zip(certificates()) {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    std::fs::write(dir.path().join("python.token"), format!("{TOKEN}\n")).unwrap();
    let config = dir.path().join("concord.toml");
    std::fs::write(
        &config,
        "node = 1\ndata_dir = \"data\"\n\n\
         [daemon]\ntls_cert_file = \"daemon.crt\"\ntls_key_file = \"daemon.key\"\n\
         tls_client_ca_file = \"ca.crt\"\n\n\
         [daemon.clients.python]\ntoken_file = \"python.token\"\n\n\
         [resources.index]\nkind = \"kv\"\ndir = \"data/index\"\ncreate = true\n",
    )
    .unwrap();
    let daemon = Daemon::start_config(&config);
    let out = run(
        Command::new(&python)
            .arg(clients_python().join("test_tls.py"))
            .env("PYTHONPATH", clients_python())
            .env("CONCORD_PY_STUBS", &stubs)
            .env("CONCORD_URL", daemon.https_url())
            .env("CONCORD_TOKEN", TOKEN)
            .env("CONCORD_CA", dir.path().join("ca.crt"))
            .env("CONCORD_CLIENT_CERT", dir.path().join("client.crt"))
            .env("CONCORD_CLIENT_KEY", dir.path().join("client.key")),
        SCRIPT_MS_MAX,
        "test_tls.py",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "test_tls.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 passed, 0 failed"), "{stdout}");
    assert!(daemon.terminate(), "SIGTERM ends the daemon with exit 0");
    let keys = sled_data(&dir.path().join("data/index"));
    assert_eq!(
        keys.get(b"py/tls".as_slice()).map(Vec::as_slice),
        Some(b"over TLS".as_slice())
    );
}
