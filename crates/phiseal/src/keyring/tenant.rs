//! [`TenantKeyring`]: the keyring's field operations for one tenant, without the per-call
//! tenant lookup.
//!
//! [`Keyring::encrypt`] and [`Keyring::decrypt`] find the tenant's cached metadata in a
//! concurrent hash map on every call. A service that encrypts many fields of one tenant can
//! hold a `TenantKeyring` instead (as a Tink primitive is held for its keyset): it remembers,
//! weakly, the cached metadata it last used, and checks it on every call as the keyring
//! checks what it finds in its map — metadata TTL, invalidations (rotation, minimum version,
//! shred, [`Keyring::invalidate_tenant`]), shredding, key TTL and max uses — and also that the
//! keyring has not dropped or replaced it since (`views`: a fresher read of the store, an
//! eviction). Results, errors and audit records are those of the keyring's own calls.

use std::sync::{Arc, RwLock, Weak};

use coarsetime::Instant;

use super::{Caller, Keyring, TenantView};
use crate::context::{EncryptionContext, TenantId};
use crate::error::Error;
use crate::format;
use crate::secret::Plaintext;

/// The field operations of a [`Keyring`] for one tenant, sparing each call the lookup of the
/// tenant's cached metadata (see [`Keyring::tenant`]). Cheap to create; share one per tenant
/// (it is `Send + Sync`).
///
/// It never keeps a tenant's keys or metadata alive (it holds the keyring's cached metadata
/// only weakly), and starts no call with metadata the keyring has dropped or replaced, even
/// while an operation in flight keeps it alive (a call already past that check finishes, as a
/// call of the keyring's own does). A context of another tenant is served through the
/// keyring's ordinary path.
pub struct TenantKeyring {
    keyring: Keyring,
    tenant: TenantId,
    /// The keyring's cached metadata of `tenant` as last seen; refreshed after each call
    /// that could not use it.
    view: RwLock<Weak<TenantView>>,
}

impl std::fmt::Debug for TenantKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKeyring")
            .field("tenant", &self.tenant)
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// This keyring's field operations for `tenant`, for a caller that encrypts or decrypts
    /// many fields of one tenant: each call skips the lookup of the tenant's cached metadata
    /// but makes every other check of [`Keyring::encrypt`] and [`Keyring::decrypt`]. Does no
    /// I/O; a tenant that does not exist fails at the first call.
    pub fn tenant(&self, tenant: &TenantId) -> TenantKeyring {
        TenantKeyring {
            keyring: self.clone(),
            tenant: tenant.clone(),
            view: RwLock::new(Weak::new()),
        }
    }
}

impl TenantKeyring {
    /// The tenant this handle serves without a lookup.
    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant
    }

    /// The keyring it belongs to.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Encrypts one field under the tenant's primary key version: [`Keyring::encrypt`].
    pub async fn encrypt(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        if *context.tenant() != self.tenant {
            return self.keyring.encrypt(caller, context, plaintext).await;
        }
        let now = Instant::now_without_cache_update();
        let cached = self
            .usable_view(now)
            .and_then(|view| self.keyring.encrypt_in_view(&view, context, plaintext, now));
        match cached {
            Some(outcome) if self.keyring.inner.audit.is_none() => outcome.0,
            cached => {
                let missed = cached.is_none();
                let result = self
                    .keyring
                    .complete_encrypt(caller, context, plaintext, now, cached)
                    .await;
                if missed {
                    self.refresh();
                }
                result
            }
        }
    }

    /// Decrypts one field: [`Keyring::decrypt`]. The plaintext is zeroized when dropped.
    pub async fn decrypt(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
    ) -> Result<Plaintext, Error> {
        if *context.tenant() != self.tenant {
            return self.keyring.decrypt(caller, context, ciphertext).await;
        }
        let now = Instant::now_without_cache_update();
        let cached = format::parse(ciphertext).ok().and_then(|parsed| {
            let view = self.usable_view(now)?;
            self.keyring.decrypt_in_view(&view, &parsed, context, now)
        });
        match cached {
            Some(outcome) if self.keyring.inner.audit.is_none() => outcome.0,
            cached => {
                let missed = cached.is_none();
                let result = self
                    .keyring
                    .complete_decrypt(caller, context, ciphertext, now, cached)
                    .await;
                if missed {
                    self.refresh();
                }
                result
            }
        }
    }

    /// The remembered metadata, if it is still alive and the keyring's fast path would use
    /// it at `now`.
    fn usable_view(&self, now: Instant) -> Option<Arc<TenantView>> {
        let view = self.remembered()?;
        self.keyring.view_serves_fields(&view, now).then_some(view)
    }

    /// The remembered metadata, if anything still keeps it alive.
    fn remembered(&self) -> Option<Arc<TenantView>> {
        // The slot guards no invariant, so a panic while it was held leaves nothing to fear.
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .upgrade()
    }

    /// Whether it still reaches the keyring's cached metadata (for `crate::testkit`).
    #[cfg(feature = "testkit")]
    pub(crate) fn remembers_metadata(&self) -> bool {
        self.remembered().is_some()
    }

    /// Keeps what it remembers alive, as an operation in flight would (for `crate::testkit`).
    #[cfg(feature = "testkit")]
    pub(crate) fn hold_metadata(&self) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(self.remembered()?))
    }

    /// Remembers the keyring's cached metadata of the tenant (after a call that took the
    /// slow path and may have loaded it), or forgets it if there is none.
    fn refresh(&self) {
        let view = self
            .keyring
            .inner
            .tenants
            .get(&self.tenant)
            .map_or_else(Weak::new, |view| Arc::downgrade(&view));
        *self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
    }
}
