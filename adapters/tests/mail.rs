//! The mail resource: the conformance suite, delivery and its names (commit, rollback, a crash
//! with a prepared branch, a commit repeated after a crash and after a reader moved a message),
//! replay (twice, after a crash before its LSN was stored, a blob not shipped yet, a malformed
//! redo), the size limit and each validation rule, what is and is not a Maildir, fencing,
//! damage by hand, trims of the branch log, a message of 64 MiB streamed in bounded memory (in a
//! child process, alone), and Python's `mailbox.Maildir` reading the queue.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, UNIX_EPOCH};

use adapters::mail::{
    BRANCH_MESSAGES_MAX, INLINE_MESSAGE_BYTES_MAX, MailBranch, MailConfig, MailResource,
    MessageBuilder, PRIVATE_DIR, RedoEntry, decode_redo, encode_redo, prepared_on_disk,
};
use adapters::testing::{self, Paused, Subject};
use adapters::{Epoch, ErrorClass, Lsn, Resource, ResourceError, RetainedBlobs, Vote, Xid};
use common::{hash_all, peak_resident_bytes, rejected, xid_at};
use journal::BlobId;
use tokio::io::{AsyncRead, ReadBuf};

/// Largest message most resources here accept.
const MAX_MESSAGE_BYTES: u64 = 1 << 20;
/// The date of every built message here: Tue, 14 Nov 2023 22:13:20 +0000.
const DATE_SECS: u64 = 1_700_000_000;

fn config() -> MailConfig {
    MailConfig {
        create: true,
        max_message_bytes: MAX_MESSAGE_BYTES,
    }
}

fn open(maildir: &Path) -> Arc<MailResource> {
    MailResource::open("mail", maildir, config()).unwrap()
}

/// A begun branch and its handle.
async fn begun(r: &MailResource) -> (Xid, MailBranch) {
    let xid = xid_at(0);
    r.begin(&xid).await.unwrap();
    (xid, r.branch(&xid))
}

/// A built message, the same bytes every time for the same `tag`.
fn built(tag: &str) -> MessageBuilder {
    MessageBuilder::new()
        .from("Shop <shop@example.org>")
        .to(format!("{tag}@example.org"))
        .subject(format!("message {tag}"))
        .message_id(format!("<{tag}@concord.test>"))
        .date(UNIX_EPOCH + Duration::from_secs(DATE_SECS))
        .body(format!("This is message {tag}.\n"))
}

fn message(tag: &str) -> Vec<u8> {
    built(tag).build().unwrap()
}

/// A message of about `bytes` bytes (CRLF), over the inline limit when `bytes` is.
fn large_message(tag: &str, bytes: usize) -> Vec<u8> {
    let line = format!("{tag} {}\n", "x".repeat(70));
    let body = line.repeat(bytes / (line.len() + 1) + 1);
    built(tag).body(body).build().unwrap()
}

/// Begins a branch and enqueues `messages`; returns its xid (the handle is dropped).
async fn enqueued(r: &MailResource, messages: &[&[u8]]) -> Xid {
    let (xid, branch) = begun(r).await;
    for m in messages {
        branch.enqueue(*m).await.unwrap();
    }
    xid
}

async fn prepare_vote(r: &MailResource, xid: &Xid) -> Vec<u8> {
    match r.prepare(xid).await.unwrap() {
        Vote::Commit { redo } => redo,
        Vote::ReadOnly => panic!("branch {xid} voted read-only"),
    }
}

/// Commits `messages` in a transaction of their own; returns its xid, names and redo.
async fn commit_messages(r: &MailResource, messages: &[&[u8]]) -> (Xid, Vec<String>, Vec<u8>) {
    let (xid, branch) = begun(r).await;
    let mut names = Vec::new();
    for m in messages {
        names.push(branch.enqueue(*m).await.unwrap().name);
    }
    let redo = prepare_vote(r, &xid).await;
    r.commit(&xid).await.unwrap();
    (xid, names, redo)
}

/// The names in a directory, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn sub(r: &MailResource, dir: &str) -> PathBuf {
    r.maildir().join(dir)
}

/// Every delivered message (in `new/` and `cur/`): file name → content.
fn delivered(maildir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dir in ["new", "cur"] {
        for name in names_in(&maildir.join(dir)) {
            let content = fs::read(maildir.join(dir).join(&name)).unwrap();
            out.insert(format!("{dir}/{name}"), content);
        }
    }
    out
}

/// Moves a delivered message from `new/` to `cur/` as a mail reader does (seen: `:2,S`).
fn read_by_a_reader(maildir: &Path, name: &str) -> String {
    let seen = format!("{name}:2,S");
    fs::rename(
        maildir.join("new").join(name),
        maildir.join("cur").join(&seen),
    )
    .unwrap();
    seen
}

fn mail(r: &Arc<dyn Resource>) -> &MailResource {
    r.as_any().downcast_ref::<MailResource>().unwrap()
}

// The conformance suite.

/// The subject of the conformance suite: a primary and a standby Maildir in one temp directory.
struct MailSubject {
    dir: tempfile::TempDir,
}

impl MailSubject {
    fn primary(&self) -> PathBuf {
        self.dir.path().join("primary")
    }
}

fn tag_message(tag: u32) -> Vec<u8> {
    message(&format!("effect-{tag}"))
}

/// Each effect also enqueues a message over `INLINE_MESSAGE_BYTES_MAX`, which goes through the
/// blob store, so that the suite's replays ship blobs.
fn tag_large_message(tag: u32) -> Vec<u8> {
    large_message(
        &format!("large-effect-{tag}"),
        INLINE_MESSAGE_BYTES_MAX as usize * 2,
    )
}

/// Ships every blob of the resource at `from` into `to`'s blob store, as replication will.
fn ship_blobs(from: &Path, to: &MailResource) {
    let blobs = from.join(PRIVATE_DIR).join("blobs");
    for fan in names_in(&blobs).into_iter().filter(|n| n != "tmp") {
        for blob in names_in(&blobs.join(&fan)) {
            let id: BlobId = blob.parse().unwrap();
            if !to.blob_store().contains(&id) {
                let stored = to
                    .blob_store()
                    .put(fs::File::open(blobs.join(&fan).join(&blob)).unwrap());
                assert_eq!(stored.unwrap().id, id);
            }
        }
    }
}

#[async_trait::async_trait]
impl Subject for MailSubject {
    async fn open(&self) -> Arc<dyn Resource> {
        open(&self.primary())
    }

    async fn open_standby(&self) -> Arc<dyn Resource> {
        open(&self.dir.path().join("standby"))
    }

    async fn open_replica(&self, n: u32) -> Arc<dyn Resource> {
        open(&self.dir.path().join(format!("replica-{n}")))
    }

    async fn fail_next_replay(&self, resource: &Arc<dyn Resource>) {
        mail(resource).fail_next_replay();
    }

    async fn write(&self, resource: &Arc<dyn Resource>, xid: &Xid, tag: u32) {
        let branch = mail(resource).branch(xid);
        branch.enqueue(&tag_message(tag)[..]).await.unwrap();
        branch.enqueue(&tag_large_message(tag)[..]).await.unwrap();
    }

    async fn visible(&self, resource: &Arc<dyn Resource>, tag: u32) -> bool {
        let delivered = delivered(mail(resource).maildir());
        let has = |expected: Vec<u8>| delivered.values().any(|content| *content == expected);
        has(tag_message(tag)) && has(tag_large_message(tag))
    }

    async fn pause_prepare(&self, resource: &Arc<dyn Resource>, xid: &Xid) -> Box<dyn Paused> {
        Box::new(mail(resource).pause_prepare(xid))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_resource_passes_the_conformance_suite() {
    let subject = MailSubject {
        dir: tempfile::tempdir().unwrap(),
    };
    testing::run_all(&subject).await;
}

// Delivery.

/// Messages are invisible until commit, then each is in `new/` under the name enqueue returned
/// (`<time>.C<xid>P<pos>.<host>`), byte for byte, and `tmp/` is empty.
#[tokio::test]
async fn a_commit_delivers_each_message_into_new_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, branch) = begun(&r).await;
    let crlf = message("crlf");
    let lf: Vec<u8> = String::from_utf8(message("lf"))
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    let large = large_message("large", INLINE_MESSAGE_BYTES_MAX as usize * 2);
    let mut names = Vec::new();
    for m in [&crlf, &lf, &large] {
        names.push(branch.enqueue(&m[..]).await.unwrap());
    }
    let from_builder = branch.enqueue_built(&built("built")).await.unwrap();
    assert_eq!(names[1].bytes, message("lf").len() as u64, "LF made CRLF");
    names.push(from_builder);
    for (pos, enqueued) in names.iter().enumerate() {
        let prefix = format!(".C{xid}P{pos}.");
        assert!(enqueued.name.contains(&prefix), "{}", enqueued.name);
        assert!(!enqueued.name.contains('/') && !enqueued.name.contains(':'));
    }
    assert!(delivered(r.maildir()).is_empty());
    let redo = decode_redo(&prepare_vote(&r, &xid).await).unwrap();
    assert!(matches!(&redo[2], RedoEntry::Blob { bytes, .. } if *bytes == large.len() as u64));
    assert!(matches!(&redo[0], RedoEntry::Inline { content, .. } if *content == crlf));
    assert_eq!(names_in(&sub(&r, "tmp")).len(), 4, "prepared in tmp/");
    assert!(
        delivered(r.maildir()).is_empty(),
        "prepared is not delivered"
    );

    r.commit(&xid).await.unwrap();
    let expected: BTreeMap<String, Vec<u8>> = names
        .iter()
        .map(|e| format!("new/{}", e.name))
        .zip([crlf, message("lf"), large, message("built")])
        .collect();
    assert_eq!(delivered(r.maildir()), expected);
    assert!(names_in(&sub(&r, "tmp")).is_empty());
}

/// Rollback of a prepared and of an active branch leaves nothing in `tmp/`, `new/` or `cur/`.
#[tokio::test]
async fn rollback_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let large = large_message("large", INLINE_MESSAGE_BYTES_MAX as usize * 2);
    for prepare in [true, false] {
        let (xid, branch) = begun(&r).await;
        branch.enqueue(&message("small")[..]).await.unwrap();
        branch.enqueue(&large[..]).await.unwrap();
        if prepare {
            prepare_vote(&r, &xid).await;
        }
        r.rollback(&xid).await.unwrap();
        assert!(names_in(&sub(&r, "tmp")).is_empty(), "prepared: {prepare}");
        assert!(delivered(r.maildir()).is_empty());
        assert!(r.recover().await.unwrap().is_empty());
    }
}

/// A prepared branch survives a crash (listed by `recover` and `prepared_on_disk`), and commits
/// or rolls back afterwards; a large message's file stays in `tmp/` meanwhile.
#[tokio::test]
async fn prepared_branches_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let large = large_message("large", INLINE_MESSAGE_BYTES_MAX as usize * 2);
    let (to_commit, a) = begun(&r).await;
    let small = a.enqueue(&message("a")[..]).await.unwrap();
    let big = a.enqueue(&large[..]).await.unwrap();
    let (to_roll_back, b) = begun(&r).await;
    b.enqueue(&message("b")[..]).await.unwrap();
    prepare_vote(&r, &to_commit).await;
    prepare_vote(&r, &to_roll_back).await;
    drop((a, b, r));

    let mut expected = vec![to_commit, to_roll_back];
    expected.sort();
    assert_eq!(prepared_on_disk(dir.path()).unwrap(), expected);
    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), expected);
    r.commit(&to_commit).await.unwrap();
    r.rollback(&to_roll_back).await.unwrap();
    let want: BTreeMap<String, Vec<u8>> = [
        (format!("new/{}", small.name), message("a")),
        (format!("new/{}", big.name), large),
    ]
    .into();
    assert_eq!(delivered(r.maildir()), want);
    assert!(names_in(&sub(&r, "tmp")).is_empty());
    assert!(r.recover().await.unwrap().is_empty());
    drop(r);
    assert!(prepared_on_disk(dir.path()).unwrap().is_empty());
    assert!(open(dir.path()).recover().await.unwrap().is_empty());
}

/// The staged messages of a branch that never prepared are removed from `tmp/` at open; a file
/// another program is delivering in `tmp/` is left alone.
#[tokio::test]
async fn open_removes_the_messages_of_unprepared_branches_only() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (_, branch) = begun(&r).await;
    let large = large_message("large", INLINE_MESSAGE_BYTES_MAX as usize * 2);
    let staged = branch.enqueue(&large[..]).await.unwrap();
    assert_eq!(names_in(&sub(&r, "tmp")), vec![staged.name.clone()]);
    let foreign = "1730000000.M123P456Q7.otherhost";
    fs::write(sub(&r, "tmp").join(foreign), b"another MDA at work").unwrap();
    drop((branch, r));

    let r = open(dir.path());
    assert_eq!(names_in(&sub(&r, "tmp")), vec![foreign.to_string()]);
}

/// Branches committing concurrently all deliver (their prepares share the log's syncs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_branches_all_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let mut tasks = Vec::new();
    for i in 0..16 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let tag = format!("c{i}");
            let (_, names, _) = commit_messages(&r, &[&message(&tag)]).await;
            (names, tag)
        }));
    }
    let mut expected = BTreeMap::new();
    for task in tasks {
        let (names, tag) = task.await.unwrap();
        expected.insert(format!("new/{}", names[0]), message(&tag));
    }
    assert_eq!(delivered(r.maildir()), expected);
}

// Names make delivery idempotent.

#[tokio::test]
async fn committing_twice_delivers_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, names, _) = commit_messages(&r, &[&message("once")]).await;
    r.commit(&xid).await.unwrap();
    assert_eq!(delivered(r.maildir()).len(), 1);
    drop(r);
    let r = open(dir.path());
    r.commit(&xid).await.unwrap();
    assert_eq!(
        delivered(r.maildir()).into_keys().collect::<Vec<_>>(),
        vec![format!("new/{}", names[0])]
    );
}

/// A commit interrupted by a crash — one message delivered and since moved to `cur/` by a
/// reader, another delivered with a copy left in `tmp/` (a file system that does not keep a
/// rename atomic), a third not delivered — is finished after the restart with each message
/// delivered exactly once.
#[tokio::test]
async fn a_commit_repeated_after_a_crash_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, branch) = begun(&r).await;
    let mut names = Vec::new();
    for tag in ["read", "copied", "waiting"] {
        names.push(branch.enqueue(&message(tag)[..]).await.unwrap().name);
    }
    prepare_vote(&r, &xid).await;
    let (tmp, new) = (sub(&r, "tmp"), sub(&r, "new"));
    fs::rename(tmp.join(&names[0]), new.join(&names[0])).unwrap();
    let seen = read_by_a_reader(r.maildir(), &names[0]);
    fs::copy(tmp.join(&names[1]), new.join(&names[1])).unwrap();
    drop((branch, r));

    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![xid]);
    r.commit(&xid).await.unwrap();
    r.commit(&xid).await.unwrap();
    let want: BTreeMap<String, Vec<u8>> = [
        (format!("cur/{seen}"), message("read")),
        (format!("new/{}", names[1]), message("copied")),
        (format!("new/{}", names[2]), message("waiting")),
    ]
    .into();
    assert_eq!(delivered(r.maildir()), want);
    assert!(names_in(&sub(&r, "tmp")).is_empty());
}

/// Replay delivers under the primary's names; the same redo again at a higher LSN (as after a
/// crash before the LSN was stored), even after a reader moved a message to `cur/`, delivers
/// nothing twice; a lower LSN is a no-op.
#[tokio::test]
async fn replay_delivers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let primary = open(&dir.path().join("primary"));
    let large = large_message("large", INLINE_MESSAGE_BYTES_MAX as usize * 2);
    let (_, names, redo) = commit_messages(&primary, &[&message("r1"), &large]).await;
    let standby_dir = dir.path().join("standby");
    let standby = open(&standby_dir);
    ship_blobs(primary.maildir(), &standby);

    standby.replay(&redo, Lsn(5)).await.unwrap();
    assert_eq!(delivered(standby.maildir()), delivered(primary.maildir()));
    let seen = read_by_a_reader(standby.maildir(), &names[0]);
    // A crash after the delivery, before the applied LSN was stored.
    drop(standby);
    fs::remove_file(standby_dir.join(PRIVATE_DIR).join("applied_lsn")).unwrap();
    let standby = open(&standby_dir);
    assert_eq!(standby.applied_lsn().await.unwrap(), Lsn::ZERO);
    standby.replay(&redo, Lsn(5)).await.unwrap();
    standby.replay(&redo, Lsn(6)).await.unwrap();
    standby.replay(&redo, Lsn(3)).await.unwrap();
    let want: BTreeMap<String, Vec<u8>> = [
        (format!("cur/{seen}"), message("r1")),
        (format!("new/{}", names[1]), large),
    ]
    .into();
    assert_eq!(delivered(standby.maildir()), want);
    assert_eq!(standby.applied_lsn().await.unwrap(), Lsn(6));
    assert!(names_in(&sub(&standby, "tmp")).is_empty());
}

#[tokio::test]
async fn replay_of_a_blob_not_shipped_yet_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let content = large_message("late", INLINE_MESSAGE_BYTES_MAX as usize * 2);
    let name = "1700000000.Cn1e1s1P0.primary".to_string();
    let redo = encode_redo(&[RedoEntry::Blob {
        name: name.clone(),
        id: BlobId::of(&content),
        bytes: content.len() as u64,
    }]);
    let error = r.replay(&redo, Lsn(5)).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Retryable, "{error}");
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn::ZERO);
    assert!(delivered(r.maildir()).is_empty() && names_in(&sub(&r, "tmp")).is_empty());
    r.blob_store().put(&content[..]).unwrap();
    r.replay(&redo, Lsn(5)).await.unwrap();
    assert_eq!(
        delivered(r.maildir()),
        [(format!("new/{name}"), content)].into()
    );
}

#[tokio::test]
async fn replay_refuses_a_malformed_redo_and_a_name_leading_out() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(&dir.path().join("maildir"));
    let message_text = rejected(r.replay(&[9, 0, 0], Lsn(1)).await);
    assert!(message_text.contains("malformed redo"), "{message_text}");
    let mut escaping = encode_redo(&[RedoEntry::Inline {
        name: "x".repeat(11),
        content: message("x"),
    }]);
    // The name's bytes follow the version, the count, the op and the length.
    escaping[7..18].copy_from_slice(b"../../victi");
    let message_text = rejected(r.replay(&escaping, Lsn(1)).await);
    assert!(message_text.contains("malformed redo"), "{message_text}");
    assert!(!dir.path().join("victi").exists());
    assert_eq!(r.applied_lsn().await.unwrap(), Lsn::ZERO);
}

// Limits and validation.

/// A message over `max_message_bytes` (counted with CRLF endings) is refused naming the limit,
/// and nothing of it stays in `tmp/`; one of exactly the limit is taken.
#[tokio::test]
async fn a_message_over_max_message_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 200_000;
    let config = MailConfig {
        max_message_bytes: limit,
        ..config()
    };
    let r = MailResource::open("mail", dir.path(), config).unwrap();
    let (xid, branch) = begun(&r).await;
    let mut exact = large_message("big", limit as usize);
    exact.truncate(limit as usize);
    if exact.ends_with(b"\r") {
        exact.pop();
        exact.push(b'z');
    }
    let mut over = exact.clone();
    over.push(b'x');
    let reason = rejected(branch.enqueue(&over[..]).await);
    assert!(
        reason.contains("resource mail")
            && reason.contains("max_message_bytes = 200000")
            && reason.contains(&format!("branch {xid}")),
        "{reason}"
    );
    assert!(names_in(&sub(&r, "tmp")).is_empty());
    // LF endings that become CRLF count as two bytes.
    let lf: Vec<u8> = String::from_utf8(over.clone())
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    assert!((lf.len() as u64) < limit);
    assert!(rejected(branch.enqueue(&lf[..]).await).contains("max_message_bytes"));
    assert_eq!(
        branch.enqueue(&exact[..]).await.unwrap().bytes,
        limit,
        "exactly the limit is taken"
    );
    prepare_vote(&r, &xid).await;
    r.commit(&xid).await.unwrap();
    assert_eq!(delivered(r.maildir()).len(), 1);
}

/// Asserts that enqueuing `raw` is refused with a reason naming the resource and saying `what`,
/// that nothing of it stays, and that the branch still takes a good message afterwards.
async fn assert_refused(raw: &[u8], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, branch) = begun(&r).await;
    let reason = rejected(branch.enqueue(raw).await);
    assert!(
        reason.starts_with("resource mail: message 0 of branch") && reason.contains(what),
        "refusal should say {what:?}: {reason}"
    );
    let good = branch.enqueue(&message("good")[..]).await.unwrap();
    prepare_vote(&r, &xid).await;
    r.commit(&xid).await.unwrap();
    assert_eq!(
        delivered(r.maildir()),
        [(format!("new/{}", good.name), message("good"))].into()
    );
    assert!(names_in(&sub(&r, "tmp")).is_empty());
}

const HEAD: &str = "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nFrom: a@example.org\r\n";

#[tokio::test]
async fn a_message_without_a_header_body_separator_is_refused() {
    assert_refused(HEAD.as_bytes(), "no header/body separator").await;
    assert_refused(
        format!("{HEAD}Subject: no blank line, body follows").as_bytes(),
        "no header/body separator",
    )
    .await;
}

#[tokio::test]
async fn a_header_line_without_a_colon_is_refused() {
    assert_refused(
        format!("{HEAD}Subject hello\r\n\r\nbody").as_bytes(),
        "line 3: malformed header field",
    )
    .await;
    assert_refused(
        format!("{HEAD}NoColonHere\r\n\r\nbody").as_bytes(),
        "no colon",
    )
    .await;
}

#[tokio::test]
async fn a_bad_field_name_is_refused() {
    assert_refused(
        format!("{HEAD}Subject : x\r\n\r\n").as_bytes(),
        "white space in the field name",
    )
    .await;
    assert_refused(
        format!("{HEAD}Sub\u{e9}ject: x\r\n\r\n").as_bytes(),
        "in the field name",
    )
    .await;
    assert_refused(format!("{HEAD}: x\r\n\r\n").as_bytes(), "empty field name").await;
    assert_refused(
        format!(" folded: x\r\n{HEAD}\r\n").as_bytes(),
        "continuation line",
    )
    .await;
}

#[tokio::test]
async fn a_header_line_over_998_bytes_is_refused() {
    let long = format!("{HEAD}Subject: {}\r\n\r\n", "x".repeat(990));
    assert_refused(long.as_bytes(), "header line over 998 bytes").await;
}

#[tokio::test]
async fn a_bare_cr_is_refused() {
    assert_refused(format!("{HEAD}\r\nbody\rmore\r\n").as_bytes(), "bare CR").await;
    assert_refused(format!("{HEAD}Subject: a\rb\r\n\r\n").as_bytes(), "bare CR").await;
    let lf = format!("{HEAD}\r\nbody\rmore\r\n").replace("\r\n", "\n");
    assert_refused(lf.as_bytes(), "line 4: a CR not followed by LF").await;
}

#[tokio::test]
async fn mixed_line_endings_are_refused() {
    assert_refused(
        format!("{HEAD}\r\nbody\nmore\r\n").as_bytes(),
        "line 4: mixed line endings: the first line ends in CRLF, this one in LF",
    )
    .await;
    let lf_first = HEAD.replacen("\r\n", "\n", 1);
    assert_refused(
        format!("{lf_first}\nbody\n").as_bytes(),
        "line 2: mixed line endings: the first line ends in LF, this one in CRLF",
    )
    .await;
}

#[tokio::test]
async fn an_all_lf_message_is_stored_with_crlf() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let lf = format!("{HEAD}\r\nline one\r\nline two\r\n").replace("\r\n", "\n");
    let (_, names, _) = commit_messages(&r, &[lf.as_bytes()]).await;
    let stored = fs::read(sub(&r, "new").join(&names[0])).unwrap();
    assert_eq!(
        stored,
        format!("{HEAD}\r\nline one\r\nline two\r\n").into_bytes()
    );
}

#[tokio::test]
async fn a_nul_byte_is_refused() {
    assert_refused(format!("{HEAD}\r\nbo\0dy\r\n").as_bytes(), "a NUL byte").await;
}

#[tokio::test]
async fn the_required_fields_are_checked() {
    assert_refused(
        b"From: a@example.org\r\n\r\nbody",
        "no Date field: RFC 5322 requires exactly one",
    )
    .await;
    assert_refused(
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\nbody",
        "no From field",
    )
    .await;
    assert_refused(
        format!("{HEAD}Subject: 1\r\nsubject: 2\r\n\r\n").as_bytes(),
        "more than one Subject field",
    )
    .await;
}

/// A CR or LF in a builder field is refused (header injection), naming the field and the
/// resource; nothing is enqueued.
#[tokio::test]
async fn header_injection_through_the_builder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, branch) = begun(&r).await;
    for (builder, field) in [
        (
            built("a").subject("hi\r\nBcc: victim@example.org"),
            "Subject",
        ),
        (
            built("b").to("x@example.org\nBcc: victim@example.org"),
            "To",
        ),
        (
            MessageBuilder::new()
                .from("a@example.org\r\nBcc: victim@example.org")
                .to("x@example.org"),
            "From",
        ),
        (built("c").message_id("<a@b>\rX: y"), "Message-ID"),
    ] {
        let reason = rejected(branch.enqueue_built(&builder).await);
        assert!(
            reason.starts_with("resource mail:")
                && reason.contains(&format!("{field}: a CR or LF in the value would inject")),
            "{reason}"
        );
    }
    assert_eq!(r.prepare(&xid).await.unwrap(), Vote::ReadOnly);
}

#[tokio::test]
async fn a_branch_takes_at_most_branch_messages_max() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, branch) = begun(&r).await;
    let tiny = format!("{HEAD}\r\n");
    for _ in 0..BRANCH_MESSAGES_MAX {
        branch.enqueue(tiny.as_bytes()).await.unwrap();
    }
    let reason = rejected(branch.enqueue(tiny.as_bytes()).await);
    assert!(reason.contains("BRANCH_MESSAGES_MAX"), "{reason}");
    r.rollback(&xid).await.unwrap();
}

// What is a Maildir.

#[tokio::test]
async fn a_missing_maildir_is_refused_naming_it_unless_create_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere");
    let no_create = MailConfig {
        create: false,
        ..config()
    };
    let reason = rejected(MailResource::open("mail", &path, no_create).map(|_| ()));
    assert!(
        reason.contains(&path.display().to_string())
            && reason.contains("does not exist")
            && reason.contains("create = true"),
        "{reason}"
    );
    assert!(!path.exists());
    open(&path);
    for sub in ["tmp", "new", "cur"] {
        assert!(path.join(sub).is_dir(), "{sub} created");
    }
}

#[tokio::test]
async fn a_directory_missing_a_subdirectory_is_not_a_maildir() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half");
    fs::create_dir_all(path.join("tmp")).unwrap();
    fs::create_dir_all(path.join("new")).unwrap();
    let no_create = MailConfig {
        create: false,
        ..config()
    };
    let reason = rejected(MailResource::open("mail", &path, no_create.clone()).map(|_| ()));
    assert!(
        reason.contains(&format!("{} is not a Maildir", path.display()))
            && reason.contains("subdirectory cur/ is missing"),
        "{reason}"
    );
    assert!(!path.join("cur").exists() && !path.join(PRIVATE_DIR).exists());
    fs::write(path.join("cur"), b"a file").unwrap();
    let reason = rejected(MailResource::open("mail", &path, no_create).map(|_| ()));
    assert!(reason.contains("is not a directory"), "{reason}");
    fs::remove_file(path.join("cur")).unwrap();
    open(&path);
    assert!(path.join("cur").is_dir());
    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    let reason = rejected(MailResource::open("mail", &file, config()).map(|_| ()));
    assert!(
        reason.contains(&format!("Maildir {} is not a directory", file.display())),
        "{reason}"
    );
}

#[tokio::test]
async fn a_second_instance_on_the_same_maildir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let reason = rejected(MailResource::open("mail", dir.path(), config()).map(|_| ()));
    assert!(reason.contains("another instance"), "{reason}");
    drop(first);
    open(dir.path());
}

// Fencing and damage.

#[tokio::test]
async fn a_fenced_branch_can_neither_enqueue_nor_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let old = xid_at(1);
    r.begin(&old).await.unwrap();
    let branch = r.branch(&old);
    branch.enqueue(&message("before")[..]).await.unwrap();
    r.fence(Epoch(2)).await.unwrap();
    let fenced =
        |result: &Result<_, ResourceError>| matches!(result, Err(ResourceError::Fenced { .. }));
    assert!(fenced(
        &branch.enqueue(&message("after")[..]).await.map(|_| ())
    ));
    assert!(fenced(&r.prepare(&old).await.map(|_| ())));
    r.rollback(&old).await.unwrap();
    drop((branch, r));
    let r = open(dir.path());
    assert_eq!(r.fence_epoch().await.unwrap(), Epoch(2));
    assert!(fenced(&r.begin(&xid_at(1)).await));
}

#[tokio::test]
async fn a_damaged_fence_file_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    r.fence(Epoch(3)).await.unwrap();
    drop(r);
    let fence = dir.path().join(PRIVATE_DIR).join("fence");
    let mut bytes = fs::read(&fence).unwrap();
    bytes[2] ^= 0xff;
    fs::write(&fence, bytes).unwrap();
    match MailResource::open("mail", dir.path(), config()) {
        Err(e @ ResourceError::Fatal { .. }) => {
            assert!(e.to_string().contains("is damaged"), "{e}")
        }
        Err(other) => panic!("expected Fatal, got {other:?}"),
        Ok(_) => panic!("a damaged fence file was accepted"),
    }
}

#[tokio::test]
async fn a_staged_message_removed_by_hand_fails_prepare_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (xid, branch) = begun(&r).await;
    let large = large_message("large", INLINE_MESSAGE_BYTES_MAX as usize * 2);
    let staged = branch.enqueue(&large[..]).await.unwrap();
    fs::remove_file(sub(&r, "tmp").join(&staged.name)).unwrap();
    let reason = rejected(r.prepare(&xid).await);
    assert!(
        reason.contains("is missing") && reason.contains("changed by hand"),
        "{reason}"
    );
    assert!(r.recover().await.unwrap().is_empty());
    r.rollback(&xid).await.unwrap();
}

// The branch log.

/// Over 8 MiB of prepare records trims the log; a branch prepared before is carried forward
/// and survives a restart, and the log keeps few segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_prepared_long_ago_survives_trims_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let (old, branch) = begun(&r).await;
    let kept = branch.enqueue(&message("old")[..]).await.unwrap();
    prepare_vote(&r, &old).await;
    // Sixteen messages of 60 KiB inline: about 1 MiB of prepare record per branch.
    let batch: Vec<Vec<u8>> = (0..16)
        .map(|i| large_message(&format!("m{i}"), 60 << 10))
        .collect();
    let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
    for _ in 0..40 {
        commit_messages(&r, &refs).await;
    }
    let log = dir.path().join(PRIVATE_DIR).join("log");
    let segments = names_in(&log)
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .count();
    assert!(segments <= 2, "{segments} segments after trims");
    drop((branch, r));

    let r = open(dir.path());
    assert_eq!(r.recover().await.unwrap(), vec![old]);
    r.commit(&old).await.unwrap();
    assert_eq!(
        fs::read(sub(&r, "new").join(&kept.name)).unwrap(),
        message("old")
    );
}

// A large message in bounded memory.

/// Body lines of the streamed message: 80 bytes each with LF endings, 64 MiB in all.
const STREAMED_LINES: u64 = (64 << 20) / 80;
/// Peak resident memory allowed for the whole child process.
const RESIDENT_BYTES_MAX: u64 = 32 << 20;
/// How long the child may take.
const CHILD_DEADLINE: Duration = Duration::from_secs(600);

/// A message of lines ending in LF or CRLF, generated as it is read: a header, then `lines`
/// numbered body lines of 80 bytes (81 with CRLF).
struct Generator {
    crlf: bool,
    lines: u64,
    line: u64,
    pending: Vec<u8>,
    at: usize,
    header_done: bool,
}

impl Generator {
    fn new(crlf: bool, lines: u64) -> Generator {
        Generator {
            crlf,
            lines,
            line: 0,
            pending: Vec::new(),
            at: 0,
            header_done: false,
        }
    }

    fn end(&self) -> &'static str {
        if self.crlf { "\r\n" } else { "\n" }
    }

    /// Refills `pending` with the next line; false at the end.
    fn next_line(&mut self) -> bool {
        let end = self.end();
        self.pending.clear();
        self.at = 0;
        if !self.header_done {
            self.header_done = true;
            let head = format!(
                "Date: Tue, 14 Nov 2023 22:13:20 +0000{end}From: big@example.org{end}To: you@example.org{end}Subject: a large message{end}{end}"
            );
            self.pending.extend_from_slice(head.as_bytes());
            return true;
        }
        if self.line >= self.lines {
            return false;
        }
        self.line += 1;
        let text = format!("{:010} {}{end}", self.line, "y".repeat(68));
        self.pending.extend_from_slice(text.as_bytes());
        true
    }

    fn produce(&mut self, out: &mut [u8]) -> usize {
        if self.at == self.pending.len() && !self.next_line() {
            return 0;
        }
        let n = out.len().min(self.pending.len() - self.at);
        out[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        n
    }
}

impl AsyncRead for Generator {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.produce(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// What the streamed message must be stored as: the CRLF form of the generator's LF message.
fn expected_stream() -> (BlobId, u64) {
    let mut generator = Generator::new(true, STREAMED_LINES);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match generator.produce(&mut buf) {
            0 => return (BlobId(*hasher.finalize().as_bytes()), total),
            n => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
}

/// Runs `streamed_message_child` alone in a child process (this test binary again), so that its
/// peak resident memory is its own, and checks it stayed under `RESIDENT_BYTES_MAX`: a resource
/// that held the 64 MiB message in memory anywhere — enqueue, prepare, commit or replay — would
/// exceed it.
#[test]
fn a_64_mib_message_streams_through_in_bounded_memory() {
    let exe = std::env::current_exe().unwrap();
    let mut command = Command::new(exe);
    command.args([
        "--exact",
        "streamed_message_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    let output = output_within(command, CHILD_DEADLINE, "the streaming child").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the streaming child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let peak: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("peak resident bytes: ").map(|(_, n)| n))
        .unwrap_or_else(|| panic!("the child did not report its peak:\n{stdout}"))
        .trim()
        .parse()
        .unwrap();
    println!(
        "64 MiB message: child peak resident {:.1} MiB",
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        peak < RESIDENT_BYTES_MAX,
        "peak resident memory {peak} bytes is over {RESIDENT_BYTES_MAX}: the message was not streamed in bounded memory"
    );
}

/// The work of `a_64_mib_message_streams_through_in_bounded_memory`, run by it in a child
/// process: a 64 MiB message with LF endings streamed from a generator through enqueue (checked
/// and made CRLF on the way), prepare (adopted as a blob), commit, then replayed on a standby
/// from the shipped blob; both delivered files hash as expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone in a child process by a_64_mib_message_streams_through_in_bounded_memory"]
async fn streamed_message_child() {
    let dir = tempfile::tempdir().unwrap();
    let config = MailConfig {
        create: true,
        max_message_bytes: 128 << 20,
    };
    let primary = MailResource::open("mail", &dir.path().join("primary"), config.clone()).unwrap();
    let (xid, branch) = begun(&primary).await;
    let enqueued = branch
        .enqueue(Generator::new(false, STREAMED_LINES))
        .await
        .unwrap();
    let redo = prepare_vote(&primary, &xid).await;
    primary.commit(&xid).await.unwrap();
    let expected = expected_stream();
    assert!(
        expected.1 >= 64 << 20,
        "the message is {} bytes",
        expected.1
    );
    assert_eq!(enqueued.bytes, expected.1);
    assert_eq!(
        decode_redo(&redo).unwrap(),
        vec![RedoEntry::Blob {
            name: enqueued.name.clone(),
            id: expected.0,
            bytes: expected.1
        }]
    );
    let delivered_file = sub(&primary, "new").join(&enqueued.name);
    assert_eq!(hash_all(fs::File::open(&delivered_file).unwrap()), expected);

    let standby = MailResource::open("mail", &dir.path().join("standby"), config).unwrap();
    ship_blobs(primary.maildir(), &standby);
    standby.replay(&redo, Lsn(1)).await.unwrap();
    let replayed = sub(&standby, "new").join(&enqueued.name);
    assert_eq!(hash_all(fs::File::open(&replayed).unwrap()), expected);
    println!("peak resident bytes: {}", peak_resident_bytes());
}

// Interoperability: Python's mailbox.Maildir reads the queue.

/// Reads the Maildir `argv[1]` with `mailbox.Maildir` and hashes the files in `argv[2]`; prints
/// JSON: every message Python finds (SHA-256 of `get_bytes`, its subdirectory, and the parsed
/// Subject, Message-ID and Date), the folders it lists, how many messages it finds in the
/// private area seen as a folder, and the SHA-256 of every expected file.
const PYTHON_READER: &str = r#"
import email, email.policy, email.utils, hashlib, json, mailbox, os, sys
md = mailbox.Maildir(sys.argv[1], factory=None, create=False)
messages = []
for key in md.keys():
    data = md.get_bytes(key)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    date = parsed["Date"]
    messages.append({
        "sha256": hashlib.sha256(data).hexdigest(),
        "subdir": md.get_message(key).get_subdir(),
        "subject": str(parsed["Subject"]),
        "message_id": str(parsed["Message-ID"]),
        "date": email.utils.parsedate_to_datetime(str(date)).timestamp() if date else None,
    })
try:
    private = len(md.get_folder("concord").keys())
except FileNotFoundError:
    private = 0
expected = {}
for name in sorted(os.listdir(sys.argv[2])):
    with open(os.path.join(sys.argv[2], name), "rb") as f:
        expected[name] = hashlib.sha256(f.read()).hexdigest()
print(json.dumps({
    "messages": messages,
    "folders": md.list_folders(),
    "private_messages": private,
    "expected": expected,
}))
"#;

/// How long python3 may take to read the queue.
const PYTHON_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `command` to its end, reading its output as it goes; kills it and panics naming `what`
/// after `deadline`. A command that cannot start is the `Err`.
fn output_within(
    mut command: Command,
    deadline: Duration,
    what: &str,
) -> io::Result<std::process::Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes).unwrap();
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} ran over {deadline:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    })
}

/// Runs `python` with `script` and `args`; panics with how to install python3 when `python`
/// cannot be found.
fn run_python_at(python: &str, script: &str, args: &[&Path]) -> String {
    let mut command = Command::new(python);
    command.arg("-c").arg(script).args(args);
    let output = match output_within(command, PYTHON_DEADLINE, python) {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "this test needs python3 (its standard library's mailbox.Maildir reads the queue) and \
             `{python}` was not found: install it (Debian/Ubuntu: apt-get install python3) or set \
             CONCORD_PYTHON3 to its path"
        ),
        Err(e) => panic!("run {python}: {e}"),
    };
    assert!(
        output.status.success(),
        "{python} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs python3 (`CONCORD_PYTHON3`, else `python3` on the PATH) with `script` and `args`.
fn run_python(script: &str, args: &[&Path]) -> String {
    let python = std::env::var("CONCORD_PYTHON3").unwrap_or_else(|_| "python3".to_string());
    run_python_at(&python, script, args)
}

/// Without python3 the interoperability test fails, saying how to install it (never skips).
#[test]
#[should_panic(expected = "install it (Debian/Ubuntu: apt-get install python3)")]
fn a_missing_python3_fails_saying_how_to_install_it() {
    run_python_at("/nonexistent/python3", "print(1)", &[]);
}

/// Committed messages — raw CRLF, raw LF (stored as CRLF), built with a UTF-8 subject, large
/// (blob-backed), one moved to `cur/` by a reader, one committed after a restart — are exactly
/// what Python's `mailbox.Maildir` finds, byte for byte; messages rolled back (prepared or not)
/// or still in doubt in `tmp/`, and the private area, are not. Python parses the built message's
/// Date, Message-ID and encoded Subject back to what was given.
#[tokio::test]
async fn python_mailbox_finds_exactly_the_committed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let r = open(&maildir);
    let crlf = message("crlf");
    let lf = String::from_utf8(message("lf"))
        .unwrap()
        .replace("\r\n", "\n");
    let subject =
        "Grüße — 注文 #42 is on its way, with a subject long enough to need several words";
    let utf8 = built("utf8").subject(subject).build().unwrap();
    let large = large_message("large", INLINE_MESSAGE_BYTES_MAX as usize * 3);
    let (_, names, _) = commit_messages(&r, &[&crlf, lf.as_bytes(), &utf8, &large]).await;
    read_by_a_reader(&maildir, &names[0]);

    let prepared = enqueued(
        &r,
        &[
            &message("rolled-back"),
            &large_message("rolled-back-large", 200_000),
        ],
    )
    .await;
    prepare_vote(&r, &prepared).await;
    r.rollback(&prepared).await.unwrap();
    let active = enqueued(&r, &[&large_message("active", 200_000)]).await;
    r.rollback(&active).await.unwrap();
    let in_doubt = enqueued(
        &r,
        &[
            &message("in-doubt"),
            &large_message("in-doubt-large", 200_000),
        ],
    )
    .await;
    prepare_vote(&r, &in_doubt).await;
    let after_restart = enqueued(&r, &[&message("after-restart")]).await;
    prepare_vote(&r, &after_restart).await;
    drop(r);
    let r = open(&maildir);
    r.commit(&after_restart).await.unwrap();
    assert_eq!(names_in(&sub(&r, "tmp")).len(), 2, "the in-doubt branch");

    let expected_dir = dir.path().join("expected");
    fs::create_dir(&expected_dir).unwrap();
    let committed = [crlf, message("lf"), utf8, large, message("after-restart")];
    for (i, m) in committed.iter().enumerate() {
        fs::write(expected_dir.join(format!("{i}.eml")), m).unwrap();
    }
    let out = run_python(PYTHON_READER, &[&maildir, &expected_dir]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut found: Vec<&str> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sha256"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = report["expected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    found.sort();
    expected.sort();
    assert_eq!(found, expected, "python found other messages: {out}");
    assert_eq!(report["private_messages"], 0, "{out}");
    let by_subject = |s: &str| {
        report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["subject"] == s)
            .unwrap_or_else(|| panic!("python found no message with subject {s:?}: {out}"))
            .clone()
    };
    let decoded = by_subject(subject);
    assert_eq!(decoded["message_id"], "<utf8@concord.test>");
    assert_eq!(decoded["date"].as_f64(), Some(DATE_SECS as f64));
    assert_eq!(by_subject("message crlf")["subdir"], "cur");
    assert_eq!(by_subject("message lf")["subdir"], "new");
}

// Blob collection.

/// The coordinator's side of a collection in a test: the set it names, after running `work`.
struct Retained {
    set: std::collections::HashSet<BlobId>,
    work: tokio::sync::Mutex<Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
}

#[async_trait::async_trait]
impl RetainedBlobs for Retained {
    async fn retained_blobs(&self) -> Result<std::collections::HashSet<BlobId>, ResourceError> {
        let work = self.work.lock().await.take();
        if let Some(work) = work {
            work.await;
        }
        Ok(self.set.clone())
    }
}

fn collected_message(n: u32) -> Vec<u8> {
    large_message(&format!("m{n}"), INLINE_MESSAGE_BYTES_MAX as usize * 2)
}

/// A branch enqueueing `collected_message(n)`, prepared.
async fn prepared_message(r: Arc<MailResource>, n: u32) -> Xid {
    let (xid, branch) = begun(&r).await;
    branch.enqueue(&collected_message(n)[..]).await.unwrap();
    prepare_vote(&r, &xid).await;
    xid
}

/// A collection removes the blobs of delivered and rolled-back messages no retained record
/// names, and keeps those a retained record names, those of a prepared branch, and one that a
/// prepare adopts (already stored) while the coordinator computes its set; delivered messages
/// stay in `new/`.
#[tokio::test]
async fn blob_collection_removes_only_what_nothing_needs() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    let large = collected_message;
    let id = |n: u32| BlobId::of(&large(n));
    let prepared_one = |n: u32| prepared_message(r.clone(), n);
    let delivered_one = prepared_one(1).await;
    r.commit(&delivered_one).await.unwrap();
    let rolled_back = prepared_one(2).await;
    r.rollback(&rolled_back).await.unwrap();
    let prepared = prepared_one(3).await;
    let retained_one = prepared_one(4).await;
    r.commit(&retained_one).await.unwrap();
    let stored = |r: &MailResource| -> Vec<BlobId> { r.blob_store().list().unwrap() };
    let mut all: Vec<BlobId> = (1..=4).map(id).collect();
    all.sort();
    assert_eq!(stored(&r), all);

    let again = {
        let r = r.clone();
        async move {
            prepared_message(r, 1).await;
        }
    };
    let retained = Retained {
        set: [id(4)].into_iter().collect(),
        work: tokio::sync::Mutex::new(Some(Box::pin(again))),
    };
    let collected = r.collect_blobs(&retained).await.unwrap();
    assert_eq!(collected.removed, 1, "{collected:?}");
    let mut kept: Vec<BlobId> = [1, 3, 4].into_iter().map(id).collect();
    kept.sort();
    assert_eq!(stored(&r), kept);
    r.commit(&prepared).await.unwrap();
    let contents: Vec<Vec<u8>> = delivered(r.maildir()).into_values().collect();
    for n in [1, 3, 4] {
        assert!(contents.contains(&large(n)), "message {n} is not delivered");
    }
    // Nothing retained: only the blob of the branch the callback prepared (still open) stays.
    let none = Retained {
        set: std::collections::HashSet::new(),
        work: tokio::sync::Mutex::new(None),
    };
    let collected = r.collect_blobs(&none).await.unwrap();
    assert_eq!((collected.removed, collected.kept), (2, 1));
    assert_eq!(stored(&r), vec![id(1)]);
    assert_eq!(delivered(r.maildir()).len(), 3);
}

#[tokio::test]
async fn health_fails_once_a_maildir_directory_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path());
    r.health().await.unwrap();
    fs::remove_dir(dir.path().join("new")).unwrap();
    let e = r.health().await.unwrap_err().to_string();
    assert!(e.contains("new/") && e.contains("mail"), "{e}");
    fs::create_dir(dir.path().join("new")).unwrap();
    r.health().await.unwrap();
}

/// Re-seeding by message name: a message a reader moved to `cur/` (with its flags) is read
/// there and delivered into `new/` on the other site, where a stale entry of the same name in
/// `cur/` goes; the inventories are then equal. A key that is not a message name is refused.
#[tokio::test]
async fn reseed_copies_messages_seen_by_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (open(&dir.path().join("a")), open(&dir.path().join("b")));
    let (_, names, _) = commit_messages(&a, &[&message("seen"), &message("unseen")]).await;
    let seen = &names[0];
    fs::rename(
        a.maildir().join("new").join(seen),
        a.maildir().join("cur").join(format!("{seen}:2,S")),
    )
    .unwrap();
    fs::write(
        b.maildir().join("cur").join(format!("{seen}:2,RS")),
        b"stale",
    )
    .unwrap();
    let on_a = a.inventory().await.unwrap();
    assert_eq!(on_a.len(), 2);
    for entry in &on_a {
        let content = a.read_entry(&entry.key).await.unwrap().unwrap();
        b.write_entry(&entry.key, content).await.unwrap();
    }
    assert_eq!(b.inventory().await.unwrap(), on_a);
    assert!(b.maildir().join("new").join(seen).exists());
    assert_eq!(fs::read_dir(b.maildir().join("cur")).unwrap().count(), 0);
    b.remove_entry(seen).await.unwrap();
    assert!(b.read_entry(seen).await.unwrap().is_none());
    assert_eq!(b.inventory().await.unwrap().len(), 1);
    for bad in ["a/b", ".hidden", "x:2,S", ""] {
        rejected(
            b.write_entry(bad, Box::new(io::Cursor::new(b"x".to_vec())))
                .await,
        );
    }
}
