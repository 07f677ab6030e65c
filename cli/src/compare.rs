//! `concord compare`: checks that a standby's resources equal its primary's, resource by
//! resource and key by key (rows, files by blake3, mails, keys), and reports every difference.
//!
//! Two ways to reach the sites:
//!
//! * **Online**, while replication runs (`--primary URL --standby URL`): each node serves the
//!   inventories of its resources (`Replication.Inventory`: sorted keys with the blake3 hash of
//!   their content). One round reads the primary's durable LSN `P`, waits (at most
//!   `--timeout-ms`) until the standby has replayed everything up to `P`, then reads both
//!   sides' inventories and compares them. Commits go on meanwhile, so a key written after `P`
//!   may differ for a moment; the keys that differ are compared again in later rounds (up to
//!   `--rounds`), and only a key that differed in every round is reported. An equal round
//!   reports the sites equal as of its LSN `P`.
//! * **Offline**, with both sites stopped (`--primary-config A --standby-config B`, or
//!   `--data D` for the layout of `concord demo --standby`: `D/primary` and `D/standby`): it
//!   opens each site's resources from its configuration and compares their inventories once.
//!
//! `--json` prints one object ([`CompareJson`]). Exit codes: 0 when the sites are equal; 6
//! ([`Different`]) when they differ (the differences are printed first); 1 when a site cannot
//! be read.
//!
//! # Caveats
//!
//! * Each inventory is held in memory (about 100 bytes a key) and is bounded by
//!   `adapters::INVENTORY_ENTRIES_MAX`.
//! * A resource that only one site configures is a difference named by resource, not by key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use adapters::InventoryEntry;
use adapters::config::Config;
use anyhow::Context;
use proto::client::{ClientTls, Credentials, ReplicationClient, Token};
use proto::v1;
use serde::Serialize;

/// Most differences printed per resource (the count is always complete).
pub const DIFFERENCES_SHOWN_MAX: usize = 1000;

/// Options of `concord compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The primary daemon (`http://HOST:PORT`), to compare while replication runs.
    #[arg(long, requires = "standby")]
    pub primary: Option<String>,
    /// The standby (`http://HOST:PORT`, its `--listen` address).
    #[arg(long, requires = "primary")]
    pub standby: Option<String>,
    /// The primary's configuration, to compare stopped sites.
    #[arg(long, requires = "standby_config", conflicts_with_all = ["primary", "data"])]
    pub primary_config: Option<PathBuf>,
    /// The standby's configuration, to compare stopped sites.
    #[arg(long, requires = "primary_config")]
    pub standby_config: Option<PathBuf>,
    /// The data directory of `concord demo --standby` (sites `D/primary` and `D/standby`,
    /// stopped).
    #[arg(long, conflicts_with_all = ["primary", "primary_config"])]
    pub data: Option<PathBuf>,
    /// The operator token (first line of the file), for nodes that check tokens.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) for `https` URLs.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Online: rounds before a key that keeps differing is reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Online: how long to wait for the standby to replay up to the primary (milliseconds).
    #[arg(long, default_value_t = 60_000)]
    pub timeout_ms: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
pub struct CompareJson {
    /// Whether every resource is equal on both sites.
    pub equal: bool,
    /// Online: the primary's durable LSN the equal (or last) round compared at; offline: the
    /// lowest applied LSN of the standby's resources.
    pub as_of_lsn: u64,
    /// Rounds taken (1 offline).
    pub rounds: u32,
    /// Differences in all.
    pub differences: u64,
    /// Per resource.
    pub resources: Vec<ResourceCompareJson>,
}

/// One resource's comparison.
#[derive(Debug, Serialize)]
pub struct ResourceCompareJson {
    /// The resource.
    pub name: String,
    /// Keys on the primary.
    pub primary_keys: u64,
    /// Keys on the standby.
    pub standby_keys: u64,
    /// How many keys differ.
    pub differences: u64,
    /// The differing keys (at most [`DIFFERENCES_SHOWN_MAX`]).
    pub keys: Vec<KeyDifference>,
    /// Set when the resource could not be compared at all (missing on one site).
    pub error: Option<String>,
}

/// One key that differs.
#[derive(Clone, Debug, Serialize)]
pub struct KeyDifference {
    /// The key.
    pub key: String,
    /// Its content's blake3 on the primary (hex), `null` when absent there.
    pub primary: Option<String>,
    /// On the standby.
    pub standby: Option<String>,
}

/// The sites differ. Exit code 6.
#[derive(Debug, thiserror::Error)]
#[error("the sites differ: {differences} difference(s) in {}", .resources.join(", "))]
pub struct Different {
    /// Differences in all.
    pub differences: u64,
    /// The resources that differ.
    pub resources: Vec<String>,
}

/// A resource's inventory as a map.
type Inventory = BTreeMap<String, [u8; 32]>;

/// Runs `concord compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let report = runtime.block_on(async {
        match (&args.primary, &args.standby, &args.data) {
            (Some(primary), Some(standby), _) => online(&args, primary, standby).await,
            (_, _, Some(data)) => {
                let (primary, standby) = demo_configs(data)?;
                offline(&primary, &standby).await
            }
            _ => match (&args.primary_config, &args.standby_config) {
                (Some(p), Some(s)) => offline(&Config::load(p)?, &Config::load(s)?).await,
                _ => anyhow::bail!(
                    "say which sites: --primary URL --standby URL (running), --primary-config A --standby-config B (stopped), or --data D (a stopped demo)"
                ),
            },
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_lines(&report);
    }
    if report.equal {
        return Ok(());
    }
    Err(Different {
        differences: report.differences,
        resources: report
            .resources
            .iter()
            .filter(|r| r.differences > 0 || r.error.is_some())
            .map(|r| r.name.clone())
            .collect(),
    }
    .into())
}

/// The two sites of a `concord demo --standby` directory: each `D/<site>/concord.toml` when
/// the demo wrote one (a run with PostgreSQL), the embedded defaults of `D/<site>` otherwise.
pub fn demo_configs(data: &Path) -> anyhow::Result<(Config, Config)> {
    let site = |name: &str| -> anyhow::Result<Config> {
        let dir = data.join(name);
        if !dir.is_dir() {
            anyhow::bail!(
                "{} is not a directory: --data names the directory of `concord demo --standby`",
                dir.display()
            );
        }
        let file = dir.join("concord.toml");
        if file.is_file() {
            Ok(Config::load(&file)?)
        } else {
            Ok(Config::embedded(&dir))
        }
    };
    Ok((site("primary")?, site("standby")?))
}

/// Compares two stopped sites, opening their resources.
pub async fn offline(primary: &Config, standby: &Config) -> anyhow::Result<CompareJson> {
    let p = open_site(primary)
        .await
        .context("open the primary's resources")?;
    let s = open_site(standby)
        .await
        .context("open the standby's resources")?;
    let mut as_of = u64::MAX;
    let mut resources = Vec::new();
    let names: BTreeSet<&String> = p.keys().chain(s.keys()).collect();
    for name in names {
        let (pr, sr) = (p.get(name), s.get(name));
        if let Some(r) = sr {
            as_of = as_of.min(r.applied_lsn().await.map(|l| l.0).unwrap_or(0));
        }
        let compared = match (pr, sr) {
            (Some(pr), Some(sr)) => {
                let pi = inventory_of(pr.as_ref()).await?;
                let si = inventory_of(sr.as_ref()).await?;
                diff(name, &pi, &si)
            }
            _ => missing(name, pr.is_some()),
        };
        resources.push(compared);
    }
    Ok(report(
        resources,
        if as_of == u64::MAX { 0 } else { as_of },
        1,
    ))
}

async fn open_site(
    cfg: &Config,
) -> anyhow::Result<BTreeMap<String, std::sync::Arc<dyn adapters::Resource>>> {
    let opened = adapters::config::open_all(cfg).await?;
    Ok(opened
        .into_iter()
        .map(|r| (r.name().to_string(), r))
        .collect())
}

async fn inventory_of(resource: &dyn adapters::Resource) -> anyhow::Result<Inventory> {
    let entries = resource
        .inventory()
        .await
        .with_context(|| format!("read the inventory of {}", resource.name()))?;
    Ok(entries
        .into_iter()
        .map(|InventoryEntry { key, digest }| (key, digest))
        .collect())
}

/// Compares two running sites in rounds; see the module docs.
async fn online(args: &CompareArgs, primary: &str, standby: &str) -> anyhow::Result<CompareJson> {
    let credentials = credentials(args)?;
    let mut p = proto::client::connect_replication(primary, &credentials)
        .await
        .with_context(|| format!("connect to the primary at {primary}"))?;
    let mut s = proto::client::connect_replication(standby, &credentials)
        .await
        .with_context(|| format!("connect to the standby at {standby}"))?;
    let names: Vec<String> = status(&mut p)
        .await?
        .resources
        .into_iter()
        .map(|r| r.name)
        .collect();
    let mut suspects: Option<BTreeMap<String, BTreeSet<String>>> = None;
    let mut last = None;
    for round in 1..=args.rounds.max(1) {
        let at = status(&mut p).await?.durable_lsn;
        wait_replayed(&mut s, at, Duration::from_millis(args.timeout_ms)).await?;
        let mut resources = Vec::new();
        for name in &names {
            let pi = inventory(&mut p, name).await?;
            let si = inventory(&mut s, name).await?;
            let mut compared = diff(name, &pi, &si);
            if let Some(earlier) = &suspects {
                // Only keys that differed in every round so far still count.
                let keep = earlier.get(name);
                compared
                    .keys
                    .retain(|k| keep.is_some_and(|set| set.contains(&k.key)));
                compared.differences = compared.keys.len() as u64;
            }
            resources.push(compared);
        }
        let found = report(resources, at, round);
        if found.equal {
            return Ok(found);
        }
        suspects = Some(
            found
                .resources
                .iter()
                .map(|r| {
                    (
                        r.name.clone(),
                        r.keys.iter().map(|k| k.key.clone()).collect(),
                    )
                })
                .collect(),
        );
        last = Some(found);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last.context("no round ran")
}

fn credentials(args: &CompareArgs) -> anyhow::Result<Credentials> {
    let mut credentials = Credentials::none();
    if let Some(path) = &args.token_file {
        credentials = credentials.with_token(Token::from_file(path)?);
    }
    if let Some(ca) = &args.tls_ca {
        credentials = credentials.with_tls(ClientTls::with_ca_file(ca)?);
    }
    Ok(credentials)
}

async fn status(client: &mut ReplicationClient) -> anyhow::Result<v1::StatusResponse> {
    let request = v1::StatusRequest {
        header: Some(v1::RequestHeader::current("concord compare")),
    };
    Ok(client.status(request).await?.into_inner())
}

/// Waits until the standby has replayed everything up to `lsn`.
async fn wait_replayed(
    standby: &mut ReplicationClient,
    lsn: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let replayed = status(standby)
            .await?
            .replication
            .map_or(0, |r| r.replayed_lsn);
        if replayed >= lsn {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            anyhow::bail!(
                "the standby replayed up to lsn {replayed}, not {lsn}, within {} ms: it is behind or stopped (see concord status); try a larger --timeout-ms",
                timeout.as_millis()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn inventory(client: &mut ReplicationClient, name: &str) -> anyhow::Result<Inventory> {
    let request = v1::InventoryRequest {
        header: Some(v1::RequestHeader::current("concord compare")),
        resource: name.to_string(),
    };
    let mut stream = client
        .inventory(request)
        .await
        .with_context(|| format!("ask for the inventory of {name}"))?
        .into_inner();
    let mut out = Inventory::new();
    while let Some(chunk) = stream.message().await? {
        for item in chunk.items {
            let digest: [u8; 32] = item.digest.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "a digest of {} bytes in the inventory of {name}",
                    item.digest.len()
                )
            })?;
            out.insert(item.key, digest);
        }
    }
    Ok(out)
}

/// The differences between two inventories of one resource.
fn diff(name: &str, primary: &Inventory, standby: &Inventory) -> ResourceCompareJson {
    let mut keys = Vec::new();
    let mut differences = 0;
    let all: BTreeSet<&String> = primary.keys().chain(standby.keys()).collect();
    for key in all {
        let (p, s) = (primary.get(key), standby.get(key));
        if p == s {
            continue;
        }
        differences += 1;
        if keys.len() < DIFFERENCES_SHOWN_MAX {
            keys.push(KeyDifference {
                key: key.clone(),
                primary: p.map(hex::encode),
                standby: s.map(hex::encode),
            });
        }
    }
    ResourceCompareJson {
        name: name.to_string(),
        primary_keys: primary.len() as u64,
        standby_keys: standby.len() as u64,
        differences,
        keys,
        error: None,
    }
}

fn missing(name: &str, on_primary: bool) -> ResourceCompareJson {
    let (here, there) = if on_primary {
        ("primary", "standby")
    } else {
        ("standby", "primary")
    };
    ResourceCompareJson {
        name: name.to_string(),
        primary_keys: 0,
        standby_keys: 0,
        differences: 1,
        keys: Vec::new(),
        error: Some(format!(
            "configured on the {here} only: configure a resource {name:?} on the {there}"
        )),
    }
}

fn report(resources: Vec<ResourceCompareJson>, as_of_lsn: u64, rounds: u32) -> CompareJson {
    let differences = resources.iter().map(|r| r.differences).sum();
    CompareJson {
        equal: differences == 0,
        as_of_lsn,
        rounds,
        differences,
        resources,
    }
}

fn print_lines(report: &CompareJson) {
    for r in &report.resources {
        match &r.error {
            Some(e) => println!("{}: {e}", r.name),
            None if r.differences == 0 => {
                println!("{}: equal ({} keys)", r.name, r.primary_keys)
            }
            None => {
                println!(
                    "{}: {} difference(s) ({} keys on the primary, {} on the standby)",
                    r.name, r.differences, r.primary_keys, r.standby_keys
                );
                for k in &r.keys {
                    let side = |d: &Option<String>| {
                        d.as_deref()
                            .map_or("absent".to_string(), |h| h[..16].to_string())
                    };
                    println!(
                        "  {}: primary {}, standby {}",
                        k.key,
                        side(&k.primary),
                        side(&k.standby)
                    );
                }
            }
        }
    }
    if report.equal {
        println!("the sites are equal as of lsn {}", report.as_of_lsn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_each_key_that_differs_or_is_missing() {
        let p: Inventory = [("a".into(), [1; 32]), ("b".into(), [2; 32])].into();
        let s: Inventory = [("b".into(), [3; 32]), ("c".into(), [4; 32])].into();
        let d = diff("kv", &p, &s);
        assert_eq!(d.differences, 3);
        let keys: Vec<_> = d.keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert!(d.keys[0].standby.is_none());
        assert!(d.keys[2].primary.is_none());
        assert_eq!(diff("kv", &p, &p).differences, 0);
    }
}
