//! Root-key rotation and provider migration: every stored tenant key version that is not
//! wrapped under the KMS's current root key is unwrapped (by whichever backend holds its root
//! key, see [`crate::kms::KmsChain`]), checked against its key-check MAC, wrapped under the
//! current root key, verified by unwrapping the new bytes, and written back with a
//! compare-and-set on the old bytes. No field ciphertext changes: the tenant keys stay the
//! same, only their wrapping does.
//!
//! The run is idempotent and resumable: a version already under the current root key is
//! skipped, so running again after a crash continues where the crash left off, and a version
//! changed concurrently (shredded, moved by another run) is reported and left alone. Each
//! step is audited before and after it (`rewrap_root_key`, result `attempt`, then `ok` or the
//! error kind), so a step that cannot be audited does not happen.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Keyring, OpMeta, binding_mismatch, key_binding, kms_error, outcome_of, store_error};
use crate::audit::{Action, Outcome};
use crate::context::TenantId;
use crate::crypto::ct_eq;
use crate::error::{BackendErrorKind, Error};
use crate::kms::WrappedKey;
use crate::store::KeyRecord;

use super::Caller;

/// What a root-key run reports as it goes (for a progress bar).
#[derive(Debug)]
#[non_exhaustive]
pub enum RootRewrapEvent<'a> {
    /// The store was scanned: this many key versions are not under the current root key.
    Planned {
        /// Versions to re-wrap.
        to_rewrap: u64,
    },
    /// One version was re-wrapped.
    Rewrapped {
        /// Its tenant.
        tenant: &'a TenantId,
        /// Its version.
        version: u32,
    },
    /// One version could not be re-wrapped (it keeps its old wrapping).
    Failed {
        /// Its tenant.
        tenant: &'a TenantId,
        /// Its version.
        version: u32,
        /// Why.
        error: &'a Error,
    },
}

/// A version that could not be re-wrapped.
#[derive(Debug)]
pub struct RootRewrapFailure {
    /// Its tenant.
    pub tenant: TenantId,
    /// Its version.
    pub version: u32,
    /// Why (names the backend and the cause; never key bytes).
    pub error: Error,
}

/// The result of [`Keyring::rewrap_root_keys`].
#[derive(Debug)]
pub struct RootRewrapReport {
    /// The root-key reference every version was moved to.
    pub target: String,
    /// Versions re-wrapped by this run.
    pub rewrapped: u64,
    /// Versions that already were under `target`.
    pub already_current: u64,
    /// Versions without wrapped bytes (destroyed by a shred): nothing to move.
    pub destroyed: u64,
    /// Versions that failed; they keep their old wrapping. Running again retries them.
    pub failed: Vec<RootRewrapFailure>,
    /// After the run, from a fresh scan of the store: how many versions each root-key
    /// reference other than `target` still wraps. Empty means the old root keys are no
    /// longer referenced by this store.
    pub still_referenced: BTreeMap<String, u64>,
}

/// The result of [`Keyring::root_key_usage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootKeyUsage {
    /// The root-key reference new wraps use.
    pub current: String,
    /// Stored key versions wrapped under it.
    pub under_current: u64,
    /// Stored key versions wrapped under each other root key (empty: none left).
    pub others: BTreeMap<String, u64>,
}

impl Keyring {
    /// Root-key rotation and provider migration (see the module documentation): moves every
    /// stored tenant key version to the KMS's current root key. `on_event` sees the plan and
    /// each step.
    ///
    /// Fails as a whole only if the store cannot be listed or read, the current root key
    /// cannot be determined, or an audit record cannot be written; a version that fails is
    /// reported in [`RootRewrapReport::failed`] and the run goes on.
    pub async fn rewrap_root_keys(
        &self,
        caller: &Caller,
        on_event: &mut (dyn FnMut(RootRewrapEvent<'_>) + Send),
    ) -> Result<RootRewrapReport, Error> {
        let kms = &*self.inner.kms;
        let target = kms
            .current_root_key_ref()
            .await
            .map_err(|source| kms_error(kms, source))?;
        let tenants = self.list_tenants().await?;
        let mut report = RootRewrapReport {
            target: target.clone(),
            rewrapped: 0,
            already_current: 0,
            destroyed: 0,
            failed: Vec::new(),
            still_referenced: BTreeMap::new(),
        };

        // Plan: count the work (the store may change meanwhile; each step re-checks).
        let (to_rewrap, _) = self.scan(&tenants, &target).await?;
        let target_ref: Arc<str> = Arc::from(target.as_str());
        on_event(RootRewrapEvent::Planned {
            to_rewrap: to_rewrap.values().sum(),
        });

        for tenant in &tenants {
            let Some(record) = self.load_record(tenant).await? else {
                continue;
            };
            for version in &record.versions {
                let Some(wrapped) = &version.wrapped else {
                    report.destroyed += 1;
                    continue;
                };
                if wrapped.root_key_ref == target {
                    report.already_current += 1;
                    continue;
                }
                let meta = OpMeta {
                    key_version: Some(version.version),
                    key_source: None,
                    from_key_version: None,
                };
                // Each record names the root key that wraps the version as of the record:
                // the source before, the target once re-wrapped (the source if it failed).
                let source: Arc<str> = Arc::from(wrapped.root_key_ref.as_str());
                let mut attempt = Self::event(
                    caller,
                    Action::RewrapRootKey,
                    Some(tenant),
                    None,
                    &meta,
                    Outcome::Attempt,
                );
                attempt.root_key = Some(Arc::clone(&source));
                self.append(std::slice::from_ref(&attempt)).await?;
                let result = self
                    .rewrap_root_version(tenant, version, wrapped, &target)
                    .await;
                let mut done = Self::event(
                    caller,
                    Action::RewrapRootKey,
                    Some(tenant),
                    None,
                    &meta,
                    outcome_of(&result),
                );
                done.root_key = Some(match result {
                    Ok(()) => Arc::clone(&target_ref),
                    Err(_) => source,
                });
                if let Err(e) = self.append(std::slice::from_ref(&done)).await {
                    return Err(super::unrecorded(Action::RewrapRootKey, tenant, e, result));
                }
                match result {
                    Ok(()) => {
                        report.rewrapped += 1;
                        on_event(RootRewrapEvent::Rewrapped {
                            tenant,
                            version: version.version,
                        });
                    }
                    Err(error) => {
                        on_event(RootRewrapEvent::Failed {
                            tenant,
                            version: version.version,
                            error: &error,
                        });
                        report.failed.push(RootRewrapFailure {
                            tenant: tenant.clone(),
                            version: version.version,
                            error,
                        });
                    }
                }
            }
        }

        let tenants = self.list_tenants().await?;
        report.still_referenced = self.scan(&tenants, &target).await?.0;
        Ok(report)
    }

    /// Which root keys the stored tenant key versions are wrapped under: a read-only survey
    /// (`phiseal root status`) before a rotation, or before retiring an old root key. Reads
    /// the key store's references only — no key material, no KMS call but asking for the
    /// current reference — and is not audited.
    pub async fn root_key_usage(&self) -> Result<RootKeyUsage, Error> {
        let kms = &*self.inner.kms;
        let current = kms
            .current_root_key_ref()
            .await
            .map_err(|source| kms_error(kms, source))?;
        let tenants = self.list_tenants().await?;
        let (others, under_current) = self.scan(&tenants, &current).await?;
        Ok(RootKeyUsage {
            current,
            under_current,
            others,
        })
    }

    /// How many versions each root-key reference other than `target` wraps, and how many
    /// are under `target`.
    async fn scan(
        &self,
        tenants: &[TenantId],
        target: &str,
    ) -> Result<(BTreeMap<String, u64>, u64), Error> {
        let mut others = BTreeMap::new();
        let mut current = 0;
        for tenant in tenants {
            let Some(record) = self.load_record(tenant).await? else {
                continue;
            };
            for wrapped in record.versions.iter().filter_map(|v| v.wrapped.as_ref()) {
                if wrapped.root_key_ref == target {
                    current += 1;
                } else {
                    *others.entry(wrapped.root_key_ref.clone()).or_insert(0) += 1;
                }
            }
        }
        Ok((others, current))
    }

    async fn load_record(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<crate::store::TenantRecord>, Error> {
        let store = &*self.inner.store;
        store
            .load_tenant(tenant)
            .await
            .map_err(|e| store_error(store, e))
    }

    /// One step: unwrap (any configured root key), check the key-check MAC, wrap under the
    /// current root key, verify the new bytes unwrap to the same key, compare-and-set.
    async fn rewrap_root_version(
        &self,
        tenant: &TenantId,
        record: &KeyRecord,
        wrapped: &WrappedKey,
        target: &str,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let kms = &*inner.kms;
        let binding = key_binding(tenant, record.version);
        // Unwrap and check exactly as a field operation would.
        let old = self.unwrap_version(tenant, record).await?;
        let key = old.tenant_key();
        let replacement = kms
            .wrap(key, &binding)
            .await
            .map_err(|source| kms_error(kms, source))?;
        if replacement.root_key_ref != target {
            return Err(kms_error(
                kms,
                crate::BackendError::new(
                    BackendErrorKind::Conflict,
                    format!(
                        "the current root key changed during the run (now '{}', was '{}'): run \
                         again",
                        replacement.root_key_ref, target
                    ),
                ),
            ));
        }
        let back = kms
            .unwrap(&replacement, &binding)
            .await
            .map_err(|source| kms_error(kms, source))?;
        if !ct_eq(back.expose(), key.expose()) {
            return Err(binding_mismatch(&binding));
        }
        let store = &*inner.store;
        store
            .replace_wrapped(tenant, record.version, wrapped, replacement)
            .await
            .map_err(|e| store_error(store, e))
    }
}
