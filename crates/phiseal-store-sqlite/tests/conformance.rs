//! The shared key-store conformance suite, on the embedded SQLite store.
#![allow(clippy::unwrap_used)]

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = phiseal_store_sqlite::SqliteKeyStore::open(dir.path().join("keys.db")).unwrap();
    phiseal::testkit::conformance::key_store(std::sync::Arc::new(store)).await;
}
