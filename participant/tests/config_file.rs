//! `concord.toml` through `Concord::open_file`: a written file opens and commits (files, mail and
//! kv resources), every unusable file is refused with an error naming the file and the field,
//! and a resource that cannot open (a directory that is not a Maildir) is named.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use participant::{Concord, ConcordError};

/// Bound on every step that waits (open, commit, close).
const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// The header every refused file shares; each case adds or breaks one line.
const HEADER: &str = "node = 1\ndata_dir = \"data\"\n";

/// Writes `text` as `concord.toml` in `dir`; returns its path.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("concord.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Opens `text` as a config file and returns the error's message, which must name the file.
async fn refusal(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text);
    let Ok(opened) = tokio::time::timeout(STEP_DEADLINE, Concord::open_file(&path)).await else {
        panic!("open_file did not answer within {STEP_DEADLINE:?}")
    };
    let Err(error) = opened else {
        panic!("{text:?} was accepted")
    };
    assert!(
        matches!(error, ConcordError::Config(_)),
        "not a configuration error: {error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "the error does not name the file {}: {message}",
        path.display()
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused configuration created the data directory"
    );
    message
}

fn assert_names(message: &str, field: &str) {
    assert!(
        message.contains(&format!("`{field}`")) || message.contains(&format!("{field} =")),
        "the error does not name the field `{field}`: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_file_opens_with_paths_relative_to_it_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{HEADER}txn_timeout_ms = 20000\n\n[resources.uploads]\nkind = \"files\"\nroot = \"files/uploads\"\ncreate = true\nlock_wait_ms = 1000\n"
    );
    let path = write_config(dir.path(), &text);
    let concord = tokio::time::timeout(STEP_DEADLINE, Concord::open_file(&path))
        .await
        .unwrap()
        .unwrap();
    assert!(
        dir.path().join("data").join("journal").is_dir(),
        "the journal is not under data_dir relative to the file"
    );

    let mut tx = concord.begin().await.unwrap();
    let uploads = tx.files("uploads").await.unwrap();
    uploads
        .put("a/b.txt", &b"through the file"[..])
        .await
        .unwrap();
    drop(uploads);
    let outcome = tokio::time::timeout(STEP_DEADLINE, tx.commit())
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.lsn.is_some(), "{outcome:?}");
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    let file = dir.path().join("files/uploads/a/b.txt");
    assert_eq!(std::fs::read(&file).unwrap(), b"through the file");
    drop(tx);
    assert!(concord.close(STEP_DEADLINE).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let error = Concord::open_file(&path).await.err().unwrap().to_string();
    assert!(
        error.contains(&path.display().to_string()) && error.contains("cannot read"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_field_is_named() {
    assert_names(&refusal("data_dir = \"data\"\n").await, "node");
    assert_names(&refusal("node = 1\n").await, "data_dir");
    let no_root = format!("{HEADER}[resources.uploads]\nkind = \"files\"\n");
    assert_names(&refusal(&no_root).await, "root");
    let no_kind = format!("{HEADER}[resources.uploads]\nroot = \"u\"\n");
    assert_names(&refusal(&no_kind).await, "kind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_field_is_named() {
    assert_names(&refusal(&format!("{HEADER}nodes = 2\n")).await, "nodes");
    let in_resource =
        format!("{HEADER}[resources.uploads]\nkind = \"files\"\nroot = \"u\"\nlock_wait = 10\n");
    assert_names(&refusal(&in_resource).await, "lock_wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_kind_is_named() {
    let tape = format!("{HEADER}[resources.backup]\nkind = \"tape\"\nroot = \"b\"\n");
    let message = refusal(&tape).await;
    assert_names(&message, "kind");
    assert!(
        message.contains("tape") && message.contains("files"),
        "{message}"
    );
}

/// A kind that does not exist is refused naming the file (checked by `refusal`), the resource,
/// the kind written and every kind that exists; nothing is created (no data directory, no root
/// of the other, valid, resource of the same file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_that_does_not_exist_names_the_resource_and_the_kinds_that_exist() {
    let text = format!(
        "{HEADER}[resources.uploads]\nkind = \"files\"\nroot = \"u\"\ncreate = true\n\
         [resources.backup]\nkind = \"tape\"\nroot = \"b\"\n"
    );
    let message = refusal(&text).await;
    for part in ["backup", "\"tape\"", "files", "postgres", "mail", "kv"] {
        assert!(
            message.contains(part),
            "the error does not name {part}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_is_named() {
    assert_names(&refusal("node = 0\ndata_dir = \"data\"\n").await, "node");
    let timeout = format!("{HEADER}txn_timeout_ms = \"soon\"\n");
    assert_names(&refusal(&timeout).await, "txn_timeout_ms");
    let name = format!("{HEADER}[resources.\"up loads\"]\nkind = \"files\"\nroot = \"u\"\n");
    assert!(refusal(&name).await.contains("up loads"));
}

/// A value of the wrong type inside a resource table names the field (an internally tagged enum,
/// deserialized from serde's buffered content, once lost the keys' names and spans; the tables
/// are flat since, see `adapters::config`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_inside_a_resource_is_named() {
    let wait = format!(
        "{HEADER}[resources.uploads]\nkind = \"files\"\nroot = \"u\"\nlock_wait_ms = \"soon\"\n"
    );
    assert_names(&refusal(&wait).await, "lock_wait_ms");
    let create =
        format!("{HEADER}[resources.uploads]\nkind = \"files\"\nroot = \"u\"\ncreate = \"yes\"\n");
    assert_names(&refusal(&create).await, "create");
}

/// A file with a files, a mail and a kv resource, at paths relative to it, opens and commits
/// across the three; the message is in the Maildir's `new/` and the key in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_mail_and_kv_resources_opens_and_commits_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{HEADER}\n[resources.uploads]\nkind = \"files\"\nroot = \"files/uploads\"\ncreate = true\n\n\
         [resources.outbox]\nkind = \"mail\"\nmaildir = \"spool/outbox\"\ncreate = true\nmax_message_bytes = 65536\n\n\
         [resources.index]\nkind = \"kv\"\ndir = \"db/index\"\ncreate = true\nlock_wait_ms = 1000\nvalue_bytes_max = 1024\n"
    );
    let path = write_config(dir.path(), &text);
    let concord = tokio::time::timeout(STEP_DEADLINE, Concord::open_file(&path))
        .await
        .unwrap()
        .unwrap();
    for sub in ["tmp", "new", "cur"] {
        assert!(dir.path().join("spool/outbox").join(sub).is_dir(), "{sub}");
    }
    assert!(dir.path().join("db/index/db").is_file(), "no sled database");

    let mut tx = concord.begin().await.unwrap();
    let uploads = tx.files("uploads").await.unwrap();
    uploads.put("invoice.pdf", &b"%PDF"[..]).await.unwrap();
    let outbox = tx.mail("outbox").await.unwrap();
    let message = b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nFrom: a@example.org\r\n\r\nhello\r\n";
    let enqueued = outbox.enqueue(&message[..]).await.unwrap();
    let index = tx.kv("index").await.unwrap();
    index.insert(b"order/1", b"invoice.pdf").await.unwrap();
    let too_long = index.insert(b"order/2", &[0u8; 1025]).await.unwrap_err();
    assert!(
        too_long.to_string().contains("value_bytes_max"),
        "{too_long}"
    );
    let outcome = tokio::time::timeout(STEP_DEADLINE, tx.commit())
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.lsn.is_some(), "{outcome:?}");
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    let delivered = dir.path().join("spool/outbox/new").join(&enqueued.name);
    assert_eq!(std::fs::read(&delivered).unwrap(), message);

    let reader = concord.begin().await.unwrap();
    let index = reader.kv("index").await.unwrap();
    assert_eq!(
        index.get(b"order/1").await.unwrap().as_deref(),
        Some(&b"invoice.pdf"[..])
    );
    drop((index, reader, tx));
    assert!(concord.close(STEP_DEADLINE).await);
}

/// A mail resource whose directory is not a Maildir, without `create`, refuses to open, naming
/// the resource and what is missing; nothing is created in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_is_not_a_maildir_is_refused_naming_the_resource() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("plain")).unwrap();
    let text = format!("{HEADER}[resources.outbox]\nkind = \"mail\"\nmaildir = \"plain\"\n");
    let path = write_config(dir.path(), &text);
    let Ok(opened) = tokio::time::timeout(STEP_DEADLINE, Concord::open_file(&path)).await else {
        panic!("open_file did not answer within {STEP_DEADLINE:?}")
    };
    let error = opened.err().unwrap();
    assert!(matches!(error, ConcordError::Resource(_)), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("outbox") && message.contains("tmp"),
        "{message}"
    );
    assert!(!dir.path().join("plain/tmp").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_of_another_kind_is_named() {
    let root_in_mail =
        format!("{HEADER}[resources.outbox]\nkind = \"mail\"\nmaildir = \"m\"\nroot = \"r\"\n");
    assert_names(&refusal(&root_in_mail).await, "root");
    let no_dir = format!("{HEADER}[resources.index]\nkind = \"kv\"\n");
    assert_names(&refusal(&no_dir).await, "dir");
    let wait_in_mail =
        format!("{HEADER}[resources.outbox]\nkind = \"mail\"\nmaildir = \"m\"\nlock_wait_ms = 1\n");
    assert_names(&refusal(&wait_in_mail).await, "lock_wait_ms");
    let tape = format!("{HEADER}[resources.backup]\nkind = \"tape\"\n");
    let message = refusal(&tape).await;
    assert!(
        message.contains("mail") && message.contains("kv"),
        "the error does not list the kinds: {message}"
    );
}

/// Opens `text` as a config file, which must be refused for overlapping directories naming both
/// `first` and `second`; nothing but the file itself may exist afterwards (no data directory, no
/// journal, no resource directory). Returns the message.
async fn overlap_refusal(text: &str, first: &str, second: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text);
    let Ok(opened) = tokio::time::timeout(STEP_DEADLINE, Concord::open_file(&path)).await else {
        panic!("open_file did not answer within {STEP_DEADLINE:?}")
    };
    let Err(error) = opened else {
        panic!("{text:?} was accepted")
    };
    let ConcordError::Config(config_error) = &error else {
        panic!("not a configuration error: {error:?}")
    };
    assert!(
        matches!(
            config_error.problem,
            participant::config::ConfigProblem::Overlap(_)
        ),
        "not an overlap: {config_error:?}"
    );
    let message = error.to_string();
    for name in [first, second] {
        assert!(message.contains(name), "{name} is not named: {message}");
    }
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p != &path)
        .collect();
    assert!(left.is_empty(), "a refused configuration created {left:?}");
    message
}

/// A files root that is the journal's directory (`data_dir/journal`), however spelt, is refused
/// before anything is created (it once wrote `.concord/` into the journal's directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_root_in_the_journal_is_refused_before_anything_is_created() {
    for root in [
        "data/journal",
        "./data/x/../journal",
        "data/journal/uploads",
        "data",
    ] {
        let text = format!(
            "{HEADER}[resources.uploads]\nkind = \"files\"\nroot = \"{root}\"\ncreate = true\n"
        );
        let message = overlap_refusal(&text, "[resources.uploads]", "journal").await;
        assert!(message.contains("data/journal"), "{message}");
    }
}

/// A mail queue and a kv store in one directory are refused before either is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_and_kv_in_one_directory_are_refused_before_anything_is_created() {
    let text = format!(
        "{HEADER}[resources.outbox]\nkind = \"mail\"\nmaildir = \"spool\"\ncreate = true\n\
         [resources.index]\nkind = \"kv\"\ndir = \"spool/\"\ncreate = true\n"
    );
    overlap_refusal(&text, "[resources.outbox]", "[resources.index]").await;
    let nested = format!(
        "{HEADER}[resources.outbox]\nkind = \"mail\"\nmaildir = \"spool\"\ncreate = true\n\
         [resources.index]\nkind = \"kv\"\ndir = \"spool/index\"\ncreate = true\n"
    );
    overlap_refusal(&nested, "[resources.outbox]", "[resources.index]").await;
}

/// Two files resources on one root are refused as an overlap naming both (they once failed
/// with a misleading "another instance has this root open").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_files_resources_on_one_root_are_refused_before_anything_is_created() {
    let text = format!(
        "{HEADER}[resources.uploads]\nkind = \"files\"\nroot = \"shared\"\ncreate = true\n\
         [resources.thumbnails]\nkind = \"files\"\nroot = \"shared\"\ncreate = true\n"
    );
    let message = overlap_refusal(&text, "[resources.uploads]", "[resources.thumbnails]").await;
    assert!(!message.contains("another instance"), "{message}");
}

/// A configuration built in code has not been through `Config::load`: `Concord::open` refuses
/// its overlap itself, before the journal's directory is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlap_in_a_configuration_built_in_code_is_refused_before_the_journal_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = participant::Config::embedded(&data);
    config.resources.insert(
        "uploads".into(),
        participant::ResourceConfig::Files {
            root: data.join("journal"),
            create: true,
            lock_wait_ms: 100,
        },
    );
    let Ok(opened) = tokio::time::timeout(STEP_DEADLINE, Concord::open(config)).await else {
        panic!("open did not answer within {STEP_DEADLINE:?}")
    };
    let Err(error) = opened else {
        panic!("an overlap built in code was accepted")
    };
    let message = error.to_string();
    assert!(
        message.contains("uploads") && message.contains("journal"),
        "{message}"
    );
    assert!(!data.exists(), "a refused configuration created {data:?}");
}
