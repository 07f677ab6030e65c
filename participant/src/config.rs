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
//! ```
//!
//! Unknown fields are refused (a misspelt option must not be ignored silently); every error names
//! the file and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    create: Option<bool>,
    lock_wait_ms: Option<u64>,
    url: Option<String>,
    pool_size: Option<usize>,
    fence_wait_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ResourceKind {
    Files,
    Postgres,
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
    for (name, t) in tables {
        let refuse = |field: &str, kind: &str| {
            D::Error::custom(format!(
                "[resources.{name}]: field `{field}` does not apply to kind = \"{kind}\""
            ))
        };
        let config = match t.kind {
            ResourceKind::Files => {
                for (field, set) in [
                    ("url", t.url.is_some()),
                    ("pool_size", t.pool_size.is_some()),
                    ("fence_wait_ms", t.fence_wait_ms.is_some()),
                ] {
                    if set {
                        return Err(refuse(field, "files"));
                    }
                }
                let root = t.root.ok_or_else(|| {
                    D::Error::custom(format!("[resources.{name}]: missing field `root`"))
                })?;
                ResourceConfig::Files {
                    root,
                    create: t.create.unwrap_or(false),
                    lock_wait_ms: t.lock_wait_ms.unwrap_or_else(default_lock_wait_ms),
                }
            }
            ResourceKind::Postgres => {
                for (field, set) in [
                    ("root", t.root.is_some()),
                    ("create", t.create.is_some()),
                    ("lock_wait_ms", t.lock_wait_ms.is_some()),
                ] {
                    if set {
                        return Err(refuse(field, "postgres"));
                    }
                }
                let url = t.url.ok_or_else(|| {
                    D::Error::custom(format!("[resources.{name}]: missing field `url`"))
                })?;
                let pool_size = t.pool_size.unwrap_or(64);
                if pool_size < 2 {
                    return Err(D::Error::custom(format!(
                        "[resources.{name}]: field `pool_size` must be at least 2"
                    )));
                }
                ResourceConfig::Postgres {
                    url,
                    pool_size,
                    fence_wait_ms: t.fence_wait_ms.unwrap_or(2_000),
                }
            }
        };
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
}

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

    /// The embedded defaults of `concord demo`: node 1 and two files resources, `uploads` and
    /// `thumbnails`, all under `data_dir`.
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
}
