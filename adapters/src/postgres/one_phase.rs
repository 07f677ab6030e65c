//! The one-phase path: a transaction whose only branch is here commits without `PREPARE`.
//!
//! A branch whose session heard no capture notice (and no failed statement) is committed by its
//! own `COMMIT`, with nothing journaled (a read-only vote). Otherwise `concord.finish_branch`
//! writes the marker and returns the redo; the connection waits, still holding the branch's
//! locks, until the coordinator has made the redo durable, then a `COMMIT` with
//! `synchronous_commit = on` ends it. An error from the server means it rolled back; a broken
//! connection means nobody knows, and [`one_phase_outcome`](super::Inner) finds out: it ends the
//! branch's backend if it still runs that transaction (its pid and transaction id travel in the
//! redo), waits until it is gone, and reads the marker.
//!
//! # Implementation caveats
//!
//! * A branch begun on a session that was already inside a transaction is refused: its
//!   `COMMIT` would end the other one.

use std::time::Duration;

use deadpool_postgres::{ClientWrapper, Object};
use tokio_postgres::Client;

use super::branch::{BranchConn, MARKER_RETENTION};
use super::{Inner, PostgresResource, Result, Session, db_text, lock};
use crate::{Epoch, ErrorClass, OnePhaseOutcome, Resource, ResourceError, Vote, Xid};

/// The `COMMIT` of a one-phase branch whose redo is journaled: flushed before it answers, in
/// the same round trip.
pub(super) const SYNCHRONOUS_COMMIT: &str = "SET LOCAL synchronous_commit = on; COMMIT";

/// A session's counts around a `COMMIT`.
#[derive(Clone, Copy)]
pub(super) struct Counts {
    pub(super) captured: u64,
    pub(super) no_transaction: u64,
}

impl Counts {
    pub(super) fn of(session: &Session) -> Counts {
        Counts {
            captured: session.captured(),
            no_transaction: session.no_transaction(),
        }
    }
}

impl PostgresResource {
    /// Ends the transaction of a branch whose finish failed; a fenced error gets the current
    /// fence epoch.
    pub(super) async fn failed_finish(
        &self,
        conn: &ClientWrapper,
        e: ResourceError,
    ) -> ResourceError {
        if e.class() != ErrorClass::InDoubt {
            let _ = self
                .inner
                .timed(conn, "roll back", conn.batch_execute("ROLLBACK"))
                .await;
        }
        match e {
            ResourceError::Fenced {
                resource, offered, ..
            } => ResourceError::Fenced {
                resource,
                offered,
                current: self.fence_epoch().await.unwrap_or(offered),
            },
            other => other,
        }
    }

    pub(super) async fn prepare_one_phase_branch(&self, xid: &Xid) -> Result<Vote> {
        let inner = &self.inner;
        let Some(slot) = inner.slots().remove(xid) else {
            return Err(inner.rejected(format!(
                "branch {xid} is not open here: it was never begun, or it was already prepared or ended"
            )));
        };
        let Some(branch) = slot.lock().await.take() else {
            return Err(inner.rejected(format!("branch {xid} is already being prepared")));
        };
        // Committed by its own COMMIT when the session heard no capture notice and no statement
        // failed; otherwise (or when the session is not known) the server is asked.
        let plain = branch.plain();
        let nested = branch.began_inside_another();
        let BranchConn { conn, begun, .. } = branch;
        if !begun {
            return Ok(Vote::ReadOnly);
        }
        if nested {
            return Err(self
                .failed_finish(&conn, inner.began_inside_another(xid))
                .await);
        }
        if conn.is_closed() {
            // No COMMIT can have gone out on it: the server ended the transaction — a fence
            // does that to the sessions of older epochs.
            let fence = self.fence_epoch().await.unwrap_or(Epoch(0));
            if fence > xid.epoch {
                return Err(ResourceError::Fenced {
                    resource: inner.name.clone(),
                    offered: xid.epoch,
                    current: fence,
                });
            }
            return Err(inner.unavailable(format!(
                "branch {xid}: the connection to {} closed before the commit (the server restarted or dropped it), so the branch's work is lost; run the transaction again",
                inner.target
            )));
        }
        // Nothing to replicate: the branch's own COMMIT ends it, with nothing journaled.
        // Otherwise the server gives the redo, empty if a savepoint took the rows back.
        if let Some(session) = plain {
            return match inner.commit_plain(&conn, &session, xid).await {
                Ok(()) => Ok(Vote::ReadOnly),
                Err(e) => Err(self.failed_finish(&conn, e).await),
            };
        }
        match inner.finish_on(&conn, xid).await {
            Ok(redo) => {
                lock(&inner.ready).insert(*xid, conn);
                Ok(Vote::Commit { redo })
            }
            Err(e) => Err(self.failed_finish(&conn, e).await),
        }
    }

    pub(super) async fn commit_one_phase_branch(&self, xid: &Xid) -> Result<OnePhaseOutcome> {
        let inner = &self.inner;
        let Some(conn) = lock(&inner.ready).remove(xid) else {
            return Err(inner.rejected(format!(
                "branch {xid} is not ready for a one-phase commit here"
            )));
        };
        let session = inner.sessions.of(&conn);
        let before = session.as_deref().map(Counts::of);
        // The journal holds this branch's redo as committed once the coordinator hears back:
        // the COMMIT must be flushed before it answers, whatever the role, the database or the
        // application set (`docs/postgres.md`, "Durability").
        let answer =
            tokio::time::timeout(inner.call_timeout(), conn.batch_execute(SYNCHRONOUS_COMMIT));
        let Ok(answer) = answer.await else {
            // The COMMIT may or may not have taken effect: `one_phase_outcome` finds out.
            inner.close(&conn);
            return Err(inner.in_doubt_past_deadline(xid));
        };
        match answer {
            Ok(()) => {
                if let (Some(session), Some(before)) = (&session, before) {
                    inner.after_commit(xid, session, before)?;
                }
                inner.prune_markers(&conn).await;
                Ok(OnePhaseOutcome::Committed)
            }
            // The server answered with an error: the transaction rolled back (or, had the SET
            // failed, is aborted: ended here, before the connection goes back to the pool).
            Err(e) if e.as_db_error().is_some() => {
                let _ = inner
                    .timed(&conn, "roll back", conn.batch_execute("ROLLBACK"))
                    .await;
                Ok(OnePhaseOutcome::RolledBack {
                    error: inner.statement(xid, &e),
                })
            }
            Err(e) => Err(inner.lost_commit(xid, &e)),
        }
    }
}

impl Inner {
    /// `concord.finish_branch`: the redo and (with redo) the marker, leaving the transaction
    /// open. The redo is empty when nothing was captured.
    pub(super) async fn finish_on(&self, conn: &Object, xid: &Xid) -> Result<Vec<u8>> {
        // Prepared once per connection: the server parses and plans it once.
        let statement = self
            .timed(
                conn,
                "finish the branch",
                conn.prepare_cached("SELECT concord.finish_branch($1, $2, $3)"),
            )
            .await?
            .map_err(|e| self.finish_error(xid, &e))?;
        let node = i32::try_from(xid.node)
            .map_err(|_| self.rejected(format!("node {} is out of range", xid.node)))?;
        let gid = self.gid(xid);
        let xid_text = xid.to_string();
        let row = self
            .timed(
                conn,
                "finish the branch",
                conn.query_one(&statement, &[&gid, &xid_text, &node]),
            )
            .await?
            .map_err(|e| self.finish_error(xid, &e))?;
        let redo: Option<String> = row.get(0);
        Ok(redo.unwrap_or_default().into_bytes())
    }

    /// A `BEGIN` on the branch's connection found a transaction open: the connection came
    /// back to the pool inside an earlier one, or the application sent a `BEGIN` through the
    /// branch. Either way the branch's work cannot be told apart, and it is refused.
    pub(super) fn began_inside_another(&self, xid: &Xid) -> ResourceError {
        self.rejected(format!(
            "branch {xid}: a BEGIN on its connection to {} found a transaction already open (the connection was left inside an earlier transaction, or a BEGIN was sent through the branch), so its work cannot be told apart; it is rolled back, run the transaction again",
            self.target
        ))
    }

    /// The `COMMIT` of a one-phase branch whose session heard no capture notice.
    pub(super) async fn commit_plain(
        &self,
        conn: &Client,
        session: &Session,
        xid: &Xid,
    ) -> Result<()> {
        let before = Counts::of(session);
        let answer = tokio::time::timeout(self.call_timeout(), conn.batch_execute("COMMIT"));
        let Ok(answer) = answer.await else {
            session.close();
            return Err(self.in_doubt_past_deadline(xid));
        };
        match answer {
            Ok(()) => self.after_commit(xid, session, before),
            Err(e) if e.as_db_error().is_none() => Err(self.lost_commit(xid, &e)),
            Err(e) => Err(self.finish_error(xid, &e)),
        }
    }

    /// What a one-phase branch's `COMMIT` made the session hear. "No transaction in progress":
    /// the application had ended the transaction itself, and what became of its work is not
    /// known. A capture notice: a trigger that runs at commit (a deferred constraint trigger)
    /// wrote a replicated table after the redo was taken, so those rows are committed but not
    /// in the redo — reported, since it cannot be undone.
    pub(super) fn after_commit(&self, xid: &Xid, session: &Session, before: Counts) -> Result<()> {
        let after = Counts::of(session);
        if after.no_transaction != before.no_transaction {
            return Err(ResourceError::InDoubt {
                resource: self.name.clone(),
                message: format!(
                    "branch {xid}: its transaction had already been ended by a COMMIT or ROLLBACK the application sent through the branch, so concord cannot tell what became of its work; leave ending the transaction to concord"
                ),
            });
        }
        if after.captured != before.captured {
            tracing::error!(
                resource = %self.name,
                %xid,
                "rows of a replicated table were written while the branch committed (by a trigger that runs at commit, such as a deferred constraint trigger): they are committed but not in the branch's redo, so a standby will not have them"
            );
        }
        Ok(())
    }

    pub(super) fn finish_error(&self, xid: &Xid, e: &tokio_postgres::Error) -> ResourceError {
        if e.code().is_some_and(|c| c.code() == "CF001") {
            return ResourceError::Fenced {
                resource: self.name.clone(),
                offered: xid.epoch,
                current: Epoch(0),
            };
        }
        self.statement(xid, e)
    }

    /// The error of a `COMMIT` whose answer was lost with the connection.
    pub(super) fn lost_commit(&self, xid: &Xid, e: &tokio_postgres::Error) -> ResourceError {
        ResourceError::InDoubt {
            resource: self.name.clone(),
            message: format!(
                "the connection to {} broke during the one-phase COMMIT of {xid}: {}",
                self.target,
                db_text(e)
            ),
        }
    }

    /// What became of a one-phase branch whose answer was lost; see the module docs. The
    /// backend named in the redo is ended if it still runs the branch's transaction, and then
    /// the marker decides; without the marker, the transaction's status must confirm the
    /// rollback (a marker pruned after [`MARKER_RETENTION`] leaves the answer open).
    pub(super) async fn one_phase_outcome(
        &self,
        xid: &Xid,
        redo: &[u8],
    ) -> Result<OnePhaseOutcome> {
        let (txid, pid) = one_phase_ids(redo).map_err(|e| {
            self.rejected(format!(
                "the journaled redo of {xid} does not name its transaction: {e}"
            ))
        })?;
        let conn = self.conn().await?;
        let xid32 = (txid & 0xFFFF_FFFF).to_string();
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.fence_wait_ms.max(1_000));
        let terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                          WHERE pid = $1 AND backend_xid::text = $2";
        loop {
            let running = self
                .timed(
                    &conn,
                    "end the session of a one-phase branch",
                    conn.query(terminate, &[&pid, &xid32]),
                )
                .await?
                .map_err(|e| self.db("look for the session of a one-phase branch", &e))?;
            if running.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.unavailable(format!(
                    "the one-phase branch {xid} still runs in backend {pid} after it was told to end; asking again later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let gid = self.gid(xid);
        let marker = "SELECT 1 FROM concord.markers WHERE gid = $1";
        let marked = self
            .timed(&conn, "read the marker", conn.query_opt(marker, &[&gid]))
            .await?
            .map_err(|e| self.db("read the marker of", &e))?
            .is_some();
        if marked {
            return Ok(OnePhaseOutcome::Committed);
        }
        let txid_text = txid.to_string();
        let status = "SELECT pg_xact_status($1::text::xid8)";
        let status: Option<String> = self
            .timed(
                &conn,
                "read the status of a transaction",
                conn.query_one(status, &[&txid_text]),
            )
            .await?
            .map_err(|e| self.db("read the status of the transaction of", &e))?
            .get(0);
        match status.as_deref() {
            Some("aborted") => Ok(OnePhaseOutcome::RolledBack {
                error: ResourceError::Unavailable {
                    resource: self.name.clone(),
                    message: format!(
                        "the one-phase commit of {gid} did not happen (the transaction {txid} aborted; the session ended before its COMMIT took effect)"
                    ),
                },
            }),
            other => Err(ResourceError::InDoubt {
                resource: self.name.clone(),
                message: format!(
                    "the one-phase branch {gid} has no marker, yet its transaction {txid} reads {}: its marker may have been pruned (after {MARKER_RETENTION}); check the data by hand",
                    other.unwrap_or("as too old to know")
                ),
            }),
        }
    }
}

/// The transaction id and backend pid a one-phase redo carries.
pub(super) fn one_phase_ids(redo: &[u8]) -> Result<(u64, i32), String> {
    let value: serde_json::Value =
        serde_json::from_slice(redo).map_err(|e| format!("not JSON: {e}"))?;
    let txid = value
        .get("txid")
        .and_then(|t| t.as_str())
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or("no txid")?;
    let pid = value
        .get("pid")
        .and_then(|p| p.as_i64())
        .and_then(|p| i32::try_from(p).ok())
        .ok_or("no pid")?;
    Ok((txid, pid))
}
