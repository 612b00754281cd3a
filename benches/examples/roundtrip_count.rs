//! Runs a fixed number of 64-byte encrypt + decrypt round trips, for instruction counting
//! under `valgrind --tool=callgrind` (repeatable on this noisy host, where the criterion
//! timings of `benches/field.rs` vary by ±10 % between runs): the bare aws-lc-rs AES-256-GCM
//! primitive as `roundtrip/bare-aws-lc` measures it, `Keyring::encrypt` + `decrypt`, or a
//! `TenantKeyring`'s, on the embedded default with the audit log off and the key cached.
//!
//! ```text
//! cargo build --release -p phiseal-benches --example roundtrip_count
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \
//!     target/release/examples/roundtrip_count handle 100000
//! ```
//! Arguments: `bare`, `keyring` or `handle`, then the number of round trips (default 100 000).
//! Run it twice with different counts and divide the difference of the totals by the
//! difference of the counts for the instructions of one round trip, without the set-up.
// Example code with fixed, in-bounds inputs: panics here are harness bugs. It prints results.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::hint::black_box;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use phiseal::{Actor, Caller};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "handle".into());
    let count: u64 = args.next().map_or(100_000, |n| n.parse().expect("a count"));
    let plaintext = [0x5au8; 64];
    match mode.as_str() {
        "bare" => bare(count, &plaintext),
        "keyring" | "handle" => keyring(&mode, count, &plaintext),
        other => panic!("unknown mode {other:?}: bare, keyring or handle"),
    }
    println!("{mode}: {count} round trips of 64 B");
}

/// `roundtrip/bare-aws-lc/64`: fixed nonce, no format, key set up once.
fn bare(count: u64, plaintext: &[u8]) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let nonce = [9u8; 12];
    let aad = b"tenant|field|record";
    let mut buf = plaintext.to_vec();
    for _ in 0..count {
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .unwrap();
        let mut out = vec![0u8; buf.len()];
        key.open_separate_gather(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &buf,
            tag.as_ref(),
            &mut out,
        )
        .unwrap();
        black_box(&out);
    }
}

/// `roundtrip/keyring-aws-lc-audit-off/64` or `roundtrip/tenant-keyring-aws-lc-audit-off/64`.
fn keyring(mode: &str, count: u64, plaintext: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = phiseal_benches::private_tempdir().unwrap();
    let keyring = phiseal_benches::keyring_audit_off(dir.path()).unwrap();
    let caller = Caller::new(Actor::named("bench"));
    let context = phiseal_benches::field_context().unwrap();
    let tenant = context.tenant().clone();
    let handle = keyring.tenant(&tenant);
    rt.block_on(async {
        keyring.create_tenant(&caller, &tenant).await.unwrap();
        let ct = handle.encrypt(&caller, &context, b"warm").await.unwrap();
        handle.decrypt(&caller, &context, &ct).await.unwrap();
        for _ in 0..count {
            if mode == "handle" {
                let ct = handle.encrypt(&caller, &context, plaintext).await.unwrap();
                black_box(handle.decrypt(&caller, &context, &ct).await.unwrap());
            } else {
                let ct = keyring.encrypt(&caller, &context, plaintext).await.unwrap();
                black_box(keyring.decrypt(&caller, &context, &ct).await.unwrap());
            }
        }
    });
}
