//! Transactions on a mail queue (a Maildir): a confirmation enqueued and committed (delivered
//! into `new/` exactly once), one rolled back (never delivered), and a raw RFC 5322 message.
//! Run with a data directory:
//!
//! ```text
//! cargo run -p concord-participant --example mail -- /tmp/concord-mail
//! ```

mod common;

use std::path::Path;
use std::process::ExitCode;

use participant::{Committed, Concord, ConcordError, MessageBuilder};

const RESOURCES: &str =
    "[resources.outbox]\nkind = \"mail\"\nmaildir = \"mail/outbox\"\ncreate = true\n";

#[tokio::main]
async fn main() -> ExitCode {
    match common::args("mail", false) {
        Ok(args) => common::exit_code(run(&args.dir).await),
        Err(code) => code,
    }
}

async fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let concord = common::open(dir, RESOURCES).await?;
    let new = dir.join("mail/outbox/new");
    let before = delivered(&new)?;

    common::retrying("confirm order 1", || confirm(&concord, 1)).await?;

    // Rolled back: the message is staged in tmp/ and removed, never delivered.
    let mut tx = concord.begin().await?;
    let outbox = tx.mail("outbox").await?;
    let enqueued = outbox.enqueue_built(&confirmation(2)).await?;
    println!("order 2: staged as {}", enqueued.name);
    let rolled_back = tx.rollback().await?;
    println!(
        "confirm order 2: rolled back {} ({})",
        rolled_back.xid, rolled_back.cause
    );

    common::retrying("a raw message", || raw(&concord)).await?;
    common::close(concord).await?;

    let after = delivered(&new)?;
    println!(
        "delivered into {}: {} new message(s)",
        new.display(),
        after - before
    );
    Ok(())
}

/// The confirmation mail of order `order`.
fn confirmation(order: u32) -> MessageBuilder {
    MessageBuilder::new()
        .from("Shop <shop@example.org>")
        .to("alice@example.org")
        .subject(format!("Your order {order}"))
        .body(format!("Thank you for order {order}.\n"))
}

/// Enqueues the confirmation of `order` and commits.
async fn confirm(concord: &Concord, order: u32) -> Result<Committed, ConcordError> {
    let mut tx = concord.begin().await?;
    let outbox = tx.mail("outbox").await?;
    let enqueued = outbox.enqueue_built(&confirmation(order)).await?;
    println!("order {order}: staged as {}", enqueued.name);
    tx.commit().await
}

/// Enqueues a message given as raw bytes and commits.
async fn raw(concord: &Concord) -> Result<Committed, ConcordError> {
    let message = b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nFrom: shop@example.org\r\n\
        To: bob@example.org\r\nSubject: Newsletter\r\n\r\nNews.\r\n";
    let mut tx = concord.begin().await?;
    tx.mail("outbox").await?.enqueue(&message[..]).await?;
    tx.commit().await
}

/// How many messages `new` holds.
fn delivered(new: &Path) -> Result<usize, Box<dyn std::error::Error>> {
    let entries = std::fs::read_dir(new).map_err(|e| format!("read {}: {e}", new.display()))?;
    Ok(entries.count())
}
