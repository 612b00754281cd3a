//! # phiseal-audit-file — a hash-chained JSON-lines audit log in a local file
//!
//! [`FileAuditLog`] implements [`phiseal::audit::AuditSink`] (HIPAA § 164.312(b) audit
//! controls): JSON lines — one event per line, or several events written together in one batch
//! line — each line carrying the SHA-256 of the previous one, so that
//! [`verify`] detects any edit, deletion, insertion or reordering made without recomputing the
//! later hashes (the chain is not keyed: a rewrite from some point on, or a truncation, is
//! caught only against an externally anchored head hash), and reports a torn tail left by a
//! crash instead of dropping it. The log fails closed: if a record cannot be written, the
//! operation fails (in [`Durability::Buffered`] mode, which writes after acknowledging, every
//! later operation fails and the error counts the acknowledged records lost). [`Durability`]
//! says what a process crash or a power cut can lose in each mode.
//!
//! [`export_tenant`] writes one tenant's records (verified while reading) for tenant
//! administrators. With [`LogOptions::rollover_at`] the log closes its file at a size and
//! continues the chain in a new one; [`verify`] and [`export_tenant`] read all its files.
//!
//! The format is described on [`FileAuditLog`]. Records never contain plaintext, ciphertext
//! or key bytes: events carry only names, ids and outcomes.
//!
//! Unix only (file modes, positional reads).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
mod format;
mod log;
mod queued;
mod segments;
mod verify;

pub use error::AuditFileError;
pub use log::{Durability, FileAuditLog, LogOptions, RecoveryReport};
pub use verify::{
    Anchor, ExportReport, MAX_PROBLEMS, Problem, ProblemKind, VerifyOptions, VerifyReport,
    export_tenant, export_tenant_with, verify, verify_anchored, verify_with,
};
