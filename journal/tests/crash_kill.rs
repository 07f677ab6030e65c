//! Crash test through a real process: a child process appends from many threads and reports each
//! record the moment `wait` says it is durable; the parent kills it with SIGKILL at an arbitrary
//! point, recovers the journal, and checks that every acknowledged record is there with exactly
//! its payload, that LSNs are contiguous from 1, and that nothing was recorded that no thread
//! appended. Three kill cycles run on the same directory, so recovery after recovery is covered.
//!
//! The child is this test binary itself, re-executed to run only
//! [`crash_child_appends_until_killed`] with `CONCORD_CRASH_CHILD_DIR` set; without that variable
//! the child test returns at once, so a normal test run passes it.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use journal::{Epoch, Journal, JournalConfig, Lsn, RecordKind};

const CHILD_DIR_ENV: &str = "CONCORD_CRASH_CHILD_DIR";
const CHILD_CYCLE_ENV: &str = "CONCORD_CRASH_CHILD_CYCLE";
const CHILD_TEST: &str = "crash_child_appends_until_killed";
/// Appending threads in the child.
const THREADS: u32 = 16;
/// The child stops appending by itself after this long, should the parent never kill it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
/// How long the parent waits for the acknowledgements it wants before it kills the child anyway.
const ACK_DEADLINE: Duration = Duration::from_secs(20);
/// Fewest acknowledgements a cycle must see for the test to mean anything.
const ACKS_MIN: usize = 200;
/// Acknowledgements to see before the kill, per cycle: different moments of the run.
const KILL_AFTER_ACKS: [usize; 3] = [3000, 1200, 2200];
const KIND: RecordKind = RecordKind::new(42, 1);

fn config() -> JournalConfig {
    JournalConfig {
        segment_bytes_max: 64 << 10,
        record_bytes_max: 16 << 10,
        queue_bytes_max: 1 << 20,
        create_if_missing: true,
        ..JournalConfig::default()
    }
}

/// Who appended a record: kill cycle, thread, and that thread's counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Origin {
    cycle: u32,
    thread: u32,
    counter: u64,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payload of a record: its origin, then filler whose length (mostly under 256 bytes, one in
/// eight between 1 and 9 KiB) and content follow from the origin.
fn payload(o: Origin) -> Vec<u8> {
    let seed = mix(u64::from(o.cycle) << 48 ^ u64::from(o.thread) << 40 ^ o.counter);
    let filler = if seed.is_multiple_of(8) {
        1024 + (seed >> 8) as usize % 8192
    } else {
        (seed >> 8) as usize % 256
    };
    let mut out = Vec::with_capacity(16 + filler);
    out.extend_from_slice(&o.cycle.to_le_bytes());
    out.extend_from_slice(&o.thread.to_le_bytes());
    out.extend_from_slice(&o.counter.to_le_bytes());
    let mut x = seed;
    out.extend((0..filler).map(|_| {
        x = mix(x);
        x as u8
    }));
    out
}

/// The origin a payload claims, if the payload is exactly what that origin appends.
fn origin_of(payload_bytes: &[u8]) -> Option<Origin> {
    let head = payload_bytes.get(..16)?;
    let o = Origin {
        cycle: u32::from_le_bytes(head[0..4].try_into().ok()?),
        thread: u32::from_le_bytes(head[4..8].try_into().ok()?),
        counter: u64::from_le_bytes(head[8..16].try_into().ok()?),
    };
    (o.thread < THREADS && payload(o) == payload_bytes).then_some(o)
}

// ---------------------------------------------------------------------------------------------
// The child.
// ---------------------------------------------------------------------------------------------

/// Not a test of its own: the body of the child process. Returns at once in a normal run.
#[test]
fn crash_child_appends_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let cycle: u32 = std::env::var(CHILD_CYCLE_ENV).unwrap().parse().unwrap();
    let journal = Arc::new(Journal::open(PathBuf::from(dir), config()).unwrap());
    let deadline = Instant::now() + CHILD_LIFETIME;
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let journal = Arc::clone(&journal);
            std::thread::spawn(move || append_until(&journal, cycle, thread, deadline))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Appends this thread's records one after the other, printing each once it is durable.
fn append_until(journal: &Journal, cycle: u32, thread: u32, deadline: Instant) {
    let epoch = Epoch(u64::from(cycle) + 1);
    let mut counter = 0;
    while Instant::now() < deadline {
        let o = Origin {
            cycle,
            thread,
            counter,
        };
        let lsn = journal
            .append(epoch, KIND, &payload(o))
            .unwrap()
            .wait()
            .unwrap();
        let mut out = std::io::stdout().lock();
        writeln!(out, "lsn {} {cycle} {thread} {counter}", lsn.0).unwrap();
        out.flush().unwrap();
        counter += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.
// ---------------------------------------------------------------------------------------------

/// Kills and reaps the child when dropped, so a failing parent leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Parses one complete line `lsn N CYCLE THREAD COUNTER` of the child.
fn parse_ack(line: &str) -> Option<(Lsn, Origin)> {
    let mut fields = line.strip_prefix("lsn ")?.split(' ');
    let mut next = || fields.next()?.trim().parse::<u64>().ok();
    let lsn = Lsn(next()?);
    let o = Origin {
        cycle: u32::try_from(next()?).ok()?,
        thread: u32::try_from(next()?).ok()?,
        counter: next()?,
    };
    Some((lsn, o))
}

/// Reads the child's stdout, sending every acknowledgement; a line cut by the kill is ignored.
fn read_acks(
    stdout: impl Read + Send + 'static,
    tx: mpsc::Sender<(Lsn, Origin)>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if !line.ends_with('\n') => return,
                Ok(_) => {
                    if let Some(ack) = parse_ack(&line) {
                        let _ = tx.send(ack);
                    }
                }
            }
        }
    })
}

/// Collects up to 64 KiB of the child's stderr, for the failure message.
fn read_stderr(stderr: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.take(64 << 10).read_to_string(&mut text);
        text
    })
}

/// Runs one child on `dir` until it has acknowledged `kill_after` records (or the deadline),
/// kills it with SIGKILL and returns every acknowledgement it printed.
fn run_and_kill(dir: &Path, cycle: u32, kill_after: usize) -> Vec<(Lsn, Origin)> {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_CYCLE_ENV, cycle.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let (tx, rx) = mpsc::channel();
    let stdout_reader = read_acks(child.0.stdout.take().unwrap(), tx);
    let stderr_reader = read_stderr(child.0.stderr.take().unwrap());

    let deadline = Instant::now() + ACK_DEADLINE;
    let mut acks = Vec::new();
    let mut child_ended = false;
    while acks.len() < kill_after {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(ack) => acks.push(ack),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => {
                child_ended = true;
                break;
            }
        }
    }
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    stdout_reader.join().unwrap();
    acks.extend(rx.try_iter());
    let stderr = stderr_reader.join().unwrap();
    assert!(
        !child_ended && status.signal() == Some(9),
        "cycle {cycle}: the child ended by itself ({status}) after {} acknowledgements; its \
         stderr:\n{stderr}",
        acks.len()
    );
    assert!(
        acks.len() >= ACKS_MIN,
        "cycle {cycle}: only {} acknowledgements within {ACK_DEADLINE:?}; child stderr:\n{stderr}",
        acks.len()
    );
    acks
}

/// Recovers the journal and checks it against every acknowledgement so far.
fn check_recovered(dir: &Path, acked: &BTreeMap<Lsn, Origin>, cycle: u32) -> usize {
    let journal = Journal::open(dir, config()).unwrap();
    let records: Vec<_> = journal
        .read_from(Lsn(1))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("cycle {cycle}: reading the recovered journal failed: {e}"));
    assert_eq!(journal.durable_lsn(), Lsn(records.len() as u64));
    let mut origins = Vec::with_capacity(records.len());
    let mut next_counter: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for (i, rec) in (1..).zip(&records) {
        assert_eq!(
            rec.lsn,
            Lsn(i),
            "cycle {cycle}: lsns are not contiguous from 1"
        );
        assert_eq!(rec.kind, KIND);
        let o = origin_of(&rec.payload).unwrap_or_else(|| {
            panic!("cycle {cycle}: record {i} holds a payload no thread appended")
        });
        assert!(
            o.cycle <= cycle,
            "cycle {cycle}: record {i} claims cycle {}",
            o.cycle
        );
        assert_eq!(rec.epoch, Epoch(u64::from(o.cycle) + 1), "record {i}");
        // A thread appends its next record only once the last one is durable, so each thread's
        // records are present from its first one on, in order, without gaps or repeats.
        let expected = next_counter.entry((o.cycle, o.thread)).or_insert(0);
        assert_eq!(o.counter, *expected, "record {i}: {o:?} out of order");
        *expected += 1;
        origins.push(o);
    }
    for (lsn, o) in acked {
        let found = origins.get(lsn.0 as usize - 1);
        assert_eq!(
            found,
            Some(o),
            "cycle {cycle}: acknowledged record {lsn} of {o:?} is lost or changed after recovery \
             ({} records recovered)",
            records.len()
        );
    }
    journal.close().unwrap();
    records.len()
}

#[test]
fn acknowledged_records_survive_sigkill_during_concurrent_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<Lsn, Origin> = BTreeMap::new();
    for (cycle, kill_after) in (0u32..).zip(KILL_AFTER_ACKS) {
        let started = Instant::now();
        let acks = run_and_kill(dir.path(), cycle, kill_after);
        let count = acks.len();
        for (lsn, o) in acks {
            assert_eq!(o.cycle, cycle);
            if let Some(earlier) = acked.insert(lsn, o) {
                panic!("lsn {lsn} acknowledged twice: to {earlier:?} and to {o:?}");
            }
        }
        let recovered = check_recovered(dir.path(), &acked, cycle);
        let segments = std::fs::read_dir(dir.path()).unwrap().count() - 1;
        println!(
            "cycle {cycle}: killed after {count} acknowledgements in {:.2} s; {recovered} records \
             in {segments} segments recovered, highest acknowledged lsn {}",
            started.elapsed().as_secs_f64(),
            acked.keys().next_back().map_or(0, |l| l.0)
        );
    }
}
