//! The keyring's streaming entry points (`crate::stream`, `docs/FORMAT.md` §10): keys come from
//! the key cache (the primary version to encrypt; the version the header names to decrypt,
//! honouring the minimum decryption version and shredding), and every stream writes an audit
//! record at its end (`encrypt_stream` / `decrypt_stream`) with its outcome, and an `attempt`
//! record once its key is known: before the first output of an encryption, before any
//! plaintext of a decryption.
//!
//! Three shapes, for three kinds of caller:
//!
//! * [`Keyring::encrypt_stream`] / [`Keyring::decrypt_stream`]: reader in, writer out.
//! * [`Keyring::encrypting_writer`] / [`Keyring::decrypting_reader`]: `AsyncWrite` /
//!   `AsyncRead` adapters.
//! * [`Keyring::start_encrypt_stream`] / [`Keyring::start_decrypt_stream`]: push APIs
//!   ([`AuditedStreamEncryptor`], [`AuditedStreamDecryptor`]) for a caller that receives
//!   chunks of arbitrary size from elsewhere (the sidecar's client-streaming RPC) and emits
//!   output chunks as segments complete.
//!
//! **Auditing.** A decryption stream writes an `attempt` record once its header named a key
//! that could be loaded, before the first plaintext byte is released; an encryption stream
//! writes one when it starts, before it takes any plaintext. If that record cannot be written
//! the stream fails and releases nothing. So a stream cut off midway (its result record lost
//! with the process) is still on the log. Every stream's result record is written when
//! it ends: after its last byte was written (encryption) or its final segment authenticated
//! (decryption). If that record cannot be written the stream fails (fail closed): the push
//! APIs withhold the final segment (so an encryption stream stays unterminated, which no
//! reader accepts); the reader/writer functions and the [`Keyring::encrypting_writer`]
//! adapter have by then written their last output (a complete ciphertext, or the last
//! plaintext) and report an error instead of success: treat that output as failed and
//! delete it, as for any error. A stream that fails
//! (tampering, truncation, I/O) is recorded with the error kind at once where the API is
//! async (decryption's `push`, `finish`, the reader/writer functions), else when its object
//! is dropped or [`AuditedStreamEncryptor::abort`]ed. A stream object dropped before it
//! finished is recorded as failed with the kind `incomplete` (or the error that stopped it) by
//! a task spawned on the current tokio runtime — best effort: without a runtime, or if the
//! runtime shuts down first, that result record is lost (the stream's `attempt` record is
//! already written). Call `finish` or `abort` to record deterministically. A result record
//! whose writing was cut off — a timeout or a cancelled task dropped the `push` or `finish`
//! that was writing it — counts as not written: `abort`, or the drop, writes one (so a stream
//! may end with two result records when the cut-off one had reached the log after all).
//!
//! **Lifetime of keys.** A stream derives its own key when it starts and keeps it (zeroized
//! when the stream object is dropped); a rotation made while a stream runs applies to the
//! next stream, not to the running one. A raised minimum decryption version stops the running
//! streams under older key versions, with [`Error::KeyVersionRetired`], as a shred stops them
//! (below: at once through this keyring, for another process's change once this keyring reads
//! the tenant again; a minimum lowered again later does not restart them). A minimum is taken
//! only from a tenant read that began after the read of the metadata the stream started from
//! (an order kept by a counter), so a read older than a lowering never stops a stream
//! started after it. A shred stops the running streams of the tenant: each fails with
//! [`Error::KeyDestroyed`] before its next segment is sealed or opened (the reader adapter
//! also withholds the rest of a segment it opened before; output the caller already
//! received stays with it) — at once for a shred through this keyring, and for one by
//! another process once this keyring reads the tenant again ([`Keyring::recheck_tenants`],
//! which the sidecar calls on the key store's change notifications, and
//! [`Keyring::recheck_streams`], every 60 s or `key_ttl` / 2). A stream whose tenant these
//! re-reads cannot read for longer than `key_ttl + max_stale` after its last successful read
//! stops too, with [`Error::Store`] (fail closed: the tenant may have been shredded). And
//! [`Keyring::recheck_streams`] confirms with the KMS, through the key cache, the key version
//! of every stream whose version was last unwrapped longer than `key_ttl` ago: a refusal (a
//! disabled or revoked root key) or an unwrap that cannot be audited stops the stream with
//! that error, an outage once the version could not be unwrapped for longer than `key_ttl +
//! max_stale` and failing for two `STALE_RETRY_INTERVAL`s. Any re-read of the tenant
//! stops at once the
//! streams (that started before it began) under a version its record no longer holds
//! (destroyed, gone) or holds another key under, and all of them if the store no longer has
//! the tenant.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use coarsetime::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, Zeroizing};

use super::{Caller, Keyring, OpMeta, TenantView, primary_kept_changing};
use crate::audit::{Action, AuditEvent, KeySource, Outcome};
use crate::context::EncryptionContext;
use crate::crypto::TAG_LEN;
use crate::error::{Error, FormatError};
use crate::field::VersionKey;
use crate::stream::{
    AuditFuture, DecryptingReader, EncryptingWriter, Revocation, STREAM_HEADER_LEN, SegmentBuf,
    StreamAuditHook, StreamDecryptor, StreamEncryptor, StreamHeader, StreamOptions, StreamSummary,
};

/// The outcome recorded for a stream object dropped before it finished.
const INCOMPLETE: &str = "incomplete";

/// The audit record of one stream, written once.
struct StreamAudit {
    keyring: Keyring,
    caller: Caller,
    context: EncryptionContext,
    action: Action,
    key_version: Option<u32>,
    key_source: Option<KeySource>,
    /// Why the stream failed, if it did (recorded on drop).
    failure: Option<&'static str>,
    /// Its result record was handed to a future: the stream takes no more input.
    done: bool,
    /// That future ran to its end (the record written, or the audit log's error returned).
    /// A future dropped before — a caller's timeout around `push` or `finish`, a cancelled
    /// task — leaves it unset, and the drop of the stream (or `abort`) writes the record.
    recorded: Arc<AtomicBool>,
}

impl StreamAudit {
    fn new(
        keyring: &Keyring,
        caller: &Caller,
        context: &EncryptionContext,
        action: Action,
    ) -> Self {
        Self {
            keyring: keyring.clone(),
            caller: caller.clone(),
            context: context.clone(),
            action,
            key_version: None,
            key_source: None,
            failure: None,
            done: false,
            recorded: Arc::default(),
        }
    }

    /// A record of this stream with `outcome`.
    fn event(&self, outcome: Outcome) -> AuditEvent {
        let meta = OpMeta {
            key_version: self.key_version,
            key_source: self.key_source,
            from_key_version: None,
        };
        Keyring::event(
            &self.caller,
            self.action,
            None,
            Some(&self.context),
            &meta,
            outcome,
        )
    }

    /// The result record of this stream, as a future that owns what it needs.
    fn record(&mut self, outcome: Outcome) -> AuditFuture {
        self.done = true;
        let event = self.event(outcome);
        let keyring = self.keyring.clone();
        let recorded = Arc::clone(&self.recorded);
        Box::pin(async move {
            let written = keyring.append(std::slice::from_ref(&event)).await;
            recorded.store(true, Ordering::Release);
            written
        })
    }

    /// Whether a result record was written (or its writing failed with the audit log).
    fn recorded(&self) -> bool {
        self.recorded.load(Ordering::Acquire)
    }

    /// Writes the stream's `attempt` record (its key version and source known, the stream not
    /// yet ended), before any output: a stream whose record cannot be written discloses
    /// nothing, and a stream cut off midway (its end record lost with the process) is still
    /// on the log.
    async fn attempt(&self) -> Result<(), Error> {
        let event = self.event(Outcome::Attempt);
        self.keyring.append(std::slice::from_ref(&event)).await
    }

    /// Records the failure `error` now; returns it, or the audit error if it could not be
    /// recorded.
    async fn fail_now(&mut self, error: Error) -> Error {
        // Kept first: if this record's writing is cut off, the one `abort` or the drop writes
        // names the same failure (tampering stays tampering, not a timeout).
        let kind = *self.failure.get_or_insert(error.kind());
        match self.record(Outcome::Error(kind)).await {
            Ok(()) => error,
            Err(audit) => audit,
        }
    }

    /// Records the outcome of a stream run to its end; returns `result`, or the audit error if
    /// the record could not be written.
    async fn conclude(
        &mut self,
        result: Result<StreamSummary, Error>,
    ) -> Result<StreamSummary, Error> {
        match result {
            Ok(summary) => {
                self.record(Outcome::Ok).await?;
                Ok(summary)
            }
            Err(e) => Err(self.fail_now(e).await),
        }
    }
}

impl StreamAuditHook for StreamAudit {
    fn succeed(&mut self) -> AuditFuture {
        self.record(Outcome::Ok)
    }

    fn fail(&mut self, kind: &'static str) {
        self.failure.get_or_insert(kind);
    }
}

impl Drop for StreamAudit {
    fn drop(&mut self) {
        if self.recorded() {
            return;
        }
        let record = self.record(Outcome::Error(self.failure.unwrap_or(INCOMPLETE)));
        // Best effort (see the module docs): a drop cannot wait for the audit log.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = record.await;
            });
        }
    }
}

/// Encrypts one stream pushed in chunks, under the tenant's primary key version, and audits
/// it when it ends. From [`Keyring::start_encrypt_stream`].
///
/// ```text
/// let mut stream = keyring.start_encrypt_stream(&caller, &context, StreamOptions::default()).await?;
/// let mut out = Vec::new();
/// while let Some(chunk) = next_plaintext_chunk().await {
///     stream.push(&chunk, &mut out)?;      // header + completed segments
///     send(&out).await; out.clear();
/// }
/// let summary = stream.finish(&mut out).await?; // final segment; audited
/// send(&out).await;
/// ```
pub struct AuditedStreamEncryptor {
    inner: StreamEncryptor,
    audit: StreamAudit,
}

impl std::fmt::Debug for AuditedStreamEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditedStreamEncryptor")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AuditedStreamEncryptor {
    /// The stream's header (sent with the first output).
    pub fn header(&self) -> &StreamHeader {
        self.inner.header()
    }

    /// Feeds plaintext of any length; appends to `out` the header (the first time) and every
    /// segment this completes (see [`StreamEncryptor::push`]). After an error the stream is
    /// dead: call [`AuditedStreamEncryptor::abort`] (or drop it) to record the failure.
    pub fn push(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        self.inner
            .push(plaintext, out)
            .inspect_err(|e| self.audit.fail(e.kind()))
    }

    /// Ends the stream: appends the final segment to `out` and writes the audit record. If
    /// the record cannot be written, nothing is appended (the stream stays unterminated, so
    /// no reader accepts it) and the audit error is returned.
    pub async fn finish(mut self, out: &mut Vec<u8>) -> Result<StreamSummary, Error> {
        let start = out.len();
        match self.inner.finish(out) {
            Ok(summary) => match self.audit.record(Outcome::Ok).await {
                Ok(()) => Ok(summary),
                Err(e) => {
                    out.truncate(start);
                    Err(e)
                }
            },
            Err(e) => Err(self.audit.fail_now(e).await),
        }
    }

    /// Abandons the stream (the input failed, the client went away) and records it as failed
    /// with `reason` (a short stable snake_case kind such as `cancelled`), or with the error
    /// that already stopped it. The output so far is an unterminated stream no reader accepts.
    pub async fn abort(mut self, reason: &'static str) -> Result<(), Error> {
        let kind = self.audit.failure.unwrap_or(reason);
        self.audit.record(Outcome::Error(kind)).await
    }
}

/// Decrypts one stream pushed in chunks (header included), and audits it when it ends. From
/// [`Keyring::start_decrypt_stream`]. The key is looked up once the header has arrived.
///
/// Plaintext is appended to `out` one authenticated segment at a time, but **all of it is
/// provisional until [`AuditedStreamDecryptor::finish`] succeeds**: a truncated stream is
/// detected only there.
///
/// ```text
/// let mut stream = keyring.start_decrypt_stream(&caller, &context);
/// let mut out = Zeroizing::new(Vec::new());
/// while let Some(chunk) = next_ciphertext_chunk().await {
///     stream.push(&chunk, &mut out).await?; // plaintext of authenticated segments
///     send(&out).await; out.zeroize(); out.clear();
/// }
/// stream.finish(&mut out).await?;           // final segment; truncation detected; audited
/// send(&out).await;                         // then: "complete"
/// ```
pub struct AuditedStreamDecryptor {
    header: [u8; STREAM_HEADER_LEN],
    header_len: usize,
    max_segment_size: u32,
    inner: Option<StreamDecryptor>,
    audit: StreamAudit,
}

impl std::fmt::Debug for AuditedStreamDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditedStreamDecryptor")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AuditedStreamDecryptor {
    /// The stream's revocation when its tenant is shredded (see the module docs), checkable
    /// after this object is gone: check it before passing on plaintext released earlier — a
    /// service that queues answers for a slow reader, say —, so that none leaves after the
    /// shred. (Before the header arrived, a stream that released nothing: never revoked.)
    pub fn revocation(&self) -> Revocation {
        self.inner
            .as_ref()
            .map_or_else(Revocation::default, StreamDecryptor::revocation)
    }

    /// Refuses a stream whose header declares segments larger than `max` bytes, with
    /// [`Error::SegmentTooLarge`] (audited like any failure), before its key is looked up or
    /// a segment buffer is allocated. The writer of a stream chooses its segment size, up to
    /// [`MAX_SEGMENT_SIZE`](crate::stream::MAX_SEGMENT_SIZE) (16 MiB), and a decryptor holds
    /// about three segments: a service decrypting streams from callers it does not fully
    /// trust bounds that memory here. Without it, the keyring's
    /// [`KeyringBuilder::max_stream_segment_size`](crate::KeyringBuilder::max_stream_segment_size)
    /// applies (by default every size the format allows).
    #[must_use]
    pub fn with_max_segment_size(mut self, max: u32) -> Self {
        self.max_segment_size = max;
        self
    }

    /// The stream's header, once it has arrived and its key was found.
    pub fn header(&self) -> Option<&StreamHeader> {
        self.inner.as_ref().map(StreamDecryptor::header)
    }

    /// Feeds ciphertext of any length (the header first). When the header is complete, looks
    /// up its key version (the only await that may reach the key store or KMS); appends to
    /// `out` the plaintext of every segment that completes and authenticates. An error is
    /// audited before it is returned, and the stream is then dead.
    pub async fn push(&mut self, mut ciphertext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if self.audit.done {
            return Err(Error::InvalidInput {
                what: "stream",
                reason: "push after the stream was finished or failed",
            });
        }
        if self.inner.is_none() {
            let room = STREAM_HEADER_LEN.saturating_sub(self.header_len);
            let (take, rest) = ciphertext.split_at(room.min(ciphertext.len()));
            if let Some(dst) = self
                .header
                .get_mut(self.header_len..self.header_len + take.len())
            {
                dst.copy_from_slice(take);
                self.header_len += take.len();
            }
            ciphertext = rest;
            if self.header_len < STREAM_HEADER_LEN {
                return Ok(());
            }
            let keyring = self.audit.keyring.clone();
            let caller = self.audit.caller.clone();
            let context = self.audit.context.clone();
            let opened = keyring
                .open_stream(
                    &caller,
                    &context,
                    &self.header,
                    self.max_segment_size,
                    &mut self.audit,
                )
                .await;
            match opened {
                Ok(decryptor) => self.inner = Some(decryptor),
                Err(e) => return Err(self.audit.fail_now(e).await),
            }
        }
        if let Some(decryptor) = self.inner.as_mut()
            && let Err(e) = decryptor.push(ciphertext, out)
        {
            return Err(self.audit.fail_now(e).await);
        }
        Ok(())
    }

    /// Ends the stream: opens the final segment into `out`, which detects truncation and
    /// extension, and writes the audit record. Only after this returned `Ok` is the output
    /// complete and authentic. If the record cannot be written, the final segment's plaintext
    /// is wiped from `out` and the audit error is returned.
    pub async fn finish(mut self, out: &mut Vec<u8>) -> Result<StreamSummary, Error> {
        let start = out.len();
        let result = match self.inner.as_mut() {
            Some(decryptor) => decryptor.finish(out),
            None => Err(FormatError::Truncated {
                len: self.header_len,
                min: STREAM_HEADER_LEN + TAG_LEN,
            }
            .into()),
        };
        match result {
            Ok(summary) => match self.audit.record(Outcome::Ok).await {
                Ok(()) => Ok(summary),
                Err(e) => {
                    if let Some(tail) = out.get_mut(start..) {
                        tail.zeroize();
                    }
                    out.truncate(start);
                    Err(e)
                }
            },
            Err(e) => Err(self.audit.fail_now(e).await),
        }
    }

    /// Abandons the stream and records it as failed with `reason` (e.g. `cancelled`). Any
    /// plaintext already released must be discarded by the caller.
    pub async fn abort(mut self, reason: &'static str) -> Result<(), Error> {
        if self.audit.recorded() {
            return Ok(());
        }
        let kind = self.audit.failure.unwrap_or(reason);
        self.audit.record(Outcome::Error(kind)).await
    }
}

impl Keyring {
    /// Runs `derive` (a stream's key derivation) with the key of a stream: the primary version
    /// (`version: None`, to encrypt) or `version` (to decrypt: refreshes metadata for a newer
    /// version, refuses retired and destroyed versions), recorded in `audit`. `derive` runs
    /// under the key-use guard, like a field operation: a tenant shredded since its metadata
    /// was checked is checked again (and refused) first, and a shred waits for a derivation
    /// in progress, so no stream starts under a shredded tenant's key after `shred` returned.
    async fn with_stream_key<T>(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        version: Option<u32>,
        audit: &mut StreamAudit,
        derive: impl Fn(&VersionKey, &TenantView) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let tenant = context.tenant();
        // An encryption (no version given: the primary) starts again with the new primary if
        // a rotation overtook the lookup (twice at most).
        for _ in 0..3 {
            // (A failed retry is not recorded with the overtaken attempt's key.)
            audit.key_version = version;
            audit.key_source = None;
            let now = Instant::now_without_cache_update();
            let mut view = self.tenant_view(tenant, now).await?;
            let chosen = match version {
                None => {
                    view.record
                        .primary()
                        .ok_or_else(|| Error::KeyDestroyed {
                            tenant: tenant.clone(),
                        })?
                        .version
                }
                Some(version) => {
                    view = self.view_knowing(view, version, now).await?;
                    let min = view.record.min_decrypt_version;
                    if version < min && view.record.shredded_at.is_none() {
                        return Err(Error::KeyVersionRetired {
                            tenant: tenant.clone(),
                            version,
                            min,
                        });
                    }
                    version
                }
            };
            audit.key_version = Some(chosen);
            let (key, source) = self.version_key(caller, &view, chosen, now).await?;
            view.remember(&key);
            audit.key_source = Some(source);
            let derived = self
                .use_key_as(&view, &key, version.is_none(), || derive(&key, &view))
                .await?;
            if let Some(derived) = derived {
                // The stream registered for revocation under the key-use guard. If the
                // tenant's keys changed since (another process's shred, whose notification
                // may have looked for running streams just before this one registered),
                // read the tenant again: that revokes the stream if it was shredded (if the
                // read fails, the stream does not start: fail closed).
                if self.inner.generations.current(view.shard) != view.generation {
                    self.load_view(tenant).await?;
                }
                return derived;
            }
        }
        Err(primary_kept_changing(&*self.inner.store))
    }

    /// Parses a stream header, refuses segments over `max_segment_size`, prepares its
    /// decryptor under the version it names, and writes the stream's `attempt` record: no
    /// plaintext is released unless that record is written.
    async fn open_stream(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        header: &[u8],
        max_segment_size: u32,
        audit: &mut StreamAudit,
    ) -> Result<StreamDecryptor, Error> {
        let header = StreamHeader::parse(header)?;
        audit.key_version = Some(header.key_version());
        if header.segment_size() > max_segment_size {
            return Err(Error::SegmentTooLarge {
                segment_size: header.segment_size(),
                max: max_segment_size,
            });
        }
        let provider = self.inner.provider;
        let decryptor = self
            .with_stream_key(
                caller,
                context,
                Some(header.key_version()),
                audit,
                |key, view| {
                    let mut decryptor =
                        StreamDecryptor::new(provider, key.tenant_key(), context, &header)?;
                    // Registered under the key-use guard: a shred that waits for it revokes it.
                    decryptor.revocable(
                        self.register_stream(context.tenant(), key, view),
                        context.tenant().clone(),
                    );
                    Ok(decryptor)
                },
            )
            .await?;
        audit.attempt().await?;
        Ok(decryptor)
    }

    /// Starts encrypting a stream under the tenant's primary key version, to be fed with
    /// [`AuditedStreamEncryptor::push`], and writes the stream's `attempt` record (fail
    /// closed: no stream starts without it). A failure to get the key is audited here.
    pub async fn start_encrypt_stream(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        options: StreamOptions,
    ) -> Result<AuditedStreamEncryptor, Error> {
        let mut audit = StreamAudit::new(self, caller, context, Action::EncryptStream);
        let started = async {
            let provider = self.inner.provider;
            let encryptor = self
                .with_stream_key(caller, context, None, &mut audit, |key, view| {
                    let mut encryptor = StreamEncryptor::new(
                        provider,
                        key.tenant_key(),
                        key.version(),
                        context,
                        options,
                    )?;
                    // Registered under the key-use guard: a shred that waits for it revokes it.
                    encryptor.revocable(
                        self.register_stream(context.tenant(), key, view),
                        context.tenant().clone(),
                    );
                    Ok(encryptor)
                })
                .await?;
            audit.attempt().await?;
            Ok(encryptor)
        }
        .await;
        match started {
            Ok(inner) => Ok(AuditedStreamEncryptor { inner, audit }),
            Err(e) => Err(audit.fail_now(e).await),
        }
    }

    /// Starts decrypting a stream, to be fed (header included) with
    /// [`AuditedStreamDecryptor::push`]. Nothing is looked up until the header has arrived.
    pub fn start_decrypt_stream(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
    ) -> AuditedStreamDecryptor {
        AuditedStreamDecryptor {
            header: [0; STREAM_HEADER_LEN],
            header_len: 0,
            max_segment_size: self.inner.max_stream_segment_size,
            inner: None,
            audit: StreamAudit::new(self, caller, context, Action::DecryptStream),
        }
    }

    /// An `AsyncWrite` that encrypts everything written to it into `writer`, under the
    /// tenant's primary key version. `shutdown()` completes the stream, shuts `writer` down
    /// and writes the audit record; only a successful `shutdown` means the stream is complete.
    pub async fn encrypting_writer<W: AsyncWrite + Unpin>(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        options: StreamOptions,
        writer: W,
    ) -> Result<EncryptingWriter<W>, Error> {
        let AuditedStreamEncryptor { inner, audit } =
            self.start_encrypt_stream(caller, context, options).await?;
        Ok(EncryptingWriter::with_audit(
            inner,
            writer,
            Some(Box::new(audit)),
        ))
    }

    /// An `AsyncRead` that decrypts the stream read from `reader`. Reads the header first and
    /// looks up its key version (errors, audited, are returned here). What it yields is
    /// provisional until a read returns end of file without error: truncation is an
    /// `InvalidData` error at the end. The audit record is written before end of file is
    /// reported (and before the final segment's plaintext is released).
    pub async fn decrypting_reader<R: AsyncRead + Unpin>(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        mut reader: R,
    ) -> Result<DecryptingReader<R>, Error> {
        let mut audit = StreamAudit::new(self, caller, context, Action::DecryptStream);
        let opened = async {
            let header = read_header(&mut reader).await?;
            self.open_stream(
                caller,
                context,
                header.filled(),
                self.inner.max_stream_segment_size,
                &mut audit,
            )
            .await
        }
        .await;
        match opened {
            Ok(decryptor) => Ok(DecryptingReader::with_audit(
                decryptor,
                reader,
                Some(Box::new(audit)),
            )),
            Err(e) => Err(audit.fail_now(e).await),
        }
    }

    /// Encrypts everything `reader` yields into `writer` (then flushed, not shut down) as one
    /// stream under the tenant's primary key version, with the default segment size, in
    /// constant memory (two segments). Audited once, at the end, with the outcome (a read or
    /// write error is recorded as `io`). On error the output is an unterminated stream no
    /// reader accepts.
    pub async fn encrypt_stream<R, W>(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        mut reader: R,
        mut writer: W,
    ) -> Result<StreamSummary, Error>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let AuditedStreamEncryptor {
            inner: mut encryptor,
            mut audit,
        } = self
            .start_encrypt_stream(caller, context, StreamOptions::default())
            .await?;
        let result = encrypt_segments(&mut encryptor, &mut reader, &mut writer).await;
        audit.conclude(result).await
    }

    /// Decrypts the stream `reader` yields into `writer` (then flushed, not shut down), in
    /// constant memory (about three segments: a header declaring segments larger than the
    /// keyring's [`KeyringBuilder::max_stream_segment_size`](crate::KeyringBuilder::max_stream_segment_size)
    /// is refused before its key is looked up), each segment written only after it
    /// authenticated. **What was written is provisional until this returns `Ok`**: on any error
    /// (tampering, truncation detected at the end, I/O, audit) the caller must discard it —
    /// e.g. write to a temporary file and rename it into place only on success. Audited with
    /// an `attempt` record before the first segment is written and the outcome at the end.
    pub async fn decrypt_stream<R, W>(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        mut reader: R,
        mut writer: W,
    ) -> Result<StreamSummary, Error>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut audit = StreamAudit::new(self, caller, context, Action::DecryptStream);
        let result = async {
            let header = read_header(&mut reader).await?;
            let mut decryptor = self
                .open_stream(
                    caller,
                    context,
                    header.filled(),
                    self.inner.max_stream_segment_size,
                    &mut audit,
                )
                .await?;
            decrypt_segments(&mut decryptor, &mut reader, &mut writer).await
        }
        .await;
        audit.conclude(result).await
    }
}

/// Reads a whole stream header; a *truncated* error if the input ends first.
async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> Result<SegmentBuf, Error> {
    let mut header = SegmentBuf::new(STREAM_HEADER_LEN);
    fill(
        reader,
        &mut header,
        STREAM_HEADER_LEN,
        "reading the stream header",
    )
    .await?;
    if header.len < STREAM_HEADER_LEN {
        return Err(FormatError::Truncated {
            len: header.len,
            min: STREAM_HEADER_LEN,
        }
        .into());
    }
    Ok(header)
}

/// Reads into `buf` until it holds `want` bytes or the input ends.
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut SegmentBuf,
    want: usize,
    what: &'static str,
) -> Result<(), Error> {
    while buf.len < want {
        let Some(room) = buf.data.get_mut(buf.len..want) else {
            break;
        };
        let n = reader
            .read(room)
            .await
            .map_err(|source| Error::Io { what, source })?;
        if n == 0 {
            break;
        }
        buf.len += n;
    }
    Ok(())
}

async fn write<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> Result<(), Error> {
    writer.write_all(bytes).await.map_err(|source| Error::Io {
        what: "writing the output",
        source,
    })
}

async fn flush<W: AsyncWrite + Unpin>(writer: &mut W) -> Result<(), Error> {
    writer.flush().await.map_err(|source| Error::Io {
        what: "flushing the output",
        source,
    })
}

/// The body of [`Keyring::encrypt_stream`]: whole segments read straight into one of two
/// buffers and sealed in place (the other buffer holds the lookahead that shows whether a
/// segment is the last), so no plaintext byte is copied inside phiseal.
async fn encrypt_segments<R, W>(
    encryptor: &mut StreamEncryptor,
    reader: &mut R,
    writer: &mut W,
) -> Result<StreamSummary, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let segment = encryptor.header().segment_size() as usize;
    let mut header = Vec::with_capacity(STREAM_HEADER_LEN);
    encryptor.write_header(&mut header);
    write(writer, &header).await?;
    let mut current = SegmentBuf::new(segment + TAG_LEN);
    let mut next = SegmentBuf::new(segment + TAG_LEN);
    fill(reader, &mut current, segment, "reading the plaintext").await?;
    loop {
        let last = if current.len < segment {
            true
        } else {
            fill(reader, &mut next, segment, "reading the plaintext").await?;
            next.len == 0
        };
        let len = current.len;
        let tag = match current.data.get_mut(..len) {
            Some(plaintext) => encryptor.seal_in_place(plaintext, last)?,
            None => return Err(misuse()),
        };
        if let Some(dst) = current.data.get_mut(len..len + TAG_LEN) {
            dst.copy_from_slice(&tag);
            current.len += TAG_LEN;
        }
        write(writer, current.filled()).await?;
        if last {
            flush(writer).await?;
            return Ok(encryptor.summary());
        }
        std::mem::swap(&mut current, &mut next);
        next.reset();
        // `current` holds the lookahead; complete it to a whole segment.
        fill(reader, &mut current, segment, "reading the plaintext").await?;
    }
}

/// The body of [`Keyring::decrypt_stream`] after the header: whole sealed segments read into
/// one of two buffers (the other holds the lookahead), each opened into `out` and written.
async fn decrypt_segments<R, W>(
    decryptor: &mut StreamDecryptor,
    reader: &mut R,
    writer: &mut W,
) -> Result<StreamSummary, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let sealed = decryptor.header().segment_size() as usize + TAG_LEN;
    let mut current = SegmentBuf::new(sealed);
    let mut next = SegmentBuf::new(sealed);
    let mut out = Zeroizing::new(Vec::with_capacity(sealed));
    fill(reader, &mut current, sealed, "reading the ciphertext").await?;
    loop {
        let last = if current.len < sealed {
            true
        } else {
            fill(reader, &mut next, sealed, "reading the ciphertext").await?;
            next.len == 0
        };
        out.clear();
        let summary = decryptor.open_whole(current.filled(), last, &mut out)?;
        write(writer, &out).await?;
        if let Some(summary) = summary {
            flush(writer).await?;
            return Ok(summary);
        }
        std::mem::swap(&mut current, &mut next);
        next.reset();
        fill(reader, &mut current, sealed, "reading the ciphertext").await?;
    }
}

fn misuse() -> Error {
    Error::InvalidInput {
        what: "stream",
        reason: "internal buffer out of range",
    }
}
