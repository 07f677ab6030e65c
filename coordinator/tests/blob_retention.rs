//! The coordinator's side of blob collection, with a real files resource: a blob that a
//! retained journal record names stays, and goes once the checkpoint removed every record that
//! names it; a rolled-back branch's blob goes at once. Committed files stay in place throughout.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use adapters::files::{FilesConfig, FilesResource, INLINE_FILE_BYTES_MAX};
use adapters::{BlobId, Resource};
use coordinator::{Coordinator, CoordinatorConfig, Outcome};
use journal::{Journal, JournalConfig};

fn content(seed: u8) -> Vec<u8> {
    (0..INLINE_FILE_BYTES_MAX as usize + 1)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn stored(r: &FilesResource) -> Vec<BlobId> {
    r.blob_store().list().unwrap()
}

async fn put(c: &Coordinator, r: &FilesResource, path: &str, data: &[u8]) -> adapters::Xid {
    let xid = c.begin();
    c.join(&xid, "files").await.unwrap();
    r.branch(&xid).put(path, data).await.unwrap();
    xid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_go_once_no_retained_record_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let files = FilesResource::open(
        "files",
        &dir.path().join("root"),
        FilesConfig {
            create_if_missing: true,
            ..FilesConfig::default()
        },
    )
    .unwrap();
    let journal = Journal::open(
        dir.path().join("journal"),
        JournalConfig {
            create_if_missing: true,
            segment_bytes_max: 64 << 10,
            record_bytes_max: 16 << 10,
            ..JournalConfig::default()
        },
    )
    .unwrap();
    let config = CoordinatorConfig {
        checkpoint_ms: 0,
        blob_collect_ms: 0,
        ..CoordinatorConfig::default()
    };
    let resources = vec![Arc::clone(&files) as Arc<dyn Resource>];
    let (c, _) = Coordinator::open(config, journal, resources).await.unwrap();

    let kept = put(&c, &files, "kept", &content(1)).await;
    assert!(matches!(
        c.commit(&kept).await.unwrap(),
        Outcome::Committed { .. }
    ));
    let dropped = put(&c, &files, "dropped", &content(2)).await;
    files.prepare(&dropped).await.unwrap();
    c.rollback(&dropped, "test").await.unwrap();
    assert!(c.wait_settled(Duration::from_secs(5)).await);

    c.collect_blobs().await;
    assert_eq!(
        stored(&files),
        vec![BlobId::of(&content(1))],
        "the rolled-back branch's blob goes, the retained record's stays"
    );

    // Enough small transactions that the record naming the blob falls into a removed segment.
    for i in 0..2_000 {
        let xid = put(&c, &files, &format!("small/{i}"), b"x").await;
        c.commit(&xid).await.unwrap();
        if c.journal().oldest_lsn() > adapters::Lsn(3) {
            break;
        }
        if i % 50 == 0 {
            assert!(c.wait_settled(Duration::from_secs(5)).await);
            c.retention().checkpoint(c.journal()).unwrap();
        }
    }
    assert!(
        c.journal().oldest_lsn() > adapters::Lsn(3),
        "no segment was removed"
    );
    c.collect_blobs().await;
    assert!(stored(&files).is_empty(), "{:?}", stored(&files));
    assert_eq!(
        std::fs::read(dir.path().join("root/kept")).unwrap(),
        content(1)
    );
    c.shutdown(Duration::from_secs(5)).await;
}
