//! The checkpoint of a `rewrap --output` run: `<output>.checkpoint`, which binds the output to
//! the input lines and the flags it was made from, so that `--resume` refuses to continue it
//! from another input — or from the same rows in another order, which a plain line (the
//! ciphertext alone) cannot reveal: every line would still decrypt, on the wrong row.
//!
//! It holds a digest of the input lines done: SHA-256 over each line's length (u64,
//! big-endian) and bytes, without its line end. Before a batch's lines reach the output (and
//! before its failures reach the failure list) the checkpoint is replaced — a new file renamed
//! over it, both made durable — by one naming the lines done so far (`done`) and those the
//! batch brings them to (`next`). A crash can leave the output anywhere between the two: a
//! batch's lines may reach the disk in part before its fsync. A resumed run therefore accepts
//! the output's complete lines only at `next` (the batch was committed) or between `done` and
//! `next` (it was not: those lines are cut off and done again), and checks the input's digest
//! at that point before anything is written. Only digests and counts are stored, never input
//! content.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Defaults, Line, replace_durably};
use crate::error::CliError;

/// A number of input lines and the digest of the first that many.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Mark {
    lines: u64,
    input_sha256: String,
}

/// The flags that give the lines their context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Flags {
    tenant: String,
    field: Option<String>,
    record: Option<String>,
}

impl From<&Defaults> for Flags {
    fn from(d: &Defaults) -> Self {
        Flags {
            tenant: d.tenant.clone(),
            field: d.field.clone(),
            record: d.record.clone(),
        }
    }
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    #[serde(flatten)]
    flags: Flags,
    done: Mark,
    next: Option<Mark>,
}

/// Adds one input line (without its line end) to a digest of lines.
pub(super) fn digest_line(digest: &mut Sha256, line: &[u8]) {
    digest.update((line.len() as u64).to_be_bytes());
    digest.update(line);
}

/// Where a resumed run starts, as its checkpoint says.
#[derive(Debug)]
pub(super) struct ResumePoint {
    /// Input lines the output holds for good (checked against the input before use).
    pub(super) lines: u64,
    /// The digest the input's first `lines` lines must have.
    input_sha256: String,
}

impl ResumePoint {
    /// Whether `digest`, of the input's first [`ResumePoint::lines`] lines, is the recorded one.
    pub(super) fn matches(&self, digest: &Sha256) -> bool {
        hex::encode(digest.clone().finalize()) == self.input_sha256
    }
}

/// The checkpoint of a run into an output file.
#[derive(Debug)]
pub(super) struct Checkpoint {
    path: PathBuf,
    flags: Flags,
    /// The digest of the input lines done, and their number.
    digest: Sha256,
    lines: u64,
    /// The state the batch being written brings them to, once it is committed.
    pending: Option<(Sha256, u64)>,
}

impl Checkpoint {
    /// The checkpoint's path: the output's with `.checkpoint` appended.
    pub(super) fn path_for(output: &Path) -> PathBuf {
        let mut name = OsString::from(output.as_os_str());
        name.push(".checkpoint");
        PathBuf::from(name)
    }

    /// For a run into a new (empty) output: a checkpoint left from an earlier output of that
    /// name no longer describes anything and is removed.
    pub(super) fn start(output: &Path, defaults: &Defaults) -> Result<Self, CliError> {
        let path = Self::path_for(output);
        super::remove_stale(&path, "checkpoint")?;
        Ok(Self::at(path, defaults, Sha256::new(), 0))
    }

    /// A checkpoint continuing after `lines` input lines whose digest is `digest`.
    pub(super) fn resumed(output: &Path, defaults: &Defaults, digest: Sha256, lines: u64) -> Self {
        Self::at(Self::path_for(output), defaults, digest, lines)
    }

    fn at(path: PathBuf, defaults: &Defaults, digest: Sha256, lines: u64) -> Self {
        Checkpoint {
            path,
            flags: Flags::from(defaults),
            digest,
            lines,
            pending: None,
        }
    }

    /// For `--resume` into an output holding `complete` lines: where to resume, from the
    /// checkpoint written by the run that made the output, which must have used the same
    /// flags. An output with lines and no checkpoint is refused.
    pub(super) fn resume_point(
        output: &Path,
        defaults: &Defaults,
        complete: u64,
    ) -> Result<ResumePoint, CliError> {
        let path = Self::path_for(output);
        let shown = path.display();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && complete == 0 => {
                return Ok(ResumePoint {
                    lines: 0,
                    input_sha256: hex::encode(Sha256::new().finalize()),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CliError::Failed(format!(
                    "--resume: {} holds {complete} lines but has no checkpoint ({shown}), so \
                     the input cannot be checked against it: rewrap into a new --output \
                     instead",
                    output.display()
                )));
            }
            Err(e) => return Err(CliError::io(format!("cannot read {shown}"))(e)),
        };
        let saved: Saved = serde_json::from_str(&text).map_err(|_| {
            CliError::Failed(format!(
                "--resume: {shown} is not a rewrap checkpoint: rewrap into a new --output"
            ))
        })?;
        if saved.flags != Flags::from(defaults) {
            return Err(CliError::Usage(format!(
                "--resume: the interrupted run used --tenant {} --field {} --record {}: resume \
                 with the same flags",
                saved.flags.tenant,
                saved.flags.field.as_deref().unwrap_or("(none)"),
                saved.flags.record.as_deref().unwrap_or("(none)"),
            )));
        }
        let mark = match saved.next {
            // The batch announced last was committed.
            Some(next) if next.lines == complete => next,
            // It was not, or in part: the output goes back to the lines done before it.
            Some(next) if (saved.done.lines..next.lines).contains(&complete) => saved.done,
            None if saved.done.lines == complete => saved.done,
            next => {
                return Err(CliError::Failed(format!(
                    "--resume: {} holds {complete} complete lines, but its checkpoint {shown} \
                     says {}{}: the output was changed by something other than this rewrap; \
                     rewrap into a new --output",
                    output.display(),
                    saved.done.lines,
                    next.map(|n| format!(" (or up to {} while a batch was written)", n.lines))
                        .unwrap_or_default(),
                )));
            }
        };
        Ok(ResumePoint {
            lines: mark.lines,
            input_sha256: mark.input_sha256,
        })
    }

    /// Records, durably, that `batch` is about to be written after the lines done.
    pub(super) fn prepare(&mut self, batch: &[Line]) -> Result<(), CliError> {
        let mut next = self.digest.clone();
        for line in batch {
            digest_line(&mut next, &line.raw);
        }
        let next_lines = self.lines + batch.len() as u64;
        let saved = Saved {
            flags: self.flags.clone(),
            done: Mark {
                lines: self.lines,
                input_sha256: hex::encode(self.digest.clone().finalize()),
            },
            next: Some(Mark {
                lines: next_lines,
                input_sha256: hex::encode(next.clone().finalize()),
            }),
        };
        let text = serde_json::to_string(&saved)
            .map_err(|e| CliError::Failed(format!("cannot encode the checkpoint: {e}")))?;
        replace_durably(&self.path, format!("{text}\n").as_bytes())?;
        self.pending = Some((next, next_lines));
        Ok(())
    }

    /// The batch [`Checkpoint::prepare`] announced is committed to the output.
    pub(super) fn committed(&mut self) {
        if let Some((digest, lines)) = self.pending.take() {
            self.digest = digest;
            self.lines = lines;
        }
    }
}

/// Writes the checkpoint of an output made from `done` (input lines, without line ends) by a
/// run with `defaults`, no batch under way.
#[cfg(test)]
pub(super) fn write_for_test(output: &Path, defaults: &Defaults, done: &[&[u8]]) {
    let mut digest = Sha256::new();
    for line in done {
        digest_line(&mut digest, line);
    }
    let saved = Saved {
        flags: Flags::from(defaults),
        done: Mark {
            lines: done.len() as u64,
            input_sha256: hex::encode(digest.finalize()),
        },
        next: None,
    };
    #[allow(clippy::unwrap_used)]
    std::fs::write(
        Checkpoint::path_for(output),
        serde_json::to_string(&saved).unwrap(),
    )
    .unwrap();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn flags(field: Option<&str>) -> Defaults {
        Defaults {
            tenant: "acme".into(),
            field: field.map(Into::into),
            record: None,
        }
    }

    fn line(number: u64, raw: &[u8]) -> Line {
        Line {
            number,
            raw: raw.to_vec(),
            parsed: super::super::Parsed::Blank,
        }
    }

    #[test]
    fn a_resume_point_is_where_the_output_can_be_and_needs_the_same_flags() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let d = flags(Some("ssn"));
        // No checkpoint: only an empty output can be resumed.
        assert_eq!(Checkpoint::resume_point(&out, &d, 0).unwrap().lines, 0);
        let err = Checkpoint::resume_point(&out, &d, 1).unwrap_err();
        assert!(err.to_string().contains("has no checkpoint"), "{err}");

        // Two lines committed, then a batch of three announced.
        let mut checkpoint = Checkpoint::start(&out, &d).unwrap();
        checkpoint.prepare(&[line(1, b"a"), line(2, b"b")]).unwrap();
        checkpoint.committed();
        checkpoint
            .prepare(&[line(3, b"c"), line(4, b""), line(5, b"e")])
            .unwrap();
        let digest_of = |lines: &[&[u8]]| {
            let mut digest = Sha256::new();
            for l in lines {
                digest_line(&mut digest, l);
            }
            digest
        };
        for (complete, expected) in [(2, 2), (3, 2), (4, 2), (5, 5)] {
            let point = Checkpoint::resume_point(&out, &d, complete).unwrap();
            assert_eq!(point.lines, expected, "{complete} complete lines");
            let lines: [&[u8]; 5] = [b"a", b"b", b"c", b"", b"e"];
            assert!(point.matches(&digest_of(&lines[..expected as usize])));
            // The same lines in another order: no match.
            let reordered: [&[u8]; 5] = [b"b", b"a", b"c", b"", b"e"];
            assert!(!point.matches(&digest_of(&reordered[..expected as usize])));
        }
        for complete in [0, 1, 6] {
            let err = Checkpoint::resume_point(&out, &d, complete).unwrap_err();
            assert!(
                err.to_string().contains("changed by something other"),
                "{err}"
            );
        }
        // Other flags: refused.
        let err = Checkpoint::resume_point(&out, &flags(Some("name")), 2).unwrap_err();
        assert!(
            err.to_string().contains("resume with the same flags"),
            "{err}"
        );
        // Line ends are not part of a line: "ab" then "" differs from "a" then "b".
        assert!(!point_matches(
            &digest_of(&[b"ab", b""]),
            &digest_of(&[b"a", b"b"])
        ));
        // A new run removes the stale checkpoint.
        Checkpoint::start(&out, &d).unwrap();
        assert!(!Checkpoint::path_for(&out).exists());
    }

    fn point_matches(a: &Sha256, b: &Sha256) -> bool {
        a.clone().finalize() == b.clone().finalize()
    }
}
