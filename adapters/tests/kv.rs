//! The kv resource: the conformance suite, reading one's own writes, key locking (conflicts,
//! waiting, locks across a restart), commit atomicity (the trees seen directly with sled, and a
//! child process killed with SIGKILL while it commits), fencing, replay, the directory held by
//! another process, `prepared_on_disk`, limits, and damage to the private trees by hand.
//!
//! Two tests run a child: this test binary re-executed to run only one of the `child_…` tests
//! with an environment variable set; without it those tests return at once, so a normal run
//! passes them.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use adapters::kv::{
    self, KEY_BYTES_MAX, KvBranch, KvConfig, KvResource, KvWrite, decode_batch, encode_batch,
};
use adapters::testing::{self, Paused, Subject};
use adapters::{Epoch, Lsn, Resource, ResourceError, Vote, Xid};
use common::{rejected, xid_at};

/// Lock wait of every resource here: small, so that conflicts are quick to provoke.
const LOCK_WAIT_MS: u64 = 200;
/// Longest value here: 1 MiB, over sled's blob threshold (a quarter of a 512 KiB segment).
const VALUE_BYTES_MAX: u64 = 1 << 20;
/// Largest batch here.
const BATCH_BYTES_MAX: u64 = 3 << 20;

fn config() -> KvConfig {
    KvConfig {
        lock_wait_ms_max: LOCK_WAIT_MS,
        value_bytes_max: VALUE_BYTES_MAX,
        batch_bytes_max: BATCH_BYTES_MAX,
        create_if_missing: true,
        cache_bytes: 8 << 20,
        ..KvConfig::default()
    }
}

fn open(dir: &Path) -> Arc<KvResource> {
    KvResource::open("kv", dir, config()).unwrap()
}

/// A begun branch and its handle.
async fn begun(r: &KvResource) -> (Xid, KvBranch) {
    let xid = xid_at(r.fence_epoch().await.unwrap().0);
    r.begin(&xid).await.unwrap();
    (xid, r.branch(&xid))
}

/// Prepares `xid` and returns its redo; panics on a read-only vote.
async fn prepared(r: &KvResource, xid: &Xid) -> Vec<u8> {
    match r.prepare(xid).await.unwrap() {
        Vote::Commit { redo } => redo,
        Vote::ReadOnly => panic!("{xid} voted ReadOnly"),
    }
}

/// Commits `key` = `value` in a transaction of its own.
async fn commit_insert(r: &KvResource, key: &[u8], value: &[u8]) {
    let (xid, branch) = begun(r).await;
    branch.insert(key, value).await.unwrap();
    prepared(r, &xid).await;
    r.commit(&xid).await.unwrap();
}

/// The message of a `Fatal` error; panics on any other result.
#[track_caller]
fn fatal<T>(result: Result<T, ResourceError>) -> String {
    match result {
        Err(e @ ResourceError::Fatal { .. }) => e.to_string(),
        Err(other) => panic!("expected a Fatal error, got {other:?}"),
        Ok(_) => panic!("expected a Fatal error, got Ok"),
    }
}

fn kv(r: &Arc<dyn Resource>) -> &KvResource {
    r.as_any().downcast_ref::<KvResource>().unwrap()
}

/// Opens the sled directory directly (the resource must be closed), as an operator would;
/// waits like `KvResource::open` for a lock a dropped instance's background writes still hold.
fn sled_db(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if Instant::now() < deadline && e.to_string().contains("acquire lock") => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("open {}: {e}", dir.display()),
        }
    }
}

fn tree_keys(db: &sled::Db, tree: &str) -> Vec<Vec<u8>> {
    let tree = db.open_tree(tree).unwrap();
    tree.iter().keys().map(|k| k.unwrap().to_vec()).collect()
}

// The conformance suite.

/// The subject of the conformance suite: a primary and a standby directory in one temp
/// directory.
struct KvSubject {
    dir: tempfile::TempDir,
}

fn tag_key(tag: u32) -> Vec<u8> {
    format!("effects/{tag}").into_bytes()
}

fn tag_value(tag: u32) -> Vec<u8> {
    format!("effect {tag}").into_bytes()
}

#[async_trait::async_trait]
impl Subject for KvSubject {
    async fn open(&self) -> Arc<dyn Resource> {
        open(&self.dir.path().join("primary"))
    }

    async fn open_standby(&self) -> Arc<dyn Resource> {
        open(&self.dir.path().join("standby"))
    }

    async fn open_replica(&self, n: u32) -> Arc<dyn Resource> {
        open(&self.dir.path().join(format!("replica-{n}")))
    }

    async fn fail_next_replay(&self, resource: &Arc<dyn Resource>) {
        kv(resource).fail_next_replay();
    }

    async fn write(&self, resource: &Arc<dyn Resource>, xid: &Xid, tag: u32) {
        let branch = kv(resource).branch(xid);
        branch.insert(&tag_key(tag), &tag_value(tag)).await.unwrap();
    }

    async fn visible(&self, resource: &Arc<dyn Resource>, tag: u32) -> bool {
        kv(resource).get(&tag_key(tag)).await.unwrap() == Some(tag_value(tag))
    }

    async fn pause_prepare(&self, resource: &Arc<dyn Resource>, xid: &Xid) -> Box<dyn Paused> {
        Box::new(kv(resource).pause_prepare(xid))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_resource_passes_the_conformance_suite() {
    let subject = KvSubject {
        dir: tempfile::tempdir().unwrap(),
    };
    testing::run_all(&subject).await;
}

// Opening.

#[tokio::test]
async fn a_missing_directory_is_refused_unless_it_may_be_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere");
    let config = KvConfig {
        create_if_missing: false,
        ..config()
    };
    let message = rejected(KvResource::open("kv", &path, config).map(|_| ()));
    assert!(
        message.contains("resource kv") && message.contains(&path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("create_if_missing"), "{message}");
    assert!(!path.exists());
    open(&path);
    assert!(path.join("db").exists());
}

#[tokio::test]
async fn limits_over_their_ceilings_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = KvConfig {
        value_bytes_max: kv::VALUE_BYTES_LIMIT + 1,
        ..config()
    };
    let message = rejected(KvResource::open("kv", dir.path(), config).map(|_| ()));
    assert!(message.contains("VALUE_BYTES_LIMIT"), "{message}");
}

// The directory held by another process.

const HOLD_DIR_ENV: &str = "CONCORD_KV_CHILD_HOLD_DIR";
const HOLD_TEST: &str = "child_holds_the_directory_until_stdin_closes";
/// What the holding child prints once it has the directory open.
const HOLDING: &str = "kv-child-holding";
/// A child ends by itself after this long, should its parent never let it go.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
/// How long a parent waits for a child to say something.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

/// Kills and reaps the child when dropped, so a failing parent leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this test binary running only `test`, with `env` set to `dir`.
fn spawn_child(test: &str, env: &str, dir: &Path) -> ChildGuard {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// Sends every complete line of `stdout` (a line cut by a kill is dropped).
fn read_lines(stdout: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if !line.ends_with('\n') => return,
                Ok(_) => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Collects up to 64 KiB of the child's stderr, for a failure message.
fn read_stderr(stderr: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.take(64 << 10).read_to_string(&mut text);
        text
    })
}

/// Not a test of its own: the body of the child that holds a directory. Opens the resource,
/// says `holding`, and keeps it open until its stdin closes (or its lifetime ends).
#[test]
fn child_holds_the_directory_until_stdin_closes() {
    let Some(dir) = std::env::var_os(HOLD_DIR_ENV) else {
        return;
    };
    let r = open(Path::new(&dir));
    // On the line libtest began with the test's name: the parent looks for the word.
    println!("{HOLDING}");
    std::io::stdout().flush().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(CHILD_LIFETIME);
    drop(r);
}

#[tokio::test]
async fn a_directory_held_by_another_process_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(HOLD_TEST, HOLD_DIR_ENV, dir.path());
    let (tx, rx) = mpsc::channel();
    read_lines(child.0.stdout.take().unwrap(), tx);
    let stderr = read_stderr(child.0.stderr.take().unwrap());
    let deadline = Instant::now() + CHILD_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.ends_with(HOLDING) => break,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                drop(child);
                panic!(
                    "the child never said it holds the directory; its stderr:\n{}",
                    stderr.join().unwrap()
                );
            }
        }
    }

    let wait = KvConfig {
        open_wait_ms_max: 300,
        ..config()
    };
    let start = Instant::now();
    let result = KvResource::open("kv", dir.path(), wait);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    let message = rejected(result.map(|_| ()));
    assert!(
        message.contains("resource kv")
            && message.contains(&dir.path().display().to_string())
            && message.contains("another process"),
        "{message}"
    );

    // Let the child go (closing its stdin); then the directory opens.
    drop(child.0.stdin.take());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![]);
}

// Reading one's own writes.

#[tokio::test]
async fn a_branch_reads_its_own_writes_and_others_read_the_committed_store() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    commit_insert(&r, b"old", b"committed").await;
    let (xid, a) = begun(&r).await;
    let (other, b) = begun(&r).await;
    a.insert(b"new", b"pending").await.unwrap();
    a.insert(b"old", b"replaced").await.unwrap();
    assert_eq!(a.get(b"new").await.unwrap(), Some(b"pending".to_vec()));
    assert_eq!(a.get(b"old").await.unwrap(), Some(b"replaced".to_vec()));
    assert_eq!(a.get(b"absent").await.unwrap(), None);
    assert_eq!(b.get(b"new").await.unwrap(), None);
    assert_eq!(b.get(b"old").await.unwrap(), Some(b"committed".to_vec()));
    assert_eq!(r.get(b"new").await.unwrap(), None);

    // A remove shadows the store too; an insert after it brings a value back.
    a.remove(b"old").await.unwrap();
    assert_eq!(a.get(b"old").await.unwrap(), None);
    assert_eq!(r.get(b"old").await.unwrap(), Some(b"committed".to_vec()));
    a.insert(b"again", b"1").await.unwrap();
    a.remove(b"again").await.unwrap();
    a.insert(b"again", b"2").await.unwrap();
    assert_eq!(a.get(b"again").await.unwrap(), Some(b"2".to_vec()));

    // Prepared, the branch still reads its writes; committed, everyone does.
    prepared(&r, &xid).await;
    assert_eq!(a.get(b"new").await.unwrap(), Some(b"pending".to_vec()));
    assert_eq!(r.get(b"new").await.unwrap(), None);
    r.commit(&xid).await.unwrap();
    assert_eq!(r.get(b"new").await.unwrap(), Some(b"pending".to_vec()));
    assert_eq!(r.get(b"old").await.unwrap(), None);
    assert_eq!(r.get(b"again").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(b.get(b"new").await.unwrap(), Some(b"pending".to_vec()));
    r.rollback(&other).await.unwrap();
    // A resolved branch is gone: reading through its handle is refused.
    assert!(rejected(a.get(b"new").await).contains("begin it first"));
}

#[tokio::test]
async fn writes_of_an_unbegun_or_prepared_branch_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let never = r.branch(&xid_at(0));
    assert!(rejected(never.insert(b"k", b"v").await).contains("begin it first"));
    assert!(rejected(never.remove(b"k").await).contains("begin it first"));
    let (xid, a) = begun(&r).await;
    a.insert(b"k", b"v").await.unwrap();
    let message = rejected(r.commit(&xid).await);
    assert!(message.contains("one-phase commit"), "{message}");
    prepared(&r, &xid).await;
    assert!(rejected(a.insert(b"k", b"w").await).contains("prepared"));
    r.rollback(&xid).await.unwrap();
    assert_eq!(r.get(b"k").await.unwrap(), None);
}

// Locking.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_gets_a_conflict_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (first, a) = begun(&r).await;
    a.insert(b"shared", b"a").await.unwrap();
    let (second, b) = begun(&r).await;
    let start = Instant::now();
    let result = b.insert(b"shared", b"b").await;
    let elapsed = start.elapsed();
    match result {
        Err(ResourceError::Conflict {
            resource,
            what,
            holder,
            waited_ms,
        }) => {
            assert_eq!(resource, "kv");
            assert_eq!(what, "key \"shared\"");
            assert_eq!(holder, first.to_string());
            assert!(waited_ms >= LOCK_WAIT_MS, "waited {waited_ms} ms");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(LOCK_WAIT_MS) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    // A remove waits for the same lock; other keys are free; reads take no lock.
    assert!(matches!(
        b.remove(b"shared").await,
        Err(ResourceError::Conflict { .. })
    ));
    b.insert(b"other", b"b").await.unwrap();
    assert_eq!(b.get(b"shared").await.unwrap(), None);
    // The loser wrote nothing on the contended key: its batch holds only the other one.
    let redo = prepared(&r, &second).await;
    assert_eq!(
        decode_batch(&redo).unwrap(),
        vec![KvWrite::Insert {
            key: b"other".to_vec(),
            value: b"b".to_vec()
        }]
    );
    r.rollback(&second).await.unwrap();
    r.rollback(&first).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_proceeds_when_the_first_resolves_within_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let r = KvResource::open(
        "kv",
        dir.path(),
        KvConfig {
            lock_wait_ms_max: 5000,
            ..config()
        },
    )
    .unwrap();
    for commit_first in [true, false] {
        let (first, a) = begun(&r).await;
        a.insert(b"shared", b"first").await.unwrap();
        prepared(&r, &first).await;
        let (second, b) = begun(&r).await;
        let start = Instant::now();
        let waiting = tokio::spawn(async move { b.remove(b"shared").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the second writer did not wait");
        if commit_first {
            r.commit(&first).await.unwrap();
        } else {
            r.rollback(&first).await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        let expected = commit_first.then(|| b"first".to_vec());
        assert_eq!(r.get(b"shared").await.unwrap(), expected);
        prepared(&r, &second).await;
        r.commit(&second).await.unwrap();
        assert_eq!(r.get(b"shared").await.unwrap(), None);
    }
}

#[tokio::test]
async fn locks_of_prepared_branches_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (held, a) = begun(&r).await;
    a.insert(b"p", b"prepared").await.unwrap();
    a.remove(b"gone").await.unwrap();
    prepared(&r, &held).await;
    let (_, c) = begun(&r).await;
    c.insert(b"q", b"never prepared").await.unwrap();
    drop((a, c, r));

    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![held]);
    let (second, b) = begun(&r).await;
    for key in [&b"p"[..], b"gone"] {
        match b.insert(key, b"second").await {
            Err(ResourceError::Conflict { holder, what, .. }) => {
                assert_eq!(holder, held.to_string());
                assert!(what.contains(std::str::from_utf8(key).unwrap()), "{what}");
            }
            other => panic!("expected a conflict with the prepared branch, got {other:?}"),
        }
    }
    // The key of the branch lost in the restart is free.
    b.insert(b"q", b"second").await.unwrap();
    // The recovered branch reads its own writes, and prepares again with the same redo.
    assert_eq!(
        r.branch(&held).get(b"p").await.unwrap(),
        Some(b"prepared".to_vec())
    );
    r.commit(&held).await.unwrap();
    b.insert(b"p", b"second").await.unwrap();
    prepared(&r, &second).await;
    r.commit(&second).await.unwrap();
    assert_eq!(r.get(b"p").await.unwrap(), Some(b"second".to_vec()));
    assert_eq!(r.get(b"q").await.unwrap(), Some(b"second".to_vec()));
}

/// `prepared_on_disk` lists the prepared branches of a stopped resource from its prepared tree,
/// says `None` while an instance holds the directory, and finds nothing where there is no
/// database.
#[tokio::test]
async fn prepared_on_disk_lists_prepared_branches_when_no_instance_holds_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        kv::prepared_on_disk(&dir.path().join("absent")).unwrap(),
        Some(vec![])
    );
    let r = open(dir.path());
    let (held, a) = begun(&r).await;
    a.insert(b"p", b"prepared").await.unwrap();
    prepared(&r, &held).await;
    let (_, c) = begun(&r).await;
    c.insert(b"q", b"never prepared").await.unwrap();
    assert_eq!(kv::prepared_on_disk(dir.path()).unwrap(), None, "held by r");
    drop((a, c, r));
    // A dropped instance's background writes may hold the lock for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let listed = loop {
        if let Some(listed) = kv::prepared_on_disk(dir.path()).unwrap() {
            break listed;
        }
        assert!(Instant::now() < deadline, "the directory stayed locked");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(listed, vec![held]);
}

// Commit atomicity.

#[tokio::test]
async fn commit_applies_the_batch_and_removes_it_in_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    commit_insert(&r, b"b", b"to be removed").await;
    let (xid, a) = begun(&r).await;
    a.insert(b"a", b"1").await.unwrap();
    a.remove(b"b").await.unwrap();
    let redo = prepared(&r, &xid).await;
    drop((a, r));

    // Prepared: the batch is in the private tree, the data tree untouched.
    {
        let db = sled_db(dir.path());
        let entry = db
            .open_tree(kv::PREPARED_TREE)
            .unwrap()
            .get(xid.to_string())
            .unwrap();
        assert_eq!(entry.as_deref(), Some(redo.as_slice()));
        assert_eq!(tree_keys(&db, kv::DATA_TREE), vec![b"b".to_vec()]);
    }

    let r = open(dir.path());
    r.commit(&xid).await.unwrap();
    drop(r);
    // Committed: the entry is gone and the writes are there, both on disk.
    {
        let db = sled_db(dir.path());
        assert_eq!(tree_keys(&db, kv::PREPARED_TREE), Vec::<Vec<u8>>::new());
        assert_eq!(tree_keys(&db, kv::DATA_TREE), vec![b"a".to_vec()]);
    }
    let r = open(dir.path());
    r.commit(&xid).await.unwrap();
    assert_eq!(r.get(b"a").await.unwrap(), Some(b"1".to_vec()));
}

#[tokio::test]
async fn large_values_survive_a_restart() {
    // Values over a quarter of sled's segment go to sled's blob files, which `sync` fsyncs.
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let big: Vec<u8> = (0..VALUE_BYTES_MAX).map(|i| (i % 251) as u8).collect();
    let (xid, a) = begun(&r).await;
    a.insert(b"big", &big).await.unwrap();
    a.insert(b"half", &big[..big.len() / 2]).await.unwrap();
    prepared(&r, &xid).await;
    drop((a, r));
    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![xid]);
    r.commit(&xid).await.unwrap();
    drop(r);
    let r = open(dir.path());
    assert_eq!(r.get(b"big").await.unwrap(), Some(big.clone()));
    assert_eq!(
        r.get(b"half").await.unwrap().map(|v| v.len()),
        Some(big.len() / 2)
    );
}

const CRASH_DIR_ENV: &str = "CONCORD_KV_CHILD_CRASH_DIR";
const CRASH_TEST: &str = "child_commits_until_killed";
/// Concurrent committers in the crash child.
const COMMITTERS: u64 = 8;
/// Commits the parent waits for before each kill: different moments of the run.
const KILL_AFTER_COMMITS: [usize; 6] = [40, 90, 25, 60, 110, 75];

/// The xid of the `n`-th branch of committer `task`.
fn crash_xid(task: u64, n: u64) -> Xid {
    Xid {
        node: 7,
        epoch: Epoch(0),
        seq: task << 32 | n,
    }
}

fn crash_keys(xid: &Xid) -> [Vec<u8>; 2] {
    [
        format!("{xid}/a").into_bytes(),
        format!("{xid}/b").into_bytes(),
    ]
}

/// Not a test of its own: the body of the crash child. Runs `COMMITTERS` tasks, each committing
/// branches of two keys one after the other, printing `prepared <seq>` and `committed <seq>` as
/// each step returns, until it is killed (or its lifetime ends). A restarted child goes on after
/// the branches its directory already has.
#[test]
fn child_commits_until_killed() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let r = open(Path::new(&dir));
        let deadline = Instant::now() + CHILD_LIFETIME;
        let tasks: Vec<_> = (0..COMMITTERS)
            .map(|task| {
                let r = r.clone();
                tokio::spawn(async move {
                    // Past every branch an earlier child may have left.
                    let mut n = 1 << 16;
                    while r
                        .get(&crash_keys(&crash_xid(task, n))[0])
                        .await
                        .unwrap()
                        .is_some()
                        || r.recover().await.unwrap().contains(&crash_xid(task, n))
                    {
                        n += 1;
                    }
                    let n0 = n;
                    while Instant::now() < deadline && n < n0 + 100_000 {
                        commit_crash_branch(&r, &crash_xid(task, n)).await;
                        n += 1;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

async fn commit_crash_branch(r: &KvResource, xid: &Xid) {
    r.begin(xid).await.unwrap();
    let branch = r.branch(xid);
    for key in crash_keys(xid) {
        branch
            .insert(&key, xid.to_string().as_bytes())
            .await
            .unwrap();
    }
    prepared(r, xid).await;
    println!("prepared {}", xid.seq);
    r.commit(xid).await.unwrap();
    println!("committed {}", xid.seq);
}

/// Runs the crash child on `dir` until it printed `kill_after` commits, kills it with SIGKILL
/// and returns the seqs it reported prepared and committed.
fn run_and_kill(dir: &Path, kill_after: usize) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let mut child = spawn_child(CRASH_TEST, CRASH_DIR_ENV, dir);
    let (tx, rx) = mpsc::channel();
    read_lines(child.0.stdout.take().unwrap(), tx);
    let stderr = read_stderr(child.0.stderr.take().unwrap());
    let (mut prepared, mut committed) = (BTreeSet::new(), BTreeSet::new());
    let deadline = Instant::now() + CHILD_DEADLINE;
    let mut ended = false;
    while committed.len() < kill_after {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => note(&line, &mut prepared, &mut committed),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => {
                ended = true;
                break;
            }
        }
    }
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    // Lines printed before the kill and not read yet.
    let drain_until = Instant::now() + Duration::from_secs(5);
    while let Ok(line) = rx.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
        note(&line, &mut prepared, &mut committed);
    }
    let stderr = stderr.join().unwrap();
    assert!(
        !ended && status.signal() == Some(9),
        "the child ended by itself ({status}) after {} commits; its stderr:\n{stderr}",
        committed.len()
    );
    assert!(
        committed.len() >= kill_after,
        "only {} commits within {CHILD_DEADLINE:?}; the child's stderr:\n{stderr}",
        committed.len()
    );
    (prepared, committed)
}

/// Notes one line of the crash child (the first may follow libtest's `test … ... `).
fn note(line: &str, prepared: &mut BTreeSet<u64>, committed: &mut BTreeSet<u64>) {
    let word = |word: &str| {
        let at = line.rfind(word)?;
        line[at + word.len()..].parse::<u64>().ok()
    };
    if let Some(seq) = word("prepared ") {
        prepared.insert(seq);
    } else if let Some(seq) = word("committed ") {
        committed.insert(seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_killed_while_it_commits_leaves_every_branch_whole() {
    let dir = tempfile::tempdir().unwrap();
    for kill_after in KILL_AFTER_COMMITS {
        let (prepared, committed) = run_and_kill(dir.path(), kill_after);
        let r = open(dir.path());
        let in_doubt: BTreeSet<Xid> = r.recover().await.unwrap().into_iter().collect();
        let mut seen_in_doubt = 0;
        // Every branch a committer may have begun: up to a few past the last one reported.
        for task in 0..COMMITTERS {
            let reported = prepared
                .iter()
                .filter(|seq| *seq >> 32 == task)
                .max()
                .map_or(1 << 16, |seq| (seq & 0xffff_ffff) + 1);
            for n in (1 << 16)..reported + 2 {
                let xid = crash_xid(task, n);
                let [a, b] = crash_keys(&xid);
                let (a, b) = (r.get(&a).await.unwrap(), r.get(&b).await.unwrap());
                assert_eq!(
                    a.is_some(),
                    b.is_some(),
                    "{xid}: half of its writes applied"
                );
                let is_prepared = in_doubt.contains(&xid);
                if is_prepared {
                    seen_in_doubt += 1;
                    assert!(a.is_none(), "{xid}: applied and still prepared");
                }
                if committed.contains(&xid.seq) {
                    assert!(a.is_some() && !is_prepared, "{xid}: committed, then lost");
                }
                if prepared.contains(&xid.seq) {
                    assert!(a.is_some() || is_prepared, "{xid}: prepared, then lost");
                }
            }
        }
        assert_eq!(
            seen_in_doubt,
            in_doubt.len(),
            "prepared branches nobody began"
        );
        // Resolve what the kill left, as the coordinator would, so the next child starts clean.
        for xid in &in_doubt {
            r.commit(xid).await.unwrap();
            let [a, b] = crash_keys(xid);
            assert!(r.get(&a).await.unwrap().is_some() && r.get(&b).await.unwrap().is_some());
        }
    }
}

// Fencing.

#[tokio::test]
async fn a_fence_raised_after_begin_refuses_writes_and_the_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, a) = begun(&r).await;
    a.insert(b"k", b"v").await.unwrap();
    r.fence(Epoch(xid.epoch.0 + 1)).await.unwrap();
    let fenced = |result: Result<_, ResourceError>| match result {
        Err(ResourceError::Fenced {
            resource,
            offered,
            current,
        }) => {
            assert_eq!(resource, "kv");
            assert_eq!((offered, current), (xid.epoch, Epoch(xid.epoch.0 + 1)));
        }
        other => panic!("expected Fenced, got {other:?}"),
    };
    fenced(a.insert(b"k2", b"v").await);
    fenced(r.prepare(&xid).await.map(|_| ()));
    assert_eq!(r.recover().await.unwrap(), vec![]);
    r.rollback(&xid).await.unwrap();
    drop((a, r));
    let db = sled_db(dir.path());
    assert_eq!(tree_keys(&db, kv::PREPARED_TREE), Vec::<Vec<u8>>::new());
}

/// The fenced instance (the old owner) can no longer resolve a branch it prepared before the
/// fence; an instance opened afterwards (the new owner) resolves it.
#[tokio::test]
async fn a_branch_prepared_before_the_fence_is_resolved_by_the_next_owner() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, a) = begun(&r).await;
    a.insert(b"k", b"v").await.unwrap();
    prepared(&r, &xid).await;
    r.fence(Epoch(xid.epoch.0 + 5)).await.unwrap();
    for result in [r.commit(&xid).await, r.rollback(&xid).await] {
        assert!(
            matches!(result, Err(ResourceError::Fenced { .. })),
            "{result:?}"
        );
    }
    assert_eq!(r.get(b"k").await.unwrap(), None);
    drop((a, r));
    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![xid]);
    r.commit(&xid).await.unwrap();
    assert_eq!(r.get(b"k").await.unwrap(), Some(b"v".to_vec()));
}

// Replay.

#[tokio::test]
async fn the_redo_is_the_documented_batch_and_replays_once() {
    let dir = tempfile::tempdir().unwrap();
    let primary = open(&dir.path().join("primary"));
    commit_insert(&primary, b"z", b"old").await;
    let (xid, a) = begun(&primary).await;
    a.insert(b"b", b"2").await.unwrap();
    a.insert(b"a", b"1").await.unwrap();
    a.remove(b"z").await.unwrap();
    let redo = prepared(&primary, &xid).await;
    let writes = vec![
        KvWrite::Insert {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
        },
        KvWrite::Insert {
            key: b"b".to_vec(),
            value: b"2".to_vec(),
        },
        KvWrite::Remove { key: b"z".to_vec() },
    ];
    assert_eq!(decode_batch(&redo).unwrap(), writes);
    assert_eq!(encode_batch(&writes).unwrap(), redo);

    let standby = open(&dir.path().join("standby"));
    let seed = encode_batch(&[KvWrite::Insert {
        key: b"z".to_vec(),
        value: b"old".to_vec(),
    }])
    .unwrap();
    standby.replay(&seed, Lsn(1)).await.unwrap();
    standby.replay(&redo, Lsn(2)).await.unwrap();
    assert_eq!(standby.get(b"a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(standby.get(b"z").await.unwrap(), None);
    // The seed again at a higher LSN would bring z back; at its own LSN it changes nothing.
    standby.replay(&seed, Lsn(1)).await.unwrap();
    standby.replay(&seed, Lsn(2)).await.unwrap();
    assert_eq!(standby.get(b"z").await.unwrap(), None);
    assert_eq!(standby.applied_lsn().await.unwrap(), Lsn(2));
}

#[tokio::test]
async fn a_malformed_redo_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let good = encode_batch(&[KvWrite::Insert {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    }])
    .unwrap();
    for bad in [
        vec![],
        vec![9],
        good[..good.len() - 1].to_vec(),
        [good.as_slice(), &[0]].concat(),
    ] {
        let message = rejected(r.replay(&bad, Lsn(5)).await);
        assert!(message.contains("malformed redo"), "{message}");
    }
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn::ZERO);
    assert_eq!(r.get(b"k").await.unwrap(), None);
    r.replay(&good, Lsn(5)).await.unwrap();
    assert_eq!(r.get(b"k").await.unwrap(), Some(b"v".to_vec()));
}

// Limits.

#[tokio::test]
async fn keys_values_and_batches_over_their_limits_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, a) = begun(&r).await;
    let long_key = vec![b'k'; KEY_BYTES_MAX + 1];
    for message in [
        rejected(a.insert(&long_key, b"v").await),
        rejected(a.remove(&long_key).await),
        rejected(a.get(&long_key).await),
    ] {
        assert!(
            message.contains("resource kv")
                && message.contains(&format!("{} bytes", KEY_BYTES_MAX + 1))
                && message.contains("KEY_BYTES_MAX"),
            "{message}"
        );
    }
    a.insert(&vec![b'k'; KEY_BYTES_MAX], b"longest key")
        .await
        .unwrap();

    let long_value = vec![0u8; VALUE_BYTES_MAX as usize + 1];
    let message = rejected(a.insert(b"v", &long_value).await);
    assert!(
        message.contains(&format!("{} bytes", VALUE_BYTES_MAX + 1))
            && message.contains(&format!("value_bytes_max = {VALUE_BYTES_MAX}"))
            && message.contains("key \"v\""),
        "{message}"
    );
    // Three values of 1 MiB do not fit a batch of 3 MiB with their keys.
    let value = vec![0u8; VALUE_BYTES_MAX as usize];
    a.insert(b"v1", &value).await.unwrap();
    a.insert(b"v2", &value).await.unwrap();
    let message = rejected(a.insert(b"v3", &value).await);
    assert!(
        message.contains(&format!("batch_bytes_max = {BATCH_BYTES_MAX}"))
            && message.contains("key \"v3\""),
        "{message}"
    );
    // Replacing a write re-counts it: a smaller value for v2 makes room for v3.
    a.insert(b"v2", b"small").await.unwrap();
    a.insert(b"v3", &value).await.unwrap();

    // Nothing refused was recorded, nor locked: another branch writes those keys at once.
    let (other, b) = begun(&r).await;
    b.insert(b"v", b"free").await.unwrap();
    assert_eq!(a.get(b"v").await.unwrap(), None);
    let redo = prepared(&r, &xid).await;
    let keys: Vec<Vec<u8>> = decode_batch(&redo)
        .unwrap()
        .iter()
        .map(|w| w.key().to_vec())
        .collect();
    let longest = vec![b'k'; KEY_BYTES_MAX];
    assert_eq!(
        keys,
        vec![longest, b"v1".to_vec(), b"v2".to_vec(), b"v3".to_vec()]
    );
    assert!(redo.len() as u64 <= BATCH_BYTES_MAX);
    r.commit(&xid).await.unwrap();
    r.rollback(&other).await.unwrap();
}

// Damage by hand.

/// Writes `key` = `value` into sled tree `tree` of `dir` directly (the resource closed).
fn damage(dir: &Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = sled_db(dir);
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

#[tokio::test]
async fn a_corrupt_prepared_entry_refuses_to_open_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, a) = begun(&r).await;
    a.insert(b"k", b"v").await.unwrap();
    let redo = prepared(&r, &xid).await;
    drop((a, r));

    let key = xid.to_string();
    for (bad, expected) in [
        (vec![], "truncated"),
        (vec![2, 0, 0, 0, 0], "version 2"),
        ([redo.as_slice(), b"x"].concat(), "trailing"),
        (vec![1, 255, 255, 255, 255], "BATCH_WRITES_MAX"),
    ] {
        damage(dir.path(), kv::PREPARED_TREE, key.as_bytes(), &bad);
        let message = fatal(KvResource::open("kv", dir.path(), config()));
        assert!(
            message.contains("resource kv")
                && message.contains(&key)
                && message.contains(expected)
                && message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }
    // Repaired by hand, it opens and the branch is prepared again.
    damage(dir.path(), kv::PREPARED_TREE, key.as_bytes(), &redo);
    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![xid]);
    r.commit(&xid).await.unwrap();
    drop(r);

    damage(dir.path(), kv::PREPARED_TREE, b"not an xid", &redo);
    let message = fatal(KvResource::open("kv", dir.path(), config()));
    assert!(message.contains("not an xid"), "{message}");
}

#[tokio::test]
async fn two_prepared_entries_writing_one_key_refuse_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, a) = begun(&r).await;
    a.insert(b"k", b"v").await.unwrap();
    let redo = prepared(&r, &xid).await;
    drop((a, r));
    let copy = xid_at(0);
    damage(
        dir.path(),
        kv::PREPARED_TREE,
        copy.to_string().as_bytes(),
        &redo,
    );
    let message = fatal(KvResource::open("kv", dir.path(), config()));
    assert!(message.contains("both write key \"k\""), "{message}");
}

#[tokio::test]
async fn a_damaged_meta_value_refuses_to_open_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    r.fence(Epoch(3)).await.unwrap();
    drop(r);
    damage(dir.path(), kv::META_TREE, b"fence", &[1, 2, 3]);
    let message = fatal(KvResource::open("kv", dir.path(), config()));
    assert!(
        message.contains("fence") && message.contains("3 bytes"),
        "{message}"
    );
    damage(
        dir.path(),
        kv::META_TREE,
        b"fence",
        &[1, 3, 0, 0, 0, 0, 0, 0, 0],
    );
    let r = open(dir.path());
    assert_eq!(r.fence_epoch().await.unwrap(), Epoch(3));
}
