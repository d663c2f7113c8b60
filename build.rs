//! Compiles our .proto files (proto/) into Rust with tonic-prost-build.
//! Needs `protoc` (Debian's protobuf-compiler; scripts/install-deps.sh installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/plugins/base/proto/base.proto",
        "proto/plugins/drivers/proto/driver.proto",
        "proto/plugins/shared/hclspec/hcl_spec.proto",
        "proto/plugins/shared/structs/proto/attribute.proto",
        "proto/plugins/shared/structs/proto/recoverable_error.proto",
        "proto/goplugin/grpc_broker.proto",
        "proto/goplugin/grpc_controller.proto",
        "proto/goplugin/grpc_stdio.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // Clients are generated too: the tests play Nomad's side of the protocol.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .include_file("generated.rs")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
