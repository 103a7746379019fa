//! Compiles `proto/infergate/v1/*.proto` and the vendored Open Inference
//! Protocol service (`proto/inference/`) with protox (pure Rust, no `protoc`
//! needed) and writes the descriptor set that gRPC reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "infergate/v1/types.proto",
    "infergate/v1/worker.proto",
    "infergate/v1/inference.proto",
    "inference/open_inference_grpc.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The embedded pool kind links libpython: record its directory as the
    // binary's rpath, or the loader may pick another Python's library.
    #[cfg(feature = "embedded")]
    pyo3_build_config::add_libpython_rpath_link_args();
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("infergate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
