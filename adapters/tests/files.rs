//! The files resource: the conformance suite, path confinement (one test per refusal), locking
//! (conflicts, waiting, locks across a restart), reading one's own writes, limits, damage by hand,
//! a commit interrupted half-way, replay edge cases, and a full disk during prepare (on a 1 MiB
//! tmpfs, which needs root).

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adapters::files::{
    FilesBranch, FilesConfig, FilesResource, INLINE_FILE_BYTES_MAX, PATH_BYTES_MAX, PRIVATE_DIR,
    RedoEntry, decode_redo, encode_redo, prepared_on_disk,
};
use adapters::testing::{self, Subject};
use adapters::{Epoch, ErrorClass, Lsn, Resource, ResourceError, Vote, Xid};
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

static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

fn xid_at(epoch: u64) -> Xid {
    Xid {
        node: 1,
        epoch: Epoch(epoch),
        seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
    }
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

/// The reason of a `Rejected` error; panics on any other result.
#[track_caller]
fn rejected<T: std::fmt::Debug>(result: Result<T, ResourceError>) -> String {
    match result {
        Err(e @ ResourceError::Rejected { .. }) => {
            assert_eq!(e.class(), ErrorClass::Rejected);
            e.to_string()
        }
        other => panic!("expected a Rejected error, got {other:?}"),
    }
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

#[async_trait::async_trait]
impl Subject for FilesSubject {
    async fn open(&self) -> Arc<dyn Resource> {
        open(&self.primary())
    }

    /// Opens the standby and ships it every blob of the primary, as replication will.
    async fn open_standby(&self) -> Arc<dyn Resource> {
        let standby = open(&self.standby());
        let blobs = self.primary().join(PRIVATE_DIR).join("blobs");
        for fan in entries(&blobs).into_iter().filter(|p| !p.ends_with("tmp")) {
            for blob in entries(&fan) {
                let id: BlobId = blob.file_name().unwrap().to_str().unwrap().parse().unwrap();
                if !standby.blob_store().contains(&id) {
                    let stored = standby.blob_store().put(fs::File::open(&blob).unwrap());
                    assert_eq!(stored.unwrap().id, id);
                }
            }
        }
        standby
    }

    async fn write(&self, resource: &Arc<dyn Resource>, xid: &Xid, tag: u32) {
        let content = tag_content(tag);
        let branch = files(resource).branch(xid);
        branch
            .put(&tag_path(tag), content.as_bytes())
            .await
            .unwrap();
    }

    async fn visible(&self, resource: &Arc<dyn Resource>, tag: u32) -> bool {
        let path = files(resource).root().join(tag_path(tag));
        fs::read(path).is_ok_and(|c| c == tag_content(tag).as_bytes())
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
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (first, a) = begun(&r).await;
    a.put("shared", &b"first"[..]).await.unwrap();
    r.prepare(&first).await.unwrap();
    let (second, b) = begun(&r).await;
    let start = Instant::now();
    let waiting = tokio::spawn(async move { b.put("shared", &b"second"[..]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.commit(&first).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), 6);
    assert!(
        start.elapsed() < Duration::from_millis(LOCK_WAIT_MS),
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
