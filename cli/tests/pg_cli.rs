//! `concord pg install` and `concord pg replicate`, run as the real binary against databases of
//! the throwaway PostgreSQL cluster. Every configuration puts a password in the url (the cluster
//! trusts local connections, so it is ignored), and every test checks it is never printed.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use adapters::pgtest::PgCluster;
use adapters::postgres::schema::SCHEMA_VERSION;

/// The password every configured url carries.
const PASSWORD: &str = "s3cret";
/// Longest a `concord` run may take before the test kills it and fails.
const RUN_DEADLINE_S: u64 = 60;

/// What a finished `concord` run left.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "stderr: {}", self.stderr);
        self.no_password();
        &self.stdout
    }

    fn failed(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "stdout: {}", self.stdout);
        self.no_password();
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "one line: {}",
            self.stderr
        );
        assert!(self.stderr.starts_with("error: "), "{}", self.stderr);
        &self.stderr
    }

    fn no_password(&self) {
        for text in [&self.stdout, &self.stderr] {
            assert!(!text.contains(PASSWORD), "the password was printed: {text}");
        }
    }
}

/// Runs `concord ARGS --config CONFIG`, killed after [`RUN_DEADLINE_S`].
fn concord(args: &[&str], config: &Path) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let what = format!("concord {args:?}");
    let out = common::output_within(child, Duration::from_secs(RUN_DEADLINE_S), &what);
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `concord.toml` in a new temporary directory: postgres resource `orders` at `url` (with the
/// password added) and files resource `uploads`.
fn config_for(url: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concord.toml");
    let text = format!(
        "node = 1\ndata_dir = \"data\"\n\n[resources.orders]\nkind = \"postgres\"\nurl = \"{url} password={PASSWORD}\"\n\n[resources.uploads]\nkind = \"files\"\nroot = \"uploads\"\ncreate = true\n"
    );
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A new database of the shared cluster and a configuration naming it.
fn database(name: &str) -> (tempfile::TempDir, PathBuf) {
    let url = PgCluster::shared().database(name).unwrap();
    config_for(&url)
}

fn psql(db: &str, sql: &str) -> String {
    PgCluster::shared().psql(db, sql).unwrap()
}

#[test]
fn install_twice_says_already_at_the_current_version() {
    let (_dir, config) = database("install_twice");
    let first = concord(&["pg", "install", "--resource", "orders"], &config);
    let v = SCHEMA_VERSION;
    assert_eq!(
        first.ok(),
        format!("orders: concord schema installed (version {v})\n")
    );
    let second = concord(&["pg", "install", "--resource", "orders"], &config);
    assert_eq!(
        second.ok(),
        format!("orders: concord schema already at version {v}\n")
    );
    assert_eq!(
        psql(
            "install_twice",
            "SELECT value FROM concord.meta WHERE key = 'schema_version'"
        ),
        v.to_string()
    );
}

#[test]
fn install_prints_one_json_object() {
    let (_dir, config) = database("install_json");
    let args = ["pg", "install", "--resource", "orders", "--json"];
    let first: serde_json::Value = serde_json::from_str(concord(&args, &config).ok()).unwrap();
    assert_eq!(
        first,
        serde_json::json!({"resource": "orders", "from": 0, "to": SCHEMA_VERSION})
    );
    let second: serde_json::Value = serde_json::from_str(concord(&args, &config).ok()).unwrap();
    assert_eq!(
        second,
        serde_json::json!({"resource": "orders", "from": SCHEMA_VERSION, "to": SCHEMA_VERSION})
    );
}

#[test]
fn replicate_sets_up_a_table_with_a_primary_key_and_refuses_one_without() {
    let db = "replicate";
    let (_dir, config) = database(db);
    concord(&["pg", "install", "--resource", "orders"], &config).ok();
    psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         CREATE TABLE notes (id int PRIMARY KEY, body text);
         CREATE TABLE log (line text)",
    );

    let out = concord(
        &["pg", "replicate", "--resource", "orders", "items"],
        &config,
    );
    assert_eq!(out.ok(), "orders: capturing rows of public.items\n");
    let trigger = "SELECT count(*) FROM pg_trigger WHERE tgname = 'concord_capture'";
    assert_eq!(psql(db, trigger), "1");
    let again = concord(
        &["pg", "replicate", "--resource", "orders", "items", "--json"],
        &config,
    );
    let again: serde_json::Value = serde_json::from_str(again.ok()).unwrap();
    assert_eq!(
        again,
        serde_json::json!({"resource": "orders", "tables": ["public.items"]})
    );

    let refused = concord(&["pg", "replicate", "--resource", "orders", "log"], &config);
    let message = refused.failed(1);
    assert!(
        message.contains("no primary key") && message.contains("public.log"),
        "{message}"
    );
    // One transaction: a refused table leaves the others of the same command untouched too.
    let both = concord(
        &["pg", "replicate", "--resource", "orders", "notes", "log"],
        &config,
    );
    assert!(both.failed(1).contains("no primary key"));
    assert_eq!(psql(db, trigger), "1");
    assert_eq!(
        psql(db, "SELECT string_agg(tbl, ',') FROM concord.replicated"),
        "public.items"
    );
}

#[test]
fn replicate_before_install_says_to_install() {
    let db = "replicate_first";
    let (_dir, config) = database(db);
    psql(db, "CREATE TABLE items (id int PRIMARY KEY)");
    let out = concord(
        &["pg", "replicate", "--resource", "orders", "items"],
        &config,
    );
    let message = out.failed(1);
    assert!(
        message.contains("concord pg install --resource orders"),
        "{message}"
    );
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_error() {
    let db = "newer_schema";
    let (_dir, config) = database(db);
    concord(&["pg", "install", "--resource", "orders"], &config).ok();
    psql(
        db,
        "UPDATE concord.meta SET value = '99' WHERE key = 'schema_version'",
    );
    let out = concord(&["pg", "install", "--resource", "orders"], &config);
    let message = out.failed(1);
    assert!(
        message.contains("version 99") && message.contains("upgrade concord"),
        "{message}"
    );
}

#[test]
fn an_unknown_resource_is_refused_naming_the_postgres_resources() {
    let (_dir, config) = config_for("host=127.0.0.1 port=1 user=postgres dbname=none");
    let out = concord(&["pg", "install", "--resource", "billing"], &config);
    let message = out.failed(1);
    assert!(
        message.contains("\"billing\"")
            && message.contains("not in the configuration")
            && message.contains("postgres resources: orders"),
        "{message}"
    );
}

#[test]
fn a_files_resource_is_refused_by_pg_install() {
    let (_dir, config) = config_for("host=127.0.0.1 port=1 user=postgres dbname=none");
    let out = concord(&["pg", "install", "--resource", "uploads"], &config);
    let message = out.failed(1);
    assert!(
        message.contains("\"uploads\"")
            && message.contains("files resource")
            && message.contains("postgres resources: orders"),
        "{message}"
    );
}

#[test]
fn a_wrong_port_is_named_without_the_password() {
    // A loopback port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=shop");
    let (_dir, config) = config_for(&url);
    for args in [
        &["pg", "install", "--resource", "orders"][..],
        &["pg", "replicate", "--resource", "orders", "items"][..],
    ] {
        let out = concord(args, &config);
        let message = out.failed(1);
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(!message.contains("(retryable)"), "{message}");
    }
}

#[test]
fn a_missing_resource_option_is_a_usage_error() {
    let (_dir, config) = config_for("host=127.0.0.1 port=1 user=postgres dbname=none");
    assert_eq!(concord(&["pg", "install"], &config).code, Some(2));
    let no_tables = concord(&["pg", "replicate", "--resource", "orders"], &config);
    assert_eq!(no_tables.code, Some(2));
}
