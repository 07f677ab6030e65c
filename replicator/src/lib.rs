//! Journal shipping and standby replay: how a standby site keeps its own copies of the
//! resources equal to the primary's, global transaction by global transaction.
//!
//! A primary coordinator daemon serves its journal ([`primary::Shipper`], behind the
//! `concord.v1.Replication` service of [`service`]); a standby (`concord standby`) follows it
//! with a [`standby::Receiver`], which appends the records *verbatim* to the standby's own
//! journal — same LSN, epoch and chain value, so the two journals can be compared record by
//! record — and acknowledges what is durable; its [`replay::Replay`] applies each committed
//! transaction to the standby's resources through the [`adapters::Resource`] contract only
//! (`replay_batch`, `applied_lsn`, `put_blob`), in decision order per resource.
//!
//! ```text
//!  primary daemon                                   standby
//!  ─────────────                                    ───────
//!  journal ──read──▶ Shipper ══ Ship stream ══▶ Receiver ──append_verbatim──▶ journal
//!  resources ─open_blob─┘  ▲     (blobs, then          │  put_blob ─▶ resources
//!  retention floor ◀───────┘      records)             └─ Ack(durable, replayed)
//!  sync commits wait for Acks                           journal ──read──▶ Replay ──replay_batch──▶ resources
//! ```
//!
//! What each side guarantees:
//!
//! * **Nothing lost, nothing twice.** The standby asks for records from its own durable LSN;
//!   the primary holds its retention floor at what the standby acknowledged (up to a bound);
//!   the standby's journal refuses a gap or a different history; each resource stores its
//!   applied LSN atomically with its data, so replay killed at any moment resumes exactly.
//! * **Order.** The journal order is the commit order (see `docs/design.md`, "Ordering"):
//!   replay applies each resource's redo in decision order; a `OnePhase` record waits for its
//!   `End` (apply) or `Abort` (skip).
//! * **Bad input.** A damaged frame, a blob whose bytes do not match its id, another cluster,
//!   an older epoch, another journal format: a typed [`error::ReplicationError`] that says what
//!   to do, and the standby's journal and resources unchanged.
//!
//! The parts: [`wire`] (records on the wire), [`cluster`] (the cluster id), [`primary`],
//! [`standby`], [`replay`] (with the pure [`replay::machine`]), [`reseed`], [`status`] and
//! [`metrics`], [`inventory`] (for `concord compare` and re-seeding); [`quorum`], the store of
//! the cluster's epoch and the primary's lease (the witness and etcd).
//!
//! # Implementation caveats
//!
//! * An embedded coordinator (the participant library) does not serve the stream: a primary is
//!   a coordinator daemon.
//! * Re-seeding ([`reseed`]) is an operator's decision: a standby whose primary no longer holds
//!   what it needs says so and keeps refusing until `concord standby --reseed` is run.

pub mod cluster;
pub mod error;
pub mod failover;
pub mod fence;
pub mod health;
pub mod heartbeat;
pub mod inventory;
pub mod metrics;
pub mod primary;
pub mod quorum;
pub mod replay;
pub mod reseed;
pub mod service;
pub mod standby;
pub mod status;
pub mod wire;

pub use error::ReplicationError;
