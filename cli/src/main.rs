//! The `concord` command: one binary for the daemons and the operator commands.
//!
//! Today it holds the demo, the journal tools, the operator's transaction tools and the
//! benchmarks:
//!
//! * `concord demo` runs transactions across files, a mail queue and a key-value store (and
//!   PostgreSQL) and checks each is all-or-nothing ([`demo`]);
//! * `concord txn list|resolve` show and resolve unfinished transactions ([`txn`]);
//! * `concord demo --remote` runs it through a coordinator daemon child from client processes
//!   ([`demo::remote`]);
//! * `concord bench commit` measures commits through the coordinator ([`bench_commit`]), and
//!   with `--remote` embedded against a daemon ([`bench_remote`]);
//! * `concord demo --standby` runs it through a primary daemon that a standby follows, and
//!   compares both sites ([`demo::standby`]); `concord bench replication` measures what a
//!   standby costs the primary, its replay and its lag ([`bench_replication`]);
//! * `concord bench recovery` measures the coordinator's start after a short and a long history
//!   ([`bench_recovery`]);
//! * `concord journal inspect DIR` prints the records of a journal directory ([`inspect`]);
//! * `concord journal verify DIR` checks every record and says whether the journal is sound, has a
//!   torn tail that the next open truncates, or is corrupt ([`verify`]);
//! * `concord bench journal` measures the journal ([`mod@bench`]);
//! * `concord pg install|replicate` set up the database of a postgres resource ([`pg`]);
//! * `concord config check` says whether a configuration is valid and every resource reachable,
//!   changing nothing ([`config_cmd`]);
//! * `concord witness` serves the built-in quorum store: the cluster's epoch and the primary's
//!   lease ([`witness`]).
//!
//! Both journal tools are read-only: they use [`journal::scan::scan_dir`], which takes no lock and
//! changes nothing, so they are safe to run beside a live coordinator (they may then see a tail that
//! is still being written and report it as torn).
//!
//! Conventions every command follows:
//!
//! * Results go to standard output; logs (`tracing`) and progress go to standard error. The
//!   default log level is `warn`: every command's output is its product, and `--log-level info`
//!   (or `RUST_LOG=info`, which takes precedence) shows state changes (resources opened,
//!   recovery, truncated tails). Logs carry colours only when standard error is a terminal;
//!   `--log-format json` writes one JSON object per line.
//! * A failure prints exactly one line `error: …` on standard error, saying each cause once, and
//!   exits non-zero, with the codes in [`EXIT_CODES`] (the one exception to "one line" is a
//!   configuration the TOML parser refused: its snippet — line, column, caret — follows on the
//!   lines below, as the parser wrote it); it never prints a backtrace (a panic hook turns a
//!   closed standard output into a quiet exit 141, a full one into one error line, and a bug
//!   into one line).
//! * `--json` prints one JSON document (or documented NDJSON) with stable field names; they
//!   are listed in `docs/operations.md`, "JSON outputs".
//!
//! # Implementation caveats
//!
//! * The journal tools take a directory, not a configuration: the journal limits a reader needs
//!   (`--record-bytes-max`) are options with the journal's defaults.

mod bench;
mod bench_commit;
mod bench_failover;
mod bench_load;
mod bench_mixed;
mod bench_pg;
mod bench_recovery;
mod bench_remote;
mod bench_replication;
mod compare;
mod config_cmd;
mod daemon;
mod daemon_child;
mod demo;
mod inspect;
mod latency;
mod node;
mod output;
mod pg;
mod remote_txn;
mod role;
mod standby;
mod status;
mod txn;
mod verify;
mod witness;

use std::process::ExitCode;

use adapters::config::{ConfigError, ConfigProblem};
use clap::{Parser, Subcommand};
use journal::{ErrorClass, JournalError};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The exit codes, as shown at the end of `concord --help`.
const EXIT_CODES: &str = "\
Exit codes:
  0  success (for `journal verify`: the journal is sound, possibly with a torn tail)
  1  error: the command could not do its work (missing directory, foreign file, I/O, ...)
  2  usage error (bad arguments)
  3  the journal is corrupt (the message names the segment file and byte offset)
  4  `txn list`: the list is partial, some resource could not be read (each is named);
     `status`: a resource of the daemon is unhealthy (each is named)
  5  `config check`: the configuration is invalid or a resource is not reachable
  6  `compare`: the standby's resources differ from the primary's (each difference is named)
  7  `promote`, `demote`, `switchover`: refused, a step could not be proven safe (nothing
     changed after it; the reason and what to do are printed)
  8  `promote`, `demote`, `switchover`: a step failed half way (run it again: it resumes)
  141 standard output was closed early (`| head`): the command stops quietly";

/// Exit code of a failure other than corruption.
const EXIT_FAILURE: u8 = 1;
/// Exit code when the journal is corrupt.
const EXIT_CORRUPT: u8 = 3;
/// Exit code of a `txn list` that could not read every resource, and of a `status` that found
/// a resource unhealthy.
const EXIT_PARTIAL: u8 = 4;
/// Exit code of a `config check` that found the configuration unusable.
const EXIT_CONFIG_UNUSABLE: u8 = 5;
/// Exit code of a `compare` that found the sites different.
const EXIT_DIFFERENT: u8 = 6;
/// Exit code of a role change a node refused (a step could not be proven safe).
const EXIT_REFUSED: u8 = 7;
/// Exit code of a role change that failed half way (a re-run resumes).
const EXIT_HALF_DONE: u8 = 8;
/// Exit code when standard output was closed by the reader (as a process killed by `SIGPIPE`
/// reports to a shell).
const EXIT_CLOSED_STDOUT: u8 = 141;

/// concord: an XA-style two-phase-commit coordinator with a durable, replicated journal.
#[derive(Parser, Debug)]
#[command(name = "concord", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level (error, warn, info, debug, trace); `RUST_LOG` takes precedence when set.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<LevelFilter>,
    /// Log format on standard error: `text` (colours only on a terminal) or `json` (one object
    /// per line, for machines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How logs are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run transactions across files, a mail queue and a key-value store on embedded defaults
    /// (and PostgreSQL with --postgres), some failing on purpose, and check that every one is
    /// all-or-nothing.
    Demo(demo::DemoArgs),
    /// Read-only tools for a journal directory: inspect its records, verify it.
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Benchmarks that print a ratio against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Unfinished and in-doubt transactions: list them, resolve one by an operator's decision.
    #[command(subcommand)]
    Txn(TxnCommand),
    /// Set up the database of a postgres resource: the concord schema, row capture.
    #[command(subcommand)]
    Pg(PgCommand),
    /// Check a configuration file: its fields, and whether every resource is reachable.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the coordinator daemon: serve the concord.v1 gRPC service over the configuration's
    /// journal and resources until SIGTERM or SIGINT.
    Coordinator(daemon::DaemonArgs),
    /// Run a standby: follow a primary daemon's journal into this site's own journal and
    /// replay its committed transactions into this site's resources, until SIGTERM or SIGINT.
    Standby(standby::StandbyArgs),
    /// Check that a standby's resources equal its primary's, key by key (rows, files by
    /// blake3, mails, keys); exit 6 when they differ.
    Compare(compare::CompareArgs),
    /// Ask a running coordinator daemon for its role, epoch, durable LSN, open and in-doubt
    /// transactions, and each resource's health.
    Status(status::StatusArgs),
    /// Make a standby node the primary: win the next epoch, fence the old primary, finish
    /// replay, resolve what is in doubt, serve (each step journaled; a re-run resumes).
    Promote(role::PromoteArgs),
    /// Make the primary node hand over: stop new work, drain, ship the tail, wait for the
    /// standby's acknowledgement, give up the lease, follow.
    Demote(role::NodeArgs),
    /// A planned handover from the primary node to its standby; prints the window with no
    /// primary.
    Switchover(role::NodeArgs),
    /// Run the witness: the built-in quorum store holding each cluster's epoch and its
    /// primary's lease, until SIGTERM or SIGINT.
    Witness(witness::WitnessArgs),
    /// One client process of `concord demo --remote` (started by the demo, not by hand).
    #[command(hide = true)]
    DemoClient(demo::remote::ClientArgs),
    /// One client process of `concord bench commit --remote` (started by it, not by hand).
    #[command(hide = true)]
    BenchClient(bench_remote::ClientArgs),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a configuration and reach every resource, changing nothing.
    #[command(after_help = config_cmd::AFTER_HELP)]
    Check(config_cmd::CheckArgs),
}

#[derive(Subcommand, Debug)]
enum JournalCommand {
    /// Print the records of a journal, then a summary (read-only: takes no lock, changes nothing).
    #[command(after_help = inspect::AFTER_HELP)]
    Inspect(inspect::InspectArgs),
    /// Check every record and segment of a journal and say whether it is sound (read-only).
    #[command(after_help = verify::AFTER_HELP)]
    Verify(verify::VerifyArgs),
}

#[derive(Subcommand, Debug)]
enum TxnCommand {
    /// Show transactions whose phase 2 is unfinished and prepared branches no decision names.
    List(txn::ListArgs),
    /// Record an operator's commit or rollback decision for a stuck transaction and carry it out.
    Resolve(txn::ResolveArgs),
}

#[derive(Subcommand, Debug)]
enum PgCommand {
    /// Install the concord schema in the resource's database, or upgrade it (idempotent).
    #[command(after_help = pg::AFTER_HELP)]
    Install(pg::InstallArgs),
    /// Capture the changed rows of tables, so that their changes travel in the redo to a standby.
    #[command(after_help = pg::AFTER_HELP)]
    Replicate(pg::ReplicateArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Benchmark the journal, against a baseline measured in the same run.
    Journal(bench::JournalBenchArgs),
    /// Benchmark commits through the coordinator, against a baseline measured in the same run.
    Commit(bench_commit::CommitBenchArgs),
    /// Benchmark transactions with a PostgreSQL branch, against plain and hand-written 2PC
    /// transactions on the same server in the same run.
    Postgres(bench_pg::PgBenchArgs),
    /// Benchmark the coordinator's start after a short and a long history (open_ratio) and on
    /// a journal whose records are all retained.
    Recovery(bench_recovery::RecoveryBenchArgs),
    /// Benchmark a primary daemon without a standby, with an async and a sync standby, a
    /// standby's replay of a backlog, and its lag at half the primary's maximum load.
    Replication(bench_replication::ReplicationBenchArgs),
    /// Benchmark a failover pair: kill -> first commit on the new primary (against a restart
    /// in place), planned switchovers, and no failover under CPU and disk saturation.
    Failover(bench_failover::FailoverBenchArgs),
}

impl Command {
    /// The log level when `RUST_LOG` is not set.
    fn default_log_level(&self) -> LevelFilter {
        match self {
            // A daemon's log is its operator's view: start, signals, stop.
            Command::Coordinator(_) | Command::Standby(_) | Command::Witness(_) => {
                LevelFilter::INFO
            }
            _ => LevelFilter::WARN,
        }
    }
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(on_panic));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failed(&e),
    };
    let level = cli
        .log_level
        .unwrap_or_else(|| cli.command.default_log_level());
    init_logging(level, cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<output::ClosedStdout>().is_some() => {
            ExitCode::from(EXIT_CLOSED_STDOUT)
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// What a command line that does not run a command ends with: a usage error (exit 2) on
/// standard error as clap writes it; help or version text on standard output — checked, so
/// that a full standard output is one `error:` line and exit 1 and a closed one a quiet 141,
/// as for every other output (clap would report success either way).
fn parse_failed(e: &clap::Error) -> ExitCode {
    use std::io::{IsTerminal, Write};
    if e.use_stderr() || std::io::stdout().is_terminal() {
        // On a terminal clap keeps its colours; a terminal is never full.
        e.exit();
    }
    let mut out = std::io::stdout().lock();
    match write!(out, "{}", e.render()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(w) if w.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(EXIT_CLOSED_STDOUT),
        Err(w) => {
            eprintln!("error: write standard output: {w}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Journal(JournalCommand::Inspect(args)) => inspect::run(&args),
        Command::Journal(JournalCommand::Verify(args)) => verify::run(&args),
        Command::Bench(BenchCommand::Journal(args)) => bench::journal(args),
        Command::Bench(BenchCommand::Commit(args)) => bench_commit::run(args),
        Command::Bench(BenchCommand::Postgres(args)) => bench_pg::run(args),
        Command::Bench(BenchCommand::Recovery(args)) => bench_recovery::run(args),
        Command::Bench(BenchCommand::Replication(args)) => bench_replication::run(args),
        Command::Bench(BenchCommand::Failover(args)) => bench_failover::run(args),
        Command::Txn(TxnCommand::List(args)) => txn::list(args),
        Command::Txn(TxnCommand::Resolve(args)) => txn::resolve(args),
        Command::Pg(PgCommand::Install(args)) => pg::install(args),
        Command::Pg(PgCommand::Replicate(args)) => pg::replicate(args),
        Command::Config(ConfigCommand::Check(args)) => config_cmd::check(args),
        Command::Coordinator(args) => daemon::run(args),
        Command::Standby(args) => standby::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Status(args) => status::run(args),
        Command::Promote(args) => role::promote(args),
        Command::Demote(args) => role::demote(args),
        Command::Switchover(args) => role::switchover(args),
        Command::Witness(args) => witness::run(args),
        Command::DemoClient(args) => demo::remote::client(args),
        Command::BenchClient(args) => bench_remote::client(args),
        Command::Demo(args) => match demo::run(args)? {
            true => Ok(()),
            false => anyhow::bail!("atomicity check failed (see the lines above)"),
        },
    }
}

/// Logs to standard error, filtered by `RUST_LOG` (an invalid filter falls back to `default`),
/// with colours only when standard error is a terminal.
fn init_logging(default: LevelFilter, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::builder()
        .with_default_directive(default.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// What a panic shows an operator: never a backtrace. Standard output closed by its reader
/// (`| head`) ends the command quietly; standard output that cannot be written (a full disk)
/// is one `error:` line; anything else is a bug, said as such in one line.
fn on_panic(info: &std::panic::PanicHookInfo<'_>) {
    let message = info
        .payload()
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| info.payload().downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    if message.contains("failed printing to stdout") {
        if message.contains("Broken pipe") {
            std::process::exit(i32::from(EXIT_CLOSED_STDOUT));
        }
        let cause = message.rsplit(": ").next().unwrap_or(message);
        eprintln!("error: write standard output: {cause}");
        std::process::exit(i32::from(EXIT_FAILURE));
    }
    let place = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    eprintln!("error: internal error (a bug in concord; please report it): {message}{place}");
}

/// The error and its causes, `: `-separated, each said once, on one line — except the snippet
/// of a configuration the TOML parser refused (line, column, caret), whose lines are kept as the
/// parser wrote them.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut said = String::new();
    for cause in e.chain() {
        let flat = flatten(&cause.to_string());
        // Say each thing once: a context that already quotes its cause.
        if said.contains(&flat) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
            said.push_str(": ");
        }
        out.push_str(&cause_text(cause).unwrap_or_else(|| flat.clone()));
        said.push_str(&flat);
    }
    out
}

/// The text with its line breaks turned into spaces.
fn flatten(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// The multi-line text of a configuration syntax error (`configuration PATH:` and the parser's
/// snippet on the lines below), or `None` for any other cause.
fn cause_text(cause: &(dyn std::error::Error + 'static)) -> Option<String> {
    let config = cause.downcast_ref::<ConfigError>()?;
    let snippet =
        matches!(config.problem, ConfigProblem::Malformed) && config.message.contains('\n');
    snippet.then(|| {
        format!(
            "configuration {}:\n{}",
            config.path.display(),
            config.message.trim_end()
        )
    })
}

/// [`EXIT_CORRUPT`] when the journal is corrupt, [`EXIT_FAILURE`] otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<txn::Partial>().is_some() || e.downcast_ref::<status::Unhealthy>().is_some()
    {
        return EXIT_PARTIAL;
    }
    if e.downcast_ref::<config_cmd::CheckFailed>().is_some() {
        return EXIT_CONFIG_UNUSABLE;
    }
    if e.downcast_ref::<compare::Different>().is_some() {
        return EXIT_DIFFERENT;
    }
    if e.downcast_ref::<role::Refused>().is_some() {
        return EXIT_REFUSED;
    }
    if e.downcast_ref::<role::Failed>().is_some() {
        return EXIT_HALF_DONE;
    }
    let corrupt = e
        .chain()
        .filter_map(|cause| cause.downcast_ref::<JournalError>())
        .any(|j| j.class() == ErrorClass::Corrupt);
    if corrupt { EXIT_CORRUPT } else { EXIT_FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn an_error_says_each_thing_once() {
        let cause = anyhow::anyhow!("/d is locked by another process; stop it first");
        let e = cause.context("open /d: /d is locked by another process; stop it first");
        assert_eq!(
            one_line(&e),
            "open /d: /d is locked by another process; stop it first"
        );
        let e = anyhow::anyhow!("disk full").context("write x");
        assert_eq!(one_line(&e), "write x: disk full");
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn corruption_has_its_own_exit_code() {
        let corrupt = anyhow::Error::from(JournalError::Corrupt {
            segment: "00000000000000000001.seg".into(),
            offset: 64,
            reason: "crc32 mismatch".into(),
        });
        assert_eq!(exit_code(&corrupt), EXIT_CORRUPT);
        let missing = anyhow::Error::from(JournalError::DirMissing { path: "x".into() });
        assert_eq!(exit_code(&missing), EXIT_FAILURE);
    }

    #[test]
    fn a_configuration_syntax_error_keeps_its_snippet_lines() {
        let snippet = "TOML parse error at line 3, column 13\n  |\n3 | [resources.x\n  |             ^\nunclosed table, expected `]`\n";
        let config = ConfigError {
            path: "/etc/concord.toml".into(),
            message: snippet.to_string(),
            problem: ConfigProblem::Malformed,
        };
        let e = anyhow::Error::from(config).context("open the configuration");
        assert_eq!(
            one_line(&e),
            format!(
                "open the configuration: configuration /etc/concord.toml:\n{}",
                snippet.trim_end()
            )
        );
        let invalid = ConfigError {
            path: "/c.toml".into(),
            message: "field x\nis bad".to_string(),
            problem: ConfigProblem::Invalid,
        };
        assert_eq!(
            one_line(&anyhow::Error::from(invalid)),
            "configuration /c.toml: field x is bad"
        );
    }

    #[test]
    fn errors_print_on_one_line() {
        let e = anyhow::anyhow!("first\nsecond").context("outer");
        assert_eq!(one_line(&e), "outer: first second");
    }
}
