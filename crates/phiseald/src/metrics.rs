//! Prometheus metrics (prometheus-client) and their HTTP listener (`GET /metrics`, on its own
//! configurable address, never the gRPC socket). Labels are operation names, status codes,
//! error kinds and backend names only: never tenants, fields, records or values.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::DaemonError;

/// `rpc`, `code`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The RPC method name.
    pub rpc: &'static str,
    /// The gRPC status code name (`Ok`, `PermissionDenied`, …).
    pub code: &'static str,
}

/// `rpc`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabel {
    /// The RPC method name.
    pub rpc: &'static str,
}

/// `action`, `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The audited action (`encrypt`, `decrypt`, …).
    pub action: &'static str,
    /// `ok`, `attempt` or an error kind.
    pub result: &'static str,
}

/// `source`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `cache` (a key-cache hit), `kms` (a miss) or `stale` (a cached key past its TTL, served
    /// during a KMS outage).
    pub source: &'static str,
}

/// `backend`, `op`, `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsLabels {
    /// The KMS backend's name.
    pub backend: String,
    /// `wrap` or `unwrap`.
    pub op: &'static str,
    /// `ok` or the backend error kind.
    pub result: &'static str,
}

/// `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why a request was refused.
    pub reason: &'static str,
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    /// `phiseal_requests_total{rpc,code}`.
    pub requests: Family<RpcLabels, Counter>,
    /// `phiseal_request_duration_seconds{rpc}`.
    pub request_duration: Family<RpcLabel, Histogram>,
    /// `phiseal_operations_total{action,result}`: per field for data operations (from the
    /// audit records).
    pub operations: Family<OpLabels, Counter>,
    /// `phiseal_key_lookups_total{source}`: cache hit rate = (cache + stale) / all.
    pub key_lookups: Family<SourceLabel, Counter>,
    /// `phiseal_kms_calls_total{backend,op,result}`.
    pub kms_calls: Family<KmsLabels, Counter>,
    /// `phiseal_kms_call_duration_seconds{backend,op,result}`.
    pub kms_duration: Family<KmsLabels, Histogram>,
    /// `phiseal_audit_append_duration_seconds`: time for one append (one call's records)
    /// to be as durable as configured.
    pub audit_append_duration: Histogram,
    /// `phiseal_audit_records_total`.
    pub audit_records: Counter,
    /// `phiseal_audit_failures_total`: appends that failed (their operations failed too).
    pub audit_failures: Counter,
    /// `phiseal_refused_total{reason}`: unauthenticated, permission_denied, rate_limited,
    /// batch_too_large.
    pub refused: Family<ReasonLabel, Counter>,
    /// `phiseal_scheduled_rotations_total{action,result}` (`action` is always `rotate_key`).
    pub scheduled_rotations: Family<OpLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 22 buckets: 10 µs, 20 µs, … up to ~21 s (then +Inf)
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            operations: Family::default(),
            key_lookups: Family::default(),
            kms_calls: Family::default(),
            kms_duration: Family::new_with_constructor(latency_histogram),
            audit_append_duration: latency_histogram(),
            audit_records: Counter::default(),
            audit_failures: Counter::default(),
            refused: Family::default(),
            scheduled_rotations: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("phiseal");
        r.register(
            "requests",
            "gRPC calls by method and status code",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "gRPC call latency by method",
            m.request_duration.clone(),
        );
        r.register(
            "operations",
            "Audited operations by action and result (per field for data operations)",
            m.operations.clone(),
        );
        r.register(
            "key_lookups",
            "Tenant key lookups of field operations: cache hits, KMS unwraps, and stale keys served during a KMS outage",
            m.key_lookups.clone(),
        );
        r.register(
            "kms_calls",
            "KMS calls by backend, operation and result",
            m.kms_calls.clone(),
        );
        r.register(
            "kms_call_duration_seconds",
            "KMS call latency",
            m.kms_duration.clone(),
        );
        r.register(
            "audit_append_duration_seconds",
            "Time for one audit append to be as durable as configured",
            m.audit_append_duration.clone(),
        );
        r.register(
            "audit_records",
            "Audit records written",
            m.audit_records.clone(),
        );
        r.register(
            "audit_failures",
            "Audit appends that failed (their operations were refused)",
            m.audit_failures.clone(),
        );
        r.register(
            "refused",
            "Requests refused before running, by reason",
            m.refused.clone(),
        );
        r.register(
            "scheduled_rotations",
            "Rotations started by the rotation schedule, by result",
            m.scheduled_rotations.clone(),
        );
        Arc::new(m)
    }

    /// Counts one finished call.
    pub fn observe_call(&self, rpc: &'static str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .get_or_create(&RpcLabels {
                rpc,
                code: code_name(code),
            })
            .inc();
        self.request_duration
            .get_or_create(&RpcLabel { rpc })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a refusal.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// The name of a gRPC code, for labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "Ok",
        C::Cancelled => "Cancelled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

/// Most connections the metrics listener serves at once; more are closed as they arrive, so
/// that idle connections cannot use up the daemon's file descriptors.
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// How long a metrics connection may take to send its request headers.
const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics` on `addr` until `shutdown` resolves: one request per connection
/// (no keep-alive), at most [`MAX_METRICS_CONNECTIONS`] at once, headers within
/// [`METRICS_HEADER_TIMEOUT`].
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Metrics { addr, source })?;
    tracing::info!(%addr, "metrics listener on http://{addr}/metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    Ok(tokio::spawn(async move {
        let mut shutdown = shutdown;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, for example: do not spin on it.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Over the cap: the connection is dropped (closed) at once.
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                continue;
            };
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let registry = Arc::clone(&registry);
                    async move { Ok::<_, std::convert::Infallible>(respond(&req, &registry)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(io, service)
                    .await;
                drop(slot);
            });
        }
    }))
}

fn respond<B>(req: &hyper::Request<B>, registry: &Registry) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
        return response;
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        return response;
    }
    *response.body_mut() = Full::new(Bytes::from(text));
    if let Ok(v) = hyper::header::HeaderValue::from_str(
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    ) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}
