//! Keeps a daemon's caches in step with other daemons on a shared PostgreSQL key store, from
//! its change notifications.
//!
//! A notification (rotation, minimum version, shred committed by another daemon) drops the
//! tenant's cached *metadata*, so the next operation on it reads the store and refuses what
//! the change no longer allows; after the listener (re)connects — notifications may have
//! been missed — every tenant's. The unwrapped keys stay cached: anyone who can connect to
//! the database can send notifications on the channel (PostgreSQL does not restrict
//! `NOTIFY`), and they must not be able to empty the key cache — a KMS call for every
//! tenant, and during a KMS outage the loss of the keys that serve through it. Nor may a
//! flood of them keep every cached view stale: the metadata is dropped at most once per
//! [`FORGET_SPACING`] (what arrives in between is dropped at the end of it), and every
//! tenant's at most once per [`FORGET_ALL_SPACING`], so staleness grows by that much at most. A second task then reads the changed tenants this daemon
//! holds keys or streams of, and drops the keys their records no longer allow (a shred,
//! destroyed versions, a raised minimum version, another key under the same version) and
//! stops the streams of shredded tenants: named tenants first, then — after a reconnection
//! or a notification naming no tenant — every tenant, at most once per
//! [`FULL_RECHECK_SPACING`]. While the listener is disconnected, `cache.metadata_ttl` bounds
//! staleness.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use phiseal::{Error, Keyring, TenantId};
use phiseal_store_postgres::{Change, ChangeWatcher, PostgresKeyStore};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::DaemonError;

/// Tenants waiting for their metadata to be dropped, or to be read again; beyond this many,
/// every tenant is (a flood of notifications naming tenants this daemon may not even know).
const MAX_PENDING_TENANTS: usize = 1024;
/// Least time between two drops of cached metadata caused by notifications.
const FORGET_SPACING: Duration = Duration::from_millis(20);
/// Least time between two drops of *every* tenant's cached metadata (a reconnection, or a
/// notification naming no tenant — which anyone who can connect to the database can send).
const FORGET_ALL_SPACING: Duration = Duration::from_secs(1);
/// Least time between two passes over every tenant with cached keys.
const FULL_RECHECK_SPACING: Duration = Duration::from_secs(1);

/// The listener and the tasks that apply its changes; all stop when it is dropped.
#[derive(Debug)]
pub(crate) struct SharedStoreWatch {
    _watcher: ChangeWatcher,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for SharedStoreWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Tenants named by changes, or all of them.
#[derive(Default)]
struct Changed {
    tenants: HashSet<TenantId>,
    all: bool,
}

impl Changed {
    fn add(&mut self, change: Change) {
        match change {
            Change::Tenant(tenant) => self.add_tenant(tenant),
            _ => self.all = true,
        }
    }

    /// Named tenants are kept under `all` too (they are read first), up to the cap.
    fn add_tenant(&mut self, tenant: TenantId) {
        if self.tenants.len() < MAX_PENDING_TENANTS {
            self.tenants.insert(tenant);
        } else {
            self.all = true;
        }
    }
}

/// What the two tasks still have to do.
#[derive(Default)]
struct Pending {
    /// Metadata to drop.
    forget: Changed,
    /// Tenants to read again.
    recheck: Changed,
}

/// The pending work: plain sets and flags, consistent whatever a panic interrupted.
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
    let (forget_wake, recheck_wake) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let tasks = [
        tokio::spawn(forget_changed(
            keyring.clone(),
            Arc::clone(&pending),
            Arc::clone(&forget_wake),
            Arc::clone(&recheck_wake),
        )),
        tokio::spawn(recheck_changed(
            keyring.clone(),
            Arc::clone(&pending),
            recheck_wake,
        )),
    ];
    let watcher = store.watch_changes(move |change| {
        lock(&pending).forget.add(change);
        forget_wake.notify_one();
    });
    match watcher {
        Ok(watcher) => Ok(SharedStoreWatch {
            _watcher: watcher,
            tasks,
        }),
        Err(e) => {
            for task in &tasks {
                task.abort();
            }
            Err(e.into())
        }
    }
}

/// Drops the cached metadata that changes name, at most once per [`FORGET_SPACING`], and
/// hands the tenants on to be read again.
async fn forget_changed(
    keyring: Keyring,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    recheck_wake: Arc<Notify>,
) {
    let mut last_all: Option<tokio::time::Instant> = None;
    loop {
        wake.notified().await;
        let Changed { tenants, all } = std::mem::take(&mut lock(&pending).forget);
        let all_due = all && last_all.is_none_or(|at| at.elapsed() >= FORGET_ALL_SPACING);
        if all_due {
            keyring.forget_metadata(None);
            last_all = Some(tokio::time::Instant::now());
        } else {
            for tenant in &tenants {
                keyring.forget_metadata(Some(tenant));
            }
            if all {
                // Not yet: kept, and looked at again after the spacing below.
                lock(&pending).forget.all = true;
                wake.notify_one();
            }
        }
        {
            let mut pending = lock(&pending);
            pending.recheck.all |= all_due;
            for tenant in tenants {
                pending.recheck.add_tenant(tenant);
            }
        }
        recheck_wake.notify_one();
        tokio::time::sleep(FORGET_SPACING).await;
    }
}

/// Reads the changed tenants again: the named ones first, then, if due, every tenant (at
/// most once per [`FULL_RECHECK_SPACING`]).
async fn recheck_changed(keyring: Keyring, pending: Arc<Mutex<Pending>>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Changed { tenants, all } = std::mem::take(&mut lock(&pending).recheck);
        if !tenants.is_empty() {
            let tenants: Vec<TenantId> = tenants.into_iter().collect();
            report(keyring.recheck_tenants(Some(&tenants)).await);
        }
        if all {
            report(keyring.recheck_tenants(None).await);
            tokio::time::sleep(FULL_RECHECK_SPACING).await;
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
