//! Transactions on a files resource: two files put and committed, one put rolled back, a
//! delete committed. Run with a data directory:
//!
//! ```text
//! cargo run -p concord-participant --example files -- /tmp/concord-files
//! ```

mod common;

use std::path::Path;
use std::process::ExitCode;

use participant::{Committed, Concord, ConcordError};

const RESOURCES: &str =
    "[resources.uploads]\nkind = \"files\"\nroot = \"files/uploads\"\ncreate = true\n";

#[tokio::main]
async fn main() -> ExitCode {
    match common::args("files", false) {
        Ok(args) => common::exit_code(run(&args.dir).await),
        Err(code) => code,
    }
}

async fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let concord = common::open(dir, RESOURCES).await?;
    let root = dir.join("files/uploads");

    common::retrying("put two invoices", || {
        put(
            &concord,
            &[
                ("invoices/1.txt", "invoice 1\n"),
                ("invoices/2.txt", "invoice 2\n"),
            ],
        )
    })
    .await?;

    // Rolled back: the file is staged inside the transaction and never appears.
    let mut tx = concord.begin().await?;
    let uploads = tx.files("uploads").await?;
    uploads.put("invoices/draft.txt", &b"a draft\n"[..]).await?;
    let seen = uploads.read("invoices/draft.txt").await?;
    println!(
        "inside the transaction, invoices/draft.txt holds {} bytes",
        seen.len()
    );
    let rolled_back = tx.rollback().await?;
    println!(
        "put a draft: rolled back {} ({})",
        rolled_back.xid, rolled_back.cause
    );

    common::retrying("delete invoice 1", || delete(&concord, "invoices/1.txt")).await?;
    common::close(concord).await?;

    for name in ["invoices/1.txt", "invoices/2.txt", "invoices/draft.txt"] {
        let state = if root.join(name).exists() {
            "present"
        } else {
            "absent"
        };
        println!("{name}: {state}");
    }
    Ok(())
}

/// Puts each `(path, content)` in one transaction and commits.
async fn put(concord: &Concord, files: &[(&str, &str)]) -> Result<Committed, ConcordError> {
    let mut tx = concord.begin().await?;
    let uploads = tx.files("uploads").await?;
    for (path, content) in files {
        uploads.put(path, content.as_bytes()).await?;
    }
    tx.commit().await
}

/// Deletes `path` in a transaction of its own.
async fn delete(concord: &Concord, path: &str) -> Result<Committed, ConcordError> {
    let mut tx = concord.begin().await?;
    tx.files("uploads").await?.delete(path).await?;
    tx.commit().await
}
