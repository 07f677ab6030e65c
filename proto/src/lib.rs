//! The wire schema of the concord coordinator daemon: gRPC package `concord.v1`, its generated
//! Rust code ([`v1`]: prost messages, a tonic client and server), and the conversions between
//! its messages and concord's domain types ([`convert`]).
//!
//! # Why a crate of its own
//!
//! This is the only crate that knows prost and the generated code. The journal, the resources
//! and the coordinator keep their own types ([`adapters::Xid`], [`adapters::ResourceError`],
//! [`coordinator::Outcome`], …), free of wire concerns; the daemon and the remote client depend
//! on this crate and cross between the two worlds only through [`convert`]. The `.proto` files
//! under `proto/concord/v1/` are the contract for every other language too: a Python client
//! generates its stubs from the same files.
//!
//! The build needs nothing but the Rust toolchain: `build.rs` compiles the `.proto` files with
//! `protox` (a protobuf compiler in Rust, no `protoc`) into a `FileDescriptorSet`
//! ([`FILE_DESCRIPTOR_SET`], for gRPC reflection) and generates the code from it with
//! `tonic-prost-build`. It runs again only when a `.proto` file changes.
//!
//! # Versioning
//!
//! The package name is the contract: everything within `concord.v1` stays compatible.
//!
//! * A new field is optional (a reader that does not know it ignores it; a writer that does not
//!   set it leaves the default the schema documents) and takes a number never used before.
//! * A removed field's number and name become `reserved`, never reused.
//! * An enum only gains values; a reader refuses a value it does not know (and every
//!   `…_UNSPECIFIED` zero) as malformed rather than guessing.
//! * An incompatible change is a new package, `concord.v2`, in new files beside these, served
//!   beside `v1` while clients move.
//!
//! Each request carries a `RequestHeader` whose `schema_version` is the revision of
//! `concord.v1` the client was generated from ([`SCHEMA_VERSION`] here). The daemon refuses a
//! revision newer than its own ([`convert::WireError::IncompatibleSchema`],
//! FAILED_PRECONDITION): such a client may rely on fields the daemon would silently ignore.
//!
//! # Errors on the wire
//!
//! Every failure is a gRPC status whose code follows the table in `coordinator.proto`, with one
//! encoded [`v1::ErrorDetail`] in its binary details: [`error_status`] builds one,
//! [`error_detail`] reads it back, [`v1::ErrorDetail::grpc_code`] is the table in code.
//!
//! A node that is not the primary answers [`not_primary`] (the primary's URL in the metadata
//! `concord-primary`); a client reads it back with [`primary_hint`] (see [`primary`]).
//!
//! [`client`] connects to a daemon (plain text or TLS, with a bearer token): every program
//! that talks to one goes through it.
//!
//! # Caveats
//!
//! * The participant's `RollbackCause` has no conversion here: the remote participant will
//!   depend on this crate, so that conversion lives with it; [`v1::RollbackCause`] mirrors it
//!   field for field.
//! * The status, health and in-doubt list messages have no domain type yet; the daemon builds
//!   them directly.

pub mod client;
pub mod convert;
pub mod heartbeat;
pub mod primary;

/// The generated code of package `concord.v1`: every message, enum and the `Coordinator`
/// service's client (`coordinator_client`) and server (`coordinator_server`). See
/// `proto/concord/v1/coordinator.proto` for the meaning of each.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    rustdoc::all
)]
pub mod v1 {
    tonic::include_proto!("concord.v1");
}

/// The generated client of the vendored subset of etcd's v3 API (`proto/etcd/api/`): the `KV`
/// and `Lease` services of package `etcdserverpb` and the `KeyValue` of `mvccpb`, wire
/// compatible with a real etcd. Compiled with `protox`, so the build needs no `protoc`; used
/// by the etcd quorum store of the replicator.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    rustdoc::all
)]
pub mod etcd {
    /// Package `mvccpb`: the stored key-value pair.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// Package `etcdserverpb`: the `KV` and `Lease` services.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

pub use convert::WireError;
pub use primary::{NotPrimary, not_primary, primary_hint};

/// The revision of `concord.v1` this crate was generated from, sent in every
/// `RequestHeader.schema_version`.
pub const SCHEMA_VERSION: u32 = v1::SchemaVersion::Current as u32;

/// The encoded `FileDescriptorSet` of the `.proto` files (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/concord_descriptor.bin"));

/// A gRPC status with `message` and `detail` encoded in its details; its code is
/// [`v1::ErrorDetail::grpc_code`].
pub fn error_status(message: impl Into<String>, detail: &v1::ErrorDetail) -> tonic::Status {
    tonic::Status::with_details(
        detail.grpc_code(),
        message,
        prost::Message::encode_to_vec(detail).into(),
    )
}

/// The [`v1::ErrorDetail`] a status carries: `None` when it carries none (a status from the
/// transport, a proxy, or a server that is not concord's), an error when its details do not
/// decode as one.
pub fn error_detail(status: &tonic::Status) -> Result<Option<v1::ErrorDetail>, WireError> {
    if status.details().is_empty() {
        return Ok(None);
    }
    let detail: v1::ErrorDetail =
        prost::Message::decode(status.details()).map_err(|e| WireError::Invalid {
            field: "grpc-status-details-bin",
            reason: format!("not a concord.v1.ErrorDetail: {e}"),
        })?;
    Ok(Some(detail))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn the_descriptor_set_describes_the_service() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decodes");
        let file = set
            .file
            .iter()
            .find(|f| f.name() == "concord/v1/coordinator.proto")
            .expect("the schema file is in the set");
        assert_eq!(file.package(), "concord.v1");
        let service = file
            .service
            .iter()
            .find(|s| s.name() == "Coordinator")
            .expect("the service");
        let methods: Vec<_> = service.method.iter().map(|m| m.name()).collect();
        assert_eq!(
            methods,
            [
                "Begin",
                "FilesPut",
                "FilesDelete",
                "FilesRead",
                "MailEnqueue",
                "KvInsert",
                "KvRemove",
                "KvGet",
                "EnlistPrepared",
                "Commit",
                "Rollback",
                "Outcome",
                "ListInDoubt",
                "Resolve",
                "Health",
                "Status",
            ]
        );
        assert_eq!(SCHEMA_VERSION, 1);
    }
}
