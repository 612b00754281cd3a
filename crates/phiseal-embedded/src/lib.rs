//! The embedded default, for development and single-host use: the local development KMS, the
//! SQLite key store and the file audit log, all in one private data directory.
//!
//! ```text
//! DATA_DIR/            mode 0700
//!   root.key           local root key (0600) — development only, refused by Profile::Production
//!   keys.db            wrapped tenant keys (SQLite, WAL)
//!   audit.log          hash-chained audit log (JSON lines)
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phiseal::{CacheSettings, Keyring, KeyringBuilder, Profile};
use phiseal_audit_file::{Durability, FileAuditLog, LogOptions};
use phiseal_kms_local::LocalKms;
use phiseal_store_sqlite::SqliteKeyStore;

/// Why the embedded default could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// The data directory could not be created or is readable by others.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The local KMS refused its root key file.
    #[error(transparent)]
    Kms(#[from] phiseal_kms_local::LocalKmsError),
    /// The root key file is missing but the key store holds tenants: their keys are wrapped
    /// under the missing root key, so a new one must not be created in its place.
    #[error(
        "the local root key {root_key} is missing, but the key store {key_store} holds tenants \
         whose keys are wrapped under a local root key: restore root.key from its backup. A \
         new root key would leave those tenants unrecoverable while the daemon writes new keys \
         under it; if they are to be abandoned, move the key store away first"
    )]
    RootKeyMissing {
        /// The missing root key file.
        root_key: PathBuf,
        /// The key store that still holds tenants.
        key_store: PathBuf,
    },
    /// The key store could not be opened.
    #[error(transparent)]
    Store(#[from] phiseal_store_sqlite::SqliteStoreError),
    /// The audit log could not be opened (for a torn tail: run `phiseal audit verify`).
    #[error(transparent)]
    Audit(#[from] phiseal_audit_file::AuditFileError),
    /// The keyring refused the combination.
    #[error(transparent)]
    Keyring(#[from] phiseal::Error),
}

/// Settings of the embedded default.
#[derive(Debug, Clone, Default)]
pub struct EmbeddedOptions {
    /// Audit durability (default: written before return, fsynced every 200 ms).
    pub durability: Durability,
    /// Key-cache settings.
    pub cache: CacheSettings,
    /// The audit log file, if not `DATA_DIR/audit.log` (several daemons sharing one key
    /// store each write their own audit chain).
    pub audit_log: Option<PathBuf>,
    /// Roll the audit log over to a new file at this size
    /// ([`phiseal_audit_file::LogOptions::rollover_at`]); `None`: one file.
    pub audit_rollover_bytes: Option<u64>,
}

/// Paths of the embedded default's files inside a data directory.
#[derive(Debug, Clone)]
pub struct EmbeddedPaths {
    /// The local root key.
    pub root_key: PathBuf,
    /// The SQLite key store.
    pub key_store: PathBuf,
    /// The audit log.
    pub audit_log: PathBuf,
}

impl EmbeddedPaths {
    /// The paths under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root_key: data_dir.join("root.key"),
            key_store: data_dir.join("keys.db"),
            audit_log: data_dir.join("audit.log"),
        }
    }
}

/// Creates `data_dir` with mode 0700 if missing; refuses one that group or others can access.
fn prepare_data_dir(data_dir: &Path) -> Result<(), EmbeddedError> {
    let err = |reason: String| EmbeddedError::DataDir {
        path: data_dir.to_owned(),
        reason,
    };
    if !data_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| err(format!("cannot create it: {e}")))?;
    }
    let meta = std::fs::symlink_metadata(data_dir).map_err(|e| err(format!("cannot stat: {e}")))?;
    if !meta.is_dir() {
        return Err(err("is not a directory (symlinks are refused)".into()));
    }
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(err(format!(
            "is owned by uid {}, not by this process (uid {uid}): its owner could replace the \
             root key, the key store or the audit log; use a directory this user owns",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "mode {mode:04o} lets other users in; run `chmod 700 {}`",
            data_dir.display()
        )));
    }
    Ok(())
}

/// The embedded default's parts, opened, for callers that wrap them (the sidecar meters
/// them) before handing them to a [`KeyringBuilder`].
#[derive(Debug)]
pub struct EmbeddedParts {
    /// The local development KMS.
    pub kms: Arc<LocalKms>,
    /// The SQLite key store.
    pub store: Arc<SqliteKeyStore>,
    /// The file audit log.
    pub audit: Arc<FileAuditLog>,
}

/// Opens (creating on first use) the embedded default's parts in `data_dir`.
pub fn open_parts(
    data_dir: &Path,
    options: &EmbeddedOptions,
) -> Result<EmbeddedParts, EmbeddedError> {
    let kms = open_local_kms(data_dir)?;
    let audit = open_audit(data_dir, options)?;
    let store = SqliteKeyStore::open(EmbeddedPaths::new(data_dir).key_store)?;
    Ok(EmbeddedParts {
        kms,
        store: Arc::new(store),
        audit,
    })
}

/// Opens (creating on first use) the local development KMS's root key in `data_dir`. A
/// missing root key is created only if the data directory's key store holds no tenant
/// ([`EmbeddedError::RootKeyMissing`] otherwise): a lost or unmounted `root.key` must stop the
/// start, not be silently replaced. Only the SQLite store in `data_dir` is checked: a process
/// whose tenant keys are in another store (a shared database) must check that one itself
/// before calling this — a new root key next to existing tenants makes them all unreadable
/// (`phiseald` does, for PostgreSQL).
pub fn open_local_kms(data_dir: &Path) -> Result<Arc<LocalKms>, EmbeddedError> {
    prepare_data_dir(data_dir)?;
    let paths = EmbeddedPaths::new(data_dir);
    let root_key_missing = matches!(
        std::fs::symlink_metadata(&paths.root_key),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    );
    if root_key_missing
        && paths.key_store.exists()
        && SqliteKeyStore::open(&paths.key_store)?.holds_tenants()?
    {
        return Err(EmbeddedError::RootKeyMissing {
            root_key: paths.root_key,
            key_store: paths.key_store,
        });
    }
    Ok(Arc::new(LocalKms::open(paths.root_key)?))
}

/// Opens (creating on first use) the audit log: `options.audit_log`, or `DATA_DIR/audit.log`.
pub fn open_audit(
    data_dir: &Path,
    options: &EmbeddedOptions,
) -> Result<Arc<FileAuditLog>, EmbeddedError> {
    prepare_data_dir(data_dir)?;
    let path = options
        .audit_log
        .clone()
        .unwrap_or_else(|| EmbeddedPaths::new(data_dir).audit_log);
    let log_options = match options.audit_rollover_bytes {
        Some(bytes) => LogOptions::default().rollover_at(bytes),
        None => LogOptions::default(),
    };
    Ok(Arc::new(FileAuditLog::open_with(
        path,
        options.durability,
        log_options,
    )?))
}

/// A keyring builder with the embedded default's parts set, for further settings
/// (provider, algorithm). The local KMS makes it development-only.
pub fn builder(
    data_dir: &Path,
    options: &EmbeddedOptions,
) -> Result<KeyringBuilder, EmbeddedError> {
    let parts = open_parts(data_dir, options)?;
    Ok(Keyring::builder()
        // The local KMS is for development only.
        .profile(Profile::Development)
        .kms(parts.kms)
        .key_store(parts.store)
        .audit(parts.audit)
        .cache(options.cache))
}

/// Opens (creating on first use) the embedded default in `data_dir`.
pub fn open(data_dir: &Path, options: &EmbeddedOptions) -> Result<Keyring, EmbeddedError> {
    Ok(builder(data_dir, options)?.build()?)
}
