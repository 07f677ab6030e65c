//! The replicator's errors, sorted by what the standby (or its operator) must do.

use adapters::ResourceError;
use journal::{JournalError, Lsn};

/// The gRPC metadata key that carries a refusal's [`ReplicationError::code`].
pub const CODE_METADATA: &str = "concord-replication-error";

/// Why shipping or replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The primary belongs to another cluster than the one this standby's journal follows:
    /// point the standby at its own primary, or re-seed it (`concord standby --reseed`) to make
    /// it follow this one.
    #[error(
        "the primary belongs to cluster {primary}, this standby's journal follows cluster {standby}: point [standby] primary at a node of cluster {standby}, or re-seed the standby from this primary (concord standby --reseed)"
    )]
    ClusterMismatch {
        /// The standby's cluster id.
        standby: String,
        /// The primary's.
        primary: String,
    },
    /// The primary serves an epoch below one the standby's journal already holds: it is an old
    /// primary. Point the standby at the current primary.
    #[error(
        "the primary serves epoch {primary}, below epoch {standby} that this standby's journal already holds: it is an old primary; point [standby] primary at the current one"
    )]
    EpochRegressed {
        /// The highest epoch in the standby's journal.
        standby: u64,
        /// The primary's epoch.
        primary: u64,
    },
    /// The two journals are written in different formats: run the same concord version on
    /// both sites.
    #[error(
        "the primary's journal format is version {primary}, this standby's is version {standby}: run the same concord version on both"
    )]
    FormatMismatch {
        /// The standby's journal format.
        standby: u32,
        /// The primary's.
        primary: u32,
    },
    /// The primary no longer holds the records the standby needs (its retention floor let go
    /// past `retention_bytes_max`): re-seed the standby.
    #[error(
        "the primary no longer holds lsn {wanted} (its oldest is {oldest}): this standby must be re-seeded (concord standby --reseed)"
    )]
    ReseedRequired {
        /// The first LSN the standby needs.
        wanted: Lsn,
        /// The primary's oldest retained LSN.
        oldest: Lsn,
    },
    /// The standby's journal holds at `lsn` another record than the primary's: the histories
    /// diverged (the standby was a primary, or followed another one). Nothing was changed.
    #[error(
        "this standby's journal diverges from the primary's at lsn {lsn}: {detail}; the standby stopped and changed nothing (an old primary rejoins after truncating its journal after the last common lsn; otherwise re-seed it)"
    )]
    Diverged {
        /// The first LSN at which the journals differ.
        lsn: Lsn,
        /// How they differ.
        detail: String,
    },
    /// A frame from the other side is malformed or damaged (a bad crc, a field out of range,
    /// a blob whose bytes do not match its id): nothing of it was kept; the connection is
    /// dropped and shipping starts again from the standby's durable LSN.
    #[error("a shipped frame at lsn {lsn} is refused: {what}")]
    Malformed {
        /// The record's LSN (or the next one expected).
        lsn: Lsn,
        /// What is wrong.
        what: String,
    },
    /// The other side broke the protocol (messages out of order): the connection is dropped
    /// and started again.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// The connection failed or broke: retried with backoff.
    #[error("connection to the primary: {0}")]
    Transport(String),
    /// A resource failed (a blob's put, a replay): its class says whether retrying helps.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// The standby's journal failed: the process stops and recovers on restart (a failed
    /// sync is never retried).
    #[error("standby journal: {0}")]
    Journal(#[from] JournalError),
    /// The primary refused this standby for a reason only a person can end (its message
    /// says which and what to do; `code` is one of the codes of [`ReplicationError::code`]).
    #[error("the primary refused this standby: {message}")]
    Refused {
        /// The refusal's code.
        code: &'static str,
        /// The primary's message.
        message: String,
    },
    /// A file of the standby's own state (cluster id, partial blob, replay floor) failed.
    #[error("{what} {path}: {source}")]
    State {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl ReplicationError {
    /// The machine-readable code sent with a refusal ([`CODE_METADATA`]).
    pub fn code(&self) -> &'static str {
        match self {
            ReplicationError::ClusterMismatch { .. } => "cluster_mismatch",
            ReplicationError::EpochRegressed { .. } => "epoch_regressed",
            ReplicationError::FormatMismatch { .. } => "format_newer",
            ReplicationError::ReseedRequired { .. } => "reseed_required",
            ReplicationError::Diverged { .. } => "diverged",
            ReplicationError::Malformed { .. } => "malformed",
            ReplicationError::Protocol(_) => "protocol",
            ReplicationError::Transport(_) => "transport",
            ReplicationError::Resource(_) => "resource",
            ReplicationError::Journal(_) => "journal",
            ReplicationError::State { .. } => "state",
            ReplicationError::Refused { code, .. } => code,
        }
    }

    /// Whether only a person can end it (pointing the standby elsewhere, re-seeding it,
    /// upgrading a site): the standby keeps refusing, slowly, and says so in its status.
    pub fn needs_an_operator(&self) -> bool {
        matches!(
            self,
            ReplicationError::ClusterMismatch { .. }
                | ReplicationError::EpochRegressed { .. }
                | ReplicationError::FormatMismatch { .. }
                | ReplicationError::ReseedRequired { .. }
                | ReplicationError::Diverged { .. }
                | ReplicationError::Refused { .. }
        )
    }

    /// Whether the process must stop (the journal failed: it recovers on restart).
    pub fn is_fatal(&self) -> bool {
        matches!(self, ReplicationError::Journal(_))
    }

    /// As a gRPC status (the primary refusing a standby), its code in [`CODE_METADATA`].
    pub fn to_status(&self) -> tonic::Status {
        let code = match self {
            ReplicationError::Transport(_) => tonic::Code::Unavailable,
            ReplicationError::Journal(_) | ReplicationError::State { .. } => tonic::Code::Internal,
            ReplicationError::Malformed { .. } | ReplicationError::Protocol(_) => {
                tonic::Code::InvalidArgument
            }
            _ => tonic::Code::FailedPrecondition,
        };
        let mut status = tonic::Status::new(code, self.to_string());
        if let Ok(value) = self.code().parse() {
            status.metadata_mut().insert(CODE_METADATA, value);
        }
        status
    }

    /// A refusal received from the primary: [`ReplicationError::Refused`] when its code
    /// needs an operator, a transport error (retried) otherwise.
    pub fn from_status(status: &tonic::Status) -> ReplicationError {
        let code = status
            .metadata()
            .get(CODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let message = status.message().to_string();
        let code = match code {
            "reseed_required" => "reseed_required",
            "cluster_mismatch" => "cluster_mismatch",
            "epoch_regressed" => "epoch_regressed",
            "format_newer" => "format_newer",
            "diverged" => "diverged",
            _ => {
                return ReplicationError::Transport(format!("{:?}: {message}", status.code()));
            }
        };
        ReplicationError::Refused { code, message }
    }
}
