//! Generates the workload-discovery wire types from `proto/` with prost. `protoc` must be on
//! the PATH (Debian: `protobuf-compiler`, installed by `ci/install-deps.sh`), or named by
//! the `PROTOC` environment variable.

fn main() -> std::io::Result<()> {
    let protos = ["proto/workload.proto", "proto/authorization.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    prost_build::Config::new().compile_protos(&protos, &["proto/"])
}
