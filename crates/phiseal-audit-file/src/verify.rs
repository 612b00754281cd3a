//! Streaming verification and per-tenant export. Both read the log line by line through a
//! bounded buffer: memory use does not depend on the file size, and no input makes them panic.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use jiff::Timestamp;

use phiseal::crypto::ct_eq;

use crate::error::AuditFileError;
use crate::format::{Kind, MAX_LINE, Parsed, encode_export, parse_line, stored_hash};
use crate::segments::{closed_segments, names_file, same_file};

/// Export output is handed to the writer in pieces of about this size.
const EXPORT_CHUNK: usize = 64 * 1024;

/// At most this many problems are kept in a [`VerifyReport`]; the rest are only counted.
pub const MAX_PROBLEMS: usize = 1000;

/// What is wrong with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The stored hash is not the SHA-256 of the line's body: the line was edited.
    HashMismatch,
    /// `prev` is not the hash of the line before: a line was deleted, inserted or moved here.
    ChainBreak,
    /// The sequence number skips ahead: records were deleted (or moved away).
    SeqGap,
    /// The sequence number is not above the previous one: records were inserted or reordered.
    SeqOutOfOrder,
    /// Not a record: not UTF-8 JSON, a missing or mistyped member, too long, …
    Malformed,
    /// A file's first line is not a header record, or the log does not start at its origin
    /// (`seq` 0, zero `prev`): the start of the log (or of a file) was removed or replaced, or
    /// the closed segments before the first file read are not there.
    MissingHeader,
    /// A header record after a file's first line (another log's chain was spliced in), or a
    /// file of another log (another `log_id`) among the segments.
    UnexpectedHeader,
    /// No line has the anchored hash and ends with the anchored seq ([`verify_anchored`]):
    /// records were cut off the end, or the chain was rewritten from an earlier point.
    AnchorMissing,
}

impl ProblemKind {
    /// The stable snake-case name (`hash_mismatch` …), as reports and errors print it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::HashMismatch => "hash_mismatch",
            ProblemKind::ChainBreak => "chain_break",
            ProblemKind::SeqGap => "seq_gap",
            ProblemKind::SeqOutOfOrder => "seq_out_of_order",
            ProblemKind::Malformed => "malformed",
            ProblemKind::MissingHeader => "missing_header",
            ProblemKind::UnexpectedHeader => "unexpected_header",
            ProblemKind::AnchorMissing => "anchor_missing",
        }
    }
}

/// A head recorded earlier, outside the machine: a line's hash and the seq of its last record
/// (a report's `head_hash` and `last_seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The seq of the last record of the anchored line.
    pub last_seq: u64,
    /// The anchored line's hash.
    pub hash: [u8; 32],
}

/// What [`verify_with`] and [`export_tenant_with`] check besides the chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// A head recorded earlier that the log must still hold (see [`verify_anchored`]).
    pub anchor: Option<Anchor>,
    /// Where the files present start, when the log's first closed segments were removed
    /// (after archiving them): the last record of the last removed segment and its line's
    /// hash, recorded from the archive (`last_seq` and `head_hash` of a `verify` of it). The
    /// first file present must continue exactly there; without this, a log that does not
    /// start at its origin is [`ProblemKind::MissingHeader`].
    pub after: Option<Anchor>,
}

impl VerifyOptions {
    /// Also checks that the log still holds `anchor`.
    pub fn anchor(mut self, anchor: Anchor) -> Self {
        self.anchor = Some(anchor);
        self
    }

    /// Accepts a log whose files present start right after `after`.
    pub fn after(mut self, after: Anchor) -> Self {
        self.after = Some(after);
        self
    }
}

/// One problem found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file of the log (a closed segment or the active file).
    pub path: PathBuf,
    /// 1-based line number in that file.
    pub line: u64,
    /// Byte offset of the start of the line in that file.
    pub offset: u64,
    /// What is wrong.
    pub kind: ProblemKind,
    /// A short explanation (never contains record content).
    pub detail: String,
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// The files read, in order: the log's closed segments (`<log>.<first seq>-<last seq>`),
    /// then the active file.
    pub files: Vec<PathBuf>,
    /// Set when the first file read continues the log after this record (its earlier closed
    /// segments are not there: removed after archiving — accepted only with
    /// [`VerifyOptions::after`] — or missing).
    pub starts_after: Option<u64>,
    /// The active file `<log>` does not exist, and only closed segments were read: an archive
    /// of them — or the log file was deleted. Not intact ([`VerifyReport::is_intact`]); see
    /// [`VerifyReport::segments_intact`].
    pub active_missing: bool,
    /// Records read: one per complete line, and each record of a batch line (header, recovery
    /// and malformed lines count as one).
    pub records: u64,
    /// Sequence number of the last well-formed record.
    pub last_seq: Option<u64>,
    /// Hash (hex) of the last well-formed record: anchor it outside the machine (a ticket, a
    /// WORM bucket, another log) to detect a rewrite of the whole chain.
    pub head_hash: Option<String>,
    /// `(offset, len)` of bytes after the last newline of the active file: a write interrupted
    /// by a crash (or, on a live log, a write in progress). See
    /// [`crate::FileAuditLog::recover_torn_tail`].
    pub torn_tail: Option<(u64, u64)>,
    /// Problems found, in log order (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
    /// Total number of problems, including those not kept in `problems`.
    pub problem_count: u64,
}

impl VerifyReport {
    /// True when every line is a well-formed record, the chain is unbroken from a header, the
    /// sequence is contiguous, and there is no torn tail.
    pub fn is_intact(&self) -> bool {
        self.segments_intact() && !self.active_missing
    }

    /// [`VerifyReport::is_intact`], except that the active file may be missing: for an
    /// archive of closed segments. (Records cut off the end — the active file, the last
    /// segments — show only against an anchor.)
    pub fn segments_intact(&self) -> bool {
        self.problem_count == 0 && self.problems.is_empty() && self.torn_tail.is_none()
    }
}

/// The result of [`export_tenant`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportReport {
    /// Records read and verified.
    pub records_scanned: u64,
    /// Records written to the output.
    pub exported: u64,
    /// Sequence number of the last record read.
    pub last_seq: Option<u64>,
    /// Hash (hex) of the last record read.
    pub head_hash: Option<String>,
    /// A torn tail at the end of the log, which was not exported (see [`VerifyReport::torn_tail`]).
    pub torn_tail: Option<(u64, u64)>,
    /// Only closed segments were read: the active file does not exist (see
    /// [`VerifyReport::active_missing`]).
    pub active_missing: bool,
    /// Sequence numbers of the log's torn-tail recovery records (`recovered_torn_tail`, any
    /// time): records acknowledged before such a crash may be missing, of any tenant — in the
    /// default durability a record is written before its operation returns but fsynced
    /// later. An export cannot tell whose records they were.
    pub recoveries: Vec<u64>,
}

/// How one call to [`read_line_capped`] ended.
pub(crate) enum LineRead {
    /// End of file, nothing read.
    Eof,
    /// A complete line (newline stripped) is in the buffer; `len` counts the newline.
    Line { len: u64 },
    /// A complete line longer than [`MAX_LINE`]; it was skipped, the buffer holds nothing useful.
    TooLong { len: u64 },
    /// Bytes without a final newline up to end of file.
    Partial { len: u64 },
}

/// Reads one line into `buf` (cleared first), keeping at most `MAX_LINE` bytes.
pub(crate) fn read_line_capped<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<LineRead> {
    buf.clear();
    let mut total: u64 = 0;
    let mut overflow = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if total == 0 {
                LineRead::Eof
            } else {
                LineRead::Partial { len: total }
            });
        }
        let (chunk, used, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (avail.get(..i).unwrap_or_default(), i + 1, true),
            None => (avail, avail.len(), false),
        };
        if !overflow {
            if buf.len() + chunk.len() < MAX_LINE {
                buf.extend_from_slice(chunk);
            } else {
                overflow = true;
                buf.clear();
            }
        }
        r.consume(used);
        total += used as u64;
        if done {
            return Ok(if overflow {
                LineRead::TooLong { len: total }
            } else {
                LineRead::Line { len: total }
            });
        }
    }
}

/// One file of a log, in reading order.
struct LogFile {
    path: PathBuf,
    /// A closed segment's seq range, from its name; `None` for the active file.
    range: Option<(u64, u64)>,
    /// The active file, opened first (see [`log_files`]); segments are opened one at a time
    /// when they are read (a long log has thousands).
    file: Option<File>,
}

/// A file of the log, opened when its turn comes.
enum Opened {
    /// Ready to read.
    File(File),
    /// The name is not a regular file (not read).
    NotRegular,
    /// The name was listed but is gone (removed while the log was being read).
    Gone,
}

impl LogFile {
    /// The file to read: the active file (opened first), or the segment opened now.
    fn open(&mut self) -> Result<Opened, AuditFileError> {
        if let Some(file) = self.file.take() {
            return Ok(Opened::File(file));
        }
        match open_regular(&self.path) {
            Ok(Some(file)) => Ok(Opened::File(file)),
            Ok(None) => Ok(Opened::NotRegular),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Opened::Gone),
            Err(source) => Err(AuditFileError::Open {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// Opens `path` for reading if it is a regular file (`Ok(None)` otherwise: nothing else is
/// opened, so no FIFO blocks and no device is touched); a symlink is not followed.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<Option<File>> {
    use rustix::fs::{Mode, OFlags};
    if !std::fs::symlink_metadata(path)?.is_file() {
        return Ok(None);
    }
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let file = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => File::from(fd),
        // A symlink with NOFOLLOW.
        Err(rustix::io::Errno::LOOP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(file.metadata()?.is_file().then_some(file))
}

/// The files of the log at `path`: its closed segments by first seq, then `path` itself.
///
/// `path` is opened first, so that a rollover while the segments are listed and read cannot
/// make the chain look broken: the file opened is then one of the listed segments (same
/// inode: read there, once) or the continuation of the last of them. The same holds for a
/// rollover a crash interrupted after the closed file got its segment name. Without `path`
/// (an archive of closed segments), the segments alone.
fn log_files(path: &Path) -> Result<(Vec<LogFile>, bool), AuditFileError> {
    let open_err = |path: &Path| {
        let path = path.to_owned();
        move |source| AuditFileError::Open { path, source }
    };
    // A symlink at `path` is reported, not followed, as a segment's would be: the writer
    // refuses to open one, so it is not the log's active file (someone else put it there).
    let active_is_link =
        std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_symlink());
    let opened = if active_is_link {
        Ok(None)
    } else {
        open_regular(path)
    };
    let active = match opened {
        Ok(Some(file)) => Some(file),
        Ok(None) if active_is_link => None,
        Ok(None) => {
            return Err(AuditFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(open_err(path)(e)),
    };
    let active_meta = match &active {
        Some(f) => Some(f.metadata().map_err(read_err(path))?),
        None => None,
    };
    let segments = closed_segments(path)?;
    if active.is_none() && segments.is_empty() && !active_is_link {
        return Err(open_err(path)(std::io::ErrorKind::NotFound.into()));
    }
    // Told apart from a log whose active file is missing by the caller (`active_missing`).
    let active_missing = active.is_none() && !active_is_link;
    let mut files = Vec::with_capacity(segments.len() + 1);
    let mut active = active;
    let count = segments.len();
    for (i, segment) in segments.into_iter().enumerate() {
        // The active file under a segment's name: read through the descriptor opened first,
        // under that name, once — when it is the last segment (a rollover in progress), or
        // when `<log>` is another file by now (rolled over while this listed the directory).
        // An earlier segment that is still `<log>` (put back in its place) is read again at
        // the end, where the chain shows it.
        let is_active = active_meta.as_ref().is_some_and(|am| {
            same_file(&segment.path, am) && (i + 1 == count || !names_file(path, am))
        });
        files.push(LogFile {
            path: segment.path,
            range: Some((segment.first, segment.last)),
            file: if is_active { active.take() } else { None },
        });
    }
    if active.is_some() || active_is_link {
        // (A symlink: `LogFile::open` reports it as not a regular file.)
        files.push(LogFile {
            path: path.to_owned(),
            range: None,
            file: active,
        });
    }
    Ok((files, active_missing))
}

/// The chain checker shared by [`verify`] and [`export_tenant`]: one chain across the files
/// of a log.
struct Checker {
    report: VerifyReport,
    /// The file being read, and its index in the log's files.
    path: PathBuf,
    file_index: usize,
    /// Line number and byte offset in that file.
    line_no: u64,
    offset: u64,
    /// The `after` of that file's header (the seq before its first record), when well-formed.
    file_after: Option<u64>,
    /// The last seq read in that file.
    file_last: Option<u64>,
    /// The log's id, from the first file's header.
    log_id: Option<[u8; 16]>,
    /// Hash and seq of the last well-formed line.
    prev: Option<([u8; 32], u64)>,
    /// Malformed lines since that one: how many, and the last one's stored hash when its
    /// hash member could still be read. The next well-formed line is checked against them,
    /// so that records deleted behind a damaged line still show.
    damaged: Option<(u64, Option<[u8; 32]>)>,
    /// A head to find, and whether a well-formed line matched it.
    anchor: Option<(Anchor, bool)>,
    /// Where the first file may start ([`VerifyOptions::after`]).
    after: Option<Anchor>,
}

impl Checker {
    fn new() -> Self {
        Self {
            report: VerifyReport::default(),
            path: PathBuf::new(),
            file_index: 0,
            line_no: 0,
            offset: 0,
            file_after: None,
            file_last: None,
            log_id: None,
            prev: None,
            damaged: None,
            anchor: None,
            after: None,
        }
    }

    fn with_options(options: VerifyOptions) -> Self {
        let mut checker = Self::new();
        checker.anchor = options.anchor.map(|a| (a, false));
        checker.after = options.after;
        checker
    }

    /// Starts reading the `index`th file of the log.
    fn start_file(&mut self, index: usize, path: &Path) {
        self.path = path.to_owned();
        self.file_index = index;
        self.line_no = 0;
        self.offset = 0;
        self.file_after = None;
        self.file_last = None;
        self.report.files.push(path.to_owned());
    }

    /// Ends a file: an empty file, a torn tail in a closed segment (only the active file may
    /// be written to), and a segment whose name does not match its records are problems.
    fn end_file(&mut self, range: Option<(u64, u64)>, torn: Option<(u64, u64)>) {
        if self.line_no == 0 {
            self.line_no = 1;
            self.problem(
                ProblemKind::MissingHeader,
                "the file has no complete record",
            );
        }
        let Some((first, last)) = range else {
            self.report.torn_tail = torn;
            return;
        };
        if torn.is_some() {
            self.problem(
                ProblemKind::Malformed,
                "a closed segment ends with a partial line: it was changed after it was closed",
            );
        }
        let holds = (self.file_after.map(|a| a.saturating_add(1)), self.file_last);
        if holds != (Some(first), Some(last)) {
            let seen = match holds {
                (Some(a), Some(b)) => format!("{a}-{b}"),
                _ => "an unknown range".to_owned(),
            };
            self.problem(
                ProblemKind::Malformed,
                format!(
                    "the segment's name says records {first}-{last}, it holds {seen}: renamed \
                     or replaced"
                ),
            );
        }
    }

    fn problem(&mut self, kind: ProblemKind, detail: impl Into<String>) {
        self.report.problem_count += 1;
        if self.report.problems.len() < MAX_PROBLEMS {
            self.report.problems.push(Problem {
                path: self.path.clone(),
                line: self.line_no,
                offset: self.offset,
                kind,
                detail: detail.into(),
            });
        }
    }

    /// Checks one complete line; returns the parsed record when it is well-formed.
    fn line(&mut self, read: &LineRead, bytes: &[u8]) -> Option<Parsed> {
        let len = match read {
            LineRead::Line { len } | LineRead::TooLong { len } => *len,
            LineRead::Eof | LineRead::Partial { .. } => return None,
        };
        self.line_no += 1;
        self.report.records += 1;
        let parsed = match read {
            LineRead::TooLong { .. } => Err(format!("line longer than {MAX_LINE} bytes")),
            _ => parse_line(bytes),
        };
        let out = match parsed {
            Err(detail) => {
                self.problem(ProblemKind::Malformed, detail);
                if self.line_no == 1 {
                    self.problem(ProblemKind::MissingHeader, "the first line is not a header");
                }
                let lines = self.damaged.map_or(0, |(n, _)| n);
                self.damaged = Some((lines.saturating_add(1), stored_hash(bytes)));
                None
            }
            Ok(p) => {
                self.check(&p);
                if let Some((anchor, found)) = &mut self.anchor {
                    *found |= p.last_seq == anchor.last_seq && ct_eq(&p.hash, &anchor.hash);
                }
                self.report.records += p.last_seq - p.seq;
                self.prev = Some((p.hash, p.last_seq));
                self.damaged = None;
                self.file_last = Some(p.last_seq);
                self.report.last_seq = Some(p.last_seq);
                self.report.head_hash = Some(hex::encode(p.hash));
                Some(p)
            }
        };
        self.offset += len;
        out
    }

    fn check(&mut self, p: &Parsed) {
        if !p.hash_ok {
            self.problem(
                ProblemKind::HashMismatch,
                "stored hash does not match the record: the line was edited",
            );
        }
        if self.line_no == 1 {
            self.check_file_header(p);
            return;
        }
        if matches!(p.kind, Kind::Header { .. }) {
            self.problem(
                ProblemKind::UnexpectedHeader,
                "a header record after the first line: another log was spliced in",
            );
        }
        if let Kind::Recovered { offset } = p.kind
            && offset != self.offset
        {
            self.problem(
                ProblemKind::Malformed,
                format!(
                    "recovery record claims offset {offset} but is at offset {}",
                    self.offset
                ),
            );
        }
        if let Some(link) = self.link() {
            if link.hash.is_some_and(|h| !ct_eq(&p.prev, &h)) {
                self.problem(
                    ProblemKind::ChainBreak,
                    format!(
                        "'prev' is not the hash of the previous line{}: a record was deleted, \
                         inserted or moved",
                        link.after_damage()
                    ),
                );
            }
            match link.prev_seq.checked_add(1) {
                Some(next) if p.seq >= next && p.seq - next <= link.slack => {}
                Some(next) if p.seq > next => self.problem(
                    ProblemKind::SeqGap,
                    format!(
                        "seq {} follows {}{}: records are missing",
                        p.seq,
                        link.prev_seq,
                        link.after_damage()
                    ),
                ),
                _ => self.problem(
                    ProblemKind::SeqOutOfOrder,
                    format!(
                        "seq {} follows {}: records were inserted or reordered",
                        p.seq, link.prev_seq
                    ),
                ),
            }
        }
    }
}

/// What the next well-formed line must link to (see [`Checker::link`]).
struct Link {
    /// The hash its `prev` must be: the previous line's, or the stored hash of the damaged
    /// line before it; `None` when that line's hash could not be read either.
    hash: Option<[u8; 32]>,
    /// The seq of the last well-formed line.
    prev_seq: u64,
    /// Records the damaged lines since could have held: the next seq may be that much
    /// further on (0 without damage).
    slack: u64,
    /// Damaged lines since the last well-formed one.
    damaged_lines: u64,
}

impl Link {
    /// Words for messages: which line the link skips.
    fn after_damage(&self) -> String {
        match self.damaged_lines {
            0 => String::new(),
            n => format!(" (beyond the {n} damaged line(s) before it)"),
        }
    }
}

impl Checker {
    /// The link the next well-formed line must make, if a well-formed line came before.
    fn link(&self) -> Option<Link> {
        let (prev_hash, prev_seq) = self.prev?;
        Some(match self.damaged {
            None => Link {
                hash: Some(prev_hash),
                prev_seq,
                slack: 0,
                damaged_lines: 0,
            },
            Some((lines, hash)) => Link {
                hash,
                prev_seq,
                slack: lines.saturating_mul(crate::format::MAX_BATCH_RECORDS as u64),
                damaged_lines: lines,
            },
        })
    }

    /// A file's first line: the log's origin (first file), or a continuation header that
    /// links to the previous file's last line (seq and hash) under the same `log_id`.
    fn check_file_header(&mut self, p: &Parsed) {
        let Kind::Header { log_id } = p.kind else {
            self.problem(
                ProblemKind::MissingHeader,
                "the first line of the file is not a header record",
            );
            return;
        };
        self.file_after = Some(p.seq);
        if self.file_index == 0 {
            self.log_id = Some(log_id);
            if p.seq == 0 {
                if let Some(a) = self.after {
                    self.problem(
                        ProblemKind::MissingHeader,
                        format!(
                            "the log starts at its origin, not after the given record {}: not \
                             the log whose segments were removed?",
                            a.last_seq
                        ),
                    );
                }
                return;
            }
            self.report.starts_after = Some(p.seq);
            match self.after {
                Some(a) if a.last_seq == p.seq && ct_eq(&p.prev, &a.hash) => {}
                Some(a) => self.problem(
                    ProblemKind::MissingHeader,
                    format!(
                        "the log starts after record {}, not after the given record {} with \
                         its hash: more segments are missing, or the start was replaced",
                        p.seq, a.last_seq
                    ),
                ),
                None => self.problem(
                    ProblemKind::MissingHeader,
                    format!(
                        "the log starts after record {}: the closed segments holding the \
                         records before it are not here (verify the files together) or were \
                         removed (after archiving them: give the last removed record and its \
                         hash, `--after SEQ:HASH`)",
                        p.seq
                    ),
                ),
            }
            return;
        }
        if self.log_id.is_some_and(|id| id != log_id) {
            self.problem(
                ProblemKind::UnexpectedHeader,
                "this file belongs to another log (another log_id)",
            );
        }
        if let Some(link) = self.link() {
            let prev_seq = link.prev_seq;
            if link.hash.is_some_and(|h| !ct_eq(&p.prev, &h)) {
                self.problem(
                    ProblemKind::ChainBreak,
                    format!(
                        "the file's header does not link to the previous file's last line{}: a \
                         file is missing, or was replaced or edited",
                        link.after_damage()
                    ),
                );
            }
            if p.seq > prev_seq && p.seq - prev_seq > link.slack {
                self.problem(
                    ProblemKind::SeqGap,
                    format!(
                        "the file continues after record {}, the previous one ends at {prev_seq}{}: \
                         records are missing",
                        p.seq,
                        link.after_damage()
                    ),
                );
            } else if p.seq < prev_seq {
                self.problem(
                    ProblemKind::SeqOutOfOrder,
                    format!(
                        "the file continues after record {}, the previous one ends at {prev_seq}",
                        p.seq
                    ),
                );
            }
        }
    }
}

/// Reads every file of the log at `path` through `checker`, calling `each` with every
/// complete line's parse (stopping at its first error).
fn scan(
    path: &Path,
    checker: &mut Checker,
    mut each: impl FnMut(&Checker, Option<Parsed>) -> Result<(), AuditFileError>,
) -> Result<(), AuditFileError> {
    let (files, active_missing) = log_files(path)?;
    checker.report.active_missing = active_missing;
    let mut buf = Vec::with_capacity(1024);
    for (index, mut log_file) in files.into_iter().enumerate() {
        let opened = log_file.open()?;
        checker.start_file(index, &log_file.path);
        let file = match opened {
            Opened::File(file) => file,
            Opened::NotRegular | Opened::Gone => {
                checker.line_no = 1;
                checker.problem(
                    ProblemKind::Malformed,
                    if matches!(opened, Opened::Gone) {
                        "the segment was removed while the log was being read: not read"
                    } else {
                        "not a regular file (a symlink, a directory, a device …): not read"
                    },
                );
                checker.prev = None;
                each(checker, None)?;
                continue;
            }
        };
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut torn = None;
        loop {
            let read = read_line_capped(&mut reader, &mut buf).map_err(read_err(&log_file.path))?;
            match read {
                LineRead::Eof => break,
                LineRead::Partial { len } => {
                    torn = Some((checker.offset, len));
                    break;
                }
                LineRead::Line { .. } | LineRead::TooLong { .. } => {
                    let parsed = checker.line(&read, &buf);
                    each(checker, parsed)?;
                }
            }
        }
        checker.end_file(log_file.range, torn);
        each(checker, None)?;
    }
    Ok(())
}

/// An export's output failed (`op`); named after the log exported.
fn output_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> AuditFileError {
    let path = path.to_owned();
    move |source| AuditFileError::Io { path, op, source }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditFileError + '_ {
    move |source| AuditFileError::Io {
        path: PathBuf::from(path),
        op: "read",
        source,
    }
}

/// Verifies a log file from start to end: every hash, every chain link, the sequence, the
/// header, and the tail. Streams the file, holding one line (at most 64 KiB) at a time, plus the list of segment files; never panics on any bytes.
///
/// An `Err` means the file could not be read at all; everything wrong *inside* the file is in
/// the report's `problems` and `torn_tail`. Run on a live log, a torn tail at the very end may
/// be a write in progress: re-run to tell.
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport, AuditFileError> {
    verify_with(path, VerifyOptions::default())
}

/// [`verify`], and also that the log still holds `anchor` — a head recorded earlier outside
/// the machine: a line with that hash whose last record has that seq. Without it,
/// [`ProblemKind::AnchorMissing`]: the plain chain cannot show records cut off the end, or a
/// chain rewritten from an earlier point; an anchor can.
pub fn verify_anchored(
    path: impl AsRef<Path>,
    anchor: Anchor,
) -> Result<VerifyReport, AuditFileError> {
    verify_with(path, VerifyOptions::default().anchor(anchor))
}

/// [`verify`] with options: an anchor to find, where the files present may start.
pub fn verify_with(
    path: impl AsRef<Path>,
    options: VerifyOptions,
) -> Result<VerifyReport, AuditFileError> {
    let mut checker = Checker::with_options(options);
    scan(path.as_ref(), &mut checker, |_, _| Ok(()))?;
    if let Some((anchor, false)) = checker.anchor {
        checker.problem(
            ProblemKind::AnchorMissing,
            format!(
                "no line ends with record {} under the anchored hash: records were cut off \
                 the end or the chain was rewritten",
                anchor.last_seq
            ),
        );
    }
    Ok(checker.report)
}

/// Writes the records of `tenant` whose time is in `[since, until)` to `out`, one JSON line
/// per record (also for the records of a batch line), verifying the whole chain while reading.
/// An exported line has the members of an event line in the same order — `seq` to
/// `request_id` — without `prev` and `hash`, which chain the log's lines, not single records.
///
/// On a chain problem it stops with [`AuditFileError::ChainBroken`]: what was already written
/// to `out` is incomplete and must be discarded (the export streams, holding one line and at most about 64 KiB of output at a time, so
/// it cannot hold output back). A torn tail at the end is not exported and is reported in
/// [`ExportReport::torn_tail`]. Header and recovery records belong to no tenant and are not
/// exported.
pub fn export_tenant(
    path: impl AsRef<Path>,
    tenant: &str,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
    out: &mut impl Write,
) -> Result<ExportReport, AuditFileError> {
    export_tenant_with(path, tenant, since, until, VerifyOptions::default(), out)
}

/// [`export_tenant`] with the checks of [`VerifyOptions`] (`after`: a log whose first
/// segments were removed after archiving; an `anchor` is not checked by an export).
pub fn export_tenant_with(
    path: impl AsRef<Path>,
    tenant: &str,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
    options: VerifyOptions,
    out: &mut impl Write,
) -> Result<ExportReport, AuditFileError> {
    let path = path.as_ref();
    let mut checker = Checker::with_options(VerifyOptions {
        anchor: None,
        ..options
    });
    let mut report = ExportReport::default();
    let mut text = String::new();
    scan(path, &mut checker, |checker, parsed| {
        if let Some(p) = checker.report.problems.first() {
            return Err(AuditFileError::ChainBroken {
                path: p.path.clone(),
                line: p.line,
                kind: p.kind,
            });
        }
        if let Some(Parsed {
            seq,
            kind: Kind::Recovered { .. },
            ..
        }) = &parsed
        {
            report.recoveries.push(*seq);
        }
        let Some(Parsed {
            seq,
            kind: Kind::Records(line),
            ..
        }) = parsed
        else {
            return Ok(());
        };
        text.clear();
        for (i, record) in line.records().enumerate() {
            // At most the line's last seq, which `parse_line` checked fits.
            let seq = seq.saturating_add(u64::try_from(i).unwrap_or(u64::MAX));
            // `parse_line` checked that every record has every member.
            let record = record.ok_or_else(|| AuditFileError::ChainBroken {
                path: checker.path.clone(),
                line: checker.line_no,
                kind: ProblemKind::Malformed,
            })?;
            let in_range =
                since.is_none_or(|s| record.time >= s) && until.is_none_or(|u| record.time < u);
            if record.tenant == Some(tenant) && in_range {
                encode_export(&mut text, seq, &record);
                report.exported += 1;
                // Written as it grows: a batch line's records, each with the line's shared
                // members repeated, can expand far beyond the line itself.
                if text.len() >= EXPORT_CHUNK {
                    out.write_all(text.as_bytes())
                        .map_err(output_err(path, "write export"))?;
                    text.clear();
                }
            }
        }
        out.write_all(text.as_bytes())
            .map_err(output_err(path, "write export"))
    })?;
    report.torn_tail = checker.report.torn_tail;
    report.active_missing = checker.report.active_missing;
    out.flush().map_err(output_err(path, "flush export"))?;
    report.records_scanned = checker.report.records;
    report.last_seq = checker.report.last_seq;
    report.head_hash = checker.report.head_hash;
    Ok(report)
}
