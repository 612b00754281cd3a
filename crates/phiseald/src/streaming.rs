//! The streaming RPCs: `EncryptStream` and `DecryptStream` (large values in constant
//! memory, the STREAM format of `docs/FORMAT.md`).
//!
//! The first request carries the context; the call is admitted, parsed and authorized on it
//! like a unary call. Then a tracked task (shutdown waits for it) feeds the chunks to the
//! keyring's push API and sends its output back through a small bounded channel: a client that
//! does not read its answers stops the daemon from reading its requests, so memory stays
//! bounded whatever the size. Each message must arrive (and each answer be taken) within
//! `limits.request_timeout` — or the client's shorter `grpc-timeout` — of the previous one: an
//! idle limit, not a total one, so a large stream may take as long as it keeps moving.
//!
//! The keyring audits each stream when its key is known (`attempt`) and when it ends; a stream
//! the client abandons is audited as failed (`cancelled`, or `transport` if its connection broke). At shutdown, streams get the same
//! drain time as unary calls; those still open then are ended by the daemon — audited as
//! failed (`shutdown`) before the final flush of the audit log — and their clients get
//! UNAVAILABLE (`shutting_down`) if they still take answers.
//!
//! An `EncryptStream` is sealed as complete only on its `end` message, whose byte count must
//! match the chunks received: a request stream that merely closes may be a client whose input
//! failed part way, and sealing it would make a truncated plaintext authentic.
//!
//! The plaintext chunks this module decodes are wiped after use; the gRPC layer's receive
//! buffers that held them are not, and plaintext sent is handed to the gRPC layer, which does
//! not wipe its buffers either (as for unary `Encrypt` and `Decrypt`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use phiseal::audit::Action;
use phiseal::stream::{Revocation, StreamOptions};
use phiseal::{AuditedStreamDecryptor, AuditedStreamEncryptor, EncryptionContext};
use phiseal_proto::REQUEST_ID_HEADER;
use phiseal_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::slots::KeyedSlot;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use zeroize::Zeroize;

use crate::policy::Operation;
use crate::service::{Call, Sidecar, parse_context};
use crate::status;

/// The answer stream of both RPCs.
pub type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::StreamChunk, Status>> + Send>>;

/// Answers buffered between the worker and the gRPC layer (each at most one segment plus a
/// request's worth of output).
const CHANNEL_DEPTH: usize = 4;

/// The first message's context, or INVALID_ARGUMENT.
fn first_context(context: Option<pb::Context>) -> Result<EncryptionContext, Status> {
    let context = context.ok_or_else(|| {
        status::from_error(&phiseal::Error::InvalidInput {
            what: "stream",
            reason: "the first message must carry the context",
        })
    })?;
    parse_context(Some(&context)).map_err(|e| status::from_error(&e))
}

fn misplaced_context() -> Status {
    status::from_error(&phiseal::Error::InvalidInput {
        what: "stream",
        reason: "only the first message may carry the context",
    })
}

fn idle_timeout() -> Status {
    status::status(
        Code::DeadlineExceeded,
        "deadline_exceeded",
        "the stream was idle longer than limits.request_timeout (or the client's grpc-timeout)",
    )
}

/// The audited reason of a stream the daemon ended at shutdown.
const SHUTDOWN: &str = "shutdown";

fn shutting_down() -> Status {
    status::status(
        Code::Unavailable,
        "shutting_down",
        "the daemon is shutting down: the stream was not completed; send it again",
    )
}

/// What one request of either RPC carries after the first.
enum Part {
    Chunk(Vec<u8>),
    Context,
    /// `EncryptStream`'s last message: the plaintext bytes the client sent.
    End(u64),
    /// Neither a chunk nor a context (the oneof unset).
    Nothing,
}

/// An `EncryptStream` whose requests closed without `end`: the input may have failed part way.
fn missing_end() -> Status {
    status::from_error(&phiseal::Error::InvalidInput {
        what: "stream",
        reason: "the requests ended without an `end` message, so the plaintext may be incomplete: \
                 nothing was sealed as complete; send the stream again, ending it with `end`",
    })
}

/// An `end` whose count differs from the plaintext bytes received.
fn end_count_mismatch() -> Status {
    status::from_error(&phiseal::Error::InvalidInput {
        what: "stream",
        reason: "the `end` message counts another number of plaintext bytes than the chunks \
                 carried: nothing was sealed as complete; send the stream again",
    })
}

fn empty_message() -> Status {
    status::from_error(&phiseal::Error::InvalidInput {
        what: "stream",
        reason: "a message after the first must carry a chunk (this one had neither context nor chunk)",
    })
}

/// Reads the next chunk within the idle limit: `Ok(None)` at the end of the requests. Once
/// `stop` is cancelled (shutdown), reads nothing more.
async fn next_part<M>(
    inbound: &mut Streaming<M>,
    idle: Duration,
    stop: &CancellationToken,
    part: impl Fn(M) -> Option<Part>,
) -> Result<Option<Part>, Status> {
    let read = tokio::select! {
        biased;
        () = stop.cancelled() => return Err(shutting_down()),
        read = tokio::time::timeout(idle, inbound.message()) => read,
    };
    match read {
        Err(_) => Err(idle_timeout()),
        Ok(Err(status)) => Err(status),
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(message))) => Ok(Some(part(message).ok_or_else(misplaced_context)?)),
    }
}

/// Sends one answer within the idle limit; `false` if the client is gone or not reading, or
/// if the answer has to wait for room once `stop` is cancelled (shutdown).
async fn send(
    tx: &mpsc::Sender<Result<pb::StreamChunk, Status>>,
    idle: Duration,
    stop: &CancellationToken,
    item: Result<pb::StreamChunk, Status>,
) -> bool {
    tokio::select! {
        biased;
        sent = tokio::time::timeout(idle, tx.send(item)) => matches!(sent, Ok(Ok(()))),
        () = stop.cancelled() => false,
    }
}

/// Room for chunk bytes in one answer: the message limit less the `StreamChunk` framing (a
/// field tag and a length of at most 5 bytes; 16 leaves a margin).
fn answer_room(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_sub(16).max(1)
}

/// How [`send_output`] ended.
enum Sent {
    /// Every answer is queued.
    All,
    /// The client went away, stopped reading, or the daemon is shutting down (as [`send`]).
    Gone,
    /// `allowed` refused it when there was room for an answer (the stream's tenant was
    /// shredded while it waited): the rest was not sent.
    Refused(phiseal::Error),
}

/// Sends `out` as one answer, or as several of at most `room` bytes each when it is larger (a
/// push of a whole message's worth of plaintext grows by the segments' tags; a writer may
/// have chosen segments over the limit), so that no answer exceeds the message limit. Each
/// answer is queued only if `allowed` still says so once there is room for it (waiting for a
/// slow reader may take the idle limit). When `wipe`, `out` is wiped once its pieces are
/// copied out, or when it is not sent.
async fn send_output(
    tx: &mpsc::Sender<Result<pb::StreamChunk, Status>>,
    idle: Duration,
    stop: &CancellationToken,
    out: Vec<u8>,
    room: usize,
    wipe: bool,
    allowed: impl Fn() -> Result<(), phiseal::Error>,
) -> Sent {
    let mut out = out;
    let pieces = out.len().div_ceil(room).max(1);
    let mut sent = Sent::All;
    for i in 0..pieces {
        let room_for_one = tokio::select! {
            biased;
            permit = tokio::time::timeout(idle, tx.reserve()) => permit.ok().and_then(Result::ok),
            () = stop.cancelled() => None,
        };
        let Some(permit) = room_for_one else {
            sent = Sent::Gone;
            break;
        };
        if let Err(e) = allowed() {
            sent = Sent::Refused(e);
            break;
        }
        let chunk = if pieces == 1 {
            std::mem::take(&mut out)
        } else {
            out.chunks(room).nth(i).unwrap_or_default().to_vec()
        };
        permit.send(Ok(pb::StreamChunk { chunk }));
    }
    if wipe {
        // What was split into pieces, or not sent.
        out.zeroize();
    }
    sent
}

/// A stream's slots: one of `limits.max_streams` and one of its caller's
/// `limits.max_streams_per_caller`, given back when the stream ends.
#[derive(Debug)]
struct StreamSlot {
    _stream: OwnedSemaphorePermit,
    _caller: KeyedSlot<Arc<str>>,
}

/// Admits the call, parses and authorizes the first message's context, then takes one of
/// the `limits.max_streams` slots and one of its caller's: a caller the policy refuses, or
/// one that never sends its first message, holds no slot (only its call, until the
/// deadline).
async fn open<M>(
    s: &Sidecar,
    rpc: &'static str,
    op: Operation,
    action: Action,
    request: Request<Streaming<M>>,
    context_of: impl FnOnce(M) -> Option<pb::Context>,
) -> Result<(Call, Streaming<M>, EncryptionContext, StreamSlot), Status> {
    let call = s.admit_as(rpc, action, &request).await?;
    let mut inbound = request.into_inner();
    let opened = s
        .within(&call, async {
            let first = inbound.message().await?.ok_or_else(|| {
                status::from_error(&phiseal::Error::InvalidInput {
                    what: "stream",
                    reason: "no message: the first one must carry the context",
                })
            })?;
            let context = first_context(context_of(first))?;
            s.authorize_field_as(&call, op, action, &context).await?;
            let too_many = |message: String| {
                s.metrics.refuse("too_many_streams");
                status::status(Code::ResourceExhausted, "too_many_streams", message)
            };
            // The caller's own cap first: one caller cannot hold every stream slot.
            let Some(caller) = s
                .stream_slots
                .try_take(&call.identity.rate_key, s.max_streams_per_caller)
            else {
                return Err(too_many(format!(
                    "{} has limits.max_streams_per_caller ({}) streams open: retry later",
                    call.identity.rate_key, s.max_streams_per_caller
                )));
            };
            let Ok(stream) = Arc::clone(&s.streams).try_acquire_owned() else {
                return Err(too_many(
                    "too many streams open (limits.max_streams): retry later".to_owned(),
                ));
            };
            let permit = StreamSlot {
                _stream: stream,
                _caller: caller,
            };
            Ok((context, permit))
        })
        .await;
    match opened {
        Ok((context, permit)) => Ok((call, inbound, context, permit)),
        Err(status) => Err(s
            .reply(&call, Err::<(), _>(status))
            .err()
            .unwrap_or_else(|| status::status(Code::Internal, "internal", "internal error"))),
    }
}

/// The answers of a stream as the client sees them. The call ends with OK only if the worker
/// marked the stream complete after queueing its last answer; a worker that stopped in any
/// other way (an error it could not queue because the client was not reading, a panic) ends
/// the call with ABORTED, never with a silent OK after partial output.
struct Answers {
    rx: mpsc::Receiver<Result<pb::StreamChunk, Status>>,
    complete: Arc<AtomicBool>,
    ended: bool,
}

impl tokio_stream::Stream for Answers {
    type Item = Result<pb::StreamChunk, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                self.ended = item.is_err();
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                self.ended = true;
                if self.complete.load(Ordering::Acquire) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(status::status(
                        Code::Aborted,
                        "incomplete",
                        "the stream ended before it was complete: treat everything received \
                         as invalid",
                    ))))
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The response: the answer stream, with the request id.
fn respond(
    call: &Call,
    rx: mpsc::Receiver<Result<pb::StreamChunk, Status>>,
    complete: Arc<AtomicBool>,
) -> Response<ChunkStream> {
    let stream: ChunkStream = Box::pin(Answers {
        rx,
        complete,
        ended: false,
    });
    let mut response = Response::new(stream);
    if let Ok(id) = tonic::metadata::MetadataValue::try_from(&*call.caller.request_id) {
        response.metadata_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

/// The idle limit of a call: its own time budget.
fn idle_limit(call: &Call) -> Duration {
    call.deadline.saturating_duration_since(call.started)
}

/// Logs and counts a finished stream like a unary call.
fn done(s: &Sidecar, call: &Call, result: Result<(), Status>) {
    let _ = s.reply(call, result);
}

/// One direction of a stream: the keyring's audited encryptor or decryptor.
trait Worker: Send + 'static {
    /// Feeds a chunk; appends output to `out`.
    fn push(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<u8>,
    ) -> impl Future<Output = Result<(), phiseal::Error>> + Send;
    /// Ends the stream (audited); appends the last output.
    fn finish(self, out: &mut Vec<u8>) -> impl Future<Output = Result<(), phiseal::Error>> + Send;
    /// Records the stream as failed (a no-op if it already was).
    fn abort(self, reason: &'static str) -> impl Future<Output = ()> + Send;
    /// The stream's revocation (its tenant shredded), checked before each answer holding
    /// plaintext is queued.
    fn revocation(&self) -> Revocation;
    /// Whether the requests must end with an `end` message (`EncryptStream`: its plaintext
    /// carries no end marker of its own), rather than just close.
    const NEEDS_END: bool;
    /// Whether inputs (plaintext) are wiped after use.
    const WIPE_INPUT: bool;
    /// Whether unsent outputs (plaintext) are wiped.
    const WIPE_OUTPUT: bool;
}

impl Worker for AuditedStreamEncryptor {
    async fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), phiseal::Error> {
        AuditedStreamEncryptor::push(self, chunk, out)
    }
    async fn finish(self, out: &mut Vec<u8>) -> Result<(), phiseal::Error> {
        AuditedStreamEncryptor::finish(self, out).await.map(drop)
    }
    async fn abort(self, reason: &'static str) {
        let _ = AuditedStreamEncryptor::abort(self, reason).await;
    }
    fn revocation(&self) -> Revocation {
        // Its answers are ciphertext: nothing to hold back.
        Revocation::default()
    }
    const NEEDS_END: bool = true;
    const WIPE_INPUT: bool = true;
    const WIPE_OUTPUT: bool = false;
}

impl Worker for AuditedStreamDecryptor {
    async fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), phiseal::Error> {
        AuditedStreamDecryptor::push(self, chunk, out).await
    }
    async fn finish(self, out: &mut Vec<u8>) -> Result<(), phiseal::Error> {
        AuditedStreamDecryptor::finish(self, out).await.map(drop)
    }
    async fn abort(self, reason: &'static str) {
        let _ = AuditedStreamDecryptor::abort(self, reason).await;
    }
    fn revocation(&self) -> Revocation {
        AuditedStreamDecryptor::revocation(self)
    }
    const NEEDS_END: bool = false;
    const WIPE_INPUT: bool = false;
    const WIPE_OUTPUT: bool = true;
}

/// `EncryptStream`.
pub(crate) async fn encrypt_stream(
    s: &Arc<Sidecar>,
    request: Request<Streaming<pb::EncryptStreamRequest>>,
) -> Result<Response<ChunkStream>, Status> {
    use pb::encrypt_stream_request::Part as P;
    let (call, inbound, context, permit) = open(
        s,
        "EncryptStream",
        Operation::Encrypt,
        Action::EncryptStream,
        request,
        |m| match m.part {
            Some(P::Context(c)) => Some(c),
            // Plaintext sent before the context: refused, and wiped rather than just dropped.
            Some(P::Chunk(mut plaintext)) => {
                plaintext.zeroize();
                None
            }
            Some(P::End(_)) | None => None,
        },
    )
    .await?;
    // The key lookup (key store, KMS) and the `attempt` record, within the call's deadline.
    let started = s
        .within(&call, async {
            s.keyring
                .start_encrypt_stream(&call.caller, &context, StreamOptions::default())
                .await
                .map_err(|e| status::from_error(&e))
        })
        .await;
    let encryptor = match started {
        Ok(encryptor) => encryptor,
        Err(status) => {
            done(s, &call, Err(status.clone()));
            return Err(status);
        }
    };
    Ok(serve(s, call, permit, inbound, encryptor, |m| {
        match m.part {
            Some(P::Chunk(bytes)) => Some(Part::Chunk(bytes)),
            Some(P::Context(_)) => Some(Part::Context),
            Some(P::End(end)) => Some(Part::End(end.plaintext_bytes)),
            None => Some(Part::Nothing),
        }
    }))
}

/// `DecryptStream`.
pub(crate) async fn decrypt_stream(
    s: &Arc<Sidecar>,
    request: Request<Streaming<pb::DecryptStreamRequest>>,
) -> Result<Response<ChunkStream>, Status> {
    use pb::decrypt_stream_request::Part as P;
    let (call, inbound, context, permit) = open(
        s,
        "DecryptStream",
        Operation::Decrypt,
        Action::DecryptStream,
        request,
        |m| match m.part {
            Some(P::Context(c)) => Some(c),
            _ => None,
        },
    )
    .await?;
    let decryptor = s
        .keyring
        .start_decrypt_stream(&call.caller, &context)
        .with_max_segment_size(s.max_stream_segment_bytes);
    Ok(serve(s, call, permit, inbound, decryptor, |m| {
        match m.part {
            Some(P::Chunk(bytes)) => Some(Part::Chunk(bytes)),
            Some(P::Context(_)) => Some(Part::Context),
            None => Some(Part::Nothing),
        }
    }))
}

/// Starts the tracked task that runs `worker` over the rest of the requests, and returns the
/// response carrying its answers.
fn serve<M: Send + 'static, W: Worker>(
    s: &Arc<Sidecar>,
    call: Call,
    permit: StreamSlot,
    inbound: Streaming<M>,
    worker: W,
    part: fn(M) -> Option<Part>,
) -> Response<ChunkStream> {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let complete = Arc::new(AtomicBool::new(false));
    let response = respond(&call, rx, Arc::clone(&complete));
    let sidecar = Arc::clone(s);
    let room = answer_room(s.max_message_bytes);
    let needs_end = W::NEEDS_END && s.require_stream_end;
    s.tasks.spawn(async move {
        let stop = &sidecar.stop_streams;
        let requests = Requests {
            inbound,
            part,
            needs_end,
        };
        let result = run(&call, requests, worker, &tx, stop, room).await;
        if result.is_ok() {
            // Only now may the end of the answers mean success (see `Answers`).
            complete.store(true, Ordering::Release);
        }
        done(&sidecar, &call, result);
        drop(permit);
    });
    response
}

/// The requests of a stream after its first message.
struct Requests<M> {
    inbound: Streaming<M>,
    /// What each message carries.
    part: fn(M) -> Option<Part>,
    /// Whether they must end with `end` (else closing ends them).
    needs_end: bool,
}

/// Feeds the chunks to `worker` and sends its output until the requests end — with `end`
/// where `needs_end`, else by closing — (then finishes the stream) or something fails or
/// `stop` is cancelled (then records the stream as failed and ends the call with the error).
async fn run<M, W: Worker>(
    call: &Call,
    requests: Requests<M>,
    mut worker: W,
    tx: &mpsc::Sender<Result<pb::StreamChunk, Status>>,
    stop: &CancellationToken,
    room: usize,
) -> Result<(), Status> {
    let Requests {
        mut inbound,
        part,
        needs_end,
    } = requests;
    let idle = idle_limit(call);
    // Input bytes taken so far, for `end`'s count.
    let mut received: u64 = 0;
    let failed = async |worker: W, status: Status, reason: &'static str| {
        worker.abort(reason).await;
        let _ = send(tx, idle, stop, Err(status.clone())).await;
        Err(status)
    };
    loop {
        let mut out = Vec::new();
        match next_part(&mut inbound, idle, stop, part).await {
            Err(status) => {
                let reason = if stop.is_cancelled() {
                    SHUTDOWN
                } else {
                    status_kind(&status)
                };
                return failed(worker, status, reason).await;
            }
            Ok(Some(Part::Context)) => {
                return failed(worker, misplaced_context(), "invalid_input").await;
            }
            Ok(Some(Part::Nothing)) => {
                return failed(worker, empty_message(), "invalid_input").await;
            }
            Ok(Some(Part::Chunk(mut chunk))) => {
                received = received.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
                // Within the idle limit and ended by shutdown like a read: the first push of
                // a decryption looks the key up (key store, KMS), which may hang.
                let pushed = {
                    let push = tokio::time::timeout(idle, worker.push(&chunk, &mut out));
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => Err((shutting_down(), SHUTDOWN)),
                        pushed = push => match pushed {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err((status::from_error(&e), e.kind())),
                            Err(_) => Err((idle_timeout(), "deadline_exceeded")),
                        },
                    }
                };
                if W::WIPE_INPUT {
                    chunk.zeroize();
                }
                if let Err((status, reason)) = pushed {
                    if W::WIPE_OUTPUT {
                        out.zeroize();
                    }
                    return failed(worker, status, reason).await;
                }
            }
            Ok(Some(Part::End(count))) if W::NEEDS_END => {
                if count != received {
                    return failed(worker, end_count_mismatch(), "invalid_input").await;
                }
                return finish(worker, out, tx, idle, stop, room).await;
            }
            // (Only `EncryptStream` has an `end`.)
            Ok(Some(Part::End(_))) => {
                return failed(worker, empty_message(), "invalid_input").await;
            }
            Ok(None) if needs_end => {
                return failed(worker, missing_end(), "invalid_input").await;
            }
            Ok(None) => {
                let ended = finish(worker, out, tx, idle, stop, room).await;
                if W::NEEDS_END && ended.is_ok() {
                    // So that operators see when every client sends `end`.
                    tracing::info!(
                        rpc = call.rpc,
                        identity = %call.identity.name,
                        request_id = %call.caller.request_id,
                        "EncryptStream sealed without `end` (limits.require_stream_end = false)"
                    );
                }
                return ended;
            }
        }
        if out.is_empty() {
            continue;
        }
        let revocation = worker.revocation();
        let check = || revocation.check();
        match send_output(tx, idle, stop, out, room, W::WIPE_OUTPUT, check).await {
            Sent::All => {}
            Sent::Gone if stop.is_cancelled() => {
                worker.abort(SHUTDOWN).await;
                return Err(shutting_down());
            }
            Sent::Gone => {
                worker.abort("cancelled").await;
                return Err(gone());
            }
            Sent::Refused(e) => {
                let status = status::from_error(&e);
                return failed(worker, status, e.kind()).await;
            }
        }
    }
}

/// Ends the stream (the worker's `finish`, audited) and sends its last output.
async fn finish<W: Worker>(
    worker: W,
    mut out: Vec<u8>,
    tx: &mpsc::Sender<Result<pb::StreamChunk, Status>>,
    idle: Duration,
    stop: &CancellationToken,
    room: usize,
) -> Result<(), Status> {
    let revocation = worker.revocation();
    if let Err(e) = worker.finish(&mut out).await {
        if W::WIPE_OUTPUT {
            out.zeroize();
        }
        let status = status::from_error(&e);
        let _ = send(tx, idle, stop, Err(status.clone())).await;
        return Err(status);
    }
    let check = || revocation.check();
    match send_output(tx, idle, stop, out, room, W::WIPE_OUTPUT, check).await {
        Sent::All => Ok(()),
        Sent::Gone if stop.is_cancelled() => Err(shutting_down()),
        Sent::Gone => Err(gone()),
        // (Recorded `ok`: the stream was complete and authentic when the tenant was
        // shredded, but its last answer is not sent.)
        Sent::Refused(e) => {
            let status = status::from_error(&e);
            let _ = send(tx, idle, stop, Err(status.clone())).await;
            Err(status)
        }
    }
}

/// The client went away or stopped reading.
fn gone() -> Status {
    status::status(
        Code::Cancelled,
        "cancelled",
        "the client went away or stopped reading the answers",
    )
}

/// A stable kind for a status that ended a stream (recorded in the audit log).
fn status_kind(status: &Status) -> &'static str {
    match status.code() {
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::InvalidArgument => "invalid_input",
        Code::ResourceExhausted | Code::OutOfRange => "message_too_large",
        Code::Cancelled => "cancelled",
        _ => "transport",
    }
}
