//! The key store trait: persists wrapped tenant-key records, allocates versions by
//! compare-and-set. Implementations: an embedded SQLite file (`phiseal-store-sqlite`) and a
//! shared PostgreSQL database (`phiseal-store-postgres`).

use async_trait::async_trait;
use jiff::Timestamp;

use crate::context::TenantId;
use crate::error::{BackendError, BackendErrorKind};
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

/// One stored tenant key version. Its `Debug` leaves out the wrapped bytes (see
/// [`WrappedKey`]) and the key-check MAC.
#[derive(Clone, PartialEq, Eq)]
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

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("version", &self.version)
            .field("state", &self.state)
            .field("wrapped", &self.wrapped)
            .field("key_check", &format_args!("[32 bytes]"))
            .field("created_at", &self.created_at)
            .finish()
    }
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

/// A store operation refused because it would break a key-store invariant: an invalid new
/// record, an unknown or shredded tenant, a lost compare-and-set, an out-of-range minimum
/// decryption version. Every [`KeyStore`] refuses the same things with the same messages and
/// [`BackendErrorKind`]s; a store's own error type wraps this one.
///
/// Messages name the tenant and version and say what to do; they never contain wrapped or key
/// bytes. They do not name the store: the keyring adds its name
/// ([`crate::Error::Store`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreRefusal {
    /// The record passed in is not a valid new key version.
    #[error("refusing key record for tenant '{tenant}' version {version}: {reason}")]
    InvalidRecord {
        /// The tenant.
        tenant: TenantId,
        /// The version of the record.
        version: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// `create_tenant` for a tenant that exists or existed.
    #[error(
        "tenant '{tenant}' already exists in the key store (or existed and was shredded): \
         tenant ids are never reused; choose another id"
    )]
    TenantExists {
        /// The tenant.
        tenant: TenantId,
    },
    /// The tenant is not in the store.
    #[error("tenant not found: '{tenant}' is not in the key store; create it first")]
    TenantNotFound {
        /// The tenant.
        tenant: TenantId,
    },
    /// The tenant has no such key version.
    #[error("key version not found: tenant '{tenant}' has no version {version}")]
    VersionNotFound {
        /// The tenant.
        tenant: TenantId,
        /// The version asked for.
        version: u32,
    },
    /// The compare-and-set of a rotation lost: the latest version is not the expected one.
    #[error(
        "tenant '{tenant}' was rotated concurrently: expected latest version {expected_latest} \
         (inserting {next}), but the latest is {actual_latest}; reload the tenant and retry"
    )]
    VersionConflict {
        /// The tenant.
        tenant: TenantId,
        /// What the caller expected.
        expected_latest: u32,
        /// The version the caller tried to insert.
        next: u32,
        /// What the store holds.
        actual_latest: u32,
    },
    /// The tenant was shredded; its keys can no longer change.
    #[error(
        "tenant '{tenant}' was shredded at {shredded_at}: its keys are destroyed for good and \
         cannot be rotated or changed"
    )]
    Shredded {
        /// The tenant.
        tenant: TenantId,
        /// When it was shredded (RFC 3339, as the store reports it).
        shredded_at: String,
    },
    /// `set_min_decrypt_version` outside `1..=latest`.
    #[error(
        "minimum decryption version {min} is out of range for tenant '{tenant}': it must be \
         between 1 and the latest version {latest}"
    )]
    MinVersionOutOfRange {
        /// The tenant.
        tenant: TenantId,
        /// The value asked for.
        min: u32,
        /// The latest version.
        latest: u32,
    },
    /// The compare-and-set of `set_min_decrypt_version` lost: another change came first.
    #[error(
        "the minimum decryption version of tenant '{tenant}' changed concurrently (it is no \
         longer {expected}): re-read the key status and decide again"
    )]
    MinVersionChanged {
        /// The tenant.
        tenant: TenantId,
        /// The value the caller read.
        expected: u32,
    },
    /// The compare-and-set of `replace_wrapped` lost.
    #[error(
        "wrapped key of tenant '{tenant}' version {version} changed since it was read (or the \
         tenant was shredded): reload the tenant and retry"
    )]
    WrappedChanged {
        /// The tenant.
        tenant: TenantId,
        /// The version.
        version: u32,
    },
}

impl StoreRefusal {
    /// The [`BackendErrorKind`] this refusal maps to at the trait boundary.
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            StoreRefusal::TenantNotFound { .. } | StoreRefusal::VersionNotFound { .. } => {
                BackendErrorKind::Other
            }
            StoreRefusal::TenantExists { .. }
            | StoreRefusal::VersionConflict { .. }
            | StoreRefusal::Shredded { .. }
            | StoreRefusal::MinVersionChanged { .. }
            | StoreRefusal::WrappedChanged { .. } => BackendErrorKind::Conflict,
            StoreRefusal::InvalidRecord { .. } | StoreRefusal::MinVersionOutOfRange { .. } => {
                BackendErrorKind::InvalidData
            }
        }
    }

    /// Refuses `record` as a new key version of `tenant` (`insert_version`) if
    /// [`KeyRecord::new_version_problem`] finds one.
    pub fn check_new_version(tenant: &TenantId, record: &KeyRecord) -> Result<(), Self> {
        match record.new_version_problem() {
            Some(reason) => Err(StoreRefusal::InvalidRecord {
                tenant: tenant.clone(),
                version: record.version,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Refuses `record` as the first key version of `tenant` (`create_tenant`): as
    /// [`StoreRefusal::check_new_version`], and its version must be 1.
    pub fn check_first_version(tenant: &TenantId, record: &KeyRecord) -> Result<(), Self> {
        Self::check_new_version(tenant, record)?;
        if record.version != 1 {
            return Err(StoreRefusal::InvalidRecord {
                tenant: tenant.clone(),
                version: record.version,
                reason: "the first key version of a tenant must be 1",
            });
        }
        Ok(())
    }

    /// The compare-and-set of a rotation: refuses unless the store's latest version is
    /// `expected_latest` and `next` is the version after it.
    pub fn check_rotation(
        tenant: &TenantId,
        expected_latest: u32,
        actual_latest: u32,
        next: u32,
    ) -> Result<(), Self> {
        if actual_latest != expected_latest || expected_latest.checked_add(1) != Some(next) {
            return Err(StoreRefusal::VersionConflict {
                tenant: tenant.clone(),
                expected_latest,
                next,
                actual_latest,
            });
        }
        Ok(())
    }

    /// Refuses a minimum decryption version outside `1..=latest`.
    pub fn check_min_decrypt_version(tenant: &TenantId, min: u32, latest: u32) -> Result<(), Self> {
        if !(1..=latest).contains(&min) {
            return Err(StoreRefusal::MinVersionOutOfRange {
                tenant: tenant.clone(),
                min,
                latest,
            });
        }
        Ok(())
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

    /// Sets the minimum decryption version (1..=latest) if it is still `expected_min` (the
    /// value the caller read: a compare-and-set, so that of two concurrent changes — one
    /// operator raising it, another lowering it — the second fails instead of silently
    /// undoing the first). Otherwise fails with [`crate::BackendErrorKind::Conflict`] and
    /// changes nothing.
    async fn set_min_decrypt_version(
        &self,
        tenant: &TenantId,
        expected_min: u32,
        min: u32,
    ) -> Result<(), BackendError>;

    /// Shreds a tenant: every version becomes destroyed and no later call returns its wrapped
    /// bytes; the tombstone stays so the tenant id is never reused. Each store also does what
    /// it can to remove the old bytes from its files (SQLite: `secure_delete` and a WAL
    /// checkpoint; PostgreSQL: a `VACUUM`, with limits its crate documents) — copies outside
    /// the live store (backups, WAL archives, replicas) are beyond it.
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

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;

    #[test]
    fn debug_leaves_out_wrapped_bytes_and_the_key_check() {
        let r = KeyRecord {
            version: 3,
            state: KeyState::Primary,
            wrapped: Some(WrappedKey {
                root_key_ref: "local:3f2a".into(),
                ciphertext: vec![0xab; 60],
            }),
            key_check: [0xcd; 32],
            created_at: Timestamp::UNIX_EPOCH,
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("local:3f2a") && shown.contains("[60 bytes]"),
            "{shown}"
        );
        for leaked in ["171", "205", "ab", "cd"] {
            assert!(!shown.contains(leaked), "{leaked} in {shown}");
        }
    }

    fn record(version: u32) -> KeyRecord {
        KeyRecord {
            version,
            state: KeyState::Primary,
            wrapped: Some(WrappedKey {
                root_key_ref: "test".into(),
                ciphertext: b"wrapped".to_vec(),
            }),
            key_check: [0; 32],
            created_at: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    #[test]
    fn new_records_are_checked() {
        let t = TenantId::new("acme").unwrap();
        assert_eq!(StoreRefusal::check_first_version(&t, &record(1)), Ok(()));
        assert_eq!(StoreRefusal::check_new_version(&t, &record(2)), Ok(()));
        let err = StoreRefusal::check_first_version(&t, &record(2)).unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidData);
        assert_eq!(
            err.to_string(),
            "refusing key record for tenant 'acme' version 2: the first key version of a \
             tenant must be 1"
        );
        let mut no_wrapped = record(1);
        no_wrapped.wrapped = None;
        for err in [
            StoreRefusal::check_first_version(&t, &no_wrapped).unwrap_err(),
            StoreRefusal::check_new_version(&t, &no_wrapped).unwrap_err(),
        ] {
            assert!(
                matches!(err, StoreRefusal::InvalidRecord { version: 1, reason, .. }
                    if reason == "a new key version must carry its wrapped key"),
                "{err}"
            );
        }
    }

    #[test]
    fn rotations_and_minimums_are_checked() {
        let t = TenantId::new("acme").unwrap();
        assert_eq!(StoreRefusal::check_rotation(&t, 3, 3, 4), Ok(()));
        for (expected, actual, next) in [(2, 3, 3), (3, 3, 5), (3, 3, 3), (u32::MAX, u32::MAX, 0)] {
            let err = StoreRefusal::check_rotation(&t, expected, actual, next).unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Conflict, "{err}");
            assert!(err.to_string().contains("rotated concurrently"), "{err}");
        }
        assert_eq!(StoreRefusal::check_min_decrypt_version(&t, 1, 3), Ok(()));
        assert_eq!(StoreRefusal::check_min_decrypt_version(&t, 3, 3), Ok(()));
        for min in [0, 4] {
            let err = StoreRefusal::check_min_decrypt_version(&t, min, 3).unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
        }
    }
}
