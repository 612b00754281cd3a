//! The key store trait: persists wrapped tenant-key records, allocates versions by
//! compare-and-set. Implementations: an embedded SQLite file, later PostgreSQL.

use async_trait::async_trait;
use jiff::Timestamp;

use crate::context::TenantId;
use crate::error::BackendError;
use crate::kms::WrappedKey;

/// The lifecycle state of one tenant key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// The version new encryptions use. Exactly one per live tenant.
    Primary,
    /// Older version: decrypts (if not below the minimum decryption version), never encrypts.
    DecryptOnly,
    /// Shredded: the wrapped bytes are gone. Ciphertexts under it fail forever.
    Destroyed,
}

impl KeyState {
    /// Stable lower-case name, used in stores and output.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Primary => "primary",
            KeyState::DecryptOnly => "decrypt_only",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// Parses [`KeyState::as_str`] output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "primary" => Some(KeyState::Primary),
            "decrypt_only" => Some(KeyState::DecryptOnly),
            "destroyed" => Some(KeyState::Destroyed),
            _ => None,
        }
    }
}

/// One stored tenant key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Version number, from 1.
    pub version: u32,
    /// Lifecycle state.
    pub state: KeyState,
    /// The wrapped key; `None` once destroyed.
    pub wrapped: Option<WrappedKey>,
    /// Key-check MAC binding the unwrapped key to (tenant, version); see `docs/FORMAT.md` §6.
    pub key_check: [u8; 32],
    /// When this version was created.
    pub created_at: Timestamp,
}

impl KeyRecord {
    /// Why this record cannot be stored as a *new* key version (`create_tenant`,
    /// `insert_version`), or `None`: it must be primary and carry its wrapped key. Every
    /// store refuses such a record with [`crate::BackendErrorKind::InvalidData`].
    pub fn new_version_problem(&self) -> Option<&'static str> {
        if self.state != KeyState::Primary {
            Some("a new key version must be in state 'primary'")
        } else if self.wrapped.is_none() {
            Some("a new key version must carry its wrapped key")
        } else {
            None
        }
    }
}

/// Everything the store holds about one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// The tenant.
    pub tenant: TenantId,
    /// All versions, ascending.
    pub versions: Vec<KeyRecord>,
    /// Versions below this refuse to decrypt (1 = all allowed).
    pub min_decrypt_version: u32,
    /// Set once the tenant is shredded.
    pub shredded_at: Option<Timestamp>,
}

impl TenantRecord {
    /// The highest version number.
    pub fn latest_version(&self) -> u32 {
        self.versions.iter().map(|r| r.version).max().unwrap_or(0)
    }

    /// The record of `version`, if present.
    pub fn version(&self, version: u32) -> Option<&KeyRecord> {
        self.versions.iter().find(|r| r.version == version)
    }

    /// The primary version's record.
    pub fn primary(&self) -> Option<&KeyRecord> {
        self.versions.iter().find(|r| r.state == KeyState::Primary)
    }
}

/// Persistent storage of wrapped tenant keys. Must be safe for several processes (and, for
/// shared stores, several hosts) at once.
#[async_trait]
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// A short name for errors and audit records (`sqlite`, `postgres`).
    fn name(&self) -> &str;

    /// Creates a tenant with `first` (version 1, primary). Fails with
    /// [`crate::BackendErrorKind::Conflict`] if the tenant exists or ever existed.
    async fn create_tenant(&self, tenant: &TenantId, first: KeyRecord) -> Result<(), BackendError>;

    /// Loads a tenant; `None` if unknown.
    async fn load_tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, BackendError>;

    /// Compare-and-set rotation: inserts `next` (whose version must be `expected_latest + 1`) as
    /// primary and demotes the old primary to decrypt-only, atomically, only if the tenant's
    /// latest version is still `expected_latest` and it is not shredded. Otherwise fails with
    /// [`crate::BackendErrorKind::Conflict`] and changes nothing.
    async fn insert_version(
        &self,
        tenant: &TenantId,
        expected_latest: u32,
        next: KeyRecord,
    ) -> Result<(), BackendError>;

    /// Sets the minimum decryption version (1..=latest).
    async fn set_min_decrypt_version(
        &self,
        tenant: &TenantId,
        min: u32,
    ) -> Result<(), BackendError>;

    /// Shreds a tenant: every version becomes destroyed and its wrapped bytes are erased from
    /// storage (not only unlinked); the tombstone stays so the tenant id is never reused.
    async fn shred_tenant(&self, tenant: &TenantId, at: Timestamp) -> Result<(), BackendError>;

    /// Every tenant id, for root-key rotation and migration.
    async fn list_tenants(&self) -> Result<Vec<TenantId>, BackendError>;

    /// Replaces the wrapped bytes of one version (root-key rotation/migration) if they still
    /// equal `expected`; otherwise fails with [`crate::BackendErrorKind::Conflict`].
    async fn replace_wrapped(
        &self,
        tenant: &TenantId,
        version: u32,
        expected: &WrappedKey,
        replacement: WrappedKey,
    ) -> Result<(), BackendError>;
}
