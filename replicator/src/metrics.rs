//! The replicator's Prometheus metric names (recorded through the `metrics` facade; a node
//! that serves no exporter pays one atomic load per update).
//!
//! On a primary, per standby (label `standby`): the LSNs shipped, acknowledged and replayed,
//! the lag in records and whether it is connected; and the sync state. On a standby: its
//! journal's durable LSN, the replayed LSN, the lag overall (records, bytes, transactions,
//! seconds) and per resource (label `resource`), and whether it is connected.

/// 1 while commits wait for a standby (sync mode and not fallen back), else 0.
pub const SYNC: &str = "concord_replication_sync";
/// Whether the stream is up (1) or not (0).
pub const CONNECTED: &str = "concord_replication_connected";
/// The highest LSN sent to a standby (primary) or received (standby).
pub const SHIPPED_LSN: &str = "concord_replication_shipped_lsn";
/// The standby's durable LSN as acknowledged.
pub const ACKNOWLEDGED_LSN: &str = "concord_replication_acknowledged_lsn";
/// Every committed transaction up to it is applied to every resource of the standby.
pub const REPLAYED_LSN: &str = "concord_replication_replayed_lsn";
/// The lag in records.
pub const LAG_RECORDS: &str = "concord_replication_lag_records";
/// The lag in bytes.
pub const LAG_BYTES: &str = "concord_replication_lag_bytes";
/// The lag in global transactions.
pub const LAG_TRANSACTIONS: &str = "concord_replication_lag_transactions";
/// The lag in seconds: the age of the oldest transaction not replayed.
pub const LAG_SECONDS: &str = "concord_replication_lag_seconds";
/// A resource's applied LSN (label `resource`).
pub const APPLIED_LSN: &str = "concord_replication_applied_lsn";
