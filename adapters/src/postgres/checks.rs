//! What is wrong with a standby's table when replay cannot apply a row image to it.
//!
//! Replay applies a batch's row images in one statement (`concord.apply_row`), which stays
//! cheap because it checks little itself: it refuses an image whose columns are not the
//! table's (SQLSTATE `CF005`), and anything else fails with whatever PostgreSQL says (a missing
//! relation, a value that does not cast). When the statement fails, the batch is rolled back and
//! [`Inner::check_rows`] looks at the standby's tables, image by image in journal order, and
//! names the first problem with its LSN, table and column and what to do:
//!
//! * the table does not exist (or is not a table) here — create it as on the primary and run
//!   `concord pg replicate`;
//! * it has no primary key — add the primary's;
//! * the image has a column the table lacks, or the table a column (not generated) the image
//!   lacks — make the table's columns the primary's;
//! * a value does not fit the column's type here (`jsonb_populate_record` refuses it) — give
//!   the column the primary's type.
//!
//! Replay does not start again by itself after such a stop: the error is `Rejected`; the
//! replayer reports it, and once the schema is fixed the same batch applies.
//!
//! # Implementation caveats
//!
//! * A value that casts to the standby's type although the primary's was another (a number
//!   into a `text` column) is not detected: the image carries JSON values, not types.
//! * At most `VALUES_CHECKED_MAX` values are cast one by one; past it, the database's own
//!   message is reported.

use std::collections::HashMap;

use super::replay::RowImage;
use super::{Inner, Result};
use crate::Lsn;

/// Most values the diagnosis casts one by one (one round trip each).
const VALUES_CHECKED_MAX: usize = 1000;

/// A standby's table as replay needs it.
struct Table {
    /// The table's own name as PostgreSQL quotes it (`oid::regclass::text`): safe in SQL text.
    regclass: String,
    /// Its columns: name, type, generated.
    columns: Vec<(String, String, bool)>,
    /// Whether it has a primary key.
    has_pk: bool,
}

impl Inner {
    /// The first problem of the standby's tables with the row images of `pending`, as an error
    /// message; `None` when none is found.
    pub(super) async fn check_rows(
        &self,
        conn: &deadpool_postgres::Object,
        pending: &[&(Lsn, Vec<RowImage>)],
    ) -> Result<Option<String>> {
        let mut tables: HashMap<String, Option<Table>> = HashMap::new();
        let mut values_checked = 0;
        for (lsn, rows) in pending.iter().map(|p| (&p.0, &p.1)) {
            for (table, _op, _pk, image) in rows {
                if !tables.contains_key(table) {
                    let shape = self.table_shape(conn, table).await?;
                    tables.insert(table.clone(), shape);
                }
                let shape = tables.get(table).and_then(Option::as_ref);
                let problem = match shape {
                    None => Some(self.no_table(table)),
                    Some(shape) => {
                        let shape_problem = self.shape_problem(table, shape, image);
                        match shape_problem {
                            Some(p) => Some(p),
                            None => {
                                self.type_problem(conn, table, shape, image, &mut values_checked)
                                    .await?
                            }
                        }
                    }
                };
                if let Some(problem) = problem {
                    return Ok(Some(format!("replay of lsn {lsn} stopped: {problem}")));
                }
            }
        }
        Ok(None)
    }

    /// The table `table` names here (`None`: there is none).
    async fn table_shape(
        &self,
        conn: &deadpool_postgres::Object,
        table: &str,
    ) -> Result<Option<Table>> {
        let found = conn
            .query_opt(
                "SELECT c.oid::regclass::text,
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                 FROM pg_class c WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
                &[&table],
            )
            .await
            .map_err(|e| self.db(&format!("look up table {table}"), &e))?;
        let Some(found) = found else {
            return Ok(None);
        };
        let regclass: String = found.get(0);
        let columns = conn
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
                 FROM pg_attribute a
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&regclass],
            )
            .await
            .map_err(|e| self.db(&format!("read the columns of {table}"), &e))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        Ok(Some(Table {
            regclass,
            columns,
            has_pk: found.get(1),
        }))
    }

    fn no_table(&self, table: &str) -> String {
        format!(
            "table {table} does not exist here ({}): create it as it is on the primary, run `concord pg replicate --resource {} {table}`, and replay resumes",
            self.target, self.name
        )
    }

    /// A missing primary key or a column that is not on both sides.
    fn shape_problem(
        &self,
        table: &str,
        shape: &Table,
        image: &serde_json::Value,
    ) -> Option<String> {
        let fix = "make the table's columns those of the primary (ALTER TABLE), and replay resumes";
        if !shape.has_pk {
            return Some(format!(
                "table {table} has no primary key here, and replay applies rows by primary key: add the primary's (ALTER TABLE {table} ADD PRIMARY KEY (…)), and replay resumes"
            ));
        }
        let image = image.as_object()?;
        if let Some(column) = image
            .keys()
            .find(|k| !shape.columns.iter().any(|(c, _, _)| c == *k))
        {
            return Some(format!(
                "the row image of {table} has a column {column:?}, which the table here lacks: {fix}"
            ));
        }
        let lacking = shape
            .columns
            .iter()
            .find(|(c, _, generated)| !generated && !image.contains_key(c));
        lacking.map(|(column, _, _)| {
            format!(
                "table {table} here has a column {column:?}, which the primary's row image lacks: {fix}"
            )
        })
    }

    /// A value of `image` that does not fit its column's type here.
    async fn type_problem(
        &self,
        conn: &deadpool_postgres::Object,
        table: &str,
        shape: &Table,
        image: &serde_json::Value,
        values_checked: &mut usize,
    ) -> Result<Option<String>> {
        let Some(image) = image.as_object() else {
            return Ok(None);
        };
        let cast = format!(
            "SELECT jsonb_populate_record(NULL::{}, $1::jsonb) IS NULL",
            shape.regclass
        );
        for (column, value) in image {
            if *values_checked >= VALUES_CHECKED_MAX {
                return Ok(None);
            }
            *values_checked += 1;
            let one = serde_json::json!({ column: value });
            if let Err(e) = conn.query_one(&cast, &[&one]).await {
                if e.as_db_error().is_none() {
                    return Err(self.db(&format!("check the row image of {table}"), &e));
                }
                let ty = shape
                    .columns
                    .iter()
                    .find(|(c, _, _)| c == column)
                    .map_or("?", |(_, ty, _)| ty.as_str());
                return Ok(Some(format!(
                    "the value {value} of column {column:?} of {table} does not fit the column's type here ({ty}: {}): give the column the primary's type (ALTER TABLE {table} ALTER COLUMN … TYPE …), and replay resumes",
                    super::db_text(&e)
                )));
            }
        }
        Ok(None)
    }
}
