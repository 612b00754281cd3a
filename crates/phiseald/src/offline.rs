//! The backends of a daemon configuration, opened outside the daemon for the CLI's offline
//! root-key commands: `phiseal root rotate --config FILE` and
//! `phiseal root migrate --config FILE --to NEW`. They may run while daemons serve: every
//! change is a compare-and-set on one key version's wrapped bytes, and the tenant keys
//! themselves never change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use phiseal::audit::{Action, AuditEvent, AuditSink, Outcome};
use phiseal::kms::{Kms, KmsChain};
use phiseal::{Actor, Caller, Keyring, Profile};
use phiseal_audit_file::{Durability, FileAuditLog};

use crate::config::{Config, KeyStoreKind, KmsKind, Overrides, ProfileName, Source};
use crate::daemon::open_key_store;
use crate::error::DaemonError;
use crate::kms::{open_kms, open_kms_chain, pkcs11_config};

/// The audit log of the offline root-key commands, in the data directory of `--config`
/// unless `--audit-log` says otherwise. Its own hash chain: the daemon holds its log.
pub const ROOT_AUDIT_LOG: &str = "audit-root-keys.log";

/// A keyring for a root-key run, with where its audit records go.
#[derive(Debug)]
pub struct RootKeyring {
    /// Wraps with the target root key; unwraps with the target's or the source's.
    pub keyring: Keyring,
    /// The audit log file (fsynced per record).
    pub audit_log: PathBuf,
}

/// Opens the key store of `config_file` and, as KMS, its `[kms]` (with `[kms.previous]`) or,
/// with `to`, the `[kms]` of `to` as the target and all of `config_file`'s KMS backends as
/// sources. Audit records go to `audit_log`, default `DATA_DIR/audit-root-keys.log`, each
/// fsynced before the step it records goes on.
pub async fn open_root_keyring(
    config_file: &Path,
    to: Option<&Path>,
    audit_log: Option<PathBuf>,
) -> Result<RootKeyring, DaemonError> {
    let config = Config::load(Source::File(config_file), &Overrides::default())?;
    require_existing_source(&config)?;
    let kms: Arc<dyn Kms> = match to {
        None => open_kms(&config).await?,
        Some(to) => {
            let target = Config::load(Source::File(to), &Overrides::default())?;
            crate::config::distinct_root_keys_across(&target.kms, &config.kms)
                .map_err(DaemonError::Config)?;
            let target_kms = open_kms_chain(&target.kms, &target.data_dir).await?;
            let source_kms = open_kms(&config).await?;
            Arc::new(KmsChain::new(target_kms, vec![source_kms]))
        }
    };
    let store = open_key_store(&config).await?.store;
    let (audit, audit_log) = open_root_audit_log(&config, audit_log, true)?;
    let keyring = Keyring::builder()
        .kms(kms)
        .key_store(store)
        .audit(audit)
        // The source's profile: a production deployment's keys are never moved under the
        // local development KMS (a development one may move away from it).
        .profile(match config.profile {
            ProfileName::Development => Profile::Development,
            ProfileName::Production => Profile::Production,
        })
        .build()?;
    Ok(RootKeyring { keyring, audit_log })
}

/// The audit log of a root-key command (fsynced per record; one run's log: small, never
/// rolled over): `audit_log` as given, or `DATA_DIR/audit-root-keys.log` of `config`. The
/// data directory is prepared as the daemon's (created 0700 if missing, refused if others can
/// enter it) whenever the log is in it or `uses_data_dir` (the command reads its key store);
/// a root key may be made with an explicit log before the daemon's first start.
fn open_root_audit_log(
    config: &Config,
    audit_log: Option<PathBuf>,
    uses_data_dir: bool,
) -> Result<(Arc<FileAuditLog>, PathBuf), DaemonError> {
    let path = match audit_log {
        Some(path) if !uses_data_dir => {
            let log = FileAuditLog::open_with(
                &path,
                Durability::Strict,
                phiseal_audit_file::LogOptions::default(),
            )
            .map_err(phiseal_embedded::EmbeddedError::from)?;
            return Ok((Arc::new(log), path));
        }
        Some(path) => path,
        None => config.data_dir.join(ROOT_AUDIT_LOG),
    };
    let options = phiseal_embedded::EmbeddedOptions {
        durability: Durability::Strict,
        audit_log: Some(path.clone()),
        audit_rollover_bytes: None,
        ..Default::default()
    };
    Ok((
        phiseal_embedded::open_audit(&config.data_dir, &options)?,
        path,
    ))
}

/// Refuses a source whose embedded parts do not exist: the key store file of
/// `key_store.kind = "sqlite"`, the `root.key` of `kms.kind = "local"` (current or previous).
/// Opening them would create them — an empty store and a new root key in a wrong data
/// directory — where a root-key command must only read and move what exists.
fn require_existing_source(config: &Config) -> Result<(), DaemonError> {
    let paths = phiseal_embedded::EmbeddedPaths::new(&config.data_dir);
    let local_kms = config.kms.kind == KmsKind::Local
        || config
            .kms
            .previous
            .as_ref()
            .is_some_and(|p| p.kind == KmsKind::Local);
    let mut needed = Vec::new();
    if config.key_store.kind == KeyStoreKind::Sqlite {
        needed.push(("key store", paths.key_store));
    }
    if local_kms {
        needed.push(("local root key", paths.root_key));
    }
    for (what, path) in needed {
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DaemonError::Config(format!(
                    "data_dir: the {what} {} does not exist: check --config (a wrong data \
                     directory?); root-key commands never create one",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(DaemonError::Config(format!(
                    "data_dir: the {what} {} cannot be read: {e}",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

/// The caller of an offline command: `uid:N` of the operator, with the process id.
pub fn operator() -> Caller {
    let uid = rustix::process::getuid().as_raw();
    Caller::new(Actor {
        identity: format!("uid:{uid}").into(),
        uid: Some(uid),
        pid: Some(std::process::id()),
    })
}

/// Creates a new AES-256 root key labelled `label` on the token of `config_file`'s
/// `[kms.pkcs11]` (sensitive, non-extractable, encrypt/decrypt only); refuses a label in use.
///
/// Audited in the root-key commands' log (`audit_log`, default `DATA_DIR/audit-root-keys.log`,
/// each record fsynced): a `create_root_key` `attempt` before — nothing is created if it
/// cannot be written — and the result after, both naming the key in `root_key`. Returns the
/// log's path.
pub async fn generate_pkcs11_root_key(
    config_file: &Path,
    label: &str,
    audit_log: Option<PathBuf>,
) -> Result<PathBuf, DaemonError> {
    let config = Config::load(Source::File(config_file), &Overrides::default())?;
    let section = config.kms.pkcs11.as_ref().ok_or_else(|| {
        DaemonError::Config("kms.pkcs11: the config has no PKCS#11 token to create a key on".into())
    })?;
    let pkcs11 = pkcs11_config(section);
    let (audit, audit_log) = open_root_audit_log(&config, audit_log, false)?;
    let caller = operator();
    let root_key: Arc<str> = phiseal_kms_pkcs11::root_key_ref_of(&pkcs11.token_label, label).into();
    let record = |outcome| AuditEvent {
        time: jiff::Timestamp::now(),
        actor: caller.actor.clone(),
        action: Action::CreateRootKey,
        tenant: None,
        field: None,
        record: None,
        key_version: None,
        from_key_version: None,
        key_source: None,
        root_key: Some(Arc::clone(&root_key)),
        outcome,
        request_id: Arc::clone(&caller.request_id),
    };
    let audit_error = |source| {
        DaemonError::Keyring(phiseal::Error::Audit {
            backend: "file".into(),
            source,
        })
    };
    audit
        .append(&[record(Outcome::Attempt)])
        .await
        .map_err(audit_error)?;
    let created = phiseal_kms_pkcs11::generate_root_key(&pkcs11, label)
        .await
        .map_err(|source| DaemonError::Kms {
            kind: "pkcs11",
            source,
        });
    let outcome = match &created {
        Ok(()) => Outcome::Ok,
        Err(_) => Outcome::Error("kms"),
    };
    let recorded = audit.append(&[record(outcome)]).await;
    created?;
    recorded.map_err(|source| DaemonError::NotAudited {
        done: format!("the root key '{label}' was created on the token"),
        log: audit_log.clone(),
        source,
    })?;
    Ok(audit_log)
}
