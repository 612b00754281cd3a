//! Behaviour of the PostgreSQL key store against a real server: the conformance suite, every
//! method, compare-and-set under tasks and processes, shredding, corrupt rows, migrations.
//! See `common/mod.rs` for how the server is provided.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{TestDb, assert_clean_history, marker, record, tid, versions};
use jiff::Timestamp;
use phiseal::BackendErrorKind;
use phiseal::kms::WrappedKey;
use phiseal::store::{KeyState, KeyStore};
use phiseal_store_postgres::{PostgresKeyStore, PostgresStoreError, SCHEMA_VERSION};

/// Env var naming the database a child process rotates in (see `child_rotate_50`).
const CHILD_URL_ENV: &str = "PHISEAL_PG_TEST_CHILD_URL";
const CHILD_TENANT: &str = "two-procs";
const CHILD_ROTATIONS: u32 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let db = TestDb::new("conformance").await;
    let store = db.open().await;
    phiseal::testkit::conformance::key_store(Arc::new(store)).await;
    db.drop_database().await;
}

#[tokio::test]
async fn round_trip_of_every_method() {
    let db = TestDb::new("roundtrip").await;
    let store = db.open().await;
    assert_eq!(store.name(), "postgres");
    assert!(
        store.target().ends_with(&format!("/{}", db.name)),
        "{}",
        store.target()
    );
    assert!(format!("{store:?}").contains(&db.name));

    let before = phiseal::testkit::conformance::key_store_methods(&store).await;

    // Everything survives a new pool (another sidecar).
    drop(store);
    let store = db.open().await;
    assert_eq!(store.load_tenant(&tid("acme")).await.unwrap(), before);
    db.drop_database().await;
}

#[tokio::test]
async fn timestamps_keep_microseconds_and_round_nanoseconds_down() {
    let db = TestDb::new("timestamps").await;
    let store = db.open().await;
    let t = tid("acme");
    let mut first = record("acme", 1);
    first.created_at = Timestamp::from_nanosecond(1_722_000_000_123_456_789).unwrap();
    store.create_tenant(&t, first).await.unwrap();
    let shredded = Timestamp::from_nanosecond(1_800_000_000_000_000_999).unwrap();
    store.shred_tenant(&t, shredded).await.unwrap();
    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(
        rec.versions[0].created_at.as_nanosecond(),
        1_722_000_000_123_456_000
    );
    assert_eq!(
        rec.shredded_at.unwrap().as_nanosecond(),
        1_800_000_000_000_000_000
    );
    // The database sees the same instant.
    let row = db
        .raw()
        .await
        .query_one(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')
             FROM key_versions",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "2024-07-26 13:20:00.123456");
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_twice_is_a_conflict_even_concurrently() {
    let db = TestDb::new("createtwice").await;
    let store = db.open().await;
    let t = tid("acme");
    store.create_tenant(&t, record("acme", 1)).await.unwrap();
    let before = store.load_tenant(&t).await.unwrap();
    let mut again = record("acme", 1);
    again.key_check = [0xee; 32];
    let err = store.create_tenant(&t, again).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict);
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(store.load_tenant(&t).await.unwrap(), before);

    // Eight creators of one new id on two pools: exactly one wins.
    let other = db.open().await;
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let store = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut rec = record("racy", 1);
            rec.key_check = [i; 32];
            store.create_tenant(&tid("racy"), rec).await.map(|()| i)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(i) => winners.push(i),
            Err(e) => assert_eq!(e.kind(), BackendErrorKind::Conflict, "{e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let rec = store.load_tenant(&tid("racy")).await.unwrap().unwrap();
    assert_eq!(rec.versions.len(), 1);
    assert_eq!(rec.versions[0].key_check, [winners[0]; 32]);
    db.drop_database().await;
}

#[tokio::test]
async fn invalid_new_records_are_refused() {
    let db = TestDb::new("invalid").await;
    let store = db.open().await;
    phiseal::testkit::conformance::key_store_invalid_records(&store).await;
    db.drop_database().await;
}

#[tokio::test]
async fn stale_compare_and_set_is_a_conflict_and_changes_nothing() {
    let db = TestDb::new("stalecas").await;
    let store = db.open().await;
    phiseal::testkit::conformance::key_store_stale_cas(&store).await;
    db.drop_database().await;
}

/// 16 tasks on two pools (two sidecars) rotate one tenant as fast as they can.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rotation_from_16_tasks_has_one_winner_per_version() {
    const TASKS: u32 = 16;
    const ATTEMPTS: u32 = 12;
    let db = TestDb::new("rotate16").await;
    let handles = [db.open().await, db.open().await];
    let t = tid("busy");
    handles[0]
        .create_tenant(&t, record("busy", 1))
        .await
        .unwrap();

    let conflicts = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = handles[(task % 2) as usize].clone();
        let t = t.clone();
        let conflicts = Arc::clone(&conflicts);
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for _ in 0..ATTEMPTS {
                let latest = store
                    .load_tenant(&t)
                    .await
                    .unwrap()
                    .unwrap()
                    .latest_version();
                // Bytes naming the task, to check who really wrote each version.
                let mut next = record("busy", latest + 1);
                next.wrapped.as_mut().unwrap().ciphertext =
                    format!("task-{task}-v{}", latest + 1).into_bytes();
                match store.insert_version(&t, latest, next).await {
                    Ok(()) => won.push(latest + 1),
                    Err(e) => {
                        assert_eq!(e.kind(), BackendErrorKind::Conflict, "{e}");
                        conflicts.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            (task, won)
        }));
    }
    let mut winner_of: BTreeMap<u32, u32> = BTreeMap::new();
    for task in tasks {
        let (task, won) = task.await.unwrap();
        for version in won {
            assert!(
                winner_of.insert(version, task).is_none(),
                "version {version} was won twice"
            );
        }
    }
    let rec = handles[1].load_tenant(&t).await.unwrap().unwrap();
    let n = rec.latest_version();
    let ok = u32::try_from(winner_of.len()).unwrap();
    eprintln!(
        "{ok} of {} rotation attempts won, {} conflicts",
        TASKS * ATTEMPTS,
        conflicts.load(Ordering::SeqCst)
    );
    assert!(ok >= ATTEMPTS, "every round has a winner: {ok}");
    assert_eq!(ok + conflicts.load(Ordering::SeqCst), TASKS * ATTEMPTS);
    // Versions 2..=n were each won exactly once, with no gap.
    assert_eq!(
        winner_of.keys().copied().collect::<Vec<_>>(),
        (2..=n).collect::<Vec<_>>()
    );
    assert_clean_history(&rec, n);
    for r in rec.versions.iter().filter(|r| r.version > 1) {
        assert_eq!(
            r.wrapped.as_ref().unwrap().ciphertext,
            format!("task-{}-v{}", winner_of[&r.version], r.version).into_bytes(),
            "version {} holds another task's record",
            r.version
        );
    }
    // The database agrees: one primary, no duplicate.
    let row = db
        .raw()
        .await
        .query_one(
            "SELECT count(*), count(DISTINCT version), count(*) FILTER (WHERE state = 'primary')
             FROM key_versions WHERE tenant = 'busy'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), i64::from(n));
    assert_eq!(row.get::<_, i64>(1), i64::from(n));
    assert_eq!(row.get::<_, i64>(2), 1);
    db.drop_database().await;
}

/// Parent half of the two-process test: two children rotate the same tenant 50 times each.
#[test]
fn two_processes_rotating_at_once_never_duplicate_a_version() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (db, store) = rt.block_on(async {
        let db = TestDb::new("twoprocs").await;
        let store = db.open().await;
        store
            .create_tenant(&tid(CHILD_TENANT), record(CHILD_TENANT, 1))
            .await
            .unwrap();
        (db, store)
    });

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "child_rotate_50",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_URL_ENV, &db.url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "child failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The child really ran the rotations (and was not filtered out).
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("child rotated 50 times"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rec = rt
        .block_on(store.load_tenant(&tid(CHILD_TENANT)))
        .unwrap()
        .unwrap();
    assert_clean_history(&rec, 2 * CHILD_ROTATIONS + 1);
    rt.block_on(db.drop_database());
}

/// Child half of the two-process test, run only by the parent (ignored in a normal run, so
/// that it is reported as skipped rather than as a vacuous pass).
#[tokio::test]
#[ignore = "child half of the two-process rotation test; its parent runs it"]
async fn child_rotate_50() {
    let url = std::env::var(CHILD_URL_ENV)
        .unwrap_or_else(|_| panic!("{CHILD_URL_ENV} is unset: run the parent test instead"));
    let store = PostgresKeyStore::open(&phiseal_store_postgres::PostgresStoreConfig::new(url))
        .await
        .unwrap();
    let t = tid(CHILD_TENANT);
    let mut done = 0;
    let mut conflicts = 0u32;
    while done < CHILD_ROTATIONS {
        let latest = store
            .load_tenant(&t)
            .await
            .unwrap()
            .unwrap()
            .latest_version();
        match store
            .insert_version(&t, latest, record(CHILD_TENANT, latest + 1))
            .await
        {
            Ok(()) => done += 1,
            Err(e) if e.kind() == BackendErrorKind::Conflict => {
                conflicts += 1;
                assert!(conflicts < 100_000, "livelock");
            }
            Err(e) => panic!("rotation failed: {e}"),
        }
    }
    eprintln!("child rotated {done} times ({conflicts} conflicts)");
}

/// Heap tuples of `key_versions` (live *and* dead, on every page) whose bytes contain
/// `needle`, through `pageinspect` (needs a superuser).
async fn tuples_containing(client: &tokio_postgres::Client, needle: &[u8]) -> i64 {
    client
        .query_one(
            "SELECT count(*)
             FROM generate_series(0, (pg_relation_size('key_versions')
                                      / current_setting('block_size')::bigint)::int - 1) AS blk,
                  heap_page_items(get_raw_page('key_versions', blk)) AS item
             WHERE item.t_data IS NOT NULL AND position($1::bytea IN item.t_data) > 0",
            &[&needle],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn shred_erases_wrapped_bytes_and_blocks_reuse() {
    let db = TestDb::new("shred").await;
    let store = db.open().await;
    let raw = db.raw().await;
    // pageinspect shows the dead row versions MVCC leaves behind; it needs a superuser, which
    // a throwaway cluster always has. Without it the test fails rather than check less.
    if let Err(e) = raw
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pageinspect SCHEMA public")
        .await
    {
        panic!(
            "pageinspect unavailable ({e}): this test inspects dead tuples and needs a \
             superuser; unset {} to use a throwaway cluster, or connect as a superuser",
            common::DATABASE_URL_ENV
        );
    }

    let t = tid("doomed");
    let keep = tid("kept");
    store.create_tenant(&t, record("doomed", 1)).await.unwrap();
    store.create_tenant(&keep, record("kept", 1)).await.unwrap();
    for v in 1..5 {
        store
            .insert_version(&t, v, record("doomed", v + 1))
            .await
            .unwrap();
    }
    // A rewrap leaves the old bytes of version 1 in a dead tuple, too.
    let rewrapped = WrappedKey {
        root_key_ref: "test-2".into(),
        ciphertext: b"REWRAPPED-MARKER-doomed-v1".to_vec(),
    };
    store
        .replace_wrapped(
            &t,
            1,
            &record("doomed", 1).wrapped.unwrap(),
            rewrapped.clone(),
        )
        .await
        .unwrap();
    let mut markers: Vec<Vec<u8>> = (1..=5).map(|v| marker("doomed", v)).collect();
    markers.push(rewrapped.ciphertext.clone());
    // The search below is meaningful: the bytes are in the heap before the shred.
    for m in &markers {
        assert!(tuples_containing(&raw, m).await >= 1);
    }

    let at = Timestamp::from_second(1_800_000_000).unwrap();
    store.shred_tenant(&t, at).await.unwrap();

    // No query returns them.
    let row = raw
        .query_one(
            "SELECT count(*) FILTER (WHERE wrapped IS NOT NULL OR root_key_ref IS NOT NULL),
                    count(*) FILTER (WHERE state <> 'destroyed'),
                    count(*)
             FROM key_versions WHERE tenant = 'doomed'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "wrapped bytes left in live rows");
    assert_eq!(row.get::<_, i64>(1), 0);
    assert_eq!(row.get::<_, i64>(2), 5, "the versions stay as tombstones");
    for m in &markers {
        let found: i64 = raw
            .query_one(
                "SELECT count(*) FROM key_versions WHERE position($1::bytea IN wrapped) > 0",
                &[m],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(found, 0);
    }
    // And the shred's VACUUM removed the old row versions from the table's pages.
    for m in &markers {
        assert_eq!(
            tuples_containing(&raw, m).await,
            0,
            "a dead tuple still holds {}",
            String::from_utf8_lossy(m)
        );
    }
    assert_eq!(tuples_containing(&raw, &marker("kept", 1)).await, 1);

    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(rec.shredded_at, Some(at));
    assert_eq!(versions(&rec), [1, 2, 3, 4, 5]);
    assert!(rec.versions.iter().all(|r| r.state == KeyState::Destroyed));
    assert!(rec.versions.iter().all(|r| r.wrapped.is_none()));
    assert!(rec.primary().is_none());

    // Nothing can bring the tenant back, from this pool or another.
    let other = db.open().await;
    for store in [&store, &other] {
        let err = store
            .insert_version(&t, 5, record("doomed", 6))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Conflict);
        assert!(err.to_string().contains("shredded"), "{err}");
        let err = store
            .create_tenant(&t, record("doomed", 1))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Conflict);
        assert!(err.to_string().contains("never reused"), "{err}");
        let err = store.set_min_decrypt_version(&t, 1, 2).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Conflict);
        let err = store
            .replace_wrapped(&t, 1, &rewrapped, rewrapped.clone())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Conflict);
        assert!(store.list_tenants().await.unwrap().contains(&t));
    }

    // Shredding again is harmless and keeps the first time.
    store
        .shred_tenant(&t, Timestamp::from_second(1_900_000_000).unwrap())
        .await
        .unwrap();
    assert_eq!(
        store.load_tenant(&t).await.unwrap().unwrap().shredded_at,
        Some(at)
    );
    let err = store.shred_tenant(&tid("nobody"), at).await.unwrap_err();
    assert!(err.to_string().contains("tenant not found"), "{err}");

    // The other tenant is untouched.
    let kept = store.load_tenant(&keep).await.unwrap().unwrap();
    assert_eq!(kept.versions, vec![record("kept", 1)]);
    db.drop_database().await;
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let db = TestDb::new("corrupt").await;
    let store = db.open().await;
    let raw = db.raw().await;
    // The schema's CHECK constraints would refuse these rows: drop them, as a damaged or
    // hand-edited database might have.
    raw.batch_execute(
        "DO $$ DECLARE r record; BEGIN
             FOR r IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
                      WHERE contype = 'c'
                        AND conrelid IN ('tenants'::regclass, 'key_versions'::regclass)
             LOOP EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.tbl, r.conname);
             END LOOP;
         END $$;",
    )
    .await
    .unwrap();
    let cases = [
        (
            "UPDATE key_versions SET state = 'bogus' WHERE version = 1",
            "unknown state",
        ),
        (
            "UPDATE key_versions SET key_check = '\\x0011' WHERE version = 2",
            "key check",
        ),
        (
            "UPDATE key_versions SET key_check = decode(repeat('00', 33), 'hex') WHERE version = 1",
            "key check",
        ),
        (
            "UPDATE key_versions SET created_at = 'infinity' WHERE version = 1",
            "created_at",
        ),
        (
            "UPDATE key_versions SET created_at = '-infinity' WHERE version = 2",
            "created_at",
        ),
        (
            "UPDATE key_versions SET wrapped = NULL WHERE version = 2",
            "root_key_ref",
        ),
        (
            "UPDATE key_versions SET wrapped = NULL, root_key_ref = NULL WHERE version = 2",
            "no wrapped bytes",
        ),
        (
            "UPDATE key_versions SET state = 'destroyed' WHERE version = 1",
            "destroyed",
        ),
        (
            "UPDATE tenants SET min_decrypt_version = 0",
            "minimum decryption version",
        ),
        (
            "UPDATE tenants SET min_decrypt_version = 4294967296",
            "minimum decryption version",
        ),
        ("UPDATE tenants SET shredded_at = 'infinity'", "shredded_at"),
        (
            "UPDATE key_versions SET version = 4294967296 WHERE version = 2",
            "outside",
        ),
        (
            "UPDATE key_versions SET version = 0 WHERE version = 1",
            "outside",
        ),
    ];
    for (i, (sql, needle)) in cases.iter().enumerate() {
        // Each case damages its own tenant.
        let name = format!("acme{i}");
        let t = tid(&name);
        store.create_tenant(&t, record(&name, 1)).await.unwrap();
        store.insert_version(&t, 1, record(&name, 2)).await.unwrap();
        let scoped = if sql.contains(" WHERE ") {
            format!("{sql} AND tenant = '{name}'")
        } else {
            format!("{sql} WHERE tenant = '{name}'")
        };
        assert_eq!(
            raw.execute(scoped.as_str(), &[]).await.unwrap(),
            1,
            "{scoped}"
        );
        let err = store.load_tenant(&t).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{sql}: {err}");
        let msg = err.to_string();
        assert!(msg.contains("corrupt"), "{sql}: {msg}");
        assert!(msg.contains(needle), "{sql}: {msg}");
        assert!(msg.contains(&name), "{sql}: {msg}");
        assert!(!msg.contains("WRAPPED-MARKER"), "{sql}: {msg}");
    }
    // A column of the wrong type (a hand-made schema change) is corruption, not a panic.
    store
        .create_tenant(&tid("typed"), record("typed", 1))
        .await
        .unwrap();
    raw.batch_execute("ALTER TABLE key_versions ALTER COLUMN key_check TYPE text")
        .await
        .unwrap();
    // The pooled connection's cached statement no longer matches the table: the first call
    // fails and drops the statement caches, the next one prepares afresh and finds the bad
    // column.
    let mut err = store.load_tenant(&tid("typed")).await.unwrap_err();
    if err.to_string().contains("0A000") {
        err = store.load_tenant(&tid("typed")).await.unwrap_err();
    }
    assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("unreadable"), "{err}");
    db.drop_database().await;
}

#[tokio::test]
async fn corrupt_tenant_id_in_list_is_an_error() {
    let db = TestDb::new("corruptlist").await;
    let store = db.open().await;
    store
        .create_tenant(&tid("fine"), record("fine", 1))
        .await
        .unwrap();
    db.raw()
        .await
        .batch_execute(
            "ALTER TABLE tenants DROP CONSTRAINT tenants_tenant_id_format;
             INSERT INTO tenants (tenant, min_decrypt_version, created_at)
             VALUES ('not valid!', 1, now());",
        )
        .await
        .unwrap();
    let err = store.list_tenants().await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    assert!(err.to_string().contains("not a valid tenant id"), "{err}");
    db.drop_database().await;
}

#[tokio::test]
async fn the_schema_refuses_what_the_store_would() {
    // Defence in depth: even SQL that bypasses the store cannot break the invariants.
    let db = TestDb::new("constraints").await;
    let store = db.open().await;
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    let raw = db.raw().await;
    for (sql, sqlstate) in [
        // A second primary.
        (
            "INSERT INTO key_versions SELECT tenant, 2, 'primary', root_key_ref, wrapped,
                 key_check, created_at FROM key_versions",
            "23505",
        ),
        // A duplicate version.
        (
            "INSERT INTO key_versions SELECT tenant, 1, 'decrypt_only', root_key_ref, wrapped,
                 key_check, created_at FROM key_versions",
            "23505",
        ),
        ("UPDATE key_versions SET state = 'destroyed'", "23514"),
        ("UPDATE key_versions SET wrapped = NULL", "23514"),
        ("UPDATE key_versions SET key_check = '\\x00'", "23514"),
        ("UPDATE key_versions SET version = 0", "23514"),
        ("UPDATE tenants SET min_decrypt_version = 0", "23514"),
        (
            "INSERT INTO tenants (tenant, min_decrypt_version, created_at) VALUES ('a b', 1, now())",
            "23514",
        ),
        (
            "INSERT INTO key_versions SELECT 'ghost', 1, state, root_key_ref, wrapped, key_check,
                 created_at FROM key_versions",
            "23503",
        ),
    ] {
        let err = raw.batch_execute(sql).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some(sqlstate), "{sql}: {err}");
    }
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_even_when_concurrent() {
    let db = TestDb::new("migrate").await;
    // Eight sidecars start at once against an empty database.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let config = db.config();
        tasks.push(tokio::spawn(async move {
            PostgresKeyStore::open(&config).await
        }));
    }
    let mut stores = Vec::new();
    for task in tasks {
        stores.push(task.await.unwrap().unwrap());
    }
    let store = &stores[0];
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert!(store.migrate().await.unwrap().is_empty());
    assert!(db.open().await.migrate().await.unwrap().is_empty());
    let rows = db
        .raw()
        .await
        .query("SELECT version, description FROM schema_migrations", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), i64::from(SCHEMA_VERSION));
    // Every store works.
    for (i, store) in stores.iter().enumerate() {
        let name = format!("t{i}");
        store
            .create_tenant(&tid(&name), record(&name, 1))
            .await
            .unwrap();
    }
    assert_eq!(store.list_tenants().await.unwrap().len(), 8);
    db.drop_database().await;
}

#[tokio::test]
async fn connect_checks_the_schema_without_migrating() {
    let db = TestDb::new("connect").await;
    let err = PostgresKeyStore::connect(&db.config()).await.unwrap_err();
    assert!(
        matches!(err, PostgresStoreError::SchemaOutdated { found: 0, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured);
    assert!(err.to_string().contains("migrat"), "{err}");
    // Nothing was created.
    let exists: bool = db
        .raw()
        .await
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists);

    let store = db.open().await;
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    let store = PostgresKeyStore::connect(&db.config()).await.unwrap();
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let db = TestDb::new("toonew").await;
    let store = db.open().await;
    db.raw()
        .await
        .batch_execute(
            "INSERT INTO schema_migrations (version, description) VALUES (2, 'from the future')",
        )
        .await
        .unwrap();
    for result in [
        PostgresKeyStore::open(&db.config()).await,
        PostgresKeyStore::connect(&db.config()).await,
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, PostgresStoreError::SchemaTooNew { found: 2, .. }),
            "{err:?}"
        );
        let backend: phiseal::BackendError = err.into();
        assert_eq!(backend.kind(), BackendErrorKind::Misconfigured);
        let text = backend.to_string();
        assert!(
            text.contains("version 2, newer than this build supports (1)"),
            "{text}"
        );
        assert!(text.contains("upgrade phiseal"), "{text}");
        assert!(text.contains(&db.name), "{text}");
    }
    assert!(matches!(
        store.migrate().await.unwrap_err(),
        PostgresStoreError::SchemaTooNew { found: 2, .. }
    ));
    db.drop_database().await;
}

#[tokio::test]
async fn a_foreign_table_in_the_way_is_a_clear_error() {
    let db = TestDb::new("foreign").await;
    db.raw()
        .await
        .batch_execute("CREATE SCHEMA phiseal; CREATE TABLE phiseal.key_versions (id int)")
        .await
        .unwrap();
    let err = PostgresKeyStore::open(&db.config()).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    let text = err.to_string();
    assert!(text.contains("apply a schema migration"), "{text}");
    assert!(text.contains(&db.name), "{text}");
    // The failed migration left nothing behind (one transaction).
    let exists: bool = db
        .raw()
        .await
        .query_one("SELECT to_regclass('phiseal.tenants') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
    db.drop_database().await;
}

/// The schema that holds `relation` in `db`, if the relation exists (qualified name).
async fn schema_of(raw: &tokio_postgres::Client, relation: &str) -> Option<String> {
    raw.query_opt(
        "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1)",
        &[&relation],
    )
    .await
    .unwrap()
    .map(|row| row.get(0))
}

#[tokio::test]
async fn a_read_only_default_is_named_in_the_error() {
    // The store asks for a writable session; a database whose default is read-only (or a
    // standby) is refused at connect. Before, the error read like an unreachable server.
    let db = TestDb::new("readonly").await;
    db.open().await;
    let raw = db.raw_default_path().await;
    raw.batch_execute(&format!(
        "ALTER DATABASE {} SET default_transaction_read_only = on",
        db.name
    ))
    .await
    .unwrap();
    let err = phiseal_store_postgres::PostgresKeyStore::open(&db.config())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not allow writes") && err.contains("default_transaction_read_only"),
        "{err}"
    );
}

#[tokio::test]
async fn sessions_commit_synchronously_and_keep_their_limits_whatever_the_defaults() {
    let db = TestDb::new("sessions").await;
    let raw = db.raw_default_path().await;
    raw.batch_execute(&format!(
        "ALTER DATABASE {} SET synchronous_commit = off; \
         ALTER DATABASE {} SET statement_timeout = 0",
        db.name, db.name
    ))
    .await
    .unwrap();
    let store = db.open().await;
    let setting = |name: &'static str| {
        let store = &store;
        async move { store.session_setting(name).await.unwrap() }
    };
    // (A committed shred must survive a server crash.)
    assert_eq!(setting("synchronous_commit").await, "on");
    assert_eq!(
        setting("statement_timeout").await,
        format!("{}s", phiseal_store_postgres::STATEMENT_TIMEOUT.as_secs())
    );
    assert_eq!(setting("search_path").await, "phiseal, pg_temp");
    // A stricter setting is kept.
    raw.batch_execute(&format!(
        "ALTER DATABASE {} SET synchronous_commit = remote_apply",
        db.name
    ))
    .await
    .unwrap();
    drop(store);
    let store = db.open().await;
    assert_eq!(
        store.session_setting("synchronous_commit").await.unwrap(),
        "remote_apply"
    );
}

#[tokio::test]
async fn the_tables_live_in_the_store_schema_and_other_schemas_cannot_stand_in() {
    let db = TestDb::new("schemapath").await;
    let raw = db.raw_default_path().await;
    // The role's own search path puts a schema ahead of everything else.
    raw.batch_execute(&format!(
        "ALTER DATABASE {} SET search_path = decoy, public",
        db.name
    ))
    .await
    .unwrap();
    let store = db.open().await;
    let t = tid("acme");
    store.create_tenant(&t, record("acme", 1)).await.unwrap();
    for table in ["schema_migrations", "tenants", "key_versions"] {
        assert_eq!(
            schema_of(&raw, &format!("phiseal.{table}"))
                .await
                .as_deref(),
            Some("phiseal"),
            "{table}"
        );
        assert_eq!(schema_of(&raw, &format!("public.{table}")).await, None);
    }

    // Later, tables appear in that first schema: a tombstone for the tenant, and a key
    // version of another tenant.
    raw.batch_execute(
        "CREATE SCHEMA decoy;
         CREATE TABLE decoy.tenants (LIKE phiseal.tenants INCLUDING ALL);
         CREATE TABLE decoy.key_versions (LIKE phiseal.key_versions INCLUDING ALL);
         INSERT INTO decoy.tenants VALUES ('acme', 1, now(), now()), ('mallory', 1, NULL, now());
         INSERT INTO decoy.key_versions
             SELECT 'mallory', 1, 'primary', 'test', '\\x00', key_check, now()
             FROM phiseal.key_versions;",
    )
    .await
    .unwrap();
    // New sessions (a new pool) still read and write the store's own tables.
    drop(store);
    let store = db.open().await;
    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    assert!(rec.shredded_at.is_none(), "read the decoy tombstone");
    assert_eq!(versions(&rec), vec![1]);
    assert!(store.load_tenant(&tid("mallory")).await.unwrap().is_none());
    assert_eq!(store.list_tenants().await.unwrap(), vec![t.clone()]);
    store
        .insert_version(&t, 1, record("acme", 2))
        .await
        .unwrap();
    let in_store: i64 = raw
        .query_one("SELECT count(*) FROM phiseal.key_versions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_store, 2);
    db.drop_database().await;
}

#[tokio::test]
async fn a_schema_every_role_may_create_in_is_refused() {
    let db = TestDb::new("schemapublic").await;
    let raw = db.raw_default_path().await;
    raw.batch_execute("CREATE SCHEMA phiseal; GRANT CREATE ON SCHEMA phiseal TO PUBLIC;")
        .await
        .unwrap();
    for result in [
        PostgresKeyStore::open(&db.config()).await,
        PostgresKeyStore::connect(&db.config()).await,
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, PostgresStoreError::UnsafeSchema { .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), BackendErrorKind::Misconfigured);
        let text = err.to_string();
        assert!(text.contains("schema \"phiseal\""), "{text}");
        assert!(text.contains("CREATE is granted to PUBLIC"), "{text}");
        assert!(
            text.contains("REVOKE CREATE ON SCHEMA \"phiseal\" FROM PUBLIC"),
            "{text}"
        );
    }
    // Nothing was created in it.
    assert_eq!(schema_of(&raw, "phiseal.schema_migrations").await, None);
    raw.batch_execute("REVOKE CREATE ON SCHEMA phiseal FROM PUBLIC")
        .await
        .unwrap();
    let store = db.open().await;
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn key_tables_where_an_earlier_build_put_them_are_not_replaced_by_an_empty_store() {
    let db = TestDb::new("schemalegacy").await;
    // (Before PostgreSQL 15 every role may create in `public`: the store would refuse it.)
    db.raw_default_path()
        .await
        .batch_execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        .await
        .unwrap();
    // Earlier builds created the tables in the first schema of the role's search path
    // (here `public`); the `schema` setting reproduces that layout.
    let mut legacy = db.config();
    legacy.schema = "public".into();
    let old = PostgresKeyStore::open(&legacy).await.unwrap();
    old.create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    drop(old);

    for result in [
        PostgresKeyStore::open(&db.config()).await,
        PostgresKeyStore::connect(&db.config()).await,
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, PostgresStoreError::UnsafeSchema { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("finds them in schema \"public\""), "{text}");
        assert!(
            text.contains(
                "CREATE SCHEMA \"phiseal\" AUTHORIZATION <the store's role>; \
                 ALTER TABLE \"public\".schema_migrations SET SCHEMA \"phiseal\""
            ),
            "{text}"
        );
    }
    let raw = db.raw_default_path().await;
    assert_eq!(schema_of(&raw, "phiseal.schema_migrations").await, None);
    // A schema chosen explicitly is taken as meant (another deployment of the same role).
    let mut explicit = db.config();
    explicit.schema = "second_deployment".into();
    PostgresKeyStore::open(&explicit).await.unwrap();

    // Either remedy works: name the old schema, or move the tables.
    let store = PostgresKeyStore::open(&legacy).await.unwrap();
    assert!(store.load_tenant(&tid("acme")).await.unwrap().is_some());
    drop(store);
    raw.batch_execute(
        "CREATE SCHEMA phiseal;
         ALTER TABLE public.schema_migrations SET SCHEMA phiseal;
         ALTER TABLE public.tenants SET SCHEMA phiseal;
         ALTER TABLE public.key_versions SET SCHEMA phiseal;",
    )
    .await
    .unwrap();
    let store = db.open().await;
    assert!(store.load_tenant(&tid("acme")).await.unwrap().is_some());
    db.drop_database().await;
}

#[tokio::test]
async fn looking_for_earlier_tables_runs_nothing_on_the_roles_search_path() {
    let db = TestDb::new("schemahostile").await;
    // Another role's operator on the role's own search path, an exact match for comparing
    // an oid with a regclass: whoever resolves it runs that role's function (which counts
    // its calls in a sequence: sequences are not rolled back).
    db.raw_default_path()
        .await
        .batch_execute(
            "CREATE SEQUENCE public.hijacked;
             CREATE FUNCTION public.hostile_eq(oid, regclass) RETURNS boolean
                 LANGUAGE plpgsql AS $$
                 BEGIN PERFORM pg_catalog.nextval('public.hijacked'); RETURN false; END $$;
             CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass,
                                       FUNCTION = public.hostile_eq);",
        )
        .await
        .unwrap();
    // The first open of an empty database looks for an earlier build's tables.
    let store = db.open().await;
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    let called: bool = db
        .raw_default_path()
        .await
        .query_one("SELECT is_called FROM public.hijacked", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!called, "the store ran another role's function");
    db.drop_database().await;
}

#[tokio::test]
async fn a_schema_another_role_owns_or_may_change_is_refused() {
    let db = TestDb::new("schemarights").await;
    let raw = db.raw_default_path().await;
    let other = format!("other_{}", db.name);
    // The schema is another role's, and holds a `schema_migrations` view whose reading runs
    // a function (counted in a sequence: sequences are not rolled back).
    raw.batch_execute(&format!(
        "CREATE ROLE {other}; CREATE SCHEMA phiseal AUTHORIZATION {other};
         CREATE SEQUENCE public.viewed;
         CREATE VIEW phiseal.schema_migrations AS
             SELECT pg_catalog.nextval('public.viewed') AS version;"
    ))
    .await
    .unwrap();
    let refused = |result: Result<PostgresKeyStore, PostgresStoreError>| {
        let err = result.unwrap_err();
        assert!(
            matches!(err, PostgresStoreError::UnsafeSchema { .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), BackendErrorKind::Misconfigured);
        err.to_string()
    };
    // Owned by another role.
    let text = refused(PostgresKeyStore::open(&db.config()).await);
    assert!(
        text.contains(&format!(
            "is owned by role \"{other}\", not by the store's role"
        )),
        "{text}"
    );
    assert!(text.contains("ALTER SCHEMA \"phiseal\" OWNER TO"), "{text}");
    let viewed: bool = raw
        .query_one("SELECT is_called FROM public.viewed", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !viewed,
        "the store read a view in a schema it had not checked"
    );
    raw.batch_execute("DROP VIEW phiseal.schema_migrations")
        .await
        .unwrap();

    // Owned by the store's role, but another role may create in it.
    raw.batch_execute(&format!(
        "ALTER SCHEMA phiseal OWNER TO current_user;
         GRANT CREATE ON SCHEMA phiseal TO {other}"
    ))
    .await
    .unwrap();
    for result in [
        PostgresKeyStore::open(&db.config()).await,
        PostgresKeyStore::connect(&db.config()).await,
    ] {
        let text = refused(result);
        assert!(
            text.contains(&format!("CREATE is granted to \"{other}\"")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "REVOKE CREATE ON SCHEMA \"phiseal\" FROM \"{other}\""
            )),
            "{text}"
        );
    }

    // No one else may create, but an object in it belongs to another role.
    raw.batch_execute(&format!(
        "REVOKE CREATE ON SCHEMA phiseal FROM {other};
         CREATE FUNCTION phiseal.lookalike() RETURNS int LANGUAGE sql AS 'SELECT 1';
         ALTER FUNCTION phiseal.lookalike() OWNER TO {other}"
    ))
    .await
    .unwrap();
    let text = refused(PostgresKeyStore::open(&db.config()).await);
    assert!(
        text.contains(&format!(
            "belong to neither its owner nor the store's role (\"lookalike\" (owner \"{other}\"))"
        )),
        "{text}"
    );

    raw.batch_execute("DROP FUNCTION phiseal.lookalike()")
        .await
        .unwrap();
    let store = db.open().await;
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    drop(store);

    // Another role may change a table: refused; SELECT alone is fine.
    raw.batch_execute(&format!(
        "GRANT SELECT, UPDATE ON phiseal.key_versions TO {other}"
    ))
    .await
    .unwrap();
    let text = refused(PostgresKeyStore::open(&db.config()).await);
    assert!(
        text.contains(&format!(
            "other roles may change the store's tables or put triggers on them (UPDATE on \"key_versions\" to \"{other}\")"
        )),
        "{text}"
    );
    raw.batch_execute(&format!(
        "REVOKE UPDATE ON phiseal.key_versions FROM {other}"
    ))
    .await
    .unwrap();
    db.open().await;

    // … also on one column (enough to lower a minimum decryption version): refused.
    raw.batch_execute(&format!(
        "GRANT UPDATE (min_decrypt_version) ON phiseal.tenants TO {other}"
    ))
    .await
    .unwrap();
    let text = refused(PostgresKeyStore::open(&db.config()).await);
    assert!(
        text.contains(&format!(
            "(UPDATE on \"tenants\"(\"min_decrypt_version\") to \"{other}\")"
        )),
        "{text}"
    );
    raw.batch_execute(&format!(
        "REVOKE UPDATE (min_decrypt_version) ON phiseal.tenants FROM {other}"
    ))
    .await
    .unwrap();
    db.open().await;

    // A trigger on a table: refused.
    raw.batch_execute(
        "CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER watcher BEFORE UPDATE ON phiseal.key_versions
             FOR EACH ROW EXECUTE FUNCTION public.noop();",
    )
    .await
    .unwrap();
    let text = refused(PostgresKeyStore::open(&db.config()).await);
    assert!(
        text.contains("its tables have triggers (\"watcher\" on \"key_versions\")"),
        "{text}"
    );
    raw.batch_execute(&format!(
        "DROP TRIGGER watcher ON phiseal.key_versions;
         REVOKE ALL ON phiseal.key_versions FROM {other}; DROP ROLE {other}"
    ))
    .await
    .unwrap();
    db.open().await;
    db.drop_database().await;
}

/// A server that is not the database: it asks for SCRAM-SHA-256 and then answers the client's
/// first message with a nonce that does not extend the client's (as a server that does not
/// know the password, or an impostor on the socket, must fail the exchange somewhere).
async fn impostor_answering_scram_with_a_foreign_nonce(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut socket, _) = listener.accept().await.unwrap();
    // StartupMessage: length (itself included), then the rest.
    let len = socket.read_u32().await.unwrap();
    let mut startup = vec![0u8; len as usize - 4];
    socket.read_exact(&mut startup).await.unwrap();
    // AuthenticationSASL with one mechanism.
    let mechanisms = b"SCRAM-SHA-256\0\0";
    socket.write_u8(b'R').await.unwrap();
    socket
        .write_u32(4 + 4 + mechanisms.len() as u32)
        .await
        .unwrap();
    socket.write_u32(10).await.unwrap();
    socket.write_all(mechanisms).await.unwrap();
    // The client's SASLInitialResponse.
    assert_eq!(socket.read_u8().await.unwrap(), b'p');
    let len = socket.read_u32().await.unwrap();
    let mut first = vec![0u8; len as usize - 4];
    socket.read_exact(&mut first).await.unwrap();
    // AuthenticationSASLContinue with a nonce of its own.
    let server_first = b"r=not-the-clients-nonce,s=c2FsdHNhbHQ=,i=4096";
    socket.write_u8(b'R').await.unwrap();
    socket
        .write_u32(4 + 4 + server_first.len() as u32)
        .await
        .unwrap();
    socket.write_u32(11).await.unwrap();
    socket.write_all(server_first).await.unwrap();
    socket.flush().await.unwrap();
    // Hold the connection until the client gives up.
    let mut rest = Vec::new();
    let _ = socket.read_to_end(&mut rest).await;
}

#[tokio::test]
async fn a_server_that_fails_the_scram_exchange_is_a_refusal_not_an_outage() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(impostor_answering_scram_with_a_foreign_nonce(listener));
    let config = phiseal_store_postgres::PostgresStoreConfig::new(format!(
        "postgresql://phiseal:not-sent-in-clear@127.0.0.1:{port}/keys"
    ));
    let err = phiseal_store_postgres::PostgresKeyStore::open(&config)
        .await
        .unwrap_err();
    let err = phiseal::BackendError::from(err);
    // Not `Unavailable`: the keyring bridges an outage with stale keys, never a refusal.
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
    assert!(!err.to_string().contains("not-sent-in-clear"), "{err}");
    server.abort();
}
