//! Cross-process cache invalidation through LISTEN/NOTIFY against a real server: a second
//! store (another pool, as another daemon would have) watches the writes of the first;
//! rolled-back writes notify nobody; the watcher survives a server restart and reports
//! everything as changed; a dropped watcher is silent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, ClusterOptions, TestDb, record, tid};
use jiff::Timestamp;
use phiseal::kms::WrappedKey;
use phiseal::store::KeyStore;
use phiseal_store_postgres::{
    CHANGES_CHANNEL, Change, ChangeWatcher, DEFAULT_SCHEMA, PostgresKeyStore, PostgresStoreError,
    TlsMode, changes_channel,
};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// How long a committed change may take to reach another process's watcher.
const DELIVERY: Duration = Duration::from_secs(2);

/// A watcher on `store` whose changes arrive on the returned channel.
fn watch(store: &PostgresKeyStore) -> (ChangeWatcher, UnboundedReceiver<Change>) {
    let (sender, receiver) = unbounded_channel();
    let watcher = store
        .watch_changes(move |change| {
            let _ = sender.send(change);
        })
        .unwrap();
    (watcher, receiver)
}

async fn next(changes: &mut UnboundedReceiver<Change>, limit: Duration) -> Option<Change> {
    tokio::time::timeout(limit, changes.recv())
        .await
        .ok()
        .flatten()
}

/// The next change is `expected`, within `limit`.
async fn expect(changes: &mut UnboundedReceiver<Change>, expected: Change, limit: Duration) {
    let started = Instant::now();
    match next(changes, limit).await {
        Some(change) => assert_eq!(change, expected, "after {:?}", started.elapsed()),
        None => panic!("no {expected:?} within {limit:?}"),
    }
}

fn tenant(name: &str) -> Change {
    Change::Tenant(tid(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_idle_session_timeout_does_not_end_the_listener() {
    let db = TestDb::new("idlewatch").await;
    let raw = db.raw_default_path().await;
    raw.batch_execute(&format!(
        "ALTER DATABASE {} SET idle_session_timeout = '1s'",
        db.name
    ))
    .await
    .unwrap();
    let store = db.open().await;
    let (watcher, mut changes) = watch(&store);
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    // Several idle timeouts later (and before the 10 s heartbeat): still the first session,
    // and no second "everything changed".
    assert_eq!(next(&mut changes, Duration::from_secs(4)).await, None);
    assert!(watcher.is_listening());
    assert_eq!(watcher.sessions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_writes_notify_other_processes_and_rolled_back_ones_do_not() {
    let db = TestDb::new("watch").await;
    let writer = db.open().await;
    // Another daemon: its own pool, its own listener.
    let reader = db.open().await;
    let (watcher, mut changes) = watch(&reader);
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    assert!(watcher.is_listening());
    assert_eq!(watcher.sessions(), 1);
    let t = tid("acme");

    // Every kind of committed write reports its tenant.
    let started = Instant::now();
    writer.create_tenant(&t, record("acme", 1)).await.unwrap();
    expect(&mut changes, tenant("acme"), DELIVERY).await;
    eprintln!("create seen after {:?}", started.elapsed());
    writer
        .insert_version(&t, 1, record("acme", 2))
        .await
        .unwrap();
    expect(&mut changes, tenant("acme"), DELIVERY).await;
    writer.set_min_decrypt_version(&t, 1, 2).await.unwrap();
    expect(&mut changes, tenant("acme"), DELIVERY).await;
    let current = record("acme", 2).wrapped.unwrap();
    let rewrapped = WrappedKey {
        root_key_ref: "root-2".into(),
        ciphertext: b"rewrapped".to_vec(),
    };
    writer
        .replace_wrapped(&t, 2, &current, rewrapped.clone())
        .await
        .unwrap();
    expect(&mut changes, tenant("acme"), DELIVERY).await;

    // Writes that fail or lose a compare-and-set roll back and notify nobody. The next
    // notification is therefore the sentinel's (notifications arrive in commit order).
    writer
        .insert_version(&t, 1, record("acme", 2))
        .await
        .unwrap_err();
    writer
        .replace_wrapped(&t, 2, &current, rewrapped.clone())
        .await
        .unwrap_err();
    writer.set_min_decrypt_version(&t, 2, 9).await.unwrap_err();
    writer
        .create_tenant(&t, record("acme", 1))
        .await
        .unwrap_err();
    writer
        .insert_version(&tid("nobody"), 0, record("nobody", 1))
        .await
        .unwrap_err();
    // Two processes race for the same rotation: one wins, and one notification is sent.
    let (a, b) = tokio::join!(
        writer.insert_version(&t, 2, record("acme", 3)),
        reader.insert_version(&t, 2, record("acme", 3)),
    );
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    expect(&mut changes, tenant("acme"), DELIVERY).await;
    writer
        .create_tenant(&tid("sentinel"), record("sentinel", 1))
        .await
        .unwrap();
    expect(&mut changes, tenant("sentinel"), DELIVERY).await;

    // A transaction that notifies and rolls back notifies nobody either.
    let raw = db.raw().await;
    raw.batch_execute(&format!(
        "BEGIN; SELECT pg_notify('{CHANGES_CHANNEL}', 'rolled-back'); ROLLBACK"
    ))
    .await
    .unwrap();

    // Shredding reports the tenant.
    writer.shred_tenant(&t, Timestamp::now()).await.unwrap();
    expect(&mut changes, tenant("acme"), DELIVERY).await;

    // A payload that is not a tenant id means "everything", and never breaks the watcher.
    for payload in ["not a tenant id!", ""] {
        raw.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &payload])
            .await
            .unwrap();
        expect(&mut changes, Change::All, DELIVERY).await;
    }
    writer
        .create_tenant(&tid("after"), record("after", 1))
        .await
        .unwrap();
    expect(&mut changes, tenant("after"), DELIVERY).await;

    // The writer's own changes would reach its own watcher too; nothing else is pending.
    assert_eq!(next(&mut changes, Duration::from_millis(300)).await, None);
    assert!(watcher.is_listening());
    assert_eq!(watcher.sessions(), 1);
    drop(watcher);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reconnects_after_a_restart_and_reports_everything() {
    let cluster = Cluster::start(ClusterOptions::default());
    let db = TestDb::on(&cluster, "watchrestart").await;
    let mut config = db.config();
    config.connect_timeout = Duration::from_secs(2);
    let writer = PostgresKeyStore::open(&config).await.unwrap();
    let reader = PostgresKeyStore::open(&config).await.unwrap();
    let (watcher, mut changes) = watch(&reader);
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    writer
        .create_tenant(&tid("before"), record("before", 1))
        .await
        .unwrap();
    expect(&mut changes, tenant("before"), DELIVERY).await;

    cluster.stop();
    assert!(
        common::eventually(Duration::from_secs(5), async || !watcher.is_listening()).await,
        "the watcher did not notice that the server is gone"
    );
    // Let it fail to reconnect a few times (the backoff grows).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!watcher.is_listening());
    assert_eq!(next(&mut changes, Duration::ZERO).await, None);

    cluster.restart();
    // Back within the backoff cap (5 s) plus connecting: everything is reported as changed.
    let started = Instant::now();
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    eprintln!("relistening after {:?}", started.elapsed());
    assert!(watcher.is_listening());
    assert_eq!(watcher.sessions(), 2);

    // And notifications flow again (the writer's pool recovers on fresh connections).
    let t = tid("after");
    assert!(
        common::eventually(Duration::from_secs(10), async || writer
            .create_tenant(&t, record("after", 1))
            .await
            .is_ok())
        .await
    );
    expect(&mut changes, tenant("after"), DELIVERY).await;
    writer
        .insert_version(&t, 1, record("after", 2))
        .await
        .unwrap();
    expect(&mut changes, tenant("after"), DELIVERY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_or_stopped_watcher_is_silent_and_closes_its_connection() {
    let db = TestDb::new("watchdrop").await;
    let writer = db.open().await;
    let reader = db.open().await;
    // The listener's session: its last statement is `LISTEN …` or, after the first
    // heartbeat (every 10 s), the heartbeat's `SELECT 1`, which the pools never send.
    let listeners = async || -> i64 {
        db.raw()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND query = ANY($1)",
                &[&vec![
                    format!("LISTEN \"{CHANGES_CHANNEL}\""),
                    "SELECT 1".to_owned(),
                ]],
            )
            .await
            .unwrap()
            .get(0)
    };

    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let watcher = reader
        .watch_changes(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    assert!(common::eventually(Duration::from_secs(10), async || watcher.is_listening()).await);
    assert!(
        format!("{watcher:?}").contains("listening: true"),
        "{watcher:?}"
    );
    assert_eq!(listeners().await, 1);
    writer
        .create_tenant(&tid("one"), record("one", 1))
        .await
        .unwrap();
    assert!(
        common::eventually(DELIVERY, async || calls.load(Ordering::SeqCst) == 2).await,
        "{}",
        calls.load(Ordering::SeqCst)
    );

    drop(watcher);
    let after_drop = calls.load(Ordering::SeqCst);
    writer
        .create_tenant(&tid("two"), record("two", 1))
        .await
        .unwrap();
    writer
        .insert_version(&tid("one"), 1, record("one", 2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), after_drop);
    assert!(
        common::eventually(Duration::from_secs(5), async || listeners().await == 0).await,
        "the dropped watcher's connection is still open"
    );

    // stop() does the same, and is idempotent.
    let (watcher, mut changes) = watch(&reader);
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    watcher.stop();
    watcher.stop();
    assert!(!watcher.is_listening());
    writer
        .create_tenant(&tid("three"), record("three", 1))
        .await
        .unwrap();
    assert_eq!(next(&mut changes, Duration::from_secs(1)).await, None);
    drop(watcher);

    // A watcher that stops itself from its callback makes that call its last.
    let slot: Arc<std::sync::OnceLock<ChangeWatcher>> = Arc::default();
    let (sender, mut changes) = unbounded_channel();
    let own = Arc::clone(&slot);
    let watcher = reader
        .watch_changes(move |change| {
            let _ = sender.send(change);
            if let Some(watcher) = own.get() {
                watcher.stop();
            }
        })
        .unwrap();
    let _ = slot.set(watcher);
    // The first All may come before the slot is set: trigger calls until one stops it.
    let mut seen = 0;
    for i in 0..20 {
        let name = format!("self-stop-{i}");
        writer
            .create_tenant(&tid(&name), record(&name, 1))
            .await
            .unwrap();
        if next(&mut changes, Duration::from_millis(500))
            .await
            .is_some()
        {
            seen += 1;
        }
        if slot.get().is_some_and(|w| !w.is_listening()) {
            break;
        }
    }
    assert!(seen >= 1);
    assert!(!slot.get().unwrap().is_listening());
    writer
        .create_tenant(&tid("silence"), record("silence", 1))
        .await
        .unwrap();
    assert_eq!(next(&mut changes, Duration::from_secs(1)).await, None);

    // Outside a Tokio runtime there is nothing to run the watcher on: an error, not a panic.
    let store = reader.clone();
    let result = std::thread::spawn(move || store.watch_changes(|_| {}).map(drop))
        .join()
        .unwrap();
    assert!(
        matches!(result, Err(PostgresStoreError::Config { .. })),
        "{result:?}"
    );
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_faster_than_the_callback_becomes_everything_changed_without_a_reconnect() {
    let db = TestDb::new("watchburst").await;
    let store = db.open().await;
    let (sender, mut changes) = unbounded_channel();
    // A slow callback (2 ms per change) while 2000 notifications arrive at once.
    let watcher = store
        .watch_changes(move |change: Change| {
            std::thread::sleep(Duration::from_millis(2));
            let _ = sender.send(change);
        })
        .unwrap();
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    let raw = db.raw().await;
    raw.batch_execute(&format!(
        "SELECT pg_notify('{CHANGES_CHANNEL}', 'burst-' || g) FROM generate_series(1, 2000) g"
    ))
    .await
    .unwrap();
    // Some notifications are dropped (the buffer holds 256) and reported as "everything
    // changed"; the listener neither stalls nor reconnects.
    let mut tenants = 0;
    let mut all = 0;
    while let Some(change) = next(&mut changes, Duration::from_secs(3)).await {
        match change {
            Change::All => all += 1,
            _ => tenants += 1,
        }
    }
    assert!(all >= 1, "no Change::All for the dropped notifications");
    assert!(tenants < 2000, "nothing was dropped: {tenants}");
    assert_eq!(watcher.sessions(), 1, "the listener reconnected");
    assert!(watcher.is_listening());
    drop(watcher);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_callback_does_not_stop_the_watcher() {
    let db = TestDb::new("watchpanic").await;
    let store = db.open().await;
    let (sender, mut changes) = unbounded_channel();
    let _watcher = store
        .watch_changes(move |change: Change| {
            let _ = sender.send(change.clone());
            if let Change::Tenant(t) = &change
                && t.as_str() == "boom"
            {
                panic!("callback panics on purpose");
            }
        })
        .unwrap();
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    for name in ["boom", "fine"] {
        store
            .create_tenant(&tid(name), record(name, 1))
            .await
            .unwrap();
        expect(&mut changes, tenant(name), DELIVERY).await;
    }
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_uses_tls_when_the_store_does() {
    let cluster = Cluster::start(ClusterOptions { tls: true });
    let db = TestDb::on(&cluster, "watchtls").await;
    let mut config = db.config();
    config.tls = TlsMode::Require {
        ca_file: Some(cluster.ca_file()),
    };
    let store = PostgresKeyStore::open(&config).await.unwrap();
    let (watcher, mut changes) = watch(&store);
    expect(&mut changes, Change::All, Duration::from_secs(10)).await;
    assert!(watcher.is_listening());
    let encrypted: bool = db
        .raw()
        .await
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = current_database() AND a.query = $1",
            &[&format!("LISTEN \"{CHANGES_CHANNEL}\"")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted);
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    expect(&mut changes, tenant("acme"), DELIVERY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_in_different_schemas_of_one_database_do_not_see_each_others_changes() {
    assert_eq!(changes_channel(DEFAULT_SCHEMA), CHANGES_CHANNEL);
    let db = TestDb::new("watchschemas").await;
    let mut other_config = db.config();
    other_config.schema = "other_deployment".into();
    let default = db.open().await;
    let other = PostgresKeyStore::open(&other_config).await.unwrap();
    let (_default_watcher, mut default_changes) = watch(&default);
    let (_other_watcher, mut other_changes) = watch(&other);
    expect(&mut default_changes, Change::All, Duration::from_secs(10)).await;
    expect(&mut other_changes, Change::All, Duration::from_secs(10)).await;

    // One tenant id in both deployments: each write reaches only its own deployment.
    other
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    expect(&mut other_changes, tenant("acme"), DELIVERY).await;
    default
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    expect(&mut default_changes, tenant("acme"), DELIVERY).await;
    other
        .create_tenant(&tid("sentinel"), record("sentinel", 1))
        .await
        .unwrap();
    // The other deployment's next change is its own sentinel, not the default's "acme".
    expect(&mut other_changes, tenant("sentinel"), DELIVERY).await;
    assert_eq!(next(&mut default_changes, DELIVERY).await, None);
    db.drop_database().await;
}
