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
//! # Implementation caveats
//!
//! * Whether a connection string sets a TCP option is read from the string itself (a
//!   `key=value` or URL query parameter of that name); a value quoted to contain such a name
//!   would be mistaken for it, and the default not applied.
//! * A prepare past its deadline may still reach the server later; the branch is then
//!   prepared without a decision, and recovery rolls it back.

pub mod schema;
mod secret;
mod session;

pub use secret::{redact_url, with_password};

use std::any::Any;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, SimpleQueryMessage};

use crate::{Epoch, ErrorClass, Lsn, OnePhaseOutcome, Resource, ResourceError, Vote, Xid};
use session::{NoticeConnect, Session, Sessions};

type Result<T, E = ResourceError> = std::result::Result<T, E>;

/// The redo version written and read here.
const REDO_VERSION: u64 = 1;
/// Markers older than this are pruned (a branch resolved so long ago is never asked about).
const MARKER_RETENTION: &str = "7 days";
/// How many read-only branches are remembered, so that preparing one again votes the same.
const READ_ONLY_REMEMBERED_MAX: usize = 4096;
/// Markers are pruned after every this many commits.
const PRUNE_EVERY: u64 = 1000;
/// TCP keepalives, unless the connection string sets them: a peer silent this long is probed
/// (`keepalives_idle`) …
const KEEPALIVES_IDLE_S: u64 = 10;
/// … every this many seconds (`keepalives_interval`) …
const KEEPALIVES_INTERVAL_S: u64 = 5;
/// … and given up after this many unanswered probes (`keepalives_retries`).
const KEEPALIVES_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel closes the connection
/// (`tcp_user_timeout`), unless the connection string sets it.
const TCP_USER_TIMEOUT_MS: u64 = 30_000;
/// The `COMMIT` of a one-phase branch whose redo is journaled: flushed before it answers, in
/// the same round trip.
const SYNCHRONOUS_COMMIT: &str = "SET LOCAL synchronous_commit = on; COMMIT";

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

/// A session's counts around a `COMMIT`.
#[derive(Clone, Copy)]
struct Counts {
    captured: u64,
    no_transaction: u64,
}

impl Counts {
    fn of(session: &Session) -> Counts {
        Counts {
            captured: session.captured(),
            no_transaction: session.no_transaction(),
        }
    }
}

/// The advisory lock every pooled session holds shared for as long as it lives (see the module
/// docs); `fence` takes it exclusively.
const SESSION_LOCK: &str = "1668247139, 1717923428";

/// An application's handle on one branch: its statements run in the branch's transaction.
pub struct PgBranch {
    inner: Arc<Inner>,
    xid: Xid,
    conn: Slot,
}

/// An open branch's connection (`None` once prepare or rollback took it).
type Slot = Arc<tokio::sync::Mutex<Option<BranchConn>>>;

/// A branch's pooled connection and whether its `BEGIN` has been sent: it goes out with the
/// branch's first statement, in the same round trip, so a branch that never runs one costs
/// nothing on the server.
struct BranchConn {
    conn: Object,
    /// Whether `BEGIN` went out (set before it is sent: a caller that gives up on its first
    /// statement does not take it back).
    begun: bool,
    /// What the session had heard when the branch began, if the session is known (see the
    /// `session` module).
    heard: Option<Heard>,
    /// Whether a statement of the branch failed, or went out and was never answered (its
    /// caller gave up on it): the transaction may be aborted, which a bare `COMMIT` would not
    /// reveal (PostgreSQL answers it with a rollback, without an error).
    failed: bool,
}

/// A session's counts when a branch began on it.
struct Heard {
    session: Arc<Session>,
    captured: u64,
    in_transaction: u64,
}

impl BranchConn {
    /// The session, when the branch may be committed by its `COMMIT` alone: the session is
    /// known, heard no capture notice since the branch began, and no statement failed or went
    /// unanswered.
    fn plain(&self) -> Option<Arc<Session>> {
        let heard = self.heard.as_ref()?;
        (!self.failed && heard.session.captured() == heard.captured)
            .then(|| Arc::clone(&heard.session))
    }

    /// Whether a `BEGIN` on the branch's connection found a transaction open.
    fn began_inside_another(&self) -> bool {
        self.heard
            .as_ref()
            .is_some_and(|h| h.session.in_transaction() != h.in_transaction)
    }
}

/// Sets up (or upgrades) the `concord` schema in the database at `url`; idempotent.
pub async fn install(name: &str, url: &str) -> Result<schema::Installed> {
    let (mut client, target) = connect(name, url).await?;
    schema::install(&mut client)
        .await
        .map_err(|e| schema_error(name, &target, e))
}

/// Installs the capture trigger on each of `tables` (`schema.table` or `table`), so that their
/// changed rows travel in the redo, and the trigger that refuses a `TRUNCATE` of them (which
/// has no row images to replay); a table without a primary key is refused. Idempotent.
pub async fn replicate(name: &str, url: &str, tables: &[String]) -> Result<Vec<String>> {
    let (mut client, target) = connect(name, url).await?;
    schema::check(&client, name)
        .await
        .map_err(|e| schema_error(name, &target, e))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_error(name, &target, "begin", &e))?;
    let mut done = Vec::new();
    for table in tables {
        let found = tx
            .query_opt(
                "SELECT c.oid::regclass::text, format('%I.%I', n.nspname, c.relname)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
                &[table],
            )
            .await
            .map_err(|e| db_error(name, &target, &format!("look up table {table:?}"), &e))?;
        let Some(found) = found else {
            return Err(ResourceError::rejected(
                name,
                format!("table {table:?} does not exist (or is not a table) in {target}"),
            ));
        };
        let (regclass, qualified): (String, String) = (found.get(0), found.get(1));
        let pk: Vec<String> = tx
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&regclass],
            )
            .await
            .map_err(|e| {
                db_error(
                    name,
                    &target,
                    &format!("read the primary key of {qualified}"),
                    &e,
                )
            })?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pk.is_empty() {
            return Err(ResourceError::rejected(
                name,
                format!(
                    "table {qualified} has no primary key: concord replays rows by primary key; add one (ALTER TABLE {qualified} ADD PRIMARY KEY (…)) and run replicate again"
                ),
            ));
        }
        // Already set up with this key: no DDL (which would wait for every transaction that
        // holds a lock on the table, prepared ones included).
        let current = tx
            .query_opt(
                "SELECT r.pk_cols FROM concord.replicated r
                 WHERE r.tbl = $1 AND 2 = (SELECT count(*) FROM pg_trigger t
                     WHERE t.tgrelid = $2::text::regclass
                       AND t.tgname IN ('concord_capture', 'concord_truncate'))",
                &[&qualified, &regclass],
            )
            .await
            .map_err(|e| db_error(name, &target, &format!("look up {qualified}"), &e))?;
        if current.is_some_and(|r| r.get::<_, Vec<String>>(0) == pk) {
            done.push(qualified);
            continue;
        }
        let args = pk
            .iter()
            .map(|c| quote_literal(c))
            .collect::<Vec<_>>()
            .join(", ");
        tx.batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER concord_capture AFTER INSERT OR UPDATE OR DELETE ON {qualified}
             FOR EACH ROW EXECUTE FUNCTION concord.capture_row({args});
             CREATE OR REPLACE TRIGGER concord_truncate BEFORE TRUNCATE ON {qualified}
             FOR EACH STATEMENT EXECUTE FUNCTION concord.refuse_truncate()"
        ))
        .await
        .map_err(|e| {
            db_error(name, &target, &format!("install the capture trigger on {qualified}"), &e)
        })?;
        tx.execute(
            "INSERT INTO concord.replicated (tbl, pk_cols) VALUES ($1, $2)
             ON CONFLICT (tbl) DO UPDATE SET pk_cols = excluded.pk_cols, at = now()",
            &[&qualified, &pk],
        )
        .await
        .map_err(|e| {
            db_error(
                name,
                &target,
                &format!("record {qualified} as replicated"),
                &e,
            )
        })?;
        done.push(qualified);
    }
    tx.commit()
        .await
        .map_err(|e| db_error(name, &target, "commit", &e))?;
    Ok(done)
}

/// The prepared branches of resource `name` and node `node` in the database at `url`, read over
/// one connection without opening the resource (for `concord txn list`, beside the running
/// application).
pub async fn prepared_in(name: &str, url: &str, node: u32) -> Result<Vec<PreparedBranch>> {
    let (client, target) = connect(name, url).await?;
    let rows = client
        .query(PREPARED_SQL, &[])
        .await
        .map_err(|e| db_error(name, &target, "list prepared transactions", &e))?;
    Ok(prepared_of(name, node, &rows))
}

const PREPARED_SQL: &str =
    "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts
     WHERE database = current_database() AND gid LIKE 'concord:%'";

/// The rows of [`PREPARED_SQL`] that are branches of resource `name` and node `node`.
fn prepared_of(name: &str, node: u32, rows: &[Row]) -> Vec<PreparedBranch> {
    let suffix = format!(":{name}");
    let mut out = Vec::new();
    for row in rows {
        let gid: String = row.get(0);
        let Some(xid) = gid
            .strip_prefix("concord:")
            .and_then(|rest| rest.strip_suffix(&suffix))
            .and_then(|x| x.parse::<Xid>().ok())
        else {
            continue;
        };
        if xid.node != node {
            continue;
        }
        out.push(PreparedBranch {
            xid,
            gid,
            age_s: row.get(1),
        });
    }
    out.sort_by_key(|b| b.xid);
    out
}

impl PostgresResource {
    /// Ends the transaction of a branch whose finish failed; a fenced error gets the current
    /// fence epoch.
    async fn failed_finish(&self, conn: &ClientWrapper, e: ResourceError) -> ResourceError {
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

    /// Connects (a pool of `pool_size`), checks `max_prepared_transactions` and the schema.
    pub async fn open(name: &str, config: PostgresConfig) -> Result<Arc<PostgresResource>> {
        check_name(name)?;
        let pg = pg_config(name, &config.url, config.connect_timeout_ms)?;
        let target = target_of(&pg);
        check_server(name, &pg, &target).await?;
        let sessions = Arc::new(Sessions::default());
        let manager = Manager::from_connect(
            pg,
            NoticeConnect {
                sessions: Arc::downgrade(&sessions),
            },
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let filing = Arc::clone(&sessions);
        let wait = Duration::from_millis(config.pool_wait_ms);
        let fence_seen = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&fence_seen);
        // Every session holds the session lock shared, then reads the fence epoch: a fence
        // raised later must end this session first.
        let wait_ms = config.pool_wait_ms.max(1);
        let hold_session_lock = Hook::async_fn(move |client: &mut ClientWrapper, _| {
            let seen = Arc::clone(&seen);
            // Before any await: the session the connect left in this task is this client's.
            filing.file_created(client);
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
                // Fail closed: a session that cannot read the fence would let a branch of a
                // fenced epoch through (a one-phase branch checks no fence of its own).
                let row = client
                    .query_one("SELECT epoch FROM concord.fence WHERE id = 1", &[])
                    .await
                    .map_err(unreadable_fence)?;
                let epoch: i64 = row.get(0);
                seen.fetch_max(u64::try_from(epoch).unwrap_or(0), Ordering::AcqRel);
                Ok(())
            })
        });
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

#[async_trait::async_trait]
impl Resource for PostgresResource {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn begin(&self, xid: &Xid) -> Result<()> {
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

    async fn prepare(&self, xid: &Xid) -> Result<Vote> {
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
            Err(e) => {
                // The transaction failed: end it; the branch is gone.
                let _ = inner
                    .timed(&conn, "roll back", conn.batch_execute("ROLLBACK"))
                    .await;
                drop(conn);
                match e {
                    ResourceError::Fenced {
                        resource, offered, ..
                    } => Err(ResourceError::Fenced {
                        resource,
                        offered,
                        current: self.fence_epoch().await.unwrap_or(offered),
                    }),
                    other => Err(other),
                }
            }
        }
    }

    async fn commit(&self, xid: &Xid) -> Result<()> {
        let inner = &self.inner;
        if inner.slots().contains_key(xid) {
            return Err(inner.rejected(format!(
                "branch {xid} is not prepared; prepare it first (a one-phase commit goes through prepare_one_phase)"
            )));
        }
        inner.resolve(xid, true).await
    }

    async fn rollback(&self, xid: &Xid) -> Result<()> {
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

    async fn recover(&self) -> Result<Vec<Xid>> {
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

    async fn fence(&self, epoch: Epoch) -> Result<()> {
        self.inner.fence(epoch).await
    }

    async fn fence_epoch(&self) -> Result<Epoch> {
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

    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<()> {
        self.inner.replay(redo, lsn).await
    }

    fn supports_one_phase(&self) -> bool {
        true
    }

    async fn prepare_one_phase(&self, xid: &Xid) -> Result<Vote> {
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

    async fn commit_one_phase(&self, xid: &Xid) -> Result<OnePhaseOutcome> {
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
                    reason: inner.statement(xid, &e).to_string(),
                })
            }
            Err(e) => Err(inner.lost_commit(xid, &e)),
        }
    }

    async fn one_phase_outcome(&self, xid: &Xid, redo: &[u8]) -> Result<OnePhaseOutcome> {
        self.inner.one_phase_outcome(xid, redo).await
    }

    async fn applied_lsn(&self) -> Result<Lsn> {
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
    /// Refuses `xid` below the highest fence epoch this instance has seen.
    fn not_fenced(&self, xid: &Xid) -> Result<()> {
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

    /// Fence check, redo, marker and `PREPARE TRANSACTION`, in one round trip
    /// (`concord.prepare_branch`, then the prepare itself, which runs only if the first
    /// succeeded).
    async fn prepare_on(&self, conn: &ClientWrapper, xid: &Xid) -> Result<Vote> {
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
            Ok(messages) => {
                let rows = first_value(&messages).unwrap_or("[]");
                Ok(Vote::Commit {
                    redo: encode_redo_array(rows),
                })
            }
            Err(e) if e.code().is_some_and(|c| c.code() == "CF002") => {
                // Nothing written: end the transaction, nothing to commit.
                self.timed(conn, "roll back", conn.batch_execute("ROLLBACK"))
                    .await?
                    .map_err(|e| self.statement(xid, &e))?;
                Ok(Vote::ReadOnly)
            }
            Err(e) if e.code().is_some_and(|c| c.code() == "CF001") => Err(ResourceError::Fenced {
                resource: self.name.clone(),
                offered: xid.epoch,
                current: Epoch(0),
            }),
            Err(e) => Err(self.statement(xid, &e)),
        }
    }

    /// `concord.finish_branch`: the redo and (with redo) the marker, leaving the transaction
    /// open. The redo is empty when nothing was captured.
    async fn finish_on(&self, conn: &Object, xid: &Xid) -> Result<Vec<u8>> {
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
    fn began_inside_another(&self, xid: &Xid) -> ResourceError {
        self.rejected(format!(
            "branch {xid}: a BEGIN on its connection to {} found a transaction already open (the connection was left inside an earlier transaction, or a BEGIN was sent through the branch), so its work cannot be told apart; it is rolled back, run the transaction again",
            self.target
        ))
    }

    /// The `COMMIT` of a one-phase branch whose session heard no capture notice.
    async fn commit_plain(&self, conn: &Client, session: &Session, xid: &Xid) -> Result<()> {
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
    fn after_commit(&self, xid: &Xid, session: &Session, before: Counts) -> Result<()> {
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

    fn finish_error(&self, xid: &Xid, e: &tokio_postgres::Error) -> ResourceError {
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
    fn lost_commit(&self, xid: &Xid, e: &tokio_postgres::Error) -> ResourceError {
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
    async fn one_phase_outcome(&self, xid: &Xid, redo: &[u8]) -> Result<OnePhaseOutcome> {
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
                reason: format!(
                    "resource {}: the one-phase commit of {gid} did not happen (the transaction {txid} aborted; the session ended before its COMMIT took effect)",
                    self.name
                ),
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

    /// A second prepare of a branch already prepared: the same vote, from memory. After a
    /// restart the redo is gone (the captured rows are visible only inside the prepared
    /// transaction); recovery never prepares again, it commits or rolls back.
    async fn vote_again(&self, xid: &Xid) -> Result<Vote> {
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

    async fn resolve(&self, xid: &Xid, commit: bool) -> Result<()> {
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

    async fn resolve_prepared(&self, xid: &Xid, commit: bool) -> Result<()> {
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
    fn neither_prepared_nor_marked(&self, gid: &str) -> ResourceError {
        ResourceError::HeuristicHazard {
            resource: self.name.clone(),
            message: format!(
                "commit of {gid} found neither the prepared transaction nor the marker of its commit in {}: it was never prepared there, was rolled back (by hand or by another node's recovery), or committed more than {MARKER_RETENTION} ago (its marker since pruned)",
                self.target
            ),
        }
    }

    async fn prune_markers(&self, conn: &ClientWrapper) {
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

    async fn prepared(&self) -> Result<Vec<PreparedBranch>> {
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

    async fn fence(&self, epoch: Epoch) -> Result<()> {
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
        let pg = pg_config(&self.name, &self.config.url, self.config.connect_timeout_ms)?;
        let mut client = connect_to(&self.name, &pg, &self.target).await?;
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
    async fn raise_fence(
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
    async fn end_sessions(&self, client: &Client, deadline: tokio::time::Instant) -> Result<()> {
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
    async fn prepared_gids_below(&self, conn: &Client, epoch: Epoch) -> Result<Vec<String>> {
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

    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<()> {
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

/// Opens one connection outside a pool (for install, replicate and fence).
async fn connect(name: &str, url: &str) -> Result<(Client, String)> {
    let pg = pg_config(name, url, PostgresConfig::new(url, 0).connect_timeout_ms)?;
    let target = target_of(&pg);
    Ok((connect_to(name, &pg, &target).await?, target))
}

/// Connects, the whole handshake bounded by the connect timeout: tokio-postgres bounds only the
/// TCP connect with it, and a server that accepts but never answers the startup would otherwise
/// hold the caller for good.
async fn connect_to(name: &str, pg: &tokio_postgres::Config, target: &str) -> Result<Client> {
    let deadline = pg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let connecting = tokio::time::timeout(deadline, pg.connect(NoTls))
        .await
        .map_err(|_| ResourceError::Unavailable {
            resource: name.to_string(),
            message: format!(
                "cannot connect to {target}: no answer to the connection handshake within {} ms",
                deadline.as_millis()
            ),
        })?;
    let (client, connection) = connecting.map_err(|e| ResourceError::Unavailable {
        resource: name.to_string(),
        message: format!("cannot connect to {target}: {}", db_text(&e)),
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Whether the database of resource `name` at `url` can be used, changing nothing: connects
/// once (bounded by `connect_timeout_ms` unless the connection string sets `connect_timeout`)
/// and checks what [`PostgresResource::open`] checks — `max_prepared_transactions` above 0 and
/// the concord schema at this program's version — without installing anything (for `concord
/// config check`). Returns where the server is (never the password).
pub async fn check_reachable(name: &str, url: &str, connect_timeout_ms: u64) -> Result<String> {
    check_name(name)?;
    let pg = pg_config(name, url, connect_timeout_ms)?;
    let target = target_of(&pg);
    check_server(name, &pg, &target).await?;
    Ok(target)
}

/// Before the pool opens, on a connection of its own: `max_prepared_transactions` above 0 and
/// the schema at this program's version, each refused with its fix.
async fn check_server(name: &str, pg: &tokio_postgres::Config, target: &str) -> Result<()> {
    let client = connect_to(name, pg, target).await?;
    let max: String = client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .map_err(|e| db_error(name, target, "read max_prepared_transactions", &e))?
        .get(0);
    if max.trim() == "0" {
        return Err(ResourceError::rejected(
            name,
            format!(
                "{target} has max_prepared_transactions = 0, so it cannot prepare transactions: set max_prepared_transactions (at least the number of concurrent transactions, e.g. 100) in postgresql.conf and restart the server"
            ),
        ));
    }
    schema::check(&client, name)
        .await
        .map_err(|e| schema_error(name, target, e))
}

/// The connection settings of `url`, with concord's defaults for what it leaves unset: TCP
/// keepalives ([`KEEPALIVES_IDLE_S`] and the next two), [`TCP_USER_TIMEOUT_MS`] and a connect
/// timeout of `connect_timeout_ms`, so that a dead server or network is noticed.
fn pg_config(name: &str, url: &str, connect_timeout_ms: u64) -> Result<tokio_postgres::Config> {
    let mut pg = tokio_postgres::Config::from_str(url).map_err(|e| {
        ResourceError::rejected(
            name,
            format!(
                "the connection string {} is invalid: {}; fix it in the configuration",
                redact_url(url),
                parse_error_text(&e)
            ),
        )
    })?;
    if !url_sets(url, "keepalives") {
        pg.keepalives(true);
    }
    if !url_sets(url, "keepalives_idle") {
        pg.keepalives_idle(Duration::from_secs(KEEPALIVES_IDLE_S));
    }
    if !url_sets(url, "keepalives_interval") {
        pg.keepalives_interval(Duration::from_secs(KEEPALIVES_INTERVAL_S));
    }
    if !url_sets(url, "keepalives_retries") {
        pg.keepalives_retries(KEEPALIVES_RETRIES);
    }
    if !url_sets(url, "tcp_user_timeout") {
        pg.tcp_user_timeout(Duration::from_millis(TCP_USER_TIMEOUT_MS));
    }
    if !url_sets(url, "connect_timeout") {
        pg.connect_timeout(Duration::from_millis(connect_timeout_ms.max(1)));
    }
    Ok(pg)
}

/// The parser's complaint about a connection string, without the character it quotes (which
/// may be one of a password's): its option names and byte offsets only.
fn parse_error_text(e: &tokio_postgres::Error) -> String {
    let text = db_text(e);
    match text.find(" but got ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Whether the connection string `url` (`key=value …` or a `postgres://…?key=value&…` URL)
/// sets `key`.
fn url_sets(url: &str, key: &str) -> bool {
    let params = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('?').map_or("", |(_, query)| query),
        None => url,
    };
    params
        .split(|c: char| c == '&' || c.is_whitespace())
        .any(|param| param.split('=').next().map(str::trim) == Some(key))
}

/// The error of a new pooled session that could not read the fence epoch: the session is
/// refused, and so is the branch that wanted it.
fn unreadable_fence(e: tokio_postgres::Error) -> HookError {
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

/// `host:port/dbname as user` — never the password.
fn target_of(pg: &tokio_postgres::Config) -> String {
    let host = pg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres {host}:{port}/{} as {}",
        pg.get_dbname().unwrap_or("(default database)"),
        pg.get_user().unwrap_or("(default user)")
    )
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

/// Encodes captured rows, given as the JSON text of an array of `[table, op, pk, row]`, as a
/// redo.
fn encode_redo_array(rows: &str) -> Vec<u8> {
    format!("{{\"v\":{REDO_VERSION},\"rows\":{rows}}}").into_bytes()
}

/// The transaction id and backend pid a one-phase redo carries.
fn one_phase_ids(redo: &[u8]) -> Result<(u64, i32), String> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tcp_defaults_apply_unless_the_connection_string_sets_them() {
        let pg = pg_config("pg", "host=h user=u dbname=d", 7_000).unwrap();
        assert!(pg.get_keepalives());
        assert_eq!(
            pg.get_keepalives_idle(),
            Duration::from_secs(KEEPALIVES_IDLE_S)
        );
        assert_eq!(
            pg.get_keepalives_interval(),
            Some(Duration::from_secs(KEEPALIVES_INTERVAL_S))
        );
        assert_eq!(pg.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        assert_eq!(
            pg.get_tcp_user_timeout(),
            Some(&Duration::from_millis(TCP_USER_TIMEOUT_MS))
        );
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(7)));

        let set = "host=h keepalives_idle=60 keepalives_retries = 9 connect_timeout=2";
        let pg = pg_config("pg", set, 7_000).unwrap();
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(pg.get_keepalives_retries(), Some(9));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(
            pg.get_keepalives_interval(),
            Some(Duration::from_secs(KEEPALIVES_INTERVAL_S))
        );

        // The driver reads `tcp_user_timeout` in seconds (libpq: milliseconds).
        let url = "postgresql://u@h/d?keepalives=0&tcp_user_timeout=5";
        let pg = pg_config("pg", url, 7_000).unwrap();
        assert!(!pg.get_keepalives());
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(7)));
    }

    #[test]
    fn url_sets_reads_keys_not_values() {
        assert!(url_sets("host=h keepalives=1", "keepalives"));
        assert!(!url_sets("host=h keepalives_idle=1", "keepalives"));
        assert!(!url_sets("host=keepalives", "keepalives"));
        assert!(url_sets(
            "postgres://h/d?a=1&keepalives_idle=3",
            "keepalives_idle"
        ));
        assert!(!url_sets(
            "postgres://keepalives_idle@h/d",
            "keepalives_idle"
        ));
    }
}
