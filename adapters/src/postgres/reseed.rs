//! Re-seeding a PostgreSQL resource, row by row (`Resource::read_entry`, `write_entry`,
//! `remove_entry`, `set_applied_lsn`).
//!
//! A key is the inventory's: `<table>/<primary key as canonical JSON>`, where the table is one
//! `concord pg replicate` set up (`concord.replicated`, as it names it) and the key an object
//! holding exactly the table's primary key columns. Anything else is refused (`Rejected`). The
//! content is the row as canonical JSON text (`to_jsonb`, under the inventory's fixed session
//! settings):
//!
//! * **Read** selects the row by its key in a read-only transaction, under those settings, and
//!   hands out its text (a row is read whole: PostgreSQL keeps a row under 1 GiB, and
//!   [`ROW_TEXT_BYTES_MAX`] bounds a write).
//! * **Write** checks that the row's key columns hold the key's values, then applies the row by
//!   primary key through the same path replay uses (`concord.apply_row`, an upsert that also
//!   advances the table's sequences), with `concord.replaying` on so that the capture trigger
//!   stays quiet, and reads the row back in the same transaction: unless its text is exactly
//!   the content (the tables differ between the sites), the transaction rolls back and the write
//!   is refused. It commits with `synchronous_commit = on`: durable when it returns.
//! * **Remove** deletes the row by its key (`concord.apply_row` with op `D`), the same way.
//! * **The applied LSN** is set in `concord.applied` (also lower than it was).
//! * Each change (write, remove, applied LSN) first makes sure no branch of this resource is
//!   prepared (`pg_prepared_xacts`); a read does not (it runs on the primary, and reads
//!   committed rows).
//!
//! # Implementation caveats
//!
//! * Foreign keys between replicated tables are checked at each write: copy a referenced row
//!   before the rows that reference it (or make the constraints deferrable), and remove in the
//!   opposite order.
//! * A table whose quoted name holds `/` is matched by the longest replicated table name the
//!   key starts with.

use std::io::{Cursor, Read};

use serde_json::{Map, Value};

use super::inventory::CANONICAL_SETTINGS;
use super::{Inner, PostgresResource, Result, db_text};
use crate::internal::io::blocking;
use crate::internal::reseed::content_unreadable;
use crate::{BlobContent, Lsn, ResourceError};

/// Longest row text [`Resource::write_entry`](crate::Resource::write_entry) accepts, in bytes.
pub const ROW_TEXT_BYTES_MAX: u64 = 256 << 20;

/// A parsed key: the table as `concord.replicated` names it, its key columns, and the key's
/// JSON text (sent to the server as text: parsed here, a `numeric` would pass through `f64`).
struct RowKey {
    table: String,
    columns: Vec<String>,
    pk: String,
}

impl PostgresResource {
    /// `Resource::read_entry`.
    pub(super) async fn read_row_entry(&self, key: &str) -> Result<Option<BlobContent>> {
        let inner = &self.inner;
        let mut conn = inner.conn().await?;
        let read = |e| inner.db(&format!("read entry {key:?}"), &e);
        let tx = conn
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(read)?;
        tx.batch_execute(CANONICAL_SETTINGS).await.map_err(read)?;
        let row_key = inner.parse_key(&tx, key).await?;
        let text = inner.row_text(&tx, &row_key).await?;
        tx.commit().await.map_err(read)?;
        Ok(text.map(|text| Box::new(Cursor::new(text.into_bytes())) as BlobContent))
    }

    /// `Resource::write_entry`.
    pub(super) async fn write_row_entry(&self, key: &str, content: BlobContent) -> Result<()> {
        self.no_prepared_branches().await?;
        let inner = &self.inner;
        let text = inner.read_content(key, content).await?;
        let is_object = serde_json::from_str::<Value>(&text).is_ok_and(|row| row.is_object());
        if !is_object {
            return Err(inner.rejected(format!(
                "entry {key:?}: the content is not a row as a JSON object"
            )));
        }
        let mut conn = inner.conn().await?;
        let tx = inner.begin_apply(&mut conn, key).await?;
        let row_key = inner.parse_key(&tx, key).await?;
        inner.check_row_key(&tx, key, &row_key, &text).await?;
        inner.apply(&tx, key, &row_key, "U", Some(&text)).await?;
        let stored = inner.row_text(&tx, &row_key).await?;
        if stored.as_deref() != Some(text.as_str()) {
            return Err(inner.rejected(format!(
                "entry {key:?}: the row as stored here is not the content written (stored: {}); are the tables the same on both sites?",
                stored.as_deref().unwrap_or("no row")
            )));
        }
        tx.commit()
            .await
            .map_err(|e| inner.db(&format!("commit entry {key:?}"), &e))
    }

    /// `Resource::remove_entry`.
    pub(super) async fn remove_row_entry(&self, key: &str) -> Result<()> {
        self.no_prepared_branches().await?;
        let inner = &self.inner;
        let mut conn = inner.conn().await?;
        let tx = inner.begin_apply(&mut conn, key).await?;
        let row_key = inner.parse_key(&tx, key).await?;
        inner.apply(&tx, key, &row_key, "D", None).await?;
        tx.commit()
            .await
            .map_err(|e| inner.db(&format!("commit the removal of entry {key:?}"), &e))
    }

    /// `Resource::set_applied_lsn`.
    pub(super) async fn store_applied_lsn(&self, lsn: Lsn) -> Result<()> {
        self.no_prepared_branches().await?;
        let inner = &self.inner;
        let value = i64::try_from(lsn.0)
            .map_err(|_| inner.rejected(format!("lsn {lsn} is out of range")))?;
        let store = |e| inner.db("store the applied lsn", &e);
        let mut conn = inner.conn().await?;
        let tx = conn.transaction().await.map_err(store)?;
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .await
            .map_err(store)?;
        tx.execute(
            "INSERT INTO concord.applied VALUES ($1, $2)
             ON CONFLICT (resource) DO UPDATE SET lsn = excluded.lsn",
            &[&inner.name, &value],
        )
        .await
        .map_err(store)?;
        tx.commit().await.map_err(store)?;
        tracing::info!(resource = %inner.name, %lsn, "applied lsn set for a re-seed");
        Ok(())
    }

    /// Refuses while a branch of this resource is prepared.
    async fn no_prepared_branches(&self) -> Result<()> {
        let prepared = self.inner.prepared().await?;
        match prepared.first() {
            None => Ok(()),
            Some(branch) => Err(self.inner.rejected(format!(
                "cannot be re-seeded while it holds prepared branches ({} of them, e.g. {}): a standby has none; resolve them first (concord resolve)",
                prepared.len(),
                branch.xid
            ))),
        }
    }
}

impl Inner {
    /// A transaction that applies rows as replay does: `concord.replaying` on, durable commit,
    /// the inventory's settings (to read the row back as the inventory would).
    async fn begin_apply<'c>(
        &self,
        conn: &'c mut deadpool_postgres::Object,
        key: &str,
    ) -> Result<deadpool_postgres::Transaction<'c>> {
        let begin = |e| self.db(&format!("begin the write of entry {key:?}"), &e);
        let tx = conn.transaction().await.map_err(begin)?;
        let settings = format!(
            "SET LOCAL concord.replaying = 'on'; SET LOCAL synchronous_commit = on; {CANONICAL_SETTINGS}"
        );
        tx.batch_execute(&settings).await.map_err(begin)?;
        Ok(tx)
    }

    /// Parses `key` against the replicated tables.
    async fn parse_key(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        key: &str,
    ) -> Result<RowKey> {
        let tables = tx
            .query(
                "SELECT tbl, pk_cols FROM concord.replicated WHERE to_regclass(tbl) IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| self.db("list the replicated tables", &e))?;
        let refused = |why: &str| self.rejected(format!("entry {key:?} refused: {why}"));
        let (table, columns) = tables
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, Vec<String>>(1)))
            .filter(|(table, _)| key.starts_with(&format!("{table}/")))
            .max_by_key(|(table, _)| table.len())
            .ok_or_else(|| refused("it does not start with a replicated table and `/` (keys are <schema>.<table>/<primary key as JSON>)"))?;
        let pk = key[table.len() + 1..].to_string();
        let parsed: Value =
            serde_json::from_str(&pk).map_err(|_| refused("its primary key is not JSON"))?;
        let object = parsed
            .as_object()
            .ok_or_else(|| refused("its primary key is not a JSON object"))?;
        if !same_columns(object, &columns) {
            return Err(refused(&format!(
                "its primary key does not hold exactly the columns {columns:?}"
            )));
        }
        Ok(RowKey { table, columns, pk })
    }

    /// Refuses a row whose key columns do not hold the key's values (compared as `jsonb`).
    async fn check_row_key(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        key: &str,
        row_key: &RowKey,
        row: &str,
    ) -> Result<()> {
        let differing = tx
            .query_opt(
                "SELECT c FROM unnest($1::text[]) AS c
                 WHERE ($2::text::jsonb -> c) IS DISTINCT FROM ($3::text::jsonb -> c) LIMIT 1",
                &[&row_key.columns, &row_key.pk, &row],
            )
            .await
            .map_err(|e| self.db(&format!("check the key of entry {key:?}"), &e))?;
        match differing {
            None => Ok(()),
            Some(column) => Err(self.rejected(format!(
                "entry {key:?}: the row's column {} does not hold the key's value",
                column.get::<_, String>(0)
            ))),
        }
    }

    /// The row of `row_key` as canonical JSON text, `None` when there is none.
    async fn row_text(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        row_key: &RowKey,
    ) -> Result<Option<String>> {
        let read = |e| self.db(&format!("read the row of {}", row_key.table), &e);
        // Built by the server: the table checked by to_regclass, the columns quoted (%I).
        let select: String = tx
            .query_one(
                "SELECT format('SELECT to_jsonb(t)::text FROM %s AS t WHERE %s', to_regclass($1)::text,
                               (SELECT string_agg(format('t.%I = (jsonb_populate_record(NULL::%s, $1::text::jsonb)).%I', c, to_regclass($1)::text, c), ' AND ')
                                  FROM unnest($2::text[]) AS c))",
                &[&row_key.table, &row_key.columns],
            )
            .await
            .map_err(read)?
            .get(0);
        let row = tx.query_opt(&select, &[&row_key.pk]).await.map_err(read)?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Applies `row` (op `U`) or the removal of the key (op `D`) as replay does.
    async fn apply(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        key: &str,
        row_key: &RowKey,
        op: &str,
        row: Option<&str>,
    ) -> Result<()> {
        let apply =
            "SELECT concord.apply_row($1, $2::text::\"char\", $3::text::jsonb, $4::text::jsonb)";
        match tx
            .execute(apply, &[&row_key.table, &op, &row_key.pk, &row])
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.as_db_error().is_some() => Err(self.rejected(format!(
                "entry {key:?}: applying the row failed: {}",
                db_text(&e)
            ))),
            Err(e) => Err(self.db(&format!("apply entry {key:?}"), &e)),
        }
    }

    /// The row text `content` yields, read on the blocking pool, at most
    /// [`ROW_TEXT_BYTES_MAX`] bytes of UTF-8.
    async fn read_content(&self, key: &str, content: BlobContent) -> Result<String> {
        let (name, owned_key) = (self.name.clone(), key.to_string());
        let bytes = blocking(&self.name, "row", move || {
            let mut bytes = Vec::new();
            content
                .take(ROW_TEXT_BYTES_MAX + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| content_unreadable(&name, &owned_key, &e))?;
            Ok::<_, ResourceError>(bytes)
        })
        .await?;
        if bytes.len() as u64 > ROW_TEXT_BYTES_MAX {
            return Err(self.rejected(format!(
                "entry {key:?}: the row text is over ROW_TEXT_BYTES_MAX = {ROW_TEXT_BYTES_MAX} bytes"
            )));
        }
        String::from_utf8(bytes)
            .map_err(|_| self.rejected(format!("entry {key:?}: the row text is not UTF-8")))
    }
}

/// Whether the key object holds exactly `columns`.
fn same_columns(object: &Map<String, Value>, columns: &[String]) -> bool {
    object.len() == columns.len() && columns.iter().all(|c| object.contains_key(c))
}
