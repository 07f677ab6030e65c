//! `concord config check`: says whether a configuration can be used, changing nothing.
//!
//! The check reads the file as every program does ([`Config::load`]: TOML syntax with line and
//! column, every field, overlapping directories), then asks each resource whether it is
//! reachable, the way opening it would find out, without the side effects of opening:
//!
//! * **PostgreSQL**: one connection, bounded by the resource's `connect_timeout_ms`, and the
//!   checks opening makes (`max_prepared_transactions` above 0, the concord schema at this
//!   program's version) — nothing is installed ([`adapters::postgres::check_reachable`]).
//! * **files, mail, kv**: the directory exists and is writable, or (with `create = true`) its
//!   nearest existing ancestor is a writable directory, judged by access checks; nothing is
//!   created ([`ResourceConfig::check_directory`]). A Maildir without `create` must hold `tmp/`,
//!   `new/` and `cur/`.
//! * **the journal**: `data_dir/journal` exists and is writable, or can be created.
//! * **the daemon** (`[daemon]`): how `concord coordinator` would serve — address, TLS or plain
//!   text, client names (never tokens), whether an operator token is set, the metrics address
//!   and the limits. When the file has the table, what keeps the daemon from serving is a
//!   problem (kind `daemon`): neither TLS nor `plaintext = true`, plain text off loopback
//!   without `plaintext_any_address`, no client token without `unauthenticated = true`, or TLS
//!   files that cannot be read or do not belong together (read and checked as at start).
//!
//! The answer is a list of problems of the file and one line per resource (or one JSON document
//! with `--json`); when anything is wrong the command fails with [`CheckFailed`], which the
//! binary reports with its own exit code.
//!
//! # Implementation caveats
//!
//! * Reachable now is not reachable later: a sled directory or files root held by a running
//!   process, or a database that goes away, is found only when the resource is opened.
//! * Access checks are made as the real user of this process, which need not be the user the
//!   application runs as.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use adapters::config::{Config, ConfigError, ConfigProblem, DaemonConfig, ResourceConfig};
use serde::Serialize;

/// `concord config check` arguments.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The configuration file to check.
    #[arg(long, value_name = "FILE", default_value = "concord.toml")]
    config: PathBuf,
    /// Print one JSON document: {"config", "ok", "problems": [{"kind", "message"}],
    /// "resources": [{"name", "kind", "ok", "detail"}], "daemon": {"configured", "listen",
    /// "transport", "clients", "operator_token", "unauthenticated", "metrics_listen", "limits"}}.
    #[arg(long)]
    json: bool,
}

/// What `--help` adds below the options.
pub const AFTER_HELP: &str = "\
Nothing is created or changed: directories are judged by access checks on their nearest
existing ancestor, and PostgreSQL by one connection and a read of the concord schema.
Exit code 0 when the file is valid and every resource reachable, 5 otherwise.";

/// The configuration is not usable as it is: the lines (or JSON document) printed before say
/// why. The binary exits with its own code for it.
#[derive(Debug)]
pub struct CheckFailed {
    /// The file checked.
    pub config: PathBuf,
    /// Problems of the file itself.
    pub problems: usize,
    /// Resources that are not reachable.
    pub unreachable: usize,
}

impl fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "configuration {} is not usable: {} problem(s) in the file, {} resource(s) not reachable (see above)",
            self.config.display(),
            self.problems,
            self.unreachable
        )
    }
}

impl std::error::Error for CheckFailed {}

/// The whole answer, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Report {
    config: String,
    ok: bool,
    problems: Vec<Problem>,
    resources: Vec<Reachability>,
    /// How the daemon would serve; absent when the file did not load.
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon: Option<DaemonSummary>,
}

/// The `[daemon]` table as the check shows it: never a token, only whether one is set.
#[derive(Debug, Serialize)]
struct DaemonSummary {
    /// Whether the file has a `[daemon]` table.
    configured: bool,
    listen: String,
    /// `tls`, `mutual tls` or `plain text` (`none` when neither is configured).
    transport: &'static str,
    clients: Vec<String>,
    operator_token: bool,
    unauthenticated: bool,
    metrics_listen: Option<String>,
    limits: Limits,
}

/// The daemon's limits, with their units in their names.
#[derive(Debug, Serialize)]
struct Limits {
    message_bytes_max: usize,
    chunk_bytes_max: usize,
    branches_per_txn_max: u32,
    txns_per_client_max: u32,
    request_timeout_ms: u64,
    drain_timeout_ms: u64,
}

impl DaemonSummary {
    fn of(daemon: &DaemonConfig) -> DaemonSummary {
        let transport = match &daemon.tls {
            Some(tls) if tls.client_ca_file.is_some() => "mutual tls",
            Some(_) => "tls",
            None if daemon.plaintext => "plain text",
            None => "none",
        };
        let l = daemon.limits;
        DaemonSummary {
            configured: daemon.written,
            listen: daemon.listen.to_string(),
            transport,
            clients: daemon.clients.keys().cloned().collect(),
            operator_token: daemon.operator_token.is_some(),
            unauthenticated: daemon.unauthenticated,
            metrics_listen: daemon.metrics_listen.map(|a| a.to_string()),
            limits: Limits {
                message_bytes_max: l.message_bytes_max,
                chunk_bytes_max: l.chunk_bytes_max,
                branches_per_txn_max: l.branches_per_txn_max,
                txns_per_client_max: l.txns_per_client_max,
                request_timeout_ms: l.request_timeout_ms,
                drain_timeout_ms: l.drain_timeout_ms,
            },
        }
    }
}

/// What keeps the daemon of `daemon` from serving, when the file has a `[daemon]` table.
fn daemon_problems(daemon: &DaemonConfig) -> Vec<Problem> {
    if !daemon.written {
        return Vec::new();
    }
    let mut problems = Vec::new();
    if let Err(refusal) = daemon.check_serving(daemon.listen, false) {
        problems.push(Problem {
            kind: "daemon",
            message: refusal.to_string(),
        });
    }
    if let Some(files) = &daemon.tls
        && let Err(e) = crate::daemon::tls::check(files)
    {
        problems.push(Problem {
            kind: "daemon",
            message: e.to_string(),
        });
    }
    problems
}

/// A problem of the file itself.
#[derive(Debug, Serialize)]
struct Problem {
    /// `unreadable`, `malformed`, `unknown_kind`, `invalid`, `password`, `overlap`,
    /// `journal` or `daemon`.
    kind: &'static str,
    message: String,
}

/// Whether one resource can be reached, and what was found.
#[derive(Debug, Serialize)]
struct Reachability {
    name: String,
    kind: &'static str,
    ok: bool,
    detail: String,
}

/// Runs `concord config check`.
pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let report = match Config::load(&args.config) {
        Ok(config) => checked(&args, &config)?,
        Err(e) => refused(&args, &e),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    if report.ok {
        return Ok(());
    }
    Err(CheckFailed {
        config: args.config,
        problems: report.problems.len(),
        unreachable: report.resources.iter().filter(|r| !r.ok).count(),
    }
    .into())
}

/// The report of a file [`Config::load`] refused.
fn refused(args: &CheckArgs, e: &ConfigError) -> Report {
    let kind = match e.problem {
        ConfigProblem::Unreadable => "unreadable",
        ConfigProblem::Malformed => "malformed",
        ConfigProblem::UnknownKind { .. } => "unknown_kind",
        ConfigProblem::Overlap(_) => "overlap",
        ConfigProblem::Password { .. } => "password",
        _ => "invalid",
    };
    Report {
        config: args.config.display().to_string(),
        ok: false,
        problems: vec![Problem {
            kind,
            message: e.message.clone(),
        }],
        resources: Vec::new(),
        daemon: None,
    }
}

/// The report of a file that loaded: the journal's directory and every resource.
fn checked(args: &CheckArgs, config: &Config) -> anyhow::Result<Report> {
    let mut problems = Vec::new();
    if let Err(problem) = config.check_journal_directory() {
        problems.push(Problem {
            kind: "journal",
            message: problem.to_string(),
        });
    }
    problems.extend(daemon_problems(&config.daemon));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let resources: Vec<Reachability> = config
        .resources
        .iter()
        .map(|(name, resource)| reachability(&runtime, name, resource))
        .collect();
    let ok = problems.is_empty() && resources.iter().all(|r| r.ok);
    Ok(Report {
        config: args.config.display().to_string(),
        ok,
        problems,
        resources,
        daemon: Some(DaemonSummary::of(&config.daemon)),
    })
}

/// Whether resource `name` can be reached, creating nothing.
fn reachability(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    resource: &ResourceConfig,
) -> Reachability {
    let checked = match resource.check_directory() {
        Some(checked) => checked.map_err(|problem| problem.to_string()),
        None => runtime.block_on(postgres_reachable(name, resource)),
    };
    let (ok, detail) = match checked {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    Reachability {
        name: name.to_string(),
        kind: resource.kind(),
        ok,
        detail,
    }
}

/// One connection to a postgres resource and a read of its schema, bounded by its connect
/// timeout plus its call timeout.
async fn postgres_reachable(name: &str, resource: &ResourceConfig) -> Result<String, String> {
    let ResourceConfig::Postgres {
        url,
        connect_timeout_ms,
        call_timeout_ms,
        ..
    } = resource
    else {
        return Err("not a postgres resource".into());
    };
    let deadline = Duration::from_millis(connect_timeout_ms.saturating_add(*call_timeout_ms));
    let checking = adapters::postgres::check_reachable(name, url, *connect_timeout_ms);
    match tokio::time::timeout(deadline, checking).await {
        Ok(Ok(target)) => Ok(format!(
            "{target}: reachable, the concord schema is installed and it can prepare transactions"
        )),
        // Nothing retries here: say the message, not the class.
        Ok(Err(adapters::ResourceError::Unavailable { message, .. })) => Err(format!(
            "{message}; check that the server is up and reachable at that address, and the url's user, password and database"
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms (connect_timeout_ms + call_timeout_ms)",
            deadline.as_millis()
        )),
    }
}

/// The report as lines for an operator.
fn print_text(report: &Report) {
    println!("configuration {}", report.config);
    for problem in &report.problems {
        // A parser's snippet (line, column, caret) keeps its lines, indented under the problem.
        let message = problem.message.replace('\n', "\n      ");
        println!("  problem ({}): {message}", problem.kind);
    }
    for r in &report.resources {
        let state = if r.ok { "ok" } else { "NOT REACHABLE" };
        println!("  resource {} ({}): {state}: {}", r.name, r.kind, r.detail);
    }
    if let Some(d) = report.daemon.as_ref().filter(|d| d.configured) {
        print_daemon(d);
    }
    let verdict = if report.ok {
        "ok: the configuration is valid and every resource reachable"
    } else {
        "NOT OK"
    };
    println!("{verdict}");
}

/// The daemon's lines of the report.
fn print_daemon(d: &DaemonSummary) {
    let clients = if d.clients.is_empty() {
        "none".to_string()
    } else {
        d.clients.join(", ")
    };
    println!(
        "  daemon: {} on {}; client tokens: {clients}; operator token: {}; unauthenticated: {}",
        d.transport,
        d.listen,
        if d.operator_token { "set" } else { "none" },
        d.unauthenticated
    );
    if let Some(metrics) = &d.metrics_listen {
        println!("  daemon metrics: {metrics}");
    }
    let l = &d.limits;
    println!(
        "  daemon limits: message_bytes_max {}, chunk_bytes_max {}, branches_per_txn_max {}, \
         txns_per_client_max {}, request_timeout_ms {}, drain_timeout_ms {}",
        l.message_bytes_max,
        l.chunk_bytes_max,
        l.branches_per_txn_max,
        l.txns_per_client_max,
        l.request_timeout_ms,
        l.drain_timeout_ms
    );
}
