//! `rewrap`: moves ciphertexts, one per line, to the tenant's primary key version.
//!
//! Output line N always corresponds to input line N: a line that is rewrapped is written in
//! the same shape (plain text, or the same JSON object with only `ciphertext` replaced); every
//! other line (empty, already current, unparsable, failed) is written back byte for byte. The
//! output is flushed and fsynced after every batch, so `--resume` can count the complete lines
//! of the output to know how much input is done; its checkpoint (`checkpoint.rs`) makes sure
//! the input is the one those lines were made from.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufWriter, Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use phiseal_proto::v1::{Context, RewrapItem, RewrapRequest, RewrapResult, rewrap_result};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

mod checkpoint;
mod failures;

use checkpoint::Checkpoint;
use failures::FailureList;

use crate::cli::{GlobalArgs, RewrapArgs};
use crate::client::{Daemon, error_kind};
use crate::error::CliError;
use crate::output::{printable, stderr_line, stderr_note};

/// The context values a line falls back to.
#[derive(Debug, Clone)]
struct Defaults {
    tenant: String,
    field: Option<String>,
    record: Option<String>,
}

/// A JSON object's members, in order, each value kept verbatim.
type Members = Vec<(String, Box<RawValue>)>;

/// Deserializes a JSON object into [`Members`] (serde_json's own map would reorder members).
struct OrderedObject(Members);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(OrderedObject(members))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// How a rewrapped line is written.
#[derive(Debug)]
enum Shape {
    /// The bare text form.
    Plain,
    /// The same object with the member at `ciphertext_at` replaced.
    Json {
        members: Members,
        ciphertext_at: usize,
    },
}

/// Why a line was not rewrapped. Never contains the ciphertext (nor any other line content).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    kind: String,
    message: String,
}

impl Failure {
    fn new(kind: &str, message: impl Into<String>) -> Self {
        Failure {
            kind: kind.to_owned(),
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Failure::new("invalid_input", message)
    }
}

/// An input line, classified.
#[derive(Debug)]
enum Parsed {
    /// Empty or whitespace only: passed through.
    Blank,
    /// A ciphertext to send.
    Item {
        context: Context,
        ciphertext: Vec<u8>,
        shape: Shape,
    },
    /// Not rewrappable: written back unchanged and reported.
    Invalid(Failure),
}

/// One input line.
#[derive(Debug)]
struct Line {
    /// 1-based line number in the whole input.
    number: u64,
    /// The bytes without the final `\n`.
    raw: Vec<u8>,
    parsed: Parsed,
}

/// Room for an item's protobuf framing in a call: field tags and length prefixes of the
/// item, its context and their members (at most ~20 bytes; generous).
const ITEM_FRAMING: usize = 32;

/// What the daemon adds to each item's ciphertext when it bounds a call's answer before any
/// work (`phiseald`'s `ANSWER_ITEM_GROWTH`), and to the answer as a whole (`ANSWER_FRAMING`):
/// a call must fit both ways, or it is refused as `response_too_large`.
const ANSWER_ITEM_GROWTH: usize = 64;
const ANSWER_FRAMING: usize = 16;

impl Line {
    /// What the line adds to a rewrap call: its ciphertext and its context (from the line or
    /// the flags), with room for the framing; nothing for a line that is not sent.
    fn call_bytes(&self) -> usize {
        match &self.parsed {
            Parsed::Item {
                context,
                ciphertext,
                ..
            } => item_bytes(context, ciphertext),
            Parsed::Blank | Parsed::Invalid(_) => 0,
        }
    }
}

/// The bytes an item takes in a call (see [`Line::call_bytes`]): in the request (its
/// ciphertext, context and framing) or in the daemon's bound on the answer (its ciphertext
/// and 64), whichever is larger.
fn item_bytes(context: &Context, ciphertext: &[u8]) -> usize {
    let request = [
        context.tenant.len(),
        context.field.len(),
        context.record.as_ref().map_or(0, String::len),
        ITEM_FRAMING,
    ]
    .into_iter()
    .fold(0, usize::saturating_add);
    ciphertext
        .len()
        .saturating_add(request.max(ANSWER_ITEM_GROWTH))
}

/// What happened to a line.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// An empty line, passed through.
    PassedThrough,
    /// Already under the primary version: written back unchanged.
    Current,
    /// Rewrapped to this ciphertext (binary).
    Rewrapped(Vec<u8>),
    /// Written back unchanged and reported.
    Failed(Failure),
}

/// Classifies one line (without its `\n`).
fn parse_line(raw: &[u8], defaults: &Defaults) -> Parsed {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Parsed::Invalid(Failure::invalid("the line is not UTF-8 text"));
    };
    let trimmed = text.trim_ascii();
    if trimmed.is_empty() {
        return Parsed::Blank;
    }
    let parsed = if trimmed.starts_with('{') {
        parse_json(trimmed, defaults)
    } else {
        parse_plain(trimmed, defaults)
    };
    parsed.unwrap_or_else(Parsed::Invalid)
}

/// The failure kind of a plain line without `--field`: a usage error that stops the run.
const NEEDS_FIELD: &str = "needs_field";

/// A plain `phs1:` line: the context comes from the flags.
fn parse_plain(text: &str, defaults: &Defaults) -> Result<Parsed, Failure> {
    // (A line that is no ciphertext at all is reported as such, with or without --field.)
    let ciphertext = decode_ciphertext(text)?;
    let field = defaults
        .field
        .clone()
        .ok_or_else(|| Failure::new(NEEDS_FIELD, "a plain ciphertext line needs --field"))?;
    Ok(Parsed::Item {
        context: context(defaults, field, defaults.record.clone()),
        ciphertext,
        shape: Shape::Plain,
    })
}

/// A JSON object line: `ciphertext`, and `field` / `record` falling back to the flags.
fn parse_json(text: &str, defaults: &Defaults) -> Result<Parsed, Failure> {
    let OrderedObject(members) = serde_json::from_str(text).map_err(|e| {
        // serde_json's own message can quote input: give only the class and the position.
        let class = match e.classify() {
            serde_json::error::Category::Data => "not an object",
            serde_json::error::Category::Eof => "unexpected end",
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => "syntax",
        };
        Failure::invalid(format!(
            "not a JSON object ({class} error at column {})",
            e.column()
        ))
    })?;
    let ciphertext_at = find_member(&members, "ciphertext")?
        .ok_or_else(|| Failure::invalid("no \"ciphertext\" member"))?;
    let ciphertext_text = string_member(&members, ciphertext_at, "ciphertext")?
        .ok_or_else(|| Failure::invalid("\"ciphertext\" is null"))?;
    // A line's own "field" wins over --field; a null one is an error (no field means no
    // context), not a fall-back to the flag.
    let field = match find_member(&members, "field")? {
        Some(at) => string_member(&members, at, "field")?.ok_or_else(|| {
            Failure::invalid("\"field\" is null (--field applies only to lines without one)")
        })?,
        None => defaults
            .field
            .clone()
            .ok_or_else(|| Failure::invalid("no \"field\" member and no --field"))?,
    };
    let record = match find_member(&members, "record")? {
        Some(at) => string_member(&members, at, "record")?,
        None => defaults.record.clone(),
    };
    Ok(Parsed::Item {
        context: context(defaults, field, record),
        ciphertext: decode_ciphertext(&ciphertext_text)?,
        shape: Shape::Json {
            members,
            ciphertext_at,
        },
    })
}

fn context(defaults: &Defaults, field: String, record: Option<String>) -> Context {
    Context {
        tenant: defaults.tenant.clone(),
        field,
        record,
    }
}

/// The index of member `name`; a repeated one is refused (which one would count?).
fn find_member(members: &Members, name: &str) -> Result<Option<usize>, Failure> {
    let mut found = members
        .iter()
        .enumerate()
        .filter(|(_, (key, _))| key == name)
        .map(|(at, _)| at);
    let first = found.next();
    if found.next().is_some() {
        return Err(Failure::invalid(format!("duplicate \"{name}\" member")));
    }
    Ok(first)
}

/// The string value of member `at` (`None` for JSON null).
fn string_member(members: &Members, at: usize, name: &str) -> Result<Option<String>, Failure> {
    let raw = members
        .get(at)
        .map(|(_, value)| value.get())
        .unwrap_or("null");
    serde_json::from_str::<Option<String>>(raw)
        .map_err(|_| Failure::invalid(format!("\"{name}\" is not a string")))
}

/// The binary form of a text ciphertext, checked to be a well-formed v1 ciphertext.
fn decode_ciphertext(text: &str) -> Result<Vec<u8>, Failure> {
    let malformed = |e: phiseal::FormatError| {
        Failure::new(
            "malformed_ciphertext",
            format!("not a phs1: ciphertext: {e}"),
        )
    };
    let binary = phiseal::format::from_text(text).map_err(malformed)?;
    phiseal::format::parse(&binary).map_err(malformed)?;
    Ok(binary)
}

/// A JSON string literal for `s`.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The object `members` with the value at `ciphertext_at` replaced by `text`.
fn render_json(members: &Members, ciphertext_at: usize, text: &str) -> String {
    let mut out = String::from("{");
    for (at, (key, value)) in members.iter().enumerate() {
        if at > 0 {
            out.push(',');
        }
        out.push_str(&json_string(key));
        out.push(':');
        if at == ciphertext_at {
            out.push_str(&json_string(text));
        } else {
            out.push_str(value.get());
        }
    }
    out.push('}');
    out
}

/// The output line (with its `\n`) for `line` after `outcome`.
fn render(line: &Line, outcome: &Outcome) -> Vec<u8> {
    let mut out = match (outcome, &line.parsed) {
        (Outcome::Rewrapped(ciphertext), Parsed::Item { shape, .. }) => {
            let text = phiseal::format::to_text(ciphertext);
            let mut out = match shape {
                Shape::Plain => text.into_bytes(),
                Shape::Json {
                    members,
                    ciphertext_at,
                } => render_json(members, *ciphertext_at, &text).into_bytes(),
            };
            // Keep CRLF line endings.
            if line.raw.ends_with(b"\r") {
                out.push(b'\r');
            }
            out
        }
        _ => line.raw.clone(),
    };
    out.push(b'\n');
    out
}

/// The request items for the item lines of a batch, in order.
fn request_items(lines: &[Line]) -> Vec<RewrapItem> {
    lines
        .iter()
        .filter_map(|line| match &line.parsed {
            Parsed::Item {
                context,
                ciphertext,
                ..
            } => Some(RewrapItem {
                context: Some(context.clone()),
                ciphertext: ciphertext.clone(),
            }),
            Parsed::Blank | Parsed::Invalid(_) => None,
        })
        .collect()
}

/// One outcome per line, pairing the item lines with the daemon's results in order.
fn match_results(lines: &[Line], results: Vec<RewrapResult>) -> Result<Vec<Outcome>, CliError> {
    let items = lines
        .iter()
        .filter(|line| matches!(line.parsed, Parsed::Item { .. }))
        .count();
    if results.len() != items {
        return Err(CliError::Failed(format!(
            "rewrap: the daemon answered {} results for {items} items (protocol error); \
             nothing of this batch was written",
            results.len()
        )));
    }
    let mut results = results.into_iter();
    Ok(lines
        .iter()
        .map(|line| match &line.parsed {
            Parsed::Blank => Outcome::PassedThrough,
            Parsed::Invalid(failure) => Outcome::Failed(failure.clone()),
            Parsed::Item { .. } => results.next().map_or_else(
                || Outcome::Failed(Failure::new("internal", "no result")),
                result_outcome,
            ),
        })
        .collect())
}

/// Item errors that say the same of every line of the run — the tenant (always the flag's)
/// does not exist or was shredded — rather than of one line. (Not `permission_denied`: grants
/// name fields, and a deterministic ciphertext needs `search` too, so a batch of one field's
/// lines can be refused while later lines of other fields are allowed.)
const WHOLE_RUN_KINDS: [&str; 2] = ["tenant_not_found", "key_destroyed"];

/// The error that stops the run when every item of a batch failed with one of
/// [`WHOLE_RUN_KINDS`]: exit 4 or 6 with nothing of the batch written (resumable), rather
/// than a copy of the whole input and exit 7.
fn whole_run_failure(what: &str, results: &[RewrapResult]) -> Option<CliError> {
    let error = |r: &RewrapResult| match &r.result {
        Some(rewrap_result::Result::Error(e)) => Some(e.clone()),
        _ => None,
    };
    let first = error(results.first()?)?;
    let same = results
        .iter()
        .all(|r| error(r).is_some_and(|e| e.kind == first.kind));
    if !same || !WHOLE_RUN_KINDS.contains(&first.kind.as_str()) {
        return None;
    }
    Some(CliError::Status {
        what: format!("{what}: every item"),
        code: tonic::Code::from_i32(first.code),
        kind: first.kind.clone(),
        message: printable(&first.message).into_owned(),
    })
}

/// The outcome of one item's result. A returned ciphertext is checked before it replaces
/// anything.
fn result_outcome(result: RewrapResult) -> Outcome {
    match result.result {
        Some(rewrap_result::Result::Ok(ok)) if !ok.changed => Outcome::Current,
        Some(rewrap_result::Result::Ok(ok)) => {
            let valid = phiseal::format::parse(&ok.ciphertext)
                .is_ok_and(|parsed| parsed.key_version == ok.key_version);
            if valid {
                Outcome::Rewrapped(ok.ciphertext)
            } else {
                Outcome::Failed(Failure::new(
                    "internal",
                    "the daemon returned a malformed ciphertext; the line was left unchanged",
                ))
            }
        }
        Some(rewrap_result::Result::Error(e)) => Outcome::Failed(Failure {
            kind: error_kind(&e.kind, tonic::Code::from_i32(e.code)),
            message: printable(&e.message).into_owned(),
        }),
        None => Outcome::Failed(Failure::new("internal", "the daemon sent an empty result")),
    }
}

/// Counts the complete (newline-terminated) lines of `reader`, at most `at_most` of them;
/// returns the count and the byte length they take (where a torn last line, or the first line
/// not counted, starts).
fn complete_lines(reader: &mut impl Read, at_most: u64) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lines, mut offset, mut end) = (0u64, 0u64, 0u64);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok((lines, end)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        for (i, _) in chunk.iter().enumerate().filter(|(_, b)| **b == b'\n') {
            if lines == at_most {
                return Ok((lines, end));
            }
            lines += 1;
            end = offset + i as u64 + 1;
        }
        offset += n as u64;
    }
}

/// `(device, inode)` of a regular file, to notice `--input` and `--output` being one file.
type FileId = (u64, u64);

fn file_id(meta: &std::fs::Metadata) -> Option<FileId> {
    meta.is_file().then(|| (meta.dev(), meta.ino()))
}

/// The input, and its identity if it is a regular file.
fn open_input(path: Option<&Path>) -> Result<(Box<dyn BufRead>, Option<FileId>), CliError> {
    match path {
        Some(path) => {
            let file = File::open(path).map_err(CliError::io(format!(
                "cannot open input {}",
                path.display()
            )))?;
            let id = file.metadata().ok().as_ref().and_then(file_id);
            Ok((Box::new(io::BufReader::with_capacity(256 * 1024, file)), id))
        }
        None => {
            let stdin = io::stdin();
            let id = fd_file_id(stdin.as_fd());
            Ok((Box::new(stdin.lock()), id))
        }
    }
}

/// The identity of the regular file behind a standard stream, if it is one.
fn fd_file_id(fd: std::os::fd::BorrowedFd<'_>) -> Option<FileId> {
    let file = File::from(fd.try_clone_to_owned().ok()?);
    file.metadata().ok().as_ref().and_then(file_id)
}

/// `O_NOFOLLOW`: the files rewrap writes are never reached through a symlink (someone could
/// have planted one in a shared directory).
pub(crate) fn no_follow() -> i32 {
    // The flag's bits fit an `int` (as `open(2)` takes it).
    i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0)
}

/// An existing file rewrap writes must be this user's, and not writable by group or others:
/// a file someone else created in a shared directory (`/tmp`) would let them read and change
/// the output during the run.
pub(crate) fn check_own_private(meta: &std::fs::Metadata, shown: &str) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(CliError::Failed(format!(
            "{shown} belongs to uid {}, not to this user ({me}): write to a file of your own",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(CliError::Failed(format!(
            "{shown} has mode {:04o}: group or others could change it; chmod go-w, or write a \
             new file",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Opens (or creates, mode 0600) `--output`; returns it with the number of input lines it
/// already holds (0 without `--resume`, where a non-empty file is refused) and its
/// checkpoint. With `--resume`, those lines of `input` are read and checked against the
/// output's ([`skip_lines`]) and the checkpoint's digest before anything in the output
/// changes: only then are a torn last line, and the lines of a batch that was not committed,
/// cut off.
fn open_output(
    path: &Path,
    resume: bool,
    input_id: Option<FileId>,
    input: &mut dyn BufRead,
    defaults: &Defaults,
    json: bool,
) -> Result<(File, u64, Checkpoint), CliError> {
    let shown = path.display();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)
        .map_err(CliError::io(format!(
            "cannot open output {shown} (a symlink is not followed)"
        )))?;
    let meta = file
        .metadata()
        .map_err(CliError::io(format!("cannot stat output {shown}")))?;
    let Some(id) = file_id(&meta) else {
        return Err(CliError::Failed(format!(
            "output {shown} is not a regular file (omit --output to write to stdout)"
        )));
    };
    check_own_private(&meta, &shown.to_string())?;
    if input_id == Some(id) {
        return Err(CliError::Usage(format!(
            "the input and the output are the same file ({shown})"
        )));
    }
    // One run per output file: two runs appending to it would misalign its lines with the
    // input's. The lock lasts as long as the file is open (the whole run).
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => CliError::Failed(format!(
            "output {shown} is in use by another rewrap run (it holds the file's lock): let it \
             finish, then rerun with --resume"
        )),
        std::fs::TryLockError::Error(e) => CliError::io(format!("cannot lock output {shown}"))(e),
    })?;
    // Its size again, under the lock: a run that held it may have written since the stat above.
    let meta = file
        .metadata()
        .map_err(CliError::io(format!("cannot stat output {shown}")))?;
    sync_parent(path);
    if !resume {
        if meta.len() > 0 {
            return Err(CliError::Usage(format!(
                "output {shown} already exists and is not empty: pass --resume to continue an \
                 interrupted run into it, or choose another --output"
            )));
        }
        return Ok((file, 0, Checkpoint::start(path, defaults)?));
    }
    let read_error = || CliError::io(format!("cannot read output {shown}"));
    let (complete, end) = complete_lines(&mut &file, u64::MAX).map_err(read_error())?;
    let point = Checkpoint::resume_point(path, defaults, complete)?;
    let mut digest = Sha256::new();
    skip_lines(input, point.lines, &file, path, &mut digest)?;
    if !point.matches(&digest) {
        return Err(CliError::Failed(format!(
            "--resume: the input's first {} lines are not the ones {shown} was made from \
             (another input, or the same rows in another order?): nothing was written",
            point.lines
        )));
    }
    // Lines of a batch that was not committed go (they are done again), then a torn tail.
    let keep = if point.lines < complete {
        (&file).seek(io::SeekFrom::Start(0)).map_err(read_error())?;
        complete_lines(&mut &file, point.lines)
            .map_err(read_error())?
            .1
    } else {
        end
    };
    if keep < meta.len() {
        file.set_len(keep)
            .and_then(|()| file.sync_all())
            .map_err(CliError::io(format!(
                "cannot cut the unfinished end of {shown}"
            )))?;
        let note = if point.lines < complete {
            format!(
                "rewrap: cut off the {} lines of a batch that was not committed, and any torn \
                 line after them ({} bytes in all) of {shown}: they are done again",
                complete - point.lines,
                meta.len() - keep
            )
        } else {
            format!(
                "rewrap: cut off a torn last line ({} bytes) of {shown}",
                meta.len() - keep
            )
        };
        stderr_note(json, &note);
    }
    let checkpoint = Checkpoint::resumed(path, defaults, digest, point.lines);
    Ok((file, point.lines, checkpoint))
}

/// Makes a newly created output file's directory entry durable (best effort: some file
/// systems refuse to sync a directory).
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}

/// Removes `path`, a file a run into a new (empty) output leaves from an earlier output of
/// that name (`what` it is, for the error), if there is one.
fn remove_stale(path: &Path, what: &str) -> Result<(), CliError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CliError::io(format!(
            "cannot remove the stale {what} {}",
            path.display()
        ))(e)),
    }
}

/// Replaces the file at `path` with one holding `contents`: a new file (`path` + `.new`,
/// mode 0600, created by this call: a leftover or anything planted there is removed, not
/// followed) made durable, then renamed over it, and the rename made durable.
fn replace_durably(path: &Path, contents: &[u8]) -> Result<(), CliError> {
    let mut name = std::ffi::OsString::from(path.as_os_str());
    name.push(".new");
    let fresh = PathBuf::from(name);
    let shown = fresh.display().to_string();
    match std::fs::remove_file(&fresh) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(CliError::io(format!("cannot remove {shown}"))(e));
        }
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(&fresh)
        .map_err(CliError::io(format!("cannot create {shown}")))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(CliError::io(format!("cannot write {shown}")))?;
    std::fs::rename(&fresh, path).map_err(CliError::io(format!(
        "cannot replace {} with {shown}",
        path.display()
    )))?;
    sync_parent(path);
    Ok(())
}

/// Skips the `count` input lines that a resumed output already holds, checking that each of
/// them corresponds to its output line (an output made from another input would otherwise be
/// continued, its first lines belonging to other rows), and adds each to `digest` (the
/// checkpoint's check, which also sees rows in another order).
fn skip_lines(
    input: &mut dyn BufRead,
    count: u64,
    file: &File,
    output: &Path,
    digest: &mut Sha256,
) -> Result<(), CliError> {
    // The open, locked file itself (not its path again: a path swapped meanwhile would be
    // checked while the run appends to the file it holds); appends ignore the read offset.
    let mut file = file;
    file.seek(io::SeekFrom::Start(0))
        .map_err(CliError::io(format!(
            "reading {} to resume",
            output.display()
        )))?;
    let mut written = io::BufReader::new(file);
    let (mut line, mut out_line) = (Vec::new(), Vec::new());
    for done in 0..count {
        line.clear();
        out_line.clear();
        let n = (&mut *input)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(CliError::io("reading the input"))?;
        if n == 0 {
            return Err(CliError::Failed(format!(
                "--resume: {} already has {count} lines but the input has only {done}: \
                 wrong input or output file?",
                output.display()
            )));
        }
        written
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut out_line)
            .map_err(CliError::io(format!("reading {}", output.display())))?;
        checkpoint::digest_line(digest, line.strip_suffix(b"\n").unwrap_or(&line));
        if !corresponds(&line, &out_line) {
            return Err(CliError::Failed(format!(
                "--resume: line {} of {} does not correspond to line {} of the input (a \
                 different line shape, or other members than \"ciphertext\" differ): wrong \
                 input or output file? Nothing was written",
                done + 1,
                output.display(),
                done + 1
            )));
        }
    }
    Ok(())
}

/// Whether `output` can be what a rewrap wrote for `input`: blank for blank, plain for plain,
/// and for a JSON object the same members but for `ciphertext`. (Plain lines hold only the
/// ciphertext, which a rewrap changes: nothing more can be compared without decrypting.)
fn corresponds(input: &[u8], output: &[u8]) -> bool {
    let text = |raw: &[u8]| {
        std::str::from_utf8(raw)
            .ok()
            .map(str::trim_ascii)
            .map(str::to_owned)
    };
    let (Some(input), Some(output)) = (text(input), text(output)) else {
        // A line that is not UTF-8 is written back unchanged — with a line end, which the
        // input's last line may lack.
        let line = |raw: &'_ [u8]| raw.strip_suffix(b"\n").unwrap_or(raw).to_vec();
        return line(input) == line(output);
    };
    let members = |line: &str| {
        serde_json::from_str::<OrderedObject>(line)
            .ok()
            .map(|OrderedObject(members)| {
                members
                    .into_iter()
                    .filter(|(name, _)| name != "ciphertext")
                    .map(|(name, value)| (name, value.get().to_owned()))
                    .collect::<Vec<_>>()
            })
    };
    match (input.is_empty(), input.starts_with('{')) {
        (true, _) => output.is_empty(),
        (false, false) => !output.is_empty() && !output.starts_with('{'),
        // An input line that is not a valid object is written back unchanged.
        (false, true) => match members(&input) {
            Some(expected) => members(&output) == Some(expected),
            None => input == output,
        },
    }
}

/// The longest input line read into memory (64 MiB). A field ciphertext is far shorter (the
/// daemon refuses messages over `limits.max_message_bytes`, 4 MiB by default): a longer line
/// stops the run.
const MAX_LINE_BYTES: usize = 64 << 20;

/// The input bytes one batch holds at most (but for a single line): lines that are not sent
/// (blank, invalid, too large for a call) are held until the batch is written, and their
/// size does not count towards a call's.
const MAX_BATCH_LINE_BYTES: usize = 64 << 20;

/// Reads the input's lines and classifies them, in batches bounded by a line count and a
/// byte budget per Rewrap call.
struct BatchReader<'a> {
    input: &'a mut dyn BufRead,
    /// The number of the last line read so far.
    last: u64,
    /// A line read but left for the next batch (it did not fit the byte budget).
    pending: Option<Line>,
    /// At most this many line bytes per call.
    max_bytes: usize,
}

impl<'a> BatchReader<'a> {
    /// A reader after line `last` (the lines a resumed output already holds).
    fn new(input: &'a mut dyn BufRead, last: u64, max_bytes: usize) -> Self {
        BatchReader {
            input,
            last,
            pending: None,
            max_bytes,
        }
    }

    /// Up to `max_lines` lines and, but for a single line, at most `max_bytes` of them (with
    /// the answer's own framing) to send and at most [`MAX_BATCH_LINE_BYTES`] of input held
    /// (lines not sent count too); empty at the end of the input.
    fn batch(&mut self, max_lines: usize, defaults: &Defaults) -> Result<Vec<Line>, CliError> {
        let mut lines = Vec::new();
        let mut bytes = ANSWER_FRAMING;
        let mut held = 0usize;
        while lines.len() < max_lines {
            let line = match self.pending.take() {
                Some(line) => line,
                None => match self.next_line(defaults)? {
                    Some(line) => line,
                    None => break,
                },
            };
            let size = line.call_bytes();
            let over = bytes.saturating_add(size) > self.max_bytes
                || held.saturating_add(line.raw.len()) > MAX_BATCH_LINE_BYTES;
            if !lines.is_empty() && over {
                self.pending = Some(line);
                break;
            }
            bytes = bytes.saturating_add(size);
            held = held.saturating_add(line.raw.len());
            lines.push(line);
        }
        Ok(lines)
    }

    /// The next line, classified; a line over the byte budget is not sent (it is written
    /// back unchanged and reported as `too_large`).
    fn next_line(&mut self, defaults: &Defaults) -> Result<Option<Line>, CliError> {
        let mut raw = Vec::new();
        let n = (&mut *self.input)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut raw)
            .map_err(CliError::io("reading the input"))?;
        if n == 0 {
            return Ok(None);
        }
        self.last += 1;
        if raw.last() == Some(&b'\n') {
            raw.pop();
        } else if raw.len() > MAX_LINE_BYTES {
            return Err(CliError::Failed(format!(
                "line {} is longer than {} MiB: not a field ciphertext (large documents go \
                 through encrypt-file / decrypt-file); nothing after line {} was rewrapped",
                self.last,
                MAX_LINE_BYTES >> 20,
                self.last - 1
            )));
        }
        let parsed = match parse_line(&raw, defaults) {
            Parsed::Invalid(failure) if failure.kind == NEEDS_FIELD => {
                return Err(CliError::Usage(format!(
                    "line {} is a plain ciphertext line, which takes its field from --field: \
                     give --field, or write JSON lines with a \"field\" member",
                    self.last
                )));
            }
            Parsed::Item {
                context,
                ciphertext,
                ..
            } if item_bytes(&context, &ciphertext)
                > self.max_bytes.saturating_sub(ANSWER_FRAMING) =>
            {
                Parsed::Invalid(Failure::new(
                    "too_large",
                    format!(
                        "the line's item is {} bytes with its context, over --max-call-bytes \
                         ({}): left unchanged; rewrap it with a larger --max-call-bytes (within \
                         the daemon's limits.max_message_bytes)",
                        item_bytes(&context, &ciphertext),
                        self.max_bytes
                    ),
                ))
            }
            parsed => parsed,
        };
        Ok(Some(Line {
            number: self.last,
            raw,
            parsed,
        }))
    }
}

/// Where the output goes; [`Sink::commit`] makes a batch durable.
enum Sink {
    File {
        writer: BufWriter<File>,
        path: PathBuf,
    },
    Stdout(BufWriter<io::Stdout>),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> Result<(), CliError> {
        match self {
            Sink::File { writer, path } => writer
                .write_all(bytes)
                .map_err(CliError::io(format!("writing {}", path.display()))),
            Sink::Stdout(writer) => writer
                .write_all(bytes)
                .map_err(CliError::io("writing to stdout")),
        }
    }

    /// Flushes, and fsyncs a file.
    fn commit(&mut self) -> Result<(), CliError> {
        match self {
            Sink::File { writer, path } => writer
                .flush()
                .and_then(|()| writer.get_ref().sync_all())
                .map_err(CliError::io(format!("writing {}", path.display()))),
            Sink::Stdout(writer) => writer.flush().map_err(CliError::io("writing to stdout")),
        }
    }
}

/// Counts for the summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stats {
    lines: u64,
    rewrapped: u64,
    current: u64,
    failed: u64,
    empty: u64,
}

impl Stats {
    fn count(&mut self, outcome: &Outcome) {
        self.lines += 1;
        match outcome {
            Outcome::PassedThrough => self.empty += 1,
            Outcome::Current => self.current += 1,
            Outcome::Rewrapped(_) => self.rewrapped += 1,
            Outcome::Failed(_) => self.failed += 1,
        }
    }
}

/// A run in progress.
struct Rewrapper {
    daemon: Daemon,
    sink: Sink,
    /// The failure list of an `--output` run (none on stdout).
    failures: Option<FailureList>,
    /// The checkpoint of an `--output` run (none on stdout).
    checkpoint: Option<Checkpoint>,
    progress: ProgressBar,
    stats: Stats,
    /// Failed lines are reported as JSON objects.
    json: bool,
}

impl Rewrapper {
    /// Rewraps one batch, writes and commits its lines, then reports its failures.
    async fn batch(&mut self, lines: &[Line]) -> Result<(), CliError> {
        let outcomes = self.rewrap(lines).await?;
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.prepare(lines)?;
        }
        if let Some(list) = &mut self.failures {
            let failed: Vec<(u64, &str)> = lines
                .iter()
                .zip(&outcomes)
                .filter_map(|(line, outcome)| match outcome {
                    Outcome::Failed(f) => Some((line.number, f.kind.as_str())),
                    _ => None,
                })
                .collect();
            list.record(&failed)?;
        }
        for (line, outcome) in lines.iter().zip(&outcomes) {
            self.sink.write(&render(line, outcome))?;
        }
        self.sink.commit()?;
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.committed();
        }
        for (line, outcome) in lines.iter().zip(&outcomes) {
            self.stats.count(outcome);
            if let Outcome::Failed(failure) = outcome {
                let message = if self.json {
                    serde_json::json!({
                        "line": line.number,
                        "kind": failure.kind,
                        "message": failure.message,
                    })
                    .to_string()
                } else {
                    format!(
                        "line {}: {}: {}",
                        line.number, failure.kind, failure.message
                    )
                };
                self.progress.suspend(|| stderr_line(&message));
            }
        }
        self.progress.inc(lines.len() as u64);
        Ok(())
    }

    /// Sends the batch's items (if any) and pairs the results with the lines. A batch whose
    /// every item failed for the tenant or the caller (see [`whole_run_failure`]) stops the
    /// run, as a failed call does.
    async fn rewrap(&self, lines: &[Line]) -> Result<Vec<Outcome>, CliError> {
        let items = request_items(lines);
        let results = match (items.is_empty(), lines.first()) {
            (false, Some(first)) => {
                let what = format!("rewrap (batch starting at line {})", first.number);
                let request = RewrapRequest { items };
                let mut client = self.daemon.field();
                let results = self
                    .daemon
                    .call(&what, client.rewrap(request))
                    .await?
                    .results;
                if let Some(stop) = whole_run_failure(&what, &results) {
                    return Err(stop);
                }
                results
            }
            _ => Vec::new(),
        };
        match_results(lines, results)
    }
}

/// A spinner with the number of lines done, on stderr (hidden when stderr is no terminal, and
/// with `--json`, whose stderr is JSON lines).
fn progress_bar(start: u64, json: bool) -> ProgressBar {
    let target = if json {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    if let Ok(style) = ProgressStyle::with_template("{spinner} rewrap: {human_pos} lines done") {
        bar.set_style(style);
    }
    bar.set_position(start);
    bar
}

/// The summary on stderr (JSON with `--json`).
/// `earlier_failed`: lines among the `skipped` ones that failed in earlier runs.
fn summary(stats: &Stats, skipped: u64, earlier_failed: u64, json: bool) -> String {
    if json {
        return serde_json::json!({
            "lines": stats.lines,
            "rewrapped": stats.rewrapped,
            "already_current": stats.current,
            "failed": stats.failed,
            "empty": stats.empty,
            "skipped": skipped,
            "earlier_failed": earlier_failed,
        })
        .to_string();
    }
    let mut text = format!(
        "rewrap: {} lines: {} rewrapped, {} already current, {} failed, {} empty",
        stats.lines, stats.rewrapped, stats.current, stats.failed, stats.empty
    );
    if skipped > 0 {
        text.push_str(&format!(
            " ({skipped} lines skipped: already in the output, {earlier_failed} of them failed \
             in earlier runs)"
        ));
    }
    text
}

/// Runs `rewrap`.
pub(crate) async fn run(args: RewrapArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let defaults = Defaults {
        tenant: args.tenant.clone(),
        field: args.field.clone(),
        record: args.record.clone(),
    };
    let (mut input, input_id) = open_input(args.input.as_deref())?;
    let (sink, skipped, failures, checkpoint) = match &args.output {
        Some(path) => {
            let (file, done, checkpoint) = open_output(
                path,
                args.resume,
                input_id,
                &mut *input,
                &defaults,
                global.json,
            )?;
            // (Under the output's lock, like the list.)
            let failures = if done > 0 {
                FailureList::resume(path, done)?
            } else {
                FailureList::start(path)?
            };
            let writer = BufWriter::with_capacity(256 * 1024, file);
            let path = path.clone();
            (
                Sink::File { writer, path },
                done,
                Some(failures),
                Some(checkpoint),
            )
        }
        None => {
            if input_id.is_some() && fd_file_id(io::stdout().as_fd()) == input_id {
                return Err(CliError::Usage(
                    "standard output is the input file: write to another file (--output)".into(),
                ));
            }
            (Sink::Stdout(BufWriter::new(io::stdout())), 0, None, None)
        }
    };
    let earlier_failed = failures.as_ref().map_or(0, FailureList::earlier);
    if skipped > 0 {
        stderr_note(
            global.json,
            &format!(
                "rewrap: resuming after line {skipped}; {earlier_failed} of those lines failed in \
                 earlier runs (left unchanged, listed in {}) and count as failed again",
                args.output
                    .as_deref()
                    .map(FailureList::path_for)
                    .unwrap_or_default()
                    .display()
            ),
        );
    }
    let daemon = Daemon::connect(global).await?;
    let mut run = Rewrapper {
        daemon,
        sink,
        failures,
        checkpoint,
        progress: progress_bar(skipped, global.json),
        stats: Stats::default(),
        json: global.json,
    };
    let mut reader = BatchReader::new(&mut *input, skipped, args.max_call_bytes);
    let result = loop {
        let lines = match reader.batch(args.batch, &defaults) {
            Ok(lines) if lines.is_empty() => break Ok(()),
            Ok(lines) => lines,
            Err(e) => break Err(e),
        };
        if let Err(e) = run.batch(&lines).await {
            break Err(e);
        }
    };
    run.progress.finish_and_clear();
    match (&result, &args.output) {
        (Err(_), Some(path)) => stderr_note(
            global.json,
            &format!(
                "rewrap: stopped after {} complete lines in {}; fix the cause, then rerun the same \
             command with --resume to continue after the last complete line",
                skipped + run.stats.lines,
                path.display()
            ),
        ),
        (Err(_), None) => stderr_note(
            global.json,
            &format!(
                "rewrap: stopped after {} complete lines on standard output, which is therefore \
                 partial (only the exit code says so); a run with --output FILE can be resumed",
                run.stats.lines
            ),
        ),
        (Ok(()), _) => {}
    }
    result?;
    stderr_line(&summary(&run.stats, skipped, earlier_failed, global.json));
    let failed = run.stats.failed + earlier_failed;
    if failed > 0 {
        return Err(CliError::RewrapFailed {
            failed,
            lines: run.stats.lines + skipped,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
    use phiseal_proto::v1::{ItemError, Rewrapped};

    use super::*;

    fn defaults(field: Option<&str>) -> Defaults {
        Defaults {
            tenant: "acme".into(),
            field: field.map(Into::into),
            record: Some("r-default".into()),
        }
    }

    /// A well-formed (unauthenticated) v1 ciphertext under `version`.
    fn ciphertext(version: u32, fill: u8) -> Vec<u8> {
        let mut c = vec![1u8, 1];
        c.extend_from_slice(&version.to_be_bytes());
        c.resize(44 + 3, fill);
        c
    }

    fn text(version: u32, fill: u8) -> String {
        phiseal::format::to_text(&ciphertext(version, fill))
    }

    fn line(number: u64, raw: &str, d: &Defaults) -> Line {
        Line {
            number,
            raw: raw.as_bytes().to_vec(),
            parsed: parse_line(raw.as_bytes(), d),
        }
    }

    fn ok(version: u32, fill: u8, changed: bool) -> RewrapResult {
        RewrapResult {
            result: Some(rewrap_result::Result::Ok(Rewrapped {
                ciphertext: ciphertext(version, fill),
                key_version: version,
                changed,
            })),
        }
    }

    fn failure(parsed: &Parsed) -> &Failure {
        match parsed {
            Parsed::Invalid(f) => f,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn plain_line_uses_flags_for_context() {
        let d = defaults(Some("ssn"));
        let Parsed::Item {
            context,
            ciphertext: c,
            shape: Shape::Plain,
        } = parse_line(format!("  {}\r", text(1, 7)).as_bytes(), &d)
        else {
            panic!("not a plain item")
        };
        assert_eq!(context.tenant, "acme");
        assert_eq!(context.field, "ssn");
        assert_eq!(context.record.as_deref(), Some("r-default"));
        assert_eq!(c, ciphertext(1, 7));
    }

    #[test]
    fn plain_line_without_field_fails() {
        // (The reader turns it into a usage error that stops the run.)
        let parsed = parse_line(text(1, 7).as_bytes(), &defaults(None));
        assert_eq!(failure(&parsed).kind, NEEDS_FIELD);
        assert!(failure(&parsed).message.contains("--field"));
        let mut input = text(1, 7).into_bytes();
        input.push(b'\n');
        let mut input = &input[..];
        let mut reader = BatchReader::new(&mut input, 0, 1 << 20);
        assert!(matches!(
            reader.batch(10, &defaults(None)),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn json_line_context_comes_from_members_then_flags() {
        let d = defaults(Some("flag-field"));
        let raw = format!(
            r#"{{"id":5,"field":"dob","record":"r1","ciphertext":"{}"}}"#,
            text(1, 1)
        );
        let Parsed::Item { context, .. } = parse_line(raw.as_bytes(), &d) else {
            panic!("not an item")
        };
        assert_eq!(
            (context.field.as_str(), context.record.as_deref()),
            ("dob", Some("r1"))
        );

        let raw = format!(r#"{{"ciphertext":"{}","record":null}}"#, text(1, 1));
        let Parsed::Item { context, .. } = parse_line(raw.as_bytes(), &d) else {
            panic!("not an item")
        };
        assert_eq!(
            (context.field.as_str(), context.record),
            ("flag-field", None)
        );

        let raw = format!(r#"{{"ciphertext":"{}"}}"#, text(1, 1));
        let parsed = parse_line(raw.as_bytes(), &defaults(None));
        assert!(failure(&parsed).message.contains("no \"field\""));
    }

    #[test]
    fn garbage_lines_fail_without_echoing_content() {
        let d = defaults(Some("ssn"));
        let secret = "123-45-6789";
        let cases = [
            (format!("phs1:{secret}"), "malformed_ciphertext"),
            (secret.to_owned(), "malformed_ciphertext"),
            (format!("{{\"ciphertext\": \"{secret}\""), "invalid_input"),
            (
                format!("{{\"ciphertext\": 5, \"x\": \"{secret}\"}}"),
                "invalid_input",
            ),
            (
                format!("{{\"field\": \"ssn\", \"note\": \"{secret}\"}}"),
                "invalid_input",
            ),
            (
                format!("{{\"ciphertext\": \"phs1:{secret}\"}}"),
                "malformed_ciphertext",
            ),
            (
                format!(
                    r#"{{"ciphertext":"{}","ciphertext":"{}"}}"#,
                    text(1, 1),
                    text(1, 2)
                ),
                "invalid_input",
            ),
            (
                format!(r#"{{"field":7,"ciphertext":"{}"}}"#, text(1, 1)),
                "invalid_input",
            ),
            (format!("[\"{secret}\"]"), "malformed_ciphertext"),
            ("{\"a\":".to_owned(), "invalid_input"),
        ];
        for (raw, kind) in cases {
            let parsed = parse_line(raw.as_bytes(), &d);
            let f = failure(&parsed);
            assert_eq!(f.kind, kind, "{raw}");
            assert!(!f.message.contains(secret), "{raw}: {}", f.message);
        }
        let parsed = parse_line(b"\xff\xfephs1:", &d);
        assert_eq!(failure(&parsed).kind, "invalid_input");
    }

    #[test]
    fn empty_and_blank_lines_pass_through() {
        let d = defaults(None);
        for raw in ["", "   ", "\r", "\t "] {
            let l = line(1, raw, &d);
            assert!(matches!(l.parsed, Parsed::Blank));
            assert_eq!(
                render(&l, &Outcome::PassedThrough),
                format!("{raw}\n").into_bytes()
            );
        }
    }

    #[test]
    fn json_shape_is_preserved_with_ciphertext_replaced() {
        let d = defaults(None);
        let raw = format!(
            r#"{{ "id": 12345678901234567890123, "field": "ssn", "ciphertext": "{}", "nested": {{"b": [1, 2.50, "x\u00e9"]}}, "z": null }}"#,
            text(1, 1)
        );
        let l = line(3, &raw, &d);
        let out = render(&l, &Outcome::Rewrapped(ciphertext(2, 9)));
        let want = format!(
            r#"{{"id":12345678901234567890123,"field":"ssn","ciphertext":"{}","nested":{{"b": [1, 2.50, "x\u00e9"]}},"z":null}}"#,
            text(2, 9)
        ) + "\n";
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }

    #[test]
    fn plain_shape_and_crlf_are_preserved() {
        let d = defaults(Some("ssn"));
        let l = line(1, &format!("{}\r", text(1, 1)), &d);
        let out = render(&l, &Outcome::Rewrapped(ciphertext(2, 2)));
        assert_eq!(out, format!("{}\r\n", text(2, 2)).into_bytes());
    }

    #[test]
    fn unchanged_and_failed_lines_are_written_byte_for_byte() {
        let d = defaults(Some("ssn"));
        let raw = format!(r#"{{ "ciphertext" : "{}" }}"#, text(1, 1));
        let l = line(1, &raw, &d);
        assert_eq!(
            render(&l, &Outcome::Current),
            format!("{raw}\n").into_bytes()
        );
        let fail = Outcome::Failed(Failure::invalid("x"));
        assert_eq!(render(&l, &fail), format!("{raw}\n").into_bytes());
        let garbage = line(2, "not a ciphertext", &d);
        assert_eq!(render(&garbage, &fail), b"not a ciphertext\n".to_vec());
    }

    #[test]
    fn results_are_paired_with_item_lines_in_order() {
        let d = defaults(Some("ssn"));
        let lines = vec![
            line(1, &text(1, 1), &d),
            line(2, "", &d),
            line(3, "garbage", &d),
            line(4, &text(1, 2), &d),
            line(5, &text(2, 3), &d),
            line(6, &text(1, 4), &d),
        ];
        let items = request_items(&lines);
        assert_eq!(items.len(), 4);
        assert_eq!(items[1].ciphertext, ciphertext(1, 2));
        let results = vec![
            ok(2, 11, true),
            RewrapResult {
                result: Some(rewrap_result::Result::Error(ItemError {
                    code: tonic::Code::InvalidArgument as i32,
                    kind: "decryption_failed".into(),
                    message: "decryption failed".into(),
                })),
            },
            ok(2, 3, false),
            // Claims version 3 but the header says 2: not trusted.
            RewrapResult {
                result: Some(rewrap_result::Result::Ok(Rewrapped {
                    ciphertext: ciphertext(2, 4),
                    key_version: 3,
                    changed: true,
                })),
            },
        ];
        let outcomes = match_results(&lines, results).unwrap();
        assert_eq!(outcomes[0], Outcome::Rewrapped(ciphertext(2, 11)));
        assert_eq!(outcomes[1], Outcome::PassedThrough);
        assert!(matches!(&outcomes[2], Outcome::Failed(f) if f.kind == "malformed_ciphertext"));
        assert!(matches!(&outcomes[3], Outcome::Failed(f) if f.kind == "decryption_failed"));
        assert_eq!(outcomes[4], Outcome::Current);
        assert!(matches!(&outcomes[5], Outcome::Failed(f) if f.kind == "internal"));
        let mut stats = Stats::default();
        outcomes.iter().for_each(|o| stats.count(o));
        assert_eq!(
            stats,
            Stats {
                lines: 6,
                rewrapped: 1,
                current: 1,
                failed: 3,
                empty: 1
            }
        );
    }

    #[test]
    fn wrong_result_count_is_an_error() {
        let d = defaults(Some("ssn"));
        let lines = vec![line(1, &text(1, 1), &d)];
        assert!(match_results(&lines, vec![]).is_err());
        assert!(match_results(&lines, vec![ok(2, 1, true), ok(2, 1, true)]).is_err());
    }

    #[test]
    fn item_error_kind_falls_back_to_code_name() {
        let outcome = result_outcome(RewrapResult {
            result: Some(rewrap_result::Result::Error(ItemError {
                code: tonic::Code::FailedPrecondition as i32,
                kind: String::new(),
                message: "retired\x1b".into(),
            })),
        });
        assert_eq!(
            outcome,
            Outcome::Failed(Failure::new("failed_precondition", "retired?"))
        );
    }

    #[test]
    fn complete_lines_stop_before_a_torn_tail() {
        let count = |bytes: &[u8]| complete_lines(&mut &*bytes, u64::MAX).unwrap();
        assert_eq!(count(b""), (0, 0));
        assert_eq!(count(b"torn"), (0, 0));
        assert_eq!(count(b"a\n"), (1, 2));
        assert_eq!(count(b"a\n\nbc\n"), (3, 6));
        assert_eq!(count(b"a\n\nbc\nphs1:tor"), (3, 6));
        let big: Vec<u8> = std::iter::repeat_n(b"0123456789abcdef\n".as_slice(), 10_000)
            .flatten()
            .copied()
            .chain(*b"partial")
            .collect();
        assert_eq!(count(&big), (10_000, 170_000));
    }

    #[test]
    fn resume_cuts_a_torn_tail_and_skips_done_lines() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        std::fs::write(&out, b"one\ntwo\nthr").unwrap();
        checkpoint::write_for_test(&out, &defaults(None), &[b"1", b"2"]);
        // An input that does not correspond (another line shape): refused, and the output's
        // torn last line is left as it was.
        let mut other: &[u8] = b"{\"a\":1}\n{\"a\":2}\n";
        let err = open_output(&out, true, None, &mut other, &defaults(None), false).unwrap_err();
        assert!(err.to_string().contains("does not correspond"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"one\ntwo\nthr");

        let mut input: &[u8] = b"1\n2\n3\n4";
        let (file, done, _) =
            open_output(&out, true, None, &mut input, &defaults(None), false).unwrap();
        drop(file);
        assert_eq!(done, 2);
        assert_eq!(std::fs::read(&out).unwrap(), b"one\ntwo\n");
        let batch = BatchReader::new(&mut input, done, 1 << 20)
            .batch(10, &defaults(None))
            .unwrap();
        let numbers: Vec<u64> = batch.iter().map(|l| l.number).collect();
        assert_eq!(numbers, [3, 4]);

        let mut short: &[u8] = b"1\n";
        assert!(
            skip_lines(
                &mut short,
                2,
                &File::open(&out).unwrap(),
                &out,
                &mut Sha256::new()
            )
            .is_err()
        );
    }

    #[test]
    fn resume_refuses_plain_lines_in_another_order_and_redoes_an_uncommitted_batch() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let d = defaults(Some("ssn"));
        // A run wrote lines 1-2 (committed), then the first line of the batch of lines 3-4
        // before it stopped.
        let mut checkpoint = Checkpoint::start(&out, &d).unwrap();
        checkpoint
            .prepare(&[line(1, "ct-a", &d), line(2, "ct-b", &d)])
            .unwrap();
        checkpoint.committed();
        checkpoint
            .prepare(&[line(3, "ct-c", &d), line(4, "ct-d", &d)])
            .unwrap();
        std::fs::write(&out, b"new-a\nnew-b\nnew-c\n").unwrap();
        // The same rows in another order: every plain line "corresponds", but the digest
        // does not match. Nothing is changed.
        let mut reordered: &[u8] = b"ct-b\nct-a\nct-c\nct-d\n";
        let err = open_output(&out, true, None, &mut reordered, &d, false).unwrap_err();
        assert!(err.to_string().contains("not the ones"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"new-a\nnew-b\nnew-c\n");
        // Resumed with other flags: refused.
        let mut input: &[u8] = b"ct-a\nct-b\nct-c\nct-d\n";
        let err =
            open_output(&out, true, None, &mut input, &defaults(Some("name")), false).unwrap_err();
        assert!(err.to_string().contains("same flags"), "{err}");
        // The right input: the uncommitted batch's line is cut off and done again.
        let mut input: &[u8] = b"ct-a\nct-b\nct-c\nct-d\n";
        let (file, done, _) = open_output(&out, true, None, &mut input, &d, false).unwrap();
        drop(file);
        assert_eq!(done, 2);
        assert_eq!(std::fs::read(&out).unwrap(), b"new-a\nnew-b\n");
        assert_eq!(input, b"ct-c\nct-d\n");
    }

    #[test]
    fn resume_accepts_a_last_line_that_is_not_utf8_and_has_no_line_end() {
        // Written back unchanged with a line end: the finished output of such an input.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        std::fs::write(&out, b"\n\xff\n").unwrap();
        let mut input: &[u8] = b"\n\xff";
        skip_lines(
            &mut input,
            2,
            &File::open(&out).unwrap(),
            &out,
            &mut Sha256::new(),
        )
        .unwrap();
        let mut other: &[u8] = b"\n\xfe";
        assert!(
            skip_lines(
                &mut other,
                2,
                &File::open(&out).unwrap(),
                &out,
                &mut Sha256::new()
            )
            .is_err()
        );
    }

    #[test]
    fn resume_refuses_an_output_made_from_another_input() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let ct = |n: u32| text(n, 1);
        std::fs::write(
            &out,
            format!(
                "{{\"id\":1,\"ciphertext\":\"{}\"}}\n\n{{\"id\":2,\"ciphertext\":\"{}\"}}\n",
                ct(7),
                ct(8)
            ),
        )
        .unwrap();
        // The same rows (ids, blank line) with other ciphertexts: this output's input.
        let same = format!(
            "{{\"id\":1,\"ciphertext\":\"{}\"}}\n\n{{\"id\":2,\"ciphertext\":\"{}\"}}\n{{\"id\":3}}\n",
            ct(1),
            ct(2)
        );
        let mut rest = same.as_bytes();
        skip_lines(
            &mut rest,
            3,
            &File::open(&out).unwrap(),
            &out,
            &mut Sha256::new(),
        )
        .unwrap();
        assert_eq!(
            rest, b"{\"id\":3}\n",
            "the lines after the output's are left to read"
        );
        // Other rows, another shape, or a line that moved: refused.
        for other in [
            format!("{{\"id\":9,\"ciphertext\":\"{}\"}}\n\n", ct(1)),
            format!("{}\n\n", ct(1)),
            format!("\n{{\"id\":1,\"ciphertext\":\"{}\"}}\n", ct(1)),
        ] {
            let other = format!("{other}{{\"id\":2,\"ciphertext\":\"{}\"}}\n", ct(2));
            let err = skip_lines(
                &mut other.as_bytes(),
                3,
                &File::open(&out).unwrap(),
                &out,
                &mut Sha256::new(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("does not correspond"), "{err}");
        }
        // Only the last line differs.
        let last = format!(
            "{{\"id\":1,\"ciphertext\":\"{}\"}}\n\n{{\"id\":9,\"ciphertext\":\"{}\"}}\n",
            ct(1),
            ct(2)
        );
        let err = skip_lines(
            &mut last.as_bytes(),
            3,
            &File::open(&out).unwrap(),
            &out,
            &mut Sha256::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn output_refused_when_not_empty_without_resume() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        std::fs::write(&out, b"x\n").unwrap();
        let err = open_output(&out, false, None, &mut &b""[..], &defaults(None), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--resume"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"x\n");
    }

    #[test]
    fn output_is_created_with_mode_0600_and_same_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new.txt");
        let (file, done, _) =
            open_output(&out, false, None, &mut &b""[..], &defaults(None), false).unwrap();
        assert_eq!(done, 0);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let id = file_id(&meta);
        drop(file);
        match open_output(&out, true, id, &mut &b""[..], &defaults(None), false) {
            Err(e @ CliError::Usage(_)) => assert!(e.to_string().contains("same file"), "{e}"),
            other => panic!(
                "expected the same-file usage error, got {:?}",
                other.map(|r| r.1)
            ),
        }
    }

    #[test]
    fn an_output_reached_by_a_symlink_or_others_may_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = |path: &Path| {
            open_output(path, true, None, &mut &b""[..], &defaults(None), false).map(|_| ())
        };
        // A symlink (planted in a shared directory) is not followed.
        let target = dir.path().join("target.txt");
        std::fs::write(&target, b"").unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open(&link).unwrap_err();
        assert!(err.to_string().contains("symlink is not followed"), "{err}");
        // Group- or world-writable: refused; this user's and private: accepted.
        for (mode, accepted) in [(0o622, false), (0o660, false), (0o600, true), (0o644, true)] {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(open(&target).is_ok(), accepted, "mode {mode:o}");
        }
        // Another user's file (root only can make one here).
        if rustix::process::geteuid().is_root() {
            let theirs = dir.path().join("theirs.txt");
            std::fs::write(&theirs, b"").unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = open(&theirs).unwrap_err();
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }
    }

    #[test]
    fn batches_respect_the_size() {
        let mut input: &[u8] = b"a\nb\nc\nd\ne";
        let d = defaults(None);
        let mut reader = BatchReader::new(&mut input, 0, 1 << 20);
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let batch = reader.batch(2, &d).unwrap();
            (!batch.is_empty()).then_some(batch.len())
        })
        .collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(reader.last, 5);
    }

    #[test]
    fn lines_that_are_not_sent_still_bound_what_a_batch_holds() {
        // Two 33 MiB lines that are not ciphertexts (nothing to send, so no call budget
        // spent): one per batch, or a batch of 500 of them would hold 16 GiB.
        let big = vec![b'x'; 33 << 20];
        let mut input = Vec::new();
        for _ in 0..2 {
            input.extend_from_slice(&big);
            input.push(b'\n');
        }
        let mut input = &input[..];
        let d = defaults(Some("ssn"));
        let mut reader = BatchReader::new(&mut input, 0, 1 << 20);
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let batch = reader.batch(500, &d).unwrap();
            (!batch.is_empty()).then_some(batch.len())
        })
        .collect();
        assert_eq!(sizes, [1, 1]);
    }

    #[test]
    fn batches_respect_the_byte_budget_and_long_lines_are_not_sent() {
        // Each line is an item of 47 (ciphertext) + the larger of 4 + 3 + 9 + 32 (tenant,
        // field and record from the flags, framing: 48) and 64 (what the daemon's bound on the
        // answer adds) = 111 bytes. Budget 250, 16 of them the answer's framing: two fit, the
        // third starts the next call.
        let lines: Vec<String> = (1..=5).map(|i| text(1, i)).collect();
        let input = lines.join("\n");
        let d = defaults(Some("ssn"));
        let batches = |input: &str, d: &Defaults| {
            let mut input = input.as_bytes();
            let mut reader = BatchReader::new(&mut input, 0, 250);
            let mut batches = Vec::new();
            loop {
                let batch = reader.batch(100, d).unwrap();
                if batch.is_empty() {
                    break;
                }
                batches.push(batch);
            }
            batches
        };
        let got = batches(&input, &d);
        let numbers: Vec<Vec<u64>> = got
            .iter()
            .map(|b| b.iter().map(|l| l.number).collect())
            .collect();
        assert_eq!(numbers, [vec![1, 2], vec![3, 4], vec![5]]);
        assert_eq!(got[0][0].call_bytes(), 111);
        // The daemon's bound on each call's answer holds (16 + the ciphertexts + 64 each),
        // also where the context is shorter than that growth (before: three such items per
        // call, whose answer bound of 349 bytes the daemon refused).
        let short = Defaults {
            tenant: "a".into(),
            field: Some("f".into()),
            record: None,
        };
        let mut got = got;
        got.extend(batches(&input, &short));
        for batch in &got {
            let answer_bound: usize = batch
                .iter()
                .map(|l| match &l.parsed {
                    Parsed::Item { ciphertext, .. } => ciphertext.len() + 64,
                    _ => 0,
                })
                .sum::<usize>()
                + 16;
            assert!(answer_bound <= 250, "{answer_bound}");
        }

        // With a 150-byte record id from the flags, an item is over the budget on its own
        // although its line (68 bytes) is not: reported, not sent (it takes no room in a
        // call); the blank line and the rest go on.
        let long = Defaults {
            record: Some("r".repeat(150)),
            ..d
        };
        let got = batches(&format!("{}\n\n{}", lines[0], lines[1]), &long);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), 3);
        for line in [&got[0][0], &got[0][2]] {
            assert!(line.raw.len() < 250);
            assert_eq!(line.call_bytes(), 0);
            match &line.parsed {
                Parsed::Invalid(f) => {
                    assert_eq!(f.kind, "too_large");
                    assert!(f.message.contains("is 236 bytes"), "{}", f.message);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_null_field_is_an_error_not_the_flag() {
        let d = defaults(Some("ssn"));
        let raw = format!("{{\"field\":null,\"ciphertext\":\"{}\"}}", text(1, 1));
        match parse_line(raw.as_bytes(), &d) {
            Parsed::Invalid(f) => assert!(f.message.contains("\"field\" is null"), "{}", f.message),
            other => panic!("{other:?}"),
        }
        let raw = format!("{{\"ciphertext\":\"{}\"}}", text(1, 1));
        assert!(matches!(
            parse_line(raw.as_bytes(), &d),
            Parsed::Item { .. }
        ));
    }

    #[test]
    fn a_second_run_on_the_same_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let (first, _, _) =
            open_output(&out, false, None, &mut &b""[..], &defaults(None), false).unwrap();
        for resume in [false, true] {
            let err = open_output(&out, resume, None, &mut &b""[..], &defaults(None), false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("in use by another rewrap run"), "{err}");
        }
        drop(first);
        open_output(&out, true, None, &mut &b""[..], &defaults(None), false).unwrap();
    }
}
