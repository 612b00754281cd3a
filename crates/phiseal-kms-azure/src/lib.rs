//! # phiseal-kms-azure — tenant keys wrapped by an Azure Key Vault key
//!
//! [`AzureKeyVaultKms`] is a [`Kms`] backend whose root key is a key in Azure Key Vault: an RSA
//! key (`RSA` or `RSA-HSM`, 2048 bits or more) used with `RSA-OAEP-256`, or, in a Managed HSM, a
//! 256-bit `oct-HSM` key used with `A256KW` (RFC 3394). The root key never leaves the vault. The
//! client is the official Azure SDK (`azure_security_keyvault_keys`, `azure_core`,
//! `azure_identity`).
//!
//! ## What it does
//! - **Checked key.** [`AzureKeyVaultKms::connect`] / [`AzureKeyVaultKms::from_client`] read the
//!   key once (`GET /keys/{name}`): it must exist, be enabled, allow `wrapKey` and `unwrapKey`,
//!   and have the key type the configured [`WrapAlgorithm`] needs.
//! - **Wrap** is Key Vault `wrapKey` with the *latest* key version. Key Vault's wrap takes no
//!   associated data, so the backend binds the tenant and version itself: the wrapped payload is
//!   the 32-byte tenant key followed by `SHA-256(binding.to_aad())` (64 bytes: within
//!   RSA-OAEP-256's limit for RSA-2048, and a multiple of 8 for A256KW). The root-key reference
//!   is `azure-kv:` followed by the **versioned** key id that Key Vault reports for the wrap,
//!   `https://{vault}/keys/{name}/{version}`, so every wrap records the exact key version that
//!   made it.
//! - **Unwrap** refuses (as [`BackendErrorKind::InvalidData`]) a reference that is not
//!   `azure-kv:{vault}/keys/{name}/{version}` for *this* vault and key, without calling the
//!   vault. Otherwise it calls `unwrapKey` with exactly the recorded version, checks that the
//!   response names that key version, that the result is 64 bytes, and that its last 32 bytes
//!   equal `SHA-256(binding.to_aad())` (compared in constant time). A wrapped key moved to
//!   another tenant or version therefore fails as `InvalidData`, as with backends whose wrap
//!   authenticates a context.
//!
//! ## RSA wrapping is not authenticated
//! RSA-OAEP encrypts with the public key, which `keys/get` returns. Whoever can read the key
//! and write the key store can plant a tenant key of their choosing (the binding hash and the
//! core's key-check MAC are computable from a chosen key). `A256KW` (Managed HSM) and the
//! other backends authenticate the wrap. With RSA keys the key store's integrity must be
//! protected by its access control; see `docs/KMS.md`.
//!
//! ## Root-key rotation
//! Rotating the key in the vault (manually or by a rotation policy) creates a new key version.
//! New wraps use it at once and record it; [`Kms::current_root_key_ref`] reads the latest
//! version from the vault and changes with it. Older wraps keep unwrapping with the version
//! they recorded, as long as that version stays enabled in the vault. `phiseal root rotate`
//! re-wraps every stored tenant key whose reference differs from the current one, after which
//! old key versions may be disabled. Do not disable or delete an old version before that.
//!
//! ## Resilience
//! Every vault call is limited to [`OPERATION_TIMEOUT`], all attempts and the token request
//! included. Within that, `azure_core`'s retry policy retries HTTP 408, 429, 500, 502, 503 and
//! 504 and connection / I/O failures with exponential backoff (from [`RETRY_INITIAL_DELAY`],
//! doubling, plus up to 256 ms of random jitter, honouring `Retry-After` on 429 and 503), at
//! most [`MAX_RETRIES`] retries (so at most `MAX_RETRIES + 1` attempts). Other errors are not
//! retried. [`AzureKeyVaultKms::connect`] configures this retry policy; a client passed to
//! [`AzureKeyVaultKms::from_client`] keeps its own (build it from [`client_options`] to get
//! this one), but the timeout applies to it too. The timeout needs a Tokio runtime with the
//! time driver, as `azure_core`'s retry delays do.
//!
//! The token request is the one part that does not end with the call: `connect` wraps the
//! credential in a [`DetachedTokenCredential`], which refreshes in a task of its own shared by
//! all callers and, while it runs, hands out the last token as long as it stays valid for
//! [`USABLE_FOR`]. So a slow identity endpoint (managed identity retries for up to a minute)
//! delays nothing while a valid token is at hand, and a refresh is never cancelled by a
//! call's timeout and started over. A refresh unanswered after [`REFRESH_LIMIT`] fails as an
//! outage, and the next call starts another.
//!
//! ## Error mapping
//! | Key Vault says | kind |
//! |---|---|
//! | 400 with error code `BadParameter` (undecryptable input, wrong version) from `unwrapKey`; a result that is not 64 bytes or whose binding hash does not match; a reference to another vault or key | `InvalidData` |
//! | 401 (`Unauthorized`: no or invalid token), 403 (`Forbidden`: missing permission, disabled key), a credential that cannot obtain a token, a key that is disabled at connect time | `Denied` |
//! | 408, 429, any 5xx, the [`OPERATION_TIMEOUT`], connection and I/O failures | `Unavailable` |
//! | 404 (`KeyNotFound`), 400 from any other operation (e.g. an algorithm the key does not support), a key of the wrong type, size or permitted operations, an invalid vault URL or key name, a credential that cannot be built | `Misconfigured` |
//! | another 400 from `unwrapKey` (an unsupported algorithm or API version: not the record's fault); an unwrap result naming another key version; anything else (an unexpected response shape, …) | `Other` |
//!
//! Every message names the backend (`azure-kv`), the operation, the vault and key, and the
//! cause: the HTTP status, Key Vault's error code and message, or the transport failure. The
//! cause is kept as text only (`source()`), never as the SDK error itself, whose `Debug` form
//! contains the raw HTTP response.
//!
//! ## Permissions
//! The identity needs the Key Vault data-plane permissions `keys/get`, `keys/wrapKey` and
//! `keys/unwrapKey` on the key (RBAC role *Key Vault Crypto User*, or an access policy with
//! those three permissions; Managed HSM: the local RBAC role *Managed HSM Crypto User*).
//!
//! ## Key material in memory
//! The wrap payload is built in a zeroizing buffer and wiped; the unwrap result is moved into a
//! zeroizing buffer, its first 32 bytes are copied into a [`TenantKey`], and the buffer is
//! wiped. The SDK's own copies (the request's `value` and JSON body, the response body and its
//! parsed `value`) are freed but **not zeroized**: the SDK offers no hook for it. A client
//! secret is held as a [`SecretString`] and copied into `azure_identity`'s `Secret`, which does
//! not zeroize either. Error messages, logs and `Debug` output never contain key bytes, wrapped
//! bytes, tokens or secrets.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod detached;

pub use detached::{DetachedTokenCredential, FRESH_FOR, REFRESH_LIMIT, USABLE_FOR};

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::http::{
    ClientOptions, ExponentialRetryOptions, RequestContent, RetryOptions, StatusCode, Url,
};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientSecretCredential,
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, Key, KeyClientGetKeyOptions, KeyClientWrapKeyOptions,
    KeyOperationParameters, KeyOperationResult, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::{BackendError, BackendErrorKind, TENANT_KEY_LEN, TenantKey};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The backend's name, as returned by [`Kms::name`] and used in every error message.
pub const NAME: &str = "azure-kv";
/// Prefix of every root-key reference made by this backend; the versioned key id follows it.
pub const REF_PREFIX: &str = "azure-kv:";
/// Limit for one vault call, all retry attempts and the token request included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries after the first attempt (for retryable failures only; see the crate documentation).
pub const MAX_RETRIES: u32 = 2;
/// Delay before the first retry; it doubles for each further retry, plus random jitter.
pub const RETRY_INITIAL_DELAY: Duration = Duration::from_millis(250);
/// Length of the wrapped payload: the tenant key and the SHA-256 of its binding.
pub const PAYLOAD_LEN: usize = TENANT_KEY_LEN + 32;
/// Upper bound for wrapped bytes: an RSA-4096 ciphertext is 512 bytes, A256KW's is 72.
const MAX_WRAPPED_LEN: usize = 512;
/// Smallest RSA modulus accepted, in bytes (2048 bits).
const MIN_RSA_MODULUS_LEN: usize = 256;
/// Longest cause text kept in an error message.
const MAX_CAUSE_LEN: usize = 600;

/// The Key Vault algorithm that wraps tenant keys; it decides the key type the vault key must
/// have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WrapAlgorithm {
    /// `RSA-OAEP-256` (OAEP with SHA-256 and MGF1-SHA-256) with an `RSA` or `RSA-HSM` key of at
    /// least 2048 bits. Works in every Key Vault (standard, premium) and in Managed HSM.
    #[default]
    RsaOaep256,
    /// `A256KW` (RFC 3394 AES key wrap) with a 256-bit `oct-HSM` key. Managed HSM only.
    A256Kw,
}

impl WrapAlgorithm {
    fn sdk(self) -> EncryptionAlgorithm {
        match self {
            WrapAlgorithm::RsaOaep256 => EncryptionAlgorithm::RsaOaep256,
            WrapAlgorithm::A256Kw => EncryptionAlgorithm::A256Kw,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            WrapAlgorithm::RsaOaep256 => "RSA-OAEP-256",
            WrapAlgorithm::A256Kw => "A256KW",
        }
    }
}

/// How the backend authenticates to Microsoft Entra ID (the `azure_identity` credentials).
/// Its `Debug` output never shows the client secret.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AzureCredentialConfig {
    /// The managed identity of the Azure VM, App Service, Functions or Container Apps host:
    /// system-assigned, or the user-assigned identity with this client id.
    ManagedIdentity {
        /// Client id of a user-assigned identity; `None` uses the system-assigned identity.
        client_id: Option<String>,
    },
    /// Microsoft Entra Workload ID on Kubernetes (a federated service-account token). `None`
    /// fields come from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and `AZURE_FEDERATED_TOKEN_FILE`,
    /// which the workload-identity webhook sets.
    WorkloadIdentity {
        /// The tenant (directory) id.
        tenant_id: Option<String>,
        /// The client (application) id.
        client_id: Option<String>,
        /// The file holding the service-account token.
        token_file: Option<PathBuf>,
    },
    /// A service principal with a client secret. Prefer a managed or workload identity.
    ClientSecret {
        /// The tenant (directory) id.
        tenant_id: String,
        /// The client (application) id.
        client_id: String,
        /// The client secret.
        secret: SecretString,
    },
    /// The account signed in to the Azure CLI (`az login`). For development.
    AzureCli {
        /// The tenant to request tokens for; `None` uses the CLI's default.
        tenant_id: Option<String>,
    },
    /// `azure_identity`'s developer chain: the Azure CLI, then the Azure Developer CLI. For
    /// development. (`azure_identity` 1.0 has no `DefaultAzureCredential`.)
    DeveloperTools,
}

/// Where the root key is and how to reach it.
#[derive(Debug, Clone)]
pub struct AzureKeyVaultConfig {
    /// The vault (or Managed HSM) URL, e.g. `https://my-vault.vault.azure.net`. Must be
    /// `https`, without path (a trailing slash is fine), query or fragment.
    pub vault_url: String,
    /// The key's name (1 to 127 letters, digits and dashes).
    pub key_name: String,
    /// The wrap algorithm; [`WrapAlgorithm::RsaOaep256`] by default.
    pub algorithm: WrapAlgorithm,
    /// How to authenticate.
    pub credential: AzureCredentialConfig,
}

/// A KMS backend whose root key is an Azure Key Vault key. See the crate documentation.
///
/// Its `Debug` output shows the vault, key and algorithm, never credentials, tokens or key
/// bytes.
#[derive(Clone)]
pub struct AzureKeyVaultKms {
    client: Arc<KeyClient>,
    /// `https://host[:port]`, no trailing slash.
    vault: String,
    key_name: String,
    algorithm: WrapAlgorithm,
    /// `{vault}/keys/{key_name}/`: a versioned key id of this key is this plus the version.
    kid_prefix: String,
}

impl fmt::Debug for AzureKeyVaultKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureKeyVaultKms")
            .field("vault", &self.vault)
            .field("key_name", &self.key_name)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl AzureKeyVaultKms {
    /// Builds the credential and the SDK client from `config`, with this crate's retry policy
    /// (see the crate documentation), and checks the key (see [`AzureKeyVaultKms::from_client`]).
    ///
    /// Fails with `Misconfigured` for an invalid vault URL or key name, a credential that
    /// cannot be built, an unknown key or one of the wrong type; `Denied` if the identity may
    /// not read the key or the key is disabled; `Unavailable` if the vault cannot be reached.
    pub async fn connect(config: &AzureKeyVaultConfig) -> Result<AzureKeyVaultKms, BackendError> {
        let vault = normalize_vault_url(&config.vault_url)?;
        validate_key_name(&config.key_name)?;
        let credential = DetachedTokenCredential::new(build_credential(&config.credential)?);
        let options = KeyClientOptions {
            client_options: client_options(),
            ..Default::default()
        };
        let client = KeyClient::new(&vault, credential, Some(options)).map_err(|e| {
            BackendError::misconfigured(
                NAME,
                format!(
                    "cannot build the Key Vault client for vault '{vault}': {}",
                    cause_text(&e)
                ),
            )
        })?;
        Self::from_client(client, &vault, &config.key_name, config.algorithm).await
    }

    /// Uses an existing SDK client (its credential, transport and retry options; this crate's
    /// [`OPERATION_TIMEOUT`] applies on top). `vault_url` must be the client's endpoint.
    /// Reads the key once: it must exist, be enabled, permit `wrapKey` and `unwrapKey` and
    /// have a key type matching `algorithm` (`RSA`/`RSA-HSM` of at least 2048 bits for
    /// RSA-OAEP-256, `oct`/`oct-HSM` for A256KW). Errors as for [`AzureKeyVaultKms::connect`].
    pub async fn from_client(
        client: KeyClient,
        vault_url: &str,
        key_name: &str,
        algorithm: WrapAlgorithm,
    ) -> Result<AzureKeyVaultKms, BackendError> {
        let vault = normalize_vault_url(vault_url)?;
        validate_key_name(key_name)?;
        let endpoint = normalize_vault_url(client.endpoint().as_str())?;
        if endpoint != vault {
            return Err(BackendError::misconfigured(
                NAME,
                format!(
                    "the Key Vault client's endpoint '{endpoint}' is not the configured vault \
                     '{vault}'"
                ),
            ));
        }
        let kms = AzureKeyVaultKms {
            client: Arc::new(client),
            kid_prefix: format!("{vault}/keys/{key_name}/"),
            vault,
            key_name: key_name.to_owned(),
            algorithm,
        };
        let key = kms.get_latest_key().await?;
        kms.check_key(&key)?;
        Ok(kms)
    }

    /// The vault URL, normalised (`https://host[:port]`).
    pub fn vault_url(&self) -> &str {
        &self.vault
    }

    /// The key's name.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The wrap algorithm.
    pub fn algorithm(&self) -> WrapAlgorithm {
        self.algorithm
    }

    /// `vault 'https://…' key 'name'`, for messages.
    fn describe(&self) -> String {
        format!("vault '{}' key '{}'", self.vault, self.key_name)
    }

    async fn get_latest_key(&self) -> Result<Key, BackendError> {
        let options = KeyClientGetKeyOptions::default();
        let response = self
            .call(Op::Get, self.client.get_key(&self.key_name, Some(options)))
            .await?;
        response
            .into_model()
            .map_err(|e| self.bad_response(Op::Get, &cause_text(&e)))
    }

    /// Checks the key read at connect time.
    fn check_key(&self, key: &Key) -> Result<(), BackendError> {
        let d = self.describe();
        let jwk = key
            .key
            .as_ref()
            .ok_or_else(|| self.bad_response(Op::Get, "no key in the response"))?;
        let kid = jwk.kid.as_deref().unwrap_or_default();
        self.version_of_response_kid(kid)
            .ok_or_else(|| self.foreign_kid(Op::Get, kid))?;
        let enabled = key.attributes.as_ref().and_then(|a| a.enabled);
        if enabled != Some(true) {
            return Err(BackendError::new(
                BackendErrorKind::Denied,
                format!("{NAME}: {d} is disabled (or reports no 'enabled' attribute): enable it"),
            ));
        }
        let ops = jwk.key_ops.as_deref().unwrap_or_default();
        for needed in ["wrapKey", "unwrapKey"] {
            if !ops.iter().any(|op| op == needed) {
                return Err(BackendError::misconfigured(
                    NAME,
                    format!(
                        "{d} does not permit the '{needed}' operation (its key_ops are {ops:?}): \
                         allow wrapKey and unwrapKey"
                    ),
                ));
            }
        }
        let kty = jwk.kty.as_ref();
        let fits = match self.algorithm {
            WrapAlgorithm::RsaOaep256 => matches!(kty, Some(KeyType::Rsa | KeyType::RsaHsm)),
            WrapAlgorithm::A256Kw => matches!(kty, Some(KeyType::Oct | KeyType::OctHsm)),
        };
        if !fits {
            let kty = kty.map(ToString::to_string);
            return Err(BackendError::misconfigured(
                NAME,
                format!(
                    "{d} has key type {kty:?}, but {} needs {}",
                    self.algorithm.as_str(),
                    match self.algorithm {
                        WrapAlgorithm::RsaOaep256 => "an RSA or RSA-HSM key",
                        WrapAlgorithm::A256Kw => "an oct-HSM key (Managed HSM)",
                    }
                ),
            ));
        }
        if self.algorithm == WrapAlgorithm::RsaOaep256 {
            let modulus = jwk
                .n
                .as_deref()
                .map(strip_leading_zeros)
                .unwrap_or_default();
            if modulus.len() < MIN_RSA_MODULUS_LEN {
                return Err(BackendError::misconfigured(
                    NAME,
                    format!(
                        "{d} is an RSA key of {} bits: phiseal needs at least 2048 bits",
                        modulus.len().saturating_mul(8)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The version named by `kid` if it is a versioned id of this vault's key, else `None`.
    fn version_of_kid<'a>(&self, kid: &'a str) -> Option<&'a str> {
        kid.strip_prefix(&self.kid_prefix)
            .filter(|version| is_valid_version(version))
    }

    /// The version named by a key id in a vault *response*, if it is a versioned id of this
    /// vault's key. The id is parsed as a URL first, so that only the URL's canonical form
    /// (host case, default port) may differ from ours; anything else (another host, port, key
    /// or collection, extra path segments, a query) is refused.
    fn version_of_response_kid(&self, kid: &str) -> Option<String> {
        let url = Url::parse(kid).ok()?;
        if url.scheme() != "https"
            || !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return None;
        }
        let host = url.host_str()?;
        let canonical = match url.port() {
            Some(port) => format!("https://{host}:{port}{}", url.path()),
            None => format!("https://{host}{}", url.path()),
        };
        self.version_of_kid(&canonical).map(str::to_owned)
    }

    /// The key version named by a root-key reference `azure-kv:{vault}/keys/{name}/{version}`
    /// of this vault and key, else `None`.
    fn version_of_ref<'a>(&self, root_key_ref: &'a str) -> Option<&'a str> {
        root_key_ref
            .strip_prefix(REF_PREFIX)
            .and_then(|kid| self.version_of_kid(kid))
    }

    /// Runs one SDK call under the operation timeout and maps its errors.
    async fn call<T>(
        &self,
        op: Op,
        fut: impl Future<Output = azure_core::Result<T>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(OPERATION_TIMEOUT, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(sdk_error(&e, op, &self.describe())),
            Err(_) => Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!(
                    "{NAME}: {op} with {} failed: timed out after {OPERATION_TIMEOUT:?} (all \
                     attempts, the access token included); Key Vault or the identity endpoint \
                     is unreachable or overloaded, retry later",
                    self.describe()
                ),
            )),
        }
    }

    fn bad_response(&self, op: Op, what: &str) -> BackendError {
        BackendError::new(
            BackendErrorKind::Other,
            format!(
                "{NAME}: {op} with {} returned an unexpected response: {what}",
                self.describe()
            ),
        )
    }

    fn foreign_kid(&self, op: Op, kid: &str) -> BackendError {
        BackendError::new(
            BackendErrorKind::Other,
            format!(
                "{NAME}: {op} with {} answered with key id '{}', which is not a version of this \
                 key: refusing the result",
                self.describe(),
                printable(kid)
            ),
        )
    }

    fn params(
        &self,
        value: Vec<u8>,
    ) -> Result<RequestContent<KeyOperationParameters>, BackendError> {
        let params = KeyOperationParameters {
            algorithm: Some(self.algorithm.sdk()),
            value: Some(value),
            ..Default::default()
        };
        params.try_into().map_err(|e: azure_core::Error| {
            BackendError::new(
                BackendErrorKind::Other,
                format!(
                    "{NAME}: cannot build the request for {}: {}",
                    self.describe(),
                    cause_text(&e)
                ),
            )
        })
    }
}

#[async_trait]
impl Kms for AzureKeyVaultKms {
    fn name(&self) -> &str {
        NAME
    }

    /// `azure-kv:` followed by the versioned id of the key's latest version, read from the
    /// vault: it changes when the key is rotated in the vault.
    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        let key = self.get_latest_key().await?;
        let kid = key
            .key
            .as_ref()
            .and_then(|k| k.kid.as_deref())
            .unwrap_or_default();
        let version = self
            .version_of_response_kid(kid)
            .ok_or_else(|| self.foreign_kid(Op::Get, kid))?;
        Ok(format!("{REF_PREFIX}{}{version}", self.kid_prefix))
    }

    /// Any version of this vault's key: `azure-kv:{vault}/keys/{name}/{version}`. Whether the
    /// version exists and is enabled is the vault's to say when unwrapping.
    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        self.version_of_ref(root_key_ref).is_some()
    }

    async fn wrap(
        &self,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, BackendError> {
        let mut payload = Zeroizing::new([0u8; PAYLOAD_LEN]);
        let (key_part, hash_part) = payload.split_at_mut(TENANT_KEY_LEN);
        key_part.copy_from_slice(key.expose());
        hash_part.copy_from_slice(&binding_hash(binding));
        // The SDK owns (and does not zeroize) this copy; see the crate documentation.
        let params = self.params(payload.to_vec())?;
        drop(payload);
        // No version: Key Vault wraps with the latest version and names it in the response.
        let options = KeyClientWrapKeyOptions::default();
        let response = self
            .call(
                Op::Wrap,
                self.client.wrap_key(&self.key_name, params, Some(options)),
            )
            .await?;
        let result: KeyOperationResult = response
            .into_model()
            .map_err(|e| self.bad_response(Op::Wrap, &cause_text(&e)))?;
        let kid = result.kid.as_deref().unwrap_or_default();
        let version = self
            .version_of_response_kid(kid)
            .ok_or_else(|| self.foreign_kid(Op::Wrap, kid))?;
        let ciphertext = result
            .result
            .filter(|c| !c.is_empty() && c.len() <= MAX_WRAPPED_LEN)
            .ok_or_else(|| {
                self.bad_response(
                    Op::Wrap,
                    &format!(
                        "no wrapped bytes, or more than {MAX_WRAPPED_LEN}, for tenant '{}' \
                         version {}",
                        binding.tenant, binding.version
                    ),
                )
            })?;
        Ok(WrappedKey {
            root_key_ref: format!("{REF_PREFIX}{}{version}", self.kid_prefix),
            ciphertext,
        })
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError> {
        let d = self.describe();
        let version = self.version_of_ref(&wrapped.root_key_ref).ok_or_else(|| {
            BackendError::invalid_data(
                NAME,
                format!(
                    "wrapped key for tenant '{}' version {} was made by root key '{}', \
                     which is not a version of {d} ('{REF_PREFIX}{}<version>'): configure a \
                     backend for that key to unwrap it",
                    binding.tenant,
                    binding.version,
                    printable(&wrapped.root_key_ref),
                    self.kid_prefix
                ),
            )
            .refused_before_calling()
        })?;
        if wrapped.ciphertext.is_empty() || wrapped.ciphertext.len() > MAX_WRAPPED_LEN {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "wrapped key for tenant '{}' version {} is {} bytes long, expected 1 to \
                     {MAX_WRAPPED_LEN}: the key store record is damaged",
                    binding.tenant,
                    binding.version,
                    wrapped.ciphertext.len()
                ),
            )
            .refused_before_calling());
        }
        let params = self.params(wrapped.ciphertext.clone())?;
        let response = self
            .call(
                Op::Unwrap,
                self.client
                    .unwrap_key(&self.key_name, version, params, None),
            )
            .await?;
        let mut result: KeyOperationResult = response
            .into_model()
            .map_err(|e| self.bad_response(Op::Unwrap, &cause_text(&e)))?;
        // Take the plaintext out of the response first, so that it is wiped on every path.
        let plaintext = Zeroizing::new(result.result.take().unwrap_or_default());
        let kid = result.kid.as_deref().unwrap_or_default();
        if self.version_of_response_kid(kid).as_deref() != Some(version) {
            // A vault (or proxy) anomaly, not a tampered record: `Other`, as for wrap and get.
            return Err(BackendError::new(
                BackendErrorKind::Other,
                format!(
                    "{NAME}: UnwrapKey with {d} version '{version}' for tenant '{}' version {} \
                     answered with key id '{}': refusing the result",
                    binding.tenant,
                    binding.version,
                    printable(kid)
                ),
            ));
        }
        let (key_part, hash_part) = match plaintext.split_at_checked(TENANT_KEY_LEN) {
            Some(parts) if plaintext.len() == PAYLOAD_LEN => parts,
            _ => {
                return Err(BackendError::invalid_data(
                    NAME,
                    format!(
                        "UnwrapKey with {d} version '{version}' for tenant '{}' version {} \
                         returned {} bytes, expected {PAYLOAD_LEN}: the wrapped key was not made by \
                         phiseal",
                        binding.tenant,
                        binding.version,
                        plaintext.len()
                    ),
                ));
            }
        };
        if !bool::from(hash_part.ct_eq(&binding_hash(binding))) {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "wrapped key unwrapped with {d} version '{version}' is bound to another \
                     tenant or version than tenant '{}' version {}: the key store record was copied \
                     or tampered with",
                    binding.tenant, binding.version
                ),
            ));
        }
        TenantKey::from_slice(key_part).ok_or_else(|| {
            BackendError::invalid_data(
                NAME,
                format!("UnwrapKey with {d} returned a plaintext that is not a tenant key"),
            )
        })
    }
}

/// `SHA-256(binding.to_aad())`.
fn binding_hash(binding: &KeyBinding) -> [u8; 32] {
    Sha256::digest(binding.to_aad()).into()
}

/// `azure_core` client options with this crate's retry policy (see the crate documentation),
/// which [`AzureKeyVaultKms::connect`] uses. For a client built by hand for
/// [`AzureKeyVaultKms::from_client`] (a custom transport, proxy or cloud): start from these and
/// set the transport.
pub fn client_options() -> ClientOptions {
    ClientOptions {
        retry: retry_options(),
        ..Default::default()
    }
}

fn retry_options() -> RetryOptions {
    let ms = |d: Duration| {
        azure_core::time::Duration::milliseconds(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    RetryOptions::exponential(ExponentialRetryOptions {
        initial_delay: ms(RETRY_INITIAL_DELAY),
        max_retries: MAX_RETRIES,
        max_total_elapsed: ms(OPERATION_TIMEOUT),
        max_delay: azure_core::time::Duration::seconds(2),
    })
}

fn build_credential(
    config: &AzureCredentialConfig,
) -> Result<Arc<dyn TokenCredential>, BackendError> {
    let built: azure_core::Result<Arc<dyn TokenCredential>> = match config {
        AzureCredentialConfig::ManagedIdentity { client_id } => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            };
            ManagedIdentityCredential::new(Some(options)).map(|c| c as Arc<dyn TokenCredential>)
        }
        AzureCredentialConfig::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
        } => {
            let options = WorkloadIdentityCredentialOptions {
                tenant_id: tenant_id.clone(),
                client_id: client_id.clone(),
                token_file_path: token_file.clone(),
                ..Default::default()
            };
            WorkloadIdentityCredential::new(Some(options)).map(|c| c as Arc<dyn TokenCredential>)
        }
        AzureCredentialConfig::ClientSecret {
            tenant_id,
            client_id,
            secret,
        } => ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            // azure_identity keeps its own (not zeroized) copy; see the crate documentation.
            Secret::new(secret.expose_secret().to_owned()),
            None,
        )
        .map(|c| c as Arc<dyn TokenCredential>),
        AzureCredentialConfig::AzureCli { tenant_id } => {
            let options = AzureCliCredentialOptions {
                tenant_id: tenant_id.clone(),
                ..Default::default()
            };
            AzureCliCredential::new(Some(options)).map(|c| c as Arc<dyn TokenCredential>)
        }
        AzureCredentialConfig::DeveloperTools => {
            DeveloperToolsCredential::new(None).map(|c| c as Arc<dyn TokenCredential>)
        }
    };
    // Credential constructors validate ids and read environment variables and files; their
    // messages name what is missing, never a secret.
    built.map_err(|e| {
        BackendError::misconfigured(
            NAME,
            format!(
                "cannot build the {} credential: {}",
                credential_kind(config),
                cause_text(&e)
            ),
        )
    })
}

fn credential_kind(config: &AzureCredentialConfig) -> &'static str {
    match config {
        AzureCredentialConfig::ManagedIdentity { .. } => "managed identity",
        AzureCredentialConfig::WorkloadIdentity { .. } => "workload identity",
        AzureCredentialConfig::ClientSecret { .. } => "client secret",
        AzureCredentialConfig::AzureCli { .. } => "Azure CLI",
        AzureCredentialConfig::DeveloperTools => "developer tools",
    }
}

/// `https://host[:port]` from a vault URL: https only, no credentials, path (other than `/`),
/// query or fragment. The host is lower-cased and a default port dropped by the URL parser.
fn normalize_vault_url(raw: &str) -> Result<String, BackendError> {
    let refuse = |why: &str| {
        BackendError::misconfigured(
            NAME,
            format!(
                "invalid vault URL '{}': {why} (expected e.g. https://my-vault.vault.azure.net)",
                printable(raw)
            ),
        )
    };
    let url = Url::parse(raw.trim()).map_err(|_| refuse("not a URL"))?;
    if url.scheme() != "https" {
        return Err(refuse("Key Vault needs https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse("it must not contain credentials"));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(refuse("it must not have a path"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(refuse("it must not have a query or fragment"));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| refuse("no host"))?;
    Ok(match url.port() {
        Some(port) => format!("https://{host}:{port}"),
        None => format!("https://{host}"),
    })
}

/// Key Vault key names: 1 to 127 ASCII letters, digits and dashes. Checked because the SDK
/// pastes the name into the request path unescaped.
fn validate_key_name(name: &str) -> Result<(), BackendError> {
    if (1..=127).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Ok(())
    } else {
        Err(BackendError::misconfigured(
            NAME,
            format!(
                "invalid key name '{}': Key Vault key names are 1 to 127 letters, digits and dashes",
                printable(name)
            ),
        ))
    }
}

/// Key Vault key versions are 32 hex digits; accept 1 to 64 ASCII letters and digits (they go
/// into the request path unescaped).
fn is_valid_version(version: &str) -> bool {
    (1..=64).contains(&version.len()) && version.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

/// A value from outside (a reference or key id) for a message: at most 300 characters,
/// control characters replaced.
fn printable(s: &str) -> String {
    phiseal::kms::printable(s, 300)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    Wrap,
    Unwrap,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Get => "GetKey",
            Op::Wrap => "WrapKey",
            Op::Unwrap => "UnwrapKey",
        })
    }
}

/// The cause of an SDK error as text, kept as `source()` instead of the SDK error: the SDK
/// error's `Debug` form contains the raw HTTP response.
#[derive(Debug)]
struct Cause(String);

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cause {}

/// One line describing an SDK error: the HTTP status and Key Vault's error code if any, then
/// the messages of the whole cause chain (the outermost alone often says only "non-transport
/// error occurred which will not be retried"). The SDK never puts tokens, secrets or request
/// bodies into these messages; error response bodies carry no key material. Capped in length.
fn cause_text(err: &azure_core::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    match err.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => parts.push(format!(
            "HTTP {} {}",
            u16::from(*status),
            error_code.as_deref().unwrap_or("(no error code)")
        )),
        // "Connection", "Io", "Credential", "DataConversion", "Other".
        kind => parts.push(format!("{kind} error")),
    }
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !parts.contains(&text) {
            parts.push(text);
        }
        current = e.source();
    }
    phiseal::kms::printable(&parts.join(": "), MAX_CAUSE_LEN)
}

/// Maps an SDK error to a [`BackendError`] naming the backend, the operation, the vault and
/// key, and the cause.
fn sdk_error(err: &azure_core::Error, op: Op, what: &str) -> BackendError {
    let kind = match err.kind() {
        // The vault's or the identity endpoint's: no outage that stale keys may bridge.
        _ if certificate_rejected(err) => BackendErrorKind::Misconfigured,
        // This host refused the connection (a firewall rule answering EPERM): on purpose.
        _ if phiseal::kms::caused_by_permission_denied(err) => BackendErrorKind::Misconfigured,
        ErrorKind::Credential => classify_credential(err),
        kind => classify(op, kind),
    };
    let hint = match kind {
        _ if certificate_rejected(err) => {
            " (the server's TLS certificate was rejected: check the vault URL and authority \
             host, a TLS-intercepting proxy, and the trust store)"
        }
        BackendErrorKind::Unavailable => " (Key Vault is unreachable or overloaded, retry later)",
        BackendErrorKind::Denied => {
            " (check the credential, that the key version is enabled, and that this identity \
             may use the key: keys/get, keys/wrapKey, keys/unwrapKey)"
        }
        BackendErrorKind::InvalidData => {
            " (the wrapped key was not made by this key version or is damaged)"
        }
        BackendErrorKind::Misconfigured => {
            " (check the vault URL, the key name and the key's type and permitted operations)"
        }
        _ => "",
    };
    // `BackendError`'s Display appends the source: "<message>: <cause>".
    BackendError::new(kind, format!("{NAME}: {op} with {what} failed{hint}"))
        .with_source(Cause(cause_text(err)))
}

/// Whether the TLS handshake rejected the server's certificate (or got none): a wrong vault
/// URL or authority host, a TLS-intercepting proxy, a CA missing from the trust store — a
/// configuration problem (or an attack), never an outage.
fn certificate_rejected(err: &azure_core::Error) -> bool {
    matches!(
        phiseal::kms::find_cause::<rustls::Error>(err),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    )
}

/// A failure to obtain a token (azure_identity reports them all as `Credential`): a
/// configuration problem if a local file could not be read (a missing or forbidden
/// workload-identity token file); an outage if what failed underneath was the network or an
/// overloaded identity endpoint (connection, I/O, HTTP 408, 429 or 5xx); else a refusal (a
/// wrong secret, a disabled principal, an unknown tenant).
fn classify_credential(err: &azure_core::Error) -> BackendErrorKind {
    if phiseal::kms::caused_by_local_file_error(err) {
        return BackendErrorKind::Misconfigured;
    }
    let mut current = std::error::Error::source(err);
    while let Some(e) = current {
        let outage = e.is::<std::io::Error>()
            || e.downcast_ref::<azure_core::Error>().is_some_and(|inner| {
                !matches!(inner.kind(), ErrorKind::Credential)
                    && classify(Op::Get, inner.kind()) == BackendErrorKind::Unavailable
            });
        if outage {
            return BackendErrorKind::Unavailable;
        }
        current = e.source();
    }
    BackendErrorKind::Denied
}

fn classify(op: Op, kind: &ErrorKind) -> BackendErrorKind {
    match kind {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => match *status {
            // Only Key Vault's "this input cannot be unwrapped" says the record is bad; any
            // other 400 (an unsupported algorithm or API version) is not the record's fault.
            StatusCode::BadRequest
                if op == Op::Unwrap && error_code.as_deref() == Some("BadParameter") =>
            {
                BackendErrorKind::InvalidData
            }
            StatusCode::BadRequest if op == Op::Unwrap => BackendErrorKind::Other,
            StatusCode::BadRequest | StatusCode::NotFound => BackendErrorKind::Misconfigured,
            StatusCode::Unauthorized | StatusCode::Forbidden => BackendErrorKind::Denied,
            StatusCode::RequestTimeout | StatusCode::TooManyRequests => {
                BackendErrorKind::Unavailable
            }
            s if u16::from(s) >= 500 => BackendErrorKind::Unavailable,
            _ => BackendErrorKind::Other,
        },
        ErrorKind::Io | ErrorKind::Connection => BackendErrorKind::Unavailable,
        ErrorKind::Credential => BackendErrorKind::Denied,
        _ => BackendErrorKind::Other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_this_host_refuses_fails_closed_and_a_refused_one_is_an_outage() {
        let connect_error = |io: std::io::Error| {
            sdk_error(
                &azure_core::Error::new(ErrorKind::Io, io),
                Op::Unwrap,
                "phiseal-root",
            )
            .kind()
        };
        // EPERM: what connect() gets from a firewall rule dropping the host's own output.
        assert_eq!(
            connect_error(std::io::Error::from_raw_os_error(1)),
            BackendErrorKind::Misconfigured
        );
        assert_eq!(
            connect_error(std::io::ErrorKind::ConnectionRefused.into()),
            BackendErrorKind::Unavailable
        );
    }

    #[test]
    fn vault_urls() {
        let ok = |s: &str| normalize_vault_url(s).unwrap_or_else(|e| format!("ERR {e}"));
        assert_eq!(ok("https://v.vault.azure.net"), "https://v.vault.azure.net");
        assert_eq!(
            ok("https://V.Vault.Azure.NET/"),
            "https://v.vault.azure.net"
        );
        assert_eq!(
            ok("https://v.vault.azure.net:443/"),
            "https://v.vault.azure.net"
        );
        assert_eq!(ok("https://127.0.0.1:8443/"), "https://127.0.0.1:8443");
        for bad in [
            "",
            "v.vault.azure.net",
            "http://v.vault.azure.net",
            "https://v.vault.azure.net/keys",
            "https://v.vault.azure.net/?a=b",
            "https://u:p@v.vault.azure.net",
        ] {
            let err = normalize_vault_url(bad).err().map(|e| e.kind());
            assert_eq!(err, Some(BackendErrorKind::Misconfigured), "{bad}");
        }
    }

    #[test]
    fn key_names_and_versions() {
        assert!(validate_key_name("phiseal-kek-1").is_ok());
        for bad in ["", "a/b", "a?b", "a b", "é", &"a".repeat(128)] {
            assert!(validate_key_name(bad).is_err(), "{bad}");
        }
        assert!(is_valid_version("0123456789abcdef0123456789abcdef"));
        for bad in ["", "a/b", "..", "a?x", &"a".repeat(65)] {
            assert!(!is_valid_version(bad), "{bad}");
        }
    }

    #[test]
    fn classification() {
        use BackendErrorKind as K;
        let http = |status| ErrorKind::HttpResponse {
            status,
            error_code: None,
            raw_response: None,
        };
        let bad_parameter = ErrorKind::HttpResponse {
            status: StatusCode::BadRequest,
            error_code: Some("BadParameter".into()),
            raw_response: None,
        };
        // Only BadParameter from unwrapKey blames the record; another 400 does not.
        assert_eq!(classify(Op::Unwrap, &bad_parameter), K::InvalidData);
        assert_eq!(
            classify(Op::Unwrap, &http(StatusCode::BadRequest)),
            K::Other
        );
        assert_eq!(
            classify(Op::Wrap, &http(StatusCode::BadRequest)),
            K::Misconfigured
        );
        assert_eq!(
            classify(Op::Get, &http(StatusCode::NotFound)),
            K::Misconfigured
        );
        assert_eq!(
            classify(Op::Wrap, &http(StatusCode::Unauthorized)),
            K::Denied
        );
        assert_eq!(
            classify(Op::Unwrap, &http(StatusCode::Forbidden)),
            K::Denied
        );
        assert_eq!(
            classify(Op::Wrap, &http(StatusCode::TooManyRequests)),
            K::Unavailable
        );
        assert_eq!(
            classify(Op::Wrap, &http(StatusCode::ServiceUnavailable)),
            K::Unavailable
        );
        assert_eq!(classify(Op::Wrap, &http(StatusCode::Conflict)), K::Other);
        assert_eq!(classify(Op::Get, &ErrorKind::Connection), K::Unavailable);
        assert_eq!(classify(Op::Get, &ErrorKind::Io), K::Unavailable);
        assert_eq!(classify(Op::Get, &ErrorKind::Credential), K::Denied);
        assert_eq!(classify(Op::Get, &ErrorKind::DataConversion), K::Other);
        // Token failures: a refusal unless the identity endpoint was unreachable or overloaded.
        let token_failure = |inner: azure_core::Error| {
            azure_core::Error::with_error(ErrorKind::Credential, inner, "get_token failed")
        };
        let refused = azure_core::Error::with_message(
            http(StatusCode::Unauthorized),
            "AADSTS7000215: invalid client secret",
        );
        assert_eq!(classify_credential(&token_failure(refused)), K::Denied);
        assert_eq!(
            classify_credential(&azure_core::Error::with_message(
                ErrorKind::Credential,
                "no credential"
            )),
            K::Denied
        );
        for outage in [
            azure_core::Error::with_message(http(StatusCode::ServiceUnavailable), "IMDS busy"),
            azure_core::Error::with_message(http(StatusCode::TooManyRequests), "throttled"),
            azure_core::Error::new(
                ErrorKind::Io,
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
            ),
            azure_core::Error::with_message(ErrorKind::Connection, "reset"),
        ] {
            let shown = outage.to_string();
            assert_eq!(
                classify_credential(&token_failure(outage)),
                K::Unavailable,
                "{shown}"
            );
        }
        // A token file that is missing or not readable: configuration, not an outage.
        for kind in [
            std::io::ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied,
        ] {
            let unreadable = azure_core::Error::new(
                ErrorKind::Io,
                std::io::Error::new(kind, "AZURE_FEDERATED_TOKEN_FILE"),
            );
            assert_eq!(
                classify_credential(&token_failure(unreadable)),
                K::Misconfigured,
                "{kind:?}"
            );
        }
    }

    #[derive(Debug)]
    struct NoToken;

    #[async_trait]
    impl TokenCredential for NoToken {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            Err(azure_core::Error::with_message(
                ErrorKind::Credential,
                "none",
            ))
        }
    }

    fn offline(vault: &str, key_name: &str) -> AzureKeyVaultKms {
        let client = KeyClient::new(vault, Arc::new(NoToken), None).unwrap();
        AzureKeyVaultKms {
            client: Arc::new(client),
            kid_prefix: format!("{vault}/keys/{key_name}/"),
            vault: vault.to_owned(),
            key_name: key_name.to_owned(),
            algorithm: WrapAlgorithm::RsaOaep256,
        }
    }

    #[test]
    fn response_key_ids() {
        let kms = offline("https://v.vault.azure.net", "kek");
        let v = "0123456789abcdef0123456789abcdef";
        for ok in [
            format!("https://v.vault.azure.net/keys/kek/{v}"),
            format!("https://V.VAULT.azure.net/keys/kek/{v}"),
            format!("https://v.vault.azure.net:443/keys/kek/{v}"),
        ] {
            assert_eq!(kms.version_of_response_kid(&ok).as_deref(), Some(v), "{ok}");
        }
        for bad in [
            String::new(),
            format!("http://v.vault.azure.net/keys/kek/{v}"),
            format!("https://w.vault.azure.net/keys/kek/{v}"),
            format!("https://v.vault.azure.net:8443/keys/kek/{v}"),
            format!("https://v.vault.azure.net/keys/KEK/{v}"),
            format!("https://v.vault.azure.net/keys/kek2/{v}"),
            format!("https://v.vault.azure.net/secrets/kek/{v}"),
            format!("https://v.vault.azure.net/keys/kek/{v}/x"),
            format!("https://v.vault.azure.net/keys/kek/{v}?api-version=7.6"),
            format!("https://u@v.vault.azure.net/keys/kek/{v}"),
            "https://v.vault.azure.net/keys/kek/".to_owned(),
            "https://v.vault.azure.net/keys/kek".to_owned(),
        ] {
            assert_eq!(kms.version_of_response_kid(&bad), None, "{bad}");
        }
        // References are compared strictly: only the canonical form this backend writes.
        assert!(kms.can_unwrap(&format!("azure-kv:https://v.vault.azure.net/keys/kek/{v}")));
        assert!(!kms.can_unwrap(&format!("azure-kv:https://V.vault.azure.net/keys/kek/{v}")));
        assert!(!kms.can_unwrap(&format!("azure-kv:https://v.vault.azure.net/keys/kek/{v}/")));
    }

    #[test]
    fn client_secret_is_not_in_debug() {
        let config = AzureCredentialConfig::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: SecretString::from("hunter2-secret"),
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
