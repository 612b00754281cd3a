//! Cross-process cache invalidation: every committed write notifies [`CHANGES_CHANNEL`], and a
//! [`ChangeWatcher`] listens on a dedicated connection and reports each [`Change`].

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use phiseal::context::TenantId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Notification, Socket};

use crate::PostgresKeyStore;
use crate::error::{DatabaseError, PostgresStoreError};

/// The `LISTEN`/`NOTIFY` channel of a store in the default schema ([`crate::DEFAULT_SCHEMA`]):
/// every committed write that changes what a cached reader may use (create, rotation, minimum
/// version, shred, rewrap) announces its tenant id on it. See [`changes_channel`].
pub const CHANGES_CHANNEL: &str = "phiseal_key_changes";

/// The change channel of a store in `schema`: `<schema>_key_changes` ([`CHANGES_CHANNEL`] for
/// the default schema), so that deployments in different schemas of one database do not
/// receive each other's tenant ids.
pub fn changes_channel(schema: &str) -> String {
    format!("{schema}_key_changes")
}

/// The longest wait between two attempts to re-establish a lost listener connection.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(5);

/// The wait before the first reconnection attempt (doubled after each failed attempt, with
/// jitter, up to [`RECONNECT_DELAY_MAX`]).
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);

/// A session that listened at least this long counts as healthy: the backoff starts over.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// How often an otherwise idle listener checks that its connection still works (a connection
/// that dies without being closed would otherwise go unnoticed until TCP gives up).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// How long the heartbeat query (and `LISTEN`) may take before the connection is given up.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Notifications read from the connection but not yet handed to the callback.
const NOTIFICATION_BUFFER: usize = 256;

/// What another process changed, as a [`ChangeWatcher`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Change {
    /// The tenant's keys or lifecycle state changed: read it again before using what is cached
    /// about it (`phiseal::Keyring::forget_metadata`). Anyone who can connect to the database
    /// can send one.
    Tenant(TenantId),
    /// Anything may have changed (the watcher has just (re)connected, so notifications may have
    /// been missed, or a notification was not understood): read every tenant again before
    /// using what is cached about it (`phiseal::Keyring::forget_metadata(None)`).
    All,
}

impl Change {
    /// The change a notification's payload announces. Anything that is not a valid tenant id
    /// is [`Change::All`].
    fn from_payload(payload: &str) -> Self {
        TenantId::new(payload).map_or(Change::All, Change::Tenant)
    }
}

/// What the listener's dedicated connection is opened with: the store's own settings.
pub(crate) struct ListenParams {
    /// The store's change channel ([`changes_channel`]).
    pub(crate) channel: Arc<str>,
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pub(crate) target: Arc<str>,
    pub(crate) connect_timeout: Duration,
}

type Callback = Arc<dyn Fn(Change) + Send + Sync + 'static>;

/// State shared by a [`ChangeWatcher`] and its task.
struct State {
    listening: AtomicBool,
    sessions: AtomicU64,
    stopped: AtomicBool,
    /// Held while the callback runs, so that [`ChangeWatcher::stop`] can wait for a running
    /// call to end.
    gate: Mutex<()>,
}

thread_local! {
    /// The [`State`] (as an address) whose callback this thread is running, if any.
    static IN_CALLBACK: Cell<usize> = const { Cell::new(0) };
}

fn state_id(state: &Arc<State>) -> usize {
    Arc::as_ptr(state) as usize
}

/// A running listener for changes made by other processes sharing the database, started by
/// [`PostgresKeyStore::watch_changes`]. Stops when dropped (or by [`ChangeWatcher::stop`]).
#[must_use = "the watcher stops when dropped: keep it for as long as changes must be seen"]
pub struct ChangeWatcher {
    state: Arc<State>,
    task: JoinHandle<()>,
    target: Arc<str>,
}

impl std::fmt::Debug for ChangeWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeWatcher")
            .field("database", &self.target)
            .field("listening", &self.is_listening())
            .field("sessions", &self.sessions())
            .finish()
    }
}

impl ChangeWatcher {
    /// Whether the dedicated connection is up and `LISTEN` is in effect, i.e. changes by other
    /// processes are being reported within milliseconds. While `false`, only the cache's own
    /// expiry (the keyring's `metadata_ttl`) bounds how stale cached state can be.
    pub fn is_listening(&self) -> bool {
        self.state.listening.load(Ordering::SeqCst) && !self.state.stopped.load(Ordering::SeqCst)
    }

    /// How many times the watcher has started listening: 1 after the first connection, one
    /// more for each reconnection (each of which was reported as [`Change::All`]).
    pub fn sessions(&self) -> u64 {
        self.state.sessions.load(Ordering::SeqCst)
    }

    /// Stops the watcher and closes its connection. Once this returns the callback is not
    /// running and will not be called again (when called from the callback itself, that call
    /// is the last one). Idempotent; dropping the watcher does the same.
    pub fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.listening.store(false, Ordering::SeqCst);
        self.task.abort();
        if IN_CALLBACK.with(Cell::get) != state_id(&self.state) {
            // Wait for a callback that is running on another thread to return.
            drop(
                self.state
                    .gate
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }
}

impl Drop for ChangeWatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PostgresKeyStore {
    /// Starts listening for changes that any process (this one included) commits to the
    /// database, and calls `on_change` for each: [`Change::Tenant`] per committed change of a
    /// tenant, and [`Change::All`] each time the listener has (re)connected and `LISTEN` is in
    /// effect — the first time included, since changes committed before that were not
    /// reported.
    ///
    /// The listener uses a dedicated connection (not one of the pool's), opened with the
    /// store's settings and TLS. When it is lost it is re-established with jittered
    /// exponential backoff (from 100 ms up to [`RECONNECT_DELAY_MAX`]); a connection that stops
    /// answering is noticed within about 20 s by a heartbeat query.
    ///
    /// `on_change` runs on a Tokio worker thread, one call at a time: keep it short and never
    /// block in it (invalidating a cache is what it is for). A panic in it is caught and
    /// logged; the watcher goes on. It must not stop or drop *another* watcher.
    ///
    /// Needs a Tokio runtime with the time driver; outside one, fails with
    /// [`PostgresStoreError::Config`]. The watcher runs until the returned [`ChangeWatcher`]
    /// is dropped or stopped.
    pub fn watch_changes(
        &self,
        on_change: impl Fn(Change) + Send + Sync + 'static,
    ) -> Result<ChangeWatcher, PostgresStoreError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| PostgresStoreError::Config {
                reason: "watch_changes must be called within a Tokio runtime".to_owned(),
            })?;
        let state = Arc::new(State {
            listening: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            gate: Mutex::new(()),
        });
        let params = Arc::clone(&self.inner.listen);
        let target = Arc::clone(&params.target);
        let task = runtime.spawn(run(params, Arc::clone(&state), Arc::new(on_change)));
        Ok(ChangeWatcher {
            state,
            task,
            target,
        })
    }
}

/// Calls the callback unless the watcher was stopped, holding the gate while it runs.
fn deliver(state: &Arc<State>, on_change: &Callback, change: Change) {
    let _gate = state.gate.lock().unwrap_or_else(PoisonError::into_inner);
    if state.stopped.load(Ordering::SeqCst) {
        return;
    }
    let outer = IN_CALLBACK.with(|c| c.replace(state_id(state)));
    let result = catch_unwind(AssertUnwindSafe(|| on_change(change)));
    IN_CALLBACK.with(|c| c.set(outer));
    if result.is_err() {
        tracing::error!("the key-change callback panicked; the change watcher goes on");
    }
}

/// The watcher's task: one listening session after another, forever (until aborted).
async fn run(params: Arc<ListenParams>, state: Arc<State>, on_change: Callback) {
    let mut failures: u32 = 0;
    loop {
        let ended = match &params.tls {
            Some(tls) => session(&params, tls.clone(), &state, &on_change).await,
            None => session(&params, tokio_postgres::NoTls, &state, &on_change).await,
        };
        state.listening.store(false, Ordering::SeqCst);
        match ended.listened_at {
            Some(since) => {
                if since.elapsed() >= STABLE_SESSION {
                    failures = 0;
                }
                tracing::warn!(
                    database = %params.target,
                    error = %ended.error,
                    "lost the key-change listener connection; reconnecting (until then, other \
                     processes' changes are seen only when cached metadata expires)"
                );
            }
            None => tracing::warn!(
                database = %params.target,
                error = %ended.error,
                attempt = failures + 1,
                "could not start the key-change listener; retrying"
            ),
        }
        let delay = backoff(failures);
        failures = failures.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

/// The wait before reconnection attempt `failures` (0-based): exponential, capped at
/// [`RECONNECT_DELAY_MAX`], uniformly jittered over its upper half so that many daemons do not
/// reconnect in lockstep.
fn backoff(failures: u32) -> Duration {
    let ceiling = RECONNECT_DELAY_MIN
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(RECONNECT_DELAY_MAX);
    let half = ceiling / 2;
    // Randomly keyed SipHash of a counter: plenty for jitter, no extra dependency.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(failures);
    let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    half + half.mul_f64(fraction)
}

/// How a listening session ended.
struct Ended {
    /// When `LISTEN` took effect, if it did.
    listened_at: Option<Instant>,
    error: DatabaseError,
}

fn closed() -> DatabaseError {
    DatabaseError::unavailable("the server closed the connection")
}

/// Connects, listens and reports notifications until the connection fails.
async fn session<T>(
    params: &ListenParams,
    tls: T,
    state: &Arc<State>,
    on_change: &Callback,
) -> Ended
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let not_listening = |error| Ended {
        listened_at: None,
        error,
    };
    let (client, mut connection) =
        match tokio::time::timeout(params.connect_timeout, params.pg.connect(tls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return not_listening(DatabaseError::from_driver(&e)),
            Err(_) => {
                return not_listening(DatabaseError::timeout(
                    "connecting to the database",
                    params.connect_timeout,
                ));
            }
        };
    // The connection is driven by a task of its own, which passes notifications on (in the
    // order the server sent them) and ends with the connection's error. It never waits for
    // room: the connection must keep being read (the heartbeat's answer comes through it).
    // When the buffer is full the notification is dropped and `overflow` signalled; the
    // session then delivers `Change::All`, which covers whatever was dropped.
    let (sender, mut notifications) =
        mpsc::channel::<Result<Notification, DatabaseError>>(NOTIFICATION_BUFFER);
    let overflow = Arc::new(tokio::sync::Notify::new());
    let overflowed = Arc::clone(&overflow);
    let _driver = AbortOnDrop(tokio::spawn(async move {
        loop {
            let item = match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => n,
                // Notices, and whatever else the driver may add.
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    let _ = sender.send(Err(DatabaseError::from_driver(&e))).await;
                    return;
                }
                None => {
                    let _ = sender.send(Err(closed())).await;
                    return;
                }
            };
            match sender.try_send(Ok(item)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => overflowed.notify_one(),
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }));

    // A server's `idle_session_timeout` (PostgreSQL 14+) shorter than the heartbeat would
    // end this session again and again, and each new one reports everything changed: the
    // listener is exempt (an older server does not know the setting, and needs nothing).
    match tokio::time::timeout(
        QUERY_TIMEOUT,
        client.batch_execute("SET idle_session_timeout = 0"),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {}
        Ok(Err(e)) => return not_listening(DatabaseError::from_driver(&e)),
        Err(_) => {
            return not_listening(DatabaseError::timeout(
                "for the listener's session setting",
                QUERY_TIMEOUT,
            ));
        }
    }
    let listen = format!("LISTEN \"{}\"", params.channel);
    match tokio::time::timeout(QUERY_TIMEOUT, client.batch_execute(&listen)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return not_listening(DatabaseError::from_driver(&e)),
        Err(_) => {
            return not_listening(DatabaseError::timeout(
                "for LISTEN to take effect",
                QUERY_TIMEOUT,
            ));
        }
    }
    let listened_at = Instant::now();
    let ended = |error| Ended {
        listened_at: Some(listened_at),
        error,
    };
    state.sessions.fetch_add(1, Ordering::SeqCst);
    state.listening.store(true, Ordering::SeqCst);
    tracing::info!(database = %params.target, "listening for key changes");
    // Whatever was committed before LISTEN took effect was not (and will not be) reported.
    deliver(state, on_change, Change::All);

    let mut heartbeat =
        tokio::time::interval_at(listened_at + HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = notifications.recv() => match item {
                Some(Ok(notification)) => {
                    let change = if notification.channel() == &*params.channel {
                        Change::from_payload(notification.payload())
                    } else {
                        Change::All
                    };
                    deliver(state, on_change, change);
                }
                Some(Err(error)) => return ended(error),
                None => return ended(closed()),
            },
            () = overflow.notified() => {
                tracing::warn!(
                    database = %params.target,
                    "key-change notifications came faster than they were handled; some were \
                     dropped: invalidating every tenant"
                );
                deliver(state, on_change, Change::All);
            }
            _ = heartbeat.tick() => {
                match tokio::time::timeout(QUERY_TIMEOUT, client.batch_execute("SELECT 1")).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return ended(DatabaseError::from_driver(&e)),
                    Err(_) => {
                        return ended(DatabaseError::timeout(
                            "for the heartbeat query",
                            QUERY_TIMEOUT,
                        ));
                    }
                }
            }
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;

    #[test]
    fn payloads_that_are_not_tenant_ids_mean_everything() {
        assert_eq!(
            Change::from_payload("acme-1.x:y_z"),
            Change::Tenant(TenantId::new("acme-1.x:y_z").unwrap())
        );
        for bad in ["", "a b", "ü", "x\0y", &"x".repeat(129), "'; DROP"] {
            assert_eq!(Change::from_payload(bad), Change::All, "{bad:?}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        for failures in 0..40 {
            let d = backoff(failures);
            let ceiling = (RECONNECT_DELAY_MIN * 2u32.saturating_pow(failures.min(10)))
                .min(RECONNECT_DELAY_MAX);
            assert!(d >= ceiling / 2 && d <= ceiling, "{failures}: {d:?}");
        }
        assert!(backoff(0) <= Duration::from_millis(100));
        assert!(backoff(u32::MAX) <= RECONNECT_DELAY_MAX);
        // Jittered: not always the same.
        let samples: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(6)).collect();
        assert!(samples.len() > 1);
    }
}
