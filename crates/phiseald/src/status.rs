//! Maps library errors to gRPC statuses with safe messages and a stable kind in the
//! `phiseal-error-kind` metadata. The core's messages never contain plaintext, ciphertext or
//! key bytes; the mapping keeps them and adds nothing.

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

/// The status for a library error.
pub fn from_error(error: &Error) -> Status {
    status(code_of(error), error.kind(), error.to_string())
}

/// The per-item error for a library error.
pub fn item_error(error: &Error) -> ItemError {
    ItemError {
        code: code_of(error) as i32,
        kind: error.kind().to_owned(),
        message: error.to_string(),
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
