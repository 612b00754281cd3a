//! Streams 1 GiB (generated on the fly, never stored) through the keyring's streaming API —
//! `Keyring::encrypt_stream` into an in-memory pipe, `Keyring::decrypt_stream` out of it, in
//! the same task set on one thread — and prints peak RSS (`VmHWM`) before and after, to show
//! that memory stays constant whatever the size. Then, in the same process, times the plain
//! AEAD baseline: one-shot AES-256-GCM seal and open of a 1 GiB buffer with the same provider
//! (which needs the whole buffer in memory: see the RSS it leaves).
//!
//! ```text
//! cargo run --release -p phiseal-benches --example stream_1gib            # 1 GiB, aws-lc
//! cargo run --release -p phiseal-benches --example stream_1gib -- 256 rust-crypto
//! ```
//! Arguments: size in MiB (default 1024), provider (`aws-lc` or `rust-crypto`), `--no-baseline`.
// Example code with fixed, in-bounds inputs: panics here are harness bugs. It prints results.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::print_stdout
)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use phiseal::crypto::{CryptoProvider, aws_lc, rust_crypto};
use phiseal::{Actor, Caller, EncryptionContext, TenantId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const MIB: u64 = 1024 * 1024;

/// `VmHWM` (peak resident set size) and `VmRSS` of this process, in KiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn print_memory(label: &str) {
    let (hwm, rss) = memory();
    println!(
        "{label:<44} VmHWM {:>8.1} MiB   VmRSS {:>8.1} MiB",
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0
    );
}

/// The plaintext byte at offset `i`: cheap to generate and to check.
fn pattern_block() -> Vec<u8> {
    (0..64 * 1024).map(|i: usize| (i * 7 % 251) as u8).collect()
}

/// A position in the endlessly repeated pattern.
struct Pattern {
    block: Vec<u8>,
    offset: usize,
}

impl Pattern {
    fn new() -> Self {
        Self {
            block: pattern_block(),
            offset: 0,
        }
    }

    /// The next bytes of the pattern, at most `max` (fewer at the end of a block), and moves on.
    fn take(&mut self, max: usize) -> &[u8] {
        let start = self.offset;
        let n = max.min(self.block.len() - start);
        self.offset = (start + n) % self.block.len();
        &self.block[start..start + n]
    }
}

/// An `AsyncRead` yielding `remaining` bytes of the pattern.
struct Generator {
    pattern: Pattern,
    remaining: u64,
}

impl Generator {
    fn new(remaining: u64) -> Self {
        Self {
            pattern: Pattern::new(),
            remaining,
        }
    }
}

impl AsyncRead for Generator {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let max = (buf.remaining() as u64).min(this.remaining) as usize;
        let chunk = this.pattern.take(max);
        buf.put_slice(chunk);
        this.remaining -= chunk.len() as u64;
        Poll::Ready(Ok(()))
    }
}

/// An `AsyncWrite` that checks what it receives against the pattern and counts it.
struct Verifier {
    pattern: Pattern,
    seen: u64,
}

impl AsyncWrite for Verifier {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let mut rest = buf;
        while !rest.is_empty() {
            let expected = this.pattern.take(rest.len());
            let n = expected.len();
            assert!(
                rest[..n] == *expected,
                "plaintext mismatch at {}",
                this.seen
            );
            this.seen += n as u64;
            rest = &rest[n..];
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn rate(bytes: u64, secs: f64) -> String {
    format!("{:>8.1} MB/s", bytes as f64 / secs / 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(1024);
    let provider: &'static CryptoProvider = if args.iter().any(|a| a == "rust-crypto") {
        &rust_crypto::PROVIDER
    } else {
        &aws_lc::PROVIDER
    };
    let baseline = !args.iter().any(|a| a == "--no-baseline");
    let size = mib * MIB;
    println!("size {mib} MiB, provider {}", provider.name);
    print_memory("start");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = phiseal_benches::private_tempdir().unwrap();
    // The embedded default with its file audit log on (one record per stream).
    let keyring = phiseal_embedded::builder(dir.path(), &Default::default())
        .unwrap()
        .crypto_provider(provider)
        .build()
        .unwrap();
    let caller = Caller::new(Actor::named("stream-1gib"));
    let tenant = TenantId::new("big-tenant").unwrap();
    let context = EncryptionContext::new(tenant.clone(), "archive")
        .unwrap()
        .with_record("export-2026-11")
        .unwrap();
    rt.block_on(keyring.create_tenant(&caller, &tenant))
        .unwrap();
    print_memory("keyring ready");

    // 1. Encrypt only, into a sink.
    let start = Instant::now();
    let summary = rt
        .block_on(keyring.encrypt_stream(
            &caller,
            &context,
            Generator::new(size),
            tokio::io::sink(),
        ))
        .unwrap();
    let encrypt_secs = start.elapsed().as_secs_f64();
    println!(
        "encrypt_stream -> sink: {} segments, {} ciphertext bytes, {:.3} s, {}",
        summary.segments,
        summary.ciphertext_bytes,
        encrypt_secs,
        rate(size, encrypt_secs)
    );
    print_memory("after encrypt_stream");

    // 2. Encrypt and decrypt through a 256 KiB pipe, verifying every plaintext byte.
    let start = Instant::now();
    let (enc_summary, dec_summary, seen) = rt.block_on(async {
        let (pipe_in, pipe_out) = tokio::io::duplex(256 * 1024);
        let encrypt = keyring.encrypt_stream(&caller, &context, Generator::new(size), pipe_in);
        // `encrypt_stream` owns the pipe's write half and drops it when done: end of input
        // for the decryptor.
        let mut verifier = Verifier {
            pattern: Pattern::new(),
            seen: 0,
        };
        let decrypt = keyring.decrypt_stream(&caller, &context, pipe_out, &mut verifier);
        let (e, d) = tokio::join!(encrypt, decrypt);
        (e.unwrap(), d.unwrap(), verifier.seen)
    });
    let pipeline_secs = start.elapsed().as_secs_f64();
    assert_eq!(seen, size);
    assert_eq!(dec_summary.plaintext_bytes, size);
    assert_eq!(enc_summary.ciphertext_bytes, dec_summary.ciphertext_bytes);
    println!(
        "encrypt_stream | decrypt_stream (1 thread): {:.3} s for both, {} of plaintext; decrypt ≈ {:.3} s, {}",
        pipeline_secs,
        rate(size, pipeline_secs),
        pipeline_secs - encrypt_secs,
        rate(size, (pipeline_secs - encrypt_secs).max(1e-9))
    );
    print_memory("after encrypt | decrypt pipeline");
    rt.block_on(keyring.flush_audit()).unwrap();

    if !baseline {
        return;
    }
    // 3. Baseline: one-shot AES-256-GCM of the whole buffer, same provider, key set up once.
    let key = provider.aes_256_gcm.key(&[0x42; 32]).unwrap();
    let nonce = [7u8; 12];
    let block = pattern_block();
    let mut buffer: Vec<u8> = Vec::with_capacity(size as usize);
    while (buffer.len() as u64) < size {
        buffer.extend_from_slice(&block);
    }
    buffer.truncate(size as usize);
    print_memory("baseline buffer filled");
    let start = Instant::now();
    let tag = key.seal(&nonce, b"aad", &mut buffer).unwrap();
    let seal_secs = start.elapsed().as_secs_f64();
    // Touch every page first (as the sealed buffer was), so page faults are not timed.
    let mut plain = vec![1u8; size as usize];
    let start = Instant::now();
    key.open(&nonce, b"aad", &buffer, &tag, &mut plain).unwrap();
    let open_secs = start.elapsed().as_secs_f64();
    assert!(plain[..block.len()] == block[..]);
    println!(
        "baseline one-shot AES-256-GCM: seal {:.3} s, {}; open {:.3} s, {}",
        seal_secs,
        rate(size, seal_secs),
        open_secs,
        rate(size, open_secs)
    );
    println!(
        "ratio encrypt_stream / seal: {:.2}x time; pipeline / (seal + open): {:.2}x time",
        encrypt_secs / seal_secs,
        pipeline_secs / (seal_secs + open_secs)
    );
    print_memory("after baseline (whole buffers in memory)");
}
