//! The daemon's one error type: why it could not start or had to stop. Request failures are
//! gRPC statuses (see `status.rs`), not this.

use std::path::PathBuf;

/// Why the daemon could not start (or stopped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration is invalid; the message names the key and the problem.
    #[error("configuration: {0}")]
    Config(String),
    /// The socket path or its directory is unsafe or unusable.
    #[error("socket {path}: {reason}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The embedded backends could not be opened.
    #[error(transparent)]
    Embedded(#[from] phiseal_embedded::EmbeddedError),
    /// The KMS backend could not be reached or refused its key.
    #[error("KMS ({kind}): {source}")]
    Kms {
        /// The configured `kms.kind`.
        kind: &'static str,
        /// What the backend reported.
        #[source]
        source: phiseal::BackendError,
    },
    /// The PostgreSQL key store could not be opened or migrated.
    #[error(transparent)]
    Postgres(#[from] phiseal_store_postgres::PostgresStoreError),
    /// The keyring refused the assembled parts.
    #[error(transparent)]
    Keyring(#[from] phiseal::Error),
    /// The metrics listener could not start.
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Hardening the process failed (core dumps could not be disabled).
    #[error("process hardening: {0}")]
    Hardening(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    /// Something was done (`done`) but its audit record could not be written: say so, or a
    /// retry would repeat it.
    #[error(
        "{done}, but its audit record could not be written to {} ({source}): record it by hand; \
         do not do it again",
        log.display()
    )]
    NotAudited {
        /// What was done.
        done: String,
        /// The audit log that refused the record.
        log: PathBuf,
        /// Why.
        #[source]
        source: phiseal::BackendError,
    },
    /// Another I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
