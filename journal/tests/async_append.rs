//! Appending never blocks the calling thread while the queue is full: the wait for room happens
//! inside the `Appending` future (or in its blocking `wait`). Checked on a current-thread tokio
//! runtime whose only thread must keep running other tasks, with the flusher stalled (the
//! `hold_flusher` testing aid) until a task on that same thread lets it go; and the order of one
//! caller's appends, `append_nowait` on a full queue, and the size limit on a full queue.

// A test fails by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use journal::{Epoch, Journal, JournalConfig, JournalError, Lsn, RecordKind};

const KIND: RecordKind = RecordKind::new(4, 1);
const APPENDERS: u64 = 32;
const RECORDS_EACH: u64 = 20;
const PAYLOAD_BYTES: usize = 300;
/// Longest a run may take before the test calls it a deadlock.
const DEADLINE: Duration = Duration::from_secs(20);

/// A queue of 1 KiB: three records fill it.
fn tiny_queue(hold: &Arc<AtomicBool>) -> JournalConfig {
    JournalConfig {
        record_bytes_max: 1024,
        queue_bytes_max: 1024,
        create_if_missing: true,
        hold_flusher: Some(Arc::clone(hold)),
        ..JournalConfig::default()
    }
}

fn payload(task: u64, i: u64) -> Vec<u8> {
    let mut p = vec![(task * 31 + i) as u8; PAYLOAD_BYTES];
    p[..8].copy_from_slice(&task.to_le_bytes());
    p[8..16].copy_from_slice(&i.to_le_bytes());
    p
}

/// Runs `body` in its own thread, and fails when it does not finish within the deadline (a
/// thread blocked for room in the queue never does).
fn within_deadline<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static, what: &str) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(body());
    });
    rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
        panic!("{what}: no result within {DEADLINE:?}: an appender blocked the runtime's thread")
    })
}

#[test]
fn many_appenders_on_a_current_thread_runtime_with_a_tiny_queue_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let hold = Arc::new(AtomicBool::new(true));
    let config = tiny_queue(&hold);
    let lsns = within_deadline(
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async move {
                let journal = Arc::new(Journal::open(&path, config).unwrap());
                let appenders: Vec<_> = (0..APPENDERS)
                    .map(|task| {
                        let journal = Arc::clone(&journal);
                        tokio::spawn(async move {
                            let mut lsns = Vec::new();
                            for i in 0..RECORDS_EACH {
                                let appending =
                                    journal.append(Epoch(1), KIND, &payload(task, i)).unwrap();
                                lsns.push(appending.await.unwrap());
                            }
                            lsns
                        })
                    })
                    .collect();
                // The stalled disk comes back only if this task gets the thread.
                let release = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    hold.store(false, Ordering::Release);
                });
                let mut all = Vec::new();
                for a in appenders {
                    all.push(a.await.unwrap());
                }
                release.await.unwrap();
                journal.close().unwrap();
                all
            })
        },
        "32 appenders",
    );
    let mut every: Vec<u64> = Vec::new();
    for task_lsns in &lsns {
        assert!(
            task_lsns.windows(2).all(|w| w[0] < w[1]),
            "one task's records out of order: {task_lsns:?}"
        );
        every.extend(task_lsns.iter().map(|l| l.0));
    }
    every.sort_unstable();
    assert_eq!(every, (1..=APPENDERS * RECORDS_EACH).collect::<Vec<_>>());

    // Every record is on disk under the LSN its appender was told.
    let journal = Journal::open(dir.path(), JournalConfig::default()).unwrap();
    let records: Vec<_> = journal
        .read_from(Lsn(1))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (task, task_lsns) in lsns.iter().enumerate() {
        for (i, lsn) in task_lsns.iter().enumerate() {
            assert_eq!(
                records[lsn.0 as usize - 1].payload,
                payload(task as u64, i as u64)
            );
        }
    }
}

#[test]
fn one_callers_appends_keep_their_order_while_the_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    within_deadline(move || appends_in_order(&path), "appends on a full queue");
}

fn appends_in_order(path: &std::path::Path) {
    let hold = Arc::new(AtomicBool::new(true));
    let journal = Journal::open(path, tiny_queue(&hold)).unwrap();
    // Twenty appends and twenty nowait appends, interleaved, none waited for: each returns at
    // once although the queue holds three records and the flusher takes nothing.
    let mut pending = Vec::new();
    for i in 0..20 {
        pending.push(journal.append(Epoch(1), KIND, &payload(0, 2 * i)).unwrap());
        journal
            .append_nowait(Epoch(1), KIND, &payload(0, 2 * i + 1))
            .unwrap();
    }
    // A record over the limit is refused at once, full queue or not; nothing queued.
    let over = journal.append(Epoch(1), KIND, &[0u8; 1024]);
    assert!(matches!(over, Err(JournalError::RecordTooLarge { .. })));
    assert_eq!(journal.durable_lsn(), Lsn::ZERO, "the flusher is held");
    hold.store(false, Ordering::Release);
    let lsns: Vec<Lsn> = pending.into_iter().map(|a| a.wait().unwrap()).collect();
    assert_eq!(lsns, (0..20).map(|i| Lsn(2 * i + 1)).collect::<Vec<_>>());
    journal.close().unwrap();
    let journal = Journal::open(path, JournalConfig::default()).unwrap();
    let payloads: Vec<Vec<u8>> = journal
        .read_from(Lsn(1))
        .unwrap()
        .map(|r| r.unwrap().payload)
        .collect();
    assert_eq!(payloads, (0..40).map(|i| payload(0, i)).collect::<Vec<_>>());
}
