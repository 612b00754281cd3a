//! Benchmarks live in `benches/field.rs` and `benches/stream.rs`; run
//! `cargo bench -p phiseal-benches`. This library holds what they and the examples share.

/// A keyring on the embedded default (local KMS, SQLite key store) in `dir`, with the audit
/// log off: what the field benchmarks call "audit off".
pub fn keyring_audit_off(
    dir: &std::path::Path,
) -> Result<phiseal::Keyring, Box<dyn std::error::Error>> {
    Ok(phiseal_embedded::builder(dir, &Default::default())?
        .danger_disable_audit()
        .build()?)
}

/// The context the 64-byte field benchmarks encrypt under: tenant `bench-tenant`, field
/// `ssn`, record `patient-000042`.
pub fn field_context() -> Result<phiseal::EncryptionContext, phiseal::Error> {
    let tenant = phiseal::TenantId::new("bench-tenant")?;
    phiseal::EncryptionContext::new(tenant, "ssn")?.with_record("patient-000042")
}

/// A fresh temporary directory with mode `0700`, for an embedded keyring's key store and
/// audit log.
pub fn private_tempdir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}
