//! `concord demo --standby`: the remote demo's workload through a primary daemon that a standby
//! follows, with the standby's lag watched during the run and both sites compared at the end.
//!
//! 1. The demo starts a primary daemon on `D/primary` exactly as `concord demo --remote` starts
//!    its daemon ([`remote::start_daemon`]), then a standby on `D/standby` following it
//!    (`concord standby --primary URL --listen 127.0.0.1:0`, a [`DaemonChild`]): both on the
//!    embedded defaults of their directory, each on a free loopback port. With `--postgres`,
//!    the demo first starts two throwaway PostgreSQL clusters ([`adapters::pgtest`]), one per
//!    site; it sets up the demo's schema and orders table on each (as `concord pg install` and
//!    `concord pg replicate` do) and writes each site's `concord.toml` with its own database.
//! 2. It runs the remote demo's run ([`remote::drive`]: the same client processes, the same
//!    transactions, acknowledged in `D/primary/acks`) while a [`LagSampler`] asks the standby
//!    for its status every [`LAG_SAMPLE_MS`]: the lag in time is `replication.lag.seconds`, the
//!    age of the oldest committed transaction the standby has received and not yet replayed;
//!    the lag in records is recorded too. Without `--json`, one line a second on standard error
//!    shows it.
//! 3. After the run it waits, at most [`CATCH_UP_MS_MAX`], until the standby has replayed up to
//!    the primary's durable LSN, then runs `concord compare --primary URL --standby URL`
//!    (online: both running), stops the standby and then the primary with SIGTERM (each must
//!    exit 0), and compares the stopped sites again in-process ([`compare::offline`], what
//!    `concord compare --data D` does).
//! 4. The remote demo's check covers the primary's stores; the summary adds `sites_equal` (both
//!    comparisons found the sites equal) and the lag's p50 and p99 in milliseconds.
//!
//! # Implementation caveats
//!
//! * The lag in time counts only what the standby has received: a transaction still on its way
//!   from the primary is in neither number. On one machine the way is short.
//! * The throwaway clusters live as long as the demo: `concord compare --data D` after a run
//!   with `--postgres` cannot reach them (the demo's own stopped-sites comparison ran while
//!   they were up).

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::client::{Credentials, ReplicationClient};
use proto::v1;

use super::remote;
use super::{DemoArgs, Summary};
use crate::compare;
use crate::daemon_child::DaemonChild;

/// How often the standby's lag is sampled during the run (milliseconds).
pub(crate) const LAG_SAMPLE_MS: u64 = 50;
/// How long the demo waits, after the run, for the standby to replay up to the primary.
const CATCH_UP_MS_MAX: u64 = 60_000;
/// How often the standby is asked whether it caught up (milliseconds).
const CATCH_UP_POLL_MS: u64 = 20;
/// How long the online comparison may wait for the standby (milliseconds).
const COMPARE_TIMEOUT_MS: u64 = 30_000;
/// The client name of the demo's status calls.
const CLIENT_NAME: &str = "concord-demo";
/// The database each throwaway cluster holds for the demo.
const PG_DATABASE: &str = "concord_demo";

/// Runs `concord demo --standby` on `data` (sites `data/primary` and `data/standby`).
pub(super) fn run(args: &DemoArgs, data: &Path) -> anyhow::Result<Summary> {
    remote::check_clients(args)?;
    if args.postgres.as_deref().is_some_and(|url| !url.is_empty()) {
        bail!(
            "--standby --postgres takes no URL: the demo starts a throwaway PostgreSQL cluster for each site"
        );
    }
    let (primary_dir, standby_dir) = (data.join("primary"), data.join("standby"));
    for dir in [&primary_dir, &standby_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let clusters = match args.postgres.is_some() {
        true => Some(Clusters::start()?),
        false => None,
    };
    let primary_args = DemoArgs {
        postgres: clusters.as_ref().map(|c| c.primary_url.clone()),
        ..copy_args(args)
    };
    let standby_args = match &clusters {
        Some(c) => {
            remote::runtime()?.block_on(super::setup_postgres(&c.standby_url))?;
            let config = remote::write_config(&standby_dir, &c.standby_url, args.concurrency)?;
            [OsString::from("--config"), config.into_os_string()]
        }
        None => [
            OsString::from("--data"),
            standby_dir.clone().into_os_string(),
        ],
    };
    let daemon = remote::start_daemon(&primary_args, &primary_dir)?;
    let primary_url = daemon.url();
    let mut standby_command = standby_args.to_vec();
    standby_command.extend([OsString::from("--primary"), OsString::from(&primary_url)]);
    let standby = DaemonChild::start_standby(&standby_command)?;
    let standby_url = standby.url();

    let sampler = LagSampler::start(&standby_url, !args.json);
    let driven = remote::drive(&primary_args, &primary_dir, &primary_url)?;
    let samples = sampler.stop()?;

    let mut problems = Vec::new();
    let caught_up = remote::runtime()?.block_on(wait_caught_up(&primary_url, &standby_url))?;
    if let Err(e) = caught_up {
        problems.push(e);
    }
    let online_equal = compare_online(&primary_url, &standby_url)?;
    let standby_status = standby.terminate()?;
    if !standby_status.success() {
        problems.push(format!(
            "the standby exited with {standby_status} after SIGTERM, not 0"
        ));
    }
    let primary_status = daemon.terminate()?;
    let (primary_config, standby_config) = compare::demo_configs(data)?;
    let stopped = remote::runtime()?
        .block_on(compare::offline(&primary_config, &standby_config))
        .context("compare the stopped sites")?;
    if !stopped.equal {
        eprintln!(
            "compare (sites stopped): {} difference(s); `concord compare --data {}` names them",
            stopped.differences,
            data.display()
        );
    }
    let mut summary = remote::conclude(
        &primary_args,
        &primary_dir,
        driven,
        primary_status,
        problems,
    )?;
    let lags: Vec<f64> = samples.iter().map(LagSample::ms).collect();
    summary.sites_equal = Some(online_equal && stopped.equal);
    summary.lag_p50_ms = Some(percentile(&lags, 0.50));
    summary.lag_p99_ms = Some(percentile(&lags, 0.99));
    summary.lag_records_max = Some(samples.iter().map(|s| s.records).max().unwrap_or(0));
    drop(clusters);
    Ok(summary)
}

/// The options of the run, field by field (clap's arguments are not `Clone`).
pub(super) fn copy_args(args: &DemoArgs) -> DemoArgs {
    DemoArgs {
        data: args.data.clone(),
        transactions: args.transactions,
        concurrency: args.concurrency,
        fail_every: args.fail_every,
        json: args.json,
        postgres: args.postgres.clone(),
        remote: args.remote,
        clients: args.clients,
        standby: args.standby,
        failover: args.failover,
        pause: args.pause,
    }
}

/// The two throwaway PostgreSQL clusters of a run with `--postgres`, stopped when dropped.
struct Clusters {
    _primary: adapters::pgtest::PgCluster,
    _standby: adapters::pgtest::PgCluster,
    primary_url: String,
    standby_url: String,
}

impl Clusters {
    fn start() -> anyhow::Result<Clusters> {
        let primary = adapters::pgtest::PgCluster::start()
            .context("start the primary's PostgreSQL cluster")?;
        let standby = adapters::pgtest::PgCluster::start()
            .context("start the standby's PostgreSQL cluster")?;
        Ok(Clusters {
            primary_url: primary.database(PG_DATABASE)?,
            standby_url: standby.database(PG_DATABASE)?,
            _primary: primary,
            _standby: standby,
        })
    }
}

/// One sample of a standby's lag.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LagSample {
    /// The age of the oldest committed transaction received and not yet replayed (seconds).
    pub(crate) seconds: f64,
    /// Records the replay is behind the primary's durable LSN (as last heard).
    pub(crate) records: u64,
}

impl LagSample {
    /// The lag in time in milliseconds, to the microsecond.
    pub(crate) fn ms(&self) -> f64 {
        (self.seconds * 1e6).round() / 1e3
    }
}

/// Asks a standby for its status every [`LAG_SAMPLE_MS`] on a thread of its own, until
/// stopped; optionally prints the lag once a second on standard error.
pub(crate) struct LagSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<LagSample>>>,
}

impl LagSampler {
    /// Starts sampling the standby at `url`.
    pub(crate) fn start(url: &str, print: bool) -> LagSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, url) = (Arc::clone(&stop), url.to_string());
        let thread =
            std::thread::spawn(move || remote::runtime()?.block_on(sample(&url, &flag, print)));
        LagSampler { stop, thread }
    }

    /// Stops sampling; returns the samples.
    pub(crate) fn stop(self) -> anyhow::Result<Vec<LagSample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the lag sampler's thread failed"))?
    }
}

async fn sample(url: &str, stop: &AtomicBool, print: bool) -> anyhow::Result<Vec<LagSample>> {
    let mut client = proto::client::connect_replication(url, &Credentials::none())
        .await
        .with_context(|| format!("connect to the standby at {url}"))?;
    let mut samples = Vec::new();
    let mut printed = Instant::now();
    let mut worst = None::<LagSample>;
    while !stop.load(Ordering::Relaxed) {
        let replication = status(&mut client).await?.replication.unwrap_or_default();
        let lag = replication.lag.unwrap_or_default();
        let s = LagSample {
            seconds: lag.seconds,
            records: lag.records,
        };
        samples.push(s);
        worst = Some(match worst {
            Some(w) if w.seconds >= s.seconds => w,
            _ => s,
        });
        if print && printed.elapsed() >= Duration::from_secs(1) {
            printed = Instant::now();
            let w = worst.take().unwrap_or(s);
            eprintln!(
                "standby lag: {:.0} ms now, {:.0} ms at worst this second; {} records behind; replayed lsn {}",
                s.seconds * 1000.0,
                w.seconds * 1000.0,
                s.records,
                replication.replayed_lsn
            );
        }
        tokio::time::sleep(Duration::from_millis(LAG_SAMPLE_MS)).await;
    }
    Ok(samples)
}

/// A node's status through its Replication service.
pub(crate) async fn status(client: &mut ReplicationClient) -> anyhow::Result<v1::StatusResponse> {
    let request = v1::StatusRequest {
        header: Some(v1::RequestHeader::current(CLIENT_NAME)),
    };
    Ok(client
        .status(request)
        .await
        .context("ask for the status")?
        .into_inner())
}

/// Waits, at most [`CATCH_UP_MS_MAX`], until the standby at `standby` has replayed up to the
/// durable LSN of the primary at `primary`; the inner error says how far it got.
async fn wait_caught_up(primary: &str, standby: &str) -> anyhow::Result<Result<(), String>> {
    let mut p = proto::client::connect_replication(primary, &Credentials::none())
        .await
        .with_context(|| format!("connect to the primary at {primary}"))?;
    let mut s = proto::client::connect_replication(standby, &Credentials::none())
        .await
        .with_context(|| format!("connect to the standby at {standby}"))?;
    let target = status(&mut p).await?.durable_lsn;
    let deadline = Instant::now() + Duration::from_millis(CATCH_UP_MS_MAX);
    loop {
        let replayed = status(&mut s)
            .await?
            .replication
            .map_or(0, |r| r.replayed_lsn);
        if replayed >= target {
            return Ok(Ok(()));
        }
        if Instant::now() > deadline {
            return Ok(Err(format!(
                "the standby replayed up to lsn {replayed}, not the primary's durable lsn {target}, within {CATCH_UP_MS_MAX} ms"
            )));
        }
        tokio::time::sleep(Duration::from_millis(CATCH_UP_POLL_MS)).await;
    }
}

/// Runs `concord compare --primary URL --standby URL --json` on the running sites; returns
/// whether they are equal (the differences are printed on standard error when not).
fn compare_online(primary: &str, standby: &str) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("find the concord binary")?;
    let out = Command::new(exe)
        .args(["--log-level", "warn", "compare", "--json"])
        .args(["--primary", primary, "--standby", standby])
        .args(["--timeout-ms", &COMPARE_TIMEOUT_MS.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("run concord compare")?;
    let report: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(report) => report,
        Err(_) => bail!(
            "concord compare failed ({}); its error is above",
            out.status
        ),
    };
    let equal = report["equal"].as_bool() == Some(true) && out.status.success();
    if !equal {
        eprintln!(
            "compare (sites running): {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(equal)
}

/// The `q` quantile of `values` (nearest rank; 0 when empty).
pub(crate) fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n as f64 * q).ceil() as usize).clamp(1, n) - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
        assert_eq!(percentile(&[7.0], 0.50), 7.0);
    }
}
