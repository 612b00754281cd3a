//! End-to-end tests of the file audit log: append, verify, tamper detection, torn tails,
//! group commit, export.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use phiseal::audit::{Action, Actor, AuditEvent, AuditSink, KeySource, Outcome};
use phiseal::context::TenantId;
use phiseal_audit_file::{
    AuditFileError, Durability, FileAuditLog, ProblemKind, export_tenant, verify, verify_anchored,
};
use rand::{Rng, RngCore, SeedableRng};

fn event(tenant: &str, i: u64, time: Timestamp) -> AuditEvent {
    AuditEvent {
        time,
        actor: Actor {
            identity: Arc::from("svc-billing"),
            uid: Some(1000),
            pid: Some(4242),
        },
        action: Action::Decrypt,
        tenant: Some(TenantId::new(tenant).unwrap()),
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

fn ev(i: u64) -> AuditEvent {
    event("acme", i, Timestamp::now())
}

/// `n` events of one call (same time, actor, action and request id), as a batch operation
/// writes them; their tenants cycle through `tenants`, their record ids are `patient-0`, ….
fn call_events(tenants: &[&str], n: usize, request_id: &str) -> Vec<AuditEvent> {
    let time = Timestamp::now();
    let request_id: Arc<str> = Arc::from(request_id);
    (0..n)
        .map(|i| {
            let mut e = event(tenants[i % tenants.len()], i as u64, time);
            e.request_id = Arc::clone(&request_id);
            e
        })
        .collect()
}

/// The log's records after the header, one JSON object each, without the line members `prev`
/// and `hash`: a batch line's records with the members it holds at line level filled in, and
/// their `seq`.
fn records(path: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for line in lines(path).iter().skip(1) {
        let mut v = json(line);
        let common = v.as_object_mut().unwrap();
        common.remove("prev");
        common.remove("hash");
        if common.get("kind").is_none_or(|k| k != "batch") {
            out.push(v);
            continue;
        }
        let items = common.remove("records").unwrap();
        common.remove("kind");
        let seq = common["seq"].as_u64().unwrap();
        for (i, item) in items.as_array().unwrap().iter().enumerate() {
            let mut record = common.clone();
            record.insert("seq".into(), (seq + i as u64).into());
            for (k, val) in item.as_object().unwrap() {
                assert!(record.insert(k.clone(), val.clone()).is_none(), "{k} twice");
            }
            out.push(serde_json::Value::Object(record));
        }
    }
    out
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap()
}

/// The members of an event line before `prev` and `hash`, in their fixed order.
const EVENT_MEMBERS: [&str; 13] = [
    "seq",
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

/// Asserts that `keys` occur in `line` in this order.
fn assert_member_order(line: &str, keys: &[&str]) {
    let mut pos = 0;
    for key in keys {
        let at = line[pos..]
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("{key} missing or out of order in {line}"));
        pos += at + 1;
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

/// A closed log with a header and `n` single-event records.
async fn log_with(n: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    log_written_with(n, Durability::Strict).await
}

/// [`log_with`], written in `durability` (the default one spares an fsync per record).
async fn log_written_with(
    n: u64,
    durability: Durability,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, durability).unwrap();
    for i in 1..=n {
        log.append(&[ev(i)]).await.unwrap();
    }
    log.flush().await.unwrap();
    drop(log);
    (dir, path)
}

fn kinds_at(report: &phiseal_audit_file::VerifyReport, line: u64) -> Vec<ProblemKind> {
    report
        .problems
        .iter()
        .filter(|p| p.line == line)
        .map(|p| p.kind)
        .collect()
}

#[tokio::test]
async fn append_and_verify_all_modes() {
    for durability in [
        Durability::Strict,
        Durability::default(),
        Durability::buffered(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = FileAuditLog::open(&path, durability).unwrap();
        assert_eq!(log.name(), "file");
        log.append(&[ev(1)]).await.unwrap();
        log.append(&[ev(2), ev(3), ev(4)]).await.unwrap();
        log.append(&[]).await.unwrap();
        log.flush().await.unwrap();
        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 5);
        assert_eq!(report.last_seq, Some(4));
        assert_eq!(report.head_hash.as_ref().unwrap().len(), 64);

        let all = lines(&path);
        assert!(all[0].starts_with(r#"{"seq":0,"kind":"header","log_id":""#));
        let rec = &records(&path)[0];
        assert_eq!(rec["action"], "decrypt");
        assert_eq!(rec["tenant"], "acme");
        assert_eq!(rec["key_source"], "cache");
        assert_eq!(rec["uid"], 1000);
        // Fixed field order.
        let order: Vec<&str> = EVENT_MEMBERS
            .iter()
            .copied()
            .chain(["prev", "hash"])
            .collect();
        // The first append was written alone (but in Buffered mode, where the writer thread
        // may put it in one batch line with the next): an event line.
        if !matches!(durability, Durability::Buffered { .. }) {
            assert_member_order(&all[1], &order);
        }
    }
}

#[tokio::test]
async fn records_of_one_call_share_batch_lines() {
    // (Buffered mode: see `buffered_writer_puts_several_calls_in_one_batch_line`.)
    for durability in [Durability::Strict, Durability::default()] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = FileAuditLog::open(&path, durability).unwrap();
        log.append(&[ev(1)]).await.unwrap();
        let call = call_events(&["acme", "other"], 5, "req-batch");
        log.append(&call).await.unwrap();
        log.append(&[ev(7)]).await.unwrap();
        // A call too large for one line (record ids of 500 bytes): it continues on more lines.
        let mut big = call_events(&["acme"], 400, "req-big");
        for (i, e) in big.iter_mut().enumerate() {
            e.record = Some(Arc::from(format!("{i:0>500}")));
        }
        log.append(&big).await.unwrap();
        log.flush().await.unwrap();
        drop(log);

        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 1 + 1 + 5 + 1 + 400);
        assert_eq!(report.last_seq, Some(407));

        let all = lines(&path);
        // header, ev(1), the call of 5, ev(7), then the big call.
        let batch = json(&all[2]);
        assert_eq!(batch["seq"], 2);
        assert_eq!(batch["kind"], "batch");
        assert_eq!(batch["action"], "decrypt");
        assert_eq!(batch["request_id"], "req-batch");
        assert_eq!(batch["uid"], 1000);
        // What all 5 records share is on the line; tenant and record id differ.
        assert_eq!(batch["field"], "ssn");
        assert_eq!(batch["key_version"], 3);
        assert_eq!(batch["key_source"], "cache");
        assert_eq!(batch["result"], "ok");
        assert_eq!(batch["tenant"], serde_json::Value::Null);
        assert_eq!(batch["records"].as_array().unwrap().len(), 5);
        assert_eq!(
            batch["records"][1],
            serde_json::json!({"tenant": "other", "record": "patient-1"})
        );
        let all_records = records(&path);
        for (i, r) in all_records[1..6].iter().enumerate() {
            assert_eq!(r["seq"], 2 + i as u64);
            assert_eq!(r["tenant"], ["acme", "other"][i % 2]);
            assert_eq!(r["record"], format!("patient-{i}"));
            assert_eq!(r["field"], "ssn");
            assert_eq!(r["key_version"], 3);
            assert_eq!(r["key_source"], "cache");
            assert_eq!(r["result"], "ok");
            assert_eq!(r["request_id"], "req-batch");
            assert_eq!(r["actor"], "svc-billing");
        }
        assert_member_order(
            &all[2],
            &[
                "seq",
                "kind",
                "time",
                "actor",
                "uid",
                "pid",
                "action",
                "field",
                "key_version",
                "key_source",
                "result",
                "request_id",
                "records",
                "tenant",
                "record",
                "prev",
                "hash",
            ],
        );
        assert_eq!(json(&all[3])["seq"], 7);
        assert_eq!(json(&all[3])["kind"], serde_json::Value::Null);

        let big_lines = &all[4..];
        assert!(
            big_lines.len() > 1,
            "400 records of 500-byte ids fit one line"
        );
        let mut next_seq = 8;
        for line in big_lines {
            assert!(line.len() < 64 * 1024, "{}", line.len());
            let v = json(line);
            assert_eq!(v["seq"], next_seq);
            next_seq += v["records"].as_array().unwrap().len() as u64;
        }
        assert_eq!(next_seq, 408);

        // Reopening continues after the last record of the last batch line.
        let log = FileAuditLog::open(&path, durability).unwrap();
        log.append(&[ev(9)]).await.unwrap();
        log.flush().await.unwrap();
        drop(log);
        assert_eq!(json(lines(&path).last().unwrap())["seq"], 408);
        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 409);
    }
}

#[tokio::test]
async fn buffered_writer_puts_several_calls_in_one_batch_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, buffered_slow()).unwrap();
    let mut appended = Vec::new();
    for i in 0..300 {
        // Single-field calls (each its own request id and time) and a batch call.
        let call = if i == 100 {
            call_events(&["acme"], 3, "req-batch")
        } else {
            vec![event("acme", i, Timestamp::now())]
        };
        log.append(&call).await.unwrap();
        appended.extend(call);
    }
    log.flush().await.unwrap();
    drop(log);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 1 + 302);

    // Written by one wake of the writer: one batch line (under 1024 records and 64 KiB), with
    // the members all records share (actor, action, tenant, field, …) on the line, time,
    // record id and request id in each record.
    let all = lines(&path);
    assert_eq!(all.len(), 2, "header + one batch line");
    let line = json(&all[1]);
    assert_eq!(line["kind"], "batch");
    assert_eq!(line["actor"], "svc-billing");
    assert_eq!(line["uid"], 1000);
    assert_eq!(line["action"], "decrypt");
    for member in ["time", "request_id"] {
        assert_eq!(line[member], serde_json::Value::Null, "{member} hoisted");
        assert!(line["records"][0][member].is_string(), "{member}");
    }
    assert_member_order(
        &all[1],
        &[
            "seq",
            "kind",
            "actor",
            "uid",
            "pid",
            "action",
            "tenant",
            "field",
            "key_version",
            "key_source",
            "result",
            "records",
            "time",
            "record",
            "request_id",
            "prev",
            "hash",
        ],
    );
    // Every record reads back as appended, in order.
    let got = records(&path);
    assert_eq!(got.len(), appended.len());
    for (i, (r, e)) in got.iter().zip(&appended).enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        assert_eq!(r["time"], e.time.to_string());
        assert_eq!(r["request_id"], &*e.request_id);
        assert_eq!(r["record"], e.record.as_deref().unwrap());
        assert_eq!(r["action"], "decrypt");
        assert_eq!(r["actor"], "svc-billing");
    }
}

#[tokio::test]
async fn identical_records_keep_their_record_id_in_the_batch_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    let e = ev(1);
    log.append(&[e.clone(), e.clone(), e]).await.unwrap();
    drop(log);
    assert!(verify(&path).unwrap().is_intact());
    let line = json(&lines(&path)[1]);
    assert_eq!(
        line["records"],
        serde_json::json!([{"record": "patient-1"}, {"record": "patient-1"}, {"record": "patient-1"}])
    );
    let got = records(&path);
    assert_eq!(got.len(), 3);
    assert!(
        got.iter()
            .all(|r| r["request_id"] == "req-1" && r["tenant"] == "acme")
    );
}

#[tokio::test]
async fn tampered_batch_lines_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    log.append(&call_events(&["acme"], 4, "req-a"))
        .await
        .unwrap();
    log.append(&[ev(10)]).await.unwrap();
    drop(log);
    let good = lines(&path);
    assert_eq!(good.len(), 3);

    // A record of the batch edited: that line's hash no longer matches.
    let mut edited = good.clone();
    edited[1] = edited[1].replace("patient-2", "patient-9");
    write_lines(&path, &edited);
    let report = verify(&path).unwrap();
    assert_eq!(kinds_at(&report, 2), vec![ProblemKind::HashMismatch]);

    // A record removed from the batch: the hash no longer matches, and the next line's seq
    // does not follow.
    let mut removed = good.clone();
    removed[1] = removed[1].replace(r#",{"record":"patient-3"}"#, "");
    assert_ne!(removed[1], good[1]);
    write_lines(&path, &removed);
    let report = verify(&path).unwrap();
    assert_eq!(kinds_at(&report, 2), vec![ProblemKind::HashMismatch]);
    assert_eq!(kinds_at(&report, 3), vec![ProblemKind::SeqGap]);

    // The whole batch line deleted: the chain breaks and four records are missing.
    write_lines(&path, &[good[0].clone(), good[2].clone()]);
    let report = verify(&path).unwrap();
    assert_eq!(
        kinds_at(&report, 2),
        vec![ProblemKind::ChainBreak, ProblemKind::SeqGap]
    );

    // A batch line without records, with a record lacking a member, or with a member both on
    // the line and in a record, is malformed.
    let too_many = vec![r#"{"record":"r"}"#; 1025].join(",");
    for bad in [
        r#""records":[]"#.to_owned(),
        // More records than the writer ever puts on one line.
        format!(r#""records":[{too_many}]"#),
        good[1].replace(r#""key_source":"cache","#, ""),
        good[1].replacen(
            r#"{"record""#,
            r#"{"time":"2025-01-01T00:00:00Z","record""#,
            1,
        ),
        good[1].replacen(r#","request_id":"req-a""#, "", 1),
        good[1].replacen(r#""field":"ssn""#, r#""field":0"#, 1),
    ] {
        let mut lines_ = good.clone();
        lines_[1] = if bad.starts_with('{') {
            bad
        } else {
            let v = &good[1];
            let start = v.find(r#""records":["#).unwrap();
            let end = v.find(r#"],"prev""#).unwrap() + 1;
            format!("{}{bad}{}", &v[..start], &v[end..])
        };
        write_lines(&path, &lines_);
        let report = verify(&path).unwrap();
        assert!(
            kinds_at(&report, 2).contains(&ProblemKind::Malformed),
            "{report:?}"
        );
    }
}

fn all_kinds(report: &phiseal_audit_file::VerifyReport) -> Vec<ProblemKind> {
    report.problems.iter().map(|p| p.kind).collect()
}

#[tokio::test]
async fn records_deleted_behind_a_damaged_line_still_show() {
    let (_dir, path) = log_written_with(3000, Durability::default()).await;
    let good = lines(&path);
    assert_eq!(good.len(), 3001, "a header and one line per record");

    // One byte of a record's JSON flipped, nothing deleted: that line alone is reported.
    let mut damaged = good.clone();
    damaged[100] = damaged[100].replacen("\"seq\":", "\"seq\";", 1);
    write_lines(&path, &damaged);
    let report = verify(&path).unwrap();
    assert_eq!(all_kinds(&report), [ProblemKind::Malformed], "{report:?}");

    // The same, and the five records after it deleted: the next line does not link to the
    // damaged one's stored hash.
    let mut cut = damaged.clone();
    cut.drain(101..106);
    write_lines(&path, &cut);
    let report = verify(&path).unwrap();
    assert_eq!(
        kinds_at(&report, 101),
        [ProblemKind::Malformed],
        "{report:?}"
    );
    assert!(
        kinds_at(&report, 102).contains(&ProblemKind::ChainBreak),
        "{report:?}"
    );

    // 2 400 records replaced by one line of garbage (no hash to link to): more than one
    // damaged line can hold, so the gap shows.
    let mut garbage = good.clone();
    garbage.splice(100..2500, ["garbage".to_owned()]);
    write_lines(&path, &garbage);
    let report = verify(&path).unwrap();
    assert_eq!(
        kinds_at(&report, 101),
        [ProblemKind::Malformed],
        "{report:?}"
    );
    assert!(
        kinds_at(&report, 102).contains(&ProblemKind::SeqGap),
        "{report:?}"
    );
}

#[tokio::test]
async fn export_expands_batch_lines_into_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    log.append(&[ev(1)]).await.unwrap();
    log.append(&call_events(&["acme", "other", "acme"], 6, "req-mixed"))
        .await
        .unwrap();
    drop(log);

    let mut out = Vec::new();
    let r = export_tenant(&path, "acme", None, None, &mut out).unwrap();
    assert_eq!(r.records_scanned, 1 + 1 + 6);
    assert_eq!(r.last_seq, Some(7));
    let text = String::from_utf8(out).unwrap();
    let exported: Vec<serde_json::Value> = text.lines().map(json).collect();
    // ev(1), then records 0, 2, 3, 5 of the call (seq 2 + i).
    assert_eq!(r.exported, 5);
    let seqs: Vec<u64> = exported
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 4, 5, 7]);
    let batch = json(&lines(&path)[2]);
    for (v, i) in exported[1..].iter().zip([0, 2, 3, 5]) {
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["record"], format!("patient-{i}"));
        assert_eq!(v["request_id"], "req-mixed");
        assert_eq!(v["time"], batch["time"]);
        assert_eq!(v["actor"], "svc-billing");
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["key_source"], "cache");
        assert_eq!(v["prev"], serde_json::Value::Null);
    }
    // Every exported line has the members of an event line, in its order.
    for line in text.lines() {
        assert_member_order(line, &EVENT_MEMBERS);
    }
}

/// Exports tenant `acme` from `path` and checks each record's line: `member` (in the order of
/// `with_it`) with the value `want` gives, or no `member` (in the event line's order).
fn assert_exported_member(
    path: &Path,
    member: &str,
    with_it: &[&str],
    want: &[Option<serde_json::Value>],
) {
    let mut out = Vec::new();
    export_tenant(path, "acme", None, None, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let exported: Vec<&str> = text.lines().collect();
    assert_eq!(exported.len(), want.len());
    for (line, want) in exported.iter().zip(want) {
        match want {
            Some(v) => {
                assert_member_order(line, with_it);
                assert_eq!(json(line)[member], *v);
            }
            None => {
                assert_member_order(line, &EVENT_MEMBERS);
                assert!(!line.contains(&format!("\"{member}\"")), "{line}");
            }
        }
    }
}

/// Writes `raw` with line `at` replaced by `bad` and checks that verify calls it malformed.
fn assert_edit_is_malformed(path: &Path, raw: &[String], at: usize, bad: String) {
    let mut edited = raw.to_vec();
    assert_ne!(edited[at], bad);
    edited[at] = bad;
    write_lines(path, &edited);
    let report = verify(path).unwrap();
    assert!(
        kinds_at(&report, at as u64 + 1).contains(&ProblemKind::Malformed),
        "line {at}: {report:?}"
    );
}

fn with_root_key(mut e: AuditEvent, root_key: &str) -> AuditEvent {
    e.root_key = Some(Arc::from(root_key));
    e
}

#[tokio::test]
async fn root_key_is_written_only_where_present() {
    for durability in [Durability::Strict, Durability::buffered()] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = FileAuditLog::open(&path, durability).unwrap();
        // Event lines, with and without.
        log.append(&[with_root_key(ev(1), "local:old")])
            .await
            .unwrap();
        log.flush().await.unwrap();
        log.append(&[ev(2)]).await.unwrap();
        log.flush().await.unwrap();
        // A call whose records share a root key: it is on the line.
        let shared: Vec<_> = call_events(&["acme"], 3, "req-shared")
            .into_iter()
            .map(|e| with_root_key(e, "local:new"))
            .collect();
        log.append(&shared).await.unwrap();
        log.flush().await.unwrap();
        // A call where some records have one and others not, and two records that differ
        // only in it: each record object carries its own, or none.
        let mut mixed = call_events(&["acme"], 3, "req-mixed");
        mixed[0].root_key = Some(Arc::from("local:a"));
        mixed[2].root_key = Some(Arc::from("local:b"));
        log.append(&mixed).await.unwrap();
        log.flush().await.unwrap();
        let e = ev(9);
        log.append(&[with_root_key(e.clone(), "local:c"), e])
            .await
            .unwrap();
        log.flush().await.unwrap();
        drop(log);

        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report:?}");
        let raw = lines(&path);
        assert_eq!(raw.len(), 6, "{raw:#?}");
        let mut with_it = EVENT_MEMBERS.to_vec();
        with_it.insert(with_it.len() - 2, "root_key");
        assert_member_order(&raw[1], &with_it);
        assert!(!raw[2].contains("root_key"), "{}", raw[2]);
        let line = json(&raw[3]);
        assert_eq!(line["root_key"], "local:new");
        assert!(!raw[3].contains(r#""root_key":"local:new"}"#), "{}", raw[3]);
        let line = json(&raw[4]);
        assert!(line.get("root_key").is_none(), "{}", raw[4]);
        assert_eq!(line["records"][0]["root_key"], "local:a");
        assert!(line["records"][1].get("root_key").is_none());
        assert_eq!(line["records"][2]["root_key"], "local:b");
        assert_eq!(
            json(&raw[5])["records"],
            serde_json::json!([{"record": "patient-9", "root_key": "local:c"}, {"record": "patient-9"}])
        );
        let got: Vec<Option<String>> = records(&path)
            .iter()
            .map(|r| r.get("root_key").map(|k| k.as_str().unwrap().to_owned()))
            .collect();
        let want: Vec<Option<&str>> = vec![
            Some("local:old"),
            None,
            Some("local:new"),
            Some("local:new"),
            Some("local:new"),
            Some("local:a"),
            None,
            Some("local:b"),
            Some("local:c"),
            None,
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|k| k.map(str::to_owned))
                .collect::<Vec<_>>()
        );

        // Export writes it where present, in the members' order, and nowhere else.
        let want: Vec<_> = want
            .iter()
            .map(|k| k.map(serde_json::Value::from))
            .collect();
        assert_exported_member(&path, "root_key", &with_it, &want);

        // Malformed: `null`, or both on the line and in a record.
        for (at, bad) in [
            (
                1,
                raw[1].replace(r#""root_key":"local:old""#, r#""root_key":null"#),
            ),
            (
                4,
                raw[4].replacen(r#""records":["#, r#""root_key":null,"records":["#, 1),
            ),
            (
                4,
                raw[4].replace(r#""root_key":"local:a""#, r#""root_key":null"#),
            ),
            (
                4,
                raw[4].replacen(r#""records":["#, r#""root_key":"local:x","records":["#, 1),
            ),
            (
                3,
                raw[3].replacen(r#"{"record""#, r#"{"root_key":"local:y","record""#, 1),
            ),
        ] {
            assert_edit_is_malformed(&path, &raw, at, bad);
        }
    }
}

/// A rewrap record of a ciphertext under `from`.
fn rewrapped_from(mut e: AuditEvent, from: u32) -> AuditEvent {
    e.action = Action::Rewrap;
    e.from_key_version = Some(from);
    e
}

#[tokio::test]
async fn from_key_version_is_written_only_where_present() {
    for durability in [Durability::Strict, Durability::buffered()] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = FileAuditLog::open(&path, durability).unwrap();
        log.append(&[rewrapped_from(ev(1), 1)]).await.unwrap();
        log.flush().await.unwrap();
        log.append(&[ev(2)]).await.unwrap();
        log.flush().await.unwrap();
        // A batch whose records share it (on the line), and one where they differ.
        let shared: Vec<_> = call_events(&["acme"], 3, "req-shared")
            .into_iter()
            .map(|e| rewrapped_from(e, 2))
            .collect();
        log.append(&shared).await.unwrap();
        log.flush().await.unwrap();
        let mut mixed: Vec<_> = call_events(&["acme"], 3, "req-mixed")
            .into_iter()
            .map(|e| rewrapped_from(e, 1))
            .collect();
        mixed[1].from_key_version = Some(4);
        mixed[2].from_key_version = None;
        log.append(&mixed).await.unwrap();
        log.flush().await.unwrap();
        drop(log);

        let report = verify(&path).unwrap();
        assert!(report.is_intact(), "{report:?}");
        let raw = lines(&path);
        assert_eq!(raw.len(), 5, "{raw:#?}");
        let mut with_it = EVENT_MEMBERS.to_vec();
        with_it.insert(10, "from_key_version");
        assert_member_order(&raw[1], &with_it);
        assert_eq!(json(&raw[1])["from_key_version"], 1);
        assert!(!raw[2].contains("from_key_version"), "{}", raw[2]);
        assert_eq!(json(&raw[3])["from_key_version"], 2);
        let line = json(&raw[4]);
        assert!(line.get("from_key_version").is_none(), "{}", raw[4]);
        assert_eq!(line["records"][0]["from_key_version"], 1);
        assert_eq!(line["records"][1]["from_key_version"], 4);
        assert!(line["records"][2].get("from_key_version").is_none());
        let got: Vec<Option<u64>> = records(&path)
            .iter()
            .map(|r| r.get("from_key_version").map(|v| v.as_u64().unwrap()))
            .collect();
        let want = vec![
            Some(1),
            None,
            Some(2),
            Some(2),
            Some(2),
            Some(1),
            Some(4),
            None,
        ];
        assert_eq!(got, want);

        // Export writes it where present, in the members' order.
        let want: Vec<_> = want
            .iter()
            .map(|v| v.map(serde_json::Value::from))
            .collect();
        assert_exported_member(&path, "from_key_version", &with_it, &want);

        // Malformed: `null`, or both on the line and in a record.
        for (at, bad) in [
            (
                1,
                raw[1].replace(r#""from_key_version":1"#, r#""from_key_version":null"#),
            ),
            (
                4,
                raw[4].replace(r#""from_key_version":4"#, r#""from_key_version":null"#),
            ),
            (
                4,
                raw[4].replacen(r#""records":["#, r#""from_key_version":7,"records":["#, 1),
            ),
            (
                3,
                raw[3].replacen(r#"{"record""#, r#"{"from_key_version":7,"record""#, 1),
            ),
        ] {
            assert_edit_is_malformed(&path, &raw, at, bad);
        }
    }
}

#[tokio::test]
async fn file_mode_is_0600_and_default_is_200ms() {
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        Durability::default(),
        Durability::Interval(Duration::from_millis(200))
    );
    let (_dir, path) = log_with(1).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn missing_parent_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        FileAuditLog::open(dir.path().join("nope/audit.log"), Durability::Strict).unwrap_err();
    assert!(matches!(err, AuditFileError::Open { .. }), "{err}");
    assert!(err.to_string().contains("parent directory"), "{err}");
}

#[tokio::test]
async fn awkward_strings_are_escaped_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    let mut e = ev(1);
    e.actor.identity = Arc::from("evil\"},\n{\"seq\":99\u{0}\u{1f}\\ é 😀 \u{2028}");
    e.record = Some(Arc::from("a\"b\\c"));
    e.tenant = None;
    e.key_source = None;
    e.outcome = Outcome::Error("decryption_failed");
    log.append(&[e.clone()]).await.unwrap();
    drop(log);
    let all = lines(&path);
    assert_eq!(all.len(), 2);
    let rec: serde_json::Value = serde_json::from_str(&all[1]).unwrap();
    assert_eq!(rec["actor"], &*e.actor.identity);
    assert_eq!(rec["record"], "a\"b\\c");
    assert_eq!(rec["tenant"], serde_json::Value::Null);
    assert_eq!(rec["result"], "decryption_failed");
    assert!(verify(&path).unwrap().is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_strict_appends_share_fdatasyncs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = Arc::new(FileAuditLog::open(&path, Durability::Strict).unwrap());
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                log.append(&[ev(t * 1000 + i)]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let syncs = log.sync_count();
    drop(log);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 1601);
    assert_eq!(report.last_seq, Some(1600));
    let seqs: Vec<u64> = lines(&path)
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (0..=1600).collect::<Vec<_>>());
    assert!(
        syncs < 1600,
        "group commit: {syncs} fdatasyncs for 1600 records"
    );
    eprintln!("strict: {syncs} fdatasyncs for 1600 records from 8 tasks");
}

/// The `record` member of each event line.
fn record_ids(path: &Path) -> Vec<String> {
    records(path)
        .iter()
        .map(|r| r["record"].as_str().unwrap().to_owned())
        .collect()
}

/// Buffered, with a writer thread that only wakes when asked (high-water mark, flush, drop).
fn buffered_slow() -> Durability {
    Durability::Buffered {
        flush_every: Duration::from_secs(3600),
        sync_every: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_buffered_appends_are_all_written_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = Arc::new(FileAuditLog::open(&path, Durability::buffered()).unwrap());
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            for i in 0..500u64 {
                log.append(&[ev(t * 1000 + i)]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let before = log.sync_count();
    log.flush().await.unwrap();
    assert!(log.sync_count() > before, "flush fdatasyncs");
    // Everything is in the file once flush returns, before the log is dropped.
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 4001);
    assert_eq!(report.last_seq, Some(4000));
    let seqs: Vec<u64> = records(&path)
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=4000).collect::<Vec<_>>());
    // Every record is there once, and each task's records are in its order.
    let ids = record_ids(&path);
    for t in 0..8u64 {
        let mine: Vec<&String> = ids
            .iter()
            .filter(|id| {
                let n: u64 = id.strip_prefix("patient-").unwrap().parse().unwrap();
                n / 1000 == t
            })
            .collect();
        let want: Vec<String> = (0..500u64)
            .map(|i| format!("patient-{}", t * 1000 + i))
            .collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>());
    }
    drop(log);
}

#[tokio::test]
async fn buffered_append_queues_and_flush_writes_and_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, buffered_slow()).unwrap();
    assert_eq!(log.durability(), buffered_slow());
    log.append(&[ev(1)]).await.unwrap();
    log.append(&[ev(2), ev(3)]).await.unwrap();
    // Acknowledged but only queued: the writer thread has not run yet.
    assert_eq!(lines(&path).len(), 1, "only the header");
    assert_eq!(log.sync_count(), 0);
    log.flush().await.unwrap();
    assert_eq!(log.sync_count(), 1, "flush fdatasyncs once");
    assert_eq!(record_ids(&path), ["patient-1", "patient-2", "patient-3"]);
    assert!(verify(&path).unwrap().is_intact());
    // Nothing new: flush still returns after an fdatasync.
    log.flush().await.unwrap();
    assert_eq!(log.sync_count(), 2);
}

#[tokio::test]
async fn buffered_writer_wakes_at_the_high_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, buffered_slow()).unwrap();
    for i in 0..5000 {
        log.append(&[ev(i)]).await.unwrap();
    }
    // No flush: the writer thread (sleeping for an hour) was woken by the queue length.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while verify(&path).unwrap().last_seq < Some(4096) {
        assert!(std::time::Instant::now() < deadline, "writer not woken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log.flush().await.unwrap();
    assert_eq!(verify(&path).unwrap().last_seq, Some(5000));
}

#[tokio::test]
async fn buffered_drop_without_flush_writes_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, buffered_slow()).unwrap();
    for i in 1..=99 {
        log.append(&[ev(i)]).await.unwrap();
    }
    log.append(&[ev(100), ev(101)]).await.unwrap();
    assert_eq!(lines(&path).len(), 1, "only the header before the drop");
    drop(log);
    // The drop waited for the writer thread: the file is complete and can be reopened.
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.last_seq, Some(101));
    let want: Vec<String> = (1..=101).map(|i| format!("patient-{i}")).collect();
    assert_eq!(record_ids(&path), want);
    let log = FileAuditLog::open(&path, buffered_slow()).unwrap();
    log.append(&[ev(102)]).await.unwrap();
    drop(log);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.last_seq, Some(102));
}

#[tokio::test]
async fn reopen_continues_the_chain() {
    let (_dir, path) = log_with(3).await;
    for mode in [
        Durability::default(),
        Durability::Strict,
        Durability::buffered(),
        Durability::default(),
    ] {
        let log = FileAuditLog::open(&path, mode).unwrap();
        log.append(&[ev(10), ev(11)]).await.unwrap();
        log.flush().await.unwrap();
    }
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.last_seq, Some(11));
    assert_eq!(
        lines(&path)
            .iter()
            .filter(|l| l.contains("\"kind\":\"header\""))
            .count(),
        1
    );
}

#[tokio::test]
async fn edited_byte_is_a_hash_mismatch() {
    let (_dir, path) = log_with(5).await;
    let mut all = lines(&path);
    all[3] = all[3].replacen("svc-billing", "svc-bIlling", 1);
    write_lines(&path, &all);
    let report = verify(&path).unwrap();
    assert!(!report.is_intact());
    assert_eq!(kinds_at(&report, 4), vec![ProblemKind::HashMismatch]);
    assert_eq!(report.problems.len(), 1, "{report:?}");
    // Reopening refuses a damaged last record, but a damaged middle one is verify's job.
    let mut all = lines(&path);
    let last = all.len() - 1;
    all[last] = all[last].replacen("ssn", "ssm", 1);
    write_lines(&path, &all);
    let err = FileAuditLog::open(&path, Durability::Strict).unwrap_err();
    assert!(matches!(err, AuditFileError::DamagedTail { .. }), "{err}");
}

#[tokio::test]
async fn deleted_line_is_a_chain_break_and_gap() {
    let (_dir, path) = log_with(5).await;
    let mut all = lines(&path);
    all.remove(2); // seq 2
    write_lines(&path, &all);
    let report = verify(&path).unwrap();
    let k = kinds_at(&report, 3);
    assert!(k.contains(&ProblemKind::ChainBreak), "{report:?}");
    assert!(k.contains(&ProblemKind::SeqGap), "{report:?}");
    assert_eq!(report.problems.len(), 2, "{report:?}");
}

#[tokio::test]
async fn deleted_header_is_reported() {
    let (_dir, path) = log_with(3).await;
    let mut all = lines(&path);
    all.remove(0);
    write_lines(&path, &all);
    let report = verify(&path).unwrap();
    assert_eq!(kinds_at(&report, 1), vec![ProblemKind::MissingHeader]);
}

#[tokio::test]
async fn inserted_copy_is_detected() {
    let (_dir, path) = log_with(5).await;
    let mut all = lines(&path);
    let copy = all[2].clone();
    all.insert(4, copy); // a copy of seq 2 after seq 3
    write_lines(&path, &all);
    let report = verify(&path).unwrap();
    let k = kinds_at(&report, 5);
    assert!(k.contains(&ProblemKind::ChainBreak), "{report:?}");
    assert!(k.contains(&ProblemKind::SeqOutOfOrder), "{report:?}");
    assert!(!report.is_intact());
}

#[tokio::test]
async fn swapped_lines_are_detected() {
    let (_dir, path) = log_with(5).await;
    let mut all = lines(&path);
    all.swap(2, 3); // seq 2 and 3
    write_lines(&path, &all);
    let report = verify(&path).unwrap();
    assert!(
        kinds_at(&report, 3).contains(&ProblemKind::ChainBreak),
        "{report:?}"
    );
    assert!(
        kinds_at(&report, 4).contains(&ProblemKind::SeqOutOfOrder),
        "{report:?}"
    );
    assert!(
        kinds_at(&report, 4).contains(&ProblemKind::ChainBreak),
        "{report:?}"
    );
    assert!(
        !report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::HashMismatch)
    );
}

#[tokio::test]
async fn spliced_log_is_detected() {
    let (_d1, a) = log_with(2).await;
    let (_d2, b) = log_with(2).await;
    let mut all = lines(&a);
    all.extend(lines(&b));
    write_lines(&a, &all);
    let report = verify(&a).unwrap();
    let k = kinds_at(&report, 4);
    assert!(k.contains(&ProblemKind::UnexpectedHeader), "{report:?}");
    assert!(k.contains(&ProblemKind::ChainBreak), "{report:?}");
}

#[tokio::test]
async fn torn_tail_is_refused_reported_and_recovered() {
    let (_dir, path) = log_with(4).await;
    let full = std::fs::read(&path).unwrap();
    let intact_len = lines(&path)[..4].iter().map(|l| l.len() + 1).sum::<usize>();
    let cut = intact_len + 30; // 30 bytes into seq 4
    std::fs::write(&path, &full[..cut]).unwrap();

    let err = FileAuditLog::open(&path, Durability::Strict).unwrap_err();
    match &err {
        AuditFileError::TornTail { offset, len, .. } => {
            assert_eq!((*offset, *len), (intact_len as u64, 30));
        }
        other => panic!("expected TornTail, got {other}"),
    }
    assert!(err.to_string().contains("recover_torn_tail"), "{err}");

    let report = verify(&path).unwrap();
    assert_eq!(report.torn_tail, Some((intact_len as u64, 30)));
    assert!(report.problems.is_empty());
    assert!(!report.is_intact());

    let rec = FileAuditLog::recover_torn_tail(&path).unwrap().unwrap();
    assert_eq!((rec.offset, rec.len, rec.seq), (intact_len as u64, 30, 4));
    assert_eq!(
        std::fs::read(&rec.saved_to).unwrap(),
        &full[intact_len..cut]
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&rec.saved_to)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.last_seq, Some(4));
    let last: serde_json::Value = serde_json::from_str(lines(&path).last().unwrap()).unwrap();
    assert_eq!(last["kind"], "recovered_torn_tail");
    assert_eq!(last["offset"], intact_len as u64);
    assert_eq!(last["len"], 30);
    // The saved bytes' hash is in the chain: a later change to the save file shows.
    let saved_hash = phiseal::crypto::default_provider()
        .sha256
        .digest(&[&full[intact_len..cut]]);
    assert_eq!(last["saved_sha256"], hex::encode(saved_hash));

    // Nothing more to recover; the log opens and continues.
    assert!(FileAuditLog::recover_torn_tail(&path).unwrap().is_none());
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    log.append(&[ev(99)]).await.unwrap();
    drop(log);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.last_seq, Some(5));
}

#[tokio::test]
async fn a_recovery_refused_for_a_damaged_last_record_changes_nothing() {
    let (_dir, path) = log_with(4).await;
    let mut full = std::fs::read(&path).unwrap();
    let intact_len = lines(&path)[..4].iter().map(|l| l.len() + 1).sum::<usize>();
    // The last complete record edited (one byte of its JSON), then a torn one after it.
    let last_start = intact_len - lines(&path)[3].len() - 1;
    full[last_start + 5] ^= 0x01;
    let cut = intact_len + 30;
    std::fs::write(&path, &full[..cut]).unwrap();

    let err = FileAuditLog::recover_torn_tail(&path).unwrap_err();
    assert!(
        matches!(err, AuditFileError::DamagedTail { .. }),
        "expected DamagedTail, got {err}"
    );
    // Nothing saved, nothing cut: the evidence is as the crash (or the attacker) left it.
    assert_eq!(std::fs::read(&path).unwrap(), &full[..cut]);
    let saved: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("torn"))
        .collect();
    assert!(saved.is_empty(), "{saved:?}");
    // And the log is refused for its torn tail, not for an interrupted recovery.
    assert!(matches!(
        FileAuditLog::open(&path, Durability::Strict).unwrap_err(),
        AuditFileError::TornTail { .. }
    ));
}

#[tokio::test]
async fn interrupted_recovery_resumes() {
    let (_dir, path) = log_with(2).await;
    let full = std::fs::read(&path).unwrap();
    let intact = full.len();
    let mut torn = full.clone();
    torn.extend_from_slice(b"{\"seq\":3,\"ti");
    // Simulate: torn bytes saved and log truncated, then a crash before the record.
    let saved = format!("{}.torn-{intact}", path.display());
    std::fs::write(&saved, b"{\"seq\":3,\"ti").unwrap();
    std::fs::write(&path, &full).unwrap();
    // The log ends in a clean line, but opening it for appending would lose the trace of the
    // cut: it is refused until the recovery has finished.
    let err = FileAuditLog::open(&path, Durability::Strict).unwrap_err();
    assert!(
        matches!(err, AuditFileError::RecoveryInterrupted { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("phiseal audit recover"), "{err}");
    let rec = FileAuditLog::recover_torn_tail(&path).unwrap().unwrap();
    assert_eq!((rec.offset, rec.len), (intact as u64, 12));
    assert!(verify(&path).unwrap().is_intact());
    // Once recorded, the log opens (the save file stays, named after an older length).
    drop(FileAuditLog::open(&path, Durability::Strict).unwrap());

    // A crash during the copy of the torn bytes leaves only the temporary copy (never a
    // partial save file under the final name): the next recovery replaces and removes it.
    let (_dir4, path4) = log_with(1).await;
    let mut bytes = std::fs::read(&path4).unwrap();
    let off = bytes.len();
    bytes.extend_from_slice(b"{\"seq\":2,\"time\":\"20");
    std::fs::write(&path4, &bytes).unwrap();
    let saved = format!("{}.torn-{off}", path4.display());
    let partial = format!("{saved}.partial");
    std::fs::write(&partial, b"{\"seq\":2").unwrap();
    let rec = FileAuditLog::recover_torn_tail(&path4).unwrap().unwrap();
    assert_eq!(rec.saved_to.to_str(), Some(saved.as_str()));
    assert_eq!(std::fs::read(&saved).unwrap(), b"{\"seq\":2,\"time\":\"20");
    assert!(
        !std::path::Path::new(&partial).exists(),
        "the temporary copy stayed"
    );
    assert!(verify(&path4).unwrap().is_intact());
    // A crash between the link and the removal of the temporary name: both names hold the
    // torn bytes; the next recovery uses the save file and removes the other.
    let (_dir5, path5) = log_with(1).await;
    let mut bytes = std::fs::read(&path5).unwrap();
    let off = bytes.len();
    bytes.extend_from_slice(b"{\"seq\":2,\"ti");
    std::fs::write(&path5, &bytes).unwrap();
    let saved = format!("{}.torn-{off}", path5.display());
    std::fs::write(&saved, b"{\"seq\":2,\"ti").unwrap();
    std::fs::write(format!("{saved}.partial"), b"{\"seq\":2,\"ti").unwrap();
    FileAuditLog::recover_torn_tail(&path5).unwrap().unwrap();
    assert!(!std::path::Path::new(&format!("{saved}.partial")).exists());
    assert!(verify(&path5).unwrap().is_intact());

    // A save file that differs from the torn bytes is never overwritten.
    let (_dir2, path2) = log_with(1).await;
    let mut bytes = std::fs::read(&path2).unwrap();
    let off = bytes.len();
    bytes.extend_from_slice(b"partial");
    std::fs::write(&path2, &bytes).unwrap();
    std::fs::write(format!("{}.torn-{off}", path2.display()), b"other!!").unwrap();
    let err = FileAuditLog::recover_torn_tail(&path2).unwrap_err();
    assert!(
        matches!(err, AuditFileError::TornFileConflict { .. }),
        "{err}"
    );
    // Nor is a symlink there followed (to a device that never ends, a FIFO that blocks).
    let save = format!("{}.torn-{off}", path2.display());
    std::fs::remove_file(&save).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &save).unwrap();
    let err = FileAuditLog::recover_torn_tail(&path2).unwrap_err();
    assert!(
        matches!(err, AuditFileError::TornFileConflict { .. }),
        "{err}"
    );
    // An interrupted recovery is resumed only from a regular save file: a symlink in its
    // place is neither read nor taken for one.
    let (_dir3, path3) = log_with(1).await;
    let len = std::fs::metadata(&path3).unwrap().len();
    std::os::unix::fs::symlink("/dev/zero", format!("{}.torn-{len}", path3.display())).unwrap();
    assert!(FileAuditLog::recover_torn_tail(&path3).unwrap().is_none());
    drop(FileAuditLog::open(&path3, Durability::Strict).unwrap());
}

#[tokio::test]
async fn an_anchored_head_catches_records_cut_off_the_end() {
    let (_dir, path) = log_with(5).await;
    let report = verify(&path).unwrap();
    let mut hash = [0u8; 32];
    hex::decode_to_slice(report.head_hash.as_deref().unwrap(), &mut hash).unwrap();
    let head = phiseal_audit_file::Anchor {
        last_seq: report.last_seq.unwrap(),
        hash,
    };
    // The head as recorded: found.
    assert!(verify_anchored(&path, head).unwrap().is_intact());
    // An anchor of an earlier record still holds once more records follow.
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    log.append(&[ev(99)]).await.unwrap();
    drop(log);
    assert!(verify_anchored(&path, head).unwrap().is_intact());
    // The last two records cut off at a line boundary: the chain alone is intact, the anchor
    // is not.
    let kept = lines(&path);
    write_lines(&path, &kept[..kept.len() - 2]);
    assert!(verify(&path).unwrap().is_intact());
    let report = verify_anchored(&path, head).unwrap();
    assert!(!report.is_intact());
    assert_eq!(report.problems[0].kind, ProblemKind::AnchorMissing);
    // The right hash with another seq (or the reverse) is no match either.
    write_lines(&path, &kept);
    for wrong in [
        phiseal_audit_file::Anchor {
            last_seq: head.last_seq + 1,
            ..head
        },
        phiseal_audit_file::Anchor {
            hash: [7; 32],
            ..head
        },
    ] {
        let report = verify_anchored(&path, wrong).unwrap();
        assert_eq!(report.problems[0].kind, ProblemKind::AnchorMissing);
    }
}

#[tokio::test]
async fn recovery_changes_nothing_in_a_file_that_is_not_a_log() {
    let dir = tempfile::tempdir().unwrap();
    // A wrong path: its last line looks torn, but it is no audit log, so nothing is cut.
    let notes = dir.path().join("notes.txt");
    let text = b"first line\nsecond line without a newline";
    std::fs::write(&notes, text).unwrap();
    // Private, as a log must be (a file others can read is refused before its content is).
    let private = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    private(&notes);
    let err = FileAuditLog::recover_torn_tail(&notes).unwrap_err();
    assert!(err.to_string().contains("not a phiseal audit log"), "{err}");
    assert_eq!(std::fs::read(&notes).unwrap(), text);
    // A log whose header itself is torn: nothing is cut and nothing saved aside (the next
    // open would otherwise start a fresh chain without a trace).
    let torn_header = dir.path().join("audit.log");
    std::fs::write(&torn_header, b"{\"seq\":0,\"kind\":\"hea").unwrap();
    private(&torn_header);
    let err = FileAuditLog::recover_torn_tail(&torn_header).unwrap_err();
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert_eq!(
        std::fs::read(&torn_header).unwrap(),
        b"{\"seq\":0,\"kind\":\"hea"
    );
    assert!(!dir.path().join("audit.log.torn-0").exists());
    // A symlink to a log is refused, as `open` refuses it.
    let (_log_dir, log) = log_with(1).await;
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(b"partial");
    std::fs::write(&log, &bytes).unwrap();
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&log, &link).unwrap();
    let err = FileAuditLog::recover_torn_tail(&link).unwrap_err();
    assert!(matches!(err, AuditFileError::NotAFile { .. }), "{err}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes);
}

#[test]
fn garbage_never_panics() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Random binary, empty, newline-only, huge line.
    let mut cases: Vec<Vec<u8>> = vec![Vec::new(), b"\n\n\n".to_vec(), vec![b'x'; 200_000]];
    let mut long_line = vec![b'a'; 100_000];
    long_line.push(b'\n');
    cases.push(long_line);
    for _ in 0..50 {
        let len = rng.random_range(0..5000);
        let mut b = vec![0u8; len];
        rng.fill_bytes(&mut b);
        cases.push(b);
    }
    for bytes in cases {
        std::fs::write(&path, &bytes).unwrap();
        // Private, as a log must be: otherwise `open` refuses it before reading a byte.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let report = verify(&path).unwrap();
        assert!(!report.is_intact());
        // Opening reads the garbage (an empty file becomes a new log): never a panic, and
        // never anything but a refusal of what it found.
        match FileAuditLog::open(&path, Durability::Strict) {
            Ok(log) => {
                assert!(bytes.is_empty(), "garbage of {} bytes opened", bytes.len());
                drop(log);
            }
            Err(e) => assert!(
                matches!(
                    e,
                    AuditFileError::TornTail { .. } | AuditFileError::DamagedTail { .. }
                ),
                "{e:?}"
            ),
        }
        let mut out = Vec::new();
        assert!(export_tenant(&path, "acme", None, None, &mut out).is_err() || bytes.is_empty());
    }
    // A binary file from the system, if present.
    if let Ok(r) = verify("/bin/sh") {
        assert!(!r.is_intact());
    }
}

#[tokio::test]
async fn mutated_logs_never_panic() {
    let (_dir, path) = log_with(6).await;
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    log.append(&call_events(&["acme", "other"], 5, "req-batch"))
        .await
        .unwrap();
    drop(log);
    let good = std::fs::read(&path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..500 {
        let mut b = good.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        std::fs::write(&path, &b).unwrap();
        let report = verify(&path).unwrap();
        if b != good {
            assert!(!report.is_intact(), "undetected mutation");
        }
        let mut out = Vec::new();
        let _ = export_tenant(&path, "acme", None, None, &mut out);
        let _ = FileAuditLog::open(&path, Durability::Strict).map(drop);
        std::fs::write(&path, &good).unwrap();
    }
}

#[tokio::test]
async fn export_filters_by_tenant_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
    let at = |h: i64| t0 + jiff::SignedDuration::from_hours(h);
    let mut no_tenant = event("acme", 0, at(1));
    no_tenant.tenant = None;
    log.append(&[
        event("acme", 1, at(0)),
        event("other", 2, at(1)),
        event("acme", 3, at(2)),
        no_tenant,
        event("acme", 4, at(5)),
    ])
    .await
    .unwrap();
    drop(log);

    let mut out = Vec::new();
    let r = export_tenant(&path, "acme", None, None, &mut out).unwrap();
    assert_eq!(r.exported, 3);
    assert_eq!(r.records_scanned, 6);
    let text = String::from_utf8(out).unwrap();
    // An exported record has the members of the record in the log, hoisted ones included.
    let stored = records(&path);
    let exported: Vec<serde_json::Value> = text.lines().map(json).collect();
    assert_eq!(
        exported,
        vec![stored[0].clone(), stored[2].clone(), stored[4].clone()]
    );

    let mut out = Vec::new();
    let r = export_tenant(&path, "acme", Some(at(1)), Some(at(5)), &mut out).unwrap();
    assert_eq!(r.exported, 1);
    assert!(String::from_utf8(out).unwrap().contains("patient-3"));

    let mut out = Vec::new();
    let r = export_tenant(&path, "nobody", None, None, &mut out).unwrap();
    assert_eq!(r.exported, 0);
    assert!(out.is_empty());

    // A broken chain aborts the export.
    let log = FileAuditLog::open(&path, Durability::Strict).unwrap();
    log.append(&[event("acme", 5, at(6))]).await.unwrap();
    log.append(&[event("acme", 6, at(7))]).await.unwrap();
    drop(log);
    let mut all = lines(&path);
    assert_eq!(all.len(), 4);
    all.remove(2);
    write_lines(&path, &all);
    let mut out = Vec::new();
    let err = export_tenant(&path, "acme", None, None, &mut out).unwrap_err();
    assert!(
        matches!(err, AuditFileError::ChainBroken { line: 3, .. }),
        "{err}"
    );
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let first = FileAuditLog::open(&path, Durability::default()).unwrap();
    let err = FileAuditLog::open(&path, Durability::default()).unwrap_err();
    assert!(matches!(err, AuditFileError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("one writer per log"), "{err}");
    drop(first);
    FileAuditLog::open(&path, Durability::default()).unwrap();
}

#[test]
fn an_existing_log_must_be_a_private_regular_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    drop(FileAuditLog::open(&path, Durability::default()).unwrap());
    // Writable by others, or readable by others (the records name tenants and record ids).
    for mode in [0o666, 0o620, 0o644] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = FileAuditLog::open(&path, Durability::default()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{mode:o}: {err}");
    }
    // Readable through the group (a log shipper) is allowed.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    FileAuditLog::open(&path, Durability::default()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = FileAuditLog::open(&link, Durability::default()).unwrap_err();
    assert!(matches!(err, AuditFileError::NotAFile { .. }), "{err}");
    FileAuditLog::open(&path, Durability::default()).unwrap();
}

#[tokio::test]
async fn a_symlink_at_the_active_path_is_reported_not_followed() {
    // The writer never opens a symlink, so one at the log's path was put there by someone
    // else: verify says so rather than vouch for whatever it points to.
    let (_dir, log) = log_with(3).await;
    assert!(verify(&log).unwrap().is_intact());
    let elsewhere = tempfile::tempdir().unwrap();
    let link = elsewhere.path().join("audit.log");
    std::os::unix::fs::symlink(&log, &link).unwrap();
    let report = verify(&link).unwrap();
    assert!(!report.is_intact(), "{report:?}");
    assert_eq!(report.records, 0, "not read: {report:?}");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.path == link && p.detail.contains("not a regular file")),
        "{:?}",
        report.problems
    );
}
