//! The one error type of this crate, and its conversion to [`phiseal::BackendError`].

use std::path::PathBuf;

use phiseal::{BackendError, BackendErrorKind};

use crate::verify::ProblemKind;

/// Everything the file audit log can fail with.
///
/// Messages name the file and say what the operator should do. They never contain event
/// contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditFileError {
    /// The log file (or its parent directory) could not be created or opened.
    #[error(
        "cannot open audit log {path}: {source} (check the path; a daemon writing a new log needs its parent directory to exist and be writable)"
    )]
    Open {
        /// The log file.
        path: PathBuf,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another `FileAuditLog` in this one) has the log open for writing.
    #[error(
        "audit log {path} is already open for writing by another process: one writer per log \
         file (give each process its own log)"
    )]
    Locked {
        /// The path.
        path: PathBuf,
    },
    /// The existing log can be written by other users.
    #[error(
        "audit log {path} has mode {mode:04o}: other users could write it, or read the tenants, \
         record ids and callers it names; run `chmod 600 {path}` (0640 if a log shipper reads \
         it through the group)"
    )]
    InsecurePermissions {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path exists but is not a regular file (symlinks are refused).
    #[error("audit log {path} is not a regular file (symlinks are refused)")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// An I/O operation on the log (or a file next to it) failed.
    #[error("audit log {path}: {op} failed: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done (`write`, `fdatasync`, `read`, …).
        op: &'static str,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// The file does not end with a newline: a crash interrupted a write. Nothing is appended to
    /// such a file until the torn bytes are saved and removed.
    #[error(
        "audit log {path} ends with a torn (partial) record of {len} bytes at byte offset {offset}, \
         probably from a crash mid-write: run `phiseal audit verify`, then `phiseal audit recover` \
         (it saves the bytes next to the log and records the recovery in the chain; in Rust: \
         `FileAuditLog::recover_torn_tail`), then start again"
    )]
    TornTail {
        /// The log file.
        path: PathBuf,
        /// Byte offset where the torn record starts (just after the last newline).
        offset: u64,
        /// Number of torn bytes.
        len: u64,
    },
    /// The last record of an existing log is not a valid record, so the chain cannot be
    /// continued.
    #[error(
        "audit log {path}: the last record (line ending at byte {end}) is damaged: {reason}; \
         refusing to append to it: run `verify` and investigate"
    )]
    DamagedTail {
        /// The log file.
        path: PathBuf,
        /// Byte offset of the end of the damaged line.
        end: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// An earlier write or fdatasync failed, so the file may end in a partial or unsynced record.
    /// Every later append fails (fail closed).
    #[error(
        "audit log {path} is out of service after an earlier failure ({reason}); the file may end \
         in a partial record: stop the service, run `verify` (and `recover_torn_tail` if it reports \
         a torn tail), then restart"
    )]
    Poisoned {
        /// The log file.
        path: PathBuf,
        /// The first failure.
        reason: String,
    },
    /// One record would be longer than the longest line `verify` accepts.
    #[error("audit record of {len} bytes exceeds the limit of {max} bytes; nothing was written")]
    RecordTooLarge {
        /// The encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`crate::Durability::Buffered`]: the in-memory queue already holds its maximum number of
    /// records because the writer thread is not keeping up (a slow or stalled disk). Nothing of
    /// this `append` was queued; the operation is refused (fail closed). May succeed later.
    #[error(
        "audit log {path}: {queued} records are waiting for the writer thread (limit {limit}): \
         the disk is not keeping up; these events were not recorded and the operation is refused"
    )]
    QueueFull {
        /// The log file.
        path: PathBuf,
        /// Records in the queue when the append was refused.
        queued: usize,
        /// The queue limit.
        limit: usize,
    },
    /// The background fdatasync thread is gone (cannot normally happen).
    #[error("audit log {path}: the fdatasync thread stopped; restart the service")]
    SyncThreadGone {
        /// The log file.
        path: PathBuf,
    },
    /// `export_tenant` found a broken chain: the export is incomplete and must be discarded.
    #[error(
        "audit log {path} fails verification at line {line} ({}): export aborted; \
         discard the partial output and run `verify`",
        kind.as_str()
    )]
    ChainBroken {
        /// The log file.
        path: PathBuf,
        /// 1-based line number of the first problem.
        line: u64,
        /// The first problem found.
        kind: ProblemKind,
    },
    /// A torn-tail recovery was interrupted after it cut the tail off and before it recorded
    /// that in the chain: appending now would lose the trace of the cut.
    #[error(
        "audit log {path}: a torn-tail recovery was interrupted (the tail was saved to {saved_to} \
         and cut off, but the recovery record is missing): run `phiseal audit recover` \
         (FileAuditLog::recover_torn_tail) again, then reopen"
    )]
    RecoveryInterrupted {
        /// The log file.
        path: PathBuf,
        /// Where the torn bytes were saved.
        saved_to: PathBuf,
    },
    /// The log file does not exist, but closed segments of a log at that path do: a new log
    /// there would interleave two chains.
    #[error(
        "audit log {path} does not exist, but closed segments of a log there do ({segment} …): \
         restore the log file, or move its segments away together with it before a new log \
         starts at this path"
    )]
    OrphanSegments {
        /// The log file.
        path: PathBuf,
        /// The first of the segments.
        segment: PathBuf,
    },
    /// Rollover is on, but the log's directory does not allow it: checked when the log is
    /// opened, so that a rollover cannot fail later and stop every operation.
    #[error(
        "audit log {path}: rollover is on (LogOptions::rollover_at; phiseald: \
         audit.rollover_bytes), but {step} failed in the log's directory: {source}; let the \
         log's owner create files and hard links there and give them the log's group, or turn \
         rollover off (0)"
    )]
    RolloverUnsupported {
        /// The log file.
        path: PathBuf,
        /// What failed.
        step: &'static str,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// A closed segment's name conflicts with the active file: it names other records than the
    /// active file it is a second name of, or it holds the same first record as the active
    /// file without being the same file (a copy that lost its hard link).
    #[error(
        "audit log {path}: the closed segment {segment} conflicts with it: {reason}; nothing \
         was changed"
    )]
    SegmentConflict {
        /// The log file.
        path: PathBuf,
        /// The segment.
        segment: PathBuf,
        /// What conflicts and what to do.
        reason: String,
    },
    /// `recover_torn_tail` found an existing save file whose content differs from the torn bytes.
    #[error(
        "cannot save the torn tail of {path}: {saved_to} already exists with different content; \
         move it away and retry"
    )]
    TornFileConflict {
        /// The log file.
        path: PathBuf,
        /// The save file.
        saved_to: PathBuf,
    },
}

impl AuditFileError {
    /// The broad class of this failure, for [`BackendError`].
    pub fn backend_kind(&self) -> BackendErrorKind {
        match self {
            AuditFileError::Open { .. }
            | AuditFileError::NotAFile { .. }
            | AuditFileError::Locked { .. }
            | AuditFileError::OrphanSegments { .. }
            | AuditFileError::SegmentConflict { .. }
            | AuditFileError::RolloverUnsupported { .. }
            | AuditFileError::InsecurePermissions { .. } => BackendErrorKind::Misconfigured,
            AuditFileError::RecordTooLarge { .. } => BackendErrorKind::InvalidData,
            AuditFileError::QueueFull { .. } => BackendErrorKind::Unavailable,
            AuditFileError::Io { .. }
            | AuditFileError::TornTail { .. }
            | AuditFileError::RecoveryInterrupted { .. }
            | AuditFileError::DamagedTail { .. }
            | AuditFileError::Poisoned { .. }
            | AuditFileError::SyncThreadGone { .. }
            | AuditFileError::ChainBroken { .. }
            | AuditFileError::TornFileConflict { .. } => BackendErrorKind::Other,
        }
    }
}

impl From<AuditFileError> for BackendError {
    fn from(e: AuditFileError) -> Self {
        BackendError::new(e.backend_kind(), "file audit log").with_source(e)
    }
}
