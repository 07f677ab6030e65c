//! `concord txn list` and `concord txn resolve`: the operator's view of unfinished transactions.
//!
//! `list` changes nothing: it reads the journal with the read-only scan (no lock, so it works
//! beside a running application) and asks each resource which branches it holds prepared (the
//! branch logs of files and mail resources, PostgreSQL's `pg_prepared_xacts`; a kv resource's
//! prepared tree only when no running process holds its sled directory — otherwise it says so
//! on standard error and lists the others). It shows
//! transactions whose decision is durable but whose phase 2 has not finished (no `End` yet), and
//! prepared branches that no decision names (in doubt until the coordinator's next recovery rolls
//! them back), and prepared branches of transactions the journal says committed (a heuristic
//! hazard: the next recovery commits them again). `resolve` records an operator's decision in the
//! journal and carries it out ([`coordinator::resolve`]), for a transaction stuck because a
//! resource is unreachable or lost for good. It opens the journal (so the application must be
//! stopped first: embedded mode holds the journal's lock), creates nothing where there is no
//! journal, runs no recovery, and opens only the resources the xid involves — the decision's
//! writers for a commit, the resources that hold a branch of it prepared for a rollback — so an
//! unreachable database that the xid does not involve does not stand in the way. It prints
//! what became of each branch and exits non-zero while any branch was not reached.
//!
//! Each row of `list` says whether the work is **in flight** (journaled less than the
//! configuration's `txn_timeout_ms` ago: the coordinator is most likely still driving it) or
//! **in doubt** (older: it waits for a resource or an operator); `--min-age DURATION` keeps only
//! the older ones. A prepared branch that no decision names has no known age — the resources'
//! branch logs do not say when they prepared — so it is shown as `unknown` and always listed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use adapters::Xid;
use anyhow::Context;
use coordinator::ledger::Ledger;
use coordinator::resolve::{BranchOutcome, ResolveRequest};
use participant::Config;
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
    /// One JSON array of objects, one per transaction (`[]` when there is none).
    #[arg(long)]
    json: bool,
    /// List only transactions at least this old (a number and a unit: `500ms`, `30s`, `5m`,
    /// `2h`, `1d`); rows whose age is unknown (prepared branches no decision names) are kept.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    min_age: Option<u64>,
}

/// The milliseconds of a duration written as a number and a unit (`ms`, `s`, `m`, `h`, `d`).
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: write a number and a unit (ms, s, m, h, d), e.g. 30s or 5m"
            ));
        }
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: it has no number before its unit"))?;
    number
        .checked_mul(unit_ms)
        .ok_or_else(|| format!("{text:?} is too long a duration"))
}

/// An xid as `txn list` prints it; anything else is a usage error.
fn parse_xid(text: &str) -> Result<Xid, String> {
    text.parse().map_err(|_| {
        format!("{text:?} is not an xid (n<node>e<epoch>s<seq>, as `concord txn list` shows it)")
    })
}

/// Options of `concord txn resolve`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("decision").required(true).args(["commit", "rollback"])))]
pub struct ResolveArgs {
    /// The transaction (`n<node>e<epoch>s<seq>`, as `concord txn list` shows it).
    #[arg(value_parser = parse_xid)]
    xid: Xid,
    /// Commit every branch still prepared, and close the transaction.
    #[arg(long)]
    commit: bool,
    /// Roll back every branch still prepared (refused once a commit decision is durable).
    #[arg(long)]
    rollback: bool,
    /// Who decides (recorded in the journal; default: the user this process runs as, by its
    /// uid — not `$USER`, which anyone can set).
    #[arg(long)]
    operator: Option<String>,
    /// End the branch in this resource without its answer, because the resource is lost for
    /// good (recorded with the operator and `--reason`, reported as a heuristic hazard); may be
    /// repeated.
    #[arg(long, value_name = "RESOURCE", requires = "reason")]
    forget: Vec<String>,
    /// Why the branches of `--forget` are forgotten (recorded in the journal).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    target: Target,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// One row of `txn list`, as `--json` prints it (and the daemon's `ListInDoubt` answers it).
#[derive(Serialize)]
pub(crate) struct Listed {
    pub(crate) xid: String,
    /// What is unfinished, in words.
    pub(crate) state: String,
    /// Whether the work may still be moving by itself (see [`Standing`]).
    pub(crate) standing: Standing,
    /// Milliseconds since the decision was journaled; `None` when unknown (a prepared branch
    /// that no decision names).
    pub(crate) age_ms: Option<u64>,
    pub(crate) branches: Vec<String>,
}

/// In flight or in doubt, by age against the configuration's `txn_timeout_ms`.
#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Standing {
    /// Younger than the transaction timeout: the coordinator is probably still driving it.
    InFlight,
    /// At least the transaction timeout old: stuck until a resource comes back or an operator
    /// resolves it.
    InDoubt,
    /// The age is not known (a prepared branch that no decision names): it may be a prepare
    /// still waiting for its decision or a branch the next recovery rolls back.
    Unknown,
}

impl Standing {
    fn of(age_ms: Option<u64>, txn_timeout_ms: u64) -> Standing {
        match age_ms {
            Some(age) if age < txn_timeout_ms => Standing::InFlight,
            Some(_) => Standing::InDoubt,
            None => Standing::Unknown,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Standing::InFlight => "in flight",
            Standing::InDoubt => "in doubt",
            Standing::Unknown => "unknown",
        }
    }
}

/// Runs `concord txn list`.
pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let config = args.target.load()?;
    let journal_dir = config.data_dir.join("journal");
    if !journal_dir.is_dir() {
        anyhow::bail!(
            "no concord journal at {}: this is not the data directory of a concord configuration (check --data or --config)",
            journal_dir.display()
        );
    }
    let mut ledger = Ledger::new();
    let mut bad = None;
    journal::scan::scan_dir(
        &journal_dir,
        journal::JournalConfig::default().record_bytes_max,
        |rec| {
            if bad.is_none()
                && let Err(e) = ledger.apply_raw(rec.lsn, rec.kind, &rec.payload)
            {
                bad = Some(e);
            }
        },
    )?;
    if let Some(bad) = bad {
        anyhow::bail!("{bad}");
    }
    let mut open: BTreeMap<Xid, (u64, Vec<String>, &'static str)> = BTreeMap::new();
    for (xid, _, names) in ledger.open_commits() {
        let at_ms = decided_at(&ledger, &xid);
        open.insert(xid, (at_ms, names, "committed, phase 2 unfinished"));
    }
    for (xid, _, resource, _) in ledger.open_one_phase() {
        let at_ms = decided_at(&ledger, &xid);
        let state = "one-phase commit, outcome not yet journaled";
        open.insert(xid, (at_ms, vec![resource.to_string()], state));
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let timeout_ms = config.txn_timeout_ms;
    let mut rows: Vec<Listed> = open
        .iter()
        .map(|(xid, (at_ms, branches, state))| {
            let age_ms = Some(now_ms.saturating_sub(*at_ms));
            Listed {
                xid: xid.to_string(),
                state: state.to_string(),
                standing: Standing::of(age_ms, timeout_ms),
                age_ms,
                branches: branches.clone(),
            }
        })
        .collect();
    let (prepared, mut unreadable) = prepared_branches(&config)?;
    // A resource the journal names but the configuration lacks cannot be asked at all.
    let unconfigured: BTreeSet<&String> = open
        .values()
        .flat_map(|(_, names, _)| names)
        .filter(|name| !config.resources.contains_key(*name))
        .collect();
    for name in unconfigured {
        unreadable.push((
            name.clone(),
            "the journal names it, but the configuration has no resource of that name (add it to read its prepared branches)".to_string(),
        ));
    }
    rows.extend(prepared_rows(&ledger, prepared, |xid| {
        open.contains_key(xid)
    }));
    let before_cut = rows.len();
    if let Some(min_age_ms) = args.min_age {
        rows.retain(|row| row.age_ms.is_none_or(|age| age >= min_age_ms));
    }
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else if rows.is_empty() && before_cut > 0 {
        println!(
            "no unfinished transactions older than --min-age ({before_cut} younger not shown)"
        );
    } else {
        print_rows(&rows);
    }
    if unreadable.is_empty() {
        return Ok(());
    }
    for (name, why) in &unreadable {
        eprintln!(
            "note: resource {name} could not be read, so its prepared branches are not listed: {why}"
        );
    }
    Err(Partial {
        resources: unreadable.into_iter().map(|(name, _)| name).collect(),
    }
    .into())
}

/// `txn list` could not read every resource: what it printed is what the journal and the
/// reachable resources know. Exit code 4.
#[derive(Debug)]
pub struct Partial {
    /// The resources not read.
    pub resources: Vec<String>,
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let noun = if self.resources.len() == 1 {
            "resource"
        } else {
            "resources"
        };
        write!(
            f,
            "the list is partial: {noun} {} could not be read (see the notes above)",
            self.resources.join(", ")
        )
    }
}

impl std::error::Error for Partial {}

fn print_rows(rows: &[Listed]) {
    if rows.is_empty() {
        println!("no unfinished transactions");
        return;
    }
    println!(
        "{:<28} {:<9} {:>9}  {:<48} BRANCHES",
        "XID", "STANDING", "AGE", "STATE"
    );
    for row in rows {
        let age = row
            .age_ms
            .map(|a| format!("{:.1}s", a as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:<9} {:>9}  {:<48} {}",
            row.xid,
            row.standing.word(),
            age,
            row.state,
            row.branches.join(",")
        );
    }
}

/// The rows of prepared branches (`prepared`: by xid, the resources holding one) that are not
/// `listed` already: what the journal says of each (an operator's resolution not yet carried
/// out, a decided commit, or no decision), with an unknown age.
pub(crate) fn prepared_rows(
    ledger: &Ledger,
    prepared: BTreeMap<Xid, Vec<String>>,
    listed: impl Fn(&Xid) -> bool,
) -> Vec<Listed> {
    prepared
        .into_iter()
        .filter(|(xid, _)| !listed(xid))
        .map(|(xid, branches)| Listed {
            xid: xid.to_string(),
            state: prepared_state(ledger, &xid),
            standing: Standing::Unknown,
            age_ms: None,
            branches,
        })
        .collect()
}

/// What the journal says of a prepared branch of `xid`, in words.
fn prepared_state(ledger: &Ledger, xid: &Xid) -> String {
    match ledger.entry(xid).and_then(|e| e.resolution.as_ref()) {
        // An operator's decision that could not be carried out in this resource yet.
        Some(r) => format!(
            "prepared; {} resolved it {}, not yet carried out here",
            r.operator,
            if r.commit { "commit" } else { "rollback" }
        ),
        None if ledger.must_commit(xid) => {
            "prepared, but decided committed (heuristic hazard)".to_string()
        }
        None => "prepared, no decision (in doubt)".to_string(),
    }
}

/// When the decision of `xid` was made (milliseconds since the Unix epoch; 0 if unknown).
fn decided_at(ledger: &Ledger, xid: &Xid) -> u64 {
    ledger
        .entry(xid)
        .and_then(|e| e.decision.as_ref())
        .map_or(0, |d| d.at_ms())
}

/// The resources whose prepared branches could not be read, with why.
type Unreadable = Vec<(String, String)>;

/// The prepared branches of every configured resource, read without opening the resources, and
/// the resources that could not be read (down, or held by a running process).
fn prepared_branches(config: &Config) -> anyhow::Result<(BTreeMap<Xid, Vec<String>>, Unreadable)> {
    let mut out: BTreeMap<Xid, Vec<String>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for (name, resource) in &config.resources {
        if let Err(e) = read_prepared(config, &runtime, name, resource, &mut out) {
            unreadable.push((name.clone(), unnamed(name, format!("{e:#}"))));
        }
    }
    Ok((out, unreadable))
}

/// Adds `resource`'s prepared branches to `out`.
fn read_prepared(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    resource: &participant::ResourceConfig,
    out: &mut BTreeMap<Xid, Vec<String>>,
) -> anyhow::Result<()> {
    use participant::ResourceConfig;
    let mut add = |xid: Xid, label: String| out.entry(xid).or_default().push(label);
    match resource {
        ResourceConfig::Files { root, .. } => {
            for xid in adapters::files::prepared_on_disk(root)? {
                add(xid, name.to_string());
            }
        }
        ResourceConfig::Mail { maildir, .. } => {
            for xid in adapters::mail::prepared_on_disk(maildir)? {
                add(xid, name.to_string());
            }
        }
        ResourceConfig::Kv { dir, .. } => {
            let Some(prepared) = adapters::kv::prepared_on_disk(dir)? else {
                anyhow::bail!(
                    "the sled directory {} is open in a running process (sled lets one process read it at a time)",
                    dir.display()
                );
            };
            for xid in prepared {
                add(xid, name.to_string());
            }
        }
        ResourceConfig::Postgres { url, .. } => {
            let prepared =
                runtime.block_on(adapters::postgres::prepared_in(name, url, config.node))?;
            for branch in prepared {
                add(branch.xid, format!("{name} (gid {})", branch.gid));
            }
        }
    }
    Ok(())
}

/// Runs `concord txn resolve`.
pub fn resolve(args: ResolveArgs) -> anyhow::Result<()> {
    let xid = args.xid;
    let config = args.target.load()?;
    let operator = args.operator.clone().unwrap_or_else(os_user);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let journal_dir = config.data_dir.join("journal");
    if !holds_segments(&journal_dir) {
        anyhow::bail!(
            "no concord journal at {} (no such directory, or no segment file in it): this is not the data directory of a concord configuration (check --data or --config); nothing was changed",
            journal_dir.display()
        );
    }
    let journal = journal::Journal::open(&journal_dir, journal::JournalConfig::default())
        .with_context(|| format!("open the journal {}", journal_dir.display()))?;
    let ledger = coordinator::runtime::read_ledger(&journal)?;
    let epoch = adapters::Epoch(config.epoch);
    runtime.block_on(async {
        let (names, mut unopened) = involved(&config, &ledger, &xid, args.commit).await;
        let mut resources = BTreeMap::new();
        for name in names {
            let Some(resource_config) = config.resources.get(&name) else {
                continue;
            };
            match adapters::config::open_resource(&name, resource_config, config.node).await {
                Ok(resource) => {
                    resources.insert(name, resource);
                }
                Err(e) => {
                    let why = unnamed(&name, e.to_string());
                    unopened.push((name, why));
                }
            }
        }
        let request = ResolveRequest {
            xid,
            commit: args.commit,
            operator: operator.clone(),
            forget: args.forget.clone(),
            reason: args.reason.clone().unwrap_or_default(),
            unopened,
        };
        let deadline = std::time::Duration::from_millis(config.call_timeout_ms);
        let result = coordinator::resolve::resolve(
            &journal,
            epoch,
            &resources,
            &request,
            deadline,
            &|| {},
        )
        .await;
        drop(resources);
        journal.close()?;
        let report = result?;
        let decision = if args.commit { "commit" } else { "rollback" };
        // With no branch left anywhere, `resolve` returns before it appends anything; a
        // resolution recorded earlier is not recorded again.
        let recorded = report.appended;
        let decided_by = report
            .resolution
            .as_ref()
            .map_or(operator.as_str(), |r| r.operator.as_str());
        if args.json {
            let branches: Vec<_> = report
                .branches
                .iter()
                .map(|(resource, outcome)| branch_json(resource, outcome))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "xid": xid.to_string(),
                    "decision": decision,
                    "recorded": recorded,
                    "operator": decided_by,
                    "finished": report.finished,
                    "branches": branches,
                })
            );
        } else if report.resolution.is_none() {
            println!(
                "{xid}: nothing recorded: no resource holds a branch of it and the journal has nothing open for it; nothing to do"
            );
        } else {
            if recorded {
                println!("{xid}: {decision} recorded by {decided_by}");
            } else {
                println!(
                    "{xid}: {decision} already recorded by {decided_by}; carried out again"
                );
            }
            for (resource, outcome) in &report.branches {
                println!("  {resource}: {}", describe(outcome));
            }
            if report.finished {
                println!("{xid}: finished");
            } else {
                println!("{xid}: still open for the branches not reached; run resolve again once they are reachable, or --forget them if lost for good");
            }
        }
        if !report.finished {
            anyhow::bail!("transaction {xid} is not finished: some branches were not reached");
        }
        Ok(())
    })
}

/// `why` without a leading `resource NAME: `, for a line that names the resource already.
fn unnamed(name: &str, why: String) -> String {
    match why.strip_prefix(&format!("resource {name}: ")) {
        Some(rest) => rest.to_string(),
        None => why,
    }
}

/// Whether `dir` is a directory holding at least one journal segment file: opening anything
/// less for writing would create a journal where there was none.
fn holds_segments(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".seg"))
    })
}

/// The resources `xid` involves, to be opened: for a commit of a transaction in phase 2, the
/// decision's writers still to be driven; otherwise (a rollback, or a commit of a transaction
/// that already ended — a branch brought back by a restored resource) the resources that hold a
/// branch of it prepared, asked without opening them. A resource that cannot be asked is returned with why, in the second list.
async fn involved(
    config: &Config,
    ledger: &Ledger,
    xid: &Xid,
    commit: bool,
) -> (Vec<String>, Vec<(String, String)>) {
    if commit && let Some((_, _, writers)) = ledger.open_commits().find(|(x, _, _)| x == xid) {
        return (writers, Vec::new());
    }
    let mut holders = Vec::new();
    let mut unasked = Vec::new();
    for (name, resource) in &config.resources {
        match holds_prepared(config, resource, name, xid).await {
            Ok(true) => holders.push(name.clone()),
            Ok(false) => {}
            Err(e) => unasked.push((name.clone(), unnamed(name, format!("{e:#}")))),
        }
    }
    (holders, unasked)
}

/// Whether `resource` holds a branch of `xid` prepared, read without opening it.
async fn holds_prepared(
    config: &Config,
    resource: &participant::ResourceConfig,
    name: &str,
    xid: &Xid,
) -> anyhow::Result<bool> {
    use participant::ResourceConfig;
    Ok(match resource {
        ResourceConfig::Files { root, .. } => {
            adapters::files::prepared_on_disk(root)?.contains(xid)
        }
        ResourceConfig::Mail { maildir, .. } => {
            adapters::mail::prepared_on_disk(maildir)?.contains(xid)
        }
        ResourceConfig::Kv { dir, .. } => match adapters::kv::prepared_on_disk(dir)? {
            Some(prepared) => prepared.contains(xid),
            None => anyhow::bail!(
                "the sled directory {} is open in a running process; stop it first",
                dir.display()
            ),
        },
        ResourceConfig::Postgres { url, .. } => {
            adapters::postgres::prepared_in(name, url, config.node)
                .await?
                .iter()
                .any(|b| b.xid == *xid)
        }
    })
}

/// The name of the user this process runs as: its uid (the owner of `/proc/self`) looked up in
/// `/etc/passwd`; `uid N` when the name cannot be found.
fn os_user() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown (uid not readable)".into();
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?.parse::<u32>().ok()?;
            (id == uid).then(|| name.to_string())
        })
        .next()
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn describe(outcome: &BranchOutcome) -> String {
    match outcome {
        BranchOutcome::Finished => "carried out".into(),
        BranchOutcome::NotPrepared => {
            "nothing prepared there: already resolved, or this is not the store that held it".into()
        }
        BranchOutcome::Hazard(why) => format!("carried out, with a heuristic hazard: {why}"),
        BranchOutcome::Unreached(why) => format!("NOT reached, still open: {why}"),
        BranchOutcome::Forgotten => {
            "forgotten (heuristic hazard: its outcome there is unknown)".into()
        }
    }
}

fn branch_json(resource: &str, outcome: &BranchOutcome) -> serde_json::Value {
    let (state, detail) = match outcome {
        BranchOutcome::Finished => ("finished", None),
        BranchOutcome::NotPrepared => ("not_prepared", None),
        BranchOutcome::Hazard(why) => ("hazard", Some(why.clone())),
        BranchOutcome::Unreached(why) => ("unreached", Some(why.clone())),
        BranchOutcome::Forgotten => ("forgotten", None),
    };
    serde_json::json!({ "resource": resource, "state": state, "detail": detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_number_and_a_unit() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
        for bad in [
            "30",
            "s",
            "5 m",
            "-1s",
            "1.5s",
            "5x",
            "99999999999999999999d",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_transaction_timeout_separates_in_flight_from_in_doubt() {
        assert_eq!(Standing::of(Some(29_999), 30_000), Standing::InFlight);
        assert_eq!(Standing::of(Some(30_000), 30_000), Standing::InDoubt);
        assert_eq!(Standing::of(None, 30_000), Standing::Unknown);
    }
}
