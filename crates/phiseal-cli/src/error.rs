//! The crate's one error type and the process exit codes.

use std::path::PathBuf;

use phiseal_audit_file::AuditFileError;

/// Process exit codes (the table is in the crate documentation and in `--help`).
pub(crate) mod exit {
    /// Other failure: invalid argument, decryption failed, internal error, I/O error.
    pub(crate) const FAILURE: u8 = 1;
    /// Usage error (clap exits with this code itself).
    pub(crate) const USAGE: u8 = 2;
    /// `PERMISSION_DENIED`, `UNAUTHENTICATED`.
    pub(crate) const DENIED: u8 = 3;
    /// `NOT_FOUND`.
    pub(crate) const NOT_FOUND: u8 = 4;
    /// `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, socket unreachable.
    pub(crate) const UNAVAILABLE: u8 = 5;
    /// `FAILED_PRECONDITION`: key destroyed (shredded) or retired.
    pub(crate) const KEY_GONE: u8 = 6;
    /// `rewrap` or `root rotate` / `root migrate` finished with failed items.
    pub(crate) const REWRAP_FAILED: u8 = 7;
    /// The audit log has problems.
    pub(crate) const AUDIT_PROBLEMS: u8 = 8;
}

/// Everything a command can fail with. Each variant knows its exit code; no message contains
/// plaintext, ciphertext or token bytes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The daemon answered with an error status.
    #[error("{what}: {message} ({kind})")]
    Status {
        /// What was being done.
        what: String,
        /// The gRPC status code (decides the exit code).
        code: tonic::Code,
        /// The stable error kind (`phiseal-error-kind`), or the code's name.
        kind: String,
        /// The daemon's message, control characters replaced.
        message: String,
    },
    /// The daemon's socket could not be reached.
    #[error(
        "cannot connect to phiseald at {}: {detail}; check that the daemon runs and that \
         --socket (or PHISEAL_SOCKET) names its socket",
        socket.display()
    )]
    Connect {
        /// The socket path tried.
        socket: PathBuf,
        /// Why it failed.
        detail: String,
    },
    /// The socket exists but this user may not connect to it (file permissions).
    #[error(
        "cannot connect to phiseald at {}: {detail}; this user may not use the socket (mode \
         0660: only the daemon's user and its socket_group may connect): run as a member of \
         that group",
        socket.display()
    )]
    ConnectDenied {
        /// The socket path tried.
        socket: PathBuf,
        /// Why it failed.
        detail: String,
    },
    /// The command line is syntactically fine but cannot be carried out as given.
    #[error("{0}")]
    Usage(String),
    /// An invalid argument or input, or another failure without a better class.
    #[error("{0}")]
    Failed(String),
    /// A local I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// `rewrap` processed every line but some items failed (each was reported on stderr).
    #[error("rewrap: {failed} of {lines} lines failed and were written unchanged")]
    RewrapFailed {
        /// Lines that failed (in earlier runs of a resumed output included).
        failed: u64,
        /// Lines in the output (those of earlier runs of a resumed output included).
        lines: u64,
    },
    /// `root rotate` / `root migrate` went through every version but some failed.
    #[error(
        "root key: {failed} key versions failed and keep their old wrapping (each was reported \
         above); fix the cause and run again"
    )]
    RootFailed {
        /// Versions that failed.
        failed: usize,
    },
    /// The daemon config's backends could not be opened.
    #[error("{0}")]
    Backends(#[from] phiseald::DaemonError),
    /// A keyring operation failed as a whole.
    #[error("{0}")]
    Keyring(#[from] phiseal::Error),
    /// The audit log is not intact.
    #[error("audit log {}: {detail}", path.display())]
    AuditProblems {
        /// The log file.
        path: PathBuf,
        /// A one-line summary.
        detail: String,
    },
    /// Reading the audit log failed (a broken chain during export included).
    #[error(transparent)]
    Audit(#[from] AuditFileError),
}

impl CliError {
    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Status { code, .. } => crate::client::exit_code_for(*code),
            CliError::Connect { .. } => exit::UNAVAILABLE,
            CliError::ConnectDenied { .. } => exit::DENIED,
            CliError::Usage(_) => exit::USAGE,
            CliError::Failed(_) | CliError::Io { .. } => exit::FAILURE,
            CliError::RewrapFailed { .. } | CliError::RootFailed { .. } => exit::REWRAP_FAILED,
            // The same exit code as the daemon's status for this error would give (an
            // unavailable KMS or key store is 5, a missing tenant 4, …).
            CliError::Keyring(e) => crate::client::exit_code_for(phiseald::status::code_of(e)),
            // An unreachable KMS or key store is "unavailable", as the daemon's status for the
            // same failure would be; a misconfiguration or anything else is a failure.
            CliError::Backends(e) => match e {
                phiseald::DaemonError::Keyring(e) => {
                    crate::client::exit_code_for(phiseald::status::code_of(e))
                }
                phiseald::DaemonError::Kms { source, .. }
                    if source.kind() == phiseal::BackendErrorKind::Unavailable =>
                {
                    exit::UNAVAILABLE
                }
                phiseald::DaemonError::Postgres(e)
                    if e.kind() == phiseal::BackendErrorKind::Unavailable =>
                {
                    exit::UNAVAILABLE
                }
                _ => exit::FAILURE,
            },
            CliError::AuditProblems { .. } => exit::AUDIT_PROBLEMS,
            CliError::Audit(AuditFileError::ChainBroken { .. }) => exit::AUDIT_PROBLEMS,
            CliError::Audit(_) => exit::FAILURE,
        }
    }

    /// A stable name for the class of this error: the daemon's kind for a refused call, the
    /// library's kind for an offline command, else the variant.
    pub(crate) fn kind(&self) -> &str {
        match self {
            CliError::Status { kind, .. } => kind,
            CliError::Keyring(e) => e.kind(),
            CliError::Connect { .. } => "unavailable",
            CliError::ConnectDenied { .. } => "permission_denied",
            CliError::Usage(_) => "usage",
            CliError::Failed(_) => "failed",
            CliError::Io { .. } => "io",
            CliError::RewrapFailed { .. } | CliError::RootFailed { .. } => "partly_failed",
            // Done (a root key created) but not recorded: the daemon's kind for the same.
            CliError::Backends(phiseald::DaemonError::NotAudited { .. }) => "audit_after_commit",
            CliError::Backends(_) => "backends",
            CliError::AuditProblems { .. } | CliError::Audit(_) => "audit_log",
        }
    }

    /// The error as one JSON object for `--json`:
    /// `{"error": {"kind": …, "message": …, "exit_code": N}}`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "kind": self.kind(),
                "message": self.to_string(),
                "exit_code": self.exit_code(),
            }
        })
    }

    /// An [`CliError::Io`] error with a description of what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phiseal::{BackendError, BackendErrorKind, TenantId};

    #[test]
    fn library_errors_exit_like_the_daemons_statuses_for_them() {
        let backend = |kind| BackendError::new(kind, "test");
        let tenant = || TenantId::new("t").unwrap_or_else(|_| unreachable!());
        let cases = [
            (
                phiseal::Error::Kms {
                    backend: "aws-kms".into(),
                    source: backend(BackendErrorKind::Unavailable),
                },
                exit::UNAVAILABLE,
            ),
            (
                phiseal::Error::Store {
                    backend: "postgres".into(),
                    source: backend(BackendErrorKind::Unavailable),
                },
                exit::UNAVAILABLE,
            ),
            (
                phiseal::Error::TenantNotFound { tenant: tenant() },
                exit::NOT_FOUND,
            ),
            (
                phiseal::Error::KeyDestroyed { tenant: tenant() },
                exit::KEY_GONE,
            ),
            (phiseal::Error::DecryptionFailed, exit::FAILURE),
        ];
        for (error, want) in cases {
            let shown = error.to_string();
            assert_eq!(CliError::Keyring(error).exit_code(), want, "{shown}");
        }
        // The same when opening the backends of an offline `root` command fails.
        let kms = |kind| {
            CliError::Backends(phiseald::DaemonError::Kms {
                kind: "aws",
                source: backend(kind),
            })
        };
        assert_eq!(
            kms(BackendErrorKind::Unavailable).exit_code(),
            exit::UNAVAILABLE
        );
        assert_eq!(
            kms(BackendErrorKind::Misconfigured).exit_code(),
            exit::FAILURE
        );
        let store = CliError::Backends(phiseald::DaemonError::Keyring(phiseal::Error::Store {
            backend: "postgres".into(),
            source: backend(BackendErrorKind::Unavailable),
        }));
        assert_eq!(store.exit_code(), exit::UNAVAILABLE);
    }
}
