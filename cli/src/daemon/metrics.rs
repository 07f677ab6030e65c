//! The daemon's Prometheus endpoint: the `metrics` facade's recorder, and an HTTP listener
//! that serves what it recorded as Prometheus text.
//!
//! The journal and the coordinator record their metrics where the events happen, through the
//! `metrics` facade ([`journal::metrics`], [`coordinator::metrics`]); the facade records
//! nothing until a recorder is installed. `concord coordinator --metrics-listen ADDR` installs
//! the Prometheus recorder of `metrics-exporter-prometheus` and enables the coordinator's
//! metrics ([`coordinator::metrics::enable`]) *before* it opens the journal (the journal
//! registers its handles at open), and serves the text on `ADDR` with the exporter's
//! own HTTP listener (any path answers; scrape `http://ADDR/metrics`). Latencies and records
//! per sync are true Prometheus histograms, with the buckets below. Once listening, the daemon
//! prints `metrics on ADDR`, as it prints `listening on ADDR` for gRPC.
//!
//! The endpoint has no credentials and no TLS, so a non-loopback address is refused unless
//! `--metrics-listen-any` forces it (like `--listen-any`).
//!
//! # Caveats
//!
//! * The exporter binds its listener itself and cannot say which port it got, so a port 0
//!   ("any free port", for tests) is resolved first by binding and releasing a socket; another
//!   process could take that port in between, and the start then fails with the bind error.
//! * The exporter's listener and its upkeep (draining histogram buckets) are tasks the exporter
//!   spawns on the daemon's runtime; the listener's task is held here and stopped at shutdown,
//!   the upkeep task ends with the runtime.
//! * Without `--metrics-listen` or the `[daemon]` table's `metrics_listen` (which the flag
//!   overrides) nothing is installed and nothing is served.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Buckets of the latency histograms (seconds): 100 µs to 30 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// Buckets of `concord_journal_records_per_sync` (records).
pub const RECORDS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// A metrics address the daemon refuses.
#[derive(Debug, thiserror::Error)]
#[error(
    "--metrics-listen {addr} is not a loopback address: the metrics endpoint has no credentials and no TLS, so it listens on 127.0.0.0/8 or ::1 only; pass --metrics-listen-any to listen there anyway"
)]
pub struct MetricsNotLoopback {
    /// The address refused.
    pub addr: SocketAddr,
}

/// Checks `addr`: loopback, or any address when `any` is given.
pub fn check_metrics_listen(addr: SocketAddr, any: bool) -> Result<SocketAddr, MetricsNotLoopback> {
    if any || addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(MetricsNotLoopback { addr })
    }
}

/// The running endpoint: its address and the listener's task (stopped when dropped).
pub struct MetricsEndpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Installs the Prometheus recorder as the process's `metrics` recorder and serves it on
/// `addr` (port 0: a free port, see the caveats). Must run inside the runtime, before the
/// journal opens.
pub fn start(addr: SocketAddr) -> anyhow::Result<MetricsEndpoint> {
    let addr = resolve_port(addr)?;
    let (recorder, exporter) = builder(addr)?
        .build()
        .with_context(|| format!("serve metrics on {addr}"))?;
    metrics::set_global_recorder(recorder)
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
    coordinator::metrics::enable();
    describe();
    let task = tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics endpoint stopped");
        }
    });
    Ok(MetricsEndpoint { addr, task })
}

/// The exporter's settings: the listener and the buckets of each histogram.
fn builder(addr: SocketAddr) -> anyhow::Result<PrometheusBuilder> {
    let seconds = [
        coordinator::metrics::COMMIT_SECONDS,
        coordinator::metrics::RESOURCE_CALL_SECONDS,
    ];
    let mut builder = PrometheusBuilder::new().with_http_listener(addr);
    for name in seconds {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.into()), SECONDS_BUCKETS)
            .context("set the buckets of a latency histogram")?;
    }
    builder
        .set_buckets_for_metric(
            Matcher::Full(journal::metrics::RECORDS_PER_SYNC.into()),
            RECORDS_BUCKETS,
        )
        .context("set the buckets of concord_journal_records_per_sync")
}

/// `addr` with a free port in place of port 0.
fn resolve_port(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let probe = std::net::TcpListener::bind(addr)
        .with_context(|| format!("find a free port for metrics on {addr}"))?;
    probe.local_addr().context("the metrics probe's address")
}

/// The help text of every metric (the `# HELP` lines).
fn describe() {
    use coordinator::metrics as c;
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        c::TRANSACTIONS_TOTAL,
        "Transactions by the answer they got: committed, rolled_back, in_doubt."
    );
    describe_histogram!(
        c::COMMIT_SECONDS,
        Unit::Seconds,
        "From a commit request to its answer."
    );
    describe_counter!(
        c::PHASE2_RETRIES_TOTAL,
        "Phase-2 calls made again after a failure, by resource."
    );
    describe_histogram!(
        c::RESOURCE_CALL_SECONDS,
        Unit::Seconds,
        "Calls to a resource, by resource and call."
    );
    describe_gauge!(
        c::OPEN_TRANSACTIONS,
        "Transactions begun and not yet committing or rolling back."
    );
    describe_gauge!(
        c::IN_DOUBT,
        "Transactions in doubt: waiting for a restart or an operator, or unfinished past the transaction timeout."
    );
    describe_counter!(
        journal::metrics::SYNCS_TOTAL,
        "Data syncs of journal segment files, by journal."
    );
    describe_histogram!(
        journal::metrics::RECORDS_PER_SYNC,
        "Records made durable by one journal sync, by journal."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_forced() {
        let local: SocketAddr = "127.0.0.1:9700".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9700".parse().unwrap();
        assert!(check_metrics_listen(local, false).is_ok());
        let refused = check_metrics_listen(any, false).unwrap_err().to_string();
        assert!(refused.contains("--metrics-listen-any"), "{refused}");
        assert!(check_metrics_listen(any, true).is_ok());
    }
}
