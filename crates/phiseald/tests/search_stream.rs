//! Searchable fields and streams through the real daemon and the real CLI: deterministic
//! encryption, blind indexes and search terms across a rotation, policy on `search`, streamed
//! encryption and decryption of large values (truncation and tampering refused), and the CLI's
//! file commands (no output left behind on failure).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{Daemon, create_tenant, ctx, rotate_tenant, shred_tenant};
use phiseal_proto::v1 as pb;
use std::time::Duration;

const ALL: &str = "[[policy]]\nuids = [0]\noperations = [\"*\"]\ntenants = [\"*\"]\n";

fn config(policy: &str) -> String {
    format!("socket = \"{{socket}}\"\ndata_dir = \"{{data_dir}}\"\n{policy}")
}

fn spec(normalization: pb::Normalization, bits: u32) -> Option<pb::BlindIndexSpec> {
    Some(pb::BlindIndexSpec {
        normalization: normalization as i32,
        bits,
    })
}

#[tokio::test]
async fn searchable_fields_are_found_across_a_rotation() {
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    create_tenant(&d, "other").await;
    let mut fields = d.fields().await;
    let det = |tenant: &str, field: &str, value: &[u8]| pb::EncryptRequest {
        context: ctx(tenant, field, None),
        plaintext: value.to_vec(),
    };

    // Deterministic: equal in, equal out; other field or tenant, unrelated.
    let a = fields
        .encrypt_deterministic(det("clinic", "mrn", b"MRN-0042"))
        .await
        .unwrap()
        .into_inner();
    let b = fields
        .encrypt_deterministic(det("clinic", "mrn", b"MRN-0042"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.ciphertext, b.ciphertext);
    assert_eq!(a.key_version, 1);
    for (tenant, field, value) in [
        ("clinic", "mrn", &b"MRN-0043"[..]),
        ("clinic", "ssn", b"MRN-0042"),
        ("other", "mrn", b"MRN-0042"),
    ] {
        let c = fields
            .encrypt_deterministic(det(tenant, field, value))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(c.ciphertext, a.ciphertext, "{tenant}/{field}");
    }
    // A record id would make equal values differ: refused.
    let err = fields
        .encrypt_deterministic(pb::EncryptRequest {
            context: ctx("clinic", "mrn", Some("row-1")),
            plaintext: b"x".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // Decrypt reads it like any ciphertext.
    let back = fields
        .decrypt(pb::DecryptRequest {
            context: ctx("clinic", "mrn", None),
            ciphertext: a.ciphertext.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, b"MRN-0042");

    // Blind index: digits-only normalisation makes formatting irrelevant.
    let index = |value: &[u8]| pb::BlindIndexRequest {
        context: ctx("clinic", "ssn", None),
        value: value.to_vec(),
        spec: spec(pb::Normalization::DigitsOnly, 32),
    };
    let i1 = fields
        .blind_index(index(b"078-05-1120"))
        .await
        .unwrap()
        .into_inner()
        .term
        .unwrap();
    let i2 = fields
        .blind_index(index(b"078051120"))
        .await
        .unwrap()
        .into_inner()
        .term
        .unwrap();
    assert_eq!(i1.value, i2.value);
    assert_eq!(i1.value.len(), 4);
    let bad = fields
        .blind_index(pb::BlindIndexRequest {
            spec: spec(pb::Normalization::Unspecified, 32),
            ..index(b"1")
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    // Rotate: queries return the terms under both versions, primary first; the stored v1
    // values are among them.
    rotate_tenant(&d, "clinic").await;
    let terms = fields
        .search_terms(pb::SearchTermsRequest {
            context: ctx("clinic", "mrn", None),
            value: b"MRN-0042".to_vec(),
            kind: Some(pb::search_terms_request::Kind::Deterministic(
                pb::DeterministicTerms {},
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .terms;
    assert_eq!(
        terms.iter().map(|t| t.key_version).collect::<Vec<_>>(),
        [2, 1]
    );
    assert_eq!(terms[1].value, a.ciphertext);
    let terms = fields
        .search_terms(pb::SearchTermsRequest {
            context: ctx("clinic", "ssn", None),
            value: b"078 05 1120".to_vec(),
            kind: Some(pb::search_terms_request::Kind::BlindIndex(
                pb::BlindIndexSpec {
                    normalization: pb::Normalization::DigitsOnly as i32,
                    bits: 32,
                },
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .terms;
    assert_eq!(terms.len(), 2);
    assert_eq!(terms[1].value, i1.value);
    // Rewrap keeps a deterministic ciphertext deterministic, under the new version.
    let rewrapped = fields
        .rewrap(pb::RewrapRequest {
            items: vec![pb::RewrapItem {
                context: ctx("clinic", "mrn", None),
                ciphertext: a.ciphertext.clone(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::rewrap_result::Result::Ok(r)) = &rewrapped.results[0].result else {
        panic!("{rewrapped:?}");
    };
    assert_eq!(r.ciphertext, terms_det(&d, b"MRN-0042").await[0]);

    let audit = d.audit_text();
    for action in [
        "\"action\":\"encrypt_deterministic\"",
        "\"action\":\"blind_index\"",
        "\"action\":\"deterministic_query\"",
        "\"action\":\"blind_index_query\"",
    ] {
        assert!(audit.contains(action), "{action} not audited");
    }
    for value in ["MRN-0042", "078-05-1120", "078051120", "078 05 1120"] {
        assert!(!audit.contains(value), "{value} in the audit log");
    }
}

async fn terms_det(d: &Daemon, value: &[u8]) -> Vec<Vec<u8>> {
    let kind = pb::search_terms_request::Kind::Deterministic(pb::DeterministicTerms {});
    terms(d, "mrn", value, kind)
        .await
        .unwrap()
        .terms
        .into_iter()
        .map(|t| t.value)
        .collect()
}

#[tokio::test]
async fn encrypt_and_search_together_are_enough_for_deterministic_calls() {
    let d = Daemon::with_config(&config(
        "[[policy]]\nuids = [0]\noperations = [\"admin\"]\ntenants = [\"*\"]\n\
         [[policy]]\nuids = [0]\noperations = [\"encrypt\", \"search\"]\n\
         tenants = [\"clinic\"]\nfields = [\"ssn\"]\n",
    ));
    create_tenant(&d, "clinic").await;
    let stored = ssn_deterministic(&d).await.unwrap();
    let found = terms(
        &d,
        "ssn",
        b"078051120",
        pb::search_terms_request::Kind::Deterministic(pb::DeterministicTerms {}),
    )
    .await
    .unwrap();
    assert_eq!(found.terms.len(), 1);
    assert_eq!(found.terms[0].value, stored);
    assert!(refused_actions(&d).is_empty());
}

#[tokio::test]
async fn search_needs_its_own_grant() {
    let d = Daemon::with_config(&config(
        "[[policy]]\nuids = [0]\noperations = [\"encrypt\", \"decrypt\", \"admin\"]\ntenants = [\"*\"]\n",
    ));
    create_tenant(&d, "clinic").await;
    let mut fields = d.fields().await;
    let err = fields
        .blind_index(pb::BlindIndexRequest {
            context: ctx("clinic", "ssn", None),
            value: b"078051120".to_vec(),
            spec: spec(pb::Normalization::Exact, 64),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // Deterministic encryption reveals equality like a search term: `encrypt` is not enough.
    let err = ssn_deterministic(&d).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // Search terms of either kind need `search` too.
    for kind in [
        pb::search_terms_request::Kind::BlindIndex(pb::BlindIndexSpec {
            normalization: pb::Normalization::Exact as i32,
            bits: 64,
        }),
        pb::search_terms_request::Kind::Deterministic(pb::DeterministicTerms {}),
    ] {
        let err = terms(&d, "ssn", b"078051120", kind).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    }
    // Refused as such (and audited) whatever else is wrong with the call: a plaintext whose
    // answer could exceed the message limit, a spec that is not valid.
    let err = fields
        .encrypt_deterministic(pb::EncryptRequest {
            context: ctx("clinic", "ssn", None),
            plaintext: vec![b'x'; 4 * 1024 * 1024 - 40],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let bad_spec = pb::BlindIndexSpec {
        normalization: pb::Normalization::Exact as i32,
        bits: 7,
    };
    let err = fields
        .blind_index(pb::BlindIndexRequest {
            context: ctx("clinic", "ssn", None),
            value: b"078051120".to_vec(),
            spec: Some(bad_spec),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = terms(
        &d,
        "ssn",
        b"078051120",
        pb::search_terms_request::Kind::BlindIndex(bad_spec),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let refused = refused_actions(&d);
    assert_eq!(
        refused,
        [
            "blind_index",
            "encrypt_deterministic",
            "blind_index_query",
            "deterministic_query",
            "encrypt_deterministic",
            "blind_index",
            "blind_index_query"
        ],
        "each refusal is audited under its own action"
    );
}

#[tokio::test]
async fn rewrapping_a_deterministic_ciphertext_needs_search_too() {
    // It gives what EncryptDeterministic would under the primary version: an identity with
    // `rewrap` alone could make an old backup's values comparable with the current table.
    let mut d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let deterministic = ssn_deterministic(&d).await.unwrap();
    let randomized = d
        .fields()
        .await
        .encrypt(pb::EncryptRequest {
            context: ctx("clinic", "ssn", None),
            plaintext: b"078051120".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    rotate_tenant(&d, "clinic").await;
    let data_dir = d.data_dir.to_str().unwrap().to_owned();
    d.stop();
    let rewrap_only = Daemon::with_config(&format!(
        "socket = \"{{socket}}\"\ndata_dir = \"{data_dir}\"\n[[policy]]\nuids = [0]\n\
         operations = [\"rewrap\"]\ntenants = [\"*\"]\n"
    ));
    let results = rewrap_only
        .fields()
        .await
        .rewrap(pb::RewrapRequest {
            items: [deterministic, randomized]
                .into_iter()
                .map(|ciphertext| pb::RewrapItem {
                    context: ctx("clinic", "ssn", None),
                    ciphertext,
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    match &results[0].result {
        Some(pb::rewrap_result::Result::Error(e)) => assert_eq!(e.kind, "permission_denied"),
        other => panic!("{other:?}"),
    }
    match &results[1].result {
        Some(pb::rewrap_result::Result::Ok(ok)) => assert_eq!(ok.key_version, 2),
        other => panic!("{other:?}"),
    }
    let refused: Vec<String> =
        common::audit_records(&std::path::Path::new(&data_dir).join("audit.log"))
            .iter()
            .filter(|r| r["result"] == "permission_denied")
            .map(|r| r["action"].as_str().unwrap_or_default().to_owned())
            .collect();
    assert_eq!(refused, ["rewrap"]);
}

/// `EncryptDeterministic` of an SSN in field `ssn` of tenant `clinic`: the ciphertext.
async fn ssn_deterministic(d: &Daemon) -> Result<Vec<u8>, tonic::Status> {
    d.fields()
        .await
        .encrypt_deterministic(pb::EncryptRequest {
            context: ctx("clinic", "ssn", None),
            plaintext: b"078051120".to_vec(),
        })
        .await
        .map(|r| r.into_inner().ciphertext)
}

/// The actions of the audit log's `permission_denied` records, in order.
fn refused_actions(d: &Daemon) -> Vec<String> {
    common::audit_records(&d.audit_log())
        .iter()
        .filter(|r| r["result"] == "permission_denied")
        .map(|r| r["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `SearchTerms` for `value` in `field` of tenant `clinic`.
async fn terms(
    d: &Daemon,
    field: &str,
    value: &[u8],
    kind: pb::search_terms_request::Kind,
) -> Result<pb::SearchTermsResponse, tonic::Status> {
    d.fields()
        .await
        .search_terms(pb::SearchTermsRequest {
            context: ctx("clinic", field, None),
            value: value.to_vec(),
            kind: Some(kind),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn deterministic_search_terms_need_encrypt_as_well() {
    // Deterministic terms are valid ciphertexts of a chosen value: `search` alone is not
    // enough for them, nor for deterministic encryption; blind-index terms need only
    // `search`.
    let d = Daemon::with_config(&config(
        "[[policy]]\nuids = [0]\noperations = [\"search\", \"admin\"]\ntenants = [\"*\"]\n",
    ));
    create_tenant(&d, "clinic").await;
    let blind = terms(
        &d,
        "ssn",
        b"078051120",
        pb::search_terms_request::Kind::BlindIndex(pb::BlindIndexSpec {
            normalization: pb::Normalization::Exact as i32,
            bits: 64,
        }),
    )
    .await
    .unwrap();
    assert_eq!(blind.terms.len(), 1);
    let err = terms(
        &d,
        "ssn",
        b"078051120",
        pb::search_terms_request::Kind::Deterministic(pb::DeterministicTerms {}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // So does deterministic encryption.
    let err = ssn_deterministic(&d).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let refused = refused_actions(&d);
    assert_eq!(refused, ["deterministic_query", "encrypt_deterministic"]);
}

/// Streams `chunks` through EncryptStream; the ciphertext.
async fn encrypt_stream(d: &Daemon, chunks: Vec<Vec<u8>>) -> Vec<u8> {
    encrypt_stream_answers(d, chunks).await.concat()
}

/// Streams `chunks` through EncryptStream; each answer's ciphertext piece.
async fn encrypt_stream_answers(d: &Daemon, chunks: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut requests = vec![context_message()];
    let plaintext_bytes = chunks.iter().map(|c| c.len() as u64).sum();
    requests.extend(chunks.into_iter().map(chunk_message));
    requests.push(end_message(plaintext_bytes));
    let (pieces, ended) = encrypt_stream_requests(d, requests).await;
    ended.unwrap();
    pieces
}

/// EncryptStream's first message: tenant `clinic`, field `referral`, record `doc-7`.
fn context_message() -> pb::EncryptStreamRequest {
    pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Context(
            ctx("clinic", "referral", Some("doc-7")).unwrap(),
        )),
    }
}

/// An EncryptStream message carrying `bytes` of plaintext.
fn chunk_message(bytes: Vec<u8>) -> pb::EncryptStreamRequest {
    pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Chunk(bytes)),
    }
}

/// EncryptStream's last message, counting `plaintext_bytes`.
fn end_message(plaintext_bytes: u64) -> pb::EncryptStreamRequest {
    pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::End(pb::StreamEnd {
            plaintext_bytes,
        })),
    }
}

/// Sends `requests` through EncryptStream: each answer's ciphertext piece and how the call
/// ended.
async fn encrypt_stream_requests(
    d: &Daemon,
    requests: Vec<pb::EncryptStreamRequest>,
) -> (Vec<Vec<u8>>, Result<(), tonic::Status>) {
    let mut answers = d
        .fields()
        .await
        .encrypt_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    read_answer_pieces(&mut answers).await
}

/// Streams `ciphertext` through DecryptStream in `chunk`-byte pieces: the plaintext received
/// and how the call ended.
async fn decrypt_stream(
    d: &Daemon,
    ciphertext: &[u8],
    chunk: usize,
) -> (Vec<u8>, Result<(), tonic::Status>) {
    let (pieces, ended) = decrypt_stream_answers(d, ciphertext, chunk).await;
    (pieces.concat(), ended)
}

/// [`decrypt_stream`], with each answer's plaintext piece.
async fn decrypt_stream_answers(
    d: &Daemon,
    ciphertext: &[u8],
    chunk: usize,
) -> (Vec<Vec<u8>>, Result<(), tonic::Status>) {
    let mut requests = vec![pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Context(
            ctx("clinic", "referral", Some("doc-7")).unwrap(),
        )),
    }];
    requests.extend(ciphertext.chunks(chunk).map(|c| pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Chunk(c.to_vec())),
    }));
    let mut answers = match d
        .fields()
        .await
        .decrypt_stream(tokio_stream::iter(requests))
        .await
    {
        Ok(answers) => answers.into_inner(),
        Err(status) => return (Vec::new(), Err(status)),
    };
    read_answer_pieces(&mut answers).await
}

/// Reads a stream's answers to their end: what was received and how the call ended.
async fn read_answers(
    answers: &mut tonic::Streaming<pb::StreamChunk>,
) -> (Vec<u8>, Result<(), tonic::Status>) {
    let (pieces, ended) = read_answer_pieces(answers).await;
    (pieces.concat(), ended)
}

/// [`read_answers`], one piece per answer.
async fn read_answer_pieces(
    answers: &mut tonic::Streaming<pb::StreamChunk>,
) -> (Vec<Vec<u8>>, Result<(), tonic::Status>) {
    let mut pieces = Vec::new();
    loop {
        match answers.message().await {
            Ok(Some(chunk)) => pieces.push(chunk.chunk),
            Ok(None) => return (pieces, Ok(())),
            Err(status) => return (pieces, Err(status)),
        }
    }
}

#[tokio::test]
async fn large_values_stream_both_ways_and_tampering_is_refused() {
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    // 3 MiB + a bit, in uneven chunks.
    let document: Vec<u8> = (0..3 * 1024 * 1024 + 12_345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let chunks: Vec<Vec<u8>> = document.chunks(100_003).map(<[u8]>::to_vec).collect();
    let ciphertext = encrypt_stream(&d, chunks).await;
    assert!(ciphertext.len() > document.len());

    for chunk in [1_000_000, 65_536, 7_777] {
        let (plaintext, end) = decrypt_stream(&d, &ciphertext, chunk).await;
        end.unwrap();
        assert!(plaintext == document, "round trip with {chunk}-byte chunks");
    }

    // Truncated: the last bytes dropped. Segments before it were released; the call fails.
    let (released, end) = decrypt_stream(&d, &ciphertext[..ciphertext.len() - 100], 65_536).await;
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(released.len() < document.len());
    // One byte flipped in the middle.
    let mut altered = ciphertext.clone();
    altered[ciphertext.len() / 2] ^= 0x40;
    let (_, end) = decrypt_stream(&d, &altered, 65_536).await;
    assert_eq!(end.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Wrong context: nothing released.
    let mut requests = vec![pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Context(
            ctx("clinic", "referral", Some("doc-8")).unwrap(),
        )),
    }];
    requests.push(pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Chunk(ciphertext.clone())),
    });
    let mut answers = d
        .fields()
        .await
        .decrypt_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await;
    assert!(
        matches!(&first, Err(s) if s.code() == tonic::Code::InvalidArgument),
        "{first:?}"
    );
    // A stream without a context first is refused.
    let no_context = vec![pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Chunk(b"x".to_vec())),
    }];
    let err = d
        .fields()
        .await
        .encrypt_stream(tokio_stream::iter(no_context))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let records = common::audit_records(&d.audit_log());
    let streams: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["action"].as_str().is_some_and(|a| a.ends_with("_stream")))
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        streams
            .iter()
            .filter(|(a, r)| a == "encrypt_stream" && r == "ok")
            .count(),
        1,
        "{streams:?}"
    );
    assert_eq!(
        streams
            .iter()
            .filter(|(a, r)| a == "decrypt_stream" && r == "ok")
            .count(),
        3,
        "{streams:?}"
    );
    assert_eq!(
        streams
            .iter()
            .filter(|(a, r)| a == "decrypt_stream" && r != "ok" && r != "attempt")
            .count(),
        3,
        "{streams:?}"
    );
    // Every one of the six decryptions recorded its attempt before releasing plaintext.
    assert_eq!(
        streams
            .iter()
            .filter(|(a, r)| a == "decrypt_stream" && r == "attempt")
            .count(),
        6,
        "{streams:?}"
    );
}

#[tokio::test]
async fn stream_answers_are_split_to_fit_the_message_limit() {
    // 16 KiB messages: every 64 KiB segment, sealed or opened, is larger than one answer.
    let limit = 16 * 1024;
    let d = Daemon::with_config(&config(&format!(
        "{ALL}\n[limits]\nmax_message_bytes = {limit}\n"
    )));
    create_tenant(&d, "clinic").await;
    let document: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Vec<u8>> = document.chunks(10_000).map(<[u8]>::to_vec).collect();
    let sealed = encrypt_stream_answers(&d, chunks).await;
    let sizes: Vec<usize> = sealed.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n < limit), "{sizes:?}");
    assert!(sizes.len() > 4, "{sizes:?}");

    let (opened, ended) = decrypt_stream_answers(&d, &sealed.concat(), 10_000).await;
    ended.unwrap();
    let sizes: Vec<usize> = opened.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n < limit), "{sizes:?}");
    assert!(
        opened.concat() == document,
        "the round trip changed the document"
    );
}

#[tokio::test]
async fn the_cli_encrypts_and_decrypts_files_and_leaves_nothing_on_failure() {
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("referral.pdf");
    let document: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&plain, &document).unwrap();
    let sealed = dir.path().join("referral.pdf.phs");
    let opened = dir.path().join("referral.out.pdf");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let context = [
        "--tenant", "clinic", "--field", "referral", "--record", "doc-1",
    ];
    let mut args = vec!["encrypt-file"];
    args.extend(context);
    let (input, output) = (path(&plain), path(&sealed));
    args.extend(["--input", &input, "--output", &output]);
    d.cli(&args, b"").expect(0);
    let mut args = vec!["decrypt-file"];
    args.extend(context);
    let (input, output) = (path(&sealed), path(&opened));
    args.extend(["--input", &input, "--output", &output]);
    d.cli(&args, b"").expect(0);
    assert!(std::fs::read(&opened).unwrap() == document);

    // Truncated: exit 1 (decryption failed / malformed), and no output file at all.
    let bytes = std::fs::read(&sealed).unwrap();
    let cut = dir.path().join("cut.phs");
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    let target = dir.path().join("cut.out");
    let mut args = vec!["decrypt-file"];
    args.extend(context);
    let (input, output) = (path(&cut), path(&target));
    args.extend(["--input", &input, "--output", &output]);
    let run = d.cli(&args, b"");
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(!target.exists());
    assert!(!dir.path().join("cut.out.partial").exists());
    // An existing output is never overwritten.
    let run = d.cli(
        &args[..args.len() - 1]
            .iter()
            .copied()
            .chain([path(&opened).as_str()])
            .collect::<Vec<_>>(),
        b"",
    );
    assert_eq!(run.code, 2, "{}", run.stderr);

    // Deterministic encryption and search terms from the command line.
    let det = |value: &[u8]| {
        d.cli(
            &[
                "encrypt",
                "--deterministic",
                "--tenant",
                "clinic",
                "--field",
                "mrn",
            ],
            value,
        )
        .expect(0)
        .out()
    };
    let first = det(b"MRN-7");
    assert_eq!(first, det(b"MRN-7"));
    let terms = d
        .cli(
            &[
                "search-terms",
                "--deterministic",
                "--tenant",
                "clinic",
                "--field",
                "mrn",
            ],
            b"MRN-7",
        )
        .expect(0)
        .out();
    assert_eq!(terms.trim(), first.trim());
    let index = |value: &[u8]| {
        d.cli(
            &[
                "blind-index",
                "--tenant",
                "clinic",
                "--field",
                "ssn",
                "--normalization",
                "digits-only",
                "--bits",
                "32",
            ],
            value,
        )
        .expect(0)
        .out()
    };
    assert_eq!(index(b"078-05-1120"), index(b"078051120"));
    assert_eq!(index(b"078051120").trim().len(), 8);
    // The spec is required.
    let run = d.cli(
        &["blind-index", "--tenant", "clinic", "--field", "ssn"],
        b"1",
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[tokio::test]
async fn a_client_that_stops_reading_never_sees_an_ok_end() {
    let d = Daemon::with_config(&config(&format!(
        "{ALL}[limits]\nrequest_timeout = \"300ms\"\n"
    )));
    create_tenant(&d, "clinic").await;
    let document = vec![7u8; 3 * 1024 * 1024];
    let ciphertext =
        encrypt_stream(&d, document.chunks(65_536).map(<[u8]>::to_vec).collect()).await;
    let mut requests = vec![pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Context(
            ctx("clinic", "referral", Some("doc-7")).unwrap(),
        )),
    }];
    requests.extend(ciphertext.chunks(65_536).map(|c| pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Chunk(c.to_vec())),
    }));
    let mut answers = d
        .fields()
        .await
        .decrypt_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    // Not reading: the daemon's answers back up past its idle limit and it gives up.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (received, end) = read_answers(&mut answers).await;
    let status = end.expect_err("a stream the daemon gave up on must not end with OK");
    assert!(received.len() < document.len(), "{}", received.len());
    assert!(
        matches!(
            status.code(),
            tonic::Code::Aborted | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );
    let records = common::audit_records(&d.audit_log());
    assert!(
        records.iter().any(|r| r["action"] == "decrypt_stream"
            && r["result"] != "ok"
            && r["result"] != "attempt"),
        "the abandoned stream is audited as failed"
    );
}

#[tokio::test]
async fn an_interrupted_encrypt_file_leaves_no_output() {
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    // SIGHUP: the terminal or SSH session of the run went away.
    for signal in ["-INT", "-TERM", "-HUP"] {
        interrupt_encrypt_file(&d, signal);
    }
}

/// Runs `encrypt-file` from a FIFO that stays open, sends it `signal` once it has started,
/// and checks that it stopped with exit 1 and left no output.
fn interrupt_encrypt_file(d: &Daemon, signal: &str) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // A FIFO kept open without an end: the stream stays in progress.
    let input = dir.path().join("input.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&input)
        .status()
        .unwrap();
    assert!(made.success());
    let output = dir.path().join("out.phs");
    let partial = dir.path().join("out.phs.partial");
    let mut child = common::cli_command(&common::bin("phiseal"), &d.socket)
        .args(["encrypt-file", "--tenant", "clinic", "--field", "referral"])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .spawn()
        .unwrap();
    let writer = {
        let input = input.clone();
        std::thread::spawn(move || {
            let mut fifo = std::fs::OpenOptions::new()
                .write(true)
                .open(&input)
                .unwrap();
            // More than the pipe holds, so the stream is in progress; the command may be
            // stopped before it read it all (a broken pipe is expected then).
            let _ = fifo.write_all(&[7u8; 100_000]);
            fifo
        })
    };
    // The partial output exists once the signal handlers are installed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !partial.exists() {
        assert!(std::time::Instant::now() < deadline, "no partial output");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{signal} did not stop it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{signal}: {status}: {stderr}");
    assert!(
        stderr.contains("interrupted; no output written"),
        "{stderr}"
    );
    assert!(!output.exists() && !partial.exists(), "output left behind");
    drop(writer.join().unwrap());
}

#[tokio::test]
async fn a_read_error_cancels_the_stream_instead_of_sealing_a_truncated_one() {
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let dir = tempfile::tempdir().unwrap();
    // Opening a directory works; reading it fails (EISDIR).
    let input = dir.path().join("not-a-file");
    std::fs::create_dir(&input).unwrap();
    let output = dir.path().join("out.phs");
    let run = d.cli(
        &[
            "encrypt-file",
            "--tenant",
            "clinic",
            "--field",
            "referral",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("reading"), "{}", run.stderr);
    assert!(!output.exists());
    assert!(!dir.path().join("out.phs.partial").exists());
    // Give the daemon a moment to record the end of the cancelled stream (after its attempt).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let results = common::audit_results(&d.audit_log(), "encrypt_stream");
        if results.iter().any(|r| r != "attempt") {
            assert_eq!(
                results,
                ["attempt", "transport"],
                "a stream cut by a read error (the CLI exits, its connection breaks) must be audited as failed, never sealed"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no result record for the stream: {results:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_encrypt_stream_is_sealed_as_complete_only_on_an_end_with_the_right_count() {
    // A client whose input failed part way may still close its request stream cleanly: the
    // daemon must not make that truncated plaintext an authentic, complete stream.
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let document: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
    let (context, chunk, end) = (context_message, chunk_message, end_message);
    let cases = [
        // Closed after 100 000 of the 150 000 bytes, without `end`.
        (
            vec![context(), chunk(document[..100_000].to_vec())],
            "without an `end` message",
        ),
        // An `end` that counts more than the chunks carried.
        (
            vec![context(), chunk(document[..100_000].to_vec()), end(150_000)],
            "another number of plaintext bytes",
        ),
    ];
    for (requests, expected) in cases {
        let (pieces, ended) = encrypt_stream_requests(&d, requests).await;
        let sealed = pieces.concat();
        let err = ended.expect_err("an unended stream must not end with OK");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expected), "{err:?}");
        // Whatever was sent before is not a complete stream: it does not decrypt.
        let (_, opened) = decrypt_stream(&d, &sealed, 65_536).await;
        assert_eq!(
            opened.expect_err("a prefix decrypted as complete").code(),
            tonic::Code::InvalidArgument
        );
    }
    // With the right count the same stream is complete.
    let sealed = encrypt_stream(&d, vec![document.clone()]).await;
    let (plain, opened) = decrypt_stream(&d, &sealed, 65_536).await;
    opened.unwrap();
    assert!(plain == document);
    let results = common::audit_results(&d.audit_log(), "encrypt_stream");
    assert_eq!(
        results,
        [
            "attempt",
            "invalid_input",
            "attempt",
            "invalid_input",
            "attempt",
            "ok"
        ]
    );
}

#[tokio::test]
async fn with_require_stream_end_off_a_stream_that_just_closes_is_sealed_as_before() {
    // For clients built before `end` existed, during an upgrade.
    let d = Daemon::with_config(&config(&format!(
        "{ALL}[limits]\nrequire_stream_end = false\n"
    )));
    create_tenant(&d, "clinic").await;
    let document: Vec<u8> = (0..100_000u32).map(|i| (i % 239) as u8).collect();
    let old_client = vec![context_message(), chunk_message(document.clone())];
    let (pieces, ended) = encrypt_stream_requests(&d, old_client).await;
    ended.unwrap();
    let (plain, opened) = decrypt_stream(&d, &pieces.concat(), 65_536).await;
    opened.unwrap();
    assert!(plain == document);
    // An `end` is still checked.
    let wrong = vec![
        context_message(),
        chunk_message(document.clone()),
        end_message(1),
    ];
    let (_, ended) = encrypt_stream_requests(&d, wrong).await;
    assert_eq!(ended.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Said at start, and for each such stream (so that operators see when every client
    // sends `end`).
    assert!(
        d.stderr()
            .contains("limits.require_stream_end = false: an EncryptStream"),
        "{}",
        d.stderr()
    );
    assert!(
        d.stderr().contains("EncryptStream sealed without `end`"),
        "{}",
        d.stderr()
    );
}

#[tokio::test]
async fn a_stream_message_without_a_chunk_is_refused_for_what_it_is() {
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let first = || pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Context(
            ctx("clinic", "referral", None).unwrap(),
        )),
    };
    for (second, expected) in [
        (
            pb::EncryptStreamRequest { part: None },
            "neither context nor chunk",
        ),
        (first(), "only the first message may carry the context"),
    ] {
        let mut answers = d
            .fields()
            .await
            .encrypt_stream(tokio_stream::iter(vec![first(), second]))
            .await
            .unwrap()
            .into_inner();
        let (_, ended) = read_answers(&mut answers).await;
        let err = ended.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expected), "{err:?}");
    }
}

/// An `EncryptStream` of tenant `clinic` held open: its context is sent, and its requests end
/// only when the returned sender is dropped.
async fn held_stream(
    d: &Daemon,
) -> (
    tokio::sync::mpsc::Sender<pb::EncryptStreamRequest>,
    Result<tonic::Response<tonic::Streaming<pb::StreamChunk>>, tonic::Status>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Context(
            ctx("clinic", "referral", None).unwrap(),
        )),
    })
    .await
    .unwrap();
    let answers = d
        .fields()
        .await
        .encrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    (tx, answers)
}

#[tokio::test]
async fn streams_beyond_limits_max_streams_are_refused() {
    let d = Daemon::with_config(&config(&format!("{ALL}[limits]\nmax_streams = 1\n")));
    create_tenant(&d, "clinic").await;
    // One stream held open (its requests never end).
    let (tx, open) = held_stream(&d).await;
    let _open = open.unwrap();
    let second = vec![pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Context(
            ctx("clinic", "referral", None).unwrap(),
        )),
    }];
    let err = d
        .fields()
        .await
        .encrypt_stream(tokio_stream::iter(second))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(common::kind(&err), "too_many_streams");
    drop(tx);
}

#[tokio::test]
async fn a_shred_stops_an_open_decrypt_stream() {
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let document: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sealed = encrypt_stream(&d, vec![document.clone()]).await;
    // The header and two 64 KiB segments (the first is released once the second arrives).
    let first = phiseal::stream::STREAM_HEADER_LEN + 2 * (65_536 + 16);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Context(
            ctx("clinic", "referral", Some("doc-7")).unwrap(),
        )),
    })
    .await
    .unwrap();
    tx.send(pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Chunk(
            sealed[..first].to_vec(),
        )),
    })
    .await
    .unwrap();
    let mut answers = d
        .fields()
        .await
        .decrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let piece = answers.message().await.unwrap().unwrap().chunk;
    assert_eq!(piece, document[..piece.len()]);
    shred_tenant(&d, "clinic").await;
    tx.send(pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Chunk(
            sealed[first..].to_vec(),
        )),
    })
    .await
    .unwrap();
    drop(tx);
    let (rest, ended) = read_answers(&mut answers).await;
    assert!(
        rest.is_empty(),
        "{} bytes released after the shred",
        rest.len()
    );
    let err = ended.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(common::kind(&err), "key_destroyed");
    let results = common::audit_results(&d.audit_log(), "decrypt_stream");
    assert_eq!(results, ["attempt", "key_destroyed"]);
}

#[tokio::test]
async fn a_shred_holds_back_the_answer_waiting_for_a_slow_reader() {
    // The client reads nothing (a 64 KiB HTTP/2 window): the daemon queues four answers,
    // the gRPC layers hold two, and the daemon waits with the next answer's plaintext in hand. A
    // shred meanwhile: that answer is not sent (before, it went out once the reader caught
    // up), only what was queued before the shred.
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let document: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sealed = encrypt_stream(
        &d,
        document.chunks(1024 * 1024).map(<[u8]>::to_vec).collect(),
    )
    .await;
    let socket = d.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_stream_window_size(65_535)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    let mut requests = vec![pb::DecryptStreamRequest {
        part: Some(pb::decrypt_stream_request::Part::Context(
            ctx("clinic", "referral", Some("doc-7")).unwrap(),
        )),
    }];
    requests.extend(
        sealed
            .chunks(1024 * 1024)
            .map(|c| pb::DecryptStreamRequest {
                part: Some(pb::decrypt_stream_request::Part::Chunk(c.to_vec())),
            }),
    );
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&taken);
    let requests = tokio_stream::StreamExt::map(tokio_stream::iter(requests), move |r| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
    });
    let mut answers = pb::field_service_client::FieldServiceClient::new(channel)
        .max_decoding_message_size(8 * 1024 * 1024)
        .decrypt_stream(requests)
        .await
        .unwrap()
        .into_inner();
    // Until the daemon is blocked on the reader: it takes no more requests for 500 ms.
    let mut seen = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = taken.load(std::sync::atomic::Ordering::SeqCst);
        if now == seen && now > 1 {
            break;
        }
        seen = now;
    }
    shred_tenant(&d, "clinic").await;
    let (pieces, ended) = read_answer_pieces(&mut answers).await;
    let err = ended.unwrap_err();
    assert_eq!(common::kind(&err), "key_destroyed", "{err:?}");
    // Two answers taken by the gRPC layers (each 1 MiB answer is over tonic's 32 KiB
    // gathering threshold, so its encoder takes one at a time, and HTTP/2 holds one more) and
    // the four queued; none after them (before: seven).
    assert_eq!(pieces.len(), 6, "answers delivered");
    let released = pieces.concat();
    assert_eq!(released, document[..released.len()]);
}

#[tokio::test]
async fn search_terms_answers_over_the_message_limit_are_refused_with_a_kind() {
    let d = Daemon::with_config(&config(&format!(
        "{ALL}[limits]\nmax_message_bytes = 2048\n"
    )));
    create_tenant(&d, "clinic").await;
    let query = || pb::SearchTermsRequest {
        context: ctx("clinic", "mrn", None),
        value: vec![b'7'; 700],
        kind: Some(pb::search_terms_request::Kind::Deterministic(
            pb::DeterministicTerms {},
        )),
    };
    // One live version: one ~720-byte term fits.
    let mut fields = d.fields().await;
    let terms = fields
        .search_terms(query())
        .await
        .unwrap()
        .into_inner()
        .terms;
    assert_eq!(terms.len(), 1);
    // Three: the answer could exceed 2048 bytes.
    for _ in 0..2 {
        rotate_tenant(&d, "clinic").await;
    }
    let err = fields.search_terms(query()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert_eq!(common::kind(&err), "response_too_large");
}

#[tokio::test]
async fn a_stream_holds_no_slot_before_its_first_message_is_authorized() {
    let d = Daemon::with_config(&config(&format!(
        "{ALL}[limits]
max_streams = 1
"
    )));
    create_tenant(&d, "clinic").await;
    // Streams that never send their first message (the call stays open until its deadline).
    let mut idle = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::EncryptStreamRequest>(1);
        let mut client = d.fields().await;
        let call = tokio::spawn(async move {
            client
                .encrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        idle.push((tx, call));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A stream of another caller (here: the same uid) still gets the one slot.
    let sealed = encrypt_stream(&d, vec![b"referral letter".to_vec()]).await;
    assert!(!sealed.is_empty());
    for (tx, call) in idle {
        assert!(!call.is_finished(), "an idle stream was answered");
        drop(tx);
        call.abort();
    }
}

#[tokio::test]
async fn decrypt_streams_with_segments_over_the_limit_are_refused_and_audited() {
    let d = Daemon::with_config(&config(&format!(
        "{ALL}[limits]\nmax_stream_segment_bytes = 4096\n"
    )));
    create_tenant(&d, "clinic").await;
    // The daemon's own EncryptStream writes 64 KiB segments: over this daemon's limit.
    let document: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let sealed = encrypt_stream(&d, vec![document.clone()]).await;
    let (plain, ended) = decrypt_stream(&d, &sealed, 1000).await;
    let err = ended.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert_eq!(common::kind(&err), "segment_too_large");
    assert!(
        err.message().contains("65536") && err.message().contains("4096"),
        "{err:?}"
    );
    assert!(plain.is_empty());
    let results = common::audit_results(&d.audit_log(), "decrypt_stream");
    assert_eq!(results, ["segment_too_large"], "refused before any key use");

    // The CLI: exit 1 (retrying does not help), the daemon's message, no output left.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("doc.phs");
    std::fs::write(&input, &sealed).unwrap();
    let output = dir.path().join("doc.out");
    let run = d.cli(
        &[
            "decrypt-file",
            "--tenant",
            "clinic",
            "--field",
            "referral",
            "--record",
            "doc-7",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("segment_too_large"), "{}", run.stderr);
    assert!(!run.stderr.contains("max_message_bytes"), "{}", run.stderr);
    assert!(!output.exists());

    // Under the default limit (1 MiB) the same stream decrypts.
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let sealed = encrypt_stream(&d, vec![document.clone()]).await;
    let (plain, ended) = decrypt_stream(&d, &sealed, 1000).await;
    ended.unwrap();
    assert!(plain == document);
}

#[tokio::test]
async fn unauthenticated_search_calls_are_audited_under_their_own_action() {
    use pb::search_terms_request::Kind;
    let d = Daemon::with_config(&config(ALL));
    create_tenant(&d, "clinic").await;
    let bad = "not-a-configured-token";
    let mut fields = d.fields().await;
    let det = || pb::EncryptRequest {
        context: ctx("clinic", "ssn", None),
        plaintext: b"078051120".to_vec(),
    };
    let terms = |kind: Kind| pb::SearchTermsRequest {
        context: ctx("clinic", "ssn", None),
        value: b"078051120".to_vec(),
        kind: Some(kind),
    };
    // Each call with the bad token, its answer reduced to its status.
    macro_rules! refused {
        ($rpc:ident, $body:expr) => {
            fields
                .$rpc(common::with_token($body, bad))
                .await
                .map(|_| ())
        };
    }
    let blind_spec = pb::BlindIndexSpec {
        normalization: pb::Normalization::Exact as i32,
        bits: 64,
    };
    let stream_context = || ctx("clinic", "referral", Some("doc-1")).unwrap();
    let results = [
        refused!(encrypt_deterministic, det()),
        refused!(
            blind_index,
            pb::BlindIndexRequest {
                context: ctx("clinic", "ssn", None),
                value: b"078051120".to_vec(),
                spec: Some(blind_spec),
            }
        ),
        refused!(
            search_terms,
            terms(Kind::Deterministic(pb::DeterministicTerms {}))
        ),
        refused!(search_terms, terms(Kind::BlindIndex(blind_spec))),
        refused!(
            encrypt_stream,
            tokio_stream::iter([pb::EncryptStreamRequest {
                part: Some(pb::encrypt_stream_request::Part::Context(stream_context())),
            }])
        ),
        refused!(
            decrypt_stream,
            tokio_stream::iter([pb::DecryptStreamRequest {
                part: Some(pb::decrypt_stream_request::Part::Context(stream_context())),
            }])
        ),
    ];
    for result in &results {
        let err = result.as_ref().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }
    let refused: Vec<String> = common::audit_records(&d.audit_log())
        .iter()
        .filter(|r| r["result"] == "unauthenticated")
        .map(|r| r["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        refused,
        [
            "encrypt_deterministic",
            "blind_index",
            "deterministic_query",
            "blind_index_query",
            "encrypt_stream",
            "decrypt_stream"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_open_at_shutdown_are_ended_and_audited_before_the_final_flush() {
    // The drain waits limits.request_timeout + 5 s for calls in flight, then ends the streams
    // still open. The request timeout is also the streams' idle limit.
    let mut d = Daemon::with_config(&config(&format!(
        "{ALL}[limits]\nrequest_timeout = \"1s\"\n"
    )));
    create_tenant(&d, "clinic").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Context(
            ctx("clinic", "referral", Some("doc-9")).unwrap(),
        )),
    })
    .await
    .unwrap();
    let mut answers = d
        .fields()
        .await
        .encrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The client keeps its stream moving, well within the idle limit, and never ends it.
    let feeder = tokio::spawn(async move {
        loop {
            let chunk = pb::EncryptStreamRequest {
                part: Some(pb::encrypt_stream_request::Part::Chunk(vec![3u8; 16_384])),
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    d.sigterm();
    let (received, end) = read_answers(&mut answers).await;
    let status = end.expect_err("a stream ended by the shutdown must not end with OK");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(common::kind(&status), "shutting_down");
    assert!(
        !received.is_empty(),
        "segments were sealed before the shutdown"
    );
    let exit = tokio::task::block_in_place(|| d.wait_exit(std::time::Duration::from_secs(30)));
    feeder.abort();
    assert!(exit.success(), "exit {exit}: {}", d.stderr());
    assert!(d.stderr().contains("ending open streams"), "{}", d.stderr());

    // The stream's attempt and its end are both on the log, and the log is intact.
    let report = phiseal_audit_file::verify(d.audit_log()).unwrap();
    assert!(
        report.is_intact() && report.torn_tail.is_none(),
        "{report:?}"
    );
    let results = common::audit_results(&d.audit_log(), "encrypt_stream");
    assert_eq!(results, ["attempt", "shutdown"]);
}

#[tokio::test]
async fn streams_the_policy_refuses_are_denied_and_audited_with_the_identity() {
    // uid 0 may encrypt and decrypt field "referral" of tenant "clinic" only.
    let d = Daemon::with_config(&config(
        "[[policy]]\nuids = [0]\noperations = [\"admin\"]\ntenants = [\"*\"]\n\
         [[policy]]\nuids = [0]\noperations = [\"encrypt\", \"decrypt\"]\n\
         tenants = [\"clinic\"]\nfields = [\"referral\"]\n",
    ));
    create_tenant(&d, "clinic").await;
    create_tenant(&d, "other").await;
    let sealed = encrypt_stream(&d, vec![b"a referral letter".to_vec()]).await;
    let context = |tenant: &str, field: &str| ctx(tenant, field, Some("doc-7")).unwrap();
    for (tenant, field) in [("other", "referral"), ("clinic", "notes")] {
        let encrypt = vec![
            pb::EncryptStreamRequest {
                part: Some(pb::encrypt_stream_request::Part::Context(context(
                    tenant, field,
                ))),
            },
            pb::EncryptStreamRequest {
                part: Some(pb::encrypt_stream_request::Part::Chunk(b"PHI".to_vec())),
            },
        ];
        let err = d
            .fields()
            .await
            .encrypt_stream(tokio_stream::iter(encrypt))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), common::kind(&err).as_str()),
            (tonic::Code::PermissionDenied, "permission_denied"),
            "{tenant}/{field}"
        );
        let decrypt = vec![
            pb::DecryptStreamRequest {
                part: Some(pb::decrypt_stream_request::Part::Context(context(
                    tenant, field,
                ))),
            },
            pb::DecryptStreamRequest {
                part: Some(pb::decrypt_stream_request::Part::Chunk(sealed.clone())),
            },
        ];
        let err = d
            .fields()
            .await
            .decrypt_stream(tokio_stream::iter(decrypt))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), common::kind(&err).as_str()),
            (tonic::Code::PermissionDenied, "permission_denied"),
            "{tenant}/{field}"
        );
    }
    let denied: Vec<(String, String, String, String)> = common::audit_records(&d.audit_log())
        .iter()
        .filter(|r| r["result"] == "permission_denied")
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (text("action"), text("tenant"), text("field"), text("actor"))
        })
        .collect();
    let uid = format!("uid:{}", rustix::process::getuid().as_raw());
    let expected: Vec<(String, String, String, String)> = [
        ("encrypt_stream", "other", "referral"),
        ("decrypt_stream", "other", "referral"),
        ("encrypt_stream", "clinic", "notes"),
        ("decrypt_stream", "clinic", "notes"),
    ]
    .iter()
    .map(|(a, t, f)| (a.to_string(), t.to_string(), f.to_string(), uid.clone()))
    .collect();
    assert_eq!(denied, expected);
}

#[tokio::test]
async fn one_caller_cannot_hold_every_stream_slot() {
    let d = Daemon::with_config(&config(&format!(
        "{ALL}[limits]\nmax_streams = 4\nmax_streams_per_caller = 2\n"
    )));
    create_tenant(&d, "clinic").await;
    // Streams held open (their requests never end) by this caller (uid 0, no token).
    let open = || held_stream(&d);
    let (first_tx, first) = open().await;
    let (_second_tx, second) = open().await;
    assert!(first.is_ok() && second.is_ok());
    let (_, third) = open().await;
    let err = third.unwrap_err();
    assert_eq!(
        (err.code(), common::kind(&err).as_str()),
        (tonic::Code::ResourceExhausted, "too_many_streams")
    );
    assert!(err.message().contains("max_streams_per_caller"), "{err:?}");
    // A stream that ends gives its slot back.
    drop(first_tx);
    let mut first = first.unwrap().into_inner();
    while let Some(Ok(_)) = tokio_stream::StreamExt::next(&mut first).await {}
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_tx, again) = open().await;
        match again {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(common::kind(&e), "too_many_streams");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the slot was not given back: {e:?}"),
        }
    }
}
