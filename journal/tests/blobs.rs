//! The blob store through its public API: streamed round trips, content addressing, damage
//! detection on read, limits that leave nothing behind, and typed errors for unknown or malformed
//! ids.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use journal::{BlobConfig, BlobId, BlobStore, ErrorClass, JournalError};

fn config() -> BlobConfig {
    BlobConfig {
        chunk_bytes: 64 << 10,
        create_if_missing: true,
        ..BlobConfig::default()
    }
}

/// Deterministic pseudo-random content.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn read_blob(store: &BlobStore, id: &BlobId) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    store.open_blob(id).unwrap().read_to_end(&mut out)?;
    Ok(out)
}

#[test]
fn a_blob_round_trips_under_its_blake3_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), config()).unwrap();
    let data = content(1, 3 * (64 << 10) + 123);
    let stored = store.put(&data[..]).unwrap();
    assert_eq!(stored.bytes, data.len() as u64);
    assert_eq!(stored.id, BlobId::of(&data));
    assert_eq!(stored.id.0, *blake3::hash(&data).as_bytes());
    assert_eq!(stored.id.to_string(), blake3::hash(&data).to_hex().as_str());
    assert!(store.contains(&stored.id));
    assert_eq!(store.list().unwrap(), vec![stored.id]);
    assert_eq!(read_blob(&store, &stored.id).unwrap(), data);
    assert_eq!(store.verify(&stored.id).unwrap(), data.len() as u64);
    assert_eq!(fs::read(store.path_of(&stored.id)).unwrap(), data);

    // The id survives a round trip through its text form.
    let parsed: BlobId = stored.id.to_string().parse().unwrap();
    assert_eq!(parsed, stored.id);

    // And the store survives a reopen.
    drop(store);
    let store = BlobStore::open(dir.path(), config()).unwrap();
    assert_eq!(read_blob(&store, &stored.id).unwrap(), data);
    assert!(store.remove(&stored.id).unwrap());
    assert!(!store.contains(&stored.id));
    assert!(
        !store.remove(&stored.id).unwrap(),
        "removing twice reports absence"
    );
}

#[test]
fn an_empty_blob_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), config()).unwrap();
    let stored = store.put(io::empty()).unwrap();
    assert_eq!(stored.bytes, 0);
    assert_eq!(stored.id, BlobId::of(b""));
    assert_eq!(read_blob(&store, &stored.id).unwrap(), b"");
    assert_eq!(store.verify(&stored.id).unwrap(), 0);
}

#[test]
fn the_same_content_twice_is_one_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), config()).unwrap();
    let data = content(2, 100_000);
    let a = store.put(&data[..]).unwrap();
    let b = store.put(io::Cursor::new(data.clone())).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        files_under(dir.path()),
        vec![store.path_of(&a.id)],
        "one file, no temp file"
    );
    let other = store.put(&content(3, 10)[..]).unwrap();
    assert_ne!(other.id, a.id);
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn altered_content_on_disk_is_detected_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), config()).unwrap();
    let data = content(4, 200_000);
    let id = store.put(&data[..]).unwrap().id;
    let path = store.path_of(&id);

    for damage in ["flip", "truncate", "extend"] {
        let mut bytes = data.clone();
        match damage {
            "flip" => bytes[123_456] ^= 0x20,
            "truncate" => bytes.truncate(199_999),
            _ => bytes.push(0),
        }
        fs::write(&path, &bytes).unwrap();

        let err = store.verify(&id).err().unwrap();
        match &err {
            JournalError::BlobCorrupt {
                id: named,
                path: at,
                actual,
            } => {
                assert_eq!(named, &id.to_string(), "{damage}");
                assert_eq!(at, &path, "{damage}");
                assert_eq!(actual, blake3::hash(&bytes).to_hex().as_str(), "{damage}");
            }
            other => panic!("{damage}: verify gave {other:?}, not BlobCorrupt"),
        }
        assert_eq!(err.class(), ErrorClass::Corrupt);
        assert!(err.to_string().contains(&id.to_string()), "{err}");

        let read = read_blob(&store, &id).err().unwrap();
        assert_eq!(read.kind(), io::ErrorKind::InvalidData, "{damage}: {read}");
        let reader = store.open_blob(&id).unwrap();
        assert!(matches!(
            reader.into_error(read),
            JournalError::BlobCorrupt { .. }
        ));
    }
}

/// A reader that hands out its bytes in small pieces, then fails.
struct FailingReader {
    left: usize,
}

impl Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("source went away"));
        }
        let n = buf.len().min(self.left).min(1000);
        buf[..n].fill(9);
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn a_blob_over_the_limit_or_a_failing_source_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let limited = BlobConfig {
        blob_bytes_max: 10_000,
        chunk_bytes: 4096,
        create_if_missing: true,
    };
    let store = BlobStore::open(dir.path(), limited).unwrap();

    let err = store.put(&content(5, 10_001)[..]).err().unwrap();
    assert!(
        matches!(err, JournalError::BlobTooLarge { max: 10_000 }),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    assert!(err.to_string().contains("blob_bytes_max = 10000"), "{err}");
    assert_eq!(files_under(dir.path()), Vec::<PathBuf>::new());
    assert!(!store.contains(&BlobId::of(&content(5, 10_001))));

    let err = store.put(FailingReader { left: 5000 }).err().unwrap();
    assert!(matches!(err, JournalError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("source went away"), "{err}");
    assert_eq!(files_under(dir.path()), Vec::<PathBuf>::new());
    assert!(store.list().unwrap().is_empty());

    let exactly = store.put(&content(6, 10_000)[..]).unwrap();
    assert_eq!(exactly.bytes, 10_000, "a blob at the limit is accepted");
}

#[test]
fn an_unknown_id_is_blob_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), config()).unwrap();
    let id = BlobId::of(b"never stored");
    let err = store.open_blob(&id).err().unwrap();
    assert!(
        matches!(&err, JournalError::BlobNotFound { id: named } if *named == id.to_string()),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Rejected);
    assert!(err.to_string().contains(&id.to_string()));
    assert!(matches!(
        store.verify(&id),
        Err(JournalError::BlobNotFound { .. })
    ));
    assert!(!store.contains(&id));
    assert!(!store.remove(&id).unwrap());
}

#[test]
fn malformed_ids_are_bad_blob_id() {
    let good = BlobId::of(b"x").to_string();
    let non_hex = format!("{}zz", &good[..62]);
    let multibyte = format!("é{}", &good[..62]);
    for text in [
        "xyz",
        "",
        &good[..63],
        &format!("{good}0"),
        &non_hex,
        &multibyte,
    ] {
        let err = text.parse::<BlobId>().err().unwrap();
        assert!(
            matches!(&err, JournalError::BadBlobId(s) if s == text),
            "{text:?}: {err:?}"
        );
        assert_eq!(err.class(), ErrorClass::Rejected);
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
    assert_eq!(
        good.to_uppercase().parse::<BlobId>().unwrap(),
        BlobId::of(b"x")
    );
}

/// `u8::from_str_radix` accepts a leading `+`, so a parser built on it per byte pair takes
/// `"+f"` for the hex digits `0f`.
#[test]
fn an_id_with_sign_characters_is_not_64_hex_digits() {
    let text = "+f".repeat(32);
    let parsed = text.parse::<BlobId>();
    assert!(
        matches!(&parsed, Err(JournalError::BadBlobId(_))),
        "{text:?} is not 64 hex digits, yet it parsed as {parsed:?}"
    );
}

#[test]
fn leftover_temp_files_are_removed_at_open_and_blobs_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), config()).unwrap();
    let kept = store.put(&content(7, 5000)[..]).unwrap();
    drop(store);
    let tmp = dir.path().join("tmp");
    assert!(tmp.is_dir(), "the store keeps its temp files in tmp/");
    fs::write(tmp.join("123-0.tmp"), b"half a blob").unwrap();
    fs::write(tmp.join("123-1.tmp"), content(8, 70_000)).unwrap();

    let store = BlobStore::open(dir.path(), config()).unwrap();
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp files left over"
    );
    assert_eq!(store.list().unwrap(), vec![kept.id]);
    assert_eq!(store.verify(&kept.id).unwrap(), 5000);
}

#[test]
fn opening_a_missing_store_without_create_is_dir_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent");
    let no_create = BlobConfig {
        create_if_missing: false,
        ..config()
    };
    let err = BlobStore::open(&path, no_create).err().unwrap();
    assert!(matches!(err, JournalError::DirMissing { .. }), "{err:?}");
    assert!(!path.exists());
}

/// A blob shipped from elsewhere is stored only when its content hashes to the id it was sent
/// under; a mismatch is a typed error and leaves nothing behind, a stored copy included.
#[test]
fn put_verified_stores_matching_content_and_refuses_the_rest_leaving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = BlobConfig {
        chunk_bytes: 4096,
        create_if_missing: true,
        ..BlobConfig::default()
    };
    let store = BlobStore::open(dir.path(), config).unwrap();
    let content: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let id = BlobId::of(&content);
    let stored = store.put_verified(&id, &content[..]).unwrap();
    assert_eq!((stored.id, stored.bytes), (id, content.len() as u64));
    assert_eq!(store.verify(&id).unwrap(), content.len() as u64);

    let other = BlobId::of(b"something else");
    let mut wrong = content.clone();
    wrong[50_000] ^= 1;
    match store.put_verified(&other, &wrong[..]) {
        Err(JournalError::BlobMismatch { expected, actual }) => {
            assert_eq!(expected, other.to_string());
            assert_eq!(actual, BlobId::of(&wrong).to_string());
        }
        r => panic!("a mismatching blob was accepted: {r:?}"),
    }
    // Damaged content sent under the id of a stored blob leaves the stored copy as it was.
    assert!(matches!(
        store.put_verified(&id, &wrong[..]),
        Err(JournalError::BlobMismatch { .. })
    ));
    assert_eq!(store.list().unwrap(), vec![id]);
    assert_eq!(store.verify(&id).unwrap(), content.len() as u64);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

    // A transfer that fails halfway leaves nothing either; the next one starts over.
    struct FailsHalfway<'a>(&'a [u8], usize);
    impl std::io::Read for FailsHalfway<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.1 >= self.0.len() / 2 {
                return Err(std::io::Error::other("connection reset"));
            }
            let n = buf.len().min(self.0.len() - self.1);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }
    let second: Vec<u8> = content.iter().map(|b| b.wrapping_add(1)).collect();
    let second_id = BlobId::of(&second);
    assert!(
        store
            .put_verified(&second_id, FailsHalfway(&second, 0))
            .is_err()
    );
    assert!(!store.contains(&second_id));
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    store.put_verified(&second_id, &second[..]).unwrap();
    assert!(store.remove(&second_id).unwrap());
    assert_eq!(store.list().unwrap(), vec![id]);
}
