//! `phiseal-demo [DATA_DIR]`: walks through the library on the embedded default (local dev
//! KMS, SQLite key store, file audit log) and prints what happens. Never prints key bytes;
//! the sample "PHI" is synthetic.
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout)] // a demo's job is to print

use std::path::PathBuf;

use phiseal::{Actor, Caller, EncryptionContext, TenantId};
use phiseal_embedded::{EmbeddedOptions, EmbeddedPaths};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let data_dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("phiseal-demo-data"));
    println!("phiseal demo — data directory {}", data_dir.display());
    println!("  (local development KMS: INSECURE, refused by the production profile)");
    let keyring = phiseal_embedded::open(&data_dir, &EmbeddedOptions::default())?;
    let caller = Caller::new(Actor::named("demo"));

    // A tenant id unique to this run, so the demo can be re-run on the same directory.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let tenant = TenantId::new(format!("clinic-{stamp}"))?;
    keyring.create_tenant(&caller, &tenant).await?;
    println!("1. created tenant {tenant} with key version 1");

    let ssn = EncryptionContext::new(tenant.clone(), "ssn")?.with_record("patient-42")?;
    let ciphertext = keyring.encrypt(&caller, &ssn, b"078-05-1120").await?;
    let text = phiseal::format::to_text(&ciphertext);
    println!(
        "2. encrypted field ssn of record patient-42: {} bytes binary ({} bytes overhead), text form {}",
        ciphertext.len(),
        ciphertext.len() - 11,
        text
    );

    let plaintext = keyring.decrypt(&caller, &ssn, &ciphertext).await?;
    println!(
        "3. decrypted it again: {} bytes, matches: {}",
        plaintext.len(),
        &plaintext[..] == b"078-05-1120"
    );
    let other = EncryptionContext::new(tenant.clone(), "ssn")?.with_record("patient-43")?;
    match keyring.decrypt(&caller, &other, &ciphertext).await {
        Err(e) => println!("4. same ciphertext under record patient-43 is refused: {e}"),
        Ok(_) => return Err("context binding failed".into()),
    }

    let v2 = keyring.rotate(&caller, &tenant).await?;
    println!("5. rotated the tenant key: version {v2} is now primary, version 1 decrypt-only");

    let rewrapped = keyring.rewrap(&caller, &ssn, &ciphertext).await?;
    let counts = phiseal::format::count_versions([ciphertext.as_slice(), rewrapped.as_slice()]);
    println!(
        "6. rewrapped the field to version {v2} without exposing it; versions in use (old, new): {:?}",
        counts.by_version
    );

    keyring
        .set_min_decrypt_version(&caller, &tenant, v2)
        .await?;
    match keyring.decrypt(&caller, &ssn, &ciphertext).await {
        Err(e) => {
            println!("7. minimum decryption version {v2}: the old ciphertext is refused: {e}")
        }
        Ok(_) => return Err("minimum version not enforced".into()),
    }

    keyring.shred(&caller, &tenant).await?;
    match keyring.decrypt(&caller, &ssn, &rewrapped).await {
        Err(e) => println!("8. shredded the tenant: {e}"),
        Ok(_) => return Err("shred did not destroy the key".into()),
    }

    keyring.flush_audit().await?;
    let log = EmbeddedPaths::new(&data_dir).audit_log;
    let report = phiseal_audit_file::verify(&log)?;
    println!(
        "9. audit log {}: {} records, hash chain {}",
        log.display(),
        report.records,
        if report.is_intact() {
            "intact"
        } else {
            "BROKEN"
        }
    );
    if !report.is_intact() {
        return Err(format!("audit log problems: {:?}", report.problems).into());
    }
    println!("demo finished");
    Ok(())
}
