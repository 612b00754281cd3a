//! Maps library errors to gRPC statuses with safe messages and a stable kind in the
//! `phiseal-error-kind` metadata. The core's messages never contain plaintext, ciphertext or
//! key bytes; the mapping keeps them and adds nothing, except that a KMS failure's underlying
//! cause — an SDK's text, what a credential helper printed on its stderr, account and role
//! names — goes to the daemon's log only ([`log_detail`]), not to the caller.

use std::sync::Arc;

use phiseal::Error;
use phiseal_proto::ERROR_KIND_HEADER;
use phiseal_proto::v1::ItemError;
use tonic::{Code, Status};

/// The gRPC code for a library error.
pub fn code_of(error: &Error) -> Code {
    match error {
        Error::InvalidInput { .. } | Error::Format(_) | Error::DecryptionFailed => {
            Code::InvalidArgument
        }
        Error::TenantNotFound { .. } | Error::KeyVersionNotFound { .. } => Code::NotFound,
        Error::TenantExists { .. } => Code::AlreadyExists,
        Error::KeyVersionRetired { .. } | Error::KeyDestroyed { .. } => Code::FailedPrecondition,
        Error::RotationConflict { .. } | Error::ConcurrentChange { .. } => Code::Aborted,
        // The operation was done but its audit record is lost: never retried automatically.
        Error::KeyBindingMismatch { .. } | Error::AuditAfterCommit { .. } => Code::DataLoss,
        Error::Kms { .. } | Error::Store { .. } | Error::Audit { .. } => Code::Unavailable,
        // Over a configured size, like a response that would exceed the message limit.
        Error::SegmentTooLarge { .. } => Code::OutOfRange,
        _ => Code::Internal,
    }
}

/// A status with a kind in the metadata.
pub fn status(code: Code, kind: &'static str, message: impl Into<String>) -> Status {
    let mut status = Status::new(code, message);
    status.metadata_mut().insert(
        ERROR_KIND_HEADER,
        tonic::metadata::MetadataValue::from_static(kind),
    );
    status
}

/// The status for a library error; its full text, for the log, in [`log_detail`].
pub fn from_error(error: &Error) -> Status {
    let mut status = status(code_of(error), error.kind(), client_message(error));
    status.set_source(Arc::new(LoggedDetail(error.to_string())));
    status
}

/// What the daemon logs of a failed call: the full text of the library error behind it
/// (see [`from_error`]), or the status's message.
pub fn log_detail(status: &Status) -> &str {
    std::error::Error::source(status)
        .and_then(|e| e.downcast_ref::<LoggedDetail>())
        .map_or_else(|| status.message(), |d| d.0.as_str())
}

/// The full text of a library error, kept with a status for the daemon's log; never sent
/// (tonic sends a status's code, message and details, not its source).
#[derive(Debug)]
struct LoggedDetail(String);

impl std::fmt::Display for LoggedDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoggedDetail {}

/// What the caller is told of a library error: its message, but for a KMS failure only the
/// backend's own summary (operation, key, class, what to check), without the underlying
/// cause, which is logged.
fn client_message(error: &Error) -> String {
    match error {
        Error::Kms { backend, source } if std::error::Error::source(source).is_some() => {
            format!(
                "KMS '{backend}' failed: {} (the cause is in the daemon's log)",
                source.message()
            )
        }
        _ => error.to_string(),
    }
}

/// The per-item error for a library error. A KMS failure's cause, which the item's message
/// leaves out, is logged here (a batch call that succeeds has no failed-call log line): for
/// the item whose KMS call failed and for those that waited on that call; items refused
/// during an outage without a call carry none.
pub fn item_error(error: &Error) -> ItemError {
    if let Error::Kms { source, .. } = error
        && std::error::Error::source(source).is_some()
    {
        tracing::warn!(error = %error, "a batch item's KMS call failed");
    }
    ItemError {
        code: code_of(error) as i32,
        kind: error.kind().to_owned(),
        message: client_message(error),
    }
}

/// The per-item error for a policy refusal.
pub fn item_denied() -> ItemError {
    ItemError {
        code: Code::PermissionDenied as i32,
        kind: "permission_denied".to_owned(),
        message: PERMISSION_DENIED.to_owned(),
    }
}

/// The message of a policy refusal.
pub const PERMISSION_DENIED: &str = "permission denied: the policy does not allow this identity this operation on this tenant (and field)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kms_failures_cause_goes_to_the_log_not_to_the_caller() {
        let error = Error::Kms {
            backend: "aws-kms".into(),
            source: phiseal::BackendError::new(
                phiseal::BackendErrorKind::Unavailable,
                "aws-kms: Decrypt with key 'k' failed: could not connect",
            )
            .with_source(std::io::Error::other(
                "credential helper said: token=s3cr3t for role admin",
            )),
        };
        let status = from_error(&error);
        assert_eq!(
            status.message(),
            "KMS 'aws-kms' failed: aws-kms: Decrypt with key 'k' failed: could not connect (the \
             cause is in the daemon's log)"
        );
        assert!(log_detail(&status).contains("token=s3cr3t"));
        assert!(!item_error(&error).message.contains("s3cr3t"));
        // Other errors are told as they are.
        let t = phiseal::TenantId::new("t").unwrap_or_else(|_| unreachable!());
        let plain = from_error(&Error::TenantNotFound { tenant: t });
        assert_eq!(log_detail(&plain), plain.message());
    }

    #[test]
    fn codes() {
        let t = phiseal::TenantId::new("t").unwrap_or_else(|_| unreachable!());
        assert_eq!(code_of(&Error::DecryptionFailed), Code::InvalidArgument);
        assert_eq!(
            code_of(&Error::KeyDestroyed { tenant: t.clone() }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code_of(&Error::TenantNotFound { tenant: t.clone() }),
            Code::NotFound
        );
        // Done but not recorded: a code clients never retry on their own (not UNAVAILABLE).
        let after_commit = Error::AuditAfterCommit {
            action: "rotate_key",
            tenant: t,
            backend: "file".into(),
            source: phiseal::BackendError::new(phiseal::BackendErrorKind::Unavailable, "disk full"),
        };
        let s = from_error(&after_commit);
        assert_eq!(s.code(), Code::DataLoss);
        assert_eq!(
            s.metadata()
                .get(ERROR_KIND_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("audit_after_commit")
        );
        assert!(s.message().contains("do not repeat it"), "{s:?}");
        let s = from_error(&Error::DecryptionFailed);
        assert_eq!(
            s.metadata()
                .get(ERROR_KIND_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("decryption_failed")
        );
    }
}
