//! Credentials loaded in a task of their own, so that a KMS call's attempt timeout does not
//! cancel them.
//!
//! The SDK resolves credentials inside each attempt of a call, under the attempt's time limit
//! ([`crate::ATTEMPT_TIMEOUT`], 2 s). A refresh that takes longer (STS on a slow day, with its
//! own retries) would be dropped with the attempt and started again by the next one, and
//! every attempt would time out until STS got faster: a slow credential refresh would become a
//! KMS outage. Here the refresh runs in a spawned task; a caller whose attempt ends only stops
//! waiting, and the next attempt (or any other call) waits for the same refresh. The SDK's
//! identity cache in front still decides when to refresh; failures are not cached. A refresh
//! still unanswered after [`REFRESH_LIMIT`] fails as timed out (an outage), so that a hung
//! provider — a `credential_process` that never exits — does not hold every later call: the
//! next call starts another.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider};
use tokio::sync::watch;

type Outcome = Option<Result<Credentials, Arc<CredentialsError>>>;

/// The longest a credentials refresh may take (as the Azure backend's token refresh).
pub(crate) const REFRESH_LIMIT: Duration = Duration::from_secs(120);

/// Wraps a credentials provider; see the module docs.
#[derive(Debug)]
pub(crate) struct DetachedCredentials {
    inner: SharedCredentialsProvider,
    /// The refresh in progress, or the last one (then finished).
    current: Mutex<Option<watch::Receiver<Outcome>>>,
    /// [`REFRESH_LIMIT`] (shorter in tests).
    limit: Duration,
}

impl DetachedCredentials {
    pub(crate) fn new(inner: SharedCredentialsProvider) -> Self {
        Self {
            inner,
            current: Mutex::new(None),
            limit: REFRESH_LIMIT,
        }
    }

    /// The refresh in progress, or a new one.
    fn join_or_start(&self) -> watch::Receiver<Outcome> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(running) = current.as_ref().filter(|rx| rx.borrow().is_none()) {
            return running.clone();
        }
        let (tx, rx) = watch::channel(None);
        let inner = self.inner.clone();
        let limit = self.limit;
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(limit, inner.provide_credentials())
                .await
                .unwrap_or_else(|_| Err(CredentialsError::provider_timed_out(limit)))
                .map_err(Arc::new);
            let _ = tx.send(Some(outcome));
        });
        *current = Some(rx.clone());
        rx
    }

    async fn load(&self) -> Result<Credentials, CredentialsError> {
        let mut rx = self.join_or_start();
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            // The task ended without an answer (it panicked).
            Err(_) => {
                return Err(CredentialsError::unhandled(
                    "the credentials refresh task ended without an answer",
                ));
            }
        };
        match outcome {
            Some(Ok(credentials)) => Ok(credentials),
            Some(Err(e)) => Err(copy(&e)),
            None => Err(CredentialsError::unhandled(
                "the credentials refresh task ended without an answer",
            )),
        }
    }
}

impl ProvideCredentials for DetachedCredentials {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(self.load())
    }
}

/// The refresh's error for one of the callers that waited on it: the same variant, with the
/// original causes behind it (what `credentials_failure` classifies by).
fn copy(error: &Arc<CredentialsError>) -> CredentialsError {
    let cause = SharedCause(Arc::clone(error));
    match &**error {
        CredentialsError::ProviderTimedOut(t) => {
            CredentialsError::provider_timed_out(t.timeout_duration())
        }
        CredentialsError::CredentialsNotLoaded(_) => CredentialsError::not_loaded(cause),
        CredentialsError::InvalidConfiguration(_) => CredentialsError::invalid_configuration(cause),
        CredentialsError::ProviderError(_) => CredentialsError::provider_error(cause),
        _ => CredentialsError::unhandled(cause),
    }
}

/// The link from a caller's copy of a shared refresh error to the original's causes: its
/// source is the original's source (the SDK error, I/O error … that `credentials_failure`
/// classifies by), so the copy is the only `CredentialsError` in its chain.
#[derive(Debug)]
struct SharedCause(Arc<CredentialsError>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("in a credentials refresh shared with other calls")
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A provider that never answers (a hung `credential_process`), counting its calls.
    #[derive(Debug, Default)]
    struct Hung(Arc<std::sync::atomic::AtomicUsize>);

    impl ProvideCredentials for Hung {
        fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            provider::future::ProvideCredentials::new(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_hung_refresh_times_out_and_the_next_call_starts_another() {
        let calls_made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let detached = DetachedCredentials {
            limit: Duration::from_millis(200),
            ..DetachedCredentials::new(SharedCredentialsProvider::new(Hung(Arc::clone(
                &calls_made,
            ))))
        };
        for calls in 1..=2 {
            let err = tokio::time::timeout(Duration::from_secs(5), detached.load())
                .await
                .expect("a hung refresh held the call")
                .unwrap_err();
            assert!(
                matches!(err, CredentialsError::ProviderTimedOut(_)),
                "{err:?}"
            );
            assert_eq!(calls_made.load(std::sync::atomic::Ordering::SeqCst), calls);
        }
    }
}
