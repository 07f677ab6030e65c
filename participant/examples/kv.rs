//! Transactions on a kv resource (an embedded sled store): keys inserted and committed, a
//! change rolled back, and a transaction that only reads (it commits without a decision
//! record). Run with a data directory:
//!
//! ```text
//! cargo run -p concord-participant --example kv -- /tmp/concord-kv
//! ```

mod common;

use std::path::Path;
use std::process::ExitCode;

use participant::{Committed, Concord, ConcordError};

const RESOURCES: &str = "[resources.index]\nkind = \"kv\"\ndir = \"kv/index\"\ncreate = true\n";

#[tokio::main]
async fn main() -> ExitCode {
    match common::args("kv", false) {
        Ok(args) => common::exit_code(run(&args.dir).await),
        Err(code) => code,
    }
}

async fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let concord = common::open(dir, RESOURCES).await?;

    common::retrying("index orders 1 and 2", || index(&concord)).await?;

    // Rolled back: neither the remove nor the insert happens.
    let mut tx = concord.begin().await?;
    let index = tx.kv("index").await?;
    index.remove(b"order/1").await?;
    index.insert(b"order/3", b"never").await?;
    let rolled_back = tx.rollback().await?;
    println!(
        "remove order 1, add order 3: rolled back {} ({})",
        rolled_back.xid, rolled_back.cause
    );

    let mut reader = concord.begin().await?;
    let index = reader.kv("index").await?;
    for key in ["order/1", "order/2", "order/3"] {
        let value = index.get(key.as_bytes()).await?;
        let shown = value.map_or_else(
            || "absent".to_string(),
            |v| String::from_utf8_lossy(&v).into_owned(),
        );
        println!("{key}: {shown}");
    }
    let read = reader.commit().await?;
    println!("read-only: committed {} ({})", read.xid, common::lsn(&read));
    common::close(concord).await?;
    Ok(())
}

/// Inserts two keys in one transaction and commits.
async fn index(concord: &Concord) -> Result<Committed, ConcordError> {
    let mut tx = concord.begin().await?;
    let index = tx.kv("index").await?;
    index.insert(b"order/1", b"invoices/1.pdf").await?;
    index.insert(b"order/2", b"invoices/2.pdf").await?;
    tx.commit().await
}
