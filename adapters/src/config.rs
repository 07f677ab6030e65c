//! `concord.toml` — the node, the data directory and the resources by name — and opening the
//! resources it names.
//!
//! Several programs open the same resources from the same file: the participant library
//! (embedded mode opens every resource for its coordinator), the operator commands (which open
//! only the resources one xid involves) and the standby's replay daemon (which opens its own
//! copies to replay redo into them). The replicator must never depend on the participant
//! library, and every one of them already depends on this crate, so the configuration and the
//! code that turns a [`ResourceConfig`] into an `Arc<dyn Resource>` live here, next to the
//! resources. `participant` re-exports this module unchanged (`participant::config`).
//!
//! ```toml
//! node = 1                  # this coordinator's node id, part of every xid
//! data_dir = "data"         # the journal lives in data_dir/journal
//! txn_timeout_ms = 30000    # optional: an open transaction is rolled back after this long
//! orphan_sweep_ms = 60000   # optional: how often to look for prepared branches nobody owns
//! call_timeout_ms = 30000   # optional: deadline of every call to a resource (prepare, commit, …)
//! one_phase = true          # optional: a transaction with one branch (PostgreSQL) skips the prepare
//!
//! [resources.uploads]       # a resource, by the name the application uses
//! kind = "files"
//! root = "data/uploads"     # relative paths are relative to this file's directory
//! create = true             # optional: create the root when missing
//! lock_wait_ms = 5000       # optional: how long a writer waits for a path another branch holds
//!
//! [resources.orders]        # a PostgreSQL database (set up with `concord pg install`)
//! kind = "postgres"
//! url = "host=127.0.0.1 port=5432 user=app dbname=shop"
//! password_file = "secrets/shop"  # optional: the password, from this file (relative to this one)
//! # password_env = "SHOP_PASSWORD" # … or from this environment variable; at most one source
//! pool_size = 64            # optional: connections (open branches plus phase-2 calls)
//! fence_wait_ms = 2000      # optional: how long a fence waits for prepared branches of old epochs
//! call_timeout_ms = 30000   # optional: deadline of each of concord's own round trips
//! connect_timeout_ms = 10000 # optional: deadline of opening a connection
//!
//! [resources.outbox]        # a mail queue: a Maildir (tmp/, new/, cur/)
//! kind = "mail"
//! maildir = "data/outbox"   # relative to this file's directory
//! create = true             # optional: create the Maildir and its tmp/, new/, cur/ when missing
//! max_message_bytes = 268435456  # optional: largest message, counted with CRLF line endings
//!
//! [resources.index]         # a sled key-value store
//! kind = "kv"
//! dir = "data/index"        # the sled directory, relative to this file's directory
//! create = true             # optional: create the directory when missing
//! lock_wait_ms = 5000       # optional: how long a writer waits for a key another branch holds
//! value_bytes_max = 1048576 # optional: longest value (at most 4 MiB: a branch's whole batch is)
//!
//! [daemon]                  # optional: how `concord coordinator` serves (see DaemonConfig)
//! tls_cert_file = "tls/daemon.crt"
//! tls_key_file = "tls/daemon.key"
//! [daemon.clients.shop]     # a bearer token per client, read from its file
//! token_file = "secrets/shop"
//! ```
//!
//! The kinds are [`KINDS`]. Each kind takes only its own fields: `root` for files; `url`,
//! `password_file`, `password_env`, `pool_size`, `fence_wait_ms`, `call_timeout_ms` and
//! `connect_timeout_ms` for postgres; `maildir` and `max_message_bytes` for mail;
//! `dir` and `value_bytes_max` for kv; `create` for files, mail and kv; `lock_wait_ms` for files
//! and kv.
//!
//! Unknown fields are refused (a misspelt option must not be ignored silently); every error names
//! the file and the field, and a kind that does not exist names the resource and the kinds that
//! do ([`ConfigProblem::UnknownKind`]). Loading only reads the file: a refused configuration has
//! created nothing.
//!
//! A PostgreSQL password need not be in the file: `password_file` names a file holding it (one
//! trailing line end is not part of it), `password_env` an environment variable; loading reads
//! it and adds it to `url` ([`postgres::with_password`]). At most one of `url`, `password_file`
//! and `password_env` may give a password; a conflict, an unreadable or empty file and an unset
//! variable are [`ConfigProblem::Password`], naming the resource and the field. The `Debug` of
//! every configuration type shows a connection string without its password
//! ([`postgres::redact_url`]).
//!
//! Every directory belongs to one owner: two resources may not share a directory or nest one
//! inside the other, and no resource's directory may be, lie inside or hold the journal's
//! (`data_dir/journal`). [`Config::check_overlaps`] compares the paths absolute and normalised
//! ([`normalised`]: `.` and `..` resolved, the existing part through symbolic links) without
//! requiring them to exist; [`Config::load`] refuses an overlap as [`ConfigProblem::Overlap`]
//! naming both owners and both paths, and [`open_all`] / [`open_named`] refuse it
//! ([`OpenError::Overlap`]) before opening anything, for a configuration built in code.
//!
//! Opening: [`open_all`] opens every configured resource, [`open_named`] only those named (every
//! name is checked against the configuration before any resource opens, and the others are not
//! touched: no connection, no directory created), [`open_resource`] one. Mail and kv open on
//! tokio's blocking pool (directory checks, sled's recovery and lock wait).
//!
//! # Implementation caveats
//!
//! * Resources open one after the other, in name order; when one fails, those opened before it
//!   are dropped (closed), but what their opening created (a root with `create = true`) stays.
//! * A semantic error (a field of another kind, a value out of range, an unknown kind) names the
//!   resource table and the field, not the line; errors of TOML syntax, of a value's type and of
//!   an unknown field come from the TOML parser, with the line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::files::{FilesConfig, FilesResource};
use crate::kv::{KvConfig, KvResource};
use crate::mail::{MailConfig, MailResource};
use crate::postgres::{self, PostgresConfig, PostgresResource};
use crate::{Resource, ResourceError};

mod daemon;
mod failover;
mod replication;

pub use failover::{FailoverConfig, QuorumKind};

pub use replication::{
    ReplicationConfig, ReplicationMode, STANDBY_LISTEN_DEFAULT, StandbyConfig, SyncFallback,
};

pub use daemon::{
    BearerToken, DaemonConfig, DaemonLimits, LISTEN_DEFAULT, ServeRefusal, TOKEN_CHARS_MIN,
    TlsFiles,
};

/// The name (and directory under `data_dir`) of the mail queue of [`Config::embedded`].
pub const EMBEDDED_MAIL: &str = "mail";
/// The name (and directory under `data_dir`) of the kv resource of [`Config::embedded`].
pub const EMBEDDED_KV: &str = "index";

/// The kinds of resource a `[resources.NAME]` table can name, as written in `kind = "…"`.
pub const KINDS: [&str; 4] = ["files", "postgres", "mail", "kv"];

/// The configuration of a concord node: its identity, its data directory and its resources.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "ConfigToml")]
pub struct Config {
    /// This node's id.
    pub node: u32,
    /// Where the journal (and later other state) lives.
    pub data_dir: PathBuf,
    /// The epoch this node serves in (1 until failover exists).
    pub epoch: u64,
    /// An open transaction is rolled back after this long (milliseconds).
    pub txn_timeout_ms: u64,
    /// How often the coordinator looks for prepared branches nobody owns (milliseconds; 0: never).
    /// One is rolled back when two sweeps in a row found it so, so this is also its least age.
    pub orphan_sweep_ms: u64,
    /// Whether a transaction whose only branch is in a resource that offers it (PostgreSQL)
    /// commits in one phase; `false` makes every transaction take two.
    pub one_phase: bool,
    /// Deadline of every call the coordinator makes to a resource (milliseconds): a prepare
    /// past it votes no, a phase-2 call past it is retried.
    pub call_timeout_ms: u64,
    /// The resources, by name.
    pub resources: BTreeMap<String, ResourceConfig>,
    /// How `concord coordinator` serves (the `[daemon]` table: its address, TLS, tokens, limits; see [`DaemonConfig`]).
    pub daemon: DaemonConfig,
    /// How a primary ships its journal to standbys (the `[replication]` table; see
    /// [`ReplicationConfig`]).
    pub replication: ReplicationConfig,
    /// Which primary a standby follows (the `[standby]` table; `None` without one, which
    /// `concord standby --config` refuses).
    pub standby: Option<StandbyConfig>,
    /// How this node takes part in failover (the `[failover]` table; `None`: it does not).
    pub failover: Option<FailoverConfig>,
}

/// The file as written: the resource tables are checked against their kind after parsing, so
/// that a semantic error is typed ([`ConfigProblem`]) rather than a parser message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigToml {
    node: u32,
    data_dir: PathBuf,
    #[serde(default = "default_epoch")]
    epoch: u64,
    #[serde(default = "default_timeout_ms")]
    txn_timeout_ms: u64,
    #[serde(default = "default_orphan_sweep_ms")]
    orphan_sweep_ms: u64,
    #[serde(default = "default_one_phase")]
    one_phase: bool,
    #[serde(default = "default_call_timeout_ms")]
    call_timeout_ms: u64,
    #[serde(default)]
    resources: BTreeMap<String, ResourceToml>,
    daemon: Option<daemon::DaemonToml>,
    replication: Option<replication::ReplicationToml>,
    standby: Option<replication::StandbyToml>,
    failover: Option<failover::FailoverToml>,
}

/// A resource table as written. Flat rather than a serde-tagged enum, so that a bad value is
/// reported with its key and line (a tagged enum buffers the table and loses both).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceToml {
    kind: String,
    root: Option<PathBuf>,
    maildir: Option<PathBuf>,
    dir: Option<PathBuf>,
    create: Option<bool>,
    lock_wait_ms: Option<u64>,
    max_message_bytes: Option<u64>,
    value_bytes_max: Option<u64>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    pool_size: Option<usize>,
    fence_wait_ms: Option<u64>,
    call_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
}

#[derive(Clone, Copy)]
enum ResourceKind {
    Files,
    Postgres,
    Mail,
    Kv,
}

impl ResourceKind {
    /// The kind written `kind`, if it exists.
    fn parse(kind: &str) -> Option<ResourceKind> {
        match kind {
            "files" => Some(ResourceKind::Files),
            "postgres" => Some(ResourceKind::Postgres),
            "mail" => Some(ResourceKind::Mail),
            "kv" => Some(ResourceKind::Kv),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ResourceKind::Files => "files",
            ResourceKind::Postgres => "postgres",
            ResourceKind::Mail => "mail",
            ResourceKind::Kv => "kv",
        }
    }

    /// The optional and required fields this kind takes, besides `kind`.
    fn fields(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Files => &["root", "create", "lock_wait_ms"],
            ResourceKind::Postgres => &[
                "url",
                "password_file",
                "password_env",
                "pool_size",
                "fence_wait_ms",
                "call_timeout_ms",
                "connect_timeout_ms",
            ],
            ResourceKind::Mail => &["maildir", "create", "max_message_bytes"],
            ResourceKind::Kv => &["dir", "create", "lock_wait_ms", "value_bytes_max"],
        }
    }
}

/// What is wrong with a configuration, for callers that act on it; the error's message says it
/// in words.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigProblem {
    /// The file cannot be read.
    Unreadable,
    /// The TOML parser refused it: bad syntax, a value of the wrong type, a missing or unknown
    /// field.
    Malformed,
    /// A resource table names a kind that does not exist (the kinds are [`KINDS`]).
    UnknownKind {
        /// The resource (the `NAME` of `[resources.NAME]`).
        resource: String,
        /// The kind it names.
        kind: String,
    },
    /// A value the types allow but concord cannot use: a field of another kind, a value out of
    /// range, a bad resource name.
    Invalid,
    /// A postgres resource's `password_file` or `password_env` cannot give its password: the
    /// file cannot be read or is empty, the variable is not set, or two sources give one
    /// (`url`, `password_file`, `password_env`: at most one).
    Password {
        /// The resource (the `NAME` of `[resources.NAME]`).
        resource: String,
        /// The field at fault.
        field: &'static str,
    },
    /// A resource's directory is the directory of another resource or of the journal, or lies
    /// inside it or holds it ([`Config::check_overlaps`]).
    Overlap(Box<Overlap>),
}

/// Two directories of one configuration that overlap: the same directory, or one inside the
/// other. Each resource writes its own state in its directory (the files resource its
/// `.concord/`, the mail queue `tmp/`, `new/` and `cur/`, sled its files) and so does the
/// journal in `data_dir/journal`; sharing a directory mixes them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "[resources.{resource}] directory {} overlaps {other} directory {} ({}): every resource \
     needs a directory of its own, apart from the others and from the journal in \
     data_dir/journal; give each its own directory",
    path.display(),
    other_path.display(),
    self.relation()
)]
pub struct Overlap {
    /// The resource (the `NAME` of `[resources.NAME]`).
    pub resource: String,
    /// Its directory, absolute and normalised.
    pub path: PathBuf,
    /// What it overlaps.
    pub other: Occupant,
    /// The directory of `other`, absolute and normalised.
    pub other_path: PathBuf,
}

impl Overlap {
    /// How the two directories overlap, in words.
    fn relation(&self) -> &'static str {
        if self.path == self.other_path {
            "the same directory"
        } else if self.path.starts_with(&self.other_path) {
            "it lies inside it"
        } else {
            "it holds it"
        }
    }
}

/// What occupies a directory of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Occupant {
    /// The resource of this name.
    Resource(String),
    /// The journal (`data_dir/journal`).
    Journal,
}

impl fmt::Display for Occupant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Occupant::Resource(name) => write!(f, "[resources.{name}]"),
            Occupant::Journal => f.write_str("the journal's"),
        }
    }
}

/// A refusal of one part of the file, before the file's path is attached.
#[derive(Debug)]
struct Refusal {
    problem: ConfigProblem,
    message: String,
}

impl Refusal {
    fn invalid(message: impl Into<String>) -> Refusal {
        Refusal {
            problem: ConfigProblem::Invalid,
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl ResourceToml {
    /// The fields set in the table, by name.
    fn set_fields(&self) -> [(&'static str, bool); 14] {
        [
            ("root", self.root.is_some()),
            ("maildir", self.maildir.is_some()),
            ("dir", self.dir.is_some()),
            ("create", self.create.is_some()),
            ("lock_wait_ms", self.lock_wait_ms.is_some()),
            ("max_message_bytes", self.max_message_bytes.is_some()),
            ("value_bytes_max", self.value_bytes_max.is_some()),
            ("url", self.url.is_some()),
            ("password_file", self.password_file.is_some()),
            ("password_env", self.password_env.is_some()),
            ("pool_size", self.pool_size.is_some()),
            ("fence_wait_ms", self.fence_wait_ms.is_some()),
            ("call_timeout_ms", self.call_timeout_ms.is_some()),
            ("connect_timeout_ms", self.connect_timeout_ms.is_some()),
        ]
    }

    /// The first field set that does not apply to `kind`.
    fn foreign_field(&self, kind: ResourceKind) -> Option<&'static str> {
        let allowed = kind.fields();
        self.set_fields()
            .into_iter()
            .find(|(field, set)| *set && !allowed.contains(field))
            .map(|(field, _)| field)
    }

    /// The resource `name`, or what is wrong with its table (naming the table and the field).
    fn into_config(self, name: &str) -> Result<ResourceConfig, Refusal> {
        let Some(kind) = ResourceKind::parse(&self.kind) else {
            return Err(Refusal {
                message: format!(
                    "[resources.{name}]: field `kind` names the kind {:?}, which does not exist; \
                     the kinds are {}",
                    self.kind,
                    KINDS.join(", ")
                ),
                problem: ConfigProblem::UnknownKind {
                    resource: name.to_string(),
                    kind: self.kind,
                },
            });
        };
        let table = match kind {
            ResourceKind::Postgres => self.with_password(name)?,
            _ => self,
        };
        table
            .into_kind(kind)
            .map_err(|e| Refusal::invalid(format!("[resources.{name}]: {e}")))
    }

    /// The table with the password of `password_file` or `password_env`, if either is set,
    /// added to `url` ([`postgres::with_password`]); at most one of the two and the url may give
    /// one.
    fn with_password(mut self, name: &str) -> Result<ResourceToml, Refusal> {
        let refused = |field: &'static str, message: String| Refusal {
            message: format!("[resources.{name}]: field `{field}`: {message}"),
            problem: ConfigProblem::Password {
                resource: name.to_string(),
                field,
            },
        };
        let password = match (self.password_file.take(), self.password_env.take()) {
            (None, None) => return Ok(self),
            (Some(_), Some(_)) => {
                return Err(refused(
                    "password_env",
                    "`password_file` gives the password too; keep one of the two".into(),
                ));
            }
            (Some(file), None) => {
                password_from_file(&file).map_err(|e| refused("password_file", e))?
            }
            (None, Some(var)) => password_from_env(&var).map_err(|e| refused("password_env", e))?,
        };
        let field = if password.from_file {
            "password_file"
        } else {
            "password_env"
        };
        let Some(url) = self.url.take() else {
            // `into_kind` names the missing url.
            return Ok(self);
        };
        if url_has_password(&url) {
            return Err(refused(
                field,
                "`url` gives a password too; keep one of the two (better this one, so that the \
                 password is not in the file)"
                    .into(),
            ));
        }
        self.url = Some(postgres::with_password(&url, &password.text));
        Ok(self)
    }

    /// The resource of `kind`, or what is wrong with the table (naming the field).
    fn into_kind(self, kind: ResourceKind) -> Result<ResourceConfig, String> {
        if let Some(field) = self.foreign_field(kind) {
            let kind = kind.name();
            return Err(format!(
                "field `{field}` does not apply to kind = \"{kind}\""
            ));
        }
        let missing = |field: &str| format!("missing field `{field}`");
        match kind {
            ResourceKind::Files => Ok(ResourceConfig::Files {
                root: self.root.ok_or_else(|| missing("root"))?,
                create: self.create.unwrap_or(false),
                lock_wait_ms: self.lock_wait_ms.unwrap_or_else(default_lock_wait_ms),
            }),
            ResourceKind::Postgres => {
                let url = self.url.ok_or_else(|| missing("url"))?;
                let pool_size = self.pool_size.unwrap_or(64);
                if pool_size < 2 {
                    return Err("field `pool_size` must be at least 2".into());
                }
                let call_timeout_ms = self.call_timeout_ms.unwrap_or(30_000);
                let connect_timeout_ms = self.connect_timeout_ms.unwrap_or(10_000);
                if call_timeout_ms == 0 || connect_timeout_ms == 0 {
                    return Err(
                        "fields `call_timeout_ms` and `connect_timeout_ms` must be positive".into(),
                    );
                }
                Ok(ResourceConfig::Postgres {
                    url,
                    pool_size,
                    fence_wait_ms: self.fence_wait_ms.unwrap_or(2_000),
                    call_timeout_ms,
                    connect_timeout_ms,
                })
            }
            ResourceKind::Mail => {
                let max_message_bytes = self
                    .max_message_bytes
                    .unwrap_or_else(default_max_message_bytes);
                if max_message_bytes == 0 {
                    return Err("field `max_message_bytes` must be positive".into());
                }
                Ok(ResourceConfig::Mail {
                    maildir: self.maildir.ok_or_else(|| missing("maildir"))?,
                    create: self.create.unwrap_or(false),
                    max_message_bytes,
                })
            }
            ResourceKind::Kv => {
                let value_bytes_max = self.value_bytes_max.unwrap_or_else(default_value_bytes_max);
                if !(1..=KV_VALUE_BYTES_MAX_LIMIT).contains(&value_bytes_max) {
                    return Err(format!(
                        "field `value_bytes_max` must be between 1 and {KV_VALUE_BYTES_MAX_LIMIT} \
                         (a branch's whole batch, which travels in one journal record, is at most that)"
                    ));
                }
                Ok(ResourceConfig::Kv {
                    dir: self.dir.ok_or_else(|| missing("dir"))?,
                    create: self.create.unwrap_or(false),
                    lock_wait_ms: self.lock_wait_ms.unwrap_or_else(default_lock_wait_ms),
                    value_bytes_max,
                })
            }
        }
    }
}

impl TryFrom<ConfigToml> for Config {
    type Error = Refusal;

    fn try_from(raw: ConfigToml) -> Result<Config, Refusal> {
        let mut resources = BTreeMap::new();
        for (name, table) in raw.resources {
            let resource = table.into_config(&name)?;
            resources.insert(name, resource);
        }
        let daemon = match raw.daemon {
            Some(table) => table.into_config(Path::new("")).map_err(Refusal::invalid)?,
            None => DaemonConfig::default(),
        };
        let replication = match raw.replication {
            Some(table) => table.into_config().map_err(Refusal::invalid)?,
            None => ReplicationConfig::default(),
        };
        let standby = raw
            .standby
            .map(|table| table.into_config(Path::new("")))
            .transpose()
            .map_err(Refusal::invalid)?;
        let failover = raw
            .failover
            .map(|table| table.into_config(Path::new(""), raw.node))
            .transpose()
            .map_err(Refusal::invalid)?;
        Ok(Config {
            node: raw.node,
            data_dir: raw.data_dir,
            epoch: raw.epoch,
            txn_timeout_ms: raw.txn_timeout_ms,
            orphan_sweep_ms: raw.orphan_sweep_ms,
            one_phase: raw.one_phase,
            call_timeout_ms: raw.call_timeout_ms,
            resources,
            daemon,
            replication,
            standby,
            failover,
        })
    }
}

/// One resource. Its `Debug` shows a PostgreSQL connection string without its password
/// ([`postgres::redact_url`]).
#[derive(Clone)]
pub enum ResourceConfig {
    /// A directory tree (the files resource).
    Files {
        /// The root directory.
        root: PathBuf,
        /// Create the root when missing.
        create: bool,
        /// How long a writer waits for a path held by another branch (milliseconds).
        lock_wait_ms: u64,
    },
    /// A PostgreSQL database (the postgres resource).
    Postgres {
        /// Its connection string (libpq style or URL), with the password of `password_file` or
        /// `password_env` added when the file gave one; never printed with its password.
        url: String,
        /// Most connections.
        pool_size: usize,
        /// How long a fence waits for prepared branches of older epochs (milliseconds).
        fence_wait_ms: u64,
        /// Deadline of each of concord's own round trips to the server (milliseconds); past
        /// it the connection is dropped from the pool.
        call_timeout_ms: u64,
        /// Deadline of opening a connection (milliseconds), unless the URL sets one.
        connect_timeout_ms: u64,
    },
    /// A Maildir (the mail queue resource, [`crate::mail`]).
    Mail {
        /// The Maildir: the directory holding `tmp/`, `new/` and `cur/`.
        maildir: PathBuf,
        /// Create the Maildir and whichever of its subdirectories is missing.
        create: bool,
        /// Largest message accepted, in bytes, counted with CRLF line endings.
        max_message_bytes: u64,
    },
    /// A sled directory (the kv resource, [`crate::kv`]).
    Kv {
        /// The sled directory.
        dir: PathBuf,
        /// Create the directory when missing.
        create: bool,
        /// How long a writer waits for a key held by another branch (milliseconds).
        lock_wait_ms: u64,
        /// Longest value an insert accepts, in bytes.
        value_bytes_max: u64,
    },
}

impl fmt::Debug for ResourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceConfig::Files {
                root,
                create,
                lock_wait_ms,
            } => f
                .debug_struct("Files")
                .field("root", root)
                .field("create", create)
                .field("lock_wait_ms", lock_wait_ms)
                .finish(),
            ResourceConfig::Postgres {
                url,
                pool_size,
                fence_wait_ms,
                call_timeout_ms,
                connect_timeout_ms,
            } => f
                .debug_struct("Postgres")
                .field("url", &postgres::redact_url(url))
                .field("pool_size", pool_size)
                .field("fence_wait_ms", fence_wait_ms)
                .field("call_timeout_ms", call_timeout_ms)
                .field("connect_timeout_ms", connect_timeout_ms)
                .finish(),
            ResourceConfig::Mail {
                maildir,
                create,
                max_message_bytes,
            } => f
                .debug_struct("Mail")
                .field("maildir", maildir)
                .field("create", create)
                .field("max_message_bytes", max_message_bytes)
                .finish(),
            ResourceConfig::Kv {
                dir,
                create,
                lock_wait_ms,
                value_bytes_max,
            } => f
                .debug_struct("Kv")
                .field("dir", dir)
                .field("create", create)
                .field("lock_wait_ms", lock_wait_ms)
                .field("value_bytes_max", value_bytes_max)
                .finish(),
        }
    }
}

impl ResourceConfig {
    /// The directory it keeps its data in (`root`, `maildir` or `dir`); `None` for PostgreSQL.
    pub fn directory(&self) -> Option<&Path> {
        match self {
            ResourceConfig::Files { root, .. } => Some(root),
            ResourceConfig::Mail { maildir, .. } => Some(maildir),
            ResourceConfig::Kv { dir, .. } => Some(dir),
            ResourceConfig::Postgres { .. } => None,
        }
    }

    /// Its kind as written in `kind = "…"` (one of [`KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            ResourceConfig::Files { .. } => "files",
            ResourceConfig::Postgres { .. } => "postgres",
            ResourceConfig::Mail { .. } => "mail",
            ResourceConfig::Kv { .. } => "kv",
        }
    }
}

/// The TOML parser's `message` with every line of the file `text` that may hold a password (it
/// names `password` or a URL's user info) shown through [`postgres::redact_url`]: the parser
/// quotes the line it refuses.
fn without_passwords(message: &str, text: &str) -> String {
    let mut message = message.to_string();
    for line in text.lines() {
        let line = line.trim();
        if !line.is_empty() && (line.contains("password") || line.contains("://")) {
            message = message.replace(line, &postgres::redact_url(line));
        }
    }
    message
}

/// A password read from `password_file` or `password_env`.
struct Password {
    text: String,
    from_file: bool,
}

/// The password in `file`: its whole content but one trailing line end.
fn password_from_file(file: &Path) -> Result<Password, String> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "cannot read the password file {}: {e}; check the path and that this user may read it",
            file.display()
        )
    })?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text)
        .to_string();
    if text.is_empty() {
        return Err(format!(
            "the password file {} is empty; write the password in it",
            file.display()
        ));
    }
    Ok(Password {
        text,
        from_file: true,
    })
}

/// The password in the environment variable `var`.
fn password_from_env(var: &str) -> Result<Password, String> {
    match std::env::var(var) {
        Ok(text) if !text.is_empty() => Ok(Password {
            text,
            from_file: false,
        }),
        Ok(_) => Err(format!(
            "the environment variable {var} is empty; set it to the password"
        )),
        Err(std::env::VarError::NotPresent) => Err(format!(
            "the environment variable {var} is not set; set it in the environment of every \
             program that reads this file"
        )),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("the environment variable {var} is not valid UTF-8"))
        }
    }
}

/// Whether the connection string sets a password itself (one that cannot be parsed is left to
/// the resource's open, which names what is wrong with it).
fn url_has_password(url: &str) -> bool {
    <tokio_postgres::Config as std::str::FromStr>::from_str(url)
        .is_ok_and(|pg| pg.get_password().is_some())
}

/// The highest `value_bytes_max` of a kv resource: the default limit of a branch's batch, which
/// travels as the redo in one journal record.
pub const KV_VALUE_BYTES_MAX_LIMIT: u64 = 4 << 20;

fn default_epoch() -> u64 {
    1
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_orphan_sweep_ms() -> u64 {
    60_000
}

fn default_call_timeout_ms() -> u64 {
    30_000
}

fn default_one_phase() -> bool {
    true
}

fn default_lock_wait_ms() -> u64 {
    5_000
}

fn default_max_message_bytes() -> u64 {
    MailConfig::default().max_message_bytes
}

fn default_value_bytes_max() -> u64 {
    KvConfig::default().value_bytes_max
}

/// A configuration that cannot be used: fix the file (the message names it and the field) and
/// start again.
#[derive(Debug, thiserror::Error)]
#[error("configuration {path}: {message}")]
pub struct ConfigError {
    /// The file (or `<built-in>`).
    pub path: PathBuf,
    /// What is wrong, naming the field.
    pub message: String,
    /// What is wrong, for a caller that acts on it.
    pub problem: ConfigProblem,
}

impl Config {
    /// Reads and checks `path`; relative paths in it are made relative to its directory.
    /// Creates nothing.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |refusal: Refusal| ConfigError {
            path: path.to_path_buf(),
            message: refusal.message,
            problem: refusal.problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(Refusal {
                problem: ConfigProblem::Unreadable,
                message: format!("cannot read it: {e}"),
            })
        })?;
        let raw: ConfigToml = toml::from_str(&text).map_err(|e| {
            err(Refusal {
                problem: ConfigProblem::Malformed,
                message: without_passwords(e.to_string().trim(), &text),
            })
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut raw = raw;
        for table in raw.resources.values_mut() {
            if let Some(file) = &mut table.password_file {
                *file = base.join(&*file);
            }
        }
        let daemon = raw.daemon.take();
        let standby = raw.standby.take();
        let failover = raw.failover.take();
        let mut config = Config::try_from(raw).map_err(err)?;
        if let Some(table) = daemon {
            config.daemon = table
                .into_config(base)
                .map_err(|e| err(Refusal::invalid(e)))?;
        }
        if let Some(table) = standby {
            config.standby = Some(
                table
                    .into_config(base)
                    .map_err(|e| err(Refusal::invalid(e)))?,
            );
        }
        if let Some(table) = failover {
            let node = config.node;
            config.failover = Some(
                table
                    .into_config(base, node)
                    .map_err(|e| err(Refusal::invalid(e)))?,
            );
        }
        config.resolve_paths(base);
        config.validate().map_err(|e| err(Refusal::invalid(e)))?;
        config.check_overlaps().map_err(|overlap| {
            err(Refusal {
                message: overlap.to_string(),
                problem: ConfigProblem::Overlap(Box::new(overlap)),
            })
        })?;
        Ok(config)
    }

    /// The directory of each resource that has one (files, mail, kv), by name, and the journal's
    /// (`data_dir/journal`), each absolute and normalised ([`normalised`]).
    fn directories(&self) -> Vec<(Occupant, PathBuf)> {
        let mut dirs = vec![(
            Occupant::Journal,
            normalised(&self.data_dir.join("journal")),
        )];
        for (name, resource) in &self.resources {
            if let Some(dir) = resource.directory() {
                dirs.push((Occupant::Resource(name.clone()), normalised(dir)));
            }
        }
        dirs
    }

    /// Refuses directories that overlap: two resources in one directory or one inside the
    /// other, or a resource's directory that is the journal's (`data_dir/journal`), lies inside
    /// it or holds it. Paths are compared absolute and normalised, without requiring them to
    /// exist; nothing is created. [`Config::load`] and [`open_all`] / [`open_named`] check it.
    pub fn check_overlaps(&self) -> Result<(), Overlap> {
        let dirs = self.directories();
        for (i, (first, first_path)) in dirs.iter().enumerate() {
            for (second, second_path) in &dirs[i + 1..] {
                if !overlapping(first_path, second_path) {
                    continue;
                }
                // The journal comes first, so `second` is always a resource.
                let Occupant::Resource(resource) = second else {
                    continue;
                };
                return Err(Overlap {
                    resource: resource.clone(),
                    path: second_path.clone(),
                    other: first.clone(),
                    other_path: first_path.clone(),
                });
            }
        }
        Ok(())
    }

    /// The embedded defaults of `concord demo`: node 1, two files resources `uploads` and
    /// `thumbnails`, the mail queue `mail` (a Maildir) and the kv resource `index` (a sled
    /// directory), each in the directory of its name under `data_dir` and created when missing;
    /// a daemon on them serves plain text on loopback without tokens
    /// ([`DaemonConfig::embedded`]).
    pub fn embedded(data_dir: &Path) -> Config {
        let mut resources = BTreeMap::new();
        for name in ["uploads", "thumbnails"] {
            let root = data_dir.join(name);
            let files = ResourceConfig::Files {
                root,
                create: true,
                lock_wait_ms: default_lock_wait_ms(),
            };
            resources.insert(name.to_string(), files);
        }
        let mail = ResourceConfig::Mail {
            maildir: data_dir.join(EMBEDDED_MAIL),
            create: true,
            max_message_bytes: default_max_message_bytes(),
        };
        resources.insert(EMBEDDED_MAIL.to_string(), mail);
        let kv = ResourceConfig::Kv {
            dir: data_dir.join(EMBEDDED_KV),
            create: true,
            lock_wait_ms: default_lock_wait_ms(),
            value_bytes_max: default_value_bytes_max(),
        };
        resources.insert(EMBEDDED_KV.to_string(), kv);
        Config {
            node: 1,
            data_dir: data_dir.to_path_buf(),
            epoch: default_epoch(),
            txn_timeout_ms: default_timeout_ms(),
            orphan_sweep_ms: default_orphan_sweep_ms(),
            one_phase: default_one_phase(),
            call_timeout_ms: default_call_timeout_ms(),
            resources,
            daemon: DaemonConfig::embedded(),
            replication: ReplicationConfig::default(),
            standby: None,
            failover: None,
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.data_dir = base.join(&self.data_dir);
        for resource in self.resources.values_mut() {
            match resource {
                ResourceConfig::Files { root, .. } => *root = base.join(&*root),
                ResourceConfig::Mail { maildir, .. } => *maildir = base.join(&*maildir),
                ResourceConfig::Kv { dir, .. } => *dir = base.join(&*dir),
                ResourceConfig::Postgres { .. } => {}
            }
        }
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.node == 0 {
            return Err("field `node` must be at least 1".into());
        }
        if self.epoch == 0 {
            return Err("field `epoch` must be at least 1".into());
        }
        if self.txn_timeout_ms == 0 {
            return Err("field `txn_timeout_ms` must be positive".into());
        }
        if self.call_timeout_ms == 0 {
            return Err("field `call_timeout_ms` must be positive".into());
        }
        for name in self.resources.keys() {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(format!(
                    "resource name {name:?} in [resources] must be letters, digits, '_' or '-'"
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Whether the journal's directory (`data_dir/journal`) exists and is writable, or can be
    /// created ([`usable_directory`]); creates nothing.
    pub fn check_journal_directory(&self) -> Result<String, DirectoryProblem> {
        usable_directory(&self.data_dir.join("journal"), true)
    }
}

impl ResourceConfig {
    /// Whether the directory of a files, mail or kv resource can be used as configured, creating
    /// nothing ([`usable_directory`]; a Maildir without `create` must also hold `tmp/`, `new/`
    /// and `cur/`). `Ok` says what was found; `None` for PostgreSQL, which has no directory.
    pub fn check_directory(&self) -> Option<Result<String, DirectoryProblem>> {
        let checked = match self {
            ResourceConfig::Files { root, create, .. } => usable_directory(root, *create),
            ResourceConfig::Kv { dir, create, .. } => usable_directory(dir, *create),
            ResourceConfig::Mail {
                maildir, create, ..
            } => usable_directory(maildir, *create).and_then(|found| {
                maildir_complete(maildir, *create)?;
                Ok(found)
            }),
            ResourceConfig::Postgres { .. } => return None,
        };
        Some(checked)
    }
}

/// Why a resource's directory cannot be used as configured ([`usable_directory`],
/// [`ResourceConfig::check_directory`]); each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryProblem {
    /// Something other than a directory is at the path.
    #[error("{} exists and is not a directory: remove it, or configure another path", path.display())]
    NotADirectory {
        /// The configured directory.
        path: PathBuf,
    },
    /// The path cannot be looked at (permissions of a parent, an I/O error).
    #[error("cannot read {}: {source}; check the permissions of its parents", path.display())]
    Unreadable {
        /// The configured directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The directory does not exist and the resource does not create it.
    #[error("{} does not exist (and create = false): create it, or set create = true", path.display())]
    Missing {
        /// The configured directory.
        path: PathBuf,
    },
    /// The directory does not exist, and what would hold it is not a directory.
    #[error("{} cannot be created: {} is not a directory", path.display(), ancestor.display())]
    AncestorNotADirectory {
        /// The configured directory.
        path: PathBuf,
        /// Its nearest existing ancestor.
        ancestor: PathBuf,
    },
    /// This user may not create entries in the directory (or in its nearest existing ancestor,
    /// which would hold it).
    #[error("{} is not writable by this user ({source}): fix its owner or permissions", path.display())]
    NotWritable {
        /// The directory that must be writable.
        path: PathBuf,
        /// What `access(2)` said.
        source: std::io::Error,
    },
    /// A Maildir opened without `create` lacks some of `tmp/`, `new/` and `cur/`.
    #[error("{} is not a Maildir: it lacks {}; set create = true, or point maildir at a Maildir", path.display(), missing.join(", "))]
    NotAMaildir {
        /// The configured Maildir.
        path: PathBuf,
        /// The subdirectories it lacks.
        missing: Vec<&'static str>,
    },
}

/// A Maildir opened without `create` must hold `tmp/`, `new/` and `cur/`.
fn maildir_complete(maildir: &Path, create: bool) -> Result<(), DirectoryProblem> {
    if create || !maildir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&'static str> = ["tmp", "new", "cur"]
        .into_iter()
        .filter(|sub| !maildir.join(sub).is_dir())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(DirectoryProblem::NotAMaildir {
        path: maildir.to_path_buf(),
        missing,
    })
}

/// Whether `dir` is a directory this process may write in, or — when `create` — may be
/// created: its nearest existing ancestor is a directory this process may write in. Uses
/// access checks (`access(2)`, as the real user) and creates nothing. `Ok` says what was found.
pub fn usable_directory(dir: &Path, create: bool) -> Result<String, DirectoryProblem> {
    let path = || dir.to_path_buf();
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            writable(dir).map(|()| format!("{} is writable", dir.display()))
        }
        Ok(_) => Err(DirectoryProblem::NotADirectory { path: path() }),
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
            Err(DirectoryProblem::Unreadable {
                path: path(),
                source,
            })
        }
        Err(_) if !create => Err(DirectoryProblem::Missing { path: path() }),
        Err(_) => {
            let ancestor = nearest_existing(dir);
            if !ancestor.is_dir() {
                return Err(DirectoryProblem::AncestorNotADirectory {
                    path: path(),
                    ancestor,
                });
            }
            writable(&ancestor).map(|()| {
                format!(
                    "{} does not exist yet; it will be created in {}, which is writable",
                    dir.display(),
                    ancestor.display()
                )
            })
        }
    }
}

/// The longest ancestor of `path` (or `path` itself) that exists.
fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Whether this process may create and remove entries in the directory `dir`.
fn writable(dir: &Path) -> Result<(), DirectoryProblem> {
    use rustix::fs::{Access, access};
    access(dir, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| DirectoryProblem::NotWritable {
        path: dir.to_path_buf(),
        source: e.into(),
    })
}

/// Whether `a` and `b` are the same directory or one lies inside the other.
fn overlapping(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// `path` absolute (against the current directory), with `.` and `..` resolved by name, and
/// its longest existing ancestor resolved through symbolic links (`fs::canonicalize`), so that
/// two spellings of one directory compare equal whether or not it exists yet.
pub fn normalised(path: &Path) -> PathBuf {
    use std::path::Component;
    let absolute = match std::env::current_dir() {
        Ok(current) if path.is_relative() => current.join(path),
        _ => path.to_path_buf(),
    };
    let mut lexical = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            other => lexical.push(other),
        }
    }
    let mut missing = Vec::new();
    let mut existing = lexical.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return missing
                .iter()
                .rev()
                .fold(real, |path, part| path.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

/// A resource that could not be opened, naming it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The name is not a resource of the configuration; nothing was opened.
    #[error(
        "resource {name:?} is not in the configuration (it has: {}); check the name, or add a \
         [resources.{name}] table",
        known.join(", ")
    )]
    NotConfigured {
        /// The name asked for.
        name: String,
        /// The resources the configuration has.
        known: Vec<String>,
    },
    /// The resource refused or failed to open; its error (which names it too) says what to do.
    #[error("{source}")]
    Resource {
        /// The resource.
        name: String,
        /// Why it did not open.
        source: ResourceError,
    },
    /// Two directories of the configuration overlap ([`Config::check_overlaps`]); nothing was
    /// opened or created. Give each resource its own directory.
    #[error("{0}")]
    Overlap(Box<Overlap>),
    /// The task opening it on the blocking pool did not finish: it panicked, or the runtime is
    /// shutting down.
    #[error("open resource {name}: the opening task failed ({message}); restart the process")]
    Task {
        /// The resource.
        name: String,
        /// What the runtime said.
        message: String,
    },
}

impl OpenError {
    /// The resource the error is about.
    pub fn resource(&self) -> &str {
        match self {
            OpenError::NotConfigured { name, .. }
            | OpenError::Resource { name, .. }
            | OpenError::Task { name, .. } => name,
            OpenError::Overlap(overlap) => &overlap.resource,
        }
    }
}

/// Opens every resource of `config`, in name order (see [`open_resource`]).
pub async fn open_all(config: &Config) -> Result<Vec<Arc<dyn Resource>>, OpenError> {
    config
        .check_overlaps()
        .map_err(|overlap| OpenError::Overlap(Box::new(overlap)))?;
    let mut opened = Vec::with_capacity(config.resources.len());
    for (name, resource) in &config.resources {
        opened.push(open_resource(name, resource, config.node).await?);
    }
    Ok(opened)
}

/// Opens only the resources `names` of `config`, in name order, each once however often it is
/// named. Every name is checked before any resource opens: a name the configuration lacks is
/// [`OpenError::NotConfigured`] with nothing opened. The other resources are not touched.
pub async fn open_named<S: AsRef<str>>(
    config: &Config,
    names: &[S],
) -> Result<Vec<Arc<dyn Resource>>, OpenError> {
    config
        .check_overlaps()
        .map_err(|overlap| OpenError::Overlap(Box::new(overlap)))?;
    let wanted: BTreeSet<&str> = names.iter().map(AsRef::as_ref).collect();
    let mut chosen = Vec::with_capacity(wanted.len());
    for name in wanted {
        let Some(resource) = config.resources.get(name) else {
            return Err(OpenError::NotConfigured {
                name: name.to_string(),
                known: config.resources.keys().cloned().collect(),
            });
        };
        chosen.push((name, resource));
    }
    let mut opened = Vec::with_capacity(chosen.len());
    for (name, resource) in chosen {
        opened.push(open_resource(name, resource, config.node).await?);
    }
    Ok(opened)
}

/// Opens the resource `name` described by `resource` for node `node` (PostgreSQL's prepared
/// transactions are named by it). Mail and kv open blocking (directory checks, sled's recovery
/// and lock wait), so they run on tokio's blocking pool. Must be called inside a tokio runtime.
pub async fn open_resource(
    name: &str,
    resource: &ResourceConfig,
    node: u32,
) -> Result<Arc<dyn Resource>, OpenError> {
    let refused = |source: ResourceError| OpenError::Resource {
        name: name.to_string(),
        source,
    };
    let opened: Arc<dyn Resource> = match resource {
        ResourceConfig::Files {
            root,
            create,
            lock_wait_ms,
        } => {
            let files_config = FilesConfig {
                lock_wait_ms_max: *lock_wait_ms,
                create_if_missing: *create,
                ..FilesConfig::default()
            };
            FilesResource::open(name, root, files_config).map_err(refused)?
        }
        ResourceConfig::Postgres {
            url,
            pool_size,
            fence_wait_ms,
            call_timeout_ms,
            connect_timeout_ms,
        } => {
            let mut pg_config = PostgresConfig::new(url, node);
            pg_config.pool_size = *pool_size;
            pg_config.fence_wait_ms = *fence_wait_ms;
            pg_config.call_timeout_ms = *call_timeout_ms;
            pg_config.connect_timeout_ms = *connect_timeout_ms;
            PostgresResource::open(name, pg_config)
                .await
                .map_err(refused)?
        }
        ResourceConfig::Mail {
            maildir,
            create,
            max_message_bytes,
        } => {
            let mail_config = MailConfig {
                create: *create,
                max_message_bytes: *max_message_bytes,
            };
            let (owned, maildir) = (name.to_string(), maildir.clone());
            let opening = move || MailResource::open(&owned, &maildir, mail_config);
            on_blocking_pool(name, opening).await?.map_err(refused)?
        }
        ResourceConfig::Kv {
            dir,
            create,
            lock_wait_ms,
            value_bytes_max,
        } => {
            let kv_config = KvConfig {
                lock_wait_ms_max: *lock_wait_ms,
                value_bytes_max: *value_bytes_max,
                create_if_missing: *create,
                ..KvConfig::default()
            };
            let (owned, dir) = (name.to_string(), dir.clone());
            let opening = move || KvResource::open(&owned, &dir, kv_config);
            on_blocking_pool(name, opening).await?.map_err(refused)?
        }
    };
    Ok(opened)
}

/// Runs `opening` on the blocking pool; a task that did not finish is [`OpenError::Task`].
async fn on_blocking_pool<T: Send + 'static>(
    name: &str,
    opening: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OpenError> {
    tokio::task::spawn_blocking(opening)
        .await
        .map_err(|e| OpenError::Task {
            name: name.to_string(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("concord.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn a_full_configuration_loads_with_paths_relative_to_the_file() {
        let config = load(
            "node = 2\ndata_dir = \"d\"\n[resources.uploads]\nkind = \"files\"\nroot = \"u\"\ncreate = true\n",
        )
        .unwrap();
        assert_eq!(config.node, 2);
        assert!(config.data_dir.ends_with("d") && config.data_dir.is_absolute());
        let Some(ResourceConfig::Files {
            root,
            create,
            lock_wait_ms,
        }) = config.resources.get("uploads")
        else {
            panic!("no uploads")
        };
        assert!(root.ends_with("u") && *create && *lock_wait_ms == 5_000);
    }

    #[test]
    fn a_postgres_resource_loads_with_defaults() {
        let config = load(
            "node = 1\ndata_dir = \"d\"\n[resources.orders]\nkind = \"postgres\"\nurl = \"host=127.0.0.1 dbname=shop\"\n",
        )
        .unwrap();
        let Some(ResourceConfig::Postgres {
            url,
            pool_size,
            fence_wait_ms,
            call_timeout_ms,
            ..
        }) = config.resources.get("orders")
        else {
            panic!("no orders")
        };
        assert_eq!(url, "host=127.0.0.1 dbname=shop");
        assert_eq!((*pool_size, *fence_wait_ms), (64, 2_000));
        assert_eq!(*call_timeout_ms, 30_000);
        assert_eq!(config.orphan_sweep_ms, 60_000);
        let swept = load("node = 1\ndata_dir = \"d\"\norphan_sweep_ms = 500\n").unwrap();
        assert_eq!(swept.orphan_sweep_ms, 500);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let missing = load("data_dir = \"d\"\n").unwrap_err().to_string();
        assert!(
            missing.contains("concord.toml") && missing.contains("node"),
            "{missing}"
        );
        let invalid = load("node = \"one\"\ndata_dir = \"d\"\n")
            .unwrap_err()
            .to_string();
        assert!(invalid.contains("node"), "{invalid}");
        let unknown = load("node = 1\ndata_dir = \"d\"\nnodes = 2\n")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("nodes"), "{unknown}");
        let kind =
            load("node = 1\ndata_dir = \"d\"\n[resources.x]\nkind = \"tape\"\nroot = \"r\"\n")
                .unwrap_err();
        assert!(kind.to_string().contains("tape"), "{kind}");
        let no_url = load("node = 1\ndata_dir = \"d\"\n[resources.db]\nkind = \"postgres\"\n")
            .unwrap_err()
            .to_string();
        assert!(no_url.contains("`url`"), "{no_url}");
        let root_for_pg = load(
            "node = 1\ndata_dir = \"d\"\n[resources.db]\nkind = \"postgres\"\nurl = \"host=h\"\nroot = \"r\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(root_for_pg.contains("`root`"), "{root_for_pg}");
        let zero = load("node = 0\ndata_dir = \"d\"\n")
            .unwrap_err()
            .to_string();
        assert!(zero.contains("`node`"), "{zero}");
    }

    #[test]
    fn mail_and_kv_resources_load_with_defaults_and_paths_relative_to_the_file() {
        let config = load(
            "node = 1\ndata_dir = \"d\"\n\
             [resources.outbox]\nkind = \"mail\"\nmaildir = \"m\"\n\
             [resources.index]\nkind = \"kv\"\ndir = \"k\"\n",
        )
        .unwrap();
        let Some(ResourceConfig::Mail {
            maildir,
            create,
            max_message_bytes,
        }) = config.resources.get("outbox")
        else {
            panic!("no outbox")
        };
        assert!(maildir.ends_with("m") && maildir.is_absolute());
        assert!(!*create);
        assert_eq!(*max_message_bytes, 256 << 20);
        let Some(ResourceConfig::Kv {
            dir,
            create,
            lock_wait_ms,
            value_bytes_max,
        }) = config.resources.get("index")
        else {
            panic!("no index")
        };
        assert!(dir.ends_with("k") && dir.is_absolute());
        assert!(!*create);
        assert_eq!((*lock_wait_ms, *value_bytes_max), (5_000, 1 << 20));
    }

    #[test]
    fn mail_and_kv_options_are_read() {
        let config = load(
            "node = 1\ndata_dir = \"d\"\n\
             [resources.outbox]\nkind = \"mail\"\nmaildir = \"m\"\ncreate = true\nmax_message_bytes = 1000\n\
             [resources.index]\nkind = \"kv\"\ndir = \"k\"\ncreate = true\nlock_wait_ms = 7\nvalue_bytes_max = 4096\n",
        )
        .unwrap();
        assert!(matches!(
            config.resources.get("outbox"),
            Some(ResourceConfig::Mail {
                create: true,
                max_message_bytes: 1000,
                ..
            })
        ));
        assert!(matches!(
            config.resources.get("index"),
            Some(ResourceConfig::Kv {
                create: true,
                lock_wait_ms: 7,
                value_bytes_max: 4096,
                ..
            })
        ));
    }

    /// Each kind refuses the fields of the others, and a missing required field, by name.
    #[test]
    fn mail_and_kv_errors_name_the_field() {
        let refused = |table: &str, field: &str| {
            let text = format!("node = 1\ndata_dir = \"d\"\n[resources.r]\n{table}");
            let message = load(&text).unwrap_err().to_string();
            assert!(
                message.contains(&format!("`{field}`")) && message.contains("[resources.r]"),
                "{table:?}: {message}"
            );
        };
        refused("kind = \"mail\"\n", "maildir");
        refused("kind = \"kv\"\n", "dir");
        refused("kind = \"mail\"\nmaildir = \"m\"\nroot = \"r\"\n", "root");
        refused(
            "kind = \"mail\"\nmaildir = \"m\"\nlock_wait_ms = 1\n",
            "lock_wait_ms",
        );
        refused(
            "kind = \"mail\"\nmaildir = \"m\"\nvalue_bytes_max = 1\n",
            "value_bytes_max",
        );
        refused("kind = \"kv\"\ndir = \"k\"\nmaildir = \"m\"\n", "maildir");
        refused(
            "kind = \"kv\"\ndir = \"k\"\nmax_message_bytes = 1\n",
            "max_message_bytes",
        );
        refused("kind = \"kv\"\ndir = \"k\"\nurl = \"u\"\n", "url");
        refused("kind = \"files\"\nroot = \"r\"\ndir = \"k\"\n", "dir");
        refused(
            "kind = \"postgres\"\nurl = \"u\"\nmaildir = \"m\"\n",
            "maildir",
        );
        refused(
            "kind = \"mail\"\nmaildir = \"m\"\nmax_message_bytes = 0\n",
            "max_message_bytes",
        );
        refused(
            "kind = \"kv\"\ndir = \"k\"\nvalue_bytes_max = 0\n",
            "value_bytes_max",
        );
        refused(
            "kind = \"kv\"\ndir = \"k\"\nvalue_bytes_max = 4194305\n",
            "value_bytes_max",
        );
        // A value of the wrong type is reported by the TOML parser, with the line that has it.
        for (table, field) in [
            (
                "kind = \"kv\"\ndir = \"k\"\nvalue_bytes_max = \"big\"\n",
                "value_bytes_max",
            ),
            (
                "kind = \"mail\"\nmaildir = \"m\"\ncreate = \"yes\"\n",
                "create",
            ),
        ] {
            let text = format!("node = 1\ndata_dir = \"d\"\n[resources.r]\n{table}");
            let message = load(&text).unwrap_err().to_string();
            assert!(message.contains(&format!("{field} =")), "{message}");
        }
    }

    /// Two spellings of one directory — through `..`, through a symbolic link, existing or
    /// not yet — overlap; neighbours and the embedded layout do not.
    #[test]
    fn overlaps_are_found_through_dots_and_symbolic_links() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        assert_eq!(
            normalised(&dir.path().join("link/x/../y")),
            normalised(&real.join("y"))
        );
        // Elsewhere, without the symbolic link, the same names are neighbours.
        let neighbours = load(
            "node = 1\ndata_dir = \"d\"\n\
             [resources.a]\nkind = \"files\"\nroot = \"real/a\"\n\
             [resources.b]\nkind = \"kv\"\ndir = \"link/a/../a/b\"\n",
        );
        // `load` writes into a directory of its own: spell the paths through the link here.
        let text = format!(
            "node = 1\ndata_dir = \"d\"\n\
             [resources.a]\nkind = \"files\"\nroot = \"{}\"\n\
             [resources.b]\nkind = \"kv\"\ndir = \"{}\"\n",
            real.join("a").display(),
            dir.path().join("link/a/../a/b").display()
        );
        let e = load(&text).unwrap_err();
        let ConfigProblem::Overlap(overlap) = &e.problem else {
            panic!("not an overlap: {e}")
        };
        assert_eq!(
            (overlap.resource.as_str(), &overlap.other),
            ("b", &Occupant::Resource("a".into()))
        );
        assert!(
            neighbours.is_ok(),
            "neighbours refused: {:?}",
            neighbours.err()
        );
        let mut embedded = Config::embedded(dir.path());
        assert!(embedded.check_overlaps().is_ok());
        embedded.resources.insert(
            "journal_files".into(),
            ResourceConfig::Files {
                root: dir.path().join("./journal"),
                create: true,
                lock_wait_ms: 1,
            },
        );
        let overlap = embedded.check_overlaps().unwrap_err();
        assert_eq!(overlap.other, Occupant::Journal);
    }

    #[test]
    fn the_embedded_defaults_have_files_mail_and_kv_under_the_data_dir() {
        let config = Config::embedded(Path::new("/srv/demo"));
        let names: Vec<&str> = config.resources.keys().map(String::as_str).collect();
        assert_eq!(names, ["index", "mail", "thumbnails", "uploads"]);
        assert!(matches!(
            config.resources.get(EMBEDDED_MAIL),
            Some(ResourceConfig::Mail { maildir, create: true, .. }) if maildir == Path::new("/srv/demo/mail")
        ));
        assert!(matches!(
            config.resources.get(EMBEDDED_KV),
            Some(ResourceConfig::Kv { dir, create: true, .. }) if dir == Path::new("/srv/demo/index")
        ));
    }
}
