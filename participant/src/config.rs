//! `concord.toml`: the node, the data directory and the resources by name.
//!
//! ```toml
//! node = 1                  # this coordinator's node id, part of every xid
//! data_dir = "data"         # the journal lives in data_dir/journal
//! txn_timeout_ms = 30000    # optional: an open transaction is rolled back after this long
//! orphan_sweep_ms = 60000   # optional: how often to look for prepared branches nobody owns
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
//! pool_size = 64            # optional: connections (open branches plus phase-2 calls)
//! fence_wait_ms = 2000      # optional: how long a fence waits for prepared branches of old epochs
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
//! ```
//!
//! Each kind takes only its own fields: `root` for files; `url`, `pool_size` and
//! `fence_wait_ms` for postgres; `maildir` and `max_message_bytes` for mail; `dir` and
//! `value_bytes_max` for kv; `create` for files, mail and kv; `lock_wait_ms` for files and kv.
//!
//! Unknown fields are refused (a misspelt option must not be ignored silently); every error names
//! the file and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The name (and directory under `data_dir`) of the mail queue of [`Config::embedded`].
pub const EMBEDDED_MAIL: &str = "mail";
/// The name (and directory under `data_dir`) of the kv resource of [`Config::embedded`].
pub const EMBEDDED_KV: &str = "index";

/// The configuration of an embedded concord.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id.
    pub node: u32,
    /// Where the journal (and later other state) lives.
    pub data_dir: PathBuf,
    /// The epoch this node serves in (1 until failover exists).
    #[serde(default = "default_epoch")]
    pub epoch: u64,
    /// An open transaction is rolled back after this long (milliseconds).
    #[serde(default = "default_timeout_ms")]
    pub txn_timeout_ms: u64,
    /// How often the coordinator looks for prepared branches nobody owns (milliseconds; 0: never).
    /// One is rolled back when two sweeps in a row found it so, so this is also its least age.
    #[serde(default = "default_orphan_sweep_ms")]
    pub orphan_sweep_ms: u64,
    /// Whether a transaction whose only branch is in a resource that offers it (PostgreSQL)
    /// commits in one phase; `false` makes every transaction take two.
    #[serde(default = "default_one_phase")]
    pub one_phase: bool,
    /// The resources, by name.
    #[serde(default, deserialize_with = "resources_from_toml")]
    pub resources: BTreeMap<String, ResourceConfig>,
}

/// A resource table as written. Flat rather than a serde-tagged enum, so that a bad value is
/// reported with its key and line (a tagged enum buffers the table and loses both).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceToml {
    kind: ResourceKind,
    root: Option<PathBuf>,
    maildir: Option<PathBuf>,
    dir: Option<PathBuf>,
    create: Option<bool>,
    lock_wait_ms: Option<u64>,
    max_message_bytes: Option<u64>,
    value_bytes_max: Option<u64>,
    url: Option<String>,
    pool_size: Option<usize>,
    fence_wait_ms: Option<u64>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ResourceKind {
    Files,
    Postgres,
    Mail,
    Kv,
}

impl ResourceKind {
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
            ResourceKind::Postgres => &["url", "pool_size", "fence_wait_ms"],
            ResourceKind::Mail => &["maildir", "create", "max_message_bytes"],
            ResourceKind::Kv => &["dir", "create", "lock_wait_ms", "value_bytes_max"],
        }
    }
}

impl ResourceToml {
    /// The fields set in the table, by name.
    fn set_fields(&self) -> [(&'static str, bool); 10] {
        [
            ("root", self.root.is_some()),
            ("maildir", self.maildir.is_some()),
            ("dir", self.dir.is_some()),
            ("create", self.create.is_some()),
            ("lock_wait_ms", self.lock_wait_ms.is_some()),
            ("max_message_bytes", self.max_message_bytes.is_some()),
            ("value_bytes_max", self.value_bytes_max.is_some()),
            ("url", self.url.is_some()),
            ("pool_size", self.pool_size.is_some()),
            ("fence_wait_ms", self.fence_wait_ms.is_some()),
        ]
    }

    /// The first field set that does not apply to the table's kind.
    fn foreign_field(&self) -> Option<&'static str> {
        let allowed = self.kind.fields();
        self.set_fields()
            .into_iter()
            .find(|(field, set)| *set && !allowed.contains(field))
            .map(|(field, _)| field)
    }

    /// The resource, or what is wrong with the table (naming the field).
    fn into_config(self) -> Result<ResourceConfig, String> {
        if let Some(field) = self.foreign_field() {
            let kind = self.kind.name();
            return Err(format!(
                "field `{field}` does not apply to kind = \"{kind}\""
            ));
        }
        let missing = |field: &str| format!("missing field `{field}`");
        match self.kind {
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
                Ok(ResourceConfig::Postgres {
                    url,
                    pool_size,
                    fence_wait_ms: self.fence_wait_ms.unwrap_or(2_000),
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

fn resources_from_toml<'de, D>(
    deserializer: D,
) -> Result<BTreeMap<String, ResourceConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let tables = BTreeMap::<String, ResourceToml>::deserialize(deserializer)?;
    let mut out = BTreeMap::new();
    for (name, table) in tables {
        let config = table
            .into_config()
            .map_err(|e| D::Error::custom(format!("[resources.{name}]: {e}")))?;
        out.insert(name, config);
    }
    Ok(out)
}

/// One resource.
#[derive(Clone, Debug)]
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
        /// Its connection string (libpq style or URL); never printed with its password.
        url: String,
        /// Most connections.
        pool_size: usize,
        /// How long a fence waits for prepared branches of older epochs (milliseconds).
        fence_wait_ms: u64,
    },
    /// A Maildir (the mail queue resource, `adapters::mail`).
    Mail {
        /// The Maildir: the directory holding `tmp/`, `new/` and `cur/`.
        maildir: PathBuf,
        /// Create the Maildir and whichever of its subdirectories is missing.
        create: bool,
        /// Largest message accepted, in bytes, counted with CRLF line endings.
        max_message_bytes: u64,
    },
    /// A sled directory (the kv resource, `adapters::kv`).
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

fn default_one_phase() -> bool {
    true
}

fn default_lock_wait_ms() -> u64 {
    5_000
}

fn default_max_message_bytes() -> u64 {
    adapters::mail::MailConfig::default().max_message_bytes
}

fn default_value_bytes_max() -> u64 {
    adapters::kv::KvConfig::default().value_bytes_max
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration {path}: {message}")]
pub struct ConfigError {
    /// The file (or `<built-in>`).
    pub path: PathBuf,
    /// What is wrong, naming the field.
    pub message: String,
}

impl Config {
    /// Reads and checks `path`; relative paths in it are made relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.to_path_buf(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| err(e.to_string().trim().replace('\n', " ")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(err)?;
        Ok(config)
    }

    /// The embedded defaults of `concord demo`: node 1, two files resources `uploads` and
    /// `thumbnails`, the mail queue `mail` (a Maildir) and the kv resource `index` (a sled
    /// directory), each in the directory of its name under `data_dir` and created when missing.
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
            resources,
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
        }) = config.resources.get("orders")
        else {
            panic!("no orders")
        };
        assert_eq!(url, "host=127.0.0.1 dbname=shop");
        assert_eq!((*pool_size, *fence_wait_ms), (64, 2_000));
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
