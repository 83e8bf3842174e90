//! Compiles `proto/raftwire.proto` (and, for the application side, `proto/client.proto`) with the protoc binary vendored by `protoc-bin-vendored`,
//! so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/raftwire.proto");
    println!("cargo:rerun-if-changed=proto/client.proto");
    if std::env::var_os("CARGO_FEATURE_GRPC").is_none() {
        return Ok(());
    }
    // SAFETY of set_var: build scripts are single-threaded at this point.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".raftwire.v1")
        .compile_protos(&["proto/raftwire.proto"], &["proto"])?;
    // The client API of `raftwire node` (the application side).
    if std::env::var_os("CARGO_FEATURE_APP").is_some() {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .bytes(".raftwire.client.v1")
            .compile_protos(&["proto/client.proto"], &["proto"])?;
    }
    Ok(())
}
