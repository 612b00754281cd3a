//! End-to-end tests of the keyring on the embedded default (local KMS, SQLite store, file
//! audit log), covering issue #2's numbered requirements.

// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic in
// a test helper is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use phiseal::audit::{AuditEvent, AuditSink};
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::store::{KeyRecord, KeyStore, TenantRecord};
use phiseal::stream::StreamOptions;
use phiseal::{
    Actor, Algorithm, BackendError, BackendErrorKind, CacheSettings, Caller, EncryptionContext,
    Error, Keyring, Profile, TenantId, TenantKey,
};
use phiseal_embedded::{EmbeddedOptions, EmbeddedPaths};

/// A temporary data directory with mode 0700, as the embedded default requires.
fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn caller() -> Caller {
    Caller::new(Actor::named("test-suite"))
}

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

fn ctx(t: &str, field: &str, record: Option<&str>) -> EncryptionContext {
    let c = EncryptionContext::new(tenant(t), field).unwrap();
    match record {
        Some(r) => c.with_record(r).unwrap(),
        None => c,
    }
}

fn open(dir: &Path) -> Keyring {
    phiseal_embedded::open(dir, &EmbeddedOptions::default()).unwrap()
}

/// A KMS wrapper that counts unwraps (the real local KMS does the work). With a `gate`, each
/// unwrap waits for a permit (to hold an operation inside its KMS call); without, it sleeps
/// 20 ms. With `refuse` set, unwraps fail as access denied (after the wait).
#[derive(Debug)]
struct CountingKms {
    inner: Arc<dyn Kms>,
    /// Unwraps started so far.
    unwraps: AtomicUsize,
    gate: Option<tokio::sync::Semaphore>,
    refuse: AtomicBool,
}

impl CountingKms {
    fn new(inner: Arc<dyn Kms>, gate: Option<tokio::sync::Semaphore>) -> Self {
        Self {
            inner,
            unwraps: AtomicUsize::new(0),
            gate,
            refuse: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl Kms for CountingKms {
    fn name(&self) -> &str {
        "counting"
    }
    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        self.inner.current_root_key_ref().await
    }
    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        self.inner.can_unwrap(root_key_ref)
    }
    async fn wrap(&self, key: &TenantKey, b: &KeyBinding) -> Result<WrappedKey, BackendError> {
        self.inner.wrap(key, b).await
    }
    async fn unwrap(&self, w: &WrappedKey, b: &KeyBinding) -> Result<TenantKey, BackendError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        match &self.gate {
            Some(gate) => gate.acquire().await.unwrap().forget(),
            // Widen the window in which concurrent misses could race.
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        if self.refuse.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                BackendErrorKind::Denied,
                "counting: access denied to the root key",
            ));
        }
        self.inner.unwrap(w, b).await
    }
}

/// An audit sink that always fails (fault injection, to prove fail-closed behaviour).
#[derive(Debug)]
struct FailingAudit;

#[async_trait]
impl AuditSink for FailingAudit {
    fn name(&self) -> &str {
        "failing"
    }
    async fn append(&self, _: &[AuditEvent]) -> Result<(), BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unavailable,
            "disk full",
        ))
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unavailable,
            "disk full",
        ))
    }
}

struct Parts {
    kms: Arc<CountingKms>,
    store: Arc<dyn KeyStore>,
}

fn parts(dir: &Path) -> Parts {
    let paths = EmbeddedPaths::new(dir);
    let local = phiseal_kms_local::LocalKms::open(&paths.root_key).unwrap();
    Parts {
        kms: Arc::new(CountingKms::new(Arc::new(local), None)),
        store: Arc::new(phiseal_store_sqlite::SqliteKeyStore::open(&paths.key_store).unwrap()),
    }
}

fn keyring_on(p: &Parts, cache: CacheSettings) -> Keyring {
    Keyring::builder()
        .profile(Profile::Development)
        .kms(p.kms.clone())
        .key_store(p.store.clone())
        .danger_disable_audit()
        .cache(cache)
        .build()
        .unwrap()
}

#[tokio::test]
async fn round_trip_binary_and_text() {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    k.create_tenant(&c, &tenant("t1")).await.unwrap();
    let cx = ctx("t1", "ssn", Some("patient-1"));
    for pt in [&b""[..], b"x", &[7u8; 64], &vec![9u8; 70_000]] {
        let ct = k.encrypt(&c, &cx, pt).await.unwrap();
        assert_eq!(ct.len(), pt.len() + 44, "default overhead is 44 bytes");
        assert_eq!(&k.decrypt(&c, &cx, &ct).await.unwrap()[..], pt);
        let text = phiseal::format::to_text(&ct);
        let back = phiseal::format::from_text(&text).unwrap();
        assert_eq!(&k.decrypt(&c, &cx, &back).await.unwrap()[..], pt);
    }
    // Two encryptions of the same value differ (random nonces).
    let a = k.encrypt(&c, &cx, b"same").await.unwrap();
    let b = k.encrypt(&c, &cx, b"same").await.unwrap();
    assert_ne!(a, b);
}

#[tokio::test]
async fn context_is_authenticated_tenant_field_record() {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    k.create_tenant(&c, &tenant("alpha")).await.unwrap();
    k.create_tenant(&c, &tenant("beta")).await.unwrap();
    let ct = k
        .encrypt(&c, &ctx("alpha", "ssn", Some("r1")), b"078-05-1120")
        .await
        .unwrap();
    for wrong in [
        ctx("beta", "ssn", Some("r1")),  // other tenant
        ctx("alpha", "mrn", Some("r1")), // other field
        ctx("alpha", "ssn", Some("r2")), // other record
        ctx("alpha", "ssn", None),       // record missing
    ] {
        let err = k.decrypt(&c, &wrong, &ct).await.unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed), "{wrong:?}: {err}");
        assert!(!err.to_string().contains("078"), "no plaintext in errors");
    }
    let no_record = k
        .encrypt(&c, &ctx("alpha", "ssn", None), b"v")
        .await
        .unwrap();
    let err = k
        .decrypt(&c, &ctx("alpha", "ssn", Some("r1")), &no_record)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DecryptionFailed));
}

#[tokio::test]
async fn malformed_ciphertexts_give_clear_errors() {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = k.encrypt(&c, &cx, b"hello").await.unwrap();
    let mut bad_version = ct.clone();
    bad_version[0] = 2;
    let mut bad_alg = ct.clone();
    bad_alg[1] = 0x7f;
    let mut flipped = ct.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut unknown_key_version = ct.clone();
    unknown_key_version[2..6].copy_from_slice(&9u32.to_be_bytes());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "malformed_ciphertext"),
        (ct[..20].to_vec(), "malformed_ciphertext"),
        (bad_version, "malformed_ciphertext"),
        (bad_alg, "malformed_ciphertext"),
        (flipped, "decryption_failed"),
        (unknown_key_version, "key_version_not_found"),
        (
            b"not a ciphertext at all, just text".to_vec(),
            "malformed_ciphertext",
        ),
    ];
    for (bytes, kind) in cases {
        let err = k.decrypt(&c, &cx, &bytes).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
    }
}

#[tokio::test]
async fn rotation_rewrap_min_version_and_progress() {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    let t = tenant("t");
    k.create_tenant(&c, &t).await.unwrap();
    let cx = ctx("t", "note", Some("r"));
    let old = k.encrypt(&c, &cx, b"v1 data").await.unwrap();
    assert_eq!(k.rotate(&c, &t).await.unwrap(), 2);
    let new = k.encrypt(&c, &cx, b"v2 data").await.unwrap();
    let counts = phiseal::format::count_versions([old.as_slice(), new.as_slice(), b"junk"]);
    assert_eq!(counts.by_version.get(&1), Some(&1));
    assert_eq!(counts.by_version.get(&2), Some(&1));
    assert_eq!(counts.malformed, 1);
    // Old versions still decrypt.
    assert_eq!(&k.decrypt(&c, &cx, &old).await.unwrap()[..], b"v1 data");
    // Rewrap moves to the primary version without exposing plaintext.
    let moved = k.rewrap(&c, &cx, &old).await.unwrap();
    assert_eq!(phiseal::format::parse(&moved).unwrap().key_version, 2);
    assert_eq!(&k.decrypt(&c, &cx, &moved).await.unwrap()[..], b"v1 data");
    // Already primary: unchanged.
    assert_eq!(k.rewrap(&c, &cx, &new).await.unwrap(), new);
    // Rewrap with the wrong context fails like decrypt.
    assert!(matches!(
        k.rewrap(&c, &ctx("t", "other", Some("r")), &old).await,
        Err(Error::DecryptionFailed)
    ));
    // Minimum decryption version.
    k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    let err = k.decrypt(&c, &cx, &old).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyVersionRetired {
                version: 1,
                min: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("retired"));
    assert!(matches!(
        k.rewrap(&c, &cx, &old).await,
        Err(Error::KeyVersionRetired { .. })
    ));
    for bad in [0, 3] {
        assert!(matches!(
            k.set_min_decrypt_version(&c, &t, bad).await,
            Err(Error::InvalidInput { .. })
        ));
    }
    let status = k.key_status(&c, &t).await.unwrap();
    assert_eq!(status.primary, Some(2));
    assert_eq!(status.min_decrypt_version, 2);
    assert_eq!(status.versions.len(), 2);
    assert!(!status.versions[0].decrypts && status.versions[1].decrypts);
    // Lowering it again re-enables v1: only when asked for, and only from the minimum the
    // caller saw.
    assert!(matches!(
        k.set_min_decrypt_version(&c, &t, 1).await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(k.decrypt(&c, &cx, &old).await.is_err());
    let lower = |expected| {
        phiseal::MinVersionGuard::default()
            .if_current(expected)
            .allow_lower(true)
    };
    assert!(matches!(
        k.set_min_decrypt_version_with(&c, &t, 1, lower(Some(1)))
            .await,
        Err(Error::ConcurrentChange { .. })
    ));
    k.set_min_decrypt_version_with(&c, &t, 1, lower(Some(2)))
        .await
        .unwrap();
    assert!(k.decrypt(&c, &cx, &old).await.is_ok());
    // Raising it needs no permission; setting the same value changes nothing, so a repeat of
    // a conditional call whose first outcome was unknown succeeds.
    let from_one = phiseal::MinVersionGuard::default().if_current(Some(1));
    k.set_min_decrypt_version_with(&c, &t, 2, from_one)
        .await
        .unwrap();
    k.set_min_decrypt_version_with(&c, &t, 2, from_one)
        .await
        .unwrap();
    k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    assert_eq!(k.key_status(&c, &t).await.unwrap().min_decrypt_version, 2);
}

#[tokio::test]
async fn batches_report_per_item() {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let good = ctx("t", "a", None);
    let unknown = ctx("nobody", "a", None);
    let items: Vec<(&EncryptionContext, &[u8])> =
        vec![(&good, b"one"), (&unknown, b"two"), (&good, b"three")];
    let out = k.encrypt_batch(&c, &items).await.unwrap();
    assert!(out[0].is_ok() && out[2].is_ok());
    assert!(matches!(out[1], Err(Error::TenantNotFound { .. })));
    let ct0 = out[0].as_ref().unwrap().clone();
    let ct2 = out[2].as_ref().unwrap().clone();
    let items: Vec<(&EncryptionContext, &[u8])> =
        vec![(&good, &ct0), (&good, b"garbage"), (&good, &ct2)];
    let out = k.decrypt_batch(&c, &items).await.unwrap();
    assert_eq!(&out[0].as_ref().unwrap()[..], b"one");
    assert!(matches!(out[1], Err(Error::Format(_))));
    assert_eq!(&out[2].as_ref().unwrap()[..], b"three");
    k.rotate(&c, &tenant("t")).await.unwrap();
    let items: Vec<(&EncryptionContext, &[u8])> = vec![(&good, &ct0), (&good, b"x")];
    let out = k.rewrap_batch(&c, &items).await.unwrap();
    assert_eq!(
        phiseal::format::parse(out[0].as_ref().unwrap())
            .unwrap()
            .key_version,
        2
    );
    assert!(out[1].is_err());
}

#[tokio::test]
async fn a_batch_of_several_tenants_uses_each_tenants_own_key() {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    for t in ["t", "u"] {
        k.create_tenant(&c, &tenant(t)).await.unwrap();
    }
    // Rotated, t is at v2 and u at v1; both tenants' keys are cached (the warm-up calls),
    // so the items below take the fast path.
    let (t, u) = (ctx("t", "a", None), ctx("u", "a", None));
    k.rotate(&c, &tenant("t")).await.unwrap();
    k.encrypt(&c, &t, b"warm").await.unwrap();
    k.encrypt(&c, &u, b"warm").await.unwrap();
    // Runs of one tenant and switches between them.
    let items: Vec<(&EncryptionContext, &[u8])> = vec![
        (&t, b"t1"),
        (&t, b"t2"),
        (&u, b"u1"),
        (&t, b"t3"),
        (&u, b"u2"),
    ];
    let out: Vec<Vec<u8>> = k
        .encrypt_batch(&c, &items)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let versions: Vec<u32> = out
        .iter()
        .map(|ct| phiseal::format::parse(ct).unwrap().key_version)
        .collect();
    assert_eq!(versions, [2, 2, 1, 2, 1]);
    // Each decrypts under its own tenant, one by one and in a mixed batch, and never under
    // the other (the batch's remembered tenant metadata follows the items' tenants).
    for ((cx, plaintext), ct) in items.iter().zip(&out) {
        assert_eq!(&*k.decrypt(&c, cx, ct).await.unwrap(), *plaintext);
    }
    let back: Vec<(&EncryptionContext, &[u8])> = items
        .iter()
        .zip(&out)
        .map(|((cx, _), ct)| (*cx, ct.as_slice()))
        .collect();
    let plain = k.decrypt_batch(&c, &back).await.unwrap();
    for ((_, expected), got) in items.iter().zip(&plain) {
        assert_eq!(&**got.as_ref().unwrap(), *expected);
    }
    // t's first field (v2) under u, which has no v2; u's first field (v1) under t's v1.
    let swapped: Vec<(&EncryptionContext, &[u8])> = vec![(&u, &out[0]), (&t, &out[2])];
    let refused = k.decrypt_batch(&c, &swapped).await.unwrap();
    assert!(
        matches!(
            refused[0],
            Err(Error::KeyVersionNotFound { version: 2, .. })
        ),
        "{:?}",
        refused[0].as_ref().err()
    );
    assert!(matches!(refused[1], Err(Error::DecryptionFailed)));
}

#[tokio::test]
async fn shred_destroys_forever() {
    let dir = private_tempdir();
    let c = caller();
    let t = tenant("gone");
    let cx = ctx("gone", "f", None);
    let ct = {
        let k = open(dir.path());
        k.create_tenant(&c, &t).await.unwrap();
        let ct = k.encrypt(&c, &cx, b"secret").await.unwrap();
        k.rotate(&c, &t).await.unwrap();
        k.decrypt(&c, &cx, &ct).await.unwrap(); // cached now
        k.shred(&c, &t).await.unwrap();
        // The cached key was purged: the very next decrypt fails.
        let err = k.decrypt(&c, &cx, &ct).await.unwrap_err();
        assert!(matches!(err, Error::KeyDestroyed { .. }), "{err}");
        assert!(err.to_string().contains("key destroyed"));
        assert!(matches!(
            k.encrypt(&c, &cx, b"x").await,
            Err(Error::KeyDestroyed { .. })
        ));
        assert!(matches!(
            k.rotate(&c, &t).await,
            Err(Error::KeyDestroyed { .. })
        ));
        assert!(matches!(
            k.create_tenant(&c, &t).await,
            Err(Error::TenantExists { .. })
        ));
        k.flush_audit().await.unwrap();
        ct
    };
    // A fresh process sees the same.
    let k = open(dir.path());
    assert!(matches!(
        k.decrypt(&c, &cx, &ct).await,
        Err(Error::KeyDestroyed { .. })
    ));
    let status = k.key_status(&c, &t).await.unwrap();
    assert!(status.shredded_at.is_some() && status.primary.is_none());
    assert!(
        status
            .versions
            .iter()
            .all(|v| v.root_key_ref.is_none() && !v.decrypts)
    );
    assert!(matches!(
        k.shred(&c, &tenant("never-existed")).await,
        Err(Error::TenantNotFound { .. })
    ));
}

/// Copies columns of one key record into another with raw SQL on the store file.
fn copy_record(db: &Path, from: (&str, u32), to: (&str, u32), columns: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let sql = format!(
        "UPDATE key_versions SET ({columns}) = (SELECT {columns} FROM key_versions \
         WHERE tenant = ?1 AND version = ?2) WHERE tenant = ?3 AND version = ?4"
    );
    let n = conn
        .execute(&sql, rusqlite::params![from.0, from.1, to.0, to.1])
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn key_record_copied_between_tenants_or_versions_is_refused() {
    let dir = private_tempdir();
    let c = caller();
    let db = EmbeddedPaths::new(dir.path()).key_store;
    {
        let k = open(dir.path());
        for t in ["a", "b", "v"] {
            k.create_tenant(&c, &tenant(t)).await.unwrap();
        }
        k.rotate(&c, &tenant("v")).await.unwrap();
        k.flush_audit().await.unwrap();
    }
    // Whole record (wrapped key, root ref, key check) from a → b.
    copy_record(&db, ("a", 1), ("b", 1), "root_key_ref, wrapped, key_check");
    // Only the wrapped key from v1 → v2 of tenant v.
    copy_record(&db, ("v", 1), ("v", 2), "root_key_ref, wrapped");
    let k = open(dir.path());
    for (t, version) in [("b", 1), ("v", 2)] {
        let err = k.encrypt(&c, &ctx(t, "f", None), b"x").await.unwrap_err();
        assert!(
            matches!(&err, Error::KeyBindingMismatch { version: v, .. } if *v == version),
            "{t}: {err}"
        );
    }
    // The untouched records still work.
    assert!(k.encrypt(&c, &ctx("a", "f", None), b"x").await.is_ok());
}

#[tokio::test]
async fn key_check_alone_detects_a_swap() {
    // A KMS without AAD (like Azure Key Vault) would unwrap a copied key happily; the key-check
    // MAC must still refuse it. Simulate by copying the key check of another version only.
    let dir = private_tempdir();
    let c = caller();
    let db = EmbeddedPaths::new(dir.path()).key_store;
    {
        let k = open(dir.path());
        k.create_tenant(&c, &tenant("t")).await.unwrap();
        k.rotate(&c, &tenant("t")).await.unwrap();
        k.flush_audit().await.unwrap();
    }
    copy_record(&db, ("t", 1), ("t", 2), "key_check");
    let k = open(dir.path());
    let err = k.encrypt(&c, &ctx("t", "f", None), b"x").await.unwrap_err();
    assert!(
        matches!(err, Error::KeyBindingMismatch { version: 2, .. }),
        "{err}"
    );
}

/// A test KMS that ignores the binding entirely — the wrapping is the key XOR a constant,
/// with no tenant or version in it (hand-written: it stands for a KMS without AAD, the case
/// the key-check MAC exists for; no real KMS is that careless, so no emulator exists).
#[derive(Debug)]
struct BindingBlindKms;

#[async_trait]
impl Kms for BindingBlindKms {
    fn name(&self) -> &str {
        "binding-blind"
    }
    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        Ok("blind:1".into())
    }
    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        root_key_ref == "blind:1"
    }
    async fn wrap(&self, key: &TenantKey, _: &KeyBinding) -> Result<WrappedKey, BackendError> {
        Ok(WrappedKey {
            root_key_ref: "blind:1".into(),
            ciphertext: key.expose().iter().map(|b| b ^ 0x5a).collect(),
        })
    }
    async fn unwrap(&self, w: &WrappedKey, _: &KeyBinding) -> Result<TenantKey, BackendError> {
        let bytes: Vec<u8> = w.ciphertext.iter().map(|b| b ^ 0x5a).collect();
        Ok(TenantKey::from_bytes(bytes.try_into().unwrap()))
    }
}

#[tokio::test]
async fn the_key_check_binds_tenant_and_version_when_the_kms_does_not() {
    // A whole key record (wrapped key, root key reference, key check) copied from tenant a to
    // tenant b, under a KMS that unwraps it for b without complaint: only the key-check MAC,
    // computed over (tenant, version), can refuse it — as a binding mismatch, before the
    // wrong key decrypts or encrypts anything for b.
    let dir = private_tempdir();
    let c = caller();
    let paths = EmbeddedPaths::new(dir.path());
    let keyring = || {
        Keyring::builder()
            .profile(Profile::Development)
            .kms(Arc::new(BindingBlindKms))
            .key_store(Arc::new(
                phiseal_store_sqlite::SqliteKeyStore::open(&paths.key_store).unwrap(),
            ))
            .danger_disable_audit()
            .build()
            .unwrap()
    };
    let b_ct = {
        let k = keyring();
        for t in ["a", "b", "v"] {
            k.create_tenant(&c, &tenant(t)).await.unwrap();
        }
        k.rotate(&c, &tenant("v")).await.unwrap();
        k.encrypt(&c, &ctx("b", "f", None), b"x").await.unwrap()
    };
    copy_record(
        &paths.key_store,
        ("a", 1),
        ("b", 1),
        "root_key_ref, wrapped, key_check",
    );
    copy_record(
        &paths.key_store,
        ("v", 1),
        ("v", 2),
        "root_key_ref, wrapped, key_check",
    );
    let k = keyring();
    for (t, version) in [("b", 1), ("v", 2)] {
        let err = k.encrypt(&c, &ctx(t, "f", None), b"x").await.unwrap_err();
        assert!(
            matches!(&err, Error::KeyBindingMismatch { version: v, .. } if *v == version),
            "{t}: {err}"
        );
    }
    let err = k
        .decrypt(&c, &ctx("b", "f", None), &b_ct)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::KeyBindingMismatch { .. }), "{err}");
    assert!(k.encrypt(&c, &ctx("a", "f", None), b"x").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_kms_call() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let writer = keyring_on(&p, CacheSettings::default());
    writer.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = writer.encrypt(&c, &cx, b"cold").await.unwrap();
    // A second keyring has a cold cache; 100 concurrent decrypts must unwrap once.
    let reader = keyring_on(&p, CacheSettings::default());
    let before = p.kms.unwraps.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (reader, cx, ct, c) = (reader.clone(), cx.clone(), ct.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            reader.decrypt(&c, &cx, &ct).await.map(|p| p.to_vec())
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), b"cold");
    }
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst) - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_a_refused_key_share_one_kms_call() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let writer = keyring_on(&p, CacheSettings::default());
    writer.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = writer.encrypt(&c, &cx, b"cold").await.unwrap();
    // The KMS now refuses the key: 100 concurrent decrypts on a cold cache wait on one
    // unwrap and all get its refusal, rather than each calling the KMS in turn.
    p.kms.refuse.store(true, Ordering::SeqCst);
    let reader = keyring_on(&p, CacheSettings::default());
    let before = p.kms.unwraps.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (reader, cx, ct, c) = (reader.clone(), cx.clone(), ct.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            reader.decrypt(&c, &cx, &ct).await.map(|p| p.to_vec())
        }));
    }
    for task in tasks {
        match task.await.unwrap() {
            Err(Error::Kms { source, .. }) => {
                assert_eq!(source.kind(), BackendErrorKind::Denied);
                assert!(source.to_string().contains("access denied"), "{source}");
            }
            other => panic!("expected the KMS refusal, got {other:?}"),
        }
    }
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst) - before, 1);
    // A request that starts after the failure asks the KMS again (no negative caching).
    p.kms.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        reader.decrypt(&c, &cx, &ct).await.unwrap().to_vec(),
        b"cold"
    );
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst) - before, 2);
}

#[tokio::test]
async fn cache_max_uses_and_ttl_force_unwrap() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let cache = CacheSettings {
        max_uses: 3,
        ..CacheSettings::default()
    };
    let k = keyring_on(&p, cache);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    // Creating the tenant unwrapped the new key once, to verify its wrapping.
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst), 1);
    let ct = k.encrypt(&c, &cx, b"x").await.unwrap(); // unwrap #2, use 1
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst), 2);
    for _ in 0..8 {
        k.decrypt(&c, &cx, &ct).await.unwrap();
    }
    // 9 operations, 3 per unwrapped key.
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst), 1 + 3);

    let ttl = CacheSettings {
        key_ttl: Duration::from_millis(600),
        metadata_ttl: Duration::from_millis(500),
        ..CacheSettings::default()
    };
    let k = keyring_on(&p, ttl);
    let before = p.kms.unwraps.load(Ordering::SeqCst);
    k.decrypt(&c, &cx, &ct).await.unwrap();
    k.decrypt(&c, &cx, &ct).await.unwrap();
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst) - before, 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    k.decrypt(&c, &cx, &ct).await.unwrap();
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst) - before, 2);
}

#[tokio::test]
async fn builder_refuses_inconsistent_combinations() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let local = Arc::new(
        phiseal_kms_local::LocalKms::open(EmbeddedPaths::new(dir.path()).root_key).unwrap(),
    );
    let msg = |r: Result<Keyring, Error>| match r {
        Err(Error::Config(m)) => m,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert!(msg(Keyring::builder().profile(Profile::Development).build()).contains("KMS"));
    assert!(
        msg(Keyring::builder()
            .profile(Profile::Development)
            .kms(local.clone())
            .build())
        .contains("key store")
    );
    assert!(
        msg(Keyring::builder()
            .profile(Profile::Development)
            .kms(local.clone())
            .key_store(p.store.clone())
            .build())
        .contains("audit")
    );
    let production = msg(Keyring::builder()
        .kms(local.clone())
        .key_store(p.store.clone())
        .audit(Arc::new(FailingAudit))
        .profile(Profile::Production)
        .build());
    assert!(production.contains("development only"), "{production}");
    // Production is the default: without a profile the same is refused, and so is a disabled
    // audit log.
    let default = msg(Keyring::builder()
        .kms(local.clone())
        .key_store(p.store.clone())
        .audit(Arc::new(FailingAudit))
        .build());
    assert!(default.contains("development only"), "{default}");
    let default = msg(Keyring::builder()
        .kms(p.kms.clone())
        .key_store(p.store.clone())
        .danger_disable_audit()
        .build());
    assert!(default.contains("requires an audit sink"), "{default}");
    let zero = CacheSettings {
        capacity: 0,
        ..CacheSettings::default()
    };
    assert!(
        msg(Keyring::builder()
            .profile(Profile::Development)
            .kms(local.clone())
            .key_store(p.store.clone())
            .danger_disable_audit()
            .cache(zero)
            .build())
        .contains("capacity")
    );
    let too_many = CacheSettings {
        max_uses: u64::MAX,
        ..CacheSettings::default()
    };
    assert!(
        msg(Keyring::builder()
            .profile(Profile::Development)
            .kms(local.clone())
            .key_store(p.store.clone())
            .danger_disable_audit()
            .cache(too_many)
            .build())
        .contains("max_uses")
    );
    // The production profile also refuses a disabled audit log (with a non-dev KMS).
    let not_dev = Arc::new(CountingKms::new(local, None));
    assert!(
        msg(Keyring::builder()
            .kms(not_dev)
            .key_store(p.store.clone())
            .danger_disable_audit()
            .profile(Profile::Production)
            .build())
        .contains("audit")
    );
}

#[tokio::test]
async fn audit_failure_fails_closed() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let ok = keyring_on(&p, CacheSettings::default());
    ok.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = ok.encrypt(&c, &cx, b"x").await.unwrap();
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(p.kms.clone())
        .key_store(p.store.clone())
        .audit(Arc::new(FailingAudit))
        .build()
        .unwrap();
    assert!(matches!(
        k.encrypt(&c, &cx, b"x").await,
        Err(Error::Audit { .. })
    ));
    assert!(matches!(
        k.decrypt(&c, &cx, &ct).await,
        Err(Error::Audit { .. })
    ));
    let items: Vec<(&EncryptionContext, &[u8])> = vec![(&cx, b"a")];
    assert!(matches!(
        k.encrypt_batch(&c, &items).await,
        Err(Error::Audit { .. })
    ));
    // Admin operations are refused before they run.
    assert!(matches!(
        k.create_tenant(&c, &tenant("new")).await,
        Err(Error::Audit { .. })
    ));
    assert!(p.store.load_tenant(&tenant("new")).await.unwrap().is_none());
    assert!(matches!(
        k.shred(&c, &tenant("t")).await,
        Err(Error::Audit { .. })
    ));
    assert!(
        ok.decrypt(&c, &cx, &ct).await.is_ok(),
        "shred must not have happened"
    );
}

/// An audit sink that accepts the next `allowed` appends and fails every later one.
#[derive(Debug, Default)]
struct AuditThenFail {
    allowed: AtomicUsize,
}

#[async_trait]
impl AuditSink for AuditThenFail {
    fn name(&self) -> &str {
        "audit-then-fail"
    }
    async fn append(&self, _: &[AuditEvent]) -> Result<(), BackendError> {
        let allowed = self
            .allowed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        allowed
            .map(drop)
            .map_err(|_| BackendError::new(BackendErrorKind::Unavailable, "disk full"))
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[tokio::test]
async fn an_admin_change_whose_result_record_fails_says_it_was_done() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let sink = Arc::new(AuditThenFail::default());
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(p.kms.clone())
        .key_store(p.store.clone())
        .audit(sink.clone())
        .build()
        .unwrap();
    sink.allowed.store(2, Ordering::SeqCst);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    // The attempt record is written, the rotation commits, its result record fails.
    sink.allowed.store(1, Ordering::SeqCst);
    let err = k.rotate(&c, &tenant("t")).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::AuditAfterCommit {
                action: "rotate_key",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), "audit_after_commit");
    assert!(err.to_string().contains("do not repeat it"), "{err}");
    let record = p.store.load_tenant(&tenant("t")).await.unwrap().unwrap();
    assert_eq!(record.latest_version(), 2, "the rotation was committed");
    // An operation that failed and whose result record failed too was not done: `Audit`.
    sink.allowed.store(1, Ordering::SeqCst);
    let err = k.rotate(&c, &tenant("missing")).await.unwrap_err();
    assert!(matches!(err, Error::Audit { .. }), "{err}");
    // Refused before it runs when even the attempt record fails: `Audit`, nothing done.
    let err = k.rotate(&c, &tenant("t")).await.unwrap_err();
    assert!(matches!(err, Error::Audit { .. }), "{err}");
    let record = p.store.load_tenant(&tenant("t")).await.unwrap().unwrap();
    assert_eq!(record.latest_version(), 2);

    // A root-key rewrap of a version whose result record fails after it was re-wrapped: done,
    // so `AuditAfterCommit` too (before: `Audit`, "nothing was done").
    let migrating = Keyring::builder()
        .profile(Profile::Development)
        .kms(Arc::new(phiseal::kms::KmsChain::new(
            Arc::new(phiseal_kms_local::LocalKms::open(dir.path().join("new-root.key")).unwrap())
                as Arc<dyn Kms>,
            vec![p.kms.clone() as Arc<dyn Kms>],
        )))
        .key_store(p.store.clone())
        .audit(sink.clone())
        .build()
        .unwrap();
    sink.allowed.store(1, Ordering::SeqCst);
    let err = migrating
        .rewrap_root_keys(&c, &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::AuditAfterCommit {
                action: "rewrap_root_key",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("may be run again: versions already moved are skipped"),
        "{err}"
    );
    let record = p.store.load_tenant(&tenant("t")).await.unwrap().unwrap();
    let roots: Vec<String> = record
        .versions
        .iter()
        .map(|v| v.wrapped.as_ref().unwrap().root_key_ref.clone())
        .collect();
    assert_ne!(
        roots[0], roots[1],
        "version 1 was re-wrapped before its result record failed, version 2 not"
    );
}

#[tokio::test]
async fn every_operation_is_audited_without_plaintext() {
    let dir = private_tempdir();
    let c = Caller::with_request_id(Actor::named("svc-a"), "req-123");
    {
        let k = open(dir.path());
        let t = tenant("t");
        k.create_tenant(&c, &t).await.unwrap();
        let cx = ctx("t", "dob", Some("rec-9"));
        let ct = k.encrypt(&c, &cx, b"PLAINTEXT-1985-02-03").await.unwrap();
        k.decrypt(&c, &cx, &ct).await.unwrap();
        let _ = k.decrypt(&c, &ctx("t", "other", None), &ct).await;
        let items: Vec<(&EncryptionContext, &[u8])> =
            vec![(&cx, b"PLAINTEXT-b1"), (&cx, b"PLAINTEXT-b2")];
        k.encrypt_batch(&c, &items).await.unwrap();
        k.rotate(&c, &t).await.unwrap();
        let rewrapped = k.rewrap(&c, &cx, &ct).await.unwrap();
        // Already current; and a rewrap whose decrypt fails (wrong field).
        k.rewrap(&c, &cx, &rewrapped).await.unwrap();
        let _ = k.rewrap(&c, &ctx("t", "other", None), &ct).await;
        k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
        k.shred(&c, &t).await.unwrap();
        k.flush_audit().await.unwrap();
    }
    let log = EmbeddedPaths::new(dir.path()).audit_log;
    let report = phiseal_audit_file::verify(&log).unwrap();
    assert!(report.is_intact(), "{report:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("PLAINTEXT"),
        "plaintext leaked into the audit log"
    );
    // One line per record (the records of one batch call share a log line): the export.
    let mut out = Vec::new();
    phiseal_audit_file::export_tenant(&log, "t", None, None, &mut out).unwrap();
    let records = String::from_utf8(out).unwrap();
    let count = |needle: &str| records.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count(r#""action":"create_tenant""#), 2, "attempt + result");
    assert_eq!(
        count(r#""action":"encrypt""#),
        3,
        "one per field, batches included"
    );
    assert_eq!(count(r#""action":"decrypt""#), 2);
    assert_eq!(count(r#""action":"rotate_key""#), 2);
    assert_eq!(count(r#""action":"rewrap""#), 3);
    // Each rewrap record names a key version: the new one, the current one (with where its
    // key came from), and for the failed one the version its decrypt tried (1).
    let rewraps: Vec<&str> = records
        .lines()
        .filter(|l| l.contains(r#""action":"rewrap""#))
        .collect();
    assert!(
        rewraps.iter().all(|l| l.contains(r#""key_version":"#)),
        "{rewraps:?}"
    );
    let failed = rewraps
        .iter()
        .find(|l| l.contains(r#""result":"decryption_failed""#))
        .unwrap();
    assert!(failed.contains(r#""key_version":1"#), "{failed}");
    // And each names the version the ciphertext was under: 1 for the moved one (now under
    // 2) and the failed one, 2 for the one already current.
    let number = |l: &str, member: &str| -> Option<u64> {
        let at = l.find(&format!("\"{member}\":"))? + member.len() + 3;
        let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let got: Vec<(Option<u64>, Option<u64>)> = rewraps
        .iter()
        .map(|l| (number(l, "from_key_version"), number(l, "key_version")))
        .collect();
    assert_eq!(
        got,
        vec![(Some(1), Some(2)), (Some(2), Some(2)), (Some(1), Some(1))],
        "{rewraps:?}"
    );
    // No other record has one.
    assert_eq!(count(r#""from_key_version":"#), 3);
    assert_eq!(count(r#""result":"decryption_failed""#), 2);
    assert_eq!(count(r#""action":"set_min_decrypt_version""#), 2);
    assert_eq!(count(r#""action":"shred_tenant""#), 2);
    assert!(
        count(r#""action":"unwrap_key""#) >= 2,
        "KMS unwraps on misses"
    );
    assert!(
        count(r#""key_source":"cache""#) >= 1,
        "cache hits are recorded"
    );
    assert!(
        text.lines()
            .skip(1)
            .all(|l| l.contains(r#""request_id":"req-123""#))
    );
    assert!(text.contains(r#""field":"dob""#) && text.contains(r#""record":"rec-9""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_never_duplicate_a_version() {
    let dir = private_tempdir();
    let c = caller();
    let a = open(dir.path());
    a.create_tenant(&c, &tenant("t")).await.unwrap();
    let p = parts(dir.path());
    let b = keyring_on(&p, CacheSettings::default());
    let mut tasks = Vec::new();
    for i in 0..16 {
        let k = if i % 2 == 0 { a.clone() } else { b.clone() };
        let c = c.clone();
        tasks.push(tokio::spawn(
            async move { k.rotate(&c, &tenant("t")).await },
        ));
    }
    let mut won = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(v) => won.push(v),
            Err(Error::RotationConflict { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    won.sort_unstable();
    let before = won.len();
    won.dedup();
    assert_eq!(before, won.len(), "two rotations created the same version");
    let status = a.key_status(&c, &tenant("t")).await.unwrap();
    let versions: Vec<u32> = status.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, (1..=won.len() as u32 + 1).collect::<Vec<_>>());
    assert_eq!(status.primary, Some(won.len() as u32 + 1));
}

/// Cache settings that trust tenant metadata (and keys) for a minute: another process's
/// changes reach a keyring with them only through the paths that re-read on their own.
#[tokio::test]
async fn a_change_elsewhere_drops_metadata_and_only_the_keys_it_refused() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let k = keyring_on(&p, slow_metadata());
    let other = keyring_on(&p, slow_metadata());
    let c = caller();
    let (t, u) = (tenant("t"), tenant("u"));
    for x in [&t, &u] {
        k.create_tenant(&c, x).await.unwrap();
    }
    let (cx_t, cx_u) = (ctx("t", "f", None), ctx("u", "f", None));
    let old_t = k.encrypt(&c, &cx_t, b"t1").await.unwrap();
    k.encrypt(&c, &cx_u, b"u1").await.unwrap();
    assert_eq!(phiseal::testkit::cached_keys(&k), 2);
    let unwraps = || p.kms.unwraps.load(Ordering::SeqCst);

    // A notification that changed nothing (or was forged): metadata is read again, no key
    // is unwrapped again.
    let before = unwraps();
    k.forget_metadata(None);
    k.forget_metadata(Some(&u));
    k.recheck_tenants(None).await.unwrap();
    k.encrypt(&c, &cx_t, b"t").await.unwrap();
    k.encrypt(&c, &cx_u, b"u").await.unwrap();
    assert_eq!(unwraps(), before, "a notification cost a KMS call");
    assert_eq!(phiseal::testkit::cached_keys(&k), 2);

    // Another process rotates t and retires version 1: what the fresh read refuses goes,
    // the rest stays.
    other.rotate(&c, &t).await.unwrap();
    other.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    k.forget_metadata(Some(&t));
    k.recheck_tenants(Some(std::slice::from_ref(&t)))
        .await
        .unwrap();
    assert_eq!(
        phiseal::testkit::cached_keys(&k),
        1,
        "t's version 1 left the cache, u's stayed"
    );
    assert!(matches!(
        k.decrypt(&c, &cx_t, &old_t).await,
        Err(Error::KeyVersionRetired { version: 1, .. })
    ));
    // Another process shreds u: refused at once (the metadata was dropped), and its key is
    // gone after the fresh read — here the operation's own.
    other.shred(&c, &u).await.unwrap();
    k.forget_metadata(Some(&u));
    assert!(matches!(
        k.encrypt(&c, &cx_u, b"x").await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert_eq!(
        phiseal::testkit::cached_keys(&k),
        0,
        "u's key left the cache"
    );
}

#[tokio::test]
async fn a_recheck_that_learns_of_a_shred_stops_the_cached_metadata_too() {
    // The sidecar's 60 s recheck after a missed notification: no `forget_metadata` first.
    let TwoKeyrings {
        dir: _dir,
        k,
        other,
        c,
        t,
        cx,
    } = two_keyrings_with_tenant_t().await;
    k.encrypt(&c, &cx, b"v").await.unwrap();
    other.shred(&c, &t).await.unwrap();
    k.recheck_tenants(Some(std::slice::from_ref(&t)))
        .await
        .unwrap();
    assert_eq!(phiseal::testkit::cached_keys(&k), 0);
    assert!(matches!(
        k.encrypt(&c, &cx, b"x").await,
        Err(Error::KeyDestroyed { .. })
    ));
}

#[tokio::test]
async fn a_cached_key_never_serves_another_key_under_its_version() {
    // A failover that lost a rotation (or a store restored from a backup), then another
    // rotation: version 2 is now another key. The cached copy of the lost one must not serve.
    let TwoKeyrings {
        dir,
        k,
        other,
        c,
        t,
        cx,
    } = two_keyrings_with_tenant_t().await;
    k.rotate(&c, &t).await.unwrap();
    assert_eq!(version_of(&k.encrypt(&c, &cx, b"lost").await.unwrap()), 2);
    edit_store(
        dir.path(),
        "DELETE FROM key_versions WHERE tenant = 't' AND version = 2; \
         UPDATE key_versions SET state = 'primary' WHERE tenant = 't' AND version = 1;",
    );
    other.rotate(&c, &t).await.unwrap();
    // (The notification of a shared store's listener reconnecting.)
    k.forget_metadata(None);
    k.recheck_tenants(None).await.unwrap();
    let ct = k.encrypt(&c, &cx, b"kept").await.unwrap();
    assert_eq!(version_of(&ct), 2);
    assert_eq!(
        &*other.decrypt(&c, &cx, &ct).await.unwrap(),
        b"kept",
        "encrypted under the lost key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_on_an_older_records_unwrap_does_not_use_its_key() {
    // Without a change notification (a store restored from a backup, a failover that lost a
    // rotation), one request reads a version's new record while another, through the older
    // view, is still unwrapping the old record: the first waits on that unwrap, and the key
    // it gets back must not serve the new record.
    waiting_on_an_older_records_unwrap(false).await;
}

/// The scenario of `a_request_that_waited_on_an_older_records_unwrap_does_not_use_its_key`,
/// with the older record's unwrap succeeding or (`fails`) refused by the KMS: either way the
/// waiting request encrypts under its own record's key.
async fn waiting_on_an_older_records_unwrap(fails: bool) {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let kms = SwitchableKms::over(&p);
    let fast_metadata = CacheSettings {
        metadata_ttl: Duration::from_millis(100),
        ..CacheSettings::default()
    };
    let k = switchable_keyring(&kms, &p, fast_metadata, None);
    let (c, t, cx) = (caller(), tenant("t"), ctx("t", "f", None));
    k.create_tenant(&c, &t).await.unwrap();
    // Version 2 (its first key) made elsewhere: not cached here.
    keyring_on(&p, slow_metadata())
        .rotate(&c, &t)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // An encryption reads version 2's record and waits in the KMS for its key …
    let first = encrypt_held_in_the_kms(&k, &kms, &c, &cx).await;
    // … while version 2 becomes another key (the rotation lost, then made again).
    let third = version_2_made_again(dir.path(), &p).await;
    // Once this keyring's metadata is past its TTL, a second encryption reads the new record
    // and waits on the first one's unwrap.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (k2, c2, cx2) = (k.clone(), c.clone(), cx.clone());
    let second = tokio::spawn(async move { k2.encrypt(&c2, &cx2, b"second").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    if fails {
        kms.fail_with(Some(BackendErrorKind::Denied));
        kms.gate.add_permits(1);
        let failed = first.await.unwrap();
        assert!(matches!(failed, Err(Error::Kms { .. })), "{failed:?}");
        kms.fail_with(None);
        kms.hold.store(false, Ordering::SeqCst);
        kms.gate.add_permits(10);
    } else {
        kms.hold.store(false, Ordering::SeqCst);
        kms.gate.add_permits(10);
        first.await.unwrap().unwrap();
    }
    let sealed = second.await.unwrap().unwrap();
    assert_eq!(version_of(&sealed), 2);
    assert_eq!(
        &*third.decrypt(&c, &cx, &sealed).await.unwrap(),
        b"second",
        "sealed under the old record's key"
    );
}

#[tokio::test]
async fn a_change_that_failed_in_the_store_and_was_not_recorded_is_not_reported_as_nothing_done() {
    // A shred whose store call reports a failure after it committed (a lost answer), and
    // whose result record then fails too: the caller gets the store's error, which may
    // follow a commit — not `Error::Audit`, which says that nothing was done.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let store = counting_store(&p);
    let sink = Arc::new(AuditThenFail::default());
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(p.kms.clone())
        .key_store(store.clone())
        .audit(sink.clone())
        .build()
        .unwrap();
    sink.allowed.store(2, Ordering::SeqCst);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    store.fail_shred.store(1, Ordering::SeqCst);
    sink.allowed.store(1, Ordering::SeqCst);
    let err = k.shred(&c, &tenant("t")).await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    let record = p.store.load_tenant(&tenant("t")).await.unwrap().unwrap();
    assert!(record.shredded_at.is_some(), "the shred was committed");
}

/// Two keyrings (this process's and "another process's") on one store, tenant "t" created.
struct TwoKeyrings {
    dir: tempfile::TempDir,
    k: Keyring,
    other: Keyring,
    c: Caller,
    t: TenantId,
    cx: EncryptionContext,
}

async fn two_keyrings_with_tenant_t() -> TwoKeyrings {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let k = keyring_on(&p, slow_metadata());
    let other = keyring_on(&p, slow_metadata());
    let c = caller();
    let t = tenant("t");
    let cx = ctx("t", "f", None);
    k.create_tenant(&c, &t).await.unwrap();
    TwoKeyrings {
        dir,
        k,
        other,
        c,
        t,
        cx,
    }
}

fn slow_metadata() -> CacheSettings {
    CacheSettings {
        metadata_ttl: Duration::from_secs(60),
        key_ttl: Duration::from_secs(60),
        ..CacheSettings::default()
    }
}

#[tokio::test]
async fn another_process_rotation_is_seen_within_the_documented_bounds() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let slow_metadata = slow_metadata();
    let fast_metadata = CacheSettings {
        metadata_ttl: Duration::from_millis(100),
        ..CacheSettings::default()
    };
    let a = keyring_on(&p, CacheSettings::default());
    let b = keyring_on(&p, slow_metadata);
    let e = keyring_on(&p, fast_metadata);
    a.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    b.encrypt(&c, &cx, b"warm").await.unwrap();
    e.encrypt(&c, &cx, b"warm").await.unwrap();
    a.rotate(&c, &tenant("t")).await.unwrap();
    let v2 = a.encrypt(&c, &cx, b"new").await.unwrap();
    // A ciphertext under an unknown newer version refreshes the metadata, at most once per
    // 100 ms (so forged versions cannot hammer the store) …
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(&b.decrypt(&c, &cx, &v2).await.unwrap()[..], b"new");
    // … long before b's 60 s metadata TTL, after which b also encrypts under v2.
    let ct = b.encrypt(&c, &cx, b"x").await.unwrap();
    assert_eq!(phiseal::format::parse(&ct).unwrap().key_version, 2);
    // Encryption alone picks up the rotation within metadata_ttl.
    let ct = e.encrypt(&c, &cx, b"x").await.unwrap();
    assert_eq!(phiseal::format::parse(&ct).unwrap().key_version, 2);
}

#[tokio::test]
async fn queries_see_another_process_rotation_within_100_ms() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let a = keyring_on(&p, CacheSettings::default());
    let b = keyring_on(&p, slow_metadata());
    a.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "ssn", None);
    let bi = phiseal::BlindIndexSpec::new(phiseal::Normalization::DigitsOnly, 32).unwrap();
    let versions = |terms: &[phiseal::SearchTerm]| -> Vec<u32> {
        terms.iter().map(|t| t.key_version).collect()
    };
    // b caches the tenant's metadata (v1 only) for up to its 60 s metadata TTL.
    let q = b
        .blind_index_query(&c, &cx, b"078051120", &bi)
        .await
        .unwrap();
    assert_eq!(versions(&q), [1]);
    let q = b.deterministic_query(&c, &cx, b"078051120").await.unwrap();
    assert_eq!(versions(&q), [1]);
    // Another process rotates and writes the value under v2.
    a.rotate(&c, &tenant("t")).await.unwrap();
    let index = a.blind_index(&c, &cx, b"078051120", &bi).await.unwrap();
    let ciphertext = a
        .encrypt_deterministic(&c, &cx, b"078051120")
        .await
        .unwrap();
    assert_eq!(index.key_version, 2);
    // Queries re-read metadata older than 100 ms: b's terms find the v2 row. (The sleep only
    // guarantees more than 100 ms: a refresh age up to ~150 ms would pass too.)
    tokio::time::sleep(Duration::from_millis(150)).await;
    let q = b
        .blind_index_query(&c, &cx, b"078051120", &bi)
        .await
        .unwrap();
    assert_eq!(versions(&q), [2, 1]);
    assert!(q.contains(&index));
    let q = b.deterministic_query(&c, &cx, b"078051120").await.unwrap();
    assert_eq!(versions(&q), [2, 1]);
    assert!(q.iter().any(|term| term.value == ciphertext));
}

#[tokio::test]
async fn queries_ride_out_a_store_outage_without_waiting_on_it_each_time() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (k, store) = keyring_on_counting_store(&p);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "mrn", None);
    k.deterministic_query(&c, &cx, b"MRN-1").await.unwrap();
    // The store fails: a query past the refresh age tries it once and serves the cached
    // metadata (within metadata_ttl, 5 s by default)…
    store.fail_loads.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = store.loads.load(Ordering::SeqCst);
    k.deterministic_query(&c, &cx, b"MRN-1").await.unwrap();
    assert_eq!(store.loads.load(Ordering::SeqCst), before + 1);
    // …and the next queries do not try again before the retry interval.
    tokio::time::sleep(Duration::from_millis(150)).await;
    k.deterministic_query(&c, &cx, b"MRN-1").await.unwrap();
    assert_eq!(store.loads.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn a_query_whose_tenant_record_fails_its_checks_fails_rather_than_answer_from_cache() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (k, store) = keyring_on_counting_store(&p);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "mrn", None);
    k.deterministic_query(&c, &cx, b"MRN-1").await.unwrap();
    // Not an outage: this tenant's record. The query fails (no terms from a view it could
    // not refresh), and queries are not paused: the next one reads the store again.
    store.corrupt_loads.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    match k.deterministic_query(&c, &cx, b"MRN-1").await {
        Err(Error::Store { source, .. }) => {
            assert_eq!(source.kind(), BackendErrorKind::InvalidData)
        }
        other => panic!("expected the store's error, got {other:?}"),
    }
    store.corrupt_loads.store(false, Ordering::SeqCst);
    let before = store.loads.load(Ordering::SeqCst);
    k.deterministic_query(&c, &cx, b"MRN-1").await.unwrap();
    assert_eq!(store.loads.load(Ordering::SeqCst), before + 1);
}

/// `p`'s key store in a [`CountingStore`] that injects nothing yet.
fn counting_store(p: &Parts) -> Arc<CountingStore> {
    Arc::new(CountingStore {
        inner: p.store.clone(),
        loads: AtomicUsize::new(0),
        fail_loads: false.into(),
        corrupt_loads: false.into(),
        stall_next_load: false.into(),
        stalled: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
        fail_shred: 0.into(),
        conflict_creates: false.into(),
    })
}

/// A key store wrapper that counts `load_tenant` calls and can stall the next one after it
/// has read (the real SQLite store does the work): it then signals `stalled` and returns only
/// once `release` is signalled.
#[derive(Debug)]
struct CountingStore {
    inner: Arc<dyn KeyStore>,
    loads: AtomicUsize,
    /// While set, every load fails as `Unavailable` (a store outage).
    fail_loads: std::sync::atomic::AtomicBool,
    /// While set, every load fails as `InvalidData` (a record that fails its checks).
    corrupt_loads: std::sync::atomic::AtomicBool,
    stall_next_load: std::sync::atomic::AtomicBool,
    stalled: tokio::sync::Notify,
    release: tokio::sync::Notify,
    /// `shred_tenant` fails: 0 never, 1 after the inner store committed, 2 without shredding,
    /// 3 without shredding and with every load failing from then on.
    fail_shred: std::sync::atomic::AtomicU8,
    /// While set, `create_tenant` fails as a serialization failure would (`Conflict`,
    /// nothing created), as a shared store can report under concurrent writes.
    conflict_creates: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl KeyStore for CountingStore {
    fn name(&self) -> &str {
        "counting"
    }
    async fn create_tenant(&self, t: &TenantId, first: KeyRecord) -> Result<(), BackendError> {
        if self.conflict_creates.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                BackendErrorKind::Conflict,
                "injected serialization failure",
            ));
        }
        self.inner.create_tenant(t, first).await
    }
    async fn load_tenant(&self, t: &TenantId) -> Result<Option<TenantRecord>, BackendError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.fail_loads.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                "injected store outage",
            ));
        }
        if self.corrupt_loads.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                BackendErrorKind::InvalidData,
                "injected corrupt record",
            ));
        }
        let record = self.inner.load_tenant(t).await;
        if self.stall_next_load.swap(false, Ordering::SeqCst) {
            self.stalled.notify_one();
            self.release.notified().await;
        }
        record
    }
    async fn insert_version(&self, t: &TenantId, l: u32, n: KeyRecord) -> Result<(), BackendError> {
        self.inner.insert_version(t, l, n).await
    }
    async fn set_min_decrypt_version(
        &self,
        t: &TenantId,
        e: u32,
        m: u32,
    ) -> Result<(), BackendError> {
        self.inner.set_min_decrypt_version(t, e, m).await
    }
    async fn shred_tenant(&self, t: &TenantId, at: jiff::Timestamp) -> Result<(), BackendError> {
        let injected = || BackendError::new(BackendErrorKind::Unavailable, "injected failure");
        match self.fail_shred.load(Ordering::SeqCst) {
            1 => {
                self.inner.shred_tenant(t, at).await?;
                Err(injected())
            }
            2 => Err(injected()),
            3 => {
                self.fail_loads.store(true, Ordering::SeqCst);
                Err(injected())
            }
            _ => self.inner.shred_tenant(t, at).await,
        }
    }
    async fn list_tenants(&self) -> Result<Vec<TenantId>, BackendError> {
        self.inner.list_tenants().await
    }
    async fn replace_wrapped(
        &self,
        t: &TenantId,
        v: u32,
        e: &WrappedKey,
        r: WrappedKey,
    ) -> Result<(), BackendError> {
        self.inner.replace_wrapped(t, v, e, r).await
    }
}

#[tokio::test]
async fn a_conflict_creating_a_tenant_the_store_does_not_hold_is_not_reported_as_existing() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (k, store) = keyring_on_counting_store(&p);
    let t = tenant("new-clinic");
    store.conflict_creates.store(true, Ordering::SeqCst);
    match k.create_tenant(&c, &t).await {
        Err(Error::Store { source, .. }) => assert_eq!(source.kind(), BackendErrorKind::Conflict),
        other => panic!("expected the store's conflict (retry), got {other:?}"),
    }
    // Retried, it is created; created, it exists (also when the store reports a conflict).
    store.conflict_creates.store(false, Ordering::SeqCst);
    k.create_tenant(&c, &t).await.unwrap();
    assert!(matches!(
        k.create_tenant(&c, &t).await,
        Err(Error::TenantExists { .. })
    ));
    store.conflict_creates.store(true, Ordering::SeqCst);
    assert!(matches!(
        k.create_tenant(&c, &t).await,
        Err(Error::TenantExists { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minimum_version_change_that_overtook_another_makes_it_fail_not_undo_it() {
    // Operator A lowers the minimum to 2 (read: 1); while A's request is between its read and
    // its write, operator B (another daemon) raises it to 3 to retire a version. A's write
    // must fail, not silently bring version 2 back.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (a, store) = keyring_on_counting_store(&p);
    let b = keyring_on(&p, CacheSettings::default());
    let t = tenant("t");
    a.create_tenant(&c, &t).await.unwrap();
    a.rotate(&c, &t).await.unwrap();
    a.rotate(&c, &t).await.unwrap();
    store.stall_next_load.store(true, Ordering::SeqCst);
    let lowering = {
        let (a, c, t) = (a.clone(), c.clone(), t.clone());
        tokio::spawn(async move { a.set_min_decrypt_version(&c, &t, 2).await })
    };
    tokio::time::timeout(Duration::from_secs(10), store.stalled.notified())
        .await
        .expect("A never read the tenant");
    b.set_min_decrypt_version(&c, &t, 3).await.unwrap();
    store.release.notify_one();
    match lowering.await.unwrap() {
        Err(e @ Error::ConcurrentChange { .. }) => {
            assert!(e.to_string().contains("minimum decryption version"), "{e}");
            assert_eq!(e.kind(), "concurrent_change");
        }
        other => panic!("expected a concurrent change, got {other:?}"),
    }
    let status = b.key_status(&c, &t).await.unwrap();
    assert_eq!(status.min_decrypt_version, 3, "B's change stands");
}

/// A keyring (audit off) whose key store counts and can stall its reads.
fn keyring_on_counting_store(p: &Parts) -> (Keyring, Arc<CountingStore>) {
    keyring_on_counting_store_with(p, CacheSettings::default())
}

/// [`keyring_on_counting_store`] with `cache`.
fn keyring_on_counting_store_with(
    p: &Parts,
    cache: CacheSettings,
) -> (Keyring, Arc<CountingStore>) {
    let store = counting_store(p);
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(p.kms.clone())
        .key_store(store.clone())
        .danger_disable_audit()
        .cache(cache)
        .build()
        .unwrap();
    (k, store)
}

#[tokio::test]
async fn a_batch_naming_many_unknown_tenants_makes_few_store_reads() {
    // 100 items of distinct made-up tenants (one call, one rate-limit unit in the sidecar):
    // 16 are looked up and not found, the rest refused without a store read. Items of a
    // known tenant whose key is cached are still served. Before: 100 key-store reads.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (k, store) = keyring_on_counting_store(&p);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let known = ctx("t", "f", None);
    let ct = k.encrypt(&c, &known, b"x").await.unwrap();
    let ghosts: Vec<EncryptionContext> = (0..100)
        .map(|i| ctx(&format!("ghost-{i}"), "f", None))
        .collect();
    let mut items: Vec<(&EncryptionContext, &[u8])> =
        ghosts.iter().map(|cx| (cx, ct.as_slice())).collect();
    items.push((&known, ct.as_slice()));
    let before = store.loads.load(Ordering::SeqCst);
    let results = k.decrypt_batch(&c, &items).await.unwrap();
    assert_eq!(store.loads.load(Ordering::SeqCst) - before, 16);
    for (i, result) in results.iter().enumerate().take(100) {
        match (i < 16, result) {
            (true, Err(Error::TenantNotFound { .. })) => {}
            (false, Err(e @ Error::InvalidInput { what: "batch", .. })) => {
                assert!(e.to_string().contains("do not exist"), "{e}");
            }
            (_, other) => panic!("item {i}: {other:?}"),
        }
    }
    assert_eq!(&**results[100].as_ref().unwrap(), b"x");
    // One unknown tenant named by every item (a mistyped tenant): one read, every item
    // tenant_not_found (not refused: the caller learns what is wrong with all of them).
    let typo = ctx("acmee", "f", None);
    let items: Vec<(&EncryptionContext, &[u8])> = (0..50).map(|_| (&typo, ct.as_slice())).collect();
    let before = store.loads.load(Ordering::SeqCst);
    let results = k.decrypt_batch(&c, &items).await.unwrap();
    assert_eq!(store.loads.load(Ordering::SeqCst) - before, 1);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(Error::TenantNotFound { .. })))
    );
}

#[tokio::test]
async fn streams_stop_once_their_tenant_cannot_be_read_for_longer_than_a_key_may_serve() {
    // The key store is unreachable: a running stream's tenant may have been shredded by
    // another process meanwhile, so the stream stops once the tenant could not be read for
    // longer than key_ttl + max_stale (2 s here), as cached keys stop serving in a KMS
    // outage. Before, it ran on for as long as its client kept sending.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let cache = CacheSettings {
        key_ttl: Duration::from_secs(2),
        metadata_ttl: Duration::from_millis(500),
        ..CacheSettings::default()
    };
    let (k, store) = keyring_on_counting_store_with(&p, cache);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let options = StreamOptions::default();
    let (sealed, segment) = sealed_stream(&k, &c, &cx).await;
    let mut writing = k.start_encrypt_stream(&c, &cx, options).await.unwrap();
    let mut reading = k.start_decrypt_stream(&c, &cx);
    let (mut ciphertext, mut plaintext) = (Vec::new(), Vec::new());
    let piece = sealed.len() / 4;
    reading
        .push(&sealed[..piece], &mut plaintext)
        .await
        .unwrap();
    store.fail_loads.store(true, Ordering::SeqCst);
    // Within the limit: the failed re-read is reported, and the streams go on.
    assert!(k.recheck_streams(&c, None).await.is_err());
    writing.push(&segment, &mut ciphertext).unwrap();
    reading
        .push(&sealed[piece..2 * piece], &mut plaintext)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(k.recheck_streams(&c, None).await.is_err());
    let pushed = writing.push(&segment, &mut ciphertext);
    assert!(matches!(pushed, Err(Error::Store { .. })), "{pushed:?}");
    plaintext.clear();
    let pushed = reading.push(&sealed[2 * piece..], &mut plaintext).await;
    assert!(matches!(pushed, Err(Error::Store { .. })), "{pushed:?}");
    assert!(plaintext.is_empty(), "plaintext released after the stop");
    // A tenant read again in time keeps its streams (the limit runs from the last read).
    store.fail_loads.store(false, Ordering::SeqCst);
    let mut writing = k.start_encrypt_stream(&c, &cx, options).await.unwrap();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        k.recheck_streams(&c, None).await.unwrap();
    }
    store.fail_loads.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(k.recheck_streams(&c, None).await.is_err());
    writing.push(&segment, &mut ciphertext).unwrap();
}

#[tokio::test]
async fn a_shred_the_store_reports_as_failed_stops_streams_only_if_it_may_have_committed() {
    let c = caller();
    // (failure mode, the stream must stop): committed; not committed; not committed and the
    // tenant cannot be read again (nothing says it is alive: fail closed).
    for (mode, stopped) in [(1, true), (2, false), (3, true)] {
        let dir = private_tempdir();
        let p = parts(dir.path());
        let (k, store) = keyring_on_counting_store(&p);
        k.create_tenant(&c, &tenant("t")).await.unwrap();
        let cx = ctx("t", "f", None);
        let mut stream = k
            .start_encrypt_stream(&c, &cx, StreamOptions::default())
            .await
            .unwrap();
        let segment = vec![1u8; StreamOptions::default().segment_size as usize];
        let mut out = Vec::new();
        stream.push(&segment, &mut out).unwrap();
        store.fail_shred.store(mode, Ordering::SeqCst);
        assert!(k.shred(&c, &tenant("t")).await.is_err());
        store.fail_loads.store(false, Ordering::SeqCst);
        // The next push completes a segment: sealed only if the stream was not stopped.
        let pushed = stream.push(&segment, &mut out);
        assert_eq!(
            matches!(pushed, Err(Error::KeyDestroyed { .. })),
            stopped,
            "mode {mode}: {pushed:?}"
        );
    }
}

#[tokio::test]
async fn a_version_rotated_elsewhere_a_moment_ago_decrypts() {
    // Another process rotates right after this keyring read the tenant (before its
    // notification, if any, arrives): the newer version is found, not refused.
    let TwoKeyrings {
        dir: _dir,
        k,
        other,
        c,
        t,
        cx,
    } = two_keyrings_with_tenant_t().await;
    k.encrypt(&c, &cx, b"v1").await.unwrap();
    other.rotate(&c, &t).await.unwrap();
    let ct = other.encrypt(&c, &cx, b"v2").await.unwrap();
    assert_eq!(version_of(&ct), 2);
    assert_eq!(&*k.decrypt(&c, &cx, &ct).await.unwrap(), b"v2");
}

#[tokio::test]
async fn forged_versions_do_not_reach_the_store_on_every_call() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (k, store) = keyring_on_counting_store(&p);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let mut ct = k.encrypt(&c, &cx, b"x").await.unwrap();
    ct[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
    let before = store.loads.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    // The first re-reads the tenant; metadata replaced right after (a notification, a search
    // refresh) does not reset the limit: its own read, and no second one for the version.
    assert!(matches!(
        k.decrypt(&c, &cx, &ct).await,
        Err(Error::KeyVersionNotFound { .. })
    ));
    let replaced = store.loads.load(Ordering::SeqCst);
    k.forget_metadata(Some(&tenant("t")));
    assert!(matches!(
        k.decrypt(&c, &cx, &ct).await,
        Err(Error::KeyVersionNotFound { .. })
    ));
    assert_eq!(store.loads.load(Ordering::SeqCst), replaced + 1);
    // One after another, within 100 ms: no re-read.
    for _ in 0..5 {
        let err = k.decrypt(&c, &cx, &ct).await.unwrap_err();
        assert!(matches!(err, Error::KeyVersionNotFound { .. }), "{err}");
    }
    // A batch of them (and one good item) is answered at once, item by item.
    let good = k.encrypt(&c, &cx, b"good").await.unwrap();
    let mut items: Vec<(&EncryptionContext, &[u8])> = vec![(&cx, &ct); 100];
    items.push((&cx, &good));
    let batch_started = std::time::Instant::now();
    let results = k.decrypt_batch(&c, &items).await.unwrap();
    assert!(
        batch_started.elapsed() < Duration::from_secs(2),
        "{:?}",
        batch_started.elapsed()
    );
    assert_eq!(&**results[100].as_ref().unwrap(), b"good");
    assert!(
        results[..100]
            .iter()
            .all(|r| matches!(r, Err(Error::KeyVersionNotFound { .. })))
    );
    // Many at once: they share the refresh.
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (k, c, cx, ct) = (k.clone(), c.clone(), cx.clone(), ct.clone());
            tokio::spawn(async move { k.decrypt(&c, &cx, &ct).await.map(drop) })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::KeyVersionNotFound { .. }), "{err}");
    }
    // At most one refresh per 100 ms (plus the first, and the read after the forget), not one
    // per forged ciphertext.
    let allowed = 2 + started.elapsed().as_millis() / 100;
    let loads = (store.loads.load(Ordering::SeqCst) - before) as u128;
    assert!(
        loads <= allowed && loads <= 8,
        "{loads} store reads for 55 forged versions in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_read_before_a_shred_is_never_used_after_it() {
    // An encrypt reads the tenant (not yet shredded), then stalls; the shred completes; the
    // stalled read must not be cached and used to encrypt for the shredded tenant. Three
    // generation checks stand in the way (the metadata cache's, the key lookup's, the key-use
    // guard's): checked by removing them, this test fails only once all three are gone.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (k, store) = keyring_on_counting_store(&p);
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    store.stall_next_load.store(true, Ordering::SeqCst);
    let stalled = {
        let (k, c, cx) = (k.clone(), c.clone(), cx.clone());
        tokio::spawn(async move { k.encrypt(&c, &cx, b"late").await })
    };
    // The encrypt has read the tenant (not shredded) and holds the record.
    tokio::time::timeout(Duration::from_secs(10), store.stalled.notified())
        .await
        .expect("the encrypt never read the tenant");
    let loads = store.loads.load(Ordering::SeqCst);
    k.shred(&c, &tenant("t")).await.unwrap();
    assert!(
        store.loads.load(Ordering::SeqCst) > loads,
        "the shred did not read the key store"
    );
    store.release.notify_one();
    // The stalled encrypt resumes after the shred returned: its read is stale and refused,
    // and so is every later encrypt.
    let err = stalled.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::KeyDestroyed { .. }), "{err}");
    let err = k.encrypt(&c, &cx, b"after").await.unwrap_err();
    assert!(matches!(err, Error::KeyDestroyed { .. }), "{err}");
}

#[tokio::test]
async fn production_refuses_a_buffered_audit_log_unless_allowed() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let log = Arc::new(
        phiseal_audit_file::FileAuditLog::open(
            dir.path().join("buffered.log"),
            phiseal_audit_file::Durability::buffered(),
        )
        .unwrap(),
    );
    let not_dev = Arc::new(CountingKms::new(p.kms.inner.clone(), None));
    let build = |allow: bool| {
        let b = Keyring::builder()
            .kms(not_dev.clone())
            .key_store(p.store.clone())
            .audit(log.clone())
            .profile(Profile::Production);
        if allow {
            b.danger_allow_buffered_audit()
        } else {
            b
        }
        .build()
    };
    match build(false) {
        Err(Error::Config(m)) => assert!(m.contains("danger_allow_buffered_audit"), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(build(true).is_ok());
}

#[tokio::test]
async fn algorithms_and_providers_interoperate() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let build = |provider: &'static phiseal::crypto::CryptoProvider, alg: Algorithm| {
        Keyring::builder()
            .profile(Profile::Development)
            .kms(p.kms.clone())
            .key_store(p.store.clone())
            .danger_disable_audit()
            .crypto_provider(provider)
            .algorithm(alg)
            .build()
            .unwrap()
    };
    let providers = [
        &phiseal::crypto::aws_lc::PROVIDER,
        &phiseal::crypto::rust_crypto::PROVIDER,
    ];
    build(providers[0], Algorithm::Aes256GcmHkdf)
        .create_tenant(&c, &tenant("t"))
        .await
        .unwrap();
    let cx = ctx("t", "f", Some("r"));
    for alg in [Algorithm::Aes256GcmHkdf, Algorithm::XChaCha20Poly1305] {
        for writer in providers {
            let ct = build(writer, alg)
                .encrypt(&c, &cx, b"interop")
                .await
                .unwrap();
            assert_eq!(ct[1], alg.id());
            assert_eq!(ct.len(), 7 + alg.overhead());
            for reader in providers {
                let k = build(reader, Algorithm::Aes256GcmHkdf);
                assert_eq!(&k.decrypt(&c, &cx, &ct).await.unwrap()[..], b"interop");
            }
        }
    }
}

#[test]
fn secrets_do_not_print() {
    let key = TenantKey::from_bytes([0x42; 32]);
    let shown = format!("{key:?}");
    assert!(!shown.contains("42") && shown.contains("REDACTED"));
}

#[tokio::test]
async fn plaintext_does_not_print() {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = k.encrypt(&c, &cx, b"SECRET-DIAGNOSIS").await.unwrap();
    let pt = k.decrypt(&c, &cx, &ct).await.unwrap();
    assert_eq!(pt.as_bytes(), b"SECRET-DIAGNOSIS");
    let shown = format!("{pt:?}");
    assert!(
        !shown.contains("SECRET") && shown.contains("16 bytes"),
        "{shown}"
    );
}

#[test]
fn data_dir_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = phiseal_embedded::open(dir.path(), &EmbeddedOptions::default()).unwrap_err();
    assert!(err.to_string().contains("chmod 700"), "{err}");
    // A missing directory is created private.
    let fresh = dir.path().join("new");
    phiseal_embedded::open(&fresh, &EmbeddedOptions::default()).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn data_dir_owned_by_another_user_is_refused() {
    assert_eq!(
        rustix::process::getuid().as_raw(),
        0,
        "this test gives a directory to uid 65534 (nobody), which needs root: run the tests \
         as root (as CI does)"
    );
    let dir = private_tempdir();
    // nobody (65534): a private directory that another user owns.
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let err = phiseal_embedded::open(dir.path(), &EmbeddedOptions::default()).unwrap_err();
    assert!(err.to_string().contains("is owned by uid 65534"), "{err}");
    assert!(!dir.path().join("root.key").exists());
}

#[tokio::test]
async fn a_missing_root_key_is_not_replaced_while_tenants_exist() {
    let dir = private_tempdir();
    let paths = EmbeddedPaths::new(dir.path());
    // A key store without tenants: a missing root key is simply created (first start).
    drop(open(dir.path()));
    std::fs::remove_file(&paths.root_key).unwrap();
    let k = open(dir.path());
    k.create_tenant(&caller(), &tenant("t")).await.unwrap();
    drop(k);
    // Now it holds a tenant: a lost or unmounted root key stops the start, and none is made.
    std::fs::remove_file(&paths.root_key).unwrap();
    let err = phiseal_embedded::open(dir.path(), &EmbeddedOptions::default()).unwrap_err();
    assert!(
        matches!(err, phiseal_embedded::EmbeddedError::RootKeyMissing { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("restore root.key"), "{err}");
    assert!(!paths.root_key.exists(), "a new root key was created");
}

#[tokio::test]
async fn decrypt_never_panics_on_mutated_or_random_input() {
    // A smoke fuzz: every single-byte mutation, every truncation and random garbage must
    // give an error, never a panic and never a plaintext.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let k = keyring_on(&p, CacheSettings::default());
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", Some("r"));
    for alg_keyring in [
        k.clone(),
        Keyring::builder()
            .profile(Profile::Development)
            .kms(p.kms.clone())
            .key_store(p.store.clone())
            .danger_disable_audit()
            .algorithm(Algorithm::XChaCha20Poly1305)
            .build()
            .unwrap(),
    ] {
        let ct = alg_keyring
            .encrypt(&c, &cx, b"0123456789abcdef")
            .await
            .unwrap();
        for i in 0..ct.len() {
            for bit in [0x01u8, 0x80] {
                let mut m = ct.clone();
                m[i] ^= bit;
                assert!(
                    k.decrypt(&c, &cx, &m).await.is_err(),
                    "byte {i} bit {bit:#x}"
                );
            }
        }
        for len in 0..ct.len() {
            assert!(
                k.decrypt(&c, &cx, &ct[..len]).await.is_err(),
                "truncated to {len}"
            );
        }
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..300 {
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut framed = garbage.clone();
        if framed.len() > 6 {
            framed[0] = 1; // a valid version and algorithm, random rest
            framed[1] = 1 + (len % 2) as u8;
        }
        assert!(k.decrypt(&c, &cx, &garbage).await.is_err());
        assert!(k.decrypt(&c, &cx, &framed).await.is_err());
        // The text form: random characters after the prefix, and random base64url (which
        // usually decodes): never a panic, and whatever decodes does not decrypt.
        const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b64: String = garbage
            .iter()
            .map(|b| char::from(B64URL[usize::from(*b) % 64]))
            .collect();
        for text in [
            format!("phs1:{}", String::from_utf8_lossy(&garbage)),
            format!("phs1:{b64}"),
        ] {
            if let Ok(bytes) = phiseal::format::from_text(&text) {
                assert!(k.decrypt(&c, &cx, &bytes).await.is_err(), "{text}");
            }
        }
    }
}

/// Fault injection for the KMS-outage rules (the real cloud backends are tested against their
/// emulators elsewhere): the local KMS, whose unwrap can be switched to fail as `Unavailable`
/// (an outage) or `Denied` (a refusal, e.g. a disabled root key).
#[derive(Debug)]
struct SwitchableKms {
    inner: Arc<dyn Kms>,
    /// None: working; Some(kind): every unwrap fails with that kind.
    failure: std::sync::Mutex<Option<BackendErrorKind>>,
    /// This tenant's unwraps are refused without calling the service (a damaged record the
    /// backend cannot send); the others fail as `failure` says.
    refused_locally: std::sync::Mutex<Option<String>>,
    unwraps: AtomicUsize,
    /// While set, an unwrap waits for a permit of `gate` (a KMS call in flight).
    hold: std::sync::atomic::AtomicBool,
    gate: tokio::sync::Semaphore,
}

impl SwitchableKms {
    /// `p`'s local KMS, working until [`SwitchableKms::fail_with`] says otherwise.
    fn over(p: &Parts) -> Arc<Self> {
        Self::over_kms(p.kms.inner.clone())
    }

    /// `inner`, working until [`SwitchableKms::fail_with`] says otherwise.
    fn over_kms(inner: Arc<dyn Kms>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            failure: std::sync::Mutex::new(None),
            refused_locally: std::sync::Mutex::new(None),
            unwraps: AtomicUsize::new(0),
            hold: std::sync::atomic::AtomicBool::new(false),
            gate: tokio::sync::Semaphore::new(0),
        })
    }

    fn fail_with(&self, kind: Option<BackendErrorKind>) {
        *self.failure.lock().unwrap() = kind;
    }
}

/// A keyring on `kms` and `p`'s key store with `cache`, audited to `audit` (or with audit off).
fn switchable_keyring(
    kms: &Arc<SwitchableKms>,
    p: &Parts,
    cache: CacheSettings,
    audit: Option<&Arc<MemoryAudit>>,
) -> Keyring {
    let builder = Keyring::builder()
        .profile(Profile::Development)
        .kms(kms.clone())
        .key_store(p.store.clone())
        .cache(cache);
    match audit {
        Some(audit) => builder.audit(audit.clone()),
        None => builder.danger_disable_audit(),
    }
    .build()
    .unwrap()
}

#[async_trait]
impl Kms for SwitchableKms {
    fn name(&self) -> &str {
        "switchable"
    }
    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        self.inner.current_root_key_ref().await
    }
    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        self.inner.can_unwrap(root_key_ref)
    }
    async fn wrap(&self, key: &TenantKey, b: &KeyBinding) -> Result<WrappedKey, BackendError> {
        self.inner.wrap(key, b).await
    }
    async fn unwrap(&self, w: &WrappedKey, b: &KeyBinding) -> Result<TenantKey, BackendError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        if self.hold.load(Ordering::SeqCst) {
            self.gate.acquire().await.unwrap().forget();
        }
        if self.refused_locally.lock().unwrap().as_deref() == Some(b.tenant.as_str()) {
            return Err(
                BackendError::new(BackendErrorKind::InvalidData, "injected local refusal")
                    .refused_before_calling(),
            );
        }
        let failure = *self.failure.lock().unwrap();
        match failure {
            Some(kind) => Err(BackendError::new(kind, "injected failure")),
            None => self.inner.unwrap(w, b).await,
        }
    }
}

/// Keeps every appended event in memory. A test double by choice, not for lack of the real
/// part: the tests using it inspect the events as values (actions, outcomes, versions,
/// order); the real file log's records are checked by the tests that use
/// `phiseal_audit_file` (here and in `phiseal-audit-file`).
#[derive(Debug, Default)]
struct MemoryAudit {
    events: std::sync::Mutex<Vec<AuditEvent>>,
    /// While set, every append fails (a full disk) and keeps nothing.
    failing: AtomicBool,
}

impl MemoryAudit {
    /// `(action, outcome, key source)` of every event so far, then forgets them.
    fn take(&self) -> Vec<(String, String, Option<String>)> {
        self.take_with(|e| e.key_source.map(|s| s.as_str().to_owned()))
    }

    /// `(action, outcome, root key)` of every event so far, then forgets them.
    fn take_root_keys(&self) -> Vec<(String, String, Option<String>)> {
        self.take_with(|e| e.root_key.as_deref().map(str::to_owned))
    }

    /// `(action, outcome, third(event))` of every event so far, then forgets them.
    fn take_with(
        &self,
        third: impl Fn(&AuditEvent) -> Option<String>,
    ) -> Vec<(String, String, Option<String>)> {
        std::mem::take(&mut *self.events.lock().unwrap())
            .iter()
            .map(|e| {
                (
                    e.action.as_str().to_owned(),
                    e.outcome.as_str().to_owned(),
                    third(e),
                )
            })
            .collect()
    }
}

#[async_trait]
impl AuditSink for MemoryAudit {
    fn name(&self) -> &str {
        "memory"
    }
    async fn append(&self, events: &[AuditEvent]) -> Result<(), BackendError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                "injected: disk full",
            ));
        }
        self.events.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// An audit sink that holds every append containing a `serve_stale_key` decision until a
/// permit is added (to stop an operation inside its stale-key decision), and notes that one
/// is waiting.
#[derive(Debug)]
struct StaleDecisionGate {
    gate: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl AuditSink for StaleDecisionGate {
    fn name(&self) -> &str {
        "stale-decision-gate"
    }
    async fn append(&self, events: &[AuditEvent]) -> Result<(), BackendError> {
        if events
            .iter()
            .any(|e| e.action.as_str() == "serve_stale_key")
        {
            self.waiting.store(true, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_stream_starting_on_a_stale_key_while_a_shred_commits_is_refused() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let kms = SwitchableKms::over(&p);
    let audit = Arc::new(StaleDecisionGate {
        gate: tokio::sync::Semaphore::new(0),
        waiting: std::sync::atomic::AtomicBool::new(false),
    });
    let cache = CacheSettings {
        key_ttl: Duration::from_millis(300),
        metadata_ttl: Duration::from_millis(300),
        max_stale: Duration::from_secs(30),
        ..CacheSettings::default()
    };
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(kms.clone())
        .key_store(p.store.clone())
        .audit(audit.clone())
        .cache(cache)
        .build()
        .unwrap();
    let c = caller();
    let t = tenant("t");
    let cx = ctx("t", "referral", None);
    k.create_tenant(&c, &t).await.unwrap();
    k.encrypt(&c, &cx, b"warm").await.unwrap();
    // A KMS outage past the key's TTL: the next use decides (and audits) to serve it stale…
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (k2, c2, cx2) = (k.clone(), c.clone(), cx.clone());
    let start = tokio::spawn(async move {
        k2.start_encrypt_stream(&c2, &cx2, StreamOptions::default())
            .await
            .map(drop)
    });
    while !audit.waiting.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // …while the tenant is shredded, and the shred returns…
    k.shred(&c, &t).await.unwrap();
    // …then the decision is recorded: the stream must not start under the destroyed key.
    audit.gate.add_permits(1);
    let started = start.await.unwrap();
    assert!(
        matches!(started, Err(Error::KeyDestroyed { .. })),
        "{started:?}"
    );
}

fn event(action: &str, outcome: &str, source: Option<&str>) -> (String, String, Option<String>) {
    (
        action.to_owned(),
        outcome.to_owned(),
        source.map(str::to_owned),
    )
}

#[tokio::test]
async fn kms_outage_serves_cached_keys_until_max_stale_then_fails_closed() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let kms = SwitchableKms::over(&p);
    let audit = Arc::new(MemoryAudit::default());
    let cache = CacheSettings {
        key_ttl: Duration::from_millis(800),
        metadata_ttl: Duration::from_millis(800),
        max_stale: Duration::from_millis(1500),
        ..CacheSettings::default()
    };
    let k = switchable_keyring(&kms, &p, cache, Some(&audit));
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    k.create_tenant(&c, &tenant("cold")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = k.encrypt(&c, &cx, b"v").await.unwrap();
    let cold_ct = k.encrypt(&c, &ctx("cold", "f", None), b"w").await.unwrap();
    audit.take();

    // Outage. Within the TTL nothing changes.
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    k.decrypt(&c, &cx, &ct).await.unwrap();
    assert_eq!(audit.take(), [event("decrypt", "ok", Some("cache"))]);

    // Past the TTL: one KMS attempt, the decision to serve stale is audited, the operation
    // records the stale source; the next operations use the stale key without calling the KMS.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let before = kms.unwraps.load(Ordering::SeqCst);
    assert_eq!(&k.decrypt(&c, &cx, &ct).await.unwrap()[..], b"v");
    k.encrypt(&c, &cx, b"x").await.unwrap();
    assert_eq!(kms.unwraps.load(Ordering::SeqCst) - before, 1);
    assert_eq!(
        audit.take(),
        [
            event("unwrap_key", "kms", Some("kms")),
            event("serve_stale_key", "ok", Some("stale")),
            event("decrypt", "ok", Some("stale")),
            event("encrypt", "ok", Some("stale")),
        ]
    );

    // A key that is not cached (a second process, empty cache): the KMS is tried, fails, and
    // the error names the backend and the cause; the next request does not call the KMS again
    // until the retry is due, and fails at once, naming the backend but not repeating the
    // cause (it may name another tenant).
    let cold = switchable_keyring(&kms, &p, cache, Some(&audit));
    let before = kms.unwraps.load(Ordering::SeqCst);
    for attempt in 0..3 {
        let err = cold
            .decrypt(&c, &ctx("cold", "f", None), &cold_ct)
            .await
            .unwrap_err();
        assert!(err.is_kms_unavailable(), "{err}");
        let shown = err.to_string();
        assert!(shown.contains("switchable"), "{shown}");
        assert_eq!(shown.contains("injected failure"), attempt == 0, "{shown}");
        assert_eq!(shown.contains("not called"), attempt > 0, "{shown}");
    }
    assert_eq!(kms.unwraps.load(Ordering::SeqCst) - before, 1);
    let cold_events: Vec<_> = (0..3)
        .flat_map(|_| {
            [
                event("unwrap_key", "kms", Some("kms")),
                event("decrypt", "kms", None),
            ]
        })
        .collect();
    assert_eq!(audit.take(), cold_events);

    // Past key_ttl + max_stale: fail closed. The refusal is audited once, as the key leaves
    // the cache; the KMS is not called before its retry is due.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let before = kms.unwraps.load(Ordering::SeqCst);
    let err = k.decrypt(&c, &cx, &ct).await.unwrap_err();
    assert!(err.is_kms_unavailable(), "{err}");
    assert!(k.decrypt(&c, &cx, &ct).await.is_err());
    assert_eq!(kms.unwraps.load(Ordering::SeqCst), before);
    assert_eq!(
        audit.take(),
        [
            event("serve_stale_key", "kms", None),
            event("unwrap_key", "kms", Some("kms")),
            event("decrypt", "kms", None),
            event("unwrap_key", "kms", Some("kms")),
            event("decrypt", "kms", None),
        ]
    );

    // The KMS is back: the first request after the retry interval gets a fresh key.
    kms.fail_with(None);
    tokio::time::sleep(phiseal::STALE_RETRY_INTERVAL + Duration::from_millis(500)).await;
    assert_eq!(&k.decrypt(&c, &cx, &ct).await.unwrap()[..], b"v");
    assert_eq!(
        audit.take(),
        [
            event("unwrap_key", "ok", Some("kms")),
            event("decrypt", "ok", Some("kms")),
        ]
    );
}

/// Keys (and metadata) past their TTL after 200 ms, then served stale for up to a minute
/// during a KMS outage.
fn stale_after_200_ms() -> CacheSettings {
    CacheSettings {
        key_ttl: Duration::from_millis(200),
        metadata_ttl: Duration::from_millis(200),
        max_stale: Duration::from_secs(60),
        ..CacheSettings::default()
    }
}

#[tokio::test]
async fn kms_refusal_is_never_served_from_a_stale_key() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let kms = SwitchableKms::over(&p);
    let k = switchable_keyring(&kms, &p, stale_after_200_ms(), None);
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = k.encrypt(&c, &cx, b"v").await.unwrap();
    // A disabled or revoked root key is a refusal, not an outage: no stale service.
    kms.fail_with(Some(BackendErrorKind::Denied));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = k.decrypt(&c, &cx, &ct).await.unwrap_err();
    assert!(!err.is_kms_unavailable(), "{err}");
    assert!(matches!(err, Error::Kms { .. }), "{err}");
    assert!(k.encrypt(&c, &cx, b"x").await.is_err());

    // A refusal after stale service began: the stale key is dropped at the next KMS attempt.
    kms.fail_with(None);
    k.decrypt(&c, &cx, &ct).await.unwrap();
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    tokio::time::sleep(Duration::from_millis(300)).await;
    k.decrypt(&c, &cx, &ct).await.unwrap(); // served stale
    kms.fail_with(Some(BackendErrorKind::Denied));
    tokio::time::sleep(phiseal::STALE_RETRY_INTERVAL + Duration::from_millis(500)).await;
    let err = k.decrypt(&c, &cx, &ct).await.unwrap_err();
    assert!(!err.is_kms_unavailable(), "{err}");
    // The stale key is gone: when the KMS is then merely unavailable (an outage, in which a
    // cached stale key would serve), there is nothing to serve.
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    let err = k.decrypt(&c, &cx, &ct).await.unwrap_err();
    assert!(
        err.is_kms_unavailable(),
        "the stale key was served again: {err}"
    );
}

#[tokio::test]
async fn expired_keys_leave_the_cache_without_a_next_use() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let cache = CacheSettings {
        key_ttl: Duration::from_millis(300),
        metadata_ttl: Duration::from_millis(300),
        ..CacheSettings::default()
    };
    let k = keyring_on(&p, cache);
    let c = caller();
    for t in ["a", "b"] {
        k.create_tenant(&c, &tenant(t)).await.unwrap();
        k.encrypt(&c, &ctx(t, "f", None), b"v").await.unwrap();
    }
    // Within the TTL nothing leaves.
    assert_eq!(k.evict_expired(), 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past it, both tenants' keys leave although neither was used again.
    assert_eq!(k.evict_expired(), 2);
    assert_eq!(k.evict_expired(), 0);
    // A later use unwraps again and works.
    let ct = k.encrypt(&c, &ctx("a", "f", None), b"w").await.unwrap();
    assert_eq!(
        &k.decrypt(&c, &ctx("a", "f", None), &ct).await.unwrap()[..],
        b"w"
    );
}

/// What kind of encryption the rotation overtakes.
#[derive(Clone, Copy, Debug)]
enum Sealing {
    Field,
    Deterministic,
    Stream,
}

impl Sealing {
    /// Encrypts under `k` and returns the key version the output names.
    async fn version(self, k: &Keyring, c: &Caller) -> u32 {
        let cx = ctx("t", "f", None);
        match self {
            Sealing::Field => {
                let ct = k.encrypt(c, &cx, b"v").await.unwrap();
                assert_eq!(&k.decrypt(c, &cx, &ct).await.unwrap()[..], b"v");
                phiseal::format::parse(&ct).unwrap().key_version
            }
            Sealing::Deterministic => {
                let ct = k.encrypt_deterministic(c, &cx, b"v").await.unwrap();
                phiseal::format::parse(&ct).unwrap().key_version
            }
            Sealing::Stream => {
                let mut out = Vec::new();
                let summary = k.encrypt_stream(c, &cx, &b"v"[..], &mut out).await.unwrap();
                assert_eq!(
                    phiseal::stream::StreamHeader::parse(&out)
                        .unwrap()
                        .key_version(),
                    summary.key_version
                );
                summary.key_version
            }
        }
    }
}

#[tokio::test]
async fn an_encryption_overtaken_by_a_rotation_uses_the_new_primary() {
    for sealing in [Sealing::Field, Sealing::Deterministic, Sealing::Stream] {
        let dir = private_tempdir();
        let p = parts(dir.path());
        let kms = SwitchableKms::over(&p);
        let setup = switchable_keyring(&kms, &p, CacheSettings::default(), None);
        let c = caller();
        setup.create_tenant(&c, &tenant("t")).await.unwrap();
        // A keyring with cold caches: its encryption reads the metadata (primary v1), then
        // waits in the KMS for v1's key …
        let k = switchable_keyring(&kms, &p, CacheSettings::default(), None);
        kms.hold.store(true, Ordering::SeqCst);
        let before = kms.unwraps.load(Ordering::SeqCst);
        let (k2, c2) = (k.clone(), c.clone());
        let encryption = tokio::spawn(async move { sealing.version(&k2, &c2).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kms.unwraps.load(Ordering::SeqCst) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "{sealing:?}: no unwrap"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // … while the same keyring rotates to v2 (its own KMS calls are not held).
        kms.hold.store(false, Ordering::SeqCst);
        assert_eq!(k.rotate(&c, &tenant("t")).await.unwrap(), 2);
        kms.gate.add_permits(1);
        // Nothing is encrypted under the old primary once `rotate` has returned.
        assert_eq!(encryption.await.unwrap(), 2, "{sealing:?}");
    }
}

#[tokio::test]
async fn once_the_kms_refuses_no_other_stale_key_serves() {
    no_stale_key_serves_after(BackendErrorKind::Denied).await;
}

/// A backend's "no such key" (a root key deleted meanwhile: AWS `NotFoundException`, Key
/// Vault 404, classified as misconfigured) is an answer from the KMS too.
#[tokio::test]
async fn once_the_kms_has_no_such_key_no_other_stale_key_serves() {
    no_stale_key_serves_after(BackendErrorKind::Misconfigured).await;
}

/// Tenants t and u, each with one ciphertext, in a KMS outage past the key TTL: both keys
/// serve stale.
struct Outage {
    _dir: tempfile::TempDir,
    kms: Arc<SwitchableKms>,
    k: Keyring,
    c: Caller,
    t: EncryptionContext,
    u: EncryptionContext,
    cts: Vec<Vec<u8>>,
}

async fn two_tenants_served_stale() -> Outage {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let kms = SwitchableKms::over(&p);
    let k = switchable_keyring(&kms, &p, stale_after_200_ms(), None);
    let c = caller();
    let (t, u) = (ctx("t", "f", None), ctx("u", "f", None));
    let mut cts = Vec::new();
    for cx in [&t, &u] {
        k.create_tenant(&c, cx.tenant()).await.unwrap();
        cts.push(k.encrypt(&c, cx, b"v").await.unwrap());
    }
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    tokio::time::sleep(Duration::from_millis(300)).await;
    k.decrypt(&c, &t, &cts[0]).await.unwrap();
    k.decrypt(&c, &u, &cts[1]).await.unwrap();
    Outage {
        _dir: dir,
        kms,
        k,
        c,
        t,
        u,
        cts,
    }
}

/// A refusal the backend decides without calling its service (a damaged record it cannot
/// send) says nothing about the outage: other stale keys keep serving.
#[tokio::test]
async fn a_refusal_made_before_calling_the_kms_does_not_end_the_outage() {
    let Outage {
        _dir,
        kms,
        k,
        c,
        t,
        u,
        cts,
    } = two_tenants_served_stale().await;
    // At the next retry, t's attempt is refused by the backend itself (t's record is
    // damaged)…
    tokio::time::sleep(phiseal::STALE_RETRY_INTERVAL + Duration::from_millis(300)).await;
    *kms.refused_locally.lock().unwrap() = Some("t".to_owned());
    let before = kms.unwraps.load(Ordering::SeqCst);
    assert!(k.decrypt(&c, &t, &cts[0]).await.is_err());
    assert_eq!(kms.unwraps.load(Ordering::SeqCst), before + 1);
    // … which says nothing about the KMS: the retry t's call had claimed is due again, so u's
    // next call probes the KMS (still down) — and the outage goes on: u's stale key serves.
    assert_eq!(&*k.decrypt(&c, &u, &cts[1]).await.unwrap(), b"v");
    assert_eq!(
        kms.unwraps.load(Ordering::SeqCst),
        before + 2,
        "the retry was used up by a call that never reached the KMS"
    );
}

async fn no_stale_key_serves_after(refusal: BackendErrorKind) {
    let Outage {
        _dir,
        kms,
        k,
        c,
        t,
        u,
        cts,
    } = two_tenants_served_stale().await;
    // At the next retry the KMS refuses (a disabled root key). While that call is in flight,
    // u's key is still served stale (the outage is presumed to last)…
    tokio::time::sleep(phiseal::STALE_RETRY_INTERVAL + Duration::from_millis(300)).await;
    kms.fail_with(Some(refusal));
    kms.hold.store(true, Ordering::SeqCst);
    let (k2, c2, t2, ct) = (k.clone(), c.clone(), t.clone(), cts[0].clone());
    let before = kms.unwraps.load(Ordering::SeqCst);
    let probe = tokio::spawn(async move { k2.decrypt(&c2, &t2, &ct).await.map(drop) });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kms.unwraps.load(Ordering::SeqCst) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the retry never reached the KMS"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    k.decrypt(&c, &u, &cts[1]).await.unwrap();
    // …then the refusal arrives: from now on no stale key serves, u's included.
    kms.hold.store(false, Ordering::SeqCst);
    kms.gate.add_permits(1);
    let refused = probe.await.unwrap().unwrap_err();
    assert!(!refused.is_kms_unavailable(), "{refused}");
    let err = k.decrypt(&c, &u, &cts[1]).await.unwrap_err();
    assert!(
        matches!(&err, Error::Kms { .. }) && !err.is_kms_unavailable(),
        "u's stale key served after the KMS refused: {err:?}"
    );
}

#[tokio::test]
async fn during_a_migration_one_backends_outage_does_not_hold_the_other_off() {
    use phiseal::kms::KmsChain;
    let dir = private_tempdir();
    let p = parts(dir.path());
    let old = SwitchableKms::over(&p);
    let new = SwitchableKms::over_kms(Arc::new(
        phiseal_kms_local::LocalKms::open(dir.path().join("new-root.key")).unwrap(),
    ));
    let c = caller();
    let (o, n) = (ctx("o", "f", None), ctx("n", "f", None));
    let before = switchable_keyring(&old, &p, CacheSettings::default(), None);
    before.create_tenant(&c, o.tenant()).await.unwrap();
    let under_old = before.encrypt(&c, &o, b"old").await.unwrap();
    let after = switchable_keyring(&new, &p, CacheSettings::default(), None);
    after.create_tenant(&c, n.tenant()).await.unwrap();
    let under_new = after.encrypt(&c, &n, b"new").await.unwrap();

    // A daemon mid-migration (new current, old previous), its caches cold; the old KMS down.
    let migrating = Keyring::builder()
        .profile(Profile::Development)
        .kms(Arc::new(KmsChain::new(
            new.clone() as Arc<dyn Kms>,
            vec![old.clone() as Arc<dyn Kms>],
        )))
        .key_store(p.store.clone())
        .danger_disable_audit()
        .build()
        .unwrap();
    old.fail_with(Some(BackendErrorKind::Unavailable));
    assert!(
        migrating
            .decrypt(&c, &o, &under_old)
            .await
            .unwrap_err()
            .is_kms_unavailable()
    );
    // The new KMS is still asked (it works) …
    let back = migrating.decrypt(&c, &n, &under_new).await.unwrap();
    assert_eq!(back.as_bytes(), b"new");
    // … and its answer does not end the old one's outage: not called again before its retry.
    let calls = old.unwraps.load(Ordering::SeqCst);
    let err = migrating.decrypt(&c, &o, &under_old).await.unwrap_err();
    assert!(err.is_kms_unavailable(), "{err}");
    assert!(err.to_string().contains("not called"), "{err}");
    assert_eq!(old.unwraps.load(Ordering::SeqCst), calls);
}

#[tokio::test]
async fn a_cached_key_whose_record_a_root_rotation_moved_follows_its_new_backends_outage() {
    use phiseal::kms::KmsChain;
    let dir = private_tempdir();
    let p = parts(dir.path());
    let old = SwitchableKms::over(&p);
    let new = SwitchableKms::over_kms(Arc::new(
        phiseal_kms_local::LocalKms::open(dir.path().join("new-root.key")).unwrap(),
    ));
    let c = caller();
    let cx = ctx("t", "f", None);
    let before = switchable_keyring(&old, &p, CacheSettings::default(), None);
    before.create_tenant(&c, cx.tenant()).await.unwrap();
    let ct = before.encrypt(&c, &cx, b"value").await.unwrap();

    // A daemon mid-migration caches the key, unwrapped by the old backend; then the record
    // is moved under the new root key (the key itself, and so the cached copy, unchanged).
    let audit = Arc::new(MemoryAudit::default());
    let migrating = Keyring::builder()
        .profile(Profile::Development)
        .kms(Arc::new(KmsChain::new(
            new.clone() as Arc<dyn Kms>,
            vec![old.clone() as Arc<dyn Kms>],
        )))
        .key_store(p.store.clone())
        .audit(audit.clone())
        .cache(CacheSettings {
            key_ttl: Duration::from_millis(300),
            metadata_ttl: Duration::from_millis(300),
            max_stale: Duration::from_secs(30),
            ..CacheSettings::default()
        })
        .build()
        .unwrap();
    migrating.decrypt(&c, &cx, &ct).await.unwrap();
    let report = migrating.rewrap_root_keys(&c, &mut |_| {}).await.unwrap();
    assert_eq!(report.rewrapped, 1, "{report:?}");

    // The new backend goes down past the key's TTL: the refresh asks it, finds it
    // unavailable, and serves the key stale — once decided, until the new backend's next
    // retry, without another attempt or decision per use.
    new.fail_with(Some(BackendErrorKind::Unavailable));
    tokio::time::sleep(Duration::from_millis(400)).await;
    audit.take();
    let (old_calls, new_calls) = (
        old.unwraps.load(Ordering::SeqCst),
        new.unwraps.load(Ordering::SeqCst),
    );
    for _ in 0..3 {
        assert_eq!(
            migrating.decrypt(&c, &cx, &ct).await.unwrap().as_bytes(),
            b"value"
        );
    }
    let stale_decisions = audit
        .take()
        .iter()
        .filter(|e| e.0 == "serve_stale_key")
        .count();
    assert_eq!(stale_decisions, 1);
    assert_eq!(
        old.unwraps.load(Ordering::SeqCst),
        old_calls,
        "the old one is not asked"
    );
    assert_eq!(new.unwraps.load(Ordering::SeqCst), new_calls + 1);
}

#[tokio::test]
async fn without_max_stale_an_outage_fails_closed_at_the_ttl() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let kms = SwitchableKms::over(&p);
    let audit = Arc::new(MemoryAudit::default());
    let cache = CacheSettings {
        key_ttl: Duration::from_millis(200),
        metadata_ttl: Duration::from_millis(200),
        ..CacheSettings::default()
    };
    let k = switchable_keyring(&kms, &p, cache, Some(&audit));
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let ct = k.encrypt(&c, &cx, b"v").await.unwrap();
    audit.take();
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        k.decrypt(&c, &cx, &ct)
            .await
            .unwrap_err()
            .is_kms_unavailable()
    );
    assert_eq!(
        audit.take(),
        [
            event("unwrap_key", "kms", Some("kms")),
            event("decrypt", "kms", None),
        ]
    );
}

#[tokio::test]
async fn root_key_migration_moves_every_version_and_is_idempotent() {
    use phiseal::RootRewrapEvent;
    use phiseal::kms::KmsChain;
    let dir = private_tempdir();
    let p = parts(dir.path());
    let old: Arc<dyn Kms> = p.kms.inner.clone();
    let new: Arc<dyn Kms> =
        Arc::new(phiseal_kms_local::LocalKms::open(dir.path().join("new-root.key")).unwrap());
    let old_ref = old.current_root_key_ref().await.unwrap();
    let new_ref = new.current_root_key_ref().await.unwrap();
    assert_ne!(old_ref, new_ref);
    let audit = Arc::new(MemoryAudit::default());
    let on = |kms: Arc<dyn Kms>| {
        Keyring::builder()
            .profile(Profile::Development)
            .kms(kms)
            .key_store(p.store.clone())
            .audit(audit.clone())
            .build()
            .unwrap()
    };
    let c = caller();
    let before = on(old.clone());
    let mut ciphertexts = Vec::new();
    for t in ["a", "b", "c"] {
        before.create_tenant(&c, &tenant(t)).await.unwrap();
        let ct = before
            .encrypt(&c, &ctx(t, "f", None), t.as_bytes())
            .await
            .unwrap();
        ciphertexts.push((t, ct));
    }
    before.rotate(&c, &tenant("b")).await.unwrap();
    let ct = before
        .encrypt(&c, &ctx("b", "f", None), b"b2")
        .await
        .unwrap();
    ciphertexts.push(("b", ct));
    before.create_tenant(&c, &tenant("gone")).await.unwrap();
    before.shred(&c, &tenant("gone")).await.unwrap();
    // (A creation that fails after its key was wrapped names none: no version exists.)
    assert!(matches!(
        before.create_tenant(&c, &tenant("a")).await,
        Err(Error::TenantExists { .. })
    ));
    // A created or rotated version's result record, and each unwrap, names the root key
    // that wraps the version; no other record names one.
    let records = audit.take_root_keys();
    let named: Vec<_> = records.iter().filter(|r| r.2.is_some()).collect();
    assert_eq!(named.len(), 5 + 4, "{records:?}");
    for (action, outcome, root_key) in &records {
        let creates = ["create_tenant", "rotate_key"].contains(&action.as_str());
        if (creates && outcome == "ok") || action == "unwrap_key" {
            assert_eq!(root_key.as_deref(), Some(old_ref.as_str()), "{action}");
        } else {
            assert_eq!(*root_key, None, "{action} {outcome}");
        }
    }

    // The new key alone cannot read the old wrapping.
    let only_new = on(new.clone());
    let err = only_new
        .decrypt(&c, &ctx("a", "f", None), &ciphertexts[0].1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Kms { .. }) && err.to_string().contains("not configured here"),
        "{err}"
    );
    // The refused unwrap names the root key the version is wrapped under.
    let records = audit.take_root_keys();
    let unwrap = records.iter().find(|r| r.0 == "unwrap_key").unwrap();
    assert_ne!(unwrap.1, "ok");
    assert_eq!(unwrap.2.as_deref(), Some(old_ref.as_str()));

    let migrating = on(Arc::new(KmsChain::new(new.clone(), vec![old.clone()])));
    let mut planned = None;
    let mut steps = 0;
    let report = migrating
        .rewrap_root_keys(&c, &mut |event| match event {
            RootRewrapEvent::Planned { to_rewrap } => planned = Some(to_rewrap),
            RootRewrapEvent::Rewrapped { .. } => steps += 1,
            other => panic!("{other:?}"),
        })
        .await
        .unwrap();
    assert_eq!(planned, Some(4));
    assert_eq!(steps, 4);
    assert_eq!(report.target, new_ref);
    assert_eq!(
        (report.rewrapped, report.already_current, report.destroyed),
        (4, 0, 1)
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(
        report.still_referenced.is_empty(),
        "{:?}",
        report.still_referenced
    );
    let records = audit.take_root_keys();
    // Each step is audited before (attempt, naming the source root key) and after (ok,
    // naming the target).
    let expected: Vec<_> = (0..4)
        .flat_map(|_| {
            [
                event("rewrap_root_key", "attempt", Some(&old_ref)),
                event("rewrap_root_key", "ok", Some(&new_ref)),
            ]
        })
        .collect();
    assert_eq!(records, expected);

    // Every ciphertext decrypts with the new root key alone; nothing was re-encrypted.
    let only_new = on(new.clone());
    for (t, ct) in &ciphertexts {
        only_new.decrypt(&c, &ctx(t, "f", None), ct).await.unwrap();
    }
    // Its unwraps (one per version) name the new root key.
    let unwraps: Vec<_> = audit
        .take_root_keys()
        .into_iter()
        .filter(|r| r.0 == "unwrap_key")
        .collect();
    assert_eq!(
        unwraps,
        vec![event("unwrap_key", "ok", Some(&new_ref)); 4],
        "{unwraps:?}"
    );
    // Running again changes nothing.
    let again = migrating.rewrap_root_keys(&c, &mut |_| {}).await.unwrap();
    assert_eq!(
        (again.rewrapped, again.already_current, again.failed.len()),
        (0, 4, 0)
    );
}

#[tokio::test]
async fn root_key_rotation_reports_versions_no_backend_can_unwrap() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let old: Arc<dyn Kms> = p.kms.inner.clone();
    let new: Arc<dyn Kms> =
        Arc::new(phiseal_kms_local::LocalKms::open(dir.path().join("new-root.key")).unwrap());
    let c = caller();
    let old_ref = old.current_root_key_ref().await.unwrap();
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(old)
        .key_store(p.store.clone())
        .danger_disable_audit()
        .build()
        .unwrap();
    k.create_tenant(&c, &tenant("a")).await.unwrap();
    // The old root key is not configured: the version is reported and keeps its wrapping.
    let audit = Arc::new(MemoryAudit::default());
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(new)
        .key_store(p.store.clone())
        .audit(audit.clone())
        .build()
        .unwrap();
    let report = k.rewrap_root_keys(&c, &mut |_| {}).await.unwrap();
    assert_eq!(report.rewrapped, 0);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].tenant, tenant("a"));
    assert_eq!(report.still_referenced.values().sum::<u64>(), 1);
    // Both records name the source root key: the version is still wrapped under it.
    let records = audit.take_root_keys();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[0],
        event("rewrap_root_key", "attempt", Some(&old_ref))
    );
    assert_eq!(records[1].0, "rewrap_root_key");
    assert_ne!(records[1].1, "ok");
    assert_eq!(records[1].2.as_deref(), Some(old_ref.as_str()));
}

/// Fault injection: a KMS whose unwrap returns another key than it wrapped.
#[derive(Debug)]
struct LyingKms(Arc<dyn Kms>);

#[async_trait]
impl Kms for LyingKms {
    fn name(&self) -> &str {
        "lying"
    }
    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        self.0.current_root_key_ref().await
    }
    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        self.0.can_unwrap(root_key_ref)
    }
    async fn wrap(&self, key: &TenantKey, b: &KeyBinding) -> Result<WrappedKey, BackendError> {
        self.0.wrap(key, b).await
    }
    async fn unwrap(&self, _: &WrappedKey, _: &KeyBinding) -> Result<TenantKey, BackendError> {
        Ok(TenantKey::from_bytes([0x42; 32]))
    }
}

#[tokio::test]
async fn a_new_key_whose_wrapping_does_not_unwrap_is_never_stored() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(Arc::new(LyingKms(p.kms.inner.clone())))
        .key_store(p.store.clone())
        .danger_disable_audit()
        .build()
        .unwrap();
    let c = caller();
    let err = k.create_tenant(&c, &tenant("t")).await.unwrap_err();
    assert!(
        matches!(err, Error::Kms { .. }) && err.to_string().contains("nothing was stored"),
        "{err}"
    );
    assert!(p.store.load_tenant(&tenant("t")).await.unwrap().is_none());
}

#[tokio::test]
async fn an_operation_waiting_on_the_kms_when_a_shred_commits_is_refused() {
    let dir = private_tempdir();
    let paths = EmbeddedPaths::new(dir.path());
    let kms = Arc::new(CountingKms::new(
        Arc::new(phiseal_kms_local::LocalKms::open(&paths.root_key).unwrap()),
        Some(tokio::sync::Semaphore::new(0)),
    ));
    let gate = kms.gate.as_ref().unwrap();
    let store: Arc<dyn KeyStore> =
        Arc::new(phiseal_store_sqlite::SqliteKeyStore::open(&paths.key_store).unwrap());
    let k = Keyring::builder()
        .profile(Profile::Development)
        .kms(kms.clone())
        .key_store(store)
        .danger_disable_audit()
        .build()
        .unwrap();
    let c = caller();
    // Field encryption and decryption, and the start of a stream either way (whose key
    // derivation must be guarded like a field operation's).
    for (i, name) in ["encrypt", "decrypt", "encrypt_stream", "decrypt_stream"]
        .into_iter()
        .enumerate()
    {
        let t = tenant(&format!("t{i}"));
        let cx = ctx(&format!("t{i}"), "ssn", None);
        // create_tenant proves its wrapping with one unwrap; the encrypt unwraps once more.
        gate.add_permits(2);
        k.create_tenant(&c, &t).await.unwrap();
        let ct = k.encrypt(&c, &cx, b"078-05-1120").await.unwrap();
        let mut stream = Vec::new();
        let mut sealing = k
            .start_encrypt_stream(&c, &cx, StreamOptions::default())
            .await
            .unwrap();
        sealing.push(b"a scanned referral", &mut stream).unwrap();
        sealing.finish(&mut stream).await.unwrap();
        k.invalidate_tenant(&t);
        // An operation misses the cache and waits inside the KMS unwrap…
        let before = kms.unwraps.load(Ordering::SeqCst);
        let (k2, c2, cx2) = (k.clone(), c.clone(), cx.clone());
        let op = tokio::spawn(async move {
            match name {
                "encrypt" => k2.encrypt(&c2, &cx2, b"078-05-1120").await.map(drop),
                "decrypt" => k2.decrypt(&c2, &cx2, &ct).await.map(drop),
                "encrypt_stream" => k2
                    .start_encrypt_stream(&c2, &cx2, StreamOptions::default())
                    .await
                    .map(drop),
                _ => {
                    let mut opening = k2.start_decrypt_stream(&c2, &cx2);
                    opening.push(&stream, &mut Vec::new()).await
                }
            }
        });
        while kms.unwraps.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // …while the tenant is shredded, and the shred returns…
        k.shred(&c, &t).await.unwrap();
        // …then the unwrap completes: the operation must not use the destroyed key.
        gate.add_permits(1);
        let result = op.await.unwrap();
        assert!(
            matches!(result, Err(Error::KeyDestroyed { .. })),
            "{name}: {result:?}"
        );
    }
}

#[tokio::test]
async fn invalidating_one_tenant_leaves_the_others_cached() {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let c = caller();
    let (k, store) = keyring_on_counting_store(&p);
    let names: Vec<String> = (0..8).map(|i| format!("other-{i}")).collect();
    for name in names.iter().map(String::as_str).chain(["changed"]) {
        k.create_tenant(&c, &tenant(name)).await.unwrap();
        k.encrypt(&c, &ctx(name, "f", None), b"x").await.unwrap();
    }
    let before = store.loads.load(Ordering::SeqCst);
    for name in &names {
        k.encrypt(&c, &ctx(name, "f", None), b"x").await.unwrap();
    }
    assert_eq!(store.loads.load(Ordering::SeqCst), before, "all cached");
    // One tenant changed elsewhere (a notification from a shared store, an admin call).
    k.invalidate_tenant(&tenant("changed"));
    k.encrypt(&c, &ctx("changed", "f", None), b"x")
        .await
        .unwrap();
    let after_changed = store.loads.load(Ordering::SeqCst);
    assert_eq!(
        after_changed,
        before + 1,
        "the changed tenant is read again"
    );
    for name in &names {
        k.encrypt(&c, &ctx(name, "f", None), b"x").await.unwrap();
    }
    // Only tenants that share its invalidation shard (1 in 64) are read again; before
    // shards, all eight were.
    let rereads = store.loads.load(Ordering::SeqCst) - after_changed;
    assert!(rereads <= 1, "{rereads} of 8 other tenants read again");
    // invalidate_all still reaches every tenant.
    k.invalidate_all();
    let before_all = store.loads.load(Ordering::SeqCst);
    for name in &names {
        k.encrypt(&c, &ctx(name, "f", None), b"x").await.unwrap();
    }
    assert_eq!(store.loads.load(Ordering::SeqCst), before_all + 8);
}

/// Holds an AES-GCM seal of a plaintext that starts with [`HOLD`] until released: an
/// operation that is using a cached key, stopped mid-use. Delegates to aws-lc otherwise.
struct HeldSeal {
    entered: std::sync::Mutex<bool>,
    released: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
}

const HOLD: &[u8] = b"HOLD";

impl HeldSeal {
    fn wait_until(&self, flag: &std::sync::Mutex<bool>) {
        let mut set = flag.lock().unwrap();
        while !*set {
            set = self.changed.wait(set).unwrap();
        }
    }
    fn set(&self, flag: &std::sync::Mutex<bool>) {
        *flag.lock().unwrap() = true;
        self.changed.notify_all();
    }
}

struct HeldAes(&'static HeldSeal);
struct HeldAesKey(Box<dyn phiseal::crypto::AeadKey>, &'static HeldSeal);

impl phiseal::crypto::AeadAlgorithm for HeldAes {
    fn nonce_len(&self) -> usize {
        phiseal::crypto::aws_lc::PROVIDER.aes_256_gcm.nonce_len()
    }
    fn key(
        &self,
        key: &[u8; 32],
    ) -> Result<Box<dyn phiseal::crypto::AeadKey>, phiseal::crypto::CryptoFailure> {
        let inner = phiseal::crypto::aws_lc::PROVIDER.aes_256_gcm.key(key)?;
        Ok(Box::new(HeldAesKey(inner, self.0)))
    }
}

impl phiseal::crypto::AeadKey for HeldAesKey {
    fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; phiseal::crypto::TAG_LEN], phiseal::crypto::CryptoFailure> {
        if in_out.starts_with(HOLD) {
            self.1.set(&self.1.entered);
            self.1.wait_until(&self.1.released);
        }
        self.0.seal(nonce, aad, in_out)
    }
    fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), phiseal::crypto::CryptoFailure> {
        self.0.open(nonce, aad, ciphertext, tag, out)
    }
}

/// The admin operation [`admin_waits_for_key_uses`] runs, and how to see it committed.
type AdminOp = fn(Keyring, Caller, TenantId) -> tokio::task::JoinHandle<Result<(), Error>>;

/// Stops an encryption with tenant t's cached primary key in the middle of its seal, runs
/// `admin` meanwhile, and checks that `admin` commits (`committed` says so of the stored
/// record) but does not return while the key is in use. Returns the keyring, and the held
/// encryption's ciphertext.
async fn admin_waits_for_key_uses(
    admin: AdminOp,
    committed: fn(&phiseal::store::TenantRecord) -> bool,
) -> (tempfile::TempDir, Keyring, Vec<u8>) {
    let held: &'static HeldSeal = Box::leak(Box::new(HeldSeal {
        entered: std::sync::Mutex::new(false),
        released: std::sync::Mutex::new(false),
        changed: std::sync::Condvar::new(),
    }));
    let aws_lc = &phiseal::crypto::aws_lc::PROVIDER;
    let provider: &'static phiseal::crypto::CryptoProvider =
        Box::leak(Box::new(phiseal::crypto::CryptoProvider {
            name: "aws-lc-rs, seals held on request",
            aes_256_gcm: Box::leak(Box::new(HeldAes(held))),
            ..*aws_lc
        }));
    let dir = private_tempdir();
    let k = phiseal_embedded::builder(dir.path(), &EmbeddedOptions::default())
        .unwrap()
        .crypto_provider(provider)
        .danger_disable_audit()
        .build()
        .unwrap();
    let c = caller();
    let t = tenant("t");
    let cx = ctx("t", "ssn", None);
    k.create_tenant(&c, &t).await.unwrap();
    k.encrypt(&c, &cx, b"warm the cache").await.unwrap();

    // An encryption with the cached key is stopped in the middle of its seal…
    let (k2, c2, cx2) = (k.clone(), c.clone(), cx.clone());
    let runtime = tokio::runtime::Handle::current();
    let in_use = tokio::task::spawn_blocking(move || {
        runtime.block_on(async move { k2.encrypt(&c2, &cx2, b"HOLD 078-05-1120").await })
    });
    tokio::task::spawn_blocking(|| held.wait_until(&held.entered))
        .await
        .unwrap();
    // …while the admin operation runs: it commits, but does not return while the key is in
    // use.
    let running = admin(k.clone(), c.clone(), t.clone());
    // Once it is committed (seen through a second handle on the store) it has only the cache
    // invalidation left before it waits; give it ample time to return if it would.
    let store =
        phiseal_store_sqlite::SqliteKeyStore::open(&EmbeddedPaths::new(dir.path()).key_store)
            .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let was_committed = loop {
        let record = store.load_tenant(&t).await;
        if record.is_ok_and(|r| r.is_some_and(|r| committed(&r))) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    if was_committed {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let waited = !running.is_finished();
    // (Released before asserting: a failed test must not leave the held seal blocked.)
    held.set(&held.released);
    assert!(was_committed, "the admin operation never committed");
    assert!(
        waited,
        "the admin operation returned while an operation was still using the tenant's key"
    );
    running.await.unwrap().unwrap();
    // The operation that began before it completes.
    let sealed = in_use.await.unwrap().unwrap();
    (dir, k, sealed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_returns_only_after_operations_using_the_key_have_finished() {
    let (_dir, k, _) = admin_waits_for_key_uses(
        |k, c, t| tokio::spawn(async move { k.shred(&c, &t).await }),
        |record| record.shredded_at.is_some(),
    )
    .await;
    // Nothing after it gets the key.
    assert!(matches!(
        k.encrypt(&caller(), &ctx("t", "ssn", None), b"after").await,
        Err(Error::KeyDestroyed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_returns_only_after_encryptions_under_the_old_primary_have_finished() {
    let (_dir, k, sealed) = admin_waits_for_key_uses(
        |k, c, t| tokio::spawn(async move { k.rotate(&c, &t).await.map(drop) }),
        |record| record.primary().is_some_and(|p| p.version == 2),
    )
    .await;
    // The encryption under way was under the old primary; every one after is under the new.
    assert_eq!(version_of(&sealed), 1);
    let after = k
        .encrypt(&caller(), &ctx("t", "ssn", None), b"after")
        .await
        .unwrap();
    assert_eq!(version_of(&after), 2);
}

/// Embedded parts in a fresh directory, a keyring on them (audit off), tenant "t" created,
/// and the keyring's handle for it.
struct OnTenant {
    _dir: tempfile::TempDir,
    p: Parts,
    k: Keyring,
    t: TenantId,
    handle: phiseal::TenantKeyring,
}

async fn tenant_keyring_on(cache: CacheSettings) -> OnTenant {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let k = keyring_on(&p, cache);
    let t = tenant("t");
    k.create_tenant(&caller(), &t).await.unwrap();
    let handle = k.tenant(&t);
    OnTenant {
        _dir: dir,
        p,
        k,
        t,
        handle,
    }
}

/// The key version a ciphertext names in its header.
fn version_of(ct: &[u8]) -> u32 {
    phiseal::format::parse(ct).unwrap().key_version
}

#[tokio::test]
async fn a_tenant_keyring_serves_and_refuses_exactly_as_the_keyring() {
    let OnTenant {
        _dir, k, t, handle, ..
    } = tenant_keyring_on(CacheSettings::default()).await;
    let c = caller();
    k.create_tenant(&c, &tenant("u")).await.unwrap();
    assert_eq!(handle.tenant_id(), &t);
    let cx = ctx("t", "ssn", Some("r1"));
    // Interchangeable with the keyring's own calls.
    let ct = handle.encrypt(&c, &cx, b"123-45-6789").await.unwrap();
    assert_eq!(&*k.decrypt(&c, &cx, &ct).await.unwrap(), b"123-45-6789");
    let by_keyring = k.encrypt(&c, &cx, b"other").await.unwrap();
    assert_eq!(
        &*handle.decrypt(&c, &cx, &by_keyring).await.unwrap(),
        b"other"
    );
    // The context is authenticated as always.
    for wrong in [ctx("t", "dob", Some("r1")), ctx("t", "ssn", Some("r2"))] {
        assert!(matches!(
            handle.decrypt(&c, &wrong, &ct).await,
            Err(Error::DecryptionFailed)
        ));
    }
    assert!(matches!(
        handle.decrypt(&c, &cx, &ct[..ct.len() - 1]).await,
        Err(Error::DecryptionFailed | Error::Format(_))
    ));
    // A context of another tenant goes the keyring's ordinary way: it works, under that
    // tenant's key, and cannot decrypt this tenant's ciphertexts.
    let other = ctx("u", "ssn", Some("r1"));
    let ct_u = handle.encrypt(&c, &other, b"u's").await.unwrap();
    assert_eq!(&*k.decrypt(&c, &other, &ct_u).await.unwrap(), b"u's");
    assert!(matches!(
        handle.decrypt(&c, &other, &ct).await,
        Err(Error::DecryptionFailed)
    ));
    // A tenant that does not exist fails at the first call, clearly.
    let ghost = ctx("ghost", "ssn", None);
    assert!(matches!(
        k.tenant(&tenant("ghost")).encrypt(&c, &ghost, b"x").await,
        Err(Error::TenantNotFound { .. })
    ));

    // Rotation, a minimum version and a shred made through the keyring are seen by the
    // handle at its next call.
    assert_eq!(version_of(&ct), 1);
    k.rotate(&c, &t).await.unwrap();
    let ct2 = handle.encrypt(&c, &cx, b"v2").await.unwrap();
    assert_eq!(
        version_of(&ct2),
        2,
        "encrypts under the new primary at once"
    );
    assert_eq!(
        &*handle.decrypt(&c, &cx, &ct).await.unwrap(),
        b"123-45-6789"
    );
    k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    assert!(matches!(
        handle.decrypt(&c, &cx, &ct).await,
        Err(Error::KeyVersionRetired {
            version: 1,
            min: 2,
            ..
        })
    ));
    assert_eq!(&*handle.decrypt(&c, &cx, &ct2).await.unwrap(), b"v2");
    k.shred(&c, &t).await.unwrap();
    assert!(matches!(
        handle.encrypt(&c, &cx, b"x").await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        handle.decrypt(&c, &cx, &ct2).await,
        Err(Error::KeyDestroyed { .. })
    ));
}

#[tokio::test]
async fn a_tenant_keyring_sees_another_process_rotation_as_the_keyring_does() {
    let OnTenant {
        _dir,
        p,
        k: a,
        t,
        handle,
    } = tenant_keyring_on(slow_metadata()).await;
    let c = caller();
    let cx = ctx("t", "f", None);
    assert_eq!(version_of(&handle.encrypt(&c, &cx, b"x").await.unwrap()), 1);
    // Another process (its own keyring on the same store) rotates. Within the metadata TTL,
    // and until this one is told, the handle, like the keyring, still encrypts under v1 …
    let b = keyring_on(&p, CacheSettings::default());
    b.rotate(&c, &t).await.unwrap();
    assert_eq!(version_of(&handle.encrypt(&c, &cx, b"x").await.unwrap()), 1);
    // … but decrypts what the other process wrote under v2 (an unknown newer version
    // refreshes the metadata) …
    let v2 = b.encrypt(&c, &cx, b"new").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(&*handle.decrypt(&c, &cx, &v2).await.unwrap(), b"new");
    // … and, once told (the sidecar's change listener, or the caller) after a rotation it
    // had not seen, encrypts under v2.
    b.rotate(&c, &t).await.unwrap();
    a.invalidate_tenant(&t);
    assert_eq!(version_of(&handle.encrypt(&c, &cx, b"x").await.unwrap()), 3);
    // Untold, a handle picks a rotation up within the metadata TTL, as the keyring does
    // (its remembered metadata is still cached, but too old to use).
    let fast = keyring_on(
        &p,
        CacheSettings {
            metadata_ttl: Duration::from_millis(100),
            ..CacheSettings::default()
        },
    );
    let fast_handle = fast.tenant(&t);
    assert_eq!(
        version_of(&fast_handle.encrypt(&c, &cx, b"x").await.unwrap()),
        3
    );
    b.rotate(&c, &t).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        version_of(&fast_handle.encrypt(&c, &cx, b"x").await.unwrap()),
        4
    );
}

#[tokio::test]
async fn a_tenant_keyring_counts_key_uses_and_never_keeps_metadata_alive() {
    let OnTenant {
        _dir,
        p,
        k,
        t,
        handle,
    } = tenant_keyring_on(CacheSettings {
        max_uses: 3,
        ..CacheSettings::default()
    })
    .await;
    let c = caller();
    assert!(
        !phiseal::testkit::remembers_metadata(&handle),
        "nothing before its first call"
    );
    let cx = ctx("t", "f", None);
    let ct = handle.encrypt(&c, &cx, b"x").await.unwrap(); // unwrap #2, use 1
    assert!(phiseal::testkit::remembers_metadata(&handle));
    for _ in 0..8 {
        handle.decrypt(&c, &cx, &ct).await.unwrap();
    }
    // Max uses hold through the handle as through the keyring: 9 operations, 3 per unwrap.
    assert_eq!(p.kms.unwraps.load(Ordering::SeqCst), 1 + 3);
    // The handle holds the keyring's metadata (and with it the hot keys) only weakly: once
    // the keyring drops it, it is gone, whatever handles exist.
    k.invalidate_tenant(&t);
    assert!(!phiseal::testkit::remembers_metadata(&handle));
    assert_eq!(&*handle.decrypt(&c, &cx, &ct).await.unwrap(), b"x");
    assert!(
        phiseal::testkit::remembers_metadata(&handle),
        "refreshed by the call that missed"
    );
    k.invalidate_all();
    assert!(!phiseal::testkit::remembers_metadata(&handle));
    handle.decrypt(&c, &cx, &ct).await.unwrap();
    k.shred(&c, &t).await.unwrap();
    assert!(!phiseal::testkit::remembers_metadata(&handle));
}

#[tokio::test]
async fn a_tenant_keyring_whose_metadata_is_held_alive_refuses_what_the_keyring_refuses() {
    // Long TTLs: nothing below is refused for its age.
    let OnTenant {
        _dir,
        p,
        k,
        t,
        handle,
    } = tenant_keyring_on(slow_metadata()).await;
    let c = caller();
    let cx = ctx("t", "f", None);
    let v1 = handle.encrypt(&c, &cx, b"one").await.unwrap();
    // Each step holds the handle's metadata alive (as a concurrent call or batch would), so
    // only the handle's own checks stand between it and the old metadata.
    let held = phiseal::testkit::hold_metadata(&handle).unwrap();
    k.rotate(&c, &t).await.unwrap();
    assert_eq!(version_of(&handle.encrypt(&c, &cx, b"x").await.unwrap()), 2);
    drop(held);
    let held = phiseal::testkit::hold_metadata(&handle).unwrap();
    k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    assert!(matches!(
        handle.decrypt(&c, &cx, &v1).await,
        Err(Error::KeyVersionRetired { version: 1, .. })
    ));
    drop(held);
    // Another process shreds the tenant; this keyring learns it from the store without any
    // invalidation (a ciphertext naming an unknown newer version makes it re-read the
    // tenant): from then on the handle refuses too, though its old metadata is alive.
    let v2 = handle.encrypt(&c, &cx, b"two").await.unwrap();
    let held = phiseal::testkit::hold_metadata(&handle).unwrap();
    let other = keyring_on(&p, CacheSettings::default());
    other.shred(&c, &t).await.unwrap();
    assert_eq!(
        &*handle.decrypt(&c, &cx, &v2).await.unwrap(),
        b"two",
        "not told yet"
    );
    let mut newer = v2.clone();
    newer[2..6].copy_from_slice(&9u32.to_be_bytes());
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Learnt in the middle of a batch: the items after it are refused too, though the batch
    // started on the old metadata.
    let items: Vec<(&EncryptionContext, &[u8])> = vec![(&cx, &v2), (&cx, &newer), (&cx, &v2)];
    let results = k.decrypt_batch(&c, &items).await.unwrap();
    assert_eq!(
        &results[0].as_ref().unwrap()[..],
        b"two",
        "before it learnt"
    );
    for result in &results[1..] {
        assert!(
            matches!(result, Err(Error::KeyDestroyed { .. })),
            "{:?}",
            result.as_ref().err()
        );
    }
    assert!(matches!(
        handle.decrypt(&c, &cx, &v2).await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        handle.encrypt(&c, &cx, b"x").await,
        Err(Error::KeyDestroyed { .. })
    ));
    drop(held);
}

#[tokio::test]
async fn a_tenant_keyring_whose_metadata_was_evicted_for_space_refuses_what_the_keyring_refuses() {
    // Room for two tenants' metadata: using other tenants evicts t's.
    let OnTenant {
        _dir,
        p,
        k,
        t,
        handle,
    } = tenant_keyring_on(CacheSettings {
        capacity: 2,
        ..slow_metadata()
    })
    .await;
    let c = caller();
    let others = ["u1", "u2", "u3", "u4", "u5", "u6"];
    for u in others {
        k.create_tenant(&c, &tenant(u)).await.unwrap();
    }
    let cx = ctx("t", "f", None);
    let ct = handle.encrypt(&c, &cx, b"t's").await.unwrap();
    let held = phiseal::testkit::hold_metadata(&handle).unwrap();
    // t is shredded by another process; this keyring evicts t's metadata for the other
    // tenants', then re-reads t's from the store and refuses …
    keyring_on(&p, CacheSettings::default())
        .shred(&c, &t)
        .await
        .unwrap();
    for u in others {
        for _ in 0..3 {
            k.encrypt(&c, &ctx(u, "f", None), b"u's").await.unwrap();
        }
    }
    let after = k.decrypt(&c, &cx, &ct).await;
    assert!(
        matches!(after, Err(Error::KeyDestroyed { .. })),
        "t's metadata was evicted and re-read: {:?}",
        after.as_ref().err()
    );
    // … and so does the handle, though its evicted metadata is still alive.
    assert!(matches!(
        handle.decrypt(&c, &cx, &ct).await,
        Err(Error::KeyDestroyed { .. })
    ));
    drop(held);
}

#[tokio::test]
async fn a_tenant_keyring_audits_like_the_keyring() {
    let dir = private_tempdir();
    let c = Caller::with_request_id(Actor::named("svc-h"), "req-h");
    {
        let k = open(dir.path());
        let t = tenant("t");
        k.create_tenant(&c, &t).await.unwrap();
        let handle = k.tenant(&t);
        let cx = ctx("t", "dob", Some("rec-1"));
        // A miss (first call), then cache hits, then a failure.
        let ct = handle.encrypt(&c, &cx, b"PLAINTEXT-1").await.unwrap();
        handle.encrypt(&c, &cx, b"PLAINTEXT-2").await.unwrap();
        handle.decrypt(&c, &cx, &ct).await.unwrap();
        let _ = handle.decrypt(&c, &ctx("t", "other", None), &ct).await;
        k.flush_audit().await.unwrap();
    }
    let log = EmbeddedPaths::new(dir.path()).audit_log;
    assert!(phiseal_audit_file::verify(&log).unwrap().is_intact());
    let mut out = Vec::new();
    phiseal_audit_file::export_tenant(&log, "t", None, None, &mut out).unwrap();
    let records = String::from_utf8(out).unwrap();
    assert!(!records.contains("PLAINTEXT"));
    let fields: Vec<&str> = records
        .lines()
        .filter(|l| l.contains(r#""action":"encrypt""#) || l.contains(r#""action":"decrypt""#))
        .collect();
    assert_eq!(fields.len(), 4, "{records}");
    for (line, (action, result)) in fields.iter().zip([
        ("encrypt", "ok"),
        ("encrypt", "ok"),
        ("decrypt", "ok"),
        ("decrypt", "decryption_failed"),
    ]) {
        assert!(line.contains(&format!(r#""action":"{action}""#)), "{line}");
        assert!(line.contains(&format!(r#""result":"{result}""#)), "{line}");
        assert!(line.contains(r#""actor":"svc-h""#), "{line}");
        assert!(line.contains(r#""request_id":"req-h""#), "{line}");
        assert!(line.contains(r#""key_version":1"#), "{line}");
    }
    // The first encrypt unwrapped the key; the later calls were served from the cache.
    assert!(fields[0].contains(r#""key_source":"kms""#), "{}", fields[0]);
    assert!(
        fields[1].contains(r#""key_source":"cache""#),
        "{}",
        fields[1]
    );
    assert!(
        fields[2].contains(r#""key_source":"cache""#),
        "{}",
        fields[2]
    );
}

/// A finished stream of four segments under `cx` (to decrypt), and a segment's worth of input.
async fn sealed_stream(k: &Keyring, c: &Caller, cx: &EncryptionContext) -> (Vec<u8>, Vec<u8>) {
    let options = StreamOptions::default();
    let segment = vec![1u8; options.segment_size as usize];
    let mut sealed = Vec::new();
    let mut writing = k.start_encrypt_stream(c, cx, options).await.unwrap();
    for _ in 0..4 {
        writing.push(&segment, &mut sealed).unwrap();
    }
    writing.finish(&mut sealed).await.unwrap();
    (sealed, segment)
}

fn refused_by_kms(result: &Result<(), Error>, kind: BackendErrorKind) -> bool {
    matches!(result, Err(Error::Kms { source, .. }) if source.kind() == kind)
}

#[tokio::test]
async fn a_root_key_the_kms_refuses_stops_running_streams_once_their_key_is_due_again() {
    // Before, a stream kept the key it derived at its start until it ended, whatever the KMS
    // said meanwhile: revocation reached field operations within key_ttl, running streams
    // never. Now their key version is confirmed with the KMS as a field operation's would be.
    let audit = Arc::new(MemoryAudit::default());
    let DueSoon {
        _dir,
        kms,
        k,
        c,
        mut writing,
        segment,
        out: mut ciphertext,
    } = stream_due_in_a_second(Duration::ZERO, Some(&audit)).await;
    let housekeeper = Caller::new(Actor::named("housekeeping"));
    let cx = ctx("t", "f", None);
    let (sealed, _) = sealed_stream(&k, &c, &cx).await;
    let mut reading = k.start_decrypt_stream(&c, &cx);
    let mut plaintext = Vec::new();
    let piece = sealed.len() / 4;
    reading
        .push(&sealed[..piece], &mut plaintext)
        .await
        .unwrap();

    kms.fail_with(Some(BackendErrorKind::Denied));
    // Within key_ttl of the unwrap there is nothing to confirm: no KMS call, the streams go on.
    let before = kms.unwraps.load(Ordering::SeqCst);
    k.recheck_streams(&housekeeper, None).await.unwrap();
    assert_eq!(kms.unwraps.load(Ordering::SeqCst), before);
    writing.push(&segment, &mut ciphertext).unwrap();
    reading
        .push(&sealed[piece..2 * piece], &mut plaintext)
        .await
        .unwrap();

    // Past key_ttl: one unwrap for the version both use, refused (audited as the
    // housekeeper's), and both streams stop with the KMS's error before their next segment.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    audit.events.lock().unwrap().clear();
    let checked = k.recheck_streams(&housekeeper, None).await;
    assert!(
        refused_by_kms(&checked, BackendErrorKind::Denied),
        "{checked:?}"
    );
    assert_eq!(kms.unwraps.load(Ordering::SeqCst) - before, 1);
    {
        let events = audit.events.lock().unwrap();
        let unwraps: Vec<_> = events
            .iter()
            .filter(|e| e.action.as_str() == "unwrap_key")
            .map(|e| (e.actor.identity.to_string(), e.outcome.as_str().to_owned()))
            .collect();
        assert_eq!(unwraps, [("housekeeping".to_owned(), "kms".to_owned())]);
    }
    let pushed = writing.push(&segment, &mut ciphertext);
    assert!(
        refused_by_kms(&pushed, BackendErrorKind::Denied),
        "{pushed:?}"
    );
    plaintext.clear();
    let pushed = reading.push(&sealed[2 * piece..], &mut plaintext).await;
    assert!(
        refused_by_kms(&pushed, BackendErrorKind::Denied),
        "{pushed:?}"
    );
    assert!(plaintext.is_empty(), "plaintext released after the stop");
}

#[tokio::test]
async fn running_streams_outlast_a_kms_outage_as_cached_keys_do_then_fail_closed() {
    // key_ttl 1 s + max_stale 2 s: a stream whose key version the KMS cannot confirm goes on
    // until 3 s after the version's last unwrap, then stops (the key may have been revoked
    // meanwhile, as a cached key stops serving then).
    let DueSoon {
        _dir,
        kms,
        k,
        c,
        mut writing,
        segment,
        mut out,
    } = stream_due_in_a_second(Duration::from_secs(2), None).await;
    // At 1.2 s the KMS unwraps the version again: the limit runs from there.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = kms.unwraps.load(Ordering::SeqCst);
    k.recheck_streams(&c, None).await.unwrap();
    assert_eq!(kms.unwraps.load(Ordering::SeqCst) - before, 1);
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    // At 2.5 s and 3.6 s (more than 3 s after the stream's start, less after the last
    // unwrap): it goes on, as the key cache serves the version stale (the outage counts
    // from the first of these).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // The outage's count starts within this first check.
    let before_first = std::time::Instant::now();
    k.recheck_streams(&c, None).await.unwrap();
    let after_first = std::time::Instant::now();
    writing.push(&segment, &mut out).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    k.recheck_streams(&c, None).await.unwrap();
    writing.push(&segment, &mut out).unwrap();
    // From 4.5 s, more than 3 s after the last unwrap, the checks fail; the stream stops at
    // the first one once the KMS has been failing for two retry intervals (10 s), not
    // before (one failed check is no outage).
    tokio::time::sleep(Duration::from_millis(900)).await;
    let limit = phiseal::STALE_RETRY_INTERVAL * 2;
    // (The coarse clock's resolution, a few ms.)
    let slack = Duration::from_millis(20);
    let pushed = loop {
        let check_start = std::time::Instant::now();
        let checked = k.recheck_streams(&c, None).await;
        assert!(
            checked.as_ref().is_err_and(Error::is_kms_unavailable),
            "{checked:?}"
        );
        let pushed = writing.push(&segment, &mut out);
        if pushed.is_err() {
            let failing_for = before_first.elapsed();
            assert!(
                failing_for + slack >= limit,
                "stopped after {failing_for:?}"
            );
            break pushed;
        }
        let failing_for = check_start.duration_since(after_first);
        assert!(
            failing_for < limit + slack,
            "still running after {failing_for:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        refused_by_kms(&pushed, BackendErrorKind::Unavailable),
        "{pushed:?}"
    );
    let shown = pushed.unwrap_err().to_string();
    assert!(shown.contains("may have been revoked"), "{shown}");
}

#[tokio::test]
async fn a_running_stream_stops_once_its_key_version_holds_another_key() {
    // A failover that lost a rotation (or a store restored from a backup), then another
    // rotation: version 2 is now another key than the one a running stream derived from. The
    // stream stops at the next re-read of its tenant, without waiting for its key to be due
    // for confirmation with the KMS (key_ttl).
    let dir = private_tempdir();
    let p = parts(dir.path());
    let k = keyring_on(&p, slow_metadata());
    let (c, t, cx) = (caller(), tenant("t"), ctx("t", "f", None));
    k.create_tenant(&c, &t).await.unwrap();
    k.rotate(&c, &t).await.unwrap();
    let (mut writing, segment, mut out) = writing_one_segment(&k, &c, &cx).await;
    edit_store(
        dir.path(),
        "DELETE FROM key_versions WHERE tenant = 't' AND version = 2; \
         UPDATE key_versions SET state = 'primary' WHERE tenant = 't' AND version = 1;",
    );
    assert_eq!(
        keyring_on(&p, slow_metadata())
            .rotate(&c, &t)
            .await
            .unwrap(),
        2
    );
    let before = p.kms.unwraps.load(Ordering::SeqCst);
    k.recheck_streams(&c, None).await.unwrap();
    assert_eq!(
        p.kms.unwraps.load(Ordering::SeqCst),
        before,
        "the KMS is not asked"
    );
    let pushed = writing.push(&segment, &mut out);
    assert!(
        matches!(&pushed, Err(Error::Store { source, .. })
            if source.kind() == BackendErrorKind::Conflict),
        "{pushed:?}"
    );
}

#[tokio::test]
async fn a_key_store_failure_while_stream_keys_are_due_stops_them_only_on_the_stores_clock() {
    // key_ttl 1 s, max_stale 0: at 1.2 s the stream's key is due for confirmation, and the
    // key store fails. Its tenant was read 0.6 s ago, so the stream goes on (as a field
    // operation's cached metadata would); the failed lookup must not stop it as a KMS outage.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let cache = CacheSettings {
        key_ttl: Duration::from_secs(1),
        metadata_ttl: Duration::from_millis(500),
        ..CacheSettings::default()
    };
    let (k, store) = keyring_on_counting_store_with(&p, cache);
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let cx = ctx("t", "f", None);
    let segment = vec![1u8; StreamOptions::default().segment_size as usize];
    let mut writing = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::sleep(Duration::from_millis(600)).await;
    k.recheck_streams(&c, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.fail_loads.store(true, Ordering::SeqCst);
    let checked = k.recheck_streams(&c, None).await;
    assert!(matches!(checked, Err(Error::Store { .. })), "{checked:?}");
    writing.push(&segment, &mut out).unwrap();
    // The store's clock still applies: more than 1 s after the last read, it stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(k.recheck_streams(&c, None).await.is_err());
    let pushed = writing.push(&segment, &mut out);
    assert!(matches!(pushed, Err(Error::Store { .. })), "{pushed:?}");
}

#[tokio::test]
async fn an_unwrap_for_a_due_stream_key_that_cannot_be_audited_stops_the_stream() {
    // The audit log fails when the stream's key is due: the KMS's answer could not be
    // recorded, so the key serves no field operation — nor the stream (fail closed), even
    // with a long max_stale.
    let audit = Arc::new(MemoryAudit::default());
    let DueSoon {
        _dir,
        kms: _,
        k,
        c,
        mut writing,
        segment,
        mut out,
    } = stream_due_in_a_second(Duration::from_secs(60), Some(&audit)).await;
    // (A segment buffered: the next push seals it, or fails.)
    writing.push(&segment, &mut out).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    audit.failing.store(true, Ordering::SeqCst);
    let checked = k.recheck_streams(&c, None).await;
    assert!(matches!(checked, Err(Error::Audit { .. })), "{checked:?}");
    let pushed = writing.push(&segment, &mut out);
    assert!(matches!(pushed, Err(Error::Audit { .. })), "{pushed:?}");
}

#[tokio::test]
async fn a_stream_retired_by_the_minimum_version_is_not_confirmed_with_the_kms() {
    // Its version is below the minimum: it stopped with KeyVersionRetired, and the key check
    // neither asks the KMS for that version (nor audits an unwrap of it) nor replaces that
    // error with the KMS's.
    let DueSoon {
        _dir,
        kms,
        k,
        c,
        mut writing,
        segment,
        mut out,
    } = stream_due_in_a_second(Duration::ZERO, None).await;
    let t = tenant("t");
    // (A segment buffered: the next push seals it, or fails.)
    writing.push(&segment, &mut out).unwrap();
    k.rotate(&c, &t).await.unwrap();
    k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    kms.fail_with(Some(BackendErrorKind::Denied));
    let before = kms.unwraps.load(Ordering::SeqCst);
    let _ = k.recheck_streams(&c, None).await;
    assert_eq!(
        kms.unwraps.load(Ordering::SeqCst),
        before,
        "version 1 unwrapped"
    );
    let pushed = writing.push(&segment, &mut out);
    assert!(
        matches!(pushed, Err(Error::KeyVersionRetired { .. })),
        "{pushed:?}"
    );
}

#[tokio::test]
async fn one_kms_blip_when_a_stream_key_is_due_does_not_stop_the_stream() {
    // max_stale 0 (the default): the stream's key is due at 1 s and the KMS fails that one
    // call. The checks go on failing during the outage's 5 s backoff, without asking it,
    // until one asks it again and confirms the key: the stream goes on throughout.
    let DueSoon {
        _dir,
        kms,
        k,
        c,
        mut writing,
        segment,
        mut out,
    } = stream_due_in_a_second(Duration::ZERO, None).await;
    // (A segment buffered: the next push seals it, or fails.)
    writing.push(&segment, &mut out).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    let checked = k.recheck_streams(&c, None).await;
    assert!(
        checked.as_ref().is_err_and(Error::is_kms_unavailable),
        "{checked:?}"
    );
    writing.push(&segment, &mut out).unwrap();
    kms.fail_with(None);
    // Checked every second, as the daemon does with this key_ttl: the checks in the 5 s after
    // the blip fail without asking the KMS (the outage's backoff), then one asks it and
    // confirms the key.
    let mut checked = Err(Error::DecryptionFailed);
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        checked = k.recheck_streams(&c, None).await;
        writing.push(&segment, &mut out).unwrap();
    }
    checked.unwrap();
    writing.push(&segment, &mut out).unwrap();
}

#[tokio::test]
async fn a_running_stream_stops_once_its_key_version_is_gone_from_the_store() {
    // A failover that lost a rotation: version 2, under which the stream runs, is no longer
    // in the store. The next re-read stops the stream (its ciphertext could never be
    // decrypted) with key_version_not_found; a stream under version 1 goes on.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let k = keyring_on(&p, slow_metadata());
    let (c, t, cx) = (caller(), tenant("t"), ctx("t", "f", None));
    k.create_tenant(&c, &t).await.unwrap();
    let segment = vec![1u8; StreamOptions::default().segment_size as usize];
    let (sealed_v1, _) = sealed_stream(&k, &c, &cx).await;
    k.rotate(&c, &t).await.unwrap();
    let mut writing = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    let mut reading = k.start_decrypt_stream(&c, &cx);
    let (mut out, mut plaintext) = (Vec::new(), Vec::new());
    writing.push(&segment, &mut out).unwrap();
    let piece = sealed_v1.len() / 4;
    reading
        .push(&sealed_v1[..piece], &mut plaintext)
        .await
        .unwrap();
    edit_store(
        dir.path(),
        "DELETE FROM key_versions WHERE tenant = 't' AND version = 2; \
         UPDATE key_versions SET state = 'primary' WHERE tenant = 't' AND version = 1;",
    );
    k.recheck_streams(&c, None).await.unwrap();
    let pushed = writing.push(&segment, &mut out);
    assert!(
        matches!(pushed, Err(Error::KeyVersionNotFound { version: 2, .. })),
        "{pushed:?}"
    );
    reading
        .push(&sealed_v1[piece..], &mut plaintext)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_running_stream_stops_once_its_tenant_is_gone_from_the_store() {
    // Tenants are never deleted (a shred keeps the record): a key store without the tenant
    // was restored from before it or is the wrong one. Its streams stop at the next re-read,
    // not only once the tenant could not be read for key_ttl + max_stale.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let k = keyring_on(&p, slow_metadata());
    let (c, t, cx) = (caller(), tenant("t"), ctx("t", "f", None));
    k.create_tenant(&c, &t).await.unwrap();
    let (mut writing, segment, mut out) = writing_one_segment(&k, &c, &cx).await;
    edit_store(
        dir.path(),
        "DELETE FROM key_versions WHERE tenant = 't'; DELETE FROM tenants WHERE tenant = 't';",
    );
    let checked = k.recheck_streams(&c, None).await;
    assert!(
        matches!(checked, Err(Error::TenantNotFound { .. })),
        "{checked:?}"
    );
    let pushed = writing.push(&segment, &mut out);
    assert!(
        matches!(pushed, Err(Error::TenantNotFound { .. })),
        "{pushed:?}"
    );
}

/// A keyring with key_ttl 1 s (metadata 500 ms) and `max_stale` on a switchable KMS over a
/// fresh embedded store, audited to `audit` (or not), with tenant `t` and an encryption
/// stream of its field `f` running: what the stream key-confirmation tests start from.
struct DueSoon {
    _dir: tempfile::TempDir,
    kms: Arc<SwitchableKms>,
    k: Keyring,
    c: Caller,
    writing: phiseal::AuditedStreamEncryptor,
    /// A segment's worth of plaintext.
    segment: Vec<u8>,
    /// The stream's output so far.
    out: Vec<u8>,
}

async fn stream_due_in_a_second(max_stale: Duration, audit: Option<&Arc<MemoryAudit>>) -> DueSoon {
    let dir = private_tempdir();
    let p = parts(dir.path());
    let kms = SwitchableKms::over(&p);
    let cache = CacheSettings {
        key_ttl: Duration::from_secs(1),
        metadata_ttl: Duration::from_millis(500),
        max_stale,
        ..CacheSettings::default()
    };
    let k = switchable_keyring(&kms, &p, cache, audit);
    let c = caller();
    k.create_tenant(&c, &tenant("t")).await.unwrap();
    let writing = k
        .start_encrypt_stream(&c, &ctx("t", "f", None), StreamOptions::default())
        .await
        .unwrap();
    DueSoon {
        _dir: dir,
        kms,
        k,
        c,
        writing,
        segment: vec![1u8; StreamOptions::default().segment_size as usize],
        out: Vec::new(),
    }
}

/// Runs `sql` on the embedded key store in `dir` (a store restored, a failover that lost a
/// change: what no keyring does).
fn edit_store(dir: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(EmbeddedPaths::new(dir).key_store).unwrap();
    conn.execute_batch(sql).unwrap();
}

/// An encryption stream of `cx` with one segment buffered (the next push seals it, or
/// fails), a segment's worth of plaintext, and the stream's output so far.
async fn writing_one_segment(
    k: &Keyring,
    c: &Caller,
    cx: &EncryptionContext,
) -> (phiseal::AuditedStreamEncryptor, Vec<u8>, Vec<u8>) {
    let segment = vec![1u8; StreamOptions::default().segment_size as usize];
    let mut writing = k
        .start_encrypt_stream(c, cx, StreamOptions::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    writing.push(&segment, &mut out).unwrap();
    (writing, segment, out)
}

#[tokio::test]
async fn a_stream_starting_while_a_reread_is_under_way_is_retired_by_the_minimum_it_reads() {
    // Another process raises the minimum to 2 (no notification reaches this keyring). A
    // re-read of the tenant begins and reads it; meanwhile a decryption stream of a version-1
    // ciphertext starts here from the older cached metadata (minimum 1). The re-read began
    // after that metadata was read, so its minimum applies to the stream, though the stream
    // registered after the re-read began.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let (k, store) = keyring_on_counting_store_with(&p, slow_metadata());
    let other = keyring_on(&p, slow_metadata());
    let (c, t, cx) = (caller(), tenant("t"), ctx("t", "f", None));
    k.create_tenant(&c, &t).await.unwrap();
    let (sealed_v1, _) = sealed_stream(&k, &c, &cx).await;
    k.rotate(&c, &t).await.unwrap();
    // A stream under version 2, so that the tenant is re-read; and this keyring's view of
    // the tenant (minimum 1), cached.
    let (_writing, _, _) = writing_one_segment(&k, &c, &cx).await;
    other.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    store.stall_next_load.store(true, Ordering::SeqCst);
    let rereading = {
        let (k, c) = (k.clone(), c.clone());
        tokio::spawn(async move { k.recheck_streams(&c, None).await })
    };
    tokio::time::timeout(Duration::from_secs(10), store.stalled.notified())
        .await
        .expect("the tenant was never re-read");
    let mut reading = k.start_decrypt_stream(&c, &cx);
    let mut plaintext = Vec::new();
    let piece = sealed_v1.len() / 4;
    reading
        .push(&sealed_v1[..piece], &mut plaintext)
        .await
        .unwrap();
    store.release.notify_one();
    rereading.await.unwrap().unwrap();
    plaintext.clear();
    let pushed = reading.push(&sealed_v1[piece..], &mut plaintext).await;
    assert!(
        matches!(pushed, Err(Error::KeyVersionRetired { min: 2, .. })),
        "{pushed:?}"
    );
    assert!(
        plaintext.is_empty(),
        "plaintext released under a retired version"
    );
}

#[tokio::test]
async fn two_kms_blips_with_answers_between_them_do_not_stop_a_stream() {
    // A blip at a check of the stream's key, the KMS answering other calls afterwards, and
    // another blip at a check more than 10 s after the first: two blips, not a 10 s outage.
    let DueSoon {
        _dir,
        kms,
        k,
        c,
        mut writing,
        segment,
        mut out,
    } = stream_due_in_a_second(Duration::ZERO, None).await;
    writing.push(&segment, &mut out).unwrap();
    k.create_tenant(&c, &tenant("u")).await.unwrap();
    let other = ctx("u", "f", None);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    assert!(k.recheck_streams(&c, None).await.is_err());
    kms.fail_with(None);
    // After the outage's backoff, another tenant's key is unwrapped: the KMS answers.
    tokio::time::sleep(phiseal::STALE_RETRY_INTERVAL + Duration::from_millis(300)).await;
    let before = kms.unwraps.load(Ordering::SeqCst);
    k.encrypt(&c, &other, b"x").await.unwrap();
    assert_eq!(kms.unwraps.load(Ordering::SeqCst) - before, 1);
    tokio::time::sleep(phiseal::STALE_RETRY_INTERVAL).await;
    kms.fail_with(Some(BackendErrorKind::Unavailable));
    assert!(k.recheck_streams(&c, None).await.is_err());
    writing.push(&segment, &mut out).unwrap();
}

#[tokio::test]
async fn a_key_store_failure_inside_a_stream_key_lookup_stops_nothing() {
    // The tenant was just read; the lookup of the due key then needs the store again (the
    // tenant's metadata was invalidated meanwhile) and the store fails: that is the store's
    // failure, left to the re-reads' own limit, not a verdict on the key.
    let dir = private_tempdir();
    let p = parts(dir.path());
    let cache = CacheSettings {
        key_ttl: Duration::from_secs(1),
        metadata_ttl: Duration::from_millis(500),
        ..CacheSettings::default()
    };
    let (k, store) = keyring_on_counting_store_with(&p, cache);
    let (c, t, cx) = (caller(), tenant("t"), ctx("t", "f", None));
    k.create_tenant(&c, &t).await.unwrap();
    let (mut writing, segment, mut out) = writing_one_segment(&k, &c, &cx).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store.stall_next_load.store(true, Ordering::SeqCst);
    let rechecking = {
        let (k, c) = (k.clone(), c.clone());
        tokio::spawn(async move { k.recheck_streams(&c, None).await })
    };
    tokio::time::timeout(Duration::from_secs(10), store.stalled.notified())
        .await
        .expect("the tenant was never re-read");
    k.forget_metadata(Some(&t));
    store.fail_loads.store(true, Ordering::SeqCst);
    store.release.notify_one();
    let checked = rechecking.await.unwrap();
    assert!(matches!(checked, Err(Error::Store { .. })), "{checked:?}");
    writing.push(&segment, &mut out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_on_an_older_records_failed_unwrap_tries_its_own_record() {
    // As `a_request_that_waited_on_an_older_records_unwrap_does_not_use_its_key`, but the
    // unwrap of the older record fails: the request waiting on it, whose record holds another
    // key under the version, is not handed that failure — it unwraps its own record.
    waiting_on_an_older_records_unwrap(true).await;
}

/// Spawns an encryption of `b"first"` under `cx` through `k`, and returns once its unwrap is
/// held in `kms` (`hold` set: it waits for a permit of `kms.gate`).
async fn encrypt_held_in_the_kms(
    k: &Keyring,
    kms: &SwitchableKms,
    c: &Caller,
    cx: &EncryptionContext,
) -> tokio::task::JoinHandle<Result<Vec<u8>, Error>> {
    kms.hold.store(true, Ordering::SeqCst);
    let before = kms.unwraps.load(Ordering::SeqCst);
    let (k, c, cx) = (k.clone(), c.clone(), cx.clone());
    let first = tokio::spawn(async move { k.encrypt(&c, &cx, b"first").await });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kms.unwraps.load(Ordering::SeqCst) == before {
        assert!(std::time::Instant::now() < deadline, "no unwrap");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first
}

/// Tenant `t`'s version 2 lost (a failover that lost the rotation) and made again, by a new
/// keyring on `p`, which is returned: another key under version 2.
async fn version_2_made_again(dir: &Path, p: &Parts) -> Keyring {
    edit_store(
        dir,
        "DELETE FROM key_versions WHERE tenant = 't' AND version = 2; \
         UPDATE key_versions SET state = 'primary' WHERE tenant = 't' AND version = 1;",
    );
    let third = keyring_on(p, slow_metadata());
    assert_eq!(third.rotate(&caller(), &tenant("t")).await.unwrap(), 2);
    third
}
