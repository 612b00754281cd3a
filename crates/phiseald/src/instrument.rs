//! Wrappers that count and time what the keyring does with its backends, without changing
//! it: every KMS call (backend, operation, result, latency) and every audit append (latency,
//! records, failures, and per record the action, result and key source — which gives the
//! key-cache hit rate).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use phiseal::audit::{Action, AuditEvent, AuditSink, KeySource};
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::{BackendError, BackendErrorKind, TenantKey};

use crate::metrics::{KmsLabels, Metrics, OpLabels, SourceLabel};

fn kind_name(kind: BackendErrorKind) -> &'static str {
    match kind {
        BackendErrorKind::Unavailable => "unavailable",
        BackendErrorKind::Denied => "denied",
        BackendErrorKind::InvalidData => "invalid_data",
        BackendErrorKind::Conflict => "conflict",
        BackendErrorKind::Misconfigured => "misconfigured",
        _ => "other",
    }
}

/// A KMS that reports its calls to [`Metrics`].
#[derive(Debug)]
pub struct MeteredKms {
    inner: Arc<dyn Kms>,
    metrics: Arc<Metrics>,
}

impl MeteredKms {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Kms>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    /// Counts a call of backend `backend` ([`Kms::backend_for`]; 0 is the current one).
    fn record<T>(
        &self,
        backend: usize,
        op: &'static str,
        started: Instant,
        result: &Result<T, BackendError>,
    ) {
        let labels = KmsLabels {
            backend: self.inner.backend_name(backend).to_owned(),
            op,
            result: match result {
                Ok(_) => "ok",
                Err(e) => kind_name(e.kind()),
            },
        };
        self.metrics.kms_calls.get_or_create(&labels).inc();
        self.metrics
            .kms_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl Kms for MeteredKms {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn is_dev_only(&self) -> bool {
        self.inner.is_dev_only()
    }

    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        self.inner.can_unwrap(root_key_ref)
    }

    fn backend_count(&self) -> usize {
        self.inner.backend_count()
    }

    fn backend_for(&self, root_key_ref: &str) -> Option<usize> {
        self.inner.backend_for(root_key_ref)
    }

    fn backend_name(&self, index: usize) -> &str {
        self.inner.backend_name(index)
    }

    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        let started = Instant::now();
        let result = self.inner.current_root_key_ref().await;
        self.record(0, "current_root_key_ref", started, &result);
        result
    }

    async fn wrap(
        &self,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, BackendError> {
        let started = Instant::now();
        let result = self.inner.wrap(key, binding).await;
        self.record(0, "wrap", started, &result);
        result
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError> {
        let started = Instant::now();
        let result = self.inner.unwrap(wrapped, binding).await;
        let backend = self.inner.backend_for(&wrapped.root_key_ref).unwrap_or(0);
        self.record(backend, "unwrap", started, &result);
        result
    }
}

/// An audit sink that reports its appends to [`Metrics`].
#[derive(Debug)]
pub struct MeteredAudit {
    inner: Arc<dyn AuditSink>,
    metrics: Arc<Metrics>,
}

impl MeteredAudit {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn AuditSink>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn count(&self, events: &[AuditEvent]) {
        let m = &self.metrics;
        // A batch is mostly one (action, result, source): count runs, not records, so a
        // 10 000-field batch costs a handful of label lookups.
        let mut run: Option<(OpLabels, Option<KeySource>, u64)> = None;
        let flush = |run: &mut Option<(OpLabels, Option<KeySource>, u64)>| {
            if let Some((labels, source, n)) = run.take() {
                m.operations.get_or_create(&labels).inc_by(n);
                if let Some(source) = source {
                    m.key_lookups
                        .get_or_create(&SourceLabel {
                            source: source.as_str(),
                        })
                        .inc_by(n);
                }
            }
        };
        for e in events {
            let labels = OpLabels {
                action: e.action.as_str(),
                result: e.outcome.as_str(),
            };
            // The key source of a field operation (an `unwrap_key` record also names the
            // KMS, but it is not a lookup of its own).
            let source = match e.action {
                Action::Encrypt | Action::Decrypt | Action::Rewrap => e.key_source,
                _ => None,
            };
            match &mut run {
                Some((l, s, n)) if *l == labels && *s == source => *n += 1,
                _ => {
                    flush(&mut run);
                    run = Some((labels, source, 1));
                }
            }
        }
        flush(&mut run);
    }
}

#[async_trait]
impl AuditSink for MeteredAudit {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn acknowledges_before_write(&self) -> bool {
        self.inner.acknowledges_before_write()
    }

    async fn append(&self, events: &[AuditEvent]) -> Result<(), BackendError> {
        let started = Instant::now();
        let result = self.inner.append(events).await;
        self.metrics
            .audit_append_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                self.metrics.audit_records.inc_by(events.len() as u64);
                self.count(events);
            }
            Err(_) => {
                self.metrics.audit_failures.inc();
            }
        }
        result
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush().await
    }
}
