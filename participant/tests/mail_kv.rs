//! The mail and kv branch handles through the participant API, on the embedded configuration
//! (`uploads`, `thumbnails`, the Maildir `mail` and the sled store `index`): a transaction across
//! files, mail and kv commits all three or none; the handles of the wrong kind and of an unknown
//! name are refused as the files handle's are; bad input is refused naming the resource; kv keys
//! are isolated and locked; a handle after the end is refused.

#![allow(clippy::unwrap_used)]

mod common;

use common::{STEP_DEADLINE, close, commit, committed_lsn, open, within};

use std::path::Path;

use coordinator::CoordError;
use participant::{ConcordError, Config, MessageBuilder, ResourceConfig, RollbackCause};

/// How long a kv writer waits for a key another branch holds, in these tests.
const LOCK_WAIT_MS: u64 = 300;

fn config(dir: &Path) -> Config {
    let mut config = Config::embedded(dir);
    if let Some(ResourceConfig::Kv { lock_wait_ms, .. }) = config.resources.get_mut("index") {
        *lock_wait_ms = LOCK_WAIT_MS;
    }
    config
}

fn message(subject: &str) -> MessageBuilder {
    MessageBuilder::new()
        .from("shop@example.org")
        .to("alice@example.org")
        .subject(subject)
        .body("Thank you.\n")
}

/// The names of the files in `dir` (empty when it does not exist).
fn names_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_across_files_mail_and_kv_commits_all_three() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    let uploads = within("join", tx.files("uploads")).await.unwrap();
    within("put", uploads.put("invoices/42.pdf", &b"%PDF-1.7"[..]))
        .await
        .unwrap();
    let mail = within("join", tx.mail("mail")).await.unwrap();
    let enqueued = within("enqueue", mail.enqueue_built(&message("Order 42")))
        .await
        .unwrap();
    let index = within("join", tx.kv("index")).await.unwrap();
    within("insert", index.insert(b"order/42", b"invoices/42.pdf"))
        .await
        .unwrap();
    assert_eq!(
        within("get", index.get(b"order/42")).await.unwrap(),
        Some(b"invoices/42.pdf".to_vec()),
        "a transaction reads its own writes"
    );
    assert!(names_in(&dir.path().join("mail/new")).is_empty());

    let other = concord.begin().await.unwrap();
    let other_index = within("join", other.kv("index")).await.unwrap();
    assert_eq!(
        within("get", other_index.get(b"order/42")).await.unwrap(),
        None,
        "another transaction does not see uncommitted writes"
    );
    let conflict = within("insert", other_index.insert(b"order/42", b"x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        conflict.contains("order/42") && conflict.contains(&tx.xid().to_string()),
        "a second writer of the key gets a conflict naming it and the holder: {conflict}"
    );
    drop((other_index, other));

    committed_lsn(&commit(&mut tx).await);
    assert!(concord.wait_idle(STEP_DEADLINE).await);
    assert_eq!(
        std::fs::read(dir.path().join("uploads/invoices/42.pdf")).unwrap(),
        b"%PDF-1.7"
    );
    assert_eq!(names_in(&dir.path().join("mail/new")), [enqueued.name]);
    let reader = concord.begin().await.unwrap();
    let index = within("join", reader.kv("index")).await.unwrap();
    assert_eq!(
        within("get", index.get(b"order/42")).await.unwrap(),
        Some(b"invoices/42.pdf".to_vec())
    );
    drop((index, reader, mail, uploads, tx));
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_leaves_no_file_mail_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    let uploads = within("join", tx.files("uploads")).await.unwrap();
    within("put", uploads.put("a.txt", &b"a"[..]))
        .await
        .unwrap();
    let mail = within("join", tx.mail("mail")).await.unwrap();
    within("enqueue", mail.enqueue_built(&message("never")))
        .await
        .unwrap();
    let index = within("join", tx.kv("index")).await.unwrap();
    within("insert", index.insert(b"k", b"v")).await.unwrap();
    let rolled_back = within("rollback", tx.rollback()).await.unwrap();
    assert!(
        matches!(rolled_back.cause, RollbackCause::Requested { .. }),
        "{rolled_back:?}"
    );
    assert!(concord.wait_idle(STEP_DEADLINE).await);

    let after = within("enqueue", mail.enqueue_built(&message("late")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            after,
            ConcordError::Coordinator(_) | ConcordError::Finished { .. }
        ),
        "a mail handle after the end is refused: {after:?}"
    );
    assert!(within("insert", index.insert(b"k2", b"v")).await.is_err());
    assert!(!dir.path().join("uploads/a.txt").exists());
    for sub in ["tmp", "new", "cur"] {
        assert!(
            names_in(&dir.path().join("mail").join(sub)).is_empty(),
            "mail/{sub} is not empty"
        );
    }
    let reader = concord.begin().await.unwrap();
    let index = within("join", reader.kv("index")).await.unwrap();
    assert_eq!(within("get", index.get(b"k")).await.unwrap(), None);
    drop((index, reader, mail, uploads, tx));
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_of_the_wrong_kind_or_an_unknown_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    for (error, expected) in [
        (
            within("join", tx.mail("uploads")).await.err().unwrap(),
            "mail",
        ),
        (within("join", tx.kv("mail")).await.err().unwrap(), "kv"),
        (
            within("join", tx.files("index")).await.err().unwrap(),
            "files",
        ),
    ] {
        assert!(
            matches!(&error, ConcordError::WrongKind { expected: e, .. } if *e == expected),
            "{error:?}"
        );
        assert!(
            error.to_string().contains(&format!("not a {expected}")),
            "{error}"
        );
    }
    for error in [
        within("join", tx.mail("outbox")).await.err().unwrap(),
        within("join", tx.kv("nope")).await.err().unwrap(),
    ] {
        assert!(
            matches!(
                error,
                ConcordError::Coordinator(CoordError::UnknownResource { .. })
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("mail") && message.contains("index"),
            "the error lists the configured resources: {message}"
        );
    }
    // The transaction is still usable.
    let index = within("join", tx.kv("index")).await.unwrap();
    within("insert", index.insert(b"after", b"1"))
        .await
        .unwrap();
    committed_lsn(&commit(&mut tx).await);
    drop((index, tx));
    close(concord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_and_values_are_refused_naming_the_resource_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let concord = open(config(dir.path())).await;
    let mut tx = concord.begin().await.unwrap();
    let mail = within("join", tx.mail("mail")).await.unwrap();
    let no_separator = b"From: a@example.org\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n";
    let refused = within("enqueue", mail.enqueue(&no_separator[..]))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("resource mail"), "{refused}");
    let injected = message("Hi\r\nBcc: everyone@example.org");
    let refused = within("enqueue", mail.enqueue_built(&injected))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("resource mail"), "{refused}");
    let index = within("join", tx.kv("index")).await.unwrap();
    let too_long = vec![0u8; (1 << 20) + 1];
    let refused = within("insert", index.insert(b"k", &too_long))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("index") && refused.contains("value_bytes_max"),
        "{refused}"
    );
    // Nothing was taken: the transaction writes nothing and commits without a decision.
    let outcome = commit(&mut tx).await;
    assert_eq!(outcome.lsn, None, "{outcome:?}");
    assert!(names_in(&dir.path().join("mail/tmp")).is_empty());
    drop((index, mail, tx));
    close(concord).await;
}
