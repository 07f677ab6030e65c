//! `concord promote | demote | switchover`: the operator's role changes, sent to a node's
//! `concord.v1.Failover` service (the node does the work; see `node`).
//!
//! Each prints the steps as the node did them — one line per step: its name, `done`,
//! `already done`, `skipped`, `refused` or `failed`, how long it took and what was done — then
//! one line of outcome. `--json` prints the node's reply as one JSON object instead.
//!
//! Exit codes: 0 when done or already done (a re-run of a finished change is a success);
//! 7 when a step could not be proven safe and the node stopped before it (nothing after it
//! changed; the reason and what to do are printed); 8 when a step failed half way (a re-run
//! resumes after the last step done); 1 when the node could not be asked at all.
//!
//! `--force` is for an operator who accepts a risk the node names: with `promote`, the guards
//! (this node's health, its lag behind the primary) are not checked and a live primary's lease
//! is taken over (the node still waits that lease out before serving); with `demote` and
//! `switchover`, the standby's acknowledgement of the last records is not waited for. The
//! reply's `risk` says what was risked.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use proto::client::{ClientTls, Credentials, Token};
use proto::v1;
use serde::Serialize;

use crate::status::URL_DEFAULT;

/// How long a role change may take before the command stops waiting (the node goes on).
const CHANGE_TIMEOUT_MS: u64 = 180_000;

/// Options shared by the three commands.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The node to ask: `http://HOST:PORT` or `https://HOST:PORT` (its gRPC address).
    #[arg(long, default_value = URL_DEFAULT)]
    pub node: String,
    /// A file holding the node's operator token (first line), when it checks tokens.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the node's certificate; for an `https` address.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Go on when a step cannot be proven safe; the reply says what that risks.
    #[arg(long)]
    pub force: bool,
    /// Print the node's reply as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `concord promote`.
#[derive(clap::Args, Debug)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Change nothing: say what promoting now would lose, in global transactions and bytes.
    #[arg(long)]
    pub dry_run: bool,
}

/// A role change the node refused before changing anything. Exit code 7.
#[derive(Debug, thiserror::Error)]
#[error("{reason}; {what_to_do}")]
pub struct Refused {
    /// Why.
    pub reason: String,
    /// What to do.
    pub what_to_do: String,
}

/// A role change that failed half way. Exit code 8.
#[derive(Debug, thiserror::Error)]
#[error("{reason}; {what_to_do}")]
pub struct Failed {
    /// Why.
    pub reason: String,
    /// What to do.
    pub what_to_do: String,
}

/// What `--json` prints.
#[derive(Serialize)]
struct ReplyJson<'a> {
    command: &'a str,
    node: &'a str,
    outcome: &'static str,
    epoch: u64,
    primary: &'a str,
    window_ms: u64,
    reason: &'a str,
    what_to_do: &'a str,
    risk: &'a str,
    steps: Vec<StepJson<'a>>,
    loss: Option<LossJson>,
}

#[derive(Serialize)]
struct StepJson<'a> {
    step: &'a str,
    outcome: &'a str,
    ms: u64,
    detail: &'a str,
}

#[derive(Serialize)]
struct LossJson {
    primary_reported: bool,
    report_age_ms: u64,
    primary_durable_lsn: u64,
    primary_committed_txns: u64,
    standby_received_lsn: u64,
    standby_committed_txns: u64,
    txns: u64,
    records: u64,
    bytes: u64,
}

/// Runs `concord promote`.
pub fn promote(args: PromoteArgs) -> anyhow::Result<()> {
    let request = v1::PromoteRequest {
        force: args.node.force,
        dry_run: args.dry_run,
        operator: operator(),
        handover_epoch: 0,
    };
    call(&args.node, "promote", |mut client| async move {
        client.promote(request).await
    })
}

/// Runs `concord demote`.
pub fn demote(args: NodeArgs) -> anyhow::Result<()> {
    let request = v1::DemoteRequest {
        force: args.force,
        operator: operator(),
    };
    call(&args, "demote", |mut client| async move {
        client.demote(request).await
    })
}

/// Runs `concord switchover`.
pub fn switchover(args: NodeArgs) -> anyhow::Result<()> {
    let request = v1::SwitchoverRequest {
        force: args.force,
        operator: operator(),
    };
    call(&args, "switchover", |mut client| async move {
        client.switchover(request).await
    })
}

/// Who asks, for the node's journal: the user's name.
fn operator() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "an operator".into())
}

fn credentials(args: &NodeArgs) -> anyhow::Result<Credentials> {
    let mut credentials = Credentials::none();
    if let Some(path) = &args.token_file {
        credentials = credentials.with_token(Token::from_file(path)?);
    }
    if let Some(ca) = &args.tls_ca {
        credentials = credentials.with_tls(ClientTls::with_ca_file(ca)?);
    }
    Ok(credentials)
}

fn call<F, Fut>(args: &NodeArgs, command: &str, send: F) -> anyhow::Result<()>
where
    F: FnOnce(proto::client::FailoverClient) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<v1::RoleChangeReply>, tonic::Status>>,
{
    let credentials = credentials(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let reply = runtime.block_on(async {
        let client = proto::client::connect_failover(&args.node, &credentials)
            .await
            .with_context(|| format!("no node answers at {}", args.node))?;
        match tokio::time::timeout(Duration::from_millis(CHANGE_TIMEOUT_MS), send(client)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Err(anyhow::anyhow!(
                "{} does not serve failover: it has no [failover] table",
                args.node
            )),
            Ok(Err(status)) => Err(anyhow::anyhow!("{}: {}", args.node, status.message())),
            Err(_) => Err(anyhow::anyhow!(
                "{} did not answer within {CHANGE_TIMEOUT_MS} ms; the change may still be running: see `concord status --url {}`",
                args.node,
                args.node
            )),
        }
    })?;
    print_reply(args, command, &reply)?;
    match v1::ChangeOutcome::try_from(reply.outcome) {
        Ok(
            v1::ChangeOutcome::Done | v1::ChangeOutcome::AlreadyDone | v1::ChangeOutcome::DryRun,
        ) => Ok(()),
        Ok(v1::ChangeOutcome::Refused) => Err(Refused {
            reason: reply.reason,
            what_to_do: reply.what_to_do,
        }
        .into()),
        _ => Err(Failed {
            reason: reply.reason,
            what_to_do: reply.what_to_do,
        }
        .into()),
    }
}

fn outcome_name(outcome: i32) -> &'static str {
    match v1::ChangeOutcome::try_from(outcome) {
        Ok(v1::ChangeOutcome::Done) => "done",
        Ok(v1::ChangeOutcome::AlreadyDone) => "already_done",
        Ok(v1::ChangeOutcome::Refused) => "refused",
        Ok(v1::ChangeOutcome::DryRun) => "dry_run",
        _ => "failed",
    }
}

fn print_reply(args: &NodeArgs, command: &str, reply: &v1::RoleChangeReply) -> anyhow::Result<()> {
    if args.json {
        let json = ReplyJson {
            command,
            node: &args.node,
            outcome: outcome_name(reply.outcome),
            epoch: reply.epoch,
            primary: &reply.primary,
            window_ms: reply.window_ms,
            reason: &reply.reason,
            what_to_do: &reply.what_to_do,
            risk: &reply.risk,
            steps: reply
                .steps
                .iter()
                .map(|s| StepJson {
                    step: &s.step,
                    outcome: &s.outcome,
                    ms: s.ms,
                    detail: &s.detail,
                })
                .collect(),
            loss: reply.loss.as_ref().map(|l| LossJson {
                primary_reported: l.primary_reported,
                report_age_ms: l.report_age_ms,
                primary_durable_lsn: l.primary_durable_lsn,
                primary_committed_txns: l.primary_committed_txns,
                standby_received_lsn: l.standby_received_lsn,
                standby_committed_txns: l.standby_committed_txns,
                txns: l.txns,
                records: l.records,
                bytes: l.bytes,
            }),
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let mut out = String::new();
    for step in &reply.steps {
        out.push_str(&format!(
            "{:<12} {:<13} {:>6} ms  {}\n",
            step.step, step.outcome, step.ms, step.detail
        ));
    }
    let outcome = outcome_name(reply.outcome).replace('_', " ");
    out.push_str(&format!("{command}: {outcome}"));
    if reply.epoch != 0 {
        out.push_str(&format!(" (epoch {})", reply.epoch));
    }
    if !reply.primary.is_empty() {
        out.push_str(&format!("; the primary is {}", reply.primary));
    }
    if reply.window_ms != 0 {
        out.push_str(&format!("; no primary for {} ms", reply.window_ms));
    }
    out.push('\n');
    if let Some(loss) = &reply.loss
        && reply.outcome == v1::ChangeOutcome::DryRun as i32
    {
        out.push_str(&format!(
            "would lose: {} global transactions, {} records, {} bytes{}\n",
            loss.txns,
            loss.records,
            loss.bytes,
            if loss.primary_reported {
                format!(
                    " (the primary reported {} committed up to lsn {} {} ms ago; this standby holds {} up to lsn {})",
                    loss.primary_committed_txns,
                    loss.primary_durable_lsn,
                    loss.report_age_ms,
                    loss.standby_committed_txns,
                    loss.standby_received_lsn
                )
            } else {
                " (the primary's position is unknown: no report from it)".into()
            }
        ));
    }
    if !reply.risk.is_empty() {
        out.push_str(&format!("risk: {}\n", reply.risk));
    }
    if !reply.what_to_do.is_empty() && reply.outcome == v1::ChangeOutcome::Done as i32 {
        out.push_str(&format!("next: {}\n", reply.what_to_do));
    }
    print!("{out}");
    Ok(())
}
