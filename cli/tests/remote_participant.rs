//! The participant library in remote mode (`Concord::connect`) against the real `concord
//! coordinator` binary on a free loopback port: the same API as embedded mode for files, mail
//! and kv (a transaction committed, one rolled back), the same errors, a 64 MiB put streamed
//! in bounded memory, an application process killed with SIGKILL mid-transaction (its branches
//! roll back at the timeout and free what they held), and a commit whose answer a proxy cuts
//! off (the client learns the true outcome through `Outcome`, or reports it in doubt when it
//! cannot).
//!
//! The child processes are this test binary run again with an environment variable naming
//! the part to play (`REMOTE_CHILD`); without it those tests return at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::daemon::{
    Daemon, INDEX, OPEN_DAEMON, UPLOADS, eventually_async, lines_of, rest_of_line, wait_exit,
    write_config,
};

use participant::{
    Concord, ConcordError, CoordError, Credentials, MessageBuilder, RollbackCause, TxnOutcome,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

/// How long phase 2 may take to show a commit in the stores.
const VISIBLE_MS_MAX: u64 = 10_000;
/// The transaction timeout of the daemons that need a short one.
const TIMEOUT_MS: u64 = 1_000;
/// The streamed put's size, and the peak memory its client process must stay under.
const BIG_PUT_BYTES: u64 = 64 << 20;
const BIG_PUT_PEAK_BYTES_MAX: u64 = 40 << 20;
/// How long a child process may live.
const CHILD_MS_MAX: u64 = 120_000;

impl Daemon {
    /// On a configuration with `txn_timeout_ms` = [`TIMEOUT_MS`], a files resource `uploads`
    /// and a kv resource `index` under `dir`.
    fn start_short(dir: &Path) -> Daemon {
        let path = write_config(
            dir,
            &format!("txn_timeout_ms = {TIMEOUT_MS}\n"),
            OPEN_DAEMON,
            &format!("{UPLOADS}{INDEX}"),
        );
        Daemon::start_config(&path)
    }

    async fn connect(&self) -> Concord {
        Concord::connect(&self.url(), Credentials::none())
            .await
            .unwrap()
    }
}

/// Runs this test binary again as the child `role`, with `vars`.
fn child(role: &str, test: &str, vars: &[(&str, &str)]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("REMOTE_CHILD", role)
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn child_role() -> Option<String> {
    std::env::var("REMOTE_CHILD").ok()
}

fn message(subject: &str) -> MessageBuilder {
    MessageBuilder::new()
        .from("Shop <shop@example.org>")
        .to("alice@example.org")
        .subject(subject)
        .body("Thank you.\n")
}

fn maildir_new(data: &Path) -> usize {
    std::fs::read_dir(data.join("mail").join("new"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_mail_and_kv_commit_and_roll_back_through_connect() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let daemon = Daemon::start(&data);
    let concord = daemon.connect().await;
    assert!(concord.is_remote());

    let mut tx = concord.begin().await.unwrap();
    let uploads = tx.files("uploads").await.unwrap();
    assert_eq!(uploads.put("a/1.txt", &b"hello"[..]).await.unwrap(), 5);
    assert_eq!(uploads.read("a/1.txt").await.unwrap(), b"hello");
    let outbox = tx.mail("mail").await.unwrap();
    outbox.enqueue_built(&message("order 1")).await.unwrap();
    let raw = message("order 1, raw").build().unwrap();
    let enqueued = outbox.enqueue(&raw[..]).await.unwrap();
    assert!(enqueued.bytes > 0);
    let index = tx.kv("index").await.unwrap();
    index.insert(b"order/1", b"a/1.txt").await.unwrap();
    index.insert(b"order/0", b"gone").await.unwrap();
    index.remove(b"order/0").await.unwrap();
    assert_eq!(index.get(b"order/1").await.unwrap().unwrap(), b"a/1.txt");
    let xid = tx.xid();
    let committed = tx.commit().await.unwrap();
    assert_eq!(committed.xid, xid);
    assert!(committed.lsn.is_some());

    let file = data.join("uploads").join("a").join("1.txt");
    eventually_async(VISIBLE_MS_MAX, "the file committed", || file.exists()).await;
    eventually_async(VISIBLE_MS_MAX, "both messages delivered", || {
        maildir_new(&data) == 2
    })
    .await;
    assert_eq!(std::fs::read(&file).unwrap(), b"hello");

    let mut rolled = concord.begin().await.unwrap();
    let uploads = rolled.files("uploads").await.unwrap();
    uploads.put("b.txt", &b"never"[..]).await.unwrap();
    uploads.delete("a/1.txt").await.unwrap();
    let index = rolled.kv("index").await.unwrap();
    assert_eq!(index.get(b"order/1").await.unwrap().unwrap(), b"a/1.txt");
    index.insert(b"order/2", b"b.txt").await.unwrap();
    let outbox = rolled.mail("mail").await.unwrap();
    outbox.enqueue_built(&message("never")).await.unwrap();
    let back = rolled.rollback().await.unwrap();
    assert!(
        matches!(back.cause, RollbackCause::Requested { .. }),
        "{back:?}"
    );
    assert!(
        rolled.rollback().await.is_ok(),
        "a second rollback answers the same"
    );

    let mut reader = concord.begin().await.unwrap();
    let index = reader.kv("index").await.unwrap();
    assert_eq!(index.get(b"order/2").await.unwrap(), None);
    assert_eq!(index.get(b"order/0").await.unwrap(), None);
    assert!(
        reader
            .files("uploads")
            .await
            .unwrap()
            .read("b.txt")
            .await
            .is_err()
    );
    reader.rollback().await.unwrap();
    assert!(file.exists(), "the rolled-back delete did not happen");
    assert!(!data.join("uploads").join("b.txt").exists());
    assert_eq!(maildir_new(&data), 2);
    assert!(matches!(
        concord.outcome(xid).await.unwrap(),
        TxnOutcome::Committed(c) if c.xid == xid
    ));
    assert!(concord.close(Duration::from_secs(1)).await);
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_answer_as_in_embedded_mode() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let concord = daemon.connect().await;

    let mut tx = concord.begin().await.unwrap();
    let index = tx.kv("index").await.unwrap();
    index.insert(b"k", b"v").await.unwrap();
    let unknown = tx.kv("nope").await.err().unwrap();
    assert!(
        matches!(&unknown, ConcordError::Coordinator(CoordError::UnknownResource { name, .. }) if name == "nope"),
        "{unknown:?}"
    );
    let wrong = tx.kv("uploads").await.err().unwrap();
    assert!(
        matches!(&wrong, ConcordError::WrongKind { name, expected: "kv" } if name == "uploads"),
        "{wrong:?}"
    );
    assert!(!unknown.is_retryable() && !wrong.is_retryable());
    let first = tx.commit().await.unwrap();
    assert_eq!(
        tx.commit().await.unwrap(),
        first,
        "a second commit answers the same"
    );
    let after = index.insert(b"k2", b"v").await.unwrap_err();
    assert!(matches!(after, ConcordError::Finished { .. }), "{after:?}");
    assert!(matches!(
        tx.kv("index").await.err().unwrap(),
        ConcordError::Finished { .. }
    ));
    assert!(matches!(
        tx.rollback().await.unwrap_err(),
        ConcordError::Finished {
            state: "committed",
            ..
        }
    ));

    // The daemon refuses the same way when the client does not check first: a branch on
    // another connection's transaction after it committed.
    let mut other = concord.begin().await.unwrap();
    let files = other.files("uploads").await.unwrap();
    files.put("x", &b"x"[..]).await.unwrap();
    other.commit().await.unwrap();
    assert!(files.put("y", &b"y"[..]).await.is_err());

    // No daemon there: a connect error that is worth trying again.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = Concord::connect(&format!("http://127.0.0.1:{port}"), Credentials::none())
        .await
        .err()
        .unwrap();
    assert!(matches!(refused, ConcordError::Connect(_)), "{refused:?}");
    assert!(refused.is_retryable());
    let bad = Concord::connect("ftp://127.0.0.1:1", Credentials::none())
        .await
        .err()
        .unwrap();
    assert!(!bad.is_retryable(), "{bad:?}");
    assert!(daemon.terminate());
}

/// Content generated on the fly (never held whole): byte `i` is a function of `i`.
struct Generated {
    at: u64,
    len: u64,
}

fn generated_byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.len - self.at);
        let start = self.at;
        let bytes: Vec<u8> = (start..start + n).map(generated_byte).collect();
        buf.put_slice(&bytes);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// The process's peak resident memory (bytes), from /proc/self/status VmHWM.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_put_streams_in_bounded_memory() {
    if child_role().as_deref() == Some("big_put") {
        let url = std::env::var("REMOTE_URL").unwrap();
        let concord = Concord::connect(&url, Credentials::none()).await.unwrap();
        let mut tx = concord.begin().await.unwrap();
        let uploads = tx.files("uploads").await.unwrap();
        let content = Generated {
            at: 0,
            len: BIG_PUT_BYTES,
        };
        assert_eq!(
            uploads.put("big.bin", content).await.unwrap(),
            BIG_PUT_BYTES
        );
        tx.commit().await.unwrap();
        println!("peak {}", peak_rss_bytes());
        return;
    }
    if child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let daemon = Daemon::start(&data);
    let url = daemon.url();
    let mut putter = child(
        "big_put",
        "a_64_mib_put_streams_in_bounded_memory",
        &[("REMOTE_URL", url.as_str())],
    );
    let lines = lines_of(putter.stdout.take().unwrap());
    let peak = rest_of_line(&lines, "peak ", CHILD_MS_MAX).expect("the child reports its peak");
    assert!(wait_exit(&mut putter, CHILD_MS_MAX, "a child").success());
    let peak: u64 = peak.parse().unwrap();
    assert!(
        peak < BIG_PUT_PEAK_BYTES_MAX,
        "a {BIG_PUT_BYTES}-byte put peaked at {peak} bytes of memory"
    );

    let file = data.join("uploads").join("big.bin");
    eventually_async(VISIBLE_MS_MAX, "the big file committed", || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() == BIG_PUT_BYTES)
    })
    .await;
    let mut on_disk = std::io::BufReader::new(std::fs::File::open(&file).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = on_disk.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, generated_byte(at + k as u64), "byte {}", at + k as u64);
        }
        at += n as u64;
    }
    assert_eq!(at, BIG_PUT_BYTES);
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_application_has_its_branches_rolled_back_at_the_timeout() {
    if child_role().as_deref() == Some("worker") {
        let url = std::env::var("REMOTE_URL").unwrap();
        let concord = Concord::connect(&url, Credentials::none()).await.unwrap();
        let tx = concord.begin().await.unwrap();
        tx.files("uploads")
            .await
            .unwrap()
            .put("held.txt", &b"half done"[..])
            .await
            .unwrap();
        tx.kv("index")
            .await
            .unwrap()
            .insert(b"held", b"x")
            .await
            .unwrap();
        println!("xid {}", tx.xid());
        // Killed here.
        tokio::time::sleep(Duration::from_millis(CHILD_MS_MAX)).await;
        return;
    }
    if child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_short(dir.path());
    let url = daemon.url();
    let mut worker = child(
        "worker",
        "a_killed_application_has_its_branches_rolled_back_at_the_timeout",
        &[("REMOTE_URL", url.as_str())],
    );
    let lines = lines_of(worker.stdout.take().unwrap());
    let xid = rest_of_line(&lines, "xid ", CHILD_MS_MAX).expect("the worker's xid");
    worker.kill().unwrap();
    worker.wait().unwrap();
    let xid: participant::Xid = xid.parse().unwrap();

    let concord = daemon.connect().await;
    let deadline = Instant::now() + Duration::from_millis(TIMEOUT_MS + VISIBLE_MS_MAX);
    loop {
        match concord.outcome(xid).await.unwrap() {
            TxnOutcome::RolledBack { cause } => {
                assert!(matches!(cause, RollbackCause::TimedOut { .. }), "{cause:?}");
                break;
            }
            TxnOutcome::Open => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "rolled back at the timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nothing of it is visible, and what it held is free: a new transaction writes the same
    // key and path at once.
    let mut next = concord.begin().await.unwrap();
    let index = next.kv("index").await.unwrap();
    assert_eq!(index.get(b"held").await.unwrap(), None);
    index.insert(b"held", b"mine").await.unwrap();
    let uploads = next.files("uploads").await.unwrap();
    assert!(uploads.read("held.txt").await.is_err());
    uploads.put("held.txt", &b"mine"[..]).await.unwrap();
    next.commit().await.unwrap();
    let file = dir.path().join("data").join("uploads").join("held.txt");
    eventually_async(VISIBLE_MS_MAX, "the new write committed", || {
        std::fs::read(&file).is_ok_and(|c| c == b"mine")
    })
    .await;
    assert!(daemon.terminate());
}

/// A TCP proxy between the client and the daemon that, once armed, cuts the connection at
/// the daemon's next answer instead of passing it on; `refuse` makes it drop every new
/// connection.
struct Proxy {
    addr: String,
    armed: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let armed = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (a, r, c) = (armed.clone(), refuse.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if r.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(daemon) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(pipe(client, daemon, a.clone(), c.clone()));
            }
        });
        Proxy {
            addr,
            armed,
            refuse,
            cuts,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    client: tokio::net::TcpStream,
    daemon: tokio::net::TcpStream,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut daemon_read, mut daemon_write) = daemon.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut client_read, &mut daemon_write).await;
    };
    let down = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match daemon_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if armed.swap(false, Ordering::SeqCst) {
                cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending closes both: the connection is cut.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_reports_the_true_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_short(dir.path());
    let proxy = Proxy::start(daemon.addr.clone()).await;
    let concord = Concord::connect(&proxy.url(), Credentials::none())
        .await
        .unwrap();

    // The answer is cut off; the client asks Outcome on a new connection and hears committed.
    let mut tx = concord.begin().await.unwrap();
    tx.kv("index")
        .await
        .unwrap()
        .insert(b"cut", b"1")
        .await
        .unwrap();
    proxy.armed.store(true, Ordering::SeqCst);
    let committed = tx.commit().await.unwrap();
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the answer was cut off"
    );
    assert_eq!(committed.xid, tx.xid());

    // Cut off and unreachable afterwards: in doubt, with the xid; the outcome is there later.
    let mut tx = concord.begin().await.unwrap();
    tx.kv("index")
        .await
        .unwrap()
        .insert(b"cut", b"2")
        .await
        .unwrap();
    proxy.armed.store(true, Ordering::SeqCst);
    proxy.refuse.store(true, Ordering::SeqCst);
    let doubt = tx.commit().await.unwrap_err();
    assert!(
        matches!(&doubt, ConcordError::InDoubt { xid, .. } if *xid == tx.xid()),
        "{doubt:?}"
    );
    assert!(!doubt.is_retryable());
    let direct = daemon.connect().await;
    assert!(
        matches!(
            direct.outcome(tx.xid()).await.unwrap(),
            TxnOutcome::Committed(_)
        ),
        "the daemon committed it"
    );
    let mut reader = direct.begin().await.unwrap();
    let value = reader.kv("index").await.unwrap().get(b"cut").await.unwrap();
    assert_eq!(value.as_deref(), Some(&b"2"[..]));
    reader.rollback().await.unwrap();
    drop(proxy);
    assert!(daemon.terminate());
}

/// The PostgreSQL site of the tests below: a database with `items` under capture, a daemon
/// configuration with the postgres resource `orders` and the kv resource `index`.
struct PgSite {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    db: String,
    url: String,
}

/// The transaction timeout of the PostgreSQL site, and its orphan sweep interval.
const PG_TIMEOUT_MS: u64 = 3_000;
const PG_SWEEP_MS: u64 = 500;

impl PgSite {
    fn new(db: &str) -> PgSite {
        let cluster = adapters::pgtest::PgCluster::shared();
        let url = cluster.database(db).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &format!("txn_timeout_ms = {PG_TIMEOUT_MS}\norphan_sweep_ms = {PG_SWEEP_MS}\n"),
            OPEN_DAEMON,
            &format!("{INDEX}[resources.orders]\nkind = \"postgres\"\nurl = \"{url}\"\n"),
        );
        let site = PgSite {
            _dir: dir,
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

    fn concord(&self, args: &[&str]) {
        let status = Command::new(env!("CARGO_BIN_EXE_concord"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut status = status;
        assert!(
            wait_exit(&mut status, CHILD_MS_MAX, "a child").success(),
            "concord {args:?}"
        );
    }

    fn psql(&self, sql: &str) -> String {
        adapters::pgtest::PgCluster::shared()
            .psql(&self.db, sql)
            .unwrap()
            .trim()
            .to_string()
    }

    fn rows(&self, id: i32) -> String {
        self.psql(&format!("SELECT count(*) FROM items WHERE id = {id}"))
    }

    fn prepared(&self) -> String {
        self.psql("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()")
    }

    fn daemon(&self) -> Daemon {
        Daemon::start_config(&self.config)
    }

    async fn connect(&self, daemon: &Daemon) -> Concord {
        let concord = daemon.connect().await;
        attach(&concord, &self.url).await;
        concord
    }
}

async fn attach(concord: &Concord, url: &str) {
    concord
        .attach_postgres("orders", adapters::postgres::PostgresConfig::new(url, 1))
        .await
        .unwrap();
}

async fn wait_psql(site: &PgSite, what: &str, check: impl Fn(&PgSite) -> bool) {
    let deadline = Instant::now() + Duration::from_millis(PG_TIMEOUT_MS + VISIBLE_MS_MAX);
    while !check(site) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_branch_runs_in_the_application_and_commits_through_the_daemon() {
    let site = PgSite::new("remote_participant_pg");
    let daemon = site.daemon();
    let concord = site.connect(&daemon).await;

    // With a kv branch, and alone (two phases all the same).
    let mut tx = concord.begin().await.unwrap();
    let orders = tx.postgres("orders").await.unwrap();
    orders
        .execute("INSERT INTO items VALUES (1, 'one')", &[])
        .await
        .unwrap();
    let row = orders
        .query_one("SELECT name FROM items WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "one");
    tx.kv("index")
        .await
        .unwrap()
        .insert(b"item/1", b"one")
        .await
        .unwrap();
    let committed = tx.commit().await.unwrap();
    assert!(committed.lsn.is_some());
    let mut lone = concord.begin().await.unwrap();
    lone.postgres("orders")
        .await
        .unwrap()
        .batch_execute("INSERT INTO items VALUES (2, 'two')")
        .await
        .unwrap();
    assert!(
        lone.commit().await.unwrap().lsn.is_some(),
        "a lone remote branch has a decision record"
    );
    wait_psql(&site, "both rows committed", |s| {
        s.rows(1) == "1" && s.rows(2) == "1"
    })
    .await;
    wait_psql(&site, "nothing left prepared", |s| s.prepared() == "0").await;

    // Rolled back: here, nothing was prepared.
    let mut back = concord.begin().await.unwrap();
    back.postgres("orders")
        .await
        .unwrap()
        .execute("INSERT INTO items VALUES (3, 'three')", &[])
        .await
        .unwrap();
    back.kv("index")
        .await
        .unwrap()
        .insert(b"item/3", b"three")
        .await
        .unwrap();
    back.rollback().await.unwrap();
    assert_eq!(site.rows(3), "0");

    // A read-only branch enlists nothing.
    let mut reader = concord.begin().await.unwrap();
    let count = reader
        .postgres("orders")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(count.get::<_, i64>(0), 2);
    reader.commit().await.unwrap();

    // A failed prepare rolls the whole transaction back: a branch whose statement failed.
    let mut broken = concord.begin().await.unwrap();
    broken
        .kv("index")
        .await
        .unwrap()
        .insert(b"item/9", b"x")
        .await
        .unwrap();
    let pg = broken.postgres("orders").await.unwrap();
    assert!(
        pg.execute("INSERT INTO items VALUES (1, 'dup')", &[])
            .await
            .is_err()
    );
    let failed = broken.commit().await.unwrap_err();
    assert!(
        matches!(&failed, ConcordError::RolledBack { branch: Some(b), .. } if b == "orders"),
        "{failed:?}"
    );
    let mut check = concord.begin().await.unwrap();
    assert_eq!(
        check
            .kv("index")
            .await
            .unwrap()
            .get(b"item/9")
            .await
            .unwrap(),
        None
    );
    check.rollback().await.unwrap();
    assert_eq!(site.prepared(), "0");
    assert!(daemon.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_application_leaves_no_postgres_branch_behind() {
    match child_role().as_deref() {
        Some(role @ ("pg_open" | "pg_prepared")) => return pg_worker(role).await,
        Some(_) => return,
        None => {}
    }
    let site = PgSite::new("remote_participant_pg_kill");
    let daemon = site.daemon();
    let url = daemon.url();
    for (role, id) in [("pg_open", 10), ("pg_prepared", 11)] {
        let mut worker = child(
            role,
            "a_killed_application_leaves_no_postgres_branch_behind",
            &[("REMOTE_URL", url.as_str()), ("PG_URL", site.url.as_str())],
        );
        let lines = lines_of(worker.stdout.take().unwrap());
        let xid = rest_of_line(&lines, "xid ", CHILD_MS_MAX).expect("the worker's xid");
        worker.kill().unwrap();
        worker.wait().unwrap();
        let xid: participant::Xid = xid.parse().unwrap();
        wait_psql(&site, "the killed worker's branch is gone", |s| {
            s.prepared() == "0" && s.rows(id) == "0"
        })
        .await;
        let concord = site.connect(&daemon).await;
        let deadline = Instant::now() + Duration::from_millis(PG_TIMEOUT_MS + VISIBLE_MS_MAX);
        while matches!(concord.outcome(xid).await.unwrap(), TxnOutcome::Open) {
            assert!(
                Instant::now() < deadline,
                "{role}: rolled back at the timeout"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The row's lock is free: a new transaction writes it.
        let mut next = concord.begin().await.unwrap();
        next.postgres("orders")
            .await
            .unwrap()
            .execute(&format!("INSERT INTO items VALUES ({id}, 'next')"), &[])
            .await
            .unwrap();
        next.commit().await.unwrap();
        wait_psql(&site, "the new row", |s| s.rows(id) == "1").await;
    }
    assert!(daemon.terminate());
}

/// A child application killed mid-transaction: `pg_open` with its branch's statement run,
/// `pg_prepared` with its branch prepared but not enlisted yet.
async fn pg_worker(role: &str) {
    let id = if role == "pg_open" { 10 } else { 11 };
    let url = std::env::var("REMOTE_URL").unwrap();
    let pg_url = std::env::var("PG_URL").unwrap();
    let concord = Concord::connect(&url, Credentials::none()).await.unwrap();
    let tx = concord.begin().await.unwrap();
    let insert = format!("INSERT INTO items VALUES ({id}, 'killed')");
    if role == "pg_open" {
        attach(&concord, &pg_url).await;
        tx.postgres("orders")
            .await
            .unwrap()
            .execute(&insert, &[])
            .await
            .unwrap();
    } else {
        use adapters::Resource;
        let config = adapters::postgres::PostgresConfig::new(pg_url, 1);
        let pg = adapters::postgres::PostgresResource::open("orders", config)
            .await
            .unwrap();
        let xid = tx.xid();
        pg.begin(&xid).await.unwrap();
        pg.branch(&xid)
            .unwrap()
            .execute(&insert, &[])
            .await
            .unwrap();
        assert!(pg.prepare_for_enlist(&xid).await.unwrap().is_some());
    }
    println!("xid {}", tx.xid());
    tokio::time::sleep(Duration::from_millis(CHILD_MS_MAX)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_sent_and_a_missing_one_is_refused() {
    const TOKEN: &str = "remote-participant-test-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.token"), format!("{TOKEN}\n")).unwrap();
    let path = write_config(
        dir.path(),
        "",
        "plaintext = true\n[daemon.clients.app]\ntoken_file = \"app.token\"\n",
        INDEX,
    );
    let daemon = Daemon::start_config(&path);
    let refused = Concord::connect(&daemon.url(), Credentials::none())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(refused, ConcordError::Unauthorized { .. }),
        "{refused:?}"
    );
    assert!(!refused.is_retryable());
    let token = participant::Token::new(TOKEN).unwrap();
    let concord = Concord::connect(&daemon.url(), Credentials::none().with_token(token))
        .await
        .unwrap();
    let mut tx = concord.begin().await.unwrap();
    tx.kv("index")
        .await
        .unwrap()
        .insert(b"k", b"v")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(daemon.terminate());
}
