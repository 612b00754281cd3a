//! Shares a failed KMS unwrap with the requests that were waiting on it.
//!
//! Concurrent misses for one key version wait on one unwrap (`quick_cache`'s placeholder).
//! When that unwrap *succeeds* they all get the key. When it *fails*, the cache hands the
//! placeholder to the next waiter, which would call the KMS again, and so on: 100 concurrent
//! decrypts of a key the KMS refuses (access denied, disabled key, a tampered wrapping) made
//! 100 KMS calls one after another, each audited, each as slow as the KMS. Instead, a request
//! that was already waiting when an unwrap of its key failed gets that failure, without a KMS
//! call of its own; a request that starts after the failure tries the KMS again, and so does
//! one whose key record has another key check than the failed one (a key store restored or
//! failed over: another key under the same version, whose unwrap may well succeed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::context::TenantId;
use crate::error::Error;

/// Failed unwraps remembered (one per key version; the newest win). A request only uses an
/// entry younger than itself, so an evicted one costs at most one more KMS call.
const CAPACITY: usize = 1024;

/// The latest failed unwrap per key version, ordered by a counter of failures, with the key
/// check of the record it unwrapped.
pub(super) struct UnwrapFailures {
    /// Failures recorded so far (any key version).
    recorded: AtomicU64,
    latest: quick_cache::sync::Cache<(TenantId, u32), Failure>,
}

/// One failed unwrap: its number, the key check of the record it unwrapped, the error.
type Failure = (u64, [u8; 32], Arc<Error>);

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

    /// Records the failure of an unwrap of `key` from the record with `key_check`. Called
    /// before the unwrap's waiters are released. Errors that cannot be duplicated are not
    /// shared (their waiters retry).
    pub(super) fn record(&self, key: &(TenantId, u32), key_check: &[u8; 32], error: &Error) {
        if let Some(copy) = error.duplicate() {
            // The counter moves first: a ticket taken from now on is not older than the entry.
            let number = self.recorded.fetch_add(1, Ordering::AcqRel) + 1;
            self.latest
                .insert(key.clone(), (number, *key_check, Arc::new(copy)));
        }
    }

    /// The failure of an unwrap of `key` recorded after `ticket` was taken (one this request
    /// waited on) from a record with the same `key_check`, as an error of its own.
    pub(super) fn since(
        &self,
        key: &(TenantId, u32),
        key_check: &[u8; 32],
        ticket: Ticket,
    ) -> Option<Error> {
        let (number, failed_check, error) = self.latest.get(key)?;
        if number > ticket.0 && crate::crypto::ct_eq(&failed_check, key_check) {
            error.duplicate()
        } else {
            None
        }
    }
}
