//! Pooled sessions that hear the capture trigger.
//!
//! A one-phase branch with nothing to replicate is committed without any record, so the
//! resource must know, when the branch ends, whether it captured a row image. Asking the server
//! costs a statement in the `COMMIT`'s round trip (`concord.quick_check`, about a sixth of a
//! small transaction's server time). Instead the server says so by itself: the capture trigger
//! raises a notice (SQLSTATE `CF004`) the first time a transaction captures a row, and the
//! resource drives each pooled connection itself ([`NoticeConnect`]) and counts those notices
//! per session ([`Session::captured`]).
//!
//! Why a count read after the branch's last statement is exact:
//!
//! * the server sends a statement's notices before the statement's completion, on the same
//!   connection, and the driver handles the connection's messages one after the other: it
//!   counts the notice before it hands the completion to the statement's caller, which
//!   therefore sees the count raised (the hand-over synchronises);
//! * the trigger makes sure the notice is sent: should the session's `client_min_messages` be
//!   above `notice`, it lowers it for the rest of the transaction first;
//! * a `COMMIT` alone cannot tell an aborted transaction from a good one (PostgreSQL answers it
//!   with a rollback, not an error), so a branch one of whose statements failed — or went out
//!   and was never answered, its caller having given up on it — is finished by asking the
//!   server, which runs the question after that statement and refuses an aborted transaction;
//!   a `COMMIT` that finds no transaction (the application ended it itself) gets a warning,
//!   counted here too, and so does a `BEGIN` that finds one (the connection came back to the
//!   pool inside a transaction: the branch is refused);
//! * every failure is on the safe side: a notice counted for rows a rolled-back savepoint took
//!   back, or one an application raised with the same SQLSTATE, only sends the branch down the
//!   path that asks the server (`concord.finish_branch`), which finds the truth.
//!
//! Connections are matched with their [`Session`] when they are created: [`NoticeConnect`]
//! leaves the new session in a task-local slot that [`Sessions::scope`] opens around the pool's
//! `get`, and the pool's post-create hook, which runs next in the same task for the connection
//! just created, files it under the connection's identity (the address of its statement cache,
//! which lives exactly as long as the connection). A connection not found there — which should
//! not happen — is finished the old way, by asking the server.
//!
//! Owning the driver also lets the resource close a connection on which a call passed its
//! deadline ([`Session::close`]): the driver ends, the connection with it, and the pool drops
//! it, so a half-open connection is never handed out again.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Poll;

use deadpool_postgres::{ClientWrapper, Connect};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, Error, Socket};

use super::tls::{PgTls, PgTlsStream};

/// What [`Connect::connect`] returns.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The SQLSTATE of the capture trigger's notice.
pub(super) const CAPTURED: &str = "CF004";
/// The SQLSTATE of the warning a `COMMIT` gets outside a transaction block.
const NO_ACTIVE_TRANSACTION: &str = "25P01";
/// The SQLSTATE of the warning a `BEGIN` gets inside a transaction block.
const ACTIVE_TRANSACTION: &str = "25001";

/// What the resource knows of one pooled session.
#[derive(Debug, Default)]
pub(super) struct Session {
    /// Capture notices received on this session so far.
    captured: AtomicU64,
    /// "There is no transaction in progress" warnings received so far.
    no_transaction: AtomicU64,
    /// "There is already a transaction in progress" warnings received so far.
    in_transaction: AtomicU64,
    /// The identity it is filed under (0 until filed).
    key: AtomicUsize,
    /// Told when a call on the connection passed its deadline: the driver then ends, closing
    /// the connection, so that the pool never hands it out again ([`Session::close`]).
    close: tokio::sync::Notify,
}

impl Session {
    /// Capture notices received so far; read after a statement's completion, it counts every
    /// notice that statement raised.
    pub(super) fn captured(&self) -> u64 {
        self.captured.load(Ordering::Acquire)
    }

    /// "There is no transaction in progress" warnings received so far (a `COMMIT` sent after
    /// the application ended the transaction itself gets one).
    pub(super) fn no_transaction(&self) -> u64 {
        self.no_transaction.load(Ordering::Acquire)
    }

    /// "There is already a transaction in progress" warnings received so far (a branch's
    /// `BEGIN` gets one if its connection came back to the pool inside a transaction).
    pub(super) fn in_transaction(&self) -> u64 {
        self.in_transaction.load(Ordering::Acquire)
    }

    /// Closes the connection: its driver ends, every call still waiting on it fails at once,
    /// and the pool, which finds it closed, drops it instead of handing it out again. For a
    /// connection on which a call passed its deadline (the server or the network may be gone
    /// while the socket looks open).
    pub(super) fn close(&self) {
        self.close.notify_one();
    }
}

tokio::task_local! {
    /// The session of the connection the pool is creating in this task, between the connect
    /// and the post-create hook.
    static CREATED: RefCell<Option<Arc<Session>>>;
}

/// The sessions of one resource's pool, by connection identity.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    by_conn: Mutex<HashMap<usize, Arc<Session>>>,
}

impl Sessions {
    /// Runs `get` (the pool's) so that a connection it creates can be matched with its session.
    pub(super) async fn scope<T>(&self, get: impl Future<Output = T>) -> T {
        CREATED.scope(RefCell::new(None), get).await
    }

    /// In the post-create hook: files the session of the connection just created.
    pub(super) fn file_created(&self, client: &ClientWrapper) {
        let Ok(Some(session)) = CREATED.try_with(|slot| slot.borrow_mut().take()) else {
            tracing::warn!(
                "a pooled PostgreSQL connection was created outside the resource's scope; its branches will ask the server whether they captured rows"
            );
            return;
        };
        let key = key_of(client);
        session.key.store(key, Ordering::Release);
        self.map().insert(key, session);
    }

    /// The session of a pooled connection.
    pub(super) fn of(&self, client: &ClientWrapper) -> Option<Arc<Session>> {
        self.map().get(&key_of(client)).cloned()
    }

    fn forget(&self, session: &Arc<Session>) {
        let key = session.key.load(Ordering::Acquire);
        let mut map = self.map();
        if map.get(&key).is_some_and(|s| Arc::ptr_eq(s, session)) {
            map.remove(&key);
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<Session>>> {
        self.by_conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's identity while it lives: its statement cache is allocated with it.
fn key_of(client: &ClientWrapper) -> usize {
    Arc::as_ptr(&client.statement_cache) as usize
}

/// Connects like the pool would, but drives the connection itself, counting capture notices.
pub(super) struct NoticeConnect {
    pub(super) sessions: Weak<Sessions>,
    /// TLS as the connection string says.
    pub(super) tls: PgTls,
}

impl Connect for NoticeConnect {
    fn connect(
        &self,
        pg_config: &Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), Error>> {
        let pg_config = pg_config.clone();
        Box::pin(async move {
            let (client, connection) = pg_config.connect(self.tls.clone()).await?;
            let session = Arc::new(Session::default());
            let _ = CREATED.try_with(|slot| *slot.borrow_mut() = Some(Arc::clone(&session)));
            let driver = drive(connection, session, self.sessions.clone());
            Ok((client, tokio::spawn(driver)))
        })
    }
}

/// Forgets the session when its driver ends (the connection closed, or the pool dropped it and
/// aborted the driver).
struct Forget {
    session: Arc<Session>,
    sessions: Weak<Sessions>,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if let Some(sessions) = self.sessions.upgrade() {
            sessions.forget(&self.session);
        }
    }
}

async fn drive(
    mut connection: Connection<Socket, PgTlsStream<Socket>>,
    session: Arc<Session>,
    sessions: Weak<Sessions>,
) {
    let forget = Forget { session, sessions };
    let messages = poll_fn(|cx| {
        loop {
            match connection.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                    let code = notice.code().code();
                    if code == CAPTURED {
                        forget.session.captured.fetch_add(1, Ordering::Release);
                    } else if code == NO_ACTIVE_TRANSACTION {
                        forget
                            .session
                            .no_transaction
                            .fetch_add(1, Ordering::Release);
                    } else if code == ACTIVE_TRANSACTION {
                        forget
                            .session
                            .in_transaction
                            .fetch_add(1, Ordering::Release);
                    } else {
                        tracing::info!(target: "concord::postgres", "{}: {}", notice.severity(), notice.message());
                    }
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    let ended = tokio::select! {
        ended = messages => ended,
        () = forget.session.close.notified() => {
            tracing::warn!(target: "concord::postgres", "connection closed: a call on it passed its deadline");
            Ok(())
        }
    };
    if let Err(e) = ended {
        tracing::warn!(target: "concord::postgres", "connection error: {e}");
    }
}
