//! The redo and its replay on a standby's database.
//!
//! The redo (version [`REDO_VERSION`]) is JSON: `{"v":1,"rows":[[table, op, pk, row], …]}`
//! (one-phase redo adds `"txid"` and `"pid"`, which replay ignores). Replay applies the row
//! images by primary key (`concord.apply_row`) in one transaction with `concord.replaying` on,
//! together with the LSN in `concord.applied`; an LSN at or below the applied one changes
//! nothing, so replaying twice is a no-op.
//!
//! # Implementation caveats
//!
//! * [`decode_redo`] checks the shape, not the row images' columns: replay checks those
//!   against the table.

use super::{Inner, PostgresResource, Result, db_text};
use crate::{Lsn, ResourceError};

/// The redo version written and read here.
pub(super) const REDO_VERSION: u64 = 1;

impl PostgresResource {
    pub(super) async fn read_applied_lsn(&self) -> Result<Lsn> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let row = inner
            .timed(
                &conn,
                "read the applied lsn",
                conn.query_opt(
                    "SELECT lsn FROM concord.applied WHERE resource = $1",
                    &[&inner.name],
                ),
            )
            .await?
            .map_err(|e| inner.db("read the applied lsn", &e))?;
        Ok(Lsn(row
            .map(|r| r.get::<_, i64>(0))
            .and_then(|l| u64::try_from(l).ok())
            .unwrap_or(0)))
    }
}

impl Inner {
    /// `Resource::replay_batch` (a single replay is a batch of one): one transaction with
    /// `concord.replaying` on; the applied LSN is locked and read once, the row images of every
    /// redo above it are applied in order in one statement, the last LSN is stored once. A
    /// failure rolls everything back; a failure to apply a row is diagnosed against the table
    /// (`check_rows`) so that the error names the LSN, the table and the column.
    pub(super) async fn replay_batch(&self, batch: &[(Lsn, Vec<u8>)]) -> Result<()> {
        crate::check_batch_lsns(&self.name, batch)?;
        let Some(&(last, _)) = batch.last() else {
            return Ok(());
        };
        let mut decoded = Vec::with_capacity(batch.len());
        for (lsn, redo) in batch {
            let rows = decode_redo(redo)
                .map_err(|e| self.rejected(format!("replay of lsn {lsn}: malformed redo: {e}")))?;
            decoded.push((*lsn, rows));
        }
        let last_value = lsn_value(self, last)?;
        let mut conn = self.conn().await?;
        let session = self.sessions.of(&conn);
        let session = session.as_deref();
        let tx = self
            .timed_in(session, "begin the replay", conn.transaction())
            .await?
            .map_err(|e| self.db("begin", &e))?;
        let begin = "SET LOCAL concord.replaying = 'on'";
        self.timed_in(session, "begin the replay", tx.batch_execute(begin))
            .await?
            .map_err(|e| self.db("begin the replay", &e))?;
        // Creates the row if need be and locks it, in one round trip: concurrent replays of
        // this resource wait here, so the check and the apply are one step.
        let read = "INSERT INTO concord.applied VALUES ($1, 0)
                    ON CONFLICT (resource) DO UPDATE SET lsn = concord.applied.lsn
                    RETURNING lsn";
        let applied: i64 = self
            .timed_in(
                session,
                "read the applied lsn",
                tx.query_one(read, &[&self.name]),
            )
            .await?
            .map_err(|e| self.db("read the applied lsn", &e))?
            .get(0);
        if applied >= last_value {
            return Ok(());
        }
        let pending: Vec<&(Lsn, Vec<RowImage>)> = decoded
            .iter()
            .filter(|(lsn, _)| i64::try_from(lsn.0).is_ok_and(|l| l > applied))
            .collect();
        let images: Vec<serde_json::Value> = pending
            .iter()
            .flat_map(|(_, rows)| rows.iter().map(row_json))
            .collect();
        // The set-returning function yields the images in array order, and each is applied as
        // it is produced: journal order.
        let apply = "SELECT concord.apply_row(r ->> 0, (r ->> 1)::\"char\", r -> 2, r -> 3)
                     FROM jsonb_array_elements($1::jsonb) AS r";
        let images = serde_json::Value::Array(images);
        let applied_rows = self
            .timed_in(session, "replay the rows", tx.execute(apply, &[&images]))
            .await?;
        if let Err(e) = applied_rows {
            drop(tx);
            return Err(self.replay_failed(&mut conn, &pending, &e).await);
        }
        let store = "UPDATE concord.applied SET lsn = $2 WHERE resource = $1";
        self.timed_in(
            session,
            "store the applied lsn",
            tx.execute(store, &[&self.name, &last_value]),
        )
        .await?
        .map_err(|e| self.db("store the applied lsn", &e))?;
        self.timed_in(session, "commit the replay", tx.commit())
            .await?
            .map_err(|e| self.db("commit the replay", &e))
    }

    /// The error of a batch whose rows failed to apply with `e`: what [`Inner::check_rows`]
    /// finds wrong with the standby's tables, or else the database's own message, naming the
    /// LSNs of the batch.
    async fn replay_failed(
        &self,
        conn: &mut deadpool_postgres::Object,
        pending: &[&(Lsn, Vec<RowImage>)],
        e: &tokio_postgres::Error,
    ) -> ResourceError {
        if e.as_db_error().is_none() {
            return self.db("replay the rows", e);
        }
        match self.check_rows(conn, pending).await {
            Ok(Some(problem)) => self.rejected(problem),
            Ok(None) | Err(_) => {
                let (first, last) = (pending[0].0, pending[pending.len() - 1].0);
                self.rejected(format!(
                    "replay of lsn {first} to {last}: applying the rows failed: {}",
                    db_text(e)
                ))
            }
        }
    }
}

/// `lsn` as PostgreSQL's bigint.
fn lsn_value(inner: &Inner, lsn: Lsn) -> Result<i64> {
    i64::try_from(lsn.0).map_err(|_| inner.rejected(format!("lsn {lsn} is out of range")))
}

/// A row image as the JSON array `[table, op, pk, row]` that `concord.apply_row` takes.
fn row_json(row: &RowImage) -> serde_json::Value {
    let (table, op, pk, image) = row;
    serde_json::json!([table, op, pk, image])
}

/// Encodes captured rows, given as the JSON text of an array of `[table, op, pk, row]`, as a
/// redo.
pub(super) fn encode_redo_array(rows: &str) -> Vec<u8> {
    format!("{{\"v\":{REDO_VERSION},\"rows\":{rows}}}").into_bytes()
}

/// One row image of a redo: table, op, primary key, row.
pub(super) type RowImage = (String, String, serde_json::Value, serde_json::Value);

/// Decodes a redo; a malformed one is described in the error.
pub fn decode_redo(redo: &[u8]) -> Result<Vec<RowImage>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(redo).map_err(|e| format!("not JSON: {e}"))?;
    let version = value.get("v").and_then(|v| v.as_u64());
    if version != Some(REDO_VERSION) {
        return Err(format!(
            "redo version {version:?}: this program reads version {REDO_VERSION}"
        ));
    }
    let rows = value
        .get("rows")
        .and_then(|r| r.as_array())
        .ok_or("no rows array")?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let parts = row
            .as_array()
            .filter(|p| p.len() == 4)
            .ok_or("a row is not [table, op, pk, row]")?;
        let table = parts[0].as_str().ok_or("a table name is not a string")?;
        let op = parts[1]
            .as_str()
            .filter(|o| *o == "U" || *o == "D")
            .ok_or("an op is not U or D")?;
        if !(parts[2].is_object() || parts[2].is_null() && parts[3].is_object()) {
            return Err("a primary key is neither an object nor left to a row image".into());
        }
        out.push((
            table.to_string(),
            op.to_string(),
            parts[2].clone(),
            parts[3].clone(),
        ));
    }
    Ok(out)
}
