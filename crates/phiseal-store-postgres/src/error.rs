//! [`PostgresStoreError`], the one error type of this crate, and the sanitized
//! [`DatabaseError`] it carries for driver and server failures.

use std::fmt;
use std::time::Duration;

use phiseal::context::TenantId;
use phiseal::store::StoreRefusal;
use phiseal::{BackendError, BackendErrorKind};

use crate::schema::SCHEMA_VERSION;

/// Everything the PostgreSQL key store can fail with. Messages name the database as
/// `user@host:port/dbname`, the tenant and the version, and say what to do; they never contain
/// the password, wrapped key bytes or row contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresStoreError {
    /// The configuration is unusable.
    #[error("postgres key store: invalid configuration: {reason}")]
    Config {
        /// What is wrong (never quotes the connection string).
        reason: String,
    },
    /// The TLS client could not be set up (CA file, trust store).
    #[error("postgres key store: TLS set-up failed: {reason}")]
    Tls {
        /// What is wrong.
        reason: String,
    },
    /// The database could not be reached, or reported an error.
    #[error("postgres key store at {target}: could not {action}{}", .source.kind_hint())]
    Database {
        /// What was being done.
        action: &'static str,
        /// `user@host:port/dbname`.
        target: String,
        /// The sanitized cause.
        #[source]
        source: DatabaseError,
    },
    /// The database holds a schema newer than this build knows.
    #[error(
        "postgres key store at {target}: the schema is at version {found}, newer than this \
         build supports ({SCHEMA_VERSION}): a newer phiseal migrated this database; upgrade \
         phiseal (never downgrade a shared key store)"
    )]
    SchemaTooNew {
        /// `user@host:port/dbname`.
        target: String,
        /// The highest version in `schema_migrations`.
        found: u32,
    },
    /// The database's schema is older than this build needs and was not migrated (see
    /// [`crate::PostgresKeyStore::connect`]).
    #[error(
        "postgres key store at {target}: the schema is at version {found}, this build needs \
         {SCHEMA_VERSION}: run the schema migration (open the store with migrations, or the \
         migrate command)"
    )]
    SchemaOutdated {
        /// `user@host:port/dbname`.
        target: String,
        /// The highest version in `schema_migrations` (0: none).
        found: u32,
    },
    /// The store's schema is not safe to use as it is (see
    /// [`crate::PostgresStoreConfig::schema`]).
    #[error("postgres key store at {target}: schema \"{schema}\": {problem}")]
    UnsafeSchema {
        /// `user@host:port/dbname`.
        target: String,
        /// The configured schema.
        schema: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The call would break a key-store invariant (see [`StoreRefusal`]).
    #[error(transparent)]
    Refused(#[from] StoreRefusal),
    /// A stored row is not valid. The record is refused, never used.
    #[error(
        "postgres key store is corrupt: {detail}; refusing it: restore the key store from \
         backup and investigate"
    )]
    Corrupt {
        /// What is wrong, naming the tenant and version (never key bytes).
        detail: String,
    },
    /// The shred committed, but the `VACUUM` that removes the old row versions did not run.
    #[error(
        "tenant '{tenant}' is shredded (its key versions are destroyed and no query returns \
         its wrapped keys any more), but VACUUM of key_versions did not complete: {reason}; \
         until it does, old row versions holding the wrapped keys stay in the table's files \
         (autovacuum removes them eventually); fix this and run the shred again (it is \
         idempotent)"
    )]
    VacuumIncomplete {
        /// The tenant.
        tenant: TenantId,
        /// Why.
        reason: String,
        /// The class of the underlying failure.
        kind: BackendErrorKind,
    },
}

impl PostgresStoreError {
    /// The [`BackendErrorKind`] this error maps to at the trait boundary.
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            PostgresStoreError::Config { .. }
            | PostgresStoreError::Tls { .. }
            | PostgresStoreError::SchemaTooNew { .. }
            | PostgresStoreError::SchemaOutdated { .. }
            | PostgresStoreError::UnsafeSchema { .. } => BackendErrorKind::Misconfigured,
            PostgresStoreError::Database { source, .. } => source.kind(),
            PostgresStoreError::Refused(refusal) => refusal.kind(),
            PostgresStoreError::Corrupt { .. } => BackendErrorKind::InvalidData,
            PostgresStoreError::VacuumIncomplete { kind, .. } => *kind,
        }
    }
}

impl From<PostgresStoreError> for BackendError {
    fn from(err: PostgresStoreError) -> Self {
        let kind = err.kind();
        let message = err.to_string();
        // The message describes the failure; the cause is kept as the source (not `err`
        // itself, whose text would then appear twice in `Display`).
        match err {
            PostgresStoreError::Database { source, .. } => {
                BackendError::new(kind, message).with_source(source)
            }
            _ => BackendError::new(kind, message),
        }
    }
}

/// A driver, pool or server failure, reduced to its class, SQLSTATE and a message that is safe
/// to log.
///
/// The driver's own errors are not kept: a server error's `DETAIL` can quote a whole row
/// (wrapped key bytes included), so only the primary message of a server error is kept.
#[derive(Debug, Clone)]
pub struct DatabaseError {
    kind: BackendErrorKind,
    code: Option<String>,
    message: String,
}

impl DatabaseError {
    /// The class of failure.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// The SQLSTATE code, for errors the server reported.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// A timeout of the store's own (waiting for a connection, or a whole operation).
    pub(crate) fn timeout(what: &str, after: Duration) -> Self {
        Self {
            kind: BackendErrorKind::Unavailable,
            code: None,
            message: format!("timed out after {after:?} {what}"),
        }
    }

    /// An outage the driver did not report as an error (e.g. a connection that just ended).
    pub(crate) fn unavailable(message: &str) -> Self {
        Self {
            kind: BackendErrorKind::Unavailable,
            code: None,
            message: message.to_owned(),
        }
    }

    pub(crate) fn from_pool(err: deadpool_postgres::PoolError, connect_timeout: Duration) -> Self {
        use deadpool_postgres::PoolError;
        use deadpool_postgres::TimeoutType;
        match err {
            PoolError::Backend(e) => Self::from_driver(&e),
            PoolError::Timeout(TimeoutType::Wait) => Self::timeout(
                "waiting for a free connection (all connections of the pool are busy)",
                crate::OPERATION_TIMEOUT,
            ),
            PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
                Self::timeout("connecting to the database", connect_timeout)
            }
            PoolError::Closed => Self {
                kind: BackendErrorKind::Unavailable,
                code: None,
                message: "the connection pool is closed".to_owned(),
            },
            PoolError::NoRuntimeSpecified => Self {
                kind: BackendErrorKind::Misconfigured,
                code: None,
                message: "the connection pool has no async runtime".to_owned(),
            },
            PoolError::PostCreateHook(deadpool_postgres::HookError::Backend(e)) => {
                Self::from_driver(&e)
            }
            PoolError::PostCreateHook(deadpool_postgres::HookError::Message(m)) => Self {
                kind: BackendErrorKind::Unavailable,
                code: None,
                message: format!("setting up a new connection failed: {m}"),
            },
        }
    }

    /// Classifies a driver error and keeps only text that is safe to log.
    pub(crate) fn from_driver(err: &tokio_postgres::Error) -> Self {
        if let Some(db) = err.as_db_error() {
            let code = db.code().code().to_owned();
            return Self {
                kind: sqlstate_kind(&code),
                message: format!("{} {code}: {}", db.severity(), db.message()),
                code: Some(code),
            };
        }
        // The driver's text, then its causes (I/O, TLS): none of them carries row data.
        let mut message = err.to_string();
        // An authentication that failed on the server's side — a SCRAM exchange whose nonce
        // or signature is wrong (a server without the password, or an impostor that tries
        // SCRAM), an unsupported method — is reported through an I/O error, which would read
        // as an outage: it is a refusal, and no cached answer may bridge it. (An impostor
        // that skips SCRAM is stopped only by TLS: docs/DEPLOYMENT.md.)
        let mut kind = (message == "authentication error").then_some(BackendErrorKind::Denied);
        let mut cause = std::error::Error::source(err);
        while let Some(e) = cause {
            message.push_str(": ");
            message.push_str(&e.to_string());
            if kind.is_none() {
                kind = cause_kind(e);
            }
            cause = e.source();
        }
        let kind = kind.unwrap_or_else(|| {
            if err.is_closed() {
                return BackendErrorKind::Unavailable;
            }
            // The driver's error kinds are private; its fixed texts identify them.
            let text = err.to_string();
            match text.as_str() {
                "error connecting to server"
                | "timeout waiting for server"
                | "error communicating with the server"
                | "connection closed" => BackendErrorKind::Unavailable,
                "invalid configuration" | "invalid connection string" => {
                    BackendErrorKind::Misconfigured
                }
                "error performing TLS handshake" => BackendErrorKind::Misconfigured,
                _ => BackendErrorKind::Other,
            }
        });
        Self {
            kind,
            code: None,
            message,
        }
    }

    /// A short, kind-specific hint appended to [`PostgresStoreError::Database`] messages.
    fn kind_hint(&self) -> &'static str {
        // A connection the server opened read-only (the driver asks for a writable session),
        // or a write refused as read-only: an outage while a standby is promoted, else a
        // setting to fix.
        if self.code.as_deref() == Some("25006")
            || self.message.ends_with("database does not allow writes")
        {
            return " (the server does not allow writes: it is a standby, or \
                    default_transaction_read_only is on for this role or database; the key \
                    store needs the writable primary: point key_store.url at it, or turn that \
                    default off)";
        }
        match self.kind {
            BackendErrorKind::Unavailable => {
                " (the database is unreachable, shutting down, overloaded or not answering in \
                 time: check that it is running and reachable; the call was not retried, \
                 the next one uses a new connection)"
            }
            BackendErrorKind::Denied => {
                " (the database refused: check the role's password and privileges)"
            }
            BackendErrorKind::Misconfigured => {
                " (check the connection settings, TLS trust, the database name and the schema)"
            }
            BackendErrorKind::Conflict => " (a concurrent change won: reload and retry)",
            _ => "",
        }
    }
}

/// A TLS verification failure anywhere in the chain is a trust problem, not an outage; an
/// I/O failure is an outage.
fn cause_kind(e: &(dyn std::error::Error + 'static)) -> Option<BackendErrorKind> {
    if e.downcast_ref::<rustls::Error>().is_some() {
        return Some(BackendErrorKind::Misconfigured);
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return Some(BackendErrorKind::Misconfigured);
        }
        return Some(BackendErrorKind::Unavailable);
    }
    None
}

/// The class of a SQLSTATE (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
fn sqlstate_kind(code: &str) -> BackendErrorKind {
    match code {
        // unique_violation, serialization_failure, deadlock_detected: a concurrent writer won.
        "23505" | "40001" | "40P01" => BackendErrorKind::Conflict,
        // query_canceled (statement_timeout), lock_not_available (lock_timeout),
        // admin_shutdown, crash_shutdown, cannot_connect_now, idle-in-transaction timeout,
        // read_only_sql_transaction (a standby after a fail-over).
        "57014" | "55P03" | "57P01" | "57P02" | "57P03" | "57P05" | "25P03" | "25006" => {
            BackendErrorKind::Unavailable
        }
        // check, not-null and foreign-key violations; data exceptions; corrupted data.
        "23514" | "23502" | "23503" | "XX001" | "XX002" => BackendErrorKind::InvalidData,
        // insufficient_privilege.
        "42501" => BackendErrorKind::Denied,
        // undefined / duplicate table, column, schema, database.
        "42P01" | "42703" | "42P07" | "3F000" | "3D000" | "42883" => {
            BackendErrorKind::Misconfigured
        }
        _ => match code.get(..2) {
            // connection exception, insufficient resources, system error, operator intervention.
            Some("08" | "53" | "58" | "57") => BackendErrorKind::Unavailable,
            // invalid authorization specification (bad password, no pg_hba entry).
            Some("28") => BackendErrorKind::Denied,
            Some("22") => BackendErrorKind::InvalidData,
            _ => BackendErrorKind::Other,
        },
    }
}

impl fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DatabaseError {}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;

    #[test]
    fn sqlstates_map_to_kinds() {
        for (code, kind) in [
            ("23505", BackendErrorKind::Conflict),
            ("40001", BackendErrorKind::Conflict),
            ("40P01", BackendErrorKind::Conflict),
            ("57P01", BackendErrorKind::Unavailable),
            ("57014", BackendErrorKind::Unavailable),
            ("55P03", BackendErrorKind::Unavailable),
            ("08006", BackendErrorKind::Unavailable),
            ("53300", BackendErrorKind::Unavailable),
            ("25006", BackendErrorKind::Unavailable),
            ("28P01", BackendErrorKind::Denied),
            ("42501", BackendErrorKind::Denied),
            ("3D000", BackendErrorKind::Misconfigured),
            ("42P01", BackendErrorKind::Misconfigured),
            ("23514", BackendErrorKind::InvalidData),
            ("22003", BackendErrorKind::InvalidData),
            ("XX000", BackendErrorKind::Other),
            ("", BackendErrorKind::Other),
        ] {
            assert_eq!(sqlstate_kind(code), kind, "{code}");
        }
    }

    #[test]
    fn conversion_keeps_the_source_and_does_not_repeat_it() {
        let err = PostgresStoreError::Database {
            action: "do a thing",
            target: "app@db:5432/keys".to_owned(),
            source: DatabaseError::timeout("connecting", Duration::from_secs(5)),
        };
        let backend: BackendError = err.into();
        assert_eq!(backend.kind(), BackendErrorKind::Unavailable);
        assert!(std::error::Error::source(&backend).is_some());
        let text = backend.to_string();
        assert!(
            text.starts_with("postgres key store at app@db:5432/keys: could not do a thing ("),
            "{text}"
        );
        assert_eq!(
            text.matches("timed out after 5s connecting").count(),
            1,
            "{text}"
        );
    }
}
