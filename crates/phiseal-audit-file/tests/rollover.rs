//! Rollover: the active file is closed as a segment once it reaches the rollover size, the
//! chain continues in a new file, verify and export read all files as one log, tampering with
//! segments is detected, and a rollover interrupted by a crash is cleaned up on open.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use phiseal::audit::{Action, Actor, AuditEvent, AuditSink, KeySource, Outcome};
use phiseal::context::TenantId;
use phiseal_audit_file::{
    Durability, FileAuditLog, LogOptions, ProblemKind, VerifyReport, export_tenant, verify,
};

const ROLLOVER: u64 = 4096;

fn event(i: u64) -> AuditEvent {
    AuditEvent {
        time: Timestamp::now(),
        actor: Actor {
            identity: Arc::from("svc-billing"),
            uid: Some(1000),
            pid: Some(4242),
        },
        action: Action::Decrypt,
        tenant: Some(TenantId::new(if i.is_multiple_of(2) { "acme" } else { "other" }).unwrap()),
        field: Some(Arc::from("ssn")),
        record: Some(Arc::from(format!("patient-{i}"))),
        key_version: Some(3),
        from_key_version: None,
        key_source: Some(KeySource::Cache),
        root_key: None,
        outcome: Outcome::Ok,
        request_id: Arc::from(format!("req-{i}")),
    }
}

fn options() -> LogOptions {
    LogOptions::default().rollover_at(ROLLOVER)
}

/// Appends events `from..to` one call each, then flushes.
async fn append(log: &FileAuditLog, from: u64, to: u64) {
    for i in from..to {
        log.append(&[event(i)]).await.unwrap();
    }
    log.flush().await.unwrap();
}

/// The closed segments next to `log`, by name, with the seq ranges their names give.
fn segments(log: &Path) -> Vec<(u64, u64, PathBuf)> {
    let name = log.file_name().unwrap().to_str().unwrap().to_owned();
    let mut out: Vec<(u64, u64, PathBuf)> = std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let file = e.file_name().into_string().unwrap();
            let rest = file.strip_prefix(&format!("{name}."))?;
            let (a, b) = rest.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Verifies the log: intact, ending at record `last_seq`.
fn assert_intact(path: &Path, last_seq: u64) -> VerifyReport {
    let report = verify(path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.last_seq, Some(last_seq));
    report
}

fn kinds(report: &VerifyReport) -> Vec<ProblemKind> {
    report.problems.iter().map(|p| p.kind).collect()
}

/// A directory with a log of `n` records in one file (no rollover size).
async fn one_file_log(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    append(&log, 0, n).await;
    drop(log);
    (dir, path)
}

/// A private directory with a log of `n` records rolled over at [`ROLLOVER`] bytes.
async fn rolled_log(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    append(&log, 0, n).await;
    drop(log);
    (dir, path)
}

#[tokio::test]
async fn the_log_rolls_over_into_segments_that_verify_and_export_read_as_one_chain() {
    for durability in [
        Durability::Interval(Duration::from_millis(20)),
        Durability::Strict,
        Durability::buffered(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = FileAuditLog::open_with(&path, durability, options()).unwrap();
        append(&log, 0, 300).await;

        let segs = segments(&path);
        // Buffered mode packs the calls queued together into batch lines (~20 bytes a record
        // here): fewer, larger writes.
        let expected = if durability == Durability::buffered() {
            1
        } else {
            10
        };
        assert!(
            segs.len() >= expected,
            "{durability:?}: {} segments",
            segs.len()
        );
        // Contiguous ranges from record 1, each segment at least the rollover size, private.
        let mut next = 1;
        for (first, last, seg) in &segs {
            assert_eq!(*first, next, "{durability:?}: {}", seg.display());
            assert!(last >= first);
            next = last + 1;
            let meta = std::fs::metadata(seg).unwrap();
            assert!(meta.len() >= ROLLOVER, "{}", seg.display());
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        // The active file continues after the last segment, with a continuation header.
        let active = std::fs::read_to_string(&path).unwrap();
        let header: serde_json::Value =
            serde_json::from_str(active.lines().next().unwrap()).unwrap();
        assert_eq!(header["kind"], "header");
        assert_eq!(header["seq"], next - 1);
        assert_ne!(header["prev"], "0".repeat(64));
        assert!(!dir.path().join("audit.log.next").exists());

        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{durability:?}: {:?}", report.problems);
        assert_eq!(report.last_seq, Some(300));
        assert_eq!(report.files.len(), segs.len() + 1);
        assert_eq!(report.files.last().unwrap(), &path);

        // Export reads every file: all of one tenant's records, in order.
        let mut out = Vec::new();
        let exported = export_tenant(&path, "acme", None, None, &mut out).unwrap();
        assert_eq!(exported.exported, 150);
        assert_eq!(exported.last_seq, Some(300));
        let seqs: Vec<u64> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, (1..=300).step_by(2).collect::<Vec<u64>>());

        // Closed segments are never written again; a reopened log continues the chain.
        let before: Vec<_> = segs
            .iter()
            .map(|(_, _, p)| std::fs::read(p).unwrap())
            .collect();
        drop(log);
        let log = FileAuditLog::open_with(&path, durability, options()).unwrap();
        append(&log, 300, 400).await;
        drop(log);
        for ((_, _, p), bytes) in segs.iter().zip(&before) {
            assert!(
                &std::fs::read(p).unwrap() == bytes,
                "{} changed",
                p.display()
            );
        }
        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!(report.last_seq, Some(400));
        assert!(segments(&path).len() > segs.len());
    }
}

#[tokio::test]
async fn without_a_rollover_size_the_log_stays_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    append(&log, 0, 100).await;
    drop(log);
    assert!(segments(&path).is_empty());
    assert!(std::fs::metadata(&path).unwrap().len() > 5 * ROLLOVER);
    let report = verify(&path).unwrap();
    assert!(report.is_intact() && report.files == [path.clone()]);
}

/// Copies the log's directory (segments and active file) to a fresh one.
fn copy_log(path: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(path.parent().unwrap()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let copy = dir.path().join(path.file_name().unwrap());
    (dir, copy)
}

#[tokio::test]
async fn missing_foreign_renamed_and_changed_segments_are_detected() {
    let (_dir, path) = rolled_log(200).await;
    let segs = segments(&path);
    assert!(segs.len() >= 5);
    assert!(verify(&path).unwrap().is_intact());

    // A middle segment deleted: the next file's header does not link.
    let (_d, copy) = copy_log(&path);
    let gone = &segments(&copy)[2];
    std::fs::remove_file(&gone.2).unwrap();
    let report = verify(&copy).unwrap();
    assert_eq!(
        kinds(&report),
        [ProblemKind::ChainBreak, ProblemKind::SeqGap]
    );
    assert_eq!(report.problems[0].path, segments(&copy)[2].2);
    assert_eq!(report.problems[0].line, 1);

    // The first segment deleted: the log no longer starts at its origin.
    let (_d, copy) = copy_log(&path);
    std::fs::remove_file(&segments(&copy)[0].2).unwrap();
    let report = verify(&copy).unwrap();
    assert_eq!(kinds(&report), [ProblemKind::MissingHeader]);
    assert!(report.problems[0].detail.contains("starts after record"));

    // A segment renamed to claim other records.
    let (_d, copy) = copy_log(&path);
    let (first, last, seg) = segments(&copy)[1].clone();
    let renamed = seg.with_file_name(format!("audit.log.{first:020}-{:020}", last + 1));
    std::fs::rename(&seg, &renamed).unwrap();
    let report = verify(&copy).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::Malformed
                && p.path == renamed
                && p.detail.contains("name says")),
        "{:?}",
        report.problems
    );

    // A byte changed in a closed segment.
    let (_d, copy) = copy_log(&path);
    let seg = segments(&copy)[3].2.clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] = if bytes[at] == b'7' { b'8' } else { b'7' };
    std::fs::write(&seg, &bytes).unwrap();
    let report = verify(&copy).unwrap();
    assert!(
        report.problems.iter().all(|p| p.path == seg)
            && kinds(&report).contains(&ProblemKind::HashMismatch),
        "{:?}",
        report.problems
    );

    // A partial line appended to a closed segment.
    let (_d, copy) = copy_log(&path);
    let seg = segments(&copy)[0].2.clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(b"{\"seq\":");
    std::fs::write(&seg, &bytes).unwrap();
    let report = verify(&copy).unwrap();
    assert_eq!(kinds(&report), [ProblemKind::Malformed]);
    assert!(report.problems[0].detail.contains("partial line"));
    assert_eq!(report.torn_tail, None, "the active file is not torn");

    // A segment name that is a symlink (here to a device that never ends): not followed.
    let (_d, copy) = copy_log(&path);
    let seg = segments(&copy)[1].2.clone();
    std::fs::remove_file(&seg).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &seg).unwrap();
    let report = verify(&copy).unwrap();
    assert!(
        report.problems[0].path == seg && report.problems[0].detail.contains("not a regular file"),
        "{:?}",
        report.problems
    );

    // A segment of another log in its place.
    let (_other_dir, other) = rolled_log(200).await;
    let (_d, copy) = copy_log(&path);
    let target = segments(&copy)[2].clone();
    let foreign = segments(&other)
        .into_iter()
        .find(|(first, _, _)| *first == target.0)
        .expect("the same rollover points in a log of the same records");
    std::fs::copy(&foreign.2, &target.2).unwrap();
    let report = verify(&copy).unwrap();
    assert!(
        kinds(&report).contains(&ProblemKind::UnexpectedHeader)
            && kinds(&report).contains(&ProblemKind::ChainBreak),
        "{:?}",
        report.problems
    );

    // Export stops at the first problem, naming the file.
    let (_d, copy) = copy_log(&path);
    std::fs::remove_file(&segments(&copy)[2].2).unwrap();
    let err = export_tenant(&copy, "acme", None, None, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(&err, phiseal_audit_file::AuditFileError::ChainBroken { path, line: 1, .. }
            if *path == segments(&copy)[2].2),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_interrupted_rollover_is_finished_when_the_log_is_opened() {
    // One file, as if a rollover of it had just begun.
    let (dir, path) = one_file_log(5).await;
    // A crash after the next file was prepared and the closed file got its segment name,
    // before the rename.
    let next = dir.path().join("audit.log.next");
    std::fs::write(&next, "{\"seq\":5,\"kind\":\"header\"}\n").unwrap();
    let named = dir.path().join(format!("audit.log.{:020}-{:020}", 1, 5));
    std::fs::hard_link(&path, &named).unwrap();

    // Verify before anything reopens the log: the file is read once, under its segment name.
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.files, std::slice::from_ref(&named));
    assert_eq!(report.last_seq, Some(5));

    // Opening finishes the rollover: the name stays (it is final once it exists), the log
    // continues in a new file after record 5.
    let segment_bytes = std::fs::read(&named).unwrap();
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    assert!(!next.exists(), "the unfinished next file is removed");
    assert!(std::fs::read(&named).unwrap() == segment_bytes);
    assert_eq!(std::fs::metadata(&named).unwrap().nlink(), 1);
    append(&log, 5, 60).await;
    drop(log);
    assert_intact(&path, 60);
    let segs = segments(&path);
    assert_eq!(segs[0], (1, 5, named.clone()));
    assert!(segs.len() >= 2, "rolled over again after record 5");

    // A real segment (another inode) is left alone by opening.
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    drop(log);
    assert_eq!(segments(&path), segs);
}

#[tokio::test]
async fn a_second_name_that_does_not_match_the_active_file_is_refused() {
    let (dir, path) = one_file_log(5).await;
    let wrong = dir.path().join(format!("audit.log.{:020}-{:020}", 1, 4));
    std::fs::hard_link(&path, &wrong).unwrap();
    let err = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap_err();
    assert!(err.to_string().contains("second name"), "{err}");
    std::fs::remove_file(&wrong).unwrap();
    drop(FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap());
}

fn refused_as_orphan(path: &Path) {
    let err = FileAuditLog::open_with(path, Durability::Strict, options()).unwrap_err();
    assert!(
        matches!(
            err,
            phiseal_audit_file::AuditFileError::OrphanSegments { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_new_log_is_refused_next_to_an_earlier_logs_segments() {
    let (dir, path) = rolled_log(100).await;
    let moved = dir.path().join("damaged.log");
    std::fs::rename(&path, &moved).unwrap();
    refused_as_orphan(&path);
    assert!(!path.exists(), "the empty file it created is removed");
    // An empty log file someone created there is refused too (and left alone).
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    refused_as_orphan(&path);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    std::fs::remove_file(&path).unwrap();
    // Archived segments without their active file verify as one chain, reported as such:
    // not intact (the log file could have been deleted), but its segments are.
    let report = verify(&path).unwrap();
    assert!(report.active_missing && !report.is_intact());
    assert!(report.segments_intact(), "{:?}", report.problems);
    assert_eq!(report.files.len(), segments(&path).len());
}

#[tokio::test]
async fn a_segment_copy_that_lost_its_hard_link_is_refused() {
    let (dir, path) = one_file_log(5).await;
    // The state of a rollover interrupted after the link, copied without hard links.
    let named = dir.path().join(format!("audit.log.{:020}-{:020}", 1, 5));
    std::fs::copy(&path, &named).unwrap();
    let err = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap_err();
    assert!(
        matches!(
            err,
            phiseal_audit_file::AuditFileError::SegmentConflict { .. }
        ) && err.to_string().contains("not the same file"),
        "{err}"
    );
    // What the message suggests: make the log file the segment's second name again.
    std::fs::remove_file(&path).unwrap();
    std::fs::hard_link(&named, &path).unwrap();
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    append(&log, 5, 10).await;
    drop(log);
    assert_intact(&path, 10);
}

#[tokio::test]
async fn a_log_file_moved_away_while_open_is_not_rolled_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    append(&log, 0, 3).await;
    let moved = dir.path().join("moved.log");
    std::fs::rename(&path, &moved).unwrap();
    let mut failed = None;
    for i in 3..100 {
        if let Err(e) = log.append(&[event(i)]).await {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("the rollover refused");
    assert!(err.to_string().contains("moved or replaced"), "{err}");
    drop(log);
    assert!(
        segments(&path).is_empty(),
        "nothing named after another file"
    );
    assert!(!path.exists());
    let report = verify(&moved).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
}

#[tokio::test]
async fn a_torn_continuation_file_is_saved_under_its_own_name() {
    let (dir, path) = rolled_log(100).await;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":101,\"ti").unwrap();
    drop(f);
    let after = segments(&path).last().unwrap().1;
    let recovered = FileAuditLog::recover_torn_tail(&path).unwrap().unwrap();
    let name = recovered
        .saved_to
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(name, format!("audit.log.torn-{after}-{}", recovered.offset));
    assert!(dir.path().join(&name).exists());
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
}

#[tokio::test]
async fn a_failed_rollover_poisons_the_log_and_loses_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    append(&log, 0, 5).await;
    // Something in the way of the next file (a directory: root cannot write through it).
    let blocker = dir.path().join("audit.log.next");
    std::fs::create_dir(&blocker).unwrap();
    let mut failed = None;
    for i in 5..200 {
        if let Err(e) = log.append(&[event(i)]).await {
            failed = Some((i, e));
            break;
        }
    }
    std::fs::remove_dir(&blocker).unwrap();
    let (at, err) = failed.expect("the rollover failed");
    assert!(err.to_string().contains("rollover"), "{err}");
    assert!(log.append(&[event(999)]).await.is_err(), "poisoned");
    drop(log);
    // Every record written, including the one whose append reported the failure, is in the
    // active file, which a restart continues.
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.last_seq, Some(at + 1));
    assert!(segments(&path).is_empty());
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    append(&log, 1000, 1010).await;
    drop(log);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert!(!segments(&path).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_while_the_log_rolls_over_finds_no_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = Arc::new(
        FileAuditLog::open_with(
            &path,
            Durability::Interval(Duration::from_millis(5)),
            options(),
        )
        .unwrap(),
    );
    let writer = {
        let log = Arc::clone(&log);
        tokio::spawn(async move { append(&log, 0, 3000).await })
    };
    let checker = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut runs = 0;
            let mut files_seen = 0;
            loop {
                let report = verify(&path).unwrap();
                // A torn tail may be a write in progress; anything else is a false alarm.
                assert_eq!(report.problem_count, 0, "{:?}", report.problems);
                runs += 1;
                files_seen = files_seen.max(report.files.len());
                if report.last_seq == Some(3000) {
                    return (runs, files_seen);
                }
            }
        })
    };
    writer.await.unwrap();
    let (runs, files_seen) = checker.await.unwrap();
    assert!(
        runs > 1 && files_seen > 50,
        "{runs} runs, {files_seen} files"
    );
}

#[tokio::test]
async fn a_log_whose_first_segments_were_archived_and_removed_verifies_after_an_anchor() {
    let (_dir, path) = rolled_log(200).await;
    let segs = segments(&path);
    assert!(segs.len() >= 4);
    // Before removing the first three segments, their last record and hash (verifying the
    // third alone reports where it ends).
    let third = verify(&segs[2].2).unwrap();
    let after = phiseal_audit_file::Anchor {
        last_seq: third.last_seq.unwrap(),
        hash: hex_bytes(third.head_hash.as_deref().unwrap()),
    };
    assert_eq!(after.last_seq, segs[2].1);
    for (_, _, p) in &segs[..3] {
        std::fs::remove_file(p).unwrap();
    }

    let report = verify(&path).unwrap();
    assert_eq!(kinds(&report), [ProblemKind::MissingHeader]);
    assert_eq!(report.starts_after, Some(after.last_seq));

    let options = phiseal_audit_file::VerifyOptions::default().after(after);
    let report = phiseal_audit_file::verify_with(&path, options).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.starts_after, Some(after.last_seq));
    assert_eq!(report.last_seq, Some(200));

    // Another point (a wrong seq, or the right seq with another hash) is refused.
    for wrong in [
        phiseal_audit_file::Anchor {
            last_seq: segs[1].1,
            ..after
        },
        phiseal_audit_file::Anchor {
            hash: [7; 32],
            ..after
        },
    ] {
        let options = phiseal_audit_file::VerifyOptions::default().after(wrong);
        let report = phiseal_audit_file::verify_with(&path, options).unwrap();
        assert_eq!(kinds(&report), [ProblemKind::MissingHeader]);
    }

    // Export: the records after the anchor.
    let mut out = Vec::new();
    let err = export_tenant(&path, "acme", None, None, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            phiseal_audit_file::AuditFileError::ChainBroken {
                kind: ProblemKind::MissingHeader,
                ..
            }
        ),
        "{err:?}"
    );
    let mut out = Vec::new();
    let exported =
        phiseal_audit_file::export_tenant_with(&path, "acme", None, None, options, &mut out)
            .unwrap();
    let first_seq = String::from_utf8(out)
        .unwrap()
        .lines()
        .next()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .unwrap();
    assert!(first_seq > after.last_seq && exported.exported > 0);
}

fn hex_bytes(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

#[tokio::test]
async fn verify_holds_one_segment_open_at_a_time() {
    let (_dir, path) = rolled_log(1200).await;
    assert!(segments(&path).len() > 100);
    // The descriptor limit is per process: the check runs in a child process (this test
    // binary, running only the test below) with fewer descriptors than segments.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "verify_with_64_descriptors",
            "--ignored",
            "--test-threads",
            "1",
        ])
        .env(CHILD_LOG, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where [`verify_with_64_descriptors`] finds the log to verify.
const CHILD_LOG: &str = "PHISEAL_TEST_ROLLED_LOG";

#[test]
#[ignore = "run in its own process by verify_holds_one_segment_open_at_a_time"]
fn verify_with_64_descriptors() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let path = PathBuf::from(std::env::var_os(CHILD_LOG).expect("run by its parent test"));
    let low = rustix::process::Rlimit {
        current: Some(64),
        maximum: getrlimit(Resource::Nofile).maximum,
    };
    setrlimit(Resource::Nofile, low).unwrap();
    assert_intact(&path, 1200);
}

#[tokio::test]
async fn the_next_file_keeps_the_logs_group_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    drop(FileAuditLog::open(&path, Durability::Strict).unwrap());
    // A log shipper reads it through its group (root may give it any group).
    let gid = if rustix::process::geteuid().is_root() {
        4242
    } else {
        rustix::process::getegid().as_raw()
    };
    rustix::fs::chown(&path, None, Some(rustix::fs::Gid::from_raw(gid))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    append(&log, 0, 50).await;
    drop(log);
    assert!(!segments(&path).is_empty());
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o640, gid));
}

#[tokio::test]
async fn a_directory_that_cannot_take_a_rollover_is_refused_at_open() {
    let (dir, path) = one_file_log(5).await;
    // Something in the way of the probe (root cannot write through a directory either).
    std::fs::create_dir(dir.path().join("audit.log.probe")).unwrap();
    let err = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap_err();
    assert!(
        matches!(
            err,
            phiseal_audit_file::AuditFileError::RolloverUnsupported { .. }
        ) && err.to_string().contains("rollover is on"),
        "{err}"
    );
    // Without a rollover size nothing is probed.
    drop(FileAuditLog::open(&path, Durability::Strict).unwrap());
    std::fs::remove_dir(dir.path().join("audit.log.probe")).unwrap();
    drop(FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("probe"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn an_earlier_segment_put_back_as_the_log_file_is_refused_and_does_not_verify() {
    let (_dir, path) = rolled_log(200).await;
    let segs = segments(&path);
    assert!(segs.len() >= 3);
    std::fs::remove_file(&path).unwrap();
    std::fs::hard_link(&segs[0].2, &path).unwrap();
    let err = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap_err();
    assert!(
        matches!(
            err,
            phiseal_audit_file::AuditFileError::SegmentConflict { .. }
        ) && err.to_string().contains("later segment"),
        "{err}"
    );
    let report = verify(&path).unwrap();
    assert!(!report.is_intact(), "{:?}", report.files);
    assert!(kinds(&report).contains(&ProblemKind::ChainBreak));
    // The same through a symlink (which the writer refuses to open): not intact either.
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&segs[0].2, &path).unwrap();
    let report = verify(&path).unwrap();
    assert!(!report.is_intact(), "{:?}", report.files);
}

#[tokio::test]
async fn an_earlier_segment_moved_back_as_the_log_file_is_refused() {
    // Moved (`mv`), not linked: the segment's own name is gone, so no rollover is pending,
    // but the later segments are still there.
    let (_dir, path) = rolled_log(200).await;
    let segs = segments(&path);
    assert!(segs.len() >= 3);
    std::fs::rename(&segs[0].2, &path).unwrap();
    let err = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap_err();
    assert!(
        matches!(
            err,
            phiseal_audit_file::AuditFileError::SegmentConflict { .. }
        ) && err
            .to_string()
            .contains("the log file was replaced by an earlier segment"),
        "{err}"
    );
    // Nothing was appended to it.
    assert_eq!(segments(&path).len(), segs.len() - 1);
    let report = verify(&path).unwrap();
    assert!(!report.is_intact(), "{:?}", report.files);
}

#[tokio::test]
async fn an_after_anchor_for_a_log_that_starts_at_its_origin_is_a_problem() {
    let (_dir, path) = rolled_log(100).await;
    let anchor = phiseal_audit_file::Anchor {
        last_seq: segments(&path)[0].1,
        hash: [1; 32],
    };
    let options = phiseal_audit_file::VerifyOptions::default().after(anchor);
    let report = phiseal_audit_file::verify_with(&path, options).unwrap();
    assert_eq!(kinds(&report), [ProblemKind::MissingHeader]);
    assert!(report.problems[0].detail.contains("origin"));
}

#[tokio::test]
async fn a_log_name_that_is_not_utf8_still_finds_its_segments() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"audit-\xff.log"));
    let log = FileAuditLog::open_with(&path, Durability::Strict, options()).unwrap();
    append(&log, 0, 100).await;
    drop(log);
    let report = assert_intact(&path, 100);
    assert!(report.files.len() > 2, "{:?}", report.files);
}
