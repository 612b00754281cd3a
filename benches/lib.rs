//! Benchmarks live in `benches/field.rs` and `benches/stream.rs`; run
//! `cargo bench -p phiseal-benches`. This library holds what they and the examples share.

/// A fresh temporary directory with mode `0700`, for an embedded keyring's key store and
/// audit log.
pub fn private_tempdir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}
