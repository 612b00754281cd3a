//! `audit verify`, `audit export` and `audit recover`: work on the audit log file directly
//! (not through the daemon).

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use phiseal_audit_file::{
    AuditFileError, FileAuditLog, VerifyOptions, VerifyReport, export_tenant_with, verify_with,
};
use serde_json::json;

use crate::cli::{AuditCommand, ExportArgs, GlobalArgs, LogArgs, VerifyArgs};
use crate::error::CliError;
use crate::output::{printable, report, stderr_note};
use crate::partial::Partial;

/// The data directory when neither `--data-dir` nor `PHISEAL_DATA_DIR` is given.
pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/phiseal";

/// Environment variable naming the data directory.
pub(crate) const DATA_DIR_ENV: &str = "PHISEAL_DATA_DIR";

/// Runs an `audit` subcommand.
pub(crate) fn run(cmd: AuditCommand, global: &GlobalArgs) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Verify(args) => verify_log(&args, global.json),
        AuditCommand::Export(args) => export(&args, global.json),
        AuditCommand::Recover(args) => recover(&args, global.json),
    }
}

/// `audit recover`: saves and cuts off a torn tail, recording it in the chain.
fn recover(args: &LogArgs, json: bool) -> Result<(), CliError> {
    let path = log_path_from_env(args);
    let recovered = FileAuditLog::recover_torn_tail(&path)?;
    let (value, human) = match &recovered {
        None => (
            json!({"log": path.display().to_string(), "recovered": false}),
            format!(
                "audit log: {}
no torn tail: nothing to recover",
                path.display()
            ),
        ),
        Some(r) => (
            json!({
                "log": path.display().to_string(),
                "recovered": true,
                "offset": r.offset,
                "len": r.len,
                "saved_to": r.saved_to.display().to_string(),
                "seq": r.seq,
            }),
            format!(
                "audit log: {}
torn tail of {} bytes at offset {} saved to {} and cut off
recorded as seq {} (recovered_torn_tail); run `phiseal audit verify` next",
                path.display(),
                r.len,
                r.offset,
                r.saved_to.display(),
                r.seq
            ),
        ),
    };
    report(json, &value, &human)
}

/// The log file: `--log`, else `audit.log` in `--data-dir`, `PHISEAL_DATA_DIR` or the default.
fn log_path(args: &LogArgs, env: Option<std::ffi::OsString>) -> PathBuf {
    if let Some(log) = &args.log {
        return log.clone();
    }
    let dir = args
        .data_dir
        .clone()
        .or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    dir.join("audit.log")
}

fn log_path_from_env(args: &LogArgs) -> PathBuf {
    log_path(args, std::env::var_os(DATA_DIR_ENV))
}

/// A log that cannot be opened because it does not exist, in a directory that does (and
/// holds none of its closed segments, or it would have been read): it may have been deleted,
/// which is a problem of the log (exit 8), not a wrong path (a missing directory: exit 1).
fn deleted_log(path: &Path, error: AuditFileError) -> CliError {
    let missing = matches!(
        &error,
        AuditFileError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound
    );
    match path.parent() {
        Some(dir) if missing && dir.is_dir() => CliError::AuditProblems {
            path: path.to_owned(),
            detail: format!(
                "does not exist, although its directory {} does: the log may have been \
                 deleted (if the log is elsewhere, give --log or --data-dir)",
                dir.display()
            ),
        },
        _ => CliError::Audit(error),
    }
}

fn verify_log(args: &VerifyArgs, json: bool) -> Result<(), CliError> {
    let path = log_path_from_env(&args.log);
    let mut options = VerifyOptions::default();
    if let Some(anchor) = args.anchor {
        options = options.anchor(anchor);
    }
    if let Some(after) = args.after {
        options = options.after(after);
    }
    let report_ = verify_with(&path, options).map_err(|e| deleted_log(&path, e))?;
    report(
        json,
        &verify_json(&path, &report_, args.segments_only),
        &verify_text(&path, &report_, args.segments_only),
    )?;
    if intact(&report_, args.segments_only) {
        return Ok(());
    }
    let mut detail = format!("verification failed: {} problem(s)", report_.problem_count);
    if report_.torn_tail.is_some() {
        detail.push_str(", torn tail");
    }
    if report_.active_missing && !args.segments_only {
        detail.push_str(
            ", the active log file is missing (--segments-only for an archive of closed segments)",
        );
    }
    Err(CliError::AuditProblems { path, detail })
}

/// `audit verify --json`.
fn verify_json(path: &std::path::Path, r: &VerifyReport, segments_only: bool) -> serde_json::Value {
    let problems: Vec<serde_json::Value> = r
        .problems
        .iter()
        .map(|p| {
            json!({
                "kind": p.kind.as_str(),
                "file": p.path.display().to_string(),
                "line": p.line,
                "offset": p.offset,
                "detail": p.detail,
            })
        })
        .collect();
    json!({
        "log": path.display().to_string(),
        "files": r.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "active_missing": r.active_missing,
        "starts_after": r.starts_after,
        "intact": intact(r, segments_only),
        "records": r.records,
        "last_seq": r.last_seq,
        "head_hash": r.head_hash,
        "torn_tail": r.torn_tail.map(|(offset, len)| json!({ "offset": offset, "len": len })),
        "problem_count": r.problem_count,
        "problems": problems,
    })
}

/// `audit verify` for a person.
/// Whether the log verified: intact, or for `--segments-only` its closed segments.
fn intact(r: &VerifyReport, segments_only: bool) -> bool {
    r.is_intact() || (segments_only && r.segments_intact())
}

fn verify_text(path: &std::path::Path, r: &VerifyReport, segments_only: bool) -> String {
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
    let mut out = format!(
        "audit log: {}\nrecords checked: {}\nlast seq: {}\nhead hash: {}\n",
        path.display(),
        r.records,
        or_none(r.last_seq.map(|s| s.to_string())),
        or_none(r.head_hash.clone()),
    );
    if let Some(after) = r.starts_after {
        let _ = writeln!(
            out,
            "starts after record: {after} (the log's earlier closed segments are not here)"
        );
    }
    if r.active_missing {
        let _ = writeln!(
            out,
            "files: {} closed segments; the active file is missing (an archive of segments, \
             or deleted)",
            r.files.len()
        );
    } else if r.files.len() > 1 {
        let _ = writeln!(
            out,
            "files: {} ({} closed segments, then the active file)",
            r.files.len(),
            r.files.len() - 1
        );
    }
    let torn = r.torn_tail.map(|(offset, len)| {
        format!("{len} bytes at offset {offset} (a crash mid-write, or a write in progress)")
    });
    let _ = writeln!(out, "torn tail: {}", or_none(torn));
    let _ = writeln!(out, "problems: {}", r.problem_count);
    for p in &r.problems {
        // Problems in a closed segment name it; those in the active file need no name.
        let file = if p.path.as_path() == path {
            String::new()
        } else {
            format!(
                "{} ",
                printable(&p.path.file_name().unwrap_or_default().to_string_lossy())
            )
        };
        let _ = writeln!(
            out,
            "  {file}line {}: {}: {}",
            p.line,
            p.kind.as_str(),
            printable(&p.detail)
        );
    }
    let hidden = r.problem_count.saturating_sub(r.problems.len() as u64);
    if hidden > 0 {
        let _ = writeln!(out, "  … and {hidden} more");
    }
    out.push_str(if intact(r, segments_only) {
        "result: intact"
    } else {
        "result: NOT INTACT"
    });
    out
}

fn export(args: &ExportArgs, json: bool) -> Result<(), CliError> {
    // A tenant id no tenant can have exports nothing, which must not read as "no access".
    if let Err(e) = phiseal::TenantId::new(&args.tenant) {
        return Err(CliError::Usage(format!("audit export: --tenant: {e}")));
    }
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        return Err(CliError::Failed(
            "audit export: --since must be before --until".to_owned(),
        ));
    }
    match &args.output {
        // Complete or not at all: a failure found late in the log (a torn tail, a missing
        // active file, a problem in the last segment), or a signal, leaves no
        // plausible-looking partial file; the summary is printed once the file is in place.
        Some(target) => {
            let file = Partial::create(target)?;
            let partial = file.path().to_owned();
            let work_args = args.clone();
            crate::block_on(async move {
                let interrupted = crate::partial::interruption();
                let work = tokio::task::spawn_blocking(move || {
                    let mut file = file;
                    let mut note = None;
                    export_to(&work_args, &mut file, &mut note)?;
                    file.commit()?;
                    Ok::<_, CliError>(note)
                });
                tokio::select! {
                    biased;
                    done = work => {
                        let note = done.map_err(|_| {
                            CliError::Failed("audit export: the export failed".to_owned())
                        })??;
                        if let Some(note) = note {
                            stderr_note(json, &note);
                        }
                        Ok(())
                    }
                    () = interrupted => {
                        // (The export thread ends with the process; its file is gone.)
                        let _ = std::fs::remove_file(&partial);
                        Err(CliError::Failed(
                            "audit export: interrupted; no output written".to_owned(),
                        ))
                    }
                }
            })
        }
        None => {
            let mut note = None;
            let result = export_to(args, &mut std::io::stdout().lock(), &mut note);
            if let Some(note) = note {
                stderr_note(json, &note);
            }
            result
        }
    }
}

/// [`export`] into `out`; `note` gets the summary once the records are written (before the
/// checks that may still fail the export).
fn export_to(
    args: &ExportArgs,
    out: &mut dyn Write,
    note: &mut Option<String>,
) -> Result<(), CliError> {
    let path = log_path_from_env(&args.log);
    let mut out = BufWriter::new(out);
    let mut options = VerifyOptions::default();
    if let Some(after) = args.after {
        options = options.after(after);
    }
    let result = export_tenant_with(
        &path,
        &args.tenant,
        args.since,
        args.until,
        options,
        &mut out,
    )
    .map_err(|e| deleted_log(&path, e))?;
    out.flush().map_err(CliError::io("writing the export"))?;
    let recovered = match result.recoveries.as_slice() {
        [] => String::new(),
        seqs => format!(
            "; the log records {} recovery(ies) from a crash (seq {}): records of any tenant \
             acknowledged just before it may be missing",
            seqs.len(),
            seqs.iter()
                .take(5)
                .map(u64::to_string)
                .chain((seqs.len() > 5).then(|| "…".to_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let none_found = if result.exported == 0 {
        "; no record in this range names this tenant (ids are case-sensitive: check the \
         spelling)"
    } else {
        ""
    };
    let segments_only = if result.active_missing {
        "; closed segments only: the active log file is missing"
    } else {
        ""
    };
    *note = Some(format!(
        "audit export: {} records of tenant '{}' exported; {} records verified (last seq \
             {}, head hash {}){none_found}{recovered}{segments_only}",
        result.exported,
        printable(&args.tenant),
        result.records_scanned,
        result
            .last_seq
            .map_or_else(|| "none".to_owned(), |s| s.to_string()),
        result.head_hash.as_deref().unwrap_or("none"),
    ));
    if result.active_missing && !args.segments_only {
        return Err(CliError::AuditProblems {
            path,
            detail: "has no active log file, only closed segments: the export lacks whatever \
                     was in the active file (it could have been deleted); for an archive of \
                     closed segments, run again with --segments-only"
                .to_owned(),
        });
    }
    match result.torn_tail {
        None => Ok(()),
        Some((offset, len)) => Err(CliError::AuditProblems {
            path,
            detail: format!(
                "ends in a torn record of {len} bytes at offset {offset}, which was not \
                 exported (a crash mid-write, or a write in progress: re-run to tell)"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use phiseal_audit_file::Problem;

    use super::*;

    #[test]
    fn log_path_precedence() {
        let args = |data_dir: Option<&str>, log: Option<&str>| LogArgs {
            data_dir: data_dir.map(PathBuf::from),
            log: log.map(PathBuf::from),
        };
        assert_eq!(
            log_path(&args(None, Some("/x/a.log")), Some("/env".into())),
            PathBuf::from("/x/a.log")
        );
        assert_eq!(
            log_path(&args(Some("/d"), None), Some("/env".into())),
            PathBuf::from("/d/audit.log")
        );
        assert_eq!(
            log_path(&args(None, None), Some("/env".into())),
            PathBuf::from("/env/audit.log")
        );
        assert_eq!(
            log_path(&args(None, None), Some("".into())),
            PathBuf::from("/var/lib/phiseal/audit.log")
        );
        assert_eq!(
            log_path(&args(None, None), None),
            PathBuf::from("/var/lib/phiseal/audit.log")
        );
    }

    #[test]
    fn report_formats() {
        let path = std::path::Path::new("/l/audit.log");
        let segment =
            std::path::PathBuf::from("/l/audit.log.00000000000000000001-00000000000000000003");
        let r = VerifyReport {
            files: vec![segment.clone(), path.to_owned()],
            active_missing: false,
            starts_after: None,
            records: 10,
            last_seq: Some(9),
            head_hash: Some("ab".repeat(32)),
            torn_tail: Some((100, 7)),
            problems: vec![
                Problem {
                    path: path.to_owned(),
                    line: 4,
                    offset: 50,
                    kind: phiseal_audit_file::ProblemKind::ChainBreak,
                    detail: "prev mismatch".into(),
                },
                Problem {
                    path: segment,
                    line: 2,
                    offset: 9,
                    kind: phiseal_audit_file::ProblemKind::HashMismatch,
                    detail: "edited".into(),
                },
            ],
            problem_count: 2,
        };
        let text = verify_text(path, &r, false);
        assert!(text.contains("records checked: 10"), "{text}");
        assert!(text.contains("last seq: 9"), "{text}");
        assert!(text.contains("torn tail: 7 bytes at offset 100"), "{text}");
        assert!(
            text.contains("  line 4: chain_break: prev mismatch"),
            "{text}"
        );
        assert!(
            text.contains("files: 2 (1 closed segments, then the active file)")
                && text.contains(
                    "  audit.log.00000000000000000001-00000000000000000003 line 2: hash_mismatch: \
                     edited"
                ),
            "{text}"
        );
        assert!(text.ends_with("result: NOT INTACT"), "{text}");
        let value = verify_json(path, &r, false);
        assert_eq!(value["intact"], false);
        assert_eq!(value["problems"][0]["kind"], "chain_break");
        assert_eq!(
            value["problems"][1]["file"],
            "/l/audit.log.00000000000000000001-00000000000000000003"
        );
        assert_eq!(value["files"][1], "/l/audit.log");
        assert_eq!(value["torn_tail"]["len"], 7);
    }
}
