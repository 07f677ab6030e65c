//! The files resource: the conformance suite, path confinement (one test per refusal), locking
//! (conflicts, waiting, locks across a restart), reading one's own writes, limits, damage by hand,
//! a commit interrupted half-way, replay edge cases, the branch log (commits applied again at
//! open, checkpoints, trimming with carry-forward, inline content and its budget), a full disk
//! during prepare (on a 1 MiB tmpfs, which needs root), and a runtime shutting down under a
//! commit (no poisoning).

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::files::{
    FilesBranch, FilesConfig, FilesResource, INLINE_BRANCH_BYTES_MAX, INLINE_FILE_BYTES_MAX,
    PATH_BYTES_MAX, PRIVATE_DIR, RedoEntry, decode_redo, encode_redo, prepared_on_disk,
};
use adapters::testing::{self, Paused, Subject};
use adapters::{Epoch, ErrorClass, Lsn, Resource, ResourceError, RetainedBlobs, Vote, Xid};
use common::{rejected, xid_at};
use journal::BlobId;

/// Lock wait of every resource here: small, so that conflicts are quick to provoke.
const LOCK_WAIT_MS: u64 = 200;
/// Largest file a put accepts here.
const FILE_BYTES_MAX: u64 = 1 << 20;

fn config() -> FilesConfig {
    FilesConfig {
        lock_wait_ms_max: LOCK_WAIT_MS,
        create_if_missing: true,
        file_bytes_max: FILE_BYTES_MAX,
    }
}

fn open(root: &Path) -> Arc<FilesResource> {
    FilesResource::open("files", root, config()).unwrap()
}

/// A begun branch and its handle.
async fn begun(r: &FilesResource) -> (Xid, FilesBranch) {
    let xid = xid_at(0);
    r.begin(&xid).await.unwrap();
    (xid, r.branch(&xid))
}

/// Commits `content` at `path` in a transaction of its own.
async fn commit_file(r: &FilesResource, path: &str, content: &[u8]) {
    let (xid, branch) = begun(r).await;
    branch.put(path, content).await.unwrap();
    assert!(matches!(
        r.prepare(&xid).await.unwrap(),
        Vote::Commit { .. }
    ));
    r.commit(&xid).await.unwrap();
}

/// Asserts that a put at `path` is refused with a message naming the path and `reason`.
async fn assert_put_refused(r: &FilesResource, path: &str, reason: &str) {
    let (xid, branch) = begun(r).await;
    let message = rejected(branch.put(path, &b"x"[..]).await);
    assert!(
        message.contains(&format!("{path:?}")) && message.contains(reason),
        "refusal of {path:?} should name it and say {reason:?}: {message}"
    );
    r.rollback(&xid).await.unwrap();
}

fn files(r: &Arc<dyn Resource>) -> &FilesResource {
    r.as_any().downcast_ref::<FilesResource>().unwrap()
}

fn private(r: &FilesResource) -> PathBuf {
    r.root().join(PRIVATE_DIR)
}

/// The staged files of `xid` (content over `INLINE_FILE_BYTES_MAX` is staged in a file).
fn staged_files(r: &FilesResource, xid: &Xid) -> Vec<PathBuf> {
    let prefix = format!("{xid}.");
    entries(&private(r).join("staging"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

// The conformance suite.

/// The subject of the conformance suite: a primary and a standby root in one temp directory.
struct FilesSubject {
    dir: tempfile::TempDir,
}

impl FilesSubject {
    fn primary(&self) -> PathBuf {
        self.dir.path().join("primary")
    }

    fn standby(&self) -> PathBuf {
        self.dir.path().join("standby")
    }
}

fn tag_path(tag: u32) -> String {
    format!("effects/{tag}.txt")
}

fn tag_content(tag: u32) -> String {
    format!("effect {tag}\n")
}

/// Each effect also puts a file over `INLINE_FILE_BYTES_MAX`, which goes through the blob store,
/// so that the suite's replays ship blobs.
fn tag_large_path(tag: u32) -> String {
    format!("effects/{tag}.bin")
}

fn tag_large_content(tag: u32) -> Vec<u8> {
    content_of(tag, INLINE_FILE_BYTES_MAX as usize + 1 + (tag as usize % 7))
}

#[async_trait::async_trait]
impl Subject for FilesSubject {
    async fn open(&self) -> Arc<dyn Resource> {
        open(&self.primary())
    }

    async fn open_standby(&self) -> Arc<dyn Resource> {
        open(&self.standby())
    }

    async fn open_replica(&self, n: u32) -> Arc<dyn Resource> {
        open(&self.dir.path().join(format!("replica-{n}")))
    }

    async fn fail_next_replay(&self, resource: &Arc<dyn Resource>) {
        files(resource).fail_next_replay();
    }

    async fn write(&self, resource: &Arc<dyn Resource>, xid: &Xid, tag: u32) {
        let content = tag_content(tag);
        let branch = files(resource).branch(xid);
        branch
            .put(&tag_path(tag), content.as_bytes())
            .await
            .unwrap();
        branch
            .put(&tag_large_path(tag), &tag_large_content(tag)[..])
            .await
            .unwrap();
    }

    async fn visible(&self, resource: &Arc<dyn Resource>, tag: u32) -> bool {
        let root = files(resource).root();
        fs::read(root.join(tag_path(tag))).is_ok_and(|c| c == tag_content(tag).as_bytes())
            && fs::read(root.join(tag_large_path(tag))).is_ok_and(|c| c == tag_large_content(tag))
    }

    async fn pause_prepare(&self, resource: &Arc<dyn Resource>, xid: &Xid) -> Box<dyn Paused> {
        Box::new(files(resource).pause_prepare(xid))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_resource_passes_the_conformance_suite() {
    let subject = FilesSubject {
        dir: tempfile::tempdir().unwrap(),
    };
    testing::run_all(&subject).await;
}

// Opening.

#[tokio::test]
async fn a_missing_root_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nowhere");
    let config = FilesConfig {
        create_if_missing: false,
        ..config()
    };
    let message = rejected(FilesResource::open("files", &root, config).map(|_| ()));
    assert!(
        message.contains(&root.display().to_string()) && message.contains("does not exist"),
        "{message}"
    );
    assert!(!root.exists());
}

#[tokio::test]
async fn a_second_instance_on_the_same_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let message = rejected(FilesResource::open("files", dir.path(), config()).map(|_| ()));
    assert!(message.contains("another instance"), "{message}");
    drop(first);
    open(dir.path());
}

// Path confinement: one test per refusal.

#[tokio::test]
async fn an_absolute_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    assert_put_refused(&r, "/etc/passwd", "absolute").await;
}

#[tokio::test]
async fn a_dotdot_component_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(&dir.path().join("root"));
    assert_put_refused(&r, "../escape", "`..`").await;
    assert_put_refused(&r, "a/../../escape", "`..`").await;
    assert!(!dir.path().join("escape").exists());
}

#[tokio::test]
async fn empty_components_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    assert_put_refused(&r, "", "empty").await;
    assert_put_refused(&r, "a//b", "empty component").await;
    assert_put_refused(&r, "a/", "empty component").await;
}

#[tokio::test]
async fn a_dot_component_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    assert_put_refused(&r, "./a", "`.`").await;
}

#[tokio::test]
async fn a_nul_byte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    assert_put_refused(&r, "a\0b", "NUL").await;
}

#[tokio::test]
async fn an_over_long_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    assert_put_refused(&r, &"a".repeat(PATH_BYTES_MAX + 1), "PATH_BYTES_MAX").await;
}

#[tokio::test]
async fn the_private_area_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    assert_put_refused(&r, ".concord/prepared/n1e0s1", "private area").await;
    let (_, branch) = begun(&r).await;
    let message = rejected(branch.read(".concord/fence").await);
    assert!(message.contains("private area"), "{message}");
}

#[tokio::test]
async fn a_symlink_leading_outside_the_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret").unwrap();
    let root = dir.path().join("root");
    let r = open(&root);
    std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
    assert_put_refused(&r, "out/x", "symlink leading outside the root").await;
    let (_, branch) = begun(&r).await;
    let message = rejected(branch.read("out/secret").await);
    assert!(message.contains("outside the root"), "{message}");
    assert!(!outside.join("x").exists());
}

#[tokio::test]
async fn a_relative_symlink_escaping_deeper_down_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let r = open(&root);
    fs::create_dir_all(root.join("a")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("a/up")).unwrap();
    assert_put_refused(&r, "a/up/x", "a/up is a symlink leading outside the root").await;
}

#[tokio::test]
async fn a_symlink_as_the_last_component_leading_outside_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("secret"), b"secret").unwrap();
    let root = dir.path().join("root");
    let r = open(&root);
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
    let (_, branch) = begun(&r).await;
    let message = rejected(branch.read("link").await);
    assert!(message.contains("outside the root"), "{message}");
    assert_put_refused(&r, "link", "outside the root").await;
}

#[tokio::test]
async fn a_symlink_into_the_private_area_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    std::os::unix::fs::symlink(private(&r), r.root().join("p")).unwrap();
    assert_put_refused(&r, "p/prepared/n1e0s1", "private area").await;
}

#[tokio::test]
async fn a_dangling_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    std::os::unix::fs::symlink("/nonexistent/place", r.root().join("dangling")).unwrap();
    assert_put_refused(&r, "dangling/x", "symlink to nothing").await;
}

#[tokio::test]
async fn a_file_used_as_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    commit_file(&r, "f", b"file").await;
    assert_put_refused(&r, "f/x", "f is not a directory").await;
}

#[tokio::test]
async fn a_directory_used_as_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    fs::create_dir(r.root().join("d")).unwrap();
    assert_put_refused(&r, "d", "is a directory").await;
}

#[tokio::test]
async fn a_symlink_staying_inside_the_root_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    fs::create_dir(r.root().join("real")).unwrap();
    std::os::unix::fs::symlink("real", r.root().join("alias")).unwrap();
    commit_file(&r, "alias/f", b"through the alias").await;
    assert_eq!(
        fs::read(r.root().join("real/f")).unwrap(),
        b"through the alias"
    );
}

// Locking.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_gets_a_conflict_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (first, a) = begun(&r).await;
    a.put("shared", &b"a"[..]).await.unwrap();
    let (second, b) = begun(&r).await;
    let start = Instant::now();
    let result = b.put("shared", &b"b"[..]).await;
    let elapsed = start.elapsed();
    match result {
        Err(ResourceError::Conflict {
            what,
            holder,
            waited_ms,
            ..
        }) => {
            assert_eq!(what, "shared");
            assert_eq!(holder, first.to_string());
            assert!(waited_ms >= LOCK_WAIT_MS, "waited {waited_ms} ms");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(LOCK_WAIT_MS) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    // A delete waits for the same lock.
    assert!(matches!(
        b.delete("shared").await,
        Err(ResourceError::Conflict { .. })
    ));
    r.rollback(&second).await.unwrap();
    r.rollback(&first).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_proceeds_when_the_first_resolves_within_the_wait() {
    // Far longer than the first's commit (syncs included) takes on a loaded machine: the second
    // writer gets the path when the first commits, not when its wait runs out.
    const LONG_WAIT_MS: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let long_wait = FilesConfig {
        lock_wait_ms_max: LONG_WAIT_MS,
        ..config()
    };
    let r = FilesResource::open("files", dir.path(), long_wait).unwrap();
    let (first, a) = begun(&r).await;
    a.put("shared", &b"first"[..]).await.unwrap();
    r.prepare(&first).await.unwrap();
    let (second, b) = begun(&r).await;
    let start = Instant::now();
    let waiting = tokio::spawn(async move { b.put("shared", &b"second"[..]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the second writer did not wait");
    r.commit(&first).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), 6);
    assert!(
        start.elapsed() < Duration::from_millis(LONG_WAIT_MS),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(fs::read(r.root().join("shared")).unwrap(), b"first");
    r.prepare(&second).await.unwrap();
    r.commit(&second).await.unwrap();
    assert_eq!(fs::read(r.root().join("shared")).unwrap(), b"second");
}

#[tokio::test]
async fn a_file_and_a_path_below_it_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (first, a) = begun(&r).await;
    a.put("d/f", &b"a"[..]).await.unwrap();
    // The same branch cannot write a file and a path below it either.
    for path in ["d", "d/f/g"] {
        let message = rejected(a.put(path, &b"a"[..]).await);
        assert!(message.contains("below"), "{message}");
    }
    let (second, b) = begun(&r).await;
    for path in ["d", "d/f/g"] {
        match b.put(path, &b"b"[..]).await {
            Err(ResourceError::Conflict { what, holder, .. }) => {
                assert_eq!((what.as_str(), holder), (path, first.to_string()));
            }
            other => panic!("{path}: expected a conflict, got {other:?}"),
        }
    }
    assert!(b.put("d/sibling", &b"b"[..]).await.is_ok());
    r.rollback(&first).await.unwrap();
    r.rollback(&second).await.unwrap();
}

#[tokio::test]
async fn locks_of_prepared_branches_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (prepared, a) = begun(&r).await;
    a.put("p", &b"prepared"[..]).await.unwrap();
    r.prepare(&prepared).await.unwrap();
    let (_, c) = begun(&r).await;
    c.put("q", &b"never prepared"[..]).await.unwrap();
    drop((a, c, r));

    let r = open(dir.path());
    let (second, b) = begun(&r).await;
    match b.put("p", &b"second"[..]).await {
        Err(ResourceError::Conflict { holder, .. }) => assert_eq!(holder, prepared.to_string()),
        other => panic!("expected a conflict with the prepared branch, got {other:?}"),
    }
    b.put("q", &b"second"[..]).await.unwrap();
    r.commit(&prepared).await.unwrap();
    b.put("p", &b"second"[..]).await.unwrap();
    r.prepare(&second).await.unwrap();
    r.commit(&second).await.unwrap();
    assert_eq!(fs::read(r.root().join("p")).unwrap(), b"second");
    assert_eq!(fs::read(r.root().join("q")).unwrap(), b"second");
}

// Reading one's own writes.

#[tokio::test]
async fn a_branch_reads_its_own_writes_and_others_read_the_committed_tree() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    commit_file(&r, "doc", b"v1").await;
    let (writer, a) = begun(&r).await;
    let (_, b) = begun(&r).await;
    a.put("doc", &b"v2"[..]).await.unwrap();
    a.put("new", &b"new"[..]).await.unwrap();
    assert_eq!(a.read("doc").await.unwrap(), b"v2");
    assert_eq!(b.read("doc").await.unwrap(), b"v1");
    assert_eq!(a.read("new").await.unwrap(), b"new");
    let message = rejected(b.read("new").await);
    assert!(message.contains("No such file"), "{message}");
    let mut staged = String::new();
    io::Read::read_to_string(&mut a.open_read("doc").await.unwrap(), &mut staged).unwrap();
    assert_eq!(staged, "v2");
    a.delete("doc").await.unwrap();
    let message = rejected(a.read("doc").await);
    assert!(message.contains("doc not found"), "{message}");
    assert!(a.open_read("doc").await.is_err());
    assert_eq!(b.read("doc").await.unwrap(), b"v1");
    let Vote::Commit { redo } = r.prepare(&writer).await.unwrap() else {
        panic!("voted read-only")
    };
    assert_eq!(
        decode_redo(&redo).unwrap(),
        vec![
            RedoEntry::Delete { path: "doc".into() },
            RedoEntry::PutInline {
                path: "new".into(),
                content: b"new".to_vec(),
            },
        ]
    );
    r.commit(&writer).await.unwrap();
    assert!(!r.root().join("doc").exists());
    assert_eq!(b.read("new").await.unwrap(), b"new");
}

#[tokio::test]
async fn deleting_a_missing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (_, a) = begun(&r).await;
    let message = rejected(a.delete("missing").await);
    assert!(message.contains("missing not found"), "{message}");
}

// Limits, refusals and damage.

#[tokio::test]
async fn content_over_file_bytes_max_is_refused_and_nothing_is_staged() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, a) = begun(&r).await;
    let content = vec![1u8; FILE_BYTES_MAX as usize + 1];
    let message = rejected(a.put("big", &content[..]).await);
    assert!(message.contains("file_bytes_max"), "{message}");
    assert!(staged_files(&r, &xid).is_empty());
    assert_eq!(
        a.put("big", &content[..FILE_BYTES_MAX as usize])
            .await
            .unwrap(),
        FILE_BYTES_MAX
    );
    r.rollback(&xid).await.unwrap();
}

#[tokio::test]
async fn writes_of_an_unbegun_branch_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let branch = r.branch(&xid_at(0));
    let message = rejected(branch.put("x", &b"x"[..]).await);
    assert!(message.contains("begin it first"), "{message}");
    let message = rejected(r.prepare(branch.xid()).await);
    assert!(message.contains("unknown"), "{message}");
}

#[tokio::test]
async fn a_fenced_branch_can_neither_write_nor_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let old = xid_at(1);
    r.begin(&old).await.unwrap();
    let branch = r.branch(&old);
    branch.put("before", &b"x"[..]).await.unwrap();
    r.fence(Epoch(2)).await.unwrap();
    let fenced =
        |result: &Result<_, ResourceError>| matches!(result, Err(ResourceError::Fenced { .. }));
    assert!(fenced(&branch.put("after", &b"x"[..]).await.map(|_| ())));
    assert!(fenced(&r.prepare(&old).await.map(|_| ())));
    r.rollback(&old).await.unwrap();
}

#[tokio::test]
async fn a_staging_area_deleted_by_hand_fails_prepare_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, a) = begun(&r).await;
    let large = vec![5u8; INLINE_FILE_BYTES_MAX as usize + 1];
    a.put("x", &large[..]).await.unwrap();
    let staged = staged_files(&r, &xid);
    assert_eq!(staged.len(), 1);
    fs::remove_file(&staged[0]).unwrap();
    let message = rejected(r.prepare(&xid).await);
    assert!(
        message.contains("is missing") && message.contains("changed by hand"),
        "{message}"
    );
    assert!(r.recover().await.unwrap().is_empty());
    r.rollback(&xid).await.unwrap();
    commit_file(&r, "x", b"again").await;
}

#[tokio::test]
async fn a_commit_interrupted_half_way_finishes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    commit_file(&r, "gone", b"to be deleted").await;
    let (xid, a) = begun(&r).await;
    a.put("m/one", &b"one"[..]).await.unwrap();
    a.put("m/two", &b"two"[..]).await.unwrap();
    a.delete("gone").await.unwrap();
    r.prepare(&xid).await.unwrap();
    // Play the first half of a commit by hand: one file put in place, one delete done; then
    // crash.
    fs::create_dir(r.root().join("m")).unwrap();
    fs::write(r.root().join("m/one"), b"one").unwrap();
    fs::remove_file(r.root().join("gone")).unwrap();
    drop((a, r));

    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![xid]);
    r.commit(&xid).await.unwrap();
    assert_eq!(fs::read(r.root().join("m/one")).unwrap(), b"one");
    assert_eq!(fs::read(r.root().join("m/two")).unwrap(), b"two");
    assert!(!r.root().join("gone").exists());
    assert!(staged_files(&r, &xid).is_empty());
    assert!(prepared_on_disk(r.root()).unwrap().is_empty());
    assert!(r.recover().await.unwrap().is_empty());
}

// Replay.

#[tokio::test]
async fn replay_of_a_blob_not_shipped_yet_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let content = b"shipped late";
    let redo = encode_redo(&[RedoEntry::Put {
        path: "late".into(),
        id: BlobId::of(content),
        bytes: content.len() as u64,
    }]);
    let error = r.replay(&redo, Lsn(5)).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Retryable, "{error}");
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn::ZERO);
    r.blob_store().put(&content[..]).unwrap();
    r.replay(&redo, Lsn(5)).await.unwrap();
    assert_eq!(fs::read(r.root().join("late")).unwrap(), content);
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn(5));
}

#[tokio::test]
async fn replay_refuses_a_malformed_redo_and_an_escaping_path() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(&dir.path().join("root"));
    let message = rejected(r.replay(&[9, 0, 0], Lsn(1)).await);
    assert!(message.contains("malformed redo"), "{message}");
    let escaping = encode_redo(&[RedoEntry::Delete {
        path: "../victim".into(),
    }]);
    fs::write(dir.path().join("victim"), b"keep").unwrap();
    let message = rejected(r.replay(&escaping, Lsn(1)).await);
    assert!(message.contains("`..`"), "{message}");
    assert!(dir.path().join("victim").exists());
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn::ZERO);
}

// The branch log: commits applied again at open, checkpoints, trimming.

/// Kind codes of the branch log's records (`files/log.rs`).
const LOG_PREPARED: u8 = 1;
const LOG_COMMITTED: u8 = 2;
const LOG_ROLLED_BACK: u8 = 3;
const LOG_CHECKPOINT: u8 = 4;
/// Largest record of the branch log (`files/log.rs`).
const LOG_RECORD_BYTES_MAX: u64 = 8 << 20;
/// First LSN of a log segment: the log's segments are `<first lsn, 20 digits>.seg`.
const LOG_FIRST_SEGMENT: &str = "00000000000000000001.seg";
/// Longer than the checkpoint interval of the branch log (1 s): a commit after this long
/// runs a checkpoint before it returns.
const PAST_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1100);

/// One record of a branch log, as the tests look at it.
#[derive(Debug)]
struct LogRecord {
    lsn: Lsn,
    code: u8,
    /// The xid of a prepare or a resolution.
    xid: Option<Xid>,
    /// The redo of a prepare; the `upto` of a checkpoint (8 bytes LE).
    rest: Vec<u8>,
}

fn log_dir(root: &Path) -> PathBuf {
    root.join(PRIVATE_DIR).join("log")
}

/// Every record of the branch log of the resource at `root`, read without opening it.
fn log_records(root: &Path) -> Vec<LogRecord> {
    let mut records = Vec::new();
    journal::scan::scan_dir(&log_dir(root), LOG_RECORD_BYTES_MAX, |record| {
        let code = record.kind.code;
        let (xid, rest) = if code == LOG_CHECKPOINT {
            (None, record.payload.clone())
        } else {
            let p = &record.payload;
            let xid = Xid {
                node: u32::from_le_bytes(p[..4].try_into().unwrap()),
                epoch: Epoch(u64::from_le_bytes(p[4..12].try_into().unwrap())),
                seq: u64::from_le_bytes(p[12..20].try_into().unwrap()),
            };
            (Some(xid), p[20..].to_vec())
        };
        records.push(LogRecord {
            lsn: record.lsn,
            code,
            xid,
            rest,
        });
    })
    .unwrap();
    records
}

/// The `upto` of every checkpoint record in the branch log.
fn checkpoints(root: &Path) -> Vec<Lsn> {
    log_records(root)
        .into_iter()
        .filter(|r| r.code == LOG_CHECKPOINT)
        .map(|r| Lsn(u64::from_le_bytes(r.rest[..].try_into().unwrap())))
        .collect()
}

/// The LSNs of the records of `code` for `xid` in the branch log.
fn logged(root: &Path, code: u8, xid: &Xid) -> Vec<Lsn> {
    log_records(root)
        .into_iter()
        .filter(|r| r.code == code && r.xid.as_ref() == Some(xid))
        .map(|r| r.lsn)
        .collect()
}

/// The LSN of the one `COMMITTED` record of `xid`.
#[track_caller]
fn committed_at(root: &Path, xid: &Xid) -> Lsn {
    let lsns = logged(root, LOG_COMMITTED, xid);
    assert_eq!(lsns.len(), 1, "COMMITTED records of {xid}: {lsns:?}");
    lsns[0]
}

/// The segment files of the branch log, with their sizes.
fn log_segments(root: &Path) -> Vec<(String, u64)> {
    entries(&log_dir(root))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| {
            let size = fs::metadata(&p).unwrap().len();
            (p.file_name().unwrap().to_str().unwrap().to_string(), size)
        })
        .collect()
}

/// The redo entries a branch log holds as prepared for `xid` (its latest `PREPARED`).
fn logged_redo(root: &Path, xid: &Xid) -> Vec<RedoEntry> {
    let record = log_records(root)
        .into_iter()
        .rfind(|r| r.code == LOG_PREPARED && r.xid.as_ref() == Some(xid))
        .unwrap();
    decode_redo(&record.rest).unwrap()
}

/// Asserts that no checkpoint ran: every commit so far is applied again at the next open.
/// (A checkpoint runs from a commit a second after the last one, or the open; each test here
/// commits within milliseconds of opening.)
#[track_caller]
fn assert_no_checkpoint(root: &Path) {
    let upto = checkpoints(root);
    assert!(
        upto.is_empty(),
        "a checkpoint ran (upto {upto:?}): the test took over a second to commit"
    );
}

/// Prepares and commits a branch of `puts` (path, content) and `deletes`; returns its xid.
async fn commit_branch(r: &FilesResource, puts: &[(&str, &[u8])], deletes: &[&str]) -> Xid {
    let (xid, branch) = begun(r).await;
    for (path, content) in puts {
        branch.put(path, *content).await.unwrap();
    }
    for path in deletes {
        branch.delete(path).await.unwrap();
    }
    assert!(matches!(
        r.prepare(&xid).await.unwrap(),
        Vote::Commit { .. }
    ));
    r.commit(&xid).await.unwrap();
    xid
}

/// Replaces the file at `path` with `content` by hand, as a power failure may leave a file whose
/// content was never synced. A new file is renamed over the old one, so that a committed file
/// that is a link of a blob leaves the blob intact.
fn damage(root: &Path, path: &str, content: &[u8]) {
    let target = root.join(path);
    let by_hand = target.with_file_name("by-hand.tmp");
    fs::write(&by_hand, content).unwrap();
    fs::rename(&by_hand, &target).unwrap();
}

/// The vote's redo entries of a prepare.
async fn prepare_entries(r: &FilesResource, xid: &Xid) -> Vec<RedoEntry> {
    match r.prepare(xid).await.unwrap() {
        Vote::Commit { redo } => decode_redo(&redo).unwrap(),
        other => panic!("expected a commit vote, got {other:?}"),
    }
}

/// `count` bytes of content distinct per `seed`.
fn content_of(seed: u32, count: usize) -> Vec<u8> {
    (0..count)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(131)) as u8
        })
        .collect()
}

/// A small committed file whose content was lost (it is not synced at commit; the branch log
/// holds it) comes back when the resource opens: its commit is at or after the last checkpoint,
/// so it is applied again from the log.
#[tokio::test]
async fn a_small_committed_file_lost_in_a_power_failure_is_applied_again_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    commit_branch(&r, &[("d/small", b"committed"), ("top", b"top")], &[]).await;
    assert_no_checkpoint(&root);
    damage(&root, "d/small", b"garbage after a power failure");
    fs::remove_file(root.join("top")).unwrap();
    drop(r);

    let r = open(dir.path());
    assert_eq!(fs::read(root.join("d/small")).unwrap(), b"committed");
    assert_eq!(fs::read(root.join("top")).unwrap(), b"top");
    assert!(r.recover().await.unwrap().is_empty());
    assert!(
        !checkpoints(&root).is_empty(),
        "the open checkpoints after applying the commits again"
    );
}

/// A committed delete is applied again at open: a file that came back (here recreated by hand)
/// is removed again.
#[tokio::test]
async fn a_committed_delete_is_applied_again_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    commit_branch(
        &r,
        &[("d/gone", b"to be deleted"), ("d/kept", b"kept")],
        &[],
    )
    .await;
    commit_branch(&r, &[], &["d/gone"]).await;
    assert!(!root.join("d/gone").exists());
    assert_no_checkpoint(&root);
    fs::write(root.join("d/gone"), b"came back").unwrap();
    drop(r);

    let r = open(dir.path());
    assert!(!root.join("d/gone").exists());
    assert_eq!(fs::read(root.join("d/kept")).unwrap(), b"kept");
    // The path is free: a new branch can write it.
    commit_file(&r, "d/gone", b"again").await;
    assert_eq!(fs::read(root.join("d/gone")).unwrap(), b"again");
}

/// Commits are applied again at open in commit order: of two branches that wrote the same path
/// one after the other, the later one's content is what the path holds afterwards; a path put
/// and then deleted stays deleted.
#[tokio::test]
async fn commits_are_applied_again_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    let first = commit_branch(&r, &[("same", b"first"), ("flip", b"put")], &[]).await;
    let second = commit_branch(&r, &[("same", b"second")], &["flip"]).await;
    let third = commit_branch(&r, &[("flip", b"put again")], &[]).await;
    assert!(committed_at(&root, &first) < committed_at(&root, &second));
    assert!(committed_at(&root, &second) < committed_at(&root, &third));
    assert_no_checkpoint(&root);
    damage(&root, "same", b"damaged");
    damage(&root, "flip", b"damaged");
    drop(r);

    let r = open(dir.path());
    assert_eq!(fs::read(root.join("same")).unwrap(), b"second");
    assert_eq!(fs::read(root.join("flip")).unwrap(), b"put again");
    drop(r);
    // The open checkpointed: nothing is applied again at the next one.
    damage(&root, "same", b"by hand, after the checkpoint");
    let _r = open(dir.path());
    assert_eq!(
        fs::read(root.join("same")).unwrap(),
        b"by hand, after the checkpoint"
    );
}

/// A commit whose `COMMITTED` record is below a checkpoint's `upto` is not applied again at open
/// (its files were made durable by the checkpoint's `syncfs`), while a commit after the
/// checkpoint is. The checkpoint is made to run by a commit more than a second after the open.
#[tokio::test]
async fn commits_below_a_checkpoint_are_not_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    let old = commit_branch(&r, &[("old", b"old committed")], &[]).await;
    tokio::time::sleep(PAST_CHECKPOINT_INTERVAL).await;
    // This commit runs a checkpoint before it returns.
    let trigger = commit_branch(&r, &[("trigger", b"trigger")], &[]).await;
    let upto = *checkpoints(&root)
        .last()
        .expect("a commit more than a second after the open runs a checkpoint");
    assert!(committed_at(&root, &old) < upto);
    assert!(committed_at(&root, &trigger) < upto);
    let new = commit_branch(&r, &[("new", b"new committed")], &[]).await;
    assert!(committed_at(&root, &new) >= upto);
    assert_eq!(
        checkpoints(&root).len(),
        1,
        "no second checkpoint within the second after the first"
    );
    damage(&root, "old", b"by hand");
    damage(&root, "new", b"lost");
    drop(r);

    let r = open(dir.path());
    assert_eq!(
        fs::read(root.join("old")).unwrap(),
        b"by hand",
        "a commit below the checkpoint is not applied again"
    );
    assert_eq!(fs::read(root.join("new")).unwrap(), b"new committed");
    assert_eq!(fs::read(root.join("trigger")).unwrap(), b"trigger");
    assert!(r.recover().await.unwrap().is_empty());
    assert!(prepared_on_disk(&root).unwrap().is_empty());
    // The state is consistent: the paths are free and commit as usual.
    commit_file(&r, "old", b"old again").await;
    assert_eq!(fs::read(root.join("old")).unwrap(), b"old again");
}

/// Checkpoints trim the branch log: a branch prepared before many others committed (more than
/// three segments' worth) has its prepare record carried forward, and the old segments are
/// removed; branches prepared along the way (some just before a segment fills, some just after a
/// checkpoint) keep their prepare records too. After a restart every one of them is still
/// prepared and commits with its content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_carries_prepared_branches_forward_and_removes_old_segments() {
    /// Files per bulk branch, each of `INLINE_FILE_BYTES_MAX`: the whole inline budget.
    const FILES: u32 = 16;
    /// Bulk branches: 56 MiB of prepare records, over three 16 MiB segments.
    const BRANCHES: u32 = 56;
    /// A branch is prepared and left so every this many bulk branches.
    const HELD_EVERY: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    let mut held = Vec::new();
    let hold = async |r: &FilesResource, n: u32| {
        let (xid, branch) = begun(r).await;
        let (path, content) = (format!("held/{n}"), format!("held content {n}"));
        branch.put(&path, content.as_bytes()).await.unwrap();
        r.prepare(&xid).await.unwrap();
        (xid, path, content)
    };
    held.push(hold(&r, 0).await);
    let first = held[0].0;
    assert_eq!(logged(&root, LOG_PREPARED, &first), vec![Lsn(1)]);

    let file_bytes = INLINE_FILE_BYTES_MAX as usize;
    assert_eq!(
        u64::from(FILES) * INLINE_FILE_BYTES_MAX,
        INLINE_BRANCH_BYTES_MAX
    );
    for i in 0..BRANCHES {
        let (xid, b) = begun(&r).await;
        for f in 0..FILES {
            let content = content_of(i * FILES + f, file_bytes);
            b.put(&format!("bulk/{f}"), &content[..]).await.unwrap();
        }
        let entries = prepare_entries(&r, &xid).await;
        assert!(
            entries
                .iter()
                .all(|e| matches!(e, RedoEntry::PutInline { .. })),
            "the whole branch is within the inline budget"
        );
        r.commit(&xid).await.unwrap();
        if i % HELD_EVERY == HELD_EVERY - 1 {
            held.push(hold(&r, i + 1).await);
        }
        // At every moment the log on disk holds every prepared branch: a crash here loses none.
        let mut expected: Vec<Xid> = held.iter().map(|(xid, _, _)| *xid).collect();
        expected.sort();
        assert_eq!(
            prepared_on_disk(&root).unwrap(),
            expected,
            "after bulk branch {i}"
        );
    }
    let mut held_xids: Vec<Xid> = held.iter().map(|(xid, _, _)| *xid).collect();
    held_xids.sort();

    let appended = u64::from(BRANCHES) * INLINE_BRANCH_BYTES_MAX;
    let segments = log_segments(&root);
    let kept: u64 = segments.iter().map(|(_, size)| size).sum();
    assert!(
        segments.iter().all(|(name, _)| name != LOG_FIRST_SEGMENT),
        "the first segment, holding the first branch's first prepare record, is removed: {segments:?}"
    );
    assert!(
        segments.len() <= 2 && kept < appended / 2,
        "{appended} bytes appended, {segments:?} kept"
    );
    let carried = logged(&root, LOG_PREPARED, &first);
    assert!(
        !carried.is_empty() && carried.iter().all(|lsn| *lsn > Lsn(1)),
        "the prepare record is carried forward: {carried:?}"
    );
    assert_eq!(prepared_on_disk(&root).unwrap(), held_xids);
    drop(r);

    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), held_xids);
    assert_eq!(prepared_on_disk(&root).unwrap(), held_xids);
    for (xid, path, content) in &held {
        assert!(!root.join(path).exists());
        r.commit(xid).await.unwrap();
        assert_eq!(fs::read_to_string(root.join(path)).unwrap(), *content);
    }
    assert!(r.recover().await.unwrap().is_empty());
    assert!(prepared_on_disk(&root).unwrap().is_empty());
    let last = BRANCHES - 1;
    for f in 0..FILES {
        let content = fs::read(root.join(format!("bulk/{f}"))).unwrap();
        assert!(
            content == content_of(last * FILES + f, file_bytes),
            "bulk/{f} holds the last branch's content"
        );
    }
}

/// Asserts that the open resource and a read of its log on disk both list `expected` as
/// prepared.
async fn assert_prepared(r: &FilesResource, expected: &[Xid]) {
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(r.recover().await.unwrap(), expected, "recover");
    assert_eq!(
        prepared_on_disk(r.root()).unwrap(),
        expected,
        "prepared_on_disk"
    );
}

/// `prepared_on_disk`, which reads the branch log without opening it, lists the same branches as
/// `recover` of the open resource: none while branches are active or vote read-only, the
/// prepared ones after prepare, none once they are committed or rolled back, and the same again
/// after a restart.
#[tokio::test]
async fn prepared_on_disk_agrees_with_recover() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        prepared_on_disk(&dir.path().join("never opened"))
            .unwrap()
            .is_empty()
    );
    let r = open(dir.path());
    assert_prepared(&r, &[]).await;
    let (a, branch_a) = begun(&r).await;
    let (b, branch_b) = begun(&r).await;
    let (c, branch_c) = begun(&r).await;
    let (read_only, _) = begun(&r).await;
    branch_a.put("a", &b"a"[..]).await.unwrap();
    branch_b
        .put("b", &vec![2u8; INLINE_FILE_BYTES_MAX as usize + 1][..])
        .await
        .unwrap();
    branch_c.put("c", &b"c"[..]).await.unwrap();
    assert_prepared(&r, &[]).await;
    assert_eq!(r.prepare(&read_only).await.unwrap(), Vote::ReadOnly);
    for xid in [a, b, c] {
        r.prepare(&xid).await.unwrap();
    }
    assert_prepared(&r, &[a, b, c]).await;
    r.commit(&a).await.unwrap();
    assert_prepared(&r, &[b, c]).await;
    r.rollback(&b).await.unwrap();
    assert_prepared(&r, &[c]).await;
    assert_eq!(logged(r.root(), LOG_ROLLED_BACK, &b).len(), 1);
    assert_eq!(logged(r.root(), LOG_COMMITTED, &a).len(), 1);
    drop((branch_a, branch_b, branch_c, r));

    let r = open(dir.path());
    assert_prepared(&r, &[c]).await;
    r.commit(&c).await.unwrap();
    assert_prepared(&r, &[]).await;
    assert_eq!(fs::read(r.root().join("a")).unwrap(), b"a");
    assert!(!r.root().join("b").exists());
    assert_eq!(fs::read(r.root().join("c")).unwrap(), b"c");
}

/// One branch with a large put (over `INLINE_FILE_BYTES_MAX`) and two small ones: the large
/// content goes through a staged file into the blob store (a `Put` naming the blob), the small
/// ones inline (`PutInline`), in the vote and in the prepare record alike; all three commit and
/// are in place after a restart, even when lost by hand (the large one from its blob).
#[tokio::test]
async fn large_and_small_puts_in_one_branch_commit_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    let large = content_of(1, INLINE_FILE_BYTES_MAX as usize + 1);
    let (xid, branch) = begun(&r).await;
    branch.put("mix/large", &large[..]).await.unwrap();
    branch.put("mix/small-1", &b"small one"[..]).await.unwrap();
    branch.put("small-2", &b"small two"[..]).await.unwrap();
    assert_eq!(
        staged_files(&r, &xid).len(),
        1,
        "only the large content is staged in a file"
    );
    let expected = vec![
        RedoEntry::Put {
            path: "mix/large".into(),
            id: BlobId::of(&large),
            bytes: large.len() as u64,
        },
        RedoEntry::PutInline {
            path: "mix/small-1".into(),
            content: b"small one".to_vec(),
        },
        RedoEntry::PutInline {
            path: "small-2".into(),
            content: b"small two".to_vec(),
        },
    ];
    assert_eq!(prepare_entries(&r, &xid).await, expected);
    assert_eq!(logged_redo(&root, &xid), expected);
    assert!(r.blob_store().contains(&BlobId::of(&large)));
    r.commit(&xid).await.unwrap();
    assert!(staged_files(&r, &xid).is_empty());
    assert_eq!(fs::read(root.join("mix/large")).unwrap(), large);
    assert_no_checkpoint(&root);
    drop((branch, r));

    let r = open(dir.path());
    assert_eq!(fs::read(root.join("mix/large")).unwrap(), large);
    assert_eq!(fs::read(root.join("mix/small-1")).unwrap(), b"small one");
    assert_eq!(fs::read(root.join("small-2")).unwrap(), b"small two");
    drop(r);

    // Lost by hand before an open that applies the commit again: each file is put back.
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    commit_branch(
        &r,
        &[
            ("mix/large", &large),
            ("mix/small-1", b"small one"),
            ("small-2", b"small two"),
        ],
        &[],
    )
    .await;
    assert_no_checkpoint(&root);
    for path in ["mix/large", "mix/small-1", "small-2"] {
        damage(&root, path, b"lost");
    }
    drop(r);
    let r = open(dir.path());
    assert_eq!(fs::read(root.join("mix/large")).unwrap(), large);
    assert_eq!(fs::read(root.join("mix/small-1")).unwrap(), b"small one");
    assert_eq!(fs::read(root.join("small-2")).unwrap(), b"small two");
    assert!(r.blob_store().contains(&BlobId::of(&large)));
}

/// A committed large file whose staged file and blob are both gone is put back (at open, or by
/// a commit after a restart) only when the file at its path has the content the redo names —
/// its blake3 hash, not only its length; otherwise the step is refused with `ContentLost`
/// naming the path and the hash, and succeeds once the right content is back.
#[tokio::test]
async fn without_its_blob_a_file_is_accepted_only_with_the_right_content() {
    let lost = |result: Result<(), ResourceError>, path: &str, id: BlobId| match result {
        Err(e @ ResourceError::ContentLost { .. }) => {
            assert_eq!(e.class(), ErrorClass::Fatal);
            let message = e.to_string();
            assert!(
                message.contains(path) && message.contains(&id.to_string()),
                "{message}"
            );
        }
        other => panic!("expected ContentLost for {path}, got {other:?}"),
    };
    let same_length_other = |content: &[u8]| {
        let mut other = content.to_vec();
        other[0] ^= 0xff;
        other
    };

    // At open, applying again a commit the last checkpoint does not cover.
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    let large = content_of(7, INLINE_FILE_BYTES_MAX as usize + 1);
    let id = BlobId::of(&large);
    commit_branch(&r, &[("big", &large)], &[]).await;
    assert_no_checkpoint(&root);
    let blob = r.blob_store().path_of(&id);
    drop(r);
    fs::remove_file(&blob).unwrap();
    damage(&root, "big", &same_length_other(&large));
    lost(
        FilesResource::open("files", &root, config()).map(drop),
        "big",
        id,
    );
    damage(&root, "big", &large);
    let r = open(&root);
    assert_eq!(fs::read(root.join("big")).unwrap(), large);
    drop(r);

    // A prepared branch committed after a restart.
    let r = open(&root);
    let other = content_of(8, INLINE_FILE_BYTES_MAX as usize + 1);
    let other_id = BlobId::of(&other);
    commit_file(&r, "next", &same_length_other(&other)).await;
    let (xid, branch) = begun(&r).await;
    branch.put("next", &other[..]).await.unwrap();
    r.prepare(&xid).await.unwrap();
    let blob = r.blob_store().path_of(&other_id);
    drop((branch, r));
    fs::remove_file(&blob).unwrap();
    let r = open(&root);
    lost(r.commit(&xid).await, "next", other_id);
    assert_eq!(r.recover().await.unwrap(), vec![xid]);
    damage(&root, "next", &other);
    r.commit(&xid).await.unwrap();
    assert_eq!(fs::read(root.join("next")).unwrap(), other);
}

/// Commits a branch of `count` files of `INLINE_FILE_BYTES_MAX` bytes, put in `order`, and
/// checks its redo: at most `INLINE_BRANCH_BYTES_MAX` inline (the first files in path order), the
/// rest as blobs; returns the contents by path.
async fn commit_over_the_inline_budget(
    r: &FilesResource,
    count: u32,
    order: impl Iterator<Item = u32>,
) -> Vec<(String, Vec<u8>)> {
    let file_bytes = INLINE_FILE_BYTES_MAX as usize;
    let inline_files = (INLINE_BRANCH_BYTES_MAX / INLINE_FILE_BYTES_MAX) as usize;
    let files: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| (format!("budget/{i:02}"), content_of(1000 + i, file_bytes)))
        .collect();
    let (xid, branch) = begun(r).await;
    for i in order {
        let (path, content) = &files[i as usize];
        branch.put(path, &content[..]).await.unwrap();
    }
    assert_eq!(
        staged_files(r, &xid).len(),
        count as usize - inline_files,
        "the puts over the budget are staged in files"
    );
    let entries = prepare_entries(r, &xid).await;
    assert_eq!(entries, logged_redo(r.root(), &xid));
    let inline: u64 = entries
        .iter()
        .map(|e| match e {
            RedoEntry::PutInline { content, .. } => content.len() as u64,
            _ => 0,
        })
        .sum();
    assert_eq!(inline, INLINE_BRANCH_BYTES_MAX, "the budget is used up");
    for (i, (entry, (path, content))) in entries.iter().zip(&files).enumerate() {
        if i < inline_files {
            assert_eq!(
                entry,
                &RedoEntry::PutInline {
                    path: path.clone(),
                    content: content.clone(),
                }
            );
        } else {
            assert_eq!(
                entry,
                &RedoEntry::Put {
                    path: path.clone(),
                    id: BlobId::of(content),
                    bytes: content.len() as u64,
                }
            );
            assert!(r.blob_store().contains(&BlobId::of(content)));
        }
    }
    r.commit(&xid).await.unwrap();
    assert!(staged_files(r, &xid).is_empty());
    for (path, content) in &files {
        assert!(
            fs::read(r.root().join(path)).unwrap() == *content,
            "{path} holds its content"
        );
    }
    files
}

/// A branch putting 20 files of 64 KiB (1.25 MiB) carries at most `INLINE_BRANCH_BYTES_MAX`
/// inline; the rest goes through staged files and the blob store. Put in path order, the first
/// 16 stay in memory and the last 4 are staged in files; put in reverse order, the same 16 paths
/// are inline (read back from their staged files) and the other 4 are written out from memory
/// at prepare. Either way the contents are right, also after a restart.
#[tokio::test]
async fn the_inline_budget_of_a_branch_sends_the_rest_through_blobs() {
    const COUNT: u32 = 20;
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    commit_over_the_inline_budget(&r, COUNT, 0..COUNT).await;
    let files = commit_over_the_inline_budget(&r, COUNT, (0..COUNT).rev()).await;
    assert!(entries(&private(&r).join("staging")).is_empty());
    drop(r);

    let r = open(dir.path());
    for (path, content) in &files {
        assert!(
            fs::read(r.root().join(path)).unwrap() == *content,
            "{path} holds its content after a restart"
        );
    }
}

/// A branch reads its own writes whether they are staged in memory (up to
/// `INLINE_FILE_BYTES_MAX` bytes) or in a staged file (one byte more), through `read` and
/// `open_read`; reading from memory leaves no temp file behind; other branches see none of it.
#[tokio::test]
async fn a_branch_reads_content_staged_in_memory_and_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let small = content_of(7, INLINE_FILE_BYTES_MAX as usize);
    let large = content_of(8, INLINE_FILE_BYTES_MAX as usize + 1);
    let (xid, a) = begun(&r).await;
    a.put("small", &small[..]).await.unwrap();
    assert!(
        staged_files(&r, &xid).is_empty(),
        "small content is staged in memory"
    );
    a.put("large", &large[..]).await.unwrap();
    assert_eq!(staged_files(&r, &xid).len(), 1);

    assert_eq!(a.read("small").await.unwrap(), small);
    assert_eq!(a.read("large").await.unwrap(), large);
    for (path, content) in [("small", &small), ("large", &large)] {
        let mut read = Vec::new();
        io::Read::read_to_end(&mut a.open_read(path).await.unwrap(), &mut read).unwrap();
        assert!(read == *content, "open_read of {path}");
    }
    assert!(
        entries(&private(&r).join("tmp")).is_empty(),
        "the file of content read from memory has no name"
    );
    // Replaced in memory: the latest content is read.
    a.put("small", &b"replaced"[..]).await.unwrap();
    assert_eq!(a.read("small").await.unwrap(), b"replaced");

    let (_, b) = begun(&r).await;
    for path in ["small", "large"] {
        assert!(rejected(b.read(path).await).contains("No such file"));
    }
    r.rollback(&xid).await.unwrap();
    assert!(staged_files(&r, &xid).is_empty());
    assert!(!r.root().join("small").exists() && !r.root().join("large").exists());
}

// A full disk.

/// A tmpfs mounted on a directory for the life of the guard.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status();
        match status {
            Ok(s) if s.success() => Tmpfs {
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
        let _ = Command::new("umount").arg(&self.dir).status();
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

#[tokio::test]
async fn a_full_disk_during_prepare_is_refused_and_leaves_the_branch_rollbackable() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    fs::create_dir(&mount).unwrap();
    let _tmpfs = Tmpfs::mount(&mount, "1m");
    let r = open(&mount.join("root"));
    let (xid, a) = begun(&r).await;
    a.put("upload", &vec![7u8; 256 << 10][..]).await.unwrap();
    fill_up(&mount.join("filler"));

    let error = r.prepare(&xid).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Rejected, "{error}");
    assert!(
        error.to_string().contains("prepare record") && error.to_string().contains("No space"),
        "{error}"
    );
    assert!(r.recover().await.unwrap().is_empty());
    assert!(prepared_on_disk(r.root()).unwrap().is_empty());
    assert!(entries(&private(&r).join("tmp")).is_empty());
    r.rollback(&xid).await.unwrap();
    assert!(staged_files(&r, &xid).is_empty());

    fs::remove_file(mount.join("filler")).unwrap();
    commit_file(&r, "upload", b"fits now").await;
    assert_eq!(fs::read(r.root().join("upload")).unwrap(), b"fits now");
    drop((a, r));
}

// Known bugs of the redo at open: ignored until `files.rs` is fixed; run with `--ignored`.

/// BUG: a path committed as a file, deleted, then used as a directory (`a`, then `a/b`), all
/// after the last checkpoint, makes the resource refuse to open: the redo at open puts `a`
/// again through the confinement check, which refuses it ("it is a directory"), and `open`
/// fails with `Rejected` every time — no checkpoint can run to get past it.
#[tokio::test]

async fn a_file_deleted_and_then_used_as_a_directory_does_not_block_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    commit_branch(&r, &[("a", b"a file")], &[]).await;
    commit_branch(&r, &[], &["a"]).await;
    commit_branch(&r, &[("a/b", b"below")], &[]).await;
    assert_no_checkpoint(&root);
    drop(r);

    let r = FilesResource::open("files", dir.path(), config()).unwrap();
    assert_eq!(fs::read(r.root().join("a/b")).unwrap(), b"below");
}

/// BUG: the same with the file put below a checkpoint: the redo of the delete of `a` refuses
/// it ("it is a directory") and `open` fails.
#[tokio::test]

async fn a_delete_of_a_path_later_used_as_a_directory_does_not_block_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    commit_branch(&r, &[("a", b"a file")], &[]).await;
    tokio::time::sleep(PAST_CHECKPOINT_INTERVAL).await;
    commit_branch(&r, &[("trigger", b"checkpoint")], &[]).await;
    assert_eq!(checkpoints(&root).len(), 1);
    commit_branch(&r, &[], &["a"]).await;
    commit_branch(&r, &[("a/b", b"below")], &[]).await;
    assert_eq!(checkpoints(&root).len(), 1);
    drop(r);

    let r = FilesResource::open("files", dir.path(), config()).unwrap();
    assert_eq!(fs::read(r.root().join("a/b")).unwrap(), b"below");
}

/// BUG (for when one root both commits and replays, as a demoted primary rejoining as a
/// standby will): the redo at open applies local commits after the last checkpoint again,
/// over content a later replay wrote; `applied_lsn` says the replay is done, so nothing
/// repairs it.
#[tokio::test]

async fn a_replay_after_local_commits_is_not_undone_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let root = r.root().to_path_buf();
    commit_branch(&r, &[("p", b"local commit")], &[]).await;
    let redo = encode_redo(&[RedoEntry::PutInline {
        path: "p".into(),
        content: b"replayed later".to_vec(),
    }]);
    r.replay(&redo, Lsn(1)).await.unwrap();
    assert_eq!(fs::read(root.join("p")).unwrap(), b"replayed later");
    drop(r);

    let r = open(dir.path());
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn(1));
    assert_eq!(fs::read(root.join("p")).unwrap(), b"replayed later");
}

// Blobs shipped to a standby.

/// `redo_blobs` names the blob of each large put once; `put_blob` of content that does not hash
/// to its id is refused with `BlobMismatch` and leaves nothing (no blob, no temp file); a
/// matching one is stored and reads back through `open_blob`.
#[tokio::test]
async fn shipped_blobs_are_named_by_the_redo_and_checked_when_put() {
    let dir = tempfile::tempdir().unwrap();
    let primary = open(&dir.path().join("primary"));
    let standby = open(&dir.path().join("standby"));
    let large = content_of(3, INLINE_FILE_BYTES_MAX as usize + 10);
    let (xid, branch) = begun(&primary).await;
    branch.put("a/large", &large[..]).await.unwrap();
    branch.put("b/large", &large[..]).await.unwrap();
    branch.put("small", &b"inline"[..]).await.unwrap();
    let Vote::Commit { redo } = primary.prepare(&xid).await.unwrap() else {
        panic!("voted read-only");
    };
    let id = BlobId::of(&large);
    assert_eq!(primary.redo_blobs(&redo).unwrap(), vec![id]);
    assert!(rejected(primary.redo_blobs(b"\x09junk")).contains("malformed redo"));

    let wrong = content_of(4, large.len());
    match standby
        .put_blob(&id, Box::new(io::Cursor::new(wrong.clone())))
        .await
    {
        Err(ResourceError::BlobMismatch {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (id, BlobId::of(&wrong))),
        other => panic!("expected BlobMismatch, got {other:?}"),
    }
    assert!(standby.blob_store().list().unwrap().is_empty());
    assert!(entries(&private(&standby).join("tmp")).is_empty());

    let shipped = primary.open_blob(&id).await.unwrap();
    standby.put_blob(&id, shipped).await.unwrap();
    assert_eq!(standby.blob_store().list().unwrap(), vec![id]);
    assert!(entries(&private(&standby).join("tmp")).is_empty());
    standby.replay(&redo, Lsn(1)).await.unwrap();
    assert_eq!(fs::read(standby.root().join("b/large")).unwrap(), large);
    primary.rollback(&xid).await.unwrap();
}

// Blob collection.

/// The coordinator's side of a collection in a test: the set it names, after running `work`
/// (what happens while the coordinator computes its set).
struct Retained {
    set: HashSet<BlobId>,
    work: tokio::sync::Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
}

#[async_trait::async_trait]
impl RetainedBlobs for Retained {
    async fn retained_blobs(&self) -> Result<HashSet<BlobId>, ResourceError> {
        let work = self.work.lock().await.take();
        if let Some(work) = work {
            work.await;
        }
        Ok(self.set.clone())
    }
}

fn stored(r: &FilesResource) -> BTreeSet<BlobId> {
    r.blob_store().list().unwrap().into_iter().collect()
}

/// Begins a branch putting `content` at `path` and prepares it.
async fn prepared_put(r: &FilesResource, path: &str, content: &[u8]) -> Xid {
    let (xid, branch) = begun(r).await;
    branch.put(path, content).await.unwrap();
    assert!(matches!(
        r.prepare(&xid).await.unwrap(),
        Vote::Commit { .. }
    ));
    xid
}

/// A collection removes the blobs of committed branches no retained record names and of a
/// rolled-back branch; it keeps those a retained record names, those of a prepared branch
/// (also one committed while the coordinator computes its set), and one that a prepare adopts
/// — already stored, so the adoption links nothing new — while the coordinator computes its
/// set. Committed files stay (they are links of their own), also across a reopen.
#[tokio::test]
async fn blob_collection_removes_only_what_nothing_needs() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let large = |seed: u32| content_of(seed, INLINE_FILE_BYTES_MAX as usize + 1);
    let id = |seed: u32| BlobId::of(&large(seed));

    commit_file(&r, "committed", &large(1)).await;
    let rolled_back = prepared_put(&r, "rolled-back", &large(2)).await;
    r.rollback(&rolled_back).await.unwrap();
    let prepared = prepared_put(&r, "prepared", &large(3)).await;
    commit_file(&r, "retained", &large(4)).await;
    commit_file(&r, "unnamed", &large(5)).await;
    let committed_meanwhile = prepared_put(&r, "committed-meanwhile", &large(6)).await;
    assert_eq!(stored(&r), (1..=6).map(id).collect());

    // While the coordinator computes its set: a prepare adopts blob 1 again (it is stored
    // already), and the branch of blob 6 commits.
    let adopting = {
        let r = r.clone();
        async move {
            let again = prepared_put(&r, "again", &large(1)).await;
            r.commit(&committed_meanwhile).await.unwrap();
            r.commit(&again).await.unwrap();
        }
    };
    let retained = Retained {
        set: [id(4)].into_iter().collect(),
        work: tokio::sync::Mutex::new(Some(Box::pin(adopting))),
    };
    let collected = r.collect_blobs(&retained).await.unwrap();
    assert_eq!(collected.removed, 2, "{collected:?}");
    assert_eq!(stored(&r), [1, 3, 4, 6].into_iter().map(id).collect());

    r.commit(&prepared).await.unwrap();
    for (path, seed) in [
        ("committed", 1),
        ("retained", 4),
        ("unnamed", 5),
        ("again", 1),
    ] {
        assert_eq!(
            fs::read(r.root().join(path)).unwrap(),
            large(seed),
            "{path}"
        );
    }
    // Nothing open and nothing retained: every blob goes; the tree stays, across a reopen.
    let none = Retained {
        set: HashSet::new(),
        work: tokio::sync::Mutex::new(None),
    };
    r.collect_blobs(&none).await.unwrap();
    assert!(stored(&r).is_empty());
    drop(r);
    let r = open(dir.path());
    for (path, seed) in [
        ("committed", 1),
        ("prepared", 3),
        ("committed-meanwhile", 6),
    ] {
        assert_eq!(
            fs::read(r.root().join(path)).unwrap(),
            large(seed),
            "{path}"
        );
    }
    assert!(!r.root().join("rolled-back").exists());
}

/// Polls a future with another runtime's context entered, so that the blocking work it starts
/// goes to that runtime's blocking pool.
struct InRuntime<F> {
    handle: tokio::runtime::Handle,
    future: Pin<Box<F>>,
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let _entered = self.handle.clone().enter();
        self.future.as_mut().poll(cx)
    }
}

/// A blocking task cancelled because its runtime is shutting down (as when another resource
/// failed and the process stops) is no failure of this resource: the commit is retryable, the
/// resource is not poisoned, and the same commit succeeds on a running runtime.
#[test]
fn a_task_cancelled_by_a_runtime_shutting_down_does_not_poison_the_resource() {
    let running = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let r = open(&root);
    let xid = running.block_on(async {
        let (xid, branch) = begun(&r).await;
        branch.put("a", &b"one"[..]).await.unwrap();
        r.prepare(&xid).await.unwrap();
        xid
    });
    let stopping = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let handle = stopping.handle().clone();
    stopping.shutdown_background();
    let cancelled = running.block_on(InRuntime {
        handle,
        future: Box::pin(r.commit(&xid)),
    });
    let e = cancelled.expect_err("the commit's blocking task was cancelled");
    assert_eq!(e.class(), ErrorClass::Retryable, "{e}");
    running.block_on(async {
        assert_eq!(r.recover().await.unwrap(), vec![xid], "not poisoned");
        r.commit(&xid).await.unwrap();
    });
    assert_eq!(fs::read(root.join("a")).unwrap(), b"one");
}

#[tokio::test]
async fn health_fails_once_the_root_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let r = open(&root);
    r.health().await.unwrap();
    fs::remove_dir_all(&root).unwrap();
    let e = r.health().await.unwrap_err().to_string();
    assert!(e.contains("root") && e.contains("No such file"), "{e}");
}

/// A replay batch in which a file becomes a directory (`a` put, then deleted, then `a/b` put,
/// by three redos) applies from every state a crash inside an earlier attempt of it can leave:
/// nothing applied yet, the first redo alone, and everything but the applied LSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_batch_where_a_file_becomes_a_directory_applies_from_any_crash_state() {
    let dir = tempfile::tempdir().unwrap();
    let inline = |path: &str, content: &str| RedoEntry::PutInline {
        path: path.into(),
        content: content.as_bytes().to_vec(),
    };
    let batch = vec![
        (Lsn(1), encode_redo(&[inline("a", "file a\n")])),
        (
            Lsn(2),
            encode_redo(&[RedoEntry::Delete { path: "a".into() }]),
        ),
        (Lsn(3), encode_redo(&[inline("a/b", "file b\n")])),
    ];
    let ends_right = |r: &FilesResource| {
        assert_eq!(fs::read(r.root().join("a/b")).unwrap(), b"file b\n");
    };
    // From nothing.
    let r = open(&dir.path().join("from-nothing"));
    r.replay_batch(&batch).await.unwrap();
    ends_right(&r);
    let done = r.inventory().await.unwrap();
    // After the first redo alone (an earlier batch stopped there): `a` is a file.
    let r = open(&dir.path().join("after-the-first"));
    r.replay_batch(&batch[..1]).await.unwrap();
    r.replay_batch(&batch).await.unwrap();
    ends_right(&r);
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn(3));
    // Everything in place but the applied LSN (killed before its state write): `a` is a
    // directory, which the batch's put of `a` and delete of `a` must not trip over.
    let r = open(&dir.path().join("all-but-the-lsn"));
    fs::create_dir_all(r.root().join("a")).unwrap();
    fs::write(r.root().join("a/b"), "file b\n").unwrap();
    r.replay_batch(&batch).await.unwrap();
    ends_right(&r);
    assert_eq!(r.inventory().await.unwrap(), done);
    // Stopped by the fail point after the first entry, then again.
    let r = open(&dir.path().join("stopped"));
    r.fail_next_replay();
    r.replay_batch(&batch).await.unwrap_err();
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn(0));
    r.replay_batch(&batch).await.unwrap();
    ends_right(&r);
    assert_eq!(r.inventory().await.unwrap(), done);
}

/// The inventory lists the tree's files by relative path with the blake3 hash of their
/// content, sorted, and leaves out the private area.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_lists_the_tree_without_the_private_area() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, branch) = begun(&r).await;
    branch.put("z.txt", &b"zed"[..]).await.unwrap();
    branch
        .put("d/e/f.bin", &vec![7u8; 512 << 10][..])
        .await
        .unwrap();
    r.prepare(&xid).await.unwrap();
    r.commit(&xid).await.unwrap();
    let listed = r.inventory().await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["d/e/f.bin", "z.txt"]);
    assert_eq!(listed[1].digest, *blake3::hash(b"zed").as_bytes());
    assert_eq!(
        listed[0].digest,
        *blake3::hash(&vec![7u8; 512 << 10]).as_bytes()
    );
}
