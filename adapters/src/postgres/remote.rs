//! Branches prepared by a remote application and finished by a coordinator daemon.
//!
//! The daemon owns the journal, but an application's PostgreSQL branch runs in the
//! application, on its own connections. So the branch is cut in two, as in XA:
//!
//! * **The application** begins the branch and runs its statements as embedded mode does
//!   ([`PostgresResource::branch`]), then [`PostgresResource::prepare_for_enlist`] runs
//!   `concord.prepare_branch` (fence check, captured row images, marker) and `PREPARE
//!   TRANSACTION '<gid>'` on the branch's connection, in one round trip, and returns the text
//!   `concord.prepare_branch` returned: the branch's row images, a JSON array. That text is the
//!   wire redo of `EnlistPreparedRequest.redo`. The application's resource forgets the branch:
//!   it keeps no vote, since it never resolves the branch.
//! * **The daemon**, told of the branch (its gid and that text),
//!   [`PostgresResource::adopt_prepared`]s it on an instance of the same resource: it checks the
//!   redo (a JSON array of row images), checks that the gid is in `pg_prepared_xacts` of its
//!   database, and remembers the vote, so that the coordinator's prepare of the xid votes
//!   commit with the redo encoded as embedded mode encodes it. From there the branch is like any
//!   other prepared one: `COMMIT PREPARED` / `ROLLBACK PREPARED` by gid, recovered from
//!   `pg_prepared_xacts`, rolled back by the orphan sweeper when no transaction owns it.
//!
//! Such a branch never takes the one-phase path: it is prepared before the daemon hears of it.
//!
//! # Implementation caveats
//!
//! * An adopted vote lives in the daemon's memory only: after a restart the branch is recovered
//!   as any prepared branch (committed if the journal holds its decision, rolled back
//!   otherwise), and a prepare of it asked again is refused.
//! * The gid's presence is checked at adoption; a branch rolled back by hand afterwards is found
//!   missing at commit (a heuristic hazard, as for any branch).

use super::branch::BranchConn;
use super::replay::{decode_redo, encode_redo_array};
use super::{PostgresResource, Result, lock};
use crate::{Epoch, Resource, ResourceError, Xid};

/// The longest redo text an application may enlist (bytes); the daemon's message limit bounds
/// it first in practice.
pub const ENLIST_REDO_BYTES_MAX: usize = 64 << 20;

impl PostgresResource {
    /// Application side: runs the branch's fence check, capture and marker and `PREPARE
    /// TRANSACTION` on the branch's own connection (begun with `begin`/`branch`, as embedded
    /// mode does), and returns the text `concord.prepare_branch` returned — the wire redo of
    /// `EnlistPreparedRequest.redo`. `None`: nothing was written (read-only), nothing
    /// prepared, nothing to enlist. The resource forgets the branch afterwards (it keeps no
    /// vote: the daemon finishes it).
    pub async fn prepare_for_enlist(&self, xid: &Xid) -> Result<Option<String>> {
        let inner = &self.inner;
        let Some(slot) = inner.slots().get(xid).cloned() else {
            return Err(inner.rejected(format!(
                "branch {xid} is not open here: begin it and run its statements before preparing it for enlisting"
            )));
        };
        let mut guard = slot.lock().await;
        let Some(branch) = guard.take() else {
            return Err(inner.unavailable(format!("branch {xid} is being prepared; try again")));
        };
        let nested = branch.began_inside_another();
        let BranchConn { conn, begun, .. } = branch;
        let result = if nested {
            Err(inner.began_inside_another(xid))
        } else if begun && conn.is_closed() {
            Err(self.closed_before_prepare(xid).await)
        } else if begun {
            inner.prepare_text(&conn, xid).await
        } else {
            // Not a statement ran: nothing on the server to prepare.
            Ok(None)
        };
        inner.slots().remove(xid);
        match result {
            Ok(text) => Ok(text),
            Err(e) => Err(self.prepare_failed(xid, conn, e).await),
        }
    }

    /// The error of a branch whose connection the server closed before its prepare: a fence
    /// does that to the sessions of older epochs (then the branch is fenced); otherwise the
    /// server restarted or dropped it, and the branch's work is lost.
    pub(super) async fn closed_before_prepare(&self, xid: &Xid) -> ResourceError {
        let inner = &self.inner;
        let fence = self.fence_epoch().await.unwrap_or(Epoch(0));
        if fence > xid.epoch {
            return ResourceError::Fenced {
                resource: inner.name.clone(),
                offered: xid.epoch,
                current: fence,
            };
        }
        inner.unavailable(format!(
            "branch {xid}: the connection to {} closed before the prepare (the server restarted or dropped it), so the branch's work is lost; run the transaction again",
            inner.target
        ))
    }

    /// Daemon side: takes over the branch the application prepared under this resource's gid
    /// for `xid`, with `redo_text` (checked to be a JSON array): checks the gid is in
    /// `pg_prepared_xacts` of this database, then remembers the vote so the coordinator's
    /// prepare of `xid` votes commit with that redo (encoded as embedded mode encodes it).
    pub async fn adopt_prepared(&self, xid: &Xid, redo_text: &str) -> Result<()> {
        let inner = &self.inner;
        let redo = check_redo_text(redo_text).map_err(|why| inner.rejected(why))?;
        if inner.slots().contains_key(xid) {
            return Err(inner.rejected(format!(
                "branch {xid} is open in this process: it cannot also be enlisted as prepared elsewhere"
            )));
        }
        let gid = inner.gid(xid);
        if !self.is_prepared(&gid).await? {
            return Err(inner.rejected(format!(
                "no transaction is prepared under gid {gid} in {}: run `SELECT concord.prepare_branch(…)` and `PREPARE TRANSACTION '{gid}'` on the application's connection to this database first (or it was already rolled back)",
                inner.target
            )));
        }
        lock(&inner.read_only).retain(|x| x != xid);
        let mut votes = lock(&inner.votes);
        match votes.get(xid) {
            // A retried enlisting: the same answer.
            Some(held) if *held == redo => Ok(()),
            Some(_) => Err(inner.rejected(format!(
                "branch {xid} was enlisted before with other redo: the first enlisting holds; the application must not prepare one branch twice"
            ))),
            None => {
                votes.insert(*xid, redo);
                Ok(())
            }
        }
    }

    /// Whether `gid` is prepared in this resource's database.
    async fn is_prepared(&self, gid: &str) -> Result<bool> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let sql =
            "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()";
        let row = inner
            .timed(
                &conn,
                "look up a prepared transaction",
                conn.query_opt(sql, &[&gid]),
            )
            .await?
            .map_err(|e| inner.db("look up a prepared transaction", &e))?;
        Ok(row.is_some())
    }
}

/// The redo of an enlisted branch, from the text `concord.prepare_branch` returned: refused
/// unless it is a JSON array of row images within [`ENLIST_REDO_BYTES_MAX`].
pub fn check_redo_text(redo_text: &str) -> std::result::Result<Vec<u8>, String> {
    if redo_text.len() > ENLIST_REDO_BYTES_MAX {
        return Err(format!(
            "the redo is {} bytes: the limit enlist_redo_bytes_max is {ENLIST_REDO_BYTES_MAX}",
            redo_text.len()
        ));
    }
    let value: serde_json::Value = serde_json::from_str(redo_text).map_err(|e| {
        format!("the redo is not JSON ({e}): send exactly the text concord.prepare_branch returned")
    })?;
    if !value.is_array() {
        return Err(
            "the redo is not a JSON array: send exactly the text concord.prepare_branch returned"
                .into(),
        );
    }
    let redo = encode_redo_array(redo_text);
    decode_redo(&redo).map_err(|e| {
        format!("the redo's row images are malformed ({e}): send exactly the text concord.prepare_branch returned")
    })?;
    Ok(redo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_json_array_of_row_images_is_a_redo() {
        assert!(check_redo_text("[]").is_ok());
        let row = r#"[["public.t","U",null,{"id":1}]]"#;
        assert!(check_redo_text(row).is_ok());
        for bad in [
            "",
            "{}",
            "42",
            "[1]",
            "[[\"t\"]]",
            "not json",
            "[] trailing",
        ] {
            assert!(check_redo_text(bad).is_err(), "{bad:?}");
        }
    }
}
