//! End-to-end tests of searchable fields (deterministic encryption and blind indexes) on the
//! embedded default (local KMS, SQLite store, file audit log): equality properties, tenant and
//! field separation, record ids refused, decrypt and rewrap of 0x03, queries across a
//! rotation and after a minimum decryption version, normalisation and bits validation, audit.

// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic in
// a test helper is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;

use phiseal::format::{self, Algorithm};
use phiseal::{
    Actor, BlindIndexSpec, Caller, EncryptionContext, Error, Keyring, Normalization, Profile,
    SearchTerm, TenantId,
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
    Caller::new(Actor::named("search-tests"))
}

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

fn ctx(t: &str, field: &str) -> EncryptionContext {
    EncryptionContext::new(tenant(t), field).unwrap()
}

fn open(dir: &Path) -> Keyring {
    phiseal_embedded::open(dir, &EmbeddedOptions::default()).unwrap()
}

fn spec(n: Normalization, bits: u32) -> BlindIndexSpec {
    BlindIndexSpec::new(n, bits).unwrap()
}

fn versions(terms: &[SearchTerm]) -> Vec<u32> {
    terms.iter().map(|t| t.key_version).collect()
}

async fn setup(tenants: &[&str]) -> (tempfile::TempDir, Keyring, Caller) {
    let dir = private_tempdir();
    let k = open(dir.path());
    let c = caller();
    for t in tenants {
        k.create_tenant(&c, &tenant(t)).await.unwrap();
    }
    (dir, k, c)
}

#[tokio::test]
async fn deterministic_equality_and_separation() {
    let (_dir, k, c) = setup(&["acme", "globex"]).await;
    let ssn = ctx("acme", "ssn");
    let a = k
        .encrypt_deterministic(&c, &ssn, b"078051120")
        .await
        .unwrap();
    let b = k
        .encrypt_deterministic(&c, &ssn, b"078051120")
        .await
        .unwrap();
    assert_eq!(a, b, "same tenant, field, version and plaintext");
    let parsed = format::parse(&a).unwrap();
    assert_eq!(parsed.algorithm, Algorithm::Aes256Siv);
    assert_eq!(parsed.key_version, 1);
    assert_eq!(a.len(), 22 + 9);
    let others = [
        k.encrypt_deterministic(&c, &ssn, b"078051121")
            .await
            .unwrap(),
        k.encrypt_deterministic(&c, &ctx("acme", "mrn"), b"078051120")
            .await
            .unwrap(),
        k.encrypt_deterministic(&c, &ctx("globex", "ssn"), b"078051120")
            .await
            .unwrap(),
    ];
    for o in &others {
        assert_ne!(a[6..22], o[6..22], "unrelated SIVs");
        assert_ne!(a[22..], o[22..], "unrelated ciphertexts");
    }
    // The randomized default stays randomized.
    let r1 = k.encrypt(&c, &ssn, b"078051120").await.unwrap();
    let r2 = k.encrypt(&c, &ssn, b"078051120").await.unwrap();
    assert_ne!(r1, r2);
    // Keyring::decrypt dispatches on the algorithm id; the context is authenticated.
    assert_eq!(&k.decrypt(&c, &ssn, &a).await.unwrap()[..], b"078051120");
    for wrong in [ctx("acme", "mrn"), ctx("globex", "ssn")] {
        assert!(matches!(
            k.decrypt(&c, &wrong, &a).await,
            Err(Error::DecryptionFailed)
        ));
    }
    let with_record = ssn.clone().with_record("patient-1").unwrap();
    assert!(matches!(
        k.decrypt(&c, &with_record, &a).await,
        Err(Error::DecryptionFailed)
    ));
    // Empty plaintexts are allowed (RFC 5297), and text form works as for other algorithms.
    let empty = k.encrypt_deterministic(&c, &ssn, b"").await.unwrap();
    assert_eq!(empty.len(), 22);
    assert!(k.decrypt(&c, &ssn, &empty).await.unwrap().is_empty());
    let text = format::to_text(&a);
    assert_eq!(format::from_text(&text).unwrap(), a);
}

#[tokio::test]
async fn record_ids_are_refused() {
    let (_dir, k, c) = setup(&["t"]).await;
    let cx = ctx("t", "ssn").with_record("patient-1").unwrap();
    let spec = spec(Normalization::Exact, 64);
    let refused = |e: Error| match e {
        Error::InvalidInput { what, reason } => {
            assert_eq!(what, "encryption context");
            assert!(reason.contains("record id"), "{reason}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    refused(k.encrypt_deterministic(&c, &cx, b"x").await.unwrap_err());
    refused(k.deterministic_query(&c, &cx, b"x").await.unwrap_err());
    refused(k.blind_index(&c, &cx, b"x", &spec).await.unwrap_err());
    refused(k.blind_index_query(&c, &cx, b"x", &spec).await.unwrap_err());
}

#[tokio::test]
async fn rewrap_keeps_deterministic_ciphertexts_deterministic() {
    let (_dir, k, c) = setup(&["t"]).await;
    let cx = ctx("t", "ssn");
    let v1 = k
        .encrypt_deterministic(&c, &cx, b"078051120")
        .await
        .unwrap();
    // Already under the primary version: unchanged.
    assert_eq!(k.rewrap(&c, &cx, &v1).await.unwrap(), v1);
    assert_eq!(k.rotate(&c, &tenant("t")).await.unwrap(), 2);
    let moved = k.rewrap(&c, &cx, &v1).await.unwrap();
    let parsed = format::parse(&moved).unwrap();
    assert_eq!(
        parsed.algorithm,
        Algorithm::Aes256Siv,
        "not the default algorithm"
    );
    assert_eq!(parsed.key_version, 2);
    // Equal to a fresh deterministic encryption under v2: the column stays searchable.
    assert_eq!(
        moved,
        k.encrypt_deterministic(&c, &cx, b"078051120")
            .await
            .unwrap()
    );
    assert_eq!(&k.decrypt(&c, &cx, &moved).await.unwrap()[..], b"078051120");
    // Batches dispatch the same way; a randomized ciphertext stays randomized.
    let randomized = k.encrypt(&c, &cx, b"078051120").await.unwrap();
    let items: Vec<(&EncryptionContext, &[u8])> = vec![(&cx, &v1), (&cx, &randomized)];
    let out = k.rewrap_batch(&c, &items).await.unwrap();
    assert_eq!(out[0].as_ref().unwrap(), &moved);
    assert_eq!(
        format::parse(out[1].as_ref().unwrap()).unwrap().algorithm,
        Algorithm::Aes256GcmHkdf
    );
}

#[tokio::test]
async fn searchable_values_are_found_across_a_rotation() {
    let (_dir, k, c) = setup(&["t"]).await;
    let t = tenant("t");
    let cx = ctx("t", "ssn");
    let bi = spec(Normalization::DigitsOnly, 32);
    // Written under v1.
    let stored_ct = k
        .encrypt_deterministic(&c, &cx, b"078051120")
        .await
        .unwrap();
    let stored_ix = k.blind_index(&c, &cx, b"078-05-1120", &bi).await.unwrap();
    assert_eq!(stored_ix.key_version, 1);
    assert_eq!(stored_ix.value.len(), 4);
    // Before the rotation: one term each, equal to the stored values.
    let q = k.deterministic_query(&c, &cx, b"078051120").await.unwrap();
    assert_eq!(versions(&q), [1]);
    assert_eq!(q[0].value, stored_ct);
    let q = k
        .blind_index_query(&c, &cx, b"078051120", &bi)
        .await
        .unwrap();
    assert_eq!(q, std::slice::from_ref(&stored_ix));

    k.rotate(&c, &t).await.unwrap();
    k.rotate(&c, &t).await.unwrap();
    // Writes use the primary (v3); queries return v3, v2, v1, primary first.
    let new_ct = k
        .encrypt_deterministic(&c, &cx, b"078051120")
        .await
        .unwrap();
    assert_eq!(format::parse(&new_ct).unwrap().key_version, 3);
    let new_ix = k.blind_index(&c, &cx, b"078051120", &bi).await.unwrap();
    assert_eq!(new_ix.key_version, 3);
    assert_ne!(new_ix.value, stored_ix.value);
    let q = k.deterministic_query(&c, &cx, b"078051120").await.unwrap();
    assert_eq!(versions(&q), [3, 2, 1]);
    assert!(q.iter().any(|term| term.value == stored_ct), "v1 row found");
    assert!(q.iter().any(|term| term.value == new_ct), "v3 row found");
    for term in &q {
        assert_eq!(
            format::parse(&term.value).unwrap().key_version,
            term.key_version
        );
    }
    let q = k
        .blind_index_query(&c, &cx, b"078 05 1120", &bi)
        .await
        .unwrap();
    assert_eq!(versions(&q), [3, 2, 1]);
    assert!(q.contains(&stored_ix) && q.contains(&new_ix));

    // Retire v1 and v2: they disappear from queries (and v1 values no longer decrypt).
    k.set_min_decrypt_version(&c, &t, 3).await.unwrap();
    let q = k.deterministic_query(&c, &cx, b"078051120").await.unwrap();
    assert_eq!(versions(&q), [3]);
    assert_eq!(q[0].value, new_ct);
    let q = k
        .blind_index_query(&c, &cx, b"078051120", &bi)
        .await
        .unwrap();
    assert_eq!(q, [new_ix]);
    assert!(matches!(
        k.decrypt(&c, &cx, &stored_ct).await,
        Err(Error::KeyVersionRetired { .. })
    ));
    // Lowering the minimum brings v2 back (v2 live again, v1 still retired).
    let lower = phiseal::MinVersionGuard::default().allow_lower(true);
    k.set_min_decrypt_version_with(&c, &t, 2, lower)
        .await
        .unwrap();
    let q = k.deterministic_query(&c, &cx, b"078051120").await.unwrap();
    assert_eq!(versions(&q), [3, 2]);
}

#[tokio::test]
async fn shredded_tenants_answer_nothing() {
    let (_dir, k, c) = setup(&["t"]).await;
    let cx = ctx("t", "ssn");
    let bi = spec(Normalization::Exact, 64);
    k.encrypt_deterministic(&c, &cx, b"x").await.unwrap();
    k.shred(&c, &tenant("t")).await.unwrap();
    assert!(matches!(
        k.encrypt_deterministic(&c, &cx, b"x").await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        k.deterministic_query(&c, &cx, b"x").await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        k.blind_index(&c, &cx, b"x", &bi).await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        k.blind_index_query(&c, &cx, b"x", &bi).await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        k.blind_index(&c, &ctx("nobody", "ssn"), b"x", &bi).await,
        Err(Error::TenantNotFound { .. })
    ));
}

#[tokio::test]
async fn normalisations_and_bits() {
    let (_dir, k, c) = setup(&["acme", "globex"]).await;
    let name = ctx("acme", "last_name");
    let ix = |v: &'static [u8], s: BlindIndexSpec| {
        let k = k.clone();
        let c = c.clone();
        let name = name.clone();
        async move { k.blind_index(&c, &name, v, &s).await }
    };
    let folded = spec(Normalization::CaseFolded, 64);
    let exact = spec(Normalization::Exact, 64);
    let digits = spec(Normalization::DigitsOnly, 64);
    assert_eq!(
        ix("ZOË SMITH".as_bytes(), folded).await.unwrap(),
        ix("zoë smith".as_bytes(), folded).await.unwrap()
    );
    assert_ne!(
        ix("ZOË SMITH".as_bytes(), exact).await.unwrap(),
        ix("zoë smith".as_bytes(), exact).await.unwrap()
    );
    // Not case folding, not Unicode normalisation, whitespace kept.
    assert_ne!(
        ix("STRASSE".as_bytes(), folded).await.unwrap(),
        ix("straße".as_bytes(), folded).await.unwrap()
    );
    assert_ne!(
        ix("Zo\u{eb}".as_bytes(), folded).await.unwrap(),
        ix("Zoe\u{308}".as_bytes(), folded).await.unwrap()
    );
    assert_ne!(
        ix(b"smith", folded).await.unwrap(),
        ix(b"smith ", folded).await.unwrap()
    );
    assert!(matches!(
        ix(b"\xffsmith", folded).await,
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(
        ix(b"078-05-1120", digits).await.unwrap(),
        ix(b"078051120", digits).await.unwrap()
    );
    for no_digits in [&b""[..], b"n/a", "٣".as_bytes()] {
        assert!(matches!(
            ix(no_digits, digits).await,
            Err(Error::InvalidInput { .. })
        ));
    }
    // The spec is part of the index: normalisations and lengths are unrelated.
    let full = ix(b"078051120", spec(Normalization::DigitsOnly, 256))
        .await
        .unwrap();
    let short = ix(b"078051120", spec(Normalization::DigitsOnly, 16))
        .await
        .unwrap();
    assert_eq!((full.value.len(), short.value.len()), (32, 2));
    assert_ne!(full.value[..2], short.value[..]);
    assert_ne!(
        ix(b"078051120", exact).await.unwrap(),
        ix(b"078051120", digits).await.unwrap()
    );
    // Tenants and fields are separated.
    let other_tenant = k
        .blind_index(&c, &ctx("globex", "last_name"), b"smith", &exact)
        .await
        .unwrap();
    let other_field = k
        .blind_index(&c, &ctx("acme", "first_name"), b"smith", &exact)
        .await
        .unwrap();
    let mine = ix(b"smith", exact).await.unwrap();
    assert_ne!(mine.value, other_tenant.value);
    assert_ne!(mine.value, other_field.value);
    // Bits validation.
    for bad in [0, 8, 12, 20, 264] {
        assert!(matches!(
            BlindIndexSpec::new(Normalization::Exact, bad),
            Err(Error::InvalidInput { .. })
        ));
    }
}

#[tokio::test]
async fn the_default_algorithm_cannot_be_deterministic() {
    let dir = private_tempdir();
    let parts = phiseal_embedded::open_parts(dir.path(), &EmbeddedOptions::default()).unwrap();
    let refused = Keyring::builder()
        .profile(Profile::Development)
        .kms(parts.kms)
        .key_store(parts.store)
        .audit(parts.audit)
        .algorithm(Algorithm::Aes256Siv)
        .build();
    assert!(
        matches!(&refused, Err(Error::Config(m)) if m.contains("randomized")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn searches_are_audited_without_plaintext() {
    let dir = private_tempdir();
    let c = Caller::with_request_id(Actor::named("svc-search"), "req-s");
    {
        let k = open(dir.path());
        let t = tenant("t");
        k.create_tenant(&c, &t).await.unwrap();
        let cx = ctx("t", "ssn");
        let bi = spec(Normalization::DigitsOnly, 32);
        k.encrypt_deterministic(&c, &cx, b"PLAINTEXT-078051120")
            .await
            .unwrap();
        k.blind_index(&c, &cx, b"PLAINTEXT-078051120", &bi)
            .await
            .unwrap();
        k.rotate(&c, &t).await.unwrap();
        k.deterministic_query(&c, &cx, b"PLAINTEXT-078051120")
            .await
            .unwrap();
        k.blind_index_query(&c, &cx, b"PLAINTEXT-078051120", &bi)
            .await
            .unwrap();
        let _ = k
            .encrypt_deterministic(&c, &cx.clone().with_record("r").unwrap(), b"PLAINTEXT-x")
            .await;
        k.flush_audit().await.unwrap();
    }
    let log = EmbeddedPaths::new(dir.path()).audit_log;
    let report = phiseal_audit_file::verify(&log).unwrap();
    assert!(report.is_intact(), "{report:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    // Not as text, nor encoded as hex or base64 (standard or URL-safe, at any alignment).
    for value in ["PLAINTEXT", "078051120"] {
        use base64::Engine as _;
        let mut forms = vec![
            value.to_owned(),
            hex::encode(value),
            hex::encode_upper(value),
        ];
        for skip in 0..3 {
            // A base64 run of a value inside longer bytes starts at one of three alignments;
            // the middle of each encoding (whole 3-byte groups) is what would show.
            let bytes = &value.as_bytes()[skip..];
            let whole = bytes.len() / 3 * 3;
            for engine in [
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                forms.push(engine.encode(&bytes[..whole]));
            }
        }
        for form in forms {
            assert!(
                !text.contains(&form),
                "the audit log contains {form} ({value})"
            );
        }
    }
    // One line per record (the records of one batch call share a log line): the export.
    let mut out = Vec::new();
    phiseal_audit_file::export_tenant(&log, "t", None, None, &mut out).unwrap();
    let records = String::from_utf8(out).unwrap();
    let lines =
        |needle: &str| -> Vec<&str> { records.lines().filter(|l| l.contains(needle)).collect() };
    let det = lines(r#""action":"encrypt_deterministic""#);
    assert_eq!(det.len(), 2, "one ok, one refused");
    assert!(det[0].contains(r#""result":"ok""#) && det[0].contains(r#""key_version":1"#));
    assert!(det[1].contains(r#""result":"invalid_input""#) && det[1].contains(r#""record":"r""#));
    let bi = lines(r#""action":"blind_index""#);
    assert_eq!(bi.len(), 1);
    assert!(bi[0].contains(r#""field":"ssn""#) && bi[0].contains(r#""tenant":"t""#));
    // One record per key version used by a query, primary first.
    for action in ["deterministic_query", "blind_index_query"] {
        let q = lines(&format!(r#""action":"{action}""#));
        assert_eq!(q.len(), 2, "{action}");
        assert!(q[0].contains(r#""key_version":2"#) && q[1].contains(r#""key_version":1"#));
        assert!(
            q.iter()
                .all(|l| l.contains(r#""result":"ok""#) && l.contains(r#""key_source":"#))
        );
    }
    assert!(
        text.lines()
            .skip(1)
            .all(|l| l.contains(r#""request_id":"req-s""#))
    );
}
