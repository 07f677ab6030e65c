//! The monitor: a task that runs a round of probes every interval, and the verdict it keeps.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use adapters::Resource;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::probes::{self, Probe, ProbeResult};
use super::{HealthConfig, ProbeFailure, Verdict, Watchdog};

/// Gauge: 1 while the latest round found the node healthy, else 0.
pub const HEALTHY_METRIC: &str = "concord_health_healthy";
/// Counter: rounds in which a probe failed (label `probe`).
pub const PROBE_FAILURES_METRIC: &str = "concord_health_probe_failures_total";

/// Runs the probes of a node every `probe_interval_ms` and keeps its [`Verdict`]; see the
/// [module documentation](super).
pub struct HealthMonitor {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// What the monitor's task and its readers share.
struct Shared {
    started: Instant,
    tracker: Mutex<Tracker>,
    watchdog: Mutex<Option<Watchdog>>,
}

impl HealthMonitor {
    /// Starts the monitor's task on the current tokio runtime: probes of the journal
    /// directory `journal_dir`, of each resource, of memory, fork and scheduling; `watchdog`,
    /// when given, is petted after each healthy round. Call [`HealthMonitor::stop`] to end it.
    pub fn start(
        cfg: HealthConfig,
        resources: Vec<Arc<dyn Resource>>,
        journal_dir: PathBuf,
        watchdog: Option<Watchdog>,
    ) -> Arc<HealthMonitor> {
        let shared = Arc::new(Shared {
            started: Instant::now(),
            tracker: Mutex::new(Tracker::default()),
            watchdog: Mutex::new(watchdog),
        });
        let probes = probes::all(&cfg, resources, journal_dir);
        let task = tokio::spawn(run(cfg, probes, Arc::clone(&shared)));
        Arc::new(HealthMonitor {
            shared,
            task: Mutex::new(Some(task)),
        })
    }

    /// The verdict of the latest round (not healthy, probe `monitor`, before the first).
    pub fn verdict(&self) -> Verdict {
        let tracker = lock(&self.shared.tracker);
        match &tracker.latest {
            Some(round) => Verdict {
                healthy: round.failures.is_empty(),
                failures: round.failures.clone(),
                checked_ms_ago: millis(round.finished.elapsed()),
            },
            None => Verdict {
                healthy: false,
                failures: vec![ProbeFailure {
                    probe: "monitor".into(),
                    detail: "no round of probes has finished yet".into(),
                }],
                checked_ms_ago: millis(self.shared.started.elapsed()),
            },
        }
    }

    /// How long the node has been sick without a healthy round in between; `None` while
    /// healthy (and before the first round).
    pub fn sick_for(&self) -> Option<Duration> {
        lock(&self.shared.tracker).sick_since.map(|t| t.elapsed())
    }

    /// Ends the monitor's task (and the probes still running, except a thread stuck in the
    /// kernel, which ends on its own) and disarms the watchdog. Idempotent.
    pub fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        let watchdog = lock(&self.shared.watchdog).take();
        if let Some(Err(e)) = watchdog.map(Watchdog::disarm) {
            tracing::error!("disarm the watchdog at stop: {e}");
        }
    }
}

impl Drop for HealthMonitor {
    /// Ends the task; the watchdog is left armed (only [`HealthMonitor::stop`] is a clean stop).
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// The monitor's loop: a round every interval, recorded.
async fn run(cfg: HealthConfig, probes: Vec<Probe>, shared: Arc<Shared>) {
    let deadline = Duration::from_millis(cfg.probe_deadline_ms);
    let mut slots: Vec<Option<Running>> = probes.iter().map(|_| None).collect();
    let mut ticker = tokio::time::interval(Duration::from_millis(cfg.probe_interval_ms.max(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pet_failed = false;
    loop {
        ticker.tick().await;
        let failures = round(&probes, &mut slots, deadline).await;
        let healthy = failures.is_empty();
        record(&shared, failures);
        if healthy {
            pet(&shared, &mut pet_failed);
        }
    }
}

/// A probe's task, aborted when dropped (so no probe outlives the monitor's task).
struct Running {
    handle: JoinHandle<ProbeResult>,
    started: Instant,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Starts every probe whose previous task has ended, and collects the failures by `deadline`.
async fn round(
    probes: &[Probe],
    slots: &mut [Option<Running>],
    deadline: Duration,
) -> Vec<ProbeFailure> {
    let mut failures = Vec::new();
    let mut started = Vec::with_capacity(probes.len());
    for (probe, slot) in probes.iter().zip(slots.iter_mut()) {
        if let Some(stuck) = slot.as_ref().filter(|r| !r.handle.is_finished()) {
            failures.push(failure(probe, still_running(stuck.started, deadline)));
            started.push(false);
            continue;
        }
        *slot = Some(Running {
            handle: tokio::spawn((probe.start)()),
            started: Instant::now(),
        });
        started.push(true);
    }
    let until = tokio::time::Instant::now() + deadline;
    for ((probe, slot), _) in probes
        .iter()
        .zip(slots.iter_mut())
        .zip(started)
        .filter(|(_, s)| *s)
    {
        if let Some(detail) = settle(slot, until, deadline).await {
            failures.push(failure(probe, detail));
        }
    }
    failures.sort_by(|a, b| a.probe.cmp(&b.probe));
    failures
}

/// Waits for a probe started this round until `until`: `Some(detail)` when it failed or did
/// not answer (then it stays in its slot, still running).
async fn settle(
    slot: &mut Option<Running>,
    until: tokio::time::Instant,
    deadline: Duration,
) -> Option<String> {
    let running = slot.as_mut()?;
    let detail = match tokio::time::timeout_at(until, &mut running.handle).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(detail))) => Some(detail),
        Ok(Err(e)) => Some(format!("the probe's task ended: {e}")),
        Err(_) => return Some(format!("no answer within {} ms", deadline.as_millis())),
    };
    *slot = None;
    detail
}

fn still_running(started: Instant, deadline: Duration) -> String {
    format!(
        "no answer within {} ms; the previous probe is still running after {} ms",
        deadline.as_millis(),
        started.elapsed().as_millis()
    )
}

fn failure(probe: &Probe, detail: String) -> ProbeFailure {
    ProbeFailure {
        probe: probe.name.clone(),
        detail,
    }
}

/// Records a round: the tracker, the metrics, and a log line when the verdict changed.
fn record(shared: &Shared, failures: Vec<ProbeFailure>) {
    metrics::gauge!(HEALTHY_METRIC).set(if failures.is_empty() { 1.0 } else { 0.0 });
    for f in &failures {
        metrics::counter!(PROBE_FAILURES_METRIC, "probe" => f.probe.clone()).increment(1);
    }
    let change = lock(&shared.tracker).observe(failures.clone(), Instant::now());
    match change {
        Change::None => {}
        Change::Sick => tracing::warn!("node is sick: {}", summary(&failures)),
        Change::Worse => tracing::warn!("node is still sick, now: {}", summary(&failures)),
        Change::Healthy => tracing::info!("node is healthy again"),
    }
}

fn summary(failures: &[ProbeFailure]) -> String {
    let each: Vec<String> = failures
        .iter()
        .map(|f| format!("{}: {}", f.probe, f.detail))
        .collect();
    each.join("; ")
}

/// Pets the watchdog, if any; a failed write is logged once until a write succeeds again.
fn pet(shared: &Shared, pet_failed: &mut bool) {
    let mut watchdog = lock(&shared.watchdog);
    let Some(watchdog) = watchdog.as_mut() else {
        return;
    };
    match watchdog.pet() {
        Ok(()) => *pet_failed = false,
        Err(e) if !*pet_failed => {
            *pet_failed = true;
            tracing::error!("{e}");
        }
        Err(_) => {}
    }
}

/// What the latest round found, and since when the node is sick (pure: times are inputs).
#[derive(Default)]
struct Tracker {
    latest: Option<Round>,
    sick_since: Option<Instant>,
}

struct Round {
    failures: Vec<ProbeFailure>,
    finished: Instant,
}

/// How a round changed the verdict, for the log.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    Sick,
    Worse,
    Healthy,
}

impl Tracker {
    fn observe(&mut self, failures: Vec<ProbeFailure>, now: Instant) -> Change {
        let was_sick = self.latest.as_ref().map(|r| !r.failures.is_empty());
        let same_probes = self
            .latest
            .as_ref()
            .is_some_and(|r| probe_names(&r.failures) == probe_names(&failures));
        let sick = !failures.is_empty();
        self.sick_since = if sick {
            self.sick_since.or(Some(now))
        } else {
            None
        };
        self.latest = Some(Round {
            failures,
            finished: now,
        });
        match (was_sick, sick) {
            (Some(true), false) => Change::Healthy,
            (Some(true), true) if !same_probes => Change::Worse,
            (Some(false) | None, true) => Change::Sick,
            _ => Change::None,
        }
    }
}

fn probe_names(failures: &[ProbeFailure]) -> Vec<&str> {
    failures.iter().map(|f| f.probe.as_str()).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Locks a mutex whose holders never panic while holding it; a poisoned one is still usable
/// (the data is a snapshot that each round replaces).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sick(probe: &str) -> Vec<ProbeFailure> {
        vec![ProbeFailure {
            probe: probe.into(),
            detail: "x".into(),
        }]
    }

    #[test]
    fn a_change_is_reported_once_and_sick_since_holds() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(t.observe(vec![], t0), Change::None);
        assert_eq!(t.observe(sick("journal"), t0), Change::Sick);
        assert_eq!(t.observe(sick("journal"), t1), Change::None);
        assert_eq!(t.sick_since, Some(t0));
        assert_eq!(t.observe(sick("memory"), t1), Change::Worse);
        assert_eq!(t.sick_since, Some(t0));
        assert_eq!(t.observe(vec![], t1), Change::Healthy);
        assert_eq!(t.sick_since, None);
        assert_eq!(t.observe(vec![], t1), Change::None);
    }
}
