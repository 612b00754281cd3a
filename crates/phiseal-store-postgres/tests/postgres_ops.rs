//! Operating the PostgreSQL key store: the server going away and coming back, TLS, password
//! authentication and secrets in messages, a least-privilege role. Each test runs its own
//! throwaway cluster (it stops the server or needs server settings), even when
//! `PHISEAL_TEST_DATABASE_URL` is set.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, ClusterOptions, PASSWORD, PASSWORD_ROLE, TestDb, marker, record, tid};
use jiff::Timestamp;
use phiseal::BackendErrorKind;
use phiseal::store::{KeyState, KeyStore};
use phiseal_store_postgres::{PostgresKeyStore, PostgresStoreConfig, PostgresStoreError, TlsMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stopped_mid_run_is_unavailable_and_the_pool_recovers() {
    let cluster = Cluster::start(ClusterOptions::default());
    let db = TestDb::on(&cluster, "outage").await;
    let mut config = db.config();
    config.connect_timeout = Duration::from_secs(2);
    let store = PostgresKeyStore::open(&config).await.unwrap();
    let t = tid("acme");
    store.create_tenant(&t, record("acme", 1)).await.unwrap();

    // Readers and a rotator keep every pooled connection busy while the server goes away.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for i in 0..6u32 {
        let (store, t, stop, ok) = (store.clone(), t.clone(), stop.clone(), ok.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let result = if i == 0 {
                    match store.load_tenant(&t).await {
                        Ok(rec) => {
                            let latest = rec.unwrap().latest_version();
                            store
                                .insert_version(&t, latest, record("acme", latest + 1))
                                .await
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    store.load_tenant(&t).await.map(|_| ())
                };
                match result {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => errors.push((e.kind(), e.to_string())),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            errors
        }));
    }
    assert!(
        common::eventually(Duration::from_secs(10), async || ok.load(Ordering::SeqCst)
            > 20)
        .await
    );

    cluster.stop();
    // Calls fail fast and say what is wrong, and where.
    let started = Instant::now();
    let err = store.load_tenant(&t).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "postgres key store at postgres@127.0.0.1:{}/{}",
            cluster.port(),
            db.name
        )),
        "{text}"
    );
    assert!(text.contains("could not load the tenant"), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    eprintln!("while stopped: {text}");
    for err in [
        store
            .insert_version(&t, 1, record("acme", 2))
            .await
            .unwrap_err(),
        store.list_tenants().await.unwrap_err(),
        store
            .shred_tenant(&tid("x"), Timestamp::now())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    }
    let err = PostgresKeyStore::open(&config).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.restart();
    // The same store (the same pool) works again, on fresh connections.
    let ok_before = ok.load(Ordering::SeqCst);
    assert!(
        common::eventually(Duration::from_secs(10), async || {
            ok.load(Ordering::SeqCst) > ok_before + 20
        })
        .await,
        "the workers did not recover"
    );
    stop.store(true, Ordering::SeqCst);
    let mut failures = 0;
    for worker in workers {
        for (kind, text) in worker.await.unwrap() {
            failures += 1;
            // Only outage errors, or the rotator losing its compare-and-set to a commit whose
            // answer the outage swallowed.
            assert!(
                kind == BackendErrorKind::Unavailable || kind == BackendErrorKind::Conflict,
                "{kind:?}: {text}"
            );
        }
    }
    assert!(failures > 0, "the workers saw the outage");
    let rec = store.load_tenant(&t).await.unwrap().unwrap();
    let latest = rec.latest_version();
    common::assert_clean_history(&rec, latest);
    store
        .insert_version(&t, latest, record("acme", latest + 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn tls_verifies_the_server_and_encrypts() {
    let cluster = Cluster::start(ClusterOptions { tls: true });
    let db = TestDb::on(&cluster, "tls").await;
    let tls_config = |ca_file| {
        let mut config = db.config();
        config.tls = TlsMode::Require { ca_file };
        config
    };

    // The right CA: connects, and the session is encrypted.
    let store = PostgresKeyStore::open(&tls_config(Some(cluster.ca_file())))
        .await
        .unwrap();
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    assert!(format!("{store:?}").contains("tls: true"), "{store:?}");
    let encrypted: i64 = db
        .raw()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = current_database() AND a.application_name = 'phiseal' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1);
    let plain: i64 = db
        .raw()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = current_database() AND a.application_name = 'phiseal'
               AND NOT s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);

    // Another CA, or the platform's trust store (which does not know the test CA): refused.
    for ca_file in [Some(cluster.other_ca_file()), None] {
        let err = PostgresKeyStore::open(&tls_config(ca_file.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            BackendErrorKind::Misconfigured,
            "{ca_file:?}: {err}"
        );
        let backend: phiseal::BackendError = err.into();
        let text = backend.to_string();
        assert!(text.contains("TLS"), "{text}");
        assert!(text.to_lowercase().contains("certificate"), "{text}");
        eprintln!("{ca_file:?}: {text}");
    }

    // The certificate is for 127.0.0.1: the host name is verified too.
    let mut by_name = PostgresStoreConfig::new(format!(
        "postgresql://postgres@localhost:{}/{}",
        cluster.port(),
        db.name
    ));
    by_name.tls = TlsMode::Require {
        ca_file: Some(cluster.ca_file()),
    };
    let err = PostgresKeyStore::open(&by_name).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    let text = phiseal::BackendError::from(err).to_string();
    assert!(text.contains("not valid for name \"localhost\""), "{text}");

    // A server without TLS is refused, not used in the clear.
    let plain_cluster = Cluster::start(ClusterOptions::default());
    let plain_db = TestDb::on(&plain_cluster, "tlsplain").await;
    let mut config = plain_db.config();
    config.tls = TlsMode::Require {
        ca_file: Some(cluster.ca_file()),
    };
    let err = PostgresKeyStore::open(&config).await.unwrap_err();
    assert_ne!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    let text = phiseal::BackendError::from(err).to_string();
    assert!(text.contains("does not support TLS"), "{text}");
}

#[tokio::test]
async fn the_password_never_appears_in_debug_or_errors() {
    let cluster = Cluster::start(ClusterOptions::default());
    let db = TestDb::on(&cluster, "password").await;
    let url = |password: &str, port: u16, dbname: &str| {
        format!("postgresql://{PASSWORD_ROLE}:{password}@127.0.0.1:{port}/{dbname}")
    };
    cluster.psql_admin(&format!(
        "ALTER DATABASE {} OWNER TO {PASSWORD_ROLE}",
        db.name
    ));

    // The right password (SCRAM): works; neither Debug shows it.
    let config = PostgresStoreConfig::new(url(PASSWORD, cluster.port(), &db.name));
    let store = PostgresKeyStore::open(&config).await.unwrap();
    store
        .create_tenant(&tid("acme"), record("acme", 1))
        .await
        .unwrap();
    let mut shown = vec![
        format!("{config:?}"),
        format!("{store:?}"),
        store.target().to_owned(),
    ];

    let wrong = "Wr0ng-Pa55word-also-secret";
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cases = [
        // Wrong password.
        (
            url(wrong, cluster.port(), &db.name),
            BackendErrorKind::Denied,
        ),
        // Nothing listening.
        (
            url(PASSWORD, free_port, &db.name),
            BackendErrorKind::Unavailable,
        ),
        // No such database.
        (
            url(PASSWORD, cluster.port(), "no_such_db"),
            BackendErrorKind::Misconfigured,
        ),
        // An unescaped '@' in the password.
        (
            format!(
                "postgresql://{PASSWORD_ROLE}:{PASSWORD}@x@127.0.0.1:{}/db",
                cluster.port()
            ),
            BackendErrorKind::Misconfigured,
        ),
        // Key=value form, wrong password.
        (
            format!(
                "host=127.0.0.1 port={} user={PASSWORD_ROLE} password='{wrong}' dbname={}",
                cluster.port(),
                db.name
            ),
            BackendErrorKind::Denied,
        ),
    ];
    for (url, kind) in cases {
        let config = PostgresStoreConfig::new(url);
        let err = PostgresKeyStore::open(&config).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        shown.push(format!("{err}"));
        shown.push(format!("{err:?}"));
        let backend: phiseal::BackendError = err.into();
        shown.push(format!("{backend}"));
        shown.push(format!("{backend:?}"));
        let mut source = std::error::Error::source(&backend);
        while let Some(e) = source {
            shown.push(format!("{e} {e:?}"));
            source = e.source();
        }
        shown.push(format!("{config:?}"));
    }
    for text in &shown {
        for secret in [PASSWORD, wrong, "Sup3r", "Wr0ng"] {
            assert!(!text.contains(secret), "{secret} shown in: {text}");
        }
    }
    // The messages still say where: user, host, port and database.
    let joined = shown.join("\n");
    assert!(
        joined.contains(&format!(
            "{PASSWORD_ROLE}@127.0.0.1:{free_port}/{}",
            db.name
        )),
        "{joined}"
    );
    assert!(
        joined.contains("password authentication failed"),
        "{joined}"
    );
    assert!(joined.contains("no_such_db"), "{joined}");
    eprintln!("{joined}");
}

/// A role that may read and write the tables but does not own them: it works, except that it
/// cannot VACUUM after a shred, and says so instead of pretending the bytes are gone.
#[tokio::test]
async fn a_role_that_cannot_vacuum_is_told_the_shred_is_incomplete() {
    let cluster = Cluster::start(ClusterOptions::default());
    let db = TestDb::on(&cluster, "leastpriv").await;
    let owner = db.open().await;
    let raw = db.raw().await;
    raw.batch_execute(
        "CREATE EXTENSION pageinspect SCHEMA public;
         CREATE ROLE phiseal_app LOGIN;
         GRANT SELECT, INSERT, UPDATE ON tenants, key_versions TO phiseal_app;
         GRANT SELECT ON schema_migrations TO phiseal_app;",
    )
    .await
    .unwrap();
    let admin: String = raw
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut app_config = PostgresStoreConfig::new(format!(
        "postgresql://phiseal_app@127.0.0.1:{}/{}",
        cluster.port(),
        db.name
    ));
    // The schema belongs to the administrator's role: trusted only once named.
    let err = PostgresKeyStore::open(&app_config).await.unwrap_err();
    assert!(
        matches!(err, PostgresStoreError::UnsafeSchema { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "is owned by role \"{admin}\", not by the store's role"
        )),
        "{text}"
    );
    assert!(text.contains("schema_owner setting"), "{text}");
    app_config.schema_owner = Some(admin);
    // Without USAGE on the schema PostgreSQL would just not find the tables: say so.
    let err = PostgresKeyStore::open(&app_config).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("may not use it: GRANT USAGE ON SCHEMA \"phiseal\" TO \"phiseal_app\""),
        "{text}"
    );
    raw.batch_execute("GRANT USAGE ON SCHEMA phiseal TO phiseal_app")
        .await
        .unwrap();
    // Schema current: opening needs no DDL privilege.
    let app = PostgresKeyStore::open(&app_config).await.unwrap();
    let t = tid("doomed");
    app.create_tenant(&t, record("doomed", 1)).await.unwrap();
    app.insert_version(&t, 1, record("doomed", 2))
        .await
        .unwrap();

    let err = app.shred_tenant(&t, Timestamp::now()).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    let text = err.to_string();
    assert!(text.contains("'doomed' is shredded"), "{text}");
    assert!(text.contains("role 'phiseal_app' may not vacuum"), "{text}");
    assert!(text.contains("run the shred again"), "{text}");
    // The shred itself committed.
    let rec = app.load_tenant(&t).await.unwrap().unwrap();
    assert!(rec.shredded_at.is_some());
    assert!(
        rec.versions
            .iter()
            .all(|r| r.state == KeyState::Destroyed && r.wrapped.is_none())
    );
    // And the error is true: the old row versions are still in the pages.
    let dead = |needle: Vec<u8>| {
        let raw = &raw;
        async move {
            raw.query_one(
                "SELECT count(*) FROM heap_page_items(get_raw_page('key_versions', 0)) AS item
                 WHERE position($1::bytea IN item.t_data) > 0",
                &[&needle],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert!(dead(marker("doomed", 2)).await >= 1);
    // The owner's shred (idempotent) vacuums them away.
    owner.shred_tenant(&t, Timestamp::now()).await.unwrap();
    assert_eq!(dead(marker("doomed", 1)).await, 0);
    assert_eq!(dead(marker("doomed", 2)).await, 0);
}

#[tokio::test]
async fn config_errors_are_misconfigured_before_connecting() {
    for (config, needle) in [
        (
            PostgresStoreConfig::new("postgresql://u@127.0.0.1:1/db?sslmode=require"),
            "sslmode=require",
        ),
        (PostgresStoreConfig::new("not a url"), "not a valid"),
        (PostgresStoreConfig::new("postgresql:///db"), "no host"),
        (
            {
                let mut c = PostgresStoreConfig::new("postgresql://u@127.0.0.1:1/db");
                c.tls = TlsMode::Require {
                    ca_file: Some("/nonexistent/ca.pem".into()),
                };
                c
            },
            "could not read ca_file",
        ),
    ] {
        let started = Instant::now();
        let err = PostgresKeyStore::open(&config).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
        assert!(
            matches!(
                err,
                PostgresStoreError::Config { .. } | PostgresStoreError::Tls { .. }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(needle), "{err}");
    }
}
