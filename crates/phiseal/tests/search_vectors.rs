//! Known-answer vectors of searchable fields: `test-vectors/aes-256-siv.json` (deterministic
//! encryption, algorithm 0x03, positive and negative cases) and `test-vectors/blind-index.json`
//! (blind indexes, positive and refused cases), written by `test-vectors/generate.py` with
//! Python's `cryptography` (`AESSIV`, HMAC) from `docs/FORMAT.md` §3.3 and §9. phiseal must
//! reproduce every case byte for byte, on both crypto providers where the provider is used.
// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic
// here is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::{Path, PathBuf};

use phiseal::crypto::{CryptoProvider, aws_lc, rust_crypto};
use phiseal::format::{self, Algorithm};
use phiseal::{
    BlindIndexSpec, EncryptionContext, Error, FormatError, Normalization, TenantId, TenantKey,
    testkit,
};
use serde_json::Value;

const PROVIDERS: [&CryptoProvider; 2] = [&aws_lc::PROVIDER, &rust_crypto::PROVIDER];

fn load(name: &str) -> Value {
    let path: PathBuf = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap())
        .join("../../test-vectors")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{name}: invalid JSON: {e}"))
}

fn s<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key]
        .as_str()
        .unwrap_or_else(|| panic!("field {key:?} missing or not a string in {case}"))
}

fn hex_of(case: &Value, key: &str) -> Vec<u8> {
    hex::decode(s(case, key)).unwrap_or_else(|e| panic!("field {key:?} is not hex: {e}"))
}

fn key_of(case: &Value) -> TenantKey {
    TenantKey::from_slice(&hex_of(case, "tenant_key")).unwrap()
}

fn context_of(case: &Value) -> EncryptionContext {
    let c = &case["context"];
    let ctx =
        EncryptionContext::new(TenantId::new(s(c, "tenant")).unwrap(), s(c, "field")).unwrap();
    match c.get("record") {
        None | Some(Value::Null) => ctx,
        Some(Value::String(r)) => ctx.with_record(r).unwrap(),
        Some(other) => panic!("context.record must be a string or null, got {other}"),
    }
}

fn cases<'a>(doc: &'a Value, key: &str) -> &'a Vec<Value> {
    doc[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` must be an array"))
}

fn error_name(e: &Error) -> String {
    match e {
        Error::DecryptionFailed => "decryption_failed".into(),
        Error::Format(FormatError::Truncated { .. }) => "truncated".into(),
        Error::InvalidInput { .. } => "invalid_input".into(),
        other => format!("unexpected error: {other:?}"),
    }
}

#[test]
fn aes_256_siv_vectors() {
    let file = "aes-256-siv.json";
    let doc = load(file);
    assert_eq!(doc["algorithm"].as_u64(), Some(3), "{file}: algorithm");
    let mut n = 0;
    for case in cases(&doc, "cases") {
        let name = s(case, "name");
        let key = key_of(case);
        let version = u32::try_from(case["key_version"].as_u64().unwrap()).unwrap();
        let ctx = context_of(case);
        let plaintext = hex_of(case, "plaintext");
        let expected = hex_of(case, "ciphertext");
        assert_eq!(
            expected.len(),
            Algorithm::Aes256Siv.overhead() + plaintext.len(),
            "{file}#{name}: length"
        );
        assert_eq!(
            &expected[..6],
            &[
                1,
                3,
                (version >> 24) as u8,
                (version >> 16) as u8,
                (version >> 8) as u8,
                version as u8
            ],
            "{file}#{name}: header"
        );
        let aad = hex_of(case, "aad");
        let mut spec_aad = expected[..6].to_vec();
        spec_aad.extend(common::context_encoding(&ctx));
        assert_eq!(
            hex::encode(&aad),
            hex::encode(&spec_aad),
            "{file}#{name}: aad = header ‖ context (FORMAT.md §4)"
        );
        for provider in PROVIDERS {
            let sealed =
                testkit::seal_deterministic(provider, &key, version, &ctx, &plaintext).unwrap();
            assert_eq!(
                hex::encode(&sealed),
                hex::encode(&expected),
                "{file}#{name} [{}]: seal",
                provider.name
            );
            // Deterministic: sealing again gives the same bytes.
            assert_eq!(
                testkit::seal_deterministic(provider, &key, version, &ctx, &plaintext).unwrap(),
                sealed
            );
        }
        assert_eq!(format::to_text(&expected), s(case, "text"), "{file}#{name}");
        assert_eq!(
            format::from_text(s(case, "text")).unwrap(),
            expected,
            "{file}#{name}"
        );
        // The debugging aid `siv_key` (64 bytes): the providers' HKDF emits 32 bytes, which
        // are the first HKDF-Expand block and so the first half of the 64-byte output; the
        // second half is the second block, T2 = HMAC(PRK, T1 ‖ info ‖ 0x02) (RFC 5869), with
        // PRK = HMAC(32 zero bytes, tenant key) for the empty salt.
        let siv_key = hex_of(case, "siv_key");
        assert_eq!(siv_key.len(), 64, "{file}#{name}: siv_key length");
        let mut info = b"phiseal v1 aes-256-siv key".to_vec();
        info.push(ctx.field().len() as u8);
        info.extend_from_slice(ctx.field().as_bytes());
        for provider in PROVIDERS {
            // HKDF-Expand's first block does not depend on L: the 32-byte output is the prefix.
            let first = provider.hkdf_sha256.derive(key.expose(), &[], &[&info]);
            assert_eq!(
                &first[..],
                &siv_key[..32],
                "{file}#{name} [{}]: siv_key",
                provider.name
            );
            let prk = provider.hmac_sha256.sign(&[0u8; 32], &[key.expose()]);
            let second = provider
                .hmac_sha256
                .sign(&prk, &[&first[..], &info, &[0x02]]);
            assert_eq!(
                &second[..],
                &siv_key[32..],
                "{file}#{name} [{}]: siv_key, second half",
                provider.name
            );
            let opened = testkit::open(provider, &key, &ctx, &expected).unwrap();
            assert_eq!(
                hex::encode(&opened[..]),
                hex::encode(&plaintext),
                "{file}#{name} [{}]: open",
                provider.name
            );
        }
        n += 1;
    }
    let listed: Vec<&str> = cases(&doc, "expect_values")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, ["decryption_failed", "truncated"], "{file}");
    let mut negative = 0;
    for case in cases(&doc, "negative_cases") {
        let name = s(case, "name");
        let expect = s(case, "expect");
        assert!(listed.contains(&expect), "{file}#{name}: expect {expect}");
        let key = key_of(case);
        let ctx = context_of(case);
        let ct = hex_of(case, "ciphertext");
        for provider in PROVIDERS {
            match testkit::open(provider, &key, &ctx, &ct) {
                Ok(_) => panic!("{file}#{name}: decrypted, but must fail with {expect}"),
                Err(e) => assert_eq!(error_name(&e), expect, "{file}#{name}: {e}"),
            }
        }
        negative += 1;
    }
    assert!(n >= 10 && negative >= 10, "{file}: too few cases");
    eprintln!("{file}: {n} positive and {negative} negative cases passed");
}

fn spec_of(case: &Value) -> Result<BlindIndexSpec, Error> {
    let norm = Normalization::from_name(s(case, "normalization"))
        .unwrap_or_else(|| panic!("unknown normalization in {case}"));
    let bits = u32::try_from(case["bits"].as_u64().unwrap()).unwrap();
    BlindIndexSpec::new(norm, bits)
}

#[test]
fn blind_index_vectors() {
    let file = "blind-index.json";
    let doc = load(file);
    let ids = doc["normalizations"].as_object().unwrap();
    for norm in [
        Normalization::Exact,
        Normalization::CaseFolded,
        Normalization::DigitsOnly,
    ] {
        assert_eq!(
            ids[norm.name()].as_u64(),
            Some(u64::from(norm.id())),
            "{file}: id of {}",
            norm.name()
        );
    }
    let mut n = 0;
    for case in cases(&doc, "cases") {
        let name = s(case, "name");
        let key = key_of(case);
        let ctx = context_of(case);
        let spec = spec_of(case).unwrap();
        let value = hex_of(case, "value");
        let expected = hex_of(case, "index");
        assert_eq!(expected.len(), spec.len_bytes(), "{file}#{name}: length");
        let mut info = b"phiseal v1 blind-index key".to_vec();
        info.push(ctx.field().len() as u8);
        info.extend_from_slice(ctx.field().as_bytes());
        let mac_input = hex_of(case, "mac_input");
        assert_eq!(mac_input[0], spec.normalization().id(), "{file}#{name}");
        assert_eq!(
            u32::from(u16::from_be_bytes([mac_input[1], mac_input[2]])),
            spec.bits(),
            "{file}#{name}"
        );
        assert_eq!(
            &mac_input[3..],
            &hex_of(case, "normalized")[..],
            "{file}#{name}"
        );
        for provider in PROVIDERS {
            let pname = provider.name;
            let index = testkit::blind_index(provider, &key, &ctx, &spec, &value).unwrap();
            assert_eq!(
                hex::encode(&index),
                hex::encode(&expected),
                "{file}#{name} [{pname}]: index"
            );
            let index_key = provider.hkdf_sha256.derive(key.expose(), &[], &[&info]);
            assert_eq!(
                hex::encode(&index_key[..]),
                s(case, "index_key"),
                "{file}#{name} [{pname}]: index_key"
            );
            let mac = provider
                .hmac_sha256
                .sign(index_key.as_slice(), &[&mac_input]);
            assert_eq!(
                &mac[..spec.len_bytes()],
                &expected[..],
                "{file}#{name} [{pname}]: HMAC of mac_input"
            );
        }
        n += 1;
    }
    let mut invalid = 0;
    for case in cases(&doc, "invalid_cases") {
        let name = s(case, "name");
        assert_eq!(s(case, "expect"), "invalid_input", "{file}#{name}");
        let key = key_of(case);
        let ctx = context_of(case);
        let value = hex_of(case, "value");
        let result = spec_of(case).and_then(|spec| {
            testkit::blind_index(&rust_crypto::PROVIDER, &key, &ctx, &spec, &value)
        });
        match result {
            Ok(_) => panic!("{file}#{name}: computed, but must be refused"),
            Err(e) => assert_eq!(error_name(&e), "invalid_input", "{file}#{name}: {e}"),
        }
        invalid += 1;
    }
    assert!(n >= 15 && invalid >= 5, "{file}: too few cases");
    eprintln!("{file}: {n} positive and {invalid} refused cases passed");
}
