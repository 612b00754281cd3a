//! Known-answer vectors for streams (`test-vectors/stream.json`, written by
//! `test-vectors/generate.py`, an independent Python implementation of `docs/FORMAT.md` §10):
//! both crypto providers must reproduce every stream byte for byte and decrypt it under any
//! chunking, and every negative case must fail with exactly the expected error.
// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic
// here is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;

use phiseal::crypto::{CryptoProvider, aws_lc, rust_crypto};
use phiseal::stream::{
    STREAM_HEADER_LEN, StreamDecryptor, StreamEncryptor, StreamHeader, StreamOptions,
};
use phiseal::{EncryptionContext, Error, FormatError, TenantId, TenantKey};
use serde_json::Value;

const PROVIDERS: [&CryptoProvider; 2] = [&aws_lc::PROVIDER, &rust_crypto::PROVIDER];

/// Chunk sizes the decryptor is fed with (1 byte, odd sizes, whole segments, everything).
const CHUNKS: [usize; 5] = [1, 61, 4096, 4112, usize::MAX];

const EXPECT_VALUES: [&str; 6] = [
    "decryption_failed",
    "truncated",
    "unknown_version",
    "unknown_algorithm",
    "zero_key_version",
    "bad_segment_size",
];

fn load() -> Value {
    let path = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap())
        .join("../../test-vectors/stream.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn hex_field(case: &Value, key: &str) -> Vec<u8> {
    hex::decode(
        case[key]
            .as_str()
            .unwrap_or_else(|| panic!("missing {key}")),
    )
    .unwrap()
}

fn context(case: &Value) -> EncryptionContext {
    let c = &case["context"];
    let cx = EncryptionContext::new(
        TenantId::new(c["tenant"].as_str().unwrap()).unwrap(),
        c["field"].as_str().unwrap(),
    )
    .unwrap();
    match c["record"].as_str() {
        Some(r) => cx.with_record(r).unwrap(),
        None => cx,
    }
}

fn tenant_key(case: &Value) -> TenantKey {
    TenantKey::from_slice(&hex_field(case, "tenant_key")).unwrap()
}

/// The whole reader: header, decryptor, chunks, finish.
fn decrypt(
    provider: &'static CryptoProvider,
    key: &TenantKey,
    cx: &EncryptionContext,
    stream: &[u8],
    chunk: usize,
) -> Result<Vec<u8>, Error> {
    let header = StreamHeader::parse(stream)?;
    let mut d = StreamDecryptor::new(provider, key, cx, &header)?;
    let mut out = Vec::new();
    for piece in stream[STREAM_HEADER_LEN..].chunks(chunk) {
        d.push(piece, &mut out)?;
    }
    d.finish(&mut out)?;
    Ok(out)
}

fn error_name(e: &Error) -> String {
    match e {
        Error::DecryptionFailed => "decryption_failed".into(),
        Error::Format(FormatError::Truncated { .. }) => "truncated".into(),
        Error::Format(FormatError::UnknownVersion(_)) => "unknown_version".into(),
        Error::Format(FormatError::UnknownAlgorithm(_)) => "unknown_algorithm".into(),
        Error::Format(FormatError::ZeroKeyVersion) => "zero_key_version".into(),
        Error::Format(FormatError::BadSegmentSize(_)) => "bad_segment_size".into(),
        other => format!("unexpected error {other:?}"),
    }
}

#[test]
fn positive_streams_are_reproduced_and_decrypt() {
    let doc = load();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let key = tenant_key(case);
        let cx = context(case);
        let plaintext = hex_field(case, "plaintext");
        let expected = hex_field(case, "stream");
        let salt: [u8; 32] = hex_field(case, "salt").try_into().unwrap();
        let prefix: [u8; 7] = hex_field(case, "nonce_prefix").try_into().unwrap();
        let options = StreamOptions {
            segment_size: u32::try_from(case["segment_size"].as_u64().unwrap()).unwrap(),
        };
        let version = u32::try_from(case["key_version"].as_u64().unwrap()).unwrap();
        for provider in PROVIDERS {
            // Encrypt, fed in odd-sized chunks: the output does not depend on the chunking.
            for chunk in [1, 1000, usize::MAX] {
                let mut e = StreamEncryptor::with_fixed_randomness(
                    provider, &key, version, &cx, options, salt, prefix,
                )
                .unwrap();
                let mut out = Vec::new();
                for piece in plaintext.chunks(chunk) {
                    e.push(piece, &mut out).unwrap();
                }
                let summary = e.finish(&mut out).unwrap();
                assert!(out == expected, "{name}: {} stream differs", provider.name);
                assert_eq!(
                    summary.segments,
                    case["segments"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    out[..STREAM_HEADER_LEN],
                    hex_field(case, "header")[..],
                    "{name}"
                );
            }
            for chunk in CHUNKS {
                let back = decrypt(provider, &key, &cx, &expected, chunk)
                    .unwrap_or_else(|e| panic!("{name}: {} fails: {e}", provider.name));
                assert!(back == plaintext, "{name}: plaintext differs");
            }
        }
    }
}

#[test]
fn negative_streams_fail_with_the_expected_error() {
    let doc = load();
    let expect_values: Vec<&str> = doc["expect_values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(expect_values, EXPECT_VALUES);
    let cases = doc["negative"].as_array().unwrap();
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let expect = case["expect"].as_str().unwrap();
        assert!(EXPECT_VALUES.contains(&expect), "{name}: unknown {expect}");
        let key = tenant_key(case);
        let cx = context(case);
        let stream = hex_field(case, "stream");
        for provider in PROVIDERS {
            for chunk in CHUNKS {
                let got = decrypt(provider, &key, &cx, &stream, chunk);
                match got {
                    Ok(_) => panic!("{name}: decrypts ({}, chunk {chunk})", provider.name),
                    Err(e) => assert_eq!(
                        error_name(&e),
                        expect,
                        "{name} ({}, chunk {chunk})",
                        provider.name
                    ),
                }
            }
        }
        *seen.entry(expect).or_default() += 1;
    }
    for expect in EXPECT_VALUES {
        assert!(
            seen.contains_key(expect),
            "no negative case expects {expect}"
        );
    }
    eprintln!("stream.json negative cases by error: {seen:?}");
}
