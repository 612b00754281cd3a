//! The gRPC services: authenticate, rate-limit, authorize, then call the keyring.
//!
//! Every call: identify the caller (peer credentials, optional token) → take one unit of the
//! identity's rate allowance → check the policy per tenant/field (refusals are audited with
//! the identity) → run the keyring operation. Admin operations (which change state) run in
//! their own task, so a client that gives up (deadline, cancel, disconnect) never interrupts
//! one half way: it finishes and is audited, and only the response is dropped. Data-plane
//! operations change no state and run in the caller's task (see `Sidecar::inline`).

use std::sync::Arc;
use std::time::Instant;

use phiseal::audit::Action;
use phiseal::{Caller, EncryptionContext, Keyring, TenantId};
use phiseal_proto::REQUEST_ID_HEADER;
use phiseal_proto::v1 as pb;
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use crate::auth::{Authenticator, Identity};
use crate::limits::{CallLimiter, RefusalBudget};
use crate::metrics::Metrics;
use crate::policy::{Operation, Policy};
use crate::status;

/// Everything a call needs; shared by both services.
#[derive(Debug)]
pub struct Sidecar {
    /// The keyring.
    pub keyring: Keyring,
    /// Token checks.
    pub auth: Authenticator,
    /// Who may do what.
    pub policy: Policy,
    /// Per-identity rate limits.
    pub limiter: CallLimiter,
    /// Most items in one batch.
    pub max_batch_items: usize,
    /// Longest time a call may take (a client's shorter `grpc-timeout` wins).
    pub request_timeout: std::time::Duration,
    /// Largest message either way (`limits.max_message_bytes`): stream answers are split to
    /// fit it.
    pub max_message_bytes: usize,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Calls and admin operations in flight (waited for at shutdown).
    pub tasks: tokio_util::task::TaskTracker,
    /// Largest segment size a `DecryptStream` may declare (`limits.max_stream_segment_bytes`).
    pub max_stream_segment_bytes: u32,
    /// Whether an `EncryptStream` is sealed only on its `end` message
    /// (`limits.require_stream_end`).
    pub require_stream_end: bool,
    /// Streams open at once (`limits.max_streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Streams open per caller (`auth::Identity::rate_key`).
    pub stream_slots: Arc<crate::slots::KeyedSlots<Arc<str>>>,
    /// Most streams one caller may have open (`limits.max_streams_per_caller`).
    pub max_streams_per_caller: usize,
    /// Cancelled when shutdown ends the streams still open after the drain time.
    pub stop_streams: tokio_util::sync::CancellationToken,
}

/// An admitted call: who, under which request id.
pub(crate) struct Call {
    pub(crate) rpc: &'static str,
    pub(crate) started: Instant,
    pub(crate) identity: Identity,
    pub(crate) caller: Caller,
    /// When the call must have finished: the server's limit or the client's shorter one.
    pub(crate) deadline: Instant,
    /// Counts the call as in flight until it is dropped (shutdown waits for it).
    _in_flight: tokio_util::task::task_tracker::TaskTrackerToken,
}

/// The client's deadline from the `grpc-timeout` header (`<1..8 digits><H|M|S|m|u|n>`).
fn client_timeout<T>(request: &Request<T>) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let unit = value.chars().last()?;
    let digits = value.strip_suffix(unit)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n.saturating_mul(3600)),
        'M' => Duration::from_secs(n.saturating_mul(60)),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs `work` until `deadline`; past it, DEADLINE_EXCEEDED (an admin operation already
/// started still completes in its own task).
async fn within<T>(
    started: Instant,
    deadline: Instant,
    work: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(result) => result,
        Err(_) => Err(status::status(
            Code::DeadlineExceeded,
            "deadline_exceeded",
            format!(
                "deadline exceeded after {} ms (limits.request_timeout or the client's grpc-timeout)",
                started.elapsed().as_millis()
            ),
        )),
    }
}

/// Bytes an answer item adds to its data, at most: the largest ciphertext overhead (46,
/// XChaCha20-Poly1305) plus the item's framing (field tags and lengths, key version,
/// `changed`, the result's oneof).
const ANSWER_ITEM_GROWTH: usize = 64;

/// An answer's own framing beyond its items.
const ANSWER_FRAMING: usize = 16;

/// A batch RPC, for [`Sidecar::batch`].
struct BatchRpc {
    /// Its name.
    rpc: &'static str,
    /// The policy operation of its items.
    operation: Operation,
    /// Whether its answer items can be longer than the request's (see
    /// [`Sidecar::check_answer_size`]).
    answer_grows: bool,
}

/// A batch item's data — a plaintext, for encrypt —, wiped when dropped: on every path,
/// refusals, errors and a call dropped halfway (deadline, client gone) included.
type ItemData = Zeroizing<Vec<u8>>;

/// Splits a batch request into its head (metadata and connection info, for admission) and
/// its items as (context, data).
fn split_batch<B, I>(
    request: Request<B>,
    items: impl FnOnce(B) -> Vec<I>,
    item: impl Fn(I) -> (Option<pb::Context>, Vec<u8>),
) -> (Request<()>, Vec<(Option<pb::Context>, ItemData)>) {
    let (metadata, extensions, body) = request.into_parts();
    let items = items(body)
        .into_iter()
        .map(|i| {
            let (context, data) = item(i);
            (context, Zeroizing::new(data))
        })
        .collect();
    (Request::from_parts(metadata, extensions, ()), items)
}

/// Adds the request id to a status's metadata.
fn with_request_id(mut status: Status, id: &str) -> Status {
    if let Ok(value) = tonic::metadata::MetadataValue::try_from(id) {
        status.metadata_mut().insert(REQUEST_ID_HEADER, value);
    }
    status
}

/// A request id from the client if it is short and plain, else a fresh one.
fn request_id<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let plain = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    plain.then(|| value.to_owned())
}

fn map_action(op: Operation) -> Action {
    match op {
        Operation::Encrypt => Action::Encrypt,
        Operation::Decrypt => Action::Decrypt,
        Operation::Rewrap => Action::Rewrap,
        Operation::CreateTenant => Action::CreateTenant,
        Operation::Rotate => Action::RotateKey,
        Operation::SetMinVersion => Action::SetMinDecryptVersion,
        Operation::Shred => Action::ShredTenant,
        Operation::Search => Action::BlindIndexQuery,
        Operation::KeyStatus | Operation::Data | Operation::Admin | Operation::All => {
            Action::KeyStatus
        }
    }
}

/// A parsed context, or the per-item error for a bad one.
pub(crate) fn parse_context(
    context: Option<&pb::Context>,
) -> Result<EncryptionContext, phiseal::Error> {
    let context = context.ok_or(phiseal::Error::InvalidInput {
        what: "context",
        reason: "missing: every item needs a tenant and a field",
    })?;
    let tenant = TenantId::new(&context.tenant)?;
    let parsed = EncryptionContext::new(tenant, &context.field)?;
    match &context.record {
        Some(record) => parsed.with_record(record),
        None => Ok(parsed),
    }
}

pub(crate) fn key_version_of(ciphertext: &[u8]) -> u32 {
    phiseal::format::parse(ciphertext)
        .map(|p| p.key_version)
        .unwrap_or(0)
}

impl Sidecar {
    /// Runs an admin operation in its own (tracked) task so that it completes and is audited
    /// even if the caller's future is dropped; shutdown waits for these tasks. A panic in it (a bug)
    /// becomes INTERNAL.
    async fn run_to_completion<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, Status> {
        self.tasks.spawn(work).await.map_err(|_| {
            status::status(
                Code::Internal,
                "internal",
                "internal error: the operation did not complete",
            )
        })
    }

    /// Runs the rest of a call within its deadline (see [`within`]).
    pub(crate) async fn within<T>(
        &self,
        call: &Call,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        within(call.started, call.deadline, work).await
    }

    /// Runs a data-plane operation in the caller's task. Cancellation-safe: encrypt, decrypt
    /// and rewrap change no state, and the audit append is written within one poll, so a
    /// caller that goes away loses only a result it never received.
    pub(crate) async fn inline<T>(
        &self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, Status> {
        Ok(work.await)
    }

    /// Identifies and rate-limits a caller; refusals are audited (authentication) or counted
    /// (rate limit).
    pub(crate) async fn admit<T>(
        &self,
        rpc: &'static str,
        op: Operation,
        request: &Request<T>,
    ) -> Result<Call, Status> {
        self.admit_as(rpc, map_action(op), request).await
    }

    /// A call refused by `identity`'s rate limit: counted, not audited.
    fn rate_limited(
        &self,
        rpc: &'static str,
        started: Instant,
        identity: &str,
        id: Option<&str>,
    ) -> Status {
        self.metrics.refuse("rate_limited");
        self.metrics
            .observe_call(rpc, Code::ResourceExhausted, started.elapsed());
        let status = status::status(
            Code::ResourceExhausted,
            "rate_limited",
            format!(
                "rate limit exceeded for {identity}: retry with backoff, use batch calls, or raise limits.rate_per_second"
            ),
        );
        // Every answer carries a request id, refusals included (the client's, or a fresh one).
        match id {
            Some(id) => with_request_id(status, id),
            None => with_request_id(status, &Caller::fresh_request_id()),
        }
    }

    /// [`Sidecar::admit`], auditing an unauthenticated caller as `action` (for calls whose
    /// action is more specific than their policy operation's).
    pub(crate) async fn admit_as<T>(
        &self,
        rpc: &'static str,
        action: Action,
        request: &Request<T>,
    ) -> Result<Call, Status> {
        let started = Instant::now();
        let in_flight = self.tasks.token();
        let id = request_id(request);
        let identity = match self.auth.identify(request) {
            Ok(identity) => identity,
            Err(failure) => {
                // Audit the refusal under the peer's uid (the credentials are still known).
                let peer = request
                    .extensions()
                    .get::<tonic::transport::server::UdsConnectInfo>()
                    .and_then(|i| i.peer_cred);
                let actor = phiseal::Actor {
                    identity: match peer {
                        Some(c) => format!("uid:{}", c.uid()).into(),
                        None => "unknown".into(),
                    },
                    uid: peer.map(|c| c.uid()),
                    pid: peer
                        .and_then(|c| c.pid())
                        .and_then(|p| u32::try_from(p).ok()),
                };
                // Refused calls are rate-limited like accepted ones (under the peer's uid), so
                // that a flood of bad tokens cannot grow the audit log without bound.
                if !self.limiter.admit(&actor.identity) {
                    return Err(self.rate_limited(rpc, started, &actor.identity, id.as_deref()));
                }
                // Counted once per call: as rate_limited above, or as unauthenticated here.
                self.metrics.refuse("unauthenticated");
                let caller = match id {
                    Some(id) => Caller::with_request_id(actor, id),
                    None => Caller::new(actor),
                };
                tracing::info!(
                    rpc,
                    identity = %caller.actor.identity,
                    request_id = %caller.request_id,
                    reason = failure.message(),
                    "unauthenticated call refused"
                );
                if let Err(e) = self
                    .keyring
                    .audit_refusal(&caller, action, "unauthenticated", None, &[])
                    .await
                {
                    let status = status::from_error(&e);
                    self.metrics
                        .observe_call(rpc, status.code(), started.elapsed());
                    return Err(with_request_id(status, &caller.request_id));
                }
                let status =
                    status::status(Code::Unauthenticated, "unauthenticated", failure.message());
                self.metrics
                    .observe_call(rpc, status.code(), started.elapsed());
                return Err(with_request_id(status, &caller.request_id));
            }
        };
        if !self.limiter.admit(&identity.rate_key) {
            return Err(self.rate_limited(rpc, started, &identity.rate_key, id.as_deref()));
        }
        let actor = identity.actor();
        let caller = match id {
            Some(id) => Caller::with_request_id(actor, id),
            None => Caller::new(actor),
        };
        let limit =
            client_timeout(request).map_or(self.request_timeout, |c| c.min(self.request_timeout));
        Ok(Call {
            rpc,
            started,
            identity,
            caller,
            // `limit` is at most `limits.request_timeout` (validated ≤ 1 h); should the sum
            // still not fit, the call gets the time it has already had (fail closed).
            deadline: started.checked_add(limit).unwrap_or(started),
            _in_flight: in_flight,
        })
    }

    /// Finishes a call: metrics, and the request id on the response or status.
    pub(crate) fn reply<T>(
        &self,
        call: &Call,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        let elapsed = call.started.elapsed();
        self.metrics.observe_call(call.rpc, code, elapsed);
        // Logs carry the method, identity, request id and status: never tenants' data. Status
        // messages name tenants and versions only (the core's errors hold no plaintext).
        match &result {
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Internal | Code::DataLoss
                ) =>
            {
                tracing::warn!(
                    rpc = call.rpc,
                    identity = %call.identity.name,
                    request_id = %call.caller.request_id,
                    code = ?s.code(),
                    error = status::log_detail(s),
                    "call failed"
                );
            }
            _ => tracing::debug!(
                rpc = call.rpc,
                identity = %call.identity.name,
                request_id = %call.caller.request_id,
                code = ?code,
                elapsed_us = elapsed.as_micros() as u64,
                "call"
            ),
        }
        let id = tonic::metadata::MetadataValue::try_from(&*call.caller.request_id).ok();
        match result {
            Ok(body) => {
                let mut response = Response::new(body);
                if let Some(id) = id {
                    response.metadata_mut().insert(REQUEST_ID_HEADER, id);
                }
                Ok(response)
            }
            Err(mut status) => {
                if let Some(id) = id {
                    status.metadata_mut().insert(REQUEST_ID_HEADER, id);
                }
                Err(status)
            }
        }
    }

    /// Checks the policy for one field; audits and reports a refusal.
    pub(crate) async fn authorize_field(
        &self,
        call: &Call,
        op: Operation,
        context: &EncryptionContext,
    ) -> Result<(), Status> {
        self.authorize_field_as(call, op, map_action(op), context)
            .await
    }

    /// [`Sidecar::authorize_field`], auditing a refusal as `action`.
    pub(crate) async fn authorize_field_as(
        &self,
        call: &Call,
        op: Operation,
        action: Action,
        context: &EncryptionContext,
    ) -> Result<(), Status> {
        if self.policy.allows(
            &call.identity,
            op,
            context.tenant().as_str(),
            Some(context.field()),
        ) {
            return Ok(());
        }
        Err(self.refuse_as(call, action, None, &[context]).await)
    }

    /// Audits a policy refusal; the status to answer: PERMISSION_DENIED, or the audit
    /// failure. (A status, not a `Result`: a refusal can never let the call through.)
    pub(crate) async fn refuse(
        &self,
        call: &Call,
        op: Operation,
        tenant: Option<&TenantId>,
        contexts: &[&EncryptionContext],
    ) -> Status {
        self.refuse_as(call, map_action(op), tenant, contexts).await
    }

    /// [`Sidecar::refuse`], auditing the refusal as `action`.
    async fn refuse_as(
        &self,
        call: &Call,
        action: Action,
        tenant: Option<&TenantId>,
        contexts: &[&EncryptionContext],
    ) -> Status {
        self.metrics.refuse("permission_denied");
        tracing::info!(
            rpc = call.rpc,
            identity = %call.identity.name,
            request_id = %call.caller.request_id,
            "refused by policy"
        );
        match self
            .keyring
            .audit_refusal(&call.caller, action, "permission_denied", tenant, contexts)
            .await
        {
            Err(e) => status::from_error(&e),
            Ok(()) => status::status(
                Code::PermissionDenied,
                "permission_denied",
                status::PERMISSION_DENIED,
            ),
        }
    }

    /// Checks an admin call's tenant against the policy.
    async fn authorize_admin(
        &self,
        call: &Call,
        op: Operation,
        tenant: &str,
    ) -> Result<TenantId, Status> {
        let tenant = TenantId::new(tenant).map_err(|e| status::from_error(&e))?;
        if self
            .policy
            .allows(&call.identity, op, tenant.as_str(), None)
        {
            Ok(tenant)
        } else {
            Err(self.refuse(call, op, Some(&tenant), &[]).await)
        }
    }

    /// Refuses a call whose answer could exceed `limits.max_message_bytes`, before any work:
    /// gRPC would refuse that answer only after the work (and its audit records), with
    /// OUT_OF_RANGE and no kind. `data` are the items' plaintexts or ciphertexts; each answer
    /// item is at most [`ANSWER_ITEM_GROWTH`] bytes longer.
    pub(crate) fn check_answer_size(
        &self,
        data: impl Iterator<Item = usize>,
    ) -> Result<(), Status> {
        let bound = data.fold(ANSWER_FRAMING, |sum, len| {
            sum.saturating_add(len.saturating_add(ANSWER_ITEM_GROWTH))
        });
        if bound > self.max_message_bytes {
            self.metrics.refuse("response_too_large");
            return Err(status::status(
                Code::OutOfRange,
                "response_too_large",
                format!(
                    "the answer could be {bound} bytes, over limits.max_message_bytes ({}): send \
                     fewer or smaller items (files: EncryptStream)",
                    self.max_message_bytes
                ),
            ));
        }
        Ok(())
    }

    fn check_batch_size(&self, len: usize) -> Result<(), Status> {
        if len > self.max_batch_items {
            self.metrics.refuse("batch_too_large");
            return Err(batch_too_large(&len.to_string(), self.max_batch_items));
        }
        Ok(())
    }
}

/// RESOURCE_EXHAUSTED `batch_too_large`: a batch of `len` items (a number, or "more than N"
/// when refused before decoding, `daemon.rs`) over `limits.max_batch_items` (`max`).
pub fn batch_too_large(len: &str, max: usize) -> Status {
    status::status(
        Code::ResourceExhausted,
        "batch_too_large",
        format!("batch of {len} items exceeds limits.max_batch_items ({max}): split it"),
    )
}

/// What the policy grants the caller for one tenant and field of a batch: the batch's
/// operation, and `search` where the operation needs it too (rewrapping a deterministic
/// ciphertext; `true` for the other operations).
#[derive(Debug, Clone, Copy)]
struct Grants {
    op: bool,
    search: bool,
}

/// Items of a batch after parsing and authorization: per index, either an early error or a
/// slot in the list handed to the keyring.
struct Sorted {
    /// Per request item: `Err(item error)` or `Ok(index into allowed)`.
    slots: Vec<Result<usize, pb::ItemError>>,
    /// Contexts and data the keyring will process, in order.
    allowed: Vec<(EncryptionContext, ItemData)>,
}

impl Sidecar {
    /// Parses and authorizes every item; audits all refusals in one append.
    async fn sort_batch(
        &self,
        call: &Call,
        op: Operation,
        items: impl Iterator<Item = (Option<pb::Context>, ItemData)>,
    ) -> Result<Sorted, Status> {
        let mut slots = Vec::new();
        let mut allowed = Vec::new();
        let mut denied = Vec::new();
        // The items of a batch usually share tenant and field: reuse the previous item's
        // parsed names and policy decisions when they match.
        let mut previous: Option<(EncryptionContext, Grants)> = None;
        for (context, data) in items {
            let same = match (&previous, &context) {
                (Some((prev, _)), Some(c)) => {
                    prev.tenant().as_str() == c.tenant && prev.field() == c.field
                }
                _ => false,
            };
            let parsed = match (&previous, same, &context) {
                (Some((prev, grants)), true, Some(c)) => match &c.record {
                    None => Ok((prev.without_record(), *grants)),
                    Some(r) => prev.without_record().with_record(r).map(|p| (p, *grants)),
                },
                _ => parse_context(context.as_ref()).map(|c| {
                    let allows = |operation| {
                        self.policy.allows(
                            &call.identity,
                            operation,
                            c.tenant().as_str(),
                            Some(c.field()),
                        )
                    };
                    let grants = Grants {
                        op: allows(op),
                        // Rewrapping a deterministic ciphertext gives what
                        // EncryptDeterministic would under the primary version: values of
                        // two versions become comparable, which is what `search` grants.
                        search: op != Operation::Rewrap || allows(Operation::Search),
                    };
                    (c, grants)
                }),
            };
            let (context, grants) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    // (A refused item's data is wiped as it is dropped.)
                    slots.push(Err(status::item_error(&e)));
                    continue;
                }
            };
            previous = Some((context.without_record(), grants));
            let deterministic =
                || phiseal::format::parse(&data).is_ok_and(|p| p.algorithm.is_deterministic());
            let ok = grants.op && (grants.search || !deterministic());
            if ok {
                slots.push(Ok(allowed.len()));
                allowed.push((context, data));
            } else {
                drop(data);
                slots.push(Err(status::item_denied()));
                denied.push(context);
            }
        }
        // Nothing of it may run, and the policy grants this caller the operation on no field
        // of those tenants at all: refused as a call, as a unary call would be, so that a
        // client does not take it for failures of single items and go on. One record per
        // tenant named (its first item), so that each tenant's export shows the attempt: one
        // tenant spends no allowance, as a unary refusal; several spend one per record, and
        // if they do not fit, the rate-limited refusal below answers (with its one record).
        let no_grant = |c: &EncryptionContext| {
            !self
                .policy
                .allows(&call.identity, op, c.tenant().as_str(), None)
        };
        let mut checked = None;
        if allowed.is_empty() && !denied.is_empty() && denied.iter().all(no_grant) {
            let mut seen = std::collections::HashSet::new();
            let firsts: Vec<&EncryptionContext> =
                denied.iter().filter(|c| seen.insert(c.tenant())).collect();
            let budget = match firsts.len() {
                1 => RefusalBudget::Admitted,
                n => self.limiter.admit_refusals(&call.identity.rate_key, n),
            };
            if budget == RefusalBudget::Admitted {
                return Err(with_request_id(
                    self.refuse(call, op, None, &firsts).await,
                    &call.caller.request_id,
                ));
            }
            checked = Some(budget);
        }
        if !denied.is_empty() {
            // Each refused item is an audit record: they are rate-limited one by one, so a
            // caller without a grant cannot write thousands of records per call.
            let budget = match checked {
                Some(budget) => budget,
                None => self
                    .limiter
                    .admit_refusals(&call.identity.rate_key, denied.len()),
            };
            if budget != RefusalBudget::Admitted {
                // Nothing runs: wipe what would have (plaintexts, for encrypt) at once.
                drop(allowed);
                // Still one record for the call (its first refused item), so that no policy
                // refusal goes unaudited; calls are rate-limited, so these are bounded.
                let first: Vec<&EncryptionContext> = denied.iter().take(1).collect();
                self.keyring
                    .audit_refusal(
                        &call.caller,
                        map_action(op),
                        "permission_denied",
                        None,
                        &first,
                    )
                    .await
                    .map_err(|e| status::from_error(&e))?;
                self.metrics.refuse("rate_limited");
                let why = match budget {
                    RefusalBudget::TooManyAtOnce => "more than limits.rate_burst",
                    _ => "over the rate limit",
                };
                return Err(with_request_id(
                    status::status(
                        Code::ResourceExhausted,
                        "rate_limited",
                        format!(
                            "{} items of this batch are refused by the policy for {}, {why} \
                             (each refusal is audited): check the policy, or send smaller \
                             batches",
                            denied.len(),
                            call.identity.name
                        ),
                    ),
                    &call.caller.request_id,
                ));
            }
            self.metrics.refuse("permission_denied");
            tracing::info!(
                rpc = call.rpc,
                identity = %call.identity.name,
                request_id = %call.caller.request_id,
                items = denied.len(),
                "batch items refused by policy"
            );
            let refs: Vec<&EncryptionContext> = denied.iter().collect();
            let audited = self
                .keyring
                .audit_refusal(
                    &call.caller,
                    map_action(op),
                    "permission_denied",
                    None,
                    &refs,
                )
                .await;
            if let Err(e) = audited {
                return Err(status::from_error(&e));
            }
        }
        Ok(Sorted { slots, allowed })
    }
}

/// Puts keyring results back into request order, with the early per-item errors.
fn merge<T, R>(
    slots: Vec<Result<usize, pb::ItemError>>,
    results: Vec<Result<T, phiseal::Error>>,
    wrap: impl Fn(Result<T, pb::ItemError>) -> R,
) -> Vec<R> {
    let mut results: Vec<Option<Result<T, phiseal::Error>>> =
        results.into_iter().map(Some).collect();
    slots
        .into_iter()
        .map(|slot| {
            wrap(match slot {
                Err(e) => Err(e),
                Ok(i) => match results.get_mut(i).and_then(Option::take) {
                    Some(Ok(v)) => Ok(v),
                    Some(Err(e)) => Err(status::item_error(&e)),
                    None => Err(pb::ItemError {
                        code: Code::Internal as i32,
                        kind: "internal".into(),
                        message: "internal error: missing result".into(),
                    }),
                },
            })
        })
        .collect()
}

impl Sidecar {
    /// The shape of every batch call: admit the caller, check the batch size, parse and
    /// authorize each item (refusals audited), run `op` over the allowed items in the caller's
    /// task (cancellation-safe, see [`Sidecar::inline`]), then wipe their data and put the
    /// results back in request order, each wrapped by `wrap`.
    async fn batch<T, R>(
        &self,
        kind: BatchRpc,
        head: Request<()>,
        items: Vec<(Option<pb::Context>, ItemData)>,
        op: impl AsyncFnOnce(
            Keyring,
            Caller,
            &[(&EncryptionContext, &[u8])],
        ) -> Result<Vec<Result<T, phiseal::Error>>, phiseal::Error>,
        wrap: impl Fn(Result<T, pb::ItemError>) -> R,
    ) -> Result<Response<Vec<R>>, Status> {
        let BatchRpc {
            rpc,
            operation,
            answer_grows,
        } = kind;
        let call = self.admit(rpc, operation, &head).await?;
        let result = self
            .within(&call, async {
                self.check_batch_size(items.len())?;
                if answer_grows {
                    self.check_answer_size(items.iter().map(|(_, data)| data.len()))?;
                }
                let sorted = self.sort_batch(&call, operation, items.into_iter()).await?;
                let pairs: Vec<(&EncryptionContext, &[u8])> = sorted
                    .allowed
                    .iter()
                    .map(|(c, data)| (c, data.as_slice()))
                    .collect();
                let results = self
                    .inline(op(self.keyring.clone(), call.caller.clone(), &pairs))
                    .await?;
                drop(pairs);
                drop(sorted.allowed);
                let results = results.map_err(|e| status::from_error(&e))?;
                Ok(merge(sorted.slots, results, &wrap))
            })
            .await;
        self.reply(&call, result)
    }
}

/// The data plane.
#[derive(Debug, Clone)]
pub struct FieldApi(pub Arc<Sidecar>);

/// The admin plane.
#[derive(Debug, Clone)]
pub struct AdminApi(pub Arc<Sidecar>);

#[tonic::async_trait]
impl pb::field_service_server::FieldService for FieldApi {
    type EncryptStreamStream = crate::streaming::ChunkStream;
    type DecryptStreamStream = crate::streaming::ChunkStream;

    async fn encrypt_deterministic(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        self.0.encrypt_deterministic(request).await
    }

    async fn blind_index(
        &self,
        request: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        self.0.blind_index(request).await
    }

    async fn search_terms(
        &self,
        request: Request<pb::SearchTermsRequest>,
    ) -> Result<Response<pb::SearchTermsResponse>, Status> {
        self.0.search_terms(request).await
    }

    async fn encrypt_stream(
        &self,
        request: Request<tonic::Streaming<pb::EncryptStreamRequest>>,
    ) -> Result<Response<Self::EncryptStreamStream>, Status> {
        crate::streaming::encrypt_stream(&self.0, request).await
    }

    async fn decrypt_stream(
        &self,
        request: Request<tonic::Streaming<pb::DecryptStreamRequest>>,
    ) -> Result<Response<Self::DecryptStreamStream>, Status> {
        crate::streaming::decrypt_stream(&self.0, request).await
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let s = &self.0;
        let mut request = request;
        // Wiped on every path, refusals included.
        let plaintext = Zeroizing::new(std::mem::take(&mut request.get_mut().plaintext));
        let call = s.admit("Encrypt", Operation::Encrypt, &request).await?;
        let result = s
            .within(&call, async {
                let body = request.into_inner();
                let context =
                    parse_context(body.context.as_ref()).map_err(|e| status::from_error(&e))?;
                // Authorized first: a caller without the grant is refused (and audited) as
                // such, whatever the size of its plaintext.
                s.authorize_field(&call, Operation::Encrypt, &context)
                    .await?;
                s.check_answer_size(std::iter::once(plaintext.len()))?;
                let keyring = s.keyring.clone();
                let caller = call.caller.clone();
                let done = s
                    .inline(async move { keyring.encrypt(&caller, &context, &plaintext).await })
                    .await?;
                let ciphertext = done.map_err(|e| status::from_error(&e))?;
                Ok(pb::EncryptResponse {
                    key_version: key_version_of(&ciphertext),
                    ciphertext,
                })
            })
            .await;
        s.reply(&call, result)
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let s = &self.0;
        let call = s.admit("Decrypt", Operation::Decrypt, &request).await?;
        let result = s
            .within(&call, async {
                let body = request.into_inner();
                let context =
                    parse_context(body.context.as_ref()).map_err(|e| status::from_error(&e))?;
                s.authorize_field(&call, Operation::Decrypt, &context)
                    .await?;
                let keyring = s.keyring.clone();
                let caller = call.caller.clone();
                let ciphertext = body.ciphertext;
                let key_version = key_version_of(&ciphertext);
                let done = s
                    .inline(async move {
                        keyring
                            .decrypt(&caller, &context, &ciphertext)
                            .await
                            .map(|p| p.to_vec())
                    })
                    .await?;
                let plaintext = done.map_err(|e| status::from_error(&e))?;
                Ok(pb::DecryptResponse {
                    plaintext,
                    key_version,
                })
            })
            .await;
        s.reply(&call, result)
    }

    async fn encrypt_batch(
        &self,
        request: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        let (head, items) = split_batch(request, |b| b.items, |i| (i.context, i.plaintext));
        let response = self
            .0
            .batch(
                BatchRpc {
                    rpc: "EncryptBatch",
                    operation: Operation::Encrypt,
                    answer_grows: true,
                },
                head,
                items,
                async |keyring, caller, pairs| keyring.encrypt_batch(&caller, pairs).await,
                |result| pb::EncryptResult {
                    result: Some(match result {
                        Ok(ciphertext) => pb::encrypt_result::Result::Ok(pb::EncryptResponse {
                            key_version: key_version_of(&ciphertext),
                            ciphertext,
                        }),
                        Err(e) => pb::encrypt_result::Result::Error(e),
                    }),
                },
            )
            .await?;
        Ok(response.map(|results| pb::EncryptBatchResponse { results }))
    }

    async fn decrypt_batch(
        &self,
        request: Request<pb::DecryptBatchRequest>,
    ) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        let (head, items) = split_batch(request, |b| b.items, |i| (i.context, i.ciphertext));
        let response = self
            .0
            .batch(
                BatchRpc {
                    rpc: "DecryptBatch",
                    operation: Operation::Decrypt,
                    // Plaintexts are shorter than their ciphertexts: the answer fits if the
                    // request did.
                    answer_grows: false,
                },
                head,
                items,
                async |keyring, caller, pairs| {
                    let results = keyring.decrypt_batch(&caller, pairs).await?;
                    Ok(results
                        .into_iter()
                        .zip(pairs)
                        .map(|(r, (_, ct))| r.map(|p| (p.to_vec(), key_version_of(ct))))
                        .collect())
                },
                |result| pb::DecryptResult {
                    result: Some(match result {
                        Ok((plaintext, key_version)) => {
                            pb::decrypt_result::Result::Ok(pb::DecryptResponse {
                                plaintext,
                                key_version,
                            })
                        }
                        Err(e) => pb::decrypt_result::Result::Error(e),
                    }),
                },
            )
            .await?;
        Ok(response.map(|results| pb::DecryptBatchResponse { results }))
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let (head, items) = split_batch(request, |b| b.items, |i| (i.context, i.ciphertext));
        let response = self
            .0
            .batch(
                BatchRpc {
                    rpc: "Rewrap",
                    operation: Operation::Rewrap,
                    answer_grows: true,
                },
                head,
                items,
                async |keyring, caller, pairs| {
                    let results = keyring.rewrap_batch(&caller, pairs).await?;
                    Ok(results
                        .into_iter()
                        .zip(pairs)
                        .map(|(r, (_, old))| r.map(|new| (new.as_slice() != *old, new)))
                        .collect())
                },
                |result| pb::RewrapResult {
                    result: Some(match result {
                        Ok((changed, ciphertext)) => pb::rewrap_result::Result::Ok(pb::Rewrapped {
                            key_version: key_version_of(&ciphertext),
                            ciphertext,
                            changed,
                        }),
                        Err(e) => pb::rewrap_result::Result::Error(e),
                    }),
                },
            )
            .await?;
        Ok(response.map(|results| pb::RewrapResponse { results }))
    }
}

fn timestamp(t: jiff::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

fn status_response(status: phiseal::TenantStatus) -> pb::KeyStatusResponse {
    use phiseal::store::KeyState;
    pb::KeyStatusResponse {
        tenant: status.tenant.as_str().to_owned(),
        primary_version: status.primary,
        min_decryption_version: status.min_decrypt_version,
        shredded_at: status.shredded_at.map(timestamp),
        versions: status
            .versions
            .into_iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                state: match v.state {
                    KeyState::Primary => pb::KeyState::Primary,
                    KeyState::DecryptOnly => pb::KeyState::DecryptOnly,
                    KeyState::Destroyed => pb::KeyState::Destroyed,
                } as i32,
                decrypts: v.decrypts,
                root_key_ref: v.root_key_ref.unwrap_or_default(),
                created_at: Some(timestamp(v.created_at)),
            })
            .collect(),
    }
}

impl AdminApi {
    /// The shape of every admin call: admit, authorize the tenant, run `work` to completion,
    /// map its error.
    async fn admin<R, T, F, Fut>(
        &self,
        rpc: &'static str,
        op: Operation,
        request: Request<R>,
        tenant_of: impl FnOnce(&R) -> &str,
        work: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Keyring, Caller, TenantId, R) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
        T: Send + 'static,
    {
        let s = &self.0;
        let call = s.admit(rpc, op, &request).await?;
        let result = s
            .within(&call, async {
                let body = request.into_inner();
                let tenant = s.authorize_admin(&call, op, tenant_of(&body)).await?;
                s.run_to_completion(work(s.keyring.clone(), call.caller.clone(), tenant, body))
                    .await?
            })
            .await;
        s.reply(&call, result)
    }
}

fn mapped<T>(result: Result<T, phiseal::Error>) -> Result<T, Status> {
    result.map_err(|e| status::from_error(&e))
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        self.admin(
            "CreateTenant",
            Operation::CreateTenant,
            request,
            |r| &r.tenant,
            |k, c, t, _| async move {
                mapped(k.create_tenant(&c, &t).await)?;
                Ok(pb::CreateTenantResponse { key_version: 1 })
            },
        )
        .await
    }

    async fn rotate_tenant_key(
        &self,
        request: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::RotateTenantKeyResponse>, Status> {
        self.admin(
            "RotateTenantKey",
            Operation::Rotate,
            request,
            |r| &r.tenant,
            |k, c, t, r| async move {
                let rotated = match r.expected_latest_version {
                    Some(expected) => k.rotate_if_latest(&c, &t, expected).await,
                    None => k.rotate(&c, &t).await,
                };
                let key_version = mapped(rotated)?;
                Ok(pb::RotateTenantKeyResponse { key_version })
            },
        )
        .await
    }

    async fn set_min_decryption_version(
        &self,
        request: Request<pb::SetMinDecryptionVersionRequest>,
    ) -> Result<Response<pb::SetMinDecryptionVersionResponse>, Status> {
        self.admin(
            "SetMinDecryptionVersion",
            Operation::SetMinVersion,
            request,
            |r| &r.tenant,
            |k, c, t, r| async move {
                let guard = phiseal::MinVersionGuard::default()
                    .if_current(r.expected_min_version)
                    .allow_lower(r.allow_lower);
                mapped(
                    k.set_min_decrypt_version_with(&c, &t, r.min_version, guard)
                        .await,
                )?;
                Ok(pb::SetMinDecryptionVersionResponse {})
            },
        )
        .await
    }

    async fn key_status(
        &self,
        request: Request<pb::KeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatusResponse>, Status> {
        self.admin(
            "KeyStatus",
            Operation::KeyStatus,
            request,
            |r| &r.tenant,
            |k, c, t, _| async move { Ok(status_response(mapped(k.key_status(&c, &t).await)?)) },
        )
        .await
    }

    async fn shred_tenant(
        &self,
        request: Request<pb::ShredTenantRequest>,
    ) -> Result<Response<pb::ShredTenantResponse>, Status> {
        self.admin("ShredTenant", Operation::Shred, request, |r| &r.tenant, |k, c, t, r| async move {
            if r.confirm_tenant != t.as_str() {
                return Err(status::status(
                    Code::InvalidArgument,
                    "invalid_input",
                    "confirm_tenant must repeat the tenant id exactly: shredding is irreversible",
                ));
            }
            mapped(k.shred(&c, &t).await)?;
            Ok(pb::ShredTenantResponse {})
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn with_timeout(value: &str) -> Request<()> {
        let mut r = Request::new(());
        if let Ok(v) = value.parse() {
            r.metadata_mut().insert("grpc-timeout", v);
        }
        r
    }

    #[test]
    fn grpc_timeout_header() {
        let t = |v: &str| client_timeout(&with_timeout(v));
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn past_the_deadline_is_deadline_exceeded() {
        let start = Instant::now();
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<(), Status>(())
        };
        let e = within(start, start + Duration::from_millis(20), slow)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded);
        assert_eq!(
            e.metadata()
                .get(phiseal_proto::ERROR_KIND_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("deadline_exceeded")
        );
        let fast = within(start, start + Duration::from_secs(5), async {
            Ok::<u8, Status>(1)
        });
        assert_eq!(fast.await.ok(), Some(1));
    }
}
