//! The line format: encoding records (hot path, no serde) and parsing them back (verify, export,
//! reopen). See the crate docs for the exact layout.

use std::fmt::Write as _;

use jiff::Timestamp;
use phiseal::audit::AuditEvent;
use serde::Deserialize;

/// Longest line (including its newline) the writer produces and `verify` accepts. Records are
/// bounded by the core crate's limits (names ≤ 128 bytes, record ids ≤ 512 bytes); only an
/// absurd actor identity, request id or root-key reference (read from the key store) could
/// come near this, and then the append fails closed (`RecordTooLarge`).
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// `prev` of the header record.
pub(crate) const ZERO_HASH: [u8; 32] = [0; 32];

/// The fixed tail of every line: `,"hash":"<64 hex>"}` (the newline excluded).
const HASH_OPEN: &[u8] = b",\"hash\":\"";
const HASH_CLOSE: &[u8] = b"\"}";
/// Length of `,"hash":"<64 hex>"}`.
pub(crate) const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// SHA-256 of a record body: the line without its `,"hash":"…"` member, i.e. `prefix` + `}`.
pub(crate) fn body_hash(prefix: &[u8]) -> [u8; 32] {
    phiseal::crypto::default_provider()
        .sha256
        .digest(&[prefix, b"}"])
}

/// Characters that change how a line looks without showing themselves — C1 controls, bidi
/// overrides and isolates, zero-width and other format characters, line and paragraph
/// separators — written as `\uXXXX` so that a record id (any text without C0 controls)
/// cannot disguise itself or another member in the log or an export, nor split a line for
/// tools that break on U+2028.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{80}'..='\u{9f}'
            | '\u{ad}'
            | '\u{61c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// Appends `s` as a JSON string literal (RFC 8259): `"` and `\` escaped, control characters
/// and [`invisible`] ones as `\uXXXX` (or their short forms); everything else is copied as
/// UTF-8.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    // Fast path: names, ids and kinds almost never need escaping (nor hold non-ASCII).
    if !s
        .bytes()
        .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b >= 0x80)
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut run_start = 0;
    for (i, c) in s.char_indices() {
        let esc: Option<&str> = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            c if (c as u32) < 0x20 || invisible(c) => None,
            _ => continue,
        };
        out.push_str(s.get(run_start..i).unwrap_or_default());
        match esc {
            Some(e) => out.push_str(e),
            // Writing to a String cannot fail.
            None => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
        }
        run_start = i + c.len_utf8();
    }
    out.push_str(s.get(run_start..).unwrap_or_default());
    out.push('"');
}

/// Appends a decimal number.
fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `time` as RFC 3339 (UTC). Records of one batch share their time, so the text of
/// the last time formatted on this thread is reused.
fn push_time(out: &mut String, time: Timestamp) {
    thread_local! {
        static LAST: std::cell::RefCell<(Option<Timestamp>, String)> =
            const { std::cell::RefCell::new((None, String::new())) };
    }
    LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            let _ = write!(out, "{time}");
            return;
        };
        if last.0 != Some(time) {
            last.1.clear();
            // Writing to a String cannot fail.
            let _ = write!(last.1, "{time}");
            last.0 = Some(time);
        }
        out.push_str(&last.1);
    });
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

fn push_opt_u32(out: &mut String, n: Option<u32>) {
    match n {
        Some(n) => push_u64(out, u64::from(n)),
        None => out.push_str("null"),
    }
}

fn push_prev(out: &mut String, prev: &[u8; 32]) {
    out.push_str(",\"prev\":\"");
    push_hex(out, prev);
    out.push('"');
}

/// Appends 64 lowercase hex digits.
fn push_hex(out: &mut String, bytes: &[u8; 32]) {
    fn nibble(n: u8) -> u8 {
        if n < 10 { b'0' + n } else { b'a' + (n - 10) }
    }
    let mut buf = [0u8; 64];
    for (pair, &b) in buf.chunks_exact_mut(2).zip(bytes) {
        if let [hi, lo] = pair {
            *hi = nibble(b >> 4);
            *lo = nibble(b & 0x0f);
        }
    }
    // Always ASCII.
    out.push_str(std::str::from_utf8(&buf).unwrap_or_default());
}

/// Finishes a line whose body prefix (`{"seq":…,"prev":"…"`) is in `line`: appends
/// `,"hash":"…"}\n` and returns the hash.
pub(crate) fn finish_line(line: &mut String) -> [u8; 32] {
    let hash = body_hash(line.as_bytes());
    line.push_str(",\"hash\":\"");
    push_hex(line, &hash);
    line.push_str("\"}\n");
    hash
}

/// Encodes one event line (without its hash, see [`finish_line`]) into `line` (cleared first).
pub(crate) fn encode_event(line: &mut String, seq: u64, prev: &[u8; 32], e: &RecordView<'_>) {
    line.clear();
    line.push_str("{\"seq\":");
    push_u64(line, seq);
    push_members(line, e, Hoisted::ALL, true);
    push_prev(line, prev);
}

/// The members of one record, borrowed from an [`AuditEvent`] or a queued copy of one
/// (writing), or from a parsed line (export).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordView<'a> {
    pub(crate) time: Timestamp,
    pub(crate) actor: &'a str,
    pub(crate) uid: Option<u32>,
    pub(crate) pid: Option<u32>,
    pub(crate) action: &'a str,
    pub(crate) tenant: Option<&'a str>,
    pub(crate) field: Option<&'a str>,
    pub(crate) record: Option<&'a str>,
    pub(crate) key_version: Option<u32>,
    /// Optional: written only when present (`AuditEvent::from_key_version`).
    pub(crate) from_key_version: Option<u32>,
    pub(crate) key_source: Option<&'a str>,
    /// Optional: written only when present (`AuditEvent::root_key`).
    pub(crate) root_key: Option<&'a str>,
    pub(crate) result: &'a str,
    pub(crate) request_id: &'a str,
}

impl<'a> RecordView<'a> {
    /// The view of an event.
    pub(crate) fn of(e: &'a AuditEvent) -> Self {
        Self {
            time: e.time,
            actor: &e.actor.identity,
            uid: e.actor.uid,
            pid: e.actor.pid,
            action: e.action.as_str(),
            tenant: e.tenant.as_ref().map(|t| t.as_str()),
            field: e.field.as_deref(),
            record: e.record.as_deref(),
            key_version: e.key_version,
            from_key_version: e.from_key_version,
            key_source: e.key_source.map(|k| k.as_str()),
            root_key: e.root_key.as_deref(),
            result: e.outcome.as_str(),
            request_id: &e.request_id,
        }
    }
}

/// Encodes one record as a stand-alone JSON line for [`crate::export_tenant`]: the members of
/// an event line without `prev` and `hash` (which chain lines, not records).
pub(crate) fn encode_export(out: &mut String, seq: u64, r: &RecordView<'_>) {
    out.push_str("{\"seq\":");
    push_u64(out, seq);
    push_members(out, r, Hoisted::ALL, true);
    out.push_str("}\n");
}

/// Most records one batch line holds (it also stays within [`MAX_LINE`]).
pub(crate) const MAX_BATCH_RECORDS: usize = 1024;

/// Which members a batch line holds once, at line level, instead of in each record: those
/// equal in all its records. `actor` stands for `actor`, `uid` and `pid` together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hoisted {
    time: bool,
    actor: bool,
    action: bool,
    tenant: bool,
    field: bool,
    record: bool,
    key_version: bool,
    from_key_version: bool,
    key_source: bool,
    root_key: bool,
    result: bool,
    request_id: bool,
}

impl Hoisted {
    /// Every member: an event line, or a record written alone.
    const ALL: Self = Self {
        time: true,
        actor: true,
        action: true,
        tenant: true,
        field: true,
        record: true,
        key_version: true,
        from_key_version: true,
        key_source: true,
        root_key: true,
        result: true,
        request_id: true,
    };

    /// The members `first` shares with every record of `rest`.
    fn over(first: &RecordView<'_>, rest: &[RecordView<'_>]) -> Self {
        fn same(x: &str, y: &str) -> bool {
            std::ptr::eq(x, y) || x == y
        }
        fn same_opt(x: Option<&str>, y: Option<&str>) -> bool {
            match (x, y) {
                (Some(x), Some(y)) => same(x, y),
                (None, None) => true,
                _ => false,
            }
        }
        let mut h = Self::ALL;
        for e in rest {
            h.time &= e.time == first.time;
            h.actor &= e.uid == first.uid && e.pid == first.pid && same(e.actor, first.actor);
            h.action &= same(e.action, first.action);
            h.tenant &= same_opt(e.tenant, first.tenant);
            h.field &= same_opt(e.field, first.field);
            h.record &= same_opt(e.record, first.record);
            h.key_version &= e.key_version == first.key_version;
            h.from_key_version &= e.from_key_version == first.from_key_version;
            h.key_source &= same_opt(e.key_source, first.key_source);
            h.root_key &= same_opt(e.root_key, first.root_key);
            h.result &= same(e.result, first.result);
            h.request_id &= same(e.request_id, first.request_id);
        }
        h
    }
}

/// Appends the members of `r` that are (`line_level`) or are not (record level) in `h`, in
/// the fixed order of an event line: `time`, `actor`, `uid`, `pid`, `action`, `tenant`,
/// `field`, `record`, `key_version`, `from_key_version`, `key_source`, `root_key`, `result`,
/// `request_id`. At line level each member is preceded by a comma; at record level all but
/// the first. `from_key_version` and `root_key` are optional: written only where present (a
/// record without one has no such member).
fn push_members(line: &mut String, r: &RecordView<'_>, h: Hoisted, line_level: bool) {
    let mut comma = line_level;
    let mut name = |line: &mut String, name: &str| {
        if comma {
            line.push(',');
        }
        comma = true;
        line.push('"');
        line.push_str(name);
        line.push_str("\":");
    };
    if h.time == line_level {
        name(line, "time");
        line.push('"');
        push_time(line, r.time);
        line.push('"');
    }
    if h.actor == line_level {
        name(line, "actor");
        push_json_str(line, r.actor);
        name(line, "uid");
        push_opt_u32(line, r.uid);
        name(line, "pid");
        push_opt_u32(line, r.pid);
    }
    if h.action == line_level {
        name(line, "action");
        push_json_str(line, r.action);
    }
    if h.tenant == line_level {
        name(line, "tenant");
        push_opt_str(line, r.tenant);
    }
    if h.field == line_level {
        name(line, "field");
        push_opt_str(line, r.field);
    }
    if h.record == line_level {
        name(line, "record");
        push_opt_str(line, r.record);
    }
    if h.key_version == line_level {
        name(line, "key_version");
        push_opt_u32(line, r.key_version);
    }
    if let (true, Some(from)) = (h.from_key_version == line_level, r.from_key_version) {
        name(line, "from_key_version");
        push_u64(line, u64::from(from));
    }
    if h.key_source == line_level {
        name(line, "key_source");
        push_opt_str(line, r.key_source);
    }
    if let (true, Some(root_key)) = (h.root_key == line_level, r.root_key) {
        name(line, "root_key");
        push_json_str(line, root_key);
    }
    if h.result == line_level {
        name(line, "result");
        push_json_str(line, r.result);
    }
    if h.request_id == line_level {
        name(line, "request_id");
        push_json_str(line, r.request_id);
    }
}

/// Room a batch line keeps for what follows its last record: `],"prev":"<64 hex>"`,
/// `,"hash":"<64 hex>"}` and the newline.
const BATCH_TAIL_MAX: usize = 2 + 9 + 64 + 1 + HASH_SUFFIX_LEN + 1;

/// Encodes the line (without its hash, see [`finish_line`]) that holds `first` and as many of
/// the events in `rest` as fit, into `line` (cleared first); returns how many events the line
/// holds (at least 1).
///
/// A lone event gets an **event line**. Several events share a **batch line**: the members
/// they all have in common once, at line level — for the records of one batch call that is
/// most of them (time, actor, action, request id, usually tenant, key version, key source and
/// result) — then, in `records`, one object per record with its other members; its records
/// take the sequence numbers `seq`, `seq + 1`, …. A batch line holds at most
/// [`MAX_BATCH_RECORDS`] records and stays within [`MAX_LINE`]; the rest continues on the next
/// line.
pub(crate) fn encode_line(
    line: &mut String,
    seq: u64,
    prev: &[u8; 32],
    first: &RecordView<'_>,
    rest: &[RecordView<'_>],
) -> usize {
    let rest = rest.get(..MAX_BATCH_RECORDS - 1).unwrap_or(rest);
    if !rest.is_empty() {
        let taken = encode_batch(line, seq, prev, first, rest);
        if taken > 0 {
            return 1 + taken;
        }
    }
    encode_event(line, seq, prev, first);
    1
}

/// Encodes a batch line of `first` and a leading part of `rest`; returns how many events of
/// `rest` it holds. Zero means not even two records fit in [`MAX_LINE`]: the caller writes
/// `first` as an event line instead.
fn encode_batch(
    line: &mut String,
    seq: u64,
    prev: &[u8; 32],
    first: &RecordView<'_>,
    rest: &[RecordView<'_>],
) -> usize {
    // Members equal over all of `rest` are equal over any leading part of it, so hoisting is
    // decided once, before the line is cut to size. A record keeps at least one member of its
    // own (`record` if nothing differs), so that each has an object with content.
    let mut hoisted = Hoisted::over(first, rest);
    // (The optional members: a record may not have them, so they cannot be the one kept.)
    let mandatory_all_shared = Hoisted {
        from_key_version: true,
        root_key: true,
        ..hoisted
    } == Hoisted::ALL;
    if mandatory_all_shared {
        hoisted.record = false;
    }
    line.clear();
    line.push_str("{\"seq\":");
    push_u64(line, seq);
    line.push_str(",\"kind\":\"batch\"");
    push_members(line, first, hoisted, true);
    line.push_str(",\"records\":[");
    let mut taken = 0;
    for (i, e) in std::iter::once(first).chain(rest).enumerate() {
        let mark = line.len();
        if i > 0 {
            line.push(',');
        }
        line.push('{');
        push_members(line, e, hoisted, false);
        line.push('}');
        if line.len() + BATCH_TAIL_MAX > MAX_LINE {
            line.truncate(mark);
            break;
        }
        taken = i;
    }
    if taken == 0 {
        return 0;
    }
    line.push(']');
    push_prev(line, prev);
    taken
}

/// Bytes of an event line that do not come from its strings: member names, punctuation, the
/// numbers (at most 20 digits each), the time, `prev`, `hash` and the newline. Generous: the
/// worst case is under 450 (checked by a test).
const EVENT_FIXED_MAX: usize = 512;

/// An upper bound of the length of `e`'s line (newline included) as [`encode_event`] writes
/// it, for any sequence number and `prev`, computed without encoding: each string byte becomes
/// at most 6 bytes (`\u001f`). Cheap (a few length reads), for the caller-side check of
/// [`crate::Durability::Buffered`].
pub(crate) fn max_event_line_len(e: &AuditEvent) -> usize {
    let strings = [
        e.actor.identity.len(),
        e.action.as_str().len(),
        e.tenant.as_ref().map_or(0, |t| t.as_str().len()),
        e.field.as_deref().map_or(0, str::len),
        e.record.as_deref().map_or(0, str::len),
        e.key_source.map_or(0, |k| k.as_str().len()),
        e.root_key.as_deref().map_or(0, str::len),
        e.outcome.as_str().len(),
        e.request_id.len(),
    ]
    .into_iter()
    .fold(0usize, usize::saturating_add);
    strings.saturating_mul(6).saturating_add(EVENT_FIXED_MAX)
}

/// Encodes a header record into `line` (cleared first): the first line of every file of a
/// log. `after` is the seq of the last record before it — 0 and a zero `prev` at the origin
/// of a log; in a file that continues a log after a rollover, the previous file's last seq
/// and its last line's hash. A header is not a record: the next record's seq is `after + 1`.
pub(crate) fn encode_header(
    line: &mut String,
    log_id: &[u8; 16],
    created: Timestamp,
    after: u64,
    prev: &[u8; 32],
) {
    line.clear();
    // Writing to a String cannot fail.
    let _ = write!(line, "{{\"seq\":{after},\"kind\":\"header\",\"log_id\":\"");
    line.push_str(&hex::encode(log_id));
    let _ = write!(line, "\",\"created\":\"{created}\"");
    push_prev(line, prev);
}

/// Encodes a torn-tail recovery record into `line` (cleared first).
/// What a recovery record states about the torn bytes it saved aside.
pub(crate) struct SavedTail<'a> {
    /// Where they were in the log.
    pub(crate) offset: u64,
    /// How many there were.
    pub(crate) len: u64,
    /// The file they were saved to.
    pub(crate) saved_to: &'a str,
    /// Their SHA-256.
    pub(crate) saved_sha256: [u8; 32],
}

pub(crate) fn encode_recovery(
    line: &mut String,
    seq: u64,
    prev: &[u8; 32],
    tail: &SavedTail<'_>,
    time: Timestamp,
) {
    let SavedTail {
        offset,
        len,
        saved_to,
        saved_sha256,
    } = tail;
    line.clear();
    // Writing to a String cannot fail.
    let _ = write!(
        line,
        "{{\"seq\":{seq},\"kind\":\"recovered_torn_tail\",\"offset\":{offset},\"len\":{len},\"saved_to\":"
    );
    push_json_str(line, saved_to);
    let _ = write!(
        line,
        ",\"saved_sha256\":\"{}\",\"time\":\"{time}\"",
        hex::encode(saved_sha256)
    );
    push_prev(line, prev);
}

/// What kind of record a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The first line of a file of a log: its origin (seq 0, zero `prev`) or, after a
    /// rollover, the continuation of the previous file (that file's last seq and hash).
    Header {
        /// The log's id (the same in every file of one log).
        log_id: [u8; 16],
    },
    /// An event line (one record) or a batch line (several).
    Records(Box<RecordLine>),
    /// A torn-tail recovery record.
    Recovered {
        /// The offset it claims the torn bytes were at.
        offset: u64,
    },
}

/// The records of an event or batch line, checked: each member is on the line or in every
/// record (the optional `from_key_version` and `root_key`: on the line, or in the records
/// that have one, or nowhere). An event line is read as a line holding every member, with one record that has
/// none of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordLine {
    line: Members,
    records: Vec<Members>,
    times: Vec<Timestamp>,
}

impl RecordLine {
    /// Number of records (at least 1).
    fn len(&self) -> usize {
        self.records.len()
    }

    /// Each record, in order, with the line's members filled in; `None` for a record missing
    /// a member (which [`parse_line`] does not let through).
    pub(crate) fn records(&self) -> impl Iterator<Item = Option<RecordView<'_>>> {
        self.records
            .iter()
            .zip(&self.times)
            .map(|(own, &time)| self.view(own, time))
    }

    fn view<'a>(&'a self, own: &'a Members, time: Timestamp) -> Option<RecordView<'a>> {
        let line = &self.line;
        fn text<'a>(own: &'a Option<String>, line: &'a Option<String>) -> Option<&'a str> {
            own.as_deref().or(line.as_deref())
        }
        fn nullable<'a>(
            own: &'a Option<Option<String>>,
            line: &'a Option<Option<String>>,
        ) -> Option<Option<&'a str>> {
            own.as_ref().or(line.as_ref()).map(Option::as_deref)
        }
        Some(RecordView {
            time,
            actor: text(&own.actor, &line.actor)?,
            uid: own.uid.or(line.uid)?,
            pid: own.pid.or(line.pid)?,
            action: text(&own.action, &line.action)?,
            tenant: nullable(&own.tenant, &line.tenant)?,
            field: nullable(&own.field, &line.field)?,
            record: nullable(&own.record, &line.record)?,
            key_version: own.key_version.or(line.key_version)?,
            from_key_version: own.from_key_version.or(line.from_key_version).flatten(),
            key_source: nullable(&own.key_source, &line.key_source)?,
            root_key: own
                .root_key
                .as_ref()
                .or(line.root_key.as_ref())
                .and_then(Option::as_deref),
            result: text(&own.result, &line.result)?,
            request_id: text(&own.request_id, &line.request_id)?,
        })
    }
}

/// One parsed line.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    /// Sequence number of the line's first record.
    pub(crate) seq: u64,
    /// Sequence number of the line's last record (`seq` but for a batch line).
    pub(crate) last_seq: u64,
    pub(crate) prev: [u8; 32],
    /// The hash stored in the line.
    pub(crate) hash: [u8; 32],
    /// Whether the stored hash equals the SHA-256 of the body.
    pub(crate) hash_ok: bool,
    pub(crate) kind: Kind,
}

/// Accepts a present value (`null` included) as `Some(..)`, so that a missing member can be told
/// from an explicit `null`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Raw {
    seq: u64,
    prev: String,
    hash: String,
    #[serde(default)]
    kind: Option<String>,
    // header
    #[serde(default)]
    log_id: Option<String>,
    #[serde(default)]
    created: Option<String>,
    // recovery (and its `time`, in `members`)
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    len: Option<u64>,
    #[serde(default)]
    saved_to: Option<String>,
    // event, and the members a batch line holds for all its records
    #[serde(flatten)]
    members: Members,
    // batch
    #[serde(default)]
    records: Option<Vec<Members>>,
}

/// The members of a record, each `None` when absent (`Some(None)`: an explicit `null`): an
/// event line's, a batch line's shared ones, or one record object's in a batch line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
struct Members {
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default, deserialize_with = "present")]
    uid: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    pid: Option<Option<u32>>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default, deserialize_with = "present")]
    tenant: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    field: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    record: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    key_version: Option<Option<u32>>,
    /// Optional: absent when the record has none (never `null`).
    #[serde(default, deserialize_with = "present")]
    from_key_version: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    key_source: Option<Option<String>>,
    /// Optional: absent when the record has none (never `null`).
    #[serde(default, deserialize_with = "present")]
    root_key: Option<Option<String>>,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

/// The members of a record, in the order of an event line.
const MEMBERS: [&str; 12] = [
    "time",
    "actor",
    "uid",
    "pid",
    "action",
    "tenant",
    "field",
    "record",
    "key_version",
    "key_source",
    "result",
    "request_id",
];

impl Members {
    /// Which of [`MEMBERS`] are present.
    fn present(&self) -> [bool; 12] {
        [
            self.time.is_some(),
            self.actor.is_some(),
            self.uid.is_some(),
            self.pid.is_some(),
            self.action.is_some(),
            self.tenant.is_some(),
            self.field.is_some(),
            self.record.is_some(),
            self.key_version.is_some(),
            self.key_source.is_some(),
            self.result.is_some(),
            self.request_id.is_some(),
        ]
    }
}

/// Checks an optional member (written only where present): never `null`, and on the line or
/// in records, never both.
fn optional_member<'a, T: 'a>(
    what: &str,
    name: &str,
    on_line: &'a Option<Option<T>>,
    in_records: impl Iterator<Item = &'a Option<Option<T>>> + Clone,
) -> Result<(), String> {
    let mut present = in_records.flatten();
    if on_line.iter().chain(present.clone()).any(Option::is_none) {
        return Err(format!("{what} with a null '{name}'"));
    }
    if on_line.is_some() && present.next().is_some() {
        return Err(format!(
            "{what} with '{name}' both on the line and in a record"
        ));
    }
    Ok(())
}

/// Checks an event or batch line: each member is either on the line (shared by all records) or
/// in every record, never both (`what` names the line kind in errors).
fn record_line(line: Members, records: Vec<Members>, what: &str) -> Result<RecordLine, String> {
    let on_line = line.present();
    let mut in_records = [0usize; 12];
    for record in &records {
        for (count, present) in in_records.iter_mut().zip(record.present()) {
            *count += usize::from(present);
        }
    }
    for ((name, on_line), in_records) in MEMBERS.iter().zip(on_line).zip(in_records) {
        match (on_line, in_records) {
            (true, 0) => {}
            (false, n) if n == records.len() => {}
            (true, _) => {
                return Err(format!(
                    "{what} with '{name}' both on the line and in a record"
                ));
            }
            (false, _) => return Err(format!("{what} without '{name}'")),
        }
    }
    // The optional members: on the line, or in any of the records, never both; never `null`.
    optional_member(
        what,
        "from_key_version",
        &line.from_key_version,
        records.iter().map(|r| &r.from_key_version),
    )?;
    optional_member(
        what,
        "root_key",
        &line.root_key,
        records.iter().map(|r| &r.root_key),
    )?;
    let times = records
        .iter()
        .map(|r| parse_time("time", r.time.as_deref().or(line.time.as_deref())))
        .collect::<Result<_, _>>()?;
    Ok(RecordLine {
        line,
        records,
        times,
    })
}

fn decode_hash(what: &str, s: &[u8]) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    if s.len() != 64 || !s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("'{what}' is not 64 lowercase hex digits"));
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| format!("'{what}' is not hex"))?;
    Ok(out)
}

fn parse_time(what: &str, s: Option<&str>) -> Result<Timestamp, String> {
    let s = s.ok_or_else(|| format!("missing '{what}'"))?;
    if !s.ends_with('Z') {
        return Err(format!("'{what}' is not an RFC 3339 UTC time"));
    }
    s.parse::<Timestamp>()
        .map_err(|_| format!("'{what}' is not an RFC 3339 UTC time"))
}

/// The stored hash of a line that may not parse as a record (its hash member is split off
/// structurally, last and of fixed length), if it can be read.
pub(crate) fn stored_hash(line: &[u8]) -> Option<[u8; 32]> {
    let suffix = line.get(line.len().checked_sub(HASH_SUFFIX_LEN)?..)?;
    let hex_part = suffix.strip_prefix(HASH_OPEN)?.strip_suffix(HASH_CLOSE)?;
    decode_hash("hash", hex_part).ok()
}

/// Parses one line (without its newline). `Err` carries a short description for
/// [`crate::ProblemKind::Malformed`]; it never contains line content.
pub(crate) fn parse_line(line: &[u8]) -> Result<Parsed, String> {
    // The hash member is always last, with a fixed length: split it off structurally.
    let prefix_len = line
        .len()
        .checked_sub(HASH_SUFFIX_LEN)
        .ok_or_else(|| "too short to be a record".to_owned())?;
    let (prefix, suffix) = line
        .split_at_checked(prefix_len)
        .ok_or_else(|| "too short to be a record".to_owned())?;
    let hex_part = suffix
        .strip_prefix(HASH_OPEN)
        .and_then(|s| s.strip_suffix(HASH_CLOSE))
        .ok_or_else(|| "does not end with the \"hash\" member".to_owned())?;
    let stored = decode_hash("hash", hex_part)?;

    let raw: Raw = serde_json::from_slice(line).map_err(|e| {
        // serde_json's Display can quote values (`invalid type: string "…"`): report only the
        // error class and position.
        let class = match e.classify() {
            serde_json::error::Category::Io => "I/O",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "wrong field type or missing field",
            serde_json::error::Category::Eof => "unexpected end",
        };
        format!("not a valid record: {class} error at column {}", e.column())
    })?;
    let prev = decode_hash("prev", raw.prev.as_bytes())?;
    let hash = decode_hash("hash", raw.hash.as_bytes())?;
    if hash != stored {
        return Err("duplicate \"hash\" member".to_owned());
    }
    let computed = body_hash(prefix);
    let hash_ok = phiseal::crypto::ct_eq(&computed, &stored);

    let kind = match raw.kind.as_deref() {
        Some("header") => {
            let mut log_id = [0u8; 16];
            let id = raw.log_id.as_deref().unwrap_or_default();
            if id.len() != 32 || hex::decode_to_slice(id, &mut log_id).is_err() {
                return Err("header 'log_id' is not 32 hex digits".to_owned());
            }
            parse_time("created", raw.created.as_deref())?;
            // The origin starts the chain; a continuation links to an earlier file.
            if (raw.seq == 0) != (prev == ZERO_HASH) {
                return Err("header: seq 0 must come with a zero 'prev', and only it".to_owned());
            }
            Kind::Header { log_id }
        }
        Some("recovered_torn_tail") => {
            let offset = raw
                .offset
                .ok_or_else(|| "recovery record without 'offset'".to_owned())?;
            if raw.len.is_none() || raw.saved_to.is_none() {
                return Err("recovery record without 'len' or 'saved_to'".to_owned());
            }
            parse_time("time", raw.members.time.as_deref())?;
            Kind::Recovered { offset }
        }
        Some("batch") => {
            let records = raw
                .records
                .ok_or_else(|| "batch line without 'records'".to_owned())?;
            if records.is_empty() {
                return Err("batch line with no records".to_owned());
            }
            // The writer puts at most this many records on a line.
            if records.len() > MAX_BATCH_RECORDS {
                return Err(format!(
                    "batch line with {} records (at most {MAX_BATCH_RECORDS})",
                    records.len()
                ));
            }
            Kind::Records(Box::new(record_line(raw.members, records, "batch record")?))
        }
        Some(_) => return Err("unknown record 'kind'".to_owned()),
        None => {
            if raw.records.is_some() {
                return Err("event record with 'records'".to_owned());
            }
            let records = vec![Members::default()];
            Kind::Records(Box::new(record_line(raw.members, records, "event record")?))
        }
    };
    let count = match &kind {
        Kind::Records(line) => u64::try_from(line.len()).unwrap_or(u64::MAX),
        Kind::Header { .. } | Kind::Recovered { .. } => 1,
    };
    let last_seq = raw
        .seq
        .checked_add(count - 1)
        .ok_or_else(|| "sequence number exhausted".to_owned())?;
    Ok(Parsed {
        seq: raw.seq,
        last_seq,
        prev,
        hash: stored,
        hash_ok,
        kind,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn invisible_characters_are_escaped_and_the_rest_kept() {
        let mut out = String::new();
        push_json_str(&mut out, "rec-\u{202e}fdp.exe\u{2028}x\u{200b}é✓\u{85}");
        assert_eq!(out, "\"rec-\\u202efdp.exe\\u2028x\\u200bé✓\\u0085\"");
        let mut plain = String::new();
        push_json_str(&mut plain, "pt-7f3c9a52");
        assert_eq!(plain, "\"pt-7f3c9a52\"");
    }

    #[test]
    fn hex_matches_the_hex_crate() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let mut out = String::new();
        push_hex(&mut out, &bytes);
        assert_eq!(out, hex::encode(bytes));
    }

    fn worst_event(s: &str, time: Timestamp) -> AuditEvent {
        use phiseal::audit::{Action, Actor, KeySource, Outcome};
        use std::sync::Arc;
        AuditEvent {
            time,
            actor: Actor {
                identity: Arc::from(s),
                uid: Some(u32::MAX),
                pid: Some(u32::MAX),
            },
            action: Action::SetMinDecryptVersion,
            tenant: None,
            field: Some(Arc::from(s)),
            record: Some(Arc::from(s)),
            key_version: Some(u32::MAX),
            from_key_version: Some(u32::MAX),
            key_source: Some(KeySource::Cache),
            root_key: Some(Arc::from(s)),
            outcome: Outcome::Error("some_error_kind"),
            request_id: Arc::from(s),
        }
    }

    #[test]
    fn max_event_line_len_is_an_upper_bound() {
        let mut line = String::new();
        let ctl: String = std::iter::repeat_n('\u{1}', 300).collect();
        let mixed = "a\"\\\n\u{0}😀é\u{85}\u{202e}\u{feff}".repeat(50);
        for s in ["", "x", ctl.as_str(), mixed.as_str()] {
            for time in [Timestamp::MIN, Timestamp::MAX, Timestamp::now()] {
                let e = worst_event(s, time);
                encode_event(&mut line, u64::MAX, &[0xff; 32], &RecordView::of(&e));
                finish_line(&mut line);
                let bound = max_event_line_len(&e);
                assert!(line.len() <= bound, "{} > {bound}", line.len());
                if s.is_empty() {
                    // The fixed part (all but the string contents) really is under the
                    // documented 450 bytes.
                    let strings = e.action.as_str().len()
                        + e.key_source.map_or(0, |k| k.as_str().len())
                        + e.outcome.as_str().len();
                    assert!(line.len() - strings < 450, "{}", line.len());
                }
            }
        }
    }

    #[test]
    fn json_escaping_round_trips() {
        let mut all = String::new();
        for c in (0u32..0x200).filter_map(char::from_u32) {
            all.push(c);
        }
        all.push_str("\u{2028}\u{2029}\u{202e}\u{2066}\u{200b}\u{feff}😀\u{10FFFF}\"\\");
        for s in [all.as_str(), "", "plain", "\"", "\\", "\u{0}", "a\u{7f}b"] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, s);
            assert!(!out.bytes().any(|b| b < 0x20));
        }
    }
}
