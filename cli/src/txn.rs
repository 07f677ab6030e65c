//! `concord txn list` and `concord txn resolve`: the operator's view of unfinished transactions.
//!
//! `list` changes nothing: it reads the journal with the read-only scan (no lock, so it works
//! beside a running application) and asks each resource which branches it holds prepared (the
//! branch logs of files and mail resources, PostgreSQL's `pg_prepared_xacts`; a kv resource's
//! prepared tree only when no running process holds its sled directory — otherwise it says so
//! on standard error and lists the others). It shows
//! transactions whose decision is durable but whose phase 2 has not finished (no `End` yet), and
//! prepared branches that no decision names (in doubt until the coordinator's next recovery rolls
//! them back). `resolve` records an operator's decision in the journal and carries it out, for a
//! transaction stuck because a resource is lost for good; it opens the journal, so the
//! application must be stopped first (embedded mode holds the journal's lock).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use adapters::Xid;
use anyhow::Context;
use coordinator::record::CoordRecord;
use participant::{Concord, Config};
use serde::Serialize;

/// Where the configuration comes from.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The configuration file.
    #[arg(long, conflicts_with = "data")]
    pub config: Option<PathBuf>,
    /// A data directory with the embedded defaults (what `concord demo --data DIR` uses).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

impl Target {
    fn load(&self) -> anyhow::Result<Config> {
        match (&self.config, &self.data) {
            (Some(path), _) => Ok(Config::load(path)?),
            (None, Some(data)) => Ok(Config::embedded(data)),
            (None, None) => Ok(Config::load(std::path::Path::new("concord.toml"))?),
        }
    }
}

/// Options of `concord txn list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// One JSON object per transaction.
    #[arg(long)]
    json: bool,
}

/// Options of `concord txn resolve`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("decision").required(true).args(["commit", "rollback"])))]
pub struct ResolveArgs {
    /// The transaction.
    xid: String,
    /// Commit every branch still prepared, and close the transaction.
    #[arg(long)]
    commit: bool,
    /// Roll back every branch still prepared (refused once a commit decision is durable).
    #[arg(long)]
    rollback: bool,
    /// Who decides (recorded in the journal; default: $USER).
    #[arg(long)]
    operator: Option<String>,
    #[command(flatten)]
    target: Target,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Listed {
    xid: String,
    state: &'static str,
    age_s: Option<f64>,
    branches: Vec<String>,
}

/// Runs `concord txn list`.
pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let config = args.target.load()?;
    let journal_dir = config.data_dir.join("journal");
    let mut open: BTreeMap<Xid, (u64, Vec<String>, &'static str)> = BTreeMap::new();
    let mut bad = None;
    if journal_dir.exists() {
        journal::scan::scan_dir(
            &journal_dir,
            journal::JournalConfig::default().record_bytes_max,
            |rec| match CoordRecord::decode(rec.kind, &rec.payload) {
                Ok(CoordRecord::Commit {
                    xid,
                    at_ms,
                    branches,
                }) => {
                    let names = branches.into_iter().map(|(n, _)| n).collect();
                    open.insert(xid, (at_ms, names, "committed, phase 2 unfinished"));
                }
                Ok(CoordRecord::OnePhase {
                    xid,
                    at_ms,
                    resource,
                    ..
                }) => {
                    let state = "one-phase commit, outcome not yet journaled";
                    open.insert(xid, (at_ms, vec![resource], state));
                }
                Ok(CoordRecord::End { xid } | CoordRecord::Abort { xid, .. }) => {
                    open.remove(&xid);
                }
                Ok(CoordRecord::Resolve { .. }) => {}
                Err(e) => bad = Some(format!("record {}: {e}", rec.lsn)),
            },
        )?;
    }
    if let Some(bad) = bad {
        anyhow::bail!("{bad}");
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let mut rows: Vec<Listed> = open
        .iter()
        .map(|(xid, (at_ms, branches, state))| Listed {
            xid: xid.to_string(),
            state,
            age_s: Some(now_ms.saturating_sub(*at_ms) as f64 / 1000.0),
            branches: branches.clone(),
        })
        .collect();
    let prepared = prepared_branches(&config)?;
    for (xid, resources) in prepared {
        if open.contains_key(&xid) {
            continue;
        }
        rows.push(Listed {
            xid: xid.to_string(),
            state: "prepared, no decision (in doubt)",
            age_s: None,
            branches: resources,
        });
    }
    if args.json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(());
    }
    if rows.is_empty() {
        println!("no unfinished transactions");
    }
    for row in rows {
        let age = row
            .age_s
            .map(|a| format!("{a:.1}s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:<34} {:>9}  {}",
            row.xid,
            row.state,
            age,
            row.branches.join(",")
        );
    }
    Ok(())
}

/// The prepared branches of every configured resource, read without opening the resources.
fn prepared_branches(config: &Config) -> anyhow::Result<BTreeMap<Xid, Vec<String>>> {
    let mut out: BTreeMap<Xid, Vec<String>> = BTreeMap::new();
    let mut runtime = None;
    for (name, resource) in &config.resources {
        match resource {
            participant::ResourceConfig::Files { root, .. } => {
                let prepared = adapters::files::prepared_on_disk(root)
                    .with_context(|| format!("read resource {name}"))?;
                for xid in prepared {
                    out.entry(xid).or_default().push(name.clone());
                }
            }
            participant::ResourceConfig::Mail { maildir, .. } => {
                let prepared = adapters::mail::prepared_on_disk(maildir)
                    .with_context(|| format!("read resource {name}"))?;
                for xid in prepared {
                    out.entry(xid).or_default().push(name.clone());
                }
            }
            participant::ResourceConfig::Kv { dir, .. } => {
                let prepared = adapters::kv::prepared_on_disk(dir)
                    .with_context(|| format!("read resource {name}"))?;
                let Some(prepared) = prepared else {
                    eprintln!(
                        "note: resource {name}: the sled directory {} is open in a running process; its prepared branches are not listed (sled lets one process read it at a time)",
                        dir.display()
                    );
                    continue;
                };
                for xid in prepared {
                    out.entry(xid).or_default().push(name.clone());
                }
            }
            participant::ResourceConfig::Postgres { url, .. } => {
                if runtime.is_none() {
                    runtime = Some(
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?,
                    );
                }
                let Some(rt) = runtime.as_ref() else {
                    continue;
                };
                let prepared = rt
                    .block_on(adapters::postgres::prepared_in(name, url, config.node))
                    .with_context(|| format!("read resource {name}"))?;
                for branch in prepared {
                    out.entry(branch.xid)
                        .or_default()
                        .push(format!("{name} (gid {})", branch.gid));
                }
            }
        }
    }
    Ok(out)
}

/// Runs `concord txn resolve`.
pub fn resolve(args: ResolveArgs) -> anyhow::Result<()> {
    let xid: Xid = args.xid.parse()?;
    let config = args.target.load()?;
    let operator = args
        .operator
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let concord = Concord::open(config).await?;
        // Let recovery finish what it can first (it rolls back undecided branches); a
        // transaction stuck on a lost resource keeps it busy, so the wait is bounded.
        concord.wait_idle(Duration::from_secs(3)).await;
        let result = concord.coordinator().resolve(&xid, args.commit, &operator).await;
        concord.close(Duration::from_secs(5)).await;
        result?;
        let decision = if args.commit { "commit" } else { "rollback" };
        if args.json {
            println!("{}", serde_json::json!({ "xid": xid.to_string(), "decision": decision, "operator": operator }));
        } else {
            println!("{xid}: {decision} recorded by {operator} and carried out");
        }
        Ok(())
    })
}
