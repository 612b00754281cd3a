//! Tells a credentials refresh that failed for now (the provider is unreachable, timed out,
//! throttled or overloaded) from one that was refused.
//!
//! The SDK wraps the provider's own error in `CredentialsError::ProviderError` (or
//! `Unhandled`); what it was is only visible further down the chain. That matters: the keyring
//! serves cached keys through a KMS outage (`cache.max_stale`) and backs off its retries, but
//! drops them on a refusal — so an STS that throttles a web-identity (IRSA) refresh, or an
//! instance-metadata service answering 503, must count as an outage, not as a refusal.

use aws_config::imds::client::error::ImdsError;
use aws_sdk_kms::error::ConnectorError;
use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;
use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;

use crate::{causes, transient_answer};

/// The text the SDK's HTTP credentials provider (ECS, EKS Pod Identity) fails with on an
/// answer that is not 2xx, followed by the status.
const HTTP_PROVIDER_STATUS: &str = "Non-success status from HTTP credential provider: ";

/// Whether a credentials failure `err` (anywhere in its chain of causes) is one that may pass
/// by itself.
pub(crate) fn transient(err: &(dyn std::error::Error + 'static)) -> bool {
    // (A credentials endpoint whose certificate is rejected is no outage either.)
    if crate::certificate_rejected(err) {
        return false;
    }
    causes(err).skip(1).any(|cause| {
        if let Some(c) = cause.downcast_ref::<ConnectorError>() {
            return c.is_io() || c.is_timeout();
        }
        if cause.is::<std::io::Error>() {
            return true;
        }
        if let Some(e) =
            cause.downcast_ref::<SdkError<AssumeRoleWithWebIdentityError, HttpResponse>>()
        {
            return sdk_error_is_transient(e);
        }
        if let Some(e) = cause.downcast_ref::<SdkError<AssumeRoleError, HttpResponse>>() {
            return sdk_error_is_transient(e);
        }
        if let Some(e) = cause.downcast_ref::<ImdsError>() {
            return match e {
                ImdsError::ErrorResponse(r) => {
                    let status = r.response().status().as_u16();
                    status >= 500 || status == 429
                }
                ImdsError::IoError(_) => true,
                // The chain below says (a connection error), if anything does.
                _ => false,
            };
        }
        cause
            .to_string()
            .strip_prefix(HTTP_PROVIDER_STATUS)
            .and_then(|status| status.trim().parse::<u16>().ok())
            .is_some_and(|status| status >= 500 || status == 429)
    })
}

fn sdk_error_is_transient<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(d) => d.is_io() || d.is_timeout(),
        SdkError::ServiceError(s) => transient_answer(
            s.err().code().unwrap_or_default(),
            s.raw().status().as_u16(),
        ),
        _ => false,
    }
}
