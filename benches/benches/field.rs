//! Field encryption benchmarks. Every figure in docs/PERFORMANCE.md comes from this file.
//!
//! * `roundtrip/*`: encrypt + decrypt of one field per iteration, at 64 B, 1 KiB, 64 KiB and
//!   1 MiB: the bare aws-lc-rs and RustCrypto AES-256-GCM primitives (fixed nonce, no format,
//!   key set up once) next to the keyring with a cached key, audit off and on, per provider,
//!   and a `TenantKeyring` (`Keyring::tenant`: no per-call tenant lookup), default provider.
//! * `nonce_scheme/*`: the per-message cost of the two nonce-safe candidates at 64 B.
//! * `searchable/*`: deterministic encryption (AES-256-SIV) and blind indexes of a 64 B value
//!   through the keyring (aws-lc provider, audit off, key cached), next to the default
//!   randomized `Keyring::encrypt` of the same value and context as the baseline.
// Benchmark code with fixed, in-bounds inputs: panics here are harness bugs, not input handling.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::cipher::BlockEncrypt;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use phiseal::crypto::CryptoProvider;
use phiseal::{Actor, BlindIndexSpec, Caller, EncryptionContext, Keyring, Normalization};
use phiseal_audit_file::Durability;

const SIZES: [usize; 4] = [64, 1024, 64 * 1024, 1024 * 1024];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    keyring: Keyring,
    caller: Caller,
    context: EncryptionContext,
}

fn keyring(
    rt: &tokio::runtime::Runtime,
    provider: &'static CryptoProvider,
    audit: Option<Durability>,
) -> Setup {
    let dir = phiseal_benches::private_tempdir().unwrap();
    let options = phiseal_embedded::EmbeddedOptions {
        durability: audit.unwrap_or_default(),
        ..Default::default()
    };
    let mut builder = phiseal_embedded::builder(dir.path(), &options)
        .unwrap()
        .crypto_provider(provider);
    if audit.is_none() {
        builder = builder.danger_disable_audit();
    }
    let keyring = builder.build().unwrap();
    let caller = Caller::new(Actor::named("bench"));
    let context = phiseal_benches::field_context().unwrap();
    let tenant = context.tenant().clone();
    rt.block_on(async {
        keyring.create_tenant(&caller, &tenant).await.unwrap();
        // Warm the cache.
        let ct = keyring.encrypt(&caller, &context, b"warm").await.unwrap();
        keyring.decrypt(&caller, &context, &ct).await.unwrap();
    });
    Setup {
        _dir: dir,
        keyring,
        caller,
        context,
    }
}

fn roundtrip(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("roundtrip");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    let key = [7u8; 32];
    let nonce = [9u8; 12];
    let aad = b"tenant|field|record";

    let awslc = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    let rc = aes_gcm::Aes256Gcm::new(&key.into());

    let aws_lc = &phiseal::crypto::aws_lc::PROVIDER;
    let rust_crypto = &phiseal::crypto::rust_crypto::PROVIDER;
    // Each keyring is built inside its own benchmark, so that no other keyring (or audit
    // writer thread) is alive while it is measured.
    let configs: [(&str, &'static CryptoProvider, Option<Durability>); 6] = [
        ("keyring-aws-lc-audit-off", aws_lc, None),
        (
            "keyring-aws-lc-audit-interval",
            aws_lc,
            Some(Durability::default()),
        ),
        (
            "keyring-aws-lc-audit-buffered",
            aws_lc,
            Some(Durability::buffered()),
        ),
        ("keyring-rust-crypto-audit-off", rust_crypto, None),
        (
            "keyring-rust-crypto-audit-interval",
            rust_crypto,
            Some(Durability::default()),
        ),
        (
            "keyring-rust-crypto-audit-buffered",
            rust_crypto,
            Some(Durability::buffered()),
        ),
    ];

    for size in SIZES {
        let plaintext = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::new("bare-aws-lc", size),
            &plaintext,
            |b, pt| {
                let mut buf = pt.clone();
                b.iter(|| {
                    let n = Nonce::assume_unique_for_key(nonce);
                    let tag = awslc
                        .seal_in_place_separate_tag(n, Aad::from(aad), &mut buf)
                        .unwrap();
                    let mut out = vec![0u8; buf.len()];
                    let n = Nonce::assume_unique_for_key(nonce);
                    awslc
                        .open_separate_gather(n, Aad::from(aad), &buf, tag.as_ref(), &mut out)
                        .unwrap();
                    black_box(&out);
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("bare-rust-crypto", size),
            &plaintext,
            |b, pt| {
                let mut buf = pt.clone();
                b.iter(|| {
                    let tag = rc
                        .encrypt_in_place_detached(&nonce.into(), aad, &mut buf)
                        .unwrap();
                    let mut out = buf.clone();
                    rc.decrypt_in_place_detached(&nonce.into(), aad, &mut out, &tag)
                        .unwrap();
                    black_box(&out);
                })
            },
        );
        for (name, provider, audit) in configs {
            group.bench_with_input(BenchmarkId::new(name, size), &plaintext, |b, pt| {
                let setup = keyring(&rt, provider, audit);
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let k = &setup.keyring;
                            let ct = k.encrypt(&setup.caller, &setup.context, pt).await.unwrap();
                            let back = k.decrypt(&setup.caller, &setup.context, &ct).await.unwrap();
                            black_box(&back);
                        }
                        start.elapsed()
                    })
                });
                rt.block_on(setup.keyring.flush_audit()).unwrap();
            });
        }
        // The same through a `TenantKeyring` (no per-call tenant lookup), default provider.
        for (name, audit) in [
            ("tenant-keyring-aws-lc-audit-off", None),
            (
                "tenant-keyring-aws-lc-audit-buffered",
                Some(Durability::buffered()),
            ),
        ] {
            group.bench_with_input(BenchmarkId::new(name, size), &plaintext, |b, pt| {
                let setup = keyring(&rt, aws_lc, audit);
                let handle = setup.keyring.tenant(setup.context.tenant());
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let ct = handle
                                .encrypt(&setup.caller, &setup.context, pt)
                                .await
                                .unwrap();
                            let back = handle
                                .decrypt(&setup.caller, &setup.context, &ct)
                                .await
                                .unwrap();
                            black_box(&back);
                        }
                        start.elapsed()
                    })
                });
                rt.block_on(setup.keyring.flush_audit()).unwrap();
            });
        }
    }
    group.finish();
}

/// XAES-256-GCM's per-message key derivation (C2SP): two AES-256 block encryptions with the
/// long-lived key, then a fresh AES-256-GCM key for the message. A cost model for the
/// comparison, not a verified implementation (the scheme was not chosen).
fn xaes_message_key(aes: &aes::Aes256, k1: &[u8; 16], nonce: &[u8; 24]) -> LessSafeKey {
    let mut m1 = [0u8; 16];
    let mut m2 = [0u8; 16];
    m1[..4].copy_from_slice(&[0, 1, b'X', 0]);
    m2[..4].copy_from_slice(&[0, 2, b'X', 0]);
    m1[4..].copy_from_slice(&nonce[..12]);
    m2[4..].copy_from_slice(&nonce[..12]);
    for i in 0..16 {
        m1[i] ^= k1[i];
        m2[i] ^= k1[i];
    }
    let mut b1 = m1.into();
    let mut b2 = m2.into();
    aes.encrypt_block(&mut b1);
    aes.encrypt_block(&mut b2);
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&b1);
    key[16..].copy_from_slice(&b2);
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap())
}

fn nonce_scheme(c: &mut Criterion) {
    let mut group = c.benchmark_group("nonce_scheme");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    let key = [3u8; 32];
    let aad = b"header|tenant|field|record";
    let pt = [0x5au8; 64];
    let provider = &phiseal::crypto::aws_lc::PROVIDER;

    // Baseline: one AES-256-GCM key set up once.
    let fixed = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    group.bench_function("bare-aes-256-gcm-encrypt-64B", |b| {
        b.iter(|| {
            let mut buf = pt;
            let n = Nonce::assume_unique_for_key([1u8; 12]);
            black_box(
                fixed
                    .seal_in_place_separate_tag(n, Aad::from(aad), &mut buf)
                    .unwrap()
                    .as_ref()
                    .len(),
            );
        })
    });

    // Chosen: HKDF subkey per epoch (cached), nonce = epoch prefix ‖ shared atomic counter.
    let subkey = provider.hkdf_sha256.derive(&key, &[1u8; 10], &[b"info"]);
    let epoch = provider.aes_256_gcm.key(&subkey).unwrap();
    let counter = std::sync::atomic::AtomicU64::new(0);
    group.bench_function("hkdf-epoch-subkey-encrypt-64B", |b| {
        b.iter(|| {
            let mut buf = pt;
            let mut nonce = [7u8; 12];
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            nonce[4..].copy_from_slice(&n.to_be_bytes());
            black_box(epoch.seal(&nonce, aad, &mut buf).unwrap());
        })
    });

    // Rejected: XAES-256-GCM, a key derivation and key setup per message.
    let aes = aes::Aes256::new(&key.into());
    let mut l = [0u8; 16].into();
    aes.encrypt_block(&mut l);
    let l: [u8; 16] = l.into();
    let mut k1 = [0u8; 16];
    let msb = l[0] >> 7;
    for i in 0..16 {
        k1[i] = (l[i] << 1) | if i < 15 { l[i + 1] >> 7 } else { 0 };
    }
    k1[15] ^= 0x87 * msb;
    group.bench_function("xaes-256-gcm-encrypt-64B", |b| {
        b.iter(|| {
            let mut buf = pt;
            let mut nonce = [0u8; 24];
            rand_nonce(&mut nonce);
            let message_key = xaes_message_key(&aes, &k1, &nonce);
            let mut n = [0u8; 12];
            n.copy_from_slice(&nonce[12..]);
            let n = Nonce::assume_unique_for_key(n);
            black_box(
                message_key
                    .seal_in_place_separate_tag(n, Aad::from(aad), &mut buf)
                    .unwrap()
                    .as_ref()
                    .len(),
            );
        })
    });

    // Rejected: HKDF per message without caching.
    group.bench_function("hkdf-per-message-encrypt-64B", |b| {
        b.iter(|| {
            let mut buf = pt;
            let mut salt = [0u8; 22];
            rand_nonce(&mut salt);
            let sk = provider.hkdf_sha256.derive(&key, &salt[..10], &[b"info"]);
            let k = provider.aes_256_gcm.key(&sk).unwrap();
            black_box(k.seal(&salt[10..], aad, &mut buf).unwrap());
        })
    });
    group.finish();
}

fn rand_nonce(out: &mut [u8]) {
    use rand::RngCore;
    rand::rng().fill_bytes(out);
}

/// Searchable fields at 64 B (one operation per iteration, audit off, tenant key cached; the
/// context has no record id, as deterministic encryption and blind indexes require).
fn searchable(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("searchable");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    let setup = keyring(&rt, &phiseal::crypto::aws_lc::PROVIDER, None);
    let k = &setup.keyring;
    let caller = &setup.caller;
    let cx = setup.context.without_record();
    let value: Vec<u8> = (0..64u8).map(|i| b'A' + i % 26).collect();
    let exact = BlindIndexSpec::new(Normalization::Exact, 256).unwrap();
    let folded = BlindIndexSpec::new(Normalization::CaseFolded, 64).unwrap();
    // Warm the per-field derived keys.
    rt.block_on(async {
        k.encrypt_deterministic(caller, &cx, &value).await.unwrap();
        k.blind_index(caller, &cx, &value, &exact).await.unwrap();
    });
    // Runs `op` `iters` times inside one `block_on`.
    macro_rules! bench_async {
        ($name:expr, |$i:ident| $op:expr) => {
            group.bench_function($name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for $i in 0..iters {
                            black_box($op.await.unwrap());
                        }
                        start.elapsed()
                    })
                })
            });
        };
    }
    // The primitives alone, for the breakdown: AES-256-SIV with its key set up per call (as
    // the keyring does) and HMAC-SHA256 keyed per call through the provider.
    group.bench_function("bare-aes-256-siv-64B", |b| {
        use aes_siv::KeyInit as _;
        let key = [7u8; 64];
        let aad = [0x11u8; 16];
        b.iter(|| {
            let mut siv = aes_siv::siv::Aes256Siv::new(&key.into());
            let mut buf = value.clone();
            let tag = siv.encrypt_in_place_detached([&aad[..]], &mut buf).unwrap();
            black_box((tag, buf))
        })
    });
    group.bench_function("bare-hmac-sha256-64B", |b| {
        let hmac = phiseal::crypto::aws_lc::PROVIDER.hmac_sha256;
        let key = [7u8; 32];
        b.iter(|| black_box(hmac.sign(&key, &[&[1, 1, 0], &value])))
    });
    bench_async!("encrypt-default-64B", |_i| k.encrypt(caller, &cx, &value));
    bench_async!("encrypt-deterministic-64B", |_i| k
        .encrypt_deterministic(caller, &cx, &value));
    bench_async!("blind-index-exact-256bit-64B", |_i| k
        .blind_index(caller, &cx, &value, &exact));
    bench_async!("blind-index-case-folded-64bit-64B", |_i| k
        .blind_index(caller, &cx, &value, &folded));
    // 200 fields round-robin through the 64-entry per-version cache: every call derives its
    // field key (one HKDF), the worst case of the bounded cache.
    let many: Vec<EncryptionContext> = (0..200)
        .map(|i| EncryptionContext::new(cx.tenant().clone(), format!("field-{i}")).unwrap())
        .collect();
    bench_async!("blind-index-exact-256bit-64B-field-key-miss", |i| k
        .blind_index(caller, &many[(i % 200) as usize], &value, &exact));
    bench_async!("encrypt-deterministic-64B-field-key-miss", |i| k
        .encrypt_deterministic(caller, &many[(i % 200) as usize], &value));
    // A query after one rotation: two live versions, two values.
    rt.block_on(async {
        k.rotate(caller, cx.tenant()).await.unwrap();
        k.deterministic_query(caller, &cx, &value).await.unwrap();
        k.blind_index_query(caller, &cx, &value, &exact)
            .await
            .unwrap();
    });
    bench_async!("deterministic-query-2-versions-64B", |_i| k
        .deterministic_query(caller, &cx, &value));
    bench_async!("blind-index-query-2-versions-64B", |_i| k
        .blind_index_query(caller, &cx, &value, &exact));
    group.finish();
}

criterion_group!(benches, nonce_scheme, roundtrip, searchable);
criterion_main!(benches);
