//! `concord demo --failover`: the remote demo's workload through a failover pair — a primary
//! node, a standby node and the built-in witness on this machine — with the primary killed
//! midway and the standby taking over by itself.
//!
//! 1. In `D/witness`, `D/a` and `D/b` it writes a configuration per node ([`write_node_config`]:
//!    the embedded resources of its directory, plain text on a free loopback port, sync
//!    replication, a `[failover]` table with automatic failover and the default timings) and a
//!    shared heartbeat key, then starts `concord witness`, `concord coordinator` on `a` and
//!    `concord standby` on `b`, and waits until the primary is confirmed by its standby.
//! 2. It runs the remote demo's client processes, each connected to both nodes
//!    ([`participant::Concord::connect_any`]: a client follows the primary); a transaction a
//!    failover cuts off ends in an error the client counts and goes on. Acknowledgements go to
//!    `D/b/acks/<run>`: the surviving site is the one checked.
//! 3. Once half the transactions are acknowledged it kills the primary (SIGKILL; `--pause`:
//!    SIGSTOP). `failover_ms` runs from there to the first transaction acknowledged after the
//!    standby reported itself primary. With `--pause` the old primary is resumed (SIGCONT) once
//!    the clients are done; it must step down and refuse work.
//! 4. The checks, on the new primary's site after it stopped (SIGTERM, exit 0): the demo's
//!    atomicity check (every acknowledged transaction present, every transaction all or
//!    nothing); `acked_lost`, the acknowledged transactions missing; no transaction committed
//!    by two decisions (under two epochs); `split_brain`, whether the old primary recorded a
//!    decision made after the moment it was killed or frozen (the standby won its epoch after
//!    that moment), or a resumed old primary still lets a transaction begin.
//!
//! # Implementation caveats
//!
//! * The data directory must be new (or empty): the pair's roles live in the witness, and a
//!   second run would start from where the first left them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use coordinator::record::{COMMIT, CoordRecord, ONE_PHASE};
use proto::client::Credentials;
use proto::v1;

use super::{DemoArgs, Summary, check, remote};
use crate::daemon_child::DaemonChild;

/// How long the pair may take to be ready (primary confirmed by its standby).
const READY_MS_MAX: u64 = 30_000;
/// How long the standby may take to become the primary after the kill.
const TAKEOVER_MS_MAX: u64 = 30_000;
/// How often the demo looks at the acknowledgements and the nodes (milliseconds).
const POLL_MS: u64 = 5;

/// The addresses of one node.
#[derive(Clone, Debug)]
pub(crate) struct NodeAddrs {
    pub name: &'static str,
    pub id: u32,
    pub grpc: std::net::SocketAddr,
    pub udp: std::net::SocketAddr,
}

impl NodeAddrs {
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// A free loopback TCP port and a free UDP port.
fn free_addrs(name: &'static str, id: u32) -> anyhow::Result<NodeAddrs> {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").context("find a free UDP port")?;
    Ok(NodeAddrs {
        name,
        id,
        grpc: tcp.local_addr()?,
        udp: udp.local_addr()?,
    })
}

/// Writes `dir/concord.toml` for node `me` of a pair with `peer`, the witness at `witness`.
pub(crate) fn write_node_config(
    dir: &Path,
    me: &NodeAddrs,
    peer: &NodeAddrs,
    key_file: &Path,
    witness: &str,
) -> anyhow::Result<PathBuf> {
    let data = dir.display();
    let text = format!(
        r#"node = {id}
data_dir = "{data}"

[resources.uploads]
kind = "files"
root = "{data}/uploads"
create = true

[resources.thumbnails]
kind = "files"
root = "{data}/thumbnails"
create = true

[resources.mail]
kind = "mail"
maildir = "{data}/mail"
create = true

[resources.index]
kind = "kv"
dir = "{data}/index"
create = true

[daemon]
listen = "{grpc}"
plaintext = true
unauthenticated = true

[replication]
mode = "sync"
sync_fallback = "async"
sync_wait_ms_max = 1000

[failover]
name = "{name}"
address = "{url}"
peer = "{peer_url}"
udp_listen = "{udp}"
peer_udp = "{peer_udp}"
key_file = "{key}"
quorum = "witness"
quorum_endpoints = ["{witness}"]
automatic = true
"#,
        id = me.id,
        grpc = me.grpc,
        name = me.name,
        url = me.url(),
        peer_url = peer.url(),
        udp = me.udp,
        peer_udp = peer.udp,
        key = key_file.display(),
    );
    let path = dir.join("concord.toml");
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// A running pair and its witness.
pub(crate) struct Pair {
    _witness: DaemonChild,
    pub a: Option<DaemonChild>,
    pub b: Option<DaemonChild>,
    pub a_addrs: NodeAddrs,
    pub b_addrs: NodeAddrs,
}

impl Pair {
    /// Writes the configurations under `data` and starts the witness, `a` as primary and `b`
    /// as its standby; returns once `a` may commit and is confirmed by `b`.
    pub fn start(data: &Path) -> anyhow::Result<Pair> {
        let (wdir, adir, bdir) = (data.join("witness"), data.join("a"), data.join("b"));
        for dir in [&wdir, &adir, &bdir] {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        if adir.join("journal").exists()
            || wdir.join(replicator::quorum::witness::STATE_FILE).exists()
        {
            bail!(
                "{} holds an earlier failover pair: the demo needs a new (or empty) --data directory",
                data.display()
            );
        }
        let key_file = data.join("heartbeat.key");
        std::fs::write(&key_file, random_key()).context("write the heartbeat key")?;
        let witness_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let witness = DaemonChild::start_exact(
            "witness",
            "witness",
            &[
                OsString::from("--data"),
                wdir.into_os_string(),
                OsString::from("--listen"),
                OsString::from(witness_port.to_string()),
            ],
        )?;
        let witness_url = witness.url();
        let a_addrs = free_addrs("a", 1)?;
        let b_addrs = free_addrs("b", 2)?;
        let a_config = write_node_config(&adir, &a_addrs, &b_addrs, &key_file, &witness_url)?;
        let b_config = write_node_config(&bdir, &b_addrs, &a_addrs, &key_file, &witness_url)?;
        let a = DaemonChild::start_exact(
            "coordinator",
            "primary node",
            &[OsString::from("--config"), a_config.into_os_string()],
        )?;
        let b = DaemonChild::start_exact(
            "standby",
            "standby node",
            &[OsString::from("--config"), b_config.into_os_string()],
        )?;
        let pair = Pair {
            _witness: witness,
            a: Some(a),
            b: Some(b),
            a_addrs,
            b_addrs,
        };
        let url = pair.a_addrs.url();
        wait_for(&url, READY_MS_MAX, |s| {
            s.role == "primary" && s.may_commit && s.confirmed_remaining_ms > 0
        })
        .context("wait for the primary to be confirmed by its standby")?;
        Ok(pair)
    }
}

/// A heartbeat key: 32 bytes, unpredictable enough for a demo on one machine.
fn random_key() -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.update(&now.to_le_bytes());
    if let Ok(bytes) = std::fs::read("/proc/sys/kernel/random/uuid") {
        hasher.update(&bytes);
    }
    hasher.finalize().as_bytes().to_vec()
}

/// A node's failover state, or why there is none.
pub(crate) fn state(url: &str) -> anyhow::Result<v1::FailoverState> {
    remote::runtime()?.block_on(async {
        let mut client = proto::client::connect_failover(url, &Credentials::none()).await?;
        let call = client.state(v1::FailoverStateRequest {});
        match tokio::time::timeout(Duration::from_millis(1_000), call).await {
            Ok(Ok(state)) => Ok(state.into_inner()),
            Ok(Err(status)) => bail!("{url}: {}", status.message()),
            Err(_) => bail!("{url} did not answer within 1000 ms"),
        }
    })
}

/// Waits until the state of the node at `url` satisfies `ready`, at most `ms`.
pub(crate) fn wait_for(
    url: &str,
    ms: u64,
    ready: impl Fn(&v1::FailoverState) -> bool,
) -> anyhow::Result<v1::FailoverState> {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut last;
    loop {
        match state(url) {
            Ok(s) if ready(&s) => return Ok(s),
            Ok(s) => last = format!("{} at epoch {}: {}", s.role, s.epoch, s.why_not),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("{url} not there within {ms} ms (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn acks_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Runs `concord demo --failover` on `data`.
pub(super) fn run(args: &DemoArgs, data: &Path) -> anyhow::Result<Summary> {
    remote::check_clients(args)?;
    if args.postgres.is_some() {
        bail!("--failover runs on the embedded resources; --postgres is not offered with it");
    }
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    let mut pair = Pair::start(data)?;
    let (a_url, b_url) = (pair.a_addrs.url(), pair.b_addrs.url());
    let site = data.join("b");
    let run_id = super::record_run(args, &site)?;
    let acks = site.join("acks").join(&run_id);
    let started = Instant::now();
    let clients = {
        let args = copy_args(args);
        let site = site.clone();
        let run_id = run_id.clone();
        let urls = [a_url.clone(), b_url.clone()];
        std::thread::spawn(move || {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            remote::run_clients(&args, &site, &urls, &run_id, true)
        })
    };
    // Midway: the primary goes.
    let half = usize::try_from(args.transactions / 2).unwrap_or(usize::MAX);
    while acks_in(&acks) < half && !clients.is_finished() {
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
    let signal = if args.pause { "STOP" } else { "KILL" };
    let killed_at = Instant::now();
    if let Some(a) = &pair.a {
        a.signal(signal)?;
    }
    // Read once the signal was sent (`kill` returned): a decision the old primary built while
    // the signal was on its way is not one made next to the new primary.
    let killed_ms = unix_ms();
    if !args.json {
        eprintln!(
            "killed the primary (SIG{signal}) after {} acknowledged transactions",
            acks_in(&acks)
        );
    }
    let promoted = wait_for(&b_url, TAKEOVER_MS_MAX, |s| {
        s.role == "primary" && s.may_commit
    })
    .context("wait for the standby to take over")?;
    let at_promotion = acks_in(&acks);
    let mut failover_ms = None;
    while !clients.is_finished() {
        if acks_in(&acks) > at_promotion {
            failover_ms = Some(killed_at.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (stats, failed) = clients
        .join()
        .map_err(|_| anyhow::anyhow!("the client driver panicked"))??;
    let elapsed_s = started.elapsed().as_secs_f64();
    std::fs::write(acks.join(check::FINISHED), b"")?;
    if failover_ms.is_none() && acks_in(&acks) > at_promotion {
        failover_ms = Some(killed_at.elapsed().as_secs_f64() * 1000.0);
    }
    let mut problems = Vec::new();
    let mut split_brain = false;
    if failover_ms.is_none() {
        problems.push("no transaction was acknowledged after the standby took over".into());
    }
    // A resumed old primary must step down and refuse work.
    if args.pause {
        if let Some(a) = &pair.a {
            a.signal("CONT")?;
        }
        match wait_for(&a_url, 10_000, |s| {
            s.role != "primary" && s.role != "promoting"
        }) {
            Ok(_) => {
                if begins_on(&a_url) {
                    split_brain = true;
                    problems.push("the resumed old primary still began a transaction".into());
                }
            }
            Err(e) => {
                split_brain = true;
                problems.push(format!("the resumed old primary did not step down: {e:#}"));
            }
        }
    }
    let clean = remote::runtime()?.block_on(remote::wait_idle(&b_url, None))?;
    if !clean {
        problems.push("the new primary still had transactions in phase 2 after the run".into());
    }
    let b_status = pair
        .b
        .take()
        .context("the standby node is gone")?
        .terminate()?;
    if !b_status.success() {
        problems.push(format!(
            "the new primary exited with {b_status} after SIGTERM, not 0"
        ));
    }
    if let Some(a) = pair.a.take() {
        if args.pause {
            let _ = a.terminate();
        } else {
            a.kill()?;
        }
    }
    // The old primary stopped (killed, or frozen) before the standby won its epoch: any
    // decision it built after that moment was made next to the new primary.
    let late = decisions_after(&data.join("a"), killed_ms)?;
    if late > 0 {
        split_brain = true;
        problems.push(format!(
            "the old primary recorded {late} decisions after it was stopped and the standby won epoch {}",
            promoted.epoch
        ));
    }
    problems.extend(committed_twice(&site, &run_id)?);
    let report = check::check(&site, None)?;
    let acked_lost = report
        .problems
        .iter()
        .filter(|p| p.contains("acknowledged but not present"))
        .count() as u64;
    problems.extend(report.problems);
    if failed > 0 {
        problems.push(format!(
            "{failed} client processes did not finish their share"
        ));
    }
    super::print_problems(&problems);
    let latencies = crate::latency::Latencies::from_us(&stats.latencies_us)?;
    drop(pair);
    Ok(Summary {
        resources: super::resources(args),
        committed: stats.committed,
        rolled_back: stats.rolled_back,
        atomicity_verified: problems.is_empty(),
        tx_per_s: args.transactions as f64 / elapsed_s,
        p50_ms: latencies.percentile_ms(0.50),
        p99_ms: latencies.percentile_ms(0.99),
        remote: Some(true),
        clients: Some(args.clients),
        clients_failed: Some(failed),
        failover: Some(true),
        failover_ms: Some(failover_ms.unwrap_or(f64::NAN)),
        acked_lost: Some(acked_lost),
        split_brain: Some(split_brain),
        cut_off: Some(stats.cut_off),
        ..Summary::default()
    })
}

/// Whether the node at `url` lets a transaction begin (a node that is not the primary must
/// refuse).
fn begins_on(url: &str) -> bool {
    let Ok(runtime) = remote::runtime() else {
        return false;
    };
    runtime.block_on(async {
        let Ok(concord) = participant::Concord::connect(url, Credentials::none()).await else {
            return false;
        };
        concord.begin().await.is_ok()
    })
}

/// Milliseconds since the Unix epoch (the records' `at_ms` clock).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The decisions the node of `site` recorded after `after_ms` (ms since the Unix epoch).
fn decisions_after(site: &Path, after_ms: u64) -> anyhow::Result<u64> {
    let mut late = 0;
    let bytes_max = journal::JournalConfig::default().record_bytes_max;
    journal::scan::scan_dir(&site.join("journal"), bytes_max, |record| {
        if (record.kind == COMMIT || record.kind == ONE_PHASE)
            && let Ok(CoordRecord::Commit { at_ms, .. } | CoordRecord::OnePhase { at_ms, .. }) =
                CoordRecord::decode(record.kind, &record.payload)
            && at_ms > after_ms
        {
            late += 1;
        }
    })
    .context("read the old primary's journal")?;
    Ok(late)
}

/// The run's transactions that more than one decision of `site`'s journal committed.
fn committed_twice(site: &Path, run_id: &str) -> anyhow::Result<Vec<String>> {
    let mut seen: std::collections::BTreeMap<u64, Vec<(u64, u64)>> = Default::default();
    let needle = format!("tx/{run_id}/");
    let bytes_max = journal::JournalConfig::default().record_bytes_max;
    journal::scan::scan_dir(&site.join("journal"), bytes_max, |record| {
        if record.kind != COMMIT {
            return;
        }
        if let Some(i) = transaction_in(&record.payload, needle.as_bytes()) {
            seen.entry(i)
                .or_default()
                .push((record.lsn.0, record.epoch.0));
        }
    })
    .context("read the new primary's journal")?;
    Ok(seen
        .into_iter()
        .filter(|(_, decisions)| decisions.len() > 1)
        .map(|(i, decisions)| {
            format!("transaction {i} of run {run_id} was committed by {} decisions (lsn, epoch): {decisions:?}", decisions.len())
        })
        .collect())
}

/// The transaction number after the first `needle` in `payload`.
fn transaction_in(payload: &[u8], needle: &[u8]) -> Option<u64> {
    let at = payload.windows(needle.len()).position(|w| w == needle)?;
    let digits: Vec<u8> = payload[at + needle.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// The options of the run, field by field (clap's arguments are not `Clone`).
fn copy_args(args: &DemoArgs) -> DemoArgs {
    super::standby::copy_args(args)
}
