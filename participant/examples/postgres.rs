//! Transactions on a PostgreSQL resource: a row inserted and committed, one rolled back, and a
//! statement that fails (a duplicate key), after which the commit answers that the transaction
//! rolled back. Run with a data directory and the URL of a database that allows prepared
//! transactions (`max_prepared_transactions > 0`):
//!
//! ```text
//! cargo run -p concord-participant --example postgres -- /tmp/concord-pg \
//!     postgresql://postgres@127.0.0.1:5432/shop
//! ```
//!
//! It installs concord's schema and a capture trigger on its table first, what an operator does
//! with `concord pg install` and `concord pg replicate`.

mod common;

use std::path::Path;
use std::process::ExitCode;

use participant::{Committed, Concord, ConcordError};

/// The table the example writes.
const TABLE: &str = "example_orders";

#[tokio::main]
async fn main() -> ExitCode {
    match common::args("postgres", true) {
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
        "[resources.orders]\nkind = \"postgres\"\nurl = {}\n",
        common::toml_string(url)
    );
    let concord = common::open(dir, &resources).await?;

    common::retrying("insert an order", || insert(&concord, "book")).await?;

    // Rolled back: the row is never visible.
    let mut tx = concord.begin().await?;
    let orders = tx.postgres("orders").await?;
    orders
        .execute(
            &format!("INSERT INTO {TABLE} (id, item) SELECT coalesce(max(id), 0) + 1, 'draft' FROM {TABLE}"),
            &[],
        )
        .await?;
    let rolled_back = tx.rollback().await?;
    println!(
        "insert a draft: rolled back {} ({})",
        rolled_back.xid, rolled_back.cause
    );

    // A statement that fails: the transaction cannot commit, and says so.
    let mut tx = concord.begin().await?;
    let orders = tx.postgres("orders").await?;
    let duplicate = orders
        .execute(
            &format!("INSERT INTO {TABLE} (id, item) VALUES (1, 'again')"),
            &[],
        )
        .await;
    if let Err(e) = &duplicate {
        println!(
            "a duplicate key is refused (retryable: {}): {e}",
            e.is_retryable()
        );
    }
    match tx.commit().await {
        Err(e @ ConcordError::RolledBack { .. }) => {
            println!(
                "commit after the refused statement: {e} (retryable: {})",
                e.is_retryable()
            );
        }
        Ok(committed) => {
            return Err(format!("{} committed a refused statement", committed.xid).into());
        }
        Err(e) => return Err(e.into()),
    }

    let mut reader = concord.begin().await?;
    let orders = reader.postgres("orders").await?;
    let row = orders
        .query_one(
            &format!("SELECT count(*) FROM {TABLE} WHERE item = 'draft'"),
            &[],
        )
        .await?;
    let drafts: i64 = row.get(0);
    let row = orders
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await?;
    let rows: i64 = row.get(0);
    reader.commit().await?;
    println!("{TABLE}: {rows} row(s), {drafts} draft(s)");
    common::close(concord).await?;
    Ok(())
}

/// Inserts an order of `item` with the next id and commits.
async fn insert(concord: &Concord, item: &str) -> Result<Committed, ConcordError> {
    let mut tx = concord.begin().await?;
    let orders = tx.postgres("orders").await?;
    let sql =
        format!("INSERT INTO {TABLE} (id, item) SELECT coalesce(max(id), 0) + 1, $1 FROM {TABLE}");
    orders.execute(&sql, &[&item]).await?;
    tx.commit().await
}
