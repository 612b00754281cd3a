//! # phiseal-store-postgres — the shared key store
//!
//! [`PostgresKeyStore`] implements [`phiseal::store::KeyStore`] on a PostgreSQL database that
//! many sidecars (on many hosts) share. Like the embedded SQLite store it holds only *wrapped*
//! tenant keys (useless without the KMS root key), key-check MACs and lifecycle state, and it
//! has the same semantics: the same invariants, the same error kinds, the same tombstones.
//!
//! ## Concurrency
//! Version allocation relies on transactions and constraints, never on locks inside one
//! process:
//! - `insert_version` runs in one transaction that first locks the tenant's row
//!   (`SELECT … FOR UPDATE`), then compares the latest version with `expected_latest`, demotes
//!   the old primary and inserts the new version. Rotations of one tenant from any number of
//!   processes and hosts are therefore serialized by the database, and exactly one of several
//!   concurrent callers with the same `expected_latest` wins; the others get
//!   [`BackendErrorKind::Conflict`] and change nothing.
//! - The `(tenant, version)` primary key and a partial unique index (at most one `primary` per
//!   tenant) guard the same invariants a second time; a `unique_violation` (SQLSTATE 23505),
//!   `serialization_failure` (40001) or `deadlock_detected` (40P01) is reported as
//!   [`BackendErrorKind::Conflict`] too. Every write that touches several rows locks the tenant
//!   row before the version rows (`replace_wrapped` updates a single version row), so writers
//!   do not deadlock each other.
//! - `load_tenant` is one statement, so the tenant row and its versions come from one snapshot.
//!
//! ## Change notifications and cache freshness
//! Every write that changes what a cached reader may use — `create_tenant`, `insert_version`
//! (rotation), `set_min_decrypt_version`, `shred_tenant` and `replace_wrapped` — runs
//! `SELECT pg_notify('<schema>_key_changes', '<tenant id>')` ([`changes_channel`];
//! [`CHANGES_CHANNEL`], `phiseal_key_changes`, for the default schema) inside its
//! own transaction, so PostgreSQL delivers the notification if and only if the change
//! commits (a failed or losing compare-and-set notifies nobody). Tenant ids are at most 128
//! ASCII bytes, well within a notification's payload limit.
//!
//! [`PostgresKeyStore::watch_changes`] listens on a dedicated connection and calls back with
//! [`Change::Tenant`] per notification; wire it to the keyring's invalidation:
//! ```
//! use phiseal::Keyring;
//! use phiseal_store_postgres::{Change, ChangeWatcher, PostgresKeyStore, PostgresStoreError};
//!
//! fn follow_changes(
//!     store: &PostgresKeyStore,
//!     keyring: Keyring,
//! ) -> Result<ChangeWatcher, PostgresStoreError> {
//!     store.watch_changes(move |change| match change {
//!         Change::Tenant(tenant) => keyring.forget_metadata(Some(&tenant)),
//!         _ => keyring.forget_metadata(None),
//!     })
//! }
//! ```
//! Keep the returned [`ChangeWatcher`] for as long as the keyring is used (dropping it stops
//! the listener). `forget_metadata` keeps the unwrapped keys: any role that can connect to
//! the database can send notifications on the channel, and must not be able to empty the key
//! cache. A process then calls `Keyring::recheck_tenants` (from a task, coalesced: the
//! callback must not block) to drop at once the keys a change destroyed and stop its running
//! streams of a tenant another process shredded; `phiseald` does (`changes.rs`). How fresh
//! another process's view is:
//! - **while the listener is connected** ([`ChangeWatcher::is_listening`]), a committed change
//!   is seen by every other watching process as soon as its notification arrives: typically
//!   milliseconds after the commit;
//! - **while it is disconnected** (database restart, network failure), notifications sent in
//!   the meantime are lost, and only the keyring's `metadata_ttl` (5 s by default) bounds how
//!   long a cached view — a rotated-away primary, a raised minimum version, a shredded
//!   tenant's keys — can still be used. The listener reconnects with jittered exponential
//!   backoff (at most [`RECONNECT_DELAY_MAX`] between attempts);
//! - **after every (re)connection**, once `LISTEN` is in effect and before any notification
//!   is relied on, the watcher reports [`Change::All`], which invalidates everything, so
//!   nothing missed while disconnected survives the reconnection. (The first connection
//!   reports it too.) A notification whose payload is not a valid tenant id is also reported
//!   as [`Change::All`].
//!
//! A connection that dies without being closed is noticed by a heartbeat query within about
//! 20 s; until then, too, `metadata_ttl` bounds staleness. Notifying makes the commit of every
//! write take PostgreSQL's global notification-queue lock briefly: writes are rare
//! (administrative), so this costs nothing that matters.
//!
//! ## Connections, timeouts and failures
//! - A pool of at most [`PostgresStoreConfig::max_connections`] connections
//!   (`deadpool-postgres`); a connection the server closed is replaced on its next use, so the
//!   store recovers by itself once the database is back.
//! - Every connection runs with `statement_timeout` = [`STATEMENT_TIMEOUT`] and `lock_timeout`
//!   = [`LOCK_TIMEOUT`]; every call as a whole is bounded by [`OPERATION_TIMEOUT`], connecting by
//!   [`PostgresStoreConfig::connect_timeout`]. A role or database default of
//!   `synchronous_commit = off` is raised to `on` in the store's sessions (a committed shred
//!   must survive a server crash); with asynchronous replication a failover can still lose
//!   the last commits — use synchronous replication for the key store.
//! - Unreachable database, refused or lost connection, shutdown, time-outs →
//!   [`BackendErrorKind::Unavailable`]; the message names the database as
//!   `user@host:port/dbname`, never the password. An `Unavailable` error from a *write* does
//!   not prove that the write did not happen (the connection may have been lost while the
//!   commit was under way): reload before deciding. The compare-and-set makes a blind retry
//!   safe (it fails with a conflict if the first attempt did commit).
//! - Server errors are reduced to their SQLSTATE and primary message
//!   ([`DatabaseError`]): PostgreSQL's `DETAIL` can quote a whole row, wrapped bytes included,
//!   and is never passed on.
//! - Sessions are configured with `SET` when they are opened: behind PgBouncer, use session
//!   pooling (transaction pooling would also break the driver's prepared statements).
//!
//! ## TLS
//! [`TlsMode::Require`] uses rustls (TLS 1.2 and 1.3, aws-lc-rs) and always verifies the
//! server's certificate chain against the configured CA file or the platform's trust store,
//! *and* the host name (libpq's `sslmode=verify-full`). Client certificates are not supported
//! yet. [`TlsMode::Disable`] is for a database on the same host or a protected network.
//!
//! ## Shredding, and what PostgreSQL keeps
//! `shred_tenant` sets every version of the tenant to `destroyed` and its `wrapped` and
//! `root_key_ref` columns to `NULL` in one transaction, and keeps the tenant row with
//! `shredded_at` as a tombstone, so the tenant id can never be created again. After the
//! commit no query can return the wrapped keys.
//!
//! PostgreSQL's MVCC does not overwrite a row on `UPDATE`: the old row version (with the
//! wrapped bytes) stays in the table's pages as a dead tuple until `VACUUM` removes it. So
//! after the commit the store runs `VACUUM key_versions` (outside any transaction, as VACUUM
//! requires), which removes the dead versions of the shredded rows (and of older rotations and
//! rewraps) that no running transaction can still see. If it cannot (the role does not own the
//! table, the vacuum fails or times out), the shred still counts, and the call fails with
//! [`PostgresStoreError::VacuumIncomplete`] saying so; shredding again is idempotent and
//! retries the vacuum. The limits, stated plainly:
//! - a transaction that started before the shred and is still open (in any session of the
//!   database, or a replication slot with `hot_standby_feedback`) keeps the old versions
//!   visible, and plain VACUUM cannot remove them until it ends; autovacuum does later;
//! - VACUUM frees the space of removed tuples but PostgreSQL does not zero it: the bytes can
//!   stay in the data file's free space until new rows overwrite it (`VACUUM FULL` would
//!   rewrite the table, but locks it exclusively and only unlinks the old file, so it is not
//!   run);
//! - the write-ahead log holds the inserted wrapped bytes until its segments are recycled, and
//!   WAL archives, streaming replicas, base backups, dumps and file-system or storage
//!   snapshots hold them as long as they are kept.
//!
//! None of this is reachable through the store, and wrapped keys are useless without the KMS
//! root key: crypto-shredding of every copy outside the table relies on that, as it does for
//! the SQLite store's backups.
//!
//! ## Schema
//! Versioned migrations are embedded in the crate and recorded in `schema_migrations`.
//! [`PostgresKeyStore::open`] applies pending ones (each in one transaction, serialized across
//! processes by an advisory lock); [`PostgresKeyStore::connect`] only checks the version.
//! A database whose schema is newer than this build is refused
//! ([`PostgresStoreError::SchemaTooNew`]).
//!
//! The tables live in one PostgreSQL schema, [`PostgresStoreConfig::schema`] (default
//! `phiseal`), which the first migration creates if it does not exist. Every session of the
//! store runs with `search_path` set to that schema alone, whatever the role's own setting, so
//! a table, type or function another role puts in some other schema is never used in its
//! place (the class of CVE-2018-1058). Change notifications use the schema's own channel
//! ([`changes_channel`]). Opening the store (and every migration, again under its lock)
//! refuses ([`PostgresStoreError::UnsafeSchema`]), before it reads anything in the schema:
//! - a schema owned by a role other than the store's own (membership does not count: a
//!   superuser is a member of every role) or [`PostgresStoreConfig::schema_owner`] (`public`
//!   owned by `pg_database_owner` is accepted when the store's role owns the database): that
//!   role could replace the store's tables;
//! - a schema the store's role may not use (no `USAGE`): PostgreSQL would silently leave it
//!   out of the search path;
//! - a schema in which any role but its owner may create objects (`CREATE` granted to
//!   `PUBLIC`, as on the `public` schema before PostgreSQL 15, or to another role): it could
//!   create the store's tables there first, owned by it, or objects in their way;
//! - a schema holding objects (tables, functions, operators, types) owned by a role other
//!   than those, tables other roles may change (`INSERT`, `UPDATE`, `DELETE`, `TRUNCATE`,
//!   `TRIGGER`, `REFERENCES`; `SELECT` may be granted), or tables with triggers (the store
//!   creates none);
//! - with the default schema, while it is empty: the three key tables found in another schema
//!   by the role's own search path
//!   (where builds before this setting created them): the store would otherwise start empty
//!   next to them. Set the schema to theirs, or move the tables. Only the fully qualified
//!   `pg_catalog.current_schemas(false)` runs under the role's own search path: operators or
//!   functions another role put on it are never resolved.
//!
//! The role that runs the store should own the tables (it does if the store created them), so
//! that it can `VACUUM` after a shred; a role with only `SELECT, INSERT, UPDATE` on the tables
//! (and `SELECT` on `schema_migrations`) also needs `USAGE` on the schema, and the schema's
//! owner named in [`PostgresStoreConfig::schema_owner`]. Schema version 1:
//! ```sql
//! CREATE TABLE tenants (
//!     tenant text PRIMARY KEY CHECK (tenant ~ '^[A-Za-z0-9._:-]{1,128}$'),
//!     min_decrypt_version bigint NOT NULL CHECK (min_decrypt_version BETWEEN 1 AND 4294967295),
//!     shredded_at timestamptz NULL,
//!     created_at timestamptz NOT NULL
//! );
//! CREATE TABLE key_versions (
//!     tenant text NOT NULL REFERENCES tenants (tenant),
//!     version bigint NOT NULL CHECK (version BETWEEN 1 AND 4294967295),
//!     state text NOT NULL CHECK (state IN ('primary', 'decrypt_only', 'destroyed')),
//!     root_key_ref text NULL,
//!     wrapped bytea NULL,
//!     key_check bytea NOT NULL CHECK (octet_length(key_check) = 32),
//!     created_at timestamptz NOT NULL,
//!     PRIMARY KEY (tenant, version),
//!     CHECK (CASE WHEN state = 'destroyed' THEN wrapped IS NULL AND root_key_ref IS NULL
//!                 ELSE wrapped IS NOT NULL AND root_key_ref IS NOT NULL END)
//! );
//! CREATE UNIQUE INDEX key_versions_one_primary ON key_versions (tenant) WHERE state = 'primary';
//! ```
//! Timestamps are stored with PostgreSQL's microsecond precision: a sub-microsecond part of
//! `created_at` / `shredded_at` is dropped (rounded down).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
mod error;
mod schema;
#[cfg(feature = "testkit")]
pub mod testkit;
mod watch;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use jiff::Timestamp;
use phiseal::context::TenantId;
use phiseal::kms::WrappedKey;
use phiseal::store::{KeyRecord, KeyState, KeyStore, StoreRefusal, TenantRecord};
use phiseal::{BackendError, BackendErrorKind};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};

pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_SCHEMA, MAX_SCHEMA_LEN,
    PostgresStoreConfig, TlsMode, check_schema_name, connects_only_to_this_host,
    database_url_has_password, unix_socket_dirs,
};
pub use error::{DatabaseError, PostgresStoreError};
pub use schema::SCHEMA_VERSION;
pub use watch::{CHANGES_CHANNEL, Change, ChangeWatcher, RECONNECT_DELAY_MAX, changes_channel};

/// Server-side limit on one statement (`statement_timeout` of every connection).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Server-side limit on waiting for a row or table lock (`lock_timeout`), e.g. behind another
/// process's rotation of the same tenant.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Client-side limit on one call as a whole (waiting for a connection, every statement, the
/// commit). Bounds calls even when the server stops answering without closing the connection.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared key store: one PostgreSQL database, safe for many processes and hosts at once.
///
/// Cheap to clone; clones share one connection pool. `Debug` shows the database as
/// `user@host:port/dbname`, never the password.
#[derive(Clone)]
pub struct PostgresKeyStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pool: Pool,
    target: Arc<str>,
    /// The schema holding the tables, first after `pg_catalog` in every session's search path.
    schema: Arc<str>,
    /// See [`PostgresStoreConfig::schema_owner`].
    schema_owner: Option<Arc<str>>,
    /// The change channel of the schema ([`changes_channel`]).
    channel: Arc<str>,
    connect_timeout: Duration,
    tls: bool,
    /// What a [`ChangeWatcher`]'s dedicated connection is opened with.
    listen: Arc<watch::ListenParams>,
}

impl fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresKeyStore")
            .field("database", &self.inner.target)
            .field("max_connections", &self.inner.pool.status().max_size)
            .field("tls", &self.inner.tls)
            .finish_non_exhaustive()
    }
}

impl PostgresKeyStore {
    /// The value of the server setting `name` in a session of the store's pool (for tests of
    /// the session configuration).
    #[cfg(feature = "testkit")]
    pub async fn session_setting(&self, name: &str) -> Result<String, PostgresStoreError> {
        let inner = &self.inner;
        let client = inner.client("read a session setting").await?;
        client
            .query_one("SELECT pg_catalog.current_setting($1)", &[&name])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(inner.db("read a session setting"))
    }

    /// Connects to the database, applies pending schema migrations and returns the store.
    /// Needs a Tokio runtime (with the time driver).
    pub async fn open(config: &PostgresStoreConfig) -> Result<Self, PostgresStoreError> {
        let store = Self::build(config)?;
        store.inner.migrate().await?;
        Ok(store)
    }

    /// Connects to the database without migrating: fails with
    /// [`PostgresStoreError::SchemaOutdated`] (or [`PostgresStoreError::SchemaTooNew`]) unless
    /// the schema is exactly [`SCHEMA_VERSION`]. For deployments where only an explicit
    /// [`Self::migrate`] may change the schema.
    pub async fn connect(config: &PostgresStoreConfig) -> Result<Self, PostgresStoreError> {
        let store = Self::build(config)?;
        let found = store.inner.checked_schema_version().await?;
        let target = store.inner.target.to_string();
        if found > SCHEMA_VERSION {
            return Err(PostgresStoreError::SchemaTooNew { target, found });
        }
        if found < SCHEMA_VERSION {
            return Err(PostgresStoreError::SchemaOutdated { target, found });
        }
        Ok(store)
    }

    /// Applies pending schema migrations; returns the versions applied (empty if the schema
    /// was current). Safe to run from several processes at once, and idempotent.
    pub async fn migrate(&self) -> Result<Vec<u32>, PostgresStoreError> {
        self.inner.migrate().await
    }

    /// The database's schema version (0 if no migration was ever applied).
    pub async fn schema_version(&self) -> Result<u32, PostgresStoreError> {
        self.inner.schema_version().await
    }

    /// The database, as `user@host:port/dbname`.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    fn build(config: &PostgresStoreConfig) -> Result<Self, PostgresStoreError> {
        let parsed = config::parse(config)?;
        let tls = parsed.tls.is_some();
        let target: Arc<str> = Arc::from(parsed.target);
        let channel: Arc<str> = Arc::from(changes_channel(&parsed.schema));
        let listen = Arc::new(watch::ListenParams {
            channel: Arc::clone(&channel),
            pg: parsed.pg.clone(),
            tls: parsed.tls.clone(),
            target: Arc::clone(&target),
            connect_timeout: config.connect_timeout,
        });
        let manager_config = ManagerConfig {
            // A pooled connection answers an empty query before it is reused (one round trip
            // per checkout, on the store's slow path): one that died silently (a failover
            // without a reset) fails that check within the recycle timeout and is replaced,
            // instead of hanging the next call for OPERATION_TIMEOUT.
            recycling_method: RecyclingMethod::Verified,
        };
        let manager = match parsed.tls {
            Some(connector) => Manager::from_config(parsed.pg, connector, manager_config),
            None => Manager::from_config(parsed.pg, tokio_postgres::NoTls, manager_config),
        };
        // Read committed, whatever the role's or database's default: the compare-and-sets are
        // written for it (row locks, then a fresh read), and a stricter level would only add
        // serialization failures. The search path is the store's schema alone, whatever the
        // role's own: PostgreSQL
        // looks in pg_catalog first, and in the session's own temporary schema (where the
        // store creates nothing) last, so no other schema can hold an object in its way.
        let session = format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; \
             SET idle_in_transaction_session_timeout = {}; \
             SET default_transaction_isolation = 'read committed'; \
             SET search_path = \"{}\", pg_temp",
            STATEMENT_TIMEOUT.as_millis(),
            LOCK_TIMEOUT.as_millis(),
            OPERATION_TIMEOUT.as_millis(),
            parsed.schema,
        );
        let session: Arc<str> = Arc::from(session);
        let pool = Pool::builder(manager)
            .max_size(config.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OPERATION_TIMEOUT))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .post_create(Hook::async_fn(move |client, _| {
                let session = Arc::clone(&session);
                Box::pin(async move {
                    client
                        .batch_execute(&session)
                        .await
                        .map_err(HookError::Backend)?;
                    // A shred or a raised minimum version reported done must survive a crash
                    // of the server: a role or database default of `synchronous_commit = off`
                    // is raised to `on` (a stricter remote setting is kept).
                    let commit: String = client
                        .query_one(
                            "SELECT pg_catalog.current_setting('synchronous_commit')",
                            &[],
                        )
                        .await
                        .and_then(|row| row.try_get(0))
                        .map_err(HookError::Backend)?;
                    if commit == "off" {
                        client
                            .batch_execute("SET synchronous_commit = on")
                            .await
                            .map_err(HookError::Backend)?;
                    }
                    Ok(())
                })
            }))
            .build()
            .map_err(|e| PostgresStoreError::Config {
                reason: format!("could not build the connection pool: {e}"),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                target,
                schema: Arc::from(parsed.schema),
                schema_owner: parsed.schema_owner.map(Arc::from),
                channel,
                connect_timeout: config.connect_timeout,
                tls,
                listen,
            }),
        })
    }
}

impl Inner {
    /// Maps a driver error during `action` to [`PostgresStoreError::Database`].
    fn db(
        &self,
        action: &'static str,
    ) -> impl FnOnce(tokio_postgres::Error) -> PostgresStoreError + '_ {
        move |e| PostgresStoreError::Database {
            action,
            target: self.target.to_string(),
            source: DatabaseError::from_driver(&e),
        }
    }

    /// A connection from the pool.
    async fn client(
        &self,
        action: &'static str,
    ) -> Result<deadpool_postgres::Object, PostgresStoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| PostgresStoreError::Database {
                action,
                target: self.target.to_string(),
                source: DatabaseError::from_pool(e, self.connect_timeout),
            })
    }

    /// Runs `op`, failing as unavailable after [`OPERATION_TIMEOUT`].
    async fn timed<T>(
        &self,
        action: &'static str,
        op: impl Future<Output = Result<T, PostgresStoreError>>,
    ) -> Result<T, PostgresStoreError> {
        match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
            Ok(Err(PostgresStoreError::Database {
                action,
                target,
                source,
            })) if matches!(source.code(), Some("0A000" | "26000")) => {
                // "cached plan must not change result type" / "prepared statement does not
                // exist": the schema changed under the cached statements (or a pooler lost
                // them). Forget every connection's cache so the next call prepares afresh.
                self.pool.manager().statement_caches.clear();
                Err(PostgresStoreError::Database {
                    action,
                    target,
                    source,
                })
            }
            Ok(result) => result,
            Err(_) => Err(PostgresStoreError::Database {
                action,
                target: self.target.to_string(),
                source: DatabaseError::timeout("for the database to answer", OPERATION_TIMEOUT),
            }),
        }
    }
}

/// A `timestamptz` in PostgreSQL's binary form: microseconds since 2000-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy)]
struct PgTime(i64);

/// 2000-01-01T00:00:00Z in microseconds since the Unix epoch.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

impl PgTime {
    /// Rounds down to the microsecond. Every `jiff::Timestamp` fits.
    fn from_timestamp(ts: Timestamp) -> Self {
        let unix_micros = ts.as_nanosecond().div_euclid(1000);
        // jiff's range (years -9999..=9999) is far inside i64 microseconds.
        let unix_micros = i64::try_from(unix_micros).unwrap_or(i64::MAX);
        Self(unix_micros.saturating_sub(PG_EPOCH_UNIX_MICROS))
    }

    /// `None` for `±infinity` and anything outside jiff's range.
    fn to_timestamp(self) -> Option<Timestamp> {
        let unix_micros = self.0.checked_add(PG_EPOCH_UNIX_MICROS)?;
        Timestamp::from_microsecond(unix_micros).ok()
    }
}

impl ToSql for PgTime {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.put_i64(self.0);
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMPTZ);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgTime {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw
            .try_into()
            .map_err(|_| "a timestamptz value is not 8 bytes long")?;
        Ok(PgTime(i64::from_be_bytes(bytes)))
    }

    accepts!(TIMESTAMPTZ);
}

/// At most 64 characters of a stored string, for error messages about corrupt rows.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn corrupt(detail: String) -> PostgresStoreError {
    PostgresStoreError::Corrupt { detail }
}

/// Reads column `idx` of `row`, a type mismatch being corruption.
fn column<'a, T: FromSql<'a>>(
    row: &'a Row,
    idx: usize,
    what: impl FnOnce() -> String,
) -> Result<T, PostgresStoreError> {
    row.try_get(idx)
        .map_err(|_| corrupt(format!("{} has an unreadable value", what())))
}

fn timestamp_of(
    time: PgTime,
    what: impl FnOnce() -> String,
) -> Result<Timestamp, PostgresStoreError> {
    time.to_timestamp().ok_or_else(|| {
        corrupt(format!(
            "{} is not a finite timestamp in years -9999..=9999",
            what()
        ))
    })
}

/// The columns of a `key_versions` row, in the order `load_tenant` selects them from index 2.
fn parse_version_row(tenant: &TenantId, row: &Row) -> Result<KeyRecord, PostgresStoreError> {
    let raw_version: i64 = column(row, 2, || format!("a key version of tenant '{tenant}'"))?;
    let version = u32::try_from(raw_version)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            corrupt(format!(
                "tenant '{tenant}' has key version {raw_version}, outside 1..=2^32-1"
            ))
        })?;
    let at = || format!("key version {version} of tenant '{tenant}'");
    let state: String = column(row, 3, || format!("the state of {}", at()))?;
    let root_key_ref: Option<String> =
        column(row, 4, || format!("the root key reference of {}", at()))?;
    let wrapped: Option<Vec<u8>> = column(row, 5, || format!("the wrapped key of {}", at()))?;
    let key_check: Vec<u8> = column(row, 6, || format!("the key check of {}", at()))?;
    let created_at: PgTime = column(row, 7, || format!("created_at of {}", at()))?;

    let state = KeyState::parse(&state)
        .ok_or_else(|| corrupt(format!("{} has unknown state {:?}", at(), truncate(&state))))?;
    let key_check: [u8; 32] = key_check.as_slice().try_into().map_err(|_| {
        corrupt(format!(
            "{}: key check is {} bytes long, expected 32",
            at(),
            key_check.len()
        ))
    })?;
    let created_at = timestamp_of(created_at, || format!("created_at of {}", at()))?;
    let wrapped = match (root_key_ref, wrapped) {
        (Some(root_key_ref), Some(ciphertext)) => Some(WrappedKey {
            root_key_ref,
            ciphertext,
        }),
        (None, None) => None,
        _ => {
            return Err(corrupt(format!(
                "{}: only one of root_key_ref and wrapped is set",
                at()
            )));
        }
    };
    match (state, &wrapped) {
        (KeyState::Destroyed, Some(_)) => {
            return Err(corrupt(format!(
                "{} is destroyed but still holds wrapped bytes",
                at()
            )));
        }
        (KeyState::Primary | KeyState::DecryptOnly, None) => {
            return Err(corrupt(format!(
                "{} is live but has no wrapped bytes",
                at()
            )));
        }
        _ => {}
    }
    Ok(KeyRecord {
        version,
        state,
        wrapped,
        key_check,
        created_at,
    })
}

/// `(min_decrypt_version, shredded_at)` of a tenant row, checked.
fn parse_tenant_columns(
    tenant: &TenantId,
    row: &Row,
) -> Result<(u32, Option<Timestamp>), PostgresStoreError> {
    let min: i64 = column(row, 0, || {
        format!("the minimum decryption version of tenant '{tenant}'")
    })?;
    let min = u32::try_from(min).ok().filter(|v| *v >= 1).ok_or_else(|| {
        corrupt(format!(
            "tenant '{tenant}' has minimum decryption version {min}"
        ))
    })?;
    let shredded_at: Option<PgTime> =
        column(row, 1, || format!("shredded_at of tenant '{tenant}'"))?;
    let shredded_at = shredded_at
        .map(|t| timestamp_of(t, || format!("tenant '{tenant}' shredded_at")))
        .transpose()?;
    Ok((min, shredded_at))
}

impl Inner {
    async fn load(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, PostgresStoreError> {
        let action = "load the tenant";
        let client = self.client(action).await?;
        // One statement: the tenant row and its versions come from one snapshot.
        let stmt = client
            .prepare_cached(
                "SELECT t.min_decrypt_version, t.shredded_at,
                        v.version, v.state, v.root_key_ref, v.wrapped, v.key_check, v.created_at,
                        t.tenant
                 FROM tenants t LEFT JOIN key_versions v ON v.tenant = t.tenant
                 WHERE t.tenant = $1
                 ORDER BY v.version ASC",
            )
            .await
            .map_err(self.db(action))?;
        let rows = client
            .query(&stmt, &[&tenant.as_str()])
            .await
            .map_err(self.db(action))?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let (min_decrypt_version, shredded_at) = parse_tenant_columns(tenant, first)?;
        // The id as stored, not as asked for: the keyring refuses a record filed under
        // another id.
        let stored: &str = column(first, 8, || format!("the id of tenant '{tenant}'"))?;
        let stored_id = TenantId::new(stored)
            .map_err(|_| corrupt(format!("tenant '{tenant}' is stored under an invalid id")))?;
        let mut versions = Vec::with_capacity(rows.len());
        for row in &rows {
            // The LEFT JOIN yields one all-NULL version for a tenant without versions.
            let version: Option<i64> =
                column(row, 2, || format!("a key version of tenant '{tenant}'"))?;
            if version.is_some() {
                versions.push(parse_version_row(tenant, row)?);
            }
        }
        Ok(Some(TenantRecord {
            tenant: stored_id,
            versions,
            min_decrypt_version,
            shredded_at,
        }))
    }

    /// Locks the tenant row for the rest of `tx`; an unknown tenant is an error and a shredded
    /// one is [`StoreRefusal::Shredded`].
    async fn lock_live_tenant(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        tenant: &TenantId,
    ) -> Result<(), PostgresStoreError> {
        let action = "lock the tenant";
        let stmt = tx
            .prepare_cached("SELECT shredded_at FROM tenants WHERE tenant = $1 FOR UPDATE")
            .await
            .map_err(self.db(action))?;
        let row = tx
            .query_opt(&stmt, &[&tenant.as_str()])
            .await
            .map_err(self.db(action))?;
        let Some(row) = row else {
            return Err(StoreRefusal::TenantNotFound {
                tenant: tenant.clone(),
            }
            .into());
        };
        let shredded_at: Option<PgTime> =
            column(&row, 0, || format!("shredded_at of tenant '{tenant}'"))?;
        match shredded_at {
            None => Ok(()),
            Some(t) => Err(StoreRefusal::Shredded {
                tenant: tenant.clone(),
                shredded_at: timestamp_of(t, || format!("tenant '{tenant}' shredded_at"))?
                    .to_string(),
            }
            .into()),
        }
    }

    async fn latest_version(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        tenant: &TenantId,
    ) -> Result<u32, PostgresStoreError> {
        let action = "read the latest key version";
        let stmt = tx
            .prepare_cached("SELECT COALESCE(MAX(version), 0) FROM key_versions WHERE tenant = $1")
            .await
            .map_err(self.db(action))?;
        let row = tx
            .query_one(&stmt, &[&tenant.as_str()])
            .await
            .map_err(self.db(action))?;
        let latest: i64 = column(&row, 0, || {
            format!("the latest version of tenant '{tenant}'")
        })?;
        u32::try_from(latest).map_err(|_| {
            corrupt(format!(
                "tenant '{tenant}' has key version {latest}, outside 1..=2^32-1"
            ))
        })
    }

    /// Queues `NOTIFY <schema>_key_changes, '<tenant>'` in `tx`: PostgreSQL delivers it to the
    /// listeners when (and only if) `tx` commits.
    async fn notify(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        tenant: &TenantId,
    ) -> Result<(), PostgresStoreError> {
        let action = "queue the change notification";
        let stmt = tx
            .prepare_cached("SELECT pg_notify($1, $2)")
            .await
            .map_err(self.db(action))?;
        tx.execute(&stmt, &[&&*self.channel, &tenant.as_str()])
            .await
            .map_err(self.db(action))?;
        Ok(())
    }

    async fn insert_record(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        tenant: &TenantId,
        record: &KeyRecord,
    ) -> Result<(), PostgresStoreError> {
        let action = "insert the key version";
        let (root_key_ref, wrapped) = match &record.wrapped {
            Some(w) => (Some(w.root_key_ref.as_str()), Some(w.ciphertext.as_slice())),
            None => (None, None),
        };
        let stmt = tx
            .prepare_cached(
                "INSERT INTO key_versions
                     (tenant, version, state, root_key_ref, wrapped, key_check, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await
            .map_err(self.db(action))?;
        tx.execute(
            &stmt,
            &[
                &tenant.as_str(),
                &i64::from(record.version),
                &KeyState::Primary.as_str(),
                &root_key_ref,
                &wrapped,
                &record.key_check.as_slice(),
                &PgTime::from_timestamp(record.created_at),
            ],
        )
        .await
        .map_err(self.db(action))?;
        Ok(())
    }

    async fn create(&self, tenant: &TenantId, first: &KeyRecord) -> Result<(), PostgresStoreError> {
        StoreRefusal::check_first_version(tenant, first)?;
        let action = "create the tenant";
        let mut client = self.client(action).await?;
        let tx = client.transaction().await.map_err(self.db(action))?;
        // A concurrent create of the same id waits for this one's commit, then inserts nothing.
        let stmt = tx
            .prepare_cached(
                "INSERT INTO tenants (tenant, min_decrypt_version, shredded_at, created_at)
                 VALUES ($1, 1, NULL, $2) ON CONFLICT (tenant) DO NOTHING",
            )
            .await
            .map_err(self.db(action))?;
        let inserted = tx
            .execute(
                &stmt,
                &[&tenant.as_str(), &PgTime::from_timestamp(first.created_at)],
            )
            .await
            .map_err(self.db(action))?;
        if inserted != 1 {
            return Err(StoreRefusal::TenantExists {
                tenant: tenant.clone(),
            }
            .into());
        }
        self.insert_record(&tx, tenant, first).await?;
        self.notify(&tx, tenant).await?;
        tx.commit().await.map_err(self.db("commit the new tenant"))
    }

    async fn insert_version(
        &self,
        tenant: &TenantId,
        expected_latest: u32,
        next: &KeyRecord,
    ) -> Result<(), PostgresStoreError> {
        StoreRefusal::check_new_version(tenant, next)?;
        let action = "rotate the tenant key";
        let mut client = self.client(action).await?;
        let tx = client.transaction().await.map_err(self.db(action))?;
        // Serializes rotations (and every other write) of this tenant across all processes.
        self.lock_live_tenant(&tx, tenant).await?;
        let actual_latest = self.latest_version(&tx, tenant).await?;
        StoreRefusal::check_rotation(tenant, expected_latest, actual_latest, next.version)?;
        let stmt = tx
            .prepare_cached(
                "UPDATE key_versions SET state = 'decrypt_only'
                 WHERE tenant = $1 AND state = 'primary'",
            )
            .await
            .map_err(self.db("demote the old primary key version"))?;
        tx.execute(&stmt, &[&tenant.as_str()])
            .await
            .map_err(self.db("demote the old primary key version"))?;
        self.insert_record(&tx, tenant, next).await?;
        self.notify(&tx, tenant).await?;
        tx.commit()
            .await
            .map_err(self.db("commit the new key version"))
    }

    async fn set_min(
        &self,
        tenant: &TenantId,
        expected_min: u32,
        min: u32,
    ) -> Result<(), PostgresStoreError> {
        let action = "update the minimum decryption version";
        let mut client = self.client(action).await?;
        let tx = client.transaction().await.map_err(self.db(action))?;
        self.lock_live_tenant(&tx, tenant).await?;
        let latest = self.latest_version(&tx, tenant).await?;
        StoreRefusal::check_min_decrypt_version(tenant, min, latest)?;
        let stmt = tx
            .prepare_cached(
                "UPDATE tenants SET min_decrypt_version = $2
                 WHERE tenant = $1 AND min_decrypt_version = $3",
            )
            .await
            .map_err(self.db(action))?;
        let updated = tx
            .execute(
                &stmt,
                &[&tenant.as_str(), &i64::from(min), &i64::from(expected_min)],
            )
            .await
            .map_err(self.db(action))?;
        if updated != 1 {
            return Err(StoreRefusal::MinVersionChanged {
                tenant: tenant.clone(),
                expected: expected_min,
            }
            .into());
        }
        self.notify(&tx, tenant).await?;
        tx.commit()
            .await
            .map_err(self.db("commit the minimum decryption version"))
    }

    async fn shred(&self, tenant: &TenantId, at: Timestamp) -> Result<(), PostgresStoreError> {
        let action = "shred the tenant";
        let mut client = self.client(action).await?;
        let tx = client.transaction().await.map_err(self.db(action))?;
        // Shredding again is allowed (to retry the vacuum) and keeps the first time. Updating
        // the tenant row first locks it, as every other write does.
        let stmt = tx
            .prepare_cached(
                "UPDATE tenants SET shredded_at = COALESCE(shredded_at, $2) WHERE tenant = $1",
            )
            .await
            .map_err(self.db("mark the tenant shredded"))?;
        let found = tx
            .execute(&stmt, &[&tenant.as_str(), &PgTime::from_timestamp(at)])
            .await
            .map_err(self.db("mark the tenant shredded"))?;
        if found != 1 {
            return Err(StoreRefusal::TenantNotFound {
                tenant: tenant.clone(),
            }
            .into());
        }
        let stmt = tx
            .prepare_cached(
                "UPDATE key_versions SET state = 'destroyed', wrapped = NULL, root_key_ref = NULL
                 WHERE tenant = $1",
            )
            .await
            .map_err(self.db("destroy the key versions"))?;
        tx.execute(&stmt, &[&tenant.as_str()])
            .await
            .map_err(self.db("destroy the key versions"))?;
        self.notify(&tx, tenant).await?;
        tx.commit().await.map_err(self.db("commit the shred"))
    }

    /// Removes the old row versions that MVCC keeps after the shred's `UPDATE`. Runs after the
    /// shred committed, so every failure is [`PostgresStoreError::VacuumIncomplete`].
    async fn vacuum_after_shred(&self, tenant: &TenantId) -> Result<(), PostgresStoreError> {
        let incomplete = |reason: String, kind| PostgresStoreError::VacuumIncomplete {
            tenant: tenant.clone(),
            reason,
            kind,
        };
        let driver = |e: tokio_postgres::Error| {
            let cause = DatabaseError::from_driver(&e);
            incomplete(cause.to_string(), cause.kind())
        };
        let vacuum = async {
            let client = self.pool.get().await.map_err(|e| {
                let cause = DatabaseError::from_pool(e, self.connect_timeout);
                incomplete(cause.to_string(), cause.kind())
            })?;
            // VACUUM on a table the role may not vacuum only warns and skips it: check first.
            let row = client
                .query_one(
                    "SELECT pg_has_role(c.relowner, 'USAGE') OR pg_has_role(d.datdba, 'USAGE'),
                            current_user::text
                     FROM pg_class c, pg_database d
                     WHERE c.oid = 'key_versions'::regclass AND d.datname = current_database()",
                    &[],
                )
                .await
                .map_err(driver)?;
            let permitted: bool = row.try_get(0).map_err(driver)?;
            if !permitted {
                let role: String = row.try_get(1).map_err(driver)?;
                return Err(incomplete(
                    format!(
                        "role '{}' may not vacuum it (only the table's owner, the database's \
                         owner or a superuser may): make the store's role own the tables \
                         (ALTER TABLE {}.key_versions OWNER TO ...)",
                        truncate(&role),
                        schema::ident(&self.schema)
                    ),
                    BackendErrorKind::Misconfigured,
                ));
            }
            // VACUUM cannot run in a transaction block: a simple-protocol statement of its own.
            client
                .batch_execute("VACUUM key_versions")
                .await
                .map_err(driver)
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, vacuum).await {
            Ok(result) => result,
            Err(_) => Err(incomplete(
                DatabaseError::timeout("for the database to answer", OPERATION_TIMEOUT).to_string(),
                BackendErrorKind::Unavailable,
            )),
        }
    }

    async fn list(&self) -> Result<Vec<TenantId>, PostgresStoreError> {
        let action = "list the tenants";
        let client = self.client(action).await?;
        let stmt = client
            .prepare_cached("SELECT tenant FROM tenants")
            .await
            .map_err(self.db(action))?;
        let rows = client.query(&stmt, &[]).await.map_err(self.db(action))?;
        let mut tenants = rows
            .iter()
            .map(|row| {
                let name: String = column(row, 0, || "a stored tenant id".to_owned())?;
                TenantId::new(&name).map_err(|_| {
                    corrupt(format!(
                        "stored tenant id {:?} is not a valid tenant id",
                        truncate(&name)
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Byte order, as `TenantId` orders (not the database's collation).
        tenants.sort();
        Ok(tenants)
    }

    async fn replace_wrapped(
        &self,
        tenant: &TenantId,
        version: u32,
        expected: &WrappedKey,
        replacement: &WrappedKey,
    ) -> Result<(), PostgresStoreError> {
        let action = "replace the wrapped key";
        let mut client = self.client(action).await?;
        let tx = client.transaction().await.map_err(self.db(action))?;
        // A compare-and-set in one statement: a concurrent writer's committed change is
        // re-checked against the WHERE clause before this row is updated.
        let stmt = tx
            .prepare_cached(
                "UPDATE key_versions SET root_key_ref = $5, wrapped = $6
                 WHERE tenant = $1 AND version = $2 AND state <> 'destroyed'
                   AND root_key_ref = $3 AND wrapped = $4",
            )
            .await
            .map_err(self.db(action))?;
        let changed = tx
            .execute(
                &stmt,
                &[
                    &tenant.as_str(),
                    &i64::from(version),
                    &expected.root_key_ref,
                    &expected.ciphertext,
                    &replacement.root_key_ref,
                    &replacement.ciphertext,
                ],
            )
            .await
            .map_err(self.db(action))?;
        if changed != 1 {
            let stmt = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM key_versions WHERE tenant = $1 AND version = $2),
                            EXISTS (SELECT 1 FROM tenants WHERE tenant = $1)",
                )
                .await
                .map_err(self.db("read the key version"))?;
            let row = tx
                .query_one(&stmt, &[&tenant.as_str(), &i64::from(version)])
                .await
                .map_err(self.db("read the key version"))?;
            let version_exists: bool = column(&row, 0, || "a key version's existence".to_owned())?;
            let tenant_exists: bool = column(&row, 1, || "a tenant's existence".to_owned())?;
            return Err(if version_exists {
                StoreRefusal::WrappedChanged {
                    tenant: tenant.clone(),
                    version,
                }
            } else if !tenant_exists {
                StoreRefusal::TenantNotFound {
                    tenant: tenant.clone(),
                }
            } else {
                StoreRefusal::VersionNotFound {
                    tenant: tenant.clone(),
                    version,
                }
            }
            .into());
        }
        self.notify(&tx, tenant).await?;
        tx.commit()
            .await
            .map_err(self.db("commit the replaced wrapped key"))
    }
}

#[async_trait]
impl KeyStore for PostgresKeyStore {
    fn name(&self) -> &str {
        "postgres"
    }

    async fn create_tenant(&self, tenant: &TenantId, first: KeyRecord) -> Result<(), BackendError> {
        let inner = &self.inner;
        Ok(inner
            .timed("create the tenant", inner.create(tenant, &first))
            .await?)
    }

    async fn load_tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, BackendError> {
        let inner = &self.inner;
        Ok(inner.timed("load the tenant", inner.load(tenant)).await?)
    }

    async fn insert_version(
        &self,
        tenant: &TenantId,
        expected_latest: u32,
        next: KeyRecord,
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        Ok(inner
            .timed(
                "rotate the tenant key",
                inner.insert_version(tenant, expected_latest, &next),
            )
            .await?)
    }

    async fn set_min_decrypt_version(
        &self,
        tenant: &TenantId,
        expected_min: u32,
        min: u32,
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        Ok(inner
            .timed(
                "update the minimum decryption version",
                inner.set_min(tenant, expected_min, min),
            )
            .await?)
    }

    async fn shred_tenant(&self, tenant: &TenantId, at: Timestamp) -> Result<(), BackendError> {
        let inner = &self.inner;
        inner
            .timed("shred the tenant", inner.shred(tenant, at))
            .await?;
        Ok(inner.vacuum_after_shred(tenant).await?)
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, BackendError> {
        let inner = &self.inner;
        Ok(inner.timed("list the tenants", inner.list()).await?)
    }

    async fn replace_wrapped(
        &self,
        tenant: &TenantId,
        version: u32,
        expected: &WrappedKey,
        replacement: WrappedKey,
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        Ok(inner
            .timed(
                "replace the wrapped key",
                inner.replace_wrapped(tenant, version, expected, &replacement),
            )
            .await?)
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
    fn timestamps_round_down_to_the_microsecond() {
        let ts = Timestamp::from_nanosecond(1_700_000_000_123_456_789).unwrap();
        let back = PgTime::from_timestamp(ts).to_timestamp().unwrap();
        assert_eq!(back.as_nanosecond(), 1_700_000_000_123_456_000);
        // Before 1970 too (floor, not towards zero).
        let ts = Timestamp::from_nanosecond(-1_500).unwrap();
        assert_eq!(
            PgTime::from_timestamp(ts)
                .to_timestamp()
                .unwrap()
                .as_nanosecond(),
            -2_000
        );
        // The PostgreSQL epoch is 0.
        let y2k = Timestamp::from_second(946_684_800).unwrap();
        assert_eq!(PgTime::from_timestamp(y2k).0, 0);
        // Far dates round-trip (to the microsecond); the extremes of jiff's range do not panic.
        for t in ["0001-01-01T00:00:00.000001Z", "9999-12-30T12:00:00.999999Z"] {
            let t: Timestamp = t.parse().unwrap();
            assert_eq!(PgTime::from_timestamp(t).to_timestamp(), Some(t));
        }
        for t in [Timestamp::MIN, Timestamp::MAX] {
            let _ = PgTime::from_timestamp(t).to_timestamp();
        }
        // ±infinity.
        assert!(PgTime(i64::MAX).to_timestamp().is_none());
        assert!(PgTime(i64::MIN).to_timestamp().is_none());
    }
}
