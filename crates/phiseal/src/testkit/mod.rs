//! Test-only seams (feature `testkit`): encryption with caller-chosen nonce material for
//! known-answer vectors, and direct decryption under raw key bytes. Never enable this feature
//! in production builds: fixed nonces destroy AES-GCM's security.

use crate::context::EncryptionContext;
use crate::crypto::CryptoProvider;
use crate::error::Error;
use crate::field;
use crate::format::{self, Algorithm, KEY_SALT_LEN};
use crate::secret::{Plaintext, TenantKey};

fn field_key(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    algorithm: Algorithm,
    nonce_material: &[u8],
) -> Result<std::sync::Arc<dyn crate::crypto::AeadKey>, Error> {
    match algorithm {
        Algorithm::Aes256GcmHkdf => {
            let salt = nonce_material
                .get(..KEY_SALT_LEN)
                .ok_or(Error::DecryptionFailed)?;
            field::derive_aes_subkey(provider, tenant_key, salt)
        }
        Algorithm::XChaCha20Poly1305 => field::derive_xchacha_key(provider, tenant_key),
        // Deterministic: no nonce to choose; see `seal_deterministic` / `open`.
        Algorithm::Aes256Siv => Err(Error::InvalidInput {
            what: "algorithm",
            reason: "aes-256-siv has no nonce material to choose: use testkit::seal_deterministic",
        }),
    }
}

/// Encrypts with explicit nonce material (`salt ‖ nonce` for 0x01, the 24-byte nonce for 0x02).
pub fn seal_with_nonce(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    algorithm: Algorithm,
    key_version: u32,
    nonce_material: &[u8],
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let key = field_key(provider, tenant_key, algorithm, nonce_material)?;
    field::seal(
        provider,
        algorithm,
        key_version,
        nonce_material,
        &*key,
        context,
        plaintext,
    )
}

/// Decrypts a binary ciphertext under raw tenant key bytes, as a third-party decryptor would.
pub fn open(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    context: &EncryptionContext,
    ciphertext: &[u8],
) -> Result<Plaintext, Error> {
    let parsed = format::parse(ciphertext)?;
    if parsed.algorithm == Algorithm::Aes256Siv {
        return crate::search::open_deterministic_raw(provider, tenant_key, &parsed, context);
    }
    let key = field_key(
        provider,
        tenant_key,
        parsed.algorithm,
        parsed.nonce_material,
    )?;
    field::open(&parsed, &*key, context)
}

/// Deterministic encryption (algorithm 0x03) under raw tenant key bytes, as a third-party
/// implementation computes it (`docs/FORMAT.md` §3.3).
pub fn seal_deterministic(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    key_version: u32,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    crate::search::seal_deterministic_raw(provider, tenant_key, key_version, context, plaintext)
}

/// A blind index under raw tenant key bytes (`docs/FORMAT.md` §9).
pub fn blind_index(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    context: &EncryptionContext,
    spec: &crate::search::BlindIndexSpec,
    value: &[u8],
) -> Result<Vec<u8>, Error> {
    crate::search::blind_index_raw(provider, tenant_key, context, spec, value)
}

pub mod conformance;

/// Whether `handle` still reaches its keyring's cached metadata of the tenant (it holds it
/// weakly: false once the keyring has dropped it, until the handle's next call refreshes it).
pub fn remembers_metadata(handle: &crate::TenantKeyring) -> bool {
    handle.remembers_metadata()
}

/// How many unwrapped key versions `keyring` holds in its key cache.
pub fn cached_keys(keyring: &crate::Keyring) -> usize {
    keyring.cached_key_count()
}

/// Keeps the metadata `handle` remembers alive until the result is dropped, as an operation
/// in flight (or a running batch) would; `None` if it remembers none.
pub fn hold_metadata(
    handle: &crate::TenantKeyring,
) -> Option<Box<dyn std::any::Any + Send + Sync>> {
    handle.hold_metadata()
}
