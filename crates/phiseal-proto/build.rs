//! Generates the gRPC code from `proto/phiseal/v1/phiseal.proto` at every build, so the Rust
//! types cannot drift from the contract. Uses the vendored `protoc` unless `PROTOC` is set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with `env!`: a build-script binary reused from a shared target
    // directory (CI points CARGO_TARGET_DIR outside the clone) must not carry the path of the
    // checkout it was first compiled in.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?;
    let proto_root = std::path::Path::new(&manifest_dir).join("../../proto");
    let proto = proto_root.join("phiseal/v1/phiseal.proto");
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => std::path::PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let well_known = protoc_bin_vendored::include_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // The services decode with `codec::BoundedCodec`: prost's, plus a field count limit.
    tonic_prost_build::configure()
        .codec_path("crate::codec::BoundedCodec")
        .compile_with_config(config, &[&proto], &[&proto_root, &well_known])?;
    println!("cargo:rerun-if-changed={}", proto.display());
    Ok(())
}
