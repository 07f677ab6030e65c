//! The health canaries exercise the work path: on a full file system (a small tmpfs, which
//! needs root) the files and mail resources answer their health probe with an error, and `Ok`
//! once there is room again; no canary (files, mail, kv) leaves anything behind. (A sled store
//! writes into log segments it allocated earlier, so the kv canary passes on a full disk until
//! sled needs a new segment; its own test is in `kv/store.rs`.)

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use adapters::Resource;
use adapters::files::{FilesConfig, FilesResource};
use adapters::kv::{KvConfig, KvResource};
use adapters::mail::{MailConfig, MailResource};
use adapters::testing::{Tmpfs, fill_up};

/// Room for a resource's private area and its branch log; filled up before the probe.
const TMPFS_SIZE: &str = "32m";

fn files(root: &Path) -> Arc<dyn Resource> {
    let config = FilesConfig {
        create_if_missing: true,
        ..FilesConfig::default()
    };
    FilesResource::open("uploads", root, config).unwrap()
}

fn mail(maildir: &Path) -> Arc<dyn Resource> {
    let config = MailConfig {
        create: true,
        max_message_bytes: 1 << 20,
    };
    MailResource::open("outbox", maildir, config).unwrap()
}

fn kv(dir: &Path) -> Arc<dyn Resource> {
    let config = KvConfig {
        create_if_missing: true,
        ..KvConfig::default()
    };
    KvResource::open("index", dir, config).unwrap()
}

/// A resource on a tmpfs; dropped in field order: the resource, the mount, the directory.
struct Site {
    r: Arc<dyn Resource>,
    _tmpfs: Tmpfs,
    _dir: tempfile::TempDir,
}

/// Opens a resource on a tmpfs, fills the tmpfs, and checks the probe fails; then frees the
/// room.
async fn on_a_full_disk(open: fn(&Path) -> Arc<dyn Resource>) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("fs");
    let tmpfs = Tmpfs::mount(&mount, TMPFS_SIZE);
    let r = open(&mount.join("data"));
    r.health().await.unwrap();
    let filler = mount.join("filler");
    fill_up(&filler);
    let err = r
        .health()
        .await
        .expect_err("the health probe answered Ok on a full file system");
    let text = err.to_string();
    assert!(
        text.contains("health canary") || text.contains("No space"),
        "{text}"
    );
    std::fs::remove_file(&filler).unwrap();
    Site {
        r,
        _tmpfs: tmpfs,
        _dir: dir,
    }
}

#[tokio::test]
async fn files_health_fails_on_a_full_disk_and_answers_with_room() {
    let site = on_a_full_disk(files).await;
    site.r.health().await.unwrap();
}

#[tokio::test]
async fn mail_health_fails_on_a_full_disk_and_answers_with_room() {
    let site = on_a_full_disk(mail).await;
    site.r.health().await.unwrap();
}

#[tokio::test]
async fn canaries_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let opened = [
        files(&dir.path().join("files")),
        mail(&dir.path().join("mail")),
        kv(&dir.path().join("kv")),
    ];
    let before: Vec<_> = futures_inventory(&opened).await;
    for r in &opened {
        for _ in 0..3 {
            r.health().await.unwrap();
        }
    }
    assert_eq!(futures_inventory(&opened).await, before);
    for private in ["files/.concord/tmp", "mail/.concord/tmp"] {
        let left = std::fs::read_dir(dir.path().join(private)).unwrap().count();
        assert_eq!(left, 0, "{private}");
    }
}

async fn futures_inventory(rs: &[Arc<dyn Resource>]) -> Vec<Vec<adapters::InventoryEntry>> {
    let mut all = Vec::new();
    for r in rs {
        all.push(r.inventory().await.unwrap());
    }
    all
}
