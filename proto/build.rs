//! Compiles `concord/v1/*.proto` with `protox` (pure Rust: no `protoc`) and generates the
//! prost messages and the tonic client and server with `tonic-prost-build`.

use std::path::PathBuf;

/// The schema files, relative to this crate.
const PROTO_FILES: &[&str] = &["concord/v1/coordinator.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={}", manifest.join(file).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let files: Vec<PathBuf> = PROTO_FILES.iter().map(|f| manifest.join(f)).collect();
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
    Ok(())
}
