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
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql_admin("CREATE DATABASE keys");
    let url = cluster.url("keys");
    let shared = tempfile::tempdir().unwrap();
    let data = shared.path().join("data");
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

    a.admin()
        .await
        .shred_tenant(pb::ShredTenantRequest {
            tenant: "acme".into(),
            confirm_tenant: "acme".into(),
        })
        .await
        .unwrap();
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
