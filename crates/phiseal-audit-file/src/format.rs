//! The line format: encoding records (hot path, no serde) and parsing them back (verify, export,
//! reopen). See the crate docs for the exact layout.

use std::fmt::Write as _;

use jiff::Timestamp;
use phiseal::audit::AuditEvent;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// Longest line (including its newline) the writer produces and `verify` accepts. Records are
/// bounded by the core crate's limits (names ≤ 128 bytes, record ids ≤ 512 bytes); only an
/// absurd actor identity or request id could come near this.
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

/// Appends `s` as a JSON string literal (RFC 8259): `"` and `\` escaped, control characters as
/// `\uXXXX` (or their short forms); everything else is copied as UTF-8.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    // Fast path: names, ids and kinds almost never need escaping.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
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
            c if (c as u32) < 0x20 => None,
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

/// Encodes one event as a complete line (with newline) into `line` (cleared first).
pub(crate) fn encode_event(line: &mut String, seq: u64, prev: &[u8; 32], e: &AuditEvent) {
    line.clear();
    // Writing to a String cannot fail.
    line.push_str("{\"seq\":");
    push_u64(line, seq);
    line.push_str(",\"time\":\"");
    push_time(line, e.time);
    line.push_str("\",\"actor\":");
    push_json_str(line, &e.actor.identity);
    line.push_str(",\"uid\":");
    push_opt_u32(line, e.actor.uid);
    line.push_str(",\"pid\":");
    push_opt_u32(line, e.actor.pid);
    line.push_str(",\"action\":");
    push_json_str(line, e.action.as_str());
    line.push_str(",\"tenant\":");
    push_opt_str(line, e.tenant.as_ref().map(|t| t.as_str()));
    line.push_str(",\"field\":");
    push_opt_str(line, e.field.as_deref());
    line.push_str(",\"record\":");
    push_opt_str(line, e.record.as_deref());
    line.push_str(",\"key_version\":");
    push_opt_u32(line, e.key_version);
    line.push_str(",\"key_source\":");
    push_opt_str(line, e.key_source.map(|k| k.as_str()));
    line.push_str(",\"result\":");
    push_json_str(line, e.outcome.as_str());
    line.push_str(",\"request_id\":");
    push_json_str(line, &e.request_id);
    push_prev(line, prev);
}

/// Bytes of an event line that do not come from its strings: member names, punctuation, the
/// numbers (at most 20 digits each), the time, `prev`, `hash` and the newline. Generous: the
/// worst case is under 400 (checked by a test).
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
        e.outcome.as_str().len(),
        e.request_id.len(),
    ]
    .into_iter()
    .fold(0usize, usize::saturating_add);
    strings.saturating_mul(6).saturating_add(EVENT_FIXED_MAX)
}

/// Encodes the header record (seq 0) into `line` (cleared first).
pub(crate) fn encode_header(line: &mut String, log_id: &[u8; 16], created: Timestamp) {
    line.clear();
    line.push_str("{\"seq\":0,\"kind\":\"header\",\"log_id\":\"");
    line.push_str(&hex::encode(log_id));
    // Writing to a String cannot fail.
    let _ = write!(line, "\",\"created\":\"{created}\"");
    push_prev(line, &ZERO_HASH);
}

/// Encodes a torn-tail recovery record into `line` (cleared first).
pub(crate) fn encode_recovery(
    line: &mut String,
    seq: u64,
    prev: &[u8; 32],
    offset: u64,
    len: u64,
    saved_to: &str,
    time: Timestamp,
) {
    line.clear();
    // Writing to a String cannot fail.
    let _ = write!(
        line,
        "{{\"seq\":{seq},\"kind\":\"recovered_torn_tail\",\"offset\":{offset},\"len\":{len},\"saved_to\":"
    );
    push_json_str(line, saved_to);
    let _ = write!(line, ",\"time\":\"{time}\"");
    push_prev(line, prev);
}

/// What kind of record a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The first record of a log.
    Header,
    /// An audit event.
    Event {
        /// Its tenant, if any.
        tenant: Option<String>,
        /// Its time.
        time: Timestamp,
    },
    /// A torn-tail recovery record.
    Recovered {
        /// The offset it claims the torn bytes were at.
        offset: u64,
    },
}

/// One parsed line.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub(crate) seq: u64,
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
    // recovery
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    len: Option<u64>,
    #[serde(default)]
    saved_to: Option<String>,
    // event (and recovery: time)
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
    field: Option<Option<IgnoredAny>>,
    #[serde(default, deserialize_with = "present")]
    record: Option<Option<IgnoredAny>>,
    #[serde(default, deserialize_with = "present")]
    key_version: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    key_source: Option<Option<String>>,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
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
            let id = raw.log_id.as_deref().unwrap_or_default();
            if id.len() != 32 || hex::decode(id).is_err() {
                return Err("header 'log_id' is not 32 hex digits".to_owned());
            }
            parse_time("created", raw.created.as_deref())?;
            Kind::Header
        }
        Some("recovered_torn_tail") => {
            let offset = raw
                .offset
                .ok_or_else(|| "recovery record without 'offset'".to_owned())?;
            if raw.len.is_none() || raw.saved_to.is_none() {
                return Err("recovery record without 'len' or 'saved_to'".to_owned());
            }
            parse_time("time", raw.time.as_deref())?;
            Kind::Recovered { offset }
        }
        Some(_) => return Err("unknown record 'kind'".to_owned()),
        None => {
            let time = parse_time("time", raw.time.as_deref())?;
            let missing = [
                ("actor", raw.actor.is_none()),
                ("uid", raw.uid.is_none()),
                ("pid", raw.pid.is_none()),
                ("action", raw.action.is_none()),
                ("tenant", raw.tenant.is_none()),
                ("field", raw.field.is_none()),
                ("record", raw.record.is_none()),
                ("key_version", raw.key_version.is_none()),
                ("key_source", raw.key_source.is_none()),
                ("result", raw.result.is_none()),
                ("request_id", raw.request_id.is_none()),
            ]
            .into_iter()
            .find(|(_, m)| *m);
            if let Some((name, _)) = missing {
                return Err(format!("event record without '{name}'"));
            }
            Kind::Event {
                tenant: raw.tenant.flatten(),
                time,
            }
        }
    };
    Ok(Parsed {
        seq: raw.seq,
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
            key_source: Some(KeySource::Cache),
            outcome: Outcome::Error("some_error_kind"),
            request_id: Arc::from(s),
        }
    }

    #[test]
    fn max_event_line_len_is_an_upper_bound() {
        let mut line = String::new();
        let ctl: String = std::iter::repeat_n('\u{1}', 300).collect();
        let mixed = "a\"\\\n\u{0}😀é".repeat(50);
        for s in ["", "x", ctl.as_str(), mixed.as_str()] {
            for time in [Timestamp::MIN, Timestamp::MAX, Timestamp::now()] {
                let e = worst_event(s, time);
                encode_event(&mut line, u64::MAX, &[0xff; 32], &e);
                finish_line(&mut line);
                let bound = max_event_line_len(&e);
                assert!(line.len() <= bound, "{} > {bound}", line.len());
                if s.is_empty() {
                    // The fixed part (all but the string contents) really is under the
                    // documented 400 bytes.
                    let strings = e.action.as_str().len()
                        + e.key_source.map_or(0, |k| k.as_str().len())
                        + e.outcome.as_str().len();
                    assert!(line.len() - strings < 400, "{}", line.len());
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
        all.push_str("\u{2028}\u{2029}😀\u{10FFFF}\"\\");
        for s in [all.as_str(), "", "plain", "\"", "\\", "\u{0}", "a\u{7f}b"] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, s);
            assert!(!out.bytes().any(|b| b < 0x20));
        }
    }
}
