//! A standby's status: what its receiver and its replay report, as the wire's
//! [`v1::ReplicationStatus`] (and the same numbers as metrics).
//!
//! The lags, overall and per resource: **records** — the primary's durable LSN (as last heard)
//! minus the replayed LSN (a resource: minus its applied LSN); **bytes** — redo received and not
//! yet applied; **transactions** — committed transactions received and not yet applied
//! everywhere (a resource: its redo entries waiting); **seconds** — the age of the oldest of
//! them, by the primary's clock at its decision (0 when none waits). The oldest transaction not
//! yet replayed is named with its xid and LSN.

use std::sync::PoisonError;

use journal::Lsn;
use proto::v1;

use crate::replay::SharedView;
use crate::standby::{SharedReceiveView, now_ms};

/// The status of a standby whose receiver reports to `receive` and whose replay to `replay`.
pub fn standby_status(receive: &SharedReceiveView, replay: &SharedView) -> v1::ReplicationStatus {
    let r = receive
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let p = replay
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let now = now_ms();
    let age = |at_ms: Option<u64>| at_ms.map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0);
    let head = r.primary_durable_lsn.max(r.durable_lsn);
    let lag = v1::Lag {
        records: head.0.saturating_sub(p.replayed_lsn.0),
        bytes: p.bytes,
        transactions: p.transactions,
        seconds: age(p.oldest.as_ref().map(|o| o.at_ms)),
    };
    let resources = p
        .resources
        .iter()
        .map(|(name, b)| v1::ResourceLag {
            name: name.clone(),
            applied_lsn: b.applied_lsn.0,
            lag: Some(v1::Lag {
                records: b.records,
                bytes: b.bytes,
                transactions: b.records,
                seconds: age(b.oldest_at_ms),
            }),
        })
        .collect();
    let oldest_unreplayed = p.oldest.as_ref().map(|o| v1::Unreplayed {
        xid: o.xid.to_string(),
        lsn: o.lsn.0,
        age_ms: now.saturating_sub(o.at_ms),
    });
    publish(&lag, &p, r.connected, r.durable_lsn);
    v1::ReplicationStatus {
        mode: String::new(),
        sync_state: String::new(),
        primary: r.primary,
        connected: r.connected,
        durable_lsn: r.durable_lsn.0,
        shipped_lsn: r.durable_lsn.0,
        acknowledged_lsn: r.durable_lsn.0,
        replayed_lsn: p.replayed_lsn.0,
        lag: Some(lag),
        resources,
        oldest_unreplayed,
        standbys: Vec::new(),
    }
}

/// The same numbers as metrics.
fn publish(lag: &v1::Lag, p: &crate::replay::ReplayView, connected: bool, durable: Lsn) {
    use crate::metrics as m;
    metrics::gauge!(m::CONNECTED).set(if connected { 1.0 } else { 0.0 });
    metrics::gauge!(m::SHIPPED_LSN).set(durable.0 as f64);
    metrics::gauge!(m::REPLAYED_LSN).set(p.replayed_lsn.0 as f64);
    metrics::gauge!(m::LAG_RECORDS).set(lag.records as f64);
    metrics::gauge!(m::LAG_BYTES).set(lag.bytes as f64);
    metrics::gauge!(m::LAG_TRANSACTIONS).set(lag.transactions as f64);
    metrics::gauge!(m::LAG_SECONDS).set(lag.seconds);
    for (name, b) in &p.resources {
        let labels = [("resource", name.clone())];
        metrics::gauge!(m::APPLIED_LSN, &labels).set(b.applied_lsn.0 as f64);
        metrics::gauge!(m::LAG_RECORDS, &labels).set(b.records as f64);
        metrics::gauge!(m::LAG_BYTES, &labels).set(b.bytes as f64);
    }
}
