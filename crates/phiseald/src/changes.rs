//! Keeps a daemon's caches in step with other daemons on a shared PostgreSQL key store, from
//! its change notifications.
//!
//! A notification (rotation, minimum version, shred committed by another daemon) drops the
//! tenant's cached *metadata* at once, so the next operation on it reads the store and
//! refuses what the change no longer allows; after the listener (re)connects — notifications
//! may have been missed — every tenant's. The unwrapped keys stay cached: anyone who can
//! connect to the database can send notifications on the channel (PostgreSQL does not
//! restrict `NOTIFY`), and they must not be able to empty the key cache — a KMS call for
//! every tenant, and during a KMS outage the loss of the keys that serve through it. A
//! background task then reads the changed tenants and drops the keys their records no
//! longer allow (a shred, destroyed versions, a raised minimum version) and stops the
//! streams of shredded tenants. Its work is coalesced: a tenant waits at most once, and a
//! pass over every tenant with cached keys runs at most once per [`FULL_RECHECK_SPACING`].
//! While the listener is disconnected, `cache.metadata_ttl` bounds staleness.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use phiseal::{Error, Keyring, TenantId};
use phiseal_store_postgres::{Change, ChangeWatcher, PostgresKeyStore};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::DaemonError;

/// Tenants waiting to be read again; beyond this many, one pass over every tenant replaces
/// them (a flood of notifications naming tenants this daemon may not even know).
const MAX_PENDING_TENANTS: usize = 1024;
/// Least time between two passes over every tenant with cached keys.
const FULL_RECHECK_SPACING: Duration = Duration::from_secs(1);

/// The listener and the task that re-reads changed tenants; both stop when it is dropped.
#[derive(Debug)]
pub(crate) struct SharedStoreWatch {
    _watcher: ChangeWatcher,
    rechecks: JoinHandle<()>,
}

impl Drop for SharedStoreWatch {
    fn drop(&mut self) {
        self.rechecks.abort();
    }
}

/// What the re-reading task still has to do.
#[derive(Default)]
struct Pending {
    tenants: HashSet<TenantId>,
    /// Every tenant with cached keys or running streams.
    all: bool,
}

impl Pending {
    fn add(&mut self, change: Change) {
        match change {
            Change::Tenant(tenant) if !self.all => {
                self.tenants.insert(tenant);
                if self.tenants.len() > MAX_PENDING_TENANTS {
                    self.all = true;
                    self.tenants.clear();
                }
            }
            Change::Tenant(_) => {}
            _ => {
                self.all = true;
                self.tenants.clear();
            }
        }
    }
}

/// The pending work; it is a plain set and flag, consistent whatever a panic interrupted.
fn lock(pending: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts listening to `store`'s changes for `keyring` (see the module docs).
pub(crate) fn watch_shared_store(
    store: &PostgresKeyStore,
    keyring: &Keyring,
) -> Result<SharedStoreWatch, DaemonError> {
    let pending = Arc::new(Mutex::new(Pending::default()));
    let wake = Arc::new(Notify::new());
    let rechecks = tokio::spawn(recheck_changed(
        keyring.clone(),
        Arc::clone(&pending),
        Arc::clone(&wake),
    ));
    let keyring = keyring.clone();
    let watcher = store.watch_changes(move |change| {
        keyring.forget_metadata(match &change {
            Change::Tenant(tenant) => Some(tenant),
            _ => None,
        });
        lock(&pending).add(change);
        wake.notify_one();
    });
    match watcher {
        Ok(watcher) => Ok(SharedStoreWatch {
            _watcher: watcher,
            rechecks,
        }),
        Err(e) => {
            rechecks.abort();
            Err(e.into())
        }
    }
}

/// The re-reading task: reads what [`Pending`] names, whenever there is something.
async fn recheck_changed(keyring: Keyring, pending: Arc<Mutex<Pending>>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Pending { tenants, all } = std::mem::take(&mut *lock(&pending));
        if all {
            report(keyring.recheck_tenants(None).await);
            tokio::time::sleep(FULL_RECHECK_SPACING).await;
            continue;
        }
        for tenant in &tenants {
            report(keyring.recheck_tenants(Some(tenant)).await);
        }
    }
}

fn report(result: Result<(), Error>) {
    match result {
        // A notification naming a tenant the store does not hold (not one of ours).
        Ok(()) | Err(Error::TenantNotFound { .. }) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "could not re-read tenants another daemon changed: keys their change refused stay \
             cached, unused (every operation reads its tenant first, and drops them then), \
             until that read or their TTL"
        ),
    }
}
