//! PostgreSQL branches prepared by the application and enlisted in `concord coordinator`, the
//! real binary, with a postgres resource on the throwaway cluster of `adapters::pgtest`. The
//! test plays the application: its own tokio-postgres connection runs the statements on a table
//! set up with `concord pg install` and `concord pg replicate`, then `SELECT
//! concord.prepare_branch(…)` and `PREPARE TRANSACTION`, and `EnlistPrepared` and `Commit` go
//! over gRPC through `proto::client::connect`. Covered: commit (rows visible, nothing left
//! prepared), rollback, a daemon killed with SIGKILL after its decision (the restart finishes
//! the branch by gid), files + kv + an enlisted branch committing together, a transaction's own
//! timeout, `ListInDoubt` and `Resolve` of a branch left prepared, and the errors of
//! `EnlistPrepared`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adapters::pgtest::PgCluster;
use common::daemon::{
    Daemon, INDEX, OPEN_DAEMON, Stderr, UPLOADS, code_of, detail, eventually, header, target,
    write_config,
};
use proto::client::{Client, Credentials};
use proto::v1::{self, ErrorCode, txn_outcome::State};
use tonic::Code;

/// How long phase 2 may take to show a commit in the database.
const VISIBLE_MS_MAX: u64 = 10_000;
/// How long one `concord pg …` command may take.
const COMMAND_MS_MAX: u64 = 60_000;
/// The daemon's configured transaction timeout.
const TXN_TIMEOUT_MS: u64 = 20_000;
/// The most branches a transaction may have (the daemon's `branches_per_txn_max`).
const BRANCHES_PER_TXN_MAX: usize = 16;

/// A data directory, its configuration and its database.
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    db: String,
    url: String,
}

impl Site {
    /// A new site whose database `db` has `items` under capture; `extra`: more configuration
    /// (resources) appended.
    fn new(db: &str, extra: &str) -> Site {
        let cluster = PgCluster::shared();
        let url = cluster.database(db).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &format!("txn_timeout_ms = {TXN_TIMEOUT_MS}\norphan_sweep_ms = 3600000\n"),
            OPEN_DAEMON,
            &format!(
                "{UPLOADS}{INDEX}[resources.orders]\nkind = \"postgres\"\nurl = \"{url}\"\n{extra}"
            ),
        );
        let site = Site {
            dir,
            config,
            db: db.to_string(),
            url,
        };
        site.concord(&["pg", "install", "--resource", "orders"]);
        cluster
            .psql(db, "CREATE TABLE items (id int PRIMARY KEY, name text)")
            .unwrap();
        site.concord(&["pg", "replicate", "--resource", "orders", "items"]);
        site
    }

    /// Runs `concord ARGS --config …`, which must succeed.
    fn concord(&self, args: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_concord"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let what = format!("concord {args:?}");
        let out = common::output_within(child, Duration::from_millis(COMMAND_MS_MAX), &what);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn psql(&self, sql: &str) -> String {
        PgCluster::shared().psql(&self.db, sql).unwrap()
    }

    fn prepared_count(&self) -> String {
        self.psql("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()")
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }
}

impl Daemon {
    /// Starts `concord coordinator --config` for `site`, with fail point `failpoint` armed; its
    /// standard error is read with its standard output.
    fn start_site(site: &Site, failpoint: Option<&str>) -> Daemon {
        let mut command = Daemon::command(&["--config".as_ref(), site.config.as_os_str()]);
        command.current_dir(site.data());
        if let Some(point) = failpoint {
            command.env("CONCORD_FAILPOINT", point);
        }
        Daemon::spawn(&mut command, Stderr::Lines)
    }
}

/// A `proto::client` client of `daemon`, without credentials.
async fn connect(daemon: &Daemon) -> Client {
    daemon
        .client_with(&daemon.url(), &Credentials::none())
        .await
}

async fn begin(client: &mut Client, timeout_ms: Option<u64>) -> v1::BeginResponse {
    client
        .begin(v1::BeginRequest {
            header: header(),
            timeout_ms,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The application's connection to the database.
async fn application(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn gid(xid: &str, resource: &str) -> String {
    format!("concord:{xid}:{resource}")
}

/// The application's branch of `begun` in `orders`: `sql`, then concord's prepare and
/// `PREPARE TRANSACTION`, on its own connection; returns the redo text.
async fn prepare(app: &tokio_postgres::Client, begun: &v1::BeginResponse, sql: &str) -> String {
    let xid = &begun.xid;
    let gid = gid(xid, "orders");
    app.batch_execute(&format!("BEGIN; {sql}")).await.unwrap();
    let redo: String = app
        .query_one(
            "SELECT concord.prepare_branch($1, $2, $3, 1)",
            &[&(begun.epoch as i64), &gid, xid],
        )
        .await
        .unwrap()
        .get(0);
    app.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
        .await
        .unwrap();
    redo
}

async fn enlist(
    client: &mut Client,
    xid: &str,
    resource: &str,
    gid: &str,
    redo: &str,
) -> Result<(), tonic::Status> {
    client
        .enlist_prepared(v1::EnlistPreparedRequest {
            target: target(xid, resource),
            gid: gid.to_string(),
            redo: redo.as_bytes().to_vec(),
        })
        .await
        .map(drop)
}

async fn commit(client: &mut Client, xid: &str) -> Result<v1::TxnOutcome, tonic::Status> {
    let response = client
        .commit(v1::CommitRequest {
            header: header(),
            xid: xid.to_string(),
        })
        .await?;
    Ok(response.into_inner().outcome.unwrap())
}

async fn outcome(client: &mut Client, xid: &str) -> State {
    client
        .outcome(v1::OutcomeRequest {
            header: header(),
            xid: xid.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
        .state
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enlisted_branch_commits_or_rolls_back_by_gid() {
    let site = Site::new("enlist_commit", "");
    let daemon = Daemon::start_site(&site, None);
    let mut client = connect(&daemon).await;
    let app = application(&site.url).await;

    // Commit: the lone branch takes two phases, its decision journaled.
    let begun = begin(&mut client, None).await;
    assert_eq!(begun.timeout_ms, TXN_TIMEOUT_MS);
    let redo = prepare(&app, &begun, "INSERT INTO items VALUES (1, 'one')").await;
    assert!(redo.starts_with('['), "{redo}");
    let xid = begun.xid.clone();
    enlist(&mut client, &xid, "orders", &gid(&xid, "orders"), &redo)
        .await
        .unwrap();
    // A retried enlisting is answered the same; one with other redo is refused.
    enlist(&mut client, &xid, "orders", &gid(&xid, "orders"), &redo)
        .await
        .unwrap();
    let other = enlist(&mut client, &xid, "orders", &gid(&xid, "orders"), "[]")
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    assert!(other.message().contains("other redo"), "{other:?}");
    let committed = commit(&mut client, &xid).await.unwrap();
    let Some(State::Committed(c)) = committed.state else {
        panic!("{committed:?}");
    };
    assert!(c.decision_lsn.is_some(), "a decision record: {c:?}");
    eventually(VISIBLE_MS_MAX, "the row is visible", || {
        site.psql("SELECT count(*) FROM items WHERE id = 1") == "1"
    });
    eventually(VISIBLE_MS_MAX, "nothing is left prepared", || {
        site.prepared_count() == "0"
    });

    // Rollback: the prepared branch is gone, and its row with it.
    let begun = begin(&mut client, None).await;
    let xid = begun.xid.clone();
    let redo = prepare(&app, &begun, "INSERT INTO items VALUES (2, 'two')").await;
    enlist(&mut client, &xid, "orders", &gid(&xid, "orders"), &redo)
        .await
        .unwrap();
    client
        .rollback(v1::RollbackRequest {
            header: header(),
            xid: xid.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    eventually(VISIBLE_MS_MAX, "the prepared branch is rolled back", || {
        site.prepared_count() == "0"
    });
    assert_eq!(site.psql("SELECT count(*) FROM items WHERE id = 2"), "0");
    drop(client);
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_kv_and_an_enlisted_branch_commit_together() {
    let site = Site::new("enlist_atomic", "");
    let daemon = Daemon::start_site(&site, None);
    let mut client = connect(&daemon).await;
    let app = application(&site.url).await;
    let begun = begin(&mut client, None).await;
    let xid = begun.xid.clone();

    use v1::files_put_request::Part;
    let content = b"the invoice".to_vec();
    let put = vec![
        v1::FilesPutRequest {
            part: Some(Part::Start(v1::FilesPutStart {
                target: target(&xid, "uploads"),
                path: "invoice.txt".into(),
                size_bytes: Some(content.len() as u64),
            })),
        },
        v1::FilesPutRequest {
            part: Some(Part::Chunk(content.clone())),
        },
    ];
    client
        .files_put(tonic::codegen::tokio_stream::iter(put))
        .await
        .unwrap();
    client
        .kv_insert(v1::KvInsertRequest {
            target: target(&xid, "index"),
            key: b"invoice".to_vec(),
            value: b"7".to_vec(),
        })
        .await
        .unwrap();
    let redo = prepare(&app, &begun, "INSERT INTO items VALUES (7, 'seven')").await;
    enlist(&mut client, &xid, "orders", &gid(&xid, "orders"), &redo)
        .await
        .unwrap();
    // Nothing is visible before the commit.
    let file = site.data().join("data/uploads/invoice.txt");
    assert!(!file.exists());
    assert_eq!(site.psql("SELECT count(*) FROM items"), "0");

    let committed = commit(&mut client, &xid).await.unwrap();
    assert!(
        matches!(committed.state, Some(State::Committed(_))),
        "{committed:?}"
    );
    eventually(VISIBLE_MS_MAX, "every branch committed", || {
        file.exists() && site.psql("SELECT count(*) FROM items WHERE id = 7") == "1"
    });
    assert_eq!(std::fs::read(&file).unwrap(), content);
    let next = begin(&mut client, None).await.xid;
    let value = client
        .kv_get(v1::KvGetRequest {
            target: target(&next, "index"),
            key: b"invoice".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(value.as_deref(), Some(&b"7"[..]));
    assert_eq!(site.prepared_count(), "0");
    drop(client);
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_decision_finishes_the_branch_by_gid() {
    let site = Site::new("enlist_sigkill", "");
    let daemon = Daemon::start_site(&site, Some("decision_durable"));
    let mut client = connect(&daemon).await;
    let app = application(&site.url).await;
    let begun = begin(&mut client, None).await;
    let xid = begun.xid.clone();
    let redo = prepare(&app, &begun, "INSERT INTO items VALUES (3, 'three')").await;
    enlist(&mut client, &xid, "orders", &gid(&xid, "orders"), &redo)
        .await
        .unwrap();
    // The commit freezes at the fail point, its decision durable; the daemon dies there.
    let mut committing = client.clone();
    let frozen = {
        let xid = xid.clone();
        tokio::spawn(async move { commit(&mut committing, &xid).await })
    };
    let line = tokio::task::spawn_blocking(move || {
        let line = daemon.wait_line("FAILPOINT");
        daemon.kill();
        line
    })
    .await
    .unwrap();
    assert!(line.contains("decision_durable"), "{line}");
    assert!(frozen.await.unwrap().is_err(), "the daemon died");
    assert_eq!(site.prepared_count(), "1", "phase 2 never ran");
    assert_eq!(site.psql("SELECT count(*) FROM items"), "0");

    // The restart's recovery commits the branch by its gid.
    let daemon = Daemon::start_site(&site, None);
    eventually(VISIBLE_MS_MAX, "recovery committed the branch", || {
        site.prepared_count() == "0" && site.psql("SELECT count(*) FROM items WHERE id = 3") == "1"
    });
    let mut client = connect(&daemon).await;
    assert!(matches!(
        outcome(&mut client, &xid).await,
        State::Committed(_)
    ));
    drop(client);
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_left_prepared_after_its_timeout_is_listed_and_resolved() {
    const OWN_TIMEOUT_MS: u64 = 300;
    let site = Site::new("enlist_resolve", "");
    let daemon = Daemon::start_site(&site, None);
    let mut client = connect(&daemon).await;
    let app = application(&site.url).await;

    // The application asks for a shorter timeout, prepares, and dies before enlisting.
    let begun = begin(&mut client, Some(OWN_TIMEOUT_MS)).await;
    assert_eq!(begun.timeout_ms, OWN_TIMEOUT_MS);
    let longer = begin(&mut client, Some(TXN_TIMEOUT_MS * 10)).await;
    assert_eq!(
        longer.timeout_ms, TXN_TIMEOUT_MS,
        "capped at txn_timeout_ms"
    );
    let xid = begun.xid.clone();
    prepare(&app, &begun, "INSERT INTO items VALUES (4, 'four')").await;
    drop(app);
    let deadline = Instant::now() + Duration::from_millis(OWN_TIMEOUT_MS + VISIBLE_MS_MAX);
    loop {
        match outcome(&mut client, &xid).await {
            State::RolledBack(_) => break,
            State::Open(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "rolled back by its own timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The sweeper runs hourly here: the branch stays prepared, and is listed as in doubt.
    assert_eq!(site.prepared_count(), "1");
    let listed = client
        .list_in_doubt(v1::ListInDoubtRequest { header: header() })
        .await
        .unwrap()
        .into_inner()
        .transactions;
    let row = listed
        .iter()
        .find(|t| t.xid == xid)
        .unwrap_or_else(|| panic!("{xid} not listed: {listed:?}"));
    assert_eq!(row.branches, vec!["orders".to_string()]);
    assert_eq!(row.standing, v1::Standing::Unknown as i32);
    assert!(row.state.contains("no decision"), "{row:?}");

    let resolved = client
        .resolve(v1::ResolveRequest {
            header: header(),
            xid: xid.clone(),
            decision: v1::Decision::Rollback as i32,
            operator: "ops".into(),
            forget: Vec::new(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.finished, "{resolved:?}");
    assert!(
        resolved
            .branches
            .iter()
            .any(|b| b.resource == "orders" && b.state == v1::BranchState::Finished as i32),
        "{resolved:?}"
    );
    assert_eq!(site.prepared_count(), "0");
    assert_eq!(site.psql("SELECT count(*) FROM items"), "0");
    let listed = client
        .list_in_doubt(v1::ListInDoubtRequest { header: header() })
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert!(listed.iter().all(|t| t.xid != xid), "{listed:?}");

    // An application that enlists after its transaction timed out is told so, and its branch
    // is rolled back at once.
    let app = application(&site.url).await;
    let late = begin(&mut client, Some(OWN_TIMEOUT_MS)).await;
    let redo = prepare(&app, &late, "INSERT INTO items VALUES (6, 'six')").await;
    tokio::time::sleep(Duration::from_millis(OWN_TIMEOUT_MS * 2)).await;
    let e = enlist(
        &mut client,
        &late.xid,
        "orders",
        &gid(&late.xid, "orders"),
        &redo,
    )
    .await
    .unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::TxnFinished, "{e:?}");
    eventually(VISIBLE_MS_MAX, "the late branch is rolled back", || {
        site.prepared_count() == "0"
    });
    assert_eq!(site.psql("SELECT count(*) FROM items"), "0");
    drop(client);
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enlisting_errors_answer_as_the_proto_table_says() {
    let files: String = (0..BRANCHES_PER_TXN_MAX)
        .map(|n| {
            format!("[resources.f{n}]\nkind = \"files\"\nroot = \"data/f{n}\"\ncreate = true\n")
        })
        .collect();
    let site = Site::new("enlist_errors", &files);
    let daemon = Daemon::start_site(&site, None);
    let mut client = connect(&daemon).await;
    let app = application(&site.url).await;
    let begun = begin(&mut client, None).await;
    let xid = begun.xid.clone();
    let good_gid = gid(&xid, "orders");

    // An xid the daemon never began.
    let unknown = "n1e1s1";
    let e = enlist(
        &mut client,
        unknown,
        "orders",
        &gid(unknown, "orders"),
        "[]",
    )
    .await
    .unwrap_err();
    assert_eq!(
        (e.code(), code_of(&e)),
        (Code::NotFound, ErrorCode::UnknownXid)
    );
    // A resource not configured, and one of another kind.
    let e = enlist(&mut client, &xid, "nowhere", &gid(&xid, "nowhere"), "[]")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), code_of(&e)),
        (Code::NotFound, ErrorCode::UnknownResource)
    );
    let e = enlist(&mut client, &xid, "uploads", &gid(&xid, "uploads"), "[]")
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::WrongKind, "{e:?}");
    assert_eq!(e.code(), Code::FailedPrecondition);
    // A gid of another transaction, a redo that is not a JSON array.
    let e = enlist(&mut client, &xid, "orders", &gid("n1e1s2", "orders"), "[]")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(detail(&e).field, "EnlistPreparedRequest.gid");
    let e = enlist(&mut client, &xid, "orders", &good_gid, "{\"rows\": 1}")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(detail(&e).field, "EnlistPreparedRequest.redo");
    // A gid that is not prepared in the database: refused by name.
    let e = enlist(&mut client, &xid, "orders", &good_gid, "[]")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&good_gid), "{e:?}");

    // As many branches as it may have, then the enlisting is one too many.
    for n in 0..BRANCHES_PER_TXN_MAX {
        use v1::files_put_request::Part;
        let put = vec![
            v1::FilesPutRequest {
                part: Some(Part::Start(v1::FilesPutStart {
                    target: target(&xid, &format!("f{n}")),
                    path: "a".into(),
                    size_bytes: Some(1),
                })),
            },
            v1::FilesPutRequest {
                part: Some(Part::Chunk(b"a".to_vec())),
            },
        ];
        client
            .files_put(tonic::codegen::tokio_stream::iter(put))
            .await
            .unwrap();
    }
    let redo = prepare(&app, &begun, "INSERT INTO items VALUES (5, 'five')").await;
    let e = enlist(&mut client, &xid, "orders", &good_gid, &redo)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(detail(&e).limit, "branches_per_txn_max");
    commit(&mut client, &xid).await.unwrap();
    // Enlisting after the commit: finished, and the branch it never had is rolled back.
    let e = enlist(&mut client, &xid, "orders", &good_gid, &redo)
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::TxnFinished, "{e:?}");
    assert_eq!(site.prepared_count(), "0");
    assert_eq!(site.psql("SELECT count(*) FROM items"), "0");
    drop(client);
    assert!(daemon.terminate());
}
