//! What the examples share: reading the data directory (and the PostgreSQL URL) from the command
//! line or the environment, writing a `concord.toml` there, and a bounded retry loop on
//! [`ConcordError::is_retryable`].

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use participant::{Committed, Concord, ConcordError};

/// The environment variable that names the data directory when no argument does.
pub const DIR_VAR: &str = "CONCORD_EXAMPLE_DIR";

/// The environment variable that holds the PostgreSQL URL when no argument does.
pub const PG_URL_VAR: &str = "CONCORD_EXAMPLE_PG_URL";

/// How often a retryable transaction is run before its error is given up on.
pub const ATTEMPTS_MAX: u32 = 5;

/// How long `main` waits for phase 2 to finish and for the journal to close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// The usage line of example `name`; `postgres`: it also needs a PostgreSQL URL.
fn usage(name: &str, postgres: bool) -> String {
    if postgres {
        format!(
            "usage: {name} DATA_DIR POSTGRES_URL\n  (or set {DIR_VAR} and {PG_URL_VAR})\n  \
             DATA_DIR is created if missing; the database must exist and allow prepared \
             transactions (max_prepared_transactions > 0)"
        )
    } else {
        format!("usage: {name} DATA_DIR\n  (or set {DIR_VAR})\n  DATA_DIR is created if missing")
    }
}

/// What the command line asks for.
pub struct Args {
    /// The data directory: `concord.toml`, the journal and the resources' directories.
    pub dir: PathBuf,
    /// The PostgreSQL URL (only for the examples that need one).
    pub pg_url: Option<String>,
}

/// Reads the data directory (and, when `postgres`, the URL) from the arguments or the
/// environment; prints the usage and returns the exit code 2 when one is missing.
pub fn args(name: &str, postgres: bool) -> Result<Args, ExitCode> {
    let mut argv = std::env::args().skip(1);
    let first = argv.next();
    if matches!(first.as_deref(), Some("-h" | "--help")) {
        println!("{}", usage(name, postgres));
        return Err(ExitCode::SUCCESS);
    }
    let dir = first.or_else(|| std::env::var(DIR_VAR).ok());
    let pg_url = argv.next().or_else(|| std::env::var(PG_URL_VAR).ok());
    match (dir, pg_url) {
        (Some(dir), pg_url) if !dir.is_empty() && (!postgres || pg_url.is_some()) => Ok(Args {
            dir: PathBuf::from(dir),
            pg_url,
        }),
        _ => {
            eprintln!("{}", usage(name, postgres));
            Err(ExitCode::from(2))
        }
    }
}

/// Writes `concord.toml` into `dir` (node 1, the journal under `dir/data`, the resources of
/// `resources`, a TOML fragment with paths relative to `dir`) and opens it.
pub async fn open(dir: &Path, resources: &str) -> Result<Concord, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("create the data directory {}: {e}", dir.display()))?;
    let path = dir.join("concord.toml");
    let text = format!("node = 1\ndata_dir = \"data\"\ntxn_timeout_ms = 20000\n\n{resources}");
    std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("opening {}", path.display());
    Ok(Concord::open_file(&path).await?)
}

/// Runs `transaction` until it commits, again (with a growing pause) while its error is
/// retryable, at most [`ATTEMPTS_MAX`] times. An error that is not retryable — above all
/// [`ConcordError::InDoubt`], which may have committed — is returned at once.
pub async fn retrying<F, Fut>(what: &str, mut transaction: F) -> Result<Committed, ConcordError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Committed, ConcordError>>,
{
    let mut attempt = 1;
    loop {
        match transaction().await {
            Ok(committed) => {
                println!("{what}: committed {} ({})", committed.xid, lsn(&committed));
                return Ok(committed);
            }
            Err(e) if e.is_retryable() && attempt < ATTEMPTS_MAX => {
                println!("{what}: attempt {attempt} failed and may be run again: {e}");
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                attempt += 1;
            }
            Err(e @ ConcordError::InDoubt { .. }) => {
                eprintln!("{what}: in doubt, not run again (concord finishes it): {e}");
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Where the decision of `committed` is, in words.
pub fn lsn(committed: &Committed) -> String {
    match committed.lsn {
        Some(lsn) => format!("decision at lsn {lsn}"),
        None => "nothing to journal".to_string(),
    }
}

/// Waits for phase 2 to finish, then closes the journal.
pub async fn close(concord: Concord) -> Result<(), Box<dyn std::error::Error>> {
    if !concord.wait_idle(CLOSE_WAIT).await {
        return Err(format!("phase 2 did not finish within {CLOSE_WAIT:?}").into());
    }
    if !concord.close(CLOSE_WAIT).await {
        return Err(format!("the journal did not close within {CLOSE_WAIT:?}").into());
    }
    Ok(())
}

/// Installs concord's schema into the database at `url` (for the resource named `orders`),
/// creates `table` (`id bigint PRIMARY KEY, item text`) and installs its capture trigger: what
/// an operator does with `concord pg install` and `concord pg replicate`. Idempotent.
pub async fn prepare_database(url: &str, table: &str) -> Result<(), Box<dyn std::error::Error>> {
    adapters::postgres::install("orders", url).await?;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, item text NOT NULL)"
        ))
        .await?;
    drop(client);
    connection.await??;
    adapters::postgres::replicate("orders", url, &[table.to_string()]).await?;
    Ok(())
}

/// `text` as a TOML basic string.
pub fn toml_string(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Exit code 0 for `Ok`; the error printed and exit code 1 otherwise.
pub fn exit_code(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
