//! `AzureKeyVaultKms` against `tests/kv_double.py`, an HTTPS test double of the Key Vault keys
//! data plane, driven by the real Azure SDK for Rust (`azure_security_keyvault_keys`).
//!
//! Every test starts its own double (with the Python interpreter named by `PHISEAL_PYTHON`,
//! which needs the `cryptography` package) on a free port of 127.0.0.1, in its own temporary
//! directory, and stops it when the test ends, panicking tests included (the guard's `Drop`
//! runs during unwinding). A test process killed by a signal can leave its double behind. If
//! `PHISEAL_PYTHON` is unset or the double does not start, the tests fail: they never skip.
//!
//! The SDK client trusts only the double's test CA (`ca.pem`), disables the challenge-resource
//! check (the double is not under `*.vault.azure.net`) and authenticates with a fixed test
//! token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::Transport;
use azure_security_keyvault_keys::models::{
    CreateKeyParameters, KeyAttributes, KeyClientUpdateKeyPropertiesOptions, KeyOperation, KeyType,
    UpdateKeyPropertiesParameters,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use phiseal::context::TenantId;
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::testkit::conformance;
use phiseal::{BackendErrorKind, TenantKey};
use phiseal_kms_azure::{
    AzureCredentialConfig, AzureKeyVaultConfig, AzureKeyVaultKms, DetachedTokenCredential,
    OPERATION_TIMEOUT, WrapAlgorithm,
};

const INSTALL_HINT: &str = "PHISEAL_PYTHON is not set: the Azure Key Vault tests run \
    tests/kv_double.py with a Python 3 that has the `cryptography` package. Run scripts/test, or \
    `python3 -m venv /tmp/kv-venv && /tmp/kv-venv/bin/pip install cryptography==48.0.0` and set \
    PHISEAL_PYTHON=/tmp/kv-venv/bin/python";

/// The token the double accepts.
const TOKEN: &str = "phiseal-test-token";

/// A running `kv_double.py`, killed when dropped. Its directory (CA, state) lives as long as
/// the guard, so that a restart on the same port serves the same keys with the same CA.
struct Double {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// The token the double accepts.
    token: &'static str,
}

impl Double {
    fn start() -> Double {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut double = Double {
            child: None,
            port,
            dir,
            token: TOKEN,
        };
        double.restart();
        double
    }

    /// Starts the double (again) on its port and directory.
    fn restart(&mut self) {
        self.stop();
        let python = std::env::var_os("PHISEAL_PYTHON").unwrap_or_else(|| panic!("{INSTALL_HINT}"));
        let script =
            Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("tests/kv_double.py");
        let port_file = self.dir.path().join("port");
        let _ = std::fs::remove_file(&port_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("double.log"))
            .unwrap();
        let child = Command::new(&python)
            .arg(&script)
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--port", &self.port.to_string(), "--token", self.token])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python:?} {script:?}: {e}; {INSTALL_HINT}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let announced = std::fs::read_to_string(&port_file).ok();
            if announced.as_deref().map(str::trim) == Some(self.port.to_string().as_str())
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "kv_double.py exited before serving: {status}; its log:\n{}\n{INSTALL_HINT}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "kv_double.py did not serve on port {} within 30 s; its log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("double.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A credential handing out a fixed token, or failing like a credential that cannot get one.
#[derive(Debug)]
struct StaticToken(Option<&'static str>);

#[async_trait::async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        match self.0 {
            Some(token) => Ok(AccessToken::new(
                token,
                azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
            )),
            None => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "test credential: no token available",
            )),
        }
    }
}

/// A credential whose first token expires in 4 minutes (inside the bearer-token policy's
/// 5-minute refresh window) and whose every later token takes longer than
/// [`OPERATION_TIMEOUT`] to come (a slow managed-identity endpoint); counts its calls.
#[derive(Debug, Default)]
struct SlowRefresh {
    calls: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl TokenCredential for SlowRefresh {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let now = azure_core::time::OffsetDateTime::now_utc();
        if call == 0 {
            return Ok(AccessToken::new(
                TOKEN,
                now + azure_core::time::Duration::minutes(4),
            ));
        }
        tokio::time::sleep(OPERATION_TIMEOUT + Duration::from_secs(1)).await;
        Ok(AccessToken::new(
            TOKEN,
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// An SDK client for the double that trusts only its CA and presents `token`.
fn client_with(double: &Double, token: Option<&'static str>) -> KeyClient {
    client_with_credential(double, Arc::new(StaticToken(token)))
}

/// An SDK client for the double that trusts only its CA and uses `credential`.
fn client_with_credential(double: &Double, credential: Arc<dyn TokenCredential>) -> KeyClient {
    client_trusting(double, &double.ca_pem(), credential)
}

/// An SDK client for the double that trusts only the CA in `ca_pem` and uses `credential`.
fn client_trusting(
    double: &Double,
    ca_pem: &std::path::Path,
    credential: Arc<dyn TokenCredential>,
) -> KeyClient {
    let ca = std::fs::read(ca_pem).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .build()
        .unwrap();
    // This crate's retry policy, as `connect` uses it.
    let mut client_options = phiseal_kms_azure::client_options();
    client_options.transport = Some(Transport::new(Arc::new(http)));
    let options = KeyClientOptions {
        client_options,
        verify_challenge_resource: Some(false),
        ..Default::default()
    };
    KeyClient::new(&double.url(), credential, Some(options)).unwrap()
}

fn client(double: &Double) -> KeyClient {
    client_with(double, Some(TOKEN))
}

/// Creates a key through the SDK and returns its version.
async fn create_key(client: &KeyClient, name: &str, kty: KeyType, size: i32) -> String {
    create_key_with_ops(
        client,
        name,
        kty,
        size,
        vec![KeyOperation::WrapKey, KeyOperation::UnwrapKey],
    )
    .await
}

async fn create_key_with_ops(
    client: &KeyClient,
    name: &str,
    kty: KeyType,
    size: i32,
    ops: Vec<KeyOperation>,
) -> String {
    let params = CreateKeyParameters {
        kty: Some(kty),
        key_size: Some(size),
        key_ops: Some(ops),
        ..Default::default()
    };
    let key = client
        .create_key(name, params.try_into().unwrap(), None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    version_of(key.key.unwrap().kid.as_deref().unwrap())
}

fn version_of(kid: &str) -> String {
    kid.rsplit('/').next().unwrap().to_owned()
}

async fn rotate_key(client: &KeyClient, name: &str) -> String {
    let key = client
        .rotate_key(name, None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    version_of(key.key.unwrap().kid.as_deref().unwrap())
}

async fn set_enabled(client: &KeyClient, name: &str, version: &str, enabled: bool) {
    let params = UpdateKeyPropertiesParameters {
        key_attributes: Some(KeyAttributes {
            enabled: Some(enabled),
            ..Default::default()
        }),
        ..Default::default()
    };
    update_key(client, name, version, params).await;
}

/// Updates the properties of one key version.
async fn update_key(
    client: &KeyClient,
    name: &str,
    version: &str,
    params: UpdateKeyPropertiesParameters,
) {
    let options = KeyClientUpdateKeyPropertiesOptions {
        key_version: Some(version.to_owned()),
        ..Default::default()
    };
    client
        .update_key_properties(name, params.try_into().unwrap(), Some(options))
        .await
        .unwrap();
}

async fn kms_for(double: &Double, name: &str, algorithm: WrapAlgorithm) -> AzureKeyVaultKms {
    AzureKeyVaultKms::from_client(client(double), &double.url(), name, algorithm)
        .await
        .unwrap()
}

fn binding(tenant: &str, version: u32) -> KeyBinding {
    KeyBinding {
        tenant: TenantId::new(tenant).unwrap(),
        version,
    }
}

#[tokio::test]
async fn conformance_suite_rsa_oaep_256() {
    let double = Double::start();
    create_key(&client(&double), "kek", KeyType::Rsa, 2048).await;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    assert_eq!(kms.name(), "azure-kv");
    conformance::kms(Arc::new(kms), true).await;
}

#[tokio::test]
async fn conformance_suite_a256kw_on_an_oct_hsm_key() {
    let double = Double::start();
    create_key(&client(&double), "hsm-kek", KeyType::OctHsm, 256).await;
    let kms = kms_for(&double, "hsm-kek", WrapAlgorithm::A256Kw).await;
    let key = TenantKey::from_bytes([1; 32]);
    let wrapped = kms.wrap(&key, &binding("acme", 1)).await.unwrap();
    // RFC 3394 over the 64-byte payload: 8 bytes longer.
    assert_eq!(wrapped.ciphertext.len(), 72);
    conformance::kms(Arc::new(kms), true).await;
}

#[tokio::test]
async fn root_key_ref_is_the_versioned_kid_and_rsa_4096_works() {
    let double = Double::start();
    let version = create_key(&client(&double), "big", KeyType::RsaHsm, 4096).await;
    let kms = kms_for(&double, "big", WrapAlgorithm::RsaOaep256).await;
    let key = TenantKey::from_bytes([4; 32]);
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();
    assert_eq!(
        wrapped.root_key_ref,
        format!("azure-kv:{}/keys/big/{version}", double.url())
    );
    assert_eq!(wrapped.ciphertext.len(), 512);
    assert_eq!(
        kms.unwrap(&wrapped, &b).await.unwrap().expose(),
        key.expose()
    );
    // A trailing slash on the configured vault URL makes no difference.
    let kms2 = AzureKeyVaultKms::from_client(
        client(&double),
        &format!("{}/", double.url()),
        "big",
        WrapAlgorithm::RsaOaep256,
    )
    .await
    .unwrap();
    assert_eq!(
        kms2.unwrap(&wrapped, &b).await.unwrap().expose(),
        key.expose()
    );
}

#[tokio::test]
async fn wraps_survive_a_root_key_rotation_in_the_vault() {
    let double = Double::start();
    let admin = client(&double);
    let v1 = create_key(&admin, "kek", KeyType::Rsa, 2048).await;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    let key = TenantKey::from_bytes([7; 32]);
    let b = binding("acme", 1);
    let old = kms.wrap(&key, &b).await.unwrap();
    assert!(
        old.root_key_ref.ends_with(&format!("/keys/kek/{v1}")),
        "{}",
        old.root_key_ref
    );
    assert_eq!(kms.current_root_key_ref().await.unwrap(), old.root_key_ref);

    let v2 = rotate_key(&admin, "kek").await;
    assert_ne!(v1, v2);
    let current = kms.current_root_key_ref().await.unwrap();
    assert!(current.ends_with(&format!("/keys/kek/{v2}")), "{current}");
    let new = kms.wrap(&key, &b).await.unwrap();
    assert_eq!(new.root_key_ref, current);
    assert!(kms.can_unwrap(&old.root_key_ref) && kms.can_unwrap(&new.root_key_ref));
    assert_ne!(new.root_key_ref, old.root_key_ref);

    // Both unwrap, each with the version it recorded.
    assert_eq!(kms.unwrap(&old, &b).await.unwrap().expose(), key.expose());
    assert_eq!(kms.unwrap(&new, &b).await.unwrap().expose(), key.expose());

    // Bytes of one version relabelled as the other: the vault cannot decrypt them.
    let relabelled = WrappedKey {
        root_key_ref: new.root_key_ref.clone(),
        ciphertext: old.ciphertext.clone(),
    };
    let err = kms.unwrap(&relabelled, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("HTTP 400 BadParameter"), "{err}");

    // Disabling the old version (after `phiseal root rotate` re-wrapped everything) stops only
    // the old wraps.
    set_enabled(&admin, "kek", &v1, false).await;
    let err = kms.unwrap(&old, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
    assert_eq!(kms.unwrap(&new, &b).await.unwrap().expose(), key.expose());
}

#[tokio::test]
async fn references_to_another_vault_or_key_are_refused_without_a_call() {
    let double = Double::start();
    let admin = client(&double);
    let version = create_key(&admin, "kek", KeyType::Rsa, 2048).await;
    create_key(&admin, "other", KeyType::Rsa, 2048).await;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    let other = kms_for(&double, "other", WrapAlgorithm::RsaOaep256).await;
    let key = TenantKey::from_bytes([9; 32]);
    let b = binding("acme", 2);
    let wrapped = kms.wrap(&key, &b).await.unwrap();

    let url = double.url();
    let foreign_refs = [
        format!(
            "azure-kv:https://127.0.0.2:{}/keys/kek/{version}",
            double.port
        ),
        format!("azure-kv:https://evil.example/keys/kek/{version}"),
        format!(
            "azure-kv:http://127.0.0.1:{}/keys/kek/{version}",
            double.port
        ),
        format!("azure-kv:{url}/keys/other/{version}"),
        format!("azure-kv:{url}/keys/kek2/{version}"),
        format!("azure-kv:{url}/keys/kek/"),
        format!("azure-kv:{url}/keys/kek"),
        format!("azure-kv:{url}/keys/kek/{version}/"),
        format!("azure-kv:{url}/keys/kek/{version}/../x"),
        format!("azure-kv:{url}/keys/kek/{version}?api-version=1"),
        format!("azure-kv:{url}/secrets/kek/{version}"),
        format!("aws-kms:{url}/keys/kek/{version}"),
        format!("{url}/keys/kek/{version}"),
        String::new(),
    ];
    for root_key_ref in foreign_refs {
        let w = WrappedKey {
            root_key_ref: root_key_ref.clone(),
            ciphertext: wrapped.ciphertext.clone(),
        };
        assert!(!kms.can_unwrap(&root_key_ref), "{root_key_ref}");
        let err = kms.unwrap(&w, &b).await.unwrap_err();
        assert_eq!(
            err.kind(),
            BackendErrorKind::InvalidData,
            "{root_key_ref}: {err}"
        );
        assert!(err.to_string().contains("is not a version of"), "{err}");
    }
    // The other key's backend refuses this key's wraps the same way.
    let err = other.unwrap(&wrapped, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("key 'other'") && shown.contains("/keys/kek/"),
        "{shown}"
    );

    // A ref naming this key with a version the vault does not have reaches the vault: 404.
    let w = WrappedKey {
        root_key_ref: format!("azure-kv:{url}/keys/kek/00000000000000000000000000000000"),
        ciphertext: wrapped.ciphertext.clone(),
    };
    let err = kms.unwrap(&w, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    assert!(err.to_string().contains("KeyNotFound"), "{err}");
}

#[tokio::test]
async fn a_disabled_key_is_denied_and_works_again_when_re_enabled() {
    let double = Double::start();
    let admin = client(&double);
    let version = create_key(&admin, "kek", KeyType::Rsa, 2048).await;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    let key = TenantKey::from_bytes([5; 32]);
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();

    set_enabled(&admin, "kek", &version, false).await;
    let err = kms.wrap(&key, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with("azure-kv: WrapKey with vault 'https://127.0.0.1:"),
        "{shown}"
    );
    assert!(
        shown.contains("key 'kek'") && shown.contains("HTTP 403 Forbidden"),
        "{shown}"
    );
    assert!(shown.contains("disabled"), "{shown}");
    let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
    // A backend built while the key is disabled is refused too.
    let err = AzureKeyVaultKms::from_client(
        client(&double),
        &double.url(),
        "kek",
        WrapAlgorithm::RsaOaep256,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");

    set_enabled(&admin, "kek", &version, true).await;
    assert_eq!(
        kms.unwrap(&wrapped, &b).await.unwrap().expose(),
        key.expose()
    );
    kms.wrap(&key, &b).await.unwrap();
}

/// Sets the permitted operations of a key version.
async fn set_key_ops(client: &KeyClient, name: &str, version: &str, ops: Vec<KeyOperation>) {
    let params = UpdateKeyPropertiesParameters {
        key_ops: Some(ops),
        ..Default::default()
    };
    update_key(client, name, version, params).await;
}

#[tokio::test]
async fn an_operation_the_key_no_longer_permits_is_denied_not_a_bad_record() {
    let double = Double::start();
    let admin = client(&double);
    let version = create_key(&admin, "kek", KeyType::Rsa, 2048).await;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    let key = TenantKey::from_bytes([6; 32]);
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();

    // After connect, the key's unwrapKey permission is taken away (Key Vault answers 403
    // Forbidden, KeyOperationForbidden): a refusal, never "the record was tampered with".
    set_key_ops(&admin, "kek", &version, vec![KeyOperation::WrapKey]).await;
    let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("HTTP 403 Forbidden"), "{err}");

    set_key_ops(
        &admin,
        "kek",
        &version,
        vec![KeyOperation::WrapKey, KeyOperation::UnwrapKey],
    )
    .await;
    assert_eq!(
        kms.unwrap(&wrapped, &b).await.unwrap().expose(),
        key.expose()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_token_refresh_delays_nothing_while_the_token_is_valid() {
    let double = Double::start();
    create_key(&client(&double), "kek", KeyType::Rsa, 2048).await;
    let key = TenantKey::from_bytes([8; 32]);
    let b = binding("acme", 1);

    // Without the detached credential, the SDK refreshes inside the call once the token is
    // in its refresh window, and a refresh slower than the call's timeout fails the call
    // although the token in hand is still valid for minutes.
    let direct = AzureKeyVaultKms::from_client(
        client_with_credential(&double, Arc::new(SlowRefresh::default())),
        &double.url(),
        "kek",
        WrapAlgorithm::RsaOaep256,
    )
    .await
    .unwrap();
    let err = direct.wrap(&key, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");

    // With it, calls go on with the valid token while one refresh runs for all of them.
    let slow = Arc::new(SlowRefresh::default());
    let credential = DetachedTokenCredential::new(slow.clone());
    let kms = AzureKeyVaultKms::from_client(
        client_with_credential(&double, credential),
        &double.url(),
        "kek",
        WrapAlgorithm::RsaOaep256,
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut wrapped = Vec::new();
    for _ in 0..5 {
        wrapped.push(kms.wrap(&key, &b).await.unwrap());
    }
    for w in &wrapped {
        assert_eq!(kms.unwrap(w, &b).await.unwrap().expose(), key.expose());
    }
    // (Each call is bounded by OPERATION_TIMEOUT, shorter than the refresh: that they all
    // succeeded shows that none waited for it.)
    eprintln!("10 calls during the refresh took {:?}", started.elapsed());
    // One refresh for all those calls (the first token, then the slow one), which ends on its
    // own; calls after it use its token.
    assert_eq!(slow.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    tokio::time::sleep(OPERATION_TIMEOUT + Duration::from_secs(2)).await;
    kms.wrap(&key, &b).await.unwrap();
    assert_eq!(slow.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unsuitable_keys_are_misconfigured_at_connect() {
    let double = Double::start();
    let admin = client(&double);
    let connect = |name: &'static str, algorithm| {
        let client = client(&double);
        let url = double.url();
        async move { AzureKeyVaultKms::from_client(client, &url, name, algorithm).await }
    };

    let err = connect("does-not-exist", WrapAlgorithm::RsaOaep256)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    let shown = err.to_string();
    assert!(shown.starts_with("azure-kv: GetKey with vault"), "{shown}");
    assert!(
        shown.contains("key 'does-not-exist'") && shown.contains("KeyNotFound"),
        "{shown}"
    );

    create_key(&admin, "rsa", KeyType::Rsa, 2048).await;
    create_key(&admin, "oct", KeyType::OctHsm, 256).await;
    create_key_with_ops(
        &admin,
        "sign-only",
        KeyType::Rsa,
        2048,
        vec![KeyOperation::Sign],
    )
    .await;
    for (name, algorithm, expected) in [
        ("rsa", WrapAlgorithm::A256Kw, "A256KW needs"),
        ("oct", WrapAlgorithm::RsaOaep256, "RSA-OAEP-256 needs"),
        (
            "sign-only",
            WrapAlgorithm::RsaOaep256,
            "does not permit the 'wrapKey'",
        ),
    ] {
        let err = connect(name, algorithm).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{name}: {err}");
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }

    // The client must point at the configured vault.
    let err = AzureKeyVaultKms::from_client(
        client(&double),
        "https://other.vault.azure.net",
        "rsa",
        WrapAlgorithm::RsaOaep256,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
}

#[tokio::test]
async fn missing_or_wrong_token_is_denied() {
    let double = Double::start();
    create_key(&client(&double), "kek", KeyType::Rsa, 2048).await;
    for token in [Some("not-the-test-token"), None] {
        let err = AzureKeyVaultKms::from_client(
            client_with(&double, token),
            &double.url(),
            "kek",
            WrapAlgorithm::RsaOaep256,
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Denied, "{token:?}: {err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("not-the-test-token"), "{shown}");
        assert!(!shown.contains(TOKEN), "{shown}");
    }

    // A backend whose token stops being accepted (the vault restarted with another valid
    // token, as after a revocation) is denied for wrap and unwrap.
    let mut double = double;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    let key = TenantKey::from_bytes([6; 32]);
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();
    double.token = "another-token";
    double.restart();
    let err = kms.wrap(&key, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("HTTP 401 Unauthorized"), "{err}");
    let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Denied, "{err}");
    assert!(!format!("{err} {err:?}").contains(TOKEN), "{err:?}");
}

#[tokio::test]
async fn a_rejected_tls_certificate_is_misconfigured_not_an_outage() {
    // A vault whose certificate this client does not trust (here: signed by another test
    // CA; as with a wrong URL or a TLS-intercepting proxy).
    let vault = Double::start();
    create_key(&client(&vault), "kek", KeyType::Rsa, 2048).await;
    let stranger = Double::start();
    let client = client_trusting(
        &vault,
        &stranger.ca_pem(),
        Arc::new(StaticToken(Some(TOKEN))),
    );
    let err = AzureKeyVaultKms::from_client(client, &vault.url(), "kek", WrapAlgorithm::RsaOaep256)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    assert!(
        err.to_string()
            .contains("the server's TLS certificate was rejected"),
        "{err}"
    );
}

#[tokio::test]
async fn outage_is_unavailable_and_a_restarted_vault_serves_again() {
    let mut double = Double::start();
    create_key(&client(&double), "kek", KeyType::Rsa, 2048).await;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    let key = TenantKey::from_bytes([3; 32]);
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();

    double.stop();
    let started = Instant::now();
    let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with("azure-kv: UnwrapKey with vault"),
        "{shown}"
    );
    assert!(
        shown.contains("key 'kek'") && shown.contains("Connection"),
        "{shown}"
    );
    // The retry policy gives up (3 attempts) before the operation timeout.
    assert!(
        started.elapsed() < OPERATION_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    let err = kms.wrap(&key, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    let err = kms.current_root_key_ref().await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");

    // The vault comes back with its keys: the same instance works again.
    double.restart();
    assert_eq!(
        kms.unwrap(&wrapped, &b).await.unwrap().expose(),
        key.expose()
    );
    let again = kms.wrap(&key, &b).await.unwrap();
    assert_eq!(again.root_key_ref, wrapped.root_key_ref);
}

#[tokio::test]
async fn invalid_configuration_is_refused_without_network() {
    let config = |vault_url: &str, key_name: &str| AzureKeyVaultConfig {
        vault_url: vault_url.into(),
        key_name: key_name.into(),
        algorithm: WrapAlgorithm::default(),
        credential: AzureCredentialConfig::ClientSecret {
            tenant_id: "00000000-0000-0000-0000-000000000000".into(),
            client_id: "11111111-1111-1111-1111-111111111111".into(),
            secret: "do-not-print-me".into(),
        },
    };
    for (url, name) in [
        ("http://127.0.0.1:9", "kek"),
        ("https://127.0.0.1:9/keys", "kek"),
        ("not a url", "kek"),
        ("https://127.0.0.1:9", ""),
        ("https://127.0.0.1:9", "kek/../x"),
    ] {
        let c = config(url, name);
        assert!(!format!("{c:?}").contains("do-not-print-me"));
        let err = AzureKeyVaultKms::connect(&c).await.unwrap_err();
        assert_eq!(
            err.kind(),
            BackendErrorKind::Misconfigured,
            "{url} {name}: {err}"
        );
        assert!(!err.to_string().contains("do-not-print-me"), "{err}");
    }
    // An empty client secret is refused by azure_identity when the credential is built.
    let mut c = config("https://127.0.0.1:9", "kek");
    c.credential = AzureCredentialConfig::ClientSecret {
        tenant_id: "00000000-0000-0000-0000-000000000000".into(),
        client_id: "11111111-1111-1111-1111-111111111111".into(),
        secret: "".into(),
    };
    let err = AzureKeyVaultKms::connect(&c).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    assert!(
        err.to_string().contains("client secret credential"),
        "{err}"
    );
}

#[tokio::test]
async fn debug_shows_no_secrets() {
    let double = Double::start();
    create_key(&client(&double), "kek", KeyType::Rsa, 2048).await;
    let kms = kms_for(&double, "kek", WrapAlgorithm::RsaOaep256).await;
    let shown = format!("{kms:?}");
    assert!(
        shown.contains("kek") && shown.contains("127.0.0.1"),
        "{shown}"
    );
    assert!(!shown.contains(TOKEN), "{shown}");
}
