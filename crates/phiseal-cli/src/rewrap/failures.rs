//! The failure list of a `rewrap --output` run: `<output>.failed`, one JSON line per input line
//! that failed (`{"line":N,"kind":"…"}`; line numbers and error kinds only, never content).
//!
//! A failed line is written to the output unchanged, so a run resumed after it skips it like
//! any other line already done. The list lets the resumed run still count it: its summary and
//! exit code (7) cover the failures of the runs before it. Each batch's failures are appended
//! and fsynced before the batch's output lines are written, so the list never misses a failed
//! line that the output holds. A resumed run first rewrites the list with only the entries of
//! lines the output holds (entries past its end, from a crash between the two, belong to lines
//! it does again; a torn last entry is dropped), each line once.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::sync_parent;
use crate::error::CliError;

/// One entry of the list.
#[derive(Deserialize)]
struct Entry {
    line: u64,
    kind: String,
}

/// The list's lines for `entries`.
fn entries_text(entries: &[(u64, &str)]) -> String {
    let mut text = String::new();
    for (line, kind) in entries {
        text.push_str(&serde_json::json!({ "line": line, "kind": kind }).to_string());
        text.push('\n');
    }
    text
}

/// The failure list next to an output file.
pub(super) struct FailureList {
    path: PathBuf,
    /// Opened on the first failure of this run.
    file: Option<File>,
    /// Distinct lines of earlier runs that failed, among those the output already holds.
    earlier: u64,
}

impl FailureList {
    /// The list's path: the output's with `.failed` appended.
    pub(super) fn path_for(output: &Path) -> PathBuf {
        let mut name = OsString::from(output.as_os_str());
        name.push(".failed");
        PathBuf::from(name)
    }

    /// For a run into a new (empty) output: a list left from an earlier output of that name
    /// no longer describes anything and is removed.
    pub(super) fn start(output: &Path) -> Result<Self, CliError> {
        let path = Self::path_for(output);
        super::remove_stale(&path, "failure list")?;
        Ok(Self {
            path,
            file: None,
            earlier: 0,
        })
    }

    /// For a run resumed after `done` lines: keeps (and counts) the earlier failures among
    /// them, rewriting the list with only those. No list means that no earlier run recorded
    /// a failure.
    pub(super) fn resume(output: &Path, done: u64) -> Result<Self, CliError> {
        let path = Self::path_for(output);
        let shown = path.display().to_string();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path,
                    file: None,
                    earlier: 0,
                });
            }
            Err(e) => return Err(CliError::io(format!("cannot open {shown}"))(e)),
        };
        let mut lines = std::collections::BTreeMap::new();
        let mut reader = BufReader::new(file);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let n = reader
                .read_until(b'\n', &mut raw)
                .map_err(CliError::io(format!("cannot read {shown}")))?;
            if n == 0 {
                break;
            }
            match serde_json::from_slice::<Entry>(&raw) {
                Ok(entry) => {
                    if (1..=done).contains(&entry.line) {
                        lines.insert(entry.line, entry.kind);
                    }
                }
                // A torn last entry (a crash while it was written): its batch never reached
                // the output, and the resumed run does those lines again.
                Err(_) if raw.last() != Some(&b'\n') => break,
                Err(_) => {
                    return Err(CliError::Failed(format!(
                        "{shown} is not a rewrap failure list (a line is not \
                         {{\"line\":N,\"kind\":\"…\"}}): move it away to resume without \
                         counting earlier failures"
                    )));
                }
            }
        }
        let earlier = lines.len() as u64;
        let kept: Vec<(u64, &str)> = lines.iter().map(|(l, k)| (*l, k.as_str())).collect();
        let mut list = Self {
            path,
            file: None,
            earlier,
        };
        list.rewrite(&kept)?;
        Ok(list)
    }

    /// Replaces the list with `entries` (a new file renamed over it, both made durable).
    fn rewrite(&mut self, entries: &[(u64, &str)]) -> Result<(), CliError> {
        super::replace_durably(&self.path, entries_text(entries).as_bytes())
    }

    /// Lines that failed in earlier runs (see [`FailureList::resume`]).
    pub(super) fn earlier(&self) -> u64 {
        self.earlier
    }

    /// Appends a batch's failures (line number, error kind) and makes them durable.
    pub(super) fn record(&mut self, failures: &[(u64, &str)]) -> Result<(), CliError> {
        if failures.is_empty() {
            return Ok(());
        }
        let shown = self.path.display().to_string();
        let text = entries_text(failures);
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let file = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .custom_flags(super::no_follow())
                    .open(&self.path)
                    .map_err(CliError::io(format!(
                        "cannot open {shown} (a symlink is not followed)"
                    )))?;
                let meta = file
                    .metadata()
                    .map_err(CliError::io(format!("cannot stat {shown}")))?;
                super::check_own_private(&meta, &shown)?;
                // Its directory entry, too, must survive a crash that the output survives.
                sync_parent(&self.path);
                self.file.insert(file)
            }
        };
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(CliError::io(format!("cannot write {shown}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn earlier_failures_are_counted_once_and_only_within_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        assert_eq!(FailureList::resume(&out, 10).unwrap().earlier(), 0);

        let mut list = FailureList::start(&out).unwrap();
        list.record(&[(3, "decryption_failed"), (7, "too_large")])
            .unwrap();
        list.record(&[]).unwrap();
        // A crash between the list and the output: line 12 is recorded but not in the output;
        // the resumed run records it again.
        list.record(&[(12, "permission_denied")]).unwrap();
        drop(list);
        assert_eq!(FailureList::resume(&out, 10).unwrap().earlier(), 2);
        let mut again = FailureList::resume(&out, 11).unwrap();
        again.record(&[(12, "permission_denied")]).unwrap();
        drop(again);
        assert_eq!(FailureList::resume(&out, 12).unwrap().earlier(), 3);
        let path = FailureList::path_for(&out);
        // Each resume keeps only the entries of lines the output holds, once each.
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"kind\":\"decryption_failed\",\"line\":3}\n{\"kind\":\"too_large\",\"line\":7}\n\
             {\"kind\":\"permission_denied\",\"line\":12}\n"
        );
        // A resume after a crash that lost line 12's output (it failed before, and succeeds
        // when done again): its entry goes, and a later resume does not count it.
        assert_eq!(FailureList::resume(&out, 11).unwrap().earlier(), 2);
        assert_eq!(FailureList::resume(&out, 12).unwrap().earlier(), 2);

        // A torn last entry is dropped, and entries appended after it stay readable.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"line\":9,\"ki");
        std::fs::write(&path, &text).unwrap();
        let mut list = FailureList::resume(&out, 12).unwrap();
        assert_eq!(list.earlier(), 2);
        list.record(&[(13, "decryption_failed")]).unwrap();
        drop(list);
        assert_eq!(FailureList::resume(&out, 13).unwrap().earlier(), 3);
        // Garbage before the end is refused.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("garbage\n{text}")).unwrap();
        assert!(FailureList::resume(&out, 12).is_err());

        // A new run removes the stale list.
        FailureList::start(&out).unwrap();
        assert!(!path.exists());
    }
}
