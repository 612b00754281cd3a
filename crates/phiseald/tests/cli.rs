//! End-to-end tests of the `phiseal` CLI: the real binary against the real `phiseald`, every
//! command, its output and its exit code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// `COMMAND --tenant T --field F [--record R]`.
fn field_args<'a>(
    command: &'a str,
    tenant: &'a str,
    field: &'a str,
    record: Option<&'a str>,
) -> Vec<&'a str> {
    let mut args = vec![command, "--tenant", tenant, "--field", field];
    if let Some(record) = record {
        args.extend(["--record", record]);
    }
    args
}

/// Encrypts `plaintext` with the CLI; returns the `phs1:` text (its one line, trimmed).
#[track_caller]
fn encrypt(
    d: &Daemon,
    tenant: &str,
    field: &str,
    record: Option<&str>,
    plaintext: &[u8],
) -> String {
    let text = d
        .cli(&field_args("encrypt", tenant, field, record), plaintext)
        .expect(0)
        .out();
    assert!(
        text.starts_with("phs1:") && text.ends_with('\n') && text.matches('\n').count() == 1,
        "{text:?}"
    );
    text.trim_end().to_owned()
}

/// Decrypts with the CLI; returns the raw plaintext.
#[track_caller]
fn decrypt(d: &Daemon, tenant: &str, field: &str, record: Option<&str>, text: &str) -> Vec<u8> {
    d.cli(
        &field_args("decrypt", tenant, field, record),
        text.as_bytes(),
    )
    .expect(0)
    .stdout
}

/// The key version in a `phs1:` ciphertext's header.
#[track_caller]
fn key_version(text: &str) -> u32 {
    let binary = phiseal::format::from_text(text).unwrap();
    phiseal::format::parse(&binary).unwrap().key_version
}

/// Runs the CLI against `d` with extra environment variables.
fn cli_env(d: &Daemon, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> CliRun {
    let mut cmd = cli_command(&bin("phiseal"), &d.socket);
    cmd.args(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    run_cli(&mut cmd, stdin)
}

/// The audit records of one action, in log order.
fn records_of(d: &Daemon, action: &str) -> Vec<Value> {
    audit_records(&d.audit_log())
        .into_iter()
        .filter(|r| r["action"] == action)
        .collect()
}

/// `(actor, action, tenant, field, result)` of a record, for compact comparisons.
fn summary(r: &Value) -> (String, String, String, String, String) {
    let s = |key: &str| r[key].as_str().unwrap_or("-").to_owned();
    (
        s("actor"),
        s("action"),
        s("tenant"),
        s("field"),
        s("result"),
    )
}

fn row(
    actor: &str,
    action: &str,
    tenant: &str,
    field: &str,
    result: &str,
) -> (String, String, String, String, String) {
    (
        actor.into(),
        action.into(),
        tenant.into(),
        field.into(),
        result.into(),
    )
}

/// A timestamp truncated to the second, as the `key status` table shows it.
fn to_the_second(rfc3339: &str) -> String {
    let t: jiff::Timestamp = rfc3339.parse().unwrap();
    jiff::Timestamp::from_second(t.as_second())
        .unwrap()
        .to_string()
}

#[test]
fn tenant_create_and_key_commands() {
    let d = Daemon::embedded();
    let run = d.cli(&["tenant", "create", "acme"], b"").expect(0);
    assert_eq!(run.out(), "created tenant 'acme' (key version 1)\n");
    assert_eq!(run.stderr, "");
    let run = d.cli(&["tenant", "create", "acme"], b"").expect(1);
    assert_eq!(
        run.stderr,
        "phiseal: create tenant 'acme': tenant 'acme' already exists (tenant_exists)\n"
    );
    assert!(run.stdout.is_empty());
    let run = d
        .cli(&["--json", "tenant", "create", "globex"], b"")
        .expect(0);
    assert_eq!(run.out(), "{\"key_version\":1,\"tenant\":\"globex\"}\n");

    let run = d.cli(&["key", "rotate", "--tenant", "acme"], b"").expect(0);
    assert_eq!(
        run.out(),
        "rotated tenant 'acme': the primary key version is now 2\n"
    );
    let run = d
        .cli(&["key", "rotate", "--tenant", "acme", "--json"], b"")
        .expect(0);
    assert_eq!(run.json(), json!({ "tenant": "acme", "key_version": 3 }));

    let run = d
        .cli(
            &["key", "min-version", "--tenant", "acme", "--version", "2"],
            b"",
        )
        .expect(0);
    assert_eq!(
        run.out(),
        "tenant 'acme': the minimum decryption version is now 2\n"
    );
    let run = d
        .cli(
            &[
                "key",
                "min-version",
                "--tenant",
                "globex",
                "--version",
                "1",
                "--json",
            ],
            b"",
        )
        .expect(0);
    assert_eq!(
        run.out(),
        "{\"min_decryption_version\":1,\"tenant\":\"globex\"}\n"
    );
    // Above the primary version: refused by the daemon, nothing changes.
    let run = d
        .cli(
            &["key", "min-version", "--tenant", "acme", "--version", "4"],
            b"",
        )
        .expect(1);
    assert_eq!(
        run.stderr,
        "phiseal: set the minimum decryption version of tenant 'acme': invalid minimum \
         decryption version: must be between 1 and the primary key version (invalid_input)\n"
    );
    // 0 is a usage error: the CLI refuses it before calling.
    d.cli(
        &["key", "min-version", "--tenant", "acme", "--version", "0"],
        b"",
    )
    .expect(2);
    // Lowering it (bringing version 1 back) must be asked for; --if-current guards against
    // a change made since the operator looked.
    let run = d
        .cli(
            &["key", "min-version", "--tenant", "acme", "--version", "1"],
            b"",
        )
        .expect(1);
    assert!(
        run.stderr.contains("is below the current minimum")
            && run.stderr.ends_with("(invalid_input)\n"),
        "{}",
        run.stderr
    );
    let lower = |current: &str| {
        d.cli(
            &[
                "key",
                "min-version",
                "--tenant",
                "acme",
                "--version",
                "1",
                "--allow-lower",
                "--if-current",
                current,
            ],
            b"",
        )
    };
    let run = lower("1").expect(1);
    assert!(
        run.stderr.ends_with("(concurrent_change)\n"),
        "{}",
        run.stderr
    );
    lower("2").expect(0);
    d.cli(
        &["key", "min-version", "--tenant", "acme", "--version", "2"],
        b"",
    )
    .expect(0);

    let status = d
        .cli(&["key", "status", "--tenant", "acme", "--json"], b"")
        .expect(0)
        .json();
    assert_eq!(status["tenant"], "acme");
    assert_eq!(status["primary_version"], 3);
    assert_eq!(status["min_decryption_version"], 2);
    assert_eq!(status["shredded_at"], Value::Null);
    let versions = status["versions"].as_array().unwrap();
    let described: Vec<(u64, &str, bool)> = versions
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["state"].as_str().unwrap(),
                v["decrypts"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            (1, "decrypt_only", false),
            (2, "decrypt_only", true),
            (3, "primary", true)
        ]
    );
    let root_key_ref = versions[0]["root_key_ref"].as_str().unwrap();
    assert!(root_key_ref.starts_with("local:"), "{root_key_ref}");
    let created: Vec<jiff::Timestamp> = versions
        .iter()
        .map(|v| v["created_at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] <= w[1]), "{created:?}");

    // The same status for a person: a header and an aligned table.
    let text = d
        .cli(&["key", "status", "--tenant", "acme"], b"")
        .expect(0)
        .out();
    let mut want = String::from(
        "tenant: acme\nprimary version: 3\nminimum decryption version: 2\n\n\
         VERSION  STATE         DECRYPTS  CREATED               ROOT KEY REF\n",
    );
    for v in versions {
        want.push_str(&format!(
            "{:<7}  {:<12}  {:<8}  {:<20}  {}\n",
            v["version"].as_u64().unwrap(),
            v["state"].as_str().unwrap(),
            if v["decrypts"] == true { "yes" } else { "no" },
            to_the_second(v["created_at"].as_str().unwrap()),
            v["root_key_ref"].as_str().unwrap()
        ));
    }
    assert_eq!(text, want);

    // Every administrative call is audited as the caller's uid, attempt then result.
    let rotations: Vec<String> = records_of(&d, "rotate_key")
        .iter()
        .map(|r| format!("{} {} {}", r["actor"], r["result"], r["key_version"]))
        .collect();
    assert_eq!(
        rotations,
        [
            "\"uid:0\" \"attempt\" null",
            "\"uid:0\" \"ok\" 2",
            "\"uid:0\" \"attempt\" null",
            "\"uid:0\" \"ok\" 3"
        ]
    );
}

#[test]
fn a_value_over_the_message_limit_says_what_to_use_instead() {
    let d = Daemon::embedded();
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    let big = vec![b'x'; 5 << 20];
    let run = d
        .cli(&field_args("encrypt", "acme", "notes", None), &big)
        .expect(1);
    assert!(
        run.stderr.contains("OutOfRange") || run.stderr.contains("out_of_range"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("encrypt-file"), "{}", run.stderr);
}

#[test]
fn an_endless_stdin_is_refused_after_64_mib_without_reading_on() {
    use std::io::Write;
    // No daemon: the value is read before the command connects.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = cli_command(&bin("phiseal"), &dir.path().join("none.sock"));
    cmd.args(field_args("encrypt", "acme", "notes", None));
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    // Writes until the command closes its end (a broken pipe), counting what it accepted.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut written = 0u64;
        while input.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
            assert!(written < 256 << 20, "phiseal kept reading past 256 MiB");
        }
        written
    });
    let output = child.wait_with_output().unwrap();
    let written = writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("more than 64 MiB") && stderr.contains("encrypt-file"),
        "{stderr}"
    );
    // It stopped at the limit (plus what the pipe buffers), not at the end of the input.
    assert!(written < 128 << 20, "{written} bytes were accepted");
    assert!(output.stdout.is_empty());
}

#[test]
fn encrypt_and_decrypt_raw_bytes() {
    let d = Daemon::embedded();
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    // Not UTF-8, a NUL, and whitespace and newlines at the end: all of it is the plaintext.
    let plaintext: &[u8] = b"\xff\xfe123-45-6789\n\0\x80 \r\n";
    let ct = encrypt(&d, "acme", "ssn", Some("p1"), plaintext);
    assert_eq!(key_version(&ct), 1);
    // Whitespace around the ciphertext is ignored; the plaintext comes back byte for byte,
    // without a newline added.
    let run = d
        .cli(
            &field_args("decrypt", "acme", "ssn", Some("p1")),
            format!("\n  {ct}  \r\n").as_bytes(),
        )
        .expect(0);
    assert_eq!(run.stdout, plaintext);
    assert_eq!(run.stderr, "");
    let empty = encrypt(&d, "acme", "ssn", None, b"");
    assert_eq!(decrypt(&d, "acme", "ssn", None, &empty), b"");

    // --json on both sides.
    let mut args = vec!["--json"];
    args.extend(field_args("encrypt", "acme", "ssn", Some("p1")));
    let v = d.cli(&args, plaintext).expect(0).json();
    assert_eq!(v["key_version"], 1);
    let json_ct = v["ciphertext"].as_str().unwrap().to_owned();
    assert_eq!(key_version(&json_ct), 1);
    assert_ne!(json_ct, ct, "every encryption uses a fresh nonce");
    let mut args = field_args("decrypt", "acme", "ssn", Some("p1"));
    args.push("--json");
    let run = d.cli(&args, json_ct.as_bytes()).expect(0);
    assert_eq!(
        run.out(),
        "{\"plaintext_base64\":\"//4xMjMtNDUtNjc4OQoAgCANCg==\",\"key_version\":1}\n"
    );

    // The context is authenticated: another field or record is refused, with no output.
    let refused = "phiseal: decrypt: decryption failed: the ciphertext is not authentic under \
                   this tenant, field and record (decryption_failed)\n";
    for (field, record) in [("dob", Some("p1")), ("ssn", Some("p2")), ("ssn", None)] {
        let run = d
            .cli(&field_args("decrypt", "acme", field, record), ct.as_bytes())
            .expect(1);
        assert_eq!(run.stderr, refused);
        assert!(run.stdout.is_empty());
    }
    // So is a tampered ciphertext (the last character of the tag changed).
    let mut tampered = ct.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let run = d
        .cli(
            &field_args("decrypt", "acme", "ssn", Some("p1")),
            tampered.as_bytes(),
        )
        .expect(1);
    assert!(run.stdout.is_empty());
    assert!(!run.stderr.contains(&ct[5..]), "{}", run.stderr);
    // Input that is no ciphertext at all is refused without being echoed.
    let run = d
        .cli(
            &field_args("decrypt", "acme", "ssn", None),
            b"SECRET-PHI-VALUE",
        )
        .expect(1);
    assert!(
        run.stderr
            .starts_with("phiseal: decrypt: stdin is not a phs1: ciphertext ("),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("SECRET"), "{}", run.stderr);

    // Audited with the record id, never with the plaintext.
    let encrypts: Vec<_> = records_of(&d, "encrypt")
        .iter()
        .map(|r| format!("{} {} {}", r["field"], r["record"], r["result"]))
        .collect();
    assert_eq!(
        encrypts,
        [
            "\"ssn\" \"p1\" \"ok\"",
            "\"ssn\" null \"ok\"",
            "\"ssn\" \"p1\" \"ok\""
        ]
    );
    let failed = records_of(&d, "decrypt")
        .iter()
        .filter(|r| r["result"] == "decryption_failed")
        .count();
    assert_eq!(failed, 4);
    assert!(!d.audit_text().contains("123-45-6789"));
}

#[test]
fn unknown_tenant_is_exit_4() {
    let d = Daemon::embedded();
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    let ct = encrypt(&d, "acme", "ssn", None, b"x");
    let not_found = |what: &str| {
        format!(
            "phiseal: {what}: tenant 'nobody-here' not found: create it first (tenant_not_found)\n"
        )
    };
    let cases: [(&[&str], &[u8], String); 6] = [
        (
            &["key", "status", "--tenant", "nobody-here"],
            b"",
            not_found("key status of tenant 'nobody-here'"),
        ),
        (
            &["key", "rotate", "--tenant", "nobody-here"],
            b"",
            not_found("rotate the key of tenant 'nobody-here'"),
        ),
        (
            &[
                "key",
                "min-version",
                "--tenant",
                "nobody-here",
                "--version",
                "1",
            ],
            b"",
            not_found("set the minimum decryption version of tenant 'nobody-here'"),
        ),
        (
            &["encrypt", "--tenant", "nobody-here", "--field", "ssn"],
            b"x",
            not_found("encrypt"),
        ),
        (
            &["decrypt", "--tenant", "nobody-here", "--field", "ssn"],
            ct.as_bytes(),
            not_found("decrypt"),
        ),
        (
            &["shred", "--tenant", "nobody-here", "--yes"],
            b"",
            not_found("shred tenant 'nobody-here'"),
        ),
    ];
    for (args, stdin, stderr) in cases {
        let run = d.cli(args, stdin).expect(4);
        assert_eq!(run.stderr, stderr, "{args:?}");
        assert!(run.stdout.is_empty(), "{args:?}");
    }
}

/// One line of the rewrap fixture: the input line and what the output line must be.
#[derive(Clone)]
struct Case {
    /// The input line (without its newline).
    input: String,
    /// The expected output line; for a rewrapped line `NEW` marks the new ciphertext.
    output: String,
    /// For a rewrapped line: the field, record and plaintext of its ciphertext.
    rewrapped: Option<(&'static str, Option<&'static str>, &'static [u8])>,
}

/// Creates tenant `acme` with ciphertexts under key version 1, rotates to version 2 (with
/// the CLI), and returns the lines of a rewrap input (for `--field ssn`) covering every kind
/// of line.
#[test]
fn json_errors_are_json() {
    let mut cmd = cli_command(&bin("phiseal"), Path::new("/nonexistent.sock"));
    cmd.args(["--json", "tenant", "create", "t"]);
    let done = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(5), "{stderr}");
    assert!(done.stdout.is_empty());
    let error: Value =
        serde_json::from_str(stderr.trim_end()).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(error["error"]["exit_code"], 5, "{stderr}");
    assert_eq!(error["error"]["kind"], "unavailable", "{stderr}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/nonexistent.sock")),
        "{stderr}"
    );

    // A usage error (clap's own) is JSON too under --json, with exit 2.
    for args in [
        &["--json", "key", "rotate"][..],
        &["key", "rotate", "--tenant", "t", "--json", "--no-such-flag"][..],
    ] {
        let mut cmd = cli_command(&bin("phiseal"), Path::new("/nonexistent.sock"));
        cmd.args(args);
        let done = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(2), "{args:?}: {stderr}");
        let error: Value = serde_json::from_str(stderr.trim_end())
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {stderr}"));
        assert_eq!(error["error"]["kind"], "usage", "{stderr}");
        assert_eq!(error["error"]["exit_code"], 2, "{stderr}");
    }
}

#[test]
fn rewrap_refuses_to_append_to_its_own_input() {
    // `phiseal rewrap --input x >> x` would read its own output until the disk is full.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.txt");
    std::fs::write(&file, b"phs1:AAAA\n").unwrap();
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    let mut cmd = cli_command(&bin("phiseal"), Path::new("/nonexistent.sock"));
    cmd.args(["rewrap", "--field", "f", "--tenant", "t", "--input"])
        .arg(&file)
        .stdout(out);
    let done = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("standard output is the input file"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"phs1:AAAA\n");
}

fn rewrap_fixture(d: &Daemon) -> Vec<Case> {
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    let a = encrypt(d, "acme", "ssn", None, b"plain-a");
    let c = encrypt(d, "acme", "ssn", Some("r7"), b"json-c");
    let bad = encrypt(d, "acme", "ssn", Some("r-d"), b"json-d");
    let e = encrypt(d, "acme", "ssn", None, b"crlf-e");
    let f = encrypt(d, "acme", "dob", Some("r8"), b"json-f");
    for ct in [&a, &c, &bad, &e, &f] {
        assert_eq!(key_version(ct), 1);
    }
    d.cli(&["key", "rotate", "--tenant", "acme"], b"").expect(0);
    let b = encrypt(d, "acme", "ssn", None, b"current-b");
    assert_eq!(key_version(&b), 2);
    let same = |line: String| Case {
        output: line.clone(),
        input: line,
        rewrapped: None,
    };
    vec![
        // 1: a plain line, context from --field.
        Case {
            input: a,
            output: "NEW".into(),
            rewrapped: Some(("ssn", None, b"plain-a")),
        },
        // 2: empty, passed through.
        same(String::new()),
        // 3: already under the primary version.
        same(b),
        // 4: JSON with extra members: kept in order, values byte for byte.
        Case {
            input: format!(r#"{{"id": 7, "record": "r7", "ciphertext": "{c}", "x": [1, 2.0]}}"#),
            output: r#"{"id":7,"record":"r7","ciphertext":"NEW","x":[1, 2.0]}"#.into(),
            rewrapped: Some(("ssn", Some("r7"), b"json-c")),
        },
        // 5: not a ciphertext.
        same("garbage".into()),
        // 6: the wrong record: the daemon cannot authenticate it.
        same(format!(r#"{{"record": "bad", "ciphertext": "{bad}"}}"#)),
        // 7: a CRLF line keeps its CR.
        Case {
            input: format!("{e}\r"),
            output: "NEW\r".into(),
            rewrapped: Some(("ssn", None, b"crlf-e")),
        },
        // 8: JSON naming its own field, overriding --field.
        Case {
            input: format!(r#"{{"field":"dob","ciphertext":"{f}","record":"r8"}}"#),
            output: r#"{"field":"dob","ciphertext":"NEW","record":"r8"}"#.into(),
            rewrapped: Some(("dob", Some("r8"), b"json-f")),
        },
    ]
}

fn rewrap_input(cases: &[Case]) -> String {
    cases.iter().map(|c| format!("{}\n", c.input)).collect()
}

/// The first `phs1:` ciphertext in `line`.
fn ciphertext_in(line: &str) -> &str {
    let start = line.find("phs1:").unwrap_or_else(|| panic!("{line:?}"));
    let rest = &line[start..];
    let len = 5 + rest[5..]
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .unwrap_or(rest.len() - 5);
    &rest[..len]
}

/// Checks a rewrap output against the fixture: every line in place, in its shape, each
/// rewrapped ciphertext under key version 2 and decrypting (with the CLI) to its plaintext.
#[track_caller]
fn check_rewrap_output(d: &Daemon, cases: &[Case], output: &str) {
    let lines: Vec<&str> = output
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("output does not end in a newline: {output:?}"))
        .split('\n')
        .collect();
    assert_eq!(lines.len(), cases.len(), "{output}");
    for (n, (case, line)) in cases.iter().zip(lines).enumerate() {
        match case.rewrapped {
            None => assert_eq!(line, case.output, "line {}", n + 1),
            Some((field, record, plaintext)) => {
                let new = ciphertext_in(line);
                assert_eq!(line, case.output.replacen("NEW", new, 1), "line {}", n + 1);
                assert_eq!(key_version(new), 2, "line {}", n + 1);
                assert_eq!(decrypt(d, "acme", field, record, new), plaintext);
            }
        }
    }
}

/// The sizes of the Rewrap calls in the audit log (items per request id, in order).
fn rewrap_calls(d: &Daemon) -> Vec<usize> {
    let mut calls: Vec<(String, usize)> = Vec::new();
    for r in records_of(d, "rewrap") {
        let id = r["request_id"].as_str().unwrap().to_owned();
        match calls.last_mut() {
            Some((last, n)) if *last == id => *n += 1,
            _ => calls.push((id, 1)),
        }
    }
    calls.into_iter().map(|(_, n)| n).collect()
}

#[test]
fn rewrap_after_a_real_rotation_keeps_every_line_in_place() {
    let d = Daemon::embedded();
    let cases = rewrap_fixture(&d);
    let input = rewrap_input(&cases);
    let run = d
        .cli(
            &[
                "rewrap", "--tenant", "acme", "--field", "ssn", "--batch", "3",
            ],
            input.as_bytes(),
        )
        .expect(7);
    let output = run.out();
    check_rewrap_output(&d, &cases, &output);
    let err: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(err.len(), 4, "{}", run.stderr);
    assert!(
        err[0].starts_with("line 5: malformed_ciphertext: not a phs1: ciphertext: "),
        "{}",
        run.stderr
    );
    assert_eq!(
        err[1..],
        [
            "line 6: decryption_failed: decryption failed: the ciphertext is not authentic \
             under this tenant, field and record",
            "rewrap: 8 lines: 4 rewrapped, 1 already current, 2 failed, 1 empty",
            "phiseal: rewrap: 2 of 8 lines failed and were written unchanged",
        ]
    );
    for case in cases.iter().filter(|c| c.input.contains("phs1:")) {
        let ct = ciphertext_in(&case.input);
        assert!(!run.stderr.contains(&ct[5..]), "{}", run.stderr);
    }
    // Batches of 3 lines, and only the parsable ciphertexts are sent: lines 1 and 3 (2 is
    // empty), 4 and 6 (5 is garbage), 7 and 8. The daemon audited every item.
    assert_eq!(rewrap_calls(&d), [2, 2, 2]);
    let results: Vec<(String, String)> = records_of(&d, "rewrap")
        .iter()
        .map(|r| {
            (
                r["record"].as_str().unwrap_or("-").to_owned(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        results
            .iter()
            .filter(|(_, result)| result != "ok")
            .collect::<Vec<_>>(),
        [&("bad".to_owned(), "decryption_failed".to_owned())]
    );

    // A second pass has nothing left to move: the output is the input, byte for byte.
    let again = d
        .cli(
            &["rewrap", "--tenant", "acme", "--field", "ssn"],
            &run.stdout,
        )
        .expect(7);
    assert_eq!(again.out(), output);
    assert!(
        again
            .stderr
            .contains("rewrap: 8 lines: 0 rewrapped, 5 already current, 2 failed, 1 empty\n"),
        "{}",
        again.stderr
    );

    // Everything moved: version 1 can be retired; the rewrapped lines still decrypt, an old
    // ciphertext does not.
    d.cli(
        &["key", "min-version", "--tenant", "acme", "--version", "2"],
        b"",
    )
    .expect(0);
    check_rewrap_output(&d, &cases, &output);
    let run = d
        .cli(
            &field_args("decrypt", "acme", "ssn", None),
            cases[0].input.as_bytes(),
        )
        .expect(6);
    assert_eq!(
        run.stderr,
        "phiseal: decrypt: key version 1 of tenant 'acme' is retired (minimum decryption \
         version is 2): rewrap data before raising the minimum, or lower it again \
         (key_version_retired)\n"
    );
}

#[test]
fn rewrap_to_a_file_resumes_after_an_interruption() {
    let d = Daemon::embedded();
    let cases = rewrap_fixture(&d);
    let input_file = d.dir.path().join("in.txt");
    std::fs::write(&input_file, rewrap_input(&cases)).unwrap();
    let output_file = d.dir.path().join("out.txt");
    let (i, o) = (input_file.to_str().unwrap(), output_file.to_str().unwrap());
    // `rewrap` of tenant acme, field ssn, from `input` to `output`.
    let rewrap = |input: &Path, output: &Path, more: &[&str]| {
        let mut args = vec!["rewrap", "--tenant", "acme", "--field", "ssn"];
        args.extend(["--input", input.to_str().unwrap()]);
        args.extend(["--output", output.to_str().unwrap()]);
        args.extend(more);
        d.cli(&args, b"")
    };

    // The interrupted run: of the input's first 4 lines, in batches of 3, the first batch
    // was committed and the second (line 4) only half written when it stopped.
    let first_four_file = d.dir.path().join("first-four.txt");
    std::fs::write(&first_four_file, rewrap_input(&cases[..4])).unwrap();
    rewrap(&first_four_file, &output_file, &["--batch", "3"]).expect(0);
    let done = std::fs::read_to_string(&output_file).unwrap();
    check_rewrap_output(&d, &cases[..4], &done);
    let done_lines: Vec<&str> = done.lines().collect();
    let kept: String = done_lines[..3].iter().map(|l| format!("{l}\n")).collect();
    let torn = &done_lines[3][..done_lines[3].len() / 2];
    std::fs::write(&output_file, format!("{kept}{torn}")).unwrap();

    // Without --resume a non-empty output is refused and left alone.
    let args = [
        "rewrap", "--tenant", "acme", "--field", "ssn", "--input", i, "--output", o,
    ];
    let run = d.cli(&args, b"").expect(2);
    assert!(
        run.stderr.contains(&format!(
            "output {o} already exists and is not empty: pass --resume"
        )),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&output_file).unwrap(),
        format!("{kept}{torn}")
    );

    // --resume cuts the torn line, skips the 3 complete ones and does the rest.
    let resumed: Vec<&str> = args.iter().copied().chain(["--resume", "--json"]).collect();
    let run = d.cli(&resumed, b"").expect(7);
    assert!(run.stdout.is_empty());
    // With --json, stderr is JSON lines: notes, failed lines, the summary, the error.
    let lines: Vec<Value> = run
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(
        lines[0]["note"],
        format!(
            "rewrap: cut off a torn last line ({} bytes) of {o}",
            torn.len()
        ),
        "{}",
        run.stderr
    );
    assert!(
        lines[1]["note"]
            .as_str()
            .unwrap()
            .starts_with("rewrap: resuming after line 3")
    );
    // Line numbers count from the start of the input.
    let failed: Vec<(u64, &str)> = lines
        .iter()
        .filter_map(|l| Some((l["line"].as_u64()?, l["kind"].as_str()?)))
        .collect();
    assert_eq!(
        failed,
        [(5, "malformed_ciphertext"), (6, "decryption_failed")]
    );
    assert_eq!(
        lines[4],
        json!({"lines": 5, "rewrapped": 3, "already_current": 0, "failed": 2, "empty": 0,
               "skipped": 3, "earlier_failed": 0})
    );
    assert_eq!(lines[5]["error"]["exit_code"], 7, "{}", run.stderr);
    assert_eq!(lines[5]["error"]["kind"], "partly_failed", "{}", run.stderr);
    let output = std::fs::read_to_string(&output_file).unwrap();
    assert!(output.starts_with(&kept), "the lines done before are kept");
    check_rewrap_output(&d, &cases, &output);

    // The failed lines are listed next to the output (numbers and kinds only).
    let list = std::fs::read_to_string(format!("{o}.failed")).unwrap();
    assert_eq!(
        list,
        "{\"kind\":\"malformed_ciphertext\",\"line\":5}\n{\"kind\":\"decryption_failed\",\"line\":6}\n"
    );

    // Everything is done: another resume has nothing to do, but still counts the two lines
    // that failed (exit 7: the output is not entirely under the primary version).
    let run = d.cli(&resumed, b"").expect(7);
    assert_eq!(std::fs::read_to_string(&output_file).unwrap(), output);
    let summary = run
        .stderr
        .lines()
        .find(|l| l.contains("\"lines\""))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(summary).unwrap(),
        json!({"lines": 0, "rewrapped": 0, "already_current": 0, "failed": 0, "empty": 0,
               "skipped": 8, "earlier_failed": 2})
    );

    // A fresh output file is created with mode 0600.
    let fresh = d.dir.path().join("fresh.txt");
    rewrap(&input_file, &fresh, &[]).expect(7);
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    check_rewrap_output(&d, &cases, &std::fs::read_to_string(&fresh).unwrap());

    // The daemon saw 2 + 1 items from the first run's two batches, 4 from the resumed one
    // (lines 4, 6, 7, 8: nothing committed before was sent again), none from the second
    // resume, 6 from the fresh run.
    assert_eq!(rewrap_calls(&d), [2, 1, 4, 6]);

    // The same rows in another order (a re-export without ORDER BY): refused before anything
    // is written, although each plain line alone would look right.
    let mut reordered = cases.clone();
    reordered.swap(0, 2);
    let reordered_file = d.dir.path().join("reordered.txt");
    std::fs::write(&reordered_file, rewrap_input(&reordered)).unwrap();
    let run = rewrap(&reordered_file, &output_file, &["--resume"]).expect(1);
    assert!(
        run.stderr.contains("are not the ones") && run.stderr.contains("another order"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_to_string(&output_file).unwrap(), output);
    assert_eq!(rewrap_calls(&d), [2, 1, 4, 6], "nothing was sent");
}

#[test]
fn rewrap_stops_with_the_exit_code_of_a_failure_every_line_shares() {
    // A mistyped tenant, a shredded tenant, a plain line without --field: every line would
    // fail the same way, so the run stops with that error's exit code and writes nothing,
    // rather than copying the input and exiting 7 (some lines failed).
    let d = Daemon::embedded();
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    let line = format!("{}\n", encrypt(&d, "acme", "ssn", None, b"v"));
    // More lines than a batch may name missing tenants (16): still one failure for all.
    let lines = line.repeat(20);
    let run = d
        .cli(
            &["rewrap", "--tenant", "acmee", "--field", "ssn"],
            lines.as_bytes(),
        )
        .expect(4);
    assert!(run.stdout.is_empty(), "{}", run.out());
    assert!(run.stderr.contains("(tenant_not_found)"), "{}", run.stderr);
    assert!(
        run.stderr.contains("stopped after 0 complete lines"),
        "{}",
        run.stderr
    );
    let run = d
        .cli(&["rewrap", "--tenant", "acme"], lines.as_bytes())
        .expect(2);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr.contains("line 1 is a plain ciphertext line"),
        "{}",
        run.stderr
    );
    d.cli(&["shred", "--tenant", "acme", "--yes"], b"")
        .expect(0);
    let run = d
        .cli(
            &["rewrap", "--tenant", "acme", "--field", "ssn"],
            lines.as_bytes(),
        )
        .expect(6);
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains("(key_destroyed)"), "{}", run.stderr);
}

#[test]
fn rewrap_goes_on_past_a_batch_of_lines_of_a_field_it_may_not_rewrap() {
    // Grants name fields: a batch whose every line is of a field this identity may not
    // rewrap says nothing of the lines of other fields after it.
    let d = Daemon::with_config(
        "socket = \"{socket}\"\ndata_dir = \"{data_dir}\"\n\
         [[policy]]\nuids = [0]\noperations = [\"admin\"]\ntenants = [\"*\"]\n\
         [[policy]]\nuids = [0]\noperations = [\"encrypt\", \"decrypt\", \"rewrap\"]\n\
         tenants = [\"acme\"]\nfields = [\"allowed\"]\n\
         [[policy]]\nuids = [0]\noperations = [\"encrypt\"]\ntenants = [\"acme\"]\n\
         fields = [\"denied\"]\n",
    );
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    let line = |field: &str, n: u32| {
        let ct = encrypt(&d, "acme", field, None, format!("{field} {n}").as_bytes());
        (
            ct.clone(),
            format!("{{\"field\":\"{field}\",\"ciphertext\":\"{ct}\"}}\n"),
        )
    };
    let lines: Vec<(String, String)> =
        [("denied", 1), ("denied", 2), ("allowed", 3), ("allowed", 4)]
            .into_iter()
            .map(|(field, n)| line(field, n))
            .collect();
    d.cli(&["key", "rotate", "--tenant", "acme"], b"").expect(0);
    let input: String = lines.iter().map(|(_, l)| l.as_str()).collect();
    let run = d
        .cli(
            &["rewrap", "--tenant", "acme", "--batch", "2"],
            input.as_bytes(),
        )
        .expect(7);
    let output = run.out();
    let out: Vec<&str> = output.lines().collect();
    assert_eq!(out.len(), 4, "{output}");
    // The denied field's lines are written back unchanged, the allowed one's rewrapped.
    assert_eq!(out[..2], [lines[0].1.trim_end(), lines[1].1.trim_end()]);
    for (i, written) in out[2..].iter().enumerate() {
        let value: Value = serde_json::from_str(written).unwrap();
        let ct = value["ciphertext"].as_str().unwrap();
        assert_eq!(key_version(ct), 2, "{written}");
        assert_eq!(
            decrypt(&d, "acme", "allowed", None, ct),
            format!("allowed {}", i + 3).as_bytes()
        );
    }
    assert!(
        run.stderr.contains("line 1: permission_denied")
            && run.stderr.contains("line 2: permission_denied"),
        "{}",
        run.stderr
    );
    // In a tenant where it may rewrap no field at all, the daemon refuses the call: the run
    // stops at once (exit 3), nothing written.
    d.cli(&["tenant", "create", "globex"], b"").expect(0);
    let run = d
        .cli(&["rewrap", "--tenant", "globex"], input.as_bytes())
        .expect(3);
    assert!(run.stdout.is_empty(), "{}", run.out());
    assert!(run.stderr.contains("permission_denied"), "{}", run.stderr);
}

#[test]
fn shred_needs_confirmation_then_destroys_every_key() {
    let d = Daemon::embedded();
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    d.cli(&["tenant", "create", "globex"], b"").expect(0);
    let ct = encrypt(&d, "acme", "ssn", Some("r1"), b"to be shredded");

    // Piped stdin is not a terminal: refused even with the tenant id typed on it.
    let run = d.cli(&["shred", "--tenant", "acme"], b"acme\n").expect(2);
    assert_eq!(
        run.stderr,
        "phiseal: refusing to shred tenant 'acme' without confirmation: stdin is not a \
         terminal; pass --yes to confirm non-interactively\n"
    );
    assert!(run.stdout.is_empty());
    assert!(records_of(&d, "shred_tenant").is_empty());
    assert_eq!(
        decrypt(&d, "acme", "ssn", Some("r1"), &ct),
        b"to be shredded"
    );

    let run = d
        .cli(&["shred", "--tenant", "acme", "--yes"], b"")
        .expect(0);
    assert_eq!(
        run.out(),
        "tenant 'acme' shredded: every key version is destroyed; its data can never be \
         decrypted again\n"
    );
    let run = d
        .cli(&["shred", "--tenant", "globex", "--yes", "--json"], b"")
        .expect(0);
    assert_eq!(run.json(), json!({ "tenant": "globex", "shredded": true }));

    let destroyed =
        "key destroyed: tenant 'acme' was shredded; its data cannot be decrypted (key_destroyed)\n";
    let run = d
        .cli(
            &field_args("decrypt", "acme", "ssn", Some("r1")),
            ct.as_bytes(),
        )
        .expect(6);
    assert_eq!(run.stderr, format!("phiseal: decrypt: {destroyed}"));
    assert!(run.stdout.is_empty());
    let run = d
        .cli(&field_args("encrypt", "acme", "ssn", None), b"new")
        .expect(6);
    assert_eq!(run.stderr, format!("phiseal: encrypt: {destroyed}"));

    let status = d
        .cli(&["key", "status", "--tenant", "acme", "--json"], b"")
        .expect(0)
        .json();
    assert_eq!(status["primary_version"], Value::Null);
    assert!(status["shredded_at"].is_string(), "{status}");
    assert_eq!(status["versions"][0]["state"], "destroyed");
    assert_eq!(status["versions"][0]["decrypts"], false);
    assert_eq!(status["versions"][0]["root_key_ref"], "");
    let text = d
        .cli(&["key", "status", "--tenant", "acme"], b"")
        .expect(0)
        .out();
    let shredded_at = to_the_second(status["shredded_at"].as_str().unwrap());
    assert!(
        text.starts_with(&format!(
            "tenant: acme\nprimary version: none\nminimum decryption version: 1\nshredded at: \
             {shredded_at}\n"
        )),
        "{text}"
    );

    let shreds: Vec<_> = records_of(&d, "shred_tenant").iter().map(summary).collect();
    assert_eq!(
        shreds,
        [
            row("uid:0", "shred_tenant", "acme", "-", "attempt"),
            row("uid:0", "shred_tenant", "acme", "-", "ok"),
            row("uid:0", "shred_tenant", "globex", "-", "attempt"),
            row("uid:0", "shred_tenant", "globex", "-", "ok"),
        ]
    );
}

#[test]
fn audit_verify_and_export_on_the_daemon_log() {
    let d = Daemon::embedded();
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    d.cli(&["tenant", "create", "other"], b"").expect(0);
    for record in ["r1", "r2", "r3"] {
        encrypt(&d, "acme", "ssn", Some(record), b"v");
    }
    let ct = encrypt(&d, "other", "ssn", None, b"w");
    decrypt(&d, "other", "ssn", None, &ct);
    encrypt(&d, "acme", "dob", None, b"x");

    let log = d.audit_log();
    let text = d.audit_text();
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    let head = serde_json::from_str::<Value>(lines[n - 1]).unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    // Intact: found through --data-dir, and named by --log.
    let data_dir = d.data_dir.to_str().unwrap();
    let run = d
        .cli(&["audit", "verify", "--data-dir", data_dir], b"")
        .expect(0);
    assert_eq!(
        run.out(),
        format!(
            "audit log: {}\nrecords checked: {n}\nlast seq: {}\nhead hash: {head}\ntorn tail: \
             none\nproblems: 0\nresult: intact\n",
            log.display(),
            n - 1
        )
    );
    let v = d
        .cli(
            &["audit", "verify", "--log", log.to_str().unwrap(), "--json"],
            b"",
        )
        .expect(0)
        .json();
    assert_eq!(v["intact"], true);
    assert_eq!(v["records"], n);
    assert_eq!(v["last_seq"], n - 1);
    assert_eq!(v["head_hash"], head.as_str());
    assert_eq!(v["torn_tail"], Value::Null);
    assert_eq!(v["problem_count"], 0);

    // The head just reported, as an anchor: held. The same hash under another seq: missing
    // (exit 8). A malformed anchor is a usage error.
    let log_arg = log.to_str().unwrap();
    let anchor = format!("{}:{head}", n - 1);
    d.cli(
        &["audit", "verify", "--log", log_arg, "--anchor", &anchor],
        b"",
    )
    .expect(0);
    let wrong = format!("{}:{head}", n + 5);
    let missing = d
        .cli(
            &[
                "audit", "verify", "--log", log_arg, "--anchor", &wrong, "--json",
            ],
            b"",
        )
        .expect(8)
        .json();
    assert_eq!(missing["intact"], false);
    assert_eq!(missing["problems"][0]["kind"], "anchor_missing");
    d.cli(
        &["audit", "verify", "--log", log_arg, "--anchor", "12:xyz"],
        b"",
    )
    .expect(2);

    // Export: exactly the tenant's records, as they are in the log.
    let acme: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["tenant"] == "acme")
        .collect();
    assert!(acme.len() >= 6, "{text}");
    let run = cli_env(
        &d,
        &["audit", "export", "--tenant", "acme"],
        b"",
        &[("PHISEAL_DATA_DIR", data_dir)],
    )
    .expect(0);
    // An exported record is its line without the chain members `prev` and `hash`.
    let exported = |l: &str| format!("{}}}\n", &l[..l.find(r#","prev":"#).unwrap()]);
    let want: String = acme.iter().map(|l| exported(l)).collect();
    assert_eq!(run.out(), want);
    assert_eq!(
        run.stderr,
        format!(
            "audit export: {} records of tenant 'acme' exported; {n} records verified (last \
             seq {}, head hash {head})\n",
            acme.len(),
            n - 1
        )
    );
    // A misspelt id exports nothing and says so; an id no tenant can have is a usage error.
    let run = cli_env(
        &d,
        &["audit", "export", "--tenant", "ACME"],
        b"",
        &[("PHISEAL_DATA_DIR", data_dir)],
    )
    .expect(0);
    assert_eq!(run.out(), "");
    assert!(
        run.stderr
            .starts_with("audit export: 0 records of tenant 'ACME' exported;")
            && run
                .stderr
                .contains("); no record in this range names this tenant (ids are case-sensitive"),
        "{}",
        run.stderr
    );
    let run = cli_env(
        &d,
        &["audit", "export", "--tenant", ""],
        b"",
        &[("PHISEAL_DATA_DIR", data_dir)],
    )
    .expect(2);
    assert!(
        run.stderr.contains("audit export: --tenant:"),
        "{}",
        run.stderr
    );
    // --since (inclusive) and --until (exclusive) select by time.
    let time = |l: &str| -> jiff::Timestamp {
        serde_json::from_str::<Value>(l).unwrap()["time"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (since, until) = (time(acme[2]), time(acme[acme.len() - 1]));
    let want: String = acme
        .iter()
        .filter(|l| time(l) >= since && time(l) < until)
        .map(|l| exported(l))
        .collect();
    assert!(!want.is_empty());
    let (since_arg, until_arg) = (since.to_string(), until.to_string());
    let run = d
        .cli(
            &[
                "audit",
                "export",
                "--tenant",
                "acme",
                "--log",
                log.to_str().unwrap(),
                "--since",
                &since_arg,
                "--until",
                &until_arg,
            ],
            b"",
        )
        .expect(0);
    assert_eq!(run.out(), want);

    // A copy with one byte flipped in record line 4 (the case of a tenant name's first
    // letter: still valid JSON, but no longer the record that was hashed).
    let copy = d.dir.path().join("copy.log");
    let mut bytes = text.clone().into_bytes();
    let line4 = lines[..3].iter().map(|l| l.len() + 1).sum::<usize>();
    let at = line4
        + lines[3]
            .find("\"tenant\":\"")
            .expect("line 4 names a tenant")
        + 10;
    bytes[at] ^= 0x20;
    std::fs::write(&copy, &bytes).unwrap();
    let copy_arg = copy.to_str().unwrap();
    let run = d
        .cli(&["audit", "verify", "--log", copy_arg], b"")
        .expect(8);
    assert!(
        run.out()
            .contains("\nproblems: 1\n  line 4: hash_mismatch: "),
        "{}",
        run.out()
    );
    assert!(
        run.out().ends_with("\nresult: NOT INTACT\n"),
        "{}",
        run.out()
    );
    assert_eq!(
        run.stderr,
        format!("phiseal: audit log {copy_arg}: verification failed: 1 problem(s)\n")
    );
    let v = d
        .cli(&["audit", "verify", "--log", copy_arg, "--json"], b"")
        .expect(8)
        .json();
    assert_eq!(v["intact"], false);
    assert_eq!(v["problem_count"], 1);
    assert_eq!(v["problems"][0]["kind"], "hash_mismatch");
    assert_eq!(v["problems"][0]["line"], 4);
    d.cli(
        &["audit", "export", "--tenant", "acme", "--log", copy_arg],
        b"",
    )
    .expect(8);

    // A copy ending in a torn record: not intact either, and not exported.
    let torn = d.dir.path().join("torn.log");
    std::fs::write(&torn, format!("{text}{{\"seq\":{n},\"time\":\"20")).unwrap();
    let torn_arg = torn.to_str().unwrap();
    let v = d
        .cli(&["audit", "verify", "--log", torn_arg, "--json"], b"")
        .expect(8)
        .json();
    assert_eq!(v["problem_count"], 0);
    assert_eq!(
        v["torn_tail"],
        json!({ "offset": text.len(), "len": format!("{{\"seq\":{n},\"time\":\"20").len() })
    );
    let run = d
        .cli(
            &["audit", "export", "--tenant", "acme", "--log", torn_arg],
            b"",
        )
        .expect(8);
    assert_eq!(
        run.out(),
        acme.iter().map(|l| exported(l)).collect::<String>()
    );
    assert!(
        run.stderr.contains("ends in a torn record"),
        "{}",
        run.stderr
    );
    // With --output, such an export leaves no file (nor its .partial) behind, and says
    // nothing was exported …
    let exported_file = d.dir.path().join("acme-export.jsonl");
    let exported_arg = exported_file.to_str().unwrap();
    let export_to = |log: &str| {
        d.cli(
            &[
                "audit",
                "export",
                "--tenant",
                "acme",
                "--log",
                log,
                "--output",
                exported_arg,
            ],
            b"",
        )
    };
    let failed = export_to(torn_arg).expect(8);
    assert!(!exported_file.exists());
    let partial = d.dir.path().join("acme-export.jsonl.partial");
    assert!(!partial.exists());
    assert!(
        !failed.stderr.contains("records of tenant"),
        "{}",
        failed.stderr
    );
    // … refuses a dangling symlink at the target before writing anything, and names a
    // .partial left by a killed run (exit 2, not "File exists") …
    std::os::unix::fs::symlink(d.dir.path().join("nowhere"), &exported_file).unwrap();
    let run = export_to(torn_arg).expect(2);
    assert!(run.stderr.contains("exists: refusing"), "{}", run.stderr);
    std::fs::remove_file(&exported_file).unwrap();
    std::fs::write(&partial, b"killed halfway").unwrap();
    let run = export_to(torn_arg).expect(2);
    assert!(
        run.stderr.contains("an earlier run was interrupted"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read(&partial).unwrap(), b"killed halfway");
    std::fs::remove_file(&partial).unwrap();
    // … and a complete one the same records as stdout, in a file only the owner can read.
    let log = d.audit_log();
    let log_arg = log.to_str().unwrap();
    let complete = export_to(log_arg).expect(0);
    assert!(complete.out().is_empty());
    let on_stdout = d
        .cli(
            &["audit", "export", "--tenant", "acme", "--log", log_arg],
            b"",
        )
        .expect(0)
        .out();
    assert_eq!(std::fs::read_to_string(&exported_file).unwrap(), on_stdout);
    assert_eq!(
        std::fs::metadata(&exported_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // An existing file is never overwritten.
    export_to(log_arg).expect(2);

    // `audit recover` saves the torn bytes, cuts them off and records that in the chain.
    std::fs::set_permissions(&torn, std::fs::Permissions::from_mode(0o600)).unwrap();
    let torn_len = format!("{{\"seq\":{n},\"time\":\"20").len();
    let v = d
        .cli(&["audit", "recover", "--log", torn_arg, "--json"], b"")
        .expect(0)
        .json();
    assert_eq!(v["recovered"], true, "{v}");
    assert_eq!(v["offset"], text.len());
    assert_eq!(v["len"], torn_len);
    let saved = std::fs::read(v["saved_to"].as_str().unwrap()).unwrap();
    assert_eq!(saved, format!("{{\"seq\":{n},\"time\":\"20").into_bytes());
    d.cli(&["audit", "verify", "--log", torn_arg], b"")
        .expect(0);
    let recovered = std::fs::read_to_string(&torn).unwrap();
    assert!(
        recovered.starts_with(&text),
        "the records before it are kept"
    );
    assert!(
        recovered
            .lines()
            .last()
            .unwrap()
            .contains("recovered_torn_tail")
    );
    let again = d
        .cli(&["audit", "recover", "--log", torn_arg], b"")
        .expect(0);
    assert!(
        again.out().contains("nothing to recover"),
        "{}",
        again.out()
    );
    // An export of the recovered log says that records may be missing since the crash.
    let run = d
        .cli(
            &["audit", "export", "--tenant", "acme", "--log", torn_arg],
            b"",
        )
        .expect(0);
    assert_eq!(
        run.out(),
        acme.iter().map(|l| exported(l)).collect::<String>()
    );
    assert!(
        run.stderr.contains(&format!(
            "; the log records 1 recovery(ies) from a crash (seq {n}): records of any tenant \
             acknowledged just before it may be missing"
        )),
        "{}",
        run.stderr
    );

    // The daemon's own log was never touched. A log in a directory that does not exist is a
    // wrong path (exit 1); one missing from a directory that exists may have been deleted
    // (exit 8, the audit-problem code), for verify and export alike.
    d.cli(&["audit", "verify", "--data-dir", data_dir], b"")
        .expect(0);
    d.cli(&["audit", "verify", "--log", "/nonexistent/audit.log"], b"")
        .expect(1);
    let emptied = tempfile::tempdir().unwrap();
    let gone = emptied.path().to_str().unwrap();
    for args in [
        vec!["audit", "verify", "--data-dir", gone],
        vec!["audit", "export", "--tenant", "acme", "--data-dir", gone],
    ] {
        let run = d.cli(&args, b"").expect(8);
        assert!(run.stderr.contains("may have been deleted"), "{run:?}");
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[test]
fn token_new_snippet_admits_the_token_and_policy_denials_are_exit_3() {
    // `token new` works offline: the socket is not used.
    let nowhere = Path::new("/nonexistent/phiseald.sock");
    let mut cmd = cli_command(&bin("phiseal"), nowhere);
    cmd.args(["token", "new", "--name", "billing"]);
    let run = run_cli(&mut cmd, b"").expect(0);
    let out = run.out();
    let (token, snippet) = out.split_once("\n\n").unwrap();
    assert!(
        token.starts_with("phst_") && token.len() == 5 + 43,
        "{token}"
    );
    assert_eq!(
        snippet,
        format!(
            "[[tokens]]\nname = \"billing\"\nsha256 = \"{}\"\n",
            sha256_hex(token)
        )
    );
    assert!(
        run.stderr.contains("the token is shown only this once"),
        "{}",
        run.stderr
    );
    let mut cmd = cli_command(&bin("phiseal"), nowhere);
    cmd.args(["token", "new", "--name", "b.2", "--json"]);
    let v = run_cli(&mut cmd, b"").expect(0).json();
    let other = v["token"].as_str().unwrap();
    assert_ne!(other, token);
    assert_eq!(v["name"], "b.2");
    assert_eq!(v["sha256"], sha256_hex(other));
    assert_eq!(
        v["config_toml"],
        format!(
            "[[tokens]]\nname = \"b.2\"\nsha256 = \"{}\"\n",
            sha256_hex(other)
        )
    );
    let mut cmd = cli_command(&bin("phiseal"), nowhere);
    cmd.args(["token", "new", "--name", "a\"b"]);
    run_cli(&mut cmd, b"").expect(2);

    // A daemon whose config is the printed snippet plus a policy for that token only.
    let config = String::from("socket = \"{socket}\"\ndata_dir = \"{data_dir}\"\n\n")
        + snippet
        + "\n[[policy]]\ntokens = [\"billing\"]\noperations = [\"*\"]\ntenants = [\"billing-*\"]\n";
    let d = Daemon::with_config(&config);

    // Without a token, uid 0 matches no rule: a policy denial.
    let run = d.cli(&["tenant", "create", "billing-1"], b"").expect(3);
    assert!(
        run.stderr
            .starts_with("phiseal: create tenant 'billing-1': ")
            && run.stderr.ends_with(" (permission_denied)\n"),
        "{}",
        run.stderr
    );

    // The token from a file: refused while others can read the file, before any call.
    let token_file = d.dir.path().join("billing.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file_arg = token_file.to_str().unwrap();
    let records_before = audit_records(&d.audit_log()).len();
    let run = d
        .cli(
            &["--token-file", file_arg, "tenant", "create", "billing-1"],
            b"",
        )
        .expect(1);
    assert!(run.stderr.contains("mode 0644"), "{}", run.stderr);
    assert!(run.stderr.contains("chmod 600"), "{}", run.stderr);
    assert!(!run.stderr.contains(token), "{}", run.stderr);
    assert_eq!(audit_records(&d.audit_log()).len(), records_before);
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = d
        .cli(
            &["--token-file", file_arg, "tenant", "create", "billing-1"],
            b"",
        )
        .expect(0);
    assert_eq!(run.out(), "created tenant 'billing-1' (key version 1)\n");

    // The token from PHISEAL_TOKEN.
    let env = [("PHISEAL_TOKEN", token)];
    let ct = cli_env(
        &d,
        &field_args("encrypt", "billing-1", "ssn", None),
        b"via env",
        &env,
    )
    .expect(0)
    .out();
    let run = cli_env(
        &d,
        &field_args("decrypt", "billing-1", "ssn", None),
        ct.as_bytes(),
        &env,
    )
    .expect(0);
    assert_eq!(run.stdout, b"via env");

    // The token outside its policy: another policy denial.
    let run = cli_env(&d, &["tenant", "create", "other"], b"", &env).expect(3);
    assert!(
        run.stderr.ends_with(" (permission_denied)\n"),
        "{}",
        run.stderr
    );

    // A wrong token is refused outright, and never echoed.
    let wrong = format!("phst_{}", "A".repeat(43));
    let run = cli_env(
        &d,
        &["key", "status", "--tenant", "billing-1"],
        b"",
        &[("PHISEAL_TOKEN", &wrong)],
    )
    .expect(3);
    assert_eq!(
        run.stderr,
        "phiseal: key status of tenant 'billing-1': the bearer token is not valid \
         (unauthenticated)\n"
    );

    let got: Vec<_> = audit_records(&d.audit_log())
        .iter()
        .filter(|r| {
            r["kind"] != "header" && r["result"] != "attempt" && r["action"] != "unwrap_key"
        })
        .map(summary)
        .collect();
    assert_eq!(
        got,
        [
            row(
                "uid:0",
                "create_tenant",
                "billing-1",
                "-",
                "permission_denied"
            ),
            row("token:billing", "create_tenant", "billing-1", "-", "ok"),
            row("token:billing", "encrypt", "billing-1", "ssn", "ok"),
            row("token:billing", "decrypt", "billing-1", "ssn", "ok"),
            row(
                "token:billing",
                "create_tenant",
                "other",
                "-",
                "permission_denied"
            ),
            row("uid:0", "key_status", "-", "-", "unauthenticated"),
        ]
    );
    let text = d.audit_text();
    assert!(!text.contains(token) && !text.contains(&wrong));
}

#[test]
fn health_says_whether_the_daemon_serves() {
    let mut d = Daemon::embedded();
    let before = audit_records(&d.audit_log()).len();
    let run = d.cli(&["health"], b"").expect(0);
    assert_eq!(
        run.out(),
        format!("phiseald at {} is serving\n", d.socket.display())
    );
    assert_eq!(
        d.cli(&["--json", "health"], b"").expect(0).json()["serving"],
        true
    );
    // Nothing audited: a health check is no access to keys or data.
    assert_eq!(audit_records(&d.audit_log()).len(), before);
    // Every failure is exit 5, also token settings that cannot be read (exit 1 elsewhere).
    let mut cmd = cli_command(&bin("phiseal"), &d.socket);
    cmd.args(["--token-file", "/nonexistent/token", "health"]);
    run_cli(&mut cmd, b"").expect(5);
    // A stopped daemon (and a stale socket file, as a killed one leaves): exit 5.
    d.stop();
    drop(std::os::unix::net::UnixListener::bind(&d.socket).unwrap());
    d.cli(&["health"], b"").expect(5);
}

#[test]
fn root_status_on_a_missing_or_empty_key_store_concludes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("phiseald.toml");
    let write_config = |data_dir: &Path| {
        std::fs::write(
            &config,
            format!(
                "profile = \"development\"\nsocket = \"{}\"\ndata_dir = \"{}\"\n",
                dir.path().join("run/d.sock").display(),
                data_dir.display()
            ),
        )
        .unwrap();
    };
    let root_status = || {
        let mut cmd = cli_command(&bin("phiseal"), Path::new("/nonexistent.sock"));
        cmd.args(["root", "status", "--config"]).arg(&config);
        run_cli(&mut cmd, b"").expect(1)
    };

    // A wrong data directory: refused, and nothing is created there (no key store, no new
    // root key, no audit log).
    let wrong = dir.path().join("wrong");
    write_config(&wrong);
    let run = root_status();
    assert!(
        run.stderr.contains("keys.db does not exist")
            && run.stderr.contains("check --config")
            && run.stdout.is_empty(),
        "{run:?}"
    );
    assert!(!wrong.exists(), "root status created {}", wrong.display());

    // A key store without any key version (a daemon started, no tenant created): `root
    // status` must not say that no old root key is needed any more.
    let mut d = Daemon::embedded();
    d.stop();
    write_config(&d.data_dir);
    let run = root_status();
    assert!(
        run.stderr.contains("holds no tenant key version") && run.stdout.is_empty(),
        "{run:?}"
    );
}

#[test]
fn unreachable_socket_is_exit_5() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on (as a crashed daemon leaves it), and no file at all.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let missing = dir.path().join("missing.sock");
    for socket in [&stale, &missing] {
        let mut cmd = cli_command(&bin("phiseal"), socket);
        cmd.args(["key", "status", "--tenant", "acme"]);
        let run = run_cli(&mut cmd, b"").expect(5);
        assert!(
            run.stderr.starts_with(&format!(
                "phiseal: cannot connect to phiseald at {}: ",
                socket.display()
            )) && run.stderr.ends_with(
                "; check that the daemon runs and that --socket (or PHISEAL_SOCKET) names its \
                 socket\n"
            ),
            "{}",
            run.stderr
        );
    }

    // A daemon that stopped: its socket is gone, so are its answers.
    let mut d = Daemon::embedded();
    // PHISEAL_SOCKET names the socket when --socket is not given.
    let out = std::process::Command::new(bin("phiseal"))
        .args(["tenant", "create", "acme"])
        .env("PHISEAL_SOCKET", &d.socket)
        .env_remove("PHISEAL_TOKEN")
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), out.stdout.as_slice()),
        (
            Some(0),
            b"created tenant 'acme' (key version 1)\n".as_slice()
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
    d.cli(&field_args("encrypt", "acme", "ssn", None), b"x")
        .expect(5);
}

#[test]
fn deadline_is_enforced_against_a_frozen_daemon() {
    let d = Daemon::embedded();
    d.cli(&["tenant", "create", "acme"], b"").expect(0);
    d.signal(rustix::process::Signal::STOP);
    let started = Instant::now();
    let run = d.cli(
        &["--timeout", "1", "key", "status", "--tenant", "acme"],
        b"",
    );
    let took = started.elapsed();
    d.signal(rustix::process::Signal::CONT);
    let run = run.expect(5);
    assert_eq!(
        run.stderr,
        "phiseal: key status of tenant 'acme': no answer within 1 s (--timeout) \
         (deadline_exceeded)\n"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // Thawed, the daemon answers again.
    d.cli(&["key", "status", "--tenant", "acme"], b"").expect(0);
}

/// Fails clearly unless every directory above `path` can be traversed by other users.
fn assert_others_can_reach(path: &Path) {
    for dir in path.ancestors().skip(1) {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} (mode {:04o}) cannot be traversed by uid 65534, so it cannot reach {}: point \
             TMPDIR at a directory every user can traverse",
            dir.display(),
            mode & 0o7777,
            path.display()
        );
    }
}

const NOBODY: u32 = 65534;

/// A copy of the binary `name` in a directory of `d`'s that uid 65534 can reach (the target
/// directory may be under /root).
fn nobody_can_run(d: &Daemon, name: &str) -> PathBuf {
    let bin_dir = d.dir.path().join("nobody-bin");
    if !bin_dir.exists() {
        std::fs::create_dir(&bin_dir).unwrap();
        std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let program = bin_dir.join(name);
    std::fs::copy(bin(name), &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_others_can_reach(&program);
    program
}

/// A daemon config: socket group `nogroup`, uid 0 may do everything, plus `extra`.
fn nogroup_config(data_dir: &str, extra: &str) -> String {
    format!(
        r#"
socket = "{{socket}}"
socket_group = "nogroup"
data_dir = "{data_dir}"

[[policy]]
uids = [0]
operations = ["*"]
tenants = ["*"]
{extra}"#
    )
}

#[test]
fn the_cli_cannot_dump_core() {
    // It holds decrypted values, tokens and (root-key commands) every tenant key: its core
    // size limit is 0 whatever it inherited, from the start (here while it reads stdin).
    let d = Daemon::embedded();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -c unlimited && exec \"$0\" \"$@\"")
        .arg(bin("phiseal"))
        .args(["--socket", d.socket.to_str().unwrap()])
        .args(field_args("decrypt", "clinic", "ssn", None))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    let exe = format!("/proc/{}/exe", child.id());
    let program = std::fs::canonicalize(bin("phiseal")).unwrap();
    let core_limit = || {
        // Only once the shell raised the limit and became the CLI (a shell that could not
        // raise it exits, and its limits would say 0 without the CLI's doing).
        if std::fs::read_link(&exe).ok()? != program {
            return None;
        }
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("Max core file size"))
            .map(|l| {
                l.split_whitespace()
                    .skip(4)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
    };
    let started = Instant::now();
    let mut seen = core_limit();
    while seen.as_deref() != Some("0 0") && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        seen = core_limit();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.as_deref(), Some("0 0"), "core size limit (soft, hard)");
}

#[test]
fn one_uid_cannot_hold_every_call_slot() {
    // Four calls in flight in all, two per uid. uid 0 opens four calls whose messages never
    // finish arriving (held until the server's receive limit, 35 s here): two hold slots, two
    // wait for uid 0's own slots without taking shared ones. uid 65534's call is served at
    // once from the two shared slots left (before: uid 0 held all four, and it waited 35 s).
    assert_eq!(
        rustix::process::getuid().as_raw(),
        0,
        "this test runs the CLI as uid {NOBODY} (nobody), which needs root"
    );
    let d = Daemon::with_config(&nogroup_config(
        "{data_dir}",
        &format!(
            "\n[[policy]]\nuids = [{NOBODY}]\noperations = [\"encrypt\"]\ntenants = [\"clinic\"]\n\
             \n[limits]\nrequest_timeout = \"30s\"\nmax_requests_in_flight = 4\n\
             max_requests_in_flight_per_uid = 2\n"
        ),
    ));
    d.cli(&["tenant", "create", "clinic"], b"").expect(0);
    let program = nobody_can_run(&d, "phiseal");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _stuck: Vec<_> = runtime.block_on(async {
        let mut calls = Vec::new();
        for _ in 0..4 {
            calls.push(stuck_unary_call(&d).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        calls
    });
    let mut cmd = cli_command(&program, &d.socket);
    cmd.args(field_args("encrypt", "clinic", "ssn", None))
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/");
    let mut child = cmd.spawn().unwrap();
    drop(child.stdin.take());
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("uid {NOBODY}'s call waited for the slots uid 0 holds");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn another_user_is_refused_by_the_policy_not_by_file_permissions() {
    assert_eq!(
        rustix::process::getuid().as_raw(),
        0,
        "this test runs the CLI as uid {NOBODY} (nobody), which needs root: run the tests as \
         root (as CI does)"
    );
    let mut a = Daemon::with_config(&nogroup_config("{data_dir}", ""));
    // The socket and its directory belong to the configured group.
    let run_dir = a.socket.parent().unwrap();
    let meta = std::fs::metadata(run_dir).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o750, NOBODY));
    let meta = std::fs::metadata(&a.socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, NOBODY));
    a.cli(&["tenant", "create", "clinic"], b"").expect(0);

    let program = nobody_can_run(&a, "phiseal");
    let as_nobody = |socket: &PathBuf, args: &[&str], stdin: &[u8]| {
        let mut cmd = cli_command(&program, socket);
        cmd.args(args).uid(NOBODY).gid(NOBODY).current_dir("/");
        run_cli(&mut cmd, stdin)
    };
    let encrypt_args = field_args("encrypt", "clinic", "ssn", Some("p1"));

    // uid 65534 reaches the daemon (group nogroup) but the policy grants it nothing.
    let run = as_nobody(&a.socket, &encrypt_args, b"nobody's value").expect(3);
    assert!(
        run.stderr.starts_with("phiseal: encrypt: ")
            && run.stderr.ends_with(" (permission_denied)\n"),
        "{}",
        run.stderr
    );
    let denied: Vec<Value> = audit_records(&a.audit_log())
        .into_iter()
        .filter(|r| r["actor"] == format!("uid:{NOBODY}"))
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(
        summary(&denied[0]),
        row("uid:65534", "encrypt", "clinic", "ssn", "permission_denied")
    );
    assert_eq!(denied[0]["uid"], NOBODY);
    a.stop();

    // The policy changes (a daemon on the same data directory, with one more rule): the same
    // command by the same user now succeeds, and only what the rule grants.
    let data_dir = a.data_dir.to_str().unwrap().to_owned();
    let b = Daemon::with_config(&nogroup_config(
        &data_dir,
        &format!(
            "\n[[policy]]\nuids = [{NOBODY}]\noperations = [\"encrypt\"]\ntenants = [\"clinic\"]\n\
             fields = [\"ssn\"]\n"
        ),
    ));
    let run = as_nobody(&b.socket, &encrypt_args, b"nobody's value").expect(0);
    let ct = run.out().trim_end().to_owned();
    assert_eq!(
        decrypt(&b, "clinic", "ssn", Some("p1"), &ct),
        b"nobody's value"
    );
    as_nobody(
        &b.socket,
        &field_args("decrypt", "clinic", "ssn", Some("p1")),
        ct.as_bytes(),
    )
    .expect(3);
    as_nobody(
        &b.socket,
        &field_args("encrypt", "clinic", "dob", Some("p1")),
        b"x",
    )
    .expect(3);

    // (Key unwraps from the KMS on a cache miss are audited too; they are not calls.)
    let by_nobody: Vec<_> = audit_records(&a.audit_log())
        .iter()
        .filter(|r| r["actor"] == format!("uid:{NOBODY}") && r["action"] != "unwrap_key")
        .map(summary)
        .collect();
    assert_eq!(
        by_nobody,
        [
            row("uid:65534", "encrypt", "clinic", "ssn", "permission_denied"),
            row("uid:65534", "encrypt", "clinic", "ssn", "ok"),
            row("uid:65534", "decrypt", "clinic", "ssn", "permission_denied"),
            row("uid:65534", "encrypt", "clinic", "dob", "permission_denied"),
        ]
    );

    // Without socket_group, uid 65534 cannot even open the socket: denied (exit 3, with what
    // to do), not "unavailable" (exit 5, which invites retries).
    let c = Daemon::embedded();
    let run = as_nobody(&c.socket, &encrypt_args, b"x").expect(3);
    assert!(
        run.stderr.contains("this user may not use the socket"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_value_typed_where_an_argument_was_expected_is_not_echoed() {
    // The mistake `phiseal encrypt … 078-05-1120` (the value belongs on stdin): clap would
    // quote it in its error, on its way to cron or CI logs.
    let nowhere = Path::new("/nonexistent/phiseald.sock");
    for args in [
        vec!["encrypt", "--tenant", "t", "--field", "ssn", "078-05-1120"],
        vec![
            "--json",
            "encrypt",
            "--tenant",
            "t",
            "--field",
            "ssn",
            "078-05-1120",
        ],
        vec!["078-05-1120"],
        vec![
            "key",
            "min-version",
            "--tenant",
            "t",
            "--version",
            "078-05-1120",
        ],
        vec![
            "encrypt",
            "--tenant",
            "t",
            "--field",
            "ssn",
            "--recrd=078-05-1120",
        ],
    ] {
        let mut cmd = cli_command(&bin("phiseal"), nowhere);
        cmd.args(&args);
        let run = run_cli(&mut cmd, b"").expect(2);
        assert!(!run.stderr.contains("078"), "{args:?}: {}", run.stderr);
    }
    // A mistyped flag is still named.
    let mut cmd = cli_command(&bin("phiseal"), nowhere);
    cmd.args(["encrypt", "--tenat", "t", "--field", "ssn"]);
    let run = run_cli(&mut cmd, b"").expect(2);
    assert!(run.stderr.contains("'--tenat'"), "{}", run.stderr);
}
