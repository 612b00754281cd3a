//! The Python client example (`examples/python`) against the real daemon.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// The fields of the example's patient record.
const FIELDS: [&str; 6] = ["mrn", "name", "ssn", "date_of_birth", "diagnosis", "notes"];

#[test]
fn patient_record_example_round_trips_through_the_daemon() {
    let python = std::env::var_os("PHISEAL_PYTHON").unwrap_or_else(|| {
        panic!(
            "PHISEAL_PYTHON is not set: run scripts/test (it creates the virtualenv and sets \
             it), or set PHISEAL_PYTHON to the python of a virtualenv with \
             examples/python/requirements.txt installed (python3 -m venv V && V/bin/pip \
             install -r examples/python/requirements.txt && export PHISEAL_PYTHON=V/bin/python)"
        )
    });
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../..");
    let d = Daemon::embedded();
    let output = Command::new(&python)
        .arg("examples/python/patient_record.py")
        .arg("--socket")
        .arg(&d.socket)
        .arg("--create-tenant")
        .current_dir(&root)
        .env_remove("PHISEAL_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("cannot run PHISEAL_PYTHON={}: {e}", python.display()));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "patient_record.py failed\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
    );
    assert_eq!(
        stdout.lines().next(),
        Some("created tenant clinic-demo: key version 1"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("python client: ok"), "{stdout}");
    // A token gRPC cannot send (here non-ASCII) is refused by the client without showing it
    // (grpc-python's own error would quote the metadata, token included).
    let refused = Command::new(&python)
        .arg("examples/python/patient_record.py")
        .arg("--socket")
        .arg(&d.socket)
        .current_dir(&root)
        .env("PHISEAL_TOKEN", "s3cr3t-t\u{f6}ken")
        .output()
        .unwrap();
    let refused_err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{refused_err}");
    assert!(
        refused_err.contains("the service token is not valid") && !refused_err.contains("s3cr3t"),
        "{refused_err}"
    );
    // The demo prints ciphertexts, never a plaintext value.
    for value in ["078-05-1120", "Jane Q. Testpatient", "MRN-00417723"] {
        assert!(!stdout.contains(value), "{value} in {stdout}");
    }

    // The daemon audited one encrypt and one decrypt of each field of the record, and the
    // refused decrypt of the ssn ciphertext under the field name "name".
    let records = audit_records(&d.audit_log());
    let fields_of = |action: &str, result: &str| {
        let mut fields: Vec<String> = records
            .iter()
            .filter(|r| {
                r["action"] == action
                    && r["result"] == result
                    && r["tenant"] == "clinic-demo"
                    && r["record"] == "pt-7f3c9a52"
                    && r["actor"] == format!("uid:{}", rustix::process::getuid().as_raw())
            })
            .map(|r| r["field"].as_str().unwrap().to_owned())
            .collect();
        fields.sort();
        fields
    };
    let mut all: Vec<String> = FIELDS.iter().map(|f| (*f).to_owned()).collect();
    all.sort();
    assert_eq!(fields_of("encrypt", "ok"), all);
    // Each field once, and the mrn again in the batch with one bad item.
    let mut decrypted = all.clone();
    decrypted.push("mrn".to_owned());
    decrypted.sort();
    assert_eq!(fields_of("decrypt", "ok"), decrypted);
    // That bad item: refused alone, under the request id its batch's good item has.
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["tenant"] == "no-such-tenant" && r["result"] == "tenant_not_found")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    // The request id the Python client reported for the failed item is the audited one.
    let reported = stdout
        .lines()
        .find_map(|l| l.split("(request id ").nth(1))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no request id printed: {stdout}"));
    assert_eq!(refused[0]["request_id"], reported, "{stdout}");
    assert!(
        records.iter().any(|r| r["action"] == "decrypt"
            && r["result"] == "ok"
            && r["field"] == "mrn"
            && r["request_id"] == refused[0]["request_id"]),
        "{refused:?}"
    );
    assert_eq!(fields_of("decrypt", "decryption_failed"), ["name"]);
    assert_eq!(
        fields_of("encrypt", "decryption_failed"),
        Vec::<String>::new()
    );
    // The searchable columns and the streamed referral, audited under their own actions.
    let count = |action: &str, result: &str| {
        records
            .iter()
            .filter(|r| r["action"] == action && r["result"] == result)
            .count()
    };
    assert_eq!(count("encrypt_deterministic", "ok"), 1);
    assert_eq!(count("deterministic_query", "ok"), 1);
    assert_eq!(count("blind_index", "ok"), 1);
    assert_eq!(count("blind_index_query", "ok"), 1);
    assert_eq!(count("encrypt_stream", "ok"), 1);
    assert_eq!(count("decrypt_stream", "ok"), 1);
    // Both decryptions (whole, and truncated) recorded their attempt before any plaintext.
    assert_eq!(count("decrypt_stream", "attempt"), 2);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["action"] == "decrypt_stream"
                && r["result"] != "ok"
                && r["result"] != "attempt")
            .count(),
        1
    );
    let text = d.audit_text();
    for value in ["078-05-1120", "Jane Q. Testpatient", "MRN-00417723"] {
        assert!(!text.contains(value), "{value} in the audit log");
    }
}
