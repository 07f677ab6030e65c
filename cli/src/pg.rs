//! `concord pg install` and `concord pg replicate`: set up the database of a postgres resource.
//!
//! Both name a resource of the configuration (`--config concord.toml`, the same [`Target`] as
//! `concord txn`) and act on its database over one connection, without opening the resource or
//! the journal, so they run beside a live application:
//!
//! * `install` creates the `concord` schema, or upgrades an older one, through
//!   [`adapters::postgres::install`] — idempotent, versioned, one transaction;
//! * `replicate TABLE…` installs the capture trigger on each table through
//!   [`adapters::postgres::replicate`], in one transaction: a table without a primary key is
//!   refused and then none of the tables is set up.
//!
//! The resource's url is never printed here (it may hold a password); the resource's own errors
//! name the server as `host:port/dbname as user`. What PostgreSQL does is described in
//! `docs/postgres.md`.
//!
//! # Implementation caveats
//!
//! * A command waits at most `--wait-ms` for the server, then gives up; the server rolls back
//!   what the dropped connection had begun (unless its commit was already under way), and both
//!   commands are idempotent, so the answer to any failure is to run the command again. The wait covers connecting, the advisory lock of a
//!   concurrent install, and the table locks `replicate` needs, which a prepared transaction
//!   that wrote to the table holds until it is resolved.

use std::path::Path;
use std::time::Duration;

use adapters::ResourceError;
use participant::{Config, ResourceConfig};
use serde::Serialize;

use crate::txn::Target;

/// What `pg install` and `pg replicate` print, for `--help`.
pub const AFTER_HELP: &str = "\
Output:
  install: one line, `NAME: concord schema installed (version V)`, `... upgraded from version F
  to V` or `... already at version V`; --json: {\"resource\",\"from\",\"to\"} (from 0: no schema).
  replicate: one line per table set up, `NAME: capturing rows of SCHEMA.TABLE`; --json:
  {\"resource\",\"tables\"}.
  The database's url is never printed; errors name it as host:port/dbname as user.";

/// Default of `--wait-ms`.
const WAIT_MS_DEFAULT: u64 = 30_000;

/// Options of `concord pg install`.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The postgres resource, by its name in the configuration.
    #[arg(long, value_name = "NAME")]
    resource: String,
    #[command(flatten)]
    target: Target,
    /// How long to wait for the server (connection and locks) before giving up, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = WAIT_MS_DEFAULT)]
    wait_ms: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Options of `concord pg replicate`.
#[derive(clap::Args, Debug)]
pub struct ReplicateArgs {
    /// The postgres resource, by its name in the configuration.
    #[arg(long, value_name = "NAME")]
    resource: String,
    /// The tables whose changed rows travel in the redo (`table` or `schema.table`); each needs a
    /// primary key.
    #[arg(value_name = "TABLE", required = true)]
    tables: Vec<String>,
    #[command(flatten)]
    target: Target,
    /// How long to wait for the server (connection and locks) before giving up, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = WAIT_MS_DEFAULT)]
    wait_ms: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct InstallOutput<'a> {
    resource: &'a str,
    from: i32,
    to: i32,
}

#[derive(Serialize)]
struct ReplicateOutput<'a> {
    resource: &'a str,
    tables: &'a [String],
}

/// Runs `concord pg install`.
pub fn install(args: InstallArgs) -> anyhow::Result<()> {
    let config = load(&args.target)?;
    let url = postgres_url(&config, &args.resource, &args.target)?;
    let installed = block_on(
        &args.resource,
        args.wait_ms,
        adapters::postgres::install(&args.resource, url),
    )?;
    let (name, from, to) = (&args.resource, installed.from, installed.to);
    if args.json {
        let output = InstallOutput {
            resource: name,
            from,
            to,
        };
        println!("{}", serde_json::to_string(&output)?);
    } else if from == 0 {
        println!("{name}: concord schema installed (version {to})");
    } else if from < to {
        println!("{name}: concord schema upgraded from version {from} to {to}");
    } else {
        println!("{name}: concord schema already at version {to}");
    }
    Ok(())
}

/// Runs `concord pg replicate`.
pub fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let config = load(&args.target)?;
    let url = postgres_url(&config, &args.resource, &args.target)?;
    let tables = block_on(
        &args.resource,
        args.wait_ms,
        adapters::postgres::replicate(&args.resource, url, &args.tables),
    )?;
    if args.json {
        let output = ReplicateOutput {
            resource: &args.resource,
            tables: &tables,
        };
        println!("{}", serde_json::to_string(&output)?);
        return Ok(());
    }
    for table in &tables {
        println!("{}: capturing rows of {table}", args.resource);
    }
    Ok(())
}

/// The configuration, as `concord txn` reads it (`--config`, `--data`, else `./concord.toml`).
fn load(target: &Target) -> anyhow::Result<Config> {
    match (&target.config, &target.data) {
        (Some(path), _) => Ok(Config::load(path)?),
        (None, Some(data)) => Ok(Config::embedded(data)),
        (None, None) => Ok(Config::load(Path::new("concord.toml"))?),
    }
}

/// The url of postgres resource `name`; anything else is refused naming the postgres resources
/// the configuration has.
fn postgres_url<'c>(config: &'c Config, name: &str, target: &Target) -> anyhow::Result<&'c str> {
    let kind = match config.resources.get(name) {
        Some(ResourceConfig::Postgres { url, .. }) => return Ok(url),
        Some(ResourceConfig::Files { .. }) => "is a files resource, not a postgres one",
        Some(ResourceConfig::Mail { .. }) => "is a mail resource, not a postgres one",
        Some(ResourceConfig::Kv { .. }) => "is a kv resource, not a postgres one",
        None => "is not in the configuration",
    };
    let postgres: Vec<&str> = config
        .resources
        .iter()
        .filter(|(_, r)| matches!(r, ResourceConfig::Postgres { .. }))
        .map(|(n, _)| n.as_str())
        .collect();
    let known = if postgres.is_empty() {
        "it has no postgres resources".to_string()
    } else {
        format!("its postgres resources: {}", postgres.join(", "))
    };
    anyhow::bail!("resource {name:?} {kind} ({}); {known}", source(target))
}

/// Where the configuration came from, for errors.
fn source(target: &Target) -> String {
    match (&target.config, &target.data) {
        (Some(path), _) => path.display().to_string(),
        (None, Some(data)) => format!("the embedded defaults of --data {}", data.display()),
        (None, None) => "concord.toml".to_string(),
    }
}

/// Runs `work` on a runtime of this thread, for at most `wait_ms`.
fn block_on<T>(
    name: &str,
    wait_ms: u64,
    work: impl Future<Output = Result<T, ResourceError>>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let wait = Duration::from_millis(wait_ms);
    match runtime.block_on(async { tokio::time::timeout(wait, work).await }) {
        Ok(result) => result.map_err(one_shot),
        Err(_) => anyhow::bail!(
            "resource {name}: no answer within {wait_ms} ms (the server is unreachable, or a lock is held: another install, or a prepared transaction on a table — see `concord txn list`); the command is idempotent: run it again"
        ),
    }
}

/// The resource's error for a command that runs once: a retryable failure is not retried here,
/// so it must not say it is retryable without saying how.
fn one_shot(e: ResourceError) -> anyhow::Error {
    match e {
        ResourceError::Unavailable { resource, message } => {
            anyhow::anyhow!(
                "resource {resource}: {message}; check that the server is up and reachable at that address, and the url's user, password and database, then run the command again (it is idempotent)"
            )
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config() -> Config {
        let mut config = Config::embedded(Path::new("/nonexistent"));
        let mut resources = BTreeMap::new();
        resources.insert(
            "orders".to_string(),
            ResourceConfig::Postgres {
                url: "host=h password=s3cret".into(),
                pool_size: 2,
                fence_wait_ms: 1,
                call_timeout_ms: 30_000,
                connect_timeout_ms: 10_000,
            },
        );
        resources.append(&mut config.resources);
        config.resources = resources;
        config
    }

    fn target() -> Target {
        Target {
            config: Some("c.toml".into()),
            data: None,
        }
    }

    #[test]
    fn only_postgres_resources_are_accepted_and_refusals_name_them() {
        let config = config();
        assert_eq!(
            postgres_url(&config, "orders", &target()).ok(),
            Some("host=h password=s3cret")
        );
        for name in ["uploads", "nope"] {
            let Err(e) = postgres_url(&config, name, &target()) else {
                panic!("{name} accepted");
            };
            let text = e.to_string();
            assert!(
                text.contains(name) && text.contains("postgres resources: orders"),
                "{text}"
            );
            assert!(!text.contains("s3cret"), "{text}");
        }
    }

    #[test]
    fn a_one_shot_failure_does_not_promise_a_retry() {
        let e = one_shot(ResourceError::Unavailable {
            resource: "orders".into(),
            message: "cannot connect".into(),
        });
        assert!(!e.to_string().contains("(retryable)"), "{e}");
    }
}
