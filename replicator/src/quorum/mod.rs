//! The quorum store: the cluster's epoch and the primary's lease (interface only here).

/// Who holds the primary's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Node name.
    pub node: String,
    /// Its gRPC address.
    pub address: String,
}

/// The epoch and the lease as the store holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterState {
    /// 0 when never claimed.
    pub epoch: u64,
    /// The node the epoch belongs to.
    pub holder: Option<Holder>,
    /// Some while the lease is live.
    pub lease_remaining_ms: Option<u64>,
}

/// A lease granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Its epoch.
    pub epoch: u64,
    /// Its length.
    pub ttl_ms: u64,
}

/// Why a call failed.
#[derive(thiserror::Error, Debug, Clone)]
pub enum QuorumError {
    /// Transient.
    #[error("the quorum store {store} cannot be reached: {detail}")]
    Unreachable {
        /// Which.
        store: String,
        /// Why.
        detail: String,
    },
    /// The stored epoch moved.
    #[error("the epoch moved to {epoch}")]
    EpochMoved {
        /// Stored epoch.
        epoch: u64,
        /// Its holder.
        holder: Option<Holder>,
    },
    /// Someone else holds a live lease.
    #[error("{} holds a live lease at epoch {epoch} for {remaining_ms} more ms", holder.node)]
    LeaseHeld {
        /// Stored epoch.
        epoch: u64,
        /// The holder.
        holder: Holder,
        /// How long it still runs.
        remaining_ms: u64,
    },
    /// Not the holder.
    #[error("not the holder of epoch {epoch}")]
    NotHolder {
        /// Stored epoch.
        epoch: u64,
        /// The holder.
        holder: Option<Holder>,
    },
    /// Malformed answer.
    #[error("the quorum store {store}: {detail}")]
    Protocol {
        /// Which.
        store: String,
        /// What.
        detail: String,
    },
}

/// The store.
#[async_trait::async_trait]
pub trait QuorumStore: Send + Sync + 'static {
    /// For messages.
    fn describe(&self) -> String;
    /// The state.
    async fn state(&self) -> Result<ClusterState, QuorumError>;
    /// Compare-and-swap claim.
    async fn claim(
        &self,
        me: &Holder,
        expected_epoch: u64,
        new_epoch: u64,
        ttl_ms: u64,
        override_live_lease: bool,
    ) -> Result<Grant, QuorumError>;
    /// Renews.
    async fn renew(&self, me: &Holder, epoch: u64, ttl_ms: u64) -> Result<Grant, QuorumError>;
    /// Releases.
    async fn release(&self, me: &Holder, epoch: u64) -> Result<(), QuorumError>;
}
