//! One heartbeat as the runtime and the failover logic see it ([`Beat`]), and its wire form.

use proto::v1;

/// A node's role as its beats report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Holds the lease and decides transactions.
    Primary,
    /// Follows a primary.
    #[default]
    Standby,
    /// A former primary that stepped down and does not follow yet.
    Demoted,
}

/// What a node says about itself, once per interval, on every path. The node's source fills in
/// what it knows (address, role, epoch, LSN, counts, health, lease, promise); the runtime sets
/// `cluster_id`, `node`, `seq`, `echo_seq` and `sent_unix_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// The cluster both nodes belong to.
    pub cluster_id: String,
    /// The sender's node name.
    pub node: String,
    /// The sender's gRPC URL.
    pub address: String,
    /// The sender's role.
    pub role: Role,
    /// The highest epoch the sender knows.
    pub epoch: u64,
    /// The sender's journal's durable LSN.
    pub durable_lsn: u64,
    /// Global transactions committed in the sender's journal.
    pub committed_txns: u64,
    /// The sender's own health verdict.
    pub healthy: bool,
    /// The probes that failed, one short line each.
    pub failures: Vec<String>,
    /// How long the sender's lease still runs (milliseconds); `None` when it holds none.
    pub lease_remaining_ms: Option<u64>,
    /// The sender's counter: grows with every beat, across restarts.
    pub seq: u64,
    /// The highest `seq` the sender has received from its peer (0: none yet).
    pub echo_seq: u64,
    /// A standby's promise not to promote for this long (milliseconds), counted from no
    /// earlier than when it received the beat `echo_seq` names; 0: no promise.
    pub confirm_ms: u64,
    /// The sender's wall clock when it built the beat (ms since the Unix epoch; display only).
    pub sent_unix_ms: u64,
    /// The journal bytes up to `durable_lsn`, counted like `committed_txns`.
    pub durable_bytes: u64,
}

/// A beat whose role is not one this version knows (or is unset).
#[derive(Debug, thiserror::Error)]
#[error("the beat's role {0} is unknown or unset")]
pub struct UnknownRole(pub i32);

impl From<Role> for v1::HeartbeatRole {
    fn from(role: Role) -> Self {
        match role {
            Role::Primary => v1::HeartbeatRole::Primary,
            Role::Standby => v1::HeartbeatRole::Standby,
            Role::Demoted => v1::HeartbeatRole::Demoted,
        }
    }
}

fn role_from_wire(value: i32) -> Result<Role, UnknownRole> {
    match v1::HeartbeatRole::try_from(value) {
        Ok(v1::HeartbeatRole::Primary) => Ok(Role::Primary),
        Ok(v1::HeartbeatRole::Standby) => Ok(Role::Standby),
        Ok(v1::HeartbeatRole::Demoted) => Ok(Role::Demoted),
        Ok(v1::HeartbeatRole::Unspecified) | Err(_) => Err(UnknownRole(value)),
    }
}

impl From<Beat> for v1::Beat {
    fn from(b: Beat) -> Self {
        v1::Beat {
            cluster_id: b.cluster_id,
            node: b.node,
            address: b.address,
            role: v1::HeartbeatRole::from(b.role) as i32,
            epoch: b.epoch,
            durable_lsn: b.durable_lsn,
            committed_txns: b.committed_txns,
            healthy: b.healthy,
            failures: b.failures,
            lease_remaining_ms: b.lease_remaining_ms,
            seq: b.seq,
            echo_seq: b.echo_seq,
            confirm_ms: b.confirm_ms,
            sent_unix_ms: b.sent_unix_ms,
            durable_bytes: b.durable_bytes,
        }
    }
}

impl TryFrom<v1::Beat> for Beat {
    type Error = UnknownRole;

    fn try_from(b: v1::Beat) -> Result<Self, UnknownRole> {
        Ok(Beat {
            role: role_from_wire(b.role)?,
            cluster_id: b.cluster_id,
            node: b.node,
            address: b.address,
            epoch: b.epoch,
            durable_lsn: b.durable_lsn,
            committed_txns: b.committed_txns,
            healthy: b.healthy,
            failures: b.failures,
            lease_remaining_ms: b.lease_remaining_ms,
            seq: b.seq,
            echo_seq: b.echo_seq,
            confirm_ms: b.confirm_ms,
            sent_unix_ms: b.sent_unix_ms,
            durable_bytes: b.durable_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_survives_the_wire() {
        let beat = Beat {
            cluster_id: "c1".into(),
            node: "a".into(),
            address: "http://127.0.0.1:7700".into(),
            role: Role::Demoted,
            epoch: 3,
            durable_lsn: 42,
            committed_txns: 7,
            healthy: false,
            failures: vec!["journal: sync took 900 ms".into()],
            lease_remaining_ms: Some(1200),
            seq: 9,
            echo_seq: 8,
            confirm_ms: 1500,
            sent_unix_ms: 1_700_000_000_000,
            durable_bytes: 4096,
        };
        let wire = v1::Beat::from(beat.clone());
        assert_eq!(Beat::try_from(wire).unwrap(), beat);
    }

    #[test]
    fn an_unset_role_is_refused() {
        let wire = v1::Beat::default();
        assert!(Beat::try_from(wire).is_err());
    }
}
