//! What the coordinator benchmarks share ([`crate::bench_commit`], [`crate::bench_mixed`],
//! [`crate::bench_pg`]): a closed-loop load of N clients for a time window, the latencies and
//! rate it measured, and the sizes and rounds of the files workloads.
//!
//! Each client runs its transaction again and again until the window closes and records each
//! one's latency; the rate is transactions over elapsed time, and the percentiles come from
//! every latency of the run (or of several runs added up).
//!
//! # Implementation caveats
//!
//! * A closed loop measures what N clients get, not the latency under a fixed arrival rate
//!   (coordinated omission is not corrected).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::latency::Latencies;

/// Latencies of one run (or of several, added up).
#[derive(Default)]
pub(crate) struct Measured {
    pub(crate) elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Measured {
    pub(crate) fn add(&mut self, other: Measured) {
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
    }

    /// Adds the latencies of transactions measured elsewhere (microseconds).
    pub(crate) fn extend(&mut self, latencies_us: Vec<u64>) {
        self.latencies_us.extend(latencies_us);
    }

    /// Every latency measured (microseconds).
    pub(crate) fn latencies_us(&self) -> &[u64] {
        &self.latencies_us
    }

    pub(crate) fn tx_per_s(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency at quantile `q` of every transaction measured, in milliseconds.
    pub(crate) fn percentile_ms(&self, q: f64) -> anyhow::Result<f64> {
        Ok(Latencies::from_us(&self.latencies_us)?.percentile_ms(q))
    }
}

/// Runs `clients` copies of `one` (given the client number and a counter) for `window`.
pub(crate) async fn load<F, Fut>(
    clients: usize,
    window: Duration,
    one: F,
) -> anyhow::Result<Measured>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let one = Arc::new(one);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (one, stop) = (Arc::clone(&one), Arc::clone(&stop));
        set.spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                one(client, n).await?;
                latencies.push(t0.elapsed().as_micros() as u64);
                n += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        });
    }
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us = Vec::new();
    while let Some(joined) = set.join_next().await {
        latencies_us.extend(joined??);
    }
    Ok(Measured {
        elapsed: started.elapsed(),
        latencies_us,
    })
}

/// Size of every file, mail and value the benchmarks write.
pub(crate) const FILE_BYTES: usize = 1024;

/// Rounds of the files benchmarks: the baseline and concord take turns, so that both meet the
/// same conditions (the file system's state drifts as files pile up).
pub(crate) const ROUNDS: u32 = 4;
