//! The wire schema.

/// The generated code of package `concord.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("concord.v1");
}
