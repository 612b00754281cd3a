//! Known-answer vectors: every `*.json` in `test-vectors/` (written by `test-vectors/generate.py`,
//! an independent Python implementation of `docs/FORMAT.md`) must be reproduced byte for byte by
//! both crypto providers, and every negative case must fail with exactly the expected error.
// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic
// here is a failing test, as in the other crates' integration tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use phiseal::crypto::{CryptoProvider, aws_lc, rust_crypto};
use phiseal::format::{self, Algorithm};
use phiseal::{EncryptionContext, Error, FormatError, TenantId, TenantKey, testkit};
use serde_json::Value;

const PROVIDERS: [&CryptoProvider; 2] = [&aws_lc::PROVIDER, &rust_crypto::PROVIDER];

/// The files this test understands, and what each holds. A file not listed here fails the test,
/// and so does a listed file that is missing.
const KNOWN_FILES: [(&str, Kind); 6] = [
    (
        "aes-256-gcm-hkdf.json",
        Kind::Positive(Algorithm::Aes256GcmHkdf),
    ),
    (
        "xchacha20-poly1305.json",
        Kind::Positive(Algorithm::XChaCha20Poly1305),
    ),
    ("negative.json", Kind::Negative),
    (
        "aes-256-siv.json",
        Kind::CheckedElsewhere("tests/search_vectors.rs"),
    ),
    (
        "blind-index.json",
        Kind::CheckedElsewhere("tests/search_vectors.rs"),
    ),
    (
        "stream.json",
        Kind::CheckedElsewhere("tests/stream_vectors.rs"),
    ),
];

/// The `expect` values of `negative.json`.
const EXPECT_VALUES: [&str; 7] = [
    "decryption_failed",
    "truncated",
    "unknown_version",
    "unknown_algorithm",
    "zero_key_version",
    "bad_text_prefix",
    "bad_base64",
];

const AES_SUBKEY_INFO: &[u8] = b"phiseal v1 aes-256-gcm-hkdf subkey";
const XCHACHA_KEY_INFO: &[u8] = b"phiseal v1 xchacha20-poly1305 key";

#[derive(Clone, Copy, Debug)]
enum Kind {
    Positive(Algorithm),
    Negative,
    /// A file with its own consumer (named), which checks every case.
    CheckedElsewhere(&'static str),
}

fn vectors_dir() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../../test-vectors")
}

fn str_field<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key]
        .as_str()
        .unwrap_or_else(|| panic!("field {key:?} missing or not a string in {case}"))
}

fn hex_field(case: &Value, key: &str) -> Vec<u8> {
    hex::decode(str_field(case, key)).unwrap_or_else(|e| panic!("field {key:?} is not hex: {e}"))
}

fn tenant_key(case: &Value) -> TenantKey {
    TenantKey::from_slice(&hex_field(case, "tenant_key")).expect("tenant_key must be 32 bytes")
}

fn context(case: &Value) -> EncryptionContext {
    let c = &case["context"];
    let tenant = TenantId::new(str_field(c, "tenant")).unwrap();
    let ctx = EncryptionContext::new(tenant, str_field(c, "field")).unwrap();
    match &c["record"] {
        Value::Null => ctx,
        Value::String(r) => ctx.with_record(r).unwrap(),
        other => panic!("context.record must be a string or null, got {other}"),
    }
}

fn cases(doc: &Value) -> &Vec<Value> {
    doc["cases"].as_array().expect("`cases` must be an array")
}

/// The stable name of an error, in the vocabulary of `negative.json`.
fn error_name(e: &Error) -> String {
    match e {
        Error::DecryptionFailed => "decryption_failed".into(),
        Error::Format(FormatError::Truncated { .. }) => "truncated".into(),
        Error::Format(FormatError::UnknownVersion(_)) => "unknown_version".into(),
        Error::Format(FormatError::UnknownAlgorithm(_)) => "unknown_algorithm".into(),
        Error::Format(FormatError::ZeroKeyVersion) => "zero_key_version".into(),
        Error::Format(FormatError::BadTextPrefix) => "bad_text_prefix".into(),
        Error::Format(FormatError::BadBase64) => "bad_base64".into(),
        other => format!("unexpected error: {other:?}"),
    }
}

fn check_positive(doc: &Value, algorithm: Algorithm, file: &str) -> usize {
    assert_eq!(
        doc["algorithm"].as_u64(),
        Some(u64::from(algorithm.id())),
        "{file}: `algorithm` does not match the file name"
    );
    let mut n = 0;
    for case in cases(doc) {
        let name = str_field(case, "name");
        let key = tenant_key(case);
        let key_version = u32::try_from(case["key_version"].as_u64().unwrap()).unwrap();
        let nonce_material = hex_field(case, "nonce_material");
        let plaintext = hex_field(case, "plaintext");
        let expected = hex_field(case, "ciphertext");
        let text = str_field(case, "text");
        let aad = hex_field(case, "aad");
        let ctx = context(case);
        assert_eq!(
            expected.len(),
            algorithm.overhead() + plaintext.len(),
            "{file}#{name}: ciphertext length"
        );
        let header = &expected[..algorithm.header_len()];
        assert_eq!(header[0], 0x01, "{file}#{name}: format version byte");
        assert_eq!(header[1], algorithm.id(), "{file}#{name}: algorithm byte");
        assert_eq!(
            u32::from_be_bytes(header[2..6].try_into().unwrap()),
            key_version,
            "{file}#{name}: key version bytes"
        );
        assert_eq!(
            &header[6..],
            &nonce_material[..],
            "{file}#{name}: nonce material"
        );
        let mut spec_aad = header.to_vec();
        spec_aad.extend(common::context_encoding(&ctx));
        assert_eq!(
            hex::encode(&aad),
            hex::encode(&spec_aad),
            "{file}#{name}: aad = header ‖ context (FORMAT.md §4)"
        );

        assert_eq!(
            hex::encode(format::from_text(text).unwrap()),
            hex::encode(&expected),
            "{file}#{name}: from_text"
        );
        assert_eq!(format::to_text(&expected), text, "{file}#{name}: to_text");

        for provider in PROVIDERS {
            let pname = provider.name;
            let sealed = testkit::seal_with_nonce(
                provider,
                &key,
                algorithm,
                key_version,
                &nonce_material,
                &ctx,
                &plaintext,
            )
            .unwrap();
            assert_eq!(
                hex::encode(&sealed),
                hex::encode(&expected),
                "{file}#{name} [{pname}]: seal_with_nonce"
            );
            let opened = testkit::open(provider, &key, &ctx, &expected).unwrap();
            assert_eq!(
                hex::encode(&opened[..]),
                hex::encode(&plaintext),
                "{file}#{name} [{pname}]: open"
            );

            // The debugging aids in the file (derived key, AAD) must be right too: decrypt the
            // body with the raw primitive, the derived key and the given AAD.
            let (derived, nonce, aead) = match algorithm {
                Algorithm::Aes256GcmHkdf => (
                    hex_field(case, "subkey"),
                    &nonce_material[10..],
                    provider.aes_256_gcm,
                ),
                Algorithm::XChaCha20Poly1305 => (
                    hex_field(case, "xkey"),
                    &nonce_material[..],
                    provider.xchacha20_poly1305,
                ),
                other => panic!("no vectors for {other:?}"),
            };
            let (salt, info): (&[u8], &[u8]) = match algorithm {
                Algorithm::Aes256GcmHkdf => (&nonce_material[..10], AES_SUBKEY_INFO),
                _ => (&[], XCHACHA_KEY_INFO),
            };
            let recomputed = provider.hkdf_sha256.derive(key.expose(), salt, &[info]);
            assert_eq!(
                &recomputed[..],
                &derived[..],
                "{file}#{name} [{pname}]: derived key"
            );
            let body = &expected[algorithm.header_len()..expected.len() - 16];
            let tag = &expected[expected.len() - 16..];
            let mut out = vec![0u8; body.len()];
            aead.key(&derived.clone().try_into().unwrap())
                .unwrap()
                .open(nonce, &aad, body, tag, &mut out)
                .unwrap_or_else(|_| panic!("{file}#{name} [{pname}]: raw open with `aad`"));
            assert_eq!(
                hex::encode(&out),
                hex::encode(&plaintext),
                "{file}#{name} [{pname}]: raw open"
            );
        }
        n += 1;
    }
    n
}

fn check_negative(doc: &Value, file: &str) -> usize {
    let listed: Vec<&str> = doc["expect_values"]
        .as_array()
        .expect("`expect_values` must be an array")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, EXPECT_VALUES, "{file}: expect_values");
    let mut per_expect: BTreeMap<&str, usize> = BTreeMap::new();
    for case in cases(doc) {
        let name = str_field(case, "name");
        let expect = str_field(case, "expect");
        assert!(
            EXPECT_VALUES.contains(&expect),
            "{file}#{name}: unknown expect value {expect:?}"
        );
        let key = tenant_key(case);
        let ctx = context(case);
        let binary: Result<Vec<u8>, FormatError> = match (case.get("ciphertext"), case.get("text"))
        {
            (Some(_), None) => Ok(hex_field(case, "ciphertext")),
            (None, Some(_)) => format::from_text(str_field(case, "text")),
            _ => panic!("{file}#{name}: needs exactly one of `ciphertext` and `text`"),
        };
        for provider in PROVIDERS {
            let result = match &binary {
                Ok(b) => testkit::open(provider, &key, &ctx, b),
                Err(e) => Err(Error::Format(e.clone())),
            };
            match result {
                Ok(_) => panic!(
                    "{file}#{name} [{}]: decrypted, but must fail with {expect}",
                    provider.name
                ),
                Err(e) => assert_eq!(
                    error_name(&e),
                    expect,
                    "{file}#{name} [{}]: wrong error ({e})",
                    provider.name
                ),
            }
        }
        *per_expect.entry(expect).or_default() += 1;
    }
    for expect in EXPECT_VALUES {
        assert!(
            per_expect.get(expect).copied().unwrap_or(0) > 0,
            "{file}: no case expects {expect}"
        );
    }
    eprintln!("{file}: by expected error {per_expect:?}");
    per_expect.values().sum()
}

#[test]
fn every_vector_file() {
    let dir = vectors_dir();
    let mut seen = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    for path in entries {
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        let (_, kind) = KNOWN_FILES
            .iter()
            .find(|(name, _)| *name == file)
            .unwrap_or_else(|| panic!("unrecognised vector file {file}: add it to KNOWN_FILES"));
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{file}: invalid JSON: {e}"));
        let n = match *kind {
            Kind::Positive(algorithm) => check_positive(&doc, algorithm, &file),
            Kind::Negative => check_negative(&doc, &file),
            Kind::CheckedElsewhere(test) => {
                eprintln!("{file}: checked by {test}");
                seen.push(file);
                continue;
            }
        };
        assert!(n > 0, "{file}: no cases");
        eprintln!("{file}: {n} cases passed on both providers");
        seen.push(file);
    }
    for (name, _) in KNOWN_FILES {
        assert!(
            seen.iter().any(|s| s == name),
            "vector file {name} is missing"
        );
    }
}
