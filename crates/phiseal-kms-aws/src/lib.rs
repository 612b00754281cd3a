//! # phiseal-kms-aws — tenant keys wrapped by an AWS KMS key
//!
//! [`AwsKms`] is a [`Kms`] backend whose root key is a symmetric AWS KMS key
//! (`SYMMETRIC_DEFAULT`, key usage `ENCRYPT_DECRYPT`). The root key never leaves KMS.
//!
//! ## What it does
//! - **Pinned key.** [`AwsKms::connect`] / [`AwsKms::from_client`] resolve the configured key id,
//!   key ARN or alias once with `DescribeKey` and pin the instance to that key's ARN. An alias
//!   that is later pointed at another key takes effect when the backend is built again.
//! - **Wrap** is KMS `Encrypt` of the 32-byte tenant key under the pinned key with the
//!   encryption context `{"phiseal:tenant": <tenant>, "phiseal:version": <version>,
//!   "phiseal:purpose": "tenant-key"}`. KMS authenticates the context (AES-GCM AAD), so a
//!   wrapped key moved to another tenant or version does not unwrap. The root-key reference is
//!   `aws-kms:` followed by the key ARN that KMS reports in the `Encrypt` response, so every
//!   wrap records the exact key that made it. Automatic KMS key rotation keeps the ARN; KMS
//!   keeps the old key material and decrypts old wraps transparently.
//! - **Unwrap** refuses (as [`BackendErrorKind::InvalidData`]) a wrapped key whose reference is
//!   not `aws-kms:<ARN of the pinned key>`, without calling KMS: an instance only ever uses its
//!   own key. Otherwise it calls `Decrypt` with `KeyId` = that ARN and the same encryption
//!   context, checks that the `KeyId` in the response is that ARN, and that the plaintext is
//!   exactly 32 bytes. To unwrap keys wrapped under another KMS key (provider migration,
//!   retargeted alias), build a second `AwsKms` for that key.
//!
//! ## Transport
//! Requests go over https only, or plain http to a loopback address (a local emulator): an
//! interceptor checks the URI of every request after the SDK resolved the endpoint (config,
//! `AWS_ENDPOINT_URL_KMS`, profile) and refuses anything else as `Misconfigured` before it is
//! sent. `Encrypt` and `Decrypt` carry tenant keys; SigV4 signs but does not encrypt.
//!
//! ## Resilience
//! Every call has an operation timeout of [`OPERATION_TIMEOUT`] (all attempts together), an
//! attempt timeout of [`ATTEMPT_TIMEOUT`] and a connect timeout of [`CONNECT_TIMEOUT`]. The
//! SDK's *standard* retry mode retries throttling, 5xx responses, timeouts and connection
//! failures, up to 3 attempts with exponential backoff and full jitter; other errors are not
//! retried. When all attempts fail the error is [`BackendErrorKind::Unavailable`] and its
//! message names the backend (`aws-kms`), the operation, the key and the cause. The SDK
//! resolves credentials inside each attempt; [`AwsKms::connect`] (through
//! [`AwsKms::from_sdk_config`]) runs a credentials refresh in a task of its own, so an attempt
//! that times out during a slow refresh does not cancel it and the next attempt joins it
//! (`detached.rs`).
//!
//! ## Error mapping
//! | KMS says | kind |
//! |---|---|
//! | `InvalidCiphertextException`, `IncorrectKeyException`; `AccessDeniedException` from `Decrypt` with no message (moto's answer for a ciphertext made by another key) | `InvalidData` |
//! | other `AccessDeniedException` (IAM / key policy / grants, including *the ciphertext refers to a customer master key that does not exist … or you are not allowed to access*), `DisabledException`, `KMSInvalidStateException`, invalid or expired credentials, a credentials provider that refuses (role trust policy, rejected web-identity token) | `Denied` |
//! | throttling, `KMSInternalException`, `DependencyTimeoutException`, `KeyUnavailableException`, any 5xx, timeouts, connection failures, a credentials provider that cannot be reached, times out or answers throttled / 429 / 5xx (STS incl. `IDPCommunicationError`, instance metadata, the ECS / EKS agent; `credentials.rs`) | `Unavailable` |
//! | `NotFoundException`, `InvalidKeyUsageException`, `InvalidArnException`, a request that cannot be built, no credentials configured | `Misconfigured` |
//! | anything else | `Other` |
//!
//! ## Permissions
//! The principal needs `kms:DescribeKey`, `kms:Encrypt` and `kms:Decrypt` on the key, ideally
//! restricted with a `kms:EncryptionContext:phiseal:purpose` = `tenant-key` condition.
//!
//! ## Key material in memory
//! The tenant key handed to `Encrypt` is copied into the SDK's request (a `Blob` and then its
//! base64 JSON body), and `Decrypt`'s plaintext passes through the SDK's response buffers.
//! Those SDK-internal copies are freed but **not zeroized**: the SDK offers no hook for it. The
//! copy this crate receives from `Decrypt` is moved into a zeroizing buffer, copied into a
//! [`TenantKey`] and wiped. Error messages never contain key bytes or wrapped bytes.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::{BackendError, BackendErrorKind, TENANT_KEY_LEN, TenantKey};
use zeroize::Zeroizing;

mod credentials;
mod detached;
mod https_only;
#[cfg(feature = "testkit")]
pub mod testkit;

/// The backend's name, as returned by [`Kms::name`] and used in every error message.
pub const NAME: &str = "aws-kms";
/// Prefix of every root-key reference made by this backend; the key ARN follows it.
pub const REF_PREFIX: &str = "aws-kms:";
/// Limit for one KMS call, all retry attempts included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for one attempt of a KMS call.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Limit for establishing a connection to the KMS endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Maximum attempts per call in the SDK's standard retry mode (first try included).
pub const MAX_ATTEMPTS: u32 = 3;
/// KMS's limit on the size of a ciphertext blob.
const MAX_CIPHERTEXT_LEN: usize = 6144;

/// Encryption-context key naming the tenant.
pub const CONTEXT_TENANT: &str = "phiseal:tenant";
/// Encryption-context key naming the tenant key version.
pub const CONTEXT_VERSION: &str = "phiseal:version";
/// Encryption-context key naming the purpose; its value is [`PURPOSE`].
pub const CONTEXT_PURPOSE: &str = "phiseal:purpose";
/// The value of [`CONTEXT_PURPOSE`].
pub const PURPOSE: &str = "tenant-key";

/// Where the root key is and how to reach KMS. Credentials come from the standard AWS chain
/// (environment, shared config/credentials files, web identity / IRSA, ECS and EC2 instance
/// metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKmsConfig {
    /// The KMS key: key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    /// The AWS region of the key, e.g. `eu-central-1`.
    pub region: String,
    /// A custom endpoint (VPC endpoint, FIPS endpoint, or an emulator in tests). `None` uses
    /// the standard endpoint of the region. Must be https, or plain http to a loopback
    /// address.
    pub endpoint_url: Option<String>,
}

/// A KMS backend whose root key is a symmetric AWS KMS key. See the crate documentation.
///
/// Its `Debug` output shows the key ARN and region, never credentials or key bytes.
#[derive(Clone)]
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    /// The ARN of the pinned key.
    key_arn: String,
    /// `aws-kms:<key_arn>`.
    root_key_ref: String,
}

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("key_arn", &self.key_arn)
            .field("region", &self.client.config().region().map(|r| r.as_ref()))
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    /// Builds the SDK client from `config` and the standard credential chain, applies this
    /// crate's timeouts and retry policy, and pins the key with `DescribeKey`.
    ///
    /// Fails with `Misconfigured` if the key does not exist or is not a symmetric
    /// encrypt/decrypt key, `Denied` if the principal may not describe it, `Unavailable` if
    /// KMS cannot be reached.
    pub async fn connect(config: &AwsKmsConfig) -> Result<AwsKms, BackendError> {
        if config.key_id.trim().is_empty() {
            return Err(BackendError::misconfigured(
                NAME,
                "the key id is empty: set the KMS key id, ARN or alias",
            ));
        }
        if config.region.trim().is_empty() {
            return Err(BackendError::misconfigured(
                NAME,
                "the region is empty: set the AWS region of the KMS key",
            ));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(timeout_config())
            .retry_config(retry_config());
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk_config = loader.load().await;
        Self::from_sdk_config(&sdk_config, &config.key_id).await
    }

    /// Builds the client from `sdk_config` (its region, endpoint and credentials provider)
    /// and pins `key_id` like [`AwsKms::from_client`]. The credentials provider is wrapped so
    /// that a refresh runs in a task of its own: a KMS attempt that times out
    /// ([`ATTEMPT_TIMEOUT`]) while credentials are being refreshed (STS on a slow day) does
    /// not cancel the refresh, and the next attempt waits for the same one instead of
    /// starting over. [`AwsKms::connect`] goes through here.
    pub async fn from_sdk_config(
        sdk_config: &aws_config::SdkConfig,
        key_id: &str,
    ) -> Result<AwsKms, BackendError> {
        let mut builder = aws_sdk_kms::config::Builder::from(sdk_config);
        if let Some(credentials) = sdk_config.credentials_provider() {
            builder = builder.credentials_provider(detached::DetachedCredentials::new(credentials));
        }
        Self::from_client(aws_sdk_kms::Client::from_conf(builder.build()), key_id).await
    }

    /// Uses an existing SDK client (its region, endpoint and credentials), with this crate's
    /// timeouts and retry policy applied on top, and pins `key_id` (key id, ARN or alias) with
    /// `DescribeKey`. Errors as for [`AwsKms::connect`].
    pub async fn from_client(
        client: aws_sdk_kms::Client,
        key_id: &str,
    ) -> Result<AwsKms, BackendError> {
        let conf = client
            .config()
            .to_builder()
            .timeout_config(timeout_config())
            .retry_config(retry_config())
            .interceptor(https_only::HttpsOnly)
            .build();
        let client = aws_sdk_kms::Client::from_conf(conf);
        let described = client
            .describe_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| sdk_error(e, Op::DescribeKey, key_id))?;
        let meta = described.key_metadata().ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Other,
                format!("{NAME}: DescribeKey of key '{key_id}' returned no key metadata"),
            )
        })?;
        let key_arn = meta.arn().unwrap_or_default().to_owned();
        if !is_key_arn(&key_arn) {
            return Err(BackendError::new(
                BackendErrorKind::Other,
                format!(
                    "{NAME}: DescribeKey of key '{key_id}' returned no valid key ARN \
                     ('{key_arn}')"
                ),
            ));
        }
        // An absent field is accepted: real KMS always sends both, moto omits `KeyUsage`.
        // A wrong key type would fail on the first Encrypt anyway; this only fails earlier.
        if meta
            .key_spec()
            .is_some_and(|s| *s != KeySpec::SymmetricDefault)
            || meta
                .key_usage()
                .is_some_and(|u| *u != KeyUsageType::EncryptDecrypt)
        {
            return Err(BackendError::misconfigured(
                NAME,
                format!(
                    "key '{key_arn}' has key spec {:?} and usage {:?}: phiseal needs a \
                     SYMMETRIC_DEFAULT key with usage ENCRYPT_DECRYPT",
                    meta.key_spec().map(|s| s.as_str()),
                    meta.key_usage().map(|u| u.as_str()),
                ),
            ));
        }
        Ok(AwsKms {
            client,
            root_key_ref: format!("{REF_PREFIX}{key_arn}"),
            key_arn,
        })
    }

    /// The ARN of the KMS key this instance is pinned to.
    pub fn key_arn(&self) -> &str {
        &self.key_arn
    }

    /// The reference this instance writes into [`WrappedKey::root_key_ref`]: `aws-kms:<ARN>`.
    pub fn root_key_ref(&self) -> &str {
        &self.root_key_ref
    }
}

#[async_trait]
impl Kms for AwsKms {
    fn name(&self) -> &str {
        NAME
    }

    /// `aws-kms:<ARN>`: KMS's automatic key rotation keeps the ARN (and decrypts old wraps
    /// itself), so the reference only changes when the backend is built for another key.
    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        Ok(self.root_key_ref.clone())
    }

    /// Only the pinned key's ARN (see the crate documentation).
    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        root_key_ref == self.root_key_ref
    }

    async fn wrap(
        &self,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, BackendError> {
        let version = binding.version.to_string();
        let out = self
            .client
            .encrypt()
            .key_id(&self.key_arn)
            // The SDK owns (and does not zeroize) this copy; see the crate documentation.
            .plaintext(Blob::new(key.expose().to_vec()))
            .encryption_context(CONTEXT_TENANT, binding.tenant.as_str())
            .encryption_context(CONTEXT_VERSION, version)
            .encryption_context(CONTEXT_PURPOSE, PURPOSE)
            .send()
            .await
            .map_err(|e| sdk_error(e, Op::Encrypt, &self.key_arn))?;
        let returned = out.key_id.unwrap_or_default();
        if returned != self.key_arn {
            return Err(BackendError::new(
                BackendErrorKind::Other,
                format!(
                    "{NAME}: Encrypt under key '{}' for tenant '{}' version {} answered with \
                     key '{returned}': refusing the wrap",
                    self.key_arn, binding.tenant, binding.version
                ),
            ));
        }
        let ciphertext = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Other,
                    format!(
                        "{NAME}: Encrypt under key '{}' for tenant '{}' version {} returned no \
                         ciphertext",
                        self.key_arn, binding.tenant, binding.version
                    ),
                )
            })?;
        Ok(WrappedKey {
            root_key_ref: format!("{REF_PREFIX}{returned}"),
            ciphertext,
        })
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError> {
        if wrapped.root_key_ref != self.root_key_ref {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "wrapped key for tenant '{}' version {} was made by root key '{}', but \
                     this backend uses '{}': configure a backend for that key to unwrap it",
                    binding.tenant, binding.version, wrapped.root_key_ref, self.root_key_ref
                ),
            )
            .refused_before_calling());
        }
        if wrapped.ciphertext.is_empty() || wrapped.ciphertext.len() > MAX_CIPHERTEXT_LEN {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "wrapped key for tenant '{}' version {} is {} bytes long, expected 1 to \
                     {MAX_CIPHERTEXT_LEN}: the key store record is damaged",
                    binding.tenant,
                    binding.version,
                    wrapped.ciphertext.len()
                ),
            )
            .refused_before_calling());
        }
        let out = self
            .client
            .decrypt()
            .key_id(&self.key_arn)
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .encryption_context(CONTEXT_TENANT, binding.tenant.as_str())
            .encryption_context(CONTEXT_VERSION, binding.version.to_string())
            .encryption_context(CONTEXT_PURPOSE, PURPOSE)
            .send()
            .await
            .map_err(|e| sdk_error(e, Op::Decrypt, &self.key_arn))?;
        // Take the plaintext out of the response first, so that it is wiped on every path.
        let plaintext = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        let returned = out.key_id.unwrap_or_default();
        if returned != self.key_arn {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "Decrypt with key '{}' for tenant '{}' version {} answered with key \
                     '{returned}': refusing the result",
                    self.key_arn, binding.tenant, binding.version
                ),
            ));
        }
        if plaintext.len() != TENANT_KEY_LEN {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "Decrypt with key '{}' for tenant '{}' version {} returned {} bytes, \
                     expected {TENANT_KEY_LEN}: the wrapped key is not a phiseal tenant key",
                    self.key_arn,
                    binding.tenant,
                    binding.version,
                    plaintext.len()
                ),
            ));
        }
        TenantKey::from_slice(plaintext.as_slice()).ok_or_else(|| {
            BackendError::invalid_data(
                NAME,
                format!(
                    "Decrypt with key '{}' returned a plaintext that is not a tenant key",
                    self.key_arn
                ),
            )
        })
    }
}

fn timeout_config() -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_timeout(OPERATION_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
}

fn retry_config() -> RetryConfig {
    RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS)
}

/// `arn:<partition>:kms:<region>:<account>:key/<id>`.
fn is_key_arn(s: &str) -> bool {
    let mut parts = s.splitn(6, ':');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("arn"), Some(p), Some("kms"), Some(r), Some(a), Some(res))
            if !p.is_empty() && !r.is_empty() && !a.is_empty()
                && res.strip_prefix("key/").is_some_and(|id| !id.is_empty())
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    DescribeKey,
    Encrypt,
    Decrypt,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::DescribeKey => "DescribeKey",
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
        })
    }
}

/// The SDK error as `source()`, displayed with its whole cause chain (the SDK's own `Display`
/// says only "service error" or "dispatch failure").
struct SdkCause {
    text: String,
    inner: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl fmt::Debug for SdkCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for SdkCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for SdkCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.inner.as_ref())
    }
}

/// The kind and description of a failure to obtain credentials, if `err` is one (anywhere in
/// its chain of causes).
fn credentials_failure(
    err: &(dyn std::error::Error + 'static),
) -> Option<(BackendErrorKind, String)> {
    use aws_credential_types::provider::error::CredentialsError;
    let c = causes(err).find_map(|e| e.downcast_ref::<CredentialsError>())?;
    let (kind, what) = match c {
        CredentialsError::ProviderTimedOut(_) => (
            BackendErrorKind::Unavailable,
            "obtaining credentials timed out",
        ),
        CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => (
            BackendErrorKind::Misconfigured,
            "no usable credentials are configured",
        ),
        CredentialsError::ProviderError(_) if phiseal::kms::caused_by_local_file_error(c) => (
            BackendErrorKind::Misconfigured,
            "the credentials provider cannot read its token or credentials file (missing or \
             not readable)",
        ),
        CredentialsError::ProviderError(_) | CredentialsError::Unhandled(_)
            if credentials::transient(c) =>
        {
            (
                BackendErrorKind::Unavailable,
                "the credentials provider could not be reached, timed out or is overloaded",
            )
        }
        CredentialsError::ProviderError(_) => (
            BackendErrorKind::Denied,
            "the credentials provider refused (role, token or keys invalid, expired or \
                     not trusted)",
        ),
        _ => (BackendErrorKind::Other, "obtaining credentials failed"),
    };
    Some((kind, what.to_owned()))
}

/// `err` and its chain of causes.
pub(crate) fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// Whether the TLS handshake rejected the endpoint's certificate (or got none): a wrong
/// endpoint, a TLS-intercepting proxy, a CA missing from the trust store — a configuration
/// problem (or an attack), never an outage that stale keys may bridge.
pub(crate) fn certificate_rejected(err: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        phiseal::kms::find_cause::<rustls::Error>(err),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    )
}

/// The refusal of [`https_only::HttpsOnly`], if it is among the causes of `err`.
fn insecure_endpoint<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a https_only::InsecureEndpoint> {
    causes(err).find_map(|e| e.downcast_ref::<https_only::InsecureEndpoint>())
}

/// Maps an SDK error to a [`BackendError`] naming the backend, the operation, the key and the
/// cause. Request and response bodies (and so key bytes) are never part of SDK error text.
fn sdk_error<E>(
    err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
    op: Op,
    key: &str,
) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (kind, what) = match &err {
        SdkError::TimeoutError(_) => (
            BackendErrorKind::Unavailable,
            format!("timed out (limit {OPERATION_TIMEOUT:?} for all attempts)"),
        ),
        SdkError::DispatchFailure(d) if d.is_timeout() => (
            BackendErrorKind::Unavailable,
            "timed out connecting or waiting for the response".to_owned(),
        ),
        SdkError::DispatchFailure(_) if certificate_rejected(&err) => (
            BackendErrorKind::Misconfigured,
            "the KMS endpoint's TLS certificate was rejected (a wrong endpoint_url, a \
             TLS-intercepting proxy, or its CA missing from the trust store)"
                .to_owned(),
        ),
        // (A connection error: a credentials file the provider cannot read is a credentials
        // failure, below.)
        SdkError::DispatchFailure(d)
            if d.is_io() && phiseal::kms::caused_by_permission_denied(&err) =>
        {
            (
                BackendErrorKind::Misconfigured,
                "this host refused the connection to the KMS endpoint (permission denied: a \
             firewall rule or security policy)"
                    .to_owned(),
            )
        }
        SdkError::DispatchFailure(d) if d.is_io() => (
            BackendErrorKind::Unavailable,
            "could not connect to the KMS endpoint".to_owned(),
        ),
        // Refused before it was sent: the endpoint is plain http to another machine.
        SdkError::DispatchFailure(_) if insecure_endpoint(&err).is_some() => (
            BackendErrorKind::Misconfigured,
            insecure_endpoint(&err).map_or_else(String::new, ToString::to_string),
        ),
        SdkError::DispatchFailure(d) if d.is_user() => (
            BackendErrorKind::Misconfigured,
            "the request could not be sent (check endpoint, region and credentials)".to_owned(),
        ),
        // Obtaining credentials failed (the SDK reports it as a dispatch failure of no
        // particular kind): a refused or missing credential is no outage.
        SdkError::DispatchFailure(_) => credentials_failure(&err).unwrap_or_else(|| {
            (
                BackendErrorKind::Unavailable,
                "the request could not be sent".to_owned(),
            )
        }),
        SdkError::ResponseError(_) => (
            BackendErrorKind::Unavailable,
            "the response could not be read".to_owned(),
        ),
        SdkError::ConstructionFailure(_) => (
            BackendErrorKind::Misconfigured,
            "the request could not be built (check region, endpoint and credentials)".to_owned(),
        ),
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default();
            let status = s.raw().status().as_u16();
            let kind = classify(op, code, s.err().message().unwrap_or_default(), status);
            let code = if code.is_empty() {
                "unknown error"
            } else {
                code
            };
            (kind, format!("KMS answered {code} (HTTP {status})"))
        }
        _ => (BackendErrorKind::Other, "unexpected SDK error".to_owned()),
    };
    let hint = match kind {
        BackendErrorKind::Unavailable => "; KMS is unreachable or overloaded, retry later",
        BackendErrorKind::Denied => {
            "; check the key's state and that this principal may use it (IAM and key policy)"
        }
        BackendErrorKind::InvalidData => {
            "; the wrapped key does not belong to this tenant and version or was not made by \
             this key"
        }
        BackendErrorKind::Misconfigured => "; check the configured key id, region and endpoint",
        _ => "",
    };
    let text = cause_text(&err);
    BackendError::new(
        kind,
        format!("{NAME}: {op} with key '{key}' failed: {what}{hint}"),
    )
    .with_source(SdkCause {
        text,
        inner: Box::new(err),
    })
}

/// The most characters of a cause kept in an error message.
const MAX_CAUSE_LEN: usize = 600;

/// A one-line description of the cause, at most [`MAX_CAUSE_LEN`] characters, control
/// characters replaced: the chain can hold what a credential process printed on its stderr.
/// Not the SDK's `DisplayErrorContext`: that ends in the `Debug` form of the raw HTTP
/// response (headers and body).
fn cause_text<E>(err: &SdkError<E, aws_sdk_kms::config::http::HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    phiseal::kms::printable(&full_cause_text(err), MAX_CAUSE_LEN)
}

fn full_cause_text<E>(err: &SdkError<E, aws_sdk_kms::config::http::HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(s) = err {
        let meta = s.err();
        let mut text = meta.code().unwrap_or("unknown error").to_owned();
        if let Some(message) = meta.message().filter(|m| !m.is_empty()) {
            text.push_str(": ");
            text.push_str(message);
        }
        if let Some(id) = meta.meta().extra("aws_request_id") {
            text.push_str(&format!(" (request id {id})"));
        }
        return text;
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn classify(op: Op, code: &str, message: &str, status: u16) -> BackendErrorKind {
    match code {
        "InvalidCiphertextException" | "IncorrectKeyException" => BackendErrorKind::InvalidData,
        // moto reports a Decrypt whose KeyId is not the key that made the ciphertext as
        // AccessDeniedException without a message (real AWS: IncorrectKeyException). A real
        // denial always carries a message and stays Denied — also "The ciphertext refers to a
        // customer master key that does not exist, does not exist in this region, or you are
        // not allowed to access": AWS answers so when a key policy or grant does not let this
        // principal decrypt (e.g. after an account move), which is no tampered key record.
        "AccessDeniedException" if op == Op::Decrypt && message.is_empty() => {
            BackendErrorKind::InvalidData
        }
        "AccessDeniedException"
        | "DisabledException"
        | "KMSInvalidStateException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "InvalidGrantTokenException" => BackendErrorKind::Denied,
        _ if transient_answer(code, status) => BackendErrorKind::Unavailable,
        "NotFoundException" | "InvalidKeyUsageException" | "InvalidArnException" => {
            BackendErrorKind::Misconfigured
        }
        _ => BackendErrorKind::Other,
    }
}

/// Whether an AWS service's error answer (its code and HTTP status) says "later": throttled,
/// overloaded, an internal or upstream failure (KMS, and STS when it refreshes credentials).
pub(crate) fn transient_answer(code: &str, status: u16) -> bool {
    matches!(
        code,
        "ThrottlingException"
            | "Throttling"
            | "ThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "KMSInternalException"
            | "DependencyTimeoutException"
            | "KeyUnavailableException"
            | "ServiceUnavailable"
            | "InternalFailure"
            // STS could not reach the web identity's issuer (its own docs: "often transient").
            | "IDPCommunicationError"
    ) || status >= 500
        || status == 429
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_this_host_refuses_fails_closed_and_a_refused_one_is_an_outage() {
        use aws_sdk_kms::operation::decrypt::DecryptError;
        use aws_smithy_runtime_api::client::result::ConnectorError;
        let connect_error = |io: std::io::Error| {
            let err: SdkError<DecryptError, aws_sdk_kms::config::http::HttpResponse> =
                SdkError::dispatch_failure(ConnectorError::io(Box::new(io)));
            sdk_error(err, Op::Decrypt, "arn:aws:kms:us-east-1:1:key/k").kind()
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
    fn key_arns() {
        assert!(is_key_arn(
            "arn:aws:kms:us-east-1:123456789012:key/8405448a-0000-0000-0000-000000000000"
        ));
        assert!(is_key_arn("arn:aws-us-gov:kms:us-gov-west-1:1:key/mrk-1"));
        for bad in [
            "",
            "8405448a",
            "alias/x",
            "arn:aws:kms:us-east-1:123456789012:alias/x",
            "arn:aws:kms:us-east-1:123456789012:key/",
            "arn:aws:s3:us-east-1:123456789012:key/x",
            "arn::kms:us-east-1:123456789012:key/x",
        ] {
            assert!(!is_key_arn(bad), "{bad}");
        }
    }

    #[test]
    fn classification() {
        use BackendErrorKind as K;
        let c = |op, code, msg, status| classify(op, code, msg, status);
        assert_eq!(
            c(Op::Decrypt, "InvalidCiphertextException", "", 400),
            K::InvalidData
        );
        assert_eq!(
            c(Op::Decrypt, "IncorrectKeyException", "", 400),
            K::InvalidData
        );
        // A key policy or grant that does not let this principal decrypt: a refusal, not
        // a tampered record.
        assert_eq!(
            c(
                Op::Decrypt,
                "AccessDeniedException",
                "The ciphertext refers to a customer master key that does not exist, …",
                400
            ),
            K::Denied
        );
        // moto's answer for a ciphertext of another key (real AWS: IncorrectKeyException).
        assert_eq!(
            c(Op::Decrypt, "AccessDeniedException", "", 400),
            K::InvalidData
        );
        assert_eq!(
            c(
                Op::Decrypt,
                "AccessDeniedException",
                "User: arn:aws:iam::1:user/x is not authorized to perform: kms:Decrypt",
                400
            ),
            K::Denied
        );
        assert_eq!(c(Op::Encrypt, "AccessDeniedException", "", 400), K::Denied);
        assert_eq!(c(Op::Encrypt, "DisabledException", "", 400), K::Denied);
        assert_eq!(
            c(Op::Decrypt, "KMSInvalidStateException", "", 400),
            K::Denied
        );
        assert_eq!(
            c(Op::Encrypt, "ThrottlingException", "", 400),
            K::Unavailable
        );
        assert_eq!(
            c(Op::Encrypt, "KMSInternalException", "", 500),
            K::Unavailable
        );
        assert_eq!(c(Op::Encrypt, "", "", 503), K::Unavailable);
        assert_eq!(
            c(Op::DescribeKey, "NotFoundException", "", 400),
            K::Misconfigured
        );
        assert_eq!(c(Op::Encrypt, "ValidationException", "", 400), K::Other);
    }
}
