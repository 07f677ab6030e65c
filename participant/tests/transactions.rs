//! One transaction through the participant API, end to end on files resources: commit, commit
//! twice, handles after the end, unknown resources, drop, rollback, read-only commits, path-lock
//! conflicts, a failed prepare, a full disk, the transaction timeout, and a restart.

#![allow(clippy::unwrap_used)]

mod common;

use common::{
    STEP_DEADLINE, close, commit, commits, committed_lsn, open, record_kinds, rolled_back_reason,
    within,
};

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use adapters::{Lsn, Xid};

use coordinator::CoordError;

use participant::{ConcordError, Config, ResourceConfig, RollbackCause, Transaction};

/// Bound on every step that waits (open, a put, a commit, phase 2, close).
/// How long a writer waits for a path another branch holds, in these tests.
const LOCK_WAIT_MS: u64 = 2_000;

/// Serializes spawning a process (`mount`, `umount`) with closing and reopening a concord.
///
/// A files resource's `LOCK` is an `flock` on an open file description, and a child process holds
/// a copy of every descriptor from its `fork` until its `exec` closes them: a concord closed by one
/// test while another test spawns `mount` can stay locked for that moment, and reopening it is
/// refused ("another instance has this root open"). Holding this lock around both keeps the tests
/// of this binary from seeing each other's children.
static SPAWN: Mutex<()> = Mutex::new(());

fn spawn_guard() -> MutexGuard<'static, ()> {
    SPAWN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The embedded configuration (`uploads` and `thumbnails` under `dir`) with a short lock wait.
fn config(dir: &Path) -> Config {
    let mut config = Config::embedded(dir);
    for resource in config.resources.values_mut() {
        if let ResourceConfig::Files { lock_wait_ms, .. } = resource {
            *lock_wait_ms = LOCK_WAIT_MS;
        }
    }
    config
}

fn files_resource(root: PathBuf) -> ResourceConfig {
    ResourceConfig::Files {
        root,
        create: true,
        lock_wait_ms: LOCK_WAIT_MS,
    }
}

/// Puts `content` at `path` of resource `name` within `tx`.
async fn put(tx: &Transaction, name: &str, path: &str, content: &[u8]) {
    let files = within("join", tx.files(name)).await.unwrap();
    within("put", files.put(path, content)).await.unwrap();
}

/// The `Commit` records of `xid`: (LSN, resource names of the writers).
fn commits_of(data_dir: &Path, xid: Xid) -> Vec<(Lsn, Vec<String>)> {
    commits(data_dir)
        .into_iter()
        .filter(|(_, (x, _))| *x == xid)
        .map(|(lsn, (_, writers))| (lsn, writers.into_iter().map(|(name, _)| name).collect()))
        .collect()
}

/// The staged files of `xid` under `root` (content over `INLINE_FILE_BYTES_MAX` is staged in a
/// file; smaller content in memory).
fn staged_of(root: &Path, xid: Xid) -> Vec<PathBuf> {
    let prefix = format!("{xid}.");
    let Ok(entries) = fs::read_dir(root.join(".concord").join("staging")) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_across_two_resources_makes_both_files_visible() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    put(&tx, "uploads", "invoices/42.pdf", b"%PDF-1.7 invoice 42").await;
    put(&tx, "thumbnails", "invoices/42.png", b"PNG thumbnail 42").await;
    assert!(!dir.path().join("uploads/invoices/42.pdf").exists());

    let outcome = commit(&mut tx).await;
    let lsn = committed_lsn(&outcome);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    let upload = fs::read(dir.path().join("uploads/invoices/42.pdf")).unwrap();
    let thumbnail = fs::read(dir.path().join("thumbnails/invoices/42.png")).unwrap();
    assert_eq!(upload, b"%PDF-1.7 invoice 42");
    assert_eq!(thumbnail, b"PNG thumbnail 42");

    let mut names = vec!["thumbnails".to_string(), "uploads".to_string()];
    let mut recorded = commits_of(dir.path(), tx.xid());
    recorded.iter_mut().for_each(|(_, n)| n.sort());
    names.sort();
    assert_eq!(
        recorded,
        vec![(lsn, names)],
        "one Commit record, at the outcome's LSN, naming both writers"
    );
    drop(tx);
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committing_twice_returns_the_first_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    put(&tx, "uploads", "once.txt", b"once").await;
    let first = commit(&mut tx).await;
    let second = commit(&mut tx).await;
    assert_eq!(first, second);
    assert_eq!(first.xid, tx.xid());
    let after_rollback = within("rollback", tx.rollback()).await.unwrap_err();
    assert!(
        matches!(
            after_rollback,
            ConcordError::Finished {
                state: "committed",
                ..
            }
        ),
        "rolling back a committed transaction is refused: {after_rollback:?}"
    );
    assert_eq!(commit(&mut tx).await, first, "and leaves it committed");
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        commits_of(dir.path(), tx.xid()).len(),
        1,
        "the second commit must not journal a second decision"
    );
    drop(tx);
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_handle_used_after_commit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    let uploads = within("join", tx.files("uploads")).await.unwrap();
    within("put", uploads.put("kept.txt", &b"kept"[..]))
        .await
        .unwrap();
    committed_lsn(&commit(&mut tx).await);
    let xid = tx.xid().to_string();

    let late_put = within("late put", uploads.put("late.txt", &b"late"[..]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            late_put,
            ConcordError::Coordinator(CoordError::NotActive { .. })
        ),
        "{late_put:?}"
    );
    let message = late_put.to_string();
    assert!(
        message.contains(&xid) && message.contains("not open") && message.contains("no more work"),
        "{message}"
    );
    let late_delete = within("late delete", uploads.delete("kept.txt"))
        .await
        .unwrap_err();
    assert!(
        late_delete.to_string().contains("not open"),
        "{late_delete}"
    );
    let late_read = within("late read", uploads.read("kept.txt"))
        .await
        .unwrap_err();
    assert!(late_read.to_string().contains("not open"), "{late_read}");

    let late_join = within("late join", tx.files("thumbnails"))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            late_join,
            ConcordError::Finished {
                state: "committed",
                ..
            }
        ),
        "{late_join:?}"
    );
    let message = late_join.to_string();
    assert!(
        message.contains(&xid) && message.contains("already committed"),
        "{message}"
    );

    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        fs::read(dir.path().join("uploads/kept.txt")).unwrap(),
        b"kept"
    );
    assert!(!dir.path().join("uploads/late.txt").exists());
    drop((uploads, tx));
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_resource_is_named_with_the_configured_ones() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    let error = within("join", tx.files("nope")).await.err().unwrap();
    assert!(
        matches!(
            error,
            ConcordError::Coordinator(CoordError::UnknownResource { .. })
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("\"nope\"")
            && message.contains("uploads")
            && message.contains("thumbnails"),
        "{message}"
    );

    // The transaction is still usable.
    put(&tx, "uploads", "after.txt", b"after").await;
    committed_lsn(&commit(&mut tx).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        fs::read(dir.path().join("uploads/after.txt")).unwrap(),
        b"after"
    );
    drop(tx);
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_open_transaction_rolls_it_back_and_frees_its_paths() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let dropped = {
        let tx = concord.begin().await.unwrap();
        put(&tx, "uploads", "report.txt", b"draft").await;
        put(&tx, "thumbnails", "report.png", b"draft thumbnail").await;
        tx.xid()
    };

    // At once, without waiting for the rollback: the path must be released within the lock wait.
    let mut later = concord.begin().await.unwrap();
    let uploads = within("join", later.files("uploads")).await.unwrap();
    let started = Instant::now();
    let written = within("put", uploads.put("report.txt", &b"final"[..])).await;
    assert!(
        written.is_ok(),
        "the dropped transaction kept its path locked: {:?}",
        written.err()
    );
    assert!(started.elapsed() < Duration::from_millis(LOCK_WAIT_MS));
    assert!(!dir.path().join("uploads/report.txt").exists());
    put(&later, "thumbnails", "report.png", b"final thumbnail").await;
    committed_lsn(&commit(&mut later).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);

    assert_eq!(
        fs::read(dir.path().join("uploads/report.txt")).unwrap(),
        b"final"
    );
    let thumbnail = fs::read(dir.path().join("thumbnails/report.png")).unwrap();
    assert_eq!(thumbnail, b"final thumbnail");
    assert!(commits_of(dir.path(), dropped).is_empty());
    assert!(staged_of(&dir.path().join("uploads"), dropped).is_empty());
    assert!(staged_of(&dir.path().join("thumbnails"), dropped).is_empty());
    drop((uploads, later));
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_makes_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    put(&tx, "uploads", "a/never.txt", b"never").await;
    put(&tx, "thumbnails", "a/never.png", b"never").await;
    let rolled_back = within("rollback", tx.rollback()).await.unwrap();
    assert_eq!(rolled_back.xid, tx.xid());
    assert!(
        matches!(&rolled_back.cause, RollbackCause::Requested { reason } if reason.contains("rolled back by the application")),
        "{rolled_back:?}"
    );
    assert_eq!(
        within("rollback", tx.rollback()).await.unwrap(),
        rolled_back
    );
    let committed = within("commit", tx.commit()).await;
    assert!(
        matches!(
            &committed,
            Err(error @ ConcordError::RolledBack { xid, branch: None, cause })
                if *xid == tx.xid() && *cause == rolled_back.cause && !error.is_retryable()
        ),
        "committing a rolled-back transaction answers that it rolled back: {committed:?}"
    );
    assert!(concord.wait_idle(STEP_DEADLINE).await);

    for (root, path) in [("uploads", "a/never.txt"), ("thumbnails", "a/never.png")] {
        let root = dir.path().join(root);
        assert!(!root.join(path).exists(), "{path} is visible");
        assert!(
            !root.join("a").exists(),
            "a directory of {path} was created"
        );
        assert!(staged_of(&root, tx.xid()).is_empty());
    }
    assert!(commits_of(dir.path(), tx.xid()).is_empty());
    drop(tx);
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prepare_rolls_back_every_branch_and_names_the_resource() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    // Large enough to be staged in a file.
    let photo = vec![0xFFu8; adapters::files::INLINE_FILE_BYTES_MAX as usize + 1];
    put(&tx, "uploads", "photo.jpg", &photo).await;
    put(&tx, "thumbnails", "photo.png", b"PNG thumbnail").await;
    // Damage the uploads branch by hand: its staged content vanishes, so prepare must fail.
    let uploads_root = dir.path().join("uploads");
    let staged = staged_of(&uploads_root, tx.xid());
    assert_eq!(staged.len(), 1);
    fs::remove_file(&staged[0]).unwrap();

    let answer = within("commit", tx.commit()).await;
    assert!(
        matches!(
            &answer,
            Err(ConcordError::RolledBack {
                branch: Some(branch),
                cause: RollbackCause::Branch { error, .. },
                ..
            }) if branch == "uploads" && error.resource() == "uploads"
        ),
        "the error does not carry the failing branch: {answer:?}"
    );
    assert!(
        !answer.as_ref().unwrap_err().is_retryable(),
        "lost staged content is not cured by a retry"
    );
    let reason = rolled_back_reason(&answer);
    assert!(
        reason.contains("uploads") && reason.contains("staged content"),
        "the reason does not name the failing resource: {reason}"
    );
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert!(!dir.path().join("thumbnails/photo.png").exists());
    assert!(!dir.path().join("uploads/photo.jpg").exists());
    assert!(staged_of(&dir.path().join("thumbnails"), tx.xid()).is_empty());
    assert!(commits_of(dir.path(), tx.xid()).is_empty());
    let prepared = adapters::files::prepared_on_disk(&dir.path().join("thumbnails")).unwrap();
    assert!(prepared.is_empty(), "left prepared: {prepared:?}");

    // Both paths are free again.
    let mut again = concord.begin().await.unwrap();
    put(&again, "uploads", "photo.jpg", b"JPEG photo, again").await;
    put(&again, "thumbnails", "photo.png", b"PNG thumbnail, again").await;
    committed_lsn(&commit(&mut again).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    let thumbnail = fs::read(dir.path().join("thumbnails/photo.png")).unwrap();
    assert_eq!(thumbnail, b"PNG thumbnail, again");
    drop((tx, again));
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_writes_nothing_commits_without_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut setup = concord.begin().await.unwrap();
    put(&setup, "uploads", "seen.txt", b"seen").await;
    committed_lsn(&commit(&mut setup).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);

    let mut empty = concord.begin().await.unwrap();
    let nothing = commit(&mut empty).await;
    assert_eq!((nothing.xid, nothing.lsn), (empty.xid(), None));
    let mut reader = concord.begin().await.unwrap();
    let uploads = within("join", reader.files("uploads")).await.unwrap();
    let read = within("read", uploads.read("seen.txt")).await.unwrap();
    assert_eq!(read, b"seen");
    assert_eq!(commit(&mut reader).await.lsn, None);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert!(commits_of(dir.path(), empty.xid()).is_empty());
    assert!(commits_of(dir.path(), reader.xid()).is_empty());
    assert!(staged_of(&dir.path().join("uploads"), reader.xid()).is_empty());
    drop((setup, empty, uploads, reader));
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waiting_past_the_lock_wait_gets_a_conflict_naming_the_path_and_holder() {
    const SHORT_WAIT_MS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    for resource in config.resources.values_mut() {
        if let ResourceConfig::Files { lock_wait_ms, .. } = resource {
            *lock_wait_ms = SHORT_WAIT_MS;
        }
    }
    let concord = open(config).await;
    let mut holder = concord.begin().await.unwrap();
    put(&holder, "uploads", "contended.txt", b"holder").await;

    let mut waiter = concord.begin().await.unwrap();
    let uploads = within("join", waiter.files("uploads")).await.unwrap();
    let started = Instant::now();
    let error = within("put", uploads.put("contended.txt", &b"waiter"[..]))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(
            error,
            ConcordError::Resource(adapters::ResourceError::Conflict { .. })
        ),
        "{error:?}"
    );
    assert!(
        error.is_retryable(),
        "a conflict may pass: the transaction can be run again"
    );
    let message = error.to_string();
    assert!(
        message.contains("uploads")
            && message.contains("contended.txt")
            && message.contains(&holder.xid().to_string()),
        "{message}"
    );
    assert!(waited >= Duration::from_millis(SHORT_WAIT_MS), "{waited:?}");

    // The waiter is still open: its other writes commit, and so do the holder's.
    within("put", uploads.put("other.txt", &b"waiter"[..]))
        .await
        .unwrap();
    committed_lsn(&commit(&mut waiter).await);
    committed_lsn(&commit(&mut holder).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    let contended = fs::read(dir.path().join("uploads/contended.txt")).unwrap();
    assert_eq!(contended, b"holder");
    assert_eq!(
        fs::read(dir.path().join("uploads/other.txt")).unwrap(),
        b"waiter"
    );
    drop((uploads, holder, waiter));
    close(concord).await;
}

/// BUG (participant/src/lib.rs, `FilesHandle::put`, and likewise `delete`): the handle checks
/// that the transaction is open only before it calls the branch. When the timeout reaper rolls
/// the branch back while the put waits for a path lock, the waiting put fails with the files
/// resource's generic "branch … is not open here; begin it first" (adapters/src/files.rs,
/// `active_branch`) instead of the transaction's timed-out error, and the advice is wrong: the
/// application did begin it; it timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_waiting_for_a_path_when_its_transaction_times_out_reports_the_timeout() {
    // The waiter times out while it waits; the holder, begun half a timeout later, does not yet
    // (the reaper ticks every quarter timeout, so the margin is at least a tick).
    const TIMEOUT_MS: u64 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.txn_timeout_ms = TIMEOUT_MS;
    for resource in config.resources.values_mut() {
        if let ResourceConfig::Files { lock_wait_ms, .. } = resource {
            *lock_wait_ms = 4 * TIMEOUT_MS;
        }
    }
    let concord = open(config).await;
    let waiter = concord.begin().await.unwrap();
    let uploads = within("join", waiter.files("uploads")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS / 2)).await;
    let holder = concord.begin().await.unwrap();
    put(&holder, "uploads", "contended.txt", b"holder").await;

    let error = within("put", uploads.put("contended.txt", &b"waiter"[..]))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&waiter.xid().to_string())
            && message.contains(&format!("open longer than {TIMEOUT_MS} ms")),
        "a put cut short by the transaction timeout must say so: {message}"
    );
    drop((uploads, waiter, holder));
    close(concord).await;
}

/// A tmpfs mounted on a directory for the life of the guard.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let _spawning = spawn_guard();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Tmpfs {
                dir: dir.to_path_buf(),
            },
            other => panic!(
                "this test needs root to mount a small tmpfs (mount -t tmpfs -o size={size} tmpfs {}); \
                 run it as root: {other:?}",
                dir.display()
            ),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _spawning = spawn_guard();
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a failing test's leftovers): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Writes `path` until the file system is full.
fn fill_up(path: &Path) {
    let mut file = fs::File::create(path).unwrap();
    let block = [0xAAu8; 4096];
    loop {
        match file.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::StorageFull => return,
            Err(e) => panic!("fill {}: {e}", path.display()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_prepare_rolls_back_and_keeps_the_journal_sound() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let _tmpfs = Tmpfs::mount(&small, "1m");
    let uploads_root = small.join("uploads");
    let thumbnails_root = dir.path().join("thumbnails");
    let data_dir = dir.path().join("data");
    let config = Config {
        node: 1,
        data_dir: data_dir.clone(),
        epoch: 1,
        txn_timeout_ms: 30_000,
        orphan_sweep_ms: 60_000,
        one_phase: true,
        call_timeout_ms: 30_000,
        daemon: Default::default(),
        replication: Default::default(),
        standby: None,
        failover: None,
        resources: BTreeMap::from([
            ("uploads".to_string(), files_resource(uploads_root.clone())),
            (
                "thumbnails".to_string(),
                files_resource(thumbnails_root.clone()),
            ),
        ]),
    };
    let concord = open(config).await;

    let mut tx = concord.begin().await.unwrap();
    put(&tx, "uploads", "video.bin", &vec![7u8; 256 << 10]).await;
    put(&tx, "thumbnails", "video.png", b"thumbnail").await;
    fill_up(&small.join("filler"));
    let committed = within("commit", tx.commit()).await;
    match &committed {
        Err(ConcordError::RolledBack { .. }) => {
            let reason = rolled_back_reason(&committed);
            assert!(reason.contains("uploads"), "{reason}");
        }
        Err(e) => assert!(e.to_string().contains("uploads"), "{e}"),
        Ok(committed) => panic!("committed on a full disk: {committed:?}"),
    }
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert!(!uploads_root.join("video.bin").exists());
    assert!(!thumbnails_root.join("video.png").exists());
    assert!(staged_of(&thumbnails_root, tx.xid()).is_empty());
    // `commits` fails the test when the journal does not scan cleanly.
    assert!(commits_of(&data_dir, tx.xid()).is_empty());

    fs::remove_file(small.join("filler")).unwrap();
    let mut after = concord.begin().await.unwrap();
    put(&after, "uploads", "video.bin", b"fits now").await;
    put(&after, "thumbnails", "video.png", b"thumbnail now").await;
    let lsn = committed_lsn(&commit(&mut after).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        fs::read(uploads_root.join("video.bin")).unwrap(),
        b"fits now"
    );
    let thumbnail = fs::read(thumbnails_root.join("video.png")).unwrap();
    assert_eq!(thumbnail, b"thumbnail now");
    assert_eq!(commits_of(&data_dir, after.xid()).len(), 1);
    assert_eq!(commits_of(&data_dir, after.xid())[0].0, lsn);
    drop((tx, after));
    // Closed before the tmpfs guard unmounts: the resource holds files open on it.
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_past_its_timeout_is_refused_at_commit() {
    const TIMEOUT_MS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.txn_timeout_ms = TIMEOUT_MS;
    let concord = open(config).await;
    let mut tx = concord.begin().await.unwrap();
    let uploads = within("join", tx.files("uploads")).await.unwrap();
    within("put", uploads.put("slow.txt", &b"slow"[..]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3 * TIMEOUT_MS)).await;

    let late_put = within("put", uploads.put("later.txt", &b"later"[..]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            late_put,
            ConcordError::Coordinator(CoordError::TimedOut { .. })
        ),
        "{late_put:?}"
    );
    let error = within("commit", tx.commit()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConcordError::RolledBack {
                branch: None,
                cause: RollbackCause::TimedOut {
                    timeout_ms: TIMEOUT_MS
                },
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error.is_retryable(),
        "a timed-out transaction may be run again"
    );
    let message = error.to_string();
    assert!(
        message.contains(&tx.xid().to_string())
            && message.contains(&format!("open longer than {TIMEOUT_MS} ms"))
            && message.contains("rolled back"),
        "{message}"
    );
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert!(!dir.path().join("uploads/slow.txt").exists());
    assert!(!dir.path().join("uploads/later.txt").exists());
    assert!(staged_of(&dir.path().join("uploads"), tx.xid()).is_empty());
    assert!(commits_of(dir.path(), tx.xid()).is_empty());

    // The timed-out branch released its path: a new transaction (well inside the timeout) writes it.
    let mut next = concord.begin().await.unwrap();
    put(&next, "uploads", "slow.txt", b"quick").await;
    committed_lsn(&commit(&mut next).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        fs::read(dir.path().join("uploads/slow.txt")).unwrap(),
        b"quick"
    );
    drop((uploads, tx, next));
    close(concord).await;
}

// Holds the spawn guard across the close and the reopen on purpose (see `SPAWN`); the only
// other holders are `mount`/`umount` calls of other tests, on their own runtimes.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_files_survive_a_restart_with_nothing_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut xids = Vec::new();
    for i in 0..3 {
        let mut tx = concord.begin().await.unwrap();
        put(
            &tx,
            "uploads",
            &format!("doc-{i}.txt"),
            format!("doc {i}").as_bytes(),
        )
        .await;
        put(
            &tx,
            "thumbnails",
            &format!("doc-{i}.png"),
            format!("thumb {i}").as_bytes(),
        )
        .await;
        committed_lsn(&commit(&mut tx).await);
        xids.push(tx.xid());
    }
    let mut removal = concord.begin().await.unwrap();
    let uploads = within("join", removal.files("uploads")).await.unwrap();
    within("delete", uploads.delete("doc-0.txt")).await.unwrap();
    drop(uploads);
    committed_lsn(&commit(&mut removal).await);
    xids.push(removal.xid());
    drop(removal);
    let config = config(dir.path());

    let reopened = {
        let _spawning = spawn_guard();
        close(concord).await;
        open(config).await
    };
    let report = reopened.recovery();
    assert!(
        report.redriven.is_empty() && report.rolled_back.is_empty() && report.problems.is_empty(),
        "a clean close left work for recovery: {report:?}"
    );
    assert!(!dir.path().join("uploads/doc-0.txt").exists());
    for i in 1..3 {
        let upload = fs::read(dir.path().join(format!("uploads/doc-{i}.txt"))).unwrap();
        assert_eq!(upload, format!("doc {i}").as_bytes());
    }
    for i in 0..3 {
        let thumbnail = fs::read(dir.path().join(format!("thumbnails/doc-{i}.png"))).unwrap();
        assert_eq!(thumbnail, format!("thumb {i}").as_bytes());
    }

    // The reopened concord commits, with an xid after every earlier one.
    let mut tx = reopened.begin().await.unwrap();
    assert!(xids.iter().all(|x| *x < tx.xid()), "{xids:?} {}", tx.xid());
    let reader = within("join", tx.files("uploads")).await.unwrap();
    let read = within("read", reader.read("doc-1.txt")).await.unwrap();
    assert_eq!(read, b"doc 1");
    drop(reader);
    put(&tx, "uploads", "doc-3.txt", b"doc 3").await;
    committed_lsn(&commit(&mut tx).await);
    assert!(reopened.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        fs::read(dir.path().join("uploads/doc-3.txt")).unwrap(),
        b"doc 3"
    );
    xids.push(tx.xid());
    let recorded = commits(dir.path());
    for xid in &xids {
        let count = recorded.values().filter(|(x, _)| x == xid).count();
        assert_eq!(count, 1, "Commit records of {xid}");
    }
    drop(tx);
    close(reopened).await;
}

/// Closing makes every record appended so far durable and lets the journal go, even while a
/// transaction handle lives: another process (here: a journal opened afresh) can take it at
/// once, and the live transaction's commit fails instead of waiting. (The resources are let go
/// with the last handle.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_closes_the_journal_while_a_transaction_handle_lives() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut done = concord.begin().await.unwrap();
    put(&done, "uploads", "done.txt", b"done").await;
    committed_lsn(&commit(&mut done).await);
    let mut live = concord.begin().await.unwrap();
    put(&live, "uploads", "live.txt", b"live").await;
    close(concord).await;

    // The `End` of the committed transaction is appended without waiting for it: close wrote it.
    assert_eq!(
        record_kinds(dir.path()),
        vec![("Commit", done.xid()), ("End", done.xid())]
    );
    let journal = journal::Journal::open(
        dir.path().join("journal"),
        journal::JournalConfig::default(),
    )
    .expect("the journal is free once close returned");
    drop(journal);

    let refused = within("a commit after close", live.commit()).await;
    assert!(
        matches!(&refused, Err(e @ ConcordError::InDoubt { xid, .. }) if *xid == live.xid() && !e.is_retryable()),
        "a commit the coordinator stopped before its outcome was known is in doubt: {refused:?}"
    );
    assert!(!dir.path().join("uploads/live.txt").exists());
    drop((done, live));
}
