//! `concord bench failover`: how long a failover pair is without a primary — after the
//! primary is killed, and during a planned switchover — and whether a saturated but healthy
//! primary is ever replaced. Every trial runs a pair and the witness of `concord demo
//! --failover` ([`Pair`]: default timings, sync replication) on loopback, with one client of
//! this process starting a small transaction (a file and a key) every [`LOAD_EVERY_MS`] while
//! fewer than [`LOAD_IN_FLIGHT_MAX`] are in flight — an open loop, as requests reach an
//! application, so that a transaction the kill cut off (its client waits for its outcome)
//! holds up no later one — connected to both
//! nodes ([`participant::Concord::connect_any`]).
//!
//! One unmeasured trial of each kind comes first (the first processes of a run pay for cold
//! caches).
//!
//! 1. `failover_ms`: `--trials` times, a fresh pair; once commits flow, the primary is killed
//!    (SIGKILL); the time from the kill to the first commit acknowledged among the
//!    transactions begun after it (by the new primary: the old one is dead). p50 and p99.
//! 2. The baseline, `restart_ms`: the same pair, the primary killed and started again in place
//!    at once (no failover: it still holds its epoch), to the first commit after the kill —
//!    what a restart costs without a standby. `failover_vs_restart` is the ratio of the p50s.
//! 3. `switchover_ms`: one pair, `--switchovers` planned switchovers back and forth under the
//!    same load; each is the window with no primary as the old primary measured it (from
//!    stopping new work to the new primary's answer). p50 and p99.
//! 4. `false_failovers`: one pair under the load, the machine's CPU and disk saturated by
//!    `stress-ng` (Debian's; `--stress-seconds`) in the primary's directory; the epoch changes
//!    counted (none expected: the primary is slow, not sick or dead).
//!
//! Targets on loopback: `failover_ms_p99` ≤ 2000, `switchover_ms_p99` ≤ 1000,
//! `false_failovers` = 0.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use participant::{Concord, Credentials};
use proto::v1;
use serde::Serialize;

use crate::daemon_child::DaemonChild;
use crate::demo::failover::{Pair, state, wait_for};
use crate::demo::standby::percentile;

/// The load starts a transaction this often (milliseconds) …
const LOAD_EVERY_MS: u64 = 5;
/// … while fewer than this many are in flight.
const LOAD_IN_FLIGHT_MAX: usize = 16;
/// How long a trial waits for commits to flow, and for the first commit after a kill.
const FLOW_MS_MAX: u64 = 30_000;

/// Options of `concord bench failover`.
#[derive(clap::Args, Debug)]
pub struct FailoverBenchArgs {
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Kill trials (each a fresh pair), and as many restart trials.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Planned switchovers.
    #[arg(long, default_value_t = 6)]
    pub switchovers: usize,
    /// Seconds of CPU and disk saturation in the false-failover window (0: skip it).
    #[arg(long, default_value_t = 10)]
    pub stress_seconds: u64,
    /// Directory for the pairs (default: a new temp directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// What `--json` prints.
#[derive(Serialize, Debug)]
struct FailoverBench {
    trials: usize,
    failover_ms: Vec<f64>,
    failover_ms_p50: f64,
    failover_ms_p99: f64,
    restart_ms: Vec<f64>,
    restart_ms_p50: f64,
    failover_vs_restart: f64,
    switchovers: usize,
    switchover_ms: Vec<f64>,
    switchover_ms_p50: f64,
    switchover_ms_p99: f64,
    stress_seconds: u64,
    false_failovers: u64,
}

/// A client committing in a loop; records when each transaction began and was acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<(Instant, Instant)>>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    fn start(urls: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, acks) = (Arc::clone(&stop), Arc::clone(&acks));
            std::thread::spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
                    let concord =
                        Concord::connect_any_within(&urls, Credentials::none(), FLOW_MS_MAX)
                            .await?;
                    // An open loop, as requests reach an application: a transaction starts
                    // every LOAD_EVERY_MS while fewer than LOAD_IN_FLIGHT_MAX are in flight, so
                    // one whose commit the kill cut off (it waits for its outcome) holds up
                    // no later one.
                    let permits = Arc::new(tokio::sync::Semaphore::new(LOAD_IN_FLIGHT_MAX));
                    let mut tasks = tokio::task::JoinSet::new();
                    let mut i = 0u64;
                    let mut tick = tokio::time::interval(Duration::from_millis(LOAD_EVERY_MS));
                    while !stop.load(Ordering::Acquire) {
                        tick.tick().await;
                        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                            continue;
                        };
                        let (concord, acks) = (concord.clone(), Arc::clone(&acks));
                        tasks.spawn(async move {
                            let began = Instant::now();
                            if one(&concord, i).await.is_ok()
                                && let Ok(mut acks) = acks.lock()
                            {
                                acks.push((began, Instant::now()));
                            }
                            drop(permit);
                        });
                        i += 1;
                        while tasks.try_join_next().is_some() {}
                    }
                    while tasks.join_next().await.is_some() {}
                    Ok(())
                })
            })
        };
        Load {
            stop,
            acks,
            thread: Some(thread),
        }
    }

    /// Waits until a transaction that began after `after` is acknowledged; returns when.
    fn first_after(&self, after: Instant) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_millis(FLOW_MS_MAX);
        loop {
            let found = self.acks.lock().ok().and_then(|acks| {
                acks.iter()
                    .filter(|(began, _)| *began >= after)
                    .map(|(_, acked)| *acked)
                    .min()
            });
            if let Some(at) = found {
                return Ok(at);
            }
            if Instant::now() > deadline {
                bail!(
                    "no transaction begun after the kill was acknowledged within {FLOW_MS_MAX} ms"
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        }
        Ok(())
    }
}

/// One small transaction: a file and a key.
async fn one(concord: &Concord, i: u64) -> Result<(), participant::ConcordError> {
    let mut tx = concord.begin().await?;
    tx.files("uploads")
        .await?
        .put(&format!("bench/{i}"), &b"failover bench"[..])
        .await?;
    tx.kv("index")
        .await?
        .insert(format!("bench/{i}").as_bytes(), b"1")
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Runs `concord bench failover`.
pub fn run(args: FailoverBenchArgs) -> anyhow::Result<()> {
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let temp;
    let root = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("concord-bench-failover-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mut failover_ms = Vec::new();
    let mut restart_ms = Vec::new();
    // One unmeasured trial of each: the first processes of a run pay for cold caches.
    let warm_kill = kill_trial(&root.join("warm-kill"))?;
    let warm_restart = restart_trial(&root.join("warm-restart"))?;
    if !args.json {
        eprintln!(
            "warm-up (not counted): failover {warm_kill:.0} ms, restart {warm_restart:.0} ms"
        );
    }
    for trial in 0..args.trials {
        failover_ms.push(kill_trial(&root.join(format!("kill-{trial}")))?);
        restart_ms.push(restart_trial(&root.join(format!("restart-{trial}")))?);
        if !args.json {
            eprintln!(
                "trial {trial}: failover {:.0} ms, restart {:.0} ms",
                failover_ms[trial], restart_ms[trial]
            );
        }
    }
    let switchover_ms = switchovers(&root.join("switchover"), args.switchovers, args.json)?;
    let false_failovers = if args.stress_seconds > 0 {
        stress(&root.join("stress"), args.stress_seconds)?
    } else {
        0
    };
    let bench = FailoverBench {
        trials: args.trials,
        failover_ms_p50: percentile(&failover_ms, 0.50),
        failover_ms_p99: percentile(&failover_ms, 0.99),
        restart_ms_p50: percentile(&restart_ms, 0.50),
        failover_vs_restart: percentile(&failover_ms, 0.50) / percentile(&restart_ms, 0.50),
        failover_ms,
        restart_ms,
        switchovers: args.switchovers,
        switchover_ms_p50: percentile(&switchover_ms, 0.50),
        switchover_ms_p99: percentile(&switchover_ms, 0.99),
        switchover_ms,
        stress_seconds: args.stress_seconds,
        false_failovers,
    };
    if args.json {
        println!("{}", serde_json::to_string(&bench)?);
    } else {
        println!(
            "failover (kill -> first commit on the new primary): p50 {:.0} ms, p99 {:.0} ms over {} trials (target p99 <= 2000)",
            bench.failover_ms_p50, bench.failover_ms_p99, bench.trials
        );
        println!(
            "restart in place (baseline): p50 {:.0} ms; failover_vs_restart {:.2}",
            bench.restart_ms_p50, bench.failover_vs_restart
        );
        println!(
            "switchover (no primary): p50 {:.0} ms, p99 {:.0} ms over {} (target p99 <= 1000)",
            bench.switchover_ms_p50, bench.switchover_ms_p99, bench.switchovers
        );
        println!(
            "false failovers under {} s of CPU and disk saturation: {} (target 0)",
            bench.stress_seconds, bench.false_failovers
        );
    }
    Ok(())
}

/// A pair with commits flowing.
fn flowing(dir: &Path) -> anyhow::Result<(Pair, Load)> {
    let pair = Pair::start(dir)?;
    let load = Load::start(vec![pair.a_addrs.url(), pair.b_addrs.url()]);
    load.first_after(Instant::now())
        .context("wait for commits to flow")?;
    Ok((pair, load))
}

fn kill_trial(dir: &Path) -> anyhow::Result<f64> {
    let (mut pair, load) = flowing(dir)?;
    let killed = Instant::now();
    pair.a.take().context("no primary")?.kill()?;
    let first = load.first_after(killed);
    load.stop()?;
    Ok(first?.duration_since(killed).as_secs_f64() * 1000.0)
}

fn restart_trial(dir: &Path) -> anyhow::Result<f64> {
    let (mut pair, load) = flowing(dir)?;
    let killed = Instant::now();
    pair.a.take().context("no primary")?.kill()?;
    let config = dir.join("a").join("concord.toml");
    let restarted = DaemonChild::start_exact(
        "coordinator",
        "primary node",
        &["--config".into(), config.into_os_string()],
    )?;
    pair.a = Some(restarted);
    let first = load.first_after(killed);
    load.stop()?;
    Ok(first?.duration_since(killed).as_secs_f64() * 1000.0)
}

fn switchovers(dir: &Path, count: usize, quiet: bool) -> anyhow::Result<Vec<f64>> {
    let (pair, load) = flowing(dir)?;
    let urls = [pair.a_addrs.url(), pair.b_addrs.url()];
    let mut windows = Vec::new();
    for n in 0..count {
        let from = &urls[n % 2];
        let to = &urls[(n + 1) % 2];
        let reply = switchover(from)?;
        if reply.outcome != v1::ChangeOutcome::Done as i32 {
            bail!(
                "switchover {n} from {from} was not done: {} {}",
                reply.reason,
                reply.what_to_do
            );
        }
        windows.push(reply.window_ms as f64);
        if !quiet {
            let steps: Vec<String> = reply
                .steps
                .iter()
                .map(|s| format!("{} {} ms", s.step, s.ms))
                .collect();
            eprintln!(
                "switchover {n}: {} ms without a primary ({})",
                reply.window_ms,
                steps.join(", ")
            );
        }
        // The old primary follows the new one and catches up before the next handover.
        wait_for(to, FLOW_MS_MAX, |s| {
            s.role == "primary" && s.may_commit && s.confirmed_remaining_ms > 0
        })
        .with_context(|| format!("wait for {to} to be confirmed by its standby"))?;
    }
    load.stop()?;
    drop(pair);
    Ok(windows)
}

fn switchover(url: &str) -> anyhow::Result<v1::RoleChangeReply> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = proto::client::connect_failover(url, &Credentials::none()).await?;
        Ok(client
            .switchover(v1::SwitchoverRequest {
                force: false,
                operator: "concord bench failover".into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{url}: {}", s.message()))?
            .into_inner())
    })
}

fn stress(dir: &Path, seconds: u64) -> anyhow::Result<u64> {
    let (pair, load) = flowing(dir)?;
    let before = state(&pair.a_addrs.url())?.epoch;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let status = std::process::Command::new("stress-ng")
        .args([
            "--cpu",
            &cpus.to_string(),
            "--hdd",
            "1",
            "--hdd-bytes",
            "256M",
            "--timeout",
            &format!("{seconds}s"),
            "--temp-path",
        ])
        .arg(dir.join("a"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("run stress-ng (install it: apt-get install stress-ng)")?;
    if !status.success() {
        bail!("stress-ng exited with {status}");
    }
    // What a failover would have needed to show up.
    std::thread::sleep(Duration::from_millis(3_000));
    let after = [state(&pair.a_addrs.url()), state(&pair.b_addrs.url())]
        .into_iter()
        .filter_map(Result::ok)
        .map(|s| s.epoch)
        .max()
        .context("neither node answered after the stress window: the count would mean nothing")?;
    load.stop()?;
    drop(pair);
    Ok(after.saturating_sub(before))
}
