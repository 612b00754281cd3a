//! Field encryption under one tenant key version: subkey derivation, nonce handling, AAD,
//! seal and open. The layout is in [`crate::format`]; the rationale in `docs/FORMAT.md`.
//!
//! **Nonce safety of the default algorithm.** A random 10-byte salt is drawn from the OS for
//! each *encryption epoch*; the epoch's AES-256-GCM subkey is
//! `HKDF-SHA256(ikm = tenant key, salt, info = "phiseal v1 aes-256-gcm-hkdf subkey")`.
//! Each message under it gets a random 96-bit nonce from a userspace CSPRNG (rand's ChaCha12
//! thread RNG, seeded from the OS). An epoch ends after [`EPOCH_MESSAGE_LIMIT`] messages, far
//! below SP 800-38D's 2^32 cap for random nonces, so the number of messages per tenant key
//! version is unbounded without operator action. Decryption re-derives the subkey from the salt
//! in the header and caches it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rand::{RngCore, TryRngCore};
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::crypto::{AeadKey, CryptoProvider};
use crate::error::Error;
use crate::format::{Algorithm, FORMAT_V1, KEY_SALT_LEN, ParsedCiphertext};
use crate::kms::KeyBinding;
use crate::secret::TenantKey;

/// Messages per encryption epoch (per derived AES-GCM subkey) before a new salt is drawn.
/// With random 96-bit nonces the chance of any nonce collision within one epoch is below
/// 2^60 / 2^97 = 2^-37.
pub const EPOCH_MESSAGE_LIMIT: u64 = 1 << 30;

const AES_SUBKEY_INFO: &[u8] = b"phiseal v1 aes-256-gcm-hkdf subkey";
const XCHACHA_KEY_INFO: &[u8] = b"phiseal v1 xchacha20-poly1305 key";
const KEY_CHECK_INFO: &[u8] = b"phiseal v1 key-check";
/// Decryption subkeys kept per tenant key version (one per epoch seen).
const SUBKEY_CACHE_CAPACITY: usize = 256;

type SharedAeadKey = Arc<dyn AeadKey>;

/// The AES-256-GCM subkey for `salt` (see the module docs).
pub(crate) fn derive_aes_subkey(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    salt: &[u8],
) -> Result<SharedAeadKey, Error> {
    let subkey = provider
        .hkdf_sha256
        .derive(tenant_key.expose(), salt, &[AES_SUBKEY_INFO]);
    let key = provider.aes_256_gcm.key(&subkey).map_err(|_| Error::Crypto {
        provider: provider.name,
        what: "AES-256-GCM key setup",
    })?;
    Ok(Arc::from(key))
}

/// The XChaCha20-Poly1305 key of a tenant key version.
pub(crate) fn derive_xchacha_key(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
) -> Result<SharedAeadKey, Error> {
    let key = provider
        .hkdf_sha256
        .derive(tenant_key.expose(), &[], &[XCHACHA_KEY_INFO]);
    let key = provider
        .xchacha20_poly1305
        .key(&key)
        .map_err(|_| Error::Crypto {
            provider: provider.name,
            what: "XChaCha20-Poly1305 key setup",
        })?;
    Ok(Arc::from(key))
}

/// The key-check MAC that binds an unwrapped tenant key to its (tenant, version):
/// `HMAC-SHA256(HKDF(ikm = tenant key, salt = "", info = "phiseal v1 key-check"), binding AAD)`.
pub fn key_check(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    binding: &KeyBinding,
) -> [u8; 32] {
    let mac_key = provider
        .hkdf_sha256
        .derive(tenant_key.expose(), &[], &[KEY_CHECK_INFO]);
    provider
        .hmac_sha256
        .sign(mac_key.as_slice(), &[&binding.to_aad()])
}

/// The AAD of a message: its header followed by the context encoding.
fn aad(header: &[u8], context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 64);
    aad.extend_from_slice(header);
    context.encode_into(&mut aad);
    aad
}

fn crypto_error(provider: &'static CryptoProvider) -> Error {
    Error::Crypto {
        provider: provider.name,
        what: "AEAD seal",
    }
}

/// Seals `plaintext` with explicit nonce material (`salt ‖ nonce` or the XChaCha nonce) under
/// an already-derived AEAD key. Shared by the keyring and the known-answer seam.
pub(crate) fn seal(
    provider: &'static CryptoProvider,
    algorithm: Algorithm,
    key_version: u32,
    nonce_material: &[u8],
    key: &dyn AeadKey,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let header_len = algorithm.header_len();
    if nonce_material.len() != algorithm.nonce_material_len() {
        return Err(crypto_error(provider));
    }
    let mut out = Vec::with_capacity(algorithm.overhead() + plaintext.len());
    out.push(FORMAT_V1);
    out.push(algorithm.id());
    out.extend_from_slice(&key_version.to_be_bytes());
    out.extend_from_slice(nonce_material);
    let aad = aad(&out, context);
    let nonce = match algorithm {
        Algorithm::Aes256GcmHkdf => nonce_material.get(KEY_SALT_LEN..),
        Algorithm::XChaCha20Poly1305 => Some(nonce_material),
    }
    .ok_or_else(|| crypto_error(provider))?;
    out.extend_from_slice(plaintext);
    let body = out
        .get_mut(header_len..)
        .ok_or_else(|| crypto_error(provider))?;
    let tag = key
        .seal(nonce, &aad, body)
        .map_err(|_| crypto_error(provider))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a parsed ciphertext under an already-derived AEAD key. Every failure is the opaque
/// [`Error::DecryptionFailed`].
pub(crate) fn open(
    parsed: &ParsedCiphertext<'_>,
    key: &dyn AeadKey,
    context: &EncryptionContext,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let aad = aad(parsed.header, context);
    let nonce = match parsed.algorithm {
        Algorithm::Aes256GcmHkdf => parsed.nonce_material.get(KEY_SALT_LEN..),
        Algorithm::XChaCha20Poly1305 => Some(parsed.nonce_material),
    }
    .ok_or(Error::DecryptionFailed)?;
    let mut out = Zeroizing::new(vec![0u8; parsed.ciphertext.len()]);
    key.open(nonce, &aad, parsed.ciphertext, parsed.tag, &mut out)
        .map_err(|_| Error::DecryptionFailed)?;
    Ok(out)
}

/// One encryption epoch of the default algorithm.
struct Epoch {
    salt: [u8; KEY_SALT_LEN],
    key: SharedAeadKey,
    used: AtomicU64,
}

/// An unwrapped tenant key version, ready to encrypt and decrypt. Zeroized when the last
/// reference is dropped (cache eviction, TTL, max uses, shred).
pub(crate) struct VersionKey {
    provider: &'static CryptoProvider,
    version: u32,
    tenant_key: TenantKey,
    epoch: RwLock<Arc<Epoch>>,
    xchacha: SharedAeadKey,
    subkeys: quick_cache::sync::Cache<[u8; KEY_SALT_LEN], SharedAeadKey>,
    /// Operations served from this cached key, for the cache's max-uses limit.
    pub(crate) uses: AtomicU64,
    /// When it was unwrapped, for the cache's TTL.
    pub(crate) loaded_at: std::time::Instant,
}

impl VersionKey {
    /// Prepares a freshly unwrapped key.
    pub(crate) fn new(
        provider: &'static CryptoProvider,
        version: u32,
        tenant_key: TenantKey,
    ) -> Result<Self, Error> {
        let epoch = Self::new_epoch(provider, &tenant_key)?;
        let xchacha = derive_xchacha_key(provider, &tenant_key)?;
        Ok(Self {
            provider,
            version,
            epoch: RwLock::new(Arc::new(epoch)),
            xchacha,
            subkeys: quick_cache::sync::Cache::new(SUBKEY_CACHE_CAPACITY),
            tenant_key,
            // The operation that unwrapped it is its first use.
            uses: AtomicU64::new(1),
            loaded_at: std::time::Instant::now(),
        })
    }

    fn new_epoch(
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
    ) -> Result<Epoch, Error> {
        let mut salt = [0u8; KEY_SALT_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut salt)
            .map_err(|_| Error::Crypto {
                provider: provider.name,
                what: "OS random number generator",
            })?;
        let key = derive_aes_subkey(provider, tenant_key, &salt)?;
        Ok(Epoch {
            salt,
            key,
            used: AtomicU64::new(0),
        })
    }

    /// Encrypts one field under this version with `algorithm`.
    pub(crate) fn encrypt(
        &self,
        algorithm: Algorithm,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        match algorithm {
            Algorithm::Aes256GcmHkdf => {
                let epoch = self.current_epoch()?;
                let mut material = [0u8; KEY_SALT_LEN + 12];
                let (salt, nonce) = material.split_at_mut(KEY_SALT_LEN);
                salt.copy_from_slice(&epoch.salt);
                rand::rng().fill_bytes(nonce);
                seal(
                    self.provider,
                    algorithm,
                    self.version,
                    &material,
                    &*epoch.key,
                    context,
                    plaintext,
                )
            }
            Algorithm::XChaCha20Poly1305 => {
                let mut nonce = [0u8; 24];
                rand::rng().fill_bytes(&mut nonce);
                seal(
                    self.provider,
                    algorithm,
                    self.version,
                    &nonce,
                    &*self.xchacha,
                    context,
                    plaintext,
                )
            }
        }
    }

    /// The epoch to encrypt under, counting this message; starts a new epoch at the limit.
    fn current_epoch(&self) -> Result<Arc<Epoch>, Error> {
        {
            let epoch = self.epoch.read().map_err(|_| self.lock_error())?;
            if epoch.used.fetch_add(1, Ordering::Relaxed) < EPOCH_MESSAGE_LIMIT {
                return Ok(Arc::clone(&epoch));
            }
        }
        let mut epoch = self.epoch.write().map_err(|_| self.lock_error())?;
        if epoch.used.load(Ordering::Relaxed) >= EPOCH_MESSAGE_LIMIT {
            *epoch = Arc::new(Self::new_epoch(self.provider, &self.tenant_key)?);
        }
        epoch.used.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::clone(&epoch))
    }

    fn lock_error(&self) -> Error {
        Error::Crypto {
            provider: self.provider.name,
            what: "epoch lock poisoned",
        }
    }

    /// Decrypts a parsed ciphertext of this version.
    pub(crate) fn decrypt(
        &self,
        parsed: &ParsedCiphertext<'_>,
        context: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let key = match parsed.algorithm {
            Algorithm::Aes256GcmHkdf => {
                let salt: [u8; KEY_SALT_LEN] = parsed
                    .nonce_material
                    .get(..KEY_SALT_LEN)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(Error::DecryptionFailed)?;
                self.subkey_for(&salt)?
            }
            Algorithm::XChaCha20Poly1305 => Arc::clone(&self.xchacha),
        };
        open(parsed, &*key, context)
    }

    fn subkey_for(&self, salt: &[u8; KEY_SALT_LEN]) -> Result<SharedAeadKey, Error> {
        {
            let epoch = self.epoch.read().map_err(|_| self.lock_error())?;
            if &epoch.salt == salt {
                return Ok(Arc::clone(&epoch.key));
            }
        }
        self.subkeys.get_or_insert_with(salt, || {
            derive_aes_subkey(self.provider, &self.tenant_key, salt)
        })
    }
}
