//! # phiseal — per-tenant envelope encryption of PHI fields
//!
//! Every tenant has its own versioned 256-bit data key, stored only wrapped by a root key in a
//! KMS. Fields are encrypted with AES-256-GCM (or XChaCha20-Poly1305) under the tenant key,
//! authenticated against their context (tenant, field, optional record), in a compact
//! self-describing format (`docs/FORMAT.md`). Every access is written to an audit log.
//! Fields that must be found by value can be encrypted deterministically (AES-256-SIV) or
//! blind-indexed ([`search`], `docs/SEARCH.md`), with the leakage that implies.
//!
//! The parts are values handed to [`KeyringBuilder`]: a [`kms::Kms`] backend, a
//! [`store::KeyStore`], an [`audit::AuditSink`] and a [`crypto::CryptoProvider`].
//!
//! The README (`README.md`, compiled as a doctest by the `phiseal-examples` crate) shows a
//! complete program on the embedded default: local KMS, SQLite key store, file audit log.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit;
pub mod context;
pub mod crypto;
mod error;
mod field;
pub mod format;
mod keyring;
pub mod kms;
pub mod search;
mod secret;
pub mod store;
pub mod stream;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use audit::Actor;
pub use context::{EncryptionContext, TenantId};
pub use error::{BackendError, BackendErrorKind, BoxError, Error, FormatError};
pub use field::{EPOCH_MESSAGE_LIMIT, key_check};
pub use format::Algorithm;
pub use keyring::{
    AuditedStreamDecryptor, AuditedStreamEncryptor, CacheSettings, Caller, Keyring, KeyringBuilder,
    MinVersionGuard, Profile, RootKeyUsage, RootRewrapEvent, RootRewrapFailure, RootRewrapReport,
    STALE_RETRY_INTERVAL, TenantKeyring, TenantStatus, VersionStatus,
};
pub use search::{BlindIndexSpec, Normalization, SearchTerm};
pub use secret::{Plaintext, TENANT_KEY_LEN, TenantKey, reserve_wiped};
