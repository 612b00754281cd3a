//! Streaming benchmarks (docs/PERFORMANCE.md, "Streaming"): 1 MiB through the STREAM segments
//! of `phiseal::stream` next to the plain AEAD — one-shot AES-256-GCM of the same 1 MiB buffer
//! with the same provider, key set up once — in the same run.
//!
//! * `stream/<provider>/bare-aead-{seal,open}`: the baseline (copy into the output buffer, then
//!   seal in place / open into a buffer; no format, no key derivation).
//! * `stream/<provider>/{encrypt,decrypt}-<S>`: `StreamEncryptor` / `StreamDecryptor` with
//!   segment size S, a new stream (OS salt, HKDF, key setup) per iteration, whole buffer
//!   pushed at once.
//! * `stream/aws-lc/keyring-{encrypt,decrypt}_stream`: `Keyring::encrypt_stream` /
//!   `decrypt_stream` from a slice into a `Vec` (embedded default, key cached, audit off).
//!
//! The 1 GiB figures come from `benches/examples/stream_1gib.rs` (wall time, constant memory).
// Benchmark code with fixed, in-bounds inputs: panics here are harness bugs, not input handling.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use phiseal::crypto::{CryptoProvider, aws_lc, rust_crypto};
use phiseal::stream::{StreamDecryptor, StreamEncryptor, StreamHeader, StreamOptions};
use phiseal::{Actor, Caller, EncryptionContext, TenantId, TenantKey};

const SIZE: usize = 1024 * 1024;

fn context() -> EncryptionContext {
    EncryptionContext::new(TenantId::new("bench-tenant").unwrap(), "archive")
        .unwrap()
        .with_record("doc-000042")
        .unwrap()
}

fn encrypt(
    provider: &'static CryptoProvider,
    key: &TenantKey,
    cx: &EncryptionContext,
    options: StreamOptions,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) {
    out.clear();
    let mut e = StreamEncryptor::new(provider, key, 1, cx, options).unwrap();
    e.push(plaintext, out).unwrap();
    e.finish(out).unwrap();
}

fn streams(c: &mut Criterion) {
    let plaintext: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let key = TenantKey::from_bytes([7; 32]);
    let cx = context();
    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Bytes(SIZE as u64));
    for provider in [&aws_lc::PROVIDER, &rust_crypto::PROVIDER] {
        let name = provider.name;
        // Baseline: one-shot AES-256-GCM of the same buffer, same provider.
        let aead = provider.aes_256_gcm.key(&[9; 32]).unwrap();
        let nonce = [3u8; 12];
        let mut out = Vec::with_capacity(SIZE + 1024);
        group.bench_function(format!("{name}/bare-aead-seal"), |b| {
            b.iter(|| {
                out.clear();
                out.extend_from_slice(black_box(&plaintext));
                let tag = aead.seal(&nonce, b"", &mut out).unwrap();
                out.extend_from_slice(&tag);
                black_box(&out);
            })
        });
        let mut sealed = plaintext.clone();
        let tag = aead.seal(&nonce, b"", &mut sealed).unwrap();
        let mut opened = vec![0u8; SIZE];
        group.bench_function(format!("{name}/bare-aead-open"), |b| {
            b.iter(|| {
                aead.open(&nonce, b"", black_box(&sealed), &tag, &mut opened)
                    .unwrap();
                black_box(&opened);
            })
        });
        for segment_size in [64 * 1024, 4 * 1024] {
            let options = StreamOptions { segment_size };
            let label = segment_size / 1024;
            group.bench_function(format!("{name}/encrypt-{label}k"), |b| {
                b.iter(|| {
                    encrypt(
                        provider,
                        &key,
                        &cx,
                        options,
                        black_box(&plaintext),
                        &mut out,
                    )
                })
            });
            let mut stream = Vec::new();
            encrypt(provider, &key, &cx, options, &plaintext, &mut stream);
            let header = StreamHeader::parse(&stream).unwrap();
            let body = &stream[phiseal::stream::STREAM_HEADER_LEN..];
            let mut plain = Vec::with_capacity(SIZE);
            group.bench_function(format!("{name}/decrypt-{label}k"), |b| {
                b.iter(|| {
                    plain.clear();
                    let mut d = StreamDecryptor::new(provider, &key, &cx, &header).unwrap();
                    d.push(black_box(body), &mut plain).unwrap();
                    d.finish(&mut plain).unwrap();
                    black_box(&plain);
                })
            });
        }
    }

    // Through the keyring (embedded default, audit off, key cached), aws-lc.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = phiseal_benches::private_tempdir().unwrap();
    let keyring = phiseal_benches::keyring_audit_off(dir.path()).unwrap();
    let caller = Caller::new(Actor::named("bench"));
    rt.block_on(keyring.create_tenant(&caller, cx.tenant()))
        .unwrap();
    let mut stream = Vec::with_capacity(SIZE + 1024);
    rt.block_on(keyring.encrypt_stream(&caller, &cx, &plaintext[..], &mut stream))
        .unwrap();
    let mut out = Vec::with_capacity(SIZE + 1024);
    group.bench_function("aws-lc-rs/keyring-encrypt_stream", |b| {
        b.iter(|| {
            out.clear();
            rt.block_on(keyring.encrypt_stream(&caller, &cx, black_box(&plaintext[..]), &mut out))
                .unwrap();
        })
    });
    group.bench_function("aws-lc-rs/keyring-decrypt_stream", |b| {
        b.iter(|| {
            out.clear();
            rt.block_on(keyring.decrypt_stream(&caller, &cx, black_box(&stream[..]), &mut out))
                .unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, streams);
criterion_main!(benches);
