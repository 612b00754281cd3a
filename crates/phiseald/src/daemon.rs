//! Assembles the daemon from a validated [`Config`] and runs it until shutdown.
//!
//! [`Daemon::build`] opens the backends (the embedded default in `data_dir`), wraps them with
//! metrics, builds the keyring (which refuses inconsistent parts, e.g. the local KMS under
//! the production profile) and the policy; [`Daemon::run`] binds the socket and serves
//! until the shutdown signal, then drains: no new calls, in-flight calls and their
//! operations finish (streams still open after the drain time are ended, and audited as
//! such), the audit log is flushed (fsync), the socket is removed.

use std::sync::Arc;
use std::time::Duration;

use phiseal::{CacheSettings, Keyring, Profile};
use phiseal_audit_file::Durability;
use phiseal_proto::v1::admin_service_server::AdminServiceServer;
use phiseal_proto::v1::field_service_server::FieldServiceServer;
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::changes::{SharedStoreWatch, watch_shared_store};
use crate::config::{Config, DurabilityName, KeyStoreKind, KmsKind, ProfileName};
use crate::error::DaemonError;
use crate::instrument::{MeteredAudit, MeteredKms};
use crate::limits::CallLimiter;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::service::{AdminApi, FieldApi, Sidecar};
use crate::{rotation, transport};
use phiseal::store::KeyStore;
use phiseal_store_postgres::PostgresKeyStore;

/// The fewest top-level fields a request may have before it is decoded, whatever
/// `limits.max_batch_items` is (a request that is not a batch has up to five).
const MIN_TOP_LEVEL_FIELDS: usize = 64;
/// HTTP/2 streams (calls) one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Beyond `limits.request_timeout`, how long a unary call may take to arrive and be answered
/// before the server drops it (the services' own deadline answers first).
const RECEIVE_GRACE: Duration = Duration::from_secs(5);
/// HTTP/2 pings on an idle connection, and how long an answer may take: a peer that vanished
/// without closing its socket frees its connection slot.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight calls beyond the request timeout.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// After the last call finished, how long its response gets to reach the socket before the
/// remaining (idle) connections are closed.
const RESPONSE_FLUSH: Duration = Duration::from_millis(200);
/// How long streams ended at shutdown get to record their end before the responses flush.
const STREAM_STOP: Duration = Duration::from_secs(1);

/// A daemon ready to run.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    sidecar: Arc<Sidecar>,
    registry: Arc<Registry>,
    /// The shared key store's change listener (stops when the daemon is dropped).
    _watcher: Option<SharedStoreWatch>,
}

/// The opened key store; for PostgreSQL also the store itself, to watch its changes.
pub(crate) struct OpenedStore {
    pub(crate) store: Arc<dyn KeyStore>,
    shared: Option<Arc<PostgresKeyStore>>,
}

/// Opens the configured key store (applying PostgreSQL schema migrations at start).
pub(crate) async fn open_key_store(config: &Config) -> Result<OpenedStore, DaemonError> {
    match config.key_store.kind {
        KeyStoreKind::Sqlite => {
            let path = phiseal_embedded::EmbeddedPaths::new(&config.data_dir).key_store;
            let store = phiseal_store_sqlite::SqliteKeyStore::open(path)
                .map_err(phiseal_embedded::EmbeddedError::from)?;
            Ok(OpenedStore {
                store: Arc::new(store),
                shared: None,
            })
        }
        KeyStoreKind::Postgres => {
            let store = Arc::new(PostgresKeyStore::open(&config.key_store.postgres()?).await?);
            tracing::info!(database = store.target(), "key store: PostgreSQL");
            Ok(OpenedStore {
                store: Arc::clone(&store) as Arc<dyn KeyStore>,
                shared: Some(store),
            })
        }
    }
}

/// The local KMS creates its `root.key` when the file is missing. That is refused while the key
/// store holds tenants, whatever the store (the SQLite store in the data directory is also
/// checked by `phiseal_embedded::open_local_kms`; a shared PostgreSQL store only here): their
/// keys are wrapped under the lost root key, and a new one would serve new tenants only on
/// this host while every existing one failed.
async fn refuse_a_new_local_root_key(
    config: &Config,
    store: &dyn KeyStore,
) -> Result<(), DaemonError> {
    let local = |kms: &crate::config::KmsConfig| kms.kind == crate::config::KmsKind::Local;
    if !local(&config.kms) && !config.kms.previous.as_deref().is_some_and(local) {
        return Ok(());
    }
    let root_key = phiseal_embedded::EmbeddedPaths::new(&config.data_dir).root_key;
    let missing = matches!(
        std::fs::symlink_metadata(&root_key),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    );
    if !missing {
        return Ok(());
    }
    let tenants = store.list_tenants().await.map_err(|source| {
        DaemonError::Keyring(phiseal::Error::Store {
            backend: store.name().to_owned(),
            source,
        })
    })?;
    if tenants.is_empty() {
        return Ok(());
    }
    Err(DaemonError::Config(format!(
        "data_dir: the local KMS's root key {} is missing, but the key store holds {} \
         tenant(s) whose keys may be wrapped under it: restore root.key from its backup (a \
         new root key would not unwrap them); if a `phiseal root migrate` away from the local \
         KMS has finished (`phiseal root status` shows no local: reference), remove \
         [kms.previous] instead; if the tenants are to be abandoned, use another key store",
        root_key.display(),
        tenants.len()
    )))
}

/// `phiseald --migrate`: applies the PostgreSQL key store's pending schema migrations and
/// returns the schema version the database is at afterwards.
pub async fn migrate(config: &Config) -> Result<u32, DaemonError> {
    if config.key_store.kind != KeyStoreKind::Postgres {
        return Err(DaemonError::Config(
            "--migrate: key_store.kind is not \"postgres\" (the SQLite store migrates itself)"
                .into(),
        ));
    }
    // `open` applies what is pending (under an advisory lock: safe with daemons starting).
    let store = PostgresKeyStore::open(&config.key_store.postgres()?).await?;
    Ok(store.schema_version().await?)
}

impl Daemon {
    /// Opens the backends and assembles everything; nothing listens yet.
    pub async fn build(config: Config) -> Result<Self, DaemonError> {
        // The socket's directory is checked (and created) first, so that a start refused for
        // it creates nothing in the data directory (no root key, key store or audit log).
        transport::check_directory(
            &config.socket,
            config.socket_group.as_deref(),
            config.socket_check_parents,
        )?;
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let durability = match config.audit.durability {
            DurabilityName::Interval => Durability::Interval(config.audit.sync_interval),
            DurabilityName::Strict => Durability::Strict,
        };
        let options = phiseal_embedded::EmbeddedOptions {
            durability,
            cache: CacheSettings::default(),
            audit_log: config.audit.path.clone(),
            audit_rollover_bytes: Some(config.audit.rollover_bytes).filter(|&b| b > 0),
        };
        let audit = phiseal_embedded::open_audit(&config.data_dir, &options)?;
        let opened = open_key_store(&config).await?;
        refuse_a_new_local_root_key(&config, &*opened.store).await?;
        let kms = crate::kms::open_kms(&config).await?;
        tracing::info!(backend = kms.name(), "KMS");
        let cache = CacheSettings {
            capacity: config.cache.capacity,
            key_ttl: config.cache.key_ttl,
            max_uses: config.cache.max_uses,
            metadata_ttl: config.cache.metadata_ttl,
            max_stale: config.cache.max_stale,
        };
        let keyring = Keyring::builder()
            .kms(Arc::new(MeteredKms::new(kms, Arc::clone(&metrics))))
            .key_store(opened.store)
            .audit(Arc::new(MeteredAudit::new(audit, Arc::clone(&metrics))))
            .cache(cache)
            .profile(match config.profile {
                ProfileName::Development => Profile::Development,
                ProfileName::Production => Profile::Production,
            })
            .build()?;
        let watcher = match &opened.shared {
            Some(store) => Some(watch_shared_store(store, &keyring)?),
            None => None,
        };
        let sidecar = Sidecar {
            keyring,
            auth: Authenticator::new(&config.tokens),
            policy: Policy::new(config.policy.clone()),
            limiter: CallLimiter::new(&config.limits),
            max_batch_items: config.limits.max_batch_items,
            request_timeout: config.limits.request_timeout,
            max_message_bytes: config.limits.max_message_bytes,
            max_stream_segment_bytes: config.limits.max_stream_segment_bytes,
            require_stream_end: config.limits.require_stream_end,
            metrics,
            tasks: TaskTracker::new(),
            streams: Arc::new(tokio::sync::Semaphore::new(config.limits.max_streams)),
            stream_slots: Arc::default(),
            max_streams_per_caller: config.limits.streams_per_caller(),
            stop_streams: tokio_util::sync::CancellationToken::new(),
        };
        Ok(Self {
            config,
            sidecar: Arc::new(sidecar),
            registry: Arc::new(registry),
            _watcher: watcher,
        })
    }

    /// Serves until `shutdown` resolves, then drains and flushes (see the module docs).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), DaemonError> {
        let config = &self.config;
        let (listener, socket_guard) = transport::bind(
            &config.socket,
            config.socket_group.as_deref(),
            config.socket_check_parents,
        )?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

        let metrics_task = match config.metrics.listen {
            Some(addr) => Some(
                crate::metrics::serve(addr, Arc::clone(&self.registry), stop_rx.clone()).await?,
            ),
            None => None,
        };
        let rotation_task = rotation::enabled(&config.rotation).then(|| {
            tokio::spawn(rotation::run(
                self.sidecar.keyring.clone(),
                config.rotation.clone(),
                Arc::clone(&self.sidecar.metrics),
                stop_rx.clone(),
            ))
        });
        // Housekeeping every 60 s (every `cache.key_ttl` / 2 when that is shorter, at least
        // every second): idle identities leave the rate limiter, expired keys leave
        // the key cache (zeroized) even for tenants nobody uses any more, and tenants with
        // running streams are read again (a shred whose notification was missed stops them)
        // and their keys confirmed with the KMS once past `key_ttl` (a revoked root key stops
        // them).
        let housekeeping_sidecar = Arc::clone(&self.sidecar);
        let mut housekeeping_stop = stop_rx.clone();
        let every = housekeeping_interval(config.cache.key_ttl);
        let housekeeping_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            // After a pass held up by a slow backend, the next one waits a whole interval.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        housekeeping_sidecar.limiter.forget_idle();
                        housekeeping_sidecar.keyring.evict_expired();
                        // A slow key store does not hold up the shutdown. (One request id
                        // per pass, for the audit records of its unwraps.)
                        let housekeeper =
                            phiseal::Caller::new(crate::auth::daemon_actor("housekeeping"));
                        tokio::select! {
                            result = housekeeping_sidecar
                                .keyring
                                .recheck_streams(&housekeeper, None) => {
                                if let Err(e) = result {
                                    tracing::warn!(
                                        error = %e,
                                        "could not re-read tenants with running streams or \
                                         confirm their keys (retried at the next \
                                         housekeeping pass)"
                                    );
                                }
                            }
                            _ = housekeeping_stop.changed() => return,
                        }
                    }
                    _ = housekeeping_stop.changed() => return,
                }
            }
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<FieldServiceServer<FieldApi>>().await;
        health.set_serving::<AdminServiceServer<AdminApi>>().await;

        // A batch's items are decoded before any check of ours runs, at ~50 times their size
        // on the wire (an empty item: 2 bytes, ~100 in memory): count them first, so that a
        // message of tiny items cannot make the daemon allocate hundreds of megabytes. Every
        // request's repeated field is top-level; no other request has more than a few fields.
        let max_items = config.limits.max_batch_items;
        let refusals = Arc::clone(&self.sidecar.metrics);
        let limited = phiseal_proto::codec::limit_top_level_fields(
            max_items.max(MIN_TOP_LEVEL_FIELDS),
            move || {
                refusals.refuse("batch_too_large");
                crate::service::batch_too_large(&format!("more than {max_items}"), max_items)
            },
        );
        if !limited {
            // (One daemon per process: only a second `run` in one process gets here.)
            tracing::warn!("the request field limit was set before: kept as it was");
        }

        let max = config.limits.max_message_bytes;
        let fields = FieldServiceServer::new(FieldApi(Arc::clone(&self.sidecar)))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let admin = AdminServiceServer::new(AdminApi(Arc::clone(&self.sidecar)))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);

        tracing::info!(
            socket = %config.socket.display(),
            data_dir = %config.data_dir.display(),
            profile = ?config.profile,
            "phiseald listening"
        );
        if config.profile == ProfileName::Development && config.kms.kind != KmsKind::Local {
            // A development line kept from the example after [kms] was switched to a real KMS.
            tracing::warn!(
                kms = config.kms.kind.as_str(),
                "profile = \"development\" with a production KMS: the production checks \
                 (access control only from the file, no developer credentials, TLS to a \
                 remote key store, an audit log that writes before it acknowledges) are off; \
                 remove the profile line unless this is a development set-up"
            );
        }
        let limits = &config.limits;
        let incoming = crate::connections::limit(
            listener,
            limits.max_connections,
            limits.max_connections_per_uid,
        );
        let drain_limit = config.limits.request_timeout.saturating_add(DRAIN_GRACE);
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutdown requested: refusing new calls, draining in-flight calls");
            // Health watchers (load balancers, supervisors) learn of the drain before the
            // connections go: the server as a whole ("") and each service stop serving.
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            health
                .set_not_serving::<FieldServiceServer<FieldApi>>()
                .await;
            health
                .set_not_serving::<AdminServiceServer<AdminApi>>()
                .await;
            let _ = draining_tx.send(());
        };
        // Deadlines are enforced per call by the services (DEADLINE_EXCEEDED with a kind).
        // What runs before them is bounded here: streams per connection, calls in flight,
        // all and per uid (each may hold a message while it arrives), and the time to receive and answer a
        // call (a stream's handler answers at once; its messages have their own idle limit).
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .timeout(limits.request_timeout.saturating_add(RECEIVE_GRACE))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(crate::inflight::InFlightLayer::new(
                limits.max_requests_in_flight,
                limits.requests_in_flight_per_uid(),
            ))
            .add_service(health_service)
            .add_service(fields)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(server);
        // Serve. Once shutdown starts (the server stops accepting and sends GOAWAY), wait up
        // to `drain_limit` for the calls in flight; streams still open then are ended (each
        // records its end in the audit log and answers UNAVAILABLE). Give the responses a
        // moment to reach the socket, then close what is left (idle client connections would
        // otherwise keep the server open).
        let served = tokio::select! {
            result = &mut server => result,
            _ = draining_rx => {
                self.sidecar.tasks.close();
                if tokio::time::timeout(drain_limit, self.sidecar.tasks.wait()).await.is_err() {
                    tracing::warn!(
                        "drain: calls still running after {drain_limit:?}; ending open streams"
                    );
                    self.sidecar.stop_streams.cancel();
                    let _ = tokio::time::timeout(STREAM_STOP, self.sidecar.tasks.wait()).await;
                }
                tokio::time::timeout(RESPONSE_FLUSH, &mut server)
                    .await
                    .unwrap_or(Ok(()))
            }
        };
        let _ = stop_tx.send(true);
        self.sidecar.stop_streams.cancel();
        // Admin operations whose callers went away still finish (and are audited) first.
        self.sidecar.tasks.close();
        if tokio::time::timeout(drain_limit, self.sidecar.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain: operations still running after {drain_limit:?}");
        }
        // The rotation schedule and the other background tasks stop before the final flush,
        // so that their last audit records are in it (a rotation already running finishes,
        // within the drain limit).
        for task in [metrics_task, rotation_task, Some(housekeeping_task)]
            .into_iter()
            .flatten()
        {
            if tokio::time::timeout(drain_limit, task).await.is_err() {
                tracing::warn!("drain: a background task still running after {drain_limit:?}");
            }
        }
        let flushed =
            match tokio::time::timeout(drain_limit, self.sidecar.keyring.flush_audit()).await {
                Ok(result) => result.map_err(DaemonError::from),
                Err(_) => Err(DaemonError::Io {
                    what: format!("final audit flush (not finished after {drain_limit:?})"),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                }),
            };
        drop(socket_guard);
        // Both outcomes are reported: a server error must not hide a failed flush.
        if let (Err(_), Err(flush)) = (&served, &flushed) {
            tracing::error!(error = %flush, "final audit flush failed");
        }
        served?;
        flushed?;
        tracing::info!("phiseald stopped: audit log flushed, socket removed");
        Ok(())
    }
}

/// How often the daemon's housekeeping runs: every 60 s, or every `key_ttl` / 2 when that is
/// shorter (expired keys leave memory, and running streams' keys are confirmed with the KMS,
/// within about `key_ttl` of being due), but not more than once a second.
fn housekeeping_interval(key_ttl: Duration) -> Duration {
    (key_ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    #[test]
    fn housekeeping_runs_every_half_key_ttl_between_a_second_and_a_minute() {
        use super::housekeeping_interval as every;
        let secs = std::time::Duration::from_secs;
        assert_eq!(every(secs(300)), secs(60));
        assert_eq!(every(secs(120)), secs(60));
        assert_eq!(every(secs(10)), secs(5));
        assert_eq!(every(secs(1)), secs(1));
    }
}
