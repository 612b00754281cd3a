//! A token credential whose refreshes run in a task of their own, and never hold a request
//! back while the last token is still good.
//!
//! `azure_core`'s bearer-token policy refreshes its token inside a request once the token is
//! within 5 minutes of expiring, and every other request waits for that refresh. Under this
//! crate's [`crate::OPERATION_TIMEOUT`] a refresh slower than the timeout (a managed-identity
//! endpoint retrying for up to a minute, Entra ID on a slow day) would be cancelled with the
//! request, and started again by the next one, until the token expired: a slow identity
//! endpoint would become a Key Vault outage while a valid token was at hand. Here a refresh
//! runs in a spawned task that every caller shares; while it runs, callers get the last token
//! as long as it stays valid for at least [`USABLE_FOR`], and only callers without one wait
//! (a caller whose request times out just stops waiting). Failures are not cached: the next
//! call after a failed refresh starts another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::{Duration, OffsetDateTime};
use tokio::sync::watch;

/// A token with at least this much validity left is handed out without a refresh (the
/// bearer-token policy's own refresh window).
pub const FRESH_FOR: Duration = Duration::minutes(5);
/// While a refresh runs, the last token is handed out if it stays valid at least this long.
pub const USABLE_FOR: Duration = Duration::seconds(30);
/// A refresh still unanswered after this long fails as timed out (an outage), so that a hung
/// identity endpoint does not hold every later caller: the next call starts another.
pub const REFRESH_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

type Outcome = Option<Result<AccessToken, Arc<azure_core::Error>>>;

/// The token and the refresh of one set of scopes.
#[derive(Default)]
struct Entry {
    last: Option<AccessToken>,
    /// The refresh in progress, or the last one (then finished).
    refresh: Option<watch::Receiver<Outcome>>,
}

/// Wraps a token credential; see the module docs. [`crate::AzureKeyVaultKms::connect`] uses
/// it; wrap the credential of a client given to [`crate::AzureKeyVaultKms::from_client`] in it
/// for the same behaviour. `Debug` shows no token.
pub struct DetachedTokenCredential {
    inner: Arc<dyn TokenCredential>,
    entries: Mutex<HashMap<Vec<String>, Entry>>,
}

impl std::fmt::Debug for DetachedTokenCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetachedTokenCredential")
            .finish_non_exhaustive()
    }
}

impl DetachedTokenCredential {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn TokenCredential>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            entries: Mutex::default(),
        })
    }

    /// A token to use now, or the refresh to wait for.
    fn token_or_refresh(&self, scopes: &[&str]) -> Result<AccessToken, watch::Receiver<Outcome>> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = entries
            .entry(scopes.iter().map(|s| (*s).to_owned()).collect())
            .or_default();
        let finished = entry.refresh.as_ref().and_then(|rx| rx.borrow().clone());
        if let Some(outcome) = finished {
            // A success replaces the last token; a failure is dropped (the next call retries).
            if let Ok(token) = outcome {
                entry.last = Some(token);
            }
            entry.refresh = None;
        }
        let now = OffsetDateTime::now_utc();
        let valid_for = |minimum: Duration| {
            entry
                .last
                .as_ref()
                .filter(|t| t.expires_on > now + minimum)
                .cloned()
        };
        if let Some(token) = valid_for(FRESH_FOR) {
            return Ok(token);
        }
        let refresh = match &entry.refresh {
            Some(running) => running.clone(),
            None => {
                let (tx, rx) = watch::channel(None);
                let inner = Arc::clone(&self.inner);
                let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
                let tx = AnswerOnDrop(Some(tx));
                // Without a Tokio runtime no task can run: `tx` is dropped unanswered, which
                // answers a failed refresh.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        let mut tx = tx;
                        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
                        let outcome = match tokio::time::timeout(
                            REFRESH_LIMIT,
                            inner.get_token(&scopes, None),
                        )
                        .await
                        {
                            Ok(outcome) => outcome,
                            Err(_) => Err(azure_core::Error::new(
                                azure_core::error::ErrorKind::Credential,
                                std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    format!(
                                        "the token request was not answered within \
                                         {REFRESH_LIMIT:?}"
                                    ),
                                ),
                            )),
                        }
                        .map_err(Arc::new);
                        tx.answer(outcome);
                    });
                }
                entry.refresh = Some(rx.clone());
                rx
            }
        };
        valid_for(USABLE_FOR).ok_or(refresh)
    }
}

#[async_trait::async_trait]
impl TokenCredential for DetachedTokenCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let mut refresh = match self.token_or_refresh(scopes) {
            Ok(token) => return Ok(token),
            Err(refresh) => refresh,
        };
        let outcome = refresh
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|o| o.clone());
        match outcome {
            Some(Ok(token)) => Ok(token),
            Some(Err(e)) => Err(azure_core::Error::new(e.kind().clone(), SharedCause(e))),
            // (Cannot happen: the task answers even when it fails or is dropped.)
            None => Err(no_answer("the refresh task ended without an answer")),
        }
    }
}

/// The refresh's sender: answers a failed refresh if the task ends (panics, or its runtime
/// shuts down) before it answered, so that the next call starts another refresh instead of
/// waiting on one that is gone.
struct AnswerOnDrop(Option<watch::Sender<Outcome>>);

impl AnswerOnDrop {
    fn answer(&mut self, outcome: Result<AccessToken, Arc<azure_core::Error>>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Some(outcome));
        }
    }
}

impl Drop for AnswerOnDrop {
    fn drop(&mut self) {
        self.answer(Err(Arc::new(no_answer(
            "the refresh task ended without an answer",
        ))));
    }
}

/// A refresh that gave no answer: an outage (its cause is an I/O error, which the backend's
/// error classification reads as the identity endpoint being unavailable), never a refusal.
fn no_answer(why: &str) -> azure_core::Error {
    azure_core::Error::new(
        azure_core::error::ErrorKind::Credential,
        std::io::Error::other(format!("token refresh: {why}")),
    )
}

/// A caller's copy of a shared refresh error: the original's text, and its causes behind it
/// (what the error classification reads).
#[derive(Debug)]
struct SharedCause(Arc<azure_core::Error>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Panics on its first call (the refresh task dies), then hands out tokens.
    #[derive(Debug, Default)]
    struct DiesOnce {
        calls: AtomicU32,
    }

    #[async_trait::async_trait]
    impl TokenCredential for DiesOnce {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("test credential: the refresh task dies");
            }
            Ok(AccessToken::new(
                "t",
                OffsetDateTime::now_utc() + Duration::hours(1),
            ))
        }
    }

    #[tokio::test]
    async fn a_refresh_that_dies_fails_as_an_outage_and_the_next_call_starts_another() {
        let inner = Arc::new(DiesOnce::default());
        let credential = DetachedTokenCredential::new(inner.clone());
        let err = credential.get_token(&["scope"], None).await.unwrap_err();
        assert_eq!(
            crate::classify_credential(&err),
            phiseal::BackendErrorKind::Unavailable,
            "{err}"
        );
        credential.get_token(&["scope"], None).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
        // A fresh token is handed out without another refresh.
        credential.get_token(&["scope"], None).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    }
}
