//! The inventory of a PostgreSQL resource: every row of every replicated table, to compare two
//! sites (`Resource::inventory`).
//!
//! The tables are those `concord pg replicate` set up (`concord.replicated`). The rows are read
//! in one read-only `REPEATABLE READ` transaction, so every table is seen as of one snapshot,
//! through a cursor fetched `FETCH_ROWS` at a time (a big table never comes back as one
//! result). A row's key is `<table>/<primary key>` — the table as `concord.replicated` names
//! it (`schema.table`, quoted where needed) and the primary key's columns as a `jsonb` object —
//! and its content is the whole row as `jsonb` text (`to_jsonb`). `jsonb`'s text form is
//! canonical (keys in one fixed order, numbers as written, no duplicate keys), and the session
//! settings that change how values print (`TimeZone`, `IntervalStyle`, `extra_float_digits`,
//! `bytea_output`) are set to fixed values for the transaction, so the same rows give the same
//! text on both sites. A row replayed on a standby holds the primary's values in every column
//! (the image is the whole row, defaults and sequence values included), and generated columns
//! are computed from them again: the same text.
//!
//! # Implementation caveats
//!
//! * A table listed in `concord.replicated` that no longer exists is left out.
//! * Rows are listed as they are in the snapshot: take the inventory while replay is between
//!   batches to compare as of one LSN.

use super::{Inner, Result};
use crate::{InventoryEntry, check_inventory_size};

/// Rows fetched from the cursor at a time.
const FETCH_ROWS: i64 = 5000;

impl Inner {
    /// Every row of every replicated table, sorted by key.
    pub(super) async fn inventory(&self) -> Result<Vec<InventoryEntry>> {
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.db("begin the inventory", &e))?;
        tx.batch_execute(
            "SET LOCAL TimeZone = 'UTC'; SET LOCAL IntervalStyle = 'postgres';
             SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'",
        )
        .await
        .map_err(|e| self.db("begin the inventory", &e))?;
        let tables = tx
            .query(
                "SELECT tbl, pk_cols FROM concord.replicated
                 WHERE to_regclass(tbl) IS NOT NULL ORDER BY tbl",
                &[],
            )
            .await
            .map_err(|e| self.db("list the replicated tables", &e))?;
        let mut out = Vec::new();
        for table in tables {
            let (name, pk): (String, Vec<String>) = (table.get(0), table.get(1));
            self.table_rows(&tx, &name, &pk, &mut out).await?;
        }
        tx.commit()
            .await
            .map_err(|e| self.db("end the inventory", &e))?;
        out.sort();
        Ok(out)
    }

    /// Adds the rows of `table` (primary key `pk`) to `out`, through a cursor.
    async fn table_rows(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        table: &str,
        pk: &[String],
        out: &mut Vec<InventoryEntry>,
    ) -> Result<()> {
        // The key's columns, each quoted by the server (format %I / %L), and the table's name
        // checked by to_regclass: nothing of the catalog reaches the SQL text unquoted.
        let declare: String = tx
            .query_one(
                "SELECT format('DECLARE inventory NO SCROLL CURSOR FOR SELECT jsonb_build_object(%s)::text, to_jsonb(t)::text FROM %s AS t',
                               (SELECT string_agg(format('%L, t.%I', c, c), ', ') FROM unnest($2::text[]) AS c),
                               to_regclass($1)::text)",
                &[&table, &pk],
            )
            .await
            .map_err(|e| self.db(&format!("read the rows of {table}"), &e))?
            .get(0);
        let read = |e| self.db(&format!("read the rows of {table}"), &e);
        tx.batch_execute(&declare).await.map_err(read)?;
        let fetch = format!("FETCH FORWARD {FETCH_ROWS} FROM inventory");
        loop {
            let rows = tx.query(&fetch, &[]).await.map_err(read)?;
            for row in &rows {
                let (key, content): (String, String) = (row.get(0), row.get(1));
                out.push(InventoryEntry {
                    key: format!("{table}/{key}"),
                    digest: *blake3::hash(content.as_bytes()).as_bytes(),
                });
                check_inventory_size(&self.name, out.len())?;
            }
            if rows.len() < FETCH_ROWS as usize {
                break;
            }
        }
        tx.batch_execute("CLOSE inventory").await.map_err(read)
    }
}
