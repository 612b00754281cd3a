//! `phiseal-demo SOCKET`: walks through the sidecar's gRPC API (`proto/phiseal/v1`) against a
//! running `phiseald` and prints each step: create a tenant, encrypt a patient record's fields
//! in one batch, decrypt them, a refused cross-record decrypt, rotate, rewrap, key status,
//! minimum decryption version, shred, and the shredded tenant's data refused.
//!
//! The caller needs every operation on every tenant: run it as the daemon's own user against
//! the embedded default (`phiseald --socket SOCKET --data-dir DIR`), as `scripts/demo` does.
//! The sample "PHI" is synthetic and never printed; only field names, sizes and ciphertexts
//! are.
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout)] // a demo's job is to print

use std::path::PathBuf;
use std::process::ExitCode;

use phiseal_proto::v1 as pb;
use phiseal_proto::v1::admin_service_client::AdminServiceClient;
use phiseal_proto::v1::field_service_client::FieldServiceClient;
use phiseal_proto::{ERROR_KIND_HEADER, REQUEST_ID_HEADER};
use tonic::transport::Channel;
use tonic::{Code, Status};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The record id: an opaque surrogate (record ids are written to the audit log).
const RECORD: &str = "pt-7f3c9a52";

/// A synthetic patient record: (field, value).
const PATIENT: [(&str, &str); 4] = [
    ("mrn", "MRN-0041277"),
    ("name", "Jane Q. Sample"),
    ("ssn", "078-05-1120"),
    ("date_of_birth", "1970-01-31"),
];

fn context(tenant: &str, field: &str, record: &str) -> Option<pb::Context> {
    Some(pb::Context {
        tenant: tenant.to_owned(),
        field: field.to_owned(),
        record: Some(record.to_owned()),
    })
}

/// The stable error kind the daemon sends in the `phiseal-error-kind` metadata.
fn kind(status: &Status) -> &str {
    status
        .metadata()
        .get(ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Checks that `result` is the refusal `code` / `kind`; returns it as text.
fn refusal<T>(result: std::result::Result<T, Status>, code: Code, want: &str) -> Result<String> {
    match result {
        Ok(_) => {
            Err(format!("expected a refusal ({code:?}, {want}), but the call succeeded").into())
        }
        Err(status) if status.code() == code && kind(&status) == want => Ok(format!(
            "{:?} ({}): {}",
            status.code(),
            kind(&status),
            status.message()
        )),
        Err(status) => Err(format!(
            "expected {code:?} ({want}), got {:?} ({}): {}",
            status.code(),
            kind(&status),
            status.message()
        )
        .into()),
    }
}

/// A short form of a ciphertext for display.
fn short(ciphertext: &[u8]) -> String {
    let text = phiseal::format::to_text(ciphertext);
    let head: String = text.chars().take(20).collect();
    let tail: String = text
        .chars()
        .skip(text.chars().count().saturating_sub(10))
        .collect();
    format!("{head}…{tail} ({} bytes)", ciphertext.len())
}

/// The ciphertexts of an EncryptBatch, in order; any item error fails the demo.
fn encrypted(response: pb::EncryptBatchResponse) -> Result<Vec<pb::EncryptResponse>> {
    response
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::encrypt_result::Result::Ok(ok)) => Ok(ok),
            Some(pb::encrypt_result::Result::Error(e)) => {
                Err(format!("encrypt item failed: {} ({})", e.message, e.kind).into())
            }
            None => Err("encrypt item without result".into()),
        })
        .collect()
}

/// Decrypts every field of the record under `ciphertexts` in one DecryptBatch.
async fn decrypt_all(
    fields: &mut FieldServiceClient<Channel>,
    tenant: &str,
    ciphertexts: &[Vec<u8>],
) -> Result<Vec<pb::DecryptResult>> {
    let items = PATIENT
        .iter()
        .zip(ciphertexts)
        .map(|((field, _), ciphertext)| pb::DecryptRequest {
            context: context(tenant, field, RECORD),
            ciphertext: ciphertext.clone(),
        })
        .collect();
    Ok(fields
        .decrypt_batch(pb::DecryptBatchRequest { items })
        .await?
        .into_inner()
        .results)
}

async fn run(socket: PathBuf) -> Result<()> {
    println!("phiseal demo — through phiseald on {}", socket.display());
    let channel = phiseal_proto::connect_unix(&socket).await.map_err(|e| {
        let mut text = format!("cannot connect to {}: {e}", socket.display());
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    })?;
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut fields = FieldServiceClient::new(channel);

    // A tenant id unique to this run, so the demo can be re-run against the same daemon.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let tenant = format!("clinic-{stamp}");
    let created = admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: tenant.clone(),
        })
        .await?;
    let request_id = created
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    println!(
        " 1. CreateTenant {tenant}: key version {} (request id {request_id}, as in the audit log)",
        created.into_inner().key_version
    );

    let items = PATIENT
        .iter()
        .map(|(field, value)| pb::EncryptRequest {
            context: context(&tenant, field, RECORD),
            plaintext: value.as_bytes().to_vec(),
        })
        .collect();
    let sealed = encrypted(
        fields
            .encrypt_batch(pb::EncryptBatchRequest { items })
            .await?
            .into_inner(),
    )?;
    println!(
        " 2. EncryptBatch: {} fields of record {RECORD} in one call",
        sealed.len()
    );
    for ((field, _), result) in PATIENT.iter().zip(&sealed) {
        println!(
            "      {field:<14} key version {}  {}",
            result.key_version,
            short(&result.ciphertext)
        );
    }
    let v1: Vec<Vec<u8>> = sealed.into_iter().map(|r| r.ciphertext).collect();

    let opened = decrypt_all(&mut fields, &tenant, &v1).await?;
    let matching = PATIENT
        .iter()
        .zip(&opened)
        .filter(|((_, value), result)| {
            matches!(&result.result,
                Some(pb::decrypt_result::Result::Ok(ok)) if ok.plaintext == value.as_bytes())
        })
        .count();
    if matching != PATIENT.len() {
        return Err(format!("only {matching} of {} fields decrypted", PATIENT.len()).into());
    }
    println!(" 3. DecryptBatch: all {matching} fields decrypted and match the originals");

    let ssn_v1 = v1.get(2).ok_or("no ssn ciphertext")?.clone();
    let other = fields
        .decrypt(pb::DecryptRequest {
            context: context(&tenant, "ssn", "pt-0000other"),
            ciphertext: ssn_v1.clone(),
        })
        .await;
    println!(
        " 4. Decrypt the ssn ciphertext under another record (pt-0000other): refused, {}",
        refusal(other, Code::InvalidArgument, "decryption_failed")?
    );

    let v2 = admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant: tenant.clone(),
            // Safe to repeat: a second run of this call would change nothing.
            expected_latest_version: Some(1),
        })
        .await?
        .into_inner()
        .key_version;
    println!(" 5. RotateTenantKey: version {v2} is primary, version 1 decrypts only");

    let items = PATIENT
        .iter()
        .zip(&v1)
        .map(|((field, _), ciphertext)| pb::RewrapItem {
            context: context(&tenant, field, RECORD),
            ciphertext: ciphertext.clone(),
        })
        .collect();
    let rewrapped: Vec<pb::Rewrapped> = fields
        .rewrap(pb::RewrapRequest { items })
        .await?
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::rewrap_result::Result::Ok(ok)) if ok.changed && ok.key_version == v2 => Ok(ok),
            Some(pb::rewrap_result::Result::Ok(ok)) => Err(format!(
                "rewrap left an item at version {} (changed {})",
                ok.key_version, ok.changed
            )),
            Some(pb::rewrap_result::Result::Error(e)) => {
                Err(format!("rewrap item failed: {} ({})", e.message, e.kind))
            }
            None => Err("rewrap item without result".to_owned()),
        })
        .collect::<std::result::Result<_, _>>()?;
    println!(
        " 6. Rewrap: {} ciphertexts moved to version {v2} inside the daemon (no plaintext returned)",
        rewrapped.len()
    );
    let current: Vec<Vec<u8>> = rewrapped.into_iter().map(|r| r.ciphertext).collect();

    let status = admin
        .key_status(pb::KeyStatusRequest {
            tenant: tenant.clone(),
        })
        .await?
        .into_inner();
    println!(
        " 7. KeyStatus: primary version {}, minimum decryption version {}",
        status
            .primary_version
            .map_or_else(|| "none".to_owned(), |v| v.to_string()),
        status.min_decryption_version
    );
    for v in &status.versions {
        let state = pb::KeyState::try_from(v.state).map_or("unknown", |s| s.as_str_name());
        println!(
            "      version {}  {state:<22}  decrypts: {}  root key: {}",
            v.version, v.decrypts, v.root_key_ref
        );
    }

    admin
        .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
            tenant: tenant.clone(),
            min_version: v2,
            ..Default::default()
        })
        .await?;
    let old = fields
        .decrypt(pb::DecryptRequest {
            context: context(&tenant, "ssn", RECORD),
            ciphertext: ssn_v1,
        })
        .await;
    println!(
        " 8. SetMinDecryptionVersion {v2}: the version-1 ssn ciphertext is refused, {}",
        refusal(old, Code::FailedPrecondition, "key_version_retired")?
    );
    let still = decrypt_all(&mut fields, &tenant, &current).await?;
    let ok = still
        .iter()
        .filter(|r| matches!(r.result, Some(pb::decrypt_result::Result::Ok(_))))
        .count();
    if ok != PATIENT.len() {
        return Err(format!("only {ok} rewrapped fields decrypt").into());
    }
    println!("      the {ok} rewrapped fields still decrypt");

    admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant: tenant.clone(),
            confirm_tenant: tenant.clone(),
        })
        .await?;
    println!(" 9. ShredTenant {tenant}: every key version destroyed, irreversibly");
    let gone = decrypt_all(&mut fields, &tenant, &current).await?;
    if gone.len() != PATIENT.len() {
        return Err(format!(
            "DecryptBatch after the shred answered {} results for {} fields",
            gone.len(),
            PATIENT.len()
        )
        .into());
    }
    let mut refused = 0;
    for r in &gone {
        match &r.result {
            Some(pb::decrypt_result::Result::Error(e)) if e.kind == "key_destroyed" => {
                refused += 1;
            }
            _ => {
                return Err(
                    "a field of the shredded tenant did not fail with key_destroyed".into(),
                );
            }
        }
    }
    let message = gone
        .iter()
        .find_map(|r| match &r.result {
            Some(pb::decrypt_result::Result::Error(e)) => Some(e.message.clone()),
            _ => None,
        })
        .unwrap_or_default();
    println!(
        "10. DecryptBatch after the shred: all {refused} fields refused, FailedPrecondition (key_destroyed): {message}"
    );
    println!("demo finished");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!(
            "usage: phiseal-demo SOCKET   (the socket of a running phiseald; see scripts/demo)"
        );
        return ExitCode::from(2);
    };
    match run(socket).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phiseal-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
