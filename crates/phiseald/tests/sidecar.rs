//! End-to-end tests of the real `phiseald` binary over its Unix socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use phiseal_proto::v1 as pb;
use tonic::Code;

fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>) -> T {
    match r {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("call failed: {s:?}"),
    }
}

#[tokio::test]
async fn a_rotation_conditional_on_the_latest_version_is_safe_to_repeat() {
    let d = Daemon::embedded();
    let mut admin = d.admin().await;
    ok(admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: "acme".into(),
        })
        .await);
    let conditional = || pb::RotateTenantKeyRequest {
        tenant: "acme".into(),
        expected_latest_version: Some(1),
    };
    assert_eq!(
        ok(admin.rotate_tenant_key(conditional()).await).key_version,
        2
    );
    // The repeat (a client unsure whether the first call went through) changes nothing.
    let repeat = admin.rotate_tenant_key(conditional()).await.unwrap_err();
    assert_eq!(
        (repeat.code(), kind(&repeat)),
        (tonic::Code::Aborted, "rotation_conflict".to_owned())
    );
    let status = d.cli(&["--json", "key", "status", "--tenant", "acme"], b"");
    assert_eq!(status.expect(0).json()["primary_version"], 2);
    // The CLI's `key rotate --if-latest N` is the same request.
    d.cli(
        &["key", "rotate", "--tenant", "acme", "--if-latest", "2"],
        b"",
    )
    .expect(0);
    let run = d
        .cli(
            &["key", "rotate", "--tenant", "acme", "--if-latest", "2"],
            b"",
        )
        .expect(1);
    assert!(run.stderr.contains("rotation_conflict"), "{}", run.stderr);
}

#[tokio::test]
async fn every_rpc_on_the_embedded_default() {
    let mut d = Daemon::embedded();
    // Core dumps are disabled at start (a core would hold keys and plaintext).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    let mut admin = d.admin().await;
    let mut fields = d.fields().await;

    // Health.
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let serving = ok(health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "phiseal.v1.FieldService".into(),
        })
        .await);
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let created = ok(admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: "acme".into(),
        })
        .await);
    assert_eq!(created.key_version, 1);
    let again = admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (again.code(), kind(&again).as_str()),
        (Code::AlreadyExists, "tenant_exists")
    );

    let enc = fields
        .encrypt(pb::EncryptRequest {
            context: ctx("acme", "ssn", Some("p1")),
            plaintext: b"078-05-1120".to_vec(),
        })
        .await
        .unwrap();
    let request_id = enc
        .metadata()
        .get(phiseal_proto::REQUEST_ID_HEADER)
        .cloned();
    assert!(
        request_id.is_some(),
        "the response carries the audit request id"
    );
    let enc = enc.into_inner();
    assert_eq!(enc.key_version, 1);
    assert_eq!(enc.ciphertext.len(), 11 + 44);
    let dec = ok(fields
        .decrypt(pb::DecryptRequest {
            context: ctx("acme", "ssn", Some("p1")),
            ciphertext: enc.ciphertext.clone(),
        })
        .await);
    assert_eq!(dec.plaintext, b"078-05-1120");

    // Batches.
    let batch = ok(fields
        .encrypt_batch(pb::EncryptBatchRequest {
            items: (0..50)
                .map(|i| pb::EncryptRequest {
                    context: ctx("acme", "dob", Some(&format!("r{i}"))),
                    plaintext: format!("1970-01-{i:02}").into_bytes(),
                })
                .collect(),
        })
        .await);
    assert_eq!(batch.results.len(), 50);
    let cts: Vec<Vec<u8>> = batch
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::encrypt_result::Result::Ok(ok)) => ok.ciphertext,
            other => panic!("{other:?}"),
        })
        .collect();
    let decs = ok(fields
        .decrypt_batch(pb::DecryptBatchRequest {
            items: cts
                .iter()
                .enumerate()
                .map(|(i, ct)| pb::DecryptRequest {
                    context: ctx("acme", "dob", Some(&format!("r{i}"))),
                    ciphertext: ct.clone(),
                })
                .collect(),
        })
        .await);
    for (i, r) in decs.results.into_iter().enumerate() {
        match r.result {
            Some(pb::decrypt_result::Result::Ok(ok)) => {
                assert_eq!(ok.plaintext, format!("1970-01-{i:02}").into_bytes())
            }
            other => panic!("{other:?}"),
        }
    }

    // Rotate, rewrap, status, minimum version.
    let rotated = ok(admin
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant: "acme".into(),
            expected_latest_version: None,
        })
        .await);
    assert_eq!(rotated.key_version, 2);
    let rewrapped = ok(fields
        .rewrap(pb::RewrapRequest {
            items: vec![pb::RewrapItem {
                context: ctx("acme", "ssn", Some("p1")),
                ciphertext: enc.ciphertext.clone(),
            }],
        })
        .await);
    let moved = match &rewrapped.results[0].result {
        Some(pb::rewrap_result::Result::Ok(ok)) => ok.clone(),
        other => panic!("{other:?}"),
    };
    assert!(moved.changed);
    assert_eq!(moved.key_version, 2);
    let again = ok(fields
        .rewrap(pb::RewrapRequest {
            items: vec![pb::RewrapItem {
                context: ctx("acme", "ssn", Some("p1")),
                ciphertext: moved.ciphertext.clone(),
            }],
        })
        .await);
    match &again.results[0].result {
        Some(pb::rewrap_result::Result::Ok(ok)) => {
            assert!(!ok.changed && ok.ciphertext == moved.ciphertext)
        }
        other => panic!("{other:?}"),
    }
    let status = ok(admin
        .key_status(pb::KeyStatusRequest {
            tenant: "acme".into(),
        })
        .await);
    assert_eq!(status.primary_version, Some(2));
    assert_eq!(status.versions.len(), 2);
    assert_eq!(status.versions[0].state, pb::KeyState::DecryptOnly as i32);
    assert_eq!(status.versions[1].state, pb::KeyState::Primary as i32);
    assert!(status.versions[0].created_at.is_some());

    ok(admin
        .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
            tenant: "acme".into(),
            min_version: 2,
            ..Default::default()
        })
        .await);
    let retired = fields
        .decrypt(pb::DecryptRequest {
            context: ctx("acme", "ssn", Some("p1")),
            ciphertext: enc.ciphertext.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (retired.code(), kind(&retired).as_str()),
        (Code::FailedPrecondition, "key_version_retired")
    );
    let bad_min = admin
        .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
            tenant: "acme".into(),
            min_version: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_min.code(), Code::InvalidArgument);
    // Lowering it brings version 1 back: refused unless asked for, and refused if the
    // minimum is no longer what the caller saw.
    let lower = |expected_min_version, allow_lower| pb::SetMinDecryptionVersionRequest {
        tenant: "acme".into(),
        min_version: 1,
        expected_min_version,
        allow_lower,
    };
    let refused = admin
        .set_min_decryption_version(lower(None, false))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), kind(&refused).as_str()),
        (Code::InvalidArgument, "invalid_input")
    );
    let stale = admin
        .set_min_decryption_version(lower(Some(1), true))
        .await
        .unwrap_err();
    assert_eq!(
        (stale.code(), kind(&stale).as_str()),
        (Code::Aborted, "concurrent_change")
    );
    ok(admin.set_min_decryption_version(lower(Some(2), true)).await);
    ok(fields
        .decrypt(pb::DecryptRequest {
            context: ctx("acme", "ssn", Some("p1")),
            ciphertext: enc.ciphertext.clone(),
        })
        .await);

    // Shred: the confirmation must match; then the tenant's data is gone for good.
    let unconfirmed = admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant: "acme".into(),
            confirm_tenant: "acm".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unconfirmed.code(), Code::InvalidArgument);
    ok(admin
        .shred_tenant(pb::ShredTenantRequest {
            tenant: "acme".into(),
            confirm_tenant: "acme".into(),
        })
        .await);
    let gone = fields
        .decrypt(pb::DecryptRequest {
            context: ctx("acme", "ssn", Some("p1")),
            ciphertext: moved.ciphertext.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (gone.code(), kind(&gone).as_str()),
        (Code::FailedPrecondition, "key_destroyed")
    );
    let missing = admin
        .key_status(pb::KeyStatusRequest {
            tenant: "nobody-here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), kind(&missing).as_str()),
        (Code::NotFound, "tenant_not_found")
    );

    // The audit log has the request id of the first encrypt, and never a plaintext.
    let log = d.audit_text();
    let id = request_id.unwrap();
    assert!(log.contains(&format!("\"request_id\":\"{}\"", id.to_str().unwrap())));
    assert!(!log.contains("078-05-1120") && !log.contains("1970-01-"));
    assert!(
        log.contains("\"actor\":\"uid:0\"")
            || log.contains(&format!(
                "\"actor\":\"uid:{}\"",
                rustix::process::getuid().as_raw()
            ))
    );

    // Idle client connections (still open here) do not hold the shutdown up.
    let stopping = std::time::Instant::now();
    d.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    assert!(!d.socket.exists(), "a clean shutdown removes the socket");
    let report = phiseal_audit_file::verify(d.audit_log()).unwrap();
    assert!(report.is_intact(), "{report:?}");
}

#[tokio::test]
async fn batch_with_bad_items_and_cross_context_refusals() {
    let d = Daemon::embedded();
    create_tenant(&d, "t1").await;
    create_tenant(&d, "t2").await;
    let mut fields = d.fields().await;
    let ct = ok(fields
        .encrypt(pb::EncryptRequest {
            context: ctx("t1", "ssn", Some("r1")),
            plaintext: b"secret-1".to_vec(),
        })
        .await)
    .ciphertext;

    // Cross-tenant, cross-field and cross-record decrypts fail with the one opaque error.
    for wrong in [
        ctx("t2", "ssn", Some("r1")),
        ctx("t1", "dob", Some("r1")),
        ctx("t1", "ssn", Some("r2")),
        ctx("t1", "ssn", None),
    ] {
        let e = fields
            .decrypt(pb::DecryptRequest {
                context: wrong,
                ciphertext: ct.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), kind(&e).as_str()),
            (Code::InvalidArgument, "decryption_failed")
        );
        assert!(!e.message().contains("secret-1"));
    }

    let mut tampered = ct.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let items = vec![
        pb::DecryptRequest {
            context: ctx("t1", "ssn", Some("r1")),
            ciphertext: ct.clone(),
        },
        pb::DecryptRequest {
            context: ctx("t1", "ssn", Some("r1")),
            ciphertext: tampered,
        },
        pb::DecryptRequest {
            context: ctx("bad tenant!", "ssn", None),
            ciphertext: ct.clone(),
        },
        pb::DecryptRequest {
            context: None,
            ciphertext: ct.clone(),
        },
        pb::DecryptRequest {
            context: ctx("t1", "ssn", Some("r1")),
            ciphertext: b"garbage".to_vec(),
        },
        pb::DecryptRequest {
            context: ctx("unknown", "ssn", Some("r1")),
            ciphertext: ct.clone(),
        },
        pb::DecryptRequest {
            context: ctx("t1", "ssn", Some("r1")),
            ciphertext: ct.clone(),
        },
    ];
    let out = ok(fields
        .decrypt_batch(pb::DecryptBatchRequest { items })
        .await)
    .results;
    let summary: Vec<String> = out
        .iter()
        .map(|r| match &r.result {
            Some(pb::decrypt_result::Result::Ok(ok)) => {
                format!("ok:{}", String::from_utf8_lossy(&ok.plaintext))
            }
            Some(pb::decrypt_result::Result::Error(e)) => format!("{}:{}", e.code, e.kind),
            None => "none".into(),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            "ok:secret-1".to_owned(),
            format!("{}:decryption_failed", Code::InvalidArgument as i32),
            format!("{}:invalid_input", Code::InvalidArgument as i32),
            format!("{}:invalid_input", Code::InvalidArgument as i32),
            format!("{}:malformed_ciphertext", Code::InvalidArgument as i32),
            format!("{}:tenant_not_found", Code::NotFound as i32),
            "ok:secret-1".to_owned(),
        ]
    );
}

const POLICY_CONFIG: &str = r#"
socket = "{socket}"
data_dir = "{data_dir}"

[[tokens]]
name = "billing"
sha256 = "SHA_BILLING"

[[tokens]]
name = "ops"
sha256 = "SHA_OPS"

# The ops token administers; the billing token may encrypt and decrypt only "ssn" of tenants
# "acme-*". A caller without a token (here uid 0) matches no rule.
[[policy]]
tokens = ["ops"]
operations = ["admin"]
tenants = ["*"]

[[policy]]
tokens = ["billing"]
operations = ["encrypt", "decrypt"]
tenants = ["acme-*"]
fields = ["ssn"]
"#;

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn policy_tokens_and_refusals_are_audited() {
    let token = "phst_test-token-1";
    let ops = "phst_ops-token";
    let d = Daemon::with_config(
        &POLICY_CONFIG
            .replace("SHA_BILLING", &sha256_hex(token))
            .replace("SHA_OPS", &sha256_hex(ops)),
    );
    let uid = format!("uid:{}", rustix::process::getuid().as_raw());
    let mut admin = d.admin().await;
    ok(admin
        .create_tenant(with_token(
            pb::CreateTenantRequest {
                tenant: "acme-1".into(),
            },
            ops,
        ))
        .await);
    let e = admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: "acme-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::PermissionDenied, "permission_denied")
    );
    let mut fields = d.fields().await;

    // Without a token: no grant at all.
    let e = fields
        .encrypt(pb::EncryptRequest {
            context: ctx("acme-1", "ssn", None),
            plaintext: b"x".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::PermissionDenied, "permission_denied")
    );

    // The token may encrypt ssn of acme-1 ...
    let ct = ok(fields
        .encrypt(with_token(
            pb::EncryptRequest {
                context: ctx("acme-1", "ssn", Some("r")),
                plaintext: b"v".to_vec(),
            },
            token,
        ))
        .await)
    .ciphertext;
    // ... but not another field, another tenant, or an admin operation.
    let e = fields
        .encrypt(with_token(
            pb::EncryptRequest {
                context: ctx("acme-1", "notes", None),
                plaintext: b"v".to_vec(),
            },
            token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = fields
        .decrypt(with_token(
            pb::DecryptRequest {
                context: ctx("globex", "ssn", Some("r")),
                ciphertext: ct.clone(),
            },
            token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = d
        .admin()
        .await
        .rotate_tenant_key(with_token(
            pb::RotateTenantKeyRequest {
                tenant: "acme-1".into(),
                expected_latest_version: None,
            },
            token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // In a batch, refused items fail alone.
    let out = ok(fields
        .encrypt_batch(with_token(
            pb::EncryptBatchRequest {
                items: vec![
                    pb::EncryptRequest {
                        context: ctx("acme-1", "ssn", None),
                        plaintext: b"a".to_vec(),
                    },
                    pb::EncryptRequest {
                        context: ctx("acme-1", "dob", None),
                        plaintext: b"b".to_vec(),
                    },
                ],
            },
            token,
        ))
        .await)
    .results;
    assert!(matches!(
        out[0].result,
        Some(pb::encrypt_result::Result::Ok(_))
    ));
    match &out[1].result {
        Some(pb::encrypt_result::Result::Error(e)) => assert_eq!(e.kind, "permission_denied"),
        other => panic!("{other:?}"),
    }

    // A wrong token is refused outright, even for an otherwise allowed uid.
    let e = fields
        .decrypt(with_token(
            pb::DecryptRequest {
                context: ctx("acme-1", "ssn", Some("r")),
                ciphertext: ct.clone(),
            },
            "phst_wrong",
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::Unauthenticated, "unauthenticated")
    );
    assert!(!e.message().contains("phst_wrong"));

    // Every refusal is in the audit log with the identity; the token never is.
    let records = audit_records(&d.audit_log());
    let refused: Vec<(String, String, String, String)> = records
        .iter()
        .filter(|r| r["result"] == "permission_denied" || r["result"] == "unauthenticated")
        .map(|r| {
            (
                r["actor"].as_str().unwrap_or("").to_owned(),
                r["action"].as_str().unwrap_or("").to_owned(),
                r["field"].as_str().unwrap_or("-").to_owned(),
                r["result"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let expect = |a: &str, b: &str, c: &str, d: &str| {
        (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned())
    };
    assert_eq!(
        refused,
        vec![
            expect(&uid, "create_tenant", "-", "permission_denied"),
            expect(&uid, "encrypt", "ssn", "permission_denied"),
            expect("token:billing", "encrypt", "notes", "permission_denied"),
            expect("token:billing", "decrypt", "ssn", "permission_denied"),
            expect("token:billing", "rotate_key", "-", "permission_denied"),
            expect("token:billing", "encrypt", "dob", "permission_denied"),
            expect(&uid, "decrypt", "-", "unauthenticated"),
        ]
    );
    let text = d.audit_text();
    assert!(!text.contains(token) && !text.contains(ops) && !text.contains("phst_wrong"));
}

#[tokio::test]
async fn bad_tokens_are_rate_limited_before_they_are_audited() {
    // Each refused call with a wrong token writes an audit record; the peer's uid has a rate
    // limit for them, so a flood of bad tokens cannot grow the audit log without bound.
    let port = free_port();
    let d = Daemon::with_config(&format!(
        r#"
socket = "{{socket}}"
data_dir = "{{data_dir}}"
[metrics]
listen = "127.0.0.1:{port}"
[limits]
rate_per_second = 1
rate_burst = 3
[[policy]]
uids = [0]
operations = ["*"]
tenants = ["*"]
"#
    ));
    let mut fields = d.fields().await;
    let mut codes = Vec::new();
    for _ in 0..10 {
        let request = with_token(
            pb::EncryptRequest {
                context: ctx("t", "f", None),
                plaintext: b"x".to_vec(),
            },
            "phst_wrong",
        );
        let e = fields.encrypt(request).await.unwrap_err();
        codes.push((e.code(), kind(&e)));
    }
    let unauthenticated = (Code::Unauthenticated, "unauthenticated".to_owned());
    let limited = (Code::ResourceExhausted, "rate_limited".to_owned());
    // The burst, then (within a second or so) refusals by the limit.
    assert_eq!(
        codes[..3],
        [
            unauthenticated.clone(),
            unauthenticated.clone(),
            unauthenticated.clone()
        ]
    );
    assert!(codes.contains(&limited), "{codes:?}");
    let audited = audit_records(&d.audit_log())
        .iter()
        .filter(|r| r["result"] == "unauthenticated")
        .count();
    let answered = codes.iter().filter(|c| **c == unauthenticated).count();
    assert_eq!(audited, answered, "{codes:?}");
    assert!(audited < 10, "{codes:?}");
    // Each call counted once, by what it was answered.
    let body = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/metrics");
    let limited_count = codes.iter().filter(|c| **c == limited).count();
    for (reason, n) in [
        ("unauthenticated", answered),
        ("rate_limited", limited_count),
    ] {
        let line = format!("phiseal_refused_total{{reason=\"{reason}\"}} {n}\n");
        assert!(body.contains(&line), "{line:?} in {body}");
    }
}

#[tokio::test]
async fn limits_give_clear_statuses_and_lose_nothing() {
    let d = Daemon::with_config(
        r#"
socket = "{socket}"
data_dir = "{data_dir}"
[limits]
max_batch_items = 3
max_message_bytes = 2048
rate_per_second = 1
rate_burst = 6
[[policy]]
uids = [0]
operations = ["*"]
tenants = ["*"]
"#,
    );
    create_tenant(&d, "t").await; // call 1
    let mut fields = d.fields().await;
    let item = |p: &[u8]| pb::EncryptRequest {
        context: ctx("t", "f", None),
        plaintext: p.to_vec(),
    };

    let e = fields
        .encrypt_batch(pb::EncryptBatchRequest {
            items: vec![item(b"1"), item(b"2"), item(b"3"), item(b"4")],
        })
        .await
        .unwrap_err(); // call 2
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::ResourceExhausted, "batch_too_large")
    );
    assert!(e.message().contains("max_batch_items"));

    let e = fields.encrypt(item(&[7u8; 4096])).await.unwrap_err(); // refused while decoding
    // tonic refuses an oversized message itself, with OUT_OF_RANGE (documented).
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("too large") || e.message().contains("length"),
        "{e:?}"
    );

    // A request that fits but whose answer could not (each ciphertext is 44 bytes longer):
    // refused with a kind before any work, not by gRPC after the work (and the audit).
    for e in [
        fields
            .encrypt_batch(pb::EncryptBatchRequest {
                items: vec![item(&[1u8; 640]), item(&[2u8; 640]), item(&[3u8; 640])],
            })
            .await
            .unwrap_err(),
        fields.encrypt(item(&[4u8; 2000])).await.unwrap_err(),
    ] {
        assert_eq!(
            (e.code(), kind(&e).as_str()),
            (Code::OutOfRange, "response_too_large"),
            "{e:?}"
        );
        assert!(e.message().contains("max_message_bytes"), "{e:?}");
    }

    // Client deadline shorter than the work: a clear status, and the daemon keeps serving.
    let mut request = tonic::Request::new(item(b"deadline"));
    request.set_timeout(Duration::from_micros(1));
    let e = fields.encrypt(request).await.unwrap_err();
    // tonic's client enforces the deadline it sends as well, and reports CANCELLED; the
    // daemon's own DEADLINE_EXCEEDED is unit-tested in service.rs.
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );

    // Rate limit: the burst is spent, the next call is refused with a clear status.
    let mut refused = None;
    let mut acknowledged = 0;
    for _ in 0..10 {
        match fields.encrypt(item(b"r")).await {
            Ok(_) => acknowledged += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the rate limit refused a call");
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::ResourceExhausted, "rate_limited")
    );
    // A refusal carries a request id too (the client sent none: a fresh one).
    let id = e.metadata().get(phiseal_proto::REQUEST_ID_HEADER);
    assert!(
        id.and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit())),
        "{e:?}"
    );
    // After a second, calls are admitted again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ok(fields.encrypt(item(b"after")).await);
    acknowledged += 1;

    // Every encryption that was acknowledged is in the audit log, and nothing refused is:
    // the one extra record allowed is the deadline call's, which the daemon may have done
    // after the client stopped waiting.
    let records = audit_records(&d.audit_log());
    let oks = records
        .iter()
        .filter(|r| r["action"] == "encrypt" && r["result"] == "ok")
        .count();
    assert!(
        (acknowledged..=acknowledged + 1).contains(&oks),
        "{oks} encrypt records for {acknowledged} acknowledged encryptions"
    );
}

#[tokio::test]
async fn sigterm_during_load_drains_and_loses_no_audit_record() {
    let mut d = Daemon::embedded();
    create_tenant(&d, "load").await;
    let socket = d.socket.clone();
    let mut workers = Vec::new();
    for w in 0..8 {
        let socket = socket.clone();
        workers.push(tokio::spawn(async move {
            let mut client = pb::field_service_client::FieldServiceClient::new(
                phiseal_proto::connect_unix(&socket).await.unwrap(),
            );
            let mut acknowledged = 0usize;
            for i in 0.. {
                let items = (0..20)
                    .map(|j| pb::EncryptRequest {
                        context: ctx("load", "f", Some(&format!("w{w}-{i}-{j}"))),
                        plaintext: vec![1u8; 64],
                    })
                    .collect();
                match client
                    .encrypt_batch(pb::EncryptBatchRequest { items })
                    .await
                {
                    Ok(r) => acknowledged += r.into_inner().results.len(),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    d.sigterm();
    let mut acknowledged = 0;
    for w in workers {
        acknowledged += w.await.unwrap();
    }
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}: {}", d.stderr());
    assert!(!d.socket.exists());
    assert!(acknowledged > 0);
    let report = phiseal_audit_file::verify(d.audit_log()).unwrap();
    assert!(
        report.is_intact() && report.torn_tail.is_none(),
        "{report:?}"
    );
    let audited = audit_records(&d.audit_log())
        .iter()
        .filter(|r| r["action"] == "encrypt" && r["result"] == "ok")
        .count();
    // Every acknowledged field has its record (a call cut off by the shutdown may have been
    // audited without the client seeing the answer, so audited >= acknowledged).
    assert!(
        audited >= acknowledged,
        "audited {audited} < acknowledged {acknowledged}"
    );
    assert!(d.stderr().contains("audit log flushed"), "{}", d.stderr());
}

#[tokio::test]
async fn health_watchers_see_not_serving_when_the_drain_starts() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut d = Daemon::embedded();
    let channel = d.channel().await;
    let mut watches = Vec::new();
    for service in ["", "phiseal.v1.FieldService", "phiseal.v1.AdminService"] {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let mut stream = ok(health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await);
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32, "{service:?}");
        watches.push((service, stream));
    }
    d.sigterm();
    for (service, mut stream) in watches {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{service:?}: no status within 10 s of SIGTERM"));
        let next = next
            .unwrap_or_else(|e| panic!("{service:?}: stream failed before NOT_SERVING: {e}"))
            .unwrap_or_else(|| panic!("{service:?}: stream ended before NOT_SERVING"));
        assert_eq!(next.status, ServingStatus::NotServing as i32, "{service:?}");
    }
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status}: {}", d.stderr());
    assert!(!d.socket.exists());
}

#[tokio::test]
async fn idle_metrics_connections_are_capped_and_timed_out() {
    use std::io::Read;
    let port = free_port();
    let d = Daemon::start(
        Some(&format!(
            "socket = \"{{socket}}\"\ndata_dir = \"{{data_dir}}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
        )),
        |_| {},
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Whether the server has closed `conn` (a read gives end of file) within `wait`.
    let closed_within = |conn: &mut std::net::TcpStream, wait: Duration| {
        conn.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 64];
        match conn.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => panic!("{n} bytes from a connection that sent no request"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(_) => false,
        }
    };
    // Connections that never send a request, up to the cap: the listener keeps them open …
    let cap = phiseald::metrics::MAX_METRICS_CONNECTIONS;
    let opened = std::time::Instant::now();
    let mut idle: Vec<_> = (0..cap)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    for conn in &mut idle {
        assert!(
            !closed_within(conn, Duration::from_millis(50)),
            "closed below the cap"
        );
    }
    // … and closes one more at once.
    let mut extra = std::net::TcpStream::connect(addr).unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(1)),
        "over the cap: not closed"
    );
    // The idle ones are closed once the 10 s header timeout has passed, which frees the slots.
    for conn in &mut idle {
        assert!(
            closed_within(conn, Duration::from_secs(20)),
            "idle: not closed"
        );
    }
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "closed after {waited:?}, before the header timeout"
    );
    // (A slot is freed just after its connection closes: retry briefly.)
    let scrape = || -> std::io::Result<String> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr)?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let mut body = String::new();
    for _ in 0..50 {
        body = scrape().unwrap_or_default();
        if body.starts_with("HTTP/1.0 200 OK") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(body.contains("phiseal_"), "{body}");
    drop(d);
}

#[tokio::test]
async fn metrics_and_json_logs_without_phi() {
    let port = free_port();
    let config = format!(
        r#"
socket = "{{socket}}"
data_dir = "{{data_dir}}"
[metrics]
listen = "127.0.0.1:{port}"
[log]
format = "json"
[[policy]]
uids = [0]
operations = ["*"]
tenants = ["*"]
"#
    );
    let d = Daemon::start(Some(&config), |cmd| {
        cmd.env("PHISEALD_LOG__LEVEL", "debug");
    });
    create_tenant(&d, "metrics-tenant").await;
    let mut fields = d.fields().await;
    let ct = ok(fields
        .encrypt(pb::EncryptRequest {
            context: ctx("metrics-tenant", "ssn", Some("rec-9")),
            plaintext: b"PHI-VALUE".to_vec(),
        })
        .await)
    .ciphertext;
    ok(fields
        .decrypt(pb::DecryptRequest {
            context: ctx("metrics-tenant", "ssn", Some("rec-9")),
            ciphertext: ct,
        })
        .await);
    let body = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/metrics");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    for needle in [
        "phiseal_requests_total{rpc=\"Encrypt\",code=\"Ok\"} 1",
        "phiseal_request_duration_seconds_bucket{",
        "phiseal_key_lookups_total{source=\"cache\"} 1",
        "phiseal_key_lookups_total{source=\"kms\"} 1",
        // Two: the new key's wrapping is verified at creation, then one cache miss.
        "phiseal_kms_calls_total{backend=\"local\",op=\"unwrap\",result=\"ok\"} 2",
        "phiseal_audit_append_duration_seconds_count",
        "phiseal_operations_total{action=\"decrypt\",result=\"ok\"} 1",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    assert!(
        !body.contains("metrics-tenant") && !body.contains("rec-9") && !body.contains("PHI-VALUE")
    );
    let missing = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/other");
    assert!(missing.contains(" 404 "), "{missing}");

    // JSON logs: one object per line, per-call lines with the request id; no PHI.
    let logs = d.stderr();
    let calls: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON log line"))
        .filter(|v| v["fields"]["message"] == "call")
        .collect();
    assert!(
        calls.iter().any(|v| v["fields"]["rpc"] == "Encrypt"
            && v["fields"]["request_id"]
                .as_str()
                .is_some_and(|id| id.len() == 16)),
        "{logs}"
    );
    assert!(
        !logs.contains("PHI-VALUE") && !logs.contains("rec-9"),
        "{logs}"
    );
}

#[tokio::test]
async fn scheduled_rotation_is_safe_with_two_daemons_on_one_store() {
    let config = |name: &str| {
        format!(
            r#"
socket = "{{socket}}"
data_dir = "SHARED"
[audit]
path = "{{dir}}/{name}-audit.log"
[rotation]
period = "2s"
check_interval = "150ms"
[[policy]]
uids = [0]
operations = ["*"]
tenants = ["*"]
"#
        )
    };
    let a = Daemon::with_config(&config("a").replace("SHARED", "{data_dir}"));
    let shared = a.data_dir.to_str().unwrap().to_owned();
    let b = Daemon::start(Some(&config("b").replace("SHARED", &shared)), |_| {});
    // `b` has its own temporary dir for its socket and audit log.
    create_tenant(&a, "sched").await;
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let status = ok(a
        .admin()
        .await
        .key_status(pb::KeyStatusRequest {
            tenant: "sched".into(),
        })
        .await);
    let latest = status.versions.iter().map(|v| v.version).max().unwrap();
    assert!(latest >= 2, "the schedule rotated: {status:?}");
    let mut versions: Vec<u32> = status.versions.iter().map(|v| v.version).collect();
    versions.dedup();
    assert_eq!(versions, (1..=latest).collect::<Vec<_>>());
    // Each version after 1 was created by exactly one daemon's scheduled rotation.
    let rotated = |log: std::path::PathBuf| {
        audit_records(&log)
            .into_iter()
            .filter(|r| {
                r["action"] == "rotate_key"
                    && r["result"] == "ok"
                    && r["actor"] == "phiseald:rotation-schedule"
            })
            .count()
    };
    let by_a = rotated(a.dir.path().join("a-audit.log"));
    let by_b = rotated(b.dir.path().join("b-audit.log"));
    // Daemon b's key status may lag by one rotation made after a's read; count from a's view.
    assert!(
        by_a + by_b >= (latest - 1) as usize && by_a + by_b <= latest as usize,
        "a {by_a} + b {by_b} vs latest {latest}"
    );
    // Nothing rotates twice per period: each version is at least one period (2 s) younger
    // than the one before it (creation times from the key store, one clock for both daemons).
    let mut created: Vec<(u32, f64)> = status
        .versions
        .iter()
        .map(|v| {
            let t = v.created_at.as_ref().expect("created_at");
            (v.version, t.seconds as f64 + f64::from(t.nanos) / 1e9)
        })
        .collect();
    created.sort_by_key(|(version, _)| *version);
    for pair in created.windows(2) {
        let ((v1, t1), (v2, t2)) = (pair[0], pair[1]);
        assert!(
            // (1 ms of slack for the store's timestamp precision.)
            t2 - t1 >= 1.999,
            "version {v2} was created {:.3} s after version {v1}, within one period",
            t2 - t1
        );
    }
}

#[tokio::test]
async fn the_audit_log_rolls_over_and_the_cli_reads_all_of_its_files() {
    let d = Daemon::with_config(
        "socket = \"{socket}\"\ndata_dir = \"{data_dir}\"\n[audit]\nrollover_bytes = 65536\n\
         [[policy]]\nuids = [0]\noperations = [\"*\"]\ntenants = [\"*\"]\n",
    );
    create_tenant(&d, "acme").await;
    create_tenant(&d, "other").await;
    let mut fields = d.fields().await;
    for i in 0..600 {
        let tenant = if i % 2 == 0 { "acme" } else { "other" };
        ok(fields
            .encrypt(pb::EncryptRequest {
                context: ctx(tenant, "ssn", Some(&format!("patient-{i}"))),
                plaintext: b"078-05-1120".to_vec(),
            })
            .await);
    }
    // Checked while the daemon runs: closed segments are complete files.
    let report = phiseal_audit_file::verify(d.audit_log()).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert!(report.files.len() >= 3, "{:?}", report.files);
    let segments = report.files.len() - 1;

    let data_dir = d.data_dir.to_str().unwrap();
    let run = d
        .cli(&["audit", "verify", "--data-dir", data_dir], b"")
        .expect(0);
    assert!(
        run.out().contains(&format!(
            "files: {} ({segments} closed segments, then the active file)",
            segments + 1
        )) && run.out().ends_with("result: intact\n"),
        "{}",
        run.out()
    );
    let log = d.audit_log();
    let run = d
        .cli(
            &[
                "audit",
                "export",
                "--tenant",
                "acme",
                "--log",
                log.to_str().unwrap(),
            ],
            b"",
        )
        .expect(0);
    let exported: Vec<serde_json::Value> = run
        .out()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let encrypts: Vec<&serde_json::Value> = exported
        .iter()
        .filter(|r| r["action"] == "encrypt")
        .collect();
    assert_eq!(encrypts.len(), 300, "every record, from every file");
    assert!(encrypts.iter().all(|r| r["tenant"] == "acme"));
    let seqs: Vec<u64> = exported
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in log order");

    // An archive of the closed segments alone: exit 8 (the log file could have been
    // deleted), 0 with --segments-only.
    let archive = tempfile::tempdir().unwrap();
    for segment in &report.files[..segments] {
        std::fs::copy(segment, archive.path().join(segment.file_name().unwrap())).unwrap();
    }
    let archived = archive.path().join("audit.log");
    let archived = archived.to_str().unwrap();
    let run = d
        .cli(&["audit", "verify", "--log", archived], b"")
        .expect(8);
    assert!(
        run.out().contains("the active file is missing") && run.stderr.contains("--segments-only"),
        "{run:?}"
    );
    let run = d
        .cli(
            &["audit", "verify", "--log", archived, "--segments-only"],
            b"",
        )
        .expect(0);
    assert!(run.out().ends_with("result: intact\n"), "{}", run.out());
    // The same for export: without --segments-only the export lacks the active file's
    // records, and says so with exit 8.
    let run = d
        .cli(
            &["audit", "export", "--tenant", "acme", "--log", archived],
            b"",
        )
        .expect(8);
    assert!(run.stderr.contains("--segments-only"), "{run:?}");
    d.cli(
        &[
            "audit",
            "export",
            "--tenant",
            "acme",
            "--log",
            archived,
            "--segments-only",
        ],
        b"",
    )
    .expect(0);

    // The first segment archived and removed: verify and export need --after with its end.
    let pruned = tempfile::tempdir().unwrap();
    for file in &report.files {
        std::fs::copy(file, pruned.path().join(file.file_name().unwrap())).unwrap();
    }
    let first = pruned.path().join(report.files[0].file_name().unwrap());
    let end = d
        .cli(
            &[
                "audit",
                "verify",
                "--log",
                first.to_str().unwrap(),
                "--json",
            ],
            b"",
        )
        .expect(0)
        .json();
    let after = format!("{}:{}", end["last_seq"], end["head_hash"].as_str().unwrap());
    std::fs::remove_file(&first).unwrap();
    let pruned_log = pruned.path().join("audit.log");
    let pruned_log = pruned_log.to_str().unwrap();
    d.cli(&["audit", "verify", "--log", pruned_log], b"")
        .expect(8);
    let run = d
        .cli(
            &["audit", "verify", "--log", pruned_log, "--after", &after],
            b"",
        )
        .expect(0);
    assert!(run.out().contains("starts after record"), "{}", run.out());
    let run = d
        .cli(
            &[
                "audit", "export", "--tenant", "acme", "--log", pruned_log, "--after", &after,
            ],
            b"",
        )
        .expect(0);
    assert!(run.out().lines().count() > 0);

    // A closed segment removed from the middle: verify fails (exit 8) naming the next file.
    let second = report.files[1].clone();
    std::fs::remove_file(&second).unwrap();
    let v = d
        .cli(&["audit", "verify", "--data-dir", data_dir, "--json"], b"")
        .expect(8)
        .json();
    assert_eq!(v["problems"][0]["kind"], "chain_break");
    assert_eq!(
        v["problems"][0]["file"],
        report.files[2].display().to_string()
    );
}

/// Whether the daemon serves `conn`: an HTTP/2 server speaks first (its SETTINGS frame),
/// a connection closed at once reads end-of-file, one not accepted yet reads nothing.
#[derive(Debug, PartialEq)]
enum Greeting {
    Served,
    Closed,
    Silent,
}

fn greeting(conn: &mut std::os::unix::net::UnixStream) -> Greeting {
    use std::io::Read;
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Ok(0) => Greeting::Closed,
        Ok(_) => Greeting::Served,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Greeting::Closed,
        Err(_) => Greeting::Silent,
    }
}

fn connect(d: &Daemon) -> std::os::unix::net::UnixStream {
    std::os::unix::net::UnixStream::connect(&d.socket).unwrap()
}

#[test]
fn a_uid_over_its_connection_cap_is_closed_and_a_freed_slot_is_reused() {
    let d = Daemon::with_config(
        r#"
socket = "{socket}"
data_dir = "{data_dir}"
[limits]
max_connections = 10
max_connections_per_uid = 2
"#,
    );
    let mut first = connect(&d);
    assert_eq!(greeting(&mut first), Greeting::Served);
    // (The start-up probe's connection may hold the other slot for a moment.)
    let _second = served_connection(&d);
    // The third connection of this uid is closed as soon as it is accepted.
    let mut third = connect(&d);
    assert_eq!(greeting(&mut third), Greeting::Closed);
    assert!(
        d.stderr().contains("limits.max_connections_per_uid"),
        "{}",
        d.stderr()
    );
    // A closed connection frees its slot.
    drop(first);
    let _again = served_connection(&d);
}

/// A new connection the daemon serves, once it does (within 10 s).
fn served_connection(d: &Daemon) -> std::os::unix::net::UnixStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = connect(d);
        match greeting(&mut c) {
            Greeting::Served => return c,
            other => assert!(
                std::time::Instant::now() < deadline,
                "no connection slot came free: {other:?}"
            ),
        }
    }
}

#[test]
fn over_the_global_connection_cap_new_connections_wait_for_a_slot() {
    let d = Daemon::with_config(
        r#"
socket = "{socket}"
data_dir = "{data_dir}"
[limits]
max_connections = 2
max_connections_per_uid = 2
"#,
    );
    let mut first = connect(&d);
    assert_eq!(greeting(&mut first), Greeting::Served);
    let second = served_connection(&d);
    // Not accepted (it waits in the backlog): no answer, and not closed either.
    let mut third = connect(&d);
    assert_eq!(greeting(&mut third), Greeting::Silent);
    drop(first);
    // Once a slot is free, the waiting connection is accepted and served.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match greeting(&mut third) {
            Greeting::Served => break,
            Greeting::Closed => panic!("the waiting connection was closed"),
            Greeting::Silent => assert!(
                std::time::Instant::now() < deadline,
                "the waiting connection was never accepted"
            ),
        }
    }
    drop(second);
}

#[tokio::test]
async fn batch_items_are_authorized_by_their_own_tenant_and_refusals_are_rate_limited() {
    // uid 0 (the test) may encrypt "ssn" of tenant "acme" only; one call per second, bursts
    // of 5 — refused batch items count one by one against a like allowance of their own.
    let uid = rustix::process::getuid().as_raw();
    let d = Daemon::with_config(&format!(
        r#"
socket = "{{socket}}"
data_dir = "{{data_dir}}"
[limits]
rate_per_second = 1
rate_burst = 5
[[policy]]
uids = [{uid}]
operations = ["admin"]
tenants = ["*"]
[[policy]]
uids = [{uid}]
operations = ["encrypt"]
tenants = ["acme"]
fields = ["ssn"]
"#
    ));
    for tenant in ["acme", "globex"] {
        create_tenant(&d, tenant).await;
    }
    let mut fields = d.fields().await;
    let item = |tenant: &str, record: &str| pb::EncryptRequest {
        context: ctx(tenant, "ssn", Some(record)),
        plaintext: b"078-05-1120".to_vec(),
    };
    let denials = || {
        audit_records(&d.audit_log())
            .into_iter()
            .filter(|r| r["result"] == "permission_denied")
            .count()
    };
    // Same field, alternating tenants: each item is judged by its own tenant.
    let batch = ok(fields
        .encrypt_batch(pb::EncryptBatchRequest {
            items: vec![
                item("acme", "r1"),
                item("globex", "r2"),
                item("acme", "r3"),
                item("globex", "r4"),
            ],
        })
        .await);
    let outcomes: Vec<bool> = batch
        .results
        .iter()
        .map(|r| matches!(r.result, Some(pb::encrypt_result::Result::Ok(_))))
        .collect();
    assert_eq!(outcomes, [true, false, true, false]);
    assert_eq!(denials(), 2, "each refused item is audited");
    // Refused items count one by one: six in one call are more than the burst (5), four
    // more than the 3 left — each such call is refused as a whole, with one record. (Items of
    // a field of acme this caller may not encrypt: it may encrypt another.)
    let dob_batch = |n: usize| pb::EncryptBatchRequest {
        items: (0..n)
            .map(|i| pb::EncryptRequest {
                context: ctx("acme", "dob", Some(&format!("x{i}"))),
                plaintext: b"1970-01-01".to_vec(),
            })
            .collect(),
    };
    for (n, why) in [
        (6, "more than limits.rate_burst"),
        (4, "over the rate limit"),
    ] {
        let e = fields.encrypt_batch(dob_batch(n)).await.unwrap_err();
        assert_eq!(
            (e.code(), kind(&e).as_str()),
            (Code::ResourceExhausted, "rate_limited")
        );
        assert!(e.message().contains(why), "{e:?}");
    }
    assert_eq!(
        denials(),
        4,
        "a batch refused as a whole writes one refusal record (its first item), not one per item"
    );
    // Three fit what is left: refused item by item, and audited. (After a second: this is
    // the sixth call, over the call burst of 5.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ok(fields.encrypt_batch(dob_batch(3)).await);
    assert_eq!(denials(), 7);
    // A batch for a tenant on which the policy grants this caller encrypt for no field at
    // all is refused as a call, as a unary call would be, with one record — whatever its
    // size: not as `rate_limited`, and without spending the refused items' allowance.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let globex_batch = pb::EncryptBatchRequest {
        items: (0..20).map(|i| item("globex", &format!("g{i}"))).collect(),
    };
    let e = fields.encrypt_batch(globex_batch).await.unwrap_err();
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::PermissionDenied, "permission_denied")
    );
    assert_eq!(denials(), 8);
    // Naming two such tenants: one record for each, so that each tenant's export shows it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let two_tenants = pb::EncryptBatchRequest {
        items: (0..10)
            .flat_map(|i| {
                [
                    item("globex", &format!("h{i}")),
                    item("umbrella", &format!("u{i}")),
                ]
            })
            .collect(),
    };
    let e = fields.encrypt_batch(two_tenants).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let refused_tenants: Vec<String> = audit_records(&d.audit_log())
        .into_iter()
        .filter(|r| r["result"] == "permission_denied")
        .skip(8)
        .map(|r| r["tenant"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(refused_tenants, ["globex", "umbrella"]);
    // Naming more such tenants than the refused items' burst (5): their records do not fit,
    // so it is refused as `rate_limited`, with one record.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let six_tenants = pb::EncryptBatchRequest {
        items: (0..6).map(|i| item(&format!("t{i}"), "r")).collect(),
    };
    let e = fields.encrypt_batch(six_tenants).await.unwrap_err();
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::ResourceExhausted, "rate_limited")
    );
    assert!(e.message().contains("more than limits.rate_burst"), "{e:?}");
    assert_eq!(denials(), 11);
}

#[tokio::test]
async fn a_unary_call_whose_message_never_finishes_arriving_is_cut_off() {
    // No phiseal code runs before a call's message is complete, so the daemon's own deadline
    // cannot end this call: the server's receive limit (request_timeout + 5 s) must.
    let d = Daemon::with_config(
        r#"
socket = "{socket}"
data_dir = "{data_dir}"
[limits]
request_timeout = "100ms"
[[policy]]
uids = [0]
operations = ["*"]
tenants = ["*"]
"#,
    );
    let (response, body) = stuck_unary_call(&d).await;
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("the daemon kept waiting for the rest of the message")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "{took:?}"
    );
    // gRPC's CANCELLED ("Timeout expired"), as a trailers-only answer.
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("1".to_owned()),
        "{response:?}"
    );
    drop(body);
}

#[tokio::test]
async fn calls_beyond_max_requests_in_flight_wait_for_a_slot() {
    // One call in flight at most: while a stuck call holds the slot, any other call (a health
    // check here) waits; once the stuck one is cut off (request_timeout + 5 s), it is served.
    let d = Daemon::with_config(
        r#"
socket = "{socket}"
data_dir = "{data_dir}"
[limits]
request_timeout = "100ms"
max_requests_in_flight = 1
"#,
    );
    let (stuck, _body) = stuck_unary_call(&d).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let check = health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    tokio::pin!(check);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut check)
            .await
            .is_err(),
        "answered while the only slot was taken"
    );
    let answer = tokio::time::timeout(Duration::from_secs(15), check)
        .await
        .expect("never served after the slot came free")
        .unwrap();
    assert_eq!(
        answer.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The stuck call was the one cut off.
    let stuck = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stuck
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("1".to_owned())
    );
}

/// Sends one gRPC message (`message`, already encoded) to `path` on a connection of its own (a
/// raw HTTP/2 client, so that no client-side type has to hold it decoded) and returns the
/// answer's `grpc-status` and `phiseal-error-kind`.
async fn raw_call(d: &Daemon, path: &str, message: &[u8]) -> (Option<String>, Option<String>) {
    let (response, mut body) = raw_grpc_call(d, path).await;
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(message);
    // Sent in pieces the flow-control window admits.
    let mut rest = bytes::Bytes::from(frame);
    while !rest.is_empty() {
        body.reserve_capacity(rest.len());
        let granted = std::future::poll_fn(|cx| body.poll_capacity(cx))
            .await
            .unwrap()
            .unwrap();
        let piece = rest.split_to(granted.min(rest.len()));
        body.send_data(piece, rest.is_empty()).unwrap();
    }
    let response = response.await.unwrap();
    let header =
        |map: &http::HeaderMap, name: &str| map.get(name).map(|v| v.to_str().unwrap().to_owned());
    let (parts, mut answer) = response.into_parts();
    if let Some(code) = header(&parts.headers, "grpc-status") {
        return (Some(code), header(&parts.headers, "phiseal-error-kind"));
    }
    while let Some(data) = answer.data().await {
        let data = data.unwrap();
        let _ = answer.flow_control().release_capacity(data.len());
    }
    let trailers = answer.trailers().await.unwrap().unwrap_or_default();
    (
        header(&trailers, "grpc-status"),
        header(&trailers, "phiseal-error-kind"),
    )
}

/// The daemon's peak resident memory (`VmHWM`) in KiB, reset to the current one first when
/// `reset` (`/proc/PID/clear_refs`).
fn peak_rss_kib(pid: i32, reset: bool) -> u64 {
    if reset {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap()
        .to_owned();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_batch_of_tiny_items_is_refused_before_it_is_decoded() {
    // Two million empty items are 4 MB on the wire (within max_message_bytes) but ~100 bytes
    // each once decoded: the daemon counts them before decoding and refuses the batch
    // without allocating for them, as it refuses any batch over max_batch_items.
    let d = Daemon::embedded();
    create_tenant(&d, "clinic").await;
    let mut fields = d.fields().await;
    let one = pb::EncryptBatchRequest {
        items: vec![pb::EncryptRequest {
            context: ctx("clinic", "ssn", None),
            plaintext: b"x".to_vec(),
        }],
    };
    fields.encrypt_batch(one).await.unwrap();
    let before = peak_rss_kib(d.pid(), true);
    let batch = [0x0a, 0x00].repeat(2_000_000);
    // The same behind an empty group of an unknown field, which a decoder skips.
    let behind_a_group = [&[0x1b, 0x1c][..], &batch[4..]].concat();
    for rpc in ["EncryptBatch", "DecryptBatch", "Rewrap"] {
        for message in [&batch, &behind_a_group] {
            let path = format!("/phiseal.v1.FieldService/{rpc}");
            let (code, kind) = raw_call(&d, &path, message).await;
            assert_eq!(
                (code.as_deref(), kind.as_deref()),
                (Some("8"), Some("batch_too_large")),
                "{rpc}"
            );
        }
    }
    let grown = peak_rss_kib(d.pid(), false).saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "the daemon's peak memory grew by {grown} KiB for 4 MB batches"
    );
    // A batch within the limit is served as before.
    let (code, _) = raw_call(
        &d,
        "/phiseal.v1.FieldService/EncryptBatch",
        &[0x0a, 0x00].repeat(10),
    )
    .await;
    assert_eq!(code.as_deref(), Some("0"));
}
