//! The programs of `participant/examples/` run as a user runs them: each binary cargo built, on
//! a fresh data directory (the PostgreSQL ones with a database of the throwaway cluster), within
//! a deadline; each must exit 0, print what it did, and leave the stores as it says.
//!
//! `cargo test` (for the workspace or this package) builds the examples before any test runs;
//! `cargo test --test examples` alone does not, and a missing or outdated binary fails the test
//! with the command that builds it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use adapters::pgtest::PgCluster;

/// Bound on one run of an example.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// The environment variables the examples read; cleared, so that only the arguments count.
const EXAMPLE_VARS: [&str; 2] = ["CONCORD_EXAMPLE_DIR", "CONCORD_EXAMPLE_PG_URL"];

/// The binary of example `name`, next to this test's own binary (`target/<profile>/deps/…` →
/// `target/<profile>/examples/<name>`).
fn example_binary(name: &str) -> PathBuf {
    let build = "build them with `cargo build -p concord-participant --examples` (`cargo test` \
                 builds them, `cargo test --test examples` alone does not)";
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lies in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "the example binary {} is missing: {build}",
        binary.display()
    );
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.rs"));
    let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    assert!(
        modified(&binary) >= modified(&source),
        "the example binary {} is older than {}: {build}",
        binary.display(),
        source.display()
    );
    binary
}

/// What one run printed, and how it ended.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Fails the test unless the run exited 0 and printed every one of `lines`.
    fn assert_printed(&self, name: &str, lines: &[&str]) {
        println!("{name} printed:\n{}", self.stdout);
        assert!(
            self.status.success(),
            "{name} exited with {}:\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        for line in lines {
            assert!(
                self.stdout.contains(line),
                "{name} did not print {line:?}:\n{}\n{}",
                self.stdout,
                self.stderr
            );
        }
    }
}

/// Runs example `name` with `args` (and `env`), killing it when it outlives [`RUN_DEADLINE`].
fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut command = Command::new(example_binary(name));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in EXAMPLE_VARS {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "{name} did not finish within {RUN_DEADLINE:?}; it printed:\n{}\n{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ran {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn dir_arg(dir: &Path) -> String {
    dir.display().to_string()
}

#[test]
fn files_commits_two_puts_rolls_one_back_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run("files", &[&dir_arg(dir.path())], &[]);
    ran.assert_printed(
        "files",
        &[
            "put two invoices: committed",
            "put a draft: rolled back",
            "rolled back by the application",
            "delete invoice 1: committed",
            "invoices/1.txt: absent",
            "invoices/2.txt: present",
            "invoices/draft.txt: absent",
        ],
    );
    let root = dir.path().join("files/uploads/invoices");
    assert_eq!(std::fs::read(root.join("2.txt")).unwrap(), b"invoice 2\n");
    assert!(!root.join("draft.txt").exists());
}

#[test]
fn mail_delivers_the_committed_messages_only() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run("mail", &[&dir_arg(dir.path())], &[]);
    ran.assert_printed(
        "mail",
        &[
            "confirm order 1: committed",
            "confirm order 2: rolled back",
            "a raw message: committed",
            "2 new message(s)",
        ],
    );
    let new = dir.path().join("mail/outbox/new");
    assert_eq!(std::fs::read_dir(&new).unwrap().count(), 2);
    let tmp = dir.path().join("mail/outbox/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "left staged");
}

/// Run twice on one directory, the second time named by the environment: a rerun works on
/// what the first left.
#[test]
fn kv_commits_rolls_back_and_reads_and_runs_again_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let expected = [
        "index orders 1 and 2: committed",
        "remove order 1, add order 3: rolled back",
        "order/1: invoices/1.pdf",
        "order/2: invoices/2.pdf",
        "order/3: absent",
        "read-only: committed",
        "(nothing to journal)",
    ];
    run("kv", &[&dir_arg(dir.path())], &[]).assert_printed("kv", &expected);
    let again = run("kv", &[], &[("CONCORD_EXAMPLE_DIR", &dir_arg(dir.path()))]);
    again.assert_printed("kv (again)", &expected);
}

#[test]
fn postgres_commits_a_row_and_rolls_back_a_draft_and_a_refused_statement() {
    let cluster = PgCluster::shared();
    let url = cluster.database("example_postgres").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ran = run("postgres", &[&dir_arg(dir.path()), &url], &[]);
    ran.assert_printed(
        "postgres",
        &[
            "insert an order: committed",
            "insert a draft: rolled back",
            "a duplicate key is refused (retryable: false)",
            "rolled back",
            "example_orders: 1 row(s), 0 draft(s)",
        ],
    );
    let rows = cluster
        .psql("example_postgres", "SELECT id, item FROM example_orders")
        .unwrap();
    assert_eq!(rows, "1|book");
    let prepared = cluster
        .psql(
            "example_postgres",
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
        )
        .unwrap();
    assert_eq!(prepared, "0", "a branch was left prepared");
}

#[test]
fn all_four_commits_one_order_everywhere_and_rolls_back_another_everywhere() {
    let cluster = PgCluster::shared();
    let url = cluster.database("example_all_four").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ran = run("all_four", &[&dir_arg(dir.path()), &url], &[]);
    ran.assert_printed(
        "all_four",
        &[
            "order 1: row, invoice, mail and index entry written",
            "place an order: committed",
            "place order 2: rolled back",
            "committed in all four resources",
            "invoices/2.txt: absent",
        ],
    );
    let rows = cluster
        .psql("example_all_four", "SELECT id, item FROM example_all_four")
        .unwrap();
    assert_eq!(rows, "1|book");
    let invoices = dir.path().join("files/uploads/invoices");
    assert_eq!(
        std::fs::read(invoices.join("1.txt")).unwrap(),
        b"invoice 1: book\n"
    );
    assert!(!invoices.join("2.txt").exists());
    let new = dir.path().join("mail/outbox/new");
    assert_eq!(std::fs::read_dir(&new).unwrap().count(), 1);
}

/// Without a data directory (or, for the PostgreSQL ones, a URL) each example prints its usage
/// and exits 2, creating nothing.
#[test]
fn a_missing_argument_prints_the_usage() {
    for name in ["files", "mail", "kv", "postgres", "all_four"] {
        let ran = run(name, &[], &[]);
        assert_eq!(ran.status.code(), Some(2), "{name}: {}", ran.stderr);
        assert!(
            ran.stderr.contains(&format!("usage: {name} DATA_DIR"))
                && ran.stderr.contains("CONCORD_EXAMPLE_DIR"),
            "{name}: {}",
            ran.stderr
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ran = run("postgres", &[&dir_arg(&data)], &[]);
    assert_eq!(ran.status.code(), Some(2), "{}", ran.stderr);
    assert!(ran.stderr.contains("POSTGRES_URL"), "{}", ran.stderr);
    assert!(!data.exists(), "a refused run created its data directory");
}
