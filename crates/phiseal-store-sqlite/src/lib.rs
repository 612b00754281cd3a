//! # phiseal-store-sqlite — the embedded key store
//!
//! [`SqliteKeyStore`] implements [`phiseal::store::KeyStore`] on one SQLite file. It holds only
//! *wrapped* tenant keys (useless without the KMS root key), key-check MACs and lifecycle
//! state. Several processes may open the same file at once.
//!
//! ## Durability and concurrency
//! - The file is created with mode `0600`; SQLite gives its `-wal` and `-shm` files the same
//!   permissions. An existing file is refused if it is a symlink or not a regular file, or if
//!   group or others may write it or others may read it (0640 is accepted, for a backup agent's
//!   group).
//! - `journal_mode=WAL` and `synchronous=FULL`: every committed transaction (a rotation, a
//!   shred) is fsynced before the call returns, so it survives a crash or power loss.
//! - Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single write
//!   lock up front. Version allocation is therefore a true compare-and-set: the latest version
//!   is read and the next one inserted under the same lock, so two processes rotating at once
//!   can never both create the same version. The `(tenant, version)` primary key and a partial
//!   unique index (at most one `primary` per tenant) guard the same invariants a second time.
//! - `busy_timeout` is 10 s; a lock still held after that is reported as
//!   [`BackendErrorKind::Unavailable`].
//! - Calls run on `tokio::task::spawn_blocking`; one handle serializes its calls on one
//!   connection. Open several handles (or processes) for parallel reads.
//!
//! ## Shredding
//! `secure_delete=ON` makes SQLite overwrite deleted content with zeros. After the shred
//! transaction commits, a `wal_checkpoint(TRUNCATE)` copies the zeroed pages into the main
//! file and truncates the write-ahead log, so old pages holding the wrapped keys do not linger
//! in either file. Copies outside SQLite's control — file-system journals, SSD remapping,
//! snapshots, backups — are not erased; the wrapped keys are useless without the root key,
//! and crypto-shredding of backups relies on that.
//!
//! ## Schema (version 1, `PRAGMA user_version = 1`)
//! ```sql
//! CREATE TABLE tenants (
//!     tenant TEXT PRIMARY KEY NOT NULL,
//!     min_decrypt_version INTEGER NOT NULL CHECK (min_decrypt_version >= 1),
//!     shredded_at TEXT NULL,              -- RFC 3339
//!     created_at TEXT NOT NULL            -- RFC 3339
//! ) STRICT;
//! CREATE TABLE key_versions (
//!     tenant TEXT NOT NULL REFERENCES tenants (tenant),
//!     version INTEGER NOT NULL CHECK (version >= 1),
//!     state TEXT NOT NULL CHECK (state IN ('primary', 'decrypt_only', 'destroyed')),
//!     root_key_ref TEXT NULL,
//!     wrapped BLOB NULL,
//!     key_check BLOB NOT NULL,
//!     created_at TEXT NOT NULL,           -- RFC 3339
//!     PRIMARY KEY (tenant, version)
//! ) STRICT;
//! CREATE UNIQUE INDEX key_versions_one_primary ON key_versions (tenant) WHERE state = 'primary';
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use phiseal::context::TenantId;
use phiseal::kms::WrappedKey;
use phiseal::store::{KeyRecord, KeyState, KeyStore, StoreRefusal, TenantRecord};
use phiseal::{BackendError, BackendErrorKind};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};

/// The schema version this crate creates and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// How long a call waits for another connection's lock before failing as unavailable.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a shred tries the WAL checkpoint while readers block it.
const CHECKPOINT_ATTEMPTS: u32 = 3;
/// How long each checkpoint attempt waits for the readers. Short: the attempt holds the
/// store's one connection (every call of this process waits) and, while it waits, the
/// database's write lock (every writer of every process waits); a reader that stays (a
/// backup tool's long read transaction) would hold both for the whole [`BUSY_TIMEOUT`].
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(250);

const SCHEMA_V1: &str = "
CREATE TABLE tenants (
    tenant TEXT PRIMARY KEY NOT NULL,
    min_decrypt_version INTEGER NOT NULL CHECK (min_decrypt_version >= 1),
    shredded_at TEXT NULL,
    created_at TEXT NOT NULL
) STRICT;
CREATE TABLE key_versions (
    tenant TEXT NOT NULL REFERENCES tenants (tenant),
    version INTEGER NOT NULL CHECK (version >= 1),
    state TEXT NOT NULL CHECK (state IN ('primary', 'decrypt_only', 'destroyed')),
    root_key_ref TEXT NULL,
    wrapped BLOB NULL,
    key_check BLOB NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tenant, version)
) STRICT;
CREATE UNIQUE INDEX key_versions_one_primary ON key_versions (tenant) WHERE state = 'primary';
PRAGMA user_version = 1;
";

/// Everything the SQLite key store can fail with. Messages name the tenant and version and say
/// what to do; they never contain wrapped or key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteStoreError {
    /// Creating the database file failed.
    #[error(
        "sqlite key store: could not {action} '{path}': check that the directory exists and is \
         writable by this user"
    )]
    Io {
        /// What was being done.
        action: &'static str,
        /// The database path.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: io::Error,
    },
    /// SQLite reported an error.
    #[error("sqlite key store: could not {action}")]
    Sqlite {
        /// What was being done.
        action: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A PRAGMA the store's guarantees depend on did not take effect.
    #[error(
        "sqlite key store: could not set {pragma} (it reads back as '{found}'): the file system \
         or SQLite build does not support it; put the key store on a local file system"
    )]
    Pragma {
        /// The PRAGMA.
        pragma: &'static str,
        /// What it reads back as.
        found: String,
    },
    /// The database was created by a newer schema.
    #[error(
        "sqlite key store: schema version {found} is newer than this build supports \
         ({SCHEMA_VERSION}): upgrade phiseal"
    )]
    SchemaTooNew {
        /// `PRAGMA user_version` of the file.
        found: i64,
    },
    /// An existing database file that is not a regular file, or that group or others may
    /// write or others may read.
    #[error(
        "sqlite key store: '{path}' {problem}: its records decide which tenant keys exist (a \
         copy of its wrapped keys written back could undo a shred); make it a regular file \
         with mode 0600 owned by the daemon's user (`chmod 600`)"
    )]
    InsecureFile {
        /// The database path.
        path: PathBuf,
        /// What is wrong (`is a symlink`, `has mode 0644` …).
        problem: String,
    },
    /// A previous call panicked while holding the connection.
    #[error(
        "sqlite key store: the connection is unusable after an internal panic: restart the \
         process"
    )]
    Poisoned,
    /// The blocking task running the call failed.
    #[error("sqlite key store: the blocking task failed (panicked or was cancelled)")]
    Task(#[source] tokio::task::JoinError),
    /// The call would break a key-store invariant (see [`StoreRefusal`]).
    #[error(transparent)]
    Refused(#[from] StoreRefusal),
    /// A stored row is not valid. The record is refused, never used.
    #[error(
        "sqlite key store is corrupt: {detail}; refusing it: restore the key store from backup \
         and investigate"
    )]
    Corrupt {
        /// What is wrong, naming the tenant and version (never key bytes).
        detail: String,
    },
    /// The shred committed but the WAL still holds old pages.
    #[error(
        "tenant '{tenant}' is shredded, but the write-ahead log could not be truncated because \
         other connections kept reading: old wrapped keys may remain in '{path}-wal' until the \
         next checkpoint; run the shred again (it is idempotent)"
    )]
    CheckpointIncomplete {
        /// The tenant.
        tenant: TenantId,
        /// The database path.
        path: PathBuf,
    },
}

impl SqliteStoreError {
    fn sqlite(action: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| SqliteStoreError::Sqlite { action, source }
    }

    /// The [`BackendErrorKind`] this error maps to at the trait boundary.
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            SqliteStoreError::Io { .. }
            | SqliteStoreError::InsecureFile { .. }
            | SqliteStoreError::Pragma { .. }
            | SqliteStoreError::SchemaTooNew { .. } => BackendErrorKind::Misconfigured,
            SqliteStoreError::Sqlite { source, .. } => sqlite_kind(source),
            SqliteStoreError::Poisoned | SqliteStoreError::Task(_) => BackendErrorKind::Other,
            SqliteStoreError::Refused(refusal) => refusal.kind(),
            SqliteStoreError::Corrupt { .. } => BackendErrorKind::InvalidData,
            SqliteStoreError::CheckpointIncomplete { .. } => BackendErrorKind::Unavailable,
        }
    }
}

fn sqlite_kind(err: &rusqlite::Error) -> BackendErrorKind {
    match err.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => BackendErrorKind::Unavailable,
        Some(ErrorCode::ConstraintViolation) => BackendErrorKind::Conflict,
        Some(
            ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied
            | ErrorCode::ReadOnly
            | ErrorCode::NotADatabase,
        ) => BackendErrorKind::Misconfigured,
        Some(ErrorCode::DatabaseCorrupt) => BackendErrorKind::InvalidData,
        _ => BackendErrorKind::Other,
    }
}

impl From<SqliteStoreError> for BackendError {
    fn from(err: SqliteStoreError) -> Self {
        let kind = err.kind();
        let message = err.to_string();
        // The message describes the failure; the underlying cause is kept as the source (not
        // `err` itself, whose text would then appear twice in `Display`).
        match err {
            SqliteStoreError::Io { source, .. } => {
                BackendError::new(kind, message).with_source(source)
            }
            SqliteStoreError::Sqlite { source, .. } => {
                BackendError::new(kind, message).with_source(source)
            }
            SqliteStoreError::Task(source) => BackendError::new(kind, message).with_source(source),
            _ => BackendError::new(kind, message),
        }
    }
}

/// The embedded key store: one SQLite file, safe for several handles and processes at once.
///
/// Cheap to clone; clones share one connection. `Debug` shows only the path.
#[derive(Clone)]
pub struct SqliteKeyStore {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for SqliteKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteKeyStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// An existing database — and its write-ahead log and shared-memory files, which hold the
/// same pages — must be a regular file (not a symlink) of this process's user that group and
/// others cannot write and others cannot read (0640 lets a backup agent read it through the
/// group).
fn check_existing_files(path: &Path) -> Result<(), SqliteStoreError> {
    check_existing_file(path)?;
    for suffix in ["-wal", "-shm"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        let companion = PathBuf::from(companion);
        match std::fs::symlink_metadata(&companion) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            _ => check_existing_file(&companion)?,
        }
    }
    Ok(())
}

/// [`check_existing_files`] for one file.
fn check_existing_file(path: &Path) -> Result<(), SqliteStoreError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| SqliteStoreError::Io {
        action: "inspect the database file",
        path: path.to_owned(),
        source,
    })?;
    let insecure = |problem: String| SqliteStoreError::InsecureFile {
        path: path.to_owned(),
        problem,
    };
    if meta.file_type().is_symlink() {
        return Err(insecure("is a symlink".into()));
    }
    if !meta.file_type().is_file() {
        return Err(insecure("is not a regular file".into()));
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
    if mode & 0o026 != 0 {
        return Err(insecure(format!(
            "has mode {mode:04o} (group or others may write it, or others may read it)"
        )));
    }
    let uid = rustix::process::geteuid().as_raw();
    let owner = std::os::unix::fs::MetadataExt::uid(&meta);
    if owner != uid {
        return Err(insecure(format!(
            "belongs to uid {owner}, not to this process's user (uid {uid}), who could not \
             keep it from being replaced"
        )));
    }
    Ok(())
}

impl SqliteKeyStore {
    /// Opens (creating with mode `0600` if needed) the key store at `path`, sets the PRAGMAs
    /// described in the crate docs and creates or checks the schema.
    ///
    /// This blocks on file I/O (and on other processes' locks for up to [`BUSY_TIMEOUT`]); call
    /// it at start-up or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SqliteStoreError> {
        let path = path.as_ref().to_owned();
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                // SQLite initializes an empty file itself; durability of the directory entry
                // comes with the first fsynced transaction below.
                drop(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_existing_files(&path)?,
            Err(source) => {
                return Err(SqliteStoreError::Io {
                    action: "create the database file",
                    path,
                    source,
                });
            }
        }
        let mut conn = Connection::open_with_flags(
            &path,
            // (No symlink followed: one put there after the checks is refused.)
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(SqliteStoreError::sqlite("open the database file"))?;
        configure(&conn)?;
        migrate(&mut conn)?;
        Ok(SqliteKeyStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
        })
    }

    /// Whether the store holds at least one tenant (shredded ones included). Blocking, like
    /// [`SqliteKeyStore::open`]: for start-up checks.
    pub fn holds_tenants(&self) -> Result<bool, SqliteStoreError> {
        let conn = self.conn.lock().map_err(|_| SqliteStoreError::Poisoned)?;
        conn.query_row("SELECT EXISTS (SELECT 1 FROM tenants)", [], |row| {
            row.get(0)
        })
        .map_err(SqliteStoreError::sqlite("look for tenants"))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection in a blocking task.
    async fn run<T, F>(&self, f: F) -> Result<T, SqliteStoreError>
    where
        F: FnOnce(&mut Connection, &Path) -> Result<T, SqliteStoreError> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let path = Arc::clone(&self.path);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| SqliteStoreError::Poisoned)?;
            f(&mut guard, &path)
        })
        .await
        .map_err(SqliteStoreError::Task)?
    }
}

fn configure(conn: &Connection) -> Result<(), SqliteStoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(SqliteStoreError::sqlite("set the busy timeout"))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(SqliteStoreError::sqlite("enable WAL journal mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SqliteStoreError::Pragma {
            pragma: "journal_mode=WAL",
            found: mode,
        });
    }
    // (name, value to set, value it must read back as)
    let settings: [(&'static str, &'static str, i64); 3] = [
        ("synchronous", "FULL", 2),
        ("secure_delete", "ON", 1),
        ("foreign_keys", "ON", 1),
    ];
    for (name, value, expected) in settings {
        conn.pragma_update(None, name, value)
            .map_err(SqliteStoreError::sqlite("set a PRAGMA"))?;
        let found: i64 = conn
            .pragma_query_value(None, name, |row| row.get(0))
            .map_err(SqliteStoreError::sqlite("read back a PRAGMA"))?;
        if found != expected {
            return Err(SqliteStoreError::Pragma {
                pragma: name,
                found: found.to_string(),
            });
        }
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), SqliteStoreError> {
    let version = user_version(conn)?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if version > SCHEMA_VERSION {
        return Err(SqliteStoreError::SchemaTooNew { found: version });
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(SqliteStoreError::sqlite("begin the schema transaction"))?;
    // Another process may have created the schema while we waited for the lock.
    let version = user_version(&tx)?;
    if version == 0 {
        tx.execute_batch(SCHEMA_V1)
            .map_err(SqliteStoreError::sqlite("create the schema"))?;
    } else if version > SCHEMA_VERSION {
        return Err(SqliteStoreError::SchemaTooNew { found: version });
    }
    tx.commit()
        .map_err(SqliteStoreError::sqlite("commit the schema"))
}

fn user_version(conn: &Connection) -> Result<i64, SqliteStoreError> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(SqliteStoreError::sqlite("read the schema version"))
}

/// `min_decrypt_version` and `shredded_at` of a tenant, or `None`.
fn tenant_row(conn: &Connection, tenant: &TenantId) -> Result<Option<TenantRow>, SqliteStoreError> {
    conn.query_row(
        "SELECT tenant, min_decrypt_version, shredded_at FROM tenants WHERE tenant = ?1",
        [tenant.as_str()],
        |row| {
            Ok(TenantRow {
                stored_id: row.get(0)?,
                min_decrypt_version: row.get(1)?,
                shredded_at: row.get(2)?,
            })
        },
    )
    .optional()
    .map_err(SqliteStoreError::sqlite("read the tenant"))
}

/// A tenant row: its id as stored, the minimum decryption version, when it was shredded.
struct TenantRow {
    stored_id: String,
    min_decrypt_version: i64,
    shredded_at: Option<String>,
}

/// Like [`tenant_row`] but an unknown tenant is an error and a shredded one is
/// [`StoreRefusal::Shredded`].
fn live_tenant(conn: &Connection, tenant: &TenantId) -> Result<(), SqliteStoreError> {
    match tenant_row(conn, tenant)? {
        None => Err(StoreRefusal::TenantNotFound {
            tenant: tenant.clone(),
        }
        .into()),
        Some(TenantRow {
            shredded_at: Some(shredded_at),
            ..
        }) => Err(StoreRefusal::Shredded {
            tenant: tenant.clone(),
            shredded_at,
        }
        .into()),
        Some(_) => Ok(()),
    }
}

fn latest_version(conn: &Connection, tenant: &TenantId) -> Result<u32, SqliteStoreError> {
    let latest: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM key_versions WHERE tenant = ?1",
            [tenant.as_str()],
            |row| row.get(0),
        )
        .map_err(SqliteStoreError::sqlite("read the latest key version"))?;
    u32::try_from(latest).map_err(|_| SqliteStoreError::Corrupt {
        detail: format!("tenant '{tenant}' has key version {latest}, outside 1..=2^32-1"),
    })
}

fn insert_record(
    conn: &Connection,
    tenant: &TenantId,
    record: &KeyRecord,
) -> Result<(), SqliteStoreError> {
    let (root_key_ref, wrapped) = match &record.wrapped {
        Some(w) => (Some(w.root_key_ref.as_str()), Some(w.ciphertext.as_slice())),
        None => (None, None),
    };
    conn.execute(
        "INSERT INTO key_versions
             (tenant, version, state, root_key_ref, wrapped, key_check, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            tenant.as_str(),
            i64::from(record.version),
            KeyState::Primary.as_str(),
            root_key_ref,
            wrapped,
            record.key_check.as_slice(),
            record.created_at.to_string(),
        ],
    )
    .map_err(SqliteStoreError::sqlite("insert the key version"))?;
    Ok(())
}

/// The raw columns of one `key_versions` row, validated by [`parse_version_row`].
struct RawVersionRow {
    version: i64,
    state: String,
    root_key_ref: Option<String>,
    wrapped: Option<Vec<u8>>,
    key_check: Vec<u8>,
    created_at: String,
}

fn parse_version_row(tenant: &TenantId, raw: RawVersionRow) -> Result<KeyRecord, SqliteStoreError> {
    let corrupt = |what: String| SqliteStoreError::Corrupt {
        detail: format!("tenant '{tenant}' key version {}: {what}", raw.version),
    };
    let version = u32::try_from(raw.version)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| corrupt("version number is outside 1..=2^32-1".to_owned()))?;
    let state = KeyState::parse(&raw.state)
        .ok_or_else(|| corrupt(format!("unknown state {:?}", truncate(&raw.state))))?;
    let key_check: [u8; 32] = raw.key_check.as_slice().try_into().map_err(|_| {
        corrupt(format!(
            "key check is {} bytes long, expected 32",
            raw.key_check.len()
        ))
    })?;
    let created_at: Timestamp = raw.created_at.parse().map_err(|_| {
        corrupt(format!(
            "created_at {:?} is not an RFC 3339 timestamp",
            truncate(&raw.created_at)
        ))
    })?;
    let wrapped = match (raw.root_key_ref, raw.wrapped) {
        (Some(root_key_ref), Some(ciphertext)) => Some(WrappedKey {
            root_key_ref,
            ciphertext,
        }),
        (None, None) => None,
        _ => {
            return Err(corrupt(
                "only one of root_key_ref and wrapped is set".to_owned(),
            ));
        }
    };
    match (state, &wrapped) {
        (KeyState::Destroyed, Some(_)) => {
            return Err(corrupt(
                "destroyed but still holds wrapped bytes".to_owned(),
            ));
        }
        (KeyState::Primary | KeyState::DecryptOnly, None) => {
            return Err(corrupt("live but has no wrapped bytes".to_owned()));
        }
        _ => {}
    }
    Ok(KeyRecord {
        version,
        state,
        wrapped,
        key_check,
        created_at,
    })
}

/// At most 64 characters of a stored string, for error messages about corrupt rows.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn load_sync(
    conn: &mut Connection,
    tenant: &TenantId,
) -> Result<Option<TenantRecord>, SqliteStoreError> {
    // One read transaction: the tenant row and its versions come from the same snapshot.
    let tx = conn
        .transaction()
        .map_err(SqliteStoreError::sqlite("begin a read transaction"))?;
    let Some(TenantRow {
        stored_id,
        min_decrypt_version: min,
        shredded_at,
    }) = tenant_row(&tx, tenant)?
    else {
        return Ok(None);
    };
    // The id as stored, not as asked for: the keyring refuses a record filed under another id.
    let stored_id = TenantId::new(&stored_id).map_err(|_| SqliteStoreError::Corrupt {
        detail: format!("tenant '{tenant}' is stored under an invalid id"),
    })?;
    let min_decrypt_version =
        u32::try_from(min)
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| SqliteStoreError::Corrupt {
                detail: format!("tenant '{tenant}' has minimum decryption version {min}"),
            })?;
    let shredded_at = match shredded_at {
        None => None,
        Some(s) => Some(
            s.parse::<Timestamp>()
                .map_err(|_| SqliteStoreError::Corrupt {
                    detail: format!(
                        "tenant '{tenant}' shredded_at {:?} is not an RFC 3339 timestamp",
                        truncate(&s)
                    ),
                })?,
        ),
    };
    let raw_rows = {
        let mut stmt = tx
            .prepare(
                "SELECT version, state, root_key_ref, wrapped, key_check, created_at
                 FROM key_versions WHERE tenant = ?1 ORDER BY version ASC",
            )
            .map_err(SqliteStoreError::sqlite("read the key versions"))?;
        let rows = stmt
            .query_map([tenant.as_str()], |row| {
                Ok(RawVersionRow {
                    version: row.get(0)?,
                    state: row.get(1)?,
                    root_key_ref: row.get(2)?,
                    wrapped: row.get(3)?,
                    key_check: row.get(4)?,
                    created_at: row.get(5)?,
                })
            })
            .map_err(SqliteStoreError::sqlite("read the key versions"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(SqliteStoreError::sqlite("read the key versions"))?
    };
    tx.finish()
        .map_err(SqliteStoreError::sqlite("end the read transaction"))?;
    let versions = raw_rows
        .into_iter()
        .map(|raw| parse_version_row(tenant, raw))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(TenantRecord {
        tenant: stored_id,
        versions,
        min_decrypt_version,
        shredded_at,
    }))
}

fn create_sync(
    conn: &mut Connection,
    tenant: &TenantId,
    first: &KeyRecord,
) -> Result<(), SqliteStoreError> {
    StoreRefusal::check_first_version(tenant, first)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(SqliteStoreError::sqlite("begin a write transaction"))?;
    if tenant_row(&tx, tenant)?.is_some() {
        return Err(StoreRefusal::TenantExists {
            tenant: tenant.clone(),
        }
        .into());
    }
    tx.execute(
        "INSERT INTO tenants (tenant, min_decrypt_version, shredded_at, created_at)
         VALUES (?1, 1, NULL, ?2)",
        params![tenant.as_str(), first.created_at.to_string()],
    )
    .map_err(SqliteStoreError::sqlite("insert the tenant"))?;
    insert_record(&tx, tenant, first)?;
    tx.commit()
        .map_err(SqliteStoreError::sqlite("commit the new tenant"))
}

fn insert_version_sync(
    conn: &mut Connection,
    tenant: &TenantId,
    expected_latest: u32,
    next: &KeyRecord,
) -> Result<(), SqliteStoreError> {
    StoreRefusal::check_new_version(tenant, next)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(SqliteStoreError::sqlite("begin a write transaction"))?;
    live_tenant(&tx, tenant)?;
    let actual_latest = latest_version(&tx, tenant)?;
    StoreRefusal::check_rotation(tenant, expected_latest, actual_latest, next.version)?;
    tx.execute(
        "UPDATE key_versions SET state = 'decrypt_only' WHERE tenant = ?1 AND state = 'primary'",
        [tenant.as_str()],
    )
    .map_err(SqliteStoreError::sqlite(
        "demote the old primary key version",
    ))?;
    insert_record(&tx, tenant, next)?;
    tx.commit()
        .map_err(SqliteStoreError::sqlite("commit the new key version"))
}

fn set_min_sync(
    conn: &mut Connection,
    tenant: &TenantId,
    expected_min: u32,
    min: u32,
) -> Result<(), SqliteStoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(SqliteStoreError::sqlite("begin a write transaction"))?;
    live_tenant(&tx, tenant)?;
    let latest = latest_version(&tx, tenant)?;
    StoreRefusal::check_min_decrypt_version(tenant, min, latest)?;
    let updated = tx
        .execute(
            "UPDATE tenants SET min_decrypt_version = ?2
             WHERE tenant = ?1 AND min_decrypt_version = ?3",
            params![tenant.as_str(), i64::from(min), i64::from(expected_min)],
        )
        .map_err(SqliteStoreError::sqlite(
            "update the minimum decryption version",
        ))?;
    if updated != 1 {
        return Err(StoreRefusal::MinVersionChanged {
            tenant: tenant.clone(),
            expected: expected_min,
        }
        .into());
    }
    tx.commit().map_err(SqliteStoreError::sqlite(
        "commit the minimum decryption version",
    ))
}

fn shred_sync(
    conn: &mut Connection,
    path: &Path,
    tenant: &TenantId,
    at: Timestamp,
) -> Result<(), SqliteStoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(SqliteStoreError::sqlite("begin a write transaction"))?;
    if tenant_row(&tx, tenant)?.is_none() {
        return Err(StoreRefusal::TenantNotFound {
            tenant: tenant.clone(),
        }
        .into());
    }
    tx.execute(
        "UPDATE key_versions SET state = 'destroyed', wrapped = NULL, root_key_ref = NULL
         WHERE tenant = ?1",
        [tenant.as_str()],
    )
    .map_err(SqliteStoreError::sqlite("destroy the key versions"))?;
    // Shredding again is allowed (to finish an interrupted checkpoint) and keeps the first time.
    tx.execute(
        "UPDATE tenants SET shredded_at = COALESCE(shredded_at, ?2) WHERE tenant = ?1",
        params![tenant.as_str(), at.to_string()],
    )
    .map_err(SqliteStoreError::sqlite("mark the tenant shredded"))?;
    tx.commit()
        .map_err(SqliteStoreError::sqlite("commit the shred"))?;

    // Move the zeroed pages into the main file and truncate the WAL so that no old page with
    // the wrapped keys remains in it. Readers on an older snapshot block a full checkpoint.
    conn.busy_timeout(CHECKPOINT_BUSY_TIMEOUT)
        .map_err(SqliteStoreError::sqlite("set the busy timeout"))?;
    let checkpointed = checkpoint_truncate(conn);
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(SqliteStoreError::sqlite("set the busy timeout"))?;
    if checkpointed? {
        return Ok(());
    }
    Err(SqliteStoreError::CheckpointIncomplete {
        tenant: tenant.clone(),
        path: path.to_owned(),
    })
}

/// Tries a truncating WAL checkpoint [`CHECKPOINT_ATTEMPTS`] times; whether one completed.
fn checkpoint_truncate(conn: &Connection) -> Result<bool, SqliteStoreError> {
    for attempt in 0..CHECKPOINT_ATTEMPTS {
        let (busy, _log, _checkpointed): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(SqliteStoreError::sqlite("checkpoint the write-ahead log"))?;
        if busy == 0 {
            return Ok(true);
        }
        if attempt + 1 < CHECKPOINT_ATTEMPTS {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(false)
}

fn list_sync(conn: &mut Connection) -> Result<Vec<TenantId>, SqliteStoreError> {
    let mut stmt = conn
        .prepare("SELECT tenant FROM tenants ORDER BY tenant")
        .map_err(SqliteStoreError::sqlite("list the tenants"))?;
    let names = stmt
        .query_map([], |row| row.get::<_, String>(0))
        .map_err(SqliteStoreError::sqlite("list the tenants"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(SqliteStoreError::sqlite("list the tenants"))?;
    let mut tenants = names
        .into_iter()
        .map(|name| {
            TenantId::new(&name).map_err(|_| SqliteStoreError::Corrupt {
                detail: format!(
                    "stored tenant id {:?} is not a valid tenant id",
                    truncate(&name)
                ),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    tenants.sort();
    Ok(tenants)
}

fn replace_wrapped_sync(
    conn: &mut Connection,
    tenant: &TenantId,
    version: u32,
    expected: &WrappedKey,
    replacement: &WrappedKey,
) -> Result<(), SqliteStoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(SqliteStoreError::sqlite("begin a write transaction"))?;
    let changed = tx
        .execute(
            "UPDATE key_versions SET root_key_ref = ?5, wrapped = ?6
             WHERE tenant = ?1 AND version = ?2 AND state <> 'destroyed'
               AND root_key_ref = ?3 AND wrapped = ?4",
            params![
                tenant.as_str(),
                i64::from(version),
                expected.root_key_ref,
                expected.ciphertext,
                replacement.root_key_ref,
                replacement.ciphertext,
            ],
        )
        .map_err(SqliteStoreError::sqlite("replace the wrapped key"))?;
    if changed != 1 {
        let exists: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM key_versions WHERE tenant = ?1 AND version = ?2)",
                params![tenant.as_str(), i64::from(version)],
                |row| row.get(0),
            )
            .map_err(SqliteStoreError::sqlite("read the key version"))?;
        if exists {
            return Err(StoreRefusal::WrappedChanged {
                tenant: tenant.clone(),
                version,
            }
            .into());
        }
        if tenant_row(&tx, tenant)?.is_none() {
            return Err(StoreRefusal::TenantNotFound {
                tenant: tenant.clone(),
            }
            .into());
        }
        return Err(StoreRefusal::VersionNotFound {
            tenant: tenant.clone(),
            version,
        }
        .into());
    }
    tx.commit()
        .map_err(SqliteStoreError::sqlite("commit the replaced wrapped key"))
}

#[async_trait]
impl KeyStore for SqliteKeyStore {
    fn name(&self) -> &str {
        "sqlite"
    }

    async fn create_tenant(&self, tenant: &TenantId, first: KeyRecord) -> Result<(), BackendError> {
        let tenant = tenant.clone();
        Ok(self
            .run(move |conn, _| create_sync(conn, &tenant, &first))
            .await?)
    }

    async fn load_tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, BackendError> {
        let tenant = tenant.clone();
        Ok(self.run(move |conn, _| load_sync(conn, &tenant)).await?)
    }

    async fn insert_version(
        &self,
        tenant: &TenantId,
        expected_latest: u32,
        next: KeyRecord,
    ) -> Result<(), BackendError> {
        let tenant = tenant.clone();
        Ok(self
            .run(move |conn, _| insert_version_sync(conn, &tenant, expected_latest, &next))
            .await?)
    }

    async fn set_min_decrypt_version(
        &self,
        tenant: &TenantId,
        expected_min: u32,
        min: u32,
    ) -> Result<(), BackendError> {
        let tenant = tenant.clone();
        Ok(self
            .run(move |conn, _| set_min_sync(conn, &tenant, expected_min, min))
            .await?)
    }

    async fn shred_tenant(&self, tenant: &TenantId, at: Timestamp) -> Result<(), BackendError> {
        let tenant = tenant.clone();
        Ok(self
            .run(move |conn, path| shred_sync(conn, path, &tenant, at))
            .await?)
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, BackendError> {
        Ok(self.run(|conn, _| list_sync(conn)).await?)
    }

    async fn replace_wrapped(
        &self,
        tenant: &TenantId,
        version: u32,
        expected: &WrappedKey,
        replacement: WrappedKey,
    ) -> Result<(), BackendError> {
        let tenant = tenant.clone();
        let expected = expected.clone();
        Ok(self
            .run(move |conn, _| {
                replace_wrapped_sync(conn, &tenant, version, &expected, &replacement)
            })
            .await?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn sqlite_codes_map_to_kinds() {
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_BUSY_SNAPSHOT (extended)
        for code in [5, 6, 5 | (2 << 8)] {
            assert_eq!(sqlite_kind(&failure(code)), BackendErrorKind::Unavailable);
        }
        // SQLITE_CONSTRAINT_PRIMARYKEY (extended)
        assert_eq!(
            sqlite_kind(&failure(19 | (6 << 8))),
            BackendErrorKind::Conflict
        );
        // SQLITE_NOTADB
        assert_eq!(sqlite_kind(&failure(26)), BackendErrorKind::Misconfigured);
        assert_eq!(sqlite_kind(&failure(1)), BackendErrorKind::Other);
    }

    #[test]
    fn conversion_keeps_the_source_and_does_not_repeat_it() {
        let err = SqliteStoreError::Sqlite {
            action: "do a thing",
            source: failure(5),
        };
        let backend: BackendError = err.into();
        assert_eq!(backend.kind(), BackendErrorKind::Unavailable);
        assert!(std::error::Error::source(&backend).is_some());
        let text = backend.to_string();
        assert!(
            text.starts_with("sqlite key store: could not do a thing: "),
            "{text}"
        );
    }
}
