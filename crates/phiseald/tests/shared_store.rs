//! Two real `phiseald` processes sharing one PostgreSQL key store (a throwaway cluster): a
//! rotation or shred made through one is seen by the other through LISTEN/NOTIFY, well within
//! the cache's metadata TTL (set to an hour here, so that only a notification can explain it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use phiseal_proto::v1 as pb;
use phiseal_store_postgres::testkit::{Cluster, ClusterOptions};
use tonic::Code;

/// Both daemons use the same data directory (the local KMS root key must be the same) and
/// database, each with its own socket and audit log.
fn config(shared_data: &str, url: &str) -> String {
    format!(
        r#"
socket = "{{socket}}"
data_dir = "{shared_data}"
[audit]
path = "{{dir}}/audit.log"
[cache]
metadata_ttl = "1h"
key_ttl = "1h"
[key_store]
kind = "postgres"
database_url = "{url}"
[[policy]]
uids = [0]
operations = ["*"]
tenants = ["*"]
"#
    )
}

/// A throwaway cluster with the database `keys` (and its URL), and the data directory of
/// daemons sharing it (in a temporary directory kept alive by the third value).
fn cluster_with_keys_database() -> (Cluster, String, tempfile::TempDir, std::path::PathBuf) {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql_admin("CREATE DATABASE keys");
    let url = cluster.url("keys");
    let shared = tempfile::tempdir().unwrap();
    let data = shared.path().join("data");
    (cluster, url, shared, data)
}

async fn encrypt(d: &Daemon, tenant: &str) -> Result<u32, tonic::Status> {
    d.fields()
        .await
        .encrypt(pb::EncryptRequest {
            context: ctx(tenant, "ssn", Some("r1")),
            plaintext: b"078-05-1120".to_vec(),
        })
        .await
        .map(|r| r.into_inner().key_version)
}

/// Polls `f` until it returns true, for at most `limit`; returns how long it took.
async fn within(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test]
async fn a_rotation_and_a_shred_on_one_daemon_reach_the_other_through_notify() {
    let (_cluster, url, _shared, data) = cluster_with_keys_database();
    let data = data.to_str().unwrap();
    let a = Daemon::with_config(&config(data, &url));
    let b = Daemon::with_config(&config(data, &url));

    create_tenant(&a, "acme").await;
    // b caches the tenant (version 1) before a changes it.
    assert_eq!(encrypt(&b, "acme").await.unwrap(), 1);

    let rotated = a
        .admin()
        .await
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant: "acme".into(),
            expected_latest_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.key_version, 2);
    let seen = within(Duration::from_secs(2), async || {
        encrypt(&b, "acme").await.unwrap() == 2
    })
    .await;
    assert!(
        seen.is_some(),
        "b kept encrypting under version 1 after a rotated"
    );

    // A ciphertext from either daemon decrypts on the other.
    let ct = a
        .fields()
        .await
        .encrypt(pb::EncryptRequest {
            context: ctx("acme", "ssn", Some("r2")),
            plaintext: b"v".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let back = b
        .fields()
        .await
        .decrypt(pb::DecryptRequest {
            context: ctx("acme", "ssn", Some("r2")),
            ciphertext: ct.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, b"v");

    // An EncryptStream open on b, one segment sealed.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for part in [
        pb::encrypt_stream_request::Part::Context(ctx("acme", "scan", None).unwrap()),
        pb::encrypt_stream_request::Part::Chunk(vec![7u8; 70_000]),
    ] {
        tx.send(pb::EncryptStreamRequest { part: Some(part) })
            .await
            .unwrap();
    }
    let mut answers = b
        .fields()
        .await
        .encrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(!answers.message().await.unwrap().unwrap().chunk.is_empty());

    shred_tenant(&a, "acme").await;
    // Without any call to b, its stream stops: the notification makes b re-read the tenant.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.send(pb::EncryptStreamRequest {
        part: Some(pb::encrypt_stream_request::Part::Chunk(vec![7u8; 70_000])),
    })
    .await
    .unwrap();
    drop(tx);
    let ended = loop {
        match answers.message().await {
            Ok(Some(chunk)) => assert!(chunk.chunk.is_empty(), "sealed after the shred"),
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    let err = ended.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(kind(&err), "key_destroyed");

    let refused = within(Duration::from_secs(2), async || {
        let r = b
            .fields()
            .await
            .decrypt(pb::DecryptRequest {
                context: ctx("acme", "ssn", Some("r2")),
                ciphertext: ct.clone(),
            })
            .await;
        matches!(&r, Err(e) if e.code() == Code::FailedPrecondition && kind(e) == "key_destroyed")
    })
    .await;
    assert!(
        refused.is_some(),
        "b still decrypted after a shredded the tenant"
    );
}

#[tokio::test]
async fn forged_notifications_cost_no_kms_call() {
    // Anyone who can connect to the database can NOTIFY on the store's channel.
    let (cluster, url, _shared, data) = cluster_with_keys_database();
    let d = Daemon::with_config(&config(data.to_str().unwrap(), &url));
    create_tenant(&d, "acme").await;
    assert_eq!(encrypt(&d, "acme").await.unwrap(), 1);
    let audit = d.dir.path().join("audit.log");
    let unwraps = || {
        std::fs::read_to_string(&audit)
            .unwrap()
            .matches("\"key_source\":\"kms\"")
            .count()
    };
    let before = unwraps();
    assert!(before >= 1);
    // A flood naming the tenant, and payloads that name none (read as "everything
    // changed").
    let mut sql = String::new();
    for i in 0..200 {
        sql.push_str("SELECT pg_notify('phiseal_key_changes', 'acme');");
        sql.push_str(&format!(
            "SELECT pg_notify('phiseal_key_changes', 'not a tenant {i}');"
        ));
    }
    // Calls made during the flood all succeed (the metadata is dropped at most every 20 ms,
    // not at each notification).
    let mut flood = cluster
        .psql_in_command("keys", &sql.repeat(5))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut calls = 0;
    while flood.try_wait().unwrap().is_none() || calls < 20 {
        let done = encrypt(&d, "acme").await;
        assert!(done.is_ok(), "a call failed during the flood: {done:?}");
        calls += 1;
    }
    assert!(flood.wait().unwrap().success());
    cluster.psql_in("keys", &sql);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        assert_eq!(encrypt(&d, "acme").await.unwrap(), 1);
    }
    assert_eq!(
        unwraps(),
        before,
        "a forged notification dropped the cached key"
    );
    // The daemon still follows real changes made elsewhere (another daemon's rotation).
    let other = Daemon::with_config(&config(data.to_str().unwrap(), &url));
    other
        .admin()
        .await
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant: "acme".into(),
            expected_latest_version: None,
        })
        .await
        .unwrap();
    let seen = within(Duration::from_secs(2), async || {
        encrypt(&d, "acme").await.unwrap() == 2
    })
    .await;
    assert!(seen.is_some(), "the rotation was not seen");
}

#[tokio::test]
async fn a_missing_local_root_key_is_not_replaced_while_the_shared_store_holds_tenants() {
    let (_cluster, url, _shared, data) = cluster_with_keys_database();
    let mut d = Daemon::with_config(&config(data.to_str().unwrap(), &url));
    create_tenant(&d, "acme").await;
    d.stop();
    // The root key file is lost (an unmounted volume, a wiped host): the daemon must not make
    // a new one while PostgreSQL holds tenants wrapped under the old one.
    std::fs::remove_file(data.join("root.key")).unwrap();
    let stderr_path = d.dir.path().join("refused.stderr");
    let mut child = std::process::Command::new(bin("phiseald"))
        .arg("--config")
        .arg(d.dir.path().join("phiseald.toml"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("phiseald started with a new root key instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("root key") && stderr.contains("is missing") && stderr.contains("1 tenant"),
        "{stderr}"
    );
    assert!(
        !data.join("root.key").exists(),
        "a new root key was created"
    );
}

/// One database, three daemons (their own sockets and audit logs).
fn three_daemons(
    cluster: &Cluster,
    shared: &tempfile::TempDir,
    config: fn(&str, &str) -> String,
) -> Vec<Daemon> {
    cluster.psql_admin("CREATE DATABASE keys");
    let url = cluster.url("keys");
    let data = shared.path().join("data");
    let data = data.to_str().unwrap().to_owned();
    (0..3)
        .map(|_| Daemon::with_config(&config(&data, &url)))
        .collect()
}

#[tokio::test]
async fn daemons_rotating_and_encrypting_at_once_never_clash() {
    let cluster = Cluster::start(ClusterOptions::default());
    let shared = tempfile::tempdir().unwrap();
    let daemons = three_daemons(&cluster, &shared, config);
    create_tenant(&daemons[0], "busy").await;
    let mut tasks = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            let channel = phiseal_proto::connect_unix(&socket).await.unwrap();
            let mut fields = pb::field_service_client::FieldServiceClient::new(channel.clone());
            let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
            let mut made = Vec::new();
            let (mut rotated, mut conflicts) = (0, 0);
            for round in 0..15 {
                let items: Vec<pb::EncryptRequest> = (0..10)
                    .map(|j| pb::EncryptRequest {
                        context: ctx("busy", "f", Some(&format!("d{i}-{round}-{j}"))),
                        plaintext: format!("value-{i}-{round}-{j}").into_bytes(),
                    })
                    .collect();
                let records: Vec<String> = (0..10).map(|j| format!("d{i}-{round}-{j}")).collect();
                let out = fields
                    .encrypt_batch(pb::EncryptBatchRequest { items })
                    .await
                    .unwrap()
                    .into_inner();
                for (r, record) in out.results.into_iter().zip(records) {
                    match r.result {
                        Some(pb::encrypt_result::Result::Ok(ok)) => {
                            made.push((record, ok.ciphertext))
                        }
                        other => panic!("{other:?}"),
                    }
                }
                if round % 3 == i % 3 {
                    match admin
                        .rotate_tenant_key(pb::RotateTenantKeyRequest {
                            tenant: "busy".into(),
                            expected_latest_version: None,
                        })
                        .await
                    {
                        Ok(_) => rotated += 1,
                        // Another daemon won the compare-and-set for this version.
                        Err(e) if e.code() == Code::Aborted => conflicts += 1,
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
            (made, rotated, conflicts)
        }));
    }
    let mut all = Vec::new();
    let (mut rotations, mut lost) = (0, 0);
    for t in tasks {
        let (made, rotated, conflicts) = t.await.unwrap();
        all.extend(made);
        rotations += rotated;
        lost += conflicts;
    }
    // Every attempt (5 per daemon) either rotated or lost a race, and rotations did happen.
    assert_eq!(
        rotations + lost,
        15,
        "{rotations} rotated, {lost} conflicts"
    );
    assert!(rotations >= 1, "nothing rotated ({lost} conflicts)");
    // The encryptions were spread over more than one key version.
    let mut used: Vec<u32> = all
        .iter()
        .map(|(_, ct)| u32::from_be_bytes(ct[2..6].try_into().unwrap()))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() > 1, "all under version(s) {used:?}");
    // Versions are 1..=1+rotations, each once.
    let status = daemons[1]
        .admin()
        .await
        .key_status(pb::KeyStatusRequest {
            tenant: "busy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<u32> = status.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, (1..=1 + rotations).collect::<Vec<u32>>());
    // Every ciphertext, whichever daemon made it, decrypts on every daemon.
    for d in &daemons {
        let items = all
            .iter()
            .map(|(record, ct)| pb::DecryptRequest {
                context: ctx("busy", "f", Some(record)),
                ciphertext: ct.clone(),
            })
            .collect();
        let out = d
            .fields()
            .await
            .decrypt_batch(pb::DecryptBatchRequest { items })
            .await
            .unwrap()
            .into_inner();
        for ((record, _), r) in all.iter().zip(out.results) {
            match r.result {
                Some(pb::decrypt_result::Result::Ok(ok)) => {
                    assert_eq!(ok.plaintext, format!("value-{}", &record[1..]).into_bytes())
                }
                other => panic!("{record}: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_database_restart_under_load_loses_nothing() {
    let (cluster, url, _shared, data) = cluster_with_keys_database();
    let d = Daemon::with_config(&config(data.to_str().unwrap(), &url));
    create_tenant(&d, "steady").await;
    let mut fields = d.fields().await;
    let mut made = Vec::new();
    let encrypt_one = async |fields: &mut pb::field_service_client::FieldServiceClient<_>,
                             n: usize| {
        fields
            .encrypt(pb::EncryptRequest {
                context: ctx("steady", "f", Some(&format!("r{n}"))),
                plaintext: format!("v{n}").into_bytes(),
            })
            .await
            .map(|r| r.into_inner().ciphertext)
    };
    made.push((0, encrypt_one(&mut fields, 0).await.unwrap()));
    // The notification of the daemon's own create_tenant drops the tenant's metadata when it
    // is handled (within 20 ms of the previous one): let it be, then cache the metadata again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    made.push((100, encrypt_one(&mut fields, 100).await.unwrap()));

    cluster.stop();
    // Cached keys keep serving while the database is down (metadata_ttl is an hour here).
    for n in 1..20 {
        made.push((n, encrypt_one(&mut fields, n).await.unwrap()));
    }
    // What needs the database fails clearly, naming the store, never hanging.
    let e = d
        .admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant: "during-outage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), kind(&e).as_str()),
        (Code::Unavailable, "key_store"),
        "{e:?}"
    );
    assert!(e.message().contains("127.0.0.1"), "{}", e.message());

    cluster.restart();
    let recovered = within(Duration::from_secs(10), async || {
        d.admin()
            .await
            .create_tenant(pb::CreateTenantRequest {
                tenant: "after-outage".into(),
            })
            .await
            .is_ok()
    })
    .await;
    assert!(
        recovered.is_some(),
        "the daemon did not reconnect to the database"
    );
    for n in 20..25 {
        made.push((n, encrypt_one(&mut fields, n).await.unwrap()));
    }
    // Nothing acknowledged is lost: every ciphertext decrypts, and the audit chain is intact.
    for (n, ct) in &made {
        let back = d
            .fields()
            .await
            .decrypt(pb::DecryptRequest {
                context: ctx("steady", "f", Some(&format!("r{n}"))),
                ciphertext: ct.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.plaintext, format!("v{n}").into_bytes());
    }
    let report = phiseal_audit_file::verify(d.dir.path().join("audit.log")).unwrap();
    assert!(report.is_intact(), "{report:?}");
}
