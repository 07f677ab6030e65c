//! The health monitor on real directories, a real full file system (a small tmpfs; needs
//! root), real resources' canaries, a watchdog device given as a regular file, and a small
//! test resource whose canary can fail or hang.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::any::Any;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adapters::testing::{Tmpfs, fill_up};
use adapters::{Epoch, Lsn, Resource, ResourceError, Vote, Xid};
use replicator::health::{HealthConfig, HealthError, HealthMonitor, Verdict, Watchdog};

/// How long a test waits for a verdict before it fails.
const WAIT_MS_MAX: u64 = 10_000;

/// Probes often, with room for a loaded machine (2 cores shared by several builds).
fn quick() -> HealthConfig {
    HealthConfig {
        probe_interval_ms: 20,
        probe_deadline_ms: 3000,
        memory_min_bytes: 1 << 20,
        scheduling_lag_max_ms: 3000,
    }
}

/// What the test resource's canary does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Canary {
    Answers,
    Fails,
    Hangs,
}

/// A resource with only a canary; every other call is refused.
struct Probed {
    name: String,
    canary: Mutex<Canary>,
}

impl Probed {
    fn new(name: &str, canary: Canary) -> Arc<Probed> {
        Arc::new(Probed {
            name: name.into(),
            canary: Mutex::new(canary),
        })
    }

    fn set(&self, canary: Canary) {
        *self.canary.lock().unwrap() = canary;
    }

    fn refuse<T>(&self) -> Result<T, ResourceError> {
        Err(ResourceError::rejected(
            &self.name,
            "a health-test resource does no work",
        ))
    }
}

#[async_trait::async_trait]
impl Resource for Probed {
    fn name(&self) -> &str {
        &self.name
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    async fn begin(&self, _: &Xid) -> Result<(), ResourceError> {
        self.refuse()
    }
    async fn prepare(&self, _: &Xid) -> Result<Vote, ResourceError> {
        self.refuse()
    }
    async fn commit(&self, _: &Xid) -> Result<(), ResourceError> {
        self.refuse()
    }
    async fn rollback(&self, _: &Xid) -> Result<(), ResourceError> {
        self.refuse()
    }
    async fn recover(&self) -> Result<Vec<Xid>, ResourceError> {
        self.refuse()
    }
    async fn fence(&self, _: Epoch) -> Result<(), ResourceError> {
        self.refuse()
    }
    async fn fence_epoch(&self) -> Result<Epoch, ResourceError> {
        self.refuse()
    }
    async fn replay(&self, _: &[u8], _: Lsn) -> Result<(), ResourceError> {
        self.refuse()
    }
    async fn applied_lsn(&self) -> Result<Lsn, ResourceError> {
        self.refuse()
    }
    async fn health(&self) -> Result<(), ResourceError> {
        let canary = *self.canary.lock().unwrap();
        match canary {
            Canary::Answers => Ok(()),
            Canary::Fails => Err(ResourceError::Unavailable {
                resource: self.name.clone(),
                message: "the canary failed on purpose".into(),
            }),
            Canary::Hangs => std::future::pending().await,
        }
    }
}

/// Waits until `want` holds for the monitor's verdict; panics with the last verdict after
/// [`WAIT_MS_MAX`].
async fn wait_for(monitor: &HealthMonitor, what: &str, want: impl Fn(&Verdict) -> bool) -> Verdict {
    let until = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
    loop {
        let verdict = monitor.verdict();
        if want(&verdict) {
            return verdict;
        }
        assert!(
            Instant::now() < until,
            "no verdict {what} within {WAIT_MS_MAX} ms; the last: {verdict:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn healthy(v: &Verdict) -> bool {
    v.healthy
}

fn failed(probe: &'static str) -> impl Fn(&Verdict) -> bool {
    move |v: &Verdict| !v.healthy && v.failures.iter().any(|f| f.probe == probe)
}

fn start(cfg: HealthConfig, dir: &Path, resources: Vec<Arc<dyn Resource>>) -> Arc<HealthMonitor> {
    HealthMonitor::start(cfg, resources, dir.to_path_buf(), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_node_is_healthy_and_leaves_nothing_in_its_journal_directory() {
    let dir = tempfile::tempdir().unwrap();
    let monitor = start(quick(), dir.path(), vec![]);
    let verdict = wait_for(&monitor, "healthy", healthy).await;
    assert!(verdict.failures.is_empty(), "{verdict:?}");
    assert_eq!(monitor.sick_for(), None);
    monitor.stop();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_resources_answer_their_canaries() {
    let dir = tempfile::tempdir().unwrap();
    let config = adapters::files::FilesConfig {
        create_if_missing: true,
        ..Default::default()
    };
    let files =
        adapters::files::FilesResource::open("uploads", &dir.path().join("files"), config).unwrap();
    let resources: Vec<Arc<dyn Resource>> = vec![files];
    let journal = dir.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    let monitor = start(quick(), &journal, resources);
    wait_for(&monitor, "healthy", healthy).await;
    monitor.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_directory_on_a_full_file_system_is_sick_then_healthy_with_room() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let _tmpfs = Tmpfs::mount(&journal, "1m");
    let filler = journal.join("filler");
    fill_up(&filler);
    let monitor = start(quick(), &journal, vec![]);
    let verdict = wait_for(&monitor, "sick: journal", failed("journal")).await;
    assert_eq!(
        verdict.failures.len(),
        1,
        "only the journal fails: {verdict:?}"
    );
    std::fs::remove_file(&filler).unwrap();
    wait_for(&monitor, "healthy again", healthy).await;
    monitor.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_resource_makes_the_node_sick_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let canary = Probed::new("outbox", Canary::Fails);
    let monitor = start(quick(), dir.path(), vec![canary]);
    let verdict = wait_for(&monitor, "sick: resource:outbox", failed("resource:outbox")).await;
    let failure = &verdict.failures[0];
    assert!(
        failure.detail.contains("the canary failed on purpose"),
        "{failure:?}"
    );
    monitor.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sick_for_grows_while_sick_and_resets_when_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let canary = Probed::new("index", Canary::Fails);
    let monitor = start(quick(), dir.path(), vec![canary.clone()]);
    wait_for(&monitor, "sick", failed("resource:index")).await;
    let first = monitor.sick_for().expect("sick, so sick_for is known");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = monitor.sick_for().expect("still sick");
    assert!(
        later >= first + Duration::from_millis(100),
        "{first:?} then {later:?}"
    );
    canary.set(Canary::Answers);
    wait_for(&monitor, "healthy", healthy).await;
    assert_eq!(monitor.sick_for(), None);
    canary.set(Canary::Fails);
    wait_for(&monitor, "sick again", failed("resource:index")).await;
    let again = monitor.sick_for().expect("sick again");
    assert!(
        again < later,
        "counted from the new sickness: {again:?} after {later:?}"
    );
    monitor.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_memory_is_sick_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HealthConfig {
        memory_min_bytes: u64::MAX,
        ..quick()
    };
    let monitor = start(cfg, dir.path(), vec![]);
    let verdict = wait_for(&monitor, "sick: memory", failed("memory")).await;
    assert_eq!(verdict.failures.len(), 1, "{verdict:?}");
    assert!(
        verdict.failures[0].detail.contains("MemAvailable"),
        "{verdict:?}"
    );
    monitor.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_probe_fails_by_the_deadline_and_the_monitor_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HealthConfig {
        probe_deadline_ms: 300,
        ..quick()
    };
    let canary = Probed::new("stuck", Canary::Hangs);
    let started = Instant::now();
    let monitor = start(cfg, dir.path(), vec![canary]);
    let verdict = wait_for(&monitor, "sick: resource:stuck", failed("resource:stuck")).await;
    assert!(
        started.elapsed() < Duration::from_millis(300 + 2000),
        "reported after {:?}",
        started.elapsed()
    );
    assert!(
        verdict.failures[0]
            .detail
            .contains("no answer within 300 ms"),
        "{verdict:?}"
    );
    // The next rounds run, and do not start a second probe behind the hung one.
    let verdict = wait_for(&monitor, "a later round", |v| {
        v.failures
            .iter()
            .any(|f| f.detail.contains("still running"))
    })
    .await;
    assert_eq!(
        verdict.failures.len(),
        1,
        "only the hung probe fails: {verdict:?}"
    );
    assert!(verdict.checked_ms_ago < 1000, "{verdict:?}");
    monitor.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_petted_while_healthy_never_while_sick_and_disarmed_at_stop() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("watchdog");
    std::fs::write(&device, b"").unwrap();
    let journal = dir.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    let canary = Probed::new("index", Canary::Answers);
    let watchdog = Watchdog::open(&device).unwrap();
    let resources: Vec<Arc<dyn Resource>> = vec![canary.clone()];
    let monitor = HealthMonitor::start(quick(), resources, journal, Some(watchdog));
    let pets = || std::fs::read(&device).unwrap();
    wait_until("three pets while healthy", || pets().len() >= 3).await;

    canary.set(Canary::Fails);
    wait_for(&monitor, "sick", failed("resource:index")).await;
    let while_sick = pets();
    let rounds_later = monitor.verdict().checked_ms_ago;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        monitor.verdict().checked_ms_ago < 200 + rounds_later,
        "rounds went on"
    );
    assert_eq!(pets(), while_sick, "petted while sick");
    assert!(!while_sick.contains(&b'V'));

    canary.set(Canary::Answers);
    wait_until("petted again once healthy", || {
        pets().len() > while_sick.len()
    })
    .await;
    monitor.stop();
    let last = pets();
    assert_eq!(last.last(), Some(&b'V'), "magic close at stop");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pets(), last, "nothing after the magic close");
}

#[test]
fn a_missing_watchdog_device_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Watchdog::open(&dir.path().join("none")).unwrap_err();
    assert!(matches!(err, HealthError::WatchdogOpen { .. }), "{err:?}");
    assert!(err.to_string().contains("softdog"), "{err}");
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
    while !cond() {
        assert!(Instant::now() < until, "not {what} within {WAIT_MS_MAX} ms");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
