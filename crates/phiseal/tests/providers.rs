//! Cross-checks between the two crypto providers: what one seals the other opens, for both
//! AEADs; HKDF, HMAC and SHA-256 give equal outputs; tampering fails on both.
//!
//! Inputs are random from a seeded RNG. The seed is printed; set `PHISEAL_TEST_SEED` to replay.
// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic
// here is a failing test, as in the other crates' integration tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use phiseal::crypto::{AeadAlgorithm, CryptoProvider, TAG_LEN, aws_lc, rust_crypto};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const PROVIDERS: [&CryptoProvider; 2] = [&aws_lc::PROVIDER, &rust_crypto::PROVIDER];
const SIZES: [usize; 10] = [0, 1, 15, 16, 17, 64, 1024, 4095, 4096, 65536];

fn rng(test: &str) -> StdRng {
    let seed = match std::env::var("PHISEAL_TEST_SEED") {
        Ok(s) => s.parse().expect("PHISEAL_TEST_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: PHISEAL_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

type AeadOf = fn(&CryptoProvider) -> &'static dyn AeadAlgorithm;

fn cross_check_aead(name: &str, aead_of: AeadOf, rng: &mut StdRng) {
    let nonce_len = aead_of(PROVIDERS[0]).nonce_len();
    for provider in PROVIDERS {
        assert_eq!(
            aead_of(provider).nonce_len(),
            nonce_len,
            "{name} [{}]",
            provider.name
        );
    }
    let mut checked = 0;
    for &size in &SIZES {
        for round in 0..4 {
            let key: [u8; 32] = bytes(rng, 32).try_into().unwrap();
            let nonce = bytes(rng, nonce_len);
            let aad_len = match round {
                0 => 0,
                _ => rng.random_range(1..=300),
            };
            let aad = bytes(rng, aad_len);
            let plaintext = bytes(rng, size);
            let what = format!("{name} size {size} aad {aad_len}");

            // Every provider seals to the same bytes (AEADs are deterministic given the nonce).
            let mut sealed = Vec::new();
            for provider in PROVIDERS {
                let k = aead_of(provider).key(&key).unwrap();
                let mut buf = plaintext.clone();
                let tag = k.seal(&nonce, &aad, &mut buf).unwrap();
                // The out-of-place seal (large fields) writes the same bytes and tag.
                let mut into = vec![0x5Au8; size];
                let into_tag = k.seal_into(&nonce, &aad, &plaintext, &mut into).unwrap();
                assert!(
                    into == buf && into_tag == tag,
                    "{what} [{}]: seal_into differs from seal",
                    provider.name
                );
                let mut short = vec![0u8; size + 1];
                assert!(
                    k.seal_into(&nonce, &aad, &plaintext, &mut short).is_err(),
                    "{what} [{}]: seal_into accepted an output of another length",
                    provider.name
                );
                // Short messages can encrypt to themselves by chance (1 in 256 for one byte).
                if size >= 16 {
                    assert_ne!(buf, plaintext, "{what} [{}]: not encrypted", provider.name);
                }
                sealed.push((provider.name, buf, tag));
            }
            let (_, ct, tag) = &sealed[0];
            for (pname, other_ct, other_tag) in &sealed[1..] {
                assert!(
                    other_ct == ct && other_tag == tag,
                    "{what}: {pname} seals differently"
                );
            }

            // Each opens what each sealed, and refuses anything altered.
            for (sealer, ct, tag) in &sealed {
                for opener in PROVIDERS {
                    let k = aead_of(opener).key(&key).unwrap();
                    let who = format!("{what}: sealed by {sealer}, opened by {}", opener.name);
                    let mut out = vec![0u8; ct.len()];
                    k.open(&nonce, &aad, ct, tag, &mut out)
                        .unwrap_or_else(|_| panic!("{who}: failed to open"));
                    assert!(out == plaintext, "{who}: wrong plaintext");

                    let refused = |nonce: &[u8], aad: &[u8], ct: &[u8], tag: &[u8], case: &str| {
                        let mut out = vec![0xA5u8; ct.len()];
                        assert!(
                            k.open(nonce, aad, ct, tag, &mut out).is_err(),
                            "{who}: {case} accepted"
                        );
                        assert!(
                            out.iter().all(|&b| b == 0),
                            "{who}: {case}: output not zeroed"
                        );
                    };
                    let mut bad_tag = *tag;
                    bad_tag[rng.random_range(0..TAG_LEN)] ^= 1 << rng.random_range(0..8);
                    refused(&nonce, &aad, ct, &bad_tag, "tampered tag");
                    if size > 0 {
                        let mut bad_ct = ct.clone();
                        bad_ct[rng.random_range(0..size)] ^= 0x80;
                        refused(&nonce, &aad, &bad_ct, tag, "tampered ciphertext");
                    }
                    let mut bad_nonce = nonce.clone();
                    bad_nonce[rng.random_range(0..nonce_len)] ^= 1;
                    refused(&bad_nonce, &aad, ct, tag, "other nonce");
                    let mut bad_aad = aad.clone();
                    match bad_aad.first_mut() {
                        Some(b) => *b ^= 1,
                        None => bad_aad.push(0),
                    }
                    refused(&nonce, &bad_aad, ct, tag, "other AAD");
                    let mut other_key = key;
                    other_key[31] ^= 1;
                    let mut out = vec![0u8; ct.len()];
                    assert!(
                        aead_of(opener)
                            .key(&other_key)
                            .unwrap()
                            .open(&nonce, &aad, ct, tag, &mut out)
                            .is_err(),
                        "{who}: other key accepted"
                    );
                }
            }
            checked += 1;
        }
    }

    // Wrong nonce and tag lengths are refused by every provider, never truncated or padded.
    for provider in PROVIDERS {
        let k = aead_of(provider).key(&[7u8; 32]).unwrap();
        for len in [0, 8, 11, 12, 13, 16, 23, 24, 25, 32] {
            if len == nonce_len {
                continue;
            }
            let nonce = vec![1u8; len];
            let mut buf = vec![2u8; 16];
            assert!(
                k.seal(&nonce, b"", &mut buf).is_err(),
                "{name} [{}]: sealed with a {len}-byte nonce",
                provider.name
            );
            let mut out = vec![0u8; 16];
            assert!(
                k.open(&nonce, b"", &buf, &[0u8; TAG_LEN], &mut out)
                    .is_err(),
                "{name} [{}]: opened with a {len}-byte nonce",
                provider.name
            );
        }
        let nonce = vec![1u8; nonce_len];
        let mut buf = vec![2u8; 16];
        let tag = k.seal(&nonce, b"", &mut buf).unwrap();
        for cut in [0, 1, 12, 15] {
            let mut out = vec![0u8; 16];
            assert!(
                k.open(&nonce, b"", &buf, &tag[..cut], &mut out).is_err(),
                "{name} [{}]: accepted a {cut}-byte tag",
                provider.name
            );
        }
    }
    eprintln!(
        "{name}: {checked} random messages cross-checked, sealed and opened by both providers"
    );
    assert_eq!(checked, SIZES.len() * 4);
}

#[test]
fn aes_256_gcm_cross_provider() {
    let mut rng = rng("aes_256_gcm_cross_provider");
    cross_check_aead("AES-256-GCM", |p| p.aes_256_gcm, &mut rng);
}

#[test]
fn xchacha20_poly1305_cross_provider() {
    let mut rng = rng("xchacha20_poly1305_cross_provider");
    cross_check_aead("XChaCha20-Poly1305", |p| p.xchacha20_poly1305, &mut rng);
}

#[test]
fn hkdf_hmac_sha256_agree() {
    let mut rng = rng("hkdf_hmac_sha256_agree");
    let [a, b] = PROVIDERS;
    let mut n = 0;
    for &size in &SIZES {
        // Key lengths around the SHA-256 block size (64): HMAC hashes longer keys first.
        for key_len in [0, 1, 32, 63, 64, 65, 200] {
            let key = bytes(&mut rng, key_len);
            let msg = bytes(&mut rng, size);
            let split = rng.random_range(0..=size);
            let (m1, m2) = msg.split_at(split);

            let mac = a.hmac_sha256.sign(&key, &[&msg]);
            assert_eq!(
                mac,
                b.hmac_sha256.sign(&key, &[&msg]),
                "HMAC key {key_len} msg {size}"
            );
            for p in PROVIDERS {
                assert_eq!(
                    mac,
                    p.hmac_sha256.sign(&key, &[m1, m2]),
                    "HMAC parts [{}]",
                    p.name
                );
                assert_eq!(
                    mac,
                    p.hmac_sha256.sign(&key, &[&[], &msg, &[]]),
                    "HMAC [{}]",
                    p.name
                );
            }

            let salt = bytes(&mut rng, key_len);
            let info = bytes(&mut rng, size.min(1024));
            let (i1, i2) = info.split_at(info.len() / 2);
            let okm = a.hkdf_sha256.derive(&msg, &salt, &[&info]);
            assert_eq!(
                *okm,
                *b.hkdf_sha256.derive(&msg, &salt, &[&info]),
                "HKDF ikm {size} salt {key_len}"
            );
            for p in PROVIDERS {
                assert_eq!(
                    *okm,
                    *p.hkdf_sha256.derive(&msg, &salt, &[i1, i2]),
                    "HKDF [{}]",
                    p.name
                );
            }
            n += 1;
        }

        let digest = a.sha256.digest(&[&bytes(&mut rng, 0)]);
        assert_eq!(digest, b.sha256.digest(&[]), "SHA-256 of nothing");
        let msg = bytes(&mut rng, size);
        let split = rng.random_range(0..=size);
        let (m1, m2) = msg.split_at(split);
        let digest = a.sha256.digest(&[&msg]);
        for p in PROVIDERS {
            assert_eq!(
                digest,
                p.sha256.digest(&[&msg]),
                "SHA-256 {size} [{}]",
                p.name
            );
            assert_eq!(
                digest,
                p.sha256.digest(&[m1, m2]),
                "SHA-256 parts [{}]",
                p.name
            );
        }
    }

    // Known answers, so that two providers agreeing on a wrong answer also fails.
    for p in PROVIDERS {
        // FIPS 180-2 appendix B.1 and the empty message.
        assert_eq!(
            hex::encode(p.sha256.digest(&[b"a", b"bc"])),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "[{}]",
            p.name
        );
        assert_eq!(
            hex::encode(p.sha256.digest(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "[{}]",
            p.name
        );
        // RFC 4231 test case 2.
        assert_eq!(
            hex::encode(
                p.hmac_sha256
                    .sign(b"Jefe", &[b"what do ya want ", b"for nothing?"])
            ),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            "[{}]",
            p.name
        );
        // RFC 5869 A.1 (first 32 of its 42 bytes).
        let okm = p.hkdf_sha256.derive(
            &[0x0b; 22],
            &hex::decode("000102030405060708090a0b0c").unwrap(),
            &[
                &hex::decode("f0f1f2f3f4").unwrap(),
                &hex::decode("f5f6f7f8f9").unwrap(),
            ],
        );
        assert_eq!(
            hex::encode(*okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf",
            "[{}]",
            p.name
        );
    }
    eprintln!("HKDF/HMAC/SHA-256: {n} random input sets agree across providers");
}
