//! `tenant create` and `key status|rotate|min-version`.

use std::fmt::Write as _;

use phiseal_proto::v1::{
    CreateTenantRequest, KeyState, KeyStatusRequest, KeyStatusResponse, KeyVersion,
    RotateTenantKeyRequest, SetMinDecryptionVersionRequest,
};
use serde_json::json;

use crate::cli::{GlobalArgs, KeyCommand, MinVersionArgs, TenantCommand};
use crate::client::Daemon;
use crate::error::CliError;
use crate::output::{printable, report};

/// Runs a `tenant` subcommand.
pub(crate) async fn tenant(cmd: TenantCommand, global: &GlobalArgs) -> Result<(), CliError> {
    match cmd {
        TenantCommand::Create { tenant } => create_tenant(&tenant, global).await,
    }
}

/// Runs a `key` subcommand.
pub(crate) async fn key(cmd: KeyCommand, global: &GlobalArgs) -> Result<(), CliError> {
    match cmd {
        KeyCommand::Status(args) => key_status(&args.tenant, global).await,
        KeyCommand::Rotate(args) => rotate(&args.tenant, args.if_latest, global).await,
        KeyCommand::MinVersion(args) => min_version(&args, global).await,
    }
}

async fn create_tenant(tenant: &str, global: &GlobalArgs) -> Result<(), CliError> {
    let daemon = Daemon::connect(global).await?;
    let request = CreateTenantRequest {
        tenant: tenant.to_owned(),
    };
    let what = format!("create tenant '{}'", printable(tenant));
    let response = daemon
        .call(&what, daemon.admin().create_tenant(request))
        .await?;
    report(
        global.json,
        &json!({ "tenant": tenant, "key_version": response.key_version }),
        &format!(
            "created tenant '{}' (key version {})",
            printable(tenant),
            response.key_version
        ),
    )
}

async fn rotate(tenant: &str, if_latest: Option<u32>, global: &GlobalArgs) -> Result<(), CliError> {
    let daemon = Daemon::connect(global).await?;
    let request = RotateTenantKeyRequest {
        tenant: tenant.to_owned(),
        expected_latest_version: if_latest,
    };
    let what = format!("rotate the key of tenant '{}'", printable(tenant));
    let response = daemon
        .call(&what, daemon.admin().rotate_tenant_key(request))
        .await?;
    report(
        global.json,
        &json!({ "tenant": tenant, "key_version": response.key_version }),
        &format!(
            "rotated tenant '{}': the primary key version is now {}",
            printable(tenant),
            response.key_version
        ),
    )
}

async fn min_version(args: &MinVersionArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let daemon = Daemon::connect(global).await?;
    let request = SetMinDecryptionVersionRequest {
        tenant: args.tenant.clone(),
        min_version: args.version,
        expected_min_version: args.if_current,
        allow_lower: args.allow_lower,
    };
    let what = format!(
        "set the minimum decryption version of tenant '{}'",
        printable(&args.tenant)
    );
    daemon
        .call(&what, daemon.admin().set_min_decryption_version(request))
        .await?;
    report(
        global.json,
        &json!({ "tenant": args.tenant, "min_decryption_version": args.version }),
        &format!(
            "tenant '{}': the minimum decryption version is now {}",
            printable(&args.tenant),
            args.version
        ),
    )
}

async fn key_status(tenant: &str, global: &GlobalArgs) -> Result<(), CliError> {
    let daemon = Daemon::connect(global).await?;
    let request = KeyStatusRequest {
        tenant: tenant.to_owned(),
    };
    let what = format!("key status of tenant '{}'", printable(tenant));
    let status = daemon
        .call(&what, daemon.admin().key_status(request))
        .await?;
    report(global.json, &status_json(&status), &status_table(&status))
}

/// A protobuf timestamp as RFC 3339 (UTC), or `None` if absent.
fn time_text(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    Some(match jiff::Timestamp::new(ts.seconds, ts.nanos) {
        Ok(t) => t.to_string(),
        Err(_) => format!("(invalid time: {} s {} ns)", ts.seconds, ts.nanos),
    })
}

/// [`time_text`] to the second, for the table.
fn time_text_seconds(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let seconds = ts.map(|ts| prost_types::Timestamp {
        seconds: ts.seconds,
        nanos: 0,
    });
    time_text(seconds.as_ref())
}

/// The name of a key state.
fn state_name(version: &KeyVersion) -> &'static str {
    match KeyState::try_from(version.state) {
        Ok(KeyState::Primary) => "primary",
        Ok(KeyState::DecryptOnly) => "decrypt_only",
        Ok(KeyState::Destroyed) => "destroyed",
        Ok(KeyState::Unspecified) | Err(_) => "unknown",
    }
}

/// `key status --json`.
fn status_json(status: &KeyStatusResponse) -> serde_json::Value {
    let versions: Vec<serde_json::Value> = status
        .versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "state": state_name(v),
                "decrypts": v.decrypts,
                "created_at": time_text(v.created_at.as_ref()),
                "root_key_ref": v.root_key_ref,
            })
        })
        .collect();
    json!({
        "tenant": status.tenant,
        "primary_version": status.primary_version,
        "min_decryption_version": status.min_decryption_version,
        "shredded_at": time_text(status.shredded_at.as_ref()),
        "versions": versions,
    })
}

/// `key status` for a person: a header and a table of versions.
fn status_table(status: &KeyStatusResponse) -> String {
    let primary = status
        .primary_version
        .map_or_else(|| "none".to_owned(), |v| v.to_string());
    let mut out = format!(
        "tenant: {}\nprimary version: {primary}\nminimum decryption version: {}\n",
        printable(&status.tenant),
        status.min_decryption_version
    );
    if let Some(shredded) = time_text_seconds(status.shredded_at.as_ref()) {
        let _ = writeln!(out, "shredded at: {shredded}");
    }
    let header = ["VERSION", "STATE", "DECRYPTS", "CREATED", "ROOT KEY REF"].map(String::from);
    let rows: Vec<[String; 5]> = status
        .versions
        .iter()
        .map(|v| {
            [
                v.version.to_string(),
                state_name(v).to_owned(),
                if v.decrypts { "yes" } else { "no" }.to_owned(),
                time_text_seconds(v.created_at.as_ref()).unwrap_or_else(|| "-".to_owned()),
                printable(&v.root_key_ref).into_owned(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&header, &rows));
    out.trim_end().to_owned()
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in std::iter::once(header).chain(rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (width, cell) in widths.iter().zip(row) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KeyStatusResponse {
        KeyStatusResponse {
            tenant: "acme".into(),
            primary_version: Some(2),
            min_decryption_version: 1,
            shredded_at: None,
            versions: vec![
                KeyVersion {
                    version: 1,
                    state: KeyState::DecryptOnly as i32,
                    decrypts: true,
                    root_key_ref: "local:root-1".into(),
                    created_at: Some(prost_types::Timestamp {
                        seconds: 1_735_689_600,
                        nanos: 500,
                    }),
                },
                KeyVersion {
                    version: 2,
                    state: KeyState::Primary as i32,
                    decrypts: true,
                    root_key_ref: "local:root-1".into(),
                    created_at: None,
                },
            ],
        }
    }

    #[test]
    fn table_lists_versions() {
        let text = status_table(&sample());
        assert!(text.contains("primary version: 2"), "{text}");
        assert!(text.contains("minimum decryption version: 1"), "{text}");
        assert!(!text.contains("shredded"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.contains(&"VERSION  STATE         DECRYPTS  CREATED               ROOT KEY REF")
        );
        assert!(
            lines.contains(&"1        decrypt_only  yes       2025-01-01T00:00:00Z  local:root-1")
        );
        assert!(
            lines.contains(&"2        primary       yes       -                     local:root-1")
        );
    }

    #[test]
    fn json_has_every_member() {
        let value = status_json(&sample());
        assert_eq!(value["primary_version"], 2);
        assert_eq!(value["shredded_at"], serde_json::Value::Null);
        assert_eq!(value["versions"][0]["state"], "decrypt_only");
        assert_eq!(
            value["versions"][0]["created_at"],
            "2025-01-01T00:00:00.0000005Z"
        );
        assert_eq!(value["versions"][1]["created_at"], serde_json::Value::Null);
    }
}
