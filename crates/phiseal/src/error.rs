//! The one error type of the core crate, and [`BackendError`], what KMS backends, key stores and
//! audit sinks report across their trait boundary.
//!
//! Messages name the tenant and key version and say what to do. They never contain plaintext,
//! key bytes or ciphertext bytes. Every authentication failure is the single opaque
//! [`Error::DecryptionFailed`]: wrong context, wrong key and tampered bytes look the same.

use std::fmt;

use crate::context::TenantId;

/// A boxed error from a backend, kept as `source()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything the core library can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller-supplied value is malformed (tenant id, field name, record id, version …).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which input.
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The keyring builder was given an inconsistent combination of parts or settings.
    #[error("invalid keyring configuration: {0}")]
    Config(String),
    /// The ciphertext is not a phiseal v1 ciphertext (see [`FormatError`]).
    #[error("malformed ciphertext: {0}")]
    Format(#[from] FormatError),
    /// A stream's header declares segments larger than the decrypting side accepts
    /// ([`crate::AuditedStreamDecryptor::with_max_segment_size`]). Refused before its key is
    /// looked up or any segment buffer allocated.
    #[error(
        "stream segments of {segment_size} bytes are larger than this service accepts \
         ({max} bytes): its limit must be raised to at least {segment_size} to decrypt this \
         stream (streams encrypted with the default segment size, 65536, need no change)"
    )]
    SegmentTooLarge {
        /// The segment size the stream's header declares.
        segment_size: u32,
        /// The largest segment size accepted.
        max: u32,
    },
    /// Authentication failed: wrong key, wrong context (tenant, field, record) or tampered bytes.
    /// Deliberately carries no detail.
    #[error(
        "decryption failed: the ciphertext is not authentic under this tenant, field and record"
    )]
    DecryptionFailed,
    /// The tenant has no keys in the key store.
    #[error("tenant '{tenant}' not found: create it first")]
    TenantNotFound {
        /// The tenant.
        tenant: TenantId,
    },
    /// `create_tenant` for a tenant that already exists (or existed and was shredded).
    #[error("tenant '{tenant}' already exists")]
    TenantExists {
        /// The tenant.
        tenant: TenantId,
    },
    /// The ciphertext names a key version the tenant does not have.
    #[error("tenant '{tenant}' has no key version {version}")]
    KeyVersionNotFound {
        /// The tenant.
        tenant: TenantId,
        /// The version named by the ciphertext.
        version: u32,
    },
    /// The key version is below the tenant's minimum decryption version.
    #[error(
        "key version {version} of tenant '{tenant}' is retired (minimum decryption version is {min}): \
         rewrap data before raising the minimum, or lower it again"
    )]
    KeyVersionRetired {
        /// The tenant.
        tenant: TenantId,
        /// The version named by the ciphertext.
        version: u32,
        /// The tenant's minimum decryption version.
        min: u32,
    },
    /// The tenant was shredded: its keys are destroyed and its data is unrecoverable, forever.
    #[error("key destroyed: tenant '{tenant}' was shredded; its data cannot be decrypted")]
    KeyDestroyed {
        /// The tenant.
        tenant: TenantId,
    },
    /// A stored key record does not belong to the tenant/version it is filed under (a wrapped
    /// key copied between records), or was wrapped by another root key. The key is refused,
    /// never used.
    #[error(
        "key record for tenant '{tenant}' version {version} does not verify under its binding \
         (copied from another tenant or version, or wrapped by another root key): refusing it; \
         restore the key store from backup and investigate"
    )]
    KeyBindingMismatch {
        /// The tenant the record is filed under.
        tenant: TenantId,
        /// The version the record is filed under.
        version: u32,
    },
    /// Another process created this key version first (compare-and-set lost).
    #[error(
        "tenant '{tenant}' was rotated concurrently: version {version} already exists; \
         re-read the key status before rotating again"
    )]
    RotationConflict {
        /// The tenant.
        tenant: TenantId,
        /// The version both tried to create.
        version: u32,
    },
    /// An admin change lost its compare-and-set: someone else changed the same setting
    /// between this call's read and its write (the other change stands).
    #[error(
        "the {what} of tenant '{tenant}' changed concurrently (another operator or daemon): \
         nothing was changed; re-read the key status and decide again"
    )]
    ConcurrentChange {
        /// The tenant.
        tenant: TenantId,
        /// What changed (`minimum decryption version`).
        what: &'static str,
    },
    /// The KMS backend failed.
    #[error("KMS '{backend}' failed: {source}")]
    Kms {
        /// The backend's name.
        backend: String,
        /// What it reported.
        #[source]
        source: BackendError,
    },
    /// The key store failed.
    #[error("key store '{backend}' failed: {source}")]
    Store {
        /// The store's name.
        backend: String,
        /// What it reported.
        #[source]
        source: BackendError,
    },
    /// The audit record could not be written, so the operation was not performed (fail closed).
    #[error("audit log '{backend}' failed, operation refused: {source}")]
    Audit {
        /// The sink's name.
        backend: String,
        /// What it reported.
        #[source]
        source: BackendError,
    },
    /// An admin operation was done (the key store committed it), but its result record
    /// could not be written. Do not repeat it: its `attempt` record is on the log, and
    /// `key_status` shows the outcome. (A root-key rewrap of a version may be run again:
    /// versions already under the new root key are skipped.)
    #[error(
        "{action} of tenant '{tenant}' was done, but its result record could not be written to \
         audit log '{backend}': {source}; {} (its attempt record is on the log), and repair \
         the audit log",
        repeat_advice(action)
    )]
    AuditAfterCommit {
        /// The operation (`rotate_key`, `shred_tenant` …).
        action: &'static str,
        /// The tenant it changed.
        tenant: TenantId,
        /// The sink's name.
        backend: String,
        /// What it reported.
        #[source]
        source: BackendError,
    },
    /// Reading the input or writing the output of a stream failed (see `crate::stream`). Not
    /// a cryptographic failure; the message is the I/O error's, never stream content.
    #[error("stream I/O failed while {what}: {source}")]
    Io {
        /// What was being done (`reading the plaintext`, `writing the ciphertext` …).
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The crypto provider failed (not an authentication failure).
    #[error("crypto provider '{provider}' failed: {what}")]
    Crypto {
        /// The provider's name.
        provider: &'static str,
        /// Which operation.
        what: &'static str,
    },
}

impl Error {
    /// Whether this is a KMS failure that may pass by itself (unreachable, timed out,
    /// throttled), as opposed to a refusal.
    pub fn is_kms_unavailable(&self) -> bool {
        matches!(self, Error::Kms { source, .. } if source.kind() == BackendErrorKind::Unavailable)
    }

    /// A copy of an error a failed key unwrap can return, for the requests that waited on
    /// that unwrap (`None` for the other kinds). A backend error keeps its kind, its own
    /// message, whether the service was called, and the text of its causes as its source
    /// (not the cause objects themselves), so that what is told apart for the first request
    /// (its message; its causes, for the log only) is told apart for the others too.
    pub(crate) fn duplicate(&self) -> Option<Error> {
        Some(match self {
            Error::Kms { backend, source } => Error::Kms {
                backend: backend.clone(),
                source: source.duplicate(),
            },
            Error::KeyBindingMismatch { tenant, version } => Error::KeyBindingMismatch {
                tenant: tenant.clone(),
                version: *version,
            },
            Error::KeyDestroyed { tenant } => Error::KeyDestroyed {
                tenant: tenant.clone(),
            },
            Error::Crypto { provider, what } => Error::Crypto { provider, what },
            _ => return None,
        })
    }

    /// A copy of an error that stopped a running stream (`crate::stream::StopReason`), for
    /// every later check of that stream: as [`Error::duplicate`], and also the key store's,
    /// the audit log's and the key lookup's errors. Anything else (no key lookup returns it)
    /// becomes a key store error of the kind `Other` naming the original's kind.
    pub(crate) fn replay(&self) -> Error {
        if let Some(copy) = self.duplicate() {
            return copy;
        }
        match self {
            Error::Store { backend, source } => Error::Store {
                backend: backend.clone(),
                source: source.duplicate(),
            },
            Error::Audit { backend, source } => Error::Audit {
                backend: backend.clone(),
                source: source.duplicate(),
            },
            Error::KeyVersionNotFound { tenant, version } => Error::KeyVersionNotFound {
                tenant: tenant.clone(),
                version: *version,
            },
            Error::KeyVersionRetired {
                tenant,
                version,
                min,
            } => Error::KeyVersionRetired {
                tenant: tenant.clone(),
                version: *version,
                min: *min,
            },
            Error::TenantNotFound { tenant } => Error::TenantNotFound {
                tenant: tenant.clone(),
            },
            other => Error::Store {
                backend: "keyring".into(),
                source: BackendError::new(
                    BackendErrorKind::Other,
                    format!("the stream's key could not be confirmed ({})", other.kind()),
                ),
            },
        }
    }

    /// A short stable name for the error kind, for audit records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidInput { .. } => "invalid_input",
            Error::Config(_) => "config",
            Error::Format(_) => "malformed_ciphertext",
            Error::SegmentTooLarge { .. } => "segment_too_large",
            Error::DecryptionFailed => "decryption_failed",
            Error::TenantNotFound { .. } => "tenant_not_found",
            Error::TenantExists { .. } => "tenant_exists",
            Error::KeyVersionNotFound { .. } => "key_version_not_found",
            Error::KeyVersionRetired { .. } => "key_version_retired",
            Error::KeyDestroyed { .. } => "key_destroyed",
            Error::KeyBindingMismatch { .. } => "key_binding_mismatch",
            Error::RotationConflict { .. } => "rotation_conflict",
            Error::ConcurrentChange { .. } => "concurrent_change",
            Error::Kms { .. } => "kms",
            Error::Store { .. } => "key_store",
            Error::Audit { .. } => "audit",
            Error::AuditAfterCommit { .. } => "audit_after_commit",
            Error::Crypto { .. } => "crypto",
            Error::Io { .. } => "io",
        }
    }
}

/// What to tell the caller of an operation done but not recorded ([`Error::AuditAfterCommit`])
/// about repeating it.
fn repeat_advice(action: &str) -> &'static str {
    if action == crate::audit::Action::RewrapRootKey.as_str() {
        "`root rotate` or `root migrate` may be run again: versions already moved are skipped"
    } else {
        "do not repeat it; check the key status"
    }
}

/// The text of an error's causes, kept by [`Error::duplicate`] in place of the objects.
#[derive(Debug)]
struct CauseText(String);

impl fmt::Display for CauseText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CauseText {}

/// Why bytes or text are not a phiseal v1 ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Shorter than the fixed parts of the format.
    #[error("truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Length seen.
        len: usize,
        /// Minimum for this algorithm.
        min: usize,
    },
    /// The first byte is not a format version this library reads.
    #[error("unknown format version {0:#04x} (this library reads 0x01)")]
    UnknownVersion(u8),
    /// The algorithm byte is not one this library knows.
    #[error("unknown algorithm id {0:#04x}")]
    UnknownAlgorithm(u8),
    /// Key version 0 is never assigned.
    #[error("key version 0 is invalid")]
    ZeroKeyVersion,
    /// The text form does not start with the `phs1:` prefix.
    #[error("text ciphertext must start with 'phs1:'")]
    BadTextPrefix,
    /// The text form is not unpadded base64url.
    #[error("text ciphertext is not unpadded base64url")]
    BadBase64,
    /// A stream header's segment size is outside the allowed range (`docs/FORMAT.md` §10).
    #[error("stream segment size {0} is outside 4096..=16777216")]
    BadSegmentSize(u32),
}

/// The broad class of a backend failure: decides retries, fail-fast and the status a caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// Not reachable, timed out, throttled: may succeed later.
    Unavailable,
    /// The backend refused (permissions, disabled key, policy).
    Denied,
    /// The backend says the wrapped data or its binding is not valid for this key.
    InvalidData,
    /// A compare-and-set lost, or a unique key already exists.
    Conflict,
    /// Local misconfiguration (paths, permissions, profile).
    Misconfigured,
    /// Anything else.
    Other,
}

/// A failure reported by a KMS backend, key store or audit sink. Its message must not contain
/// key bytes or plaintext. Boxed inside, so that `Result`s on the per-field path stay small.
#[derive(Debug)]
pub struct BackendError(Box<BackendErrorInner>);

#[derive(Debug)]
struct BackendErrorInner {
    kind: BackendErrorKind,
    message: String,
    source: Option<BoxError>,
    /// False when the backend refused before calling its service.
    called: bool,
}

impl BackendError {
    /// A new error of `kind` with a safe, actionable message.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self(Box::new(BackendErrorInner {
            kind,
            message: message.into(),
            source: None,
            called: true,
        }))
    }

    /// Marks it as decided by the backend before calling its service (a record it cannot
    /// even send, a key it knows is gone): it says nothing about the service being up or
    /// down, so it neither starts nor ends the keyring's KMS outage state.
    pub fn refused_before_calling(mut self) -> Self {
        self.0.called = false;
        self
    }

    /// Whether the service was called (see [`BackendError::refused_before_calling`]).
    pub fn called_the_service(&self) -> bool {
        self.0.called
    }

    /// A copy: the same kind, message and `called_the_service`, with the text of its causes
    /// as its source (not the cause objects themselves).
    pub(crate) fn duplicate(&self) -> Self {
        let mut copy = BackendError::new(self.kind(), self.message());
        if let Some(cause) = std::error::Error::source(self) {
            copy = copy.with_source(CauseText(cause.to_string()));
        }
        if !self.called_the_service() {
            copy = copy.refused_before_calling();
        }
        copy
    }

    /// Keeps the underlying error as `source()`.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    /// The class of failure.
    pub fn kind(&self) -> BackendErrorKind {
        self.0.kind
    }

    /// Its own message, without the underlying error's text that `Display` appends.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// A [`BackendErrorKind::Misconfigured`] error whose message names the backend:
    /// `"{backend}: {message}"`.
    pub fn misconfigured(backend: &str, message: impl fmt::Display) -> Self {
        Self::new(
            BackendErrorKind::Misconfigured,
            format!("{backend}: {message}"),
        )
    }

    /// A [`BackendErrorKind::InvalidData`] error (the KMS answered with, or was handed, data
    /// that is not what it must be) whose message names the backend: `"{backend}: {message}"`.
    pub fn invalid_data(backend: &str, message: impl fmt::Display) -> Self {
        Self::new(
            BackendErrorKind::InvalidData,
            format!("{backend}: {message}"),
        )
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)?;
        if let Some(source) = &self.0.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_keeps_a_kms_errors_message_and_its_causes_apart() {
        let original = Error::Kms {
            backend: "aws-kms".into(),
            source: BackendError::new(BackendErrorKind::Unavailable, "Decrypt failed: timed out")
                .with_source(std::io::Error::other("helper stderr: token=s3cr3t"))
                .refused_before_calling(),
        };
        let Some(Error::Kms { backend, source }) = original.duplicate() else {
            panic!("a KMS error is duplicated as one");
        };
        assert_eq!(backend, "aws-kms");
        assert_eq!(source.kind(), BackendErrorKind::Unavailable);
        assert_eq!(source.message(), "Decrypt failed: timed out");
        assert!(!source.called_the_service());
        let cause = std::error::Error::source(&source).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("helper stderr: token=s3cr3t"));
        assert_eq!(
            Error::Kms { backend, source }.to_string(),
            original.to_string()
        );
    }
}
