//! The audit sink trait and the audit event every operation writes.
//!
//! An event names who did what to which tenant/field/record with which key version, and how
//! it ended. It never holds plaintext, ciphertext or key bytes. If a sink cannot record an
//! event, the operation fails (fail closed).

use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;

use crate::context::TenantId;
use crate::error::BackendError;

/// Who performed an operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor {
    /// Authenticated identity (a service name, a token's name, `uid:1000`, `library`).
    pub identity: Arc<str>,
    /// Peer uid, when known (sidecar).
    pub uid: Option<u32>,
    /// Peer pid, when known (sidecar).
    pub pid: Option<u32>,
}

impl Actor {
    /// An actor known only by name (in-process callers).
    pub fn named(identity: impl Into<Arc<str>>) -> Self {
        Self {
            identity: identity.into(),
            uid: None,
            pid: None,
        }
    }
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// A tenant and its key version 1 were created.
    CreateTenant,
    /// One field was encrypted.
    Encrypt,
    /// One field was decrypted.
    Decrypt,
    /// One ciphertext was moved to the primary key version.
    Rewrap,
    /// A tenant key was rotated.
    RotateKey,
    /// The minimum decryption version was changed.
    SetMinDecryptVersion,
    /// A tenant's keys were destroyed.
    ShredTenant,
    /// A tenant key version was unwrapped by the KMS (a key-cache miss).
    UnwrapKey,
    /// Key metadata was read (versions, states).
    KeyStatus,
    /// A root-key rotation or migration step re-wrapped one tenant key version.
    RewrapRootKey,
    /// A degraded-mode decision during a KMS outage: `ok` when a cached key past its TTL was
    /// kept in service (within the cache's `max_stale`), an error kind when it was refused.
    ServeStaleKey,
    /// One field was encrypted deterministically (AES-SIV, algorithm 0x03; `crate::search`).
    EncryptDeterministic,
    /// One blind index was computed (under the primary key version; `crate::search`).
    BlindIndex,
    /// A deterministic-encryption query value was computed under one live key version (one
    /// record per version of a `deterministic_query`).
    DeterministicQuery,
    /// A blind-index query value was computed under one live key version (one record per
    /// version of a `blind_index_query`).
    BlindIndexQuery,
    /// One stream (a large value in segments, `crate::stream`) was encrypted: one record at
    /// its end, with its outcome (a stream abandoned or failed midway is recorded as failed).
    EncryptStream,
    /// One stream was decrypted: one record at its end; truncation or tampering detected at
    /// any point is recorded as failed.
    DecryptStream,
    /// A root key was created in the KMS (`phiseal root new-hsm-key`): an `attempt` before,
    /// the result after, both naming the new key in `root_key`.
    CreateRootKey,
}

impl Action {
    /// Stable snake_case name, as written to the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreateTenant => "create_tenant",
            Action::Encrypt => "encrypt",
            Action::Decrypt => "decrypt",
            Action::Rewrap => "rewrap",
            Action::RotateKey => "rotate_key",
            Action::SetMinDecryptVersion => "set_min_decrypt_version",
            Action::ShredTenant => "shred_tenant",
            Action::UnwrapKey => "unwrap_key",
            Action::KeyStatus => "key_status",
            Action::RewrapRootKey => "rewrap_root_key",
            Action::ServeStaleKey => "serve_stale_key",
            Action::EncryptDeterministic => "encrypt_deterministic",
            Action::BlindIndex => "blind_index",
            Action::DeterministicQuery => "deterministic_query",
            Action::BlindIndexQuery => "blind_index_query",
            Action::CreateRootKey => "create_root_key",
            Action::EncryptStream => "encrypt_stream",
            Action::DecryptStream => "decrypt_stream",
        }
    }
}

/// Where the tenant key of an encrypt/decrypt came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// The in-memory key cache (a hit).
    Cache,
    /// The KMS (a miss; an [`Action::UnwrapKey`] event precedes it).
    Kms,
    /// The key cache, past the key's TTL, because the KMS is unavailable (an
    /// [`Action::ServeStaleKey`] event records the decision).
    Stale,
}

impl KeySource {
    /// Stable name, as written to the log.
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Cache => "cache",
            KeySource::Kms => "kms",
            KeySource::Stale => "stale",
        }
    }
}

/// How an operation ended: `ok` or an error kind ([`crate::Error::kind`]), or `attempt` for the
/// record written *before* an irreversible admin operation (create, rotate, shred, minimum
/// version), so that it is refused if it cannot be audited; a second record gives its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// About to run (admin operations only).
    Attempt,
    /// Succeeded.
    Ok,
    /// Failed with this error kind.
    Error(&'static str),
}

impl Outcome {
    /// `ok` or the error kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Attempt => "attempt",
            Outcome::Ok => "ok",
            Outcome::Error(kind) => kind,
        }
    }
}

/// One audit record's content. The sink adds sequence number and hash chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When (UTC).
    pub time: Timestamp,
    /// Who.
    pub actor: Actor,
    /// What.
    pub action: Action,
    /// Which tenant, if any.
    pub tenant: Option<TenantId>,
    /// Which field (the context's field name), if any.
    pub field: Option<Arc<str>>,
    /// Which record (the context's record id), if any.
    pub record: Option<Arc<str>>,
    /// Which tenant key version (for rewrap: the target version; on a rewrap that failed
    /// before re-encrypting, the version whose use failed).
    pub key_version: Option<u32>,
    /// For rewrap: the key version the ciphertext was under (decrypted with), when its header
    /// could be read. `None` on every other record.
    pub from_key_version: Option<u32>,
    /// Where the key came from, for encrypt/decrypt/rewrap.
    pub key_source: Option<KeySource>,
    /// The root key (its KMS reference, as stored with the wrapped key: not secret) of the
    /// wrapping a record is about, for the records that touch one: `unwrap_key` (the root
    /// key the version is wrapped under, whether or not the KMS was reached), the `ok`
    /// result of `create_tenant` and `rotate_key` (the new version's), `rewrap_root_key` (the
    /// source — the wrapping the step found — on the `attempt` and on a failure, the target
    /// once re-wrapped). `None` on every other record.
    pub root_key: Option<Arc<str>>,
    /// How it ended.
    pub outcome: Outcome,
    /// The request id that groups the events of one call.
    pub request_id: Arc<str>,
}

/// Durable, tamper-evident storage of audit events.
#[async_trait]
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// A short name for errors (`file`, …).
    fn name(&self) -> &str;

    /// True if [`AuditSink::append`] may return before the records reached the operating
    /// system (an in-memory queue). Such a sink can lose acknowledged records if its writer
    /// later fails, so it is not fail-closed: the `Production` profile refuses it unless
    /// explicitly allowed.
    fn acknowledges_before_write(&self) -> bool {
        false
    }

    /// Appends events, in order. Returns only once they are as durable as the sink's
    /// durability setting promises; an error means they may not be recorded, and the caller
    /// fails the operation.
    async fn append(&self, events: &[AuditEvent]) -> Result<(), BackendError>;

    /// Makes everything appended so far durable (fsync). Called on shutdown.
    async fn flush(&self) -> Result<(), BackendError>;
}
