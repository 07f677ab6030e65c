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
use crate::Lsn;

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
    pub(super) async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<()> {
        let rows = decode_redo(redo)
            .map_err(|e| self.rejected(format!("replay of lsn {lsn}: malformed redo: {e}")))?;
        let lsn_value = i64::try_from(lsn.0)
            .map_err(|_| self.rejected(format!("lsn {lsn} is out of range")))?;
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
        let applied =
            "INSERT INTO concord.applied VALUES ($1, 0) ON CONFLICT (resource) DO NOTHING";
        self.timed_in(session, "replay", tx.execute(applied, &[&self.name]))
            .await?
            .map_err(|e| self.db("replay", &e))?;
        let read = "SELECT lsn FROM concord.applied WHERE resource = $1 FOR UPDATE";
        let applied: i64 = self
            .timed_in(
                session,
                "read the applied lsn",
                tx.query_one(read, &[&self.name]),
            )
            .await?
            .map_err(|e| self.db("read the applied lsn", &e))?
            .get(0);
        if applied >= lsn_value {
            return Ok(());
        }
        for (table, op, pk, row) in &rows {
            let apply = "SELECT concord.apply_row($1, $2::text::\"char\", $3, $4)";
            self.timed_in(
                session,
                "replay a row",
                tx.execute(apply, &[table, op, pk, row]),
            )
            .await?
            .map_err(|e| {
                self.rejected(format!(
                    "replay of lsn {lsn}: applying a row of {table} failed: {}",
                    db_text(&e)
                ))
            })?;
        }
        let store = "UPDATE concord.applied SET lsn = $2 WHERE resource = $1";
        self.timed_in(
            session,
            "store the applied lsn",
            tx.execute(store, &[&self.name, &lsn_value]),
        )
        .await?
        .map_err(|e| self.db("store the applied lsn", &e))?;
        self.timed_in(session, "commit the replay", tx.commit())
            .await?
            .map_err(|e| self.db("commit the replay", &e))
    }
}

/// Encodes captured rows, given as the JSON text of an array of `[table, op, pk, row]`, as a
/// redo.
pub(super) fn encode_redo_array(rows: &str) -> Vec<u8> {
    format!("{{\"v\":{REDO_VERSION},\"rows\":{rows}}}").into_bytes()
}

/// One row image of a redo: table, op, primary key, row.
type RowImage = (String, String, serde_json::Value, serde_json::Value);

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
