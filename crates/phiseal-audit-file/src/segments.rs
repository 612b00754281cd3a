//! The files of one log: closed segments and the active file.
//!
//! With a rollover size set ([`crate::LogOptions::rollover_at`]), the writer closes the active
//! file `<log>` once it has grown past that size: the file is fdatasynced, a new file
//! starting with a *continuation header* (the closed file's last seq and last hash, the same
//! `log_id`) is prepared as `<log>.next`, the closed file gets its second name
//! `<log>.<first seq>-<last seq>` (a hard link, both numbers 20 digits), and `<log>.next` is
//! renamed over `<log>`. At every moment `<log>` is a complete log file, so a crash at any
//! step leaves either the old state, the new one, or the closed file named but still `<log>`
//! too — opening removes a leftover `<log>.next` (it holds only a header) and finishes such a
//! rollover, so a segment name, once it exists, is final.
//!
//! The chain runs on across files: a continuation header's `prev` is the hash of the previous
//! file's last line and its `seq` that line's last seq, so the files read in order form one
//! chain (`crate::verify` reads them all).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::AuditFileError;

/// Digits of each number in a segment's name.
const SEQ_DIGITS: usize = 20;

/// A closed segment of a log, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    /// The seq of its first record (its header's seq + 1).
    pub(crate) first: u64,
    /// The seq of its last record.
    pub(crate) last: u64,
    /// Its path.
    pub(crate) path: PathBuf,
}

/// `<log><suffix>`: a file next to the log, named after it.
pub(crate) fn beside(log: &Path, suffix: &str) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `<log>.<first>-<last>`.
pub(crate) fn segment_path(log: &Path, first: u64, last: u64) -> PathBuf {
    beside(log, &format!(".{first:020}-{last:020}"))
}

/// `<log>.next`: the next active file while a rollover prepares it.
pub(crate) fn next_path(log: &Path) -> PathBuf {
    beside(log, ".next")
}

/// Removes `path` if it exists; whether it did.
pub(crate) fn remove_if_exists(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The seq range in a segment's file name, if `name` is `<log name>.<20 digits>-<20 digits>`.
fn parse_name(log_name: &OsString, name: &OsString) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    // Bytes: a log name need not be UTF-8; the suffix is ASCII.
    let rest = name
        .as_bytes()
        .strip_prefix(log_name.as_bytes())?
        .strip_prefix(b".")?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (first, last) = rest.split_once('-')?;
    let digits = |s: &str| s.len() == SEQ_DIGITS && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(first) || !digits(last) {
        return None;
    }
    Some((first.parse().ok()?, last.parse().ok()?))
}

fn dir_of(log: &Path) -> &Path {
    match log.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The closed segments of the log at `log`, by first seq.
pub(crate) fn closed_segments(log: &Path) -> Result<Vec<Segment>, AuditFileError> {
    let Some(log_name) = log.file_name().map(|n| n.to_owned()) else {
        return Ok(Vec::new());
    };
    let dir = dir_of(log);
    let read_err = |source| AuditFileError::Io {
        path: dir.to_owned(),
        op: "listing the log's segments",
        source,
    };
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if let Some((first, last)) = parse_name(&log_name, &entry.file_name()) {
            segments.push(Segment {
                first,
                last,
                path: entry.path(),
            });
        }
    }
    segments.sort_by_key(|s| (s.first, s.last));
    Ok(segments)
}

/// What an interrupted rollover of the log at `log` left, found when the log is opened (with
/// the active file's lock held): removes `<log>.next` (it holds only a header: records go to
/// a new file only after it became `<log>`), and returns the one of `segments` that is a
/// second link to the active file `active`, if any — the rollover was interrupted after the
/// closed file got its (final) name and before the rename; the caller finishes it. Returns
/// whether `<log>.next` was removed, and that segment.
pub(crate) fn interrupted_rollover<'a>(
    log: &Path,
    active: &std::fs::Metadata,
    segments: &'a [Segment],
) -> Result<(bool, Option<&'a Segment>), AuditFileError> {
    let next = next_path(log);
    let removed = remove_if_exists(&next).map_err(|source| AuditFileError::Io {
        path: next,
        op: "removing an interrupted rollover's next file",
        source,
    })?;
    let pending = if active.nlink() > 1 {
        segments.iter().rfind(|s| same_file(&s.path, active))
    } else {
        None
    };
    Ok((removed, pending))
}

/// Whether `path` (not followed if a symlink) is the file `meta` describes.
pub(crate) fn same_file(path: &Path, meta: &std::fs::Metadata) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| same_inode(&m, meta))
}

/// Whether `path`, followed if a symlink, is the file `meta` describes.
pub(crate) fn names_file(path: &Path, meta: &std::fs::Metadata) -> bool {
    std::fs::metadata(path).is_ok_and(|m| same_inode(&m, meta))
}

fn same_inode(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_ignored() {
        let log = Path::new("/var/lib/phiseal/audit.log");
        let p = segment_path(log, 1, 12_345);
        assert_eq!(
            p,
            Path::new("/var/lib/phiseal/audit.log.00000000000000000001-00000000000000012345")
        );
        let name = OsString::from("audit.log");
        assert_eq!(
            parse_name(&name, &p.file_name().unwrap().to_owned()),
            Some((1, 12_345))
        );
        for other in [
            "audit.log",
            "audit.log.next",
            "audit.log.torn-77",
            "audit.log.1-2",
            "audit.log.0000000000000000000a-00000000000000000002",
            "audit.log.00000000000000000001-00000000000000000002.bak",
            "other.log.00000000000000000001-00000000000000000002",
            "audit.log.99999999999999999999-00000000000000000002",
        ] {
            assert_eq!(parse_name(&name, &OsString::from(other)), None, "{other}");
        }
    }
}
