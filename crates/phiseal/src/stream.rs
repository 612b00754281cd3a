//! Streaming encryption of large values: the STREAM construction (Hoang, Reyhanitabar, Rogaway,
//! Vizár, *Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance*, CRYPTO 2015)
//! over AES-256-GCM, in constant memory. Byte layout and rationale: `docs/FORMAT.md` §10.
//!
//! A stream is a 49-byte header followed by segments. Every segment but the last holds exactly
//! `segment_size` plaintext bytes; the last holds 0 ..= `segment_size` (0 only for an empty
//! stream). Each segment is sealed with AES-256-GCM under a per-stream key
//! `HKDF-SHA256(ikm = tenant key, salt = 32 random bytes, info = label ‖ context)`, with the nonce
//! `nonce prefix (7 random bytes) ‖ u32be segment counter ‖ last-segment flag` and the whole
//! header as associated data. Hence:
//!
//! * **reordering, dropping or duplicating** a segment changes its counter → its tag fails;
//! * **truncation** at a segment boundary: the last segment present was sealed as non-final
//!   and fails when opened as final; **extension** after the final segment: the final segment
//!   is then opened as non-final and fails;
//! * **a segment from another stream** (another salt, so another key), **another tenant key,
//!   another context** (tenant, field, record) or **any header change**: the tag fails.
//!
//! Two layers:
//!
//! * [`StreamEncryptor`] / [`StreamDecryptor`]: synchronous push APIs over raw key material.
//!   Input of any chunking goes in, whole sealed (or authenticated) segments come out; at most
//!   one segment is buffered inside (plus the caller's output buffer).
//! * [`EncryptingWriter`] (`AsyncWrite`) and [`DecryptingReader`] (`AsyncRead`) adapters on
//!   tokio's I/O traits.
//!
//! Services use the keyring's entry points instead (`Keyring::encrypt_stream`,
//! `Keyring::start_encrypt_stream`, …), which take keys from the key cache and audit each stream
//! (a decryption stream before its first plaintext and at its end).
//!
//! **Decrypted output is provisional until the stream ends without error.** A segment's
//! plaintext is released only once it authenticated, but truncation can be detected only at
//! the end: a consumer must not act on the output (e.g. it writes to a temporary file and
//! renames it into place) until [`StreamDecryptor::finish`] (or the reader's end of file)
//! returned successfully.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zeroize::Zeroize;

use crate::context::{EncryptionContext, TenantId};
use crate::crypto::{AeadKey, CryptoProvider, TAG_LEN, os_random};
use crate::error::{Error, FormatError};
use crate::secret::TenantKey;

/// First byte of a stream: the stream format, version 1. Distinct from the field format's
/// `0x01`, so neither reader mistakes one for the other.
pub const STREAM_FORMAT_V1: u8 = 0x53;
/// Algorithm id of the only stream algorithm: AES-256-GCM segments under an HKDF-SHA256
/// per-stream key.
pub const STREAM_ALGORITHM_AES_256_GCM_HKDF: u8 = 0x01;
/// Length of the random per-stream HKDF salt.
pub const STREAM_SALT_LEN: usize = 32;
/// Length of the random per-stream nonce prefix.
pub const STREAM_NONCE_PREFIX_LEN: usize = 7;
/// Length of the stream header: format, algorithm, key version, segment size, salt, nonce prefix.
pub const STREAM_HEADER_LEN: usize = 1 + 1 + 4 + 4 + STREAM_SALT_LEN + STREAM_NONCE_PREFIX_LEN;
/// Smallest segment size (plaintext bytes per segment) a stream may declare.
pub const MIN_SEGMENT_SIZE: u32 = 4 * 1024;
/// Largest segment size a stream may declare (bounds what a reader buffers).
pub const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;
/// The segment size writers use unless told otherwise.
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Most segments one stream may have (the counter is 32 bits): the final segment has a counter
/// of at most `2^32 - 1`.
pub const MAX_SEGMENTS: u64 = 1 << 32;

/// HKDF info label of the per-stream key; the context encoding (`docs/FORMAT.md` §4) follows it.
const STREAM_KEY_INFO: &[u8] = b"phiseal stream v1 aes-256-gcm-hkdf key";
/// Last byte of the nonce of a non-final segment.
const NOT_LAST: u8 = 0x00;
/// Last byte of the nonce of the final segment.
const LAST: u8 = 0x01;

/// Options of a new stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Plaintext bytes per segment, [`MIN_SEGMENT_SIZE`] ..= [`MAX_SEGMENT_SIZE`]. Memory use
    /// of either side is about two segments.
    pub segment_size: u32,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            segment_size: DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// What a completed stream contained. No content, only sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The tenant key version the stream is encrypted under.
    pub key_version: u32,
    /// The stream's segment size.
    pub segment_size: u32,
    /// Segments, the final one included (at least 1).
    pub segments: u64,
    /// Plaintext bytes.
    pub plaintext_bytes: u64,
    /// Ciphertext bytes, header included.
    pub ciphertext_bytes: u64,
}

/// The parsed header of a stream. Nothing in it is secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    key_version: u32,
    segment_size: u32,
    salt: [u8; STREAM_SALT_LEN],
    nonce_prefix: [u8; STREAM_NONCE_PREFIX_LEN],
}

fn check_segment_size(segment_size: u32) -> Result<(), FormatError> {
    if (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
        Ok(())
    } else {
        Err(FormatError::BadSegmentSize(segment_size))
    }
}

impl StreamHeader {
    /// Parses the first [`STREAM_HEADER_LEN`] bytes of a stream (more may follow and are
    /// ignored). Checks, in order: length (*truncated*), format byte (*unknown version*),
    /// algorithm (*unknown algorithm*), key version ≠ 0, segment size in range.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let header = bytes
            .get(..STREAM_HEADER_LEN)
            .ok_or(FormatError::Truncated {
                len: bytes.len(),
                min: STREAM_HEADER_LEN,
            })?;
        let (&format, rest) = header.split_first().ok_or(FormatError::Truncated {
            len: 0,
            min: STREAM_HEADER_LEN,
        })?;
        if format != STREAM_FORMAT_V1 {
            return Err(FormatError::UnknownVersion(format).into());
        }
        let (&algorithm, rest) = rest.split_first().ok_or(FormatError::Truncated {
            len: 1,
            min: STREAM_HEADER_LEN,
        })?;
        if algorithm != STREAM_ALGORITHM_AES_256_GCM_HKDF {
            return Err(FormatError::UnknownAlgorithm(algorithm).into());
        }
        let truncated = || FormatError::Truncated {
            len: bytes.len(),
            min: STREAM_HEADER_LEN,
        };
        let (version, rest) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let key_version = u32::from_be_bytes(*version);
        if key_version == 0 {
            return Err(FormatError::ZeroKeyVersion.into());
        }
        let (size, rest) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let segment_size = u32::from_be_bytes(*size);
        check_segment_size(segment_size)?;
        let (salt, rest) = rest
            .split_first_chunk::<STREAM_SALT_LEN>()
            .ok_or_else(truncated)?;
        let nonce_prefix: [u8; STREAM_NONCE_PREFIX_LEN] =
            rest.try_into().map_err(|_| truncated())?;
        Ok(Self {
            key_version,
            segment_size,
            salt: *salt,
            nonce_prefix,
        })
    }

    /// The encoded header (`docs/FORMAT.md` §10.1).
    pub fn to_bytes(&self) -> [u8; STREAM_HEADER_LEN] {
        let mut out = [0u8; STREAM_HEADER_LEN];
        let mut at = 0;
        for part in [
            &[STREAM_FORMAT_V1, STREAM_ALGORITHM_AES_256_GCM_HKDF][..],
            &self.key_version.to_be_bytes(),
            &self.segment_size.to_be_bytes(),
            &self.salt,
            &self.nonce_prefix,
        ] {
            if let Some(dst) = out.get_mut(at..at + part.len()) {
                dst.copy_from_slice(part);
            }
            at += part.len();
        }
        out
    }

    /// The tenant key version the stream is encrypted under.
    pub fn key_version(&self) -> u32 {
        self.key_version
    }

    /// Plaintext bytes per segment.
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }
}

/// The per-stream AES-256-GCM key: `HKDF-SHA256(ikm = TK, salt, info = label ‖ context)`.
fn derive_stream_key(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    salt: &[u8; STREAM_SALT_LEN],
    context: &EncryptionContext,
) -> Result<Box<dyn AeadKey>, Error> {
    let mut info = Vec::with_capacity(STREAM_KEY_INFO.len() + context.encoded_len());
    info.extend_from_slice(STREAM_KEY_INFO);
    context.encode_with(|bytes| info.extend_from_slice(bytes));
    let key = provider
        .hkdf_sha256
        .derive(tenant_key.expose(), salt, &[&info]);
    provider.aes_256_gcm.key(&key).map_err(|_| Error::Crypto {
        provider: provider.name,
        what: "AES-256-GCM stream key setup",
    })
}

/// The nonce of segment `counter`: `prefix ‖ u32be counter ‖ flag`.
fn segment_nonce(prefix: &[u8; STREAM_NONCE_PREFIX_LEN], counter: u32, last: bool) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    let (head, tail) = nonce.split_at_mut(STREAM_NONCE_PREFIX_LEN);
    head.copy_from_slice(prefix);
    let (count, flag) = tail.split_at_mut(4);
    count.copy_from_slice(&counter.to_be_bytes());
    if let Some(f) = flag.first_mut() {
        *f = if last { LAST } else { NOT_LAST };
    }
    nonce
}

/// A fixed-capacity byte buffer, allocated once and bulk-zeroized on drop (and by `clear` on
/// failure paths). On the hot path it is `reset` without wiping: the next segment overwrites
/// it, and whatever it last held is wiped when it is dropped.
pub(crate) struct SegmentBuf {
    pub(crate) data: Box<[u8]>,
    pub(crate) len: usize,
}

impl SegmentBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            data: vec![0u8; capacity].into_boxed_slice(),
            len: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.data.len()
    }

    pub(crate) fn filled(&self) -> &[u8] {
        self.data.get(..self.len).unwrap_or_default()
    }

    /// Appends as much of `input` as fits; returns the rest.
    fn fill_from<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        let room = self.capacity().saturating_sub(self.len);
        let (take, rest) = input.split_at(room.min(input.len()));
        if let Some(dst) = self.data.get_mut(self.len..self.len + take.len()) {
            dst.copy_from_slice(take);
            self.len += take.len();
        }
        rest
    }

    /// Wipes the used part and empties the buffer.
    pub(crate) fn clear(&mut self) {
        if let Some(used) = self.data.get_mut(..self.len) {
            used.zeroize();
        }
        self.len = 0;
    }

    /// Wipes the whole buffer (what earlier segments left past the used part too) and empties
    /// it.
    pub(crate) fn wipe(&mut self) {
        self.data.zeroize();
        self.len = 0;
    }

    /// Empties the buffer without wiping it (it is wiped on drop).
    pub(crate) fn reset(&mut self) {
        self.len = 0;
    }
}

impl Drop for SegmentBuf {
    fn drop(&mut self) {
        self.data.zeroize();
    }
}

fn misuse(reason: &'static str) -> Error {
    Error::InvalidInput {
        what: "stream",
        reason,
    }
}

fn too_many_segments() -> Error {
    misuse("the stream reached its maximum of 2^32 segments")
}

/// Why a keyring stopped a running stream.
#[derive(Debug, Clone)]
pub(crate) enum StopReason {
    /// Its tenant was shredded.
    Shredded,
    /// Its tenant could not be read from the key store for longer than the keyring lets a
    /// key serve without confirmation (`key_ttl + max_stale`): whether it was shredded
    /// meanwhile is unknown, so the stream fails closed.
    Unconfirmed {
        /// The key store's name.
        backend: String,
        /// Since when the tenant was last read, in seconds.
        for_secs: u64,
    },
    /// Its key version could not be unwrapped again when the stream's key was due for
    /// confirmation (`key_ttl`): the KMS refused (a disabled or revoked root key), the version
    /// is gone, or the store now holds another key under it. The error a field operation
    /// would get, kept for every later check.
    KeyRefused(Arc<Error>),
    /// The KMS could not be asked to unwrap the stream's key version again (an outage) for
    /// longer than a cached key serves without it (`key_ttl + max_stale`): whether it was
    /// revoked meanwhile is unknown, so the stream fails closed.
    KeyUnconfirmed {
        /// The KMS backend's name.
        backend: String,
        /// Since when the KMS last unwrapped the key version, in seconds.
        for_secs: u64,
    },
}

/// What a running stream's key was derived from, for its confirmation with the KMS
/// (`Keyring::recheck_streams`): the tenant key version, the key check of the record it was
/// unwrapped from, when the KMS last unwrapped that version (coarse-clock ticks), since when
/// confirmations have found the KMS unreachable or the key served stale, and the read
/// sequence numbers that order it against tenant reads.
#[derive(Debug, Default)]
pub(crate) struct StreamKeyOrigin {
    pub(crate) version: u32,
    pub(crate) key_check: [u8; 32],
    pub(crate) confirmed_at: std::sync::atomic::AtomicU64,
    /// When (coarse-clock ticks) a check first found the KMS unreachable, or the key served
    /// stale, since the key was last confirmed; 0 when none did.
    pub(crate) failing_since: std::sync::atomic::AtomicU64,
    /// The keyring's read sequence when the stream registered (`Keyring::read_sequence`): a
    /// tenant read that began later saw at least what the stream started from.
    pub(crate) registered: u64,
    /// The read sequence at which the tenant metadata the stream started from began to be
    /// read: a read that began later may set its minimum.
    pub(crate) metadata_seq: u64,
}

impl StreamKeyOrigin {
    /// Notes that the key cache served the stream's key version, unwrapped at `loaded_at`:
    /// confirmed by the KMS then, or (`stale`) served without it during an outage, which
    /// then counts from `now` if it does not already.
    pub(crate) fn served(
        &self,
        loaded_at: coarsetime::Instant,
        stale: bool,
        now: coarsetime::Instant,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        self.confirmed_at.fetch_max(loaded_at.as_ticks(), Relaxed);
        if stale {
            let _ = self
                .failing_since
                .compare_exchange(0, now.as_ticks().max(1), Relaxed, Relaxed);
        } else {
            self.failing_since.store(0, Relaxed);
        }
    }

    /// Notes a check that found the KMS unreachable at `now` and returns since when it has
    /// been failing: from `now` if it was not, or if the KMS answered a call since
    /// (`answered`, coarse-clock ticks: that was another blip, not one outage).
    pub(crate) fn failing(&self, now: coarsetime::Instant, answered: u64) -> coarsetime::Instant {
        use std::sync::atomic::Ordering::Relaxed;
        let now_ticks = now.as_ticks().max(1);
        match self
            .failing_since
            .compare_exchange(0, now_ticks, Relaxed, Relaxed)
        {
            Ok(_) => now,
            Err(earlier) if answered > earlier => {
                self.failing_since.store(now_ticks, Relaxed);
                now
            }
            Err(earlier) => coarsetime::Instant::from_ticks(earlier),
        }
    }
}

/// Set by a keyring to stop a running stream of one tenant: for a reason (the first stays),
/// or because its key version fell below the tenant's minimum decryption version.
#[derive(Debug, Default)]
pub(crate) struct StreamStop {
    reason: std::sync::OnceLock<StopReason>,
    /// The tenant's minimum decryption version as the keyring last saw it (0: none seen).
    min_version: std::sync::atomic::AtomicU32,
    /// The key the stream was derived from, and when it registered.
    pub(crate) key: StreamKeyOrigin,
}

impl StreamStop {
    /// The stop of a stream with a key derived from `key`.
    pub(crate) fn new(key: StreamKeyOrigin) -> Self {
        Self {
            key,
            ..Self::default()
        }
    }

    /// Whether the stream was stopped already (for a reason, or its key version retired).
    pub(crate) fn is_stopped(&self) -> bool {
        self.reason.get().is_some()
            || self.key.version < self.min_version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a tenant read that began at read sequence `begun` may set this stream's
    /// minimum: it began after the read of the metadata the stream started from (an older
    /// one may predate a lowering this stream started after).
    pub(crate) fn minimum_applies(&self, begun: u64) -> bool {
        begun > self.key.metadata_seq
    }

    /// Whether a tenant read that began at read sequence `begun` began after this stream
    /// registered, so that its record is at least as new as the one the stream started from:
    /// only such a read may stop it for a version gone or replaced, or check its key with
    /// the KMS (an older one may predate the rotation that made the stream's version).
    pub(crate) fn read_after_start(&self, begun: u64) -> bool {
        begun > self.key.registered
    }

    /// Stops the stream holding it, for `reason` (unless it was stopped already).
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
    }

    /// Notes the tenant's minimum decryption version: a stream under an older version stops
    /// before its next segment. Never lowered.
    pub(crate) fn retire_below(&self, min: u32) {
        self.min_version
            .fetch_max(min, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Whether a running stream was stopped by its keyring (its tenant shredded, its key version
/// retired, or the tenant not confirmed by the key store for too long), checkable after the
/// stream object is gone; the default is a stream that cannot be (one not started through a
/// keyring).
#[derive(Debug, Clone, Default)]
pub struct Revocation(Option<(Arc<StreamStop>, TenantId, u32)>);

impl Revocation {
    /// Fails once the stream was stopped: [`Error::KeyDestroyed`] (shredded),
    /// [`Error::KeyVersionRetired`] (the tenant's minimum decryption version was raised above
    /// the stream's key version), [`Error::Store`] (the tenant could not be re-read for too
    /// long; retry once the key store is reachable), or — once the stream's key version was
    /// due for confirmation with the KMS — the error the KMS or the key lookup gave
    /// ([`Error::Kms`] for a disabled or revoked root key; `Unavailable` once the KMS could
    /// not be asked for longer than `key_ttl + max_stale`).
    pub fn check(&self) -> Result<(), Error> {
        let Some((stop, tenant, version)) = &self.0 else {
            return Ok(());
        };
        match stop.reason.get() {
            None => {
                let min = stop.min_version.load(std::sync::atomic::Ordering::Acquire);
                if *version < min {
                    return Err(Error::KeyVersionRetired {
                        tenant: tenant.clone(),
                        version: *version,
                        min,
                    });
                }
                Ok(())
            }
            Some(StopReason::Shredded) => Err(Error::KeyDestroyed {
                tenant: tenant.clone(),
            }),
            Some(StopReason::Unconfirmed { backend, for_secs }) => Err(Error::Store {
                backend: backend.clone(),
                source: crate::BackendError::new(
                    crate::BackendErrorKind::Unavailable,
                    format!(
                        "tenant '{tenant}' could not be re-read for {for_secs} s, longer than \
                         a key serves without it (cache key_ttl + max_stale): the stream is \
                         stopped, since the tenant may have been shredded; retry once the key \
                         store is reachable"
                    ),
                ),
            }),
            Some(StopReason::KeyRefused(error)) => Err(error.replay()),
            Some(StopReason::KeyUnconfirmed { backend, for_secs }) => Err(Error::Kms {
                backend: backend.clone(),
                source: crate::BackendError::new(
                    crate::BackendErrorKind::Unavailable,
                    format!(
                        "key version {version} of tenant '{tenant}' could not be unwrapped \
                         again for {for_secs} s, longer than a key serves without the KMS \
                         (cache key_ttl + max_stale): the stream is stopped, since the key \
                         may have been revoked; retry once the KMS is reachable"
                    ),
                ),
            }),
        }
    }
}

/// What both directions of a stream keep: the header (its encoding is every segment's
/// associated data), the per-stream key, and the counts behind [`StreamSummary`].
struct StreamState {
    key: Box<dyn AeadKey>,
    /// Set by the keyring when the stream's tenant is shredded (or cannot be confirmed): no
    /// segment is sealed or opened after that.
    revoked: Revocation,
    header: StreamHeader,
    header_bytes: [u8; STREAM_HEADER_LEN],
    /// Counter of the next segment.
    next_segment: u64,
    plaintext_bytes: u64,
    ciphertext_bytes: u64,
}

impl StreamState {
    /// Fails with [`Error::KeyDestroyed`] once the keyring revoked the stream (its tenant was
    /// shredded).
    fn check_not_revoked(&self) -> Result<(), Error> {
        self.revoked.check()
    }

    fn new(key: Box<dyn AeadKey>, header: StreamHeader, ciphertext_bytes: u64) -> Self {
        Self {
            key,
            revoked: Revocation::default(),
            header_bytes: header.to_bytes(),
            header,
            next_segment: 0,
            plaintext_bytes: 0,
            ciphertext_bytes,
        }
    }

    /// The nonce of the next segment, unless `limit` segments were already used.
    fn next_nonce(&self, limit: u64, last: bool) -> Result<[u8; 12], Error> {
        if self.next_segment >= limit {
            return Err(too_many_segments());
        }
        let counter = u32::try_from(self.next_segment).map_err(|_| too_many_segments())?;
        Ok(segment_nonce(&self.header.nonce_prefix, counter, last))
    }

    /// Counts one more segment of `len` plaintext bytes.
    fn count_segment(&mut self, len: usize) {
        self.next_segment += 1;
        self.plaintext_bytes += len as u64;
        self.ciphertext_bytes += (len + TAG_LEN) as u64;
    }

    fn summary(&self) -> StreamSummary {
        StreamSummary {
            key_version: self.header.key_version,
            segment_size: self.header.segment_size,
            segments: self.next_segment,
            plaintext_bytes: self.plaintext_bytes,
            ciphertext_bytes: self.ciphertext_bytes,
        }
    }

    /// The `Debug` form of either direction, named `name`: sizes and counts, never the key.
    fn debug_as(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("key_version", &self.header.key_version)
            .field("segment_size", &self.header.segment_size)
            .field("segments", &self.next_segment)
            .finish_non_exhaustive()
    }
}

/// One direction of a stream, as the push loop both share sees it.
trait SegmentPush {
    /// The input not yet processed: at most one segment's worth.
    fn pending(&mut self) -> &mut SegmentBuf;

    /// Seals or opens the next segment, which is not the last: `whole`, straight from the
    /// input, or (`None`) the buffered one.
    fn process(&mut self, whole: Option<&[u8]>, out: &mut Vec<u8>) -> Result<(), Error>;

    /// Buffers `input` and processes every segment it completes. A full buffer is processed
    /// only once more input shows it is not the last segment, so up to one segment stays
    /// buffered; a whole segment's worth of input while nothing is buffered is processed
    /// without a copy.
    fn push_segments(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        let segment = self.pending().capacity();
        while !input.is_empty() {
            if self.pending().len == segment {
                self.process(None, out)?;
            }
            if self.pending().len == 0 && input.len() > segment {
                let (now, rest) = input.split_at(segment);
                self.process(Some(now), out)?;
                input = rest;
                continue;
            }
            input = self.pending().fill_from(input);
        }
        Ok(())
    }
}

/// Encrypts one stream, pushed in chunks of any size (see the module docs). The output is the
/// header (with the first output) followed by sealed segments, appended to the caller's buffer
/// as they complete.
pub struct StreamEncryptor {
    provider: &'static CryptoProvider,
    state: StreamState,
    /// Plaintext not yet sealed: at most one segment.
    pending: SegmentBuf,
    header_written: bool,
    /// Finished or failed: refuses further input.
    closed: bool,
}

impl std::fmt::Debug for StreamEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.state.debug_as("StreamEncryptor", f)
    }
}

impl StreamEncryptor {
    /// Makes the stream stop (with [`Revocation::check`]'s error, naming `tenant`) before its
    /// next segment once `stop` is set: the keyring sets it when the tenant is shredded, or
    /// raises its minimum decryption version above this stream's key version.
    pub(crate) fn revocable(&mut self, stop: Arc<StreamStop>, tenant: TenantId) {
        let version = self.state.header.key_version;
        self.state.revoked = Revocation(Some((stop, tenant, version)));
    }

    /// A new stream under `tenant_key` (version `key_version`) and `context`, with a fresh
    /// random salt and nonce prefix from the operating system.
    pub fn new(
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        key_version: u32,
        context: &EncryptionContext,
        options: StreamOptions,
    ) -> Result<Self, Error> {
        Self::with_randomness(
            provider,
            tenant_key,
            key_version,
            context,
            options,
            os_random(provider)?,
            os_random(provider)?,
        )
    }

    /// Test seam (feature `testkit`): a stream with a caller-chosen salt and nonce prefix, for
    /// known-answer vectors. Reusing them under one tenant key and context reuses nonces.
    #[cfg(feature = "testkit")]
    pub fn with_fixed_randomness(
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        key_version: u32,
        context: &EncryptionContext,
        options: StreamOptions,
        salt: [u8; STREAM_SALT_LEN],
        nonce_prefix: [u8; STREAM_NONCE_PREFIX_LEN],
    ) -> Result<Self, Error> {
        Self::with_randomness(
            provider,
            tenant_key,
            key_version,
            context,
            options,
            salt,
            nonce_prefix,
        )
    }

    fn with_randomness(
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        key_version: u32,
        context: &EncryptionContext,
        options: StreamOptions,
        salt: [u8; STREAM_SALT_LEN],
        nonce_prefix: [u8; STREAM_NONCE_PREFIX_LEN],
    ) -> Result<Self, Error> {
        if key_version == 0 {
            return Err(Error::InvalidInput {
                what: "key version",
                reason: "must be at least 1",
            });
        }
        check_segment_size(options.segment_size).map_err(|_| Error::InvalidInput {
            what: "segment size",
            reason: "must be between 4096 and 16777216 bytes",
        })?;
        let header = StreamHeader {
            key_version,
            segment_size: options.segment_size,
            salt,
            nonce_prefix,
        };
        let key = derive_stream_key(provider, tenant_key, &salt, context)?;
        Ok(Self {
            provider,
            state: StreamState::new(key, header, 0),
            pending: SegmentBuf::new(options.segment_size as usize),
            header_written: false,
            closed: false,
        })
    }

    /// The stream's header (written with the first output).
    pub fn header(&self) -> &StreamHeader {
        &self.state.header
    }

    pub(crate) fn write_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            out.extend_from_slice(&self.state.header_bytes);
            self.header_written = true;
            self.state.ciphertext_bytes += STREAM_HEADER_LEN as u64;
        }
    }

    /// Closes the stream after an error and wipes the plaintext it still buffers: a failed
    /// stream takes no more input, so nothing is kept until the encryptor is dropped.
    fn fail(&mut self, error: Error) -> Error {
        self.closed = true;
        // The whole buffer: a segment sealed before left its plaintext past `len` (`reset`).
        self.pending.wipe();
        error
    }

    /// Checks that the stream was not revoked before a segment is sealed; fails it if it was.
    fn check_not_revoked(&mut self) -> Result<(), Error> {
        self.state.check_not_revoked().map_err(|e| self.fail(e))
    }

    /// The nonce of the next segment; fails the stream when the counters are used up (a
    /// non-final segment must leave a counter for the final one).
    fn next_nonce(&mut self, last: bool) -> Result<[u8; 12], Error> {
        let limit = if last { MAX_SEGMENTS } else { MAX_SEGMENTS - 1 };
        self.state.next_nonce(limit, last).map_err(|e| self.fail(e))
    }

    /// Fails the stream after a failed seal and returns the error.
    fn seal_failed(&mut self) -> Error {
        self.fail(Error::Crypto {
            provider: self.provider.name,
            what: "AEAD seal",
        })
    }

    /// Seals `plaintext` as the next segment and appends it to `out`.
    fn seal_segment(
        &mut self,
        plaintext: Option<&[u8]>,
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        self.check_not_revoked()?;
        let nonce = self.next_nonce(last)?;
        let start = out.len();
        let data = plaintext.unwrap_or(self.pending.filled());
        // Reserve first: a reallocation then moves only ciphertext, never plaintext.
        out.reserve(data.len() + TAG_LEN);
        out.extend_from_slice(data);
        let len = data.len();
        let sealed = match out.get_mut(start..) {
            Some(body) => self.state.key.seal(&nonce, &self.state.header_bytes, body),
            None => Err(crate::crypto::CryptoFailure),
        };
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                self.state.count_segment(len);
                if plaintext.is_none() {
                    self.pending.reset();
                }
                Ok(())
            }
            Err(_) => {
                // The buffer may still hold plaintext.
                if let Some(body) = out.get_mut(start..) {
                    body.zeroize();
                }
                out.truncate(start);
                Err(self.seal_failed())
            }
        }
    }

    /// Feeds plaintext (any length, possibly empty) and appends to `out` the header (the first
    /// time) and every segment this completes. A segment is sealed only once more input shows
    /// it is not the last, so up to one segment stays buffered inside.
    pub fn push(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if self.closed {
            // A revoked stream keeps saying so.
            self.state.check_not_revoked()?;
            return Err(misuse("push after the stream was finished or failed"));
        }
        self.write_header(out);
        self.push_segments(plaintext, out)
    }

    /// Ends the stream: seals the buffered plaintext (possibly empty) as the final segment and
    /// appends it (and the header, for an empty stream) to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<StreamSummary, Error> {
        if self.closed {
            self.state.check_not_revoked()?;
            return Err(misuse("finish after the stream was finished or failed"));
        }
        self.write_header(out);
        self.seal_segment(None, true, out)?;
        self.closed = true;
        Ok(self.summary())
    }

    /// Fast path for a caller that reads whole segments itself (`Keyring::encrypt_stream`):
    /// seals `segment` in place as the next segment and returns its tag. A non-final segment
    /// must be exactly `segment_size` bytes, a final one at most that; nothing may have been
    /// pushed. The header comes from [`StreamEncryptor::write_header`] first.
    pub(crate) fn seal_in_place(
        &mut self,
        segment: &mut [u8],
        last: bool,
    ) -> Result<[u8; TAG_LEN], Error> {
        let size = self.pending.capacity();
        if self.closed
            || !self.header_written
            || self.pending.len != 0
            || segment.len() > size
            || (!last && segment.len() != size)
        {
            return Err(misuse("whole-segment sealing out of order"));
        }
        self.check_not_revoked()?;
        let nonce = self.next_nonce(last)?;
        match self
            .state
            .key
            .seal(&nonce, &self.state.header_bytes, segment)
        {
            Ok(tag) => {
                self.state.count_segment(segment.len());
                self.closed = last;
                Ok(tag)
            }
            Err(_) => {
                segment.zeroize();
                Err(self.seal_failed())
            }
        }
    }

    /// The summary so far (complete once the final segment is sealed).
    pub(crate) fn summary(&self) -> StreamSummary {
        self.state.summary()
    }
}

impl SegmentPush for StreamEncryptor {
    fn pending(&mut self) -> &mut SegmentBuf {
        &mut self.pending
    }

    fn process(&mut self, whole: Option<&[u8]>, out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_segment(whole, false, out)
    }
}

/// Decrypts the segments of one stream, pushed in chunks of any size, after its header was
/// parsed with [`StreamHeader::parse`] (the keyring's `AuditedStreamDecryptor` accepts the
/// whole stream, header included). Plaintext is released segment by segment, each only after
/// it authenticated; truncation is reported by [`StreamDecryptor::finish`], so all output is
/// provisional until `finish` succeeds.
pub struct StreamDecryptor {
    state: StreamState,
    /// Ciphertext of the segment being received: at most `segment_size + 16` bytes.
    pending: SegmentBuf,
    closed: bool,
}

impl std::fmt::Debug for StreamDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.state.debug_as("StreamDecryptor", f)
    }
}

impl StreamDecryptor {
    /// The stream's revocation by the keyring (its tenant shredded), checkable after this
    /// decryptor is gone: a caller holding plaintext it released can check it before passing
    /// that plaintext on.
    pub fn revocation(&self) -> Revocation {
        self.state.revoked.clone()
    }

    /// See [`StreamEncryptor::revocable`]: no segment is opened (no more plaintext released)
    /// once `stop` is set.
    pub(crate) fn revocable(&mut self, stop: Arc<StreamStop>, tenant: TenantId) {
        let version = self.state.header.key_version;
        self.state.revoked = Revocation(Some((stop, tenant, version)));
    }

    /// A decryptor for the stream with `header` under `tenant_key` (the version the header
    /// names) and `context`.
    pub fn new(
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        context: &EncryptionContext,
        header: &StreamHeader,
    ) -> Result<Self, Error> {
        // `parse` checked it; a header built otherwise is checked again before any allocation.
        check_segment_size(header.segment_size)?;
        let key = derive_stream_key(provider, tenant_key, &header.salt, context)?;
        Ok(Self {
            state: StreamState::new(key, *header, STREAM_HEADER_LEN as u64),
            pending: SegmentBuf::new(header.segment_size as usize + TAG_LEN),
            closed: false,
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.state.header
    }

    /// Marks the decryptor failed on a stream that ends `tail` bytes into a final segment
    /// shorter than its tag, and returns the *truncated* error (lengths of the whole stream).
    fn truncated(&mut self, tail: usize) -> Error {
        let seen = self.state.ciphertext_bytes + tail as u64;
        let min = self.state.ciphertext_bytes + TAG_LEN as u64;
        self.closed = true;
        self.pending.clear();
        FormatError::Truncated {
            len: usize::try_from(seen).unwrap_or(usize::MAX),
            min: usize::try_from(min).unwrap_or(usize::MAX),
        }
        .into()
    }

    /// Marks the decryptor failed (it refuses further input) and returns the opaque error.
    fn failed(&mut self) -> Error {
        self.closed = true;
        self.pending.clear();
        Error::DecryptionFailed
    }

    /// Opens the next segment (`ciphertext ‖ tag`, or the buffered one) into `out`.
    fn open_segment(
        &mut self,
        sealed: Option<&[u8]>,
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        self.state.check_not_revoked()?;
        let nonce = match self.state.next_nonce(MAX_SEGMENTS, last) {
            Ok(nonce) => nonce,
            Err(e) => {
                self.closed = true;
                return Err(e);
            }
        };
        let data = sealed.unwrap_or(self.pending.filled());
        let Some(split) = data.len().checked_sub(TAG_LEN) else {
            return Err(self.failed());
        };
        let (ciphertext, tag) = data.split_at(split);
        let start = out.len();
        crate::secret::reserve_wiped(out, ciphertext.len());
        out.resize(start + ciphertext.len(), 0);
        let opened = match out.get_mut(start..) {
            Some(dst) => {
                self.state
                    .key
                    .open(&nonce, &self.state.header_bytes, ciphertext, tag, dst)
            }
            None => Err(crate::crypto::CryptoFailure),
        };
        let len = ciphertext.len();
        if opened.is_err() {
            // The provider zeroed `dst`; drop it.
            out.truncate(start);
            return Err(self.failed());
        }
        self.state.count_segment(len);
        if sealed.is_none() {
            self.pending.reset();
        }
        Ok(())
    }

    /// Feeds ciphertext (any length) and appends to `out` the plaintext of every segment this
    /// completes and authenticates. A full segment is opened only once more input shows it is
    /// not the last, so up to one segment stays buffered inside. On error nothing more is
    /// appended and the decryptor refuses further input.
    ///
    /// `out` belongs to the caller: to keep plaintext off the heap after use, pass a
    /// `Zeroizing<Vec<u8>>` (or zeroize it). When `out` must grow, its old buffer is wiped
    /// before it is freed (reserving capacity up front spares those copies).
    pub fn push(&mut self, ciphertext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if self.closed {
            return Err(misuse("push after the stream was finished or failed"));
        }
        self.push_segments(ciphertext, out)
    }

    /// Fast path for a caller that reads whole segments itself (`Keyring::decrypt_stream`):
    /// opens `sealed` (`ciphertext ‖ tag`) as the next segment into `out`. A non-final segment
    /// must be exactly `segment_size + 16` bytes; the final one is what remains of the stream
    /// (a *truncated* error below 16 bytes), and completes the stream. Nothing may have been
    /// pushed.
    pub(crate) fn open_whole(
        &mut self,
        sealed: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<Option<StreamSummary>, Error> {
        let full = self.pending.capacity();
        if self.closed || self.pending.len != 0 || sealed.len() > full {
            return Err(misuse("whole-segment opening out of order"));
        }
        if !last && sealed.len() != full {
            return Err(misuse("a non-final segment must be whole"));
        }
        if last && sealed.len() < TAG_LEN {
            return Err(self.truncated(sealed.len()));
        }
        self.open_segment(Some(sealed), last, out)?;
        if !last {
            return Ok(None);
        }
        self.closed = true;
        Ok(Some(self.state.summary()))
    }

    /// Ends the stream: opens the buffered bytes as the final segment and appends its
    /// plaintext to `out`. Fails with [`Error::DecryptionFailed`] if the stream was truncated
    /// at a segment boundary or extended, and with a *truncated* format error if it ends
    /// inside a segment's tag (or right after the header). Only now is the output final.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<StreamSummary, Error> {
        if self.closed {
            return Err(misuse("finish after the stream was finished or failed"));
        }
        if self.pending.len < TAG_LEN {
            return Err(self.truncated(self.pending.len));
        }
        self.open_segment(None, true, out)?;
        self.closed = true;
        Ok(self.state.summary())
    }
}

impl SegmentPush for StreamDecryptor {
    fn pending(&mut self) -> &mut SegmentBuf {
        &mut self.pending
    }

    fn process(&mut self, whole: Option<&[u8]>, out: &mut Vec<u8>) -> Result<(), Error> {
        self.open_segment(whole, false, out)
    }
}

// ----- async adapters --------------------------------------------------------------------------

/// A boxed audit write, polled by the adapters before they report success.
pub(crate) type AuditFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// The hook through which the keyring audits a stream run by an adapter.
pub(crate) trait StreamAuditHook: Send {
    /// The record of a successful stream (marks the hook as done).
    fn succeed(&mut self) -> AuditFuture;
    /// Remembers why the stream failed; the record is written when the hook is dropped.
    fn fail(&mut self, kind: &'static str);
}

/// A phiseal error as an I/O error (kind `InvalidData` for stream content, `Other` else).
pub(crate) fn io_error(error: Error) -> std::io::Error {
    match error {
        Error::Io { source, .. } => source,
        e @ (Error::DecryptionFailed | Error::Format(_)) => {
            std::io::Error::new(std::io::ErrorKind::InvalidData, e)
        }
        e => std::io::Error::other(e),
    }
}

fn closed_error() -> std::io::Error {
    std::io::Error::other(misuse("the stream was finished or failed"))
}

enum WriterState {
    Open,
    /// The final segment is sealed; draining it, then shutting the inner writer down.
    Draining,
    ShuttingDown,
    Auditing(AuditFuture),
    Done,
    Failed,
}

/// An `AsyncWrite` that encrypts what is written to it into a stream written to `W`.
/// `poll_shutdown` (`AsyncWriteExt::shutdown`) seals the final segment, writes it, shuts `W`
/// down and (from the keyring) writes the audit record: a writer dropped before a successful
/// shutdown leaves an incomplete stream that every reader rejects.
pub struct EncryptingWriter<W> {
    inner: W,
    encryptor: StreamEncryptor,
    /// Sealed bytes not yet written to `inner`: at most the header and one segment.
    out: Vec<u8>,
    written: usize,
    state: WriterState,
    audit: Option<Box<dyn StreamAuditHook>>,
    summary: Option<StreamSummary>,
}

impl<W> std::fmt::Debug for EncryptingWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptingWriter")
            .field("encryptor", &self.encryptor)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> EncryptingWriter<W> {
    /// Encrypts into `inner` with `encryptor` (not audited: the keyring's
    /// `Keyring::encrypting_writer` adds the audit record).
    pub fn new(encryptor: StreamEncryptor, inner: W) -> Self {
        Self::with_audit(encryptor, inner, None)
    }

    pub(crate) fn with_audit(
        encryptor: StreamEncryptor,
        inner: W,
        audit: Option<Box<dyn StreamAuditHook>>,
    ) -> Self {
        let capacity = encryptor.pending.capacity() + TAG_LEN + STREAM_HEADER_LEN;
        Self {
            inner,
            encryptor,
            out: Vec::with_capacity(capacity),
            written: 0,
            state: WriterState::Open,
            audit,
            summary: None,
        }
    }

    /// The summary, once `shutdown` succeeded.
    pub fn summary(&self) -> Option<StreamSummary> {
        self.summary
    }

    /// The inner writer.
    pub fn into_inner(self) -> W {
        self.inner
    }

    fn fail(&mut self, kind: &'static str) {
        self.state = WriterState::Failed;
        if let Some(audit) = self.audit.as_mut() {
            audit.fail(kind);
        }
    }

    /// Writes the pending sealed bytes to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some(rest) = self.out.get(self.written..).filter(|r| !r.is_empty()) {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, rest)) {
                Ok(0) => {
                    self.fail("io");
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => self.written += n,
                Err(e) => {
                    self.fail("io");
                    return Poll::Ready(Err(e));
                }
            }
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for EncryptingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.state, WriterState::Open) {
            return Poll::Ready(Err(closed_error()));
        }
        ready!(this.poll_drain(cx))?;
        // At most one segment per call, so `out` never holds more than one.
        let take = buf.len().min(this.encryptor.pending.capacity());
        let chunk = buf.get(..take).unwrap_or_default();
        if let Err(e) = this.encryptor.push(chunk, &mut this.out) {
            this.fail(e.kind());
            return Poll::Ready(Err(io_error(e)));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.state, WriterState::Open | WriterState::Done) {
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                WriterState::Open => {
                    ready!(this.poll_drain(cx))?;
                    match this.encryptor.finish(&mut this.out) {
                        Ok(summary) => {
                            this.summary = Some(summary);
                            this.state = WriterState::Draining;
                        }
                        Err(e) => {
                            this.fail(e.kind());
                            return Poll::Ready(Err(io_error(e)));
                        }
                    }
                }
                WriterState::Draining => {
                    ready!(this.poll_drain(cx))?;
                    this.state = WriterState::ShuttingDown;
                }
                WriterState::ShuttingDown => {
                    if let Err(e) = ready!(Pin::new(&mut this.inner).poll_shutdown(cx)) {
                        this.fail("io");
                        return Poll::Ready(Err(e));
                    }
                    this.state = match this.audit.as_mut() {
                        Some(audit) => WriterState::Auditing(audit.succeed()),
                        None => WriterState::Done,
                    };
                }
                WriterState::Auditing(record) => {
                    let result = ready!(record.as_mut().poll(cx));
                    match result {
                        Ok(()) => this.state = WriterState::Done,
                        Err(e) => {
                            // The success record could not be written: fail closed.
                            this.state = WriterState::Failed;
                            this.summary = None;
                            return Poll::Ready(Err(io_error(e)));
                        }
                    }
                }
                WriterState::Done => return Poll::Ready(Ok(())),
                WriterState::Failed => return Poll::Ready(Err(closed_error())),
            }
        }
    }
}

enum ReaderState {
    Reading,
    /// End of input reached and the final segment authenticated; writing the audit record
    /// before the final segment's plaintext is released.
    Auditing(AuditFuture),
    Eof,
    Failed,
}

/// An `AsyncRead` that decrypts the stream read from `R` (positioned after the header, which
/// the caller parsed to choose the key; the keyring's `Keyring::decrypting_reader` does this).
/// Each segment's plaintext is returned only once it authenticated; truncation or extension
/// is an `InvalidData` error at the end, so what was read is provisional until a read returns
/// end of file (`Ok(0)`) without error.
pub struct DecryptingReader<R> {
    inner: R,
    decryptor: StreamDecryptor,
    /// Ciphertext read from `inner` (one segment's worth at most).
    input: SegmentBuf,
    /// Authenticated plaintext not yet returned: at most one segment, never reallocated, wiped
    /// on drop.
    out: Vec<u8>,
    read: usize,
    state: ReaderState,
    audit: Option<Box<dyn StreamAuditHook>>,
    summary: Option<StreamSummary>,
}

impl<R> std::fmt::Debug for DecryptingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptingReader")
            .field("decryptor", &self.decryptor)
            .finish_non_exhaustive()
    }
}

impl<R> Drop for DecryptingReader<R> {
    fn drop(&mut self) {
        // The whole allocation (`Vec::zeroize` also wipes spare capacity): earlier segments'
        // plaintext may remain beyond the current length.
        self.out.zeroize();
    }
}

impl<R: AsyncRead + Unpin> DecryptingReader<R> {
    /// Decrypts what `inner` yields (the bytes after the header) with `decryptor` (not audited:
    /// `Keyring::decrypting_reader` adds the audit records).
    pub fn new(decryptor: StreamDecryptor, inner: R) -> Self {
        Self::with_audit(decryptor, inner, None)
    }

    pub(crate) fn with_audit(
        decryptor: StreamDecryptor,
        inner: R,
        audit: Option<Box<dyn StreamAuditHook>>,
    ) -> Self {
        let sealed = decryptor.pending.capacity();
        Self {
            inner,
            decryptor,
            input: SegmentBuf::new(sealed),
            out: Vec::with_capacity(sealed),
            read: 0,
            state: ReaderState::Reading,
            audit,
            summary: None,
        }
    }

    /// The summary, once end of file was returned.
    pub fn summary(&self) -> Option<StreamSummary> {
        self.summary
    }

    fn fail(&mut self, kind: &'static str) {
        self.state = ReaderState::Failed;
        self.out.as_mut_slice().zeroize();
        self.out.clear();
        self.read = 0;
        if let Some(audit) = self.audit.as_mut() {
            audit.fail(kind);
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for DecryptingReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                ReaderState::Auditing(record) => {
                    let result = ready!(record.as_mut().poll(cx));
                    match result {
                        Ok(()) => this.state = ReaderState::Eof,
                        Err(e) => {
                            this.fail("audit");
                            this.summary = None;
                            return Poll::Ready(Err(io_error(e)));
                        }
                    }
                    continue;
                }
                ReaderState::Failed => return Poll::Ready(Err(closed_error())),
                ReaderState::Reading | ReaderState::Eof => {}
            }
            if let Some(rest) = this.out.get(this.read..).filter(|r| !r.is_empty()) {
                // A segment opened before the stream was revoked (its tenant shredded) is not
                // handed out after it: wiped instead.
                if let Err(e) = this.decryptor.state.check_not_revoked() {
                    this.fail(e.kind());
                    this.summary = None;
                    return Poll::Ready(Err(io_error(e)));
                }
                let n = rest.len().min(buf.remaining());
                buf.put_slice(rest.get(..n).unwrap_or_default());
                this.read += n;
                return Poll::Ready(Ok(()));
            }
            if matches!(this.state, ReaderState::Eof) {
                return Poll::Ready(Ok(()));
            }
            // Everything returned: read more ciphertext (the next segment overwrites this one;
            // the buffer is wiped on drop).
            this.out.clear();
            this.read = 0;
            this.input.reset();
            let mut chunk = ReadBuf::new(&mut this.input.data);
            if let Err(e) = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk)) {
                this.fail("io");
                return Poll::Ready(Err(e));
            }
            let n = chunk.filled().len();
            this.input.len = n;
            if n == 0 {
                match this.decryptor.finish(&mut this.out) {
                    Ok(summary) => {
                        this.summary = Some(summary);
                        this.state = match this.audit.as_mut() {
                            Some(audit) => ReaderState::Auditing(audit.succeed()),
                            None => ReaderState::Eof,
                        };
                    }
                    Err(e) => {
                        this.fail(e.kind());
                        return Poll::Ready(Err(io_error(e)));
                    }
                }
            } else {
                let pushed = this.decryptor.push(this.input.filled(), &mut this.out);
                if let Err(e) = pushed {
                    this.fail(e.kind());
                    return Poll::Ready(Err(io_error(e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::TenantId;
    use crate::crypto::{aws_lc, rust_crypto};

    const SEG: usize = MIN_SEGMENT_SIZE as usize;

    fn cx(field: &str) -> EncryptionContext {
        EncryptionContext::new(TenantId::new("acme").unwrap(), field).unwrap()
    }

    fn key(byte: u8) -> TenantKey {
        TenantKey::from_bytes([byte; 32])
    }

    fn options() -> StreamOptions {
        StreamOptions {
            segment_size: MIN_SEGMENT_SIZE,
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn a_revoked_encryptor_wipes_the_plaintext_it_buffers_at_once() {
        let mut e =
            StreamEncryptor::new(&aws_lc::PROVIDER, &key(1), 7, &cx("scan"), options()).unwrap();
        let stop = Arc::new(StreamStop::default());
        e.revocable(Arc::clone(&stop), TenantId::new("acme").unwrap());
        let mut out = Vec::new();
        // In small pieces, so that they are gathered in the buffer: a segment, sealed from the
        // buffer once more input came (`reset` leaves its plaintext there), then 100 bytes.
        for piece in [0xA5u8; SEG + 100].chunks(1000) {
            e.push(piece, &mut out).unwrap();
        }
        assert_eq!(e.pending.len, 100);
        assert!(e.pending.data.iter().all(|&b| b == 0xA5));
        stop.stop(StopReason::Shredded);
        let err = e.finish(&mut out).unwrap_err();
        assert!(matches!(err, Error::KeyDestroyed { .. }), "{err:?}");
        assert_eq!(e.pending.len, 0);
        assert!(e.pending.data.iter().all(|&b| b == 0), "plaintext kept");
        // It stays failed, and says why.
        let again = e.push(&[0xA5; 10], &mut out).unwrap_err();
        assert!(matches!(again, Error::KeyDestroyed { .. }), "{again:?}");
    }

    /// Encrypts `plaintext` pushed in chunks of `chunk` bytes.
    fn encrypt(
        provider: &'static CryptoProvider,
        k: &TenantKey,
        c: &EncryptionContext,
        plaintext: &[u8],
        chunk: usize,
    ) -> Vec<u8> {
        let mut e = StreamEncryptor::new(provider, k, 7, c, options()).unwrap();
        let mut out = Vec::new();
        for piece in plaintext.chunks(chunk.max(1)) {
            e.push(piece, &mut out).unwrap();
        }
        let summary = e.finish(&mut out).unwrap();
        assert_eq!(summary.plaintext_bytes, plaintext.len() as u64);
        assert_eq!(summary.ciphertext_bytes, out.len() as u64);
        assert_eq!(
            summary.segments,
            plaintext.len().div_ceil(SEG).max(1) as u64
        );
        out
    }

    fn decrypt(
        provider: &'static CryptoProvider,
        k: &TenantKey,
        c: &EncryptionContext,
        stream: &[u8],
        chunk: usize,
    ) -> Result<Vec<u8>, Error> {
        let header = StreamHeader::parse(stream)?;
        let mut d = StreamDecryptor::new(provider, k, c, &header)?;
        let mut out = Vec::new();
        for piece in stream[STREAM_HEADER_LEN..].chunks(chunk.max(1)) {
            d.push(piece, &mut out)?;
        }
        d.finish(&mut out)?;
        Ok(out)
    }

    /// The segments of a stream (after the header), for tampering.
    fn segments(stream: &[u8]) -> Vec<&[u8]> {
        stream[STREAM_HEADER_LEN..].chunks(SEG + TAG_LEN).collect()
    }

    fn providers() -> [&'static CryptoProvider; 2] {
        [&aws_lc::PROVIDER, &rust_crypto::PROVIDER]
    }

    #[test]
    fn round_trips_around_segment_boundaries_with_any_chunking() {
        let k = key(1);
        let c = cx("scan");
        for len in [
            0,
            1,
            SEG - 1,
            SEG,
            SEG + 1,
            2 * SEG,
            2 * SEG + 1,
            5 * SEG + 17,
        ] {
            let plaintext = data(len);
            for chunk in [
                1,
                7,
                SEG - 1,
                SEG,
                SEG + 1,
                SEG + TAG_LEN,
                3 * SEG,
                usize::MAX,
            ] {
                for (pe, pd) in [(0, 0), (0, 1), (1, 0)] {
                    let (pe, pd) = (providers()[pe], providers()[pd]);
                    let stream = encrypt(pe, &k, &c, &plaintext, chunk.min(len.max(1)));
                    let expect = STREAM_HEADER_LEN + len + TAG_LEN * len.div_ceil(SEG).max(1);
                    assert_eq!(stream.len(), expect, "len {len}");
                    let back = decrypt(pd, &k, &c, &stream, chunk).unwrap();
                    assert!(back == plaintext, "len {len} chunk {chunk}");
                }
            }
        }
    }

    #[test]
    fn empty_stream_is_one_final_empty_segment() {
        let stream = encrypt(&aws_lc::PROVIDER, &key(1), &cx("f"), b"", 1);
        assert_eq!(stream.len(), STREAM_HEADER_LEN + TAG_LEN);
        assert_eq!(stream[0], STREAM_FORMAT_V1);
        // Header alone: truncated.
        assert!(matches!(
            decrypt(
                &aws_lc::PROVIDER,
                &key(1),
                &cx("f"),
                &stream[..STREAM_HEADER_LEN],
                1
            ),
            Err(Error::Format(FormatError::Truncated { .. }))
        ));
    }

    #[test]
    fn tampering_is_detected() {
        let (k, c, p) = (key(2), cx("doc"), &aws_lc::PROVIDER);
        let plaintext = data(3 * SEG + 5);
        let stream = encrypt(p, &k, &c, &plaintext, 1000);
        let header = &stream[..STREAM_HEADER_LEN];
        let segs = segments(&stream);
        assert_eq!(segs.len(), 4);
        let join = |parts: &[&[u8]]| -> Vec<u8> {
            let mut v = header.to_vec();
            for p in parts {
                v.extend_from_slice(p);
            }
            v
        };
        let fails = |s: &[u8]| {
            for chunk in [1, 100, usize::MAX] {
                assert!(decrypt(p, &k, &c, s, chunk).is_err());
            }
        };
        // Truncated: final segment dropped; everything but the first segment dropped.
        fails(&join(&segs[..3]));
        fails(&join(&segs[..1]));
        // Reordered.
        fails(&join(&[segs[1], segs[0], segs[2], segs[3]]));
        // Duplicated.
        fails(&join(&[segs[0], segs[0], segs[1], segs[2], segs[3]]));
        // Extended: a segment after the final one, or a lone tag's worth of bytes.
        fails(&join(&[segs[0], segs[1], segs[2], segs[3], segs[0]]));
        fails(&join(&[segs[0], segs[1], segs[2], segs[3], &[0u8; 16]]));
        // Cut inside the final segment's tag.
        fails(&stream[..stream.len() - 1]);
        // A segment swapped in from another stream under the same key and context.
        let other = encrypt(p, &k, &c, &plaintext, 1000);
        let other_segs = segments(&other);
        fails(&join(&[segs[0], other_segs[1], segs[2], segs[3]]));
        // Any flipped bit in the header or a tag.
        for i in [1, 2, 5, 9, 10, 41, 42, 48] {
            let mut s = stream.clone();
            s[i] ^= 0x01;
            fails(&s);
        }
        let mut s = stream.clone();
        let last = s.len() - 1;
        s[last] ^= 0x80;
        fails(&s);
        // Wrong context or key.
        assert!(matches!(
            decrypt(p, &k, &cx("other"), &stream, 64),
            Err(Error::DecryptionFailed)
        ));
        let with_record = cx("doc").with_record("r1").unwrap();
        assert!(decrypt(p, &k, &with_record, &stream, 64).is_err());
        assert!(decrypt(p, &key(3), &c, &stream, 64).is_err());
        // Untouched, it still decrypts.
        assert!(decrypt(p, &k, &c, &stream, 64).unwrap() == plaintext);
    }

    #[test]
    fn no_plaintext_of_a_failing_segment_is_released() {
        let (k, c, p) = (key(2), cx("doc"), &rust_crypto::PROVIDER);
        let stream = encrypt(p, &k, &c, &data(2 * SEG + 1), SEG);
        let mut bad = stream.clone();
        bad[STREAM_HEADER_LEN + SEG + TAG_LEN + 3] ^= 1; // second segment
        let header = StreamHeader::parse(&bad).unwrap();
        let mut d = StreamDecryptor::new(p, &k, &c, &header).unwrap();
        let mut out = Vec::new();
        let err = d.push(&bad[STREAM_HEADER_LEN..], &mut out).unwrap_err();
        assert!(matches!(err, Error::DecryptionFailed));
        assert_eq!(out.len(), SEG, "only the first, authentic segment");
        assert!(d.push(b"x", &mut out).is_err());
        assert!(d.finish(&mut out).is_err());
    }

    #[test]
    fn headers_are_validated() {
        let stream = encrypt(&aws_lc::PROVIDER, &key(1), &cx("f"), b"abc", 1);
        let parse = |s: &[u8]| StreamHeader::parse(s).map(|_| ());
        assert!(parse(&stream).is_ok());
        assert!(matches!(
            parse(&stream[..STREAM_HEADER_LEN - 1]),
            Err(Error::Format(FormatError::Truncated { .. }))
        ));
        let mut s = stream.clone();
        s[0] = 0x01;
        assert!(matches!(
            parse(&s),
            Err(Error::Format(FormatError::UnknownVersion(1)))
        ));
        let mut s = stream.clone();
        s[1] = 0x02;
        assert!(matches!(
            parse(&s),
            Err(Error::Format(FormatError::UnknownAlgorithm(2)))
        ));
        let mut s = stream.clone();
        s[2..6].copy_from_slice(&[0; 4]);
        assert!(matches!(
            parse(&s),
            Err(Error::Format(FormatError::ZeroKeyVersion))
        ));
        for bad in [0u32, 4095, 16 * 1024 * 1024 + 1, u32::MAX] {
            let mut s = stream.clone();
            s[6..10].copy_from_slice(&bad.to_be_bytes());
            assert!(matches!(
                parse(&s),
                Err(Error::Format(FormatError::BadSegmentSize(_)))
            ));
        }
        // A field ciphertext is not a stream, and a stream is not a field ciphertext.
        assert!(crate::format::parse(&stream).is_err());
    }

    #[test]
    fn segment_size_and_key_version_are_checked_on_write() {
        let (p, k, c) = (&aws_lc::PROVIDER, key(1), cx("f"));
        for size in [0, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1] {
            let o = StreamOptions { segment_size: size };
            assert!(StreamEncryptor::new(p, &k, 1, &c, o).is_err());
        }
        assert!(StreamEncryptor::new(p, &k, 0, &c, options()).is_err());
        let mut e = StreamEncryptor::new(p, &k, 1, &c, options()).unwrap();
        let mut out = Vec::new();
        e.finish(&mut out).unwrap();
        assert!(e.push(b"late", &mut out).is_err());
        assert!(e.finish(&mut out).is_err());
    }

    #[test]
    fn the_segment_counter_never_wraps() {
        let (p, k, c) = (&aws_lc::PROVIDER, key(1), cx("f"));
        let mut e = StreamEncryptor::new(p, &k, 1, &c, options()).unwrap();
        e.state.next_segment = MAX_SEGMENTS - 1;
        let mut out = Vec::new();
        // Room only for the final segment: one more non-final segment is refused…
        assert!(e.push(&data(SEG + 1), &mut out).is_err());
        let mut e = StreamEncryptor::new(p, &k, 1, &c, options()).unwrap();
        e.state.next_segment = MAX_SEGMENTS - 1;
        // …but a final segment with counter 2^32 - 1 is fine.
        let mut out = Vec::new();
        e.push(&data(SEG), &mut out).unwrap();
        assert!(e.finish(&mut out).is_ok());
        let header = StreamHeader::parse(&out).unwrap();
        let mut d = StreamDecryptor::new(p, &k, &c, &header).unwrap();
        d.state.next_segment = MAX_SEGMENTS;
        let mut plain = Vec::new();
        d.push(&out[STREAM_HEADER_LEN..], &mut plain).unwrap();
        assert!(d.finish(&mut plain).is_err());
    }

    #[tokio::test]
    async fn async_adapters_round_trip() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (p, k, c) = (&aws_lc::PROVIDER, key(4), cx("f"));
        for len in [0, 1, SEG, 3 * SEG + 2] {
            let plaintext = data(len);
            let e = StreamEncryptor::new(p, &k, 9, &c, options()).unwrap();
            let mut w = EncryptingWriter::new(e, Vec::new());
            for piece in plaintext.chunks(333) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
            let summary = w.summary().unwrap();
            let stream = w.into_inner();
            assert_eq!(summary.ciphertext_bytes, stream.len() as u64);
            let header = StreamHeader::parse(&stream).unwrap();
            assert_eq!(header.key_version(), 9);
            let d = StreamDecryptor::new(p, &k, &c, &header).unwrap();
            let mut r = DecryptingReader::new(d, &stream[STREAM_HEADER_LEN..]);
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            assert!(back == plaintext);
            assert_eq!(r.summary().unwrap().plaintext_bytes, len as u64);
            // Truncated: the reader fails at the end.
            let d = StreamDecryptor::new(p, &k, &c, &header).unwrap();
            let cut = &stream[STREAM_HEADER_LEN..stream.len() - 1];
            let mut r = DecryptingReader::new(d, cut);
            let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        }
    }
}
