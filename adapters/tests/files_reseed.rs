//! Re-seeding a files resource key by key: keys that lead out of the root (`..`, absolute, the
//! private area, symlinks) are refused and write nothing; a removal clears the directories it
//! leaves empty; a write removes a file or directory standing in its way; and a 64 MiB file is copied from
//! one instance to another through `read_entry` and `write_entry` in bounded memory (the peak
//! resident set, `VmHWM`, of this process — alone in this test binary's memory test — grows
//! by far less than the file).

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::{Cursor, Write};
use std::path::Path;
use std::sync::Arc;

use adapters::files::{FilesConfig, FilesResource};
use adapters::{BlobContent, Resource};
use common::{hash_all, peak_resident_bytes, rejected};

/// Size of the large file.
const FILE_BYTES: u64 = 64 << 20;
/// How much the peak resident set may grow while the large file is copied.
const RESIDENT_GROWTH_BYTES_MAX: u64 = 16 << 20;

fn open(root: &Path) -> Arc<FilesResource> {
    let config = FilesConfig {
        create_if_missing: true,
        ..FilesConfig::default()
    };
    FilesResource::open("files", root, config).unwrap()
}

fn content(bytes: &[u8]) -> BlobContent {
    Box::new(Cursor::new(bytes.to_vec()))
}

#[tokio::test]
async fn keys_with_dot_dot_absolute_or_private_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(&dir.path().join("root"));
    for key in [
        "../escape",
        "a/../../escape",
        "/tmp/escape",
        "./a",
        ".concord/fence",
        "a//b",
        "",
    ] {
        let why = rejected(r.write_entry(key, content(b"x")).await);
        assert!(why.contains("refused"), "{key:?}: {why}");
        rejected(r.read_entry(key).await.map(drop));
        rejected(r.remove_entry(key).await);
    }
    assert!(
        !dir.path().join("escape").exists(),
        "a write escaped the root"
    );
    assert!(r.inventory().await.unwrap().is_empty());
}

#[tokio::test]
async fn keys_through_a_symlink_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"outside").unwrap();
    let r = open(&root);
    fs::create_dir(root.join("inner")).unwrap();
    fs::write(root.join("inner/file"), b"inside").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
    std::os::unix::fs::symlink(root.join("inner"), root.join("in")).unwrap();
    std::os::unix::fs::symlink(root.join("inner/file"), root.join("alias")).unwrap();
    for key in ["out/secret", "out/new", "in/file", "alias"] {
        let why = rejected(r.write_entry(key, content(b"x")).await);
        assert!(why.contains("symlink"), "{key:?}: {why}");
        rejected(r.read_entry(key).await.map(drop));
        rejected(r.remove_entry(key).await);
    }
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"outside");
    assert!(
        !outside.join("new").exists(),
        "a write went through a symlink"
    );
    assert_eq!(fs::read(root.join("inner/file")).unwrap(), b"inside");
}

#[tokio::test]
async fn a_removal_clears_emptied_directories() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(&dir.path().join("root"));
    r.write_entry("x/y/z", content(b"deep")).await.unwrap();
    r.write_entry("x/keep", content(b"kept")).await.unwrap();
    r.remove_entry("x/y/z").await.unwrap();
    assert!(!r.root().join("x/y").exists(), "an emptied directory stays");
    assert!(r.root().join("x/keep").exists());
    r.remove_entry("x/keep").await.unwrap();
    assert!(!r.root().join("x").exists(), "an emptied directory stays");
    r.remove_entry("x/keep").await.unwrap();
    assert!(r.inventory().await.unwrap().is_empty());
}

/// Writes in any order against removals: what stands in a write's way (a file where the key
/// needs a directory, a directory where the key is a file) is not a key of the source.
#[tokio::test]
async fn a_write_removes_what_stands_in_its_way() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(&dir.path().join("root"));
    r.write_entry("x/y/z", content(b"deep")).await.unwrap();
    r.write_entry("x/keep", content(b"kept")).await.unwrap();
    assert!(
        r.read_entry("x").await.unwrap().is_none(),
        "a directory is no key"
    );
    r.write_entry("x", content(b"file")).await.unwrap();
    assert_eq!(read(&r, "x").await, "file");
    assert!(r.read_entry("x/keep").await.unwrap().is_none());
    r.remove_entry("x/keep").await.unwrap();
    assert_eq!(
        read(&r, "x").await,
        "file",
        "removing an absent key below a file removed the file"
    );
    r.write_entry("x/new/leaf", content(b"leaf")).await.unwrap();
    assert_eq!(read(&r, "x/new/leaf").await, "leaf");
    let keys: Vec<String> = r
        .inventory()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["x/new/leaf"]);
}

async fn read(r: &FilesResource, key: &str) -> String {
    let mut out = String::new();
    std::io::Read::read_to_string(&mut r.read_entry(key).await.unwrap().unwrap(), &mut out)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_file_is_copied_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir.path().join("a"));
    let b = open(&dir.path().join("b"));
    write_large(&a.root().join("big/file.bin"));
    let before = peak_resident_bytes();
    let source = a.read_entry("big/file.bin").await.unwrap().unwrap();
    b.write_entry("big/file.bin", source).await.unwrap();
    let growth = peak_resident_bytes().saturating_sub(before);
    println!(
        "64 MiB file copied: peak resident grew by {:.1} MiB",
        growth as f64 / (1 << 20) as f64
    );
    assert!(
        growth < RESIDENT_GROWTH_BYTES_MAX,
        "the peak resident set grew by {growth} bytes copying a {FILE_BYTES}-byte file: it was not streamed"
    );
    assert_eq!(a.inventory().await.unwrap(), b.inventory().await.unwrap());
    let copied = fs::File::open(b.root().join("big/file.bin")).unwrap();
    let original = fs::File::open(a.root().join("big/file.bin")).unwrap();
    assert_eq!(hash_all(copied), hash_all(original));
    assert_eq!(
        hash_all(fs::File::open(b.root().join("big/file.bin")).unwrap()).1,
        FILE_BYTES
    );
}

/// Writes `FILE_BYTES` of varied bytes to `path` through one 1 MiB buffer.
fn write_large(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = fs::File::create(path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for n in 0..FILE_BYTES / block.len() as u64 {
        block
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u64 ^ n) as u8);
        file.write_all(&block).unwrap();
    }
    file.sync_all().unwrap();
}
