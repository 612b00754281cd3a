//! The daemon and the CLI on a real KMS: AWS KMS served by moto (`PHISEAL_MOTO_SERVER`),
//! driven by the real AWS SDK inside `phiseald` and `phiseal`. Covers the outage policy
//! (stale keys up to `cache.max_stale`, then fail closed; audited and counted) by stopping
//! moto (SIGSTOP) in the middle of a run and continuing it, and a root-key migration from the
//! local KMS to AWS KMS that is killed halfway and resumed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, bin, cli_command, create_tenant, ctx, free_port, http_get, run_cli};
use phiseal_kms_aws::testkit::{self as moto, Moto};
use phiseal_proto::v1 as pb;

/// Lets a process use moto through the standard AWS credential chain.
fn aws_env(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
}

fn aws_kms_section(moto: &Moto, arn: &str) -> String {
    format!(
        "[kms]\nkind = \"aws\"\n[kms.aws]\nkey_id = \"{arn}\"\nregion = \"{}\"\nendpoint_url = \"{}\"\n",
        moto::REGION,
        moto.url()
    )
}

const POLICY: &str = "[[policy]]\nuids = [0]\noperations = [\"*\"]\ntenants = [\"*\"]\n";

async fn encrypt(d: &Daemon, tenant: &str, value: &[u8]) -> Vec<u8> {
    let mut fields = d.fields().await;
    fields
        .encrypt(pb::EncryptRequest {
            context: ctx(tenant, "mrn", None),
            plaintext: value.to_vec(),
        })
        .await
        .unwrap_or_else(|s| panic!("encrypt {tenant}: {s:?}"))
        .into_inner()
        .ciphertext
}

async fn decrypt(d: &Daemon, tenant: &str, ciphertext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let mut fields = d.fields().await;
    fields
        .decrypt(pb::DecryptRequest {
            context: ctx(tenant, "mrn", None),
            ciphertext: ciphertext.to_vec(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

#[tokio::test]
async fn a_kms_outage_serves_cached_keys_until_max_stale_then_fails_closed_and_recovers() {
    let moto = Moto::start();
    let client = moto::client(&moto.url()).await;
    let arn = moto::create_key(&client).await;
    let port = free_port();
    let config = format!(
        "socket = \"{{socket}}\"\ndata_dir = \"{{data_dir}}\"\nprofile = \"production\"\n\
         {}[cache]\nkey_ttl = \"1s\"\nmetadata_ttl = \"1s\"\nmax_stale = \"8s\"\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n{POLICY}",
        aws_kms_section(&moto, &arn)
    );
    let d = Daemon::start(Some(&config), aws_env);
    create_tenant(&d, "warm").await;
    create_tenant(&d, "cold").await;
    let warm = encrypt(&d, "warm", b"warm-value").await;
    let started = Instant::now();

    moto.suspend();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past key_ttl. A client that gives up before the KMS's time limit cancels the attempt;
    // the stale key is not lost with it.
    let mut fields = d.fields().await;
    let mut short = tonic::Request::new(pb::DecryptRequest {
        context: ctx("warm", "mrn", None),
        ciphertext: warm.clone(),
    });
    short.set_timeout(Duration::from_millis(800));
    let status = fields.decrypt(short).await.unwrap_err();
    // The client's own timer or the daemon's deadline, whichever fires first.
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    // One KMS attempt hangs until the backend's time limit, then the stale key serves; the
    // next call does not wait for the KMS.
    assert_eq!(decrypt(&d, "warm", &warm).await.unwrap(), b"warm-value");
    let quick = Instant::now();
    assert_eq!(decrypt(&d, "warm", &warm).await.unwrap(), b"warm-value");
    assert!(
        quick.elapsed() < Duration::from_secs(1),
        "{:?}",
        quick.elapsed()
    );
    // A tenant whose key was never cached fails at once, naming the backend (not the first
    // failure's cause, which may name another tenant).
    let quick = Instant::now();
    let status = encrypt_status(&d, "cold").await;
    assert!(
        quick.elapsed() < Duration::from_secs(1),
        "{:?}",
        quick.elapsed()
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("aws-kms"), "{status:?}");

    // Past key_ttl + max_stale: fail closed.
    let age = started.elapsed();
    if age < Duration::from_millis(9500) {
        tokio::time::sleep(Duration::from_millis(9500) - age).await;
    }
    let status = decrypt(&d, "warm", &warm).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // The KMS is back: fresh keys again, at the latest one retry interval later.
    moto.resume();
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        match decrypt(&d, "warm", &warm).await {
            Ok(plaintext) => {
                assert_eq!(plaintext, b"warm-value");
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "no recovery: {status:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    let records = common::audit_records(&d.audit_log());
    let stale_decisions: Vec<&str> = records
        .iter()
        .filter(|r| r["action"] == "serve_stale_key")
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert!(stale_decisions.contains(&"ok"), "{stale_decisions:?}");
    assert!(stale_decisions.contains(&"kms"), "{stale_decisions:?}");
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "decrypt" && r["key_source"] == "stale" && r["result"] == "ok"),
        "no decrypt served by a stale key in the audit log"
    );
    let metrics = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/metrics");
    for needle in [
        "phiseal_key_lookups_total{source=\"stale\"}",
        "phiseal_operations_total{action=\"serve_stale_key\",result=\"ok\"}",
        "phiseal_operations_total{action=\"serve_stale_key\",result=\"kms\"}",
        "phiseal_kms_calls_total{backend=\"aws-kms\",op=\"unwrap\",result=\"unavailable\"}",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

async fn encrypt_status(d: &Daemon, tenant: &str) -> tonic::Status {
    let mut fields = d.fields().await;
    fields
        .encrypt(pb::EncryptRequest {
            context: ctx(tenant, "mrn", None),
            plaintext: b"x".to_vec(),
        })
        .await
        .unwrap_err()
}

/// `phiseal root …` with the AWS environment, no daemon socket involved.
fn root_command(args: &[&str]) -> Command {
    let mut cmd = cli_command(&bin("phiseal"), std::path::Path::new("/nonexistent.sock"));
    aws_env(&mut cmd);
    cmd.arg("root").args(args);
    cmd
}

#[tokio::test]
async fn a_migration_from_the_local_kms_to_aws_kms_survives_a_kill_and_needs_no_old_key_after() {
    const TENANTS: usize = 120;
    let moto = Moto::start();
    let client = moto::client(&moto.url()).await;
    let arn = moto::create_key(&client).await;

    // A deployment on the local KMS with data in it.
    let local_config = format!("socket = \"{{socket}}\"\ndata_dir = \"{{data_dir}}\"\n{POLICY}");
    let mut d = Daemon::with_config(&local_config);
    let mut ciphertexts = Vec::new();
    for i in 0..TENANTS {
        let tenant = format!("tenant-{i:03}");
        create_tenant(&d, &tenant).await;
        ciphertexts.push((
            tenant.clone(),
            encrypt(&d, &tenant, tenant.as_bytes()).await,
        ));
    }
    d.stop();
    let old_config = d.dir.path().join("phiseald.toml");
    let new_config = d.dir.path().join("target.toml");
    std::fs::write(
        &new_config,
        format!(
            "socket = \"{}\"\ndata_dir = \"{}\"\n{}",
            d.socket.display(),
            d.data_dir.display(),
            aws_kms_section(&moto, &arn)
        ),
    )
    .unwrap();
    let audit_log = d.data_dir.join("audit-root-keys.log");
    // Before: everything is under the local root key, which the target config does not use.
    let before = run_cli(
        &mut root_command(&["status", "--config", new_config.to_str().unwrap(), "--json"]),
        b"",
    )
    .expect(0)
    .json();
    assert_eq!(before["current"], format!("aws-kms:{arn}"), "{before}");
    assert_eq!(before["under_current"], 0, "{before}");
    let others = before["others"].as_object().unwrap();
    assert_eq!(others.len(), 1, "{before}");
    assert!(others.keys().all(|k| k.starts_with("local:")), "{before}");
    assert_eq!(others.values().next().unwrap(), TENANTS, "{before}");
    let migrate = [
        "migrate",
        "--config",
        old_config.to_str().unwrap(),
        "--to",
        new_config.to_str().unwrap(),
        "--json",
    ];

    // Kill it halfway.
    let mut child = root_command(&migrate).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = std::fs::read_to_string(&audit_log)
            .unwrap_or_default()
            .matches("\"action\":\"rewrap_root_key\",")
            .count();
        if done >= 40 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("migrate ended ({status}) before it could be interrupted; raise TENANTS");
        }
        assert!(Instant::now() < deadline, "no progress within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "migrate was not killed: {status}");

    // Run again: it finishes what is left and reports the old root key as unreferenced.
    let run = run_cli(&mut root_command(&migrate), b"").expect(0);
    let report = run.json();
    let rewrapped = report["rewrapped"].as_u64().unwrap();
    let already = report["already_current"].as_u64().unwrap();
    assert!(rewrapped > 0 && already > 0, "{report}");
    assert_eq!(rewrapped + already, TENANTS as u64, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(
        report["still_referenced"],
        serde_json::json!({}),
        "{report}"
    );
    assert_eq!(report["target"], format!("aws-kms:{arn}"));
    // Idempotent: a third run has nothing to do.
    let again = run_cli(&mut root_command(&migrate), b"").expect(0).json();
    assert_eq!(again["rewrapped"], 0, "{again}");
    assert_eq!(again["already_current"], TENANTS as u64, "{again}");
    let after = run_cli(
        &mut root_command(&["status", "--config", new_config.to_str().unwrap(), "--json"]),
        b"",
    )
    .expect(0)
    .json();
    assert_eq!(after["under_current"], TENANTS, "{after}");
    assert_eq!(after["others"], serde_json::json!({}), "{after}");
    // Every version was moved exactly once, across the killed run and the rerun; each step's
    // records name the root key that wraps it: the local one before, AWS KMS after.
    let old_root = others.keys().next().unwrap().clone();
    let new_root = format!("aws-kms:{arn}");
    let mut moved = std::collections::BTreeMap::new();
    for r in common::audit_records(&audit_log) {
        if r["action"] == "rewrap_root_key" {
            let want = if r["result"] == "ok" {
                &new_root
            } else {
                &old_root
            };
            assert_eq!(r["root_key"], want.as_str(), "{r}");
        }
        if r["action"] == "rewrap_root_key" && r["result"] == "ok" {
            let id = (
                r["tenant"].as_str().unwrap().to_owned(),
                r["key_version"].as_u64().unwrap(),
            );
            *moved.entry(id).or_insert(0) += 1;
        }
    }
    // (The kill may fall between a step's write and its `ok` record: that one version then
    // has only its `attempt` record, and the rerun finds it already moved.)
    assert!(moved.len() >= TENANTS - 1, "{} of {TENANTS}", moved.len());
    assert!(moved.values().all(|&n| n == 1), "{moved:?}");
    // Every step is in the run's audit log, whose chain is intact.
    let mut verify = cli_command(&bin("phiseal"), std::path::Path::new("/nonexistent.sock"));
    verify.args(["audit", "verify", "--log", audit_log.to_str().unwrap()]);
    run_cli(&mut verify, b"").expect(0);

    // The old root key is no longer needed: delete it, serve from AWS KMS alone.
    std::fs::remove_file(d.data_dir.join("root.key")).unwrap();
    let aws_config = format!(
        "socket = \"{{socket}}\"\ndata_dir = \"{}\"\nprofile = \"production\"\n{}{POLICY}",
        d.data_dir.display(),
        aws_kms_section(&moto, &arn)
    );
    let d2 = Daemon::start(Some(&aws_config), aws_env);
    for (tenant, ct) in &ciphertexts {
        assert_eq!(
            decrypt(&d2, tenant, ct).await.unwrap(),
            tenant.as_bytes(),
            "{tenant}"
        );
    }
    // Each key the new daemon fetched (its records follow the local deployment's in the data
    // directory's log) names the root key that unwrapped it.
    let records = common::audit_records(&d.audit_log());
    let started = records
        .iter()
        .rposition(|r| r["action"] == "encrypt")
        .unwrap();
    let unwraps: Vec<_> = records[started..]
        .iter()
        .filter(|r| r["action"] == "unwrap_key")
        .collect();
    assert_eq!(unwraps.len(), TENANTS, "{unwraps:?}");
    assert!(
        unwraps
            .iter()
            .all(|r| r["result"] == "ok" && r["root_key"] == new_root.as_str()),
        "{unwraps:?}"
    );
    // The local deployment's own unwraps, if any, named the local root key.
    assert!(
        records[..started]
            .iter()
            .filter(|r| r["action"] == "unwrap_key")
            .all(|r| r["root_key"] == old_root.as_str())
    );
}

/// A private SoftHSM2 token directory and configuration (`SOFTHSM2_CONF` is set on the child
/// processes only), with one initialised token.
struct SoftHsm {
    dir: tempfile::TempDir,
    conf: std::path::PathBuf,
    module: String,
}

const TOKEN: &str = "phiseal-test";
const PIN: &str = "0246";

impl SoftHsm {
    fn init() -> SoftHsm {
        let module = std::env::var("PHISEAL_PKCS11_MODULE")
            .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into());
        assert!(
            std::path::Path::new(&module).exists(),
            "PKCS#11 module {module} missing: install the Debian package softhsm2 (scripts/test \
             does), or set PHISEAL_PKCS11_MODULE"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let status = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", TOKEN, "--pin", PIN])
            .args(["--so-pin", "13579"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("softhsm2-util: {e}: install the Debian package softhsm2"));
        assert!(status.success(), "softhsm2-util --init-token: {status}");
        SoftHsm { dir, conf, module }
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .env("PHISEALD_KMS__PKCS11__PIN", PIN);
    }

    /// A daemon config on this token; `{socket}` stays a placeholder unless `socket` is given.
    fn config(&self, socket: &str, key_label: &str, previous: &[&str]) -> String {
        format!(
            "socket = \"{socket}\"\ndata_dir = \"{}\"\nprofile = \"production\"\n[kms]\n\
             kind = \"pkcs11\"\n[kms.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{TOKEN}\"\n\
             key_label = \"{key_label}\"\nprevious_key_labels = {previous:?}\n{POLICY}",
            self.dir.path().join("data").display(),
            self.module,
        )
    }

    /// Writes a config for the CLI and returns its path.
    fn config_file(&self, name: &str, key_label: &str, previous: &[&str]) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, self.config("/run/unused.sock", key_label, previous)).unwrap();
        path
    }

    fn cli(&self, args: &[&str]) -> common::CliRun {
        let mut cmd = cli_command(&bin("phiseal"), std::path::Path::new("/nonexistent.sock"));
        self.env(&mut cmd);
        cmd.args(args);
        run_cli(&mut cmd, b"")
    }
}

#[tokio::test]
async fn an_hsm_root_key_rotation_rewraps_every_key_while_the_daemon_serves() {
    let hsm = SoftHsm::init();
    let first = hsm.config_file("first.toml", "root-1", &[]);
    let new_hsm_key = |label: &str, more: &[&str]| {
        let mut args = vec![
            "root",
            "new-hsm-key",
            "--config",
            first.to_str().unwrap(),
            "--label",
        ];
        args.push(label);
        args.extend_from_slice(more);
        hsm.cli(&args)
    };
    // Where its audit record cannot be written, no key is made (the label stays free).
    let unrecorded = new_hsm_key("root-1", &["--audit-log", "/nonexistent/audit.log"]);
    assert_eq!(unrecorded.code, 1, "{}", unrecorded.stderr);
    assert!(
        unrecorded.stderr.contains("/nonexistent/audit.log"),
        "{}",
        unrecorded.stderr
    );
    new_hsm_key("root-1", &[]).expect(0);
    // A label in use is refused.
    let again = new_hsm_key("root-1", &[]);
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(again.stderr.contains("root-1"), "{}", again.stderr);
    // Both are on the record, in the root-key commands' log: an attempt before each, then
    // the creation and the refusal, each naming the key.
    let root_log = hsm.dir.path().join("data").join("audit-root-keys.log");
    let key = format!("pkcs11:{TOKEN}/root-1");
    let created: Vec<(String, String, String)> = common::audit_records(&root_log)
        .iter()
        .filter(|r| r["action"] == "create_root_key")
        .map(|r| {
            (
                r["result"].as_str().unwrap().to_owned(),
                r["root_key"].as_str().unwrap().to_owned(),
                r["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let uid = format!("uid:{}", rustix::process::getuid().as_raw());
    let expected: Vec<(String, String, String)> = ["attempt", "ok", "attempt", "kms"]
        .into_iter()
        .map(|result| (result.to_owned(), key.clone(), uid.clone()))
        .collect();
    assert_eq!(created, expected);
    hsm.cli(&["audit", "verify", "--log", root_log.to_str().unwrap()])
        .expect(0);

    let mut d = Daemon::start(Some(&hsm.config("{socket}", "root-1", &[])), |c| hsm.env(c));
    // Enough key versions that the rotation (one fsynced audit record per re-wrapped version)
    // lasts while the daemon serves decryptions.
    let tenants: Vec<String> = ["north", "south", "east"]
        .into_iter()
        .map(String::from)
        .chain((0..12).map(|i| format!("ward-{i}")))
        .collect();
    let mut ciphertexts = Vec::new();
    for tenant in &tenants {
        create_tenant(&d, tenant).await;
        ciphertexts.push((
            tenant.as_str(),
            encrypt(&d, tenant, tenant.as_bytes()).await,
        ));
    }
    d.admin()
        .await
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant: "north".into(),
            expected_latest_version: None,
        })
        .await
        .unwrap();
    ciphertexts.push(("north", encrypt(&d, "north", b"north").await));
    d.stop();

    // Rotation: a new key, the old one kept as previous while the daemon serves.
    new_hsm_key("root-2", &[]).expect(0);
    let rotating = hsm.config_file("rotating.toml", "root-2", &["root-1"]);
    // Short cache lifetimes: the daemon keeps unwrapping through the HSM (and re-reading the
    // key store) while the rotation replaces the wrapped keys under it.
    let serving = hsm.config("{socket}", "root-2", &["root-1"])
        + "[cache]\nkey_ttl = \"20ms\"\nmetadata_ttl = \"20ms\"\n";
    let mut d = Daemon::start(Some(&serving), |c| hsm.env(c));
    let rotation = {
        let mut cmd = cli_command(&bin("phiseal"), std::path::Path::new("/nonexistent.sock"));
        hsm.env(&mut cmd);
        cmd.args([
            "root",
            "rotate",
            "--config",
            rotating.to_str().unwrap(),
            "--json",
        ]);
        std::thread::spawn(move || run_cli(&mut cmd, b""))
    };
    // A decryption overlaps the rotation if it starts after the rotation has re-wrapped a key
    // (its audit record is on the root-key log) and ends before the rotation has finished.
    let root_log = hsm.dir.path().join("data").join("audit-root-keys.log");
    let rewrap_started =
        || std::fs::read_to_string(&root_log).is_ok_and(|log| log.contains("rewrap_root_key"));
    let mut overlapped = 0;
    while !rotation.is_finished() {
        for (tenant, ct) in &ciphertexts {
            let started_mid_rotation = rewrap_started();
            assert_eq!(decrypt(&d, tenant, ct).await.unwrap(), tenant.as_bytes());
            if started_mid_rotation && !rotation.is_finished() {
                overlapped += 1;
            }
        }
    }
    eprintln!("{overlapped} decryptions overlapped the rotation");
    assert!(
        overlapped > 0,
        "no decryption ran while the rotation was re-wrapping keys"
    );
    let report = rotation.join().unwrap().expect(0).json();
    assert_eq!(report["rewrapped"], ciphertexts.len(), "{report}");
    assert_eq!(
        report["target"],
        format!("pkcs11:{TOKEN}/root-2"),
        "{report}"
    );
    assert_eq!(
        report["still_referenced"],
        serde_json::json!({}),
        "{report}"
    );
    for (tenant, ct) in &ciphertexts {
        assert_eq!(decrypt(&d, tenant, ct).await.unwrap(), tenant.as_bytes());
    }
    d.stop();

    // The old key is no longer configured: everything still decrypts.
    let d = Daemon::start(Some(&hsm.config("{socket}", "root-2", &[])), |c| hsm.env(c));
    for (tenant, ct) in &ciphertexts {
        assert_eq!(decrypt(&d, tenant, ct).await.unwrap(), tenant.as_bytes());
    }
    let rerun = hsm
        .cli(&[
            "root",
            "rotate",
            "--config",
            rotating.to_str().unwrap(),
            "--json",
        ])
        .expect(0)
        .json();
    assert_eq!(rerun["rewrapped"], 0, "{rerun}");
}

#[tokio::test]
async fn the_daemons_own_deadline_answers_a_call_stuck_on_the_kms() {
    // No client deadline: whatever answers is the daemon's limits.request_timeout (500 ms),
    // long before the KMS call's own time limit (5 s).
    let moto = Moto::start();
    let client = moto::client(&moto.url()).await;
    let arn = moto::create_key(&client).await;
    let config = format!(
        "socket = \"{{socket}}\"\ndata_dir = \"{{data_dir}}\"\n{}[cache]\nkey_ttl = \"1s\"\n\
         metadata_ttl = \"1s\"\n[limits]\nrequest_timeout = \"500ms\"\n{POLICY}",
        aws_kms_section(&moto, &arn)
    );
    let d = Daemon::start(Some(&config), aws_env);
    create_tenant(&d, "t").await;
    let ct = encrypt(&d, "t", b"value").await;
    // The cached key expires; the next decrypt needs the KMS, which hangs.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    moto.suspend();
    let started = Instant::now();
    let status = decrypt(&d, "t", &ct).await.unwrap_err();
    let took = started.elapsed();
    moto.resume();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(common::kind(&status), "deadline_exceeded", "{status:?}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The KMS back, the same call succeeds.
    assert_eq!(decrypt(&d, "t", &ct).await.unwrap(), b"value");
    // (The test harness gave this config profile = "development": with a real KMS, that is
    // worth a warning.)
    assert!(
        d.stderr()
            .contains("profile = \"development\" with a production KMS"),
        "{}",
        d.stderr()
    );
}

#[tokio::test]
async fn a_root_key_deleted_at_the_kms_stops_a_running_stream() {
    // moto's AWS KMS, key_ttl 2 s (so the housekeeping runs every second): a stream running
    // when its root key is deleted stops once its key version is due for confirmation, with
    // the KMS's refusal, audited as the housekeeping's unwrap and the stream's result. (moto
    // does not enforce a disabled key's state: a deleted key is the refusal it can give.)
    let moto = Moto::start();
    let client = moto::client(&moto.url()).await;
    let arn = moto::create_key(&client).await;
    let config = format!(
        "socket = \"{{socket}}\"\ndata_dir = \"{{data_dir}}\"\nprofile = \"production\"\n\
         {}[cache]\nkey_ttl = \"2s\"\nmetadata_ttl = \"1s\"\n{POLICY}",
        aws_kms_section(&moto, &arn)
    );
    let d = Daemon::start(Some(&config), aws_env);
    create_tenant(&d, "clinic").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let send = |part| {
        let tx = tx.clone();
        async move {
            // (Once the call failed the daemon may have dropped the request stream.)
            let _ = tx.send(pb::EncryptStreamRequest { part: Some(part) }).await;
        }
    };
    use pb::encrypt_stream_request::Part;
    send(Part::Context(ctx("clinic", "scan", None).unwrap())).await;
    let mut answers = d
        .fields()
        .await
        .encrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Three 64 KiB segments: two sealed and answered, one buffered.
    send(Part::Chunk(vec![7u8; 3 * 65_536])).await;
    assert!(!answers.message().await.unwrap().unwrap().chunk.is_empty());

    moto.forget_keys();
    // Due 2 s after the unwrap at the stream's start, checked within a second after that:
    // a segment every 250 ms until the stream fails (each one seals the one buffered before).
    let deadline = Instant::now() + Duration::from_secs(15);
    let ended = loop {
        assert!(Instant::now() < deadline, "the stream still runs");
        send(Part::Chunk(vec![7u8; 65_536])).await;
        match tokio::time::timeout(Duration::from_millis(250), answers.message()).await {
            Err(_) | Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the stream ended normally after its root key was deleted"),
            Ok(Err(status)) => break status,
        }
    };
    drop(tx);
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert_eq!(common::kind(&ended), "kms", "{ended:?}");

    let records = common::audit_records(&d.audit_log());
    assert!(
        records.iter().any(|r| r["action"] == "unwrap_key"
            && r["actor"] == "phiseald:housekeeping"
            && r["result"] == "kms"),
        "no refused unwrap by the housekeeping in {records:#?}"
    );
    assert_eq!(
        common::audit_results(&d.audit_log(), "encrypt_stream"),
        ["attempt", "kms"]
    );
}
