//! Streams through the keyring on the embedded default (local KMS, SQLite store, and the file
//! audit log or a recording sink): every entry point round-trips at segment boundaries and
//! under any chunking, tampering and truncation fail and are audited as failed, keys follow
//! rotation, the minimum decryption version and shredding, and auditing fails closed.

// Helpers outside #[test] fns are not covered by clippy.toml's in-test allowances; a panic in
// a test helper is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use phiseal::audit::{Action, AuditEvent, AuditSink, Outcome};
use phiseal::stream::{STREAM_HEADER_LEN, StreamHeader, StreamOptions};
use phiseal::{
    Actor, BackendError, BackendErrorKind, Caller, EncryptionContext, Error, Keyring, TenantId,
};
use phiseal_embedded::{EmbeddedOptions, EmbeddedPaths};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEG: usize = 64 * 1024;
const TAG: usize = 16;

fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn caller() -> Caller {
    Caller::with_request_id(Actor::named("stream-tests"), "req-stream")
}

fn ctx(t: &str, field: &str, record: Option<&str>) -> EncryptionContext {
    let c = EncryptionContext::new(TenantId::new(t).unwrap(), field).unwrap();
    match record {
        Some(r) => c.with_record(r).unwrap(),
        None => c,
    }
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 % 253) as u8).collect()
}

/// An audit sink that keeps events in memory and can refuse stream records: all of them, or
/// only their result records (not a stream's `attempt`).
#[derive(Debug, Default)]
struct Recording {
    events: Mutex<Vec<AuditEvent>>,
    refuse_streams: AtomicBool,
    refuse_stream_results: AtomicBool,
    /// Stream result records wait forever (an audit log that stopped answering).
    stall_stream_results: AtomicBool,
}

impl Recording {
    fn streams(&self) -> Vec<(Action, Outcome, Option<u32>)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e.action, Action::EncryptStream | Action::DecryptStream))
            .map(|e| (e.action, e.outcome, e.key_version))
            .collect()
    }

    fn clear(&self) {
        self.events.lock().unwrap().clear();
    }
}

#[async_trait]
impl AuditSink for Recording {
    fn name(&self) -> &str {
        "recording"
    }
    async fn append(&self, events: &[AuditEvent]) -> Result<(), BackendError> {
        let stream =
            |e: &&AuditEvent| matches!(e.action, Action::EncryptStream | Action::DecryptStream);
        let refused = events.iter().filter(stream).any(|e| {
            self.refuse_streams.load(Ordering::SeqCst)
                || (e.outcome != Outcome::Attempt
                    && self.refuse_stream_results.load(Ordering::SeqCst))
        });
        if refused {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                "disk full",
            ));
        }
        let result = |e: &AuditEvent| stream(&e) && e.outcome != Outcome::Attempt;
        if self.stall_stream_results.load(Ordering::SeqCst) && events.iter().any(result) {
            std::future::pending::<()>().await;
        }
        self.events.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A keyring on the embedded KMS and store, auditing to a [`Recording`] sink, with tenant `t`.
async fn recorded(dir: &Path) -> (Keyring, Arc<Recording>) {
    let sink = Arc::new(Recording::default());
    let k = phiseal_embedded::builder(dir, &EmbeddedOptions::default())
        .unwrap()
        .audit(sink.clone())
        .build()
        .unwrap();
    k.create_tenant(&caller(), &TenantId::new("t").unwrap())
        .await
        .unwrap();
    sink.clear();
    (k, sink)
}

async fn encrypt(k: &Keyring, cx: &EncryptionContext, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    k.encrypt_stream(&caller(), cx, plaintext, &mut out)
        .await
        .unwrap();
    out
}

async fn decrypt(k: &Keyring, cx: &EncryptionContext, stream: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    k.decrypt_stream(&caller(), cx, stream, &mut out).await?;
    Ok(out)
}

/// Decrypts with the push API, fed in chunks of `chunk` bytes.
async fn decrypt_pushed(
    k: &Keyring,
    cx: &EncryptionContext,
    stream: &[u8],
    chunk: usize,
) -> Result<Vec<u8>, Error> {
    let mut d = k.start_decrypt_stream(&caller(), cx);
    let mut all = Vec::new();
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        d.push(piece, &mut out).await?;
        all.append(&mut out);
    }
    d.finish(&mut out).await?;
    all.append(&mut out);
    Ok(all)
}

#[tokio::test]
async fn round_trips_through_every_entry_point() {
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let c = caller();
    let cx = ctx("t", "scan", Some("patient/7"));
    for len in [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG + 5] {
        let plaintext = data(len);
        // reader → writer
        let stream = encrypt(&k, &cx, &plaintext).await;
        let segments = len.div_ceil(SEG).max(1);
        assert_eq!(stream.len(), STREAM_HEADER_LEN + len + TAG * segments);
        assert_eq!(StreamHeader::parse(&stream).unwrap().key_version(), 1);
        assert!(decrypt(&k, &cx, &stream).await.unwrap() == plaintext);

        // AsyncWrite / AsyncRead adapters, over a small in-memory pipe.
        let (mut tx, rx) = tokio::io::duplex(4096);
        let mut w = k
            .encrypting_writer(&c, &cx, StreamOptions::default(), rx)
            .await
            .unwrap();
        let pt = plaintext.clone();
        let writer = tokio::spawn(async move {
            for piece in pt.chunks(10_000) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
            w.summary().unwrap()
        });
        let mut via_adapter = Vec::new();
        tx.read_to_end(&mut via_adapter).await.unwrap();
        let summary = writer.await.unwrap();
        assert_eq!(summary.plaintext_bytes, len as u64);
        assert_eq!(summary.ciphertext_bytes, via_adapter.len() as u64);
        let mut r = k
            .decrypting_reader(&c, &cx, &via_adapter[..])
            .await
            .unwrap();
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        assert!(back == plaintext);
        assert_eq!(r.summary().unwrap().segments, segments as u64);

        // Push APIs, with arbitrary chunking (1-byte chunks for the small sizes).
        let chunks: &[usize] = if len <= SEG + 1 {
            &[1, 4097, SEG + TAG, usize::MAX]
        } else {
            &[4097, SEG + TAG, usize::MAX]
        };
        for &chunk in chunks {
            let mut e = k
                .start_encrypt_stream(&c, &cx, StreamOptions::default())
                .await
                .unwrap();
            let mut pushed = Vec::new();
            for piece in plaintext.chunks(chunk) {
                e.push(piece, &mut pushed).unwrap();
            }
            e.finish(&mut pushed).await.unwrap();
            assert_eq!(pushed.len(), stream.len());
            assert_ne!(pushed, stream, "every stream has its own salt");
            for s in [&stream, &pushed, &via_adapter] {
                assert!(decrypt_pushed(&k, &cx, s, chunk).await.unwrap() == plaintext);
            }
        }
    }
    // Two records per stream (attempt, then ok), in that order; all naming version 1.
    let streams = sink.streams();
    assert!(streams.iter().all(|(_, _, v)| *v == Some(1)));
    let count = |action: Action, outcome: Outcome| {
        streams
            .iter()
            .filter(|(a, o, _)| *a == action && *o == outcome)
            .count()
    };
    // Per size: 1 reader→writer + 1 adapter + one per chunking (4 for five sizes, 3 for one).
    let encrypts = 5 * (2 + 4) + (2 + 3);
    assert_eq!(count(Action::EncryptStream, Outcome::Ok), encrypts);
    assert_eq!(count(Action::EncryptStream, Outcome::Attempt), encrypts);
    let decrypts = count(Action::DecryptStream, Outcome::Ok);
    assert!(decrypts > 0);
    assert_eq!(count(Action::DecryptStream, Outcome::Attempt), decrypts);
    assert_eq!(streams.len(), 2 * (encrypts + decrypts), "nothing else");
    for action in [Action::EncryptStream, Action::DecryptStream] {
        let outcomes: Vec<Outcome> = streams
            .iter()
            .filter(|(a, _, _)| *a == action)
            .map(|(_, o, _)| *o)
            .collect();
        assert!(
            outcomes
                .chunks(2)
                .all(|pair| pair == [Outcome::Attempt, Outcome::Ok]),
            "each {action:?}'s attempt comes before its result"
        );
    }
}

#[tokio::test]
async fn small_segments_and_bounded_output_per_push() {
    let dir = private_tempdir();
    let (k, _) = recorded(dir.path()).await;
    let c = caller();
    let cx = ctx("t", "doc", None);
    let options = StreamOptions { segment_size: 4096 };
    let plaintext = data(10 * 4096 + 3);
    let mut e = k.start_encrypt_stream(&c, &cx, options).await.unwrap();
    assert_eq!(e.header().segment_size(), 4096);
    let mut stream = Vec::new();
    let mut out = Vec::new();
    for piece in plaintext.chunks(1000) {
        e.push(piece, &mut out).unwrap();
        // Never more than one segment (plus the header) per 1000-byte push.
        assert!(out.len() <= STREAM_HEADER_LEN + 4096 + TAG);
        stream.append(&mut out);
    }
    e.finish(&mut out).await.unwrap();
    stream.append(&mut out);
    assert_eq!(stream.len(), STREAM_HEADER_LEN + plaintext.len() + 11 * TAG);
    assert!(decrypt(&k, &cx, &stream).await.unwrap() == plaintext);
    assert!(decrypt_pushed(&k, &cx, &stream, 1).await.unwrap() == plaintext);
}

#[tokio::test]
async fn a_decryptor_refuses_segments_over_its_limit_before_the_key_lookup() {
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let c = caller();
    let cx = ctx("t", "scan", None);
    let plaintext = data(2 * SEG + 7);
    let stream = encrypt(&k, &cx, &plaintext).await;
    sink.clear();

    // A limit below the stream's 64 KiB segments: refused when the header is complete,
    // nothing released, audited as failed without an attempt record (no key was loaded).
    let mut d = k
        .start_decrypt_stream(&c, &cx)
        .with_max_segment_size(SEG as u32 - 1);
    let mut out = Vec::new();
    d.push(&stream[..STREAM_HEADER_LEN - 1], &mut out)
        .await
        .unwrap();
    let err = d.push(&stream[STREAM_HEADER_LEN - 1..], &mut out).await;
    match err {
        Err(e @ Error::SegmentTooLarge { segment_size, max }) => {
            assert_eq!((segment_size, max), (SEG as u32, SEG as u32 - 1));
            assert_eq!(e.kind(), "segment_too_large");
        }
        other => panic!("{other:?}"),
    }
    assert!(out.is_empty());
    assert!(
        d.push(&stream, &mut out).await.is_err(),
        "the stream is dead"
    );
    assert_eq!(
        sink.streams(),
        vec![(
            Action::DecryptStream,
            Outcome::Error("segment_too_large"),
            Some(1)
        )]
    );

    // At the limit: decrypted as usual.
    sink.clear();
    let mut d = k
        .start_decrypt_stream(&c, &cx)
        .with_max_segment_size(SEG as u32);
    let mut all = Vec::new();
    d.push(&stream, &mut all).await.unwrap();
    d.finish(&mut all).await.unwrap();
    assert!(all == plaintext);
    assert_eq!(
        sink.streams(),
        vec![
            (Action::DecryptStream, Outcome::Attempt, Some(1)),
            (Action::DecryptStream, Outcome::Ok, Some(1))
        ]
    );
}

#[tokio::test]
async fn a_keyring_wide_segment_limit_applies_to_every_decryption_entry_point() {
    // `max_stream_segment_size` on the builder: `decrypt_stream` and `decrypting_reader`
    // (which take no per-stream limit) refuse a larger header before the key lookup, and it
    // is the push API's default (a per-stream limit still overrides it).
    let dir = private_tempdir();
    let (k, _sink) = recorded(dir.path()).await;
    let c = caller();
    let cx = ctx("t", "scan", None);
    let plaintext = data(2 * SEG + 7);
    let stream = encrypt(&k, &cx, &plaintext).await;
    let limited = phiseal_embedded::builder(dir.path(), &EmbeddedOptions::default())
        .unwrap()
        .danger_disable_audit()
        .max_stream_segment_size(SEG as u32 - 1)
        .build()
        .unwrap();
    let too_large = |r: Result<(), Error>| matches!(r, Err(Error::SegmentTooLarge { .. }));
    let mut out = Vec::new();
    let whole = limited.decrypt_stream(&c, &cx, &stream[..], &mut out).await;
    assert!(too_large(whole.map(drop)));
    assert!(out.is_empty());
    let reader = limited.decrypting_reader(&c, &cx, &stream[..]).await;
    assert!(too_large(reader.map(drop)));
    let mut pushed = limited.start_decrypt_stream(&c, &cx);
    assert!(too_large(pushed.push(&stream, &mut out).await));
    let mut pushed = limited
        .start_decrypt_stream(&c, &cx)
        .with_max_segment_size(SEG as u32);
    pushed.push(&stream, &mut out).await.unwrap();
    pushed.finish(&mut out).await.unwrap();
    assert!(out == plaintext);
    // Within the format's range only.
    for bad in [
        phiseal::stream::MIN_SEGMENT_SIZE - 1,
        phiseal::stream::MAX_SEGMENT_SIZE + 1,
    ] {
        let built = phiseal_embedded::builder(dir.path(), &EmbeddedOptions::default())
            .unwrap()
            .danger_disable_audit()
            .max_stream_segment_size(bad)
            .build();
        assert!(matches!(built, Err(Error::Config(_))), "{bad}");
    }
}

#[tokio::test]
async fn tampering_truncation_and_wrong_context_fail_and_are_audited() {
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let cx = ctx("t", "scan", Some("r1"));
    let plaintext = data(3 * SEG + 100);
    let stream = encrypt(&k, &cx, &plaintext).await;
    let other = encrypt(&k, &cx, &plaintext).await;
    let header = &stream[..STREAM_HEADER_LEN];
    let seg = |s: &[u8], i: usize| -> Vec<u8> {
        let start = STREAM_HEADER_LEN + i * (SEG + TAG);
        s[start..(start + SEG + TAG).min(s.len())].to_vec()
    };
    let join = |parts: &[Vec<u8>]| -> Vec<u8> {
        let mut v = header.to_vec();
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let (s0, s1, s2, s3) = (
        seg(&stream, 0),
        seg(&stream, 1),
        seg(&stream, 2),
        seg(&stream, 3),
    );
    let mut flipped_header = stream.clone();
    flipped_header[20] ^= 1;
    let mut flipped_tag = stream.clone();
    *flipped_tag.last_mut().unwrap() ^= 1;
    let bad: Vec<(&str, Vec<u8>, EncryptionContext)> = vec![
        (
            "final dropped",
            join(&[s0.clone(), s1.clone(), s2.clone()]),
            cx.clone(),
        ),
        (
            "reordered",
            join(&[s1.clone(), s0.clone(), s2.clone(), s3.clone()]),
            cx.clone(),
        ),
        (
            "swapped from another stream",
            join(&[s0.clone(), seg(&other, 1), s2.clone(), s3.clone()]),
            cx.clone(),
        ),
        (
            "extended",
            join(&[s0.clone(), s1.clone(), s2.clone(), s3.clone(), s0.clone()]),
            cx.clone(),
        ),
        ("header altered", flipped_header, cx.clone()),
        ("tag altered", flipped_tag, cx.clone()),
        ("wrong field", stream.clone(), ctx("t", "xray", Some("r1"))),
        ("wrong record", stream.clone(), ctx("t", "scan", Some("r2"))),
    ];
    for (what, s, c) in &bad {
        sink.clear();
        let mut written = Vec::new();
        let err = k
            .decrypt_stream(&caller(), c, &s[..], &mut written)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed), "{what}: {err:?}");
        // Segments before the failure were released (provisional); none after it.
        assert!(written.len() <= plaintext.len(), "{what}");
        assert_eq!(
            sink.streams(),
            vec![
                (Action::DecryptStream, Outcome::Attempt, Some(1)),
                (
                    Action::DecryptStream,
                    Outcome::Error("decryption_failed"),
                    Some(1)
                )
            ],
            "{what}: the attempt, then exactly one failed record"
        );
        assert!(decrypt_pushed(&k, c, s, 5000).await.is_err(), "{what}");
    }
    // One byte short: the final segment does not authenticate.
    assert!(matches!(
        decrypt(&k, &cx, &stream[..stream.len() - 1]).await,
        Err(Error::DecryptionFailed)
    ));
    // Fewer than a tag's worth of bytes after the last full segment, or right after the
    // header, or inside it: truncated.
    for cut in [
        STREAM_HEADER_LEN + 3 * (SEG + TAG) + 10,
        STREAM_HEADER_LEN,
        10,
    ] {
        sink.clear();
        let err = decrypt(&k, &cx, &stream[..cut]).await.unwrap_err();
        assert!(matches!(err, Error::Format(_)), "{cut}: {err:?}");
        let outcomes: Vec<Outcome> = sink.streams().into_iter().map(|(_, o, _)| o).collect();
        // Once the header is whole its key is loaded and the attempt recorded.
        let expected = if cut >= STREAM_HEADER_LEN {
            vec![Outcome::Attempt, Outcome::Error("malformed_ciphertext")]
        } else {
            vec![Outcome::Error("malformed_ciphertext")]
        };
        assert_eq!(outcomes, expected, "{cut}");
    }
    // A field ciphertext is not a stream.
    let field = k.encrypt(&caller(), &cx, b"field").await.unwrap();
    assert!(decrypt(&k, &cx, &field).await.is_err());
    // Through the reader adapter, truncation is an InvalidData error at the end, and the
    // dropped reader records the failure.
    sink.clear();
    let truncated = join(&[s0.clone(), s1.clone()]);
    let mut r = k
        .decrypting_reader(&caller(), &cx, &truncated[..])
        .await
        .unwrap();
    let mut got = Vec::new();
    let err = r.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(got.len(), SEG, "only the first segment was released");
    drop(r);
    wait_for(|| sink.streams().len() == 2).await;
    assert_eq!(
        sink.streams(),
        vec![
            (Action::DecryptStream, Outcome::Attempt, Some(1)),
            (
                Action::DecryptStream,
                Outcome::Error("decryption_failed"),
                Some(1)
            )
        ]
    );
    // Untouched, it decrypts.
    assert!(decrypt(&k, &cx, &stream).await.unwrap() == plaintext);
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for the audit record");
}

#[tokio::test]
async fn keys_follow_rotation_minimum_version_and_shredding() {
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let c = caller();
    let t = TenantId::new("t").unwrap();
    let cx = ctx("t", "scan", None);
    let plaintext = data(SEG + 7);
    let v1 = encrypt(&k, &cx, &plaintext).await;
    assert_eq!(k.rotate(&c, &t).await.unwrap(), 2);
    let v2 = encrypt(&k, &cx, &plaintext).await;
    assert_eq!(StreamHeader::parse(&v2).unwrap().key_version(), 2);
    assert!(decrypt(&k, &cx, &v1).await.unwrap() == plaintext);
    k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    sink.clear();
    assert!(matches!(
        decrypt(&k, &cx, &v1).await,
        Err(Error::KeyVersionRetired {
            version: 1,
            min: 2,
            ..
        })
    ));
    assert!(matches!(
        decrypt_pushed(&k, &cx, &v1, 7).await,
        Err(Error::KeyVersionRetired { .. })
    ));
    assert!(decrypt(&k, &cx, &v2).await.unwrap() == plaintext);
    k.shred(&c, &t).await.unwrap();
    assert!(matches!(
        decrypt(&k, &cx, &v2).await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        k.encrypt_stream(&c, &cx, &plaintext[..], Vec::new()).await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert!(matches!(
        k.start_encrypt_stream(&c, &cx, StreamOptions::default())
            .await
            .map(|_| ()),
        Err(Error::KeyDestroyed { .. })
    ));
    let outcomes: Vec<Outcome> = sink.streams().into_iter().map(|(_, o, _)| o).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Error("key_version_retired"),
            Outcome::Error("key_version_retired"),
            Outcome::Attempt,
            Outcome::Ok,
            Outcome::Error("key_destroyed"),
            Outcome::Error("key_destroyed"),
            Outcome::Error("key_destroyed"),
        ]
    );
    // Unknown tenant.
    assert!(matches!(
        decrypt(&k, &ctx("nobody", "scan", None), &v2).await,
        Err(Error::TenantNotFound { .. })
    ));
}

#[tokio::test]
async fn a_stream_under_a_version_rotated_elsewhere_a_moment_ago_decrypts() {
    // Another process rotates right after this keyring read the tenant: the stream names a
    // version its cached metadata does not know yet; the tenant is read again, not refused.
    let dir = private_tempdir();
    let (k, _) = recorded(dir.path()).await;
    let other = phiseal_embedded::builder(dir.path(), &EmbeddedOptions::default())
        .unwrap()
        .danger_disable_audit()
        .build()
        .unwrap();
    let cx = ctx("t", "scan", None);
    encrypt(&k, &cx, &data(10)).await;
    other
        .rotate(&caller(), &TenantId::new("t").unwrap())
        .await
        .unwrap();
    let stream = encrypt(&other, &cx, &data(70_000)).await;
    assert_eq!(decrypt(&k, &cx, &stream).await.unwrap(), data(70_000));
}

#[tokio::test]
async fn a_shred_stops_the_tenants_running_streams() {
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let c = caller();
    let t = TenantId::new("t").unwrap();
    let cx = ctx("t", "scan", None);
    let plaintext = data(3 * SEG + 5);
    let sealed = encrypt(&k, &cx, &plaintext).await;
    // Another tenant's stream is not affected.
    k.create_tenant(&c, &TenantId::new("u").unwrap())
        .await
        .unwrap();
    let other = ctx("u", "scan", None);
    let mut bystander = k
        .start_encrypt_stream(&c, &other, StreamOptions::default())
        .await
        .unwrap();
    // A decryption that has released its first segment, and an encryption that has sealed
    // one …
    let mut reading = k.start_decrypt_stream(&c, &cx);
    let mut out = Vec::new();
    let first = STREAM_HEADER_LEN + 2 * (SEG + TAG);
    reading.push(&sealed[..first], &mut out).await.unwrap();
    assert_eq!(out, plaintext[..SEG]);
    // A reader that has handed out part of its first segment.
    let mut reader = k.decrypting_reader(&c, &cx, &sealed[..]).await.unwrap();
    let mut start = vec![0u8; 100];
    reader.read_exact(&mut start).await.unwrap();
    assert_eq!(start, plaintext[..100]);
    let mut writing = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    let mut written = Vec::new();
    writing.push(&plaintext[..SEG + 1], &mut written).unwrap();
    assert!(written.len() > STREAM_HEADER_LEN);
    sink.clear();
    // … then the tenant is shredded: neither seals nor opens another segment.
    k.shred(&c, &t).await.unwrap();
    out.clear();
    let err = reading.push(&sealed[first..], &mut out).await.unwrap_err();
    assert!(matches!(err, Error::KeyDestroyed { .. }), "{err}");
    assert!(out.is_empty(), "plaintext released after the shred");
    // The reader withholds the rest of the segment it had opened.
    let mut rest_of_segment = vec![0u8; 100];
    let err = reader.read_exact(&mut rest_of_segment).await.unwrap_err();
    assert!(err.to_string().contains("destroyed"), "{err}");
    drop(reader);
    // (Its failure is recorded by a task the drop spawns.)
    wait_for(|| sink.streams().len() == 2).await;
    written.clear();
    let err = writing
        .push(&plaintext[SEG + 1..], &mut written)
        .unwrap_err();
    assert!(matches!(err, Error::KeyDestroyed { .. }), "{err}");
    assert!(written.is_empty());
    writing.abort("cancelled").await.unwrap();
    let mut rest = Vec::new();
    bystander.push(&plaintext, &mut rest).unwrap();
    bystander.finish(&mut rest).await.unwrap();
    let outcomes: Vec<Outcome> = sink.streams().into_iter().map(|(_, o, _)| o).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Error("key_destroyed"),
            Outcome::Error("key_destroyed"),
            Outcome::Error("key_destroyed"),
            Outcome::Ok
        ],
        "the three streams recorded as failed, the other tenant's as ok"
    );
}

/// What another process does to tenant t in [`another_process_stops_a_stream`].
#[derive(Clone, Copy)]
enum OtherProcess {
    Shreds,
    RetiresVersion1,
}

/// A decryption stream of tenant t (version 1) has released its first segment when another
/// process (another keyring on the same store) makes `change`. This keyring learns of it when
/// it reads the tenant again — the sidecar does on the key store's change notification —:
/// until then the stream goes on, and then it stops with the error `stopped` accepts.
async fn another_process_stops_a_stream(change: OtherProcess, stopped: fn(&Error) -> bool) {
    let dir = private_tempdir();
    let (k, _sink) = recorded(dir.path()).await;
    let c = caller();
    let t = TenantId::new("t").unwrap();
    let cx = ctx("t", "scan", None);
    let plaintext = data(3 * SEG + 5);
    let sealed = encrypt(&k, &cx, &plaintext).await;
    let mut reading = k.start_decrypt_stream(&c, &cx);
    let mut out = Vec::new();
    let first = STREAM_HEADER_LEN + 2 * (SEG + TAG);
    reading.push(&sealed[..first], &mut out).await.unwrap();
    let other = phiseal_embedded::builder(dir.path(), &EmbeddedOptions::default())
        .unwrap()
        .danger_disable_audit()
        .build()
        .unwrap();
    match change {
        OtherProcess::Shreds => other.shred(&c, &t).await.unwrap(),
        OtherProcess::RetiresVersion1 => {
            other.rotate(&c, &t).await.unwrap();
            other.set_min_decrypt_version(&c, &t, 2).await.unwrap();
        }
    }
    // Not known here yet: the stream goes on.
    out.clear();
    let second = first + SEG + TAG;
    reading
        .push(&sealed[first..second], &mut out)
        .await
        .unwrap();
    k.recheck_streams(&c, None).await.unwrap();
    out.clear();
    let err = reading.push(&sealed[second..], &mut out).await.unwrap_err();
    assert!(stopped(&err), "{err}");
    assert!(out.is_empty());
}

#[tokio::test]
async fn a_shred_by_another_process_stops_streams_once_the_tenant_is_read_again() {
    another_process_stops_a_stream(OtherProcess::Shreds, |e| {
        matches!(e, Error::KeyDestroyed { .. })
    })
    .await;
}

#[tokio::test]
async fn a_minimum_version_raised_by_another_process_stops_streams_once_the_tenant_is_read_again() {
    another_process_stops_a_stream(OtherProcess::RetiresVersion1, |e| {
        matches!(e, Error::KeyVersionRetired { .. })
    })
    .await;
}

#[tokio::test]
async fn raising_the_minimum_decryption_version_stops_streams_under_older_versions() {
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let c = caller();
    let t = TenantId::new("t").unwrap();
    let cx = ctx("t", "scan", None);
    let plaintext = data(3 * SEG + 5);
    let sealed_v1 = encrypt(&k, &cx, &plaintext).await;
    // An encryption under version 1 that has sealed a segment …
    let mut writing_v1 = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    let mut written = Vec::new();
    writing_v1
        .push(&plaintext[..SEG + 1], &mut written)
        .unwrap();
    k.rotate(&c, &t).await.unwrap();
    // … a decryption of a version-1 stream that has released its first segment, and an
    // encryption under the new primary, version 2.
    let mut reading_v1 = k.start_decrypt_stream(&c, &cx);
    let mut out = Vec::new();
    let first = STREAM_HEADER_LEN + 2 * (SEG + TAG);
    reading_v1
        .push(&sealed_v1[..first], &mut out)
        .await
        .unwrap();
    assert_eq!(out, plaintext[..SEG]);
    let mut writing_v2 = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    sink.clear();
    k.set_min_decrypt_version(&c, &t, 2).await.unwrap();
    // Version 1 is retired: neither stream under it seals or opens another segment.
    out.clear();
    let err = reading_v1
        .push(&sealed_v1[first..], &mut out)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyVersionRetired {
                version: 1,
                min: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(out.is_empty(), "plaintext of a retired version released");
    written.clear();
    let err = writing_v1
        .push(&plaintext[SEG + 1..], &mut written)
        .unwrap_err();
    assert!(matches!(err, Error::KeyVersionRetired { .. }), "{err}");
    writing_v1.abort("cancelled").await.unwrap();
    // The stream under version 2 goes on.
    let mut rest = Vec::new();
    writing_v2.push(&plaintext, &mut rest).unwrap();
    writing_v2.finish(&mut rest).await.unwrap();
    let outcomes: Vec<Outcome> = sink.streams().into_iter().map(|(_, o, _)| o).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Error("key_version_retired"),
            Outcome::Error("key_version_retired"),
            Outcome::Ok
        ]
    );
}

#[tokio::test]
async fn a_result_record_cut_off_by_a_timeout_is_still_written() {
    // A caller's timeout drops `push` while it writes the failure record of a tampered
    // stream (the audit log stalls): the record was not written, so `abort` (or the drop)
    // writes it. Before, the stream counted as recorded once the record was handed over.
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let cx = ctx("t", "scan", None);
    let mut tampered = encrypt(&k, &cx, &data(2 * SEG + 1)).await;
    // A byte of the first segment: `push` finds it when that segment completes.
    tampered[STREAM_HEADER_LEN + 10] ^= 1;
    sink.clear();
    for abandon in ["abort", "drop"] {
        sink.stall_stream_results.store(true, Ordering::SeqCst);
        let mut d = k.start_decrypt_stream(&caller(), &cx);
        let mut out = Vec::new();
        let cut = tokio::time::timeout(Duration::from_millis(200), d.push(&tampered, &mut out));
        assert!(cut.await.is_err(), "the stalled record held the call");
        assert!(out.is_empty());
        sink.stall_stream_results.store(false, Ordering::SeqCst);
        if abandon == "abort" {
            d.abort("cancelled").await.unwrap();
        } else {
            drop(d);
        }
        // Recorded as what it was: tampering, not the caller's reason for giving up.
        wait_for(|| {
            sink.streams()
                .iter()
                .any(|(_, outcome, _)| *outcome == Outcome::Error("decryption_failed"))
        })
        .await;
        sink.clear();
    }
}

#[tokio::test]
async fn auditing_fails_closed_and_abandoned_streams_are_recorded() {
    let dir = private_tempdir();
    let (k, sink) = recorded(dir.path()).await;
    let c = caller();
    let cx = ctx("t", "scan", None);
    let plaintext = data(2 * SEG + 1);
    let good = encrypt(&k, &cx, &plaintext).await;
    sink.refuse_streams.store(true, Ordering::SeqCst);

    // No encryption stream starts without its attempt record.
    assert!(matches!(
        k.start_encrypt_stream(&c, &cx, StreamOptions::default())
            .await
            .map(|_| ()),
        Err(Error::Audit { .. })
    ));

    // The push API withholds the final segment if the result cannot be written.
    sink.refuse_streams.store(false, Ordering::SeqCst);
    sink.refuse_stream_results.store(true, Ordering::SeqCst);
    let mut e = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    e.push(&plaintext, &mut out).unwrap();
    let before = out.len();
    assert!(matches!(e.finish(&mut out).await, Err(Error::Audit { .. })));
    assert_eq!(
        out.len(),
        before,
        "no final segment without an audit record"
    );
    sink.refuse_stream_results.store(false, Ordering::SeqCst);
    // What was released is an unterminated stream: refused as such (with auditing working).
    let err = decrypt_pushed(&k, &cx, &out, 999).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::DecryptionFailed | Error::Format(phiseal::FormatError::Truncated { .. })
        ),
        "{err}"
    );
    sink.refuse_streams.store(true, Ordering::SeqCst);

    // Decryption releases nothing if its attempt record cannot be written.
    let mut d = k.start_decrypt_stream(&c, &cx);
    let mut plain = Vec::new();
    assert!(matches!(
        d.push(&good, &mut plain).await,
        Err(Error::Audit { .. })
    ));
    assert!(plain.is_empty(), "no plaintext without an attempt record");
    assert!(
        d.push(&good, &mut plain).await.is_err(),
        "the stream is dead"
    );
    assert!(plain.is_empty());

    // If only the result record cannot be written, the final segment is withheld.
    sink.refuse_streams.store(false, Ordering::SeqCst);
    sink.refuse_stream_results.store(true, Ordering::SeqCst);
    let mut d = k.start_decrypt_stream(&c, &cx);
    let mut plain = Vec::new();
    d.push(&good, &mut plain).await.unwrap();
    let before = plain.len();
    assert_eq!(
        before,
        2 * SEG,
        "the authenticated segments before the final one"
    );
    assert!(matches!(
        d.finish(&mut plain).await,
        Err(Error::Audit { .. })
    ));
    assert_eq!(plain.len(), before, "the final segment is withheld");
    sink.refuse_stream_results.store(false, Ordering::SeqCst);
    sink.refuse_streams.store(true, Ordering::SeqCst);

    // The whole-stream functions and the adapters report the audit failure.
    assert!(matches!(
        k.encrypt_stream(&c, &cx, &plaintext[..], Vec::new()).await,
        Err(Error::Audit { .. })
    ));
    assert!(matches!(
        k.decrypt_stream(&c, &cx, &good[..], Vec::new()).await,
        Err(Error::Audit { .. })
    ));
    assert!(matches!(
        k.encrypting_writer(&c, &cx, StreamOptions::default(), Vec::new())
            .await
            .map(|_| ()),
        Err(Error::Audit { .. })
    ));
    sink.refuse_streams.store(false, Ordering::SeqCst);
    sink.refuse_stream_results.store(true, Ordering::SeqCst);
    let mut w = k
        .encrypting_writer(&c, &cx, StreamOptions::default(), Vec::new())
        .await
        .unwrap();
    w.write_all(b"abc").await.unwrap();
    assert!(w.shutdown().await.is_err());
    assert!(w.summary().is_none());
    sink.refuse_stream_results.store(false, Ordering::SeqCst);
    sink.refuse_streams.store(true, Ordering::SeqCst);
    assert!(matches!(
        k.decrypting_reader(&c, &cx, &good[..]).await.map(|_| ()),
        Err(Error::Audit { .. })
    ));
    // The whole-stream function writes nothing when the attempt record is refused.
    let mut written = Vec::new();
    assert!(matches!(
        k.decrypt_stream(&c, &cx, &good[..], &mut written).await,
        Err(Error::Audit { .. })
    ));
    assert!(written.is_empty(), "no plaintext without an attempt record");
    sink.refuse_streams.store(false, Ordering::SeqCst);
    sink.refuse_stream_results.store(true, Ordering::SeqCst);
    let mut r = k.decrypting_reader(&c, &cx, &good[..]).await.unwrap();
    // The reader releases the segments before the final one, then fails instead of the
    // final segment (2 * SEG + 1 bytes: the last byte is withheld).
    let mut released = Vec::new();
    assert!(r.read_to_end(&mut released).await.is_err());
    assert_eq!(released.len(), 2 * SEG, "the final segment was released");
    assert_eq!(released[..], plaintext[..2 * SEG]);
    sink.refuse_stream_results.store(false, Ordering::SeqCst);
    drop((w, r));

    // Abandoned streams: recorded as failed, by abort() or (best effort) on drop.
    sink.refuse_streams.store(false, Ordering::SeqCst);
    sink.clear();
    let mut e = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    e.push(b"partial", &mut Vec::new()).unwrap();
    e.abort("cancelled").await.unwrap();
    let e = k
        .start_encrypt_stream(&c, &cx, StreamOptions::default())
        .await
        .unwrap();
    drop(e);
    let mut d = k.start_decrypt_stream(&c, &cx);
    d.push(&good[..SEG], &mut Vec::new()).await.unwrap();
    drop(d);
    wait_for(|| sink.streams().len() == 6).await;
    let mut outcomes: Vec<(Action, Outcome)> =
        sink.streams().into_iter().map(|(a, o, _)| (a, o)).collect();
    outcomes.sort_by_key(|(a, o)| (a.as_str(), o.as_str()));
    assert_eq!(
        outcomes,
        vec![
            (Action::DecryptStream, Outcome::Attempt),
            (Action::DecryptStream, Outcome::Error("incomplete")),
            (Action::EncryptStream, Outcome::Attempt),
            (Action::EncryptStream, Outcome::Attempt),
            (Action::EncryptStream, Outcome::Error("cancelled")),
            (Action::EncryptStream, Outcome::Error("incomplete")),
        ]
    );
}

#[tokio::test]
async fn the_file_audit_log_gets_the_stream_records_and_no_content() {
    let dir = private_tempdir();
    let c = caller();
    {
        let k = phiseal_embedded::open(dir.path(), &EmbeddedOptions::default()).unwrap();
        k.create_tenant(&c, &TenantId::new("t").unwrap())
            .await
            .unwrap();
        let cx = ctx("t", "scan", Some("rec-5"));
        let plaintext = b"PLAINTEXT-MARKER ".repeat(10_000);
        let stream = encrypt(&k, &cx, &plaintext).await;
        assert!(decrypt(&k, &cx, &stream).await.unwrap() == plaintext);
        assert!(
            decrypt(&k, &cx, &stream[..stream.len() - 20])
                .await
                .is_err()
        );
        k.flush_audit().await.unwrap();
    }
    let log = EmbeddedPaths::new(dir.path()).audit_log;
    let report = phiseal_audit_file::verify(&log).unwrap();
    assert!(report.is_intact(), "{report:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("PLAINTEXT"));
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    // One encryption, two decryptions: each an attempt, then its result.
    assert_eq!(count(r#""action":"encrypt_stream""#), 2);
    assert_eq!(count(r#""action":"decrypt_stream""#), 4);
    let attempts = text
        .lines()
        .filter(|l| {
            l.contains(r#""action":"decrypt_stream""#) && l.contains(r#""result":"attempt""#)
        })
        .count();
    assert_eq!(attempts, 2);
    assert_eq!(count(r#""result":"decryption_failed""#), 1);
    assert!(text.contains(r#""field":"scan""#) && text.contains(r#""record":"rec-5""#));
}

/// The sidecar drives these from spawned tasks: the objects and their futures must be `Send`.
fn assert_futures_are_send(
    k: &Keyring,
    c: &Caller,
    cx: &EncryptionContext,
    e: phiseal::AuditedStreamEncryptor,
    mut d: phiseal::AuditedStreamDecryptor,
    out: &mut Vec<u8>,
) {
    fn send<T: Send>(_: T) {}
    send(k.start_encrypt_stream(c, cx, StreamOptions::default()));
    send(k.encrypt_stream(c, cx, &b""[..], Vec::new()));
    send(k.decrypt_stream(c, cx, &b""[..], Vec::new()));
    send(k.encrypting_writer(c, cx, StreamOptions::default(), Vec::new()));
    send(k.decrypting_reader(c, cx, &b""[..]));
    send(d.push(b"", out));
    send(e.finish(out));
    send(d);
}

#[test]
fn stream_objects_and_futures_are_send() {
    let _ = assert_futures_are_send;
}
