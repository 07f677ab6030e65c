//! `concord config check`, run as the real binary: a good file (files, mail and kv resources
//! whose directories do not exist yet, a PostgreSQL resource with its schema installed) passes;
//! a PostgreSQL resource with nothing listening, an overlap, a TOML syntax error and a database
//! without the schema fail with the documented exit code, naming what is wrong; and no run
//! creates a file or directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use adapters::pgtest::{PASSWORD_ROLE_PASSWORD, PgCluster};

/// Longest a `concord` run may take before the test kills it and fails.
const RUN_DEADLINE_S: u64 = 60;
/// The exit code of a configuration that is not usable (`concord --help`).
const EXIT_CONFIG_UNUSABLE: i32 = 5;
/// The password the PostgreSQL urls carry; the cluster trusts loopback, so it is ignored there.
const PASSWORD: &str = "s3cret-in-url";

/// What a finished `concord config check` run left.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The one JSON document of a `--json` run.
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("not one JSON document ({e}): {}", self.stdout);
        })
    }
}

/// Runs `concord config check --config CONFIG [EXTRA]`, killed after [`RUN_DEADLINE_S`].
fn check(config: &Path, extra: &[&str]) -> Run {
    check_with_env(config, extra, &[])
}

/// [`check`] with the environment variables `vars` set.
fn check_with_env(config: &Path, extra: &[&str], vars: &[(&str, &str)]) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["config", "check", "--config"])
        .arg(config)
        .args(extra)
        .envs(vars.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::output_within(
        child,
        Duration::from_secs(RUN_DEADLINE_S),
        "concord config check",
    );
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    for text in [&run.stdout, &run.stderr] {
        assert!(!text.contains(PASSWORD), "the password was printed: {text}");
    }
    run
}

/// Writes `text` as `concord.toml` in a new temporary directory.
fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concord.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Every path under `dir`, recursively, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(tree(&path));
        }
        out.push(path);
    }
    out.sort();
    out
}

/// A files, a mail and a kv resource, each created when missing, none existing yet.
const LOCAL_RESOURCES: &str = "node = 1\ndata_dir = \"data\"\n\
    [resources.uploads]\nkind = \"files\"\nroot = \"data/uploads\"\ncreate = true\n\
    [resources.outbox]\nkind = \"mail\"\nmaildir = \"spool/outbox\"\ncreate = true\n\
    [resources.index]\nkind = \"kv\"\ndir = \"data/index\"\ncreate = true\n";

/// A database of the shared cluster with the concord schema installed; its url (no password).
fn installed_database(name: &str) -> String {
    let cluster = PgCluster::shared();
    let url = cluster.database(name).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(adapters::postgres::install("orders", &url))
        .unwrap();
    url
}

#[test]
fn a_good_configuration_passes_and_creates_nothing() {
    let url = installed_database("config_check_good");
    let text = format!(
        "{LOCAL_RESOURCES}[resources.orders]\nkind = \"postgres\"\nurl = \"{url} password={PASSWORD}\"\n"
    );
    let (dir, path) = write_config(&text);
    let before = tree(dir.path());
    let run = check(&path, &["--json"]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["config"], path.display().to_string());
    assert_eq!(report["problems"].as_array().unwrap().len(), 0, "{report}");
    let resources = report["resources"].as_array().unwrap();
    let names: Vec<&str> = resources
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["index", "orders", "outbox", "uploads"]);
    for r in resources {
        assert_eq!(r["ok"], true, "{r}");
        assert!(r["kind"].is_string() && r["detail"].is_string(), "{r}");
    }
    let text = check(&path, &[]);
    assert_eq!(text.code, Some(0), "{}{}", text.stdout, text.stderr);
    assert!(
        text.stdout.contains("resource orders (postgres): ok"),
        "{}",
        text.stdout
    );
    assert_eq!(tree(dir.path()), before, "the check created something");
}

#[test]
fn a_postgres_resource_with_nothing_listening_is_named_with_the_exit_code() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let text = format!(
        "{LOCAL_RESOURCES}[resources.orders]\nkind = \"postgres\"\n\
         url = \"host=127.0.0.1 port={port} user=app dbname=shop password={PASSWORD}\"\n\
         connect_timeout_ms = 2000\n"
    );
    let (dir, path) = write_config(&text);
    let before = tree(dir.path());
    let run = check(&path, &["--json"]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["ok"], false);
    let orders = report["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "orders")
        .unwrap()
        .clone();
    assert_eq!(orders["ok"], false, "{orders}");
    assert_eq!(orders["kind"], "postgres");
    let detail = orders["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("127.0.0.1:{port}")) && detail.contains("connect"),
        "{detail}"
    );
    assert!(!detail.contains("(retryable)"), "{detail}");
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    let text = check(&path, &[]);
    assert_eq!(text.code, Some(EXIT_CONFIG_UNUSABLE));
    assert!(
        text.stdout
            .contains("resource orders (postgres): NOT REACHABLE"),
        "{}",
        text.stdout
    );
    assert_eq!(tree(dir.path()), before, "the check created something");
}

#[test]
fn a_database_without_the_schema_is_not_reachable_and_is_left_alone() {
    let cluster = PgCluster::shared();
    let url = cluster.database("config_check_bare").unwrap();
    let text = format!(
        "node = 1\ndata_dir = \"data\"\n[resources.orders]\nkind = \"postgres\"\nurl = \"{url}\"\n"
    );
    let (_dir, path) = write_config(&text);
    let run = check(&path, &["--json"]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    let detail = run.json()["resources"][0]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("concord pg install"), "{detail}");
    let schema = cluster
        .psql(
            "config_check_bare",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'concord'",
        )
        .unwrap();
    assert_eq!(schema, "0", "the check installed the schema");
}

#[test]
fn overlapping_directories_are_refused_naming_both() {
    let text = "node = 1\ndata_dir = \"data\"\n\
        [resources.outbox]\nkind = \"mail\"\nmaildir = \"spool\"\ncreate = true\n\
        [resources.index]\nkind = \"kv\"\ndir = \"spool\"\ncreate = true\n";
    let (dir, path) = write_config(text);
    let run = check(&path, &["--json"]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    let report = run.json();
    let problem = &report["problems"][0];
    assert_eq!(problem["kind"], "overlap", "{report}");
    let message = problem["message"].as_str().unwrap();
    assert!(
        message.contains("[resources.outbox]") && message.contains("[resources.index]"),
        "{message}"
    );
    let files_in_journal = "node = 1\ndata_dir = \"data\"\n\
        [resources.uploads]\nkind = \"files\"\nroot = \"data/journal\"\ncreate = true\n";
    std::fs::write(&path, files_in_journal).unwrap();
    let run = check(&path, &[]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    assert!(
        run.stdout.contains("problem (overlap)") && run.stdout.contains("journal"),
        "{}",
        run.stdout
    );
    assert_eq!(tree(dir.path()), [path], "the check created something");
}

#[test]
fn a_toml_syntax_error_is_reported_with_its_line_and_column() {
    let (dir, path) =
        write_config("node = 1\ndata_dir = \"data\"\n[resources.uploads\nkind = \"files\"\n");
    let run = check(&path, &["--json"]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"][0]["kind"], "malformed", "{report}");
    let message = report["problems"][0]["message"].as_str().unwrap();
    assert!(message.contains("line 3, column"), "{message}");
    assert_eq!(report["resources"].as_array().unwrap().len(), 0);

    let missing = dir.path().join("absent.toml");
    let run = check(&missing, &[]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    assert!(
        run.stdout.contains("problem (unreadable)"),
        "{}",
        run.stdout
    );
    assert_eq!(tree(dir.path()), [path], "the check created something");
}

#[test]
fn a_missing_directory_without_create_is_not_reachable() {
    let text = "node = 1\ndata_dir = \"data\"\n\
        [resources.uploads]\nkind = \"files\"\nroot = \"absent\"\n";
    let (dir, path) = write_config(text);
    let run = check(&path, &["--json"]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    let uploads = &run.json()["resources"][0];
    assert_eq!(uploads["ok"], false);
    assert!(
        uploads["detail"]
            .as_str()
            .unwrap()
            .contains("create = true"),
        "{uploads}"
    );
    assert_eq!(tree(dir.path()), [path], "the check created something");
}

/// `password_env` gives the password of a role that must authenticate with it (the cluster
/// refuses it without): the right one reaches the database, a wrong one is refused by the
/// server, an unset variable is a problem of the file naming the resource and the field; no
/// password is ever printed.
#[test]
fn password_env_gives_the_password_and_is_never_printed() {
    installed_database("config_check_env");
    let url = PgCluster::shared()
        .password_url("config_check_env")
        .unwrap();
    let var = "CONCORD_TEST_PG_PASSWORD";
    let text = format!(
        "node = 1\ndata_dir = \"data\"\n[resources.orders]\nkind = \"postgres\"\nurl = \"{url}\"\npassword_env = \"{var}\"\n"
    );
    let (_dir, path) = write_config(&text);
    let good = check_with_env(&path, &["--json"], &[(var, PASSWORD_ROLE_PASSWORD)]);
    assert_eq!(good.code, Some(0), "{}{}", good.stdout, good.stderr);
    assert!(
        !good.stdout.contains(PASSWORD_ROLE_PASSWORD),
        "{}",
        good.stdout
    );

    let wrong = check_with_env(&path, &["--json"], &[(var, PASSWORD)]);
    assert_eq!(wrong.code, Some(EXIT_CONFIG_UNUSABLE), "{}", wrong.stderr);
    let detail = wrong.json()["resources"][0]["detail"].to_string();
    assert!(
        detail.contains("password authentication failed"),
        "{detail}"
    );

    let unset = check(&path, &["--json"]);
    assert_eq!(unset.code, Some(EXIT_CONFIG_UNUSABLE), "{}", unset.stderr);
    let message = unset.json()["problems"][0]["message"].to_string();
    assert!(
        message.contains("[resources.orders]") && message.contains("`password_env`"),
        "{message}"
    );
}

/// A server that is up but refuses the url's role is not reported as perhaps down: the detail
/// points at the credentials too.
#[test]
fn a_role_the_server_refuses_points_at_the_credentials() {
    let cluster = PgCluster::shared();
    cluster.database("config_check_role").unwrap();
    let text = format!(
        "node = 1\ndata_dir = \"data\"\n[resources.orders]\nkind = \"postgres\"\nurl = \"host=127.0.0.1 port={} user=no_such_role dbname=config_check_role\"\n",
        cluster.port()
    );
    let (_dir, path) = write_config(&text);
    let run = check(&path, &["--json"]);
    assert_eq!(run.code, Some(EXIT_CONFIG_UNUSABLE), "{}", run.stderr);
    let detail = run.json()["resources"][0]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("no_such_role"), "{detail}");
    assert!(
        detail.contains("user, password and database"),
        "the server answered: the url's credentials may be wrong: {detail}"
    );
}
