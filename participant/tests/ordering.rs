//! The journal order is the commit order (docs/design.md "Ordering"): round after round, two
//! transactions write the same path of a files resource concurrently (the second waits on the
//! first's path lock); the content left on the primary is that of the transaction whose `Commit`
//! record has the higher LSN, and a standby replaying every `Commit` record in LSN order ends with
//! the same tree.
//!
//! The first test goes through the participant API. On an idle primary the first writer's phase 2
//! always beats the second writer's whole put, prepare and decision, so it would pass even if the
//! files resource released a path's lock at prepare instead of commit. The second test therefore
//! drives the coordinator directly over a files resource whose phase-2 commits start after a
//! random delay ([`Slow`]): with locks released at prepare it fails within a few rounds.
//!
//! The interleavings are varied by a seeded generator; the seed is printed, and
//! `CONCORD_TEST_SEED=<seed>` replays a run.

#![allow(clippy::unwrap_used)]

mod common;

use common::{STEP_DEADLINE, commits, within};

use std::any::Any;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adapters::files::{FilesConfig, FilesResource, RedoEntry, decode_redo};
use adapters::{Epoch, Lsn, Resource, ResourceError, Vote, Xid};
use coordinator::{Coordinator, CoordinatorConfig, Outcome};
use journal::{Journal, JournalConfig};
use participant::{Concord, Config, ResourceConfig};
use tokio::sync::Barrier;

/// How many rounds of two conflicting writers.
const ROUNDS: u64 = 50;
/// The one path every writer of every round writes.
const PATH: &str = "shared/doc.txt";
/// The resource they write.
const RESOURCE: &str = "uploads";
/// How long the second writer may wait for the path: well above a commit, below the deadline.
const LOCK_WAIT_MS: u64 = 5_000;
/// Longest delay [`Slow`] puts before a phase-2 commit, in microseconds.
const COMMIT_DELAY_US_MAX: u64 = 10_000;

/// xorshift64*: small, seeded, good enough to vary timings.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var("CONCORD_TEST_SEED") {
        Ok(text) => text.parse().unwrap(),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// How one writer spends its time, drawn from the seed.
#[derive(Clone, Copy, Debug)]
struct Pace {
    /// `yield_now`s after the start barrier, before the put.
    yields_before_put: u64,
    /// Microseconds slept before the put (0: none).
    sleep_before_put_us: u64,
    /// Microseconds slept between the put and the commit (0: none).
    sleep_before_commit_us: u64,
    /// Size of the content (it starts with the xid, then filler).
    content_bytes: usize,
}

impl Pace {
    fn draw(rng: &mut Rng) -> Pace {
        let sleep = |rng: &mut Rng| match rng.below(3) {
            0 => 0,
            _ => rng.below(3_000),
        };
        Pace {
            yields_before_put: rng.below(4),
            sleep_before_put_us: sleep(rng),
            sleep_before_commit_us: sleep(rng),
            content_bytes: [64, 4 << 10, 200 << 10][rng.below(3) as usize],
        }
    }
}

/// What one writer did.
struct Written {
    xid: Xid,
    content: Vec<u8>,
    lsn: Lsn,
    put_started: Instant,
    commit_returned: Instant,
}

async fn pause_us(us: u64) {
    if us > 0 {
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}

/// How the writers reach the coordinator.
#[derive(Clone)]
enum Front {
    /// The participant API, as an application does.
    Participant(Concord),
    /// The coordinator API over a files resource whose phase 2 is delayed at random ([`Slow`]).
    Coordinator(Coordinator),
}

impl Front {
    /// Writes [`PATH`] in a transaction of its own and commits.
    async fn write(self, round: u64, pace: Pace, start: Arc<Barrier>) -> Written {
        match self {
            Front::Participant(concord) => {
                let mut tx = concord.begin().await.unwrap();
                let files = within("join", tx.files(RESOURCE)).await.unwrap();
                let xid = tx.xid();
                let content = content_of(round, xid, pace);
                let put_started = paced_start(pace, &start).await;
                within("put", files.put(PATH, &content[..])).await.unwrap();
                pause_us(pace.sleep_before_commit_us).await;
                let committed = within("commit", tx.commit()).await.unwrap();
                let outcome = Outcome::Committed { lsn: committed.lsn };
                written(round, xid, content, put_started, outcome)
            }
            Front::Coordinator(coordinator) => {
                let xid = coordinator.begin();
                let resource = within("join", coordinator.join(&xid, RESOURCE))
                    .await
                    .unwrap();
                let files = files(&resource).branch(&xid);
                let content = content_of(round, xid, pace);
                let put_started = paced_start(pace, &start).await;
                within("put", files.put(PATH, &content[..])).await.unwrap();
                pause_us(pace.sleep_before_commit_us).await;
                let outcome = within("commit", coordinator.commit(&xid)).await.unwrap();
                written(round, xid, content, put_started, outcome)
            }
        }
    }

    async fn wait_idle(&self) -> bool {
        match self {
            Front::Participant(concord) => concord.wait_idle(STEP_DEADLINE).await,
            Front::Coordinator(coordinator) => coordinator.wait_settled(STEP_DEADLINE).await,
        }
    }

    async fn close(self) -> bool {
        match self {
            Front::Participant(concord) => concord.close(STEP_DEADLINE).await,
            Front::Coordinator(coordinator) => coordinator.shutdown(STEP_DEADLINE).await,
        }
    }
}

/// The content a writer puts: its round and xid, then filler up to the drawn size.
fn content_of(round: u64, xid: Xid, pace: Pace) -> Vec<u8> {
    let mut content = format!("round {round}, written by {xid}\n").into_bytes();
    content.resize(pace.content_bytes.max(content.len()), b'.');
    content
}

/// Waits for the other writer, then for the drawn pause; returns when the put starts.
async fn paced_start(pace: Pace, start: &Barrier) -> Instant {
    start.wait().await;
    for _ in 0..pace.yields_before_put {
        tokio::task::yield_now().await;
    }
    pause_us(pace.sleep_before_put_us).await;
    Instant::now()
}

fn written(
    round: u64,
    xid: Xid,
    content: Vec<u8>,
    put_started: Instant,
    outcome: Outcome,
) -> Written {
    let commit_returned = Instant::now();
    let Outcome::Committed { lsn: Some(lsn) } = outcome else {
        panic!("round {round}: {xid} did not commit: {outcome:?}")
    };
    Written {
        xid,
        content,
        lsn,
        put_started,
        commit_returned,
    }
}

/// A files resource whose phase-2 commits start after a random delay, as a busy primary's may:
/// the window in which a path lock released too early would let the next writer's rename win.
struct Slow {
    inner: Arc<FilesResource>,
    rng: Mutex<Rng>,
}

impl Slow {
    fn delay(&self) -> Duration {
        let mut rng = self.rng.lock().unwrap();
        match rng.below(3) {
            0 => Duration::ZERO,
            _ => Duration::from_micros(rng.below(COMMIT_DELAY_US_MAX)),
        }
    }
}

#[async_trait::async_trait]
impl Resource for Slow {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn as_any(&self) -> &dyn Any {
        self.inner.as_any()
    }
    async fn begin(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.inner.begin(xid).await
    }
    async fn prepare(&self, xid: &Xid) -> Result<Vote, ResourceError> {
        self.inner.prepare(xid).await
    }
    async fn commit(&self, xid: &Xid) -> Result<(), ResourceError> {
        let delay = self.delay();
        tokio::time::sleep(delay).await;
        self.inner.commit(xid).await
    }
    async fn rollback(&self, xid: &Xid) -> Result<(), ResourceError> {
        self.inner.rollback(xid).await
    }
    async fn recover(&self) -> Result<Vec<Xid>, ResourceError> {
        self.inner.recover().await
    }
    async fn fence(&self, epoch: Epoch) -> Result<(), ResourceError> {
        self.inner.fence(epoch).await
    }
    async fn fence_epoch(&self) -> Result<Epoch, ResourceError> {
        self.inner.fence_epoch().await
    }
    async fn replay(&self, redo: &[u8], lsn: Lsn) -> Result<(), ResourceError> {
        self.inner.replay(redo, lsn).await
    }
    async fn applied_lsn(&self) -> Result<Lsn, ResourceError> {
        self.inner.applied_lsn().await
    }
}

fn files(resource: &Arc<dyn Resource>) -> &FilesResource {
    resource.as_any().downcast_ref::<FilesResource>().unwrap()
}

/// Ships the blobs a redo names from the primary's blob store to the standby's, as replication
/// does before the standby replays the redo.
fn ship_blobs(primary: &FilesResource, standby: &FilesResource, redo: &[u8]) {
    for entry in decode_redo(redo).unwrap() {
        let RedoEntry::Put { id, bytes, .. } = entry else {
            continue;
        };
        if standby.blob_store().contains(&id) {
            continue;
        }
        let content = fs::read(primary.blob_store().path_of(&id)).unwrap();
        let stored = standby.blob_store().put(&content[..]).unwrap();
        assert_eq!((stored.id, stored.bytes), (id, bytes));
    }
}

/// Replays on the standby, in LSN order, every `Commit` record's branch of [`RESOURCE`] above
/// what it has applied; returns how many it replayed.
async fn replay_new(data_dir: &Path, primary: &FilesResource, standby: &FilesResource) -> usize {
    let applied = standby.applied_lsn().await.unwrap();
    let mut replayed = 0;
    for (lsn, (_, branches)) in commits(data_dir).range(applied.next()..) {
        for (name, redo) in branches {
            assert_eq!(name, RESOURCE, "a Commit record names another resource");
            ship_blobs(primary, standby, redo);
            within("replay", standby.replay(redo, *lsn)).await.unwrap();
            replayed += 1;
        }
    }
    replayed
}

/// Every user file under `root` (the private area left out): relative path → content.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            if relative.starts_with(".concord") {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.insert(relative, fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn config(dir: &Path) -> Config {
    let mut config = Config::embedded(dir);
    config.resources.retain(|name, _| name == RESOURCE);
    for resource in config.resources.values_mut() {
        if let ResourceConfig::Files { lock_wait_ms, .. } = resource {
            *lock_wait_ms = LOCK_WAIT_MS;
        }
    }
    config
}

/// What the rounds saw.
struct Rounds {
    /// Rounds in which the second writer's put started before the first's commit returned.
    overlapped: u64,
    /// Rounds in which the writer spawned first committed second.
    first_spawned_later: u64,
}

/// Runs [`ROUNDS`] rounds of two writers through `front`, checking after each one the primary
/// (`primary`, journal in `data_dir`) and a standby (`standby`) that replays the new `Commit`
/// records in LSN order.
async fn run_rounds(
    front: &Front,
    data_dir: &Path,
    primary: &FilesResource,
    standby: &FilesResource,
    rng: &mut Rng,
    seed: u64,
) -> Rounds {
    let mut seen = Rounds {
        overlapped: 0,
        first_spawned_later: 0,
    };
    for round in 0..ROUNDS {
        let paces = [Pace::draw(rng), Pace::draw(rng)];
        let start = Arc::new(Barrier::new(2));
        let [a, b] =
            paces.map(|pace| tokio::spawn(front.clone().write(round, pace, Arc::clone(&start))));
        let (a, b) = within("round", async { (a.await, b.await) }).await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            within("phase 2", front.wait_idle()).await,
            "round {round}: phase 2 did not settle"
        );

        let records = commits(data_dir);
        let lsn_of = |w: &Written| {
            let found: Vec<Lsn> = records
                .iter()
                .filter(|(_, (xid, _))| *xid == w.xid)
                .map(|(lsn, _)| *lsn)
                .collect();
            assert_eq!(
                found,
                vec![w.lsn],
                "round {round}: the Commit records of {} (seed {seed})",
                w.xid
            );
            w.lsn
        };
        let (earlier, later) = if lsn_of(&a) < lsn_of(&b) {
            (&a, &b)
        } else {
            (&b, &a)
        };
        seen.first_spawned_later += u64::from(std::ptr::eq(later, &a));
        seen.overlapped += u64::from(later.put_started < earlier.commit_returned);
        let on_primary = fs::read(primary.root().join(PATH)).unwrap();
        assert!(
            on_primary == later.content,
            "round {round} (seed {seed}, paces {paces:?}): the primary holds the content of {} \
             but the Commit record of {} (lsn {}) is after that of {} (lsn {})",
            String::from_utf8_lossy(&on_primary[..on_primary.len().min(60)]).trim_end_matches('.'),
            later.xid,
            later.lsn,
            earlier.xid,
            earlier.lsn
        );

        let replayed = replay_new(data_dir, primary, standby).await;
        assert_eq!(replayed, 2, "round {round}: Commit records replayed");
        let on_standby = fs::read(standby.root().join(PATH)).unwrap();
        assert!(
            on_standby == on_primary,
            "round {round} (seed {seed}): replaying in LSN order gives another content than the primary's"
        );
    }
    assert!(
        seen.overlapped * 4 >= ROUNDS,
        "only {} of {ROUNDS} rounds had the two writers overlap (seed {seed}): the lock was hardly exercised",
        seen.overlapped
    );
    assert_eq!(tree(primary.root()), tree(standby.root()));
    assert_eq!(
        standby.applied_lsn().await.unwrap(),
        *commits(data_dir).keys().last().unwrap()
    );
    seen
}

fn open_standby(root: &Path) -> Arc<FilesResource> {
    let config = FilesConfig {
        create_if_missing: true,
        ..FilesConfig::default()
    };
    FilesResource::open(RESOURCE, root, config).unwrap()
}

fn report(what: &str, seen: &Rounds, elapsed: Duration) {
    println!(
        "ordering ({what}): {ROUNDS} rounds in {elapsed:?}; the second writer's put started \
         before the first's commit returned in {} rounds; the writer spawned first committed \
         second in {}",
        seen.overlapped, seen.first_spawned_later
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_later_commit_record_holds_the_content_on_the_primary_and_after_replay() {
    let seed = seed();
    println!("ordering: seed {seed} (CONCORD_TEST_SEED={seed} replays this run)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("primary");
    let concord = within("open", Concord::open(config(&data_dir)))
        .await
        .unwrap();
    let primary_resource = Arc::clone(concord.coordinator().resource(RESOURCE).unwrap());
    let primary = files(&primary_resource);
    let standby = open_standby(&dir.path().join("standby"));

    let started = Instant::now();
    let front = Front::Participant(concord);
    let seen = run_rounds(&front, &data_dir, primary, &standby, &mut rng, seed).await;
    report("participant API", &seen, started.elapsed());
    drop(primary_resource);
    assert!(front.close().await);

    // Replayed again from the closed journal, from scratch, onto a second standby: the same tree.
    let again = open_standby(&dir.path().join("standby-again"));
    let mut replayed = 0;
    for (lsn, (_, branches)) in commits(&data_dir) {
        for (_, redo) in branches {
            ship_blobs(&standby, &again, &redo);
            within("replay", again.replay(&redo, lsn)).await.unwrap();
            replayed += 1;
        }
    }
    assert_eq!(replayed, 2 * ROUNDS);
    assert_eq!(tree(again.root()), tree(standby.root()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_holds_when_phase_two_is_delayed() {
    let seed = seed();
    println!("ordering, delayed phase 2: seed {seed} (CONCORD_TEST_SEED={seed} replays this run)");
    // Not the other test's sequence.
    let mut rng = Rng::new(seed ^ 0x5157);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("primary");
    let files_config = FilesConfig {
        lock_wait_ms_max: LOCK_WAIT_MS,
        create_if_missing: true,
        ..FilesConfig::default()
    };
    let inner = FilesResource::open(RESOURCE, &data_dir.join(RESOURCE), files_config).unwrap();
    let slow = Arc::new(Slow {
        inner: Arc::clone(&inner),
        rng: Mutex::new(Rng::new(rng.next())),
    });
    let journal_config = JournalConfig {
        create_if_missing: true,
        ..JournalConfig::default()
    };
    let journal = Journal::open(data_dir.join("journal"), journal_config).unwrap();
    let opened = Coordinator::open(
        CoordinatorConfig::default(),
        journal,
        vec![slow as Arc<dyn Resource>],
    );
    let (coordinator, _) = within("open", opened).await.unwrap();
    let standby = open_standby(&dir.path().join("standby"));

    let started = Instant::now();
    let front = Front::Coordinator(coordinator);
    let seen = run_rounds(&front, &data_dir, &inner, &standby, &mut rng, seed).await;
    report("delayed phase 2", &seen, started.elapsed());
    assert!(front.close().await);
}
