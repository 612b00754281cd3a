//! [`FileAuditLog`]: the writer, its fdatasync thread, and torn-tail recovery.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;
use phiseal::BackendError;
use phiseal::audit::{AuditEvent, AuditSink};
use tokio::sync::watch;

use crate::error::AuditFileError;
use crate::format::{
    Kind, MAX_LINE, encode_event, encode_header, encode_recovery, finish_line, parse_line,
};

/// When `append` returns, and what a crash can lose.
///
/// In both modes `append` has written the records into the kernel (one `write(2)` per call)
/// before it returns, so a *process* crash (panic, OOM kill, SIGKILL) loses nothing that was
/// acknowledged. The modes differ in a *power cut or kernel crash*:
///
/// | mode | `append` returns after | power cut loses |
/// |------|------------------------|-----------------|
/// | [`Interval(d)`](Durability::Interval) | `write(2)` | acknowledged records of at most the last `d` (plus one fdatasync's duration) |
/// | [`Strict`](Durability::Strict) | an `fdatasync` covering its records | nothing acknowledged |
///
/// A power cut can also leave a torn (partial) last line; see
/// [`FileAuditLog::recover_torn_tail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `append` returns after the `write(2)`; a background thread fdatasyncs at most once per
    /// interval, and only when something was written.
    Interval(Duration),
    /// `append` returns after an fdatasync covering its records. Concurrent appenders share one
    /// fdatasync (group commit), so throughput is not capped at one record per fdatasync.
    Strict,
}

impl Default for Durability {
    /// `Interval(200 ms)`.
    fn default() -> Self {
        Durability::Interval(Duration::from_millis(200))
    }
}

/// What [`FileAuditLog::recover_torn_tail`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Byte offset where the torn bytes started (and where the log was truncated).
    pub offset: u64,
    /// Number of torn bytes saved and removed.
    pub len: u64,
    /// Where the torn bytes were saved.
    pub saved_to: PathBuf,
    /// Sequence number of the `recovered_torn_tail` record appended to the chain.
    pub seq: u64,
}

/// The chain position: what the next record links to.
#[derive(Debug, Clone, Copy)]
struct Head {
    next_seq: u64,
    prev: [u8; 32],
}

/// State guarded by the writer lock: sequence numbers are assigned and the chain is extended
/// under the same lock as the `write(2)`, so file order is seq order.
#[derive(Debug)]
struct Writer {
    file: File,
    head: Head,
    /// The lines of one `append` call, written with one `write(2)`.
    out: Vec<u8>,
    /// One line being encoded.
    line: String,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Something was written since the last fdatasync began.
    dirty: bool,
    /// Highest ticket handed out (a ticket = "an fdatasync starting after now is needed").
    requested: u64,
    /// Highest ticket covered by an fdatasync that has started.
    taken: u64,
    /// The log was dropped: sync what is dirty, then exit.
    shutdown: bool,
}

#[derive(Debug, Clone, Default)]
struct SyncStatus {
    /// Highest ticket covered by a completed fdatasync.
    done: u64,
    /// Set when an fdatasync failed; the log is poisoned.
    failed: Option<Arc<str>>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    durability: Durability,
    writer: Mutex<Writer>,
    /// A second descriptor of the same file, for the fdatasync thread (no writer lock needed).
    sync_file: File,
    sync_state: Mutex<SyncState>,
    sync_cv: Condvar,
    status: watch::Sender<SyncStatus>,
    /// The first write/sync failure. Once set, never cleared: every append fails.
    poison: OnceLock<String>,
    syncs: AtomicU64,
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

/// A hash-chained JSON-lines audit log in one local file, implementing [`AuditSink`].
///
/// # Format
/// One record per line, UTF-8, fields in a fixed order; `hash` is the SHA-256 of the line's
/// bytes without the `,"hash":"…"` member, and `prev` is the previous record's hash:
///
/// ```text
/// {"seq":0,"kind":"header","log_id":"<32 hex>","created":"<RFC 3339>","prev":"000…0","hash":"…"}
/// {"seq":1,"time":"2025-01-02T03:04:05Z","actor":"svc","uid":1000|null,"pid":42|null,"action":"encrypt","tenant":"t1"|null,"field":"ssn"|null,"record":"r1"|null,"key_version":3|null,"key_source":"cache"|"kms"|null,"result":"ok","request_id":"…","prev":"…","hash":"…"}
/// {"seq":N,"kind":"recovered_torn_tail","offset":…,"len":…,"saved_to":"…","time":"…","prev":"…","hash":"…"}
/// ```
///
/// The random `log_id` in the header makes every chain unique, so records of two logs cannot
/// be spliced together. Anchor [`crate::VerifyReport::head_hash`] outside the machine to detect
/// a rewrite of the whole file.
///
/// # Durability and failure
/// A process crash loses nothing acknowledged in either mode (records are in the kernel when
/// `append` returns). A power cut loses nothing acknowledged in [`Durability::Strict`], and at
/// most the last interval of acknowledged records in [`Durability::Interval`]; see
/// [`Durability`]. The log **fails closed**: if a `write(2)` or
/// fdatasync fails, that `append` returns an error and the log is poisoned: every later append
/// fails too (the file may end in a partial record) until an operator runs
/// [`crate::verify`] and restarts the service.
///
/// # Ownership
/// One `FileAuditLog` (one process) per file: two writers on one file would interleave two
/// chains. `open`, `recover_torn_tail` and the `Drop` are blocking (file I/O); call them at
/// startup / shutdown or from `spawn_blocking`. `append` does one `write(2)` to the page cache
/// on the calling thread and never waits for an fdatasync on it (Strict mode awaits a
/// [`tokio::sync::watch`] channel fed by a dedicated thread). Call [`AuditSink::flush`] on
/// shutdown.
#[derive(Debug)]
pub struct FileAuditLog {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    // A poisoned mutex means a thread panicked while holding it; treat the log as broken.
    m.lock().ok()
}

fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> AuditFileError + 'a {
    move |source| AuditFileError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Fsyncs the directory containing `path`, so a newly created file's entry is durable.
fn sync_parent_dir(path: &Path) -> Result<(), AuditFileError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path, "fsync of the parent directory"))
}

/// Where the file's last complete line starts and ends, or the torn tail.
enum Tail {
    /// The file is empty.
    Empty,
    /// The file ends with a newline; the last line is `start..end` (newline excluded).
    Line { start: u64, end: u64 },
    /// The file does not end with a newline.
    Torn { offset: u64, len: u64 },
}

/// Finds the last newline before `end` (exclusive), scanning backwards in bounded chunks.
fn last_newline_before(file: &File, end: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(CHUNK);
        let n = usize::try_from(hi - lo).unwrap_or(0);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        file.read_exact_at(chunk, lo)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

fn find_tail(file: &File, len: u64) -> std::io::Result<Tail> {
    if len == 0 {
        return Ok(Tail::Empty);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last != [b'\n'] {
        let offset = last_newline_before(file, len)?.map_or(0, |nl| nl + 1);
        return Ok(Tail::Torn {
            offset,
            len: len - offset,
        });
    }
    let end = len - 1;
    let start = last_newline_before(file, end)?.map_or(0, |nl| nl + 1);
    Ok(Tail::Line { start, end })
}

/// Reads and checks the last line, returning the chain head that continues it.
fn head_from_tail(path: &Path, file: &File, start: u64, end: u64) -> Result<Head, AuditFileError> {
    let damaged = |reason: String| AuditFileError::DamagedTail {
        path: path.to_owned(),
        end,
        reason,
    };
    let len = usize::try_from(end - start).unwrap_or(usize::MAX);
    if len >= MAX_LINE {
        return Err(damaged(format!("longer than {MAX_LINE} bytes")));
    }
    let mut line = vec![0u8; len];
    file.read_exact_at(&mut line, start)
        .map_err(io_err(path, "read"))?;
    let parsed = parse_line(&line).map_err(damaged)?;
    if !parsed.hash_ok {
        return Err(damaged(
            "its hash does not match its content (edited)".into(),
        ));
    }
    if start == 0 && (parsed.kind != Kind::Header || parsed.seq != 0) {
        return Err(damaged("the only line is not a header record".into()));
    }
    let next_seq = parsed
        .seq
        .checked_add(1)
        .ok_or_else(|| damaged("sequence number exhausted".into()))?;
    Ok(Head {
        next_seq,
        prev: parsed.hash,
    })
}

/// Opens `path` for appending, creating it (mode 0600) if absent. Returns the file and whether
/// it was created.
fn open_append(path: &Path) -> Result<(File, bool), AuditFileError> {
    let open_err = |source| AuditFileError::Open {
        path: path.to_owned(),
        source,
    };
    match OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map(|f| (f, false))
            .map_err(open_err),
        Err(e) => Err(open_err(e)),
    }
}

impl FileAuditLog {
    /// Opens the log at `path`, creating it with mode 0600 (its parent directory must exist)
    /// and writing a header record, or reopening it and continuing its chain from the last
    /// record. Blocking.
    ///
    /// Reopening checks the last record's own hash, not the whole chain: run [`crate::verify`]
    /// for that. Fails with [`AuditFileError::TornTail`] if the file does not end with a
    /// newline, and with [`AuditFileError::DamagedTail`] if its last line is not a valid record.
    pub fn open(path: impl AsRef<Path>, durability: Durability) -> Result<Self, AuditFileError> {
        let path = path.as_ref();
        let (file, created) = open_append(path)?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        if !meta.is_file() {
            return Err(AuditFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        if created {
            sync_parent_dir(path)?;
        }
        let head = match find_tail(&file, meta.len()).map_err(io_err(path, "read"))? {
            Tail::Empty => None,
            Tail::Torn { offset, len } => {
                return Err(AuditFileError::TornTail {
                    path: path.to_owned(),
                    offset,
                    len,
                });
            }
            Tail::Line { start, end } => Some(head_from_tail(path, &file, start, end)?),
        };
        let head = match head {
            Some(h) => h,
            None => write_header(path, &file)?,
        };
        Self::start(path, file, head, durability)
    }

    /// Builds the log around an open file and starts the fdatasync thread.
    fn start(
        path: &Path,
        file: File,
        head: Head,
        durability: Durability,
    ) -> Result<Self, AuditFileError> {
        let sync_file = file.try_clone().map_err(io_err(path, "dup"))?;
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            durability,
            writer: Mutex::new(Writer {
                file,
                head,
                out: Vec::with_capacity(4096),
                line: String::with_capacity(512),
            }),
            sync_file,
            sync_state: Mutex::new(SyncState::default()),
            sync_cv: Condvar::new(),
            status: watch::Sender::new(SyncStatus::default()),
            poison: OnceLock::new(),
            syncs: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        });
        let interval = match durability {
            Durability::Interval(d) => Some(d),
            Durability::Strict => None,
        };
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("phiseal-audit-sync".into())
            .spawn(move || sync_loop(&thread_shared, interval))
            .map_err(io_err(path, "spawning the fdatasync thread"))?;
        Ok(Self { shared })
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The durability mode.
    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Number of fdatasync calls made so far by the background thread (tests: group commit).
    #[doc(hidden)]
    pub fn sync_count(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    fn poisoned(&self) -> AuditFileError {
        AuditFileError::Poisoned {
            path: self.shared.path.clone(),
            reason: self
                .shared
                .poison
                .get()
                .cloned()
                .unwrap_or_else(|| "internal lock poisoned".to_owned()),
        }
    }

    /// Encodes `events` and writes them with one `write(2)`, under the writer lock. On failure
    /// the log is poisoned.
    fn write_events(&self, events: &[AuditEvent]) -> Result<(), AuditFileError> {
        let shared = &*self.shared;
        let mut guard = lock(&shared.writer).ok_or_else(|| self.poisoned())?;
        if shared.poison.get().is_some() {
            return Err(self.poisoned());
        }
        let w = &mut *guard;
        w.out.clear();
        let mut head = w.head;
        for event in events {
            encode_event(&mut w.line, head.next_seq, &head.prev, event);
            let hash = finish_line(&mut w.line);
            if w.line.len() > MAX_LINE {
                return Err(AuditFileError::RecordTooLarge {
                    len: w.line.len(),
                    max: MAX_LINE,
                });
            }
            w.out.extend_from_slice(w.line.as_bytes());
            head = Head {
                next_seq: head.next_seq.checked_add(1).ok_or_else(|| {
                    AuditFileError::DamagedTail {
                        path: shared.path.clone(),
                        end: 0,
                        reason: "sequence number exhausted".into(),
                    }
                })?,
                prev: hash,
            };
        }
        // O_APPEND: one write(2) in the normal case; write_all only loops on a short write.
        if let Err(e) = w.file.write_all(&w.out) {
            // The first failure is kept; a later one changes nothing.
            let _ = shared.poison.set(format!("write failed: {e}"));
            return Err(AuditFileError::Io {
                path: shared.path.clone(),
                op: "write",
                source: e,
            });
        }
        w.head = head;
        Ok(())
    }

    /// Marks the file dirty and, if `ticket`, asks for an fdatasync starting after now and
    /// returns its ticket.
    fn mark_dirty(&self, ticket: bool) -> Result<u64, AuditFileError> {
        let shared = &*self.shared;
        let mut st = lock(&shared.sync_state).ok_or_else(|| self.poisoned())?;
        let was_dirty = st.dirty;
        st.dirty = true;
        let t = if ticket {
            st.requested += 1;
            st.requested
        } else {
            st.requested
        };
        drop(st);
        if ticket || !was_dirty {
            shared.sync_cv.notify_one();
        }
        Ok(t)
    }

    /// Waits until an fdatasync covering `ticket` completed.
    async fn wait_synced(&self, ticket: u64) -> Result<(), AuditFileError> {
        let mut rx = self.shared.status.subscribe();
        let status = rx
            .wait_for(|s| s.done >= ticket || s.failed.is_some())
            .await
            .map_err(|_| AuditFileError::SyncThreadGone {
                path: self.shared.path.clone(),
            })?
            .clone();
        if status.done >= ticket {
            Ok(())
        } else {
            Err(self.poisoned())
        }
    }

    /// Appends events (see [`AuditSink::append`]), with this crate's error type.
    pub async fn append_events(&self, events: &[AuditEvent]) -> Result<(), AuditFileError> {
        if events.is_empty() {
            return Ok(());
        }
        self.write_events(events)?;
        match self.shared.durability {
            Durability::Interval(_) => {
                self.mark_dirty(false)?;
                Ok(())
            }
            Durability::Strict => {
                let ticket = self.mark_dirty(true)?;
                self.wait_synced(ticket).await
            }
        }
    }

    /// Forces an fdatasync of everything written so far and waits for it.
    pub async fn flush_log(&self) -> Result<(), AuditFileError> {
        if self.shared.poison.get().is_some() {
            return Err(self.poisoned());
        }
        let ticket = self.mark_dirty(true)?;
        self.wait_synced(ticket).await
    }

    /// Saves and removes a torn tail (bytes after the last newline, left by a crash mid-write)
    /// and records the recovery in the chain. Blocking; the log must not be open elsewhere.
    ///
    /// Steps: copy the torn bytes to `<path>.torn-<offset>` (mode 0600, fsynced), truncate the
    /// log at `offset` (fsynced), append a chained
    /// `{"seq":N,"kind":"recovered_torn_tail","offset":…,"len":…,"saved_to":"…",…}` record
    /// (fsynced). Nothing is dropped silently. If interrupted, run it again: it resumes (an
    /// existing save file with identical content is reused; a log already truncated whose
    /// `<path>.torn-<len>` exists gets its missing recovery record). Returns `Ok(None)` when
    /// there is nothing to recover.
    pub fn recover_torn_tail(
        path: impl AsRef<Path>,
    ) -> Result<Option<RecoveryReport>, AuditFileError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| AuditFileError::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        if !meta.is_file() {
            return Err(AuditFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        let file_len = meta.len();
        let (offset, len) = match find_tail(&file, file_len).map_err(io_err(path, "read"))? {
            Tail::Torn { offset, len } => (offset, len),
            Tail::Empty => return Ok(None),
            Tail::Line { .. } => {
                // Resume an interrupted recovery: truncated, but the record is missing.
                let saved_to = torn_path(path, file_len);
                match std::fs::metadata(&saved_to) {
                    Ok(m) => {
                        let seq = append_recovery(path, file, file_len, m.len(), &saved_to)?;
                        return Ok(Some(RecoveryReport {
                            offset: file_len,
                            len: m.len(),
                            saved_to,
                            seq,
                        }));
                    }
                    Err(_) => return Ok(None),
                }
            }
        };
        let saved_to = torn_path(path, offset);
        save_torn(path, &file, offset, len, &saved_to)?;
        file.set_len(offset).map_err(io_err(path, "truncate"))?;
        file.sync_all().map_err(io_err(path, "fsync"))?;
        let seq = append_recovery(path, file, offset, len, &saved_to)?;
        Ok(Some(RecoveryReport {
            offset,
            len,
            saved_to,
            seq,
        }))
    }

    #[cfg(test)]
    fn replace_file_for_test(&self, file: File) {
        if let Some(mut w) = lock(&self.shared.writer) {
            w.file = file;
        }
    }
}

fn torn_path(path: &Path, offset: u64) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".torn-{offset}"));
    PathBuf::from(s)
}

/// Copies `len` bytes at `offset` of `file` to `saved_to` (created 0600, fsynced), or checks
/// that an existing `saved_to` holds exactly those bytes.
fn save_torn(
    path: &Path,
    file: &File,
    offset: u64,
    len: u64,
    saved_to: &Path,
) -> Result<(), AuditFileError> {
    let mut src = file;
    src.seek(SeekFrom::Start(offset))
        .map_err(io_err(path, "seek"))?;
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(saved_to)
    {
        Ok(mut dst) => {
            let copied = std::io::copy(&mut src.take(len), &mut dst)
                .map_err(io_err(saved_to, "copy of the torn bytes"))?;
            if copied != len {
                return Err(AuditFileError::Io {
                    path: path.to_owned(),
                    op: "read of the torn bytes",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            dst.sync_all().map_err(io_err(saved_to, "fsync"))?;
            sync_parent_dir(saved_to)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A previous, interrupted recovery: reuse the file only if identical.
            let conflict = || AuditFileError::TornFileConflict {
                path: path.to_owned(),
                saved_to: saved_to.to_owned(),
            };
            let mut existing = File::open(saved_to).map_err(io_err(saved_to, "open"))?;
            let meta = existing.metadata().map_err(io_err(saved_to, "stat"))?;
            if meta.len() != len {
                return Err(conflict());
            }
            let mut a = vec![0u8; 64 * 1024];
            let mut b = vec![0u8; 64 * 1024];
            let mut src = src.take(len);
            loop {
                let n = src.read(&mut a).map_err(io_err(path, "read"))?;
                if n == 0 {
                    break;
                }
                let (ac, bc) = (a.get(..n), b.get_mut(..n));
                let (Some(ac), Some(bc)) = (ac, bc) else {
                    return Err(conflict());
                };
                existing.read_exact(bc).map_err(io_err(saved_to, "read"))?;
                if ac != bc {
                    return Err(conflict());
                }
            }
            existing.sync_all().map_err(io_err(saved_to, "fsync"))?;
            Ok(())
        }
        Err(e) => Err(io_err(saved_to, "create")(e)),
    }
}

/// Appends (and fsyncs) the recovery record to a log that ends with a newline at `offset`.
fn append_recovery(
    path: &Path,
    file: File,
    offset: u64,
    len: u64,
    saved_to: &Path,
) -> Result<u64, AuditFileError> {
    let head = match find_tail(&file, offset).map_err(io_err(path, "read"))? {
        Tail::Line { start, end } => head_from_tail(path, &file, start, end)?,
        Tail::Empty => {
            return Err(AuditFileError::DamagedTail {
                path: path.to_owned(),
                end: 0,
                reason: "no complete record before the torn bytes (not even a header): \
                         move the file away and start a new log"
                    .into(),
            });
        }
        Tail::Torn { offset, len } => {
            return Err(AuditFileError::TornTail {
                path: path.to_owned(),
                offset,
                len,
            });
        }
    };
    let mut line = String::with_capacity(512);
    encode_recovery(
        &mut line,
        head.next_seq,
        &head.prev,
        offset,
        len,
        &saved_to.to_string_lossy(),
        Timestamp::now(),
    );
    finish_line(&mut line);
    let mut f = file;
    f.seek(SeekFrom::Start(offset))
        .map_err(io_err(path, "seek"))?;
    f.write_all(line.as_bytes())
        .map_err(io_err(path, "write"))?;
    f.sync_all().map_err(io_err(path, "fsync"))?;
    Ok(head.next_seq)
}

/// Writes and fdatasyncs the header of a new (empty) log.
fn write_header(path: &Path, file: &File) -> Result<Head, AuditFileError> {
    let log_id: [u8; 16] = rand::random();
    let mut line = String::with_capacity(256);
    encode_header(&mut line, &log_id, Timestamp::now());
    let hash = finish_line(&mut line);
    let mut f = file;
    f.write_all(line.as_bytes())
        .map_err(io_err(path, "write"))?;
    f.sync_data().map_err(io_err(path, "fdatasync"))?;
    Ok(Head {
        next_seq: 1,
        prev: hash,
    })
}

/// The fdatasync thread: syncs when a ticket is pending (Strict appends, `flush`) or when the
/// file is dirty and the interval has passed since the last sync; publishes completed tickets.
fn sync_loop(shared: &Shared, interval: Option<Duration>) {
    let fail = |msg: String| {
        // The first failure is kept; a later one changes nothing.
        let _ = shared.poison.set(msg.clone());
        shared
            .status
            .send_modify(|s| s.failed = Some(Arc::from(msg.as_str())));
    };
    let Some(mut st) = lock(&shared.sync_state) else {
        fail("internal lock poisoned".into());
        return;
    };
    let mut last_sync = Instant::now();
    loop {
        let forced = st.requested > st.taken;
        let due = st.dirty && interval.is_some_and(|i| last_sync.elapsed() >= i);
        if forced || due || (st.shutdown && st.dirty) {
            let ticket = st.requested;
            st.taken = ticket;
            st.dirty = false;
            drop(st);
            let res = do_sync(shared);
            shared.syncs.fetch_add(1, Ordering::Relaxed);
            last_sync = Instant::now();
            match res {
                Ok(()) => shared.status.send_modify(|s| s.done = s.done.max(ticket)),
                // After a failed fdatasync the kernel may have dropped the dirty pages: the
                // file can no longer be trusted to hold what was written (fail closed).
                Err(e) => fail(format!("fdatasync failed: {e}")),
            }
            st = match lock(&shared.sync_state) {
                Some(s) => s,
                None => {
                    fail("internal lock poisoned".into());
                    return;
                }
            };
            continue;
        }
        if st.shutdown {
            return;
        }
        let waited = match (st.dirty, interval) {
            (true, Some(i)) => {
                let left = i.saturating_sub(last_sync.elapsed());
                shared
                    .sync_cv
                    .wait_timeout(st, left)
                    .map(|(g, _)| g)
                    .map_err(|_| ())
            }
            _ => shared.sync_cv.wait(st).map_err(|_| ()),
        };
        st = match waited {
            Ok(g) => g,
            Err(_) => {
                fail("internal lock poisoned".into());
                return;
            }
        };
    }
}

fn do_sync(shared: &Shared) -> std::io::Result<()> {
    #[cfg(test)]
    if shared.fail_next_sync.swap(false, Ordering::Relaxed) {
        return Err(std::io::Error::other("injected fdatasync failure"));
    }
    shared.sync_file.sync_data()
}

impl Drop for FileAuditLog {
    /// Stops the fdatasync thread after a last fdatasync of anything unsynced. Does not wait
    /// for it: call [`AuditSink::flush`] first to know it succeeded.
    fn drop(&mut self) {
        if let Some(mut st) = lock(&self.shared.sync_state) {
            st.shutdown = true;
        }
        self.shared.sync_cv.notify_one();
    }
}

#[async_trait]
impl AuditSink for FileAuditLog {
    fn name(&self) -> &str {
        "file"
    }

    async fn append(&self, events: &[AuditEvent]) -> Result<(), BackendError> {
        self.append_events(events).await.map_err(BackendError::from)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.flush_log().await.map_err(BackendError::from)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use crate::verify::verify;
    use phiseal::audit::{Action, Actor, Outcome};

    fn event(i: u32) -> AuditEvent {
        AuditEvent {
            time: Timestamp::now(),
            actor: Actor::named("svc"),
            action: Action::Encrypt,
            tenant: Some(phiseal::context::TenantId::new("t1").unwrap()),
            field: Some(Arc::from("ssn")),
            record: Some(Arc::from(format!("r{i}"))),
            key_version: Some(1),
            key_source: None,
            outcome: Outcome::Ok,
            request_id: Arc::from("req"),
        }
    }

    #[tokio::test]
    async fn write_failure_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
        log.append_events(&[event(1)]).await.unwrap();
        // /dev/full: every write fails with ENOSPC.
        let full = OpenOptions::new().append(true).open("/dev/full").unwrap();
        log.replace_file_for_test(full);
        let err = log.append_events(&[event(2)]).await.unwrap_err();
        assert!(
            matches!(err, AuditFileError::Io { op: "write", .. }),
            "{err}"
        );
        // Poisoned from now on, even though nothing else changed.
        let err = log.append_events(&[event(3)]).await.unwrap_err();
        assert!(matches!(err, AuditFileError::Poisoned { .. }), "{err}");
        assert!(err.to_string().contains("run `verify`"), "{err}");
        let be = AuditSink::append(&log, &[event(4)]).await.unwrap_err();
        assert!(be.to_string().contains("out of service"), "{be}");
        assert!(log.flush_log().await.is_err());
        drop(log);
        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.last_seq, Some(1));
    }

    #[tokio::test]
    async fn sync_failure_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
        log.append_events(&[event(1)]).await.unwrap();
        log.shared.fail_next_sync.store(true, Ordering::Relaxed);
        let err = log.append_events(&[event(2)]).await.unwrap_err();
        assert!(matches!(err, AuditFileError::Poisoned { .. }), "{err}");
        assert!(err.to_string().contains("fdatasync failed"), "{err}");
        let err = log.append_events(&[event(3)]).await.unwrap_err();
        assert!(matches!(err, AuditFileError::Poisoned { .. }), "{err}");
    }

    #[tokio::test]
    async fn interval_mode_syncs_in_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log =
            FileAuditLog::open(&path, Durability::Interval(Duration::from_millis(20))).unwrap();
        assert_eq!(log.sync_count(), 0);
        log.append_events(&[event(1)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(log.sync_count(), 1, "one sync for one dirty interval");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(log.sync_count(), 1, "no sync when nothing was written");
    }
}
