//! A primary and a standby in one process, over a real gRPC stream on loopback: the standby
//! follows, replays and ends equal to the primary; a restarted standby resumes where it was
//! with nothing applied twice; an interrupted blob resumes from the bytes already held; and
//! sync replication's commit gate (fail, fall back to async and back, RPO 0 with a standby).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use adapters::config::{ReplicationConfig, ReplicationMode, SyncFallback};
use adapters::{BlobId, Lsn};
use common::{
    Primary, STEP_DEADLINE, Standby, bytes, commit_work, mails, wait_equal, wait_until, within,
    work,
};
use coordinator::CoordError;
use coordinator::record::CoordRecord;
use participant::{ConcordError, TxnOutcome};

/// Size of the large file of the first test (its blob is shipped in 1 MiB chunks).
const LARGE_FILE_BYTES: usize = (3 << 20) + 4321;

fn sync(fallback: SyncFallback, wait_ms: u64) -> ReplicationConfig {
    ReplicationConfig {
        mode: ReplicationMode::Sync,
        sync_wait_ms_max: wait_ms,
        sync_fallback: fallback,
        ..ReplicationConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_follows_replays_and_equals_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Primary::start(&dir.path().join("primary"), ReplicationConfig::default()).await;
    let standby = Standby::start(&dir.path().join("standby"), &primary.url(), true).await;

    for n in 0..50 {
        let large = (n == 25).then_some(LARGE_FILE_BYTES);
        let mut tx = work(&primary.concord, n, large).await;
        within("commit", tx.commit()).await.unwrap();
    }
    wait_equal(&primary, &standby).await;

    let large = std::fs::read(dir.path().join("standby/uploads/docs/25.bin")).unwrap();
    assert_eq!(
        large,
        bytes(25, LARGE_FILE_BYTES),
        "the large file arrived whole"
    );
    assert!(
        standby.received().blob_bytes_received >= LARGE_FILE_BYTES as u64,
        "its blob was shipped: {}",
        standby.describe()
    );
    assert_eq!(mails(&dir.path().join("standby")).len(), 50);

    let durable = primary.durable();
    wait_until(
        "the primary sees the standby's acknowledgement",
        STEP_DEADLINE,
        || {
            let status = primary.shipper.status();
            status
                .standbys
                .iter()
                .any(|s| s.connected && s.acknowledged_lsn >= durable.0)
        },
        || format!("{:?}", primary.shipper.status()),
    )
    .await;
    let status = primary.shipper.status();
    assert!(status.connected, "{status:?}");
    assert_eq!(status.standbys.len(), 1, "{status:?}");
    assert_eq!(status.standbys[0].name, "standby-1");
    assert_eq!(status.standbys[0].shipped_lsn, durable.0, "{status:?}");
    assert_eq!(status.mode, "async");
    assert_eq!(status.sync_state, "async");

    let ended = standby.stop().await;
    assert!(
        matches!(ended.receiver, Some(Ok(()))),
        "the receiver ended badly"
    );
    assert!(matches!(ended.replay, Some(Ok(()))), "replay ended badly");
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_standby_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let standby_dir = dir.path().join("standby");
    let primary = Primary::start(&dir.path().join("primary"), ReplicationConfig::default()).await;
    let standby = Standby::start(&standby_dir, &primary.url(), true).await;

    // Commits go on while the standby is stopped in the middle of them.
    let committing = {
        let concord = primary.concord.clone();
        tokio::spawn(async move {
            for n in 0..40 {
                let large = (n == 30).then_some(1 << 20);
                let mut tx = work(&concord, n, large).await;
                within("commit", tx.commit()).await.unwrap();
            }
        })
    };
    wait_until(
        "the standby replays something",
        STEP_DEADLINE,
        || standby.replayed().replayed_lsn > Lsn(0),
        || standby.describe(),
    )
    .await;
    let ended = standby.stop().await;
    assert!(
        matches!(ended.receiver, Some(Ok(()))),
        "the receiver ended badly"
    );
    assert!(matches!(ended.replay, Some(Ok(()))), "replay ended badly");
    within("the commits", committing).await.unwrap();
    let before = mails(&standby_dir).len();
    assert!(before < 40, "the standby stopped mid-way ({before} mails)");

    let standby = Standby::start(&standby_dir, &primary.url(), true).await;
    commit_work(&primary.concord, 40, 10).await;
    wait_equal(&primary, &standby).await;
    assert_eq!(mails(&standby_dir), mails(&dir.path().join("primary")));
    assert_eq!(mails(&standby_dir).len(), 50, "each mail once");

    standby.stop().await;
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_blob_resumes_from_the_bytes_held() {
    let dir = tempfile::tempdir().unwrap();
    let standby_dir = dir.path().join("standby");
    let primary = Primary::start(&dir.path().join("primary"), ReplicationConfig::default()).await;
    let size = (2 << 20) + 777;
    let content = bytes(7, size);
    let mut tx = work(&primary.concord, 7, Some(size)).await;
    within("commit", tx.commit()).await.unwrap();
    primary.settle().await;

    let id = BlobId::of(&content);
    let half = size / 2;
    let partial = standby_dir.join("replication/partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join(format!("uploads.{id}")), &content[..half]).unwrap();

    let standby = Standby::start(&standby_dir, &primary.url(), true).await;
    wait_equal(&primary, &standby).await;
    let received = standby.received().blob_bytes_received;
    assert_eq!(
        received,
        (size - half) as u64,
        "the transfer resumed at byte {half}, it did not start over"
    );
    let blob = id.to_string();
    let stored = standby_dir.join(format!("uploads/.concord/blobs/{}/{blob}", &blob[..2]));
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        content,
        "the blob is whole"
    );
    assert_eq!(
        std::fs::read(standby_dir.join("uploads/docs/7.bin")).unwrap(),
        content
    );
    assert!(
        common::names_in(&partial).is_empty(),
        "the partial file is gone"
    );

    standby.stop().await;
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_commit_no_standby_confirms_fails_yet_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Primary::start(&dir.path().join("primary"), sync(SyncFallback::Fail, 300)).await;
    let mut tx = work(&primary.concord, 1, None).await;
    let xid = tx.xid();
    let started = Instant::now();
    let answer = within("commit", tx.commit()).await;
    let waited = started.elapsed();
    match &answer {
        Err(ConcordError::Coordinator(CoordError::NotConfirmed { xid: x, reason })) => {
            assert_eq!(*x, xid);
            assert!(reason.contains("sync_wait_ms_max"), "{reason}");
        }
        other => panic!("expected NotConfirmed, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(300),
        "it waited sync_wait_ms_max first ({waited:?})"
    );
    assert_eq!(
        primary.shipper.sync_state(),
        "sync",
        "no fallback configured"
    );
    match within("outcome", primary.concord.outcome(xid))
        .await
        .unwrap()
    {
        TxnOutcome::Committed(_) => {}
        other => panic!("the transaction is committed here, got {other:?}"),
    }
    primary.settle().await;
    let reader = within("begin", primary.concord.begin()).await.unwrap();
    let index = within("join", reader.kv("index")).await.unwrap();
    assert!(
        within("get", index.get(b"order/1"))
            .await
            .unwrap()
            .is_some(),
        "its work is there"
    );
    drop(reader);
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_primary_falls_back_to_async_and_back_once_a_standby_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Primary::start(&dir.path().join("primary"), sync(SyncFallback::Async, 300)).await;
    assert_eq!(primary.shipper.sync_state(), "sync");
    let started = Instant::now();
    commit_work(&primary.concord, 0, 1).await;
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    assert_eq!(primary.shipper.sync_state(), "fallback-async");
    let started = Instant::now();
    commit_work(&primary.concord, 1, 3).await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "fallen back, commits do not wait ({:?})",
        started.elapsed()
    );

    let standby = Standby::start(&dir.path().join("standby"), &primary.url(), true).await;
    wait_until(
        "back to sync once the standby caught up",
        STEP_DEADLINE,
        || primary.shipper.sync_state() == "sync",
        || format!("{}; {}", primary.shipper.sync_state(), standby.describe()),
    )
    .await;
    let lsns = commit_work(&primary.concord, 4, 3).await;
    let last = lsns.last().copied().unwrap();
    assert!(
        standby.journal.durable_lsn() >= last,
        "sync again: the standby journaled lsn {last} before the commit returned"
    );
    wait_equal(&primary, &standby).await;
    standby.stop().await;
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_sync_standby_every_acknowledged_commit_is_on_the_standby() {
    let dir = tempfile::tempdir().unwrap();
    let primary =
        Primary::start(&dir.path().join("primary"), sync(SyncFallback::Fail, 5_000)).await;
    let standby = Standby::start(&dir.path().join("standby"), &primary.url(), true).await;
    wait_until(
        "the standby connects",
        STEP_DEADLINE,
        || standby.received().connected,
        || standby.describe(),
    )
    .await;
    for n in 0..20 {
        let mut tx = work(&primary.concord, n, None).await;
        let committed = within("commit", tx.commit()).await.unwrap();
        let lsn = committed.lsn.unwrap();
        let there = standby.journal.durable_lsn();
        assert!(
            there >= lsn,
            "commit {n} at lsn {lsn} was answered while the standby's journal is durable only to {there}"
        );
    }
    assert_eq!(primary.shipper.sync_state(), "sync");
    wait_equal(&primary, &standby).await;
    standby.stop().await;
    primary.stop().await;
}

/// The blobs the primary's first `Commit` record names, in the order the primary ships them.
fn shipped_blobs(primary: &Primary) -> Vec<BlobId> {
    let coordinator = primary.concord.coordinator();
    for record in coordinator.journal().read_from(Lsn(1)).unwrap() {
        let record = record.unwrap();
        if let Ok(CoordRecord::Commit { branches, .. }) =
            CoordRecord::decode(record.kind, &record.payload)
        {
            let mut ids = Vec::new();
            for (name, redo) in branches {
                ids.extend(primary.resource(&name).redo_blobs(&redo).unwrap());
            }
            return ids;
        }
    }
    panic!("no Commit record on the primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_blob_resumes_after_another_blob_of_the_same_record() {
    let dir = tempfile::tempdir().unwrap();
    let standby_dir = dir.path().join("standby");
    let primary = Primary::start(&dir.path().join("primary"), ReplicationConfig::default()).await;
    let size = (1 << 20) + 333;
    let contents = [bytes(1, size), bytes(2, size)];
    let mut tx = within("begin", primary.concord.begin()).await.unwrap();
    let uploads = within("join", tx.files("uploads")).await.unwrap();
    for (path, content) in ["a.bin", "b.bin"].iter().zip(&contents) {
        within("put", uploads.put(path, &content[..]))
            .await
            .unwrap();
    }
    within("commit", tx.commit()).await.unwrap();
    primary.settle().await;

    // The transfer broke in the middle of the record's second blob; the first is stored.
    let order = shipped_blobs(&primary);
    assert_eq!(order.len(), 2, "{order:?}");
    let second = contents.iter().find(|c| BlobId::of(c) == order[1]).unwrap();
    let half = size / 2;
    let partial = standby_dir.join("replication/partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(
        partial.join(format!("uploads.{}", order[1])),
        &second[..half],
    )
    .unwrap();

    let standby = Standby::start(&standby_dir, &primary.url(), true).await;
    wait_equal(&primary, &standby).await;
    let view = standby.received();
    assert_eq!(
        view.blob_bytes_received,
        (2 * size - half) as u64,
        "the second blob resumed at byte {half}, the first was sent once"
    );
    standby.stop().await;
    primary.stop().await;
}
