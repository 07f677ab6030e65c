//! What application servers link: a [`Concord`] handle, [`Transaction`]s and branch handles.
//!
//! ```no_run
//! # async fn example() -> Result<(), participant::ConcordError> {
//! use participant::{Concord, Config};
//! let concord = Concord::open(Config::load("concord.toml".as_ref())?).await?;
//! let mut tx = concord.begin().await?;
//! let uploads = tx.files("uploads").await?;
//! uploads.put("invoices/42.pdf", &b"%PDF-1.7 ..."[..]).await?;
//! let outbox = tx.mail("outbox").await?;
//! let confirmation = participant::MessageBuilder::new()
//!     .from("Shop <shop@example.org>")
//!     .to("alice@example.org")
//!     .subject("Your order 42")
//!     .body("Thank you.\n");
//! outbox.enqueue_built(&confirmation).await?;
//! let index = tx.kv("index").await?;
//! index.insert(b"order/42", b"invoices/42.pdf").await?;
//! tx.commit().await?; // every branch, or none
//! # Ok(()) }
//! ```
//!
//! This is the embedded mode: the coordinator runs in the application's process, on the
//! application's tokio runtime, with its journal in the configured data directory. Remote mode
//! ([`Concord::connect`], below) gives the same API over gRPC to a coordinator daemon. A
//! transaction joins a resource the first time the application asks for its handle; committing
//! runs two-phase commit over every joined resource; dropping a transaction that was neither
//! committed nor rolled back rolls it back.
//!
//! Each kind of resource in `concord.toml` ([`config`]) has its typed branch handle:
//! [`Transaction::files`] ([`FilesHandle`]), [`Transaction::postgres`] ([`PostgresHandle`]),
//! [`Transaction::mail`] ([`MailHandle`]) and [`Transaction::kv`] ([`KvHandle`]). Asking for a
//! name the configuration does not have is a coordinator error naming it; asking for a name of
//! another kind is [`ConcordError::WrongKind`].
//!
//! # Outcomes and errors
//!
//! [`Transaction::commit`] answers `Ok(`[`Committed`]`)` only when the transaction committed:
//! its decision is durable, and every branch will be committed (phase 2 runs in the background,
//! retried until each resource answers, across restarts). Anything else is an `Err`:
//!
//! * [`ConcordError::RolledBack`] — nothing of the transaction happened, in any resource. Its
//!   [`RollbackCause`] says why: a branch could not prepare or its resource refused to commit
//!   ([`RollbackCause::Branch`], with the resource's error; `branch` names the resource), the
//!   transaction outlived `txn_timeout_ms`, or the application rolled it back.
//! * [`ConcordError::InDoubt`] — whether it committed is not known (the journal failed while
//!   making the decision durable, the answer of a one-phase commit was lost, the coordinator shut
//!   down in the middle). **Do not run it again**: it may have committed, and a second run would
//!   do it twice. concord finishes it by itself — phase 2, or recovery at the next start, which
//!   decides from the journal and asks the resources — and `concord txn list` shows it until
//!   then (`concord txn resolve` is for an operator, when a resource is lost for good). Keep the
//!   xid, so that the application's own records can be matched with the outcome later.
//! * Any other variant refuses one call: fix the configuration or the code.
//!
//! [`ConcordError::is_retryable`] says whether running the whole transaction again can succeed:
//! true for a conflict with another transaction's write, a resource that cannot answer now (a
//! PostgreSQL serialization failure or deadlock, a broken connection), a timeout; false for a
//! transaction in doubt, for a rollback the application asked for, and for every error that a
//! second run meets again. "Again" means from the first step, in a new [`Transaction`]: the
//! failed one is over. A retry loop, bounded:
//!
//! ```no_run
//! use std::time::Duration;
//! use participant::{Committed, Concord, ConcordError};
//!
//! /// One order: the invoice file and the index entry, both or neither.
//! async fn place_order(concord: &Concord, order: u64) -> Result<Committed, ConcordError> {
//!     let mut tx = concord.begin().await?;
//!     let uploads = tx.files("uploads").await?;
//!     let path = format!("invoices/{order}.pdf");
//!     uploads.put(&path, &b"%PDF-1.7 ..."[..]).await?;
//!     let index = tx.kv("index").await?;
//!     index.insert(format!("order/{order}").as_bytes(), path.as_bytes()).await?;
//!     tx.commit().await
//! }
//!
//! const ATTEMPTS_MAX: u32 = 5;
//!
//! async fn place_order_retrying(concord: &Concord, order: u64) -> Result<(), ConcordError> {
//!     let mut attempt = 1;
//!     loop {
//!         match place_order(concord, order).await {
//!             Ok(committed) => {
//!                 println!("order {order} committed ({})", committed.xid);
//!                 return Ok(());
//!             }
//!             Err(e) if e.is_retryable() && attempt < ATTEMPTS_MAX => {
//!                 eprintln!("order {order}, attempt {attempt}: {e}; trying again");
//!                 tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
//!                 attempt += 1;
//!             }
//!             Err(e @ ConcordError::InDoubt { .. }) => {
//!                 // Not retried: it may have committed. concord finishes it; the xid is what
//!                 // `concord txn list` shows until then.
//!                 eprintln!("order {order}: {e}");
//!                 return Err(e);
//!             }
//!             Err(e) => return Err(e),
//!         }
//!     }
//! }
//! ```
//!
//! [`Transaction::rollback`] answers `Ok(`[`RolledBack`]`)`, also for a transaction that had
//! rolled back already; committing or rolling back a second time answers as the first time did.
//! [`Transaction`] and the branch handles are `#[must_use]`: a transaction that is dropped
//! rolls back.
//!
//! # Remote mode
//!
//! Application servers are often several processes sharing one coordinator daemon per site
//! (`concord coordinator --config concord.toml`). [`Concord::connect`] connects to it
//! (`http://HOST:PORT`, or `https://` with [`Credentials::with_tls`]; a bearer [`Token`] in
//! every call) and gives the same API: [`Concord::begin`], the same handles, the same
//! [`ConcordError`] variants in the same situations (decoded from the daemon's gRPC status and
//! its `ErrorDetail`), plus [`ConcordError::Connect`], [`ConcordError::Unreachable`],
//! [`ConcordError::Unauthorized`] and [`ConcordError::Limit`] for what only a connection meets.
//!
//! ```no_run
//! # async fn example() -> Result<(), participant::ConcordError> {
//! use participant::{Concord, Credentials, PostgresConfig};
//! let concord = Concord::connect("http://127.0.0.1:7700", Credentials::none()).await?;
//! concord
//!     .attach_postgres("orders", PostgresConfig::new("host=127.0.0.1 dbname=shop", 1))
//!     .await?;
//! let mut tx = concord.begin().await?;
//! tx.postgres("orders").await?.execute("UPDATE stock SET n = n - 1 WHERE id = 7", &[]).await?;
//! tx.kv("index").await?.insert(b"order/42", b"7").await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! Who does what:
//!
//! * **Files, mail and kv** belong to the daemon (it opened their directories): each handle
//!   call is a gRPC call, and the content of a put or an enqueue streams from the
//!   application's reader in chunks of at most the daemon's `chunk_bytes_max` (a few chunks in
//!   memory, whatever the size).
//! * **PostgreSQL** branches run in the application, on its own connections:
//!   [`Concord::attach_postgres`] opens the daemon's resource of that name here (the same
//!   database). At commit each branch is prepared here (fence check at the xid's epoch,
//!   capture, marker, `PREPARE TRANSACTION`) and enlisted in the daemon with its redo; the
//!   daemon decides, journals and commits it by gid. A branch that fails to prepare rolls the
//!   whole transaction back ([`RollbackCause::Branch`]). **A lone remote PostgreSQL branch takes
//!   two phases**: it is prepared before the daemon hears of it, so the daemon journals a
//!   decision and commits it by gid, where embedded mode would commit it in one phase.
//! * **Outcomes** are the daemon's: a commit whose answer is lost on the way (the connection
//!   broke, the daemon restarted) is asked again by xid (`Outcome`, a few attempts with
//!   backoff, each on a new connection) and reported as it ended; only when that cannot be
//!   learnt is it [`ConcordError::InDoubt`]. [`Concord::outcome`] asks later. An application
//!   that dies mid-transaction has its branches rolled back at the daemon's transaction
//!   timeout (a PostgreSQL branch not prepared yet dies with its connection; one prepared but
//!   not enlisted is rolled back by the daemon's orphan sweeper).
//!
//! # Following the primary
//!
//! With failover a site has two daemons, one of them primary. [`Concord::connect_any`] takes
//! every node's URL and follows the primary: [`Concord::begin`] and [`Concord::outcome`] go to
//! the node that is primary now; a node that answers "not the primary" is left for the one it
//! names, one that does not answer for the next URL, with a backoff (50 ms doubling to 500 ms),
//! for at most `failover_wait_ms` ([`FAILOVER_WAIT_MS_DEFAULT`], or
//! [`Concord::connect_any_within`]) before [`ConcordError::NoPrimary`] names every URL tried.
//! A transaction stays on the node it began on; cut off by a failover before its commit request
//! reached that node it is [`ConcordError::RolledBack`] with [`RollbackCause::NodeLost`]
//! (retryable), after it and with no answer it is learnt through `Outcome` (the new primary
//! answers from its journal) or reported [`ConcordError::InDoubt`] with its xid, for
//! [`Concord::outcome`] later. `docs/failover.md` ("Clients follow the primary") has the table.
//!
//! The embedded-only views ([`Concord::coordinator`], [`Concord::recovery`]) panic in remote
//! mode; [`Concord::embedded_coordinator`] and [`Concord::is_remote`] tell first.
//!
//! # Examples
//!
//! `participant/examples/` holds one runnable program per kind of resource — `files.rs`,
//! `postgres.rs`, `mail.rs`, `kv.rs` — and `all_four.rs`, one transaction over all four. Each
//! writes its own `concord.toml` into the data directory it is given, runs a few transactions
//! (one of them rolled back) and prints what it did, e.g.
//! `cargo run -p concord-participant --example kv -- /tmp/concord-kv`. `participant/tests/examples.rs`
//! runs every one of them (the PostgreSQL ones against a throwaway cluster).
//!
//! # Implementation caveats
//!
//! * Resources open one after the other, in name order; a kv resource whose sled directory an
//!   instance dropped a moment before in this process waits for it (`open_wait_ms_max`).
//! * Remote mode: see the caveats of [`remote`] (an xid the daemon no longer knows is reported
//!   in doubt; a dropped transaction's rollback is a call in the background).

mod error;
mod handles;
pub mod remote;
mod transaction;

pub use adapters::config;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coordinator::{Coordinator, CoordinatorConfig, RecoveryReport, RetryPolicy};
use journal::Epoch;

pub use adapters::mail::{Enqueued, MessageBuilder};
pub use adapters::postgres::PostgresConfig;
pub use adapters::{ErrorClass, Lsn, ResourceError, Xid};
pub use config::{Config, ConfigError, ResourceConfig};
pub use coordinator::CoordError;
pub use error::{ConcordError, NodeTried, RollbackCause};
pub use handles::{FilesHandle, KvHandle, MailHandle, PostgresHandle};
pub use proto::client::{ClientTls, Credentials, Token};
pub use remote::follow::FAILOVER_WAIT_MS_DEFAULT;
pub use transaction::{Committed, RolledBack, Transaction, TxnOutcome};

/// A concord: embedded (the coordinator, its journal and the configured resources in this
/// process; [`Concord::open`]) or remote (a connection to a coordinator daemon;
/// [`Concord::connect`]). Cloning is cheap and shares it.
#[derive(Clone)]
pub struct Concord {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Embedded(Embedded),
    Remote(Arc<remote::Remote>),
}

#[derive(Clone)]
struct Embedded {
    coordinator: Coordinator,
    recovery: Arc<RecoveryReport>,
}

impl Concord {
    /// Opens the journal and the resources of `config` and recovers (see
    /// [`coordinator::runtime`]). Must be called inside a tokio runtime.
    pub async fn open(config: Config) -> Result<Concord, ConcordError> {
        // Before anything is created: a configuration built in code has not been through
        // `Config::load`'s check, and the journal directory is created next.
        config
            .check_overlaps()
            .map_err(|overlap| opening_failed(config::OpenError::Overlap(Box::new(overlap))))?;
        let journal_dir = config.data_dir.join("journal");
        let (journal, ledger) = tokio::task::spawn_blocking(move || {
            coordinator::runtime::open_journal(&journal_dir, coordinator::runtime::journal_config())
        })
        .await
        .map_err(|e| CoordError::Refused(format!("open journal: {e}")))??;
        let resources = config::open_all(&config).await.map_err(opening_failed)?;
        Concord::open_with(&config, Epoch(config.epoch), journal, ledger, resources).await
    }

    /// Opens a coordinator at `epoch` over a journal already opened (with the ledger its
    /// opening pass read) and resources already opened, and recovers: what a failover node
    /// does when it becomes the primary, keeping the resources it replayed into.
    pub async fn open_with(
        config: &Config,
        epoch: Epoch,
        journal: journal::Journal,
        ledger: coordinator::ledger::Ledger,
        resources: Vec<std::sync::Arc<dyn adapters::Resource>>,
    ) -> Result<Concord, ConcordError> {
        let coordinator_config = CoordinatorConfig {
            node: config.node,
            epoch,
            txn_timeout_ms: config.txn_timeout_ms,
            retry: RetryPolicy::default(),
            orphan_sweep_ms: config.orphan_sweep_ms,
            one_phase: config.one_phase,
            call_timeout_ms: config.call_timeout_ms,
            ..CoordinatorConfig::default()
        };
        let (coordinator, recovery) =
            Coordinator::open_recovered(coordinator_config, journal, ledger, resources).await?;
        Ok(Concord {
            mode: Mode::Embedded(Embedded {
                coordinator,
                recovery: Arc::new(recovery),
            }),
        })
    }

    /// Connects to the coordinator daemon at `url` (`http://HOST:PORT`, or `https://HOST:PORT`
    /// with [`Credentials::with_tls`]); every call carries `credentials`' token. The same API
    /// as embedded mode follows; see the crate docs ("Remote mode"). Must be called inside a
    /// tokio runtime.
    pub async fn connect(url: &str, credentials: Credentials) -> Result<Concord, ConcordError> {
        let remote = remote::Remote::connect(url, credentials).await?;
        Ok(Concord {
            mode: Mode::Remote(Arc::new(remote)),
        })
    }

    /// Connects to the primary among the coordinator daemons at `urls` (the nodes of one
    /// failover cluster, same URL forms and `credentials` as [`Concord::connect`]), and keeps
    /// following it: [`Concord::begin`] and [`Concord::outcome`] go to the node that is primary
    /// now, found again after a failover — a node that answers "not the primary" is left for
    /// the one it names, a node that does not answer for the next URL — for at most
    /// [`FAILOVER_WAIT_MS_DEFAULT`] per call before [`ConcordError::NoPrimary`]. See the crate
    /// docs ("Following the primary").
    pub async fn connect_any(
        urls: &[&str],
        credentials: Credentials,
    ) -> Result<Concord, ConcordError> {
        Concord::connect_any_within(urls, credentials, FAILOVER_WAIT_MS_DEFAULT).await
    }

    /// [`Concord::connect_any`], looking for the primary for at most `failover_wait_ms` per
    /// call (connecting included).
    pub async fn connect_any_within(
        urls: &[&str],
        credentials: Credentials,
        failover_wait_ms: u64,
    ) -> Result<Concord, ConcordError> {
        let remote = remote::Remote::connect_any(urls, credentials, failover_wait_ms).await?;
        Ok(Concord {
            mode: Mode::Remote(Arc::new(remote)),
        })
    }

    /// Reads `path` and opens it.
    pub async fn open_file(path: &Path) -> Result<Concord, ConcordError> {
        Concord::open(Config::load(path)?).await
    }

    /// Remote mode: opens the daemon's PostgreSQL resource `name` in this process with
    /// `config` — the same database the daemon's resource of that name uses (the gid of a
    /// branch, `concord:<xid>:<resource>`, carries the name). [`Transaction::postgres`] then
    /// runs its branches here, on this process's own connections; see the crate docs ("Remote
    /// mode"). Attaching a name again replaces the resource for later transactions. Refused in
    /// embedded mode, which opens PostgreSQL from `concord.toml`.
    pub async fn attach_postgres(
        &self,
        name: &str,
        config: PostgresConfig,
    ) -> Result<(), ConcordError> {
        match &self.mode {
            Mode::Remote(remote) => remote.attach_postgres(name, config).await,
            Mode::Embedded(_) => Err(CoordError::Refused(format!(
                "attach_postgres({name:?}) is for remote mode: embedded mode opens the PostgreSQL resources of concord.toml"
            ))
            .into()),
        }
    }

    /// Whether this is a connection to a daemon ([`Concord::connect`]).
    pub fn is_remote(&self) -> bool {
        matches!(self.mode, Mode::Remote(_))
    }

    /// The embedded parts; panics in remote mode, where they live in the daemon.
    #[track_caller]
    fn embedded(&self) -> &Embedded {
        match &self.mode {
            Mode::Embedded(embedded) => embedded,
            Mode::Remote(_) => {
                panic!(
                    "an embedded-mode call on a remote Concord: the coordinator runs in the daemon"
                )
            }
        }
    }

    /// What recovery found when this concord opened.
    ///
    /// # Panics
    ///
    /// In remote mode (recovery ran in the daemon); see [`Concord::is_remote`].
    #[track_caller]
    pub fn recovery(&self) -> &RecoveryReport {
        &self.embedded().recovery
    }

    /// The coordinator (for operator views).
    ///
    /// # Panics
    ///
    /// In remote mode (the coordinator runs in the daemon); see [`Concord::is_remote`] and
    /// [`Concord::embedded_coordinator`].
    #[track_caller]
    pub fn coordinator(&self) -> &Coordinator {
        &self.embedded().coordinator
    }

    /// The coordinator in embedded mode; `None` in remote mode.
    pub fn embedded_coordinator(&self) -> Option<&Coordinator> {
        match &self.mode {
            Mode::Embedded(embedded) => Some(&embedded.coordinator),
            Mode::Remote(_) => None,
        }
    }

    /// Begins a transaction. In remote mode this is a call to the daemon, which can fail
    /// ([`ConcordError::Unreachable`], [`ConcordError::Limit`], …).
    pub async fn begin(&self) -> Result<Transaction, ConcordError> {
        match &self.mode {
            Mode::Embedded(embedded) => Ok(Transaction::begin(embedded.coordinator.clone())),
            Mode::Remote(remote) => {
                let (begun, node) = remote.begin().await?;
                Ok(Transaction::remote(remote::Shared::new(
                    Arc::clone(remote),
                    begun,
                    node,
                )))
            }
        }
    }

    /// What became of `xid`: for an application whose commit reported
    /// [`ConcordError::InDoubt`], or that lost track of a transaction. Remote mode asks the
    /// daemon; embedded mode asks this process's coordinator and its journal.
    pub async fn outcome(&self, xid: Xid) -> Result<TxnOutcome, ConcordError> {
        match &self.mode {
            Mode::Embedded(embedded) => embedded_outcome(&embedded.coordinator, xid).await,
            Mode::Remote(remote) => remote.outcome(xid).await,
        }
    }

    /// Waits (at most `timeout`) for phase 2 and recovery work in the background to finish;
    /// returns whether it did. In remote mode that work is the daemon's: `true` at once.
    #[must_use = "false means phase 2 or recovery work is still running"]
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        match &self.mode {
            Mode::Embedded(embedded) => embedded.coordinator.wait_settled(timeout).await,
            Mode::Remote(_) => true,
        }
    }

    /// Stops background work (it resumes at the next open) and closes the journal: every record
    /// appended so far is durable, and the journal's directory free for another process, when it
    /// returns `true`, even while [`Transaction`]s of this handle live (their commits fail from
    /// then on). The resources (their files and locks) are let go when the last handle — this
    /// one's clones and every transaction's — is dropped. Returns whether it all happened within
    /// `timeout`.
    ///
    /// In remote mode it only lets go of this handle (the connection closes with its last
    /// clone): `true`.
    pub async fn close(self, timeout: Duration) -> bool {
        match self.mode {
            Mode::Embedded(embedded) => embedded.coordinator.shutdown(timeout).await,
            Mode::Remote(_) => true,
        }
    }

    /// Closes like [`Concord::close`], without the shutdown's `Checkpoint` record (see
    /// `Coordinator::shutdown_handed_over`): a primary handing over to its standby.
    pub async fn close_handed_over(self, timeout: Duration) -> bool {
        match self.mode {
            Mode::Embedded(embedded) => embedded.coordinator.shutdown_handed_over(timeout).await,
            Mode::Remote(_) => true,
        }
    }
}

/// What became of `xid` in an embedded coordinator: open while it holds it, otherwise what
/// the journal's ledger says.
async fn embedded_outcome(coordinator: &Coordinator, xid: Xid) -> Result<TxnOutcome, ConcordError> {
    use coordinator::ledger::Verdict;
    match coordinator.check_open(&xid) {
        Ok(()) => return Ok(TxnOutcome::Open),
        Err(CoordError::TimedOut { timeout_ms, .. }) => {
            return Ok(TxnOutcome::RolledBack {
                cause: RollbackCause::TimedOut { timeout_ms },
            });
        }
        Err(_) => {}
    }
    let c = coordinator.clone();
    let ledger =
        tokio::task::spawn_blocking(move || coordinator::runtime::read_ledger(c.journal()))
            .await
            .map_err(|e| CoordError::Refused(format!("read the journal: {e}")))??;
    let lsn = ledger
        .entry(&xid)
        .and_then(|e| e.decision.as_ref())
        .map(|d| d.lsn());
    Ok(match ledger.verdict(&xid) {
        Verdict::Committed | Verdict::Committing => TxnOutcome::Committed(Committed { xid, lsn }),
        Verdict::Aborted => TxnOutcome::RolledBack {
            cause: RollbackCause::Coordinator {
                reason: "its one-phase commit did not happen".into(),
            },
        },
        Verdict::OnePhaseOpen => TxnOutcome::InDoubt {
            branch: None,
            cause: "its one-phase commit's outcome is not journaled yet".into(),
        },
        Verdict::NoDecision => TxnOutcome::Unknown,
    })
}

/// An [`OpenError`](config::OpenError) as the participant has always reported it: a resource's
/// own refusal as [`ConcordError::Resource`], anything else as the coordinator refusing to start.
fn opening_failed(error: config::OpenError) -> ConcordError {
    match error {
        config::OpenError::Resource { source, .. } => ConcordError::Resource(source),
        other => CoordError::Refused(other.to_string()).into(),
    }
}
