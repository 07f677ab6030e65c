//! `adapters::config`: resources opened from a written `concord.toml`. Opening every resource
//! opens each kind; opening a subset by name touches nothing else (no connection to a configured
//! database, no directory created); a name the file lacks, or a kind that does not exist, is a
//! typed error naming it, with nothing created.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use adapters::config::{self, Config, ConfigProblem, KINDS, OpenError};

/// Bound on every open.
const OPEN_DEADLINE: Duration = Duration::from_secs(20);

/// Writes `text` as `concord.toml` in `dir` and loads it.
fn load(dir: &Path, text: &str) -> Config {
    let path = dir.join("concord.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// A file with a files, a mail and a kv resource (each created when missing) and a PostgreSQL
/// resource at `pg_port` on loopback.
fn four_kinds(pg_port: u16) -> String {
    format!(
        "node = 1\ndata_dir = \"data\"\n\
         [resources.uploads]\nkind = \"files\"\nroot = \"uploads\"\ncreate = true\n\
         [resources.outbox]\nkind = \"mail\"\nmaildir = \"outbox\"\ncreate = true\n\
         [resources.index]\nkind = \"kv\"\ndir = \"index\"\ncreate = true\n\
         [resources.orders]\nkind = \"postgres\"\n\
         url = \"host=127.0.0.1 port={pg_port} user=app dbname=shop connect_timeout=2\"\n"
    )
}

/// The names of `opened`.
fn names(opened: &[std::sync::Arc<dyn adapters::Resource>]) -> Vec<&str> {
    opened.iter().map(|r| r.name()).collect()
}

/// A listener on a free loopback port that nobody answers on; `touched` says whether anything
/// connected to it.
struct Silent(TcpListener);

impl Silent {
    fn new() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Silent(listener)
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    fn touched(&self) -> bool {
        match self.0.accept() {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The entries of `dir` other than `concord.toml`.
fn created(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| !path.ends_with("concord.toml"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_subset_touches_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let database = Silent::new();
    let config = load(dir.path(), &four_kinds(database.port()));

    let opened = tokio::time::timeout(OPEN_DEADLINE, config::open_named(&config, &["uploads"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&opened), ["uploads"]);
    assert!(dir.path().join("uploads").is_dir());
    assert!(
        !database.touched(),
        "the postgres resource was connected to"
    );
    assert!(
        !dir.path().join("outbox").exists(),
        "the Maildir was created"
    );
    assert!(
        !dir.path().join("index").exists(),
        "the sled directory was created"
    );
    drop(opened);

    // Two of the embedded kinds, each named once however often it is asked for, in name order.
    let names_asked = ["outbox", "index", "outbox"];
    let opened = tokio::time::timeout(OPEN_DEADLINE, config::open_named(&config, &names_asked))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&opened), ["index", "outbox"]);
    assert!(dir.path().join("outbox/new").is_dir() && dir.path().join("index/db").is_file());
    assert!(
        !database.touched(),
        "the postgres resource was connected to"
    );
    drop(opened);

    // The probe sees a connection: opening `orders` itself connects (and fails, as nobody
    // answers), naming it.
    let refused = tokio::time::timeout(OPEN_DEADLINE, config::open_named(&config, &["orders"]))
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(refused.resource(), "orders", "{refused:?}");
    assert!(database.touched(), "opening orders did not connect to it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_configuration_lacks_opens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let database = Silent::new();
    let config = load(dir.path(), &four_kinds(database.port()));

    let asked = ["uploads", "archive", "orders"];
    let refused = tokio::time::timeout(OPEN_DEADLINE, config::open_named(&config, &asked))
        .await
        .unwrap()
        .err()
        .unwrap();
    let OpenError::NotConfigured { name, known } = &refused else {
        panic!("not NotConfigured: {refused:?}")
    };
    assert_eq!(name, "archive");
    assert_eq!(known, &["index", "orders", "outbox", "uploads"]);
    assert_eq!(refused.resource(), "archive");
    let message = refused.to_string();
    assert!(
        message.contains("archive") && message.contains("uploads"),
        "{message}"
    );
    assert_eq!(created(dir.path()), Vec::<PathBuf>::new());
    assert!(
        !database.touched(),
        "the postgres resource was connected to"
    );
}

/// Every resource opens, in name order; a database nobody listens on is an error naming it,
/// and the resources after it in name order are not opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_all_opens_every_kind_and_names_the_one_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    let text = four_kinds(0).replace(
        "[resources.orders]\nkind = \"postgres\"",
        "[resources.aa-orders]\nkind = \"postgres\"",
    );
    // Bind and drop: a port nobody listens on, so the connection is refused at once.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = load(
        dir.path(),
        &text.replace("port=0", &format!("port={closed_port}")),
    );
    let refused = tokio::time::timeout(OPEN_DEADLINE, config::open_all(&config))
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(refused.resource(), "aa-orders", "{refused:?}");
    assert!(matches!(refused, OpenError::Resource { .. }), "{refused:?}");
    assert!(refused.to_string().contains("aa-orders"), "{refused}");
    assert_eq!(created(dir.path()), Vec::<PathBuf>::new());

    let without_pg = text
        .split("[resources.aa-orders]")
        .next()
        .unwrap()
        .to_string();
    let config = load(dir.path(), &without_pg);
    let opened = tokio::time::timeout(OPEN_DEADLINE, config::open_all(&config))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&opened), ["index", "outbox", "uploads"]);
    assert!(opened[0].as_any().is::<adapters::kv::KvResource>());
    assert!(opened[1].as_any().is::<adapters::mail::MailResource>());
    assert!(opened[2].as_any().is::<adapters::files::FilesResource>());
}

/// A kind that does not exist is `ConfigProblem::UnknownKind`, whose message names the file, the
/// resource, the kind and every kind that exists; loading created nothing.
#[test]
fn a_kind_that_does_not_exist_is_typed_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concord.toml");
    let text = "node = 1\ndata_dir = \"data\"\n\
                [resources.uploads]\nkind = \"files\"\nroot = \"u\"\ncreate = true\n\
                [resources.backup]\nkind = \"tape\"\nroot = \"b\"\ncreate = true\n";
    std::fs::write(&path, text).unwrap();
    let refused = Config::load(&path).unwrap_err();
    assert_eq!(
        refused.problem,
        ConfigProblem::UnknownKind {
            resource: "backup".into(),
            kind: "tape".into()
        }
    );
    assert_eq!(refused.path, path);
    let message = refused.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("[resources.backup]"), "{message}");
    for kind in KINDS {
        assert!(message.contains(kind), "{kind} is not listed: {message}");
    }
    assert_eq!(created(dir.path()), Vec::<PathBuf>::new());
}
