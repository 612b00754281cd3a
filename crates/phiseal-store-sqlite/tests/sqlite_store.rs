//! Behaviour of the SQLite key store: every method, compare-and-set under tasks and processes,
//! shredding, corrupt rows.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use jiff::Timestamp;
use phiseal::BackendErrorKind;
use phiseal::context::TenantId;
use phiseal::kms::WrappedKey;
use phiseal::store::{KeyRecord, KeyState, KeyStore, TenantRecord};
use phiseal_store_sqlite::{SqliteKeyStore, SqliteStoreError};

/// Env var naming the database a child process rotates in (see `child_rotate_50`).
const CHILD_DB_ENV: &str = "PHISEAL_SQLITE_TEST_CHILD_DB";
const CHILD_TENANT: &str = "two-procs";
const CHILD_ROTATIONS: u32 = 50;

fn tid(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

/// Distinctive wrapped bytes, so shredding can be checked by searching the files for them.
fn marker(tenant: &str, version: u32) -> Vec<u8> {
    format!("WRAPPED-MARKER<{tenant}/v{version:04}>-0123456789abcdef-0123456789abcdef").into_bytes()
}

fn record(tenant: &str, version: u32) -> KeyRecord {
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

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("keys.db")
}

fn raw(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    conn
}

fn versions(rec: &TenantRecord) -> Vec<u32> {
    rec.versions.iter().map(|r| r.version).collect()
}

/// Versions are exactly 1..=n, ascending, one primary (the last), the rest decrypt-only.
fn assert_clean_history(rec: &TenantRecord, n: u32) {
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

#[tokio::test]
async fn round_trip_of_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = SqliteKeyStore::open(&path).unwrap();
    assert_eq!(store.name(), "sqlite");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    assert!(format!("{store:?}").contains("keys.db"));

    let before = phiseal::testkit::conformance::key_store_methods(&store).await;

    // Everything survives reopening.
    drop(store);
    let store = SqliteKeyStore::open(&path).unwrap();
    assert_eq!(store.load_tenant(&tid("acme")).await.unwrap(), before);
}

#[test]
fn an_existing_file_others_may_write_or_read_or_a_symlink_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    drop(SqliteKeyStore::open(&path).unwrap());
    for (mode, accepted) in [
        (0o644, false),
        (0o660, false),
        (0o602, false),
        (0o640, true),
        (0o600, true),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        match SqliteKeyStore::open(&path) {
            Ok(_) => assert!(accepted, "mode {mode:o} accepted"),
            Err(e) => {
                assert!(!accepted, "mode {mode:o} refused: {e}");
                assert!(
                    e.to_string().contains(&format!("has mode {mode:04o}")),
                    "{e}"
                );
                assert_eq!(
                    phiseal::BackendError::from(e).kind(),
                    BackendErrorKind::Misconfigured
                );
            }
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = SqliteKeyStore::open(&link).unwrap_err();
    assert!(err.to_string().contains("is a symlink"), "{err}");
}

#[test]
fn its_write_ahead_log_and_another_users_file_are_checked_too() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    drop(SqliteKeyStore::open(&path).unwrap());
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    // A write-ahead log others may write (pages written there become the database's).
    std::fs::write(&wal, b"").unwrap();
    std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = SqliteKeyStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("-wal' has mode 0666"), "{err}");
    // … or a symlink to another file.
    std::fs::remove_file(&wal).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &wal).unwrap();
    let err = SqliteKeyStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("-wal' is a symlink"), "{err}");
    std::fs::remove_file(&wal).unwrap();
    drop(SqliteKeyStore::open(&path).unwrap());
    // A database of another user (only root can make one here: CI runs as root).
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = SqliteKeyStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
    }
}

#[tokio::test]
async fn create_twice_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteKeyStore::open(db_path(&dir)).unwrap();
    let t = tid("acme");
    store.create_tenant(&t, record("acme", 1)).await.unwrap();
    let before = store.load_tenant(&t).await.unwrap();
    let mut again = record("acme", 1);
    again.key_check = [0xee; 32];
    let err = store.create_tenant(&t, again).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict);
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(store.load_tenant(&t).await.unwrap(), before);
}

#[tokio::test]
async fn invalid_new_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteKeyStore::open(db_path(&dir)).unwrap();
    phiseal::testkit::conformance::key_store_invalid_records(&store).await;
}

#[tokio::test]
async fn stale_compare_and_set_is_a_conflict_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteKeyStore::open(db_path(&dir)).unwrap();
    phiseal::testkit::conformance::key_store_stale_cas(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tasks_on_two_handles_never_duplicate_a_version() {
    const TASKS: u32 = 16;
    const ATTEMPTS: u32 = 12;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let handles = [
        SqliteKeyStore::open(&path).unwrap(),
        SqliteKeyStore::open(&path).unwrap(),
    ];
    let t = tid("busy");
    handles[0]
        .create_tenant(&t, record("busy", 1))
        .await
        .unwrap();

    let successes = Arc::new(AtomicU32::new(0));
    // Which task created each version; each task writes bytes of its own.
    let authors = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let by_task = |task: u32, version: u32| {
        let mut r = record("busy", version);
        r.wrapped = Some(WrappedKey {
            root_key_ref: "test".into(),
            ciphertext: marker(&format!("busy-task{task}"), version),
        });
        r
    };
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let store = handles[(i % 2) as usize].clone();
        let t = t.clone();
        let successes = Arc::clone(&successes);
        let authors = Arc::clone(&authors);
        tasks.push(tokio::spawn(async move {
            for _ in 0..ATTEMPTS {
                let latest = store
                    .load_tenant(&t)
                    .await
                    .unwrap()
                    .unwrap()
                    .latest_version();
                match store
                    .insert_version(&t, latest, by_task(i, latest + 1))
                    .await
                {
                    Ok(()) => {
                        successes.fetch_add(1, Ordering::SeqCst);
                        let earlier = authors.lock().unwrap().insert(latest + 1, i);
                        assert_eq!(earlier, None, "version {} created twice", latest + 1);
                    }
                    Err(e) => assert_eq!(e.kind(), BackendErrorKind::Conflict, "{e}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rec = handles[1].load_tenant(&t).await.unwrap().unwrap();
    let n = rec.latest_version();
    let ok = successes.load(Ordering::SeqCst);
    eprintln!("{ok} of {} rotation attempts won", TASKS * ATTEMPTS);
    assert!(ok >= ATTEMPTS, "every round has a winner: {ok}");
    assert_eq!(ok, n - 1);
    assert_clean_history(&rec, n);
    // Each stored record is the one the task told of its success built.
    let authors = authors.lock().unwrap();
    for r in rec.versions.iter().filter(|r| r.version > 1) {
        let author = authors[&r.version];
        assert_eq!(
            r.wrapped.as_ref().unwrap().ciphertext,
            marker(&format!("busy-task{author}"), r.version),
            "version {}",
            r.version
        );
    }
}

/// Parent half of the two-process test: two children rotate the same tenant 50 times each.
#[test]
fn two_processes_rotating_at_once_never_duplicate_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = SqliteKeyStore::open(&path).unwrap();
    let t = tid(CHILD_TENANT);
    rt.block_on(store.create_tenant(&t, record(CHILD_TENANT, 1)))
        .unwrap();

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "child_rotate_50", "--ignored", "--nocapture"])
                .env(CHILD_DB_ENV, &path)
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
    }
    let rec = rt.block_on(store.load_tenant(&t)).unwrap().unwrap();
    assert_clean_history(&rec, 2 * CHILD_ROTATIONS + 1);
}

/// Child half of the two-process test, run only by the parent (ignored in a normal run, so
/// that it is reported as skipped rather than as a vacuous pass).
#[tokio::test]
#[ignore = "child half of the two-process rotation test; its parent runs it"]
async fn child_rotate_50() {
    let path = std::env::var_os(CHILD_DB_ENV)
        .unwrap_or_else(|| panic!("{CHILD_DB_ENV} is unset: run the parent test instead"));
    let store = SqliteKeyStore::open(&path).unwrap();
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
}

fn file_contains(path: &Path, needle: &[u8]) -> bool {
    match std::fs::read(path) {
        Ok(bytes) => bytes.windows(needle.len()).any(|w| w == needle),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("{e}"),
    }
}

fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

#[tokio::test]
async fn shred_erases_wrapped_bytes_and_blocks_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = SqliteKeyStore::open(&path).unwrap();
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
    let markers: Vec<Vec<u8>> = (1..=5).map(|v| marker("doomed", v)).collect();
    // The search below is meaningful: the bytes are in the files before the shred.
    for m in &markers {
        assert!(file_contains(&path, m) || file_contains(&wal_path(&path), m));
    }

    let at = Timestamp::from_second(1_800_000_000).unwrap();
    store.shred_tenant(&t, at).await.unwrap();

    for m in &markers {
        assert!(
            !file_contains(&path, m),
            "wrapped bytes left in the db file"
        );
        assert!(
            !file_contains(&wal_path(&path), m),
            "wrapped bytes left in the WAL"
        );
    }
    let conn = raw(&path);
    let live: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM key_versions
             WHERE tenant = 'doomed' AND (wrapped IS NOT NULL OR root_key_ref IS NOT NULL)",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(live, 0);
    drop(conn);

    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(rec.shredded_at, Some(at));
    assert_eq!(versions(&rec), [1, 2, 3, 4, 5]);
    assert!(rec.versions.iter().all(|r| r.state == KeyState::Destroyed));
    assert!(rec.versions.iter().all(|r| r.wrapped.is_none()));
    assert!(rec.primary().is_none());

    // Nothing can bring the tenant back.
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
    let err = store.set_min_decrypt_version(&t, 1, 2).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict);
    let err = store
        .replace_wrapped(
            &t,
            1,
            &WrappedKey {
                root_key_ref: "test".into(),
                ciphertext: marker("doomed", 1),
            },
            WrappedKey {
                root_key_ref: "test".into(),
                ciphertext: marker("doomed", 1),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict);
    assert!(store.list_tenants().await.unwrap().contains(&t));

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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stays_makes_a_shred_report_its_checkpoint_soon_not_hold_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Arc::new(SqliteKeyStore::open(&path).unwrap());
    let (t, other) = (tid("doomed"), tid("other"));
    store.create_tenant(&t, record("doomed", 1)).await.unwrap();
    store
        .create_tenant(&other, record("other", 1))
        .await
        .unwrap();
    // Another process's long read transaction (a backup tool's), on a snapshot from before.
    let reader = rusqlite::Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let n: i64 = reader
        .query_row("SELECT count(*) FROM tenants", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);

    let at = Timestamp::from_second(1_800_000_000).unwrap();
    let started = std::time::Instant::now();
    let err = store.shred_tenant(&t, at).await.unwrap_err();
    let took = started.elapsed();
    assert!(err.to_string().contains("run the shred again"), "{err}");
    assert_eq!(err.kind(), BackendErrorKind::Unavailable);
    // Before, each of its three attempts waited the 10 s busy timeout, holding the store's
    // connection (and the database's write lock) for 30 s.
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    // The shred itself committed; the store serves other calls at once.
    assert_eq!(
        store.load_tenant(&t).await.unwrap().unwrap().shredded_at,
        Some(at)
    );
    store.load_tenant(&other).await.unwrap().unwrap();
    // Once the reader is gone, shredding again completes the checkpoint.
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    store.shred_tenant(&t, at).await.unwrap();
}

/// Applies raw SQL (bypassing CHECK constraints), then expects `load` to fail cleanly.
async fn corrupt_and_load(sql: &str) -> phiseal::BackendError {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = SqliteKeyStore::open(&path).unwrap();
    let t = tid("acme");
    store.create_tenant(&t, record("acme", 1)).await.unwrap();
    store
        .insert_version(&t, 1, record("acme", 2))
        .await
        .unwrap();
    let conn = raw(&path);
    conn.execute_batch("PRAGMA ignore_check_constraints = ON;")
        .unwrap();
    conn.execute_batch(sql).unwrap();
    drop(conn);
    store.load_tenant(&t).await.unwrap_err()
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let cases = [
        (
            "UPDATE key_versions SET state = 'bogus' WHERE version = 1",
            "unknown state",
        ),
        (
            "UPDATE key_versions SET key_check = x'0011' WHERE version = 2",
            "key check",
        ),
        (
            "UPDATE key_versions SET key_check = zeroblob(33) WHERE version = 1",
            "key check",
        ),
        (
            "UPDATE key_versions SET created_at = 'yesterday' WHERE version = 1",
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
        ("UPDATE tenants SET shredded_at = 'soon'", "shredded_at"),
    ];
    for (sql, needle) in cases {
        let err = corrupt_and_load(sql).await;
        assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{sql}: {err}");
        let msg = err.to_string();
        assert!(msg.contains("corrupt"), "{sql}: {msg}");
        assert!(msg.contains(needle), "{sql}: {msg}");
        assert!(!msg.contains("WRAPPED-MARKER"), "{sql}: {msg}");
    }
    // A version number beyond u32 is an error too.
    let err =
        corrupt_and_load("UPDATE key_versions SET version = 4294967296 WHERE version = 2").await;
    assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
}

#[tokio::test]
async fn corrupt_tenant_id_in_list_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = SqliteKeyStore::open(&path).unwrap();
    store
        .create_tenant(&tid("fine"), record("fine", 1))
        .await
        .unwrap();
    raw(&path)
        .execute_batch(
            "INSERT INTO tenants (tenant, min_decrypt_version, created_at)
             VALUES ('not valid!', 1, '2024-01-01T00:00:00Z');",
        )
        .unwrap();
    let err = store.list_tenants().await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    assert!(err.to_string().contains("not a valid tenant id"), "{err}");
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    drop(SqliteKeyStore::open(&path).unwrap());
    raw(&path)
        .execute_batch("PRAGMA user_version = 2;")
        .unwrap();
    let err = SqliteKeyStore::open(&path).unwrap_err();
    assert!(
        matches!(err, SqliteStoreError::SchemaTooNew { found: 2 }),
        "{err:?}"
    );
    let backend: phiseal::BackendError = err.into();
    assert_eq!(backend.kind(), BackendErrorKind::Misconfigured);
}

#[tokio::test]
async fn not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::write(&path, vec![0x5a; 4096]).unwrap();
    // Private, as a key store must be (a readable one is refused before it is read).
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let err = SqliteKeyStore::open(&path).unwrap_err();
    let backend: phiseal::BackendError = err.into();
    assert_eq!(backend.kind(), BackendErrorKind::Misconfigured, "{backend}");
    assert!(std::error::Error::source(&backend).is_some());

    let err = SqliteKeyStore::open(dir.path().join("missing-dir").join("keys.db")).unwrap_err();
    assert!(matches!(err, SqliteStoreError::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn lock_held_past_busy_timeout_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = SqliteKeyStore::open(&path).unwrap();
    let t = tid("acme");
    store.create_tenant(&t, record("acme", 1)).await.unwrap();
    let conn = raw(&path);
    conn.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let started = std::time::Instant::now();
    let err = store
        .insert_version(&t, 1, record("acme", 2))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(9));
    conn.execute_batch("ROLLBACK;").unwrap();
    // Reads are not blocked by a writer in WAL mode, and the store recovers.
    store
        .insert_version(&t, 1, record("acme", 2))
        .await
        .unwrap();
}
