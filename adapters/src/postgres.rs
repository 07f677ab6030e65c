//! The PostgreSQL resource: a branch is a transaction in a real PostgreSQL database, prepared
//! with `PREPARE TRANSACTION` and resolved with `COMMIT PREPARED` / `ROLLBACK PREPARED` — or,
//! when it is its transaction's only branch, committed in one phase.
//!
//! * **A branch** ([`PgBranch`], reached with [`PostgresResource::branch`]) is one connection
//!   from the resource's pool with an open transaction, on which the application runs its own
//!   statements. Begin takes the connection (and refuses a fenced epoch at once); the `BEGIN`
//!   goes out with the branch's first statement, in the same round trip. Statements are
//!   prepared once per connection and cached.
//! * **Sessions and the fence.** Every pooled session takes the *session lock* (an advisory
//!   lock) shared when it is created and holds it for as long as it lives, then reads the fence
//!   epoch. [`Resource::fence`] ends every session holding that lock (their open branches roll
//!   back), takes it exclusively, and only then raises the epoch. So while a session lives, the
//!   fence is what it read: a branch of an older epoch is refused at begin, and a branch that
//!   began cannot be passed by a fence while it runs.
//! * **Prepare** sends, in one round trip, `concord.prepare_branch` — the fence check under the
//!   *fence lock* (a second advisory lock, taken shared by the transaction, so held by the
//!   prepared transaction until it is resolved), the branch's captured row images (the
//!   **redo**), the branch's marker row — and `PREPARE TRANSACTION 'concord:<xid>:<resource>'`.
//!   The connection then goes back to the pool: a prepared transaction belongs to the server,
//!   not to the session. A branch that wrote nothing votes read-only.
//! * **Commit / rollback** run `COMMIT PREPARED` / `ROLLBACK PREPARED` on any pooled connection.
//!   When the prepared transaction no longer exists, its marker tells what happened to it: a
//!   commit that finds the marker, or a rollback that finds none, already happened and succeeds;
//!   a rollback that finds the marker is reported in doubt, and a commit that finds none is a
//!   heuristic hazard ([`ResourceError::HeuristicHazard`]): never guessed.
//! * **Recover** lists `pg_prepared_xacts` entries of this database whose gid carries this
//!   resource's name and an xid of this node.
//! * **Fence**, after ending the sessions, takes the fence lock exclusively with a lock timeout:
//!   a prepared branch of an older epoch holds it shared until it is resolved, so the fence
//!   waits for those, and when they are not resolved within the timeout it fails naming them
//!   instead of hanging. An old branch can therefore never be prepared, nor still be
//!   unresolved, nor commit in one phase, once a fence has succeeded (`docs/postgres.md`).
//! * **One phase** (a transaction whose only branch is here). The capture trigger tells the
//!   branch's session when it captures a row image (a notice; see the `session` module), so a
//!   branch that captured nothing is committed by its own `COMMIT`, in one round trip, with
//!   nothing journaled: the coordinator sees a read-only vote. A branch with redo is finished
//!   by `concord.finish_branch` (the redo and the marker, no `PREPARE`: no two-phase state
//!   file, no second commit record in PostgreSQL's WAL), and committed with a
//!   plain `COMMIT` on its own connection once the coordinator has made the redo durable, while
//!   the branch still holds its locks. An error *from the server* to that `COMMIT` means it
//!   rolled back; a broken connection means nobody knows, and [`Resource::one_phase_outcome`]
//!   finds out: it ends the branch's backend if it still runs that transaction (its pid and
//!   transaction id travel in the redo), waits until it is gone, and then the marker — written
//!   inside the branch — tells committed from not.
//! * **Capture.** The trigger `concord pg replicate` installs collects each changed row's image
//!   in a transaction-local setting (spilling to the `concord.capture` table past 64 KiB), so
//!   capture writes nothing until the branch's end.
//! * **Replay** applies a redo's row images by primary key (`concord.apply_row`) in one
//!   transaction, with `concord.replaying` on (the capture trigger stays quiet), together with
//!   the LSN in `concord.applied`; an LSN at or below the applied one changes nothing.
//! * **Re-seeding** reads, writes and removes one row by its inventory key
//!   (`<table>/<primary key>`, content the row's canonical JSON), writing through the path
//!   replay uses with `concord.replaying` on, and sets the applied LSN (the `reseed` module).
//!
//! The redo (version 1) is JSON: `{"v":1,"rows":[[table, op, pk, row], …]}` (one-phase redo
//! adds `"txid"` and `"pid"`, which replay ignores), where `table` is the quoted
//! `schema.table`, `op` is `"U"` (the row now has this image) or `"D"` (the row with this key
//! is gone), `pk` an object of the primary key's columns and `row` the whole row (`to_jsonb`),
//! `null` for a delete. Since schema version 2 the capture leaves `pk` to the reader (`null`)
//! and `row` is the old row for a delete: the row image holds the key, and replay takes it from
//! the table's primary key.
//!
//! [`install`] and [`replicate`] set up a database (`concord pg install|replicate`);
//! [`PostgresResource::open`] checks it: the schema version, and `max_prepared_transactions`
//! above 0 (reported with the fix otherwise).
//!
//! # Safety rules
//!
//! * **Durability.** A one-phase branch with redo commits with `SET LOCAL synchronous_commit =
//!   on`, whatever the role, database or application set: the journal holds it as committed
//!   once its `COMMIT` answers. `PREPARE TRANSACTION` and `COMMIT PREPARED` are flushed by
//!   PostgreSQL whatever the setting (`docs/postgres.md`, "Durability").
//! * **Fail closed.** A new pooled session that cannot read the fence epoch is refused, and
//!   the branch that asked for it with it ([`ResourceError::Rejected`]).
//! * **Deadlines.** Connections use TCP keepalives and a `tcp_user_timeout` unless the
//!   connection string sets them, and a connect timeout; each of concord's own round trips
//!   waits at most [`PostgresConfig::call_timeout_ms`], after which its connection is closed,
//!   never reused. The application's own statements are not bounded here.
//!
//! # Modules
//!
//! This file holds the resource itself — its configuration, the pool and its open, the
//! `Resource` implementation (which hands each call to the module of its seam), deadlines and
//! errors. Then, one seam each:
//!
//! * `admin` — [`install`], [`replicate`], [`prepared_in`] and [`check_reachable`]: setting a
//!   database up and looking at it without opening the resource;
//! * `branch` — [`PgBranch`], begin, prepare, commit and rollback by gid, recover;
//! * `one_phase` — the one-phase path and the outcome of a commit whose answer was lost;
//! * `remote` — a branch prepared by a remote application
//!   ([`PostgresResource::prepare_for_enlist`]) and adopted by the coordinator daemon
//!   ([`PostgresResource::adopt_prepared`]), which finishes it by gid;
//! * `fence` — the session lock, the fence lock and raising the epoch;
//! * `replay` — the redo format ([`decode_redo`]) and its replay;
//! * `reseed` — a re-seed's rows by inventory key, and the applied LSN it sets;
//! * `connection` — connection settings, a bounded connect, the checks before the pool opens;
//! * `secret` — connection strings without their password ([`redact_url`]);
//! * `session` — the pool's sessions and the notices they hear; [`schema`] — the `concord`
//!   schema.
//!
//! # Implementation caveats
//!
//! * A prepare past its deadline may still reach the server later; the branch is then
//!   prepared without a decision, and recovery rolls it back.

mod admin;
mod branch;
mod checks;
mod connection;
mod fence;
mod inventory;
mod one_phase;
mod remote;
mod replay;
mod reseed;
pub mod schema;
mod secret;
mod session;
mod tls;

pub use admin::{check_reachable, install, prepared_in, replicate};
pub use branch::PgBranch;
pub use remote::{ENLIST_REDO_BYTES_MAX, check_redo_text};
pub use replay::decode_redo;
pub use reseed::ROW_TEXT_BYTES_MAX;
pub use secret::{redact_url, with_password};

use branch::Slot;
use connection::{check_server, pg_config, target_of};
use fence::hold_session_lock;

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use crate::{BlobContent, Epoch, Lsn, OnePhaseOutcome, Resource, ResourceError, Vote, Xid};
use session::{NoticeConnect, Session, Sessions};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// How a PostgreSQL resource connects and behaves. Its `Debug` shows the connection string
/// without its password ([`redact_url`]).
#[derive(Clone)]
pub struct PostgresConfig {
    /// A libpq-style connection string (`host=… port=… user=… dbname=…`) or URL.
    pub url: String,
    /// This coordinator node (its xids are the ones `recover` lists).
    pub node: u32,
    /// Most connections: open branches plus the coordinator's own calls.
    pub pool_size: usize,
    /// How long a branch waits for a free connection before it fails (milliseconds).
    pub pool_wait_ms: u64,
    /// How long `fence` waits for prepared branches of older epochs (milliseconds).
    pub fence_wait_ms: u64,
    /// How long one of concord's own round trips (prepare, commit, rollback, recover, replay,
    /// reading the fence) may wait for the server's answer (milliseconds). Past it the call
    /// fails and its connection is closed, never reused: a prepare votes no, a commit is tried
    /// again, a one-phase commit is in doubt until its outcome is established. Statements the
    /// application runs in a branch are not bounded by it.
    pub call_timeout_ms: u64,
    /// How long opening a connection may take (milliseconds), unless the connection string
    /// sets `connect_timeout`.
    pub connect_timeout_ms: u64,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("node", &self.node)
            .field("pool_size", &self.pool_size)
            .field("pool_wait_ms", &self.pool_wait_ms)
            .field("fence_wait_ms", &self.fence_wait_ms)
            .field("call_timeout_ms", &self.call_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

impl PostgresConfig {
    /// Defaults for `url` and `node`.
    pub fn new(url: impl Into<String>, node: u32) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            node,
            pool_size: 64,
            pool_wait_ms: 5_000,
            fence_wait_ms: 2_000,
            call_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
        }
    }
}

/// The PostgreSQL resource; see the module docs.
pub struct PostgresResource {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    config: PostgresConfig,
    /// Where the server is, for errors (never the password).
    target: String,
    pool: Pool,
    /// Open (not yet prepared) branches: their connection, inside a transaction.
    branches: Mutex<HashMap<Xid, Slot>>,
    /// The redo of every branch this instance prepared and has not resolved yet, so that a
    /// repeated prepare votes the same (the captured rows are invisible outside the prepared
    /// transaction, so they cannot be read again).
    votes: Mutex<HashMap<Xid, Vec<u8>>>,
    /// The last branches that voted read-only (at most `READ_ONLY_REMEMBERED_MAX`), so that a
    /// repeated prepare votes the same.
    read_only: Mutex<std::collections::VecDeque<Xid>>,
    /// Branches readied for a one-phase commit: their connection, inside the transaction.
    ready: Mutex<HashMap<Xid, Object>>,
    commits: AtomicU64,
    /// The highest fence epoch this instance has seen (read at open, raised by `fence`, by
    /// `fence_epoch` and by a fenced prepare).
    fence_seen: Arc<AtomicU64>,
    /// The pooled sessions, which count capture notices.
    sessions: Arc<Sessions>,
}

impl PostgresResource {
    /// Connects (a pool of `pool_size`), checks `max_prepared_transactions` and the schema.
    pub async fn open(name: &str, config: PostgresConfig) -> Result<Arc<PostgresResource>> {
        check_name(name)?;
        let (pg, tls) = pg_config(name, &config.url, config.connect_timeout_ms)?;
        let target = target_of(&pg);
        check_server(name, &pg, &tls, &target).await?;
        let sessions = Arc::new(Sessions::default());
        let manager = Manager::from_connect(
            pg,
            NoticeConnect {
                sessions: Arc::downgrade(&sessions),
                tls,
            },
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let wait = Duration::from_millis(config.pool_wait_ms);
        let fence_seen = Arc::new(AtomicU64::new(0));
        let hold_session_lock = hold_session_lock(
            Arc::clone(&sessions),
            Arc::clone(&fence_seen),
            config.pool_wait_ms.max(1),
        );
        let pool = Pool::builder(manager)
            .post_create(hold_session_lock)
            .max_size(config.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(wait))
            .create_timeout(Some(wait))
            .build()
            .map_err(|e| ResourceError::rejected(name, format!("connection pool: {e}")))?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            config,
            target,
            pool,
            branches: Mutex::new(HashMap::new()),
            votes: Mutex::new(HashMap::new()),
            read_only: Mutex::new(std::collections::VecDeque::new()),
            ready: Mutex::new(HashMap::new()),
            commits: AtomicU64::new(0),
            fence_seen,
            sessions,
        });
        let resource = PostgresResource { inner };
        resource.fence_epoch().await?;
        let inner = resource.inner;
        tracing::info!(resource = name, server = %inner.target, "postgres resource open");
        Ok(Arc::new(PostgresResource { inner }))
    }

    /// The gid of the branch of `xid`: `concord:<xid>:<resource>`.
    pub fn gid(&self, xid: &Xid) -> String {
        self.inner.gid(xid)
    }

    /// The prepared `concord:` transactions of this resource and node, with their gid and the
    /// time they were prepared (for `concord txn list` and the orphan sweeper).
    pub async fn prepared(&self) -> Result<Vec<PreparedBranch>> {
        self.inner.prepared().await
    }
}

/// A prepared branch as PostgreSQL lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedBranch {
    /// The branch's transaction.
    pub xid: Xid,
    /// Its gid.
    pub gid: String,
    /// Seconds since it was prepared.
    pub age_s: f64,
}

#[async_trait::async_trait]
impl Resource for PostgresResource {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn begin(&self, xid: &Xid) -> Result<()> {
        self.begin_branch(xid).await
    }

    async fn prepare(&self, xid: &Xid) -> Result<Vote> {
        self.prepare_branch(xid).await
    }

    async fn commit(&self, xid: &Xid) -> Result<()> {
        self.commit_branch(xid).await
    }

    async fn rollback(&self, xid: &Xid) -> Result<()> {
        self.rollback_branch(xid).await
    }

    async fn recover(&self) -> Result<Vec<Xid>> {
        self.recover_branches().await
    }

    async fn health(&self) -> Result<()> {
        let inner = &self.inner;
        let conn = inner
            .timed_in(None, "get a connection for the health probe", inner.conn())
            .await??;
        let row = inner
            .timed(
                &conn,
                "the health probe",
                conn.query_one("SELECT epoch FROM concord.fence WHERE id = 1", &[]),
            )
            .await?
            .map_err(|e| inner.db("run the health probe (read the fence epoch)", &e))?;
        let epoch: i64 = row
            .try_get(0)
            .map_err(|e| inner.db("read the fence epoch in the health probe", &e))?;
        inner
            .fence_seen
            .fetch_max(u64::try_from(epoch).unwrap_or(0), Ordering::AcqRel);
        Ok(())
    }

    async fn fence(&self, epoch: Epoch) -> Result<()> {
        self.inner.fence(epoch).await
    }

    async fn fence_epoch(&self) -> Result<Epoch> {
        self.read_fence_epoch().await
    }

    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<()> {
        self.inner.replay_batch(&[(lsn, redo.to_vec())]).await
    }

    async fn replay_batch(&self, batch: &[(Lsn, Vec<u8>)]) -> Result<()> {
        self.inner.replay_batch(batch).await
    }

    async fn inventory(&self) -> Result<Vec<crate::InventoryEntry>> {
        self.inner.inventory().await
    }

    fn supports_one_phase(&self) -> bool {
        true
    }

    async fn prepare_one_phase(&self, xid: &Xid) -> Result<Vote> {
        self.prepare_one_phase_branch(xid).await
    }

    async fn commit_one_phase(&self, xid: &Xid) -> Result<OnePhaseOutcome> {
        self.commit_one_phase_branch(xid).await
    }

    async fn one_phase_outcome(&self, xid: &Xid, redo: &[u8]) -> Result<OnePhaseOutcome> {
        self.inner.one_phase_outcome(xid, redo).await
    }

    async fn applied_lsn(&self) -> Result<Lsn> {
        self.read_applied_lsn().await
    }

    async fn read_entry(&self, key: &str) -> Result<Option<BlobContent>> {
        self.read_row_entry(key).await
    }

    async fn write_entry(&self, key: &str, content: BlobContent) -> Result<()> {
        self.write_row_entry(key, content).await
    }

    async fn remove_entry(&self, key: &str) -> Result<()> {
        self.remove_row_entry(key).await
    }

    async fn set_applied_lsn(&self, lsn: Lsn) -> Result<()> {
        self.store_applied_lsn(lsn).await
    }
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, HashMap<Xid, Slot>> {
        lock(&self.branches)
    }

    fn gid(&self, xid: &Xid) -> String {
        format!("concord:{xid}:{}", self.name)
    }

    /// A pooled connection; a server that cannot be reached is retryable, a session that
    /// cannot read the fence epoch is refused.
    async fn conn(&self) -> Result<Object> {
        self.sessions
            .scope(self.pool.get())
            .await
            .map_err(|e| match e {
                deadpool_postgres::PoolError::PostCreateHook(HookError::Message(message)) => {
                    self.rejected(format!("{}: {message}", self.target))
                }
                other => self.unavailable(format!(
                    "cannot get a connection to {}: {}",
                    self.target,
                    pool_error_text(&other)
                )),
            })
    }

    /// How long one of concord's own round trips may take.
    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.config.call_timeout_ms.max(1))
    }

    /// Runs `call`, one of concord's own round trips on pooled connection `conn`, within
    /// `call_timeout_ms`. Past it the connection is closed (the server or the network stopped
    /// answering, though the socket may look open: it is never handed out again) and the call
    /// fails, retryable.
    async fn timed<T>(
        &self,
        conn: &ClientWrapper,
        what: &str,
        call: impl Future<Output = T>,
    ) -> Result<T> {
        let session = self.sessions.of(conn);
        self.timed_in(session.as_deref(), what, call).await
    }

    /// [`Inner::timed`] for a call whose connection is borrowed by a transaction: closes
    /// `session` past the deadline.
    async fn timed_in<T>(
        &self,
        session: Option<&Session>,
        what: &str,
        call: impl Future<Output = T>,
    ) -> Result<T> {
        match tokio::time::timeout(self.call_timeout(), call).await {
            Ok(answer) => Ok(answer),
            Err(_) => {
                if let Some(session) = session {
                    session.close();
                }
                Err(self.unavailable(format!(
                    "{what} on {}: no answer within {} ms (call_timeout_ms): the server or the network stopped answering; the connection is closed and not used again",
                    self.target, self.config.call_timeout_ms
                )))
            }
        }
    }

    /// Closes pooled connection `conn` (see [`Session::close`]).
    fn close(&self, conn: &ClientWrapper) {
        match self.sessions.of(conn) {
            Some(session) => session.close(),
            None => {
                tracing::warn!(resource = %self.name, "a pooled connection past its deadline is not known, so it cannot be closed")
            }
        }
    }

    /// The error of a one-phase `COMMIT` that got no answer within the deadline.
    fn in_doubt_past_deadline(&self, xid: &Xid) -> ResourceError {
        ResourceError::InDoubt {
            resource: self.name.clone(),
            message: format!(
                "the one-phase COMMIT of {xid} got no answer from {} within {} ms (call_timeout_ms); the connection is closed",
                self.target, self.config.call_timeout_ms
            ),
        }
    }

    fn rejected(&self, reason: String) -> ResourceError {
        ResourceError::rejected(&self.name, reason)
    }

    fn unavailable(&self, message: String) -> ResourceError {
        ResourceError::Unavailable {
            resource: self.name.clone(),
            message,
        }
    }

    /// A database error outside a branch's own statements.
    fn db(&self, action: &str, e: &tokio_postgres::Error) -> ResourceError {
        db_error(&self.name, &self.target, action, e)
    }

    /// An error of a statement in branch `xid`: PostgreSQL's message with the branch's name. A
    /// serialization failure or a deadlock is retryable (run the transaction again); a broken
    /// connection leaves the branch lost (it rolls back); anything else is refused.
    fn statement(&self, xid: &Xid, e: &tokio_postgres::Error) -> ResourceError {
        let text = db_text(e);
        match e.code() {
            Some(c)
                if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                self.unavailable(format!("branch {xid}: {text}; run the transaction again"))
            }
            Some(_) => self.rejected(format!("branch {xid}: {text}")),
            None => self.unavailable(format!(
                "branch {xid}: the connection to {} failed: {text}",
                self.target
            )),
        }
    }
}

fn db_error(name: &str, target: &str, action: &str, e: &tokio_postgres::Error) -> ResourceError {
    let text = db_text(e);
    match e.code() {
        Some(_) => ResourceError::rejected(name, format!("{action} on {target}: {text}")),
        None => ResourceError::Unavailable {
            resource: name.to_string(),
            message: format!("{action} on {target}: {text}"),
        },
    }
}

fn schema_error(name: &str, target: &str, e: schema::SchemaError) -> ResourceError {
    match e {
        schema::SchemaError::Db(e) => db_error(name, target, "check the concord schema", &e),
        other => ResourceError::rejected(name, format!("{target}: {other}")),
    }
}

/// PostgreSQL's own message (severity, text, detail, hint) when there is one, else the client's.
fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => {
            // The client's own error ("error connecting to server") hides its cause.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

fn pool_error_text(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_text(e),
        other => other.to_string(),
    }
}

fn first_value(messages: &[SimpleQueryMessage]) -> Option<&str> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A SQL string literal.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Resource names go into gids and SQL literals: keep them plain.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ResourceError::rejected(
            name,
            "a PostgreSQL resource name must be 1 to 64 of A-Z, a-z, 0-9, _ and - (it is part of every gid)",
        ));
    }
    Ok(())
}
