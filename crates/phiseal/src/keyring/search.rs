//! The keyring API of searchable fields (`crate::search`, `docs/SEARCH.md`): deterministic
//! encryption and blind indexes. Writes use the tenant's primary key version; queries return
//! one value per *live* key version (every version at or above the minimum decryption version
//! that is not destroyed), primary first, so that values written before a rotation are still
//! found until they are rewrapped or re-indexed.
//!
//! Every call is audited like a field operation (actor, action, tenant, field, key version,
//! key source, outcome): `encrypt_deterministic` and `blind_index` write one record; a query
//! writes one record per key version it computed a value under (`deterministic_query`,
//! `blind_index_query`), in one append. A query that fails under any live version fails as a
//! whole: a partial list would silently miss rows.

use std::sync::atomic::Ordering;

use coarsetime::Instant;

use super::{
    Caller, FieldOutcome, Keyring, MIN_REFRESH_AGE, OpMeta, STALE_RETRY_INTERVAL, TenantView,
    primary_kept_changing,
};
use crate::audit::Action;
use crate::context::EncryptionContext;
use crate::error::Error;
use crate::field::VersionKey;
use crate::search::{BlindIndexSpec, SearchTerm, record_refused};
use crate::store::{KeyState, TenantRecord};

/// The live key versions of a tenant, primary first, then the others newest first.
fn live_versions(record: &TenantRecord) -> Result<Vec<u32>, Error> {
    let destroyed = || Error::KeyDestroyed {
        tenant: record.tenant.clone(),
    };
    if record.shredded_at.is_some() {
        return Err(destroyed());
    }
    let primary = record.primary().ok_or_else(destroyed)?.version;
    let mut older: Vec<u32> = record
        .versions
        .iter()
        .filter(|v| {
            v.version != primary
                && v.version >= record.min_decrypt_version
                // (A live version without its wrapped key is not skipped: the query then fails
                // on it as a whole, rather than answer without that version's term.)
                && v.state != KeyState::Destroyed
        })
        .map(|v| v.version)
        .collect();
    older.sort_unstable_by(|a, b| b.cmp(a));
    let mut versions = Vec::with_capacity(older.len() + 1);
    versions.push(primary);
    versions.extend(older);
    Ok(versions)
}

impl Keyring {
    /// The tenant's metadata: the cached view without awaiting when it is fresh (the per-field
    /// fast path), else [`Keyring::tenant_view`].
    async fn search_view(
        &self,
        context: &EncryptionContext,
        now: Instant,
    ) -> Result<std::sync::Arc<TenantView>, Error> {
        match self.cached_view(context.tenant(), now) {
            Some(view) => Ok(view),
            None => self.tenant_view(context.tenant(), now).await,
        }
    }

    /// The tenant's metadata for a query: like [`Keyring::search_view`], but a cached view
    /// older than `MIN_REFRESH_AGE` is read again from the key store first. Another process
    /// may have rotated the tenant and written under the new primary; a term list without
    /// that version would silently miss those rows (and invite duplicates) for up to
    /// `metadata_ttl`. If the store is unavailable, the cached view serves (within
    /// `metadata_ttl`), as for every other operation during a store outage, and queries stop
    /// trying for [`STALE_RETRY_INTERVAL`] (each would otherwise wait for the store's time
    /// limit first). Any other store failure fails the query.
    async fn query_view(
        &self,
        context: &EncryptionContext,
        now: Instant,
    ) -> Result<std::sync::Arc<TenantView>, Error> {
        let tenant = context.tenant();
        let Some(cached) = self.cached_view(tenant, now) else {
            return self.tenant_view(tenant, now).await;
        };
        let paused = &self.inner.query_refresh_paused_until;
        if now.duration_since(cached.fetched_at) < MIN_REFRESH_AGE
            || now.as_ticks() < paused.load(Ordering::Relaxed)
        {
            return Ok(cached);
        }
        match self.load_view(tenant).await {
            Ok(fresh) => {
                // Replace the cached view only with one loaded after the last invalidation,
                // and check again once inserted: an invalidation between the check and the
                // insert (a shred) must not leave the old record cached.
                let tenants = &self.inner.tenants;
                if self.view_is_current(&fresh, now) {
                    // (A view another task cached meanwhile is kept — its read overlapped this
                    // one —, and this query uses the fresh one.)
                    tenants.remove_if_same(tenant, &cached);
                    let inserted = std::sync::Arc::clone(&fresh);
                    tenants.get_or_load(tenant, async { Ok(inserted) }).await?;
                    if !self.view_is_current(&fresh, now) {
                        tenants.remove_if_same(tenant, &fresh);
                    }
                }
                Ok(fresh)
            }
            // An outage of the store (every tenant's reads fail alike): serve the cached view
            // and pause the refreshes. Any other failure (a record that fails its checks) is
            // this tenant's, and the query fails rather than answer from a view it could not
            // refresh.
            Err(Error::Store { source, .. })
                if source.kind() == crate::error::BackendErrorKind::Unavailable =>
            {
                let retry = Instant::now_without_cache_update()
                    .saturating_add(STALE_RETRY_INTERVAL.into())
                    .as_ticks();
                paused.store(retry, Ordering::Relaxed);
                Ok(cached)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `op` with key version `version` of the view's tenant: from the view's hot keys
    /// when fresh, else through the key cache and the KMS (audited unwrap).
    async fn with_version_key<T>(
        &self,
        caller: &Caller,
        view: &TenantView,
        version: u32,
        now: Instant,
        op: impl Fn(&VersionKey) -> Result<T, Error>,
    ) -> FieldOutcome<T> {
        let (result, meta) = self
            .with_version_key_as(caller, view, version, false, now, op)
            .await;
        let result = result.and_then(|done| {
            // (Only a `primary` use gives way to a newer version.)
            done.ok_or_else(|| Error::KeyVersionNotFound {
                tenant: view.record.tenant.clone(),
                version,
            })
        });
        (result, meta)
    }

    /// [`Keyring::with_version_key`]; with `primary`, `Ok(None)` when a rotation made another
    /// version primary while the key was looked up (see `Keyring::use_key_as`).
    async fn with_version_key_as<T>(
        &self,
        caller: &Caller,
        view: &TenantView,
        version: u32,
        primary: bool,
        now: Instant,
        op: impl Fn(&VersionKey) -> Result<T, Error>,
    ) -> FieldOutcome<Option<T>> {
        let mut meta = OpMeta {
            key_version: Some(version),
            key_source: None,
            from_key_version: None,
        };
        if let Some((result, source)) = self.with_cached_key(view, version, now, &op) {
            meta.key_source = Some(source);
            return (result.map(Some), meta);
        }
        match self.version_key(caller, view, version, now).await {
            Ok((key, source)) => {
                view.remember(&key);
                meta.key_source = Some(source);
                let result = self.use_key_as(view, &key, primary, || op(&key)).await;
                (result.and_then(|r| r.transpose()), meta)
            }
            Err(e) => (Err(e), meta),
        }
    }

    /// Runs `op` under the primary key version of the context's tenant.
    async fn with_primary_key<T>(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        op: impl Fn(&VersionKey) -> Result<T, Error>,
    ) -> FieldOutcome<T> {
        if context.record().is_some() {
            return (Err(record_refused()), OpMeta::default());
        }
        let now = Instant::now_without_cache_update();
        let mut meta = OpMeta::default();
        // Again with the new primary if a rotation overtook the lookup (twice at most).
        for _ in 0..3 {
            // (A failed retry is not recorded with the overtaken attempt's key.)
            meta = OpMeta::default();
            let view = match self.search_view(context, now).await {
                Ok(view) => view,
                Err(e) => return (Err(e), meta),
            };
            let primary = match (view.record.shredded_at, view.record.primary()) {
                (None, Some(primary)) => primary.version,
                _ => {
                    let e = Error::KeyDestroyed {
                        tenant: context.tenant().clone(),
                    };
                    return (Err(e), meta);
                }
            };
            let (result, used) = self
                .with_version_key_as(caller, &view, primary, true, now, &op)
                .await;
            meta = used;
            match result {
                Ok(Some(done)) => return (Ok(done), meta),
                Ok(None) => continue,
                Err(e) => return (Err(e), meta),
            }
        }
        (Err(primary_kept_changing(&*self.inner.store)), meta)
    }

    /// Runs `op` under every live key version, primary first; audits one record per version
    /// tried (or one without a version if none was), in one append.
    async fn with_live_keys<T>(
        &self,
        caller: &Caller,
        action: Action,
        context: &EncryptionContext,
        op: impl Fn(&VersionKey) -> Result<T, Error>,
    ) -> Result<Vec<(u32, T)>, Error> {
        let now = Instant::now_without_cache_update();
        let setup = async {
            if context.record().is_some() {
                return Err(record_refused());
            }
            let view = self.query_view(context, now).await?;
            let versions = live_versions(&view.record)?;
            Ok((view, versions))
        }
        .await;
        let (view, versions) = match setup {
            Ok(ok) => ok,
            Err(e) => {
                return self
                    .finish(caller, action, context, (Err(e), OpMeta::default()))
                    .await;
            }
        };
        let mut outcomes: Vec<FieldOutcome<T>> = Vec::with_capacity(versions.len());
        for version in versions {
            // The clock read again per version: the previous ones may have waited on the KMS,
            // and a key's TTL is checked against this time.
            let now = Instant::now_without_cache_update();
            let outcome = self
                .with_version_key(caller, &view, version, now, &op)
                .await;
            let failed = outcome.0.is_err();
            outcomes.push(outcome);
            if failed {
                break;
            }
        }
        self.audit_batch(caller, action, std::iter::repeat(context), &outcomes)
            .await?;
        let mut values = Vec::with_capacity(outcomes.len());
        for (result, meta) in outcomes {
            let version = meta.key_version.unwrap_or_default();
            values.push((version, result?));
        }
        Ok(values)
    }

    /// Encrypts one field deterministically (AES-256-SIV, algorithm `0x03`) under the tenant's
    /// primary key version: the same tenant, field, key version and plaintext always give the
    /// same ciphertext, so the column supports equality lookups (`WHERE col IN (…)` with
    /// [`Keyring::deterministic_query`]). It reveals which rows are equal (`docs/SEARCH.md`).
    /// The context must have **no record id** ([`Error::InvalidInput`] otherwise).
    /// [`Keyring::decrypt`] decrypts it and [`Keyring::rewrap`] keeps it deterministic. Audited
    /// (`encrypt_deterministic`).
    pub async fn encrypt_deterministic(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let outcome = self
            .encrypt_deterministic_one(caller, context, plaintext)
            .await;
        self.finish(caller, Action::EncryptDeterministic, context, outcome)
            .await
    }

    /// [`Keyring::encrypt_deterministic`] without its audit record (also used by rewrap).
    pub(super) async fn encrypt_deterministic_one(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> FieldOutcome<Vec<u8>> {
        self.with_primary_key(caller, context, |key| {
            key.encrypt_deterministic(context, plaintext)
        })
        .await
    }

    /// The deterministic ciphertexts of `plaintext` under every live key version of the
    /// tenant (primary first), each tagged with its version: the values to look up in a
    /// column written by [`Keyring::encrypt_deterministic`], before and after a rotation. The
    /// context must have no record id. Fails as a whole if any live version is unavailable.
    /// Audited (`deterministic_query`, one record per version).
    pub async fn deterministic_query(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<SearchTerm>, Error> {
        let values = self
            .with_live_keys(caller, Action::DeterministicQuery, context, |key| {
                key.encrypt_deterministic(context, plaintext)
            })
            .await?;
        Ok(values
            .into_iter()
            .map(|(key_version, value)| SearchTerm { key_version, value })
            .collect())
    }

    /// The blind index of `value` for the context's field under the tenant's primary key
    /// version: `HMAC-SHA256` of the value normalised per `spec`, truncated to `spec.bits()`
    /// (`docs/FORMAT.md` §9). Store it next to the (randomly) encrypted field and search with
    /// [`Keyring::blind_index_query`]. The context must have no record id. Audited
    /// (`blind_index`).
    pub async fn blind_index(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        value: &[u8],
        spec: &BlindIndexSpec,
    ) -> Result<SearchTerm, Error> {
        let outcome = self
            .with_primary_key(caller, context, |key| {
                let index = key.search_keys().blind_index(
                    key.provider(),
                    key.tenant_key(),
                    context,
                    spec,
                    value,
                )?;
                Ok(SearchTerm {
                    key_version: key.version(),
                    value: index,
                })
            })
            .await;
        self.finish(caller, Action::BlindIndex, context, outcome)
            .await
    }

    /// The blind indexes of `value` under every live key version of the tenant (primary
    /// first), each tagged with its version: what to look up in a column written by
    /// [`Keyring::blind_index`] with the same `spec`. Fails as a whole if any live version is
    /// unavailable. Audited (`blind_index_query`, one record per version).
    pub async fn blind_index_query(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        value: &[u8],
        spec: &BlindIndexSpec,
    ) -> Result<Vec<SearchTerm>, Error> {
        let values = self
            .with_live_keys(caller, Action::BlindIndexQuery, context, |key| {
                key.search_keys().blind_index(
                    key.provider(),
                    key.tenant_key(),
                    context,
                    spec,
                    value,
                )
            })
            .await?;
        Ok(values
            .into_iter()
            .map(|(key_version, value)| SearchTerm { key_version, value })
            .collect())
    }
}
