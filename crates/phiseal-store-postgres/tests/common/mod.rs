//! Test harness: throwaway PostgreSQL clusters and one database per test.
//!
//! - [`shared`] is the process-wide server: the one named by `PHISEAL_TEST_DATABASE_URL`
//!   (a role that may `CREATE DATABASE`), or a throwaway cluster started on first use (initdb
//!   as the `postgres` user when running as root, a random free port on 127.0.0.1, trust
//!   authentication). Under nextest every test is its own process, so each gets its own
//!   cluster; under `cargo test` the tests of a binary share one.
//! - [`Cluster::start`] starts a private cluster, for tests that stop the server or need TLS or
//!   password authentication; those always run on their own cluster.
//! - Every cluster is stopped and its directory removed when its [`Cluster`] is dropped
//!   (including while a test panics), and in any case when the test process exits, however it
//!   exits: a watchdog process (its own process group, so signals to the test's group do not
//!   reach it) waits for its stdin pipe to close, which the kernel does when the test process
//!   ends, then stops the cluster with `pg_ctl stop -m immediate` and deletes it.
//! - PostgreSQL missing or not starting is a test *failure* with a message saying what to
//!   install, never a skip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    dead_code,
    unreachable_pub
)]

use std::sync::OnceLock;
use std::time::Duration;

use jiff::Timestamp;
use phiseal::context::TenantId;
use phiseal::kms::WrappedKey;
use phiseal::store::{KeyRecord, KeyState, TenantRecord};
use phiseal_store_postgres::{PostgresKeyStore, PostgresStoreConfig};

pub use phiseal_store_postgres::testkit::*;

/// The process-wide server.
enum Shared {
    External(String),
    Local(Cluster),
}

static SHARED: OnceLock<Shared> = OnceLock::new();

fn shared() -> &'static Shared {
    SHARED.get_or_init(|| match std::env::var(DATABASE_URL_ENV) {
        Ok(url) if !url.is_empty() => Shared::External(url),
        _ => Shared::Local(Cluster::start(ClusterOptions::default())),
    })
}

/// `url` with its database name replaced by `dbname` (URL form only).
fn with_dbname(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base
        .find("://")
        .map(|i| i + 3)
        .unwrap_or_else(|| panic!("{DATABASE_URL_ENV} must be a postgresql:// URL"));
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    format!("{}/{dbname}{query}", &base[..authority_end])
}

/// Connects with the driver directly (no pool), for set-up and raw inspection.
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect for the test itself: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A fresh database for one test.
pub struct TestDb {
    pub url: String,
    pub name: String,
    admin_url: String,
}

impl TestDb {
    /// A new database on the shared server.
    pub async fn new(label: &str) -> TestDb {
        let admin_url = match shared() {
            Shared::External(url) => url.clone(),
            Shared::Local(cluster) => cluster.admin_url(),
        };
        Self::create(admin_url, label).await
    }

    /// A new database on `cluster`.
    pub async fn on(cluster: &Cluster, label: &str) -> TestDb {
        Self::create(cluster.admin_url(), label).await
    }

    async fn create(admin_url: String, label: &str) -> TestDb {
        let label: String = label
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(24)
            .collect();
        let name = format!("phiseal_t_{}_{}", label.to_ascii_lowercase(), unique());
        raw(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDb {
            url: with_dbname(&admin_url, &name),
            name,
            admin_url,
        }
    }

    pub fn config(&self) -> PostgresStoreConfig {
        PostgresStoreConfig::new(self.url.clone())
    }

    pub async fn open(&self) -> PostgresKeyStore {
        PostgresKeyStore::open(&self.config())
            .await
            .unwrap_or_else(|e| panic!("open the store: {e}"))
    }

    /// A raw driver connection to this database, with the store's default schema first in
    /// its search path (so the test's own SQL names the store's tables unqualified).
    pub async fn raw(&self) -> tokio_postgres::Client {
        let client = raw(&self.url).await;
        client
            .batch_execute(&format!(
                "SET search_path = {}, public",
                phiseal_store_postgres::DEFAULT_SCHEMA
            ))
            .await
            .unwrap_or_else(|e| panic!("set the test connection's search path: {e}"));
        client
    }

    /// A raw driver connection to this database with the role's own search path.
    pub async fn raw_default_path(&self) -> tokio_postgres::Client {
        raw(&self.url).await
    }

    /// Drops the database (only worth it on an external server; throwaway clusters are
    /// deleted whole).
    pub async fn drop_database(self) {
        if matches!(shared(), Shared::External(_)) {
            let _ = raw(&self.admin_url)
                .await
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

// ----- records ---------------------------------------------------------------------------

pub fn tid(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

/// Distinctive wrapped bytes, so shredding can be checked by searching for them.
pub fn marker(tenant: &str, version: u32) -> Vec<u8> {
    format!("WRAPPED-MARKER<{tenant}/v{version:04}>-0123456789abcdef-0123456789abcdef").into_bytes()
}

pub fn record(tenant: &str, version: u32) -> KeyRecord {
    KeyRecord {
        version,
        state: KeyState::Primary,
        wrapped: Some(WrappedKey {
            root_key_ref: "test".into(),
            ciphertext: marker(tenant, version),
        }),
        key_check: [version as u8; 32],
        created_at: Timestamp::from_second(1_700_000_000 + i64::from(version)).unwrap(),
    }
}

pub fn versions(rec: &TenantRecord) -> Vec<u32> {
    rec.versions.iter().map(|r| r.version).collect()
}

pub fn states(rec: &TenantRecord) -> Vec<KeyState> {
    rec.versions.iter().map(|r| r.state).collect()
}

/// Versions are exactly 1..=n, ascending, one primary (the last), the rest decrypt-only.
pub fn assert_clean_history(rec: &TenantRecord, n: u32) {
    assert_eq!(versions(rec), (1..=n).collect::<Vec<_>>());
    let primaries: Vec<u32> = rec
        .versions
        .iter()
        .filter(|r| r.state == KeyState::Primary)
        .map(|r| r.version)
        .collect();
    assert_eq!(primaries, vec![n]);
    assert!(
        rec.versions
            .iter()
            .filter(|r| r.version != n)
            .all(|r| r.state == KeyState::DecryptOnly)
    );
}

/// Polls `f` until it returns true, for at most `limit`.
pub async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
