//! The KMS outage policy (docs/KMS.md, "Outages").
//!
//! * [`KmsOutage`] remembers that the KMS was found *unavailable* (unreachable, timing out,
//!   throttled — never a refusal) and when to try it again. Until then no request calls the
//!   KMS: keys that are not cached fail at once with an error naming the backend (not the
//!   last failure's message, which may name another tenant: that request logged it), and a throttled or hanging KMS sees one attempt per [`STALE_RETRY_INTERVAL`] from
//!   this keyring instead of one per waiting request.
//! * [`Keyring::refresh_or_serve_stale`] handles a cached key past its TTL but within
//!   `key_ttl + max_stale`: it stays in the cache while one request (per key version) tries
//!   the KMS; if the KMS is unavailable, the decision to keep serving it — or to refuse it once
//!   it is too old — is audited (`serve_stale_key`) before it takes effect. A refusal by the
//!   KMS is never answered with a stale key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use coarsetime::Instant;

use super::{Caller, KeyRef, Keyring, OpMeta, STALE_RETRY_INTERVAL, TenantView, outcome_of};
use crate::audit::{Action, KeySource};
use crate::crypto::ct_eq;
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::field::VersionKey;
use crate::store::KeyRecord;

/// The outage state of each KMS backend of a keyring ([`crate::kms::Kms::backend_count`]: one,
/// or a migration chain's members): a backend's keys follow its own state only.
#[derive(Debug)]
pub(super) struct KmsOutages {
    first: KmsOutage,
    rest: Box<[KmsOutage]>,
}

impl KmsOutages {
    /// One state per backend (at least one).
    pub(super) fn new(backends: usize) -> Self {
        Self {
            first: KmsOutage::default(),
            rest: (1..backends).map(|_| KmsOutage::default()).collect(),
        }
    }

    /// Backend `index`'s state (the first backend's for an index out of range).
    pub(super) fn of(&self, index: usize) -> &KmsOutage {
        match index.checked_sub(1) {
            Some(i) => self.rest.get(i).unwrap_or(&self.first),
            None => &self.first,
        }
    }
}

/// Whether one KMS backend is in an outage. Shared by every key it unwrapped.
#[derive(Debug, Default)]
pub(super) struct KmsOutage {
    /// Coarse-clock ticks until which the KMS is not called; 0 when there is no outage.
    retry_at: AtomicU64,
    /// Coarse-clock ticks of the last call the KMS answered (a key, or a refusal); 0 if none.
    last_answer: AtomicU64,
}

impl KmsOutage {
    /// Whether a KMS call may be made at `now`. During an outage, only the one caller that
    /// claims the due retry may (the next retry moves out by the interval meanwhile).
    pub(super) fn may_call(&self, now: Instant) -> bool {
        let retry_at = self.retry_at.load(Ordering::Acquire);
        if retry_at == 0 {
            return true;
        }
        if now.as_ticks() < retry_at {
            return false;
        }
        // The claim lasts two intervals, so a probe that hangs until the backend's time limit
        // is not joined by a second one; `record` sets the real next attempt when it ends.
        let next = now
            .saturating_add((STALE_RETRY_INTERVAL * 2).into())
            .as_ticks();
        match self
            .retry_at
            .compare_exchange(retry_at, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            // The outage ended meanwhile.
            Err(current) => current == 0,
        }
    }

    /// Records the outcome of a KMS unwrap call that ended at `now`: unavailable starts (or
    /// extends) the outage; any answer from the KMS — a key, a refusal, a key it does not
    /// have, bytes it found invalid — ends it. Called only around real KMS calls: failures
    /// decided before one (a destroyed key, a root key not configured here) change nothing,
    /// nor do those the backend decided without calling its service
    /// ([`BackendError::refused_before_calling`]: a damaged record it cannot send).
    pub(super) fn record<T>(&self, result: &Result<T, BackendError>, now: Instant) {
        match result {
            // The retry this call claimed (`may_call` moved it two intervals out; a failure
            // recorded since moves it one) is due again at once, for the next caller.
            Err(e) if !e.called_the_service() => {
                let claimed = self.retry_at.load(Ordering::Acquire);
                let one_interval = now.saturating_add(STALE_RETRY_INTERVAL.into()).as_ticks();
                if claimed > one_interval {
                    let _ = self.retry_at.compare_exchange(
                        claimed,
                        now.as_ticks().max(1),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
            Err(e) if e.kind() == BackendErrorKind::Unavailable => {
                let next = now.saturating_add(STALE_RETRY_INTERVAL.into()).as_ticks();
                self.retry_at.store(next.max(1), Ordering::Release);
            }
            Ok(_) | Err(_) => {
                self.retry_at.store(0, Ordering::Release);
                // (A failure of no known kind ends the backoff but is no sign of life.)
                if !matches!(result, Err(e) if e.kind() == BackendErrorKind::Other) {
                    self.last_answer
                        .fetch_max(now.as_ticks().max(1), Ordering::Release);
                }
            }
        }
    }

    /// Coarse-clock ticks of the last call the KMS answered (0: none yet).
    pub(super) fn last_answer(&self) -> u64 {
        self.last_answer.load(Ordering::Acquire)
    }

    /// Whether an outage is in progress (the last KMS call found it unavailable).
    pub(super) fn is_active(&self) -> bool {
        self.retry_at.load(Ordering::Acquire) != 0
    }

    /// When stale keys should next give way to a KMS attempt.
    fn next_retry(&self, now: Instant) -> Instant {
        match self.retry_at.load(Ordering::Acquire) {
            0 => now.saturating_add(STALE_RETRY_INTERVAL.into()),
            ticks => Instant::from_ticks(ticks),
        }
    }

    /// The error of a request refused without calling the KMS.
    /// It does not repeat the failure's own message: that names the tenant whose unwrap
    /// failed, and this error goes to callers of every tenant.
    pub(super) fn error(&self, backend: &str) -> Error {
        Error::Kms {
            backend: backend.to_owned(),
            source: BackendError::new(
                BackendErrorKind::Unavailable,
                format!(
                    "not called: the KMS was unavailable at the last attempt and is tried again \
                     within {} s",
                    STALE_RETRY_INTERVAL.as_secs()
                ),
            ),
        }
    }
}

impl Keyring {
    /// The outage state and name of the KMS backend that unwraps keys wrapped under
    /// `root_key_ref`.
    pub(super) fn backend_of(&self, root_key_ref: &str) -> (&KmsOutage, &str) {
        self.backend(self.inner.kms.backend_for(root_key_ref).unwrap_or(0))
    }

    /// The outage state and name of the KMS backend that unwraps `key`'s record.
    pub(super) fn backend_of_key(&self, key: &VersionKey) -> (&KmsOutage, &str) {
        self.backend(key.kms_backend())
    }

    /// The outage state and name of KMS backend `index` ([`crate::kms::Kms::backend_for`]).
    pub(super) fn backend(&self, index: usize) -> (&KmsOutage, &str) {
        (
            self.inner.outages.of(index),
            self.inner.kms.backend_name(index),
        )
    }

    /// For a cached key past its TTL but within `key_ttl + max_stale`: one request at a time
    /// per key version tries the KMS (the key stays cached meanwhile, so a cancelled attempt
    /// loses nothing); a fresh key replaces it; a refusal removes it and fails; while the KMS
    /// is unavailable the stale key serves, each decision audited first. `None` when the key
    /// has become too old to consider (the caller then takes the ordinary miss path).
    pub(super) async fn refresh_or_serve_stale(
        &self,
        caller: &Caller,
        view: &TenantView,
        record: &KeyRecord,
        stale: Arc<VersionKey>,
    ) -> Option<Result<(Arc<VersionKey>, KeySource), Error>> {
        let inner = &self.inner;
        let tenant = &view.record.tenant;
        let version = record.version;
        let holder = Arc::clone(&stale);
        let _single_flight = holder.refresh.lock().await;
        let now = Instant::now_without_cache_update();
        // Refreshed, or kept in service, by another request while this one waited.
        match inner.keys.get(&KeyRef(tenant, version)) {
            Some(current) if Arc::ptr_eq(&current, &stale) => {}
            // (Only a key of this record: another request may have refreshed it from another
            // record of the version, an older view's; the miss path then decides.)
            Some(current) if ct_eq(&current.key_check, &record.key_check) => {
                if let Some(source) = self.serve(&current, now) {
                    return Some(Ok((current, source)));
                }
                return None;
            }
            Some(_) => return None,
            // No longer cached: the request that held the lock found it refused by the KMS
            // (or too old) and dropped it. It must not come back as a stale key, even if
            // the KMS is found unavailable from here on: the ordinary miss path decides.
            None => return None,
        }
        if let Some(source) = self.serve(&stale, now) {
            return Some(Ok((stale, source)));
        }
        if !self.may_serve_stale(&stale, now) {
            // Aged out while this request waited (another one's KMS probe took long): refused
            // here, and audited as the miss path audits it, once, by whoever removes it.
            if self.forget(tenant, version, &stale)
                && let Err(e) = self.audit_stale_expiry(caller, tenant, &stale, now).await
            {
                return Some(Err(e));
            }
            return None;
        }
        // Not through a view an invalidation (a shred) has overtaken: the KMS would unwrap,
        // and the log record, a key of a tenant that may be gone.
        if inner.generations.current(view.shard) != view.generation
            && let Err(e) = self.recheck_after_invalidation(tenant, version).await
        {
            return Some(Err(e));
        }
        // A record refused here (destroyed, root key not configured) fails without a KMS call,
        // so it must not claim the outage's one retry and hold every other key off the KMS.
        let may_call = match self.refuse_without_kms(tenant, record) {
            Err(_) => true,
            Ok(wrapped) => {
                // The backend a refresh asks is the record's now (a root rotation may have
                // moved it since this key was unwrapped): its outage state is the key's.
                if let Some(index) = inner.kms.backend_for(&wrapped.root_key_ref) {
                    stale.set_kms_backend(index);
                }
                self.backend_of_key(&stale).0.may_call(now)
            }
        };
        if may_call {
            let result = self.unwrap_version(tenant, record).await;
            if let Err(e) = self.audit_unwrap(caller, tenant, record, &result).await {
                return Some(Err(e));
            }
            match result {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    if inner.generations.current(view.shard) == view.generation {
                        inner
                            .keys
                            .insert((tenant.clone(), version), Arc::clone(&fresh));
                    }
                    // Checked again after the insert: an invalidation (shred, rotation, …) that
                    // ran between the check and the insert must not leave the key cached, nor
                    // may this operation use it before the tenant is read again.
                    if inner.generations.current(view.shard) != view.generation {
                        inner
                            .keys
                            .remove_if(&KeyRef(tenant, version), |k| Arc::ptr_eq(k, &fresh));
                        self.forget(tenant, version, &stale);
                        if let Err(e) = self.recheck_after_invalidation(tenant, version).await {
                            return Some(Err(e));
                        }
                    }
                    return Some(Ok((fresh, KeySource::Kms)));
                }
                Err(e) if !e.is_kms_unavailable() => {
                    // A refusal (revoked or disabled key, denied, invalid data): never stale.
                    self.forget(tenant, version, &stale);
                    return Some(Err(e));
                }
                Err(_) => {}
            }
        }
        // The KMS is unavailable: keep the key in service if it is young enough (checked
        // now, after the attempt), auditing the decision before it takes effect.
        let now = Instant::now_without_cache_update();
        let (outage, backend) = self.backend_of_key(&stale);
        let decision = if self.may_serve_stale(&stale, now) {
            Ok(())
        } else {
            Err(outage.error(backend))
        };
        if let Err(e) = self
            .audit_stale_decision(caller, tenant, version, &decision)
            .await
        {
            return Some(Err(e));
        }
        Some(match decision {
            Ok(()) => {
                stale.degrade_until(outage.next_retry(now));
                stale.uses.fetch_add(1, Ordering::Relaxed);
                Ok((stale, KeySource::Stale))
            }
            Err(e) => {
                self.forget(tenant, version, &stale);
                Err(e)
            }
        })
    }

    /// Audits a degraded-mode decision: `Ok` = a stale key kept in service, an error = one
    /// refused (too old).
    pub(super) async fn audit_stale_decision(
        &self,
        caller: &Caller,
        tenant: &crate::context::TenantId,
        version: u32,
        decision: &Result<(), Error>,
    ) -> Result<(), Error> {
        if self.inner.audit.is_none() {
            return Ok(());
        }
        let meta = OpMeta {
            key_version: Some(version),
            key_source: decision.is_ok().then_some(KeySource::Stale),
            from_key_version: None,
        };
        let event = Self::event(
            caller,
            Action::ServeStaleKey,
            Some(tenant),
            None,
            &meta,
            outcome_of(decision),
        );
        self.append(std::slice::from_ref(&event)).await
    }

    /// During an outage, a cached key that has just become too old to serve stale is
    /// refused: that decision is audited once, as the key leaves the cache.
    pub(super) async fn audit_stale_expiry(
        &self,
        caller: &Caller,
        tenant: &crate::context::TenantId,
        key: &VersionKey,
        now: Instant,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let aged_out = now.duration_since(key.loaded_at) > inner.max_age;
        let (outage, backend) = self.backend_of_key(key);
        if inner.cache.max_stale.is_zero() || !aged_out || !outage.is_active() {
            return Ok(());
        }
        let refused = Err(outage.error(backend));
        self.audit_stale_decision(caller, tenant, key.version(), &refused)
            .await
    }

    /// Drops `key` from the cache if it is still the cached one; whether it was.
    fn forget(
        &self,
        tenant: &crate::context::TenantId,
        version: u32,
        key: &Arc<VersionKey>,
    ) -> bool {
        // A tenant view's hot-key memo may still hold this key: past its TTL it serves only
        // while degraded, which ends here.
        key.degrade_until(Instant::from_ticks(0));
        self.inner
            .keys
            .remove_if(&KeyRef(tenant, version), |k| Arc::ptr_eq(k, key))
            .is_some()
    }
}
