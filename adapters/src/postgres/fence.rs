//! Fencing: no branch of an older epoch runs, prepares, or commits in one phase once a fence
//! has succeeded.
//!
//! Every pooled session holds the *session lock* ([`SESSION_LOCK`], an advisory lock) shared
//! for as long as it lives and read the fence epoch when it was created; a branch below the
//! highest epoch seen is refused at begin. [`Inner::fence`](super::Inner) ends every session
//! holding the session lock (their open branches roll back), takes it exclusively, then takes
//! the *fence lock* — held shared by every prepared branch until it is resolved — under a lock
//! timeout, and only then raises the epoch. So a fence waits for prepared branches of older
//! epochs, and names them when they are not resolved in time instead of hanging.
//!
//! # Implementation caveats
//!
//! * Ending sessions needs the right to signal them (the same role, or `pg_signal_backend`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{ClientWrapper, Hook, HookError};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::connection::{connect_to, pg_config};
use super::session::Sessions;
use super::{Inner, PostgresResource, Result, db_text};
use crate::{Epoch, ResourceError, Xid};

/// The advisory lock every pooled session holds shared for as long as it lives (see the module
/// docs); `fence` takes it exclusively.
pub(super) const SESSION_LOCK: &str = "1668247139, 1717923428";

impl PostgresResource {
    pub(super) async fn read_fence_epoch(&self) -> Result<Epoch> {
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let epoch: i64 = inner
            .timed(
                &conn,
                "read the fence epoch",
                conn.query_one("SELECT epoch FROM concord.fence WHERE id = 1", &[]),
            )
            .await?
            .map_err(|e| inner.db("read the fence epoch", &e))?
            .get(0);
        let epoch = u64::try_from(epoch).unwrap_or(0);
        inner.fence_seen.fetch_max(epoch, Ordering::AcqRel);
        Ok(Epoch(epoch))
    }
}

impl Inner {
    /// Refuses `xid` below the highest fence epoch this instance has seen.
    pub(super) fn not_fenced(&self, xid: &Xid) -> Result<()> {
        let fence = self.fence_seen.load(Ordering::Acquire);
        if xid.epoch.0 < fence {
            return Err(ResourceError::Fenced {
                resource: self.name.clone(),
                offered: xid.epoch,
                current: Epoch(fence),
            });
        }
        Ok(())
    }

    pub(super) async fn fence(&self, epoch: Epoch) -> Result<()> {
        let conn = self.conn().await?;
        let new = i64::try_from(epoch.0)
            .map_err(|_| self.rejected(format!("epoch {epoch} is out of range")))?;
        // Already there: nothing to wait for (the fence that raised it did the waiting).
        let read = conn.query_one("SELECT epoch FROM concord.fence WHERE id = 1", &[]);
        let current: i64 = self
            .timed(&conn, "read the fence epoch", read)
            .await?
            .map_err(|e| self.db("read the fence epoch", &e))?
            .get(0);
        if current >= new {
            self.fence_seen
                .fetch_max(u64::try_from(current).unwrap_or(0), Ordering::AcqRel);
            return Ok(());
        }
        drop(conn);
        let started = tokio::time::Instant::now();
        let wait = Duration::from_millis(self.config.fence_wait_ms.max(1));
        // A connection of its own, outside the pool: it must not hold the session lock shared.
        // Its statements wait for locks at most `wait`, and each answer at most the call
        // timeout: the whole is bounded by their sum (a half-open connection is dropped).
        let (pg, tls) = pg_config(&self.name, &self.config.url, self.config.connect_timeout_ms)?;
        let mut client = connect_to(&self.name, &pg, &tls, &self.target).await?;
        let fenced = async {
            self.end_sessions(&client, started + wait).await?;
            let left = wait.saturating_sub(started.elapsed()).as_millis().max(1);
            self.raise_fence(&mut client, epoch, new, left).await
        };
        let result = tokio::time::timeout(wait + self.call_timeout(), fenced)
            .await
            .unwrap_or_else(|_| {
                Err(self.unavailable(format!(
                    "fence to epoch {epoch}: no answer from {} within {} ms (fence_wait_ms and call_timeout_ms); fence again",
                    self.target,
                    (wait + self.call_timeout()).as_millis()
                )))
            });
        // Ending the fence's session releases the session lock; this instance's own pooled
        // sessions were ended too, so the idle ones go.
        drop(client);
        self.pool.retain(|_, _| false);
        result
    }

    /// Raises the stored epoch to `new` once no prepared branch holds the fence lock, waiting at
    /// most `left_ms`.
    pub(super) async fn raise_fence(
        &self,
        client: &mut Client,
        epoch: Epoch,
        new: i64,
        left_ms: u128,
    ) -> Result<()> {
        let left = left_ms;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.db("begin", &e))?;
        tx.batch_execute(&format!("SET LOCAL lock_timeout = {left}"))
            .await
            .map_err(|e| self.db("set the lock timeout", &e))?;
        let raised = async {
            tx.execute("SELECT pg_advisory_xact_lock(1668247139, 1717923427)", &[])
                .await?;
            tx.execute(
                "UPDATE concord.fence SET epoch = $1 WHERE id = 1 AND epoch < $1",
                &[&new],
            )
            .await
        };
        match raised.await {
            Ok(_) => {
                tx.commit()
                    .await
                    .map_err(|e| self.db("commit the fence", &e))?;
                self.fence_seen.fetch_max(epoch.0, Ordering::AcqRel);
                Ok(())
            }
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                drop(tx);
                // On this connection: a pooled one would wait for the session lock it holds.
                let waiting: Vec<String> = self
                    .prepared_gids_below(client, epoch)
                    .await
                    .unwrap_or_default();
                Err(self.unavailable(format!(
                    "fence to epoch {epoch} waited {} ms for prepared branches of older epochs to be resolved: {}; resolve them (recovery commits or rolls them back, or `concord txn resolve`) and fence again",
                    self.config.fence_wait_ms,
                    if waiting.is_empty() {
                        "a transaction holding the fence row".to_string()
                    } else {
                        waiting.join(", ")
                    }
                )))
            }
            Err(e) => Err(self.db("raise the fence epoch", &e)),
        }
    }

    /// Ends every session holding the session lock shared — the pooled sessions of every
    /// instance, whose branches are thereby rolled back — and takes it exclusively, so that no
    /// session of an older epoch can still commit a one-phase branch. Sessions that come back in
    /// the meantime are ended again, until `deadline`.
    pub(super) async fn end_sessions(
        &self,
        client: &Client,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        client
            .batch_execute("SET lock_timeout = 100")
            .await
            .map_err(|e| self.db("set the lock timeout", &e))?;
        let (classid, objid) = (1_668_247_139i64, 1_717_923_428i64);
        loop {
            let ended = client
                .query(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_locks
                      WHERE locktype = 'advisory' AND classid::bigint = $1 AND objid::bigint = $2
                        AND objsubid = 2 AND granted AND pid <> pg_backend_pid()
                        AND database = (SELECT oid FROM pg_database
                                         WHERE datname = current_database())",
                    &[&classid, &objid],
                )
                .await
                .map_err(|e| {
                    self.db(
                        "end the sessions of older epochs (the fence needs the right to: the same role, or pg_signal_backend)",
                        &e,
                    )
                })?;
            if !ended.is_empty() {
                tracing::info!(resource = %self.name, sessions = ended.len(), "fence ended sessions holding the session lock");
            }
            match client
                .batch_execute(&format!("SELECT pg_advisory_lock({SESSION_LOCK})"))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    return Err(self.unavailable(format!(
                        "fence could not end the sessions holding the session lock within {} ms (they keep coming back); stop the old primary and fence again",
                        self.config.fence_wait_ms
                    )));
                }
                Err(e) => return Err(self.db("take the session lock", &e)),
            }
        }
    }

    /// Every prepared `concord:` gid (of any node and resource) of an epoch below `epoch`.
    pub(super) async fn prepared_gids_below(
        &self,
        conn: &Client,
        epoch: Epoch,
    ) -> Result<Vec<String>> {
        let rows = conn
            .query(
                "SELECT gid FROM pg_prepared_xacts
                 WHERE database = current_database() AND gid LIKE 'concord:%' ORDER BY gid",
                &[],
            )
            .await
            .map_err(|e| self.db("list prepared transactions", &e))?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|gid| {
                gid.split(':')
                    .nth(1)
                    .and_then(|x| x.parse::<Xid>().ok())
                    .is_some_and(|x| x.epoch < epoch)
            })
            .collect())
    }
}

/// The error of a new pooled session that could not read the fence epoch: the session is
/// refused, and so is the branch that wanted it.
pub(super) fn unreadable_fence(e: tokio_postgres::Error) -> HookError {
    if e.as_db_error().is_none() {
        // The connection failed: retryable, like any other.
        return HookError::Backend(e);
    }
    HookError::Message(
        format!(
            "a new session could not read the fence epoch ({}), so it is refused: no branch runs unfenced; check that `concord pg install` ran in this database and that the role may read concord.fence",
            db_text(&e)
        )
        .into(),
    )
}

/// The hook every new pooled session runs: it takes the session lock shared (waiting at most
/// `wait_ms` for a fence that holds it exclusively) and then reads the fence epoch into
/// `seen`, so that a fence raised later must end this session first. A session that cannot
/// read the fence is refused (fail closed: a one-phase branch checks no fence of its own).
pub(super) fn hold_session_lock(
    sessions: Arc<Sessions>,
    seen: Arc<AtomicU64>,
    wait_ms: u64,
) -> Hook {
    Hook::async_fn(move |client: &mut ClientWrapper, _| {
        let seen = Arc::clone(&seen);
        // Before any await: the session the connect left in this task is this client's.
        sessions.file_created(client);
        Box::pin(async move {
            // Bounded: a fence holds the lock exclusively only while it raises the epoch.
            client
                .batch_execute(&format!(
                    "SET lock_timeout = {wait_ms};
                     SELECT pg_advisory_lock_shared({SESSION_LOCK});
                     RESET lock_timeout"
                ))
                .await
                .map_err(HookError::Backend)?;
            let row = client
                .query_one("SELECT epoch FROM concord.fence WHERE id = 1", &[])
                .await
                .map_err(unreadable_fence)?;
            let epoch: i64 = row.get(0);
            seen.fetch_max(u64::try_from(epoch).unwrap_or(0), Ordering::AcqRel);
            Ok(())
        })
    })
}
