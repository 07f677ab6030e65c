//! One transaction over all four kinds of resource — a PostgreSQL row, an invoice file, a
//! confirmation mail and an index key — committed, then one rolled back: all of each, or none.
//! Run with a data directory and the URL of a database that allows prepared transactions:
//!
//! ```text
//! cargo run -p concord-participant --example all_four -- /tmp/concord-all \
//!     postgresql://postgres@127.0.0.1:5432/shop
//! ```
//!
//! Like the `postgres` example, it installs concord's schema and a capture trigger on its
//! table first (`concord pg install`, `concord pg replicate`).

mod common;

use std::path::Path;
use std::process::ExitCode;

use participant::{Committed, Concord, ConcordError, MessageBuilder};

/// The table the example writes.
const TABLE: &str = "example_all_four";

#[tokio::main]
async fn main() -> ExitCode {
    match common::args("all_four", true) {
        Ok(args) => {
            let url = args.pg_url.unwrap_or_default();
            common::exit_code(run(&args.dir, &url).await)
        }
        Err(code) => code,
    }
}

async fn run(dir: &Path, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    common::prepare_database(url, TABLE).await?;
    let resources = format!(
        "[resources.orders]\nkind = \"postgres\"\nurl = {}\n\n\
         [resources.uploads]\nkind = \"files\"\nroot = \"files/uploads\"\ncreate = true\n\n\
         [resources.outbox]\nkind = \"mail\"\nmaildir = \"mail/outbox\"\ncreate = true\n\n\
         [resources.index]\nkind = \"kv\"\ndir = \"kv/index\"\ncreate = true\n",
        common::toml_string(url)
    );
    let concord = common::open(dir, &resources).await?;

    let placed = common::retrying("place an order", || place(&concord, "book")).await?;

    // The same four steps, rolled back: no row, no file, no mail, no key.
    let mut tx = concord.begin().await?;
    let id = order_steps(&tx, "draft").await?;
    let rolled_back = tx.rollback().await?;
    println!(
        "place order {id}: rolled back {} ({})",
        rolled_back.xid, rolled_back.cause
    );
    common::close(concord).await?;

    println!("order {}: committed in all four resources", placed.xid);
    let invoice = dir.join(format!("files/uploads/invoices/{id}.txt"));
    println!(
        "the rolled-back invoice {}: {}",
        invoice.display(),
        if invoice.exists() {
            "present"
        } else {
            "absent"
        }
    );
    Ok(())
}

/// Places an order of `item` across the four resources and commits.
async fn place(concord: &Concord, item: &str) -> Result<Committed, ConcordError> {
    let mut tx = concord.begin().await?;
    let id = order_steps(&tx, item).await?;
    println!("order {id}: row, invoice, mail and index entry written");
    tx.commit().await
}

/// The work of one order in `tx`: the row (with the next id), the invoice file, the
/// confirmation mail and the index key. Returns the id.
async fn order_steps(tx: &participant::Transaction, item: &str) -> Result<i64, ConcordError> {
    let orders = tx.postgres("orders").await?;
    let row = orders
        .query_one(
            &format!("INSERT INTO {TABLE} (id, item) SELECT coalesce(max(id), 0) + 1, $1 FROM {TABLE} RETURNING id"),
            &[&item],
        )
        .await?;
    let id: i64 = row.get(0);
    let invoice = format!("invoices/{id}.txt");
    let uploads = tx.files("uploads").await?;
    uploads
        .put(&invoice, format!("invoice {id}: {item}\n").as_bytes())
        .await?;
    let confirmation = MessageBuilder::new()
        .from("Shop <shop@example.org>")
        .to("alice@example.org")
        .subject(format!("Your order {id}"))
        .body(format!("Thank you for ordering a {item}.\n"));
    tx.mail("outbox")
        .await?
        .enqueue_built(&confirmation)
        .await?;
    let index = tx.kv("index").await?;
    index
        .insert(format!("order/{id}").as_bytes(), invoice.as_bytes())
        .await?;
    Ok(id)
}
