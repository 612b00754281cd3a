//! `root rotate` / `root migrate`: move every stored tenant key version to a root key, with a
//! progress bar, failures reported as they happen, and a summary that says whether the old
//! root keys are still referenced.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use phiseal::{RootRewrapEvent, RootRewrapReport};
use serde_json::json;

use crate::cli::{GlobalArgs, RootArgs, RootCommand};
use crate::error::CliError;
use crate::output::{printable, report, stderr_line};

/// Runs a `root` subcommand.
pub(crate) async fn run(command: RootCommand, global: &GlobalArgs) -> Result<(), CliError> {
    let (args, to) = match &command {
        RootCommand::Status(args) => return status(args, global).await,
        RootCommand::Rotate(args) => (args, None),
        RootCommand::Migrate { from, to } => (from, Some(to.as_path())),
        RootCommand::NewHsmKey {
            config,
            label,
            audit_log,
        } => {
            let log = phiseald::offline::generate_pkcs11_root_key(config, label, audit_log.clone())
                .await?;
            let shown = printable(label);
            return report(
                global.json,
                &json!({
                    "label": label,
                    "created": true,
                    "audit_log": log.display().to_string(),
                }),
                &format!(
                    "root key '{shown}' created on the token\naudit records: {}",
                    log.display()
                ),
            );
        }
    };
    let opened =
        phiseald::offline::open_root_keyring(&args.config, to, args.audit_log.clone()).await?;
    let caller = phiseald::offline::operator();
    // (Hidden with --json: its stderr is JSON lines.)
    let bar = ProgressBar::with_draw_target(
        None,
        if global.json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {human_pos}/{human_len} key versions re-wrapped")
    {
        bar.set_style(style);
    }
    let outcome = opened
        .keyring
        .rewrap_root_keys(&caller, &mut |event| match event {
            RootRewrapEvent::Planned { to_rewrap } => bar.set_length(to_rewrap),
            RootRewrapEvent::Rewrapped { .. } => bar.inc(1),
            RootRewrapEvent::Failed {
                tenant,
                version,
                error,
            } => {
                bar.inc(1);
                let line = if global.json {
                    json!({
                        "tenant": tenant.as_str(),
                        "version": version,
                        "kind": error.kind(),
                        "message": error.to_string(),
                    })
                    .to_string()
                } else {
                    format!(
                        "tenant '{}' version {version}: {} ({})",
                        printable(tenant.as_str()),
                        printable(&error.to_string()),
                        error.kind()
                    )
                };
                bar.suspend(|| stderr_line(&line));
            }
            _ => {}
        })
        .await;
    bar.finish_and_clear();
    let outcome = outcome?;
    // The audit records are fsynced one by one; this makes sure of the last.
    opened.keyring.flush_audit().await?;
    summarize(global.json, &outcome, &opened.audit_log)?;
    if outcome.failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::RootFailed {
            failed: outcome.failed.len(),
        })
    }
}

/// A key store without any key version: nothing can be concluded about root keys.
fn empty_store() -> CliError {
    CliError::Failed(
        "the key store holds no tenant key version: check --config (a wrong data directory or \
         database?). Nothing can be concluded about which root keys are still needed"
            .into(),
    )
}

fn summarize(
    json: bool,
    r: &RootRewrapReport,
    audit_log: &std::path::Path,
) -> Result<(), CliError> {
    let value = json!({
        "target": r.target,
        "rewrapped": r.rewrapped,
        "already_current": r.already_current,
        "destroyed": r.destroyed,
        "failed": r.failed.len(),
        "still_referenced": r.still_referenced,
        "audit_log": audit_log.display().to_string(),
    });
    let mut human = format!(
        "root key {}: {} key versions re-wrapped, {} already under it, {} destroyed (nothing to \
         move), {} failed\naudit records: {}",
        printable(&r.target),
        r.rewrapped,
        r.already_current,
        r.destroyed,
        r.failed.len(),
        audit_log.display()
    );
    let examined = r.rewrapped + r.already_current + r.destroyed + r.failed.len() as u64;
    if examined == 0 {
        // An empty store (a wrong data directory or database) proves nothing about old keys.
        report(json, &value, &human)?;
        return Err(empty_store());
    }
    if r.still_referenced.is_empty() {
        human.push_str(
            "\nno stored key version references another root key any more: the old root keys \
             are no longer needed by this key store (keep them while backups of the key store \
             made before this run may be restored)",
        );
    } else {
        human.push_str("\nstill referenced (keep these root keys):");
        for (root, count) in &r.still_referenced {
            human.push_str(&format!("\n  {}: {count} key versions", printable(root)));
        }
    }
    report(json, &value, &human)
}

/// `root status`.
async fn status(args: &RootArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let opened =
        phiseald::offline::open_root_keyring(&args.config, None, args.audit_log.clone()).await?;
    let usage = opened.keyring.root_key_usage().await?;
    if usage.under_current == 0 && usage.others.is_empty() {
        return Err(empty_store());
    }
    let mut human = format!(
        "current root key {}: {} key versions",
        printable(&usage.current),
        usage.under_current
    );
    if usage.others.is_empty() {
        human.push_str("\nno stored key version references another root key");
    } else {
        human.push_str("\nother root keys still referenced (run `phiseal root rotate`):");
        for (root, count) in &usage.others {
            human.push_str(&format!("\n  {}: {count} key versions", printable(root)));
        }
    }
    report(
        global.json,
        &json!({
            "current": usage.current,
            "under_current": usage.under_current,
            "others": usage.others,
        }),
        &human,
    )
}
