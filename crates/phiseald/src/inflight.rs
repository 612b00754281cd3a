//! Caps on the calls in flight: `limits.max_requests_in_flight` for all callers together, and
//! `limits.max_requests_in_flight_per_uid` per peer uid, so that one local user cannot hold
//! every slot.
//!
//! A call holds its slots from the moment its headers arrive until its answer's headers are
//! sent — while its message arrives (which may be slow), before any identity check, rate limit
//! or audit runs. A call first waits for a slot of its uid and only then for one of the shared
//! slots, so calls of a uid over its cap wait without holding shared slots: another uid's calls
//! go ahead. Calls wait rather than fail; the server's receive limit (`request_timeout` + 5 s)
//! bounds the wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::BoxFuture;
use tonic::codegen::http::Request;
use tonic::transport::server::UdsConnectInfo;
use tower::{Layer, Service, ServiceExt};

/// The tower layer applying the caps (see the module docs).
#[derive(Clone)]
pub struct InFlightLayer {
    caps: Arc<Caps>,
}

struct Caps {
    all: Arc<Semaphore>,
    per_uid: usize,
    /// One semaphore per peer uid seen (`None`: a peer without credentials, which the
    /// identity check then refuses). Kept for the daemon's life: a host has few uids.
    uids: Mutex<HashMap<Option<u32>, Arc<Semaphore>>>,
}

impl InFlightLayer {
    /// At most `all` calls in flight, and `per_uid` per peer uid.
    pub fn new(all: usize, per_uid: usize) -> Self {
        Self {
            caps: Arc::new(Caps {
                all: Arc::new(Semaphore::new(all)),
                per_uid,
                uids: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Caps {
    fn of_uid(&self, uid: Option<u32>) -> Arc<Semaphore> {
        // The map is consistent after any panic while it was held (one insert at most).
        let mut uids = self
            .uids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            uids.entry(uid)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_uid))),
        )
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            caps: Arc::clone(&self.caps),
        }
    }
}

/// The service of [`InFlightLayer`].
#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    caps: Arc<Caps>,
}

impl<S, B> Service<Request<B>> for InFlight<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is awaited per call, after its slots (the inner service is the router,
        // which is always ready).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        let caps = Arc::clone(&self.caps);
        let inner = self.inner.clone();
        Box::pin(async move {
            // Neither semaphore is ever closed, so acquiring cannot fail; a closed one would
            // only let the call through without its slot.
            let _uid_slot = caps.of_uid(uid).acquire_owned().await.ok();
            let _slot = Arc::clone(&caps.all).acquire_owned().await.ok();
            inner.oneshot(request).await
        })
    }
}
