//! The branch: a transaction on one pooled connection, prepared with `PREPARE TRANSACTION`
//! and resolved by gid.
//!
//! Begin takes a connection from the pool (refusing a fenced epoch at once) and files it as the
//! branch's slot; [`PgBranch`] runs the application's statements on it, the first one pipelined
//! behind the `BEGIN`. Prepare runs `concord.prepare_branch` (fence check, redo, marker) and
//! `PREPARE TRANSACTION` in one round trip and gives the connection back; the vote is
//! remembered so that a repeated prepare votes the same. Commit and rollback run `COMMIT
//! PREPARED` / `ROLLBACK PREPARED` on any connection; when the prepared transaction is gone the
//! marker tells what happened to it, and a commit that finds neither is a heuristic hazard.
//! Recover lists the prepared `concord:` transactions of this resource and node.
//!
//! # Implementation caveats
//!
//! * Read-only votes are remembered for the last `READ_ONLY_REMEMBERED_MAX` branches only.
//! * Markers are pruned every `PRUNE_EVERY` commits, those older than `MARKER_RETENTION`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use deadpool_postgres::{ClientWrapper, Object};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::admin::{PREPARED_SQL, prepared_of};
use super::replay::encode_redo_array;
use super::{
    Inner, PostgresResource, PreparedBranch, Result, Session, first_value, lock, quote_literal,
};
use crate::{Epoch, Resource, ResourceError, Vote, Xid};

/// Markers older than this are pruned (a branch resolved so long ago is never asked about).
pub(super) const MARKER_RETENTION: &str = "7 days";

/// How many read-only branches are remembered, so that preparing one again votes the same.
const READ_ONLY_REMEMBERED_MAX: usize = 4096;

/// Markers are pruned after every this many commits.
const PRUNE_EVERY: u64 = 1000;

/// An application's handle on one branch: its statements run in the branch's transaction.
pub struct PgBranch {
    inner: Arc<Inner>,
    xid: Xid,
    conn: Slot,
}

/// An open branch's connection (`None` once prepare or rollback took it).
pub(super) type Slot = Arc<tokio::sync::Mutex<Option<BranchConn>>>;

/// A branch's pooled connection and whether its `BEGIN` has been sent: it goes out with the
/// branch's first statement, in the same round trip, so a branch that never runs one costs
/// nothing on the server.
pub(super) struct BranchConn {
    pub(super) conn: Object,
    /// Whether `BEGIN` went out (set before it is sent: a caller that gives up on its first
    /// statement does not take it back).
    pub(super) begun: bool,
    /// What the session had heard when the branch began, if the session is known (see the
    /// `session` module).
    pub(super) heard: Option<Heard>,
    /// Whether a statement of the branch failed, or went out and was never answered (its
    /// caller gave up on it): the transaction may be aborted, which a bare `COMMIT` would not
    /// reveal (PostgreSQL answers it with a rollback, without an error).
    pub(super) failed: bool,
}

/// A session's counts when a branch began on it.
pub(super) struct Heard {
    pub(super) session: Arc<Session>,
    pub(super) captured: u64,
    pub(super) in_transaction: u64,
}

impl BranchConn {
    /// The session, when the branch may be committed by its `COMMIT` alone: the session is
    /// known, heard no capture notice since the branch began, and no statement failed or went
    /// unanswered.
    pub(super) fn plain(&self) -> Option<Arc<Session>> {
        let heard = self.heard.as_ref()?;
        (!self.failed && heard.session.captured() == heard.captured)
            .then(|| Arc::clone(&heard.session))
    }

    /// Whether a `BEGIN` on the branch's connection found a transaction open.
    pub(super) fn began_inside_another(&self) -> bool {
        self.heard
            .as_ref()
            .is_some_and(|h| h.session.in_transaction() != h.in_transaction)
    }
}

impl PostgresResource {
    /// The handle of the branch of `xid`, which must have been begun ([`Resource::begin`]).
    pub fn branch(&self, xid: &Xid) -> Result<PgBranch> {
        let conn = self.inner.slots().get(xid).cloned().ok_or_else(|| {
            self.inner
                .rejected(format!("branch {xid} is not open here"))
        })?;
        Ok(PgBranch {
            inner: self.inner.clone(),
            xid: *xid,
            conn,
        })
    }

    pub(super) async fn begin_branch(&self, xid: &Xid) -> Result<()> {
        let inner = &self.inner;
        if inner.slots().contains_key(xid) {
            return Ok(());
        }
        // Refused at once below the highest fence this instance has seen, and again once the
        // branch has its session: a new session read the fence when it was created, and an
        // older one still lives, so no fence was raised since it read it.
        inner.not_fenced(xid)?;
        // The BEGIN goes out with the branch's first statement.
        let conn = inner.conn().await?;
        inner.not_fenced(xid)?;
        let heard = inner.sessions.of(&conn).map(|session| Heard {
            captured: session.captured(),
            in_transaction: session.in_transaction(),
            session,
        });
        let branch = BranchConn {
            conn,
            begun: false,
            heard,
            failed: false,
        };
        inner
            .slots()
            .insert(*xid, Arc::new(tokio::sync::Mutex::new(Some(branch))));
        Ok(())
    }

    pub(super) async fn prepare_branch(&self, xid: &Xid) -> Result<Vote> {
        let inner = &self.inner;
        let Some(slot) = inner.slots().get(xid).cloned() else {
            // Prepared before (the slot is gone once prepared): vote again from the database.
            return inner.vote_again(xid).await;
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
            // A fence ends the sessions of older epochs: say so rather than "connection closed".
            Err(self.closed_before_prepare(xid).await)
        } else if begun {
            inner.prepare_on(&conn, xid).await
        } else {
            // Not a statement ran: nothing on the server to prepare.
            Ok(Vote::ReadOnly)
        };
        inner.slots().remove(xid);
        match result {
            Ok(vote) => {
                match &vote {
                    Vote::Commit { redo } => {
                        lock(&inner.votes).insert(*xid, redo.clone());
                    }
                    Vote::ReadOnly => {
                        let mut read_only = lock(&inner.read_only);
                        if read_only.len() >= READ_ONLY_REMEMBERED_MAX {
                            read_only.pop_front();
                        }
                        read_only.push_back(*xid);
                    }
                }
                Ok(vote)
            }
            Err(e) => Err(self.prepare_failed(xid, conn, e).await),
        }
    }

    /// A prepare of `xid` failed: ends the branch's transaction (the branch is gone) and
    /// returns the error, a fenced one with the fence epoch now in force. A connection the
    /// server closed under the prepare, with a fence above the branch's epoch, was closed by
    /// that fence: fenced too.
    pub(super) async fn prepare_failed(
        &self,
        xid: &Xid,
        conn: Object,
        e: ResourceError,
    ) -> ResourceError {
        let inner = &self.inner;
        let closed = conn.is_closed();
        let _ = inner
            .timed(&conn, "roll back", conn.batch_execute("ROLLBACK"))
            .await;
        drop(conn);
        match e {
            ResourceError::Fenced {
                resource, offered, ..
            } => ResourceError::Fenced {
                resource,
                offered,
                current: self.fence_epoch().await.unwrap_or(offered),
            },
            other if closed => match self.fence_epoch().await {
                Ok(fence) if fence > xid.epoch => ResourceError::Fenced {
                    resource: inner.name.clone(),
                    offered: xid.epoch,
                    current: fence,
                },
                _ => other,
            },
            other => other,
        }
    }

    pub(super) async fn commit_branch(&self, xid: &Xid) -> Result<()> {
        let inner = &self.inner;
        if inner.slots().contains_key(xid) {
            return Err(inner.rejected(format!(
                "branch {xid} is not prepared; prepare it first (a one-phase commit goes through prepare_one_phase)"
            )));
        }
        inner.resolve(xid, true).await
    }

    pub(super) async fn rollback_branch(&self, xid: &Xid) -> Result<()> {
        let inner = &self.inner;
        let ready = lock(&inner.ready).remove(xid);
        if let Some(conn) = ready {
            return inner
                .timed(&conn, "roll back", conn.batch_execute("ROLLBACK"))
                .await?
                .map_err(|e| inner.db("roll back", &e));
        }
        let slot = inner.slots().remove(xid);
        if let Some(slot) = slot {
            if let Some(BranchConn {
                conn, begun: true, ..
            }) = slot.lock().await.take()
            {
                inner
                    .timed(&conn, "roll back", conn.batch_execute("ROLLBACK"))
                    .await?
                    .map_err(|e| inner.db("roll back", &e))?;
            }
            return Ok(());
        }
        inner.resolve(xid, false).await
    }

    pub(super) async fn recover_branches(&self) -> Result<Vec<Xid>> {
        let mut xids: Vec<Xid> = self
            .inner
            .prepared()
            .await?
            .into_iter()
            .map(|p| p.xid)
            .collect();
        xids.sort();
        Ok(xids)
    }
}

impl PgBranch {
    /// The branch's transaction.
    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// Runs a statement in the branch; returns the number of rows it changed. The statement is
    /// prepared once per pooled connection and cached (as for [`PgBranch::query`] and
    /// [`PgBranch::query_one`]); see `docs/postgres.md` on what that means after DDL.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.run(async |c| c.execute(&c.prepare_cached(sql).await?, params).await)
            .await
    }

    /// Runs a query in the branch.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.run(async |c| c.query(&c.prepare_cached(sql).await?, params).await)
            .await
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        self.run(async |c| c.query_one(&c.prepare_cached(sql).await?, params).await)
            .await
    }

    /// Runs several statements (no parameters, no results).
    pub async fn batch_execute(&self, sql: &str) -> Result<()> {
        self.run(async |c| c.batch_execute(sql).await).await
    }

    /// Runs `statement` on the branch's connection; the first one goes out pipelined behind the
    /// branch's `BEGIN`, in the same round trip.
    async fn run<T>(
        &self,
        statement: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T> {
        let mut guard = self.conn.lock().await;
        let Some(branch) = guard.as_mut() else {
            return Err(self.inner.rejected(format!(
                "branch {} is being prepared or resolved; it takes no more statements",
                self.xid
            )));
        };
        // Failed until answered: should the caller drop this future after the statement went
        // out, the branch's end must not trust a bare COMMIT.
        let failed = branch.failed;
        branch.failed = true;
        if branch.begun {
            let result = statement(&branch.conn).await;
            branch.failed = failed || result.is_err();
            return result.map_err(|e| self.inner.statement(&self.xid, &e));
        }
        branch.begun = true;
        let client: &Object = &branch.conn;
        let (begin, result) = tokio::join!(client.batch_execute("BEGIN"), statement(client));
        branch.failed = failed || begin.is_err() || result.is_err();
        begin.map_err(|e| self.inner.db("begin", &e))?;
        result.map_err(|e| self.inner.statement(&self.xid, &e))
    }
}

impl Inner {
    /// Fence check, redo, marker and `PREPARE TRANSACTION`, in one round trip
    /// (`concord.prepare_branch`, then the prepare itself, which runs only if the first
    /// succeeded).
    pub(super) async fn prepare_on(&self, conn: &ClientWrapper, xid: &Xid) -> Result<Vote> {
        Ok(match self.prepare_text(conn, xid).await? {
            Some(rows) => Vote::Commit {
                redo: encode_redo_array(&rows),
            },
            None => Vote::ReadOnly,
        })
    }

    /// [`Inner::prepare_on`], returning the text `concord.prepare_branch` returned (the
    /// branch's row images, a JSON array); `None`: the branch wrote nothing, and its
    /// transaction is ended.
    pub(super) async fn prepare_text(
        &self,
        conn: &ClientWrapper,
        xid: &Xid,
    ) -> Result<Option<String>> {
        let gid = self.gid(xid);
        let sql = format!(
            "SELECT concord.prepare_branch({epoch}, {gid_lit}, {xid_lit}, {node});
             PREPARE TRANSACTION {gid_lit}",
            epoch = xid.epoch.0,
            gid_lit = quote_literal(&gid),
            xid_lit = quote_literal(&xid.to_string()),
            node = xid.node,
        );
        match self.timed(conn, "prepare", conn.simple_query(&sql)).await? {
            Ok(messages) => Ok(Some(first_value(&messages).unwrap_or("[]").to_string())),
            Err(e) if e.code().is_some_and(|c| c.code() == "CF002") => {
                // Nothing written: end the transaction, nothing to commit.
                self.timed(conn, "roll back", conn.batch_execute("ROLLBACK"))
                    .await?
                    .map_err(|e| self.statement(xid, &e))?;
                Ok(None)
            }
            Err(e) if e.code().is_some_and(|c| c.code() == "CF001") => Err(ResourceError::Fenced {
                resource: self.name.clone(),
                offered: xid.epoch,
                current: Epoch(0),
            }),
            Err(e) => Err(self.statement(xid, &e)),
        }
    }

    /// A second prepare of a branch already prepared: the same vote, from memory. After a
    /// restart the redo is gone (the captured rows are visible only inside the prepared
    /// transaction); recovery never prepares again, it commits or rolls back.
    pub(super) async fn vote_again(&self, xid: &Xid) -> Result<Vote> {
        if let Some(redo) = lock(&self.votes).get(xid) {
            return Ok(Vote::Commit { redo: redo.clone() });
        }
        if lock(&self.read_only).contains(xid) {
            return Ok(Vote::ReadOnly);
        }
        if self.prepared().await?.iter().any(|p| p.xid == *xid) {
            return Err(self.rejected(format!(
                "branch {xid} is prepared, but by an earlier run of this process: its redo is not known any more; commit or roll it back"
            )));
        }
        Err(self.rejected(format!(
            "branch {xid} is unknown: it was never begun here, or its work was lost when the connection or the process ended before prepare; roll the transaction back"
        )))
    }

    pub(super) async fn resolve(&self, xid: &Xid, commit: bool) -> Result<()> {
        if lock(&self.read_only).contains(xid) {
            // It voted read-only: there was nothing to prepare, and nothing to resolve.
            return Ok(());
        }
        let result = self.resolve_prepared(xid, commit).await;
        if result.is_ok() {
            lock(&self.votes).remove(xid);
        }
        result
    }

    pub(super) async fn resolve_prepared(&self, xid: &Xid, commit: bool) -> Result<()> {
        let gid = self.gid(xid);
        let conn = self.conn().await?;
        let verb = if commit { "COMMIT" } else { "ROLLBACK" };
        let sql = format!("{verb} PREPARED {}", quote_literal(&gid));
        match self
            .timed(&conn, &format!("{verb} PREPARED"), conn.batch_execute(&sql))
            .await?
        {
            Ok(()) => {
                if commit {
                    self.prune_markers(&conn).await;
                }
                Ok(())
            }
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                let marker = "SELECT 1 FROM concord.markers WHERE gid = $1";
                let marked = self
                    .timed(&conn, "read the marker", conn.query_opt(marker, &[&gid]))
                    .await?
                    .map_err(|e| self.db("read the marker of", &e))?
                    .is_some();
                match (commit, marked) {
                    (true, true) | (false, false) => Ok(()),
                    // Never prepared, rolled back, or committed so long ago that its marker
                    // was pruned: nothing is left to commit, and nothing to tell them apart by.
                    (true, false) => Err(self.neither_prepared_nor_marked(&gid)),
                    (false, true) => Err(ResourceError::InDoubt {
                        resource: self.name.clone(),
                        message: format!(
                            "cannot roll back {gid}: it already committed (its marker exists)"
                        ),
                    }),
                }
            }
            Err(e) => Err(self.db(&format!("{verb} PREPARED {gid}"), &e)),
        }
    }

    /// The hazard of a commit that finds neither the prepared transaction nor its marker: the
    /// branch was never prepared here, was rolled back (by hand, or by another node's
    /// recovery), or committed more than [`MARKER_RETENTION`] ago. Nothing tells these apart,
    /// and the first two contradict a decision to commit.
    pub(super) fn neither_prepared_nor_marked(&self, gid: &str) -> ResourceError {
        ResourceError::HeuristicHazard {
            resource: self.name.clone(),
            message: format!(
                "commit of {gid} found neither the prepared transaction nor the marker of its commit in {}: it was never prepared there, was rolled back (by hand or by another node's recovery), or committed more than {MARKER_RETENTION} ago (its marker since pruned)",
                self.target
            ),
        }
    }

    pub(super) async fn prune_markers(&self, conn: &ClientWrapper) {
        if self.commits.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY != PRUNE_EVERY - 1 {
            return;
        }
        let sql =
            format!("DELETE FROM concord.markers WHERE at < now() - interval '{MARKER_RETENTION}'");
        if let Ok(Err(e)) = self
            .timed(conn, "prune markers", conn.batch_execute(&sql))
            .await
        {
            tracing::warn!(resource = %self.name, error = %e, "pruning old markers failed");
        }
    }

    pub(super) async fn prepared(&self) -> Result<Vec<PreparedBranch>> {
        let conn = self.conn().await?;
        let rows = self
            .timed(
                &conn,
                "list prepared transactions",
                conn.query(PREPARED_SQL, &[]),
            )
            .await?
            .map_err(|e| self.db("list prepared transactions", &e))?;
        Ok(prepared_of(&self.name, self.config.node, &rows))
    }
}
