//! The keyring's cache of tenant metadata ([`TenantView`]s), which marks every view that
//! leaves it as superseded.
//!
//! A view is used after it was taken from the cache: by the operation that took it, by a
//! batch for its following items (`BatchView`) and, while anything keeps it alive, by a
//! [`super::TenantKeyring`] that remembers it. A view leaves the cache when it is invalidated
//! (the generation counters already refuse it then), when it expires, when it is evicted for
//! space, and when a fresher read of the store replaces it — an unknown newer key version, a
//! search query's refresh — without any invalidation: for instance a read that found the
//! tenant shredded or its minimum version raised by another process. A superseded view
//! serves no more fields ([`super::Keyring::view_serves_fields`]): what the keyring has
//! learned from the store holds for every holder of an older view at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};

use super::TenantView;
use crate::context::TenantId;
use crate::error::Error;

/// Marks the views the cache evicts for space as superseded.
#[derive(Clone, Copy, Default)]
struct SupersedeOnEvict;

impl Lifecycle<TenantId, Arc<TenantView>> for SupersedeOnEvict {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _: &mut Self::RequestState, _: TenantId, view: Arc<TenantView>) {
        view.supersede();
    }
}

/// The tenants' cached metadata (see the module docs). Every way out marks the view, and so
/// does a load whose view could not get in (an invalidation removed its placeholder).
pub(super) struct TenantViews {
    cache: quick_cache::sync::Cache<
        TenantId,
        Arc<TenantView>,
        UnitWeighter,
        DefaultHashBuilder,
        SupersedeOnEvict,
    >,
}

impl TenantViews {
    /// A cache of about `capacity` tenants.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            cache: quick_cache::sync::Cache::with(
                capacity,
                u64::try_from(capacity).unwrap_or(u64::MAX),
                UnitWeighter,
                DefaultHashBuilder::default(),
                SupersedeOnEvict,
            ),
        }
    }

    /// The cached view of `tenant`, if any (not checked for currency).
    pub(super) fn get(&self, tenant: &TenantId) -> Option<Arc<TenantView>> {
        self.cache.get(tenant)
    }

    /// The cached view of `tenant`, or the one `load` returns, cached (one load at a time per
    /// tenant, the others wait for it). A loaded view that could not be cached — an
    /// invalidation removed the load's placeholder meanwhile — is returned superseded: it
    /// serves the call that loaded it (and its waiters) through the slow path, and no fast path.
    pub(super) async fn get_or_load(
        &self,
        tenant: &TenantId,
        load: impl Future<Output = Result<Arc<TenantView>, Error>>,
    ) -> Result<Arc<TenantView>, Error> {
        match self.cache.get_value_or_guard_async(tenant).await {
            Ok(view) => Ok(view),
            Err(placeholder) => {
                let view = load.await?;
                if let Err(rejected) = placeholder.insert(Arc::clone(&view)) {
                    rejected.supersede();
                }
                Ok(view)
            }
        }
    }

    /// Drops the cached view of `tenant`.
    pub(super) fn remove(&self, tenant: &TenantId) {
        if let Some((_, view)) = self.cache.remove(tenant) {
            view.supersede();
        }
    }

    /// Drops the cached view of `tenant` if it is `view` (and not a newer one).
    pub(super) fn remove_if_same(&self, tenant: &TenantId, view: &Arc<TenantView>) {
        if let Some((_, view)) = self.cache.remove_if(tenant, |v| Arc::ptr_eq(v, view)) {
            view.supersede();
        }
    }

    /// Keeps the views for which `keep` is true.
    pub(super) fn retain(&self, keep: impl Fn(&TenantView) -> bool) {
        self.cache.retain(|_, view| {
            let kept = keep(view);
            if !kept {
                view.supersede();
            }
            kept
        });
    }

    /// Drops every cached view.
    pub(super) fn clear(&self) {
        self.retain(|_| false);
    }
}

impl TenantView {
    /// Marks it as no longer the keyring's view of its tenant (see the module docs).
    pub(super) fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    /// Whether it left the keyring's cache.
    pub(super) fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }
}
