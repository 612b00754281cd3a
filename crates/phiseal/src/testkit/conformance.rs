//! Conformance suites every KMS backend and key store must pass, instantiated in one line by
//! each backend's tests (`phiseal_kms_local`, `phiseal_store_sqlite`, and the cloud / HSM /
//! PostgreSQL backends to come):
//!
//! ```ignore
//! phiseal::testkit::conformance::kms(Arc::new(MyKms::connect(..).await?)).await;
//! phiseal::testkit::conformance::key_store(Arc::new(MyStore::open(..)?)).await;
//! ```
//!
//! A suite reports a failure by panicking with a message naming the property, like `assert!`.
// A test harness: panicking is how it reports, and its inputs are its own.
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use jiff::Timestamp;

use crate::context::TenantId;
use crate::error::BackendErrorKind;
use crate::kms::{KeyBinding, Kms, WrappedKey};
use crate::secret::TenantKey;
use crate::store::{KeyRecord, KeyState, KeyStore, TenantRecord};

fn binding(tenant: &str, version: u32) -> KeyBinding {
    KeyBinding {
        tenant: TenantId::new(tenant).unwrap(),
        version,
    }
}

/// The KMS suite: round trip; the binding (tenant, version) is enforced where the backend can
/// enforce it (see `binds_context`); altered wrapped bytes are refused; the root-key reference
/// is recorded and is the current one; a reference to another root key is refused as
/// `InvalidData` or `Misconfigured`; concurrent use works; `Debug` shows no key bytes.
///
/// `binds_context` is false for backends whose wrap takes no AAD (Azure Key Vault): for them
/// the core's key-check MAC is the binding, and a swapped binding must still not return a
/// *different* key silently — the suite then only checks the round trip.
pub async fn kms(kms: Arc<dyn Kms>, binds_context: bool) {
    let name = kms.name().to_owned();
    let key = TenantKey::from_bytes([0x5a; 32]);
    let b = binding("conformance-tenant", 3);
    let wrapped = kms
        .wrap(&key, &b)
        .await
        .unwrap_or_else(|e| panic!("{name}: wrap: {e}"));
    assert!(
        !wrapped.root_key_ref.is_empty(),
        "{name}: the root-key reference must be recorded"
    );
    let current = kms
        .current_root_key_ref()
        .await
        .unwrap_or_else(|e| panic!("{name}: current_root_key_ref: {e}"));
    assert_eq!(
        wrapped.root_key_ref, current,
        "{name}: a wrap must record the current root-key reference"
    );
    assert!(
        !wrapped.ciphertext.windows(32).any(|w| w == key.expose()),
        "{name}: the wrapped bytes contain the key in the clear"
    );
    let back = kms
        .unwrap(&wrapped, &b)
        .await
        .unwrap_or_else(|e| panic!("{name}: unwrap: {e}"));
    assert_eq!(back.expose(), key.expose(), "{name}: round trip");

    if binds_context {
        for other in [binding("other-tenant", 3), binding("conformance-tenant", 4)] {
            match kms.unwrap(&wrapped, &other).await {
                Err(e) => assert_eq!(
                    e.kind(),
                    BackendErrorKind::InvalidData,
                    "{name}: a binding mismatch must be InvalidData: {e}"
                ),
                Ok(_) => panic!("{name}: unwrapped under another binding {other:?}"),
            }
        }
    }

    let mut altered = wrapped.clone();
    let last = altered.ciphertext.len() - 1;
    altered.ciphertext[last] ^= 1;
    assert!(
        kms.unwrap(&altered, &b).await.is_err(),
        "{name}: altered wrapped bytes were accepted"
    );
    let empty = WrappedKey {
        root_key_ref: wrapped.root_key_ref.clone(),
        ciphertext: Vec::new(),
    };
    assert!(
        kms.unwrap(&empty, &b).await.is_err(),
        "{name}: empty wrapped bytes were accepted"
    );

    assert!(
        kms.can_unwrap(&wrapped.root_key_ref),
        "{name}: can_unwrap refuses its own reference"
    );
    assert!(
        !kms.can_unwrap("no-such-backend:root-key-1"),
        "{name}: can_unwrap accepts a reference to another root key"
    );
    let foreign = WrappedKey {
        root_key_ref: "no-such-backend:root-key-1".into(),
        ciphertext: wrapped.ciphertext.clone(),
    };
    match kms.unwrap(&foreign, &b).await {
        Err(e) => assert!(
            matches!(
                e.kind(),
                BackendErrorKind::InvalidData | BackendErrorKind::Misconfigured
            ),
            "{name}: a reference to another root key must be InvalidData or Misconfigured: {e}"
        ),
        Ok(_) => panic!("{name}: unwrapped bytes that name another root key"),
    }

    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let kms = Arc::clone(&kms);
        tasks.push(tokio::spawn(async move {
            let key = TenantKey::from_bytes([i as u8; 32]);
            let b = binding("concurrent", i + 1);
            let w = kms.wrap(&key, &b).await.unwrap();
            let back = kms.unwrap(&w, &b).await.unwrap();
            assert_eq!(back.expose(), key.expose());
        }));
    }
    for task in tasks {
        task.await
            .unwrap_or_else(|e| panic!("{name}: concurrent use: {e}"));
    }
    let shown = format!("{kms:?}");
    assert!(
        !shown.contains("90, 90, 90") && !shown.contains("5a5a5a5a"),
        "{name}: Debug output shows key bytes"
    );
}

fn record(version: u32, fill: u8) -> KeyRecord {
    KeyRecord {
        version,
        state: KeyState::Primary,
        wrapped: Some(WrappedKey {
            root_key_ref: "conformance:1".into(),
            ciphertext: vec![fill; 60],
        }),
        key_check: [fill; 32],
        created_at: Timestamp::now(),
    }
}

/// The key-store suite: create / load / duplicate create; compare-and-set rotation (stale
/// expectations change nothing; concurrent rotations never duplicate a version); minimum
/// decryption version; shred (destroyed, wrapped bytes gone, tombstone kept); list; CAS on
/// wrapped bytes.
pub async fn key_store(store: Arc<dyn KeyStore>) {
    let name = store.name().to_owned();
    let t = TenantId::new("conformance-store").unwrap();
    assert!(
        store.load_tenant(&t).await.unwrap().is_none(),
        "{name}: unknown tenant"
    );
    store.create_tenant(&t, record(1, 1)).await.unwrap();
    let err = store.create_tenant(&t, record(1, 2)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        BackendErrorKind::Conflict,
        "{name}: duplicate create"
    );
    let loaded = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(loaded.tenant, t);
    assert_eq!(loaded.versions.len(), 1);
    assert_eq!(loaded.versions[0].wrapped, record(1, 1).wrapped);
    assert_eq!(loaded.versions[0].key_check, [1; 32]);
    assert_eq!(loaded.min_decrypt_version, 1);

    store.insert_version(&t, 1, record(2, 2)).await.unwrap();
    let err = store.insert_version(&t, 1, record(2, 3)).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict, "{name}: stale CAS");
    let loaded = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(loaded.latest_version(), 2);
    assert_eq!(
        loaded.version(2).unwrap().key_check,
        [2; 32],
        "{name}: CAS loser wrote"
    );
    assert_eq!(loaded.version(1).unwrap().state, KeyState::DecryptOnly);
    assert_eq!(loaded.primary().unwrap().version, 2);

    store.set_min_decrypt_version(&t, 1, 2).await.unwrap();
    assert_eq!(
        store
            .load_tenant(&t)
            .await
            .unwrap()
            .unwrap()
            .min_decrypt_version,
        2
    );
    assert!(
        store.set_min_decrypt_version(&t, 2, 3).await.is_err(),
        "{name}: min > latest"
    );

    let old = record(2, 2).wrapped.unwrap();
    let new = WrappedKey {
        root_key_ref: "conformance:2".into(),
        ciphertext: vec![9; 60],
    };
    store
        .replace_wrapped(&t, 2, &old, new.clone())
        .await
        .unwrap();
    let err = store
        .replace_wrapped(&t, 2, &old, new.clone())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        BackendErrorKind::Conflict,
        "{name}: stale wrapped CAS"
    );
    let loaded = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(loaded.version(2).unwrap().wrapped.as_ref(), Some(&new));

    // Concurrent rotations: every version allocated exactly once.
    let c = TenantId::new("conformance-concurrent").unwrap();
    store.create_tenant(&c, record(1, 1)).await.unwrap();
    let mut tasks = Vec::new();
    // Each task writes bytes of its own (fill 10 + its number) and says which versions it won.
    for task in 0..8u8 {
        let (store, c) = (Arc::clone(&store), c.clone());
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for _ in 0..10 {
                let latest = store
                    .load_tenant(&c)
                    .await
                    .unwrap()
                    .unwrap()
                    .latest_version();
                match store
                    .insert_version(&c, latest, record(latest + 1, 10 + task))
                    .await
                {
                    Ok(()) => won.push(latest + 1),
                    // Losing a race is a conflict, never another failure.
                    Err(e) => assert_eq!(e.kind(), BackendErrorKind::Conflict, "{e}"),
                }
            }
            (task, won)
        }));
    }
    let mut won = 0;
    let mut author = std::collections::BTreeMap::new();
    for task in tasks {
        let (task, versions) = task.await.unwrap();
        won += versions.len() as u32;
        for v in versions {
            assert!(author.insert(v, task).is_none(), "{name}: v{v} won twice");
        }
    }
    // Each lost attempt of one task was lost to a distinct win of another (its attempts are
    // sequential), so the ten attempts of any task imply at least ten wins in all.
    assert!(won >= 10, "{name}: only {won} rotations won");
    let loaded = store.load_tenant(&c).await.unwrap().unwrap();
    let versions: Vec<u32> = loaded.versions.iter().map(|v| v.version).collect();
    assert_eq!(
        versions,
        (1..=won + 1).collect::<Vec<_>>(),
        "{name}: versions"
    );
    assert_eq!(
        loaded
            .versions
            .iter()
            .filter(|v| v.state == KeyState::Primary)
            .count(),
        1,
        "{name}: exactly one primary"
    );
    // Each stored version is the record its winner wrote.
    for v in loaded.versions.iter().filter(|v| v.version > 1) {
        let fill = 10 + author[&v.version];
        assert_eq!(v.key_check, [fill; 32], "{name}: v{} record", v.version);
        assert_eq!(
            v.wrapped.as_ref().map(|w| w.ciphertext.clone()),
            Some(vec![fill; 60]),
            "{name}: v{} wrapped bytes",
            v.version
        );
    }

    store.shred_tenant(&t, Timestamp::now()).await.unwrap();
    let loaded = store.load_tenant(&t).await.unwrap().unwrap();
    assert!(loaded.shredded_at.is_some(), "{name}: tombstone kept");
    assert!(
        loaded
            .versions
            .iter()
            .all(|v| v.state == KeyState::Destroyed && v.wrapped.is_none()),
        "{name}: shred leaves wrapped keys"
    );
    let err = store.insert_version(&t, 2, record(3, 3)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        BackendErrorKind::Conflict,
        "{name}: rotate after shred"
    );
    let err = store.create_tenant(&t, record(1, 1)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        BackendErrorKind::Conflict,
        "{name}: reuse of a shredded id"
    );

    let mut all = store.list_tenants().await.unwrap();
    all.sort();
    assert_eq!(all, vec![c, t], "{name}: list_tenants");
}

fn tenant_id(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

/// A record whose wrapped bytes name the tenant and version.
fn method_record(tenant: &str, version: u32) -> KeyRecord {
    KeyRecord {
        version,
        state: KeyState::Primary,
        wrapped: Some(WrappedKey {
            root_key_ref: "test".into(),
            ciphertext: format!("WRAPPED<{tenant}/v{version:04}>-0123456789abcdef").into_bytes(),
        }),
        key_check: [version as u8; 32],
        created_at: Timestamp::from_second(1_700_000_000 + i64::from(version)).unwrap(),
    }
}

fn versions(rec: &TenantRecord) -> Vec<u32> {
    rec.versions.iter().map(|v| v.version).collect()
}

fn states(rec: &TenantRecord) -> Vec<KeyState> {
    rec.versions.iter().map(|v| v.state).collect()
}

/// Every method of an *empty* store, one after another, with the exact error kinds and
/// messages the stores share: create/load, rotation demoting the old primary, the minimum
/// decryption version's range, compare-and-set on wrapped bytes, unknown tenants and versions,
/// `list_tenants` sorted by bytes. Returns tenant `acme` as loaded at the end, for a caller
/// that reopens the store and checks it survived.
pub async fn key_store_methods(store: &dyn KeyStore) -> Option<TenantRecord> {
    let t = tenant_id("acme");
    assert!(store.list_tenants().await.unwrap().is_empty());
    assert!(store.load_tenant(&t).await.unwrap().is_none());

    // create_tenant + load_tenant, with a sub-second (microsecond) timestamp: every store
    // keeps at least microseconds.
    let mut first = method_record("acme", 1);
    first.created_at = Timestamp::from_microsecond(1_722_000_000_123_456).unwrap();
    store.create_tenant(&t, first.clone()).await.unwrap();
    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(rec.tenant, t);
    assert_eq!(rec.versions, vec![first.clone()]);
    assert_eq!(rec.min_decrypt_version, 1);
    assert_eq!(rec.shredded_at, None);

    // insert_version demotes the old primary.
    store
        .insert_version(&t, 1, method_record("acme", 2))
        .await
        .unwrap();
    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(versions(&rec), [1, 2]);
    assert_eq!(states(&rec), [KeyState::DecryptOnly, KeyState::Primary]);
    assert_eq!(rec.primary().unwrap(), &method_record("acme", 2));
    assert_eq!(rec.version(1).unwrap().wrapped, first.wrapped);

    // set_min_decrypt_version: 1..=latest, compare-and-set on the current value.
    store.set_min_decrypt_version(&t, 1, 2).await.unwrap();
    assert_eq!(
        store
            .load_tenant(&t)
            .await
            .unwrap()
            .unwrap()
            .min_decrypt_version,
        2
    );
    // A caller that read 1 (before the change above) loses, and changes nothing.
    let err = store.set_min_decrypt_version(&t, 1, 1).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("changed concurrently"), "{err}");
    assert_eq!(
        store
            .load_tenant(&t)
            .await
            .unwrap()
            .unwrap()
            .min_decrypt_version,
        2
    );
    store.set_min_decrypt_version(&t, 2, 1).await.unwrap();
    for bad in [0, 3, u32::MAX] {
        let err = store.set_min_decrypt_version(&t, 1, bad).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("out of range"), "{err}");
    }
    assert_eq!(
        store
            .load_tenant(&t)
            .await
            .unwrap()
            .unwrap()
            .min_decrypt_version,
        1
    );
    let err = store
        .set_min_decrypt_version(&tenant_id("nobody"), 1, 1)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other);
    assert!(err.to_string().contains("tenant not found"), "{err}");

    // replace_wrapped is a compare-and-set.
    let old = first.wrapped.clone().unwrap();
    let new = WrappedKey {
        root_key_ref: "test-2".into(),
        ciphertext: vec![9; 60],
    };
    store
        .replace_wrapped(&t, 1, &old, new.clone())
        .await
        .unwrap();
    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    assert_eq!(rec.version(1).unwrap().wrapped.as_ref(), Some(&new));
    assert_eq!(rec.version(1).unwrap().state, KeyState::DecryptOnly);
    let err = store
        .replace_wrapped(&t, 1, &old, new.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict, "{err}");
    // Same bytes, other reference: still a mismatch.
    let relabelled = WrappedKey {
        root_key_ref: "other".into(),
        ciphertext: new.ciphertext.clone(),
    };
    let err = store
        .replace_wrapped(&t, 1, &relabelled, old.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict, "{err}");
    let err = store
        .replace_wrapped(&t, 7, &old, new.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other, "{err}");
    assert!(err.to_string().contains("no version 7"), "{err}");
    let err = store
        .replace_wrapped(&tenant_id("nobody"), 1, &old, new.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tenant not found"), "{err}");

    // list_tenants is sorted by bytes, whatever the database's collation.
    for name in ["zeta", "beta", "Alpha", "acme-2"] {
        store
            .create_tenant(&tenant_id(name), method_record(name, 1))
            .await
            .unwrap();
    }
    let names: Vec<String> = store
        .list_tenants()
        .await
        .unwrap()
        .iter()
        .map(|t| t.as_str().to_owned())
        .collect();
    assert_eq!(names, ["Alpha", "acme", "acme-2", "beta", "zeta"]);

    store.load_tenant(&t).await.unwrap()
}

/// New records a store must refuse (InvalidData, nothing stored): a first version that is not
/// version 1, not primary, or without wrapped bytes; a rotation without wrapped bytes. Needs a
/// store without tenant `acme`.
pub async fn key_store_invalid_records(store: &dyn KeyStore) {
    let t = tenant_id("acme");
    let err = store
        .create_tenant(&t, method_record("acme", 2))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    let mut not_primary = method_record("acme", 1);
    not_primary.state = KeyState::DecryptOnly;
    let err = store.create_tenant(&t, not_primary).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    let mut no_wrapped = method_record("acme", 1);
    no_wrapped.wrapped = None;
    let err = store
        .create_tenant(&t, no_wrapped.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    assert!(store.load_tenant(&t).await.unwrap().is_none());

    store
        .create_tenant(&t, method_record("acme", 1))
        .await
        .unwrap();
    no_wrapped.version = 2;
    let err = store.insert_version(&t, 1, no_wrapped).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    assert_eq!(
        versions(&store.load_tenant(&t).await.unwrap().unwrap()),
        [1]
    );
}

/// Compare-and-set misses a store must report as Conflict and leave without effect: a stale
/// or future `expected_latest`, a next version that skips or repeats, `u32::MAX` (no
/// overflow), and an unknown tenant. Needs a store without tenants `acme` and `nobody`.
pub async fn key_store_stale_cas(store: &dyn KeyStore) {
    let t = tenant_id("acme");
    store
        .create_tenant(&t, method_record("acme", 1))
        .await
        .unwrap();
    store
        .insert_version(&t, 1, method_record("acme", 2))
        .await
        .unwrap();
    let before = store.load_tenant(&t).await.unwrap();

    // Stale expected_latest.
    let err = store
        .insert_version(&t, 1, method_record("acme", 2))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict);
    assert!(err.to_string().contains("rotated concurrently"), "{err}");
    // Right expected_latest, wrong next version (skips or repeats).
    for next in [2, 4, 1] {
        let err = store
            .insert_version(&t, 2, method_record("acme", next))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Conflict);
    }
    // Expected latest ahead of the store.
    let err = store
        .insert_version(&t, 5, method_record("acme", 6))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict);
    // Overflow of expected_latest + 1 does not panic.
    let err = store
        .insert_version(&t, u32::MAX, method_record("acme", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Conflict);
    assert_eq!(store.load_tenant(&t).await.unwrap(), before);

    // Unknown tenant.
    let err = store
        .insert_version(&tenant_id("nobody"), 0, method_record("nobody", 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tenant not found"), "{err}");
    assert!(
        store
            .load_tenant(&tenant_id("nobody"))
            .await
            .unwrap()
            .is_none()
    );
}
