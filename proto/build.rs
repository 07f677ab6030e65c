//! Compiles every `concord/v1/*.proto` with `protox` (pure Rust: no `protoc`) into a
//! `FileDescriptorSet`, kept as `concord_descriptor.bin` for reflection, and generates the prost
//! messages and the tonic client and server from it with `tonic-prost-build`. Cargo runs this
//! again only when a file under `concord/` or `etcd/` (or this file) changes. The vendored subset
//! of etcd's v3 API under `etcd/` is compiled the same way, client only.

use std::path::{Path, PathBuf};

/// The directory of the schema files of package `concord.v1`, relative to this crate.
const SCHEMA_DIR: &str = "concord/v1";

/// The directory of the vendored etcd v3 schema files, relative to this crate.
const ETCD_DIR: &str = "etcd/api";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    // A directory makes cargo watch every file in it, added ones included.
    println!("cargo:rerun-if-changed=concord");
    println!("cargo:rerun-if-changed=build.rs");
    let files = proto_files(&manifest.join(SCHEMA_DIR))?;
    let descriptors = protox::compile(&files, [&manifest])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("concord_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    compile_etcd(&manifest)
}

/// The vendored subset of etcd's v3 API (packages `etcdserverpb` and `mvccpb`), compiled with
/// `protox` like the rest, so that the etcd quorum store needs no `protoc` and no
/// `etcd-client` crate; only the client is generated.
fn compile_etcd(manifest: &Path) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=etcd");
    let files = [
        manifest.join(ETCD_DIR).join("mvccpb/kv.proto"),
        manifest.join(ETCD_DIR).join("etcdserverpb/rpc.proto"),
    ];
    let descriptors = protox::compile(&files, [manifest])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}

/// The `.proto` files in `dir`, sorted (so the generated code does not depend on the order the
/// file system lists them in).
fn proto_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
