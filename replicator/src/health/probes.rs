//! The probes: each one exercises one thing a commit needs and answers `Err(detail)` when it
//! cannot. Each returns a boxed `'static` future so the monitor can run it as its own task.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::Resource;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

/// The bytes the journal probe writes: one page, so the file system must find a new block.
pub(crate) const JOURNAL_PROBE_BYTES: usize = 4096;
/// How long the scheduling probe asks the runtime to sleep.
pub(crate) const SCHEDULING_PROBE_SLEEP_MS: u64 = 10;
/// The program the fork probe runs.
pub(crate) const FORK_PROBE_PROGRAM: &str = "/bin/true";
/// Where the memory probe reads `MemAvailable`.
const MEMINFO: &str = "/proc/meminfo";

/// What a probe answers: `Ok`, or what went wrong in words.
pub(crate) type ProbeResult = Result<(), String>;

/// A named probe that can be started again each round.
pub(crate) struct Probe {
    pub(crate) name: String,
    pub(crate) start: Box<dyn Fn() -> BoxFuture<'static, ProbeResult> + Send + Sync>,
}

/// Every probe of a node: journal, each resource, memory, fork, scheduling.
pub(crate) fn all(
    cfg: &super::HealthConfig,
    resources: Vec<Arc<dyn Resource>>,
    journal_dir: PathBuf,
) -> Vec<Probe> {
    let mut probes = vec![journal(journal_dir)];
    probes.extend(resources.into_iter().map(resource));
    probes.push(memory(cfg.memory_min_bytes));
    probes.push(fork());
    probes.push(scheduling(cfg.scheduling_lag_max_ms));
    probes
}

fn journal(dir: PathBuf) -> Probe {
    let dir = Arc::new(dir);
    Probe {
        name: "journal".into(),
        start: Box::new(move || {
            let dir = Arc::clone(&dir);
            blocking(move || write_and_sync(&dir))
        }),
    }
}

fn resource(r: Arc<dyn Resource>) -> Probe {
    Probe {
        name: format!("resource:{}", r.name()),
        start: Box::new(move || {
            let r = Arc::clone(&r);
            async move { r.health().await.map_err(|e| e.to_string()) }.boxed()
        }),
    }
}

fn memory(min_bytes: u64) -> Probe {
    Probe {
        name: "memory".into(),
        start: Box::new(move || blocking(move || memory_headroom(min_bytes))),
    }
}

fn fork() -> Probe {
    Probe {
        name: "fork".into(),
        start: Box::new(|| spawn_true().boxed()),
    }
}

fn scheduling(lag_max_ms: u64) -> Probe {
    Probe {
        name: "scheduling".into(),
        start: Box::new(move || timer_lag(lag_max_ms).boxed()),
    }
}

/// Runs `f` on the blocking pool; a panic there is a failure, not the monitor's end.
fn blocking(f: impl FnOnce() -> ProbeResult + Send + 'static) -> BoxFuture<'static, ProbeResult> {
    async move {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(format!("the probe's thread ended: {e}")))
    }
    .boxed()
}

/// Writes one page into a new file in `dir`, syncs it and lets it go.
pub(crate) fn write_and_sync(dir: &Path) -> ProbeResult {
    let page = [0x5Au8; JOURNAL_PROBE_BYTES];
    match unnamed_file(dir) {
        Ok(mut file) => write_page(&mut file, &page, dir),
        Err(e) if tmpfile_unsupported(&e) => named_write_and_sync(dir, &page),
        Err(e) => Err(format!("create a file in {}: {e}", dir.display())),
    }
}

fn unnamed_file(dir: &Path) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
    let fd = rustix::fs::open(dir, flags, Mode::from_bits_truncate(0o600))?;
    Ok(File::from(fd))
}

/// `O_TMPFILE` is refused with `EOPNOTSUPP` (or `EISDIR`/`EINVAL` by older kernels).
fn tmpfile_unsupported(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw_os_error);
    matches!(errno, Some(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL))
}

fn named_write_and_sync(dir: &Path, page: &[u8]) -> ProbeResult {
    let path = dir.join(format!(".health-probe-{}", std::process::id()));
    let written = File::create(&path)
        .map_err(|e| format!("create {}: {e}", path.display()))
        .and_then(|mut file| write_page(&mut file, page, dir));
    let removed =
        std::fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()));
    written.and(removed)
}

fn write_page(file: &mut File, page: &[u8], dir: &Path) -> ProbeResult {
    file.write_all(page)
        .map_err(|e| format!("write {} bytes in {}: {e}", page.len(), dir.display()))?;
    file.sync_data()
        .map_err(|e| format!("sync a file in {}: {e}", dir.display()))
}

fn memory_headroom(min_bytes: u64) -> ProbeResult {
    let text = std::fs::read_to_string(MEMINFO).map_err(|e| format!("read {MEMINFO}: {e}"))?;
    let available = mem_available_bytes(&text)?;
    if available < min_bytes {
        return Err(format!(
            "MemAvailable is {available} bytes, below memory_min_bytes = {min_bytes}"
        ));
    }
    Ok(())
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub(crate) fn mem_available_bytes(meminfo: &str) -> Result<u64, String> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .ok_or_else(|| format!("{MEMINFO} has no MemAvailable line"))?;
    let kib = line
        .trim()
        .strip_suffix("kB")
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or_else(|| format!("{MEMINFO}: cannot read MemAvailable {:?}", line.trim()))?;
    Ok(kib.saturating_mul(1024))
}

async fn spawn_true() -> ProbeResult {
    let status = tokio::process::Command::new(FORK_PROBE_PROGRAM)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("spawn {FORK_PROBE_PROGRAM}: {e}"))?;
    if !status.success() {
        return Err(format!("{FORK_PROBE_PROGRAM} ended with {status}"));
    }
    Ok(())
}

async fn timer_lag(lag_max_ms: u64) -> ProbeResult {
    let asked = Duration::from_millis(SCHEDULING_PROBE_SLEEP_MS);
    let started = Instant::now();
    tokio::time::sleep(asked).await;
    let late = started.elapsed().saturating_sub(asked);
    if late > Duration::from_millis(lag_max_ms) {
        return Err(format!(
            "a {SCHEDULING_PROBE_SLEEP_MS} ms timer fired {} ms late (scheduling_lag_max_ms = {lag_max_ms})",
            late.as_millis()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16000000 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(mem_available_bytes(text), Ok(2048 * 1024));
    }

    #[test]
    fn malformed_meminfo_is_an_error_not_a_panic() {
        for text in ["", "MemAvailable: lots\n", "MemAvailable: 12 MB\n"] {
            assert!(mem_available_bytes(text).is_err(), "{text:?}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_runtime_fails_the_scheduling_probe() {
        let probe = tokio::spawn(timer_lag(50));
        tokio::task::yield_now().await; // the probe's timer is armed
        std::thread::sleep(Duration::from_millis(200)); // the only thread, blocked
        let detail = probe.await.expect("probe task").expect_err("200 ms late");
        assert!(detail.contains("ms late"), "{detail}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_runtime_passes_the_scheduling_and_fork_probes() {
        assert_eq!(timer_lag(5000).await, Ok(()));
        assert_eq!(spawn_true().await, Ok(()));
    }

    #[test]
    fn journal_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(write_and_sync(dir.path()), Ok(()));
        let left = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(left, 0);
    }
}
