//! Shares a failed KMS unwrap with the requests that were waiting on it.
//!
//! Concurrent misses for one key version wait on one unwrap (`quick_cache`'s placeholder).
//! When that unwrap *succeeds* they all get the key. When it *fails*, the cache hands the
//! placeholder to the next waiter, which would call the KMS again, and so on: 100 concurrent
//! decrypts of a key the KMS refuses (access denied, disabled key, a tampered wrapping) made
//! 100 KMS calls one after another, each audited, each as slow as the KMS. Instead, a request
//! that was already waiting when an unwrap of its key failed gets that failure, without a KMS
//! call of its own; a request that starts after the failure tries the KMS again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::context::TenantId;
use crate::error::Error;

/// Failed unwraps remembered (one per key version; the newest win). A request only uses an
/// entry younger than itself, so an evicted one costs at most one more KMS call.
const CAPACITY: usize = 1024;

/// The latest failed unwrap per key version, ordered by a counter of failures.
pub(super) struct UnwrapFailures {
    /// Failures recorded so far (any key version).
    recorded: AtomicU64,
    latest: quick_cache::sync::Cache<(TenantId, u32), (u64, Arc<Error>)>,
}

impl Default for UnwrapFailures {
    fn default() -> Self {
        Self {
            recorded: AtomicU64::new(0),
            latest: quick_cache::sync::Cache::new(CAPACITY),
        }
    }
}

/// Taken by a request before it joins the wait for a key version: which failures are newer.
#[derive(Clone, Copy)]
pub(super) struct Ticket(u64);

impl UnwrapFailures {
    /// A ticket for a request about to wait for a key version.
    pub(super) fn ticket(&self) -> Ticket {
        Ticket(self.recorded.load(Ordering::Acquire))
    }

    /// Records the failure of an unwrap of `key`. Called before the unwrap's waiters are
    /// released. Errors that cannot be duplicated are not shared (their waiters retry).
    pub(super) fn record(&self, key: &(TenantId, u32), error: &Error) {
        if let Some(copy) = error.duplicate() {
            // The counter moves first: a ticket taken from now on is not older than the entry.
            let number = self.recorded.fetch_add(1, Ordering::AcqRel) + 1;
            self.latest.insert(key.clone(), (number, Arc::new(copy)));
        }
    }

    /// The failure of an unwrap of `key` recorded after `ticket` was taken (one this request
    /// waited on), as an error of its own.
    pub(super) fn since(&self, key: &(TenantId, u32), ticket: Ticket) -> Option<Error> {
        let (number, error) = self.latest.get(key)?;
        if number > ticket.0 {
            error.duplicate()
        } else {
            None
        }
    }
}
